package hostd

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/coordinator"
	"github.com/snowflock-go/snowflock/fsm"
)

// requireFUSE skips without root and /dev/fuse outside CI.
func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI runs as root with /dev/fuse")
		}
		t.Skip("needs root and /dev/fuse")
	}
}

// bed is a coordinator and host daemons in this process, with real QEMU.
// Tests that clone also need FUSE (requireFUSE).
type bed struct {
	t     *testing.T
	coord *coordinator.Server
	c     *api.Client
	hosts []*Daemon
	dirs  []string

	mu     sync.Mutex
	events []Event
}

// bedOption changes the configuration of host i (from 0).
type bedOption func(i int, cfg *Config)

// withoutMcast turns multicast off on host i.
func withoutMcast(host int) bedOption {
	return func(i int, cfg *Config) {
		if i == host {
			cfg.McastAddr = netip.Addr{}
		}
	}
}

// withEager has every host fetch a descriptor's memory before its clones
// start, as Xen hosts do, and gives host 0 no clone slots.
func withEager() bedOption {
	return func(i int, cfg *Config) {
		cfg.EagerRestore = true
		cfg.McastRate = -1 // no cap: loopback multicast keeps up with unicast
		if i == 0 {
			cfg.Slots = 0
		}
	}
}

// freeUDPPort returns a UDP port on loopback that nothing uses now.
func freeUDPPort(t *testing.T) uint16 {
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

// newBed starts a coordinator and hosts h1..hN. The hosts multicast on
// loopback (named explicitly, as ever), on a port of their own.
func newBed(t *testing.T, hosts int, opts ...bedOption) *bed {
	t.Helper()
	requireQEMU(t)
	im := guestImage(t)
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Warn, Output: os.Stderr})
	s, err := coordinator.New(coordinator.Config{NodeID: "c1", DataDir: t.TempDir(), RaftAddr: "127.0.0.1:0",
		HTTPAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", Bootstrap: true, Logger: log.Named("coord")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	b := &bed{t: t, coord: s}
	b.c, _ = api.NewClient(api.Config{Addrs: []string{s.HTTPAddr()}})
	port := freeUDPPort(t)
	for i := 1; i <= hosts; i++ {
		dir := t.TempDir()
		hv, err := NewQEMU(context.Background(), filepath.Join(dir, "vms"), "", "", log.Named("qemu"))
		if err != nil {
			t.Fatal(err)
		}
		cfg := Config{NodeID: fmt.Sprintf("h%d", i), DataDir: dir, GossipAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
			MemserverAddr: "127.0.0.1:0", Join: []string{s.GossipAddr()}, Coordinators: []string{s.HTTPAddr()},
			Slots: 4, MemMB: 4096, Kernel: im.Kernel, Initrd: im.Initrd, PageCacheDir: filepath.Join(hv.RAMDir, "pages"),
			McastAddr: netip.MustParseAddr("127.0.0.1"), McastPort: port,
			OnEvent: func(e Event) {
				b.mu.Lock()
				b.events = append(b.events, e)
				b.mu.Unlock()
			},
			Logger: log.Named(fmt.Sprintf("h%d", i))}
		for _, o := range opts {
			o(i-1, &cfg)
		}
		d, err := New(cfg, hv)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = d.Shutdown(context.Background()) })
		b.hosts = append(b.hosts, d)
		b.dirs = append(b.dirs, dir)
	}
	b.waitFor(10*time.Second, "hosts registered", func() bool {
		h, _, err := b.c.Hosts(context.Background(), nil)
		return err == nil && len(h) == hosts
	})
	return b
}

