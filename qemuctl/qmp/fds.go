package qmp

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"syscall"
)

// ErrNoFDPassing is returned by GetFD on a connection that cannot carry file
// descriptors (anything but a unix socket).
var ErrNoFDPassing = errors.New("qmp: connection cannot pass file descriptors")

// GetFD hands f to QEMU under name (QMP getfd): the descriptor travels as
// SCM_RIGHTS ancillary data with the command's bytes, and QEMU keeps its own
// copy, so the caller may close f once GetFD returns. Commands that take a
// descriptor name use it, e.g. Migrate with "fd:"+name, which consumes it;
// otherwise release it with CloseFD. A name already in use is replaced.
func (c *Client) GetFD(ctx context.Context, name string, f *os.File) error {
	if _, ok := c.conn.(*net.UnixConn); !ok {
		return fmt.Errorf("qmp: getfd: %w", ErrNoFDPassing)
	}
	fd := int(f.Fd())
	if fd < 0 {
		return fmt.Errorf("qmp: getfd: %w", os.ErrClosed)
	}
	err := c.execute(ctx, "getfd", map[string]string{"fdname": name}, nil, syscall.UnixRights(fd))
	runtime.KeepAlive(f) // its descriptor must outlive the send
	return err
}

// CloseFD makes QEMU close the descriptor it holds under name (QMP closefd).
func (c *Client) CloseFD(ctx context.Context, name string) error {
	return c.Execute(ctx, "closefd", map[string]string{"fdname": name}, nil)
}

// writeMsg writes buf, with oob attached to its first bytes when oob is not
// nil (the connection is then a *net.UnixConn: GetFD checked).
func (c *Client) writeMsg(buf, oob []byte) (int, error) {
	if oob == nil {
		return c.conn.Write(buf)
	}
	uc := c.conn.(*net.UnixConn)
	n, _, err := uc.WriteMsgUnix(buf, oob, nil)
	if err != nil || n == len(buf) {
		return n, err
	}
	// A stream socket may take part of the request; the descriptor went
	// with that part, the rest follows plainly.
	m, err := uc.Write(buf[n:])
	return n + m, err
}
