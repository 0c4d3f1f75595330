package xenstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// maxQueuedEvents bounds the distinct paths a watch holds for a consumer
// that has fallen behind; past it they collapse into one overflow event.
const maxQueuedEvents = 1024

// Watch is a registered xenstore watch. xenstored sends an event when the
// watched node or anything below it is written, created, removed or has
// its permissions changed, and one when the watch is set. Removing a
// subtree fires once, for its root. Events of a transaction fire when it
// commits. Events only say that something changed, and xenstored
// coalesces them, so consumers read the current state on each event rather
// than count events.
type Watch struct {
	c     *Client
	path  string
	token string

	events chan Event // handed to the consumer; closed when the watch ends

	mu       sync.Mutex
	queue    []Event
	queued   map[string]bool // paths in queue
	overflow bool            // events were dropped: the next one says so
	kick     chan struct{}   // something was queued
	quit     chan struct{}
	stopOnce sync.Once
	pumped   chan struct{} // closed when the pump has exited
}

// Watch registers a watch on path (a node path, relative paths included,
// or WatchIntroduceDomain / WatchReleaseDomain) with a token of the
// client's own. Events arrive on the watch's channel from the first one
// xenstored sends, which may come before Watch returns.
func (c *Client) Watch(ctx context.Context, path string) (*Watch, error) {
	if err := validWatchPath(path); err != nil {
		return nil, err
	}
	w := &Watch{
		c:      c,
		path:   path,
		events: make(chan Event, 16),
		queued: map[string]bool{},
		kick:   make(chan struct{}, 1),
		quit:   make(chan struct{}),
		pumped: make(chan struct{}),
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, c.err
	}
	c.nextWatch++
	w.token = fmt.Sprintf("sf%d", c.nextWatch)
	// Registered before the request: the first event may overtake the
	// reply (it does through Linux's xenbus device).
	c.watches[w.token] = w
	c.mu.Unlock()
	go w.pump()

	payload, err := Strings(path, w.token)
	if err == nil {
		var m *Message
		if m, err = c.do(ctx, 0, OpWatch, path, payload); err == nil {
			err = parseOK(m.Payload)
		}
	}
	if err != nil {
		c.dropWatch(w)
		return nil, err
	}
	return w, nil
}

// Events is the watch's event channel. It is closed when the watch is
// stopped or the connection closes.
func (w *Watch) Events() <-chan Event { return w.events }

// Path is the watched path as registered.
func (w *Watch) Path() string { return w.path }

// Token is the watch's token, which its events carry.
func (w *Watch) Token() string { return w.token }

// Stop removes the watch from xenstored and closes its channel. Events
// already queued are dropped.
func (w *Watch) Stop(ctx context.Context) error {
	c := w.c
	c.mu.Lock()
	registered := c.watches[w.token] == w
	c.mu.Unlock()
	if !registered {
		w.stop()
		return nil
	}
	payload, err := Strings(w.path, w.token)
	if err == nil {
		var m *Message
		if m, err = c.do(ctx, 0, OpUnwatch, w.path, payload); err == nil {
			err = parseOK(m.Payload)
		}
	}
	c.dropWatch(w)
	if errors.Is(err, ErrNotFound) || errors.Is(err, ErrClosed) {
		err = nil // gone already
	}
	return err
}

func (c *Client) dropWatch(w *Watch) {
	c.mu.Lock()
	if c.watches[w.token] == w {
		delete(c.watches, w.token)
	}
	c.mu.Unlock()
	w.stop()
}

// deliver queues an event; it never blocks (the reader calls it). An event
// for a path already queued is dropped: it would say nothing new.
func (w *Watch) deliver(ev Event) {
	w.mu.Lock()
	switch {
	case w.overflow:
	case ev.Overflow || len(w.queue) >= maxQueuedEvents:
		w.overflow = true
		w.queue, w.queued = nil, map[string]bool{}
	case !w.queued[ev.Path]:
		w.queued[ev.Path] = true
		w.queue = append(w.queue, ev)
	}
	w.mu.Unlock()
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// next takes the next event to hand over, if any.
func (w *Watch) next() (Event, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.overflow {
		w.overflow = false
		return Event{Path: w.path, Token: w.token, Overflow: true}, true
	}
	if len(w.queue) == 0 {
		return Event{}, false
	}
	ev := w.queue[0]
	w.queue = w.queue[1:]
	delete(w.queued, ev.Path)
	return ev, true
}

// pump moves queued events to the consumer's channel, so that a slow
// consumer never stalls the client's reader.
func (w *Watch) pump() {
	defer close(w.pumped)
	defer close(w.events)
	for {
		ev, ok := w.next()
		if !ok {
			select {
			case <-w.kick:
				continue
			case <-w.quit:
				return
			}
		}
		select {
		case w.events <- ev:
		case <-w.quit:
			return
		}
	}
}

// stop ends the pump and waits for it.
func (w *Watch) stop() {
	w.stopOnce.Do(func() { close(w.quit) })
	<-w.pumped
}
