package image

import (
	"archive/tar"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// The building blocks below let other image builders (internal/xenbed's dom0
// initramfs) reuse this package's verified downloads, kernel cache and
// reproducible archives without going through Build. Each takes the cache
// lock for its duration, like Build.

// Deb is a downloaded package whose sha256 matched apt's signed index.
type Deb struct {
	Name    string
	Version string
	Path    string // the .deb in <CacheDir>/debs
	SHA256  string
}

// FetchDebs returns the versions of the named packages that apt would
// install, downloading and verifying those the cache lacks. An empty
// cacheDir means DefaultCacheDir(); a nil log discards messages. One
// apt-cache call resolves all the versions, so a warm cache costs ~0.5 s.
func FetchDebs(ctx context.Context, cacheDir string, names []string, log hclog.Logger) ([]Deb, error) {
	b, unlock, err := newExportBuilder(ctx, cacheDir, log)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if len(names) == 0 {
		return nil, nil
	}
	versions, err := b.candidates(ctx, names)
	if err != nil && !b.fetch.updated && b.fetch.listsMissing() {
		if uerr := b.fetch.update(ctx); uerr != nil {
			return nil, uerr
		}
		versions, err = b.candidates(ctx, names)
	}
	if err != nil {
		return nil, err
	}
	debs := make([]Deb, 0, len(names))
	for _, name := range names {
		d, err := b.fetch.fetch(ctx, debPackage{Name: name, Version: versions[name]}, nil)
		if err != nil {
			return nil, err
		}
		debs = append(debs, Deb{Name: d.Package.Name, Version: d.Package.Version, Path: d.Path, SHA256: d.SHA256})
	}
	return debs, nil
}

// candidates returns the candidate version of each package from one
// apt-cache policy call.
func (b *builder) candidates(ctx context.Context, names []string) (map[string]string, error) {
	out, err := b.fetch.run(ctx, "", "apt-cache", append([]string{"policy"}, names...)...)
	if err != nil {
		return nil, err
	}
	versions := parseAptCandidates(out)
	for _, name := range names {
		if versions[name] == "" {
			return nil, fmt.Errorf("%w: %s has no installation candidate", ErrPackageUnavailable, name)
		}
	}
	return versions, nil
}

// parseAptCandidates reads apt-cache policy output for several packages:
// a "name:" line, then indented fields including "Candidate:".
func parseAptCandidates(out []byte) map[string]string {
	versions := map[string]string{}
	name := ""
	for _, line := range strings.Split(string(out), "\n") {
		if line != "" && line[0] != ' ' {
			name = strings.TrimSuffix(strings.TrimSpace(line), ":")
			continue
		}
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Candidate:"); ok && name != "" {
			if v = strings.TrimSpace(v); v != "(none)" {
				versions[name] = v
			}
		}
	}
	return versions
}

// ExtractDeb writes the directories, regular files and symbolic links of a
// package's data.tar under dir, replacing what is there. Nothing is written
// outside dir, whatever the package's symlinks point to. Hard links are
// written as copies of their target.
func ExtractDeb(ctx context.Context, debPath, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	return walkDeb(ctx, debPath, func(e debEntry) error {
		name := filepath.FromSlash(e.Name)
		perm := fs.FileMode(e.Header.Mode) & 0o777
		if parent := filepath.Dir(name); parent != "." {
			if err := root.MkdirAll(parent, 0o755); err != nil {
				return fmt.Errorf("image: extracting %s: %w", e.Name, err)
			}
		}
		switch {
		case e.Header.Typeflag == tar.TypeDir:
			if err := root.MkdirAll(name, 0o755); err != nil {
				return fmt.Errorf("image: extracting %s: %w", e.Name, err)
			}
		case e.Header.Typeflag == tar.TypeSymlink:
			root.Remove(name)
			if err := root.Symlink(e.Header.Linkname, name); err != nil {
				return fmt.Errorf("image: extracting %s: %w", e.Name, err)
			}
		case e.Header.Typeflag == tar.TypeLink:
			// os.Root refuses targets outside dir.
			target := path.Clean(strings.TrimPrefix(e.Header.Linkname, "./"))
			data, err := root.ReadFile(filepath.FromSlash(target))
			if err != nil {
				return fmt.Errorf("%w: %s: hard link to %s: %v", ErrCorruptDeb, e.Name, e.Header.Linkname, err)
			}
			fi, err := root.Stat(filepath.FromSlash(target))
			if err != nil {
				return err
			}
			return writeRootFile(root, name, fi.Mode().Perm(), data)
		case isRegularEntry(e):
			data, err := readAllLimit(e.Data, maxMember)
			if err != nil {
				return err
			}
			return writeRootFile(root, name, perm, data)
		}
		return nil
	})
}

