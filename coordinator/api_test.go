package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
)

const testToken = "test-token"

// singleNode is one bootstrapped coordinator with a registered host "h1"
// (8 slots), a parent VM 1 and a reserved ticket 1 of 2 clones.
type singleNode struct {
	s      *Server
	client *api.Client
	vm     uint64
	ticket uint64
	dir    string
}

func newSingleNode(t testing.TB) *singleNode {
	t.Helper()
	dir, err := os.MkdirTemp("", "sfcoord-test-")
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{NodeID: "solo", DataDir: dir, RaftAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
		GossipAddr: "127.0.0.1:0", Bootstrap: true, Token: testToken, HostMissingTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !s.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("single node did not become leader")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c, _ := api.NewClient(api.Config{Addrs: []string{s.HTTPAddr()}, Token: testToken})
	ctx := context.Background()
	if _, err := c.RegisterHost(ctx, "h1", api.HostRequest{APIAddr: "127.0.0.1:7000", Slots: 8, MemMB: 1024}); err != nil {
		t.Fatal(err)
	}
	vm, err := c.CreateVM(ctx, api.VMRequest{Name: "p", Host: "h1", MemMB: 128, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	tk, err := c.RequestTicket(ctx, vm.ID, 2)
	if err != nil {
		t.Fatal(err)
	}
	return &singleNode{s: s, client: c, vm: vm.ID, ticket: tk.ID, dir: dir}
}

func (n *singleNode) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = n.s.Shutdown(ctx)
	os.RemoveAll(n.dir)
}

func (n *singleNode) state() string { return n.s.FSM().Fingerprint() }

func rawRequest(t testing.TB, addr, method, path, token string, body []byte) (int, api.ErrorBody) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var eb api.ErrorBody
	_ = json.Unmarshal(b, &eb)
	return resp.StatusCode, eb
}

func TestAPIRejectsBadInput(t *testing.T) {
	n := newSingleNode(t)
	defer n.close()
	addr := n.s.HTTPAddr()
	big := append([]byte(`{"name":"`), bytes.Repeat([]byte("x"), maxBody+10)...)
	tests := []struct {
		method, path, token, body string
		status                    int
		code                      string
	}{
		{"GET", "/v1/tickets", "", "", 401, api.CodeUnauthorized},
		{"GET", "/v1/tickets", "wrong", "", 401, api.CodeUnauthorized},
		{"GET", "/metrics", "", "", 401, api.CodeUnauthorized},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":1,"n":`, 400, api.CodeBadRequest},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":"1","n":2}`, 400, api.CodeBadRequest},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":1,"n":2,"extra":1}`, 400, api.CodeBadRequest},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":1,"n":2} {}`, 400, api.CodeBadRequest},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":1,"n":0}`, 400, "invalid"},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":1,"n":100000}`, 400, "invalid"},
		{"POST", "/v1/tickets", testToken, `{"parent_vm":77,"n":1}`, 404, "not_found"},
		{"GET", "/v1/tickets/abc", testToken, "", 400, api.CodeBadRequest},
		{"GET", "/v1/tickets/0", testToken, "", 400, api.CodeBadRequest},
		{"GET", "/v1/tickets/99", testToken, "", 404, "not_found"},
		{"GET", "/v1/tickets?index=x", testToken, "", 400, api.CodeBadRequest},
		{"GET", "/v1/tickets?index=1&wait=forever", testToken, "", 400, api.CodeBadRequest},
		{"POST", "/v1/tickets/1/join", testToken, `{"caller":99}`, 403, "not_parent"},
		{"POST", "/v1/tickets/1/kill", testToken, `{"caller":99}`, 403, "not_parent"},
		{"POST", "/v1/vms/1/clone-state", testToken, `{"state":"exited"}`, 403, "not_clone"},
		{"POST", "/v1/vms/1/clone-state", testToken, `{"state":"killed"}`, 400, "invalid"},
		{"POST", "/v1/vms", testToken, "", 400, api.CodeBadRequest},
		{"POST", "/v1/vms", testToken, `{"name":"x","host":"nohost"}`, 404, "not_found"},
		{"POST", "/v1/vms", testToken, `{"name":"x","host":"bad host"}`, 400, "invalid"},
		{"POST", "/v1/vms", testToken, string(big), 413, api.CodeTooLarge},
		{"PUT", "/v1/hosts/h2", testToken, `{"api_addr":"0.0.0.0:80","slots":1}`, 400, "invalid"},
		{"PUT", "/v1/hosts/h2", testToken, `{"slots":-1}`, 400, "invalid"},
		{"POST", "/v1/tickets/1/clone", testToken, `{"parent_vm":1,"host":"h1","size":10,"sha256":"zz","memserver_addr":"127.0.0.1:1"}`, 400, "invalid"},
		{"POST", "/v1/raft/remove-peer", testToken, `{"id":"ghost"}`, 404, "not_found"},
		{"POST", "/v1/join", testToken, `{"addrs":[]}`, 400, api.CodeBadRequest},
		{"POST", "/v1/join", testToken, `{"addrs":["nonsense"]}`, 400, api.CodeBadRequest},
		{"DELETE", "/v1/tickets/1", testToken, "", 404, "not_found"},
		{"GET", "/v2/nothing", testToken, "", 404, "not_found"},
	}
	for i, tt := range tests {
		before := n.state()
		status, eb := rawRequest(t, addr, tt.method, tt.path, tt.token, []byte(tt.body))
		if status != tt.status || (tt.code != "" && eb.Code != tt.code) {
			t.Errorf("#%d %s %s: got %d %q (%s), want %d %q", i, tt.method, tt.path, status, eb.Code, eb.Error, tt.status, tt.code)
		}
		if tt.code != "" && eb.Error == "" {
			t.Errorf("#%d: error body has no message", i)
		}
		if after := n.state(); before != after {
			t.Errorf("#%d %s %s: refused request changed the state", i, tt.method, tt.path)
		}
	}
}

