package hostd

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/descriptor"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/lazyram"
	"github.com/snowflock-go/snowflock/mcast"
	"github.com/snowflock-go/snowflock/memserver"
)

// Multicast delivery, as SnowFlock's mcdist: when a ticket starts its
// clones, the parent's host (the sender) opens one mcast session to the
// distinct hosts of the ticket's clones (the members) with the key the
// coordinator chose for the ticket. It multicasts first the descriptor, with
// the memserver capability, so that N hosts get it for the price of one;
// then the snapshot's data pages in batches: first those a clone has just
// fetched by unicast from the memserver (the first request of a page serves
// every host), then the rest in page order at a capped rate, so that later
// faults find pages already local. Members put the pages into the lazy RAM
// file the clones map. Everything still works without it: a host that gets
// no descriptor in time, is evicted, or has multicast off fetches by
// unicast, as before.

// Object IDs in a session, and batch sizes.
const (
	objDescriptor  = 1
	firstPageBatch = 2
	pushBatch      = 256 // pages per multicast object: 1 MiB
	// eagerBatch is the pages per object of a snapshot whose clones
	// restore eagerly (Xen): no clone waits on any one page, so larger
	// objects, fewer acknowledgement rounds (4 MiB).
	eagerBatch = 4 * pushBatch
	// mcastStall evicts a member that makes no progress this long; a
	// member that joins late (a busy host) catches up by NAKs meanwhile.
	mcastStall = 5 * time.Second
	// mcastIdle ends a member's session when its sender has been silent
	// this long (it heartbeats every 100 ms while alive).
	mcastIdle = 30 * time.Second
)

// Default multicast settings.
const (
	DefaultMcastPort = 7502
	DefaultMcastWait = 2 * time.Second
	DefaultMcastRate = 100 << 20 // bytes per second of background pushes
)

// Payload magics.
var (
	envelopeMagic = [4]byte{'S', 'F', 'D', '1'}
	batchMagic    = [4]byte{'S', 'F', 'P', '1'}
)

var errBadPayload = errors.New("bad multicast payload")

// session is what the members and the sender of a ticket's session agree
// on, all derived from the ticket's key.
type session struct {
	id    uint64
	group netip.AddrPort
	key   [32]byte
}

// sessionFor derives a ticket's session from its key: the session ID and
// the group (in 239.192.0.0/16, organisation-local scope) come from a hash
// of the key, so that sessions of different tickets, or clusters, rarely
// share a group and never a key.
func sessionFor(keyHex string, port uint16) (session, error) {
	var s session
	k, err := hex.DecodeString(keyHex)
	if err != nil || len(k) != len(s.key) {
		return s, fmt.Errorf("bad multicast key")
	}
	copy(s.key[:], k)
	h := sha256.Sum256(append([]byte("snowflock mcast session\x00"), k...))
	s.id = binary.BigEndian.Uint64(h[:8]) | 1
	s.group = netip.AddrPortFrom(netip.AddrFrom4([4]byte{239, 192, h[8], h[9]}), port)
	return s, nil
}

// envelope is the descriptor object: what a clone host would otherwise
// fetch from the parent host's API.
type envelope struct {
	memID      string
	capability memserver.Capability
	blob       []byte
}

func encodeEnvelope(e envelope) []byte {
	b := append([]byte(nil), envelopeMagic[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(e.memID)))
	b = append(b, e.memID...)
	b = append(b, e.capability[:]...)
	return append(b, e.blob...)
}

func decodeEnvelope(b []byte) (envelope, error) {
	var e envelope
	if len(b) < 6 || [4]byte(b[:4]) != envelopeMagic {
		return e, fmt.Errorf("%w: not a descriptor envelope", errBadPayload)
	}
	n := int(binary.BigEndian.Uint16(b[4:]))
	b = b[6:]
	if n == 0 || n > memserver.MaxIDLen || len(b) < n+len(e.capability) {
		return e, fmt.Errorf("%w: envelope of %d bytes with a %d-byte ID", errBadPayload, len(b), n)
	}
	e.memID = string(b[:n])
	copy(e.capability[:], b[n:])
	e.blob = b[n+len(e.capability):]
	if len(e.blob) == 0 || len(e.blob) > descriptor.MaxSize || e.capability.IsZero() {
		return e, fmt.Errorf("%w: envelope without a descriptor or capability", errBadPayload)
	}
	return e, nil
}

