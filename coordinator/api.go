package coordinator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/raft"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
)

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	write := func(h http.HandlerFunc) http.HandlerFunc { return s.viaLeader(false, h) }
	read := func(h http.HandlerFunc) http.HandlerFunc { return s.viaLeader(true, h) }

	// About this agent: answered locally.
	mux.HandleFunc("GET /v1/status", s.handleStatus)
	mux.HandleFunc("GET /v1/members", s.handleMembers)
	mux.HandleFunc("POST /v1/join", s.handleJoin)
	mux.HandleFunc("POST /v1/leave", s.handleLeave)
	mux.HandleFunc("GET /v1/raft/peers", s.handlePeers)
	mux.HandleFunc("GET /metrics", s.handleMetrics)

	mux.HandleFunc("POST /v1/raft/remove-peer", write(s.handleRemovePeer))

	mux.HandleFunc("GET /v1/hosts", read(s.handleHosts))
	mux.HandleFunc("GET /v1/hosts/{id}", read(s.handleHost))
	mux.HandleFunc("PUT /v1/hosts/{id}", write(s.handleHostRegister))
	mux.HandleFunc("POST /v1/hosts/{id}/fail", write(s.handleHostFail))

	mux.HandleFunc("GET /v1/vms", read(s.handleVMs))
	mux.HandleFunc("GET /v1/vms/{id}", read(s.handleVM))
	mux.HandleFunc("POST /v1/vms", write(s.handleVMCreate))
	mux.HandleFunc("POST /v1/vms/{id}/end", write(s.handleVMEnd))
	mux.HandleFunc("POST /v1/vms/{id}/started", write(s.handleVMStarted))
	mux.HandleFunc("POST /v1/vms/{id}/clone-state", write(s.handleCloneState))

	mux.HandleFunc("GET /v1/tickets", read(s.handleTickets))
	mux.HandleFunc("GET /v1/tickets/{id}", read(s.handleTicket))
	mux.HandleFunc("POST /v1/tickets", write(s.handleTicketCreate))
	mux.HandleFunc("POST /v1/tickets/{id}/clone", write(s.handleTicketClone))
	mux.HandleFunc("POST /v1/tickets/{id}/join", write(s.handleTicketJoin))
	mux.HandleFunc("POST /v1/tickets/{id}/kill", write(s.handleTicketKill))
	mux.HandleFunc("POST /v1/tickets/{id}/create-clones", write(s.handleCreateClones))

	mux.HandleFunc("GET /v1/clones", read(s.handleClones))

	mux.HandleFunc("GET /v1/descriptors", read(s.handleDescriptors))
	mux.HandleFunc("GET /v1/descriptors/{id}", read(s.handleDescriptor))
	mux.HandleFunc("POST /v1/descriptors", write(s.handleDescriptorCreate))

	mux.HandleFunc("GET /v1/checkpoints", read(s.handleCheckpoints))
	mux.HandleFunc("GET /v1/checkpoints/{id}", read(s.handleCheckpoint))
	mux.HandleFunc("POST /v1/checkpoints", write(s.handleCheckpointCreate))

	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("no endpoint %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// --- agent-local endpoints ---

func (s *Server) handleStatus(w http.ResponseWriter, r *http.Request) {
	addr, id := s.raft.LeaderWithID()
	st := api.Status{NodeID: s.cfg.NodeID, State: s.raft.State().String(), Leader: string(addr), LeaderID: string(id),
		Term: s.raft.CurrentTerm(), CommitIndex: s.raft.CommitIndex(), AppliedIndex: s.raft.AppliedIndex(), LastIndex: s.raft.LastIndex()}
	if cf := s.raft.GetConfiguration(); cf.Error() == nil {
		st.Peers = len(cf.Configuration().Servers)
	}
	writeJSON(w, http.StatusOK, 0, st)
}

func (s *Server) handleMembers(w http.ResponseWriter, r *http.Request) {
	out := []api.Member{}
	for _, m := range s.gossip.Members() {
		out = append(out, api.Member{Name: m.Name, Addr: m.Addr, Status: string(m.Status), Role: string(m.Meta.Role),
			API: m.Meta.API, Raft: m.Meta.Raft, Slots: m.Meta.Slots, MemMB: m.Meta.MemMB})
	}
	writeJSON(w, http.StatusOK, 0, out)
}

func (s *Server) handleJoin(w http.ResponseWriter, r *http.Request) {
	var req api.JoinRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if len(req.Addrs) == 0 || len(req.Addrs) > 64 {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, "give 1 to 64 gossip addresses")
		return
	}
	for _, a := range req.Addrs {
		if err := fsm.ValidateAddr("gossip address", a, false); err != nil {
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, err.Error())
			return
		}
	}
	n, err := s.gossip.Join(req.Addrs)
	if err != nil {
		writeError(w, http.StatusBadGateway, "join_failed", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, 0, api.JoinResponse{Joined: n})
}

