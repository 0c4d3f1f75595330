// Command xen benchmarks SnowFlock cloning on real Xen against the
// standard way to copy a running domain to other hosts, in one run on
// three Xen 4.17 hosts nested in QEMU TCG (internal/xenbed):
//
//   - clone: a 128 MiB PVH parent on x1 holding a dataset clones to N = 1
//     and 2 hosts (x2, x3): from the clone call (x1's log) to the last
//     clone running (measured on each clone host from the moment it saw
//     its assignment, so that no two hosts' clocks are compared). Wire
//     bytes: what x1's memserver and multicast sessions sent for that
//     clone operation (sampled between operations, which the parent
//     spaces out).
//   - baseline: `xl save -c` of an equal parent on x1, the image copied to
//     each of N hosts over the bed's network (nc), `xl restore` there, in
//     parallel per host. Wire bytes: the image times N.
//
// Results go to bench/results/xen.json.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/bench/internal/stat"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/internal/cluster"
	"github.com/snowflock-go/snowflock/internal/xenbed"
	"github.com/snowflock-go/snowflock/internal/xencluster"
)

type result struct {
	Date          string               `json:"date"`
	Machine       string               `json:"machine"`
	GuestMiB      int                  `json:"guest_mib"`
	DatasetMB     int                  `json:"dataset_mb"`
	MTU           int                  `json:"mtu"`
	McastMTU      int                  `json:"mcast_mtu"`
	Runs          int                  `json:"runs"`
	CloneMS       map[string]float64   `json:"clone_ms"`
	CloneMSAll    map[string][]float64 `json:"clone_ms_all"`
	BaselineMS    map[string]float64   `json:"save_copy_restore_ms"`
	BaselineAll   map[string][]float64 `json:"save_copy_restore_ms_all"`
	WireBytes     map[string]float64   `json:"wire_bytes"`
	CloneWireByN  map[string]float64   `json:"clone_wire_bytes_by_n"`
	CloneWireAll  map[string][]sent    `json:"clone_wire_bytes_all"`
	BaselineWire  map[string]float64   `json:"baseline_wire_bytes_by_n"`
	ImageBytes    int64                `json:"image_bytes"`
	CapturePause  []float64            `json:"capture_pause_ms_all"`
	BaselinePhase map[string][]string  `json:"baseline_phases"`
	Notes         string               `json:"notes"`
	Seconds       float64              `json:"bench_seconds"`
}

func main() {
	out := flag.String("out", "bench/results/xen.json", "where to write the JSON results")
	runs := flag.Int("runs", 1, "runs per N (medians are reported)")
	dataMB := flag.Int("data", 48, "MB of data the parent holds in memory")
	mtu := flag.Int("mtu", 1500, "MTU of the bed network (and of the multicast sessions): 1500, or 9000 for jumbo frames")
	mcastMTU := flag.Int("mcast-mtu", 0, "the hosts' --mcast-mtu (0: the bed's MTU); above it, the kernel fragments each multicast datagram")
	flag.Parse()
	if *mcastMTU == 0 {
		*mcastMTU = *mtu
	}
	if err := run(*out, *runs, *dataMB, *mtu, *mcastMTU); err != nil {
		fmt.Fprintln(os.Stderr, "bench-xen:", err)
		os.Exit(1)
	}
}

