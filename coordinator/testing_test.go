package coordinator

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/snowflock-go/snowflock/api"
)

// testCluster is a set of coordinators in this process over real TCP and
// bolt, in the style of raft's MakeCluster and rqlite's system test helpers.
type testCluster struct {
	t       *testing.T
	servers []*Server
	cfgs    []Config
}

func testLogger(t *testing.T, name string) hclog.Logger {
	level := hclog.Warn
	if os.Getenv("SF_TEST_LOG") != "" {
		level = hclog.Debug
	}
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: level, Output: os.Stderr})
}

// newTestCluster starts n coordinators: the first bootstraps, the others
// join it by gossip and are added to raft by the leader.
func newTestCluster(t *testing.T, n int, mod func(i int, c *Config)) *testCluster {
	t.Helper()
	tc := &testCluster{t: t}
	for i := 0; i < n; i++ {
		cfg := Config{
			NodeID:            fmt.Sprintf("c%d", i),
			DataDir:           t.TempDir(),
			RaftAddr:          "127.0.0.1:0",
			HTTPAddr:          "127.0.0.1:0",
			GossipAddr:        "127.0.0.1:0",
			Bootstrap:         i == 0,
			ReconcileInterval: 200 * time.Millisecond,
			Logger:            testLogger(t, fmt.Sprintf("c%d", i)),
		}
		if i > 0 {
			cfg.Join = []string{tc.servers[0].GossipAddr()}
		}
		if mod != nil {
			mod(i, &cfg)
		}
		s, err := New(cfg)
		if err != nil {
			t.Fatalf("start c%d: %v", i, err)
		}
		// A restart reuses the ports, as a real agent's fixed ports would.
		cfg.RaftAddr, cfg.HTTPAddr, cfg.GossipAddr = s.RaftAddr(), s.HTTPAddr(), s.GossipAddr()
		tc.servers = append(tc.servers, s)
		tc.cfgs = append(tc.cfgs, cfg)
	}
	t.Cleanup(tc.shutdown)
	tc.waitVoters(n)
	return tc
}

func (tc *testCluster) shutdown() {
	for _, s := range tc.servers {
		if s != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_ = s.Shutdown(ctx)
			cancel()
		}
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// leader waits for a ready leader among the running servers.
func (tc *testCluster) leader() *Server {
	tc.t.Helper()
	var l *Server
	waitFor(tc.t, 10*time.Second, "a leader", func() bool {
		for _, s := range tc.servers {
			if s != nil && s.IsLeader() {
				l = s
				return true
			}
		}
		return false
	})
	return l
}

func (tc *testCluster) waitVoters(n int) {
	tc.t.Helper()
	waitFor(tc.t, 15*time.Second, fmt.Sprintf("%d voters", n), func() bool {
		l := tc.leaderNow()
		if l == nil {
			return false
		}
		cf := l.raft.GetConfiguration()
		if cf.Error() != nil {
			return false
		}
		voters := 0
		for _, s := range cf.Configuration().Servers {
			if s.Suffrage == raft.Voter {
				voters++
			}
		}
		return voters == n
	})
}

func (tc *testCluster) leaderNow() *Server {
	for _, s := range tc.servers {
		if s != nil && s.IsLeader() {
			return s
		}
	}
	return nil
}

func (tc *testCluster) addrs() []string {
	var out []string
	for _, s := range tc.servers {
		if s != nil {
			out = append(out, s.HTTPAddr())
		}
	}
	return out
}

func (tc *testCluster) client(token string) *api.Client {
	c, err := api.NewClient(api.Config{Addrs: tc.addrs(), Token: token})
	if err != nil {
		tc.t.Fatal(err)
	}
	return c
}

// kill stops server i abruptly (no leave), like a crash.
func (tc *testCluster) kill(i int) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = tc.servers[i].Shutdown(ctx)
	tc.servers[i] = nil
}

// restart starts server i again on its data dir.
func (tc *testCluster) restart(i int) {
	tc.t.Helper()
	cfg := tc.cfgs[i]
	cfg.Bootstrap = false
	var live []string
	for _, s := range tc.servers {
		if s != nil {
			live = append(live, s.GossipAddr())
		}
	}
	cfg.Join = live
	s, err := New(cfg)
	if err != nil {
		tc.t.Fatalf("restart c%d: %v", i, err)
	}
	tc.servers[i] = s
}
