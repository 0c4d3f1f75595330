package mcast

import (
	"context"
	"crypto/cipher"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// ReceiverConfig configures a Receiver. Zero durations and sizes take the
// defaults named.
type ReceiverConfig struct {
	// LocalAddr is the member's IPv4 address on the interface to join the
	// group on. Required.
	LocalAddr netip.Addr
	Group     netip.AddrPort
	SessionID uint64
	// MemberID is this member's ID, as the sender's member list has it.
	MemberID string
	Key      [32]byte
	// MaxObjectSize bounds the objects the member accepts (1 GiB).
	MaxObjectSize uint64
	// AckEvery is how many fragments the member takes between unsolicited
	// statuses (256).
	AckEvery int
	// NakRetry is how long the member waits before asking again for a
	// fragment it asked for (30ms).
	NakRetry time.Duration
	// Tick is the period of the member's timer: statuses while a transfer
	// is incomplete (10ms).
	Tick time.Duration
	// StatusGap is the least time from one status of an object to a
	// status of the timer (30ms): where packets come slowly (a loaded or
	// virtual host) the timer's statuses would otherwise rival the data
	// in packets, and each costs both ends a system call and a seal.
	// Statuses for a gap, every AckEvery fragments and on completion go
	// at once.
	StatusGap time.Duration
	// IdleTimeout ends the session with ErrSenderSilent when nothing
	// authentic comes from the sender for this long (0: never).
	IdleTimeout time.Duration
	// Queue is how many completed objects wait for Receive (4). While it
	// is full the member stops reading, and the sender may evict it.
	Queue int
	// Listen, if set, runs the creation of the member's sockets; tests
	// use it to create them in another network namespace.
	Listen func(create func() error) error
	Logger hclog.Logger
	// LossRate drops this fraction of received packets, with the seeded
	// generator LossSeed (tests).
	LossRate float64
	LossSeed uint64
}

func (c *ReceiverConfig) setDefaults() {
	if c.MaxObjectSize == 0 {
		c.MaxObjectSize = 1 << 30
	}
	if c.AckEvery == 0 {
		c.AckEvery = 256
	}
	if c.NakRetry == 0 {
		c.NakRetry = 30 * time.Millisecond
	}
	if c.Tick == 0 {
		c.Tick = 10 * time.Millisecond
	}
	if c.StatusGap == 0 {
		c.StatusGap = 30 * time.Millisecond
	}
	if c.Queue == 0 {
		c.Queue = 4
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	if c.Listen == nil {
		c.Listen = func(create func() error) error { return create() }
	}
}

// Object is an object a member received whole.
type Object struct {
	ID   uint64
	Data []byte
}

// Receiver is one member of a session: it reassembles the sender's
// objects, asks for what it misses and acknowledges what it holds. Its
// reading goroutine runs from NewReceiver to Close or the end of the
// session; Receive, Stats and Close may be called from any goroutine.
type Receiver struct {
	cfg      ReceiverConfig
	log      hclog.Logger
	group    *net.UDPConn
	feedback *net.UDPConn
	tag      uint32
	open     cipher.AEAD // the sender's packets
	seal     *sealer     // this member's statuses

	objects chan Object // closed when the session ends for this member
	err     error       // why, set before objects is closed
	quit    chan struct{}
	done    chan struct{}
	close   sync.Once

	// Owned by the reading goroutine.
	guard     replayGuard
	sender    netip.AddrPort // where statuses go; learnt from authentic packets
	cur       *assembly
	completed []uint64 // the last objects completed, newest last
	lastHeard time.Time
	wbuf      []byte

	stats struct {
		packets, bytes, data, dups, parity, parityUsed, statuses, naks, naked, objects, abandoned atomic.Uint64
	}
	drops drops
}

// assembly is an object being received.
type assembly struct {
	object     uint64
	length     uint64
	fragSize   uint16
	n          uint32
	data       []byte
	have       []uint64 // bitmap of fragments held
	received   uint32
	contiguous uint32
	horizon    uint32           // fragments known to have been sent
	nakAt      map[uint32]int64 // fragments asked for: when, in ns since the assembly began
	start      time.Time
	sinceAck   int
	dirty      bool      // progress since the last status
	statusAt   time.Time // the last status

	// FEC: the block size K the sender uses (0: none), once a data or
	// parity packet told it; the parity symbols held for incomplete
	// blocks; the parity asked for per block.
	k       int
	kKnown  bool
	parity  map[uint32]*blockParity
	blockAt map[uint32]blockAsk
}

// blockParity is the parity symbols a member holds for one block.
type blockParity struct {
	index   []int
	payload [][]byte
	seen    int // the highest index held, plus one
}

// blockAsk is the last request for a block's parity: when, and the
// symbols up to which it asked (seen + need).
type blockAsk struct {
	at     int64
	target int
}

// setK records the object's block size; false if it contradicts the one
// known.
func (a *assembly) setK(k byte) bool {
	if a.kKnown {
		return a.k == int(k)
	}
	a.k, a.kKnown = int(k), true
	return true
}

// blockRange is the fragments of block b.
func (a *assembly) blockRange(b uint32) (first, end uint32) {
	first = b * uint32(a.k)
	return first, uint32(min(uint64(first)+uint64(a.k), uint64(a.n)))
}

func (a *assembly) holds(f uint32) bool { return a.have[f/64]&(1<<(f%64)) != 0 }

const completedMemory = 16

// NewReceiver joins the group on cfg.LocalAddr and starts reading.
func NewReceiver(cfg ReceiverConfig) (*Receiver, error) {
	cfg.setDefaults()
	if err := checkGroup(cfg.LocalAddr, cfg.Group); err != nil {
		return nil, err
	}
	if cfg.MemberID == "" {
		return nil, fmt.Errorf("%w: no member ID", ErrConfig)
	}
	openAEAD, err := senderAEAD(cfg.Key, cfg.SessionID)
	if err != nil {
		return nil, err
	}
	sealAEAD, err := memberAEAD(cfg.Key, cfg.SessionID, cfg.MemberID)
	if err != nil {
		return nil, err
	}
	r := &Receiver{
		cfg:     cfg,
		log:     cfg.Logger.Named("mcast-receiver").With("member", cfg.MemberID),
		tag:     memberTag(cfg.MemberID),
		open:    openAEAD,
		objects: make(chan Object, cfg.Queue),
		quit:    make(chan struct{}),
		done:    make(chan struct{}),
		wbuf:    make([]byte, 0, 1500),
	}
	r.seal = newSealer(sealAEAD, cfg.SessionID, r.tag)
	err = cfg.Listen(func() error {
		var err error
		ctx := context.Background()
		if r.group, err = listenGroup(ctx, cfg.LocalAddr, cfg.Group); err != nil {
			return fmt.Errorf("mcast: joining %s on %s: %w", cfg.Group, cfg.LocalAddr, err)
		}
		if r.feedback, err = listenUnicast(ctx, cfg.LocalAddr); err != nil {
			r.group.Close()
			return fmt.Errorf("mcast: feedback socket on %s: %w", cfg.LocalAddr, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	r.lastHeard = time.Now()
	go r.run()
	return r, nil
}

// Receive returns the next object received whole. Once the session is
// over for this member it returns, after the objects already complete, an
// error wrapping ErrEvicted, ErrSessionClosed, ErrSenderSilent or
// ErrClosed.
func (r *Receiver) Receive(ctx context.Context) (Object, error) {
	select {
	case o, ok := <-r.objects:
		if !ok {
			return Object{}, r.err
		}
		return o, nil
	case <-ctx.Done():
		return Object{}, ctx.Err()
	}
}

// Close leaves the group and stops the reading goroutine.
func (r *Receiver) Close() error {
	var err error
	r.close.Do(func() {
		close(r.quit)
		err = errors.Join(r.group.Close(), r.feedback.Close())
		<-r.done
	})
	return err
}

// Stats returns the receiver's counters.
func (r *Receiver) Stats() ReceiverStats {
	st := &r.stats
	return ReceiverStats{PacketsReceived: st.packets.Load(), BytesReceived: st.bytes.Load(), DataPackets: st.data.Load(),
		Duplicates: st.dups.Load(), ParityPackets: st.parity.Load(), ParityUsed: st.parityUsed.Load(), StatusesSent: st.statuses.Load(), NAKsSent: st.naks.Load(), NAKedFragments: st.naked.Load(),
		Objects: st.objects.Load(), Abandoned: st.abandoned.Load(), Drops: r.drops.snapshot()}
}

// run reads the group until the session ends or Close.
func (r *Receiver) run() {
	r.err = r.loop()
	close(r.objects)
	close(r.done)
}

func (r *Receiver) loop() error {
	loss := newLossInjector(r.cfg.LossRate, r.cfg.LossSeed)
	buf := make([]byte, 65536)
	nextTick := time.Now().Add(r.cfg.Tick)
	r.group.SetReadDeadline(nextTick)
	for {
		n, from, err := r.group.ReadFromUDPAddrPort(buf)
		now := time.Now()
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
		case err != nil:
			select {
			case <-r.quit:
				return ErrClosed
			default:
				return fmt.Errorf("mcast: reading the group: %w", err)
			}
		case loss.drop():
			r.drops.injected.Add(1)
		default:
			if err := r.handle(buf[:n], from, now); err != nil {
				return err
			}
		}
		if now.After(nextTick) {
			if err := r.tick(now); err != nil {
				return err
			}
			nextTick = now.Add(r.cfg.Tick)
			r.group.SetReadDeadline(nextTick)
		}
	}
}

// tick sends a status for an incomplete object that moved or misses
// fragments, unless one went within StatusGap, and watches the sender's
// silence.
func (r *Receiver) tick(now time.Time) error {
	if r.cfg.IdleTimeout > 0 && now.Sub(r.lastHeard) > r.cfg.IdleTimeout {
		return fmt.Errorf("%w: nothing for %v", ErrSenderSilent, now.Sub(r.lastHeard).Round(time.Millisecond))
	}
	if a := r.cur; a != nil && (a.dirty || a.received < a.horizon) && now.Sub(a.statusAt) >= r.cfg.StatusGap {
		r.sendStatus(a, now)
	}
	return nil
}

// handle takes one datagram from the group. It returns an error when the
// session is over for this member.
func (r *Receiver) handle(b []byte, from netip.AddrPort, now time.Time) error {
	h, err := decodeHeader(b)
	switch {
	case err != nil:
		r.drops.malformed.Add(1)
		return nil
	case h.session != r.cfg.SessionID:
		r.drops.session.Add(1)
		return nil
	case h.typ == typeStatus:
		r.drops.unknown.Add(1)
		return nil
	}
	w := r.guard.window(h.salt)
	if !w.fresh(h.seq) {
		r.drops.replay.Add(1)
		return nil
	}
	pt, err := open(r.open, h, b)
	if err != nil {
		r.drops.auth.Add(1)
		return nil
	}
	switch h.typ {
	case typeData:
		d, err := decodeData(pt)
		if err != nil {
			r.drops.malformed.Add(1)
			return nil
		}
		r.accepted(w, h, from, len(b), now)
		return r.takeData(d, now)
	case typeParity:
		p, err := decodeParity(pt)
		if err != nil {
			r.drops.malformed.Add(1)
			return nil
		}
		r.accepted(w, h, from, len(b), now)
		return r.takeParity(p, now)
	default: // typePoll, typeBye
		p, err := decodePoll(pt)
		if err != nil {
			r.drops.malformed.Add(1)
			return nil
		}
		r.accepted(w, h, from, len(b), now)
		if slices.Contains(p.evicted, r.tag) {
			r.log.Warn("evicted by the sender", "object", p.object)
			return ErrEvicted
		}
		if h.typ == typeBye {
			return ErrSessionClosed
		}
		r.takePoll(p, now)
		return nil
	}
}

func (r *Receiver) accepted(w *replayWindow, h header, from netip.AddrPort, size int, now time.Time) {
	w.accept(h.seq)
	r.sender = from
	r.lastHeard = now
	r.stats.packets.Add(1)
	r.stats.bytes.Add(uint64(size))
}

// begin starts assembling object, abandoning an incomplete one: the sender
// moved past it, so this member was evicted or is about to learn it.
func (r *Receiver) begin(object, length uint64, fragSize uint16, now time.Time) *assembly {
	if slices.Contains(r.completed, object) {
		return nil
	}
	if length > r.cfg.MaxObjectSize {
		r.drops.malformed.Add(1)
		return nil
	}
	if a := r.cur; a != nil {
		if a.object == object {
			if a.length != length || a.fragSize != fragSize {
				r.drops.malformed.Add(1)
				return nil
			}
			return a
		}
		r.stats.abandoned.Add(1)
		r.log.Warn("object abandoned: the sender moved on", "object", a.object, "received", a.received, "fragments", a.n)
	}
	n := uint32(fragments(length, fragSize))
	r.cur = &assembly{object: object, length: length, fragSize: fragSize, n: n, data: make([]byte, length),
		have: make([]uint64, (n+63)/64), nakAt: map[uint32]int64{}, start: now,
		parity: map[uint32]*blockParity{}, blockAt: map[uint32]blockAsk{}}
	return r.cur
}

func (r *Receiver) takeData(d dataBody, now time.Time) error {
	r.stats.data.Add(1)
	a := r.begin(d.object, d.length, d.fragSize, now)
	if a == nil {
		r.stats.dups.Add(1) // a repair of an object completed here
		return nil
	}
	if !a.setK(d.blockSize) {
		r.drops.malformed.Add(1)
		return nil
	}
	if a.holds(d.index) {
		r.stats.dups.Add(1)
		return nil
	}
	a.store(d.index, d.payload)
	gap := d.index > a.horizon
	a.horizon = max(a.horizon, d.index+1)
	if a.k > 0 {
		r.recover(a, d.index/uint32(a.k))
	}
	if a.received == a.n {
		return r.complete(a, now)
	}
	a.sinceAck++
	if gap || a.sinceAck >= r.cfg.AckEvery {
		r.sendStatus(a, now)
	}
	return nil
}

// store takes fragment f.
func (a *assembly) store(f uint32, payload []byte) {
	copy(a.data[uint64(f)*uint64(a.fragSize):], payload)
	a.have[f/64] |= 1 << (f % 64)
	a.received++
	a.dirty = true
	delete(a.nakAt, f)
	for a.contiguous < a.n && a.holds(a.contiguous) {
		a.contiguous++
	}
}

// takeParity keeps a parity symbol of a block this member misses
// fragments of, and recovers them if it can.
func (r *Receiver) takeParity(p parityBody, now time.Time) error {
	a := r.begin(p.object, p.length, p.fragSize, now)
	if a == nil {
		r.stats.dups.Add(1)
		return nil
	}
	if !a.setK(p.blockSize) {
		r.drops.malformed.Add(1)
		return nil
	}
	r.stats.parity.Add(1)
	first, end := a.blockRange(p.block)
	held := 0
	for f := first; f < end; f++ {
		if a.holds(f) {
			held++
		}
	}
	bp := a.parity[p.block]
	if held == int(end-first) || (bp != nil && slices.Contains(bp.index, int(p.index))) {
		r.stats.dups.Add(1)
		return nil
	}
	if bp == nil {
		bp = &blockParity{}
		a.parity[p.block] = bp
	}
	bp.index = append(bp.index, int(p.index))
	bp.payload = append(bp.payload, slices.Clone(p.payload))
	bp.seen = max(bp.seen, int(p.index)+1)
	r.recover(a, p.block)
	if a.received == a.n {
		return r.complete(a, now)
	}
	return nil
}

// recover decodes block b's missing fragments if it holds as many parity
// symbols as they are.
func (r *Receiver) recover(a *assembly, b uint32) {
	bp := a.parity[b]
	if bp == nil {
		return
	}
	first, end := a.blockRange(b)
	frags := make([][]byte, 0, end-first)
	missing := 0
	for f := first; f < end; f++ {
		if a.holds(f) {
			off := uint64(f) * uint64(a.fragSize)
			frags = append(frags, a.data[off:off+uint64(fragLen(a.length, a.fragSize, f))])
		} else {
			frags = append(frags, nil)
			missing++
		}
	}
	if missing == 0 {
		delete(a.parity, b)
		delete(a.blockAt, b)
		return
	}
	if len(bp.index) < missing {
		return
	}
	size := fragLen(a.length, a.fragSize, first)
	miss, out, ok := decodeBlock(a.k, frags, bp.index[:missing], bp.payload[:missing], size)
	if !ok {
		return
	}
	for c, e := range miss {
		f := first + uint32(e)
		a.store(f, out[c][:fragLen(a.length, a.fragSize, f)])
	}
	r.stats.parityUsed.Add(uint64(missing))
	delete(a.parity, b)
	delete(a.blockAt, b)
}

func (r *Receiver) takePoll(p pollBody, now time.Time) {
	if slices.Contains(r.completed, p.object) {
		r.sendComplete(p.object, uint32(fragments(p.length, p.fragSize)))
		return
	}
	if p.sent == 0 {
		return
	}
	a := r.begin(p.object, p.length, p.fragSize, now)
	if a == nil {
		return
	}
	a.horizon = max(a.horizon, p.sent)
	r.sendStatus(a, now)
}

// complete acknowledges and delivers a whole object.
func (r *Receiver) complete(a *assembly, now time.Time) error {
	r.cur = nil
	r.completed = append(r.completed, a.object)
	if len(r.completed) > completedMemory {
		r.completed = r.completed[1:]
	}
	r.stats.objects.Add(1)
	r.sendComplete(a.object, a.n)
	r.log.Debug("object received", "object", a.object, "bytes", a.length, "took", now.Sub(a.start))
	select {
	case r.objects <- Object{ID: a.object, Data: a.data}:
		return nil
	case <-r.quit:
		return ErrClosed
	}
}

func (r *Receiver) sendComplete(object uint64, n uint32) {
	r.writeStatus(statusBody{object: object, contiguous: n, received: n, flags: flagComplete})
}

// maxRanges bounds the NAKed ranges of one status, so that it fits in
// any MTU the sender accepts.
const maxRanges = 64

// sendStatus acknowledges a's contiguous prefix and NAKs the fragments
// below its horizon that it misses and did not ask for within NakRetry.
func (r *Receiver) sendStatus(a *assembly, now time.Time) {
	st := statusBody{object: a.object, contiguous: a.contiguous, received: a.received}
	stamp := now.Sub(a.start).Nanoseconds() + 1
	retry := r.cfg.NakRetry.Nanoseconds()
	if a.k > 0 {
		r.nakBlocks(a, &st, stamp, retry)
	}
	for f := a.contiguous; a.k == 0 && f < a.horizon && len(st.missing) < maxRanges; f++ {
		if a.holds(f) {
			continue
		}
		if at, ok := a.nakAt[f]; ok && stamp-at < retry {
			continue
		}
		a.nakAt[f] = stamp
		r.stats.naked.Add(1)
		if k := len(st.missing); k > 0 && st.missing[k-1].start+st.missing[k-1].count == f {
			st.missing[k-1].count++
		} else {
			st.missing = append(st.missing, span{start: f, count: 1})
		}
	}
	if len(st.missing) > 0 || len(st.blocks) > 0 {
		r.stats.naks.Add(1)
	}
	a.sinceAck, a.dirty, a.statusAt = 0, false, now
	r.writeStatus(st)
}

// nakBlocks asks, for each block below the horizon that misses more
// fragments than it holds parity symbols, for the difference: again after
// NakRetry, or at once if it needs more than it last asked for.
func (r *Receiver) nakBlocks(a *assembly, st *statusBody, stamp, retry int64) {
	k := uint32(a.k)
	for b := a.contiguous / k; uint64(b)*uint64(k) < uint64(a.horizon) && len(st.blocks) < maxRanges; b++ {
		first, end := a.blockRange(b)
		missing := 0
		for f := first; f < end && f < a.horizon; f++ {
			if !a.holds(f) {
				missing++
			}
		}
		if missing == 0 {
			continue
		}
		held, seen := 0, 0
		if bp := a.parity[b]; bp != nil {
			held, seen = len(bp.index), bp.seen
		}
		need := missing - held
		if need <= 0 {
			continue
		}
		target := seen + need
		if ask, ok := a.blockAt[b]; ok && stamp-ask.at < retry && target <= ask.target {
			continue
		}
		a.blockAt[b] = blockAsk{at: stamp, target: target}
		r.stats.naked.Add(uint64(need))
		st.blocks = append(st.blocks, blockNak{block: b, need: byte(need), seen: byte(seen)})
	}
}

func (r *Receiver) writeStatus(st statusBody) {
	if !r.sender.IsValid() {
		return
	}
	r.wbuf = r.seal.seal(r.wbuf, typeStatus, func(b []byte) []byte { return appendStatus(b, st) })
	if _, err := r.feedback.WriteToUDPAddrPort(r.wbuf, r.sender); err != nil {
		r.log.Trace("status not sent", "error", err)
	}
	r.stats.statuses.Add(1)
}
