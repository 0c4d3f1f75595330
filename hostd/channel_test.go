package hostd

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/coordinator"
	"github.com/snowflock-go/snowflock/gossip"
	"github.com/snowflock-go/snowflock/guest"
	"github.com/snowflock-go/snowflock/guestchan"
)

// testCoordinator starts one real coordinator and a gossip host "h1" with
// 8 slots, and returns a client once the host is registered.
func testCoordinator(t *testing.T) *api.Client {
	t.Helper()
	s, err := coordinator.New(coordinator.Config{NodeID: "c1", DataDir: t.TempDir(), RaftAddr: "127.0.0.1:0",
		HTTPAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", Bootstrap: true, Logger: hclog.NewNullLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	h, err := gossip.New(gossip.Config{Name: "h1", BindAddr: "127.0.0.1:0", Meta: gossip.Meta{Role: gossip.RoleHost, Slots: 8, MemMB: 4096}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Shutdown() })
	if _, err := h.Join([]string{s.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	c, _ := api.NewClient(api.Config{Addrs: []string{s.HTTPAddr()}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if hs, _, err := c.Hosts(context.Background(), nil); err == nil && len(hs) == 1 {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatal("host not registered")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func serveVM(t *testing.T, c *api.Client, name string) (*guest.Client, *GuestChannel, chan error) {
	t.Helper()
	vm, err := c.CreateVM(context.Background(), api.VMRequest{Name: name, Host: "h1", MemMB: 256, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	g, h := net.Pipe()
	ch := &GuestChannel{VMID: vm.ID, Host: "h1", Coord: c, Log: hclog.NewNullLogger()}
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go func() { done <- ch.Serve(ctx, h) }()
	return guest.NewClient(guest.NewMux(g)), ch, done
}

func code(err error) string {
	var ge *guestchan.Error
	if errors.As(err, &ge) {
		return ge.Code
	}
	return ""
}

func TestGuestChannelAPI(t *testing.T) {
	c := testCoordinator(t)
	ctx := context.Background()
	g1, _, _ := serveVM(t, c, "one")
	g2, _, _ := serveVM(t, c, "two")

	id, err := g1.Hello(ctx)
	if err != nil || id.Role != "parent" || id.Host != "h1" || id.VMID == 0 {
		t.Fatalf("hello: %+v %v", id, err)
	}
	tk, err := g1.RequestTicket(ctx, 4)
	if err != nil || tk.Granted != 4 || tk.ParentVM != id.VMID {
		t.Fatalf("ticket: %+v %v", tk, err)
	}
	ts, err := g1.Tickets(ctx)
	if err != nil || len(ts) != 1 || ts[0].ID != tk.ID {
		t.Fatalf("tickets: %+v %v", ts, err)
	}
	if ts, err := g2.Tickets(ctx); err != nil || len(ts) != 0 {
		t.Fatalf("the other VM sees tickets %+v %v", ts, err)
	}
	// A guest acts only as itself: another VM's ticket is refused.
	if _, err := g2.Ticket(ctx, tk.ID); code(err) != "not_parent" {
		t.Fatalf("foreign ticket-info: %v", err)
	}
	if _, err := g2.Join(ctx, tk.ID); code(err) != "not_parent" {
		t.Fatalf("foreign join: %v", err)
	}
	if _, err := g2.Kill(ctx, tk.ID); code(err) != "not_parent" {
		t.Fatalf("foreign kill: %v", err)
	}
	if err := g1.Exit(ctx, 0, "x"); code(err) != "not_clone" {
		t.Fatalf("exit of a parent: %v", err)
	}
	if _, err := g1.RequestTicket(ctx, 0); code(err) != "invalid" {
		t.Fatalf("ticket 0: %v", err)
	}
	if _, err := g1.Clone(ctx, tk.ID); code(err) != guestchan.CodeUnsupported {
		t.Fatalf("clone: %v", err)
	}
	if _, err := g1.RequestTicket(ctx, 5); err != nil {
		t.Fatalf("partial grant expected, got %v", err)
	}
	j, err := g1.Join(ctx, tk.ID) // never cloned: joins at once
	if err != nil || j.State != "joined" {
		t.Fatalf("join: %+v %v", j, err)
	}
}

func TestGuestChannelUntrustedInput(t *testing.T) {
	c := testCoordinator(t)
	vm, err := c.CreateVM(context.Background(), api.VMRequest{Name: "bad", Host: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	g, h := net.Pipe()
	ch := &GuestChannel{VMID: vm.ID, Host: "h1", Coord: c, Log: hclog.NewNullLogger()}
	done := make(chan error, 1)
	go func() { done <- ch.Serve(context.Background(), h) }()
	d := guestchan.NewDecoder(g)
	go func() { // the guest reads answers as fast as they come
		for {
			if _, err := d.ReadResponse(); err != nil {
				return
			}
		}
	}()
	w := func(s string) {
		if _, err := g.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	w(`{"v":1,"id":1,"call":"no_such_call"}` + "\n")
	w(strings.Repeat("z", guestchan.MaxMessage+1) + "\n")
	for i := 0; i < 200; i++ { // a flood: the bucket allows 100 at once
		w(`{"v":1,"id":2,"call":"ready"}` + "\n")
	}
	for i := 0; i <= maxBadMessages; i++ {
		w("garbage\n")
	}
	select {
	case err := <-done:
		if !errors.Is(err, ErrChannelAbuse) {
			t.Fatalf("serve ended with %v, want ErrChannelAbuse", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("channel not closed after repeated garbage")
	}
	st := ch.Stats()
	if st.RateLimited == 0 || st.BadMessages <= maxBadMessages || st.Calls == 0 {
		t.Fatalf("stats %+v", st)
	}
	// The coordinator is unaffected.
	if _, err := c.Status(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestTokenBucket(t *testing.T) {
	b := newTokenBucket(10, 2)
	now := time.Unix(0, 0)
	got := []bool{b.take(now), b.take(now), b.take(now), b.take(now.Add(50 * time.Millisecond)), b.take(now.Add(150 * time.Millisecond))}
	want := []bool{true, true, false, false, true}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("#%d: got %v, want %v", i, got[i], want[i])
		}
	}
}
