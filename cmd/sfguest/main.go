// Command sfguest is the guest side of snowflock-go, one static binary with
// two jobs:
//
//   - As PID 1 (the initramfs /init) it mounts the kernel file systems, loads
//     the modules listed in /etc/sfguest/modules, takes the host channel
//     (/dev/ttyS1) and serves it to local programs on /run/sfguest.sock,
//     prints a ready line on the console, runs the workload (kernel argument
//     sf.cmd=<base64url shell command>, else /etc/sfguest/workload) and powers
//     the VM off when the workload ends.
//   - Otherwise it is the CLI of the SnowFlock API: sfguest ticket N,
//     clone T, exit, join T, kill T, checkpoint, create-clones C T, tickets,
//     ticket T, id. Run it with no arguments for usage.
package main

import "os"

func main() {
	if os.Getpid() == 1 {
		runInit() // never returns: powers off
	}
	os.Exit(Run(os.Args[1:], os.Stdout, os.Stderr))
}
