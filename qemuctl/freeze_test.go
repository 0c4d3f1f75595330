package qemuctl

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
)

func TestSubtractExtents(t *testing.T) {
	tests := []struct {
		a, b, want []extent
	}{
		{nil, nil, nil},
		{[]extent{{0, 10}}, nil, []extent{{0, 10}}},
		{[]extent{{0, 10}}, []extent{{0, 10}}, nil},
		{[]extent{{0, 10}}, []extent{{2, 3}}, []extent{{0, 2}, {5, 5}}},
		{[]extent{{0, 10}, {20, 10}}, []extent{{5, 20}}, []extent{{0, 5}, {25, 5}}},
		{[]extent{{10, 10}}, []extent{{0, 5}, {30, 5}}, []extent{{10, 10}}},
		{[]extent{{0, 4}, {8, 4}}, []extent{{0, 12}}, nil},
		{[]extent{{0, 30}}, []extent{{5, 5}, {15, 5}}, []extent{{0, 5}, {10, 5}, {20, 10}}},
	}
	for i, tc := range tests {
		if got := subtractExtents(tc.a, tc.b); !slices.Equal(got, tc.want) {
			t.Errorf("#%d: got %v, want %v", i, got, tc.want)
		}
	}
}

func TestPageRanges(t *testing.T) {
	tests := []struct {
		ext  []extent
		want []PageRange
	}{
		{nil, []PageRange{}},
		{[]extent{{0, 4096}}, []PageRange{{0, 1}}},
		{[]extent{{4096, 8192}, {5 * 4096, 4096}}, []PageRange{{1, 2}, {5, 1}}},
		{[]extent{{0, 100}}, []PageRange{{0, 1}}},                      // partial page widened
		{[]extent{{0, 4096}, {4096, 4096}}, []PageRange{{0, 2}}},       // adjacent runs merge
		{[]extent{{100, 4000}, {4100, 10}}, []PageRange{{0, 2}}},       // sharing a page merges
		{[]extent{{2 << 20, 2 << 20}}, []PageRange{{512, 512}}},        // a huge page
		{[]extent{{0, 1}, {3 * 4096, 1}}, []PageRange{{0, 1}, {3, 1}}}, // gaps stay
	}
	for i, tc := range tests {
		if got := pageRanges(tc.ext); !slices.Equal(got, tc.want) {
			t.Errorf("#%d: got %v, want %v", i, got, tc.want)
		}
	}
}

// sparseFile writes a file of size bytes whose data is the given pages, each
// filled with random bytes; the rest are holes.
func sparseFile(t testing.TB, path string, size int64, pages []int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, PageSize)
	r := rand.NewChaCha8([32]byte{1})
	for _, p := range pages {
		r.Read(buf)
		if _, err := f.WriteAt(buf, p*PageSize); err != nil {
			t.Fatal(err)
		}
	}
}

func fileSHA256(t testing.TB, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil))
}

// freezeFile runs a whole freeze of src into dst outside a VM.
func freezeFile(t testing.TB, src, dst string, size int64, workers int, between func()) (FreezeStats, []PageRange) {
	t.Helper()
	fz, err := prepareFreeze(src, dst, size, workers)
	if err != nil {
		t.Fatal(err)
	}
	if between != nil {
		between()
	}
	st, err := fz.copy()
	if err != nil {
		fz.abort()
		t.Fatal(err)
	}
	pages, err := fz.finish()
	if err != nil {
		t.Fatal(err)
	}
	return st, pages
}

