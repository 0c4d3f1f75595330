package fsm

import "slices"

// The query methods return copies sorted by ID, with the index that a
// blocking query on them should wait past: the highest ModifyIndex among the
// objects returned, or 1 when there are none.

func maxIndex(idx uint64, more ...uint64) uint64 {
	for _, m := range more {
		idx = max(idx, m)
	}
	return max(idx, 1)
}

// Host returns one host.
func (f *FSM) Host(id string) (Host, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	h, ok := f.st.hosts[id]
	if !ok {
		return Host{}, false
	}
	return *h, true
}

// Hosts returns every host.
func (f *FSM) Hosts() ([]Host, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]Host, 0, len(f.st.hosts))
	var idx uint64
	for _, k := range sortedKeys(f.st.hosts) {
		h := f.st.hosts[k]
		out = append(out, *h)
		idx = max(idx, h.ModifyIndex)
	}
	return out, maxIndex(idx)
}

// VM returns one VM.
func (f *FSM) VM(id uint64) (VM, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	vm, ok := f.st.vms[id]
	if !ok {
		return VM{}, false
	}
	return *vm, true
}

// VMs returns every VM, or those on one host when host is not empty.
func (f *FSM) VMs(host string) ([]VM, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []VM
	var idx uint64
	for _, k := range sortedKeys(f.st.vms) {
		if vm := f.st.vms[k]; host == "" || vm.Host == host {
			out = append(out, *vm)
			idx = max(idx, vm.ModifyIndex)
		}
	}
	return out, maxIndex(idx)
}

// Ticket returns a ticket with its clones.
func (f *FSM) Ticket(id uint64) (TicketView, uint64, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	t, ok := f.st.tickets[id]
	if !ok {
		return TicketView{}, 0, false
	}
	v := TicketView{Ticket: *t, Clones: []Clone{}}
	v.Placements = slices.Clone(t.Placements)
	idx := t.ModifyIndex
	for k := 1; k <= t.Granted; k++ {
		if cl := f.st.clones[cloneKey{id, k}]; cl != nil {
			v.Clones = append(v.Clones, *cl)
			idx = max(idx, cl.ModifyIndex)
		}
	}
	return v, maxIndex(idx), true
}

// Tickets returns every ticket, or those of one parent VM when parent != 0.
func (f *FSM) Tickets(parent uint64) ([]Ticket, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []Ticket
	var idx uint64
	for _, k := range sortedKeys(f.st.tickets) {
		if t := f.st.tickets[k]; parent == 0 || t.ParentVM == parent {
			c := *t
			c.Placements = slices.Clone(t.Placements)
			out = append(out, c)
			idx = max(idx, t.ModifyIndex)
		}
	}
	return out, maxIndex(idx)
}

// Clones returns the clones placed on a host (every clone when host is
// empty); live only keeps pending and running ones. A host watches this with
// a blocking query to learn its assignments.
func (f *FSM) Clones(host string, live bool) ([]Clone, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []Clone
	var idx uint64
	for _, k := range sortedCloneKeys(f.st.clones) {
		cl := f.st.clones[k]
		if host != "" && cl.Host != host {
			continue
		}
		idx = max(idx, cl.ModifyIndex)
		if !live || !cl.State.Terminal() {
			out = append(out, *cl)
		}
	}
	return out, maxIndex(idx)
}

// Descriptor returns one descriptor.
func (f *FSM) Descriptor(id uint64) (Descriptor, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	d, ok := f.st.descriptors[id]
	if !ok {
		return Descriptor{}, false
	}
	return *d, true
}

// Descriptors returns every descriptor.
func (f *FSM) Descriptors() ([]Descriptor, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []Descriptor
	var idx uint64
	for _, k := range sortedKeys(f.st.descriptors) {
		d := f.st.descriptors[k]
		out = append(out, *d)
		idx = max(idx, d.CreateIndex)
	}
	return out, maxIndex(idx)
}

// Checkpoint returns one checkpoint.
func (f *FSM) Checkpoint(id uint64) (Checkpoint, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	c, ok := f.st.checkpoints[id]
	if !ok {
		return Checkpoint{}, false
	}
	return *c, true
}

// Checkpoints returns every checkpoint.
func (f *FSM) Checkpoints() ([]Checkpoint, uint64) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []Checkpoint
	var idx uint64
	for _, k := range sortedKeys(f.st.checkpoints) {
		c := f.st.checkpoints[k]
		out = append(out, *c)
		idx = max(idx, c.CreateIndex)
	}
	return out, maxIndex(idx)
}

// Counts summarises the state for metrics.
type Counts struct {
	Hosts        map[HostStatus]int
	VMs          map[VMState]int
	Tickets      map[TicketState]int
	Clones       map[CloneState]int
	Descriptors  int
	Checkpoints  int
	FreeSlots    int
	NextVMID     uint64
	AppliedIndex uint64
}

// Counts returns object counts by state.
func (f *FSM) Counts() Counts {
	f.mu.RLock()
	defer f.mu.RUnlock()
	c := Counts{Hosts: map[HostStatus]int{}, VMs: map[VMState]int{}, Tickets: map[TicketState]int{},
		Clones: map[CloneState]int{}, Descriptors: len(f.st.descriptors), Checkpoints: len(f.st.checkpoints),
		NextVMID: f.st.nextVM, AppliedIndex: f.st.index}
	for _, h := range f.st.hosts {
		c.Hosts[h.Status]++
		c.FreeSlots += h.FreeSlots()
	}
	for _, v := range f.st.vms {
		c.VMs[v.State]++
	}
	for _, t := range f.st.tickets {
		c.Tickets[t.State]++
	}
	for _, cl := range f.st.clones {
		c.Clones[cl.State]++
	}
	return c
}
