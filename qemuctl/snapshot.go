package qemuctl

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/qmp"
)

// snapshotFD is the name under which QEMU holds the device state file.
const snapshotFD = "sf-device-state"

// resumeGrace bounds resuming the guest after a failed snapshot, when the
// caller's context may be what failed.
const resumeGrace = 5 * time.Second

// SnapshotOptions say where a snapshot goes. Both files are created by
// Snapshot and must not exist: a frozen file may be mapped by clones, and a
// device state read by a restore, so neither is ever overwritten.
type SnapshotOptions struct {
	// DeviceStatePath receives the device state: QEMU's migration stream
	// without guest RAM, the payload of a VM descriptor.
	DeviceStatePath string
	// FrozenRAMPath receives the frozen copy of guest RAM that clones map.
	// It should be on the same tmpfs as the VM's RAM file.
	FrozenRAMPath string
	// CopyWorkers is the number of parallel copiers of RAM; 0 means
	// min(GOMAXPROCS, 4).
	CopyWorkers int
}

// SnapshotPhases time the steps of a snapshot. Stop, Save, Freeze and Cont
// make up the pause, where Save and Freeze run at the same time; Prepare
// precedes the pause and PageMap follows it.
type SnapshotPhases struct {
	Prepare time.Duration `json:"prepare"` // capabilities, files, preallocation
	Stop    time.Duration `json:"stop"`    // QMP stop
	Save    time.Duration `json:"save"`    // device state migration, to completed
	Freeze  time.Duration `json:"freeze"`  // copying RAM, beside Save
	Cont    time.Duration `json:"cont"`    // QMP cont
	PageMap time.Duration `json:"page_map"`
}

// SnapshotResult describes a snapshot.
type SnapshotResult struct {
	DeviceStatePath string `json:"device_state_path"`
	DeviceStateSize int64  `json:"device_state_size"` // bytes
	FrozenRAMPath   string `json:"frozen_ram_path"`
	RAMSize         int64  `json:"ram_size"` // bytes: the guest's RAM and the frozen file's size
	// Machine is what a clone's configuration must match (RestoreOptions).
	Machine Machine `json:"machine"`

	// Pause is how long the guest was stopped: from sending stop to cont's
	// reply. Zero when the VM was not running, in which case Snapshot leaves
	// it stopped.
	Pause   time.Duration  `json:"pause"`
	Resumed bool           `json:"resumed"`
	Phases  SnapshotPhases `json:"phases"`
	Freeze  FreezeStats    `json:"freeze"`

	// Pages are the frozen file's data pages, ascending: every page the
	// guest had written. The others are holes that read as zero and never
	// need fetching.
	Pages     []PageRange `json:"pages"`
	DataPages uint64      `json:"data_pages"` // the sum of Pages' counts

	// Format is the device state's: FormatMigration, or FormatDevices for
	// the snapshot of a clone.
	Format DeviceStateFormat `json:"format"`

	// Base is set for the snapshot of a clone: the frozen RAM file the clone
	// maps, over which FrozenRAMPath is an overlay. The snapshot's memory
	// is then Base's, but for the pages in Pages (the clone's own, with
	// data, in FrozenRAMPath) and ZeroPages (its own, all zero, holes in
	// FrozenRAMPath). MergeOverlay makes a full RAM file of it.
	Base      string       `json:"base,omitempty"`
	ZeroPages []PageRange  `json:"zero_pages,omitempty"`
	Overlay   OverlayStats `json:"overlay,omitempty"`
}

