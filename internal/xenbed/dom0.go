package xenbed

import (
	"compress/gzip"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/guest/image"
)

// dom0Packages are the Debian packages a dom0 is made of, besides the
// kernel and busybox that guest/image provides. apt's candidate version of
// each is used; the libraries come from packages too, not from the build
// machine, so the image does not depend on what the host has installed.
var dom0Packages = []string{
	"xen-hypervisor-4.17-amd64",
	"xen-utils-4.17",
	"xen-utils-common",
	"xenstore-utils",
	"libxenmisc4.17", "libxenstore4", "libxencall1", "libxenevtchn1", "libxenforeignmemory1",
	"libxengnttab1", "libxentoollog1", "libxendevicemodel1", "libxenhypfs1", "libxentoolcore1",
	"libyajl2", "libc6", "libgcc-s1", "liblzma5", "libuuid1", "zlib1g", "libzstd1",
}

// xenLibexec is where Debian installs the Xen tools; libxl looks for
// libxl-save-helper there, so dom0 keeps the same path.
const xenLibexec = "/usr/lib/xen-4.17/bin"

// dom0Programs are the dynamically linked programs dom0 runs, by their path
// in the packages (and in dom0). Their libraries are found from their
// DT_NEEDED entries.
var dom0Programs = []string{
	xenLibexec + "/xl",
	xenLibexec + "/xenstored",
	xenLibexec + "/xenconsoled",
	xenLibexec + "/libxl-save-helper",
	xenLibexec + "/xen-init-dom0",
	"/usr/bin/xenstore",
}

// dom0Links are symlinks to the programs, under the names people type.
var dom0Links = map[string]string{
	"/usr/sbin/xl":             xenLibexec + "/xl",
	"/usr/bin/xenstore-read":   "xenstore",
	"/usr/bin/xenstore-write":  "xenstore",
	"/usr/bin/xenstore-ls":     "xenstore",
	"/usr/bin/xenstore-list":   "xenstore",
	"/usr/bin/xenstore-exists": "xenstore",
	"/usr/bin/xenstore-rm":     "xenstore",
	"/usr/bin/xenstore-watch":  "xenstore",
	"/usr/bin/xenstore-chmod":  "xenstore",
}

// dom0ExtraLibs are loaded with dlopen, so no DT_NEEDED names them: glibc
// needs libgcc_s for pthread_cancel and thread exit, which xenstored and
// xenconsoled use.
var dom0ExtraLibs = []string{"libgcc_s.so.1"}

// Dom0Modules are the kernel modules dom0 loads, in this order after their
// dependencies: the Xen backends, the bridge, QEMU's e1000 NIC and FUSE (hostd's page cache of clones).
var Dom0Modules = []string{
	"xen-privcmd", "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc",
	"xen-blkback", "xen-netback", "bridge", "e1000", "fuse",
}

// libDir is where dom0's libraries go: on Debian's default search path,
// so no ld.so.cache is needed.
const libDir = "/lib/x86_64-linux-gnu"

// modulesListPath lists the modules to insmod, one path a line in load
// order, for the init script.
const modulesListPath = "/etc/xenbed/modules"

//go:embed init.sh
var initScript []byte

//go:embed vif-bridge.sh
var vifBridgeScript []byte

// ImageOptions say how to build the dom0 image.
type ImageOptions struct {
	// CacheDir is guest/image's cache; xenbed keeps its own products under
	// <CacheDir>/xenbed. Empty means image.DefaultCacheDir().
	CacheDir string
	// Agent is the host path of a static xenbed-agent. Empty builds it with
	// `go build` (CGO_ENABLED=0), which needs the Go toolchain and must run
	// inside this module (tests do).
	Agent string
	// Files maps clean absolute dom0 paths to host files to add (sfhostd,
	// guest kernels). Files keep their permission bits.
	Files map[string]string
	// Logger receives progress; nil discards it.
	Logger hclog.Logger
}

// Image is what a xenbed host boots: the hypervisor, dom0's kernel and
// dom0's initramfs.
type Image struct {
	// Xen is the hypervisor as an ELF file, which QEMU's -kernel boots
	// through multiboot.
	Xen string
	// Kernel is dom0's kernel (Debian's, uncompressed ELF).
	Kernel string
	// Initrd is dom0's initramfs (newc cpio).
	Initrd string
	// Hash is the sha256 of Initrd; equal inputs give equal hashes.
	Hash string
	// KernelRelease is dom0's kernel release, e.g. "6.1.0-56-amd64".
	KernelRelease string
	// Packages lists the Debian packages used (name=version).
	Packages []string
	// BuildTime is how long BuildImage took.
	BuildTime time.Duration
}

