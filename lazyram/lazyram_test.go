package lazyram

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// fileSource serves pages of a frozen file, counting what it is asked.
type fileSource struct {
	f       *os.File
	fetched sync.Map // page -> times
	calls   atomic.Int64
	fail    atomic.Bool
}

func (s *fileSource) Fetch(ctx context.Context, pages []uint64) ([]Page, error) {
	s.calls.Add(1)
	if s.fail.Load() {
		return nil, errors.New("memserver unreachable")
	}
	out := make([]Page, len(pages))
	for i, p := range pages {
		n, _ := s.fetched.LoadOrStore(p, new(atomic.Int64))
		n.(*atomic.Int64).Add(1)
		buf := make([]byte, PageSize)
		if _, err := s.f.ReadAt(buf, int64(p)*PageSize); err != nil && err != io.EOF {
			return nil, err
		}
		out[i] = Page{Num: p, Data: buf}
	}
	return out, nil
}

func (s *fileSource) count() (pages int, twice bool) {
	s.fetched.Range(func(_, v any) bool {
		pages++
		twice = twice || v.(*atomic.Int64).Load() > 1
		return true
	})
	return
}

func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil || os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			t.Fatal("CI runs as root with /dev/fuse")
		}
		t.Skip("needs root and /dev/fuse")
	}
}

// frozen writes a snapshot file of n pages where data pages hold random
// bytes and the others are holes; it returns the file and the data map.
func frozen(t *testing.T, n int, every int) (*os.File, map[uint64]bool) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "frozen.ram"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(n) * PageSize); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	data := map[uint64]bool{}
	buf := make([]byte, PageSize)
	for p := 0; p < n; p++ {
		if p%every == 0 || (p > n/2 && p < n/2+64) {
			for i := range buf {
				buf[i] = byte(rng.IntN(256))
			}
			if _, err := f.WriteAt(buf, int64(p)*PageSize); err != nil {
				t.Fatal(err)
			}
			data[uint64(p)] = true
		}
	}
	return f, data
}

func sum(t *testing.T, r io.Reader) [32]byte {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

func mount(t *testing.T) *FS {
	t.Helper()
	f, err := Mount(filepath.Join(t.TempDir(), "mnt"), t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Unmount() })
	return f
}

func TestLazyFileContentAndAvoidance(t *testing.T) {
	requireFUSE(t)
	src, data := frozen(t, 4096, 7) // 16 MiB, one page in 7 holds data
	fs := mount(t)
	source := &fileSource{f: src}
	path, err := fs.Add(Snapshot{ID: "s1", Size: 4096 * PageSize, HasData: func(p uint64) bool { return data[p] }, Source: source})
	if err != nil {
		t.Fatal(err)
	}
	// A whole read equals the frozen file; only data pages were fetched,
	// each once.
	src.Seek(0, 0)
	want := sum(t, src)
	f1, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := sum(t, f1); got != want {
		t.Fatal("lazy file differs from the frozen file")
	}
	f1.Close()
	fetched, twice := source.count()
	if fetched != len(data) || twice {
		t.Fatalf("fetched %d pages (twice: %v); %d hold data", fetched, twice, len(data))
	}
	st, _ := fs.Stats("s1")
	if st.ZeroPages == 0 || st.PagesFetched != uint64(len(data)) {
		t.Fatalf("stats %+v", st)
	}
	t.Logf("16 MiB read with %d fetch round trips for %d data pages (%d zero pages never fetched)", st.Fetches, st.PagesFetched, st.ZeroPages)

	// A second clone reads everything again: no fetch at all.
	calls := source.calls.Load()
	f2, _ := os.OpenFile(path, os.O_RDWR, 0) // QEMU opens O_RDWR
	if got := sum(t, f2); got != want {
		t.Fatal("second read differs")
	}
	if source.calls.Load() != calls {
		t.Fatal("a second reader fetched again")
	}
	// Writes are refused: the snapshot is immutable.
	if _, err := f2.WriteAt([]byte("x"), 0); !errors.Is(err, syscall.EPERM) {
		t.Fatalf("write: %v", err)
	}
	f2.Close()
}

// mapPrivately is run in a child process (see TestMain): it maps the file
// twice MAP_PRIVATE, writes through one mapping and checks that the other
// still sees the original bytes. It must not run in the process that serves
// the FUSE file: a goroutine faulting on the mapping holds its thread in the
// kernel, where the garbage collector cannot stop it, while the serving
// goroutines wait for the collector: a deadlock. (QEMU maps the file from
// its own process, as this child does.)
func mapPrivately(path string, size int) error {
	open := func() ([]byte, error) {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		return syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	}
	a, err := open()
	if err != nil {
		return err
	}
	b, err := open()
	if err != nil {
		return err
	}
	orig := bytes.Clone(a[:PageSize])
	copy(a[:PageSize], bytes.Repeat([]byte{0xAB}, PageSize)) // clone A writes
	if !bytes.Equal(b[:PageSize], orig) {
		return errors.New("clone B sees clone A's write")
	}
	return nil
}

