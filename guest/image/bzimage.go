package image

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/xi2/xz"
)

// An x86 bzImage is a real-mode setup of (setup_sects+1) 512-byte sectors,
// then the protected-mode decompressor, which carries the compressed vmlinux
// ("payload"). Boot protocol 2.08+ records the payload's offset (from the
// start of the protected-mode code) and length in the setup header
// (Documentation/arch/x86/boot.rst). The compressor appends the uncompressed
// size as a little-endian uint32 at the payload's end (gzip's own trailer
// carries it too).

const (
	bzSetupSects     = 0x1f1
	bzBootFlag       = 0x1fe
	bzHeaderMagic    = 0x202
	bzVersion        = 0x206
	bzKernelVersion  = 0x20e
	bzPayloadOffset  = 0x248
	bzPayloadLength  = 0x24c
	bzMinHeaderBytes = 0x250

	// maxVmlinux bounds decompression: Debian's vmlinux is ~66 MB.
	maxVmlinux = 512 << 20
)

// compression formats recognised in a payload, by magic.
var payloadMagics = []struct {
	name  string
	magic []byte
}{
	{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}},
	{"gzip", []byte{0x1f, 0x8b, 0x08}},
	{"bzip2", []byte("BZh")},
	{"zstd", []byte{0x28, 0xb5, 0x2f, 0xfd}},
	{"lz4", []byte{0x02, 0x21, 0x4c, 0x18}},
	{"lzo", []byte{0x89, 0x4c, 0x5a, 0x4f}},
	{"lzma", []byte{0x5d, 0x00, 0x00}},
}

// payload is a compressed kernel found inside a bzImage.
type payload struct {
	Data   []byte
	Format string
	// Exact is true when the boot header delimited Data, so that its last
	// four bytes are the uncompressed size.
	Exact bool
}

// findPayload locates the compressed kernel in bz: through the setup header
// when it is valid, else by scanning for compression magics like the
// kernel's scripts/extract-vmlinux (candidates in file order; only the
// formats extractVmlinux decodes, XZ and gzip). A scanned XZ
// payload decodes only if the byte after the stream is not zero: the decoder
// takes zeros for stream padding.
func findPayload(bz []byte) ([]payload, error) {
	if p, ok := headerPayload(bz); ok {
		return []payload{p}, nil
	}
	var found []payload
	for off := 0; off < len(bz) && len(found) < 16; off++ {
		for _, m := range payloadMagics {
			if (m.name == "xz" || m.name == "gzip") && bytes.HasPrefix(bz[off:], m.magic) {
				found = append(found, payload{Data: bz[off:], Format: m.name})
			}
		}
	}
	if len(found) == 0 {
		return nil, fmt.Errorf("%w: no compressed payload found", ErrNoVmlinux)
	}
	return found, nil
}

// headerPayload reads the payload location from a boot protocol 2.08+
// setup header.
func headerPayload(bz []byte) (payload, bool) {
	if !hasSetupHeader(bz) || binary.LittleEndian.Uint16(bz[bzVersion:]) < 0x208 {
		return payload{}, false
	}
	setup := int64(bz[bzSetupSects])
	if setup == 0 {
		setup = 4
	}
	start := (setup+1)*512 + int64(binary.LittleEndian.Uint32(bz[bzPayloadOffset:]))
	end := start + int64(binary.LittleEndian.Uint32(bz[bzPayloadLength:]))
	if end-start < 8 || end > int64(len(bz)) {
		return payload{}, false
	}
	p := payload{Data: bz[start:end], Format: "unknown", Exact: true}
	for _, m := range payloadMagics {
		if bytes.HasPrefix(p.Data, m.magic) {
			p.Format = m.name
			break
		}
	}
	return p, true
}

// hasSetupHeader reports whether bz starts with an x86 boot sector and setup
// header.
func hasSetupHeader(bz []byte) bool {
	return len(bz) >= bzMinHeaderBytes &&
		binary.LittleEndian.Uint16(bz[bzBootFlag:]) == 0xaa55 &&
		string(bz[bzHeaderMagic:bzHeaderMagic+4]) == "HdrS"
}

