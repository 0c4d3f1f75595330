package qemuctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
	"github.com/snowflock-go/snowflock/qemuctl/qmp"
)

// testLogger logs to the test when SF_TEST_LOG is set.
func testLogger(t testing.TB) hclog.Logger {
	if os.Getenv("SF_TEST_LOG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: os.Stderr})
}

// ramDir is a fresh directory for RAM files, on tmpfs when there is one.
func ramDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("/dev/shm", "qemuctl-test-")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// testConfig is a small BIOS-only VM (no kernel: SeaBIOS finds nothing to
// boot and idles) under runRoot.
func testConfig(t testing.TB, runRoot, id string) Config {
	return Config{
		ID:     id,
		Binary: qemutest.RequireQEMU(t),
		MemMB:  64,
		RunDir: filepath.Join(runRoot, id),
		RAMDir: ramDir(t),
		Logger: testLogger(t),
	}
}

// startVM starts cfg and destroys the VM at the end of the test.
func startVM(t testing.TB, cfg Config) *VM {
	t.Helper()
	vm, err := Start(qemutest.Context(t, 20*time.Second), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Destroy(context.Background()) })
	return vm
}

// waitFor polls cond until it holds; it fails the test when ctx ends first.
func waitFor(t testing.TB, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// procStat returns the state letter and process group of pid.
func procStat(pid int) (state string, pgid int, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, err
	}
	// pid (comm) state ppid pgrp ...; comm may contain spaces.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	pgid, err = strconv.Atoi(f[2])
	return f[0], pgid, err
}

func TestStartPauseResumeDestroy(t *testing.T) {
	ctx := qemutest.Context(t, 20*time.Second)
	cfg := testConfig(t, t.TempDir(), "vm1")
	vm := startVM(t, cfg)

	if vm.Accel() == "" || vm.PID() <= 0 || vm.QMP() == nil {
		t.Fatalf("VM %+v lacks accel, pid or QMP", vm)
	}
	if accel, _ := ProbeAccel(ctx); vm.Accel() != accel {
		t.Errorf("auto-detected accel %s, ProbeAccel says %s", vm.Accel(), accel)
	}
	if s, err := vm.Status(ctx); err != nil || s != qmp.StatusRunning {
		t.Fatalf("Status = %q, %v; want running", s, err)
	}
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if s, _ := vm.Status(ctx); s != qmp.StatusPaused {
		t.Errorf("after Pause: %q", s)
	}
	if err := vm.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	if s, _ := vm.Status(ctx); s != qmp.StatusRunning {
		t.Errorf("after Resume: %q", s)
	}

	// Own process group.
	if _, pgid, err := procStat(vm.PID()); err != nil || pgid != vm.PID() {
		t.Errorf("QEMU's process group %d (%v), want its own (%d)", pgid, err, vm.PID())
	}
	// The pid file.
	if b, err := os.ReadFile(filepath.Join(cfg.RunDir, PIDFile)); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(vm.PID()) {
		t.Errorf("pid file %q (%v), want %d", b, err, vm.PID())
	}
	// The RAM file: on the RAM dir, full size, shared with QEMU.
	st, err := os.Stat(vm.RAMFile())
	if err != nil || st.Size() != int64(cfg.MemMB)<<20 {
		t.Fatalf("RAM file %s: %v, size %d", vm.RAMFile(), err, st.Size())
	}
	if strings.HasPrefix(cfg.RAMDir, "/dev/shm/") && !onMemoryFS(cfg.RAMDir) {
		t.Errorf("%s is not on tmpfs", cfg.RAMDir)
	}
	maps, _ := os.ReadFile(fmt.Sprintf("/proc/%d/maps", vm.PID()))
	if !bytes.Contains(maps, []byte(vm.RAMFile())) {
		t.Errorf("QEMU does not map %s", vm.RAMFile())
	}
	// The guest channel socket accepts a client.
	if conn, err := net.Dial("unix", vm.GuestSocketPath()); err != nil {
		t.Errorf("guest socket: %v", err)
	} else {
		conn.Close()
	}
	// The console file receives the firmware's output.
	waitFor(t, ctx, "SeaBIOS on the console", func() bool {
		b, _ := os.ReadFile(vm.ConsolePath())
		return bytes.Contains(b, []byte("SeaBIOS"))
	})

	if err := vm.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-vm.Wait():
	default:
		t.Fatal("Wait not closed after Destroy")
	}
	if err := vm.ExitErr(); err != nil {
		t.Errorf("QEMU exited with %v after quit, want status 0", err)
	}
	if _, err := os.Stat(vm.RAMFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RAM file still there after Destroy: %v", err)
	}
	if _, err := os.Stat(vm.ConsolePath()); err != nil {
		t.Errorf("console log removed by Destroy: %v", err)
	}
	if err := vm.Destroy(ctx); err != nil {
		t.Errorf("second Destroy: %v", err)
	}
	if _, err := vm.Status(ctx); !errors.Is(err, qmp.ErrClosed) && !errors.Is(err, ErrExited) {
		t.Errorf("Status after Destroy: %v", err)
	}
}

// QEMU killed behind the VM's back: Wait closes, the VM reports it, and
// Destroy still cleans up.
func TestQEMUDies(t *testing.T) {
	ctx := qemutest.Context(t, 20*time.Second)
	vm := startVM(t, testConfig(t, t.TempDir(), "vm-dies"))
	syscall.Kill(vm.PID(), syscall.SIGKILL)
	select {
	case <-vm.Wait():
	case <-ctx.Done():
		t.Fatal("Wait not closed after QEMU was killed")
	}
	var exitErr *exec.ExitError
	if err := vm.ExitErr(); !errors.As(err, &exitErr) {
		t.Errorf("ExitErr = %v, want an *exec.ExitError", err)
	}
	// The monitor connection notices too.
	select {
	case <-vm.QMP().Done():
	case <-ctx.Done():
		t.Fatal("QMP connection still up")
	}
	if _, err := vm.Status(ctx); !errors.Is(err, ErrExited) {
		t.Errorf("Status = %v, want ErrExited", err)
	}
	if err := vm.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(vm.RAMFile()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RAM file still there: %v", err)
	}
}

// A QEMU that fails to start: the error carries QEMU's complaint and
// nothing is left behind.
func TestStartFailure(t *testing.T) {
	ctx := qemutest.Context(t, 20*time.Second)
	cfg := testConfig(t, t.TempDir(), "bad")
	cfg.Extra = []string{"-no-such-option"}
	_, err := Start(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "no-such-option") {
		t.Fatalf("got %v, want an error quoting QEMU's complaint", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.RAMDir, "bad.ram")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RAM file left behind: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.RunDir, PIDFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file left behind: %v", err)
	}

	// A RAM file already there (a leftover or a duplicate ID) is refused.
	cfg.Extra = nil
	os.WriteFile(filepath.Join(cfg.RAMDir, "bad.ram"), []byte("old guest memory"), 0o600)
	if _, err := Start(ctx, cfg); err == nil || !strings.Contains(err.Error(), "RAM file") {
		t.Fatalf("start over an existing RAM file: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(cfg.RAMDir, "bad.ram")); string(b) != "old guest memory" {
		t.Error("the existing RAM file was touched")
	}
}

// A start that outlives its context is abandoned and cleaned up.
func TestStartContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	cfg := testConfig(t, t.TempDir(), "late")
	if _, err := Start(ctx, cfg); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.RAMDir, "late.ram")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("RAM file left behind: %v", err)
	}
}
