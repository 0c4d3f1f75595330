package qemuctl

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
)

// kernelEnv names a Linux kernel for TestBootKernel: Debian's bzImage works;
// the uncompressed vmlinux inside it boots in ~1.5 s under TCG instead of
// ~9 s (no XZ decompression in the emulated CPU).
const kernelEnv = "SF_TEST_KERNEL"

// testKernel returns the kernel to boot, or skips the test.
func testKernel(t *testing.T) string {
	t.Helper()
	if k := os.Getenv(kernelEnv); k != "" {
		if _, err := os.Stat(k); err != nil {
			t.Fatalf("%s: %v", kernelEnv, err)
		}
		return k
	}
	if ks, _ := filepath.Glob("/boot/vmlinuz-*"); len(ks) > 0 {
		return ks[len(ks)-1]
	}
	t.Skipf("no guest kernel: set %s to a Linux kernel (e.g. /boot/vmlinuz-* from Debian's linux-image-amd64, or the vmlinux extracted from it)", kernelEnv)
	return ""
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "go"
}

// buildInitramfs compiles testdata/guestinit as /init into a newc cpio.
func buildInitramfs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "init")
	build := exec.Command(goTool(), "build", "-o", bin, "./testdata/guestinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the guest init: %v\n%s", err, out)
	}
	initBin, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var cpio cpioWriter
	cpio.dir("dev")
	cpio.charDev("dev/console", 5, 1) // the kernel opens it for init's stdio
	cpio.file("init", 0o755, initBin)
	path := filepath.Join(dir, "initramfs.cpio")
	if err := os.WriteFile(path, cpio.finish(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// cpioWriter writes the "newc" cpio format the kernel unpacks as initramfs.
type cpioWriter struct {
	buf bytes.Buffer
	ino int
}

func (w *cpioWriter) entry(name string, mode, rdevMajor, rdevMinor int, data []byte) {
	w.ino++
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name + "\x00")
	w.pad()
	w.buf.Write(data)
	w.pad()
}

func (w *cpioWriter) pad() {
	for w.buf.Len()%4 != 0 {
		w.buf.WriteByte(0)
	}
}

func (w *cpioWriter) dir(name string)                      { w.entry(name, 0o040755, 0, 0, nil) }
func (w *cpioWriter) file(name string, perm int, b []byte) { w.entry(name, 0o100000|perm, 0, 0, b) }
func (w *cpioWriter) charDev(name string, major, minor int) {
	w.entry(name, 0o020600, major, minor, nil)
}

func (w *cpioWriter) finish() []byte {
	w.entry("TRAILER!!!", 0, 0, 0, nil)
	return w.buf.Bytes()
}

// TestBootKernel boots a real Linux guest and talks to it over the guest
// channel: the guest's ttyS1 must be RunDir/guest.sock, its console ttyS0
// must be console.log, and a guest reboot must end QEMU (-no-reboot).
func TestBootKernel(t *testing.T) {
	qemutest.RequireQEMU(t)
	kernel := testKernel(t)
	initrd := buildInitramfs(t)
	// The default CPU model, and "max", which also boots Debian's kernel
	// under TCG (whereas it crashes Xen's dom0, see PROBES.md).
	for _, cpu := range []string{"", "max"} {
		name := cpu
		if name == "" {
			name = "default"
		}
		t.Run("cpu="+name, func(t *testing.T) { bootKernel(t, kernel, initrd, cpu) })
	}
}

func bootKernel(t *testing.T, kernel, initrd, cpu string) {
	ctx := qemutest.Context(t, 60*time.Second)
	cfg := testConfig(t, t.TempDir(), "boot")
	cfg.MemMB = 256
	cfg.Kernel, cfg.Initrd = kernel, initrd
	cfg.Append = "console=ttyS0 quiet panic=-1"
	cfg.CPU = cpu
	started := time.Now()
	vm := startVM(t, cfg)

	// Connect before the guest speaks: QEMU drops what the guest writes to
	// the port while no client is connected. The kernel takes over a
	// second to boot; connecting takes microseconds.
	conn, err := net.Dial("unix", vm.GuestSocketPath())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	if err != nil || line != "hello ttyS1\n" {
		t.Fatalf("guest channel: %q, %v; want the guest's hello on ttyS1", line, err)
	}
	t.Logf("guest channel up %v after Start", time.Since(started).Round(time.Millisecond))
	fmt.Fprintf(conn, "ping %d\n", started.UnixNano())
	line, err = r.ReadString('\n')
	if want := fmt.Sprintf("pong %d\n", started.UnixNano()); err != nil || line != want {
		t.Fatalf("guest channel: %q, %v; want %q", line, err, want)
	}

	// The guest reboots; -no-reboot makes that QEMU's exit.
	select {
	case <-vm.Wait():
	case <-ctx.Done():
		t.Fatal("QEMU still running after the guest rebooted")
	}
	if err := vm.ExitErr(); err != nil {
		t.Errorf("QEMU exit: %v, want status 0", err)
	}
	console, _ := os.ReadFile(vm.ConsolePath())
	for _, want := range []string{"sfinit: console up", "sfinit: ttyS1 is 1: uart:16550A port:000002F8 irq:3", "sfinit: answered ping"} {
		if !bytes.Contains(console, []byte(want)) {
			t.Errorf("console lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("console:\n%s", strings.TrimSpace(string(console)))
	}
}
