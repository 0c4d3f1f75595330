// Command coord benchmarks the coordinator cluster with real sfcoord
// processes on 127.0.0.1: ticket allocations per second and their latency at
// several client concurrencies, then leader failover (kill -9 the leader,
// time to the first acknowledged write). It checks that no acknowledged
// ticket is lost and no ticket ID is handed out twice, prints a table and
// writes JSON (default bench/results/coord.json).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/bench/internal/stat"
	"github.com/snowflock-go/snowflock/gossip"
	"github.com/snowflock-go/snowflock/internal/cluster"
)

type result struct {
	AllocsPerSec map[string]float64 `json:"allocs_per_sec"`
	P50Ms        map[string]float64 `json:"p50_ms"`
	P99Ms        map[string]float64 `json:"p99_ms"`
	Errors       map[string]int     `json:"errors"`
	Failover     struct {
		MedianMs float64   `json:"median"`
		MaxMs    float64   `json:"max"`
		Runs     int       `json:"runs"`
		AllMs    []float64 `json:"all"`
	} `json:"failover_ms"`
	Duplicates   int    `json:"duplicates"`
	Lost         int    `json:"lost"`
	Acknowledged int    `json:"acknowledged"`
	Duration     string `json:"duration_per_level"`
	Machine      string `json:"machine"`
	Date         string `json:"date"`
}

func main() {
	out := flag.String("out", "bench/results/coord.json", "where to write the JSON results")
	dur := flag.Duration("duration", 5*time.Second, "measuring time per concurrency level")
	kills := flag.Int("kills", 10, "leader kills in the failover test")
	bin := flag.String("bin", "", "sfcoord binary (default: build it)")
	flag.Parse()
	if err := run(*out, *dur, *kills, *bin); err != nil {
		fmt.Fprintln(os.Stderr, "bench-coord:", err)
		os.Exit(1)
	}
}