func (b *bed) waitFor(d time.Duration, what string, cond func() bool) {
	b.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			b.t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runVM launches a parent VM with a workload and waits for it to end.
func (b *bed) runVM(cmd string, memMB int64, limit time.Duration) (fsm.VM, string) {
	b.t.Helper()
	ctx := context.Background()
	vm, err := b.c.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: memMB, VCPUs: 1, Launch: true, Cmd: cmd})
	if err != nil {
		b.t.Fatal(err)
	}
	if vm.Host != "h1" || vm.State != fsm.VMPending {
		b.t.Fatalf("scheduled vm: %+v", vm)
	}
	start := time.Now()
	var index uint64
	for {
		v, meta, err := b.c.VM(ctx, vm.ID, &api.QueryOptions{Index: index, Wait: 5 * time.Second})
		if err != nil {
			b.t.Fatal(err)
		}
		index = meta.Index
		if v.State == fsm.VMEnded {
			vm = v
			break
		}
		if time.Since(start) > limit {
			b.t.Fatalf("vm still %s after %s; console:\n%s", v.State, time.Since(start), b.console(vm))
		}
	}
	return vm, b.console(vm)
}

func (b *bed) console(vm fsm.VM) string {
	for i, d := range b.hosts {
		if d.cfg.NodeID == vm.Host {
			out, _ := os.ReadFile(filepath.Join(b.dirs[i], "vms", vmName(vm.ID), "console.log"))
			return string(out)
		}
	}
	return ""
}

// cloneWorkload clones the VM with a ticket of n: each clone reports the
// state the parent had in memory before cloning, then exits with status k.
const cloneWorkload = `X=$(head -c 1000000 /dev/urandom | sha256sum | cut -c1-16)
echo "PARENT-STATE $X"
T=$(sfguest ticket %d | sed 's/^ticket \([0-9]*\):.*/\1/')
K=$(sfguest clone $T) || { echo CLONE-FAILED; exit 1; }
if [ "$K" = 0 ]; then
  sfguest join $T
  echo PARENT-DONE
else
  sfguest exit --status $K --result "k=$K state=$X $(sfguest id)"
fi`

