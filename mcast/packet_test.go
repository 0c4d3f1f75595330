package mcast

import (
	"bytes"
	"context"
	"crypto/cipher"
	"net/netip"
	"time"

	"errors"
	"github.com/hashicorp/go-hclog"
	"reflect"
	"testing"
)

func TestBodiesRoundTrip(t *testing.T) {
	datas := []dataBody{
		{object: 1, length: 0, fragSize: 1400, index: 0, payload: []byte{}},
		{object: 2, length: 3000, fragSize: 1400, index: 2, flags: flagRepair, payload: bytes.Repeat([]byte{7}, 200)},
		{object: 1 << 60, length: 1400, fragSize: 1400, index: 0, payload: bytes.Repeat([]byte{1}, 1400)},
	}
	for i, d := range datas {
		got, err := decodeData(appendData(nil, d))
		if err != nil || !reflect.DeepEqual(got, d) {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, d)
		}
	}
	polls := []pollBody{
		{object: 1, length: 10, fragSize: 3, sent: 4},
		{object: 9, length: 0, fragSize: 1, sent: 0, evicted: []uint32{1, 0xffffffff}},
	}
	for i, p := range polls {
		got, err := decodePoll(appendPoll(nil, p))
		if err != nil || !reflect.DeepEqual(got, p) {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, p)
		}
	}
	statuses := []statusBody{
		{object: 3, contiguous: 5, received: 9},
		{object: 3, contiguous: 9, received: 9, flags: flagComplete},
		{object: 4, contiguous: 0, received: 2, missing: []span{{0, 1}, {5, 100}}},
	}
	for i, s := range statuses {
		got, err := decodeStatus(appendStatus(nil, s))
		if err != nil || !reflect.DeepEqual(got, s) {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, s)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	good := appendHeader(nil, header{typ: typeData, session: 1, seq: 2})
	good = append(good, make([]byte, tagLen)...)
	if _, err := decodeHeader(good); err != nil {
		t.Fatalf("good header: %v", err)
	}
	mut := func(f func([]byte) []byte) []byte { return f(bytes.Clone(good)) }
	cases := []struct {
		name string
		err  error
	}{
		{"short", func() error { _, err := decodeHeader(good[:headerLen+tagLen-1]); return err }()},
		{"magic", func() error { _, err := decodeHeader(mut(func(b []byte) []byte { b[0] = 'X'; return b })); return err }()},
		{"version", func() error { _, err := decodeHeader(mut(func(b []byte) []byte { b[2] = 9; return b })); return err }()},
		{"type", func() error { _, err := decodeHeader(mut(func(b []byte) []byte { b[3] = 99; return b })); return err }()},
		{"data from a member", func() error { _, err := decodeHeader(mut(func(b []byte) []byte { b[15] = 1; return b })); return err }()},
		{"status from origin 0", func() error {
			_, err := decodeHeader(mut(func(b []byte) []byte { b[3] = typeStatus; return b }))
			return err
		}()},
		{"data index past the end", func() error {
			_, err := decodeData(appendData(nil, dataBody{length: 10, fragSize: 5, index: 2}))
			return err
		}()},
		{"data payload length", func() error {
			_, err := decodeData(appendData(nil, dataBody{length: 10, fragSize: 5, index: 1, payload: []byte{1}}))
			return err
		}()},
		{"data fragment size 0", func() error { _, err := decodeData(appendData(nil, dataBody{length: 10})); return err }()},
		{"poll sent past the end", func() error {
			_, err := decodePoll(appendPoll(nil, pollBody{length: 10, fragSize: 5, sent: 3}))
			return err
		}()},
		{"poll truncated list", func() error {
			b := appendPoll(nil, pollBody{length: 10, fragSize: 5, evicted: []uint32{1}})
			_, err := decodePoll(b[:len(b)-1])
			return err
		}()},
		{"status empty range", func() error {
			_, err := decodeStatus(appendStatus(nil, statusBody{missing: []span{{1, 0}}}))
			return err
		}()},
		{"status received below contiguous", func() error {
			_, err := decodeStatus(appendStatus(nil, statusBody{contiguous: 2, received: 1}))
			return err
		}()},
	}
	for i, c := range cases {
		if !errors.Is(c.err, errMalformed) {
			t.Errorf("#%d %s: got %v, want errMalformed", i, c.name, c.err)
		}
	}
}

func TestReplayWindow(t *testing.T) {
	var w replayWindow
	steps := []struct {
		seq   uint64
		fresh bool
	}{
		{5, true}, {5, false}, {3, true}, {3, false}, {6, true}, {4, true},
		{windowBits + 100, true}, {6, false}, {101, true}, {100, false}, {99, false},
		{windowBits + 99, true}, {windowBits + 99, false}, {1 << 40, true}, {windowBits + 101, false},
	}
	for i, s := range steps {
		if got := w.fresh(s.seq); got != s.fresh {
			t.Fatalf("#%d seq %d: fresh %v, want %v", i, s.seq, got, s.fresh)
		}
		if s.fresh {
			w.accept(s.seq)
		}
	}
}

