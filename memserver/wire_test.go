package memserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"
)

// body strips a frame's length and type.
func body(frame []byte) []byte { return frame[lengthLen+1:] }

var testCapability = Capability{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32}

func dataPage(b byte) []byte { return bytes.Repeat([]byte{b}, PageSize) }

func TestReadFrame(t *testing.T) {
	frame := func(n uint32, rest ...byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, n), rest...)
	}
	tests := []struct {
		in      []byte
		limit   uint32
		typ     byte
		body    string
		wantErr error
	}{
		{in: frame(3, 7, 'h', 'i'), limit: 3, typ: 7, body: "hi"},
		{in: frame(1, 9), limit: 1, typ: 9, body: ""},
		{in: frame(0), limit: 10, wantErr: ErrProtocol},
		{in: frame(11, 1), limit: 10, wantErr: ErrProtocol},
		{in: frame(0xffffffff), limit: 10, wantErr: ErrProtocol},
		{in: nil, limit: 10, wantErr: io.EOF},
		{in: []byte{0, 0}, limit: 10, wantErr: io.ErrUnexpectedEOF},
		{in: frame(5, 1, 2), limit: 10, wantErr: io.ErrUnexpectedEOF},
		{in: []byte("GET / HTTP/1.1\r\n"), limit: maxHelloFrame, wantErr: ErrProtocol},
	}
	for i, tt := range tests {
		typ, b, err := readFrame(bytes.NewReader(tt.in), tt.limit, nil)
		if tt.wantErr != nil {
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("#%d: got error %v, want %v", i, err, tt.wantErr)
			}
			continue
		}
		if err != nil || typ != tt.typ || string(b) != tt.body {
			t.Errorf("#%d: got %d %q %v, want %d %q", i, typ, b, err, tt.typ, tt.body)
		}
	}
}

var testNonce = [nonceLen]byte{0xa0, 0xa1, 0xa2, 0xa3, 31: 0xbf}

func TestDecodeHello(t *testing.T) {
	good := hello{version: ProtocolVersion, snapshotID: "vm-7.snap:1_a", nonce: testNonce}
	withID := func(id string) []byte {
		b := append(append([]byte{}, magic[:]...), 0, ProtocolVersion, byte(len(id)))
		return append(append(b, id...), testNonce[:]...)
	}
	tests := []struct {
		body    []byte
		want    hello
		wantErr error
	}{
		{body: body(appendHello(nil, good)), want: good},
		{body: withID(strings.Repeat("x", MaxIDLen)), want: hello{version: ProtocolVersion, snapshotID: strings.Repeat("x", MaxIDLen), nonce: testNonce}},
		{body: append([]byte("SFMX"), body(appendHello(nil, good))[4:]...), wantErr: errNotMemserver},
		{body: body(appendHello(nil, hello{version: 1, snapshotID: "a"})), want: hello{version: 1}, wantErr: errVersion},
		{body: body(appendHello(nil, hello{version: 3, snapshotID: "a"})), want: hello{version: 3}, wantErr: errVersion},
		{body: []byte("SFMS\x00\x01"), want: hello{version: 1}, wantErr: errVersion}, // any version 1 hello, however short
		{body: []byte("SFMS\x00"), wantErr: ErrProtocol},
		{body: withID("")[:10], wantErr: ErrProtocol},
		{body: withID(""), wantErr: ErrProtocol},
		{body: withID("a b"), wantErr: ErrProtocol},
		{body: withID("a\n"), wantErr: ErrProtocol},
		{body: append(withID("a"), 0), wantErr: ErrProtocol},
		{body: withID("ab")[:len(withID("ab"))-1], wantErr: ErrProtocol},
	}
	for i, tt := range tests {
		got, err := decodeHello(tt.body)
		if tt.wantErr != nil {
			if !errors.Is(err, tt.wantErr) || got != tt.want {
				t.Errorf("#%d: got %+v, %v, want %+v, %v", i, got, err, tt.want, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, tt.want)
		}
	}
}

func TestDecodeHelloReply(t *testing.T) {
	tests := []struct {
		in helloReply
		ok bool
	}{
		{helloReply{version: ProtocolVersion, status: helloOK, nonce: testNonce}, true},
		{helloReply{version: ProtocolVersion, status: helloOK}, true},
		{helloReply{version: ProtocolVersion, status: helloRefused}, true},
		{helloReply{version: 9, status: helloVersion}, true},
		{helloReply{version: 1, status: helloVersion}, true},
		{helloReply{version: 1, status: helloOK, nonce: testNonce}, false},
		{helloReply{version: ProtocolVersion, status: 3}, false},
	}
	for i, tt := range tests {
		got, err := decodeHelloReply(body(appendHelloReply(nil, tt.in)))
		if tt.ok && (err != nil || got != tt.in) {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, tt.in)
		}
		if !tt.ok && !errors.Is(err, ErrProtocol) {
			t.Errorf("#%d: got %+v, %v, want a protocol error", i, got, err)
		}
	}
	ok := body(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: helloOK, nonce: testNonce}))
	refusal := body(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: helloRefused}))
	for i, in := range [][]byte{
		append(ok, 0), ok[:len(ok)-1], ok[:2], nil,
		append(refusal, 0), refusal[:len(refusal)-1],
		append(refusal[:len(refusal)-1:len(refusal)-1], 1),                         // a batch or size in a refusal
		append([]byte{0, ProtocolVersion, helloOK}, make([]byte, refusalLen-3)...), // an ok of a refusal's length
	} {
		if _, err := decodeHelloReply(in); !errors.Is(err, ErrProtocol) {
			t.Errorf("malformed #%d: got %v", i, err)
		}
	}
}

