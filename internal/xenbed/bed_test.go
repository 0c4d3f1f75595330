package xenbed

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/internal/xenbed/agent"
)

// The tests below boot real Xen hosts under QEMU TCG. They share one
// two-host bed, started by the first test that needs it and closed by
// TestMain. They skip when the machine cannot run a bed (see Available),
// except under CI=true, where a missing prerequisite is a failure.

var shared struct {
	once      sync.Once
	bed       *Bed
	err       error
	startTime time.Duration
	guestDir  string
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.bed != nil {
		if err := shared.bed.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "closing the bed:", err)
			code = 1
		}
	}
	if shared.guestDir != "" {
		os.RemoveAll(shared.guestDir)
	}
	os.Exit(code)
}

func requireBed(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots Xen under QEMU TCG (minutes); not with -short")
	}
	if err := Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %v", err)
		}
		t.Skip(err)
	}
}

func testLogger(t *testing.T) hclog.Logger {
	level := hclog.Info
	if testing.Verbose() {
		level = hclog.Debug
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: level, Output: os.Stderr})
}

// sharedBed returns the tests' bed, starting it on first use. Its dom0s
// carry the guest of TestSaveRestore in /guest.
func sharedBed(t *testing.T) *Bed {
	t.Helper()
	requireBed(t)
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		log := testLogger(t)
		shared.guestDir, shared.err = os.MkdirTemp("", "xenbed-guest-")
		if shared.err != nil {
			return
		}
		var files map[string]string
		if files, shared.err = buildGuest(ctx, shared.guestDir, log); shared.err != nil {
			return
		}
		start := time.Now()
		shared.bed, shared.err = Start(ctx, Options{Hosts: 2, MemMB: 2048, Dom0MemMB: 1024, Files: files, Logger: log})
		shared.startTime = time.Since(start)
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range shared.bed.Hosts {
				t.Logf("host %d console ends:\n%s", h.Index+1, tail(h.Console(), 30))
			}
		}
	})
	return shared.bed
}

// guestInit is the test guest's /init: it brings up its bridged NIC and
// counts on its console (hvc0, logged by dom0's xenconsoled) once a second,
// so a guest that resumes after save and restore continues its count where
// it stopped, while a rebooted one would start again from 0.
const guestInit = `#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
for m in $(/bin/busybox cat /etc/modules); do /bin/busybox insmod $m; done
/bin/busybox ip link set eth0 up
/bin/busybox ip addr add ` + guestIP + `/24 dev eth0
i=0
while :; do
	echo "xenbed-guest tick $i"
	i=$((i + 1))
	/bin/busybox sleep 1
done
`

// guestIP is the test guest's address on the bed network.
const guestIP = "10.77.0.100"

const guestConfig = `name = "tick"
type = "pvh"
kernel = "/guest/vmlinux"
ramdisk = "/guest/initrd.cpio"
cmdline = "console=hvc0"
memory = 128
vcpus = 1
vif = ["mac=00:16:3e:77:00:64,bridge=xenbr0"]
`

// buildGuest makes the PVH guest's files: Debian's kernel (the one
// guest/image uses) and a busybox initramfs with the netfront driver,
// running guestInit.
func buildGuest(ctx context.Context, dir string, log hclog.Logger) (map[string]string, error) {
	kernel, err := image.FetchKernel(ctx, "", []string{"xen-netfront"}, log)
	if err != nil {
		return nil, err
	}
	busybox, _, err := image.FetchBusybox(ctx, "", log)
	if err != nil {
		return nil, err
	}
	initrd, err := image.WriteMinimalInitramfs(dir, kernel,
		image.ArchiveFile{Name: "/init", Mode: 0o755, Data: []byte(guestInit)},
		image.ArchiveFile{Name: "/bin/busybox", Mode: 0o755, Host: busybox})
	if err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, "tick.cfg")
	if err := os.WriteFile(cfg, []byte(guestConfig), 0o644); err != nil {
		return nil, err
	}
	return map[string]string{
		"/guest/vmlinux":     kernel.Vmlinux,
		"/guest/initrd.cpio": initrd,
		"/guest/tick.cfg":    cfg,
	}, nil
}

// TestXenBed boots two hosts, checks the toolstack on both and that their
// dom0s reach each other over the bed network.
func TestXenBed(t *testing.T) {
	bed := sharedBed(t)
	t.Logf("image built in %v (cached initramfs: %s); Start took %v", bed.Image.BuildTime, filepath.Base(bed.Image.Initrd), shared.startTime)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, h := range bed.Hosts {
		t.Logf("host %d: dom0 ready %v after QEMU started; agent %s", h.Index+1, h.BootTime.Round(time.Millisecond), h.AgentAddr())
		start := time.Now()
		info, err := h.Run(ctx, "xl", "info")
		if err != nil {
			t.Fatalf("host %d: %v", h.Index+1, err)
		}
		t.Logf("host %d: xl info took %v", h.Index+1, time.Since(start).Round(time.Millisecond))
		for _, want := range []string{"xen_major              : 4", "xen_minor              : 17", "hap"} {
			if !strings.Contains(info, want) {
				t.Errorf("host %d: xl info lacks %q:\n%s", h.Index+1, want, info)
			}
		}
		if out, err := h.Run(ctx, "xl", "list"); err != nil || !strings.Contains(out, "Domain-0") {
			t.Errorf("host %d: xl list: %v\n%s", h.Index+1, err, out)
		}
	}
	h1, h2 := bed.Hosts[0], bed.Hosts[1]
	start := time.Now()
	out, err := h1.Run(ctx, "ping", "-c", "3", "-W", "10", h2.IP())
	if err != nil {
		t.Fatalf("ping %s from host 1: %v\n%s", h2.IP(), err, out)
	}
	t.Logf("ping host 2 from host 1 (%v):\n%s", time.Since(start).Round(time.Millisecond), out)

	// restrict=on: dom0 reaches nothing through the control NIC, not even
	// the host's loopback, where host 2's agent port is listening.
	// slirp answers a restricted connection with a reset.
	port := h2.AgentAddr()[strings.LastIndexByte(h2.AgentAddr(), ':')+1:]
	res, err := h1.Exec(ctx, agent.Command{Argv: []string{"nc", "-w", "5", "10.0.2.2", port}})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "can't connect") {
		t.Errorf("host 1's dom0 connecting to the host's 127.0.0.1:%s through slirp: exit %d, %q; want refused", port, res.ExitCode, res.Stderr)
	}
}

