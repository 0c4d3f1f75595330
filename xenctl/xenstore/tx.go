package xenstore

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Tx is a xenstore transaction: its reads see one snapshot and its writes
// apply together at Commit, or not at all. xenstored refuses a commit that
// conflicts with a change made since the transaction began (ErrAgain);
// Update retries such transactions.
//
// A Tx is used by one goroutine; its calls go over its client's connection.
// xenstored limits the transactions a domain may hold open at once (10 by
// default), so every Tx must end with Commit or Abort.
type Tx struct {
	c    *Client
	id   uint32
	done bool
}

// Begin starts a transaction.
func (c *Client) Begin(ctx context.Context) (*Tx, error) {
	// The payload is an empty string, as libxenstore sends it; xenstored
	// ignores it.
	m, err := c.do(ctx, 0, OpTransactionStart, "", []byte{0})
	if err != nil {
		return nil, err
	}
	id, err := parseTxID(m.Payload)
	if err != nil {
		return nil, err
	}
	return &Tx{c: c, id: id}, nil
}

// ID is the transaction's ID on the connection.
func (t *Tx) ID() uint32 { return t.id }

// Commit applies the transaction. ErrAgain (errors.Is) means it conflicted
// with another change and nothing was applied.
func (t *Tx) Commit(ctx context.Context) error { return t.end(ctx, true) }

// Abort discards the transaction.
func (t *Tx) Abort(ctx context.Context) error { return t.end(ctx, false) }

func (t *Tx) end(ctx context.Context, commit bool) error {
	if t.done {
		return fmt.Errorf("%w: transaction %d has ended", ErrInvalid, t.id)
	}
	t.done = true
	arg := []byte("F\x00")
	if commit {
		arg = []byte("T\x00")
	}
	m, err := t.c.do(ctx, t.id, OpTransactionEnd, "", arg)
	if err != nil {
		return err
	}
	return parseOK(m.Payload)
}

// Read returns a node's value as the transaction sees it.
func (t *Tx) Read(ctx context.Context, path string) ([]byte, error) {
	return t.c.read1(ctx, t.id, path)
}

// Write sets a node's value in the transaction.
func (t *Tx) Write(ctx context.Context, path string, value []byte) error {
	return t.c.write(ctx, t.id, path, value)
}

// Mkdir creates a node in the transaction.
func (t *Tx) Mkdir(ctx context.Context, path string) error {
	return t.c.ack(ctx, t.id, OpMkdir, path)
}

// Rm removes a node and its children in the transaction.
func (t *Tx) Rm(ctx context.Context, path string) error {
	return t.c.ack(ctx, t.id, OpRm, path)
}

// Directory lists a node's children as the transaction sees them.
func (t *Tx) Directory(ctx context.Context, path string) ([]string, error) {
	return t.c.directory(ctx, t.id, path)
}

// GetPerms returns a node's permissions as the transaction sees them.
func (t *Tx) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return t.c.getPerms(ctx, t.id, path)
}

// SetPerms replaces a node's permissions in the transaction.
func (t *Tx) SetPerms(ctx context.Context, path string, perms []Perm) error {
	return t.c.setPerms(ctx, t.id, path, perms)
}

// UpdateAttempts bounds Update's tries.
const UpdateAttempts = 16

// Update runs fn in a transaction and commits it, starting over while the
// commit conflicts (ErrAgain), up to UpdateAttempts times with a short
// growing pause. An error from fn aborts the transaction and is returned
// as it is. fn may run more than once, so it must not have effects
// outside the transaction.
func (c *Client) Update(ctx context.Context, fn func(*Tx) error) error {
	pause := time.Millisecond
	var err error
	for range UpdateAttempts {
		var tx *Tx
		if tx, err = c.Begin(ctx); err != nil {
			return err
		}
		if err = fn(tx); err != nil {
			if !tx.done {
				// Abort on a context of its own: fn may have failed
				// because ctx ended, and the transaction must still end.
				actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
				tx.Abort(actx)
				cancel()
			}
			if !errors.Is(err, ErrAgain) {
				return err
			}
		} else if err = tx.Commit(ctx); !errors.Is(err, ErrAgain) {
			return err
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return ctx.Err()
		}
		pause = min(2*pause, 50*time.Millisecond)
	}
	return fmt.Errorf("xenstore: transaction still conflicting after %d attempts: %w", UpdateAttempts, err)
}
