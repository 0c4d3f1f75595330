package fsm

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/hashicorp/go-msgpack/v2/codec"
)

// CommandType is the first byte of every log entry.
type CommandType uint8

// IgnorableFlag marks a command type that replicas which do not know it may
// skip instead of panicking. It lets a newer leader add optional commands
// without breaking older followers during a rolling upgrade.
const IgnorableFlag CommandType = 0x80

// Command types. Values are part of the log format: never renumber.
const (
	CmdHostRegister     CommandType = 0x01
	CmdHostFail         CommandType = 0x02
	CmdVMCreate         CommandType = 0x03
	CmdVMEnd            CommandType = 0x04
	CmdTicketCreate     CommandType = 0x05
	CmdDescriptorCreate CommandType = 0x06
	CmdCloneUpdate      CommandType = 0x07
	CmdTicketJoin       CommandType = 0x08
	CmdTicketKill       CommandType = 0x09
	CmdCheckpointCreate CommandType = 0x0a
	CmdCreateClones     CommandType = 0x0b
	CmdVMStarted        CommandType = 0x0c
)

// Limits on what a command may carry.
const (
	MaxClonesPerTicket = 1024
	MaxReason          = 512
	MaxName            = 128
	MaxCmd             = 2048 // a workload command rides on the kernel command line
	maxSlots           = 1 << 20
)

// Command is implemented by every command body.
type Command interface {
	Type() CommandType
	// Validate checks the command on its own, without state. Apply calls it
	// too, so a command that bypassed the API cannot corrupt the state.
	Validate() error
}

// Requester is implemented by commands that are not idempotent (they create
// an object or make a one-way transition) and so may not simply be retried by
// a client that did not learn the outcome (leadership lost mid-write). A
// repeated RequestID returns the outcome of the first command, unchanged; a
// new command with a new ID is judged on its own (a second exit is refused).
type Requester interface {
	requestID() string
}

// HostRegister registers a host or updates its addresses and capacity; it
// also brings a failed or departed host back to alive.
type HostRegister struct {
	ID         string
	GossipAddr string
	APIAddr    string
	McastAddr  string
	Slots      int
	MemMB      int64
}

// HostFail marks a host failed (gossip declared it dead) or left (it departed
// gracefully). Its pending and running clones fail; its parent VMs end and
// their tickets are killed.
type HostFail struct {
	ID     string
	Left   bool
	Reason string
}

// VMCreate records a new parent VM and allocates its VM ID. With Launch the
// VM is pending until its host starts it (VMStarted); without, the host
// already runs it.
type VMCreate struct {
	RequestID string
	Name      string
	Host      string
	MemMB     int64
	VCPUs     int
	Launch    bool
	Kernel    string
	Initrd    string
	Cmd       string
}

// VMStarted records that a host launched a pending parent VM.
type VMStarted struct {
	VMID uint64
}

// VMEnd records that a VM is gone. A clone VM that ends before exiting has
// failed; a parent VM that ends has its tickets killed.
type VMEnd struct {
	VMID   uint64
	Reason string
}

// TicketCreate grants a ticket of len(Placements) clones to ParentVM. The
// leader computes Placements from the hosts' free capacity; Apply rejects the
// command if that capacity is no longer there.
type TicketCreate struct {
	RequestID  string
	ParentVM   uint64
	Requested  int
	Placements []string
}

// DescriptorCreate registers a descriptor. When Ticket is set it is the clone
// call: the ticket becomes active and its clones are created, pending, each
// with a fresh VM ID, on the hosts of the ticket's placements.
type DescriptorCreate struct {
	RequestID     string
	Ticket        uint64
	ParentVM      uint64
	Host          string
	Size          int64
	SHA256        string
	MemserverAddr string
	McastGroup    string
	PageCount     int64
	// McastKey is the ticket's multicast session key (64 hex digits), for
	// a clone call; empty: none.
	McastKey string
}

// CloneUpdate moves the clone that runs as VMID to State: running (its host
// restored it), exited (the clone called exit) or failed (its host lost it).
type CloneUpdate struct {
	RequestID string
	VMID      uint64
	State     CloneState
	Status    int
	Result    string
	Reason    string
}