func run(out string, runs, dataMB, mtu, mcastMTU int) error {
	begin := time.Now()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 60*time.Minute)
	defer cancel()
	log := hclog.New(&hclog.LoggerOptions{Name: "bench-xen", Level: hclog.Info, Output: os.Stderr})
	bin, err := cluster.Prepare()
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin)
	im, err := image.Build(ctx, image.Options{SFGuest: filepath.Join(bin, "sfguest"), Logger: log.Named("image")})
	if err != nil {
		return err
	}
	bed, err := xenbed.Start(ctx, xenbed.Options{Hosts: 3, Logger: log, Files: xencluster.Files(bin, im), MTU: mtu})
	if err != nil {
		return err
	}
	defer bed.Close()
	c, err := xencluster.Start(ctx, bed, xencluster.Options{Slots: []int{0, 1, 1}, McastMTU: mcastMTU})
	if err != nil {
		return fmt.Errorf("%w\n%s", err, xencluster.Logs(ctx, bed))
	}
	res := result{Date: time.Now().UTC().Format(time.RFC3339), GuestMiB: 128, DatasetMB: dataMB, MTU: mtu, McastMTU: mcastMTU, Runs: runs,
		Machine: fmt.Sprintf("%s/%s, %d CPUs, 3 Xen 4.17 hosts nested in QEMU TCG (1 vCPU, 1 GiB dom0 each)", runtime.GOOS, runtime.GOARCH, runtime.NumCPU()),
		CloneMS: map[string]float64{}, CloneMSAll: map[string][]float64{}, BaselineMS: map[string]float64{},
		BaselineAll: map[string][]float64{}, WireBytes: map[string]float64{}, CloneWireByN: map[string]float64{},
		CloneWireAll: map[string][]sent{},
		BaselineWire: map[string]float64{}, BaselinePhase: map[string][]string{}}

	// Clones: one parent clones runs times to 1 host, then to 2, in turn.
	order := []int{}
	for range runs {
		order = append(order, 1, 2)
	}
	var script strings.Builder
	fmt.Fprintf(&script, "head -c %d /dev/urandom > /tmp/data; echo LOADED\n", dataMB*1000000)
	for _, n := range order {
		fmt.Fprintf(&script, `T=$(sfguest ticket %d | sed 's/^ticket \([0-9]*\):.*/\1/')
K=$(sfguest clone $T) || exit 1
if [ "$K" != 0 ]; then sfguest exit --status $K; exit 0; fi
sfguest join $T >/dev/null; echo "JOINED %d"; sleep 8
`, n, n)
	}
	marks := []sent{sentBytes(ctx, bed.Hosts[0])}
	vm, err := c.RunVM(ctx, 0, 128, script.String())
	if err != nil {
		return err
	}
	// x1's counters after each join: the parent sleeps 8 s after each, so
	// each sample falls between two clone operations.
	joined := regexp.MustCompile(`(?m)^JOINED \d`)
	err = c.WaitFor(ctx, 30*time.Minute, "every clone operation joined", func() (bool, error) {
		n := len(joined.FindAllString(c.Console(ctx, 0, vm.ID), -1))
		if n > len(marks) {
			return false, fmt.Errorf("%d joins between two samples of x1's counters", n-len(marks)+1)
		}
		if n == len(marks) {
			marks = append(marks, sentBytes(ctx, bed.Hosts[0]))
		}
		if len(marks) == len(order)+1 {
			return true, nil
		}
		if v, err := c.VM(ctx, vm.ID); err == nil && v.State == fsm.VMEnded {
			return false, fmt.Errorf("the parent ended after %d of %d clone operations: %s", len(marks)-1, len(order), v.Reason)
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("%w\n%s", err, c.Logs(ctx))
	}
	if vm, err = c.WaitEnded(ctx, vm.ID, 5*time.Minute); err != nil {
		return fmt.Errorf("%w\n%s", err, c.Logs(ctx))
	}
	console := c.Console(ctx, 0, vm.ID)
	if len(regexp.MustCompile(`(?m)^JOINED \d`).FindAllString(console, -1)) != len(order) {
		return fmt.Errorf("the parent did not finish its clones (%s):\n%s\n%s", vm.Reason, console, c.Logs(ctx))
	}
	calls, pauses, err := cloneCalls(ctx, c)
	if err != nil {
		return err
	}
	running, err := cloneRunning(ctx, c)
	if err != nil {
		return err
	}
	// How the multicast sessions went, from every host's log.
	for i := range c.Bed.Hosts {
		log, _ := c.HostLog(ctx, i)
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, "multicast session done") || strings.Contains(l, "multicast session left") ||
				strings.Contains(l, "waited for the multicast push") || strings.Contains(l, "fetched eagerly") {
				fmt.Printf("x%d: %s\n", i+1, l)
			}
		}
	}
	if len(calls) != len(order) {
		return fmt.Errorf("%d clone calls in x1's log, want %d", len(calls), len(order))
	}
	res.CapturePause = pauses
	for i, n := range order {
		ticket := calls[i].ticket
		afters := running[ticket]
		if len(afters) != n {
			ts, _ := c.Tickets(ctx)
			return fmt.Errorf("ticket %d: %d clones running in the logs, want %d; tickets %+v\n%s", ticket, len(afters), n, ts, c.Logs(ctx))
		}
		ms := calls[i].toStarted + slices.Max(afters)
		k := strconv.Itoa(n)
		res.CloneMSAll[k] = append(res.CloneMSAll[k], ms)
		wire := sent{Memserver: marks[i+1].Memserver - marks[i].Memserver, Mcast: marks[i+1].Mcast - marks[i].Mcast}
		res.CloneWireAll[k] = append(res.CloneWireAll[k], wire)
		fmt.Printf("clone N=%d (ticket %d): %.0f ms (capture and registration %.0f ms, restore on the clone hosts %v ms); "+
			"x1 sent %.1f MB by memserver, %.1f MB by multicast\n",
			n, ticket, ms, calls[i].toStarted, afters, float64(wire.Memserver)/1e6, float64(wire.Mcast)/1e6)
	}

	// Baseline: an equal parent, saved, copied and restored.
	idle, err := c.RunVM(ctx, 0, 128, fmt.Sprintf("head -c %d /dev/urandom > /tmp/data; echo LOADED; sleep 100000", dataMB*1000000))
	if err != nil {
		return err
	}
	if err := c.WaitFor(ctx, 5*time.Minute, "the baseline parent loaded", func() (bool, error) {
		return strings.Contains(c.Console(ctx, 0, idle.ID), "LOADED"), nil
	}); err != nil {
		return err
	}
	name := fmt.Sprintf("vm-%d", idle.ID)
	for _, n := range order {
		ms, size, phases, err := baseline(ctx, bed, name, n)
		if err != nil {
			return fmt.Errorf("baseline to %d hosts: %w", n, err)
		}
		k := strconv.Itoa(n)
		res.ImageBytes = size
		res.BaselineAll[k] = append(res.BaselineAll[k], ms)
		res.BaselinePhase[k] = append(res.BaselinePhase[k], phases)
		fmt.Printf("save+copy+restore N=%d: %.0f ms (%s)\n", n, ms, phases)
	}
	for _, k := range []string{"1", "2"} {
		res.CloneMS[k] = stat.Median(res.CloneMSAll[k])
		res.BaselineMS[k] = stat.Median(res.BaselineAll[k])
		n, _ := strconv.Atoi(k)
		var totals []float64
		for _, w := range res.CloneWireAll[k] {
			totals = append(totals, float64(w.Memserver+w.Mcast))
		}
		res.CloneWireByN[k] = stat.Median(totals)
		res.BaselineWire[k] = float64(res.ImageBytes) * float64(n)
	}
	res.WireBytes["clone"] = res.CloneWireByN["1"]
	res.WireBytes["baseline"] = res.BaselineWire["1"]
	res.Notes = "Nested Xen under QEMU TCG on a 2-core machine: absolute times are those of emulated hosts and only the ratios " +
		"within this run mean much. clone_ms = x1's time from the clone call to the descriptor registered (capture with xl save -c, " +
		"split, memserver registration, raft) + the slowest clone host's time from seeing its assignment to the clone running " +
		"(all pages local first: stock Xen cannot fault pages in lazily; one clone host fetches them from the memserver while multicast " +
		"brings them from the other end, two or more take them from one multicast and fetch only what it missed; " +
		"xl restore of the rebuilt image). Clone wire bytes: what x1's memserver and multicast sessions sent for the operation, all N hosts together " +
		"(descriptor by multicast; zero pages never sent). Baseline: xl save -c to dom0's tmpfs, the image copied with nc to each " +
		"host in parallel, xl restore there in parallel; wire bytes the image size times N."
	res.Seconds = time.Since(begin).Seconds()
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("\nN  clone ms  save+copy+restore ms  clone wire MB  baseline wire MB\n")
	for _, k := range []string{"1", "2"} {
		fmt.Printf("%s  %8.0f  %20.0f  %13.1f  %16.1f\n", k, res.CloneMS[k], res.BaselineMS[k], res.CloneWireByN[k]/1e6, res.BaselineWire[k]/1e6)
	}
	fmt.Println("wrote", out)
	return nil
}

