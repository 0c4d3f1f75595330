// Package guestchan is the protocol between a guest VM and its host: how a
// program inside the VM calls the SnowFlock API (ticket, clone, exit, join,
// ...) through sfhostd.
//
// The transport is a byte stream: on QEMU a second 16550 serial port (the
// guest's /dev/ttyS1, a unix socket on the host); on Xen, xenstore (later).
// Messages are versioned, line-delimited JSON, one message a line, at most
// MaxMessage bytes. Each request carries an ID chosen by the guest; the
// answer carries the same ID, so calls may overlap (a join can block while
// another call goes on). The host treats every byte from the guest as
// untrusted: Decoder enforces the size limit and the schema, and a guest
// that sends garbage gets error answers (or, past a limit, a closed channel)
// without affecting anything else.
package guestchan

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
)

// Version is the protocol version spoken by this package.
const Version = 1

// MaxMessage is the largest message, newline included, either side accepts.
// Results are at most 4 KiB, so this leaves room for ticket listings.
const MaxMessage = 64 << 10

// Calls a guest may make.
const (
	CallHello        = "hello"         // who am I: VM ID, role, clone ID
	CallReady        = "ready"         // the guest's init is up (boot time)
	CallTicket       = "ticket"        // request_ticket(n)
	CallTickets      = "tickets"       // list my tickets
	CallTicketInfo   = "ticket_info"   // one ticket with its clones
	CallClone        = "clone"         // clone(ticket): 0 in the parent, k in clone k
	CallExit         = "exit"          // exit(status, result), clones only
	CallJoin         = "join"          // join(ticket)
	CallKill         = "kill"          // kill(ticket)
	CallCheckpoint   = "checkpoint"    // checkpoint()
	CallCreateClones = "create_clones" // create_clones(checkpoint, ticket)
)

var knownCalls = map[string]bool{CallHello: true, CallReady: true, CallTicket: true, CallTickets: true,
	CallTicketInfo: true, CallClone: true, CallExit: true, CallJoin: true, CallKill: true,
	CallCheckpoint: true, CallCreateClones: true}

// Request is a call from the guest.
type Request struct {
	V    int             `json:"v"`
	ID   uint64          `json:"id"`
	Call string          `json:"call"`
	Args json.RawMessage `json:"args,omitempty"`
}

// Error codes in answers, beside the coordinator's (fsm.Code) ones.
const (
	CodeBadRequest   = "bad_request"
	CodeTooLarge     = "too_large"
	CodeUnknownCall  = "unknown_call"
	CodeVersion      = "version"
	CodeUnsupported  = "unsupported"  // a call this host cannot serve yet
	CodeUnavailable  = "unavailable"  // the coordinator could not be reached
	CodeRateLimited  = "rate_limited" // the guest calls too fast
	CodeInternalHost = "internal"
	// CodeInterrupted answers, in a clone, a call that was in flight in the
	// parent when it was captured: its answer went to the parent.
	CodeInterrupted = "interrupted"
)

// Error is an error answer.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message + " (" + e.Code + ")" }

// Response answers the request with the same ID. ID 0 answers a message
// that could not be parsed far enough to know its ID.
type Response struct {
	V      int             `json:"v"`
	ID     uint64          `json:"id"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`
}

// Arguments and results of the calls.

// TicketArgs is the argument of CallTicket.
type TicketArgs struct {
	N int `json:"n"`
}

// TicketRef names a ticket (CallTicketInfo, CallClone, CallJoin, CallKill).
type TicketRef struct {
	Ticket uint64 `json:"ticket"`
}

// ExitArgs is the argument of CallExit.
type ExitArgs struct {
	Status int    `json:"status"`
	Result string `json:"result,omitempty"`
}

// CreateClonesArgs is the argument of CallCreateClones.
type CreateClonesArgs struct {
	Checkpoint uint64 `json:"checkpoint"`
	Ticket     uint64 `json:"ticket"`
}

// Identity answers CallHello: who this VM is.
type Identity struct {
	VMID     uint64 `json:"vm_id"`
	Role     string `json:"role"` // parent or clone
	Host     string `json:"host"`
	Ticket   uint64 `json:"ticket,omitempty"`    // for clones
	CloneID  int    `json:"clone_id,omitempty"`  // k, for clones
	ParentVM uint64 `json:"parent_vm,omitempty"` // for clones
}

// CloneResult answers CallClone: 0 in the parent, k in clone k.
type CloneResult struct {
	CloneID int    `json:"clone_id"`
	Ticket  uint64 `json:"ticket"`
}

// CheckpointResult answers CallCheckpoint: in the VM that took it, the
// checkpoint's ID and clone ID 0; in a clone created from it with
// create_clones, the clone's k and ticket (the call returns once per clone,
// like clone).
type CheckpointResult struct {
	Checkpoint uint64 `json:"id"`
	CloneID    int    `json:"clone_id"`
	Ticket     uint64 `json:"ticket,omitempty"`
}

