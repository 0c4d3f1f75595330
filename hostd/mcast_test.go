package hostd

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/snowflock-go/snowflock/memserver"
)

func TestSessionFor(t *testing.T) {
	key := strings.Repeat("ab", 32)
	s, err := sessionFor(key, 7502)
	if err != nil {
		t.Fatal(err)
	}
	s2, _ := sessionFor(key, 7502)
	other, _ := sessionFor(strings.Repeat("cd", 32), 7502)
	if s != s2 || s.id == other.id || s.key == other.key {
		t.Errorf("sessions %+v %+v %+v", s, s2, other)
	}
	if a := s.group.Addr().As4(); a[0] != 239 || a[1] != 192 || s.group.Port() != 7502 || s.id&1 == 0 {
		t.Errorf("group %v, id %x", s.group, s.id)
	}
	for _, bad := range []string{"", "ab", strings.Repeat("zz", 32), strings.Repeat("ab", 33)} {
		if _, err := sessionFor(bad, 7502); err == nil {
			t.Errorf("key %q accepted", bad)
		}
	}
}

func testEnvelope() envelope {
	return envelope{memID: "snap-1-abc", capability: memserver.NewCapability(), blob: bytes.Repeat([]byte{7}, 1000)}
}

func testBatch() []memserver.Page {
	data := bytes.Repeat([]byte{9}, memserver.PageSize)
	return []memserver.Page{{Num: 3, Data: data}, {Num: 4, Zero: true}, {Num: 10, Data: data}}
}

func TestPayloadRoundTrip(t *testing.T) {
	e := testEnvelope()
	got, err := decodeEnvelope(encodeEnvelope(e))
	if err != nil || got.memID != e.memID || got.capability != e.capability || !bytes.Equal(got.blob, e.blob) {
		t.Fatalf("envelope: %+v %v", got, err)
	}
	pages, err := decodeBatch(encodeBatch(testBatch()), 16)
	if err != nil || len(pages) != 3 || pages[0].Num != 3 || !pages[1].Zero || pages[2].Num != 10 ||
		!bytes.Equal(pages[2].Data, testBatch()[2].Data) {
		t.Fatalf("batch: %+v %v", pages, err)
	}
}

func TestPayloadRefused(t *testing.T) {
	env := encodeEnvelope(testEnvelope())
	batch := encodeBatch(testBatch())
	unordered := encodeBatch([]memserver.Page{{Num: 4, Zero: true}, {Num: 3, Zero: true}})
	for _, tc := range []struct {
		name  string
		b     []byte
		batch bool
	}{
		{"envelope empty", nil, false},
		{"envelope magic", append([]byte("XXXX"), env[4:]...), false},
		{"envelope truncated", env[:20], false},
		{"envelope without descriptor", env[:6+10+32], false},
		{"envelope id length 0", append(append([]byte(nil), env[:4]...), 0, 0), false},
		{"batch empty", nil, true},
		{"batch magic", append([]byte("SFD1"), batch[4:]...), true},
		{"batch short", batch[:len(batch)-1], true},
		{"batch long", append(append([]byte(nil), batch...), 0), true},
		{"batch beyond snapshot", encodeBatch([]memserver.Page{{Num: 16, Zero: true}}), true},
		{"batch unordered", unordered, true},
		{"batch zero count", []byte("SFP1\x00\x00\x00\x00"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.batch {
				_, err = decodeBatch(tc.b, 16)
			} else {
				_, err = decodeEnvelope(tc.b)
			}
			if !errors.Is(err, errBadPayload) {
				t.Errorf("got %v, want errBadPayload", err)
			}
		})
	}
}

func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(encodeEnvelope(testEnvelope()))
	f.Add([]byte("SFD1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := decodeEnvelope(b)
		if err != nil {
			return
		}
		if again, err := decodeEnvelope(encodeEnvelope(e)); err != nil || again.memID != e.memID || !bytes.Equal(again.blob, e.blob) {
			t.Fatalf("re-encoding %+v: %v", e, err)
		}
	})
}

func FuzzDecodeBatch(f *testing.F) {
	f.Add(encodeBatch(testBatch()))
	f.Add([]byte("SFP1\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		pages, err := decodeBatch(b, 1<<20)
		if err != nil {
			return
		}
		in := make([]memserver.Page, len(pages))
		for i, p := range pages {
			if p.Num >= 1<<20 || (!p.Zero && len(p.Data) != memserver.PageSize) {
				t.Fatalf("page %+v", p)
			}
			in[i] = memserver.Page{Num: p.Num, Zero: p.Zero, Data: p.Data}
		}
		if !bytes.Equal(encodeBatch(in), b) {
			t.Fatal("a decoded batch does not re-encode to its input")
		}
	})
}
