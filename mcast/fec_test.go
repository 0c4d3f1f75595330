package mcast

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"
)

func TestGF256(t *testing.T) {
	for a := 1; a < 256; a++ {
		if p := gfMul[a][gfInv(byte(a))]; p != 1 {
			t.Fatalf("%d * inv(%d) = %d", a, a, p)
		}
		for b := range 256 {
			// Distributivity over XOR, against a carry-less reference.
			want := byte(0)
			x, y := a, b
			for y != 0 {
				if y&1 != 0 {
					want ^= byte(x)
				}
				x <<= 1
				if x&0x100 != 0 {
					x ^= gfPoly
				}
				y >>= 1
			}
			if gfMul[a][b] != want {
				t.Fatalf("%d * %d = %d, want %d", a, b, gfMul[a][b], want)
			}
		}
	}
}

// TestReedSolomon: any m parity symbols recover any m missing fragments
// of a block, the last fragment shorter than the others.
func TestReedSolomon(t *testing.T) {
	rng := mrand.New(mrand.NewPCG(1, 2))
	for _, k := range []int{1, 2, 5, 32, 64, 128} {
		for _, kb := range []int{k, max(1, k/2+1)} { // a whole block, a last block
			for trial := range 20 {
				size := 1 + rng.IntN(300)
				frags := make([][]byte, kb)
				for i := range frags {
					n := size
					if i == kb-1 {
						n = rng.IntN(size + 1)
					}
					frags[i] = make([]byte, n)
					for j := range frags[i] {
						frags[i][j] = byte(rng.Uint32())
					}
				}
				m := 1 + rng.IntN(min(kb, 12))
				held := slices.Clone(frags)
				for _, e := range rng.Perm(kb)[:m] {
					held[e] = nil
				}
				idx := rng.Perm(maxParity(k))[:m]
				var par [][]byte
				for _, j := range idx {
					par = append(par, encodeParity(nil, k, j, size, frags))
				}
				miss, out, ok := decodeBlock(k, held, idx, par, size)
				if !ok || len(miss) != m {
					t.Fatalf("k=%d kb=%d trial %d: %d missing, decoded %v %d", k, kb, trial, m, ok, len(miss))
				}
				for c, e := range miss {
					if got := out[c][:len(frags[e])]; !bytes.Equal(got, frags[e]) || slices.ContainsFunc(out[c][len(frags[e]):], func(b byte) bool { return b != 0 }) {
						t.Fatalf("k=%d kb=%d trial %d: fragment %d recovered wrong", k, kb, trial, e)
					}
				}
				// One symbol fewer than missing: no decode.
				if _, _, ok := decodeBlock(k, held, idx[:m-1], par[:m-1], size); ok {
					t.Fatalf("k=%d: decoded %d missing with %d symbols", k, m, m-1)
				}
			}
		}
	}
}

