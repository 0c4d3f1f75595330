package xenctl

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeXL plays xl for the driver's flows: it keeps a table of domains,
// answers as xl prints (xl_info.c, xl_vmcontrol.c, xl_saverestore.c), and
// records every command. Saving writes a small but well-formed image (see
// testImage); restoring reads one. Real xl runs in the Xen test bed.
type fakeXL struct {
	t *testing.T

	mu      sync.Mutex
	calls   []string
	doms    map[uint32]*fakeDom
	nextID  uint32
	image   []byte            // what save writes
	got     []byte            // what restore read
	fail    map[string]string // subcommand -> stderr of a failure
	libxlEr map[string]string // subcommand -> a libxl error on stderr, exit 0
	// hang: the subcommand does its work, then hangs until its context
	// ends (and is "killed"); slowSave: save writes the image in small
	// pieces, slowly.
	hang     map[string]bool
	slowSave bool
	saveCtx  error // the error of save's context when it returned
}

type fakeDom struct {
	name   string
	uuid   string
	typ    string
	memMB  int
	vcpus  int
	paused bool
}

// listLong is what real xl list -l prints for the domain (listLongPVH,
// made for "life", domain 1), with its own settings.
func (d *fakeDom) listLong(id uint32) string {
	var uuid string
	for _, l := range strings.Split(listLongPVH, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), `"uuid": `); ok {
			uuid, _ = strconv.Unquote(strings.TrimSuffix(v, ","))
		}
	}
	return strings.NewReplacer(
		`"domid": 1,`, fmt.Sprintf(`"domid": %d,`, id),
		`"type": "pvh"`, fmt.Sprintf(`"type": %q`, d.typ),
		`"name": "life"`, fmt.Sprintf(`"name": %q`, d.name),
		uuid, d.uuid,
		`"max_vcpus": 1`, fmt.Sprintf(`"max_vcpus": %d`, d.vcpus),
		`"max_memkb": 131072`, fmt.Sprintf(`"max_memkb": %d`, d.memMB*1024),
		`"target_memkb": 131072`, fmt.Sprintf(`"target_memkb": %d`, d.memMB*1024),
	).Replace(listLongPVH)
}

func newFakeXL(t *testing.T) *fakeXL {
	return &fakeXL{t: t, doms: map[uint32]*fakeDom{}, nextID: 1, fail: map[string]string{}, libxlEr: map[string]string{},
		hang: map[string]bool{}}
}

func (f *fakeXL) config(name string) Config {
	return Config{Name: name, Runner: f, XL: "/usr/sbin/xl"}
}

func (f *fakeXL) commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeXL) lookup(arg string) (uint32, *fakeDom) {
	id, err := strconv.ParseUint(arg, 10, 32)
	if err != nil {
		return 0, nil
	}
	return uint32(id), f.doms[uint32(id)]
}

func (f *fakeXL) Run(ctx context.Context, cmd Command) (Result, error) {
	if cmd.Args[0] != "/usr/sbin/xl" {
		f.t.Errorf("ran %q", cmd.Args)
	}
	args := cmd.Args[1:]
	f.mu.Lock()
	f.calls = append(f.calls, strings.Join(args, " "))
	stderr, failing := f.fail[args[0]]
	libxlErr := f.libxlEr[args[0]]
	hang := f.hang[args[0]]
	f.hang[args[0]] = false
	f.mu.Unlock()
	if hang {
		res, _ := f.do(ctx, cmd, args, stderr, failing, libxlErr)
		<-ctx.Done()
		return res, fmt.Errorf("xenctl: %s: %w", cmd.Args[0], ctx.Err()) // killed, as LocalRunner reports it
	}
	return f.do(ctx, cmd, args, stderr, failing, libxlErr)
}