// sent is what x1's memserver and multicast sessions have sent, in bytes.
type sent struct {
	Memserver int64 `json:"memserver"`
	Mcast     int64 `json:"mcast"`
}

// sentBytes reads x1's counters from its /metrics.
func sentBytes(ctx context.Context, h *xenbed.Host) sent {
	out, err := h.Run(ctx, "sh", "-c", fmt.Sprintf("printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' | nc %s 7500", h.IP()))
	if err != nil {
		return sent{}
	}
	read := func(name string) int64 {
		m := regexp.MustCompile(`(?m)^` + name + ` (\d+)`).FindStringSubmatch(out)
		if m == nil {
			return 0
		}
		n, _ := strconv.ParseInt(m[1], 10, 64)
		return n
	}
	return sent{Memserver: read("sf_memserver_sent_bytes_total"), Mcast: read("sf_host_mcast_bytes_sent_total")}
}

type call struct {
	ticket    uint64
	toStarted float64 // ms from the clone call to the descriptor registered
}

var logTime = regexp.MustCompile(`^(\S+Z) `)

func stamp(line string) (time.Time, bool) {
	m := logTime.FindStringSubmatch(line)
	if m == nil {
		return time.Time{}, false
	}
	t, err := time.Parse("2006-01-02T15:04:05.000Z", m[1])
	return t, err == nil
}

