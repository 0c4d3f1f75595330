package qemuctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/snowflock-go/snowflock/qemuctl/qmp"
)

// ErrMigrationFailed is wrapped by the error of a Snapshot or Restore whose
// migration stream QEMU reported failed or cancelled.
var ErrMigrationFailed = errors.New("qemuctl: migration failed")

// ErrMachineMismatch is returned by Restore when the clone's machine
// differs from the one the device state was saved from.
var ErrMachineMismatch = errors.New("qemuctl: machine differs from the snapshot's")

// deviceStateCaps are the migration capabilities of both ends of a device
// state: x-ignore-shared leaves the shared RAM file out of the stream, events
// reports progress as MIGRATION events. The destination needs
// x-ignore-shared too, or it waits for RAM that never comes.
var deviceStateCaps = map[string]bool{"x-ignore-shared": true, "events": true}

// migrationPoll is how often waitMigration asks for the status in case an
// event was missed.
const migrationPoll = 100 * time.Millisecond

// Migration states (QEMU's MigrationStatus) that end a migration.
const (
	migrationCompleted = "completed"
	migrationFailed    = "failed"
	migrationCancelled = "cancelled"
)

// waitMigration waits until the migration has completed. sub must have been
// subscribed to MIGRATION before the migration started, so that no event is
// missed; query-migrate is polled as well.
func waitMigration(ctx context.Context, c *qmp.Client, sub *qmp.Subscription) error {
	poll := time.NewTicker(migrationPoll)
	defer poll.Stop()
	for {
		var status string
		select {
		case ev, ok := <-sub.C():
			if !ok {
				if err := c.Err(); err != nil {
					return err
				}
				return errors.New("MIGRATION subscription closed")
			}
			var d struct {
				Status string `json:"status"`
			}
			if json.Unmarshal(ev.Data, &d) != nil {
				continue
			}
			status = d.Status
		case <-poll.C:
			info, err := c.QueryMigrate(ctx)
			if err != nil {
				return err
			}
			status = info.Status
		case <-ctx.Done():
			return fmt.Errorf("waiting for the migration: %w", context.Cause(ctx))
		}
		switch status {
		case migrationCompleted:
			return nil
		case migrationFailed, migrationCancelled:
			info, err := c.QueryMigrate(ctx)
			if err != nil || info.ErrorDesc == "" {
				return fmt.Errorf("%w (%s)", ErrMigrationFailed, status)
			}
			return fmt.Errorf("%w (%s): %s", ErrMigrationFailed, status, info.ErrorDesc)
		}
	}
}

// Machine is what a saved device state depends on besides the device state
// itself: a clone must run on the same Machine as its parent. Memory size
// and vCPU count shape the stream (RAM block sizes, one CPU section per
// vCPU); accelerator and CPU model shape the vCPU state and what the guest
// believes the CPU can do; booting with a kernel adds an option ROM; Extra
// may add devices; and the layout of every section is QEMU's, so the version
// must match too (the machine type "pc" is an alias for the version's
// newest). Kernel, initrd and command line need not be the same files: the
// guest has long copied them into RAM; they matter again only on a reboot,
// which -no-reboot turns into QEMU's exit.
type Machine struct {
	QEMU   string   `json:"qemu"` // version, e.g. "7.2.22"
	Accel  Accel    `json:"accel"`
	CPU    string   `json:"cpu"`
	MemMB  int      `json:"mem_mb"`
	VCPUs  int      `json:"vcpus"`
	Kernel bool     `json:"kernel"` // booted with -kernel
	Extra  []string `json:"extra,omitempty"`
}

// machine is the Machine of cfg (after withDefaults) on accel and cpu, with
// the QEMU version left empty.
func (c Config) machine(accel Accel, cpu string) Machine {
	return Machine{Accel: accel, CPU: cpu, MemMB: c.MemMB, VCPUs: c.VCPUs, Kernel: c.Kernel != "",
		Extra: slices.Clone(c.Extra)}
}

// Machine returns the VM's machine.
func (vm *VM) Machine() Machine {
	m := vm.cfg.machine(vm.accel, argValue(vm.args, "-cpu"))
	m.QEMU = qemuVersion(vm.qmp.Greeting())
	return m
}

func qemuVersion(g qmp.Greeting) string {
	return strconv.Itoa(g.Major) + "." + strconv.Itoa(g.Minor) + "." + strconv.Itoa(g.Micro)
}

// mismatch describes how m differs from want, ignoring an empty want.QEMU;
// "" if it does not.
func (m Machine) mismatch(want Machine) string {
	if want.QEMU == "" {
		m.QEMU = ""
	}
	switch {
	case m.QEMU != want.QEMU:
		return fmt.Sprintf("QEMU %s, snapshot from QEMU %s", m.QEMU, want.QEMU)
	case m.Accel != want.Accel || m.CPU != want.CPU:
		return fmt.Sprintf("%s with CPU %q, snapshot from %s with CPU %q", m.Accel, m.CPU, want.Accel, want.CPU)
	case m.MemMB != want.MemMB:
		return fmt.Sprintf("MemMB %d, snapshot has %d", m.MemMB, want.MemMB)
	case m.VCPUs != want.VCPUs:
		return fmt.Sprintf("VCPUs %d, snapshot has %d", m.VCPUs, want.VCPUs)
	case m.Kernel != want.Kernel:
		return fmt.Sprintf("Kernel given: %v, snapshot booted with one: %v", m.Kernel, want.Kernel)
	case !slices.Equal(m.Extra, want.Extra):
		return fmt.Sprintf("Extra %q, snapshot had %q", m.Extra, want.Extra)
	}
	return ""
}

// opError is the error of an operation on a VM: "qemuctl: <op>: <cause>",
// where the cause's own "qemuctl: " is not repeated.
type opError struct {
	op  string
	err error
}

func (e *opError) Error() string {
	return "qemuctl: " + e.op + ": " + strings.TrimPrefix(e.err.Error(), "qemuctl: ")
}

func (e *opError) Unwrap() error { return e.err }

// argValue returns the argument following the first name in args.
func argValue(args []string, name string) string {
	if i := slices.Index(args, name); i >= 0 && i+1 < len(args) {
		return args[i+1]
	}
	return ""
}
