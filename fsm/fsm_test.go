package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

// The IDs newWorld and the setups below produce are deterministic: p1 is VM
// 1, p2 is VM 2, the first ticket is 1 and its clones are VMs 3, 4, ...

func TestFSM_Apply_Commands(t *testing.T) {
	cases := []struct {
		name  string
		setup func(x *fixture) Command
		check func(x *fixture, r *Result)
	}{
		{
			name:  "HostRegister adds a host",
			setup: func(x *fixture) Command { return hostCmd("h4", 3) },
			check: func(x *fixture, r *Result) {
				x.eq("host", x.host("h4"), Host{ID: "h4", GossipAddr: "10.0.0.5:7946", APIAddr: "10.0.0.5:7070",
					Slots: 3, MemMB: 8192, Status: HostAlive, CreateIndex: x.idx, ModifyIndex: x.idx})
			},
		},
		{
			name:  "HostRegister unchanged keeps ModifyIndex",
			setup: func(x *fixture) Command { return hostCmd("h1", 4) },
			check: func(x *fixture, r *Result) {
				h := x.host("h1")
				x.eq("h1 create/modify index", [2]uint64{h.CreateIndex, h.ModifyIndex}, [2]uint64{1, 1})
			},
		},
		{
			name:  "HostRegister updates capacity",
			setup: func(x *fixture) Command { return hostCmd("h3", 2) },
			check: func(x *fixture, r *Result) {
				h := x.host("h3")
				x.eq("h3 slots", h.Slots, 2)
				x.eq("h3 free slots", h.FreeSlots(), 2)
				x.eq("h3 create/modify index", [2]uint64{h.CreateIndex, h.ModifyIndex}, [2]uint64{3, x.idx})
			},
		},
		{
			name: "HostRegister revives a failed host",
			setup: func(x *fixture) Command {
				x.must(&HostFail{ID: "h3"})
				return hostCmd("h3", 1)
			},
			check: func(x *fixture, r *Result) {
				h := x.host("h3")
				x.eq("h3 status", h.Status, HostAlive)
				x.eq("h3 modify index", h.ModifyIndex, x.idx)
			},
		},
		{
			name:  "HostFail marks the host failed and ends its VMs",
			setup: func(x *fixture) Command { return &HostFail{ID: "h1"} },
			check: func(x *fixture, r *Result) {
				h := x.host("h1")
				x.eq("h1 status", h.Status, HostFailed)
				x.eq("h1 free slots", h.FreeSlots(), 0)
				x.eq("h1 modify index", h.ModifyIndex, x.idx)
				p1 := x.vm(x.p1)
				x.eq("p1 state/reason", [2]string{string(p1.State), p1.Reason}, [2]string{"ended", "host h1 failed"})
				x.eq("p2 state", x.vm(x.p2).State, VMRunning)
			},
		},
		{
			name:  "HostFail Left marks the host left",
			setup: func(x *fixture) Command { return &HostFail{ID: "h2", Left: true, Reason: "drained"} },
			check: func(x *fixture, r *Result) {
				x.eq("h2 status", x.host("h2").Status, HostLeft)
				p2 := x.vm(x.p2)
				x.eq("p2 state/reason", [2]string{string(p2.State), p2.Reason}, [2]string{"ended", "drained"})
			},
		},
		{
			name: "HostFail Left of a failed host",
			setup: func(x *fixture) Command {
				x.must(&HostFail{ID: "h3"})
				return &HostFail{ID: "h3", Left: true}
			},
			check: func(x *fixture, r *Result) {
				h := x.host("h3")
				x.eq("h3 status/modify index", [2]interface{}{h.Status, h.ModifyIndex}, [2]interface{}{HostLeft, x.idx})
			},
		},
		{
			name: "HostFail repeated is a no-op",
			setup: func(x *fixture) Command {
				x.must(&HostFail{ID: "h3"})
				return &HostFail{ID: "h3", Reason: "again"}
			},
			check: func(x *fixture, r *Result) {
				x.eq("h3 modify index", x.host("h3").ModifyIndex, x.idx-1)
			},
		},
		{
			name:  "VMCreate allocates a parent VM",
			setup: func(x *fixture) Command { return &VMCreate{Name: "web", Host: "h3", MemMB: 64, VCPUs: 1} },
			check: func(x *fixture, r *Result) {
				x.eq("id", r.ID, uint64(3))
				x.eq("vm", x.vm(3), VM{ID: 3, Name: "web", Host: "h3", Role: RoleParent, State: VMRunning,
					MemMB: 64, VCPUs: 1, CreateIndex: x.idx, ModifyIndex: x.idx})
			},
		},
		{
			name: "VMEnd of a parent kills its tickets",
			setup: func(x *fixture) Command {
				x.ticket(x.p1, "h2", "h3") // 1, reserved
				x.clone(x.ticket(x.p1, "h2", "h1"))
				x.ticket(x.p2, "h1") // 3, another parent's
				return &VMEnd{VMID: x.p1, Reason: "poweroff"}
			},
			check: func(x *fixture, r *Result) {
				p1 := x.vm(x.p1)
				x.eq("p1 state/reason", [2]string{string(p1.State), p1.Reason}, [2]string{"ended", "poweroff"})
				for _, id := range []uint64{1, 2} {
					tv := x.view(id)
					x.eq(fmt.Sprintf("ticket %d state/reason", id), [2]string{string(tv.State), tv.Reason},
						[2]string{"killed", "parent vm 1 ended: poweroff"})
				}
				x.eq("ticket 2 clones", x.cloneStates(2), "1:killed@h2 2:killed@h1")
				x.eq("ticket 3 state", x.view(3).State, TicketReserved)
				x.eq("usage", usage(x.f), "h1=1 h2=0 h3=0")
			},
		},
		{
			name: "VMEnd of a pending clone fails it",
			setup: func(x *fixture) Command {
				return &VMEnd{VMID: x.clone(x.ticket(x.p1, "h2", "h3"))[0]}
			},
			check: func(x *fixture, r *Result) {
				x.eq("clones", x.cloneStates(1), "1:failed@h2 2:pending@h3")
				x.eq("clone 1 reason", x.view(1).Clones[0].Reason, "vm ended")
				vm := x.vm(3)
				x.eq("vm 3 state/reason", [2]string{string(vm.State), vm.Reason}, [2]string{"ended", "vm ended"})
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=1")
			},
		},
		{
			name: "VMEnd of an ended VM is a no-op",
			setup: func(x *fixture) Command {
				x.must(&VMEnd{VMID: x.p2})
				return &VMEnd{VMID: x.p2, Reason: "again"}
			},
			check: func(x *fixture, r *Result) {
				vm := x.vm(x.p2)
				x.eq("p2 reason/modify index", [2]interface{}{vm.Reason, vm.ModifyIndex}, [2]interface{}{"vm ended", x.idx - 1})
			},
		},
		{
			name: "TicketCreate reserves placements",
			setup: func(x *fixture) Command {
				return &TicketCreate{RequestID: "r1", ParentVM: x.p1, Requested: 5, Placements: []string{"h2", "h2", "h3"}}
			},
			check: func(x *fixture, r *Result) {
				x.eq("id", r.ID, uint64(1))
				x.eq("ticket", x.view(1), TicketView{Ticket: Ticket{ID: 1, ParentVM: x.p1, Requested: 5, Granted: 3,
					Placements: []string{"h2", "h2", "h3"}, State: TicketReserved, CreateIndex: x.idx, ModifyIndex: x.idx},
					Clones: []Clone{}})
				x.eq("usage", usage(x.f), "h1=0 h2=2 h3=1")
			},
		},
		{
			name:  "DescriptorCreate without a ticket",
			setup: func(x *fixture) Command { return descriptorCmd(0, x.p2) },
			check: func(x *fixture, r *Result) {
				x.eq("id", r.ID, uint64(1))
				d, ok := x.f.Descriptor(1)
				x.eq("found", ok, true)
				x.eq("descriptor", d, Descriptor{ID: 1, ParentVM: x.p2, Host: "h1", Size: 4096, SHA256: testSHA,
					MemserverAddr: "10.0.0.2:7100", McastGroup: "239.1.1.1:7200", PageCount: 65536, CreateIndex: x.idx})
				x.eq("next vm id", x.f.Counts().NextVMID, uint64(3))
			},
		},
		{
			name:  "DescriptorCreate with a ticket starts its clones",
			setup: func(x *fixture) Command { return descriptorCmd(x.ticket(x.p1, "h2", "h3"), x.p1) },
			check: func(x *fixture, r *Result) {
				tv := x.view(1)
				x.eq("ticket state/descriptor", [2]interface{}{tv.State, tv.Descriptor}, [2]interface{}{TicketActive, r.ID})
				x.eq("ticket multicast key", tv.McastKey, testSHA)
				x.eq("descriptor ticket", func() uint64 { d, _ := x.f.Descriptor(r.ID); return d.Ticket }(), uint64(1))
				x.eq("clones", x.cloneStates(1), "1:pending@h2 2:pending@h3")
				for k, host := range []string{"h2", "h3"} {
					id := uint64(3 + k)
					x.eq(fmt.Sprintf("clone %d", k+1), tv.Clones[k], Clone{Ticket: 1, K: k + 1, VMID: id, Host: host,
						State: ClonePending, CreateIndex: x.idx, ModifyIndex: x.idx})
					x.eq(fmt.Sprintf("vm %d", id), x.vm(id), VM{ID: id, Host: host, Role: RoleClone, State: VMPending,
						MemMB: 512, VCPUs: 2, Ticket: 1, CloneID: k + 1, ParentVM: x.p1, CreateIndex: x.idx, ModifyIndex: x.idx})
				}
				x.eq("usage", usage(x.f), "h1=0 h2=1 h3=1")
			},
		},
		{
			name: "CloneUpdate running",
			setup: func(x *fixture) Command {
				return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h2", "h3"))[0], State: CloneRunning}
			},
			check: func(x *fixture, r *Result) {
				x.eq("clones", x.cloneStates(1), "1:running@h2 2:pending@h3")
				x.eq("vm 3 state", x.vm(3).State, VMRunning)
				x.eq("ticket modify index", x.view(1).ModifyIndex, x.idx)
				x.eq("usage", usage(x.f), "h1=0 h2=1 h3=1")
			},
		},
		{
			name: "CloneUpdate running twice is a no-op",
			setup: func(x *fixture) Command {
				id := x.clone(x.ticket(x.p1, "h2"))[0]
				x.must(&CloneUpdate{VMID: id, State: CloneRunning})
				return &CloneUpdate{VMID: id, State: CloneRunning}
			},
			check: func(x *fixture, r *Result) {
				x.eq("clone modify index", x.view(1).Clones[0].ModifyIndex, x.idx-1)
			},
		},
		{
			name: "CloneUpdate exited records the outcome",
			setup: func(x *fixture) Command {
				id := x.clone(x.ticket(x.p1, "h2", "h3"))[0]
				x.must(&CloneUpdate{VMID: id, State: CloneRunning})
				return &CloneUpdate{VMID: id, State: CloneExited, Status: 3, Result: "42", Reason: "ignored"}
			},
			check: func(x *fixture, r *Result) {
				cl := x.view(1).Clones[0]
				x.eq("clone 1", cl, Clone{Ticket: 1, K: 1, VMID: 3, Host: "h2", State: CloneExited, Status: 3, Result: "42",
					CreateIndex: x.idx - 2, ModifyIndex: x.idx})
				vm := x.vm(3)
				x.eq("vm 3 state/reason", [2]string{string(vm.State), vm.Reason}, [2]string{"ended", ""})
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=1")
			},
		},
		{
			name: "CloneUpdate exited straight from pending",
			setup: func(x *fixture) Command {
				return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h3"))[0], State: CloneExited, Result: "fast"}
			},
			check: func(x *fixture, r *Result) {
				x.eq("clones", x.cloneStates(1), "1:exited@h3")
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=0")
			},
		},
		{
			name: "CloneUpdate failed",
			setup: func(x *fixture) Command {
				return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h2", "h3"))[1], State: CloneFailed, Reason: "oom"}
			},
			check: func(x *fixture, r *Result) {
				x.eq("clones", x.cloneStates(1), "1:pending@h2 2:failed@h3")
				x.eq("clone 2 reason", x.view(1).Clones[1].Reason, "oom")
				vm := x.vm(4)
				x.eq("vm 4 state/reason", [2]string{string(vm.State), vm.Reason}, [2]string{"ended", "oom"})
				x.eq("usage", usage(x.f), "h1=0 h2=1 h3=0")
			},
		},
		{
			name: "CloneUpdate failed without a reason",
			setup: func(x *fixture) Command {
				return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h2"))[0], State: CloneFailed}
			},
			check: func(x *fixture, r *Result) {
				x.eq("clone 1 reason", x.view(1).Clones[0].Reason, "failed")
			},
		},
		{
			name: "TicketJoin of a finished ticket",
			setup: func(x *fixture) Command {
				ids := x.clone(x.ticket(x.p1, "h2", "h3"))
				x.exit(ids[0])
				x.must(&CloneUpdate{VMID: ids[1], State: CloneFailed})
				return &TicketJoin{Ticket: 1, Caller: x.p1}
			},
			check: func(x *fixture, r *Result) {
				tv := x.view(1)
				x.eq("ticket state/modify index", [2]interface{}{tv.State, tv.ModifyIndex}, [2]interface{}{TicketJoined, x.idx})
				x.eq("clones", x.cloneStates(1), "1:exited@h2 2:failed@h3")
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=0")
			},
		},
		{
			name: "TicketJoin of a reserved ticket releases its placements",
			setup: func(x *fixture) Command {
				return &TicketJoin{Ticket: x.ticket(x.p1, "h2", "h3"), Caller: x.p1}
			},
			check: func(x *fixture, r *Result) {
				x.eq("ticket state", x.view(1).State, TicketJoined)
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=0")
			},
		},
		{
			name: "TicketKill by the parent",
			setup: func(x *fixture) Command {
				ids := x.clone(x.ticket(x.p1, "h2", "h3"))
				x.must(&CloneUpdate{VMID: ids[0], State: CloneRunning})
				return &TicketKill{Ticket: 1, Caller: x.p1, Reason: "enough"}
			},
			check: func(x *fixture, r *Result) {
				tv := x.view(1)
				x.eq("ticket state/reason", [2]string{string(tv.State), tv.Reason}, [2]string{"killed", "enough"})
				x.eq("clones", x.cloneStates(1), "1:killed@h2 2:killed@h3")
				for k, cl := range tv.Clones {
					vm := x.vm(cl.VMID)
					x.eq(fmt.Sprintf("clone %d reason", k+1), cl.Reason, "enough")
					x.eq(fmt.Sprintf("vm %d state/reason", cl.VMID), [2]string{string(vm.State), vm.Reason}, [2]string{"ended", "enough"})
				}
				x.eq("p1 state", x.vm(x.p1).State, VMRunning)
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=0")
			},
		},
		{
			name: "TicketKill by the parent keeps finished clones' outcomes",
			setup: func(x *fixture) Command {
				ids := x.clone(x.ticket(x.p1, "h2", "h3"))
				x.must(&CloneUpdate{VMID: ids[0], State: CloneExited, Status: 1, Result: "partial"})
				return &TicketKill{Ticket: 1, Caller: x.p1}
			},
			check: func(x *fixture, r *Result) {
				tv := x.view(1)
				x.eq("clones", x.cloneStates(1), "1:exited@h2 2:killed@h3")
				x.eq("clone 1 result", tv.Clones[0].Result, "partial")
				x.eq("ticket reason", tv.Reason, "killed")
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=0")
			},
		},
		{
			name: "TicketKill by an operator",
			setup: func(x *fixture) Command {
				return &TicketKill{Ticket: x.ticket(x.p2, "h1", "h3"), Caller: 0, Reason: "maintenance"}
			},
			check: func(x *fixture, r *Result) {
				tv := x.view(1)
				x.eq("ticket state/reason", [2]string{string(tv.State), tv.Reason}, [2]string{"killed", "maintenance"})
				x.eq("usage", usage(x.f), "h1=0 h2=0 h3=0")
			},
		},
		{
			name:  "CheckpointCreate",
			setup: func(x *fixture) Command { return checkpointCmd(x.p1) },
			check: func(x *fixture, r *Result) {
				x.eq("id", r.ID, uint64(1))
				cp, ok := x.f.Checkpoint(1)
				x.eq("checkpoint", [2]interface{}{ok, cp}, [2]interface{}{true, Checkpoint{ID: 1, ParentVM: x.p1, Descriptor: 1, CreateIndex: x.idx}})
				d, _ := x.f.Descriptor(1)
				x.eq("descriptor", d, Descriptor{ID: 1, Checkpoint: 1, ParentVM: x.p1, Host: "h1", Size: 8192, SHA256: testSHA,
					MemserverAddr: "10.0.0.2:7101", PageCount: 65536, CreateIndex: x.idx})
			},
		},
		{
			name: "CreateClones starts a ticket from a checkpoint",
			setup: func(x *fixture) Command {
				cp := x.must(checkpointCmd(x.p1))
				x.must(descriptorCmd(0, x.p1)) // descriptor 2: the ticket must use the checkpoint's
				return &CreateClones{Ticket: x.ticket(x.p1, "h1", "h2"), Checkpoint: cp, Caller: x.p1}
			},
			check: func(x *fixture, r *Result) {
				tv := x.view(1)
				x.eq("ticket state/descriptor", [2]interface{}{tv.State, tv.Descriptor}, [2]interface{}{TicketActive, uint64(1)})
				x.eq("clones", x.cloneStates(1), "1:pending@h1 2:pending@h2")
				x.eq("clone vms", x.cloneVMs(1), []uint64{3, 4})
				x.eq("usage", usage(x.f), "h1=1 h2=1 h3=0")
			},
		},
	}
	for i, tc := range cases {
		x := newWorld(t)
		x.label = fmt.Sprintf("#%d %s", i, tc.name)
		c := tc.setup(x)
		r := x.apply(c)
		if r.Err != nil {
			x.errorf("got err %v, want nil", r.Err)
			continue
		}
		if r.Duplicate {
			x.errorf("got Duplicate, want a fresh apply")
		}
		x.eq("applied index", x.f.Index(), x.idx)
		tc.check(x, r)
		x.eq("used slots vs recomputed", usage(x.f), recomputedUsage(x.f))
	}
}

