package main

import "testing"

func TestTokenFromCmdline(t *testing.T) {
	tests := []struct {
		cmdline string
		want    string
		err     bool
	}{
		{"console=hvc0 xenbed.token=0123456789abcdef0123 quiet", "0123456789abcdef0123", false},
		{"xenbed.token=0123456789abcdef\n", "0123456789abcdef", false},
		{"console=hvc0", "", true},
		{"xenbed.token=short", "", true},
		{"notxenbed.token=0123456789abcdef", "", true},
	}
	for i, tt := range tests {
		got, err := tokenFromCmdline(tt.cmdline)
		if got != tt.want || (err != nil) != tt.err {
			t.Errorf("#%d %q: got %q, %v; want %q, error %v", i, tt.cmdline, got, err, tt.want, tt.err)
		}
	}
}
