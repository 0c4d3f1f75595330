package xcstream

import (
	"errors"
	"fmt"
)

// Constants of the two stream formats, as in Xen's
// tools/libs/light/libxl_sr_stream_format.h and
// tools/libs/guest/xg_sr_stream_format.h.

// PageSize is the size of a guest page and of every PAGE_DATA payload.
// Xen's x86 restore refuses any other page size.
const PageSize = 4096

const pageShift = 12

// RecordLengthMax is libxc's REC_LENGTH_MAX: its restore refuses a record
// whose body is longer. Split applies it to the records of both layers.
const RecordLengthMax = 128 << 20

// Records of both layers are padded with zeros to a multiple of recordAlign.
const recordAlign = 8

// xl's save-file header, from tools/xl/xl.h: 32 bytes of magic, then four
// uint32 in the saving host's byte order, then optional_data_len bytes
// (the domain configuration).
var xlMagic = [32]byte([]byte("Xen saved domain, xl format\n \x00 \r"))

const (
	xlHeaderSize = 48
	xlByteOrder  = 0x01020304
)

// The libxl stream header, big endian whatever its options say.
const (
	libxlHeaderSize   = 16
	libxlIdent        = 0x4c6962786c466d74 // "LibxlFmt"
	libxlVersion      = 2
	libxlOptBigEndian = 1 << 0
)

// Libxl record types.
const (
	LibxlEnd                  uint32 = 0x00000000
	LibxlLibxcContext         uint32 = 0x00000001
	LibxlEmulatorXenstoreData uint32 = 0x00000002
	LibxlEmulatorContext      uint32 = 0x00000003
	LibxlCheckpointEnd        uint32 = 0x00000004
	LibxlCheckpointState      uint32 = 0x00000005
)

// The body of an EMULATOR_* record starts with emulator id and index.
const emulatorHeaderSize = 8

// The libxc image header is big endian; the domain header and all libxc
// records are in the stream's byte order, which is little endian (Xen
// refuses big-endian streams).
const (
	imageHeaderSize   = 24 // marker u64, id u32, version u32, options u16, reserved u16 + u32
	domainHeaderSize  = 16 // type u32, page_shift u16, reserved u16, xen_major u32, xen_minor u32
	libxcMarker       = 0xFFFFFFFFFFFFFFFF
	libxcID           = 0x58454E46 // "XENF"
	libxcOptBigEndian = 1 << 0
)

// Libxc record types.
const (
	LibxcEnd                    uint32 = 0x00000000
	LibxcPageData               uint32 = 0x00000001
	LibxcX86PVInfo              uint32 = 0x00000002
	LibxcX86PVP2MFrames         uint32 = 0x00000003
	LibxcX86PVVCPUBasic         uint32 = 0x00000004
	LibxcX86PVVCPUExtended      uint32 = 0x00000005
	LibxcX86PVVCPUXsave         uint32 = 0x00000006
	LibxcSharedInfo             uint32 = 0x00000007
	LibxcX86TSCInfo             uint32 = 0x00000008
	LibxcHVMContext             uint32 = 0x00000009
	LibxcHVMParams              uint32 = 0x0000000A
	LibxcToolstack              uint32 = 0x0000000B
	LibxcX86PVVCPUMSRs          uint32 = 0x0000000C
	LibxcVerify                 uint32 = 0x0000000D
	LibxcCheckpoint             uint32 = 0x0000000E
	LibxcCheckpointDirtyPFNList uint32 = 0x0000000F
	LibxcStaticDataEnd          uint32 = 0x00000010
	LibxcX86CPUIDPolicy         uint32 = 0x00000011
	LibxcX86MSRPolicy           uint32 = 0x00000012

	// RecordOptional is set in the type of a record a restore may ignore.
	RecordOptional uint32 = 0x80000000
)

// A PAGE_DATA body is count u32, reserved u32, count PFN entries u64, then
// one page of payload for each entry whose type has data.
const (
	pageDataHeaderSize = 8
	pfnEntrySize       = 8
	// PFNMask covers the PFN bits (51-0) of a PAGE_DATA entry; bits 59-52
	// are reserved and bits 63-60 hold the page type.
	PFNMask          = 1<<52 - 1
	pfnReservedMask  = 0xFF << 52
	pfnTypeShift     = 60
	maxPageDataCount = 1<<32 - 1
)

// Page types: XEN_DOMCTL_PFINFO_* of xen/include/public/domctl.h shifted
// down by 28 bits, as they sit in bits 63-60 of a PAGE_DATA entry.
const (
	PageNoTab    uint8 = 0x0
	PageL1Tab    uint8 = 0x1
	PageL2Tab    uint8 = 0x2
	PageL3Tab    uint8 = 0x3
	PageL4Tab    uint8 = 0x4
	PageL1TabPin uint8 = 0x9
	PageL2TabPin uint8 = 0xA
	PageL3TabPin uint8 = 0xB
	PageL4TabPin uint8 = 0xC
	PageBroken   uint8 = 0xD
	PageXAlloc   uint8 = 0xE
	PageXTab     uint8 = 0xF
)

// PageTypeKnown reports whether t is a page type Xen's restore accepts
// (0x5-0x8 are reserved and refused).
func PageTypeKnown(t uint8) bool { return t <= PageL4Tab || (t >= PageL1TabPin && t <= PageXTab) }

// PageTypeHasData reports whether an entry of type t is followed by a page
// of payload: normal pages and page tables, pinned or not. BROKEN, XALLOC
// and XTAB entries carry none.
func PageTypeHasData(t uint8) bool { return t <= PageL4Tab || (t >= PageL1TabPin && t <= PageL4TabPin) }

