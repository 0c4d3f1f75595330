package memserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// 8 clients for each of 2 snapshots, each client shared by 2 goroutines,
// all fetching at once.
func TestConcurrentClients(t *testing.T) {
	dirs := []string{t.TempDir(), t.TempDir()}
	if shm := shmDir(t); shm != "" {
		dirs[1] = shm
	}
	s := startServer(t, Config{MaxBatch: 64})
	snaps := make([]snapFile, 2)
	caps := make([]Capability, 2)
	for i := range snaps {
		snaps[i] = writeSnapshot(t, dirs[i], "ram", 300, uint64(20+i))
		caps[i] = register(t, s, fmt.Sprintf("snap-%d", i), snaps[i])
	}
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 16 {
		sn := i % 2
		c := dial(t, ClientConfig{}, s, fmt.Sprintf("snap-%d", sn), caps[sn])
		for g := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(i), uint64(g)))
				for j := range 20 {
					want := randomBatch(r, snaps[sn].pages, 1+r.IntN(150))
					got, err := c.Fetch(context.Background(), want)
					if err == nil {
						err = checkPages(snaps[sn], want, got)
					}
					if err != nil {
						errs <- fmt.Errorf("client %d/%d, batch %d: %w", i, g, j, err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := s.Stats(); st.Connections != 16 || st.Errors != 0 || st.BadFrames != 0 {
		t.Errorf("stats %+v", st)
	}
}

// sumDelays is the least and most backoff before retries 1..n.
func sumDelays(cfg ClientConfig, n int) (lo, hi time.Duration) {
	for i := 1; i <= n; i++ {
		d := min(cfg.BaseDelay<<(i-1), cfg.MaxDelay)
		lo += d / 2
		hi += d
	}
	return lo, hi
}

// A dead server: the client retries with backoff, then fails loudly within
// the bound its config sets.
func TestUnavailableAfterRetries(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 8, 30)
	s := startServer(t, Config{})
	var retries []time.Duration
	cfg := ClientConfig{Retries: 4, BaseDelay: 20 * time.Millisecond, MaxDelay: 60 * time.Millisecond, Timeout: time.Second,
		OnRetry: func(n int, d time.Duration, err error) {
			if n != len(retries)+1 {
				t.Errorf("retry %d after %d", n, len(retries))
			}
			retries = append(retries, d)
		}}
	c := dial(t, cfg, s, "a", register(t, s, "a", sf))
	if _, err := c.Fetch(context.Background(), []uint64{0}); err != nil {
		t.Fatal(err)
	}
	s.Close()

	start := time.Now()
	_, err := c.Fetch(context.Background(), []uint64{1})
	elapsed := time.Since(start)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("got %v, want ErrUnavailable", err)
	}
	lo, hi := sumDelays(cfg.withDefaults(), cfg.Retries)
	// Connections to a closed port are refused at once, so the time is
	// the backoff; allow each attempt its Timeout on top.
	bound := hi + time.Duration(cfg.Retries+1)*cfg.Timeout
	if elapsed < lo || elapsed > bound {
		t.Errorf("gave up after %v, want between %v and %v", elapsed, lo, bound)
	}
	if len(retries) != cfg.Retries {
		t.Fatalf("%d retries, want %d", len(retries), cfg.Retries)
	}
	for i, d := range retries {
		full := min(cfg.BaseDelay<<i, cfg.MaxDelay)
		if d < full/2 || d > full {
			t.Errorf("retry %d: delay %v, want in (%v, %v]", i+1, d, full/2, full)
		}
	}
	t.Logf("ErrUnavailable after %v (backoff %v..%v): %v", elapsed, lo, hi, err)
}

// A server that accepts connections and never answers: each attempt ends
// at Timeout, and the client gives up within the bound.
func TestUnavailableSilentServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	held := make(chan net.Conn, 16)
	conns.Add(1)
	go func() {
		defer conns.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			held <- nc // read nothing, answer nothing
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		conns.Wait()
		close(held)
		for nc := range held {
			nc.Close()
		}
	})
	cfg := ClientConfig{Retries: 2, BaseDelay: 10 * time.Millisecond, MaxDelay: 20 * time.Millisecond, Timeout: 100 * time.Millisecond, Logger: testLogger(t)}
	start := time.Now()
	_, err = cfg.Dial(context.Background(), ln.Addr().String(), "a", Capability{})
	elapsed := time.Since(start)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("got %v, want ErrUnavailable", err)
	}
	attempts := time.Duration(cfg.Retries+1) * cfg.Timeout
	_, hi := sumDelays(cfg, cfg.Retries)
	if elapsed < attempts || elapsed > attempts+hi+2*time.Second {
		t.Errorf("gave up after %v, want about %v", elapsed, attempts+hi)
	}
}

