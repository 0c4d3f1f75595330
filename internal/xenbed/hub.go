package xenbed

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// hub is the bed's Ethernet segment: an Ethernet hub in user space that
// repeats every frame one host sends to all the others.
//
// Each QEMU's bed NIC is a UDP socket netdev
// (-netdev socket,udp=127.0.0.1:<hub port>,localaddr=127.0.0.1:<qemu port>):
// QEMU sends each frame as one datagram to its own port of the hub and
// receives the others' frames from there. Compared with QEMU's multicast
// netdev this keeps every packet on 127.0.0.1 by construction (no multicast
// routing to get wrong on a machine whose default route leaves it), never
// echoes a host's frames back to it (which would make the dom0 bridges
// learn their own guests' MACs on the uplink), and works for any number of
// hosts.
type hub struct {
	ports   []*net.UDPConn   // ports[i] talks to host i's QEMU
	peers   []netip.AddrPort // host i's QEMU socket
	frames  atomic.Int64     // frames repeated (counted once per sender)
	dropped atomic.Int64     // datagrams from unexpected sources
	wg      sync.WaitGroup
	closing atomic.Bool
}

// maxFrame bounds a datagram: QEMU sends one Ethernet frame per datagram
// (at most 64 KiB with offloads).
const maxFrame = 65536

// newHub opens one hub port per host and picks the UDP port each QEMU will
// bind. The QEMU ports are found free by binding and releasing them; QEMU
// fails to start if another process takes one in between, and Start tries
// again.
func newHub(n int) (*hub, error) {
	h := &hub{}
	for i := 0; i < n; i++ {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			h.close()
			return nil, fmt.Errorf("xenbed: hub: %w", err)
		}
		h.ports = append(h.ports, c)
		peer, err := freeUDPPort()
		if err != nil {
			h.close()
			return nil, err
		}
		h.peers = append(h.peers, peer)
	}
	for i := range h.ports {
		h.wg.Add(1)
		go h.repeat(i)
	}
	return h, nil
}

// netdev returns the QEMU -netdev option of host i's bed NIC.
func (h *hub) netdev(i int, id string) string {
	return fmt.Sprintf("socket,id=%s,udp=%s,localaddr=%s", id, h.ports[i].LocalAddr(), h.peers[i])
}

// repeat forwards host i's frames to every other host until close.
func (h *hub) repeat(i int) {
	defer h.wg.Done()
	buf := make([]byte, maxFrame)
	for {
		n, from, err := h.ports[i].ReadFromUDPAddrPort(buf)
		if err != nil {
			if !h.closing.Load() && !errors.Is(err, net.ErrClosed) {
				continue // e.g. ECONNREFUSED from an ICMP error: keep going
			}
			return
		}
		if unmap(from) != h.peers[i] {
			h.dropped.Add(1)
			continue
		}
		h.frames.Add(1)
		for j, c := range h.ports {
			if j != i {
				// A host that is not up yet refuses; the frame is lost,
				// as on a wire with the cable unplugged.
				c.WriteToUDPAddrPort(buf[:n], h.peers[j])
			}
		}
	}
}

// close stops the hub and waits for its goroutines.
func (h *hub) close() {
	h.closing.Store(true)
	for _, c := range h.ports {
		c.Close()
	}
	h.wg.Wait()
}

func freeUDPPort() (netip.AddrPort, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("xenbed: picking a UDP port: %w", err)
	}
	defer c.Close()
	return unmap(c.LocalAddr().(*net.UDPAddr).AddrPort()), nil
}

// unmap makes IPv4 addresses comparable whichever form the socket API
// returned them in.
func unmap(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

func freeTCPPort() (int, error) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("xenbed: picking a TCP port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
