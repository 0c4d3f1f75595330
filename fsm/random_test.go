package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/hashicorp/go-msgpack/v2/codec"
)

// gen produces a random, mostly valid command sequence. It reads the FSM the
// sequence is applied to, so that most commands refer to objects that exist
// and are in a state where the command succeeds; about one in ten is
// deliberately wrong (unknown or foreign IDs, wrong states, invalid fields).
// The sequence depends only on the seed.
type gen struct {
	r    *rand.Rand
	f    *FSM
	reqs []string
	sent []Command // commands sent with a RequestID, for retries
}

func newGen(seed uint64, f *FSM) *gen {
	return &gen{r: rand.New(rand.NewPCG(seed, seed^0x5eed)), f: f}
}

var genHosts = []string{"h0", "h1", "h2", "h3", "h4", "h5"}

func (g *gen) chance(p float64) bool { return g.r.Float64() < p }

func pick[T any](g *gen, xs []T) (T, bool) {
	var zero T
	if len(xs) == 0 {
		return zero, false
	}
	return xs[g.r.IntN(len(xs))], true
}

// requestID returns "", a fresh ID or, now and then, one used before.
func (g *gen) requestID() string {
	switch {
	case g.chance(0.05) && len(g.reqs) > 0:
		id, _ := pick(g, g.reqs)
		return id
	case g.chance(0.4):
		id := fmt.Sprintf("rq-%d", len(g.reqs))
		g.reqs = append(g.reqs, id)
		return id
	}
	return ""
}

// aliveHost returns an alive host, or any host ID now and then.
func (g *gen) aliveHost() string {
	hosts, _ := g.f.Hosts()
	var alive []string
	for _, h := range hosts {
		if h.Status == HostAlive {
			alive = append(alive, h.ID)
		}
	}
	if id, ok := pick(g, alive); ok && !g.chance(0.05) {
		return id
	}
	return g.anyHost()
}

func (g *gen) anyHost() string {
	if g.chance(0.1) {
		return "h-unknown"
	}
	id, _ := pick(g, genHosts)
	return id
}

// anyVM returns any VM ID, possibly unknown.
func (g *gen) anyVM() uint64 { return uint64(g.r.IntN(int(g.f.Counts().NextVMID)+2)) + 1 }

// vm returns a VM that satisfies ok; false if there is none.
func (g *gen) vm(ok func(VM) bool) (uint64, bool) {
	vms, _ := g.f.VMs("")
	var good []uint64
	for _, vm := range vms {
		if ok(vm) {
			good = append(good, vm.ID)
		}
	}
	return pick(g, good)
}

func runningParent(vm VM) bool { return vm.Role == RoleParent && vm.State == VMRunning }

// ticket returns a ticket that satisfies ok; false if there is none.
func (g *gen) ticket(ok func(Ticket) bool) (Ticket, bool) {
	ts, _ := g.f.Tickets(0)
	var good []Ticket
	for _, t := range ts {
		if ok(t) {
			good = append(good, t)
		}
	}
	return pick(g, good)
}

// anyTicket returns any ticket, possibly unknown, with its parent.
func (g *gen) anyTicket() Ticket {
	ts, _ := g.f.Tickets(0)
	if t, ok := pick(g, ts); ok && g.chance(0.8) {
		return t
	}
	return Ticket{ID: uint64(g.r.IntN(len(ts)+2)) + 1, ParentVM: g.anyVM()}
}

// joinable reports whether join of t would succeed.
func (g *gen) joinable(t Ticket) bool {
	if t.State == TicketReserved {
		return true
	}
	if t.State != TicketActive {
		return false
	}
	v, _, _ := g.f.Ticket(t.ID)
	for _, cl := range v.Clones {
		if !cl.State.Terminal() {
			return false
		}
	}
	return true
}

func (g *gen) descriptorFields() (host string, size int64, sum, memserver, group string, pages int64) {
	host, size, sum = g.aliveHost(), int64(g.r.IntN(1<<20)+1), testSHA
	memserver = fmt.Sprintf("10.1.0.%d:%d", g.r.IntN(250)+1, 7000+g.r.IntN(100))
	if g.chance(0.5) {
		group = fmt.Sprintf("239.0.0.%d:7200", g.r.IntN(250)+1)
	}
	pages = int64(g.r.IntN(1 << 16))
	switch {
	case g.chance(0.01):
		sum = strings.ToUpper(sum)
	case g.chance(0.01):
		memserver = "0.0.0.0:7100"
	}
	return
}

