package qemuctl

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// restoreWait bounds the incoming migration of a Restore when the caller's
// context allows longer: a device state of a few hundred kilobytes loads in
// milliseconds, so a stuck one is a fault.
const restoreWait = 30 * time.Second

// incomingFD is QEMU's descriptor for the device state in a Restore: the
// first after the monitor's (3).
const incomingFD = 4

// RestoreOptions say what a clone is restored from.
type RestoreOptions struct {
	// DeviceStatePath is a device state saved by Snapshot, of a VM that owns
	// its RAM or of a clone (either Format).
	DeviceStatePath string
	// RAMPath is the frozen RAM file the clone maps private (share=off):
	// it reads the snapshot's pages and keeps its own writes. It must exist
	// and be exactly Config.MemMB MiB. Any number of clones may map it; it
	// must not change while they run, and Destroy leaves it in place.
	RAMPath string
	// Machine, if set, is the snapshot's (SnapshotResult.Machine): Restore
	// refuses a Config that does not match it, with ErrMachineMismatch,
	// instead of leaving QEMU to fail or the guest to misbehave.
	Machine *Machine
}

// Restore starts a clone: a QEMU with cfg's machine, its RAM mapped private
// from opts.RAMPath, that loads the device state from opts.DeviceStatePath
// and then runs. It returns once the guest runs.
//
// cfg must describe the parent's machine (see Machine): MemMB, VCPUs, Accel,
// CPU, whether there is a Kernel, and Extra must be the parent's; the same
// QEMU version must run it. ID, RunDir and Logger are the clone's own, and
// so are the console and the guest channel in RunDir. RAMDir is not used.
// Stop the clone with Destroy.
func Restore(ctx context.Context, cfg Config, opts RestoreOptions) (*VM, error) {
	vm, err := restore(ctx, cfg, opts)
	if err != nil {
		return nil, &opError{"restore " + cfg.ID, err}
	}
	return vm, nil
}

func restore(ctx context.Context, cfg Config, opts RestoreOptions) (*VM, error) {
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	log := cfg.Logger.With("vm", cfg.ID)
	begin := time.Now()

	ramPath, err := cloneRAM(opts.RAMPath, int64(cfg.MemMB)<<20)
	if err != nil {
		return nil, err
	}
	if opts.DeviceStatePath == "" {
		return nil, errors.New("DeviceStatePath is required")
	}
	dev, err := os.Open(opts.DeviceStatePath)
	if err != nil {
		return nil, err
	}
	defer dev.Close() // QEMU has its own copy
	var h [streamHeaderLength]byte
	if _, err := dev.ReadAt(h[:], 0); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrBadDeviceState, opts.DeviceStatePath, err)
	}
	format, err := deviceStateFormat(h[:])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", opts.DeviceStatePath, err)
	}

	accel, cpu := cfg.accelAndCPU(log)
	if opts.Machine != nil {
		want := *opts.Machine
		want.QEMU = "" // checked once QEMU has greeted
		if d := cfg.machine(accel, cpu).mismatch(want); d != "" {
			return nil, fmt.Errorf("%w: %s", ErrMachineMismatch, d)
		}
	}
	if err := os.MkdirAll(cfg.RunDir, 0o700); err != nil {
		return nil, err
	}
	mem := memory{path: ramPath, private: true, incoming: true, devices: format == FormatDevices}
	vm, err := start(ctx, cfg, log, accel, cfg.args(accel, cpu, mem), mem, []*os.File{dev})
	if err != nil {
		return nil, err
	}
	started := time.Since(begin)
	if err := vm.incoming(ctx, opts.Machine); err != nil {
		vm.Destroy(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("%w%s", err, logTail(vm.path(QEMULog)))
	}
	log.Info("restored", "pid", vm.pid, "ram", ramPath, "device_state", opts.DeviceStatePath,
		"qemu_up", started, "running_after", time.Since(begin))
	return vm, nil
}

// incoming loads the device state QEMU holds as incomingFD and resumes the
// guest once it is loaded: a cont during the load would leave it stopped.
func (vm *VM) incoming(ctx context.Context, want *Machine) error {
	if want != nil && want.QEMU != "" {
		if got := qemuVersion(vm.qmp.Greeting()); got != want.QEMU {
			return fmt.Errorf("%w: QEMU %s, snapshot from QEMU %s", ErrMachineMismatch, got, want.QEMU)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, restoreWait)
	defer cancel()
	if err := vm.qmp.MigrateSetCapabilities(ctx, deviceStateCaps); err != nil {
		return vm.exitedErr(ctx, err)
	}
	sub := vm.qmp.Subscribe("MIGRATION")
	defer sub.Close()
	if err := vm.qmp.MigrateIncoming(ctx, fmt.Sprintf("fd:%d", incomingFD)); err != nil {
		return vm.exitedErr(ctx, err)
	}
	if err := waitMigration(ctx, vm.qmp, sub); err != nil {
		// QEMU exits when a device state does not load.
		return vm.exitedErr(ctx, err)
	}
	return vm.exitedErr(ctx, vm.qmp.Cont(ctx))
}

// cloneRAM checks the frozen RAM file a clone is to map and returns its
// absolute path. The size must be exact: QEMU would resize a shorter file
// to the memory size, through the descriptor it opens read-write even for a
// private mapping, changing the snapshot under every other clone.
func cloneRAM(path string, size int64) (string, error) {
	if path == "" {
		return "", errors.New("RAMPath is required")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return "", err
	}
	if strings.Contains(abs, ",") {
		return "", fmt.Errorf("RAM path %q contains a comma", abs)
	}
	st, err := os.Stat(abs)
	if err != nil {
		return "", err
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("RAM path %s is not a regular file", abs)
	}
	if st.Size() != size {
		return "", fmt.Errorf("%w: RAM file %s has %d bytes, MemMB says %d", ErrMachineMismatch, abs, st.Size(), size)
	}
	return abs, nil
}
