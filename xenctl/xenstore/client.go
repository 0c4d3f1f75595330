package xenstore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Where xenstored listens and where Linux exposes the kernel's xenstore
// connection, in the order Dial tries them. XENSTORED_PATH, if set, comes
// first, as in libxenstore.
var (
	SocketPaths = []string{"/run/xenstored/socket", "/var/run/xenstored/socket"}
	DevicePaths = []string{"/dev/xen/xenbus", "/proc/xen/xenbus"}
)

// ErrClosed is returned by calls on a client whose connection has closed,
// by Close or by a failure (which it wraps).
var ErrClosed = errors.New("xenstore: connection closed")

// Client is a connection to xenstored. Its methods are safe for
// concurrent use: requests are numbered and may overlap, and each reply is
// matched to its request by ID.
//
// One goroutine, owned by the client, reads replies and watch events;
// Close stops it. Every call takes a context: a call abandoned by its
// context leaves its request to xenstored, whose late reply is discarded
// (a transaction started that way is aborted when its ID arrives).
type Client struct {
	conn       io.ReadWriteCloser
	payloadMax int
	// slot, when set, admits one request at a time, from its write until
	// its reply: see OpenDevice.
	slot chan struct{}

	wmu sync.Mutex // serialises writes: one message per Write

	mu        sync.Mutex
	nextReq   uint32
	pending   map[uint32]*call
	watches   map[string]*Watch // by token
	nextWatch uint64
	err       error // why the connection is gone; nil while it is up
	closing   bool

	bg   sync.WaitGroup // aborts of abandoned transactions
	done chan struct{}  // closed when the reader has exited
}

type call struct {
	op        Op
	reply     chan *Message // buffered; closed when the connection fails
	abandoned bool          // its caller left; drop or undo the reply
	slot      bool          // it holds the client's slot until it leaves pending
}

// NewClient runs the protocol over conn, which must carry xenstore
// messages both ways (a socket to xenstored, or any byte stream that
// forwards to one). The client owns conn and closes it.
func NewClient(conn io.ReadWriteCloser) *Client { return newClient(conn, PayloadMax, false) }

func newClient(conn io.ReadWriteCloser, payloadMax int, oneAtATime bool) *Client {
	c := &Client{
		conn:       conn,
		payloadMax: payloadMax,
		pending:    map[uint32]*call{},
		watches:    map[string]*Watch{},
		done:       make(chan struct{}),
	}
	if oneAtATime {
		c.slot = make(chan struct{}, 1)
	}
	go c.read()
	return c
}

// DialUnix connects to xenstored's unix socket (dom0 only).
//
// xenstored listens with a backlog of one and accepts one connection per
// turn of its loop, so a connect racing another one finds the backlog
// full; Go's non-blocking connect then fails with EAGAIN where
// libxenstore's blocking one would wait. DialUnix waits too: it retries
// EAGAIN until ctx ends.
func DialUnix(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	pause := 100 * time.Microsecond
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			return NewClient(conn), nil
		}
		if !errors.Is(err, syscall.EAGAIN) {
			return nil, fmt.Errorf("xenstore: %w", err)
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return nil, fmt.Errorf("xenstore: %w (%w)", err, ctx.Err())
		}
		pause = min(2*pause, 20*time.Millisecond)
	}
}

// OpenDevice opens Linux's xenbus device (/dev/xen/xenbus, from the
// xen-xenbus driver or xenfs), the kernel's own connection to xenstore as
// a character device speaking the same protocol: the way a guest reaches
// xenstore. The kernel relays requests, registers watches on the caller's
// behalf (and registers them again after the domain is restored), and
// accepts at most DevicePayloadMax bytes of payload.
//
// The client sends one request at a time through the device and waits for
// its reply before the next, as libxenstore does: Linux queues a request
// to the xenstore ring with its payload still in the open file's message
// buffer, which the next write() overwrites, so a second request written
// before the first is on the ring corrupts it
// (drivers/xen/xenbus/xenbus_dev_frontend.c, xenbus_write_transaction;
// xenbus_xs.c, xenbus_dev_request_and_reply). On real Xen that turned a
// guest's write of its own node into a write of another path, refused
// with EACCES.
func OpenDevice(path string) (*Client, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("xenstore: %w", err)
	}
	return newClient(f, DevicePayloadMax, true), nil
}

