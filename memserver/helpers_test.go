package memserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Kinds of pages in a test snapshot file.
const (
	pageHole      = iota // never written: a hole in the sparse file
	pageZeroWrite        // written with zeros: data on disk, zero content
	pageData             // random bytes
	pageOneByte          // zeros but for one byte somewhere
)

// snapFile is a frozen RAM file written for a test, with what it holds.
type snapFile struct {
	path    string
	pages   int
	content []byte
	kinds   []int
}

// page is page i's expected content.
func (sf snapFile) page(i uint64) []byte {
	return sf.content[i*PageSize : (i+1)*PageSize]
}

// isZero reports whether page i must be answered as zero.
func (sf snapFile) isZero(i uint64) bool {
	return sf.kinds[i] == pageHole || sf.kinds[i] == pageZeroWrite
}

func (sf snapFile) count(kind int) int {
	n := 0
	for _, k := range sf.kinds {
		if k == kind {
			n++
		}
	}
	return n
}

// writeSnapshot writes a sparse file of pages pages, made of runs of 1 to
// 24 pages of one kind, chosen by seed.
func writeSnapshot(t testing.TB, dir, name string, pages int, seed uint64) snapFile {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 0x5eed))
	sf := snapFile{
		path:    filepath.Join(dir, name),
		pages:   pages,
		content: make([]byte, pages*PageSize),
		kinds:   make([]int, pages),
	}
	f, err := os.Create(sf.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(pages) * PageSize); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < pages; {
		kind, run := r.IntN(4), 1+r.IntN(24)
		for ; run > 0 && i < pages; run, i = run-1, i+1 {
			sf.kinds[i] = kind
			p := sf.content[i*PageSize : (i+1)*PageSize]
			switch kind {
			case pageHole:
				continue
			case pageData:
				for j := range p {
					p[j] = byte(r.Uint32())
				}
			case pageOneByte:
				p[r.IntN(PageSize)] = byte(1 + r.IntN(255))
			}
			if _, err := f.WriteAt(p, int64(i)*PageSize); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return sf
}

// testDirs are the directories to put snapshot files in: the test's
// temporary directory, and one on tmpfs, where snapshots live in
// production, when /dev/shm is there.
func testDirs(t *testing.T) map[string]string {
	dirs := map[string]string{"tempdir": t.TempDir()}
	if shm := shmDir(t); shm != "" {
		dirs["shm"] = shm
	}
	return dirs
}

// shmDir returns a fresh directory under /dev/shm, removed after the test,
// or "" if there is no /dev/shm.
func shmDir(t testing.TB) string {
	d, err := os.MkdirTemp("/dev/shm", "memserver-test-")
	if err != nil {
		return ""
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func testLogger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn, Output: &testWriter{t}})
}

type testWriter struct{ t testing.TB }

func (w *testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// startServer starts a server on a loopback port; it is closed when the
// test ends, and Serve must then return nil.
func startServer(t testing.TB, cfg Config) *Server {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background()) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s
}

