package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/snowflock-go/snowflock/bench/internal/stat"
)

// sizeResult is everything measured for one VM size; the JSON key is the
// size in MiB.
type sizeResult struct {
	VMMiB      int `json:"vm_mib"`
	DatasetMiB int `json:"dataset_mib"`
	Runs       int `json:"runs"`

	// Medians over every lazy clone operation of this size.
	DescriptorBytes float64 `json:"descriptor_bytes"`
	ParentPauseMS   float64 `json:"parent_pause_ms"`

	// Medians per N, with every run's value under *_all.
	CloneMS       map[string]float64   `json:"clone_ms"`
	CloneMSAll    map[string][]float64 `json:"clone_ms_all"`
	ClonePhasesMS map[string]phaseMS   `json:"clone_phases_ms"`
	CloneJoinMS   map[string]float64   `json:"clone_call_to_join_ms"`
	ColdBootMS    map[string]float64   `json:"cold_boot_ms"`
	ColdBootAll   map[string][]float64 `json:"cold_boot_ms_all"`
	EagerMS       map[string]float64   `json:"eager_ms"`
	EagerMSAll    map[string][]float64 `json:"eager_ms_all"`
	EagerPhasesMS map[string]phaseMS   `json:"eager_phases_ms"`
	EagerJoinMS   map[string]float64   `json:"eager_call_to_join_ms"`

	// The lazy series with multicast (descriptors and page pushes).
	McastMS               map[string]float64   `json:"mcast_clone_ms"`
	McastMSAll            map[string][]float64 `json:"mcast_clone_ms_all"`
	McastPhasesMS         map[string]phaseMS   `json:"mcast_clone_phases_ms"`
	McastJoinMS           map[string]float64   `json:"mcast_call_to_join_ms"`
	McastPagesPerClone    float64              `json:"mcast_pages_fetched_per_clone"`
	McastPagesPerCloneByN map[string]float64   `json:"mcast_pages_fetched_per_clone_by_n"`
	McastReceivedPerHost  map[string]float64   `json:"mcast_pages_received_per_host_by_n"`
	McastDescriptors      map[string]int       `json:"mcast_descriptors_by_way"`

	// Memory on demand, for the clone operations with PagesN clones.
	PagesN               int                `json:"pages_n"`
	PagesFetchedPerClone float64            `json:"pages_fetched_per_clone"`
	ParentTouchedPages   float64            `json:"parent_touched_pages"`
	FetchedOverTouched   float64            `json:"fetched_per_clone_over_touched"`
	FaultUS              faultStats         `json:"fault_us"`
	PagesPerCloneByN     map[string]float64 `json:"pages_fetched_per_clone_by_n"`
	FetchesPerCloneByN   map[string]float64 `json:"fetch_calls_per_clone_by_n"`
	EagerPagesPerHost    float64            `json:"eager_pages_fetched_per_host"`

	DescriptorBytesAll []int     `json:"descriptor_bytes_all"`
	ParentPauseMSAll   []float64 `json:"parent_pause_ms_all"`
	TouchedPagesAll    []uint64  `json:"parent_touched_pages_all"`

	Ratios map[string]float64 `json:"ratios"`
}

// phaseMS splits a clone operation (medians): the capture on the parent's
// host, then the first and the last clone running, all from the call.
type phaseMS struct {
	Capture      float64 `json:"capture"`
	FirstRunning float64 `json:"first_running"`
	LastRunning  float64 `json:"last_running"`
}

// faultStats are the durations of lazyram's page-source calls, each a
// fault's wait (with read-ahead, one call fetches several pages).
type faultStats struct {
	P50     float64 `json:"p50"`
	P99     float64 `json:"p99"`
	Max     float64 `json:"max"`
	Samples int     `json:"samples"`
}

func newSizeResult(vm, data, runs int) *sizeResult {
	return &sizeResult{VMMiB: vm, DatasetMiB: data, Runs: runs, CloneMS: map[string]float64{},
		CloneMSAll: map[string][]float64{}, ClonePhasesMS: map[string]phaseMS{}, ColdBootMS: map[string]float64{},
		ColdBootAll: map[string][]float64{}, EagerMS: map[string]float64{}, EagerMSAll: map[string][]float64{},
		EagerPhasesMS: map[string]phaseMS{}, CloneJoinMS: map[string]float64{}, EagerJoinMS: map[string]float64{},
		PagesPerCloneByN: map[string]float64{}, FetchesPerCloneByN: map[string]float64{},
		Ratios: map[string]float64{}}
}

