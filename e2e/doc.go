// Package e2e holds end-to-end tests of whole clusters of real processes:
// three sfcoord agents on a test bed's bridge and sfhostd daemons each in
// its own network namespace, running real guests under QEMU, with failures
// injected by kill -9. It has no non-test code.
package e2e
