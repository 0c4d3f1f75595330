package mcast

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"
)

// TestTransfer sends an object to 1..8 members with 0, 1 and 5% loss
// injected in every member's receive path: each member gets it intact, and
// the sender's ACK view has every member complete.
func TestTransfer(t *testing.T) {
	bed := newBed(t, 8)
	data := payload(2<<20+777, 1)
	sum := sha256.Sum256(data)
	for _, n := range []int{1, 2, 4, 8} {
		for _, loss := range []float64{0, 0.01, 0.05} {
			t.Run(fmt.Sprintf("members=%d/loss=%v", n, loss), func(t *testing.T) {
				s := newSession(t, bed, sessionOpts{members: n, loss: loss, stall: 10 * time.Second})
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				rep, err := s.sender.Send(ctx, 7, data)
				if err != nil {
					t.Fatalf("send: %v", err)
				}
				if got := slices.Sorted(slices.Values(rep.Completed)); !slices.Equal(got, s.ids) {
					t.Errorf("completed %v, want %v (evicted %v)", got, s.ids, rep.Evicted)
				}
				for i, r := range s.receivers {
					o, err := r.Receive(ctx)
					if err != nil {
						t.Fatalf("member %d: %v", i, err)
					}
					if o.ID != 7 || sha256.Sum256(o.Data) != sum {
						t.Errorf("member %d: object %d, %d bytes, checksum mismatch", i, o.ID, len(o.Data))
					}
				}
				st := rep.Stats
				if loss > 0 && st.RepairPackets+st.ParityPackets == 0 {
					t.Errorf("no repairs with %v loss: %+v", loss, st)
				}
				if loss == 0 && st.RepairPackets > st.DataPackets/100 {
					t.Errorf("%d repairs without loss", st.RepairPackets)
				}
				var injected uint64
				for _, r := range s.receivers {
					injected += r.Stats().Drops.Injected
				}
				t.Logf("%v; data %d, repairs %d + parity %d (%.2f%%), NAKs %d, suppressed %d, injected losses %d",
					rep.Duration.Round(time.Millisecond), st.DataPackets, st.RepairPackets, st.ParityPackets,
					100*float64(st.RepairPackets+st.ParityPackets)/float64(st.DataPackets), st.NAKs, st.SuppressedNAKs, injected)
			})
		}
	}
}

// TestObjects sends several objects, an empty one among them, through
// one session: members get them in order.
func TestObjects(t *testing.T) {
	bed := newBed(t, 3)
	s := newSession(t, bed, sessionOpts{members: 3, loss: 0.02})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	objects := [][]byte{payload(100_000, 2), {}, payload(1, 3), payload(s.sender.FragmentSize()*3, 4)}
	done := make(chan error, len(s.receivers))
	for i, r := range s.receivers {
		go func() {
			for k, want := range objects {
				o, err := r.Receive(ctx)
				if err != nil {
					done <- fmt.Errorf("member %d, object %d: %w", i, k, err)
					return
				}
				if o.ID != uint64(k+1) || !slices.Equal(o.Data, want) {
					done <- fmt.Errorf("member %d: got object %d of %d bytes, want %d of %d", i, o.ID, len(o.Data), k+1, len(want))
					return
				}
			}
			done <- nil
		}()
	}
	for k, data := range objects {
		rep, err := s.sender.Send(ctx, uint64(k+1), data)
		if err != nil || len(rep.Completed) != 3 {
			t.Fatalf("object %d: %v, completed %v", k+1, err, rep.Completed)
		}
	}
	for range s.receivers {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
	// Closing the session ends the members' Receive.
	s.sender.Close()
	for i, r := range s.receivers {
		if _, err := r.Receive(ctx); !errors.Is(err, ErrSessionClosed) {
			t.Errorf("member %d after close: %v, want ErrSessionClosed", i, err)
		}
	}
}

// TestAbsentMember: a member of the list that never answers is evicted
// after the stall timeout; the others complete; a later Send goes on
// without it; a Send with no member left fails with ErrNoMembers.
func TestAbsentMember(t *testing.T) {
	bed := newBed(t, 2)
	const stall = 300 * time.Millisecond
	s := newSession(t, bed, sessionOpts{members: 2, absent: 1, stall: stall})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := s.sender.Send(ctx, 1, payload(500_000, 5))
	if err != nil {
		t.Fatal(err)
	}
	if got := slices.Sorted(slices.Values(rep.Completed)); !slices.Equal(got, s.ids[:2]) || !slices.Equal(rep.Evicted, s.ids[2:]) {
		t.Fatalf("completed %v, evicted %v", got, rep.Evicted)
	}
	if rep.Duration < stall {
		t.Errorf("took %v, less than the stall timeout", rep.Duration)
	}
	rep, err = s.sender.Send(ctx, 2, payload(500_000, 6))
	if err != nil || len(rep.Completed) != 2 || len(rep.Evicted) != 0 {
		t.Fatalf("second send: %v, completed %v, evicted %v", err, rep.Completed, rep.Evicted)
	}
	if rep.Duration >= stall {
		t.Errorf("second send took %v: it waited for the evicted member", rep.Duration)
	}
	if got := s.sender.Evicted(); !slices.Equal(got, s.ids[2:]) {
		t.Errorf("Evicted() = %v", got)
	}

	lonely := newSession(t, bed, sessionOpts{absent: 1, stall: 50 * time.Millisecond})
	if _, err := lonely.sender.Send(ctx, 1, []byte("x")); !errors.Is(err, ErrNoMembers) {
		t.Errorf("send to an absent member: %v, want ErrNoMembers", err)
	}
}

// TestSlowConsumer: a member whose application stops calling Receive
// stops reading once its queue is full; the sender evicts it and the
// others go on; the member learns it was evicted.
func TestSlowConsumer(t *testing.T) {
	bed := newBed(t, 2)
	s := newSession(t, bed, sessionOpts{members: 2, stall: 300 * time.Millisecond,
		recvCfg: func(i int, c *ReceiverConfig) { c.Queue = 1 }})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	fast := make(chan error, 1)
	go func() {
		for k := 1; k <= 3; k++ {
			if _, err := s.receivers[0].Receive(ctx); err != nil {
				fast <- err
				return
			}
		}
		fast <- nil
	}()
	var evicted []string
	for k := 1; k <= 3; k++ {
		rep, err := s.sender.Send(ctx, uint64(k), payload(300_000, uint64(k)))
		if err != nil || !slices.Contains(rep.Completed, s.ids[0]) {
			t.Fatalf("object %d: %v, completed %v", k, err, rep.Completed)
		}
		evicted = append(evicted, rep.Evicted...)
	}
	if err := <-fast; err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(evicted, s.ids[1:]) {
		t.Fatalf("evicted %v, want %v", evicted, s.ids[1:])
	}
	// The slow member has its first object, then learns of its eviction.
	if o, err := s.receivers[1].Receive(ctx); err != nil || o.ID != 1 {
		t.Fatalf("slow member: object %d, %v", o.ID, err)
	}
	for {
		_, err := s.receivers[1].Receive(ctx)
		if errors.Is(err, ErrEvicted) {
			break
		}
		if err != nil {
			t.Fatalf("slow member: %v, want ErrEvicted", err)
		}
	}
}
