package fsm

import (
	"errors"
	"fmt"
	"sync"

	"github.com/hashicorp/raft"
)

// Result is what Apply returns through raft's ApplyFuture.Response.
type Result struct {
	Index uint64 // raft index of the entry
	ID    uint64 // ID of the object the command created, if any
	// Duplicate is set when RequestID matched an earlier command: ID is the
	// object that command created and nothing changed.
	Duplicate bool
	Err       error
}

type cloneKey struct {
	ticket uint64
	k      int
}

// maxRequests bounds the table of recent request IDs kept for deduplication.
const maxRequests = 1 << 16

type requestRecord struct {
	ID     string
	Object uint64
}

// state is everything the FSM replicates. It is only touched under FSM.mu.
type state struct {
	index          uint64
	nextVM         uint64
	nextTicket     uint64
	nextDescriptor uint64
	nextCheckpoint uint64
	hosts          map[string]*Host
	vms            map[uint64]*VM
	tickets        map[uint64]*Ticket
	clones         map[cloneKey]*Clone
	descriptors    map[uint64]*Descriptor
	checkpoints    map[uint64]*Checkpoint
	requests       map[string]uint64
	requestOrder   []string // oldest first; evicted beyond maxRequests
}

func newState() *state {
	return &state{
		nextVM: 1, nextTicket: 1, nextDescriptor: 1, nextCheckpoint: 1,
		hosts:       map[string]*Host{},
		vms:         map[uint64]*VM{},
		tickets:     map[uint64]*Ticket{},
		clones:      map[cloneKey]*Clone{},
		descriptors: map[uint64]*Descriptor{},
		checkpoints: map[uint64]*Checkpoint{},
		requests:    map[string]uint64{},
	}
}

// FSM implements raft.FSM. It is safe for concurrent use: raft calls Apply,
// Snapshot and Restore from its FSM goroutine while API handlers read.
type FSM struct {
	mu     sync.RWMutex
	st     *state
	notify chan struct{} // closed and replaced after every change
}

// New returns an empty FSM.
func New() *FSM {
	return &FSM{st: newState(), notify: make(chan struct{})}
}

var _ raft.FSM = (*FSM)(nil)

// Apply applies one committed log entry. It returns *Result for commands and
// nil for entries that are not commands.
func (f *FSM) Apply(l *raft.Log) interface{} {
	if l.Type != raft.LogCommand {
		return nil
	}
	c, err := Decode(l.Data)
	if err != nil {
		if errors.Is(err, ErrUnknownCommand) && CommandType(l.Data[0])&IgnorableFlag != 0 {
			f.mu.Lock()
			f.st.index = l.Index
			f.wake()
			f.mu.Unlock()
			return nil
		}
		// Every replica would fail the same way on this entry, but a state
		// machine that cannot read its own log must not go on guessing.
		panic(fmt.Sprintf("fsm: cannot apply log entry %d: %v", l.Index, err))
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	res := f.st.apply(l.Index, c)
	f.st.index = l.Index
	f.wake()
	return res
}

// ApplyCommand applies a command directly, outside raft, at the given index.
// Tests and tools use it; the coordinator always goes through raft.
func (f *FSM) ApplyCommand(index uint64, c Command) *Result {
	b, err := Encode(c)
	if err != nil {
		return &Result{Index: index, Err: err}
	}
	r, _ := f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: b}).(*Result)
	return r
}

func (f *FSM) wake() {
	close(f.notify)
	f.notify = make(chan struct{})
}

// Watch returns a channel that is closed at the next change of state, and the
// index of the state it was taken at.
func (f *FSM) Watch() (<-chan struct{}, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.notify, f.st.index
}

// Index is the raft index of the last applied entry.
func (f *FSM) Index() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.st.index
}

