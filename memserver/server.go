package memserver

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config configures a Server. Zero fields take their defaults.
type Config struct {
	// Listen is the TCP address to listen on, ip:port; port 0 picks one
	// (see Server.Addr).
	Listen string
	// Logger defaults to a logger that discards.
	Logger hclog.Logger
	// MaxBatch is the most pages one request may ask for: default 256, at
	// most MaxBatchLimit. Clients learn it in the hello reply.
	MaxBatch int
	// MaxConns is the most connections open at once (default 1024); more
	// are closed as soon as they are accepted.
	MaxConns int
	// MaxInFlight is the most requests served at once over all
	// connections (default 64). Each holds a response buffer of up to
	// MaxBatch pages, so it bounds the server's memory.
	MaxInFlight int
	// HandshakeTimeout bounds the wait for a connection's hello (default
	// 10 s).
	HandshakeTimeout time.Duration
	// WriteTimeout bounds the writing of one response (default 30 s); a
	// client that does not read is disconnected.
	WriteTimeout time.Duration
	// OnServe, if set, is told of every run of pages a client was served:
	// the host multicasts them to the other hosts of the snapshot's clones.
	// It is called on the serving goroutine and must not block.
	OnServe func(snapshot string, first uint64, count int)
}

// maxConnInFlight is the most requests served at once for one connection;
// further pipelined requests wait in the socket (TCP pushes back).
const maxConnInFlight = 8

// ErrServerClosed is returned by Serve and Register after Close.
var ErrServerClosed = errors.New("memserver: server closed")

// ErrUnknownSnapshot is returned by Release for an ID that is not
// registered.
var ErrUnknownSnapshot = errors.New("memserver: unknown snapshot")

// Server serves the pages of registered snapshots. Its methods are safe for
// concurrent use.
type Server struct {
	cfg     Config
	log     hclog.Logger
	ln      net.Listener
	metrics metrics
	// refusedCapability stands in for the capability of an unknown
	// snapshot in the handshake, so that unknown IDs look and cost the same
	// as wrong capabilities.
	refusedCapability Capability

	slots chan struct{} // MaxInFlight
	bufs  sync.Pool     // *[]byte response buffers
	done  chan struct{} // closed by Close
	wg    sync.WaitGroup

	mu        sync.Mutex
	snapshots map[string]*snapshot
	conns     map[net.Conn]struct{}
	serving   bool
	closed    bool

	// testHookServing, if set, is called with a reference to the snapshot
	// held, before its pages are read.
	testHookServing func(snapshotID string)
	// testSealLimit, if not 0, is the most frames a connection seals
	// (its accept included) instead of maxSealedFrames.
	testSealLimit uint64
}

// New returns a server listening on cfg.Listen. It serves once Serve is
// called.
func New(cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.MaxBatch == 0 {
		cfg.MaxBatch = 256
	}
	if cfg.MaxBatch < 0 || cfg.MaxBatch > MaxBatchLimit {
		return nil, fmt.Errorf("memserver: MaxBatch %d not in 1..%d", cfg.MaxBatch, MaxBatchLimit)
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 1024
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 64
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 30 * time.Second
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("memserver: %w", err)
	}
	s := &Server{
		cfg:               cfg,
		log:               cfg.Logger,
		ln:                ln,
		refusedCapability: NewCapability(),
		slots:             make(chan struct{}, cfg.MaxInFlight),
		done:              make(chan struct{}),
		snapshots:         map[string]*snapshot{},
		conns:             map[net.Conn]struct{}{},
	}
	size := lengthLen + int(maxResponseFrame(cfg.MaxBatch)) // sealed
	s.bufs.New = func() interface{} {
		b := make([]byte, 0, size)
		return &b
	}
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Register serves a snapshot and returns the capability clients must
// present for it. The file is opened now and stays open until the snapshot
// is released and its last request answered.
func (s *Server) Register(spec SnapshotSpec) (Capability, error) {
	snap, err := openSnapshot(spec)
	if err != nil {
		return Capability{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		snap.release()
		return Capability{}, ErrServerClosed
	}
	if _, ok := s.snapshots[spec.ID]; ok {
		snap.release()
		return Capability{}, fmt.Errorf("memserver: snapshot %s is already registered", spec.ID)
	}
	s.snapshots[spec.ID] = snap
	s.log.Info("snapshot registered", "snapshot", spec.ID, "pages", snap.pages, "path", spec.Path)
	return snap.capability, nil
}

// Release stops serving a snapshot. Hellos and requests that arrive from
// now on are refused; requests already being served complete, and the file
// is closed after the last of them (Release does not wait for them).
func (s *Server) Release(id string) error {
	s.mu.Lock()
	snap, ok := s.snapshots[id]
	delete(s.snapshots, id)
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownSnapshot, id)
	}
	snap.release()
	s.log.Info("snapshot released", "snapshot", id)
	return nil
}

