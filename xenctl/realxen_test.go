package xenctl_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/internal/xenbed"
	"github.com/snowflock-go/snowflock/xenctl"
	"github.com/snowflock-go/snowflock/xenctl/internal/realxen"
	"github.com/snowflock-go/snowflock/xenctl/xcstream"
)

// The tests in this file run xenctl on real Xen 4.17: two xenbed hosts
// (QEMU TCG) whose dom0s carry dom0tool, which runs xenctl there as sfhostd
// will, and a PVH test guest (see package realxen). They share one bed,
// started by the first test that needs it and closed by TestMain, and skip
// where a bed cannot run (xenbed.Available) or with -short, except under
// CI=true, where that is a failure.
//
//	go test ./xenctl -run RealXen -v            about 2 minutes
//	go test ./xenctl -run RealXen -update       rewrites testdata/xl from real xl

var update = flag.Bool("update", false, "write real xl output to testdata/xl")

var shared struct {
	once  sync.Once
	bed   *xenbed.Bed
	err   error
	files string // the bed's dom0 files, built by realxen.Files
}

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if shared.bed != nil {
		if err := shared.bed.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "closing the bed:", err)
			code = 1
		}
	}
	if shared.files != "" {
		os.RemoveAll(shared.files)
	}
	os.Exit(code)
}

func realXen(t *testing.T) *xenbed.Bed {
	t.Helper()
	if testing.Short() {
		t.Skip("boots Xen under QEMU TCG (minutes); not with -short")
	}
	if err := xenbed.Available(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("CI=true and %v", err)
		}
		t.Skip(err)
	}
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
		defer cancel()
		log := hclog.New(&hclog.LoggerOptions{Name: "realxen", Level: hclog.Info, Output: os.Stderr})
		if shared.files, shared.err = os.MkdirTemp("", "xenctl-realxen-"); shared.err != nil {
			return
		}
		files, err := realxen.Files(ctx, shared.files, log)
		if err != nil {
			shared.err = err
			return
		}
		shared.bed, shared.err = xenbed.Start(ctx, xenbed.Options{Hosts: 2, Files: files, Logger: log})
	})
	if shared.err != nil {
		t.Fatal(shared.err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range shared.bed.Hosts {
				res, _ := h.Run(context.Background(), "xl", "list")
				t.Logf("host %d: xl list:\n%s", h.Index+1, res)
			}
		}
	})
	return shared.bed
}

// guestArgs are dom0tool create's flags for the test guest.
func guestArgs(name string, channel bool) []string {
	args := []string{"create", "-name", name, "-kernel", realxen.KernelPath, "-ramdisk", realxen.InitrdPath, "-mem", "128", "-vif"}
	if channel {
		args = append(args, "-chan", "-cmdline", "console=hvc0 guestinit.chan=1")
	}
	return args
}

// timed is dom0tool's answer to create, restore, pause, unpause, destroy.
type timed struct {
	ID   uint32        `json:"id"`
	Took time.Duration `json:"took"`
}

// captured is dom0tool's answer to capture.
type captured struct {
	xenctl.Capture
	Took          time.Duration    `json:"took"`
	StoredRuns    int              `json:"stored_runs"`
	PagesFileSize int64            `json:"pages_file_size"`
	PageTypes     map[uint8]uint64 `json:"page_types"`
}

// tool runs dom0tool on h, failing the test if it fails.
func tool(ctx context.Context, t *testing.T, h *xenbed.Host, out any, args ...string) {
	t.Helper()
	if _, err := realxen.Tool(ctx, h, out, args...); err != nil {
		t.Fatalf("host %d: %v", h.Index+1, err)
	}
}

func info(ctx context.Context, t *testing.T, h *xenbed.Host, name string) xenctl.Info {
	t.Helper()
	var in xenctl.Info
	tool(ctx, t, h, &in, "info", "-name", name)
	return in
}

