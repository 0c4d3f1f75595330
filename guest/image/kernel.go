package image

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// kernelTree is an unpacked kernel package, cached in
// <CacheDir>/kernel/<sha256 of the .deb>/:
//
//	kernel.json          where it came from; written last, so it marks the tree complete
//	vmlinuz              the bzImage from /boot
//	vmlinux              the ELF kernel extracted from it
//	modules.dep          dependency index of every module of the package
//	modules.builtin      the package's list of built-in modules
//	lib/modules/<release>/kernel/...ko   modules extracted so far, decompressed
//
// Modules are extracted on demand: the index needs one pass over the package
// (~5 s of XZ), the files another, only when a Build asks for new ones.
type kernelTree struct {
	kernelMeta
	dir     string
	debPath string
	deps    depIndex
	builtin map[string]bool
}

type kernelMeta struct {
	Package   debPackage `json:"package"`
	DebSHA256 string     `json:"deb_sha256"`
	// Release is the kernel release, "6.1.0-56-amd64".
	Release string `json:"release"`
	// ModulesDir is where the package keeps the modules:
	// "lib/modules/<release>" (or under usr/ on merged-/usr releases).
	ModulesDir string `json:"modules_dir"`
}

// moduleFile is one module placed in the initramfs.
type moduleFile struct {
	guestPath string // /lib/modules/<release>/kernel/...ko
	hostPath  string
}

// maxMember bounds a single file read from a package into memory.
const maxMember = 256 << 20

func (kt *kernelTree) vmlinuxPath() string { return filepath.Join(kt.dir, "vmlinux") }
func (kt *kernelTree) bzImagePath() string { return filepath.Join(kt.dir, "vmlinuz") }

// kernel fetches the pinned kernel package and opens its cached tree,
// unpacking it on first use.
func (b *builder) kernel(ctx context.Context) (*kernelTree, error) {
	pin := debPackage{Name: PinnedKernelPackage, Version: PinnedKernelVersion}
	deb, err := b.fetch.fetch(ctx, pin, b.fetch.kernelFallback)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	defer func() { b.stats.Kernel += time.Since(start) }()
	kt := &kernelTree{dir: filepath.Join(b.opts.CacheDir, "kernel", deb.SHA256), debPath: deb.Path}
	if err := kt.load(); err == nil {
		return kt, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		b.log.Warn("kernel cache is damaged; unpacking again", "dir", kt.dir, "error", err)
	}
	b.log.Info("unpacking kernel package", "package", deb.Package.String())
	b.stats.KernelUnpacked = true
	if err := kt.unpack(ctx, deb); err != nil {
		return nil, err
	}
	if err := kt.load(); err != nil {
		return nil, fmt.Errorf("image: kernel cache %s: %w", kt.dir, err)
	}
	return kt, nil
}

// load reads a complete tree from the cache.
func (kt *kernelTree) load() error {
	raw, err := os.ReadFile(filepath.Join(kt.dir, "kernel.json"))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, &kt.kernelMeta); err != nil {
		return err
	}
	if !validRelease(kt.Release) || !validModulesDir(kt.ModulesDir) {
		return fmt.Errorf("bad kernel.json: release %q, modules %q", kt.Release, kt.ModulesDir)
	}
	for _, f := range []string{"vmlinux", "vmlinuz"} {
		if err := regularFile(filepath.Join(kt.dir, f), f); err != nil {
			return err
		}
	}
	f, err := os.Open(filepath.Join(kt.dir, "modules.dep"))
	if err != nil {
		return err
	}
	defer f.Close()
	if kt.deps, err = parseModulesDep(f); err != nil {
		return err
	}
	builtin, err := os.ReadFile(filepath.Join(kt.dir, "modules.builtin"))
	if err != nil {
		return err
	}
	kt.builtin = parseBuiltin(builtin)
	return nil
}

