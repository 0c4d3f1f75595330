package image

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// testTmp is removed after all tests; it holds the stand-in /init.
var testTmp string

func TestMain(m *testing.M) {
	var err error
	if testTmp, err = os.MkdirTemp("", "image-test-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(testTmp)
	os.Exit(code)
}

// testCacheDir is the cache the real-input tests share across runs, so that
// a warm run downloads nothing: $SNOWFLOCK_IMAGE_CACHE or DefaultCacheDir.
func testCacheDir(t testing.TB) string {
	t.Helper()
	if d := os.Getenv("SNOWFLOCK_IMAGE_CACHE"); d != "" {
		return d
	}
	d, err := DefaultCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func testLogger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Info, Output: testWriter{t}})
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// standInInit is a static Go program standing in for sfguest: it prints
// markers, loads the modules listed in /etc/sfguest/modules, runs a busybox
// pipeline and powers the VM off.
const standInInit = `package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"unsafe"
)

func main() {
	fmt.Println("SFIMAGE-INIT-START")
	n, err := loadModules()
	cmd := exec.Command("/bin/sh", "-c", "echo snowflock | sha256sum | cut -c1-16; seq 3 | wc -l")
	cmd.Env = []string{"PATH=/bin"}
	out, shErr := cmd.CombinedOutput()
	fmt.Printf("SFIMAGE-INIT-DONE modules=%d modules_err=%v sh=%q sh_err=%v\n", n, err, out, shErr)
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

const sysFinitModule = 313 // x86-64; the frozen syscall package lacks it

func loadModules() (int, error) {
	list, err := os.ReadFile("/etc/sfguest/modules")
	if err != nil {
		return 0, err
	}
	n := 0
	params := []byte{0}
	for _, path := range strings.Fields(string(list)) {
		f, err := os.Open(path)
		if err != nil {
			return n, err
		}
		_, _, errno := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&params[0])), 0)
		f.Close()
		if errno != 0 && errno != syscall.EEXIST {
			return n, fmt.Errorf("%s: %v", path, errno)
		}
		n++
	}
	return n, nil
}
`

var (
	standInOnce sync.Once
	standInPath string
	standInErr  error
)

// standIn builds standInInit once per test binary.
func standIn(t testing.TB) string {
	t.Helper()
	standInOnce.Do(func() {
		dir := filepath.Join(testTmp, "standin")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			standInErr = err
			return
		}
		os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module standin\n\ngo 1.21\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "main.go"), []byte(standInInit), 0o644)
		goBin, err := exec.LookPath("go")
		if err != nil {
			goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		cmd := exec.Command(goBin, "build", "-trimpath", "-ldflags=-s -w", "-o", "init", ".")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=", "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			standInErr = fmt.Errorf("building stand-in init: %v\n%s", err, out)
			return
		}
		standInPath = filepath.Join(dir, "init")
	})
	if standInErr != nil {
		t.Fatal(standInErr)
	}
	return standInPath
}

