package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
)

var (
	// errNotLeader: the command was not accepted; retrying elsewhere is safe.
	errNotLeader = errors.New("not the leader")
	// errUnknownOutcome: leadership was lost while the command was in flight;
	// it may or may not be committed. Retry with the same request ID.
	errUnknownOutcome = errors.New("leadership lost while applying; outcome unknown")
)

// apply proposes a command and waits for this node's FSM to apply it.
func (s *Server) apply(c fsm.Command) (*fsm.Result, error) {
	b, err := fsm.Encode(c)
	if err != nil {
		return nil, err
	}
	f := s.raft.Apply(b, applyTimeout)
	if err := f.Error(); err != nil {
		switch {
		case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrEnqueueTimeout):
			return nil, fmt.Errorf("%w: %v", errNotLeader, err)
		case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrRaftShutdown),
			errors.Is(err, raft.ErrLeadershipTransferInProgress):
			return nil, fmt.Errorf("%w: %v", errUnknownOutcome, err)
		}
		return nil, err
	}
	res, ok := f.Response().(*fsm.Result)
	if !ok {
		return nil, fmt.Errorf("apply %T: no result", c)
	}
	return res, nil
}

// observeLeader wakes requests held for a leader whenever raft observes a
// leader change.
func (s *Server) observeLeader() {
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	s.raft.RegisterObserver(obs)
	defer s.raft.DeregisterObserver(obs)
	for {
		select {
		case <-s.stop:
			return
		case <-ch:
			s.kickLeader()
		}
	}
}

func (s *Server) kickLeader() {
	s.leaderMu.Lock()
	close(s.leaderCh)
	s.leaderCh = make(chan struct{})
	s.leaderMu.Unlock()
}

func (s *Server) leaderChanged() <-chan struct{} {
	s.leaderMu.Lock()
	defer s.leaderMu.Unlock()
	return s.leaderCh
}

// monitorLeadership runs leaderLoop for as long as this node leads.
func (s *Server) monitorLeadership() {
	var stopLeader, done chan struct{}
	stopLoop := func() {
		if stopLeader != nil {
			s.leaderReady.Store(false)
			close(stopLeader)
			<-done
			stopLeader = nil
			s.kickLeader()
		}
	}
	for {
		select {
		case <-s.stop:
			stopLoop()
			return
		case isLeader := <-s.notifyCh:
			if isLeader && stopLeader == nil {
				stopLeader, done = make(chan struct{}), make(chan struct{})
				go func(stop, done chan struct{}) {
					defer close(done)
					s.leaderLoop(stop)
				}(stopLeader, done)
			} else if !isLeader {
				stopLoop()
			}
		}
	}
}

