package mcast

import (
	"context"
	"crypto/sha256"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// TestHostilePackets runs a transfer while the group also carries another
// session's transfer, forged packets and replays of the sender's own; and
// one member holds the wrong key. The members drop and count each kind;
// the right members get the object intact; the wrong-key one is evicted.
func TestHostilePackets(t *testing.T) {
	bed := newBed(t, 3)
	s := newSession(t, bed, sessionOpts{members: 3, stall: 500 * time.Millisecond,
		recvCfg: func(i int, c *ReceiverConfig) {
			if i == 2 {
				c.Key[0] ^= 1
			}
		}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bridge := netip.MustParseAddr(bed.BridgeIP)

	// A tap in the root namespace hears the sender (multicast loops back).
	tap, err := listenGroup(ctx, bridge, s.group)
	if err != nil {
		t.Fatal(err)
	}
	defer tap.Close()
	// Another session on the same group and port, with the same members.
	other, err := NewSender(SenderConfig{LocalAddr: bridge, Group: s.group, SessionID: s.id + 1, Key: s.key,
		Members: s.ids, StallTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	go other.Send(ctx, 1, payload(200_000, 11)) // ends with the evictions

	data := payload(1<<20, 12)
	rep, err := s.sender.Send(ctx, 1, data)
	if err != nil {
		t.Fatal(err)
	}
	if got := slices.Sorted(slices.Values(rep.Completed)); !slices.Equal(got, s.ids[:2]) || !slices.Equal(rep.Evicted, s.ids[2:]) {
		t.Fatalf("completed %v, evicted %v", got, rep.Evicted)
	}
	for i, r := range s.receivers[:2] {
		o, err := r.Receive(ctx)
		if err != nil || sha256.Sum256(o.Data) != sha256.Sum256(data) {
			t.Fatalf("member %d: %v, or checksum mismatch", i, err)
		}
	}

	// Replays of what the tap heard, and forgeries: altered copies and
	// packets of this session sealed with no key at all.
	attacker, err := listenSender(ctx, bridge)
	if err != nil {
		t.Fatal(err)
	}
	defer attacker.Close()
	group := net.UDPAddrFromAddrPort(s.group)
	buf := make([]byte, 2048)
	tap.SetReadDeadline(time.Now().Add(5 * time.Second))
	var replayed, forged int
	for replayed < 50 {
		n, err := tap.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		h, err := decodeHeader(buf[:n])
		if err != nil || h.session != s.id {
			continue
		}
		attacker.WriteToUDP(buf[:n], group)
		replayed++
		buf[n-1] ^= 0x80 // fails the tag
		buf[23]++        // a fresh sequence number, so that it is not a replay
		attacker.WriteToUDP(buf[:n], group)
		forged++
	}
	for _, r := range s.receivers[:2] {
		waitFor(t, 5*time.Second, "drops counted", func() bool {
			d := r.Stats().Drops
			return d.Session > 0 && d.Auth >= uint64(forged) && d.Replay >= uint64(replayed)
		})
	}
	if d := s.receivers[2].Stats().Drops; d.Auth == 0 {
		t.Errorf("the wrong-key member dropped nothing as forged: %+v", d)
	}
	if st := s.receivers[2].Stats(); st.Objects != 0 {
		t.Errorf("the wrong-key member completed %d objects", st.Objects)
	}
	t.Logf("member drops: %+v", s.receivers[0].Stats().Drops)
}