func TestParityBodies(t *testing.T) {
	ps := []parityBody{
		{object: 1, length: 3000, fragSize: 1400, blockSize: 2, block: 1, index: 3, payload: make([]byte, 200)},
		{object: 2, length: 0, fragSize: 1, blockSize: 64, block: 0, index: 191, payload: []byte{}},
		{object: 3, length: 1 << 20, fragSize: 1000, blockSize: 128, block: 8, index: 0, payload: bytes.Repeat([]byte{9}, 1000)},
	}
	for i, p := range ps {
		got, err := decodeParity(appendParity(nil, p))
		if err != nil || !reflect.DeepEqual(got, p) {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, p)
		}
	}
	s := statusBody{object: 5, contiguous: 1, received: 7, missing: []span{{2, 3}}, blocks: []blockNak{{0, 2, 1}, {9, 1, 0}}}
	if got, err := decodeStatus(appendStatus(nil, s)); err != nil || !reflect.DeepEqual(got, s) {
		t.Errorf("status: got %+v, %v, want %+v", got, err, s)
	}
	bad := []parityBody{
		{length: 3000, fragSize: 1400, blockSize: 0, payload: make([]byte, 1400)},                     // no block size
		{length: 3000, fragSize: 1400, blockSize: 129, payload: make([]byte, 1400)},                   // too large
		{length: 3000, fragSize: 1400, blockSize: 2, block: 2, payload: make([]byte, 200)},            // past the end
		{length: 3000, fragSize: 1400, blockSize: 64, index: 192, payload: make([]byte, 1400)},        // no such symbol
		{length: 3000, fragSize: 1400, blockSize: 2, block: 1, payload: make([]byte, 1400)},           // wrong length
		{length: 3000, fragSize: 0, blockSize: 2, payload: []byte{}},                                  // fragment size 0
		{length: 1 << 40, fragSize: 1, blockSize: 2, block: 1 << 31, payload: make([]byte, 1)},        // too many fragments
		{length: 10, fragSize: 5, blockSize: 1, block: 1, index: 0, payload: make([]byte, 5)[:4]},     // short
		{length: 10, fragSize: 5, blockSize: 1, block: 1, index: 0, payload: make([]byte, 6)},         // long
		{length: 10, fragSize: 5, blockSize: 128, block: 0, index: 128, payload: make([]byte, 5)},     // no such symbol
		{length: 3000, fragSize: 1400, blockSize: 3, block: 1, index: 0, payload: make([]byte, 1400)}, // past the end
	}
	for i, p := range bad {
		if _, err := decodeParity(appendParity(nil, p)); !errors.Is(err, errMalformed) {
			t.Errorf("bad #%d: %v, want errMalformed", i, err)
		}
	}
	if _, err := decodeParity(make([]byte, parityBodyLen-1)); !errors.Is(err, errMalformed) {
		t.Errorf("short parity: %v", err)
	}
	if _, err := decodeData(appendData(nil, dataBody{length: 10, fragSize: 5, blockSize: 129, payload: make([]byte, 5)})); !errors.Is(err, errMalformed) {
		t.Errorf("data with block size 129: %v", err)
	}
	if _, err := decodeStatus(appendStatus(nil, statusBody{blocks: []blockNak{{1, 0, 0}}})); !errors.Is(err, errMalformed) {
		t.Errorf("block NAK for nothing: %v", err)
	}
	b := appendStatus(nil, statusBody{blocks: []blockNak{{1, 1, 0}}})
	if _, err := decodeStatus(b[:len(b)-1]); !errors.Is(err, errMalformed) {
		t.Errorf("truncated block list: %v", err)
	}
}

