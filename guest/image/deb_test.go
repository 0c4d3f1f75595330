package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// arMember is a member for makeAr.
type arMember struct {
	name string
	data []byte
}

// makeAr writes a GNU-style ar archive, as dpkg-deb does.
func makeAr(members ...arMember) []byte {
	var b bytes.Buffer
	b.WriteString(arMagic)
	for _, m := range members {
		fmt.Fprintf(&b, "%-16s%-12d%-6d%-6d%-8s%-10d`\n", m.name, 0, 0, 0, "100644", len(m.data))
		b.Write(m.data)
		if len(m.data)%2 == 1 {
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

// makeTar writes a tar archive of regular files, named like dpkg-deb does.
func makeTar(files map[string][]byte, order []string) []byte {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, n := range order {
		tw.WriteHeader(&tar.Header{Name: "./" + n, Mode: 0o644, Size: int64(len(files[n])), Typeflag: tar.TypeReg})
		tw.Write(files[n])
	}
	tw.Close()
	return b.Bytes()
}

// makeDeb returns a .deb with a gzip-compressed data.tar of files.
func makeDeb(files map[string][]byte, order []string) []byte {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(makeTar(files, order))
	zw.Close()
	return makeAr(
		arMember{"debian-binary", []byte("2.0\n")},
		arMember{"control.tar.gz", []byte("not read")},
		arMember{"data.tar.gz", gz.Bytes()},
	)
}

func readAllMembers(data []byte) ([]arMember, error) {
	ar := newArReader(bytes.NewReader(data))
	var out []arMember
	for {
		h, err := ar.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		b, err := io.ReadAll(ar)
		if err != nil {
			return out, err
		}
		if int64(len(b)) != h.Size {
			return out, fmt.Errorf("member %s: read %d bytes, header says %d", h.Name, len(b), h.Size)
		}
		out = append(out, arMember{h.Name, b})
	}
}

func TestArReader(t *testing.T) {
	good := makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"odd", []byte("abc")}, arMember{"data.tar.xz", []byte("x")})
	tests := []struct {
		name    string
		data    []byte
		members int
		corrupt bool
	}{
		{"valid", good, 3, false},
		{"empty archive", []byte(arMagic), 0, false},
		{"last pad missing", good[:len(good)-1], 3, false},
		{"no magic", []byte("!<arch>"), 0, true},
		{"wrong magic", []byte("!<arch>XYZ"), 0, true},
		{"truncated header", good[:len(arMagic)+30], 0, true},
		{"truncated data", good[:len(good)-3], 2, true},
		{"bad terminator", bytes.Replace(good, []byte("`\n"), []byte("`X"), 1), 0, true},
		{"bad size", bytes.Replace(good, []byte("4         `"), []byte("-4        `"), 1), 0, true},
		{"huge size", bytes.Replace(good, []byte("4         `"), []byte("9999999999`"), 1), 0, true},
		{"slash in name", makeAr(arMember{"a/b", nil}), 0, true},
	}
	for i, tt := range tests {
		got, err := readAllMembers(tt.data)
		if tt.corrupt != (err != nil) || (err != nil && !errors.Is(err, ErrCorruptDeb)) {
			t.Errorf("#%d %s: err = %v, want corrupt %v", i, tt.name, err, tt.corrupt)
		}
		if len(got) != tt.members {
			t.Errorf("#%d %s: got %d members, want %d", i, tt.name, len(got), tt.members)
		}
	}
	got, _ := readAllMembers(good)
	if string(got[1].data) != "abc" || got[1].name != "odd" || string(got[2].data) != "x" {
		t.Errorf("members = %q", got)
	}
}

func TestOpenDebData(t *testing.T) {
	files := map[string][]byte{"boot/x": []byte("kernel"), "bin/busybox": []byte("bb")}
	deb := makeDeb(files, []string{"bin/busybox", "boot/x"})
	dir := t.TempDir()
	p := filepath.Join(dir, "ok.deb")
	os.WriteFile(p, deb, 0o644)
	var names []string
	err := walkDeb(context.Background(), p, func(e debEntry) error {
		b, err := io.ReadAll(e.Data)
		if err != nil {
			return err
		}
		if string(b) != string(files[e.Name]) {
			t.Errorf("%s = %q", e.Name, b)
		}
		names = append(names, e.Name)
		return nil
	})
	if err != nil || strings.Join(names, ",") != "bin/busybox,boot/x" {
		t.Fatalf("walkDeb: %v %v", names, err)
	}

	bad := []struct {
		name string
		data []byte
		want error
	}{
		{"not ar", []byte("hello world"), ErrCorruptDeb},
		{"no debian-binary", makeAr(arMember{"data.tar", nil}), ErrCorruptDeb},
		{"format 3", makeAr(arMember{"debian-binary", []byte("3.0\n")}), ErrCorruptDeb},
		{"no data", makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"control.tar.gz", nil}), ErrCorruptDeb},
		{"zstd", makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"data.tar.zst", []byte("x")}), ErrUnsupportedCompression},
		{"bad gzip", makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"data.tar.gz", []byte("xxxxxxxxxxxxxxxxxxxxxxxxx")}), ErrCorruptDeb},
		{"bad xz", makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"data.tar.xz", []byte("xxxxxxxxxxxxxxxxxxxxxxxxx")}), ErrCorruptDeb},
		{"truncated", deb[:len(deb)-40], ErrCorruptDeb},
		{"bad tar", makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"data.tar", bytes.Repeat([]byte("z"), 1024)}), ErrCorruptDeb},
	}
	for i, tt := range bad {
		p := filepath.Join(dir, fmt.Sprintf("bad%d.deb", i))
		os.WriteFile(p, tt.data, 0o644)
		err := walkDeb(context.Background(), p, func(e debEntry) error {
			_, err := io.ReadAll(e.Data)
			return err
		})
		if !errors.Is(err, tt.want) {
			t.Errorf("#%d %s: err = %v, want %v", i, tt.name, err, tt.want)
		}
	}
}

// FuzzArReader: any input either parses into members whose sizes match
// their headers or fails with ErrCorruptDeb, and never panics.
func FuzzArReader(f *testing.F) {
	f.Add(makeAr(arMember{"debian-binary", []byte("2.0\n")}, arMember{"control.tar.xz", []byte("abc")}, arMember{"data.tar.xz", []byte("hello")}))
	f.Add(makeAr())
	f.Add(makeAr(arMember{"a/", []byte("x")}))
	f.Add([]byte("!<arch>\ndebian-binary   0           0     0     100644  4         `\n2.0\n"))
	f.Add(makeDeb(map[string][]byte{"bin/busybox": []byte("bb")}, []string{"bin/busybox"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		members, err := readAllMembers(data)
		if err != nil && !errors.Is(err, ErrCorruptDeb) {
			t.Fatalf("error %v does not wrap ErrCorruptDeb", err)
		}
		if err == nil {
			// Writing the members again and reading them back is stable.
			again, err := readAllMembers(makeAr(members...))
			if err != nil || len(again) != len(members) {
				t.Fatalf("re-read: %v, %d members, want %d", err, len(again), len(members))
			}
			for i := range members {
				if again[i].name != members[i].name || !bytes.Equal(again[i].data, members[i].data) {
					t.Fatalf("member %d changed", i)
				}
			}
		}
		// openDebData on the same bytes must not panic either.
		if r, err := openDebData(bytes.NewReader(data)); err == nil {
			io.Copy(io.Discard, io.LimitReader(r, 1<<20))
		}
	})
}
