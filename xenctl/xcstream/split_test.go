package xcstream

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"slices"
	"testing"
)

func TestSplitRebuild(t *testing.T) {
	tests := []struct {
		name     string
		im       *image
		saveFile bool
		version  uint32
		guest    GuestType
		records  int // PAGE_DATA records
	}{
		{"hvm v3 xl save file", hvmImage(), true, 3, GuestHVM, 3},
		{"pv v2 libxl stream", pvImage(), false, 2, GuestPV, 2},
		{"tiny", tinyImage(), false, 3, GuestHVM, 1},
		{"big", bigImage(3000), false, 3, GuestHVM, 3},
	}
	for i, tt := range tests {
		in := tt.im.bytes()
		sink := memPages{}
		d, err := Split(bytes.NewReader(in), sink, Limits{})
		if err != nil {
			t.Fatalf("#%d %s: Split: %v", i, tt.name, err)
		}
		if !reflect.DeepEqual(sink, tt.im.stored) {
			t.Errorf("#%d %s: sink got %d pages, want %d", i, tt.name, len(sink), len(tt.im.stored))
		}
		info := d.Info()
		want := Info{
			SaveFile: tt.saveFile, LibxcVersion: tt.version, GuestType: tt.guest, XenMajor: 4, XenMinor: 17,
			PageEntries: uint64(len(tt.im.refs)), DataPages: tt.im.data, ZeroPages: tt.im.zero, MaxPFN: tt.im.maxPFN,
			LibxlRecords: info.LibxlRecords, LibxcRecords: info.LibxcRecords, StreamSize: uint64(len(in)),
		}
		if !reflect.DeepEqual(info, want) {
			t.Errorf("#%d %s: Info\n got %+v\nwant %+v", i, tt.name, info, want)
		}
		if info.StoredPages() != uint64(len(tt.im.stored)) || info.LibxcRecords[LibxcPageData] != tt.records ||
			info.LibxlRecords[LibxlLibxcContext] != 1 || info.LibxlRecords[LibxlEnd] != 1 || info.LibxcRecords[LibxcEnd] != 1 {
			t.Errorf("#%d %s: Info counts %+v", i, tt.name, info)
		}
		if got := slices.Collect(d.Pages()); !reflect.DeepEqual(got, tt.im.refs) {
			t.Errorf("#%d %s: Pages\n got %v\nwant %v", i, tt.name, got, tt.im.refs)
		}
		var withData, stored uint64
		for p := range d.Pages() {
			if p.HasData() {
				withData++
			}
			if p.Stored() {
				if _, ok := sink[p.PFN]; !ok {
					t.Errorf("#%d %s: stored PFN %#x never reached the sink", i, tt.name, p.PFN)
				}
				stored++
			}
		}
		if withData != tt.im.data || stored != uint64(len(sink)) {
			t.Errorf("#%d %s: %d entries with data, %d stored; want %d, %d", i, tt.name, withData, stored, tt.im.data, len(sink))
		}

		var out bytes.Buffer
		if err := d.Rebuild(&out, sink); err != nil {
			t.Fatalf("#%d %s: Rebuild: %v", i, tt.name, err)
		}
		if sum(out.Bytes()) != sum(in) {
			t.Fatalf("#%d %s: rebuilt sha256 %s, want %s (%d/%d bytes)", i, tt.name, sum(out.Bytes()), sum(in), out.Len(), len(in))
		}

		// From a PageRunSource: the same bytes, a call per run of stored
		// pages of at most runPages.
		runs := &runPagesSource{pages: sink}
		out.Reset()
		if err := d.Rebuild(&out, runs); err != nil || sum(out.Bytes()) != sum(in) {
			t.Fatalf("#%d %s: Rebuild from runs: %v", i, tt.name, err)
		}
		var fromRuns uint64
		for _, n := range runs.runs {
			if n > runPages {
				t.Errorf("#%d %s: a run of %d pages", i, tt.name, n)
			}
			fromRuns += n
		}
		if fromRuns != uint64(len(sink)) || (len(sink) > runPages && len(runs.runs) >= len(sink)) {
			t.Errorf("#%d %s: %d pages in %d runs, want %d pages in fewer runs", i, tt.name, fromRuns, len(runs.runs), len(sink))
		}

		b, err := d.MarshalBinary()
		if err != nil {
			t.Fatalf("#%d %s: MarshalBinary: %v", i, tt.name, err)
		}
		var back Descriptor
		if err := back.UnmarshalBinary(b); err != nil {
			t.Fatalf("#%d %s: UnmarshalBinary: %v", i, tt.name, err)
		}
		if !reflect.DeepEqual(&back, d) {
			t.Fatalf("#%d %s: descriptor changed in a marshal round trip", i, tt.name)
		}
		out.Reset()
		if err := back.Rebuild(&out, sink); err != nil || sum(out.Bytes()) != sum(in) {
			t.Fatalf("#%d %s: rebuilt from the unmarshalled descriptor: %v", i, tt.name, err)
		}
		t.Logf("%s: %d-byte image, %d stored pages, %d-byte descriptor", tt.name, len(in), len(sink), len(b))
	}
}

