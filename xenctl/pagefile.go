package xenctl

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/snowflock-go/snowflock/xenctl/xcstream"
)

// MaxPageFilePFN bounds the PFNs a PageFile holds: page n lives at byte
// n*4096, and 2^32 pages (16 TiB of guest-physical space) is as far as
// common file systems let a sparse file reach.
const MaxPageFilePFN = 1<<32 - 1

// PageFile keeps pages in a sparse file, page n at byte n*PageSize: a
// PageSink for Split and a PageRunSource for Rebuild. The holes of pages
// never stored cost nothing on tmpfs or ext4, but the file's length is the
// guest's highest frame: 4 GiB for any PVH guest (see the package
// comment), so copy it with a tool that keeps holes. It is safe for
// concurrent use (positioned reads and writes).
type PageFile struct {
	f *os.File
}

var (
	_ xcstream.PageSink      = (*PageFile)(nil)
	_ xcstream.PageRunSource = (*PageFile)(nil)
)

// CreatePageFile creates a new page file; path must not exist.
func CreatePageFile(path string) (*PageFile, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("xenctl: %w", err)
	}
	return &PageFile{f: f}, nil
}

// OpenPageFile opens a page file for reading.
func OpenPageFile(path string) (*PageFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("xenctl: %w", err)
	}
	return &PageFile{f: f}, nil
}

// PutPage stores a page.
func (p *PageFile) PutPage(pfn uint64, data []byte) error {
	if pfn > MaxPageFilePFN || len(data) != xcstream.PageSize {
		return fmt.Errorf("xenctl: page file: page %#x of %d bytes", pfn, len(data))
	}
	_, err := p.f.WriteAt(data, int64(pfn)*xcstream.PageSize)
	return err
}

// Page reads a page back. A page beyond the end of the file was never
// stored and is an error; a hole inside reads as zeros.
func (p *PageFile) Page(pfn uint64, dst []byte) error {
	if pfn > MaxPageFilePFN || len(dst) != xcstream.PageSize {
		return fmt.Errorf("xenctl: page file: page %#x into %d bytes", pfn, len(dst))
	}
	_, err := p.f.ReadAt(dst, int64(pfn)*xcstream.PageSize)
	if err == io.EOF {
		return fmt.Errorf("xenctl: page file %s has no page %#x", p.f.Name(), pfn)
	}
	return err
}

// PageRun reads the pages from pfn on into dst, a multiple of PageSize
// bytes, with one read; like Page, holes read as zeros and the end of the
// file is an error.
func (p *PageFile) PageRun(pfn uint64, dst []byte) error {
	n := uint64(len(dst) / xcstream.PageSize)
	if len(dst)%xcstream.PageSize != 0 || n == 0 || pfn > MaxPageFilePFN || n-1 > MaxPageFilePFN-pfn {
		return fmt.Errorf("xenctl: page file: %d bytes of pages from %#x", len(dst), pfn)
	}
	_, err := p.f.ReadAt(dst, int64(pfn)*xcstream.PageSize)
	if err == io.EOF {
		return fmt.Errorf("xenctl: page file %s ends before page %#x", p.f.Name(), pfn+n-1)
	}
	return err
}

// batchPages bounds the pages a pageBatch gathers: 1 MiB.
const batchPages = 256

// pageBatch is a PageSink that gathers consecutive pages and writes each
// run to the PageFile with one write. Capture writes through it: in a PV
// dom0 every system call goes through the hypervisor, and a page file
// written a page at a time, by the reader of xl's stream, held the guest
// suspended for seconds longer (see the package comment).
// Flush writes what is gathered; it is not safe for concurrent use.
type pageBatch struct {
	f     *PageFile
	start uint64 // PFN of buf's first page
	buf   []byte
}

func newPageBatch(f *PageFile) *pageBatch {
	return &pageBatch{f: f, buf: make([]byte, 0, batchPages*xcstream.PageSize)}
}

// PutPage implements xcstream.PageSink.
func (b *pageBatch) PutPage(pfn uint64, data []byte) error {
	if pfn > MaxPageFilePFN || len(data) != xcstream.PageSize {
		return fmt.Errorf("xenctl: page file: page %#x of %d bytes", pfn, len(data))
	}
	next := b.start + uint64(len(b.buf)/xcstream.PageSize)
	if len(b.buf) > 0 && (pfn != next || len(b.buf) == cap(b.buf)) {
		if err := b.Flush(); err != nil {
			return err
		}
	}
	if len(b.buf) == 0 {
		b.start = pfn
	}
	b.buf = append(b.buf, data...)
	return nil
}

// Flush writes the gathered run.
func (b *pageBatch) Flush() error {
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.f.f.WriteAt(b.buf, int64(b.start)*xcstream.PageSize)
	b.buf = b.buf[:0]
	return err
}

// Close closes the file.
func (p *PageFile) Close() error { return p.f.Close() }

// ReadDescriptor reads a descriptor that Capture wrote.
func ReadDescriptor(path string) (*xcstream.Descriptor, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var desc xcstream.Descriptor
	if err := desc.UnmarshalBinary(b); err != nil {
		return nil, err
	}
	return &desc, nil
}

// OpenCapture opens a capture directory that Capture filled: its
// descriptor and its page file, which the caller closes.
func OpenCapture(dir string) (*xcstream.Descriptor, *PageFile, error) {
	desc, err := ReadDescriptor(filepath.Join(dir, DescriptorFile))
	if err != nil {
		return nil, nil, err
	}
	pages, err := OpenPageFile(filepath.Join(dir, PagesFile))
	if err != nil {
		return nil, nil, err
	}
	return desc, pages, nil
}
