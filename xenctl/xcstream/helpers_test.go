package xcstream

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
)

// image builds a save image the way xl, libxl and libxc write one. It
// shares no code with the package: every constant is spelled out from
// docs/specs/lib{xl,xc}-migration-stream.pandoc and the stream format
// headers, so the tests check the package against the spec rather than
// against itself. It also records what Split should report.
type image struct {
	buf     bytes.Buffer
	stored  memPages  // the payloads the sink must receive
	refs    []PageRef // every PAGE_DATA entry, in order
	data    uint64    // entries with a payload
	zero    uint64    // of which all zeros
	maxPFN  uint64
	maxBody uint64         // the longest record body
	meta    uint64         // verbatim bytes: save-file optional data and non-PAGE_DATA bodies
	pageAt  map[uint64]int // stream offset of each payload
}

func newImage() *image { return &image{stored: memPages{}, pageAt: map[uint64]int{}} }

func (im *image) bytes() []byte { return bytes.Clone(im.buf.Bytes()) }

func (im *image) raw(b ...byte) { im.buf.Write(b) }

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// xlHeader writes xl's save-file header (tools/xl/xl.h) and the domain
// configuration as its optional data.
func (im *image) xlHeader(config string) {
	opt := append(le32(uint32(len(config)+1)), config...)
	opt = append(opt, 0)
	im.raw([]byte("Xen saved domain, xl format\n \x00 \r")...)
	im.raw(le32(0x01020304)...)       // byte order
	im.raw(le32(1<<1 | 1<<0)...)      // mandatory flags: STREAMv2 | JSON
	im.raw(le32(0)...)                // optional flags
	im.raw(le32(uint32(len(opt)))...) // optional data length
	im.raw(opt...)
	im.meta += uint64(len(opt))
}

// libxlHeader writes the libxl stream header: big endian always.
func (im *image) libxlHeader(options uint32) {
	im.raw([]byte("LibxlFmt")...) // 0x4c6962786c466d74
	im.raw(be32(2)...)
	im.raw(be32(options)...)
}

// record writes a record of either layer: type, length, body, zeros to a
// multiple of 8.
func (im *image) record(typ uint32, body []byte) {
	im.raw(le32(typ)...)
	im.raw(le32(uint32(len(body)))...)
	im.raw(body...)
	im.raw(make([]byte, (8-len(body)%8)%8)...)
	im.meta += uint64(len(body))
	im.maxBody = max(im.maxBody, uint64(len(body)))
}

// libxcHeaders writes the image header (big endian) and the domain header
// (little endian) that follow LIBXC_CONTEXT.
func (im *image) libxcHeaders(version, guest uint32, shift uint16) {
	im.raw(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff) // marker
	im.raw([]byte("XENF")...)                              // id 0x58454E46
	im.raw(be32(version)...)
	im.raw(0, 0, 0, 0, 0, 0, 0, 0) // options (little endian), reserved
	im.raw(le32(guest)...)
	im.raw(byte(shift), byte(shift>>8), 0, 0)
	im.raw(le32(4)...)  // xen_major
	im.raw(le32(17)...) // xen_minor
}

// entry is one PAGE_DATA entry; a page of a data-carrying type gets the
// payload of its kind.
type entry struct {
	pfn  uint64
	typ  uint8
	zero bool
}

func hasData(typ uint8) bool { return typ <= 4 || (typ >= 9 && typ <= 12) }

// payload is a page of pseudo-random bytes that depend on the PFN only;
// never all zeros.
func payload(pfn uint64) []byte {
	p := make([]byte, 4096)
	r := rand.New(rand.NewPCG(pfn, 0x5eed))
	for i := 0; i < len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], r.Uint64())
	}
	p[0] |= 1
	return p
}

// pageData writes a PAGE_DATA record: count, reserved, the entries with
// the type in bits 63-60, then a payload for each data-carrying entry.
func (im *image) pageData(es ...entry) {
	var body []byte
	body = append(body, le32(uint32(len(es)))...)
	body = append(body, le32(0)...)
	for _, e := range es {
		body = append(body, le64(uint64(e.typ)<<60|e.pfn)...)
	}
	start := im.buf.Len() + 8
	for _, e := range es {
		im.refs = append(im.refs, PageRef{PFN: e.pfn, Type: e.typ, Zero: e.zero})
		im.maxPFN = max(im.maxPFN, e.pfn)
		if !hasData(e.typ) {
			continue
		}
		im.data++
		im.pageAt[e.pfn] = start + len(body)
		if e.zero {
			im.zero++
			body = append(body, make([]byte, 4096)...)
			continue
		}
		p := payload(e.pfn)
		im.stored[e.pfn] = p
		body = append(body, p...)
	}
	im.raw(le32(1)...)
	im.raw(le32(uint32(len(body)))...)
	im.raw(body...)
	im.maxBody = max(im.maxBody, uint64(len(body)))
}

