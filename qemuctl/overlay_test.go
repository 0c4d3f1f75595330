package qemuctl

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
)

func TestDeviceStateFormat(t *testing.T) {
	hdr := func(magic, version uint32, section byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, magic)
		b = binary.BigEndian.AppendUint32(b, version)
		return append(b, section)
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want DeviceStateFormat
	}{
		{"migration", hdr(streamMagic, 3, 0x07), FormatMigration},
		{"devices", hdr(streamMagic, 3, 0x04), FormatDevices},
		{"empty", nil, 0},
		{"short", hdr(streamMagic, 3, 0x07)[:8], 0},
		{"magic", hdr(0x51455600, 3, 0x07), 0},
		{"version", hdr(streamMagic, 2, 0x07), 0},
		{"section", hdr(streamMagic, 3, 0x02), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := deviceStateFormat(tc.in)
			if got != tc.want || (tc.want == 0) != errors.Is(err, ErrBadDeviceState) {
				t.Errorf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

// TestSnapshotOfClone snapshots a running clone, a VM whose RAM is a
// private mapping of its parent's frozen file, and restores a clone of the
// clone from it: the snapshot holds only the pages the clone wrote, over
// the frozen file, and the grandchild continues the clone's counter with
// the parent's memory intact.
func TestSnapshotOfClone(t *testing.T) {
	img := snapImage(t)
	ctx := qemutest.Context(t, 60*time.Second)
	runRoot, snapDir := t.TempDir(), ramDir(t)
	const memMB, touchMB = 256, 64
	cfg := guestConfig(t, img, runRoot, "parent", memMB, touchMB)
	parent := startVM(t, cfg)
	boot := waitTicks(t, ctx, parent, 0, 2)[0].boot
	res, err := parent.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "dev.state"),
		FrozenRAMPath:   filepath.Join(snapDir, "frozen.ram"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Format != FormatMigration || res.Base != "" {
		t.Errorf("parent's snapshot: format %v, base %q", res.Format, res.Base)
	}
	parent.Destroy(ctx) // the clone needs only the frozen file
	frozenHash := fileSHA256(t, res.FrozenRAMPath)

	clone, _ := restoreVM(t, ctx, cloneConfig(cfg, runRoot, "clone"), RestoreOptions{
		DeviceStatePath: res.DeviceStatePath, RAMPath: res.FrozenRAMPath, Machine: &res.Machine,
	})
	checkTicks(t, "clone", waitTicks(t, ctx, clone, 0, 3), boot)

	before := consoleSize(clone.ConsolePath())
	cres, err := clone.Snapshot(ctx, SnapshotOptions{
		DeviceStatePath: filepath.Join(snapDir, "clone.state"),
		FrozenRAMPath:   filepath.Join(snapDir, "clone.overlay"),
	})
	if err != nil {
		t.Fatal(err)
	}
	after := consoleSize(clone.ConsolePath())
	ov := cres.Overlay
	t.Logf("clone's snapshot: pause %v (stop %v, save %v, copy %v, cont %v); device state %d bytes; "+
		"%d pages scanned, %d private (%d zero), %d KiB stored",
		cres.Pause.Round(10*time.Microsecond), cres.Phases.Stop.Round(10*time.Microsecond),
		cres.Phases.Save.Round(10*time.Microsecond), cres.Phases.Freeze.Round(10*time.Microsecond),
		cres.Phases.Cont.Round(10*time.Microsecond), cres.DeviceStateSize, ov.Scanned, ov.Private, ov.Zero, ov.Bytes>>10)
	if cres.Format != FormatDevices || cres.Base != res.FrozenRAMPath || !cres.Resumed {
		t.Errorf("format %v, base %q, resumed %v", cres.Format, cres.Base, cres.Resumed)
	}
	if f, err := DeviceStateFormatOf(cres.DeviceStatePath); err != nil || f != FormatDevices {
		t.Errorf("device state format %v, %v", f, err)
	}
	if cres.DeviceStateSize <= 0 || cres.DeviceStateSize > 256<<10 {
		t.Errorf("device state of %d bytes, want at most 256 KiB", cres.DeviceStateSize)
	}
	// The clone wrote its scratch area (4 MiB), stacks and kernel data;
	// the 64 MiB it only read, and the rest of RAM, are not its own.
	pages := uint64(memMB << 20 / PageSize)
	if ov.Scanned != pages || ov.Private < (4<<20)/PageSize || ov.Private > pages/8 {
		t.Errorf("scanned %d pages, %d private; want %d scanned and 4 MiB..1/8 of RAM private", ov.Scanned, ov.Private, pages)
	}
	if uint64(ov.Bytes) != cres.DataPages*PageSize || cres.DataPages+ov.Zero != ov.Private {
		t.Errorf("%d bytes stored for %d data pages, %d zero, %d private", ov.Bytes, cres.DataPages, ov.Zero, ov.Private)
	}
	if fileSHA256(t, res.FrozenRAMPath) != frozenHash {
		t.Fatal("the clone's snapshot changed its parent's frozen file")
	}

	merged := filepath.Join(snapDir, "clone.ram")
	if err := MergeOverlay(cres, merged); err != nil {
		t.Fatal(err)
	}
	lastBefore := ticks(t, clone.ConsolePath(), before)
	lastAfter := ticks(t, clone.ConsolePath(), after)
	lo, hi := lastBefore[len(lastBefore)-1].n+1, lastAfter[len(lastAfter)-1].n+2

	grand, took := restoreVM(t, ctx, cloneConfig(cfg, runRoot, "grandchild"), RestoreOptions{
		DeviceStatePath: cres.DeviceStatePath, RAMPath: merged, Machine: &cres.Machine,
	})
	t.Logf("grandchild running %v after Restore was called", took.Round(100*time.Microsecond))
	got := waitTicks(t, ctx, grand, 0, 4)
	checkTicks(t, "grandchild", got, boot)
	if got[0].n < lo || got[0].n > hi {
		t.Errorf("grandchild's first tick %d, want the clone's next at its snapshot, in [%d, %d]", got[0].n, lo, hi)
	}
	if b, _ := os.ReadFile(grand.ConsolePath()); bytes.Contains(b, []byte("snapinit: up")) {
		t.Error("the grandchild booted afresh")
	}
	checkTicks(t, "clone after its snapshot", waitTicks(t, ctx, clone, after, 2), boot)

	// Refusals: the clone's own frozen file, existing files.
	for _, o := range []SnapshotOptions{
		{DeviceStatePath: filepath.Join(snapDir, "x.state"), FrozenRAMPath: res.FrozenRAMPath},
		{DeviceStatePath: cres.DeviceStatePath, FrozenRAMPath: filepath.Join(snapDir, "x.overlay")},
		{DeviceStatePath: filepath.Join(snapDir, "y.state"), FrozenRAMPath: cres.FrozenRAMPath},
	} {
		if _, err := clone.Snapshot(ctx, o); err == nil {
			t.Errorf("snapshot %+v succeeded", o)
		}
	}
	for _, name := range []string{"x.state", "x.overlay", "y.state"} {
		if _, err := os.Stat(filepath.Join(snapDir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a refused snapshot left %s: %v", name, err)
		}
	}
}
