// Package xenstoretest runs Debian's real xenstored for tests on a machine
// without Xen, and connects to it as dom0 and as guest domains.
//
// xenstored needs a hypervisor to start (see testdata/xenshim.c): Start
// compiles that shim with the system's C compiler and preloads it, so the
// daemon under test is Xen's own code throughout, with only its calls into
// libxenctrl, libxenevtchn and libxengnttab answered by the shim. Tests
// then talk to it over its unix socket as dom0 (Dial), or as an
// unprivileged guest over the shared-memory ring xenstored uses for
// domains (Introduce), where xenstored enforces permissions and quotas as
// it does for real guests.
//
// xenstored comes from an installed xen-utils-4.17, else from Debian's
// packages, fetched and unpacked into the image cache as the Xen test bed
// has them (internal/xenbed.XenTools). Start skips the test when that
// fails or there is no C compiler (under CI=true a failed fetch fails).
// SNOWFLOCK_XEN_ROOT names another root of a Xen 4.17 userspace, e.g.:
//
//	mkdir -p /tmp/xen && cd /tmp/xen
//	apt-get download xen-utils-4.17 libxenmisc4.17 libxencall1 libxenevtchn1 \
//	    libxenforeignmemory1 libxengnttab1 libxentoollog1 libxendevicemodel1 \
//	    libxentoolcore1
//	for f in *.deb; do dpkg -x $f root; done
//	SNOWFLOCK_XEN_ROOT=/tmp/xen/root go test ./xenctl/...
package xenstoretest

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/internal/xenbed"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

//go:embed testdata/xenshim.c
var shimSource []byte

// RootEnv names the environment variable with the root of a Xen userspace.
const RootEnv = "SNOWFLOCK_XEN_ROOT"

// virqPort is the port that makes xenstored look for dead domains (the
// shim binds VIRQ_DOM_EXC to it); wakePort wakes it for anything else.
const (
	virqPort = 1
	wakePort = 1000
)

// Daemon is a xenstored started for one test and stopped by its cleanup.
type Daemon struct {
	Dir    string // the shim's directory: rings, event FIFO, trace
	Socket string // xenstored's unix socket

	evtchn *os.File // the shim's event channel FIFO
}

