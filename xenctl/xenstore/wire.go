package xenstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Op is a message type (enum xsd_sockmsg_type in xs_wire.h).
type Op uint32

// Message types. Values are fixed by the wire protocol; 20 (XS_RESTRICT)
// was removed from Xen and is never valid.
const (
	OpControl            Op = 0
	OpDirectory          Op = 1
	OpRead               Op = 2
	OpGetPerms           Op = 3
	OpWatch              Op = 4
	OpUnwatch            Op = 5
	OpTransactionStart   Op = 6
	OpTransactionEnd     Op = 7
	OpIntroduce          Op = 8
	OpRelease            Op = 9
	OpGetDomainPath      Op = 10
	OpWrite              Op = 11
	OpMkdir              Op = 12
	OpRm                 Op = 13
	OpSetPerms           Op = 14
	OpWatchEvent         Op = 15
	OpError              Op = 16
	OpIsDomainIntroduced Op = 17
	OpResume             Op = 18
	OpSetTarget          Op = 19
	OpResetWatches       Op = 21
	OpDirectoryPart      Op = 22
	OpGetFeature         Op = 23 // Xen 4.20 and later
	OpSetFeature         Op = 24
	OpGetQuota           Op = 25
	OpSetQuota           Op = 26
)

var opNames = map[Op]string{
	OpControl: "CONTROL", OpDirectory: "DIRECTORY", OpRead: "READ", OpGetPerms: "GET_PERMS",
	OpWatch: "WATCH", OpUnwatch: "UNWATCH", OpTransactionStart: "TRANSACTION_START",
	OpTransactionEnd: "TRANSACTION_END", OpIntroduce: "INTRODUCE", OpRelease: "RELEASE",
	OpGetDomainPath: "GET_DOMAIN_PATH", OpWrite: "WRITE", OpMkdir: "MKDIR", OpRm: "RM",
	OpSetPerms: "SET_PERMS", OpWatchEvent: "WATCH_EVENT", OpError: "ERROR",
	OpIsDomainIntroduced: "IS_DOMAIN_INTRODUCED", OpResume: "RESUME", OpSetTarget: "SET_TARGET",
	OpResetWatches: "RESET_WATCHES", OpDirectoryPart: "DIRECTORY_PART", OpGetFeature: "GET_FEATURE",
	OpSetFeature: "SET_FEATURE", OpGetQuota: "GET_QUOTA", OpSetQuota: "SET_QUOTA",
}

// Known reports whether op is a message type of the protocol.
func (op Op) Known() bool { _, ok := opNames[op]; return ok }

func (op Op) String() string {
	if n, ok := opNames[op]; ok {
		return n
	}
	return "Op(" + strconv.FormatUint(uint64(op), 10) + ")"
}

// Wire limits (xs_wire.h).
const (
	// HeaderSize is the size of struct xsd_sockmsg.
	HeaderSize = 16
	// PayloadMax is XENSTORE_PAYLOAD_MAX: the largest payload either side
	// may send. xenstored drops a client that announces more.
	PayloadMax = 4096
	// AbsPathMax and RelPathMax are XENSTORE_ABS_PATH_MAX and
	// XENSTORE_REL_PATH_MAX.
	AbsPathMax = 3072
	RelPathMax = 2048
	// DevicePayloadMax is the largest payload Linux's /dev/xen/xenbus
	// accepts: its buffer holds PayloadMax bytes including the header.
	DevicePayloadMax = PayloadMax - HeaderSize
)

// Message is one wire message: a little-endian header {type, req_id,
// tx_id, len} and len bytes of payload.
type Message struct {
	Type    Op
	ReqID   uint32 // echoed in the reply; meaningless in watch events
	TxID    uint32 // transaction, 0 for none
	Payload []byte
}

// ErrProtocol is wrapped by every error about a malformed message.
var ErrProtocol = errors.New("xenstore: protocol error")

func protoErr(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, a...))
}

// AppendBinary appends the message's wire form to b. It refuses a payload
// over PayloadMax.
func (m *Message) AppendBinary(b []byte) ([]byte, error) {
	if len(m.Payload) > PayloadMax {
		return b, fmt.Errorf("%w: %s payload of %d bytes, limit %d", ErrTooBig, m.Type, len(m.Payload), PayloadMax)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(m.Type))
	b = binary.LittleEndian.AppendUint32(b, m.ReqID)
	b = binary.LittleEndian.AppendUint32(b, m.TxID)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Payload)))
	return append(b, m.Payload...), nil
}

// MarshalBinary returns the message's wire form.
func (m *Message) MarshalBinary() ([]byte, error) {
	return m.AppendBinary(make([]byte, 0, HeaderSize+len(m.Payload)))
}

