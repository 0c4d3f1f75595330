package qmp

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
)

// dial starts a QEMU with no machine and connects to its monitor.
func dial(t *testing.T, extra ...string) (*Client, *qemutest.Process) {
	t.Helper()
	q := qemutest.Monitor(t, extra...)
	c, err := Dial(qemutest.Context(t, 10*time.Second), q.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, q
}

// waitFor polls cond until it holds; it fails the test when ctx ends first.
func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(time.Millisecond):
		}
	}
}

func TestGreetingAndCommands(t *testing.T) {
	c, _ := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)

	g := c.Greeting()
	if g.Major < 7 || g.Package == "" {
		t.Errorf("greeting %+v: want QEMU >= 7 with a package string", g)
	}

	var version struct {
		QEMU struct{ Major, Minor, Micro int } `json:"qemu"`
	}
	if err := c.Execute(ctx, "query-version", nil, &version); err != nil {
		t.Fatal(err)
	}
	if version.QEMU.Major != g.Major || version.QEMU.Minor != g.Minor {
		t.Errorf("query-version %+v disagrees with the greeting %+v", version.QEMU, g)
	}

	// Arguments are passed through; a nil map sends no arguments at all.
	var cmds []struct{ Name string }
	if err := c.Execute(ctx, "query-commands", map[string]any(nil), &cmds); err != nil {
		t.Fatal(err)
	}
	if len(cmds) < 100 {
		t.Errorf("query-commands listed %d commands, want over 100", len(cmds))
	}
	var obj []struct{ Name, Type string }
	if err := c.Execute(ctx, "qom-list", map[string]string{"path": "/machine"}, &obj); err != nil {
		t.Fatal(err)
	}
	if len(obj) == 0 {
		t.Error("qom-list /machine is empty")
	}

	status, err := c.QueryStatus(ctx)
	if err != nil || status != StatusRunning {
		t.Errorf("QueryStatus = %q, %v; want %q", status, err, StatusRunning)
	}
	info, err := c.QueryMigrate(ctx)
	if err != nil || info.Status != "" {
		t.Errorf("QueryMigrate before any migration = %+v, %v; want no status", info, err)
	}
	if err := c.MigrateSetCapabilities(ctx, map[string]bool{"x-ignore-shared": true, "events": true}); err != nil {
		t.Fatal(err)
	}
	var caps []struct {
		Capability string
		State      bool
	}
	if err := c.Execute(ctx, "query-migrate-capabilities", nil, &caps); err != nil {
		t.Fatal(err)
	}
	on := map[string]bool{}
	for _, cp := range caps {
		on[cp.Capability] = cp.State
	}
	if !on["x-ignore-shared"] || !on["events"] {
		t.Errorf("capabilities after MigrateSetCapabilities: %v", on)
	}
	if c.MalformedMessages() != 0 {
		t.Errorf("%d malformed messages from a real QEMU", c.MalformedMessages())
	}
}

