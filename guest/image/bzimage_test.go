package image

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// testdata/tiny-elf.xz is tinyELF() compressed as the kernel build does
// (xz --check=crc32 --x86 --lzma2); tiny-elf-1024.xz is tinyELF() padded to
// 1024 bytes, a size whose little-endian encoding starts with a zero byte.
// TestGenerateTestdata rewrites them.
const (
	tinyELFXZ     = "testdata/tiny-elf.xz"
	tinyELF1024XZ = "testdata/tiny-elf-1024.xz"
)

func tinyELF1024() []byte {
	b := tinyELF()
	return append(b, bytes.Repeat([]byte{0x90}, 1024-len(b))...)
}

func TestGenerateTestdata(t *testing.T) {
	if os.Getenv("SFIMAGE_GEN_TESTDATA") == "" {
		t.Skip("set SFIMAGE_GEN_TESTDATA=1 to regenerate testdata (needs xz)")
	}
	for file, data := range map[string][]byte{tinyELFXZ: tinyELF(), tinyELF1024XZ: tinyELF1024()} {
		cmd := exec.Command("xz", "--format=xz", "--check=crc32", "--x86", "--lzma2=preset=6,dict=64KiB", "-c")
		cmd.Stdin = bytes.NewReader(data)
		out, err := cmd.Output()
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, out, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// makeBzImage wraps payload in a boot-protocol-2.15 setup like a bzImage:
// 4 setup sectors plus the boot sector, the payload 0x40 bytes into the
// protected-mode code.
func makeBzImage(payload []byte, version string) []byte {
	const setupSects = 4
	const payloadOff = 0x40
	b := make([]byte, (setupSects+1)*512+payloadOff, (setupSects+1)*512+payloadOff+len(payload)+64)
	b[bzSetupSects] = setupSects
	binary.LittleEndian.PutUint16(b[bzBootFlag:], 0xaa55)
	copy(b[bzHeaderMagic:], "HdrS")
	binary.LittleEndian.PutUint16(b[bzVersion:], 0x20f)
	binary.LittleEndian.PutUint16(b[bzKernelVersion:], 0x300-0x200)
	copy(b[0x300:], version+"\x00")
	binary.LittleEndian.PutUint32(b[bzPayloadOffset:], payloadOff)
	binary.LittleEndian.PutUint32(b[bzPayloadLength:], uint32(len(payload)))
	b = append(b, payload...)
	return append(b, bytes.Repeat([]byte{0xcc}, 64)...) // code after the payload
}

func gzipPayload(data []byte) []byte {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(data)
	zw.Close()
	return b.Bytes()
}

// xzPayload is a compressed test file with its uncompressed size appended,
// as the kernel build lays out a payload.
func xzPayload(t testing.TB, file string, size int) []byte {
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.AppendUint32(raw, uint32(size))
}

func TestExtractVmlinux(t *testing.T) {
	elfBytes := tinyELF()
	xzp := xzPayload(t, tinyELFXZ, len(elfBytes))
	xz1024 := makeBzImage(xzPayload(t, tinyELF1024XZ, 1024), "v")
	gzp := gzipPayload(elfBytes)
	notELF := gzipPayload([]byte("hello, not an ELF file at all"))
	badSize := append(bytes.Clone(xzp[:len(xzp)-4]), 1, 2, 3, 4)
	noHeader := append(bytes.Repeat([]byte{0x90}, 3000), xzp...) // found by scanning

	tests := []struct {
		name string
		bz   []byte
		want error
	}{
		{"xz with BCJ", makeBzImage(xzp, "6.1.0-test (x)"), nil},
		{"gzip", makeBzImage(gzp, "6.1.0-test (x)"), nil},
		{"scan without header", noHeader, nil},
		{"not ELF", makeBzImage(notELF, "v"), ErrNoVmlinux},
		{"size mismatch", makeBzImage(badSize, "v"), ErrNoVmlinux},
		{"zstd", makeBzImage([]byte{0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5}, "v"), ErrNoVmlinux},
		{"empty", nil, ErrNoVmlinux},
		{"garbage", bytes.Repeat([]byte{0xab}, 10000), ErrNoVmlinux},
		{"truncated payload", makeBzImage(xzp, "v")[:2800], ErrNoVmlinux},
	}
	for i, tt := range tests {
		got, err := extractVmlinux(tt.bz, 1<<20)
		if !errors.Is(err, tt.want) {
			t.Errorf("#%d %s: err = %v, want %v", i, tt.name, err, tt.want)
			continue
		}
		if err == nil && !bytes.Equal(got, elfBytes) {
			t.Errorf("#%d %s: got %d bytes, want the %d-byte ELF", i, tt.name, len(got), len(elfBytes))
		}
	}
	if got, err := extractVmlinux(xz1024, 1<<20); err != nil || !bytes.Equal(got, tinyELF1024()) {
		t.Errorf("xz, size 1024: %d bytes, %v", len(got), err)
	}
	if _, err := extractVmlinux(makeBzImage(xzp, "v"), 100); !errors.Is(err, ErrNoVmlinux) {
		t.Errorf("over limit: err = %v", err)
	}
	zstd := makeBzImage([]byte{0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4, 5}, "v")
	if _, err := extractVmlinux(zstd, 1<<20); !errors.Is(err, ErrUnsupportedCompression) {
		t.Errorf("zstd: err = %v, want ErrUnsupportedCompression too", err)
	}
}

func TestBzImageVersion(t *testing.T) {
	bz := makeBzImage(xzPayload(t, tinyELFXZ, len(tinyELF())), "6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP")
	if v := bzImageVersion(bz); v != "6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP" {
		t.Errorf("version = %q", v)
	}
	p := filepath.Join(t.TempDir(), "bz")
	os.WriteFile(p, bz, 0o644)
	if v := kernelFileVersion(p); v != "6.1.0-56-amd64" {
		t.Errorf("kernelFileVersion = %q", v)
	}
	for i, bad := range [][]byte{nil, tinyELF(), bz[:0x210]} {
		if v := bzImageVersion(bad); v != "" {
			t.Errorf("#%d: version %q from a non-bzImage", i, v)
		}
	}
}

// FuzzBzImage: finding and decompressing a payload never panics, payloads
// lie inside the input, and a result is always an x86-64 ELF.
func FuzzBzImage(f *testing.F) {
	xzp := xzPayload(f, tinyELFXZ, len(tinyELF()))
	f.Add(makeBzImage(xzPayload(f, tinyELF1024XZ, 1024), "6.1.0-test"))
	f.Add(makeBzImage(xzp, "6.1.0-test"))
	f.Add(makeBzImage(gzipPayload(tinyELF()), "6.1.0-test"))
	f.Add(append(bytes.Repeat([]byte{0}, 100), xzp...))
	f.Add(makeBzImage([]byte("BZh91AY&SY"), "v"))
	f.Add(makeBzImage(nil, ""))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, bz []byte) {
		if ps, err := findPayload(bz); err == nil {
			for _, p := range ps {
				if len(p.Data) > len(bz) {
					t.Fatalf("payload of %d bytes from %d", len(p.Data), len(bz))
				}
			}
		}
		bzImageVersion(bz)
		out, err := extractVmlinux(bz, 64<<10)
		if err == nil {
			if err := checkVmlinux(out); err != nil {
				t.Fatalf("accepted a non-vmlinux: %v", err)
			}
		} else if !errors.Is(err, ErrNoVmlinux) {
			t.Fatalf("error %v does not wrap ErrNoVmlinux", err)
		}
	})
}
