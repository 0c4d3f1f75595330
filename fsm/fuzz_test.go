package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"testing"

	"github.com/hashicorp/raft"
)

// fuzzWorld returns newWorld with an object in every state, all with small
// IDs that mutated inputs easily hit:
//
//	ticket 1 (p1) reserved on h2, h3
//	ticket 2 (p1) active on h1, h2: clone 1 (vm 3) running, clone 2 (vm 4) pending
//	ticket 3 (p2) active on h1: clone 1 (vm 5) exited, joinable
//	ticket 4 (p2) joined
//	ticket 5 (p1) killed, its clone (vm 6) killed
//	ticket 6 (p2) reserved on h1
//	checkpoints 1 (p1) and 2 (p2); descriptors 1-5
//	host h4 failed, with vm 7 ended on it
func fuzzWorld(tb testing.TB) *FSM {
	x := newWorld(tb)
	x.ticket(x.p1, "h2", "h3")
	ids := x.clone(x.ticket(x.p1, "h1", "h2"))
	x.must(&CloneUpdate{VMID: ids[0], State: CloneRunning})
	x.exit(x.clone(x.ticket(x.p2, "h1"))[0])
	x.must(&TicketJoin{Ticket: x.ticket(x.p2, "h2"), Caller: x.p2})
	x.clone(x.ticket(x.p1, "h1"))
	x.must(&TicketKill{Ticket: 5, Caller: x.p1})
	x.ticket(x.p2, "h1")
	x.must(&CheckpointCreate{RequestID: "cp-1", ParentVM: x.p1, Host: "h1", Size: 1, SHA256: testSHA, MemserverAddr: "h1:1"})
	x.must(&CheckpointCreate{RequestID: "cp-2", ParentVM: x.p2, Host: "h2", Size: 1, SHA256: testSHA, MemserverAddr: "h2:1"})
	x.must(hostCmd("h4", 2))
	x.must(&VMCreate{RequestID: "vm-7", Host: "h4"})
	x.must(&HostFail{ID: "h4"})
	return x.f
}

// copyFSM returns an FSM with a deep copy of f's state.
func copyFSM(f *FSM) *FSM {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &FSM{st: f.st.clone(), notify: make(chan struct{})}
}

// fuzzWorldCommands are commands that do something to fuzzWorld.
func fuzzWorldCommands() []Command {
	return []Command{
		&CloneUpdate{VMID: 3, State: CloneExited, Status: 1, Result: "ok"},
		&CloneUpdate{VMID: 4, State: CloneRunning},
		&CloneUpdate{VMID: 4, State: CloneFailed, Reason: "x"},
		&CloneUpdate{VMID: 5, State: CloneExited},
		&TicketJoin{Ticket: 3, Caller: 2},
		&TicketJoin{Ticket: 2, Caller: 1},
		&TicketJoin{Ticket: 4, Caller: 2},
		&TicketKill{Ticket: 2, Caller: 1},
		&TicketKill{Ticket: 6},
		&CreateClones{Ticket: 1, Checkpoint: 1, Caller: 1},
		&CreateClones{Ticket: 6, Checkpoint: 2, Caller: 2},
		&CreateClones{Ticket: 6, Checkpoint: 1, Caller: 2},
		descriptorCmd(1, 1),
		descriptorCmd(6, 2),
		&VMEnd{VMID: 1},
		&VMEnd{VMID: 3},
		&HostFail{ID: "h1", Left: true},
		&HostFail{ID: "h2"},
		hostCmd("h4", 3),
		&TicketCreate{ParentVM: 2, Requested: 2, Placements: []string{"h1", "h1"}},
		&VMCreate{RequestID: "vm-7", Host: "h1"},
	}
}

func encodeAll(tb testing.TB, cs []Command) [][]byte {
	var out [][]byte
	for _, c := range cs {
		b, err := Encode(c)
		if err != nil {
			tb.Fatalf("encode %T: %v", c, err)
		}
		out = append(out, b)
	}
	return out
}

// malformedEntries are log entries that Decode refuses.
var malformedEntries = [][]byte{
	{},
	{0x00},
	{byte(IgnorableFlag)},
	{byte(IgnorableFlag) | byte(CmdVMEnd), 0x80},
	{0x7f, 0x80},
	{byte(CmdVMEnd)},
	{byte(CmdVMEnd), 0xc1},
	{byte(CmdTicketCreate), 0x81, 0xaa, 'P', 'l', 'a', 'c', 'e', 'm', 'e', 'n', 't', 's', 0xdd, 0xff, 0xff, 0xff, 0xff},
	{byte(CmdCloneUpdate), 0x81, 0xa6, 'R', 'e', 's', 'u', 'l', 't', 0xdb, 0xff, 0xff, 0xff, 0xff},
}

