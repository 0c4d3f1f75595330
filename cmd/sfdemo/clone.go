package main

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
)

// Dataset of the clone demo: 128 MiB, a quarter per clone.
const (
	datasetMiB = 128
	clones     = 4
)

// cloneWorkload is the parent VM's program. Clone k checksums its quarter
// of /data (a file on the initramfs, i.e. guest memory) and exits with the
// sum; the parent joins, combines the sums in k order, and then does the
// same computation itself without cloning, to compare.
var cloneWorkload = fmt.Sprintf(`sfguest id
sfguest gen-data --size %[1]d --seed 42 /data && echo "DATASET %[1]d MiB loaded into guest memory"
sfguest ticket %[2]d > /tmp/ticket && cat /tmp/ticket
T=$(sed 's/^ticket \([0-9]*\):.*/\1/' /tmp/ticket)
Q=$((%[1]d / %[2]d))
K=$(sfguest clone $T) || { echo CLONE-FAILED; exit 1; }
if [ "$K" != 0 ]; then
  R=$(dd if=/data bs=1M skip=$(((K-1)*Q)) count=$Q 2>/dev/null | sha256sum | cut -c1-64)
  sfguest exit --status 0 --result "k=$K sha256=$R"
  exit 0
fi
echo "CLONED: clone() returned 0 here, 1..%[2]d in the clones"
sfguest join $T > /tmp/join; cat /tmp/join
C=$(grep -o 'k=[0-9]* sha256=[0-9a-f]*' /tmp/join | sort -t= -k2 -n | sed 's/.*sha256=//' | tr -d '\n' | sha256sum | cut -c1-64)
echo "COMBINED-CLONES $C"
L=""; K=1
while [ $K -le %[2]d ]; do L="$L$(dd if=/data bs=1M skip=$(((K-1)*Q)) count=$Q 2>/dev/null | sha256sum | cut -c1-64)"; K=$((K+1)); done
echo "COMBINED-LOCAL $(printf %%s "$L" | sha256sum | cut -c1-64)"`, datasetMiB, clones)

