// Command sfdemo runs the snowflock-go demo on an embedded local cluster:
// three coordinators and two hosts in one process, on 127.0.0.1, over real
// raft, bolt and gossip. It walks through the SnowFlock API at the control
// plane level (tickets, clone, exit, join), kills the raft leader, shows the
// failover, and removes everything it created.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/coordinator"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
)

func main() {
	os.Exit(Run(os.Args[1:], os.Stdout))
}

// Run executes the demo and returns the exit status.
func Run(args []string, out io.Writer) int {
	if len(args) > 0 {
		fmt.Fprintln(os.Stderr, "usage: sfdemo (no arguments)")
		return 2
	}
	d := &demo{out: out}
	err := d.run()
	d.cleanup()
	if err != nil {
		fmt.Fprintf(out, "\nDEMO FAILED: %v\n", err)
		return 1
	}
	fmt.Fprintln(out, "\nDemo finished; everything it started has been stopped and removed.")
	return 0
}

type demo struct {
	out     io.Writer
	dir     string
	servers []*coordinator.Server
	hosts   []*gossip.Agent
}

func (d *demo) say(format string, a ...interface{}) { fmt.Fprintf(d.out, format+"\n", a...) }

func (d *demo) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, h := range d.hosts {
		_ = h.Shutdown()
	}
	for _, s := range d.servers {
		if s != nil {
			_ = s.Shutdown(ctx)
		}
	}
	if d.dir != "" {
		os.RemoveAll(d.dir)
	}
}

func (d *demo) waitFor(what string, limit time.Duration, cond func() bool) (time.Duration, error) {
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			return 0, fmt.Errorf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start), nil
}

func (d *demo) leader() *coordinator.Server {
	for _, s := range d.servers {
		if s != nil && s.IsLeader() {
			return s
		}
	}
	return nil
}

