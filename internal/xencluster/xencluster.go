// Package xencluster runs a SnowFlock cluster inside a Xen test bed
// (internal/xenbed): one sfcoord in the first host's dom0 and an sfhostd
// with the Xen driver in every dom0, all on the bed's network. Tests and
// benchmarks drive it with the sfcoord CLI inside dom0. Every sfhostd
// serves its runtime profiles on dom0's 127.0.0.1:6060 (--pprof-addr):
// from the bed's agent, `wget -O /tmp/cpu.prof
// 'http://127.0.0.1:6060/debug/pprof/profile?seconds=30'`, then Host.Get.
package xencluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/internal/xenbed"
)

// Where the cluster's files go in dom0.
const (
	dir       = "/opt/sf/"
	coordLog  = "/var/log/sfcoord.log"
	hostdLog  = "/var/log/sfhostd.log"
	guestLogs = "/var/log/xen/console/"
)

// Files are the files a bed needs for the cluster: the static sfcoord,
// sfhostd and sfguest from binDir and the guest image, for
// xenbed.Options.Files.
func Files(binDir string, im *image.Image) map[string]string {
	return map[string]string{
		dir + "sfcoord": filepath.Join(binDir, "sfcoord"),
		dir + "sfhostd": filepath.Join(binDir, "sfhostd"),
		dir + "sfguest": filepath.Join(binDir, "sfguest"),
		dir + "vmlinux": im.Kernel,
		dir + "initrd":  im.Initrd,
	}
}

// Cluster is the daemons in a bed.
type Cluster struct {
	Bed   *xenbed.Bed
	Coord string // the coordinator's API address
}

// Options shape the cluster.
type Options struct {
	// Slots are the clone slots of each host (default 2 each).
	Slots []int
	// Debug logs the host daemons at debug level.
	Debug bool
	// GuestType is the hosts' --xen-guest-type: "pvh" (default) or "pv".
	GuestType string
	// McastMTU is the hosts' --mcast-mtu: the bed's MTU (0: 1500).
	McastMTU int
}

// gossipProfile is the daemons' failure detector. Three emulated dom0s share
// the machine's cores, and a dom0 busy sending a snapshot can leave its
// gossip port unanswered for seconds: with the LAN profile (500 ms probes)
// the parent's host was once declared failed in the middle of a clone, which
// killed the ticket. The WAN profile waits longer; no test here kills a host.
const gossipProfile = "wan"

// Start launches the daemons (the bed's dom0s must carry Files) and waits
// until every host is registered.
func Start(ctx context.Context, bed *xenbed.Bed, opts Options) (*Cluster, error) {
	h1 := bed.Hosts[0]
	c := &Cluster{Bed: bed, Coord: h1.IP() + ":7400"}
	if err := background(ctx, h1, coordLog, dir+"sfcoord", "agent", "--node-id", "c1", "--data-dir", "/var/lib/sfcoord",
		"--raft-addr", h1.IP()+":7300", "--http-addr", c.Coord, "--gossip-addr", h1.IP()+":7946",
		"--bootstrap-expect", "1", "--gossip-profile", gossipProfile); err != nil {
		return nil, err
	}
	typ := "pvh"
	if opts.GuestType != "" {
		typ = opts.GuestType
	}
	mtu := 1500
	if opts.McastMTU != 0 {
		mtu = opts.McastMTU
	}
	level := "info"
	if opts.Debug {
		level = "debug"
	}
	for i, h := range bed.Hosts {
		slots := 2
		if i < len(opts.Slots) {
			slots = opts.Slots[i]
		}
		if err := background(ctx, h, hostdLog, dir+"sfhostd", "agent", "--hypervisor", "xen", "--xen-guest-type", typ, "--mcast-mtu", fmt.Sprint(mtu),
			"--node-id", HostName(i), "--data-dir", "/var/lib/sfhostd",
			"--api-addr", h.IP()+":7500", "--pprof-addr", "127.0.0.1:6060", "--gossip-addr", h.IP()+":7947", "--memserver-addr", h.IP()+":7501",
			"--mcast-addr", h.IP(), "--join", h1.IP()+":7946", "--coordinator", c.Coord,
			"--kernel", dir+"vmlinux", "--initrd", dir+"initrd", "--slots", fmt.Sprint(slots), "--mem", "512",
			"--gossip-profile", gossipProfile, "--log-level", level); err != nil {
			return nil, err
		}
	}
	err := c.WaitFor(ctx, 2*time.Minute, "every host registered", func() (bool, error) {
		var hs []fsm.Host
		err := c.SfcoordJSON(ctx, &hs, "hosts")
		return err == nil && len(hs) == len(bed.Hosts), nil
	})
	return c, err
}

// HostName is the node ID of host i (from 0): x1, x2, ...
func HostName(i int) string { return fmt.Sprintf("x%d", i+1) }

