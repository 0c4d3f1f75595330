package image

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// ModulesListPath is where the initramfs lists its kernel modules, one
// absolute path a line in load order, for sfguest to insmod.
const ModulesListPath = "/etc/sfguest/modules"

// initramfsSpec is everything an initramfs is made of.
type initramfsSpec struct {
	sfguest    string // host path of /init
	busybox    string // host path of /bin/busybox
	release    string // kernel release; names /lib/modules/<release>
	modules    []moduleFile
	modulesDep []byte // modules.dep for the included modules
	extra      map[string]string
}

// extraFile is a validated Options.ExtraFiles entry.
type extraFile struct {
	name string // archive name, "work/run.sh"
	host string
}

// reservedTop are the top-level directories the guest mounts file systems
// on; files put there would be hidden.
var reservedTop = map[string]bool{"proc": true, "sys": true, "dev": true}

// guestExtraPaths validates ExtraFiles: clean absolute guest paths outside
// the mount points, existing regular host files. It returns them sorted.
func guestExtraPaths(extra map[string]string) ([]extraFile, error) {
	var out []extraFile
	for guest, host := range extra {
		name, err := guestName(guest)
		if err != nil {
			return nil, err
		}
		if err := regularFile(host, "ExtraFiles["+guest+"]"); err != nil {
			return nil, err
		}
		out = append(out, extraFile{name: name, host: host})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out, nil
}

// guestName turns a guest path ("/work/run.sh") into an archive name
// ("work/run.sh"), refusing anything that is not a plain absolute path.
func guestName(guest string) (string, error) {
	switch {
	case !strings.HasPrefix(guest, "/"):
		return "", fmt.Errorf("%w: %q is not absolute", ErrBadPath, guest)
	case strings.Contains("/"+guest+"/", "/../") || strings.Contains("/"+guest+"/", "/./"):
		return "", fmt.Errorf("%w: %q has . or .. elements", ErrBadPath, guest)
	case path.Clean(guest) != guest || guest == "/":
		return "", fmt.Errorf("%w: %q is not a clean file path", ErrBadPath, guest)
	}
	for i := 0; i < len(guest); i++ {
		if guest[i] < 0x20 || guest[i] == 0x7f {
			return "", fmt.Errorf("%w: %q contains control characters", ErrBadPath, guest)
		}
	}
	name := guest[1:]
	top, _, _ := strings.Cut(name, "/")
	if reservedTop[top] {
		return "", fmt.Errorf("%w: %q is under /%s, where the guest mounts a file system", ErrBadPath, guest, top)
	}
	if err := validCpioName(name); err != nil {
		return "", fmt.Errorf("%w: %q: %v", ErrBadPath, guest, err)
	}
	return name, nil
}

// entries lists the archive's entries, sorted by name, each directory before
// what it contains.
func (s initramfsSpec) entries() ([]cpioEntry, error) {
	set := map[string]cpioEntry{}
	add := func(e cpioEntry) error {
		if old, ok := set[e.Name]; ok {
			if old.Mode&modeTypeMask == modeDir && e.Mode&modeTypeMask == modeDir {
				return nil
			}
			return fmt.Errorf("%w: /%s is provided by the image", ErrBadPath, e.Name)
		}
		set[e.Name] = e
		return nil
	}
	dir := func(name string, perm uint32) cpioEntry { return cpioEntry{Name: name, Mode: modeDir | perm} }
	symlink := func(name, target string) cpioEntry {
		return cpioEntry{Name: name, Mode: modeSymlink | 0o777, Data: []byte(target)}
	}
	var fixed []cpioEntry
	for _, d := range []string{"bin", "dev", "etc", "etc/sfguest", "lib", "mnt", "proc", "root", "run", "sys", "usr"} {
		fixed = append(fixed, dir(d, 0o755))
	}
	fixed = append(fixed,
		dir("tmp", 0o1777),
		symlink("sbin", "bin"),
		symlink("usr/bin", "../bin"),
		symlink("usr/sbin", "../bin"),
		cpioEntry{Name: "dev/console", Mode: modeCharDev | 0o600, RdevMajor: 5, RdevMinor: 1},
		cpioEntry{Name: "dev/null", Mode: modeCharDev | 0o666, RdevMajor: 1, RdevMinor: 3},
	)
	init, err := hostFile("init", s.sfguest, 0o755)
	if err != nil {
		return nil, err
	}
	bb, err := hostFile("bin/busybox", s.busybox, 0o755)
	if err != nil {
		return nil, err
	}
	fixed = append(fixed, init, bb)
	for _, a := range busyboxApplets {
		fixed = append(fixed, symlink("bin/"+a, "busybox"))
	}
	var list strings.Builder
	for _, m := range s.modules {
		f, err := hostFile(strings.TrimPrefix(m.guestPath, "/"), m.hostPath, 0o644)
		if err != nil {
			return nil, err
		}
		fixed = append(fixed, f)
		list.WriteString(m.guestPath + "\n")
	}
	if s.release != "" && len(s.modules) > 0 {
		fixed = append(fixed, cpioEntry{Name: "lib/modules/" + s.release + "/modules.dep", Mode: modeRegular | 0o644, Data: s.modulesDep})
	}
	fixed = append(fixed, cpioEntry{Name: strings.TrimPrefix(ModulesListPath, "/"), Mode: modeRegular | 0o644, Data: []byte(list.String())})
	for _, e := range fixed {
		if err := add(e); err != nil {
			return nil, fmt.Errorf("image: internal: %w", err)
		}
	}

	extras, err := guestExtraPaths(s.extra)
	if err != nil {
		return nil, err
	}
	for _, x := range extras {
		fi, err := os.Stat(x.host)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMissingFile, err)
		}
		perm := uint32(0o644)
		if fi.Mode()&0o111 != 0 {
			perm = 0o755
		}
		f, err := hostFile(x.name, x.host, perm)
		if err != nil {
			return nil, err
		}
		if err := add(f); err != nil {
			return nil, err
		}
	}

	// Parent directories, and no entry below a non-directory.
	names := make([]string, 0, len(set))
	for name := range set {
		names = append(names, name)
	}
	for _, name := range names {
		for p := path.Dir(name); p != "."; p = path.Dir(p) {
			if e, ok := set[p]; ok {
				if e.Mode&modeTypeMask != modeDir {
					return nil, fmt.Errorf("%w: /%s is inside /%s, which is not a directory", ErrBadPath, name, p)
				}
				continue
			}
			set[p] = dir(p, 0o755)
		}
	}
	out := make([]cpioEntry, 0, len(set))
	for _, e := range set {
		out = append(out, e)
	}
	// A parent's name is a prefix of its children's, so it sorts first.
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// hostFile is a regular file entry read from the host at write time.
func hostFile(name, host string, perm uint32) (cpioEntry, error) {
	fi, err := os.Stat(host)
	if err != nil {
		return cpioEntry{}, fmt.Errorf("%w: /%s from %q: %v", ErrMissingFile, name, host, err)
	}
	if !fi.Mode().IsRegular() {
		return cpioEntry{}, fmt.Errorf("%w: /%s from %q: not a regular file", ErrMissingFile, name, host)
	}
	return cpioEntry{
		Name: name, Mode: modeRegular | perm, Size: fi.Size(),
		Open: func() (io.ReadCloser, error) { return os.Open(host) },
	}, nil
}