// BuildImage assembles the dom0 image, reusing what the cache holds: the
// downloaded packages, their unpacked trees, the hypervisor and the
// initramfs itself (named by its content hash).
func BuildImage(ctx context.Context, opts ImageOptions) (*Image, error) {
	start := time.Now()
	if err := checkFiles(opts.Files); err != nil {
		return nil, err
	}
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	cache := opts.CacheDir
	if cache == "" {
		d, err := image.DefaultCacheDir()
		if err != nil {
			return nil, err
		}
		cache = d
	}
	cache, err := filepath.Abs(cache)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(cache, "xenbed")
	img := &Image{}

	agentBin := opts.Agent
	if agentBin == "" {
		tmp, err := os.MkdirTemp("", "xenbed-agent-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		if agentBin, err = BuildAgent(ctx, tmp); err != nil {
			return nil, err
		}
	}

	kernel, err := image.FetchKernel(ctx, cache, Dom0Modules, log)
	if err != nil {
		return nil, fmt.Errorf("xenbed: dom0 kernel: %w", err)
	}
	img.Kernel, img.KernelRelease = kernel.Vmlinux, kernel.Release
	busybox, bbPkg, err := image.FetchBusybox(ctx, cache, log)
	if err != nil {
		return nil, fmt.Errorf("xenbed: busybox: %w", err)
	}
	img.Packages = append(img.Packages, kernel.Package, bbPkg)

	debs, err := image.FetchDebs(ctx, cache, dom0Packages, log)
	if err != nil {
		return nil, fmt.Errorf("xenbed: %w", err)
	}
	var roots []string // unpacked packages, in dom0Packages order
	var hypervisorRoot string
	for _, deb := range debs {
		img.Packages = append(img.Packages, deb.Name+"="+deb.Version)
		root, err := unpackOnce(ctx, deb, filepath.Join(dir, "pkg"))
		if err != nil {
			return nil, err
		}
		roots = append(roots, root)
		if deb.Name == "xen-hypervisor-4.17-amd64" {
			hypervisorRoot = root
		}
	}
	if img.Xen, err = hypervisorELF(hypervisorRoot); err != nil {
		return nil, err
	}

	files, err := dom0Files(roots, busybox, agentBin, kernel, opts.Files)
	if err != nil {
		return nil, err
	}
	var cached bool
	img.Initrd, img.Hash, cached, err = image.WriteArchive(filepath.Join(dir, "initramfs"), files, false)
	if err != nil {
		return nil, fmt.Errorf("xenbed: dom0 initramfs: %w", err)
	}
	img.BuildTime = time.Since(start)
	log.Info("dom0 image ready", "xen", img.Xen, "initrd", img.Initrd, "cached", cached, "time", img.BuildTime)
	return img, nil
}

// BuildAgent compiles the static xenbed-agent into dir and returns its
// path. It runs the go command, from inside this module.
func BuildAgent(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "xenbed-agent")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out,
		"github.com/snowflock-go/snowflock/internal/xenbed/agent/xenbed-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("xenbed: building xenbed-agent: %w: %s", err, strings.TrimSpace(string(b)))
	}
	return out, nil
}