func TestDecodeAccept(t *testing.T) {
	tests := []struct {
		in accept
		ok bool
	}{
		{accept{maxBatch: 256, pages: 1 << 20}, true},
		{accept{maxBatch: MaxBatchLimit, pages: 1}, true},
		{accept{maxBatch: MaxBatchLimit + 1, pages: 1}, false},
		{accept{maxBatch: 0, pages: 1}, false},
		{accept{maxBatch: 1, pages: 0}, false},
	}
	for i, tt := range tests {
		got, err := decodeAccept(body(appendAccept(nil, tt.in)))
		if tt.ok && (err != nil || got != tt.in) {
			t.Errorf("#%d: got %+v, %v, want %+v", i, got, err, tt.in)
		}
		if !tt.ok && !errors.Is(err, ErrProtocol) {
			t.Errorf("#%d: got %+v, %v, want a protocol error", i, got, err)
		}
	}
	good := body(appendAccept(nil, accept{maxBatch: 1, pages: 1}))
	for i, in := range [][]byte{append(good, 0), good[:acceptLen-1], nil} {
		if _, err := decodeAccept(in); !errors.Is(err, ErrProtocol) {
			t.Errorf("malformed #%d: got %v", i, err)
		}
	}
}

func TestDecodeRequest(t *testing.T) {
	req := func(id uint64, rs ...pageRange) []byte { return body(appendRequest(nil, request{id: id, ranges: rs})) }
	tests := []struct {
		body     []byte
		maxBatch int
		pages    int // -1: refused
	}{
		{req(1, pageRange{0, 1}), 1, 1},
		{req(2, pageRange{5, 10}, pageRange{1 << 63, 6}), 16, 16},
		{req(3, pageRange{5, 10}, pageRange{100, 7}), 16, -1},
		{req(4, pageRange{0, 0}), 16, -1},
		{req(5, pageRange{0, 0xffffffff}, pageRange{0, 0xffffffff}), MaxBatchLimit, -1},
		{req(6), 16, -1},
		{append(req(7, pageRange{0, 1}), 0), 16, -1},
		{req(8, pageRange{0, 1}, pageRange{2, 1})[:20], 16, -1},
		{[]byte{1, 2, 3}, 16, -1},
	}
	for i, tt := range tests {
		got, err := decodeRequest(tt.body, tt.maxBatch)
		if tt.pages < 0 {
			if !errors.Is(err, ErrProtocol) {
				t.Errorf("#%d: got %+v, %v, want a protocol error", i, got, err)
			}
			continue
		}
		if err != nil || got.pages() != tt.pages || !bytes.Equal(body(appendRequest(nil, got)), tt.body) {
			t.Errorf("#%d: got %+v (%d pages), %v, want %d pages", i, got, got.pages(), err, tt.pages)
		}
	}
}

