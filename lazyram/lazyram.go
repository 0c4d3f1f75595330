// Package lazyram is memory on demand for clones: a FUSE file system in
// which each frozen snapshot of a parent VM appears as a RAM file that fills
// itself lazily. A clone's QEMU maps that file MAP_PRIVATE (share=off), so
// the clone's writes stay private while reads come through the page cache.
//
// Data flow: QEMU touches a page -> the kernel page cache misses -> FUSE
// read -> lazyram serves the page from its local backing file if present,
// answers zeros without any fetch if the descriptor's page map says the page
// was never written (the avoidance heuristic), and otherwise fetches the
// missing pages of the read plus a read-ahead window from the snapshot's
// PageSource (the parent host's memserver) in one batch, stores them in the
// backing file and answers. Files are opened with FOPEN_KEEP_CACHE because a
// snapshot never changes: every clone of a snapshot on this host shares the
// fetched pages through the page cache and the backing file, and a page is
// fetched once per host. Pages can also be pushed in ahead of any fault
// (Insert), which multicast distribution uses.
//
// A fetch that fails (after the PageSource's own retries) makes the read
// fail with EIO: the clone's QEMU then dies loudly rather than hang.
package lazyram

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/hashicorp/go-hclog"
)

// PageSize is the unit of fetching and caching.
const PageSize = 4096

// Page is the content of one page of a snapshot.
type Page struct {
	Num  uint64
	Zero bool   // all zeros: Data may be empty
	Data []byte // PageSize bytes unless Zero
}

// PageSource fetches pages of one frozen snapshot. Implementations retry
// transient failures themselves and return an error only when the pages
// cannot be had. Fetch is called concurrently.
type PageSource interface {
	Fetch(ctx context.Context, pages []uint64) ([]Page, error)
}

// Snapshot describes a frozen RAM image to serve.
type Snapshot struct {
	ID   string // file name stem: the file is ID + ".ram"
	Size int64  // bytes, a multiple of PageSize
	// HasData reports whether a page holds data; pages without are served
	// as zeros and never fetched. Nil means every page may hold data.
	HasData func(page uint64) bool
	Source  PageSource
	// Readahead is the most further pages fetched along with a miss
	// (default 255; negative: none). They are stored locally; the reader's
	// next faults on them are served without a fetch. (They are not pushed
	// into the kernel's page cache with FUSE_NOTIFY_STORE: a store waits,
	// uninterruptibly, for the lock of a page whose read is pending, and if
	// the daemon dies then, neither the store nor the reader ever ends.) A reader's window starts at nothing
	// and doubles from 8 pages while its reads continue where the last one
	// ended, so scattered faults (a resumed guest) fetch only what they
	// touch and a sequential scan costs one round trip per window.
	Readahead int
	// FetchTimeout bounds one fetch (default 60 s).
	FetchTimeout time.Duration
}

// MaxFetchSamples bounds the fetch durations a snapshot keeps.
const MaxFetchSamples = 1 << 16

// Stats count what a snapshot's file served.
type Stats struct {
	Reads        uint64 // FUSE reads
	PagesFetched uint64 // pages that came from the PageSource
	Fetches      uint64 // PageSource calls
	ZeroPages    uint64 // pages answered as zeros without a fetch
	Inserted     uint64 // pages pushed in with Insert
	Errors       uint64
	// FetchMicros are the durations of PageSource calls (a fault's wait):
	// the last MaxFetchSamples of them, in no particular order.
	FetchMicros []int64
}

