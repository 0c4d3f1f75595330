// Package qmp is a client for the QEMU Machine Protocol over a unix socket.
//
// Dial connects, reads QEMU's greeting and leaves capabilities negotiation
// with qmp_capabilities, after which the connection is in command mode. One
// goroutine owned by the Client reads every line QEMU sends: a response is
// handed to the Execute call waiting for its id, an event is put on the
// Events channel and on any Subscription that wants it. The reader never
// blocks on a slow consumer: event buffers are bounded and drop their oldest
// event when full, counting the loss.
//
// QEMU's output is treated as untrusted (a guest can influence some of it):
// lines are bounded by MaxLineSize and the decoder is fuzzed.
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// EventBuffer is the capacity of the Events channel and of each
// Subscription's channel.
const EventBuffer = 256

// Greeting is what QEMU announces when a client connects.
type Greeting struct {
	Major, Minor, Micro int    // QEMU version
	Package             string // distribution build, e.g. "Debian 1:7.2+dfsg-7+deb12u18"
	Capabilities        []string
}

// Client is a QMP connection. Its methods are safe for concurrent use.
type Client struct {
	conn     net.Conn
	greeting Greeting

	wmu sync.Mutex // serialises writes of whole requests

	mu       sync.Mutex
	nextID   uint64
	pending  map[uint64]chan<- response
	subs     map[*Subscription]struct{}
	err      error // why the connection ended; set once, under mu
	writeErr error // the write failure that ended it, if one did

	events    chan Event
	dropped   atomic.Uint64
	malformed atomic.Uint64

	closing   atomic.Bool
	readerEnd chan struct{} // closed when the reader goroutine has returned
}

type response struct {
	ret json.RawMessage
	err error
}

type request struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
	ID        uint64          `json:"id"`
}

// Dial connects to the QMP socket at path and negotiates capabilities. ctx
// bounds the connection and the handshake only.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial %s: %w", path, err)
	}
	c, err := NewClient(ctx, conn)
	if err != nil {
		return nil, fmt.Errorf("qmp: %s: %w", path, err)
	}
	return c, nil
}

// NewClient performs the QMP handshake on an established connection and
// returns a Client that owns conn. ctx bounds the handshake only. On error
// conn is closed.
func NewClient(ctx context.Context, conn net.Conn) (*Client, error) {
	// The handshake runs before the reader exists: read and write directly,
	// with ctx cancelling both through the connection's deadline.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	lr := newLineReader(conn, MaxLineSize)
	g, err := handshake(conn, lr)
	if !stop() || ctx.Err() != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp handshake: %w", context.Cause(ctx))
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp handshake: %w", err)
	}
	conn.SetDeadline(time.Time{})

	c := &Client{
		conn:      conn,
		greeting:  g,
		pending:   make(map[uint64]chan<- response),
		subs:      make(map[*Subscription]struct{}),
		events:    make(chan Event, EventBuffer),
		readerEnd: make(chan struct{}),
	}
	go c.read(lr)
	return c, nil
}

func handshake(conn net.Conn, lr *lineReader) (Greeting, error) {
	line, err := lr.next()
	if err != nil {
		return Greeting{}, fmt.Errorf("reading greeting: %w", err)
	}
	m, err := decodeMessage(line)
	if err != nil {
		return Greeting{}, fmt.Errorf("greeting: %w", err)
	}
	if m.kind != kindGreeting {
		return Greeting{}, errors.New("first message is not a QMP greeting")
	}
	if _, err := conn.Write([]byte(`{"execute":"qmp_capabilities","id":0}` + "\n")); err != nil {
		return Greeting{}, fmt.Errorf("sending qmp_capabilities: %w", err)
	}
	// Events may come before the reply; none matter before the client exists.
	for {
		line, err := lr.next()
		if err != nil {
			return Greeting{}, fmt.Errorf("reading qmp_capabilities reply: %w", err)
		}
		r, err := decodeMessage(line)
		if err != nil || r.kind != kindResponse {
			continue
		}
		if r.err != nil {
			r.err.Command = "qmp_capabilities"
			return Greeting{}, r.err
		}
		return m.greeting, nil
	}
}

// Greeting returns what QEMU announced on connection.
func (c *Client) Greeting() Greeting { return c.greeting }

// Execute runs command with args (marshalled to a JSON object, or nil for
// none) and unmarshals QEMU's return value into result (nil to discard it).
// A QEMU error response is returned as an *Error. If ctx ends first Execute
// returns ctx's error; QEMU may still run the command.
func (c *Client) Execute(ctx context.Context, command string, args any, result any) error {
	return c.execute(ctx, command, args, result, nil)
}

// execute is Execute sending oob (SCM_RIGHTS ancillary data, see GetFD) with
// the request's bytes; nil oob sends none.
func (c *Client) execute(ctx context.Context, command string, args any, result any, oob []byte) error {
	if command == "" {
		return errors.New("qmp: empty command name")
	}
	req := request{Execute: command}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("qmp: %s: encoding arguments: %w", command, err)
		}
		if string(raw) != "null" {
			req.Arguments = raw
		}
	}

	reply := make(chan response, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.nextID++
	req.ID = c.nextID
	c.pending[req.ID] = reply
	c.mu.Unlock()

	buf, err := json.Marshal(req)
	if err == nil {
		err = c.write(ctx, append(buf, '\n'), oob)
	}
	if errors.Is(err, errBroken) {
		// The connection is closed: the reader is about to fail every
		// pending call, this one included, with the connection's error.
		r := <-reply
		return fmt.Errorf("qmp: %s: %w", command, r.err)
	}
	if err != nil {
		c.forget(req.ID)
		return fmt.Errorf("qmp: %s: %w", command, err)
	}

	select {
	case r := <-reply:
		if r.err != nil {
			var qe *Error
			if errors.As(r.err, &qe) {
				qe.Command = command
				return qe
			}
			return fmt.Errorf("qmp: %s: %w", command, r.err)
		}
		if result == nil {
			return nil
		}
		if err := json.Unmarshal(r.ret, result); err != nil {
			return fmt.Errorf("qmp: %s: decoding reply: %w", command, err)
		}
		return nil
	case <-ctx.Done():
		c.forget(req.ID)
		return fmt.Errorf("qmp: %s: %w", command, context.Cause(ctx))
	}
}

