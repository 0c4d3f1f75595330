package main

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestPprofAddr(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{"127.0.0.1:6060", true},
		{"[::1]:6060", true},
		{"127.0.0.1:0", true},
		{"0.0.0.0:6060", false}, // every interface: no
		{"10.0.0.1:6060", false},
		{"localhost:6060", false}, // an address, not a name
		{"127.0.0.1", false},
		{"", false},
	} {
		if _, err := parsePprofAddr(tc.in); (err == nil) != tc.ok {
			t.Errorf("parsePprofAddr(%q) = %v, want ok=%v", tc.in, err, tc.ok)
		}
	}
}

// TestServePprof: the profile server answers on loopback until stopped.
func TestServePprof(t *testing.T) {
	ap, _ := parsePprofAddr("127.0.0.1:0")
	addr, stop, err := servePprof(context.Background(), ap, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + addr.String() + "/debug/pprof/goroutine?debug=1"
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "goroutine profile") {
		t.Errorf("%s: %s\n%.200s", url, resp.Status, body)
	}
	stop()
	if _, err := http.Get(url); err == nil {
		t.Errorf("%s answers after stop", url)
	}
}
