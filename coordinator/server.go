// Package coordinator is one member of the highly available control plane:
// a hashicorp/raft node replicating the fsm, an HTTP/JSON API, and a member
// of the gossip pool.
//
// Data flow: API writes become fsm commands; a follower forwards them to the
// leader's API, the leader proposes them to raft, and every node applies them
// in log order. The leader alone makes the choices that need the outside world
// (ticket placement from host capacity) before proposing, and alone reconciles
// the world into the log: coordinators seen in gossip become raft voters, hosts
// seen in gossip are registered, hosts that gossip declares dead are failed
// (which fails their clones). See leader.go for that loop and api.go for the
// HTTP surface.
package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"

	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
)

// Config configures a coordinator.
type Config struct {
	NodeID  string // stable raft ID and gossip name; generated and kept in DataDir if empty
	DataDir string

	RaftAddr        string // bind ip:port for the raft transport (port 0 picks one)
	RaftAdvertise   string // address peers dial; defaults to RaftAddr
	HTTPAddr        string // bind ip:port for the API
	HTTPAdvertise   string // API address others use; defaults to HTTPAddr
	GossipAddr      string // bind ip:port for gossip
	GossipAdvertise string

	Bootstrap       bool     // form a single-node cluster if there is no state
	BootstrapExpect int      // form a cluster once this many coordinators are in gossip
	Join            []string // gossip addresses to join, retried until one answers

	Token     string // API bearer token; empty disables authentication
	GossipKey []byte // gossip encryption key; nil disables encryption
	// GossipProfile is the failure detector's timing (gossip.Config.Profile).
	GossipProfile string

	// DeadServerTimeout is how long a coordinator may be dead in gossip before
	// the leader removes it from raft. Zero means 10 minutes.
	DeadServerTimeout time.Duration
	// ReconcileInterval is the leader's periodic full reconcile. Zero means 5 s.
	ReconcileInterval time.Duration
	// HostMissingTimeout is how long a host registered in the fsm may be
	// absent from gossip before it is failed. Zero means 10 s.
	HostMissingTimeout time.Duration

	Logger hclog.Logger
}

// Timing that makes failover fast on a LAN: followers notice a dead leader
// after 300-600 ms without heartbeats and elect a new one within a few round
// trips. The lease is as long as it may be (it must not exceed the heartbeat
// timeout): a shorter one made leaders step down on a busy 2-core machine.
const (
	heartbeatTimeout   = 300 * time.Millisecond
	electionTimeout    = 300 * time.Millisecond
	leaderLeaseTimeout = 300 * time.Millisecond
	applyTimeout       = 5 * time.Second
	// holdTime is how long a write waits for a leader before 503.
	holdTime = 5 * time.Second
)

// Server is a running coordinator.
type Server struct {
	cfg    Config
	log    hclog.Logger
	fsm    *fsm.FSM
	raft   *raft.Raft
	trans  *raft.NetworkTransport
	store  *raftboltdb.BoltStore
	gossip *gossip.Agent
	http   *http.Server
	ln     net.Listener
	fwd    *http.Client
	mx     *metrics

	notifyCh    chan bool     // raft's leadership notifications
	leaderReady atomic.Bool   // leader and caught up (barrier done)
	leaderMu    sync.Mutex    // guards leaderCh
	leaderCh    chan struct{} // closed on every leadership observation

	readMu     sync.Mutex
	readBatch  *readBarrier // linearizable reads waiting for the next barrier
	barrierSem chan struct{}

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
	left     chan struct{} // closed after a graceful leave
}

