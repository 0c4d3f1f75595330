// Package testbed makes a small multi-host network on one machine for
// tests: one network namespace per host, each with a veth whose peer is
// attached to a bridge the bed creates in the root namespace. The bridge
// holds the subnet's first address, so processes in the root namespace
// (coordinators, the test itself) reach every host, and hosts reach each
// other. No namespace gets a default route: traffic stays on the bed's own
// subnet. The bridge floods multicast to every port (no IGMP snooping), and
// Do creates sockets inside a host's namespace from this process. Close
// removes everything; Sweep removes what a crashed run left.
// Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Prefix starts the name of every namespace and link a bed creates.
const Prefix = "sftb"

// ErrUnsupported means this machine cannot make a bed (no ip, not root).
var ErrUnsupported = errors.New("testbed: network namespaces unavailable")

// Host is one namespace.
type Host struct {
	Name string // namespace name
	IP   string // its address on the bed's subnet
	veth string // root-side end of its veth pair
}

// Bed is a bridge and its hosts.
type Bed struct {
	ID       string
	Bridge   string
	BridgeIP string // the root namespace's address on the subnet
	Subnet   *net.IPNet
	Hosts    []*Host
}

func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// Available reports whether beds can be made here, and why not.
func Available() error {
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("%w: no ip command (apt-get install iproute2)", ErrUnsupported)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: not root", ErrUnsupported)
	}
	return nil
}

// pickSubnet chooses a /24 in 10.200.0.0/13 that no interface uses.
func pickSubnet() (*net.IPNet, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	for try := 0; try < 64; try++ {
		_, n, _ := net.ParseCIDR(fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(8), rand.IntN(256)))
		clash := false
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && (n.Contains(ipn.IP) || ipn.Contains(n.IP)) {
				clash = true
			}
		}
		if !clash {
			return n, nil
		}
	}
	return nil, errors.New("testbed: no free subnet")
}

func addr(n *net.IPNet, host int) string {
	ip := n.IP.To4()
	return fmt.Sprintf("%d.%d.%d.%d", ip[0], ip[1], ip[2], host)
}

// Option changes how New builds a bed.
type Option func(*options)

type options struct{ mtu int }

// WithMTU sets the MTU of the bridge and every veth (jumbo frames: 9000);
// the default is the kernel's, 1500.
func WithMTU(mtu int) Option { return func(o *options) { o.mtu = mtu } }

// New creates a bed with n hosts. On error everything created is removed.
func New(ctx context.Context, n int, opts ...Option) (b *Bed, err error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if n < 1 || n > 200 {
		return nil, fmt.Errorf("testbed: %d hosts, want 1..200", n)
	}
	var o options
	for _, f := range opts {
		f(&o)
	}
	if o.mtu != 0 && (o.mtu < 576 || o.mtu > 65535) {
		return nil, fmt.Errorf("testbed: MTU %d, want 576..65535", o.mtu)
	}
	subnet, err := pickSubnet()
	if err != nil {
		return nil, err
	}
	id := fmt.Sprintf("%x", rand.Uint32()&0xffffff)
	// Every name starts with Prefix+id (and fits the 15-byte link name limit),
	// so that one bed can be swept without touching another's.
	b = &Bed{ID: id, Bridge: Prefix + id + "br", Subnet: subnet, BridgeIP: addr(subnet, 1)}
	defer func() {
		if err != nil {
			b.Close()
			b = nil
		}
	}()
	if err := ip(ctx, "link", "add", b.Bridge, "type", "bridge"); err != nil {
		return nil, err
	}
	if err := ip(ctx, "addr", "add", b.BridgeIP+"/24", "dev", b.Bridge); err != nil {
		return nil, err
	}
	// Flood multicast to every port rather than depend on IGMP snooping,
	// which needs a querier this bridge does not have.
	if err := ip(ctx, "link", "set", "dev", b.Bridge, "type", "bridge", "mcast_snooping", "0"); err != nil {
		return nil, err
	}
	if err := ip(ctx, "link", "set", b.Bridge, "up"); err != nil {
		return nil, err
	}
	for i := 0; i < n; i++ {
		h := &Host{Name: fmt.Sprintf("%s%s-h%d", Prefix, id, i+1), IP: addr(subnet, 10+i), veth: fmt.Sprintf("%s%sv%d", Prefix, id, i+1)}
		b.Hosts = append(b.Hosts, h)
		steps := [][]string{
			{"netns", "add", h.Name},
			{"link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.Name},
			{"link", "set", h.veth, "master", b.Bridge},
			{"link", "set", h.veth, "up"},
			{"-n", h.Name, "addr", "add", h.IP + "/24", "dev", "eth0"},
			{"-n", h.Name, "link", "set", "eth0", "up"},
			{"-n", h.Name, "link", "set", "lo", "up"},
		}
		if o.mtu != 0 {
			m := strconv.Itoa(o.mtu)
			steps = append(steps, []string{"link", "set", h.veth, "mtu", m}, []string{"-n", h.Name, "link", "set", "eth0", "mtu", m})
		}
		for _, s := range steps {
			if err := ip(ctx, s...); err != nil {
				return nil, err
			}
		}
	}
	if o.mtu != 0 {
		if err := ip(ctx, "link", "set", b.Bridge, "mtu", strconv.Itoa(o.mtu)); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// Command returns a command that runs inside host i's namespace.
func (b *Bed) Command(ctx context.Context, i int, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", b.Hosts[i].Name, name}, args...)...)
}

// Close removes the bed's namespaces, veths and bridge. Processes still
// running in a namespace keep it alive until they exit; callers stop them
// first.
func (b *Bed) Close() error {
	ctx := context.Background()
	var errs []error
	for _, h := range b.Hosts {
		if err := ip(ctx, "netns", "del", h.Name); err != nil && !strings.Contains(err.Error(), "No such file") {
			errs = append(errs, err)
		}
		_ = ip(ctx, "link", "del", h.veth) // gone with the namespace, normally
	}
	if err := ip(ctx, "link", "del", b.Bridge); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Sweep removes every namespace and link whose name starts with prefix:
// Prefix for whatever beds crashed runs left (only when no other bed is in
// use on the machine), Prefix+ID for one bed.
func Sweep(ctx context.Context, prefix string) error {
	if err := Available(); err != nil {
		return err
	}
	if !strings.HasPrefix(prefix, Prefix) {
		return fmt.Errorf("testbed: sweep prefix %q does not start with %q", prefix, Prefix)
	}
	var errs []error
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			if err := ip(ctx, "netns", "del", f[0]); err != nil {
				errs = append(errs, err)
			}
		}
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		return err
	}
	for _, ifc := range ifaces {
		// A veth goes with its namespace, perhaps after the listing.
		if strings.HasPrefix(ifc.Name, prefix) {
			if err := ip(ctx, "link", "del", ifc.Name); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// Do runs fn on a thread inside host i's network namespace, for creating
// sockets there: a socket stays in the namespace it was created in, so the
// caller may use it from any goroutine afterwards. The thread is fresh and
// locked, and dies with its goroutine if it cannot return to the original
// namespace. Its signature fits mcast.ReceiverConfig.Listen (see In).
func (b *Bed) Do(i int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open("/run/netns/" + b.Hosts[i].Name)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("testbed: setns %s: %w", b.Hosts[i].Name, err)
			return
		}
		err = fn()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// In returns Do bound to host i.
func (b *Bed) In(i int) func(func() error) error {
	return func(fn func() error) error { return b.Do(i, fn) }
}
