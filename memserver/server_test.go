package memserver

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

func TestRoundTrip(t *testing.T) {
	for name, dir := range testDirs(t) {
		t.Run(name, func(t *testing.T) {
			sf := writeSnapshot(t, dir, "ram", 700, 1)
			s := startServer(t, Config{})
			c := dial(t, ClientConfig{}, s, "snap-1", register(t, s, "snap-1", sf))
			r := rand.New(rand.NewPCG(2, 2))
			for i := 0; i < 60; i++ {
				// Up to 600 pages: more than MaxBatch, so split in requests.
				want := randomBatch(r, sf.pages, 1+r.IntN([]int{1, 16, 256, 600}[i%4]))
				got, err := c.Fetch(context.Background(), want)
				if err != nil {
					t.Fatalf("batch %d: %v", i, err)
				}
				if err := checkPages(sf, want, got); err != nil {
					t.Fatalf("batch %d: %v", i, err)
				}
			}
			if st := s.Stats(); st.Errors != 0 || st.BadFrames != 0 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// Zero pages, holes or written zeros, are answered without data: the
// server's byte counts are exactly those of the nonzero pages plus frame
// overhead.
func TestZeroPagesNotSent(t *testing.T) {
	for name, dir := range testDirs(t) {
		t.Run(name, func(t *testing.T) {
			sf := writeSnapshot(t, dir, "ram", 1000, 3)
			holes, zeros := sf.count(pageHole), sf.count(pageZeroWrite)
			data := sf.pages - holes - zeros
			if holes == 0 || zeros == 0 || data == 0 {
				t.Fatalf("test file has %d holes, %d zero pages, %d data pages", holes, zeros, data)
			}
			s := startServer(t, Config{MaxBatch: 100})
			c := dial(t, ClientConfig{}, s, "z", register(t, s, "z", sf))
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
			st := s.Stats()
			// 10 responses of 100 pages: header, ID, status, count,
			// kinds, tag.
			overhead := 10 * (lengthLen + 1 + okFixedLen + 100 + tagLen)
			hello := lengthLen + 1 + helloReplyLen + lengthLen + acceptFrameLen
			if st.DataPages != uint64(data) || st.ZeroPages != uint64(holes+zeros) ||
				st.DataBytes != uint64(data*PageSize) || st.SentBytes != uint64(data*PageSize+overhead+hello) {
				t.Errorf("got %d data pages, %d zero, %d data bytes, %d sent; want %d, %d, %d, %d",
					st.DataPages, st.ZeroPages, st.DataBytes, st.SentBytes, data, holes+zeros, data*PageSize, data*PageSize+overhead+hello)
			}
			// Holes are found without reading where the file system can
			// tell (tmpfs can); never more than there are.
			if st.HolePages > uint64(holes) || (name == "shm" && st.HolePages != uint64(holes)) {
				t.Errorf("got %d hole pages, file has %d", st.HolePages, holes)
			}
		})
	}
}

func TestRelease(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 64, 5)
	s := startServer(t, Config{})
	capA := register(t, s, "a", sf)
	entered, proceed := holdFirstRequest(s)
	inflight := dial(t, ClientConfig{}, s, "a", capA)
	later := dial(t, ClientConfig{}, s, "a", capA) // connected before the release
	snap := s.lookup("a")

	want := []uint64{1, 2, 3, 40, 41}
	type result struct {
		pages []Page
		err   error
	}
	done := make(chan result, 1)
	go func() {
		p, err := inflight.Fetch(context.Background(), want)
		done <- result{p, err}
	}()
	<-entered
	if err := s.Release("a"); err != nil {
		t.Fatal(err)
	}
	if snap.isClosed() {
		t.Fatal("file closed under an in-flight request")
	}
	if _, err := later.Fetch(context.Background(), []uint64{0}); !errors.Is(err, ErrReleased) {
		t.Errorf("request after Release: got %v, want ErrReleased", err)
	}
	if _, err := Dial(context.Background(), s.Addr().String(), "a", capA); !errors.Is(err, ErrRefused) {
		t.Errorf("hello after Release: got %v, want ErrRefused", err)
	}
	close(proceed)
	r := <-done
	if r.err != nil {
		t.Fatalf("in-flight request: %v", r.err)
	}
	if err := checkPages(sf, want, r.pages); err != nil {
		t.Fatal(err)
	}
	// The file is closed once the in-flight request has been answered,
	// which happened before its response reached the client.
	if !snap.isClosed() {
		t.Error("file still open after the last request")
	}
	if err := s.Release("a"); !errors.Is(err, ErrUnknownSnapshot) {
		t.Errorf("second Release: got %v", err)
	}
	// The ID can be used again.
	capA2 := register(t, s, "a", sf)
	c := dial(t, ClientConfig{}, s, "a", capA2)
	if _, err := c.Fetch(context.Background(), []uint64{0}); err != nil {
		t.Fatal(err)
	}
}

func TestOutOfRange(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 32, 6)
	s := startServer(t, Config{MaxBatch: 8})
	c := dial(t, ClientConfig{}, s, "a", register(t, s, "a", sf))
	tests := [][]uint64{
		{32},
		{31, 32},
		{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000}, // in the second request
		{1<<64 - 1},
		{1<<63 + 5, 0},
	}
	for i, pages := range tests {
		if _, err := c.Fetch(context.Background(), pages); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("#%d: got %v, want ErrOutOfRange", i, err)
		}
	}
	st := s.Stats()
	if st.Errors != uint64(len(tests)) {
		t.Errorf("got %d errors, want %d", st.Errors, len(tests))
	}
	// Nothing was read but the first request of test 2, and the
	// connection still serves.
	if st.DataPages+st.ZeroPages != 8 {
		t.Errorf("%d pages read", st.DataPages+st.ZeroPages)
	}
	want := []uint64{31, 0}
	got, err := c.Fetch(context.Background(), want)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPages(sf, want, got); err != nil {
		t.Fatal(err)
	}
}

// Malformed frames close their connection, are counted, and affect no other
// connection. After the handshake, frames that are not sealed with the
// connection's key count as authentication failures; sealed ones that do
// not follow the protocol as bad frames.
func TestMalformedFrames(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 16, 7)
	s := startServer(t, Config{MaxBatch: 4})
	capA := register(t, s, "a", sf)
	other := dial(t, ClientConfig{OnRetry: func(_ int, _ time.Duration, err error) {
		t.Errorf("the good client had to reconnect: %v", err)
	}}, s, "a", capA)

	helloA := appendHello(nil, hello{version: ProtocolVersion, snapshotID: "a", nonce: testNonce})
	req := func(rs ...pageRange) []byte { return appendRequest(nil, request{id: 1, ranges: rs}) }
	frame := func(typ byte, body ...byte) []byte {
		return finishFrame(append(beginFrame(nil, typ), body...), 0)
	}
	const (
		beforeHello    = iota
		afterHello     // the hello answered, no finish
		afterHandshake // sent as is
		sealed         // after the handshake, sealed first
	)
	tests := []struct {
		name  string
		stage int
		send  []byte
		auth  bool // counted as an authentication failure, not a bad frame
	}{
		{"http", beforeHello, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false},
		{"zero length", beforeHello, []byte{0, 0, 0, 0}, false},
		{"huge length", beforeHello, []byte{0x7f, 0xff, 0xff, 0xff, frameHello}, false},
		{"request first", beforeHello, req(pageRange{0, 1}), false},
		{"bad magic", beforeHello, append(append([]byte{}, helloA[:5]...), append([]byte("XXXX"), helloA[9:]...)...), false},
		{"bad id", beforeHello, appendHello(nil, hello{version: ProtocolVersion, snapshotID: "a/b"}), false},
		{"short hello", beforeHello, frame(frameHello, 'S', 'F'), false},
		{"hello twice", afterHello, helloA, false},
		{"request instead of finish", afterHello, req(pageRange{0, 1}), false},
		{"finish too long", afterHello, frame(frameFinish, make([]byte, tagLen+1)...), false},
		{"plain request", afterHandshake, req(pageRange{0, 1}), true},
		{"plain hello", afterHandshake, helloA, true},
		{"garbage", afterHandshake, frame(frameRequest, make([]byte, 40)...), true},
		{"request too long", afterHandshake, frame(frameRequest, make([]byte, int(maxRequestFrame(4)))...), false},
		{"sealed hello", sealed, helloA, false},
		{"sealed finish again", sealed, beginFrame(nil, frameFinish), false},
		{"response from client", sealed, appendResponse(nil, response{id: 1, status: statusReleased}), false},
		{"unknown type", sealed, frame(0x7f, 1, 2, 3), false},
		{"over batch", sealed, req(pageRange{0, 5}), false},
		{"over batch in ranges", sealed, req(pageRange{0, 2}, pageRange{4, 2}, pageRange{8, 1}), false},
		{"empty range", sealed, req(pageRange{0, 0}), false},
		{"no ranges", sealed, req(), false},
		{"truncated range", sealed, frame(frameRequest, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0), false},
	}
	for i, tt := range tests {
		before := s.Stats()
		rc := dialRaw(t, s)
		switch tt.stage {
		case beforeHello:
			rc.write(tt.send)
		case afterHello:
			if _, r := rc.hello("a", ProtocolVersion); r.status != helloOK {
				t.Fatalf("%s: hello refused", tt.name)
			}
			rc.write(tt.send)
		case afterHandshake:
			rc.handshake("a", capA)
			rc.write(tt.send)
		case sealed:
			rc.writeSealed(rc.handshake("a", capA), tt.send)
		}
		rc.expectClosed()
		st := s.Stats()
		bad, auth := st.BadFrames-before.BadFrames, st.AuthFailures-before.AuthFailures
		if tt.auth && (bad != 0 || auth != 1) || !tt.auth && (bad != 1 || auth != 0) {
			t.Errorf("#%d %s: %d bad frames and %d authentication failures counted", i, tt.name, bad, auth)
		}
		if st.Refused != before.Refused {
			t.Errorf("#%d %s: counted as refused", i, tt.name)
		}
		want := []uint64{uint64(i % sf.pages)}
		got, err := other.Fetch(context.Background(), want)
		if err != nil {
			t.Fatalf("#%d %s: the other connection: %v", i, tt.name, err)
		}
		if err := checkPages(sf, want, got); err != nil {
			t.Fatalf("#%d %s: %v", i, tt.name, err)
		}
	}
}

