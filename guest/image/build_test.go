package image

// Tests with real inputs: they download Debian's kernel and busybox-static
// with apt (needs root and the Debian archive; CI has both) into the shared
// test cache, so only the first run downloads.

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// defaultModuleNames are DefaultModules with the dependencies Debian 12's
// kernel gives them.
var defaultModuleNames = []string{
	"failover", "net_failover", "virtio", "virtio_balloon", "virtio_blk", "virtio_console",
	"virtio_net", "virtio_pci", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring",
}

func readInitrd(t *testing.T, path string) []byte {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.HasSuffix(path, ".gz") {
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			t.Fatal(err)
		}
		if raw, err = io.ReadAll(zr); err != nil {
			t.Fatal(err)
		}
	}
	return raw
}

func TestBuild(t *testing.T) {
	script := filepath.Join(t.TempDir(), "run.sh")
	os.WriteFile(script, []byte("#!/bin/sh\necho workload\n"), 0o755)
	img := buildTestImage(t, func(o *Options) {
		o.ExtraFiles = map[string]string{"/work/run.sh": script}
	})
	t.Logf("image: %+v", img)

	// The kernel: an x86-64 ELF executable, from the pinned series.
	f, err := elf.Open(img.Kernel)
	if err != nil {
		t.Fatalf("vmlinux: %v", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		t.Errorf("vmlinux is %v %v %v", f.Class, f.Machine, f.Type)
	}
	f.Close()
	if !kernelSeries.MatchString(strings.Split(img.KernelPackage, "=")[0]) || !strings.HasPrefix(img.KernelVersion, "6.1.0-") {
		t.Errorf("kernel package %q, version %q", img.KernelPackage, img.KernelVersion)
	}
	if v := kernelFileVersion(img.BzImage); v != img.KernelVersion {
		t.Errorf("bzImage says %q, image %q", v, img.KernelVersion)
	}
	deb := filepath.Join(testCacheDir(t), "debs", strings.Replace(img.KernelPackage, "=", "_", 1)+"_amd64.deb")
	if sum, err := fileSHA256(deb); err != nil || sum != img.KernelDebSHA256 {
		t.Errorf("kernel deb %s: sha256 %s, %v; image says %s", deb, sum, err, img.KernelDebSHA256)
	}
	vi, _ := os.Stat(img.Kernel)
	ii, _ := os.Stat(img.Initrd)
	t.Logf("vmlinux %d bytes, initramfs %d bytes (%s)", vi.Size(), ii.Size(), filepath.Base(img.Initrd))

	files, err := readNewc(readInitrd(t, img.Initrd))
	if err != nil {
		t.Fatalf("reading the initramfs: %v", err)
	}
	byName := map[string]cpioFile{}
	for i, f := range files {
		if i > 0 && files[i-1].Name >= f.Name {
			t.Errorf("entries not sorted: %q before %q", files[i-1].Name, f.Name)
		}
		if f.Ino != uint32(i+1) || f.Mtime != 0 || f.UID != 0 || f.GID != 0 {
			t.Errorf("%s: ino %d mtime %d uid %d gid %d", f.Name, f.Ino, f.Mtime, f.UID, f.GID)
		}
		if d := filepathDir(f.Name); d != "" && byName[d].Mode&modeTypeMask != modeDir {
			t.Errorf("%s comes before its directory %s", f.Name, d)
		}
		byName[f.Name] = f
	}
	initBin, _ := os.ReadFile(standIn(t))
	checks := []struct {
		name string
		mode uint32
		data []byte
	}{
		{"init", modeRegular | 0o755, initBin},
		{"bin/sh", modeSymlink | 0o777, []byte("busybox")},
		{"bin/sha256sum", modeSymlink | 0o777, []byte("busybox")},
		{"bin/poweroff", modeSymlink | 0o777, []byte("busybox")},
		{"work/run.sh", modeRegular | 0o755, []byte("#!/bin/sh\necho workload\n")},
		{"tmp", modeDir | 0o1777, nil},
		{"dev/console", modeCharDev | 0o600, nil},
		{"dev/null", modeCharDev | 0o666, nil},
	}
	for _, d := range []string{"proc", "sys", "dev", "run", "mnt", "etc/sfguest", "lib/modules/" + img.KernelVersion} {
		checks = append(checks, struct {
			name string
			mode uint32
			data []byte
		}{d, modeDir | 0o755, nil})
	}
	for _, c := range checks {
		f, ok := byName[c.name]
		if !ok {
			t.Errorf("no /%s", c.name)
			continue
		}
		if f.Mode != c.mode || (c.data != nil && !bytes.Equal(f.Data, c.data)) {
			t.Errorf("/%s: mode %o, %d bytes; want %o, %d bytes", c.name, f.Mode, len(f.Data), c.mode, len(c.data))
		}
	}
	if c := byName["dev/console"]; c.RdevMajor != 5 || c.RdevMinor != 1 {
		t.Errorf("/dev/console is %d,%d", c.RdevMajor, c.RdevMinor)
	}
	if c := byName["dev/null"]; c.RdevMajor != 1 || c.RdevMinor != 3 {
		t.Errorf("/dev/null is %d,%d", c.RdevMajor, c.RdevMinor)
	}
	bb := byName["bin/busybox"]
	if ef, err := elf.NewFile(bytes.NewReader(bb.Data)); err != nil || slices.ContainsFunc(ef.Progs, func(p *elf.Prog) bool { return p.Type == elf.PT_INTERP }) {
		t.Errorf("/bin/busybox is not a static ELF: %v", err)
	}

	// Modules: the defaults plus dependencies, listed in load order.
	list := strings.Fields(string(byName[strings.TrimPrefix(ModulesListPath, "/")].Data))
	if !slices.Equal(list, img.Modules) {
		t.Errorf("%s lists %q, Image.Modules %q", ModulesListPath, list, img.Modules)
	}
	var names []string
	pos := map[string]int{}
	for i, m := range img.Modules {
		n := moduleName(m)
		names = append(names, n)
		pos[n] = i
		f, ok := byName[strings.TrimPrefix(m, "/")]
		if !ok {
			t.Errorf("module %s not in the initramfs", m)
			continue
		}
		if _, err := parseModinfo(f.Data); err != nil {
			t.Errorf("module %s: %v", m, err)
		}
	}
	sort.Strings(names)
	if !slices.Equal(names, defaultModuleNames) {
		t.Errorf("modules %q, want %q", names, defaultModuleNames)
	}
	for _, before := range [][2]string{{"failover", "net_failover"}, {"net_failover", "virtio_net"}, {"virtio_ring", "virtio"}, {"virtio", "virtio_pci"}, {"virtio_pci_modern_dev", "virtio_pci"}} {
		if pos[before[0]] >= pos[before[1]] {
			t.Errorf("%s loads after %s", before[0], before[1])
		}
	}
	dep := string(byName["lib/modules/"+img.KernelVersion+"/modules.dep"].Data)
	if !strings.Contains(dep, "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko") {
		t.Errorf("modules.dep:\n%s", dep)
	}
}

func filepathDir(name string) string {
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		return name[:i]
	}
	return ""
}