// ErrTooLarge is returned by Decoder for a message over MaxMessage.
var ErrTooLarge = errors.New("guestchan: message too large")

// ErrBadMessage is returned for a message that is not valid protocol.
var ErrBadMessage = errors.New("guestchan: bad message")

// Decoder reads messages from a stream, one a line.
type Decoder struct {
	r *bufio.Reader
}

// NewDecoder returns a decoder reading from r.
func NewDecoder(r io.Reader) *Decoder {
	return &Decoder{r: bufio.NewReaderSize(r, 4096)}
}

// readLine returns the next line without its newline. A line longer than
// MaxMessage is consumed up to its end and reported as ErrTooLarge, so the
// stream stays in step.
func (d *Decoder) readLine() ([]byte, error) {
	var line []byte
	tooLarge := false
	for {
		chunk, err := d.r.ReadSlice('\n')
		if !tooLarge {
			if len(line)+len(chunk) > MaxMessage {
				tooLarge, line = true, nil
			} else {
				line = append(line, chunk...)
			}
		}
		switch {
		case err == nil:
			if tooLarge {
				return nil, ErrTooLarge
			}
			return bytes.TrimRight(line, "\r\n"), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0 && !tooLarge:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// ReadRequest reads and validates one request. Errors other than I/O ones
// are ErrTooLarge or wrap ErrBadMessage; for those the stream stays usable
// and the partially parsed ID (or 0) is returned for the error answer.
func (d *Decoder) ReadRequest() (*Request, error) {
	line, err := d.readLine()
	if err != nil {
		return nil, err
	}
	return ParseRequest(line)
}

var callPattern = regexp.MustCompile(`^[a-z_]{1,32}$`)

// ParseRequest validates one request line.
func ParseRequest(line []byte) (*Request, error) {
	var req Request
	if err := strictUnmarshal(line, &req); err != nil {
		// Salvage the ID if there is one, so the answer can name the call.
		var idOnly struct {
			ID uint64 `json:"id"`
		}
		_ = json.Unmarshal(line, &idOnly)
		return &Request{ID: idOnly.ID}, fmt.Errorf("%w: %v", ErrBadMessage, err)
	}
	if req.V != Version {
		return &Request{ID: req.ID}, fmt.Errorf("%w: version %d, this host speaks %d", ErrBadMessage, req.V, Version)
	}
	if req.ID == 0 {
		return &req, fmt.Errorf("%w: request id 0", ErrBadMessage)
	}
	if !callPattern.MatchString(req.Call) {
		return &req, fmt.Errorf("%w: call name %q", ErrBadMessage, req.Call)
	}
	return &req, nil
}

// Known reports whether the call is part of the protocol.
func Known(call string) bool { return knownCalls[call] }

// DecodeArgs parses a request's arguments into v, strictly.
func (r *Request) DecodeArgs(v interface{}) error {
	args := r.Args
	if len(args) == 0 {
		args = []byte("{}")
	}
	if err := strictUnmarshal(args, v); err != nil {
		return fmt.Errorf("%w: %s arguments: %v", ErrBadMessage, r.Call, err)
	}
	return nil
}

// ReadResponse reads one answer (used by the guest side).
func (d *Decoder) ReadResponse() (*Response, error) {
	line, err := d.readLine()
	if err != nil {
		return nil, err
	}
	var resp Response
	if err := strictUnmarshal(line, &resp); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadMessage, err)
	}
	if resp.V != Version {
		return nil, fmt.Errorf("%w: answer version %d", ErrBadMessage, resp.V)
	}
	return &resp, nil
}

func strictUnmarshal(b []byte, v interface{}) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data")
	}
	return nil
}

// Encode writes one message as a line. It refuses messages over MaxMessage.
func Encode(w io.Writer, msg interface{}) error {
	b, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	if len(b)+1 > MaxMessage {
		return ErrTooLarge
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// NewRequest builds a request with marshalled arguments.
func NewRequest(id uint64, call string, args interface{}) (*Request, error) {
	req := &Request{V: Version, ID: id, Call: call}
	if args != nil {
		b, err := json.Marshal(args)
		if err != nil {
			return nil, err
		}
		req.Args = b
	}
	return req, nil
}

// Answer builds a successful response.
func Answer(id uint64, result interface{}) (*Response, error) {
	b, err := json.Marshal(result)
	if err != nil {
		return nil, err
	}
	return &Response{V: Version, ID: id, Result: b}, nil
}

// Fail builds an error response.
func Fail(id uint64, code, format string, a ...interface{}) *Response {
	return &Response{V: Version, ID: id, Error: &Error{Code: code, Message: fmt.Sprintf(format, a...)}}
}

// IDOrZero is the request's ID, or 0 for a nil request (a message that could
// not be read at all).
func (r *Request) IDOrZero() uint64 {
	if r == nil {
		return 0
	}
	return r.ID
}