// Layer names the stream a record belongs to.
type Layer uint8

const (
	LayerLibxl Layer = 1
	LayerLibxc Layer = 2
)

func (l Layer) String() string {
	switch l {
	case LayerLibxl:
		return "libxl"
	case LayerLibxc:
		return "libxc"
	}
	return fmt.Sprintf("layer(%d)", uint8(l))
}

var libxlNames = map[uint32]string{
	LibxlEnd:                  "END",
	LibxlLibxcContext:         "LIBXC_CONTEXT",
	LibxlEmulatorXenstoreData: "EMULATOR_XENSTORE_DATA",
	LibxlEmulatorContext:      "EMULATOR_CONTEXT",
	LibxlCheckpointEnd:        "CHECKPOINT_END",
	LibxlCheckpointState:      "CHECKPOINT_STATE",
}

var libxcNames = map[uint32]string{
	LibxcEnd:                    "END",
	LibxcPageData:               "PAGE_DATA",
	LibxcX86PVInfo:              "X86_PV_INFO",
	LibxcX86PVP2MFrames:         "X86_PV_P2M_FRAMES",
	LibxcX86PVVCPUBasic:         "X86_PV_VCPU_BASIC",
	LibxcX86PVVCPUExtended:      "X86_PV_VCPU_EXTENDED",
	LibxcX86PVVCPUXsave:         "X86_PV_VCPU_XSAVE",
	LibxcSharedInfo:             "SHARED_INFO",
	LibxcX86TSCInfo:             "X86_TSC_INFO",
	LibxcHVMContext:             "HVM_CONTEXT",
	LibxcHVMParams:              "HVM_PARAMS",
	LibxcToolstack:              "TOOLSTACK",
	LibxcX86PVVCPUMSRs:          "X86_PV_VCPU_MSRS",
	LibxcVerify:                 "VERIFY",
	LibxcCheckpoint:             "CHECKPOINT",
	LibxcCheckpointDirtyPFNList: "CHECKPOINT_DIRTY_PFN_LIST",
	LibxcStaticDataEnd:          "STATIC_DATA_END",
	LibxcX86CPUIDPolicy:         "X86_CPUID_POLICY",
	LibxcX86MSRPolicy:           "X86_MSR_POLICY",
}

// RecordName is the spec's name of a record type of the layer, or its
// number for a type the spec reserves.
func (l Layer) RecordName(typ uint32) string {
	names := libxlNames
	if l == LayerLibxc {
		names = libxcNames
	}
	if n, ok := names[typ]; ok {
		return n
	}
	return fmt.Sprintf("%#08x", typ)
}

// GuestType is the domain header's type.
type GuestType uint32

const (
	GuestPV  GuestType = 1
	GuestHVM GuestType = 2
)

func (g GuestType) String() string {
	switch g {
	case GuestPV:
		return "PV"
	case GuestHVM:
		return "HVM"
	}
	return fmt.Sprintf("guest type %d", uint32(g))
}

// Errors of Split and UnmarshalBinary; match them with errors.Is. Errors
// from the reader, the PageSink or the PageSource are wrapped as they are.
var (
	ErrBadHeader     = errors.New("xcstream: bad header")
	ErrTruncated     = errors.New("xcstream: truncated stream")
	ErrTooLarge      = errors.New("xcstream: over a limit")
	ErrBadRecord     = errors.New("xcstream: bad record")
	ErrUnsupported   = errors.New("xcstream: unsupported stream")
	ErrDuplicatePage = errors.New("xcstream: page payload sent twice")
	ErrTrailingData  = errors.New("xcstream: data after the end of the stream")
	ErrBadDescriptor = errors.New("xcstream: bad descriptor")
)

// Limits bound what Split accepts, and so the memory it uses. A zero field
// means its default.
type Limits struct {
	// MaxRecord is the longest record body of either layer, in bytes
	// (default and ceiling RecordLengthMax).
	MaxRecord uint32
	// MaxPages is the most PFN entries over all PAGE_DATA records (default
	// DefaultMaxPages, ceiling MaxPagesCeiling). The descriptor holds them
	// as runs: contiguous PFNs cost little, but a pathological stream costs
	// 16 bytes an entry.
	MaxPages uint64
	// MaxPFN is the largest PFN an entry may name (default and ceiling
	// PFNMask).
	MaxPFN uint64
	// MaxMetadata is the most bytes of verbatim records and save-file
	// header the descriptor may hold (default DefaultMaxMetadata).
	MaxMetadata uint64
}

// Defaults and ceilings of Limits.
const (
	DefaultMaxPages    = 1 << 26 // 256 GiB of guest memory
	DefaultMaxMetadata = 256 << 20
	// MaxPagesCeiling bounds the entries of any descriptor, split or
	// unmarshalled: 16 TiB of guest memory.
	MaxPagesCeiling = 1 << 32
)

func (l Limits) withDefaults() Limits {
	if l.MaxRecord == 0 || l.MaxRecord > RecordLengthMax {
		l.MaxRecord = RecordLengthMax
	}
	if l.MaxPages == 0 {
		l.MaxPages = DefaultMaxPages
	}
	l.MaxPages = min(l.MaxPages, MaxPagesCeiling)
	if l.MaxPFN == 0 || l.MaxPFN > PFNMask {
		l.MaxPFN = PFNMask
	}
	if l.MaxMetadata == 0 {
		l.MaxMetadata = DefaultMaxMetadata
	}
	return l
}

// padding is the number of zero bytes that follow a body of n bytes.
func padding(n uint64) uint64 { return (recordAlign - n%recordAlign) % recordAlign }
