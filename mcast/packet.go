package mcast

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The wire format. Every datagram is a clear header, authenticated as
// AES-GCM additional data, then a sealed body and its 16-byte tag:
//
//	magic   2  "SM"
//	version 1
//	type    1  typeData, typePoll, typeBye, typeParity (sender to group), typeStatus (member to sender)
//	session 8  the session ID
//	origin  4  0 for the sender, a member's tag for a member
//	salt    4  random per sending process: the first 4 bytes of the GCM nonce
//	seq     8  per (origin, salt) packet counter: the last 8 bytes of the nonce
//
// Integers are big-endian. The body layouts are below, next to their types.

const (
	magic0, magic1 = 'S', 'M'
	version        = 2 // 2: FEC (block size in data, parity packets, block NAKs)
	headerLen      = 28
	tagLen         = 16

	typeData   = 1
	typePoll   = 2
	typeBye    = 3
	typeParity = 4
	typeStatus = 16

	ipUDPOverhead = 28 // IPv4 header without options, UDP header
	dataBodyLen   = 8 + 8 + 2 + 4 + 1 + 1
	parityBodyLen = 8 + 8 + 2 + 1 + 4 + 1
	pollFixedLen  = 8 + 8 + 2 + 4 + 2
	statusFixLen  = 8 + 4 + 4 + 1 + 2 // and the block list's count, after the ranges
	rangeLen      = 8
	blockNakLen   = 6

	// maxBlockSize bounds the FEC block size K, so that a block has at
	// least 128 parity symbols.
	maxBlockSize = 128

	flagRepair   = 1 // data: a retransmission
	flagComplete = 1 // status: the member holds the whole object
)

// errMalformed is wrapped by every decoding error.
var errMalformed = errors.New("mcast: malformed packet")

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errMalformed, fmt.Sprintf(format, args...))
}

// header is a packet's clear header.
type header struct {
	typ     byte
	session uint64
	origin  uint32
	salt    uint32
	seq     uint64
}

func appendHeader(b []byte, h header) []byte {
	b = append(b, magic0, magic1, version, h.typ)
	b = binary.BigEndian.AppendUint64(b, h.session)
	b = binary.BigEndian.AppendUint32(b, h.origin)
	b = binary.BigEndian.AppendUint32(b, h.salt)
	return binary.BigEndian.AppendUint64(b, h.seq)
}

// decodeHeader decodes the header of a whole datagram and checks that a
// tag could follow it.
func decodeHeader(b []byte) (header, error) {
	if len(b) < headerLen+tagLen {
		return header{}, malformed("%d bytes, shorter than a header and a tag", len(b))
	}
	if b[0] != magic0 || b[1] != magic1 {
		return header{}, malformed("bad magic %#x%02x", b[0], b[1])
	}
	if b[2] != version {
		return header{}, malformed("version %d, want %d", b[2], version)
	}
	h := header{
		typ:     b[3],
		session: binary.BigEndian.Uint64(b[4:]),
		origin:  binary.BigEndian.Uint32(b[12:]),
		salt:    binary.BigEndian.Uint32(b[16:]),
		seq:     binary.BigEndian.Uint64(b[20:]),
	}
	switch h.typ {
	case typeData, typePoll, typeBye, typeParity:
		if h.origin != 0 {
			return header{}, malformed("type %d from origin %#x", h.typ, h.origin)
		}
	case typeStatus:
		if h.origin == 0 {
			return header{}, malformed("status from origin 0")
		}
	default:
		return header{}, malformed("unknown type %d", h.typ)
	}
	return h, nil
}

// dataBody is one fragment of an object:
//
//	object 8, length 8 (the object's), fragSize 2, index 4, flags 1, blockSize 1, payload
//
// blockSize is the FEC block size K of the object (0: no parity; the
// members NAK fragments).
type dataBody struct {
	object    uint64
	length    uint64
	fragSize  uint16
	index     uint32
	flags     byte
	blockSize byte
	payload   []byte
}

func appendData(b []byte, d dataBody) []byte {
	b = binary.BigEndian.AppendUint64(b, d.object)
	b = binary.BigEndian.AppendUint64(b, d.length)
	b = binary.BigEndian.AppendUint16(b, d.fragSize)
	b = binary.BigEndian.AppendUint32(b, d.index)
	b = append(b, d.flags, d.blockSize)
	return append(b, d.payload...)
}