func TestQMPError(t *testing.T) {
	c, _ := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)
	tests := []struct {
		command string
		args    any
		class   string
	}{
		{"no-such-command", nil, ClassCommandNotFound},
		{"qom-list", map[string]string{"path": "/no/such/object"}, ClassDeviceNotFound},
		{"query-status", map[string]int{"unexpected": 1}, ClassGenericError},
		{"migrate-incoming", map[string]string{"uri": "exec:true"}, ClassGenericError}, // not started with -incoming
	}
	for i, tc := range tests {
		err := c.Execute(ctx, tc.command, tc.args, nil)
		var qe *Error
		if !errors.As(err, &qe) {
			t.Errorf("#%d %s: got %v, want a *qmp.Error", i, tc.command, err)
			continue
		}
		if qe.Class != tc.class || qe.Command != tc.command || qe.Desc == "" {
			t.Errorf("#%d: got %+v, want class %s for %s", i, qe, tc.class, tc.command)
		}
	}
	// The connection survives errors.
	if _, err := c.QueryStatus(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentExecute(t *testing.T) {
	c, _ := dial(t)
	ctx := qemutest.Context(t, 20*time.Second)

	// Replies must reach their own callers: each call lists one of several
	// QOM paths, whose answers differ, or runs a command that does not exist,
	// whose error names it.
	list := func(path string) (string, error) {
		var props []struct{ Name string }
		if err := c.Execute(ctx, "qom-list", map[string]string{"path": path}, &props); err != nil {
			return "", err
		}
		names := make([]string, len(props))
		for i, p := range props {
			names[i] = p.Name
		}
		slices.Sort(names)
		return strings.Join(names, ","), nil
	}
	paths := []string{"/", "/machine", "/chardevs", "/machine/unattached", "/machine/unattached/sysbus"}
	want := map[string]string{}
	for _, p := range paths {
		l, err := list(p)
		if err != nil {
			t.Fatal(err)
		}
		want[p] = l
	}
	if len(want) != len(paths) {
		t.Fatalf("paths have identical listings: %v", want)
	}

	const workers, calls = 16, 50
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range calls {
				if i%5 == 4 {
					name := fmt.Sprintf("no-such-command-%d-%d", w, i)
					err := c.Execute(ctx, name, nil, nil)
					var qe *Error
					if !errors.As(err, &qe) || qe.Command != name || !strings.Contains(qe.Desc, name) {
						errs <- fmt.Errorf("worker %d call %d: got %v", w, i, err)
						return
					}
					continue
				}
				p := paths[(w+i)%len(paths)]
				got, err := list(p)
				if err != nil || got != want[p] {
					errs <- fmt.Errorf("worker %d call %d: qom-list %s = %q, %v; want %q", w, i, p, got, err, want[p])
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	c.mu.Lock()
	n := len(c.pending)
	c.mu.Unlock()
	if n != 0 {
		t.Errorf("%d calls still pending after all returned", n)
	}
}

func TestEvents(t *testing.T) {
	c, _ := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)

	sub := c.Subscribe("STOP", "RESUME")
	defer sub.Close()
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if status, _ := c.QueryStatus(ctx); status != StatusPaused {
		t.Errorf("status after Stop = %q, want %q", status, StatusPaused)
	}
	if err := c.Cont(ctx); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"STOP", "RESUME"} {
		ev, err := sub.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Name != want || ev.Timestamp.IsZero() || time.Since(ev.Timestamp) > time.Minute {
			t.Errorf("subscription: got %+v, want a fresh %s", ev, want)
		}
	}
	// The catch-all channel saw them too, in order.
	for _, want := range []string{"STOP", "RESUME"} {
		select {
		case ev := <-c.Events():
			if ev.Name != want {
				t.Errorf("Events(): got %s, want %s", ev.Name, want)
			}
		case <-ctx.Done():
			t.Fatal("no event on Events()")
		}
	}

	// WaitEvent sees events that arrive after it is called.
	got := make(chan Event, 1)
	go func() {
		ev, err := c.WaitEvent(ctx, "STOP")
		if err != nil {
			t.Error(err)
		}
		got <- ev
	}()
	waitFor(t, ctx, "WaitEvent to subscribe", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.subs) == 2 // sub and WaitEvent's
	})
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if ev := <-got; ev.Name != "STOP" {
		t.Errorf("WaitEvent returned %+v", ev)
	}
}

// Nobody reads: the reader must not block, the buffers keep the newest
// events and count the rest.
func TestEventsDropOldest(t *testing.T) {
	c, _ := dial(t)
	ctx := qemutest.Context(t, 20*time.Second)
	sub := c.Subscribe("RESUME")
	defer sub.Close()
	const rounds = EventBuffer/2 + 20
	for range rounds {
		if err := c.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.Cont(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// QEMU emits STOP and RESUME before the replies to stop and cont, so by
	// now every event has been delivered.
	if got, want := c.DroppedEvents(), uint64(2*rounds-EventBuffer); got != want {
		t.Errorf("DroppedEvents = %d, want %d", got, want)
	}
	if got := sub.Dropped(); got != 0 {
		t.Errorf("subscription to RESUME only dropped %d events, want 0", got)
	}
	if len(c.Events()) != EventBuffer || len(sub.C()) != rounds {
		t.Errorf("buffered %d and %d events, want %d and %d", len(c.Events()), len(sub.C()), EventBuffer, rounds)
	}
	// The oldest were dropped: the first buffered event is a STOP from round
	// rounds-EventBuffer/2, and the stream still alternates.
	for i := range EventBuffer {
		ev := <-c.Events()
		want := []string{"STOP", "RESUME"}[i%2]
		if ev.Name != want {
			t.Fatalf("buffered event %d is %s, want %s", i, ev.Name, want)
		}
	}
}

func TestConnectionLoss(t *testing.T) {
	c, q := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)
	sub := c.Subscribe()

	// A call that is pending when QEMU dies fails with ErrDisconnected. QEMU
	// is frozen so that the call is still pending when it is killed.
	if err := syscall.Kill(q.Cmd.Process.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	pending := make(chan error, 1)
	go func() {
		_, err := c.QueryStatus(ctx)
		pending <- err
	}()
	waitFor(t, ctx, "the call to be pending", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.pending) == 1
	})
	q.Cmd.Process.Kill()
	if err := <-pending; !errors.Is(err, ErrDisconnected) {
		t.Fatalf("pending call when QEMU died: %v, want ErrDisconnected", err)
	}
	if _, err := c.QueryStatus(ctx); !errors.Is(err, ErrDisconnected) {
		t.Fatalf("call after QEMU died: %v, want ErrDisconnected", err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed")
	}
	if !errors.Is(c.Err(), ErrDisconnected) {
		t.Errorf("Err() = %v", c.Err())
	}
	if _, err := sub.Next(ctx); !errors.Is(err, ErrDisconnected) {
		t.Errorf("subscription Next after loss: %v", err)
	}
	if _, ok := <-c.Events(); ok {
		t.Error("Events() still open after loss")
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close after loss: %v", err)
	}
}
