package xenchan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// Guest is the guest's end of its channel, over the guest's own xenstore
// connection (xenstore.OpenDevice on /dev/xen/xenbus): an
// io.ReadWriteCloser carrying guestchan lines, for guest.NewMux.
//
// Every path it uses is relative, so it names no domain ID and keeps
// working in a restored clone, whose xenstore connection belongs to a new
// domain. It notices a new domain by its epoch: then it delivers the
// answers the host left for it (a clone's greeting) and fails the calls
// whose requests stayed in the old domain with CodeInterrupted, since
// nobody in the new domain knows of them.
type Guest struct {
	st     Store
	events <-chan xenstore.Event
	stopW  func()

	lines chan []byte
	q     lineQueue

	wmu sync.Mutex
	wb  lineBuffer

	mu          sync.Mutex
	epoch       string          // the epoch the channel was last seen with
	outstanding map[uint64]bool // calls written and not answered
	delivered   map[uint64]bool // answered; resp/<id> not yet removed by the host
	err         error

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// OpenGuest opens the channel over xs, a connection of the guest's own.
func OpenGuest(ctx context.Context, xs *xenstore.Client) (*Guest, error) {
	w, err := xs.Watch(ctx, HostDir)
	if err != nil {
		return nil, fmt.Errorf("xenchan: watching the host's area: %w", err)
	}
	g := newGuest(xs, w.Events(), func() {
		sctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		w.Stop(sctx)
	})
	epoch, err := g.readEpoch(ctx)
	if err != nil {
		g.stopW()
		return nil, err
	}
	g.epoch = epoch
	go g.run()
	return g, nil
}

func newGuest(st Store, events <-chan xenstore.Event, stop func()) *Guest {
	g := &Guest{
		st:          st,
		events:      events,
		stopW:       stop,
		lines:       make(chan []byte, readQueue),
		outstanding: map[uint64]bool{},
		delivered:   map[uint64]bool{},
		done:        make(chan struct{}),
	}
	g.ctx, g.cancel = context.WithCancel(context.Background())
	return g
}

// Identity reads the identity the host wrote for this domain.
func (g *Guest) Identity(ctx context.Context) (guestchan.Identity, error) {
	var id guestchan.Identity
	b, err := g.st.Read(ctx, IdentityNode)
	if err != nil {
		return id, fmt.Errorf("xenchan: identity: %w", err)
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return id, fmt.Errorf("xenchan: identity: %w", err)
	}
	return id, nil
}

// Epoch is the epoch the channel was last seen with ("" before the host
// has written one).
func (g *Guest) Epoch() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.epoch
}

func (g *Guest) readEpoch(ctx context.Context) (string, error) {
	b, err := g.st.Read(ctx, EpochNode)
	if errors.Is(err, xenstore.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("xenchan: epoch: %w", err)
	}
	return string(b), nil
}

func (g *Guest) run() {
	defer close(g.done)
	for {
		select {
		case <-g.ctx.Done():
			return
		case _, ok := <-g.events:
			if !ok {
				g.fail(fmt.Errorf("%w: the watch on the host's area ended", ErrClosed))
				return
			}
		}
		if err := g.scan(g.ctx); err != nil && g.ctx.Err() == nil {
			// A transient failure; the next event scans again.
			continue
		}
	}
}

func (g *Guest) fail(err error) {
	g.mu.Lock()
	if g.err == nil {
		g.err = err
	}
	g.mu.Unlock()
	g.cancel()
}

// scan delivers complete answers and, when the epoch changed, interrupts
// the calls the new domain cannot answer.
func (g *Guest) scan(ctx context.Context) error {
	epoch, err := g.readEpoch(ctx)
	if err != nil {
		return err
	}
	g.mu.Lock()
	replaced := g.epoch != "" && epoch != g.epoch
	g.mu.Unlock()

	ids, err := g.st.Directory(ctx, RespDir)
	if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
		return err
	}
	present := map[uint64]bool{}
	for _, name := range ids {
		id, ok := parseID(name)
		if !ok {
			continue
		}
		present[id] = true
		g.mu.Lock()
		seen := g.delivered[id]
		g.mu.Unlock()
		if seen {
			continue
		}
		line, complete, err := readMessage(ctx, g.st, fmt.Sprintf("%s/%d", RespDir, id))
		if err != nil && !errors.Is(err, ErrBadFrame) {
			return err
		}
		if !complete {
			continue
		}
		if err != nil {
			line, _ = json.Marshal(guestchan.Fail(id, guestchan.CodeInternalHost, "%v", err))
		}
		if err := g.deliver(ctx, line); err != nil {
			return err
		}
		if err := g.st.Write(ctx, fmt.Sprintf("%s/%d", DoneDir, id), nil); err != nil {
			return err
		}
		g.mu.Lock()
		g.delivered[id] = true
		delete(g.outstanding, id)
		g.mu.Unlock()
	}

	g.mu.Lock()
	for id := range g.delivered {
		if !present[id] {
			delete(g.delivered, id) // the host removed it
		}
	}
	g.mu.Unlock()
	var lost []uint64
	if replaced {
		if lost, err = g.lostCalls(ctx); err != nil {
			return err // the epoch stays: the next scan tries again
		}
	}
	g.mu.Lock()
	g.epoch = epoch
	g.mu.Unlock()
	for _, id := range lost {
		line, _ := json.Marshal(guestchan.Fail(id, guestchan.CodeInterrupted,
			"the call was in flight when this VM was cloned or restored; its answer went to the original"))
		if err := g.deliver(ctx, line); err != nil {
			return err
		}
	}
	return nil
}

