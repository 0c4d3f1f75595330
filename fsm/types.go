// Package fsm is the replicated state machine of the coordinator cluster.
//
// It holds every fact the cluster agrees on: hosts and their capacity, VMs and
// their cluster-wide IDs, tickets with their placements, clones with their
// outcomes, descriptors and checkpoints. The only way to change it is a
// command: one type byte followed by a msgpack body (see commands.go), applied
// in log order by hashicorp/raft through FSM.Apply.
//
// Apply is deterministic: the same log always yields the same state. Choices
// that need the outside world (which hosts receive a ticket's clones) are made
// by the leader before the command is proposed and only validated here. Business
// errors (a join by a non-parent, a double exit, an unknown ticket) come back in
// Result.Err and leave the state untouched; Apply panics only on a command it
// cannot decode and that is not flagged ignorable, because then replicas would
// diverge.
//
// Reads go through the query methods (Ticket, Tickets, Hosts, ...), which return
// copies that callers may keep. Every object records the raft index that created
// and last modified it, which the coordinator uses for blocking queries.
package fsm

// HostStatus is the coordinator's view of a physical host.
type HostStatus string

// Host statuses.
const (
	HostAlive  HostStatus = "alive"
	HostFailed HostStatus = "failed"
	HostLeft   HostStatus = "left"
)

// Host is a physical machine that runs VMs through sfhostd.
type Host struct {
	ID         string `json:"id"`
	GossipAddr string `json:"gossip_addr"`
	APIAddr    string `json:"api_addr"`
	// McastAddr is the host's IPv4 address on the interface it multicasts
	// on; empty if it does not.
	McastAddr string     `json:"mcast_addr,omitempty"`
	Slots     int        `json:"slots"`  // clone slots offered
	MemMB     int64      `json:"mem_mb"` // memory offered to VMs
	Status    HostStatus `json:"status"`
	// UsedSlots is derived: placements of undisposed tickets whose clone has
	// not reached a terminal state. It is recomputed on restore, never stored.
	UsedSlots   int    `json:"used_slots"`
	CreateIndex uint64 `json:"create_index"`
	ModifyIndex uint64 `json:"modify_index"`
}

// FreeSlots is the number of clones the host can still accept.
func (h *Host) FreeSlots() int {
	if h.Status != HostAlive || h.Slots <= h.UsedSlots {
		return 0
	}
	return h.Slots - h.UsedSlots
}

// VMRole tells a parent VM (started by an operator) from a clone.
type VMRole string

// VM roles.
const (
	RoleParent VMRole = "parent"
	RoleClone  VMRole = "clone"
)

// VMState is the life cycle of a VM record.
type VMState string

// VM states.
const (
	VMPending VMState = "pending" // assigned to its host, not yet running
	VMRunning VMState = "running"
	VMEnded   VMState = "ended"
)

// VM is any virtual machine the cluster knows of. IDs are cluster-wide,
// allocated by Apply from a counter that never goes back, so they are never
// reused, across leader changes, restarts and snapshot restores.
type VM struct {
	ID     uint64  `json:"id"`
	Name   string  `json:"name,omitempty"`
	Host   string  `json:"host"`
	Role   VMRole  `json:"role"`
	State  VMState `json:"state"`
	MemMB  int64   `json:"mem_mb"`
	VCPUs  int     `json:"vcpus"`
	Reason string  `json:"reason,omitempty"` // why it ended, when it did
	// Spec, for a parent VM that its host launches: kernel and initramfs
	// paths on the host (empty: the host's own guest image) and the workload
	// shell command.
	Kernel string `json:"kernel,omitempty"`
	Initrd string `json:"initrd,omitempty"`
	Cmd    string `json:"cmd,omitempty"`
	// For clones: the ticket, the clone ID k within it and the parent VM.
	Ticket      uint64 `json:"ticket,omitempty"`
	CloneID     int    `json:"clone_id,omitempty"`
	ParentVM    uint64 `json:"parent_vm,omitempty"`
	CreateIndex uint64 `json:"create_index"`
	ModifyIndex uint64 `json:"modify_index"`
}

