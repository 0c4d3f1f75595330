//go:build !linux

package memserver

import "errors"

const seekData = 3

// lseek reports that holes cannot be found here: every page is read, and
// zero pages are still found by their contents.
func lseek(fd int, off int64, whence int) (int64, error) {
	return 0, errors.New("memserver: SEEK_DATA not supported on this system")
}
