package qemuctl

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// A clone's command line is its parent's but for the RAM backend (the
// frozen file, share=off), -incoming defer, and its own name, console and
// sockets.
func TestCloneArgs(t *testing.T) {
	bin := fakeBinary(t)
	parent, err := Config{ID: "p", Binary: bin, RunDir: "/run/sf/p", RAMDir: "/dev/shm/sf",
		Kernel: "/k/vmlinux", Append: "console=ttyS0", MemMB: 512, VCPUs: 2}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	clone := parent
	clone.ID, clone.RunDir = "c", "/run/sf/c"
	boot := parent.args(AccelTCG, CPUTCG, parent.bootMemory())
	got := clone.args(AccelTCG, CPUTCG, memory{path: "/dev/shm/sf/snap.ram", private: true, incoming: true})

	want := slices.Clone(boot)
	for i, a := range want {
		a = strings.ReplaceAll(a, "/run/sf/p/", "/run/sf/c/")
		a = strings.ReplaceAll(a, "mem-path=/dev/shm/sf/p.ram,share=on", "mem-path=/dev/shm/sf/snap.ram,share=off")
		if i > 0 && want[i-1] == "-name" {
			a = "c"
		}
		want[i] = a
	}
	want = append(want, "-incoming", "defer")
	if !slices.Equal(got, want) {
		t.Errorf("clone args:\n got %q\nwant %q", got, want)
	}
}

func TestMachineMismatch(t *testing.T) {
	base := Machine{QEMU: "7.2.22", Accel: AccelTCG, CPU: CPUTCG, MemMB: 256, VCPUs: 1, Kernel: true}
	tests := []struct {
		mutate func(*Machine)
		want   string // in the description; "" for a match
	}{
		{func(m *Machine) {}, ""},
		{func(m *Machine) { m.QEMU = "" }, ""}, // an unknown version matches
		{func(m *Machine) { m.QEMU = "8.2.0" }, "QEMU"},
		{func(m *Machine) { m.Accel = AccelKVM }, "kvm"},
		{func(m *Machine) { m.CPU = "max" }, "CPU"},
		{func(m *Machine) { m.MemMB = 512 }, "MemMB"},
		{func(m *Machine) { m.VCPUs = 2 }, "VCPUs"},
		{func(m *Machine) { m.Kernel = false }, "Kernel"},
		{func(m *Machine) { m.Extra = []string{"-device", "virtio-rng-pci"} }, "Extra"},
	}
	for i, tc := range tests {
		want := base
		tc.mutate(&want)
		d := base.mismatch(want)
		if tc.want == "" && d != "" || tc.want != "" && !strings.Contains(d, tc.want) {
			t.Errorf("#%d: got %q, want a description containing %q", i, d, tc.want)
		}
	}
}

// The copy through a buffer, used where copy_file_range is refused, makes
// the same file.
func TestCopyThrough(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	sparseFile(t, src, 3<<20, []int64{0, 5, 6, 600})
	s, _ := os.Open(src)
	defer s.Close()
	d, _ := os.Create(dst)
	d.Truncate(3 << 20)
	ext, err := dataExtents(s, 3<<20)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3000) // not a divisor of the page size
	for _, e := range ext {
		if err := copyThrough(s, d, e, buf); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	if fileSHA256(t, src) != fileSHA256(t, dst) {
		t.Error("copy differs")
	}
	// An extent past the end of the file is an error, not a short copy.
	if err := copyThrough(s, d, extent{3 << 20, PageSize}, buf); err == nil {
		t.Error("copying past the end succeeded")
	}
}
