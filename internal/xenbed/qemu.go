package xenbed

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// Machine settings every host shares. -cpu qemu64,+npt gives Xen AMD's
// nested paging (HAP), which PVH guests need; -cpu max crashes dom0 under
// TCG (PROBES.md). The SSE4, AES-NI and carry-less multiply flags are what
// any real Xen host has: TCG runs them as helpers, so AES-GCM (memserver,
// multicast) in dom0 takes Go's assembly path, not its far slower generic
// code, as on real hardware.
const (
	qemuCPU     = "qemu64,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq"
	ctlNetwork  = "10.0.2.0/24"
	ctlGuestIP  = "10.0.2.15" // init.sh gives the control NIC this address
	bedSubnet   = "10.77.0"   // host i is bedSubnet.(i+1)/24
	macCtlBase  = "52:54:00:c7:00:"
	macBedBase  = "52:54:00:be:00:"
	dom0Console = "console=hvc0 earlyprintk=xen"
)

// hostConfig is what one host's QEMU command line is made of.
type hostConfig struct {
	Index       int
	QEMU        string
	MemMB       int
	Dom0MemMB   int
	CPUs        int
	Image       *Image
	Token       string
	MTU         int    // of the bed network; 0 is 1500
	AgentPort   int    // host port forwarded to the agent
	BedNetdev   string // -netdev value of the bed NIC (from the hub)
	ConsolePath string // Xen's serial console, which carries dom0's hvc0
}

func (c hostConfig) ip() string     { return fmt.Sprintf("%s.%d", bedSubnet, c.Index+1) }
func (c hostConfig) ctlMAC() string { return fmt.Sprintf("%s%02x", macCtlBase, c.Index+1) }
func (c hostConfig) bedMAC() string { return fmt.Sprintf("%s%02x", macBedBase, c.Index+1) }
func (c hostConfig) dom0Cmdline() string {
	s := fmt.Sprintf("%s xenbed.host=%d xenbed.ctlmac=%s xenbed.bedmac=%s xenbed.ip=%s/24 xenbed.token=%s",
		dom0Console, c.Index+1, c.ctlMAC(), c.bedMAC(), c.ip(), c.Token)
	if c.MTU != 0 {
		s += fmt.Sprintf(" xenbed.mtu=%d", c.MTU)
	}
	return s
}

// xenCmdline is the hypervisor's command line. It is passed with -append,
// which QEMU does not split at commas: "com1=115200,8n1" stays as written
// (escaping it as ",," would reach Xen and silence its console).
func (c hostConfig) xenCmdline() string {
	return fmt.Sprintf("dom0_mem=%dM,max:%dM console=com1 com1=115200,8n1 noreboot", c.Dom0MemMB, c.Dom0MemMB)
}

// multibootModules is QEMU's -initrd value for a multiboot kernel: the
// modules separated by commas, each a file name followed by its command
// line. QEMU parses it as an option value, where a literal comma is
// written ",,".
func multibootModules(mods ...string) string {
	esc := make([]string, len(mods))
	for i, m := range mods {
		esc[i] = strings.ReplaceAll(m, ",", ",,")
	}
	return strings.Join(esc, ",")
}

// args returns QEMU's arguments.
func (c hostConfig) args() []string {
	return []string{
		"-name", fmt.Sprintf("xenbed-h%d", c.Index+1),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", "pc", "-accel", "tcg", "-cpu", qemuCPU,
		"-m", strconv.Itoa(c.MemMB), "-smp", strconv.Itoa(c.CPUs),
		"-kernel", c.Image.Xen,
		"-append", c.xenCmdline(),
		"-initrd", multibootModules(c.Image.Kernel+" "+c.dom0Cmdline(), c.Image.Initrd),
		"-serial", "file:" + c.ConsolePath,
		// Control NIC: user-mode networking, restricted so the VM reaches
		// nothing outside; only the forward of the agent's port comes in.
		"-netdev", fmt.Sprintf("user,id=ctl,restrict=on,net=%s,hostfwd=tcp:127.0.0.1:%d-%s:%d",
			ctlNetwork, c.AgentPort, ctlGuestIP, agentPortInDom0),
		"-device", "e1000,netdev=ctl,mac=" + c.ctlMAC(),
		"-netdev", c.BedNetdev,
		"-device", "e1000,netdev=bed,mac=" + c.bedMAC(),
	}
}

// qemuProc is a running QEMU.
type qemuProc struct {
	proc    *os.Process
	pid     int
	exited  chan struct{} // closed once QEMU has exited and been reaped
	exitErr error         // set before exited is closed
}

// startQEMU starts argv with its output in logPath. QEMU gets its own
// process group, so that kill reaches any helper it forks, and SIGKILL if
// this process dies (Pdeathsig), so that no QEMU outlives a crashed test.
func startQEMU(argv []string, logPath string) (*qemuProc, error) {
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("xenbed: %w", err)
	}
	defer logFile.Close() // QEMU has its own copy
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &qemuProc{exited: make(chan struct{})}
	started := make(chan error, 1)
	// The parent-death signal fires when the thread that forked QEMU
	// exits, so that thread must live as long as QEMU: the goroutine stays
	// locked to it and ends only after QEMU.
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.exitErr = cmd.Wait()
		close(p.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("xenbed: starting %s: %w", argv[0], err)
	}
	p.proc, p.pid = cmd.Process, cmd.Process.Pid
	return p, nil
}

// kill sends SIGKILL to QEMU and its process group; the process through
// its handle (pidfd), which cannot hit a reused pid, the group only while
// QEMU was still there.
func (p *qemuProc) kill() error {
	if err := p.proc.Signal(syscall.SIGKILL); err != nil {
		return nil // already exited
	}
	if err := syscall.Kill(-p.pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("xenbed: killing QEMU's process group %d: %w", p.pid, err)
	}
	return nil
}
