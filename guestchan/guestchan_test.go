package guestchan

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
)

func TestParseRequest(t *testing.T) {
	tests := []struct {
		line   string
		ok     bool
		id     uint64
		isSize bool
	}{
		{`{"v":1,"id":7,"call":"ticket","args":{"n":4}}`, true, 7, false},
		{`{"v":1,"id":8,"call":"tickets"}`, true, 8, false},
		{`{"v":1,"id":9,"call":"exit","args":{"status":0,"result":"ok"}}`, true, 9, false},
		{`{"v":2,"id":5,"call":"ticket"}`, false, 5, false},
		{`{"v":1,"id":0,"call":"ticket"}`, false, 0, false},
		{`{"v":1,"id":3,"call":"TICKET"}`, false, 3, false},
		{`{"v":1,"id":3,"call":"ticket","extra":1}`, false, 3, false},
		{`{"v":1,"id":4,"call":"ticket"} {}`, false, 0, false},
		{`not json`, false, 0, false},
		{`{"v":1,"id":"x","call":"ticket"}`, false, 0, false},
		{`[]`, false, 0, false},
	}
	for i, tt := range tests {
		req, err := ParseRequest([]byte(tt.line))
		if (err == nil) != tt.ok {
			t.Errorf("#%d %s: err %v, want ok=%v", i, tt.line, err, tt.ok)
			continue
		}
		if err != nil && !errors.Is(err, ErrBadMessage) {
			t.Errorf("#%d: error %v does not wrap ErrBadMessage", i, err)
		}
		if req == nil || req.ID != tt.id {
			t.Errorf("#%d: id %v, want %d", i, req, tt.id)
		}
	}
}

func TestDecoderLimitsAndResync(t *testing.T) {
	var in bytes.Buffer
	in.WriteString(`{"v":1,"id":1,"call":"hello"}` + "\n")
	in.WriteString(strings.Repeat("x", MaxMessage+100) + "\n")
	in.WriteString("garbage\r\n")
	in.WriteString(`{"v":1,"id":2,"call":"ticket","args":{"n":2}}` + "\n")
	in.WriteString(`{"v":1,"id":3,"call":"hel`) // cut off
	d := NewDecoder(&in)
	want := []struct {
		id  uint64
		err error
	}{{1, nil}, {0, ErrTooLarge}, {0, ErrBadMessage}, {2, nil}, {0, io.ErrUnexpectedEOF}, {0, io.EOF}}
	for i, w := range want {
		req, err := d.ReadRequest()
		if w.err == nil && err != nil || w.err != nil && !errors.Is(err, w.err) {
			t.Fatalf("#%d: got %v, want %v", i, err, w.err)
		}
		if w.err == nil && req.ID != w.id {
			t.Fatalf("#%d: id %d, want %d", i, req.ID, w.id)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	req, _ := NewRequest(42, CallExit, ExitArgs{Status: 3, Result: "done\nwith newline"})
	if err := Encode(&buf, req); err != nil {
		t.Fatal(err)
	}
	got, err := NewDecoder(&buf).ReadRequest()
	if err != nil {
		t.Fatal(err)
	}
	var args ExitArgs
	if err := got.DecodeArgs(&args); err != nil || args.Status != 3 || args.Result != "done\nwith newline" {
		t.Fatalf("args %+v %v", args, err)
	}
	var wrong TicketArgs
	if err := got.DecodeArgs(&wrong); err == nil {
		t.Fatal("exit arguments decoded as ticket arguments")
	}
	resp, _ := Answer(42, CloneResult{CloneID: 2, Ticket: 9})
	buf.Reset()
	Encode(&buf, resp)
	Encode(&buf, Fail(43, CodeUnknownCall, "no call %q", "x"))
	d := NewDecoder(&buf)
	r1, err := d.ReadResponse()
	if err != nil || r1.ID != 42 || r1.Error != nil {
		t.Fatalf("answer: %+v %v", r1, err)
	}
	r2, err := d.ReadResponse()
	if err != nil || r2.Error == nil || r2.Error.Code != CodeUnknownCall {
		t.Fatalf("failure: %+v %v", r2, err)
	}
	if err := Encode(io.Discard, Fail(1, "x", "%s", strings.Repeat("y", MaxMessage))); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversized message encoded: %v", err)
	}
}

// FuzzReadRequest: whatever a guest sends, the decoder never panics, never
// returns a request that breaks the rules, and stays in step line by line.
func FuzzReadRequest(f *testing.F) {
	for _, s := range []string{`{"v":1,"id":1,"call":"ticket","args":{"n":4}}`, `{"v":1,"id":2,"call":"clone","args":{"ticket":3}}`,
		`{"v":1,"id":3,"call":"exit","args":{"status":1,"result":"r"}}`, "\n\n", `{"v":1}`, "\x00\xff", `{"v":1,"id":1,"call":"a","args":[]}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d := NewDecoder(bytes.NewReader(append(b, '\n')))
		for i := 0; i < 1000; i++ {
			req, err := d.ReadRequest()
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return
			}
			if err != nil {
				if !errors.Is(err, ErrBadMessage) && !errors.Is(err, ErrTooLarge) {
					t.Fatalf("unexpected error kind: %v", err)
				}
				continue
			}
			if req.V != Version || req.ID == 0 || !callPattern.MatchString(req.Call) {
				t.Fatalf("accepted bad request %+v", req)
			}
			var args map[string]interface{}
			_ = req.DecodeArgs(&args)
		}
	})
}