// decodeData decodes a data body and checks that the payload is exactly
// the fragment the index names. The payload aliases b.
func decodeData(b []byte) (dataBody, error) {
	if len(b) < dataBodyLen {
		return dataBody{}, malformed("data body of %d bytes", len(b))
	}
	d := dataBody{
		object:    binary.BigEndian.Uint64(b),
		length:    binary.BigEndian.Uint64(b[8:]),
		fragSize:  binary.BigEndian.Uint16(b[16:]),
		index:     binary.BigEndian.Uint32(b[18:]),
		flags:     b[22],
		blockSize: b[23],
		payload:   b[dataBodyLen:],
	}
	if err := checkGeometry(d.length, d.fragSize); err != nil {
		return dataBody{}, err
	}
	if d.blockSize > maxBlockSize {
		return dataBody{}, malformed("block size %d", d.blockSize)
	}
	n := fragments(d.length, d.fragSize)
	if uint64(d.index) >= n {
		return dataBody{}, malformed("fragment %d of %d", d.index, n)
	}
	if want := fragLen(d.length, d.fragSize, d.index); len(d.payload) != want {
		return dataBody{}, malformed("fragment %d has %d bytes, want %d", d.index, len(d.payload), want)
	}
	return d, nil
}

// parityBody is parity symbol index of FEC block block (fragments
// block*K up to K of them) of an object:
//
//	object 8, length 8, fragSize 2, blockSize 1, block 4, index 1, payload
//
// The payload is as long as the block's first fragment.
type parityBody struct {
	object    uint64
	length    uint64
	fragSize  uint16
	blockSize byte
	block     uint32
	index     byte
	payload   []byte
}

func appendParity(b []byte, p parityBody) []byte {
	b = binary.BigEndian.AppendUint64(b, p.object)
	b = binary.BigEndian.AppendUint64(b, p.length)
	b = binary.BigEndian.AppendUint16(b, p.fragSize)
	b = append(b, p.blockSize)
	b = binary.BigEndian.AppendUint32(b, p.block)
	b = append(b, p.index)
	return append(b, p.payload...)
}

// decodeParity decodes a parity body and checks the block, the index and
// the payload's length. The payload aliases b.
func decodeParity(b []byte) (parityBody, error) {
	if len(b) < parityBodyLen {
		return parityBody{}, malformed("parity body of %d bytes", len(b))
	}
	p := parityBody{
		object:    binary.BigEndian.Uint64(b),
		length:    binary.BigEndian.Uint64(b[8:]),
		fragSize:  binary.BigEndian.Uint16(b[16:]),
		blockSize: b[18],
		block:     binary.BigEndian.Uint32(b[19:]),
		index:     b[23],
		payload:   b[parityBodyLen:],
	}
	if err := checkGeometry(p.length, p.fragSize); err != nil {
		return parityBody{}, err
	}
	if p.blockSize == 0 || p.blockSize > maxBlockSize {
		return parityBody{}, malformed("block size %d", p.blockSize)
	}
	n := fragments(p.length, p.fragSize)
	first := uint64(p.block) * uint64(p.blockSize)
	if first >= n {
		return parityBody{}, malformed("block %d of %d fragments in blocks of %d", p.block, n, p.blockSize)
	}
	if int(p.index) >= maxParity(int(p.blockSize)) {
		return parityBody{}, malformed("parity %d of blocks of %d", p.index, p.blockSize)
	}
	if want := fragLen(p.length, p.fragSize, uint32(first)); len(p.payload) != want {
		return parityBody{}, malformed("parity of block %d has %d bytes, want %d", p.block, len(p.payload), want)
	}
	return p, nil
}

// checkGeometry checks an object's length and fragment size.
func checkGeometry(length uint64, fragSize uint16) error {
	if fragSize == 0 {
		return malformed("fragment size 0")
	}
	if fragments(length, fragSize) > 1<<32-1 {
		return malformed("object of %d bytes has too many fragments of %d", length, fragSize)
	}
	return nil
}

// fragments is the number of fragments of an object: at least one, so that
// an empty object is a packet too.
func fragments(length uint64, fragSize uint16) uint64 {
	return max(1, (length+uint64(fragSize)-1)/uint64(fragSize))
}

// fragLen is the payload length of fragment i.
func fragLen(length uint64, fragSize uint16, i uint32) int {
	off := uint64(i) * uint64(fragSize)
	if off >= length {
		return 0
	}
	return int(min(uint64(fragSize), length-off))
}

// pollBody asks every member for its status, announces the object in
// progress and carries the session's evicted members (by tag):
//
//	object 8, length 8, fragSize 2, sent 4 (fragments sent at least once), n 2, n x tag 4
//
// A Bye has the same body: the last object, and the final evicted list.
type pollBody struct {
	object   uint64
	length   uint64
	fragSize uint16
	sent     uint32
	evicted  []uint32
}

