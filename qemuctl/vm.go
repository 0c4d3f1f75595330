package qemuctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/qemuctl/qmp"
)

// quitGrace is how long Destroy lets QEMU exit after quit before SIGKILL.
const quitGrace = 2 * time.Second

// ErrExited is returned by VM methods that need a running QEMU after it has
// exited.
var ErrExited = errors.New("qemuctl: QEMU has exited")

// VM is one running QEMU. Its methods are safe for concurrent use.
type VM struct {
	cfg   Config
	accel Accel
	args  []string
	proc  *os.Process
	pid   int
	qmp   *qmp.Client
	log   hclog.Logger

	ram     string // the file backing guest RAM
	ownsRAM bool   // Destroy removes ram: false for a clone's frozen file

	snapMu sync.Mutex // serialises Snapshot

	exited  chan struct{} // closed when QEMU has exited and been waited for
	exitErr error         // cmd.Wait's result; read after exited is closed

	destroyOnce sync.Once
	destroyErr  error
}

// vmState is what Reap reads back from RunDir/vm.json.
type vmState struct {
	ID      string   `json:"id"`
	RAMFile string   `json:"ram_file"`
	Binary  string   `json:"binary"`
	Args    []string `json:"args"`
	Started string   `json:"started"`
}

// Start launches QEMU for cfg and returns once its QMP monitor is connected.
// The guest runs from the start (there is no -S). ctx bounds the start only,
// not the VM's life: stop the VM with Destroy, which must be called even
// after QEMU exited on its own, to remove its RAM file.
func Start(ctx context.Context, cfg Config) (*VM, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("qemuctl: start: %w", context.Cause(ctx))
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger.With("vm", cfg.ID)
	accel, cpu := cfg.accelAndCPU(log)
	args := cfg.args(accel, cpu, cfg.bootMemory())

	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("qemuctl: %w", err)
	}
	if err := os.MkdirAll(cfg.RAMDir, 0o700); err != nil {
		return nil, fmt.Errorf("qemuctl: %w", err)
	}
	if !onMemoryFS(cfg.RAMDir) {
		log.Warn("RAM directory is not on tmpfs or hugetlbfs: guest RAM will be written to disk", "dir", cfg.RAMDir)
	}
	// Claim the RAM file: an existing one belongs to another VM or to a
	// leftover that Reap has not removed, and QEMU would boot on its
	// contents. QEMU sizes the empty file itself.
	ram, err := os.OpenFile(cfg.RAMFile(), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("qemuctl: claiming RAM file: %w", err)
	}
	ram.Close()

	vm, err := start(ctx, cfg, log, accel, args, cfg.bootMemory(), nil)
	if err != nil {
		os.Remove(cfg.RAMFile())
		return nil, err
	}
	log.Info("started", "pid", vm.pid, "accel", accel, "cpu", cpu, "mem_mb", cfg.MemMB, "vcpus", cfg.VCPUs)
	return vm, nil
}

// accelAndCPU decides the accelerator and CPU model cfg leaves open.
func (cfg Config) accelAndCPU(log hclog.Logger) (Accel, string) {
	probe := hostProbe()
	accel := cfg.Accel
	if accel == "" {
		var why string
		accel, why = probe.probe()
		log.Debug("chose accelerator", "accel", accel, "reason", why)
	}
	cpu := cfg.CPU
	if cpu == "" {
		cpu = probe.cpuModel(accel)
	}
	return accel, cpu
}

