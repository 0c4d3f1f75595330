package agent

import (
	"bytes"
	"context"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func newTestAgent(t *testing.T, token string) *Client {
	t.Helper()
	srv := httptest.NewServer((&Server{Token: "0123456789abcdef"}).Handler())
	t.Cleanup(srv.Close)
	c := NewClient(strings.TrimPrefix(srv.URL, "http://"), token)
	t.Cleanup(c.Close)
	return c
}

func TestRun(t *testing.T) {
	c := newTestAgent(t, "0123456789abcdef")
	tests := []struct {
		cmd        Command
		exit       int
		stdout     string
		stderr     string
		timedOut   bool
		startError bool
		signal     string
	}{
		{cmd: Command{Argv: []string{"echo", "hello"}}, stdout: "hello\n"},
		{cmd: Command{Argv: []string{"sh", "-c", "echo out; echo err >&2; exit 3"}}, exit: 3, stdout: "out\n", stderr: "err\n"},
		{cmd: Command{Argv: []string{"cat"}, Stdin: []byte("piped")}, stdout: "piped"},
		{cmd: Command{Argv: []string{"sh", "-c", "echo $X"}, Env: []string{"X=from-env"}}, stdout: "from-env\n"},
		{cmd: Command{Argv: []string{"pwd"}, Dir: "/tmp"}, stdout: "/tmp\n"},
		{cmd: Command{Argv: []string{"sleep", "10"}, Timeout: 200 * time.Millisecond}, exit: -1, timedOut: true, signal: "killed"},
		{cmd: Command{Argv: []string{"sh", "-c", "kill -TERM $$"}}, exit: -1, signal: "terminated"},
		// The grandchild holding stdout must not keep the request open.
		{cmd: Command{Argv: []string{"sh", "-c", "sleep 10 & echo started"}, Timeout: 20 * time.Second}, stdout: "started\n"},
		{cmd: Command{Argv: []string{"/nonexistent/program"}}, exit: -1, startError: true},
	}
	for i, tt := range tests {
		start := time.Now()
		res, err := c.Run(context.Background(), tt.cmd)
		if err != nil {
			t.Fatalf("#%d: %v", i, err)
		}
		if res.ExitCode != tt.exit || string(res.Stdout) != tt.stdout || string(res.Stderr) != tt.stderr ||
			res.TimedOut != tt.timedOut || (res.StartError != "") != tt.startError || res.Signal != tt.signal {
			t.Errorf("#%d %q: got exit %d stdout %q stderr %q timedOut %v startError %q signal %q; want exit %d stdout %q stderr %q timedOut %v startError %v signal %q",
				i, tt.cmd.Argv, res.ExitCode, res.Stdout, res.Stderr, res.TimedOut, res.StartError, res.Signal, tt.exit, tt.stdout, tt.stderr, tt.timedOut, tt.startError, tt.signal)
		}
		if d := time.Since(start); d > 8*time.Second {
			t.Errorf("#%d %q: took %v", i, tt.cmd.Argv, d)
		}
	}
}

func TestOutputCapped(t *testing.T) {
	res := Run(context.Background(), Command{Argv: []string{"head", "-c", "20000000", "/dev/zero"}})
	if res.ExitCode != 0 || len(res.Stdout) != MaxOutput || !res.Truncated {
		t.Fatalf("got exit %d, %d bytes, truncated %v; want 0, %d, true", res.ExitCode, len(res.Stdout), res.Truncated, MaxOutput)
	}
}

func TestPutGet(t *testing.T) {
	c := newTestAgent(t, "0123456789abcdef")
	ctx := context.Background()
	dir := t.TempDir()
	data := bytes.Repeat([]byte("snowflock"), 1<<17)
	src := filepath.Join(dir, "src")
	if err := os.WriteFile(src, data, 0o750); err != nil {
		t.Fatal(err)
	}
	remote := filepath.Join(dir, "remote", "sub", "file")
	if err := c.Put(ctx, src, remote); err != nil {
		t.Fatal(err)
	}
	back := filepath.Join(dir, "back")
	if err := c.Get(ctx, remote, back); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(back)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes back, want %d equal bytes", len(got), len(data))
	}
	for _, p := range []string{remote, back} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o750 {
			t.Errorf("%s: mode %v (%v), want 0750", p, fi.Mode(), err)
		}
	}
	if err := c.Get(ctx, filepath.Join(dir, "missing"), back); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("Get of a missing file: got %v, want a 404", err)
	}
	if err := c.Put(ctx, src, "relative/path"); err == nil {
		t.Errorf("Put to a relative path: got no error")
	}
}

func TestUnauthorized(t *testing.T) {
	for i, token := range []string{"", "wrong-token-000000", "0123456789abcdef0"} {
		c := newTestAgent(t, token)
		_, err := c.Run(context.Background(), Command{Argv: []string{"true"}})
		if !errors.Is(err, ErrUnauthorized) {
			t.Errorf("#%d token %q: got %v, want ErrUnauthorized", i, token, err)
		}
	}
}