func run(out string, dur time.Duration, kills int, bin string) error {
	dir, err := os.MkdirTemp("", "sfbench-coord-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if bin == "" {
		bin = filepath.Join(dir, "sfcoord")
		build := exec.Command("go", "build", "-o", bin, "./cmd/sfcoord")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build sfcoord: %w", err)
		}
	}
	c, err := cluster.New(bin, dir, 3, "bench-token", "")
	if err != nil {
		return err
	}
	defer c.Stop()
	if err := c.StartAll(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if _, err := c.Leader(wctx, 3); err != nil {
		return err
	}
	for i := 0; i < 2; i++ {
		a, err := gossip.New(gossip.Config{Name: fmt.Sprintf("host-%d", i+1), BindAddr: "127.0.0.1:0",
			Meta: gossip.Meta{Role: gossip.RoleHost, API: "127.0.0.1:9", Slots: 1 << 20, MemMB: 1 << 20}})
		if err != nil {
			return err
		}
		defer a.Shutdown()
		if _, err := a.Join([]string{c.Agents[0].GossipAddr}); err != nil {
			return err
		}
	}
	cl := c.Client()
	for {
		hs, _, err := cl.Hosts(wctx, nil)
		if err == nil && len(hs) == 2 {
			break
		}
		if wctx.Err() != nil {
			return fmt.Errorf("hosts not registered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	vm, err := cl.CreateVM(ctx, api.VMRequest{Name: "bench-parent", Host: "host-1", MemMB: 256, VCPUs: 1})
	if err != nil {
		return err
	}

	res := result{AllocsPerSec: map[string]float64{}, P50Ms: map[string]float64{}, P99Ms: map[string]float64{},
		Errors: map[string]int{}, Duration: dur.String(), Date: time.Now().UTC().Format(time.RFC3339),
		Machine: fmt.Sprintf("%s/%s, %d CPUs, %s", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version())}
	acked := &ackSet{ids: map[uint64]int{}}

	fmt.Printf("%-8s %12s %10s %10s %8s\n", "clients", "allocs/s", "p50 ms", "p99 ms", "errors")
	for _, n := range []int{1, 8, 32, 128} {
		rate, p50, p99, errs := load(ctx, c, vm.ID, n, dur, acked)
		key := fmt.Sprint(n)
		res.AllocsPerSec[key], res.P50Ms[key], res.P99Ms[key], res.Errors[key] = rate, p50, p99, errs
		fmt.Printf("%-8d %12.0f %10.2f %10.2f %8d\n", n, rate, p50, p99, errs)
	}

	fmt.Printf("\nfailover: killing the leader %d times\n", kills)
	for k := 0; k < kills; k++ {
		lctx, lcancel := context.WithTimeout(ctx, 60*time.Second)
		leader, err := c.Leader(lctx, 3)
		lcancel()
		if err != nil {
			return err
		}
		wcl := c.Client()
		killed := time.Now()
		c.Kill(leader)
		for {
			t, err := wcl.RequestTicket(ctx, vm.ID, 1)
			if err == nil {
				acked.add(t.ID)
				break
			}
			if ctx.Err() != nil {
				return err
			}
		}
		ms := float64(time.Since(killed).Microseconds()) / 1000
		res.Failover.AllMs = append(res.Failover.AllMs, ms)
		fmt.Printf("  kill %2d: %s killed, write acknowledged after %.0f ms\n", k+1, c.Agents[leader].ID, ms)
		if err := c.Start(leader); err != nil {
			return err
		}
		st, err := wcl.Status(ctx)
		if err != nil {
			return err
		}
		cctx, ccancel := context.WithTimeout(ctx, 60*time.Second)
		err = c.CaughtUp(cctx, st.CommitIndex)
		ccancel()
		if err != nil {
			return err
		}
	}
	sorted := slices.Sorted(slices.Values(res.Failover.AllMs))
	res.Failover.Runs = len(sorted)
	res.Failover.MedianMs = stat.Median(sorted)
	res.Failover.MaxMs = sorted[len(sorted)-1]

	// Every acknowledged ticket must be in the replicated state, once.
	tickets, _, err := cl.Tickets(ctx, 0, nil)
	if err != nil {
		return err
	}
	present := map[uint64]bool{}
	for _, t := range tickets {
		present[t.ID] = true
	}
	for id, n := range acked.ids {
		if n > 1 {
			res.Duplicates += n - 1
		}
		if !present[id] {
			res.Lost++
		}
	}
	res.Acknowledged = len(acked.ids)
	fmt.Printf("\nfailover median %.0f ms, max %.0f ms over %d kills; %d tickets acknowledged, %d lost, %d duplicate IDs\n",
		res.Failover.MedianMs, res.Failover.MaxMs, res.Failover.Runs, res.Acknowledged, res.Lost, res.Duplicates)

	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("wrote", out)
	if res.Lost > 0 || res.Duplicates > 0 {
		return fmt.Errorf("%d lost and %d duplicated tickets", res.Lost, res.Duplicates)
	}
	return nil
}

type ackSet struct {
	mu  sync.Mutex
	ids map[uint64]int
}

func (a *ackSet) add(id uint64) {
	a.mu.Lock()
	a.ids[id]++
	a.mu.Unlock()
}

// load runs n clients allocating one-clone tickets for dur after a short
// warm-up. Client i starts at coordinator i mod 3, so most requests are
// forwarded by a follower, as host traffic would be.
func load(ctx context.Context, c *cluster.Cluster, parent uint64, n int, dur time.Duration, acked *ackSet) (rate, p50, p99 float64, errs int) {
	warm := dur / 5
	start := time.Now()
	measureFrom, end := start.Add(warm), start.Add(warm+dur)
	var mu sync.Mutex
	var lat []float64
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		cl := c.Client((i+0)%3, (i+1)%3, (i+2)%3)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []float64
			myErrs := 0
			for time.Now().Before(end) {
				t0 := time.Now()
				t, err := cl.RequestTicket(ctx, parent, 1)
				if err != nil {
					myErrs++
					continue
				}
				acked.add(t.ID)
				if t0.After(measureFrom) && time.Now().Before(end) {
					mine = append(mine, float64(time.Since(t0).Microseconds())/1000)
				}
			}
			mu.Lock()
			lat = append(lat, mine...)
			errs += myErrs
			mu.Unlock()
		}()
	}
	wg.Wait()
	slices.Sort(lat)
	if len(lat) == 0 {
		return 0, 0, 0, errs
	}
	return float64(len(lat)) / dur.Seconds(), stat.Median(lat), lat[int(float64(len(lat)-1)*0.99)], errs
}
