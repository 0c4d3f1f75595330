package coordinator

import (
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// latencyBuckets are the upper bounds, in seconds, of the API latency
// histogram.
var latencyBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

type histogram struct {
	counts []uint64 // per bucket, plus +Inf
	sum    float64
	n      uint64
}

type reqKey struct {
	route string
	code  int
}

// metrics are this node's counters, exported in Prometheus text format.
type metrics struct {
	mu        sync.Mutex
	requests  map[reqKey]uint64
	latency   map[string]*histogram
	tickets   uint64
	elections uint64
}

func newMetrics() *metrics {
	return &metrics{requests: map[reqKey]uint64{}, latency: map[string]*histogram{}}
}

func (m *metrics) observeRequest(route string, code int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.requests[reqKey{route, code}]++
	h := m.latency[route]
	if h == nil {
		h = &histogram{counts: make([]uint64, len(latencyBuckets)+1)}
		m.latency[route] = h
	}
	sec := d.Seconds()
	i, _ := slices.BinarySearch(latencyBuckets, sec)
	h.counts[i]++
	h.sum += sec
	h.n++
}

func (m *metrics) ticketCreated() {
	m.mu.Lock()
	m.tickets++
	m.mu.Unlock()
}

func (m *metrics) leaderElected() {
	m.mu.Lock()
	m.elections++
	m.mu.Unlock()
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	var b strings.Builder
	gauge := func(name, help string, v interface{}) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s gauge\n%s %v\n", name, help, name, name, v)
	}
	state := s.raft.State()
	fmt.Fprintf(&b, "# HELP sf_raft_state Raft state of this node (1 for the current one).\n# TYPE sf_raft_state gauge\n")
	for _, st := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		v := 0
		if st == state {
			v = 1
		}
		fmt.Fprintf(&b, "sf_raft_state{state=%q} %d\n", strings.ToLower(st.String()), v)
	}
	gauge("sf_raft_term", "Current raft term.", s.raft.CurrentTerm())
	gauge("sf_raft_commit_index", "Raft commit index.", s.raft.CommitIndex())
	gauge("sf_raft_last_index", "Last raft log index.", s.raft.LastIndex())
	gauge("sf_fsm_applied_index", "Index of the last entry applied to the FSM.", s.fsm.Index())
	c := s.fsm.Counts()
	gauge("sf_next_vm_id", "Next VM ID the cluster will allocate.", c.NextVMID)
	gauge("sf_free_clone_slots", "Free clone slots over alive hosts.", c.FreeSlots)
	labelled := func(name, help, label string, vals map[string]int) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name)
		for _, k := range slices.Sorted(maps.Keys(vals)) {
			fmt.Fprintf(&b, "%s{%s=%q} %d\n", name, label, k, vals[k])
		}
	}
	labelled("sf_tickets", "Tickets by state.", "state", stringKeyed(c.Tickets))
	labelled("sf_clones", "Clones by state.", "state", stringKeyed(c.Clones))
	labelled("sf_hosts", "Hosts by status.", "status", stringKeyed(c.Hosts))
	labelled("sf_vms", "VMs by state.", "state", stringKeyed(c.VMs))
	members := map[string]int{}
	for _, m := range s.gossip.Members() {
		members[string(m.Meta.Role)+"/"+string(m.Status)]++
	}
	labelled("sf_gossip_members", "Gossip members by role/status.", "role_status", members)

	s.mx.mu.Lock()
	fmt.Fprintf(&b, "# HELP sf_tickets_created_total Tickets granted through this node as leader.\n# TYPE sf_tickets_created_total counter\nsf_tickets_created_total %d\n", s.mx.tickets)
	fmt.Fprintf(&b, "# HELP sf_leader_elections_total Times this node established leadership.\n# TYPE sf_leader_elections_total counter\nsf_leader_elections_total %d\n", s.mx.elections)
	fmt.Fprintf(&b, "# HELP sf_api_requests_total API requests by route and status code.\n# TYPE sf_api_requests_total counter\n")
	keys := slices.SortedFunc(maps.Keys(s.mx.requests), func(a, b reqKey) int {
		if a.route != b.route {
			return strings.Compare(a.route, b.route)
		}
		return a.code - b.code
	})
	for _, k := range keys {
		fmt.Fprintf(&b, "sf_api_requests_total{route=%q,code=\"%d\"} %d\n", k.route, k.code, s.mx.requests[k])
	}
	fmt.Fprintf(&b, "# HELP sf_api_request_seconds API request latency.\n# TYPE sf_api_request_seconds histogram\n")
	for _, route := range slices.Sorted(maps.Keys(s.mx.latency)) {
		h := s.mx.latency[route]
		var cum uint64
		for i, ub := range latencyBuckets {
			cum += h.counts[i]
			fmt.Fprintf(&b, "sf_api_request_seconds_bucket{route=%q,le=\"%g\"} %d\n", route, ub, cum)
		}
		fmt.Fprintf(&b, "sf_api_request_seconds_bucket{route=%q,le=\"+Inf\"} %d\n", route, h.n)
		fmt.Fprintf(&b, "sf_api_request_seconds_sum{route=%q} %g\nsf_api_request_seconds_count{route=%q} %d\n", route, h.sum, route, h.n)
	}
	s.mx.mu.Unlock()
	_, _ = io.WriteString(w, b.String())
}

func stringKeyed[K ~string](m map[K]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[string(k)] = v
	}
	return out
}
