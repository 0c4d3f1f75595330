// Package hostd is the host daemon: it runs VMs through a hypervisor
// driver, serves each VM's guest channel, and relays the guest's SnowFlock
// calls to the coordinator cluster.
//
// A guest channel is bound to one VM ID when hostd opens it, so the guest
// never names itself: every call acts as that VM (a guest can only act as
// itself). Guest bytes are untrusted: the decoder bounds messages, calls are
// rate limited, and a channel that keeps sending garbage is closed; none of
// it reaches the coordinator unvalidated or affects other VMs.
package hostd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guestchan"
)

// Coordinator is what a guest channel needs from the coordinator cluster.
// *api.Client implements it; calls retry across leader changes.
type Coordinator interface {
	VM(ctx context.Context, id uint64, o *api.QueryOptions) (fsm.VM, api.QueryMeta, error)
	RequestTicket(ctx context.Context, parent uint64, n int) (fsm.TicketView, error)
	Tickets(ctx context.Context, parent uint64, o *api.QueryOptions) ([]fsm.Ticket, api.QueryMeta, error)
	Ticket(ctx context.Context, id uint64, o *api.QueryOptions) (fsm.TicketView, api.QueryMeta, error)
	JoinTicket(ctx context.Context, ticket, caller uint64) (fsm.TicketView, error)
	KillTicket(ctx context.Context, ticket, caller uint64, reason string) (fsm.TicketView, error)
	SetCloneState(ctx context.Context, vm uint64, r api.CloneStateRequest) (fsm.TicketView, error)
	CreateClones(ctx context.Context, ticket, checkpoint, caller uint64) (fsm.TicketView, error)
}

// Pauser stops and restarts a VM's vCPUs.
type Pauser interface {
	Pause(ctx context.Context) error
	Resume(ctx context.Context) error
}

// Capturer serves the calls that capture the VM: clone and checkpoint.
// call is the request ID of the guest's call, which a clone's host answers
// in the clone; inflight are the guest's other calls in flight.
type Capturer interface {
	Clone(ctx context.Context, vm, ticket, call uint64, inflight []uint64) (guestchan.CloneResult, error)
	Checkpoint(ctx context.Context, vm, call uint64, inflight []uint64) (guestchan.CheckpointResult, error)
}

// Channel limits.
const (
	maxInFlight     = 16               // concurrent calls per VM (joins block)
	callRate        = 50               // calls per second per VM, sustained
	callBurst       = 100              // calls allowed at once
	maxBadMessages  = 32               // consecutive bad messages before hanging up
	callTimeout     = 30 * time.Second // for calls that do not block by design
	joinPollTimeout = 24 * time.Hour   // join waits for clones as long as they run
)

// ErrChannelAbuse is returned when a guest is disconnected for misbehaving.
var ErrChannelAbuse = errors.New("hostd: guest channel closed: too many bad messages")

// ChannelStats counts what a channel saw.
type ChannelStats struct {
	Calls, Errors, BadMessages, RateLimited uint64
}

// GuestChannel serves one VM's channel.
type GuestChannel struct {
	VMID  uint64
	Host  string
	Coord Coordinator
	// Capturer serves clone and checkpoint; nil answers them unsupported.
	Capturer Capturer
	// Greeting is sent before anything is read: the answers a new clone
	// owes to the calls that were pending when its parent was captured.
	Greeting []*guestchan.Response
	Log      hclog.Logger
	// OnReady is called when the guest reports ready (optional).
	OnReady func()
	// Pauser, if set, stops the VM's vCPUs while its exit is recorded: a
	// clone that has exited must not fault on its parent's memory any more,
	// which may be released as soon as the cluster knows.
	Pauser Pauser

	mu       sync.Mutex
	stats    ChannelStats
	inflight map[uint64]int // request IDs being answered (a guest may reuse one)
	// OnCreateClones, if set, is told of the tickets create_clones started
	// from a checkpoint (the host multicasts their memory).
	OnCreateClones func(t fsm.TicketView, checkpoint uint64)
}

// Stats returns the channel's counters.
func (g *GuestChannel) Stats() ChannelStats {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stats
}

func (g *GuestChannel) count(f func(*ChannelStats)) {
	g.mu.Lock()
	f(&g.stats)
	g.mu.Unlock()
}

