package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/coordinator"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
	"github.com/snowflock-go/snowflock/internal/cli"
)

const usage = `Usage: sfcoord <command> [flags]

Agent:
  agent                   run a coordinator agent

Cluster (talk to an agent chosen with --addr or SF_ADDR):
  join ADDR...            make the agent join gossip addresses
  leave                   make the agent leave the cluster gracefully and exit
  members                 list gossip members (coordinators and hosts)
  raft list-peers         list raft peers
  raft remove-peer --id   remove a coordinator from raft
  status                  leader, term, commit and applied index
  hosts                   list hosts and their capacity
  tickets                 list tickets
  ticket show ID          show a ticket and its clones

Other:
  keygen                  print a new gossip encryption key

Client flags: --addr HOST:PORT[,HOST:PORT] (SF_ADDR, default 127.0.0.1:7400),
--token (SF_TOKEN), -json. Exit status: 0 ok, 1 error, 2 usage.
`

var usagef = cli.Usagef

// Run executes one sfcoord command and returns its exit status.
func Run(args []string, stdout, stderr io.Writer) int {
	if code, done := cli.Help(args, usage, stderr); done {
		return code
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "agent":
		err = runAgent(rest, stderr)
	case "keygen":
		err = runKeygen(rest, stdout)
	case "raft":
		if len(rest) == 0 {
			err = usagef("raft needs a subcommand: list-peers or remove-peer")
			break
		}
		switch rest[0] {
		case "list-peers":
			err = runClient("raft list-peers", rest[1:], stdout, nil, listPeers)
		case "remove-peer":
			var id string
			err = runClient("raft remove-peer", rest[1:], stdout, func(fs *pflag.FlagSet) {
				fs.StringVar(&id, "id", "", "raft ID of the coordinator to remove")
			}, func(c *cmdCtx) error { return removePeer(c, id) })
		default:
			err = usagef("unknown raft subcommand %q", rest[0])
		}
	case "vm":
		err = runVM(rest, stdout)
	case "join":
		err = runClient(cmd, rest, stdout, nil, join)
	case "leave":
		err = runClient(cmd, rest, stdout, nil, leave)
	case "members":
		err = runClient(cmd, rest, stdout, nil, members)
	case "status":
		err = runClient(cmd, rest, stdout, nil, status)
	case "hosts":
		err = runClient(cmd, rest, stdout, nil, hosts)
	case "tickets":
		err = runClient(cmd, rest, stdout, nil, tickets)
	case "ticket":
		if len(rest) == 0 || rest[0] != "show" {
			err = usagef("usage: sfcoord ticket show ID")
			break
		}
		err = runClient("ticket show", rest[1:], stdout, nil, ticketShow)
	default:
		err = usagef("unknown command %q (run 'sfcoord help')", cmd)
	}
	return cli.Exit("sfcoord", err, stderr)
}

func runKeygen(args []string, stdout io.Writer) error {
	if len(args) > 0 {
		return usagef("keygen takes no arguments")
	}
	k, err := gossip.GenerateKey()
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, k)
	return nil
}

// cmdCtx is what a client command gets.
type cmdCtx struct {
	ctx    context.Context
	token  string
	client *api.Client
	json   bool
	args   []string
	out    io.Writer
}

func runClient(name string, args []string, stdout io.Writer, extra func(*pflag.FlagSet), f func(*cmdCtx) error) error {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	addr := fs.String("addr", envOr("SF_ADDR", "127.0.0.1:7400"), "coordinator API address(es), comma separated")
	token := fs.String("token", os.Getenv("SF_TOKEN"), "API bearer token")
	asJSON := fs.Bool("json", false, "print JSON")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	if extra != nil {
		extra(fs)
	}
	if err := fs.Parse(normalizeJSONFlag(args)); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stdout, "Usage of sfcoord %s:\n%s", name, fs.FlagUsages())
			return err
		}
		return usagef("%s: %v", name, err)
	}
	c, err := api.NewClient(api.Config{Addrs: strings.Split(*addr, ","), Token: *token, RetryFor: *timeout})
	if err != nil {
		return usagef("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	return f(&cmdCtx{ctx: ctx, token: *token, client: c, json: *asJSON, args: fs.Args(), out: stdout})
}

// normalizeJSONFlag accepts Consul's single-dash -json as well as --json.
func normalizeJSONFlag(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "-json" {
			a = "--json"
		}
		out[i] = a
	}
	return out
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func (c *cmdCtx) noArgs() error {
	if len(c.args) > 0 {
		return usagef("unexpected arguments %v", c.args)
	}
	return nil
}

func (c *cmdCtx) printJSON(v interface{}) error {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// table prints aligned columns.
func (c *cmdCtx) table(header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

func join(c *cmdCtx) error {
	if len(c.args) == 0 {
		return usagef("join needs at least one gossip address")
	}
	n, err := c.client.Join(c.ctx, c.args)
	if err != nil {
		return err
	}
	fmt.Fprintf(c.out, "Successfully joined cluster by contacting %d nodes.\n", n)
	return nil
}

func leave(c *cmdCtx) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	if err := c.client.Leave(c.ctx); err != nil {
		return err
	}
	fmt.Fprintln(c.out, "Graceful leave complete.")
	return nil
}

func members(c *cmdCtx) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	ms, err := c.client.Members(c.ctx)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(ms)
	}
	var rows [][]string
	for _, m := range ms {
		capacity := "-"
		if m.Role == string(gossip.RoleHost) {
			capacity = fmt.Sprintf("%d slots, %d MiB", m.Slots, m.MemMB)
		}
		rows = append(rows, []string{m.Name, m.Addr, m.Status, m.Role, capacity})
	}
	return c.table([]string{"Node", "Address", "Status", "Role", "Capacity"}, rows)
}