// TestCloneAcrossHosts is clone end to end with real QEMU guests: a parent
// on h1 takes a ticket of 2, clones, and each clone, on h1 or h2, resumes
// from the clone call with its k, the parent's memory (a shell variable) and
// its own identity, and exits with a result that the parent's join returns.
func TestCloneAcrossHosts(t *testing.T) {
	requireFUSE(t)
	b := newBed(t, 2)
	start := time.Now()
	vm, console := b.runVM(fmt.Sprintf(cloneWorkload, 2), 256, 3*time.Minute)
	t.Logf("parent ran and powered off in %v (%s)", time.Since(start).Round(time.Millisecond), vm.Reason)
	m := regexp.MustCompile(`PARENT-STATE ([0-9a-f]{16})`).FindStringSubmatch(console)
	if m == nil || !regexp.MustCompile(`(?m)^PARENT-DONE`).MatchString(console) {
		t.Fatalf("parent console:\n%s", console)
	}
	ts, _, err := b.c.Tickets(context.Background(), vm.ID, nil)
	if err != nil || len(ts) != 1 {
		t.Fatalf("tickets: %+v %v", ts, err)
	}
	tv, _, err := b.c.Ticket(context.Background(), ts[0].ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if tv.State != fsm.TicketJoined || len(tv.Clones) != 2 {
		t.Fatalf("ticket: %+v", tv)
	}
	hosts := map[string]bool{}
	for _, cl := range tv.Clones {
		want := fmt.Sprintf("k=%d state=%s VM %d on %s: clone %d of ticket %d (parent VM %d)", cl.K, m[1], cl.VMID, cl.Host,
			cl.K, tv.ID, vm.ID)
		if cl.State != fsm.CloneExited || cl.Status != cl.K || strings.TrimSpace(cl.Result) != want {
			t.Errorf("clone %d: %+v\nwant result %q", cl.K, cl, want)
		}
		hosts[cl.Host] = true
	}
	if len(hosts) != 2 {
		t.Errorf("clones ran on %v; placement should spread them over both hosts", hosts)
	}
	// The snapshot is released once the ticket is joined, and the clone
	// hosts drop their descriptors once their clones are gone.
	b.waitFor(10*time.Second, "snapshots and sources released", func() bool {
		for _, d := range b.hosts {
			d.mu.Lock()
			n := len(d.snaps) + len(d.sources) + len(d.vms)
			d.mu.Unlock()
			if n != 0 {
				return false
			}
		}
		return true
	})
	metrics, err := httpGet("http://" + b.hosts[0].APIAddr() + "/metrics")
	if err != nil || !strings.Contains(metrics, "sf_host_snapshots 0") || !strings.Contains(metrics, "memserver") {
		t.Errorf("host metrics (%v):\n%s", err, metrics)
	}
	st := b.hosts[0].ms.Stats()
	t.Logf("memserver of h1: %+v", st)
	if st.DataPages == 0 {
		t.Error("no page was fetched from the parent's memserver")
	}
	// Multicast: both hosts got the descriptor that way, and the parent's
	// host pushed pages that both put into their RAM files.
	for _, e := range b.eventsOf(EventCloneRunning) {
		if e.Via != "multicast" {
			t.Errorf("clone %d got its descriptor by %s", e.K, e.Via)
		}
	}
	sender := b.hosts[0].McastStats()
	t.Logf("multicast: h1 %+v, h2 %+v", sender, b.hosts[1].McastStats())
	if sender.SessionsSent != 1 || sender.DescriptorsSent != 1 || sender.PagesPushed == 0 {
		t.Errorf("h1 sent %+v", sender)
	}
	for i, d := range b.hosts {
		if st := d.McastStats(); st.DescriptorsReceived != 1 || st.PagesReceived == 0 || st.Fallbacks != 0 {
			t.Errorf("h%d received %+v", i+1, st)
		}
	}
	if !strings.Contains(metrics, "sf_host_mcast_pages_pushed_total") {
		t.Error("no multicast metrics")
	}
}

// TestEagerFillShares: two clone hosts that need a descriptor's memory
// before their clones start (as Xen hosts do) get it from the multicast
// session, all of it for the price of one send, and fetch by unicast only
// what the session did not bring; the clones run from the parent's memory.
func TestEagerFillShares(t *testing.T) {
	requireFUSE(t)
	// The push is capped so that each batch of pages (1 MiB from a QEMU
	// parent) takes longer than the clone hosts' stall timeout: they must
	// take packets as progress, not only whole batches, and wait for the
	// session rather than fetch.
	slow := func(i int, cfg *Config) {
		cfg.McastRate = 4 << 20
		cfg.pushStall = 150 * time.Millisecond
	}
	b := newBed(t, 3, withEager(), slow)
	vm, console := b.runVM(fmt.Sprintf(cloneWorkload, 2), 256, 3*time.Minute)
	m := regexp.MustCompile(`PARENT-STATE ([0-9a-f]{16})`).FindStringSubmatch(console)
	if m == nil || !regexp.MustCompile(`(?m)^PARENT-DONE`).MatchString(console) {
		t.Fatalf("parent console:\n%s", console)
	}
	ctx := context.Background()
	ts, _, _ := b.c.Tickets(ctx, vm.ID, nil)
	tv, _, _ := b.c.Ticket(ctx, ts[0].ID, nil)
	hosts := map[string]bool{}
	for _, cl := range tv.Clones {
		if cl.State != fsm.CloneExited || cl.Status != cl.K || !strings.Contains(cl.Result, "state="+m[1]) {
			t.Errorf("clone %+v", cl)
		}
		hosts[cl.Host] = true
	}
	if !hosts["h2"] || !hosts["h3"] {
		t.Fatalf("clones ran on %v, want h2 and h3", hosts)
	}
	desc, _, err := b.c.Descriptor(ctx, tv.Descriptor, nil)
	if err != nil {
		t.Fatal(err)
	}
	b.waitFor(10*time.Second, "both sources closed", func() bool { return len(b.eventsOf(EventSourceClosed)) == 2 })
	var fetched, inserted uint64
	for _, e := range b.eventsOf(EventSourceClosed) {
		fetched += e.Pages.PagesFetched
		inserted += e.Pages.Inserted
	}
	t.Logf("%d data pages; the clone hosts fetched %d (%.2f of them each) and had %d pushed in; h1 sent %+v",
		desc.PageCount, fetched, float64(fetched)/float64(desc.PageCount)/2, inserted, b.hosts[0].McastStats())
	t.Logf("memserver: %+v", b.hosts[0].ms.Stats())
	pushed := b.hosts[0].McastStats().PagesPushed
	if n := uint64(desc.PageCount); n == 0 || fetched > n/4 || inserted < 2*(n-n/8) || pushed > n+n/8 {
		t.Errorf("of %d data pages, h1 multicast %d, the two clone hosts had %d pushed in and fetched %d by unicast: "+
			"want every page multicast about once, and few fetched", n, pushed, inserted, fetched)
	}
}

// TestMcastFallback: a clone host without multicast, beside one with it,
// gets its descriptor and pages by unicast; the other by multicast.
func TestMcastFallback(t *testing.T) {
	requireFUSE(t)
	b := newBed(t, 2, withoutMcast(1))
	vm, console := b.runVM(fmt.Sprintf(cloneWorkload, 2), 256, 3*time.Minute)
	if !regexp.MustCompile(`(?m)^PARENT-DONE`).MatchString(console) {
		t.Fatalf("parent console:\n%s", console)
	}
	ts, _, _ := b.c.Tickets(context.Background(), vm.ID, nil)
	tv, _, _ := b.c.Ticket(context.Background(), ts[0].ID, nil)
	for _, cl := range tv.Clones {
		if cl.State != fsm.CloneExited || cl.Status != cl.K {
			t.Errorf("clone %+v", cl)
		}
	}
	via := map[string]string{}
	for _, e := range b.eventsOf(EventCloneRunning) {
		for _, cl := range tv.Clones {
			if cl.VMID == e.VM {
				via[cl.Host] = e.Via
			}
		}
	}
	if via["h1"] != "multicast" || via["h2"] != "unicast" {
		t.Errorf("descriptors came %v; want multicast to h1, unicast to h2 (no multicast there)", via)
	}
	if st := b.hosts[1].McastStats(); st != (McastStats{}) {
		t.Errorf("h2 without multicast: %+v", st)
	}
}

// TestCheckpointAndCreateClones: checkpoint() before any ticket exists, then
// create_clones from it: every clone resumes in the checkpoint call with its
// k, the ticket, and the memory the parent had at the checkpoint (not what
// it wrote afterwards).
func TestCheckpointAndCreateClones(t *testing.T) {
	requireFUSE(t)
	b := newBed(t, 2)
	vm, console := b.runVM(`X=before
eval $(sfguest checkpoint) || { echo CHECKPOINT-FAILED; exit 1; }
if [ "$clone_id" = 0 ]; then
  X=after
  T=$(sfguest ticket 2 | sed 's/^ticket \([0-9]*\):.*/\1/')
  echo "CHECKPOINT $checkpoint TICKET $T"
  sfguest create-clones $checkpoint $T
  sfguest join $T
  echo PARENT-DONE
else
  sfguest exit --status $clone_id --result "k=$clone_id ticket=$ticket cp=$checkpoint X=$X"
fi`, 256, 3*time.Minute)
	m := regexp.MustCompile(`(?m)^CHECKPOINT (\d+) TICKET (\d+)`).FindStringSubmatch(console)
	if m == nil || !regexp.MustCompile(`(?m)^PARENT-DONE`).MatchString(console) {
		t.Fatalf("parent console:\n%s", console)
	}
	ts, _, err := b.c.Tickets(context.Background(), vm.ID, nil)
	if err != nil || len(ts) != 1 {
		t.Fatalf("tickets: %+v %v", ts, err)
	}
	tv, _, _ := b.c.Ticket(context.Background(), ts[0].ID, nil)
	if tv.State != fsm.TicketJoined || len(tv.Clones) != 2 || fmt.Sprint(tv.ID) != m[2] {
		t.Fatalf("ticket: %+v", tv)
	}
	for _, cl := range tv.Clones {
		want := fmt.Sprintf("k=%d ticket=%d cp=%s X=before", cl.K, tv.ID, m[1])
		if cl.State != fsm.CloneExited || cl.Status != cl.K || cl.Result != want {
			t.Errorf("clone %d: %+v, want result %q", cl.K, cl, want)
		}
	}
	// The checkpoint's snapshot lives until its VM ends, which it has.
	b.waitFor(10*time.Second, "checkpoint snapshot released", func() bool {
		d := b.hosts[0]
		d.mu.Lock()
		defer d.mu.Unlock()
		return len(d.snaps) == 0
	})
}

// TestCloneFailsWhenMemoryUnreachable: the parent's memserver dies while a
// clone still needs pages; the clone's faults fail after the client's
// retries, its QEMU dies, and the cluster records the clone failed with
// the reason, so the parent's join returns.
func TestCloneFailsWhenMemoryUnreachable(t *testing.T) {
	requireFUSE(t)
	b := newBed(t, 2)
	ctx := context.Background()
	vm, err := b.c.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: 256, VCPUs: 1, Launch: true,
		Cmd: `sfguest gen-data --size 48 /data
T=$(sfguest ticket 1 | sed 's/^ticket \([0-9]*\):.*/\1/')
K=$(sfguest clone $T)
if [ "$K" = 0 ]; then sfguest join $T; echo PARENT-DONE; sleep 600
else sleep 2; sha256sum /data; sfguest exit --result read-everything; fi`})
	if err != nil {
		t.Fatal(err)
	}
	var ticket fsm.TicketView
	b.waitFor(2*time.Minute, "the clone running", func() bool {
		ts, _, err := b.c.Tickets(ctx, vm.ID, nil)
		if err != nil || len(ts) != 1 {
			return false
		}
		ticket, _, err = b.c.Ticket(ctx, ts[0].ID, nil)
		return err == nil && len(ticket.Clones) == 1 && ticket.Clones[0].State == fsm.CloneRunning
	})
	killed := time.Now()
	b.hosts[0].ms.Close()
	var cl fsm.Clone
	b.waitFor(time.Minute, "the clone failed", func() bool {
		tv, _, err := b.c.Ticket(ctx, ticket.ID, nil)
		if err != nil {
			return false
		}
		cl = tv.Clones[0]
		return cl.State.Terminal()
	})
	t.Logf("clone %s %v after the memserver died: %s", cl.State, time.Since(killed).Round(time.Millisecond), cl.Reason)
	if cl.State != fsm.CloneFailed || !strings.Contains(cl.Reason, "could not be fetched") {
		t.Fatalf("clone: %+v", cl)
	}
	b.waitFor(30*time.Second, "the parent's join returned", func() bool {
		return regexp.MustCompile(`(?m)^PARENT-DONE`).MatchString(b.console(vm))
	})
}