// A page batch: magic, count n, n page numbers (ascending), n kinds
// (0 zero, 1 data), then the data pages back to back.
func encodeBatch(pages []memserver.Page) []byte {
	size := 8 + 9*len(pages)
	for _, p := range pages {
		if !p.Zero {
			size += memserver.PageSize
		}
	}
	b := make([]byte, 0, size)
	b = append(b, batchMagic[:]...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(pages)))
	for _, p := range pages {
		b = binary.BigEndian.AppendUint64(b, p.Num)
	}
	for _, p := range pages {
		if p.Zero {
			b = append(b, 0)
		} else {
			b = append(b, 1)
		}
	}
	for _, p := range pages {
		if !p.Zero {
			b = append(b, p.Data...)
		}
	}
	return b
}

// maxBatch bounds the pages of a batch a member accepts: what nextBatch
// can pick, demanded pages beyond a full batch included.
const maxBatch = 2 * eagerBatch

// decodeBatch parses a page batch of a snapshot of total pages. The pages'
// data alias b.
func decodeBatch(b []byte, total uint64) ([]lazyram.Page, error) {
	if len(b) < 8 || [4]byte(b[:4]) != batchMagic {
		return nil, fmt.Errorf("%w: not a page batch", errBadPayload)
	}
	n := uint64(binary.BigEndian.Uint32(b[4:]))
	if n == 0 || n > maxBatch || uint64(len(b)) < 8+9*n {
		return nil, fmt.Errorf("%w: batch of %d pages in %d bytes", errBadPayload, n, len(b))
	}
	nums, kinds, data := b[8:8+8*n], b[8+8*n:8+9*n], b[8+9*n:]
	out := make([]lazyram.Page, n)
	var used uint64
	for i := range n {
		p := binary.BigEndian.Uint64(nums[8*i:])
		if p >= total || (i > 0 && p <= out[i-1].Num) {
			return nil, fmt.Errorf("%w: page %d out of order or beyond %d", errBadPayload, p, total)
		}
		out[i].Num = p
		switch kinds[i] {
		case 0:
			out[i].Zero = true
		case 1:
			if uint64(len(data)) < used+memserver.PageSize {
				return nil, fmt.Errorf("%w: batch shorter than its data pages", errBadPayload)
			}
			out[i].Data = data[used : used+memserver.PageSize : used+memserver.PageSize]
			used += memserver.PageSize
		default:
			return nil, fmt.Errorf("%w: page kind %d", errBadPayload, kinds[i])
		}
	}
	if used != uint64(len(data)) {
		return nil, fmt.Errorf("%w: %d bytes after the data pages", errBadPayload, uint64(len(data))-used)
	}
	return out, nil
}

// mcastStats count this host's multicast, for /metrics.
type mcastStats struct {
	sessionsSent     atomic.Uint64
	descriptorsSent  atomic.Uint64
	pagesPushed      atomic.Uint64
	demandPages      atomic.Uint64
	evictions        atomic.Uint64
	bytesSent        atomic.Uint64
	descriptorsRecvd atomic.Uint64
	pagesReceived    atomic.Uint64
	fallbacks        atomic.Uint64
}

// --- the sender: the parent's host ---

// pusher is the sender side of one ticket's session.
type pusher struct {
	d      *Daemon
	ticket uint64
	ls     *localSnap
	log    hclog.Logger
	demand chan [2]uint64 // runs of pages clones fetched: first, count

	next  int    // index into ls's data ranges of the background push
	at    uint64 // page within that range
	sent  []uint64
	total uint64
	// quiet: the session has one member, so the pages clones fetch need
	// no push (the host that fetched them is the only one to push to);
	// they are only marked sent.
	quiet bool
	batch int // pages per object
}