// The frozen file equals the RAM file at the time of the copy, with the same
// holes, whatever the RAM file did between prepare and copy; on tmpfs
// through copy_file_range, elsewhere (the test's temporary directory) by
// whatever the file system allows.
func TestFreezeCopiesDataExtents(t *testing.T) {
	dirs := map[string]string{"ramdir": ramDir(t), "tempdir": t.TempDir()}
	for name, dir := range dirs {
		t.Run(name, func(t *testing.T) {
			const size = 8 << 20
			src, dst := filepath.Join(dir, "src.ram"), filepath.Join(dir, "dst.ram")
			sparseFile(t, src, size, []int64{0, 1, 2, 100, 101, 1000, 2047})
			st, pages := freezeFile(t, src, dst, size, 3, func() {
				// The guest touches a new page and rewrites an old one
				// before the pause.
				f, _ := os.OpenFile(src, os.O_RDWR, 0)
				f.WriteAt(bytes.Repeat([]byte{7}, PageSize), 500*PageSize)
				f.WriteAt([]byte("rewritten"), 100*PageSize)
				f.Close()
			})
			if fileSHA256(t, src) != fileSHA256(t, dst) {
				t.Fatal("frozen file differs from the RAM file")
			}
			want := []PageRange{{0, 3}, {100, 2}, {500, 1}, {1000, 1}, {2047, 1}}
			if !slices.Equal(pages, want) {
				t.Errorf("pages %v, want %v", pages, want)
			}
			if st.Method != FreezeReflink && (st.Bytes != 8*PageSize || st.Extents != 5) {
				t.Errorf("stats %+v: want 8 pages in 5 extents copied", st)
			}
			if name == "ramdir" && onMemoryFS(dir) {
				if st.Method != FreezeCopyFileRange || st.Preallocated != 7*PageSize {
					t.Errorf("stats %+v: want copy_file_range with 7 pages preallocated", st)
				}
			}
			t.Logf("%s: %+v", name, st)

			// Later writes to the RAM file do not reach the frozen file.
			before := fileSHA256(t, dst)
			f, _ := os.OpenFile(src, os.O_RDWR, 0)
			f.WriteAt([]byte("parent resumed"), 0)
			f.Close()
			if fileSHA256(t, dst) != before {
				t.Error("a write to the RAM file changed the frozen file")
			}
		})
	}
}

// Extents that the RAM file loses between prepare and copy leave no
// allocated pages in the frozen file.
func TestFreezeReleasesUnusedPreallocation(t *testing.T) {
	dir := ramDir(t)
	if !onMemoryFS(dir) {
		t.Skip("no tmpfs")
	}
	const size = 4 << 20
	src, dst := filepath.Join(dir, "src.ram"), filepath.Join(dir, "dst.ram")
	sparseFile(t, src, size, []int64{0, 10, 11, 12})
	_, pages := freezeFile(t, src, dst, size, 1, func() {
		// As if the guest had discarded pages 10-12 (balloon, free page
		// reporting).
		os.Truncate(src, 10*PageSize)
		os.Truncate(src, size)
	})
	if want := []PageRange{{0, 1}}; !slices.Equal(pages, want) {
		t.Errorf("pages %v, want %v", pages, want)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dst, &st); err != nil || st.Blocks*512 != PageSize {
		t.Errorf("frozen file allocates %d bytes (%v), want one page", st.Blocks*512, err)
	}
}

func TestFreezeRefusesExistingFile(t *testing.T) {
	dir := ramDir(t)
	src, dst := filepath.Join(dir, "src.ram"), filepath.Join(dir, "dst.ram")
	sparseFile(t, src, 1<<20, []int64{1})
	os.WriteFile(dst, []byte("a clone maps me"), 0o600)
	if _, err := prepareFreeze(src, dst, 1<<20, 0); err == nil {
		t.Fatal("prepareFreeze overwrote an existing file")
	}
	if b, _ := os.ReadFile(dst); string(b) != "a clone maps me" {
		t.Error("existing file changed")
	}
}

// BenchmarkFreeze measures the part of a freeze that happens during the
// pause (copy) for a 1 GiB RAM file with 256 MiB touched, contiguous as a
// guest's allocations mostly are, and scattered page by page.
func BenchmarkFreeze(b *testing.B) {
	const size, touched = 1 << 30, 256 << 20
	for _, layout := range []string{"contiguous", "scattered"} {
		dir := ramDir(b)
		src := filepath.Join(dir, "src.ram")
		var pages []int64
		if layout == "contiguous" {
			for p := range int64(touched / PageSize) {
				pages = append(pages, p+(p/512)*512) // 2 MiB runs, 2 MiB apart
			}
		} else {
			r := rand.New(rand.NewPCG(1, 2))
			for _, p := range r.Perm(size / PageSize)[:touched/PageSize] {
				pages = append(pages, int64(p))
			}
			slices.Sort(pages)
		}
		sparseFile(b, src, size, pages)
		for _, workers := range []int{1, 2} {
			b.Run(layout+"/workers="+strconv.Itoa(workers), func(b *testing.B) {
				var st FreezeStats
				for b.Loop() {
					dst := filepath.Join(dir, "dst.ram")
					b.StopTimer()
					fz, err := prepareFreeze(src, dst, size, workers)
					if err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if st, err = fz.copy(); err != nil {
						b.Fatal(err)
					}
					b.StopTimer()
					fz.finish()
					os.Remove(dst)
					b.StartTimer()
				}
				b.ReportMetric(float64(st.Bytes)/(1<<20), "MiB")
				b.ReportMetric(float64(st.Extents), "extents")
			})
		}
	}
}