// Serve answers the guest on rw until ctx ends, the guest hangs up, or it
// misbehaves past the limits. It closes rw before returning, and waits for
// the calls it started.
func (g *GuestChannel) Serve(ctx context.Context, rw io.ReadWriteCloser) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { rw.Close() })
	defer stop()
	defer rw.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	var wmu sync.Mutex
	reply := func(r *guestchan.Response) {
		wmu.Lock()
		defer wmu.Unlock()
		if err := guestchan.Encode(rw, r); err != nil {
			g.Log.Debug("guest reply failed", "vm", g.VMID, "error", err)
		}
	}
	for _, r := range g.Greeting {
		reply(r)
	}
	slots := make(chan struct{}, maxInFlight)
	bucket := newTokenBucket(callRate, callBurst)
	d := guestchan.NewDecoder(rw)
	bad := 0
	for {
		req, err := d.ReadRequest()
		if err != nil {
			if !errors.Is(err, guestchan.ErrBadMessage) && !errors.Is(err, guestchan.ErrTooLarge) {
				if ctx.Err() != nil || errors.Is(err, io.EOF) {
					return nil
				}
				return fmt.Errorf("hostd: guest channel of vm %d: %w", g.VMID, err)
			}
			g.count(func(s *ChannelStats) { s.BadMessages++ })
			if bad++; bad > maxBadMessages {
				g.Log.Warn("closing guest channel: too many bad messages", "vm", g.VMID)
				return ErrChannelAbuse
			}
			code := guestchan.CodeBadRequest
			if errors.Is(err, guestchan.ErrTooLarge) {
				code = guestchan.CodeTooLarge
			}
			reply(guestchan.Fail(req.IDOrZero(), code, "%v", err))
			continue
		}
		bad = 0
		if !bucket.take(time.Now()) {
			g.count(func(s *ChannelStats) { s.RateLimited++ })
			reply(guestchan.Fail(req.ID, guestchan.CodeRateLimited, "more than %d calls a second", callRate))
			continue
		}
		select {
		case slots <- struct{}{}:
		default:
			g.count(func(s *ChannelStats) { s.RateLimited++ })
			reply(guestchan.Fail(req.ID, guestchan.CodeRateLimited, "more than %d calls in flight", maxInFlight))
			continue
		}
		g.count(func(s *ChannelStats) { s.Calls++ })
		g.track(req.ID, 1)
		wg.Add(1)
		go func(req *guestchan.Request) {
			defer wg.Done()
			defer func() { <-slots }()
			defer g.track(req.ID, -1)
			resp := g.handle(ctx, req)
			if resp.Error != nil {
				g.count(func(s *ChannelStats) { s.Errors++ })
			}
			reply(resp)
		}(req)
	}
}

func (g *GuestChannel) track(id uint64, n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.inflight == nil {
		g.inflight = map[uint64]int{}
	}
	if g.inflight[id] += n; g.inflight[id] <= 0 {
		delete(g.inflight, id)
	}
}

