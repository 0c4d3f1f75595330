package xenctl

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"testing"
	"time"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

var uuidArg = regexp.MustCompile(`uuid="[0-9a-f-]{36}"`)

func TestCreateLifecycle(t *testing.T) {
	f := newFakeXL(t)
	cfg := f.config("sf-parent")
	cfg.MemMB, cfg.VCPUs, cfg.Kernel, cfg.Cmdline = 128, 2, "/boot/vmlinuz", "console=hvc0"
	d, err := Create(ctx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if d.ID() != 1 || d.Name() != "sf-parent" {
		t.Fatalf("domain %d %s", d.ID(), d.Name())
	}
	info, err := d.Info(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Paused || info.Type != TypePVH || info.MaxMemKB != 128*1024 || info.MaxVCPUs != 2 || info.MemMB != 128 {
		t.Fatalf("info %+v", info)
	}
	if err := d.Pause(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if info, _ := d.Info(ctx(t)); !info.State.Paused {
		t.Fatalf("not paused: %s", info.State)
	}
	if err := d.Unpause(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if err := d.Destroy(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if err := d.Destroy(ctx(t)); err != nil {
		t.Fatalf("second destroy: %v", err)
	}
	want := []string{
		`create -p -e /dev/null name="sf-parent" uuid="*" type="pvh" memory=128 maxmem=128 vcpus=2 kernel="/boot/vmlinuz" cmdline="console=hvc0"`,
		"domid sf-parent",
		"unpause 1",
		"list -l 1", "list 1",
		"pause 1",
		"list -l 1", "list 1",
		"unpause 1",
		"destroy 1",
	}
	got := f.commands()
	got[0] = uuidArg.ReplaceAllString(got[0], `uuid="*"`)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("commands:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if _, err := d.Info(ctx(t)); !errors.Is(err, ErrNoDomain) {
		t.Fatalf("info of a destroyed domain: %v", err)
	}
}

func TestPauseReportsLibxlErrors(t *testing.T) {
	f := newFakeXL(t)
	cfg := f.config("vm")
	cfg.Paused = true
	d, err := Create(ctx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.commands(); got[len(got)-1] != "domid vm" {
		t.Fatalf("a paused create unpaused: %q", got)
	}
	f.libxlEr["unpause"] = "x"
	if err := d.Unpause(ctx(t)); err == nil || !strings.Contains(err.Error(), "libxl: error:") {
		t.Fatalf("unpause with a libxl error: %v", err)
	}
	f.libxlEr = map[string]string{}
	d.Destroy(ctx(t))
	// xl exits 0, libxl says the domain is gone.
	if err := d.Pause(ctx(t)); !errors.Is(err, ErrNoDomain) {
		t.Fatalf("pause of a gone domain: %v", err)
	}
}

func TestCreateFailures(t *testing.T) {
	f := newFakeXL(t)
	if _, err := Create(ctx(t), f.config("vm")); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(ctx(t), f.config("vm")); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second domain of a name: %v", err)
	}
	var ee *ExitError
	f.fail["create"] = "Parsing config from /dev/null\nlibxl: error: libxl_create.c:1100:initiate_domain_create: kernel not found\n"
	_, err := Create(ctx(t), f.config("other"))
	if !errors.As(err, &ee) || ee.Code != 1 || !strings.Contains(err.Error(), "kernel not found") {
		t.Fatalf("failed create: %v", err)
	}
	// An invalid config runs nothing.
	n := len(f.commands())
	if _, err := Create(ctx(t), f.config("12")); !errors.Is(err, ErrConfig) || len(f.commands()) != n {
		t.Fatalf("invalid config: %v", err)
	}
}

func TestSaveModes(t *testing.T) {
	for _, tt := range []struct {
		after AfterSave
		flag  string
		stays bool
	}{{DestroyAfterSave, "", false}, {PauseAfterSave, "-p ", true}, {RunAfterSave, "-c ", true}} {
		f := newFakeXL(t)
		d, err := Create(ctx(t), f.config("vm"))
		if err != nil {
			t.Fatal(err)
		}
		res, err := d.Save(ctx(t), "/var/lib/sf/vm.save", tt.after)
		if err != nil || res.Path != "/var/lib/sf/vm.save" || res.After != tt.after {
			t.Fatalf("%v: %+v, %v", tt.after, res, err)
		}
		got := f.commands()
		if got[len(got)-1] != "save "+tt.flag+"1 /var/lib/sf/vm.save" {
			t.Fatalf("%v: ran %q", tt.after, got[len(got)-1])
		}
		_, err = d.Info(ctx(t))
		if (err == nil) != tt.stays {
			t.Fatalf("%v: info after save: %v", tt.after, err)
		}
		if !tt.stays {
			n := len(f.commands())
			d.Destroy(ctx(t)) // gone: nothing to run
			if len(f.commands()) != n {
				t.Fatalf("destroy ran xl for a saved domain")
			}
		}
	}
	f := newFakeXL(t)
	d, _ := Create(ctx(t), f.config("vm"))
	if _, err := d.Save(ctx(t), "relative.save", RunAfterSave); !errors.Is(err, ErrConfig) {
		t.Fatalf("relative save path: %v", err)
	}
}

func TestAttach(t *testing.T) {
	f := newFakeXL(t)
	Create(ctx(t), f.config("a"))
	Create(ctx(t), f.config("b"))
	d, err := Attach(ctx(t), f.config("b"))
	if err != nil || d.ID() != 2 {
		t.Fatalf("attach: %v", err)
	}
	if _, err := Attach(ctx(t), f.config("c")); !errors.Is(err, ErrNoDomain) {
		t.Fatalf("attach to a missing domain: %v", err)
	}
}

func TestKilledCreateRemovesItsDomain(t *testing.T) {
	f := newFakeXL(t)
	other, err := Create(ctx(t), f.config("taken"))
	if err != nil {
		t.Fatal(err)
	}
	f.hang["create"] = true
	cctx, cancel := context.WithTimeout(ctx(t), 50*time.Millisecond)
	defer cancel()
	if _, err := Create(cctx, f.config("vm")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("killed create: %v", err)
	}
	got := f.commands()
	if strings.Join(got[len(got)-3:], "\n") != "domid vm\nlist -v 2\ndestroy 2" {
		t.Fatalf("after a killed create: %q", got)
	}
	// A domain of the same name that the killed xl did not make is left
	// alone: its UUID differs.
	f.hang["create"] = true
	cctx, cancel = context.WithTimeout(ctx(t), 50*time.Millisecond)
	defer cancel()
	if _, err := Create(cctx, f.config("taken")); err == nil {
		t.Fatal("second domain named taken")
	}
	if _, err := other.Info(ctx(t)); err != nil {
		t.Fatalf("the other domain: %v", err)
	}
}