func TestBlockingQuery(t *testing.T) {
	n := newSingleNode(t)
	defer n.close()
	ctx := context.Background()
	tv, meta, err := n.client.Ticket(ctx, n.ticket, nil)
	if err != nil || meta.Index == 0 {
		t.Fatalf("ticket: %v index %d", err, meta.Index)
	}
	// Times out with no change: returns the same index after about wait.
	start := time.Now()
	_, meta2, err := n.client.Ticket(ctx, n.ticket, &api.QueryOptions{Index: meta.Index, Wait: 200 * time.Millisecond})
	if err != nil || meta2.Index != meta.Index || time.Since(start) < 200*time.Millisecond {
		t.Fatalf("idle blocking query: %v, index %d->%d after %s", err, meta.Index, meta2.Index, time.Since(start))
	}
	// Wakes on a change of this ticket.
	var wg sync.WaitGroup
	wg.Add(1)
	var got fsm.TicketView
	go func() {
		defer wg.Done()
		got, _, err = n.client.Ticket(ctx, n.ticket, &api.QueryOptions{Index: meta.Index, Wait: 30 * time.Second})
	}()
	if _, err := n.client.KillTicket(ctx, n.ticket, n.vm, "test"); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if err != nil || got.State != fsm.TicketKilled || tv.State != fsm.TicketReserved {
		t.Fatalf("blocking query woke with %s (%v)", got.State, err)
	}
}

func TestMetricsExposition(t *testing.T) {
	n := newSingleNode(t)
	defer n.close()
	text, err := n.client.Metrics(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`sf_raft_state{state="leader"} 1`, "sf_raft_commit_index", "sf_fsm_applied_index",
		`sf_tickets{state="reserved"} 1`, `sf_api_request_seconds_bucket{route="POST /v1/tickets",le="+Inf"} 1`,
		"sf_tickets_created_total 1"} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// FuzzAPIWrite posts arbitrary bodies to every write endpoint of a real
// single-node coordinator: the answer is never a 5xx other than 503, and a
// refused request changes nothing.
func FuzzAPIWrite(f *testing.F) {
	routes := []struct{ method, path string }{
		{"POST", "/v1/tickets"}, {"POST", "/v1/tickets/1/clone"}, {"POST", "/v1/tickets/1/join"},
		{"POST", "/v1/tickets/1/kill"}, {"POST", "/v1/tickets/1/create-clones"}, {"POST", "/v1/vms"},
		{"POST", "/v1/vms/1/end"}, {"POST", "/v1/vms/2/clone-state"}, {"PUT", "/v1/hosts/h9"},
		{"POST", "/v1/hosts/h1/fail"}, {"POST", "/v1/descriptors"}, {"POST", "/v1/checkpoints"},
	}
	seeds := []string{`{}`, `{"parent_vm":1,"n":1}`, `{"caller":1}`, `{"state":"running"}`, `{"slots":3}`,
		`{"parent_vm":1,"host":"h1","size":1,"sha256":"` + strings.Repeat("0", 64) + `","memserver_addr":"127.0.0.1:9"}`,
		`[`, `null`, `{"n":-1}`, `{"name":"\u0000"}`}
	for i := range routes {
		for _, s := range seeds {
			f.Add(uint8(i), []byte(s))
		}
	}
	var once sync.Once
	var n *singleNode
	f.Cleanup(func() {
		if n != nil {
			n.close()
		}
	})
	f.Fuzz(func(t *testing.T, route uint8, body []byte) {
		once.Do(func() { n = newSingleNode(t) })
		r := routes[int(route)%len(routes)]
		before := n.state()
		status, eb := rawRequest(t, n.s.HTTPAddr(), r.method, r.path, testToken, body)
		if status >= 500 && status != http.StatusServiceUnavailable {
			t.Fatalf("%s %s %q: %d %+v", r.method, r.path, body, status, eb)
		}
		if status >= 400 && before != n.state() {
			t.Fatalf("%s %s %q: refused with %d but changed the state", r.method, r.path, body, status)
		}
	})
}
