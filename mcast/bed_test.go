package mcast

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/internal/testbed"
)

// Test helpers: a bed of network namespaces on a bridge, with the sender in
// the root namespace on the bridge's address and members in the hosts'
// namespaces, so that every packet crosses the bridge as real multicast.

// newBed makes a bed of n hosts, removed when the test ends. Without root
// the test is skipped, unless CI is set.
func newBed(t *testing.T, n int) *testbed.Bed {
	t.Helper()
	if err := testbed.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%v; CI is set, so this is a failure", err)
		}
		t.Skipf("multicast tests need a test bed: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bed, err := testbed.New(ctx, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := bed.Close(); err != nil {
			t.Errorf("closing the bed: %v", err)
		}
	})
	return bed
}

// session is a sender and its in-process members.
type session struct {
	sender    *Sender
	receivers []*Receiver
	ids       []string
	group     netip.AddrPort
	id        uint64
	key       [32]byte
}

type sessionOpts struct {
	members   int // receivers started, one per host
	absent    int // further members in the list with no receiver
	loss      float64
	stall     time.Duration
	senderCfg func(*SenderConfig)
	recvCfg   func(int, *ReceiverConfig)
}

func randomGroup() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{239, 77, byte(mrand.IntN(256)), byte(1 + mrand.IntN(254))}), uint16(20000+mrand.IntN(20000)))
}

func newSession(t *testing.T, bed *testbed.Bed, o sessionOpts) *session {
	t.Helper()
	s := &session{group: randomGroup()}
	rand.Read(s.key[:])
	var b [8]byte
	rand.Read(b[:])
	s.id = binary.BigEndian.Uint64(b[:])
	for i := range o.members + o.absent {
		s.ids = append(s.ids, fmt.Sprintf("host-%d", i+1))
	}
	scfg := SenderConfig{LocalAddr: netip.MustParseAddr(bed.BridgeIP), Group: s.group, SessionID: s.id, Key: s.key,
		Members: s.ids, StallTimeout: o.stall, PollInterval: 5 * time.Millisecond, HeartbeatInterval: 20 * time.Millisecond}
	if o.senderCfg != nil {
		o.senderCfg(&scfg)
	}
	var err error
	if s.sender, err = NewSender(scfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.sender.Close() })
	for i := range o.members {
		h := bed.Hosts[i]
		rcfg := ReceiverConfig{LocalAddr: netip.MustParseAddr(h.IP), Group: s.group, SessionID: s.id, MemberID: s.ids[i],
			Key: s.key, Listen: bed.In(i), LossRate: o.loss, LossSeed: uint64(i + 1)}
		if o.recvCfg != nil {
			o.recvCfg(i, &rcfg)
		}
		r, err := NewReceiver(rcfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		s.receivers = append(s.receivers, r)
	}
	return s
}

// payload is n pseudo-random bytes, the same for a seed.
func payload(n int, seed uint64) []byte {
	b := make([]byte, n)
	rng := mrand.New(mrand.NewPCG(seed, 1))
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	return b
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, d)
		}
		time.Sleep(2 * time.Millisecond)
	}
}
