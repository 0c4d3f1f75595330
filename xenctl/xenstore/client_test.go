package xenstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// These tests drive the client against a scripted peer: each test reads
// the requests the client sends and writes the bytes xenstored would send
// back, so that reply matching, event routing and failure handling are
// checked message by message. xenstored's own behaviour is checked against
// the real daemon in xenstored_test.go.

type peer struct {
	t    *testing.T
	conn net.Conn
}

func newPair(t *testing.T) (*Client, *peer) {
	t.Helper()
	a, b := net.Pipe()
	c := NewClient(a)
	t.Cleanup(func() { c.Close(); b.Close() })
	return c, &peer{t: t, conn: b}
}

func (p *peer) recv() *Message {
	p.t.Helper()
	p.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := ReadMessage(p.conn)
	if err != nil {
		p.t.Fatalf("peer: reading request: %v", err)
	}
	return m
}

func (p *peer) send(m *Message) {
	p.t.Helper()
	b, err := m.MarshalBinary()
	if err != nil {
		p.t.Fatal(err)
	}
	p.sendRaw(b)
}

func (p *peer) sendRaw(b []byte) {
	p.t.Helper()
	p.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := p.conn.Write(b); err != nil {
		p.t.Fatalf("peer: write: %v", err)
	}
}

func (p *peer) reply(req *Message, payload string) {
	p.t.Helper()
	p.send(&Message{Type: req.Type, ReqID: req.ReqID, TxID: req.TxID, Payload: []byte(payload)})
}

func (p *peer) fail(req *Message, code string) {
	p.t.Helper()
	p.send(&Message{Type: OpError, ReqID: req.ReqID, TxID: req.TxID, Payload: []byte(code + "\x00")})
}

func (p *peer) event(path, token string) {
	p.t.Helper()
	p.send(&Message{Type: OpWatchEvent, Payload: []byte(path + "\x00" + token + "\x00")})
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestCallsOverlapAndMatchByID(t *testing.T) {
	c, p := newPair(t)
	type result struct {
		val string
		err error
	}
	results := make([]chan result, 3)
	for i := range results {
		results[i] = make(chan result, 1)
		go func(i int) {
			v, err := c.Read(ctx(t), fmt.Sprintf("/n%d", i))
			results[i] <- result{string(v), err}
		}(i)
	}
	reqs := map[string]*Message{}
	for range 3 {
		m := p.recv()
		if m.Type != OpRead || m.TxID != 0 {
			t.Fatalf("request %+v", m)
		}
		reqs[strings.TrimSuffix(string(m.Payload), "\x00")] = m
	}
	// Answer in reverse order, and the middle one with an error.
	p.reply(reqs["/n2"], "two")
	p.fail(reqs["/n1"], "ENOENT")
	p.reply(reqs["/n0"], "zero\x00with nul")
	r0, r1, r2 := <-results[0], <-results[1], <-results[2]
	if r0.val != "zero\x00with nul" || r0.err != nil || r2.val != "two" || r2.err != nil {
		t.Errorf("results %+v %+v", r0, r2)
	}
	var xe *Error
	if !errors.Is(r1.err, ErrNotFound) || !errors.As(r1.err, &xe) || xe.Path != "/n1" {
		t.Errorf("missing node: %v", r1.err)
	}
}

// TestDeviceSendsOneRequestAtATime: through Linux's xenbus device a
// request is written only once the previous one has its reply (see
// OpenDevice), even when its caller gave up waiting; watch events pass
// meanwhile.
func TestDeviceSendsOneRequestAtATime(t *testing.T) {
	a, b := net.Pipe()
	c := newClient(a, DevicePayloadMax, true)
	t.Cleanup(func() { c.Close(); b.Close() })
	p := &peer{t: t, conn: b}
	errs := make(chan error, 3)
	gaveUp, cancel := context.WithCancel(ctx(t))
	go func() { _, err := c.Read(gaveUp, "/first"); errs <- err }()
	first := p.recv()
	for _, path := range []string{"/second", "/third"} {
		go func() { errs <- c.Write(ctx(t), path, []byte("v")) }()
	}
	cancel()
	if err := <-errs; !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned read: %v", err)
	}
	p.event("/watched", "nobody")
	p.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if m, err := ReadMessage(p.conn); err == nil {
		t.Fatalf("%s %q written before /first's reply", m.Type, m.Payload)
	}
	p.reply(first, "late")
	for range 2 {
		m := p.recv()
		p.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if extra, err := ReadMessage(p.conn); err == nil {
			t.Fatalf("%q written while %q waits for its reply", extra.Payload, m.Payload)
		}
		p.reply(m, "OK\x00")
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Errorf("write: %v", err)
		}
	}
}

