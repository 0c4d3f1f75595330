package memserver

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// direction is a direction of a connection, as a proxy sees it.
type direction int

const (
	toServer direction = iota
	toClient
)

// relayed is a frame a proxy relayed.
type relayed struct {
	conn  int
	dir   direction
	frame []byte
}

// frameProxy relays TCP connections to a server frame by frame. It records
// every frame it relays, and lets a test alter the frames of its first
// connection.
type frameProxy struct {
	ln     net.Listener
	target string
	// mangle, if set, turns frame i (counted from 0 in each direction) of
	// the first connection into the frames relayed instead. Calls are
	// serialised.
	mangle func(d direction, i int, frame []byte) [][]byte

	wg     sync.WaitGroup
	mu     sync.Mutex
	frames []relayed
	conns  []net.Conn
	n      int // connections accepted
}

func startProxy(t *testing.T, target string, mangle func(direction, int, []byte) [][]byte) *frameProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &frameProxy{ln: ln, target: target, mangle: mangle}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, nc := range p.conns {
			nc.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *frameProxy) addr() string { return p.ln.Addr().String() }

func (p *frameProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		conn := p.n
		p.n++
		p.conns = append(p.conns, client, server)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.relay(conn, toServer, client, server)
		go p.relay(conn, toClient, server, client)
	}
}

// relay copies frames from one end to the other until either fails, then
// closes both.
func (p *frameProxy) relay(conn int, d direction, from, to net.Conn) {
	defer p.wg.Done()
	defer from.Close()
	defer to.Close()
	br := bufio.NewReader(from)
	for i := 0; ; i++ {
		var hdr [lengthLen]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return
		}
		frame := make([]byte, lengthLen+int(binary.BigEndian.Uint32(hdr[:])))
		copy(frame, hdr[:])
		if _, err := io.ReadFull(br, frame[lengthLen:]); err != nil {
			return
		}
		out := [][]byte{frame}
		p.mu.Lock()
		if conn == 0 && p.mangle != nil {
			out = p.mangle(d, i, frame)
		}
		for _, f := range out {
			p.frames = append(p.frames, relayed{conn, d, f})
		}
		p.mu.Unlock()
		for _, f := range out {
			if _, err := to.Write(f); err != nil {
				return
			}
		}
	}
}

// wire is every byte relayed so far, both directions.
func (p *frameProxy) wire() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b []byte
	for _, r := range p.frames {
		b = append(b, r.frame...)
	}
	return b
}

// sent is the frames relayed so far on a connection in one direction.
func (p *frameProxy) sent(conn int, d direction) [][]byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	var fs [][]byte
	for _, r := range p.frames {
		if r.conn == conn && r.dir == d {
			fs = append(fs, r.frame)
		}
	}
	return fs
}

func (p *frameProxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// A wrong capability is refused, and so is an unknown snapshot, the same
// way: the server answers the hello alike and refuses only once the client
// has failed to prove it holds the capability.
func TestRefused(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 8, 4)
	s := startServer(t, Config{})
	good := register(t, s, "a", sf)
	bad := good
	bad[31] ^= 1
	retried := false
	cfg := ClientConfig{OnRetry: func(int, time.Duration, error) { retried = true }}

	tests := []struct {
		id  string
		cap Capability
	}{
		{"a", bad},            // wrong capability
		{"a", Capability{}},   // none
		{"b", good},           // unknown snapshot
		{"a-longer-id", good}, // prefix of nothing
	}
	for i, tt := range tests {
		_, err := cfg.Dial(context.Background(), s.Addr().String(), tt.id, tt.cap)
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "unknown snapshot or wrong capability") {
			t.Errorf("#%d: got %v, want ErrRefused", i, err)
		}
		// The hello is answered as for a known snapshot; the refusal comes
		// after the finish, with a closed connection.
		rc := dialRaw(t, s)
		h, r := rc.hello(tt.id, ProtocolVersion)
		if r.status != helloOK {
			t.Fatalf("#%d: hello answered %+v", i, r)
		}
		sess, _, refusal := rc.finish(tt.id, tt.cap, h, r)
		if sess != nil || refusal != (helloReply{version: ProtocolVersion, status: helloRefused}) {
			t.Errorf("#%d: got %+v, want a refusal", i, refusal)
		}
		rc.expectClosed()
	}
	if retried {
		t.Error("a refusal was retried")
	}
	if st := s.Stats(); st.Refused != 2*uint64(len(tests)) || st.BadFrames != 0 || st.AuthFailures != 0 {
		t.Errorf("got %d refused, %d bad frames, %d auth failures", st.Refused, st.BadFrames, st.AuthFailures)
	}
	// The right capability still works.
	c := dial(t, ClientConfig{}, s, "a", good)
	if _, err := c.Fetch(context.Background(), []uint64{0}); err != nil {
		t.Fatal(err)
	}
}

