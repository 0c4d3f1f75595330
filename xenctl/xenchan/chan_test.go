package xenchan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/guest"
	"github.com/snowflock-go/snowflock/guestchan"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// startHost serves domid's channel on the in-memory store, as NewHost
// does on a real one.
func startHost(t *testing.T, m *memStore, domid uint32) *Host {
	t.Helper()
	dom0 := m.as(0)
	w := dom0.watch(PathsFor(domid).Guest)
	h := newHost(dom0, domid, w.ch, func() {}, HostOptions{})
	if err := h.recover(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	go h.run()
	t.Cleanup(func() { h.Close() })
	return h
}

// startGuest opens the guest's end in domid, as OpenGuest does.
func startGuest(t *testing.T, m *memStore, domid uint32) (*Guest, *view, *memWatch) {
	t.Helper()
	v := m.as(domid)
	w := v.watch(HostDir)
	g := newGuest(v, w.ch, func() {})
	epoch, err := g.readEpoch(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	g.epoch = epoch
	go g.run()
	t.Cleanup(func() { g.Close() })
	return g, v, w
}

// prepare makes domid's home, as libxl does, and prepares its channel.
func prepare(t *testing.T, m *memStore, domid uint32, setup Setup) string {
	t.Helper()
	if err := m.as(0).Mkdir(testCtx(t), PathsFor(domid).Home+"/data"); err != nil {
		t.Fatal(err)
	}
	epoch, err := Prepare(testCtx(t), m.as(0), domid, setup)
	if err != nil {
		t.Fatal(err)
	}
	return epoch
}

// serve plays hostd: it answers each request with handle's response, one
// goroutine per call.
func serve(t *testing.T, rw io.ReadWriter, handle func(*guestchan.Request) *guestchan.Response) {
	var wmu sync.Mutex
	go func() {
		d := guestchan.NewDecoder(rw)
		for {
			req, err := d.ReadRequest()
			if err != nil {
				if errors.Is(err, guestchan.ErrBadMessage) {
					continue
				}
				return
			}
			go func() {
				resp := handle(req)
				if resp == nil {
					return
				}
				wmu.Lock()
				defer wmu.Unlock()
				if err := guestchan.Encode(rw, resp); err != nil && !errors.Is(err, ErrClosed) {
					t.Errorf("answer: %v", err)
				}
			}()
		}
	}()
}

func echo(req *guestchan.Request) *guestchan.Response {
	if req.Call == guestchan.CallTickets {
		// A big answer: many chunks.
		r, _ := guestchan.Answer(req.ID, []string{strings.Repeat("t", 60<<10)})
		return r
	}
	return &guestchan.Response{V: guestchan.Version, ID: req.ID, Result: req.Args}
}

// eventually waits for cond.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCallsRoundTrip(t *testing.T) {
	m := newMemStore()
	prepare(t, m, 5, Setup{Identity: &guestchan.Identity{VMID: 11, Role: "parent", Host: "h1"}})
	h := startHost(t, m, 5)
	serve(t, h, echo)
	g, _, _ := startGuest(t, m, 5)
	mux := guest.NewMux(g)
	ctx := testCtx(t)

	id, err := g.Identity(ctx)
	if err != nil || id.VMID != 11 || id.Host != "h1" {
		t.Fatalf("identity %+v, %v", id, err)
	}
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Results up to 4 KiB, JSON-escaped: several chunks.
			args := guestchan.ExitArgs{Status: i, Result: strings.Repeat("\"line\"\n", i*100)}
			var got guestchan.ExitArgs
			if err := mux.Call(ctx, guestchan.CallExit, args, &got); err != nil || got != args {
				t.Errorf("call %d: %+v, %v", i, got.Status, err)
			}
		}()
	}
	wg.Wait()
	var big []string
	if err := mux.Call(ctx, guestchan.CallTickets, nil, &big); err != nil || len(big) != 1 || len(big[0]) != 60<<10 {
		t.Fatalf("big answer: %d, %v", len(big), err)
	}
	// Every node of every call is gone once the guest has acknowledged.
	p := PathsFor(5)
	eventually(t, "cleanup", func() bool {
		return len(m.below(p.Home+"/"+ReqDir)) == 0 && len(m.below(p.Home+"/"+DoneDir)) == 0 &&
			len(m.below(p.Host+"/resp")) == 0
	})
}

// respOf reads the answer the host stored for id.
func respOf(t *testing.T, m *memStore, domid uint32, id uint64) *guestchan.Response {
	t.Helper()
	var line []byte
	eventually(t, fmt.Sprintf("answer %d", id), func() bool {
		b, complete, err := readMessage(testCtx(t), m.as(0), fmt.Sprintf("%s/resp/%d", PathsFor(domid).Host, id))
		line = b
		return complete && err == nil
	})
	var r guestchan.Response
	if err := json.Unmarshal(line, &r); err != nil {
		t.Fatal(err)
	}
	return &r
}