func writeRootFile(root *os.Root, name string, perm fs.FileMode, data []byte) error {
	root.Remove(name) // a symlink in its place must not be followed
	if err := root.WriteFile(name, data, perm); err != nil {
		return fmt.Errorf("image: extracting %s: %w", name, err)
	}
	return root.Chmod(name, perm)
}

// Kernel is Debian's kernel as Build uses it, with some of its modules.
type Kernel struct {
	// Vmlinux is the uncompressed ELF kernel, BzImage the package's vmlinuz.
	Vmlinux, BzImage string
	// Release is the kernel release ("6.1.0-56-amd64").
	Release string
	// Package is the Debian package used, as name=version.
	Package string
	// Modules are the requested modules and their dependencies, in load
	// order.
	Modules []Module
	// ModulesDep is a modules.dep for Modules, for
	// /lib/modules/<Release>/modules.dep.
	ModulesDep []byte
}

// Module is one kernel module file.
type Module struct {
	Path     string // where it belongs: /lib/modules/<release>/kernel/...ko
	HostPath string // the decompressed file in the cache
}

// FetchKernel returns the kernel Build would use (pinned, or the current
// candidate of its series) and the named modules with their dependencies,
// unpacking whatever the cache lacks. Built-in modules are skipped;
// unknown ones fail with ErrModuleNotFound.
func FetchKernel(ctx context.Context, cacheDir string, modules []string, log hclog.Logger) (*Kernel, error) {
	b, unlock, err := newExportBuilder(ctx, cacheDir, log)
	if err != nil {
		return nil, err
	}
	defer unlock()
	kt, err := b.kernel(ctx)
	if err != nil {
		return nil, err
	}
	k := &Kernel{Vmlinux: kt.vmlinuxPath(), BzImage: kt.bzImagePath(), Release: kt.Release, Package: kt.Package.String()}
	if len(modules) == 0 {
		return k, nil
	}
	mods, dep, _, err := kt.modules(ctx, modules, b.log)
	if err != nil {
		return nil, err
	}
	for _, m := range mods {
		k.Modules = append(k.Modules, Module{Path: m.guestPath, HostPath: m.hostPath})
	}
	k.ModulesDep = dep
	return k, nil
}

// FetchBusybox returns the static busybox binary Build puts in images and
// its package (name=version).
func FetchBusybox(ctx context.Context, cacheDir string, log hclog.Logger) (bin, pkg string, err error) {
	b, unlock, err := newExportBuilder(ctx, cacheDir, log)
	if err != nil {
		return "", "", err
	}
	defer unlock()
	return b.busybox(ctx)
}

func newExportBuilder(ctx context.Context, cacheDir string, log hclog.Logger) (*builder, func(), error) {
	o, err := Options{CacheDir: cacheDir, Logger: log}.normaliseCache()
	if err != nil {
		return nil, nil, err
	}
	unlock, err := lockDir(ctx, o.CacheDir, o.Logger)
	if err != nil {
		return nil, nil, err
	}
	stats := &Stats{}
	return &builder{opts: o, log: o.Logger, stats: stats, fetch: newFetcher(filepath.Join(o.CacheDir, "debs"), o.Logger, stats)}, unlock, nil
}

// normaliseCache fills in the logger and cache directory only.
func (opts Options) normaliseCache() (Options, error) {
	o := opts
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	o.Logger = o.Logger.Named("image")
	if o.CacheDir == "" {
		d, err := DefaultCacheDir()
		if err != nil {
			return o, err
		}
		o.CacheDir = d
	}
	abs, err := filepath.Abs(o.CacheDir)
	if err != nil {
		return o, fmt.Errorf("image: %q: %w", o.CacheDir, err)
	}
	o.CacheDir = abs
	return o, nil
}

// ArchiveFile is one entry of an archive written by WriteArchive.
type ArchiveFile struct {
	// Name is the clean absolute path in the archive ("/usr/bin/xl").
	Name string
	// Mode gives the type (regular file, fs.ModeDir, fs.ModeSymlink,
	// fs.ModeDevice|fs.ModeCharDevice) and permission bits.
	Mode fs.FileMode
	// Host is a regular file's content on the host, read when the archive
	// is written; Data is used instead when not nil, and holds a symlink's
	// target.
	Host string
	Data []byte
	// Major and Minor number a device node.
	Major, Minor uint32
}