// Dial connects to xenstore the way libxenstore does: XENSTORED_PATH if
// set (a socket or a device), else the first of SocketPaths that is a
// socket, else the first of DevicePaths that is a character device.
func Dial(ctx context.Context) (*Client, error) {
	paths := append(append([]string(nil), SocketPaths...), DevicePaths...)
	if p := os.Getenv("XENSTORED_PATH"); p != "" {
		paths = []string{p}
	}
	var errs []error
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		switch {
		case st.Mode()&os.ModeSocket != 0:
			return DialUnix(ctx, p)
		case st.Mode()&os.ModeCharDevice != 0:
			return OpenDevice(p)
		default:
			errs = append(errs, fmt.Errorf("%s is neither a socket nor a character device", p))
		}
	}
	return nil, fmt.Errorf("xenstore: no xenstore here: %w", errors.Join(errs...))
}

// Close closes the connection and waits for the client's goroutines.
// Calls in progress fail with ErrClosed; watch channels are closed.
func (c *Client) Close() error {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	err := c.conn.Close()
	<-c.done
	c.bg.Wait()
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
		err = nil
	}
	return err
}

// Done is closed when the connection has closed.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection closed, once Done is closed (ErrClosed, or an
// error wrapping it).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// read receives every message until the connection fails.
func (c *Client) read() {
	r := bufio.NewReaderSize(c.conn, HeaderSize+PayloadMax)
	var err error
	for {
		var m *Message
		if m, err = ReadMessage(r); err != nil {
			break
		}
		if m.Type == OpWatchEvent {
			c.event(m)
			continue
		}
		// The reply is handed over under the lock, so that a caller that
		// gives up either marks its call abandoned first or finds the
		// reply in its channel.
		c.mu.Lock()
		cl := c.pending[m.ReqID]
		if cl != nil {
			c.leave(m.ReqID, cl)
		}
		abandoned := cl != nil && cl.abandoned
		if cl != nil && !abandoned {
			cl.reply <- m // buffered: never blocks
		}
		c.mu.Unlock()
		// A reply nobody waits for (cl == nil) answers a call abandoned
		// before it was sent, or one never made: it is dropped.
		if abandoned {
			c.undo(cl, m)
		}
	}
	c.fail(err)
}

// event hands a watch event to its watch. An event that cannot be parsed
// is reported to every watch as an overflow: something changed somewhere.
func (c *Client) event(m *Message) {
	ev, err := parseEvent(m.Payload)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		for _, w := range c.watches {
			w.deliver(Event{Path: w.path, Token: w.token, Overflow: true})
		}
		return
	}
	if w := c.watches[ev.Token]; w != nil {
		w.deliver(ev)
	}
}

// undo handles the late reply of an abandoned call: a transaction that
// started after its caller left is aborted, so that xenstored does not
// hold it (and count it against the quota) until the connection closes.
func (c *Client) undo(cl *call, m *Message) {
	if cl.op != OpTransactionStart || m.Type != OpTransactionStart {
		return
	}
	id, err := parseTxID(m.Payload)
	if err != nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil || c.closing {
		return
	}
	c.bg.Add(1)
	go func() {
		defer c.bg.Done()
		_, _ = c.do(context.Background(), id, OpTransactionEnd, "", []byte("F\x00"))
	}()
}

// fail ends the connection: pending calls and watches see ErrClosed.
func (c *Client) fail(cause error) {
	c.mu.Lock()
	switch {
	case c.closing:
		c.err = ErrClosed
	case errors.Is(cause, io.EOF):
		c.err = fmt.Errorf("%w: xenstored hung up", ErrClosed)
	default:
		c.err = fmt.Errorf("%w: %w", ErrClosed, cause)
	}
	for id, cl := range c.pending {
		close(cl.reply)
		c.leave(id, cl)
	}
	watches := c.watches
	c.watches = map[string]*Watch{}
	c.mu.Unlock()
	for _, w := range watches {
		w.stop()
	}
	c.conn.Close()
	close(c.done)
}