// New starts a coordinator: raft, gossip and the HTTP API.
func New(cfg Config) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("coordinator: data dir is required")
	}
	if cfg.Bootstrap && cfg.BootstrapExpect > 0 {
		return nil, errors.New("coordinator: --bootstrap and --bootstrap-expect exclude each other")
	}
	if cfg.BootstrapExpect < 0 || cfg.BootstrapExpect > 9 {
		return nil, fmt.Errorf("coordinator: bootstrap-expect %d out of range 1..9", cfg.BootstrapExpect)
	}
	if cfg.DeadServerTimeout == 0 {
		cfg.DeadServerTimeout = 10 * time.Minute
	}
	if cfg.ReconcileInterval == 0 {
		cfg.ReconcileInterval = 5 * time.Second
	}
	if cfg.HostMissingTimeout == 0 {
		cfg.HostMissingTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("coordinator: data dir: %w", err)
	}
	id, err := loadNodeID(cfg.DataDir, cfg.NodeID)
	if err != nil {
		return nil, err
	}
	cfg.NodeID = id
	s := &Server{
		cfg: cfg, log: cfg.Logger, fsm: fsm.New(), mx: newMetrics(),
		leaderCh: make(chan struct{}), barrierSem: make(chan struct{}, 1), stop: make(chan struct{}), left: make(chan struct{}),
		fwd: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, IdleConnTimeout: time.Minute}},
	}
	if err := s.startHTTPListener(); err != nil {
		return nil, err
	}
	if err := s.startRaft(); err != nil {
		s.ln.Close()
		return nil, err
	}
	if err := s.startGossip(); err != nil {
		s.shutdownRaft()
		s.ln.Close()
		return nil, err
	}
	s.startHTTP()
	s.goRun(s.observeLeader)
	s.goRun(s.monitorLeadership)
	if cfg.BootstrapExpect > 0 {
		s.goRun(s.bootstrapExpect)
	}
	if len(cfg.Join) > 0 {
		s.goRun(s.retryJoin)
	}
	s.log.Info("coordinator started", "node", id, "raft", s.RaftAddr(), "http", s.HTTPAddr(), "gossip", s.gossip.Addr())
	return s, nil
}

// loadNodeID returns the node ID kept in dataDir, writing want (or a new
// random ID) there on first start. A data dir belongs to one node for life.
func loadNodeID(dataDir, want string) (string, error) {
	path := filepath.Join(dataDir, "node-id")
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		have := strings.TrimSpace(string(b))
		if want != "" && want != have {
			return "", fmt.Errorf("coordinator: data dir %s belongs to node %q, not %q", dataDir, have, want)
		}
		return have, nil
	case !errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("coordinator: node id: %w", err)
	}
	if want == "" {
		r := make([]byte, 4)
		if _, err := rand.Read(r); err != nil {
			return "", err
		}
		host, _ := os.Hostname()
		want = fmt.Sprintf("coord-%s-%s", sanitize(host), hex.EncodeToString(r))
	}
	if err := fsm.ValidateID(want); err != nil {
		return "", fmt.Errorf("coordinator: node id: %w", err)
	}
	if err := os.WriteFile(path, []byte(want+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("coordinator: node id: %w", err)
	}
	return want, nil
}

func sanitize(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			b.WriteRune(r)
		}
		if b.Len() >= 20 {
			break
		}
	}
	if b.Len() == 0 {
		return "node"
	}
	return b.String()
}

func (s *Server) goRun(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

func (s *Server) startRaft() error {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(s.cfg.NodeID)
	rc.Logger = s.log.Named("raft")
	rc.HeartbeatTimeout = heartbeatTimeout
	rc.ElectionTimeout = electionTimeout
	rc.LeaderLeaseTimeout = leaderLeaseTimeout
	rc.CommitTimeout = 5 * time.Millisecond
	rc.MaxAppendEntries = 256
	rc.BatchApplyCh = true
	rc.SnapshotThreshold = 16384
	rc.TrailingLogs = 10240
	notify := make(chan bool, 16)
	rc.NotifyCh = notify
	s.notifyCh = notify

	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(s.cfg.DataDir, "raft.db")})
	if err != nil {
		return fmt.Errorf("coordinator: raft store: %w", err)
	}
	s.store = store
	logs, err := raft.NewLogCache(1024, store)
	if err != nil {
		store.Close()
		return err
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(filepath.Join(s.cfg.DataDir, "snapshots"), 2, s.log.Named("snapshot"))
	if err != nil {
		store.Close()
		return fmt.Errorf("coordinator: snapshot store: %w", err)
	}
	bind, err := net.ResolveTCPAddr("tcp", s.cfg.RaftAddr)
	if err != nil {
		store.Close()
		return fmt.Errorf("coordinator: raft address: %w", err)
	}
	var adv net.Addr
	if s.cfg.RaftAdvertise != "" {
		a, err := net.ResolveTCPAddr("tcp", s.cfg.RaftAdvertise)
		if err != nil || a.IP.IsUnspecified() {
			store.Close()
			return fmt.Errorf("coordinator: raft advertise address %q must be a reachable ip:port", s.cfg.RaftAdvertise)
		}
		adv = a
	}
	trans, err := raft.NewTCPTransportWithLogger(bind.String(), adv, 4, 10*time.Second, s.log.Named("raft-net"))
	if err != nil {
		store.Close()
		return fmt.Errorf("coordinator: raft transport: %w", err)
	}
	s.trans = trans
	existing, err := raft.HasExistingState(logs, store, snaps)
	if err != nil {
		trans.Close()
		store.Close()
		return err
	}
	r, err := raft.NewRaft(rc, s.fsm, logs, store, snaps, trans)
	if err != nil {
		trans.Close()
		store.Close()
		return fmt.Errorf("coordinator: raft: %w", err)
	}
	s.raft = r
	if s.cfg.Bootstrap && !existing {
		f := r.BootstrapCluster(raft.Configuration{Servers: []raft.Server{
			{ID: rc.LocalID, Address: trans.LocalAddr(), Suffrage: raft.Voter}}})
		if err := f.Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return fmt.Errorf("coordinator: bootstrap: %w", err)
		}
		s.log.Info("bootstrapped a new cluster", "node", rc.LocalID)
	}
	return nil
}

