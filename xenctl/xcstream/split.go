package xcstream

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

// PageSink takes the page payloads Split removes from an image.
//
// Split calls PutPage from its own goroutine, in stream order, once for
// each PFN whose payload is not all zeros. data is PageSize bytes and is
// valid only during the call: a sink that keeps it must copy it. An error
// stops Split, which returns it wrapped.
type PageSink interface {
	PutPage(pfn uint64, data []byte) error
}

// Split reads a save image — an `xl save` file or a bare libxl stream —
// to its libxl END, hands the page payloads to sink (nil discards them) and
// returns the rest as a Descriptor. It holds one page at a time, however
// large the image. Anything after the libxl END is an error
// (ErrTrailingData), as is anything Limits forbids (ErrTooLarge) or a
// Descriptor cannot reproduce; see the package comment.
func Split(r io.Reader, sink PageSink, lim Limits) (*Descriptor, error) {
	s := &splitter{
		r:    bufio.NewReaderSize(r, 64<<10),
		lim:  lim.withDefaults(),
		sink: sink,
		sent: pfnSet{},
	}
	if err := s.run(); err != nil {
		return nil, err
	}
	// Split only builds what validate accepts; check anyway, since a
	// descriptor that cannot be marshalled would fail far from here.
	if err := s.d.validate(); err != nil {
		return nil, err
	}
	return &s.d, nil
}

type splitter struct {
	r       *bufio.Reader
	off     uint64 // bytes consumed so far
	lim     Limits
	sink    PageSink
	d       Descriptor
	ord     order
	meta    uint64 // verbatim bytes held, against lim.MaxMetadata
	entries uint64 // PFN entries so far, against lim.MaxPages
	sent    pfnSet // PFNs whose payload has been seen
	page    [PageSize]byte
}

var zeroPage [PageSize]byte

func (s *splitter) run() error {
	if err := s.headers(); err != nil {
		return err
	}
	for s.ord.stage != ended {
		if err := s.record(); err != nil {
			return err
		}
		if last := s.d.Records[len(s.d.Records)-1]; last.Layer == LayerLibxl && last.Type == LibxlLibxcContext {
			if err := s.libxcHeaders(); err != nil {
				return err
			}
		}
	}
	switch _, err := s.r.ReadByte(); {
	case err == nil:
		return fmt.Errorf("%w: at offset %d", ErrTrailingData, s.off)
	case err != io.EOF:
		return fmt.Errorf("xcstream: reading at offset %d: %w", s.off, err)
	}
	return nil
}

// read fills p from the stream; what names p in errors.
func (s *splitter) read(p []byte, what string) error {
	n, err := io.ReadFull(s.r, p)
	s.off += uint64(n)
	switch {
	case err == nil:
		return nil
	case err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: %s cut off at offset %d", ErrTruncated, what, s.off)
	}
	return fmt.Errorf("xcstream: reading %s at offset %d: %w", what, s.off, err)
}

// readVerbatim reads n bytes that the descriptor keeps. It allocates as
// the bytes arrive, so a length that promises more than the stream holds
// costs no memory.
func (s *splitter) readVerbatim(n uint64, what string) ([]byte, error) {
	if n > s.lim.MaxMetadata-s.meta {
		return nil, fmt.Errorf("%w: %s of %d bytes takes the verbatim data past %d bytes", ErrTooLarge, what, n, s.lim.MaxMetadata)
	}
	s.meta += n
	const step = 1 << 20
	b := make([]byte, 0, min(n, step))
	for uint64(len(b)) < n {
		k := int(min(n-uint64(len(b)), step))
		b = slices.Grow(b, k)
		if err := s.read(b[len(b):len(b)+k], what); err != nil {
			return nil, err
		}
		b = b[:len(b)+k]
	}
	return b, nil
}