func TestBuildCacheReused(t *testing.T) {
	first := buildTestImage(t, nil)
	second := buildTestImage(t, nil)
	s := second.Stats
	t.Logf("first: %+v", first.Stats)
	t.Logf("second: %+v", s)
	if len(s.Downloaded) != 0 || s.KernelUnpacked || !s.InitramfsCached {
		t.Errorf("second build did work: %+v", s)
	}
	if second.Hash != first.Hash || second.Initrd != first.Initrd || second.Kernel != first.Kernel {
		t.Errorf("second build differs:\n%+v\n%+v", first, second)
	}
	if s.Total > 5*time.Second {
		t.Errorf("a cached build took %v", s.Total)
	}
}

func TestBuildReproducible(t *testing.T) {
	for _, gz := range []bool{false, true} {
		var hashes []string
		var contents [][]byte
		for i := 0; i < 2; i++ {
			img := buildTestImage(t, func(o *Options) { o.Gzip, o.RebuildInitramfs = gz, true })
			if img.Stats.InitramfsCached {
				t.Fatal("RebuildInitramfs used the cache")
			}
			raw, err := os.ReadFile(img.Initrd)
			if err != nil {
				t.Fatal(err)
			}
			hashes, contents = append(hashes, img.Hash), append(contents, raw)
			if got, err := initramfsHash(img.Initrd); err != nil || got != img.Hash {
				t.Errorf("gzip %v: file hash %s, %v; Image.Hash %s", gz, got, err, img.Hash)
			}
			t.Logf("gzip %v: initramfs build %v, %d bytes", gz, img.Stats.Initramfs, len(raw))
		}
		if hashes[0] != hashes[1] || !bytes.Equal(contents[0], contents[1]) {
			t.Errorf("gzip %v: two builds differ: %s %s", gz, hashes[0], hashes[1])
		}
	}
}