// TicketJoin disposes a ticket whose clones have all reached a terminal state.
// Caller is the VM that called join; only the ticket's parent may.
type TicketJoin struct {
	RequestID string
	Ticket    uint64
	Caller    uint64
}

// TicketKill kills a ticket's remaining clones and disposes it. Caller is the
// VM that called kill, or 0 for an operator.
type TicketKill struct {
	RequestID string
	Ticket    uint64
	Caller    uint64
	Reason    string
}

// CheckpointCreate records an immutable checkpoint of ParentVM together with
// its descriptor.
type CheckpointCreate struct {
	RequestID     string
	ParentVM      uint64
	Host          string
	Size          int64
	SHA256        string
	MemserverAddr string
	McastGroup    string
	PageCount     int64
}

// CreateClones starts a reserved ticket's clones from a checkpoint.
type CreateClones struct {
	RequestID  string
	Ticket     uint64
	Checkpoint uint64
	Caller     uint64
	McastKey   string // the ticket's multicast session key, as in DescriptorCreate
}

func (*HostRegister) Type() CommandType     { return CmdHostRegister }
func (*HostFail) Type() CommandType         { return CmdHostFail }
func (*VMCreate) Type() CommandType         { return CmdVMCreate }
func (*VMEnd) Type() CommandType            { return CmdVMEnd }
func (*VMStarted) Type() CommandType        { return CmdVMStarted }
func (*TicketCreate) Type() CommandType     { return CmdTicketCreate }
func (*DescriptorCreate) Type() CommandType { return CmdDescriptorCreate }
func (*CloneUpdate) Type() CommandType      { return CmdCloneUpdate }
func (*TicketJoin) Type() CommandType       { return CmdTicketJoin }
func (*TicketKill) Type() CommandType       { return CmdTicketKill }
func (*CheckpointCreate) Type() CommandType { return CmdCheckpointCreate }
func (*CreateClones) Type() CommandType     { return CmdCreateClones }

func (c *VMCreate) requestID() string         { return c.RequestID }
func (c *TicketCreate) requestID() string     { return c.RequestID }
func (c *DescriptorCreate) requestID() string { return c.RequestID }
func (c *CheckpointCreate) requestID() string { return c.RequestID }
func (c *CloneUpdate) requestID() string      { return c.RequestID }
func (c *TicketJoin) requestID() string       { return c.RequestID }
func (c *TicketKill) requestID() string       { return c.RequestID }
func (c *CreateClones) requestID() string     { return c.RequestID }

// newCommand returns an empty body for a command type, or nil if unknown.
func newCommand(t CommandType) Command {
	switch t {
	case CmdHostRegister:
		return &HostRegister{}
	case CmdHostFail:
		return &HostFail{}
	case CmdVMCreate:
		return &VMCreate{}
	case CmdVMEnd:
		return &VMEnd{}
	case CmdTicketCreate:
		return &TicketCreate{}
	case CmdDescriptorCreate:
		return &DescriptorCreate{}
	case CmdCloneUpdate:
		return &CloneUpdate{}
	case CmdTicketJoin:
		return &TicketJoin{}
	case CmdTicketKill:
		return &TicketKill{}
	case CmdCheckpointCreate:
		return &CheckpointCreate{}
	case CmdCreateClones:
		return &CreateClones{}
	case CmdVMStarted:
		return &VMStarted{}
	}
	return nil
}

func msgpackHandle() *codec.MsgpackHandle {
	h := &codec.MsgpackHandle{}
	h.RawToString = true
	h.WriteExt = true
	// Never pre-allocate more than this from a length prefix: decoders see
	// untrusted bytes in fuzzing and in snapshots from disk.
	h.MaxInitLen = 4096
	return h
}

var mph = msgpackHandle()

// Encode serializes a command as its type byte followed by its msgpack body.
func Encode(c Command) ([]byte, error) {
	var buf bytes.Buffer
	buf.WriteByte(byte(c.Type()))
	if err := codec.NewEncoder(&buf, mph).Encode(c); err != nil {
		return nil, fmt.Errorf("encode %T: %w", c, err)
	}
	return buf.Bytes(), nil
}

