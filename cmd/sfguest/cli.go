package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/snowflock-go/snowflock/guest"
	"github.com/snowflock-go/snowflock/internal/cli"
)

const usage = `Usage: sfguest <command> [flags]

  id                        this VM's identity (VM ID, role, ticket and clone ID)
  ticket N                  request_ticket(N): reserve up to N clones
  tickets                   list this VM's tickets
  ticket-info T             one ticket with its clones
  clone T                   clone(T): prints 0 in the parent and k in clone k
  exit [--status S] [--result TEXT]   end this clone with a status and a result (<= 4 KiB)
  join T                    wait for every clone of T; print their outcomes
  kill T                    destroy the clones of T
  checkpoint                take an immutable checkpoint of this VM; prints shell assignments
                            "checkpoint=C clone_id=0 ticket=0" here, and clone_id=k ticket=T
                            in each clone that create-clones starts from it (eval them)
  create-clones C T         start T's clones from checkpoint C; prints 0
  gen-data --size MIB [--seed S] FILE   write MIB MiB of deterministic pseudo-random data
                            (the same size and seed give the same bytes on every VM)

Flags: -json (machine-readable output), --timeout (default: none for join, clone, create-clones
  and checkpoint, which return in clones too; 60s otherwise).
Exit status: 0 ok, 1 error, 2 usage. The channel is /run/sfguest.sock (SF_GUEST_SOCKET) when
sfguest is init, else the serial device /dev/ttyS1 (SF_GUEST_DEVICE).
`

var usagef = cli.Usagef

// Run executes one CLI command and returns the exit status.
func Run(args []string, stdout, stderr io.Writer) int {
	if code, done := cli.Help(args, usage, stderr); done {
		return code
	}
	return cli.Exit("sfguest", run(args[0], args[1:], stdout), stderr)
}

