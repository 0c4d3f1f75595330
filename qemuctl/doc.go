// Package qemuctl launches and controls QEMU virtual machines for a host
// daemon, one QEMU process per VM.
//
// Start builds the command line from a Config, starts QEMU and returns once
// its QMP monitor answers; the VM is then driven through QMP (package
// qemuctl/qmp). Each VM owns a run directory and a RAM file:
//
//	RunDir/qmp.sock     QMP monitor; the socket is bound by Start and passed
//	                    to QEMU, so connecting never races QEMU's start-up
//	RunDir/guest.sock   guest API channel: the guest's second serial port
//	RunDir/console.log  the guest's first serial port (kernel console)
//	RunDir/qemu.log     QEMU's own stdout and stderr
//	RunDir/qemu.pid     QEMU's pid, for Reap after a host daemon crash
//	RunDir/vm.json      what Reap needs to clean up (RAM file path)
//	RAMDir/ID.ram       guest RAM: memory-backend-file, share=on, on tmpfs
//
// Guest RAM lives in a shared file rather than anonymous memory so that a
// snapshot can save the device state alone (migration capability
// x-ignore-shared) while the RAM file itself becomes the memory image that
// clones map.
//
// VM.Snapshot (snapshot.go) pauses the guest, has QEMU write its device
// state (a few hundred KB) to a file passed over the monitor socket (getfd,
// migrate "fd:"), copies the data extents of the RAM file into a new frozen
// file (freeze.go) and resumes the guest; the parent's later writes go to
// its own RAM file only. Restore (restore.go) starts a clone: a QEMU with the
// parent's machine whose RAM maps the frozen file share=off (MAP_PRIVATE:
// clones share its pages through the page cache and keep their writes),
// started with -incoming defer to load the device state, then resumed. A
// clone has its own run directory; its RAM file belongs to the snapshot, so
// neither Destroy nor Reap removes it.
//
// The guest API channel is a second 16550 UART (the guest's /dev/ttyS1)
// connected to a unix socket on which QEMU listens without waiting for a
// client. A UART needs no driver beyond the kernel's 8250 driver, which
// Debian builds in (SERIAL_8250=y), so the channel works from the first
// instruction of the guest's /init with no module loaded and no PCI bus
// scanned. virtio-serial would need virtio_console and virtio_pci, both
// modules in Debian's kernel. QEMU discards what the guest writes to the
// port while no client is connected, so the protocol on it must let the
// host speak first or retry.
//
// QEMU never outlives its host daemon: it runs in its own process group
// with a parent-death signal of SIGKILL, started from an OS thread that
// stays alive until QEMU exits (the signal follows the thread, not the
// process). A daemon that crashed anyway leaves run directories and RAM
// files behind; Reap removes them when it restarts.
//
// Acceleration is KVM where /dev/kvm can run stock kernels and TCG
// elsewhere (ProbeAccel).
package qemuctl