// startPusher opens the session of ticket t, whose clones start from ls,
// if this host and some of the clones' hosts multicast. It runs until
// every data page is pushed, every member is evicted, or the snapshot is
// released.
func (d *Daemon) startPusher(ctx context.Context, ls *localSnap, t fsm.Ticket) {
	if !d.cfg.McastAddr.IsValid() || t.McastKey == "" || d.ms == nil {
		return
	}
	s, err := sessionFor(t.McastKey, d.cfg.McastPort)
	if err != nil {
		d.log.Warn("ticket with a bad multicast key", "ticket", t.ID, "error", err)
		return
	}
	var members []string
	for _, h := range t.Placements {
		if slices.Contains(members, h) {
			continue
		}
		host, _, err := d.coord.Host(ctx, h, nil)
		if err == nil && host.McastAddr != "" {
			members = append(members, h)
		}
	}
	if len(members) == 0 {
		return
	}
	total := uint64(ls.capture.RAMSize / memserver.PageSize)
	p := &pusher{d: d, ticket: t.ID, ls: ls, log: d.log.With("ticket", t.ID, "mcast_group", s.group),
		demand: make(chan [2]uint64, 4096), sent: make([]uint64, (total+63)/64), total: total, quiet: len(members) == 1,
		batch: pushBatch}
	if eagerDriver(ls.capture.Meta) {
		p.batch = eagerBatch
	}
	pctx, cancel := context.WithCancel(d.stopCtx)
	d.mu.Lock()
	if ls.releasedFlag {
		d.mu.Unlock()
		cancel()
		return
	}
	ls.pushers = append(ls.pushers, p)
	ls.stopPush = append(ls.stopPush, cancel)
	d.mu.Unlock()
	d.mcast.sessionsSent.Add(1)
	d.goRun(func() {
		defer cancel()
		p.run(pctx, s, members)
		d.mu.Lock()
		ls.pushers = slices.DeleteFunc(ls.pushers, func(q *pusher) bool { return q == p })
		d.mu.Unlock()
	})
}

func (p *pusher) run(ctx context.Context, s session, members []string) {
	d := p.d
	snd, err := mcast.NewSender(mcast.SenderConfig{LocalAddr: d.cfg.McastAddr, Group: s.group, SessionID: s.id,
		Key: s.key, Members: members, MTU: d.cfg.McastMTU, Rate: d.cfg.McastRate, StallTimeout: mcastStall,
		Logger: p.log.Named("mcast")})
	if err != nil {
		p.log.Error("multicast session", "error", err)
		return
	}
	start := time.Now()
	pushed := 0
	defer func() {
		st := snd.Stats()
		snd.Close()
		d.mcast.bytesSent.Add(st.BytesSent)
		p.log.Info("multicast session done", "pages", pushed, "evicted", snd.Evicted(), "took", time.Since(start),
			"bytes_sent", st.BytesSent, "data_packets", st.DataPackets, "repairs", st.RepairPackets, "parity", st.ParityPackets,
			"naks", st.NAKs)
	}()
	env := encodeEnvelope(envelope{memID: p.ls.memID, capability: p.ls.capability, blob: p.ls.blob})
	rep, err := snd.Send(ctx, objDescriptor, env)
	if err != nil {
		p.log.Debug("multicast of the descriptor ended", "error", err)
		return
	}
	d.mcast.descriptorsSent.Add(1)
	p.log.Info("descriptor multicast", "members", len(members), "completed", len(rep.Completed),
		"evicted", rep.Evicted, "took", rep.Duration)
	d.mcast.evictions.Add(uint64(len(rep.Evicted)))
	for obj := uint64(firstPageBatch); ctx.Err() == nil && len(snd.Evicted()) < len(members); obj++ {
		batch, demanded := p.nextBatch()
		if len(batch) == 0 {
			break
		}
		pages, err := d.ms.ReadPages(p.ls.memID, batch)
		if err != nil {
			p.log.Warn("reading pages to push", "error", err)
			return
		}
		rep, err := snd.Send(ctx, obj, encodeBatch(pages))
		if err != nil {
			p.log.Debug("multicast of pages ended", "error", err)
			return
		}
		d.mcast.pagesPushed.Add(uint64(len(batch)))
		d.mcast.demandPages.Add(uint64(demanded))
		d.mcast.evictions.Add(uint64(len(rep.Evicted)))
		pushed += len(batch)
	}
}