// A client that stalls anywhere in the handshake is disconnected.
func TestHandshakeTimeout(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 4, 14)
	s := startServer(t, Config{HandshakeTimeout: 50 * time.Millisecond})
	register(t, s, "a", sf)
	tests := []struct {
		name  string
		stall func(rc *rawConn)
	}{
		{"half a length", func(rc *rawConn) { rc.write([]byte{0, 0}) }},
		{"no finish", func(rc *rawConn) {
			if _, r := rc.hello("a", ProtocolVersion); r.status != helloOK {
				t.Fatalf("hello answered %+v", r)
			}
		}},
	}
	for _, tt := range tests {
		rc := dialRaw(t, s)
		tt.stall(rc)
		rc.expectClosed()
	}
}

func TestMaxConns(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 4, 8)
	s := startServer(t, Config{MaxConns: 1})
	capA := register(t, s, "a", sf)
	first := dial(t, ClientConfig{}, s, "a", capA)
	_, err := ClientConfig{Retries: -1}.Dial(context.Background(), s.Addr().String(), "a", capA)
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("second connection: got %v, want ErrUnavailable", err)
	}
	if st := s.Stats(); st.ConnectionsRejected != 1 || st.Connections != 1 {
		t.Errorf("got %d rejected, %d open", st.ConnectionsRejected, st.Connections)
	}
	if _, err := first.Fetch(context.Background(), []uint64{3}); err != nil {
		t.Fatal(err)
	}
}

