package xenctl

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// ErrNoDomain is wrapped by errors about a domain xl does not know.
var ErrNoDomain = errors.New("xenctl: no such domain")

// ErrBadOutput is wrapped by errors about xl output that does not parse.
var ErrBadOutput = errors.New("xenctl: unexpected xl output")

// domidMax is the largest ID of a guest domain (DOMID_FIRST_RESERVED - 1).
const domidMax = 0x7fef

// xl runs one xl binary through a Runner.
type xl struct {
	bin string
	r   Runner
	log hclog.Logger
}

func (c Config) xl() xl { return xl{bin: c.XL, r: c.Runner, log: c.Logger} }

// run runs xl with args and classifies its failure.
func (x xl) run(ctx context.Context, cmd Command) (Result, error) {
	cmd.Args = append([]string{x.bin}, cmd.Args...)
	start := time.Now()
	res, err := x.r.Run(ctx, cmd)
	x.log.Debug("xl", "args", cmd.Args[1:], "took", time.Since(start), "error", err)
	var ee *ExitError
	if errors.As(err, &ee) && noDomain(ee.Stderr) {
		err = fmt.Errorf("%w: %w", ErrNoDomain, err)
	}
	return res, err
}

// runChecked runs an xl command whose exit status does not report
// libxl's failures (pause, unpause: xl ignores libxl's return code) and
// fails when libxl logged an error.
func (x xl) runChecked(ctx context.Context, args ...string) error {
	res, err := x.run(ctx, Command{Args: args})
	if err != nil {
		return err
	}
	if i := bytes.Index(res.Stderr, []byte("libxl: error:")); i >= 0 {
		line, _, _ := bytes.Cut(res.Stderr[i:], []byte("\n"))
		err := fmt.Errorf("xenctl: xl %s: %s", strings.Join(args, " "), line)
		if noDomain(res.Stderr) {
			err = fmt.Errorf("%w: %w", ErrNoDomain, err)
		}
		return err
	}
	return nil
}

// noDomain recognises xl's and libxl's ways of saying a domain does not
// exist (xl_info.c, xl_utils.c find_domain, libxl's ESRCH).
func noDomain(stderr []byte) bool {
	for _, s := range []string{"does not exist", "is an invalid domain identifier", "No such process", "ERROR_DOMAIN_NOTFOUND"} {
		if bytes.Contains(stderr, []byte(s)) {
			return true
		}
	}
	return false
}

func domidArg(id uint32) string { return strconv.FormatUint(uint64(id), 10) }

// domid asks xl for the ID of the domain named name.
func (x xl) domid(ctx context.Context, name string) (uint32, error) {
	res, err := x.run(ctx, Command{Args: []string{"domid", name}})
	if err != nil {
		var ee *ExitError
		if errors.As(err, &ee) && bytes.Contains(ee.Stderr, []byte("Can't get domid")) && !errors.Is(err, ErrNoDomain) {
			err = fmt.Errorf("%w: %w", ErrNoDomain, err)
		}
		return 0, err
	}
	return parseDomid(res.Stdout)
}

// parseDomid parses `xl domid`'s output: the ID, a newline.
func parseDomid(out []byte) (uint32, error) {
	s, ok := strings.CutSuffix(string(out), "\n")
	if !ok || s == "" || len(s) > 5 || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("%w: domid %q", ErrBadOutput, out)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%w: domid %q", ErrBadOutput, out)
		}
	}
	id, _ := strconv.ParseUint(s, 10, 32)
	if id > domidMax {
		return 0, fmt.Errorf("%w: domid %d is not a guest's", ErrBadOutput, id)
	}
	return uint32(id), nil
}

// Info describes a domain as xl reports it.
type Info struct {
	ID   uint32 `json:"id"`
	Name string `json:"name"`
	UUID string `json:"uuid"`
	Type Type   `json:"type"`

	// From the domain's configuration (xl list -l).
	MaxVCPUs    int    `json:"max_vcpus"`
	MaxMemKB    uint64 `json:"max_memkb"`
	TargetMemKB uint64 `json:"target_memkb"`
	Kernel      string `json:"kernel,omitempty"`
	Ramdisk     string `json:"ramdisk,omitempty"`
	Cmdline     string `json:"cmdline,omitempty"`
	// MACs are the NICs' MAC addresses, in the configuration's order.
	MACs []string `json:"macs,omitempty"`

	// From the hypervisor (xl list).
	MemMB       uint64  `json:"mem_mb"` // current allocation
	OnlineVCPUs int     `json:"online_vcpus"`
	State       State   `json:"state"`
	CPUSeconds  float64 `json:"cpu_seconds"`
}

