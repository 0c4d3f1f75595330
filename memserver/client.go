package memserver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Errors returned by the client.
var (
	// ErrUnavailable: the memserver could not be reached, or stopped
	// answering, and the retries are exhausted. The clone must fail.
	ErrUnavailable = errors.New("memserver: unavailable")
	// ErrRefused: the server refused the handshake: unknown snapshot,
	// wrong capability, or a protocol version it does not speak.
	ErrRefused = errors.New("memserver: refused")
	// ErrOutOfRange: a page is beyond the snapshot's size.
	ErrOutOfRange = errors.New("memserver: page beyond the snapshot")
	// ErrReleased: the snapshot was released.
	ErrReleased = errors.New("memserver: snapshot released")
	// ErrPageRead: the server failed to read the snapshot.
	ErrPageRead = errors.New("memserver: server failed to read the snapshot")
	// ErrClosed: the client was closed.
	ErrClosed = errors.New("memserver: client closed")
)

// ClientConfig configures a Client: how it waits and retries. Zero fields
// take their defaults.
//
// A call that cannot get its answers returns ErrUnavailable after
// 1+Retries attempts. Each attempt waits at most Timeout to connect and say
// hello and at most Timeout for each response after the one before, and
// between attempts the client sleeps a backoff that starts at BaseDelay and
// doubles up to MaxDelay (each delay jittered down by up to half, so that
// the clones of a restarted server do not reconnect in step). So a Fetch
// of at most one batch gives up within (1+Retries) x 2 x Timeout plus the
// backoffs: with the defaults, about 3 s if the server's host refuses
// connections and at most about 63 s if it is silent.
type ClientConfig struct {
	Retries   int           // attempts after the first; 0 means 5, negative means none
	BaseDelay time.Duration // default 100 ms
	MaxDelay  time.Duration // default 5 s
	Timeout   time.Duration // default 5 s
	Logger    hclog.Logger  // default discards
	// OnRetry, if set, is called before each backoff with the number of
	// the retry to come (from 1), its delay and the error that caused it.
	// The call waits for it to return.
	OnRetry func(retry int, delay time.Duration, err error)
}

func (cfg ClientConfig) withDefaults() ClientConfig {
	if cfg.Retries == 0 {
		cfg.Retries = 5
	}
	if cfg.Retries < 0 {
		cfg.Retries = 0
	}
	if cfg.BaseDelay <= 0 {
		cfg.BaseDelay = 100 * time.Millisecond
	}
	if cfg.MaxDelay <= 0 {
		cfg.MaxDelay = 5 * time.Second
	}
	cfg.MaxDelay = max(cfg.MaxDelay, cfg.BaseDelay)
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return cfg
}

// backoff is the delay before retry n (from 1): BaseDelay doubled n-1
// times, at most MaxDelay, jittered into (d/2, d].
func (cfg ClientConfig) backoff(n int) time.Duration {
	d := cfg.MaxDelay
	if n-1 < 32 {
		d = min(cfg.BaseDelay<<(n-1), cfg.MaxDelay)
	}
	if d <= 0 { // shift overflow
		d = cfg.MaxDelay
	}
	half := d / 2
	return d - time.Duration(rand.Int64N(int64(half)+1))
}

// Page is one page of a snapshot.
type Page struct {
	Num  uint64
	Zero bool   // the page is all zeros; Data is nil
	Data []byte // PageSize bytes, owned by the caller
}

// Client fetches pages of one snapshot from a memserver. It is safe for
// concurrent use: concurrent Fetches share one connection, their requests
// pipelined.
type Client struct {
	cfg        ClientConfig
	log        hclog.Logger
	addr       string
	snapshotID string
	capability Capability
	nextID     atomic.Uint64

	done chan struct{} // closed by Close
	wg   sync.WaitGroup

	mu      sync.Mutex
	cur     *clientConn
	dialing chan struct{} // closed when the dial in progress ends
	dialErr error         // of the last dial
	closed  bool
}

// Dial connects to the memserver at addr for a snapshot, with the default
// ClientConfig.
func Dial(ctx context.Context, addr, snapshotID string, capability Capability) (*Client, error) {
	return ClientConfig{}.Dial(ctx, addr, snapshotID, capability)
}