func TestRegister(t *testing.T) {
	dir := t.TempDir()
	sf := writeSnapshot(t, dir, "ram", 4, 9)
	odd := filepath.Join(dir, "odd")
	if err := os.WriteFile(odd, make([]byte, PageSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, Config{})
	tests := []struct {
		spec SnapshotSpec
		ok   bool
	}{
		{SnapshotSpec{ID: "a", Path: sf.path}, true},
		{SnapshotSpec{ID: "b", Path: sf.path, Size: 2 * PageSize}, true},
		{SnapshotSpec{ID: "a", Path: sf.path}, false}, // registered
		{SnapshotSpec{ID: "", Path: sf.path}, false},
		{SnapshotSpec{ID: "a b", Path: sf.path}, false},
		{SnapshotSpec{ID: strings.Repeat("x", MaxIDLen+1), Path: sf.path}, false},
		{SnapshotSpec{ID: "c", Path: filepath.Join(dir, "missing")}, false},
		{SnapshotSpec{ID: "c", Path: dir}, false},
		{SnapshotSpec{ID: "c", Path: odd}, false},
		{SnapshotSpec{ID: "c", Path: empty}, false},
		{SnapshotSpec{ID: "c", Path: sf.path, Size: 5 * PageSize}, false},
		{SnapshotSpec{ID: "c", Path: sf.path, Size: 100}, false},
		{SnapshotSpec{ID: "c", Path: sf.path, Size: -PageSize}, false},
	}
	for i, tt := range tests {
		c, err := s.Register(tt.spec)
		if (err == nil) != tt.ok || (err == nil && c.IsZero()) {
			t.Errorf("#%d: got %v", i, err)
		}
	}
	// A given capability is kept; a size limits the pages served.
	given := NewCapability()
	if c, err := s.Register(SnapshotSpec{ID: "d", Path: sf.path, Size: PageSize, Capability: given}); err != nil || c != given {
		t.Fatalf("got %v", err)
	}
	c := dial(t, ClientConfig{}, s, "d", given)
	if _, err := c.Fetch(context.Background(), []uint64{1}); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("page 1 of a one-page snapshot: got %v", err)
	}
	if st := s.Stats(); st.Snapshots != 3 {
		t.Errorf("got %d snapshots", st.Snapshots)
	}
	s.Close()
	if _, err := s.Register(SnapshotSpec{ID: "e", Path: sf.path}); !errors.Is(err, ErrServerClosed) {
		t.Errorf("after Close: got %v", err)
	}
	if err := s.Serve(context.Background()); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve after Close: got %v", err)
	}
}

