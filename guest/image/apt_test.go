package image

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// fakeApt plays apt-cache and apt-get against an in-memory archive.
type fakeApt struct {
	mu       sync.Mutex
	lists    map[string][]byte // name=version -> .deb content, as the package lists know it
	mirror   map[string][]byte // what the mirror serves (differs when lists are stale)
	after    map[string][]byte // lists after apt-get update; nil: unchanged
	meta     string            // the package linux-image-amd64 depends on
	calls    []string
	updates  int
	listsDir string
}

func (f *fakeApt) run(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cmd := name + " " + strings.Join(args, " ")
	f.calls = append(f.calls, cmd)
	fail := func(msg string) ([]byte, error) { return []byte(msg), fmt.Errorf("%s: exit status 100: %s", cmd, msg) }
	switch {
	case name == "apt-get" && args[0] == "update":
		f.updates++
		if f.after != nil {
			f.lists, f.mirror = f.after, f.after
		}
		os.WriteFile(filepath.Join(f.listsDir, "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4"), nil, 0o644)
		return nil, nil
	case name == "apt-get" && args[0] == "download":
		spec := args[len(args)-1]
		data, ok := f.mirror[spec]
		if !ok {
			return fail("E: Failed to fetch http://deb.debian.org/" + spec + "  404  Not Found")
		}
		n, v, _ := strings.Cut(spec, "=")
		return nil, os.WriteFile(filepath.Join(dir, debPackage{n, v}.fileName()), data, 0o644)
	case name == "apt-cache" && args[0] == "show":
		spec := args[1]
		n, v, _ := strings.Cut(spec, "=")
		data, ok := f.lists[spec]
		if !ok {
			for k := range f.lists {
				if strings.HasPrefix(k, n+"=") {
					return nil, nil // known name, unknown version: apt prints nothing
				}
			}
			return fail("E: No packages found")
		}
		sum := sha256.Sum256(data)
		return fmt.Appendf(nil, "Package: %s\nVersion: %s\nArchitecture: amd64\nDescription: x\n more\nSHA256: %s\n\n", n, v, hex.EncodeToString(sum[:])), nil
	case name == "apt-cache" && args[0] == "depends":
		return fmt.Appendf(nil, "linux-image-amd64\n  Depends: %s\n", f.meta), nil
	case name == "apt-cache" && args[0] == "policy":
		for k := range f.lists {
			if n, v, _ := strings.Cut(k, "="); n == args[1] {
				return fmt.Appendf(nil, "%s:\n  Installed: (none)\n  Candidate: %s\n  Version table:\n", n, v), nil
			}
		}
		return []byte(args[1] + ":\n  Installed: (none)\n  Candidate: (none)\n"), nil
	}
	return fail("unexpected command")
}

func newTestFetcher(t *testing.T, apt *fakeApt, listsPresent bool) (*fetcher, *bytes.Buffer) {
	t.Helper()
	apt.listsDir = t.TempDir()
	if listsPresent {
		os.WriteFile(filepath.Join(apt.listsDir, "x_Packages"), nil, 0o644)
	}
	var logs bytes.Buffer
	log := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Debug})
	f := newFetcher(filepath.Join(t.TempDir(), "debs"), log, &Stats{})
	f.run, f.listsDir = apt.run, apt.listsDir
	return f, &logs
}

var (
	pinned  = debPackage{PinnedKernelPackage, PinnedKernelVersion}
	newer   = debPackage{"linux-image-6.1.0-57-amd64", "6.1.193-1"}
	pinData = []byte("pinned kernel deb")
	newData = []byte("newer kernel deb")
)

func TestFetchPinned(t *testing.T) {
	archive := map[string][]byte{pinned.String(): pinData}
	apt := &fakeApt{lists: archive, mirror: archive, meta: pinned.Name}
	f, _ := newTestFetcher(t, apt, true)
	d, err := f.fetch(context.Background(), pinned, f.kernelFallback)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(pinData)
	if d.Package != pinned || d.SHA256 != hex.EncodeToString(sum[:]) || filepath.Base(d.Path) != pinned.fileName() {
		t.Errorf("got %+v", d)
	}
	if got, _ := os.ReadFile(d.Path); !bytes.Equal(got, pinData) {
		t.Errorf("content %q", got)
	}
	if len(f.stats.Downloaded) != 1 || apt.updates != 0 {
		t.Errorf("downloaded %v, updates %d", f.stats.Downloaded, apt.updates)
	}
	// Cached: no apt call at all.
	apt.calls = nil
	if _, err := f.fetch(context.Background(), pinned, f.kernelFallback); err != nil || len(apt.calls) != 0 {
		t.Errorf("second fetch: %v, calls %q", err, apt.calls)
	}
	// A damaged cache entry is downloaded again.
	os.WriteFile(d.Path, []byte("bit rot"), 0o644)
	if d2, err := f.fetch(context.Background(), pinned, f.kernelFallback); err != nil || d2.SHA256 != d.SHA256 || len(f.stats.Downloaded) != 2 {
		t.Errorf("after damage: %+v, %v, downloaded %v", d2, err, f.stats.Downloaded)
	}
}

