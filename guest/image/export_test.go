package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestParseAptCandidates(t *testing.T) {
	out := []byte(`libc6:
  Installed: 2.36-9+deb12u14
  Candidate: 2.36-9+deb12u14
  Version table:
 *** 2.36-9+deb12u14 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
zlib1g:
  Installed: (none)
  Candidate: 1:1.2.13.dfsg-1
  Version table:
     1:1.2.13.dfsg-1 500
gone:
  Installed: (none)
  Candidate: (none)
`)
	got := parseAptCandidates(out)
	want := map[string]string{"libc6": "2.36-9+deb12u14", "zlib1g": "1:1.2.13.dfsg-1"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

// debOf returns a .deb whose data.tar holds the given headers, with body
// as every regular file's content.
func debOf(t *testing.T, hdrs []tar.Header, body string) string {
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for _, h := range hdrs {
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(body))
		}
	}
	tw.Close()
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(tb.Bytes())
	zw.Close()
	p := filepath.Join(t.TempDir(), "x.deb")
	deb := makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"control.tar.gz", []byte("-")}, arMember{"data.tar.gz", gz.Bytes()})
	if err := os.WriteFile(p, deb, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestExtractDeb(t *testing.T) {
	outside := t.TempDir()
	deb := debOf(t, []tar.Header{
		{Name: "./", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "./usr/lib/", Typeflag: tar.TypeDir, Mode: 0o755},
		{Name: "./usr/lib/libx.so.1.0", Typeflag: tar.TypeReg, Mode: 0o644},
		{Name: "./usr/lib/libx.so.1", Typeflag: tar.TypeSymlink, Linkname: "libx.so.1.0"},
		{Name: "./usr/bin/tool", Typeflag: tar.TypeReg, Mode: 0o755},
		{Name: "./usr/bin/tool2", Typeflag: tar.TypeLink, Linkname: "./usr/bin/tool"},
		// A directory link pointing out of the tree, then a file through it.
		{Name: "./evil", Typeflag: tar.TypeSymlink, Linkname: outside},
		{Name: "./evil/planted", Typeflag: tar.TypeReg, Mode: 0o644},
	}, "content")
	dir := t.TempDir()
	err := ExtractDeb(context.Background(), deb, dir)
	if err == nil {
		t.Errorf("a file written through a symlink out of the tree: got no error")
	}
	if _, serr := os.Stat(filepath.Join(outside, "planted")); serr == nil {
		t.Fatalf("ExtractDeb wrote outside its directory")
	}
	tests := []struct {
		path string
		mode fs.FileMode
		link string
	}{
		{"usr/lib/libx.so.1.0", 0o644, ""},
		{"usr/lib/libx.so.1", fs.ModeSymlink, "libx.so.1.0"},
		{"usr/bin/tool", 0o755, ""},
		{"usr/bin/tool2", 0o755, ""},
	}
	for i, tt := range tests {
		p := filepath.Join(dir, tt.path)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Errorf("#%d %s: %v", i, tt.path, err)
			continue
		}
		if tt.link != "" {
			if got, _ := os.Readlink(p); fi.Mode()&fs.ModeSymlink == 0 || got != tt.link {
				t.Errorf("#%d %s: got %v -> %q, want a symlink to %q", i, tt.path, fi.Mode(), got, tt.link)
			}
			continue
		}
		data, _ := os.ReadFile(p)
		if fi.Mode() != tt.mode || string(data) != "content" {
			t.Errorf("#%d %s: got %v %q, want %v %q", i, tt.path, fi.Mode(), data, tt.mode, "content")
		}
	}
}

func TestWriteArchive(t *testing.T) {
	host := filepath.Join(t.TempDir(), "host")
	if err := os.WriteFile(host, []byte("from host"), 0o644); err != nil {
		t.Fatal(err)
	}
	files := []ArchiveFile{
		{Name: "/init", Mode: 0o755, Data: []byte("#!/bin/sh\n")},
		{Name: "/usr/lib/x/file", Mode: 0o644, Host: host},
		{Name: "/var/run", Mode: fs.ModeSymlink | 0o777, Data: []byte("/run")},
		{Name: "/dev/console", Mode: fs.ModeDevice | fs.ModeCharDevice | 0o600, Major: 5, Minor: 1},
		{Name: "/tmp", Mode: fs.ModeDir | fs.ModeSticky | 0o777},
	}
	dir := t.TempDir()
	file, hash, cached, err := WriteArchive(dir, files, false)
	if err != nil || cached {
		t.Fatalf("got %v, cached %v; want a fresh archive", err, cached)
	}
	if _, hash2, cached2, err := WriteArchive(dir, files, false); err != nil || !cached2 || hash2 != hash {
		t.Errorf("second write: got %s cached %v (%v), want %s from the cache", hash2, cached2, err, hash)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	entries, err := readNewc(b)
	if err != nil {
		t.Fatal(err)
	}
	type entry struct {
		name string
		mode uint32
		data string
	}
	var got []entry
	for _, e := range entries {
		got = append(got, entry{e.Name, e.Mode, string(e.Data)})
	}
	want := []entry{
		{"dev", modeDir | 0o755, ""},
		{"dev/console", modeCharDev | 0o600, ""},
		{"init", modeRegular | 0o755, "#!/bin/sh\n"},
		{"tmp", modeDir | 0o1777, ""},
		{"usr", modeDir | 0o755, ""},
		{"usr/lib", modeDir | 0o755, ""},
		{"usr/lib/x", modeDir | 0o755, ""},
		{"usr/lib/x/file", modeRegular | 0o644, "from host"},
		{"var", modeDir | 0o755, ""},
		{"var/run", modeSymlink | 0o777, "/run"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v\nwant %v", got, want)
	}

	bad := [][]ArchiveFile{
		{{Name: "relative", Mode: 0o644, Data: []byte{}}},
		{{Name: "/a/../b", Mode: 0o644, Data: []byte{}}},
		{{Name: "/twice", Mode: 0o644, Data: []byte{}}, {Name: "/twice", Mode: 0o644, Data: []byte{}}},
		{{Name: "/file", Mode: 0o644, Data: []byte{}}, {Name: "/file/below", Mode: 0o644, Data: []byte{}}},
	}
	for i, fs := range bad {
		if _, _, _, err := WriteArchive(dir, fs, false); !errors.Is(err, ErrBadPath) {
			t.Errorf("bad #%d: got %v, want ErrBadPath", i, err)
		}
	}
}
