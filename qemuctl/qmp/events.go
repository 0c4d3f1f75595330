package qmp

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"time"
)

// Event is an asynchronous message from QEMU, such as STOP, RESUME,
// SHUTDOWN or MIGRATION.
type Event struct {
	Name      string
	Data      json.RawMessage // the event's "data" member; nil if it has none
	Timestamp time.Time       // when QEMU emitted it (host clock)
}

// Subscription receives the events with some names that arrive after it was
// created. Subscribing before sending the command that causes an event is
// what makes waiting for that event race-free: QEMU often emits the event
// before its reply to the command (STOP precedes stop's reply).
type Subscription struct {
	c       *Client
	names   map[string]bool // nil: every event
	ch      chan Event
	dropped atomic.Uint64
}

// Subscribe starts delivering the events named names (every event if none
// are given) to a new Subscription. Its channel holds EventBuffer events and
// drops the oldest when full. Close it when done.
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, ch: make(chan Event, EventBuffer)}
	if len(names) > 0 {
		s.names = make(map[string]bool, len(names))
		for _, n := range names {
			s.names[n] = true
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		close(s.ch)
		return s
	}
	c.subs[s] = struct{}{}
	return s
}

func (s *Subscription) wants(name string) bool { return s.names == nil || s.names[name] }

// C returns the subscription's channel. It is closed by Close and when the
// connection ends.
func (s *Subscription) C() <-chan Event { return s.ch }

// Next returns the next event of the subscription. It fails with ctx's error,
// or with the connection's error (wrapping ErrDisconnected or ErrClosed) once
// the subscription has ended and its buffered events are consumed.
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	select {
	case ev, ok := <-s.ch:
		if !ok {
			if err := s.c.Err(); err != nil {
				return Event{}, err
			}
			return Event{}, fmt.Errorf("%w: subscription closed", ErrClosed)
		}
		return ev, nil
	case <-ctx.Done():
		return Event{}, context.Cause(ctx)
	}
}

// Dropped is the number of events discarded because the subscription's
// channel was full.
func (s *Subscription) Dropped() uint64 { return s.dropped.Load() }

// Close stops delivery and closes the channel. It is idempotent.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	if _, ok := s.c.subs[s]; ok {
		delete(s.c.subs, s)
		close(s.ch)
	}
}

// WaitEvent waits for the next event named name that arrives after the call.
// To wait for an event caused by a command, Subscribe before sending the
// command instead: the event may arrive before the command's reply.
func (c *Client) WaitEvent(ctx context.Context, name string) (Event, error) {
	s := c.Subscribe(name)
	defer s.Close()
	ev, err := s.Next(ctx)
	if err != nil {
		return Event{}, fmt.Errorf("qmp: waiting for event %s: %w", name, err)
	}
	return ev, nil
}
