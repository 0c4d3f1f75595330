package qemuctl

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// Defaults.
const (
	DefaultBinary = "qemu-system-x86_64"
	DefaultRAMDir = "/dev/shm/snowflock"
	DefaultMemMB  = 256
	DefaultVCPUs  = 1
)

// Files in a VM's run directory.
const (
	QMPSocket   = "qmp.sock"
	GuestSocket = "guest.sock"
	ConsoleLog  = "console.log"
	QEMULog     = "qemu.log"
	PIDFile     = "qemu.pid"
	StateFile   = "vm.json"
)

// Config describes one VM.
type Config struct {
	// ID names the VM; it is unique on the host and never reused. 1-64 of
	// [A-Za-z0-9._-], not starting with a dot. It names the RAM file.
	ID string
	// Binary is the QEMU system emulator; default DefaultBinary on PATH.
	Binary string

	// Kernel, Initrd and Append boot a Linux kernel directly; with no
	// Kernel the firmware runs and finds nothing to boot. The kernel's
	// console is ttyS0 (console.log) and the guest API channel ttyS1, so
	// Append usually contains "console=ttyS0".
	Kernel, Initrd, Append string

	MemMB int // guest RAM in MiB; default DefaultMemMB
	VCPUs int // default DefaultVCPUs

	// RunDir is the VM's own directory (created if missing): sockets, logs,
	// pid file. Reap expects run directories to be the entries of one root.
	RunDir string
	// RAMDir holds the guest RAM file ID.ram; it should be a tmpfs.
	// Default DefaultRAMDir.
	RAMDir string

	// Accel is the accelerator; "" chooses with ProbeAccel.
	Accel Accel
	// CPU is the -cpu model; "" means CPUHost under KVM (CPUHostPVM on a
	// PVM host) and CPUTCG under TCG.
	CPU string

	// Extra arguments are appended to the command line.
	Extra []string

	Logger hclog.Logger // default: no logging
}

var validID = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$`)

// withDefaults validates c and returns it with defaults filled in and paths
// made absolute. It does not touch the file system except to look up
// Binary on PATH.
func (c Config) withDefaults() (Config, error) {
	if !validID.MatchString(c.ID) {
		return c, fmt.Errorf("qemuctl: invalid VM ID %q: want 1-64 of [A-Za-z0-9._-], not starting with a dot", c.ID)
	}
	if c.RunDir == "" {
		return c, errors.New("qemuctl: Config.RunDir is required")
	}
	if c.Kernel == "" && (c.Initrd != "" || c.Append != "") {
		return c, errors.New("qemuctl: Initrd and Append need a Kernel")
	}
	if c.MemMB < 0 || c.VCPUs < 0 {
		return c, fmt.Errorf("qemuctl: negative MemMB (%d) or VCPUs (%d)", c.MemMB, c.VCPUs)
	}
	switch c.Accel {
	case "", AccelKVM, AccelTCG:
	default:
		return c, fmt.Errorf("qemuctl: unknown accelerator %q", c.Accel)
	}
	if c.Binary == "" {
		c.Binary = DefaultBinary
	}
	bin, err := exec.LookPath(c.Binary)
	if err != nil {
		return c, fmt.Errorf("qemuctl: %w", err)
	}
	c.Binary = bin
	if c.RAMDir == "" {
		c.RAMDir = DefaultRAMDir
	}
	if c.MemMB == 0 {
		c.MemMB = DefaultMemMB
	}
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	for _, p := range []*string{&c.RunDir, &c.RAMDir, &c.Kernel, &c.Initrd} {
		if *p == "" {
			continue
		}
		if *p, err = filepath.Abs(*p); err != nil {
			return c, fmt.Errorf("qemuctl: %w", err)
		}
	}
	// Paths go into comma-separated option strings, where QEMU would read
	// a comma as the start of the next option.
	for _, p := range []string{c.RunDir, c.RAMDir, c.Kernel, c.Initrd} {
		if strings.Contains(p, ",") {
			return c, fmt.Errorf("qemuctl: path %q contains a comma", p)
		}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c, nil
}

// RAMFile is the path of the VM's RAM file.
func (c Config) RAMFile() string { return filepath.Join(c.RAMDir, c.ID+".ram") }

// memory says where a QEMU's guest RAM comes from: a VM that boots gets its
// own RAM file, mapped shared; a clone maps an existing frozen file private
// (its writes stay in the clone) and waits for its device state.
type memory struct {
	path     string
	private  bool // share=off
	incoming bool // -incoming defer
	// devices: the incoming device state is FormatDevices, which has no
	// configuration section for QEMU to expect.
	devices bool
}

// bootMemory is the memory of a VM that Start boots.
func (c Config) bootMemory() memory { return memory{path: c.RAMFile()} }

// args is QEMU's command line (without the binary) for c, which must have
// gone through withDefaults, with accel and cpu decided. The QMP socket is
// the listening socket passed as file descriptor 3. Start and Restore share
// it, so that a clone's machine is the parent's but for mem.
func (c Config) args(accel Accel, cpu string, mem memory) []string {
	run := func(name string) string { return filepath.Join(c.RunDir, name) }
	share := "on"
	if mem.private {
		share = "off"
	}
	a := []string{
		"-name", c.ID,
		// suppress-vmdesc: a saved device state carries no JSON description
		// of itself (about 100 KB that loading does not read).
		"-machine", "pc,memory-backend=mem,suppress-vmdesc=on",
		"-accel", string(accel),
		"-cpu", cpu,
		"-smp", strconv.Itoa(c.VCPUs),
		"-m", strconv.Itoa(c.MemMB) + "M",
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", c.MemMB, mem.path, share),
		"-nodefaults", "-no-user-config", "-nographic", "-display", "none",
		"-no-reboot",
		"-msg", "timestamp=on",
		// Serial ports are numbered in order: the console is the guest's
		// ttyS0, the guest API channel its ttyS1.
		"-chardev", "file,id=con,path=" + run(ConsoleLog),
		"-serial", "chardev:con",
		"-chardev", "socket,id=sfchan,path=" + run(GuestSocket) + ",server=on,wait=off",
		"-serial", "chardev:sfchan",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	}
	if c.Kernel != "" {
		a = append(a, "-kernel", c.Kernel)
	}
	if c.Initrd != "" {
		a = append(a, "-initrd", c.Initrd)
	}
	if c.Append != "" {
		a = append(a, "-append", c.Append)
	}
	if mem.incoming {
		a = append(a, "-incoming", "defer")
	}
	if mem.devices {
		a = append(a, "-global", "migration.send-configuration=off")
	}
	return append(a, c.Extra...)
}