func TestFSM_Apply_Refused(t *testing.T) {
	long := func(n int) string { return strings.Repeat("x", n) }
	cases := []struct {
		name  string
		setup func(x *fixture) Command
		want  error
	}{
		// A parent calling exit.
		{"exit of a parent VM", func(x *fixture) Command {
			return &CloneUpdate{VMID: x.p1, State: CloneExited, Result: "r"}
		}, ErrNotClone},
		{"running of a parent VM", func(x *fixture) Command {
			return &CloneUpdate{VMID: x.p2, State: CloneRunning}
		}, ErrNotClone},
		{"fail of a parent VM", func(x *fixture) Command {
			return &CloneUpdate{VMID: x.p1, State: CloneFailed}
		}, ErrNotClone},

		// The wrong party.
		{"join by a non-parent", func(x *fixture) Command {
			return &TicketJoin{Ticket: x.ticket(x.p1, "h2"), Caller: x.p2}
		}, ErrNotParent},
		{"join by the ticket's own clone", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			x.exit(ids[0])
			return &TicketJoin{Ticket: 1, Caller: ids[0]}
		}, ErrNotParent},
		{"kill by a non-parent", func(x *fixture) Command {
			x.clone(x.ticket(x.p1, "h2"))
			return &TicketKill{Ticket: 1, Caller: x.p2}
		}, ErrNotParent},
		{"kill by the ticket's own clone", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &TicketKill{Ticket: 1, Caller: ids[0]}
		}, ErrNotParent},
		{"clone of a foreign ticket", func(x *fixture) Command {
			return descriptorCmd(x.ticket(x.p1, "h2"), x.p2)
		}, ErrNotParent},
		{"create_clones of a foreign ticket", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p2))
			return &CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: cp, Caller: x.p2}
		}, ErrNotParent},
		{"create_clones from a foreign checkpoint", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p2))
			return &CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: cp, Caller: x.p1}
		}, ErrNotParent},
		{"ticket requested by a pending clone", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &TicketCreate{ParentVM: ids[0], Requested: 1, Placements: []string{"h1"}}
		}, ErrBadState},

		// Illegal transitions.
		{"double exit", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			x.exit(ids[0])
			return &CloneUpdate{VMID: ids[0], State: CloneExited, Status: 1}
		}, ErrBadState},
		{"exit after fail", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			x.must(&CloneUpdate{VMID: ids[0], State: CloneFailed})
			return &CloneUpdate{VMID: ids[0], State: CloneExited}
		}, ErrBadState},
		{"running after exit", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			x.exit(ids[0])
			return &CloneUpdate{VMID: ids[0], State: CloneRunning}
		}, ErrBadState},
		{"fail after kill", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			x.must(&TicketKill{Ticket: 1})
			return &CloneUpdate{VMID: ids[0], State: CloneFailed}
		}, ErrBadState},
		{"exit of a clone whose VM ended", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			x.must(&VMEnd{VMID: ids[0]})
			return &CloneUpdate{VMID: ids[0], State: CloneExited}
		}, ErrBadState},
		{"cloning a ticket twice", func(x *fixture) Command {
			x.clone(x.ticket(x.p1, "h2", "h3"))
			return descriptorCmd(1, x.p1)
		}, ErrBadState},
		{"create_clones of a cloned ticket", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p1))
			x.clone(x.ticket(x.p1, "h2"))
			return &CreateClones{Ticket: 1, Checkpoint: cp, Caller: x.p1}
		}, ErrBadState},
		{"clone after create_clones", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p1))
			x.must(&CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: cp, Caller: x.p1})
			return descriptorCmd(1, x.p1)
		}, ErrBadState},
		{"create_clones twice", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p1))
			x.must(&CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: cp, Caller: x.p1})
			return &CreateClones{Ticket: 1, Checkpoint: cp, Caller: x.p1}
		}, ErrBadState},
		{"VMCreate on a failed host", func(x *fixture) Command {
			x.must(&HostFail{ID: "h3"})
			return &VMCreate{Host: "h3"}
		}, ErrBadState},
		{"VMCreate on a departed host", func(x *fixture) Command {
			x.must(&HostFail{ID: "h3", Left: true})
			return &VMCreate{Host: "h3"}
		}, ErrBadState},
		{"ticket for an ended VM", func(x *fixture) Command {
			x.must(&VMEnd{VMID: x.p2})
			return &TicketCreate{ParentVM: x.p2, Requested: 1, Placements: []string{"h1"}}
		}, ErrBadState},
		{"descriptor of an ended VM", func(x *fixture) Command {
			x.must(&VMEnd{VMID: x.p2})
			return descriptorCmd(0, x.p2)
		}, ErrBadState},
		{"checkpoint of an ended VM", func(x *fixture) Command {
			x.must(&VMEnd{VMID: x.p2})
			return checkpointCmd(x.p2)
		}, ErrBadState},

		// Unknown objects.
		{"HostFail of an unknown host", func(x *fixture) Command { return &HostFail{ID: "h9"} }, ErrNotFound},
		{"VMCreate on an unknown host", func(x *fixture) Command { return &VMCreate{Host: "h9"} }, ErrNotFound},
		{"ticket placed on an unknown host", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 2, Placements: []string{"h1", "h9"}}
		}, ErrNotFound},
		{"VMEnd of an unknown VM", func(x *fixture) Command { return &VMEnd{VMID: 99} }, ErrNotFound},
		{"ticket for an unknown VM", func(x *fixture) Command {
			return &TicketCreate{ParentVM: 99, Requested: 1, Placements: []string{"h1"}}
		}, ErrNotFound},
		{"descriptor of an unknown VM", func(x *fixture) Command { return descriptorCmd(0, 99) }, ErrNotFound},
		{"checkpoint of an unknown VM", func(x *fixture) Command { return checkpointCmd(99) }, ErrNotFound},
		{"CloneUpdate of an unknown VM", func(x *fixture) Command {
			return &CloneUpdate{VMID: 99, State: CloneExited}
		}, ErrNotFound},
		{"join of an unknown ticket", func(x *fixture) Command { return &TicketJoin{Ticket: 99, Caller: x.p1} }, ErrNotFound},
		{"kill of an unknown ticket", func(x *fixture) Command { return &TicketKill{Ticket: 99} }, ErrNotFound},
		{"clone of an unknown ticket", func(x *fixture) Command { return descriptorCmd(99, x.p1) }, ErrNotFound},
		{"create_clones of an unknown ticket", func(x *fixture) Command {
			return &CreateClones{Ticket: 99, Checkpoint: x.must(checkpointCmd(x.p1)), Caller: x.p1}
		}, ErrNotFound},
		{"create_clones from an unknown checkpoint", func(x *fixture) Command {
			return &CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: 99, Caller: x.p1}
		}, ErrNotFound},

		// Join too early.
		{"join while a clone is pending", func(x *fixture) Command {
			x.clone(x.ticket(x.p1, "h2"))
			return &TicketJoin{Ticket: 1, Caller: x.p1}
		}, ErrClonesRunning},
		{"join while a clone is running", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2", "h3"))
			x.exit(ids[0])
			x.must(&CloneUpdate{VMID: ids[1], State: CloneRunning})
			return &TicketJoin{Ticket: 1, Caller: x.p1}
		}, ErrClonesRunning},

		// Disposed tickets.
		{"join of a joined ticket", func(x *fixture) Command {
			x.must(&TicketJoin{Ticket: x.ticket(x.p1, "h2"), Caller: x.p1})
			return &TicketJoin{Ticket: 1, Caller: x.p1}
		}, ErrDisposed},
		{"join of a killed ticket", func(x *fixture) Command {
			x.clone(x.ticket(x.p1, "h2"))
			x.must(&TicketKill{Ticket: 1, Caller: x.p1})
			return &TicketJoin{Ticket: 1, Caller: x.p1}
		}, ErrDisposed},
		{"join of a ticket whose parent ended", func(x *fixture) Command {
			x.ticket(x.p1, "h2")
			x.must(&VMEnd{VMID: x.p1})
			return &TicketJoin{Ticket: 1, Caller: x.p1}
		}, ErrDisposed},
		{"kill of a joined ticket", func(x *fixture) Command {
			x.must(&TicketJoin{Ticket: x.ticket(x.p1, "h2"), Caller: x.p1})
			return &TicketKill{Ticket: 1, Caller: x.p1}
		}, ErrDisposed},
		{"operator kill of a killed ticket", func(x *fixture) Command {
			x.must(&TicketKill{Ticket: x.ticket(x.p1, "h2")})
			return &TicketKill{Ticket: 1}
		}, ErrDisposed},
		{"clone of a killed ticket", func(x *fixture) Command {
			x.must(&TicketKill{Ticket: x.ticket(x.p1, "h2")})
			return descriptorCmd(1, x.p1)
		}, ErrDisposed},
		{"create_clones of a joined ticket", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p1))
			x.must(&TicketJoin{Ticket: x.ticket(x.p1, "h2"), Caller: x.p1})
			return &CreateClones{Ticket: 1, Checkpoint: cp, Caller: x.p1}
		}, ErrDisposed},

		// Capacity.
		{"ticket beyond a host's slots", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 2, Placements: []string{"h3", "h3"}}
		}, ErrNoCapacity},
		{"ticket beyond the slots left", func(x *fixture) Command {
			x.ticket(x.p1, "h2", "h2", "h2")
			return &TicketCreate{ParentVM: x.p2, Requested: 2, Placements: []string{"h2", "h2"}}
		}, ErrNoCapacity},
		{"ticket is all or nothing", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 3, Placements: []string{"h1", "h3", "h3"}}
		}, ErrNoCapacity},
		{"ticket on a failed host", func(x *fixture) Command {
			x.must(&HostFail{ID: "h3"})
			return &TicketCreate{ParentVM: x.p1, Requested: 1, Placements: []string{"h3"}}
		}, ErrNoCapacity},
		{"ticket on a host without slots", func(x *fixture) Command {
			x.must(hostCmd("h4", 0))
			return &TicketCreate{ParentVM: x.p1, Requested: 1, Placements: []string{"h4"}}
		}, ErrNoCapacity},
		{"ticket on a host whose slots shrank", func(x *fixture) Command {
			x.ticket(x.p1, "h2", "h2")
			x.must(hostCmd("h2", 1))
			return &TicketCreate{ParentVM: x.p1, Requested: 1, Placements: []string{"h2"}}
		}, ErrNoCapacity},

		// Invalid fields: refused by Validate before the state is read.
		{"result over 4096 bytes", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &CloneUpdate{VMID: ids[0], State: CloneExited, Result: long(MaxResult + 1)}
		}, ErrInvalid},
		{"result not UTF-8", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &CloneUpdate{VMID: ids[0], State: CloneExited, Result: "\xff\xfe"}
		}, ErrInvalid},
		{"clone state pending", func(x *fixture) Command {
			return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h2"))[0], State: ClonePending}
		}, ErrInvalid},
		{"clone state killed", func(x *fixture) Command {
			return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h2"))[0], State: CloneKilled}
		}, ErrInvalid},
		{"clone state empty", func(x *fixture) Command { return &CloneUpdate{VMID: x.p1} }, ErrInvalid},
		{"CloneUpdate of vm 0", func(x *fixture) Command { return &CloneUpdate{State: CloneExited} }, ErrInvalid},
		{"CloneUpdate reason too long", func(x *fixture) Command {
			return &CloneUpdate{VMID: x.clone(x.ticket(x.p1, "h2"))[0], State: CloneFailed, Reason: long(MaxReason + 1)}
		}, ErrInvalid},
		{"descriptor sha256 upper case", func(x *fixture) Command {
			c := descriptorCmd(x.ticket(x.p1, "h2"), x.p1)
			c.SHA256 = strings.ToUpper(testSHA)
			return c
		}, ErrInvalid},
		{"descriptor sha256 short", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.SHA256 = testSHA[:63]
			return c
		}, ErrInvalid},
		{"checkpoint sha256 not hex", func(x *fixture) Command {
			c := checkpointCmd(x.p1)
			c.SHA256 = "g" + testSHA[1:]
			return c
		}, ErrInvalid},
		{"descriptor multicast key short", func(x *fixture) Command {
			c := descriptorCmd(x.ticket(x.p1, "h2"), x.p1)
			c.McastKey = testSHA[:62]
			return c
		}, ErrInvalid},
		{"create_clones multicast key upper case", func(x *fixture) Command {
			return &CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: 1, Caller: x.p1, McastKey: strings.ToUpper(testSHA)}
		}, ErrInvalid},
		{"host multicast address multicast", func(x *fixture) Command {
			c := hostCmd("h3", 1)
			c.McastAddr = "239.1.1.1"
			return c
		}, ErrInvalid},
		{"host multicast address with port", func(x *fixture) Command {
			c := hostCmd("h3", 1)
			c.McastAddr = "10.0.0.3:7502"
			return c
		}, ErrInvalid},
		{"descriptor memserver 0.0.0.0", func(x *fixture) Command {
			c := descriptorCmd(x.ticket(x.p1, "h2"), x.p1)
			c.MemserverAddr = "0.0.0.0:7100"
			return c
		}, ErrInvalid},
		{"checkpoint memserver [::]", func(x *fixture) Command {
			c := checkpointCmd(x.p1)
			c.MemserverAddr = "[::]:7100"
			return c
		}, ErrInvalid},
		{"descriptor memserver missing", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.MemserverAddr = ""
			return c
		}, ErrInvalid},
		{"descriptor multicast port 0", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.McastGroup = "239.1.1.1:0"
			return c
		}, ErrInvalid},
		{"descriptor size 0", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.Size = 0
			return c
		}, ErrInvalid},
		{"descriptor size over 4 GiB", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.Size = 1<<32 + 1
			return c
		}, ErrInvalid},
		{"descriptor negative page count", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.PageCount = -1
			return c
		}, ErrInvalid},
		{"descriptor bad host id", func(x *fixture) Command {
			c := descriptorCmd(0, x.p1)
			c.Host = "h 1"
			return c
		}, ErrInvalid},
		{"descriptor of vm 0", func(x *fixture) Command { return descriptorCmd(0, 0) }, ErrInvalid},
		{"checkpoint of vm 0", func(x *fixture) Command { return checkpointCmd(0) }, ErrInvalid},
		{"gossip address 0.0.0.0", func(x *fixture) Command {
			c := hostCmd("h4", 1)
			c.GossipAddr = "0.0.0.0:7946"
			return c
		}, ErrInvalid},
		{"api address without port", func(x *fixture) Command {
			c := hostCmd("h1", 4)
			c.APIAddr = "10.0.0.2"
			return c
		}, ErrInvalid},
		{"api address port 65536", func(x *fixture) Command {
			c := hostCmd("h1", 4)
			c.APIAddr = "10.0.0.2:65536"
			return c
		}, ErrInvalid},
		{"host id empty", func(x *fixture) Command { return hostCmd("", 1) }, ErrInvalid},
		{"host id starting with a dash", func(x *fixture) Command { return hostCmd("-h4", 1) }, ErrInvalid},
		{"host id with a slash", func(x *fixture) Command { return hostCmd("h/4", 1) }, ErrInvalid},
		{"host id of 65 characters", func(x *fixture) Command { return hostCmd(long(64)+"4", 1) }, ErrInvalid},
		{"host slots negative", func(x *fixture) Command { return hostCmd("h1", -1) }, ErrInvalid},
		{"host slots too many", func(x *fixture) Command { return hostCmd("h1", maxSlots+1) }, ErrInvalid},
		{"host memory negative", func(x *fixture) Command {
			c := hostCmd("h1", 4)
			c.MemMB = -1
			return c
		}, ErrInvalid},
		{"HostFail bad host id", func(x *fixture) Command { return &HostFail{ID: "h1 "} }, ErrInvalid},
		{"HostFail reason not UTF-8", func(x *fixture) Command { return &HostFail{ID: "h1", Reason: "\xc3"} }, ErrInvalid},
		{"VMCreate bad host id", func(x *fixture) Command { return &VMCreate{Host: ".h1"} }, ErrInvalid},
		{"VMCreate name too long", func(x *fixture) Command { return &VMCreate{Host: "h1", Name: long(MaxName + 1)} }, ErrInvalid},
		{"VMCreate vcpus out of range", func(x *fixture) Command { return &VMCreate{Host: "h1", VCPUs: 1025} }, ErrInvalid},
		{"VMCreate memory negative", func(x *fixture) Command { return &VMCreate{Host: "h1", MemMB: -1} }, ErrInvalid},
		{"VMCreate request id too long", func(x *fixture) Command { return &VMCreate{Host: "h1", RequestID: long(65)} }, ErrInvalid},
		{"exit request id too long", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &CloneUpdate{RequestID: long(65), VMID: ids[0], State: CloneExited}
		}, ErrInvalid},
		{"join request id too long", func(x *fixture) Command {
			return &TicketJoin{RequestID: long(65), Ticket: x.ticket(x.p1, "h2"), Caller: x.p1}
		}, ErrInvalid},
		{"kill request id too long", func(x *fixture) Command {
			return &TicketKill{RequestID: long(65), Ticket: x.ticket(x.p1, "h2")}
		}, ErrInvalid},
		{"create_clones request id too long", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p1))
			return &CreateClones{RequestID: long(65), Ticket: x.ticket(x.p1, "h2"), Checkpoint: cp, Caller: x.p1}
		}, ErrInvalid},
		{"VMEnd of vm 0", func(x *fixture) Command { return &VMEnd{} }, ErrInvalid},
		{"VMEnd reason too long", func(x *fixture) Command { return &VMEnd{VMID: x.p1, Reason: long(MaxReason + 1)} }, ErrInvalid},
		{"ticket requested 0", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 0, Placements: []string{"h1"}}
		}, ErrInvalid},
		{"ticket requested too many", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: MaxClonesPerTicket + 1, Placements: []string{"h1"}}
		}, ErrInvalid},
		{"ticket with more placements than requested", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 1, Placements: []string{"h1", "h2"}}
		}, ErrInvalid},
		{"ticket without placements", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 1}
		}, ErrInvalid},
		{"ticket placement with a bad host id", func(x *fixture) Command {
			return &TicketCreate{ParentVM: x.p1, Requested: 2, Placements: []string{"h1", "h2:1"}}
		}, ErrInvalid},
		{"ticket for vm 0", func(x *fixture) Command {
			return &TicketCreate{Requested: 1, Placements: []string{"h1"}}
		}, ErrInvalid},
		{"join without a caller", func(x *fixture) Command { return &TicketJoin{Ticket: x.ticket(x.p1, "h2")} }, ErrInvalid},
		{"join of ticket 0", func(x *fixture) Command { return &TicketJoin{Caller: x.p1} }, ErrInvalid},
		{"kill of ticket 0", func(x *fixture) Command { return &TicketKill{Caller: x.p1} }, ErrInvalid},
		{"kill reason too long", func(x *fixture) Command {
			return &TicketKill{Ticket: x.ticket(x.p1, "h2"), Reason: long(MaxReason + 1)}
		}, ErrInvalid},
		{"create_clones without a caller", func(x *fixture) Command {
			return &CreateClones{Ticket: x.ticket(x.p1, "h2"), Checkpoint: x.must(checkpointCmd(x.p1))}
		}, ErrInvalid},
		{"create_clones without a checkpoint", func(x *fixture) Command {
			return &CreateClones{Ticket: x.ticket(x.p1, "h2"), Caller: x.p1}
		}, ErrInvalid},
	}
	for i, tc := range cases {
		x := newWorld(t)
		x.label = fmt.Sprintf("#%d %s", i, tc.name)
		c := tc.setup(x)
		before, fp := stateBytes(t, x.f), x.f.Fingerprint()
		r := x.apply(c)
		if !errors.Is(r.Err, tc.want) {
			x.errorf("got err %v, want %v", r.Err, tc.want)
		}
		x.eq("code", Code(r.Err), Code(tc.want))
		if r.ID != 0 || r.Duplicate {
			x.errorf("got ID %d Duplicate %v, want 0 false", r.ID, r.Duplicate)
		}
		x.eq("applied index", x.f.Index(), x.idx)
		if after := stateBytes(t, x.f); !bytes.Equal(before, after) {
			x.errorf("state changed by a refused command: %s", firstDiff(after, before))
		}
		x.eq("fingerprint", x.f.Fingerprint(), fp)
	}
}

