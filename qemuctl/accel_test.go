package qemuctl

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestProbeAccel(t *testing.T) {
	const (
		vmxFlags = "flags\t\t: fpu vme de pse vmx sse2 lm\n"
		svmFlags = "flags\t\t: fpu svm lm\n"
		noFlags  = "flags\t\t: fpu vme de pse sse2 lm hypervisor arch_capabilities\n"
	)
	kvmOK := func() (int, error) { return 12, nil }
	tests := []struct {
		cpuinfo    string // "" for a missing file
		pvm        bool
		kvm        func() (int, error)
		want       Accel
		wantReason string
		wantCPU    string
	}{
		{cpuinfo: "processor\t: 0\n" + vmxFlags + "processor\t: 1\n" + vmxFlags, kvm: kvmOK,
			want: AccelKVM, wantReason: "has vmx", wantCPU: CPUHost},
		{cpuinfo: svmFlags, kvm: kvmOK, want: AccelKVM, wantReason: "has svm", wantCPU: CPUHost},
		// This build machine: a PVM /dev/kvm that opens fine, no vmx/svm.
		{cpuinfo: noFlags, pvm: true, kvm: kvmOK, want: AccelTCG, wantReason: "PVM", wantCPU: CPUTCG},
		{cpuinfo: noFlags, kvm: kvmOK, want: AccelTCG, wantReason: "no hardware virtualisation", wantCPU: CPUTCG},
		{cpuinfo: vmxFlags, kvm: func() (int, error) { return 0, os.ErrPermission }, want: AccelTCG,
			wantReason: "not usable: permission denied", wantCPU: CPUTCG},
		{cpuinfo: vmxFlags, kvm: func() (int, error) { return 11, nil }, want: AccelTCG, wantReason: "API version 11", wantCPU: CPUTCG},
		{cpuinfo: "", kvm: kvmOK, want: AccelTCG, wantReason: "cannot read CPU flags", wantCPU: CPUTCG},
		{cpuinfo: "processor\t: 0\n", kvm: kvmOK, want: AccelTCG, wantReason: "no flags line", wantCPU: CPUTCG},
	}
	for i, tc := range tests {
		dir := t.TempDir()
		p := accelProbe{
			cpuinfo:   filepath.Join(dir, "cpuinfo"),
			sysModule: filepath.Join(dir, "module"),
			kvmVersion: func() (int, error) {
				if tc.kvm == nil {
					return 0, errors.New("kvm not expected to be opened")
				}
				return tc.kvm()
			},
		}
		if tc.cpuinfo != "" {
			os.WriteFile(p.cpuinfo, []byte(tc.cpuinfo), 0o600)
		}
		if tc.pvm {
			os.MkdirAll(filepath.Join(p.sysModule, "kvm_pvm"), 0o700)
		}
		got, why := p.probe()
		if got != tc.want || !strings.Contains(why, tc.wantReason) {
			t.Errorf("#%d: got %s (%q), want %s with a reason containing %q", i, got, why, tc.want, tc.wantReason)
		}
		if cpu := p.cpuModel(got); cpu != tc.wantCPU {
			t.Errorf("#%d: cpu model %q, want %q", i, cpu, tc.wantCPU)
		}
	}
	// KVM forced on a PVM host needs the arch-capabilities MSR hidden.
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "kvm_pvm"), 0o700)
	if cpu := (accelProbe{sysModule: dir}).cpuModel(AccelKVM); cpu != CPUHostPVM {
		t.Errorf("KVM on a PVM host: cpu %q, want %q", cpu, CPUHostPVM)
	}
}

// On the real host the answer must be consistent with what the host has.
func TestProbeAccelHost(t *testing.T) {
	accel, why := ProbeAccel(context.Background())
	t.Logf("this host: %s (%s)", accel, why)
	if why == "" {
		t.Error("no reason given")
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil && accel != AccelTCG {
		t.Errorf("PVM host: got %s, want %s", accel, AccelTCG)
	}
	if _, err := os.Stat("/dev/kvm"); err != nil && accel != AccelTCG {
		t.Errorf("no /dev/kvm: got %s, want %s", accel, AccelTCG)
	}
}
