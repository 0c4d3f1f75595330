package hostd

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/descriptor"
	"github.com/snowflock-go/snowflock/qemuctl"
)

// QEMU runs VMs with qemuctl: one run directory per VM under RunRoot, RAM
// files under RAMDir (a tmpfs).
type QEMU struct {
	RunRoot string
	RAMDir  string        // "" is qemuctl's default
	Accel   qemuctl.Accel // "" probes
	Binary  string
	Logger  hclog.Logger
}

// NewQEMU probes the accelerator once and returns the driver.
func NewQEMU(ctx context.Context, runRoot, ramDir string, accel qemuctl.Accel, log hclog.Logger) (*QEMU, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	abs, err := filepath.Abs(runRoot)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("hostd: run dir: %w", err)
	}
	if ramDir == "" {
		ramDir = DefaultRAMDir(abs)
	}
	if accel == "" {
		var why string
		accel, why = qemuctl.ProbeAccel(ctx)
		log.Info("accelerator chosen", "accel", accel, "why", why)
	}
	return &QEMU{RunRoot: abs, RAMDir: ramDir, Accel: accel, Logger: log}, nil
}

// Close removes the RAM directory if no RAM file is left in it.
func (q *QEMU) Close() error {
	if q.RAMDir == "" {
		return nil
	}
	if err := os.Remove(q.RAMDir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) {
		return err
	}
	return nil
}

// Name says "qemu/tcg" or "qemu/kvm".
func (q *QEMU) Name() string { return "qemu/" + string(q.Accel) }