// addLazy records a lazy clone series.
func (r *sizeResult) addLazy(runs []*ticketRun, pagesN int) {
	var pauses, bytes []float64
	for _, t := range runs {
		pauses = append(pauses, ms(t.Pause))
		bytes = append(bytes, float64(t.DescBytes))
		r.ParentPauseMSAll = append(r.ParentPauseMSAll, ms(t.Pause))
		r.DescriptorBytesAll = append(r.DescriptorBytesAll, t.DescBytes)
		r.TouchedPagesAll = append(r.TouchedPagesAll, t.DataPages)
	}
	r.ParentPauseMS, r.DescriptorBytes = median(pauses), median(bytes)
	r.CloneMS, r.CloneMSAll, r.ClonePhasesMS, r.CloneJoinMS = byN(runs)
	pages, fetches := map[int][]float64{}, map[int][]float64{}
	var touched []float64
	var faults []int64
	for _, t := range runs {
		pages[t.N] = append(pages[t.N], float64(t.PagesFetched)/float64(t.N))
		fetches[t.N] = append(fetches[t.N], float64(t.Fetches)/float64(t.N))
		if t.N == pagesN {
			touched = append(touched, float64(t.DataPages))
			faults = append(faults, t.FetchMicros...)
		}
	}
	for n, v := range pages {
		r.PagesPerCloneByN[strconv.Itoa(n)] = median(v)
		r.FetchesPerCloneByN[strconv.Itoa(n)] = median(fetches[n])
	}
	r.PagesN = pagesN
	r.PagesFetchedPerClone = r.PagesPerCloneByN[strconv.Itoa(pagesN)]
	r.ParentTouchedPages = median(touched)
	if r.ParentTouchedPages > 0 {
		r.FetchedOverTouched = round3(r.PagesFetchedPerClone / r.ParentTouchedPages)
	}
	slices.Sort(faults)
	r.FaultUS = faultStats{P50: stat.Percentile(faults, 50), P99: stat.Percentile(faults, 99), Samples: len(faults)}
	if len(faults) > 0 {
		r.FaultUS.Max = float64(faults[len(faults)-1])
	}
}

// addMcast records the clone series with multicast.
func (r *sizeResult) addMcast(runs []*ticketRun, pagesN int) {
	r.McastMS, r.McastMSAll, r.McastPhasesMS, r.McastJoinMS = byN(runs)
	pages, recv := map[int][]float64{}, map[int][]float64{}
	r.McastPagesPerCloneByN, r.McastReceivedPerHost, r.McastDescriptors = map[string]float64{}, map[string]float64{}, map[string]int{}
	for _, t := range runs {
		pages[t.N] = append(pages[t.N], float64(t.PagesFetched)/float64(t.N))
		recv[t.N] = append(recv[t.N], float64(t.Inserted)/float64(len(t.Hosts)))
		for way, n := range t.Via {
			r.McastDescriptors[way] += n
		}
	}
	for n, v := range pages {
		r.McastPagesPerCloneByN[strconv.Itoa(n)] = median(v)
		r.McastReceivedPerHost[strconv.Itoa(n)] = median(recv[n])
	}
	r.McastPagesPerClone = r.McastPagesPerCloneByN[strconv.Itoa(pagesN)]
}

// addEager records an eager clone series.
func (r *sizeResult) addEager(runs []*ticketRun) {
	r.EagerMS, r.EagerMSAll, r.EagerPhasesMS, r.EagerJoinMS = byN(runs)
	var perHost []float64
	for _, t := range runs {
		perHost = append(perHost, float64(t.PagesFetched)/float64(len(t.Hosts)))
	}
	r.EagerPagesPerHost = median(perHost)
}

// ratios compares clone with cold boot and with itself.
func (r *sizeResult) ratios() {
	div := func(key string, a, b float64) {
		if a > 0 && b > 0 {
			r.Ratios[key] = round3(a / b)
		}
	}
	div("cold_boot_1_over_clone_1", r.ColdBootMS["1"], r.CloneMS["1"])
	div("cold_boot_8_over_clone_8", r.ColdBootMS["8"], r.CloneMS["8"])
	div("clone_8_over_clone_1", r.CloneMS["8"], r.CloneMS["1"])
	div("eager_1_over_clone_1", r.EagerMS["1"], r.CloneMS["1"])
	div("eager_8_over_clone_8", r.EagerMS["8"], r.CloneMS["8"])
	div("mcast_8_over_mcast_1", r.McastMS["8"], r.McastMS["1"])
	div("mcast_1_over_clone_1", r.McastMS["1"], r.CloneMS["1"])
	div("mcast_8_over_clone_8", r.McastMS["8"], r.CloneMS["8"])
	div("mcast_fetched_over_unicast_fetched", r.McastPagesPerClone, r.PagesFetchedPerClone)
}

