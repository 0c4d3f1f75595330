package coordinator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
)

// startHost joins a real gossip agent with role host to the pool, as sfhostd
// does, and waits for the leader to register it.
func startHost(t *testing.T, tc *testCluster, name string, slots int) *gossip.Agent {
	t.Helper()
	a, err := gossip.New(gossip.Config{Name: name, BindAddr: "127.0.0.1:0", Key: tc.cfgs[0].GossipKey,
		Meta: gossip.Meta{Role: gossip.RoleHost, API: "127.0.0.1:7000", Slots: slots, MemMB: 4096}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Shutdown() })
	var join []string
	for _, s := range tc.servers {
		if s != nil {
			join = append(join, s.GossipAddr())
		}
	}
	if _, err := a.Join(join); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "host "+name+" registered", func() bool {
		l := tc.leaderNow()
		if l == nil {
			return false
		}
		h, ok := l.FSM().Host(name)
		return ok && h.Status == fsm.HostAlive && h.Slots == slots
	})
	return a
}

var testSHA = strings.Repeat("ab", 32)

func descriptorFor(parent uint64, host string) api.DescriptorRequest {
	return api.DescriptorRequest{ParentVM: parent, Host: host, Size: 200 << 10, SHA256: testSHA,
		MemserverAddr: "127.0.0.1:7001", PageCount: 65536}
}

