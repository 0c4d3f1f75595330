package xenctl

import (
	"fmt"
	"io"
	"os"

	"github.com/snowflock-go/snowflock/xenctl/xcstream"
)

// MaxPageFilePFN bounds the PFNs a PageFile holds: page n lives at byte
// n*4096, and 2^32 pages (16 TiB of guest-physical space) is as far as
// common file systems let a sparse file reach.
const MaxPageFilePFN = 1<<32 - 1

// PageFile keeps pages in a sparse file, page n at byte n*PageSize: a
// PageSink for Split and a PageSource for Rebuild. The holes of pages
// never stored cost nothing on tmpfs or ext4. It is safe for concurrent
// use (positioned reads and writes).
type PageFile struct {
	f *os.File
}

var (
	_ xcstream.PageSink   = (*PageFile)(nil)
	_ xcstream.PageSource = (*PageFile)(nil)
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

// Close closes the file.
func (p *PageFile) Close() error { return p.f.Close() }