// leaderLoop establishes leadership and reconciles gossip into the log on
// every membership change and every ReconcileInterval.
func (s *Server) leaderLoop(stop <-chan struct{}) {
	// A barrier makes the FSM apply everything earlier leaders committed, so
	// reads and placements here see the whole history.
	for {
		err := s.raft.Barrier(applyTimeout).Error()
		if err == nil {
			break
		}
		s.log.Warn("leader barrier failed; retrying", "error", err)
		select {
		case <-stop:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	s.leaderReady.Store(true)
	s.kickLeader()
	s.mx.leaderElected()
	s.log.Info("leadership established", "term", s.raft.CurrentTerm())

	rec := &reconciler{s: s, missing: map[string]time.Time{}}
	ticker := time.NewTicker(s.cfg.ReconcileInterval)
	defer ticker.Stop()
	for {
		rec.run()
		select {
		case <-stop:
			return
		case <-ticker.C:
		case <-s.gossip.Changed():
		}
	}
}

// reconciler holds the leader's memory between reconciles.
type reconciler struct {
	s       *Server
	missing map[string]time.Time // hosts alive in the fsm but absent from gossip, since when
}

func (r *reconciler) run() {
	s := r.s
	cf := s.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		s.log.Warn("reconcile: raft configuration", "error", err)
		return
	}
	inRaft := map[string]raft.Server{}
	for _, srv := range cf.Configuration().Servers {
		inRaft[string(srv.ID)] = srv
	}
	members := s.gossip.Members()
	inGossip := map[string]bool{}
	for _, m := range members {
		inGossip[m.Name] = true
		switch m.Meta.Role {
		case gossip.RoleCoordinator:
			r.coordinator(m, inRaft)
		case gossip.RoleHost:
			r.host(m)
		}
	}
	hosts, _ := s.fsm.Hosts()
	now := time.Now()
	for _, h := range hosts {
		if h.Status != fsm.HostAlive || inGossip[h.ID] {
			delete(r.missing, h.ID)
			continue
		}
		since, ok := r.missing[h.ID]
		if !ok {
			r.missing[h.ID] = now
			continue
		}
		if now.Sub(since) >= s.cfg.HostMissingTimeout {
			r.commit("host missing from gossip", &fsm.HostFail{ID: h.ID, Reason: "host is not in the gossip pool"})
			delete(r.missing, h.ID)
		}
	}
}

func (r *reconciler) coordinator(m gossip.Member, inRaft map[string]raft.Server) {
	s := r.s
	srv, in := inRaft[m.Name]
	self := m.Name == s.cfg.NodeID
	switch m.Status {
	case gossip.StatusAlive, gossip.StatusSuspect:
		if self || m.Meta.Raft == "" || (in && string(srv.Address) == m.Meta.Raft) {
			return
		}
		s.log.Info("adding coordinator to raft", "node", m.Name, "raft", m.Meta.Raft)
		if err := s.raft.AddVoter(raft.ServerID(m.Name), raft.ServerAddress(m.Meta.Raft), 0, applyTimeout).Error(); err != nil {
			s.log.Warn("add voter failed", "node", m.Name, "error", err)
		}
	case gossip.StatusLeft:
		if in && !self {
			r.remove(m.Name, "left")
		}
	case gossip.StatusFailed:
		if in && !self && time.Since(m.Since) >= s.cfg.DeadServerTimeout {
			r.remove(m.Name, "dead past timeout")
		}
	}
}

func (r *reconciler) remove(id, why string) {
	s := r.s
	s.log.Info("removing coordinator from raft", "node", id, "why", why)
	if err := s.raft.RemoveServer(raft.ServerID(id), 0, applyTimeout).Error(); err != nil {
		s.log.Warn("remove server failed", "node", id, "error", err)
	}
}

func (r *reconciler) host(m gossip.Member) {
	h, known := r.s.fsm.Host(m.Name)
	switch m.Status {
	case gossip.StatusAlive, gossip.StatusSuspect:
		if known && h.Status == fsm.HostAlive && h.GossipAddr == m.Addr && h.APIAddr == m.Meta.API &&
			h.McastAddr == m.Meta.Mcast && h.Slots == m.Meta.Slots && h.MemMB == m.Meta.MemMB {
			return
		}
		r.commit("register host", &fsm.HostRegister{ID: m.Name, GossipAddr: m.Addr, APIAddr: m.Meta.API,
			McastAddr: m.Meta.Mcast, Slots: m.Meta.Slots, MemMB: m.Meta.MemMB})
	case gossip.StatusFailed, gossip.StatusLeft:
		if known && h.Status == fsm.HostAlive {
			left := m.Status == gossip.StatusLeft
			r.commit("host "+string(m.Status), &fsm.HostFail{ID: m.Name, Left: left,
				Reason: fmt.Sprintf("gossip reports host %s %s", m.Name, m.Status)})
		}
	}
}

func (r *reconciler) commit(what string, c fsm.Command) {
	res, err := r.s.apply(c)
	if err == nil {
		err = res.Err
	}
	if err != nil {
		r.s.log.Warn("reconcile: "+what, "error", err)
		return
	}
	r.s.log.Info("reconcile: "+what, "command", fmt.Sprintf("%+v", c))
}

// bootstrapExpect forms the cluster once BootstrapExpect coordinators that
// all expect that number are in gossip and none of them belongs to a cluster
// yet. Every one of them bootstraps with the same configuration, which raft
// accepts. A node with raft state never bootstraps.
func (s *Server) bootstrapExpect() {
	n := s.cfg.BootstrapExpect
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-ticker.C:
		}
		if s.hasRaftState() {
			s.log.Info("raft state present; bootstrap-expect not needed")
			s.clearExpect()
			return
		}
		var peers []gossip.Member
		inCluster := false
		for _, m := range s.gossip.Members() {
			if m.Meta.Role != gossip.RoleCoordinator || m.Status != gossip.StatusAlive {
				continue
			}
			switch m.Meta.Expect {
			case n:
				peers = append(peers, m)
			case 0:
				inCluster = true
			default:
				s.log.Warn("coordinator expects a different cluster size", "node", m.Name, "expect", m.Meta.Expect, "mine", n)
			}
		}
		if inCluster || len(peers) != n {
			continue // wait to be added by the leader, or for more peers
		}
		slices.SortFunc(peers, func(a, b gossip.Member) int { return strings.Compare(a.Name, b.Name) })
		var servers []raft.Server
		for _, p := range peers {
			servers = append(servers, raft.Server{ID: raft.ServerID(p.Name), Address: raft.ServerAddress(p.Meta.Raft), Suffrage: raft.Voter})
		}
		err := s.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
		if err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			s.log.Error("bootstrap failed", "error", err)
			continue
		}
		s.log.Info("bootstrapped cluster", "servers", len(servers))
		s.clearExpect()
		return
	}
}

// clearExpect tells the pool this node now belongs to a cluster.
func (s *Server) clearExpect() {
	meta := gossip.Meta{Role: gossip.RoleCoordinator, API: s.HTTPAddr(), Raft: s.RaftAddr()}
	if err := s.gossip.SetMeta(meta); err != nil {
		s.log.Warn("gossip metadata update", "error", err)
	}
}

// removeSelf asks the leader to remove this node from raft.
func (s *Server) removeSelf(ctx context.Context) error {
	deadline := time.Now().Add(holdTime)
	for time.Now().Before(deadline) {
		if s.raft.State() == raft.Leader {
			// Still leader (transfer failed or single node): remove directly
			// only if others remain to lead.
			cf := s.raft.GetConfiguration()
			if cf.Error() == nil && len(cf.Configuration().Servers) > 1 {
				return s.raft.RemoveServer(raft.ServerID(s.cfg.NodeID), 0, applyTimeout).Error()
			}
			return nil
		}
		addr := s.leaderHTTP()
		if addr != "" {
			body, _ := json.Marshal(api.RemovePeerRequest{ID: s.cfg.NodeID})
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr+"/v1/raft/remove-peer", bytes.NewReader(body))
			if err != nil {
				return err
			}
			if s.cfg.Token != "" {
				req.Header.Set("Authorization", "Bearer "+s.cfg.Token)
			}
			resp, err := s.fwd.Do(req)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					return nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.leaderChanged():
		case <-time.After(100 * time.Millisecond):
		}
	}
	return errors.New("no leader to remove this node")
}

// leaderHTTP returns the leader's API address from gossip, or "".
func (s *Server) leaderHTTP() string {
	_, id := s.raft.LeaderWithID()
	if id == "" {
		return ""
	}
	if string(id) == s.cfg.NodeID {
		return s.HTTPAddr()
	}
	m, ok := s.gossip.Member(string(id))
	if !ok || m.Meta.API == "" {
		return ""
	}
	return m.Meta.API
}
