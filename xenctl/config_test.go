package xenctl

import (
	"errors"
	"strings"
	"testing"

	"github.com/snowflock-go/snowflock/xenctl/xenchan"
)

func TestConfigValidation(t *testing.T) {
	ok := Config{Name: "sf-parent.1", Kernel: "/boot/vmlinuz", Cmdline: "console=hvc0 root=/dev/ram0"}
	tests := []struct {
		mod  func(*Config)
		want bool
	}{
		{func(*Config) {}, true},
		{func(c *Config) { c.Type = TypePV }, true},
		{func(c *Config) { c.Type = TypeHVM }, false},
		{func(c *Config) { c.Type = "pvhx" }, false},
		{func(c *Config) { c.Name = "" }, false},
		{func(c *Config) { c.Name = "123" }, false}, // xl would read a domain ID
		{func(c *Config) { c.Name = "1a" }, true},
		{func(c *Config) { c.Name = ".hidden" }, false},
		{func(c *Config) { c.Name = "a b" }, false},
		{func(c *Config) { c.Name = `a"b` }, false},
		{func(c *Config) { c.Name = strings.Repeat("a", 65) }, false},
		{func(c *Config) { c.MemMB = -1 }, false},
		{func(c *Config) { c.VCPUs = 513 }, false},
		{func(c *Config) { c.Kernel = "vmlinuz" }, false},
		{func(c *Config) { c.Kernel = "/boot/../vmlinuz" }, false},
		{func(c *Config) { c.Kernel = "/boot/vm\nlinuz" }, false},
		{func(c *Config) { c.Kernel = ""; c.Cmdline = "" }, true},
		{func(c *Config) { c.Kernel = "" }, false}, // a cmdline without a kernel
		{func(c *Config) { c.Cmdline = "console=hvc0\nmemory=4096" }, false},
		{func(c *Config) { c.Cmdline = "a\x00b" }, false},
		{func(c *Config) { c.Cmdline = "é" }, false},
		{func(c *Config) { c.Cmdline = `say "hi" \ # ; [x]` }, true}, // quoted safely
		{func(c *Config) {
			c.Extra = []Setting{{"on_crash", "preserve"}, {"vif", []string{"bridge=xenbr0"}}, {"pae", true}, {"shadow_memory", 8}}
		}, true},
		{func(c *Config) { c.Extra = []Setting{{"memory", 4096}} }, false}, // Config's own
		{func(c *Config) { c.Extra = []Setting{{"Vif", "x"}} }, false},
		{func(c *Config) { c.Extra = []Setting{{"a=b", "x"}} }, false},
		{func(c *Config) { c.Extra = []Setting{{"on_crash", "x"}, {"on_crash", "y"}} }, false},
		{func(c *Config) { c.Extra = []Setting{{"vif", []string{"a\nb"}}} }, false},
		{func(c *Config) { c.Extra = []Setting{{"x", 1.5}} }, false},
		{func(c *Config) { c.Channel = &xenchan.Setup{} }, false}, // no Store
	}
	for i, tt := range tests {
		c := ok
		tt.mod(&c)
		_, err := c.withDefaults()
		if (err == nil) != tt.want {
			t.Errorf("#%d: %v, want ok=%v", i, err, tt.want)
		}
		if err != nil && !errors.Is(err, ErrConfig) {
			t.Errorf("#%d: %v is not ErrConfig", i, err)
		}
	}
}

// dequote reads an xl.cfg string the way xl's lexer does
// (tools/libs/util/libxlu_cfg_l.l, libxlu_cfg.c xlu__cfgl_dequote) for the
// escapes quote uses; it fails where the lexer would not see one string.
func dequote(s string) (string, bool) {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return "", false
	}
	var b strings.Builder
	for i := 1; i < len(s)-1; i++ {
		c := s[i]
		switch {
		case c == '\n' || c == '"':
			return "", false // the token would end here
		case c == '\\':
			i++
			if i >= len(s)-1 || (s[i] != '"' && s[i] != '\\') {
				return "", false
			}
			b.WriteByte(s[i])
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), true
}

func TestSettingsRendering(t *testing.T) {
	c, err := Config{
		Name: "vm1", Kernel: "/k", Ramdisk: "/r", Cmdline: `a "b" c\d # e; f=g`, MemMB: 128, VCPUs: 2,
		Extra: []Setting{{"vif", []string{`bridge=xenbr0,mac="x"`, "y"}}, {"on_crash", "destroy"}, {"pae", false}, {"shadow_memory", int64(8)}},
	}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`name="vm1"`, `type="pvh"`, `memory=128`, `maxmem=128`, `vcpus=2`,
		`kernel="/k"`, `ramdisk="/r"`, `cmdline="a \"b\" c\\d # e; f=g"`,
		`vif=["bridge=xenbr0,mac=\"x\"", "y"]`, `on_crash="destroy"`, `pae=0`, `shadow_memory=8`,
	}
	got := c.settings("")
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("settings:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Every string reads back as exactly one string, equal to the value.
	if v, ok := dequote(strings.TrimPrefix(got[7], "cmdline=")); !ok || v != c.Cmdline {
		t.Fatalf("cmdline reads back as %q, %v", v, ok)
	}
	file, err := c.ConfigFile()
	if err != nil || strings.Count(string(file), "\n") != len(want) {
		t.Fatalf("config file %q, %v", file, err)
	}
}

func TestQuoteRoundTrip(t *testing.T) {
	for _, s := range []string{"", "plain", `"`, `\`, `\"`, `a\\"b`, `";kernel="/evil`, "#x", "'q'", "[1,2]"} {
		q := quote(s)
		if got, ok := dequote(q); !ok || got != s {
			t.Errorf("%q quotes as %s, reads back %q, %v", s, q, got, ok)
		}
	}
}
