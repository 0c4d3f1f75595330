package qemuctl

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// PageSize is the unit of PageRange: the page size of guest RAM and of tmpfs.
const PageSize = 4096

// PageRange is a run of pages [First, First+Count) of a RAM file, in units of
// PageSize. The pages outside a snapshot's ranges were never written: they
// are holes of the file and read as zero.
type PageRange struct {
	First uint64 `json:"first"`
	Count uint64 `json:"count"`
}

// How a RAM file was frozen (FreezeStats.Method).
const (
	// FreezeReflink shares the RAM file's blocks copy-on-write (FICLONE):
	// constant time, on file systems that support it (btrfs, XFS); never
	// tmpfs.
	FreezeReflink = "reflink"
	// FreezeCopyFileRange copies the data extents in the kernel
	// (copy_file_range), skipping holes.
	FreezeCopyFileRange = "copy_file_range"
	// FreezeReadWrite copies the data extents through a buffer, where
	// copy_file_range is refused.
	FreezeReadWrite = "read-write"
)

// FreezeStats say how a RAM file was frozen.
type FreezeStats struct {
	Method  string `json:"method"`  // a Freeze constant
	Workers int    `json:"workers"` // parallel copiers
	// Extents is the number of data extents copied, Bytes their total
	// size: the RAM the guest had touched (0 for a reflink).
	Extents int   `json:"extents"`
	Bytes   int64 `json:"bytes"`
	// Preallocated is how much of the frozen file was written with zeros
	// before the pause, from the RAM file's extents at that time: page
	// allocation, and on a host that backs memory lazily (a VM host such as
	// this project's test bed) the first touch of each page, happen while
	// the guest still runs.
	Preallocated int64 `json:"preallocated"`
}

// maxFreezeWorkers bounds the copiers: a copy this size is limited by memory
// bandwidth, which a few threads saturate.
const maxFreezeWorkers = 4

// copyChunk is the unit of work of one copier.
const copyChunk = 8 << 20

// extent is a byte range of a file.
type extent struct{ off, len int64 }

// freezer makes an immutable copy of a RAM file, the frozen file, in three
// steps: prepare, while the guest still runs, creates the frozen file and
// allocates (writes zeros over) the extents the RAM file has so far; copy,
// while the guest is paused, copies the data extents; finish, after the
// guest resumed, releases what was allocated for nothing and maps the frozen
// file's pages. The pause is then a copy between pages that exist, at memory
// bandwidth.
//
// Only data extents are copied, so pages the guest never touched stay holes
// in the frozen file: they cost no memory and read as zero. The copy is a
// separate file, not a mapping of the RAM file, because the parent keeps
// writing its RAM file once it resumes.
type freezer struct {
	src, dst *os.File
	dstPath  string
	size     int64
	workers  int
	reflink  bool     // try FICLONE first
	pre      []extent // preallocated in dst
	copied   []extent // written by copy
	stats    FreezeStats
}

// prepareFreeze creates dstPath, which must not exist, for a copy of the
// RAM file src of size bytes. On error nothing is left behind.
func prepareFreeze(src, dstPath string, size int64, workers int) (*freezer, error) {
	if workers <= 0 {
		workers = min(runtime.GOMAXPROCS(0), maxFreezeWorkers)
	}
	s, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	d, err := os.OpenFile(dstPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		s.Close()
		return nil, err
	}
	f := &freezer{src: s, dst: d, dstPath: dstPath, size: size, workers: workers}
	f.stats.Workers = workers
	if err := f.prepare(); err != nil {
		f.abort()
		return nil, err
	}
	return f, nil
}

