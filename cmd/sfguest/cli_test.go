package main

import (
	"bytes"
	"testing"
)

func TestRunUsage(t *testing.T) {
	t.Setenv("SF_GUEST_SOCKET", "/nonexistent/sock")
	t.Setenv("SF_GUEST_DEVICE", "/nonexistent/dev")
	tests := []struct {
		args []string
		code int
	}{
		{nil, 2}, {[]string{"help"}, 0}, {[]string{"bogus"}, 2}, {[]string{"ticket"}, 2}, {[]string{"ticket", "x"}, 2},
		{[]string{"ticket", "0"}, 2}, {[]string{"ticket", "2000"}, 1}, {[]string{"clone", "1", "2"}, 2},
		{[]string{"join", "--status", "1", "3"}, 2}, {[]string{"create-clones", "1"}, 2},
		{[]string{"exit", "--result", string(make([]byte, 5000))}, 2},
		{[]string{"tickets"}, 1}, // no channel here: a clear error, not a usage error
	}
	for i, tt := range tests {
		var out, errb bytes.Buffer
		if got := Run(tt.args, &out, &errb); got != tt.code {
			t.Errorf("#%d %v: exit %d, want %d (%s)", i, tt.args, got, tt.code, errb.String())
		}
	}
}