// othersInFlight lists the calls in flight but id, ascending.
func (g *GuestChannel) othersInFlight(id uint64) []uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []uint64
	for k := range g.inflight {
		if k != id {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// handle answers one call as the channel's VM.
func (g *GuestChannel) handle(ctx context.Context, req *guestchan.Request) *guestchan.Response {
	fail := func(err error) *guestchan.Response {
		var ae *api.Error
		if errors.As(err, &ae) {
			return guestchan.Fail(req.ID, ae.Code, "%s", ae.Message)
		}
		var ge *guestchan.Error
		if errors.As(err, &ge) {
			return &guestchan.Response{V: guestchan.Version, ID: req.ID, Error: ge}
		}
		if errors.Is(err, guestchan.ErrBadMessage) {
			return guestchan.Fail(req.ID, guestchan.CodeBadRequest, "%v", err)
		}
		if errors.Is(err, errNoSnapshots) || errors.Is(err, errNoMemserver) {
			return guestchan.Fail(req.ID, guestchan.CodeUnsupported, "%v", err)
		}
		if c := fsm.Code(err); c != "internal" {
			return guestchan.Fail(req.ID, c, "%v", err)
		}
		return guestchan.Fail(req.ID, guestchan.CodeUnavailable, "%v", err)
	}
	answer := func(v interface{}, err error) *guestchan.Response {
		if err != nil {
			return fail(err)
		}
		resp, err := guestchan.Answer(req.ID, v)
		if err != nil {
			return guestchan.Fail(req.ID, guestchan.CodeInternalHost, "%v", err)
		}
		return resp
	}
	if !guestchan.Known(req.Call) {
		return guestchan.Fail(req.ID, guestchan.CodeUnknownCall, "unknown call %q", req.Call)
	}
	timeout := callTimeout
	if req.Call == guestchan.CallJoin {
		timeout = joinPollTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	switch req.Call {
	case guestchan.CallHello:
		vm, _, err := g.Coord.VM(ctx, g.VMID, nil)
		if err != nil {
			return fail(err)
		}
		return answer(guestchan.Identity{VMID: vm.ID, Role: string(vm.Role), Host: vm.Host, Ticket: vm.Ticket,
			CloneID: vm.CloneID, ParentVM: vm.ParentVM}, nil)
	case guestchan.CallReady:
		if err := req.DecodeArgs(&struct{}{}); err != nil {
			return fail(err)
		}
		if g.OnReady != nil {
			g.OnReady()
		}
		return answer(struct{}{}, nil)
	case guestchan.CallTicket:
		var a guestchan.TicketArgs
		if err := req.DecodeArgs(&a); err != nil {
			return fail(err)
		}
		if a.N < 1 || a.N > fsm.MaxClonesPerTicket {
			return guestchan.Fail(req.ID, "invalid", "n=%d must be 1..%d", a.N, fsm.MaxClonesPerTicket)
		}
		return answer(g.Coord.RequestTicket(ctx, g.VMID, a.N))
	case guestchan.CallTickets:
		if err := req.DecodeArgs(&struct{}{}); err != nil {
			return fail(err)
		}
		ts, _, err := g.Coord.Tickets(ctx, g.VMID, nil)
		if ts == nil {
			ts = []fsm.Ticket{}
		}
		return answer(ts, err)
	case guestchan.CallTicketInfo:
		t, err := g.ownTicket(ctx, req)
		return answer(t, err)
	case guestchan.CallJoin:
		var a guestchan.TicketRef
		if err := req.DecodeArgs(&a); err != nil {
			return fail(err)
		}
		return answer(g.Coord.JoinTicket(ctx, a.Ticket, g.VMID))
	case guestchan.CallKill:
		var a guestchan.TicketRef
		if err := req.DecodeArgs(&a); err != nil {
			return fail(err)
		}
		return answer(g.Coord.KillTicket(ctx, a.Ticket, g.VMID, "killed by its parent"))
	case guestchan.CallExit:
		var a guestchan.ExitArgs
		if err := req.DecodeArgs(&a); err != nil {
			return fail(err)
		}
		if len(a.Result) > fsm.MaxResult {
			return guestchan.Fail(req.ID, "invalid", "result is %d bytes, at most %d", len(a.Result), fsm.MaxResult)
		}
		paused := false
		if g.Pauser != nil {
			if err := g.Pauser.Pause(ctx); err != nil {
				g.Log.Warn("could not pause the VM for its exit", "vm", g.VMID, "error", err)
			} else {
				paused = true
			}
		}
		_, err := g.Coord.SetCloneState(ctx, g.VMID, api.CloneStateRequest{State: fsm.CloneExited, Status: a.Status, Result: a.Result})
		if err != nil && paused && ctx.Err() == nil {
			// Not a clone, or the cluster is unreachable: the guest must
			// run to read why. (A cancelled call means the channel is
			// closing: the exit was recorded and the VM is being destroyed.)
			if rerr := g.Pauser.Resume(context.WithoutCancel(ctx)); rerr != nil {
				g.Log.Warn("could not resume the VM after a failed exit", "vm", g.VMID, "error", rerr)
			}
		}
		// After a recorded exit the VM stays paused until its host
		// destroys it; the guest never reads this answer.
		return answer(struct{}{}, err)
	case guestchan.CallClone:
		var a guestchan.TicketRef
		if err := req.DecodeArgs(&a); err != nil {
			return fail(err)
		}
		if g.Capturer == nil {
			return guestchan.Fail(req.ID, guestchan.CodeUnsupported, "this host cannot clone VMs")
		}
		return answer(g.Capturer.Clone(ctx, g.VMID, a.Ticket, req.ID, g.othersInFlight(req.ID)))
	case guestchan.CallCheckpoint:
		if err := req.DecodeArgs(&struct{}{}); err != nil {
			return fail(err)
		}
		if g.Capturer == nil {
			return guestchan.Fail(req.ID, guestchan.CodeUnsupported, "this host cannot checkpoint VMs")
		}
		return answer(g.Capturer.Checkpoint(ctx, g.VMID, req.ID, g.othersInFlight(req.ID)))
	case guestchan.CallCreateClones:
		var a guestchan.CreateClonesArgs
		if err := req.DecodeArgs(&a); err != nil {
			return fail(err)
		}
		t, err := g.Coord.CreateClones(ctx, a.Ticket, a.Checkpoint, g.VMID)
		if err != nil {
			return fail(err)
		}
		if g.OnCreateClones != nil {
			g.OnCreateClones(t, a.Checkpoint)
		}
		return answer(guestchan.CloneResult{CloneID: 0, Ticket: a.Ticket}, nil)
	}
	return guestchan.Fail(req.ID, guestchan.CodeUnknownCall, "unknown call %q", req.Call)
}

// ownTicket returns a ticket the channel's VM owns; others are refused as
// they would be for join or kill.
func (g *GuestChannel) ownTicket(ctx context.Context, req *guestchan.Request) (fsm.TicketView, error) {
	var a guestchan.TicketRef
	if err := req.DecodeArgs(&a); err != nil {
		return fsm.TicketView{}, err
	}
	t, _, err := g.Coord.Ticket(ctx, a.Ticket, nil)
	if err != nil {
		return t, err
	}
	if t.ParentVM != g.VMID {
		return fsm.TicketView{}, &guestchan.Error{Code: "not_parent", Message: fmt.Sprintf("ticket %d is not this VM's", a.Ticket)}
	}
	return t, nil
}

// tokenBucket is a small rate limiter with an injected clock.
type tokenBucket struct {
	rate, burst float64
	tokens      float64
	last        time.Time
}

func newTokenBucket(rate, burst float64) *tokenBucket {
	return &tokenBucket{rate: rate, burst: burst, tokens: burst}
}

func (b *tokenBucket) take(now time.Time) bool {
	if !b.last.IsZero() {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}
