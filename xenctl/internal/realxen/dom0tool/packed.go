package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/snowflock-go/snowflock/xenctl"
	"github.com/snowflock-go/snowflock/xenctl/xcstream"
)

// PackedFile holds a capture's stored pages back to back, in the
// descriptor's order. A capture's PageFile is sparse and as long as the
// guest's highest frame, which for PVH lies just below 4 GiB whatever its
// memory (the special pages), so it is carried between hosts packed (pack)
// and made a PageFile again there (unpack).
const PackedFile = "pages.packed"

// PackResult says what pack wrote.
type PackResult struct {
	Pages int64         `json:"pages"`
	Bytes int64         `json:"bytes"`
	Took  time.Duration `json:"took"`
}

func (t *tool) pack(ctx context.Context) (any, error) {
	begin := time.Now()
	desc, src, err := xenctl.OpenCapture(t.dir)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	out, err := os.OpenFile(filepath.Join(t.dir, PackedFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	page := make([]byte, xcstream.PageSize)
	var n int64
	for p := range desc.Pages() {
		if !p.Stored() {
			continue
		}
		if err := src.Page(p.PFN, page); err != nil {
			out.Close()
			return nil, err
		}
		if _, err := out.Write(page); err != nil {
			out.Close()
			return nil, err
		}
		n++
	}
	if err := out.Close(); err != nil {
		return nil, err
	}
	return PackResult{Pages: n, Bytes: n * xcstream.PageSize, Took: time.Since(begin)}, nil
}

func (t *tool) unpack(ctx context.Context) (any, error) {
	begin := time.Now()
	b, err := os.ReadFile(filepath.Join(t.dir, xenctl.DescriptorFile))
	if err != nil {
		return nil, err
	}
	var desc xcstream.Descriptor
	if err := desc.UnmarshalBinary(b); err != nil {
		return nil, err
	}
	in, err := os.Open(filepath.Join(t.dir, PackedFile))
	if err != nil {
		return nil, err
	}
	defer in.Close()
	out, err := xenctl.CreatePageFile(filepath.Join(t.dir, xenctl.PagesFile))
	if err != nil {
		return nil, err
	}
	r := bufio.NewReaderSize(in, 1<<20)
	page := make([]byte, xcstream.PageSize)
	var n int64
	for p := range desc.Pages() {
		if !p.Stored() {
			continue
		}
		if _, err := io.ReadFull(r, page); err != nil {
			out.Close()
			return nil, fmt.Errorf("%s: page %d: %w", PackedFile, n, err)
		}
		if err := out.PutPage(p.PFN, page); err != nil {
			out.Close()
			return nil, err
		}
		n++
	}
	if err := out.Close(); err != nil {
		return nil, err
	}
	return PackResult{Pages: n, Bytes: n * xcstream.PageSize, Took: time.Since(begin)}, nil
}