// WriteArchive writes files as a reproducible newc cpio archive (gzipped
// if gz) named <dir>/<sha256 of the uncompressed archive>.cpio[.gz], unless
// dir holds it already. Missing parent directories are added (mode 0755);
// a name given twice fails with ErrBadPath. It returns the file, its hash
// and whether it came from the cache.
func WriteArchive(dir string, files []ArchiveFile, gz bool) (file, hash string, cached bool, err error) {
	set := map[string]cpioEntry{}
	for _, f := range files {
		if f.Name == "" || f.Name[0] != '/' {
			return "", "", false, fmt.Errorf("%w: %q is not absolute", ErrBadPath, f.Name)
		}
		e, err := archiveEntry(f)
		if err != nil {
			return "", "", false, err
		}
		if _, dup := set[e.Name]; dup {
			return "", "", false, fmt.Errorf("%w: %s given twice", ErrBadPath, f.Name)
		}
		set[e.Name] = e
	}
	for name := range set {
		for p := path.Dir(name); p != "."; p = path.Dir(p) {
			if e, ok := set[p]; ok {
				if e.Mode&modeTypeMask != modeDir {
					return "", "", false, fmt.Errorf("%w: /%s is inside /%s, which is not a directory", ErrBadPath, name, p)
				}
				continue
			}
			set[p] = cpioEntry{Name: p, Mode: modeDir | 0o755}
		}
	}
	entries := make([]cpioEntry, 0, len(set))
	for _, e := range set {
		entries = append(entries, e)
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name < entries[j].Name })
	return writeCachedArchive(entries, dir, gz, false)
}

// archiveEntry converts an ArchiveFile to the cpio writer's entry.
func archiveEntry(f ArchiveFile) (cpioEntry, error) {
	name := f.Name[1:]
	if err := validCpioName(name); err != nil {
		return cpioEntry{}, fmt.Errorf("%w: %v", ErrBadPath, err)
	}
	perm := uint32(f.Mode.Perm())
	if f.Mode&fs.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if f.Mode&fs.ModeSticky != 0 {
		perm |= 0o1000
	}
	switch {
	case f.Mode.IsDir():
		return cpioEntry{Name: name, Mode: modeDir | perm}, nil
	case f.Mode&fs.ModeSymlink != 0:
		return cpioEntry{Name: name, Mode: modeSymlink | 0o777, Data: f.Data}, nil
	case f.Mode&fs.ModeCharDevice != 0:
		return cpioEntry{Name: name, Mode: modeCharDev | perm, RdevMajor: f.Major, RdevMinor: f.Minor}, nil
	case f.Mode&fs.ModeDevice != 0:
		return cpioEntry{Name: name, Mode: modeBlockDev | perm, RdevMajor: f.Major, RdevMinor: f.Minor}, nil
	case f.Mode.IsRegular():
		if f.Data != nil {
			return cpioEntry{Name: name, Mode: modeRegular | perm, Data: f.Data}, nil
		}
		return hostFile(name, f.Host, perm)
	}
	return cpioEntry{}, fmt.Errorf("%w: %s: unsupported mode %v", ErrBadPath, f.Name, f.Mode)
}

// WriteMinimalInitramfs writes, under dir, an initramfs for test guests:
// /proc, /sys, /dev with /dev/console, the given files (an /init among
// them), and kernel's modules listed in /etc/modules for the init to load.
// It returns the archive's path.
func WriteMinimalInitramfs(dir string, kernel *Kernel, files ...ArchiveFile) (string, error) {
	all := append(files,
		ArchiveFile{Name: "/proc", Mode: fs.ModeDir | 0o755},
		ArchiveFile{Name: "/sys", Mode: fs.ModeDir | 0o755},
		ArchiveFile{Name: "/dev", Mode: fs.ModeDir | 0o755},
		ArchiveFile{Name: "/dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
	)
	var mods strings.Builder
	for _, m := range kernel.Modules {
		all = append(all, ArchiveFile{Name: m.Path, Mode: 0o644, Host: m.HostPath})
		mods.WriteString(m.Path + "\n")
	}
	all = append(all, ArchiveFile{Name: "/etc/modules", Mode: 0o644, Data: []byte(mods.String())})
	initrd, _, _, err := WriteArchive(dir, all, false)
	return initrd, err
}
