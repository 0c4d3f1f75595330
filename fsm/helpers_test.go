package fsm

import (
	"bytes"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
)

// testSHA is a well-formed digest (sha256 of the empty string).
const testSHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

// fixture drives one FSM through ApplyCommand with consecutive raft indexes.
// label prefixes every failure so that table cases are told apart.
type fixture struct {
	t      testing.TB
	f      *FSM
	idx    uint64
	label  string
	p1, p2 uint64 // parent VMs of newWorld, on h1 and h2
}

func newFixture(t testing.TB) *fixture {
	return &fixture{t: t, f: New()}
}

// newWorld returns a fixture with hosts h1 (4 slots), h2 (4 slots) and h3
// (1 slot), all alive, and parent VMs p1 on h1 and p2 on h2.
func newWorld(t testing.TB) *fixture {
	t.Helper()
	x := newFixture(t)
	x.must(hostCmd("h1", 4))
	x.must(hostCmd("h2", 4))
	x.must(hostCmd("h3", 1))
	x.p1 = x.must(&VMCreate{Name: "p1", Host: "h1", MemMB: 512, VCPUs: 2})
	x.p2 = x.must(&VMCreate{Name: "p2", Host: "h2", MemMB: 256, VCPUs: 1})
	return x
}

func hostCmd(id string, slots int) *HostRegister {
	n := 1
	if id != "" {
		n += int(id[len(id)-1]-'0') % 200
	}
	return &HostRegister{ID: id, GossipAddr: fmt.Sprintf("10.0.0.%d:7946", n),
		APIAddr: fmt.Sprintf("10.0.0.%d:7070", n), Slots: slots, MemMB: 8192}
}

func descriptorCmd(ticket, parent uint64) *DescriptorCreate {
	return &DescriptorCreate{Ticket: ticket, ParentVM: parent, Host: "h1", Size: 4096, SHA256: testSHA,
		MemserverAddr: "10.0.0.2:7100", McastGroup: "239.1.1.1:7200", PageCount: 65536, McastKey: testSHA}
}

func checkpointCmd(parent uint64) *CheckpointCreate {
	return &CheckpointCreate{ParentVM: parent, Host: "h1", Size: 8192, SHA256: testSHA,
		MemserverAddr: "10.0.0.2:7101", PageCount: 65536}
}

func (x *fixture) errorf(format string, args ...interface{}) {
	x.t.Helper()
	x.t.Errorf("%s"+format, append([]interface{}{x.prefix()}, args...)...)
}

func (x *fixture) fatalf(format string, args ...interface{}) {
	x.t.Helper()
	x.t.Fatalf("%s"+format, append([]interface{}{x.prefix()}, args...)...)
}

func (x *fixture) prefix() string {
	if x.label == "" {
		return ""
	}
	return x.label + ": "
}

// eq reports a mismatch of one observed value.
func (x *fixture) eq(what string, got, want interface{}) {
	x.t.Helper()
	if !reflect.DeepEqual(got, want) {
		x.errorf("%s: got %v, want %v", what, got, want)
	}
}

func (x *fixture) apply(c Command) *Result {
	x.t.Helper()
	x.idx++
	r := x.f.ApplyCommand(x.idx, c)
	if r == nil {
		x.fatalf("index %d %T: nil result", x.idx, c)
	}
	if r.Index != x.idx {
		x.errorf("index %d %T: result index %d", x.idx, c, r.Index)
	}
	return r
}

func (x *fixture) must(c Command) uint64 {
	x.t.Helper()
	r := x.apply(c)
	if r.Err != nil {
		x.fatalf("index %d %T %+v: %v", x.idx, c, c, r.Err)
	}
	return r.ID
}

func (x *fixture) ticket(parent uint64, placements ...string) uint64 {
	x.t.Helper()
	return x.must(&TicketCreate{ParentVM: parent, Requested: len(placements), Placements: placements})
}

// clone starts a reserved ticket's clones from a new descriptor and returns
// their VM IDs, indexed by k-1.
func (x *fixture) clone(ticket uint64) []uint64 {
	x.t.Helper()
	x.must(descriptorCmd(ticket, x.view(ticket).ParentVM))
	return x.cloneVMs(ticket)
}

func (x *fixture) cloneVMs(ticket uint64) []uint64 {
	x.t.Helper()
	var ids []uint64
	for _, cl := range x.view(ticket).Clones {
		ids = append(ids, cl.VMID)
	}
	return ids
}

func (x *fixture) exit(vm uint64) {
	x.t.Helper()
	x.must(&CloneUpdate{VMID: vm, State: CloneExited})
}

func (x *fixture) view(ticket uint64) TicketView {
	x.t.Helper()
	v, _, ok := x.f.Ticket(ticket)
	if !ok {
		x.fatalf("ticket %d not found", ticket)
	}
	return v
}

func (x *fixture) host(id string) Host {
	x.t.Helper()
	h, ok := x.f.Host(id)
	if !ok {
		x.fatalf("host %q not found", id)
	}
	return h
}

func (x *fixture) vm(id uint64) VM {
	x.t.Helper()
	vm, ok := x.f.VM(id)
	if !ok {
		x.fatalf("vm %d not found", id)
	}
	return vm
}

