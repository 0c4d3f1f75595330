package qemuctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
	"github.com/snowflock-go/snowflock/qemuctl/qmp"
)

// Snapshot and Restore are tested against real QEMU running a real Linux
// guest whose /init is testdata/snapinit: it fills memory with a pattern and
// prints a tick line every 100 ms, from which the tests read whether a VM
// runs, where its counter is and whether its memory is intact.

var snapGuest struct {
	once sync.Once
	img  *image.Image
	err  error
}

// snapImage builds testdata/snapinit and a bootable image around it (Debian's
// kernel, downloaded once into the image cache), or skips the test when the
// image cannot be built outside CI.
func snapImage(t *testing.T) *image.Image {
	t.Helper()
	qemutest.RequireQEMU(t)
	snapGuest.once.Do(func() {
		dir, err := os.MkdirTemp("", "snapinit-")
		if err != nil {
			snapGuest.err = err
			return
		}
		defer os.RemoveAll(dir) // the image keeps its own copy
		bin := filepath.Join(dir, "init")
		build := exec.Command(goTool(), "build", "-trimpath", "-o", bin, "./testdata/snapinit")
		build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if out, err := build.CombinedOutput(); err != nil {
			snapGuest.err = fmt.Errorf("building the guest init: %v\n%s", err, out)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		snapGuest.img, snapGuest.err = image.Build(ctx, image.Options{
			SFGuest: bin, Kernel: os.Getenv(kernelEnv), Modules: []string{},
		})
	})
	if snapGuest.err != nil {
		msg := fmt.Sprintf("no guest image (Debian's kernel is downloaded with apt-get on first use, or set %s): %v", kernelEnv, snapGuest.err)
		if os.Getenv("CI") != "" {
			t.Fatalf("%s; CI is set, so this is a failure", msg)
		}
		t.Skip(msg)
	}
	return snapGuest.img
}

// guestConfig is a VM booting the snapinit guest with memMB of RAM, touchMB
// of which the guest fills.
func guestConfig(t *testing.T, img *image.Image, runRoot, id string, memMB, touchMB int) Config {
	cfg := testConfig(t, runRoot, id)
	cfg.MemMB = memMB
	cfg.Kernel, cfg.Initrd = img.Kernel, img.Initrd
	cfg.Append = fmt.Sprintf("console=ttyS0 quiet panic=-1 snap_touch_mb=%d", touchMB)
	return cfg
}

// cloneConfig is the parent's configuration for a clone with its own ID and
// run directory.
func cloneConfig(parent Config, runRoot, id string) Config {
	c := parent
	c.ID = id
	c.RunDir = filepath.Join(runRoot, id)
	return c
}

// tick is one complete tick line of the guest's console.
type tick struct {
	boot string
	n    int
	bad  int
	end  int // offset in the console just after the line
}

var tickLine = regexp.MustCompile(`^snapinit: boot=([0-9a-f]+) tick=(\d+) bad=(\d+)$`)

// ticks returns the complete tick lines in the first limit bytes of the
// console (all of it if limit < 0). A line cut by a snapshot, whose start is
// in the parent's console and whose end in the clone's, matches nowhere.
func ticks(t *testing.T, console string, limit int) []tick {
	t.Helper()
	b, err := os.ReadFile(console)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if limit >= 0 && limit < len(b) {
		b = b[:limit]
	}
	var out []tick
	off := 0
	for {
		i := bytes.IndexByte(b[off:], '\n')
		if i < 0 {
			return out
		}
		line := string(bytes.TrimRight(b[off:off+i], "\r"))
		off += i + 1
		m := tickLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		n, _ := strconv.Atoi(m[2])
		bad, _ := strconv.Atoi(m[3])
		out = append(out, tick{boot: m[1], n: n, bad: bad, end: off})
	}
}

func consoleSize(path string) int {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return int(st.Size())
}

// waitTicks waits until the console at path has more than after complete
// tick lines after offset from, and returns those lines.
func waitTicks(t *testing.T, ctx context.Context, vm *VM, from, after int) []tick {
	t.Helper()
	for {
		var got []tick
		for _, tk := range ticks(t, vm.ConsolePath(), -1) {
			if tk.end > from {
				got = append(got, tk)
			}
		}
		if len(got) > after {
			return got
		}
		select {
		case <-ctx.Done():
			b, _ := os.ReadFile(vm.ConsolePath())
			t.Fatalf("%s: %d tick lines after offset %d, want more than %d; console:\n%s", vm.ID(), len(got), from, after, tail(b, 1500))
		case <-vm.Wait():
			t.Fatalf("%s: QEMU exited (%v)%s", vm.ID(), vm.ExitErr(), logTail(vm.path(QEMULog)))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// checkTicks fails unless every tick is of boot and saw intact memory, and
// the counter never goes back.
func checkTicks(t *testing.T, who string, tks []tick, boot string) {
	t.Helper()
	for i, tk := range tks {
		if tk.boot != boot {
			t.Errorf("%s: tick %d from boot %s, want %s (the guest rebooted?)", who, tk.n, tk.boot, boot)
		}
		if tk.bad != 0 {
			t.Errorf("%s: tick %d found %d pages with a wrong pattern", who, tk.n, tk.bad)
		}
		if i > 0 && tk.n != tks[i-1].n+1 {
			t.Errorf("%s: tick %d follows tick %d", who, tk.n, tks[i-1].n)
		}
	}
}

func restoreVM(t *testing.T, ctx context.Context, cfg Config, opts RestoreOptions) (*VM, time.Duration) {
	t.Helper()
	start := time.Now()
	vm, err := Restore(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Cleanup(func() { vm.Destroy(context.Background()) })
	return vm, took
}

func logSnapshot(t *testing.T, what string, res *SnapshotResult) {
	t.Helper()
	p := res.Phases
	t.Logf("%s: pause %v (stop %v, save %v, freeze %v, cont %v); prepare %v, page map %v; "+
		"device state %d bytes; RAM %d MiB, %d MiB in %d extents copied by %s (%d workers, %d MiB preallocated), %d data pages in %d ranges",
		what, res.Pause.Round(10*time.Microsecond), p.Stop.Round(10*time.Microsecond), p.Save.Round(10*time.Microsecond),
		p.Freeze.Round(10*time.Microsecond), p.Cont.Round(10*time.Microsecond), p.Prepare.Round(10*time.Microsecond),
		p.PageMap.Round(10*time.Microsecond), res.DeviceStateSize, res.RAMSize>>20, res.Freeze.Bytes>>20,
		res.Freeze.Extents, res.Freeze.Method, res.Freeze.Workers, res.Freeze.Preallocated>>20, res.DataPages, len(res.Pages))
}

// checkPages checks a snapshot's page map against its frozen file.
func checkPages(t *testing.T, res *SnapshotResult, minTouched int64) {
	t.Helper()
	var sum uint64
	for i, r := range res.Pages {
		if r.Count == 0 || i > 0 && r.First <= res.Pages[i-1].First+res.Pages[i-1].Count {
			t.Fatalf("page ranges not ascending, disjoint and separated at #%d: %v", i, res.Pages[max(0, i-1):i+1])
		}
		sum += r.Count
	}
	if sum != res.DataPages || int64(sum)*PageSize != res.Freeze.Bytes {
		t.Errorf("%d data pages in ranges, DataPages %d, %d bytes copied", sum, res.DataPages, res.Freeze.Bytes)
	}
	if int64(sum)*PageSize < minTouched || int64(sum)*PageSize >= res.RAMSize {
		t.Errorf("%d MiB of data pages, want at least the %d MiB the guest touched and less than all of RAM", sum*PageSize>>20, minTouched>>20)
	}
	f, err := os.Open(res.FrozenRAMPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ext, err := dataExtents(f, res.RAMSize)
	if err != nil {
		t.Fatal(err)
	}
	if got := pageRanges(ext); !slices.Equal(got, res.Pages) {
		t.Errorf("frozen file's pages differ from the result's (%d vs %d ranges)", len(got), len(res.Pages))
	}
	var st syscall.Stat_t
	if err := syscall.Stat(res.FrozenRAMPath, &st); err == nil && st.Blocks*512 > int64(sum)*PageSize+(1<<20) {
		t.Errorf("frozen file allocates %d MiB for %d MiB of data", st.Blocks*512>>20, sum*PageSize>>20)
	}
}

// TestSnapshotAndClones snapshots a running 256 MiB guest, restores two
// clones from the snapshot and runs them beside the parent: the parent keeps
// running, each clone continues the parent's counter from the snapshot with
// the parent's memory, and the frozen RAM file never changes while all
// three write their memory. A second snapshot, of the paused parent, must
// equal the parent's RAM file byte for byte.
func TestSnapshotAndClones(t *testing.T) {
	img := snapImage(t)
	ctx := qemutest.Context(t, 50*time.Second)
	runRoot, snapDir := t.TempDir(), ramDir(t)
	const memMB, touchMB = 256, 64
	cfg := guestConfig(t, img, runRoot, "parent", memMB, touchMB)
	booted := time.Now()
	parent := startVM(t, cfg)
	pre := waitTicks(t, ctx, parent, 0, 2)
	boot := pre[0].boot
	t.Logf("parent ticking %v after Start", time.Since(booted).Round(time.Millisecond))
	if b, _ := os.ReadFile(parent.ConsolePath()); os.Getenv("SF_TEST_LOG") != "" {
		t.Logf("console:\n%s", b)
	}

	before := consoleSize(parent.ConsolePath())
	res, err := parent.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "dev.state"),
		FrozenRAMPath:   filepath.Join(snapDir, "frozen.ram"),
	})
	if err != nil {
		t.Fatal(err)
	}
	after := consoleSize(parent.ConsolePath())
	logSnapshot(t, "256 MiB guest, 64 MiB touched", res)
	if !res.Resumed || res.Pause < max(res.Phases.Save, res.Phases.Freeze)+res.Phases.Stop+res.Phases.Cont {
		t.Errorf("Resumed %v, pause %v for phases %+v", res.Resumed, res.Pause, res.Phases)
	}
	if res.DeviceStateSize <= 0 || res.DeviceStateSize > 256<<10 {
		t.Errorf("device state of %d bytes, want at most 256 KiB", res.DeviceStateSize)
	}
	if st, err := os.Stat(res.DeviceStatePath); err != nil || st.Size() != res.DeviceStateSize {
		t.Errorf("device state file: %v", err)
	}
	if want := parent.Machine(); res.Machine.mismatch(want) != "" || res.Machine.QEMU == "" || res.Machine.MemMB != memMB {
		t.Errorf("Machine %+v, VM's %+v", res.Machine, want)
	}
	checkPages(t, res, touchMB<<20)
	frozenHash := fileSHA256(t, res.FrozenRAMPath)

	// The snapshot is of a moment between these two console offsets.
	lastBefore := ticks(t, parent.ConsolePath(), before)
	lastAfter := ticks(t, parent.ConsolePath(), after)
	lo, hi := lastBefore[len(lastBefore)-1].n+1, lastAfter[len(lastAfter)-1].n+2

	// Two clones, restored from the snapshot, run beside the parent.
	var clones []*VM
	for _, id := range []string{"clone1", "clone2"} {
		c, took := restoreVM(t, ctx, cloneConfig(cfg, runRoot, id), RestoreOptions{
			DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath, Machine: &res.Machine,
		})
		t.Logf("%s running %v after Restore was called", id, took.Round(100*time.Microsecond))
		clones = append(clones, c)
	}
	for _, c := range clones {
		got := waitTicks(t, ctx, c, 0, 4)
		checkTicks(t, c.ID(), got, boot)
		if got[0].n < lo || got[0].n > hi {
			t.Errorf("%s: first tick %d, want the parent's next at the snapshot, in [%d, %d]", c.ID(), got[0].n, lo, hi)
		}
		if b, _ := os.ReadFile(c.ConsolePath()); bytes.Contains(b, []byte("snapinit: up")) {
			t.Errorf("%s booted afresh", c.ID())
		}
		if c.RAMFile() != res.FrozenRAMPath || c.ConsolePath() == parent.ConsolePath() {
			t.Errorf("%s: RAM %s, console %s", c.ID(), c.RAMFile(), c.ConsolePath())
		}
	}
	resumed := waitTicks(t, ctx, parent, after, 4)
	checkTicks(t, "parent", append(lastAfter, resumed...), boot)
	for _, vm := range append([]*VM{parent}, clones...) {
		if s, err := vm.Status(ctx); err != nil || s != qmp.StatusRunning {
			t.Errorf("%s: status %q, %v; want running", vm.ID(), s, err)
		}
	}
	// All three have written memory since: the scratch area every tick.
	if fileSHA256(t, res.FrozenRAMPath) != frozenHash {
		t.Fatal("the frozen RAM file changed while the parent and clones ran")
	}
	if fileSHA256(t, parent.RAMFile()) == frozenHash {
		t.Error("the parent's RAM file still equals the snapshot: the guest wrote nothing?")
	}

	// Existing files are never overwritten, and a failed snapshot leaves
	// the parent running.
	if _, err := parent.Snapshot(ctx, SnapshotOptions{DeviceStatePath: filepath.Join(snapDir, "dev2.state"),
		FrozenRAMPath: res.FrozenRAMPath}); err == nil {
		t.Error("snapshot over the frozen file of another snapshot succeeded")
	}
	if _, err := os.Stat(filepath.Join(snapDir, "dev2.state")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed snapshot left its device state: %v", err)
	}

	// A snapshot of the paused parent leaves it paused and equals its RAM.
	if err := parent.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	res2, err := parent.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "dev2.state"),
		FrozenRAMPath:   filepath.Join(snapDir, "frozen2.ram"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if res2.Resumed || res2.Pause != 0 {
		t.Errorf("snapshot of a paused VM: Resumed %v, Pause %v", res2.Resumed, res2.Pause)
	}
	if s, _ := parent.Status(ctx); s != qmp.StatusPostMigrate {
		t.Errorf("after the snapshot of a paused VM: %q, want %q", s, qmp.StatusPostMigrate)
	}
	if fileSHA256(t, res2.FrozenRAMPath) != fileSHA256(t, parent.RAMFile()) {
		t.Error("the frozen RAM of a paused VM differs from its RAM file")
	}
	checkPages(t, res2, touchMB<<20)
	mark := consoleSize(parent.ConsolePath())
	if err := parent.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	checkTicks(t, "parent after its second snapshot", waitTicks(t, ctx, parent, mark, 1), boot)

	// Destroying a clone leaves the frozen file to the others.
	if err := clones[0].Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if fileSHA256(t, res.FrozenRAMPath) != frozenHash {
		t.Error("frozen RAM file changed or removed by a clone's Destroy")
	}
	mark = consoleSize(clones[1].ConsolePath())
	checkTicks(t, "clone2", waitTicks(t, ctx, clones[1], mark, 1), boot)
}

// touchEnv overrides how many MiB the guest of TestSnapshot1GiB fills.
const touchEnv = "SF_TEST_TOUCH_MB"

// TestSnapshot1GiB measures the pause of a 1 GiB guest with 256 MiB touched,
// the target (pause <= 100 ms, stretch <= 20 ms; device state <= 256
// KiB), and restores a clone from it. The guest's kernel and boot touch about
// 110 MiB themselves (QEMU loads the 66 MB vmlinux into guest RAM), so the
// guest's own fill is 150 MiB.
func TestSnapshot1GiB(t *testing.T) {
	img := snapImage(t)
	ctx := qemutest.Context(t, 50*time.Second)
	runRoot, snapDir := t.TempDir(), ramDir(t)
	const memMB = 1024
	touchMB := 150
	if s := os.Getenv(touchEnv); s != "" {
		var err error
		if touchMB, err = strconv.Atoi(s); err != nil {
			t.Fatalf("%s: %v", touchEnv, err)
		}
	}
	cfg := guestConfig(t, img, runRoot, "big", memMB, touchMB)
	parent := startVM(t, cfg)
	pre := waitTicks(t, ctx, parent, 0, 2)
	b, _ := os.ReadFile(parent.ConsolePath())
	if i := bytes.Index(b, []byte("snapinit: filled")); i >= 0 {
		t.Logf("guest: %s", b[i:i+bytes.IndexByte(b[i:], '\n')])
	}
	var pauses []time.Duration
	var res *SnapshotResult
	for i := range 3 {
		r, err := parent.Snapshot(ctx, SnapshotOptions{
			DeviceStatePath: filepath.Join(snapDir, fmt.Sprintf("dev%d.state", i)),
			FrozenRAMPath:   filepath.Join(snapDir, fmt.Sprintf("frozen%d.ram", i)),
		})
		if err != nil {
			t.Fatal(err)
		}
		logSnapshot(t, fmt.Sprintf("1 GiB guest, %d MiB filled, snapshot %d", touchMB, i+1), r)
		pauses = append(pauses, r.Pause)
		if res == nil {
			res = r
		} else {
			os.Remove(r.FrozenRAMPath)
		}
	}
	slices.Sort(pauses)
	t.Logf("1 GiB guest, %d MiB of data pages: median pause of %d snapshots %v (target <= 100 ms for 256 MiB, stretch <= 20 ms); copy at %.1f GB/s",
		res.DataPages*PageSize>>20, len(pauses), pauses[len(pauses)/2].Round(100*time.Microsecond),
		float64(res.Freeze.Bytes)/res.Phases.Freeze.Seconds()/1e9)
	if res.DeviceStateSize > 256<<10 {
		t.Errorf("device state of %d bytes, want at most 256 KiB", res.DeviceStateSize)
	}
	checkPages(t, res, int64(touchMB)<<20)
	frozenHash := fileSHA256(t, res.FrozenRAMPath)

	clone, took := restoreVM(t, ctx, cloneConfig(cfg, runRoot, "big-clone"), RestoreOptions{
		DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath, Machine: &res.Machine,
	})
	t.Logf("clone running %v after Restore was called", took.Round(100*time.Microsecond))
	got := waitTicks(t, ctx, clone, 0, 2)
	checkTicks(t, "clone", got, pre[0].boot)
	if fileSHA256(t, res.FrozenRAMPath) != frozenHash {
		t.Fatal("the frozen RAM file changed while the parent and the clone ran")
	}
}

// Snapshot and restore of a VM that runs only its firmware: the mechanics,
// without the guest image.
func TestSnapshotRestoreFirmware(t *testing.T) {
	ctx := qemutest.Context(t, 20*time.Second)
	runRoot, snapDir := t.TempDir(), ramDir(t)
	cfg := testConfig(t, runRoot, "fw")
	parent := startVM(t, cfg)
	waitFor(t, ctx, "SeaBIOS on the console", func() bool {
		b, _ := os.ReadFile(parent.ConsolePath())
		return bytes.Contains(b, []byte("SeaBIOS"))
	})
	res, err := parent.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "dev.state"),
		FrozenRAMPath:   filepath.Join(snapDir, "frozen.ram"),
	})
	if err != nil {
		t.Fatal(err)
	}
	logSnapshot(t, "64 MiB firmware-only VM", res)
	cloneRoot := t.TempDir()
	clone, _ := restoreVM(t, ctx, cloneConfig(cfg, cloneRoot, "fw-clone"), RestoreOptions{
		DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath, Machine: &res.Machine,
	})
	if s, err := clone.Status(ctx); err != nil || s != qmp.StatusRunning {
		t.Fatalf("clone status %q, %v", s, err)
	}
	// vm.json names no RAM file, so that Reap leaves the frozen file alone.
	var st vmState
	if b, err := os.ReadFile(filepath.Join(clone.RunDir(), StateFile)); err != nil || json.Unmarshal(b, &st) != nil || st.RAMFile != "" {
		t.Errorf("clone's state file (%v) names RAM file %q", err, st.RAMFile)
	}
	if err := clone.Destroy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(res.FrozenRAMPath); err != nil {
		t.Errorf("Destroy of a clone removed the frozen file: %v", err)
	}
	if n, err := Reap(cloneRoot, testLogger(t)); err != nil || n != 1 {
		t.Errorf("Reap: %d, %v", n, err)
	}
	if _, err := os.Stat(res.FrozenRAMPath); err != nil {
		t.Errorf("Reap removed the frozen file: %v", err)
	}
}