// TestFSM_UsedSlots follows one host set through every way a slot is taken
// and given back.
func TestFSM_UsedSlots(t *testing.T) {
	x := newWorld(t)
	var clones []uint64
	steps := []struct {
		name string
		do   func()
		want string
	}{
		{"start", func() {}, "h1=0 h2=0 h3=0"},
		{"ticket 1 reserves", func() { x.ticket(x.p1, "h2", "h2", "h3") }, "h1=0 h2=2 h3=1"},
		{"ticket 1 clones", func() { clones = x.clone(1) }, "h1=0 h2=2 h3=1"},
		{"clone 1 runs", func() { x.must(&CloneUpdate{VMID: clones[0], State: CloneRunning}) }, "h1=0 h2=2 h3=1"},
		{"clone 1 exits", func() { x.exit(clones[0]) }, "h1=0 h2=1 h3=1"},
		{"clone 2 fails", func() { x.must(&CloneUpdate{VMID: clones[1], State: CloneFailed}) }, "h1=0 h2=0 h3=1"},
		{"clone 3 VM ends", func() { x.must(&VMEnd{VMID: clones[2]}) }, "h1=0 h2=0 h3=0"},
		{"ticket 1 joins", func() { x.must(&TicketJoin{Ticket: 1, Caller: x.p1}) }, "h1=0 h2=0 h3=0"},
		{"ticket 2 reserves", func() { x.ticket(x.p2, "h1", "h3") }, "h1=1 h2=0 h3=1"},
		{"ticket 2 clones", func() { clones = x.clone(2) }, "h1=1 h2=0 h3=1"},
		{"ticket 2 killed by parent", func() { x.must(&TicketKill{Ticket: 2, Caller: x.p2}) }, "h1=0 h2=0 h3=0"},
		{"ticket 3 reserves", func() { x.ticket(x.p1, "h1", "h1", "h1", "h1") }, "h1=4 h2=0 h3=0"},
		{"ticket 3 joins reserved", func() { x.must(&TicketJoin{Ticket: 3, Caller: x.p1}) }, "h1=0 h2=0 h3=0"},
		{"ticket 4 reserves", func() { x.ticket(x.p1, "h3") }, "h1=0 h2=0 h3=1"},
		{"ticket 4 killed by operator", func() { x.must(&TicketKill{Ticket: 4}) }, "h1=0 h2=0 h3=0"},
		{"ticket 5 reserves", func() { x.ticket(x.p2, "h1", "h2") }, "h1=1 h2=1 h3=0"},
		{"ticket 5 from a checkpoint", func() {
			x.must(&CreateClones{Ticket: 5, Checkpoint: x.must(checkpointCmd(x.p2)), Caller: x.p2})
		}, "h1=1 h2=1 h3=0"},
		{"ticket 6 reserves", func() { x.ticket(x.p2, "h3") }, "h1=1 h2=1 h3=1"},
		{"parent of 5 and 6 ends", func() { x.must(&VMEnd{VMID: x.p2}) }, "h1=0 h2=0 h3=0"},
		{"ticket 7 fills h3", func() { x.ticket(x.p1, "h3") }, "h1=0 h2=0 h3=1"},
		{"h3 fails while reserved", func() { x.must(&HostFail{ID: "h3"}) }, "h1=0 h2=0 h3=1"},
		{"ticket 7 clones onto failed h3", func() { x.clone(7) }, "h1=0 h2=0 h3=0"},
	}
	for i, s := range steps {
		x.label = fmt.Sprintf("#%d %s", i, s.name)
		s.do()
		x.eq("usage", usage(x.f), s.want)
		x.eq("recomputed", recomputedUsage(x.f), s.want)
	}
}

