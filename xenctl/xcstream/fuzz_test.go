package xcstream

import (
	"bytes"
	"errors"
	"reflect"
	"slices"
	"testing"
)

// FuzzSplit: whatever bytes arrive, Split never panics, fails with one of
// its sentinel errors, and what it accepts Rebuild reproduces exactly, both
// from the descriptor and from its marshalled form.
//
// Run it with a bounded minimization, e.g.
//
//	go test -run '^$' -fuzz '^FuzzSplit$' -fuzztime=20s -fuzzminimizetime=200x ./xenctl/xcstream
//
// Go's minimizer tries a number of candidates quadratic in the length of
// each input that finds new coverage, and any image with a page in it is
// over 4 KiB: with the default (60 s per input) the fuzzer spends its time
// minimizing and reports 0 execs/sec.
func FuzzSplit(f *testing.F) {
	for _, seed := range fuzzSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		sink := memPages{}
		d, err := Split(bytes.NewReader(in), sink, Limits{})
		if err != nil {
			for _, s := range sentinels {
				if errors.Is(err, s) {
					return
				}
			}
			t.Fatalf("error %v wraps no sentinel", err)
		}
		var out bytes.Buffer
		if err := d.Rebuild(&out, sink); err != nil {
			t.Fatalf("Rebuild of an accepted image: %v", err)
		}
		if !bytes.Equal(out.Bytes(), in) {
			t.Fatalf("rebuilt %d bytes differ from the %d accepted", out.Len(), len(in))
		}
		if d.Info().StreamSize != uint64(len(in)) {
			t.Fatalf("Info.StreamSize %d, image %d bytes", d.Info().StreamSize, len(in))
		}
		b, err := d.MarshalBinary()
		if err != nil {
			t.Fatalf("accepted image's descriptor does not marshal: %v", err)
		}
		var back Descriptor
		if err := back.UnmarshalBinary(b); err != nil {
			t.Fatalf("marshalled descriptor does not unmarshal: %v", err)
		}
		if !reflect.DeepEqual(&back, d) {
			t.Fatal("descriptor changed in a marshal round trip")
		}
	})
}

// FuzzDescriptor: UnmarshalBinary never panics and fails only with
// ErrBadDescriptor. Each input is tried as is and resealed (its last 32
// bytes replaced by the right checksum) so that mutations reach the decoder
// behind the checksum. What it accepts re-marshals to an equal descriptor,
// and its rebuilt image (when small) is one Split accepts and that rebuilds
// to the same bytes.
func FuzzDescriptor(f *testing.F) {
	for _, seed := range fuzzSeeds() {
		d, err := Split(bytes.NewReader(seed), nil, Limits{})
		if err != nil {
			continue // the broken seeds of FuzzSplit
		}
		b, err := d.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte("SFXCDSC\n\x01\x00"))
	f.Fuzz(func(t *testing.T, in []byte) {
		checkDescriptor(t, in)
		checkDescriptor(t, reseal(in))
	})
}

func checkDescriptor(t *testing.T, in []byte) {
	var d Descriptor
	if err := d.UnmarshalBinary(in); err != nil {
		if !errors.Is(err, ErrBadDescriptor) {
			t.Fatalf("error %v does not wrap ErrBadDescriptor", err)
		}
		return
	}
	b, err := d.MarshalBinary()
	if err != nil {
		t.Fatalf("accepted descriptor does not marshal: %v", err)
	}
	var back Descriptor
	if err := back.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(back, d) {
		t.Fatalf("accepted descriptor changed in a marshal round trip: %v", err)
	}
	info := d.Info()
	if info.StreamSize > 256<<10 {
		return
	}
	var img bytes.Buffer
	if err := d.Rebuild(&img, patterned{}); err != nil {
		t.Fatalf("Rebuild of an accepted descriptor: %v", err)
	}
	if uint64(img.Len()) != info.StreamSize {
		t.Fatalf("rebuilt %d bytes, Info.StreamSize %d", img.Len(), info.StreamSize)
	}
	pages := memPages{}
	again, err := Split(bytes.NewReader(img.Bytes()), pages, Limits{})
	if err != nil {
		t.Fatalf("Split refuses a rebuilt image: %v", err)
	}
	if !slices.Equal(slices.Collect(again.Pages()), slices.Collect(d.Pages())) {
		t.Fatal("re-split image has other page entries")
	}
	var img2 bytes.Buffer
	if err := again.Rebuild(&img2, pages); err != nil || !bytes.Equal(img2.Bytes(), img.Bytes()) {
		t.Fatalf("re-split image does not rebuild to the same bytes: %v", err)
	}
}

// fuzzSeeds are small images with every kind of header, record and entry.
// They are small because the fuzzer minimizes every input that finds new
// coverage, at a cost that grows with the square of its length; pages are
// what make an image long, so there are few.
func fuzzSeeds() [][]byte {
	hvm := newImage()
	hvm.xlHeader(`{"c_info":{"type":"hvm"}}`)
	hvm.libxlHeader(0)
	hvm.record(tLibxcContext, nil)
	hvm.libxcHeaders(3, 2, 12)
	hvm.record(tCPUIDPolicy, blob(24, 1))
	hvm.record(tStaticEnd, nil)
	hvm.pageData(entry{1, 0x0, false}, entry{2, 0xF, false}, entry{3, 0xE, false}, entry{4, 0xD, false}, entry{3, 0xF, false})
	hvm.pageData(entry{9, 0x0, true})
	hvm.record(tTSCInfo, blob(24, 2))
	hvm.record(tHVMParams, append(append(le32(1), le32(0)...), blob(16, 3)...))
	hvm.record(tHVMContext, blob(37, 4))
	hvm.record(0x80000042, blob(5, 5))
	hvm.record(tEnd, nil)
	hvm.record(tEmuXenstore, emulator(2, 0, []byte("a\x00b\x00")))
	hvm.record(tEmuContext, emulator(2, 0, blob(11, 6)))
	hvm.record(tEnd, nil)

	pv := newImage()
	pv.libxlHeader(0)
	pv.record(tLibxcContext, nil)
	pv.libxcHeaders(2, 1, 12)
	pv.record(tPVInfo, []byte{8, 4, 0, 0, 0, 0, 0, 0})
	pv.record(tP2MFrames, append(append(le32(0), le32(511)...), le64(0x30)...))
	pv.pageData(entry{0x10, 0xC, false}, entry{0x11, 0x9, true}, entry{0x12, 0xF, false})
	pv.record(tVCPUBasic, append(le64(0), blob(20, 7)...))
	pv.record(tVCPUExt, nil)
	pv.finish()

	tiny := tinyImage().bytes()
	return [][]byte{hvm.bytes(), pv.bytes(), tiny, tiny[:len(tiny)/2], append(bytes.Clone(tiny), 0)}
}