// writeArchive writes the entries as a newc archive.
func writeArchive(w io.Writer, entries []cpioEntry) error {
	cw := newNewcWriter(w)
	for _, e := range entries {
		if err := cw.WriteEntry(e); err != nil {
			return err
		}
	}
	return cw.Close()
}

// buildInitramfs returns the path of the archive of spec in dir, named by
// the sha256 of its uncompressed bytes, writing it unless the cache has it.
func buildInitramfs(spec initramfsSpec, dir string, gz, rebuild bool) (file, hash string, cached bool, err error) {
	entries, err := spec.entries()
	if err != nil {
		return "", "", false, err
	}
	return writeCachedArchive(entries, dir, gz, rebuild)
}

// writeCachedArchive returns the path of the archive of entries in dir,
// named by the sha256 of its uncompressed bytes, writing it unless the cache
// has it.
func writeCachedArchive(entries []cpioEntry, dir string, gz, rebuild bool) (file, hash string, cached bool, err error) {
	// Hashing reads the inputs (a few MB) once more than writing would, but
	// makes a cache hit cost no writes.
	h := sha256.New()
	if err := writeArchive(h, entries); err != nil {
		return "", "", false, err
	}
	hash = hex.EncodeToString(h.Sum(nil))
	file = filepath.Join(dir, hash+".cpio")
	if gz {
		file += ".gz"
	}
	if !rebuild {
		if got, err := initramfsHash(file); err == nil && got == hash {
			return file, hash, true, nil
		}
	}
	err = writeFileAtomic(file, 0o644, func(w io.Writer) error {
		h := sha256.New()
		out := w
		var zw *gzip.Writer
		if gz {
			zw = gzip.NewWriter(w) // no name or mtime in the header: reproducible
			out = zw
		}
		if err := writeArchive(io.MultiWriter(h, out), entries); err != nil {
			return err
		}
		if zw != nil {
			if err := zw.Close(); err != nil {
				return err
			}
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != hash {
			return fmt.Errorf("image: initramfs inputs changed while building (hash %s, then %s)", hash, got)
		}
		return nil
	})
	if err != nil {
		return "", "", false, fmt.Errorf("image: writing initramfs: %w", err)
	}
	return file, hash, false, nil
}

// initramfsHash is the sha256 of an initramfs file's uncompressed bytes.
func initramfsHash(file string) (string, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", err
	}
	defer f.Close()
	var r io.Reader = f
	if strings.HasSuffix(file, ".gz") {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return "", err
		}
		r = zr
	}
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
