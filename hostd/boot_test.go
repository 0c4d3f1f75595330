package hostd

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/coordinator"
	"github.com/snowflock-go/snowflock/fsm"
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
	requireQEMU(t)
	im := guestImage(t)
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: os.Stderr})

	s, err := coordinator.New(coordinator.Config{NodeID: "c1", DataDir: t.TempDir(), RaftAddr: "127.0.0.1:0",
		HTTPAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", Bootstrap: true, Logger: log.Named("coord")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })

	ctx := context.Background()
	dataDir := t.TempDir()
	hv, err := NewQEMU(ctx, filepath.Join(dataDir, "vms"), "", "", log.Named("qemu"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{NodeID: "h1", DataDir: dataDir, GossipAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
		Join: []string{s.GossipAddr()}, Coordinators: []string{s.HTTPAddr()}, Slots: 8, MemMB: 2048,
		Kernel: im.Kernel, Initrd: im.Initrd, Logger: log.Named("hostd")}, hv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Shutdown(context.Background()) })

	c, _ := api.NewClient(api.Config{Addrs: []string{s.HTTPAddr()}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if h, _, err := c.Hosts(ctx, nil); err == nil && len(h) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("host not registered")
		}
		time.Sleep(10 * time.Millisecond)
	}

	start := time.Now()
	vm, err := c.CreateVM(ctx, api.VMRequest{Name: "demo", MemMB: 256, VCPUs: 1, Launch: true,
		Cmd: "sfguest id && sfguest ticket 4 && sfguest tickets && echo WORKLOAD-DONE"})
	if err != nil {
		t.Fatal(err)
	}
	if vm.Host != "h1" || vm.State != fsm.VMPending {
		t.Fatalf("scheduled vm: %+v", vm)
	}
	var index uint64
	var final fsm.VM
	for {
		v, meta, err := c.VM(ctx, vm.ID, &api.QueryOptions{Index: index, Wait: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		index = meta.Index
		if v.State == fsm.VMEnded {
			final = v
			break
		}
		if time.Since(start) > 3*time.Minute {
			t.Fatalf("vm still %s after %s", v.State, time.Since(start))
		}
	}
	t.Logf("VM ran its workload and powered off %s after vm run (%s)", time.Since(start).Round(time.Millisecond), final.Reason)

	console, err := os.ReadFile(filepath.Join(dataDir, "vms", "vm-1", "console.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("console:\n%s", console)
	for _, want := range []string{"sfguest: ready", "VM 1 on h1: parent", "ticket 1: 4 of 4 clones granted", "WORKLOAD-DONE",
		"workload exited with status 0"} {
		if !strings.Contains(string(console), want) {
			t.Errorf("console lacks %q:\n%s", want, console)
		}
	}
	ts, _, err := c.Tickets(ctx, vm.ID, nil)
	if err != nil || len(ts) != 1 || ts[0].Granted != 4 {
		t.Fatalf("tickets of the vm: %+v %v", ts, err)
	}
	if final.Reason != "the guest powered off" {
		t.Errorf("end reason %q", final.Reason)
	}
}
