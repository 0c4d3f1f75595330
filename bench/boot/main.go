// Command boot benchmarks guest boot and image build: the time from starting
// QEMU to the guest's sfguest init calling "ready" on the host channel
// (median of N boots, for every accelerator this host can use), and the time
// to build the initramfs with a warm kernel cache. It writes JSON (default
// bench/results/boot.json) and prints a summary.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/qemuctl"
)

type bootStats struct {
	MedianMs float64   `json:"median"`
	MinMs    float64   `json:"min"`
	MaxMs    float64   `json:"max"`
	Runs     int       `json:"runs"`
	AllMs    []float64 `json:"all"`
}

type result struct {
	Accel             string               `json:"accel"`
	AccelReason       string               `json:"accel_reason"`
	BootMs            bootStats            `json:"boot_ms"`
	BootByAccel       map[string]bootStats `json:"boot_ms_by_accel"`
	ImageBuildMs      float64              `json:"image_build_ms"`
	ImageBuildTotalMs float64              `json:"image_build_total_ms"`
	KernelPackage     string               `json:"kernel_package"`
	InitramfsBytes    int64                `json:"initramfs_bytes"`
	GuestMemMB        int                  `json:"guest_mem_mb"`
	Machine           string               `json:"machine"`
	Date              string               `json:"date"`
}

func main() {
	bin := flag.String("bin", "bin", "directory with the static sfguest binary")
	out := flag.String("out", "bench/results/boot.json", "where to write the JSON results")
	runs := flag.Int("runs", 5, "boots per accelerator")
	mem := flag.Int("mem", 256, "guest memory, MiB")
	flag.Parse()
	if err := run(*bin, *out, *runs, *mem); err != nil {
		fmt.Fprintln(os.Stderr, "bench-boot:", err)
		os.Exit(1)
	}
}

func run(bin, out string, runs, mem int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	sfguest, err := filepath.Abs(filepath.Join(bin, "sfguest"))
	if err != nil {
		return err
	}
	if _, err := image.Build(ctx, image.Options{SFGuest: sfguest}); err != nil { // warm the caches
		return err
	}
	im, err := image.Build(ctx, image.Options{SFGuest: sfguest, RebuildInitramfs: true})
	if err != nil {
		return err
	}
	st, err := os.Stat(im.Initrd)
	if err != nil {
		return err
	}
	res := result{ImageBuildMs: ms(im.Stats.Initramfs), ImageBuildTotalMs: ms(im.Stats.Total), KernelPackage: im.KernelPackage,
		InitramfsBytes: st.Size(), GuestMemMB: mem, BootByAccel: map[string]bootStats{},
		Machine: fmt.Sprintf("%s/%s, %d CPUs, %s", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version()),
		Date:    time.Now().UTC().Format(time.RFC3339)}
	fmt.Printf("image: initramfs built in %.0f ms (warm kernel cache), %d bytes; kernel %s\n", res.ImageBuildMs, res.InitramfsBytes, im.KernelPackage)

	best, why := qemuctl.ProbeAccel(ctx)
	res.Accel, res.AccelReason = string(best), why
	accels := []qemuctl.Accel{qemuctl.AccelTCG}
	if best == qemuctl.AccelKVM {
		accels = append([]qemuctl.Accel{qemuctl.AccelKVM}, accels...)
	}
	dir, err := os.MkdirTemp("", "sfbench-boot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for _, acc := range accels {
		var all []float64
		for i := 0; i < runs; i++ {
			d, err := bootOnce(ctx, filepath.Join(dir, fmt.Sprintf("%s-%d", acc, i)), im, acc, mem)
			if err != nil {
				return fmt.Errorf("%s boot %d: %w", acc, i+1, err)
			}
			all = append(all, ms(d))
			fmt.Printf("  %s boot %d: ready after %.0f ms\n", acc, i+1, ms(d))
		}
		sorted := slices.Sorted(slices.Values(all))
		bs := bootStats{MedianMs: sorted[len(sorted)/2], MinMs: sorted[0], MaxMs: sorted[len(sorted)-1], Runs: len(all), AllMs: all}
		res.BootByAccel[string(acc)] = bs
		if acc == best {
			res.BootMs = bs
		}
		fmt.Printf("%s: median %.0f ms to sfguest ready over %d boots (min %.0f, max %.0f)\n", acc, bs.MedianMs, bs.Runs, bs.MinMs, bs.MaxMs)
	}
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Println("wrote", out)
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// bootOnce starts a VM with no workload and returns the time until its init
// calls ready on the guest channel.
func bootOnce(ctx context.Context, runDir string, im *image.Image, acc qemuctl.Accel, mem int) (time.Duration, error) {
	start := time.Now()
	vm, err := qemuctl.Start(ctx, qemuctl.Config{ID: filepath.Base(runDir), Kernel: im.Kernel, Initrd: im.Initrd,
		Append: "console=ttyS0 quiet panic=-1", MemMB: mem, VCPUs: 1, RunDir: runDir, Accel: acc})
	if err != nil {
		return 0, err
	}
	defer vm.Destroy(context.Background())
	conn, err := net.Dial("unix", vm.GuestSocketPath())
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ready := make(chan error, 1)
	go func() { // ends when conn closes
		d := guestchan.NewDecoder(conn)
		for {
			req, err := d.ReadRequest()
			if err != nil {
				if errors.Is(err, guestchan.ErrBadMessage) {
					continue
				}
				ready <- err
				return
			}
			if req.Call == guestchan.CallReady {
				resp, _ := guestchan.Answer(req.ID, struct{}{})
				_ = guestchan.Encode(conn, resp)
				ready <- nil
				return
			}
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			return 0, fmt.Errorf("guest channel: %w", err)
		}
		return time.Since(start), nil
	case <-vm.Wait():
		return 0, errors.New("the VM stopped before its init was ready")
	case <-time.After(2 * time.Minute):
		return 0, errors.New("no ready call within 2 minutes")
	}
}