func (s *Server) hasRaftState() bool {
	last, err := s.store.LastIndex()
	return err == nil && last > 0
}

func (s *Server) startGossip() error {
	meta := gossip.Meta{Role: gossip.RoleCoordinator, API: s.HTTPAddr(), Raft: s.RaftAddr(), Expect: s.cfg.BootstrapExpect}
	a, err := gossip.New(gossip.Config{Name: s.cfg.NodeID, BindAddr: s.cfg.GossipAddr, AdvertiseAddr: s.cfg.GossipAdvertise,
		Key: s.cfg.GossipKey, Meta: meta, Logger: s.log.Named("gossip"), Profile: s.cfg.GossipProfile})
	if err != nil {
		return err
	}
	s.gossip = a
	return nil
}

func (s *Server) retryJoin() {
	for attempt := 0; ; attempt++ {
		n, err := s.gossip.Join(s.cfg.Join)
		if err == nil {
			s.log.Info("joined gossip pool", "contacted", n)
			return
		}
		s.log.Warn("join failed; retrying", "addrs", s.cfg.Join, "error", err)
		select {
		case <-s.stop:
			return
		case <-time.After(time.Second):
		}
	}
}

// NodeID is this coordinator's stable ID.
func (s *Server) NodeID() string { return s.cfg.NodeID }

// RaftAddr is the raft address peers dial.
func (s *Server) RaftAddr() string { return string(s.trans.LocalAddr()) }

// GossipAddr is the gossip address other nodes join.
func (s *Server) GossipAddr() string { return s.gossip.Addr() }

// HTTPAddr is the API address clients use.
func (s *Server) HTTPAddr() string {
	if s.cfg.HTTPAdvertise != "" {
		return s.cfg.HTTPAdvertise
	}
	return s.ln.Addr().String()
}

// FSM exposes the replicated state for in-process readers (tests, demo).
func (s *Server) FSM() *fsm.FSM { return s.fsm }

// IsLeader reports whether this node leads and has caught up its state.
func (s *Server) IsLeader() bool {
	return s.raft.State() == raft.Leader && s.leaderReady.Load()
}

// Left is closed after a graceful leave completed; the process should exit.
func (s *Server) Left() <-chan struct{} { return s.left }

// Shutdown stops the API, gossip (without a goodbye) and raft.
func (s *Server) Shutdown(ctx context.Context) error {
	var first error
	s.stopOnce.Do(func() {
		close(s.stop)
		if err := s.http.Shutdown(ctx); err != nil {
			s.http.Close()
		}
		if err := s.gossip.Shutdown(); err != nil {
			first = err
		}
		if err := s.shutdownRaft(); err != nil && first == nil {
			first = err
		}
		s.wg.Wait()
	})
	return first
}

func (s *Server) shutdownRaft() error {
	err := s.raft.Shutdown().Error()
	if cerr := s.trans.Close(); cerr != nil && err == nil {
		err = cerr
	}
	if cerr := s.store.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// Leave departs gracefully: hand leadership over if this node leads, ask the
// leader to remove this node from raft, tell the gossip pool, and close Left.
func (s *Server) Leave(ctx context.Context) error {
	if s.raft.State() == raft.Leader {
		voters := 0
		if cf := s.raft.GetConfiguration(); cf.Error() == nil {
			for _, srv := range cf.Configuration().Servers {
				if srv.Suffrage == raft.Voter {
					voters++
				}
			}
		}
		if voters > 1 {
			if err := s.raft.LeadershipTransfer().Error(); err != nil {
				s.log.Warn("leadership transfer failed; leaving anyway", "error", err)
			}
		}
	}
	if err := s.removeSelf(ctx); err != nil {
		s.log.Warn("could not remove self from raft; the leader will after gossip reports the leave", "error", err)
	}
	if err := s.gossip.Leave(2 * time.Second); err != nil {
		s.log.Warn("gossip leave", "error", err)
	}
	s.log.Info("left the cluster")
	select {
	case <-s.left:
	default:
		close(s.left)
	}
	return nil
}
