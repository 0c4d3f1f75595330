package xenstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"reflect"
	"syscall"
	"testing"
)

// hdr spells a header out byte by byte, independently of the package's
// encoder: type, req_id, tx_id, len, little endian (xs_wire.h).
func hdr(typ, req, tx, n uint32) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint32(b[4:], req)
	binary.LittleEndian.PutUint32(b[8:], tx)
	binary.LittleEndian.PutUint32(b[12:], n)
	return b
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestMessageEncoding(t *testing.T) {
	tests := []struct {
		m    Message
		wire []byte
	}{
		// READ of /local/domain/0/name, request 7, no transaction.
		{Message{Type: OpRead, ReqID: 7, Payload: []byte("/local/domain/0/name\x00")},
			cat(hdr(2, 7, 0, 21), []byte("/local/domain/0/name\x00"))},
		// WRITE in transaction 3: the value is not nul-terminated.
		{Message{Type: OpWrite, ReqID: 1, TxID: 3, Payload: []byte("data/x\x00hello")},
			cat(hdr(11, 1, 3, 12), []byte("data/x\x00hello"))},
		{Message{Type: OpTransactionEnd, ReqID: 0xfffffffe, TxID: 9, Payload: []byte("T\x00")},
			cat(hdr(7, 0xfffffffe, 9, 2), []byte("T\x00"))},
		{Message{Type: OpDirectoryPart, Payload: nil}, hdr(22, 0, 0, 0)},
	}
	for i, tt := range tests {
		got, err := tt.m.MarshalBinary()
		if err != nil || !bytes.Equal(got, tt.wire) {
			t.Errorf("#%d: got %x, %v; want %x", i, got, err, tt.wire)
		}
		back, err := ReadMessage(bytes.NewReader(tt.wire))
		if err != nil {
			t.Fatalf("#%d: ReadMessage: %v", i, err)
		}
		want := tt.m
		if want.Payload == nil {
			want.Payload = []byte{}
		}
		if !reflect.DeepEqual(*back, want) {
			t.Errorf("#%d: read back %+v, want %+v", i, *back, want)
		}
	}
	if _, err := (&Message{Type: OpWrite, Payload: make([]byte, PayloadMax+1)}).MarshalBinary(); !errors.Is(err, ErrTooBig) {
		t.Errorf("oversized payload: %v, want ErrTooBig", err)
	}
}

func TestReadMessageValidation(t *testing.T) {
	tests := []struct {
		in   []byte
		want error
	}{
		{nil, io.EOF},
		{hdr(2, 1, 0, 3)[:10], io.ErrUnexpectedEOF},
		{cat(hdr(2, 1, 0, 3), []byte("ab")), io.ErrUnexpectedEOF},
		{hdr(2, 1, 0, PayloadMax+1), ErrProtocol},
		{hdr(2, 1, 0, 0xffffffff), ErrProtocol},
		{hdr(20, 1, 0, 0), ErrProtocol}, // XS_RESTRICT, removed
		{hdr(27, 1, 0, 0), ErrProtocol},
		{hdr(0xffff, 1, 0, 0), ErrProtocol}, // XS_INVALID
		{cat(hdr(16, 1, 0, PayloadMax), make([]byte, PayloadMax)), nil},
	}
	for i, tt := range tests {
		_, err := ReadMessage(bytes.NewReader(tt.in))
		if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
			t.Errorf("#%d: got %v, want %v", i, err, tt.want)
		}
	}
}

func TestStrings(t *testing.T) {
	tests := []struct {
		payload string
		want    []string
		ok      bool
	}{
		{"", nil, true},
		{"\x00", []string{""}, true},
		{"a\x00", []string{"a"}, true},
		{"a\x00bc\x00", []string{"a", "bc"}, true},
		{"a\x00\x00", []string{"a", ""}, true},
		{"a", nil, false},
		{"a\x00b", nil, false},
	}
	for i, tt := range tests {
		got, err := SplitStrings([]byte(tt.payload))
		if (err == nil) != tt.ok || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("#%d %q: got %q, %v", i, tt.payload, got, err)
			continue
		}
		if tt.ok && len(got) > 0 {
			back, err := Strings(got...)
			if err != nil || string(back) != tt.payload {
				t.Errorf("#%d: Strings gives %q, %v", i, back, err)
			}
		}
	}
	if _, err := Strings("a\x00b"); !errors.Is(err, ErrInvalid) {
		t.Errorf("string with a nul: %v", err)
	}
}

