package memserver

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

var otherNonce = [nonceLen]byte{0x50, 31: 0x5f}

// testSessions returns the two ends of a session for the test capability.
func testSessions(t testing.TB) (client, server *session) {
	t.Helper()
	k, err := deriveKeys(testCapability, "snap", testNonce, otherNonce)
	if err != nil {
		t.Fatal(err)
	}
	if client, err = clientSession(k); err != nil {
		t.Fatal(err)
	}
	if server, err = serverSession(k); err != nil {
		t.Fatal(err)
	}
	return client, server
}

// sealFrame seals an unsealed frame with s.
func sealFrame(t testing.TB, s *sealer, frame []byte) []byte {
	t.Helper()
	b, err := s.seal(bytes.Clone(frame), 0)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// openFrame reads one sealed frame from b and opens it with o.
func openFrame(o *opener, b []byte) (byte, []byte, error) {
	typ, body, err := readFrame(bytes.NewReader(b), 1<<24, nil)
	if err != nil {
		return 0, nil, err
	}
	pt, err := o.open(typ, body)
	return typ, pt, err
}

// Every input of the derivation changes both keys; the two directions'
// keys differ.
func TestDeriveKeys(t *testing.T) {
	base, err := deriveKeys(testCapability, "snap", testNonce, otherNonce)
	if err != nil {
		t.Fatal(err)
	}
	if len(base.clientToServer) != 32 || bytes.Equal(base.clientToServer, base.serverToClient) {
		t.Fatalf("keys %x, %x", base.clientToServer, base.serverToClient)
	}
	otherCap := testCapability
	otherCap[0] ^= 1
	tests := []struct {
		c            Capability
		id           string
		client, serv [nonceLen]byte
	}{
		{otherCap, "snap", testNonce, otherNonce},
		{testCapability, "snap2", testNonce, otherNonce},
		{testCapability, "snap", otherNonce, testNonce}, // nonces swapped
		{testCapability, "snap", testNonce, testNonce},
		{testCapability, "snap", otherNonce, otherNonce},
	}
	for i, tt := range tests {
		k, err := deriveKeys(tt.c, tt.id, tt.client, tt.serv)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(k.clientToServer, base.clientToServer) || bytes.Equal(k.serverToClient, base.serverToClient) {
			t.Errorf("#%d: a key did not change", i)
		}
	}
	if again, _ := deriveKeys(testCapability, "snap", testNonce, otherNonce); !bytes.Equal(again.clientToServer, base.clientToServer) {
		t.Error("derivation is not deterministic")
	}
}

func TestSealOpen(t *testing.T) {
	client, server := testSessions(t)
	req := appendRequest(nil, request{id: 3, ranges: []pageRange{{1, 2}}})
	resp := appendResponse(nil, response{id: 3, status: statusOK, kinds: []byte{kindData, kindZero}, data: dataPage(9)})
	for i, tt := range []struct {
		from *sealer
		to   *opener
		f    []byte
	}{
		{client.seal, server.open, beginFrame(nil, frameFinish)},
		{server.seal, client.open, appendAccept(nil, accept{maxBatch: 1, pages: 1})},
		{client.seal, server.open, req},
		{client.seal, server.open, req}, // the same plaintext again
		{server.seal, client.open, resp},
	} {
		sealed := sealFrame(t, tt.from, tt.f)
		if len(sealed) != len(tt.f)+tagLen || binary.BigEndian.Uint32(sealed) != uint32(len(sealed)-lengthLen) {
			t.Fatalf("#%d: sealed %d bytes into %d, length field %d", i, len(tt.f), len(sealed), binary.BigEndian.Uint32(sealed))
		}
		if bytes.Contains(sealed, tt.f[lengthLen+1:]) && len(tt.f) > lengthLen+1 {
			t.Errorf("#%d: plaintext visible in the sealed frame", i)
		}
		typ, pt, err := openFrame(tt.to, sealed)
		if err != nil || typ != tt.f[lengthLen] || !bytes.Equal(pt, tt.f[lengthLen+1:]) {
			t.Errorf("#%d: got type %d, %v", i, typ, err)
		}
	}
	if client.seal.next != 3 || server.open.next != 3 || client.seal.sealed != uint64(2*(len(req)-lengthLen-1)) {
		t.Errorf("counters %d, %d, %d bytes", client.seal.next, server.open.next, client.seal.sealed)
	}
}

// A sealed frame opens once, in its place, intact, with the peer's key, in
// the direction it was sealed for: nothing else opens.
func TestOpenRejects(t *testing.T) {
	req := func(id uint64) []byte { return appendRequest(nil, request{id: id, ranges: []pageRange{{0, 1}}}) }
	type step struct {
		frame  []byte
		opened bool
	}
	tests := []struct {
		name  string
		steps func(c, s *session) []step
	}{
		{"in order", func(c, s *session) []step {
			return []step{{sealFrame(t, c.seal, req(1)), true}, {sealFrame(t, c.seal, req(2)), true}}
		}},
		{"replayed", func(c, s *session) []step {
			f := sealFrame(t, c.seal, req(1))
			return []step{{f, true}, {f, false}}
		}},
		{"reordered", func(c, s *session) []step {
			f1, f2 := sealFrame(t, c.seal, req(1)), sealFrame(t, c.seal, req(2))
			return []step{{f2, false}, {f1, true}}
		}},
		{"dropped", func(c, s *session) []step {
			sealFrame(t, c.seal, req(1))
			return []step{{sealFrame(t, c.seal, req(2)), false}}
		}},
		{"reflected back to its sender", func(c, s *session) []step {
			return []step{{sealFrame(t, s.seal, req(1)), false}}
		}},
		{"unsealed", func(c, s *session) []step {
			return []step{{append(req(1), make([]byte, tagLen)...), false}}
		}},
		{"type changed", func(c, s *session) []step {
			f := sealFrame(t, c.seal, req(1))
			f[lengthLen] = frameResponse
			return []step{{f, false}}
		}},
		{"cut short, length fixed", func(c, s *session) []step {
			f := sealFrame(t, c.seal, req(1))
			f = f[:len(f)-1]
			binary.BigEndian.PutUint32(f, uint32(len(f)-lengthLen))
			return []step{{f, false}}
		}},
		{"extended, length fixed", func(c, s *session) []step {
			f := append(sealFrame(t, c.seal, req(1)), 0)
			binary.BigEndian.PutUint32(f, uint32(len(f)-lengthLen))
			return []step{{f, false}}
		}},
		{"shorter than a tag", func(c, s *session) []step {
			return []step{{[]byte{0, 0, 0, 2, frameRequest, 1}, false}}
		}},
		{"other keys", func(c, s *session) []step {
			k, _ := deriveKeys(testCapability, "other", testNonce, otherNonce)
			o, _ := clientSession(k)
			return []step{{sealFrame(t, o.seal, req(1)), false}}
		}},
	}
	for _, tt := range tests {
		c, s := testSessions(t)
		for i, st := range tt.steps(c, s) {
			_, _, err := openFrame(s.open, st.frame)
			if st.opened && err != nil || !st.opened && !errors.Is(err, ErrAuth) {
				t.Errorf("%s, frame %d: got %v, want opened %v", tt.name, i, err, st.opened)
			}
			if !st.opened {
				break // the connection would end here
			}
		}
	}

	// Each byte of a sealed frame matters.
	c, _ := testSessions(t)
	sealed := sealFrame(t, c.seal, req(1))
	for i := range sealed {
		_, s := testSessions(t)
		f := bytes.Clone(sealed)
		f[i] ^= 0x80
		if _, _, err := openFrame(s.open, f); err == nil {
			t.Errorf("byte %d flipped: opened", i)
		}
	}
}

func TestSealLimits(t *testing.T) {
	c, s := testSessions(t)
	c.seal.limit = 2
	for i := range 3 {
		b, err := c.seal.seal(append([]byte("kept"), beginFrame(nil, frameFinish)...), 4)
		if i < 2 && err != nil || i == 2 && !errors.Is(err, errKeyExhausted) {
			t.Fatalf("frame %d: %v", i, err)
		}
		if i == 2 && string(b) != "kept" {
			t.Errorf("exhausted seal left %q", b)
		}
	}
	s.open.limit = 0
	if _, err := s.open.open(frameFinish, make([]byte, tagLen)); !errors.Is(err, errKeyExhausted) {
		t.Errorf("opener past its limit: %v", err)
	}

	c, _ = testSessions(t)
	c.seal.budget = 100
	if _, err := c.seal.seal(append(beginFrame(nil, frameRequest), make([]byte, 60)...), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := c.seal.seal(append(beginFrame(nil, frameRequest), make([]byte, 41)...), 0); !errors.Is(err, errKeyExhausted) {
		t.Errorf("over the byte budget: %v", err)
	}
	if _, err := c.seal.seal(append(beginFrame(nil, frameRequest), make([]byte, 40)...), 0); err != nil {
		t.Errorf("up to the byte budget: %v", err)
	}
}

// Sealing and opening a whole response frame in place allocates nothing.
func TestSealAllocs(t *testing.T) {
	c, s := testSessions(t)
	frame := appendResponse(nil, response{id: 1, status: statusOK, kinds: bytes.Repeat([]byte{kindData}, 16), data: make([]byte, 16*PageSize)})
	buf := make([]byte, 0, len(frame)+tagLen)
	allocs := testing.AllocsPerRun(100, func() {
		b, err := s.seal.seal(append(buf[:0], frame...), 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.open.open(b[lengthLen], b[lengthLen+1:]); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per frame", allocs)
	}
}

// FuzzOpen: a sealed frame, whatever is flipped, cut or appended, opens
// only if it reads back exactly as sealed, and then to its plaintext.
func FuzzOpen(f *testing.F) {
	f.Add([]byte{}, frameFinish, []byte{}, uint16(0), uint8(0))
	f.Add(body(appendRequest(nil, request{id: 1, ranges: []pageRange{{0, 1}}})), frameRequest, []byte{0, 0, 0, 0, 0, 1}, uint16(0), uint8(3))
	f.Add([]byte("plaintext"), frameResponse, []byte{}, uint16(1), uint8(0))
	f.Add([]byte("plaintext"), frameResponse, []byte{0, 0, 0, 0xff}, uint16(0), uint8(0))
	f.Fuzz(func(t *testing.T, pt []byte, typ byte, mask []byte, cut uint16, counter uint8) {
		c, s := testSessions(t)
		c.seal.next, s.open.next = uint64(counter), uint64(counter)
		sealed := sealFrame(t, c.seal, append(beginFrame(nil, typ), pt...))
		frame := bytes.Clone(sealed)
		for i, m := range mask {
			frame[i%len(frame)] ^= m
		}
		frame = frame[:len(frame)-min(int(cut), len(frame))]
		gotTyp, got, err := readFrame(bytes.NewReader(frame), 1<<20, nil)
		if err != nil {
			if bytes.Equal(frame, sealed) {
				t.Fatalf("the sealed frame does not read: %v", err)
			}
			return
		}
		read := frame[:lengthLen+1+len(got)]
		got, err = s.open.open(gotTyp, bytes.Clone(got))
		switch {
		case bytes.Equal(read, sealed):
			if err != nil || gotTyp != typ || !bytes.Equal(got, pt) {
				t.Fatalf("the sealed frame opens to type %d, %q, %v", gotTyp, got, err)
			}
		case err == nil:
			t.Fatalf("an altered frame opened: %x", read)
		case !errors.Is(err, ErrAuth):
			t.Fatalf("an altered frame: %v, want ErrAuth", err)
		}
	})
}
