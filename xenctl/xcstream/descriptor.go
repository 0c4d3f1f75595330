package xcstream

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"iter"
	"sort"
)

// Descriptor is a save image without its page payloads: every header and
// record in stream order, PAGE_DATA records reduced to their PFN entries.
type Descriptor struct {
	// SaveFile is xl's save-file header with its optional data (the
	// domain's configuration) that precedes the libxl stream in a file
	// written by `xl save`; nil for a bare libxl stream.
	SaveFile []byte
	// LibxlOptions are the libxl header's options (bit 1: converted from
	// the legacy format; bit 0, big endian, is never set).
	LibxlOptions uint32
	// Libxc holds the libxc image and domain headers that follow the
	// LIBXC_CONTEXT record.
	Libxc LibxcHeader
	// Records of both layers in stream order: libxl records, LIBXC_CONTEXT,
	// the libxc records up to and including the libxc END, then libxl
	// records up to and including the libxl END.
	Records []Record
}

// LibxcHeader is what the libxc image and domain headers say; their
// markers and reserved fields are implied.
type LibxcHeader struct {
	Version   uint32 // 2 or 3
	Options   uint16 // image header options
	GuestType GuestType
	PageShift uint16 // 12
	XenMajor  uint32 // of the saving hypervisor; 0 for a converted legacy image
	XenMinor  uint32
}

// Record is one record of either layer.
type Record struct {
	Layer Layer
	Type  uint32
	// Body is the record's body without padding; nil when empty and for
	// PAGE_DATA, whose body is implied by Pages and the page payloads.
	Body []byte
	// Pages are a PAGE_DATA record's PFN entries in order, as runs.
	Pages []PageRun
}

// PageRun is Count PAGE_DATA entries for consecutive PFNs from PFN, all of
// one type and, if the type carries data, all zero or all not.
type PageRun struct {
	PFN   uint64
	Count uint32
	Type  uint8
	// Zero: the payloads are all zeros; they were not given to the sink and
	// are not asked of the source.
	Zero bool
}

// PageRef is one PAGE_DATA entry.
type PageRef struct {
	PFN  uint64
	Type uint8
	Zero bool // the payload is all zeros (never stored)
}

// HasData reports whether the entry has a payload in the stream.
func (p PageRef) HasData() bool { return PageTypeHasData(p.Type) }

// Stored reports whether the payload lives with the PageSink/PageSource
// rather than being implied: it has data and is not all zeros.
func (p PageRef) Stored() bool { return p.HasData() && !p.Zero }

// Pages yields every PAGE_DATA entry in stream order.
func (d *Descriptor) Pages() iter.Seq[PageRef] {
	return func(yield func(PageRef) bool) {
		for _, rec := range d.Records {
			for _, r := range rec.Pages {
				for i := uint64(0); i < uint64(r.Count); i++ {
					if !yield(PageRef{PFN: r.PFN + i, Type: r.Type, Zero: r.Zero}) {
						return
					}
				}
			}
		}
	}
}

// Info summarises a descriptor.
type Info struct {
	SaveFile     bool // the image starts with xl's save-file header
	LibxcVersion uint32
	GuestType    GuestType
	XenMajor     uint32
	XenMinor     uint32
	PageEntries  uint64 // PFN entries over all PAGE_DATA records
	DataPages    uint64 // entries with a payload
	ZeroPages    uint64 // of which all zeros: never stored
	MaxPFN       uint64 // largest PFN of any entry
	// LibxlRecords and LibxcRecords count the records of each type.
	LibxlRecords map[uint32]int
	LibxcRecords map[uint32]int
	// StreamSize is the length in bytes of the image Rebuild writes.
	StreamSize uint64
}

// StoredPages is the number of payloads that live outside the descriptor.
func (i Info) StoredPages() uint64 { return i.DataPages - i.ZeroPages }

// Info summarises the descriptor.
func (d *Descriptor) Info() Info {
	in := Info{
		SaveFile:     len(d.SaveFile) > 0,
		LibxcVersion: d.Libxc.Version,
		GuestType:    d.Libxc.GuestType,
		XenMajor:     d.Libxc.XenMajor,
		XenMinor:     d.Libxc.XenMinor,
		LibxlRecords: map[uint32]int{},
		LibxcRecords: map[uint32]int{},
		StreamSize:   uint64(len(d.SaveFile)) + libxlHeaderSize,
	}
	for _, rec := range d.Records {
		if rec.Layer == LayerLibxl {
			in.LibxlRecords[rec.Type]++
		} else {
			in.LibxcRecords[rec.Type]++
		}
		n := rec.bodyLength()
		in.StreamSize += 8 + n + padding(n)
		if rec.Layer == LayerLibxl && rec.Type == LibxlLibxcContext {
			in.StreamSize += imageHeaderSize + domainHeaderSize
		}
		for _, r := range rec.Pages {
			in.PageEntries += uint64(r.Count)
			if PageTypeHasData(r.Type) {
				in.DataPages += uint64(r.Count)
				if r.Zero {
					in.ZeroPages += uint64(r.Count)
				}
			}
			if last := r.PFN + uint64(r.Count) - 1; r.Count > 0 && last > in.MaxPFN {
				in.MaxPFN = last
			}
		}
	}
	return in
}

