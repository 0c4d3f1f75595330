package image

import (
	"bufio"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"path"
	"slices"
	"sort"
	"strings"
)

// depIndex maps each module's path, relative to /lib/modules/<release>
// ("kernel/drivers/net/virtio_net.ko"), to the paths of the modules it needs,
// in modules.dep order: all of them, transitively, the one to load last first.
//
// Debian's kernel packages carry no modules.dep (depmod writes it when the
// package is installed), so unpackKernel derives it from each module's
// .modinfo "depends=" field, which modpost computes from the same symbol
// references depmod resolves.
type depIndex map[string][]string

// moduleExts are the file endings of kernel modules, compressed or not.
var moduleExts = []string{".ko", ".ko.xz", ".ko.gz", ".ko.zst"}

// moduleName is the name modprobe knows a module file by: its base name
// without extension, with '-' read as '_'.
func moduleName(p string) string {
	base := path.Base(p)
	for _, ext := range moduleExts {
		if s, ok := strings.CutSuffix(base, ext); ok {
			base = s
			break
		}
	}
	return strings.ReplaceAll(base, "-", "_")
}

// validModulePath reports whether p is a clean relative module path with no
// way out of the module tree and nothing that would break modules.dep syntax.
func validModulePath(p string) bool {
	if p == "" || path.IsAbs(p) || path.Clean(p) != p || p == ".." || strings.HasPrefix(p, "../") {
		return false
	}
	for i := 0; i < len(p); i++ {
		if c := p[i]; c <= ' ' || c > '~' || c == ':' || c == '\\' {
			return false
		}
	}
	for _, ext := range moduleExts {
		if strings.HasSuffix(p, ext) && len(p) > len(ext) && moduleName(p) != "" {
			return true
		}
	}
	return false
}

// validModuleName reports whether s can be a module name in a depends= list.
func validModuleName(s string) bool {
	if s == "" || len(s) > 255 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// parseModulesDep reads depmod's modules.dep format: one
// "path: dep dep ..." line per module.
func parseModulesDep(r io.Reader) (depIndex, error) {
	idx := depIndex{}
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		mod, deps, ok := strings.Cut(line, ":")
		if !ok || !validModulePath(mod) {
			return nil, fmt.Errorf("modules.dep line %d: bad module %q", n, mod)
		}
		if _, dup := idx[mod]; dup {
			return nil, fmt.Errorf("modules.dep line %d: %s listed twice", n, mod)
		}
		list := []string{}
		for _, d := range strings.Fields(deps) {
			if !validModulePath(d) || d == mod {
				return nil, fmt.Errorf("modules.dep line %d: bad dependency %q of %s", n, d, mod)
			}
			list = append(list, d)
		}
		idx[mod] = list
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("modules.dep: %w", err)
	}
	return idx, nil
}