// start runs QEMU with args and connects to its monitor. mem is the guest
// RAM args name: a private one is not the VM's to remove. extra files are
// QEMU's descriptors 4, 5, ...
func start(ctx context.Context, cfg Config, log hclog.Logger, accel Accel, args []string, mem memory, extra []*os.File) (*VM, error) {
	run := func(name string) string { return filepath.Join(cfg.RunDir, name) }
	owned := ""
	if !mem.private {
		owned = mem.path
	}
	for _, name := range []string{QMPSocket, GuestSocket, PIDFile} {
		if err := os.Remove(run(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("qemuctl: %w", err)
		}
	}
	state, err := json.MarshalIndent(vmState{
		ID: cfg.ID, RAMFile: owned, Binary: cfg.Binary, Args: args,
		Started: time.Now().UTC().Format(time.RFC3339Nano),
	}, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(run(StateFile), append(state, '\n')); err != nil {
		return nil, fmt.Errorf("qemuctl: %w", err)
	}

	qmpListener, err := listenUnix(run(QMPSocket))
	if err != nil {
		return nil, fmt.Errorf("qemuctl: QMP socket: %w", err)
	}
	defer qmpListener.Close() // QEMU has its own copy
	logFile, err := os.OpenFile(run(QEMULog), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("qemuctl: %w", err)
	}
	defer logFile.Close()

	argv := append([]string{cfg.Binary}, args...)
	if mem.private && noTHPSupported {
		// A clone on a lazily filled file: see nothp_linux_amd64.go.
		bin, err := exec.LookPath(cfg.Binary)
		if err != nil {
			return nil, fmt.Errorf("qemuctl: %w", err)
		}
		if argv, err = noTHPCommand(bin, args); err != nil {
			return nil, fmt.Errorf("qemuctl: %w", err)
		}
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = cfg.RunDir
	cmd.Stdout = logFile // *os.File: no copying goroutines
	cmd.Stderr = logFile
	cmd.ExtraFiles = append([]*os.File{qmpListener}, extra...) // fd 3, 4, ...
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}

	vm := &VM{cfg: cfg, accel: accel, args: args, log: log, exited: make(chan struct{}),
		ram: mem.path, ownsRAM: !mem.private}
	if err := vm.launch(cmd); err != nil {
		return nil, fmt.Errorf("qemuctl: starting %s: %w", cfg.Binary, err)
	}
	vm.proc, vm.pid = cmd.Process, cmd.Process.Pid
	if err := writeFileAtomic(run(PIDFile), []byte(strconv.Itoa(vm.pid)+"\n")); err != nil {
		vm.kill()
		<-vm.exited
		return nil, fmt.Errorf("qemuctl: %w", err)
	}

	// The monitor socket was listening before QEMU started: the connection
	// waits in its backlog until QEMU is ready. If QEMU dies first, the
	// connection is reset and Dial fails.
	dialCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-vm.exited:
			cancel()
		case <-dialCtx.Done():
		}
	}()
	vm.qmp, err = qmp.Dial(dialCtx, run(QMPSocket))
	if err != nil {
		select {
		case <-vm.exited:
			err = fmt.Errorf("qemuctl: QEMU exited during start-up (%v)%s", vm.exitErr, logTail(run(QEMULog)))
		default:
			vm.kill()
			<-vm.exited
			err = fmt.Errorf("qemuctl: QEMU did not come up: %w%s", err, logTail(run(QEMULog)))
		}
		os.Remove(run(PIDFile))
		return nil, err
	}
	return vm, nil
}

// launch starts cmd from a goroutine locked to its OS thread, which stays
// alive until QEMU exits: the parent-death signal is sent when the thread
// that forked the child exits, and Go may otherwise retire that thread
// (it does when a goroutine locked to it ends).
func (vm *VM) launch(cmd *exec.Cmd) error {
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread ends with this goroutine, after QEMU.
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		vm.exitErr = cmd.Wait()
		close(vm.exited)
	}()
	return <-started
}

// kill sends SIGKILL to QEMU and its process group (helpers such as the
// shell of an exec: migration). The process itself is signalled through its
// pidfd, which cannot hit a reused pid; the group only while QEMU was still
// there to be signalled.
func (vm *VM) kill() {
	if err := vm.proc.Signal(syscall.SIGKILL); err != nil {
		return // already exited (os.ErrProcessDone)
	}
	if err := syscall.Kill(-vm.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		vm.log.Warn("killing the process group failed", "pgid", vm.pid, "error", err)
	}
}

// Pause stops the guest's vCPUs. After QEMU exited it returns ErrExited.
func (vm *VM) Pause(ctx context.Context) error {
	return vm.exitedErr(ctx, vm.qmp.Stop(ctx))
}

// Resume restarts the guest's vCPUs. After QEMU exited it returns ErrExited.
func (vm *VM) Resume(ctx context.Context) error {
	return vm.exitedErr(ctx, vm.qmp.Cont(ctx))
}

// Status returns QEMU's run state (qmp.StatusRunning, qmp.StatusPaused, ...).
// After QEMU exited it returns ErrExited.
func (vm *VM) Status(ctx context.Context) (string, error) {
	s, err := vm.qmp.QueryStatus(ctx)
	return s, vm.exitedErr(ctx, err)
}

