package cli

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/spf13/pflag"
)

func TestExitAndHelp(t *testing.T) {
	tests := []struct {
		err  error
		code int
		out  string
	}{
		{nil, ExitOK, ""},
		{pflag.ErrHelp, ExitOK, ""},
		{Usagef("bad %s", "flag"), ExitUsage, "x: bad flag\n"},
		{fmt.Errorf("wrapped: %w", Usagef("u")), ExitUsage, "x: wrapped: u\n"},
		{errors.New("boom"), ExitError, "x: boom\n"},
	}
	for i, tt := range tests {
		var b bytes.Buffer
		if got := Exit("x", tt.err, &b); got != tt.code || b.String() != tt.out {
			t.Errorf("#%d: got %d %q, want %d %q", i, got, b.String(), tt.code, tt.out)
		}
	}
	for i, tt := range []struct {
		args []string
		code int
		done bool
	}{{nil, ExitUsage, true}, {[]string{"help"}, ExitOK, true}, {[]string{"-h"}, ExitOK, true}, {[]string{"run"}, 0, false}} {
		var b bytes.Buffer
		code, done := Help(tt.args, "usage\n", &b)
		if code != tt.code || done != tt.done || (done && b.String() != "usage\n") {
			t.Errorf("#%d %v: got %d %v %q", i, tt.args, code, done, b.String())
		}
	}
}
