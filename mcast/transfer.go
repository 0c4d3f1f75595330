package mcast

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// transfer is the state of one Send: which fragments went out, which
// repairs are queued, what each member acknowledged. Only Send touches it.
type transfer struct {
	s        *Sender
	object   uint64
	data     []byte
	n        uint32 // fragments
	next     uint32 // fragments sent at least once
	start    time.Time
	repaired []int64 // per fragment: when last repaired, ns since start + 1; 0 never
	queue    []uint32
	// FEC: blocks of k fragments (0: none); per block, the parity symbols
	// issued so far and when the last were (ns since start + 1).
	k        int
	issued   []uint16
	parityAt []int64
	pqueue   []parityReq
	pbuf     []byte
	frags    [][]byte
	active   []*senderMember
	evicted  []string

	tokens     float64
	lastRefill time.Time
}

// Send multicasts data as object id to every member still in the session
// and returns once each of them has acknowledged all of it or has been
// evicted. A Send whose every member was evicted returns an error wrapping
// ErrNoMembers, with the report. Object IDs should differ between calls:
// members ignore repeats of the objects they recently completed.
func (s *Sender) Send(ctx context.Context, id uint64, data []byte) (Report, error) {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	n := fragments(uint64(len(data)), s.fragSize)
	if n > 1<<32-1 {
		return Report{}, fmt.Errorf("mcast: object of %d bytes is too large", len(data))
	}
	t := &transfer{s: s, object: id, data: data, n: uint32(n), start: time.Now(), repaired: make([]int64, n)}
	t.lastRefill = t.start
	if s.cfg.BlockSize > 0 {
		t.k = s.cfg.BlockSize
		nb := (n + uint64(t.k) - 1) / uint64(t.k)
		t.issued, t.parityAt = make([]uint16, nb), make([]int64, nb)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return Report{}, ErrClosed
	}
	s.busy = true
	s.last = pollBody{object: id, length: uint64(len(data)), fragSize: s.fragSize}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.busy = false
		s.last.sent = t.n
		s.mu.Unlock()
	}()
	for _, m := range s.order {
		if !m.evicted {
			m.contiguous, m.complete, m.lastProgress = 0, false, t.start
			t.active = append(t.active, m)
		}
	}
	for len(s.feedback) > 0 { // statuses about earlier objects
		<-s.feedback
	}
	err := t.run(ctx)
	r := Report{Object: id, Evicted: t.evicted, Duration: time.Since(t.start)}
	for _, m := range t.active {
		if m.complete {
			r.Completed = append(r.Completed, m.id)
		}
	}
	r.Stats = s.Stats()
	if err == nil && len(r.Completed) == 0 {
		err = fmt.Errorf("%w: object %d reached nobody", ErrNoMembers, id)
	}
	return r, err
}

// parityReq is a parity symbol to send.
type parityReq struct {
	block uint32
	index byte
}

// burst is how many packets run goes without looking at feedback.
const burst = 32

func (t *transfer) run(ctx context.Context) error {
	s := t.s
	var lastPoll time.Time
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		t.drain()
		now := time.Now()
		t.evictStalled(now)
		if len(t.active) == 0 {
			return nil
		}
		if !slices.ContainsFunc(t.active, func(m *senderMember) bool { return !m.complete }) {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("mcast: sending object %d: %w", t.object, err)
		}
		select {
		case <-s.quit:
			return fmt.Errorf("mcast: sending object %d: %w", t.object, ErrClosed)
		default:
		}
		sent, wait := t.sendBurst(now)
		if now.Sub(lastPoll) >= s.cfg.PollInterval {
			lastPoll = now
			s.mu.Lock()
			p := pollBody{object: t.object, length: uint64(len(t.data)), fragSize: s.fragSize, sent: t.next, evicted: slices.Clone(s.evicted)}
			s.mu.Unlock()
			s.sendPoll(p)
		}
		if sent {
			continue
		}
		// Blocked: on the window, on the rate, or on the members' ACKs.
		d := s.cfg.PollInterval - time.Since(lastPoll)
		if wait > 0 && wait < d {
			d = wait
		}
		timer.Reset(max(d, 50*time.Microsecond))
		select {
		case fb := <-s.feedback:
			t.handle(fb, time.Now())
		case <-timer.C:
		case <-ctx.Done():
		case <-s.quit:
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
	}
}