func (p *pusher) isSent(pg uint64) bool { return p.sent[pg/64]&(1<<(pg%64)) != 0 }
func (p *pusher) markSent(pg uint64)    { p.sent[pg/64] |= 1 << (pg % 64) }

// nextBatch picks the next pages to push, ascending: the pages clones
// fetched first (unless quiet), then the snapshot's data pages in order.
// It returns how many came from demand.
func (p *pusher) nextBatch() ([]uint64, int) {
	var out []uint64
	add := func(pg uint64) {
		if pg < p.total && !p.isSent(pg) {
			p.markSent(pg)
			out = append(out, pg)
		}
	}
drain:
	for len(out) < p.batch {
		select {
		case run := <-p.demand:
			for pg := run[0]; pg < run[0]+run[1] && len(out) < p.batch*2; pg++ {
				if p.quiet {
					if pg < p.total {
						p.markSent(pg)
					}
					continue
				}
				add(pg)
			}
		default:
			break drain
		}
	}
	demanded := len(out)
	ranges := p.ls.pages
	for len(out) < p.batch && p.next < len(ranges) {
		r := ranges[p.next]
		if p.at < r.Start {
			p.at = r.Start
		}
		if p.at >= r.Start+r.Count {
			p.next++
			continue
		}
		add(p.at)
		p.at++
	}
	slices.Sort(out)
	return out, demanded
}

// onServe hears from the memserver which pages a clone host fetched, and
// queues them for the sessions of that snapshot.
func (d *Daemon) onServe(memID string, first uint64, count int) {
	d.mu.Lock()
	var ps []*pusher
	for _, ls := range d.snaps {
		if ls.memID == memID {
			ps = ls.pushers
			break
		}
	}
	d.mu.Unlock()
	for _, p := range ps {
		select {
		case p.demand <- [2]uint64{first, uint64(count)}:
		default: // the background push gets there
		}
	}
}

// --- the members: clone hosts ---

// catcher is the member side of one ticket's session on a clone host.
type catcher struct {
	ticket uint64
	recv   *mcast.Receiver
	desc   chan envelope // the descriptor, once
	cancel context.CancelFunc
	refs   int // under Daemon.mu: local clones of the ticket
	// part of parts is this host's share of an eager fill: the pusher
	// sweeps from the first data page (part 0), and clone host i of the
	// ticket's hosts starts at part i+1, so that between them the hosts
	// fetch each page about once and the session carries it to the rest.
	part, parts int

	// ended is closed when the session is over for this host: the sender
	// said bye or fell silent, or evicted it.
	ended chan struct{}

	mu       sync.Mutex
	src      *source
	srcReady chan struct{}
	srcOnce  sync.Once
}