// ReadMessage reads one message from r. The header is validated before the
// payload is read: a length over PayloadMax or an unknown type is an
// ErrProtocol error after which the stream cannot be trusted to be in step.
// A stream that ends cleanly between messages returns io.EOF; one that
// ends inside a message returns io.ErrUnexpectedEOF.
func ReadMessage(r io.Reader) (*Message, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return nil, err
	}
	m := &Message{
		Type:  Op(binary.LittleEndian.Uint32(h[0:])),
		ReqID: binary.LittleEndian.Uint32(h[4:]),
		TxID:  binary.LittleEndian.Uint32(h[8:]),
	}
	n := binary.LittleEndian.Uint32(h[12:])
	if n > PayloadMax {
		return nil, protoErr("%s message announces %d bytes, limit %d", m.Type, n, PayloadMax)
	}
	if !m.Type.Known() {
		return nil, protoErr("unknown message type %d", uint32(m.Type))
	}
	m.Payload = make([]byte, n)
	if _, err := io.ReadFull(r, m.Payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return m, nil
}

// Strings builds a payload of nul-terminated strings. It refuses a string
// that contains a nul.
func Strings(s ...string) ([]byte, error) {
	n := 0
	for _, x := range s {
		if bytes.IndexByte([]byte(x), 0) >= 0 {
			return nil, fmt.Errorf("%w: string %q contains a nul", ErrInvalid, x)
		}
		n += len(x) + 1
	}
	b := make([]byte, 0, n)
	for _, x := range s {
		b = append(append(b, x...), 0)
	}
	return b, nil
}

// SplitStrings splits a payload of nul-terminated strings. Every string
// must be terminated: trailing bytes without a nul are an error. An empty
// payload is zero strings.
func SplitStrings(p []byte) ([]string, error) {
	if len(p) == 0 {
		return nil, nil
	}
	if p[len(p)-1] != 0 {
		return nil, protoErr("string list not nul-terminated")
	}
	parts := bytes.Split(p[:len(p)-1], []byte{0})
	out := make([]string, len(parts))
	for i, s := range parts {
		out[i] = string(s)
	}
	return out, nil
}

// Event is a watch event: something at or below a watched path changed.
type Event struct {
	// Path is the node that changed (or the watched path itself, for the
	// event xenstored sends when the watch is set). It is relative when
	// the watch was set with a relative path.
	Path  string
	Token string
	// Overflow marks an event that stands for events the client had to
	// drop because the consumer fell behind: rescan the whole watch.
	Overflow bool
}

// parseEvent decodes an OpWatchEvent payload: path and token, each
// nul-terminated. Linux's /dev/xen/xenbus may append more strings; they are
// ignored.
func parseEvent(p []byte) (Event, error) {
	s, err := SplitStrings(p)
	if err != nil {
		return Event{}, err
	}
	if len(s) < 2 {
		return Event{}, protoErr("watch event with %d strings, want path and token", len(s))
	}
	if s[0] == "" {
		return Event{}, protoErr("watch event with an empty path")
	}
	return Event{Path: s[0], Token: s[1]}, nil
}

// parseOK checks the "OK" acknowledgement of writes, mkdir, rm, set_perms,
// watch, unwatch and transaction end.
func parseOK(p []byte) error {
	if string(p) != "OK\x00" {
		return protoErr("acknowledgement %q, want \"OK\\x00\"", p)
	}
	return nil
}

// parseOneString decodes a payload of exactly one non-empty nul-terminated
// string.
func parseOneString(p []byte) (string, error) {
	s, err := SplitStrings(p)
	if err != nil {
		return "", err
	}
	if len(s) != 1 || s[0] == "" {
		return "", protoErr("want one non-empty string, got %d strings", len(s))
	}
	return s[0], nil
}

// parseTxID decodes a TRANSACTION_START reply: a decimal id, nul-terminated.
func parseTxID(p []byte) (uint32, error) {
	s, err := parseOneString(p)
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(s, 10, 32)
	if err != nil || id == 0 {
		return 0, protoErr("transaction id %q", s)
	}
	return uint32(id), nil
}

// parseDirectory decodes a DIRECTORY reply: child names, each
// nul-terminated, none empty.
func parseDirectory(p []byte) ([]string, error) {
	s, err := SplitStrings(p)
	if err != nil {
		return nil, err
	}
	for _, c := range s {
		if c == "" {
			return nil, protoErr("empty child name")
		}
	}
	return s, nil
}

// directoryPart is one DIRECTORY_PART reply: the node's generation, some
// children, and whether this part is the last.
type directoryPart struct {
	generation string
	children   []byte // nul-terminated names, as sent
	last       bool
}

// parseDirectoryPart decodes a DIRECTORY_PART reply: the generation, then
// child names; the last part ends with an empty string (two nuls).
func parseDirectoryPart(p []byte) (directoryPart, error) {
	i := bytes.IndexByte(p, 0)
	if i <= 0 {
		return directoryPart{}, protoErr("directory part without generation")
	}
	part := directoryPart{generation: string(p[:i])}
	rest := p[i+1:]
	if len(rest) > 0 && rest[len(rest)-1] != 0 {
		return directoryPart{}, protoErr("directory part not nul-terminated")
	}
	switch {
	case len(rest) == 0:
		// Not terminated by the empty string: more follows.
	case len(rest) == 1 || rest[len(rest)-2] == 0:
		part.last = true
		rest = rest[:len(rest)-1]
	}
	if bytes.Contains(rest, []byte{0, 0}) || (len(rest) > 0 && rest[0] == 0) {
		return directoryPart{}, protoErr("empty child name in directory part")
	}
	part.children = rest
	return part, nil
}