func httpGet(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// cloneOfClone: the parent writes data and clones; its clone writes data
// of its own, kills a spare ticket and clones in turn; the grandchild
// checksums both datasets and exits; the clone joins it and exits with what
// it joined.
const cloneOfClone = `X=$(head -c 1000000 /dev/urandom | sha256sum | cut -c1-16)
head -c 8000000 /dev/urandom > /tmp/p
P=$(sha256sum /tmp/p | cut -c1-16)
echo "PARENT-STATE x=$X p=$P"
T=$(sfguest ticket 1 | sed 's/^ticket \([0-9]*\):.*/\1/')
K=$(sfguest clone $T) || { echo CLONE-FAILED; exit 1; }
if [ "$K" = 0 ]; then sfguest join $T; echo PARENT-DONE; exit 0; fi
head -c 4000000 /dev/urandom > /tmp/c
C=$(sha256sum /tmp/c | cut -c1-16)
V=$(sfguest ticket 1 | sed 's/^ticket \([0-9]*\):.*/\1/')
sfguest kill $V >/dev/null
U=$(sfguest ticket 1 | sed 's/^ticket \([0-9]*\):.*/\1/')
L=$(sfguest clone $U 2>&1) || { sfguest exit --status 9 --result "clone of a clone: $L"; exit 0; }
if [ "$L" = 0 ]; then
  J=$(sfguest join $U | tail -n +3 | tr -s ' ')
  sfguest exit --result "c=$C killed=$V joined=$U: $J"
else
  sfguest exit --status 7 --result "grandchild x=$X p=$(sha256sum /tmp/p | cut -c1-16) c=$(sha256sum /tmp/c | cut -c1-16) $(sfguest id | tr '\n' ' ')"
fi`

// TestCloneOfClone: a clone calls the API as the parent of its own tickets
// (request, kill, clone, join). Its snapshot is an overlay of its own pages
// over the memory it was restored from, served by its host's memserver; the
// grandchild sees the parent's data and the clone's.
func TestCloneOfClone(t *testing.T) {
	requireFUSE(t)
	b := newBed(t, 2)
	vm, console := b.runVM(cloneOfClone, 256, 3*time.Minute)
	m := regexp.MustCompile(`(?m)^PARENT-STATE x=(\w+) p=(\w+)`).FindStringSubmatch(console)
	if m == nil || !regexp.MustCompile(`(?m)^PARENT-DONE`).MatchString(console) {
		t.Fatalf("parent console:\n%s", console)
	}
	x, p := m[1], m[2]
	ctx := context.Background()
	ts, _, _ := b.c.Tickets(ctx, vm.ID, nil)
	tv, _, _ := b.c.Ticket(ctx, ts[0].ID, nil)
	cl := tv.Clones[0]
	t.Logf("clone: %+v", cl)
	var c string
	var killed, joined uint64
	if cl.State != fsm.CloneExited || cl.Status != 0 {
		t.Fatalf("clone: %+v", cl)
	}
	if _, err := fmt.Sscanf(cl.Result, "c=%s killed=%d joined=%d:", &c, &killed, &joined); err != nil {
		t.Fatalf("clone's result %q: %v", cl.Result, err)
	}
	if kt, _, err := b.c.Ticket(ctx, killed, nil); err != nil || kt.ParentVM != cl.VMID || kt.State != fsm.TicketKilled {
		t.Errorf("the clone's killed ticket %d: %+v %v", killed, kt, err)
	}
	gt, _, err := b.c.Ticket(ctx, joined, nil)
	if err != nil || gt.ParentVM != cl.VMID || gt.State != fsm.TicketJoined || len(gt.Clones) != 1 {
		t.Fatalf("the clone's ticket %d: %+v %v", joined, gt, err)
	}
	g := gt.Clones[0]
	want := fmt.Sprintf("grandchild x=%s p=%s c=%s VM %d on %s: clone 1 of ticket %d (parent VM %d)", x, p, c, g.VMID, g.Host, joined, cl.VMID)
	if g.State != fsm.CloneExited || g.Status != 7 || strings.TrimSpace(g.Result) != want {
		t.Fatalf("grandchild: %+v\nwant result %q", g, want)
	}
	if !strings.Contains(cl.Result, g.Host) {
		t.Errorf("the clone's join output %q does not show the grandchild on %s", cl.Result, g.Host)
	}
	t.Logf("grandchild on %s: %s", g.Host, g.Result)
}

// eventsOf returns the bed's events of a kind.
func (b *bed) eventsOf(kind string) []Event {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []Event
	for _, e := range b.events {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}
