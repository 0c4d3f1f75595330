package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/guest"
	"github.com/snowflock-go/snowflock/xenctl/xenchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// Files sfguest reads as init.
const (
	modulesList  = "/etc/sfguest/modules"
	workloadFile = "/etc/sfguest/workload"
)

// readyTimeout bounds the wait for the host to acknowledge ready.
const readyTimeout = 2 * time.Second

// ReadyMarker starts the console line that says the guest is up; hosts and
// tests wait for it.
const ReadyMarker = "sfguest: ready"

func logf(format string, a ...interface{}) {
	fmt.Fprintf(os.Stdout, "sfguest: "+format+"\n", a...)
}

// runInit is PID 1: it prepares the system, serves the host channel, runs
// the workload and powers off. It never returns.
func runInit() {
	start := time.Now()
	status := 0
	if err := initSystem(); err != nil {
		logf("init: %v", err)
		status = 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := serveChannel(ctx); err != nil {
		logf("host channel unavailable: %v", err)
	}
	fmt.Printf("%s in %d ms (kernel uptime %s s)\n", ReadyMarker, time.Since(start).Milliseconds(), uptime())
	if status == 0 {
		status = runWorkload()
	}
	logf("workload exited with status %d; powering off", status)
	cancel()
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {} // the kernel stops us
}

func initSystem() error {
	mounts := []struct{ src, dst, fstype string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/tmp", "tmpfs"}, {"tmpfs", "/run", "tmpfs"},
	}
	for _, m := range mounts {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	os.Setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
	os.Setenv("HOME", "/root")
	// Workloads call the CLI by name; the binary is this init.
	if _, err := os.Lstat("/bin/sfguest"); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll("/bin", 0o755); err == nil {
			_ = os.Symlink("/init", "/bin/sfguest")
		}
	}
	return loadModules()
}

// loadModules inserts the modules listed (in dependency order) in
// modulesList; a module already present is fine.
func loadModules() error {
	f, err := os.Open(modulesList)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		path := strings.TrimSpace(sc.Text())
		if path == "" || strings.HasPrefix(path, "#") {
			continue
		}
		if err := insmod(path); err != nil {
			logf("module %s: %v", path, err)
		}
	}
	return sc.Err()
}

func insmod(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}

// xenbusDevice exists only in a Xen guest: there the channel is xenstore.
const xenbusDevice = "/dev/xen/xenbus"

// openChannel opens the host channel: xenstore on Xen, else the second
// serial port (QEMU).
func openChannel(ctx context.Context) (io.ReadWriteCloser, error) {
	if _, err := os.Stat(xenbusDevice); err != nil {
		return guest.OpenChannel(guest.DefaultDevice)
	}
	xs, err := xenstore.OpenDevice(xenbusDevice)
	if err != nil {
		return nil, err
	}
	ch, err := xenchan.OpenGuest(ctx, xs)
	if err != nil {
		xs.Close()
		return nil, err
	}
	logf("host channel: xenstore")
	return ch, nil
}

// serveChannel takes the host channel and serves it on the local socket.
func serveChannel(ctx context.Context) error {
	dev, err := openChannel(ctx)
	if err != nil {
		return err
	}
	mux := guest.NewMux(dev)
	ln, err := net.Listen("unix", guest.DefaultSocket)
	if err != nil {
		mux.Close()
		return err
	}
	go func() { // owned by init for the life of the VM
		_ = guest.Serve(ctx, ln, mux)
		mux.Close()
	}()
	// Tell the host we are up before the workload runs, so that "ready"
	// means the channel works; bounded, so an absent host (QEMU drops what
	// the guest writes while nobody listens) cannot hold the boot long.
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	if err := guest.NewClient(mux).Ready(rctx); err != nil {
		logf("ready call unanswered: %v", err)
	}
	return nil
}

// workload returns the shell command to run: sf.cmd= on the kernel command
// line (base64url, so that it may hold spaces and quotes), else the
// workload file, else an interactive-less default.
func workload() (string, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return "", err
	}
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, "sf.cmd="); ok {
			cmd, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(v, "="))
			if err != nil {
				return "", fmt.Errorf("sf.cmd is not base64url: %w", err)
			}
			return string(cmd), nil
		}
	}
	if _, err := os.Stat(workloadFile); err == nil {
		return workloadFile, nil
	}
	return "", nil
}

// runWorkload runs the workload under /bin/sh as a child and reaps every
// process that ends while it runs (PID 1 adopts orphans). It returns the
// workload's exit status.
func runWorkload() int {
	cmd, err := workload()
	if err != nil {
		logf("workload: %v", err)
		return 1
	}
	if cmd == "" {
		logf("no workload (sf.cmd= or %s)", workloadFile)
		return 0
	}
	logf("running workload: %s", cmd)
	env := append(os.Environ(), "SF_GUEST_SOCKET="+guest.DefaultSocket)
	pid, err := syscall.ForkExec("/bin/sh", []string{"sh", "-c", cmd}, &syscall.ProcAttr{
		Dir: "/", Env: env, Files: []uintptr{0, 1, 2},
		Sys: &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		logf("start workload: %v", err)
		return 1
	}
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			logf("wait: %v", err)
			return 1
		}
		if got == pid {
			if ws.Signaled() {
				return 128 + int(ws.Signal())
			}
			return ws.ExitStatus()
		}
	}
}

func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "?"
	}
	if f := strings.Fields(string(b)); len(f) > 0 {
		return f[0]
	}
	return "?"
}