// Frames altered on the wire end their connection, on the side that
// receives them: an altered, replayed, reordered, dropped, cut or unsealed
// frame never opens. The client then reconnects and its Fetch succeeds. An
// altered handshake makes the two ends' keys differ, which the server sees
// as a wrong capability.
func TestTamperedFrames(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 16, 40)
	// Frame k of one direction, altered by f.
	at := func(k int, f func([]byte) [][]byte) func(int, []byte) [][]byte {
		return func(i int, fr []byte) [][]byte {
			if i != k {
				return [][]byte{fr}
			}
			return f(fr)
		}
	}
	flip := func(off int) func([]byte) [][]byte {
		return func(fr []byte) [][]byte {
			fr[(off+len(fr))%len(fr)] ^= 0x20
			return [][]byte{fr}
		}
	}
	cut := func(fr []byte) [][]byte {
		fr = fr[:len(fr)-1]
		binary.BigEndian.PutUint32(fr, uint32(len(fr)-lengthLen))
		return [][]byte{fr}
	}
	replay := func(fr []byte) [][]byte { return [][]byte{fr, fr} }
	drop := func([]byte) [][]byte { return nil }
	swap := func(k int) func(int, []byte) [][]byte {
		var held []byte
		return func(i int, fr []byte) [][]byte {
			switch i {
			case k:
				held = fr
				return nil
			case k + 1:
				return [][]byte{fr, held}
			}
			return [][]byte{fr}
		}
	}
	plain := func([]byte) [][]byte {
		return [][]byte{appendRequest(nil, request{id: 1, ranges: []pageRange{{0, 1}}})}
	}
	const (
		byServer = iota // the server counts an authentication failure
		byClient        // the client fails the connection with ErrAuth
		refused         // the handshake fails as with a wrong capability
	)
	// Fetching 8 pages with a batch of 4 sends two requests; so the frames
	// to the server are hello, finish, request, request, and those to the
	// client hello reply, accept, response, response.
	tests := []struct {
		name   string
		dir    direction
		mangle func(int, []byte) [][]byte
		caught int
	}{
		{"request: ciphertext byte", toServer, at(2, flip(lengthLen+3)), byServer},
		{"request: tag byte", toServer, at(2, flip(-1)), byServer},
		{"request: length and type", toServer, at(2, flip(lengthLen)), byServer},
		{"request: cut short", toServer, at(2, cut), byServer},
		{"request: replayed", toServer, at(2, replay), byServer},
		{"request: dropped", toServer, at(2, drop), byServer},
		{"requests: reordered", toServer, swap(2), byServer},
		{"request: unsealed", toServer, at(2, plain), byServer},
		{"response: ciphertext byte", toClient, at(2, flip(lengthLen+20)), byClient},
		{"response: tag byte", toClient, at(2, flip(-3)), byClient},
		{"response: cut short", toClient, at(2, cut), byClient},
		{"response: replayed", toClient, at(2, replay), byClient},
		{"response: dropped", toClient, at(2, drop), byClient},
		{"responses: reordered", toClient, swap(2), byClient},
		{"accept: byte", toClient, at(1, flip(-1)), byClient},
		{"hello: nonce byte", toServer, at(0, flip(-1)), refused},
		{"hello reply: nonce byte", toClient, at(0, flip(-1)), refused},
		{"finish: byte", toServer, at(1, flip(-1)), refused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, Config{MaxBatch: 4})
			c := register(t, s, "a", sf)
			p := startProxy(t, s.Addr().String(), func(d direction, i int, fr []byte) [][]byte {
				if d != tt.dir {
					return [][]byte{fr}
				}
				return tt.mangle(i, fr)
			})
			var firstErr error
			cfg := ClientConfig{Retries: 2, BaseDelay: time.Millisecond, Logger: testLogger(t),
				OnRetry: func(n int, _ time.Duration, err error) {
					if n == 1 {
						firstErr = err
					}
				}}
			cl, err := cfg.Dial(context.Background(), p.addr(), "a", c)
			if tt.caught == refused {
				if !errors.Is(err, ErrRefused) {
					t.Fatalf("got %v, want ErrRefused", err)
				}
				if st := s.Stats(); st.Refused != 1 || st.AuthFailures != 0 {
					t.Errorf("%d refused, %d authentication failures", st.Refused, st.AuthFailures)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			want := []uint64{0, 1, 2, 3, 4, 5, 6, 7}
			got, err := cl.Fetch(context.Background(), want)
			if err != nil {
				t.Fatal(err)
			}
			if err := checkPages(sf, want, got); err != nil {
				t.Fatal(err)
			}
			if n := p.connections(); n != 2 {
				t.Errorf("%d connections, want 2", n)
			}
			st := s.Stats()
			switch tt.caught {
			case byServer:
				if st.AuthFailures != 1 {
					t.Errorf("server counted %d authentication failures, want 1", st.AuthFailures)
				}
			case byClient:
				if !errors.Is(firstErr, ErrAuth) || st.AuthFailures != 0 {
					t.Errorf("client's error %v, server's authentication failures %d; want ErrAuth and 0", firstErr, st.AuthFailures)
				}
			}
			if st.BadFrames != 0 || st.Refused != 0 {
				t.Errorf("%d bad frames, %d refused", st.BadFrames, st.Refused)
			}
		})
	}
}

