package xenchan

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/snowflock-go/snowflock/guestchan"
)

func TestFramingRoundTrip(t *testing.T) {
	ctx := context.Background()
	for i, n := range []int{1, ChunkSize - 1, ChunkSize, ChunkSize + 1, 3 * ChunkSize, MaxLine} {
		st := newMemStore().as(5)
		msg := bytes.Repeat([]byte("a"), n)
		msg[0], msg[n-1] = '{', '}'
		if err := writeMessage(ctx, st, "data/snowflock/req/1", msg); err != nil {
			t.Fatalf("#%d (%d bytes): %v", i, n, err)
		}
		chunks := (n + ChunkSize - 1) / ChunkSize
		if c, _ := st.Read(ctx, "data/snowflock/req/1/n"); string(c) != strconv.Itoa(chunks) {
			t.Errorf("#%d: count %q, want %d", i, c, chunks)
		}
		for j := range chunks {
			c, err := st.Read(ctx, "data/snowflock/req/1/"+strconv.Itoa(j))
			if err != nil || len(c) > ChunkSize || len(c) == 0 {
				t.Errorf("#%d: chunk %d: %d bytes, %v", i, j, len(c), err)
			}
		}
		got, complete, err := readMessage(ctx, st, "data/snowflock/req/1")
		if err != nil || !complete || !bytes.Equal(got, msg) {
			t.Errorf("#%d: read back %d bytes, complete %v, %v", i, len(got), complete, err)
		}
	}
	st := newMemStore().as(5)
	for _, n := range []int{0, MaxLine + 1} {
		if err := writeMessage(ctx, st, "x", make([]byte, n)); !errors.Is(err, guestchan.ErrTooLarge) {
			t.Errorf("message of %d bytes: %v", n, err)
		}
	}
}

func TestReadMessageRejects(t *testing.T) {
	ctx := context.Background()
	big := strings.Repeat("a", ChunkSize)
	tests := []struct {
		nodes    map[string]string
		complete bool
		bad      bool
	}{
		{map[string]string{"0": "{}"}, false, false}, // no count yet
		{map[string]string{}, false, false},
		{map[string]string{"0": "{}", "n": "1"}, true, false},
		{map[string]string{"0": "{}", "n": "0"}, true, true},
		{map[string]string{"0": "{}", "n": "01"}, true, true},
		{map[string]string{"0": "{}", "n": "-1"}, true, true},
		{map[string]string{"0": "{}", "n": "1 "}, true, true},
		{map[string]string{"0": "{}", "n": strconv.Itoa(MaxChunks + 1)}, true, true},
		{map[string]string{"0": "{}", "n": "2"}, true, true},                      // chunk 1 missing
		{map[string]string{"0": "{}", "1": "", "n": "2"}, true, true},             // empty chunk
		{map[string]string{"0": "{\"id\":1}\n{", "1": "}", "n": "2"}, true, true}, // smuggled line
		{func() map[string]string { // over MaxLine in total
			m := map[string]string{"n": strconv.Itoa(MaxChunks)}
			for i := range MaxChunks {
				m[strconv.Itoa(i)] = big
			}
			return m
		}(), true, true},
	}
	for i, tt := range tests {
		st := newMemStore().as(5)
		st.Mkdir(ctx, "r")
		for k, v := range tt.nodes {
			st.Write(ctx, "r/"+k, []byte(v))
		}
		_, complete, err := readMessage(ctx, st, "r")
		if complete != tt.complete || (err != nil) != tt.bad || (err != nil && !errors.Is(err, ErrBadFrame)) {
			t.Errorf("#%d: complete %v, err %v", i, complete, err)
		}
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		s  string
		id uint64
		ok bool
	}{
		{"1", 1, true}, {"42", 42, true}, {"18446744073709551615", 1<<64 - 1, true},
		{"0", 0, false}, {"", 0, false}, {"01", 0, false}, {"-1", 0, false}, {"+1", 0, false},
		{"1a", 0, false}, {"18446744073709551616", 0, false}, {"123456789012345678901", 0, false},
	}
	for i, tt := range tests {
		id, ok := parseID(tt.s)
		if ok != tt.ok || (ok && id != tt.id) {
			t.Errorf("#%d %q: %d %v", i, tt.s, id, ok)
		}
	}
}

func TestLineBuffer(t *testing.T) {
	var l lineBuffer
	lines, err := l.add([]byte(`{"id":1}` + "\n" + `{"id":2}` + "\r\n" + `{"id":`))
	if err != nil || len(lines) != 2 || string(lines[0]) != `{"id":1}` || string(lines[1]) != `{"id":2}` {
		t.Fatalf("lines %q, %v", lines, err)
	}
	lines, err = l.add([]byte("3}\n\n"))
	if err != nil || len(lines) != 1 || string(lines[0]) != `{"id":3}` {
		t.Fatalf("continued line %q, %v", lines, err)
	}
	if _, err := l.add(bytes.Repeat([]byte("x"), MaxLine+1)); !errors.Is(err, guestchan.ErrTooLarge) {
		t.Fatalf("long line: %v", err)
	}
	if lines, err := l.add([]byte("{}\n")); err != nil || len(lines) != 1 {
		t.Fatalf("after a long line: %q, %v", lines, err)
	}

	var q lineQueue
	p := make([]byte, 3)
	var got []byte
	n := q.fill(p, []byte("abcdefg"))
	got = append(got, p[:n]...)
	for q.rest != nil {
		n = q.fill(p, nil)
		got = append(got, p[:n]...)
	}
	if string(got) != "abcdefg\n" {
		t.Fatalf("short reads gave %q", got)
	}
}

// FuzzFrame: whatever a guest leaves in its request nodes, readMessage
// either waits for more, rejects it as ErrBadFrame, or returns one line
// of at most MaxLine bytes without a newline, which is all a host passes
// on.
//
//	go test -run '^$' -fuzz '^FuzzFrame$' -fuzztime=20s -fuzzminimizetime=200x ./xenctl/xenchan
func FuzzFrame(f *testing.F) {
	f.Add("1", []byte(`{"v":1,"id":1,"call":"hello"}`), []byte{}, uint8(1))
	f.Add("2", []byte(`{"v":1,"id":1,`), []byte(`"call":"hello"}`), uint8(2))
	f.Add("2", []byte("a\n"), []byte("b"), uint8(2))
	f.Add("02", []byte("a"), []byte("b"), uint8(2))
	f.Fuzz(func(t *testing.T, count string, c0, c1 []byte, present uint8) {
		ctx := context.Background()
		st := newMemStore().as(5)
		st.Mkdir(ctx, "r")
		if present&1 != 0 {
			st.Write(ctx, "r/0", c0)
		}
		if present&2 != 0 {
			st.Write(ctx, "r/1", c1)
		}
		if present&4 == 0 {
			st.Write(ctx, "r/n", []byte(count))
		}
		msg, complete, err := readMessage(ctx, st, "r")
		if err != nil && !errors.Is(err, ErrBadFrame) {
			t.Fatalf("error %v is not ErrBadFrame", err)
		}
		if err == nil && complete {
			if len(msg) == 0 || len(msg) > MaxLine || bytes.IndexByte(msg, '\n') >= 0 {
				t.Fatalf("accepted %q", msg)
			}
			want := c0
			if count == "2" {
				want = append(bytes.Clone(c0), c1...)
			}
			if !bytes.Equal(msg, want) {
				t.Fatalf("read %q, stored %q", msg, want)
			}
			if _, err := lineID(msg); err != nil && !errors.Is(err, guestchan.ErrBadMessage) {
				t.Fatalf("lineID: %v", err)
			}
		}
	})
}
