package image

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

const testModulesDep = `kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
`

func TestModuleName(t *testing.T) {
	tests := []struct{ path, want string }{
		{"kernel/drivers/net/virtio_net.ko", "virtio_net"},
		{"kernel/drivers/char/hw_random/virtio-rng.ko.xz", "virtio_rng"},
		{"x.ko.zst", "x"},
		{"kernel/a.ko.gz", "a"},
	}
	for i, tt := range tests {
		if got := moduleName(tt.path); got != tt.want {
			t.Errorf("#%d moduleName(%q) = %q, want %q", i, tt.path, got, tt.want)
		}
	}
}

func TestLoadOrder(t *testing.T) {
	idx, err := parseModulesDep(strings.NewReader(testModulesDep))
	if err != nil {
		t.Fatal(err)
	}
	builtin := map[string]bool{"virtio_anchor": true}
	tests := []struct {
		want    []string
		order   []string
		builtin []string
		err     error
	}{
		{[]string{"virtio_net"}, []string{
			"kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko", "kernel/net/core/failover.ko",
			"kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko"}, nil, nil},
		{[]string{"virtio-rng", "virtio_anchor", "virtio", "virtio"}, []string{
			"kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
			"kernel/drivers/char/hw_random/virtio-rng.ko.xz"}, []string{"virtio_anchor"}, nil},
		{[]string{"nope"}, nil, nil, ErrModuleNotFound},
		{nil, nil, nil, nil},
	}
	for i, tt := range tests {
		order, bi, err := idx.loadOrder(tt.want, builtin)
		if !errors.Is(err, tt.err) || !reflect.DeepEqual(order, tt.order) || !reflect.DeepEqual(bi, tt.builtin) {
			t.Errorf("#%d loadOrder(%q) = %q, %q, %v\nwant %q, %q, %v", i, tt.want, order, bi, err, tt.order, tt.builtin, tt.err)
		}
	}

	cyclic := depIndex{"a.ko": {"b.ko"}, "b.ko": {"a.ko"}}
	if _, _, err := cyclic.loadOrder([]string{"a"}, nil); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("cycle: err = %v", err)
	}
	dangling := depIndex{"a.ko": {"gone.ko"}}
	if _, _, err := dangling.loadOrder([]string{"a"}, nil); !errors.Is(err, ErrModuleNotFound) {
		t.Errorf("dangling: err = %v", err)
	}
}

func TestDepIndexFromModinfo(t *testing.T) {
	direct := map[string][]string{
		"kernel/drivers/net/virtio_net.ko":     {"net_failover", "virtio", "virtio_ring"},
		"kernel/drivers/net/net_failover.ko":   {"failover"},
		"kernel/net/core/failover.ko":          nil,
		"kernel/drivers/virtio/virtio.ko":      nil,
		"kernel/drivers/virtio/virtio_ring.ko": {},
		"kernel/drivers/char/virtio-rng.ko":    {"virtio-ring"},
	}
	idx, err := depIndexFromModinfo(direct)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	idx.write(&b)
	want := `kernel/drivers/char/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/net/core/failover.ko:
`
	// Dependencies are listed the one to load last first, as depmod does.
	if b.String() != want {
		t.Errorf("modules.dep:\n%s\nwant:\n%s", b.String(), want)
	}
	direct["kernel/x.ko"] = []string{"missing"}
	if _, err := depIndexFromModinfo(direct); !errors.Is(err, ErrCorruptDeb) {
		t.Errorf("missing dependency: err = %v", err)
	}
}

func TestParseModulesDepErrors(t *testing.T) {
	for i, in := range []string{
		"no colon here",
		"/abs/x.ko:",
		"../x.ko:",
		"kernel/x.txt:",
		"kernel/x.ko: ../../etc/passwd.ko",
		"kernel/x.ko: kernel/x.ko",
		"kernel/x.ko:\nkernel/x.ko:",
		"kernel/a b.ko:",
	} {
		if _, err := parseModulesDep(strings.NewReader(in)); err == nil {
			t.Errorf("#%d %q: no error", i, in)
		}
	}
}

func TestParseModinfo(t *testing.T) {
	ko := moduleELF("license=GPL\x00depends=net_failover,virtio,virtio_ring\x00name=virtio_net\x00")
	deps, err := parseModinfo(ko)
	if err != nil || !reflect.DeepEqual(deps, []string{"net_failover", "virtio", "virtio_ring"}) {
		t.Fatalf("parseModinfo = %q, %v", deps, err)
	}
	if deps, err := parseModinfo(moduleELF("depends=\x00name=virtio\x00")); err != nil || len(deps) != 0 {
		t.Errorf("no depends: %q, %v", deps, err)
	}
	for i, bad := range [][]byte{nil, []byte("not elf"), tinyELF(), moduleELF("depends=../evil\x00")} {
		if _, err := parseModinfo(bad); err == nil {
			t.Errorf("#%d: no error", i)
		}
	}
}

// FuzzModulesDep: parsing never panics, accepted paths are safe to use as
// file names, and writing then parsing again gives the same index.
func FuzzModulesDep(f *testing.F) {
	f.Add(testModulesDep)
	f.Add("a.ko:\n# comment\n\nb.ko.xz: a.ko\n")
	f.Add("x.ko: ../y.ko")
	f.Fuzz(func(t *testing.T, in string) {
		idx, err := parseModulesDep(strings.NewReader(in))
		if err != nil {
			return
		}
		for p, deps := range idx {
			for _, q := range append([]string{p}, deps...) {
				if !validModulePath(q) || strings.HasPrefix(q, "/") || strings.Contains("/"+q+"/", "/../") {
					t.Fatalf("accepted unsafe path %q", q)
				}
			}
		}
		var b bytes.Buffer
		if err := idx.write(&b); err != nil {
			t.Fatal(err)
		}
		again, err := parseModulesDep(&b)
		if err != nil || !reflect.DeepEqual(normalizeDep(again), normalizeDep(idx)) {
			t.Fatalf("round trip: %v\n%v\n%v", err, idx, again)
		}
		idx.loadOrder([]string{"a", "x", "virtio_net"}, nil)
	})
}

func normalizeDep(d depIndex) map[string]string {
	m := map[string]string{}
	for k, v := range d {
		m[k] = strings.Join(v, " ")
	}
	return m
}

// FuzzModinfo: any bytes either parse as a module with valid dependency
// names or fail, without panicking.
func FuzzModinfo(f *testing.F) {
	f.Add(moduleELF("depends=net_failover,virtio\x00name=virtio_net\x00"))
	f.Add(moduleELF(""))
	f.Add(tinyELF())
	f.Add([]byte("depends=a,b"))
	f.Fuzz(func(t *testing.T, ko []byte) {
		deps, err := parseModinfo(ko)
		if err != nil {
			return
		}
		for _, d := range deps {
			if !validModuleName(d) {
				t.Fatalf("accepted bad name %q", d)
			}
		}
		modinfoDepends(ko)
	})
}
