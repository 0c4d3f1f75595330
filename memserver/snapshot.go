package memserver

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Capability is the secret that grants access to one snapshot. Whoever
// holds it can read the snapshot's memory, so it travels only to the hosts
// of the snapshot's clones. String redacts it; MarshalText and
// ParseCapability carry it as hex.
type Capability [32]byte

// NewCapability returns a random capability.
func NewCapability() Capability {
	var c Capability
	rand.Read(c[:]) // never fails (crypto/rand crashes the program instead)
	return c
}

// ParseCapability parses the hex form of a capability.
func ParseCapability(s string) (Capability, error) {
	var c Capability
	err := c.UnmarshalText([]byte(s))
	return c, err
}

// IsZero reports whether c is the zero capability, which is never issued.
func (c Capability) IsZero() bool { return c == Capability{} }

// String redacts the capability, so that logging one leaks nothing.
func (c Capability) String() string { return "memserver.Capability(redacted)" }

// MarshalText returns the capability in hex.
func (c Capability) MarshalText() ([]byte, error) {
	return hex.AppendEncode(nil, c[:]), nil
}

// UnmarshalText parses the hex form of a capability.
func (c *Capability) UnmarshalText(b []byte) error {
	if hex.DecodedLen(len(b)) != capabilityLen {
		return fmt.Errorf("memserver: capability of %d hex digits, want %d", len(b), 2*capabilityLen)
	}
	var d Capability
	if _, err := hex.Decode(d[:], b); err != nil {
		return fmt.Errorf("memserver: capability: %w", err)
	}
	*c = d
	return nil
}

// SnapshotSpec describes a frozen RAM file to serve.
type SnapshotSpec struct {
	// ID names the snapshot on the wire: 1 to MaxIDLen letters, digits
	// and ._:- characters.
	ID string
	// Path is the frozen RAM file. It must not change while registered.
	Path string
	// Size is the RAM size in bytes, a multiple of PageSize, at most the
	// file's size; 0 means the file's size.
	Size int64
	// Capability, if not zero, is used instead of a fresh random one: a
	// restarted memserver keeps serving the clones of its snapshots.
	Capability Capability

	// Base, with Own, makes the snapshot an overlay, as a clone's snapshot
	// is over the memory its clone was restored from: a page for which Own
	// reports true is read from Path (where a hole reads as zeros), any
	// other page from Base. Both or neither are set.
	Base PageReader
	Own  func(page uint64) bool
}

// PageReader reads the pages of a snapshot that lie under an overlay.
// ReadPages is called concurrently and may block on the network; the
// pages it reads must never change.
type PageReader interface {
	// ReadPages fills dst, a whole number of pages, with the pages from
	// first on.
	ReadPages(ctx context.Context, first uint64, dst []byte) error
}

// baseReadTimeout bounds one read of an overlay's base.
const baseReadTimeout = 2 * time.Minute

// snapshot is a registered snapshot. Requests hold a reference while they
// read it; the file is closed once it is released and no request holds it.
type snapshot struct {
	id         string
	capability Capability
	file       *os.File
	raw        syscall.RawConn
	pages      uint64
	base       PageReader
	own        func(page uint64) bool

	noHoles atomic.Bool // the file system cannot report holes

	mu       sync.Mutex
	refs     int
	released bool
	closed   bool
}

func openSnapshot(spec SnapshotSpec) (*snapshot, error) {
	if !validID(spec.ID) {
		return nil, fmt.Errorf("memserver: invalid snapshot ID %q", spec.ID)
	}
	if (spec.Base == nil) != (spec.Own == nil) {
		return nil, fmt.Errorf("memserver: snapshot %s: an overlay needs both Base and Own", spec.ID)
	}
	f, err := os.Open(spec.Path)
	if err != nil {
		return nil, fmt.Errorf("memserver: snapshot %s: %w", spec.ID, err)
	}
	fail := func(format string, a ...interface{}) (*snapshot, error) {
		f.Close()
		return nil, fmt.Errorf("memserver: snapshot %s: "+format, append([]interface{}{spec.ID}, a...)...)
	}
	fi, err := f.Stat()
	if err != nil {
		return fail("%w", err)
	}
	if !fi.Mode().IsRegular() {
		return fail("%s is not a regular file", spec.Path)
	}
	size := spec.Size
	if size == 0 {
		size = fi.Size()
	}
	if size <= 0 || size%PageSize != 0 {
		return fail("size %d is not a positive multiple of %d", size, PageSize)
	}
	if size > fi.Size() {
		return fail("size %d but %s has %d bytes", size, spec.Path, fi.Size())
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return fail("%w", err)
	}
	c := spec.Capability
	if c.IsZero() {
		c = NewCapability()
	}
	return &snapshot{id: spec.ID, capability: c, file: f, raw: raw, pages: uint64(size / PageSize),
		base: spec.Base, own: spec.Own}, nil
}

// acquire takes a reference for a request, unless the snapshot has been
// released.
func (s *snapshot) acquire() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released {
		return false
	}
	s.refs++
	return true
}

// unref drops a request's reference.
func (s *snapshot) unref() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refs--
	s.closeIfUnused()
}

// release refuses later requests; the file is closed when the requests
// being served are done.
func (s *snapshot) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.released = true
	s.closeIfUnused()
}

func (s *snapshot) closeIfUnused() {
	if s.released && s.refs == 0 && !s.closed {
		s.closed = true
		s.file.Close()
	}
}