// Restore refuses what cannot work, before or after starting QEMU, and
// leaves the frozen file as it was.
func TestRestoreRefuses(t *testing.T) {
	ctx := qemutest.Context(t, 20*time.Second)
	runRoot, snapDir := t.TempDir(), ramDir(t)
	cfg := testConfig(t, runRoot, "src")
	parent := startVM(t, cfg)
	res, err := parent.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "dev.state"),
		FrozenRAMPath:   filepath.Join(snapDir, "frozen.ram"),
	})
	if err != nil {
		t.Fatal(err)
	}
	hash := fileSHA256(t, res.FrozenRAMPath)
	corrupt := filepath.Join(snapDir, "corrupt.state")
	good, _ := os.ReadFile(res.DeviceStatePath)
	os.WriteFile(corrupt, append(good[:len(good)/2:len(good)/2], bytes.Repeat([]byte{0xff}, 4096)...), 0o600)

	bigger := cloneConfig(cfg, runRoot, "bigger")
	bigger.MemMB *= 2
	moreCPUs := cloneConfig(cfg, runRoot, "smp")
	moreCPUs.VCPUs = 2
	otherQEMU := res.Machine
	otherQEMU.QEMU = "1.0.0"
	tests := []struct {
		cfg     Config
		opts    RestoreOptions
		wantErr error
	}{
		{bigger, RestoreOptions{DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath}, ErrMachineMismatch},
		{moreCPUs, RestoreOptions{DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath, Machine: &res.Machine}, ErrMachineMismatch},
		{cloneConfig(cfg, runRoot, "ver"), RestoreOptions{DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath, Machine: &otherQEMU}, ErrMachineMismatch},
		{cloneConfig(cfg, runRoot, "nodev"), RestoreOptions{DeviceStatePath: filepath.Join(snapDir, "none"), RAMPath: res.FrozenRAMPath}, os.ErrNotExist},
		{cloneConfig(cfg, runRoot, "noram"), RestoreOptions{DeviceStatePath: res.DeviceStatePath, RAMPath: filepath.Join(snapDir, "none")}, os.ErrNotExist},
		{cloneConfig(cfg, runRoot, "corrupt"), RestoreOptions{DeviceStatePath: corrupt, RAMPath: res.FrozenRAMPath}, nil},
	}
	for i, tc := range tests {
		vm, err := Restore(ctx, tc.cfg, tc.opts)
		if err == nil {
			vm.Destroy(ctx)
			t.Errorf("#%d: restored", i)
			continue
		}
		if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
			t.Errorf("#%d: got %v, want %v", i, err, tc.wantErr)
		}
		if _, err := os.Stat(filepath.Join(tc.cfg.RunDir, PIDFile)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("#%d: pid file left behind: %v", i, err)
		}
		t.Logf("#%d: %v", i, err)
	}
	if fileSHA256(t, res.FrozenRAMPath) != hash {
		t.Error("a failed restore changed the frozen file")
	}
}