func TestDecodeResponse(t *testing.T) {
	resp := func(r response) []byte { return body(appendResponse(nil, r)) }
	okResp := response{id: 9, status: statusOK, kinds: []byte{kindZero, kindData, kindZero, kindData},
		data: append(dataPage(1), dataPage(2)...)}
	tests := []struct {
		body []byte
		ok   bool
	}{
		{resp(okResp), true},
		{resp(response{id: 1, status: statusOK, kinds: []byte{kindZero}}), true},
		{resp(response{id: 1, status: statusOutOfRange, message: "beyond"}), true},
		{resp(response{id: 1, status: statusReleased}), true},
		{resp(response{id: 1, status: statusReadError, message: strings.Repeat("é", 200)}), true}, // cut to 256 bytes, still UTF-8
		{resp(response{id: 1, status: statusOK}), false},                                          // no pages
		{resp(response{id: 1, status: statusOK, kinds: []byte{2}}), false},                        // unknown kind
		{resp(response{id: 1, status: statusOK, kinds: []byte{kindData}}), false},                 // data missing
		{resp(response{id: 1, status: statusOK, kinds: []byte{kindZero}, data: dataPage(1)}), false},
		{resp(response{id: 1, status: statusOK, kinds: make([]byte, MaxBatchLimit+1)}), false},
		{resp(response{id: 1, status: 4}), false},
		{append(resp(response{id: 1, status: statusReleased}), 'x'), false},
		{resp(response{id: 1, status: statusReleased, message: "\xff"}), false},
		{resp(okResp)[:8], false},
	}
	for i, tt := range tests {
		got, err := decodeResponse(tt.body)
		if !tt.ok {
			if !errors.Is(err, ErrProtocol) {
				t.Errorf("#%d: got %+v, %v, want a protocol error", i, got.status, err)
			}
			continue
		}
		if err != nil || !bytes.Equal(body(appendResponse(nil, got)), tt.body) {
			t.Errorf("#%d: got %v, or a different re-encoding", i, err)
		}
	}
}

// The fuzz targets: whatever a peer sends, a decoder never panics and
// never allocates past the frame limit, and what it accepts is the
// canonical encoding of what it returns (so nothing is silently ignored).

func FuzzReadFrame(f *testing.F) {
	f.Add(appendHello(nil, hello{version: ProtocolVersion, snapshotID: "s", nonce: testNonce}), uint32(maxHelloFrame))
	f.Add(appendRequest(nil, request{id: 1, ranges: []pageRange{{1, 2}}}), uint32(maxRequestFrame(256)))
	f.Add([]byte{0, 0, 0, 0}, uint32(10))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1}, uint32(10))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"), uint32(maxHelloFrame))
	f.Fuzz(func(t *testing.T, in []byte, limit uint32) {
		limit = limit%(1<<20) + 1 // the limits in use are all small
		typ, b, err := readFrame(bytes.NewReader(in), limit, nil)
		if err != nil {
			return
		}
		n := binary.BigEndian.Uint32(in)
		if n > limit || uint32(len(b))+1 != n || typ != in[4] || !bytes.Equal(b, in[5:4+n]) {
			t.Fatalf("frame of %d (limit %d): got type %d and %d bytes", n, limit, typ, len(b))
		}
	})
}

func FuzzDecodeHello(f *testing.F) {
	f.Add(body(appendHello(nil, hello{version: ProtocolVersion, snapshotID: "snap-1", nonce: testNonce})))
	f.Add(body(appendHello(nil, hello{version: 7, snapshotID: "x"})))
	f.Add(body(appendHello(nil, hello{version: 1, snapshotID: "x"})))
	f.Add([]byte("SFMS\x00\x02\x01"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		h, err := decodeHello(in)
		if errors.Is(err, errVersion) && h.version == ProtocolVersion {
			t.Fatal("version error for our version")
		}
		if err != nil {
			return
		}
		if !validID(h.snapshotID) || h.version != ProtocolVersion {
			t.Fatalf("accepted %+v", h)
		}
		if !bytes.Equal(body(appendHello(nil, h)), in) {
			t.Fatalf("re-encoding of %+v differs", h)
		}
	})
}

