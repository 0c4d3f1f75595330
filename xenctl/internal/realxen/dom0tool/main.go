// Command dom0tool runs xenctl inside a Xen dom0, as sfhostd will: xl
// through xenctl.LocalRunner, xenstore through xenstored's socket. xenctl's
// tests on real Xen (the xenbed hosts) put it into every dom0 and call it
// through the bed's agent, one subcommand a call:
//
//	create  -name N -kernel K -ramdisk R [-cmdline C] [-mem MB] [-vif] [-chan]
//	info    -name N
//	pause | unpause | destroy -name N
//	capture -name N -dir D          Domain.Capture into D (descriptor, pages)
//	pack    -dir D                  D's pages, stored ones only, in one
//	                                dense file (PackedFile) to carry
//	unpack  -dir D                  the PackedFile back into a PageFile
//	restore -name N -dir D [-chan -clone K]
//	                                RestoreFrom D's descriptor and pages
//	serve   -name N -calls C [-release F]
//	                                the host side of N's guest channel
//
// Each prints one JSON object on standard output; xenctl's log goes to
// standard error. A Domain does not outlive its process: each subcommand
// finds its domain again by name (xenctl.Attach). DOM0TOOL_CPUPROFILE=F
// writes a CPU profile of the subcommand to F.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime/pprof"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl"
	"github.com/snowflock-go/snowflock/xenctl/xenchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// The identities the channel tests use: a parent VM, its ticket, and the
