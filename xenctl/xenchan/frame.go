package xenchan

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// Names of the channel's nodes, relative to a domain's home path
// (/local/domain/<domid>), which is where a guest's relative paths lead.
const (
	// HostDir is dom0's area: the guest may read it, never write it.
	HostDir      = "snowflock"
	EpochNode    = HostDir + "/epoch"    // replaced with every new domain
	IdentityNode = HostDir + "/identity" // guestchan.Identity, JSON
	RespDir      = HostDir + "/resp"     // resp/<id>/<chunk>, resp/<id>/n

	// GuestDir is the guest's area, under the data/ directory libxl
	// creates writable by the guest.
	GuestDir = "data/snowflock"
	ReqDir   = GuestDir + "/req"  // req/<id>/<chunk>, req/<id>/n
	DoneDir  = GuestDir + "/done" // done/<id>: the guest has its answer
)

// Limits of the framing.
const (
	// ChunkSize is the most bytes of a message one node holds. xenstored
	// refuses a guest's node of 2048 bytes or more, counting a 24-byte
	// header and 8 bytes per permission entry (-S, quota_max_entry_size),
	// and oxenstored's quota-maxsize is 2048: 1536 leaves room for a
	// node's permission list.
	ChunkSize = 1536
	// MaxChunks bounds a message's chunk count, so that a message of
	// guestchan.MaxMessage bytes fits.
	MaxChunks = (guestchan.MaxMessage + ChunkSize - 1) / ChunkSize
	// MaxLine is the longest message without its newline.
	MaxLine = guestchan.MaxMessage - 1
)

// ErrBadFrame is wrapped by errors about a message whose nodes do not
// form a valid framed message.
var ErrBadFrame = errors.New("xenchan: bad frame")

// Store is the part of a xenstore connection the channel uses;
// *xenstore.Client implements it.
type Store interface {
	Read(ctx context.Context, path string) ([]byte, error)
	Write(ctx context.Context, path string, value []byte) error
	Mkdir(ctx context.Context, path string) error
	Rm(ctx context.Context, path string) error
	Directory(ctx context.Context, path string) ([]string, error)
	SetPerms(ctx context.Context, path string, perms []xenstore.Perm) error
}

var _ Store = (*xenstore.Client)(nil)

// writeMessage stores msg under dir: chunks dir/0 .. dir/<n-1> of at most
// ChunkSize bytes, then dir/n holding n, in decimal. A reader acts only on
// a message whose count node exists; since one connection's writes apply
// in order, by then every chunk is in place.
func writeMessage(ctx context.Context, st Store, dir string, msg []byte) error {
	if len(msg) == 0 || len(msg) > MaxLine {
		return fmt.Errorf("%w: message of %d bytes", guestchan.ErrTooLarge, len(msg))
	}
	n := 0
	for off := 0; off < len(msg); off += ChunkSize {
		end := min(off+ChunkSize, len(msg))
		if err := st.Write(ctx, dir+"/"+strconv.Itoa(n), msg[off:end]); err != nil {
			return err
		}
		n++
	}
	return st.Write(ctx, dir+"/n", []byte(strconv.Itoa(n)))
}

// readMessage reads the message stored under dir. complete is false, with
// no error, while its count node does not exist. A count or chunks that
// cannot form a message of at most MaxLine bytes are ErrBadFrame.
func readMessage(ctx context.Context, st Store, dir string) (msg []byte, complete bool, err error) {
	raw, err := st.Read(ctx, dir+"/n")
	if errors.Is(err, xenstore.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	n, ok := parseCount(raw)
	if !ok {
		return nil, true, fmt.Errorf("%w: %s/n is %q", ErrBadFrame, dir, raw)
	}
	for i := range n {
		chunk, err := st.Read(ctx, dir+"/"+strconv.Itoa(i))
		if errors.Is(err, xenstore.ErrNotFound) {
			return nil, true, fmt.Errorf("%w: %s lacks chunk %d of %d", ErrBadFrame, dir, i, n)
		}
		if err != nil {
			return nil, true, err
		}
		if len(chunk) == 0 || len(msg)+len(chunk) > MaxLine {
			return nil, true, fmt.Errorf("%w: %s: chunk %d of %d bytes after %d", ErrBadFrame, dir, i, len(chunk), len(msg))
		}
		msg = append(msg, chunk...)
	}
	if bytes.IndexByte(msg, '\n') >= 0 {
		return nil, true, fmt.Errorf("%w: %s: newline inside a message", ErrBadFrame, dir)
	}
	return msg, true, nil
}

// parseCount accepts 1..MaxChunks in canonical decimal.
func parseCount(b []byte) (int, bool) {
	n, ok := parseDecimal(string(b), 2)
	return int(n), ok && n >= 1 && n <= MaxChunks
}

// parseID accepts a call ID as a node name: canonical decimal, not zero.
func parseID(s string) (uint64, bool) {
	id, ok := parseDecimal(s, 20)
	return id, ok && id != 0
}

// parseDecimal accepts digits only, without leading zeros, at most
// maxDigits of them.
func parseDecimal(s string, maxDigits int) (uint64, bool) {
	if s == "" || len(s) > maxDigits || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	return v, err == nil
}

// lineID returns the "id" of a request or response line.
func lineID(line []byte) (uint64, error) {
	var m struct {
		ID uint64 `json:"id"`
	}
	if err := json.Unmarshal(line, &m); err != nil {
		return 0, fmt.Errorf("%w: %v", guestchan.ErrBadMessage, err)
	}
	return m.ID, nil
}

// lineBuffer collects the bytes of Write calls into lines.
type lineBuffer struct {
	buf []byte
}

// add appends p and returns the complete lines, without their newlines.
// A line longer than MaxLine is an error; the buffer is then emptied.
func (l *lineBuffer) add(p []byte) ([][]byte, error) {
	l.buf = append(l.buf, p...)
	var lines [][]byte
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		line := bytes.TrimSuffix(l.buf[:i], []byte{'\r'})
		l.buf = l.buf[i+1:]
		if len(line) > 0 {
			lines = append(lines, bytes.Clone(line))
		}
	}
	if len(l.buf) > MaxLine {
		l.buf = nil
		return lines, guestchan.ErrTooLarge
	}
	if len(l.buf) == 0 {
		l.buf = nil // let a large buffer go
	}
	return lines, nil
}

// lineQueue hands lines to Read.
type lineQueue struct {
	rest []byte // what a short Read left of the current line
}

// fill copies as much of line (plus its newline) into p as fits and keeps
// the rest.
func (q *lineQueue) fill(p []byte, line []byte) int {
	if line != nil {
		q.rest = append(line, '\n')
	}
	n := copy(p, q.rest)
	q.rest = q.rest[n:]
	if len(q.rest) == 0 {
		q.rest = nil
	}
	return n
}
