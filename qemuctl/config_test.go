package qemuctl

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fakeBinary makes an executable to satisfy the PATH lookup of tests that
// never start QEMU.
func fakeBinary(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-fake")
	if err := os.WriteFile(p, []byte("#!/bin/sh\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigValidation(t *testing.T) {
	bin := fakeBinary(t)
	ok := Config{ID: "vm-1", Binary: bin, RunDir: "/run/sf/vm-1"}
	tests := []struct {
		mutate  func(*Config)
		wantErr string
	}{
		{func(c *Config) {}, ""},
		{func(c *Config) { c.ID = "" }, "invalid VM ID"},
		{func(c *Config) { c.ID = ".hidden" }, "invalid VM ID"},
		{func(c *Config) { c.ID = "a/b" }, "invalid VM ID"},
		{func(c *Config) { c.ID = strings.Repeat("x", 65) }, "invalid VM ID"},
		{func(c *Config) { c.ID = strings.Repeat("x", 64) }, ""},
		{func(c *Config) { c.RunDir = "" }, "RunDir is required"},
		{func(c *Config) { c.Append = "console=ttyS0" }, "need a Kernel"},
		{func(c *Config) { c.Initrd = "/i.cpio" }, "need a Kernel"},
		{func(c *Config) { c.MemMB = -1 }, "negative"},
		{func(c *Config) { c.Accel = "hvf" }, "unknown accelerator"},
		{func(c *Config) { c.Binary = "/nonexistent/qemu" }, "no such file"},
		{func(c *Config) { c.RunDir = "/run/a,b" }, "contains a comma"},
		{func(c *Config) { c.Kernel = "/boot/vmlinuz,x" }, "contains a comma"},
	}
	for i, tc := range tests {
		c := ok
		tc.mutate(&c)
		_, err := c.withDefaults()
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("#%d: got %v, want error containing %q", i, err, tc.wantErr)
		}
	}

	c, err := Config{ID: "v", Binary: bin, RunDir: "rel/dir"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if !filepath.IsAbs(c.RunDir) || c.RAMDir != DefaultRAMDir || c.MemMB != DefaultMemMB ||
		c.VCPUs != DefaultVCPUs || c.Logger == nil || c.RAMFile() != DefaultRAMDir+"/v.ram" {
		t.Errorf("defaults not applied: %+v", c)
	}
}

func TestConfigArgs(t *testing.T) {
	c, err := Config{
		ID: "vm7", Binary: fakeBinary(t), RunDir: "/run/sf/vm7", RAMDir: "/dev/shm/sf",
		Kernel: "/k/vmlinux", Initrd: "/k/init.cpio", Append: "console=ttyS0 quiet",
		MemMB: 512, VCPUs: 2, Extra: []string{"-S"},
	}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	got := c.args(AccelTCG, CPUTCG, c.bootMemory())
	want := []string{
		"-name", "vm7",
		"-machine", "pc,memory-backend=mem,suppress-vmdesc=on",
		"-accel", "tcg",
		"-cpu", "qemu64",
		"-smp", "2",
		"-m", "512M",
		"-object", "memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/sf/vm7.ram,share=on",
		"-nodefaults", "-no-user-config", "-nographic", "-display", "none",
		"-no-reboot",
		"-msg", "timestamp=on",
		"-chardev", "file,id=con,path=/run/sf/vm7/console.log",
		"-serial", "chardev:con",
		"-chardev", "socket,id=sfchan,path=/run/sf/vm7/guest.sock,server=on,wait=off",
		"-serial", "chardev:sfchan",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-kernel", "/k/vmlinux",
		"-initrd", "/k/init.cpio",
		"-append", "console=ttyS0 quiet",
		"-S",
	}
	if !slices.Equal(got, want) {
		t.Errorf("args:\n got %q\nwant %q", got, want)
	}
	// No kernel: no -kernel, -initrd or -append.
	c.Kernel, c.Initrd, c.Append = "", "", ""
	for _, a := range c.args(AccelKVM, CPUHost, c.bootMemory()) {
		if a == "-kernel" || a == "-initrd" || a == "-append" {
			t.Errorf("args without a kernel contain %s", a)
		}
	}
}
