package qemuctl

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// A clone maps its snapshot's frozen RAM file private: the pages it has
// written are anonymous copies in QEMU's address space, every other page is
// still the frozen file's. Its snapshot is therefore an overlay over that
// file: the device state, saved without RAM by xen-save-devices-state (the
// command Xen's toolstack uses to save QEMU's devices; it needs no Xen and
// never reads guest RAM, unlike a migration of private RAM), plus the
// clone's own pages, found through /proc/PID/pagemap and read through
// /proc/PID/mem. Pages the clone never wrote are neither read nor copied, so
// a clone's snapshot does not fetch its lazily restored memory.

// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const (
	pmPresent = 1 << 63
	pmSwapped = 1 << 62
	pmFile    = 1 << 61 // file page or shared anonymous
)

// Device state streams (QEMU's migration/savevm.c): a migration starts with
// a configuration section, a saved device state (xen-save-devices-state)
// with its first device.
const (
	streamMagic        = 0x5145564d // "QEVM"
	streamVersion      = 3
	streamConfig       = 0x07 // QEMU_VM_CONFIGURATION
	streamSectionFull  = 0x04 // QEMU_VM_SECTION_FULL
	streamHeaderLength = 9
)

// DeviceStateFormat says how a device state file was saved.
type DeviceStateFormat int

const (
	// FormatMigration is a migration stream without RAM (Snapshot of a VM
	// that owns its RAM).
	FormatMigration DeviceStateFormat = iota + 1
	// FormatDevices is QEMU's device state alone (Snapshot of a clone): it
	// lacks the configuration section, so a restore turns it off.
	FormatDevices
)

// ErrBadDeviceState is returned for a device state that is neither format.
var ErrBadDeviceState = errors.New("qemuctl: not a QEMU device state")

// DeviceStateFormatOf reads the header of the device state at path.
func DeviceStateFormatOf(path string) (DeviceStateFormat, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var h [streamHeaderLength]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		return 0, fmt.Errorf("%w: %s: %v", ErrBadDeviceState, path, err)
	}
	return deviceStateFormat(h[:])
}

func deviceStateFormat(h []byte) (DeviceStateFormat, error) {
	if len(h) < streamHeaderLength || binary.BigEndian.Uint32(h) != streamMagic ||
		binary.BigEndian.Uint32(h[4:]) != streamVersion {
		return 0, fmt.Errorf("%w: bad magic or version", ErrBadDeviceState)
	}
	switch h[8] {
	case streamConfig:
		return FormatMigration, nil
	case streamSectionFull:
		return FormatDevices, nil
	}
	return 0, fmt.Errorf("%w: first section type %#x", ErrBadDeviceState, h[8])
}

// ramVMA is one mapping of the RAM file in QEMU's address space.
type ramVMA struct {
	start, end uint64 // addresses
	off        uint64 // file offset at start
}

// ramVMAs finds the mappings of path in /proc/PID/maps.
func ramVMAs(pid int, path string) ([]ramVMA, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []ramVMA
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || strings.Join(fields[5:], " ") != path {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		off, err3 := strconv.ParseUint(fields[2], 16, 64)
		if err1 != nil || err2 != nil || err3 != nil || end <= start || start%PageSize != 0 || off%PageSize != 0 {
			return nil, fmt.Errorf("unreadable mapping %q", sc.Text())
		}
		out = append(out, ramVMA{start: start, end: end, off: off})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("QEMU (pid %d) does not map %s", pid, path)
	}
	// In file order, so that pages are found in ascending order.
	sort.Slice(out, func(i, j int) bool { return out[i].off < out[j].off })
	for i := 1; i < len(out); i++ {
		if out[i].off < out[i-1].off+(out[i-1].end-out[i-1].start) {
			return nil, fmt.Errorf("QEMU (pid %d) maps parts of %s twice", pid, path)
		}
	}
	return out, nil
}