// Record types used by the tests, spelled out.
const (
	tEnd          = 0x00
	tLibxcContext = 0x01 // libxl
	tEmuXenstore  = 0x02 // libxl
	tEmuContext   = 0x03 // libxl
	tCheckpointE  = 0x04 // libxl CHECKPOINT_END
	tPVInfo       = 0x02 // libxc
	tP2MFrames    = 0x03
	tVCPUBasic    = 0x04
	tVCPUExt      = 0x05
	tSharedInfo   = 0x07
	tTSCInfo      = 0x08
	tHVMContext   = 0x09
	tHVMParams    = 0x0A
	tCheckpoint   = 0x0E
	tStaticEnd    = 0x10
	tCPUIDPolicy  = 0x11
	tMSRPolicy    = 0x12
)

func blob(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func emulator(id, index uint32, data []byte) []byte {
	return append(append(le32(id), le32(index)...), data...)
}

// start writes a bare libxl header, LIBXC_CONTEXT, v3 HVM libxc headers and
// STATIC_DATA_END: the prologue of the small images.
func (im *image) start() {
	im.libxlHeader(0)
	im.record(tLibxcContext, nil)
	im.libxcHeaders(3, 2, 12)
	im.record(tStaticEnd, nil)
}

// finish writes the libxc END and the libxl END.
func (im *image) finish() {
	im.record(tEnd, nil)
	im.record(tEnd, nil)
}

// hvmImage is what `xl save` writes for an HVM guest (Xen 4.17: libxc v3),
// with every kind of page entry, odd-length bodies and optional records of
// unknown types in both layers.
func hvmImage() *image {
	im := newImage()
	im.xlHeader(`{"c_info":{"type":"hvm","name":"parent"},"b_info":{"max_memkb":1048576}}`)
	im.libxlHeader(0)
	im.record(tLibxcContext, nil)
	im.libxcHeaders(3, 2, 12)
	im.record(tCPUIDPolicy, blob(48, 1))
	im.record(tMSRPolicy, blob(16, 2))
	im.record(tStaticEnd, nil)
	var es []entry
	for pfn := uint64(0); pfn < 10; pfn++ {
		es = append(es, entry{pfn: pfn, typ: 0x0, zero: pfn == 2 || pfn == 3 || pfn == 7})
	}
	es = append(es, entry{10, 0xF, false}, entry{11, 0xE, false}, entry{12, 0xD, false})
	es = append(es, entry{13, 0x0, false}, entry{14, 0x0, true}, entry{15, 0x0, false})
	im.pageData(es...)
	es = nil
	for pfn := uint64(0x100); pfn < 0x110; pfn++ {
		es = append(es, entry{pfn: pfn, zero: true})
	}
	im.pageData(es...)
	im.pageData(entry{0x2000, 0xF, false}, entry{0x2001, 0x0, false}, entry{0xFFFFF, 0x0, false},
		entry{0x20, 0xF, false}, entry{0x10, 0xF, false}, entry{0x10, 0xF, false})
	im.record(tTSCInfo, append(append(le32(1), le32(2_000_000)...), blob(16, 3)...))
	params := append(le32(2), le32(0)...)
	params = append(append(params, le64(2)...), le64(0xFEFFF)...)  // HVM_PARAM_STORE_PFN
	params = append(append(params, le64(12)...), le64(0xFEFFE)...) // HVM_PARAM_IDENT_PT
	im.record(tHVMParams, params)
	im.record(tHVMContext, blob(1234, 4))
	im.record(0x80000042, blob(5, 5))
	im.record(tEnd, nil)
	im.record(tEmuXenstore, emulator(2, 0, []byte("physmap/1/start_addr\x00f0000000\x00")))
	im.record(tEmuContext, emulator(2, 0, append([]byte("QEVM"), blob(1001, 6)...)))
	im.record(0x80000007, blob(3, 7))
	im.record(tEnd, nil)
	return im
}

// pvImage is a bare libxl stream around a libxc v2 PV stream, which has
// no STATIC_DATA_END, with page tables of every level, pinned or not.
func pvImage() *image {
	im := newImage()
	im.libxlHeader(0)
	im.record(tLibxcContext, nil)
	im.libxcHeaders(2, 1, 12)
	im.record(tPVInfo, []byte{8, 4, 0, 0, 0, 0, 0, 0})
	im.record(tP2MFrames, append(append(le32(0), le32(1023)...), le64(0x30)...))
	var es []entry
	for i, typ := range []uint8{0xC, 0x3, 0x2, 0x1, 0x9, 0xA, 0xB, 0x4, 0x0} {
		es = append(es, entry{pfn: 0x10 + uint64(i), typ: typ, zero: typ == 0})
	}
	im.pageData(es...)
	im.pageData(entry{0x30, 0x0, false}, entry{0x31, 0xF, false})
	im.record(tTSCInfo, blob(24, 8))
	im.record(tSharedInfo, blob(4096, 9))
	im.record(tVCPUBasic, append(le64(0), blob(100, 10)...))
	im.record(tVCPUExt, nil) // errata: 4.6-4.8 wrote some records empty
	im.record(tEnd, nil)
	im.record(tEnd, nil)
	return im
}

// tinyImage is the smallest useful image: one stored page, one zero page.
func tinyImage() *image {
	im := newImage()
	im.start()
	im.pageData(entry{1, 0x0, false}, entry{2, 0x0, true}, entry{3, 0xF, false})
	im.record(tHVMContext, blob(13, 11))
	im.finish()
	return im
}

// bigImage is an HVM image of n pages sent in batches of 1024, as libxc's
// MAX_BATCH_SIZE has it, every fifth page zero.
func bigImage(n uint64) *image {
	im := newImage()
	im.start()
	for base := uint64(0); base < n; base += 1024 {
		var es []entry
		for pfn := base; pfn < min(base+1024, n); pfn++ {
			es = append(es, entry{pfn: pfn, zero: pfn%5 == 0})
		}
		im.pageData(es...)
	}
	im.record(tHVMContext, blob(4000, 12))
	im.finish()
	return im
}

// memPages is an in-memory PageSink and PageSource.
type memPages map[uint64][]byte

func (m memPages) PutPage(pfn uint64, data []byte) error {
	if _, dup := m[pfn]; dup {
		return fmt.Errorf("PutPage(%#x) twice", pfn)
	}
	if len(data) != PageSize {
		return fmt.Errorf("PutPage(%#x): %d bytes", pfn, len(data))
	}
	m[pfn] = bytes.Clone(data)
	return nil
}

func (m memPages) Page(pfn uint64, dst []byte) error {
	p, ok := m[pfn]
	if !ok {
		return fmt.Errorf("no page %#x", pfn)
	}
	copy(dst, p)
	return nil
}

// runPagesSource is memPages as a PageRunSource that records the runs it
// was asked for and refuses single pages.
type runPagesSource struct {
	pages memPages
	runs  []uint64 // the length of each run asked for
}

func (r *runPagesSource) Page(pfn uint64, dst []byte) error {
	return fmt.Errorf("Page(%#x) of a PageRunSource", pfn)
}

func (r *runPagesSource) PageRun(pfn uint64, dst []byte) error {
	if len(dst) == 0 || len(dst)%PageSize != 0 {
		return fmt.Errorf("PageRun(%#x) into %d bytes", pfn, len(dst))
	}
	n := uint64(len(dst) / PageSize)
	for i := range n {
		if err := r.pages.Page(pfn+i, dst[i*PageSize:(i+1)*PageSize]); err != nil {
			return err
		}
	}
	r.runs = append(r.runs, n)
	return nil
}

// patterned is a PageSource of pages that are never all zeros.
type patterned struct{}

func (patterned) Page(pfn uint64, dst []byte) error {
	copy(dst, payload(pfn))
	return nil
}

func sum(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b)) }

// reseal replaces the last 32 bytes of a descriptor with the sha256 of the
// rest, so a test can reach the checks behind the checksum.
func reseal(b []byte) []byte {
	body := bytes.Clone(b[:max(0, len(b)-sha256.Size)])
	s := sha256.Sum256(body)
	return append(body, s[:]...)
}

// sentinels are the errors every Split error must wrap one of.
var sentinels = []error{ErrBadHeader, ErrTruncated, ErrTooLarge, ErrBadRecord, ErrUnsupported,
	ErrDuplicatePage, ErrTrailingData}
