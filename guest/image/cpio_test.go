package image

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestNewcWriter(t *testing.T) {
	entries := []cpioEntry{
		{Name: "bin", Mode: modeDir | 0o755},
		{Name: "bin/sh", Mode: modeSymlink | 0o777, Data: []byte("busybox")},
		{Name: "dev/console", Mode: modeCharDev | 0o600, RdevMajor: 5, RdevMinor: 1},
		{Name: "init", Mode: modeRegular | 0o755, Size: 5, Open: func() (io.ReadCloser, error) {
			return io.NopCloser(strings.NewReader("hello")), nil
		}},
		{Name: "empty", Mode: modeRegular | 0o644},
	}
	var b bytes.Buffer
	if err := writeArchive(&b, entries); err != nil {
		t.Fatal(err)
	}
	if b.Len()%512 != 0 {
		t.Errorf("archive of %d bytes is not padded to 512", b.Len())
	}
	// The first header, byte for byte: ino 1, mode 040755, nlink 2, name size 4.
	wantHdr := "070701" + "00000001" + "000041ed" + "00000000" + "00000000" + "00000002" + "00000000" +
		"00000000" + "00000000" + "00000000" + "00000000" + "00000000" + "00000004" + "00000000" + "bin\x00"
	if got := b.String()[:len(wantHdr)]; got != wantHdr {
		t.Errorf("first header\n got %q\nwant %q", got, wantHdr)
	}
	files, err := readNewc(b.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != len(entries) {
		t.Fatalf("read %d entries, want %d", len(files), len(entries))
	}
	for i, f := range files {
		e := entries[i]
		if f.Name != e.Name || f.Mode != e.Mode || f.Ino != uint32(i+1) || f.RdevMajor != e.RdevMajor || f.RdevMinor != e.RdevMinor || f.Mtime != 0 || f.UID != 0 {
			t.Errorf("#%d: got %+v, want %+v", i, f, e)
		}
	}
	if string(files[3].Data) != "hello" || string(files[1].Data) != "busybox" {
		t.Errorf("data: %q %q", files[3].Data, files[1].Data)
	}

	bad := []cpioEntry{
		{Name: "/abs", Mode: modeDir | 0o755},
		{Name: "a/../b", Mode: modeDir | 0o755},
		{Name: "../up", Mode: modeDir | 0o755},
		{Name: "", Mode: modeDir | 0o755},
		{Name: "x\x00y", Mode: modeDir | 0o755},
		{Name: "TRAILER!!!", Mode: modeDir | 0o755},
		{Name: "sock", Mode: 0o140755},
		{Name: "link", Mode: modeSymlink | 0o777},
		{Name: "short", Mode: modeRegular | 0o644, Size: 10, Open: func() (io.ReadCloser, error) {
			return io.NopCloser(strings.NewReader("abc")), nil
		}},
		{Name: "nocontent", Mode: modeRegular | 0o644, Size: 3},
	}
	for i, e := range bad {
		if err := newNewcWriter(io.Discard).WriteEntry(e); err == nil {
			t.Errorf("#%d %q: no error", i, e.Name)
		}
	}
}

// FuzzNewcRoundTrip: whatever entries the writer accepts, the strict reader
// reads back identically, with inodes numbered from 1 in order.
func FuzzNewcRoundTrip(f *testing.F) {
	f.Add("bin\nbin/sh\ninit\ndev/null", []byte("hello world"), uint64(0o1230))
	f.Add("a", []byte{}, uint64(1))
	f.Add("x/y/z\n/abs\n../up", []byte("data"), uint64(0xffff))
	f.Add("TRAILER!!!", []byte("x"), uint64(2))
	f.Fuzz(func(t *testing.T, names string, content []byte, kinds uint64) {
		var want []cpioEntry
		var b bytes.Buffer
		w := newNewcWriter(&b)
		for i, name := range strings.SplitN(names, "\n", 9) {
			if i == 8 {
				break
			}
			e := cpioEntry{Name: name}
			lo, hi := min(i, len(content)), min(i*7+3, len(content))
			switch (kinds >> (3 * i)) & 7 {
			case 0:
				e.Mode = modeDir | 0o755
			case 1:
				e.Mode, e.Data = modeSymlink|0o777, content[lo:hi]
			case 2:
				e.Mode, e.RdevMajor, e.RdevMinor = modeCharDev|0o600, uint32(kinds>>32), uint32(kinds>>40)
			case 3:
				e.Mode = modeFIFO | 0o644
			default:
				data := bytes.Clone(content[lo:hi])
				e.Mode, e.Size = modeRegular|uint32(kinds>>(3*i))&0o7777, int64(len(data))
				e.Open = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }
			}
			err := w.WriteEntry(e)
			nameErr := validCpioName(name)
			emptyLink := e.Mode&modeTypeMask == modeSymlink && len(e.Data) == 0
			if (err != nil) != (nameErr != nil || emptyLink) {
				t.Fatalf("entry %q mode %o: err %v, name check %v", name, e.Mode, err, nameErr)
			}
			if err != nil {
				continue // rejected before writing anything
			}
			if e.Open != nil {
				rc, _ := e.Open()
				e.Data, _ = io.ReadAll(rc)
			}
			want = append(want, e)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		got, err := readNewc(b.Bytes())
		if err != nil {
			t.Fatalf("reading back: %v", err)
		}
		if len(got) != len(want) {
			t.Fatalf("read %d entries, wrote %d", len(got), len(want))
		}
		for i, g := range got {
			e := want[i]
			if g.Name != e.Name || g.Mode != e.Mode || g.Ino != uint32(i+1) || g.RdevMajor != e.RdevMajor ||
				g.RdevMinor != e.RdevMinor || !bytes.Equal(g.Data, e.Data) && len(g.Data)+len(e.Data) > 0 {
				t.Fatalf("#%d: got %+v, want %+v", i, g, e)
			}
		}
		// The reader must reject any truncation before the trailer's end
		// (the zeros after it only pad to 512 bytes).
		trailerEnd := (bytes.LastIndex(b.Bytes(), []byte(newcMagic)) + newcHeaderSize + len(newcTrailer) + 1 + 3) &^ 3
		for _, n := range []int{0, 1, 109, 110, trailerEnd / 2, trailerEnd - 1} {
			if _, err := readNewc(b.Bytes()[:n]); err == nil {
				t.Fatalf("truncated to %d of %d bytes: no error", n, trailerEnd)
			}
		}
	})
}

func TestNewcWriterError(t *testing.T) {
	w := newNewcWriter(failWriter{})
	err := w.WriteEntry(cpioEntry{Name: "a", Mode: modeDir | 0o755})
	if err == nil || !errors.Is(err, errFail) {
		t.Fatalf("err = %v", err)
	}
	if err := w.Close(); !errors.Is(err, errFail) {
		t.Fatalf("Close after failure: %v", err)
	}
}

var errFail = errors.New("disk full")

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errFail }
