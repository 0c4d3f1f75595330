package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	"github.com/xi2/xz"
)

// A .deb is an ar archive: debian-binary ("2.0\n"), control.tar.*, then
// data.tar.* holding the files (deb(5)). The ar format is a global magic and,
// per member, a 60-byte text header followed by the data padded to an even
// length.

const (
	arMagic      = "!<arch>\n"
	arHeaderSize = 60
	// arMaxSize bounds a member's declared size, so that a corrupt header
	// fails at once instead of after reading gigabytes.
	arMaxSize = 1 << 36
)

// arHeader describes one ar member.
type arHeader struct {
	Name string
	Size int64
}

// arReader reads the members of an ar archive in order, like tar.Reader.
type arReader struct {
	r       io.Reader
	remain  int64 // unread bytes of the current member
	pad     int64 // padding after the current member
	started bool
}

func newArReader(r io.Reader) *arReader { return &arReader{r: r} }

// Next skips the rest of the current member and returns the next header;
// io.EOF after the last member.
func (a *arReader) Next() (*arHeader, error) {
	if !a.started {
		a.started = true
		var magic [len(arMagic)]byte
		if _, err := io.ReadFull(a.r, magic[:]); err != nil {
			return nil, fmt.Errorf("%w: ar magic: %v", ErrCorruptDeb, noEOF(err))
		}
		if string(magic[:]) != arMagic {
			return nil, fmt.Errorf("%w: not an ar archive", ErrCorruptDeb)
		}
	}
	if _, err := io.CopyN(io.Discard, a.r, a.remain); err != nil {
		return nil, fmt.Errorf("%w: ar member: %v", ErrCorruptDeb, noEOF(err))
	}
	if a.pad > 0 {
		// Some writers omit the padding byte after the last member.
		if _, err := io.CopyN(io.Discard, a.r, a.pad); err == io.EOF {
			a.remain, a.pad = 0, 0
			return nil, io.EOF
		} else if err != nil {
			return nil, fmt.Errorf("%w: ar padding: %v", ErrCorruptDeb, err)
		}
	}
	a.remain, a.pad = 0, 0
	var hdr [arHeaderSize]byte
	n, err := io.ReadFull(a.r, hdr[:])
	if n == 0 && err == io.EOF {
		return nil, io.EOF
	}
	if err != nil {
		return nil, fmt.Errorf("%w: ar header: %v", ErrCorruptDeb, noEOF(err))
	}
	h, err := parseArHeader(hdr[:])
	if err != nil {
		return nil, err
	}
	a.remain, a.pad = h.Size, h.Size&1
	return h, nil
}

// Read reads the current member's data.
func (a *arReader) Read(p []byte) (int, error) {
	if a.remain <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > a.remain {
		p = p[:a.remain]
	}
	n, err := a.r.Read(p)
	a.remain -= int64(n)
	if err == io.EOF {
		if a.remain > 0 {
			return n, fmt.Errorf("%w: ar member truncated", ErrCorruptDeb)
		}
		err = nil // the member ended exactly; the next Read says EOF
	}
	return n, err
}

// parseArHeader decodes name[16] mtime[12] uid[6] gid[6] mode[8] size[10] "`\n".
func parseArHeader(b []byte) (*arHeader, error) {
	if len(b) != arHeaderSize || string(b[58:60]) != "`\n" {
		return nil, fmt.Errorf("%w: bad ar header terminator", ErrCorruptDeb)
	}
	name := strings.TrimRight(string(b[0:16]), " ")
	name = strings.TrimSuffix(name, "/") // GNU ar ends names with '/'
	if name == "" || strings.ContainsAny(name, "/\x00") || !isPrintable(name) {
		return nil, fmt.Errorf("%w: bad ar member name %q", ErrCorruptDeb, b[0:16])
	}
	sizeField := strings.TrimRight(string(b[48:58]), " ")
	size, err := strconv.ParseInt(sizeField, 10, 64)
	if err != nil || size < 0 || size > arMaxSize || sizeField[0] == '+' || sizeField[0] == '-' {
		return nil, fmt.Errorf("%w: bad ar member size %q", ErrCorruptDeb, b[48:58])
	}
	return &arHeader{Name: name, Size: size}, nil
}

func isPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// noEOF turns the EOF of a truncated structure into ErrUnexpectedEOF.
func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// openDebData returns a reader of the uncompressed data.tar of the .deb read
// from r, after checking the debian-binary member.
func openDebData(r io.Reader) (io.Reader, error) {
	ar := newArReader(r)
	first := true
	for {
		h, err := ar.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("%w: no data.tar member", ErrCorruptDeb)
		}
		if err != nil {
			return nil, err
		}
		if first {
			first = false
			if h.Name != "debian-binary" {
				return nil, fmt.Errorf("%w: first member is %q, not debian-binary", ErrCorruptDeb, h.Name)
			}
			v, err := io.ReadAll(io.LimitReader(ar, 64))
			if err != nil {
				return nil, fmt.Errorf("%w: debian-binary: %v", ErrCorruptDeb, err)
			}
			if !bytes.HasPrefix(v, []byte("2.")) {
				return nil, fmt.Errorf("%w: unsupported format version %q", ErrCorruptDeb, v)
			}
			continue
		}
		comp, ok := strings.CutPrefix(h.Name, "data.tar")
		if !ok {
			continue // control.tar.*, and members deb(5) reserves ("_...")
		}
		return decompressor(ar, strings.TrimPrefix(comp, "."), h.Name)
	}
}

// decompressor wraps r in a reader for the named compression ("" for none).
func decompressor(r io.Reader, comp, what string) (io.Reader, error) {
	switch comp {
	case "":
		return r, nil
	case "xz":
		zr, err := xz.NewReader(r, 0)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrCorruptDeb, what, err)
		}
		return zr, nil
	case "gz":
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrCorruptDeb, what, err)
		}
		return zr, nil
	default:
		return nil, fmt.Errorf("%w: %s (%s)", ErrUnsupportedCompression, what, comp)
	}
}

// debEntry is one file of a package's data.tar, named without "./".
type debEntry struct {
	Name   string
	Header *tar.Header
	Data   io.Reader
}

// errStopWalk ends walkDeb early without error.
var errStopWalk = errors.New("stop walking")

// walkDeb calls fn for each entry of the .deb's data.tar in archive order.
// Decoding errors, also those met while fn reads Data, wrap ErrCorruptDeb;
// fn's own errors are returned as they are; errStopWalk ends the walk.
func walkDeb(ctx context.Context, debPath string, fn func(debEntry) error) error {
	f, err := os.Open(debPath)
	if err != nil {
		return err
	}
	defer f.Close()
	data, err := openDebData(f)
	if err != nil {
		return fmt.Errorf("%s: %w", debPath, err)
	}
	tr := tar.NewReader(data)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if err == io.EOF {
			// Read the compressed stream to its end, so that the decoder
			// checks its index and trailer, which tar never reaches.
			if _, err := io.Copy(io.Discard, data); err != nil {
				return fmt.Errorf("%w: %s: after data.tar: %v", ErrCorruptDeb, debPath, err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %s: data.tar: %v", ErrCorruptDeb, debPath, err)
		}
		name := path.Clean(strings.TrimPrefix(h.Name, "./"))
		if name == "." || strings.HasPrefix(name, "../") || name == ".." || path.IsAbs(name) {
			continue // the root, or names no package should carry: never extracted
		}
		err = fn(debEntry{Name: name, Header: h, Data: corruptOnError{tr}})
		if err == errStopWalk {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// corruptOnError marks read errors as ErrCorruptDeb: they come from the
// compressed stream or tar framing, not from the consumer.
type corruptOnError struct{ r io.Reader }

func (c corruptOnError) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err != nil && err != io.EOF {
		err = fmt.Errorf("%w: %v", ErrCorruptDeb, err)
	}
	return n, err
}

// isRegularEntry reports whether a package entry is a regular file.
func isRegularEntry(e debEntry) bool {
	return e.Header.Typeflag == tar.TypeReg || e.Header.Typeflag == 0 // old tars write NUL
}