func TestHostRejectsMalformedRequests(t *testing.T) {
	m := newMemStore()
	prepare(t, m, 5, Setup{})
	h := startHost(t, m, 5)
	got := make(chan *guestchan.Request, 10)
	serve(t, h, func(r *guestchan.Request) *guestchan.Response { got <- r; return echo(r) })
	gv := m.as(5)
	ctx := testCtx(t)
	put := func(id string, nodes map[string]string) {
		t.Helper()
		for k, v := range nodes {
			if k != "n" {
				gv.Write(ctx, ReqDir+"/"+id+"/"+k, []byte(v))
			}
		}
		if n, ok := nodes["n"]; ok {
			gv.Write(ctx, ReqDir+"/"+id+"/n", []byte(n))
		}
	}
	put("abc", map[string]string{"0": `{"v":1,"id":1,"call":"hello"}`, "n": "1"})
	put("5", map[string]string{"0": `{"v":1,"id":5,"call":"hello"}`, "n": "99"})
	put("6", map[string]string{"0": `{"v":1,"id":6,"call":"hello"}` + "\n" + `{"v":1,"id":66,"call":"kill"}`, "n": "1"})
	put("7", map[string]string{"0": `{"v":1,"id":8,"call":"hello"}`, "n": "1"})
	put("9", map[string]string{"0": `not json`, "n": "1"})
	put("10", map[string]string{"0": `{"v":1,"id":10,"call":"hello"}`, "n": "1"})

	if r := <-got; r.ID != 10 {
		t.Fatalf("the host passed on %+v", r)
	}
	for id, code := range map[uint64]string{5: guestchan.CodeTooLarge, 6: guestchan.CodeTooLarge,
		7: guestchan.CodeBadRequest, 9: guestchan.CodeBadRequest} {
		if r := respOf(t, m, 5, id); r.Error == nil || r.Error.Code != code {
			t.Errorf("answer to %d: %+v", id, r)
		}
	}
	if r := respOf(t, m, 5, 10); r.Error != nil {
		t.Errorf("answer to 10: %+v", r.Error)
	}
	eventually(t, "the guest's area emptied", func() bool { return len(m.below(PathsFor(5).Home+"/"+ReqDir)) == 0 })
	select {
	case r := <-got:
		t.Fatalf("the host passed on %+v", r)
	default:
	}

	// A guest that keeps at it is hung up on.
	for i := range maxBad + 2 {
		put(fmt.Sprintf("junk%d", i), map[string]string{"0": "x", "n": "1"})
	}
	eventually(t, "ErrAbuse", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return errors.Is(h.err, ErrAbuse)
	})
	if _, err := io.ReadAll(h); !errors.Is(err, ErrAbuse) {
		t.Fatalf("Read after abuse: %v", err)
	}
}

func TestCloneGetsGreetingAndInterrupts(t *testing.T) {
	m := newMemStore()
	prepare(t, m, 5, Setup{})
	parentHost := startHost(t, m, 5)
	taken := make(chan uint64, 2)
	// The parent's host takes both calls and is "captured" before it
	// answers.
	serve(t, parentHost, func(r *guestchan.Request) *guestchan.Response { taken <- r.ID; return nil })
	g, gv, gw := startGuest(t, m, 5)
	mux := guest.NewMux(g)
	ctx := testCtx(t)

	type result struct {
		clone guestchan.CloneResult
		err   error
	}
	cloneRes, joinRes := make(chan result, 1), make(chan result, 1)
	go func() {
		var r guestchan.CloneResult
		err := mux.Call(ctx, guestchan.CallClone, guestchan.TicketRef{Ticket: 7}, &r)
		cloneRes <- result{r, err}
	}()
	ids := map[uint64]bool{<-taken: true}
	go func() {
		err := mux.Call(ctx, guestchan.CallJoin, guestchan.TicketRef{Ticket: 3}, nil)
		joinRes <- result{err: err}
	}()
	ids[<-taken] = true
	var cloneID uint64
	for id := range ids {
		// The Mux numbers calls from 1: the clone call came first.
		if cloneID == 0 || id < cloneID {
			cloneID = id
		}
	}

	// The clone's host prepares domain 8 with the answer to the clone
	// call only: the join was unknown to it.
	greet, _ := guestchan.Answer(cloneID, guestchan.CloneResult{CloneID: 3, Ticket: 7})
	oldEpoch := g.Epoch()
	epoch := prepare(t, m, 8, Setup{Identity: &guestchan.Identity{VMID: 12, Role: "clone", CloneID: 3, Ticket: 7}, Greeting: []*guestchan.Response{greet}})
	cloneHost := startHost(t, m, 8)
	serve(t, cloneHost, echo)
	gv.move(8, gw)

	r := <-cloneRes
	if r.err != nil || r.clone.CloneID != 3 || r.clone.Ticket != 7 {
		t.Fatalf("clone call in the clone: %+v", r)
	}
	var ge *guestchan.Error
	if r := <-joinRes; !errors.As(r.err, &ge) || ge.Code != guestchan.CodeInterrupted {
		t.Fatalf("join in the clone: %v", r.err)
	}
	if g.Epoch() != epoch || epoch == oldEpoch {
		t.Fatalf("epoch %q, want %q", g.Epoch(), epoch)
	}
	if id, err := g.Identity(ctx); err != nil || id.VMID != 12 || id.CloneID != 3 {
		t.Fatalf("identity in the clone: %+v, %v", id, err)
	}
	// The channel goes on in the clone.
	var back guestchan.TicketRef
	if err := mux.Call(ctx, guestchan.CallTicketInfo, guestchan.TicketRef{Ticket: 9}, &back); err != nil || back.Ticket != 9 {
		t.Fatalf("a call in the clone: %+v, %v", back, err)
	}
	// Nothing of it reached the parent's domain.
	if nodes := m.below(PathsFor(5).Home + "/" + ReqDir); len(nodes) != 0 {
		t.Fatalf("parent's area: %q", nodes)
	}
}

