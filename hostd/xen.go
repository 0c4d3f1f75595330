package hostd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/descriptor"
	"github.com/snowflock-go/snowflock/xenctl"
	"github.com/snowflock-go/snowflock/xenctl/xenchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// Xen runs VMs as Xen PVH (or PV) domains from dom0, through xl (xenctl), and talks
// to their guests over xenstore (xenchan). A clone's image is rebuilt from
// its descriptor and pages and restored with xl: stock Xen cannot fault a
// guest's pages in lazily, so a Xen clone's host gets all of its pages
// first (multicast makes that one transfer for every host).
type Xen struct {
	RunRoot string // capture directories, per VM
	// GuestType is the type of the domains Start boots: xenctl.TypePVH
	// (the default) or xenctl.TypePV. Clones keep their parent's type.
	GuestType xenctl.Type
	XL        string // "" is xenctl's default
	Logger    hclog.Logger
	// ConsoleDir is where xenconsoled logs guest consoles
	// (guest-<name>.log; xenconsoled --log=guest).
	ConsoleDir string

	xs *xenstore.Client // dom0's connection
}

// NewXen connects to dom0's xenstore and returns the driver. It needs to
// run in dom0, with xl on the PATH.
func NewXen(ctx context.Context, runRoot string, log hclog.Logger) (*Xen, error) {
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
	xs, err := xenstore.Dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("hostd: xenstore: %w", err)
	}
	return &Xen{RunRoot: abs, Logger: log, ConsoleDir: "/var/log/xen/console", xs: xs}, nil
}

// IsDom0 reports whether this machine is a Xen control domain.
func IsDom0() bool {
	b, err := os.ReadFile("/proc/xen/capabilities")
	return err == nil && strings.Contains(string(b), "control_d")
}

// Name says "xen/pvh" or "xen/pv".
func (x *Xen) Name() string { return "xen/" + string(x.guestType()) }

func (x *Xen) guestType() xenctl.Type {
	if x.GuestType == "" {
		return xenctl.TypePVH
	}
	return x.GuestType
}

// Close drops the xenstore connection.
func (x *Xen) Close() error { return x.xs.Close() }

// Reap destroys the domains a crashed daemon left (named vm-N, with the
// guest channel a daemon lays out) and removes their capture files.
func (x *Xen) Reap() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// Domain names from xenstore: /local/domain/<id>/name.
	ids, err := x.xs.Directory(ctx, "/local/domain")
	if err != nil {
		return err
	}
	var errs []error
	for _, id := range ids {
		name, err := x.xs.Read(ctx, "/local/domain/"+id+"/name")
		if err != nil || !strings.HasPrefix(string(name), "vm-") {
			continue
		}
		// Only domains a host daemon made: they carry its channel's epoch.
		if _, err := x.xs.Read(ctx, "/local/domain/"+id+"/"+xenchan.EpochNode); err != nil {
			continue
		}
		d, err := xenctl.Attach(ctx, x.cfg(string(name)))
		if err == nil {
			err = d.Destroy(ctx)
		}
		if err != nil {
			errs = append(errs, err)
		} else {
			x.Logger.Info("destroyed a domain of an earlier run", "name", string(name))
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(x.RunRoot, "vm-*"))
	for _, d := range dirs {
		_ = os.RemoveAll(d)
	}
	return errors.Join(errs...)
}

// cfg is the xenctl configuration common to every domain of this driver.
func (x *Xen) cfg(name string) xenctl.Config {
	return xenctl.Config{Name: name, Type: x.guestType(), XL: x.XL, Store: x.xs,
		Logger: x.Logger.With("vm", name)}
}