// lostCalls finds, in a new domain, the outstanding calls whose request
// is not there: written in the old domain, they will never be answered.
// It removes them from the outstanding calls and returns them. Calls made
// since the guest resumed are in the new domain, as a request or as the
// host's resp/<id>: the guest may call again the moment its greeting
// arrives, before this scan ends (a real clone did). The host writes
// resp/<id> before it removes req/<id>, so looking at req, then resp,
// cannot miss a request. Writes wait meanwhile, so that no request is
// between its first node and its count.
func (g *Guest) lostCalls(ctx context.Context) ([]uint64, error) {
	g.wmu.Lock()
	defer g.wmu.Unlock()
	g.mu.Lock()
	ids := make([]uint64, 0, len(g.outstanding))
	for id := range g.outstanding {
		ids = append(ids, id)
	}
	g.mu.Unlock()
	var lost []uint64
	for _, id := range ids {
		here := false
		for _, p := range []string{fmt.Sprintf("%s/%d/n", ReqDir, id), fmt.Sprintf("%s/%d", RespDir, id)} {
			_, err := g.st.Read(ctx, p)
			if err == nil {
				here = true
				break
			}
			if !errors.Is(err, xenstore.ErrNotFound) {
				return nil, err
			}
		}
		if !here {
			lost = append(lost, id)
		}
	}
	g.mu.Lock()
	for _, id := range lost {
		delete(g.outstanding, id)
	}
	g.mu.Unlock()
	return lost, nil
}

func (g *Guest) deliver(ctx context.Context, line []byte) error {
	select {
	case g.lines <- line:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Read returns answer lines, newline-terminated.
func (g *Guest) Read(p []byte) (int, error) {
	if g.q.rest != nil {
		return g.q.fill(p, nil), nil
	}
	select {
	case line := <-g.lines:
		return g.q.fill(p, line), nil
	case <-g.ctx.Done():
	}
	select {
	case line := <-g.lines:
		return g.q.fill(p, line), nil
	default:
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.err != nil {
		return 0, g.err
	}
	return 0, io.EOF
}

// Write sends request lines; each is stored under its call's req/<id>.
func (g *Guest) Write(p []byte) (int, error) {
	g.wmu.Lock()
	defer g.wmu.Unlock()
	if g.ctx.Err() != nil {
		return 0, ErrClosed
	}
	lines, err := g.wb.add(p)
	if err != nil {
		return 0, err
	}
	for _, line := range lines {
		id, err := lineID(line)
		if err == nil && id == 0 {
			err = fmt.Errorf("%w: request without a call ID", guestchan.ErrBadMessage)
		}
		if err != nil {
			return 0, err
		}
		g.mu.Lock()
		g.outstanding[id] = true
		g.mu.Unlock()
		ctx, cancel := context.WithTimeout(g.ctx, opTimeout)
		err = writeMessage(ctx, g.st, fmt.Sprintf("%s/%d", ReqDir, id), line)
		cancel()
		if err != nil {
			g.mu.Lock()
			delete(g.outstanding, id)
			g.mu.Unlock()
			// Chunks without their count node would stay forever.
			ctx, cancel := context.WithTimeout(context.WithoutCancel(g.ctx), opTimeout)
			g.st.Rm(ctx, fmt.Sprintf("%s/%d", ReqDir, id))
			cancel()
			return 0, fmt.Errorf("xenchan: request %d: %w", id, err)
		}
	}
	return len(p), nil
}

// Close stops the channel end; Read returns io.EOF.
func (g *Guest) Close() error {
	g.cancel()
	g.stopW()
	<-g.done
	return nil
}