// TestFSM_HostFail checks what a host's death takes with it: its clones fail,
// its parent VMs end and their tickets are killed wherever their clones run;
// tickets that merely have a placement there live on.
func TestFSM_HostFail(t *testing.T) {
	for i, left := range []bool{false, true} {
		x := newWorld(t)
		x.label = fmt.Sprintf("#%d left=%v", i, left)
		a := x.clone(x.ticket(x.p1, "h2", "h3", "h2")) // ticket 1: p1's clones, two on h2
		x.must(&CloneUpdate{VMID: a[0], State: CloneRunning})
		x.exit(a[2])
		b := x.clone(x.ticket(x.p2, "h1", "h1")) // ticket 2: p2 on h2, clones on h1
		x.must(&CloneUpdate{VMID: b[0], State: CloneRunning})
		x.ticket(x.p2, "h1")           // ticket 3: p2, reserved
		x.ticket(x.p1, "h2")           // ticket 4: p1, reserved on h2
		x.ticket(x.p1, "h1")           // ticket 5: untouched
		x.must(&TicketKill{Ticket: 5}) // disposed before: stays as it was
		x.eq("usage before", usage(x.f), "h1=3 h2=2 h3=1")

		x.must(&HostFail{ID: "h2", Left: left, Reason: "gone"})
		wantStatus := HostFailed
		if left {
			wantStatus = HostLeft
		}
		x.eq("h2 status", x.host("h2").Status, wantStatus)
		x.eq("p2 state", x.vm(x.p2).State, VMEnded)
		x.eq("p1 state", x.vm(x.p1).State, VMRunning)
		x.eq("ticket 1", x.cloneStates(1), "1:failed@h2 2:pending@h3 3:exited@h2")
		x.eq("ticket 1 clone 1 reason", x.view(1).Clones[0].Reason, "gone")
		x.eq("ticket 1 state", x.view(1).State, TicketActive)
		x.eq("ticket 2", x.cloneStates(2), "1:killed@h1 2:killed@h1")
		for id, want := range map[uint64]TicketState{2: TicketKilled, 3: TicketKilled, 4: TicketReserved, 5: TicketKilled} {
			x.eq(fmt.Sprintf("ticket %d state", id), x.view(id).State, want)
		}
		x.eq("ticket 2 reason", x.view(2).Reason, "parent vm 2 ended: gone")
		x.eq("ticket 5 reason", x.view(5).Reason, "killed")
		x.eq("usage after", usage(x.f), "h1=0 h2=1 h3=1")
		live, _ := x.f.Clones("h2", true)
		x.eq("live clones on h2", len(live), 0)

		// Ticket 4's clone is placed on the dead host: it fails at once, so
		// that join does not wait for it.
		x.clone(4)
		x.eq("ticket 4", x.cloneStates(4), "1:failed@h2")
		x.eq("ticket 4 clone reason", x.view(4).Clones[0].Reason, "host h2 is not alive")
		x.eq("usage after ticket 4 clones", usage(x.f), "h1=0 h2=0 h3=1")
		x.must(&TicketJoin{Ticket: 4, Caller: x.p1})

		// The host comes back; nothing it lost comes back with it.
		x.must(hostCmd("h2", 4))
		x.eq("h2 status after register", x.host("h2").Status, HostAlive)
		x.eq("ticket 1 after register", x.cloneStates(1), "1:failed@h2 2:pending@h3 3:exited@h2")
		x.eq("usage after register", usage(x.f), "h1=0 h2=0 h3=1")
		x.eq("recomputed", recomputedUsage(x.f), usage(x.f))
	}
}