// Start boots a guest of GuestType from the host's kernel and initramfs, with its
// console on hvc0.
func (x *Xen) Start(ctx context.Context, spec VMSpec) (RunningVM, error) {
	cfg := x.cfg(spec.ID)
	cfg.MemMB, cfg.VCPUs = int(spec.MemMB), spec.VCPUs
	cfg.Kernel, cfg.Ramdisk = spec.Kernel, spec.Initrd
	cfg.Cmdline = strings.ReplaceAll(spec.Append, "console=ttyS0", "console=hvc0")
	cfg.Channel = &xenchan.Setup{}
	d, err := xenctl.Create(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return x.adopt(d, spec.ID), nil
}

// Restore starts a clone: the descriptor's image rebuilt with the pages,
// restored under the clone's name, its greeting in place before it runs.
func (x *Xen) Restore(ctx context.Context, spec VMSpec, src RestoreSource) (RunningVM, error) {
	if src.Meta.Driver != "xen" {
		return nil, fmt.Errorf("hostd: a %s descriptor cannot be restored by Xen", src.Meta.Driver)
	}
	if src.ReadPages == nil {
		return nil, errors.New("hostd: a Xen restore needs the pages in this process")
	}
	desc, err := xenctl.ReadDescriptor(src.DeviceStatePath)
	if err != nil {
		return nil, err
	}
	cfg := x.cfg(spec.ID)
	cfg.Type = "" // the parent's: a clone keeps its type whatever this host boots
	cfg.Channel = &xenchan.Setup{Greeting: src.Greeting}
	pages := pageSource(func(pfn uint64, dst []byte) error { return src.ReadPages(ctx, pfn, dst) })
	d, err := xenctl.RestoreFrom(ctx, desc, pages, cfg)
	if err != nil {
		return nil, err
	}
	return x.adopt(d, spec.ID), nil
}

// DeliversGreeting: the greeting goes into xenstore before the clone runs.
func (x *Xen) DeliversGreeting() bool { return true }

type pageSource func(pfn uint64, dst []byte) error

func (f pageSource) Page(pfn uint64, dst []byte) error { return f(pfn, dst) }

// adopt watches a domain until it is gone or has shut down.
func (x *Xen) adopt(d *xenctl.Domain, name string) *xenVM {
	v := &xenVM{x: x, d: d, name: name, done: make(chan struct{}), stop: make(chan struct{})}
	go v.watch() // owned by v: ends when the domain is gone or Destroy stops it
	return v
}

type xenVM struct {
	x    *Xen
	d    *xenctl.Domain
	name string

	done     chan struct{} // closed when the domain is gone
	stop     chan struct{}
	stopOnce sync.Once
	doneOnce sync.Once
}

// watch polls the domain's state on every @releaseDomain event (and every
// few seconds) and destroys it once its guest has shut down (powered off,
// rebooted or crashed; not suspended, which is a save in progress).
func (v *xenVM) watch() {
	defer v.doneOnce.Do(func() { close(v.done) })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-v.stop:
		case <-ctx.Done():
		}
		cancel()
	}()
	w, err := v.x.xs.Watch(ctx, xenstore.WatchReleaseDomain)
	var events <-chan xenstore.Event
	if err == nil {
		events = w.Events()
		defer w.Stop(context.Background())
	}
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-events:
		case <-tick.C:
		}
		info, err := v.d.Info(ctx)
		switch {
		case errors.Is(err, xenctl.ErrNoDomain):
			return
		case err != nil:
			continue
		case info.State.Shutdown && info.State.Reason == 's':
			// Suspended for a save (a capture): xl resumes it.
		case info.State.Shutdown || info.State.Dying:
			_ = v.d.Destroy(ctx)
			return
		}
	}
}

func (v *xenVM) GuestChannel(ctx context.Context) (io.ReadWriteCloser, error) {
	return xenchan.NewHost(ctx, v.x.xs, v.d.ID(), xenchan.HostOptions{Logger: v.x.Logger.With("vm", v.name)})
}

func (v *xenVM) ConsolePath() string {
	return filepath.Join(v.x.ConsoleDir, "guest-"+v.name+".log")
}

func (v *xenVM) Done() <-chan struct{} { return v.done }

func (v *xenVM) Destroy(ctx context.Context) error {
	err := v.d.Destroy(ctx)
	v.stopOnce.Do(func() { close(v.stop) })
	<-v.done
	_ = os.RemoveAll(filepath.Join(v.x.RunRoot, v.name))
	return err
}

func (v *xenVM) Pause(ctx context.Context) error  { return v.d.Pause(ctx) }
func (v *xenVM) Resume(ctx context.Context) error { return v.d.Unpause(ctx) }

// Snapshot captures the running domain with xl save -c (the guest is
// suspended for the save and resumes): the xcstream descriptor is the
// device state, the pages a sparse file by frame number.
func (v *xenVM) Snapshot(ctx context.Context, name string) (*Capture, error) {
	dir := filepath.Join(v.x.RunRoot, v.name, name)
	c, err := v.d.Capture(ctx, xenctl.CaptureOptions{Dir: dir})
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	var pages []descriptor.Range
	var frames, data uint64
	for p := range c.Descriptor.Pages() {
		frames = max(frames, p.PFN+1)
		if !p.Stored() {
			continue
		}
		data++
		if n := len(pages); n > 0 && pages[n-1].Start+pages[n-1].Count == p.PFN {
			pages[n-1].Count++
		} else {
			pages = append(pages, descriptor.Range{Start: p.PFN, Count: 1})
		}
	}
	memMB := int(c.Saved.MaxMemKB / 1024)
	frames = max(frames, uint64(memMB)<<20/descriptor.PageSize)
	// The page file must cover the frame space for the memserver.
	if err := os.Truncate(c.PagesPath, int64(frames)*descriptor.PageSize); err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	return &Capture{
		Meta: descriptor.Meta{Driver: "xen", Machine: string(c.Saved.Type), MemMB: memMB, VCPUs: c.Saved.MaxVCPUs,
			PageSize: descriptor.PageSize, Frames: frames},
		DeviceStatePath: c.DescriptorPath, FrozenRAMPath: c.PagesPath, RAMSize: int64(frames) * descriptor.PageSize,
		Pages: pages, DataPages: data, Pause: c.Save.Took,
	}, nil
}
