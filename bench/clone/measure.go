package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/hostd"
)

// ticketRun is one clone operation as the hosts' events saw it.
type ticketRun struct {
	Ticket     uint64
	N          int
	Descriptor uint64
	Call       time.Time // the parent's host received clone
	Captured   time.Time
	Pause      time.Duration
	DescBytes  int
	DataPages  uint64
	Running    []time.Time    // one per clone, in event order
	Joined     time.Time      // the parent's console showed the join
	Hosts      map[string]int // clones per host
	Failed     []string
	Closed     int // hosts whose source of the descriptor closed
	// Summed over the hosts' sources of the descriptor.
	PagesFetched, Fetches, ZeroPages uint64
	Inserted                         uint64 // pages that came by multicast
	FetchMicros                      []int64
	Via                              map[string]int // how the clones' descriptors came
}

// cloneMS is from the clone call to the last clone running.
func (t *ticketRun) cloneMS() float64 {
	return ms(slices.MaxFunc(t.Running, time.Time.Compare).Sub(t.Call))
}

// phases split cloneMS: capture (call to captured: pause, descriptor,
// memserver registration), until the first clone runs, until the last.
func (t *ticketRun) phases() phaseMS {
	return phaseMS{Capture: ms(t.Captured.Sub(t.Call)), FirstRunning: ms(slices.MinFunc(t.Running, time.Time.Compare).Sub(t.Call)),
		LastRunning: t.cloneMS()}
}

// collect groups events by ticket; source-closed events join by
// descriptor.
func collect(events []hostEvent) map[uint64]*ticketRun {
	runs := map[uint64]*ticketRun{}
	get := func(id uint64) *ticketRun {
		if runs[id] == nil {
			runs[id] = &ticketRun{Ticket: id, Hosts: map[string]int{}, Via: map[string]int{}}
		}
		return runs[id]
	}
	byDesc := map[uint64]*ticketRun{}
	for _, e := range events {
		switch e.Kind {
		case hostd.EventCloneCall:
			get(e.Ticket).Call = e.Time
		case hostd.EventCaptured:
			t := get(e.Ticket)
			t.Captured, t.Pause, t.DescBytes, t.DataPages = e.Time, e.Pause, e.DescriptorBytes, e.DataPages
		case hostd.EventCloneRunning:
			t := get(e.Ticket)
			t.Running = append(t.Running, e.Time)
			t.Hosts[e.Host]++
			t.Via[e.Via]++
			t.Descriptor = e.Descriptor
			byDesc[e.Descriptor] = t
		case hostd.EventCloneFailed:
			t := get(e.Ticket)
			t.Failed = append(t.Failed, fmt.Sprintf("clone %d on %s: %s", e.K, e.Host, e.Err))
		}
	}
	for _, e := range events {
		if e.Kind != hostd.EventSourceClosed || e.Pages == nil || byDesc[e.Descriptor] == nil {
			continue
		}
		t := byDesc[e.Descriptor]
		t.Closed++
		t.PagesFetched += e.Pages.PagesFetched
		t.Fetches += e.Pages.Fetches
		t.ZeroPages += e.Pages.ZeroPages
		t.Inserted += e.Pages.Inserted
		t.FetchMicros = append(t.FetchMicros, e.Pages.FetchMicros...)
	}
	return runs
}

// cloneSeries runs one parent VM on h1 that loads dataMiB into memory and
// then clones once for each N in order (see cloneScript). It checks every
// clone's result against the parent's own sums and returns the clone
// operations in order.
func (c *cluster) cloneSeries(ctx context.Context, p *progress, label string, memMB, dataMiB int, order []int) ([]*ticketRun, error) {
	mark := c.events.len()
	vm, err := c.api.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: int64(memMB), VCPUs: 1, Launch: true,
		Cmd: cloneScript(dataMiB, order)})
	if err != nil {
		return nil, err
	}
	p.printf("%s: parent vm %d on h1 loads %d MiB, then clones %d times (N = %v)", label, vm.ID, dataMiB, len(order), order)
	reported := map[uint64]bool{}
	report := func() { // progress: each ticket once all its clones run
		for id, t := range collect(c.events.since(mark)) {
			if reported[id] || t.Call.IsZero() || len(t.Running) == 0 {
				continue
			}
			if n := ticketSize(ctx, c.api, id); n > 0 && len(t.Running) == n {
				reported[id] = true
				p.printf("%s:   ticket %d: %d clone(s) running %.0f ms after the clone call (pause %.0f ms)",
					label, id, n, t.cloneMS(), ms(t.Pause))
			}
		}
	}
	joined := watchJoins(ctx, c.console("h1", vm.ID))
	limit := time.Duration(len(order))*time.Minute + 5*time.Minute
	ended, err := c.waitEnded(ctx, vm.ID, limit, report)
	joinedAt := joined()
	console, _ := os.ReadFile(c.console("h1", vm.ID))
	if err != nil {
		return nil, fmt.Errorf("%w\nparent console:\n%s", err, tail(string(console), 3000))
	}
	report()
	if n := len(joinedLine.FindAll(console, -1)); n != len(order) {
		return nil, fmt.Errorf("%w: the parent joined %d of %d tickets (%s)\nconsole:\n%s", errVerify, n, len(order),
			ended.Reason, tail(string(console), 3000))
	}
	sums, err := parseSums(string(console))
	if err != nil {
		return nil, fmt.Errorf("%w\nconsole:\n%s", err, tail(string(console), 3000))
	}
	tickets, _, err := c.api.Tickets(ctx, vm.ID, nil)
	if err != nil {
		return nil, err
	}
	if len(tickets) != len(order) {
		return nil, fmt.Errorf("%w: parent has %d tickets, want %d", errVerify, len(tickets), len(order))
	}
	slices.SortFunc(tickets, func(a, b fsm.Ticket) int { return cmp.Compare(a.ID, b.ID) })
	for i, tk := range tickets {
		if err := checkTicket(ctx, c.api, tk.ID, order[i], sums); err != nil {
			return nil, err
		}
	}
	// The clone hosts emit the fetch statistics when the last clone of a
	// descriptor there is gone, a little after the join.
	var out []*ticketRun
	err = waitUntil(ctx, 30*time.Second, "clone hosts to close their sources", func() bool {
		runs := collect(c.events.since(mark))
		out = out[:0]
		for i, tk := range tickets {
			t := runs[tk.ID]
			if t == nil || t.Call.IsZero() || t.Captured.IsZero() || len(t.Running) != order[i] {
				return false
			}
			t.N, t.Joined = order[i], joinedAt[tk.ID]
			out = append(out, t)
		}
		for _, t := range out {
			if t.Closed < len(t.Hosts) {
				return false
			}
		}
		return true
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// joinMS is from the clone call until the parent's join returned: the
// clones' work included.
func (t *ticketRun) joinMS() float64 {
	if t.Joined.IsZero() {
		return 0
	}
	return ms(t.Joined.Sub(t.Call))
}

// watchJoins polls a parent's console every 10 ms for "JOINED N T" lines
// until the returned function is called, which returns when each ticket's
// line was first seen.
func watchJoins(ctx context.Context, path string) func() map[uint64]time.Time {
	seen := map[uint64]time.Time{}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-stop:
				return
			case now := <-tick.C:
				out, _ := os.ReadFile(path)
				for _, m := range joinedLine.FindAllSubmatch(out, -1) {
					if id, err := strconv.ParseUint(string(m[1]), 10, 64); err == nil && seen[id].IsZero() {
						seen[id] = now
					}
				}
			}
		}
	}()
	return func() map[uint64]time.Time {
		close(stop)
		<-done
		return seen
	}
}