// buildTestImage builds an image from real packages for the tests.
func buildTestImage(t testing.TB, mod func(*Options)) *Image {
	t.Helper()
	o := Options{CacheDir: testCacheDir(t), SFGuest: standIn(t), Logger: testLogger(t)}
	if mod != nil {
		mod(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	img, err := Build(ctx, o)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	return img
}

// cpioFile is an entry read back by readNewc.
type cpioFile struct {
	Name                                     string
	Ino, Mode, UID, GID, Nlink, Mtime        uint32
	DevMajor, DevMinor, RdevMajor, RdevMinor uint32
	Data                                     []byte
}

// readNewc parses a whole newc archive strictly: magic, hex fields, NUL
// terminated names, zero padding, a trailer and only zeros after it.
func readNewc(b []byte) ([]cpioFile, error) {
	var out []cpioFile
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if len(b)-off < newcHeaderSize {
			return nil, fmt.Errorf("offset %d: truncated header", off)
		}
		h := b[off : off+newcHeaderSize]
		if string(h[:6]) != newcMagic {
			return nil, fmt.Errorf("offset %d: bad magic %q", off, h[:6])
		}
		var f [13]uint32
		for i := range f {
			field := string(h[6+8*i : 14+8*i])
			v, err := strconv.ParseUint(field, 16, 32)
			if err != nil || len(field) != 8 || field[0] == '+' || field[0] == '-' {
				return nil, fmt.Errorf("offset %d: bad field %d %q", off, i, field)
			}
			f[i] = uint32(v)
		}
		nameSize, size := int(f[11]), int(f[6])
		if nameSize < 1 || nameSize > len(b)-off-newcHeaderSize {
			return nil, fmt.Errorf("offset %d: bad name size %d", off, nameSize)
		}
		name := b[off+newcHeaderSize : off+newcHeaderSize+nameSize]
		if name[nameSize-1] != 0 || bytes.IndexByte(name[:nameSize-1], 0) >= 0 {
			return nil, fmt.Errorf("offset %d: name not NUL-terminated", off)
		}
		end := off + newcHeaderSize + nameSize
		next := align(end)
		if next > len(b) || !allZero(b[end:next]) {
			return nil, fmt.Errorf("offset %d: bad name padding", off)
		}
		off = next
		if size > len(b)-off {
			return nil, fmt.Errorf("offset %d: data of %d bytes truncated", off, size)
		}
		data := b[off : off+size]
		next = align(off + size)
		if next > len(b) || !allZero(b[off+size:next]) {
			return nil, fmt.Errorf("offset %d: bad data padding", off)
		}
		off = next
		if string(name[:nameSize-1]) == newcTrailer {
			if !allZero(b[off:]) {
				return nil, fmt.Errorf("offset %d: data after the trailer", off)
			}
			return out, nil
		}
		out = append(out, cpioFile{
			Name: string(name[:nameSize-1]), Ino: f[0], Mode: f[1], UID: f[2], GID: f[3], Nlink: f[4], Mtime: f[5],
			DevMajor: f[7], DevMinor: f[8], RdevMajor: f[9], RdevMinor: f[10], Data: bytes.Clone(data),
		})
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// tinyELF is a 64-bit x86 ELF executable header followed by some
// x86-looking bytes (calls and jumps, which the XZ BCJ filter rewrites).
func tinyELF() []byte {
	var b bytes.Buffer
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	le := binary.LittleEndian
	binary.Write(&b, le, uint16(elf.ET_EXEC))
	binary.Write(&b, le, uint16(elf.EM_X86_64))
	binary.Write(&b, le, uint32(1))         // version
	binary.Write(&b, le, uint64(0x1000000)) // entry
	binary.Write(&b, le, uint64(0))         // phoff
	binary.Write(&b, le, uint64(0))         // shoff
	binary.Write(&b, le, uint32(0))         // flags
	binary.Write(&b, le, []uint16{64, 56, 0, 64, 0, 0})
	for i := 0; i < 64; i++ {
		b.Write([]byte{0xe8, byte(i), 0x10, 0, 0, 0x90, 0xe9, 0x20, byte(i), 0, 0})
	}
	b.WriteString("end") // 771 bytes: a size whose first byte is not 0
	return b.Bytes()
}

// moduleELF is a minimal relocatable ELF with a .modinfo section holding
// modinfo, enough for parseModinfo.
func moduleELF(modinfo string) []byte {
	le := binary.LittleEndian
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	body := append([]byte(modinfo), shstr...)
	shoff := uint64(64 + len(body))
	shoff = (shoff + 7) &^ 7
	var b bytes.Buffer
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	binary.Write(&b, le, uint16(elf.ET_REL))
	binary.Write(&b, le, uint16(elf.EM_X86_64))
	binary.Write(&b, le, uint32(1))
	binary.Write(&b, le, uint64(0))
	binary.Write(&b, le, uint64(0))
	binary.Write(&b, le, shoff)
	binary.Write(&b, le, uint32(0))
	binary.Write(&b, le, []uint16{64, 0, 0, 64, 3, 2})
	b.Write(body)
	for uint64(b.Len()) < shoff {
		b.WriteByte(0)
	}
	sh := func(name, typ uint32, off, size uint64) {
		binary.Write(&b, le, name)
		binary.Write(&b, le, typ)
		binary.Write(&b, le, uint64(0)) // flags
		binary.Write(&b, le, uint64(0)) // addr
		binary.Write(&b, le, off)
		binary.Write(&b, le, size)
		binary.Write(&b, le, uint32(0)) // link
		binary.Write(&b, le, uint32(0)) // info
		binary.Write(&b, le, uint64(1)) // align
		binary.Write(&b, le, uint64(0)) // entsize
	}
	sh(0, 0, 0, 0)
	sh(1, uint32(elf.SHT_PROGBITS), 64, uint64(len(modinfo)))
	sh(10, uint32(elf.SHT_STRTAB), 64+uint64(len(modinfo)), uint64(len(shstr)))
	return b.Bytes()
}

// requireQEMU skips a test when QEMU is missing, except in CI, where it
// must be installed.
func requireQEMU(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("qemu-system-x86_64")
	if err == nil {
		return p
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("qemu-system-x86_64 is required in CI (apt-get install qemu-system-x86): %v", err)
	}
	t.Skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86); set CI=1 to make this a failure")
	return ""
}