// errBroken reports that a write failed in a way that ended the connection.
var errBroken = errors.New("connection broken")

// write sends one request. It returns ctx's error if ctx ended before
// anything was sent, leaving the connection usable. Any other failure,
// including a cancellation after part of the request went out (the stream
// is then unparseable), ends the connection and returns errBroken.
func (c *Client) write(ctx context.Context, buf, oob []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetWriteDeadline(time.Unix(1, 0))
		close(fired)
	})
	n, err := c.writeMsg(buf, oob)
	cancelled := !stop()
	if cancelled {
		<-fired // the deadline is set: clear it for the next writer
		c.conn.SetWriteDeadline(time.Time{})
	}
	switch {
	case err == nil:
		return nil
	case cancelled && n == 0:
		return context.Cause(ctx)
	default:
		c.mu.Lock()
		if c.writeErr == nil {
			c.writeErr = fmt.Errorf("write: %w", err)
		}
		c.mu.Unlock()
		c.conn.Close() // the reader stops and fails every pending call
		return errBroken
	}
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// read is the reader goroutine: it owns lr and runs until the connection
// ends.
func (c *Client) read(lr *lineReader) {
	defer close(c.readerEnd)
	var cause error
	for {
		line, err := lr.next()
		if err != nil {
			cause = err
			break
		}
		m, err := decodeMessage(line)
		if err != nil {
			// Lines are independent and responses carry ids, so skipping
			// one cannot misroute the others.
			c.malformed.Add(1)
			continue
		}
		switch m.kind {
		case kindResponse:
			c.deliverResponse(m)
		case kindEvent:
			c.deliverEvent(m.event)
		}
	}
	c.shutdown(cause)
}

func (c *Client) deliverResponse(m message) {
	if !m.hasID {
		c.malformed.Add(1)
		return
	}
	c.mu.Lock()
	reply, ok := c.pending[m.id]
	delete(c.pending, m.id)
	c.mu.Unlock()
	if !ok {
		return // its caller gave up
	}
	if m.err != nil {
		reply <- response{err: m.err}
	} else {
		reply <- response{ret: m.ret}
	}
}

func (c *Client) deliverEvent(ev Event) {
	if pushDropOldest(c.events, ev) {
		c.dropped.Add(1)
	}
	c.mu.Lock()
	for s := range c.subs {
		if s.wants(ev.Name) && pushDropOldest(s.ch, ev) {
			s.dropped.Add(1)
		}
	}
	c.mu.Unlock()
}

// pushDropOldest sends ev on ch, first discarding the oldest buffered event
// if ch is full. It never blocks, provided the caller is ch's only sender.
// It reports whether an event was discarded.
func pushDropOldest(ch chan Event, ev Event) (dropped bool) {
	for {
		select {
		case ch <- ev:
			return dropped
		default:
		}
		select {
		case <-ch:
			dropped = true
		default:
		}
	}
}

// shutdown records why the connection ended and fails everything waiting.
func (c *Client) shutdown(cause error) {
	c.conn.Close()
	c.mu.Lock()
	var err error
	switch {
	case c.closing.Load():
		err = ErrClosed
	case c.writeErr != nil:
		err = fmt.Errorf("%w: %w", ErrDisconnected, c.writeErr)
	default:
		err = fmt.Errorf("%w: %w", ErrDisconnected, cause)
	}
	c.err = err
	for id, reply := range c.pending {
		reply <- response{err: err}
		delete(c.pending, id)
	}
	for s := range c.subs {
		close(s.ch)
		delete(c.subs, s)
	}
	c.mu.Unlock()
	close(c.events)
}

// Close ends the connection and waits for the reader to stop. Pending and
// later calls fail with ErrClosed.
func (c *Client) Close() error {
	c.closing.Store(true)
	err := c.conn.Close()
	<-c.readerEnd
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// Done is closed when the connection has ended, by Close or by loss.
func (c *Client) Done() <-chan struct{} { return c.readerEnd }

// Err returns why the connection ended (wrapping ErrDisconnected or
// ErrClosed), or nil while it is up.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Events returns every event QEMU sends, in order, until the connection ends,
// when the channel is closed. It holds EventBuffer events; when nobody reads
// it the oldest are dropped (see DroppedEvents), so a client that does not
// care about events need not drain it.
func (c *Client) Events() <-chan Event { return c.events }

// DroppedEvents is the number of events discarded from the Events channel
// because it was full.
func (c *Client) DroppedEvents() uint64 { return c.dropped.Load() }

// MalformedMessages is the number of lines from QEMU that were skipped
// because they did not decode, or were responses without a usable id.
func (c *Client) MalformedMessages() uint64 { return c.malformed.Load() }
