// Command sfdemo runs the snowflock-go demo on a local cluster of real
// processes on 127.0.0.1: it builds the guest image, starts three sfcoord
// agents and two sfhostd hosts, and boots a parent VM under QEMU that loads
// a 128 MiB dataset into its memory, clones itself 4 times over both hosts,
// lets each clone checksum its quarter of the data (memory on demand from
// the parent's frozen snapshot) and joins them; it checks the combined
// result against the same computation done without cloning and prints a
// timing table. It then kills the raft leader to show the failover, and
// removes everything it started. It expects sfcoord, sfhostd and a static
// sfguest next to itself (make demo builds them into bin/).
package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
	"github.com/snowflock-go/snowflock/internal/cluster"
)

func main() {
	os.Exit(Run(os.Args[1:], os.Stdout))
}

// Run executes the demo and returns the exit status.
func Run(args []string, out io.Writer) int {
	if len(args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: sfdemo [BINDIR]")
		return 2
	}
	binDir := ""
	if len(args) == 1 {
		binDir = args[0]
	} else if exe, err := os.Executable(); err == nil {
		binDir = filepath.Dir(exe)
	}
	d := &demo{out: out, bin: binDir}
	err := d.run()
	d.cleanup()
	if err != nil {
		fmt.Fprintf(out, "\nDEMO FAILED: %v\n", err)
		if d.dir != "" {
			fmt.Fprintf(out, "(logs were in %s)\n", d.dir)
		}
		return 1
	}
	fmt.Fprintln(out, "\nDemo finished; every process it started has been stopped and its files removed.")
	return 0
}

type demo struct {
	out   io.Writer
	bin   string
	dir   string
	c     *cluster.Cluster
	hosts []*cluster.Host
}

func (d *demo) say(format string, a ...interface{}) { fmt.Fprintf(d.out, format+"\n", a...) }

func (d *demo) cleanup() {
	if d.c != nil {
		for _, h := range d.hosts {
			d.c.StopHost(h)
		}
		d.c.Stop()
	}
	if d.dir != "" {
		os.RemoveAll(d.dir)
	}
}

func (d *demo) path(name string) (string, error) {
	p := filepath.Join(d.bin, name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found next to sfdemo (run 'make demo', which builds bin/)", name)
	}
	return p, nil
}