// extractVmlinux returns the uncompressed ELF kernel inside the bzImage bz,
// decompressing at most limit bytes.
func extractVmlinux(bz []byte, limit int64) ([]byte, error) {
	cands, err := findPayload(bz)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, p := range cands {
		out, err := decompressPayload(p, limit)
		if err == nil {
			err = checkVmlinux(out)
		}
		if err == nil && p.Exact && binary.LittleEndian.Uint32(p.Data[len(p.Data)-4:]) != uint32(len(out)) {
			err = fmt.Errorf("%w: decompressed %d bytes, the payload says %d", ErrNoVmlinux,
				len(out), binary.LittleEndian.Uint32(p.Data[len(p.Data)-4:]))
		}
		if err == nil {
			return out, nil
		}
		errs = append(errs, fmt.Errorf("%s payload: %w", p.Format, err))
	}
	return nil, fmt.Errorf("%w: %w", ErrNoVmlinux, errors.Join(errs...))
}

func decompressPayload(p payload, limit int64) ([]byte, error) {
	data := p.Data
	if p.Exact && p.Format != "gzip" {
		// Drop the appended size: XZ would read it as stream padding, which
		// fails unless it starts with a non-zero byte.
		data = data[:len(data)-4]
	}
	var r io.Reader
	switch p.Format {
	case "xz":
		// The dictionary never needs to exceed the output; bounding it keeps
		// a corrupt header from allocating 64 MiB (the kernel's is 32 MiB).
		zr, err := xz.NewReader(bytes.NewReader(data), uint32(min(limit, xz.DefaultDictMax)))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false) // the appended size follows the stream
		r = zr
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false)
		r = zr
	default:
		return nil, fmt.Errorf("%w: %s kernel payload", ErrUnsupportedCompression, p.Format)
	}
	var buf bytes.Buffer
	if p.Exact {
		// The appended size spares the buffer's doublings (~66 MB).
		buf.Grow(int(min(int64(binary.LittleEndian.Uint32(p.Data[len(p.Data)-4:])), limit)) + bytes.MinRead)
	}
	n, err := io.Copy(&buf, io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if n > limit {
		return nil, fmt.Errorf("decompressed kernel exceeds %d bytes", limit)
	}
	return buf.Bytes(), nil
}

// checkVmlinux checks that b is a 64-bit x86 ELF executable.
func checkVmlinux(b []byte) error {
	if !bytes.HasPrefix(b, []byte(elf.ELFMAG)) {
		return fmt.Errorf("%w: the payload is not an ELF file", ErrNoVmlinux)
	}
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNoVmlinux, err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		return fmt.Errorf("%w: ELF %v %v %v, want ELFCLASS64 EM_X86_64 ET_EXEC", ErrNoVmlinux, f.Class, f.Machine, f.Type)
	}
	return nil
}

// bzImageVersion returns the kernel version string a bzImage's header points
// to ("6.1.0-56-amd64 (debian-kernel@...) #1 SMP ..."), or "".
func bzImageVersion(bz []byte) string {
	if !hasSetupHeader(bz) {
		return ""
	}
	ptr := binary.LittleEndian.Uint16(bz[bzKernelVersion:])
	if ptr == 0 {
		return ""
	}
	off := int(ptr) + 0x200
	if off >= len(bz) {
		return ""
	}
	s := bz[off:min(len(bz), off+256)]
	if i := bytes.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	if !isPrintable(string(bytes.ReplaceAll(s, []byte(" "), []byte("_")))) {
		return ""
	}
	return string(s)
}

// kernelFileVersion is the release ("6.1.0-56-amd64") of a custom kernel
// file, when it is a bzImage; "" otherwise.
func kernelFileVersion(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	head := make([]byte, 64<<10) // the setup, which holds the version string, is < 32 KiB
	n, _ := io.ReadFull(f, head)
	v := bzImageVersion(head[:n])
	if i := bytes.IndexByte([]byte(v), ' '); i >= 0 {
		v = v[:i]
	}
	return v
}
