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
	var page [PageSize]byte
	for i := range d.Records {
		rec := &d.Records[i]
		n := rec.bodyLength()
		var rh [8]byte
		binary.LittleEndian.PutUint32(rh[0:], rec.Type)
		binary.LittleEndian.PutUint32(rh[4:], uint32(n))
		out.write(rh[:])
		if rec.isPageData() {
			if err := writePageData(out, rec.Pages, src, &page); err != nil {
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

// writePageData writes a PAGE_DATA body: header, entries, payloads.
func writePageData(out *stickyWriter, runs []PageRun, src PageSource, page *[PageSize]byte) error {
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
		for pfn := r.PFN; pfn < r.PFN+uint64(r.Count) && out.err == nil; pfn++ {
			if r.Zero {
				out.write(zeroPage[:])
				continue
			}
			if src == nil {
				return fmt.Errorf("xcstream: no page source for stored PFN %#x", pfn)
			}
			if err := src.Page(pfn, page[:]); err != nil {
				return fmt.Errorf("xcstream: page source, PFN %#x: %w", pfn, err)
			}
			out.write(page[:])
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
