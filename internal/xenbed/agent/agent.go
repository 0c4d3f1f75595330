// Package agent is the control channel into a xenbed dom0: a small HTTP
// server that runs there (built into the static xenbed-agent binary) and the
// client the test harness uses to reach it through QEMU's user-mode network
// port forward.
//
// Every request carries the bed's random token in an Authorization header;
// the server compares it in constant time and answers 401 otherwise. The
// endpoints, all under /v1/:
//
//	POST /v1/run      Command (JSON) -> Result (JSON): argv, stdin, timeout; exit code, stdout, stderr
//	PUT  /v1/file     ?path=&mode=  body -> file (written to a temporary name, then renamed)
//	GET  /v1/file     ?path=        -> file contents
//	GET  /v1/ready                  -> Status (JSON): is dom0 usable
//
// A command runs in its own process group, which is killed when its timeout
// expires or the client goes away, so a hung xl cannot outlive its request.
package agent

import (
	"errors"
	"time"
)

// Port is the TCP port the agent listens on inside dom0.
const Port = 7700

// TokenParam is the kernel command-line parameter carrying the token:
// xenbed.token=<hex>. Dotted parameters are left to modules by the kernel,
// so it never reaches init's argv or environment; the agent reads it from
// /proc/cmdline.
const TokenParam = "xenbed.token"

// MaxOutput bounds the stdout and stderr a Result carries, each; the rest is
// dropped and Truncated set.
const MaxOutput = 16 << 20

// ErrUnauthorized reports a request whose token the agent refused.
var ErrUnauthorized = errors.New("agent: unauthorized")

// Command is a program to run in dom0.
type Command struct {
	// Argv is the program and its arguments; Argv[0] is looked up in PATH.
	Argv []string `json:"argv"`
	// Stdin is fed to the program; nil gives it an empty stdin.
	Stdin []byte `json:"stdin,omitempty"`
	// Timeout bounds the run; zero means DefaultTimeout.
	Timeout time.Duration `json:"timeout,omitempty"`
	// Env is added to the agent's environment (KEY=value).
	Env []string `json:"env,omitempty"`
	// Dir is the working directory; empty means /.
	Dir string `json:"dir,omitempty"`
}

// DefaultTimeout bounds a Command without a Timeout.
const DefaultTimeout = 2 * time.Minute

// Result is how a Command ended.
type Result struct {
	// ExitCode is the program's exit status; -1 if it was killed by a signal
	// (TimedOut says whether by the timeout) or could not be started.
	ExitCode int    `json:"exit_code"`
	Stdout   []byte `json:"stdout"`
	Stderr   []byte `json:"stderr"`
	// Signal names the signal that ended the program, if one did.
	Signal string `json:"signal,omitempty"`
	// TimedOut is true when the timeout killed the program.
	TimedOut bool `json:"timed_out,omitempty"`
	// Truncated is true when output beyond MaxOutput was dropped.
	Truncated bool `json:"truncated,omitempty"`
	// StartError says why the program could not be started.
	StartError string `json:"start_error,omitempty"`
	// Duration is the program's wall time.
	Duration time.Duration `json:"duration"`
}

// Status is the agent's view of dom0.
type Status struct {
	// Ready is true when the init script finished and `xl info` succeeds.
	Ready bool `json:"ready"`
	// Init is the init script's state: "running", "done" or
	// "failed: <step>".
	Init string `json:"init"`
	// Detail says what is missing when not Ready.
	Detail string `json:"detail,omitempty"`
}