func TestServeContext(t *testing.T) {
	s, err := New(Config{Listen: "127.0.0.1:0", Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx) }()
	sf := writeSnapshot(t, t.TempDir(), "ram", 4, 10)
	c := dial(t, ClientConfig{Retries: -1}, s, "a", register(t, s, "a", sf))
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	// Serve has closed the server and its connections.
	if _, err := c.Fetch(context.Background(), []uint64{0}); !errors.Is(err, ErrUnavailable) {
		t.Errorf("after the server stopped: got %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close after Serve: %v", err)
	}
}

func TestCapabilityText(t *testing.T) {
	c := NewCapability()
	if c.IsZero() || c == NewCapability() {
		t.Fatal("capabilities are not random")
	}
	text, err := c.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ParseCapability(string(text)); err != nil || got != c {
		t.Errorf("round trip: got %v", err)
	}
	if s := c.String(); strings.Contains(s, string(text[:8])) {
		t.Errorf("String leaks the capability: %s", s)
	}
	for _, bad := range []string{"", "00", string(text[:63]), string(text) + "00", strings.Repeat("zz", 32)} {
		if _, err := ParseCapability(bad); err == nil {
			t.Errorf("parsed %q", bad)
		}
	}
}

func TestWriteMetrics(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 64, 11)
	s := startServer(t, Config{})
	c := dial(t, ClientConfig{}, s, "a", register(t, s, "a", sf))
	for i := range 10 {
		if _, err := c.Fetch(context.Background(), []uint64{uint64(i), uint64(i + 20)}); err != nil {
			t.Fatal(err)
		}
	}
	c.Fetch(context.Background(), []uint64{64})
	var b strings.Builder
	if err := s.WriteMetrics(&b); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	values := map[string]string{}
	var last uint64
	sc := bufio.NewScanner(strings.NewReader(b.String()))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "# ") {
			if f := strings.Fields(line); len(f) < 3 || !strings.HasPrefix(f[2], "sf_memserver_") {
				t.Errorf("bad comment %q", line)
			}
			continue
		}
		name, value, ok := strings.Cut(line, " ")
		if !ok || !strings.HasPrefix(name, "sf_memserver_") {
			t.Fatalf("bad line %q", line)
		}
		if _, err := strconv.ParseFloat(value, 64); err != nil {
			t.Errorf("bad value in %q", line)
		}
		values[name] = value
		if strings.HasPrefix(name, "sf_memserver_request_duration_seconds_bucket") {
			n, _ := strconv.ParseUint(value, 10, 64)
			if n < last {
				t.Errorf("buckets not cumulative at %q", line)
			}
			last = n
		}
	}
	for name, want := range map[string]uint64{
		"sf_memserver_requests_total":                             11,
		"sf_memserver_request_errors_total":                       1,
		`sf_memserver_pages_total{kind="data"}`:                   st.DataPages,
		`sf_memserver_pages_total{kind="zero"}`:                   st.ZeroPages,
		"sf_memserver_data_bytes_total":                           st.DataPages * PageSize,
		"sf_memserver_connections":                                1,
		"sf_memserver_snapshots":                                  1,
		"sf_memserver_request_duration_seconds_count":             11,
		`sf_memserver_request_duration_seconds_bucket{le="+Inf"}`: 11,
	} {
		if got := values[name]; got != strconv.FormatUint(want, 10) {
			t.Errorf("%s = %q, want %d", name, got, want)
		}
	}
	if st.Latency.Count != 11 || st.Latency.Quantile(0.5) <= 0 || st.Latency.Quantile(0.99) < st.Latency.Quantile(0.5) {
		t.Errorf("latency histogram %+v", st.Latency)
	}
}

