package qmp

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// MaxLineSize bounds one message from QEMU. QEMU's largest replies
// (query-qmp-schema, about 200 KiB in 7.2) are far below it; a longer line
// means a broken or hostile peer and ends the connection.
const MaxLineSize = 16 << 20

// ErrLineTooLong is wrapped in the error that ends a connection whose peer
// sent a line longer than MaxLineSize.
var ErrLineTooLong = errors.New("qmp: message longer than the maximum line size")

// kind is what a server message is.
type kind int

const (
	kindGreeting kind = iota + 1
	kindResponse
	kindEvent
)

// message is one decoded server message. Exactly one of the kind-specific
// parts is set: greeting, a response (ret or err, with its id), or event.
type message struct {
	kind     kind
	greeting Greeting
	// id is the request id echoed by QEMU; hasID is false when the response
	// carries no id, or one this client cannot have sent (not a uint64).
	id    uint64
	hasID bool
	ret   json.RawMessage // never nil for a successful response
	err   *Error          // Command is left empty; Execute fills it in
	event Event
}

// wireMessage is the union of every server message's fields. Pointers and
// raw messages tell "absent" from "present but empty".
type wireMessage struct {
	QMP       *wireGreeting   `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *wireError      `json:"error"`
	Event     *string         `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *wireTimestamp  `json:"timestamp"`
	ID        json.RawMessage `json:"id"`
}

type wireGreeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

type wireError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

type wireTimestamp struct {
	Seconds      int64 `json:"seconds"`
	Microseconds int64 `json:"microseconds"`
}

// decodeMessage parses one line sent by QEMU. The line is untrusted: any
// input yields either a well-formed message or an error, never a panic, and
// the returned message shares no memory with line.
func decodeMessage(line []byte) (message, error) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return message{}, errors.New("qmp: message is not a JSON object")
	}
	var w wireMessage
	if err := json.Unmarshal(line, &w); err != nil {
		return message{}, fmt.Errorf("qmp: malformed message: %w", err)
	}
	present := 0
	for _, p := range []bool{w.QMP != nil, w.Return != nil, w.Error != nil, w.Event != nil} {
		if p {
			present++
		}
	}
	if present != 1 {
		return message{}, fmt.Errorf("qmp: message has %d of the members QMP, return, error, event; want exactly one", present)
	}

	var m message
	switch {
	case w.QMP != nil:
		m.kind = kindGreeting
		v := w.QMP.Version
		m.greeting = Greeting{
			Major: v.QEMU.Major, Minor: v.QEMU.Minor, Micro: v.QEMU.Micro,
			Package:      v.Package,
			Capabilities: w.QMP.Capabilities,
		}
	case w.Event != nil:
		if *w.Event == "" {
			return message{}, errors.New("qmp: event with an empty name")
		}
		m.kind = kindEvent
		m.event = Event{Name: *w.Event, Data: w.Data}
		if w.Timestamp != nil {
			m.event.Timestamp = time.Unix(w.Timestamp.Seconds, 0).Add(time.Duration(w.Timestamp.Microseconds) * time.Microsecond)
		}
	default:
		m.kind = kindResponse
		if w.Error != nil {
			m.err = &Error{Class: w.Error.Class, Desc: w.Error.Desc}
		} else {
			m.ret = w.Return
		}
		if w.ID != nil {
			// Ids this client sends are uint64s; anything else is not ours.
			var id uint64
			if json.Unmarshal(w.ID, &id) == nil {
				m.id, m.hasID = id, true
			}
		}
	}
	return m, nil
}

// lineReader splits QEMU's output into lines of at most MaxLineSize bytes.
type lineReader struct {
	s *bufio.Scanner
}

func newLineReader(r io.Reader, max int) *lineReader {
	s := bufio.NewScanner(r)
	s.Buffer(make([]byte, 0, min(max, 64<<10)), max)
	return &lineReader{s: s}
}

// next returns the next line, valid until the following call. At the end of
// the stream it returns io.EOF; on a line that is too long, ErrLineTooLong.
func (lr *lineReader) next() ([]byte, error) {
	if lr.s.Scan() {
		return lr.s.Bytes(), nil
	}
	err := lr.s.Err()
	switch {
	case err == nil:
		return nil, io.EOF
	case errors.Is(err, bufio.ErrTooLong):
		return nil, ErrLineTooLong
	default:
		return nil, err
	}
}