func listPeers(c *cmdCtx) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	ps, err := c.client.Peers(c.ctx)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(ps)
	}
	var rows [][]string
	for _, p := range ps {
		rows = append(rows, []string{p.ID, p.ID, p.Address, p.State, strconv.FormatBool(p.Voter)})
	}
	return c.table([]string{"Node", "ID", "Address", "State", "Voter"}, rows)
}

func removePeer(c *cmdCtx, id string) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	if id == "" {
		return usagef("raft remove-peer needs --id")
	}
	if err := c.client.RemovePeer(c.ctx, id); err != nil {
		return err
	}
	fmt.Fprintf(c.out, "Removed peer with id %q\n", id)
	return nil
}

func status(c *cmdCtx) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	st, err := c.client.Status(c.ctx)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(st)
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	for _, kv := range [][2]string{
		{"Node", st.NodeID}, {"State", st.State}, {"Leader", fmt.Sprintf("%s (%s)", st.LeaderID, st.Leader)},
		{"Term", strconv.FormatUint(st.Term, 10)}, {"Commit index", strconv.FormatUint(st.CommitIndex, 10)},
		{"Applied index", strconv.FormatUint(st.AppliedIndex, 10)}, {"Last index", strconv.FormatUint(st.LastIndex, 10)},
		{"Raft peers", strconv.Itoa(st.Peers)},
	} {
		fmt.Fprintf(tw, "%s:\t%s\n", kv[0], kv[1])
	}
	return tw.Flush()
}

func hosts(c *cmdCtx) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	hs, _, err := c.client.Hosts(c.ctx, nil)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(hs)
	}
	var rows [][]string
	for _, h := range hs {
		rows = append(rows, []string{h.ID, string(h.Status), fmt.Sprintf("%d/%d", h.UsedSlots, h.Slots),
			strconv.FormatInt(h.MemMB, 10), h.APIAddr})
	}
	return c.table([]string{"Host", "Status", "Slots used", "Mem MiB", "API"}, rows)
}

func tickets(c *cmdCtx) error {
	if err := c.noArgs(); err != nil {
		return err
	}
	ts, _, err := c.client.Tickets(c.ctx, 0, nil)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(ts)
	}
	var rows [][]string
	for _, t := range ts {
		rows = append(rows, []string{strconv.FormatUint(t.ID, 10), strconv.FormatUint(t.ParentVM, 10), string(t.State),
			fmt.Sprintf("%d/%d", t.Granted, t.Requested), strings.Join(t.Placements, ",")})
	}
	return c.table([]string{"Ticket", "Parent VM", "State", "Granted", "Placements"}, rows)
}

func ticketShow(c *cmdCtx) error {
	if len(c.args) != 1 {
		return usagef("usage: sfcoord ticket show ID")
	}
	id, err := strconv.ParseUint(c.args[0], 10, 64)
	if err != nil || id == 0 {
		return usagef("ticket ID %q is not a positive integer", c.args[0])
	}
	t, _, err := c.client.Ticket(c.ctx, id, nil)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(t)
	}
	fmt.Fprintf(c.out, "Ticket %d: parent VM %d, %s, %d of %d granted\n", t.ID, t.ParentVM, t.State, t.Granted, t.Requested)
	if t.Reason != "" {
		fmt.Fprintf(c.out, "Reason: %s\n", t.Reason)
	}
	rows := [][]string{}
	if len(t.Clones) == 0 {
		for k, h := range t.Placements {
			rows = append(rows, []string{strconv.Itoa(k + 1), "-", h, "reserved", "", ""})
		}
	}
	for _, cl := range t.Clones {
		rows = append(rows, []string{strconv.Itoa(cl.K), strconv.FormatUint(cl.VMID, 10), cl.Host, string(cl.State),
			statusText(cl), oneLine(cl.Result, 40)})
	}
	return c.table([]string{"Clone", "VM", "Host", "State", "Status", "Result"}, rows)
}