// isPageData reports whether the record is a libxc PAGE_DATA record.
func (r *Record) isPageData() bool { return r.Layer == LayerLibxc && r.Type == LibxcPageData }

// bodyLength is the length of the record's body in the stream.
func (r *Record) bodyLength() uint64 {
	if !r.isPageData() {
		return uint64(len(r.Body))
	}
	var entries, data uint64
	for _, p := range r.Pages {
		entries += uint64(p.Count)
		if PageTypeHasData(p.Type) {
			data += uint64(p.Count)
		}
	}
	return pageDataHeaderSize + entries*pfnEntrySize + data*PageSize
}

// order checks the record order both layers require, one record at a time:
// Split applies it as records arrive, validate to a whole descriptor.
type order struct {
	libxcVersion uint32
	stage        int // one of the stage constants
	staticEnd    bool
}

const (
	beforeLibxc = iota
	inLibxc
	afterLibxc
	ended
)

// next admits a record of the layer and type whose body is n bytes long.
func (o *order) next(layer Layer, typ uint32, n uint64) error {
	name := layer.RecordName(typ)
	if o.stage == ended {
		return fmt.Errorf("%w: %s record %s after the libxl END", ErrBadRecord, layer, name)
	}
	empty := func() error {
		if n != 0 {
			return fmt.Errorf("%w: %s %s has a %d-byte body, want none", ErrBadRecord, layer, name, n)
		}
		return nil
	}
	switch layer {
	case LayerLibxl:
		if o.stage == inLibxc {
			return fmt.Errorf("%w: libxl record %s inside the libxc stream", ErrBadRecord, name)
		}
		switch typ {
		case LibxlEnd:
			if o.stage != afterLibxc {
				return fmt.Errorf("%w: libxl END without a libxc stream", ErrBadRecord)
			}
			o.stage = ended
			return empty()
		case LibxlLibxcContext:
			if o.stage != beforeLibxc {
				return fmt.Errorf("%w: a second LIBXC_CONTEXT", ErrBadRecord)
			}
			o.stage = inLibxc
			return empty()
		case LibxlCheckpointEnd, LibxlCheckpointState:
			return fmt.Errorf("%w: checkpointed stream (libxl %s)", ErrUnsupported, name)
		case LibxlEmulatorXenstoreData, LibxlEmulatorContext:
			if n < emulatorHeaderSize {
				return fmt.Errorf("%w: libxl %s of %d bytes has no emulator header", ErrBadRecord, name, n)
			}
		}
		return nil
	case LayerLibxc:
		if o.stage != inLibxc {
			return fmt.Errorf("%w: libxc record %s outside the libxc stream", ErrBadRecord, name)
		}
		switch typ {
		case LibxcEnd:
			o.stage = afterLibxc
			return empty()
		case LibxcCheckpoint:
			return fmt.Errorf("%w: checkpointed stream (libxc CHECKPOINT)", ErrUnsupported)
		case LibxcStaticDataEnd:
			if o.staticEnd {
				return fmt.Errorf("%w: a second STATIC_DATA_END", ErrBadRecord)
			}
			o.staticEnd = true
			return empty()
		case LibxcVerify:
			return empty()
		case LibxcPageData:
			// v2 streams have no STATIC_DATA_END: the restorer infers it.
			if o.libxcVersion >= 3 && !o.staticEnd {
				return fmt.Errorf("%w: PAGE_DATA before STATIC_DATA_END in a v3 stream", ErrBadRecord)
			}
		}
		return nil
	}
	return fmt.Errorf("%w: record of unknown layer %d", ErrBadRecord, layer)
}

// done checks that the stream ended where it should.
func (o *order) done() error {
	if o.stage != ended {
		return fmt.Errorf("%w: no libxl END", ErrBadRecord)
	}
	return nil
}