// next returns the next command. Each kind is drawn by weight; a kind that
// has no sensible target in the current state is drawn again, except that a
// small share of commands go to a wrong target on purpose.
func (g *gen) next() Command {
	if c, ok := pick(g, g.sent); ok && g.chance(0.03) {
		return c // a client retrying a request whose answer it lost
	}
	for {
		if c := g.try(g.chance(0.08)); c != nil {
			if v := reflect.ValueOf(c).Elem().FieldByName("RequestID"); v.IsValid() {
				if v.String() == "" {
					v.SetString(g.requestID())
				}
				if v.String() != "" {
					g.sent = append(g.sent, c)
				}
			}
			return c
		}
	}
}

func (g *gen) try(wrong bool) Command {
	switch w := g.r.IntN(100); {
	case w < 4: // HostRegister: mostly bring back or resize a known host
		c := &HostRegister{ID: g.anyHost(), Slots: g.r.IntN(8), MemMB: int64(g.r.IntN(1 << 16))}
		c.GossipAddr = fmt.Sprintf("10.0.1.%d:7946", g.r.IntN(250)+1)
		if g.chance(0.5) {
			c.APIAddr = fmt.Sprintf("10.0.1.%d:7070", g.r.IntN(250)+1)
		}
		if wrong {
			c.ID = "bad id"
		}
		return c
	case w < 5:
		return &HostFail{ID: g.anyHost(), Left: g.chance(0.3)}
	case w < 14:
		return &VMCreate{RequestID: g.requestID(), Name: fmt.Sprintf("vm%d", g.r.IntN(1000)), Host: g.aliveHost(),
			MemMB: int64(g.r.IntN(4096)), VCPUs: g.r.IntN(8)}
	case w < 17:
		id, ok := g.vm(func(vm VM) bool { return vm.State != VMEnded })
		if !ok || wrong {
			id = g.anyVM()
		}
		return &VMEnd{VMID: id}
	case w < 33:
		parent, ok := g.vm(runningParent)
		if !ok && !wrong {
			return nil
		}
		if wrong && g.chance(0.5) {
			parent = g.anyVM()
		}
		requested := g.r.IntN(4) + 1
		if wrong && g.chance(0.2) {
			requested = 0
		}
		c := &TicketCreate{RequestID: g.requestID(), ParentVM: parent, Requested: requested}
		hosts, _ := g.f.Hosts()
		free := map[string]int{}
		var open []string
		for _, h := range hosts {
			if free[h.ID] = h.FreeSlots(); free[h.ID] > 0 {
				open = append(open, h.ID)
			}
		}
		for m := g.r.IntN(max(requested, 1)) + 1; m > 0; m-- {
			id, ok := pick(g, open)
			if wrong && g.chance(0.5) {
				id, ok = g.anyHost(), true
			}
			if !ok {
				if !wrong {
					break
				}
				id = g.anyHost()
			}
			c.Placements = append(c.Placements, id)
			if free[id]--; free[id] == 0 {
				open = slices.DeleteFunc(open, func(h string) bool { return h == id })
			}
		}
		if len(c.Placements) == 0 && !wrong {
			return nil
		}
		return c
	case w < 44:
		c := &DescriptorCreate{RequestID: g.requestID()}
		c.Host, c.Size, c.SHA256, c.MemserverAddr, c.McastGroup, c.PageCount = g.descriptorFields()
		switch {
		case wrong:
			t := g.anyTicket()
			c.Ticket, c.ParentVM = t.ID, t.ParentVM
			if g.chance(0.5) {
				c.ParentVM = g.anyVM()
			}
		case g.chance(0.8):
			t, ok := g.ticket(func(t Ticket) bool { return t.State == TicketReserved })
			if !ok {
				return nil
			}
			c.Ticket, c.ParentVM = t.ID, t.ParentVM
		default:
			id, ok := g.vm(runningParent)
			if !ok {
				return nil
			}
			c.ParentVM = id
		}
		return c
	case w < 72:
		c := &CloneUpdate{Status: g.r.IntN(3)}
		live, _ := g.f.Clones("", true)
		cl, ok := pick(g, live)
		if wrong {
			c.VMID = g.anyVM()
			c.State = []CloneState{CloneRunning, CloneExited, CloneFailed}[g.r.IntN(3)]
			if g.chance(0.1) {
				c.State, c.Result = CloneExited, strings.Repeat("r", MaxResult+1)
			}
			return c
		}
		if !ok {
			return nil
		}
		c.VMID = cl.VMID
		switch p := g.r.Float64(); {
		case cl.State == ClonePending && p < 0.6, cl.State == CloneRunning && p < 0.1:
			c.State = CloneRunning
		case p < 0.85:
			c.State, c.Result = CloneExited, fmt.Sprintf("result %d", g.r.IntN(100))
		default:
			c.State, c.Reason = CloneFailed, "lost"
		}
		return c
	case w < 84:
		t, ok := g.ticket(g.joinable)
		if wrong {
			if t, ok = g.ticket(func(t Ticket) bool { return t.State == TicketActive }); !ok || g.chance(0.5) {
				t = g.anyTicket()
			}
			if g.chance(0.3) {
				t.ParentVM = g.anyVM()
			}
		} else if !ok {
			return nil
		}
		return &TicketJoin{Ticket: t.ID, Caller: t.ParentVM}
	case w < 88:
		t, ok := g.ticket(func(t Ticket) bool { return !t.State.Disposed() })
		if wrong {
			t = g.anyTicket()
			if g.chance(0.5) {
				t.ParentVM = g.anyVM()
			}
		} else if !ok {
			return nil
		}
		c := &TicketKill{Ticket: t.ID, Caller: t.ParentVM, Reason: "random"}
		if g.chance(0.4) {
			c.Caller = 0
		}
		return c
	case w < 92:
		id, ok := g.vm(runningParent)
		if !ok || wrong {
			id = g.anyVM()
		}
		c := &CheckpointCreate{RequestID: g.requestID(), ParentVM: id}
		c.Host, c.Size, c.SHA256, c.MemserverAddr, c.McastGroup, c.PageCount = g.descriptorFields()
		return c
	default:
		cps, _ := g.f.Checkpoints()
		if wrong {
			t := g.anyTicket()
			return &CreateClones{Ticket: t.ID, Caller: t.ParentVM, Checkpoint: uint64(g.r.IntN(len(cps)+2)) + 1}
		}
		byParent := map[uint64][]uint64{}
		for _, cp := range cps {
			byParent[cp.ParentVM] = append(byParent[cp.ParentVM], cp.ID)
		}
		t, ok := g.ticket(func(t Ticket) bool { return t.State == TicketReserved && len(byParent[t.ParentVM]) > 0 })
		if !ok {
			return nil
		}
		cp, _ := pick(g, byParent[t.ParentVM])
		return &CreateClones{Ticket: t.ID, Caller: t.ParentVM, Checkpoint: cp}
	}
}

