package hostd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/descriptor"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/lazyram"
	"github.com/snowflock-go/snowflock/memserver"
)

// Restorer is a Hypervisor that can start clones from descriptors.
type Restorer interface {
	Restore(ctx context.Context, spec VMSpec, src RestoreSource) (RunningVM, error)
}

// RestoreSource is what a clone starts from: a descriptor's machine and
// device state, and the RAM file to map private.
type RestoreSource struct {
	Meta            descriptor.Meta
	DeviceStatePath string
	RAMPath         string
	// ReadPages reads the snapshot's pages in this process, for drivers
	// that rebuild a memory image rather than map RAMPath (Xen). The pages
	// are local by then (the restore was eager).
	ReadPages func(ctx context.Context, first uint64, dst []byte) error
	// Greeting answers the calls the parent had pending, for drivers that
	// deliver it themselves (GreetingDeliverer).
	Greeting []*guestchan.Response
}

// GreetingDeliverer is a Restorer that hands a clone's greeting to the
// guest itself, before the clone runs (Xen, through xenstore), rather than
// leave it to the daemon's guest channel.
type GreetingDeliverer interface {
	DeliversGreeting() bool
}

// eagerDriver reports whether a descriptor's clones need all of its memory
// before they start: Xen restores a whole image.
func eagerDriver(m descriptor.Meta) bool { return m.Driver == "xen" }

// restoreTimeout bounds getting a clone running: fetching its descriptor,
// for an eager restore (Xen) all of its memory, and starting its VM.
const restoreTimeout = 10 * time.Minute

// source is a descriptor that clones on this host run from: its device
// state on disk and a lazily filled RAM file that every clone of it here
// maps, so a page fetched for one clone serves them all.
type source struct {
	id         uint64 // descriptor ID
	checkpoint uint64
	ready      chan struct{}
	err        error // set before ready closes

	desc    *descriptor.Descriptor
	via     string // how the descriptor came: unicast or multicast
	devPath string
	lazyID  string
	ramPath string
	client  *memserver.Client
	refs    int // under Daemon.mu

	mu       sync.Mutex
	fetchErr error // the first failed fetch: why clones die
}

// Fetch reads pages from the parent's memserver for lazyram.
func (s *source) Fetch(ctx context.Context, pages []uint64) ([]lazyram.Page, error) {
	got, err := s.client.Fetch(ctx, pages)
	if err != nil {
		s.mu.Lock()
		if s.fetchErr == nil {
			s.fetchErr = err
		}
		s.mu.Unlock()
		return nil, err
	}
	out := make([]lazyram.Page, len(got))
	for i, p := range got {
		out[i] = lazyram.Page{Num: p.Num, Zero: p.Zero, Data: p.Data}
	}
	return out, nil
}

func (s *source) failure() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fetchErr
}

// acquire returns the source of a descriptor, preparing it on first use.
// Release it with put.
//
// cat, if not nil, is the multicast session of the ticket the clone is of:
// the descriptor may come that way, and pushed pages go into the source.
func (d *Daemon) acquire(ctx context.Context, id uint64, cat *catcher) (*source, error) {
	d.mu.Lock()
	src, ok := d.sources[id]
	if !ok {
		src = &source{id: id, ready: make(chan struct{})}
		d.sources[id] = src
	}
	src.refs++
	d.mu.Unlock()
	if !ok {
		src.err = d.prepare(ctx, src, cat)
		close(src.ready)
	} else {
		select {
		case <-src.ready:
		case <-ctx.Done():
			d.put(src)
			return nil, context.Cause(ctx)
		}
	}
	if src.err != nil {
		d.put(src)
		return nil, src.err
	}
	if cat != nil {
		cat.setSource(src)
	}
	return src, nil
}

// put drops a reference; the last one closes the source.
func (d *Daemon) put(src *source) {
	d.mu.Lock()
	src.refs--
	last := src.refs == 0
	if last && d.sources[src.id] == src {
		delete(d.sources, src.id)
	}
	d.mu.Unlock()
	if last {
		d.closeSource(src)
	}
}

func (d *Daemon) closeSource(src *source) {
	if src.lazyID != "" && d.lazy != nil {
		if st, err := d.lazy.Stats(src.lazyID); err == nil {
			d.emit(Event{Kind: EventSourceClosed, Descriptor: src.id, Pages: &st})
		}
		d.lazy.Remove(src.lazyID)
	}
	if src.client != nil {
		_ = src.client.Close()
	}
	if src.devPath != "" {
		_ = os.Remove(src.devPath)
	}
}