func (s *Server) handleLeave(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	defer cancel()
	if err := s.Leave(ctx); err != nil {
		writeError(w, http.StatusInternalServerError, "internal", err.Error())
		return
	}
	writeJSON(w, http.StatusOK, 0, map[string]bool{"left": true})
}

func (s *Server) handlePeers(w http.ResponseWriter, r *http.Request) {
	cf := s.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		writeError(w, http.StatusInternalServerError, "internal", err.Error())
		return
	}
	_, leader := s.raft.LeaderWithID()
	out := []api.Peer{}
	for _, srv := range cf.Configuration().Servers {
		state := "follower"
		if srv.ID == leader {
			state = "leader"
		}
		out = append(out, api.Peer{ID: string(srv.ID), Address: string(srv.Address), State: state, Voter: srv.Suffrage == raft.Voter})
	}
	writeJSON(w, http.StatusOK, 0, out)
}

func (s *Server) handleRemovePeer(w http.ResponseWriter, r *http.Request) {
	var req api.RemovePeerRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if err := fsm.ValidateID(req.ID); err != nil {
		writeErr(w, err)
		return
	}
	cf := s.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		writeError(w, http.StatusInternalServerError, "internal", err.Error())
		return
	}
	found := false
	for _, srv := range cf.Configuration().Servers {
		found = found || string(srv.ID) == req.ID
	}
	if !found {
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("no raft peer %q", req.ID))
		return
	}
	if err := s.raft.RemoveServer(raft.ServerID(req.ID), 0, applyTimeout).Error(); err != nil {
		writeErr(w, fmt.Errorf("%w: %v", errUnknownOutcome, err))
		return
	}
	s.log.Info("removed raft peer", "node", req.ID)
	writeJSON(w, http.StatusOK, 0, map[string]string{"removed": req.ID})
}

// --- replicated state: writes ---

// commit applies a command and returns its result, writing the error
// response itself when there is one.
func (s *Server) commit(w http.ResponseWriter, c fsm.Command) (*fsm.Result, bool) {
	res, err := s.apply(c)
	if err == nil {
		err = res.Err
	}
	if err != nil {
		writeErr(w, err)
		return nil, false
	}
	return res, true
}

func (s *Server) handleHostRegister(w http.ResponseWriter, r *http.Request) {
	var req api.HostRequest
	if !decodeBody(w, r, &req) {
		return
	}
	id := r.PathValue("id")
	res, ok := s.commit(w, &fsm.HostRegister{ID: id, GossipAddr: req.GossipAddr, APIAddr: req.APIAddr, McastAddr: req.McastAddr,
		Slots: req.Slots, MemMB: req.MemMB})
	if !ok {
		return
	}
	h, _ := s.fsm.Host(id)
	writeJSON(w, http.StatusOK, res.Index, h)
}

func (s *Server) handleHostFail(w http.ResponseWriter, r *http.Request) {
	var req api.HostFailRequest
	if !decodeBody(w, r, &req) {
		return
	}
	id := r.PathValue("id")
	res, ok := s.commit(w, &fsm.HostFail{ID: id, Left: req.Left, Reason: req.Reason})
	if !ok {
		return
	}
	h, _ := s.fsm.Host(id)
	writeJSON(w, http.StatusOK, res.Index, h)
}

func (s *Server) handleVMCreate(w http.ResponseWriter, r *http.Request) {
	var req api.VMRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if req.Host == "" {
		if !req.Launch {
			writeErr(w, fmt.Errorf("%w: host is required unless the VM is launched", fsm.ErrInvalid))
			return
		}
		if req.Host = s.placeVM(req.MemMB); req.Host == "" {
			writeErr(w, fmt.Errorf("%w: no alive host has %d MiB free", fsm.ErrNoCapacity, req.MemMB))
			return
		}
	}
	res, ok := s.commit(w, &fsm.VMCreate{RequestID: req.RequestID, Name: req.Name, Host: req.Host, MemMB: req.MemMB,
		VCPUs: req.VCPUs, Launch: req.Launch, Kernel: req.Kernel, Initrd: req.Initrd, Cmd: req.Cmd})
	if !ok {
		return
	}
	vm, _ := s.fsm.VM(res.ID)
	writeJSON(w, http.StatusOK, res.Index, vm)
}

func (s *Server) handleVMEnd(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req api.VMEndRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, &fsm.VMEnd{VMID: id, Reason: req.Reason})
	if !ok {
		return
	}
	vm, _ := s.fsm.VM(id)
	writeJSON(w, http.StatusOK, res.Index, vm)
}

