package qmp

import (
	"context"
	"errors"
	"slices"
)

// Run states reported by query-status (QEMU's RunState) that a VM driver
// meets; QEMU 7.2 has a few more (e.g. "internal-error", "guest-panicked").
const (
	StatusPrelaunch     = "prelaunch" // started with -S, not yet run
	StatusRunning       = "running"
	StatusPaused        = "paused"         // stopped by the stop command
	StatusInMigrate     = "inmigrate"      // waiting for an incoming migration
	StatusPostMigrate   = "postmigrate"    // outgoing migration completed; stopped
	StatusFinishMigrate = "finish-migrate" // saving device state, briefly
	StatusShutdown      = "shutdown"       // guest shut down, with -no-shutdown
)

// Stop pauses the guest's vCPUs (QMP stop). QEMU emits STOP.
func (c *Client) Stop(ctx context.Context) error {
	return c.Execute(ctx, "stop", nil, nil)
}

// Cont resumes the guest's vCPUs (QMP cont). QEMU emits RESUME. A cont sent
// while the VM is in StatusInMigrate does not resume it once the migration
// completes: wait for the MIGRATION event with status "completed" first.
func (c *Client) Cont(ctx context.Context) error {
	return c.Execute(ctx, "cont", nil, nil)
}

// QueryStatus returns the VM's run state, one of the Status constants.
func (c *Client) QueryStatus(ctx context.Context) (string, error) {
	var r struct {
		Status string `json:"status"`
	}
	if err := c.Execute(ctx, "query-status", nil, &r); err != nil {
		return "", err
	}
	return r.Status, nil
}

// Quit makes QEMU exit. QEMU may close the connection before or after its
// reply; both count as success.
func (c *Client) Quit(ctx context.Context) error {
	err := c.Execute(ctx, "quit", nil, nil)
	if errors.Is(err, ErrDisconnected) {
		return nil
	}
	return err
}

// MigrateSetCapabilities sets migration capabilities, e.g.
// {"x-ignore-shared": true, "events": true}.
func (c *Client) MigrateSetCapabilities(ctx context.Context, caps map[string]bool) error {
	type capability struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	names := make([]string, 0, len(caps))
	for n := range caps {
		names = append(names, n)
	}
	slices.Sort(names) // deterministic requests
	list := make([]capability, 0, len(names))
	for _, n := range names {
		list = append(list, capability{n, caps[n]})
	}
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// Migrate starts an outgoing migration to uri (e.g. "exec:cat > dev.state",
// "unix:/path"). It returns once the migration has started; follow it with
// QueryMigrate or the MIGRATION event.
func (c *Client) Migrate(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]string{"uri": uri}, nil)
}

// MigrateIncoming starts receiving a migration from uri on a QEMU started
// with -incoming defer.
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-incoming", map[string]string{"uri": uri}, nil)
}

// MigrationInfo is the part of query-migrate's reply a driver uses. Status
// is empty when no migration has been run.
type MigrationInfo struct {
	// Status is e.g. "setup", "active", "completed", "failed", "cancelled".
	Status      string        `json:"status"`
	ErrorDesc   string        `json:"error-desc"`
	TotalTimeMS int64         `json:"total-time"`
	DowntimeMS  int64         `json:"downtime"`
	SetupTimeMS int64         `json:"setup-time"`
	RAM         *MigrationRAM `json:"ram"`
}

// MigrationRAM counts the RAM a migration moved, in bytes or pages.
type MigrationRAM struct {
	Transferred int64 `json:"transferred"`
	Remaining   int64 `json:"remaining"`
	Total       int64 `json:"total"`
	Duplicate   int64 `json:"duplicate"` // zero pages, sent as a marker
	Normal      int64 `json:"normal"`    // pages sent in full
}

// QueryMigrate returns the state of the current or last migration.
func (c *Client) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var info MigrationInfo
	err := c.Execute(ctx, "query-migrate", nil, &info)
	return info, err
}
