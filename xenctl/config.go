package xenctl

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/xenctl/xenchan"
)

// Type is a guest type as xl.cfg spells it.
type Type string

// Guest types SnowFlock runs. (HVM needs a device model, which the save
// image's emulator records carry; xenctl does not create HVM guests.)
const (
	TypePVH Type = "pvh"
	TypePV  Type = "pv"
	TypeHVM Type = "hvm" // reported by Info for domains made elsewhere
)

// Defaults.
const (
	DefaultXL    = "xl"
	DefaultMemMB = 256
	DefaultVCPUs = 1
)

// ErrConfig is wrapped by every error about an invalid Config.
var ErrConfig = errors.New("xenctl: invalid config")

// Config describes a guest domain and how to reach the toolstack that runs
// it.
type Config struct {
	// Name is the domain's name, unique on the host: 1-64 of
	// [A-Za-z0-9_.-], starting with a letter or digit, not all digits
	// (xl would read those as a domain ID).
	Name string
	// Type is TypePVH (default) or TypePV.
	Type  Type
	MemMB int // memory and maxmem, in MiB; default DefaultMemMB
	VCPUs int // default DefaultVCPUs

	// Kernel and Ramdisk are absolute paths on the machine where xl runs;
	// Cmdline is the kernel's command line. Printable ASCII only.
	Kernel, Ramdisk, Cmdline string

	// Extra are more xl.cfg settings, e.g. {"on_crash", "destroy"} or
	// {"vif", []string{"bridge=xenbr0"}}. Keys must be xl.cfg identifiers
	// and not one of those Config sets itself.
	Extra []Setting

	// Paused leaves the domain paused after Create, Restore or RestoreFrom;
	// otherwise they unpause it once it is ready.
	Paused bool
	// KeepMACs has Restore and RestoreFrom keep the saved NICs' MAC
	// addresses, for a domain that moves. By default every NIC gets a new
	// one: the saved addresses are the parent's, and copies of one capture
	// must not share a bridge with them.
	KeepMACs bool
	// Channel, if set, has Create, Restore and RestoreFrom lay out the
	// guest API channel in xenstore (xenchan.Prepare) before the guest
	// runs: its identity and, for a clone, its greeting. Store is then
	// dom0's xenstore connection.
	Channel *xenchan.Setup
	Store   xenchan.Store

	// XL is the xl binary; default DefaultXL (on the runner's PATH).
	XL string
	// Runner runs xl; default LocalRunner{}.
	Runner Runner
	Logger hclog.Logger // default: no logging
}

// Setting is one xl.cfg setting. Value is a string (written quoted), an
// integer, a bool (1 or 0) or a []string (a list of quoted strings).
type Setting struct {
	Key   string
	Value any
}

var (
	validName  = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	allDigits  = regexp.MustCompile(`^[0-9]+$`)
	validKey   = regexp.MustCompile(`^[a-z][._0-9a-z]{0,63}$`) // xl.cfg's IDENT
	ownedKeys  = map[string]bool{"name": true, "type": true, "builder": true, "memory": true, "maxmem": true, "vcpus": true, "maxvcpus": true, "kernel": true, "ramdisk": true, "cmdline": true, "extra": true, "root": true, "uuid": true}
	maxCmdline = 4096
)

// validName reports whether s can name a domain.
func checkName(s string) error {
	if !validName.MatchString(s) || allDigits.MatchString(s) {
		return fmt.Errorf("%w: domain name %q: want 1-64 of [A-Za-z0-9_.-], starting with a letter or digit, not all digits", ErrConfig, s)
	}
	return nil
}