// checkInvariants verifies, on a copy of f's state, what every Apply must
// preserve. It returns a description of the first violation, or "".
func checkInvariants(f *FSM) string {
	f.mu.RLock()
	defer f.mu.RUnlock()
	st := f.st
	if err := st.check(); err != nil {
		return fmt.Sprintf("state fails the snapshot check: %v", err)
	}
	// recomputeUsage writes only the hosts: give it copies of those.
	re := &state{hosts: map[string]*Host{}, tickets: st.tickets, clones: st.clones}
	for id, h := range st.hosts {
		c := *h
		re.hosts[id] = &c
	}
	re.recomputeUsage()
	for id, h := range st.hosts {
		if h.UsedSlots != re.hosts[id].UsedSlots {
			return fmt.Sprintf("host %s: UsedSlots %d, recomputed %d", id, h.UsedSlots, re.hosts[id].UsedSlots)
		}
		if h.UsedSlots < 0 {
			return fmt.Sprintf("host %s: UsedSlots %d", id, h.UsedSlots)
		}
	}
	wantVM := map[CloneState]VMState{ClonePending: VMPending, CloneRunning: VMRunning,
		CloneExited: VMEnded, CloneFailed: VMEnded, CloneKilled: VMEnded}
	for k, cl := range st.clones {
		vm := st.vms[cl.VMID]
		if vm.State != wantVM[cl.State] || vm.Role != RoleClone || vm.Ticket != cl.Ticket || vm.CloneID != cl.K {
			return fmt.Sprintf("clone %d/%d is %s but vm %d is %s %s of %d/%d", k.ticket, k.k, cl.State,
				vm.ID, vm.State, vm.Role, vm.Ticket, vm.CloneID)
		}
		t := st.tickets[cl.Ticket]
		if t.State.Disposed() && !cl.State.Terminal() {
			return fmt.Sprintf("clone %d/%d is %s in a %s ticket", k.ticket, k.k, cl.State, t.State)
		}
		if cl.Host != t.Placements[cl.K-1] {
			return fmt.Sprintf("clone %d/%d on %s, placed on %s", k.ticket, k.k, cl.Host, t.Placements[cl.K-1])
		}
	}
	for id, vm := range st.vms {
		if h := st.hosts[vm.Host]; vm.State != VMEnded && (h == nil || h.Status != HostAlive) {
			return fmt.Sprintf("vm %d is %s on host %s which is not alive", id, vm.State, vm.Host)
		}
	}
	for id, t := range st.tickets {
		parent := st.vms[t.ParentVM]
		if parent == nil {
			return fmt.Sprintf("ticket %d has unknown parent vm %d", id, t.ParentVM)
		}
		if parent.State == VMEnded && !t.State.Disposed() {
			return fmt.Sprintf("ticket %d is %s but its parent vm %d ended", id, t.State, t.ParentVM)
		}
	}
	if uint64(len(st.vms)) != st.nextVM-1 {
		return fmt.Sprintf("%d vms for next vm id %d", len(st.vms), st.nextVM)
	}
	return ""
}