func TestSealOpen(t *testing.T) {
	var key [32]byte
	key[0] = 1
	a, _ := senderAEAD(key, 7)
	s := newSealer(a, 7, 0)
	pkt := s.seal(nil, typePoll, func(b []byte) []byte { return appendPoll(b, pollBody{object: 3, fragSize: 1}) })
	h, err := decodeHeader(pkt)
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := open(a, h, bytes.Clone(pkt)); err != nil {
		t.Fatalf("open: %v", err)
	} else if p, err := decodePoll(pt); err != nil || p.object != 3 {
		t.Fatalf("poll %+v, %v", p, err)
	}
	otherSession, _ := senderAEAD(key, 8)
	member, _ := memberAEAD(key, 7, "host-1")
	key[0] = 2
	otherKey, _ := senderAEAD(key, 7)
	for i, aead := range []cipher.AEAD{otherSession, member, otherKey} {
		if _, err := open(aead, h, bytes.Clone(pkt)); !errors.Is(err, errAuth) {
			t.Errorf("#%d: opened with another key: %v", i, err)
		}
	}
	for i := range pkt {
		b := bytes.Clone(pkt)
		b[i] ^= 4
		if h2, err := decodeHeader(b); err == nil {
			if _, err := open(a, h2, b); !errors.Is(err, errAuth) {
				t.Fatalf("byte %d altered: %v", i, err)
			}
		}
	}
	if memberTag("a") == memberTag("b") || memberTag("a") == 0 {
		t.Error("member tags collide")
	}
}

func FuzzDecodeHeader(f *testing.F) {
	f.Add(append(appendHeader(nil, header{typ: typeData, session: 1, seq: 2}), make([]byte, tagLen)...))
	f.Add(append(appendHeader(nil, header{typ: typeStatus, session: 1, origin: 3}), make([]byte, tagLen)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeHeader(b)
		if err != nil {
			return
		}
		if re := appendHeader(nil, h); !bytes.Equal(re, b[:headerLen]) {
			t.Fatalf("header %+v re-encodes as %x, not %x", h, re, b[:headerLen])
		}
	})
}

func FuzzDecodeData(f *testing.F) {
	f.Add(appendData(nil, dataBody{object: 1, length: 3000, fragSize: 1400, index: 2, payload: make([]byte, 200)}))
	f.Add(appendData(nil, dataBody{length: 0, fragSize: 1}))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := decodeData(b)
		if err != nil {
			return
		}
		if re := appendData(nil, d); !bytes.Equal(re, b) {
			t.Fatalf("data %+v re-encodes differently", d)
		}
		if off := uint64(d.index) * uint64(d.fragSize); off+uint64(len(d.payload)) > d.length && d.length > 0 {
			t.Fatalf("fragment %d of %d bytes past the object's %d", d.index, len(d.payload), d.length)
		}
	})
}

func FuzzDecodePoll(f *testing.F) {
	f.Add(appendPoll(nil, pollBody{object: 1, length: 10, fragSize: 3, sent: 4, evicted: []uint32{5}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := decodePoll(b)
		if err != nil {
			return
		}
		if re := appendPoll(nil, p); !bytes.Equal(re, b) {
			t.Fatalf("poll %+v re-encodes differently", p)
		}
	})
}

func FuzzDecodeStatus(f *testing.F) {
	f.Add(appendStatus(nil, statusBody{object: 4, contiguous: 0, received: 2, missing: []span{{0, 1}, {5, 100}}}))
	f.Add(appendStatus(nil, statusBody{object: 4, contiguous: 0, received: 2, blocks: []blockNak{{0, 1, 0}, {7, 3, 2}}}))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := decodeStatus(b)
		if err != nil {
			return
		}
		if re := appendStatus(nil, s); !bytes.Equal(re, b) {
			t.Fatalf("status %+v re-encodes differently", s)
		}
	})
}

func FuzzDecodeParity(f *testing.F) {
	f.Add(appendParity(nil, parityBody{object: 1, length: 3000, fragSize: 1400, blockSize: 2, block: 1, index: 3, payload: make([]byte, 200)}))
	f.Add(appendParity(nil, parityBody{length: 0, fragSize: 1, blockSize: 64}))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := decodeParity(b)
		if err != nil {
			return
		}
		if re := appendParity(nil, p); !bytes.Equal(re, b) {
			t.Fatalf("parity %+v re-encodes differently", p)
		}
		if first := uint64(p.block) * uint64(p.blockSize); first >= fragments(p.length, p.fragSize) || int(p.index)+int(p.blockSize) > 256 {
			t.Fatalf("parity %d of block %d of %d past the object or the code", p.index, p.block, p.blockSize)
		}
	})
}