// TestCloneCallsRightAfterTheGreeting: a clone that calls again the
// moment its greeting arrives, as a SnowFlock clone does once clone()
// returns, has that call answered by its new host, even when the call is
// written before the scan that delivered the greeting has finished. (On
// real Xen that scan failed the new call with CodeInterrupted.)
func TestCloneCallsRightAfterTheGreeting(t *testing.T) {
	m := newMemStore()
	prepare(t, m, 5, Setup{})
	parentHost := startHost(t, m, 5)
	taken := make(chan uint64, 1)
	serve(t, parentHost, func(r *guestchan.Request) *guestchan.Response { taken <- r.ID; return nil })
	g, gv, gw := startGuest(t, m, 5)
	mux := guest.NewMux(g)
	ctx := testCtx(t)
	cloneRes := make(chan error, 1)
	go func() {
		var r guestchan.CloneResult
		err := mux.Call(ctx, guestchan.CallClone, guestchan.TicketRef{Ticket: 7}, &r)
		if err == nil && r.CloneID != 3 {
			err = fmt.Errorf("clone ID %d", r.CloneID)
		}
		if err == nil {
			// The clone's next call, at once.
			var back guestchan.TicketRef
			err = mux.Call(ctx, guestchan.CallTicketInfo, guestchan.TicketRef{Ticket: 9}, &back)
		}
		cloneRes <- err
	}()
	cloneID := <-taken

	// The guest's scan in the clone marks the greeting done only once the
	// next call's request is complete.
	next := make(chan struct{})
	var once sync.Once
	m.beforeWrite = func(p string) {
		home := PathsFor(8).Home
		switch {
		case strings.HasPrefix(p, home+"/"+ReqDir+"/") && strings.HasSuffix(p, "/n"):
			once.Do(func() { close(next) })
		case p == fmt.Sprintf("%s/%s/%d", home, DoneDir, cloneID):
			<-next
		}
	}
	greet, _ := guestchan.Answer(cloneID, guestchan.CloneResult{CloneID: 3, Ticket: 7})
	prepare(t, m, 8, Setup{Greeting: []*guestchan.Response{greet}})
	cloneHost := startHost(t, m, 8)
	serve(t, cloneHost, echo)
	gv.move(8, gw)
	if err := <-cloneRes; err != nil {
		t.Fatalf("in the clone: %v", err)
	}
}

func TestRestartedHostAnswersTakenCalls(t *testing.T) {
	m := newMemStore()
	prepare(t, m, 5, Setup{})
	h := startHost(t, m, 5)
	taken := make(chan uint64, 1)
	serve(t, h, func(r *guestchan.Request) *guestchan.Response { taken <- r.ID; return nil })
	g, _, _ := startGuest(t, m, 5)
	mux := guest.NewMux(g)
	errc := make(chan error, 1)
	go func() { errc <- mux.Call(testCtx(t), guestchan.CallJoin, guestchan.TicketRef{Ticket: 1}, nil) }()
	<-taken
	h.Close() // the host daemon dies with the call in flight
	startHost(t, m, 5)
	var ge *guestchan.Error
	if err := <-errc; !errors.As(err, &ge) || ge.Code != guestchan.CodeInternalHost {
		t.Fatalf("call across a host restart: %v", err)
	}
}

func TestGuestWriteFailureLeavesNothing(t *testing.T) {
	m := newMemStore()
	prepare(t, m, 5, Setup{})
	g, _, _ := startGuest(t, m, 5)
	m.mu.Lock()
	m.failAt = m.writes + 2 // the second chunk
	m.mu.Unlock()
	err := guest.NewMux(g).Call(testCtx(t), guestchan.CallExit, guestchan.ExitArgs{Result: strings.Repeat("x", 2*ChunkSize)}, nil)
	if err == nil || !strings.Contains(err.Error(), "ENOSPC") {
		t.Fatalf("call: %v", err)
	}
	if nodes := m.below(PathsFor(5).Home + "/" + ReqDir); len(nodes) != 0 {
		t.Fatalf("left behind: %q", nodes)
	}
}
