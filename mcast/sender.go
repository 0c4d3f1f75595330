package mcast

import (
	"context"
	"crypto/cipher"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

var (
	// ErrClosed is returned by calls on a closed Sender or Receiver.
	ErrClosed = errors.New("mcast: closed")
	// ErrNoMembers is wrapped by Send when no member of the session is
	// left to send to (all evicted, or none configured), or when every
	// member was evicted during the transfer.
	ErrNoMembers = errors.New("mcast: no member left in the session")
	// ErrEvicted is returned by Receive when the sender evicted this member
	// from the session: it must fetch what it misses by unicast.
	ErrEvicted = errors.New("mcast: evicted from the session; fall back to unicast")
	// ErrSessionClosed is returned by Receive once the sender has closed
	// the session and every completed object has been received.
	ErrSessionClosed = errors.New("mcast: the sender closed the session")
	// ErrSenderSilent is returned by Receive when nothing authentic came
	// from the sender for ReceiverConfig.IdleTimeout.
	ErrSenderSilent = errors.New("mcast: the sender fell silent")
	// ErrConfig is wrapped by NewSender and NewReceiver for a bad config.
	ErrConfig = errors.New("mcast: invalid config")
)

// SenderConfig configures a Sender. Zero durations and sizes take the
// defaults named.
type SenderConfig struct {
	// LocalAddr is the sender's IPv4 address on the interface multicast
	// must use; the feedback socket binds to it. Required.
	LocalAddr netip.Addr
	// Group is the IPv4 multicast group and port of the session.
	Group     netip.AddrPort
	SessionID uint64
	// Key is the session key the coordinator handed out; every member has
	// it.
	Key [32]byte
	// Members are the IDs of the receivers placed in the session (at most
	// MaxMembers); Send completes when each has the object or is evicted.
	Members []string
	// MTU is the path MTU (1500). Packets are at most MTU-28 bytes of UDP
	// payload.
	MTU int
	// Window bounds the fragments sent beyond the slowest active member's
	// cumulative ACK (4096).
	Window int
	// Rate caps the sending rate in bytes per second (0: no cap).
	Rate int64
	// PollInterval is how often the sender polls the members for their
	// status during a transfer (10ms).
	PollInterval time.Duration
	// RepairHoldoff is how long after repairing a fragment further NAKs
	// for it are ignored, so that members missing the same fragment cost
	// one repair (10ms).
	RepairHoldoff time.Duration
	// BlockSize is the FEC block size K (64, at most 128): members NAK
	// the fragments of each block of K by count, and the sender repairs a
	// block with Reed-Solomon parity packets, any m of which recover any m
	// missing fragments of the block at every member, so that a block's
	// repairs cost the most fragments one member misses in it, not the
	// fragments all members miss. Negative: no FEC, each missing fragment
	// is repaired itself.
	BlockSize int
	// StallTimeout evicts an incomplete member whose cumulative ACK has not
	// moved, while it is behind, for this long (2s).
	StallTimeout time.Duration
	// HeartbeatInterval is how often an idle sender polls, so that evicted
	// members learn it (100ms).
	HeartbeatInterval time.Duration
	Logger            hclog.Logger
	// LossRate drops this fraction of received feedback, with the seeded
	// generator LossSeed (tests).
	LossRate float64
	LossSeed uint64
}

// MaxMembers bounds a session's members, so that the evicted list of a
// poll fits in one packet.
const MaxMembers = 256

// Report is the outcome of one Send.
type Report struct {
	Object    uint64
	Completed []string // members that hold the whole object (ACKed)
	Evicted   []string // members evicted during this Send
	Duration  time.Duration
	Stats     SenderStats // cumulative, at the end of the Send
}

// senderMember is the sender's view of one member. The keys and replay
// guard belong to the feedback goroutine; the progress to Send.
type senderMember struct {
	id    string
	tag   uint32
	aead  cipher.AEAD
	guard replayGuard

	evicted      bool
	contiguous   uint32
	complete     bool
	lastProgress time.Time
}

// feedback is an authentic status from a member.
type feedback struct {
	m  *senderMember
	st statusBody
}

// Sender multicasts objects to the members of one session. Send calls are
// serialised; Stats and Close may be called at any time.
type Sender struct {
	cfg      SenderConfig
	log      hclog.Logger
	conn     *net.UDPConn
	group    *net.UDPAddr
	fragSize uint16
	members  map[uint32]*senderMember
	order    []*senderMember
	feedback chan feedback

	sendMu sync.Mutex // serialises Send

	writeMu sync.Mutex // serialises sealing and writing
	seal    *sealer
	wbuf    []byte

	mu      sync.Mutex // guards the fields below
	busy    bool
	last    pollBody // the last object, for heartbeats and the bye
	evicted []uint32
	closed  bool

	quit chan struct{}
	wg   sync.WaitGroup

	stats struct {
		packets, bytes, data, payload, repairs, repairBytes, parity, parityBytes, polls, statuses, naks, naked, nakedParity, suppressed, evictions atomic.Uint64
	}
	drops drops
}

func (c *SenderConfig) setDefaults() {
	if c.MTU == 0 {
		c.MTU = 1500
	}
	if c.Window == 0 {
		c.Window = 4096
	}
	if c.PollInterval == 0 {
		c.PollInterval = 10 * time.Millisecond
	}
	if c.RepairHoldoff == 0 {
		c.RepairHoldoff = 10 * time.Millisecond
	}
	if c.BlockSize == 0 {
		c.BlockSize = 64
	}
	if c.BlockSize < 0 {
		c.BlockSize = -1
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = 2 * time.Second
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = 100 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
}

func checkGroup(local netip.Addr, group netip.AddrPort) error {
	if !local.Is4() || local.IsUnspecified() {
		return fmt.Errorf("%w: local address %v is not a unicast IPv4 address", ErrConfig, local)
	}
	if !group.Addr().Is4() || !group.Addr().IsMulticast() || group.Port() == 0 {
		return fmt.Errorf("%w: group %v is not an IPv4 multicast address and port", ErrConfig, group)
	}
	return nil
}

// NewSender opens the sender's socket on cfg.LocalAddr and starts its
// feedback and heartbeat goroutines, which Close stops.
func NewSender(cfg SenderConfig) (*Sender, error) {
	cfg.setDefaults()
	if err := checkGroup(cfg.LocalAddr, cfg.Group); err != nil {
		return nil, err
	}
	if len(cfg.Members) > MaxMembers {
		return nil, fmt.Errorf("%w: %d members, at most %d", ErrConfig, len(cfg.Members), MaxMembers)
	}
	if cfg.MTU < 576 || cfg.MTU > 65535 {
		return nil, fmt.Errorf("%w: MTU %d", ErrConfig, cfg.MTU)
	}
	if cfg.BlockSize > maxBlockSize {
		return nil, fmt.Errorf("%w: block size %d, at most %d", ErrConfig, cfg.BlockSize, maxBlockSize)
	}
	if cfg.Window < 1 {
		return nil, fmt.Errorf("%w: window %d", ErrConfig, cfg.Window)
	}
	aead, err := senderAEAD(cfg.Key, cfg.SessionID)
	if err != nil {
		return nil, err
	}
	s := &Sender{
		cfg:      cfg,
		log:      cfg.Logger.Named("mcast-sender"),
		group:    net.UDPAddrFromAddrPort(cfg.Group),
		fragSize: uint16(cfg.MTU - ipUDPOverhead - headerLen - tagLen - dataBodyLen),
		members:  map[uint32]*senderMember{},
		feedback: make(chan feedback, 4096),
		seal:     newSealer(aead, cfg.SessionID, 0),
		wbuf:     make([]byte, 0, cfg.MTU),
		quit:     make(chan struct{}),
		last:     pollBody{fragSize: 1},
	}
	for _, id := range cfg.Members {
		tag := memberTag(id)
		if other, ok := s.members[tag]; ok {
			return nil, fmt.Errorf("%w: members %q and %q are the same or share a tag", ErrConfig, other.id, id)
		}
		a, err := memberAEAD(cfg.Key, cfg.SessionID, id)
		if err != nil {
			return nil, err
		}
		m := &senderMember{id: id, tag: tag, aead: a}
		s.members[tag] = m
		s.order = append(s.order, m)
	}
	if s.conn, err = listenSender(context.Background(), cfg.LocalAddr); err != nil {
		return nil, fmt.Errorf("mcast: sender socket on %s: %w", cfg.LocalAddr, err)
	}
	s.wg.Add(2)
	go s.readFeedback()
	go s.heartbeat()
	return s, nil
}

// Addr is the address members send their feedback to.
func (s *Sender) Addr() netip.AddrPort { return s.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// FragmentSize is the object bytes one packet carries.
func (s *Sender) FragmentSize() int { return int(s.fragSize) }

// Evicted returns the members evicted from the session so far.
func (s *Sender) Evicted() []string {
	var ids []string
	for _, m := range s.order {
		s.mu.Lock()
		if slices.Contains(s.evicted, m.tag) {
			ids = append(ids, m.id)
		}
		s.mu.Unlock()
	}
	return ids
}

// Stats returns the sender's counters.
func (s *Sender) Stats() SenderStats {
	st := &s.stats
	return SenderStats{PacketsSent: st.packets.Load(), BytesSent: st.bytes.Load(), DataPackets: st.data.Load(),
		PayloadBytes: st.payload.Load(), RepairPackets: st.repairs.Load(), RepairBytes: st.repairBytes.Load(),
		ParityPackets: st.parity.Load(), ParityBytes: st.parityBytes.Load(), NAKedParity: st.nakedParity.Load(),
		Polls: st.polls.Load(), Statuses: st.statuses.Load(), NAKs: st.naks.Load(), NAKedFragments: st.naked.Load(),
		SuppressedNAKs: st.suppressed.Load(), Evictions: st.evictions.Load(), Drops: s.drops.snapshot()}
}

// Close tells the members the session is over (a bye, sent three times as
// it is not acknowledged), closes the socket and stops the goroutines. A
// Send in progress fails.
func (s *Sender) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	bye := s.last
	bye.evicted = slices.Clone(s.evicted)
	s.mu.Unlock()
	close(s.quit)
	s.sendMu.Lock() // wait for a Send to notice
	for range 3 {
		s.send(typeBye, func(b []byte) []byte { return appendPoll(b, bye) })
	}
	s.sendMu.Unlock()
	err := s.conn.Close()
	s.wg.Wait()
	return err
}

// send seals and multicasts one packet and returns its size.
func (s *Sender) send(typ byte, body func([]byte) []byte) int {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	s.wbuf = s.seal.seal(s.wbuf, typ, body)
	n := len(s.wbuf)
	if _, err := s.conn.WriteToUDP(s.wbuf, s.group); err != nil {
		// The kernel may refuse a burst (ENOBUFS); loss is repaired.
		s.log.Trace("send failed", "error", err)
	}
	s.stats.packets.Add(1)
	s.stats.bytes.Add(uint64(n))
	return n
}

func (s *Sender) sendPoll(p pollBody) {
	s.stats.polls.Add(1)
	s.send(typePoll, func(b []byte) []byte { return appendPoll(b, p) })
}

// readFeedback reads, authenticates and queues the members' statuses
// until the socket closes.
func (s *Sender) readFeedback() {
	defer s.wg.Done()
	loss := newLossInjector(s.cfg.LossRate, s.cfg.LossSeed)
	buf := make([]byte, 65536)
	for {
		n, _, err := s.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		if loss.drop() {
			s.drops.injected.Add(1)
			continue
		}
		b := buf[:n]
		h, err := decodeHeader(b)
		switch {
		case err != nil:
			s.drops.malformed.Add(1)
			continue
		case h.session != s.cfg.SessionID:
			s.drops.session.Add(1)
			continue
		case h.typ != typeStatus:
			s.drops.unknown.Add(1) // our own multicast, looped back, or a peer's
			continue
		}
		m := s.members[h.origin]
		if m == nil {
			s.drops.unknown.Add(1)
			continue
		}
		w := m.guard.window(h.salt)
		if !w.fresh(h.seq) {
			s.drops.replay.Add(1)
			continue
		}
		pt, err := open(m.aead, h, b)
		if err != nil {
			s.drops.auth.Add(1)
			continue
		}
		st, err := decodeStatus(pt)
		if err != nil {
			s.drops.malformed.Add(1)
			continue
		}
		w.accept(h.seq)
		s.stats.statuses.Add(1)
		select {
		case s.feedback <- feedback{m, st}:
		default:
			s.drops.overflow.Add(1)
		}
	}
}

// heartbeat polls while no Send runs, so that evicted members learn it
// and the others re-ACK.
func (s *Sender) heartbeat() {
	defer s.wg.Done()
	t := time.NewTicker(s.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-s.quit:
			return
		case <-t.C:
		}
		s.mu.Lock()
		busy, p := s.busy, s.last
		p.evicted = slices.Clone(s.evicted)
		s.mu.Unlock()
		if !busy {
			s.sendPoll(p)
		}
	}
}