// isClosed reports whether the file has been closed (for tests).
func (s *snapshot) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// inRange reports whether every page of the ranges is in the snapshot.
func (s *snapshot) inRange(ranges []pageRange) bool {
	for _, pr := range ranges {
		if pr.first >= s.pages || uint64(pr.count) > s.pages-pr.first {
			return false
		}
	}
	return true
}

var zeroPage [PageSize]byte

// readPages fills kinds, one per page of ranges, and data, which has room
// for every page, with the data pages back to back. It returns how many
// pages are data and how many were found to be holes without reading. The
// caller holds a reference and has checked the ranges.
func (s *snapshot) readPages(ranges []pageRange, kinds, data []byte) (nData, nHoles int, err error) {
	if s.base == nil {
		return s.readFile(ranges, kinds, data)
	}
	// An overlay: runs of pages of the file and of the base, in turn.
	k := 0
	for _, pr := range ranges {
		for p, end := pr.first, pr.first+uint64(pr.count); p < end; {
			own := s.own(p)
			q := p + 1
			for q < end && s.own(q) == own {
				q++
			}
			n := int(q - p)
			var d, h int
			if own {
				d, h, err = s.readFile([]pageRange{{first: p, count: uint32(n)}}, kinds[k:k+n], data[nData*PageSize:])
			} else {
				d, err = s.readBase(p, kinds[k:k+n], data[nData*PageSize:(nData+n)*PageSize])
			}
			if err != nil {
				return 0, 0, err
			}
			nData, nHoles, k, p = nData+d, nHoles+h, k+n, q
		}
	}
	return nData, nHoles, nil
}

// readBase reads len(kinds) pages from first of an overlay's base into buf
// and compacts them like readFile.
func (s *snapshot) readBase(first uint64, kinds, buf []byte) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), baseReadTimeout)
	defer cancel()
	if err := s.base.ReadPages(ctx, first, buf); err != nil {
		return 0, fmt.Errorf("base of the overlay: %w", err)
	}
	nData := 0
	for i := range kinds {
		page := buf[i*PageSize : (i+1)*PageSize]
		if bytes.Equal(page, zeroPage[:]) {
			kinds[i] = kindZero
			continue
		}
		if nData != i {
			copy(buf[nData*PageSize:(nData+1)*PageSize], page)
		}
		kinds[i] = kindData
		nData++
	}
	return nData, nil
}

// readFile is readPages from the file.
func (s *snapshot) readFile(ranges []pageRange, kinds, data []byte) (nData, nHoles int, err error) {
	k := 0
	for _, pr := range ranges {
		pos := int64(pr.first) * PageSize
		end := pos + int64(pr.count)*PageSize
		next, err := s.nextData(pos, end)
		for pos < end && err == nil {
			for ; pos < next; pos += PageSize {
				kinds[k] = kindZero
				k++
				nHoles++
			}
			if pos >= end {
				break
			}
			// A run of pages with data, read at once where the next data
			// page goes, then compacted past the pages that read as zeros.
			runStart := pos
			for pos < end && pos == next && err == nil {
				if pos += PageSize; pos < end {
					next, err = s.nextData(pos, end)
				}
			}
			n := int((pos - runStart) / PageSize)
			base := nData
			run := data[base*PageSize : (base+n)*PageSize]
			if _, err := s.file.ReadAt(run, runStart); err != nil {
				if errors.Is(err, io.EOF) {
					err = errShort
				}
				return 0, 0, err
			}
			for i := range n {
				page := run[i*PageSize : (i+1)*PageSize]
				if bytes.Equal(page, zeroPage[:]) {
					kinds[k] = kindZero
				} else {
					if nData != base+i {
						copy(data[nData*PageSize:(nData+1)*PageSize], page)
					}
					kinds[k] = kindData
					nData++
				}
				k++
			}
		}
		if err != nil {
			return 0, 0, err
		}
	}
	return nData, nHoles, nil
}

var errShort = errors.New("snapshot file is shorter than the snapshot")

// nextData returns the offset of the first page at or after pos (a page
// offset) that holds data, or end if there is none before end. Where the
// file system cannot tell, every page holds data (and zero pages are found
// by reading them).
//
// Only SEEK_DATA is used: on tmpfs, SEEK_HOLE walks every cached page up to
// the next hole, which for a mostly written snapshot costs time in
// proportion to the file's size (100 µs at 64 MiB), while SEEK_DATA at a
// page with data returns at once and skips a hole quickly.
func (s *snapshot) nextData(pos, end int64) (int64, error) {
	if s.noHoles.Load() {
		return pos, nil
	}
	off, err := s.seek(pos, seekData)
	switch {
	case errors.Is(err, errNoData):
		// No data up to the end of the file, which is also what a file
		// cut short says: make sure it is not, rather than answer zeros.
		if fi, err := s.file.Stat(); err != nil || fi.Size() < int64(s.pages)*PageSize {
			return 0, errShort
		}
		return end, nil
	case err != nil:
		s.noHoles.Store(true)
		return pos, nil
	}
	return min(max(off/PageSize*PageSize, pos), end), nil
}

// errNoData is returned by seek for SEEK_DATA past the last data.
var errNoData = errors.New("no data after offset")

// seek is lseek on the file, which leaves the file offset changed; nothing
// else uses it, since reads are ReadAt.
func (s *snapshot) seek(off int64, whence int) (int64, error) {
	var res int64
	var serr error
	if err := s.raw.Control(func(fd uintptr) { res, serr = lseek(int(fd), off, whence) }); err != nil {
		return 0, err
	}
	return res, serr
}