// TestFSM_VMIDs checks that VM IDs only grow, whoever allocates them, and are
// not reused after a VM ends, a command is refused or a snapshot is restored.
func TestFSM_VMIDs(t *testing.T) {
	x := newWorld(t)
	seen := map[uint64]string{x.p1: "p1", x.p2: "p2"}
	last := x.p2
	add := func(what string, ids ...uint64) {
		t.Helper()
		for _, id := range ids {
			if prev, ok := seen[id]; ok {
				t.Errorf("%s: vm id %d reused (first %s)", what, id, prev)
			}
			if id <= last {
				t.Errorf("%s: vm id %d, want > %d", what, id, last)
			}
			seen[id], last = what, id
		}
	}
	add("vm create", x.must(&VMCreate{Host: "h3"}))
	add("descriptor create", x.clone(x.ticket(x.p1, "h1", "h2", "h3"))...)
	x.must(&TicketKill{Ticket: 1})
	x.must(&VMEnd{VMID: 3})
	if r := x.apply(&VMCreate{Host: "h9"}); r.Err == nil {
		t.Fatalf("VMCreate on unknown host: got nil err")
	}
	add("vm create after end", x.must(&VMCreate{Host: "h1"}))
	cp := x.must(checkpointCmd(x.p1))
	add("create clones", func() []uint64 {
		x.must(&CreateClones{Ticket: x.ticket(x.p1, "h2", "h2"), Checkpoint: cp, Caller: x.p1})
		return x.cloneVMs(2)
	}()...)
	// A clone placed on a failed host still takes an ID.
	x.ticket(x.p2, "h1")
	x.must(&HostFail{ID: "h1", Left: true})
	add("clone on a departed host", x.clone(3)...)

	y := New()
	if err := y.Restore(readCloser(snapshotBytes(t, x.f))); err != nil {
		t.Fatalf("restore: %v", err)
	}
	x.f = y
	add("vm create after restore", x.must(&VMCreate{Host: "h2"}))
	x.must(hostCmd("h1", 4))
	add("clones after restore", x.clone(x.ticket(x.p2, "h1", "h2"))...)
	if got, want := x.f.Counts().NextVMID, last+1; got != want {
		t.Errorf("next vm id: got %d, want %d", got, want)
	}
}