// testReceiver is a member without sockets of its own, fed sealed packets
// by hand; its statuses go to status, a loopback socket.
func testReceiver(t testing.TB) (*Receiver, *sealer, func() []statusBody) {
	var key [32]byte
	openA, _ := senderAEAD(key, 1)
	self, _ := memberAEAD(key, 1, "m")
	fb, err := listenUnicast(context.Background(), netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	sink, err := listenUnicast(context.Background(), netip.MustParseAddr("127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.Close(); sink.Close() })
	r := &Receiver{cfg: ReceiverConfig{SessionID: 1, MaxObjectSize: 1 << 24, AckEvery: 1 << 20, NakRetry: time.Hour},
		tag: memberTag("m"), open: openA, feedback: fb, seal: newSealer(self, 1, memberTag("m")),
		objects: make(chan Object, 16), quit: make(chan struct{}), log: hclogNull(),
		sender: sink.LocalAddr().(*net.UDPAddr).AddrPort()}
	// statuses returns the statuses sent so far.
	statuses := func() []statusBody {
		var sts []statusBody
		buf := make([]byte, 65536)
		for {
			sink.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			n, err := sink.Read(buf)
			if err != nil {
				return sts
			}
			h, err := decodeHeader(buf[:n])
			if err != nil {
				t.Fatal(err)
			}
			pt, err := open(self, h, buf[:n])
			if err != nil {
				t.Fatal(err)
			}
			st, err := decodeStatus(pt)
			if err != nil {
				t.Fatal(err)
			}
			sts = append(sts, st)
		}
	}
	return r, newSealer(openA, 1, 0), statuses
}

// TestReceiverParity: a member missing fragments of several blocks NAKs
// each block by count, and recovers every fragment from parity symbols
// the sender would send for the block, whatever the order of arrival.
func TestReceiverParity(t *testing.T) {
	const k, fs = 8, 100
	data := payload(3*k*fs-37, 5) // three blocks, the last fragment short
	n := uint32(fragments(uint64(len(data)), fs))
	frag := func(f uint32) []byte {
		return data[uint64(f)*fs : uint64(f)*fs+uint64(fragLen(uint64(len(data)), fs, f))]
	}
	parity := func(b uint32, j int) []byte {
		var fr [][]byte
		for f := b * k; f < min(n, b*k+k); f++ {
			fr = append(fr, frag(f))
		}
		return encodeParity(nil, k, j, fragLen(uint64(len(data)), fs, b*k), fr)
	}
	r, s, statuses := testReceiver(t)
	from := r.sender // statuses go to the source of the sender's packets
	feed := func(typ byte, body []byte) {
		t.Helper()
		if err := r.handle(s.seal(nil, typ, func(b []byte) []byte { return append(b, body...) }), from, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	lost := map[uint32]bool{1: true, 2: true, 3: true, 12: true, n - 1: true}
	// Parity 0 of block 1 comes early, before the block's fragments.
	feed(typeParity, appendParity(nil, parityBody{object: 1, length: uint64(len(data)), fragSize: fs, blockSize: k, block: 1, index: 0, payload: parity(1, 0)}))
	for f := range n {
		if !lost[f] {
			feed(typeData, appendData(nil, dataBody{object: 1, length: uint64(len(data)), fragSize: fs, index: f, blockSize: k, payload: frag(f)}))
		}
	}
	if r.cur == nil || r.cur.received != n-5+1 {
		t.Fatalf("assembly %+v: block 1 not recovered from its parity", r.cur)
	}
	// Statuses: the gaps were NAKed by block as they showed; the last
	// fragment was never seen to pass, so it is not asked for until a poll.
	asked := func() []blockNak {
		var bs []blockNak
		for _, st := range statuses() {
			if len(st.missing) != 0 {
				t.Fatalf("fragments NAKed with FEC: %+v", st)
			}
			bs = append(bs, st.blocks...)
		}
		return bs
	}
	if got := asked(); !slices.Equal(got, []blockNak{{block: 0, need: 3}}) {
		t.Fatalf("block NAKs %+v, want block 0 need 3", got)
	}
	feed(typePoll, appendPoll(nil, pollBody{object: 1, length: uint64(len(data)), fragSize: fs, sent: n}))
	if got := asked(); !slices.Equal(got, []blockNak{{block: 2, need: 1}}) {
		t.Fatalf("after the poll: %+v, want block 2 need 1", got)
	}
	// Block 0 misses three: parity 5, 1 and 7 recover them, in any order.
	for _, j := range []int{5, 1, 7} {
		feed(typeParity, appendParity(nil, parityBody{object: 1, length: uint64(len(data)), fragSize: fs, blockSize: k, block: 0, index: byte(j), payload: parity(0, j)}))
	}
	if r.cur.contiguous != n-1 {
		t.Fatalf("contiguous %d after block 0's parity", r.cur.contiguous)
	}
	feed(typeParity, appendParity(nil, parityBody{object: 1, length: uint64(len(data)), fragSize: fs, blockSize: k, block: 2, index: 3, payload: parity(2, 3)}))
	o, err := r.Receive(context.Background())
	if err != nil || sha256.Sum256(o.Data) != sha256.Sum256(data) {
		t.Fatalf("object: %v, checksum ok %v", err, sha256.Sum256(o.Data) == sha256.Sum256(data))
	}
	if st := r.Stats(); st.ParityPackets != 5 || st.ParityUsed != 5 {
		t.Errorf("stats %+v, want 5 parity packets, all used", st)
	}
}

// TestSenderParityRequests: the sender answers block NAKs with the most
// parity symbols one member needs, not the sum.
func TestSenderParityRequests(t *testing.T) {
	s := &Sender{cfg: SenderConfig{RepairHoldoff: 10 * time.Millisecond, BlockSize: 8}}
	tr := &transfer{s: s, n: 64, next: 64, k: 8, issued: make([]uint16, 8), parityAt: make([]int64, 8), repaired: make([]int64, 64), start: time.Now()}
	m := &senderMember{}
	at := tr.start
	nak := func(d time.Duration, blocks ...blockNak) {
		tr.handle(feedback{m, statusBody{object: 0, blocks: blocks}}, at.Add(d))
	}
	nak(0, blockNak{block: 1, need: 1})                            // member A misses one: parity 0
	nak(time.Millisecond, blockNak{block: 1, need: 2})             // B misses two, saw none: parity 1
	nak(2*time.Millisecond, blockNak{block: 1, need: 1})           // C misses one: covered
	nak(3*time.Millisecond, blockNak{block: 1, need: 1, seen: 2})  // A lost another after both: parity 2
	nak(20*time.Millisecond, blockNak{block: 1, need: 1, seen: 3}) // after the holdoff: parity 3
	nak(20*time.Millisecond, blockNak{block: 7, need: 2}, blockNak{block: 9, need: 1})
	want := []parityReq{{1, 0}, {1, 1}, {1, 2}, {1, 3}, {7, 0}, {7, 1}}
	if !slices.Equal(tr.pqueue, want) {
		t.Errorf("parity queued %v, want %v", tr.pqueue, want)
	}
	// A block whose symbols ran out is repaired fragment by fragment.
	tr.issued[3] = uint16(maxParity(8))
	nak(40*time.Millisecond, blockNak{block: 3, need: 1, seen: byte(maxParity(8))})
	if !slices.Equal(tr.queue, []uint32{24, 25, 26, 27, 28, 29, 30, 31}) {
		t.Errorf("fragments queued %v", tr.queue)
	}
}

// TestTransferWithoutFEC: BlockSize < 0 repairs fragment by fragment.
func TestTransferWithoutFEC(t *testing.T) {
	bed := newBed(t, 4)
	data := payload(1<<20+3, 9)
	s := newSession(t, bed, sessionOpts{members: 4, loss: 0.03, stall: 10 * time.Second,
		senderCfg: func(c *SenderConfig) { c.BlockSize = -1 }})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := s.sender.Send(ctx, 1, data)
	if err != nil || len(rep.Completed) != 4 {
		t.Fatalf("send: %v, completed %v", err, rep.Completed)
	}
	for i, r := range s.receivers {
		if o, err := r.Receive(ctx); err != nil || !bytes.Equal(o.Data, data) {
			t.Fatalf("member %d: %v", i, err)
		}
	}
	if st := rep.Stats; st.ParityPackets != 0 || st.RepairPackets == 0 {
		t.Errorf("without FEC: %d parity, %d repairs", st.ParityPackets, st.RepairPackets)
	}
}

// TestParityCost: with FEC, 8 members with independent losses cost about
// what the worst of them misses, far less than the fragments any member
// misses.
func TestParityCost(t *testing.T) {
	bed := newBed(t, 8)
	data := payload(8<<20, 11)
	// How much repair coalesces depends on timing (hold-offs), so the
	// check is relative, against per-fragment repair in the same run, with
	// a generous absolute bound.
	ratios := map[int]float64{}
	for _, fec := range []int{64, -1} {
		t.Run(fmt.Sprintf("block=%d", fec), func(t *testing.T) {
			s := newSession(t, bed, sessionOpts{members: 8, loss: 0.02, stall: 10 * time.Second,
				senderCfg: func(c *SenderConfig) { c.BlockSize = fec }})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			rep, err := s.sender.Send(ctx, 1, data)
			if err != nil || len(rep.Completed) != 8 {
				t.Fatalf("send: %v, completed %v", err, rep.Completed)
			}
			var used uint64
			for i, r := range s.receivers {
				if o, err := r.Receive(ctx); err != nil || !bytes.Equal(o.Data, data) {
					t.Fatalf("member %d: %v", i, err)
				}
				used += r.Stats().ParityUsed
			}
			st := rep.Stats
			ratio := float64(st.RepairPackets+st.ParityPackets) / float64(st.DataPackets)
			t.Logf("data %d, repairs %d, parity %d (used %d): %.2f%%", st.DataPackets, st.RepairPackets, st.ParityPackets, used, 100*ratio)
			if fec > 0 && (ratio > 0.15 || used == 0) {
				t.Errorf("FEC repairs cost %.2f%% at 2%% loss, 8 members (%d parity packets used)", 100*ratio, used)
			}
			ratios[fec] = ratio
		})
	}
	if ratios[64] >= ratios[-1]/2 {
		t.Errorf("parity repair cost %.2f%%, per-fragment repair %.2f%%: parity should cost less than half", 100*ratios[64], 100*ratios[-1])
	}
}

func TestParityZeroIsXOR(t *testing.T) {
	for _, k := range []int{1, 7, 64, 128} {
		for i := range k {
			if c := parityCoef(k, 0, i); c != 1 {
				t.Fatalf("k=%d: C[0][%d] = %d", k, i, c)
			}
		}
	}
}

func BenchmarkMulAdd(b *testing.B) {
	dst, src := make([]byte, 1400), payload(1400, 1)
	b.SetBytes(1400)
	for b.Loop() {
		mulAdd(dst, src, 0x53)
	}
}
