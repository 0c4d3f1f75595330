package hostd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/descriptor"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/lazyram"
	"github.com/snowflock-go/snowflock/memserver"
)

// Snapshotter is a RunningVM that can be captured for cloning: its device
// state saved and its RAM frozen, with the guest paused only meanwhile.
type Snapshotter interface {
	Snapshot(ctx context.Context, name string) (*Capture, error)
}

// Capture is a frozen VM: the payload of a descriptor plus the frozen RAM
// the memserver serves. Meta carries the driver's machine fields.
type Capture struct {
	Meta            descriptor.Meta
	DeviceStatePath string
	FrozenRAMPath   string
	RAMSize         int64
	Pages           []descriptor.Range // pages that hold data
	DataPages       uint64
	Pause           time.Duration

	// Base is set when the VM is a clone: FrozenRAMPath is then an overlay
	// over Base, the RAM file the clone was restored from, holding only the
	// clone's own pages: Pages with data, OwnZero all zero. Every other page
	// is Base's.
	Base    string
	OwnZero []descriptor.Range
}

// remove deletes the capture's files.
func (c *Capture) remove() {
	for _, p := range []string{c.DeviceStatePath, c.FrozenRAMPath} {
		if p != "" {
			_ = os.Remove(p)
		}
	}
}

// Header names of the descriptor endpoint of the host API.
const (
	headerCapability = "X-Snowflock-Capability"
	headerSnapshot   = "X-Snowflock-Snapshot"
)

// localSnap is a capture this host serves: the descriptor bytes to clone
// hosts, and the frozen pages through the memserver.
type localSnap struct {
	digest     string
	blob       []byte
	memID      string
	capability memserver.Capability
	capture    *Capture
	parent     uint64
	ticket     uint64 // for a clone call
	checkpoint uint64 // for a checkpoint call, once committed
	pause      time.Duration
	dataPages  uint64
	pages      []descriptor.Range // the descriptor's page map
	// pushers multicast the snapshot to its tickets' hosts; stopPush ends
	// them when it is released (releasedFlag, under Daemon.mu).
	pushers      []*pusher
	stopPush     []context.CancelFunc
	releasedFlag bool
	// base is the source an overlay capture (of a clone) reads its other
	// pages from: held until the snapshot is released.
	base *source

	released sync.Once
}

// Capture errors a guest sees.
var (
	errNoSnapshots = errors.New("this host's hypervisor cannot capture VMs")
	errNoMemserver = errors.New("this host serves no memory (no --memserver-addr)")
)