// withDefaults validates c and fills in defaults. It touches nothing.
func (c Config) withDefaults() (Config, error) {
	if err := checkName(c.Name); err != nil {
		return c, err
	}
	switch c.Type {
	case "":
		c.Type = TypePVH
	case TypePVH, TypePV:
	default:
		return c, fmt.Errorf("%w: guest type %q: want %q or %q", ErrConfig, c.Type, TypePVH, TypePV)
	}
	if c.MemMB < 0 || c.VCPUs < 0 || c.MemMB > 1<<24 || c.VCPUs > 512 {
		return c, fmt.Errorf("%w: MemMB %d, VCPUs %d", ErrConfig, c.MemMB, c.VCPUs)
	}
	if c.MemMB == 0 {
		c.MemMB = DefaultMemMB
	}
	if c.VCPUs == 0 {
		c.VCPUs = DefaultVCPUs
	}
	for _, f := range []struct{ name, val string }{{"Kernel", c.Kernel}, {"Ramdisk", c.Ramdisk}} {
		if f.val == "" {
			continue
		}
		if !path.IsAbs(f.val) || path.Clean(f.val) != f.val {
			return c, fmt.Errorf("%w: %s %q is not a clean absolute path", ErrConfig, f.name, f.val)
		}
		if err := checkText(f.name, f.val); err != nil {
			return c, err
		}
	}
	if c.Kernel == "" && (c.Ramdisk != "" || c.Cmdline != "") {
		return c, fmt.Errorf("%w: Ramdisk and Cmdline need a Kernel", ErrConfig)
	}
	if len(c.Cmdline) > maxCmdline {
		return c, fmt.Errorf("%w: Cmdline of %d bytes", ErrConfig, len(c.Cmdline))
	}
	if err := checkText("Cmdline", c.Cmdline); err != nil {
		return c, err
	}
	seen := map[string]bool{}
	for _, s := range c.Extra {
		if !validKey.MatchString(s.Key) {
			return c, fmt.Errorf("%w: setting key %q", ErrConfig, s.Key)
		}
		if ownedKeys[s.Key] {
			return c, fmt.Errorf("%w: setting %q is Config's own", ErrConfig, s.Key)
		}
		if seen[s.Key] {
			return c, fmt.Errorf("%w: setting %q twice", ErrConfig, s.Key)
		}
		seen[s.Key] = true
		if _, err := xlValue(s.Value); err != nil {
			return c, fmt.Errorf("%w: setting %q: %v", ErrConfig, s.Key, err)
		}
	}
	if c.Channel != nil && c.Store == nil {
		return c, fmt.Errorf("%w: Channel needs a Store", ErrConfig)
	}
	if c.XL == "" {
		c.XL = DefaultXL
	}
	if c.Runner == nil {
		c.Runner = LocalRunner{}
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c, nil
}

// checkText refuses what xl.cfg strings cannot carry: control characters
// (a newline would end the setting and start another) and anything but
// printable ASCII.
func checkText(what, s string) error {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return fmt.Errorf("%w: %s has byte %#02x at %d: printable ASCII only", ErrConfig, what, s[i], i)
		}
	}
	return nil
}

// quote writes s as an xl.cfg string. xl's lexer takes "..." with
// backslash escapes; only \\ and \" are needed once control characters are
// excluded (its \x and octal escapes are unreliable, see
// tools/libs/util/libxlu_cfg.c xlu__cfgl_dequote).
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// xlValue renders a Setting's value.
func xlValue(v any) (string, error) {
	switch v := v.(type) {
	case string:
		if err := checkText("value", v); err != nil {
			return "", err
		}
		return quote(v), nil
	case int:
		return strconv.FormatInt(int64(v), 10), nil
	case int64:
		return strconv.FormatInt(v, 10), nil
	case uint32:
		return strconv.FormatUint(uint64(v), 10), nil
	case uint64:
		return strconv.FormatUint(v, 10), nil
	case bool:
		if v {
			return "1", nil
		}
		return "0", nil
	case []string:
		parts := make([]string, len(v))
		for i, s := range v {
			if err := checkText("list item", s); err != nil {
				return "", err
			}
			parts[i] = quote(s)
		}
		return "[" + strings.Join(parts, ", ") + "]", nil
	}
	return "", fmt.Errorf("unsupported value type %T", v)
}

// settings returns the domain's xl.cfg settings, one per element, each a
// complete "key=value" line without its newline. They go on xl create's
// command line, after the empty configuration /dev/null. uuid, if set,
// is the domain's UUID.
func (c Config) settings(uuid string) []string {
	s := []string{"name=" + quote(c.Name)}
	if uuid != "" {
		s = append(s, "uuid="+quote(uuid))
	}
	s = append(s,
		"type="+quote(string(c.Type)),
		"memory="+strconv.Itoa(c.MemMB),
		"maxmem="+strconv.Itoa(c.MemMB),
		"vcpus="+strconv.Itoa(c.VCPUs),
	)
	if c.Kernel != "" {
		s = append(s, "kernel="+quote(c.Kernel))
	}
	if c.Ramdisk != "" {
		s = append(s, "ramdisk="+quote(c.Ramdisk))
	}
	if c.Cmdline != "" {
		s = append(s, "cmdline="+quote(c.Cmdline))
	}
	for _, x := range c.Extra {
		v, _ := xlValue(x.Value) // checked by withDefaults
		s = append(s, x.Key+"="+v)
	}
	return s
}

// ConfigFile renders the settings as an xl.cfg file, for people and for
// `xl create FILE`.
func (c Config) ConfigFile() ([]byte, error) {
	c, err := c.withDefaults()
	if err != nil {
		return nil, err
	}
	return []byte(strings.Join(c.settings(""), "\n") + "\n"), nil
}
