// Command sfhostd is the snowflock-go host daemon: it joins the cluster's
// gossip pool as a host, runs the VMs the coordinators assign to it under
// QEMU (KVM where the host has real KVM, TCG otherwise) and serves each VM's
// SnowFlock API channel. `sfhostd image build` builds the guest image
// (Debian kernel + initramfs with sfguest) that VMs boot by default.
package main

import "os"

func main() {
	os.Exit(Run(os.Args[1:], os.Stdout, os.Stderr))
}