// TestFSM_CloneIDs checks that a ticket of m clones numbers them 1..m, each on
// the host placed for it, however the clones were started.
func TestFSM_CloneIDs(t *testing.T) {
	cases := []struct {
		placements []string
		checkpoint bool
	}{
		{[]string{"h1"}, false},
		{[]string{"h2", "h1", "h2", "h3"}, false},
		{[]string{"h1", "h1", "h1", "h2", "h2", "h2", "h2", "h3"}, false},
		{[]string{"h3", "h2"}, true},
	}
	for i, tc := range cases {
		x := newWorld(t)
		x.label = fmt.Sprintf("#%d %v", i, tc.placements)
		x.ticket(x.p2, "h1") // so that the ticket under test is not ticket 1
		id := x.ticket(x.p1, tc.placements...)
		if tc.checkpoint {
			x.must(&CreateClones{Ticket: id, Checkpoint: x.must(checkpointCmd(x.p1)), Caller: x.p1})
		} else {
			x.clone(id)
		}
		tv := x.view(id)
		x.eq("granted", tv.Granted, len(tc.placements))
		var ks []int
		var hosts []string
		for _, cl := range tv.Clones {
			ks = append(ks, cl.K)
			hosts = append(hosts, cl.Host)
			vm := x.vm(cl.VMID)
			x.eq(fmt.Sprintf("vm %d ticket/clone id", cl.VMID), [2]uint64{vm.Ticket, uint64(vm.CloneID)}, [2]uint64{id, uint64(cl.K)})
		}
		var want []int
		for k := 1; k <= len(tc.placements); k++ {
			want = append(want, k)
		}
		x.eq("clone ids", ks, want)
		x.eq("clone hosts", hosts, tc.placements)
	}
}

// TestFSM_RequestID checks that a retried command with the same RequestID
// gets the outcome of the first back and changes nothing, while the same
// command with a new (or no) RequestID is judged on its own.
func TestFSM_RequestID(t *testing.T) {
	cases := []struct {
		name  string
		setup func(x *fixture) Command // returns a command with RequestID "req"
		again error                    // the same command judged on its own
	}{
		{"VMCreate", func(x *fixture) Command { return &VMCreate{RequestID: "req", Host: "h1"} }, nil},
		{"TicketCreate", func(x *fixture) Command {
			return &TicketCreate{RequestID: "req", ParentVM: x.p1, Requested: 1, Placements: []string{"h3"}}
		}, ErrNoCapacity},
		{"DescriptorCreate", func(x *fixture) Command {
			c := descriptorCmd(0, x.p2)
			c.RequestID = "req"
			return c
		}, nil},
		{"DescriptorCreate with a ticket", func(x *fixture) Command {
			c := descriptorCmd(x.ticket(x.p1, "h1", "h2"), x.p1)
			c.RequestID = "req"
			return c
		}, ErrBadState},
		{"CheckpointCreate", func(x *fixture) Command {
			c := checkpointCmd(x.p1)
			c.RequestID = "req"
			return c
		}, nil},
		{"CloneUpdate exited", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &CloneUpdate{RequestID: "req", VMID: ids[0], State: CloneExited, Status: 2, Result: "first"}
		}, ErrBadState},
		{"CloneUpdate failed", func(x *fixture) Command {
			ids := x.clone(x.ticket(x.p1, "h2"))
			return &CloneUpdate{RequestID: "req", VMID: ids[0], State: CloneFailed}
		}, ErrBadState},
		{"TicketJoin", func(x *fixture) Command {
			return &TicketJoin{RequestID: "req", Ticket: x.ticket(x.p1, "h2"), Caller: x.p1}
		}, ErrDisposed},
		{"TicketKill", func(x *fixture) Command {
			x.clone(x.ticket(x.p1, "h2"))
			return &TicketKill{RequestID: "req", Ticket: 1, Caller: x.p1}
		}, ErrDisposed},
		{"CreateClones", func(x *fixture) Command {
			cp := x.must(checkpointCmd(x.p1))
			return &CreateClones{RequestID: "req", Ticket: x.ticket(x.p1, "h2"), Checkpoint: cp, Caller: x.p1}
		}, ErrBadState},
	}
	for i, tc := range cases {
		x := newWorld(t)
		x.label = fmt.Sprintf("#%d %s", i, tc.name)
		c := tc.setup(x)
		first := x.apply(c)
		if first.Err != nil || first.Duplicate {
			x.fatalf("first apply: got %+v, want success", first)
		}
		creates := c.Type() == CmdVMCreate || c.Type() == CmdTicketCreate ||
			c.Type() == CmdDescriptorCreate || c.Type() == CmdCheckpointCreate
		if got := first.ID != 0; got != creates {
			x.errorf("first apply: got ID %d, want one only from a command that creates", first.ID)
		}
		before := stateBytes(t, x.f)
		for _, retry := range []Command{c, tc.setup(newWorld(t))} {
			r := x.apply(retry)
			x.eq("retry", [3]interface{}{r.ID, r.Duplicate, r.Err}, [3]interface{}{first.ID, true, nil})
		}
		if after := stateBytes(t, x.f); !bytes.Equal(before, after) {
			x.errorf("a duplicate changed the state: %s", firstDiff(after, before))
		}
		// The dedup table is replicated state: it survives a snapshot.
		y := New()
		if err := y.Restore(readCloser(snapshotBytes(t, x.f))); err != nil {
			x.fatalf("restore: %v", err)
		}
		x.f = y
		r := x.apply(c)
		x.eq("retry after restore", [3]interface{}{r.ID, r.Duplicate, r.Err}, [3]interface{}{first.ID, true, nil})
		// With another RequestID, or none, the command is new.
		for _, id := range []string{"req-2", ""} {
			setRequestID(c, id)
			r := x.apply(c)
			if r.Duplicate || !errors.Is(r.Err, tc.again) || (creates && r.Err == nil && r.ID == first.ID) {
				x.errorf("request id %q: got %+v, want a fresh outcome with err %v", id, r, tc.again)
			}
		}
	}

	// A refused command does not consume its RequestID: the retry that can
	// succeed does.
	x := newWorld(t)
	if r := x.apply(&VMCreate{RequestID: "r", Host: "h9"}); !errors.Is(r.Err, ErrNotFound) {
		t.Fatalf("VMCreate on h9: got %v, want ErrNotFound", r.Err)
	}
	if r := x.apply(&VMCreate{RequestID: "r", Host: "h1"}); r.Err != nil || r.Duplicate || r.ID != 3 {
		t.Fatalf("VMCreate after refusal: got %+v, want new vm 3", r)
	}
}

