//go:build linux

package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/internal/cluster"
)

var binDir string

func TestMain(m *testing.M) { cluster.TestMain(m, &binDir) }

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alive reports whether pid runs: a zombie (dead, not yet reaped by whoever
// adopted it) does not count.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z' && syscall.Kill(pid, 0) == nil
}

// hostBed is one coordinator and one sfhostd "h1", both real processes,
// with the host registered.
type hostBed struct {
	c        *cluster.Cluster
	h        *cluster.Host
	cl       *api.Client
	ctx      context.Context
	hostBin  string
	hostArgs []string
}

func (b *hostBed) logs() string {
	out, _ := os.ReadFile(b.h.LogPath)
	return string(out)
}

func newHostBed(t *testing.T) *hostBed {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("qemu-system-x86_64 is required in CI")
		}
		t.Skip("qemu-system-x86_64 not installed")
	}
	c, err := cluster.New(filepath.Join(binDir, "sfcoord"), t.TempDir(), 1, "tok", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Stop)
	if err := c.StartAll(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	if _, err := c.Leader(ctx, 1); err != nil {
		t.Fatal(err)
	}
	b := &hostBed{c: c, ctx: ctx, cl: c.Client(), hostBin: filepath.Join(binDir, "sfhostd"),
		hostArgs: []string{"--sfguest", filepath.Join(binDir, "sfguest")}}
	if b.h, err = c.StartHost(b.hostBin, "h1", b.hostArgs...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.StopHost(b.h) })
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("host log:\n%s", b.logs())
		}
	})
	waitFor(t, 2*time.Minute, "host registered", func() bool {
		if !b.h.Running() {
			t.Fatalf("sfhostd exited:\n%s", b.logs())
		}
		hs, _, err := b.cl.Hosts(ctx, nil)
		return err == nil && len(hs) == 1 && hs[0].Status == fsm.HostAlive
	})
	return b
}

// TestKillHostdLeavesNoQEMU: kill -9 of sfhostd takes its VMs' QEMU with it;
// the cluster fails the VM when gossip declares the host dead; a restarted
// sfhostd reaps the leftover files and serves again.
func TestKillHostdLeavesNoQEMU(t *testing.T) {
	bed := newHostBed(t)
	c, h, cl, ctx := bed.c, bed.h, bed.cl, bed.ctx
	hostBin, hostArgs, logs := bed.hostBin, bed.hostArgs, bed.logs
	vm, err := cl.CreateVM(ctx, api.VMRequest{Name: "long", MemMB: 128, Launch: true, Cmd: "sfguest id; sleep 600"})
	if err != nil {
		t.Fatal(err)
	}
	pidFile := filepath.Join(h.DataDir, "vms", "vm-"+strconv.FormatUint(vm.ID, 10), "qemu.pid")
	var qemuPID int
	waitFor(t, time.Minute, "QEMU running", func() bool {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return false
		}
		qemuPID, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return qemuPID > 0 && alive(qemuPID)
	})
	waitFor(t, time.Minute, "VM running in the cluster", func() bool {
		v, _, err := cl.VM(ctx, vm.ID, nil)
		return err == nil && v.State == fsm.VMRunning
	})

	killed := time.Now()
	c.KillHost(h)
	waitFor(t, 5*time.Second, "QEMU to die with sfhostd", func() bool { return !alive(qemuPID) })
	t.Logf("QEMU gone %s after kill -9 of sfhostd", time.Since(killed).Round(time.Millisecond))
	waitFor(t, 15*time.Second, "the cluster to end the VM", func() bool {
		v, _, err := cl.VM(ctx, vm.ID, nil)
		return err == nil && v.State == fsm.VMEnded
	})
	t.Logf("VM marked ended %s after the kill", time.Since(killed).Round(time.Millisecond))
	if _, err := os.Stat(filepath.Dir(pidFile)); err != nil {
		t.Fatalf("expected the dead daemon's run dir to remain until reaped: %v", err)
	}

	if err := c.RestartHost(hostBin, h, hostArgs...); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "the restarted host to reap and rejoin", func() bool {
		_, err := os.Stat(filepath.Dir(pidFile))
		hs, _, herr := cl.Hosts(ctx, nil)
		return os.IsNotExist(err) && herr == nil && len(hs) == 1 && hs[0].Status == fsm.HostAlive
	})
	if !bytes.Contains([]byte(logs()), []byte("reaped")) {
		t.Logf("host log:\n%s", logs())
	}
}

// TestVMCommands drives sfcoord vm run, list, logs and stop (the real CLI
// binary) against a real host: stop ends the VM and its QEMU.
func TestVMCommands(t *testing.T) {
	bed := newHostBed(t)
	c, h := bed.c, bed.h
	sfcoord := func(args ...string) (string, error) {
		cmd := exec.Command(filepath.Join(binDir, "sfcoord"), append(args, "--addr", c.Agents[0].HTTPAddr, "--token", "tok")...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := sfcoord("vm", "run", "--mem", "128M", "--name", "web", "--cmd", "echo HELLO-FROM-GUEST; sleep 600")
	if err != nil || !strings.Contains(out, "VM 1 scheduled on host h1") {
		t.Fatalf("vm run: %v\n%s", err, out)
	}
	waitFor(t, time.Minute, "the guest's output in vm logs", func() bool {
		out, err := sfcoord("vm", "logs", "1")
		return err == nil && strings.Contains(out, "HELLO-FROM-GUEST")
	})
	out, err = sfcoord("vm", "list")
	if err != nil || !strings.Contains(out, "web") || !strings.Contains(out, "running") {
		t.Fatalf("vm list: %v\n%s", err, out)
	}
	pidBytes, err := os.ReadFile(filepath.Join(h.DataDir, "vms", "vm-1", "qemu.pid"))
	if err != nil {
		t.Fatal(err)
	}
	qemuPID, _ := strconv.Atoi(strings.TrimSpace(string(pidBytes)))
	if out, err := sfcoord("vm", "stop", "1"); err != nil || !strings.Contains(out, "VM 1 stopped") {
		t.Fatalf("vm stop: %v\n%s", err, out)
	}
	waitFor(t, 15*time.Second, "QEMU to stop after vm stop", func() bool { return !alive(qemuPID) })
	out, err = sfcoord("vm", "list", "-json")
	if err != nil || !strings.Contains(out, `"state": "ended"`) || !strings.Contains(out, "stopped by an operator") {
		t.Fatalf("vm list after stop: %v\n%s", err, out)
	}
	if out, err := sfcoord("vm", "run", "--mem", "lots"); err == nil {
		t.Fatalf("vm run --mem lots succeeded:\n%s", out)
	}
	if out, err := sfcoord("vm", "logs", "99"); err == nil {
		t.Fatalf("vm logs of an unknown VM succeeded:\n%s", out)
	}
}
