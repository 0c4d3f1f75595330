// Command mcast benchmarks acknowledged multicast against unicast: it
// delivers one object (256 MiB by default) to N = 1, 2, 4, 8 members in a
// test bed (one network namespace per member, on a bridge; the sender in
// the root namespace on the bridge), once by mcast and once by N parallel
// TCP transfers, and runs mcast again with 1% loss injected at every
// member. Every member's copy is checked against the object's SHA-256. It
// writes JSON (default bench/results/mcast.json) and prints a table.
// Needs root.
package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/bench/internal/stat"
	"github.com/snowflock-go/snowflock/internal/testbed"
	"github.com/snowflock-go/snowflock/mcast"
)

type result struct {
	ObjectMiB     int                  `json:"object_mib"`
	Runs          int                  `json:"runs"`
	McastMs       map[string]float64   `json:"mcast_ms"`
	McastMsAll    map[string][]float64 `json:"mcast_ms_all"`
	McastMBps     map[string]float64   `json:"mcast_mb_per_s"`
	McastWire     map[string]float64   `json:"mcast_wire_bytes_per_payload"`
	UnicastMs     map[string]float64   `json:"unicast_ms"`
	UnicastMsAll  map[string][]float64 `json:"unicast_ms_all"`
	UnicastMBps   map[string]float64   `json:"unicast_mb_per_s"`
	UnicastWire   map[string]float64   `json:"unicast_wire_bytes_per_payload"`
	T8OverT1      float64              `json:"mcast_t8_over_t1"`
	JumboMTU      int                  `json:"jumbo_mtu"`
	JumboMs       map[string]float64   `json:"mcast_jumbo_ms"`
	JumboMsAll    map[string][]float64 `json:"mcast_jumbo_ms_all"`
	JumboT8OverT1 float64              `json:"jumbo_t8_over_t1"`
	LossN         int                  `json:"loss1pct_members"`
	LossExtra     float64              `json:"loss1pct_extra_bytes_ratio"`
	LossExtraByN  map[string]float64   `json:"loss1pct_extra_bytes_ratio_by_n"`
	LossMsByN     map[string]float64   `json:"loss1pct_ms_by_n"`
	LossRepairs   map[string]uint64    `json:"loss1pct_repair_packets_by_n"`
	LossParity    map[string]uint64    `json:"loss1pct_parity_packets_by_n"`
	LossUsed      map[string]uint64    `json:"loss1pct_parity_used_by_n"`
	LossAllDone   bool                 `json:"loss1pct_all_completed"`
	AllChecksums  bool                 `json:"all_checksums_ok"`
	Notes         string               `json:"notes"`
	Machine       string               `json:"machine"`
	Date          string               `json:"date"`
	TotalSeconds  float64              `json:"total_seconds"`
}

