package image

import (
	"bytes"
	"fmt"
	"io"
	"path"
	"strings"
)

// The initramfs is a "newc" cpio archive (Documentation/driver-api/
// early-userspace/buffer-format.rst): per entry the ASCII header "070701"
// plus thirteen 8-digit hex fields, the NUL-terminated name padded to 4
// bytes, the data padded to 4 bytes; then the entry "TRAILER!!!".

// File types in cpio's mode field (the st_mode bits).
const (
	modeTypeMask = 0o170000
	modeDir      = 0o040000
	modeRegular  = 0o100000
	modeSymlink  = 0o120000
	modeCharDev  = 0o020000
	modeBlockDev = 0o060000
	modeFIFO     = 0o010000
)

const (
	newcMagic      = "070701"
	newcHeaderSize = 110
	newcTrailer    = "TRAILER!!!"
	// newcMaxName bounds names; the kernel refuses names over PATH_MAX.
	newcMaxName = 4095
)

// cpioEntry is one file of the archive. Names are relative ("bin/busybox").
type cpioEntry struct {
	Name string
	Mode uint32 // type and permission bits
	// Size and Open give a regular file's content; Open is called once per
	// write. Data, if not nil, is used instead (and for a symlink's target).
	Size int64
	Open func() (io.ReadCloser, error)
	Data []byte
	// RdevMajor and RdevMinor identify a device node.
	RdevMajor, RdevMinor uint32
}

// newcWriter writes a reproducible newc archive: inode numbers count up from
// 1 in entry order, and mtime, uid and gid are 0, so the bytes depend only on
// the entries.
type newcWriter struct {
	w       io.Writer
	n       int64 // bytes written
	nextIno uint32
	err     error
}

func newNewcWriter(w io.Writer) *newcWriter { return &newcWriter{w: w, nextIno: 1} }

// validCpioName reports whether name is a clean relative path.
func validCpioName(name string) error {
	switch {
	case name == "" || name == "." || len(name) > newcMaxName:
		return fmt.Errorf("bad name %q", name)
	case path.IsAbs(name) || path.Clean(name) != name:
		return fmt.Errorf("name %q is not a clean relative path", name)
	case name == ".." || strings.HasPrefix(name, "../"):
		return fmt.Errorf("name %q leaves the archive root", name)
	case strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("name %q contains NUL", name)
	case name == newcTrailer:
		return fmt.Errorf("name %q is the trailer", name)
	}
	return nil
}

// WriteEntry writes one entry.
func (cw *newcWriter) WriteEntry(e cpioEntry) error {
	if cw.err != nil {
		return cw.err
	}
	if err := validCpioName(e.Name); err != nil {
		return fmt.Errorf("cpio: %w", err)
	}
	nlink := uint32(1)
	var data io.Reader
	size := int64(0)
	switch e.Mode & modeTypeMask {
	case modeDir:
		nlink = 2
	case modeRegular:
		size = e.Size
		if e.Data != nil {
			size = int64(len(e.Data))
		}
	case modeSymlink:
		if len(e.Data) == 0 || len(e.Data) > newcMaxName {
			return fmt.Errorf("cpio: symlink %s: bad target", e.Name)
		}
		size = int64(len(e.Data))
	case modeCharDev, modeBlockDev, modeFIFO:
	default:
		return fmt.Errorf("cpio: %s: unsupported mode %#o", e.Name, e.Mode)
	}
	if e.Mode&^(modeTypeMask|0o7777) != 0 {
		return fmt.Errorf("cpio: %s: bad mode %#o", e.Name, e.Mode)
	}
	if size < 0 || size > 0xffffffff {
		return fmt.Errorf("cpio: %s: size %d does not fit newc", e.Name, size)
	}
	if cw.nextIno == 0 {
		return fmt.Errorf("cpio: too many entries")
	}
	if size > 0 {
		if e.Data != nil {
			data = bytes.NewReader(e.Data)
		} else if e.Open != nil {
			rc, err := e.Open()
			if err != nil {
				return fmt.Errorf("cpio: %s: %w", e.Name, err)
			}
			defer rc.Close()
			data = rc
		} else {
			return fmt.Errorf("cpio: %s: no content", e.Name)
		}
	}
	cw.writeHeader(cw.nextIno, e.Mode, nlink, uint32(size), e.RdevMajor, e.RdevMinor, e.Name)
	cw.nextIno++
	if data != nil && cw.err == nil {
		n, err := io.Copy(cw.w, io.LimitReader(data, size))
		cw.n += n
		switch {
		case err != nil:
			cw.err = fmt.Errorf("cpio: %s: %w", e.Name, err)
		case n != size:
			cw.err = fmt.Errorf("cpio: %s: %d bytes, want %d (file changed while building?)", e.Name, n, size)
		}
	}
	cw.pad4()
	return cw.err
}

// Close writes the trailer and pads the archive to 512 bytes, as cpio(1)
// does. It does not close the underlying writer.
func (cw *newcWriter) Close() error {
	if cw.err != nil {
		return cw.err
	}
	cw.writeHeader(0, 0, 1, 0, 0, 0, newcTrailer)
	cw.pad4()
	if r := cw.n % 512; r != 0 && cw.err == nil {
		cw.write(make([]byte, 512-r))
	}
	return cw.err
}

func (cw *newcWriter) writeHeader(ino, mode, nlink, size, rdevMajor, rdevMinor uint32, name string) {
	// ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
	h := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		newcMagic, ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	cw.write([]byte(h))
	cw.write([]byte(name))
	cw.write([]byte{0})
	cw.pad4()
}

func (cw *newcWriter) pad4() {
	if r := cw.n % 4; r != 0 {
		cw.write(make([]byte, 4-r))
	}
}

func (cw *newcWriter) write(b []byte) {
	if cw.err != nil {
		return
	}
	n, err := cw.w.Write(b)
	cw.n += int64(n)
	if err != nil {
		cw.err = fmt.Errorf("cpio: %w", err)
	}
}