func (s *state) apply(idx uint64, c Command) *Result {
	res := &Result{Index: idx}
	if err := c.Validate(); err != nil {
		res.Err = err
		return res
	}
	var reqID string
	if r, ok := c.(Requester); ok && r.requestID() != "" {
		// Keyed by command type too: an ID only ever repeats its own kind.
		reqID = fmt.Sprintf("%02x/%s", byte(c.Type()), r.requestID())
		if id, seen := s.requests[reqID]; seen {
			res.ID, res.Duplicate = id, true
			return res
		}
	}
	switch c := c.(type) {
	case *HostRegister:
		res.Err = s.hostRegister(idx, c)
	case *HostFail:
		res.Err = s.hostFail(idx, c)
	case *VMCreate:
		res.ID, res.Err = s.vmCreate(idx, c)
	case *VMEnd:
		res.Err = s.vmEnd(idx, c)
	case *VMStarted:
		res.Err = s.vmStarted(idx, c)
	case *TicketCreate:
		res.ID, res.Err = s.ticketCreate(idx, c)
	case *DescriptorCreate:
		res.ID, res.Err = s.descriptorCreate(idx, c)
	case *CloneUpdate:
		res.Err = s.cloneUpdate(idx, c)
	case *TicketJoin:
		res.Err = s.ticketJoin(idx, c)
	case *TicketKill:
		res.Err = s.ticketKill(idx, c)
	case *CheckpointCreate:
		res.ID, res.Err = s.checkpointCreate(idx, c)
	case *CreateClones:
		res.Err = s.createClones(idx, c)
	default:
		panic(fmt.Sprintf("fsm: no handler for %T", c))
	}
	if res.Err == nil && reqID != "" {
		s.remember(reqID, res.ID)
	}
	return res
}

func (s *state) remember(reqID string, id uint64) {
	s.requests[reqID] = id
	s.requestOrder = append(s.requestOrder, reqID)
	if len(s.requestOrder) > maxRequests {
		delete(s.requests, s.requestOrder[0])
		s.requestOrder = s.requestOrder[1:]
	}
}

func (s *state) hostRegister(idx uint64, c *HostRegister) error {
	h, ok := s.hosts[c.ID]
	if !ok {
		h = &Host{ID: c.ID, CreateIndex: idx}
		s.hosts[c.ID] = h
	}
	if ok && h.GossipAddr == c.GossipAddr && h.APIAddr == c.APIAddr && h.McastAddr == c.McastAddr &&
		h.Slots == c.Slots && h.MemMB == c.MemMB && h.Status == HostAlive {
		return nil // nothing new: keep ModifyIndex so watchers do not wake
	}
	h.GossipAddr, h.APIAddr, h.McastAddr, h.Slots, h.MemMB = c.GossipAddr, c.APIAddr, c.McastAddr, c.Slots, c.MemMB
	h.Status = HostAlive
	h.ModifyIndex = idx
	return nil
}

func (s *state) hostFail(idx uint64, c *HostFail) error {
	h, ok := s.hosts[c.ID]
	if !ok {
		return fmt.Errorf("%w: host %q", ErrNotFound, c.ID)
	}
	status := HostFailed
	if c.Left {
		status = HostLeft
	}
	if h.Status == status {
		return nil
	}
	h.Status = status
	h.ModifyIndex = idx
	reason := c.Reason
	if reason == "" {
		reason = fmt.Sprintf("host %s %s", c.ID, status)
	}
	for _, id := range sortedKeys(s.vms) {
		if vm := s.vms[id]; vm.Host == c.ID && vm.State != VMEnded {
			s.endVM(idx, vm, reason)
		}
	}
	return nil
}

func (s *state) vmCreate(idx uint64, c *VMCreate) (uint64, error) {
	h, ok := s.hosts[c.Host]
	if !ok {
		return 0, fmt.Errorf("%w: host %q", ErrNotFound, c.Host)
	}
	if h.Status != HostAlive {
		return 0, fmt.Errorf("%w: host %q is %s", ErrBadState, c.Host, h.Status)
	}
	id := s.nextVM
	s.nextVM++
	state := VMRunning
	if c.Launch {
		state = VMPending
	}
	s.vms[id] = &VM{ID: id, Name: c.Name, Host: c.Host, Role: RoleParent, State: state,
		MemMB: c.MemMB, VCPUs: c.VCPUs, Kernel: c.Kernel, Initrd: c.Initrd, Cmd: c.Cmd, CreateIndex: idx, ModifyIndex: idx}
	return id, nil
}

func (s *state) vmStarted(idx uint64, c *VMStarted) error {
	vm, ok := s.vms[c.VMID]
	if !ok {
		return fmt.Errorf("%w: vm %d", ErrNotFound, c.VMID)
	}
	if vm.Role != RoleParent {
		return fmt.Errorf("%w: vm %d is a clone; its host reports it through the clone state", ErrBadState, c.VMID)
	}
	switch vm.State {
	case VMRunning:
		return nil // a host repeating itself after a leader change
	case VMEnded:
		return fmt.Errorf("%w: vm %d already ended", ErrBadState, c.VMID)
	}
	vm.State, vm.ModifyIndex = VMRunning, idx
	return nil
}

