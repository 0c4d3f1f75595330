package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestDemo runs the whole demo, as `make demo` does, and checks its story.
func TestDemo(t *testing.T) {
	var out bytes.Buffer
	if code := Run(nil, &out); code != 0 {
		t.Fatalf("demo exited %d:\n%s", code, out.String())
	}
	for _, want := range []string{"leader", "3 of 3 granted", "5 of 8 granted", "refused", "join(ticket 1) returned; ticket joined",
		"not the ticket's parent", "acknowledged", "Demo finished"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}