var idOK = func(id string) bool {
	if id == "" || len(id) > 128 || id[0] == '.' {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

// FS is a mounted lazyram file system.
type FS struct {
	dir      string
	cacheDir string
	server   *fuse.Server
	root     *rootNode
	log      hclog.Logger
}

// ErrExists is returned by Add for an ID already served.
var ErrExists = errors.New("lazyram: snapshot already added")

// Mount mounts an empty lazyram file system on dir (created if missing).
// Backing files live in cacheDir, which should be a tmpfs. It needs root and
// /dev/fuse.
func Mount(dir, cacheDir string, log hclog.Logger) (*FS, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	for _, d := range []string{dir, cacheDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("lazyram: %w", err)
		}
	}
	root := &rootNode{files: map[string]*snapFile{}}
	timeout := time.Hour // names and sizes never change while mounted
	// go-fuse opens /dev/fuse without O_CLOEXEC. Every process the daemon
	// starts afterwards (QEMU) would inherit the connection, and then it
	// outlives the daemon: a QEMU thread waiting for a page the dead daemon
	// will never send stays unkillable (D state), holding the very fd that
	// keeps the connection open. So no fork may happen until the fd is
	// close-on-exec: hold ForkLock across the mount, which then must not
	// fall back to forking fusermount (DirectMountStrict; this needs root).
	syscall.ForkLock.Lock()
	server, err := fs.Mount(dir, root, &fs.Options{
		EntryTimeout: &timeout, AttrTimeout: &timeout,
		// One page of kernel read-ahead: the kernel would read around
		// every fault whether or not the pages are used; lazyram reads
		// ahead itself when a reader is sequential.
		MountOptions: fuse.MountOptions{DirectMountStrict: true, FsName: "snowflock-lazyram", Name: "lazyram",
			MaxReadAhead: PageSize},
	})
	if err == nil {
		err = closeOnExecFUSE()
		if err != nil {
			_ = server.Unmount()
		}
	}
	syscall.ForkLock.Unlock()
	if err != nil {
		return nil, fmt.Errorf("lazyram: mount %s: %w", dir, err)
	}
	return &FS{dir: dir, cacheDir: cacheDir, server: server, root: root, log: log}, nil
}

// closeOnExecFUSE marks every /dev/fuse descriptor of this process
// close-on-exec.
func closeOnExecFUSE() error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("lazyram: %w", err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == "/dev/fuse" {
			syscall.CloseOnExec(fd)
		}
	}
	return nil
}

// Dir is the mount point.
func (f *FS) Dir() string { return f.dir }

// Unmount unmounts the file system and removes the backing files.
func (f *FS) Unmount() error {
	err := f.server.Unmount()
	f.root.mu.Lock()
	for id, sf := range f.root.files {
		sf.close()
		delete(f.root.files, id)
	}
	f.root.mu.Unlock()
	return err
}