// write writes idx in modules.dep format, sorted by path.
func (idx depIndex) write(w io.Writer) error {
	paths := make([]string, 0, len(idx))
	for p := range idx {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	bw := bufio.NewWriter(w)
	for _, p := range paths {
		bw.WriteString(p)
		bw.WriteString(":")
		for _, d := range idx[p] {
			bw.WriteString(" ")
			bw.WriteString(d)
		}
		bw.WriteString("\n")
	}
	return bw.Flush()
}

// byName maps module names to paths; with two files of one name (never in a
// kernel package) the first path in sorted order wins.
func (idx depIndex) byName() map[string]string {
	m := make(map[string]string, len(idx))
	for p := range idx {
		n := moduleName(p)
		if old, ok := m[n]; !ok || p < old {
			m[n] = p
		}
	}
	return m
}

// loadOrder returns the modules named by want and everything they depend on,
// each after its dependencies, deterministically. Names of built-in modules
// are skipped and returned in builtinHit.
func (idx depIndex) loadOrder(want []string, builtin map[string]bool) (order, builtinHit []string, err error) {
	names := idx.byName()
	sorted := slices.Clone(want)
	for i, n := range sorted {
		sorted[i] = strings.ReplaceAll(n, "-", "_")
	}
	sort.Strings(sorted)
	var roots []string
	for _, n := range slices.Compact(sorted) {
		p, ok := names[n]
		switch {
		case ok:
			roots = append(roots, p)
		case builtin[n]:
			builtinHit = append(builtinHit, n)
		default:
			return nil, nil, fmt.Errorf("%w: %q", ErrModuleNotFound, n)
		}
	}
	order, err = idx.order(roots)
	return order, builtinHit, err
}

// order returns roots and their dependencies, each after what it needs: a
// depth-first post-order, so the result depends only on idx and roots.
func (idx depIndex) order(roots []string) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(p, from string) error
	visit = func(p, from string) error {
		switch state[p] {
		case done:
			return nil
		case visiting:
			return fmt.Errorf("image: module dependency cycle through %s", p)
		}
		deps, ok := idx[p]
		if !ok {
			return fmt.Errorf("%w: %s (needed by %s) is not in modules.dep", ErrModuleNotFound, p, from)
		}
		state[p] = visiting
		// modules.dep lists the module to load last first.
		for i := len(deps) - 1; i >= 0; i-- {
			if err := visit(deps[i], p); err != nil {
				return err
			}
		}
		state[p] = done
		order = append(order, p)
		return nil
	}
	for _, r := range roots {
		if err := visit(r, "request"); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// subset returns the index restricted to mods and their dependencies (which
// loadOrder has already included), for the initramfs's own modules.dep.
func (idx depIndex) subset(mods []string) depIndex {
	s := depIndex{}
	for _, m := range mods {
		s[m] = idx[m]
	}
	return s
}

// depIndexFromModinfo builds a modules.dep index from each module's direct
// dependencies by name (.modinfo depends=).
func depIndexFromModinfo(direct map[string][]string) (depIndex, error) {
	names := map[string]string{}
	for p := range direct {
		if n := moduleName(p); names[n] == "" || p < names[n] {
			names[n] = p
		}
	}
	// Resolve names to paths first, then expand each module to the
	// transitive list in modules.dep order. Expanding every module
	// separately is quadratic in the worst case, but dependency chains are
	// a few levels deep.
	directPaths := depIndex{}
	for p, deps := range direct {
		list := []string{}
		for _, d := range deps {
			dp, ok := names[strings.ReplaceAll(d, "-", "_")]
			if !ok {
				return nil, fmt.Errorf("%w: module %s depends on %q, which the package lacks", ErrCorruptDeb, p, d)
			}
			list = append(list, dp)
		}
		sort.Strings(list)
		directPaths[p] = slices.Compact(list)
	}
	idx := depIndex{}
	for p := range direct {
		order, err := directPaths.order([]string{p})
		if err != nil {
			return nil, err
		}
		// order ends with p itself; the rest are its dependencies in load
		// order, which modules.dep lists reversed.
		deps := order[:len(order)-1]
		slices.Reverse(deps)
		idx[p] = deps
	}
	return idx, nil
}

// parseModinfo returns the names a kernel module's .modinfo section lists in
// depends=.
func parseModinfo(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("not an ELF module: %w", err)
	}
	sec := f.Section(".modinfo")
	if sec == nil || sec.Type == elf.SHT_NOBITS {
		return nil, fmt.Errorf("no .modinfo section")
	}
	if sec.Size > 1<<20 {
		return nil, fmt.Errorf(".modinfo section of %d bytes", sec.Size)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf(".modinfo: %w", err)
	}
	return modinfoDepends(data)
}

// modinfoDepends parses the NUL-separated key=value strings of .modinfo.
func modinfoDepends(data []byte) ([]string, error) {
	var deps []string
	for _, kv := range bytes.Split(data, []byte{0}) {
		v, ok := bytes.CutPrefix(kv, []byte("depends="))
		if !ok {
			continue
		}
		for _, d := range strings.Split(string(v), ",") {
			if d == "" {
				continue
			}
			if !validModuleName(d) {
				return nil, fmt.Errorf("bad module name %q in depends=", d)
			}
			deps = append(deps, d)
		}
	}
	return deps, nil
}