func TestMain(m *testing.M) {
	if path := os.Getenv("LAZYRAM_MAP_CHILD"); path != "" {
		if err := mapPrivately(path, 256*PageSize); err != nil {
			fmt.Println("child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestPrivateMappingsStayPrivate(t *testing.T) {
	requireFUSE(t)
	src, data := frozen(t, 256, 3)
	fs := mount(t)
	path, err := fs.Add(Snapshot{ID: "s2", Size: 256 * PageSize, HasData: func(p uint64) bool { return data[p] }, Source: &fileSource{f: src}})
	if err != nil {
		t.Fatal(err)
	}
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), "LAZYRAM_MAP_CHILD="+path)
	if out, err := child.CombinedOutput(); err != nil {
		t.Fatalf("mapping process: %v %s", err, out)
	}
	src.Seek(0, 0)
	frozenSum := sum(t, src)
	f, _ := os.Open(path)
	defer f.Close()
	if sum(t, f) != frozenSum {
		t.Fatal("a private write reached the file")
	}
}

func TestFetchFailureIsLoud(t *testing.T) {
	requireFUSE(t)
	src, _ := frozen(t, 128, 1) // every page of the file holds data ...
	data := map[uint64]bool{40: true, 41: true}
	fs := mount(t)
	source := &fileSource{f: src}
	source.fail.Store(true)
	// ... but the map says only pages 40 and 41 do.
	path, err := fs.Add(Snapshot{ID: "s3", Size: 128 * PageSize, HasData: func(p uint64) bool { return data[p] }, Source: source})
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(path)
	defer f.Close()
	buf := make([]byte, PageSize)
	// Zero pages need no source (the kernel reads ahead 32 pages here).
	if _, err := f.ReadAt(buf, PageSize); err != nil || !bytes.Equal(buf, make([]byte, PageSize)) {
		t.Fatalf("zero page: %v", err)
	}
	// A data page with the source down fails loudly: never zeros, never a hang.
	if _, err := f.ReadAt(buf, 41*PageSize); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read with the source down: %v, want EIO", err)
	}
	// Pushed pages are served without the source.
	want := bytes.Repeat([]byte{7}, PageSize)
	for _, p := range []uint64{40, 41} {
		if err := fs.Insert("s3", Page{Num: p, Data: want}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.ReadAt(buf, 41*PageSize); err != nil || !bytes.Equal(buf, want) {
		t.Fatalf("inserted page: %v", err)
	}
	if st, _ := fs.Stats("s3"); st.Inserted != 2 || st.Errors == 0 {
		t.Fatalf("stats %+v", st)
	}
}

func TestAddValidation(t *testing.T) {
	requireFUSE(t)
	fs := mount(t)
	src := &fileSource{}
	for i, s := range []Snapshot{
		{ID: "../x", Size: PageSize, Source: src},
		{ID: "x", Size: 100, Source: src},
		{ID: "x", Size: PageSize},
	} {
		if _, err := fs.Add(s); err == nil {
			t.Errorf("#%d accepted %+v", i, s)
		}
	}
	if _, err := fs.Add(Snapshot{ID: "dup", Size: PageSize, Source: src}); err != nil {
		t.Fatal(err)
	}
	if _, err := fs.Add(Snapshot{ID: "dup", Size: PageSize, Source: src}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate: %v", err)
	}
	fs.Remove("dup")
	if _, err := os.Stat(filepath.Join(fs.Dir(), "dup.ram")); err == nil {
		t.Fatal("removed snapshot still listed")
	}
}

// TestFill is an eager restore: Fill fetches every data page once, in
// parallel batches, after which reading the whole file fetches nothing; a
// failing source makes Fill fail.
func TestFill(t *testing.T) {
	requireFUSE(t)
	src, data := frozen(t, 4096, 5)
	fs := mount(t)
	source := &fileSource{f: src}
	hasData := func(p uint64) bool { return data[p] }
	path, err := fs.Add(Snapshot{ID: "s1", Size: 4096 * PageSize, HasData: hasData, Source: source})
	if err != nil {
		t.Fatal(err)
	}
	if err := fs.Fill(context.Background(), "s1", 64, 4); err != nil {
		t.Fatal(err)
	}
	fetched, twice := source.count()
	if fetched != len(data) || twice {
		t.Fatalf("fetched %d pages (twice: %v); %d hold data", fetched, twice, len(data))
	}
	if n, _ := fs.Present("s1"); n != uint64(len(data)) {
		t.Fatalf("%d pages present, want %d", n, len(data))
	}
	calls := source.calls.Load()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	src.Seek(0, 0)
	if sum(t, f) != sum(t, src) {
		t.Fatal("filled file differs from the frozen file")
	}
	f.Close()
	if source.calls.Load() != calls {
		t.Fatal("reading a filled file fetched again")
	}

	failing := &fileSource{f: src}
	failing.fail.Store(true)
	if _, err := fs.Add(Snapshot{ID: "s2", Size: 4096 * PageSize, HasData: hasData, Source: failing}); err != nil {
		t.Fatal(err)
	}
	if err := fs.Fill(context.Background(), "s2", 64, 4); err == nil || !strings.Contains(err.Error(), "unreachable") {
		t.Fatalf("Fill with a failing source: %v", err)
	}
	if err := fs.Fill(context.Background(), "nope", 64, 4); err == nil {
		t.Fatal("Fill of an unknown snapshot succeeded")
	}
}

// orderSource records the first page of each fetch.
type orderSource struct {
	fileSource
	mu     sync.Mutex
	firsts []uint64
}

func (s *orderSource) Fetch(ctx context.Context, pages []uint64) ([]Page, error) {
	s.mu.Lock()
	s.firsts = append(s.firsts, pages[0])
	s.mu.Unlock()
	return s.fileSource.Fetch(ctx, pages)
}

// TestFillFrom: a fill of part k of n starts at the batch holding the first
// data page past k/n of them, wraps around, fetches every data page once
// and nothing that is present already; bad parts are refused.
func TestFillFrom(t *testing.T) {
	requireFUSE(t)
	src, data := frozen(t, 4096, 5)
	fs := mount(t)
	hasData := func(p uint64) bool { return data[p] }
	var pages []uint64
	for p := range uint64(4096) {
		if data[p] {
			pages = append(pages, p)
		}
	}
	for _, tc := range []struct{ part, parts int }{{0, 1}, {1, 2}, {2, 3}, {1, 3}} {
		id := fmt.Sprintf("p%dof%d", tc.part, tc.parts)
		source := &orderSource{fileSource: fileSource{f: src}}
		if _, err := fs.Add(Snapshot{ID: id, Size: 4096 * PageSize, HasData: hasData, Source: source}); err != nil {
			t.Fatal(err)
		}
		// The pages of part 0 are there already (pushed by another host).
		var pushed []Page
		for _, p := range pages[:len(pages)/tc.parts] {
			buf := make([]byte, PageSize)
			src.ReadAt(buf, int64(p)*PageSize)
			pushed = append(pushed, Page{Num: p, Data: buf})
		}
		if tc.part != 0 {
			if err := fs.InsertPages(id, pushed); err != nil {
				t.Fatal(err)
			}
		}
		if err := fs.FillFrom(context.Background(), id, tc.part, tc.parts, 64, 1); err != nil {
			t.Fatal(err)
		}
		want := pages[len(pages)*tc.part/tc.parts] / 64 * 64
		if len(source.firsts) == 0 || source.firsts[0]/64*64 != want {
			t.Errorf("%s: first fetch at %v, want in the batch at %d", id, source.firsts[:min(1, len(source.firsts))], want)
		}
		// Batch by batch: the share up, then the others down from it.
		from, to := want/64, uint64(4096/64)
		if tc.part+1 < tc.parts {
			to = pages[len(pages)*(tc.part+1)/tc.parts] / 64
		}
		var order []uint64
		for b := from; b < to; b++ {
			order = append(order, b)
		}
		for b := from; b > 0; b-- {
			order = append(order, b-1)
		}
		for b := uint64(4096 / 64); b > to; b-- {
			order = append(order, b-1)
		}
		var wantOrder, gotOrder []uint64
		for _, b := range order {
			if tc.part == 0 || slices.ContainsFunc(pages[len(pages)/tc.parts:], func(p uint64) bool { return p/64 == b }) {
				wantOrder = append(wantOrder, b)
			}
		}
		for _, f := range source.firsts {
			gotOrder = append(gotOrder, f/64)
		}
		if !slices.Equal(gotOrder, wantOrder) {
			t.Errorf("%s: fetched batches %v, want %v", id, gotOrder, wantOrder)
		}
		fetched, twice := source.count()
		wantFetched := len(pages)
		if tc.part != 0 {
			wantFetched -= len(pushed)
		}
		if fetched != wantFetched || twice {
			t.Errorf("%s: fetched %d pages (twice: %v), want %d", id, fetched, twice, wantFetched)
		}
		if n, _ := fs.Present(id); n != uint64(len(pages)) {
			t.Errorf("%s: %d pages present, want %d", id, n, len(pages))
		}
	}
	for _, bad := range [][2]int{{1, 1}, {-1, 2}, {0, 0}} {
		if err := fs.FillFrom(context.Background(), "p0of1", bad[0], bad[1], 64, 1); err == nil {
			t.Errorf("FillFrom part %d of %d: no error", bad[0], bad[1])
		}
	}
}

// TestChildrenDoNotInheritTheConnection: a process started after Mount
// (QEMU, in hostd) must not hold the FUSE connection, or it would keep the
// connection alive after the daemon dies and hang in its own page faults.
func TestChildrenDoNotInheritTheConnection(t *testing.T) {
	requireFUSE(t)
	mount(t)
	out, err := exec.Command("ls", "-l", "/proc/self/fd").CombinedOutput()
	if err != nil {
		t.Fatalf("ls: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "/dev/fuse") {
		t.Fatalf("a child inherited /dev/fuse:\n%s", out)
	}
}

// TestReaderWindow: scattered reads get no read-ahead; a reader that keeps
// continuing where it stopped gets a window that doubles up to the maximum.
func TestReaderWindow(t *testing.T) {
	type read struct {
		first, last uint64
		want        int
	}
	for _, tc := range []struct {
		name  string
		max   int
		reads []read
	}{
		{"scattered", 63, []read{{100, 100, 0}, {7, 7, 0}, {5000, 5000, 0}, {100, 100, 0}}},
		{"sequential", 63, []read{{10, 10, 0}, {11, 11, 8}, {12, 12, 16}, {13, 13, 32}, {14, 14, 63}, {15, 15, 63}}},
		{"small gaps keep the streak", 63, []read{{10, 10, 0}, {13, 13, 8}, {14, 20, 16}}},
		{"a jump resets it", 63, []read{{10, 10, 0}, {11, 11, 8}, {500, 500, 0}, {501, 501, 8}}},
		{"disabled", -1, []read{{10, 10, 0}, {11, 11, 0}, {12, 12, 0}}},
		{"long streak does not overflow", 1 << 20, func() []read {
			rs := []read{{0, 0, 0}}
			for p := uint64(1); p < 100; p++ {
				rs = append(rs, read{p, p, min(1<<20, 4<<min(int(p), 16))})
			}
			return rs
		}()},
	} {
		r := &reader{}
		for i, rd := range tc.reads {
			if got := r.ahead(rd.first, rd.last, tc.max); got != rd.want {
				t.Errorf("%s: read %d (%d-%d): ahead %d, want %d", tc.name, i, rd.first, rd.last, got, rd.want)
			}
		}
	}
	var none *reader
	if none.ahead(1, 1, 63) != 0 {
		t.Error("a nil reader (Fill) read ahead")
	}
}

// TestReadPages reads a snapshot in-process, as a memserver serving an
// overlay over it does: the pages equal the frozen file's, are fetched
// once, zero pages are never fetched, and bad ranges are refused.
func TestReadPages(t *testing.T) {
	requireFUSE(t)
	src, data := frozen(t, 1024, 3)
	fs := mount(t)
	source := &fileSource{f: src}
	if _, err := fs.Add(Snapshot{ID: "r", Size: 1024 * PageSize, HasData: func(p uint64) bool { return data[p] },
		Source: source}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	want := make([]byte, 1024*PageSize)
	if _, err := src.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	for _, rg := range [][2]uint64{{0, 1}, {5, 17}, {100, 300}, {0, 1024}, {1023, 1}} {
		got := make([]byte, rg[1]*PageSize)
		if err := fs.ReadPages(ctx, "r", rg[0], got); err != nil {
			t.Fatalf("pages %v: %v", rg, err)
		}
		if !bytes.Equal(got, want[rg[0]*PageSize:(rg[0]+rg[1])*PageSize]) {
			t.Fatalf("pages %v differ from the frozen file", rg)
		}
	}
	if fetched, twice := source.count(); fetched != len(data) || twice {
		t.Errorf("fetched %d pages (twice: %v), want each of the %d data pages once", fetched, twice, len(data))
	}
	for _, bad := range []struct {
		id    string
		first uint64
		n     int
	}{{"r", 1024, PageSize}, {"r", 1000, 25 * PageSize}, {"r", 0, 100}, {"r", 0, 0}, {"nope", 0, PageSize}} {
		if err := fs.ReadPages(ctx, bad.id, bad.first, make([]byte, bad.n)); err == nil {
			t.Errorf("ReadPages(%s, %d, %d bytes) succeeded", bad.id, bad.first, bad.n)
		}
	}
}

// TestInsertPages pushes batches in the shapes multicast gives (unsorted,
// with duplicates, zero pages inside runs, runs longer than one write, pages
// already present) and checks that every page then reads as pushed, that
// no page present is overwritten, and that only pages never pushed are
// fetched.
func TestInsertPages(t *testing.T) {
	requireFUSE(t)
	const n = 1024
	src, _ := frozen(t, n, 1) // the source's answer for any page not pushed
	fs := mount(t)
	source := &fileSource{f: src}
	if _, err := fs.Add(Snapshot{ID: "ins", Size: n * PageSize, HasData: func(uint64) bool { return true }, Source: source}); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, n*PageSize)
	if _, err := src.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	page := func(num uint64, v byte) Page { return Page{Num: num, Data: bytes.Repeat([]byte{v}, PageSize)} }
	set := func(p Page) { copy(want[p.Num*PageSize:(p.Num+1)*PageSize], p.Data) }
	zero := func(num uint64) { clear(want[num*PageSize : (num+1)*PageSize]) }
	var inserted uint64
	for _, tc := range []struct {
		name  string
		batch func() []Page
		added int
	}{
		{"one page", func() []Page { return []Page{page(3, 1)} }, 1},
		{"unsorted run", func() []Page { return []Page{page(12, 2), page(10, 3), page(11, 4)} }, 3},
		{"duplicate keeps the first", func() []Page { return []Page{page(20, 5), page(20, 6), page(21, 7)} }, 2},
		{"zero page inside a run", func() []Page { return []Page{page(30, 8), {Num: 31, Zero: true}, page(32, 9)} }, 3},
		{"present pages are kept", func() []Page { return []Page{page(10, 10), page(13, 11), page(3, 12)} }, 1},
		{"runs longer than one write", func() []Page {
			var b []Page
			for p := uint64(400); p < 1000; p++ {
				if p != 700 {
					b = append(b, page(p, byte(p)))
				}
			}
			return b
		}, 599},
	} {
		t.Run(tc.name, func(t *testing.T) {
			batch := tc.batch()
			// What the file must hold: the first copy of each page not present.
			seen := map[uint64]bool{}
			var expect []Page
			for _, p := range batch {
				if !seen[p.Num] && !fs.present(t, "ins", p.Num) {
					expect = append(expect, p)
				}
				seen[p.Num] = true
			}
			if err := fs.InsertPages("ins", slices.Clone(batch)); err != nil {
				t.Fatal(err)
			}
			for _, p := range expect {
				if p.Zero {
					zero(p.Num)
				} else {
					set(p)
				}
			}
			inserted += uint64(tc.added)
			if st, _ := fs.Stats("ins"); st.Inserted != inserted || len(expect) != tc.added {
				t.Fatalf("inserted %d (expected pages %d), want %d", st.Inserted, len(expect), inserted)
			}
		})
	}
	got := make([]byte, n*PageSize)
	if err := fs.ReadPages(context.Background(), "ins", 0, got); err != nil {
		t.Fatal(err)
	}
	for p := uint64(0); p < n; p++ {
		if !bytes.Equal(got[p*PageSize:(p+1)*PageSize], want[p*PageSize:(p+1)*PageSize]) {
			t.Fatalf("page %d differs from what was pushed or fetched", p)
		}
	}
	if fetched, twice := source.count(); fetched != n-int(inserted) || twice {
		t.Errorf("fetched %d pages (twice: %v), want the %d never pushed, once", fetched, twice, n-int(inserted))
	}
	for _, bad := range [][]Page{{page(n, 1)}, {{Num: 5, Data: make([]byte, 10)}}} {
		if err := fs.InsertPages("ins", bad); err == nil {
			t.Errorf("InsertPages(page %d, %d bytes) succeeded", bad[0].Num, len(bad[0].Data))
		}
	}
	if st, _ := fs.Stats("ins"); st.Inserted != inserted {
		t.Errorf("a refused batch changed the count: %d, want %d", st.Inserted, inserted)
	}
}

// present reports whether page num of snapshot id is in its backing file.
func (f *FS) present(t *testing.T, id string, num uint64) bool {
	t.Helper()
	sf, err := f.file(id)
	if err != nil {
		t.Fatal(err)
	}
	sf.mu.Lock()
	defer sf.mu.Unlock()
	return sf.isPresent(num)
}
