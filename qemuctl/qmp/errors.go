package qmp

import (
	"errors"
	"fmt"
)

var (
	// ErrDisconnected is wrapped in the error of every call that was pending,
	// or is made, after the connection to QEMU was lost (QEMU exited, the
	// socket failed, or QEMU sent a line longer than MaxLineSize).
	ErrDisconnected = errors.New("qmp: disconnected")
	// ErrClosed is returned by calls pending on, or made after, Close.
	ErrClosed = errors.New("qmp: client closed")
)

// Error classes QEMU 7.2 uses (qapi/error.json). Most failures are
// GenericError; the class is for programs, Desc for people.
const (
	ClassGenericError    = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
	ClassDeviceNotActive = "DeviceNotActive"
	ClassDeviceNotFound  = "DeviceNotFound"
	ClassKVMMissingCap   = "KVMMissingCap"
)

// Error is an error response from QEMU to a command. Match it with
// errors.As; the connection stays usable.
type Error struct {
	Command string // the command that failed
	Class   string // e.g. ClassCommandNotFound
	Desc    string // human-readable, from QEMU
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp: %s: %s: %s", e.Command, e.Class, e.Desc)
}