// TestFSM_RequestIDPerType checks that request IDs are scoped by command
// type: one client-chosen ID used for different calls dedups none of them.
func TestFSM_RequestIDPerType(t *testing.T) {
	x := newWorld(t)
	cp := checkpointCmd(x.p1)
	cp.RequestID = "same"
	d := descriptorCmd(0, x.p1)
	d.RequestID = "same"
	steps := []struct {
		c      Command
		wantID uint64
	}{
		{&VMCreate{RequestID: "same", Host: "h1"}, 3},
		{&TicketCreate{RequestID: "same", ParentVM: x.p1, Requested: 2, Placements: []string{"h2", "h2"}}, 1},
		{&TicketCreate{RequestID: "same", ParentVM: x.p2, Requested: 1, Placements: []string{"h1"}}, 1}, // a retry
		{cp, 1},
		{d, 2},
		{&CreateClones{RequestID: "same", Ticket: 1, Checkpoint: 1, Caller: x.p1}, 0},
		{&CloneUpdate{RequestID: "same", VMID: 4, State: CloneExited}, 0},
		{&CloneUpdate{RequestID: "same", VMID: 5, State: CloneExited}, 0}, // a retry: vm 5 stays pending
		{&TicketKill{RequestID: "same", Ticket: 1, Caller: x.p1}, 0},
		{&TicketCreate{ParentVM: x.p2, Requested: 1, Placements: []string{"h1"}}, 2},
		{&TicketJoin{RequestID: "same", Ticket: 2, Caller: x.p2}, 0},
	}
	for i, s := range steps {
		x.label = fmt.Sprintf("#%d %T", i, s.c)
		r := x.apply(s.c)
		x.eq("id/err", [2]interface{}{r.ID, r.Err}, [2]interface{}{s.wantID, nil})
		x.eq("duplicate", r.Duplicate, i == 2 || i == 7)
	}
	x.label = ""
	x.eq("ticket 1 clones", x.cloneStates(1), "1:exited@h2 2:killed@h2")
	x.eq("ticket 2 state", x.view(2).State, TicketJoined)
}

func setRequestID(c Command, id string) {
	reflect.ValueOf(c).Elem().FieldByName("RequestID").SetString(id)
}

func TestFSM_RequestIDEviction(t *testing.T) {
	s := newState()
	for i := 0; i < maxRequests+2; i++ {
		s.remember(fmt.Sprintf("r%d", i), uint64(i+1))
	}
	if _, ok := s.requests["r0"]; ok {
		t.Errorf("r0: still remembered after %d newer requests", maxRequests+1)
	}
	if _, ok := s.requests["r1"]; ok {
		t.Errorf("r1: still remembered after %d newer requests", maxRequests)
	}
	if got := s.requests["r2"]; got != 3 {
		t.Errorf("r2: got %d, want 3", got)
	}
	if len(s.requests) != maxRequests || len(s.requestOrder) != maxRequests {
		t.Errorf("table size: got %d/%d, want %d", len(s.requests), len(s.requestOrder), maxRequests)
	}
}

// TestFSM_ApplyLog covers the raft entry level: non-command entries, unknown
// command types with and without the ignorable flag, and undecodable bodies.
func TestFSM_ApplyLog(t *testing.T) {
	valid, err := Encode(hostCmd("h4", 1))
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		log       raft.Log
		wantPanic bool
		wantNil   bool   // Apply returns nil instead of *Result
		wantIndex uint64 // applied index afterwards
	}{
		{raft.Log{Index: 10, Type: raft.LogNoop}, false, true, 5},
		{raft.Log{Index: 10, Type: raft.LogConfiguration, Data: valid}, false, true, 5},
		{raft.Log{Index: 10, Type: raft.LogBarrier}, false, true, 5},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: valid}, false, false, 10},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: []byte{byte(IgnorableFlag) | 0x01, 0x80}}, false, true, 10},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: []byte{0xff}}, false, true, 10},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: []byte{0x7f, 0x80}}, true, false, 5},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: []byte{0x00}}, true, false, 5},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: nil}, true, false, 5},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: []byte{byte(CmdVMEnd), 0xc1}}, true, false, 5},
		{raft.Log{Index: 10, Type: raft.LogCommand, Data: append([]byte{byte(CmdVMEnd)}, valid[1:]...)}, false, false, 10},
	}
	for i, tc := range cases {
		x := newWorld(t)
		before := stateBytes(t, x.f)
		var res interface{}
		panicked := func() (p bool) {
			defer func() { p = recover() != nil }()
			res = x.f.Apply(&tc.log)
			return false
		}()
		if panicked != tc.wantPanic {
			t.Errorf("#%d: got panic %v, want %v", i, panicked, tc.wantPanic)
			continue
		}
		if panicked {
			continue
		}
		if got := res == nil; got != tc.wantNil {
			t.Errorf("#%d: got nil result %v (%#v), want %v", i, got, res, tc.wantNil)
		}
		if got := x.f.Index(); got != tc.wantIndex {
			t.Errorf("#%d: got applied index %d, want %d", i, got, tc.wantIndex)
		}
		if tc.wantNil {
			if after := stateBytes(t, x.f); !bytes.Equal(before, after) {
				t.Errorf("#%d: skipped entry changed the state", i)
			}
		}
	}
}

func TestFSM_Watch(t *testing.T) {
	x := newWorld(t)
	ch, idx := x.f.Watch()
	if idx != x.idx {
		t.Fatalf("watch index: got %d, want %d", idx, x.idx)
	}
	select {
	case <-ch:
		t.Fatalf("watch channel closed before any change")
	default:
	}
	x.apply(&VMEnd{VMID: 99}) // refused, but the applied index moves
	select {
	case <-ch:
	default:
		t.Fatalf("watch channel still open after an apply")
	}
	ch, idx = x.f.Watch()
	if idx != x.idx {
		t.Fatalf("watch index: got %d, want %d", idx, x.idx)
	}
	if err := x.f.Restore(readCloser(snapshotBytes(t, New()))); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ch:
	default:
		t.Fatalf("watch channel still open after a restore")
	}
}

