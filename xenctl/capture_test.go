package xenctl

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl/xcstream"
	"github.com/snowflock-go/snowflock/xenctl/xenchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

func TestCaptureAndRestoreFrom(t *testing.T) {
	f := newFakeXL(t)
	f.image = testImage("sf-parent", 128, 200)
	cfg := f.config("sf-parent")
	cfg.MemMB = 128
	parent, err := Create(ctx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "cap")
	c, err := parent.Capture(ctx(t), CaptureOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if got := f.commands(); got[len(got)-1] != "save -c 1 /proc/self/fd/1" {
		t.Fatalf("ran %q", got[len(got)-1])
	}
	zero := uint64((200 + 6) / 7)
	if c.Info.DataPages != 200 || c.Info.ZeroPages != zero || c.Saved.Name != "sf-parent" || c.Saved.MaxMemKB != 128*1024 {
		t.Fatalf("capture %+v", c)
	}
	if info, err := parent.Info(ctx(t)); err != nil || info.State.Paused {
		t.Fatalf("the parent after a checkpoint: %+v, %v", info, err)
	}
	// Page n at byte n*4096; the last page (199) has data.
	if st, err := os.Stat(c.PagesPath); err != nil || st.Size() != 200*4096 {
		t.Fatalf("pages file: %v, %v", st, err)
	}

	// The clone, from the files alone.
	b, err := os.ReadFile(c.DescriptorPath)
	if err != nil || len(b) != c.DescriptorSize {
		t.Fatalf("descriptor file: %d bytes, %v", len(b), err)
	}
	var desc xcstream.Descriptor
	if err := desc.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	pages, err := OpenPageFile(c.PagesPath)
	if err != nil {
		t.Fatal(err)
	}
	defer pages.Close()
	clone, err := RestoreFrom(ctx(t), &desc, pages, f.config("sf-clone-1"))
	if err != nil {
		t.Fatal(err)
	}
	if clone.ID() != 2 || clone.Name() != "sf-clone-1" || clone.cfg.MemMB != 128 || clone.cfg.Type != TypePVH {
		t.Fatalf("clone %d %s %+v", clone.ID(), clone.Name(), clone.cfg)
	}
	got := f.commands()
	if strings.Join(got[len(got)-3:], "\n") != "restore -p -e /proc/self/fd/0\ndomid sf-clone-1\nunpause 2" {
		t.Fatalf("restore ran %q", got)
	}

	// xl read the parent's image byte for byte, but for the header's
	// configuration: another name, another UUID, no domain ID.
	origHeader, _ := readSaveHeader(bytes.NewReader(f.image))
	newHeader, err := readSaveHeader(bytes.NewReader(f.got))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(f.got[len(newHeader):], f.image[len(origHeader):]) {
		t.Fatal("the rebuilt stream differs from the saved one")
	}
	config, err := parseSaveHeader(newHeader)
	if err != nil {
		t.Fatal(err)
	}
	var orig, j savedJSON
	origConfig, _ := parseSaveHeader(origHeader)
	if err := json.Unmarshal(origConfig, &orig); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(config, &j); err != nil {
		t.Fatal(err)
	}
	if j.CInfo["name"] != "sf-clone-1" || j.CInfo["uuid"] == orig.CInfo["uuid"] ||
		!uuidPattern.MatchString(fmt.Sprint(j.CInfo["uuid"])) || j.BInfo["kernel"] != "/guest/vmlinux" ||
		len(j.NICs) != 1 || j.NICs[0]["mac"] == orig.NICs[0]["mac"] || j.NICs[0]["bridge"] != "xenbr0" {
		t.Fatalf("renamed configuration %s", config)
	}
}

// savedJSON is the part of a saved configuration the tests look at.
type savedJSON struct {
	CInfo map[string]any   `json:"c_info"`
	BInfo map[string]any   `json:"b_info"`
	NICs  []map[string]any `json:"nics"`
}

// TestRenameSaveHeader renames real xl's saved configuration: a new name
// and UUID, no domain ID, new MACs in Xen's OUI unless kept, and nothing
// else changed.
func TestRenameSaveHeader(t *testing.T) {
	config := []byte(strings.Replace(strings.TrimSpace(savedConfigPVH), `"c_info": {`, `"c_info": {"domid": 7,`, 1))
	var orig map[string]any
	if err := json.Unmarshal(config, &orig); err != nil {
		t.Fatal(err)
	}
	macs := map[string]bool{}
	for i, keep := range []bool{false, false, true} {
		renamed, saved, uuid, err := renameSaveHeader(buildSaveHeader(config), "copy", keep)
		if err != nil {
			t.Fatal(err)
		}
		if saved != (Saved{Name: "parent", Type: TypePVH, MaxMemKB: 131072, MaxVCPUs: 1}) {
			t.Errorf("#%d: saved %+v", i, saved)
		}
		got, err := parseSaveHeader(renamed)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(got, &m); err != nil {
			t.Fatal(err)
		}
		cinfo, nic := m["c_info"].(map[string]any), m["nics"].([]any)[0].(map[string]any)
		mac, _ := nic["mac"].(string)
		if cinfo["name"] != "copy" || cinfo["uuid"] != uuid || !uuidPattern.MatchString(uuid) || cinfo["domid"] != nil {
			t.Errorf("#%d: c_info %v", i, cinfo)
		}
		origMAC := orig["nics"].([]any)[0].(map[string]any)["mac"]
		switch {
		case keep && mac != origMAC:
			t.Errorf("#%d: kept MAC %s, want %s", i, mac, origMAC)
		case !keep && (mac == origMAC || macs[mac] || !strings.HasPrefix(mac, "00:16:3e:") || !macPattern.MatchString(mac) || mac[9] > '7'):
			t.Errorf("#%d: new MAC %s (the parent's %s, earlier %v)", i, mac, origMAC, macs)
		}
		macs[mac] = true
		// The rest is the parent's.
		want := maps.Clone(orig)
		want["c_info"] = maps.Clone(orig["c_info"].(map[string]any))
		want["c_info"].(map[string]any)["name"], want["c_info"].(map[string]any)["uuid"] = "copy", uuid
		delete(want["c_info"].(map[string]any), "domid")
		wantNIC := maps.Clone(orig["nics"].([]any)[0].(map[string]any))
		wantNIC["mac"] = mac
		want["nics"] = []any{wantNIC}
		if !reflect.DeepEqual(m, want) {
			t.Errorf("#%d: renamed\n%v\nwant\n%v", i, m, want)
		}
	}
}

func TestRestoreChecksTheSavedConfig(t *testing.T) {
	f := newFakeXL(t)
	img := testImage("p", 128, 10)
	for i, mod := range []func(*Config){
		func(c *Config) { c.MemMB = 256 },
		func(c *Config) { c.VCPUs = 2 },
		func(c *Config) { c.Type = TypePV },
		func(c *Config) { c.Name = "" },
	} {
		cfg := f.config("clone")
		mod(&cfg)
		if _, err := Restore(ctx(t), bytes.NewReader(img), cfg); err == nil {
			t.Errorf("#%d: restored", i)
		}
	}
	if n := len(f.commands()); n != 0 {
		t.Fatalf("ran %d commands", n)
	}
	cfg := f.config("clone")
	cfg.MemMB, cfg.VCPUs, cfg.Type = 128, 1, TypePVH
	if _, err := Restore(ctx(t), bytes.NewReader(img), cfg); err != nil {
		t.Fatalf("matching config: %v", err)
	}
	if _, err := Restore(ctx(t), bytes.NewReader(img[:100]), f.config("x")); !errors.Is(err, ErrBadSaveFile) {
		t.Fatalf("truncated header: %v", err)
	}
	file := filepath.Join(t.TempDir(), "vm.save")
	os.WriteFile(file, img, 0o600)
	if d, err := RestoreFile(ctx(t), file, f.config("from-file")); err != nil || d.Name() != "from-file" {
		t.Fatalf("restore from a file: %v", err)
	}
	if !bytes.Equal(f.got[len(f.got)-1000:], img[len(img)-1000:]) {
		t.Fatal("restore from a file read something else")
	}
}

func TestCaptureFailures(t *testing.T) {
	f := newFakeXL(t)
	d, err := Create(ctx(t), f.config("p"))
	if err != nil {
		t.Fatal(err)
	}
	// An image Split refuses: xl still gets to write all of it (and so
	// to resume the guest), and nothing is left behind.
	img := testImage("p", 256, 100)
	f.image = append(img[:len(img)-16:len(img)-16], bytes.Repeat([]byte{0xee}, 64<<10)...)
	dir := t.TempDir()
	if _, err := d.Capture(ctx(t), CaptureOptions{Dir: dir}); !errors.Is(err, xcstream.ErrBadRecord) && !errors.Is(err, xcstream.ErrTruncated) && !errors.Is(err, xcstream.ErrTooLarge) {
		t.Fatalf("bad image: %v", err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
	f.image = testImage("p", 256, 10)
	f.fail["save"] = "libxl: error: libxl_dom_suspend.c:300:suspend_common_wait_guest_timeout: guest did not suspend, timed out\nFailed to save domain, resuming domain\n"
	_, err = d.Capture(ctx(t), CaptureOptions{Dir: dir})
	var ee *ExitError
	if !errors.As(err, &ee) || !strings.Contains(err.Error(), "resuming domain") {
		t.Fatalf("failed save: %v", err)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
	if _, err := d.Capture(ctx(t), CaptureOptions{}); err == nil {
		t.Fatal("capture to nowhere")
	}
}

// mapStore is a xenchan.Store in memory that records writes.
type mapStore struct {
	mu    sync.Mutex
	nodes map[string][]byte
	fail  bool
}

func (m *mapStore) Read(_ context.Context, p string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.nodes[p]
	if !ok {
		return nil, &xenstore.Error{Op: xenstore.OpRead, Path: p, Code: "ENOENT"}
	}
	return v, nil
}

func (m *mapStore) Write(_ context.Context, p string, v []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fail {
		return &xenstore.Error{Op: xenstore.OpWrite, Path: p, Code: "EACCES"}
	}
	m.nodes[p] = v
	return nil
}

func (m *mapStore) Mkdir(ctx context.Context, p string) error { return m.Write(ctx, p, nil) }
func (m *mapStore) Rm(context.Context, string) error          { return nil }
func (m *mapStore) Directory(context.Context, string) ([]string, error) {
	return nil, nil
}
func (m *mapStore) SetPerms(context.Context, string, []xenstore.Perm) error { return nil }

func TestRestorePreparesTheChannelBeforeUnpausing(t *testing.T) {
	f := newFakeXL(t)
	store := &mapStore{nodes: map[string][]byte{"/local/domain/1": nil, "/local/domain/2": nil}}
	cfg := f.config("clone")
	greet, _ := guestchan.Answer(5, guestchan.CloneResult{CloneID: 1, Ticket: 2})
	cfg.Channel = &xenchan.Setup{Identity: &guestchan.Identity{VMID: 9, Role: "clone"}, Greeting: []*guestchan.Response{greet}}
	cfg.Store = store
	d, err := Restore(ctx(t), bytes.NewReader(testImage("p", 64, 3)), cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"/local/domain/1/snowflock/epoch", "/local/domain/1/snowflock/identity", "/local/domain/1/snowflock/resp/5/n"} {
		if _, ok := store.nodes[n]; !ok {
			t.Errorf("no %s", n)
		}
	}
	if got := f.commands(); got[len(got)-1] != "unpause 1" {
		t.Fatalf("commands %q", got)
	}
	d.Destroy(ctx(t))

	// A channel that cannot be laid out: the domain is destroyed.
	store.fail = true
	if _, err := Restore(ctx(t), bytes.NewReader(testImage("p", 64, 3)), cfg); !errors.Is(err, xenstore.ErrPermission) {
		t.Fatalf("restore with a failing store: %v", err)
	}
	got := f.commands()
	if got[len(got)-1] != "destroy 2" || slices.Contains(got, "unpause 2") {
		t.Fatalf("commands %q", got)
	}
}

func TestPageFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pages")
	p, err := CreatePageFile(path)
	if err != nil {
		t.Fatal(err)
	}
	page := bytes.Repeat([]byte{7}, xcstream.PageSize)
	for _, pfn := range []uint64{0, 5, 1 << 20} {
		binary.LittleEndian.PutUint64(page, pfn)
		if err := p.PutPage(pfn, page); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.PutPage(MaxPageFilePFN+1, page); err == nil {
		t.Fatal("page beyond the limit stored")
	}
	if _, err := CreatePageFile(path); err == nil {
		t.Fatal("created over an existing file")
	}
	p.Close()
	r, err := OpenPageFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got := make([]byte, xcstream.PageSize)
	for _, pfn := range []uint64{0, 5, 1 << 20} {
		if err := r.Page(pfn, got); err != nil || binary.LittleEndian.Uint64(got) != pfn {
			t.Fatalf("page %d: %v", pfn, err)
		}
	}
	if err := r.Page(3, got); err != nil || !reflect.DeepEqual(got, make([]byte, xcstream.PageSize)) {
		t.Fatalf("a hole: %v", err)
	}
	if err := r.Page(1<<20+1, got); err == nil {
		t.Fatal("read past the end")
	}
}

// TestPageBatch: Capture's batched writes land where PutPage's would,
// and PageRun reads runs back.
func TestPageBatch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "pages")
	p, err := CreatePageFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b := newPageBatch(p)
	var pfns []uint64
	for pfn := uint64(0); pfn < 600; pfn++ { // runs longer than a batch
		pfns = append(pfns, pfn)
	}
	pfns = append(pfns, 700, 702, 703, 0xfeff8, 0xfefff) // and short ones, far up
	page := make([]byte, xcstream.PageSize)
	for _, pfn := range pfns {
		binary.LittleEndian.PutUint64(page, pfn+1)
		if err := b.PutPage(pfn, page); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.PutPage(MaxPageFilePFN+1, page); err == nil {
		t.Fatal("page beyond the limit taken")
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	p.Close()
	r, err := OpenPageFile(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	for _, pfn := range pfns {
		if err := r.Page(pfn, page); err != nil || binary.LittleEndian.Uint64(page) != pfn+1 {
			t.Fatalf("page %#x: %v", pfn, err)
		}
	}
	run := make([]byte, 4*xcstream.PageSize)
	if err := r.PageRun(700, run); err != nil {
		t.Fatal(err)
	}
	for i, want := range []uint64{701, 0, 703, 704} { // 701 is a hole
		if got := binary.LittleEndian.Uint64(run[i*xcstream.PageSize:]); got != want {
			t.Errorf("run from 700, page %d: %d, want %d", i, got, want)
		}
	}
	if err := r.PageRun(0xfeffe, run[:3*xcstream.PageSize]); err == nil {
		t.Error("a run past the end read")
	}
	if err := r.PageRun(0, run[:100]); err == nil {
		t.Error("a run of part of a page read")
	}
}

func TestSaveHeader(t *testing.T) {
	config := []byte(strings.TrimSpace(savedConfigPVH))
	h := buildSaveHeader(config)
	got, err := parseSaveHeader(h)
	if err != nil || !bytes.Equal(got, config) {
		t.Fatalf("%q, %v", got, err)
	}
	s, err := readSaved(h)
	if err != nil || s != (Saved{Name: "parent", Type: TypePVH, MaxMemKB: 131072, MaxVCPUs: 1}) {
		t.Fatalf("saved %+v, %v", s, err)
	}
	le := binary.LittleEndian
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(h)) }
	for i, bad := range [][]byte{
		h[:47],
		mod(func(b []byte) []byte { b[0] = 'x'; return b }),
		mod(func(b []byte) []byte { le.PutUint32(b[32:], 0x04030201); return b }),
		mod(func(b []byte) []byte { le.PutUint32(b[36:], saveFlagStreamV2); return b }), // not JSON
		mod(func(b []byte) []byte { le.PutUint32(b[36:], saveFlagsKnown|4); return b }),
		mod(func(b []byte) []byte { le.PutUint32(b[40:], 1); return b }),
		mod(func(b []byte) []byte { le.PutUint32(b[44:], 1); return b }),
		mod(func(b []byte) []byte { return b[:len(b)-1] }),
		mod(func(b []byte) []byte { b[len(b)-1] = '}'; return b }),           // no nul
		mod(func(b []byte) []byte { le.PutUint32(b[48:], 1<<30); return b }), // config longer than the data
	} {
		if _, err := parseSaveHeader(bad); !errors.Is(err, ErrBadSaveFile) {
			t.Errorf("#%d: %v", i, err)
		}
	}
	renamed, s, _, err := renameSaveHeader(h, "c", false)
	if err != nil || s.Name != "parent" {
		t.Fatal(err)
	}
	if s2, _ := readSaved(renamed); s2.Name != "c" || s2.MaxMemKB != 131072 {
		t.Fatalf("renamed %+v", s2)
	}
}

func TestCancelledCaptureLetsXLResume(t *testing.T) {
	f := newFakeXL(t)
	d, err := Create(ctx(t), f.config("p"))
	if err != nil {
		t.Fatal(err)
	}
	f.image = testImage("p", 256, 400)
	f.slowSave = true
	cctx, cancel := context.WithTimeout(ctx(t), 30*time.Millisecond)
	defer cancel()
	dir := t.TempDir()
	if _, err := d.Capture(cctx, CaptureOptions{Dir: dir}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("cancelled capture: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// xl ran to its own end (a broken pipe, then resuming the guest) on a
	// context nobody cancelled.
	if f.saveCtx != nil {
		t.Fatalf("xl save's context ended: %v", f.saveCtx)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// fakeXLScript is an xl for LocalRunner: a shell script that streams like
// xl does, through /proc/self/fd/0 and 1 opened by name (with dd), so the
// pipes between xenctl and a real process are exercised.
const fakeXLScript = `#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/calls"
case "$1" in
create) for a in "$@"; do case "$a" in name=*) n=${a#name=}; n=${n#\"}; n=${n%\"}; echo 1 > "$dir/dom-$n";; esac; done ;;
domid) cat "$dir/dom-$2" 2>/dev/null || { echo "Can't get domid of domain name '$2', maybe this domain does not exist." >&2; exit 1; } ;;
pause|unpause) ;;
save) dd if="$dir/image" of="$4" bs=64k status=none ;;
restore) dd if="$4" of="$dir/restored" bs=64k status=none && echo 2 > "$dir/dom-$CLONE_NAME" ;;
*) echo "unknown $1" >&2; exit 2 ;;
esac
`

func TestCaptureAndRestoreThroughProcesses(t *testing.T) {
	if _, err := exec.LookPath("dd"); err != nil {
		t.Skip("no dd")
	}
	bin := t.TempDir()
	xlPath := filepath.Join(bin, "xl")
	if err := os.WriteFile(xlPath, []byte(fakeXLScript), 0o755); err != nil {
		t.Fatal(err)
	}
	img := testImage("p", 64, 1000) // 4 MB: more than a pipe holds
	if err := os.WriteFile(filepath.Join(bin, "image"), img, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CLONE_NAME", "clone")
	cfg := Config{Name: "p", XL: xlPath, MemMB: 64}
	d, err := Create(ctx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Capture(ctx(t), CaptureOptions{Dir: filepath.Join(t.TempDir(), "cap")})
	if err != nil {
		t.Fatal(err)
	}
	pages, err := OpenPageFile(c.PagesPath)
	if err != nil {
		t.Fatal(err)
	}
	defer pages.Close()
	if _, err := RestoreFrom(ctx(t), c.Descriptor, pages, Config{Name: "clone", XL: xlPath}); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(bin, "restored"))
	if err != nil {
		t.Fatal(err)
	}
	h1, _ := readSaveHeader(bytes.NewReader(img))
	h2, err := readSaveHeader(bytes.NewReader(got))
	if err != nil || !bytes.Equal(got[len(h2):], img[len(h1):]) {
		t.Fatalf("restored %d bytes, saved %d: %v", len(got), len(img), err)
	}
	calls, _ := os.ReadFile(filepath.Join(bin, "calls"))
	if !strings.Contains(string(calls), "save -c 1 /proc/self/fd/1\n") || !strings.Contains(string(calls), "restore -p -e /proc/self/fd/0\n") {
		t.Fatalf("calls:\n%s", calls)
	}
}
