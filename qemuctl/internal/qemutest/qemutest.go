// Package qemutest holds helpers for tests that run a real QEMU.
package qemutest

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Binary is the QEMU system emulator the tests run.
const Binary = "qemu-system-x86_64"

// RequireQEMU returns the path of Binary. Without it the test is skipped,
// unless the CI environment variable is set: in CI a missing QEMU is an
// installation error, so the test fails.
func RequireQEMU(t testing.TB) string {
	t.Helper()
	path, err := exec.LookPath(Binary)
	if err == nil {
		return path
	}
	msg := Binary + " not found on PATH (Debian: apt-get install qemu-system-x86)"
	if os.Getenv("CI") != "" {
		t.Fatalf("%s; CI is set, so this is a failure", msg)
	}
	t.Skip(msg)
	return ""
}

// Process is a QEMU started by Monitor.
type Process struct {
	Socket string    // the QMP socket
	Cmd    *exec.Cmd // started; waited for by Monitor
	Exited <-chan struct{}
}

// Monitor starts QEMU with no machine (-machine none) and a QMP monitor
// listening on a socket in a temporary directory. The socket is bound before
// QEMU starts, so it can be dialled as soon as Monitor returns; QEMU accepts
// the connection when it is ready. QEMU is killed at the end of the test.
func Monitor(t testing.TB, extra ...string) *Process {
	t.Helper()
	bin := RequireQEMU(t)
	socket := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	args := append([]string{
		"-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	return &Process{Socket: socket, Cmd: cmd, Exited: exited}
}

// Context returns a context that ends a little before the test's deadline,
// or after d if sooner.
func Context(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	if dl, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if end, ok := dl.Deadline(); ok && time.Until(end)-time.Second < d {
			d = time.Until(end) - time.Second
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
