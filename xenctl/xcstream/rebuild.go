package xcstream

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
)

// PageSource supplies the page payloads Rebuild writes back.
//
// Rebuild calls Page from its own goroutine, in stream order, once for each
// stored page (a payload that is not all zeros). Page fills dst, PageSize
// bytes that are valid only during the call, with the payload the PageSink
// was given for pfn. An error stops Rebuild, which returns it wrapped.
type PageSource interface {
	Page(pfn uint64, dst []byte) error
}

// PageRunSource is a PageSource that also fills a run of consecutive
// stored pages in one call, as a file does with one read. Rebuild uses
// PageRun, in stream order and from its own goroutine, for every run of
// stored pages in a PAGE_DATA record (at most runPages at a time), and
// never calls Page then.
type PageRunSource interface {
	PageSource
	// PageRun fills dst, a multiple of PageSize bytes valid only during
	// the call, with the payloads of the pages from pfn on.
	PageRun(pfn uint64, dst []byte) error
}

// runPages bounds the pages of one PageRun call: 1 MiB.
const runPages = 256

// Rebuild writes the image the descriptor was split from. Given the
// payloads the sink received, the bytes are identical to the original's;
// zero pages are written as zeros without asking src, which may be nil if
// no page is stored.
func (d *Descriptor) Rebuild(w io.Writer, src PageSource) error {
	if err := d.validate(); err != nil {
		return err
	}
	out := &stickyWriter{w: bufio.NewWriterSize(w, 256<<10)}
	out.write(d.SaveFile)
	var h [libxlHeaderSize]byte
	binary.BigEndian.PutUint64(h[0:], libxlIdent)
	binary.BigEndian.PutUint32(h[8:], libxlVersion)
	binary.BigEndian.PutUint32(h[12:], d.LibxlOptions)
	out.write(h[:])
	buf := make([]byte, PageSize)
	if _, ok := src.(PageRunSource); ok {
		buf = make([]byte, runPages*PageSize)
	}
	for i := range d.Records {
		rec := &d.Records[i]
		n := rec.bodyLength()
		var rh [8]byte
		binary.LittleEndian.PutUint32(rh[0:], rec.Type)
		binary.LittleEndian.PutUint32(rh[4:], uint32(n))
		out.write(rh[:])
		if rec.isPageData() {
			if err := writePageData(out, rec.Pages, src, buf); err != nil {
				return err
			}
		} else {
			out.write(rec.Body)
		}
		out.write(zeroPage[:padding(n)])
		if rec.Layer == LayerLibxl && rec.Type == LibxlLibxcContext {
			out.write(d.Libxc.encode())
		}
		if out.err != nil {
			return out.err
		}
	}
	if out.err != nil {
		return out.err
	}
	return out.w.Flush()
}

// encode returns the image and domain headers as the stream has them.
func (h LibxcHeader) encode() []byte {
	b := make([]byte, imageHeaderSize+domainHeaderSize)
	binary.BigEndian.PutUint64(b[0:], libxcMarker)
	binary.BigEndian.PutUint32(b[8:], libxcID)
	binary.BigEndian.PutUint32(b[12:], h.Version)
	binary.BigEndian.PutUint16(b[16:], h.Options)
	dh := b[imageHeaderSize:]
	binary.LittleEndian.PutUint32(dh[0:], uint32(h.GuestType))
	binary.LittleEndian.PutUint16(dh[4:], h.PageShift)
	binary.LittleEndian.PutUint32(dh[8:], h.XenMajor)
	binary.LittleEndian.PutUint32(dh[12:], h.XenMinor)
	return b
}

// writePageData writes a PAGE_DATA body: header, entries, payloads. buf
// holds one page, or runPages for a PageRunSource.
func writePageData(out *stickyWriter, runs []PageRun, src PageSource, buf []byte) error {
	var count uint64
	for _, r := range runs {
		count += uint64(r.Count)
	}
	var h [pageDataHeaderSize]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(count))
	out.write(h[:])
	var e [pfnEntrySize]byte
	for _, r := range runs {
		for pfn := r.PFN; pfn < r.PFN+uint64(r.Count); pfn++ {
			binary.LittleEndian.PutUint64(e[:], uint64(r.Type)<<pfnTypeShift|pfn)
			out.write(e[:])
		}
	}
	for _, r := range runs {
		if !PageTypeHasData(r.Type) {
			continue
		}
		if r.Zero {
			for i := uint32(0); i < r.Count; i++ {
				out.write(zeroPage[:])
			}
			continue
		}
		if src == nil {
			return fmt.Errorf("xcstream: no page source for stored PFN %#x", r.PFN)
		}
		rs, _ := src.(PageRunSource)
		end := r.PFN + uint64(r.Count)
		for pfn := r.PFN; pfn < end && out.err == nil; {
			n := uint64(1)
			var err error
			if rs != nil {
				n = min(end-pfn, runPages)
				err = rs.PageRun(pfn, buf[:n*PageSize])
			} else {
				err = src.Page(pfn, buf)
			}
			if err != nil {
				return fmt.Errorf("xcstream: page source, PFN %#x: %w", pfn, err)
			}
			out.write(buf[:n*PageSize])
			pfn += n
		}
	}
	return nil
}

// stickyWriter keeps the first write error and ignores later writes.
type stickyWriter struct {
	w   *bufio.Writer
	err error
}

func (s *stickyWriter) write(b []byte) {
	if s.err == nil && len(b) > 0 {
		_, s.err = s.w.Write(b)
	}
}