func statusText(cl fsm.Clone) string {
	switch cl.State {
	case fsm.CloneExited:
		return strconv.Itoa(cl.Status)
	case fsm.CloneFailed, fsm.CloneKilled:
		return cl.Reason
	}
	return ""
}

func oneLine(s string, n int) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > n {
		return s[:n-3] + "..."
	}
	return s
}

func runAgent(args []string, stderr io.Writer) error {
	fs := pflag.NewFlagSet("agent", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var cfg coordinator.Config
	fs.StringVar(&cfg.NodeID, "node-id", "", "stable node ID (default: generated once and kept in the data dir)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory for raft log, snapshots and node ID (required)")
	fs.StringVar(&cfg.RaftAddr, "raft-addr", "127.0.0.1:7300", "raft transport bind address")
	fs.StringVar(&cfg.HTTPAddr, "http-addr", "127.0.0.1:7400", "HTTP API bind address")
	fs.StringVar(&cfg.GossipAddr, "gossip-addr", "127.0.0.1:7946", "gossip bind address (TCP and UDP)")
	fs.StringVar(&cfg.RaftAdvertise, "raft-advertise", "", "raft address peers dial (default: --raft-addr)")
	fs.StringVar(&cfg.HTTPAdvertise, "http-advertise", "", "API address others use (default: --http-addr)")
	fs.StringVar(&cfg.GossipAdvertise, "gossip-advertise", "", "gossip address others use (default: --gossip-addr)")
	fs.BoolVar(&cfg.Bootstrap, "bootstrap", false, "form a single-node cluster if there is no state")
	fs.IntVar(&cfg.BootstrapExpect, "bootstrap-expect", 0, "form the cluster when this many coordinators have joined")
	fs.StringArrayVar(&cfg.Join, "join", nil, "gossip address to join (repeatable), retried until one answers")
	fs.StringVar(&cfg.Token, "token", os.Getenv("SF_TOKEN"), "require this bearer token on the API (SF_TOKEN)")
	encrypt := fs.String("encrypt", os.Getenv("SF_ENCRYPT"), "gossip encryption key from 'sfcoord keygen' (SF_ENCRYPT)")
	fs.StringVar(&cfg.GossipProfile, "gossip-profile", "fast", "failure detection timing: fast (about 1 s), lan or wan (slow or loaded networks)")
	fs.DurationVar(&cfg.DeadServerTimeout, "dead-server-timeout", 10*time.Minute, "remove a coordinator dead this long from raft")
	fs.DurationVar(&cfg.ReconcileInterval, "reconcile-interval", 5*time.Second, "leader's periodic membership reconcile")
	fs.DurationVar(&cfg.HostMissingTimeout, "host-missing-timeout", 10*time.Second, "fail a registered host absent from gossip this long")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	logJSON := fs.Bool("log-json", false, "log in JSON")
	leaveOnTerm := fs.Bool("leave-on-terminate", false, "leave gracefully on SIGTERM/SIGINT instead of just stopping")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stderr, "Usage of sfcoord agent:\n%s", fs.FlagUsages())
			return err
		}
		return usagef("agent: %v", err)
	}
	if fs.NArg() > 0 {
		return usagef("agent: unexpected arguments %v", fs.Args())
	}
	if cfg.DataDir == "" {
		return usagef("agent: --data-dir is required")
	}
	level := hclog.LevelFromString(*logLevel)
	if level == hclog.NoLevel {
		return usagef("agent: unknown --log-level %q", *logLevel)
	}
	if *encrypt != "" {
		k, err := gossip.DecodeKey(*encrypt)
		if err != nil {
			return usagef("agent: --encrypt: %v", err)
		}
		cfg.GossipKey = k
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "sfcoord", Level: level, JSONFormat: *logJSON, Output: stderr})
	cfg.Logger = log
	s, err := coordinator.New(cfg)
	if err != nil {
		return err
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	select {
	case sig := <-sigs:
		log.Info("signal received", "signal", sig.String())
		if *leaveOnTerm {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			_ = s.Leave(ctx)
			cancel()
		}
	case <-s.Left():
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
}