// Add makes a snapshot appear as Dir()/ID.ram and returns that path.
func (f *FS) Add(s Snapshot) (string, error) {
	if !idOK(s.ID) {
		return "", fmt.Errorf("lazyram: bad snapshot id %q", s.ID)
	}
	if s.Size <= 0 || s.Size%PageSize != 0 {
		return "", fmt.Errorf("lazyram: size %d is not a positive multiple of %d", s.Size, PageSize)
	}
	if s.Source == nil {
		return "", errors.New("lazyram: no page source")
	}
	if s.Readahead == 0 {
		s.Readahead = 255
	}
	if s.FetchTimeout == 0 {
		s.FetchTimeout = 60 * time.Second
	}
	backing, err := os.OpenFile(filepath.Join(f.cacheDir, s.ID+".pages"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", fmt.Errorf("lazyram: backing file: %w", err)
	}
	if err := backing.Truncate(s.Size); err != nil {
		backing.Close()
		return "", fmt.Errorf("lazyram: backing file: %w", err)
	}
	pages := uint64(s.Size / PageSize)
	sf := &snapFile{snap: s, backing: backing, present: make([]uint64, (pages+63)/64), pages: pages,
		inflight: map[uint64]chan struct{}{}, log: f.log.With("snapshot", s.ID)}
	name := s.ID + ".ram"
	f.root.mu.Lock()
	defer f.root.mu.Unlock()
	if _, ok := f.root.files[name]; ok {
		backing.Close()
		return "", ErrExists
	}
	ctx := context.Background()
	child := f.root.NewPersistentInode(ctx, sf, fs.StableAttr{Mode: syscall.S_IFREG})
	if !f.root.AddChild(name, child, false) {
		backing.Close()
		return "", ErrExists
	}
	f.root.files[name] = sf
	return filepath.Join(f.dir, name), nil
}

// Remove stops serving a snapshot. Clones that still map it must be gone.
func (f *FS) Remove(id string) {
	name := id + ".ram"
	f.root.mu.Lock()
	sf := f.root.files[name]
	delete(f.root.files, name)
	f.root.mu.Unlock()
	if sf != nil {
		f.root.RmChild(name)
		sf.close()
		os.Remove(filepath.Join(f.cacheDir, name[:len(name)-4]+".pages"))
	}
}

func (f *FS) file(id string) (*snapFile, error) {
	f.root.mu.Lock()
	defer f.root.mu.Unlock()
	sf := f.root.files[id+".ram"]
	if sf == nil {
		return nil, fmt.Errorf("lazyram: no snapshot %q", id)
	}
	return sf, nil
}

// Insert stores a page pushed ahead of any fault; a page already present
// is left as is (snapshots are immutable).
func (f *FS) Insert(id string, p Page) error {
	sf, err := f.file(id)
	if err != nil {
		return err
	}
	return sf.store([]Page{p}, true)
}

// InsertPages is Insert for several pages at once; it reorders pages.
func (f *FS) InsertPages(id string, pages []Page) error {
	sf, err := f.file(id)
	if err != nil {
		return err
	}
	return sf.store(pages, true)
}

// Fill fetches every data page of a snapshot that is not present yet, in
// batches of batch pages with up to workers fetches at once: an eager
// restore, or a warm-up before clones start.
func (f *FS) Fill(ctx context.Context, id string, batch, workers int) error {
	return f.FillFrom(ctx, id, 0, 1, batch, workers)
}

// FillFrom is Fill in another order: first the batches of share part of
// parts of the data pages (counting only pages with data), going up, then
// every other batch going down from where the share began (wrapping around
// at the start). Hosts that fill the same snapshot while another path
// (multicast) inserts what any of them fetched take different parts: each
// fetches its own share first, then walks the others' from their ends,
// towards the pages being pushed from their starts.
func (f *FS) FillFrom(ctx context.Context, id string, part, parts, batch, workers int) error {
	sf, err := f.file(id)
	if err != nil {
		return err
	}
	if parts < 1 || part < 0 || part >= parts {
		return fmt.Errorf("lazyram: fill part %d of %d", part, parts)
	}
	batch, workers = max(batch, 1), max(workers, 1)
	nb := (sf.pages + uint64(batch) - 1) / uint64(batch)
	from, to := sf.dataPageAt(part, parts)/uint64(batch), nb
	if part+1 < parts {
		to = max(from, sf.dataPageAt(part+1, parts)/uint64(batch))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := make(chan uint64)
	errs := make(chan error, workers)
	for range workers {
		go func() {
			for first := range next {
				if err := sf.ensure(ctx, first, min(first+uint64(batch), sf.pages)-1, 0); err != nil {
					cancel()
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
feed:
	for i := range nb {
		b := from + i // the share, up
		if b >= to {
			b = (from + nb - (i - (to - from)) - 1) % nb // the rest, down
		}
		first := b * uint64(batch)
		select {
		case next <- first:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	for range workers {
		if e := <-errs; e != nil && (err == nil || errors.Is(err, context.Canceled)) {
			err = e
		}
	}
	if err == nil {
		err = ctx.Err()
	}
	return err
}

// dataPageAt returns the page where share part of parts of the snapshot's
// data pages begins: the first page with data after part*n/parts others,
// for n pages with data (0 if there are none).
func (sf *snapFile) dataPageAt(part, parts int) uint64 {
	if part == 0 {
		return 0
	}
	var n uint64
	for p := range sf.pages {
		if sf.hasData(p) {
			n++
		}
	}
	skip := n * uint64(part) / uint64(parts)
	for p := range sf.pages {
		if sf.hasData(p) {
			if skip == 0 {
				return p
			}
			skip--
		}
	}
	return 0
}

// ReadPages reads pages of a snapshot from first on into dst, a whole
// number of pages, fetching those that are not present (without read-ahead)
// as a read of the file would. It is how this process reads a snapshot: it
// must never map or read the mounted file itself, whose reads it serves.
func (f *FS) ReadPages(ctx context.Context, id string, first uint64, dst []byte) error {
	sf, err := f.file(id)
	if err != nil {
		return err
	}
	n := uint64(len(dst) / PageSize)
	if len(dst)%PageSize != 0 || n == 0 || first >= sf.pages || n > sf.pages-first {
		return fmt.Errorf("lazyram: pages %d+%d outside snapshot %s of %d pages", first, n, id, sf.pages)
	}
	if !sf.use() {
		return fmt.Errorf("lazyram: snapshot %s removed", id)
	}
	defer sf.users.Done()
	if err := sf.ensure(ctx, first, first+n-1, 0); err != nil {
		return err
	}
	if _, err := sf.backing.ReadAt(dst, int64(first)*PageSize); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// Stats returns a snapshot's counters.
func (f *FS) Stats(id string) (Stats, error) {
	sf, err := f.file(id)
	if err != nil {
		return Stats{}, err
	}
	sf.mu.Lock()
	defer sf.mu.Unlock()
	st := sf.stats
	st.FetchMicros = append([]int64(nil), sf.stats.FetchMicros...)
	return st, nil
}

// Present is the number of pages held locally for a snapshot.
func (f *FS) Present(id string) (uint64, error) {
	sf, err := f.file(id)
	if err != nil {
		return 0, err
	}
	sf.mu.Lock()
	defer sf.mu.Unlock()
	var n uint64
	for _, w := range sf.present {
		for ; w != 0; w &= w - 1 {
			n++
		}
	}
	return n, nil
}

type rootNode struct {
	fs.Inode
	mu    sync.Mutex
	files map[string]*snapFile
}

// snapFile is one snapshot's RAM file.
type snapFile struct {
	fs.Inode
	snap    Snapshot
	backing *os.File
	pages   uint64
	log     hclog.Logger

	mu       sync.Mutex
	present  []uint64                 // bitmap of pages in the backing file
	inflight map[uint64]chan struct{} // pages being fetched, closed when stored
	stats    Stats
	closed   bool
	users    sync.WaitGroup // reads using backing
}

var (
	_ fs.NodeOpener    = (*snapFile)(nil)
	_ fs.NodeReader    = (*snapFile)(nil)
	_ fs.NodeGetattrer = (*snapFile)(nil)
	_ fs.NodeSetattrer = (*snapFile)(nil)
	_ fs.NodeWriter    = (*snapFile)(nil)
)

func (sf *snapFile) close() {
	sf.mu.Lock()
	if sf.closed {
		sf.mu.Unlock()
		return
	}
	sf.closed = true
	sf.mu.Unlock()
	sf.users.Wait() // reads use the backing file
	sf.backing.Close()
}

func (sf *snapFile) isPresent(p uint64) bool { return sf.present[p/64]&(1<<(p%64)) != 0 }

func (sf *snapFile) hasData(p uint64) bool { return sf.snap.HasData == nil || sf.snap.HasData(p) }

// Open allows read-write opens (QEMU opens its RAM file O_RDWR even when it
// maps it privately) and keeps the page cache across opens: the content of
// a snapshot never changes.
func (sf *snapFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return &reader{}, fuse.FOPEN_KEEP_CACHE, 0
}

// reader is one open of a snapshot file (one clone's QEMU): where its last
// read ended, to tell a sequential reader from scattered faults.
type reader struct {
	mu     sync.Mutex
	read   bool   // it has read before
	next   uint64 // page after its last read
	streak int    // reads in a row that continued the one before
}

// ahead returns how many pages to read ahead of a read of first..last.
func (r *reader) ahead(first, last uint64, max int) int {
	if r == nil || max <= 0 {
		return 0
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.read && first >= r.next && first <= r.next+2 {
		r.streak++
	} else {
		r.streak = 0
	}
	r.read, r.next = true, last+1
	if r.streak == 0 {
		return 0
	}
	return min(max, 4<<min(r.streak, 16))
}

func (sf *snapFile) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFREG | 0o600
	out.Size = uint64(sf.snap.Size)
	out.Blocks = uint64(sf.snap.Size) / 512
	return 0
}

// Setattr accepts only what changes nothing (QEMU may "resize" the file to
// the size it already has).
func (sf *snapFile) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && sz != uint64(sf.snap.Size) {
		return syscall.EPERM
	}
	return sf.Getattr(ctx, f, out)
}

// Write is refused: a snapshot is immutable (clones write to private
// mappings, which never reach the file).
func (sf *snapFile) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	return 0, syscall.EPERM
}

func (sf *snapFile) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := int64(len(dest))
	if off >= sf.snap.Size {
		return fuse.ReadResultData(nil), 0
	}
	if off+size > sf.snap.Size {
		size = sf.snap.Size - off
	}
	if !sf.use() {
		return nil, syscall.EIO // removed
	}
	defer sf.users.Done()
	first, last := uint64(off/PageSize), uint64((off+size-1)/PageSize)
	r, _ := f.(*reader)
	if err := sf.ensure(ctx, first, last, r.ahead(first, last, sf.snap.Readahead)); err != nil {
		sf.log.Error("page fetch failed: the clone reading it will fail", "pages", fmt.Sprintf("%d-%d", first, last), "error", err)
		return nil, syscall.EIO
	}
	sf.mu.Lock()
	sf.stats.Reads++
	sf.mu.Unlock()
	// Every page of the range is now in the backing file, or a hole there
	// (a zero page). Copy it out while the file is certainly open: Remove
	// may close it as soon as this returns.
	n, err := sf.backing.ReadAt(dest[:size], off)
	if err != nil && !errors.Is(err, io.EOF) {
		sf.log.Error("reading the page cache file", "error", err)
		return nil, syscall.EIO
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// use registers a user of the backing file unless the snapshot is closed;
// the user calls users.Done.
func (sf *snapFile) use() bool {
	sf.mu.Lock()
	defer sf.mu.Unlock()
	if sf.closed {
		return false
	}
	sf.users.Add(1)
	return true
}

// ensure makes pages first..last present, fetching the missing data pages
// and up to readahead further pages in one batch, and waiting for pages
// that other reads are already fetching.
func (sf *snapFile) ensure(ctx context.Context, first, last uint64, readahead int) error {
	sf.mu.Lock()
	if sf.closed {
		sf.mu.Unlock()
		return errors.New("snapshot removed")
	}
	var want []uint64
	var wait []chan struct{}
	var zero uint64
	ahead := 0
	for p := first; p < sf.pages && (p <= last || ahead < readahead); p++ {
		if p > last {
			ahead++
		}
		switch {
		case sf.isPresent(p):
		case !sf.hasData(p):
			if p <= last {
				zero++
			}
		case sf.inflight[p] != nil:
			if p <= last {
				wait = append(wait, sf.inflight[p])
			}
		default:
			sf.inflight[p] = make(chan struct{})
			want = append(want, p)
		}
	}
	sf.stats.ZeroPages += zero
	sf.mu.Unlock()

	var err error
	if len(want) > 0 {
		err = sf.fetch(ctx, want)
	}
	for _, ch := range wait {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err != nil {
		return err
	}
	// A page another read was fetching may have failed: check.
	sf.mu.Lock()
	defer sf.mu.Unlock()
	for p := first; p <= last; p++ {
		if sf.hasData(p) && !sf.isPresent(p) {
			return fmt.Errorf("page %d unavailable", p)
		}
	}
	return nil
}

func (sf *snapFile) fetch(ctx context.Context, want []uint64) error {
	fctx, cancel := context.WithTimeout(ctx, sf.snap.FetchTimeout)
	defer cancel()
	start := time.Now()
	got, err := sf.snap.Source.Fetch(fctx, want)
	took := time.Since(start)
	if err == nil {
		err = sf.check(want, got)
	}
	if err == nil {
		err = sf.store(got, false)
	}
	sf.mu.Lock()
	sf.stats.Fetches++
	if len(sf.stats.FetchMicros) < MaxFetchSamples {
		sf.stats.FetchMicros = append(sf.stats.FetchMicros, took.Microseconds())
	} else {
		sf.stats.FetchMicros[sf.stats.Fetches%MaxFetchSamples] = took.Microseconds()
	}
	if err != nil {
		sf.stats.Errors++
	} else {
		sf.stats.PagesFetched += uint64(len(want))
	}
	for _, p := range want {
		if ch := sf.inflight[p]; ch != nil {
			close(ch)
			delete(sf.inflight, p)
		}
	}
	sf.mu.Unlock()
	return err
}

// check verifies that a source answered exactly the pages asked, in order.
func (sf *snapFile) check(want []uint64, got []Page) error {
	if len(got) != len(want) {
		return fmt.Errorf("source answered %d pages for %d", len(got), len(want))
	}
	for i, p := range got {
		if p.Num != want[i] || (!p.Zero && len(p.Data) != PageSize) {
			return fmt.Errorf("source answered page %d (%d bytes) for page %d", p.Num, len(p.Data), want[i])
		}
	}
	return nil
}

// store writes pages into the backing file and marks them present; of
// pages given twice the first is kept. A zero page needs no write: the
// backing file holds a hole there.
func (sf *snapFile) store(pages []Page, inserted bool) error {
	slices.SortStableFunc(pages, func(a, b Page) int { return cmp.Compare(a.Num, b.Num) })
	pages = slices.CompactFunc(pages, func(a, b Page) bool { return a.Num == b.Num }) // keeps the first copy
	for _, p := range pages {
		if p.Num >= sf.pages {
			return fmt.Errorf("page %d beyond the snapshot's %d pages", p.Num, sf.pages)
		}
		if !p.Zero && len(p.Data) != PageSize {
			return fmt.Errorf("page %d has %d bytes", p.Num, len(p.Data))
		}
	}
	sf.mu.Lock()
	defer sf.mu.Unlock()
	if sf.closed {
		return errors.New("snapshot removed")
	}
	// A run of consecutive data pages goes to the file in one write. In an
	// emulated Xen dom0, 4,096 page-sized writes took 0.75 s where 16 of
	// 1 MiB took 0.09 s.
	var run []byte
	var first uint64
	mark := func(n uint64) {
		sf.present[n/64] |= 1 << (n % 64)
		if inserted {
			sf.stats.Inserted++
		}
	}
	flush := func() error {
		if len(run) == 0 {
			return nil
		}
		if _, err := sf.backing.WriteAt(run, int64(first)*PageSize); err != nil {
			return fmt.Errorf("backing file: %w", err)
		}
		for n := first; n < first+uint64(len(run)/PageSize); n++ {
			mark(n) // present only once written
		}
		run = run[:0]
		return nil
	}
	for _, p := range pages {
		if sf.isPresent(p.Num) {
			continue
		}
		if p.Zero {
			mark(p.Num)
			continue
		}
		if len(run) > 0 && (first+uint64(len(run)/PageSize) != p.Num || len(run) >= maxWriteRun) {
			if err := flush(); err != nil {
				return err
			}
		}
		if len(run) == 0 {
			first = p.Num
			if run == nil {
				run = make([]byte, 0, min(len(pages)*PageSize, maxWriteRun))
			}
		}
		run = append(run, p.Data...)
	}
	return flush()
}

// maxWriteRun bounds the bytes store writes at once (1 MiB).
const maxWriteRun = 1 << 20