// TicketState is the life cycle of a ticket.
type TicketState string

// Ticket states. Joined and killed tickets are disposed: they hold no
// capacity and accept no further calls.
const (
	TicketReserved TicketState = "reserved" // granted, clones not started
	TicketActive   TicketState = "active"   // clones started from a descriptor
	TicketJoined   TicketState = "joined"
	TicketKilled   TicketState = "killed"
)

// Disposed reports whether the ticket has been joined or killed.
func (s TicketState) Disposed() bool { return s == TicketJoined || s == TicketKilled }

// Ticket is a reservation of clones for a parent VM. Placements[k-1] is the
// host that runs clone k.
type Ticket struct {
	ID         uint64      `json:"id"`
	ParentVM   uint64      `json:"parent_vm"`
	Requested  int         `json:"requested"`
	Granted    int         `json:"granted"`
	Placements []string    `json:"placements"`
	State      TicketState `json:"state"`
	Descriptor uint64      `json:"descriptor,omitempty"`
	// McastKey is the session key (64 hex digits) of the multicast session
	// that delivers the descriptor and memory to the clones' hosts, chosen
	// by the coordinator when the ticket starts its clones.
	McastKey    string `json:"mcast_key,omitempty"`
	Reason      string `json:"reason,omitempty"` // why it was killed
	CreateIndex uint64 `json:"create_index"`
	ModifyIndex uint64 `json:"modify_index"`
}

// CloneState is the life cycle of one clone.
type CloneState string

// Clone states. Exited, failed and killed are terminal.
const (
	ClonePending CloneState = "pending"
	CloneRunning CloneState = "running"
	CloneExited  CloneState = "exited"
	CloneFailed  CloneState = "failed"
	CloneKilled  CloneState = "killed"
)

// Terminal reports whether no further transition is possible.
func (s CloneState) Terminal() bool {
	return s == CloneExited || s == CloneFailed || s == CloneKilled
}

// MaxResult is the largest result a clone may record with exit.
const MaxResult = 4096

// Clone is clone k of a ticket.
type Clone struct {
	Ticket      uint64     `json:"ticket"`
	K           int        `json:"k"`
	VMID        uint64     `json:"vm_id"`
	Host        string     `json:"host"`
	State       CloneState `json:"state"`
	Status      int        `json:"status"`
	Result      string     `json:"result,omitempty"`
	Reason      string     `json:"reason,omitempty"`
	CreateIndex uint64     `json:"create_index"`
	ModifyIndex uint64     `json:"modify_index"`
}

// Descriptor is the metadata of a VM descriptor: the captured device state and
// memory map from which clones are restored. The descriptor bytes themselves
// travel between hosts; the cluster records what they must hash to and where
// the frozen memory is served.
type Descriptor struct {
	ID            uint64 `json:"id"`
	Ticket        uint64 `json:"ticket,omitempty"`
	Checkpoint    uint64 `json:"checkpoint,omitempty"`
	ParentVM      uint64 `json:"parent_vm"`
	Host          string `json:"host"` // where the descriptor and memory live
	Size          int64  `json:"size"`
	SHA256        string `json:"sha256"`
	MemserverAddr string `json:"memserver_addr"`
	McastGroup    string `json:"mcast_group,omitempty"`
	PageCount     int64  `json:"page_count"`
	CreateIndex   uint64 `json:"create_index"`
}

// Checkpoint is an immutable capture of a parent VM from which clones can be
// created later with create_clones.
type Checkpoint struct {
	ID          uint64 `json:"id"`
	ParentVM    uint64 `json:"parent_vm"`
	Descriptor  uint64 `json:"descriptor"`
	CreateIndex uint64 `json:"create_index"`
}

// TicketView is a ticket together with its clones, ordered by k.
type TicketView struct {
	Ticket
	Clones []Clone `json:"clones"`
}