func TestBuildModules(t *testing.T) {
	// Dashes, duplicates and built-in modules are fine.
	img := buildTestImage(t, func(o *Options) { o.Modules = []string{"virtio-net", "virtio_net", "8250"} })
	var names []string
	for _, m := range img.Modules {
		names = append(names, moduleName(m))
	}
	if want := []string{"virtio_ring", "virtio", "failover", "net_failover", "virtio_net"}; !slices.Equal(names, want) {
		t.Errorf("modules %q, want %q", names, want)
	}
	// No modules at all.
	img = buildTestImage(t, func(o *Options) { o.Modules = []string{} })
	if len(img.Modules) != 0 {
		t.Errorf("modules %q, want none", img.Modules)
	}
	files, err := readNewc(readInitrd(t, img.Initrd))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f.Name == strings.TrimPrefix(ModulesListPath, "/") && len(f.Data) != 0 {
			t.Errorf("module list %q, want empty", f.Data)
		}
	}
}

func TestBuildErrors(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "run.sh")
	os.WriteFile(script, []byte("echo hi\n"), 0o644)
	dynamic, _ := exec.LookPath("ls") // a dynamically linked executable
	tests := []struct {
		name string
		opts func(*Options)
		want error
	}{
		{"no sfguest", func(o *Options) { o.SFGuest = "" }, ErrMissingFile},
		{"missing sfguest", func(o *Options) { o.SFGuest = filepath.Join(dir, "nope") }, ErrMissingFile},
		{"sfguest is a directory", func(o *Options) { o.SFGuest = dir }, ErrMissingFile},
		{"dynamic sfguest", func(o *Options) { o.SFGuest = dynamic }, ErrNotStatic},
		{"script as sfguest", func(o *Options) { o.SFGuest = script }, ErrNotStatic},
		{"relative guest path", func(o *Options) { o.ExtraFiles = map[string]string{"work/run.sh": script} }, ErrBadPath},
		{"dotdot", func(o *Options) { o.ExtraFiles = map[string]string{"/../etc/passwd": script} }, ErrBadPath},
		{"inner dotdot", func(o *Options) { o.ExtraFiles = map[string]string{"/work/../init": script} }, ErrBadPath},
		{"dot", func(o *Options) { o.ExtraFiles = map[string]string{"/work/./run.sh": script} }, ErrBadPath},
		{"double slash", func(o *Options) { o.ExtraFiles = map[string]string{"/work//run.sh": script} }, ErrBadPath},
		{"trailing slash", func(o *Options) { o.ExtraFiles = map[string]string{"/work/": script} }, ErrBadPath},
		{"root", func(o *Options) { o.ExtraFiles = map[string]string{"/": script} }, ErrBadPath},
		{"proc", func(o *Options) { o.ExtraFiles = map[string]string{"/proc/x": script} }, ErrBadPath},
		{"dev", func(o *Options) { o.ExtraFiles = map[string]string{"/dev/x": script} }, ErrBadPath},
		{"newline", func(o *Options) { o.ExtraFiles = map[string]string{"/a\nb": script} }, ErrBadPath},
		{"replaces init", func(o *Options) { o.ExtraFiles = map[string]string{"/init": script} }, ErrBadPath},
		{"replaces module list", func(o *Options) { o.ExtraFiles = map[string]string{ModulesListPath: script} }, ErrBadPath},
		{"below a symlink", func(o *Options) { o.ExtraFiles = map[string]string{"/bin/sh/x": script} }, ErrBadPath},
		{"below a file", func(o *Options) { o.ExtraFiles = map[string]string{"/init/x": script} }, ErrBadPath},
		{"over a directory", func(o *Options) { o.ExtraFiles = map[string]string{"/etc": script} }, ErrBadPath},
		{"missing host file", func(o *Options) { o.ExtraFiles = map[string]string{"/x": filepath.Join(dir, "nope")} }, ErrMissingFile},
		{"host directory", func(o *Options) { o.ExtraFiles = map[string]string{"/x": dir} }, ErrMissingFile},
		{"unknown module", func(o *Options) { o.Modules = []string{"virtio_net", "no_such_module"} }, ErrModuleNotFound},
		{"missing kernel", func(o *Options) { o.Kernel = filepath.Join(dir, "vmlinux") }, ErrMissingFile},
		{"missing initrd", func(o *Options) { o.Initrd = filepath.Join(dir, "initrd") }, ErrMissingFile},
	}
	for i, tt := range tests {
		o := Options{CacheDir: testCacheDir(t), SFGuest: standIn(t), Logger: testLogger(t)}
		tt.opts(&o)
		img, err := Build(context.Background(), o)
		if !errors.Is(err, tt.want) {
			t.Errorf("#%d %s: err = %v, want %v", i, tt.name, err, tt.want)
		} else if img != nil {
			t.Errorf("#%d %s: an image with an error", i, tt.name)
		}
	}
}

