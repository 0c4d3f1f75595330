package xenbed

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// hub is the bed's Ethernet segment: a learning Ethernet switch in user
// space. It learns which host each source MAC address is behind (a dom0's
// own NIC, or a guest bridged to it) and sends a unicast frame only to the
// host its destination is behind; broadcast, multicast (there is no IGMP
// snooping, as on most cluster switches) and frames to unknown addresses
// go to every other host. A host therefore spends no CPU on unicast
// traffic between two others, as on a switched cluster network.
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
	frames  atomic.Int64     // frames forwarded (counted once per sender)
	flooded atomic.Int64     // of which went to every other host
	dropped atomic.Int64     // datagrams from unexpected sources, or runts
	wg      sync.WaitGroup
	closing atomic.Bool

	mu  sync.Mutex
	fdb map[[6]byte]int // source MAC -> the port it was last seen on
}

// maxFrame bounds a datagram: QEMU sends one Ethernet frame per datagram
// (at most 64 KiB with offloads).
const maxFrame = 65536

// newHub opens one hub port per host and picks the UDP port each QEMU will
// bind. The QEMU ports are found free by binding and releasing them; QEMU
// fails to start if another process takes one in between, and Start tries
// again.
func newHub(n int) (*hub, error) {
	h := &hub{fdb: map[[6]byte]int{}}
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

// minFrame is an Ethernet header: destination, source, type.
const minFrame = 14

// route learns a frame's source on port i and returns the one port its
// destination is behind, or -1 to flood it to every other port. A frame
// for a host on its own port goes nowhere (-2): the host's bridge keeps
// such traffic to itself.
func (h *hub) route(i int, frame []byte) int {
	dst, src := [6]byte(frame[0:6]), [6]byte(frame[6:12])
	h.mu.Lock()
	defer h.mu.Unlock()
	if src[0]&1 == 0 { // a unicast source: learn where it is
		h.fdb[src] = i
	}
	if dst[0]&1 != 0 { // broadcast or multicast
		return -1
	}
	j, ok := h.fdb[dst]
	switch {
	case !ok:
		return -1
	case j == i:
		return -2
	}
	return j
}

// repeat forwards host i's frames until close: to the host behind the
// destination address, or to every other host.
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
		if unmap(from) != h.peers[i] || n < minFrame {
			h.dropped.Add(1)
			continue
		}
		h.frames.Add(1)
		// A host that is not up yet refuses; the frame is lost, as on a
		// wire with the cable unplugged.
		switch j := h.route(i, buf[:n]); {
		case j >= 0:
			h.ports[j].WriteToUDPAddrPort(buf[:n], h.peers[j])
		case j == -1:
			h.flooded.Add(1)
			for j, c := range h.ports {
				if j != i {
					c.WriteToUDPAddrPort(buf[:n], h.peers[j])
				}
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
