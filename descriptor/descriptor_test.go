package descriptor

import (
	"bytes"
	"errors"
	"reflect"
	"slices"
	"testing"
)

func sample() *Descriptor {
	return &Descriptor{
		Meta: Meta{Driver: "qemu", ParentVM: 7, Ticket: 3, Machine: "pc", MemMB: 256, VCPUs: 1,
			Kernel: "/cache/vmlinux", Initrd: "/cache/init.cpio", Append: "console=ttyS0", PageSize: PageSize},
		Pages:       []Range{{0, 160}, {256, 1}, {1000, 3000}, {65535, 1}},
		DeviceState: bytes.Repeat([]byte("QEVM"), 1000),
	}
}

func TestRoundTrip(t *testing.T) {
	d := sample()
	b, err := d.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Meta, d.Meta) || !bytes.Equal(got.DeviceState, d.DeviceState) || len(got.Pages) != len(d.Pages) {
		t.Fatalf("round trip: %+v", got.Meta)
	}
	for i := range d.Pages {
		if got.Pages[i] != d.Pages[i] {
			t.Fatalf("range %d: %v, want %v", i, got.Pages[i], d.Pages[i])
		}
	}
	if got.DataPages() != 160+1+3000+1 || got.TotalPages() != 65536 {
		t.Fatalf("pages: %d of %d", got.DataPages(), got.TotalPages())
	}
	for _, tt := range []struct {
		p    uint64
		want bool
	}{{0, true}, {159, true}, {160, false}, {256, true}, {257, false}, {999, false}, {1000, true}, {3999, true}, {4000, false}, {65535, true}} {
		if got.HasData(tt.p) != tt.want {
			t.Errorf("HasData(%d) = %v", tt.p, !tt.want)
		}
	}
	if Digest(b) == "" || len(Digest(b)) != 64 {
		t.Fatal("digest")
	}
	t.Logf("descriptor of a 256 MiB VM with %d-byte device state: %d bytes", len(d.DeviceState), len(b))
}

func TestParseRejects(t *testing.T) {
	good, _ := sample().MarshalBinary()
	reseal := func(body []byte) []byte { // a valid checksum over a broken body
		out := append([]byte(nil), body...)
		sum := sha256Sum(out)
		return append(out, sum...)
	}
	body := good[:len(good)-32]
	flip := append([]byte(nil), good...)
	flip[20] ^= 1
	badVersion := append([]byte(nil), body...)
	badVersion[8] = 9
	tests := []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"short", good[:10]},
		{"checksum", flip},
		{"version", reseal(badVersion)},
		{"trailing", reseal(append(append([]byte(nil), body...), 0))},
		{"truncated section", reseal(body[:len(body)-5])},
		{"too large", make([]byte, MaxSize+1)},
	}
	for i, tt := range tests {
		if _, err := Parse(tt.in); !errors.Is(err, ErrInvalid) {
			t.Errorf("#%d %s: got %v, want ErrInvalid", i, tt.name, err)
		}
	}
	bad := []func(d *Descriptor){
		func(d *Descriptor) { d.Meta.Driver = "vmware" },
		func(d *Descriptor) { d.Meta.MemMB = 0 },
		func(d *Descriptor) { d.Meta.PageSize = 8192 },
		func(d *Descriptor) { d.Meta.ParentVM = 0 },
		func(d *Descriptor) { d.DeviceState = nil },
		func(d *Descriptor) { d.Pages = []Range{{10, 5}, {12, 1}} },       // overlap
		func(d *Descriptor) { d.Pages = []Range{{10, 5}, {15, 1}} },       // adjacent: not normalized
		func(d *Descriptor) { d.Pages = []Range{{65530, 10}} },            // beyond RAM
		func(d *Descriptor) { d.Pages = []Range{{1, 0}} },                 // empty range
		func(d *Descriptor) { d.Pages = []Range{{1 << 63, 1 << 63}} },     // overflow
		func(d *Descriptor) { d.Meta.Machine = string(make([]byte, 65)) }, // too long
	}
	for i, f := range bad {
		d := sample()
		f(d)
		if _, err := d.MarshalBinary(); !errors.Is(err, ErrInvalid) {
			t.Errorf("bad descriptor #%d marshalled: %v", i, err)
		}
	}
}

func TestNormalize(t *testing.T) {
	got := Normalize([]Range{{10, 5}, {0, 2}, {12, 10}, {22, 1}, {30, 0}, {2, 1}})
	want := []Range{{0, 3}, {10, 13}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

// FuzzParse: whatever bytes arrive, Parse never panics, and what it accepts
// is valid and re-encodes to the same bytes.
func FuzzParse(f *testing.F) {
	good, _ := sample().MarshalBinary()
	f.Add(good)
	f.Add(good[:len(good)-1])
	f.Add([]byte("SFDESC\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if err := d.Validate(); err != nil {
			t.Fatalf("accepted an invalid descriptor: %v", err)
		}
		again, err := d.MarshalBinary()
		if err != nil {
			t.Fatalf("accepted descriptor does not re-encode: %v", err)
		}
		if _, err := Parse(again); err != nil {
			t.Fatalf("re-encoded descriptor does not parse: %v", err)
		}
	})
}

func TestOverlay(t *testing.T) {
	for _, tc := range []struct {
		name            string
		base, own, zero []Range
		want            []Range
		bad             bool
	}{
		{"empty", nil, nil, nil, nil, false},
		{"base only", []Range{{0, 2}, {5, 1}}, nil, nil, []Range{{0, 2}, {5, 1}}, false},
		{"own joins base", []Range{{0, 2}}, []Range{{2, 3}}, nil, []Range{{0, 5}}, false},
		{"zero splits base", []Range{{0, 10}}, nil, []Range{{3, 2}}, []Range{{0, 3}, {5, 5}}, false},
		{"own over zero hole", nil, []Range{{7, 1}, {9, 1}}, []Range{{8, 1}}, []Range{{7, 1}, {9, 1}}, false},
		{"all zeroed", []Range{{0, 16}}, nil, []Range{{0, 16}}, nil, false},
		{"last page", nil, []Range{{15, 1}}, nil, []Range{{15, 1}}, false},
		{"past the end", nil, []Range{{15, 2}}, nil, nil, true},
		{"overflow", []Range{{1<<64 - 1, 2}}, nil, nil, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Overlay(tc.base, tc.own, tc.zero, 16)
			if (err != nil) != tc.bad || !slices.Equal(got, tc.want) {
				t.Errorf("got %v, %v; want %v (error: %v)", got, err, tc.want, tc.bad)
			}
		})
	}
}