// Neither the capability nor the pages can be read off the wire: a capture
// of every byte of a session that fetches every page, and of handshakes
// with a wrong capability and an unknown snapshot, holds neither.
func TestWireCapture(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 300, 41)
	s := startServer(t, Config{})
	good := register(t, s, "secret-ram", sf)
	wrong := NewCapability()
	p := startProxy(t, s.Addr().String(), nil)

	c := dialAddr(t, ClientConfig{}, p.addr(), "secret-ram", good)
	all := make([]uint64, sf.pages)
	for i := range all {
		all[i] = uint64(i)
	}
	got, err := c.Fetch(context.Background(), all)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPages(sf, all, got); err != nil {
		t.Fatal(err)
	}
	for _, d := range []struct {
		id string
		c  Capability
	}{{"secret-ram", wrong}, {"unknown", good}} {
		if _, err := Dial(context.Background(), p.addr(), d.id, d.c); !errors.Is(err, ErrRefused) {
			t.Errorf("%s: got %v, want ErrRefused", d.id, err)
		}
	}

	wire := p.wire()
	data := 0
	for i := range sf.pages {
		if !sf.isZero(uint64(i)) {
			data += PageSize
		}
	}
	// The capture is of this traffic: the snapshot ID is sent in the
	// clear, and the pages' bytes went through.
	if !bytes.Contains(wire, []byte("secret-ram")) || len(wire) < data {
		t.Fatalf("capture of %d bytes, %d bytes of page data fetched", len(wire), data)
	}
	for _, c := range []Capability{good, wrong} {
		hexText, _ := c.MarshalText()
		if bytes.Contains(wire, c[:]) || bytes.Contains(wire, c[:16]) || bytes.Contains(wire, c[16:]) || bytes.Contains(wire, hexText) {
			t.Error("a capability is on the wire")
		}
	}
	leaked := 0
	for i := range sf.pages {
		page := sf.page(uint64(i))
		switch sf.kinds[i] {
		case pageData:
			if bytes.Contains(wire, page[:32]) || bytes.Contains(wire, page[2048:2080]) {
				leaked++
			}
		case pageOneByte:
			if bytes.Contains(wire, page) {
				leaked++
			}
		}
	}
	if leaked != 0 {
		t.Errorf("%d pages readable on the wire", leaked)
	}
}

