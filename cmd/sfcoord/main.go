// Command sfcoord runs a coordinator agent and talks to the coordinator
// cluster: membership, raft peers, tickets and cluster status.
//
//	sfcoord agent --node-id c1 --data-dir /var/lib/sfcoord --bootstrap-expect 3 --join 10.0.0.2:7946
//	sfcoord members
//	sfcoord raft list-peers
//
// Run with no arguments for the list of commands.
package main

import "os"

func main() {
	os.Exit(Run(os.Args[1:], os.Stdout, os.Stderr))
}