// headers reads the optional xl save-file header and the libxl header.
func (s *splitter) headers() error {
	var h [libxlHeaderSize]byte
	if err := s.read(h[:], "libxl header"); err != nil {
		return err
	}
	if bytes.Equal(h[:], xlMagic[:libxlHeaderSize]) {
		save := make([]byte, xlHeaderSize)
		copy(save, h[:])
		if err := s.read(save[libxlHeaderSize:], "xl save-file header"); err != nil {
			return err
		}
		if !bytes.Equal(save[:len(xlMagic)], xlMagic[:]) {
			return fmt.Errorf("%w: not an xl save-file header", ErrBadHeader)
		}
		if order := binary.LittleEndian.Uint32(save[32:]); order != xlByteOrder {
			return fmt.Errorf("%w: xl save file in big-endian or unknown byte order (%#x)", ErrUnsupported, order)
		}
		n := uint64(binary.LittleEndian.Uint32(save[44:]))
		if n > uint64(s.lim.MaxRecord) {
			return fmt.Errorf("%w: xl save file has %d bytes of optional data, limit %d", ErrTooLarge, n, s.lim.MaxRecord)
		}
		opt, err := s.readVerbatim(n, "xl save-file optional data")
		if err != nil {
			return err
		}
		s.d.SaveFile = append(save, opt...)
		if err := s.read(h[:], "libxl header"); err != nil {
			return err
		}
	}
	if ident := binary.BigEndian.Uint64(h[:]); ident != libxlIdent {
		return fmt.Errorf("%w: libxl ident %#016x, want %#016x", ErrBadHeader, ident, uint64(libxlIdent))
	}
	if v := binary.BigEndian.Uint32(h[8:]); v != libxlVersion {
		return fmt.Errorf("%w: libxl stream version %d, want %d", ErrBadHeader, v, libxlVersion)
	}
	s.d.LibxlOptions = binary.BigEndian.Uint32(h[12:])
	if s.d.LibxlOptions&libxlOptBigEndian != 0 {
		return fmt.Errorf("%w: big-endian libxl stream", ErrUnsupported)
	}
	return nil
}

// libxcHeaders reads the image and domain headers after LIBXC_CONTEXT.
func (s *splitter) libxcHeaders() error {
	var b [imageHeaderSize + domainHeaderSize]byte
	if err := s.read(b[:], "libxc headers"); err != nil {
		return err
	}
	if m := binary.BigEndian.Uint64(b[0:]); m != libxcMarker {
		return fmt.Errorf("%w: libxc marker %#016x", ErrBadHeader, m)
	}
	if id := binary.BigEndian.Uint32(b[8:]); id != libxcID {
		return fmt.Errorf("%w: libxc id %#08x, want %#08x", ErrBadHeader, id, libxcID)
	}
	dh := b[imageHeaderSize:]
	h := LibxcHeader{
		Version:   binary.BigEndian.Uint32(b[12:]),
		Options:   binary.BigEndian.Uint16(b[16:]),
		GuestType: GuestType(binary.LittleEndian.Uint32(dh[0:])),
		PageShift: binary.LittleEndian.Uint16(dh[4:]),
		XenMajor:  binary.LittleEndian.Uint32(dh[8:]),
		XenMinor:  binary.LittleEndian.Uint32(dh[12:]),
	}
	if err := h.check(); err != nil {
		return err
	}
	// Xen writes the reserved fields as zeros and a descriptor implies them.
	if !bytes.Equal(b[18:24], zeroPage[:6]) || !bytes.Equal(dh[6:8], zeroPage[:2]) {
		return fmt.Errorf("%w: reserved libxc header fields are not zero", ErrBadHeader)
	}
	s.d.Libxc = h
	s.ord.libxcVersion = h.Version
	return nil
}

// record reads one record of whichever layer the stream is in.
func (s *splitter) record() (err error) {
	layer := LayerLibxl
	if s.ord.stage == inLibxc {
		layer = LayerLibxc
	}
	at := s.off
	var h [8]byte
	if err := s.read(h[:], layer.String()+" record header"); err != nil {
		return err
	}
	rec := Record{Layer: layer, Type: binary.LittleEndian.Uint32(h[0:])}
	n := uint64(binary.LittleEndian.Uint32(h[4:]))
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w, in the %s %s record at offset %d", err, layer, layer.RecordName(rec.Type), at)
		}
	}()
	if n > uint64(s.lim.MaxRecord) {
		return fmt.Errorf("%w: a %d-byte body, limit %d", ErrTooLarge, n, s.lim.MaxRecord)
	}
	if err := s.ord.next(layer, rec.Type, n); err != nil {
		return err
	}
	if rec.isPageData() {
		if rec.Pages, err = s.pageData(n); err != nil {
			return err
		}
	} else if n > 0 {
		if rec.Body, err = s.readVerbatim(n, "body"); err != nil {
			return err
		}
	}
	pad := s.page[:padding(n)]
	if err := s.read(pad, "padding"); err != nil {
		return err
	}
	if !bytes.Equal(pad, zeroPage[:len(pad)]) {
		return fmt.Errorf("%w: padding is not zero", ErrBadRecord)
	}
	s.d.Records = append(s.d.Records, rec)
	return nil
}