// checkSaveFile checks xl's save-file header and the length of its
// optional data.
func checkSaveFile(b []byte) error {
	if len(b) < xlHeaderSize || !bytes.Equal(b[:len(xlMagic)], xlMagic[:]) {
		return fmt.Errorf("%w: not an xl save-file header", ErrBadHeader)
	}
	if order := binary.LittleEndian.Uint32(b[32:]); order != xlByteOrder {
		return fmt.Errorf("%w: xl save file in big-endian or unknown byte order (%#x)", ErrUnsupported, order)
	}
	if n := binary.LittleEndian.Uint32(b[44:]); uint64(n) != uint64(len(b)-xlHeaderSize) {
		return fmt.Errorf("%w: xl save file has %d bytes of optional data, header says %d", ErrBadHeader, len(b)-xlHeaderSize, n)
	}
	return nil
}

func (h LibxcHeader) check() error {
	if h.Version != 2 && h.Version != 3 {
		return fmt.Errorf("%w: libxc stream version %d, want 2 or 3", ErrBadHeader, h.Version)
	}
	if h.Options&libxcOptBigEndian != 0 {
		return fmt.Errorf("%w: big-endian libxc stream", ErrUnsupported)
	}
	if h.GuestType != GuestPV && h.GuestType != GuestHVM {
		return fmt.Errorf("%w: %s", ErrBadHeader, h.GuestType)
	}
	if h.PageShift != pageShift {
		return fmt.Errorf("%w: page shift %d, want %d", ErrUnsupported, h.PageShift, pageShift)
	}
	return nil
}

// checkRuns checks one PAGE_DATA record's entries and returns how many
// there are.
func checkRuns(runs []PageRun) (uint64, error) {
	if len(runs) == 0 {
		return 0, fmt.Errorf("%w: PAGE_DATA without entries", ErrBadRecord)
	}
	var count uint64
	for i, r := range runs {
		switch {
		case r.Count == 0:
			return 0, fmt.Errorf("%w: PAGE_DATA run %d is empty", ErrBadRecord, i)
		case !PageTypeKnown(r.Type):
			return 0, fmt.Errorf("%w: page type %#x", ErrBadRecord, r.Type)
		case r.Zero && !PageTypeHasData(r.Type):
			return 0, fmt.Errorf("%w: zero flag on page type %#x, which carries no data", ErrBadRecord, r.Type)
		case r.PFN > PFNMask || uint64(r.Count)-1 > PFNMask-r.PFN:
			return 0, fmt.Errorf("%w: PFNs %#x+%d beyond %#x", ErrBadRecord, r.PFN, r.Count, uint64(PFNMask))
		}
		count += uint64(r.Count)
	}
	if count > maxPageDataCount {
		return 0, fmt.Errorf("%w: PAGE_DATA of %d entries", ErrTooLarge, count)
	}
	return count, nil
}

// validate checks that the descriptor describes an image Split accepts
// with the widest limits.
func (d *Descriptor) validate() error {
	if len(d.SaveFile) > 0 {
		if err := checkSaveFile(d.SaveFile); err != nil {
			return err
		}
	}
	if d.LibxlOptions&libxlOptBigEndian != 0 {
		return fmt.Errorf("%w: big-endian libxl stream", ErrUnsupported)
	}
	if err := d.Libxc.check(); err != nil {
		return err
	}
	o := order{libxcVersion: d.Libxc.Version}
	var data []PageRun
	var entries uint64
	for i := range d.Records {
		rec := &d.Records[i]
		if rec.isPageData() {
			if rec.Body != nil {
				return fmt.Errorf("%w: PAGE_DATA record %d has a verbatim body", ErrBadRecord, i)
			}
			n, err := checkRuns(rec.Pages)
			if err != nil {
				return fmt.Errorf("record %d: %w", i, err)
			}
			if entries += n; entries > MaxPagesCeiling {
				return fmt.Errorf("%w: more than %d page entries", ErrTooLarge, uint64(MaxPagesCeiling))
			}
			for _, r := range rec.Pages {
				if PageTypeHasData(r.Type) {
					data = append(data, r)
				}
			}
		} else if rec.Pages != nil {
			return fmt.Errorf("%w: %s %s record %d has page entries", ErrBadRecord, rec.Layer, rec.Layer.RecordName(rec.Type), i)
		}
		n := rec.bodyLength()
		if n > RecordLengthMax {
			return fmt.Errorf("%w: record %d has a %d-byte body", ErrTooLarge, i, n)
		}
		if err := o.next(rec.Layer, rec.Type, n); err != nil {
			return fmt.Errorf("record %d: %w", i, err)
		}
	}
	if err := o.done(); err != nil {
		return err
	}
	// A PageSource has one payload per PFN, so no PFN may carry data twice.
	sort.Slice(data, func(i, j int) bool { return data[i].PFN < data[j].PFN })
	for i := 1; i < len(data); i++ {
		if prev := data[i-1]; data[i].PFN-prev.PFN < uint64(prev.Count) {
			return fmt.Errorf("%w: PFN %#x", ErrDuplicatePage, data[i].PFN)
		}
	}
	return nil
}