func FuzzDecode(f *testing.F) {
	for _, b := range encodeAll(f, append(allCommands(), fuzzWorldCommands()...)) {
		f.Add(b)
	}
	for _, b := range malformedEntries {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrBadCommand) && !errors.Is(err, ErrUnknownCommand) {
				t.Fatalf("Decode(%x): error %v is neither ErrBadCommand nor ErrUnknownCommand", b, err)
			}
			return
		}
		if c.Type() != CommandType(b[0]) {
			t.Fatalf("Decode(%x): got %T for type byte %#x", b, c, b[0])
		}
		_ = c.Validate()
		enc, err := Encode(c)
		if err != nil {
			t.Fatalf("Encode(%#v): %v", c, err)
		}
		c2, err := Decode(enc)
		if err != nil {
			t.Fatalf("Decode(Encode(%#v)): %v", c, err)
		}
		if !reflect.DeepEqual(c, c2) {
			t.Fatalf("round trip: got %#v, want %#v", c2, c)
		}
	})
}

func FuzzApply(f *testing.F) {
	base := fuzzWorld(f)
	for _, b := range encodeAll(f, append(allCommands(), fuzzWorldCommands()...)) {
		f.Add(b)
	}
	for _, b := range malformedEntries {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fsm := copyFSM(base)
		before := stateBytes(t, fsm)
		idx := fsm.Index() + 1
		log := &raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: b}
		c, err := Decode(b)
		if err != nil {
			// An entry that does not decode must stop the replica, unless
			// its type is unknown and flagged ignorable: then it is skipped.
			skip := errors.Is(err, ErrUnknownCommand) && CommandType(b[0])&IgnorableFlag != 0
			var res interface{}
			panicked := func() (p bool) {
				defer func() { p = recover() != nil }()
				res = fsm.Apply(log)
				return false
			}()
			if panicked == skip {
				t.Fatalf("Apply(%x) after %v: panicked %v, want %v", b, err, panicked, !skip)
			}
			if skip {
				if res != nil || fsm.Index() != idx {
					t.Fatalf("Apply(%x): skipped entry returned %v at index %d", b, res, fsm.Index())
				}
				if after := stateBytes(t, fsm); !bytes.Equal(after, before) {
					t.Fatalf("Apply(%x): skipped entry changed the state", b)
				}
			}
			return
		}
		r, ok := fsm.Apply(log).(*Result)
		if !ok || r == nil || r.Index != idx || fsm.Index() != idx {
			t.Fatalf("Apply(%#v): got %#v at index %d, want a *Result at %d", c, r, fsm.Index(), idx)
		}
		if r.Err != nil {
			if !isSentinel(r.Err) {
				t.Fatalf("Apply(%#v): error %v matches no sentinel", c, r.Err)
			}
			if r.ID != 0 || r.Duplicate {
				t.Fatalf("Apply(%#v): refused with ID %d Duplicate %v", c, r.ID, r.Duplicate)
			}
			if after := stateBytes(t, fsm); !bytes.Equal(after, before) {
				t.Fatalf("Apply(%#v) refused with %v but changed the state: %s", c, r.Err, firstDiff(after, before))
			}
			return
		}
		if v := checkInvariants(fsm); v != "" {
			t.Fatalf("Apply(%#v): %s", c, v)
		}
		// What Apply produced must survive a snapshot round trip.
		d := dump(t, fsm)
		g := New()
		if err := g.Restore(readCloser(d)); err != nil {
			t.Fatalf("Apply(%#v): restore of the result: %v", c, err)
		}
		if got := dump(t, g); !bytes.Equal(got, d) {
			t.Fatalf("Apply(%#v): restored result differs: %s", c, firstDiff(got, d))
		}
	})
}

func FuzzRestore(f *testing.F) {
	base := fuzzWorld(f)
	good := snapshotBytes(f, base)
	f.Add(good)
	f.Add(snapshotBytes(f, New()))
	f.Add(good[:len(good)/2])
	w := newWorld(f)
	for _, c := range allCommands() {
		w.must(c)
	}
	f.Add(snapshotBytes(f, w.f))
	f.Add([]byte("snowflock-fsm"))
	// Small snapshots: mutations of these more often stay decodable.
	tiny := newFixture(f)
	tiny.must(hostCmd("a", 2))
	tiny.must(&VMCreate{RequestID: "r", Host: "a"})
	tiny.must(&TicketCreate{ParentVM: 1, Requested: 1, Placements: []string{"a"}})
	tiny.must(&CreateClones{Ticket: 1, Checkpoint: tiny.must(checkpointCmd(1)), Caller: 1})
	f.Add(snapshotBytes(f, tiny.f))
	tiny.must(&TicketCreate{ParentVM: 1, Requested: 1, Placements: []string{"a"}})
	f.Add(snapshotBytes(f, tiny.f))
	f.Fuzz(func(t *testing.T, b []byte) {
		fsm := copyFSM(base)
		before := dump(t, fsm)
		if err := fsm.Restore(readCloser(b)); err != nil {
			if !errors.Is(err, ErrBadSnapshot) {
				t.Fatalf("Restore: error %v does not wrap ErrBadSnapshot", err)
			}
			if after := dump(t, fsm); !bytes.Equal(after, before) {
				t.Fatalf("failed Restore changed the state: %s", firstDiff(after, before))
			}
			return
		}
		// A restored state dumps canonically: its dump restores to itself.
		d := dump(t, fsm)
		g := New()
		if err := g.Restore(readCloser(d)); err != nil {
			t.Fatalf("restore of a restored state's dump: %v", err)
		}
		if got := dump(t, g); !bytes.Equal(got, d) {
			t.Fatalf("dump of a restored state is not canonical: %s", firstDiff(got, d))
		}
		// Restore checks what Apply relies on: no command may crash on a
		// state it accepted.
		exercise(t, fsm)
	})
}