// Snapshot saves the VM's device state and freezes its RAM: it stops the
// guest, saves the device state without RAM (migration capability
// x-ignore-shared) to opts.DeviceStatePath, copies the RAM file into
// opts.FrozenRAMPath, and resumes the guest. The parent's later writes go to
// its own RAM file and never reach the frozen file. A VM that was not
// running is left stopped (QEMU then reports StatusPostMigrate).
//
// Snapshots of one VM are serialised. On error the guest is resumed if
// Snapshot stopped it, and neither file is left behind.
func (vm *VM) Snapshot(ctx context.Context, opts SnapshotOptions) (*SnapshotResult, error) {
	vm.snapMu.Lock()
	defer vm.snapMu.Unlock()
	res, err := vm.snapshot(ctx, opts)
	if err != nil {
		return nil, &opError{"snapshot of " + vm.cfg.ID, vm.exitedErr(ctx, err)}
	}
	vm.log.Info("snapshot", "device_state", res.DeviceStatePath, "device_state_bytes", res.DeviceStateSize,
		"frozen_ram", res.FrozenRAMPath, "pause", res.Pause, "stop", res.Phases.Stop, "save", res.Phases.Save,
		"freeze", res.Phases.Freeze, "cont", res.Phases.Cont, "freeze_method", res.Freeze.Method,
		"copied_bytes", res.Freeze.Bytes, "extents", res.Freeze.Extents, "data_pages", res.DataPages)
	return res, nil
}

func (vm *VM) snapshot(ctx context.Context, opts SnapshotOptions) (res *SnapshotResult, err error) {
	devPath, frozenPath, err := snapshotPaths(opts)
	if err != nil {
		return nil, err
	}
	if !vm.ownsRAM {
		if frozenPath == vm.ram {
			return nil, errors.New("FrozenRAMPath is the clone's frozen RAM file")
		}
		return vm.snapshotClone(ctx, devPath, frozenPath)
	}
	if frozenPath == vm.ram {
		return nil, errors.New("FrozenRAMPath is the VM's RAM file")
	}
	begin := time.Now()
	running, err := vm.snapshotRunning(ctx)
	if err != nil {
		return nil, err
	}
	if err := vm.qmp.MigrateSetCapabilities(ctx, deviceStateCaps); err != nil {
		return nil, err
	}

	res = &SnapshotResult{DeviceStatePath: devPath, FrozenRAMPath: frozenPath,
		RAMSize: int64(vm.cfg.MemMB) << 20, Machine: vm.Machine(), Format: FormatMigration}
	dev, err := os.OpenFile(devPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	defer func() {
		dev.Close()
		if err != nil {
			os.Remove(devPath)
		}
	}()
	fz, err := prepareFreeze(vm.ram, frozenPath, res.RAMSize, opts.CopyWorkers)
	if err != nil {
		return nil, fmt.Errorf("freezing RAM: %w", err)
	}
	defer func() {
		if err != nil {
			fz.abort()
		}
	}()
	if err := vm.qmp.GetFD(ctx, snapshotFD, dev); err != nil {
		return nil, err
	}
	fdHeld := true // by QEMU, until a migration takes it
	sub := vm.qmp.Subscribe("MIGRATION")
	defer sub.Close()
	res.Phases.Prepare = time.Since(begin)

	// The pause: every step until cont is guest downtime.
	pauseStart := time.Now()
	stopped := false
	defer func() {
		if err == nil {
			return
		}
		bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), resumeGrace)
		defer cancel()
		if fdHeld {
			vm.qmp.CloseFD(bg, snapshotFD)
		}
		if stopped {
			vm.resumeAfterFailure(bg)
		}
	}()
	t := time.Now()
	if stopped, err = vm.stopIf(ctx, running); err != nil {
		return nil, err
	}
	res.Phases.Stop = time.Since(t)

	// Guest RAM does not change from here to cont: the vCPUs are stopped
	// and a migration with x-ignore-shared does not write it. So RAM is
	// copied while QEMU saves the device state.
	t = time.Now()
	type frozen struct {
		stats FreezeStats
		took  time.Duration
		err   error
	}
	freezeDone := make(chan frozen, 1)
	go func() {
		st, err := fz.copy()
		freezeDone <- frozen{st, time.Since(t), err}
	}()
	saveErr := vm.qmp.Migrate(ctx, "fd:"+snapshotFD)
	if saveErr == nil {
		fdHeld = false
		if saveErr = waitMigration(ctx, vm.qmp, sub); saveErr != nil {
			vm.cancelMigration(ctx, sub)
		}
	}
	res.Phases.Save = time.Since(t)
	fr := <-freezeDone // also on error: fz must not be in use when aborted
	if saveErr != nil {
		return nil, saveErr
	}
	if fr.err != nil {
		return nil, fmt.Errorf("freezing RAM: %w", fr.err)
	}
	res.Freeze, res.Phases.Freeze = fr.stats, fr.took

	if running {
		t = time.Now()
		if err := vm.waitPostMigrate(ctx); err != nil {
			return nil, err
		}
		if err := vm.qmp.Cont(ctx); err != nil {
			return nil, err
		}
		stopped = false
		res.Phases.Cont = time.Since(t)
		res.Pause = time.Since(pauseStart)
		res.Resumed = true
	}

	t = time.Now()
	if res.Pages, err = fz.finish(); err != nil {
		return nil, fmt.Errorf("mapping the frozen RAM: %w", err)
	}
	for _, r := range res.Pages {
		res.DataPages += r.Count
	}
	res.Phases.PageMap = time.Since(t)
	st, err := dev.Stat()
	if err != nil {
		return nil, err
	}
	res.DeviceStateSize = st.Size()
	return res, nil
}

