package xenctl

import (
	"context"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/xenctl/xenchan"
)

// cleanupGrace bounds destroying a domain after a failed Create or
// restore, when the caller's context may be what failed.
const cleanupGrace = 30 * time.Second

// saveLimit bounds an xl save once the caller's context no longer does:
// xl save is never killed (see Save).
const saveLimit = 30 * time.Minute

// Domain is one guest domain made or adopted by this package. It is
// addressed by its domain ID, which Xen does not reuse until the IDs wrap
// around (32752 creations later), so a Domain never acts on another
// domain that took its name. Its methods are safe for concurrent use.
type Domain struct {
	cfg Config
	x   xl
	id  uint32
	log hclog.Logger

	mu   sync.Mutex
	gone bool // destroyed, or saved without a checkpoint
}

// ID is the domain's ID.
func (d *Domain) ID() uint32 { return d.id }

// Name is the domain's name.
func (d *Domain) Name() string { return d.cfg.Name }

// Create creates and starts a domain: `xl create -p -e` with cfg's
// settings on the command line (after the empty configuration
// /dev/null, which xl reads as "settings from the command line only"),
// then, with cfg.Channel, the guest channel in xenstore, then unpause
// unless cfg.Paused.
//
// -e: no xl process stays behind to watch the domain, so a guest that
// powers off, reboots or crashes stays a shut-down domain (Info's State)
// until Destroy; the host daemon decides, not xl's on_* actions.
func Create(ctx context.Context, cfg Config) (*Domain, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	x := cfg.xl()
	uuid, err := newUUID()
	if err != nil {
		return nil, err
	}
	args := append([]string{"create", "-p", "-e", "/dev/null"}, cfg.settings(uuid)...)
	begin := time.Now()
	if _, err := x.run(ctx, Command{Args: args}); err != nil {
		// xl destroys what it half-made when create fails, but not when
		// it is killed.
		if ctx.Err() != nil {
			removeKilled(ctx, cfg, uuid)
		}
		return nil, fmt.Errorf("xenctl: create %s: %w", cfg.Name, err)
	}
	d, err := adopt(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("xenctl: create %s: %w", cfg.Name, err)
	}
	if err := d.start(ctx); err != nil {
		d.destroyAfterFailure(ctx)
		return nil, fmt.Errorf("xenctl: create %s: %w", cfg.Name, err)
	}
	d.log.Info("created", "type", cfg.Type, "mem_mb", cfg.MemMB, "vcpus", cfg.VCPUs,
		"paused", cfg.Paused, "took", time.Since(begin))
	return d, nil
}

// Attach adopts the running domain named cfg.Name, for a host daemon that
// restarted. cfg's guest settings are not checked against the domain.
func Attach(ctx context.Context, cfg Config) (*Domain, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return adopt(ctx, cfg)
}

func adopt(ctx context.Context, cfg Config) (*Domain, error) {
	x := cfg.xl()
	id, err := x.domid(ctx, cfg.Name)
	if err != nil {
		return nil, err
	}
	return &Domain{cfg: cfg, x: x, id: id, log: cfg.Logger.With("domain", cfg.Name, "domid", id)}, nil
}

// start finishes a domain made paused: the channel, then unpause.
func (d *Domain) start(ctx context.Context) error {
	if d.cfg.Channel != nil {
		if _, err := xenchan.Prepare(ctx, d.cfg.Store, d.id, *d.cfg.Channel); err != nil {
			return err
		}
	}
	if d.cfg.Paused {
		return nil
	}
	return d.Unpause(ctx)
}

// removeKilled destroys the domain an xl command killed by its context
// was making, if it got as far as a name: the UUID tells it from any other
// domain of that name.
func removeKilled(ctx context.Context, cfg Config, uuid string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupGrace)
	defer cancel()
	x := cfg.xl()
	id, err := x.domid(ctx, cfg.Name)
	if err != nil {
		return
	}
	// The UUID is in xl list -v's line from the moment the domain exists
	// (xl list -l needs its stored configuration, which may not).
	res, err := x.run(ctx, Command{Args: []string{"list", "-v", domidArg(id)}})
	if err != nil || !slices.Contains(strings.Fields(string(res.Stdout)), uuid) {
		return
	}
	if _, err := x.run(ctx, Command{Args: []string{"destroy", domidArg(id)}}); err != nil {
		cfg.Logger.Error("destroying a domain left by a killed xl", "domain", cfg.Name, "domid", id, "error", err)
	}
}

// destroyAfterFailure removes a domain whose start failed.
func (d *Domain) destroyAfterFailure(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupGrace)
	defer cancel()
	if err := d.Destroy(ctx); err != nil {
		d.log.Error("destroying a domain that failed to start", "error", err)
	}
}

