package xenbed

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
)

// ErrMissingLibrary reports a shared library that no dom0 package provides:
// dom0Packages lacks the package that ships it.
var ErrMissingLibrary = errors.New("xenbed: shared library not found in the dom0 packages")

// library is a shared object dom0 needs.
type library struct {
	soname   string
	hostPath string // the real file in an unpacked package
	dom0Path string // libDir/soname
}

// libSearchDirs are where the packages keep libraries, relative to their
// root. Everything found is installed flat in libDir.
var libSearchDirs = []string{
	"lib/x86_64-linux-gnu",
	"usr/lib/x86_64-linux-gnu",
	"usr/lib/xen-4.17/lib/x86_64-linux-gnu",
}

// resolveLibraries returns the transitive DT_NEEDED closure of programs
// (dom0 paths, found in roots) plus extra sonames, sorted by soname. The
// programs' interpreter must be among them, as glibc's libc needs it.
func resolveLibraries(roots, programs, extra []string) ([]library, error) {
	seen := map[string]library{}
	var queue []string // host paths of ELF files to scan
	need := func(soname, by string) error {
		if _, ok := seen[soname]; ok {
			return nil
		}
		host, err := findLibrary(roots, soname)
		if err != nil {
			return fmt.Errorf("%w: %s (needed by %s)", ErrMissingLibrary, soname, by)
		}
		seen[soname] = library{soname: soname, hostPath: host, dom0Path: libDir + "/" + soname}
		queue = append(queue, host)
		return nil
	}
	for _, p := range programs {
		host, err := findInRoots(roots, p)
		if err != nil {
			return nil, err
		}
		queue = append(queue, host)
	}
	for _, soname := range extra {
		if err := need(soname, "dlopen"); err != nil {
			return nil, err
		}
	}
	for len(queue) > 0 {
		host := queue[0]
		queue = queue[1:]
		needed, err := elfNeeded(host)
		if err != nil {
			return nil, err
		}
		for _, soname := range needed {
			if err := need(soname, filepath.Base(host)); err != nil {
				return nil, err
			}
		}
	}
	out := make([]library, 0, len(seen))
	for _, l := range seen {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].soname < out[j].soname })
	return out, nil
}

// elfNeeded returns the DT_NEEDED entries of an x86-64 ELF file.
func elfNeeded(host string) ([]string, error) {
	f, err := elf.Open(host)
	if err != nil {
		return nil, fmt.Errorf("xenbed: %s: %w", host, err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("xenbed: %s is not an x86-64 ELF file", host)
	}
	needed, err := f.ImportedLibraries()
	if err != nil {
		return nil, fmt.Errorf("xenbed: %s: %w", host, err)
	}
	return needed, nil
}

// interpreter returns the PT_INTERP path of an ELF program ("" if static).
func interpreter(host string) (string, error) {
	f, err := elf.Open(host)
	if err != nil {
		return "", fmt.Errorf("xenbed: %s: %w", host, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				return "", fmt.Errorf("xenbed: %s: interpreter: %w", host, err)
			}
			if n := len(b); n > 0 && b[n-1] == 0 {
				b = b[:n-1]
			}
			return string(b), nil
		}
	}
	return "", nil
}

// findLibrary returns the real file of soname in the first root that has
// it in one of libSearchDirs.
func findLibrary(roots []string, soname string) (string, error) {
	for _, root := range roots {
		for _, d := range libSearchDirs {
			if host, err := resolveInRoot(root, path.Join("/", d, soname)); err == nil {
				return host, nil
			}
		}
	}
	return "", fs.ErrNotExist
}

// findInRoots returns the real file of the dom0 path p in the first root
// that has it.
func findInRoots(roots []string, p string) (string, error) {
	for _, root := range roots {
		if host, err := resolveInRoot(root, p); err == nil {
			return host, nil
		}
	}
	return "", fmt.Errorf("%w: %s is in none of the dom0 packages", ErrMissingLibrary, p)
}

// resolveInRoot follows the symlinks of the absolute path p as if root were
// "/" (absolute targets stay in root) and returns the host path of the
// regular file it ends at.
func resolveInRoot(root, p string) (string, error) {
	for hops := 0; hops < 16; hops++ {
		// Resolve the directories first: a package may link a directory.
		dir, err := resolveDirInRoot(root, path.Dir(p), 0)
		if err != nil {
			return "", err
		}
		p = path.Join(dir, path.Base(p))
		host := filepath.Join(root, filepath.FromSlash(p))
		fi, err := os.Lstat(host)
		if err != nil {
			return "", err
		}
		switch {
		case fi.Mode().IsRegular():
			return host, nil
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(host)
			if err != nil {
				return "", err
			}
			if !path.IsAbs(target) {
				target = path.Join(path.Dir(p), target)
			}
			p = path.Clean(target)
		default:
			return "", fmt.Errorf("%s: not a regular file", host)
		}
	}
	return "", fmt.Errorf("%s: too many levels of symbolic links", p)
}

// resolveDirInRoot resolves the directory symlinks of the absolute path dir
// inside root.
func resolveDirInRoot(root, dir string, depth int) (string, error) {
	if dir == "/" {
		return dir, nil
	}
	if depth > 16 {
		return "", fmt.Errorf("%s: too many levels of symbolic links", dir)
	}
	parent, err := resolveDirInRoot(root, path.Dir(dir), depth+1)
	if err != nil {
		return "", err
	}
	d := path.Join(parent, path.Base(dir))
	fi, err := os.Lstat(filepath.Join(root, filepath.FromSlash(d)))
	if err != nil {
		return "", err
	}
	if fi.Mode()&fs.ModeSymlink == 0 {
		return d, nil
	}
	target, err := os.Readlink(filepath.Join(root, filepath.FromSlash(d)))
	if err != nil {
		return "", err
	}
	if !path.IsAbs(target) {
		target = path.Join(parent, target)
	}
	return resolveDirInRoot(root, path.Clean(target), depth+1)
}
