package qemuctl

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// reapWait bounds how long Reap waits for a killed QEMU to die.
const reapWait = 5 * time.Second

// Reap cleans up after a host daemon that died with VMs running: for every
// run directory under runRoot (an entry holding qemu.pid or vm.json) it
// kills the QEMU still running from it, removes its RAM file and removes the
// directory. A pid file is trusted only if the live process's command line
// names that run directory, so a reused pid is never killed. Other entries
// of runRoot are left alone. Call it when the daemon starts, before Start.
// It returns how many run directories it removed.
func Reap(runRoot string, log hclog.Logger) (int, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	root, err := filepath.Abs(runRoot)
	if err != nil {
		return 0, fmt.Errorf("qemuctl: %w", err)
	}
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("qemuctl: reap: %w", err)
	}
	var errs []error
	n := 0
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		if !isRunDir(dir) {
			log.Debug("reap: not a VM run directory; left alone", "dir", dir)
			continue
		}
		if err := reapRunDir(dir, log); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

func isRunDir(dir string) bool {
	for _, name := range []string{PIDFile, StateFile} {
		if _, err := os.Lstat(filepath.Join(dir, name)); err == nil {
			return true
		}
	}
	return false
}

func reapRunDir(dir string, log hclog.Logger) error {
	log = log.With("dir", dir)
	if pid, err := readPID(filepath.Join(dir, PIDFile)); err == nil {
		if err := killIfOurs(pid, dir, log); err != nil {
			return fmt.Errorf("qemuctl: reap %s: %w", dir, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		log.Warn("reap: unreadable pid file", "error", err)
	}

	if b, err := os.ReadFile(filepath.Join(dir, StateFile)); err == nil {
		var st vmState
		if err := json.Unmarshal(b, &st); err != nil {
			log.Warn("reap: unreadable state file", "error", err)
		} else if err := removeRAMFile(st.RAMFile); err != nil {
			return fmt.Errorf("qemuctl: reap %s: %w", dir, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("qemuctl: reap: %w", err)
	}
	log.Info("reaped leftover VM")
	return nil
}

// removeRAMFile removes path if it is a regular file named like a RAM file;
// the state file is ours, but a corrupt one must not make Reap delete
// something else.
func removeRAMFile(path string) error {
	if path == "" || !filepath.IsAbs(path) || !strings.HasSuffix(path, ".ram") {
		return nil
	}
	st, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return nil
	}
	return os.Remove(path)
}

func readPID(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("bad pid file %s: %q", path, b)
	}
	return pid, nil
}

// killIfOurs kills pid and waits for it to die, if it is a live process
// whose command line names dir. A pidfd pins the process between the check
// and the kill, so a pid reused in between is never hit.
func killIfOurs(pid int, dir string, log hclog.Logger) error {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil // long gone
	}
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(pidfd)

	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !cmdlineNames(cmdline, dir) {
		// Gone since, a zombie (empty cmdline) or someone else's process.
		log.Debug("reap: pid is not this directory's QEMU", "pid", pid)
		return nil
	}
	log.Warn("reap: killing leftover QEMU", "pid", pid)
	// Its process group first (it leads one), then QEMU itself by pidfd.
	if pgid, err := unix.Getpgid(pid); err == nil && pgid == pid {
		unix.Kill(-pid, unix.SIGKILL)
	}
	if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill %d: %w", pid, err)
	}
	// The pidfd becomes readable when the process has exited.
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	deadline := time.Now().Add(reapWait)
	for {
		n, err := unix.Poll(fds, max(0, int(time.Until(deadline).Milliseconds())))
		if err == nil && n > 0 {
			return nil
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("waiting for %d to die: %w", pid, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("QEMU %d still alive %v after SIGKILL", pid, reapWait)
		}
	}
}

// cmdlineNames reports whether a NUL-separated command line mentions a file
// inside dir (every QEMU started by Start names its console log there).
func cmdlineNames(cmdline []byte, dir string) bool {
	needle := []byte(filepath.Clean(dir) + "/")
	for _, arg := range bytes.Split(cmdline, []byte{0}) {
		if bytes.Contains(arg, needle) {
			return true
		}
	}
	return false
}
