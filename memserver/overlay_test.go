package memserver

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
)

// memBase is an overlay's base held in memory.
type memBase struct {
	sf    snapFile
	reads atomic.Int64 // pages read
	fail  atomic.Bool
}

func (b *memBase) ReadPages(ctx context.Context, first uint64, dst []byte) error {
	if b.fail.Load() {
		return errors.New("base unreachable")
	}
	b.reads.Add(int64(len(dst) / PageSize))
	copy(dst, b.sf.content[first*PageSize:])
	return nil
}

// TestOverlay serves a snapshot made of a base and an overlay file over
// it, as a clone's snapshot is: owned pages come from the file (a hole
// there is an owned zero page), all others from the base, which is read
// only for them.
func TestOverlay(t *testing.T) {
	dir := t.TempDir()
	const pages = 900
	base := &memBase{sf: writeSnapshot(t, dir, "base", pages, 11)}
	over := writeSnapshot(t, dir, "overlay", pages, 12)
	r := rand.New(rand.NewPCG(13, 13))
	own := make([]bool, pages)
	for i := 0; i < pages; {
		o, run := r.IntN(3) == 0, 1+r.IntN(30)
		for ; run > 0 && i < pages; run, i = run-1, i+1 {
			own[i] = o
		}
	}
	// What the snapshot holds: the overlay's pages where owned.
	want := snapFile{pages: pages, content: make([]byte, pages*PageSize), kinds: make([]int, pages)}
	owned := 0
	for i := range pages {
		src := base.sf
		if own[i] {
			src, owned = over, owned+1
		}
		copy(want.content[i*PageSize:], src.page(uint64(i)))
		want.kinds[i] = src.kinds[i]
	}

	s := startServer(t, Config{MaxBatch: 128})
	c, err := s.Register(SnapshotSpec{ID: "ov", Path: over.path, Base: base, Own: func(p uint64) bool { return own[p] }})
	if err != nil {
		t.Fatal(err)
	}
	cl := dial(t, ClientConfig{}, s, "ov", c)
	for i := 0; i < 40; i++ {
		batch := randomBatch(r, pages, 1+r.IntN(300))
		got, err := cl.Fetch(context.Background(), batch)
		if err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
		if err := checkPages(want, batch, got); err != nil {
			t.Fatalf("batch %d: %v", i, err)
		}
	}
	all := make([]uint64, pages)
	for i := range all {
		all[i] = uint64(i)
	}
	before := base.reads.Load()
	if _, err := cl.Fetch(context.Background(), all); err != nil {
		t.Fatal(err)
	}
	if got := base.reads.Load() - before; got != int64(pages-owned) {
		t.Errorf("base read for %d pages, want the %d not owned", got, pages-owned)
	}

	// A base that fails fails the request, loudly, not with zeros.
	base.fail.Store(true)
	var notOwned uint64
	for own[notOwned] {
		notOwned++
	}
	if _, err := cl.Fetch(context.Background(), []uint64{notOwned}); err == nil {
		t.Error("fetch through a failing base succeeded")
	}

	// Base and Own go together.
	for _, spec := range []SnapshotSpec{
		{ID: "a", Path: over.path, Base: base},
		{ID: "b", Path: over.path, Own: func(uint64) bool { return true }},
	} {
		if _, err := s.Register(spec); err == nil {
			t.Errorf("Register %s with only one of Base and Own succeeded", spec.ID)
		}
	}
}

// TestReadPagesAndOnServe: the in-process read answers what a client
// would get, and OnServe hears every run a client was served.
func TestReadPagesAndOnServe(t *testing.T) {
	sf := writeSnapshot(t, t.TempDir(), "ram", 300, 21)
	var mu sync.Mutex
	served := map[uint64]int{}
	s := startServer(t, Config{OnServe: func(id string, first uint64, count int) {
		mu.Lock()
		defer mu.Unlock()
		if id == "r" {
			for p := first; p < first+uint64(count); p++ {
				served[p]++
			}
		}
	}})
	c := register(t, s, "r", sf)
	want := []uint64{0, 1, 2, 7, 100, 101, 299}
	got, err := s.ReadPages("r", want)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkPages(sf, want, got); err != nil {
		t.Fatal(err)
	}
	cl := dial(t, ClientConfig{}, s, "r", c)
	if _, err := cl.Fetch(context.Background(), []uint64{5, 6, 7, 50}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(served) != 4 || served[5] != 1 || served[50] != 1 {
		t.Errorf("OnServe heard %v", served)
	}
	mu.Unlock()
	if _, err := s.ReadPages("r", []uint64{300}); err == nil {
		t.Error("ReadPages beyond the snapshot succeeded")
	}
	if _, err := s.ReadPages("nope", []uint64{1}); !errors.Is(err, ErrUnknownSnapshot) {
		t.Errorf("ReadPages of an unknown snapshot: %v", err)
	}
}