// prepare fetches a descriptor from its parent's host, checks it against
// what raft recorded, and sets up the RAM file its clones map.
func (d *Daemon) prepare(ctx context.Context, src *source, cat *catcher) error {
	meta, _, err := d.coord.Descriptor(ctx, src.id, nil)
	if err != nil {
		return fmt.Errorf("descriptor %d: %w", src.id, err)
	}
	src.checkpoint = meta.Checkpoint
	host, _, err := d.coord.Host(ctx, meta.Host, nil)
	if err != nil {
		return fmt.Errorf("host %s of descriptor %d: %w", meta.Host, src.id, err)
	}
	var blob []byte
	var capab memserver.Capability
	var memID string
	src.via = "unicast"
	if cat != nil && host.McastAddr != "" {
		env, err := d.mcastDescriptor(ctx, cat, meta)
		if err == nil {
			blob, capab, memID, src.via = env.blob, env.capability, env.memID, "multicast"
			d.mcast.descriptorsRecvd.Add(1)
		} else {
			d.mcast.fallbacks.Add(1)
			d.log.Warn("descriptor not received by multicast; fetching it by unicast", "descriptor", src.id, "error", err)
		}
	}
	if blob == nil {
		if blob, capab, memID, err = d.fetchDescriptor(ctx, host.APIAddr, meta); err != nil {
			return fmt.Errorf("descriptor %d from %s: %w", src.id, meta.Host, err)
		}
	}
	desc, err := descriptor.Parse(blob)
	if err != nil {
		return err
	}
	if _, ok := d.hv.(Restorer); !ok {
		return fmt.Errorf("this host's hypervisor (%s) cannot restore clones", d.hv.Name())
	}
	src.desc = desc
	dir := filepath.Join(d.cfg.DataDir, "clones")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	src.devPath = filepath.Join(dir, fmt.Sprintf("desc-%d.dev", src.id))
	if err := os.WriteFile(src.devPath, desc.DeviceState, 0o600); err != nil {
		return err
	}
	src.client, err = memserver.ClientConfig{Logger: d.log.Named("memclient")}.Dial(ctx, meta.MemserverAddr, memID, capab)
	if err != nil {
		return fmt.Errorf("memserver %s: %w", meta.MemserverAddr, err)
	}
	lz, err := d.lazyFS()
	if err != nil {
		return err
	}
	id := fmt.Sprintf("desc-%d", src.id)
	path, err := lz.Add(lazyram.Snapshot{ID: id, Size: int64(desc.TotalPages()) * descriptor.PageSize, HasData: desc.HasData, Source: src,
		Readahead: d.cfg.Readahead, FetchTimeout: d.cfg.FetchTimeout})
	if err != nil {
		return err
	}
	src.lazyID, src.ramPath = id, path
	part, parts := 0, 1
	if cat != nil {
		// Pushed pages go into the RAM file from now on, during an eager
		// fill too, which then skips them.
		cat.setSource(src)
		part, parts = cat.part, cat.parts
	}
	if d.cfg.EagerRestore || eagerDriver(desc.Meta) {
		start := time.Now()
		if cat != nil && parts > 2 && src.via == "multicast" {
			// Two or more hosts fill: let the session bring them every
			// page at once, and fetch by unicast only what it did not.
			d.awaitPush(ctx, cat, lz, id)
		}
		if err := lz.FillFrom(ctx, id, part, parts, 256, 4); err != nil {
			return fmt.Errorf("eager restore: %w", err)
		}
		st, _ := lz.Stats(id)
		d.log.Info("descriptor memory fetched eagerly", "descriptor", src.id, "took", time.Since(start),
			"share", fmt.Sprintf("%d/%d", part, parts), "fetched_pages", st.PagesFetched, "inserted_pages", st.Inserted)
	}
	d.log.Info("descriptor ready", "descriptor", src.id, "bytes", len(blob), "data_pages", desc.DataPages(),
		"parent_vm", desc.Meta.ParentVM, "memserver", meta.MemserverAddr)
	return nil
}

// pushStall is how long an eager fill waits for the multicast session to
// bring it a packet before it fetches the rest by unicast (longer than the
// sender's mcastStall, after which the sender evicts a member that is
// behind, so that a slow member is evicted, not left waiting).
const pushStall = mcastStall + 2*time.Second