// Decode parses a log entry. It returns ErrUnknownCommand (wrapped) for a type
// it does not know, and ErrBadCommand for a body that does not decode.
func Decode(b []byte) (Command, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty entry", ErrBadCommand)
	}
	t := CommandType(b[0])
	c := newCommand(t)
	if c == nil {
		return nil, fmt.Errorf("%w: type 0x%02x", ErrUnknownCommand, byte(t))
	}
	if err := codec.NewDecoderBytes(b[1:], mph).Decode(c); err != nil {
		return nil, fmt.Errorf("%w: type 0x%02x: %v", ErrBadCommand, byte(t), err)
	}
	return c, nil
}

var idPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateID checks a host or node ID: 1-64 characters of letters, digits,
// '.', '_' and '-', starting with a letter or digit.
func ValidateID(id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("%w: id %q must be 1-64 of [A-Za-z0-9._-] and start with a letter or digit", ErrInvalid, id)
	}
	return nil
}

// ValidateAddr checks a host:port address with a literal IP or name and a
// port in 1..65535. Empty is allowed where optional is true.
func ValidateAddr(what, addr string, optional bool) error {
	if addr == "" && optional {
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host == "" || len(addr) > 255 {
		return fmt.Errorf("%w: %s %q is not host:port", ErrInvalid, what, addr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%w: %s %q has no valid port", ErrInvalid, what, addr)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return fmt.Errorf("%w: %s %q is unspecified (0.0.0.0 or ::); give a reachable address", ErrInvalid, what, addr)
	}
	return nil
}

func validateText(what, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%w: %s is %d bytes, at most %d", ErrInvalid, what, len(s), max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, what)
	}
	return nil
}

func validateRequestID(id string) error {
	if len(id) > 64 {
		return fmt.Errorf("%w: request id longer than 64 bytes", ErrInvalid)
	}
	return nil
}

var sha256Pattern = regexp.MustCompile(`^[0-9a-f]{64}$`)

func validateDescriptorFields(host string, size int64, sum, memserver, group string, pages int64) error {
	if err := ValidateID(host); err != nil {
		return err
	}
	if size <= 0 || size > 1<<32 {
		return fmt.Errorf("%w: descriptor size %d out of range", ErrInvalid, size)
	}
	if !sha256Pattern.MatchString(sum) {
		return fmt.Errorf("%w: sha256 must be 64 lowercase hex digits", ErrInvalid)
	}
	if err := ValidateAddr("memserver address", memserver, false); err != nil {
		return err
	}
	if err := ValidateAddr("multicast group", group, true); err != nil {
		return err
	}
	if pages < 0 || pages > 1<<40 {
		return fmt.Errorf("%w: page count %d out of range", ErrInvalid, pages)
	}
	return nil
}

func (c *HostRegister) Validate() error {
	if err := ValidateID(c.ID); err != nil {
		return err
	}
	if err := ValidateAddr("gossip address", c.GossipAddr, true); err != nil {
		return err
	}
	if c.McastAddr != "" {
		if a, err := netip.ParseAddr(c.McastAddr); err != nil || !a.Is4() || a.IsUnspecified() || a.IsMulticast() {
			return fmt.Errorf("%w: multicast address %q is not a unicast IPv4 address", ErrInvalid, c.McastAddr)
		}
	}
	if err := ValidateAddr("api address", c.APIAddr, true); err != nil {
		return err
	}
	if c.Slots < 0 || c.Slots > maxSlots {
		return fmt.Errorf("%w: slots %d out of range 0..%d", ErrInvalid, c.Slots, maxSlots)
	}
	if c.MemMB < 0 || c.MemMB > 1<<40 {
		return fmt.Errorf("%w: mem_mb %d out of range", ErrInvalid, c.MemMB)
	}
	return nil
}

func (c *HostFail) Validate() error {
	if err := ValidateID(c.ID); err != nil {
		return err
	}
	return validateText("reason", c.Reason, MaxReason)
}

func (c *VMCreate) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if err := ValidateID(c.Host); err != nil {
		return err
	}
	if err := validateText("name", c.Name, MaxName); err != nil {
		return err
	}
	if c.MemMB < 0 || c.MemMB > 1<<30 {
		return fmt.Errorf("%w: mem_mb %d out of range", ErrInvalid, c.MemMB)
	}
	if c.VCPUs < 0 || c.VCPUs > 1024 {
		return fmt.Errorf("%w: vcpus %d out of range", ErrInvalid, c.VCPUs)
	}
	for _, f := range []struct{ what, v string }{{"kernel", c.Kernel}, {"initrd", c.Initrd}} {
		if err := validateText(f.what, f.v, 4096); err != nil {
			return err
		}
		if f.v != "" && !strings.HasPrefix(f.v, "/") {
			return fmt.Errorf("%w: %s path %q must be absolute", ErrInvalid, f.what, f.v)
		}
	}
	if err := validateText("cmd", c.Cmd, MaxCmd); err != nil {
		return err
	}
	if !c.Launch && (c.Kernel != "" || c.Initrd != "" || c.Cmd != "") {
		return fmt.Errorf("%w: kernel, initrd and cmd only go with launch", ErrInvalid)
	}
	return nil
}