// clone k of that ticket is VM parentVM+k.
const (
	parentVM = 7
	ticket   = 9
	cloneID  = 2 // the guest's clone call
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: dom0tool create|info|pause|unpause|destroy|capture|pack|unpack|restore|serve [flags]")
		return 2
	}
	t := &tool{log: hclog.New(&hclog.LoggerOptions{Name: "dom0tool", Level: hclog.Debug, Output: os.Stderr})}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	fs.StringVar(&t.name, "name", "", "domain name")
	fs.StringVar(&t.dir, "dir", "", "capture directory")
	fs.StringVar(&t.kernel, "kernel", "", "guest kernel")
	fs.StringVar(&t.ramdisk, "ramdisk", "", "guest initramfs")
	fs.StringVar(&t.cmdline, "cmdline", "console=hvc0", "guest kernel command line")
	fs.StringVar(&t.typ, "type", string(xenctl.TypePVH), "create: guest type, pvh or pv")
	fs.IntVar(&t.memMB, "mem", 128, "guest memory, MiB")
	fs.BoolVar(&t.vif, "vif", false, "give the guest a NIC on xenbr0")
	fs.BoolVar(&t.channel, "chan", false, "lay out the guest channel (xenchan.Prepare)")
	fs.IntVar(&t.clone, "clone", 0, "restore: the clone's k, answered to the pending clone call")
	fs.IntVar(&t.calls, "calls", 1, "serve: answer this many calls, then exit")
	fs.StringVar(&t.release, "release", "", "serve: answer a clone call once this file exists")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after this long")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	cmds := map[string]func(context.Context) (any, error){
		"create": t.create, "info": t.info, "pause": t.pause, "unpause": t.unpause, "destroy": t.destroy,
		"capture": t.capture, "pack": t.pack, "unpack": t.unpack, "restore": t.restore, "serve": t.serve,
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "dom0tool: unknown command %q\n", args[0])
		return 2
	}
	if p := os.Getenv("DOM0TOOL_CPUPROFILE"); p != "" {
		f, err := os.Create(p)
		if err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	out, err := cmd(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dom0tool %s: %v\n", args[0], err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

type tool struct {
	log                      hclog.Logger
	name, dir                string
	kernel, ramdisk, cmdline string
	typ                      string
	memMB                    int
	vif, channel             bool
	clone, calls             int
	release                  string
}

// config is the domain's xenctl configuration; with a channel it connects
// to dom0's xenstore, which the caller closes.
func (t *tool) config(ctx context.Context) (xenctl.Config, *xenstore.Client, error) {
	cfg := xenctl.Config{Name: t.name, Logger: t.log}
	if !t.channel {
		return cfg, nil, nil
	}
	xs, err := xenstore.Dial(ctx)
	if err != nil {
		return cfg, nil, err
	}
	cfg.Store = xs
	return cfg, xs, nil
}

// Timed is a result with how long the subcommand's main step took.
type Timed struct {
	ID   uint32        `json:"id"`
	Took time.Duration `json:"took"`
}

func (t *tool) create(ctx context.Context) (any, error) {
	cfg, xs, err := t.config(ctx)
	if err != nil {
		return nil, err
	}
	if xs != nil {
		defer xs.Close()
		cfg.Channel = &xenchan.Setup{Identity: &guestchan.Identity{VMID: parentVM, Role: "parent", Host: hostname()}}
	}
	cfg.Type, cfg.MemMB, cfg.VCPUs = xenctl.Type(t.typ), t.memMB, 1
	cfg.Kernel, cfg.Ramdisk, cfg.Cmdline = t.kernel, t.ramdisk, t.cmdline
	if t.vif {
		cfg.Extra = []xenctl.Setting{{Key: "vif", Value: []string{"bridge=xenbr0"}}}
	}
	begin := time.Now()
	d, err := xenctl.Create(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return Timed{ID: d.ID(), Took: time.Since(begin)}, nil
}

func (t *tool) attach(ctx context.Context) (*xenctl.Domain, error) {
	return xenctl.Attach(ctx, xenctl.Config{Name: t.name, Logger: t.log})
}

func (t *tool) info(ctx context.Context) (any, error) {
	d, err := t.attach(ctx)
	if err != nil {
		return nil, err
	}
	return d.Info(ctx)
}

func (t *tool) pause(ctx context.Context) (any, error)   { return t.act(ctx, (*xenctl.Domain).Pause) }
func (t *tool) unpause(ctx context.Context) (any, error) { return t.act(ctx, (*xenctl.Domain).Unpause) }
func (t *tool) destroy(ctx context.Context) (any, error) { return t.act(ctx, (*xenctl.Domain).Destroy) }

func (t *tool) act(ctx context.Context, f func(*xenctl.Domain, context.Context) error) (any, error) {
	d, err := t.attach(ctx)
	if err != nil {
		return nil, err
	}
	begin := time.Now()
	if err := f(d, ctx); err != nil {
		return nil, err
	}
	return Timed{ID: d.ID(), Took: time.Since(begin)}, nil
}

// CaptureResult is a capture and the shape of its page space.
type CaptureResult struct {
	*xenctl.Capture
	Took time.Duration `json:"took"`
	// Runs are the PFN entries merged into contiguous runs, whatever
	// their type and content; StoredRuns only the stored pages'.
	Runs       []Run `json:"runs"`
	StoredRuns int   `json:"stored_runs"`
	// PagesFileSize is the page file's length (it is sparse).
	PagesFileSize int64 `json:"pages_file_size"`
	// PageTypes counts the entries by xcstream page type (0 a normal
	// page, 0xd broken, 0xe XALLOC, 0xf XTAB: no page).
	PageTypes map[uint8]uint64 `json:"page_types"`
}

// Run is count consecutive PFNs.
type Run struct {
	PFN   uint64 `json:"pfn"`
	Count uint64 `json:"count"`
}

func (t *tool) capture(ctx context.Context) (any, error) {
	d, err := t.attach(ctx)
	if err != nil {
		return nil, err
	}
	begin := time.Now()
	c, err := d.Capture(ctx, xenctl.CaptureOptions{Dir: t.dir})
	if err != nil {
		return nil, err
	}
	res := &CaptureResult{Capture: c, Took: time.Since(begin), PageTypes: map[uint8]uint64{}}
	var storedEnd uint64
	for p := range c.Descriptor.Pages() {
		res.PageTypes[p.Type]++
		if n := len(res.Runs); n > 0 && res.Runs[n-1].PFN+res.Runs[n-1].Count == p.PFN {
			res.Runs[n-1].Count++
		} else {
			res.Runs = append(res.Runs, Run{PFN: p.PFN, Count: 1})
		}
		if p.Stored() {
			if res.StoredRuns == 0 || storedEnd != p.PFN {
				res.StoredRuns++
			}
			storedEnd = p.PFN + 1
		}
	}
	if fi, err := os.Stat(c.PagesPath); err == nil {
		res.PagesFileSize = fi.Size()
	}
	return res, nil
}

func (t *tool) restore(ctx context.Context) (any, error) {
	desc, pages, err := xenctl.OpenCapture(t.dir)
	if err != nil {
		return nil, err
	}
	defer pages.Close()
	cfg, xs, err := t.config(ctx)
	if err != nil {
		return nil, err
	}
	if xs != nil {
		defer xs.Close()
		greeting, err := guestchan.Answer(cloneID, guestchan.CloneResult{CloneID: t.clone, Ticket: ticket})
		if err != nil {
			return nil, err
		}
		cfg.Channel = &xenchan.Setup{
			Identity: &guestchan.Identity{VMID: parentVM + uint64(t.clone), Role: "clone", Host: hostname(),
				Ticket: ticket, CloneID: t.clone, ParentVM: parentVM},
			Greeting: []*guestchan.Response{greeting},
		}
	}
	begin := time.Now()
	d, err := xenctl.RestoreFrom(ctx, desc, pages, cfg)
	if err != nil {
		return nil, err
	}
	return Timed{ID: d.ID(), Took: time.Since(begin)}, nil
}

// ServeResult lists the requests served.
type ServeResult struct {
	Requests []*guestchan.Request `json:"requests"`
}

// serve answers the guest's calls: hello with the identity xenchan.Prepare
// wrote, clone with 0 (the parent's answer) once the release file exists.
func (t *tool) serve(ctx context.Context) (any, error) {
	xs, err := xenstore.Dial(ctx)
	if err != nil {
		return nil, err
	}
	defer xs.Close()
	d, err := t.attach(ctx)
	if err != nil {
		return nil, err
	}
	h, err := xenchan.NewHost(ctx, xs, d.ID(), xenchan.HostOptions{Logger: t.log})
	if err != nil {
		return nil, err
	}
	defer h.Close()
	stop := context.AfterFunc(ctx, func() { h.Close() })
	defer stop()
	dec := guestchan.NewDecoder(h)
	res := &ServeResult{}
	for len(res.Requests) < t.calls {
		req, err := dec.ReadRequest()
		if err != nil {
			return res, err
		}
		res.Requests = append(res.Requests, req)
		t.log.Info("request", "id", req.ID, "call", req.Call)
		var resp *guestchan.Response
		switch req.Call {
		case guestchan.CallHello:
			var id guestchan.Identity
			b, err := xs.Read(ctx, xenstore.DomainPath(d.ID())+"/"+xenchan.IdentityNode)
			if err == nil {
				err = json.Unmarshal(b, &id)
			}
			if err != nil {
				return res, err
			}
			resp, err = guestchan.Answer(req.ID, id)
			if err != nil {
				return res, err
			}
		case guestchan.CallClone:
			if err := waitFile(ctx, t.release); err != nil {
				return res, err
			}
			resp, _ = guestchan.Answer(req.ID, guestchan.CloneResult{CloneID: 0, Ticket: ticket})
		default:
			resp = guestchan.Fail(req.ID, guestchan.CodeUnsupported, "dom0tool serves hello and clone")
		}
		if err := guestchan.Encode(h, resp); err != nil {
			return res, err
		}
	}
	return res, nil
}

// waitFile waits until path exists ("" does at once).
func waitFile(ctx context.Context, path string) error {
	for path != "" {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}