// A server that takes a request and never answers it: the client does not
// hang; it reconnects and, when that does not help, fails.
func TestUnavailableHungRequest(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 8, 31)
	s := startServer(t, Config{})
	release := make(chan struct{})
	var hung atomic.Int32
	s.testHookServing = func(string) {
		hung.Add(1)
		<-release
	}
	t.Cleanup(func() { close(release) }) // before the server's Close
	cfg := ClientConfig{Retries: 1, BaseDelay: 5 * time.Millisecond, Timeout: 100 * time.Millisecond}
	c := dial(t, cfg, s, "a", register(t, s, "a", sf))
	start := time.Now()
	_, err := c.Fetch(context.Background(), []uint64{0})
	elapsed := time.Since(start)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("got %v, want ErrUnavailable", err)
	}
	if hung.Load() != 2 || elapsed < 2*cfg.Timeout || elapsed > 2*cfg.Timeout+2*time.Second {
		t.Errorf("%d requests hung, gave up after %v", hung.Load(), elapsed)
	}
}

// The server restarts on the same address within the retry window: the
// Fetches in progress, four at once on one client, recover.
func TestServerRestart(t *testing.T) {
	sf := writeSnapshot(t, shmOrTemp(t), "ram", 128, 32)
	s1 := startServer(t, Config{})
	capA := register(t, s1, "a", sf)
	addr := s1.Addr().String()

	restarted := make(chan struct{})
	firstRetry := make(chan struct{})
	var retries atomic.Int32
	cfg := fastRetries
	cfg.OnRetry = func(n int, _ time.Duration, err error) {
		if retries.Add(1) == 1 {
			close(firstRetry)
		}
		<-restarted // no retry runs out while the test restarts the server
	}
	c := dial(t, cfg, s1, "a", capA)
	want := []uint64{5, 6, 7, 100}
	if _, err := c.Fetch(context.Background(), want); err != nil {
		t.Fatal(err)
	}
	s1.Close()

	const fetches = 4
	done := make(chan error, fetches)
	for i := range fetches {
		go func() {
			want := []uint64{uint64(i), uint64(i + 50), 127}
			got, err := c.Fetch(context.Background(), want)
			if err == nil {
				err = checkPages(sf, want, got)
			}
			done <- err
		}()
	}
	<-firstRetry // a Fetch has failed against the dead server
	s2 := startServer(t, Config{Listen: addr})
	if _, err := s2.Register(SnapshotSpec{ID: "a", Path: sf.path, Capability: capA}); err != nil {
		t.Fatal(err)
	}
	close(restarted)
	for range fetches {
		if err := <-done; err != nil {
			t.Fatalf("Fetch across the restart: %v", err)
		}
	}
	if st := s2.Stats(); st.Requests != fetches || st.Connections != 1 {
		t.Errorf("restarted server answered %d requests on %d connections", st.Requests, st.Connections)
	}
}

// fakeHandshake runs a server's end of the handshake for any snapshot,
// with keys derived from capability c, and answers with acceptFrame
// (unsealed; it is sealed here). Unlike a real server, it does not check
// the client's finish. It returns the session, or nil if the client went
// away.
func fakeHandshake(nc net.Conn, c Capability, acceptFrame []byte) *session {
	_, b, err := readFrame(nc, maxHelloFrame, nil)
	if err != nil {
		return nil
	}
	h, err := decodeHello(b)
	if err != nil {
		return nil
	}
	r := helloReply{version: ProtocolVersion, status: helloOK, nonce: newNonce()}
	nc.Write(appendHelloReply(nil, r))
	typ, b, err := readFrame(nc, finishFrameLen, nil)
	if err != nil {
		return nil
	}
	keys, _ := deriveKeys(c, h.snapshotID, h.nonce, r.nonce)
	sess, _ := serverSession(keys)
	sess.open.open(typ, b)
	a, _ := sess.seal.seal(bytes.Clone(acceptFrame), 0)
	nc.Write(a)
	return sess
}