// A recorded session replayed on a new connection gets nowhere: its finish
// does not open under the new server nonce, and its requests do not open
// under a new session's keys.
func TestSessionReplay(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 16, 42)
	s := startServer(t, Config{})
	capA := register(t, s, "a", sf)
	p := startProxy(t, s.Addr().String(), nil)
	c := dialAddr(t, ClientConfig{}, p.addr(), "a", capA)
	if _, err := c.Fetch(context.Background(), []uint64{1, 5, 9}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Fetch(context.Background(), []uint64{2}); err != nil {
		t.Fatal(err)
	}
	recorded := p.sent(0, toServer) // hello, finish, two requests
	if len(recorded) != 4 {
		t.Fatalf("recorded %d frames", len(recorded))
	}
	before := s.Stats()

	// The whole session from its hello.
	rc := dialRaw(t, s)
	rc.write(recorded[0])
	if r := rc.readHelloReply(); r.status != helloOK {
		t.Fatalf("hello answered %+v", r)
	}
	rc.write(recorded[1])
	if r := rc.readHelloReply(); r.status != helloRefused {
		t.Errorf("replayed finish: got %+v, want a refusal", r)
	}
	rc.expectClosed()

	// The requests, after a handshake of our own.
	rc = dialRaw(t, s)
	rc.handshake("a", capA)
	rc.write(recorded[2])
	rc.expectClosed()

	st := s.Stats()
	if st.Requests != before.Requests || st.Refused != before.Refused+1 || st.AuthFailures != before.AuthFailures+1 {
		t.Errorf("after the replays: %d requests, %d refused, %d authentication failures; before: %d, %d, %d",
			st.Requests, st.Refused, st.AuthFailures, before.Requests, before.Refused, before.AuthFailures)
	}
}

// Peers of another version are refused with a reply they understand.
func TestVersion(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 4, 43)
	s := startServer(t, Config{})
	capA := register(t, s, "a", sf)
	// Version 1's hello carried the capability itself.
	v1Hello := finishFrame(append(append(append(beginFrame(nil, frameHello), magic[:]...), 0, 1, 1, 'a'), capA[:]...), 0)
	// What a version 1 client reads as "the server speaks version 2": its
	// own hello reply, status version, no batch or size.
	want := []byte{0, 0, 0, 16, frameHelloReply, 0, ProtocolVersion, helloVersion, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	tests := []struct {
		name  string
		hello []byte
	}{
		{"version 1", v1Hello},
		{"version 0", appendHello(nil, hello{version: 0, snapshotID: "a"})},
		{"version 3", appendHello(nil, hello{version: 3, snapshotID: "a"})},
	}
	for i, tt := range tests {
		rc := dialRaw(t, s)
		rc.write(tt.hello)
		got := make([]byte, len(want))
		if _, err := io.ReadFull(rc.nc, got); err != nil || !bytes.Equal(got, want) {
			t.Errorf("#%d %s: got %x, %v, want %x", i, tt.name, got, err, want)
		}
		rc.expectClosed()
	}
	if st := s.Stats(); st.Refused != uint64(len(tests)) || st.BadFrames != 0 {
		t.Errorf("%d refused, %d bad frames", st.Refused, st.BadFrames)
	}

	// A version 1 server refuses this client's hello the same way.
	v1Server := fakeServer(t, func(nc net.Conn) {
		if _, _, err := readFrame(nc, maxHelloFrame, nil); err == nil {
			nc.Write([]byte{0, 0, 0, 16, frameHelloReply, 0, 1, helloVersion, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
		}
	})
	cfg := ClientConfig{Logger: testLogger(t), OnRetry: func(_ int, _ time.Duration, err error) { t.Errorf("retried: %v", err) }}
	_, err := cfg.Dial(context.Background(), v1Server, "a", capA)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "version 1, not 2") {
		t.Errorf("against version 1: got %v", err)
	}
}

// A connection whose key has sealed all it may is closed; the client
// reconnects with fresh keys and its Fetches go on.
func TestKeyExhausted(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 16, 44)
	s := startServer(t, Config{})
	s.testSealLimit = 3 // the accept and two responses
	c := dial(t, fastRetries, s, "a", register(t, s, "a", sf))
	for i := range 5 {
		want := []uint64{uint64(i)}
		got, err := c.Fetch(context.Background(), want)
		if err != nil {
			t.Fatalf("Fetch %d: %v", i, err)
		}
		if err := checkPages(sf, want, got); err != nil {
			t.Fatal(err)
		}
	}
	// Responses 1, 2; 3 closes the first connection and is answered on
	// the second, with 4; 5 on the third.
	if st := s.Stats(); st.ConnectionsTotal != 3 || st.AuthFailures != 0 {
		t.Errorf("%d connections, %d authentication failures", st.ConnectionsTotal, st.AuthFailures)
	}
}