func TestRequestPayloads(t *testing.T) {
	c, p := newPair(t)
	tests := []struct {
		do   func() error
		op   Op
		tx   uint32
		want string
		resp string
	}{
		{func() error { return c.Write(ctx(t), "data/x", []byte("v\x00v")) }, OpWrite, 0, "data/x\x00v\x00v", "OK\x00"},
		{func() error { return c.Mkdir(ctx(t), "/a/b") }, OpMkdir, 0, "/a/b\x00", "OK\x00"},
		{func() error { return c.Rm(ctx(t), "/a") }, OpRm, 0, "/a\x00", "OK\x00"},
		{func() error {
			return c.SetPerms(ctx(t), "/a", []Perm{{0, AccessNone}, {5, AccessRead}})
		}, OpSetPerms, 0, "/a\x00n0\x00r5\x00", "OK\x00"},
		{func() error {
			p, err := c.GetDomainPath(ctx(t), 12)
			if p != "/local/domain/12" {
				return fmt.Errorf("path %q, %v", p, err)
			}
			return err
		}, OpGetDomainPath, 0, "12\x00", "/local/domain/12\x00"},
	}
	for i, tt := range tests {
		errc := make(chan error, 1)
		go func() { errc <- tt.do() }()
		m := p.recv()
		if m.Type != tt.op || m.TxID != tt.tx || string(m.Payload) != tt.want {
			t.Errorf("#%d: sent %s tx %d %q, want %s %q", i, m.Type, m.TxID, m.Payload, tt.op, tt.want)
		}
		p.reply(m, tt.resp)
		if err := <-errc; err != nil {
			t.Errorf("#%d: %v", i, err)
		}
	}
	// Invalid arguments never reach the wire.
	if err := c.Write(ctx(t), "/a//b", nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("bad path: %v", err)
	}
	if err := c.Write(ctx(t), "/a", make([]byte, PayloadMax)); !errors.Is(err, ErrTooBig) {
		t.Errorf("big value: %v", err)
	}
}

func TestWrongReplyType(t *testing.T) {
	c, p := newPair(t)
	errc := make(chan error, 1)
	go func() { _, err := c.Read(ctx(t), "/x"); errc <- err }()
	m := p.recv()
	p.send(&Message{Type: OpDirectory, ReqID: m.ReqID, Payload: []byte("a\x00")})
	if err := <-errc; !errors.Is(err, ErrProtocol) {
		t.Errorf("got %v, want ErrProtocol", err)
	}
	// The connection is still usable.
	go func() { _, err := c.Read(ctx(t), "/y"); errc <- err }()
	p.reply(p.recv(), "y")
	if err := <-errc; err != nil {
		t.Error(err)
	}
}

