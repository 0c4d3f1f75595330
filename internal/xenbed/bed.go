package xenbed

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/internal/xenbed/agent"
)

const agentPortInDom0 = agent.Port

var (
	// ErrUnsupported reports a machine that cannot run a bed: no QEMU, no
	// apt, not root.
	ErrUnsupported = errors.New("xenbed: cannot run Xen hosts here")
	// ErrBootFailed reports a host whose dom0 did not become ready.
	ErrBootFailed = errors.New("xenbed: host did not boot")
)

// Options say what bed to start. Zero values take the defaults noted.
type Options struct {
	// Hosts is the number of Xen hosts (2).
	Hosts int
	// MemMB is each host's RAM (2048), Dom0MemMB dom0's share (1024), the
	// rest is free for guests.
	MemMB, Dom0MemMB int
	// CPUs is each host's vCPUs. The default, 2 but no more than the
	// machine's cores divided among the hosts (at least 1), avoids
	// overcommitting: TCG runs one thread per vCPU, and two 2-vCPU hosts
	// on 2 cores took ~20 s to boot where two 1-vCPU hosts took 7-9 s.
	CPUs int
	// Files maps clean absolute dom0 paths to host files to put into every
	// dom0's initramfs (sfhostd, guest kernels and initrds).
	Files map[string]string
	// CacheDir is guest/image's cache directory (image.DefaultCacheDir()).
	CacheDir string
	// Agent is a prebuilt static xenbed-agent; empty builds it.
	Agent string
	// QEMU is the emulator binary ("qemu-system-x86_64").
	QEMU string
	// Dir holds the consoles and logs, and is kept after Close. Empty means
	// a temporary directory that Close removes.
	Dir string
	// MTU is the bed network's (dom0's bed NIC and xenbr0): 0 is 1500;
	// up to 9000 (jumbo frames, which QEMU's e1000 and the hub carry).
	MTU int
	// BootTimeout bounds each host's boot, from QEMU's start to dom0
	// ready (10 minutes: TCG on a loaded machine is slow).
	BootTimeout time.Duration
	// Logger receives progress; nil discards it.
	Logger hclog.Logger
}

func (o Options) withDefaults() Options {
	if o.Hosts == 0 {
		o.Hosts = 2
	}
	if o.MemMB == 0 {
		o.MemMB = 2048
	}
	if o.Dom0MemMB == 0 {
		o.Dom0MemMB = 1024
	}
	if o.CPUs == 0 {
		o.CPUs = min(2, max(1, runtime.NumCPU()/max(1, o.Hosts)))
	}
	if o.QEMU == "" {
		o.QEMU = "qemu-system-x86_64"
	}
	if o.BootTimeout == 0 {
		o.BootTimeout = 10 * time.Minute
	}
	if o.Logger == nil {
		o.Logger = hclog.NewNullLogger()
	}
	o.Logger = o.Logger.Named("xenbed")
	return o
}

// Available reports whether beds can run here, and why not.
func Available() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: not root (apt-get download and update need it)", ErrUnsupported)
	}
	for _, bin := range []string{"qemu-system-x86_64", "apt-get", "apt-cache", "go"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("%w: no %s", ErrUnsupported, bin)
		}
	}
	return nil
}

// Bed is a set of running Xen hosts on one Ethernet segment.
type Bed struct {
	// Hosts are the hosts, Hosts[i] with bed address 10.77.0.(i+1).
	Hosts []*Host
	// Image is what they booted.
	Image *Image

	dir       string
	removeDir bool
	hub       *hub
	log       hclog.Logger
	lock      *os.File // the machine-wide bed lock, held until Close
	closeOnce sync.Once
	closeErr  error
}

// lockPath is the file whose lock a bed holds while it runs: nested Xen
// hosts on a small machine are slow enough alone, so beds of different
// processes (packages tested in parallel) take turns.
var lockPath = filepath.Join(os.TempDir(), "snowflock-xenbed.lock")