// cloneCalls reads x1's log: each clone call and when its clone started.
func cloneCalls(ctx context.Context, c *xencluster.Cluster) ([]call, []float64, error) {
	log, err := c.HostLog(ctx, 0)
	if err != nil {
		return nil, nil, err
	}
	callRE := regexp.MustCompile(`clone call: .*ticket=(\d+)`)
	startRE := regexp.MustCompile(`clone started: .*ticket=(\d+) `)
	pauseRE := regexp.MustCompile(`captured VM: .*pause=(\S+)`)
	at := map[uint64]time.Time{}
	var out []call
	var pauses []float64
	for _, l := range strings.Split(log, "\n") {
		t, ok := stamp(l)
		if !ok {
			continue
		}
		if m := callRE.FindStringSubmatch(l); m != nil {
			id, _ := strconv.ParseUint(m[1], 10, 64)
			at[id] = t
		}
		if m := pauseRE.FindStringSubmatch(l); m != nil {
			if d, err := time.ParseDuration(m[1]); err == nil {
				pauses = append(pauses, float64(d.Microseconds())/1000)
			}
		}
		if m := startRE.FindStringSubmatch(l); m != nil {
			id, _ := strconv.ParseUint(m[1], 10, 64)
			if t0, ok := at[id]; ok {
				out = append(out, call{ticket: id, toStarted: float64(t.Sub(t0).Microseconds()) / 1000})
			}
		}
	}
	return out, pauses, nil
}

// cloneRunning reads the clone hosts' logs: per ticket, each clone's time
// from its assignment to running.
func cloneRunning(ctx context.Context, c *xencluster.Cluster) (map[uint64][]float64, error) {
	re := regexp.MustCompile(`clone running: .*after=(\S+) .*ticket=(\d+)|clone running: .*ticket=(\d+) .*after=(\S+)`)
	out := map[uint64][]float64{}
	for i := 1; i < len(c.Bed.Hosts); i++ {
		log, err := c.HostLog(ctx, i)
		if err != nil {
			return nil, err
		}
		for _, l := range strings.Split(log, "\n") {
			m := re.FindStringSubmatch(l)
			if m == nil {
				continue
			}
			after, ticket := m[1], m[2]
			if after == "" {
				after, ticket = m[4], m[3]
			}
			d, err1 := time.ParseDuration(after)
			id, err2 := strconv.ParseUint(ticket, 10, 64)
			if err1 == nil && err2 == nil {
				out[id] = append(out[id], float64(d.Microseconds())/1000)
			}
		}
	}
	return out, nil
}