func (f *freezer) prepare() error {
	if err := f.dst.Truncate(f.size); err != nil {
		return err
	}
	f.reflink = mayReflink(f.src, f.dst)
	if f.reflink {
		return nil // a clone allocates nothing
	}
	pre, err := dataExtents(f.src, f.size)
	if err != nil {
		return err
	}
	// Zeros, not fallocate: tmpfs allocates fallocated pages without
	// touching them, and the touch is what a lazily backed host makes slow.
	err = parallel(chunked(pre), f.workers, func(w *copier, c extent) error {
		if w.buf == nil {
			w.buf = make([]byte, zeroChunk)
		}
		for off := c.off; off < c.off+c.len; off += zeroChunk {
			if _, err := f.dst.WriteAt(w.buf[:min(zeroChunk, c.off+c.len-off)], off); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("preallocating the frozen file: %w", err)
	}
	f.pre = pre
	for _, e := range pre {
		f.stats.Preallocated += e.len
	}
	return nil
}

// zeroChunk is the size of the buffer of zeros that preallocation writes.
const zeroChunk = 1 << 20

// copier is one worker's state in parallel.
type copier struct {
	buf []byte
}

// parallel runs fn on every chunk with up to workers goroutines, and returns
// the first error, after which chunks not yet started are skipped.
func parallel(chunks []extent, workers int, fn func(w *copier, c extent) error) error {
	var (
		next    atomic.Int64
		failed  atomic.Bool
		errOnce sync.Once
		first   error
		wg      sync.WaitGroup
	)
	for range min(workers, max(1, len(chunks))) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var w copier
			for !failed.Load() {
				i := next.Add(1) - 1
				if i >= int64(len(chunks)) {
					return
				}
				if err := fn(&w, chunks[i]); err != nil {
					errOnce.Do(func() { first = err })
					failed.Store(true)
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

// chunked splits extents into chunks of at most copyChunk bytes, the unit
// of work of parallel.
func chunked(ext []extent) []extent {
	var out []extent
	for _, e := range ext {
		for off := e.off; off < e.off+e.len; off += copyChunk {
			out = append(out, extent{off, min(copyChunk, e.off+e.len-off)})
		}
	}
	return out
}

// mayReflink reports whether FICLONE from src to dst could work: both on one
// file system that is not a memory file system (tmpfs has no reflinks).
func mayReflink(src, dst *os.File) bool {
	var a, b unix.Stat_t
	if unix.Fstat(int(src.Fd()), &a) != nil || unix.Fstat(int(dst.Fd()), &b) != nil || a.Dev != b.Dev {
		return false
	}
	var st unix.Statfs_t
	if unix.Fstatfs(int(src.Fd()), &st) != nil {
		return false
	}
	return st.Type != unix.TMPFS_MAGIC && st.Type != unix.HUGETLBFS_MAGIC
}

// copy makes the frozen file equal to the RAM file. The RAM file must not
// change meanwhile: the guest is paused.
func (f *freezer) copy() (FreezeStats, error) {
	if f.reflink {
		err := unix.IoctlFileClone(int(f.dst.Fd()), int(f.src.Fd()))
		if err == nil {
			f.stats.Method = FreezeReflink
			return f.stats, nil
		}
		// EOPNOTSUPP, EXDEV, EINVAL, ENOTTY: not this file system.
		f.reflink = false
	}
	ext, err := dataExtents(f.src, f.size)
	if err != nil {
		return f.stats, err
	}
	f.copied = ext
	for _, e := range ext {
		f.stats.Extents++
		f.stats.Bytes += e.len
	}
	var (
		noCFR        atomic.Bool // copy_file_range refused: copy through a buffer
		srcFD, dstFD = int(f.src.Fd()), int(f.dst.Fd())
	)
	err = parallel(chunked(ext), f.workers, func(w *copier, c extent) error {
		if !noCFR.Load() {
			err := copyFileRange(srcFD, dstFD, c)
			if err == nil || !cfrUnsupported(err) {
				return err
			}
			noCFR.Store(true)
		}
		if w.buf == nil {
			w.buf = make([]byte, 1<<20)
		}
		return copyThrough(f.src, f.dst, c, w.buf)
	})
	if err != nil {
		return f.stats, fmt.Errorf("copying RAM: %w", err)
	}
	f.stats.Method = FreezeCopyFileRange
	if noCFR.Load() {
		f.stats.Method = FreezeReadWrite
	}
	return f.stats, nil
}

func copyFileRange(src, dst int, c extent) error {
	in, out := c.off, c.off
	for rem := c.len; rem > 0; {
		n, err := unix.CopyFileRange(src, &in, dst, &out, int(rem), 0)
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("RAM file ends at %d, inside a data extent", in)
		}
		rem -= int64(n)
	}
	return nil
}

// cfrUnsupported reports a copy_file_range error that means "not between
// these files" rather than a failure.
func cfrUnsupported(err error) bool {
	return errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM)
}

func copyThrough(src, dst *os.File, c extent, buf []byte) error {
	for off := c.off; off < c.off+c.len; {
		n, err := src.ReadAt(buf[:min(int64(len(buf)), c.off+c.len-off)], off)
		if n > 0 {
			if _, err := dst.WriteAt(buf[:n], off); err != nil {
				return err
			}
			off += int64(n)
		}
		if err == io.EOF && off < c.off+c.len {
			return fmt.Errorf("RAM file ends at %d, inside a data extent", off)
		}
		if err != nil && err != io.EOF {
			return err
		}
	}
	return nil
}

// finish releases preallocated space that the copy did not fill (the RAM
// file lost extents between prepare and copy, which only a guest discarding
// memory causes), returns the frozen file's pages and closes both files.
func (f *freezer) finish() ([]PageRange, error) {
	defer f.close()
	for _, e := range subtractExtents(f.pre, f.copied) {
		if err := unix.Fallocate(int(f.dst.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, e.off, e.len); err != nil {
			return nil, fmt.Errorf("releasing unused preallocation: %w", err)
		}
	}
	ext, err := dataExtents(f.dst, f.size)
	if err != nil {
		return nil, err
	}
	return pageRanges(ext), nil
}

// abort closes both files and removes the frozen file.
func (f *freezer) abort() {
	f.close()
	os.Remove(f.dstPath)
}

func (f *freezer) close() {
	f.src.Close()
	f.dst.Close()
}

// dataExtents lists the data extents of the first size bytes of file, with
// SEEK_DATA and SEEK_HOLE.
func dataExtents(file *os.File, size int64) ([]extent, error) {
	fd := int(file.Fd())
	var out []extent
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // no data after off
		}
		if err != nil {
			return nil, fmt.Errorf("SEEK_DATA: %w", err)
		}
		if data >= size {
			break
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE: %w", err)
		}
		hole = min(hole, size)
		out = append(out, extent{data, hole - data})
		off = hole
	}
	return out, nil
}

// subtractExtents returns the parts of a (sorted, disjoint) not covered by b
// (sorted, disjoint).
func subtractExtents(a, b []extent) []extent {
	var out []extent
	j := 0
	for _, e := range a {
		start, end := e.off, e.off+e.len
		for j < len(b) && b[j].off+b[j].len <= start {
			j++
		}
		for k := j; k < len(b) && b[k].off < end; k++ {
			if b[k].off > start {
				out = append(out, extent{start, b[k].off - start})
			}
			start = max(start, b[k].off+b[k].len)
		}
		if start < end {
			out = append(out, extent{start, end - start})
		}
	}
	return out
}

// pageRanges converts extents to page runs, widening partial pages.
func pageRanges(ext []extent) []PageRange {
	out := make([]PageRange, 0, len(ext))
	for _, e := range ext {
		first := uint64(e.off) / PageSize
		last := (uint64(e.off+e.len) + PageSize - 1) / PageSize
		if n := len(out); n > 0 && out[n-1].First+out[n-1].Count >= first {
			out[n-1].Count = max(out[n-1].Count, last-out[n-1].First)
			continue
		}
		out = append(out, PageRange{First: first, Count: last - first})
	}
	return out
}