func TestBuildCustomKernel(t *testing.T) {
	base := buildTestImage(t, nil)
	// A custom kernel (here the package's bzImage) with our initramfs:
	// no modules, the release read from the bzImage header.
	img := buildTestImage(t, func(o *Options) { o.Kernel = base.BzImage })
	if img.Kernel != base.BzImage || img.KernelPackage != "" || img.KernelVersion != base.KernelVersion || len(img.Modules) != 0 {
		t.Errorf("custom kernel: %+v", img)
	}
	o := Options{CacheDir: testCacheDir(t), SFGuest: standIn(t), Kernel: base.BzImage, Modules: []string{"virtio_net"}}
	if _, err := Build(context.Background(), o); err == nil {
		t.Error("Modules with a custom Kernel accepted")
	}
	// Both given: passed through, nothing built, SFGuest not needed.
	img = buildTestImage(t, func(o *Options) { o.Kernel, o.Initrd, o.SFGuest = base.Kernel, base.Initrd, "" })
	if img.Kernel != base.Kernel || img.Initrd != base.Initrd || img.Hash != base.Hash || len(img.Stats.Downloaded) != 0 {
		t.Errorf("pass-through: %+v", img)
	}
	// A custom initramfs with Debian's kernel.
	img = buildTestImage(t, func(o *Options) { o.Initrd = base.Initrd })
	if img.Kernel != base.Kernel || img.Initrd != base.Initrd || img.KernelVersion != base.KernelVersion {
		t.Errorf("custom initrd: %+v", img)
	}
}