func TestFetchFallback(t *testing.T) {
	archive := map[string][]byte{newer.String(): newData, pinned.Name + "=" + "6.1.999-1": []byte("x")}
	apt := &fakeApt{lists: archive, mirror: archive, meta: newer.Name}
	f, logs := newTestFetcher(t, apt, true)
	d, err := f.fetch(context.Background(), pinned, f.kernelFallback)
	if err != nil {
		t.Fatal(err)
	}
	if d.Package != newer {
		t.Errorf("used %v, want %v", d.Package, newer)
	}
	if !strings.Contains(logs.String(), "[WARN]") || !strings.Contains(logs.String(), pinned.String()) || !strings.Contains(logs.String(), newer.String()) {
		t.Errorf("no warning naming both versions:\n%s", logs)
	}
	if apt.updates != 0 {
		t.Errorf("apt-get update ran %d times with lists present", apt.updates)
	}
	// Without a fallback the pin's absence is an error.
	if _, err := f.fetch(context.Background(), pinned, nil); !errors.Is(err, ErrPackageUnavailable) {
		t.Errorf("no fallback: err = %v", err)
	}
}

func TestFetchFallbackOutsideSeries(t *testing.T) {
	archive := map[string][]byte{"linux-image-6.12.0-1-amd64=6.12.1-1": newData}
	apt := &fakeApt{lists: archive, mirror: archive, meta: "linux-image-6.12.0-1-amd64"}
	f, _ := newTestFetcher(t, apt, true)
	if _, err := f.fetch(context.Background(), pinned, f.kernelFallback); !errors.Is(err, ErrPackageUnavailable) {
		t.Errorf("err = %v, want ErrPackageUnavailable", err)
	}
}

func TestFetchUpdatesMissingLists(t *testing.T) {
	archive := map[string][]byte{pinned.String(): pinData}
	apt := &fakeApt{lists: map[string][]byte{}, mirror: archive, after: archive, meta: pinned.Name}
	f, _ := newTestFetcher(t, apt, false)
	d, err := f.fetch(context.Background(), pinned, f.kernelFallback)
	if err != nil || d.Package != pinned {
		t.Fatalf("fetch: %+v, %v", d, err)
	}
	if apt.updates != 1 {
		t.Errorf("apt-get update ran %d times, want 1", apt.updates)
	}
}

func TestFetchStaleLists(t *testing.T) {
	// The lists still name the pinned build, the mirror has replaced it.
	stale := map[string][]byte{pinned.String(): pinData}
	fresh := map[string][]byte{newer.String(): newData}
	apt := &fakeApt{lists: stale, mirror: fresh, after: fresh, meta: newer.Name}
	f, _ := newTestFetcher(t, apt, true)
	d, err := f.fetch(context.Background(), pinned, f.kernelFallback)
	if err != nil || d.Package != newer {
		t.Fatalf("fetch: %+v, %v", d, err)
	}
	if apt.updates != 1 {
		t.Errorf("apt-get update ran %d times, want 1", apt.updates)
	}
}

func TestFetchChecksumMismatch(t *testing.T) {
	apt := &fakeApt{
		lists:  map[string][]byte{pinned.String(): pinData},
		mirror: map[string][]byte{pinned.String(): []byte("tampered")},
		meta:   pinned.Name,
	}
	f, _ := newTestFetcher(t, apt, true)
	_, err := f.fetch(context.Background(), pinned, f.kernelFallback)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("err = %v, want ErrChecksum", err)
	}
	if _, ok := f.cached(pinned); ok {
		t.Error("a mismatching download was cached")
	}
	if m, _ := filepath.Glob(filepath.Join(f.dir, "*")); len(m) != 0 {
		t.Errorf("left behind: %q", m)
	}
}

func TestParseApt(t *testing.T) {
	show := []byte(`Package: linux-image-6.1.0-56-amd64
Version: 6.1.192-1
Architecture: amd64
SHA256: 1111111111111111111111111111111111111111111111111111111111111111

Package: linux-image-6.1.0-56-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Description: Linux 6.1 for 64-bit PCs (signed)
 The Linux kernel 6.1 and modules
SHA256: a86e2049672f52354c4536a089203b6c82639420424d31c91cf31a181fd4d8f1
`)
	sum, err := parseAptShow(show, pinned)
	if err != nil || sum != "a86e2049672f52354c4536a089203b6c82639420424d31c91cf31a181fd4d8f1" {
		t.Errorf("parseAptShow = %q, %v", sum, err)
	}
	if _, err := parseAptShow(show, debPackage{pinned.Name, "0"}); !errors.Is(err, errNotInArchive) {
		t.Errorf("absent version: %v", err)
	}
	if _, err := parseAptShow([]byte("Package: p\nVersion: 1\nArchitecture: amd64\nSHA256: zz\n"), debPackage{"p", "1"}); err == nil {
		t.Error("bad SHA256 accepted")
	}
	dep, err := parseAptDepends([]byte("linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n  Depends: <foo>\n"), kernelSeries)
	if err != nil || dep != "linux-image-6.1.0-56-amd64" {
		t.Errorf("parseAptDepends = %q, %v", dep, err)
	}
	if v, err := parseAptCandidate([]byte("x:\n  Installed: (none)\n  Candidate: 1:1.35.0-4+deb12u1+b1\n")); err != nil || v != "1:1.35.0-4+deb12u1+b1" {
		t.Errorf("parseAptCandidate = %q, %v", v, err)
	}
	if _, err := parseAptCandidate([]byte("x:\n  Candidate: (none)\n")); err == nil {
		t.Error("(none) accepted")
	}
	if n := (debPackage{"busybox-static", "1:1.35.0-4+deb12u1+b1"}).fileName(); n != "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb" {
		t.Errorf("fileName = %q", n)
	}
}