// exitedErr turns the loss of the monitor connection into ErrExited when it
// is QEMU's exit that caused it. The connection usually notices the exit
// before the process is reaped, so it waits a moment for that.
func (vm *VM) exitedErr(ctx context.Context, err error) error {
	if !errors.Is(err, qmp.ErrDisconnected) {
		return err
	}
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-vm.exited:
		return fmt.Errorf("%w (%v)", ErrExited, vm.exitErr)
	case <-ctx.Done():
	case <-t.C:
	}
	return err
}

// Destroy stops QEMU and removes the RAM file: it asks QEMU to quit over
// QMP, kills its process group if it has not exited within a short grace
// period or by the end of ctx, and waits for it. The run directory stays
// (its logs explain what happened); Reap or the caller removes it. Destroy
// is idempotent and returns the first call's result.
func (vm *VM) Destroy(ctx context.Context) error {
	vm.destroyOnce.Do(func() { vm.destroyErr = vm.destroy(ctx) })
	return vm.destroyErr
}

func (vm *VM) destroy(ctx context.Context) error {
	select {
	case <-vm.exited:
	default:
		grace, cancel := context.WithTimeout(ctx, quitGrace)
		if err := vm.qmp.Quit(grace); err != nil {
			vm.log.Debug("quit failed; killing", "error", err)
		} else {
			select {
			case <-vm.exited:
			case <-grace.Done():
				vm.log.Warn("QEMU did not exit after quit; killing", "grace", quitGrace)
			}
		}
		cancel()
		vm.kill()
		<-vm.exited // SIGKILL cannot be ignored
	}
	vm.qmp.Close()
	var errs []error
	remove := []string{vm.path(PIDFile), vm.path(QMPSocket), vm.path(GuestSocket)}
	if vm.ownsRAM {
		remove = append(remove, vm.ram)
	}
	for _, p := range remove {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	vm.log.Info("destroyed", "exit", vm.exitErr)
	return errors.Join(errs...)
}

// Wait returns a channel closed when QEMU has exited.
func (vm *VM) Wait() <-chan struct{} { return vm.exited }

// ExitErr returns how QEMU exited (nil for status 0; an *exec.ExitError
// otherwise) once Wait is closed, and nil before.
func (vm *VM) ExitErr() error {
	select {
	case <-vm.exited:
		return vm.exitErr
	default:
		return nil
	}
}

// PID is QEMU's process ID, also its process group ID.
func (vm *VM) PID() int { return vm.pid }

// ID is the VM's ID.
func (vm *VM) ID() string { return vm.cfg.ID }

// Accel is the accelerator the VM runs with.
func (vm *VM) Accel() Accel { return vm.accel }

// Args is QEMU's command line, without the binary.
func (vm *VM) Args() []string { return append([]string(nil), vm.args...) }

// RunDir is the VM's run directory.
func (vm *VM) RunDir() string { return vm.cfg.RunDir }

// RAMFile is the path of the file backing guest RAM: the VM's own shared
// file, or for a clone the frozen file it maps privately (which Destroy
// leaves in place).
func (vm *VM) RAMFile() string { return vm.ram }

// GuestSocketPath is the unix socket connected to the guest's ttyS1. QEMU
// accepts one client at a time, and another after it disconnects.
func (vm *VM) GuestSocketPath() string { return vm.path(GuestSocket) }

// ConsolePath is the file receiving the guest's ttyS0.
func (vm *VM) ConsolePath() string { return vm.path(ConsoleLog) }

// QMP is the VM's monitor connection, for commands without a VM method
// (migration). It is closed by Destroy.
func (vm *VM) QMP() *qmp.Client { return vm.qmp }

func (vm *VM) path(name string) string { return filepath.Join(vm.cfg.RunDir, name) }

// onMemoryFS reports whether dir is on tmpfs or hugetlbfs.
func onMemoryFS(dir string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return false
	}
	return st.Type == unix.TMPFS_MAGIC || st.Type == unix.HUGETLBFS_MAGIC
}

// listenUnix binds a listening unix socket at path and returns it as a file
// to hand to QEMU.
func listenUnix(path string) (*os.File, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false) // the socket outlives this copy of it
	f, err := l.File()
	l.Close()
	return f, err
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// logTail returns the end of QEMU's log, to explain a failed start.
func logTail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	const max = 2048
	if st, err := f.Stat(); err == nil && st.Size() > max {
		f.Seek(st.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, max))
	if len(b) == 0 {
		return ""
	}
	return "; " + QEMULog + ": " + string(b)
}
