package memserver

import (
	"errors"

	"golang.org/x/sys/unix"
)

const seekData = unix.SEEK_DATA

// lseek finds data and holes in the snapshot file. ENXIO from SEEK_DATA
// means there is no data at or after off.
func lseek(fd int, off int64, whence int) (int64, error) {
	res, err := unix.Seek(fd, off, whence)
	if whence == seekData && errors.Is(err, unix.ENXIO) {
		return 0, errNoData
	}
	return res, err
}
