package qmp

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

// Lines captured from QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18).
const (
	realGreeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}`
	realReturn   = `{"return": {"status": "running", "singlestep": false, "running": true}, "id": 7}`
	realError    = `{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}`
	realEvent    = `{"timestamp": {"seconds": 1795557632, "microseconds": 704012}, "event": "RESUME"}`
	realMigEvent = `{"timestamp": {"seconds": 1795557632, "microseconds": 1}, "event": "MIGRATION", "data": {"status": "completed"}}`
)

func TestDecodeMessage(t *testing.T) {
	tests := []struct {
		line    string
		want    message
		wantErr string
	}{
		{line: realGreeting, want: message{kind: kindGreeting, greeting: Greeting{
			Major: 7, Minor: 2, Micro: 22, Package: "Debian 1:7.2+dfsg-7+deb12u18+b3", Capabilities: []string{"oob"}}}},
		{line: realReturn + "\r\n", want: message{kind: kindResponse, id: 7, hasID: true,
			ret: []byte(`{"status": "running", "singlestep": false, "running": true}`)}},
		{line: realError, want: message{kind: kindResponse, id: 3, hasID: true,
			err: &Error{Class: "CommandNotFound", Desc: "The command nope has not been found"}}},
		{line: realEvent, want: message{kind: kindEvent, event: Event{Name: "RESUME",
			Timestamp: time.Unix(1795557632, 704012000)}}},
		{line: realMigEvent, want: message{kind: kindEvent, event: Event{Name: "MIGRATION",
			Data: []byte(`{"status": "completed"}`), Timestamp: time.Unix(1795557632, 1000)}}},
		// A null return is still a return.
		{line: `{"return": null, "id": 1}`, want: message{kind: kindResponse, id: 1, hasID: true, ret: []byte("null")}},
		// Responses with ids this client never sends are decoded but unmatched.
		{line: `{"return": {}}`, want: message{kind: kindResponse, ret: []byte("{}")}},
		{line: `{"return": {}, "id": "x"}`, want: message{kind: kindResponse, ret: []byte("{}")}},
		{line: `{"return": {}, "id": -1}`, want: message{kind: kindResponse, ret: []byte("{}")}},
		{line: `{"return": {}, "id": 1.5}`, want: message{kind: kindResponse, ret: []byte("{}")}},
		{line: `{"event": "X", "timestamp": {"seconds": -1, "microseconds": -1}}`, want: message{kind: kindEvent,
			event: Event{Name: "X", Timestamp: time.Unix(-1, -1000)}}},

		{line: ``, wantErr: "not a JSON object"},
		{line: `[]`, wantErr: "not a JSON object"},
		{line: `null`, wantErr: "not a JSON object"},
		{line: `{"return": {}`, wantErr: "malformed"},
		{line: `{"return": {}} trailing`, wantErr: "malformed"},
		{line: `{}`, wantErr: "has 0 of"},
		{line: `{"id": 1}`, wantErr: "has 0 of"},
		{line: `{"return": {}, "error": {"class": "x"}, "id": 1}`, wantErr: "has 2 of"},
		{line: `{"event": "STOP", "return": {}}`, wantErr: "has 2 of"},
		{line: `{"event": ""}`, wantErr: "empty name"},
		{line: `{"event": 5}`, wantErr: "malformed"},
		{line: `{"error": "text", "id": 1}`, wantErr: "malformed"},
		{line: `{"event": "X", "timestamp": {"seconds": "1"}}`, wantErr: "malformed"},
		{line: `{"QMP": 1}`, wantErr: "malformed"},
	}
	for i, tc := range tests {
		got, err := decodeMessage([]byte(tc.line))
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("#%d %q: got error %v, want one containing %q", i, tc.line, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("#%d %q: unexpected error %v", i, tc.line, err)
			continue
		}
		if diff := diffMessage(got, tc.want); diff != "" {
			t.Errorf("#%d %q: %s", i, tc.line, diff)
		}
	}
}

func diffMessage(got, want message) string {
	switch {
	case got.kind != want.kind:
		return "kind differs"
	case got.id != want.id || got.hasID != want.hasID:
		return "id differs"
	case !bytes.Equal(got.ret, want.ret):
		return "return differs: " + string(got.ret)
	case (got.err == nil) != (want.err == nil) || got.err != nil && *got.err != *want.err:
		return "error differs"
	case got.event.Name != want.event.Name || !bytes.Equal(got.event.Data, want.event.Data) ||
		!got.event.Timestamp.Equal(want.event.Timestamp):
		return "event differs"
	case got.greeting.Major != want.greeting.Major || got.greeting.Minor != want.greeting.Minor ||
		got.greeting.Micro != want.greeting.Micro || got.greeting.Package != want.greeting.Package ||
		strings.Join(got.greeting.Capabilities, ",") != strings.Join(want.greeting.Capabilities, ","):
		return "greeting differs"
	}
	return ""
}

// The decoded message must not alias the line: the reader reuses its buffer.
func TestDecodeMessageCopies(t *testing.T) {
	line := []byte(realMigEvent)
	m, err := decodeMessage(line)
	if err != nil {
		t.Fatal(err)
	}
	for i := range line {
		line[i] = 'x'
	}
	if string(m.event.Data) != `{"status": "completed"}` {
		t.Fatalf("event data changed with the line: %q", m.event.Data)
	}
}

func TestLineReader(t *testing.T) {
	tests := []struct {
		in      string
		max     int
		want    []string
		wantErr error
	}{
		{in: "a\r\nbb\n", max: 8, want: []string{"a", "bb"}, wantErr: io.EOF},
		{in: "a\nlast", max: 8, want: []string{"a", "last"}, wantErr: io.EOF},
		{in: "12345678\n", max: 8, want: nil, wantErr: ErrLineTooLong},
		{in: "ok\n123456789", max: 8, want: []string{"ok"}, wantErr: ErrLineTooLong},
		{in: "", max: 8, want: nil, wantErr: io.EOF},
	}
	for i, tc := range tests {
		lr := newLineReader(strings.NewReader(tc.in), tc.max)
		var got []string
		var err error
		for {
			var line []byte
			if line, err = lr.next(); err != nil {
				break
			}
			got = append(got, string(line))
		}
		if strings.Join(got, "|") != strings.Join(tc.want, "|") || !errors.Is(err, tc.wantErr) {
			t.Errorf("#%d: got %q, %v; want %q, %v", i, got, err, tc.want, tc.wantErr)
		}
	}
}

// FuzzDecode feeds arbitrary bytes, as QEMU's output stream, through the
// line reader and the decoder: neither may panic, lines stay within the
// bound, and every decoded message is internally consistent.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{realGreeting, realReturn, realError, realEvent, realMigEvent,
		realGreeting + "\r\n" + realEvent + "\r\n" + realReturn + "\r\n",
		`{"return": null, "id": 18446744073709551615}`, `{"return": {}, "id": 18446744073709551616}`,
		`{"event": "X", "data": [1, {"a": null}], "timestamp": {"seconds": 9223372036854775807, "microseconds": 9223372036854775807}}`,
		`{"error": {}, "id": 0}`, `{"QMP": {}}`, `{"QMP": null}`, `{"Return": {}, "ID": 1}`,
		"{\"return\": \"\xff\"}", `{"event": "\u0000"}`, "\n\n\n", "{", `{"a":` + strings.Repeat("[", 600)} {
		f.Add([]byte(s))
	}
	const max = 256
	f.Fuzz(func(t *testing.T, in []byte) {
		lr := newLineReader(bytes.NewReader(in), max)
		for {
			line, err := lr.next()
			if err != nil {
				if err != io.EOF && err != ErrLineTooLong {
					t.Fatalf("unexpected reader error %v", err)
				}
				break
			}
			if len(line) > max {
				t.Fatalf("line of %d bytes exceeds the bound %d", len(line), max)
			}
			checkDecoded(t, line)
		}
		checkDecoded(t, in) // the whole input as one line, unbounded
	})
}

func checkDecoded(t *testing.T, line []byte) {
	m, err := decodeMessage(line)
	if err != nil {
		if m.kind != 0 {
			t.Fatalf("error %v with a message of kind %d", err, m.kind)
		}
		return
	}
	switch m.kind {
	case kindGreeting:
	case kindResponse:
		if (m.ret == nil) == (m.err == nil) {
			t.Fatalf("response with return %q and error %v: want exactly one", m.ret, m.err)
		}
		if !m.hasID && m.id != 0 {
			t.Fatalf("response without a usable id has id %d", m.id)
		}
	case kindEvent:
		if m.event.Name == "" {
			t.Fatal("event without a name")
		}
	default:
		t.Fatalf("decoded message of unknown kind %d", m.kind)
	}
}