// do sends one request and waits for its reply. path names the request's
// node in errors. An error reply becomes an *Error; a reply of another
// type than the request's is a protocol error.
func (c *Client) do(ctx context.Context, tx uint32, op Op, path string, payload []byte) (*Message, error) {
	if len(payload) > c.payloadMax {
		return nil, fmt.Errorf("%w: %s %s: payload of %d bytes, limit %d", ErrTooBig, op, path, len(payload), c.payloadMax)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cl := &call{op: op, reply: make(chan *Message, 1)}
	if c.slot != nil {
		select {
		case c.slot <- struct{}{}:
			cl.slot = true
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-c.done:
			return nil, c.Err()
		}
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		if cl.slot {
			<-c.slot
		}
		return nil, c.err
	}
	id := c.nextReq
	for c.pending[id] != nil {
		id++
	}
	c.nextReq = id + 1
	c.pending[id] = cl
	c.mu.Unlock()

	msg := &Message{Type: op, ReqID: id, TxID: tx, Payload: payload}
	b, err := msg.MarshalBinary()
	if err == nil {
		c.wmu.Lock()
		var n int
		n, err = c.conn.Write(b)
		if err == nil && n != len(b) {
			err = io.ErrShortWrite
		}
		c.wmu.Unlock()
	}
	if err != nil {
		c.forget(id)
		// A write can fail because the connection is gone; say so.
		select {
		case <-c.done:
			return nil, c.Err()
		default:
		}
		return nil, fmt.Errorf("xenstore: %s %s: %w", op, path, err)
	}

	select {
	case m, ok := <-cl.reply:
		if !ok {
			return nil, c.Err()
		}
		if m.Type == OpError {
			return nil, parseError(op, path, m.Payload)
		}
		if m.Type != op {
			return nil, protoErr("%s %s answered with %s", op, path, m.Type)
		}
		return m, nil
	case <-ctx.Done():
		c.mu.Lock()
		if c.pending[id] == cl {
			cl.abandoned = true
			c.mu.Unlock()
			return nil, ctx.Err()
		}
		c.mu.Unlock()
		// The reply came in the meantime (or the connection failed).
		if m, ok := <-cl.reply; ok {
			c.undo(cl, m)
		}
		return nil, ctx.Err()
	}
}

func (c *Client) forget(id uint32) {
	c.mu.Lock()
	if cl := c.pending[id]; cl != nil {
		c.leave(id, cl)
	}
	c.mu.Unlock()
}

// leave removes a call from pending, releasing the slot it holds: its
// reply came, it was never sent, or the connection failed. c.mu is held.
func (c *Client) leave(id uint32, cl *call) {
	delete(c.pending, id)
	if cl.slot {
		cl.slot = false
		<-c.slot
	}
}

// The operations below exist on Client (outside any transaction) and on
// Tx. Paths are absolute, or relative to the connection's domain path.

// Read returns a node's value.
func (c *Client) Read(ctx context.Context, path string) ([]byte, error) {
	return c.read1(ctx, 0, path)
}

// Write sets a node's value, creating the node and any missing parents.
func (c *Client) Write(ctx context.Context, path string, value []byte) error {
	return c.write(ctx, 0, path, value)
}

// Mkdir creates a node with an empty value, and any missing parents. An
// existing node is left as it is.
func (c *Client) Mkdir(ctx context.Context, path string) error {
	return c.ack(ctx, 0, OpMkdir, path)
}

// Rm removes a node and everything below it. Removing a node that does not
// exist succeeds if its parent exists (ErrNotFound otherwise).
func (c *Client) Rm(ctx context.Context, path string) error {
	return c.ack(ctx, 0, OpRm, path)
}

// Directory lists a node's children, by name.
func (c *Client) Directory(ctx context.Context, path string) ([]string, error) {
	return c.directory(ctx, 0, path)
}

// GetPerms returns a node's permission list.
func (c *Client) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return c.getPerms(ctx, 0, path)
}

// SetPerms replaces a node's permission list. Only the owner (and dom0)
// may, and a domain may not give a node away.
func (c *Client) SetPerms(ctx context.Context, path string, perms []Perm) error {
	return c.setPerms(ctx, 0, path, perms)
}