// ticketSize is a ticket's granted clones (0 when unknown).
func ticketSize(ctx context.Context, c *api.Client, id uint64) int {
	t, _, err := c.Ticket(ctx, id, nil)
	if err != nil {
		return 0
	}
	return t.Granted
}

// checkTicket checks that a ticket granted n clones, was joined, and that
// every clone exited with status 0 and the sums of its chunks.
func checkTicket(ctx context.Context, c *api.Client, id uint64, n int, sums []string) error {
	t, _, err := c.Ticket(ctx, id, nil)
	if err != nil {
		return err
	}
	if t.State != fsm.TicketJoined || t.Granted != n || len(t.Clones) != n {
		return fmt.Errorf("%w: ticket %d is %s with %d of %d clones granted", errVerify, id, t.State, t.Granted, n)
	}
	for _, cl := range t.Clones {
		want := wantResult(sums, cl.K, n)
		if cl.State != fsm.CloneExited || cl.Status != 0 || strings.TrimSpace(cl.Result) != want {
			return fmt.Errorf("%w: ticket %d clone %d on %s: %s, status %d, result %q; want exited, 0, %q (%s)",
				errVerify, id, cl.K, cl.Host, cl.State, cl.Status, cl.Result, want, cl.Reason)
		}
	}
	return nil
}

// coldBoot starts n VMs at once, spread over the hosts, each loading the
// dataset, and returns the time from the first CreateVM call until every
// console shows the loaded marker, and each VM's own time. It then waits
// for the VMs to power off.
func (c *cluster) coldBoot(ctx context.Context, memMB, dataMiB, n int) (time.Duration, []float64, error) {
	type booted struct {
		vm  fsm.VM
		err error
	}
	vms := make([]booted, n)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range vms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			host := fmt.Sprintf("h%d", i%numHosts+1)
			vms[i].vm, vms[i].err = c.api.CreateVM(ctx, api.VMRequest{Name: fmt.Sprintf("cold-%d", i), Host: host,
				MemMB: int64(memMB), VCPUs: 1, Launch: true, Cmd: coldScript(dataMiB)})
		}()
	}
	wg.Wait()
	defer func() { // every VM powers off by itself after the marker
		for _, b := range vms {
			if b.err == nil {
				if _, err := c.waitEnded(ctx, b.vm.ID, 2*time.Minute, nil); err != nil {
					c.log.Warn("cold-booted VM did not end", "vm", b.vm.ID, "error", err)
				}
			}
		}
	}()
	for _, b := range vms {
		if b.err != nil {
			return 0, nil, b.err
		}
	}
	each := make([]float64, n)
	left := n
	deadline := start.Add(10 * time.Minute)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for left > 0 {
		select {
		case <-ctx.Done():
			return 0, nil, context.Cause(ctx)
		case now := <-tick.C:
			if now.After(deadline) {
				return 0, nil, fmt.Errorf("%d of %d VMs did not load the dataset within 10 minutes", left, n)
			}
		}
		for i, b := range vms {
			if each[i] != 0 {
				continue
			}
			out, err := os.ReadFile(c.console(b.vm.Host, b.vm.ID))
			if err != nil {
				continue // not created yet
			}
			if loadedLine.Match(out) {
				each[i] = ms(time.Since(start))
				left--
			} else if failedLine.Match(out) {
				return 0, nil, fmt.Errorf("cold-booted vm %d failed:\n%s", b.vm.ID, tail(string(out), 2000))
			}
		}
	}
	return time.Duration(slices.Max(each) * float64(time.Millisecond)), each, nil
}