func (s *Server) handleVMStarted(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	if !decodeBody(w, r, &struct{}{}) {
		return
	}
	res, ok := s.commit(w, &fsm.VMStarted{VMID: id})
	if !ok {
		return
	}
	vm, _ := s.fsm.VM(id)
	writeJSON(w, http.StatusOK, res.Index, vm)
}

func (s *Server) handleCloneState(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req api.CloneStateRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, &fsm.CloneUpdate{RequestID: req.RequestID, VMID: id, State: req.State, Status: req.Status, Result: req.Result, Reason: req.Reason})
	if !ok {
		return
	}
	vm, _ := s.fsm.VM(id)
	t, _, _ := s.fsm.Ticket(vm.Ticket)
	writeJSON(w, http.StatusOK, res.Index, t)
}

// maxPlacementAttempts bounds retries when capacity changes between placing
// a ticket and applying it.
const maxPlacementAttempts = 8

func (s *Server) handleTicketCreate(w http.ResponseWriter, r *http.Request) {
	var req api.TicketRequest
	if !decodeBody(w, r, &req) {
		return
	}
	if req.N < 1 || req.N > fsm.MaxClonesPerTicket {
		writeErr(w, fmt.Errorf("%w: n=%d must be 1..%d", fsm.ErrInvalid, req.N, fsm.MaxClonesPerTicket))
		return
	}
	for attempt := 0; ; attempt++ {
		hosts, _ := s.fsm.Hosts()
		placements := place(hosts, req.N)
		if len(placements) == 0 {
			writeErr(w, fmt.Errorf("%w: no host has a free clone slot", fsm.ErrNoCapacity))
			return
		}
		res, err := s.apply(&fsm.TicketCreate{RequestID: req.RequestID, ParentVM: req.ParentVM, Requested: req.N, Placements: placements})
		if err == nil {
			err = res.Err
		}
		if errors.Is(err, fsm.ErrNoCapacity) && attempt < maxPlacementAttempts {
			continue // another ticket took the capacity first: place again
		}
		if err != nil {
			writeErr(w, err)
			return
		}
		s.mx.ticketCreated()
		t, _, _ := s.fsm.Ticket(res.ID)
		writeJSON(w, http.StatusOK, res.Index, t)
		return
	}
}

func (s *Server) handleTicketClone(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req api.DescriptorRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, &fsm.DescriptorCreate{RequestID: req.RequestID, Ticket: id, ParentVM: req.ParentVM, Host: req.Host,
		Size: req.Size, SHA256: req.SHA256, MemserverAddr: req.MemserverAddr, McastGroup: req.McastGroup, PageCount: req.PageCount,
		McastKey: newMcastKey()})
	if !ok {
		return
	}
	d, _ := s.fsm.Descriptor(res.ID)
	t, _, _ := s.fsm.Ticket(id)
	writeJSON(w, http.StatusOK, res.Index, api.CloneResponse{Descriptor: d, Ticket: t})
}

func (s *Server) ticketCall(w http.ResponseWriter, r *http.Request, mk func(id uint64, req api.CallerRequest) fsm.Command) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req api.CallerRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, mk(id, req))
	if !ok {
		return
	}
	t, _, _ := s.fsm.Ticket(id)
	writeJSON(w, http.StatusOK, res.Index, t)
}

func (s *Server) handleTicketJoin(w http.ResponseWriter, r *http.Request) {
	s.ticketCall(w, r, func(id uint64, req api.CallerRequest) fsm.Command {
		return &fsm.TicketJoin{RequestID: req.RequestID, Ticket: id, Caller: req.Caller}
	})
}

func (s *Server) handleTicketKill(w http.ResponseWriter, r *http.Request) {
	s.ticketCall(w, r, func(id uint64, req api.CallerRequest) fsm.Command {
		return &fsm.TicketKill{RequestID: req.RequestID, Ticket: id, Caller: req.Caller, Reason: req.Reason}
	})
}

func (s *Server) handleCreateClones(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	var req api.CreateClonesRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, &fsm.CreateClones{RequestID: req.RequestID, Ticket: id, Checkpoint: req.Checkpoint, Caller: req.Caller,
		McastKey: newMcastKey()})
	if !ok {
		return
	}
	t, _, _ := s.fsm.Ticket(id)
	writeJSON(w, http.StatusOK, res.Index, t)
}

func (s *Server) handleDescriptorCreate(w http.ResponseWriter, r *http.Request) {
	var req api.DescriptorRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, &fsm.DescriptorCreate{RequestID: req.RequestID, ParentVM: req.ParentVM, Host: req.Host,
		Size: req.Size, SHA256: req.SHA256, MemserverAddr: req.MemserverAddr, McastGroup: req.McastGroup, PageCount: req.PageCount})
	if !ok {
		return
	}
	d, _ := s.fsm.Descriptor(res.ID)
	writeJSON(w, http.StatusOK, res.Index, d)
}