func FuzzDecodeHelloReply(f *testing.F) {
	f.Add(body(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: helloOK, nonce: testNonce})))
	f.Add(body(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: helloRefused})))
	f.Add(body(appendHelloReply(nil, helloReply{version: 1, status: helloVersion})))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := decodeHelloReply(in)
		if err != nil {
			return
		}
		if r.status == helloOK && r.version != ProtocolVersion {
			t.Fatalf("accepted ok from version %d", r.version)
		}
		if !bytes.Equal(body(appendHelloReply(nil, r)), in) {
			t.Fatalf("re-encoding of %+v differs", r)
		}
	})
}

func FuzzDecodeAccept(f *testing.F) {
	f.Add(body(appendAccept(nil, accept{maxBatch: 256, pages: 100})))
	f.Add(body(appendAccept(nil, accept{maxBatch: MaxBatchLimit + 1, pages: 1})))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, in []byte) {
		a, err := decodeAccept(in)
		if err != nil {
			return
		}
		if a.maxBatch == 0 || a.maxBatch > MaxBatchLimit || a.pages == 0 {
			t.Fatalf("accepted %+v", a)
		}
		if !bytes.Equal(body(appendAccept(nil, a)), in) {
			t.Fatalf("re-encoding of %+v differs", a)
		}
	})
}

func FuzzDecodeRequest(f *testing.F) {
	f.Add(body(appendRequest(nil, request{id: 1, ranges: []pageRange{{0, 1}}})), uint16(256))
	f.Add(body(appendRequest(nil, request{id: 2, ranges: []pageRange{{10, 200}, {1 << 40, 56}}})), uint16(256))
	f.Add(body(appendRequest(nil, request{id: 3, ranges: []pageRange{{0, 0}}})), uint16(1))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff}, uint16(1024))
	f.Fuzz(func(t *testing.T, in []byte, maxBatch uint16) {
		limit := int(maxBatch)%MaxBatchLimit + 1
		r, err := decodeRequest(in, limit)
		if err != nil {
			return
		}
		if n := r.pages(); n < 1 || n > limit || len(in)+1 > int(maxRequestFrame(limit)) {
			t.Fatalf("accepted %d pages in %d bytes, limit %d", n, len(in), limit)
		}
		for _, pr := range r.ranges {
			if pr.count == 0 {
				t.Fatal("accepted an empty range")
			}
		}
		if !bytes.Equal(body(appendRequest(nil, r)), in) {
			t.Fatalf("re-encoding of %+v differs", r)
		}
	})
}

func FuzzDecodeResponse(f *testing.F) {
	f.Add(body(appendResponse(nil, response{id: 1, status: statusOK, kinds: []byte{kindZero, kindData}, data: dataPage(7)})))
	f.Add(body(appendResponse(nil, response{id: 2, status: statusOK, kinds: []byte{kindZero, kindZero, kindZero}})))
	f.Add(body(appendResponse(nil, response{id: 3, status: statusOutOfRange, message: "pages beyond the snapshot's 4"})))
	f.Add(body(appendResponse(nil, response{id: 4, status: statusReleased})))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := decodeResponse(in)
		if err != nil {
			return
		}
		if r.status == statusOK {
			data := bytes.Count(r.kinds, []byte{kindData})
			if len(r.kinds) == 0 || len(r.kinds) > MaxBatchLimit || len(r.data) != data*PageSize {
				t.Fatalf("accepted %d pages with %d bytes of data", len(r.kinds), len(r.data))
			}
		}
		if !bytes.Equal(body(appendResponse(nil, r)), in) {
			t.Fatalf("re-encoding of response %d differs", r.id)
		}
	})
}