func (s *state) vmEnd(idx uint64, c *VMEnd) error {
	vm, ok := s.vms[c.VMID]
	if !ok {
		return fmt.Errorf("%w: vm %d", ErrNotFound, c.VMID)
	}
	if vm.State == VMEnded {
		return nil
	}
	reason := c.Reason
	if reason == "" {
		reason = "vm ended"
	}
	s.endVM(idx, vm, reason)
	return nil
}

// endVM ends a VM and everything that depends on it: a clone that had not
// reached a terminal state fails; the undisposed tickets the VM requested
// (as a parent, or as a clone that cloned) are killed.
func (s *state) endVM(idx uint64, vm *VM, reason string) {
	vm.State, vm.Reason, vm.ModifyIndex = VMEnded, reason, idx
	if vm.Role == RoleClone {
		if cl := s.clones[cloneKey{vm.Ticket, vm.CloneID}]; cl != nil && !cl.State.Terminal() {
			s.finishClone(idx, cl, CloneFailed, reason)
		}
	}
	if reason == "" {
		reason = "exited"
	}
	// Killing tickets commutes (each touches its own clones; slot counts are
	// sums), so map order does not affect the resulting state.
	for _, t := range s.tickets {
		if t.ParentVM == vm.ID && !t.State.Disposed() {
			s.killTicket(idx, t, fmt.Sprintf("parent vm %d ended: %s", vm.ID, reason))
		}
	}
}

// finishClone moves a live clone to a terminal state and frees its slot.
func (s *state) finishClone(idx uint64, cl *Clone, to CloneState, reason string) {
	cl.State, cl.ModifyIndex = to, idx
	if reason != "" {
		cl.Reason = reason
	}
	if h := s.hosts[cl.Host]; h != nil {
		h.UsedSlots--
		h.ModifyIndex = idx
	}
	// The clone's VM ends with it, and so do the tickets it took as a
	// parent itself (a clone may clone).
	if vm := s.vms[cl.VMID]; vm != nil && vm.State != VMEnded {
		if to == CloneExited {
			reason = ""
		}
		s.endVM(idx, vm, reason)
	}
	if t := s.tickets[cl.Ticket]; t != nil {
		t.ModifyIndex = idx
	}
}

func (s *state) killTicket(idx uint64, t *Ticket, reason string) {
	if t.State == TicketReserved {
		s.releasePlacements(idx, t)
	}
	for k := 1; k <= t.Granted; k++ {
		if cl := s.clones[cloneKey{t.ID, k}]; cl != nil && !cl.State.Terminal() {
			s.finishClone(idx, cl, CloneKilled, reason)
		}
	}
	t.State, t.Reason, t.ModifyIndex = TicketKilled, reason, idx
}

func (s *state) releasePlacements(idx uint64, t *Ticket) {
	for _, hid := range t.Placements {
		if h := s.hosts[hid]; h != nil {
			h.UsedSlots--
			h.ModifyIndex = idx
		}
	}
}

func (s *state) ticketCreate(idx uint64, c *TicketCreate) (uint64, error) {
	parent, ok := s.vms[c.ParentVM]
	if !ok {
		return 0, fmt.Errorf("%w: vm %d", ErrNotFound, c.ParentVM)
	}
	if parent.State != VMRunning {
		return 0, fmt.Errorf("%w: vm %d is %s", ErrBadState, c.ParentVM, parent.State)
	}
	need := map[string]int{}
	for _, hid := range c.Placements {
		need[hid]++
	}
	for _, hid := range sortedKeys(need) {
		h, ok := s.hosts[hid]
		if !ok {
			return 0, fmt.Errorf("%w: host %q", ErrNotFound, hid)
		}
		if free := h.FreeSlots(); free < need[hid] {
			return 0, fmt.Errorf("%w: host %q has %d free slots, placement needs %d", ErrNoCapacity, hid, free, need[hid])
		}
	}
	id := s.nextTicket
	s.nextTicket++
	s.tickets[id] = &Ticket{ID: id, ParentVM: c.ParentVM, Requested: c.Requested, Granted: len(c.Placements),
		Placements: append([]string(nil), c.Placements...), State: TicketReserved, CreateIndex: idx, ModifyIndex: idx}
	for _, hid := range c.Placements {
		s.hosts[hid].UsedSlots++
		s.hosts[hid].ModifyIndex = idx
	}
	return id, nil
}

