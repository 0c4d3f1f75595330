package main

import (
	"bytes"
	"os"
	"path/filepath"
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

// TestGenData: the same size and seed give the same bytes; bad input is a
// usage error that writes nothing.
func TestGenData(t *testing.T) {
	dir := t.TempDir()
	a, b, c := filepath.Join(dir, "a"), filepath.Join(dir, "b"), filepath.Join(dir, "c")
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"gen-data", "--size", "2", "--seed", "7", a}, 0},
		{[]string{"gen-data", "--size", "2", "--seed", "7", b}, 0},
		{[]string{"gen-data", "--size", "2", "--seed", "8", c}, 0},
		{[]string{"gen-data", "--size", "0", filepath.Join(dir, "x")}, 2},
		{[]string{"gen-data", "--size", "1"}, 2},
		{[]string{"gen-data", "--bogus", filepath.Join(dir, "y")}, 2},
	} {
		var out, errb bytes.Buffer
		if code := Run(tc.args, &out, &errb); code != tc.code {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, tc.code, errb.String())
		}
	}
	ba, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	bc, _ := os.ReadFile(c)
	if len(ba) != 2<<20 || !bytes.Equal(ba, bb) || bytes.Equal(ba, bc) {
		t.Fatalf("sizes %d %d %d; same seed equal: %v; other seed differs: %v", len(ba), len(bb), len(bc),
			bytes.Equal(ba, bb), !bytes.Equal(ba, bc))
	}
	for _, p := range []string{"x", "y"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err == nil {
			t.Errorf("a refused gen-data created %s", p)
		}
	}
}