// cloneStates renders a ticket's clones as "k:state@host ...".
func (x *fixture) cloneStates(ticket uint64) string {
	x.t.Helper()
	var parts []string
	for _, cl := range x.view(ticket).Clones {
		parts = append(parts, fmt.Sprintf("%d:%s@%s", cl.K, cl.State, cl.Host))
	}
	return strings.Join(parts, " ")
}

// usage renders every host's UsedSlots as "h1=0 h2=1 ...".
func usage(f *FSM) string {
	hosts, _ := f.Hosts()
	var parts []string
	for _, h := range hosts {
		parts = append(parts, fmt.Sprintf("%s=%d", h.ID, h.UsedSlots))
	}
	return strings.Join(parts, " ")
}

// recomputedUsage derives UsedSlots from tickets and clones on a copy of
// the state, in the same format as usage.
func recomputedUsage(f *FSM) string {
	f.mu.RLock()
	st := f.st.clone()
	f.mu.RUnlock()
	st.recomputeUsage()
	var parts []string
	for _, id := range sortedKeys(st.hosts) {
		parts = append(parts, fmt.Sprintf("%s=%d", id, st.hosts[id].UsedSlots))
	}
	return strings.Join(parts, " ")
}

func dump(t testing.TB, f *FSM) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := f.Dump(&buf); err != nil {
		t.Fatalf("dump: %v", err)
	}
	return buf.Bytes()
}

// stateBytes is Dump with the header's applied index set to 0. Every log
// entry advances the applied index, including a refused command (followers
// and readers wait for the FSM to reach an index, so it must advance), so the
// index is the one field of a Dump that a refused command changes.
func stateBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	b := dump(t, f)
	var hdr snapshotHeader
	if err := codec.NewDecoderBytes(b, mph).Decode(&hdr); err != nil {
		t.Fatalf("dump header: %v", err)
	}
	var orig, zeroed []byte
	if err := codec.NewEncoderBytes(&orig, mph).Encode(&hdr); err != nil {
		t.Fatalf("encode header: %v", err)
	}
	if !bytes.HasPrefix(b, orig) {
		t.Fatalf("dump header does not re-encode to the same bytes")
	}
	hdr.Index = 0
	if err := codec.NewEncoderBytes(&zeroed, mph).Encode(&hdr); err != nil {
		t.Fatalf("encode header: %v", err)
	}
	return append(zeroed, b[len(orig):]...)
}

func readCloser(b []byte) io.ReadCloser { return io.NopCloser(bytes.NewReader(b)) }

// firstDiff describes where two byte strings first differ.
func firstDiff(got, want []byte) string {
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	end := func(b []byte) []byte { return b[i:min(len(b), i+32)] }
	return fmt.Sprintf("%d vs %d bytes, first difference at %d: got %q, want %q", len(got), len(want), i, end(got), end(want))
}

// memSink is an in-memory raft.SnapshotSink.
type memSink struct {
	bytes.Buffer
	closed, cancelled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Close() error  { s.closed = true; return nil }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }

// snapshotBytes persists a raft snapshot of f into memory.
func snapshotBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	defer snap.Release()
	return persist(t, snap)
}

func persist(t testing.TB, snap raft.FSMSnapshot) []byte {
	t.Helper()
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatalf("persist: %v", err)
	}
	if !sink.closed || sink.cancelled {
		t.Fatalf("persist: sink closed=%v cancelled=%v, want closed only", sink.closed, sink.cancelled)
	}
	return sink.Bytes()
}

// allCommands returns one valid command of every type, in an order that
// applies cleanly to newWorld (p1=1, p2=2): the VM created here is 3, the
// ticket 1, its clones VMs 4 and 5, the checkpoint 1.
func allCommands() []Command {
	return []Command{
		hostCmd("h4", 2),
		&VMCreate{RequestID: "vm-req", Name: "p3", Host: "h4", MemMB: 128, VCPUs: 1},
		&TicketCreate{RequestID: "t-req", ParentVM: 1, Requested: 3, Placements: []string{"h2", "h3"}},
		descriptorCmd(1, 1),
		&CloneUpdate{VMID: 4, State: CloneRunning},
		&CloneUpdate{RequestID: "exit-req", VMID: 4, State: CloneExited, Status: 7, Result: "done"},
		&CloneUpdate{VMID: 5, State: CloneFailed, Reason: "lost"},
		&TicketJoin{RequestID: "join-req", Ticket: 1, Caller: 1},
		checkpointCmd(2),
		&TicketCreate{ParentVM: 2, Requested: 1, Placements: []string{"h1"}},
		&CreateClones{RequestID: "cc-req", Ticket: 2, Checkpoint: 1, Caller: 2},
		&TicketKill{RequestID: "kill-req", Ticket: 2, Caller: 0, Reason: "operator"},
		&VMEnd{VMID: 2, Reason: "shutdown"},
		&VMCreate{RequestID: "launch-req", Name: "p4", Host: "h4", MemMB: 128, VCPUs: 1, Launch: true,
			Kernel: "/srv/vmlinux", Cmd: "sfguest ticket 2"},
		&VMStarted{VMID: 7},
		&HostFail{ID: "h4", Left: true},
		&HostFail{ID: "h3", Reason: "gossip dead"},
	}
}