// Dial connects to the memserver at addr for a snapshot, retrying as cfg
// says. It returns an error wrapping ErrRefused if the server refuses the
// snapshot or the capability, and ErrUnavailable if it cannot be reached.
func (cfg ClientConfig) Dial(ctx context.Context, addr, snapshotID string, capability Capability) (*Client, error) {
	if !validID(snapshotID) {
		return nil, fmt.Errorf("memserver: invalid snapshot ID %q", snapshotID)
	}
	cfg = cfg.withDefaults()
	c := &Client{
		cfg:        cfg,
		log:        cfg.Logger.With("memserver", addr, "snapshot", snapshotID),
		addr:       addr,
		snapshotID: snapshotID,
		capability: capability,
		done:       make(chan struct{}),
	}
	if err := c.retry(ctx, func(*clientConn) error { return nil }); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection and waits for the client's goroutine. Calls
// in progress return ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.done)
	cc := c.cur
	c.mu.Unlock()
	if cc != nil {
		cc.fail(ErrClosed)
	}
	c.wg.Wait()
	return nil
}

// Fetch returns the pages, in the order asked for. Pages may repeat. A
// connection failure is retried (only the requests not yet answered are
// sent again); see ClientConfig for the bound on the time it takes to give
// up with ErrUnavailable. A page beyond the snapshot fails the call with
// ErrOutOfRange.
func (c *Client) Fetch(ctx context.Context, pages []uint64) ([]Page, error) {
	if len(pages) == 0 {
		return nil, nil
	}
	out := make([]Page, len(pages))
	todo := []span{{0, len(pages)}}
	err := c.retry(ctx, func(cc *clientConn) error {
		var err error
		todo, err = cc.fetch(ctx, pages, todo, out)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// connError is a failure of the connection, which a new one may cure.
type connError struct{ err error }

func (e *connError) Error() string { return e.err.Error() }
func (e *connError) Unwrap() error { return e.err }

// retry runs op on a live connection, reconnecting with backoff when the
// connection fails, until op succeeds, fails otherwise, or the retries are
// exhausted.
func (c *Client) retry(ctx context.Context, op func(*clientConn) error) error {
	for n := 0; ; n++ {
		cc, err := c.conn(ctx)
		if err == nil {
			err = op(cc)
		}
		var ce *connError
		if err == nil || !errors.As(err, &ce) {
			return err
		}
		if errors.Is(err, ErrClosed) {
			return ErrClosed
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if n >= c.cfg.Retries {
			c.log.Error("memserver unavailable", "attempts", n+1, "error", ce.err)
			return fmt.Errorf("%w: %s after %d attempts: %v", ErrUnavailable, c.addr, n+1, ce.err)
		}
		delay := c.cfg.backoff(n + 1)
		c.log.Warn("memserver connection failed, retrying", "retry", n+1, "delay", delay, "error", ce.err)
		if c.cfg.OnRetry != nil {
			c.cfg.OnRetry(n+1, delay, err)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-c.done:
			t.Stop()
			return ErrClosed
		}
	}
}

// conn returns the live connection, dialing one if there is none. Callers
// that find a dial in progress wait for it rather than dial too.
func (c *Client) conn(ctx context.Context) (*clientConn, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if cc := c.cur; cc != nil && cc.alive() {
			c.mu.Unlock()
			return cc, nil
		}
		if ch := c.dialing; ch != nil {
			c.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			c.mu.Lock()
			cc, err := c.cur, c.dialErr
			c.mu.Unlock()
			switch {
			case cc != nil && cc.alive():
				return cc, nil
			case err != nil && err != context.Canceled && err != context.DeadlineExceeded:
				// That dial's failure counts as this caller's attempt. One
				// cut short by its own caller's context (dial returns the
				// context's error as is) says nothing: dial anew.
				return nil, err
			}
			continue
		}
		ch := make(chan struct{})
		c.dialing = ch
		c.mu.Unlock()

		cc, err := c.dial(ctx)
		c.mu.Lock()
		c.dialing, c.dialErr = nil, err
		if err == nil {
			if c.closed {
				cc.nc.Close()
				cc, err = nil, ErrClosed
			} else {
				c.cur = cc
				c.wg.Add(1)
				go cc.readLoop()
			}
		}
		close(ch)
		c.mu.Unlock()
		return cc, err
	}
}

// dial connects and runs the handshake. Network failures are connErrors; a
// refusal is not, since trying again would not change it.
func (c *Client) dial(ctx context.Context) (*clientConn, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Timeout)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, ctx.Err()
		}
		return nil, &connError{err}
	}
	deadline, _ := ctx.Deadline()
	nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	a, sess, err := c.handshake(nc)
	if !stop() && err == nil {
		err = &connError{ctx.Err()}
	}
	if err != nil {
		nc.Close()
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, ctx.Err()
		}
		return nil, err
	}
	nc.SetDeadline(time.Time{})
	c.log.Debug("connected", "max_batch", a.maxBatch, "pages", a.pages)
	return &clientConn{
		c:        c,
		nc:       nc,
		maxBatch: int(a.maxBatch),
		pages:    a.pages,
		open:     sess.open,
		seal:     sess.seal,
		pending:  map[uint64]*call{},
		dead:     make(chan struct{}),
	}, nil
}