func TestWatchEventsAndStop(t *testing.T) {
	c, p := newPair(t)
	wc := make(chan *Watch, 1)
	go func() {
		w, err := c.Watch(ctx(t), "data/snowflock")
		if err != nil {
			t.Error(err)
		}
		wc <- w
	}()
	m := p.recv()
	s, _ := SplitStrings(m.Payload)
	if m.Type != OpWatch || len(s) != 2 || s[0] != "data/snowflock" {
		t.Fatalf("watch request %+v", m)
	}
	token := s[1]
	// The first event overtakes the reply, as through Linux's device; its
	// req_id is whatever the kernel left there.
	p.send(&Message{Type: OpWatchEvent, ReqID: 0xdeadbeef, TxID: 77, Payload: []byte("data/snowflock\x00" + token + "\x00")})
	p.reply(m, "OK\x00")
	w := <-wc
	if w == nil {
		t.FailNow()
	}
	p.event("data/snowflock/req/1", token)
	p.event("data/other", "someone-elses-token")
	for _, want := range []string{"data/snowflock", "data/snowflock/req/1"} {
		select {
		case ev := <-w.Events():
			if ev.Path != want || ev.Token != token || ev.Overflow {
				t.Errorf("event %+v, want %s", ev, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no event for %s", want)
		}
	}
	// A malformed event stands for "something changed".
	p.send(&Message{Type: OpWatchEvent, Payload: []byte("no-token\x00")})
	if ev := <-w.Events(); !ev.Overflow || ev.Path != "data/snowflock" {
		t.Errorf("after a malformed event: %+v", ev)
	}

	errc := make(chan error, 1)
	go func() { errc <- w.Stop(ctx(t)) }()
	m = p.recv()
	if m.Type != OpUnwatch || string(m.Payload) != "data/snowflock\x00"+token+"\x00" {
		t.Fatalf("unwatch request %+v", m)
	}
	p.reply(m, "OK\x00")
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, ok := <-w.Events(); ok {
		t.Error("events channel open after Stop")
	}
}

func TestSlowWatchConsumerDoesNotStallReplies(t *testing.T) {
	c, p := newPair(t)
	go func() {
		m := p.recv()
		p.reply(m, "OK\x00")
	}()
	w, err := c.Watch(ctx(t), "/w")
	if err != nil {
		t.Fatal(err)
	}
	// Nobody reads the events: more than the queue holds, with repeats.
	for i := range maxQueuedEvents + 100 {
		p.event(fmt.Sprintf("/w/%d", i%(maxQueuedEvents+50)), w.Token())
	}
	errc := make(chan error, 1)
	go func() { _, err := c.Read(ctx(t), "/r"); errc <- err }()
	p.reply(p.recv(), "v")
	if err := <-errc; err != nil {
		t.Fatalf("a read behind a flood of events: %v", err)
	}
	// The consumer finds the events it had room for, then an overflow.
	sawOverflow := false
	for !sawOverflow {
		select {
		case ev := <-w.Events():
			sawOverflow = ev.Overflow
		case <-time.After(5 * time.Second):
			t.Fatal("no overflow event")
		}
	}
}

func TestAbandonedTransactionIsAborted(t *testing.T) {
	c, p := newPair(t)
	cctx, cancel := context.WithCancel(ctx(t))
	errc := make(chan error, 1)
	go func() { _, err := c.Begin(cctx); errc <- err }()
	m := p.recv()
	if m.Type != OpTransactionStart || m.TxID != 0 || string(m.Payload) != "\x00" {
		t.Fatalf("start %+v", m)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Begin: %v", err)
	}
	p.reply(m, "42\x00")
	m = p.recv()
	if m.Type != OpTransactionEnd || m.TxID != 42 || string(m.Payload) != "F\x00" {
		t.Fatalf("expected an abort of transaction 42, got %+v", m)
	}
	p.reply(m, "OK\x00")
}

func TestUpdateRetriesConflicts(t *testing.T) {
	c, p := newPair(t)
	calls := 0
	errc := make(chan error, 1)
	go func() {
		errc <- c.Update(ctx(t), func(tx *Tx) error {
			calls++
			return tx.Write(ctx(t), "/k", []byte("v"))
		})
	}()
	for try, commit := range []string{"EAGAIN", "EAGAIN", "OK"} {
		m := p.recv()
		p.reply(m, fmt.Sprintf("%d\x00", try+1))
		m = p.recv()
		if m.Type != OpWrite || m.TxID != uint32(try+1) {
			t.Fatalf("try %d: write %+v", try, m)
		}
		p.reply(m, "OK\x00")
		m = p.recv()
		if m.Type != OpTransactionEnd || m.TxID != uint32(try+1) || string(m.Payload) != "T\x00" {
			t.Fatalf("try %d: end %+v", try, m)
		}
		if commit == "OK" {
			p.reply(m, "OK\x00")
		} else {
			p.fail(m, commit)
		}
	}
	if err := <-errc; err != nil || calls != 3 {
		t.Fatalf("Update: %v after %d calls", err, calls)
	}

	// An error from fn aborts and is returned as it is.
	boom := errors.New("boom")
	go func() { errc <- c.Update(ctx(t), func(*Tx) error { return boom }) }()
	p.reply(p.recv(), "9\x00")
	m := p.recv()
	if m.Type != OpTransactionEnd || string(m.Payload) != "F\x00" {
		t.Fatalf("abort %+v", m)
	}
	p.reply(m, "OK\x00")
	if err := <-errc; err != boom {
		t.Fatalf("Update: %v", err)
	}
}

func TestDirectoryInParts(t *testing.T) {
	c, p := newPair(t)
	resc := make(chan []string, 1)
	go func() {
		d, err := c.Directory(ctx(t), "/big")
		if err != nil {
			t.Error(err)
		}
		resc <- d
	}()
	p.fail(p.recv(), "E2BIG")
	script := []struct {
		offset string
		reply  string
	}{
		{"0", "5\x00a\x00b\x00"},
		{"4", "6\x00x\x00"},      // the generation changed: start over
		{"0", "6\x00a\x00b\x00"}, //
		{"4", "6\x00c\x00\x00"},  // last part
	}
	for i, s := range script {
		m := p.recv()
		if m.Type != OpDirectoryPart || string(m.Payload) != "/big\x00"+s.offset+"\x00" {
			t.Fatalf("#%d: %s %q", i, m.Type, m.Payload)
		}
		p.reply(m, s.reply)
	}
	if got := <-resc; strings.Join(got, ",") != "a,b,c" {
		t.Errorf("children %q", got)
	}
}

func TestHangupFailsEverything(t *testing.T) {
	c, p := newPair(t)
	go func() { p.reply(p.recv(), "OK\x00") }()
	w, err := c.Watch(ctx(t), "/w")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); _, err := c.Read(ctx(t), "/x"); errs <- err }()
	}
	p.recv()
	p.recv()
	p.conn.Close()
	wg.Wait()
	for range 2 {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Errorf("pending call: %v", err)
		}
	}
	<-c.Done()
	for range w.Events() {
	}
	if _, err := c.Read(ctx(t), "/x"); !errors.Is(err, ErrClosed) {
		t.Errorf("call after hang-up: %v", err)
	}
}

func TestOversizedReplyEndsConnection(t *testing.T) {
	c, p := newPair(t)
	errc := make(chan error, 1)
	go func() { _, err := c.Read(ctx(t), "/x"); errc <- err }()
	m := p.recv()
	p.sendRaw(hdr(uint32(OpRead), m.ReqID, 0, PayloadMax+1))
	if err := <-errc; !errors.Is(err, ErrClosed) || !errors.Is(err, ErrProtocol) {
		t.Errorf("got %v, want ErrClosed wrapping ErrProtocol", err)
	}
}

func TestCloseIsClean(t *testing.T) {
	c, p := newPair(t)
	go func() { p.reply(p.recv(), "OK\x00") }()
	w, err := c.Watch(ctx(t), "/w")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-w.Events(); ok {
		t.Error("watch channel open after Close")
	}
	if err := c.Err(); err != ErrClosed {
		t.Errorf("Err after Close: %v", err)
	}
}
