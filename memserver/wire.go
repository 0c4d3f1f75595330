package memserver

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// PageSize is the size of a guest page, the unit of every request.
const PageSize = 4096

// ProtocolVersion is the wire protocol version this package speaks.
const ProtocolVersion = 2

// MaxBatchLimit is the most pages one request may ask for under any
// configuration. It bounds a response frame at about 4 MiB.
const MaxBatchLimit = 1024

// MaxIDLen is the longest snapshot ID.
const MaxIDLen = 255

// ErrProtocol is wrapped by every error about bytes that do not follow the
// wire protocol, from either side.
var ErrProtocol = errors.New("memserver: protocol violation")

var magic = [4]byte{'S', 'F', 'M', 'S'}

// Frame types. Hello and hello reply travel in the clear; every other frame
// is sealed (see seal.go).
const (
	frameHello      byte = 0x01
	frameHelloReply byte = 0x02
	frameRequest    byte = 0x03
	frameResponse   byte = 0x04
	frameFinish     byte = 0x05
	frameAccept     byte = 0x06
)

// Hello reply statuses.
const (
	helloOK      byte = 0 // the server's nonce follows: go on with the handshake
	helloRefused byte = 1
	helloVersion byte = 2
)

// Response statuses.
const (
	statusOK         byte = 0
	statusOutOfRange byte = 1
	statusReleased   byte = 2
	statusReadError  byte = 3
)

// Page kinds in an ok response.
const (
	kindZero byte = 0
	kindData byte = 1
)

// Sizes, in bytes, of the parts of frames. A frame's length field counts
// the type byte and the body; a sealed frame's body ends with a tagLen
// authentication tag.
const (
	lengthLen          = 4
	capabilityLen      = 32                   // len(Capability{})
	nonceLen           = 32                   // a handshake nonce
	helloFixedLen      = 4 + 2 + 1 + nonceLen // without the ID
	maxHelloFrame      = 1 + helloFixedLen + MaxIDLen
	helloReplyLen      = 2 + 1 + nonceLen // status ok
	refusalLen         = 2 + 1 + 4 + 8    // other statuses: version 1's layout, so that a version 1 client understands
	maxHelloReplyFrame = 1 + max(helloReplyLen, refusalLen)
	finishFrameLen     = 1 + tagLen // an empty plaintext
	acceptLen          = 4 + 8
	acceptFrameLen     = 1 + acceptLen + tagLen
	requestFixedLen    = 8 + 2
	rangeLen           = 8 + 4
	responseFixedLen   = 8 + 1
	okFixedLen         = responseFixedLen + 4
	maxErrorMessage    = 256
)

// maxRequestFrame is the longest sealed request frame (length field value)
// for a batch limit: one range per page.
func maxRequestFrame(maxBatch int) uint32 {
	return uint32(1 + requestFixedLen + rangeLen*maxBatch + tagLen)
}

// maxResponseFrame is the longest sealed response frame (length field
// value) for a batch limit: every page data.
func maxResponseFrame(maxBatch int) uint32 {
	ok := 1 + okFixedLen + maxBatch*(1+PageSize)
	return uint32(max(ok, 1+responseFixedLen+2+maxErrorMessage) + tagLen)
}

func protocolError(format string, a ...interface{}) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, a...))
}