// State is a domain's run state, the six flags of xl list's State column.
type State struct {
	Running  bool `json:"running"`
	Blocked  bool `json:"blocked"`
	Paused   bool `json:"paused"`
	Shutdown bool `json:"shutdown"`
	// Reason is why a shut-down domain stopped: '-' poweroff, 'r' reboot,
	// 's' suspend, 'c' crash, 'w' watchdog, 'S' soft reset, '?' other.
	// It is '-' while the domain has not shut down.
	Reason byte `json:"reason"`
	Dying  bool `json:"dying"`
}

// String is xl's spelling, e.g. "-b----" or "---sc-".
func (s State) String() string {
	flag := func(b bool, c byte) byte {
		if b {
			return c
		}
		return '-'
	}
	return string([]byte{flag(s.Running, 'r'), flag(s.Blocked, 'b'), flag(s.Paused, 'p'),
		flag(s.Shutdown, 's'), s.Reason, flag(s.Dying, 'd')})
}

// parseState parses xl list's State column.
func parseState(s string) (State, error) {
	if len(s) != 6 {
		return State{}, fmt.Errorf("%w: state %q", ErrBadOutput, s)
	}
	var st State
	for i, want := range []byte{'r', 'b', 'p', 's', 0, 'd'} {
		c := s[i]
		if i == 4 {
			if !strings.ContainsRune("-rscwS?", rune(c)) {
				return State{}, fmt.Errorf("%w: state %q", ErrBadOutput, s)
			}
			st.Reason = c
			continue
		}
		if c != want && c != '-' {
			return State{}, fmt.Errorf("%w: state %q", ErrBadOutput, s)
		}
		on := c == want
		switch i {
		case 0:
			st.Running = on
		case 1:
			st.Blocked = on
		case 2:
			st.Paused = on
		case 3:
			st.Shutdown = on
		case 5:
			st.Dying = on
		}
	}
	return st, nil
}

// parseList parses `xl list <domain>`: a header and one line of
// "name ID Mem VCPUs State Time(s)" (tools/xl/xl_info.c list_domains).
// The name is the line's fields before the last five, so a name with
// spaces survives; xl pads it to 40 columns.
func parseList(out []byte, want uint32) (name string, info Info, err error) {
	lines := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "Name ") {
		return "", info, fmt.Errorf("%w: xl list printed %d lines", ErrBadOutput, len(lines))
	}
	f := strings.Fields(lines[1])
	if len(f) < 6 {
		return "", info, fmt.Errorf("%w: xl list line %q", ErrBadOutput, lines[1])
	}
	n := len(f)
	id, err := strconv.ParseUint(f[n-5], 10, 32)
	if err != nil || uint32(id) != want {
		return "", info, fmt.Errorf("%w: xl list gave domain %q, asked for %d", ErrBadOutput, f[n-5], want)
	}
	info.ID = uint32(id)
	if info.MemMB, err = strconv.ParseUint(f[n-4], 10, 64); err != nil {
		return "", info, fmt.Errorf("%w: memory %q", ErrBadOutput, f[n-4])
	}
	vcpus, err := strconv.ParseUint(f[n-3], 10, 16)
	if err != nil {
		return "", info, fmt.Errorf("%w: vcpus %q", ErrBadOutput, f[n-3])
	}
	info.OnlineVCPUs = int(vcpus)
	if info.State, err = parseState(f[n-2]); err != nil {
		return "", info, err
	}
	if info.CPUSeconds, err = strconv.ParseFloat(f[n-1], 64); err != nil || info.CPUSeconds < 0 || info.CPUSeconds != info.CPUSeconds {
		return "", info, fmt.Errorf("%w: time %q", ErrBadOutput, f[n-1])
	}
	return strings.Join(f[:n-5], " "), info, nil
}