// unpackOnce extracts deb into <dir>/<sha256>/ unless it is there. The tree
// is extracted under a temporary name and renamed, so a tree that exists is
// complete, whoever else unpacks the same package concurrently.
func unpackOnce(ctx context.Context, deb image.Deb, dir string) (string, error) {
	root := filepath.Join(dir, deb.SHA256)
	if _, err := os.Stat(root); err == nil {
		return root, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(dir, ".unpack-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp) // gone after the rename, unless we lost the race
	if err := image.ExtractDeb(ctx, deb.Path, tmp); err != nil {
		return "", fmt.Errorf("xenbed: unpacking %s: %w", deb.Name, err)
	}
	if err := os.Rename(tmp, root); err != nil {
		if _, serr := os.Stat(root); serr == nil {
			return root, nil // someone else finished first
		}
		return "", err
	}
	return root, nil
}

// hypervisorELF returns the uncompressed hypervisor, gunzipping the
// package's /boot/xen-4.17-amd64.gz once (QEMU's multiboot loader takes no
// compressed images).
func hypervisorELF(root string) (string, error) {
	out := filepath.Join(root, "xen.elf")
	if _, err := os.Stat(out); err == nil {
		return out, nil
	}
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "xen-4.17*-amd64.gz"))
	if len(matches) != 1 {
		return "", fmt.Errorf("xenbed: want one /boot/xen-4.17*-amd64.gz in the hypervisor package, found %q", matches)
	}
	in, err := os.Open(matches[0])
	if err != nil {
		return "", err
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		return "", fmt.Errorf("xenbed: %s: %w", matches[0], err)
	}
	tmp, err := os.CreateTemp(root, ".xen.elf-")
	if err != nil {
		return "", err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, zr); err != nil {
		tmp.Close()
		return "", fmt.Errorf("xenbed: %s: %w", matches[0], err)
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	return out, os.Rename(tmp.Name(), out)
}

// dom0Files lists the initramfs: the fixed skeleton, busybox, the agent,
// the Xen programs and their libraries, the modules and the caller's files.
func dom0Files(roots []string, busybox, agentBin string, kernel *image.Kernel, extra map[string]string) ([]image.ArchiveFile, error) {
	dir := func(name string, perm fs.FileMode) image.ArchiveFile {
		return image.ArchiveFile{Name: name, Mode: fs.ModeDir | perm}
	}
	link := func(name, target string) image.ArchiveFile {
		return image.ArchiveFile{Name: name, Mode: fs.ModeSymlink | 0o777, Data: []byte(target)}
	}
	files := []image.ArchiveFile{
		dir("/dev", 0o755), dir("/proc", 0o755), dir("/sys", 0o755), dir("/run", 0o755),
		dir("/tmp", 0o1777|fs.ModeSticky), dir("/root", 0o700), dir("/var", 0o755),
		dir("/var/lib/xen", 0o755), dir("/var/lib/xenstored", 0o755), dir("/var/log/xen", 0o755),
		link("/var/run", "/run"),
		{Name: "/dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Name: "/dev/null", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o666, Major: 1, Minor: 3},
		{Name: "/init", Mode: 0o755, Data: initScript},
		{Name: "/bin/busybox", Mode: 0o755, Host: busybox},
		{Name: "/bin/xenbed-agent", Mode: 0o755, Host: agentBin},
		// busybox init is the last thing /init execs: it only reaps orphans.
		{Name: "/etc/inittab", Mode: 0o644, Data: []byte("::ctrlaltdel:/bin/true\n")},
		{Name: "/etc/xen/scripts/vif-bridge", Mode: 0o755, Data: vifBridgeScript},
	}
	for name, target := range dom0Links {
		files = append(files, link(name, target))
	}

	libs, err := resolveLibraries(roots, dom0Programs, dom0ExtraLibs)
	if err != nil {
		return nil, err
	}
	for _, p := range dom0Programs {
		host, err := findInRoots(roots, p)
		if err != nil {
			return nil, err
		}
		files = append(files, image.ArchiveFile{Name: p, Mode: 0o755, Host: host})
	}
	have := map[string]bool{}
	for _, l := range libs {
		files = append(files, image.ArchiveFile{Name: l.dom0Path, Mode: 0o755, Host: l.hostPath})
		have[l.soname] = true
	}
	xl, err := findInRoots(roots, dom0Programs[0])
	if err != nil {
		return nil, err
	}
	interp, err := interpreter(xl)
	if err != nil {
		return nil, err
	}
	if !path.IsAbs(interp) || !have[path.Base(interp)] {
		return nil, fmt.Errorf("%w: interpreter %q of xl", ErrMissingLibrary, interp)
	}
	if interp != libDir+"/"+path.Base(interp) {
		files = append(files, link(interp, libDir+"/"+path.Base(interp)))
	}

	var order strings.Builder
	for _, m := range kernel.Modules {
		files = append(files, image.ArchiveFile{Name: m.Path, Mode: 0o644, Host: m.HostPath})
		order.WriteString(m.Path + "\n")
	}
	files = append(files,
		image.ArchiveFile{Name: "/lib/modules/" + kernel.Release + "/modules.dep", Mode: 0o644, Data: kernel.ModulesDep},
		image.ArchiveFile{Name: modulesListPath, Mode: 0o644, Data: []byte(order.String())},
	)

	names := make([]string, 0, len(extra))
	for name := range extra {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fi, err := os.Stat(extra[name])
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrBadFile, name, err)
		}
		files = append(files, image.ArchiveFile{Name: name, Mode: fi.Mode().Perm(), Host: extra[name]})
	}
	return files, nil
}

// checkFiles validates ImageOptions.Files before anything is downloaded.
func checkFiles(extra map[string]string) error {
	for name, host := range extra {
		if !path.IsAbs(name) || path.Clean(name) != name || name == "/" {
			return fmt.Errorf("%w: %q is not a clean absolute path", ErrBadFile, name)
		}
		fi, err := os.Stat(host)
		if err != nil {
			return fmt.Errorf("%w: %s: %v", ErrBadFile, name, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%w: %s: %s is not a regular file", ErrBadFile, name, host)
		}
	}
	return nil
}

// ErrBadFile reports an Options.Files entry that cannot go into dom0.
var ErrBadFile = errors.New("xenbed: bad dom0 file")

// XenTools unpacks Debian's Xen tools and libraries (the packages dom0
// gets, less the hypervisor and the C runtime, which the machine has) into
// the image cache, fetching them on first use, and returns the unpacked
// trees: for running Xen's userspace, such as xenstored, outside a bed.
func XenTools(ctx context.Context, cacheDir string, log hclog.Logger) ([]string, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	cache := cacheDir
	if cache == "" {
		var err error
		if cache, err = image.DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	var names []string
	for _, p := range dom0Packages {
		if p != "xen-hypervisor-4.17-amd64" && p != "libc6" && p != "libgcc-s1" {
			names = append(names, p)
		}
	}
	debs, err := image.FetchDebs(ctx, cache, names, log)
	if err != nil {
		return nil, fmt.Errorf("xenbed: %w", err)
	}
	var roots []string
	for _, deb := range debs {
		root, err := unpackOnce(ctx, deb, filepath.Join(cache, "xenbed", "pkg"))
		if err != nil {
			return nil, err
		}
		roots = append(roots, root)
	}
	return roots, nil
}
