package qemuctl

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/lazyram"
	"github.com/snowflock-go/snowflock/memserver"
	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
)

// memserverSource adapts a memserver client to lazyram's PageSource.
type memserverSource struct{ c *memserver.Client }

func (s memserverSource) Fetch(ctx context.Context, pages []uint64) ([]lazyram.Page, error) {
	got, err := s.c.Fetch(ctx, pages)
	if err != nil {
		return nil, err
	}
	out := make([]lazyram.Page, len(got))
	for i, p := range got {
		out[i] = lazyram.Page{Num: p.Num, Zero: p.Zero, Data: p.Data}
	}
	return out, nil
}

// TestRestoreFromLazyRAM is memory on demand end to end on one host: a
// parent is snapshotted, its frozen RAM is served by a real memserver over
// TCP, and two clones are restored from a lazyram FUSE file that fetches a
// page the first time a clone touches it. The clones must continue from the
// snapshot with the parent's memory, fetch only pages that hold data, and
// the second clone must find the first clone's pages already local.
// (It lives here for the snapshot test helpers; hostd will own this flow.)
func TestRestoreFromLazyRAM(t *testing.T) {
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI runs as root with /dev/fuse")
		}
		t.Skip("needs root and /dev/fuse")
	}
	img := snapImage(t)
	ctx := qemutest.Context(t, 90*time.Second)
	runRoot, snapDir := t.TempDir(), ramDir(t)
	const memMB, touchMB = 256, 32
	cfg := guestConfig(t, img, runRoot, "parent", memMB, touchMB)
	parent := startVM(t, cfg)
	pre := waitTicks(t, ctx, parent, 0, 2)
	res, err := parent.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "dev.state"), FrozenRAMPath: filepath.Join(snapDir, "frozen.ram")})
	if err != nil {
		t.Fatal(err)
	}

	ms, err := memserver.New(memserver.Config{Listen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- ms.Serve(sctx) }()
	t.Cleanup(func() { stop(); <-served; ms.Close() })
	capab, err := ms.Register(memserver.SnapshotSpec{ID: "snap1", Path: res.FrozenRAMPath, Size: res.RAMSize})
	if err != nil {
		t.Fatal(err)
	}
	client, err := memserver.Dial(ctx, ms.Addr().String(), "snap1", capab)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })

	lz, err := lazyram.Mount(filepath.Join(t.TempDir(), "mnt"), filepath.Join(snapDir, "lazy"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ranges := slices.Clone(res.Pages)
	hasData := func(p uint64) bool {
		i := sort.Search(len(ranges), func(i int) bool { return ranges[i].First+ranges[i].Count > p })
		return i < len(ranges) && ranges[i].First <= p
	}
	lazyPath, err := lz.Add(lazyram.Snapshot{ID: "snap1", Size: res.RAMSize, HasData: hasData, Source: memserverSource{client}})
	if err != nil {
		t.Fatal(err)
	}

	var clones []*VM
	for i, id := range []string{"lazy1", "lazy2"} {
		start := time.Now()
		c, err := Restore(ctx, cloneConfig(cfg, runRoot, id), RestoreOptions{DeviceStatePath: res.DeviceStatePath,
			RAMPath: lazyPath, Machine: &res.Machine})
		if err != nil {
			t.Fatal(err)
		}
		clones = append(clones, c)
		if flags, err := vmFlags(c.PID(), lazyPath); err != nil {
			t.Fatal(err)
		} else if noTHPSupported && slices.Contains(flags, "hg") {
			t.Fatalf("%s: the clone's RAM mapping is advised for huge pages (VmFlags %v): faults read 2-4 MiB around", id, flags)
		}
		tks := waitTicks(t, ctx, c, 0, 3)
		checkTicks(t, id, tks, pre[0].boot)
		st, _ := lz.Stats("snap1")
		t.Logf("%s: running %v after Restore; pages fetched so far %d of %d data pages (%d fetches)",
			id, time.Since(start).Round(time.Millisecond), st.PagesFetched, res.DataPages, st.Fetches)
		if i == 0 && st.PagesFetched == 0 {
			t.Fatal("the first clone fetched nothing: not served lazily")
		}
	}
	for _, c := range clones {
		if err := c.Destroy(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	// Unmount only after the clones have unmapped the file.
	if err := lz.Unmount(); err != nil {
		t.Fatal(err)
	}
	st := ms.Stats()
	t.Logf("memserver: %+v", st)
}

// vmFlags returns the VmFlags of process pid's mapping of path.
func vmFlags(pid int, path string) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return nil, err
	}
	in := false
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) >= 6 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":"):
			in = f[len(f)-1] == path
		case in && len(f) > 0 && f[0] == "VmFlags:":
			return f[1:], nil
		}
	}
	return nil, fmt.Errorf("no mapping of %s in process %d", path, pid)
}