func TestFSM_Queries(t *testing.T) {
	x := newWorld(t)
	ids := x.clone(x.ticket(x.p1, "h2", "h3"))
	x.must(&CloneUpdate{VMID: ids[0], State: CloneRunning})
	x.exit(ids[1])
	x.ticket(x.p2, "h1")
	x.must(checkpointCmd(x.p2))

	tickets, idx := x.f.Tickets(x.p2)
	if len(tickets) != 1 || tickets[0].ID != 2 || idx != tickets[0].ModifyIndex {
		t.Errorf("Tickets(p2): got %+v at %d, want ticket 2", tickets, idx)
	}
	all, _ := x.f.Tickets(0)
	if len(all) != 2 {
		t.Errorf("Tickets(0): got %d tickets, want 2", len(all))
	}
	all[0].Placements[0] = "scribble"
	if x.view(1).Placements[0] == "scribble" {
		t.Errorf("Tickets aliases Placements")
	}
	tv, _, _ := x.f.Ticket(1)
	tv.Placements[0] = "scribble"
	if x.view(1).Placements[0] == "scribble" {
		t.Errorf("Ticket aliases Placements")
	}
	vms, _ := x.f.VMs("h2")
	if len(vms) != 2 || vms[0].ID != x.p2 || vms[1].ID != ids[0] {
		t.Errorf("VMs(h2): got %+v, want p2 and vm %d", vms, ids[0])
	}
	for i, tc := range []struct {
		host string
		live bool
		want int
	}{{"", false, 2}, {"", true, 1}, {"h3", false, 1}, {"h3", true, 0}, {"h1", false, 0}} {
		if got, _ := x.f.Clones(tc.host, tc.live); len(got) != tc.want {
			t.Errorf("#%d Clones(%q, %v): got %d, want %d", i, tc.host, tc.live, len(got), tc.want)
		}
	}
	if _, idx := x.f.Clones("h1", false); idx != 1 {
		t.Errorf("Clones(h1) index: got %d, want 1 for none", idx)
	}
	descs, _ := x.f.Descriptors()
	cps, _ := x.f.Checkpoints()
	if len(descs) != 2 || len(cps) != 1 {
		t.Errorf("got %d descriptors %d checkpoints, want 2 1", len(descs), len(cps))
	}
	for _, miss := range []bool{
		func() bool { _, ok := x.f.Host("h9"); return ok }(),
		func() bool { _, ok := x.f.VM(99); return ok }(),
		func() bool { _, _, ok := x.f.Ticket(99); return ok }(),
		func() bool { _, ok := x.f.Descriptor(99); return ok }(),
		func() bool { _, ok := x.f.Checkpoint(99); return ok }(),
	} {
		if miss {
			t.Errorf("lookup of a missing object found something")
		}
	}
	c := x.f.Counts()
	want := Counts{
		Hosts:   map[HostStatus]int{HostAlive: 3},
		VMs:     map[VMState]int{VMRunning: 3, VMEnded: 1},
		Tickets: map[TicketState]int{TicketActive: 1, TicketReserved: 1},
		Clones:  map[CloneState]int{CloneRunning: 1, CloneExited: 1},
		// h1: 4-1, h2: 4-1, h3: 1-0 (its clone exited)
		Descriptors: 2, Checkpoints: 1, FreeSlots: 7, NextVMID: 5, AppliedIndex: x.idx,
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("Counts: got %+v, want %+v", c, want)
	}
}

func TestCode(t *testing.T) {
	for i, err := range []error{ErrInvalid, ErrBadCommand, ErrUnknownCommand, ErrNotFound, ErrNoCapacity,
		ErrNotParent, ErrNotClone, ErrBadState, ErrDisposed, ErrClonesRunning} {
		wrapped := fmt.Errorf("detail: %w", err)
		code := Code(wrapped)
		if code == "internal" {
			t.Errorf("#%d %v: got code internal", i, err)
		}
		if got := ErrorForCode(code); got != err {
			t.Errorf("#%d: ErrorForCode(%q): got %v, want %v", i, code, got, err)
		}
	}
	if got := Code(errors.New("other")); got != "internal" {
		t.Errorf("Code(other): got %q, want internal", got)
	}
	if got := ErrorForCode("nope"); got != nil {
		t.Errorf("ErrorForCode(nope): got %v, want nil", got)
	}
}

// TestEncodeDecode round-trips one command of every type.
func TestEncodeDecode(t *testing.T) {
	types := map[CommandType]bool{}
	for i, c := range allCommands() {
		b, err := Encode(c)
		if err != nil {
			t.Fatalf("#%d %T: encode: %v", i, c, err)
		}
		if CommandType(b[0]) != c.Type() {
			t.Errorf("#%d %T: got type byte %#x, want %#x", i, c, b[0], c.Type())
		}
		got, err := Decode(b)
		if err != nil {
			t.Fatalf("#%d %T: decode: %v", i, c, err)
		}
		if !reflect.DeepEqual(got, c) {
			t.Errorf("#%d: got %#v, want %#v", i, got, c)
		}
		types[c.Type()] = true
	}
	for ct := CmdHostRegister; ct <= CmdVMStarted; ct++ {
		if !types[ct] {
			t.Errorf("allCommands lacks type %#x", ct)
		}
	}
	for i, b := range [][]byte{nil, {}, {0x00}, {0x0c}, {byte(IgnorableFlag)}, {byte(CmdVMEnd), 0xc1}, {byte(CmdVMEnd), 0x81}} {
		if _, err := Decode(b); !errors.Is(err, ErrBadCommand) && !errors.Is(err, ErrUnknownCommand) {
			t.Errorf("#%d Decode(%x): got %v, want ErrBadCommand or ErrUnknownCommand", i, b, err)
		}
	}
}

// TestAllCommands applies allCommands to newWorld: it is the seed of the
// fuzzers, so every command in it must succeed.
func TestAllCommands(t *testing.T) {
	x := newWorld(t)
	for i, c := range allCommands() {
		x.label = fmt.Sprintf("#%d %T", i, c)
		x.must(c)
		x.eq("recomputed", recomputedUsage(x.f), usage(x.f))
	}
}

// TestFSM_CloneMayClone: a running clone requests and starts a ticket of its
// own; when it exits, that ticket is killed and its slots come back.
func TestFSM_CloneMayClone(t *testing.T) {
	x := newWorld(t)
	outer := x.ticket(x.p1, "h2")
	ids := x.clone(outer)
	x.must(&CloneUpdate{VMID: ids[0], State: CloneRunning})
	freeSlots := func() int { h := x.host("h1"); return h.FreeSlots() }
	free := freeSlots()
	inner := x.must(&TicketCreate{ParentVM: ids[0], Requested: 2, Placements: []string{"h1", "h1"}})
	x.clone(inner)
	if got := freeSlots(); got != free-2 {
		t.Fatalf("free slots on h1 after the clone cloned: %d, want %d", got, free-2)
	}
	x.exit(ids[0])
	v := x.view(inner)
	if v.State != TicketKilled {
		t.Fatalf("inner ticket is %s after its parent clone exited, want killed", v.State)
	}
	for _, cl := range v.Clones {
		if cl.State != CloneKilled {
			t.Fatalf("inner clone %d is %s, want killed", cl.K, cl.State)
		}
	}
	if got := freeSlots(); got != free {
		t.Fatalf("free slots on h1 after the exit: %d, want %d", got, free)
	}
	if vm := x.vm(ids[0]); vm.State != VMEnded || vm.Reason != "" {
		t.Fatalf("exited clone vm: %s %q", vm.State, vm.Reason)
	}
}

// TestFSM_VMLaunch: a VM created with Launch is pending until its host starts
// it; it cannot request tickets before; VMStarted repeats harmlessly and is
// refused for clones, unknown and ended VMs.
func TestFSM_VMLaunch(t *testing.T) {
	x := newWorld(t)
	id := x.must(&VMCreate{Name: "web", Host: "h1", MemMB: 256, VCPUs: 1, Launch: true, Cmd: "sfguest ticket 4"})
	if vm := x.vm(id); vm.State != VMPending || vm.Cmd != "sfguest ticket 4" {
		t.Fatalf("launched vm: %+v", vm)
	}
	if r := x.apply(&TicketCreate{ParentVM: id, Requested: 1, Placements: []string{"h2"}}); !errors.Is(r.Err, ErrBadState) {
		t.Fatalf("ticket of a pending vm: %v", r.Err)
	}
	x.must(&VMStarted{VMID: id})
	x.must(&VMStarted{VMID: id})
	if vm := x.vm(id); vm.State != VMRunning {
		t.Fatalf("started vm is %s", vm.State)
	}
	clones := x.clone(x.ticket(id, "h2"))
	for i, tt := range []struct {
		c    Command
		want error
	}{
		{&VMStarted{VMID: clones[0]}, ErrBadState},
		{&VMStarted{VMID: 999}, ErrNotFound},
		{&VMStarted{}, ErrInvalid},
		{&VMCreate{Name: "x", Host: "h1", Kernel: "/k"}, ErrInvalid},
		{&VMCreate{Name: "x", Host: "h1", Launch: true, Kernel: "relative/k"}, ErrInvalid},
		{&VMCreate{Name: "x", Host: "h1", Launch: true, Cmd: strings.Repeat("c", MaxCmd+1)}, ErrInvalid},
	} {
		if r := x.apply(tt.c); !errors.Is(r.Err, tt.want) {
			t.Errorf("#%d %T: got %v, want %v", i, tt.c, r.Err, tt.want)
		}
	}
	x.must(&VMEnd{VMID: id, Reason: "stopped"})
	if r := x.apply(&VMStarted{VMID: id}); !errors.Is(r.Err, ErrBadState) {
		t.Fatalf("start of an ended vm: %v", r.Err)
	}
}
