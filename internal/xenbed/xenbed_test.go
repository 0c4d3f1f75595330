package xenbed

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestMultibootModules(t *testing.T) {
	tests := []struct {
		mods []string
		want string
	}{
		{[]string{"/k console=hvc0", "/initrd"}, "/k console=hvc0,/initrd"},
		{[]string{"/k a=1,2 b", "/in,rd"}, "/k a=1,,2 b,/in,,rd"},
		{[]string{"/only"}, "/only"},
	}
	for i, tt := range tests {
		if got := multibootModules(tt.mods...); got != tt.want {
			t.Errorf("#%d: got %q, want %q", i, got, tt.want)
		}
	}
}

func TestHostArgs(t *testing.T) {
	c := hostConfig{Index: 1, MemMB: 2048, Dom0MemMB: 1024, CPUs: 2, Token: "00112233445566778899aabbccddeeff",
		Image: &Image{Xen: "/c/xen.elf", Kernel: "/c/vmlinux", Initrd: "/c/dom0.cpio"}, AgentPort: 40000,
		BedNetdev: "socket,id=bed,udp=127.0.0.1:1,localaddr=127.0.0.1:2", ConsolePath: "/d/h2.console"}
	args := c.args()
	opt := func(name string) string {
		i := slices.Index(args, name)
		if i < 0 || i+1 >= len(args) {
			t.Fatalf("no %s in %q", name, args)
		}
		return args[i+1]
	}
	tests := []struct {
		name, want string
	}{
		// -append is not split at commas: Xen must see "com1=115200,8n1".
		{"-append", "dom0_mem=1024M,max:1024M console=com1 com1=115200,8n1 noreboot"},
		{"-initrd", "/c/vmlinux console=hvc0 earlyprintk=xen xenbed.host=2 xenbed.ctlmac=52:54:00:c7:00:02 " +
			"xenbed.bedmac=52:54:00:be:00:02 xenbed.ip=10.77.0.2/24 xenbed.token=00112233445566778899aabbccddeeff,/c/dom0.cpio"},
		{"-cpu", "qemu64,+npt"},
		{"-kernel", "/c/xen.elf"},
		{"-serial", "file:/d/h2.console"},
	}
	for i, tt := range tests {
		if got := opt(tt.name); got != tt.want {
			t.Errorf("#%d %s: got %q, want %q", i, tt.name, got, tt.want)
		}
	}
	var netdevs []string
	for i, a := range args {
		if a == "-netdev" {
			netdevs = append(netdevs, args[i+1])
		}
	}
	want := []string{
		"user,id=ctl,restrict=on,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:40000-10.0.2.15:7700",
		c.BedNetdev,
	}
	if !slices.Equal(netdevs, want) {
		t.Errorf("netdevs: got %q, want %q", netdevs, want)
	}
	if c.ip() != "10.77.0.2" {
		t.Errorf("ip: got %s, want 10.77.0.2", c.ip())
	}
}

// TestHub checks that a frame reaches every other host, never its sender,
// and that datagrams from strangers are dropped.
func TestHub(t *testing.T) {
	const n = 3
	h, err := newHub(n)
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	// Stand-ins for the QEMUs: bound where the hub expects them.
	qemus := make([]*net.UDPConn, n)
	for i := range qemus {
		c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(h.peers[i]))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		qemus[i] = c
	}
	hubPort := func(i int) netip.AddrPort { return unmap(h.ports[i].LocalAddr().(*net.UDPAddr).AddrPort()) }
	if _, err := qemus[0].WriteToUDPAddrPort([]byte("frame-from-0"), hubPort(0)); err != nil {
		t.Fatal(err)
	}
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	stranger.WriteToUDPAddrPort([]byte("injected"), hubPort(1))

	buf := make([]byte, 100)
	for i, c := range qemus {
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		k, _, err := c.ReadFromUDPAddrPort(buf)
		got := ""
		if err == nil {
			got = string(buf[:k])
		}
		want := "frame-from-0"
		if i == 0 {
			want = "" // no echo to the sender
		}
		if got != want {
			t.Errorf("#%d: got %q (%v), want %q", i, got, err, want)
		}
	}
	deadline := time.Now().Add(2 * time.Second)
	for h.dropped.Load() != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if h.frames.Load() != 1 || h.dropped.Load() != 1 {
		t.Errorf("frames %d, dropped %d; want 1, 1", h.frames.Load(), h.dropped.Load())
	}
}

func TestResolveInRoot(t *testing.T) {
	root := t.TempDir()
	mk := func(p string) {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(p), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ln := func(target, p string) {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, full); err != nil {
			t.Fatal(err)
		}
	}
	mk("lib/x86_64-linux-gnu/libc.so.6")
	mk("usr/lib/x86_64-linux-gnu/libfoo.so.1.2.3")
	ln("libfoo.so.1.2.3", "usr/lib/x86_64-linux-gnu/libfoo.so.1")
	ln("/lib/x86_64-linux-gnu/libc.so.6", "lib64/libc-abs.so")
	ln("usr/lib", "lib32") // a directory link
	ln("../../../../../etc/hostname", "lib/escape")
	tests := []struct {
		path string
		want string // relative to root; "" for an error
	}{
		{"/lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libc.so.6"},
		{"/usr/lib/x86_64-linux-gnu/libfoo.so.1", "usr/lib/x86_64-linux-gnu/libfoo.so.1.2.3"},
		{"/lib64/libc-abs.so", "lib/x86_64-linux-gnu/libc.so.6"},
		{"/lib32/x86_64-linux-gnu/libfoo.so.1", "usr/lib/x86_64-linux-gnu/libfoo.so.1.2.3"},
		{"/lib/escape", ""}, // ".." stops at the root: /etc/hostname is not in it
		{"/lib/missing.so", ""},
		{"/lib", ""}, // a directory
	}
	for i, tt := range tests {
		got, err := resolveInRoot(root, tt.path)
		if tt.want == "" {
			if err == nil {
				t.Errorf("#%d %s: got %s, want an error", i, tt.path, got)
			}
			continue
		}
		if err != nil || got != filepath.Join(root, tt.want) {
			t.Errorf("#%d %s: got %q, %v; want %s", i, tt.path, got, err, tt.want)
		}
	}
}

func TestCheckFiles(t *testing.T) {
	tests := []struct {
		dom0, host string
		ok         bool
	}{
		{"/opt/sfhostd", "/etc/hostname", true},
		{"relative", "/etc/hostname", false},
		{"/a/../b", "/etc/hostname", false},
		{"/", "/etc/hostname", false},
		{"/trailing/", "/etc/hostname", false},
		{"/opt/dir", "/etc", false},
		{"/opt/missing", "/nonexistent/file", false},
	}
	for i, tt := range tests {
		err := checkFiles(map[string]string{tt.dom0: tt.host})
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrBadFile)) {
			t.Errorf("#%d %s <- %s: got %v, want ok %v", i, tt.dom0, tt.host, err, tt.ok)
		}
	}
}
