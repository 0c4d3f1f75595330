package mcast

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// Sockets. Multicast always leaves and arrives on the interface that owns
// the configured address, never on the default route: the sending socket
// sets IP_MULTICAST_IF to it, receivers join the group on it.

// socketBuffer is what the package asks for both socket buffers: bursts
// of a window of packets must fit while the owner is busy.
const socketBuffer = 32 << 20

// setBuffers sets SO_RCVBUF and SO_SNDBUF, forcing past the sysctl limits
// when the process may (CAP_NET_ADMIN), and falls back quietly otherwise.
func setBuffers(fd int, size int) {
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, size) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, size)
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, size) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, size)
	}
}

func control(f func(fd int) error) func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var err error
		if cerr := rc.Control(func(fd uintptr) { err = f(int(fd)) }); cerr != nil {
			return cerr
		}
		return err
	}
}

// listenSender opens the sender's socket: bound to local (port 0), it
// sends to the group through local's interface with TTL 1, and receives
// the members' feedback.
func listenSender(ctx context.Context, local netip.Addr) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: control(func(fd int) error {
		setBuffers(fd, socketBuffer)
		if err := unix.SetsockoptInet4Addr(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_IF, local.As4()); err != nil {
			return fmt.Errorf("IP_MULTICAST_IF %s: %w", local, err)
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_TTL, 1); err != nil {
			return fmt.Errorf("IP_MULTICAST_TTL: %w", err)
		}
		// Members on the sender's own host (tests) hear it too.
		return unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_LOOP, 1)
	})}
	pc, err := lc.ListenPacket(ctx, "udp4", netip.AddrPortFrom(local, 0).String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// listenGroup opens a member's multicast socket: bound to the group's
// address and port (so it hears only that group), joined on local's
// interface. Several sockets on one host may join the same group.
func listenGroup(ctx context.Context, local netip.Addr, group netip.AddrPort) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: control(func(fd int) error {
		setBuffers(fd, socketBuffer)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("SO_REUSEADDR: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_ALL, 0); err != nil {
			return fmt.Errorf("IP_MULTICAST_ALL: %w", err)
		}
		mreq := &unix.IPMreq{Multiaddr: group.Addr().As4(), Interface: local.As4()}
		if err := unix.SetsockoptIPMreq(fd, unix.IPPROTO_IP, unix.IP_ADD_MEMBERSHIP, mreq); err != nil {
			return fmt.Errorf("joining %s on %s: %w", group.Addr(), local, err)
		}
		return nil
	})}
	pc, err := lc.ListenPacket(ctx, "udp4", group.String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// listenUnicast opens a member's feedback socket on local.
func listenUnicast(ctx context.Context, local netip.Addr) (*net.UDPConn, error) {
	var lc net.ListenConfig
	pc, err := lc.ListenPacket(ctx, "udp4", netip.AddrPortFrom(local, 0).String())
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}