// joinSession returns the catcher of ticket t on this host, starting it
// with the first local clone of the ticket, or nil without multicast.
// Release it with leaveSession.
func (d *Daemon) joinSession(t fsm.TicketView) *catcher {
	if !d.cfg.McastAddr.IsValid() || t.McastKey == "" {
		return nil
	}
	d.mu.Lock()
	if c := d.catchers[t.ID]; c != nil {
		c.refs++
		d.mu.Unlock()
		return c
	}
	d.mu.Unlock()
	s, err := sessionFor(t.McastKey, d.cfg.McastPort)
	if err != nil {
		d.log.Warn("ticket with a bad multicast key", "ticket", t.ID, "error", err)
		return nil
	}
	r, err := mcast.NewReceiver(mcast.ReceiverConfig{LocalAddr: d.cfg.McastAddr, Group: s.group, SessionID: s.id,
		MemberID: d.cfg.NodeID, Key: s.key, MaxObjectSize: descriptor.MaxSize + 4096, IdleTimeout: mcastIdle,
		Queue: 8, Logger: d.log.Named("mcast").With("ticket", t.ID)})
	if err != nil {
		d.log.Warn("joining the ticket's multicast session; fetching by unicast", "ticket", t.ID, "error", err)
		return nil
	}
	ctx, cancel := context.WithCancel(d.stopCtx)
	c := &catcher{ticket: t.ID, recv: r, desc: make(chan envelope, 1), cancel: cancel, refs: 1,
		srcReady: make(chan struct{}), parts: 1, ended: make(chan struct{})}
	var hosts []string
	for _, h := range t.Placements {
		if !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	if i := slices.Index(hosts, d.cfg.NodeID); i >= 0 {
		c.part, c.parts = i+1, len(hosts)+1
	}
	d.mu.Lock()
	if old := d.catchers[t.ID]; old != nil { // raced with another clone
		old.refs++
		d.mu.Unlock()
		cancel()
		r.Close()
		return old
	}
	d.catchers[t.ID] = c
	d.mu.Unlock()
	d.goRun(func() { d.catch(ctx, c) })
	return c
}

// leaveSession drops a local clone's hold on its ticket's session.
func (d *Daemon) leaveSession(c *catcher) {
	if c == nil {
		return
	}
	d.mu.Lock()
	c.refs--
	last := c.refs == 0
	if last && d.catchers[c.ticket] == c {
		delete(d.catchers, c.ticket)
	}
	d.mu.Unlock()
	if last {
		c.cancel()
	}
}

// setSource tells the catcher where pushed pages go.
func (c *catcher) setSource(src *source) {
	c.srcOnce.Do(func() {
		c.mu.Lock()
		c.src = src
		c.mu.Unlock()
		close(c.srcReady)
	})
}

// catch receives the session's objects until it ends.
func (d *Daemon) catch(ctx context.Context, c *catcher) {
	defer close(c.ended)
	defer c.recv.Close()
	stop := context.AfterFunc(ctx, func() { c.recv.Close() })
	defer stop()
	log := d.log.With("ticket", c.ticket)
	start := time.Now()
	defer func() {
		st := c.recv.Stats()
		log.Info("multicast session left", "took", time.Since(start), "objects", st.Objects, "bytes_received", st.BytesReceived,
			"duplicates", st.Duplicates, "statuses_sent", st.StatusesSent, "naks_sent", st.NAKsSent, "parity_used", st.ParityUsed, "drops", fmt.Sprintf("%+v", st.Drops))
	}()
	for {
		obj, err := c.recv.Receive(ctx)
		if err != nil {
			if errors.Is(err, mcast.ErrEvicted) {
				log.Info("evicted from the multicast session: clones here fetch by unicast")
			} else if ctx.Err() == nil {
				log.Debug("multicast session ended", "error", err)
			}
			return
		}
		if obj.ID == objDescriptor {
			env, err := decodeEnvelope(obj.Data)
			if err != nil {
				log.Warn("multicast descriptor", "error", err)
				continue
			}
			select {
			case c.desc <- env:
			default:
			}
			continue
		}
		select {
		case <-c.srcReady:
		case <-ctx.Done():
			return
		}
		c.mu.Lock()
		src := c.src
		c.mu.Unlock()
		pages, err := decodeBatch(obj.Data, src.desc.TotalPages())
		if err != nil {
			log.Warn("multicast page batch", "error", err)
			continue
		}
		lz, err := d.lazyFS()
		if err != nil {
			return
		}
		if err := lz.InsertPages(src.lazyID, pages); err != nil {
			log.Debug("pushed pages not kept", "error", err)
			continue
		}
		d.mcast.pagesReceived.Add(uint64(len(pages)))
	}
}

// mcastDescriptor waits up to McastWait for the ticket's descriptor by
// multicast and checks it against what raft recorded.
func (d *Daemon) mcastDescriptor(ctx context.Context, c *catcher, meta fsm.Descriptor) (envelope, error) {
	t := time.NewTimer(d.cfg.McastWait)
	defer t.Stop()
	select {
	case env := <-c.desc:
		if int64(len(env.blob)) != meta.Size || descriptor.Digest(env.blob) != meta.SHA256 {
			return env, fmt.Errorf("%w: the multicast descriptor does not match raft's", descriptor.ErrInvalid)
		}
		// Keep it for another clone of this ticket here that prepares
		// later (a checkpoint's descriptor shared by tickets).
		select {
		case c.desc <- env:
		default:
		}
		return env, nil
	case <-t.C:
		return envelope{}, fmt.Errorf("no descriptor by multicast within %v", d.cfg.McastWait)
	case <-ctx.Done():
		return envelope{}, context.Cause(ctx)
	}
}

// mcastDefaults validates and completes the multicast settings.
func (c *Config) mcastDefaults() error {
	if !c.McastAddr.IsValid() {
		return nil
	}
	if a := c.McastAddr; !a.Is4() || a.IsUnspecified() || a.IsMulticast() {
		return fmt.Errorf("hostd: multicast address %v is not a unicast IPv4 address", a)
	}
	if c.McastPort == 0 {
		c.McastPort = DefaultMcastPort
	}
	if c.McastMTU == 0 {
		c.McastMTU = 1500
	}
	switch {
	case c.McastRate == 0:
		c.McastRate = DefaultMcastRate
	case c.McastRate < 0:
		c.McastRate = 0 // mcast: no cap
	}
	if c.McastWait <= 0 {
		c.McastWait = DefaultMcastWait
	}
	if c.pushStall <= 0 {
		c.pushStall = pushStall
	}
	return nil
}

func mcastMeta(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// McastStats is a snapshot of the host's multicast counters.
type McastStats struct {
	SessionsSent        uint64 `json:"sessions_sent"`        // sessions this host opened as sender
	DescriptorsSent     uint64 `json:"descriptors_sent"`     // descriptors every member acknowledged
	PagesPushed         uint64 `json:"pages_pushed"`         // pages multicast
	DemandPages         uint64 `json:"demand_pages"`         // of which a clone had fetched by unicast first
	Evictions           uint64 `json:"evictions"`            // members evicted (they fall back to unicast)
	BytesSent           uint64 `json:"bytes_sent"`           // wire bytes of finished sessions
	DescriptorsReceived uint64 `json:"descriptors_received"` // descriptors this host got by multicast
	PagesReceived       uint64 `json:"pages_received"`       // pushed pages put into clones' RAM files here
	Fallbacks           uint64 `json:"fallbacks"`            // descriptors fetched by unicast after waiting
}

// McastStats returns the host's multicast counters.
func (d *Daemon) McastStats() McastStats {
	m := &d.mcast
	return McastStats{SessionsSent: m.sessionsSent.Load(), DescriptorsSent: m.descriptorsSent.Load(),
		PagesPushed: m.pagesPushed.Load(), DemandPages: m.demandPages.Load(), Evictions: m.evictions.Load(),
		BytesSent: m.bytesSent.Load(), DescriptorsReceived: m.descriptorsRecvd.Load(),
		PagesReceived: m.pagesReceived.Load(), Fallbacks: m.fallbacks.Load()}
}

func (m *mcastStats) write(b *strings.Builder) {
	for _, c := range []struct {
		name, help string
		v          uint64
	}{
		{"sf_host_mcast_sessions_sent_total", "Multicast sessions this host opened as sender.", m.sessionsSent.Load()},
		{"sf_host_mcast_descriptors_sent_total", "Descriptors every member acknowledged.", m.descriptorsSent.Load()},
		{"sf_host_mcast_pages_pushed_total", "Pages multicast to clone hosts.", m.pagesPushed.Load()},
		{"sf_host_mcast_demand_pages_total", "Pushed pages a clone had fetched by unicast first.", m.demandPages.Load()},
		{"sf_host_mcast_evictions_total", "Members evicted from this host's sessions.", m.evictions.Load()},
		{"sf_host_mcast_bytes_sent_total", "Wire bytes of this host's finished sessions.", m.bytesSent.Load()},
		{"sf_host_mcast_descriptors_received_total", "Descriptors received by multicast.", m.descriptorsRecvd.Load()},
		{"sf_host_mcast_pages_received_total", "Pushed pages put into clones' RAM files here.", m.pagesReceived.Load()},
		{"sf_host_mcast_fallbacks_total", "Descriptors fetched by unicast after no multicast one came.", m.fallbacks.Load()},
	} {
		fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", c.name, c.help, c.name, c.name, c.v)
	}
}