// clientConn is one connection of a Client. Requests are sealed and
// written whole under wmu; one goroutine reads the responses, opens them
// and hands each to its call.
type clientConn struct {
	c        *Client
	nc       net.Conn
	maxBatch int
	pages    uint64
	open     *opener // the read loop's

	wmu  sync.Mutex
	seal *sealer
	wbuf []byte // frames being sealed and written

	mu      sync.Mutex
	pending map[uint64]*call
	err     error         // why the connection failed
	dead    chan struct{} // closed when it fails
}

// call is a request waiting for its response.
type call struct {
	req  request
	n    int // pages asked for
	resp response
	err  error
	done chan struct{}
}

func (cc *clientConn) alive() bool {
	select {
	case <-cc.dead:
		return false
	default:
		return true
	}
}

// fail ends the connection: every pending call fails with a connError.
func (cc *clientConn) fail(err error) {
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		return
	}
	cc.err = err
	pending := cc.pending
	cc.pending = nil
	close(cc.dead)
	cc.mu.Unlock()
	cc.nc.Close()
	for _, cl := range pending {
		cl.err = &connError{err}
		close(cl.done)
	}
}

func (cc *clientConn) readLoop() {
	defer cc.c.wg.Done()
	br := bufio.NewReaderSize(cc.nc, 64<<10)
	limit := maxResponseFrame(cc.maxBatch)
	for {
		// A fresh buffer for each frame: the pages handed to the caller
		// alias it, decrypted in place.
		typ, body, err := readFrame(br, limit, nil)
		if err == nil {
			body, err = cc.open.open(typ, body)
		}
		if err == nil && typ != frameResponse {
			err = protocolError("frame type %d instead of a response", typ)
		}
		var r response
		if err == nil {
			r, err = decodeResponse(body)
		}
		if err != nil {
			cc.fail(err)
			return
		}
		cc.mu.Lock()
		cl := cc.pending[r.id]
		delete(cc.pending, r.id)
		cc.mu.Unlock()
		if cl == nil {
			continue // its caller gave up
		}
		if r.status == statusOK && len(r.kinds) != cl.n {
			err := protocolError("response %d has %d pages, asked for %d", r.id, len(r.kinds), cl.n)
			cl.err = &connError{err}
			close(cl.done)
			cc.fail(err)
			return
		}
		cl.resp = r
		close(cl.done)
	}
}

// span is the pages[lo:hi] of a Fetch.
type span struct{ lo, hi int }

