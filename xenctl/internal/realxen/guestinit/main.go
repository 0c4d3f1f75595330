// Command guestinit is the /init of the PVH guest that xenctl's tests run
// on real Xen (the xenbed hosts). It keeps its state in memory and prints
// it to the console (hvc0, which dom0's xenconsoled logs), so the tests
// can tell a guest that resumed from one that booted again:
//
//	guestinit secret=<hex>                  once, at boot: a random value
//	guestinit tick <n> secret=<hex> ms=<t>  every second, n counting from 0;
//	                                        t is the guest's clock (Unix ms)
//	guestinit mac <address>                 eth0's MAC, at boot and on change
//
// It loads the modules listed in /etc/modules (xen-netfront) first.
//
// With guestinit.chan=1 on the kernel command line it also calls its host
// over the guest API channel on xenstore (xenchan.Guest over
// /dev/xen/xenbus, which Debian's kernel provides built in, on devtmpfs: no
// xenfs or module is needed) and prints each answer line:
//
//	guestinit chan-open epoch=<e>           the channel is open
//	guestinit call <id> <call>              a request written
//	guestinit answer <id> <json>            its answer
//	guestinit chan-error <error>            the channel failed
//
// The calls: hello (id 1), clone (id 2: in the parent, answered by the
// host; in a restored clone, by the greeting xenchan.Prepare left), then
// hello again (id 3), which in a clone goes to the clone's new host.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl/xenchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

func main() {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := syscall.Mount(m.src, m.dst, m.fs, 0, ""); err != nil {
			fmt.Printf("guestinit mount %s: %v\n", m.dst, err)
		}
	}
	loadModules()
	var secret [8]byte
	rand.Read(secret[:])
	s := hex.EncodeToString(secret[:])
	fmt.Printf("guestinit secret=%s\n", s)
	if cmdline, _ := os.ReadFile("/proc/cmdline"); slices.Contains(strings.Fields(string(cmdline)), "guestinit.chan=1") {
		go func() {
			if err := callHost(); err != nil {
				fmt.Printf("guestinit chan-error %v\n", err)
			}
		}()
	}
	mac := ""
	for n := 0; ; n++ {
		fmt.Printf("guestinit tick %d secret=%s ms=%d\n", n, s, time.Now().UnixMilli())
		if b, err := os.ReadFile("/sys/class/net/eth0/address"); err == nil && strings.TrimSpace(string(b)) != mac {
			mac = strings.TrimSpace(string(b))
			fmt.Printf("guestinit mac %s\n", mac)
		}
		time.Sleep(time.Second)
	}
}

// loadModules inserts the modules /etc/modules lists, in order.
func loadModules() {
	list, err := os.ReadFile("/etc/modules")
	if err != nil {
		return
	}
	for _, m := range strings.Fields(string(list)) {
		f, err := os.Open(m)
		if err == nil {
			err = unix.FinitModule(int(f.Fd()), "", 0)
			f.Close()
		}
		if err != nil {
			fmt.Printf("guestinit insmod %s: %v\n", m, err)
		}
	}
}

// callHost makes the guest's calls, one after the other.
func callHost() error {
	ctx := context.Background()
	xs, err := xenstore.OpenDevice("/dev/xen/xenbus")
	if err != nil {
		entries, _ := os.ReadDir("/dev/xen")
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return fmt.Errorf("%w (/dev/xen has %q)", err, names)
	}
	g, err := xenchan.OpenGuest(ctx, xs)
	if err != nil {
		return err
	}
	fmt.Printf("guestinit chan-open epoch=%s\n", g.Epoch())
	answers := bufio.NewReader(g)
	calls := []struct {
		id   uint64
		call string
		args any
	}{
		{1, guestchan.CallHello, nil},
		{2, guestchan.CallClone, guestchan.TicketRef{Ticket: 9}},
		{3, guestchan.CallHello, nil},
	}
	for _, c := range calls {
		req, err := guestchan.NewRequest(c.id, c.call, c.args)
		if err != nil {
			return err
		}
		if err := guestchan.Encode(g, req); err != nil {
			return err
		}
		fmt.Printf("guestinit call %d %s\n", c.id, c.call)
		line, err := answers.ReadBytes('\n')
		if err != nil {
			return err
		}
		var resp guestchan.Response
		if err := json.Unmarshal(line, &resp); err != nil {
			return err
		}
		fmt.Printf("guestinit answer %d %s", resp.ID, line)
	}
	return nil
}