// OverlayStats describe the private pages of a clone's snapshot.
type OverlayStats struct {
	Scanned uint64 `json:"scanned"` // pages of the RAM mappings looked up
	Private uint64 `json:"private"` // pages the clone had written
	Zero    uint64 `json:"zero"`    // of which all-zero: recorded, not stored
	Bytes   int64  `json:"bytes"`   // bytes written to the overlay file
}

// overlayCopy reads the private pages of the clone's RAM mappings into the
// overlay file out (of the RAM's size), and returns the runs of private
// pages with data and of private pages that are zero. The guest must be
// stopped.
func (vm *VM) overlayCopy(out *os.File) (data, zero []PageRange, st OverlayStats, err error) {
	vmas, err := ramVMAs(vm.pid, vm.ram)
	if err != nil {
		return nil, nil, st, err
	}
	pm, err := os.Open(fmt.Sprintf("/proc/%d/pagemap", vm.pid))
	if err != nil {
		return nil, nil, st, err
	}
	defer pm.Close()
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", vm.pid))
	if err != nil {
		return nil, nil, st, err
	}
	defer mem.Close()

	size := uint64(vm.cfg.MemMB) << 20
	const chunk = 4096 // pages per pagemap read: 32 KiB of entries
	entries := make([]byte, chunk*8)
	buf := make([]byte, 256*PageSize)
	var dataRuns, zeroRuns runs
	for _, v := range vmas {
		for addr := v.start; addr < v.end; {
			n := min(uint64(chunk), (v.end-addr)/PageSize)
			b := entries[:n*8]
			if _, err := pm.ReadAt(b, int64(addr/PageSize*8)); err != nil {
				return nil, nil, st, fmt.Errorf("reading pagemap: %w", err)
			}
			st.Scanned += n
			// Runs of private pages, read with one pread each.
			for i := uint64(0); i < n; {
				e := binary.LittleEndian.Uint64(b[i*8:])
				if !isPrivate(e) {
					i++
					continue
				}
				j := i + 1
				for j < n && j-i < uint64(len(buf)/PageSize) && isPrivate(binary.LittleEndian.Uint64(b[j*8:])) {
					j++
				}
				first := (v.off + (addr - v.start)) / PageSize
				fileOff := first*PageSize + i*PageSize
				if fileOff+(j-i)*PageSize > size {
					return nil, nil, st, fmt.Errorf("mapping at %#x reaches past the RAM's %d bytes", v.start, size)
				}
				run := buf[:(j-i)*PageSize]
				if _, err := mem.ReadAt(run, int64(addr+i*PageSize)); err != nil {
					return nil, nil, st, fmt.Errorf("reading the clone's memory: %w", err)
				}
				for k := uint64(0); k < j-i; k++ {
					page := run[k*PageSize : (k+1)*PageSize]
					pfn := first + i + k
					st.Private++
					if isZero(page) {
						st.Zero++
						zeroRuns.add(pfn)
						continue
					}
					if _, err := out.WriteAt(page, int64(pfn*PageSize)); err != nil {
						return nil, nil, st, err
					}
					st.Bytes += PageSize
					dataRuns.add(pfn)
				}
				i = j
			}
			addr += n * PageSize
		}
	}
	return dataRuns.list, zeroRuns.list, st, nil
}

func isPrivate(e uint64) bool {
	return e&pmSwapped != 0 || (e&pmPresent != 0 && e&pmFile == 0)
}

func isZero(p []byte) bool {
	for i := 0; i+8 <= len(p); i += 8 {
		if binary.LittleEndian.Uint64(p[i:]) != 0 {
			return false
		}
	}
	return true
}

// runs collects page numbers, added in ascending order, as PageRanges.
type runs struct{ list []PageRange }

func (r *runs) add(pfn uint64) {
	if n := len(r.list); n > 0 && r.list[n-1].First+r.list[n-1].Count == pfn {
		r.list[n-1].Count++
		return
	}
	r.list = append(r.list, PageRange{First: pfn, Count: 1})
}

