package qmp

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
)

// Behaviour that a well-behaved QEMU cannot be made to show (hostile or
// broken output) is tested against a scripted peer on the other end of a
// pipe; everything else runs against a real QEMU.

// scriptedPeer does the server side of the handshake on conn and returns a
// reader of the client's later requests.
func scriptedPeer(t *testing.T, conn net.Conn) *bufio.Reader {
	t.Helper()
	r := bufio.NewReader(conn)
	if _, err := io.WriteString(conn, realGreeting+"\r\n"); err != nil {
		t.Error(err)
		return r
	}
	if line, err := r.ReadString('\n'); err != nil || !strings.Contains(line, "qmp_capabilities") {
		t.Errorf("handshake request %q, %v", line, err)
	}
	io.WriteString(conn, `{"return": {}, "id": 0}`+"\r\n")
	return r
}

func pipeClient(t *testing.T) (*Client, net.Conn, *bufio.Reader) {
	t.Helper()
	client, server := net.Pipe()
	peer := make(chan *bufio.Reader, 1)
	go func() { peer <- scriptedPeer(t, server) }()
	c, err := NewClient(qemutest.Context(t, 5*time.Second), client)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); server.Close() })
	return c, server, <-peer
}

func TestLineTooLongEndsConnection(t *testing.T) {
	c, server, _ := pipeClient(t)
	ctx := qemutest.Context(t, 10*time.Second)
	go func() {
		// A line one byte over the bound, written in chunks, never ended.
		chunk := []byte(strings.Repeat("x", 1<<20))
		io.WriteString(server, `{"return": "`)
		for range MaxLineSize / len(chunk) {
			if _, err := server.Write(chunk); err != nil {
				return
			}
		}
	}()
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("connection not ended by an over-long line")
	}
	if err := c.Err(); !errors.Is(err, ErrDisconnected) || !errors.Is(err, ErrLineTooLong) {
		t.Fatalf("Err() = %v, want ErrDisconnected and ErrLineTooLong", err)
	}
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrLineTooLong) {
		t.Fatalf("Execute after: %v", err)
	}
}

func TestMalformedLinesSkipped(t *testing.T) {
	c, server, peer := pipeClient(t)
	ctx := qemutest.Context(t, 10*time.Second)
	done := make(chan error, 1)
	go func() {
		var got struct{ Status string }
		err := c.Execute(ctx, "query-status", nil, &got)
		if err == nil && got.Status != "running" {
			err = errors.New("wrong reply: " + got.Status)
		}
		done <- err
	}()
	line, err := peer.ReadString('\n')
	if err != nil || !strings.Contains(line, `"id":1`) {
		t.Fatalf("request %q, %v", line, err)
	}
	// Garbage, a reply for nobody, one without an id, then the real reply.
	io.WriteString(server, "not json\r\n{\"return\": 1, \"id\": 99}\r\n{\"return\": 2}\r\n"+
		"{\"event\": \"X\", \"return\": {}}\r\n"+`{"return": {"status": "running"}, "id": 1}`+"\r\n")
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// "not json", the id-less reply and the two-kind message; the reply to
	// an unknown id is well-formed and just unmatched.
	if got := c.MalformedMessages(); got != 3 {
		t.Errorf("MalformedMessages = %d, want 3", got)
	}
}

func TestHandshakeFailures(t *testing.T) {
	tests := []struct {
		script  string // what the peer sends
		wantErr string
	}{
		{`{"return": {}}` + "\n", "not a QMP greeting"},
		{"garbage\n", "not a JSON object"},
		{"", "EOF"},
		{realGreeting + "\n" + `{"error": {"class": "GenericError", "desc": "no"}, "id": 0}` + "\n", "qmp_capabilities: GenericError: no"},
	}
	for i, tc := range tests {
		client, server := net.Pipe()
		go func() {
			r := bufio.NewReader(server)
			lines := strings.SplitAfter(tc.script, "\n")
			io.WriteString(server, lines[0])
			if len(lines) > 1 {
				r.ReadString('\n')
				io.WriteString(server, strings.Join(lines[1:], ""))
			}
			server.Close()
		}()
		_, err := NewClient(context.Background(), client)
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("#%d: got %v, want an error containing %q", i, err, tc.wantErr)
		}
	}
}