func appendPoll(b []byte, p pollBody) []byte {
	b = binary.BigEndian.AppendUint64(b, p.object)
	b = binary.BigEndian.AppendUint64(b, p.length)
	b = binary.BigEndian.AppendUint16(b, p.fragSize)
	b = binary.BigEndian.AppendUint32(b, p.sent)
	b = binary.BigEndian.AppendUint16(b, uint16(len(p.evicted)))
	for _, t := range p.evicted {
		b = binary.BigEndian.AppendUint32(b, t)
	}
	return b
}

func decodePoll(b []byte) (pollBody, error) {
	if len(b) < pollFixedLen {
		return pollBody{}, malformed("poll body of %d bytes", len(b))
	}
	p := pollBody{
		object:   binary.BigEndian.Uint64(b),
		length:   binary.BigEndian.Uint64(b[8:]),
		fragSize: binary.BigEndian.Uint16(b[16:]),
		sent:     binary.BigEndian.Uint32(b[18:]),
	}
	n := int(binary.BigEndian.Uint16(b[22:]))
	if len(b) != pollFixedLen+4*n {
		return pollBody{}, malformed("poll body of %d bytes with %d evicted", len(b), n)
	}
	if err := checkGeometry(p.length, p.fragSize); err != nil {
		return pollBody{}, err
	}
	if uint64(p.sent) > fragments(p.length, p.fragSize) {
		return pollBody{}, malformed("%d fragments sent of %d", p.sent, fragments(p.length, p.fragSize))
	}
	for i := range n {
		p.evicted = append(p.evicted, binary.BigEndian.Uint32(b[pollFixedLen+4*i:]))
	}
	return p, nil
}

// span is a run of missing fragments.
type span struct{ start, count uint32 }

// blockNak asks for parity symbols of FEC block block: need more than the
// member holds, and it saw the symbols below seen pass (the highest index
// it holds, plus one).
type blockNak struct {
	block      uint32
	need, seen byte
}

// statusBody is a member's feedback: a positive ACK of everything below
// contiguous and, for fragments it saw pass, selective NAKs, by fragment
// (an object without FEC) or by FEC block:
//
//	object 8, contiguous 4, received 4, flags 1, n 2, n x (start 4, count 4), nb 2, nb x (block 4, need 1, seen 1)
type statusBody struct {
	object     uint64
	contiguous uint32 // every fragment below it is held
	received   uint32 // fragments held
	flags      byte
	missing    []span
	blocks     []blockNak
}

func appendStatus(b []byte, s statusBody) []byte {
	b = binary.BigEndian.AppendUint64(b, s.object)
	b = binary.BigEndian.AppendUint32(b, s.contiguous)
	b = binary.BigEndian.AppendUint32(b, s.received)
	b = append(b, s.flags)
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.missing)))
	for _, r := range s.missing {
		b = binary.BigEndian.AppendUint32(b, r.start)
		b = binary.BigEndian.AppendUint32(b, r.count)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.blocks)))
	for _, k := range s.blocks {
		b = binary.BigEndian.AppendUint32(b, k.block)
		b = append(b, k.need, k.seen)
	}
	return b
}

func decodeStatus(b []byte) (statusBody, error) {
	if len(b) < statusFixLen {
		return statusBody{}, malformed("status body of %d bytes", len(b))
	}
	s := statusBody{
		object:     binary.BigEndian.Uint64(b),
		contiguous: binary.BigEndian.Uint32(b[8:]),
		received:   binary.BigEndian.Uint32(b[12:]),
		flags:      b[16],
	}
	n := int(binary.BigEndian.Uint16(b[17:]))
	blocksAt := statusFixLen + rangeLen*n
	if len(b) < blocksAt+2 {
		return statusBody{}, malformed("status body of %d bytes with %d ranges", len(b), n)
	}
	nb := int(binary.BigEndian.Uint16(b[blocksAt:]))
	if len(b) != blocksAt+2+blockNakLen*nb {
		return statusBody{}, malformed("status body of %d bytes with %d ranges and %d blocks", len(b), n, nb)
	}
	if s.received < s.contiguous {
		return statusBody{}, malformed("%d fragments received but %d contiguous", s.received, s.contiguous)
	}
	for i := range n {
		off := statusFixLen + rangeLen*i
		r := span{binary.BigEndian.Uint32(b[off:]), binary.BigEndian.Uint32(b[off+4:])}
		if r.count == 0 || uint64(r.start)+uint64(r.count) > 1<<32-1 {
			return statusBody{}, malformed("missing range %d+%d", r.start, r.count)
		}
		s.missing = append(s.missing, r)
	}
	for i := range nb {
		off := blocksAt + 2 + blockNakLen*i
		k := blockNak{block: binary.BigEndian.Uint32(b[off:]), need: b[off+4], seen: b[off+5]}
		if k.need == 0 {
			return statusBody{}, malformed("block %d NAKed for no parity", k.block)
		}
		s.blocks = append(s.blocks, k)
	}
	return s, nil
}
