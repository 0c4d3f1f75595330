package qmp

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
)

// holdsFile reports whether process pid has a descriptor open on the same
// object as f.
func holdsFile(t *testing.T, pid int, f *os.File) bool {
	t.Helper()
	want, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	fds, _ := filepath.Glob(fmt.Sprintf("/proc/%d/fd/*", pid))
	for _, fd := range fds {
		if l, err := os.Readlink(fd); err == nil && l == want {
			return true
		}
	}
	return false
}

func TestGetFD(t *testing.T) {
	c, q := dial(t)
	ctx := qemutest.Context(t, 10*time.Second)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := c.GetFD(ctx, "out", w); err != nil {
		t.Fatal(err)
	}
	w.Close() // QEMU has its own copy
	if !holdsFile(t, q.Cmd.Process.Pid, r) {
		t.Fatal("QEMU does not hold the pipe after getfd")
	}
	if err := c.CloseFD(ctx, "out"); err != nil {
		t.Fatal(err)
	}
	// With every write end closed, the read end sees EOF.
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := r.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("read after closefd: %d, %v; want EOF", n, err)
	}
	var qe *Error
	if err := c.CloseFD(ctx, "out"); !errors.As(err, &qe) {
		t.Errorf("closefd of an unknown name: %v, want a QEMU error", err)
	}
}

// A connection that cannot carry descriptors refuses GetFD without sending
// anything, and stays usable.
func TestGetFDNeedsUnixSocket(t *testing.T) {
	c, server, peer := pipeClient(t)
	ctx := qemutest.Context(t, 5*time.Second)
	if err := c.GetFD(ctx, "x", os.Stdin); !errors.Is(err, ErrNoFDPassing) {
		t.Fatalf("got %v, want ErrNoFDPassing", err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Execute(ctx, "query-status", nil, nil) }()
	line, err := peer.ReadString('\n')
	if err != nil || !strings.Contains(line, `"execute":"query-status"`) {
		t.Fatalf("next request %q, %v; want query-status", line, err)
	}
	io.WriteString(server, `{"return": {}, "id": 1}`+"\r\n")
	if err := <-done; err != nil {
		t.Errorf("query-status after the refused GetFD: %v", err)
	}
}