// readFrame reads one frame whose length field is at most limit, into buf
// if it is large enough, and returns the type and the body. A stream that
// ends cleanly before a frame returns io.EOF; one that ends inside a frame
// returns io.ErrUnexpectedEOF. A length of zero or over limit is a protocol
// error, reported before anything more is read or allocated.
func readFrame(r io.Reader, limit uint32, buf []byte) (typ byte, body []byte, err error) {
	var hdr [lengthLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || n > limit {
		return 0, nil, protocolError("frame length %d, limit %d", n, limit)
	}
	if uint32(cap(buf)) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return buf[0], buf[1:], nil
}

// beginFrame appends a frame header with a placeholder length; finishFrame
// fills it in once the body has been appended.
func beginFrame(b []byte, typ byte) []byte {
	return append(b, 0, 0, 0, 0, typ)
}

func finishFrame(b []byte, start int) []byte {
	binary.BigEndian.PutUint32(b[start:], uint32(len(b)-start-lengthLen))
	return b
}

// validID reports whether id can name a snapshot: 1 to MaxIDLen bytes of
// letters, digits and ._:- (IDs end up in logs and metrics).
func validID(id string) bool {
	if len(id) == 0 || len(id) > MaxIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '.', c == '_', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

// hello opens a connection. The nonce is the client's share of the
// randomness the connection's keys derive from.
type hello struct {
	version    uint16
	snapshotID string
	nonce      [nonceLen]byte
}

func appendHello(b []byte, h hello) []byte {
	start := len(b)
	b = beginFrame(b, frameHello)
	b = append(b, magic[:]...)
	b = binary.BigEndian.AppendUint16(b, h.version)
	b = append(b, byte(len(h.snapshotID)))
	b = append(b, h.snapshotID...)
	b = append(b, h.nonce[:]...)
	return finishFrame(b, start)
}

// errNotMemserver: the peer does not speak this protocol at all; it gets
// no answer.
var errNotMemserver = fmt.Errorf("%w: bad magic", ErrProtocol)

// errVersion: the peer speaks another version; the returned hello carries
// it and the rest of the frame is not looked at.
var errVersion = fmt.Errorf("%w: unsupported version", ErrProtocol)

// decodeHello parses a hello body.
func decodeHello(body []byte) (hello, error) {
	if len(body) < 6 {
		return hello{}, protocolError("hello of %d bytes", len(body))
	}
	if [4]byte(body[:4]) != magic {
		return hello{}, errNotMemserver
	}
	h := hello{version: binary.BigEndian.Uint16(body[4:])}
	if h.version != ProtocolVersion {
		return h, errVersion
	}
	if len(body) < helloFixedLen {
		return hello{}, protocolError("hello of %d bytes", len(body))
	}
	n := int(body[6])
	if len(body) != helloFixedLen+n {
		return hello{}, protocolError("hello of %d bytes with an ID of %d", len(body), n)
	}
	id := string(body[7 : 7+n])
	if !validID(id) {
		return hello{}, protocolError("snapshot ID %q", id)
	}
	h.snapshotID = id
	h.nonce = [nonceLen]byte(body[7+n:])
	return h, nil
}

// helloReply answers a hello. An ok reply carries the server's nonce and
// goes on with the handshake; a refusal ends the connection. Refusals keep
// version 1's layout (a batch limit and a size, both zero) so that a
// version 1 client reads the version refusal and reports it.
type helloReply struct {
	version uint16
	status  byte
	nonce   [nonceLen]byte // ok only
}

func appendHelloReply(b []byte, r helloReply) []byte {
	start := len(b)
	b = beginFrame(b, frameHelloReply)
	b = binary.BigEndian.AppendUint16(b, r.version)
	b = append(b, r.status)
	if r.status == helloOK {
		b = append(b, r.nonce[:]...)
	} else {
		b = append(b, make([]byte, refusalLen-3)...)
	}
	return finishFrame(b, start)
}

// decodeHelloReply parses a hello reply body.
func decodeHelloReply(body []byte) (helloReply, error) {
	if len(body) < 3 {
		return helloReply{}, protocolError("hello reply of %d bytes", len(body))
	}
	r := helloReply{version: binary.BigEndian.Uint16(body), status: body[2]}
	switch r.status {
	case helloOK:
		if len(body) != helloReplyLen {
			return helloReply{}, protocolError("hello reply of %d bytes", len(body))
		}
		if r.version != ProtocolVersion {
			return helloReply{}, protocolError("ok from version %d", r.version)
		}
		r.nonce = [nonceLen]byte(body[3:])
	case helloRefused, helloVersion:
		if len(body) != refusalLen {
			return helloReply{}, protocolError("refusal of %d bytes", len(body))
		}
		for _, c := range body[3:] {
			if c != 0 {
				return helloReply{}, protocolError("refusal with a batch or size")
			}
		}
	default:
		return helloReply{}, protocolError("hello status %d", r.status)
	}
	return r, nil
}

// accept is the plaintext of the server's first sealed frame, which ends
// the handshake: what the connection may ask for.
type accept struct {
	maxBatch uint32
	pages    uint64 // the snapshot's size in pages
}

// appendAccept appends an accept frame, to be sealed.
func appendAccept(b []byte, a accept) []byte {
	start := len(b)
	b = beginFrame(b, frameAccept)
	b = binary.BigEndian.AppendUint32(b, a.maxBatch)
	b = binary.BigEndian.AppendUint64(b, a.pages)
	return finishFrame(b, start)
}

// decodeAccept parses an opened accept. A batch limit the protocol does not
// allow is refused, since the client sizes its frame limit from it.
func decodeAccept(pt []byte) (accept, error) {
	if len(pt) != acceptLen {
		return accept{}, protocolError("accept of %d bytes", len(pt))
	}
	a := accept{maxBatch: binary.BigEndian.Uint32(pt), pages: binary.BigEndian.Uint64(pt[4:])}
	if a.maxBatch == 0 || a.maxBatch > MaxBatchLimit || a.pages == 0 {
		return accept{}, protocolError("accept with batch %d, %d pages", a.maxBatch, a.pages)
	}
	return a, nil
}

// pageRange is count pages from first.
type pageRange struct {
	first uint64
	count uint32
}

// request asks for the pages of its ranges, in order.
type request struct {
	id     uint64
	ranges []pageRange
}

// pages is the number of pages the request asks for.
func (r request) pages() int {
	n := 0
	for _, pr := range r.ranges {
		n += int(pr.count)
	}
	return n
}

func appendRequest(b []byte, r request) []byte {
	start := len(b)
	b = beginFrame(b, frameRequest)
	b = binary.BigEndian.AppendUint64(b, r.id)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.ranges)))
	for _, pr := range r.ranges {
		b = binary.BigEndian.AppendUint64(b, pr.first)
		b = binary.BigEndian.AppendUint32(b, pr.count)
	}
	return finishFrame(b, start)
}