func (f *fakeXL) do(ctx context.Context, cmd Command, args []string, stderr string, failing bool, libxlErr string) (Result, error) {
	exit := func(code int, stderr string) (Result, error) {
		return Result{Stderr: []byte(stderr)}, &ExitError{Args: cmd.Args, Code: code, Stderr: []byte(stderr)}
	}
	if failing {
		if cmd.Stdin != nil {
			io.Copy(io.Discard, io.LimitReader(cmd.Stdin, 100)) // xl reads a little, then fails
		}
		return exit(1, stderr)
	}
	if args[0] == "save" && f.slowSave {
		return f.saveSlowly(ctx, cmd)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	switch args[0] {
	case "create":
		d := &fakeDom{paused: true}
		for _, s := range args[4:] {
			k, v, _ := strings.Cut(s, "=")
			switch k {
			case "name":
				d.name, _ = strconv.Unquote(v)
			case "type":
				d.typ, _ = strconv.Unquote(v)
			case "memory":
				d.memMB, _ = strconv.Atoi(v)
			case "vcpus":
				d.vcpus, _ = strconv.Atoi(v)
			case "uuid":
				d.uuid, _ = strconv.Unquote(v)
			}
		}
		for _, o := range f.doms {
			if o.name == d.name {
				return exit(3, "libxl: error: libxl_create.c:700:libxl__domain_make: domain with name \""+d.name+"\" already exists.\n")
			}
		}
		f.doms[f.nextID] = d
		f.nextID++
		return Result{Stderr: []byte("Parsing config from /dev/null\n")}, nil
	case "domid":
		for id, d := range f.doms {
			if d.name == args[1] {
				return Result{Stdout: fmt.Appendf(nil, "%d\n", id)}, nil
			}
		}
		return exit(1, fmt.Sprintf("Can't get domid of domain name '%s', maybe this domain does not exist.\n", args[1]))
	case "pause", "unpause":
		id, d := f.lookup(args[1])
		if d == nil || libxlErr != "" {
			// xl ignores libxl's return code here.
			return Result{Stderr: fmt.Appendf(nil, "libxl: error: libxl_domain.c:574:libxl_domain_%s: Domain %d:%s domain %d failed: No such process\n", args[0], id, args[0], id)}, nil
		}
		d.paused = args[0] == "pause"
		return Result{}, nil
	case "destroy":
		id, d := f.lookup(args[1])
		if d == nil {
			return exit(1, "libxl: error: libxl_domain.c:1237:libxl__destroy_domid: Domain "+args[1]+":Non-existant domain\ndestroy failed (rc=-21)\n")
		}
		delete(f.doms, id)
		return Result{}, nil
	case "list":
		long := args[1] == "-l"
		id, d := f.lookup(args[len(args)-1])
		if d == nil {
			return exit(1, fmt.Sprintf("Error: Domain '%s' does not exist.\n", args[len(args)-1]))
		}
		if long {
			return Result{Stdout: []byte(d.listLong(id))}, nil
		}
		state := "-b----"
		if d.paused {
			state = "--p---"
		}
		if args[1] == "-v" {
			return Result{Stdout: []byte(listVerbose(d.name, int(id), d.memMB, d.vcpus, state, 0.5, d.uuid))}, nil
		}
		return Result{Stdout: []byte(listLine(d.name, int(id), d.memMB, d.vcpus, state, 0.5))}, nil
	case "save":
		i := 1
		for strings.HasPrefix(args[i], "-") {
			i++
		}
		id, d := f.lookup(args[i])
		if d == nil {
			return exit(1, args[i]+" is an invalid domain identifier (rc=-6)\n")
		}
		if args[i+1] == stdoutPath {
			if _, err := cmd.Stdout.Write(f.image); err != nil {
				return exit(1, "libxl: error: write failed\n")
			}
		}
		if !strings.Contains(strings.Join(args[1:i], " "), "-c") && !strings.Contains(strings.Join(args[1:i], " "), "-p") {
			delete(f.doms, id)
		}
		return Result{Stderr: []byte("Saving to " + args[i+1] + " new xl format (info 0x3/0x0/1234)\n")}, nil
	case "restore":
		if args[len(args)-1] != stdinPath {
			f.t.Errorf("restore from %q", args[len(args)-1])
		}
		img, err := io.ReadAll(cmd.Stdin)
		if err != nil {
			return exit(1, "read failed")
		}
		f.got = img
		h, err := readSaveHeader(bytes.NewReader(img))
		if err != nil {
			return exit(1, "File has wrong magic number - corrupt or for a different tool?\n")
		}
		s, err := readSaved(h)
		if err != nil {
			return exit(1, "bad config\n")
		}
		for _, o := range f.doms {
			if o.name == s.Name {
				return exit(3, "libxl: error: domain with name \""+s.Name+"\" already exists.\n")
			}
		}
		var j struct {
			CInfo struct {
				UUID string `json:"uuid"`
			} `json:"c_info"`
		}
		config, _ := parseSaveHeader(h)
		json.Unmarshal(config, &j)
		f.doms[f.nextID] = &fakeDom{name: s.Name, uuid: j.CInfo.UUID, typ: string(s.Type), memMB: int(s.MaxMemKB / 1024), vcpus: s.MaxVCPUs, paused: true}
		f.nextID++
		return Result{}, nil
	}
	f.t.Errorf("unexpected xl %q", args)
	return exit(2, "unknown command")
}

// saveSlowly is xl save -c to standard output, writing in small pieces
// until done or until the pipe breaks, when it resumes the domain and
// fails, as xl does.
func (f *fakeXL) saveSlowly(ctx context.Context, cmd Command) (Result, error) {
	img := f.image
	defer func() { f.mu.Lock(); f.saveCtx = ctx.Err(); f.mu.Unlock() }()
	for off := 0; off < len(img); off += 4096 {
		if _, err := cmd.Stdout.Write(img[off:min(off+4096, len(img))]); err != nil {
			msg := "libxl: error: libxl_stream_write.c:350:stream_complete: Domain 1:saving domain: Broken pipe\nFailed to save domain, resuming domain\n"
			return Result{Stderr: []byte(msg)}, &ExitError{Args: cmd.Args, Code: 1, Stderr: []byte(msg)}
		}
		time.Sleep(time.Millisecond)
	}
	return Result{}, nil
}

// savedConfigFor is the configuration real xl saves (savedConfigPVH,
// of a 128 MiB PVH domain named "parent" with a NIC) for name and memMB.
func savedConfigFor(name string, memMB int) []byte {
	return []byte(strings.NewReplacer(
		`"name": "parent"`, fmt.Sprintf(`"name": %q`, name),
		`"max_memkb": 131072`, fmt.Sprintf(`"max_memkb": %d`, memMB*1024),
		`"target_memkb": 131072`, fmt.Sprintf(`"target_memkb": %d`, memMB*1024),
	).Replace(strings.TrimSpace(savedConfigPVH)))
}

// testImage builds an `xl save` image of a PVH domain per
// docs/specs/lib{xl,xc}-migration-stream.pandoc: xl's header with the
// configuration, a libxl stream around a libxc v3 stream (guest type HVM,
// which PVH uses), pages of pseudo-random data and some zero pages.
func testImage(name string, memMB int, pages int) []byte {
	le32 := func(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
	be32 := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	var b bytes.Buffer
	record := func(typ uint32, body []byte) {
		b.Write(le32(typ))
		b.Write(le32(uint32(len(body))))
		b.Write(body)
		b.Write(make([]byte, (8-len(body)%8)%8))
	}
	b.Write(buildSaveHeader(savedConfigFor(name, memMB)))
	b.WriteString("LibxlFmt")
	b.Write(be32(2))
	b.Write(be32(0))
	record(1, nil) // LIBXC_CONTEXT
	b.Write(bytes.Repeat([]byte{0xff}, 8))
	b.WriteString("XENF")
	b.Write(be32(3))
	b.Write(make([]byte, 8))
	b.Write(le32(2)) // HVM
	b.Write([]byte{12, 0, 0, 0})
	b.Write(le32(4))
	b.Write(le32(17))
	record(0x10, nil) // STATIC_DATA_END
	rng := rand.New(rand.NewPCG(uint64(pages), 7))
	for base := 0; base < pages; base += 64 {
		n := min(64, pages-base)
		body := append(le32(uint32(n)), le32(0)...)
		for i := range n {
			body = binary.LittleEndian.AppendUint64(body, uint64(base+i))
		}
		for i := range n {
			page := make([]byte, 4096)
			if (base+i)%7 != 0 {
				for j := 0; j < 4096; j += 8 {
					binary.LittleEndian.PutUint64(page[j:], rng.Uint64()|1)
				}
			}
			body = append(body, page...)
		}
		record(1, body) // PAGE_DATA
	}
	record(0x09, bytes.Repeat([]byte{0x5a}, 1000)) // HVM_CONTEXT
	record(0, nil)                                 // libxc END
	record(0, nil)                                 // libxl END
	return b.Bytes()
}