type outcome struct {
	ID        uint64
	Duplicate bool
	Err       string
}

func outcomeOf(r *Result) outcome {
	o := outcome{ID: r.ID, Duplicate: r.Duplicate}
	if r.Err != nil {
		o.Err = r.Err.Error()
	}
	return o
}

func TestFSM_Random(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 800
	}
	for _, seed := range []uint64{1, 0x5f10c4} {
		t.Run(fmt.Sprintf("seed=%#x", seed), func(t *testing.T) {
			t.Parallel()
			testRandom(t, seed, n)
		})
	}
}

// testRandom applies one random sequence to two fresh FSMs and to a third
// restored midway from a raft snapshot of the first; all three must end with
// identical state and every command must have had the same outcome on each.
func testRandom(t *testing.T, seed uint64, n int) {
	f1, f2, f3 := New(), New(), New()
	g := newGen(seed, f1)
	mid := n / 2
	cmds := make([]Command, n)
	want := make([]outcome, n)
	var midDump []byte
	var midSnap interface{ Release() }
	persistMid := func() []byte { return nil }
	stats := map[string][2]int{} // command type -> {ok, refused}
	codes := map[string]int{}    // refusals by error code
	dups := 0                    // retries answered from the request table
	for i := range n {
		idx := uint64(i + 1)
		c := g.next()
		r := f1.ApplyCommand(idx, c)
		cmds[i], want[i] = c, outcomeOf(r)
		if v := checkInvariants(f1); v != "" {
			t.Fatalf("#%d %T %+v (%v): %s", i, c, c, r.Err, v)
		}
		s := stats[fmt.Sprintf("%T", c)]
		if r.Duplicate {
			dups++
		}
		if r.Err != nil {
			codes[Code(r.Err)]++
			s[1]++
			if !isSentinel(r.Err) {
				t.Fatalf("#%d %T %+v: error %v matches no sentinel", i, c, c, r.Err)
			}
		} else {
			s[0]++
		}
		stats[fmt.Sprintf("%T", c)] = s
		if i+1 == mid {
			snap, err := f1.Snapshot()
			if err != nil {
				t.Fatalf("snapshot: %v", err)
			}
			midSnap, midDump = snap, dump(t, f1)
			// Persist only after f1 has moved on: the snapshot must not see
			// later applies.
			persistMid = func() []byte { return persist(t, snap) }
		}
	}
	var keys []string
	for k := range stats {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var ok, refused int
	for _, k := range keys {
		t.Logf("%-22s ok %4d refused %4d", k, stats[k][0], stats[k][1])
		ok, refused = ok+stats[k][0], refused+stats[k][1]
		if stats[k][0] == 0 {
			t.Errorf("%s never succeeded: the generator does not exercise it", k)
		}
	}
	t.Logf("refusals by code: %v; duplicates %d", codes, dups)
	if dups == 0 {
		t.Errorf("no command was answered as a duplicate: the generator does not exercise request IDs")
	}
	if ok < 4*refused {
		t.Errorf("%d commands succeeded and %d were refused: want mostly valid commands", ok, refused)
	}

	snapBytes := persistMid()
	midSnap.Release()
	if !bytes.Equal(snapBytes, midDump) {
		t.Fatalf("snapshot persisted late differs from the state it was taken at: %s", firstDiff(snapBytes, midDump))
	}
	if err := f3.Restore(readCloser(snapBytes)); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if got := f3.Index(); got != uint64(mid) {
		t.Fatalf("restored index: got %d, want %d", got, mid)
	}
	if got := dump(t, f3); !bytes.Equal(got, midDump) {
		t.Fatalf("restored state differs: %s", firstDiff(got, midDump))
	}

	// The fresh replica also checks that every refused command left the
	// state as it was.
	replay := func(name string, f *FSM, from int) {
		for i := from; i < n; i++ {
			var before []byte
			if (want[i].Err != "" || want[i].Duplicate) && f == f2 {
				before = stateBytes(t, f)
			}
			r := f.ApplyCommand(uint64(i+1), cmds[i])
			if got := outcomeOf(r); got != want[i] {
				t.Fatalf("%s #%d %T: got %+v, want %+v", name, i, cmds[i], got, want[i])
			}
			if v := checkInvariants(f); v != "" {
				t.Fatalf("%s #%d %T: %s", name, i, cmds[i], v)
			}
			if before != nil {
				if after := stateBytes(t, f); !bytes.Equal(before, after) {
					t.Fatalf("%s #%d %T %+v (%+v) changed the state: %s", name, i, cmds[i], cmds[i],
						want[i], firstDiff(after, before))
				}
			}
		}
	}
	replay("fresh", f2, 0)
	replay("restored", f3, mid)

	d1, d2, d3 := dump(t, f1), dump(t, f2), dump(t, f3)
	if !bytes.Equal(d1, d2) {
		t.Errorf("fresh replica differs: %s", firstDiff(d2, d1))
	}
	if !bytes.Equal(d1, d3) {
		t.Errorf("restored replica differs: %s", firstDiff(d3, d1))
	}
	if fp1, fp2, fp3 := f1.Fingerprint(), f2.Fingerprint(), f3.Fingerprint(); fp1 != fp2 || fp1 != fp3 {
		t.Errorf("fingerprints: got %s %s %s, want all equal", fp1, fp2, fp3)
	}
	c := f1.Counts()
	t.Logf("final: %d bytes, index %d, %v vms %v tickets %v clones, %d descriptors, %d checkpoints",
		len(d1), c.AppliedIndex, c.VMs, c.Tickets, c.Clones, c.Descriptors, c.Checkpoints)
}

func isSentinel(err error) bool {
	for _, s := range []error{ErrInvalid, ErrNotFound, ErrNoCapacity, ErrNotParent, ErrNotClone,
		ErrBadState, ErrDisposed, ErrClonesRunning} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// corrupt writes a snapshot of a copy of f's state after mutate has damaged it.
func corrupt(t *testing.T, f *FSM, mutate func(st *state)) []byte {
	t.Helper()
	f.mu.RLock()
	st := f.st.clone()
	f.mu.RUnlock()
	mutate(st)
	var buf bytes.Buffer
	if err := st.write(&buf); err != nil {
		t.Fatalf("write: %v", err)
	}
	return buf.Bytes()
}

// encodeSnapshot writes msgpack values one after another.
func encodeSnapshot(t *testing.T, vs ...interface{}) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := codec.NewEncoder(&buf, mph)
	for _, v := range vs {
		if err := enc.Encode(v); err != nil {
			t.Fatalf("encode: %v", err)
		}
	}
	return buf.Bytes()
}

func TestFSM_RestoreBad(t *testing.T) {
	src := newWorld(t)
	for _, c := range allCommands() {
		src.must(c)
	}
	src.ticket(1, "h1", "h2")
	ids := src.clone(3)
	src.must(&CloneUpdate{VMID: ids[0], State: CloneRunning})
	good := snapshotBytes(t, src.f)
	hdr := &snapshotHeader{Magic: snapshotMagic, Version: snapshotVersion, NextVM: 1, NextTicket: 1,
		NextDescriptor: 1, NextCheckpoint: 1}
	badMagic, badVersion := *hdr, *hdr
	badMagic.Magic, badVersion.Version = "snowflock-fsn", snapshotVersion+1
	garbage := make([]byte, 512)
	r := rand.New(rand.NewPCG(7, 7))
	for i := range garbage {
		garbage[i] = byte(r.UintN(256))
	}

	cases := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"garbage", garbage},
		{"text", []byte("snowflock-fsm v1\n")},
		{"header only", encodeSnapshot(t, hdr)},
		{"bad magic", encodeSnapshot(t, &badMagic, uint8(recordEnd))},
		{"bad version", encodeSnapshot(t, &badVersion, uint8(recordEnd))},
		{"header not a map", encodeSnapshot(t, "snowflock-fsm", uint8(recordEnd))},
		{"unknown record type", encodeSnapshot(t, hdr, uint8(9), &Host{ID: "h1"}, uint8(recordEnd))},
		{"record body of the wrong type", encodeSnapshot(t, hdr, uint8(recordHost), "h1", uint8(recordEnd))},
		{"record type not a number", encodeSnapshot(t, hdr, "host", uint8(recordEnd))},
		{"good snapshot with its last byte flipped", append(bytes.Clone(good[:len(good)-1]), 0xfe)},
		{"vm id beyond next vm id", corrupt(t, src.f, func(st *state) { st.nextVM = 3 })},
		{"vm id 0", corrupt(t, src.f, func(st *state) { st.vms[0] = &VM{Role: RoleParent} })},
		{"clone vm without its clone", corrupt(t, src.f, func(st *state) { delete(st.clones, cloneKey{3, 2}) })},
		{"clone of a missing ticket", corrupt(t, src.f, func(st *state) { delete(st.tickets, 3) })},
		{"clone of a missing vm", corrupt(t, src.f, func(st *state) { st.clones[cloneKey{3, 1}].VMID = 999 })},
		{"ticket id beyond next ticket id", corrupt(t, src.f, func(st *state) { st.nextTicket = 2 })},
		{"ticket granted without placements", corrupt(t, src.f, func(st *state) { st.tickets[3].Granted = 3 })},
		{"active ticket without clones", corrupt(t, src.f, func(st *state) {
			st.tickets[4] = &Ticket{ID: 4, ParentVM: 1, Requested: 1, Granted: 1, Placements: []string{"h1"}, State: TicketActive}
			st.nextTicket = 5
		})},
		{"duplicate request ids", corrupt(t, src.f, func(st *state) {
			st.requestOrder = append(st.requestOrder, st.requestOrder[0])
		})},
	}
	for n := 0; n < len(good); n++ {
		cases = append(cases, struct {
			name string
			b    []byte
		}{fmt.Sprintf("truncated to %d of %d bytes", n, len(good)), good[:n]})
	}

	dst := newWorld(t)
	dst.ticket(dst.p1, "h2", "h3")
	before := dump(t, dst.f)
	for i, tc := range cases {
		err := dst.f.Restore(readCloser(tc.b))
		if !errors.Is(err, ErrBadSnapshot) {
			t.Errorf("#%d %s: got %v, want ErrBadSnapshot", i, tc.name, err)
		}
		if after := dump(t, dst.f); !bytes.Equal(after, before) {
			t.Errorf("#%d %s: failed restore changed the state: %s", i, tc.name, firstDiff(after, before))
		}
	}

	// The good snapshot restores, recomputes UsedSlots (which it does not
	// trust) and gives back the same bytes.
	withUsage := corrupt(t, src.f, func(st *state) {
		for _, h := range st.hosts {
			h.UsedSlots = 1000
		}
	})
	for i, b := range [][]byte{good, withUsage} {
		if err := dst.f.Restore(readCloser(b)); err != nil {
			t.Fatalf("#%d restore: %v", i, err)
		}
		if got := dump(t, dst.f); !bytes.Equal(got, good) {
			t.Errorf("#%d restored state differs: %s", i, firstDiff(got, good))
		}
		if got, want := usage(dst.f), usage(src.f); got != want {
			t.Errorf("#%d usage: got %s, want %s", i, got, want)
		}
	}
}