// unpack makes the tree from the package: one pass over data.tar.
func (kt *kernelTree) unpack(ctx context.Context, deb debFile) error {
	var (
		release, modulesDir string
		vmlinuz, depFile    []byte
		builtin             = map[string][]byte{}              // by modules dir
		direct              = map[string]map[string][]string{} // modules dir -> module path -> depends=
		shippedDep          = map[string][]byte{}
	)
	err := walkDeb(ctx, deb.Path, func(e debEntry) error {
		if !isRegularEntry(e) {
			return nil
		}
		if rel, ok := strings.CutPrefix(e.Name, "boot/vmlinuz-"); ok {
			if vmlinuz != nil || !validRelease(rel) {
				return fmt.Errorf("%w: unexpected kernel %s", ErrCorruptDeb, e.Name)
			}
			release = rel
			var err error
			vmlinuz, err = readAllLimit(e.Data, maxMember)
			return err
		}
		dir, rest, ok := splitModulesPath(e.Name)
		if !ok {
			return nil
		}
		switch {
		case rest == "modules.dep":
			b, err := readAllLimit(e.Data, maxMember)
			shippedDep[dir] = b
			return err
		case rest == "modules.builtin":
			b, err := readAllLimit(e.Data, maxMember)
			builtin[dir] = b
			return err
		case validModulePath(rest):
			ko, err := readModule(e.Data, rest)
			if err != nil {
				return err
			}
			deps, err := parseModinfo(ko)
			if err != nil {
				return fmt.Errorf("%w: %s: %v", ErrCorruptDeb, e.Name, err)
			}
			if direct[dir] == nil {
				direct[dir] = map[string][]string{}
			}
			direct[dir][rest] = deps
		}
		return nil
	})
	if err != nil {
		return err
	}
	if vmlinuz == nil {
		return fmt.Errorf("%w: %s has no /boot/vmlinuz-*", ErrCorruptDeb, deb.Path)
	}
	for _, d := range []string{"lib/modules/" + release, "usr/lib/modules/" + release} {
		if direct[d] != nil || shippedDep[d] != nil || builtin[d] != nil {
			modulesDir = d
		}
	}
	if modulesDir == "" {
		modulesDir = "lib/modules/" + release // a kernel without modules
	}
	var idx depIndex
	if b := shippedDep[modulesDir]; b != nil {
		if idx, err = parseModulesDep(bytes.NewReader(b)); err != nil {
			return fmt.Errorf("%w: %v", ErrCorruptDeb, err)
		}
	} else if idx, err = depIndexFromModinfo(direct[modulesDir]); err != nil {
		return err
	}
	var depBuf bytes.Buffer
	if err := idx.write(&depBuf); err != nil {
		return err
	}
	depFile = depBuf.Bytes()

	vmlinux, err := extractVmlinux(vmlinuz, maxVmlinux)
	if err != nil {
		return fmt.Errorf("%s: %w", deb.Path, err)
	}
	meta, err := json.MarshalIndent(kernelMeta{Package: deb.Package, DebSHA256: deb.SHA256, Release: release, ModulesDir: modulesDir}, "", "  ")
	if err != nil {
		return err
	}
	// kernel.json last: it marks the tree complete.
	files := []struct {
		name string
		mode os.FileMode
		data []byte
	}{
		{"vmlinuz", 0o644, vmlinuz},
		{"vmlinux", 0o644, vmlinux},
		{"modules.dep", 0o644, depFile},
		{"modules.builtin", 0o644, builtin[modulesDir]},
		{"kernel.json", 0o644, append(meta, '\n')},
	}
	for _, f := range files {
		if err := writeFileAtomic(filepath.Join(kt.dir, f.name), f.mode, func(w io.Writer) error {
			_, err := w.Write(f.data)
			return err
		}); err != nil {
			return fmt.Errorf("image: kernel cache: %w", err)
		}
	}
	return nil
}

