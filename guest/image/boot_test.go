package image

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

const (
	markerStart = "SFIMAGE-INIT-START"
	markerDone  = "SFIMAGE-INIT-DONE"
	bootTimeout = 60 * time.Second
)

// bootResult is what a boot printed and when.
type bootResult struct {
	console    []string
	initStart  time.Duration // from QEMU's start to /init's first line
	done       string        // the stand-in's final line
	exitedSelf bool          // QEMU exited on its own (the guest powered off)
	total      time.Duration
}

// boot runs the image under QEMU TCG as the hypervisor drivers will, until the
// guest powers off or bootTimeout passes.
func boot(t *testing.T, qemu, kernel, initrd, appendLine string) bootResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu, "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
		"-kernel", kernel, "-initrd", initrd, "-append", appendLine)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var r bootResult
	sc := bufio.NewScanner(out)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		r.console = append(r.console, line)
		switch {
		case strings.Contains(line, markerStart) && r.initStart == 0:
			r.initStart = time.Since(start)
		case strings.Contains(line, markerDone):
			r.done = line
		}
	}
	err = cmd.Wait()
	r.total = time.Since(start)
	r.exitedSelf = err == nil && ctx.Err() == nil
	if ctx.Err() != nil {
		t.Errorf("guest did not power off within %v", bootTimeout)
	} else if err != nil {
		t.Errorf("qemu: %v: %s", err, stderr.String())
	}
	return r
}

func (r bootResult) String() string {
	tail := r.console
	if len(tail) > 40 {
		tail = tail[len(tail)-40:]
	}
	return strings.Join(tail, "\n")
}

// TestBoot boots the default image and checks that /init ran, loaded every
// module and ran a busybox pipeline.
func TestBoot(t *testing.T) {
	qemu := requireQEMU(t)
	img := buildTestImage(t, nil)
	r := boot(t, qemu, img.Kernel, img.Initrd, "console=ttyS0 panic=-1")
	if r.initStart == 0 || r.done == "" {
		t.Fatalf("no markers on the console; last lines:\n%s", r)
	}
	want := fmt.Sprintf("%s modules=%d modules_err=<nil>", markerDone, len(img.Modules))
	if !strings.HasPrefix(r.done, want) || !strings.Contains(r.done, `sh_err=<nil>`) || !strings.Contains(r.done, `\n3\n`) {
		t.Errorf("stand-in reported %q, want prefix %q, a sha256 and 3 from seq|wc", r.done, want)
	}
	t.Logf("vmlinux + %s: /init after %v, powered off after %v", initrdKind(img.Initrd), r.initStart.Round(time.Millisecond), r.total.Round(time.Millisecond))
}

// TestBootMatrix compares boot times: vmlinux against bzImage, cpio against
// cpio.gz. It takes about a minute, so it runs only with
// SFIMAGE_BOOT_MATRIX=1 (SFIMAGE_BOOT_RUNS=n repeats each boot).
func TestBootMatrix(t *testing.T) {
	if os.Getenv("SFIMAGE_BOOT_MATRIX") == "" {
		t.Skip("set SFIMAGE_BOOT_MATRIX=1 to measure boot times")
	}
	qemu := requireQEMU(t)
	runs := 1
	fmt.Sscan(os.Getenv("SFIMAGE_BOOT_RUNS"), &runs)
	plain := buildTestImage(t, nil)
	gz := buildTestImage(t, func(o *Options) { o.Gzip = true })
	for _, c := range []struct{ kernelName, kernel, initrd, append string }{
		{"vmlinux", plain.Kernel, plain.Initrd, "console=ttyS0 panic=-1"},
		{"vmlinux", gz.Kernel, gz.Initrd, "console=ttyS0 panic=-1"},
		{"bzImage", plain.BzImage, plain.Initrd, "console=ttyS0 panic=-1"},
		{"bzImage", gz.BzImage, gz.Initrd, "console=ttyS0 panic=-1"},
		{"vmlinux quiet", plain.Kernel, plain.Initrd, "console=ttyS0 panic=-1 quiet"},
	} {
		for i := 0; i < runs; i++ {
			r := boot(t, qemu, c.kernel, c.initrd, c.append)
			if r.done == "" {
				t.Errorf("%s + %s: no marker:\n%s", c.kernelName, initrdKind(c.initrd), r)
				continue
			}
			t.Logf("%-13s + %-7s: /init after %6v, powered off after %6v",
				c.kernelName, initrdKind(c.initrd), r.initStart.Round(10*time.Millisecond), r.total.Round(10*time.Millisecond))
		}
	}
}

func initrdKind(p string) string {
	if strings.HasSuffix(p, ".gz") {
		return "cpio.gz"
	}
	return "cpio"
}
