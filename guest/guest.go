// Package guest is the SnowFlock API for programs inside a VM: request a
// ticket, clone, exit, join, kill, checkpoint, create clones.
//
// Data flow: the guest's init (sfguest, PID 1) owns the host channel (on
// QEMU the second serial port, /dev/ttyS1) through a Mux, and serves the same
// line protocol to local programs on the unix socket /run/sfguest.sock, so
// that many processes may call at once (a join may block while others call).
// Dial connects to that socket, or opens the channel directly when there is
// no sfguest init (a user's own initramfs). Calls go to the host's sfhostd,
// which relays them to the coordinator cluster and answers.
//
// Clone works like fork: the parent's pending clone call is captured with
// the VM; the host answers it with 0 in the parent and with k in clone k.
package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"github.com/snowflock-go/snowflock/guestchan"
)

// Paths of the channel.
const (
	DefaultSocket = "/run/sfguest.sock"
	DefaultDevice = "/dev/ttyS1"
)

// ErrClosed is returned by calls on a channel that has closed.
var ErrClosed = errors.New("guest: channel closed")

// Mux multiplexes calls over one host channel: it numbers requests and hands
// each answer to the call waiting for it. It is safe for concurrent use.
type Mux struct {
	rw  io.ReadWriteCloser
	wmu sync.Mutex

	mu      sync.Mutex
	next    uint64
	pending map[uint64]chan *guestchan.Response
	err     error
	done    chan struct{}
}

// NewMux starts reading answers from rw. The Mux owns rw: Close closes it,
// which also ends the reader.
func NewMux(rw io.ReadWriteCloser) *Mux {
	m := &Mux{rw: rw, pending: map[uint64]chan *guestchan.Response{}, done: make(chan struct{})}
	go m.read()
	return m
}

func (m *Mux) read() {
	d := guestchan.NewDecoder(m.rw)
	var err error
	for {
		var resp *guestchan.Response
		resp, err = d.ReadResponse()
		if err != nil {
			if errors.Is(err, guestchan.ErrBadMessage) || errors.Is(err, guestchan.ErrTooLarge) {
				continue // line noise on a serial port: skip the line
			}
			break
		}
		m.mu.Lock()
		ch := m.pending[resp.ID]
		delete(m.pending, resp.ID)
		m.mu.Unlock()
		if ch != nil {
			ch <- resp
		}
	}
	m.mu.Lock()
	m.err = fmt.Errorf("%w: %v", ErrClosed, err)
	for id, ch := range m.pending {
		close(ch)
		delete(m.pending, id)
	}
	m.mu.Unlock()
	close(m.done)
}

// CallRaw makes one call with raw JSON arguments and returns the raw result,
// or the host's error as a *guestchan.Error.
func (m *Mux) CallRaw(ctx context.Context, call string, args json.RawMessage) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		return nil, err // never send a call nobody will wait for
	}
	ch := make(chan *guestchan.Response, 1)
	m.mu.Lock()
	if m.err != nil {
		m.mu.Unlock()
		return nil, m.err
	}
	m.next++
	id := m.next
	m.pending[id] = ch
	m.mu.Unlock()
	req := &guestchan.Request{V: guestchan.Version, ID: id, Call: call, Args: args}
	m.wmu.Lock()
	err := guestchan.Encode(m.rw, req)
	m.wmu.Unlock()
	if err != nil {
		m.forget(id)
		return nil, fmt.Errorf("guest: send %s: %w", call, err)
	}
	select {
	case resp, ok := <-ch:
		if !ok {
			m.mu.Lock()
			defer m.mu.Unlock()
			return nil, m.err
		}
		if resp.Error != nil {
			return nil, resp.Error
		}
		return resp.Result, nil
	case <-ctx.Done():
		m.forget(id)
		return nil, ctx.Err()
	}
}

func (m *Mux) forget(id uint64) {
	m.mu.Lock()
	delete(m.pending, id)
	m.mu.Unlock()
}

// Call makes one call, marshalling args and unmarshalling the result.
func (m *Mux) Call(ctx context.Context, call string, args, result interface{}) error {
	var raw json.RawMessage
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return err
		}
		raw = b
	}
	res, err := m.CallRaw(ctx, call, raw)
	if err != nil {
		return err
	}
	if result == nil {
		return nil
	}
	if err := json.Unmarshal(res, result); err != nil {
		return fmt.Errorf("guest: %s answer: %w", call, err)
	}
	return nil
}

// Done is closed when the channel has closed.
func (m *Mux) Done() <-chan struct{} { return m.done }

// Close closes the channel.
func (m *Mux) Close() error { return m.rw.Close() }

// Serve answers local programs on ln with the line protocol, relaying each
// call through m under a fresh ID and answering with the program's own ID.
// It returns when ctx ends or ln fails; it closes ln and every connection.
func Serve(ctx context.Context, ln net.Listener, m *Mux) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveConn(ctx, conn, m)
		}()
	}
}

func serveConn(ctx context.Context, conn net.Conn, m *Mux) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer conn.Close()
	context.AfterFunc(ctx, func() { conn.Close() })
	var wmu sync.Mutex
	var wg sync.WaitGroup
	defer wg.Wait()
	reply := func(r *guestchan.Response) {
		wmu.Lock()
		defer wmu.Unlock()
		_ = guestchan.Encode(conn, r)
	}
	d := guestchan.NewDecoder(conn)
	for {
		req, err := d.ReadRequest()
		if err != nil {
			if errors.Is(err, guestchan.ErrBadMessage) || errors.Is(err, guestchan.ErrTooLarge) {
				reply(guestchan.Fail(req.IDOrZero(), guestchan.CodeBadRequest, "%v", err))
				continue
			}
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := m.CallRaw(ctx, req.Call, req.Args)
			var ge *guestchan.Error
			switch {
			case errors.As(err, &ge):
				reply(&guestchan.Response{V: guestchan.Version, ID: req.ID, Error: ge})
			case err != nil:
				reply(guestchan.Fail(req.ID, guestchan.CodeUnavailable, "%v", err))
			default:
				reply(&guestchan.Response{V: guestchan.Version, ID: req.ID, Result: res})
			}
		}()
	}
}

// Dial returns a client: through the local socket of sfguest (SF_GUEST_SOCKET
// or DefaultSocket) when it exists, else directly on the channel device
// (SF_GUEST_DEVICE or DefaultDevice).
func Dial() (*Client, error) {
	sock := os.Getenv("SF_GUEST_SOCKET")
	if sock == "" {
		sock = DefaultSocket
	}
	if _, err := os.Stat(sock); err == nil {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return nil, fmt.Errorf("guest: %w", err)
		}
		return &Client{m: NewMux(conn)}, nil
	}
	dev := os.Getenv("SF_GUEST_DEVICE")
	if dev == "" {
		dev = DefaultDevice
	}
	f, err := OpenChannel(dev)
	if err != nil {
		return nil, err
	}
	return &Client{m: NewMux(f)}, nil
}
