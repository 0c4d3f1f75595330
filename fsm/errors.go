package fsm

import "errors"

// Sentinel errors. Apply wraps them with detail; match with errors.Is. The
// coordinator's API maps each to an HTTP status and a stable error code.
var (
	ErrInvalid        = errors.New("invalid command")
	ErrBadCommand     = errors.New("malformed command")
	ErrUnknownCommand = errors.New("unknown command type")
	ErrNotFound       = errors.New("not found")
	ErrNoCapacity     = errors.New("no capacity")
	ErrNotParent      = errors.New("caller is not the ticket's parent")
	ErrNotClone       = errors.New("caller is not a clone")
	ErrBadState       = errors.New("illegal state transition")
	ErrDisposed       = errors.New("ticket already disposed")
	ErrClonesRunning  = errors.New("clones still running")
)

// Code returns a short stable name for a sentinel error, for API clients.
func Code(err error) string {
	for _, e := range []struct {
		err  error
		code string
	}{
		{ErrInvalid, "invalid"},
		{ErrBadCommand, "malformed"},
		{ErrUnknownCommand, "unknown_command"},
		{ErrNotFound, "not_found"},
		{ErrNoCapacity, "no_capacity"},
		{ErrNotParent, "not_parent"},
		{ErrNotClone, "not_clone"},
		{ErrBadState, "bad_state"},
		{ErrDisposed, "disposed"},
		{ErrClonesRunning, "clones_running"},
	} {
		if errors.Is(err, e.err) {
			return e.code
		}
	}
	return "internal"
}

// ErrorForCode is the inverse of Code, for clients that receive a code.
func ErrorForCode(code string) error {
	switch code {
	case "invalid":
		return ErrInvalid
	case "malformed":
		return ErrBadCommand
	case "unknown_command":
		return ErrUnknownCommand
	case "not_found":
		return ErrNotFound
	case "no_capacity":
		return ErrNoCapacity
	case "not_parent":
		return ErrNotParent
	case "not_clone":
		return ErrNotClone
	case "bad_state":
		return ErrBadState
	case "disposed":
		return ErrDisposed
	case "clones_running":
		return ErrClonesRunning
	}
	return nil
}