func main() {
	out := flag.String("out", "bench/results/mcast.json", "where to write the JSON results")
	size := flag.Int("size", 256, "object size, MiB")
	runs := flag.Int("runs", 3, "runs per N (medians are reported)")
	ns := flag.String("n", "1,2,4,8", "member counts")
	lossN := flag.Int("loss-n", 8, "member count of the headline 1% loss figure")
	jumbo := flag.Int("jumbo-mtu", 9000, "MTU of the jumbo-frame series (0: none)")
	profile := flag.String("cpuprofile", "", "write a CPU profile of the whole run (sender and members) to this file")
	flag.Parse()
	if *profile != "" {
		f, err := os.Create(*profile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench-mcast:", err)
			os.Exit(1)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	if err := run(*out, *size, *runs, *ns, *lossN, *jumbo); err != nil {
		fmt.Fprintln(os.Stderr, "bench-mcast:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(out string, sizeMiB, runs int, nList string, lossN, jumboMTU int) error {
	start := time.Now()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, unix.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	var counts []int
	for _, f := range strings.Split(nList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("bad member count %q", f)
		}
		counts = append(counts, n)
	}
	maxN := slices.Max(append(slices.Clone(counts), lossN))
	bed, err := testbed.New(ctx, maxN)
	if err != nil {
		return err
	}
	defer bed.Close()

	data := make([]byte, sizeMiB<<20)
	rng := mrand.New(mrand.NewPCG(1, 2))
	for i := 0; i+8 <= len(data); i += 8 {
		binary.LittleEndian.PutUint64(data[i:], rng.Uint64())
	}
	sum := sha256.Sum256(data)
	b := &bench{bed: bed, data: data, sum: sum}

	res := result{ObjectMiB: sizeMiB, Runs: runs, AllChecksums: true, LossAllDone: true, LossN: lossN,
		McastMs: map[string]float64{}, McastMsAll: map[string][]float64{}, McastMBps: map[string]float64{}, McastWire: map[string]float64{},
		UnicastMs: map[string]float64{}, UnicastMsAll: map[string][]float64{}, UnicastMBps: map[string]float64{}, UnicastWire: map[string]float64{},
		JumboMs: map[string]float64{}, JumboMsAll: map[string][]float64{}, JumboMTU: jumboMTU,
		LossExtraByN: map[string]float64{}, LossMsByN: map[string]float64{}, LossRepairs: map[string]uint64{}, LossParity: map[string]uint64{}, LossUsed: map[string]uint64{},
		Machine: fmt.Sprintf("%s/%s, %d CPUs, %s", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version()),
		Date:    time.Now().UTC().Format(time.RFC3339)}
	lossless := map[int]float64{} // median wire bytes without loss, per N
	for _, n := range counts {
		k := strconv.Itoa(n)
		var wires []float64
		for i := range runs {
			m, err := b.mcastOnce(ctx, n, 0, uint64(i))
			if err != nil {
				return fmt.Errorf("mcast to %d, run %d: %w", n, i+1, err)
			}
			res.AllChecksums = res.AllChecksums && m.checksumsOK
			res.McastMsAll[k] = append(res.McastMsAll[k], m.ms)
			wires = append(wires, m.wireBytes)
			fmt.Printf("  mcast   N=%d run %d: %8.0f ms  wire/payload %.4f  repairs %d\n", n, i+1, m.ms, m.wireBytes/float64(len(data)), m.repairs)
			u, err := b.unicastOnce(ctx, n)
			if err != nil {
				return fmt.Errorf("unicast to %d, run %d: %w", n, i+1, err)
			}
			res.AllChecksums = res.AllChecksums && u.checksumsOK
			res.UnicastMsAll[k] = append(res.UnicastMsAll[k], u.ms)
			fmt.Printf("  unicast N=%d run %d: %8.0f ms\n", n, i+1, u.ms)
		}
		res.McastMs[k] = stat.Median(res.McastMsAll[k])
		res.UnicastMs[k] = stat.Median(res.UnicastMsAll[k])
		lossless[n] = stat.Median(wires)
		res.McastWire[k] = lossless[n] / float64(len(data))
		res.McastMBps[k] = float64(len(data)) / 1e6 / (res.McastMs[k] / 1000)
		res.UnicastMBps[k] = float64(n*len(data)) / 1e6 / (res.UnicastMs[k] / 1000)
		// TCP/IPv4 headers of full 1500-byte segments, without ACKs.
		res.UnicastWire[k] = float64(n) * 1500 / 1448
	}
	for _, n := range counts {
		k := strconv.Itoa(n)
		m, err := b.mcastOnce(ctx, n, 0.01, 100)
		if err != nil {
			return fmt.Errorf("mcast to %d with 1%% loss: %w", n, err)
		}
		res.AllChecksums = res.AllChecksums && m.checksumsOK
		res.LossAllDone = res.LossAllDone && m.completed == n
		res.LossExtraByN[k] = m.wireBytes/lossless[n] - 1
		res.LossMsByN[k] = m.ms
		res.LossRepairs[k] = m.repairs
		res.LossParity[k] = m.parity
		res.LossUsed[k] = m.parityUsed
		if n == lossN {
			res.LossExtra = res.LossExtraByN[k]
		}
		fmt.Printf("  mcast   N=%d 1%% loss: %8.0f ms  extra bytes %.2f%%  repairs %d  parity %d (used by members %d)\n", n, m.ms, 100*res.LossExtraByN[k], m.repairs, m.parity, m.parityUsed)
	}
	if t1, t8 := res.McastMs["1"], res.McastMs["8"]; t1 > 0 && t8 > 0 {
		res.T8OverT1 = t8 / t1
	}
	if jumboMTU > 0 {
		// The same transfers over a bed whose bridge and veths carry jumbo
		// frames: a sixth of the packets, so a sixth of the per-packet work
		// every member does.
		jbed, err := testbed.New(ctx, slices.Max(counts), testbed.WithMTU(jumboMTU))
		if err != nil {
			return err
		}
		defer jbed.Close()
		jb := &bench{bed: jbed, data: data, sum: sum, mtu: jumboMTU}
		for _, n := range counts {
			k := strconv.Itoa(n)
			for i := range runs {
				m, err := jb.mcastOnce(ctx, n, 0, uint64(i))
				if err != nil {
					return fmt.Errorf("jumbo mcast to %d, run %d: %w", n, i+1, err)
				}
				res.AllChecksums = res.AllChecksums && m.checksumsOK
				res.JumboMsAll[k] = append(res.JumboMsAll[k], m.ms)
				fmt.Printf("  mcast   N=%d MTU %d run %d: %8.0f ms  wire/payload %.4f\n", n, jumboMTU, i+1, m.ms, m.wireBytes/float64(len(data)))
			}
			res.JumboMs[k] = stat.Median(res.JumboMsAll[k])
		}
		if t1, t8 := res.JumboMs["1"], res.JumboMs["8"]; t1 > 0 && t8 > 0 {
			res.JumboT8OverT1 = t8 / t1
		}
	}
	res.Notes = "one machine: sender, N members and the kernel's bridge share " + strconv.Itoa(runtime.NumCPU()) +
		" CPUs, so mcast time grows with N from CPU (each member decrypts every packet), not from the network. " +
		"mcast is AES-256-GCM sealed; the TCP unicast baseline is plaintext. Extra bytes at 1% loss compare the wire bytes " +
		"(UDP payload + 28 per packet) of a run with 1% loss injected at every member with the median lossless run of the same N; " +
		"with independent losses a fragment is missed by at least one of N members with probability 1-0.99^N; " +
		"repairs are Reed-Solomon parity over blocks of 64 fragments (one parity packet repairs a different loss at every member), " +
		"so a block costs the most fragments one member misses in it."
	res.TotalSeconds = time.Since(start).Seconds()
	report(os.Stdout, res, counts)
	js, _ := json.MarshalIndent(res, "", "  ")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, append(js, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("wrote", out)
	return nil
}

type bench struct {
	bed  *testbed.Bed
	data []byte
	sum  [32]byte
	mtu  int // 0: the sender's default (1500)
}

type measurement struct {
	ms          float64
	wireBytes   float64
	repairs     uint64
	parity      uint64
	parityUsed  uint64
	completed   int
	checksumsOK bool
}

// mcastOnce sends the object to n members of a new session and times the
// Send: until every member has ACKed all of it.
func (b *bench) mcastOnce(ctx context.Context, n int, loss float64, seed uint64) (measurement, error) {
	defer debug.FreeOSMemory()
	var key [32]byte
	rand.Read(key[:])
	group := netip.AddrPortFrom(netip.AddrFrom4([4]byte{239, 78, byte(mrand.IntN(256)), byte(1 + mrand.IntN(254))}), uint16(30000+mrand.IntN(10000)))
	session := mrand.Uint64()
	var ids []string
	for i := range n {
		ids = append(ids, fmt.Sprintf("host-%d", i+1))
	}
	s, err := mcast.NewSender(mcast.SenderConfig{LocalAddr: netip.MustParseAddr(b.bed.BridgeIP), Group: group, SessionID: session,
		Key: key, Members: ids, StallTimeout: 10 * time.Second, MTU: b.mtu})
	if err != nil {
		return measurement{}, err
	}
	defer s.Close()
	var rs []*mcast.Receiver
	defer func() {
		for _, r := range rs {
			r.Close()
		}
	}()
	for i := range n {
		h := b.bed.Hosts[i]
		r, err := mcast.NewReceiver(mcast.ReceiverConfig{LocalAddr: netip.MustParseAddr(h.IP), Group: group, SessionID: session,
			MemberID: ids[i], Key: key, Listen: b.bed.In(i), LossRate: loss, LossSeed: seed*16 + uint64(i) + 1})
		if err != nil {
			return measurement{}, err
		}
		rs = append(rs, r)
	}
	objs := make([]mcast.Object, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, r := range rs {
		wg.Go(func() { objs[i], errs[i] = r.Receive(ctx) })
	}
	rep, err := s.Send(ctx, 1, b.data)
	if err != nil {
		return measurement{}, err
	}
	wg.Wait()
	m := measurement{ms: float64(rep.Duration.Microseconds()) / 1000, completed: len(rep.Completed), checksumsOK: len(rep.Completed) == n,
		wireBytes: float64(rep.Stats.BytesSent + 28*rep.Stats.PacketsSent), repairs: rep.Stats.RepairPackets, parity: rep.Stats.ParityPackets}
	for _, r := range rs {
		m.parityUsed += r.Stats().ParityUsed
	}
	for i := range objs {
		if errs[i] != nil || sha256.Sum256(objs[i].Data) != b.sum {
			m.checksumsOK = false
			fmt.Printf("  member %d: %v, or checksum mismatch\n", i+1, errs[i])
		}
	}
	return m, nil
}

// unicastOnce sends the object to n members over n parallel TCP
// connections and times until every member has read all of it.
func (b *bench) unicastOnce(ctx context.Context, n int) (measurement, error) {
	defer debug.FreeOSMemory()
	lns := make([]net.Listener, n)
	for i := range n {
		h := b.bed.Hosts[i]
		if err := b.bed.Do(i, func() error {
			var err error
			lns[i], err = net.Listen("tcp4", h.IP+":0")
			return err
		}); err != nil {
			return measurement{}, err
		}
		defer lns[i].Close()
	}
	bufs := make([][]byte, n)
	errs := make([]error, n)
	var recv sync.WaitGroup
	start := time.Now()
	var done []time.Time = make([]time.Time, n)
	for i, ln := range lns {
		recv.Go(func() {
			c, err := ln.Accept()
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close()
			bufs[i] = make([]byte, len(b.data))
			_, errs[i] = io.ReadFull(c, bufs[i])
			done[i] = time.Now()
		})
	}
	var send sync.WaitGroup
	sendErrs := make([]error, n)
	for i, ln := range lns {
		send.Go(func() {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp4", ln.Addr().String())
			if err != nil {
				sendErrs[i] = err
				return
			}
			defer c.Close()
			_, sendErrs[i] = c.Write(b.data)
		})
	}
	send.Wait()
	recv.Wait()
	if err := errors.Join(append(errs, sendErrs...)...); err != nil {
		return measurement{}, err
	}
	m := measurement{ms: float64(slices.MaxFunc(done, time.Time.Compare).Sub(start).Microseconds()) / 1000, completed: n, checksumsOK: true}
	for i := range bufs {
		if sha256.Sum256(bufs[i]) != b.sum {
			m.checksumsOK = false
		}
	}
	return m, nil
}

func report(w io.Writer, r result, counts []int) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "N\tmcast ms\tmcast MB/s\twire/payload\tt(N)/t(1)\tTCP ms\tTCP MB/s (sum)\t1%% loss ms\t1%% loss extra\t\n")
	for _, n := range counts {
		k := strconv.Itoa(n)
		fmt.Fprintf(tw, "%d\t%.0f\t%.0f\t%.4f\t%.2f\t%.0f\t%.0f\t%.0f\t%.2f%%\t\n", n, r.McastMs[k], r.McastMBps[k], r.McastWire[k],
			r.McastMs[k]/r.McastMs["1"], r.UnicastMs[k], r.UnicastMBps[k], r.LossMsByN[k], 100*r.LossExtraByN[k])
	}
	tw.Flush()
	fmt.Fprintf(w, "%d MiB, median of %d runs; t(8)/t(1) = %.2f (target <= 1.3); 1%% loss, N=%d: %.2f%% extra bytes (target <= 5%%); all checksums ok: %v\n",
		r.ObjectMiB, r.Runs, r.T8OverT1, r.LossN, 100*r.LossExtra, r.AllChecksums)
	if len(r.JumboMs) > 0 {
		fmt.Fprintf(w, "MTU %d:", r.JumboMTU)
		for _, n := range counts {
			k := strconv.Itoa(n)
			fmt.Fprintf(w, " N=%d %.0f ms;", n, r.JumboMs[k])
		}
		fmt.Fprintf(w, " t(8)/t(1) = %.2f\n", r.JumboT8OverT1)
	}
}
