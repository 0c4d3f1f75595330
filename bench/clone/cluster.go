package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/coordinator"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/hostd"
	"github.com/snowflock-go/snowflock/qemuctl"
)

// Cluster shape: four hosts with enough clone slots that placement, which
// goes by free slots, puts 8 clones 2 per host.
const (
	numHosts     = 4
	slotsPerHost = 8
	hostMemMB    = 16384
)

// hostEvent is a hostd.Event with the host that emitted it.
type hostEvent struct {
	Host string
	hostd.Event
}

// recorder keeps every clone event of a cluster's hosts. The daemons call
// it from their goroutines (hostd.Config.OnEvent), so it only appends under
// a mutex; the bench reads copies.
type recorder struct {
	mu     sync.Mutex
	events []hostEvent
}

func (r *recorder) onEvent(host string) func(hostd.Event) {
	return func(e hostd.Event) {
		r.mu.Lock()
		r.events = append(r.events, hostEvent{Host: host, Event: e})
		r.mu.Unlock()
	}
}

// since returns a copy of the events recorded from index i on.
func (r *recorder) since(i int) []hostEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i > len(r.events) {
		i = len(r.events)
	}
	return append([]hostEvent(nil), r.events[i:]...)
}

func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// cluster is a coordinator and host daemons h1..h4 in this process, each
// host with its own QEMU run directory, memserver and lazyram mount, as
// hostd's TestCloneAcrossHosts runs them.
type cluster struct {
	coord    *coordinator.Server
	api      *api.Client
	hosts    []*hostd.Daemon
	dirs     map[string]string // host name → data dir
	runRoots []string
	ramDirs  []string
	events   *recorder
	accel    string
	log      hclog.Logger
}

// startCluster starts a cluster under root. With eager set, every host
// fetches a descriptor's whole memory before its first clone starts
// (hostd.Config.EagerRestore). The caller must call shutdown, also on error.
func startCluster(ctx context.Context, root string, im *image.Image, mode string, log hclog.Logger) (*cluster, error) {
	eager := mode == "eager"
	var mcastAddr netip.Addr
	var mcastPort uint16
	if mode == "mcast" {
		// Loopback, named explicitly: the hosts of this process share it.
		mcastAddr = netip.MustParseAddr("127.0.0.1")
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		mcastPort = uint16(pc.LocalAddr().(*net.UDPAddr).Port)
		pc.Close()
	}
	c := &cluster{dirs: map[string]string{}, events: &recorder{}, log: log}
	var err error
	c.coord, err = coordinator.New(coordinator.Config{NodeID: "c1", DataDir: filepath.Join(root, "coord"),
		RaftAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", Bootstrap: true,
		Logger: log.Named("coord")})
	if err != nil {
		return c, fmt.Errorf("coordinator: %w", err)
	}
	if c.api, err = api.NewClient(api.Config{Addrs: []string{c.coord.HTTPAddr()}}); err != nil {
		return c, err
	}
	for i := 1; i <= numHosts; i++ {
		name := "h" + strconv.Itoa(i)
		dir := filepath.Join(root, name)
		runRoot := filepath.Join(dir, "vms")
		hv, err := hostd.NewQEMU(ctx, runRoot, "", "", log.Named("qemu"))
		if err != nil {
			return c, err
		}
		c.accel = string(hv.Accel)
		c.runRoots = append(c.runRoots, runRoot)
		c.ramDirs = append(c.ramDirs, hv.RAMDir)
		d, err := hostd.New(hostd.Config{NodeID: name, DataDir: dir, GossipAddr: "127.0.0.1:0", APIAddr: "127.0.0.1:0",
			MemserverAddr: "127.0.0.1:0", Join: []string{c.coord.GossipAddr()}, Coordinators: []string{c.coord.HTTPAddr()},
			Slots: slotsPerHost, MemMB: hostMemMB, Kernel: im.Kernel, Initrd: im.Initrd,
			PageCacheDir: filepath.Join(hv.RAMDir, "pages"), EagerRestore: eager, McastAddr: mcastAddr, McastPort: mcastPort,
			OnEvent: c.events.onEvent(name), Logger: log.Named(name)}, hv)
		if err != nil {
			return c, fmt.Errorf("host %s: %w", name, err)
		}
		c.hosts = append(c.hosts, d)
		c.dirs[name] = dir
	}
	err = waitUntil(ctx, 20*time.Second, "hosts to register", func() bool {
		hs, _, err := c.api.Hosts(ctx, nil)
		if err != nil || len(hs) != numHosts {
			return false
		}
		for _, h := range hs {
			if h.Status != fsm.HostAlive || h.Slots != slotsPerHost {
				return false
			}
		}
		return true
	})
	return c, err
}

// shutdown stops the daemons (which destroy their VMs and unmount
// lazyram) and the coordinator, then reaps whatever QEMU process or RAM
// directory of this cluster is left.
func (c *cluster) shutdown() {
	var wg sync.WaitGroup
	for _, d := range c.hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_ = d.Shutdown(ctx)
		}()
	}
	wg.Wait()
	if c.coord != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_ = c.coord.Shutdown(ctx)
		cancel()
	}
	for _, r := range c.runRoots {
		if n := liveQEMU(r); n > 0 {
			c.log.Warn("QEMU processes outlived their daemon; killing them", "run_root", r, "count", n)
		}
		// Also removes the run directories the daemons keep for consoles.
		if _, err := qemuctl.Reap(r, c.log); err != nil {
			c.log.Warn("reaping", "run_root", r, "error", err)
		}
	}
	for _, r := range c.ramDirs {
		_ = os.RemoveAll(r)
	}
}

// console is the console log of a VM on a host.
func (c *cluster) console(host string, vm uint64) string {
	return filepath.Join(c.dirs[host], "vms", "vm-"+strconv.FormatUint(vm, 10), "console.log")
}

// waitEnded waits for a VM to end in the cluster and returns its record.
func (c *cluster) waitEnded(ctx context.Context, id uint64, limit time.Duration, tick func()) (fsm.VM, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var index uint64
	for {
		vm, meta, err := c.api.VM(ctx, id, &api.QueryOptions{Index: index, Wait: time.Second})
		if err != nil {
			if ctx.Err() != nil {
				return vm, fmt.Errorf("vm %d did not end within %v: %w", id, limit, context.Cause(ctx))
			}
			return vm, err
		}
		index = meta.Index
		if vm.State == fsm.VMEnded {
			return vm, nil
		}
		if tick != nil {
			tick()
		}
	}
}

// waitUntil polls cond every 20 ms until it holds or limit passes.
func waitUntil(ctx context.Context, limit time.Duration, what string, cond func() bool) error {
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s", limit, what)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// liveQEMU counts the processes whose command line names a path under
// runRoot: QEMU processes of this cluster still running.
func liveQEMU(runRoot string) int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	n := 0
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(runRoot+"/")) {
			n++
		}
	}
	return n
}
