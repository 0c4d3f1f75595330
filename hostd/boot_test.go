package hostd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/guest/image"
)

// requireQEMU skips without QEMU outside CI and fails without it in CI.
func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-system-x86_64 is required in CI (.ci/run installs qemu-system-x86)")
		}
		t.Skip("qemu-system-x86_64 not installed; skipping (apt-get install qemu-system-x86)")
	}
}

// guestImage builds sfguest and the real guest image (Debian kernel and an
// initramfs), cached across runs in the default image cache.
func guestImage(t *testing.T) *image.Image {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "sfguest")
	build := exec.Command("go", "build", "-o", bin, "../cmd/sfguest")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build sfguest: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	im, err := image.Build(ctx, image.Options{SFGuest: bin})
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	return im
}

// TestBootVMAndCallAPI runs a real VM under QEMU from the real guest image,
// through the real host daemon, against a real coordinator: the workload
// inside the VM requests a ticket and lists tickets through the serial
// channel, then powers off, and the cluster sees it all.
func TestBootVMAndCallAPI(t *testing.T) {
	b := newBed(t, 1)
	start := time.Now()
	final, console := b.runVM("sfguest id && sfguest ticket 4 && sfguest tickets && echo WORKLOAD-DONE", 256, 3*time.Minute)
	t.Logf("VM ran its workload and powered off %s after vm run (%s)", time.Since(start).Round(time.Millisecond), final.Reason)
	t.Logf("console:\n%s", console)
	for _, want := range []string{"sfguest: ready", fmt.Sprintf("VM %d on h1: parent", final.ID), "4 of 4 clones granted", "WORKLOAD-DONE",
		"workload exited with status 0"} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q:\n%s", want, console)
		}
	}
	ts, _, err := b.c.Tickets(context.Background(), final.ID, nil)
	if err != nil || len(ts) != 1 || ts[0].Granted != 4 {
		t.Fatalf("tickets of the vm: %+v %v", ts, err)
	}
	if final.Reason != "the guest powered off" {
		t.Errorf("end reason %q", final.Reason)
	}
}