// cloneDemo runs the clone workload and reports what happened and when.
func (d *demo) cloneDemo(ctx context.Context, c *api.Client, token string) error {
	d.say("\n$ sfcoord vm run --mem 512M --cmd <workload>   # the workload, run by the guest's shell:")
	for _, l := range strings.Split(cloneWorkload, "\n") {
		d.say("    %s", l)
	}
	start := time.Now()
	vm, err := c.CreateVM(ctx, api.VMRequest{Name: "dataset", MemMB: 512, VCPUs: 1, Launch: true, Cmd: cloneWorkload})
	if err != nil {
		return err
	}
	d.say("VM %d scheduled on %s; it boots under QEMU, loads the dataset and clones ...", vm.ID, vm.Host)

	// Follow the parent's ticket with blocking queries, noting when each
	// clone is seen running and exited.
	type seen struct{ running, ended time.Duration }
	var (
		active     time.Duration
		ticketID   uint64
		final      fsm.TicketView
		cloneTimes = map[int]*seen{}
		index      uint64
	)
	for final.State != fsm.TicketJoined {
		if time.Since(start) > 8*time.Minute {
			return fmt.Errorf("no joined ticket after 8 minutes")
		}
		if ticketID == 0 {
			ts, meta, err := c.Tickets(ctx, vm.ID, &api.QueryOptions{Index: index, Wait: 5 * time.Second})
			if err != nil {
				return err
			}
			index = meta.Index
			if len(ts) == 0 {
				if v, _, err := c.VM(ctx, vm.ID, nil); err == nil && v.State == fsm.VMEnded {
					return fmt.Errorf("VM %d ended before cloning: %s", vm.ID, v.Reason)
				}
				continue
			}
			ticketID, index = ts[0].ID, 0
		}
		tv, meta, err := c.Ticket(ctx, ticketID, &api.QueryOptions{Index: index, Wait: 5 * time.Second})
		if err != nil {
			return err
		}
		index = meta.Index
		now := time.Since(start)
		if tv.State != fsm.TicketReserved && active == 0 {
			active = now
		}
		for _, cl := range tv.Clones {
			st := cloneTimes[cl.K]
			if st == nil {
				st = &seen{}
				cloneTimes[cl.K] = st
			}
			if cl.State != fsm.ClonePending && st.running == 0 {
				st.running = now
			}
			if cl.State.Terminal() && st.ended == 0 {
				st.ended = now
			}
		}
		if tv.State == fsm.TicketKilled {
			return fmt.Errorf("ticket %d was killed: %s", tv.ID, tv.Reason)
		}
		final = tv
	}
	v, err := d.waitEnded(ctx, c, vm.ID)
	if err != nil {
		return err
	}
	total := time.Since(start)
	console, err := d.console(ctx, vm.Host, vm.ID, token)
	if err != nil {
		return err
	}
	d.say("\n$ sfcoord vm logs %d   (the parent's console)", vm.ID)
	keep := regexp.MustCompile(`^(sfguest: ready|VM |DATASET|ticket |CLONED|Clone|\d+ |COMBINED)`)
	for _, l := range strings.Split(console, "\n") {
		l = strings.TrimPrefix(strings.TrimSpace(l), "Booting from ROM..")
		if keep.MatchString(l) {
			d.say("  %s", l)
		}
	}
	clonesSum := regexp.MustCompile(`(?m)^COMBINED-CLONES ([0-9a-f]{64})`).FindStringSubmatch(console)
	localSum := regexp.MustCompile(`(?m)^COMBINED-LOCAL ([0-9a-f]{64})`).FindStringSubmatch(console)
	if clonesSum == nil || localSum == nil {
		return fmt.Errorf("the parent did not print both results (VM ended: %s)", v.Reason)
	}
	if clonesSum[1] != localSum[1] {
		return fmt.Errorf("the clones' combined result %s differs from the computation without cloning %s", clonesSum[1], localSum[1])
	}
	d.say("Result: the 4 clones' combined checksum equals the same computation done without cloning: %s", clonesSum[1][:16])

	pause, descBytes := d.captureFacts(vm.Host)
	d.say("\nTiming (wall clock seen by the cluster API; times from 'vm run'):")
	tw := tabwriter.NewWriter(d.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Step\tHost\tAt\tSince clone()")
	fmt.Fprintf(tw, "parent booted, loaded %d MiB, called clone(); descriptor registered\t%s\t%.2f s\t0 ms\n", datasetMiB, vm.Host, active.Seconds())
	ks := make([]int, 0, len(final.Clones))
	for _, cl := range final.Clones {
		ks = append(ks, cl.K)
	}
	sort.Ints(ks)
	var lastRunning time.Duration
	for _, k := range ks {
		cl := final.Clones[k-1]
		st := cloneTimes[k]
		lastRunning = max(lastRunning, st.running)
		fmt.Fprintf(tw, "clone %d running (restored, memory on demand)\t%s\t%.2f s\t+%d ms\n", k, cl.Host, st.running.Seconds(),
			(st.running - active).Milliseconds())
	}
	for _, k := range ks {
		cl := final.Clones[k-1]
		st := cloneTimes[k]
		fmt.Fprintf(tw, "clone %d %s (checksummed %d MiB)\t%s\t%.2f s\t+%d ms\n", k, cl.State, datasetMiB/clones, cl.Host,
			st.ended.Seconds(), (st.ended - active).Milliseconds())
	}
	fmt.Fprintf(tw, "parent joined, recomputed without clones, powered off\t%s\t%.2f s\t\n", vm.Host, total.Seconds())
	if err := tw.Flush(); err != nil {
		return err
	}
	hosts := map[string]bool{}
	for _, cl := range final.Clones {
		hosts[cl.Host] = true
	}
	d.say("All %d clones running %d ms after the descriptor was registered, on %d hosts.", len(final.Clones),
		(lastRunning - active).Milliseconds(), len(hosts))
	if pause != "" {
		d.say("The parent was paused %s for the snapshot; its descriptor is %s bytes (device state and page map, no memory).", pause, descBytes)
	}
	d.mcastFacts(ctx, token)
	return nil
}

// mcastFacts reports, from the hosts' metrics, how the descriptor and the
// parent's memory reached the clone hosts.
func (d *demo) mcastFacts(ctx context.Context, token string) {
	var desc, pushed, received, unicast int64
	for _, h := range d.hosts {
		m, err := h.Get(ctx, "/metrics", token)
		if err != nil {
			return
		}
		desc += metric(m, "sf_host_mcast_descriptors_received_total")
		pushed += metric(m, "sf_host_mcast_pages_pushed_total")
		received += metric(m, "sf_host_mcast_pages_received_total")
		unicast += metric(m, `sf_memserver_pages_total{kind="data"}`)
	}
	d.say("Multicast: %d host(s) got the descriptor by multicast; the parent's host pushed %d pages (%d MiB), "+
		"%d arrived at clone hosts; clones fetched %d pages by unicast.", desc, pushed, pushed*4096>>20, received, unicast)
}

// metric is an unlabelled counter's value in a metrics text, or 0.
func metric(text, name string) int64 {
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return 0
}

// captureFacts reads the parent's pause and descriptor size from its
// host's log.
func (d *demo) captureFacts(host string) (pause, descBytes string) {
	for _, h := range d.hosts {
		if h.ID != host {
			continue
		}
		b, err := os.ReadFile(h.LogPath)
		if err != nil {
			return "", ""
		}
		m := regexp.MustCompile(`captured VM: .*pause=(\S+) descriptor_bytes=(\d+)`).FindSubmatch(b)
		if m != nil {
			return string(m[1]), string(m[2])
		}
	}
	return "", ""
}