// A snapshot file that shrinks under the server (it must not) fails the
// request loudly rather than answering zeros, whether holes are looked for
// or not.
func TestReadError(t *testing.T) {
	for _, noHoles := range []bool{false, true} {
		sf := writeSnapshot(t, t.TempDir(), "ram", 8, 12)
		s := startServer(t, Config{})
		c := dial(t, ClientConfig{}, s, "a", register(t, s, "a", sf))
		s.lookup("a").noHoles.Store(noHoles)
		if err := os.Truncate(sf.path, 4*PageSize); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Fetch(context.Background(), []uint64{6}); !errors.Is(err, ErrPageRead) {
			t.Errorf("noHoles %v: got %v, want ErrPageRead", noHoles, err)
		}
		if st := s.Stats(); st.Errors != 1 {
			t.Errorf("noHoles %v: got %d errors", noHoles, st.Errors)
		}
	}
}

func TestQuantile(t *testing.T) {
	h := Histogram{Bounds: []time.Duration{1, 2, 3}, Counts: []uint64{50, 40, 9, 1}, Count: 100}
	tests := []struct {
		q    float64
		want time.Duration
	}{{0.01, 1}, {0.5, 1}, {0.51, 2}, {0.9, 2}, {0.99, 3}, {1, 3}}
	for i, tt := range tests {
		if got := h.Quantile(tt.q); got != tt.want {
			t.Errorf("#%d: Quantile(%v) = %v, want %v", i, tt.q, got, tt.want)
		}
	}
	if got := (Histogram{}).Quantile(0.5); got != 0 {
		t.Errorf("empty: got %v", got)
	}
}

// FuzzServerStream sends arbitrary frames after a valid handshake to a
// real server: it never crashes, everything it sends back is well formed,
// and it keeps serving other clients. The input is read as unsealed frames,
// each sealed before it is sent, so that the fuzzer reaches the request
// decoder and what follows it; whatever does not read as a frame is sent
// as it is.
func FuzzServerStream(f *testing.F) {
	sf := writeSnapshot(f, f.TempDir(), "ram", 16, 13)
	s := startServer(f, Config{MaxBatch: 8, Logger: hclog.NewNullLogger()})
	capA := register(f, s, "a", sf)
	good := dial(f, ClientConfig{}, s, "a", capA)
	req := func(rs ...pageRange) []byte { return appendRequest(nil, request{id: 7, ranges: rs}) }
	f.Add(req(pageRange{0, 1}))
	f.Add(append(req(pageRange{3, 5}), req(pageRange{15, 1}, pageRange{0, 2})...))
	f.Add(req(pageRange{16, 1}))
	f.Add(req(pageRange{1<<64 - 1, 8}))
	f.Add(req(pageRange{0, 9}))
	f.Add([]byte{0, 0, 0, 3, frameRequest, 1, 2})
	f.Add(append(req(pageRange{0, 1}), 0, 0, 0, 1, frameRequest))
	f.Fuzz(func(t *testing.T, in []byte) {
		rc := dialRaw(t, s)
		sess := rc.handshake("a", capA)
		var out []byte
		for len(in) >= lengthLen+1 {
			n := int(binary.BigEndian.Uint32(in))
			if n == 0 || n > len(in)-lengthLen || n > int(maxRequestFrame(8)) {
				break
			}
			start := len(out)
			var err error
			if out, err = sess.seal.seal(append(out, in[:lengthLen+n]...), start); err != nil {
				t.Fatal(err)
			}
			in = in[lengthLen+n:]
		}
		out = append(out, in...)
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc.nc.Write(out)
			rc.nc.(*net.TCPConn).CloseWrite()
		}()
		defer wg.Wait()
		br := bufio.NewReader(rc.nc)
		for {
			typ, b, err := readFrame(br, maxResponseFrame(8), nil)
			if err == nil {
				b, err = sess.open.open(typ, b)
				if err != nil {
					t.Fatalf("a response: %v", err)
				}
			}
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, ErrProtocol) {
					t.Fatalf("reading responses: %v", err)
				}
				break // closed by the server, or after our end of stream
			}
			if typ != frameResponse {
				t.Fatalf("frame type %d", typ)
			}
			if _, err := decodeResponse(b); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := good.Fetch(context.Background(), []uint64{3}); err != nil {
			t.Fatalf("the other client: %v", err)
		}
	})
}