func TestClusterTicketLifecycle(t *testing.T) {
	tc := newTestCluster(t, 3, nil)
	startHost(t, tc, "h1", 4)
	startHost(t, tc, "h2", 4)
	c := tc.client("")
	ctx := context.Background()

	vm, err := c.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: 256, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	// Partial grant: 8 slots in all, 10 asked.
	tk, err := c.RequestTicket(ctx, vm.ID, 10)
	if err != nil {
		t.Fatal(err)
	}
	if tk.Granted != 8 || tk.Requested != 10 {
		t.Fatalf("granted %d of %d, want 8 of 10", tk.Granted, tk.Requested)
	}
	if _, err := c.RequestTicket(ctx, vm.ID, 1); !errors.Is(err, fsm.ErrNoCapacity) {
		t.Fatalf("ticket beyond capacity: got %v, want ErrNoCapacity", err)
	}
	cr, err := c.Clone(ctx, tk.ID, descriptorFor(vm.ID, "h1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(cr.Ticket.Clones) != 8 || cr.Ticket.State != fsm.TicketActive {
		t.Fatalf("clone: %d clones, state %s", len(cr.Ticket.Clones), cr.Ticket.State)
	}

	// join blocks until every clone has exited.
	joined := make(chan fsm.TicketView, 1)
	joinErr := make(chan error, 1)
	go func() {
		v, err := c.JoinTicket(ctx, tk.ID, vm.ID)
		joinErr <- err
		joined <- v
	}()
	for _, cl := range cr.Ticket.Clones {
		if _, err := c.SetCloneState(ctx, cl.VMID, api.CloneStateRequest{State: fsm.CloneRunning}); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-joinErr:
		t.Fatalf("join returned while clones run: %v", err)
	default:
	}
	for _, cl := range cr.Ticket.Clones {
		res := fmt.Sprintf("clone %d done", cl.K)
		if _, err := c.SetCloneState(ctx, cl.VMID, api.CloneStateRequest{State: fsm.CloneExited, Status: cl.K, Result: res}); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-joinErr; err != nil {
		t.Fatal(err)
	}
	v := <-joined
	if v.State != fsm.TicketJoined {
		t.Fatalf("joined ticket state %s", v.State)
	}
	for _, cl := range v.Clones {
		if cl.State != fsm.CloneExited || cl.Status != cl.K || cl.Result != fmt.Sprintf("clone %d done", cl.K) {
			t.Fatalf("clone %d outcome %+v", cl.K, cl)
		}
	}
	// Capacity is back.
	if tk2, err := c.RequestTicket(ctx, vm.ID, 8); err != nil || tk2.Granted != 8 {
		t.Fatalf("after join: %+v %v", tk2, err)
	}
	// Reads through followers (forwarded) and stale reads agree.
	for _, addr := range tc.addrs() {
		fc, _ := api.NewClient(api.Config{Addrs: []string{addr}})
		ts, _, err := fc.Tickets(ctx, 0, nil)
		if err != nil || len(ts) != 2 {
			t.Fatalf("tickets via %s: %d %v", addr, len(ts), err)
		}
	}
}

func TestClusterHostFailureFailsClones(t *testing.T) {
	tc := newTestCluster(t, 3, nil)
	startHost(t, tc, "h1", 2)
	h2 := startHost(t, tc, "h2", 2)
	c := tc.client("")
	ctx := context.Background()
	vm, err := c.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: 256, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	tk, err := c.RequestTicket(ctx, vm.ID, 4)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Clone(ctx, tk.ID, descriptorFor(vm.ID, "h1")); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	_ = h2.Shutdown() // crash: no leave
	done := make(chan error, 1)
	var v fsm.TicketView
	go func() {
		var err error
		v, err = c.JoinTicket(ctx, tk.ID, vm.ID)
		done <- err
	}()
	// Clones on h1 exit; those on h2 must fail through gossip detection.
	tv, _, _ := c.Ticket(ctx, tk.ID, nil)
	for _, cl := range tv.Clones {
		if cl.Host == "h1" {
			if _, err := c.SetCloneState(ctx, cl.VMID, api.CloneStateRequest{State: fsm.CloneExited}); err != nil {
				t.Fatal(err)
			}
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("join did not return after host failure")
	}
	t.Logf("join returned %s after host crash", time.Since(killed).Round(time.Millisecond))
	failed := 0
	for _, cl := range v.Clones {
		if cl.Host == "h2" {
			if cl.State != fsm.CloneFailed {
				t.Fatalf("clone on dead host: %s", cl.State)
			}
			failed++
		}
	}
	if failed != 2 {
		t.Fatalf("%d clones failed, want 2", failed)
	}
}

// TestLeaderKilledRepeatedly kills the leader 20 times while clients allocate
// tickets; afterwards every acknowledged ticket must exist and no VM ID or
// (ticket, k) may appear twice.
func TestLeaderKilledRepeatedly(t *testing.T) {
	if testing.Short() {
		t.Skip("long cluster test")
	}
	tc := newTestCluster(t, 3, nil)
	startHost(t, tc, "h1", 1<<20)
	startHost(t, tc, "h2", 1<<20)
	c := tc.client("")
	ctx := context.Background()
	vm, err := c.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: 256, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	acked := map[uint64]fsm.TicketView{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				tk, err := c.RequestTicket(ctx, vm.ID, 2)
				if err != nil {
					continue // unacknowledged: may or may not exist
				}
				cr, err := c.Clone(ctx, tk.ID, descriptorFor(vm.ID, "h1"))
				mu.Lock()
				if err == nil {
					acked[tk.ID] = cr.Ticket
				} else {
					acked[tk.ID] = tk
				}
				mu.Unlock()
			}
		}()
	}
	for round := 0; round < 20; round++ {
		l := tc.leader()
		var idx int
		for i, s := range tc.servers {
			if s == l {
				idx = i
			}
		}
		mu.Lock()
		before := len(acked)
		mu.Unlock()
		waitFor(t, 10*time.Second, "progress before kill", func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(acked) > before
		})
		tc.kill(idx)
		tc.leader() // a new one among the other two
		tc.restart(idx)
		tc.waitVoters(3)
	}
	close(stop)
	wg.Wait()

	l := tc.leader()
	seenVM := map[uint64]bool{}
	for id, want := range acked {
		got, _, ok := l.FSM().Ticket(id)
		if !ok {
			t.Fatalf("acknowledged ticket %d lost", id)
		}
		if len(want.Clones) > 0 && len(got.Clones) != len(want.Clones) {
			t.Fatalf("ticket %d: %d clones, acknowledged %d", id, len(got.Clones), len(want.Clones))
		}
	}
	vms, _ := l.FSM().VMs("")
	for _, v := range vms {
		if seenVM[v.ID] {
			t.Fatalf("vm id %d twice", v.ID)
		}
		seenVM[v.ID] = true
	}
	seenClone := map[[2]uint64]bool{}
	for _, cl := range mustClones(l) {
		k := [2]uint64{cl.Ticket, uint64(cl.K)}
		if seenClone[k] {
			t.Fatalf("clone %v twice", k)
		}
		seenClone[k] = true
	}
	t.Logf("%d acknowledged tickets, %d vms", len(acked), len(vms))
}

func mustClones(s *Server) []fsm.Clone {
	cl, _ := s.FSM().Clones("", false)
	return cl
}