// awaitPush waits while c's session pushes descriptor id's pages into lz:
// until the session ends for this host (every page pushed, or evicted),
// nothing has come for pushStall, or ctx ends. Progress is data and
// parity packets, not pages: a batch of pages is inserted whole once its
// last packet is in, which on a slow network takes seconds.
func (d *Daemon) awaitPush(ctx context.Context, c *catcher, lz *lazyram.FS, id string) {
	start := time.Now()
	why := waitProgress(ctx, c.ended, func() (uint64, error) {
		st, err := lz.Stats(id)
		rs := c.recv.Stats()
		return st.Inserted + rs.DataPackets + rs.ParityPackets, err
	}, d.cfg.pushStall)
	st, _ := lz.Stats(id)
	d.log.Info("waited for the multicast push", "descriptor_file", id, "took", time.Since(start),
		"inserted_pages", st.Inserted, "until", why)
}

// waitProgress waits until done is closed, ctx ends, count fails, or
// count has not changed for stall, and says which.
func waitProgress(ctx context.Context, done <-chan struct{}, count func() (uint64, error), stall time.Duration) string {
	tick := time.NewTicker(min(stall/4, 250*time.Millisecond))
	defer tick.Stop()
	seen, err := count()
	if err != nil {
		return err.Error()
	}
	moved := time.Now()
	for {
		select {
		case <-done:
			return "the session ended"
		case <-ctx.Done():
			return "cancelled"
		case now := <-tick.C:
			n, err := count()
			if err != nil {
				return err.Error()
			}
			if n != seen {
				seen, moved = n, now
			} else if now.Sub(moved) >= stall {
				return "nothing came for " + stall.String()
			}
		}
	}
}

// fetchDescriptor gets a descriptor's bytes and memserver capability from
// the host API of the parent's host and checks them against raft.
func (d *Daemon) fetchDescriptor(ctx context.Context, hostAPI string, meta fsm.Descriptor) ([]byte, memserver.Capability, string, error) {
	var none memserver.Capability
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+hostAPI+"/v1/snapshots/"+meta.SHA256+"/descriptor", nil)
	if err != nil {
		return nil, none, "", err
	}
	if d.cfg.Token != "" {
		req.Header.Set("Authorization", "Bearer "+d.cfg.Token)
	}
	resp, err := d.httpc.Do(req)
	if err != nil {
		return nil, none, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, none, "", fmt.Errorf("%s: %s", resp.Status, msg)
	}
	blob, err := io.ReadAll(io.LimitReader(resp.Body, descriptor.MaxSize+1))
	if err != nil {
		return nil, none, "", err
	}
	if int64(len(blob)) != meta.Size || descriptor.Digest(blob) != meta.SHA256 {
		return nil, none, "", fmt.Errorf("%w: %d bytes that do not match the %d bytes and digest raft recorded",
			descriptor.ErrInvalid, len(blob), meta.Size)
	}
	capab, err := memserver.ParseCapability(resp.Header.Get(headerCapability))
	if err != nil || capab.IsZero() {
		return nil, none, "", errors.New("the parent's host sent no valid memserver capability")
	}
	return blob, capab, resp.Header.Get(headerSnapshot), nil
}

// lazyFS mounts the host's lazyram file system on first use.
func (d *Daemon) lazyFS() (*lazyram.FS, error) {
	d.lazyMu.Lock()
	defer d.lazyMu.Unlock()
	if d.lazy != nil {
		return d.lazy, nil
	}
	dir := filepath.Join(d.cfg.DataDir, "lazyram")
	// A daemon killed with its mount leaves it dangling.
	_ = unix.Unmount(dir, unix.MNT_DETACH)
	lz, err := lazyram.Mount(dir, d.cfg.pageCacheDir(), d.log.Named("lazyram"))
	if err != nil {
		return nil, err
	}
	d.lazy = lz
	return lz, nil
}

func (c Config) pageCacheDir() string {
	if c.PageCacheDir != "" {
		return c.PageCacheDir
	}
	return filepath.Join(c.DataDir, "pagecache")
}

// removeStalePages deletes the pages in dir that an earlier run fetched:
// they belong to descriptors nothing maps now. With gone, it removes the
// directory too if it is empty.
func removeStalePages(dir string, gone bool) {
	stale, _ := filepath.Glob(filepath.Join(dir, "desc-*.pages"))
	for _, f := range stale {
		_ = os.Remove(f)
	}
	if gone {
		_ = os.Remove(dir) // only if empty
	}
}