// GetDomainPath returns the home path of a domain's nodes, which is
// DomainPath(domid) on every xenstored.
func (c *Client) GetDomainPath(ctx context.Context, domid uint32) (string, error) {
	m, err := c.do(ctx, 0, OpGetDomainPath, "", []byte(fmt.Sprintf("%d\x00", domid)))
	if err != nil {
		return "", err
	}
	p, err := parseOneString(m.Payload)
	if err != nil {
		return "", err
	}
	if err := ValidPath(p); err != nil || p[0] != '/' {
		return "", protoErr("domain path %q", p)
	}
	return p, nil
}

func (c *Client) read1(ctx context.Context, tx uint32, path string) ([]byte, error) {
	if err := ValidPath(path); err != nil {
		return nil, err
	}
	m, err := c.do(ctx, tx, OpRead, path, append([]byte(path), 0))
	if err != nil {
		return nil, err
	}
	return m.Payload, nil
}

func (c *Client) write(ctx context.Context, tx uint32, path string, value []byte) error {
	if err := ValidPath(path); err != nil {
		return err
	}
	p := make([]byte, 0, len(path)+1+len(value))
	p = append(append(append(p, path...), 0), value...)
	m, err := c.do(ctx, tx, OpWrite, path, p)
	if err != nil {
		return err
	}
	return parseOK(m.Payload)
}

func (c *Client) ack(ctx context.Context, tx uint32, op Op, path string) error {
	if err := ValidPath(path); err != nil {
		return err
	}
	m, err := c.do(ctx, tx, op, path, append([]byte(path), 0))
	if err != nil {
		return err
	}
	return parseOK(m.Payload)
}

func (c *Client) directory(ctx context.Context, tx uint32, path string) ([]string, error) {
	if err := ValidPath(path); err != nil {
		return nil, err
	}
	m, err := c.do(ctx, tx, OpDirectory, path, append([]byte(path), 0))
	if errors.Is(err, ErrTooBig) {
		// More children than one reply holds: page through them.
		return c.directoryParts(ctx, tx, path)
	}
	if err != nil {
		return nil, err
	}
	return parseDirectory(m.Payload)
}

// directoryParts lists a directory too large for one reply, in parts
// (XS_DIRECTORY_PART, Xen 4.9 and later). The node's generation must stay
// the same across the parts; if it changes, the listing starts over.
func (c *Client) directoryParts(ctx context.Context, tx uint32, path string) ([]string, error) {
	const maxRestarts = 16
	var gen string
	var children []byte
	for restarts := 0; restarts <= maxRestarts; {
		payload, err := Strings(path, fmt.Sprint(len(children)))
		if err != nil {
			return nil, err
		}
		m, err := c.do(ctx, tx, OpDirectoryPart, path, payload)
		if err != nil {
			return nil, err
		}
		part, err := parseDirectoryPart(m.Payload)
		if err != nil {
			return nil, err
		}
		if len(children) > 0 && part.generation != gen {
			gen, children = "", nil
			restarts++
			continue
		}
		gen = part.generation
		if !part.last && len(part.children) == 0 {
			return nil, protoErr("directory part of %s makes no progress", path)
		}
		if len(children)+len(part.children) > 1<<24 {
			return nil, protoErr("directory %s is over 16 MiB", path)
		}
		children = append(children, part.children...)
		if part.last {
			return parseDirectory(children)
		}
	}
	return nil, fmt.Errorf("xenstore: directory %s kept changing while being listed: %w", path, ErrAgain)
}

func (c *Client) getPerms(ctx context.Context, tx uint32, path string) ([]Perm, error) {
	if err := ValidPath(path); err != nil {
		return nil, err
	}
	m, err := c.do(ctx, tx, OpGetPerms, path, append([]byte(path), 0))
	if err != nil {
		return nil, err
	}
	return parsePerms(m.Payload)
}

func (c *Client) setPerms(ctx context.Context, tx uint32, path string, perms []Perm) error {
	if err := ValidPath(path); err != nil {
		return err
	}
	if err := validPerms(perms); err != nil {
		return err
	}
	s := []string{path}
	for _, p := range perms {
		s = append(s, p.String())
	}
	payload, err := Strings(s...)
	if err != nil {
		return err
	}
	m, err := c.do(ctx, tx, OpSetPerms, path, payload)
	if err != nil {
		return err
	}
	return parseOK(m.Payload)
}