// A server that breaks the protocol: the client drops the connection,
// retries, and fails with ErrUnavailable; it never allocates past the
// frame limit it negotiated.
func TestMisbehavingServer(t *testing.T) {
	okAccept := appendAccept(nil, accept{maxBatch: 4, pages: 16})
	respond := func(f func(sess *session, id uint64) []byte) func(net.Conn) {
		return func(nc net.Conn) {
			sess := fakeHandshake(nc, testCapability, okAccept)
			if sess == nil {
				return
			}
			typ, b, err := readFrame(nc, maxRequestFrame(4), nil)
			if err != nil {
				return
			}
			if b, err = sess.open.open(typ, b); err != nil {
				return
			}
			req, _ := decodeRequest(b, 4)
			nc.Write(f(sess, req.id))
		}
	}
	sealed := func(sess *session, frame []byte) []byte {
		b, _ := sess.seal.seal(frame, 0)
		return b
	}
	tests := []struct {
		name  string
		serve func(net.Conn)
		auth  bool // the client's error is an authentication failure
	}{
		{"bad accept", func(nc net.Conn) {
			fakeHandshake(nc, testCapability, appendAccept(nil, accept{maxBatch: MaxBatchLimit + 1, pages: 16}))
		}, false},
		{"accept sealed with another capability", func(nc net.Conn) {
			fakeHandshake(nc, testCapability, okAccept)
		}, true},
		{"second hello reply instead of an accept", func(nc net.Conn) {
			readFrame(nc, maxHelloFrame, nil)
			nc.Write(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: helloOK}))
			readFrame(nc, finishFrameLen, nil)
			nc.Write(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: helloOK}))
		}, false},
		{"wrong page count", respond(func(sess *session, id uint64) []byte {
			return sealed(sess, appendResponse(nil, response{id: id, status: statusOK, kinds: []byte{kindZero, kindZero}}))
		}), false},
		{"frame over the limit", respond(func(*session, uint64) []byte {
			return binary.BigEndian.AppendUint32(nil, maxResponseFrame(4)+1)
		}), false},
		{"accept again", respond(func(sess *session, _ uint64) []byte { return sealed(sess, okAccept) }), false},
		{"unsealed response", respond(func(_ *session, id uint64) []byte {
			return appendResponse(nil, response{id: id, status: statusOK, kinds: []byte{kindZero}})
		}), true},
		{"garbage", respond(func(*session, uint64) []byte { return []byte("\x00\x00\x00\x15hello, this is not it") }), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr := fakeServer(t, tt.serve)
			var retries atomic.Int32
			var firstErr error
			cfg := ClientConfig{Retries: 2, BaseDelay: time.Millisecond, Timeout: 5 * time.Second, Logger: testLogger(t),
				OnRetry: func(_ int, _ time.Duration, err error) {
					if retries.Add(1) == 1 {
						firstErr = err
					}
				}}
			c := testCapability
			if tt.name == "accept sealed with another capability" {
				c[0] ^= 1
			}
			cl, err := cfg.Dial(context.Background(), addr, "a", c)
			if err == nil {
				defer cl.Close()
				_, err = cl.Fetch(context.Background(), []uint64{1})
			}
			if !errors.Is(err, ErrUnavailable) || retries.Load() != 2 {
				t.Fatalf("got %v after %d retries, want ErrUnavailable after 2", err, retries.Load())
			}
			if errors.Is(firstErr, ErrAuth) != tt.auth || !tt.auth && !errors.Is(firstErr, ErrProtocol) {
				t.Errorf("first failure: %v, want an authentication failure %v", firstErr, tt.auth)
			}
		})
	}
}

// fakeServer serves each connection with serve, then closes it.
func fakeServer(t *testing.T, serve func(net.Conn)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer nc.Close()
				nc.SetDeadline(time.Now().Add(10 * time.Second))
				serve(nc)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

func shmOrTemp(t *testing.T) string {
	if d := shmDir(t); d != "" {
		return d
	}
	return t.TempDir()
}

// Close during a Fetch makes it return ErrClosed, and waits for the
// client's goroutine.
func TestClientClose(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 8, 33)
	s := startServer(t, Config{})
	entered, release := holdFirstRequest(s)
	defer close(release)
	c := dial(t, ClientConfig{}, s, "a", register(t, s, "a", sf))
	done := make(chan error, 1)
	go func() {
		_, err := c.Fetch(context.Background(), []uint64{0})
		done <- err
	}()
	<-entered
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("Fetch during Close: got %v", err)
	}
	if _, err := c.Fetch(context.Background(), []uint64{0}); !errors.Is(err, ErrClosed) {
		t.Errorf("Fetch after Close: got %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// A cancelled Fetch returns at once and leaves the connection usable.
func TestFetchContext(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 8, 34)
	s := startServer(t, Config{})
	entered, release := holdFirstRequest(s)
	c := dial(t, ClientConfig{}, s, "a", register(t, s, "a", sf))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := c.Fetch(ctx, []uint64{0})
		done <- err
	}()
	<-entered
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
	close(release) // the late response is dropped
	want := []uint64{1, 2}
	got, err := c.Fetch(context.Background(), want)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPages(sf, want, got); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Fetch(context.Background(), nil); got != nil || err != nil {
		t.Errorf("empty Fetch: got %v, %v", got, err)
	}
}

func TestBackoff(t *testing.T) {
	cfg := ClientConfig{BaseDelay: 10 * time.Millisecond, MaxDelay: 100 * time.Millisecond}.withDefaults()
	for n := 1; n < 80; n++ {
		full := cfg.MaxDelay
		if n <= 5 {
			full = min(cfg.BaseDelay<<(n-1), cfg.MaxDelay)
		}
		for range 20 {
			if d := cfg.backoff(n); d < full/2 || d > full {
				t.Fatalf("retry %d: delay %v, want in [%v, %v]", n, d, full/2, full)
			}
		}
	}
}