// exercise applies to f commands that touch the objects it holds (at most a
// few of each kind). Every command must either succeed or be refused with a
// sentinel error.
func exercise(t *testing.T, f *FSM) {
	f.mu.RLock()
	st := f.st
	hosts := sortedKeys(st.hosts)
	vms := sortedKeys(st.vms)
	tickets := map[uint64]uint64{} // ticket -> parent
	for _, id := range sortedKeys(st.tickets) {
		tickets[id] = st.tickets[id].ParentVM
	}
	cps := sortedKeys(st.checkpoints)
	f.mu.RUnlock()
	hosts, vms, cps = hosts[:min(len(hosts), 6)], vms[:min(len(vms), 12)], cps[:min(len(cps), 3)]
	parent := uint64(1)
	if len(vms) > 0 {
		parent = vms[0]
	}

	var cmds []Command
	for _, id := range sortedKeys(tickets) {
		if len(cmds) > 40 {
			break
		}
		p := tickets[id]
		cmds = append(cmds, descriptorCmd(id, p), &TicketJoin{Ticket: id, Caller: p})
		for _, cp := range cps {
			cmds = append(cmds, &CreateClones{Ticket: id, Checkpoint: cp, Caller: p})
		}
	}
	for _, id := range vms {
		cmds = append(cmds, &CloneUpdate{VMID: id, State: CloneRunning}, &CloneUpdate{VMID: id, State: CloneExited},
			&CloneUpdate{VMID: id, State: CloneFailed}, &TicketCreate{ParentVM: id, Requested: 1, Placements: []string{"h1"}},
			descriptorCmd(0, id), checkpointCmd(id))
	}
	for _, h := range hosts {
		cmds = append(cmds, &VMCreate{Host: h}, &TicketCreate{ParentVM: parent, Requested: 2, Placements: []string{h, h}})
	}
	for _, h := range hosts {
		cmds = append(cmds, &HostFail{ID: h}, &HostRegister{ID: h, Slots: 3})
	}
	for _, id := range vms {
		cmds = append(cmds, &VMEnd{VMID: id})
	}
	for _, id := range sortedKeys(tickets) {
		cmds = append(cmds, &TicketKill{Ticket: id})
	}
	idx := f.Index()
	for _, c := range cmds {
		idx++
		r := f.ApplyCommand(idx, c)
		if r == nil {
			t.Fatalf("%T %+v: nil result", c, c)
		}
		if r.Err != nil && !isSentinel(r.Err) {
			t.Fatalf("%T %+v: error %v matches no sentinel", c, c, r.Err)
		}
	}
	if _, err := f.Snapshot(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	var buf bytes.Buffer
	if err := f.Dump(&buf); err != nil {
		t.Fatalf("dump: %v", err)
	}
}

// TestFuzzWorld pins down the layout that fuzzWorld's doc comment and
// fuzzWorldCommands rely on.
func TestFuzzWorld(t *testing.T) {
	f := fuzzWorld(t)
	var got []string
	for id := uint64(1); id <= 6; id++ {
		v, _, _ := f.Ticket(id)
		var cl []string
		for _, c := range v.Clones {
			cl = append(cl, string(c.State))
		}
		got = append(got, fmt.Sprint(string(v.State), cl))
	}
	want := []string{"reserved[]", "active[running pending]", "active[exited]", "joined[]", "killed[killed]", "reserved[]"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("tickets: got %v, want %v", got, want)
	}
	if vm, _ := f.VM(7); vm.Host != "h4" || vm.State != VMEnded {
		t.Fatalf("vm 7: got %+v, want ended on h4", vm)
	}
	if v := checkInvariants(f); v != "" {
		t.Fatal(v)
	}
	// Every seed of FuzzApply decodes or is meant not to.
	for i, b := range encodeAll(t, fuzzWorldCommands()) {
		if _, err := Decode(b); err != nil {
			t.Errorf("#%d: %v", i, err)
		}
	}
	for i, b := range malformedEntries {
		if _, err := Decode(b); err == nil {
			t.Errorf("malformed #%d %x decodes", i, b)
		}
	}
}
