// Package xenbed runs real Xen 4.17 hosts for tests: each host is a QEMU
// (TCG, -cpu qemu64,+npt with SSE4 and AES-NI) booting Debian's hypervisor with a Debian dom0
// that lives entirely in an initramfs, and a control agent in dom0 through
// which tests run commands and copy files.
//
// Data flow:
//
//	BuildImage: apt .debs (xen-hypervisor, xen-utils, libxen*, libc...)  -> <CacheDir>/xenbed/pkg/<deb sha256>/
//	            xen-4.17-amd64.gz -> gunzip -> xen.elf (QEMU's -kernel, multiboot)
//	            guest/image: Debian kernel (vmlinux, dom0's kernel) + Xen backend, bridge, e1000 modules; busybox
//	            xl, xenstored, xenconsoled, ... + their DT_NEEDED closure + init.sh + xenbed-agent + Options.Files
//	               -> newc cpio named by its sha256 -> <CacheDir>/xenbed/initramfs/<hash>.cpio
//	Start:      per host, QEMU: -kernel xen.elf -initrd "vmlinux <dom0 cmdline>,<cpio>"
//	               NIC 1 (e1000): user-mode net, restrict=on, 127.0.0.1:<port> -> dom0 10.0.2.15:7700 (agent)
//	               NIC 2 (e1000): UDP socket to the bed's hub -> dom0 bridge xenbr0, 10.77.0.(i+1)/24
//	            init.sh: mounts, modules, control NIC, agent, xenfs, xenstored, xen-init-dom0,
//	               xenconsoled (--log=guest), xenbr0; then busybox init reaps orphans
//	            Start returns when every agent reports ready (init done, `xl info` succeeds).
//	Host.Run/Exec/Put/Get -> agent.Client -> HTTP with the bed's token -> xenbed-agent in dom0
//
// The hosts' bed NICs meet in a user-space learning switch (hub.go) over UDP
// on 127.0.0.1, so their traffic never leaves loopback. Guests join the
// network with vif = ["bridge=xenbr0"]: dom0's /etc/xen/scripts/vif-bridge
// is a small sh script (Debian's needs bash). Guests' consoles are logged by
// xenconsoled under /var/log/xen/console/guest-<name>.log in dom0. Close
// kills every QEMU (each in its own process group, with a parent-death
// signal so a crashed test leaves none behind) and removes the bed's files.
//
// Running a bed needs root (apt-get download), qemu-system-x86_64 and the go
// command (to build the agent). On a 2-core machine two hosts boot to a
// ready dom0 in 7-9 s; the image builds in ~1 s from a warm cache (~60 s
// cold, downloading 21 packages).
package xenbed