// reservedTicket returns the ticket if caller may start its clones.
func (s *state) reservedTicket(id, caller uint64) (*Ticket, error) {
	t, ok := s.tickets[id]
	if !ok {
		return nil, fmt.Errorf("%w: ticket %d", ErrNotFound, id)
	}
	if t.ParentVM != caller {
		return nil, fmt.Errorf("%w: ticket %d belongs to vm %d, not vm %d", ErrNotParent, id, t.ParentVM, caller)
	}
	if t.State.Disposed() {
		return nil, fmt.Errorf("%w: ticket %d is %s", ErrDisposed, id, t.State)
	}
	if t.State != TicketReserved {
		return nil, fmt.Errorf("%w: ticket %d is %s; a ticket clones once", ErrBadState, id, t.State)
	}
	if vm := s.vms[caller]; vm == nil || vm.State != VMRunning {
		return nil, fmt.Errorf("%w: parent vm %d is not running", ErrBadState, caller)
	}
	return t, nil
}

func (s *state) descriptorCreate(idx uint64, c *DescriptorCreate) (uint64, error) {
	var t *Ticket
	if c.Ticket != 0 {
		var err error
		if t, err = s.reservedTicket(c.Ticket, c.ParentVM); err != nil {
			return 0, err
		}
	} else if vm, ok := s.vms[c.ParentVM]; !ok {
		return 0, fmt.Errorf("%w: vm %d", ErrNotFound, c.ParentVM)
	} else if vm.State != VMRunning {
		return 0, fmt.Errorf("%w: vm %d is %s", ErrBadState, c.ParentVM, vm.State)
	}
	d := s.newDescriptor(idx, c.ParentVM, c.Host, c.Size, c.SHA256, c.MemserverAddr, c.McastGroup, c.PageCount)
	if t != nil {
		d.Ticket = t.ID
		t.McastKey = c.McastKey
		s.startClones(idx, t, d.ID)
	}
	return d.ID, nil
}

func (s *state) newDescriptor(idx, parent uint64, host string, size int64, sum, memserver, group string, pages int64) *Descriptor {
	d := &Descriptor{ID: s.nextDescriptor, ParentVM: parent, Host: host, Size: size, SHA256: sum,
		MemserverAddr: memserver, McastGroup: group, PageCount: pages, CreateIndex: idx}
	s.nextDescriptor++
	s.descriptors[d.ID] = d
	return d
}

// startClones turns a reserved ticket into clones 1..m, each with a fresh VM
// ID, pending on its placed host. A clone placed on a host that is no longer
// alive fails at once, so that join never waits for it.
func (s *state) startClones(idx uint64, t *Ticket, descriptor uint64) {
	parent := s.vms[t.ParentVM]
	t.State, t.Descriptor, t.ModifyIndex = TicketActive, descriptor, idx
	for k, hid := range t.Placements {
		k++
		id := s.nextVM
		s.nextVM++
		s.vms[id] = &VM{ID: id, Host: hid, Role: RoleClone, State: VMPending, MemMB: parent.MemMB, VCPUs: parent.VCPUs,
			Ticket: t.ID, CloneID: k, ParentVM: t.ParentVM, CreateIndex: idx, ModifyIndex: idx}
		cl := &Clone{Ticket: t.ID, K: k, VMID: id, Host: hid, State: ClonePending, CreateIndex: idx, ModifyIndex: idx}
		s.clones[cloneKey{t.ID, k}] = cl
		if h := s.hosts[hid]; h == nil || h.Status != HostAlive {
			s.finishClone(idx, cl, CloneFailed, fmt.Sprintf("host %s is not alive", hid))
		}
	}
}

func (s *state) cloneUpdate(idx uint64, c *CloneUpdate) error {
	vm, ok := s.vms[c.VMID]
	if !ok {
		return fmt.Errorf("%w: vm %d", ErrNotFound, c.VMID)
	}
	if vm.Role != RoleClone {
		return fmt.Errorf("%w: vm %d is a %s", ErrNotClone, c.VMID, vm.Role)
	}
	cl := s.clones[cloneKey{vm.Ticket, vm.CloneID}]
	if cl.State.Terminal() {
		return fmt.Errorf("%w: clone %d of ticket %d already %s", ErrBadState, cl.K, cl.Ticket, cl.State)
	}
	switch c.State {
	case CloneRunning:
		if cl.State == CloneRunning {
			return nil // a host repeating itself after a leader change
		}
		cl.State, cl.ModifyIndex = CloneRunning, idx
		vm.State, vm.ModifyIndex = VMRunning, idx
		s.tickets[cl.Ticket].ModifyIndex = idx
	case CloneExited:
		cl.Status, cl.Result = c.Status, c.Result
		s.finishClone(idx, cl, CloneExited, "")
	case CloneFailed:
		reason := c.Reason
		if reason == "" {
			reason = "failed"
		}
		s.finishClone(idx, cl, CloneFailed, reason)
	}
	return nil
}

