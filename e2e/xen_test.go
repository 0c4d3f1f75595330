package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/internal/xenbed"
)

// xenWorkload is the parent's workload on Xen: a ticket of one, a clone
// on the other host that reports the parent's state and its identity,
// and the parent's join.
const xenWorkload = `X=$(head -c 100000 /dev/urandom | sha256sum | cut -c1-16)
echo "PARENT-STATE $X"
T=$(sfguest ticket 1 2>&1 | sed 's/^ticket \([0-9]*\):.*/\1/')
echo "TICKET $T"
K=$(sfguest clone $T 2>&1) || { echo "CLONE-FAILED $K"; sleep 2; exit 1; }
if [ "$K" = 0 ]; then sfguest join $T; echo PARENT-DONE; else sfguest exit --status 7 --result "state=$X $(sfguest id)"; fi`

// TestXenClone is SnowFlock on real Xen: two Xen 4.17 hosts nested in QEMU
// TCG (internal/xenbed), a coordinator in the first dom0 and sfhostd with
// the Xen driver in both. A PVH guest takes a ticket and clones; its host
// captures it with xl save -c, the clone's host fetches the pages (by
// multicast on the hosts' network, else from the memserver), rebuilds the
// image and restores it with xl; the clone answers its clone call with 1
// over xenstore, reports the parent's state and its identity, and exits;
// the parent joins.
func TestXenClone(t *testing.T) {
	if testing.Short() {
		t.Skip("boots Xen under QEMU TCG; not with -short")
	}
	if err := xenbed.Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %v", err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	log := hclog.New(&hclog.LoggerOptions{Name: "xen", Level: hclog.Info, Output: os.Stderr})
	im, err := image.Build(ctx, image.Options{SFGuest: filepath.Join(binDir, "sfguest"), Logger: log.Named("image")})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	bed, err := xenbed.Start(ctx, xenbed.Options{Hosts: 2, Logger: log, Files: map[string]string{
		"/opt/sf/sfcoord": filepath.Join(binDir, "sfcoord"),
		"/opt/sf/sfhostd": filepath.Join(binDir, "sfhostd"),
		"/opt/sf/sfguest": filepath.Join(binDir, "sfguest"),
		"/opt/sf/vmlinux": im.Kernel,
		"/opt/sf/initrd":  im.Initrd,
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer bed.Close()
	t.Logf("2 Xen hosts ready %v after start", time.Since(start).Round(time.Millisecond))
	h1 := bed.Hosts[0]
	coord := h1.IP() + ":7400"
	dump := func() {
		for i, h := range bed.Hosts {
			for _, f := range []string{"/var/log/sfcoord.log", "/var/log/sfhostd.log"} {
				out, _ := h.Run(context.Background(), "tail", "-c", "6000", f)
				t.Logf("host %d %s:\n%s", i+1, f, out)
			}
			out, _ := h.Run(context.Background(), "sh", "-c", "for f in /var/log/xen/console/guest-*.log; do echo == $f; tail -c 3000 $f; done")
			t.Logf("host %d guest consoles:\n%s", i+1, out)
		}
	}
	background := func(h *xenbed.Host, logFile string, argv ...string) {
		t.Helper()
		cmd := fmt.Sprintf("setsid %s </dev/null >%s 2>&1 &", strings.Join(argv, " "), logFile)
		if _, err := h.Run(ctx, "sh", "-c", cmd); err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
	}
	background(h1, "/var/log/sfcoord.log", "/opt/sf/sfcoord", "agent", "--node-id", "c1", "--data-dir", "/var/lib/sfcoord",
		"--raft-addr", h1.IP()+":7300", "--http-addr", coord, "--gossip-addr", h1.IP()+":7946", "--bootstrap-expect", "1", "--gossip-profile", "lan")
	for i, h := range bed.Hosts {
		background(h, "/var/log/sfhostd.log", "/opt/sf/sfhostd", "agent", "--hypervisor", "xen",
			"--node-id", fmt.Sprintf("x%d", i+1), "--data-dir", "/var/lib/sfhostd",
			"--api-addr", h.IP()+":7500", "--gossip-addr", h.IP()+":7947", "--memserver-addr", h.IP()+":7501",
			"--mcast-addr", h.IP(), "--join", h1.IP()+":7946", "--coordinator", coord,
			"--kernel", "/opt/sf/vmlinux", "--initrd", "/opt/sf/initrd", "--slots", fmt.Sprint(2*i), "--mem", "512", "--gossip-profile", "lan", "--log-level", "debug")
	}
	sfcoord := func(args ...string) (string, error) {
		return h1.Run(ctx, append([]string{"/opt/sf/sfcoord"}, append(args, "--addr", coord)...)...)
	}
	waitFor := func(limit time.Duration, what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(limit)
		for !cond() {
			if time.Now().After(deadline) {
				dump()
				t.Fatalf("timed out after %v waiting for %s", limit, what)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	waitFor(2*time.Minute, "both hosts registered", func() bool {
		out, err := sfcoord("hosts", "-json")
		var hs []fsm.Host
		return err == nil && json.Unmarshal([]byte(out), &hs) == nil && len(hs) == 2
	})
	out, err := sfcoord("vm", "run", "-json", "--host", "x1", "--mem", "128M", "--cmd", xenWorkload)
	if err != nil {
		dump()
		t.Fatalf("vm run: %v %s", err, out)
	}
	var vm fsm.VM
	if err := json.Unmarshal([]byte(out), &vm); err != nil {
		t.Fatalf("vm run said %q: %v", out, err)
	}
	launched := time.Now()
	var tv fsm.TicketView
	waitFor(6*time.Minute, "the parent's ticket joined", func() bool {
		if out, err := sfcoord("vm", "list", "-json"); err == nil {
			var vs []fsm.VM
			_ = json.Unmarshal([]byte(out), &vs)
			for _, v := range vs {
				if v.ID == vm.ID && v.State == fsm.VMEnded {
					dump()
					t.Fatalf("the parent ended before its ticket was joined: %s", v.Reason)
				}
			}
		}
		out, err := sfcoord("tickets", "-json")
		var ts []fsm.Ticket
		if err != nil || json.Unmarshal([]byte(out), &ts) != nil || len(ts) == 0 {
			return false
		}
		out, err = sfcoord("ticket", "show", fmt.Sprint(ts[0].ID), "-json")
		return err == nil && json.Unmarshal([]byte(out), &tv) == nil && tv.State == fsm.TicketJoined
	})
	t.Logf("ticket joined %v after vm run", time.Since(launched).Round(time.Millisecond))
	console, _ := h1.Run(ctx, "cat", fmt.Sprintf("/var/log/xen/console/guest-vm-%d.log", vm.ID))
	m := regexp.MustCompile(`PARENT-STATE ([0-9a-f]{16})`).FindStringSubmatch(console)
	if m == nil {
		dump()
		t.Fatalf("parent console:\n%s", console)
	}
	cl := tv.Clones[0]
	want := fmt.Sprintf("state=%s VM %d on %s: clone 1 of ticket %d (parent VM %d)", m[1], cl.VMID, cl.Host, tv.ID, vm.ID)
	if cl.State != fsm.CloneExited || cl.Status != 7 || strings.TrimSpace(cl.Result) != want || cl.Host != "x2" {
		dump()
		t.Fatalf("clone %+v\nwant result %q on x2", cl, want)
	}
	for i, h := range bed.Hosts {
		m, err := h.Run(ctx, "sh", "-c", "grep -E 'captured VM|descriptor ready|clone running|multicast' /var/log/sfhostd.log | tail -5")
		t.Logf("host %d: %v\n%s", i+1, err, m)
	}
}
