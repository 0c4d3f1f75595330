package xcstream

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
)

// Descriptor wire format, version 1. Fixed-size integers are little
// endian; uv is a uvarint, sv a zigzag varint.
//
//	magic "SFXCDSC\n" | version u16
//	save file: uv length | bytes
//	libxl options uv
//	libxc header: version uv | options uv | guest type uv | page shift uv | xen major uv | xen minor uv
//	record count uv, then per record:
//	  layer u8 | type uv | PAGE_DATA: run count uv, runs | other: uv length | body
//	  run: sv PFN minus the end of the previous run (of any record) | count uv | type | zero<<4 (u8)
//	sha256 of everything before it
//
// Runs are delta-coded because saves send PFNs in ascending batches: a
// whole guest of distinct pages usually costs a few bytes per run.

// DescriptorVersion is the wire format version MarshalBinary writes and
// UnmarshalBinary reads.
const DescriptorVersion = 1

var descriptorMagic = [8]byte{'S', 'F', 'X', 'C', 'D', 'S', 'C', '\n'}

const runZero = 1 << 4

// MarshalBinary encodes a valid descriptor.
func (d *Descriptor) MarshalBinary() ([]byte, error) {
	if err := d.validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadDescriptor, err)
	}
	b := append([]byte(nil), descriptorMagic[:]...)
	b = binary.LittleEndian.AppendUint16(b, DescriptorVersion)
	b = binary.AppendUvarint(b, uint64(len(d.SaveFile)))
	b = append(b, d.SaveFile...)
	b = binary.AppendUvarint(b, uint64(d.LibxlOptions))
	for _, v := range []uint64{uint64(d.Libxc.Version), uint64(d.Libxc.Options), uint64(d.Libxc.GuestType),
		uint64(d.Libxc.PageShift), uint64(d.Libxc.XenMajor), uint64(d.Libxc.XenMinor)} {
		b = binary.AppendUvarint(b, v)
	}
	b = binary.AppendUvarint(b, uint64(len(d.Records)))
	var end uint64
	for _, rec := range d.Records {
		b = append(b, byte(rec.Layer))
		b = binary.AppendUvarint(b, uint64(rec.Type))
		if !rec.isPageData() {
			b = binary.AppendUvarint(b, uint64(len(rec.Body)))
			b = append(b, rec.Body...)
			continue
		}
		b = binary.AppendUvarint(b, uint64(len(rec.Pages)))
		for _, r := range rec.Pages {
			b = binary.AppendVarint(b, int64(r.PFN-end))
			b = binary.AppendUvarint(b, uint64(r.Count))
			flags := r.Type
			if r.Zero {
				flags |= runZero
			}
			b = append(b, flags)
			end = r.PFN + uint64(r.Count)
		}
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...), nil
}

// UnmarshalBinary decodes and validates a descriptor. The input is
// untrusted: the checksum must match, every length is bounded by the
// input, and the result must describe an image Split would accept. On
// error d is unchanged. d does not retain b.
func (d *Descriptor) UnmarshalBinary(b []byte) error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadDescriptor, fmt.Sprintf(format, a...))
	}
	if len(b) < len(descriptorMagic)+2+sha256.Size {
		return bad("%d bytes is too short", len(b))
	}
	body, sum := b[:len(b)-sha256.Size], b[len(b)-sha256.Size:]
	if want := sha256.Sum256(body); !bytes.Equal(want[:], sum) {
		return bad("checksum mismatch")
	}
	if !bytes.Equal(body[:len(descriptorMagic)], descriptorMagic[:]) {
		return bad("bad magic")
	}
	if v := binary.LittleEndian.Uint16(body[len(descriptorMagic):]); v != DescriptorVersion {
		return bad("version %d, this build reads %d", v, DescriptorVersion)
	}
	// One copy that the descriptor's byte slices share, capped so that an
	// append to one cannot spill into the next.
	r := &reader{b: bytes.Clone(body[len(descriptorMagic)+2:])}
	var nd Descriptor
	nd.SaveFile = r.bytes(r.uvarint())
	nd.LibxlOptions = r.uint32()
	nd.Libxc = LibxcHeader{
		Version:   r.uint32(),
		Options:   uint16(r.bounded(math.MaxUint16)),
		GuestType: GuestType(r.uint32()),
		PageShift: uint16(r.bounded(math.MaxUint16)),
		XenMajor:  r.uint32(),
		XenMinor:  r.uint32(),
	}
	// Every record takes at least three bytes and every run at least
	// three, which bounds what the counts may allocate.
	nrec := r.bounded(uint64(len(r.b)) / 3)
	if r.err == nil {
		nd.Records = make([]Record, 0, nrec)
	}
	var end uint64
	for i := uint64(0); i < nrec && r.err == nil; i++ {
		rec := Record{Layer: Layer(r.byte()), Type: r.uint32()}
		if !rec.isPageData() {
			rec.Body = r.bytes(r.uvarint())
			nd.Records = append(nd.Records, rec)
			continue
		}
		nrun := r.bounded(uint64(len(r.b)) / 3)
		if r.err == nil {
			rec.Pages = make([]PageRun, 0, nrun)
		}
		for j := uint64(0); j < nrun && r.err == nil; j++ {
			run := PageRun{PFN: end + uint64(r.varint()), Count: r.uint32()}
			flags := r.byte()
			run.Type, run.Zero = flags&0xF, flags&runZero != 0
			if flags&^(0xF|runZero) != 0 {
				return bad("run flags %#x", flags)
			}
			rec.Pages = append(rec.Pages, run)
			end = run.PFN + uint64(run.Count)
		}
		nd.Records = append(nd.Records, rec)
	}
	if r.err != nil {
		return fmt.Errorf("%w: %w", ErrBadDescriptor, r.err)
	}
	if len(r.b) != 0 {
		return bad("%d bytes after the records", len(r.b))
	}
	if err := nd.validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrBadDescriptor, err)
	}
	*d = nd
	return nil
}

// reader decodes the descriptor's body, keeping the first error; after an
// error every read returns zero.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(format string, a ...any) {
	if r.err == nil {
		r.err = fmt.Errorf(format, a...)
	}
	r.b = nil
}

func (r *reader) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("bad uvarint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail("bad varint")
		return 0
	}
	r.b = r.b[n:]
	return v
}

// bounded reads a uvarint that must not exceed max.
func (r *reader) bounded(max uint64) uint64 {
	v := r.uvarint()
	if v > max {
		r.fail("value %d exceeds %d", v, max)
		return 0
	}
	return v
}

func (r *reader) uint32() uint32 { return uint32(r.bounded(math.MaxUint32)) }

func (r *reader) byte() byte {
	if len(r.b) == 0 {
		r.fail("truncated")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

// bytes returns the next n bytes, or nil if n is zero.
func (r *reader) bytes(n uint64) []byte {
	if n > uint64(len(r.b)) {
		r.fail("%d bytes wanted, %d left", n, len(r.b))
		return nil
	}
	if n == 0 {
		return nil
	}
	s := r.b[:n:n]
	r.b = r.b[n:]
	return s
}