// Pause stops the domain's vCPUs (xl pause).
func (d *Domain) Pause(ctx context.Context) error {
	if err := d.x.runChecked(ctx, "pause", domidArg(d.id)); err != nil {
		return fmt.Errorf("xenctl: pause %s: %w", d.cfg.Name, err)
	}
	return nil
}

// Unpause restarts the domain's vCPUs (xl unpause).
func (d *Domain) Unpause(ctx context.Context) error {
	if err := d.x.runChecked(ctx, "unpause", domidArg(d.id)); err != nil {
		return fmt.Errorf("xenctl: unpause %s: %w", d.cfg.Name, err)
	}
	return nil
}

// Info reports the domain's configuration and state.
func (d *Domain) Info(ctx context.Context) (Info, error) {
	info, err := d.x.info(ctx, d.id)
	if err != nil {
		return Info{}, fmt.Errorf("xenctl: info %s: %w", d.cfg.Name, err)
	}
	if info.Name != d.cfg.Name {
		// Renamed behind our back; the ID is still the domain's.
		d.log.Warn("domain has another name", "now", info.Name)
	}
	return info, nil
}

// Destroy destroys the domain (xl destroy). A domain that is gone already
// is not an error, so Destroy may be called again.
func (d *Domain) Destroy(ctx context.Context) error {
	d.mu.Lock()
	gone := d.gone
	d.mu.Unlock()
	if gone {
		return nil
	}
	_, err := d.x.run(ctx, Command{Args: []string{"destroy", domidArg(d.id)}})
	if err != nil && !errors.Is(err, ErrNoDomain) {
		return fmt.Errorf("xenctl: destroy %s: %w", d.cfg.Name, err)
	}
	d.markGone()
	d.log.Info("destroyed")
	return nil
}

func (d *Domain) markGone() {
	d.mu.Lock()
	d.gone = true
	d.mu.Unlock()
}

// AfterSave says what xl save leaves of the domain.
type AfterSave int

const (
	// DestroyAfterSave: plain `xl save`: the domain is destroyed once
	// saved (and the Domain is gone).
	DestroyAfterSave AfterSave = iota
	// PauseAfterSave: `xl save -p`: the domain is resumed from its
	// suspend and left paused; Unpause continues it.
	PauseAfterSave
	// RunAfterSave: `xl save -c` (checkpoint): the domain is resumed and
	// runs on. The guest saw a suspend that was cancelled (Linux resumes
	// its devices in place) rather than a restore.
	RunAfterSave
)

func (a AfterSave) flag() []string {
	switch a {
	case PauseAfterSave:
		return []string{"-p"}
	case RunAfterSave:
		return []string{"-c"}
	}
	return nil
}

// SaveResult describes a save.
type SaveResult struct {
	Path  string        `json:"path"`
	After AfterSave     `json:"after"`
	Took  time.Duration `json:"took"` // the whole xl save: the guest is suspended for most of it
}

// Save writes the domain's save image to path, a file on the machine
// where xl runs (xl creates or truncates it). The guest must support
// suspend (PV and PVH Linux do): xl asks it to suspend through xenstore,
// saves its memory and state, then acts as after says. If the save fails,
// xl resumes the domain.
//
// xl save is not killed when ctx ends: a killed save leaves the guest
// suspended with nothing to resume it. Save waits for xl (up to
// saveLimit) and then returns.
func (d *Domain) Save(ctx context.Context, file string, after AfterSave) (SaveResult, error) {
	if !path.IsAbs(file) || checkText("path", file) != nil {
		return SaveResult{}, fmt.Errorf("%w: save path %q", ErrConfig, file)
	}
	res, err := d.save(ctx, Command{}, file, after)
	if err != nil {
		return res, fmt.Errorf("xenctl: save %s: %w", d.cfg.Name, err)
	}
	return res, nil
}

// save runs xl save to file with cmd's streams, bounded by saveLimit and
// not by ctx (see Save).
func (d *Domain) save(ctx context.Context, cmd Command, file string, after AfterSave) (SaveResult, error) {
	begin := time.Now()
	cmd.Args = append(append([]string{"save"}, after.flag()...), domidArg(d.id), file)
	runCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), saveLimit)
	defer cancel()
	_, err := d.x.run(runCtx, cmd)
	res := SaveResult{Path: file, After: after, Took: time.Since(begin)}
	if err != nil {
		return res, err
	}
	if after == DestroyAfterSave {
		d.markGone()
	}
	d.log.Info("saved", "path", file, "after", after, "took", res.Took)
	return res, nil
}