func TestHandshakeTimeout(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := NewClient(ctx, client) // the peer never greets
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want DeadlineExceeded", err)
	}
}

// A caller that gives up leaves the connection usable; the late reply is
// dropped. QEMU is frozen to hold the reply back.
func TestExecuteCancel(t *testing.T) {
	c, q := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)
	if err := syscall.Kill(q.Cmd.Process.Pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := c.QueryStatus(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("QueryStatus on a frozen QEMU: %v, want DeadlineExceeded", err)
	}
	if err := syscall.Kill(q.Cmd.Process.Pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if s, err := c.QueryStatus(ctx); err != nil || s != StatusRunning {
		t.Fatalf("QueryStatus after: %q, %v", s, err)
	}
	c.mu.Lock()
	n := len(c.pending)
	c.mu.Unlock()
	if n != 0 {
		t.Errorf("%d calls pending", n)
	}
}

func TestCloseFailsPending(t *testing.T) {
	c, _, peer := pipeClient(t)
	ctx := qemutest.Context(t, 10*time.Second)
	done := make(chan error, 1)
	go func() { done <- c.Execute(ctx, "query-status", nil, nil) }()
	peer.ReadString('\n') // the request is out; never answer it
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Fatalf("pending call: %v, want ErrClosed", err)
	}
	if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close: %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestQuit(t *testing.T) {
	c, q := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)
	if err := c.Quit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.Done():
	case <-ctx.Done():
		t.Fatal("connection still up after quit")
	}
	if !errors.Is(c.Err(), ErrDisconnected) {
		t.Errorf("Err() = %v, want ErrDisconnected", c.Err())
	}
	select {
	case <-q.Exited:
	case <-ctx.Done():
		t.Fatal("QEMU still running after quit")
	}
	if code := q.Cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("QEMU exit code %d after quit, want 0", code)
	}
}

// A write that ctx cuts short before anything went out leaves the connection
// usable; one cut after part of the request went out ends it.
func TestWriteCancelled(t *testing.T) {
	c, server, peer := pipeClient(t)
	ctx := qemutest.Context(t, 10*time.Second)

	// net.Pipe is unbuffered: with nobody reading, nothing is sent.
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := c.Execute(short, "stop", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("unread write: %v, want DeadlineExceeded", err)
	}
	answered := make(chan error, 1)
	go func() {
		line, err := peer.ReadString('\n')
		if err == nil && !strings.Contains(line, `"execute":"cont"`) {
			err = errors.New("peer got " + line)
		}
		if err == nil {
			_, err = io.WriteString(server, `{"return": {}, "id": 2}`+"\n")
		}
		answered <- err
	}()
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatalf("call after a cancelled write: %v", err)
	}
	if err := <-answered; err != nil {
		t.Fatal(err)
	}

	// Now the peer takes a few bytes and stops reading (from the pipe
	// itself: its bufio.Reader would take the whole request).
	go func() {
		buf := make([]byte, 5)
		io.ReadFull(server, buf)
	}()
	short2, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	err := c.Execute(short2, "query-status", nil, nil)
	if !errors.Is(err, ErrDisconnected) {
		t.Fatalf("half-written request: %v, want ErrDisconnected", err)
	}
	if !strings.Contains(c.Err().Error(), "write") {
		t.Errorf("Err() = %v, want the write failure as the cause", c.Err())
	}
}

// However the peer goes away, calls fail with ErrDisconnected.
func TestPeerHangsUp(t *testing.T) {
	for i := range 20 {
		c, server, _ := pipeClient(t)
		ctx := qemutest.Context(t, 10*time.Second)
		server.Close()
		if err := c.Execute(ctx, "query-status", nil, nil); !errors.Is(err, ErrDisconnected) {
			t.Fatalf("#%d: %v, want ErrDisconnected", i, err)
		}
	}
}
