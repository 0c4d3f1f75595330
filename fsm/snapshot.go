package fsm

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
)

// Snapshot format: a msgpack stream of a snapshotHeader, then records, each a
// record type (uint8) followed by its body, then recordEnd. Records come in a
// fixed order sorted by key, so equal states give byte-identical snapshots.
const (
	snapshotMagic   = "snowflock-fsm"
	snapshotVersion = 1
)

type recordType uint8

const (
	recordHost       recordType = 1
	recordVM         recordType = 2
	recordTicket     recordType = 3
	recordClone      recordType = 4
	recordDescriptor recordType = 5
	recordCheckpoint recordType = 6
	recordRequest    recordType = 7
	recordEnd        recordType = 0xff
)

type snapshotHeader struct {
	Magic          string
	Version        int
	Index          uint64
	NextVM         uint64
	NextTicket     uint64
	NextDescriptor uint64
	NextCheckpoint uint64
}

// Snapshot captures the state for raft. The copy is taken under the lock so
// that Persist can run concurrently with further Applies.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &fsmSnapshot{st: f.st.clone()}, nil
}

type fsmSnapshot struct{ st *state }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	w := bufio.NewWriter(sink)
	if err := s.st.write(w); err != nil {
		sink.Cancel()
		return err
	}
	if err := w.Flush(); err != nil {
		sink.Cancel()
		return fmt.Errorf("snapshot flush: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

// Dump writes the state in snapshot format. Two FSMs that applied the same
// log produce the same bytes.
func (f *FSM) Dump(w io.Writer) error {
	f.mu.RLock()
	st := f.st.clone()
	f.mu.RUnlock()
	bw := bufio.NewWriter(w)
	if err := st.write(bw); err != nil {
		return err
	}
	return bw.Flush()
}

// Restore replaces the whole state with the snapshot read from rc. On error
// the current state is kept.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := readState(bufio.NewReader(rc))
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.st = st
	f.wake()
	f.mu.Unlock()
	return nil
}

func sortedKeys[K cmp.Ordered, V any](m map[K]V) []K {
	keys := make([]K, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func sortedCloneKeys(m map[cloneKey]*Clone) []cloneKey {
	keys := make([]cloneKey, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b cloneKey) int {
		if c := cmp.Compare(a.ticket, b.ticket); c != 0 {
			return c
		}
		return cmp.Compare(a.k, b.k)
	})
	return keys
}

func (s *state) write(w io.Writer) error {
	enc := codec.NewEncoder(w, mph)
	var err error
	put := func(t recordType, v interface{}) {
		if err == nil {
			err = enc.Encode(uint8(t))
		}
		if err == nil {
			err = enc.Encode(v)
		}
	}
	err = enc.Encode(&snapshotHeader{Magic: snapshotMagic, Version: snapshotVersion, Index: s.index,
		NextVM: s.nextVM, NextTicket: s.nextTicket, NextDescriptor: s.nextDescriptor, NextCheckpoint: s.nextCheckpoint})
	for _, k := range sortedKeys(s.hosts) {
		put(recordHost, s.hosts[k])
	}
	for _, k := range sortedKeys(s.vms) {
		put(recordVM, s.vms[k])
	}
	for _, k := range sortedKeys(s.tickets) {
		put(recordTicket, s.tickets[k])
	}
	for _, k := range sortedCloneKeys(s.clones) {
		put(recordClone, s.clones[k])
	}
	for _, k := range sortedKeys(s.descriptors) {
		put(recordDescriptor, s.descriptors[k])
	}
	for _, k := range sortedKeys(s.checkpoints) {
		put(recordCheckpoint, s.checkpoints[k])
	}
	for _, id := range s.requestOrder { // oldest first: order is the eviction order
		put(recordRequest, &requestRecord{ID: id, Object: s.requests[id]})
	}
	if err == nil {
		err = enc.Encode(uint8(recordEnd))
	}
	if err != nil {
		return fmt.Errorf("snapshot write: %w", err)
	}
	return nil
}

// ErrBadSnapshot is returned by Restore for a snapshot it cannot use.
var ErrBadSnapshot = errors.New("bad snapshot")

func readState(r io.Reader) (*state, error) {
	dec := codec.NewDecoder(r, mph)
	var hdr snapshotHeader
	if err := dec.Decode(&hdr); err != nil {
		return nil, fmt.Errorf("%w: header: %v", ErrBadSnapshot, err)
	}
	if hdr.Magic != snapshotMagic || hdr.Version != snapshotVersion {
		return nil, fmt.Errorf("%w: magic %q version %d", ErrBadSnapshot, hdr.Magic, hdr.Version)
	}
	st := newState()
	st.index, st.nextVM, st.nextTicket = hdr.Index, hdr.NextVM, hdr.NextTicket
	st.nextDescriptor, st.nextCheckpoint = hdr.NextDescriptor, hdr.NextCheckpoint
	for {
		var t uint8
		if err := dec.Decode(&t); err != nil {
			return nil, fmt.Errorf("%w: record type: %v", ErrBadSnapshot, err)
		}
		var err error
		switch recordType(t) {
		case recordEnd:
			if err := st.check(); err != nil {
				return nil, err
			}
			st.recomputeUsage()
			return st, nil
		case recordHost:
			v := &Host{}
			if err = dec.Decode(v); err == nil {
				st.hosts[v.ID] = v
			}
		case recordVM:
			v := &VM{}
			if err = dec.Decode(v); err == nil {
				st.vms[v.ID] = v
			}
		case recordTicket:
			v := &Ticket{}
			if err = dec.Decode(v); err == nil {
				st.tickets[v.ID] = v
			}
		case recordClone:
			v := &Clone{}
			if err = dec.Decode(v); err == nil {
				st.clones[cloneKey{v.Ticket, v.K}] = v
			}
		case recordDescriptor:
			v := &Descriptor{}
			if err = dec.Decode(v); err == nil {
				st.descriptors[v.ID] = v
			}
		case recordCheckpoint:
			v := &Checkpoint{}
			if err = dec.Decode(v); err == nil {
				st.checkpoints[v.ID] = v
			}
		case recordRequest:
			v := &requestRecord{}
			if err = dec.Decode(v); err == nil {
				st.requests[v.ID] = v.Object
				st.requestOrder = append(st.requestOrder, v.ID)
			}
		default:
			return nil, fmt.Errorf("%w: unknown record type %d", ErrBadSnapshot, t)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: record type %d: %v", ErrBadSnapshot, t, err)
		}
	}
}

// check verifies the references that Apply relies on, so that a corrupt
// snapshot is refused instead of crashing a later Apply.
func (s *state) check() error {
	bad := func(format string, a ...interface{}) error {
		return fmt.Errorf("%w: %s", ErrBadSnapshot, fmt.Sprintf(format, a...))
	}
	// A counter at 0 would hand out ID 0; one at the top would wrap around
	// and overwrite: refuse such a header rather than allocate from it.
	for _, n := range []uint64{s.nextVM, s.nextTicket, s.nextDescriptor, s.nextCheckpoint} {
		if n == 0 || n > 1<<62 {
			return bad("id counter %d out of range", n)
		}
	}
	for id, vm := range s.vms {
		if id == 0 || id >= s.nextVM {
			return bad("vm id %d outside 1..%d", id, s.nextVM-1)
		}
		if vm.Role == RoleClone && s.clones[cloneKey{vm.Ticket, vm.CloneID}] == nil {
			return bad("clone vm %d has no clone record", id)
		}
	}
	for id, t := range s.tickets {
		if id == 0 || id >= s.nextTicket || t.Granted != len(t.Placements) {
			return bad("ticket %d malformed", id)
		}
		for k := 1; k <= t.Granted && t.State != TicketReserved; k++ {
			if s.clones[cloneKey{id, k}] == nil && t.State == TicketActive {
				return bad("active ticket %d lacks clone %d", id, k)
			}
		}
	}
	for k, cl := range s.clones {
		if s.tickets[k.ticket] == nil || s.vms[cl.VMID] == nil {
			return bad("clone %d/%d dangles", k.ticket, k.k)
		}
	}
	if len(s.requestOrder) != len(s.requests) {
		return bad("duplicate request ids")
	}
	return nil
}

// clone returns a deep copy.
func (s *state) clone() *state {
	c := newState()
	c.index, c.nextVM, c.nextTicket, c.nextDescriptor, c.nextCheckpoint =
		s.index, s.nextVM, s.nextTicket, s.nextDescriptor, s.nextCheckpoint
	for k, v := range s.hosts {
		h := *v
		c.hosts[k] = &h
	}
	for k, v := range s.vms {
		vm := *v
		c.vms[k] = &vm
	}
	for k, v := range s.tickets {
		t := *v
		t.Placements = slices.Clone(v.Placements)
		c.tickets[k] = &t
	}
	for k, v := range s.clones {
		cl := *v
		c.clones[k] = &cl
	}
	for k, v := range s.descriptors {
		d := *v
		c.descriptors[k] = &d
	}
	for k, v := range s.checkpoints {
		cp := *v
		c.checkpoints[k] = &cp
	}
	for k, v := range s.requests {
		c.requests[k] = v
	}
	c.requestOrder = slices.Clone(s.requestOrder)
	return c
}