// listLong is the subset of `xl list -l` (JSON output, the default) that
// Info uses: an array of {"domid", "config": libxl_domain_config}, as
// libxl's generated JSON writes it (libxl_types.idl: c_info, b_info;
// enums as lowercase strings; default-valued fields omitted).
type listLong struct {
	Domid  *uint32 `json:"domid"`
	Config struct {
		CInfo struct {
			Type string `json:"type"`
			Name string `json:"name"`
			UUID string `json:"uuid"`
		} `json:"c_info"`
		BInfo struct {
			MaxVCPUs    int    `json:"max_vcpus"`
			MaxMemKB    uint64 `json:"max_memkb"`
			TargetMemKB uint64 `json:"target_memkb"`
			Kernel      string `json:"kernel"`
			Ramdisk     string `json:"ramdisk"`
			Cmdline     string `json:"cmdline"`
		} `json:"b_info"`
		NICs []struct {
			MAC string `json:"mac"`
		} `json:"nics"`
	} `json:"config"`
}

var (
	uuidPattern = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	macPattern  = regexp.MustCompile(`^[0-9a-f]{2}(:[0-9a-f]{2}){5}$`)
)

// parseListLong parses `xl list -l <domain>`, which must describe exactly
// the domain want. xl prints an empty array, and exits 0, when it cannot
// read the domain's configuration.
func parseListLong(out []byte, want uint32) (Info, error) {
	var info Info
	if len(out) > MaxOutput {
		return info, fmt.Errorf("%w: xl list -l printed %d bytes", ErrBadOutput, len(out))
	}
	var doms []listLong
	if err := json.Unmarshal(out, &doms); err != nil {
		return info, fmt.Errorf("%w: xl list -l: %v", ErrBadOutput, err)
	}
	if len(doms) != 1 {
		return info, fmt.Errorf("%w: xl list -l described %d domains", ErrBadOutput, len(doms))
	}
	d := doms[0]
	if d.Domid == nil || *d.Domid != want {
		return info, fmt.Errorf("%w: xl list -l described another domain", ErrBadOutput)
	}
	c, b := d.Config.CInfo, d.Config.BInfo
	info.ID = *d.Domid
	info.Name, info.UUID, info.Type = c.Name, c.UUID, Type(c.Type)
	switch {
	case info.Name == "" || len(info.Name) > 1024 || checkText("name", info.Name) != nil:
		return info, fmt.Errorf("%w: domain name %q", ErrBadOutput, info.Name)
	case info.Type != TypePV && info.Type != TypePVH && info.Type != TypeHVM:
		return info, fmt.Errorf("%w: domain type %q", ErrBadOutput, c.Type)
	case info.UUID != "" && !uuidPattern.MatchString(info.UUID):
		return info, fmt.Errorf("%w: uuid %q", ErrBadOutput, info.UUID)
	case b.MaxVCPUs < 0 || b.MaxVCPUs > 4096:
		return info, fmt.Errorf("%w: max_vcpus %d", ErrBadOutput, b.MaxVCPUs)
	}
	info.MaxVCPUs, info.MaxMemKB, info.TargetMemKB = b.MaxVCPUs, b.MaxMemKB, b.TargetMemKB
	info.Kernel, info.Ramdisk, info.Cmdline = b.Kernel, b.Ramdisk, b.Cmdline
	for _, nic := range d.Config.NICs {
		if !macPattern.MatchString(nic.MAC) {
			return info, fmt.Errorf("%w: mac %q", ErrBadOutput, nic.MAC)
		}
		info.MACs = append(info.MACs, nic.MAC)
	}
	return info, nil
}

// info runs xl list -l and xl list for a domain.
func (x xl) info(ctx context.Context, id uint32) (Info, error) {
	res, err := x.run(ctx, Command{Args: []string{"list", "-l", domidArg(id)}})
	if err != nil {
		return Info{}, err
	}
	info, err := parseListLong(res.Stdout, id)
	if err != nil {
		return Info{}, err
	}
	res, err = x.run(ctx, Command{Args: []string{"list", domidArg(id)}})
	if err != nil {
		return Info{}, err
	}
	name, live, err := parseList(res.Stdout, id)
	if err != nil {
		return Info{}, err
	}
	if name != info.Name {
		return Info{}, fmt.Errorf("%w: domain %d is %q in xl list and %q in xl list -l", ErrBadOutput, id, name, info.Name)
	}
	info.MemMB, info.OnlineVCPUs, info.State, info.CPUSeconds = live.MemMB, live.OnlineVCPUs, live.State, live.CPUSeconds
	return info, nil
}