// pageData reads the n-byte body of a PAGE_DATA record: its entries into
// runs, its payloads into the sink.
func (s *splitter) pageData(n uint64) ([]PageRun, error) {
	if n < pageDataHeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, too short for a PAGE_DATA header", ErrBadRecord, n)
	}
	var h [pageDataHeaderSize]byte
	if err := s.read(h[:], "PAGE_DATA header"); err != nil {
		return nil, err
	}
	count := uint64(binary.LittleEndian.Uint32(h[0:]))
	switch {
	case count == 0:
		return nil, fmt.Errorf("%w: PAGE_DATA without entries", ErrBadRecord)
	case binary.LittleEndian.Uint32(h[4:]) != 0:
		return nil, fmt.Errorf("%w: reserved PAGE_DATA field is not zero", ErrBadRecord)
	case count*pfnEntrySize > n-pageDataHeaderSize:
		return nil, fmt.Errorf("%w: %d bytes, too short for %d entries", ErrBadRecord, n, count)
	case count > s.lim.MaxPages-s.entries:
		return nil, fmt.Errorf("%w: more than %d page entries", ErrTooLarge, s.lim.MaxPages)
	}
	s.entries += count

	// The entries, a page's worth at a time, into runs of one type.
	var typed []PageRun
	var withData uint64
	for left := count; left > 0; {
		k := min(left, PageSize/pfnEntrySize)
		b := s.page[:k*pfnEntrySize]
		if err := s.read(b, "PAGE_DATA entries"); err != nil {
			return nil, err
		}
		for i := 0; i < len(b); i += pfnEntrySize {
			e := binary.LittleEndian.Uint64(b[i:])
			pfn, typ := e&PFNMask, uint8(e>>pfnTypeShift)
			switch {
			case e&pfnReservedMask != 0:
				return nil, fmt.Errorf("%w: reserved bits set in entry %#016x", ErrBadRecord, e)
			case !PageTypeKnown(typ):
				return nil, fmt.Errorf("%w: PFN %#x has unknown page type %#x", ErrBadRecord, pfn, typ)
			case pfn > s.lim.MaxPFN:
				return nil, fmt.Errorf("%w: PFN %#x, limit %#x", ErrTooLarge, pfn, s.lim.MaxPFN)
			}
			if PageTypeHasData(typ) {
				withData++
			}
			typed = appendRun(typed, PageRun{PFN: pfn, Count: 1, Type: typ})
		}
		left -= k
	}
	if want := pageDataHeaderSize + count*pfnEntrySize + withData*PageSize; n != want {
		return nil, fmt.Errorf("%w: %d bytes, but %d entries with %d payloads make %d", ErrBadRecord, n, count, withData, want)
	}

	// The payloads, one page at a time, splitting runs where zero pages
	// start and end.
	runs := make([]PageRun, 0, len(typed))
	for _, r := range typed {
		if !PageTypeHasData(r.Type) {
			runs = appendRun(runs, r)
			continue
		}
		for pfn := r.PFN; pfn < r.PFN+uint64(r.Count); pfn++ {
			if !s.sent.add(pfn) {
				return nil, fmt.Errorf("%w: PFN %#x", ErrDuplicatePage, pfn)
			}
			if err := s.read(s.page[:], "page payload"); err != nil {
				return nil, err
			}
			zero := bytes.Equal(s.page[:], zeroPage[:])
			if !zero && s.sink != nil {
				if err := s.sink.PutPage(pfn, s.page[:]); err != nil {
					return nil, fmt.Errorf("xcstream: page sink, PFN %#x: %w", pfn, err)
				}
			}
			runs = appendRun(runs, PageRun{PFN: pfn, Count: 1, Type: r.Type, Zero: zero})
		}
	}
	return runs, nil
}

// appendRun appends r to runs, extending the last run if r continues it.
func appendRun(runs []PageRun, r PageRun) []PageRun {
	if n := len(runs); n > 0 {
		last := &runs[n-1]
		if last.Type == r.Type && last.Zero == r.Zero && last.PFN+uint64(last.Count) == r.PFN &&
			uint64(last.Count)+uint64(r.Count) <= maxPageDataCount {
			last.Count += r.Count
			return runs
		}
	}
	return append(runs, r)
}

// pfnSet is a sparse bitmap of PFNs in chunks of 32768 (a 4 KiB chunk
// covers 128 MiB of guest memory).
type pfnSet map[uint64]*[512]uint64

// add adds pfn and reports whether it was absent.
func (s pfnSet) add(pfn uint64) bool {
	c := s[pfn>>15]
	if c == nil {
		c = new([512]uint64)
		s[pfn>>15] = c
	}
	w, bit := (pfn>>6)&511, uint64(1)<<(pfn&63)
	if c[w]&bit != 0 {
		return false
	}
	c[w] |= bit
	return true
}