// Start runs xenstored for t, or skips t when it cannot run here.
func Start(t testing.TB) *Daemon {
	t.Helper()
	bin, libPath := find(t)
	cc, err := exec.LookPath("cc")
	if err != nil {
		t.Skip("xenstoretest: no C compiler to build the hypervisor shim")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "xenshim.c")
	if err := os.WriteFile(src, shimSource, 0o600); err != nil {
		t.Fatal(err)
	}
	shim := filepath.Join(dir, "xenshim.so")
	if out, err := exec.Command(cc, "-shared", "-fPIC", "-O2", "-o", shim, src).CombinedOutput(); err != nil {
		t.Fatalf("xenstoretest: building the shim: %v\n%s", err, out)
	}
	d := &Daemon{Dir: dir, Socket: filepath.Join(dir, "socket")}
	cmd := exec.Command(bin, "--no-fork", "--trace-file", filepath.Join(dir, "trace"))
	cmd.Env = append(os.Environ(),
		"LD_PRELOAD="+shim,
		"XENSHIM_DIR="+dir,
		"XENSTORED_PATH="+d.Socket,
		"XENSTORED_RUNDIR="+dir,
	)
	if libPath != "" {
		cmd.Env = append(cmd.Env, "LD_LIBRARY_PATH="+libPath)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("xenstoretest: starting %s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if d.evtchn != nil {
			d.evtchn.Close()
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if conn, err := net.Dial("unix", d.Socket); err == nil {
			conn.Close()
			break
		}
		select {
		case <-exited:
			t.Fatalf("xenstoretest: xenstored exited at start: %s", out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("xenstoretest: xenstored did not listen on %s: %s", d.Socket, out.String())
		}
	}
	if d.evtchn, err = os.OpenFile(filepath.Join(dir, "evtchn"), os.O_RDWR|syscall.O_NONBLOCK, 0); err != nil {
		t.Fatalf("xenstoretest: %v", err)
	}
	return d
}

// find locates xenstored and the library path it needs.
func find(t testing.TB) (bin, libPath string) {
	root := os.Getenv(RootEnv)
	if root == "" {
		root = "/"
	}
	bins, _ := filepath.Glob(filepath.Join(root, "usr/lib/xen-*/bin/xenstored"))
	if len(bins) > 0 {
		bin = bins[len(bins)-1]
		if root != "/" {
			libPath = filepath.Join(root, "usr/lib/x86_64-linux-gnu") + ":" + filepath.Join(filepath.Dir(filepath.Dir(bin)), "lib")
		}
		return bin, libPath
	}
	if os.Getenv(RootEnv) != "" {
		t.Skipf("xenstoretest: no xenstored under %s (see the package comment)", root)
	}
	// Not installed: Debian's packages, unpacked into the image cache as
	// the Xen test bed has them.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	roots, err := xenbed.XenTools(ctx, "", nil)
	if err != nil {
		msg := fmt.Sprintf("xenstoretest: no xenstored installed, and fetching Debian's Xen tools failed: %v", err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	var dirs []string
	for _, r := range roots {
		if b, _ := filepath.Glob(filepath.Join(r, "usr/lib/xen-*/bin/xenstored")); len(b) > 0 {
			bin = b[0]
			dirs = append(dirs, filepath.Join(filepath.Dir(filepath.Dir(bin)), "lib"))
		}
		dirs = append(dirs, filepath.Join(r, "usr/lib/x86_64-linux-gnu"))
	}
	if bin == "" {
		t.Fatal("xenstoretest: Debian's Xen tools hold no xenstored")
	}
	return bin, strings.Join(dirs, ":")
}

// Dial connects as dom0.
func (d *Daemon) Dial(t testing.TB) *xenstore.Client {
	t.Helper()
	c, err := xenstore.DialUnix(context.Background(), d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// wake makes xenstored handle an event on port.
func (d *Daemon) wake(port uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], port)
	d.evtchn.Write(b[:]) // EAGAIN: a wake-up is pending already
}

// Introduce makes domid a domain xenstored serves over a ring, lays out
// its home directory as libxl does (/local/domain/<domid> readable by the
// domain, data/ its own), and returns a client speaking as that domain.
func (d *Daemon) Introduce(t testing.TB, domid uint32) *xenstore.Client {
	t.Helper()
	ringPath := filepath.Join(d.Dir, fmt.Sprintf("ring-%d", domid))
	if err := os.WriteFile(ringPath, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(ringPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	dom0 := d.Dial(t)
	home := xenstore.DomainPath(domid)
	for _, n := range []struct {
		path  string
		perms []xenstore.Perm
	}{
		{home, []xenstore.Perm{{Domain: 0, Access: xenstore.AccessNone}, {Domain: domid, Access: xenstore.AccessRead}}},
		{home + "/data", []xenstore.Perm{{Domain: domid, Access: xenstore.AccessNone}}},
	} {
		if err := dom0.Mkdir(ctx, n.path); err != nil {
			t.Fatal(err)
		}
		if err := dom0.SetPerms(ctx, n.path, n.perms); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.raw(xenstore.OpIntroduce, fmt.Sprintf("%d\x00%d\x00%d\x00", domid, 1, 7)); err != nil {
		t.Fatalf("xenstoretest: introducing domain %d: %v", domid, err)
	}
	ring := &ringConn{mem: mem, wake: func() { d.wake(wakePort) }, closed: make(chan struct{})}
	c := xenstore.NewClient(ring)
	t.Cleanup(func() {
		c.Close()
		unix.Munmap(mem)
	})
	return c
}

// Kill marks domid dying and has xenstored notice: it drops the domain's
// connection and fires @releaseDomain.
func (d *Daemon) Kill(t testing.TB, domid uint32) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(d.Dir, fmt.Sprintf("dead-%d", domid)), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	d.wake(virqPort)
}

// raw sends one request the Client has no method for, as dom0.
func (d *Daemon) raw(op xenstore.Op, payload string) error {
	// xenstored's listen backlog is one: retry a connect that finds it full.
	var conn net.Conn
	var err error
	for try := 0; ; try++ {
		if conn, err = net.Dial("unix", d.Socket); err == nil || !errors.Is(err, syscall.EAGAIN) || try == 1000 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	b, err := (&xenstore.Message{Type: op, ReqID: 1, Payload: []byte(payload)}).MarshalBinary()
	if err != nil {
		return err
	}
	if _, err := conn.Write(b); err != nil {
		return err
	}
	m, err := xenstore.ReadMessage(conn)
	if err != nil {
		return err
	}
	if m.Type != op || string(m.Payload) != "OK\x00" {
		return fmt.Errorf("%s answered %s %q", op, m.Type, m.Payload)
	}
	return nil
}

// The xenstore page (struct xenstore_domain_interface in xs_wire.h): two
// rings of 1024 bytes and their free-running indexes.
const (
	ringSize   = 1024
	reqOff     = 0
	rspOff     = 1024
	reqConsOff = 2048
	reqProdOff = 2052
	rspConsOff = 2056
	rspProdOff = 2060
)

// ringConn is the guest's end of a xenstore page: it writes requests to
// the request ring and reads replies and events from the response ring,
// waking xenstored through the shim's event FIFO and polling for its
// answers (the shim does not signal the guest).
type ringConn struct {
	mem       []byte
	wake      func()
	rmu, wmu  sync.Mutex
	closed    chan struct{}
	closeOnce sync.Once
}

func (r *ringConn) index(off int) *uint32 { return (*uint32)(unsafe.Pointer(&r.mem[off])) }

var errRingClosed = errors.New("xenstoretest: ring closed")

func (r *ringConn) pause(idle *time.Duration) error {
	select {
	case <-r.closed:
		return errRingClosed
	case <-time.After(*idle):
	}
	*idle = min(2**idle, time.Millisecond)
	return nil
}

func (r *ringConn) Write(b []byte) (int, error) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	written := 0
	idle := 20 * time.Microsecond
	for written < len(b) {
		cons := atomic.LoadUint32(r.index(reqConsOff))
		prod := atomic.LoadUint32(r.index(reqProdOff))
		space := ringSize - int(prod-cons)
		if space <= 0 {
			r.wake()
			if err := r.pause(&idle); err != nil {
				return written, err
			}
			continue
		}
		at := int(prod % ringSize)
		n := min(space, ringSize-at, len(b)-written)
		copy(r.mem[reqOff+at:reqOff+at+n], b[written:written+n])
		atomic.StoreUint32(r.index(reqProdOff), prod+uint32(n))
		written += n
	}
	r.wake()
	return written, nil
}

func (r *ringConn) Read(b []byte) (int, error) {
	r.rmu.Lock()
	defer r.rmu.Unlock()
	idle := 20 * time.Microsecond
	for {
		cons := atomic.LoadUint32(r.index(rspConsOff))
		prod := atomic.LoadUint32(r.index(rspProdOff))
		if prod != cons {
			at := int(cons % ringSize)
			n := min(int(prod-cons), ringSize-at, len(b))
			copy(b, r.mem[rspOff+at:rspOff+at+n])
			atomic.StoreUint32(r.index(rspConsOff), cons+uint32(n))
			r.wake() // room for more replies
			return n, nil
		}
		if err := r.pause(&idle); err != nil {
			return 0, io.EOF
		}
	}
}

func (r *ringConn) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return nil
}

// Trace returns xenstored's trace log so far, for failure messages.
func (d *Daemon) Trace() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "trace"))
	return string(b)
}
