package xenbed

import (
	"errors"
	"fmt"
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
		{"-cpu", qemuCPU},
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
// TestHub: the bed's switch floods broadcasts and frames to unknown
// addresses, learns where each source is, then sends unicast frames to
// that host alone, never back to the sender; it drops datagrams from
// strangers and runts.
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
	mac := func(b byte) string { return string([]byte{0x52, 0x54, 0, 0, 0, b}) }
	bcast, mcast := "\xff\xff\xff\xff\xff\xff", "\x01\x00\x5e\x40\x00\x01"
	steps := []struct {
		from     int
		dst, src string
		want     []int // the hosts that receive the frame
	}{
		{0, bcast, mac(0xa0), []int{1, 2}},     // broadcast: everyone else; a0 is behind 0
		{1, mac(0xa0), mac(0xb1), []int{0}},    // to a known address: its host alone; b1 is behind 1
		{2, mac(0xee), mac(0xc2), []int{0, 1}}, // to an unknown address: flooded
		{0, mac(0xb1), mac(0xa0), []int{1}},
		{2, mcast, mac(0xc2), []int{0, 1}}, // multicast: flooded
		{0, mac(0xa1), mac(0xa1), nil},     // a1 is behind 0 now: its own traffic stays there
		{1, mac(0xa1), mac(0xb1), []int{0}},
		{2, mac(0xb1), mac(0xa0), []int{1}}, // a0 moved to host 2 (a migrated guest)
		{1, mac(0xa0), mac(0xb1), []int{2}},
	}
	buf := make([]byte, 100)
	for s, st := range steps {
		frame := st.dst + st.src + "\x08\x00" + fmt.Sprintf("step %d", s)
		if _, err := qemus[st.from].WriteToUDPAddrPort([]byte(frame), hubPort(st.from)); err != nil {
			t.Fatal(err)
		}
		// A frame that should not arrive has not within the deadline; a
		// late one would show up as a wrong frame at the next step.
		for i, c := range qemus {
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			k, _, err := c.ReadFromUDPAddrPort(buf)
			got := err == nil && string(buf[:k]) == frame
			if err == nil && !got {
				t.Fatalf("step %d: host %d got %q", s, i, buf[:k])
			}
			if want := slices.Contains(st.want, i); got != want {
				t.Errorf("step %d: host %d received it: %v, want %v", s, i, got, want)
			}
		}
	}
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	stranger.WriteToUDPAddrPort([]byte(bcast+mac(0xdd)+"\x08\x00injected"), hubPort(1))
	qemus[0].WriteToUDPAddrPort([]byte("runt"), hubPort(0))
	deadline := time.Now().Add(2 * time.Second)
	for h.dropped.Load() != 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if f, fl, d := h.frames.Load(), h.flooded.Load(), h.dropped.Load(); f != int64(len(steps)) || fl != 3 || d != 2 {
		t.Errorf("frames %d, flooded %d, dropped %d; want %d, 3, 2", f, fl, d, len(steps))
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
