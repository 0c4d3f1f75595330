// Package descriptor is the VM descriptor: everything a host needs to
// restore a clone of a parent VM except the contents of its memory.
//
// A descriptor holds the machine configuration, the device state (for QEMU,
// the migration stream saved with x-ignore-shared, i.e. without RAM), and the
// map of the pages that hold data. Pages outside the map were never written
// (holes in the parent's RAM file) and are never fetched: the first avoidance
// heuristic. The parent's host writes a descriptor when a ticket clones,
// registers its size and digest through raft, and ships the bytes to the
// clone hosts, which parse and check them here before restoring.
//
// Wire format (all integers little endian):
//
//	magic "SFDESC\r\n" | version u16 | section count u16
//	section*: type u16 | length u32 | payload
//	sha256 of everything before it (32 bytes)
//
// Sections: 1 meta (strict JSON), 2 page map (uvarint pairs: gap from the
// end of the previous range, length), 3 device state (opaque bytes). Each
// appears once; unknown types are refused (a newer writer bumps the version).
package descriptor

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
)

// Version is the format version this package writes and reads.
const Version = 1

// Limits a descriptor must respect; a parser refuses anything larger.
const (
	MaxSize        = 32 << 20 // whole descriptor
	MaxDeviceState = 16 << 20
	MaxMeta        = 16 << 10
	MaxRanges      = 1 << 22
	PageSize       = 4096
)

var magic = [8]byte{'S', 'F', 'D', 'E', 'S', 'C', '\r', '\n'}

const (
	sectionMeta        = 1
	sectionPageMap     = 2
	sectionDeviceState = 3
)

// ErrInvalid is wrapped by every parse and validation error.
var ErrInvalid = errors.New("descriptor: invalid")

// Meta is the machine configuration a clone must match.
type Meta struct {
	Driver   string `json:"driver"` // "qemu" or "xen"
	ParentVM uint64 `json:"parent_vm"`
	Ticket   uint64 `json:"ticket,omitempty"`
	Machine  string `json:"machine"` // e.g. "pc"
	MemMB    int    `json:"mem_mb"`
	VCPUs    int    `json:"vcpus"`
	Kernel   string `json:"kernel,omitempty"` // the parent's kernel, initramfs and command line
	Initrd   string `json:"initrd,omitempty"`
	Append   string `json:"append,omitempty"`
	PageSize int    `json:"page_size"`
	// For the QEMU driver: what a clone's QEMU must match (qemuctl.Machine).
	QEMU  string   `json:"qemu,omitempty"` // version
	Accel string   `json:"accel,omitempty"`
	CPU   string   `json:"cpu,omitempty"`
	Extra []string `json:"extra,omitempty"`
	// Checkpoint is set when the descriptor is a checkpoint's rather than a
	// ticket's.
	Checkpoint bool `json:"checkpoint,omitempty"`
	// GuestCall is the request ID of the guest call that is pending in the
	// captured VM (its clone or checkpoint call): each clone's host answers
	// it with the clone's k. GuestInFlight are the other calls that were in
	// flight; clones answer them with an error, since their answers went to
	// the parent.
	GuestCall     uint64   `json:"guest_call,omitempty"`
	GuestInFlight []uint64 `json:"guest_in_flight,omitempty"`
	// Frames, if set, is the size in pages of the guest's frame space when
	// it exceeds its memory: a Xen guest's special pages lie far above its
	// RAM. Pages are numbered in it.
	Frames uint64 `json:"frames,omitempty"`
}

// MaxFrames bounds Meta.Frames: 64 GiB of frame space.
const MaxFrames = 1 << 24

// Bounds of the driver-specific metadata.
const (
	maxExtra     = 64
	maxInFlight  = 64
	maxMetaField = 4096
)

// HasKernel reports whether the VM was booted from a kernel named on the
// command line rather than by firmware.
func (m Meta) HasKernel() bool { return m.Kernel != "" }

// Range is a run of Count pages starting at page Start.
type Range struct {
	Start, Count uint64
}

// Descriptor is a parsed or to-be-written descriptor.
type Descriptor struct {
	Meta        Meta
	Pages       []Range // pages holding data, sorted, disjoint, not adjacent
	DeviceState []byte
}

// TotalPages is the number of pages of guest RAM.
func (d *Descriptor) TotalPages() uint64 {
	return max(uint64(d.Meta.MemMB)<<20/PageSize, d.Meta.Frames)
}

