package hostd

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestWaitProgress: an eager fill waits for the multicast push while pages
// come, and stops waiting when the session ends, when none has come for the
// stall time (it then fetches the rest by unicast), or when cancelled.
func TestWaitProgress(t *testing.T) {
	const stall = 100 * time.Millisecond
	closed := make(chan struct{})
	close(closed)
	// moving counts up on each of its first k calls, then stands still.
	moving := func(k uint64) func() (uint64, error) {
		var n uint64
		return func() (uint64, error) {
			if n < k {
				n++
			}
			return n, nil
		}
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name    string
		ctx     context.Context
		done    chan struct{}
		count   func() (uint64, error)
		want    string
		atLeast time.Duration // the wait lasts this long or more
	}{
		{"session ended", context.Background(), closed, moving(0), "the session ended", 0},
		{"cancelled", cancelled, make(chan struct{}), moving(0), "cancelled", 0},
		{"no page at all", context.Background(), make(chan struct{}), moving(0), "nothing came for 100ms", stall},
		// The first count, then 11 changes at one per tick (stall/4),
		// then a stall: no wait gives up while pages come.
		{"pages, then none", context.Background(), make(chan struct{}), moving(12), "nothing came for 100ms", 11*stall/4 + stall},
		{"stats fail", context.Background(), make(chan struct{}), func() (uint64, error) {
			return 0, errors.New("no such snapshot")
		}, "no such snapshot", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			got := waitProgress(tc.ctx, tc.done, tc.count, stall)
			took := time.Since(start)
			if got != tc.want || took < tc.atLeast || took > tc.atLeast+10*time.Second {
				t.Errorf("waitProgress = %q after %v; want %q after %v or more", got, took, tc.want, tc.atLeast)
			}
		})
	}
}