// waitConsole polls name's console on h until ok says it has what is
// wanted, and returns it.
func waitConsole(ctx context.Context, t *testing.T, h *xenbed.Host, name, what string, ok func(string) bool) string {
	t.Helper()
	for {
		c, err := realxen.Console(ctx, h, name)
		if err != nil {
			t.Fatal(err)
		}
		if ok(c) {
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("host %d: %s's console never showed %s; it ends:\n%s", h.Index+1, name, what, lastLines(c, 25))
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// waitTick waits until name's count on h passes after and returns the
// console.
func waitTick(ctx context.Context, t *testing.T, h *xenbed.Host, name string, after int) string {
	t.Helper()
	return waitConsole(ctx, t, h, name, fmt.Sprintf("a count past %d", after), func(c string) bool {
		ticks := realxen.Ticks(c)
		return len(ticks) > 0 && ticks[len(ticks)-1].N > after
	})
}

func lastTick(t *testing.T, console string) realxen.Tick {
	t.Helper()
	ticks := realxen.Ticks(console)
	if len(ticks) == 0 {
		t.Fatalf("no count on the console:\n%s", lastLines(console, 25))
	}
	return ticks[len(ticks)-1]
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestRealXenLifecycle creates a PVH guest with xenctl in a real dom0,
// reads its Info, pauses and unpauses it, cancels a capture (xl must
// resume the guest) and destroys it.
func TestRealXenLifecycle(t *testing.T) {
	bed := realXen(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	h := bed.Hosts[0]
	const name = "life"

	var made timed
	tool(ctx, t, h, &made, guestArgs(name, false)...)
	c := waitTick(ctx, t, h, name, 1)
	in := info(ctx, t, h, name)
	if in.ID != made.ID || in.Name != name || in.Type != xenctl.TypePVH || in.MaxMemKB != 128<<10 || in.MaxVCPUs != 1 ||
		in.MemMB != 128 || in.Kernel != realxen.KernelPath || len(in.MACs) != 1 || in.State.Paused || in.State.Shutdown {
		t.Fatalf("Info: %+v", in)
	}
	macs := realxen.Lines(c, "guestinit mac ")
	if len(macs) == 0 || macs[len(macs)-1] != in.MACs[0] {
		t.Errorf("the guest's MAC is %q, Info says %q", macs, in.MACs)
	}
	t.Logf("create: %v (domain %d)", made.Took.Round(time.Millisecond), made.ID)

	tool(ctx, t, h, nil, "pause", "-name", name)
	if in := info(ctx, t, h, name); !in.State.Paused {
		t.Fatalf("paused: state %s", in.State)
	}
	if *update {
		writeFixtures(ctx, t, h, made.ID)
	}
	c, err := realxen.Console(ctx, h, name)
	if err != nil {
		t.Fatal(err)
	}
	before := lastTick(t, c).N
	time.Sleep(2500 * time.Millisecond)
	c, _ = realxen.Console(ctx, h, name)
	if n := lastTick(t, c).N; n != before {
		t.Errorf("paused, the count went on from %d to %d", before, n)
	}
	tool(ctx, t, h, nil, "unpause", "-name", name)
	if in := info(ctx, t, h, name); in.State.Paused {
		t.Fatalf("unpaused: state %s", in.State)
	}
	waitTick(ctx, t, h, name, before)

	// A capture whose context ends: xl fails, resumes the guest, and
	// nothing of the capture stays.
	const dir = "/var/lib/xen/cancelled"
	_, err = realxen.Tool(ctx, h, nil, "capture", "-name", name, "-dir", dir, "-timeout", "1500ms")
	var te *realxen.ToolError
	if !errors.As(err, &te) || !strings.Contains(err.Error(), "context deadline exceeded") {
		t.Fatalf("capture with 1.5 s to go: got %v, want a deadline error", err)
	}
	c, _ = realxen.Console(ctx, h, name)
	waitTick(ctx, t, h, name, lastTick(t, c).N)
	if in := info(ctx, t, h, name); in.State.Paused || in.State.Shutdown {
		t.Errorf("after the cancelled capture: state %s", in.State)
	}
	if out, err := h.Run(ctx, "ls", "-A", dir); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("the cancelled capture left %q (%v)", out, err)
	}

	tool(ctx, t, h, nil, "destroy", "-name", name)
	_, err = realxen.Tool(ctx, h, nil, "info", "-name", name)
	if err == nil || !strings.Contains(err.Error(), "no such domain") {
		t.Errorf("Info of the destroyed domain: got %v, want no such domain", err)
	}
}

// TestRealXenCloneAcrossHosts captures a running guest on host 1 while it
// waits on a guest channel call, restores two clones of the capture side
// by side on host 2, and checks that the parent runs on, that the clones
// continue from the parent's memory, with new names and MACs, and that
// each receives its clone ID in the call it was making (the greeting),
// then talks to its new host. It does so for a PVH and a PV guest (the
// same kernel and initramfs).
func TestRealXenCloneAcrossHosts(t *testing.T) {
	bed := realXen(t)
	for _, typ := range []xenctl.Type{xenctl.TypePVH, xenctl.TypePV} {
		t.Run(string(typ), func(t *testing.T) { cloneAcrossHosts(t, bed, typ) })
	}
}

func cloneAcrossHosts(t *testing.T, bed *xenbed.Bed, typ xenctl.Type) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	h1, h2 := bed.Hosts[0], bed.Hosts[1]
	parent, dir, release := "parent-"+string(typ), "/var/lib/xen/capture-"+string(typ), "/run/release-"+string(typ)
	clones := []string{"clone1-" + string(typ), "clone2-" + string(typ)}
	defer func() {
		if t.Failed() { // else gone already
			realxen.Tool(context.Background(), h1, nil, "destroy", "-name", parent)
			for _, name := range clones {
				realxen.Tool(context.Background(), h2, nil, "destroy", "-name", name)
			}
		}
	}()

	var made timed
	tool(ctx, t, h1, &made, append(guestArgs(parent, true), "-type", string(typ))...)
	served := serve(ctx, h1, parent, 3, release)
	c := waitConsole(ctx, t, h1, parent, "the clone call", func(c string) bool {
		return strings.Contains(c, "guestinit call 2 clone") || strings.Contains(c, "chan-error")
	})
	wantAnswer(t, c, 1, `"result":{"vm_id":7,"role":"parent","host":"xenbed-h1"}`)
	parentInfo := info(ctx, t, h1, parent)
	if parentInfo.Type != typ {
		t.Fatalf("the parent's type is %q, want %q", parentInfo.Type, typ)
	}
	c = waitTick(ctx, t, h1, parent, 3)

	// Capture while the guest waits for its clone call's answer.
	before := lastTick(t, c)
	var cp captured
	tool(ctx, t, h1, &cp, "capture", "-name", parent, "-dir", dir)
	c = waitTick(ctx, t, h1, parent, before.N+1)
	if in := info(ctx, t, h1, parent); in.State.Paused || in.State.Shutdown {
		t.Fatalf("the parent after its capture: state %s", in.State)
	}
	ticks := realxen.Ticks(c)
	for _, tk := range ticks {
		if tk.Secret != before.Secret {
			t.Fatalf("the parent's secret changed: %s, then %s", before.Secret, tk.Secret)
		}
	}
	// The guest was suspended where its count shows the longest gap; its
	// count after the gap is where a clone of the capture starts.
	resumed, gap := afterGap(ticks, before.N)
	suspended := gap - time.Second
	if _, err := h1.Run(ctx, "touch", release); err != nil {
		t.Fatal(err)
	}
	c = waitConsole(ctx, t, h1, parent, "the parent's answers", func(c string) bool { return strings.Contains(c, "guestinit answer 3 ") })
	wantAnswer(t, c, 2, `"result":{"clone_id":0,"ticket":9}`)
	if reqs := <-served; reqs.err != nil || len(reqs.calls) != 3 {
		t.Fatalf("host 1 served %q, %v", reqs.calls, reqs.err)
	}

	// Carry the capture to host 2: the page file is sparse up to the
	// highest frame, so the pages travel packed.
	var packed struct {
		Pages int64         `json:"pages"`
		Took  time.Duration `json:"took"`
	}
	tool(ctx, t, h1, &packed, "pack", "-dir", dir)
	local := t.TempDir()
	begin := time.Now()
	for _, f := range []string{xenctl.DescriptorFile, "pages.packed"} {
		if err := h1.Get(ctx, dir+"/"+f, filepath.Join(local, f)); err != nil {
			t.Fatal(err)
		}
		if err := h2.Put(ctx, filepath.Join(local, f), dir+"/"+f); err != nil {
			t.Fatal(err)
		}
	}
	carried := time.Since(begin)
	h1.Run(ctx, "rm", "-rf", dir)
	tool(ctx, t, h2, nil, "unpack", "-dir", dir)
	desc := readDescriptor(t, filepath.Join(local, xenctl.DescriptorFile))
	if *update && typ == xenctl.TypePVH {
		writeFixture(t, "saved-config-pvh.json", savedConfig(t, desc.SaveFile))
	}

	// Two clones of the one capture, side by side.
	restored := map[string]timed{}
	serving := map[string]<-chan servedCalls{}
	for k, name := range clones {
		k++
		var r timed
		tool(ctx, t, h2, &r, "restore", "-name", name, "-dir", dir, "-chan", "-clone", fmt.Sprint(k))
		restored[name] = r
		serving[name] = serve(ctx, h2, name, 1, "")
	}
	macs := map[string]string{parentInfo.MACs[0]: parent}
	for k, name := range clones {
		k++
		c := waitConsole(ctx, t, h2, name, "the clone's second hello", func(c string) bool {
			return strings.Contains(c, "guestinit answer 3 ") || strings.Contains(c, "chan-error")
		})
		wantAnswer(t, c, 2, fmt.Sprintf(`"result":{"clone_id":%d,"ticket":9}`, k))
		wantAnswer(t, c, 3, fmt.Sprintf(`"result":{"vm_id":%d,"role":"clone","host":"xenbed-h2","ticket":9,"clone_id":%d,"parent_vm":7}`, 7+k, k))
		if s := <-serving[name]; s.err != nil || len(s.calls) != 1 {
			t.Errorf("%s: host 2 served %q, %v", name, s.calls, s.err)
		}
		// The clone continues the count from where the capture took it,
		// as the parent did.
		ticks := realxen.Ticks(c)
		if strings.Contains(c, "Linux version") || len(ticks) == 0 || ticks[0].N != resumed.N {
			t.Fatalf("%s did not resume from the parent's count (%d after the capture); the clone's console:\n%s",
				name, resumed.N, lastLines(c, 30))
		}
		if ticks[0].Secret != before.Secret {
			t.Errorf("%s: secret %s, the parent's %s", name, ticks[0].Secret, before.Secret)
		}
		in := info(ctx, t, h2, name)
		if in.Name != name || in.Type != typ || in.ID != restored[name].ID || in.State.Paused || in.State.Shutdown || in.MaxMemKB != 128<<10 || len(in.MACs) != 1 {
			t.Errorf("%s: Info %+v", name, in)
			continue
		}
		if other, dup := macs[in.MACs[0]]; dup {
			t.Errorf("%s has %s's MAC %s", name, other, in.MACs[0])
		}
		macs[in.MACs[0]] = name
		// The guest reports its MAC when it sees it change, on its next
		// tick after the NIC has reconnected. Some restores leave the
		// guest's eth0 with the parent's address although the vif has the
		// new one (an open bug): wait a while, then log rather than hang.
		mctx, mcancel := context.WithTimeout(ctx, 30*time.Second)
		for !slices.Contains(realxen.Lines(c, "guestinit mac "), in.MACs[0]) && mctx.Err() == nil {
			time.Sleep(500 * time.Millisecond)
			c, _ = realxen.Console(ctx, h2, name)
		}
		mcancel()
		if seen := realxen.Lines(c, "guestinit mac "); !slices.Contains(seen, in.MACs[0]) {
			front, _ := h2.Run(ctx, "xenstore-ls", "-f", fmt.Sprintf("/local/domain/%d/device/vif", in.ID))
			back, _ := h2.Run(ctx, "xenstore-ls", "-f", fmt.Sprintf("/local/domain/0/backend/vif/%d", in.ID))
			t.Logf("KNOWN BUG: %s: the guest saw MACs %q, not its vif's %s\nfrontend:\n%s\nbackend:\n%s\nconsole:\n%s",
				name, seen, in.MACs[0], front, back, lastLines(c, 40))
		}
	}
	// Both clones run at once.
	for _, name := range clones {
		c, _ := realxen.Console(ctx, h2, name)
		waitTick(ctx, t, h2, name, lastTick(t, c).N)
	}
	tool(ctx, t, h1, nil, "destroy", "-name", parent)
	for _, name := range clones {
		tool(ctx, t, h2, nil, "destroy", "-name", name)
	}
	h2.Run(ctx, "rm", "-rf", dir)
	for _, h := range bed.Hosts {
		if out, err := h.Run(ctx, "xl", "list"); err != nil || strings.Count(strings.TrimSpace(out), "\n") != 1 {
			t.Errorf("host %d after Destroy: %v\n%s", h.Index+1, err, out)
		}
	}

	ram := uint64(128 << 20 / xcstream.PageSize)
	t.Logf("create %v; capture %v (xl save -c %v, guest suspended about %v), descriptor %d bytes; "+
		"pack %v, carried to host 2 in %v; restore %v and %v",
		made.Took.Round(time.Millisecond), cp.Took.Round(time.Millisecond), cp.Save.Took.Round(time.Millisecond),
		suspended.Round(10*time.Millisecond), cp.DescriptorSize, packed.Took.Round(time.Millisecond),
		carried.Round(time.Millisecond), restored[clones[0]].Took.Round(time.Millisecond), restored[clones[1]].Took.Round(time.Millisecond))
	t.Logf("pages: %d PFN entries (0 to %#x) in %d PAGE_DATA records, %d with data, of which %d zero and %d stored "+
		"(%d runs), page file %d bytes (sparse), image %d bytes; entry types %v; PFNs with data: %s (RAM is 0-%#x)",
		cp.Info.PageEntries, cp.Info.MaxPFN, cp.Info.LibxcRecords[1], cp.Info.DataPages, cp.Info.ZeroPages, cp.Info.StoredPages(),
		cp.StoredRuns, cp.PagesFileSize, cp.Info.StreamSize, cp.PageTypes, dataRuns(desc), ram-1)
}

// afterGap finds the longest time between consecutive ticks past tick
// from, and returns the tick after it.
func afterGap(ticks []realxen.Tick, from int) (realxen.Tick, time.Duration) {
	var after realxen.Tick
	var gap time.Duration
	for i := 1; i < len(ticks); i++ {
		if d := ticks[i].Clock.Sub(ticks[i-1].Clock); ticks[i].N > from && ticks[i].N == ticks[i-1].N+1 && d > gap {
			after, gap = ticks[i], d
		}
	}
	return after, gap
}

// wantAnswer checks that the console shows the answer to call id and that
// it contains want.
func wantAnswer(t *testing.T, console string, id uint64, want string) {
	t.Helper()
	for _, l := range realxen.Lines(console, "guestinit answer ") {
		var resp guestchan.Response
		if num, line, ok := strings.Cut(l, " "); ok && num == fmt.Sprint(id) && json.Unmarshal([]byte(line), &resp) == nil {
			if !strings.Contains(line, want) {
				t.Errorf("answer %d is %s, want %s", id, line, want)
			}
			return
		}
	}
	t.Errorf("no answer %d on the console:\n%s", id, lastLines(console, 30))
}

type servedCalls struct {
	calls []string
	err   error
}

// serve runs the host side of name's guest channel on h until it has
// answered calls calls (a clone call once release exists).
func serve(ctx context.Context, h *xenbed.Host, name string, calls int, release string) <-chan servedCalls {
	done := make(chan servedCalls, 1)
	go func() {
		var res struct {
			Requests []guestchan.Request `json:"requests"`
		}
		args := []string{"serve", "-name", name, "-calls", fmt.Sprint(calls)}
		if release != "" {
			args = append(args, "-release", release)
		}
		_, err := realxen.Tool(ctx, h, &res, args...)
		var s servedCalls
		for _, r := range res.Requests {
			s.calls = append(s.calls, r.Call)
		}
		s.err = err
		done <- s
	}()
	return done
}

func readDescriptor(t *testing.T, path string) *xcstream.Descriptor {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var d xcstream.Descriptor
	if err := d.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	return &d
}

// dataRuns lists the runs of PFNs with data.
func dataRuns(d *xcstream.Descriptor) string {
	var runs []string
	var start, end uint64
	flush := func() {
		if end > start {
			runs = append(runs, fmt.Sprintf("%#x-%#x", start, end-1))
		}
	}
	for p := range d.Pages() {
		if !p.HasData() {
			continue
		}
		if p.PFN != end {
			flush()
			start = p.PFN
		}
		end = p.PFN + 1
	}
	flush()
	return strings.Join(runs, " ")
}

// savedConfig returns the domain configuration in an xl save-file header
// (48 bytes, then the optional data: a length and the nul-terminated
// JSON).
func savedConfig(t *testing.T, header []byte) []byte {
	t.Helper()
	if len(header) < 52 {
		t.Fatalf("save header of %d bytes", len(header))
	}
	n := binary.LittleEndian.Uint32(header[48:])
	if uint64(n) > uint64(len(header)-52) || n == 0 {
		t.Fatalf("save header: configuration of %d bytes", n)
	}
	return append([]byte(strings.TrimSpace(string(header[52:52+n-1]))), '\n')
}

// writeFixtures records what xl prints about domain id, paused, for the
// parsers' tests.
func writeFixtures(ctx context.Context, t *testing.T, h *xenbed.Host, id uint32) {
	t.Helper()
	for _, f := range []struct {
		name string
		argv []string
	}{
		{"list-l-pvh.json", []string{"xl", "list", "-l", fmt.Sprint(id)}},
		{"list-paused.txt", []string{"xl", "list", fmt.Sprint(id)}},
		{"list-v-paused.txt", []string{"xl", "list", "-v", fmt.Sprint(id)}},
	} {
		out, err := h.Run(ctx, f.argv...)
		if err != nil {
			t.Fatal(err)
		}
		writeFixture(t, f.name, []byte(out))
	}
}

func writeFixture(t *testing.T, name string, b []byte) {
	t.Helper()
	path := filepath.Join("testdata", "xl", name)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s", path)
}