// DataPages is the number of pages the map says hold data.
func (d *Descriptor) DataPages() uint64 {
	var n uint64
	for _, r := range d.Pages {
		n += r.Count
	}
	return n
}

// HasData reports whether page p holds data (else it is zero: never fetch).
func (d *Descriptor) HasData(p uint64) bool {
	i := sort.Search(len(d.Pages), func(i int) bool { return d.Pages[i].Start+d.Pages[i].Count > p })
	return i < len(d.Pages) && d.Pages[i].Start <= p
}

func invalid(format string, a ...interface{}) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
}

// Validate checks the descriptor's own consistency.
func (d *Descriptor) Validate() error {
	m := d.Meta
	if m.Driver != "qemu" && m.Driver != "xen" {
		return invalid("driver %q", m.Driver)
	}
	if m.MemMB < 1 || m.MemMB > 1<<20 || m.VCPUs < 1 || m.VCPUs > 1024 || m.PageSize != PageSize || m.ParentVM == 0 {
		return invalid("machine: %d MiB, %d vCPUs, page size %d, parent %d", m.MemMB, m.VCPUs, m.PageSize, m.ParentVM)
	}
	if m.Frames > MaxFrames {
		return invalid("%d frames", m.Frames)
	}
	if len(m.Machine) == 0 || len(m.Machine) > 64 {
		return invalid("machine type %q", m.Machine)
	}
	if len(m.Extra) > maxExtra || len(m.GuestInFlight) > maxInFlight {
		return invalid("%d extra arguments, %d calls in flight", len(m.Extra), len(m.GuestInFlight))
	}
	for _, f := range append([]string{m.Kernel, m.Initrd, m.Append, m.QEMU, m.Accel, m.CPU}, m.Extra...) {
		if len(f) > maxMetaField {
			return invalid("a machine field of %d bytes", len(f))
		}
	}
	if len(d.DeviceState) == 0 || len(d.DeviceState) > MaxDeviceState {
		return invalid("device state of %d bytes", len(d.DeviceState))
	}
	if len(d.Pages) > MaxRanges {
		return invalid("%d page ranges", len(d.Pages))
	}
	total := d.TotalPages()
	var end uint64
	for i, r := range d.Pages {
		if r.Count == 0 || r.Start > total || r.Count > total-r.Start {
			return invalid("page range %d (%d+%d) outside %d pages", i, r.Start, r.Count, total)
		}
		if i > 0 && r.Start <= end {
			return invalid("page range %d overlaps, touches or precedes the previous", i)
		}
		end = r.Start + r.Count
	}
	return nil
}

// MarshalBinary writes the descriptor in the wire format.
func (d *Descriptor) MarshalBinary() ([]byte, error) {
	if err := d.Validate(); err != nil {
		return nil, err
	}
	meta, err := json.Marshal(d.Meta)
	if err != nil {
		return nil, err
	}
	var pm []byte
	var prev uint64
	for _, r := range d.Pages {
		pm = binary.AppendUvarint(pm, r.Start-prev)
		pm = binary.AppendUvarint(pm, r.Count)
		prev = r.Start + r.Count
	}
	var b bytes.Buffer
	b.Write(magic[:])
	binary.Write(&b, binary.LittleEndian, uint16(Version))
	binary.Write(&b, binary.LittleEndian, uint16(3))
	for _, s := range []struct {
		typ  uint16
		data []byte
	}{{sectionMeta, meta}, {sectionPageMap, pm}, {sectionDeviceState, d.DeviceState}} {
		binary.Write(&b, binary.LittleEndian, s.typ)
		binary.Write(&b, binary.LittleEndian, uint32(len(s.data)))
		b.Write(s.data)
	}
	sum := sha256.Sum256(b.Bytes())
	b.Write(sum[:])
	if b.Len() > MaxSize {
		return nil, invalid("%d bytes, at most %d", b.Len(), MaxSize)
	}
	return b.Bytes(), nil
}