// fetch sends a request for each batch of the spans, all at once, and
// fills out as responses come. It returns the spans still to do and, if
// some failed, why.
func (cc *clientConn) fetch(ctx context.Context, pages []uint64, todo []span, out []Page) ([]span, error) {
	var calls []*call
	var chunks []span
	for _, sp := range todo {
		for lo := sp.lo; lo < sp.hi; lo += cc.maxBatch {
			ch := span{lo, min(lo+cc.maxBatch, sp.hi)}
			req := request{id: cc.c.nextID.Add(1), ranges: toRanges(pages[ch.lo:ch.hi])}
			calls = append(calls, &call{req: req, n: ch.hi - ch.lo, done: make(chan struct{})})
			chunks = append(chunks, ch)
		}
	}
	if err := cc.send(calls); err != nil {
		return todo, err
	}

	var failed []span
	var connErr error
	timer := time.NewTimer(cc.c.cfg.Timeout)
	defer timer.Stop()
	for i, cl := range calls {
		// Each response may take up to Timeout after the one before it, so
		// a long Fetch is bounded by progress, not by its total size.
		timer.Reset(cc.c.cfg.Timeout)
		select {
		case <-cl.done:
		case <-ctx.Done():
			cc.forget(calls[i:])
			return todo, ctx.Err()
		case <-timer.C:
			cc.fail(fmt.Errorf("no response within %v", cc.c.cfg.Timeout))
			<-cl.done
		}
		if cl.err != nil {
			failed, connErr = append(failed, chunks[i]), cl.err
			continue
		}
		if err := cl.resp.statusError(cc.c.snapshotID); err != nil {
			cc.forget(calls[i+1:])
			return todo, err
		}
		fill(out[chunks[i].lo:chunks[i].hi], pages[chunks[i].lo:chunks[i].hi], cl.resp)
	}
	return failed, connErr
}

// maxKeptWriteBuffer is the largest write buffer a connection keeps for its
// next send.
const maxKeptWriteBuffer = 64 << 10

// send registers the calls, and seals and writes their requests at once.
func (cc *clientConn) send(calls []*call) error {
	cc.mu.Lock()
	if cc.err != nil {
		err := cc.err
		cc.mu.Unlock()
		return &connError{err}
	}
	for _, cl := range calls {
		cc.pending[cl.req.id] = cl
	}
	cc.mu.Unlock()

	cc.wmu.Lock()
	defer cc.wmu.Unlock()
	b := cc.wbuf[:0]
	var err error
	for _, cl := range calls {
		start := len(b)
		if b, err = cc.seal.seal(appendRequest(b, cl.req), start); err != nil {
			break
		}
	}
	if cap(b) <= maxKeptWriteBuffer {
		cc.wbuf = b[:0]
	}
	if err == nil {
		cc.nc.SetWriteDeadline(time.Now().Add(cc.c.cfg.Timeout))
		_, err = cc.nc.Write(b)
	}
	if err != nil {
		// The calls now fail as the connection's did (to be retried on a
		// new connection); the caller waits for that.
		cc.fail(err)
	}
	return nil
}

// forget drops calls whose caller gives up; their responses are discarded.
func (cc *clientConn) forget(calls []*call) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	for _, cl := range calls {
		delete(cc.pending, cl.req.id)
	}
}

// statusError is the error an error response stands for.
func (r response) statusError(snapshotID string) error {
	switch r.status {
	case statusOK:
		return nil
	case statusOutOfRange:
		return fmt.Errorf("%w: %s", ErrOutOfRange, r.message)
	case statusReleased:
		return fmt.Errorf("%w: %s", ErrReleased, snapshotID)
	default:
		return fmt.Errorf("%w: %s", ErrPageRead, r.message)
	}
}

// toRanges turns page numbers into ranges of consecutive pages.
func toRanges(pages []uint64) []pageRange {
	var rs []pageRange
	for _, p := range pages {
		if n := len(rs); n > 0 && p != 0 && rs[n-1].first+uint64(rs[n-1].count) == p && rs[n-1].count < 1<<31 {
			rs[n-1].count++
			continue
		}
		rs = append(rs, pageRange{first: p, count: 1})
	}
	return rs
}

// fill sets out from an ok response to a request for pages.
func fill(out []Page, pages []uint64, r response) {
	data := r.data
	for i, k := range r.kinds {
		out[i].Num = pages[i]
		if k == kindZero {
			out[i].Zero = true
			continue
		}
		out[i].Data = data[:PageSize:PageSize]
		data = data[PageSize:]
	}
}
