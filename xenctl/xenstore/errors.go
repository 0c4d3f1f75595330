package xenstore

import (
	"errors"
	"syscall"
)

// Errors xenstored answers with, as sentinels to match with errors.Is. An
// error answer is an *Error; it also unwraps to its syscall.Errno, so
// errors.Is(err, fs.ErrNotExist) holds for ErrNotFound.
var (
	ErrNotFound   = errors.New("xenstore: no such node")                         // ENOENT
	ErrPermission = errors.New("xenstore: permission denied")                    // EACCES, EPERM
	ErrAgain      = errors.New("xenstore: transaction conflict, try again")      // EAGAIN
	ErrExists     = errors.New("xenstore: already exists")                       // EEXIST
	ErrInvalid    = errors.New("xenstore: invalid argument")                     // EINVAL
	ErrTooBig     = errors.New("xenstore: too big")                              // E2BIG
	ErrQuota      = errors.New("xenstore: quota exceeded")                       // ENOSPC
	ErrBusy       = errors.New("xenstore: busy")                                 // EBUSY
	ErrNoMemory   = errors.New("xenstore: out of memory")                        // ENOMEM
	ErrIsDir      = errors.New("xenstore: is a directory")                       // EISDIR
	ErrNotEmpty   = errors.New("xenstore: not empty")                            // ENOTEMPTY
	ErrReadOnly   = errors.New("xenstore: read-only")                            // EROFS
	ErrIO         = errors.New("xenstore: I/O error")                            // EIO
	ErrConnected  = errors.New("xenstore: already connected")                    // EISCONN
	ErrNoSys      = errors.New("xenstore: operation not supported by xenstored") // ENOSYS
)

// errnos maps the errno names of xs_wire.h's xsd_errors to sentinels and
// errnos.
var errnos = map[string]struct {
	sentinel error
	errno    syscall.Errno
}{
	"EINVAL":    {ErrInvalid, syscall.EINVAL},
	"EACCES":    {ErrPermission, syscall.EACCES},
	"EEXIST":    {ErrExists, syscall.EEXIST},
	"EISDIR":    {ErrIsDir, syscall.EISDIR},
	"ENOENT":    {ErrNotFound, syscall.ENOENT},
	"ENOMEM":    {ErrNoMemory, syscall.ENOMEM},
	"ENOSPC":    {ErrQuota, syscall.ENOSPC},
	"EIO":       {ErrIO, syscall.EIO},
	"ENOTEMPTY": {ErrNotEmpty, syscall.ENOTEMPTY},
	"ENOSYS":    {ErrNoSys, syscall.ENOSYS},
	"EROFS":     {ErrReadOnly, syscall.EROFS},
	"EBUSY":     {ErrBusy, syscall.EBUSY},
	"EAGAIN":    {ErrAgain, syscall.EAGAIN},
	"EISCONN":   {ErrConnected, syscall.EISCONN},
	"E2BIG":     {ErrTooBig, syscall.E2BIG},
	"EPERM":     {ErrPermission, syscall.EPERM},
}

// Error is an error answer from xenstored (or from Linux's xenbus driver,
// which answers some requests itself).
type Error struct {
	Op   Op
	Path string // the node the request named, if any
	// Code is the errno name xenstored sent ("ENOENT"). It is always one
	// of xs_wire.h's names: a reply with any other is a protocol error.
	Code string
}

func (e *Error) Error() string {
	s := "xenstore: " + e.Op.String()
	if e.Path != "" {
		s += " " + e.Path
	}
	return s + ": " + e.Code + " (" + errnos[e.Code].sentinel.Error() + ")"
}

// Is matches the sentinel of the error's code.
func (e *Error) Is(target error) bool { return errnos[e.Code].sentinel == target }

// Unwrap returns the syscall.Errno of the error's code.
func (e *Error) Unwrap() error { return errnos[e.Code].errno }

// parseError decodes an OpError payload: an errno name, nul-terminated.
func parseError(op Op, path string, p []byte) error {
	code, err := parseOneString(p)
	if err != nil {
		return err
	}
	if _, ok := errnos[code]; !ok {
		return protoErr("unknown error %q", code)
	}
	return &Error{Op: op, Path: path, Code: code}
}