// stopIf stops the guest if it runs and reports whether it did.
func (vm *VM) stopIf(ctx context.Context, running bool) (bool, error) {
	if !running {
		return false, nil
	}
	return true, vm.qmp.Stop(ctx)
}

// resumeAfterFailure resumes a guest a failed snapshot stopped; ctx should
// outlive the caller's, which may be what failed.
func (vm *VM) resumeAfterFailure(ctx context.Context) {
	if err := vm.qmp.Cont(ctx); err != nil {
		vm.log.Error("resuming the guest after a failed snapshot", "error", err)
	}
}

// snapshotRunning reports whether the VM runs (a snapshot stops it and
// resumes it after) or is stopped (it stays so); other states cannot be
// snapshotted.
func (vm *VM) snapshotRunning(ctx context.Context) (bool, error) {
	status, err := vm.qmp.QueryStatus(ctx)
	if err != nil {
		return false, err
	}
	switch status {
	case qmp.StatusRunning:
		return true, nil
	case qmp.StatusPaused, qmp.StatusPostMigrate:
		return false, nil
	}
	return false, fmt.Errorf("cannot snapshot a VM in state %q", status)
}

// waitPostMigrate waits for the run state to leave finish-migrate, which
// QEMU does a moment after it reported the migration completed; cont is
// refused until then.
func (vm *VM) waitPostMigrate(ctx context.Context) error {
	for delay := 50 * time.Microsecond; ; delay = min(2*delay, 10*time.Millisecond) {
		s, err := vm.qmp.QueryStatus(ctx)
		if err != nil || s != qmp.StatusFinishMigrate {
			return err
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

// cancelMigration cancels a migration that is still going after a failed
// wait and gives it a moment to end, so that the guest can be resumed.
func (vm *VM) cancelMigration(ctx context.Context, sub *qmp.Subscription) {
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), resumeGrace)
	defer cancel()
	if err := vm.qmp.Execute(bg, "migrate_cancel", nil, nil); err != nil {
		return
	}
	if err := waitMigration(bg, vm.qmp, sub); err != nil && !errors.Is(err, ErrMigrationFailed) {
		vm.log.Warn("the cancelled migration did not end", "error", err)
	}
}

func snapshotPaths(opts SnapshotOptions) (dev, frozen string, err error) {
	if opts.DeviceStatePath == "" || opts.FrozenRAMPath == "" {
		return "", "", errors.New("DeviceStatePath and FrozenRAMPath are required")
	}
	if dev, err = filepath.Abs(opts.DeviceStatePath); err != nil {
		return "", "", err
	}
	if frozen, err = filepath.Abs(opts.FrozenRAMPath); err != nil {
		return "", "", err
	}
	if dev == frozen {
		return "", "", errors.New("DeviceStatePath and FrozenRAMPath are the same file")
	}
	return dev, frozen, nil
}