// Digest is the hex sha256 of a descriptor's bytes, as registered in raft.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Parse checks and decodes a descriptor. The input is untrusted: every
// length is bounded, the checksum must match, and the result is validated.
func Parse(b []byte) (*Descriptor, error) {
	if len(b) > MaxSize {
		return nil, invalid("%d bytes, at most %d", len(b), MaxSize)
	}
	if len(b) < len(magic)+4+sha256.Size {
		return nil, invalid("%d bytes is too short", len(b))
	}
	body, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if want := sha256.Sum256(body); !bytes.Equal(want[:], sum) {
		return nil, invalid("checksum mismatch")
	}
	if !bytes.Equal(body[:len(magic)], magic[:]) {
		return nil, invalid("bad magic")
	}
	r := body[len(magic):]
	version, count := binary.LittleEndian.Uint16(r), binary.LittleEndian.Uint16(r[2:])
	if version != Version {
		return nil, invalid("version %d, this build reads %d", version, Version)
	}
	r = r[4:]
	seen := map[uint16]bool{}
	d := &Descriptor{}
	for i := 0; i < int(count); i++ {
		if len(r) < 6 {
			return nil, invalid("section %d header truncated", i)
		}
		typ, n := binary.LittleEndian.Uint16(r), binary.LittleEndian.Uint32(r[2:])
		r = r[6:]
		if uint64(n) > uint64(len(r)) {
			return nil, invalid("section %d claims %d bytes, %d left", i, n, len(r))
		}
		data := r[:n]
		r = r[n:]
		if seen[typ] {
			return nil, invalid("section type %d twice", typ)
		}
		seen[typ] = true
		switch typ {
		case sectionMeta:
			if len(data) > MaxMeta {
				return nil, invalid("meta of %d bytes", len(data))
			}
			dec := json.NewDecoder(bytes.NewReader(data))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&d.Meta); err != nil || dec.More() {
				return nil, invalid("meta: %v", err)
			}
		case sectionPageMap:
			var err error
			if d.Pages, err = parsePageMap(data); err != nil {
				return nil, err
			}
		case sectionDeviceState:
			d.DeviceState = bytes.Clone(data)
		default:
			return nil, invalid("unknown section type %d", typ)
		}
	}
	if len(r) != 0 {
		return nil, invalid("%d bytes after the sections", len(r))
	}
	if !seen[sectionMeta] || !seen[sectionPageMap] || !seen[sectionDeviceState] {
		return nil, invalid("missing section")
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return d, nil
}

func parsePageMap(b []byte) ([]Range, error) {
	var out []Range
	var prev uint64
	for len(b) > 0 {
		if len(out) >= MaxRanges {
			return nil, invalid("more than %d page ranges", MaxRanges)
		}
		gap, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, invalid("page map: bad varint")
		}
		b = b[n:]
		count, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, invalid("page map: bad varint")
		}
		b = b[n:]
		start := prev + gap
		if start < prev || start+count < start {
			return nil, invalid("page map overflows")
		}
		out = append(out, Range{Start: start, Count: count})
		prev = start + count
	}
	return out, nil
}

// Normalize sorts ranges and merges overlapping or adjacent ones.
func Normalize(rs []Range) []Range {
	rs = append([]Range(nil), rs...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].Start < rs[j].Start })
	var out []Range
	for _, r := range rs {
		if r.Count == 0 {
			continue
		}
		if n := len(out); n > 0 && r.Start <= out[n-1].Start+out[n-1].Count {
			if end := r.Start + r.Count; end > out[n-1].Start+out[n-1].Count {
				out[n-1].Count = end - out[n-1].Start
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// Overlay is the page map of memory made of base (the pages holding data
// there) with an overlay over it: own are pages the overlay holds with
// data, ownZero pages it holds as zeros. The result is sorted, disjoint
// and not adjacent, like Descriptor.Pages. Pages at or past total are
// refused.
func Overlay(base, own, ownZero []Range, total uint64) ([]Range, error) {
	bits := make([]uint64, (total+63)/64)
	set := func(rs []Range, on bool) error {
		for _, r := range rs {
			if r.Count > total || r.Start > total-r.Count {
				return invalid("pages %d+%d beyond %d", r.Start, r.Count, total)
			}
			for p := r.Start; p < r.Start+r.Count; p++ {
				if on {
					bits[p/64] |= 1 << (p % 64)
				} else {
					bits[p/64] &^= 1 << (p % 64)
				}
			}
		}
		return nil
	}
	if err := set(base, true); err != nil {
		return nil, err
	}
	if err := set(ownZero, false); err != nil {
		return nil, err
	}
	if err := set(own, true); err != nil {
		return nil, err
	}
	var out []Range
	for p := uint64(0); p < total; p++ {
		if bits[p/64]&(1<<(p%64)) == 0 {
			continue
		}
		if n := len(out); n > 0 && out[n-1].Start+out[n-1].Count == p {
			out[n-1].Count++
		} else {
			out = append(out, Range{Start: p, Count: 1})
		}
	}
	return out, nil
}