// byN groups clone operations by N: median clone time, phases and time to
// the join, and the clone times in run order.
func byN(runs []*ticketRun) (med map[string]float64, all map[string][]float64, phases map[string]phaseMS,
	join map[string]float64) {
	all = map[string][]float64{}
	ph := map[string][]phaseMS{}
	joins := map[string][]float64{}
	for _, t := range runs {
		k := strconv.Itoa(t.N)
		all[k] = append(all[k], t.cloneMS())
		ph[k] = append(ph[k], t.phases())
		joins[k] = append(joins[k], t.joinMS())
	}
	med, phases, join = map[string]float64{}, map[string]phaseMS{}, map[string]float64{}
	for k, v := range all {
		med[k] = median(v)
		join[k] = median(joins[k])
		var c, f, l []float64
		for _, p := range ph[k] {
			c, f, l = append(c, p.Capture), append(f, p.FirstRunning), append(l, p.LastRunning)
		}
		phases[k] = phaseMS{Capture: median(c), FirstRunning: median(f), LastRunning: median(l)}
	}
	return med, all, phases, join
}

func median(v []float64) float64 { return round3(stat.Median(v)) }

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

func ms(d time.Duration) float64 { return round3(float64(d.Microseconds()) / 1000) }

// printTable prints the results, one column per VM size.
func printTable(w io.Writer, sizes []int, res map[int]*sizeResult) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	row := func(name string, f func(r *sizeResult) string) {
		cells := []string{name}
		for _, s := range sizes {
			cells = append(cells, f(res[s]))
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t")+"\t")
	}
	num := func(v float64) string {
		if v == 0 {
			return "-"
		}
		if v >= 100 {
			return strconv.FormatFloat(v, 'f', 0, 64)
		}
		return strconv.FormatFloat(v, 'f', 2, 64)
	}
	row("VM size", func(r *sizeResult) string { return fmt.Sprintf("%d MiB", r.VMMiB) })
	row("dataset MiB", func(r *sizeResult) string { return strconv.Itoa(r.DatasetMiB) })
	row("runs per N", func(r *sizeResult) string { return strconv.Itoa(r.Runs) })
	row("descriptor bytes", func(r *sizeResult) string { return num(r.DescriptorBytes) })
	row("parent pause ms", func(r *sizeResult) string { return num(r.ParentPauseMS) })
	for _, n := range []string{"1", "2", "4", "8"} {
		row("clone ms N="+n, func(r *sizeResult) string { return num(r.CloneMS[n]) })
	}
	for _, n := range []string{"1", "2", "4", "8"} {
		row("mcast clone ms N="+n, func(r *sizeResult) string { return num(r.McastMS[n]) })
	}
	for _, n := range []string{"1", "8"} {
		row("eager ms N="+n, func(r *sizeResult) string { return num(r.EagerMS[n]) })
	}
	for _, n := range []string{"1", "8"} {
		row("cold boot ms N="+n, func(r *sizeResult) string { return num(r.ColdBootMS[n]) })
	}
	for _, n := range []string{"1", "2", "4", "8"} {
		row("call to join ms N="+n, func(r *sizeResult) string { return num(r.CloneJoinMS[n]) })
	}
	for _, n := range []string{"1", "8"} {
		row("eager call to join ms N="+n, func(r *sizeResult) string { return num(r.EagerJoinMS[n]) })
	}
	row("pages fetched/clone", func(r *sizeResult) string {
		return fmt.Sprintf("%s (N=%d)", num(r.PagesFetchedPerClone), r.PagesN)
	})
	row("parent touched pages", func(r *sizeResult) string { return num(r.ParentTouchedPages) })
	row("fetched/touched", func(r *sizeResult) string { return num(r.FetchedOverTouched) })
	row("mcast: unicast pages/clone", func(r *sizeResult) string {
		return fmt.Sprintf("%s (N=%d)", num(r.McastPagesPerClone), r.PagesN)
	})
	row("mcast: pushed pages/host N=4", func(r *sizeResult) string { return num(r.McastReceivedPerHost["4"]) })
	for _, n := range []string{"1", "2", "4", "8"} {
		row("mcast call to join ms N="+n, func(r *sizeResult) string { return num(r.McastJoinMS[n]) })
	}
	row("fault us p50/p99", func(r *sizeResult) string { return num(r.FaultUS.P50) + " / " + num(r.FaultUS.P99) })
	row("cold1/clone1", func(r *sizeResult) string { return num(r.Ratios["cold_boot_1_over_clone_1"]) })
	row("cold8/clone8", func(r *sizeResult) string { return num(r.Ratios["cold_boot_8_over_clone_8"]) })
	row("clone8/clone1", func(r *sizeResult) string { return num(r.Ratios["clone_8_over_clone_1"]) })
	row("mcast8/mcast1", func(r *sizeResult) string { return num(r.Ratios["mcast_8_over_mcast_1"]) })
	_ = tw.Flush()
}

// progress prints timestamped lines relative to the start of the bench.
type progress struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
}

func (p *progress) printf(format string, a ...interface{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "[%6.1fs] %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, a...))
}