// capture freezes a VM and serves the result: it pauses the guest only for
// the snapshot, writes the descriptor and registers the frozen RAM with the
// memserver. The caller registers the descriptor through raft.
func (d *Daemon) capture(ctx context.Context, vmID uint64, call uint64, inflight []uint64, checkpoint bool) (*localSnap, error) {
	d.mu.Lock()
	lv := d.vms[vmID]
	d.mu.Unlock()
	if lv == nil {
		return nil, fmt.Errorf("vm %d does not run on this host", vmID)
	}
	snapper, ok := lv.run.(Snapshotter)
	if !ok {
		return nil, errNoSnapshots
	}
	if d.ms == nil {
		return nil, errNoMemserver
	}
	var nonce [6]byte
	_, _ = rand.Read(nonce[:])
	name := fmt.Sprintf("snap-%d-%s", vmID, hex.EncodeToString(nonce[:]))
	c, err := snapper.Snapshot(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	ok = false
	defer func() {
		if !ok {
			c.remove()
		}
	}()
	dev, err := os.ReadFile(c.DeviceStatePath)
	if err != nil {
		return nil, err
	}
	spec := memserver.SnapshotSpec{ID: name, Path: c.FrozenRAMPath, Size: c.RAMSize}
	pages, dataPages := c.Pages, c.DataPages
	var base *source
	if c.Base != "" {
		// A clone: its memory is the overlay over what it was restored
		// from, which this host reads through its lazy RAM file system.
		if base, err = d.overlayBase(lv, c); err != nil {
			return nil, err
		}
		defer func() {
			if !ok {
				d.put(base)
			}
		}()
		total := uint64(c.RAMSize / descriptor.PageSize)
		if pages, err = descriptor.Overlay(base.desc.Pages, c.Pages, c.OwnZero, total); err != nil {
			return nil, fmt.Errorf("page map of the overlay: %w", err)
		}
		dataPages = (&descriptor.Descriptor{Pages: pages}).DataPages()
		own := make([]uint64, (total+63)/64)
		for _, rs := range [][]descriptor.Range{c.Pages, c.OwnZero} {
			for _, r := range rs {
				for p := r.Start; p < r.Start+r.Count; p++ {
					own[p/64] |= 1 << (p % 64)
				}
			}
		}
		spec.Own = func(p uint64) bool { return own[p/64]&(1<<(p%64)) != 0 }
		lz, err := d.lazyFS()
		if err != nil {
			return nil, err
		}
		spec.Base = lazyBase{fs: lz, id: base.lazyID}
	}
	meta := c.Meta
	meta.ParentVM, meta.Checkpoint, meta.GuestCall, meta.GuestInFlight = vmID, checkpoint, call, inflight
	meta.Append = lv.spec.Append
	desc := &descriptor.Descriptor{Meta: meta, Pages: pages, DeviceState: dev}
	blob, err := desc.MarshalBinary()
	if err != nil {
		return nil, err
	}
	ls := &localSnap{digest: descriptor.Digest(blob), blob: blob, memID: name, capture: c, parent: vmID, pause: c.Pause,
		dataPages: dataPages, base: base, pages: pages}
	if ls.capability, err = d.ms.Register(spec); err != nil {
		return nil, fmt.Errorf("memserver: %w", err)
	}
	d.mu.Lock()
	d.snaps[ls.digest] = ls
	d.mu.Unlock()
	ok = true
	d.log.Info("captured VM", "vm", vmID, "snapshot", name, "pause", c.Pause, "descriptor_bytes", len(blob),
		"data_pages", dataPages, "own_pages", c.DataPages, "overlay", c.Base != "", "device_state_bytes", len(dev))
	return ls, nil
}

// descriptorRequest is what raft records of a local snapshot.
func (d *Daemon) descriptorRequest(ls *localSnap) api.DescriptorRequest {
	return api.DescriptorRequest{RequestID: api.NewRequestID(), ParentVM: ls.parent, Host: d.cfg.NodeID,
		Size: int64(len(ls.blob)), SHA256: ls.digest, MemserverAddr: d.MemserverAddr(), PageCount: int64(ls.dataPages)}
}

// release stops serving a snapshot and deletes its files. Clones of it
// must be gone or terminal: a fault after this fails.
func (d *Daemon) release(ls *localSnap, why string) {
	ls.released.Do(func() {
		d.mu.Lock()
		delete(d.snaps, ls.digest)
		ls.releasedFlag = true
		stops := ls.stopPush
		d.mu.Unlock()
		for _, stop := range stops {
			stop()
		}
		if err := d.ms.Release(ls.memID); err != nil && !errors.Is(err, memserver.ErrUnknownSnapshot) {
			d.log.Warn("memserver release", "snapshot", ls.memID, "error", err)
		}
		ls.capture.remove()
		if ls.base != nil {
			d.put(ls.base)
		}
		d.log.Info("snapshot released", "snapshot", ls.memID, "why", why)
	})
}

// Clone is the guest's clone(ticket) on the parent's host: capture the
// parent, register the descriptor, which starts the clones on their hosts,
// and answer 0. The clones' hosts answer the same pending call with k.
func (d *Daemon) Clone(ctx context.Context, vmID, ticket, call uint64, inflight []uint64) (guestchan.CloneResult, error) {
	t, _, err := d.coord.Ticket(ctx, ticket, nil)
	if err != nil {
		return guestchan.CloneResult{}, err
	}
	switch {
	case t.ParentVM != vmID:
		return guestchan.CloneResult{}, &guestchan.Error{Code: fsm.Code(fsm.ErrNotParent),
			Message: fmt.Sprintf("ticket %d belongs to vm %d", ticket, t.ParentVM)}
	case t.State != fsm.TicketReserved:
		return guestchan.CloneResult{}, &guestchan.Error{Code: fsm.Code(fsm.ErrBadState),
			Message: fmt.Sprintf("ticket %d is %s; a ticket clones once", ticket, t.State)}
	}
	d.emit(Event{Kind: EventCloneCall, VM: vmID, Ticket: ticket})
	d.log.Info("clone call", "vm", vmID, "ticket", ticket)
	ls, err := d.capture(ctx, vmID, call, inflight, false)
	if err != nil {
		return guestchan.CloneResult{}, err
	}
	d.emit(Event{Kind: EventCaptured, VM: vmID, Ticket: ticket, Pause: ls.pause, DescriptorBytes: len(ls.blob),
		DataPages: ls.dataPages})
	ls.ticket = ticket
	resp, err := d.coord.Clone(ctx, ticket, d.descriptorRequest(ls))
	if err != nil {
		d.release(ls, "the clone call failed: "+err.Error())
		return guestchan.CloneResult{}, err
	}
	d.log.Info("clone started", "vm", vmID, "ticket", ticket, "descriptor", resp.Descriptor.ID, "clones", resp.Ticket.Granted,
		"pause", ls.pause)
	d.goRun(func() { d.watchSnapshot(ls) })
	d.startPusher(ctx, ls, resp.Ticket.Ticket)
	return guestchan.CloneResult{CloneID: 0, Ticket: ticket}, nil
}

// Checkpoint is the guest's checkpoint(): an immutable capture of the VM
// from which create_clones starts clones later. It answers the checkpoint's
// ID; clones created from it see the same call answer their k.
func (d *Daemon) Checkpoint(ctx context.Context, vmID, call uint64, inflight []uint64) (guestchan.CheckpointResult, error) {
	ls, err := d.capture(ctx, vmID, call, inflight, true)
	if err != nil {
		return guestchan.CheckpointResult{}, err
	}
	cp, err := d.coord.CreateCheckpoint(ctx, d.descriptorRequest(ls))
	if err != nil {
		d.release(ls, "the checkpoint call failed: "+err.Error())
		return guestchan.CheckpointResult{}, err
	}
	ls.checkpoint = cp.ID
	d.goRun(func() { d.watchSnapshot(ls) })
	return guestchan.CheckpointResult{Checkpoint: cp.ID}, nil
}

// watchSnapshot releases a snapshot once nothing can clone from it or fault
// on it any more: a ticket's once the ticket is disposed (joined or killed:
// every clone is then terminal), a checkpoint's once its VM has ended
// (which kills the tickets cloned from it).
func (d *Daemon) watchSnapshot(ls *localSnap) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stop := context.AfterFunc(d.stopCtx, cancel)
	defer stop()
	var index uint64
	for ctx.Err() == nil {
		var done bool
		var why string
		var err error
		var meta api.QueryMeta
		q := &api.QueryOptions{Index: index, Wait: 30 * time.Second}
		if ls.ticket != 0 {
			var t fsm.TicketView
			t, meta, err = d.coord.Ticket(ctx, ls.ticket, q)
			done, why = t.State.Disposed(), fmt.Sprintf("ticket %d %s", ls.ticket, t.State)
		} else {
			var vm fsm.VM
			vm, meta, err = d.coord.VM(ctx, ls.parent, q)
			done, why = vm.State == fsm.VMEnded, fmt.Sprintf("vm %d of checkpoint %d ended", ls.parent, ls.checkpoint)
		}
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			if errors.Is(err, fsm.ErrNotFound) {
				d.release(ls, "its ticket or VM is unknown to the cluster")
				return
			}
			d.log.Warn("watching a snapshot", "snapshot", ls.memID, "error", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		index = meta.Index
		if done {
			d.release(ls, why)
			return
		}
	}
	// The daemon is shutting down: Shutdown releases what is left.
}

// handleDescriptor serves a local snapshot's descriptor to a clone host,
// with the memserver capability of its frozen RAM. It is behind the host
// API's bearer token.
func (d *Daemon) handleDescriptor(w http.ResponseWriter, r *http.Request) {
	digest := r.PathValue("digest")
	if len(digest) != 64 {
		http.Error(w, "bad descriptor digest", http.StatusBadRequest)
		return
	}
	d.mu.Lock()
	ls := d.snaps[digest]
	d.mu.Unlock()
	if ls == nil {
		http.Error(w, "no such descriptor on this host", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set(headerCapability, hex.EncodeToString(ls.capability[:]))
	w.Header().Set(headerSnapshot, ls.memID)
	_, _ = w.Write(ls.blob)
}

// overlayBase returns, with a reference, the source that the clone lv runs
// from, which the capture c of it is an overlay over.
func (d *Daemon) overlayBase(lv *localVM, c *Capture) (*source, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	src := lv.src
	if src == nil || src.ramPath != c.Base || src.desc == nil || src.lazyID == "" {
		return nil, fmt.Errorf("vm %d is an overlay over %s, which is no descriptor's memory on this host", lv.id, c.Base)
	}
	if int64(src.desc.Meta.MemMB)<<20 != c.RAMSize {
		return nil, fmt.Errorf("vm %d has %d bytes of RAM, its descriptor %d MiB", lv.id, c.RAMSize, src.desc.Meta.MemMB)
	}
	src.refs++
	return src, nil
}

// lazyBase reads the memory of a descriptor this host runs clones from,
// for the memserver serving an overlay over it.
type lazyBase struct {
	fs *lazyram.FS
	id string
}

func (b lazyBase) ReadPages(ctx context.Context, first uint64, dst []byte) error {
	return b.fs.ReadPages(ctx, b.id, first, dst)
}

// clonesCreated starts the multicast of a checkpoint's snapshot to the
// hosts of a ticket that create_clones started from it.
func (d *Daemon) clonesCreated(t fsm.TicketView, checkpoint uint64) {
	d.mu.Lock()
	var ls *localSnap
	for _, s := range d.snaps {
		if s.checkpoint == checkpoint && s.checkpoint != 0 {
			ls = s
		}
	}
	d.mu.Unlock()
	if ls != nil {
		ctx, cancel := context.WithTimeout(d.stopCtx, 10*time.Second)
		defer cancel()
		d.startPusher(ctx, ls, t.Ticket)
	}
}