func TestCorruptDeb(t *testing.T) {
	buildTestImage(t, nil) // makes sure the cache has busybox-static
	debs, _ := filepath.Glob(filepath.Join(testCacheDir(t), "debs", PinnedBusyboxPackage+"_*.deb"))
	if len(debs) == 0 {
		t.Fatal("no busybox-static .deb in the cache")
	}
	good, err := os.ReadFile(debs[0])
	if err != nil {
		t.Fatal(err)
	}
	flip := func(off int) []byte {
		b := bytes.Clone(good)
		b[off] ^= 0x55
		return b
	}
	variants := map[string][]byte{
		"truncated in ar header": good[:100],
		"truncated in data":      good[:len(good)/2],
		"last byte missing":      good[:len(good)-1],
		"bad magic":              flip(0),
		"bad member size":        flip(8 + 48),
		"flipped in data.tar":    flip(len(good) / 2),
		"flipped near the end":   flip(len(good) - 20),
		"empty":                  {},
	}
	dir := t.TempDir()
	for name, data := range variants {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "_")+".deb")
		os.WriteFile(p, data, 0o644)
		err := walkDeb(context.Background(), p, func(e debEntry) error {
			_, err := io.Copy(io.Discard, e.Data)
			return err
		})
		if !errors.Is(err, ErrCorruptDeb) {
			t.Errorf("%s: err = %v, want ErrCorruptDeb", name, err)
		}
	}
}

func TestRealFallback(t *testing.T) {
	buildTestImage(t, nil) // the current candidate is cached by now, unless the pin is current
	var logs bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: io.MultiWriter(&logs, testWriter{t}), Level: hclog.Info})
	f := newFetcher(filepath.Join(testCacheDir(t), "debs"), log, &Stats{})
	gone := debPackage{PinnedKernelPackage, "0.0-gone"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d, err := f.fetch(ctx, gone, f.kernelFallback)
	if err != nil {
		t.Fatalf("fallback: %v", err)
	}
	if !kernelSeries.MatchString(d.Package.Name) || d.Package == gone {
		t.Errorf("fell back to %v", d.Package)
	}
	if !strings.Contains(logs.String(), gone.String()) || !strings.Contains(logs.String(), d.Package.String()) {
		t.Errorf("warning does not name both versions: %q", logs.String())
	}
	t.Logf("fallback from %v to %v (downloaded %v)", gone, d.Package, f.stats.Downloaded)
}

func TestBusyboxApplets(t *testing.T) {
	img := buildTestImage(t, func(o *Options) { o.Modules = []string{} })
	files, err := readNewc(readInitrd(t, img.Initrd))
	if err != nil {
		t.Fatal(err)
	}
	var bb []byte
	for _, f := range files {
		if f.Name == "bin/busybox" {
			bb = f.Data
		}
	}
	p := filepath.Join(t.TempDir(), "busybox")
	os.WriteFile(p, bb, 0o755)
	out, err := exec.Command(p, "--list").Output()
	if err != nil {
		t.Fatalf("busybox --list: %v", err)
	}
	have := map[string]bool{}
	for _, a := range strings.Fields(string(out)) {
		have[a] = true
	}
	for _, a := range busyboxApplets {
		if !have[a] {
			t.Errorf("busybox has no applet %q", a)
		}
	}
	out, err = exec.Command(p, "sh", "-c", "echo snowflock | sha256sum").Output()
	sum := sha256.Sum256([]byte("snowflock\n"))
	if err != nil || !strings.HasPrefix(string(out), hex.EncodeToString(sum[:])) {
		t.Errorf("busybox sh: %q, %v", out, err)
	}
}

// BenchmarkInitramfs measures building the initramfs from a warm kernel
// cache: hashing and writing every entry (Stats.Initramfs).
func BenchmarkInitramfs(b *testing.B) {
	for _, gz := range []bool{false, true} {
		name := "cpio"
		if gz {
			name = "cpio.gz"
		}
		b.Run(name, func(b *testing.B) {
			quiet := hclog.NewNullLogger()
			buildTestImage(b, func(o *Options) { o.Gzip, o.Logger = gz, quiet }) // warm the cache
			var total time.Duration
			for i := 0; i < b.N; i++ {
				img := buildTestImage(b, func(o *Options) { o.Gzip, o.RebuildInitramfs, o.Logger = gz, true, quiet })
				total += img.Stats.Initramfs
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/initramfs")
		})
	}
}