// FuzzReceiverPacket feeds a member's packet handling with bodies sealed
// under the session key, as a faulty or hostile key holder could, and with
// raw datagrams: nothing may panic, and the state stays consistent.
func FuzzReceiverPacket(f *testing.F) {
	f.Add(byte(typeData), appendData(nil, dataBody{object: 1, length: 3000, fragSize: 1400, index: 2, payload: make([]byte, 200)}), false)
	f.Add(byte(typeData), appendData(nil, dataBody{object: 1, length: 5, fragSize: 1400, payload: make([]byte, 5)}), false)
	f.Add(byte(typePoll), appendPoll(nil, pollBody{object: 1, length: 10, fragSize: 3, sent: 4}), false)
	f.Add(byte(typeBye), appendPoll(nil, pollBody{object: 1, length: 10, fragSize: 3, sent: 4}), false)
	f.Add(byte(typeData), appendData(nil, dataBody{object: 1, length: 300, fragSize: 100, index: 1, blockSize: 2, payload: make([]byte, 100)}), false)
	f.Add(byte(typeParity), appendParity(nil, parityBody{object: 1, length: 300, fragSize: 100, blockSize: 2, block: 1, index: 0, payload: make([]byte, 100)}), false)
	f.Add(byte(typeParity), appendParity(nil, parityBody{object: 1, length: 3000, fragSize: 1400, blockSize: 2, block: 1, index: 3, payload: make([]byte, 200)}), false)
	f.Add(byte(typeParity), appendParity(nil, parityBody{object: 1, length: 50, fragSize: 100, blockSize: 1, block: 0, index: 5, payload: make([]byte, 50)}), false)
	f.Add(byte(typeData), []byte("SM\x02\x01 raw bytes"), true)
	var key [32]byte
	// Statuses go to the discard port on loopback.
	fb, err := listenUnicast(context.Background(), netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		f.Fatal(err)
	}
	defer fb.Close()
	f.Fuzz(func(t *testing.T, typ byte, body []byte, raw bool) {
		open, _ := senderAEAD(key, 1)
		self, _ := memberAEAD(key, 1, "m")
		r := &Receiver{cfg: ReceiverConfig{SessionID: 1, MaxObjectSize: 1 << 20, AckEvery: 4, NakRetry: time.Millisecond},
			tag: memberTag("m"), open: open, feedback: fb, seal: newSealer(self, 1, memberTag("m")),
			objects: make(chan Object, 1<<12), quit: make(chan struct{})}
		r.log = hclogNull()
		from := netip.MustParseAddrPort("127.0.0.1:9")
		pkt := body
		if !raw {
			s := newSealer(open, 1, 0)
			pkt = s.seal(nil, typ, func(b []byte) []byte { return append(b, body...) })
		}
		for range 2 { // the second time, a replay
			_ = r.handle(bytes.Clone(pkt), from, time.Now())
		}
		if a := r.cur; a != nil {
			if a.received > a.n || a.contiguous > a.received || uint64(len(a.data)) != a.length {
				t.Fatalf("inconsistent assembly %+v", a)
			}
		}
	})
}

func hclogNull() hclog.Logger { return hclog.NewNullLogger() }

// TestStatusGap: the member's timer sends a status for an object that
// moved, but no sooner than StatusGap after the object's last status.
func TestStatusGap(t *testing.T) {
	var key [32]byte
	fb, err := listenUnicast(context.Background(), netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	open, _ := senderAEAD(key, 1)
	self, _ := memberAEAD(key, 1, "m")
	r := &Receiver{cfg: ReceiverConfig{SessionID: 1, MaxObjectSize: 1 << 20, AckEvery: 1 << 20, NakRetry: time.Hour,
		Tick: 10 * time.Millisecond, StatusGap: 30 * time.Millisecond},
		tag: memberTag("m"), open: open, feedback: fb, seal: newSealer(self, 1, memberTag("m")),
		objects: make(chan Object, 4), quit: make(chan struct{})}
	r.log = hclogNull()
	snd := newSealer(open, 1, 0)
	from := netip.MustParseAddrPort("127.0.0.1:9") // statuses go to the discard port
	t0 := time.Now()
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	fragment := func(i uint32, at time.Time) {
		d := dataBody{object: 1, length: 10 * 100, fragSize: 100, index: i, payload: make([]byte, 100)}
		if err := r.handle(snd.seal(nil, typeData, func(b []byte) []byte { return appendData(b, d) }), from, at); err != nil {
			t.Fatal(err)
		}
	}
	statuses := func() uint64 { return r.Stats().StatusesSent }
	for _, step := range []struct {
		fragment int // -1: none
		tick     int // ms after t0
		want     uint64
	}{
		{0, 10, 1},  // moved: a status
		{1, 20, 1},  // moved, 10ms after the last status: none
		{2, 30, 1},  // 20ms after: none
		{-1, 40, 2}, // 30ms after: it goes
		{-1, 80, 2}, // nothing new since: none
		{3, 90, 3},  // moved, 50ms after: a status
	} {
		if step.fragment >= 0 {
			fragment(uint32(step.fragment), ms(step.tick-1))
		}
		if err := r.tick(ms(step.tick)); err != nil {
			t.Fatal(err)
		}
		if got := statuses(); got != step.want {
			t.Fatalf("after the tick at %dms: %d statuses, want %d", step.tick, got, step.want)
		}
	}
	// A gap goes at once, whatever the timer.
	fragment(7, ms(91))
	if got := statuses(); got != 4 {
		t.Errorf("a gap sent no status at once (%d statuses)", got)
	}
}