func waitFor(ctx context.Context, what string, cond func() bool) (time.Duration, error) {
	start := time.Now()
	for !cond() {
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("timed out waiting for %s", what)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return time.Since(start), nil
}

func (d *demo) run() error {
	sfcoord, err := d.path("sfcoord")
	if err != nil {
		return err
	}
	sfhostd, err := d.path("sfhostd")
	if err != nil {
		return err
	}
	sfguest, err := d.path("sfguest")
	if err != nil {
		return err
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return fmt.Errorf("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
	}
	if d.dir, err = os.MkdirTemp("", "sfdemo-"); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	d.say("== snowflock-go demo: 3 coordinators, 2 hosts, a VM that forks itself into 4 clones over both hosts")
	d.say("Building the guest image (Debian's kernel + an initramfs with sfguest as /init);")
	d.say("the first run downloads Debian's kernel package (~70 MB) with apt-get, later runs use the cache ...")
	start := time.Now()
	build := exec.CommandContext(ctx, sfhostd, "image", "build", "--sfguest", sfguest, "--log-level", "warn")
	var buildOut bytes.Buffer
	build.Stdout, build.Stderr = &buildOut, &buildOut
	if err := build.Run(); err != nil {
		return fmt.Errorf("image build: %v\n%s", err, buildOut.String())
	}
	for _, l := range strings.Split(strings.TrimSpace(buildOut.String()), "\n") {
		d.say("  %s", l)
	}
	d.say("  image ready in %.1f s", time.Since(start).Seconds())

	key, err := gossip.GenerateKey() // gossip encrypted and API token required, as in production
	if err != nil {
		return err
	}
	token := api.NewRequestID()
	if d.c, err = cluster.New(sfcoord, d.dir, 3, token, key); err != nil {
		return err
	}
	d.say("\nStarting 3 coordinators (sfcoord agent --bootstrap-expect 3) ...")
	start = time.Now()
	if err := d.c.StartAll(); err != nil {
		return err
	}
	lctx, lcancel := context.WithTimeout(ctx, 30*time.Second)
	leader, err := d.c.Leader(lctx, 3)
	lcancel()
	if err != nil {
		return err
	}
	d.say("  leader %s elected %d ms after start", d.c.Agents[leader].ID, time.Since(start).Milliseconds())

	d.say("Starting 2 hosts (sfhostd agent) ...")
	start = time.Now()
	// Both hosts multicast on loopback (named explicitly), on a port of
	// their own so that another demo on this machine stays apart.
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	mcastPort := strconv.Itoa(pc.LocalAddr().(*net.UDPAddr).Port)
	pc.Close()
	for _, id := range []string{"host-1", "host-2"} {
		h, err := d.c.StartHost(sfhostd, id, "--sfguest", sfguest, "--slots", "4", "--mem", "2048",
			"--mcast-addr", "127.0.0.1", "--mcast-port", mcastPort)
		if err != nil {
			return err
		}
		d.hosts = append(d.hosts, h)
	}
	c := d.c.Client()
	wctx, wcancel := context.WithTimeout(ctx, 60*time.Second)
	_, err = waitFor(wctx, "hosts to register", func() bool {
		hs, _, err := c.Hosts(wctx, nil)
		return err == nil && len(hs) == 2
	})
	wcancel()
	if err != nil {
		return err
	}
	d.say("  both hosts joined the gossip pool and were registered through raft in %d ms", time.Since(start).Milliseconds())
	if err := d.members(ctx, c); err != nil {
		return err
	}

	if err := d.cloneDemo(ctx, c, token); err != nil {
		return err
	}

	d.say("\n== Failover: kill -9 the raft leader")
	leader, err = d.c.Leader(ctx, 3)
	if err != nil {
		return err
	}
	killed := time.Now()
	d.c.Kill(leader)
	d.say("%s killed. $ sfcoord vm run --cmd 'sfguest ticket 2'", d.c.Agents[leader].ID)
	vm2, err := c.CreateVM(ctx, api.VMRequest{Name: "after-failover", MemMB: 256, VCPUs: 1, Launch: true, Cmd: "sfguest ticket 2"})
	if err != nil {
		return err
	}
	d.say("  acknowledged %d ms after the kill: VM %d scheduled on %s", time.Since(killed).Milliseconds(), vm2.ID, vm2.Host)
	if _, err := d.waitEnded(ctx, c, vm2.ID); err != nil {
		return err
	}
	console, err := d.console(ctx, vm2.Host, vm2.ID, token)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(console, "\n") {
		if strings.HasPrefix(l, "ticket ") {
			d.say("  inside VM %d: %s", vm2.ID, l)
		}
	}
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	d.say("new leader %s, term %d, commit index %d", st.LeaderID, st.Term, st.CommitIndex)
	return d.tickets(ctx, c)
}

// waitEnded follows a VM with blocking queries until it ends.
func (d *demo) waitEnded(ctx context.Context, c *api.Client, id uint64) (fsm.VM, error) {
	var index uint64
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		v, meta, err := c.VM(ctx, id, &api.QueryOptions{Index: index, Wait: 10 * time.Second})
		if err != nil {
			return v, err
		}
		if v.State == fsm.VMEnded {
			return v, nil
		}
		index = meta.Index
	}
	return fsm.VM{}, fmt.Errorf("VM %d did not end within 5 minutes", id)
}

func (d *demo) members(ctx context.Context, c *api.Client) error {
	ms, err := c.Members(ctx)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord members")
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Node\tAddress\tStatus\tRole\tCapacity")
	for _, m := range ms {
		capacity := "-"
		if m.Role == "host" {
			capacity = fmt.Sprintf("%d slots, %d MiB", m.Slots, m.MemMB)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.Name, m.Addr, m.Status, m.Role, capacity)
	}
	return tw.Flush()
}

func (d *demo) tickets(ctx context.Context, c *api.Client) error {
	ts, _, err := c.Tickets(ctx, 0, nil)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord tickets")
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Ticket\tParent VM\tState\tGranted\tPlacements")
	for _, t := range ts {
		fmt.Fprintf(tw, "%d\t%d\t%s\t%d/%d\t%s\n", t.ID, t.ParentVM, t.State, t.Granted, t.Requested, strings.Join(t.Placements, ","))
	}
	return tw.Flush()
}

// console fetches a VM's console from its host, as sfcoord vm logs does.
func (d *demo) console(ctx context.Context, host string, id uint64, token string) (string, error) {
	for _, h := range d.hosts {
		if h.ID == host {
			return h.Get(ctx, fmt.Sprintf("/v1/vms/%d/console", id), token)
		}
	}
	return "", fmt.Errorf("no host %s", host)
}
