package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDemo builds the binaries and runs the whole demo, as `make demo` does
// (real sfcoord and sfhostd processes, a VM under QEMU), checking its story.
func TestDemo(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-system-x86_64 is required in CI")
		}
		t.Skip("qemu-system-x86_64 not installed")
	}
	bin := t.TempDir()
	for _, c := range []string{"sfcoord", "sfhostd", "sfguest"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(bin, c), "../"+c)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", c, err, out)
		}
	}
	var out bytes.Buffer
	if code := Run([]string{bin}, &out); code != 0 {
		t.Fatalf("demo exited %d:\n%s", code, out.String())
	}
	t.Log(out.String())
	for _, want := range []string{"leader", "registered through raft", "VM 1 on host-", "ticket 1: 4 of 4 clones granted",
		"sfguest: ready", "powered off", "acknowledged", "ticket 2: 2 of 2 clones granted", "Demo finished"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
}
