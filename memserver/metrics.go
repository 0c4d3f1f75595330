package memserver

import (
	"bufio"
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync/atomic"
	"time"
)

// Stats are a server's counters since New.
type Stats struct {
	Requests            uint64    // requests answered, errors included
	Errors              uint64    // requests answered with an error status
	DataPages           uint64    // pages sent with their data
	ZeroPages           uint64    // pages answered as zero, without data
	HolePages           uint64    // of ZeroPages, those found to be holes without reading them
	DataBytes           uint64    // page data sent: DataPages x PageSize
	SentBytes           uint64    // frames written to connections, headers included (a failed write counts whole)
	BadFrames           uint64    // malformed or unexpected frames; each closed its connection
	AuthFailures        uint64    // sealed frames that failed authentication (altered, replayed, reordered, cut short, other keys); each closed its connection
	Refused             uint64    // handshakes refused: unknown snapshot, wrong capability or version
	Connections         int       // open now
	ConnectionsTotal    uint64    // accepted, rejected ones included
	ConnectionsRejected uint64    // closed at once because MaxConns were open
	Snapshots           int       // registered now
	Latency             Histogram // request service time: checking, reading and encoding, up to the write
}

// Histogram counts durations in buckets.
type Histogram struct {
	Bounds []time.Duration // upper bounds (inclusive) of all buckets but the last, which has none
	Counts []uint64        // per bucket, not cumulative: len(Bounds)+1
	Count  uint64
	Sum    time.Duration
}

// Quantile returns the upper bound of the bucket that holds the q-quantile
// (0 < q <= 1), or the largest bound if it falls in the last bucket. It is
// 0 for an empty histogram.
func (h Histogram) Quantile(q float64) time.Duration {
	if h.Count == 0 || len(h.Bounds) == 0 {
		return 0
	}
	rank := uint64(q*float64(h.Count) + 0.5)
	seen := uint64(0)
	for i, c := range h.Counts {
		if seen += c; seen >= max(rank, 1) && i < len(h.Bounds) {
			return h.Bounds[i]
		}
	}
	return h.Bounds[len(h.Bounds)-1]
}

// latencyBounds are the request latency buckets: serving from tmpfs takes
// microseconds, a 256-page batch over a busy link milliseconds.
var latencyBounds = []time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond, 100 * time.Microsecond,
	250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond,
	5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, time.Second,
}

// metrics are the server's counters, updated without locks.
type metrics struct {
	requests, errors                atomic.Uint64
	dataPages, zeroPages, holePages atomic.Uint64
	dataBytes, sentBytes            atomic.Uint64
	badFrames, authFailures         atomic.Uint64
	refused                         atomic.Uint64
	connsTotal, connsRejected       atomic.Uint64
	latencyCounts                   [16]atomic.Uint64 // len(latencyBounds)+1
	latencyCount                    atomic.Uint64
	latencySumNanos                 atomic.Int64
}

func (m *metrics) observe(d time.Duration) {
	i, _ := slices.BinarySearch(latencyBounds, d)
	m.latencyCounts[i].Add(1)
	m.latencyCount.Add(1)
	m.latencySumNanos.Add(int64(d))
}

func (m *metrics) histogram() Histogram {
	h := Histogram{
		Bounds: slices.Clone(latencyBounds),
		Counts: make([]uint64, len(latencyBounds)+1),
		Count:  m.latencyCount.Load(),
		Sum:    time.Duration(m.latencySumNanos.Load()),
	}
	for i := range h.Counts {
		h.Counts[i] = m.latencyCounts[i].Load()
	}
	return h
}

// Stats returns the server's counters. Each is read atomically; together
// they are not one snapshot, since requests go on.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	conns, snaps := len(s.conns), len(s.snapshots)
	s.mu.Unlock()
	m := &s.metrics
	return Stats{
		Requests:            m.requests.Load(),
		Errors:              m.errors.Load(),
		DataPages:           m.dataPages.Load(),
		ZeroPages:           m.zeroPages.Load(),
		HolePages:           m.holePages.Load(),
		DataBytes:           m.dataBytes.Load(),
		SentBytes:           m.sentBytes.Load(),
		BadFrames:           m.badFrames.Load(),
		AuthFailures:        m.authFailures.Load(),
		Refused:             m.refused.Load(),
		Connections:         conns,
		ConnectionsTotal:    m.connsTotal.Load(),
		ConnectionsRejected: m.connsRejected.Load(),
		Snapshots:           snaps,
		Latency:             m.histogram(),
	}
}

// WriteMetrics writes the server's counters in the Prometheus text
// exposition format, every name prefixed sf_memserver_.
func (s *Server) WriteMetrics(w io.Writer) error {
	st := s.Stats()
	b := bufio.NewWriter(w)
	metric := func(name, typ, help string, v interface{}) {
		fmt.Fprintf(b, "# HELP sf_memserver_%s %s\n# TYPE sf_memserver_%s %s\nsf_memserver_%s %v\n", name, help, name, typ, name, v)
	}
	metric("requests_total", "counter", "Requests answered, errors included.", st.Requests)
	metric("request_errors_total", "counter", "Requests answered with an error status.", st.Errors)
	fmt.Fprintf(b, "# HELP sf_memserver_pages_total Pages answered, by kind (data sent, or zero without data).\n# TYPE sf_memserver_pages_total counter\n")
	fmt.Fprintf(b, "sf_memserver_pages_total{kind=\"data\"} %d\nsf_memserver_pages_total{kind=\"zero\"} %d\n", st.DataPages, st.ZeroPages)
	metric("hole_pages_total", "counter", "Zero pages found to be holes in the snapshot file without reading them.", st.HolePages)
	metric("data_bytes_total", "counter", "Page data sent.", st.DataBytes)
	metric("sent_bytes_total", "counter", "Bytes written to connections, frame headers included.", st.SentBytes)
	metric("bad_frames_total", "counter", "Malformed or unexpected frames; each closed its connection.", st.BadFrames)
	metric("auth_failures_total", "counter", "Sealed frames that failed authentication; each closed its connection.", st.AuthFailures)
	metric("hellos_refused_total", "counter", "Handshakes refused: unknown snapshot, wrong capability or version.", st.Refused)
	metric("connections", "gauge", "Connections open.", st.Connections)
	metric("connections_total", "counter", "Connections accepted.", st.ConnectionsTotal)
	metric("connections_rejected_total", "counter", "Connections closed at once because the limit was reached.", st.ConnectionsRejected)
	metric("snapshots", "gauge", "Snapshots registered.", st.Snapshots)

	const h = "sf_memserver_request_duration_seconds"
	fmt.Fprintf(b, "# HELP %s Request service time.\n# TYPE %s histogram\n", h, h)
	cum := uint64(0)
	for i, bound := range st.Latency.Bounds {
		cum += st.Latency.Counts[i]
		fmt.Fprintf(b, "%s_bucket{le=%q} %d\n", h, strconv.FormatFloat(bound.Seconds(), 'g', -1, 64), cum)
	}
	// The count is the sum of the buckets, so that the exposition is
	// consistent even while requests are being counted.
	cum += st.Latency.Counts[len(st.Latency.Bounds)]
	fmt.Fprintf(b, "%s_bucket{le=\"+Inf\"} %d\n", h, cum)
	fmt.Fprintf(b, "%s_sum %s\n%s_count %d\n", h, strconv.FormatFloat(st.Latency.Sum.Seconds(), 'g', -1, 64), h, cum)
	return b.Flush()
}