func TestReplyParsers(t *testing.T) {
	if err := parseOK([]byte("OK\x00")); err != nil {
		t.Errorf("OK: %v", err)
	}
	for _, bad := range []string{"OK", "ok\x00", "OK\x00\x00", ""} {
		if err := parseOK([]byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("ack %q: %v", bad, err)
		}
	}

	txTests := []struct {
		in   string
		want uint32
	}{{"1\x00", 1}, {"4294967295\x00", 0xffffffff}, {"0\x00", 0}, {"4294967296\x00", 0},
		{"-1\x00", 0}, {"12", 0}, {"1\x002\x00", 0}, {"\x00", 0}, {"x\x00", 0}}
	for i, tt := range txTests {
		got, err := parseTxID([]byte(tt.in))
		if got != tt.want || (err == nil) != (tt.want != 0) {
			t.Errorf("#%d tx %q: %d, %v", i, tt.in, got, err)
		}
	}

	evTests := []struct {
		in   string
		want Event
		ok   bool
	}{
		{"/local/domain/3/data\x00sf1\x00", Event{Path: "/local/domain/3/data", Token: "sf1"}, true},
		{"data/x\x00tok\x00extra\x00", Event{Path: "data/x", Token: "tok"}, true}, // Linux may append
		{"@releaseDomain\x00\x00", Event{Path: "@releaseDomain", Token: ""}, true},
		{"/a\x00", Event{}, false},
		{"/a\x00tok", Event{}, false},
		{"\x00tok\x00", Event{}, false},
	}
	for i, tt := range evTests {
		got, err := parseEvent([]byte(tt.in))
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("#%d event %q: %+v, %v", i, tt.in, got, err)
		}
	}

	dirTests := []struct {
		in   string
		want []string
		ok   bool
	}{
		{"", nil, true},
		{"vm\x00name\x00domid\x00", []string{"vm", "name", "domid"}, true},
		{"vm\x00\x00", nil, false},
		{"vm", nil, false},
	}
	for i, tt := range dirTests {
		got, err := parseDirectory([]byte(tt.in))
		if (err == nil) != tt.ok || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("#%d directory %q: %q, %v", i, tt.in, got, err)
		}
	}

	partTests := []struct {
		in       string
		gen      string
		children string
		last     bool
		ok       bool
	}{
		{"7\x00\x00", "7", "", true, true},                       // empty, or past the end
		{"7\x00a\x00bb\x00\x00", "7", "a\x00bb\x00", true, true}, // the whole list
		{"12\x00a\x00bb\x00", "12", "a\x00bb\x00", false, true},  // more to come
		{"\x00a\x00", "", "", false, false},
		{"7", "", "", false, false},
		{"7\x00a", "", "", false, false},
		{"7\x00\x00a\x00", "", "", false, false},
		{"7\x00a\x00\x00b\x00", "", "", false, false},
	}
	for i, tt := range partTests {
		got, err := parseDirectoryPart([]byte(tt.in))
		if (err == nil) != tt.ok {
			t.Errorf("#%d part %q: %v", i, tt.in, err)
			continue
		}
		if tt.ok && (got.generation != tt.gen || string(got.children) != tt.children || got.last != tt.last) {
			t.Errorf("#%d part %q: %+v", i, tt.in, got)
		}
	}
}