// drain handles the feedback queued so far.
func (t *transfer) drain() {
	for {
		select {
		case fb := <-t.s.feedback:
			t.handle(fb, time.Now())
		default:
			return
		}
	}
}

// handle applies one member's status: ACK progress and NAKed fragments,
// which are queued for repair unless repaired within the holdoff.
func (t *transfer) handle(fb feedback, now time.Time) {
	m, st := fb.m, fb.st
	if m.evicted || st.object != t.object || m.complete {
		return
	}
	if st.contiguous > m.contiguous || st.contiguous >= t.next {
		m.lastProgress = now // moving, or holding all that was sent
	}
	m.contiguous = max(m.contiguous, min(st.contiguous, t.n))
	if st.flags&flagComplete != 0 && st.received == t.n {
		m.complete, m.contiguous = true, t.n
		m.lastProgress = now
		return
	}
	if len(st.missing) == 0 && len(st.blocks) == 0 {
		return
	}
	t.s.stats.naks.Add(1)
	holdoff := t.s.cfg.RepairHoldoff.Nanoseconds()
	stamp := now.Sub(t.start).Nanoseconds() + 1
	for _, r := range st.missing {
		t.repairFragments(r.start, r.start+r.count, stamp, holdoff)
	}
	for _, bn := range st.blocks {
		t.repairBlock(bn, stamp, holdoff)
	}
}

// repairFragments queues the fragments in [from, to) that were sent and
// not repaired within the holdoff.
func (t *transfer) repairFragments(from, to uint32, stamp, holdoff int64) {
	for f := from; f < to && f < t.next; f++ {
		if last := t.repaired[f]; last != 0 && stamp-last < holdoff {
			t.s.stats.suppressed.Add(1)
			continue
		}
		t.repaired[f] = stamp
		t.queue = append(t.queue, f)
		t.s.stats.naked.Add(1)
	}
}

// repairBlock queues parity symbols for a block NAK. Symbols issued within
// the holdoff are taken as on their way to the member, unless it saw them
// pass already: it gets what it needs beyond them. After the holdoff the
// member's need is for symbols it has not seen, so new ones go. A block
// whose parity symbols are exhausted is repaired fragment by fragment.
func (t *transfer) repairBlock(bn blockNak, stamp, holdoff int64) {
	k := t.k
	if k == 0 || uint64(bn.block)*uint64(k) >= uint64(t.next) {
		return
	}
	b := bn.block
	send := int(bn.need)
	if last := t.parityAt[b]; last != 0 && stamp-last < holdoff {
		send = int(bn.seen) + int(bn.need) - int(t.issued[b])
		if send <= 0 {
			t.s.stats.suppressed.Add(uint64(bn.need))
			return
		}
	}
	t.parityAt[b] = stamp
	for range send {
		if int(t.issued[b]) >= maxParity(k) {
			first := b * uint32(k)
			t.repairFragments(first, first+uint32(k), stamp, holdoff)
			return
		}
		t.pqueue = append(t.pqueue, parityReq{block: b, index: byte(t.issued[b])})
		t.issued[b]++
		t.s.stats.nakedParity.Add(1)
	}
}