// A batched guest of contiguous pages costs a handful of bytes per batch.
func TestDescriptorCompact(t *testing.T) {
	im := bigImage(16 << 10) // 64 MiB
	d, err := Split(bytes.NewReader(im.bytes()), nil, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := d.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	// Every fifth page zero: 2 runs per 5 pages.
	if runs := 16 << 10 * 2 / 5; len(b) > 4000+runs*4+200 {
		t.Fatalf("descriptor of %d bytes for %d pages", len(b), 16<<10)
	}
}

// Split holds one page at a time: every payload reaches the sink soon
// after it was read, however large the image.
func TestSplitStreams(t *testing.T) {
	im := bigImage(4096)
	in := im.bytes()
	cr := &countingReader{r: bytes.NewReader(in)}
	var worst int
	sink := sinkFunc(func(pfn uint64, data []byte) error {
		worst = max(worst, int(cr.n)-im.pageAt[pfn])
		return nil
	})
	if _, err := Split(cr, sink, Limits{}); err != nil {
		t.Fatal(err)
	}
	if worst > 128<<10 {
		t.Fatalf("a payload reached the sink %d bytes after it started in a %d-byte image", worst, len(in))
	}
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

type sinkFunc func(pfn uint64, data []byte) error

func (f sinkFunc) PutPage(pfn uint64, data []byte) error { return f(pfn, data) }

// Every proper prefix of an image is truncated, never accepted and never
// a panic.
func TestSplitTruncated(t *testing.T) {
	for _, tt := range []struct {
		name string
		in   []byte
		all  bool
	}{{"tiny", tinyImage().bytes(), true}, {"pv", pvImage().bytes(), false}, {"hvm", hvmImage().bytes(), false}} {
		for n := 0; n < len(tt.in); n++ {
			// Every offset of the tiny image; of the others, those near
			// the ends and a stride through the page payloads.
			if !tt.all && n > 512 && n < len(tt.in)-4200 && n%61 != 0 {
				continue
			}
			_, err := Split(bytes.NewReader(tt.in[:n]), memPages{}, Limits{})
			if !errors.Is(err, ErrTruncated) {
				t.Fatalf("%s cut to %d of %d bytes: got %v, want ErrTruncated", tt.name, n, len(tt.in), err)
			}
		}
	}
}

func TestSplitRejects(t *testing.T) {
	page := func(pfn uint64) entry { return entry{pfn: pfn} }
	tests := []struct {
		name  string
		build func(im *image)
		want  error
	}{
		{"empty", func(im *image) {}, ErrTruncated},
		{"libxl ident", func(im *image) { im.raw([]byte("LibxlFmu\x00\x00\x00\x02\x00\x00\x00\x00")...) }, ErrBadHeader},
		{"libxl version", func(im *image) { im.raw([]byte("LibxlFmt\x00\x00\x00\x03\x00\x00\x00\x00")...) }, ErrBadHeader},
		{"libxl big endian", func(im *image) { im.libxlHeader(1); im.record(tLibxcContext, nil) }, ErrUnsupported},
		{"xl magic", func(im *image) {
			im.raw([]byte("Xen saved domain, xl format\n \x00 \x00")...)
			im.raw(make([]byte, 16)...)
		}, ErrBadHeader},
		{"xl big endian", func(im *image) {
			im.raw([]byte("Xen saved domain, xl format\n \x00 \r")...)
			im.raw(be32(0x01020304)...)
			im.raw(make([]byte, 12)...)
		}, ErrUnsupported},
		{"libxc marker", func(im *image) {
			im.libxlHeader(0)
			im.record(tLibxcContext, nil)
			im.raw(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe)
			im.raw(make([]byte, 32)...)
		}, ErrBadHeader},
		{"libxc id", func(im *image) {
			im.libxlHeader(0)
			im.record(tLibxcContext, nil)
			im.raw(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
			im.raw([]byte("XENG")...)
			im.raw(make([]byte, 28)...)
		}, ErrBadHeader},
		{"libxc version", func(im *image) { im.libxlHeader(0); im.record(tLibxcContext, nil); im.libxcHeaders(4, 2, 12) }, ErrBadHeader},
		{"libxc version 1", func(im *image) { im.libxlHeader(0); im.record(tLibxcContext, nil); im.libxcHeaders(1, 2, 12) }, ErrBadHeader},
		{"libxc big endian", func(im *image) {
			im.libxlHeader(0)
			im.record(tLibxcContext, nil)
			im.raw(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
			im.raw([]byte("XENF")...)
			im.raw(be32(3)...)
			im.raw(0, 1, 0, 0, 0, 0, 0, 0)
			im.raw(make([]byte, 16)...)
		}, ErrUnsupported},
		{"libxc reserved", func(im *image) {
			im.libxlHeader(0)
			im.record(tLibxcContext, nil)
			im.raw(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
			im.raw([]byte("XENF")...)
			im.raw(be32(3)...)
			im.raw(0, 0, 0, 0, 0, 0, 0, 1)
			im.raw(le32(2)...)
			im.raw(12, 0, 0, 0)
			im.raw(make([]byte, 8)...)
		}, ErrBadHeader},
		{"guest type", func(im *image) { im.libxlHeader(0); im.record(tLibxcContext, nil); im.libxcHeaders(3, 3, 12) }, ErrBadHeader},
		{"page shift", func(im *image) { im.libxlHeader(0); im.record(tLibxcContext, nil); im.libxcHeaders(3, 2, 21) }, ErrUnsupported},
		{"PAGE_DATA without entries", func(im *image) { im.start(); im.record(0x01, le64(0)) }, ErrBadRecord},
		{"PAGE_DATA reserved", func(im *image) {
			im.start()
			im.record(0x01, append(append(le32(1), le32(1)...), le64(0xF<<60|5)...))
		}, ErrBadRecord},
		{"PAGE_DATA short header", func(im *image) { im.start(); im.record(0x01, le32(1)) }, ErrBadRecord},
		{"PAGE_DATA short entries", func(im *image) {
			im.start()
			im.record(0x01, append(append(le32(2), le32(0)...), le64(0xF<<60|5)...))
		}, ErrBadRecord},
		{"PAGE_DATA extra payload", func(im *image) {
			im.start()
			im.record(0x01, append(append(append(le32(1), le32(0)...), le64(0xF<<60|5)...), make([]byte, 4096)...))
		}, ErrBadRecord},
		{"PAGE_DATA missing payload", func(im *image) {
			im.start()
			im.record(0x01, append(append(le32(1), le32(0)...), le64(5)...))
		}, ErrBadRecord},
		{"unknown page type", func(im *image) { im.start(); im.pageData(entry{5, 0x5, false}) }, ErrBadRecord},
		{"reserved PFN bits", func(im *image) { im.start(); im.pageData(entry{1 << 52, 0xF, false}) }, ErrBadRecord},
		{"padding", func(im *image) {
			im.start()
			im.raw(le32(tHVMContext)...)
			im.raw(le32(3)...)
			im.raw(1, 2, 3, 0, 0, 0, 0, 1)
		}, ErrBadRecord},
		{"page twice", func(im *image) { im.start(); im.pageData(page(7)); im.pageData(entry{8, 0xF, false}, page(7)) }, ErrDuplicatePage},
		{"page twice in a record", func(im *image) { im.start(); im.pageData(page(7), entry{7, 0x1, false}) }, ErrDuplicatePage},
		{"checkpoint", func(im *image) { im.start(); im.pageData(page(1)); im.record(tCheckpoint, nil) }, ErrUnsupported},
		{"libxl checkpoint end", func(im *image) { im.start(); im.record(tEnd, nil); im.record(tCheckpointE, nil) }, ErrUnsupported},
		{"trailing data", func(im *image) { im.start(); im.finish(); im.raw(0) }, ErrTrailingData},
		{"v3 pages before STATIC_DATA_END", func(im *image) {
			im.libxlHeader(0)
			im.record(tLibxcContext, nil)
			im.libxcHeaders(3, 2, 12)
			im.pageData(page(1))
		}, ErrBadRecord},
		{"two STATIC_DATA_END", func(im *image) { im.start(); im.record(tStaticEnd, nil) }, ErrBadRecord},
		{"libxl END first", func(im *image) { im.libxlHeader(0); im.record(tEnd, nil) }, ErrBadRecord},
		{"two LIBXC_CONTEXT", func(im *image) { im.start(); im.record(tEnd, nil); im.record(tLibxcContext, nil) }, ErrBadRecord},
		{"LIBXC_CONTEXT body", func(im *image) { im.libxlHeader(0); im.record(tLibxcContext, le32(0)) }, ErrBadRecord},
		{"libxc END body", func(im *image) { im.start(); im.record(tEnd, le64(0)) }, ErrBadRecord},
		{"STATIC_DATA_END body", func(im *image) {
			im.libxlHeader(0)
			im.record(tLibxcContext, nil)
			im.libxcHeaders(3, 2, 12)
			im.record(tStaticEnd, le64(0))
		}, ErrBadRecord},
		{"short emulator record", func(im *image) { im.start(); im.record(tEnd, nil); im.record(tEmuContext, le32(2)) }, ErrBadRecord},
		{"record length", func(im *image) { im.start(); im.raw(le32(tHVMContext)...); im.raw(le32(0xFFFFFFFF)...) }, ErrTooLarge},
		{"no libxl END", func(im *image) { im.start(); im.record(tEnd, nil) }, ErrTruncated},
	}
	for i, tt := range tests {
		im := newImage()
		tt.build(im)
		_, err := Split(bytes.NewReader(im.bytes()), memPages{}, Limits{})
		if !errors.Is(err, tt.want) {
			t.Errorf("#%d %s: got %v, want %v", i, tt.name, err, tt.want)
		}
	}
}

// What Xen tolerates, Split accepts.
func TestSplitAccepts(t *testing.T) {
	tests := []struct {
		name  string
		build func(im *image)
	}{
		{"repeated data-less entries", func(im *image) { im.pageData(entry{4, 0xF, false}, entry{4, 0xE, false}, entry{4, 0x0, false}) }},
		{"data after XTAB", func(im *image) { im.pageData(entry{4, 0xF, false}); im.pageData(entry{4, 0x0, true}) }},
		{"no pages", func(im *image) {}},
		{"empty optional record", func(im *image) { im.record(0x80000001, nil) }},
		{"unknown mandatory record", func(im *image) { im.record(0x13, blob(9, 1)) }},
		{"highest PFN", func(im *image) { im.pageData(entry{1<<52 - 1, 0x0, false}) }},
	}
	for i, tt := range tests {
		im := newImage()
		im.start()
		tt.build(im)
		im.finish()
		in := im.bytes()
		sink := memPages{}
		d, err := Split(bytes.NewReader(in), sink, Limits{})
		if err != nil {
			t.Errorf("#%d %s: %v", i, tt.name, err)
			continue
		}
		var out bytes.Buffer
		if err := d.Rebuild(&out, sink); err != nil || !bytes.Equal(out.Bytes(), in) {
			t.Errorf("#%d %s: rebuild: %v", i, tt.name, err)
		}
	}
}

func TestLimits(t *testing.T) {
	im := hvmImage()
	in := im.bytes()
	exact := Limits{MaxRecord: uint32(im.maxBody), MaxPages: uint64(len(im.refs)), MaxPFN: im.maxPFN, MaxMetadata: im.meta}
	if _, err := Split(bytes.NewReader(in), nil, exact); err != nil {
		t.Fatalf("limits that just fit: %v", err)
	}
	tests := []struct {
		name string
		lim  Limits
	}{
		{"record", Limits{MaxRecord: exact.MaxRecord - 1}},
		{"pages", Limits{MaxPages: exact.MaxPages - 1}},
		{"pfn", Limits{MaxPFN: exact.MaxPFN - 1}},
		{"metadata", Limits{MaxMetadata: exact.MaxMetadata - 1}},
		{"xl optional data", Limits{MaxRecord: 20}},
	}
	for i, tt := range tests {
		if _, err := Split(bytes.NewReader(in), nil, tt.lim); !errors.Is(err, ErrTooLarge) {
			t.Errorf("#%d %s: got %v, want ErrTooLarge", i, tt.name, err)
		}
	}
}

var errPage = errors.New("page store down")

func TestSinkAndSourceErrors(t *testing.T) {
	in := hvmImage().bytes()
	calls := 0
	sink := sinkFunc(func(uint64, []byte) error {
		if calls++; calls == 3 {
			return errPage
		}
		return nil
	})
	if _, err := Split(bytes.NewReader(in), sink, Limits{}); !errors.Is(err, errPage) || calls != 3 {
		t.Fatalf("sink error: got %v after %d calls", err, calls)
	}

	pages := memPages{}
	d, err := Split(bytes.NewReader(in), pages, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Rebuild(io.Discard, failingSource{}); !errors.Is(err, errPage) {
		t.Fatalf("source error: got %v", err)
	}
	if err := d.Rebuild(io.Discard, nil); err == nil {
		t.Fatal("rebuilt stored pages without a source")
	}
	if err := d.Rebuild(failingWriter{}, pages); !errors.Is(err, errPage) {
		t.Fatalf("writer error: got %v", err)
	}

	// Zero pages need no source.
	zim := newImage()
	zim.start()
	zim.pageData(entry{1, 0, true}, entry{2, 0, true}, entry{3, 0xF, false})
	zim.finish()
	zd, err := Split(bytes.NewReader(zim.bytes()), nil, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := zd.Rebuild(&out, nil); err != nil || !bytes.Equal(out.Bytes(), zim.bytes()) {
		t.Fatalf("zero pages without a source: %v", err)
	}
}

type failingSource struct{}

func (failingSource) Page(uint64, []byte) error { return errPage }

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errPage }

func BenchmarkSplit(b *testing.B) {
	in := bigImage(4096).bytes()
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		if _, err := Split(bytes.NewReader(in), sinkFunc(func(uint64, []byte) error { return nil }), Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRebuild(b *testing.B) {
	in := bigImage(4096).bytes()
	d, err := Split(bytes.NewReader(in), nil, Limits{})
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(in)))
	for b.Loop() {
		if err := d.Rebuild(io.Discard, patterned{}); err != nil {
			b.Fatal(err)
		}
	}
}