var tickRE = regexp.MustCompile(`xenbed-guest tick ([0-9]+)`)

// lastTick returns the highest count in the guest's console log on h, or
// -1 if none yet, and the log itself.
func lastTick(ctx context.Context, h *Host) (int, string, error) {
	res, err := h.Exec(ctx, agent.Command{Argv: []string{"cat", "/var/log/xen/console/guest-tick.log"}, Timeout: 30 * time.Second})
	if err != nil {
		return -1, "", err
	}
	last := -1
	for _, m := range tickRE.FindAllStringSubmatch(string(res.Stdout), -1) {
		n, _ := strconv.Atoi(m[1])
		last = max(last, n)
	}
	return last, string(res.Stdout), nil
}

// waitTick waits until the guest's count on h passes after.
func waitTick(ctx context.Context, t *testing.T, h *Host, after int) int {
	t.Helper()
	for {
		n, log, err := lastTick(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		if n > after {
			return n
		}
		select {
		case <-ctx.Done():
			t.Fatalf("host %d: guest count did not pass %d: %v; console log:\n%s", h.Index+1, after, ctx.Err(), log)
		case <-time.After(time.Second):
		}
	}
}

// TestSaveRestore creates a PVH guest on host 1, saves it, moves the save
// file to host 2 through the agents and restores it there: the guest must
// continue its count, not reboot.
func TestSaveRestore(t *testing.T) {
	bed := sharedBed(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	h1, h2 := bed.Hosts[0], bed.Hosts[1]
	timed := func(h *Host, argv ...string) time.Duration {
		t.Helper()
		start := time.Now()
		out, err := h.Run(ctx, argv...)
		if err != nil {
			t.Fatalf("host %d: %v\n%s", h.Index+1, err, out)
		}
		return time.Since(start)
	}

	create := timed(h1, "xl", "create", "/guest/tick.cfg")
	firstTick := time.Now()
	before := waitTick(ctx, t, h1, 2)
	t.Logf("xl create: %v; count reached %d %v later", create.Round(time.Millisecond), before, time.Since(firstTick).Round(time.Millisecond))
	// The guest is bridged onto the bed network: host 2 reaches it.
	if out, err := h2.Run(ctx, "ping", "-c", "2", "-W", "10", guestIP); err != nil {
		t.Errorf("ping the guest on host 1 from host 2's dom0: %v\n%s", err, out)
	}

	save := timed(h1, "xl", "save", "tick", "/var/lib/xen/tick.save")
	before, _, err := lastTick(ctx, h1)
	if err != nil {
		t.Fatal(err)
	}
	sizeOut, err := h1.Run(ctx, "stat", "-c", "%s", "/var/lib/xen/tick.save")
	if err != nil {
		t.Fatal(err)
	}
	size, _ := strconv.ParseInt(strings.TrimSpace(sizeOut), 10, 64)
	if out, _ := h1.Run(ctx, "xl", "list"); strings.Contains(out, "tick") {
		t.Errorf("host 1 still lists the saved guest:\n%s", out)
	}

	local := filepath.Join(t.TempDir(), "tick.save")
	start := time.Now()
	if err := h1.Get(ctx, "/var/lib/xen/tick.save", local); err != nil {
		t.Fatal(err)
	}
	get := time.Since(start)
	start = time.Now()
	if err := h2.Put(ctx, local, "/var/lib/xen/tick.save"); err != nil {
		t.Fatal(err)
	}
	put := time.Since(start)
	h1.Run(ctx, "rm", "-f", "/var/lib/xen/tick.save")

	restore := timed(h2, "xl", "restore", "/var/lib/xen/tick.save")
	after := waitTick(ctx, t, h2, before)
	_, log, err := lastTick(ctx, h2)
	if err != nil {
		t.Fatal(err)
	}
	// Moved with its MAC, the guest announces itself from host 2's bridge.
	if out, err := h1.Run(ctx, "ping", "-c", "2", "-W", "10", guestIP); err != nil {
		t.Errorf("ping the guest, restored on host 2, from host 1's dom0: %v\n%s", err, out)
	}
	first, _ := strconv.Atoi(tickRE.FindStringSubmatch(log)[1])
	if strings.Contains(log, "Linux version") || first < before {
		t.Errorf("the guest rebooted on host 2 instead of resuming (count %d before save, %d first after); its console:\n%s", before, first, log)
	}
	t.Logf("xl save: %v (%d bytes, %.1f MiB); get %v, put %v; xl restore: %v; count %d on host 1 before save, %d first on host 2, %d now",
		save.Round(time.Millisecond), size, float64(size)/(1<<20), get.Round(time.Millisecond), put.Round(time.Millisecond),
		restore.Round(time.Millisecond), before, first, after)
	h2.Run(ctx, "xl", "destroy", "tick")
}