// restoreClone starts clone k of a ticket on this host from the ticket's
// descriptor, answers the guest's pending clone call with k and reports
// the clone running, or failed with the reason.
func (d *Daemon) restoreClone(vm fsm.VM) {
	defer func() {
		d.mu.Lock()
		delete(d.starting, vm.ID)
		d.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(d.stopCtx, restoreTimeout)
	defer cancel()
	log := d.log.With("vm", vm.ID, "ticket", vm.Ticket, "clone", vm.CloneID)
	start := time.Now()
	fail := func(err error) {
		if d.stopCtx.Err() != nil {
			return
		}
		log.Error("clone did not start", "error", err)
		d.emit(Event{Kind: EventCloneFailed, VM: vm.ID, Ticket: vm.Ticket, K: vm.CloneID, Err: err.Error()})
		rctx, rcancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer rcancel()
		if _, err := d.coord.SetCloneState(rctx, vm.ID, api.CloneStateRequest{State: fsm.CloneFailed,
			Reason: fmt.Sprintf("host %s could not start it: %v", d.cfg.NodeID, err)}); err != nil {
			log.Warn("could not report the clone failed", "error", err)
		}
	}
	t, _, err := d.coord.Ticket(ctx, vm.Ticket, nil)
	if err != nil {
		fail(err)
		return
	}
	if t.Descriptor == 0 {
		fail(fmt.Errorf("ticket %d has no descriptor", vm.Ticket))
		return
	}
	cat := d.joinSession(t)
	src, err := d.acquire(ctx, t.Descriptor, cat)
	if err != nil {
		d.leaveSession(cat)
		fail(err)
		return
	}
	m := src.desc.Meta
	spec := VMSpec{ID: vmName(vm.ID), Kernel: d.cfg.Kernel, Initrd: d.cfg.Initrd, Append: m.Append,
		MemMB: int64(m.MemMB), VCPUs: m.VCPUs}
	greet := greeting(m, vm, src.checkpoint)
	rs := RestoreSource{Meta: m, DeviceStatePath: src.devPath, RAMPath: src.ramPath,
		ReadPages: lazyBase{fs: d.lazy, id: src.lazyID}.ReadPages}
	if g, ok := d.hv.(GreetingDeliverer); ok && g.DeliversGreeting() {
		rs.Greeting, greet = greet, nil
	}
	run, err := d.hv.(Restorer).Restore(ctx, spec, rs)
	if err != nil {
		d.put(src)
		d.leaveSession(cat)
		fail(err)
		return
	}
	lv := d.adopt(vm.ID, run, spec, start, src, cat, greet, log)
	if _, err := d.coord.SetCloneState(ctx, vm.ID, api.CloneStateRequest{State: fsm.CloneRunning}); err != nil {
		// Killed or failed meanwhile (or the cluster is unreachable for
		// minutes): this clone must not run unaccounted for.
		log.Warn("could not report the clone running; destroying it", "error", err)
		d.destroy(lv.id, "could not report it running: "+err.Error())
		return
	}
	d.emit(Event{Kind: EventCloneRunning, VM: vm.ID, Ticket: vm.Ticket, K: vm.CloneID, Descriptor: src.id, Via: src.via})
	log.Info("clone running", "after", time.Since(start).Round(time.Millisecond), "descriptor", src.id)
}

// greeting answers, in a new clone, the calls that were pending in its
// parent when it was captured: the clone (or checkpoint) call with the
// clone's k, the others with an error.
func greeting(m descriptor.Meta, vm fsm.VM, checkpoint uint64) []*guestchan.Response {
	var out []*guestchan.Response
	if m.GuestCall != 0 {
		var v interface{} = guestchan.CloneResult{CloneID: vm.CloneID, Ticket: vm.Ticket}
		if m.Checkpoint {
			v = guestchan.CheckpointResult{Checkpoint: checkpoint, CloneID: vm.CloneID, Ticket: vm.Ticket}
		}
		if r, err := guestchan.Answer(m.GuestCall, v); err == nil {
			out = append(out, r)
		}
	}
	for _, id := range m.GuestInFlight {
		out = append(out, guestchan.Fail(id, guestchan.CodeInterrupted,
			"the call was in flight when this VM was cloned; its answer went to the parent"))
	}
	return out
}