// Reap kills QEMU processes a crashed daemon left and removes their files.
func (q *QEMU) Reap() error {
	n, err := qemuctl.Reap(q.RunRoot, q.Logger)
	if n > 0 {
		q.Logger.Info("reaped VMs of an earlier run", "count", n)
	}
	// Frozen RAM of snapshots a crashed daemon served: nothing can fetch
	// from them any more (the memserver that knew their capabilities is
	// gone), so they are garbage.
	frozen, _ := filepath.Glob(filepath.Join(q.RAMDir, "snap-*.frozen"))
	for _, f := range frozen {
		if st, lerr := os.Lstat(f); lerr == nil && st.Mode().IsRegular() {
			if rerr := os.Remove(f); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
	}
	if len(frozen) > 0 {
		q.Logger.Info("removed frozen snapshots of an earlier run", "count", len(frozen))
	}
	return err
}

// Start boots a VM.
func (q *QEMU) Start(ctx context.Context, spec VMSpec) (RunningVM, error) {
	vm, err := qemuctl.Start(ctx, qemuctl.Config{ID: spec.ID, Binary: q.Binary, Kernel: spec.Kernel, Initrd: spec.Initrd,
		Append: spec.Append, MemMB: int(spec.MemMB), VCPUs: spec.VCPUs, RunDir: filepath.Join(q.RunRoot, spec.ID),
		RAMDir: q.RAMDir, Accel: q.Accel, Logger: q.Logger.With("vm", spec.ID)})
	if err != nil {
		return nil, err
	}
	return &qemuVM{vm: vm, kernel: spec.Kernel, ramDir: q.RAMDir}, nil
}

// Restore starts a clone from a descriptor's machine and device state with
// its RAM mapped private from src.RAMPath. The host's own kernel and
// initramfs are named on QEMU's command line (the machine booted with one);
// the guest runs the parent's, which is in its memory.
func (q *QEMU) Restore(ctx context.Context, spec VMSpec, src RestoreSource) (RunningVM, error) {
	m := src.Meta
	if m.Driver != "qemu" {
		return nil, fmt.Errorf("hostd: a %s descriptor cannot be restored by QEMU", m.Driver)
	}
	if !m.HasKernel() {
		spec.Kernel, spec.Initrd, spec.Append = "", "", ""
	}
	machine := qemuctl.Machine{QEMU: m.QEMU, Accel: qemuctl.Accel(m.Accel), CPU: m.CPU, MemMB: m.MemMB, VCPUs: m.VCPUs,
		Kernel: m.HasKernel(), Extra: m.Extra}
	vm, err := qemuctl.Restore(ctx, qemuctl.Config{ID: spec.ID, Binary: q.Binary, Kernel: spec.Kernel, Initrd: spec.Initrd,
		Append: spec.Append, MemMB: m.MemMB, VCPUs: m.VCPUs, RunDir: filepath.Join(q.RunRoot, spec.ID),
		Accel: qemuctl.Accel(m.Accel), CPU: m.CPU, Extra: m.Extra, Logger: q.Logger.With("vm", spec.ID)},
		qemuctl.RestoreOptions{DeviceStatePath: src.DeviceStatePath, RAMPath: src.RAMPath, Machine: &machine})
	if err != nil {
		return nil, err
	}
	return &qemuVM{vm: vm, kernel: spec.Kernel, ramDir: q.RAMDir}, nil
}

type qemuVM struct {
	vm     *qemuctl.VM
	kernel string
	ramDir string // where frozen RAM goes: the host's tmpfs
}

// Snapshot captures the VM for cloning: device state into the run
// directory, frozen RAM beside the VM's RAM file on its tmpfs. A clone's
// frozen RAM is an overlay over the RAM it was restored from (Capture.Base),
// in the host's RAM directory.
func (v *qemuVM) Snapshot(ctx context.Context, name string) (*Capture, error) {
	if err := os.MkdirAll(v.ramDir, 0o700); err != nil {
		return nil, err
	}
	res, err := v.vm.Snapshot(ctx, qemuctl.SnapshotOptions{
		DeviceStatePath: filepath.Join(v.vm.RunDir(), name+".dev"),
		FrozenRAMPath:   filepath.Join(v.ramDir, name+".frozen")})
	if err != nil {
		return nil, err
	}
	m := res.Machine
	c := &Capture{DeviceStatePath: res.DeviceStatePath, FrozenRAMPath: res.FrozenRAMPath, RAMSize: res.RAMSize,
		DataPages: res.DataPages, Pause: res.Pause,
		Meta: descriptor.Meta{Driver: "qemu", Machine: "pc", MemMB: m.MemMB, VCPUs: m.VCPUs, PageSize: descriptor.PageSize,
			QEMU: m.QEMU, Accel: string(m.Accel), CPU: m.CPU, Extra: m.Extra}}
	if m.Kernel {
		c.Meta.Kernel = v.kernel
	}
	c.Pages, c.OwnZero, c.Base = ranges(res.Pages), ranges(res.ZeroPages), res.Base
	return c, nil
}

func ranges(rs []qemuctl.PageRange) []descriptor.Range {
	out := make([]descriptor.Range, len(rs))
	for i, p := range rs {
		out[i] = descriptor.Range{Start: p.First, Count: p.Count}
	}
	return out
}

func (v *qemuVM) GuestChannel(ctx context.Context) (io.ReadWriteCloser, error) {
	var d net.Dialer
	return d.DialContext(ctx, "unix", v.vm.GuestSocketPath())
}

func (v *qemuVM) Pause(ctx context.Context) error   { return v.vm.Pause(ctx) }
func (v *qemuVM) Resume(ctx context.Context) error  { return v.vm.Resume(ctx) }
func (v *qemuVM) ConsolePath() string               { return v.vm.ConsolePath() }
func (v *qemuVM) Done() <-chan struct{}             { return v.vm.Wait() }
func (v *qemuVM) Destroy(ctx context.Context) error { return v.vm.Destroy(ctx) }

// DefaultRAMDir is a daemon's own directory for guest RAM files under
// qemuctl.DefaultRAMDir, named after its run directory: VM IDs are unique in
// a cluster, not on a machine, so two daemons on one machine (tests, or two
// clusters) must not share RAM file names.
func DefaultRAMDir(runRoot string) string {
	sum := sha256.Sum256([]byte(runRoot))
	return filepath.Join(qemuctl.DefaultRAMDir, "hostd-"+hex.EncodeToString(sum[:6]))
}
