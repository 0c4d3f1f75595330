// Package realxen runs xenctl on real Xen for its tests, in the nested
// hosts of internal/xenbed. xenctl runs where sfhostd will, in dom0:
// dom0tool, a static program built from this package's dom0tool command,
// drives xenctl with LocalRunner and dom0's xenstore, and the tests call it
// through the bed's agent. The guest is Debian's kernel (PVH) with an
// initramfs whose /init is the guestinit command.
//
//	Files: go build dom0tool, guestinit (CGO_ENABLED=0); guest initramfs
//	       -> xenbed.Options.Files: /usr/local/bin/dom0tool, /guest/...
//	Tool:  agent POST /v1/run {dom0tool <cmd> -flags} -> JSON result
//	Ticks: /var/log/xen/console/guest-<name>.log -> guestinit's lines
//
// Why not a Runner that carries xl through the agent: the agent buffers a
// command's standard input and output whole, in JSON, and caps the output
// at 16 MiB, so a capture (xl save to standard output) of even a small
// guest does not fit through it; and the guest channel's host side needs
// xenstored's socket, which only dom0 has.
package realxen

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/internal/xenbed"
	"github.com/snowflock-go/snowflock/internal/xenbed/agent"
)

// Where Files puts things in dom0.
const (
	ToolPath   = "/usr/local/bin/dom0tool"
	KernelPath = "/guest/vmlinux"
	InitrdPath = "/guest/initrd.cpio"
	// ConsoleDir is where xenconsoled logs guest consoles.
	ConsoleDir = "/var/log/xen/console"
)

// GuestModules are the kernel modules guestinit loads: the NIC's frontend.
var GuestModules = []string{"xen-netfront"}

// Files builds dom0tool and the guest's initramfs in dir and returns them,
// with Debian's kernel, as xenbed.Options.Files. It runs the go command
// and must run inside this module (tests do).
func Files(ctx context.Context, dir string, log hclog.Logger) (map[string]string, error) {
	tool := filepath.Join(dir, "dom0tool")
	initBin := filepath.Join(dir, "guestinit")
	for _, b := range []struct{ out, pkg string }{{tool, "dom0tool"}, {initBin, "guestinit"}} {
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", b.out,
			"github.com/snowflock-go/snowflock/xenctl/internal/realxen/"+b.pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("realxen: building %s: %w: %s", b.pkg, err, strings.TrimSpace(string(out)))
		}
	}
	kernel, err := image.FetchKernel(ctx, "", GuestModules, log)
	if err != nil {
		return nil, err
	}
	initrd, err := image.WriteMinimalInitramfs(dir, kernel, image.ArchiveFile{Name: "/init", Mode: 0o755, Host: initBin})
	if err != nil {
		return nil, err
	}
	return map[string]string{ToolPath: tool, KernelPath: kernel.Vmlinux, InitrdPath: initrd}, nil
}

// ToolError is a dom0tool run that failed; Stderr has xenctl's log.
type ToolError struct {
	Args   []string
	Result agent.Result
}

func (e *ToolError) Error() string {
	what := fmt.Sprintf("exit status %d", e.Result.ExitCode)
	if e.Result.TimedOut {
		what = "timed out"
	}
	stderr := strings.TrimSpace(string(e.Result.Stderr))
	if i := strings.LastIndex(stderr, "\ndom0tool "); i >= 0 {
		stderr = stderr[i+1:] // its own last word, after xenctl's log
	}
	return fmt.Sprintf("dom0tool %s: %s: %s", strings.Join(e.Args, " "), what, stderr)
}

// Tool runs dom0tool with args on h and decodes its JSON result into out
// (nil: discard). It also returns dom0tool's standard error, xenctl's log.
func Tool(ctx context.Context, h *xenbed.Host, out any, args ...string) (stderr string, err error) {
	timeout := 5 * time.Minute
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	argv := append([]string{ToolPath}, args...)
	if !slices.Contains(args, "-timeout") {
		// dom0tool stops a little before the agent kills it, to report.
		argv = append(argv, "-timeout", (timeout - 5*time.Second).String())
	}
	res, err := h.Exec(ctx, agent.Command{Argv: argv, Timeout: timeout})
	if err != nil {
		return "", err
	}
	if res.ExitCode != 0 || res.StartError != "" {
		return string(res.Stderr), &ToolError{Args: args, Result: res}
	}
	if out != nil {
		if err := json.Unmarshal(res.Stdout, out); err != nil {
			return string(res.Stderr), fmt.Errorf("dom0tool %s: %w: %q", strings.Join(args, " "), err, res.Stdout)
		}
	}
	return string(res.Stderr), nil
}

// Console returns the guest's console log on h so far.
func Console(ctx context.Context, h *xenbed.Host, name string) (string, error) {
	res, err := h.Exec(ctx, agent.Command{Argv: []string{"cat", ConsoleDir + "/guest-" + name + ".log"}, Timeout: 30 * time.Second})
	if err != nil {
		return "", err
	}
	return string(res.Stdout), nil
}

// Tick is one of guestinit's tick lines.
type Tick struct {
	N      int
	Secret string
	Clock  time.Time // the guest's
}

var tickLine = regexp.MustCompile(`guestinit tick ([0-9]+) secret=([0-9a-f]+) ms=([0-9]+)`)

// Ticks returns the tick lines of a console log, in order.
func Ticks(console string) []Tick {
	var ticks []Tick
	for _, m := range tickLine.FindAllStringSubmatch(console, -1) {
		n, _ := strconv.Atoi(m[1])
		ms, _ := strconv.ParseInt(m[3], 10, 64)
		ticks = append(ticks, Tick{N: n, Secret: m[2], Clock: time.UnixMilli(ms)})
	}
	return ticks
}

// Lines returns the console's lines that start with prefix (after any
// carriage returns the console adds), without it.
func Lines(console, prefix string) []string {
	var out []string
	for _, l := range strings.Split(console, "\n") {
		l = strings.TrimRight(l, "\r")
		if i := strings.Index(l, prefix); i >= 0 {
			out = append(out, l[i+len(prefix):])
		}
	}
	return out
}