// background starts a daemon in dom0, in its own session, logging to log.
func background(ctx context.Context, h *xenbed.Host, log string, argv ...string) error {
	cmd := fmt.Sprintf("setsid %s </dev/null >%s 2>&1 &", strings.Join(argv, " "), log)
	if _, err := h.Run(ctx, "sh", "-c", cmd); err != nil {
		return fmt.Errorf("host %s: %s: %w", h.IP(), cmd, err)
	}
	return nil
}

// Sfcoord runs the sfcoord CLI against the cluster in the first dom0.
func (c *Cluster) Sfcoord(ctx context.Context, args ...string) (string, error) {
	return c.Bed.Hosts[0].Run(ctx, append([]string{dir + "sfcoord"}, append(args, "--addr", c.Coord)...)...)
}

// SfcoordJSON runs a CLI command with -json and decodes its output.
func (c *Cluster) SfcoordJSON(ctx context.Context, v any, args ...string) error {
	out, err := c.Sfcoord(ctx, append(args, "-json")...)
	if err != nil {
		return fmt.Errorf("sfcoord %v: %w %s", args, err, out)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("sfcoord %v said %q: %w", args, out, err)
	}
	return nil
}

// RunVM launches a parent VM with a workload on host i.
func (c *Cluster) RunVM(ctx context.Context, host int, memMB int, cmd string) (fsm.VM, error) {
	var vm fsm.VM
	err := c.SfcoordJSON(ctx, &vm, "vm", "run", "--host", HostName(host), "--mem", fmt.Sprintf("%dM", memMB), "--cmd", cmd)
	return vm, err
}

// VM returns a VM's record.
func (c *Cluster) VM(ctx context.Context, id uint64) (fsm.VM, error) {
	var vs []fsm.VM
	if err := c.SfcoordJSON(ctx, &vs, "vm", "list"); err != nil {
		return fsm.VM{}, err
	}
	for _, v := range vs {
		if v.ID == id {
			return v, nil
		}
	}
	return fsm.VM{}, fmt.Errorf("no VM %d", id)
}

// WaitEnded waits until VM id has ended.
func (c *Cluster) WaitEnded(ctx context.Context, id uint64, limit time.Duration) (fsm.VM, error) {
	var vm fsm.VM
	err := c.WaitFor(ctx, limit, fmt.Sprintf("VM %d ended", id), func() (bool, error) {
		v, err := c.VM(ctx, id)
		vm = v
		return err == nil && v.State == fsm.VMEnded, nil
	})
	return vm, err
}

// Tickets returns every ticket with its clones.
func (c *Cluster) Tickets(ctx context.Context) ([]fsm.TicketView, error) {
	var ts []fsm.Ticket
	if err := c.SfcoordJSON(ctx, &ts, "tickets"); err != nil {
		return nil, err
	}
	out := make([]fsm.TicketView, 0, len(ts))
	for _, t := range ts {
		var tv fsm.TicketView
		if err := c.SfcoordJSON(ctx, &tv, "ticket", "show", fmt.Sprint(t.ID)); err != nil {
			return nil, err
		}
		out = append(out, tv)
	}
	return out, nil
}

// Console returns a guest's console log from the dom0 of host i.
func (c *Cluster) Console(ctx context.Context, host int, vm uint64) string {
	out, _ := c.Bed.Hosts[host].Run(ctx, "cat", fmt.Sprintf("%sguest-vm-%d.log", guestLogs, vm))
	return out
}

// Logs returns the tails of every daemon's log and guest console, for a
// failure report.
func (c *Cluster) Logs(ctx context.Context) string { return Logs(ctx, c.Bed) }

// Logs is Cluster.Logs for a bed whose cluster did not start.
func Logs(ctx context.Context, bed *xenbed.Bed) string {
	var b strings.Builder
	for i, h := range bed.Hosts {
		for _, f := range []string{coordLog, hostdLog} {
			out, _ := h.Run(ctx, "tail", "-c", "6000", f)
			fmt.Fprintf(&b, "== host %d %s\n%s\n", i+1, f, out)
		}
		out, _ := h.Run(ctx, "sh", "-c", "for f in "+guestLogs+"guest-*.log; do echo == $f; tail -c 3000 $f; done")
		fmt.Fprintf(&b, "== host %d guest consoles\n%s\n", i+1, out)
	}
	return b.String()
}

// HostLog returns host i's sfhostd log.
func (c *Cluster) HostLog(ctx context.Context, host int) (string, error) {
	return c.Bed.Hosts[host].Run(ctx, "cat", hostdLog)
}

// WaitFor polls cond every half second until it holds, fails, or limit
// passes.
func (c *Cluster) WaitFor(ctx context.Context, limit time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s", limit, what)
		}
		select {
		case <-ctx.Done():
			return errors.Join(context.Cause(ctx), fmt.Errorf("waiting for %s", what))
		case <-time.After(500 * time.Millisecond):
		}
	}
}
