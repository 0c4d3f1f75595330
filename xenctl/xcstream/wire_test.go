package xcstream

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

func splitTiny(t *testing.T) *Descriptor {
	t.Helper()
	d, err := Split(bytes.NewReader(tinyImage().bytes()), nil, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestUnmarshalRejects(t *testing.T) {
	good, err := splitTiny(t).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	body := good[:len(good)-32]
	with := func(off int, v byte) []byte { // a body byte changed, resealed
		b := bytes.Clone(body)
		b[off] = v
		return reseal(append(b, make([]byte, 32)...))
	}
	// The tiny image has no save file and libxl options 0, so the libxc
	// header's uvarints start at offset 12: version, options, guest type,
	// page shift.
	tests := []struct {
		name string
		in   []byte
		also error // a second error the result must wrap, if any
	}{
		{"empty", nil, nil},
		{"short", good[:20], nil},
		{"trailing byte", append(bytes.Clone(good), 0), nil},
		{"magic", with(0, 'X'), nil},
		{"version", with(8, 2), nil},
		{"truncated body", reseal(append(bytes.Clone(body[:len(body)-3]), make([]byte, 32)...)), nil},
		{"bytes after the records", reseal(append(bytes.Clone(body), make([]byte, 33)...)), nil},
		{"libxc version", with(12, 4), ErrBadHeader},
		{"libxc big endian", with(13, 1), ErrUnsupported},
		{"guest type", with(14, 7), ErrBadHeader},
		{"page shift", with(15, 13), ErrUnsupported},
	}
	for i := 0; i < len(good); i += 7 {
		flip := bytes.Clone(good)
		flip[i] ^= 0x40
		tests = append(tests, struct {
			name string
			in   []byte
			also error
		}{"flipped byte", flip, nil})
	}
	for i, tt := range tests {
		d := Descriptor{LibxlOptions: 99}
		err := d.UnmarshalBinary(tt.in)
		if !errors.Is(err, ErrBadDescriptor) || (tt.also != nil && !errors.Is(err, tt.also)) {
			t.Errorf("#%d %s: got %v, want ErrBadDescriptor %v", i, tt.name, err, tt.also)
		}
		if d.LibxlOptions != 99 {
			t.Errorf("#%d %s: a failed UnmarshalBinary changed the descriptor", i, tt.name)
		}
	}
}

// A descriptor that does not describe an image Split accepts is neither
// marshalled nor rebuilt.
func TestInvalidDescriptors(t *testing.T) {
	pageData := func(d *Descriptor) *Record {
		for i := range d.Records {
			if d.Records[i].Type == LibxcPageData && d.Records[i].Layer == LayerLibxc {
				return &d.Records[i]
			}
		}
		panic("no PAGE_DATA")
	}
	tests := []struct {
		name   string
		mutate func(d *Descriptor)
		want   error
	}{
		{"page twice", func(d *Descriptor) {
			p := pageData(d)
			p.Pages = append(p.Pages, PageRun{PFN: 1, Count: 1, Type: PageL1Tab})
		}, ErrDuplicatePage},
		{"overlapping runs", func(d *Descriptor) {
			p := pageData(d)
			p.Pages = append(p.Pages, PageRun{PFN: 0, Count: 5, Type: PageNoTab, Zero: true})
		}, ErrDuplicatePage},
		{"zero XTAB", func(d *Descriptor) { pageData(d).Pages[2].Zero = true }, ErrBadRecord},
		{"reserved page type", func(d *Descriptor) { pageData(d).Pages[2].Type = 6 }, ErrBadRecord},
		{"empty run", func(d *Descriptor) { pageData(d).Pages[0].Count = 0 }, ErrBadRecord},
		{"no runs", func(d *Descriptor) { pageData(d).Pages = nil }, ErrBadRecord},
		{"PFN beyond 52 bits", func(d *Descriptor) { pageData(d).Pages[2].PFN = PFNMask + 1 }, ErrBadRecord},
		{"run past 52 bits", func(d *Descriptor) { pageData(d).Pages[2] = PageRun{PFN: PFNMask, Count: 2, Type: PageXTab} }, ErrBadRecord},
		{"record too long", func(d *Descriptor) {
			pageData(d).Pages[2] = PageRun{PFN: 100, Count: RecordLengthMax / PageSize, Type: PageNoTab, Zero: true}
		}, ErrTooLarge},
		{"too many entries", func(d *Descriptor) {
			const perRecord = (RecordLengthMax - 8) / 8
			var recs []Record
			for i := uint64(0); i <= MaxPagesCeiling/perRecord; i++ {
				recs = append(recs, Record{Layer: LayerLibxc, Type: LibxcPageData,
					Pages: []PageRun{{PFN: 1000 + i*perRecord, Count: perRecord, Type: PageXTab}}})
			}
			d.Records = append(d.Records[:2:2], append(recs, d.Records[2:]...)...)
		}, ErrTooLarge},
		{"PAGE_DATA body", func(d *Descriptor) { pageData(d).Body = []byte{1} }, ErrBadRecord},
		{"pages in another record", func(d *Descriptor) { d.Records[0].Pages = []PageRun{{PFN: 9, Count: 1}} }, ErrBadRecord},
		{"no libxl END", func(d *Descriptor) { d.Records = d.Records[:len(d.Records)-1] }, ErrBadRecord},
		{"record after END", func(d *Descriptor) { d.Records = append(d.Records, Record{Layer: LayerLibxl, Type: 0x80000001}) }, ErrBadRecord},
		{"libxc record first", func(d *Descriptor) {
			d.Records = append([]Record{{Layer: LayerLibxc, Type: 0x80000001}}, d.Records...)
		}, ErrBadRecord},
		{"libxl record inside libxc", func(d *Descriptor) {
			d.Records = append(d.Records[:1:1], append([]Record{{Layer: LayerLibxl, Type: 0x80000001}}, d.Records[1:]...)...)
		}, ErrBadRecord},
		{"unknown layer", func(d *Descriptor) { d.Records[1].Layer = 3 }, ErrBadRecord},
		{"END body", func(d *Descriptor) { d.Records[len(d.Records)-1].Body = []byte{0} }, ErrBadRecord},
		{"libxc version", func(d *Descriptor) { d.Libxc.Version = 1 }, ErrBadHeader},
		{"libxl big endian", func(d *Descriptor) { d.LibxlOptions = 1 }, ErrUnsupported},
		{"save file", func(d *Descriptor) { d.SaveFile = []byte("Xen saved domain") }, ErrBadHeader},
		{"save file length", func(d *Descriptor) {
			d.SaveFile = append(append(bytes.Clone(xlMagic[:]), le32(0x01020304)...), make([]byte, 13)...)
		}, ErrBadHeader},
	}
	for i, tt := range tests {
		d := splitTiny(t)
		tt.mutate(d)
		if _, err := d.MarshalBinary(); !errors.Is(err, ErrBadDescriptor) || !errors.Is(err, tt.want) {
			t.Errorf("#%d %s: MarshalBinary: got %v, want %v", i, tt.name, err, tt.want)
		}
		if err := d.Rebuild(io.Discard, patterned{}); !errors.Is(err, tt.want) {
			t.Errorf("#%d %s: Rebuild: got %v, want %v", i, tt.name, err, tt.want)
		}
	}
}