func (s *state) ticketJoin(idx uint64, c *TicketJoin) error {
	t, ok := s.tickets[c.Ticket]
	if !ok {
		return fmt.Errorf("%w: ticket %d", ErrNotFound, c.Ticket)
	}
	if t.ParentVM != c.Caller {
		return fmt.Errorf("%w: ticket %d belongs to vm %d, not vm %d", ErrNotParent, c.Ticket, t.ParentVM, c.Caller)
	}
	if t.State.Disposed() {
		return fmt.Errorf("%w: ticket %d is %s", ErrDisposed, c.Ticket, t.State)
	}
	for k := 1; k <= t.Granted && t.State == TicketActive; k++ {
		if cl := s.clones[cloneKey{t.ID, k}]; !cl.State.Terminal() {
			return fmt.Errorf("%w: clone %d of ticket %d is %s", ErrClonesRunning, k, t.ID, cl.State)
		}
	}
	if t.State == TicketReserved {
		s.releasePlacements(idx, t)
	}
	t.State, t.ModifyIndex = TicketJoined, idx
	return nil
}

func (s *state) ticketKill(idx uint64, c *TicketKill) error {
	t, ok := s.tickets[c.Ticket]
	if !ok {
		return fmt.Errorf("%w: ticket %d", ErrNotFound, c.Ticket)
	}
	if c.Caller != 0 && t.ParentVM != c.Caller {
		return fmt.Errorf("%w: ticket %d belongs to vm %d, not vm %d", ErrNotParent, c.Ticket, t.ParentVM, c.Caller)
	}
	if t.State.Disposed() {
		return fmt.Errorf("%w: ticket %d is %s", ErrDisposed, c.Ticket, t.State)
	}
	reason := c.Reason
	if reason == "" {
		reason = "killed"
	}
	s.killTicket(idx, t, reason)
	return nil
}

func (s *state) checkpointCreate(idx uint64, c *CheckpointCreate) (uint64, error) {
	vm, ok := s.vms[c.ParentVM]
	if !ok {
		return 0, fmt.Errorf("%w: vm %d", ErrNotFound, c.ParentVM)
	}
	if vm.State != VMRunning {
		return 0, fmt.Errorf("%w: vm %d is %s", ErrBadState, c.ParentVM, vm.State)
	}
	d := s.newDescriptor(idx, c.ParentVM, c.Host, c.Size, c.SHA256, c.MemserverAddr, c.McastGroup, c.PageCount)
	cp := &Checkpoint{ID: s.nextCheckpoint, ParentVM: c.ParentVM, Descriptor: d.ID, CreateIndex: idx}
	s.nextCheckpoint++
	d.Checkpoint = cp.ID
	s.checkpoints[cp.ID] = cp
	return cp.ID, nil
}

func (s *state) createClones(idx uint64, c *CreateClones) error {
	t, err := s.reservedTicket(c.Ticket, c.Caller)
	if err != nil {
		return err
	}
	cp, ok := s.checkpoints[c.Checkpoint]
	if !ok {
		return fmt.Errorf("%w: checkpoint %d", ErrNotFound, c.Checkpoint)
	}
	if cp.ParentVM != c.Caller {
		return fmt.Errorf("%w: checkpoint %d belongs to vm %d", ErrNotParent, c.Checkpoint, cp.ParentVM)
	}
	t.McastKey = c.McastKey
	s.startClones(idx, t, cp.Descriptor)
	return nil
}

// recomputeUsage derives every host's UsedSlots from tickets and clones.
func (s *state) recomputeUsage() {
	for _, h := range s.hosts {
		h.UsedSlots = 0
	}
	for _, t := range s.tickets {
		for k, hid := range t.Placements {
			h := s.hosts[hid]
			if h == nil {
				continue
			}
			switch t.State {
			case TicketReserved:
				h.UsedSlots++
			case TicketActive:
				if cl := s.clones[cloneKey{t.ID, k + 1}]; cl != nil && !cl.State.Terminal() {
					h.UsedSlots++
				}
			}
		}
	}
}
