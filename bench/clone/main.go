// Command clone benchmarks cloning a running VM onto other hosts against
// booting fresh VMs to the same state. It runs a coordinator and four host
// daemons in this process with real QEMU guests, and measures, for each VM
// size, a parent that loads a dataset into guest memory and clones N = 1,
// 2, 4, 8 times (clones spread over the hosts): the parent's pause and
// descriptor size, the time from the clone call to all N clones running,
// the pages each clone fetched on demand and the faults' waits; the same
// with every clone host fetching all memory first (eager restore); and N
// VMs cold-booted to the same dataset in memory. Every clone hashes its
// slice of the dataset and the bench checks the sums against the parent's.
// Timings come from the hosts' clone events (hostd.Config.OnEvent). It
// writes JSON (default bench/results/clone.json) and prints a table.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/qemuctl"
)

func main() { os.Exit(Run(os.Args[1:], os.Stdout, os.Stderr)) }

// options are the command's flags.
type options struct {
	bin, out   string
	sizes      []int // VM MiB
	data       []int // dataset MiB, per size
	runs       []int // clone runs per N, per size
	coldRuns   []int // cold boots per N, per size
	ns, eagerN []int
	coldN      []int
	pagesN     int
	timeout    time.Duration
}

// Run executes the benchmark and returns the exit status.
func Run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("clone", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.bin, "bin", "bin", "directory with the static sfguest binary")
	fs.StringVar(&o.out, "out", "bench/results/clone.json", "where to write the JSON results")
	sizes := fs.String("sizes", "256,1024", "VM memory sizes, MiB")
	data := fs.String("data", "64,256", "dataset MiB loaded into each VM, one per size")
	runs := fs.String("runs", "3", "clone operations per N: one value, or one per size")
	coldRuns := fs.String("cold-runs", "", "cold boots per N: one value, or one per size (default: -runs)")
	ns := fs.String("n", "1,2,4,8", "clone counts (divisors of 8)")
	eagerN := fs.String("eager-n", "1,8", "clone counts with eager restore")
	coldN := fs.String("cold-n", "1,8", "cold-booted VM counts")
	fs.IntVar(&o.pagesN, "pages-n", 4, "clone count whose clones' page fetches are reported")
	fs.DurationVar(&o.timeout, "timeout", 50*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	err := parseOptions(&o, *sizes, *data, *runs, *coldRuns, *ns, *eagerN, *coldN)
	if err != nil {
		fmt.Fprintln(stderr, "bench-clone:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if err := run(ctx, o, stdout, stderr); err != nil {
		fmt.Fprintln(stderr, "bench-clone:", err)
		return 1
	}
	return 0
}

func parseOptions(o *options, sizes, data, runs, coldRuns, ns, eagerN, coldN string) error {
	var err error
	list := func(name, s string) []int {
		var out []int
		for _, f := range strings.Split(s, ",") {
			n, perr := strconv.Atoi(strings.TrimSpace(f))
			if perr != nil || n < 1 {
				err = errors.Join(err, fmt.Errorf("-%s: %q is not a positive integer", name, f))
			}
			out = append(out, n)
		}
		return out
	}
	o.sizes, o.data, o.runs = list("sizes", sizes), list("data", data), list("runs", runs)
	if coldRuns == "" {
		coldRuns = runs
	}
	o.coldRuns = list("cold-runs", coldRuns)
	o.ns, o.eagerN, o.coldN = list("n", ns), list("eager-n", eagerN), list("cold-n", coldN)
	if err != nil {
		return err
	}
	perSize := func(name string, v []int) []int {
		if len(v) == 1 {
			for len(v) < len(o.sizes) {
				v = append(v, v[0])
			}
		}
		if len(v) != len(o.sizes) {
			err = errors.Join(err, fmt.Errorf("-%s needs one value or one per size", name))
		}
		return v
	}
	o.data, o.runs, o.coldRuns = perSize("data", o.data), perSize("runs", o.runs), perSize("cold-runs", o.coldRuns)
	for _, n := range append(append([]int{}, o.ns...), o.eagerN...) {
		if chunks%n != 0 {
			err = errors.Join(err, fmt.Errorf("clone count %d does not divide %d", n, chunks))
		}
	}
	for i, d := range o.data {
		if d%chunks != 0 || i < len(o.sizes) && d >= o.sizes[i] {
			err = errors.Join(err, fmt.Errorf("dataset %d MiB: must be a multiple of %d and below the VM size", d, chunks))
		}
	}
	return err
}

// machine describes where the bench ran.
type machine struct {
	Cores       int    `json:"cores"`
	CPU         string `json:"cpu"`
	Kernel      string `json:"kernel"`
	QEMU        string `json:"qemu"`
	Accel       string `json:"accel"`
	AccelReason string `json:"accel_reason"`
	Go          string `json:"go"`
}

func run(ctx context.Context, o options, stdout, stderr io.Writer) error {
	p := &progress{w: stdout, start: time.Now()}
	log := hclog.New(&hclog.LoggerOptions{Name: "bench", Level: hclog.Warn, Output: stderr})
	sfguest, err := filepath.Abs(filepath.Join(o.bin, "sfguest"))
	if err != nil {
		return err
	}
	if _, err := os.Stat(sfguest); err != nil {
		return fmt.Errorf("%w (run make build)", err)
	}
	im, err := image.Build(ctx, image.Options{SFGuest: sfguest})
	if err != nil {
		return fmt.Errorf("guest image: %w", err)
	}
	m := machineInfo(ctx)
	p.printf("guest image ready; %d cores, %s, accel %s", m.Cores, m.QEMU, m.Accel)

	root, err := os.MkdirTemp("", "sfbench-clone-")
	if err != nil {
		return err
	}
	defer cleanupRoot(root, p)
	res := map[int]*sizeResult{}
	for i, s := range o.sizes {
		res[s] = newSizeResult(s, o.data[i], o.runs[i])
	}
	err = withCluster(ctx, filepath.Join(root, "lazy"), im, "lazy", log, p, func(c *cluster) error {
		for i, s := range o.sizes {
			order := repeat(o.ns, o.runs[i])
			runs, err := c.cloneSeries(ctx, p, fmt.Sprintf("[%d MiB lazy]", s), s, o.data[i], order)
			if err != nil {
				return fmt.Errorf("%d MiB clones: %w", s, err)
			}
			res[s].addLazy(runs, o.pagesN)
		}
		for i, s := range o.sizes {
			for _, n := range o.coldN {
				key := strconv.Itoa(n)
				for r := 0; r < o.coldRuns[i]; r++ {
					d, each, err := c.coldBoot(ctx, s, o.data[i], n)
					if err != nil {
						return fmt.Errorf("%d MiB cold boot of %d: %w", s, n, err)
					}
					res[s].ColdBootAll[key] = append(res[s].ColdBootAll[key], ms(d))
					p.printf("[%d MiB cold] %d VM(s) loaded %d MiB after %.0f ms (each: %v)", s, n, o.data[i], ms(d), each)
				}
				res[s].ColdBootMS[key] = median(res[s].ColdBootAll[key])
			}
		}
		m.Accel = c.accel
		return nil
	})
	if err != nil {
		return err
	}
	err = withCluster(ctx, filepath.Join(root, "mcast"), im, "mcast", log, p, func(c *cluster) error {
		for i, s := range o.sizes {
			order := repeat(o.ns, o.runs[i])
			runs, err := c.cloneSeries(ctx, p, fmt.Sprintf("[%d MiB mcast]", s), s, o.data[i], order)
			if err != nil {
				return fmt.Errorf("%d MiB multicast clones: %w", s, err)
			}
			res[s].addMcast(runs, o.pagesN)
		}
		return nil
	})
	if err != nil {
		return err
	}
	err = withCluster(ctx, filepath.Join(root, "eager"), im, "eager", log, p, func(c *cluster) error {
		for i, s := range o.sizes {
			order := repeat(o.eagerN, o.runs[i])
			runs, err := c.cloneSeries(ctx, p, fmt.Sprintf("[%d MiB eager]", s), s, o.data[i], order)
			if err != nil {
				return fmt.Errorf("%d MiB eager clones: %w", s, err)
			}
			res[s].addEager(runs)
		}
		return nil
	})
	if err != nil {
		return err
	}

	doc := map[string]interface{}{"date": time.Now().UTC().Format(time.RFC3339), "machine": m,
		"hosts": numHosts, "slots_per_host": slotsPerHost, "bench_seconds": int(time.Since(p.start).Seconds()),
		"notes": "clone_ms: parent's host receives clone until the last clone runs (hostd events). " +
			"Each size runs one parent that loads the dataset once and clones runs×len(N) times in turn " +
			"(N = 1,2,4,8 interleaved), joining each ticket before the next. pages_fetched_per_clone and fault_us " +
			"are for N = pages_n: lazyram pages fetched over all hosts / N, and the durations of its page-source " +
			"calls. mcast_*: the lazy series again with multicast on loopback (descriptor and page pushes, " +
			"1500-byte MTU, pushes capped at 100 MiB/s); mcast_pages_fetched_per_clone are the pages still fetched " +
			"by unicast, mcast_pages_received_per_host those that arrived by multicast. cold_boot_ms: N VMs created at once (spread over the hosts) until each console shows LOADED."}
	for _, s := range o.sizes {
		res[s].ratios()
		doc[strconv.Itoa(s)] = res[s]
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(o.out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Fprintln(stdout)
	printTable(stdout, o.sizes, res)
	p.printf("wrote %s", o.out)
	return nil
}

// withCluster runs f on a fresh cluster and always shuts it down.
func withCluster(ctx context.Context, root string, im *image.Image, mode string, log hclog.Logger, p *progress,
	f func(*cluster) error) error {
	c, err := startCluster(ctx, root, im, mode, log)
	defer func() {
		c.shutdown()
		p.printf("%s cluster shut down", mode)
	}()
	if err != nil {
		return fmt.Errorf("%s cluster: %w", mode, err)
	}
	p.printf("%s cluster up: coordinator and %d hosts with %d slots each", mode, numHosts, slotsPerHost)
	return f(c)
}

// repeat is runs copies of ns in turn.
func repeat(ns []int, runs int) []int {
	var out []int
	for range runs {
		out = append(out, ns...)
	}
	return out
}

// cleanupRoot removes the bench's directory, first detaching any mount
// left under it (a lazyram mount of a daemon that failed to unmount).
func cleanupRoot(root string, p *progress) {
	if f, err := os.Open("/proc/mounts"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) > 1 && strings.HasPrefix(fields[1], root+"/") {
				p.printf("warning: %s was still mounted; detaching it", fields[1])
				_ = unix.Unmount(fields[1], unix.MNT_DETACH)
			}
		}
		f.Close()
	}
	if err := os.RemoveAll(root); err != nil {
		p.printf("warning: removing %s: %v", root, err)
	}
}

func machineInfo(ctx context.Context) machine {
	m := machine{Cores: runtime.NumCPU(), Go: runtime.Version()}
	if out, err := exec.CommandContext(ctx, "qemu-system-x86_64", "--version").Output(); err == nil {
		m.QEMU, _, _ = strings.Cut(string(out), "\n")
	}
	acc, why := qemuctl.ProbeAccel(ctx)
	m.Accel, m.AccelReason = string(acc), why
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}