func (s *Server) handleCheckpointCreate(w http.ResponseWriter, r *http.Request) {
	var req api.DescriptorRequest
	if !decodeBody(w, r, &req) {
		return
	}
	res, ok := s.commit(w, &fsm.CheckpointCreate{RequestID: req.RequestID, ParentVM: req.ParentVM, Host: req.Host,
		Size: req.Size, SHA256: req.SHA256, MemserverAddr: req.MemserverAddr, McastGroup: req.McastGroup, PageCount: req.PageCount})
	if !ok {
		return
	}
	c, _ := s.fsm.Checkpoint(res.ID)
	writeJSON(w, http.StatusOK, res.Index, c)
}

// --- replicated state: reads (blocking) ---

func notFound(what string, id interface{}) error {
	return fmt.Errorf("%w: %s %v", fsm.ErrNotFound, what, id)
}

func (s *Server) handleHosts(w http.ResponseWriter, r *http.Request) {
	s.blocking(w, r, func() (interface{}, uint64, error) {
		h, idx := s.fsm.Hosts()
		return h, idx, nil
	})
}

func (s *Server) handleHost(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s.blocking(w, r, func() (interface{}, uint64, error) {
		h, ok := s.fsm.Host(id)
		if !ok {
			return nil, 0, notFound("host", id)
		}
		return h, max(h.ModifyIndex, 1), nil
	})
}

func (s *Server) handleVMs(w http.ResponseWriter, r *http.Request) {
	host := r.URL.Query().Get("host")
	s.blocking(w, r, func() (interface{}, uint64, error) {
		v, idx := s.fsm.VMs(host)
		if v == nil {
			v = []fsm.VM{}
		}
		return v, idx, nil
	})
}

func (s *Server) handleVM(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.blocking(w, r, func() (interface{}, uint64, error) {
		vm, ok := s.fsm.VM(id)
		if !ok {
			return nil, 0, notFound("vm", id)
		}
		return vm, max(vm.ModifyIndex, 1), nil
	})
}

func (s *Server) handleTickets(w http.ResponseWriter, r *http.Request) {
	parent, ok := queryUint(w, r, "parent")
	if !ok {
		return
	}
	s.blocking(w, r, func() (interface{}, uint64, error) {
		t, idx := s.fsm.Tickets(parent)
		if t == nil {
			t = []fsm.Ticket{}
		}
		return t, idx, nil
	})
}

func (s *Server) handleTicket(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.blocking(w, r, func() (interface{}, uint64, error) {
		t, idx, ok := s.fsm.Ticket(id)
		if !ok {
			return nil, 0, notFound("ticket", id)
		}
		return t, idx, nil
	})
}

func (s *Server) handleClones(w http.ResponseWriter, r *http.Request) {
	host := r.URL.Query().Get("host")
	live := r.URL.Query().Has("live")
	s.blocking(w, r, func() (interface{}, uint64, error) {
		c, idx := s.fsm.Clones(host, live)
		if c == nil {
			c = []fsm.Clone{}
		}
		return c, idx, nil
	})
}

func (s *Server) handleDescriptors(w http.ResponseWriter, r *http.Request) {
	s.blocking(w, r, func() (interface{}, uint64, error) {
		d, idx := s.fsm.Descriptors()
		if d == nil {
			d = []fsm.Descriptor{}
		}
		return d, idx, nil
	})
}

func (s *Server) handleDescriptor(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.blocking(w, r, func() (interface{}, uint64, error) {
		d, ok := s.fsm.Descriptor(id)
		if !ok {
			return nil, 0, notFound("descriptor", id)
		}
		return d, max(d.CreateIndex, 1), nil
	})
}

func (s *Server) handleCheckpoints(w http.ResponseWriter, r *http.Request) {
	s.blocking(w, r, func() (interface{}, uint64, error) {
		c, idx := s.fsm.Checkpoints()
		if c == nil {
			c = []fsm.Checkpoint{}
		}
		return c, idx, nil
	})
}

func (s *Server) handleCheckpoint(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.blocking(w, r, func() (interface{}, uint64, error) {
		c, ok := s.fsm.Checkpoint(id)
		if !ok {
			return nil, 0, notFound("checkpoint", id)
		}
		return c, max(c.CreateIndex, 1), nil
	})
}

// newMcastKey is a fresh multicast session key for a ticket's clones: the
// coordinator hands it out, through the replicated ticket, to the parent's
// host (the sender) and the clones' hosts (the members).
func newMcastKey() string {
	var k [32]byte
	rand.Read(k[:]) // never fails (crypto/rand crashes the program instead)
	return hex.EncodeToString(k[:])
}