// baseline saves the running domain name on x1 (xl save -c), copies the
// image to n hosts with nc in parallel, and restores it on each in
// parallel; it destroys the restored domains afterwards.
func baseline(ctx context.Context, bed *xenbed.Bed, name string, n int) (float64, int64, string, error) {
	h1 := bed.Hosts[0]
	img := "/dev/shm/baseline.img"
	_, _ = h1.Run(ctx, "rm", "-f", img)
	start := time.Now()
	if out, err := h1.Run(ctx, "xl", "save", "-c", name, img); err != nil {
		return 0, 0, "", fmt.Errorf("xl save: %w %s", err, out)
	}
	saved := time.Since(start)
	sz, err := h1.Run(ctx, "stat", "-c", "%s", img)
	if err != nil {
		return 0, 0, "", err
	}
	size, _ := strconv.ParseInt(strings.TrimSpace(sz), 10, 64)
	targets := bed.Hosts[1 : 1+n]
	var wg sync.WaitGroup
	errs := make([]error, n)
	copyTook := make([]time.Duration, n)
	restoreTook := make([]time.Duration, n)
	for i, h := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			port := 9100 + i
			t := time.Now()
			// The receiver listens, the sender connects once it does.
			recv := make(chan error, 1)
			go func() {
				// busybox nc ends on its stdin's end, half-closing the
				// connection, at which the sender stops: hold its stdin
				// open with a fifo until the sender has finished.
				out, err := h.Run(ctx, "sh", "-c", fmt.Sprintf(
					"rm -f %[1]s /tmp/ncin; mkfifo /tmp/ncin; sleep 3600 > /tmp/ncin & S=$!; nc -l -p %[2]d < /tmp/ncin > %[1]s; kill $S; rm -f /tmp/ncin",
					img, port))
				if err != nil {
					err = fmt.Errorf("%w %s", err, out)
				}
				recv <- err
			}()
			var sendErr error
			for try := 0; try < 50; try++ {
				if _, sendErr = h1.Run(ctx, "sh", "-c", fmt.Sprintf("nc %s %d < %s", h.IP(), port, img)); sendErr == nil {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			if err := <-recv; err != nil || sendErr != nil {
				errs[i] = fmt.Errorf("copy to %s: %v %v", h.IP(), err, sendErr)
				return
			}
			copyTook[i] = time.Since(t)
			if got, err := h.Run(ctx, "stat", "-c", "%s", img); err != nil || strings.TrimSpace(got) != strings.TrimSpace(sz) {
				errs[i] = fmt.Errorf("copy to %s: %q bytes arrived of %s (%v)", h.IP(), strings.TrimSpace(got), strings.TrimSpace(sz), err)
				return
			}
			t = time.Now()
			if out, err := h.Run(ctx, "xl", "restore", img); err != nil {
				errs[i] = fmt.Errorf("xl restore on %s: %w %s", h.IP(), err, out)
				return
			}
			restoreTook[i] = time.Since(t)
		}()
	}
	wg.Wait()
	took := time.Since(start)
	for _, h := range targets {
		_, _ = h.Run(ctx, "xl", "destroy", name)
		_, _ = h.Run(ctx, "rm", "-f", img)
	}
	if err := errors.Join(errs...); err != nil {
		return 0, 0, "", err
	}
	phases := fmt.Sprintf("save %v, copy %v, restore %v", saved.Round(time.Millisecond), copyTook, restoreTook)
	return float64(took.Microseconds()) / 1000, size, phases, nil
}
