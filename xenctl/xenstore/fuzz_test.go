package xenstore

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

// FuzzReadMessage: whatever bytes xenstored (or a kernel, or a peer
// pretending to be one) sends, the decoder never panics, fails only with
// io.EOF, io.ErrUnexpectedEOF or ErrProtocol, and every message it accepts
// re-encodes to the bytes it was read from. Each accepted payload is also
// run through the reply parser of its type, which must either accept it
// consistently or fail with ErrProtocol.
//
//	go test -run '^$' -fuzz '^FuzzReadMessage$' -fuzztime=20s -fuzzminimizetime=200x ./xenctl/xenstore
func FuzzReadMessage(f *testing.F) {
	seeds := [][]byte{
		cat(hdr(2, 1, 0, 6), []byte("hello\x00")),
		cat(hdr(15, 0, 0, 9), []byte("/a\x00token\x00")),
		cat(hdr(16, 3, 0, 7), []byte("ENOENT\x00")),
		cat(hdr(1, 4, 0, 8), []byte("a\x00bb\x00c\x00\x00")[:8]),
		cat(hdr(22, 5, 0, 7), []byte("12\x00ab\x00\x00")),
		cat(hdr(3, 6, 0, 6), []byte("n0\x00r5\x00")),
		cat(hdr(6, 7, 0, 3), []byte("17\x00")),
		cat(hdr(11, 8, 2, 3), []byte("OK\x00"), hdr(15, 0, 0, 4), []byte("/\x00t\x00")),
		hdr(2, 1, 0, PayloadMax+1),
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for {
			before := len(in) - r.Len()
			m, err := ReadMessage(r)
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrProtocol) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			consumed := in[before : len(in)-r.Len()]
			back, err := m.MarshalBinary()
			if err != nil || !bytes.Equal(back, consumed) {
				t.Fatalf("re-encoding %x gave %x, %v", consumed, back, err)
			}
			checkPayload(t, m)
		}
	})
}

// checkPayload runs the reply parser of the message's type.
func checkPayload(t *testing.T, m *Message) {
	t.Helper()
	ok := func(err error) bool {
		if err != nil && !errors.Is(err, ErrProtocol) {
			t.Fatalf("%s %q: error %v is not ErrProtocol", m.Type, m.Payload, err)
		}
		return err == nil
	}
	p := m.Payload
	switch m.Type {
	case OpWatchEvent:
		if ev, err := parseEvent(p); ok(err) {
			if ev.Path == "" || strings.IndexByte(ev.Path, 0) >= 0 || strings.IndexByte(ev.Token, 0) >= 0 {
				t.Fatalf("event %+v from %q", ev, p)
			}
		}
	case OpError:
		if err := parseError(OpRead, "", p); !errors.Is(err, ErrProtocol) {
			var xe *Error
			if !errors.As(err, &xe) || string(p) != xe.Code+"\x00" {
				t.Fatalf("error reply %q gave %v", p, err)
			}
		}
	case OpDirectory:
		if names, err := parseDirectory(p); ok(err) && len(names) > 0 {
			back, err := Strings(names...)
			if err != nil || !bytes.Equal(back, p) {
				t.Fatalf("directory %q re-encodes as %q", p, back)
			}
		}
	case OpDirectoryPart:
		if part, err := parseDirectoryPart(p); ok(err) {
			if _, err := parseDirectory(part.children); err != nil {
				t.Fatalf("directory part %q: children %q do not parse: %v", p, part.children, err)
			}
		}
	case OpGetPerms:
		if perms, err := parsePerms(p); ok(err) {
			var s []string
			for _, x := range perms {
				s = append(s, x.String())
			}
			back, _ := Strings(s...)
			if !bytes.Equal(back, p) {
				t.Fatalf("perms %q re-encode as %q", p, back)
			}
		}
	case OpTransactionStart:
		if id, err := parseTxID(p); ok(err) && id == 0 {
			t.Fatalf("transaction 0 accepted from %q", p)
		}
	default:
		ok(parseOK(p))
	}
}