// snapshotClone is Snapshot of a VM whose RAM is a private mapping of
// vm.ram: see the comment at the top of this file.
func (vm *VM) snapshotClone(ctx context.Context, devPath, overlayPath string) (res *SnapshotResult, err error) {
	begin := time.Now()
	running, err := vm.snapshotRunning(ctx)
	if err != nil {
		return nil, err
	}
	if strings.ContainsAny(devPath, "\x00") {
		return nil, fmt.Errorf("bad device state path %q", devPath)
	}
	res = &SnapshotResult{DeviceStatePath: devPath, FrozenRAMPath: overlayPath, Base: vm.ram,
		RAMSize: int64(vm.cfg.MemMB) << 20, Machine: vm.Machine(), Format: FormatDevices}
	// QEMU creates the device state file by name: reserve the name first.
	dev, err := os.OpenFile(devPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	dev.Close()
	out, err := os.OpenFile(overlayPath, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		os.Remove(devPath)
		return nil, err
	}
	defer func() {
		out.Close()
		if err != nil {
			os.Remove(devPath)
			os.Remove(overlayPath)
		}
	}()
	if err := out.Truncate(res.RAMSize); err != nil {
		return nil, err
	}
	res.Phases.Prepare = time.Since(begin)

	pauseStart := time.Now()
	stopped := false
	defer func() {
		if err != nil && stopped {
			bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), resumeGrace)
			defer cancel()
			vm.resumeAfterFailure(bg)
		}
	}()
	t := time.Now()
	if stopped, err = vm.stopIf(ctx, running); err != nil {
		return nil, err
	}
	res.Phases.Stop = time.Since(t)
	t = time.Now()
	if err := vm.qmp.Execute(ctx, "xen-save-devices-state", map[string]any{"filename": devPath, "live": false}, nil); err != nil {
		return nil, fmt.Errorf("saving the device state: %w", err)
	}
	res.Phases.Save = time.Since(t)
	t = time.Now()
	res.Pages, res.ZeroPages, res.Overlay, err = vm.overlayCopy(out)
	if err != nil {
		return nil, fmt.Errorf("copying the clone's own pages: %w", err)
	}
	res.Phases.Freeze = time.Since(t)
	if running {
		t = time.Now()
		if err := vm.qmp.Cont(ctx); err != nil {
			return nil, err
		}
		stopped = false
		res.Phases.Cont = time.Since(t)
		res.Pause = time.Since(pauseStart)
		res.Resumed = true
	}
	for _, r := range res.Pages {
		res.DataPages += r.Count
	}
	st, err := os.Stat(devPath)
	if err != nil {
		return nil, err
	}
	if st.Size() < streamHeaderLength {
		return nil, fmt.Errorf("%w: QEMU saved %d bytes", ErrBadDeviceState, st.Size())
	}
	res.DeviceStateSize = st.Size()
	return res, nil
}

// MergeOverlay writes into dst (which must not exist) the memory of a
// clone's snapshot: base with the overlay's pages over it. It is the eager
// form of what a lazy restore reads page by page, for tests and tools.
func MergeOverlay(res *SnapshotResult, dst string) error {
	if res.Base == "" {
		return errors.New("not an overlay snapshot")
	}
	base, err := os.ReadFile(res.Base)
	if err != nil {
		return err
	}
	ov, err := os.Open(res.FrozenRAMPath)
	if err != nil {
		return err
	}
	defer ov.Close()
	for _, r := range res.Pages {
		if _, err := ov.ReadAt(base[r.First*PageSize:(r.First+r.Count)*PageSize], int64(r.First*PageSize)); err != nil {
			return err
		}
	}
	for _, r := range res.ZeroPages {
		clear(base[r.First*PageSize : (r.First+r.Count)*PageSize])
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	// Sparse: zero pages stay holes.
	for off := 0; off < len(base); off += 256 * PageSize {
		b := base[off:min(off+256*PageSize, len(base))]
		if bytes.Count(b, []byte{0}) == len(b) {
			continue
		}
		if _, err := f.WriteAt(b, int64(off)); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Truncate(int64(len(base))); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