// register registers sf under id and fails the test on error.
func register(t testing.TB, s *Server, id string, sf snapFile) Capability {
	t.Helper()
	c, err := s.Register(SnapshotSpec{ID: id, Path: sf.path})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fastRetries retries quickly, for tests that expect to recover.
var fastRetries = ClientConfig{Retries: 10, BaseDelay: 5 * time.Millisecond, MaxDelay: 50 * time.Millisecond, Timeout: 5 * time.Second}

func dial(t testing.TB, cfg ClientConfig, s *Server, id string, c Capability) *Client {
	t.Helper()
	return dialAddr(t, cfg, s.Addr().String(), id, c)
}

// dialAddr dials addr, a server or a proxy to one; the client is closed
// when the test ends.
func dialAddr(t testing.TB, cfg ClientConfig, addr, id string, c Capability) *Client {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	cl, err := cfg.Dial(context.Background(), addr, id, c)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// checkPages checks that got answers want, byte for byte, and that zero
// pages came without data.
func checkPages(sf snapFile, want []uint64, got []Page) error {
	if len(got) != len(want) {
		return fmt.Errorf("got %d pages, want %d", len(got), len(want))
	}
	for i, p := range got {
		switch {
		case p.Num != want[i]:
			return fmt.Errorf("#%d: got page %d, want %d", i, p.Num, want[i])
		case sf.isZero(p.Num) != p.Zero:
			return fmt.Errorf("#%d: page %d: got zero %v, want %v (kind %d)", i, p.Num, p.Zero, sf.isZero(p.Num), sf.kinds[p.Num])
		case p.Zero && p.Data != nil:
			return fmt.Errorf("#%d: page %d: zero page with data", i, p.Num)
		case !p.Zero && !bytes.Equal(p.Data, sf.page(p.Num)):
			return fmt.Errorf("#%d: page %d: data differs from the file", i, p.Num)
		}
	}
	return nil
}

// randomBatch returns n page numbers below pages: some random, some runs
// of consecutive pages, some repeated.
func randomBatch(r *rand.Rand, pages, n int) []uint64 {
	out := make([]uint64, 0, n)
	for len(out) < n {
		switch r.IntN(3) {
		case 0:
			out = append(out, uint64(r.IntN(pages)))
		case 1:
			start := r.IntN(pages)
			for j := 0; j < 1+r.IntN(40) && start+j < pages && len(out) < n; j++ {
				out = append(out, uint64(start+j))
			}
		case 2:
			if len(out) > 0 {
				out = append(out, out[r.IntN(len(out))])
			}
		}
	}
	return out
}

// rawConn is a TCP connection that speaks frames by hand.
type rawConn struct {
	t  testing.TB
	nc net.Conn
}

func dialRaw(t testing.TB, s *Server) *rawConn {
	t.Helper()
	nc, err := net.Dial("tcp", s.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	// A guard against a hung test, not a synchronisation.
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawConn{t: t, nc: nc}
}

func (rc *rawConn) write(b []byte) {
	rc.t.Helper()
	if _, err := rc.nc.Write(b); err != nil {
		rc.t.Fatal(err)
	}
}

// hello says hello with a fresh nonce and returns it and the server's
// reply.
func (rc *rawConn) hello(id string, version uint16) (hello, helloReply) {
	rc.t.Helper()
	h := hello{version: version, snapshotID: id, nonce: newNonce()}
	rc.write(appendHello(nil, h))
	return h, rc.readHelloReply()
}

func (rc *rawConn) readHelloReply() helloReply {
	rc.t.Helper()
	typ, body, err := readFrame(rc.nc, maxHelloReplyFrame, nil)
	if err != nil || typ != frameHelloReply {
		rc.t.Fatalf("hello reply: type %d, %v", typ, err)
	}
	r, err := decodeHelloReply(body)
	if err != nil {
		rc.t.Fatal(err)
	}
	return r
}

// finish ends the handshake that h and r began, with capability c. It
// returns the session and the accept if the server accepts, or the
// refusal it sends instead.
func (rc *rawConn) finish(id string, c Capability, h hello, r helloReply) (*session, accept, helloReply) {
	rc.t.Helper()
	keys, err := deriveKeys(c, id, h.nonce, r.nonce)
	if err != nil {
		rc.t.Fatal(err)
	}
	sess, err := clientSession(keys)
	if err != nil {
		rc.t.Fatal(err)
	}
	rc.writeSealed(sess, beginFrame(nil, frameFinish))
	typ, body, err := readFrame(rc.nc, max(maxHelloReplyFrame, acceptFrameLen), nil)
	if err != nil {
		rc.t.Fatalf("after the finish: %v", err)
	}
	if typ == frameHelloReply {
		refusal, err := decodeHelloReply(body)
		if err != nil {
			rc.t.Fatal(err)
		}
		return nil, accept{}, refusal
	}
	pt, err := sess.open.open(typ, body)
	if err != nil || typ != frameAccept {
		rc.t.Fatalf("accept: type %d, %v", typ, err)
	}
	a, err := decodeAccept(pt)
	if err != nil {
		rc.t.Fatal(err)
	}
	return sess, a, helloReply{version: ProtocolVersion, status: helloOK}
}

// handshake runs a client's handshake by hand and fails the test unless
// the server accepts.
func (rc *rawConn) handshake(id string, c Capability) *session {
	rc.t.Helper()
	h, r := rc.hello(id, ProtocolVersion)
	if r.status != helloOK {
		rc.t.Fatalf("hello refused: %+v", r)
	}
	sess, _, refusal := rc.finish(id, c, h, r)
	if sess == nil {
		rc.t.Fatalf("handshake refused: %+v", refusal)
	}
	return sess
}

// writeSealed seals each of the unsealed frames with sess and writes them
// at once.
func (rc *rawConn) writeSealed(sess *session, frames ...[]byte) {
	rc.t.Helper()
	var b []byte
	for _, f := range frames {
		start := len(b)
		var err error
		if b, err = sess.seal.seal(append(b, f...), start); err != nil {
			rc.t.Fatal(err)
		}
	}
	rc.write(b)
}

// readSealed reads and opens one sealed frame.
func (rc *rawConn) readSealed(sess *session, limit uint32) (byte, []byte) {
	rc.t.Helper()
	typ, body, err := readFrame(rc.nc, limit, nil)
	if err == nil {
		body, err = sess.open.open(typ, body)
	}
	if err != nil {
		rc.t.Fatal(err)
	}
	return typ, body
}

// expectClosed reads until the server closes the connection, failing on
// anything but a clean close or a reset.
func (rc *rawConn) expectClosed() {
	rc.t.Helper()
	n, err := io.Copy(io.Discard, rc.nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		rc.t.Fatalf("connection still open after %d bytes", n)
	}
}

// holdFirstRequest makes the server's first request wait, once serving has
// begun, until release is closed; entered is closed when it begins.
func holdFirstRequest(s *Server) (entered, release chan struct{}) {
	entered, release = make(chan struct{}), make(chan struct{})
	var once atomic.Bool
	s.testHookServing = func(string) {
		if once.CompareAndSwap(false, true) {
			close(entered)
			<-release
		}
	}
	return entered, release
}