func (d *demo) run() error {
	var err error
	if d.dir, err = os.MkdirTemp("", "sfdemo-"); err != nil {
		return err
	}
	key, _ := gossip.GenerateKey()
	gossipKey, _ := gossip.DecodeKey(key)
	token := api.NewRequestID()
	// The demo narrates; raft's own complaints about the peer it kills would
	// only interleave with that. Set SF_DEMO_LOG=debug to see them.
	level := hclog.LevelFromString(os.Getenv("SF_DEMO_LOG"))
	if level == hclog.NoLevel {
		level = hclog.Off
	}
	logger := hclog.New(&hclog.LoggerOptions{Level: level, Output: os.Stderr})

	d.say("== snowflock-go demo: the coordinator cluster")
	d.say("Starting 3 coordinators on 127.0.0.1 (raft on bolt, gossip encrypted, API token required) ...")
	start := time.Now()
	for i := 0; i < 3; i++ {
		cfg := coordinator.Config{NodeID: fmt.Sprintf("coord-%d", i+1), DataDir: fmt.Sprintf("%s/coord-%d", d.dir, i+1),
			RaftAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0", GossipAddr: "127.0.0.1:0", BootstrapExpect: 3,
			Token: token, GossipKey: gossipKey, ReconcileInterval: time.Second, Logger: logger.Named(fmt.Sprintf("coord-%d", i+1))}
		if i > 0 {
			cfg.Join = []string{d.servers[0].GossipAddr()}
		}
		s, err := coordinator.New(cfg)
		if err != nil {
			return err
		}
		d.servers = append(d.servers, s)
	}
	if _, err := d.waitFor("a leader", 15*time.Second, func() bool { return d.leader() != nil }); err != nil {
		return err
	}
	d.say("  cluster formed by bootstrap-expect; leader %s elected %d ms after start", d.leader().NodeID(), time.Since(start).Milliseconds())

	d.say("Joining 2 hosts by gossip (host-1: 4 clone slots, host-2: 4 clone slots) ...")
	for i, slots := range []int{4, 4} {
		a, err := gossip.New(gossip.Config{Name: fmt.Sprintf("host-%d", i+1), BindAddr: "127.0.0.1:0", Key: gossipKey,
			Meta: gossip.Meta{Role: gossip.RoleHost, API: fmt.Sprintf("127.0.0.1:%d", 7500+i), Slots: slots, MemMB: 8192}, Logger: logger})
		if err != nil {
			return err
		}
		d.hosts = append(d.hosts, a)
		if _, err := a.Join([]string{d.servers[0].GossipAddr()}); err != nil {
			return err
		}
	}
	took, err := d.waitFor("hosts registered", 10*time.Second, func() bool {
		l := d.leader()
		if l == nil {
			return false
		}
		hs, _ := l.FSM().Hosts()
		return len(hs) == 2
	})
	if err != nil {
		return err
	}
	d.say("  the leader registered both hosts through raft in %d ms", took.Milliseconds())

	var addrs []string
	for _, s := range d.servers {
		addrs = append(addrs, s.HTTPAddr())
	}
	c, err := api.NewClient(api.Config{Addrs: addrs, Token: token})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	members, err := c.Members(ctx)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord members")
	rows := [][]string{}
	for _, m := range members {
		capacity := "-"
		if m.Role == string(gossip.RoleHost) {
			capacity = fmt.Sprintf("%d slots, %d MiB", m.Slots, m.MemMB)
		}
		rows = append(rows, []string{m.Name, m.Addr, m.Status, m.Role, capacity})
	}
	d.table([]string{"Node", "Address", "Status", "Role", "Capacity"}, rows)
	if err := d.peers(ctx, c); err != nil {
		return err
	}

	d.say("\n== The SnowFlock API, as the parent VM's host relays it")
	parent, err := c.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "host-1", MemMB: 1024, VCPUs: 1})
	if err != nil {
		return err
	}
	d.say("parent VM registered on host-1 with cluster-wide VM ID %d", parent.ID)
	t0 := time.Now()
	t1, err := c.RequestTicket(ctx, parent.ID, 3)
	if err != nil {
		return err
	}
	d.say("request_ticket(3) -> ticket %d: %d of %d granted, clones placed on %s (%.1f ms)", t1.ID, t1.Granted, t1.Requested,
		strings.Join(t1.Placements, ", "), float64(time.Since(t0).Microseconds())/1000)
	t2, err := c.RequestTicket(ctx, parent.ID, 8)
	if err != nil {
		return err
	}
	d.say("request_ticket(8) -> ticket %d: %d of %d granted (partial grant: only %d slots were free)", t2.ID, t2.Granted, t2.Requested, t2.Granted)
	if _, err := c.RequestTicket(ctx, parent.ID, 1); err != nil {
		d.say("request_ticket(1) -> refused: %v", err)
	}
	if _, err := c.KillTicket(ctx, t2.ID, parent.ID, "demo: not needed"); err != nil {
		return err
	}
	d.say("kill(ticket %d) -> disposed, its 5 slots are free again", t2.ID)

	sum := strings.Repeat("5e", 32)
	cr, err := c.Clone(ctx, t1.ID, api.DescriptorRequest{ParentVM: parent.ID, Host: "host-1", Size: 180 << 10, SHA256: sum,
		MemserverAddr: "127.0.0.1:7600", PageCount: 262144})
	if err != nil {
		return err
	}
	d.say("clone(ticket %d) -> descriptor %d registered; clones:", t1.ID, cr.Descriptor.ID)
	for _, cl := range cr.Ticket.Clones {
		d.say("  clone %d -> VM ID %d on %s (%s)", cl.K, cl.VMID, cl.Host, cl.State)
	}
	joinDone := make(chan error, 1)
	var joined fsm.TicketView
	go func() {
		var err error
		joined, err = c.JoinTicket(ctx, t1.ID, parent.ID)
		joinDone <- err
	}()
	d.say("join(ticket %d) is now blocked in the parent, waiting on a blocking query ...", t1.ID)
	for _, cl := range cr.Ticket.Clones {
		if _, err := c.SetCloneState(ctx, cl.VMID, api.CloneStateRequest{State: fsm.CloneRunning}); err != nil {
			return err
		}
	}
	for _, cl := range cr.Ticket.Clones {
		res := fmt.Sprintf("slice %d: sum=%d", cl.K, cl.K*1000+7)
		if _, err := c.SetCloneState(ctx, cl.VMID, api.CloneStateRequest{State: fsm.CloneExited, Status: 0, Result: res}); err != nil {
			return err
		}
		d.say("  clone %d calls exit(0, %q)", cl.K, res)
	}
	if err := <-joinDone; err != nil {
		return err
	}
	d.say("join(ticket %d) returned; ticket %s. Outcomes:", t1.ID, joined.State)
	rows = nil
	for _, cl := range joined.Clones {
		rows = append(rows, []string{fmt.Sprint(cl.K), fmt.Sprint(cl.VMID), cl.Host, string(cl.State), fmt.Sprint(cl.Status), cl.Result})
	}
	d.table([]string{"Clone", "VM", "Host", "State", "Status", "Result"}, rows)
	if _, err := c.JoinTicket(ctx, t1.ID, 999); err != nil {
		d.say("join(ticket %d) by VM 999 -> refused: %v", t1.ID, err)
	}

	d.say("\n== Failover: killing the raft leader")
	old := d.leader()
	var oldIdx int
	for i, s := range d.servers {
		if s == old {
			oldIdx = i
		}
	}
	killed := time.Now()
	_ = old.Shutdown(context.Background())
	d.servers[oldIdx] = nil
	t3, err := c.RequestTicket(ctx, parent.ID, 2)
	if err != nil {
		return err
	}
	d.say("%s killed; request_ticket(2) acknowledged %d ms later by the new leader %s -> ticket %d",
		old.NodeID(), time.Since(killed).Milliseconds(), d.leader().NodeID(), t3.ID)
	if err := d.peers(ctx, c); err != nil {
		return err
	}
	d.say("(%s stays a voter: a restarted node rejoins; 'sfcoord raft remove-peer' or --dead-server-timeout removes it)", old.NodeID())

	ts, _, err := c.Tickets(ctx, 0, nil)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord tickets")
	rows = nil
	for _, t := range ts {
		rows = append(rows, []string{fmt.Sprint(t.ID), fmt.Sprint(t.ParentVM), string(t.State), fmt.Sprintf("%d/%d", t.Granted, t.Requested), strings.Join(t.Placements, ",")})
	}
	d.table([]string{"Ticket", "Parent VM", "State", "Granted", "Placements"}, rows)
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord status\nNode %s  State %s  Leader %s  Term %d  Commit %d  Applied %d",
		st.NodeID, st.State, st.LeaderID, st.Term, st.CommitIndex, st.AppliedIndex)
	return nil
}

func (d *demo) peers(ctx context.Context, c *api.Client) error {
	ps, err := c.Peers(ctx)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord raft list-peers")
	var rows [][]string
	for _, p := range ps {
		rows = append(rows, []string{p.ID, p.Address, p.State, fmt.Sprint(p.Voter)})
	}
	d.table([]string{"Node", "Address", "State", "Voter"}, rows)
	return nil
}

func (d *demo) table(header []string, rows [][]string) {
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}