// TestNoLeaderHoldsThen503: with a majority gone, a write to the survivor is
// held for the hold time and then refused with 503 no_leader.
func TestNoLeaderHoldsThen503(t *testing.T) {
	tc := newTestCluster(t, 3, nil)
	startHost(t, tc, "h1", 4)
	survivor := tc.servers[0]
	if survivor.IsLeader() {
		survivor = tc.servers[1]
	}
	for i, s := range tc.servers {
		if s != survivor {
			tc.kill(i)
		}
	}
	start := time.Now()
	status, eb := rawRequest(t, survivor.HTTPAddr(), "POST", "/v1/vms", "", []byte(`{"name":"x","host":"h1"}`))
	held := time.Since(start)
	if status != 503 || eb.Code != api.CodeNoLeader {
		t.Fatalf("write without a quorum: %d %+v", status, eb)
	}
	if held < holdTime || held > holdTime+3*time.Second {
		t.Fatalf("held %s, want about %s", held, holdTime)
	}
	ctx := context.Background()
	c, _ := api.NewClient(api.Config{Addrs: []string{survivor.HTTPAddr()}})
	// A stale read is still answered.
	if _, _, err := c.Hosts(ctx, &api.QueryOptions{Stale: true}); err != nil {
		t.Fatalf("stale read without leader: %v", err)
	}
}

// TestDeadCoordinatorRemoved: a coordinator dead in gossip longer than
// DeadServerTimeout is removed from raft by the leader.
func TestDeadCoordinatorRemoved(t *testing.T) {
	tc := newTestCluster(t, 3, func(i int, c *Config) { c.DeadServerTimeout = time.Second })
	l := tc.leader()
	victim := -1
	for i, s := range tc.servers {
		if s != l {
			victim = i
		}
	}
	id := tc.servers[victim].NodeID()
	tc.kill(victim)
	waitFor(t, 15*time.Second, "dead coordinator removed from raft", func() bool {
		cf := l.raft.GetConfiguration()
		if cf.Error() != nil {
			return false
		}
		for _, s := range cf.Configuration().Servers {
			if string(s.ID) == id {
				return false
			}
		}
		return len(cf.Configuration().Servers) == 2
	})
}

// TestLeaderLeaves: the leader leaves gracefully; leadership moves, it is
// out of raft, gossip shows it left, and writes go on.
func TestLeaderLeaves(t *testing.T) {
	tc := newTestCluster(t, 3, nil)
	startHost(t, tc, "h1", 4)
	l := tc.leader()
	id := l.NodeID()
	lc, _ := api.NewClient(api.Config{Addrs: []string{l.HTTPAddr()}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := lc.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-l.Left():
	default:
		t.Fatal("Left not closed after leave")
	}
	for i, s := range tc.servers {
		if s == l {
			tc.kill(i)
		}
	}
	nl := tc.leader()
	if nl.NodeID() == id {
		t.Fatal("the departed node still leads")
	}
	// Removal is immediate when the leaver reaches the new leader, else the
	// leader's reconcile does it when gossip reports the leave.
	waitFor(t, 10*time.Second, "2 raft servers after leave", func() bool {
		cf := nl.raft.GetConfiguration()
		return cf.Error() == nil && len(cf.Configuration().Servers) == 2
	})
	waitFor(t, 5*time.Second, "gossip shows the node left", func() bool {
		m, ok := nl.gossip.Member(id)
		return ok && m.Status == gossip.StatusLeft
	})
	if _, err := tc.client("").CreateVM(ctx, api.VMRequest{Name: "after", Host: "h1"}); err != nil {
		t.Fatalf("write after leave: %v", err)
	}
}

// TestBootstrapExpect: three nodes started with BootstrapExpect 3 and no
// seed form one cluster; a node with state never bootstraps again.
func TestBootstrapExpect(t *testing.T) {
	tc := newTestCluster(t, 3, func(i int, c *Config) {
		c.Bootstrap = false
		c.BootstrapExpect = 3
	})
	l := tc.leader()
	if _, err := tc.client("").Status(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Restarting a member with bootstrap-expect set keeps the one cluster.
	for i, s := range tc.servers {
		if s != l {
			tc.kill(i)
			tc.restart(i)
			break
		}
	}
	tc.waitVoters(3)
	term := tc.leader().raft.CurrentTerm()
	if term == 0 {
		t.Fatal("no term")
	}
}