func (s *Server) lookup(id string) *snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snapshots[id]
}

// Serve accepts and serves connections until ctx ends or Close is called;
// then it closes the server, waits for every goroutine it started and
// returns nil. It returns ErrServerClosed at once if the server is closed.
func (s *Server) Serve(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.serving {
		s.mu.Unlock()
		return errors.New("memserver: Serve called twice")
	}
	s.serving = true
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	defer s.wg.Wait()

	backoff := time.Duration(0)
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			select {
			case <-s.done:
				return nil
			default:
			}
			// Out of file descriptors and the like: wait, as net/http does,
			// rather than give up serving every clone of this host.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept failed", "error", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return nil
			}
			continue
		}
		backoff = 0
		s.metrics.connsTotal.Add(1)
		if !s.track(nc) {
			nc.Close()
			continue
		}
		go s.serveConn(nc)
	}
}

// track adds a connection and a goroutine for it, unless the server is
// closed or full.
func (s *Server) track(nc net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if len(s.conns) >= s.cfg.MaxConns {
		s.metrics.connsRejected.Add(1)
		s.log.Warn("connection limit reached", "remote", nc.RemoteAddr(), "max_conns", s.cfg.MaxConns)
		return false
	}
	s.conns[nc] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(nc net.Conn) {
	s.mu.Lock()
	delete(s.conns, nc)
	s.mu.Unlock()
}

// Close stops the server: it stops accepting, closes every connection,
// waits for the goroutines serving them, and releases every snapshot.
// Requests being served when Close is called fail.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	close(s.done)
	err := s.ln.Close()
	for nc := range s.conns {
		nc.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()

	s.mu.Lock()
	snaps := s.snapshots
	s.snapshots = map[string]*snapshot{}
	s.mu.Unlock()
	for _, snap := range snaps {
		snap.release()
	}
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// serverConn is one client's connection, bound to one snapshot by its
// handshake.
type serverConn struct {
	s    *Server
	nc   net.Conn
	log  hclog.Logger
	snap *snapshot

	// wmu serialises sealing and writing: frames are numbered in the
	// order they are written.
	wmu    sync.Mutex
	seal   *sealer
	failed bool // a write failed; guarded by wmu
}

// serveConn runs a connection: the handshake, then requests until the
// client hangs up, sends a bad frame, or the server closes.
func (s *Server) serveConn(nc net.Conn) {
	defer s.wg.Done()
	defer s.untrack(nc)
	defer nc.Close()
	log := s.log.With("remote", nc.RemoteAddr().String())
	br := bufio.NewReaderSize(nc, 4096)
	snap, sess := s.handshake(nc, br, log)
	if snap == nil {
		return
	}
	c := &serverConn{s: s, nc: nc, log: log.With("snapshot", snap.id), snap: snap, seal: sess.seal}
	var inflight sync.WaitGroup
	defer inflight.Wait()

	perConn := make(chan struct{}, maxConnInFlight)
	limit := maxRequestFrame(s.cfg.MaxBatch)
	buf := make([]byte, limit)
	for {
		typ, body, err := readFrame(br, limit, buf)
		if err == nil {
			body, err = sess.open.open(typ, body)
		}
		if err == nil && typ != frameRequest {
			err = protocolError("frame type %d after the handshake", typ)
		}
		var req request
		if err == nil {
			req, err = decodeRequest(body, s.cfg.MaxBatch)
		}
		if err != nil {
			s.connError(c.log, err)
			if !errors.Is(err, io.EOF) {
				// Handlers blocked writing to a client that is gone or
				// broken fail at once. A client that has only finished
				// sending still gets its answers.
				nc.Close()
			}
			return
		}
		select {
		case perConn <- struct{}{}:
		case <-s.done:
			return
		}
		select {
		case s.slots <- struct{}{}:
		case <-s.done:
			return
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer func() { <-s.slots; <-perConn }()
			c.serveRequest(req)
		}()
	}
}

// connError accounts for the error that ends a connection.
func (s *Server) connError(log hclog.Logger, err error) {
	switch {
	case errors.Is(err, ErrAuth):
		s.metrics.authFailures.Add(1)
		log.Warn("closing connection: frame failed authentication", "error", err)
	case errors.Is(err, ErrProtocol):
		s.metrics.badFrames.Add(1)
		log.Warn("closing connection: bad frame", "error", err)
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
	default:
		log.Debug("connection ended", "error", err)
	}
}

// serveRequest answers one request. The counters are updated before the
// response is written, so that a client that has its answer sees them. The
// response is built unsealed, concurrently with the connection's other
// requests, then sealed whole in place, in write order.
func (c *serverConn) serveRequest(req request) {
	s := c.s
	start := time.Now()
	bp := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(bp)
	b, failed := c.buildResponse((*bp)[:0], req)
	*bp = b[:0]

	s.metrics.requests.Add(1)
	if failed {
		s.metrics.errors.Add(1)
	}
	s.metrics.sentBytes.Add(uint64(len(b) + tagLen))
	s.metrics.observe(time.Since(start))

	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.failed {
		return
	}
	b, err := c.seal.seal(b, 0)
	if err != nil {
		// The client reconnects, with new keys.
		c.failed = true
		c.nc.Close()
		c.log.Info("closing connection", "reason", err)
		return
	}
	*bp = b[:0]
	c.nc.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
	if _, err := c.nc.Write(b); err != nil {
		// The stream is broken mid-frame: the connection is over.
		c.failed = true
		c.nc.Close()
		c.log.Debug("response write failed", "error", err)
	}
}

// buildResponse appends the response to req to b. It reports whether the
// response is an error.
func (c *serverConn) buildResponse(b []byte, req request) ([]byte, bool) {
	snap := c.snap
	fail := func(status byte, format string, a ...interface{}) ([]byte, bool) {
		msg := fmt.Sprintf(format, a...)
		c.log.Debug("request failed", "request", req.id, "error", msg)
		return appendResponse(b, response{id: req.id, status: status, message: msg}), true
	}
	if !snap.inRange(req.ranges) {
		return fail(statusOutOfRange, "pages beyond the snapshot's %d", snap.pages)
	}
	if !snap.acquire() {
		return fail(statusReleased, "snapshot %s released", snap.id)
	}
	defer snap.unref()
	if h := c.s.testHookServing; h != nil {
		h(snap.id)
	}

	n := req.pages()
	start := len(b)
	b = beginFrame(b, frameResponse)
	b = binary.BigEndian.AppendUint64(b, req.id)
	b = append(b, statusOK)
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	kindsAt := len(b)
	end := kindsAt + n + n*PageSize
	if cap(b) < end {
		b = append(b[:cap(b)], make([]byte, end-cap(b))...)
	}
	b = b[:end]
	nData, nHoles, err := snap.readPages(req.ranges, b[kindsAt:kindsAt+n], b[kindsAt+n:])
	if err != nil {
		c.log.Error("reading snapshot failed", "error", err)
		b = b[:start]
		return fail(statusReadError, "reading snapshot %s: %v", snap.id, err)
	}
	if h := c.s.cfg.OnServe; h != nil {
		for _, pr := range req.ranges {
			h(snap.id, pr.first, int(pr.count))
		}
	}
	m := &c.s.metrics
	m.dataPages.Add(uint64(nData))
	m.zeroPages.Add(uint64(n - nData))
	m.holePages.Add(uint64(nHoles))
	m.dataBytes.Add(uint64(nData * PageSize))
	return finishFrame(b[:kindsAt+n+nData*PageSize], start), false
}

// ReadPages reads pages of a registered snapshot in this process, as a
// request would (zero pages come back Zero, without data): for pushing a
// snapshot's pages by other means than the protocol.
func (s *Server) ReadPages(id string, pages []uint64) ([]Page, error) {
	snap := s.lookup(id)
	if snap == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownSnapshot, id)
	}
	var ranges []pageRange
	for _, p := range pages {
		if n := len(ranges); n > 0 && ranges[n-1].first+uint64(ranges[n-1].count) == p && ranges[n-1].count < 1<<20 {
			ranges[n-1].count++
		} else {
			ranges = append(ranges, pageRange{first: p, count: 1})
		}
	}
	if !snap.inRange(ranges) {
		return nil, fmt.Errorf("memserver: pages beyond snapshot %s's %d", id, snap.pages)
	}
	if !snap.acquire() {
		return nil, fmt.Errorf("%w: %q released", ErrUnknownSnapshot, id)
	}
	defer snap.unref()
	kinds := make([]byte, len(pages))
	data := make([]byte, len(pages)*PageSize)
	if _, _, err := snap.readPages(ranges, kinds, data); err != nil {
		return nil, fmt.Errorf("memserver: reading snapshot %s: %w", id, err)
	}
	out := make([]Page, len(pages))
	d := 0
	for i, p := range pages {
		out[i].Num = p
		if kinds[i] == kindZero {
			out[i].Zero = true
			continue
		}
		out[i].Data = data[d*PageSize : (d+1)*PageSize : (d+1)*PageSize]
		d++
	}
	return out, nil
}