// decodeRequest parses a request body. Whether the pages exist is for the
// server to check; the decoder checks the structure and the batch limit.
func decodeRequest(body []byte, maxBatch int) (request, error) {
	if len(body) < requestFixedLen {
		return request{}, protocolError("request of %d bytes", len(body))
	}
	r := request{id: binary.BigEndian.Uint64(body)}
	n := int(binary.BigEndian.Uint16(body[8:]))
	if n == 0 || len(body) != requestFixedLen+rangeLen*n {
		return request{}, protocolError("request of %d bytes with %d ranges", len(body), n)
	}
	r.ranges = make([]pageRange, n)
	total := uint64(0)
	for i := range r.ranges {
		p := body[requestFixedLen+rangeLen*i:]
		pr := pageRange{first: binary.BigEndian.Uint64(p), count: binary.BigEndian.Uint32(p[8:])}
		if pr.count == 0 {
			return request{}, protocolError("empty range")
		}
		if total += uint64(pr.count); total > uint64(maxBatch) {
			return request{}, protocolError("request for more than %d pages", maxBatch)
		}
		r.ranges[i] = pr
	}
	return r, nil
}

// response answers one request. For status ok, kinds has one entry per
// page and data holds the data pages, in order, back to back.
type response struct {
	id      uint64
	status  byte
	kinds   []byte
	data    []byte
	message string // other statuses
}

// appendResponse encodes a response. The server builds ok responses in
// place (see Server.serveRequest); this is the reference encoding.
func appendResponse(b []byte, r response) []byte {
	start := len(b)
	b = beginFrame(b, frameResponse)
	b = binary.BigEndian.AppendUint64(b, r.id)
	b = append(b, r.status)
	if r.status == statusOK {
		b = binary.BigEndian.AppendUint32(b, uint32(len(r.kinds)))
		b = append(b, r.kinds...)
		b = append(b, r.data...)
	} else {
		msg := r.message
		if len(msg) > maxErrorMessage {
			msg = strings.ToValidUTF8(msg[:maxErrorMessage], "")
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
		b = append(b, msg...)
	}
	return finishFrame(b, start)
}

// decodeResponse parses a response body. Its slices alias body.
func decodeResponse(body []byte) (response, error) {
	if len(body) < responseFixedLen {
		return response{}, protocolError("response of %d bytes", len(body))
	}
	r := response{id: binary.BigEndian.Uint64(body), status: body[8]}
	rest := body[responseFixedLen:]
	switch r.status {
	case statusOK:
		if len(rest) < 4 {
			return response{}, protocolError("ok response of %d bytes", len(body))
		}
		n := binary.BigEndian.Uint32(rest)
		rest = rest[4:]
		if n == 0 || n > MaxBatchLimit || uint32(len(rest)) < n {
			return response{}, protocolError("ok response of %d bytes for %d pages", len(body), n)
		}
		r.kinds, rest = rest[:n], rest[n:]
		data := 0
		for _, k := range r.kinds {
			switch k {
			case kindZero:
			case kindData:
				data++
			default:
				return response{}, protocolError("page kind %d", k)
			}
		}
		if len(rest) != data*PageSize {
			return response{}, protocolError("%d bytes for %d data pages", len(rest), data)
		}
		r.data = rest
	case statusOutOfRange, statusReleased, statusReadError:
		if len(rest) < 2 {
			return response{}, protocolError("error response of %d bytes", len(body))
		}
		n := int(binary.BigEndian.Uint16(rest))
		if n > maxErrorMessage || len(rest) != 2+n {
			return response{}, protocolError("error response of %d bytes with a message of %d", len(body), n)
		}
		if !utf8.Valid(rest[2:]) {
			return response{}, protocolError("error message is not UTF-8")
		}
		r.message = string(rest[2:])
	default:
		return response{}, protocolError("response status %d", r.status)
	}
	return r, nil
}
