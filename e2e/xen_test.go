package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/internal/xenbed"
	"github.com/snowflock-go/snowflock/internal/xencluster"
)

// xenWorkload is the parent's workload on Xen: a ticket of one, a clone
// on the other host that reports the parent's state and its identity,
// and the parent's join.
const xenWorkload = `X=$(head -c 100000 /dev/urandom | sha256sum | cut -c1-16)
echo "PARENT-STATE $X"
T=$(sfguest ticket 1 2>&1 | sed 's/^ticket \([0-9]*\):.*/\1/')
K=$(sfguest clone $T 2>&1) || { echo "CLONE-FAILED $K"; sleep 2; exit 1; }
if [ "$K" = 0 ]; then sfguest join $T; echo PARENT-DONE; else sfguest exit --status 7 --result "state=$X $(sfguest id)"; fi`

// TestXenClone is SnowFlock on real Xen: two Xen 4.17 hosts nested in QEMU
// TCG (internal/xenbed), a coordinator in the first dom0 and sfhostd with
// the Xen driver in both (clone slots only on the second). A PVH guest
// takes a ticket and clones; its host captures it with xl save -c, the
// clone's host gets the descriptor by multicast and the pages from the
// memserver and by multicast, rebuilds the image and restores it with xl;
// the clone answers its clone call with 1 over xenstore, reports the
// parent's state and its identity, and exits; the parent joins. It runs
// once with PVH guests and once with PV guests (--xen-guest-type), each on
// a bed of its own.
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
	for _, typ := range []string{"pvh", "pv"} {
		t.Run(typ, func(t *testing.T) { xenClone(t, typ) })
	}
}

func xenClone(t *testing.T, typ string) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	log := hclog.New(&hclog.LoggerOptions{Name: "xen", Level: hclog.Info, Output: os.Stderr})
	im, err := image.Build(ctx, image.Options{SFGuest: filepath.Join(binDir, "sfguest"), Logger: log.Named("image")})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	bed, err := xenbed.Start(ctx, xenbed.Options{Hosts: 2, Logger: log, Files: xencluster.Files(binDir, im)})
	if err != nil {
		t.Fatal(err)
	}
	defer bed.Close()
	t.Logf("2 Xen hosts ready %v after start", time.Since(start).Round(time.Millisecond))
	c, err := xencluster.Start(ctx, bed, xencluster.Options{Slots: []int{0, 2}, Debug: true, GuestType: typ})
	if err != nil {
		t.Fatalf("%v\n%s", err, xencluster.Logs(ctx, bed))
	}
	vm, err := c.RunVM(ctx, 0, 128, xenWorkload)
	if err != nil {
		t.Fatal(err)
	}
	launched := time.Now()
	if vm, err = c.WaitEnded(ctx, vm.ID, 6*time.Minute); err != nil {
		t.Fatalf("%v\n%s", err, c.Logs(ctx))
	}
	t.Logf("parent ended %v after vm run: %s", time.Since(launched).Round(time.Millisecond), vm.Reason)
	console := c.Console(ctx, 0, vm.ID)
	m := regexp.MustCompile(`PARENT-STATE ([0-9a-f]{16})`).FindStringSubmatch(console)
	ts, err := c.Tickets(ctx)
	if m == nil || err != nil || len(ts) != 1 || ts[0].State != fsm.TicketJoined || !strings.Contains(console, "PARENT-DONE") {
		t.Fatalf("tickets %+v (%v); parent console:\n%s\n%s", ts, err, console, c.Logs(ctx))
	}
	tv := ts[0]
	cl := tv.Clones[0]
	want := fmt.Sprintf("state=%s VM %d on %s: clone 1 of ticket %d (parent VM %d)", m[1], cl.VMID, cl.Host, tv.ID, vm.ID)
	if cl.State != fsm.CloneExited || cl.Status != 7 || strings.TrimSpace(cl.Result) != want || cl.Host != "x2" {
		t.Fatalf("clone %+v\nwant result %q on x2\n%s", cl, want, c.Logs(ctx))
	}
	// Both domains were of the type asked for: xenctl logs it.
	made := map[int]string{0: "created", 1: "restored"}
	for i := range bed.Hosts {
		out, _ := c.HostLog(ctx, i)
		if !regexp.MustCompile(`(?m)` + made[i] + `: .*\btype=` + typ + `( |$)`).MatchString(out) {
			t.Errorf("host %d's log has no %q of a %s domain; its lines with type=:\n%s", i+1, made[i], typ,
				strings.Join(slices.DeleteFunc(strings.Split(out, "\n"), func(l string) bool { return !strings.Contains(l, "type=") }), "\n"))
		}
		for _, l := range strings.Split(out, "\n") {
			if regexp.MustCompile(`captured VM|descriptor ready|fetched eagerly|clone running|descriptor multicast|multicast session done`).MatchString(l) {
				t.Logf("host %d: %s", i+1, l)
			}
		}
	}
}
