package xenctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"time"
)

// Command is one program for a Runner to run.
type Command struct {
	// Args is the program and its arguments; Args[0] is looked up on the
	// runner's PATH.
	Args []string
	// Stdin, if set, is the program's standard input; Stdout, if set,
	// receives its standard output, which is otherwise collected into
	// Result.Stdout. xl opens them by name (/proc/self/fd/0 and 1) to
	// restore from and save to: a runner must hand them over as pipes or
	// files, never sockets, which cannot be opened that way.
	Stdin  io.Reader
	Stdout io.Writer
}

// Result is what a finished program printed.
type Result struct {
	Stdout []byte // when Command.Stdout was nil; at most MaxOutput bytes
	Stderr []byte // its last MaxOutput bytes
}

// MaxOutput bounds the output a Runner collects from a stream.
const MaxOutput = 1 << 20

// outputGrace is how long LocalRunner reads a program's output after it
// exited, for helpers it left behind that hold the pipes.
const outputGrace = 10 * time.Second

// Runner runs toolstack commands: locally (LocalRunner), or in another
// dom0, such as the nested test bed's, through its agent.
//
// Run starts the program, feeds Stdin, drains its output, and returns once
// it has exited and its output has been consumed. A program that exits
// non-zero is an *ExitError carrying its status and standard error; a
// program that cannot be started is another error. When ctx ends, the
// program is killed and Run returns the context's error. Run is called
// from many goroutines at once.
type Runner interface {
	Run(ctx context.Context, cmd Command) (Result, error)
}

// ExitError is a program that exited with a non-zero status.
type ExitError struct {
	Args   []string
	Code   int    // exit status; -1 when killed by a signal
	Stderr []byte // the end of its standard error
}

func (e *ExitError) Error() string {
	msg := strings.TrimSpace(string(e.Stderr))
	if i := strings.LastIndexByte(msg, '\n'); i >= 0 && len(msg)-i < 400 {
		// The last line usually says it; the rest is in Stderr.
		msg = msg[i+1:]
	}
	if len(msg) > 400 {
		msg = msg[len(msg)-400:]
	}
	return fmt.Sprintf("xenctl: %s exited with status %d: %s", strings.Join(e.Args, " "), e.Code, msg)
}

// LocalRunner runs programs on this machine.
type LocalRunner struct{}

// Run implements Runner.
func (LocalRunner) Run(ctx context.Context, cmd Command) (Result, error) {
	if len(cmd.Args) == 0 {
		return Result{}, errors.New("xenctl: empty command")
	}
	c := exec.CommandContext(ctx, cmd.Args[0], cmd.Args[1:]...)
	c.Stdin = cmd.Stdin
	var stdout, stderr tail
	stdout.keepHead = true
	if cmd.Stdout != nil {
		c.Stdout = cmd.Stdout
	} else {
		c.Stdout = &stdout
	}
	c.Stderr = &stderr
	// xl forks helpers (libxl-save-helper, hotplug scripts) that inherit
	// its output: do not wait for them for long once xl itself has gone.
	c.WaitDelay = outputGrace
	err := c.Run()
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	if ctx.Err() != nil {
		return res, fmt.Errorf("xenctl: %s: %w", cmd.Args[0], context.Cause(ctx))
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return res, &ExitError{Args: cmd.Args, Code: ee.ExitCode(), Stderr: res.Stderr}
	}
	if err != nil {
		return res, fmt.Errorf("xenctl: %s: %w", cmd.Args[0], err)
	}
	return res, nil
}

// tail keeps the first (keepHead) or last MaxOutput bytes written to it.
type tail struct {
	buf      bytes.Buffer
	keepHead bool
	dropped  bool
}

func (t *tail) Write(p []byte) (int, error) {
	n := len(p)
	if t.keepHead {
		if room := MaxOutput - t.buf.Len(); room < len(p) {
			p, t.dropped = p[:max(room, 0)], true
		}
		t.buf.Write(p)
		return n, nil
	}
	t.buf.Write(p)
	if over := t.buf.Len() - MaxOutput; over > 0 {
		t.buf.Next(over)
		t.dropped = true
	}
	return n, nil
}

func (t *tail) Bytes() []byte { return bytes.Clone(t.buf.Bytes()) }