// acquireLock waits for the machine-wide bed lock.
func acquireLock(ctx context.Context, log hclog.Logger) (*os.File, error) {
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("xenbed: lock: %w", err)
	}
	for waited := false; ; waited = true {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("xenbed: lock: %w", err)
		}
		if !waited {
			log.Info("waiting for another test bed on this machine to close", "lock", lockPath)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, context.Cause(ctx)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Host is one Xen host: a QEMU running Xen with a dom0 whose agent answers.
type Host struct {
	// Index is the host's position in Bed.Hosts.
	Index int
	// BootTime is the time from QEMU's start to dom0 ready.
	BootTime time.Duration

	cfg     hostConfig
	qemuLog string
	client  *agent.Client
	proc    *qemuProc
}

// Start boots opts.Hosts hosts in parallel and returns once every dom0 is
// ready: its init script finished and `xl info` succeeds. On error nothing
// is left running.
func Start(ctx context.Context, opts Options) (*Bed, error) {
	o := opts.withDefaults()
	if o.Hosts < 1 || o.Hosts > 250 {
		return nil, fmt.Errorf("xenbed: %d hosts: want 1 to 250", o.Hosts)
	}
	if o.MTU != 0 && (o.MTU < 576 || o.MTU > 9000) {
		return nil, fmt.Errorf("xenbed: MTU %d: want 576 to 9000", o.MTU)
	}
	if o.Dom0MemMB >= o.MemMB {
		return nil, fmt.Errorf("xenbed: dom0 memory %d MiB leaves nothing of %d MiB", o.Dom0MemMB, o.MemMB)
	}
	img, err := BuildImage(ctx, ImageOptions{CacheDir: o.CacheDir, Agent: o.Agent, Files: o.Files, Logger: o.Logger})
	if err != nil {
		return nil, err
	}
	b := &Bed{Image: img, dir: o.Dir, log: o.Logger}
	if b.lock, err = acquireLock(ctx, o.Logger); err != nil {
		return nil, err
	}
	if b.dir == "" {
		if b.dir, err = os.MkdirTemp("", "xenbed-"); err != nil {
			b.Close()
			return nil, fmt.Errorf("xenbed: %w", err)
		}
		b.removeDir = true
	} else if err := os.MkdirAll(b.dir, 0o755); err != nil {
		b.Close()
		return nil, fmt.Errorf("xenbed: %w", err)
	}
	if b.hub, err = newHub(o.Hosts); err != nil {
		b.Close()
		return nil, err
	}
	token, err := newToken()
	if err != nil {
		b.Close()
		return nil, err
	}
	for i := 0; i < o.Hosts; i++ {
		b.Hosts = append(b.Hosts, &Host{Index: i, cfg: hostConfig{
			Index: i, QEMU: o.QEMU, MemMB: o.MemMB, Dom0MemMB: o.Dom0MemMB, CPUs: o.CPUs, MTU: o.MTU,
			Image: img, Token: token, BedNetdev: b.hub.netdev(i, "bed"),
			ConsolePath: filepath.Join(b.dir, fmt.Sprintf("h%d.console", i+1)),
		}, qemuLog: filepath.Join(b.dir, fmt.Sprintf("h%d.qemu.log", i+1))})
	}

	errs := make([]error, len(b.Hosts))
	var wg sync.WaitGroup
	for i, h := range b.Hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = h.boot(ctx, o.BootTimeout, b.log.With("host", i+1))
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

func newToken() (string, error) {
	buf := make([]byte, 16)
	if _, err := rand.Read(buf); err != nil {
		return "", fmt.Errorf("xenbed: token: %w", err)
	}
	return hex.EncodeToString(buf), nil
}

// startAttempts bounds QEMU restarts when the agent's forwarded port,
// picked free a moment earlier, was taken by someone else in between.
const startAttempts = 3

// boot starts the host's QEMU and waits for its dom0 to be ready.
func (h *Host) boot(ctx context.Context, timeout time.Duration, log hclog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var start time.Time // of the QEMU that boots
	for attempt := 1; ; attempt++ {
		port, err := freeTCPPort()
		if err != nil {
			return err
		}
		h.cfg.AgentPort = port
		argv := append([]string{h.cfg.QEMU}, h.cfg.args()...)
		log.Debug("starting QEMU", "argv", strings.Join(argv, " "))
		if h.proc, err = startQEMU(argv, h.qemuLog); err != nil {
			return err
		}
		start = time.Now()
		// QEMU sets up its netdevs before the guest runs: a port clash
		// shows within a moment.
		select {
		case <-h.proc.exited:
			out, _ := os.ReadFile(h.qemuLog)
			if attempt < startAttempts && bytes.Contains(out, []byte("host forwarding rule")) {
				log.Warn("agent port was taken; restarting QEMU", "port", port)
				continue
			}
			return fmt.Errorf("%w: host %d: QEMU exited at once (%v): %s", ErrBootFailed, h.Index+1, h.proc.exitErr, bytes.TrimSpace(out))
		case <-time.After(500 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
		break
	}
	h.client = agent.NewClient(fmt.Sprintf("127.0.0.1:%d", h.cfg.AgentPort), h.cfg.Token)
	log.Info("QEMU started; waiting for dom0", "agent", h.AgentAddr(), "console", h.Console())
	if err := h.waitReady(ctx, log); err != nil {
		return err
	}
	h.BootTime = time.Since(start)
	log.Info("dom0 ready", "boot_time", h.BootTime)
	return nil
}

// waitReady polls the agent until dom0 reports ready, QEMU exits, init
// fails or ctx ends.
func (h *Host) waitReady(ctx context.Context, log hclog.Logger) error {
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	var last string
	answered := false
	for {
		// Until the agent first answers, a connection slirp forwards while
		// dom0's NIC is still down waits out TCP's SYN backoff (seconds):
		// give up on it early and dial again. Once up, a status check runs
		// `xl info`, which may take a while on a busy host.
		perTry := time.Second
		if answered {
			perTry = time.Minute
		}
		actx, cancel := context.WithTimeout(ctx, perTry)
		st, err := h.client.Status(actx)
		cancel()
		answered = answered || err == nil
		switch {
		case err == nil && st.Ready:
			return nil
		case err == nil && strings.HasPrefix(st.Init, "failed"):
			res, _ := h.client.Run(ctx, agent.Command{Argv: []string{"tail", "-n", "30", "/var/log/xenbed-init.log"}, Timeout: 30 * time.Second})
			return fmt.Errorf("%w: host %d: dom0 init %s; init log:\n%s", ErrBootFailed, h.Index+1, st.Init, res.Stdout)
		case err == nil:
			last = st.Init + ": " + st.Detail
		default:
			last = err.Error()
		}
		log.Trace("dom0 not ready", "status", last)
		// Xen runs with noreboot: after a panic QEMU stays up, silent.
		if marker := consoleFailure(h.Console()); marker != "" {
			return fmt.Errorf("%w: host %d: %q on the console; console ends:\n%s", ErrBootFailed, h.Index+1, marker, tail(h.Console(), 40))
		}
		select {
		case <-h.proc.exited:
			return fmt.Errorf("%w: host %d: QEMU exited (%v); console ends:\n%s", ErrBootFailed, h.Index+1, h.proc.exitErr, tail(h.Console(), 40))
		case <-ctx.Done():
			return fmt.Errorf("%w: host %d: not ready (%v); last status: %s; console ends:\n%s", ErrBootFailed, h.Index+1, ctx.Err(), last, tail(h.Console(), 40))
		case <-tick.C:
		}
	}
}

// fatalMarkers are console lines after which a host will never be ready.
var fatalMarkers = []string{
	"Panic on CPU",               // Xen
	"Kernel panic - not syncing", // dom0 Linux
	"Domain 0 crashed",           // Xen, dom0 died
}

// consoleFailure returns the first fatal marker in the console log, or "".
func consoleFailure(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, m := range fatalMarkers {
		if bytes.Contains(b, []byte(m)) {
			return m
		}
	}
	return ""
}

// tail returns the last n lines of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Close kills every QEMU, stops the network hub and removes the bed's
// temporary directory (not an Options.Dir). It is safe to call more than
// once and after a failed Start.
func (b *Bed) Close() error {
	b.closeOnce.Do(func() {
		var errs []error
		for _, h := range b.Hosts {
			if h.client != nil {
				h.client.Close()
			}
			if h.proc == nil {
				continue
			}
			if err := h.proc.kill(); err != nil {
				errs = append(errs, err)
			}
			select {
			case <-h.proc.exited:
			case <-time.After(30 * time.Second):
				errs = append(errs, fmt.Errorf("xenbed: host %d: QEMU (pid %d) still running 30 s after SIGKILL", h.Index+1, h.proc.pid))
			}
		}
		if b.hub != nil {
			b.hub.close()
			b.log.Debug("hub stopped", "frames", b.hub.frames.Load(), "flooded", b.hub.flooded.Load(), "dropped", b.hub.dropped.Load())
		}
		if b.removeDir {
			if err := os.RemoveAll(b.dir); err != nil {
				errs = append(errs, err)
			}
		}
		if b.lock != nil {
			b.lock.Close() // releases the lock
		}
		b.closeErr = errors.Join(errs...)
	})
	return b.closeErr
}

// Dir is where the consoles and logs are.
func (b *Bed) Dir() string { return b.dir }

// IP is the host's dom0 address on the bed network (xenbr0).
func (h *Host) IP() string { return h.cfg.ip() }

// Console is the path of the host's serial log: Xen's console, which also
// carries dom0's kernel and init output.
func (h *Host) Console() string { return h.cfg.ConsolePath }

// AgentAddr is the host-side address forwarded to the dom0 agent.
func (h *Host) AgentAddr() string { return fmt.Sprintf("127.0.0.1:%d", h.cfg.AgentPort) }

// CommandError reports a command that ran in dom0 and failed.
type CommandError struct {
	Argv   []string
	Result agent.Result
}

func (e *CommandError) Error() string {
	what := fmt.Sprintf("exit status %d", e.Result.ExitCode)
	switch {
	case e.Result.StartError != "":
		what = e.Result.StartError
	case e.Result.TimedOut:
		what = "timed out after " + e.Result.Duration.Round(time.Millisecond).String()
	case e.Result.Signal != "":
		what = "killed by signal: " + e.Result.Signal
	}
	return fmt.Sprintf("xenbed: %s: %s: %s", strings.Join(e.Argv, " "), what, bytes.TrimSpace(e.Result.Stderr))
}

// Exec runs cmd in dom0. The error reports only a failure to reach the
// agent; the Result says how the command ended.
func (h *Host) Exec(ctx context.Context, cmd agent.Command) (agent.Result, error) {
	res, err := h.client.Run(ctx, cmd)
	if err != nil {
		return res, fmt.Errorf("xenbed: host %d: %w", h.Index+1, err)
	}
	return res, nil
}

// Run runs argv in dom0 (with agent.DefaultTimeout, or ctx's deadline if
// sooner) and returns its stdout. A non-zero exit is a *CommandError.
func (h *Host) Run(ctx context.Context, argv ...string) (string, error) {
	cmd := agent.Command{Argv: argv}
	if d, ok := ctx.Deadline(); ok {
		cmd.Timeout = time.Until(d)
	}
	res, err := h.Exec(ctx, cmd)
	if err != nil {
		return "", err
	}
	if res.ExitCode != 0 || res.StartError != "" {
		return string(res.Stdout), &CommandError{Argv: argv, Result: res}
	}
	return string(res.Stdout), nil
}

// Put copies a local file into dom0 (remote is absolute), keeping its mode.
func (h *Host) Put(ctx context.Context, local, remote string) error {
	if err := h.client.Put(ctx, local, remote); err != nil {
		return fmt.Errorf("xenbed: host %d: %w", h.Index+1, err)
	}
	return nil
}

// Get copies a dom0 file to a local path, keeping its mode.
func (h *Host) Get(ctx context.Context, remote, local string) error {
	if err := h.client.Get(ctx, remote, local); err != nil {
		return fmt.Errorf("xenbed: host %d: %w", h.Index+1, err)
	}
	return nil
}