// evictStalled evicts the members that are behind and have not moved for
// StallTimeout, so that they no longer hold the window or the completion.
func (t *transfer) evictStalled(now time.Time) {
	s := t.s
	t.active = slices.DeleteFunc(t.active, func(m *senderMember) bool {
		if m.complete || now.Sub(m.lastProgress) < s.cfg.StallTimeout {
			return false
		}
		m.evicted = true
		t.evicted = append(t.evicted, m.id)
		s.stats.evictions.Add(1)
		s.mu.Lock()
		s.evicted = append(s.evicted, m.tag)
		s.mu.Unlock()
		s.log.Warn("member evicted: stalled", "member", m.id, "object", t.object, "acked", m.contiguous, "fragments", t.n, "stalled_for", now.Sub(m.lastProgress))
		return true
	})
}

// windowBase is the slowest active incomplete member's cumulative ACK.
func (t *transfer) windowBase() uint32 {
	base := t.n
	for _, m := range t.active {
		if !m.complete {
			base = min(base, m.contiguous)
		}
	}
	return base
}

// sendBurst sends up to burst packets, repairs first, within the window
// and the rate. It reports whether it sent any and, if the rate stopped
// it, how long until it may send again.
func (t *transfer) sendBurst(now time.Time) (bool, time.Duration) {
	s := t.s
	pkt := float64(s.cfg.MTU - ipUDPOverhead)
	if s.cfg.Rate > 0 {
		t.tokens = min(t.tokens+now.Sub(t.lastRefill).Seconds()*float64(s.cfg.Rate), burst*pkt)
		t.lastRefill = now
	}
	limit := uint64(t.windowBase()) + uint64(s.cfg.Window)
	sent := false
	for range burst {
		if s.cfg.Rate > 0 && t.tokens < pkt {
			return sent, time.Duration((pkt - t.tokens) / float64(s.cfg.Rate) * float64(time.Second))
		}
		var size int
		switch {
		case len(t.pqueue) > 0:
			p := t.pqueue[0]
			t.pqueue = t.pqueue[1:]
			size = t.sendParity(p)
			s.stats.parity.Add(1)
			s.stats.parityBytes.Add(uint64(size))
		case len(t.queue) > 0:
			f := t.queue[0]
			t.queue = t.queue[1:]
			size = t.sendFragment(f, flagRepair)
			s.stats.repairs.Add(1)
			s.stats.repairBytes.Add(uint64(size))
		case t.next < t.n && uint64(t.next) < limit:
			size = t.sendFragment(t.next, 0)
			s.stats.data.Add(1)
			s.stats.payload.Add(uint64(fragLen(uint64(len(t.data)), s.fragSize, t.next)))
			t.next++
		default:
			return sent, 0
		}
		sent = true
		t.tokens -= float64(size)
	}
	return sent, 0
}

func (t *transfer) sendFragment(f uint32, flags byte) int {
	fs := t.s.fragSize
	off := uint64(f) * uint64(fs)
	end := off + uint64(fragLen(uint64(len(t.data)), fs, f))
	d := dataBody{object: t.object, length: uint64(len(t.data)), fragSize: fs, index: f, flags: flags, blockSize: byte(t.k), payload: t.data[off:end]}
	return t.s.send(typeData, func(b []byte) []byte { return appendData(b, d) })
}

// sendParity encodes and sends one parity symbol.
func (t *transfer) sendParity(p parityReq) int {
	fs := t.s.fragSize
	length := uint64(len(t.data))
	first := p.block * uint32(t.k)
	t.frags = t.frags[:0]
	for f := first; f < t.n && f < first+uint32(t.k); f++ {
		off := uint64(f) * uint64(fs)
		t.frags = append(t.frags, t.data[off:off+uint64(fragLen(length, fs, f))])
	}
	t.pbuf = encodeParity(t.pbuf[:0], t.k, int(p.index), fragLen(length, fs, first), t.frags)
	pb := parityBody{object: t.object, length: length, fragSize: fs, blockSize: byte(t.k), block: p.block, index: p.index, payload: t.pbuf}
	return t.s.send(typeParity, func(b []byte) []byte { return appendParity(b, pb) })
}
