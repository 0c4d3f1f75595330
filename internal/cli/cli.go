// Package cli holds what the snowflock-go commands share about their command
// lines: usage errors and the exit status convention (0 ok, 1 error, 2
// usage), so that sfcoord, sfhostd and sfguest behave alike.
package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/pflag"
)

// Exit statuses.
const (
	ExitOK    = 0
	ExitError = 1
	ExitUsage = 2
)

// UsageError marks a problem with the command line: exit status 2.
type UsageError struct{ msg string }

func (e *UsageError) Error() string { return e.msg }

// Usagef returns a UsageError.
func Usagef(format string, a ...interface{}) error {
	return &UsageError{fmt.Sprintf(format, a...)}
}

// Help prints usage for no arguments (status 2) or an explicit help request
// (status 0) and reports whether it did.
func Help(args []string, usage string, stderr io.Writer) (int, bool) {
	switch {
	case len(args) == 0:
		fmt.Fprint(stderr, usage)
		return ExitUsage, true
	case args[0] == "help" || args[0] == "-h" || args[0] == "--help":
		fmt.Fprint(stderr, usage)
		return ExitOK, true
	}
	return 0, false
}

// Exit reports err on stderr as "name: err" and returns the exit status: 0
// for nil or a help request, 2 for a UsageError, 1 otherwise.
func Exit(name string, err error, stderr io.Writer) int {
	var ue *UsageError
	switch {
	case err == nil || errors.Is(err, pflag.ErrHelp):
		return ExitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitUsage
	default:
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitError
	}
}