// modules returns the named modules and their dependencies in load order,
// extracting those not yet in the cache. It also returns the initramfs's
// modules.dep for them.
func (kt *kernelTree) modules(ctx context.Context, names []string, log hclog.Logger) (files []moduleFile, modulesDep []byte, unpacked bool, err error) {
	order, builtin, err := kt.deps.loadOrder(names, kt.builtin)
	if err != nil {
		return nil, nil, false, err
	}
	if len(builtin) > 0 {
		log.Debug("requested modules are built into the kernel", "modules", builtin)
	}
	treeDir := filepath.Join(kt.dir, "lib", "modules", kt.Release)
	missing := map[string]bool{}
	sub := depIndex{}
	for _, p := range order {
		files = append(files, moduleFile{
			guestPath: "/lib/modules/" + kt.Release + "/" + koPath(p),
			hostPath:  filepath.Join(treeDir, filepath.FromSlash(koPath(p))),
		})
		if _, err := os.Stat(files[len(files)-1].hostPath); err != nil {
			missing[p] = true
		}
		deps := []string{}
		for _, d := range kt.deps[p] {
			deps = append(deps, koPath(d))
		}
		sub[koPath(p)] = deps
	}
	var buf bytes.Buffer
	if err := sub.write(&buf); err != nil {
		return nil, nil, false, err
	}
	if len(missing) == 0 {
		return files, buf.Bytes(), false, nil
	}
	log.Info("extracting kernel modules", "count", len(missing))
	if err := kt.extract(ctx, missing, treeDir); err != nil {
		return nil, nil, true, err
	}
	return files, buf.Bytes(), true, nil
}

// extract copies the module files in want (paths relative to the modules
// directory) from the package into dir, decompressed.
func (kt *kernelTree) extract(ctx context.Context, want map[string]bool, dir string) error {
	left := len(want)
	err := walkDeb(ctx, kt.debPath, func(e debEntry) error {
		rest, ok := strings.CutPrefix(e.Name, kt.ModulesDir+"/")
		if !ok || !want[rest] || !isRegularEntry(e) {
			return nil
		}
		ko, err := readModule(e.Data, rest)
		if err != nil {
			return err
		}
		if _, err := parseModinfo(ko); err != nil {
			return fmt.Errorf("%w: %s: %v", ErrCorruptDeb, e.Name, err)
		}
		if err := writeFileAtomic(filepath.Join(dir, filepath.FromSlash(koPath(rest))), 0o644, func(w io.Writer) error {
			_, err := w.Write(ko)
			return err
		}); err != nil {
			return err
		}
		delete(want, rest)
		if left--; left == 0 {
			return errStopWalk
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(want) > 0 {
		return fmt.Errorf("%w: %s lacks modules its index lists: %v", ErrCorruptDeb, kt.debPath, want)
	}
	return nil
}

// readModule reads a module file, decompressing .ko.xz and .ko.gz.
func readModule(r io.Reader, name string) ([]byte, error) {
	comp := strings.TrimPrefix(path.Ext(name), ".")
	if comp == "ko" {
		comp = ""
	}
	zr, err := decompressor(r, comp, name)
	if err != nil {
		return nil, err
	}
	return readAllLimit(zr, maxMember)
}

// koPath is a module's path once decompressed.
func koPath(p string) string {
	for _, ext := range []string{".xz", ".gz", ".zst"} {
		if s, ok := strings.CutSuffix(p, ".ko"+ext); ok {
			return s + ".ko"
		}
	}
	return p
}

// splitModulesPath splits "lib/modules/<release>/rest" (or under usr/) into
// the modules directory and rest.
func splitModulesPath(name string) (dir, rest string, ok bool) {
	trimmed := strings.TrimPrefix(name, "usr/")
	after, ok := strings.CutPrefix(trimmed, "lib/modules/")
	if !ok {
		return "", "", false
	}
	release, rest, ok := strings.Cut(after, "/")
	if !ok || !validRelease(release) || rest == "" {
		return "", "", false
	}
	return name[:len(name)-len(rest)-1], rest, true
}

// validRelease reports whether s can be a kernel release: one path element.
func validRelease(s string) bool {
	return s != "" && s != "." && s != ".." && len(s) <= 128 && isPrintable(s) && !strings.ContainsAny(s, `/\`)
}

func validModulesDir(s string) bool {
	rel, ok := strings.CutPrefix(strings.TrimPrefix(s, "usr/"), "lib/modules/")
	return ok && validRelease(rel)
}

// parseBuiltin reads modules.builtin, a list of module paths, into names.
func parseBuiltin(b []byte) map[string]bool {
	m := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			m[moduleName(line)] = true
		}
	}
	return m
}

// readAllLimit reads r to the end, failing beyond limit bytes.
func readAllLimit(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%w: a member exceeds %d bytes", ErrCorruptDeb, limit)
	}
	return b, nil
}
