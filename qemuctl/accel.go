package qemuctl

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Accel is a QEMU accelerator.
type Accel string

// Accelerators.
const (
	AccelKVM Accel = "kvm"
	AccelTCG Accel = "tcg" // QEMU's JIT; slower, runs anywhere
)

// CPU models. Under KVM the guest gets the host's CPU. Under TCG it gets
// qemu64, a fixed model that is the same in every QEMU version, so that a
// VM's device state restores on any TCG host; Debian's kernel boots with it
// (and with "max") in about 1.5 s from an uncompressed vmlinux.
const (
	CPUHost = "host"
	// CPUHostPVM is needed when KVM is a PVM layer: QEMU aborts with plain
	// "host" because that layer does not handle the arch-capabilities MSR.
	CPUHostPVM = "host,-arch-capabilities"
	CPUTCG     = "qemu64"
)

const (
	kvmAPIVersion    = 12     // the only KVM API version there has ever been
	kvmGetAPIVersion = 0xAE00 // _IO(KVMIO, 0x00)
)

// ProbeAccel tells which accelerator to run guests with on this host, and
// why. It chooses KVM only if the CPU has hardware virtualisation (vmx or
// svm) and /dev/kvm opens and speaks the KVM API. A /dev/kvm without them is
// a software layer such as PVM (module kvm_pvm), which emulates guest kernel
// mode and cannot boot stock kernels; it chooses TCG there. The probe only
// reads the host's state; ctx is for probes that may come to start QEMU.
func ProbeAccel(ctx context.Context) (Accel, string) {
	return hostProbe().probe()
}

// accelProbe holds where ProbeAccel looks, so tests can point it elsewhere.
type accelProbe struct {
	cpuinfo   string // /proc/cpuinfo
	sysModule string // /sys/module
	// kvmVersion opens /dev/kvm and returns KVM_GET_API_VERSION.
	kvmVersion func() (int, error)
}

func hostProbe() accelProbe {
	return accelProbe{cpuinfo: "/proc/cpuinfo", sysModule: "/sys/module", kvmVersion: openKVM}
}

func openKVM() (int, error) {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.IoctlRetInt(fd, kvmGetAPIVersion)
}

func (p accelProbe) probe() (Accel, string) {
	if p.pvm() {
		return AccelTCG, "/dev/kvm is the PVM software layer (kvm_pvm module): it emulates guest kernel mode and cannot boot stock kernels"
	}
	flag, err := p.virtFlag()
	if err != nil {
		return AccelTCG, fmt.Sprintf("cannot read CPU flags: %v", err)
	}
	if flag == "" {
		return AccelTCG, "the CPU has no hardware virtualisation (no vmx or svm flag in " + p.cpuinfo + ")"
	}
	v, err := p.kvmVersion()
	if err != nil {
		return AccelTCG, fmt.Sprintf("the CPU has %s but /dev/kvm is not usable: %v", flag, err)
	}
	if v != kvmAPIVersion {
		return AccelTCG, fmt.Sprintf("/dev/kvm reports API version %d, want %d", v, kvmAPIVersion)
	}
	return AccelKVM, fmt.Sprintf("the CPU has %s and /dev/kvm speaks KVM API %d", flag, v)
}

func (p accelProbe) pvm() bool {
	_, err := os.Stat(filepath.Join(p.sysModule, "kvm_pvm"))
	return err == nil
}

// virtFlag returns "vmx" or "svm" if the first CPU has it, else "".
func (p accelProbe) virtFlag() (string, error) {
	f, err := os.Open(p.cpuinfo)
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(nil, 1<<20)
	for s.Scan() {
		name, value, ok := strings.Cut(s.Text(), ":")
		if !ok || strings.TrimSpace(name) != "flags" {
			continue
		}
		for _, fl := range strings.Fields(value) {
			if fl == "vmx" || fl == "svm" {
				return fl, nil
			}
		}
		return "", nil
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("no flags line in %s", p.cpuinfo)
}

// cpuModel is the -cpu value for accel on this host.
func (p accelProbe) cpuModel(accel Accel) string {
	if accel == AccelKVM {
		if p.pvm() {
			return CPUHostPVM
		}
		return CPUHost
	}
	return CPUTCG
}