func run(cmd string, args []string, out io.Writer) error {
	if cmd == "gen-data" {
		return genData(args)
	}
	fs := pflag.NewFlagSet(cmd, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	asJSON := fs.Bool("json", false, "machine-readable output")
	timeout := fs.Duration("timeout", 0, "give up after this long (0: no limit for join and clone, 60s otherwise)")
	status := fs.Int("status", 0, "exit status (exit)")
	result := fs.String("result", "", "result text, at most 4096 bytes (exit)")
	norm := make([]string, len(args))
	for i, a := range args {
		if a == "-json" {
			a = "--json"
		}
		norm[i] = a
	}
	if err := fs.Parse(norm); err != nil {
		return usagef("%s: %v", cmd, err)
	}
	pos := fs.Args()
	nArgs := map[string]int{"id": 0, "ticket": 1, "tickets": 0, "ticket-info": 1, "clone": 1, "exit": 0, "join": 1,
		"kill": 1, "checkpoint": 0, "create-clones": 2}
	want, ok := nArgs[cmd]
	if !ok {
		return usagef("unknown command %q (run 'sfguest help')", cmd)
	}
	if len(pos) != want {
		return usagef("%s takes %d argument(s), got %d", cmd, want, len(pos))
	}
	nums := make([]uint64, len(pos))
	for i, p := range pos {
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil || n == 0 {
			return usagef("%s: %q is not a positive integer", cmd, p)
		}
		nums[i] = n
	}
	if cmd != "exit" && (fs.Changed("status") || fs.Changed("result")) {
		return usagef("--status and --result go with exit")
	}
	if len(*result) > 4096 {
		return usagef("--result is %d bytes, at most 4096", len(*result))
	}
	if *timeout == 0 && cmd != "join" && cmd != "clone" && cmd != "create-clones" && cmd != "checkpoint" {
		*timeout = 60 * time.Second
	}
	ctx := context.Background()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	c, err := guest.Dial()
	if err != nil {
		return err
	}
	defer c.Close()
	p := printer{out: out, json: *asJSON}
	switch cmd {
	case "id":
		id, err := c.Hello(ctx)
		if err != nil {
			return err
		}
		if p.json {
			return p.printJSON(id)
		}
		if id.Role == "clone" {
			fmt.Fprintf(out, "VM %d on %s: clone %d of ticket %d (parent VM %d)\n", id.VMID, id.Host, id.CloneID, id.Ticket, id.ParentVM)
		} else {
			fmt.Fprintf(out, "VM %d on %s: %s\n", id.VMID, id.Host, id.Role)
		}
	case "ticket":
		if nums[0] > 1024 {
			return usagef("ticket: at most 1024 clones")
		}
		t, err := c.RequestTicket(ctx, int(nums[0]))
		if err != nil {
			return err
		}
		return p.ticket(t, fmt.Sprintf("ticket %d: %d of %d clones granted on %s", t.ID, t.Granted, t.Requested, strings.Join(t.Placements, ",")))
	case "tickets":
		ts, err := c.Tickets(ctx)
		if err != nil {
			return err
		}
		if p.json {
			return p.printJSON(ts)
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "Ticket\tState\tGranted\tPlacements")
		for _, t := range ts {
			fmt.Fprintf(tw, "%d\t%s\t%d/%d\t%s\n", t.ID, t.State, t.Granted, t.Requested, strings.Join(t.Placements, ","))
		}
		return tw.Flush()
	case "ticket-info":
		t, err := c.Ticket(ctx, nums[0])
		if err != nil {
			return err
		}
		return p.ticket(t, fmt.Sprintf("ticket %d: %s, %d of %d granted", t.ID, t.State, t.Granted, t.Requested))
	case "clone":
		k, err := c.Clone(ctx, nums[0])
		if err != nil {
			return err
		}
		return p.number("clone_id", k)
	case "create-clones":
		k, err := c.CreateClones(ctx, nums[0], nums[1])
		if err != nil {
			return err
		}
		return p.number("clone_id", k)
	case "exit":
		return c.Exit(ctx, *status, *result)
	case "join":
		t, err := c.Join(ctx, nums[0])
		if err != nil {
			return err
		}
		return p.ticket(t, fmt.Sprintf("ticket %d joined", t.ID))
	case "kill":
		t, err := c.Kill(ctx, nums[0])
		if err != nil {
			return err
		}
		return p.ticket(t, fmt.Sprintf("ticket %d killed", t.ID))
	case "checkpoint":
		cp, err := c.Checkpoint(ctx)
		if err != nil {
			return err
		}
		if p.json {
			return p.printJSON(cp)
		}
		// Shell assignments, for eval: the call returns in the VM that took
		// the checkpoint (clone_id=0) and in every clone created from it.
		fmt.Fprintf(p.out, "checkpoint=%d clone_id=%d ticket=%d\n", cp.ID, cp.CloneID, cp.Ticket)
		return nil
	}
	return nil
}

type printer struct {
	out  io.Writer
	json bool
}

func (p printer) printJSON(v interface{}) error {
	enc := json.NewEncoder(p.out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (p printer) number(key string, n int) error {
	if p.json {
		return p.printJSON(map[string]int{key: n})
	}
	_, err := fmt.Fprintln(p.out, n)
	return err
}

func (p printer) ticket(t guest.Ticket, headline string) error {
	if p.json {
		return p.printJSON(t)
	}
	fmt.Fprintln(p.out, headline)
	if len(t.Clones) == 0 {
		return nil
	}
	tw := tabwriter.NewWriter(p.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Clone\tVM\tHost\tState\tStatus\tResult")
	for _, cl := range t.Clones {
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%d\t%s\n", cl.K, cl.VMID, cl.Host, cl.State, cl.Status, strings.ReplaceAll(cl.Result, "\n", " "))
	}
	return tw.Flush()
}

// genData writes a deterministic dataset: ChaCha8 output from the seed, so
// that VMs that load "the same data" without cloning (benchmarks, checks of
// a cloned computation) really do.
func genData(args []string) error {
	fs := pflag.NewFlagSet("gen-data", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	size := fs.Int("size", 0, "MiB to write")
	seed := fs.Uint64("seed", 1, "seed")
	if err := fs.Parse(args); err != nil {
		return usagef("gen-data: %v", err)
	}
	if fs.NArg() != 1 || *size < 1 || *size > 1<<20 {
		return usagef("gen-data: --size 1..1048576 (MiB) and one FILE are required")
	}
	f, err := os.Create(fs.Arg(0))
	if err != nil {
		return err
	}
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], *seed)
	rng := rand.NewChaCha8(key)
	buf := make([]byte, 1<<20)
	for range *size {
		_, _ = rng.Read(buf)
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}