func (c *VMStarted) Validate() error {
	if c.VMID == 0 {
		return fmt.Errorf("%w: vm id 0", ErrInvalid)
	}
	return nil
}

func (c *VMEnd) Validate() error {
	if c.VMID == 0 {
		return fmt.Errorf("%w: vm id 0", ErrInvalid)
	}
	return validateText("reason", c.Reason, MaxReason)
}

func (c *TicketCreate) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.ParentVM == 0 {
		return fmt.Errorf("%w: parent vm id 0", ErrInvalid)
	}
	if c.Requested < 1 || c.Requested > MaxClonesPerTicket {
		return fmt.Errorf("%w: requested %d clones, must be 1..%d", ErrInvalid, c.Requested, MaxClonesPerTicket)
	}
	if len(c.Placements) < 1 || len(c.Placements) > c.Requested {
		return fmt.Errorf("%w: %d placements for %d requested", ErrInvalid, len(c.Placements), c.Requested)
	}
	for _, h := range c.Placements {
		if err := ValidateID(h); err != nil {
			return err
		}
	}
	return nil
}

func (c *DescriptorCreate) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.ParentVM == 0 {
		return fmt.Errorf("%w: parent vm id 0", ErrInvalid)
	}
	if err := validateMcastKey(c.McastKey); err != nil {
		return err
	}
	return validateDescriptorFields(c.Host, c.Size, c.SHA256, c.MemserverAddr, c.McastGroup, c.PageCount)
}

// validateMcastKey accepts no key or 64 lowercase hex digits.
func validateMcastKey(k string) error {
	if k != "" && !sha256Pattern.MatchString(k) {
		return fmt.Errorf("%w: multicast key must be 64 lowercase hex digits", ErrInvalid)
	}
	return nil
}

func (c *CloneUpdate) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.VMID == 0 {
		return fmt.Errorf("%w: vm id 0", ErrInvalid)
	}
	switch c.State {
	case CloneRunning, CloneExited, CloneFailed:
	default:
		return fmt.Errorf("%w: clone state %q cannot be set (running, exited or failed)", ErrInvalid, c.State)
	}
	if len(c.Result) > MaxResult {
		return fmt.Errorf("%w: result is %d bytes, at most %d", ErrInvalid, len(c.Result), MaxResult)
	}
	if err := validateText("result", c.Result, MaxResult); err != nil {
		return err
	}
	return validateText("reason", c.Reason, MaxReason)
}

func (c *TicketJoin) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.Ticket == 0 || c.Caller == 0 {
		return fmt.Errorf("%w: join needs a ticket and a calling vm", ErrInvalid)
	}
	return nil
}

func (c *TicketKill) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.Ticket == 0 {
		return fmt.Errorf("%w: ticket id 0", ErrInvalid)
	}
	return validateText("reason", c.Reason, MaxReason)
}

func (c *CheckpointCreate) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.ParentVM == 0 {
		return fmt.Errorf("%w: parent vm id 0", ErrInvalid)
	}
	return validateDescriptorFields(c.Host, c.Size, c.SHA256, c.MemserverAddr, c.McastGroup, c.PageCount)
}

func (c *CreateClones) Validate() error {
	if err := validateRequestID(c.RequestID); err != nil {
		return err
	}
	if c.Ticket == 0 || c.Checkpoint == 0 || c.Caller == 0 {
		return fmt.Errorf("%w: create_clones needs a ticket, a checkpoint and a calling vm", ErrInvalid)
	}
	return validateMcastKey(c.McastKey)
}