func TestErrorReplies(t *testing.T) {
	tests := []struct {
		code     string
		sentinel error
		errno    syscall.Errno
	}{
		{"ENOENT", ErrNotFound, syscall.ENOENT},
		{"EACCES", ErrPermission, syscall.EACCES},
		{"EPERM", ErrPermission, syscall.EPERM},
		{"EAGAIN", ErrAgain, syscall.EAGAIN},
		{"E2BIG", ErrTooBig, syscall.E2BIG},
		{"ENOSPC", ErrQuota, syscall.ENOSPC},
		{"EEXIST", ErrExists, syscall.EEXIST},
		{"EINVAL", ErrInvalid, syscall.EINVAL},
	}
	for i, tt := range tests {
		err := parseError(OpRead, "/x", []byte(tt.code+"\x00"))
		var xe *Error
		if !errors.As(err, &xe) || xe.Code != tt.code || xe.Op != OpRead || xe.Path != "/x" {
			t.Errorf("#%d %s: %v", i, tt.code, err)
		}
		if !errors.Is(err, tt.sentinel) || !errors.Is(err, tt.errno) {
			t.Errorf("#%d %s: %v does not match %v and %v", i, tt.code, err, tt.sentinel, tt.errno)
		}
		if tt.sentinel != ErrNotFound && errors.Is(err, ErrNotFound) {
			t.Errorf("#%d %s matches ErrNotFound", i, tt.code)
		}
	}
	if err := parseError(OpRead, "/x", []byte("ENOENT\x00")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("ENOENT is not fs.ErrNotExist: %v", err)
	}
	for _, bad := range []string{"EWHATEVER\x00", "ENOENT", "", "\x00", "ENOENT\x00x\x00"} {
		if err := parseError(OpRead, "", []byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("error payload %q: %v, want ErrProtocol", bad, err)
		}
	}
}

func TestPerms(t *testing.T) {
	tests := []struct {
		s    string
		want Perm
		ok   bool
	}{
		{"n0", Perm{0, AccessNone}, true},
		{"r5", Perm{5, AccessRead}, true},
		{"w32752", Perm{32752, AccessWrite}, true},
		{"b65535", Perm{65535, AccessBoth}, true},
		{"b65536", Perm{}, false},
		{"r", Perm{}, false},
		{"x1", Perm{}, false},
		{"r-1", Perm{}, false},
		{"r+1", Perm{}, false},
		{"r01", Perm{}, false},
		{"r0x1", Perm{}, false},
		{"r1 ", Perm{}, false},
	}
	for i, tt := range tests {
		got, err := ParsePerm(tt.s)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("#%d %q: %+v, %v", i, tt.s, got, err)
			continue
		}
		if tt.ok && got.String() != tt.s {
			t.Errorf("#%d: %+v prints as %q", i, got, got.String())
		}
	}
	got, err := parsePerms([]byte("n0\x00r7\x00"))
	if err != nil || !reflect.DeepEqual(got, []Perm{{0, AccessNone}, {7, AccessRead}}) {
		t.Errorf("perm list: %+v, %v", got, err)
	}
	for _, bad := range []string{"", "n0", "n0\x00q1\x00"} {
		if _, err := parsePerms([]byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("perm list %q: %v", bad, err)
		}
	}
}

func TestValidPath(t *testing.T) {
	long := "/" + string(bytes.Repeat([]byte("a"), AbsPathMax-1))
	tests := []struct {
		p  string
		ok bool
	}{
		{"/", true},
		{"/local/domain/3/data/snowflock", true},
		{"data/snowflock/req/12", true},
		{"device/vif-0/state_x@y", true},
		{long, true},
		{long + "a", false},
		{string(bytes.Repeat([]byte("a"), RelPathMax)), true},
		{string(bytes.Repeat([]byte("a"), RelPathMax+1)), false},
		{"", false},
		{"/local/", false},
		{"/local//domain", false},
		{"data/", false},
		{"/a.b", false},
		{"/a b", false},
		{"/a\x00b", false},
		{"/a\nb", false},
		{"/ä", false},
	}
	for i, tt := range tests {
		if err := ValidPath(tt.p); (err == nil) != tt.ok {
			t.Errorf("#%d %.40q: %v", i, tt.p, err)
		}
	}
	if validWatchPath(WatchReleaseDomain) != nil || validWatchPath("@other") != nil {
		t.Error("special watch paths")
	}
}
