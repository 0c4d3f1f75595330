package guest

import (
	"context"

	"github.com/snowflock-go/snowflock/guestchan"
)

// Ticket is a ticket as the guest sees it.
type Ticket struct {
	ID         uint64   `json:"id"`
	ParentVM   uint64   `json:"parent_vm"`
	Requested  int      `json:"requested"`
	Granted    int      `json:"granted"`
	Placements []string `json:"placements"`
	State      string   `json:"state"`
	Reason     string   `json:"reason,omitempty"`
	Clones     []Clone  `json:"clones,omitempty"`
}

// Clone is one clone of a ticket with its outcome.
type Clone struct {
	K      int    `json:"k"`
	VMID   uint64 `json:"vm_id"`
	Host   string `json:"host"`
	State  string `json:"state"`
	Status int    `json:"status"`
	Result string `json:"result,omitempty"`
	Reason string `json:"reason,omitempty"`
}

// Checkpoint answers checkpoint(): in the VM that took it, the checkpoint's
// ID with CloneID 0; in a clone that create_clones started from it, the same
// ID with the clone's k and ticket.
type Checkpoint struct {
	ID      uint64 `json:"id"`
	CloneID int    `json:"clone_id"`
	Ticket  uint64 `json:"ticket,omitempty"`
}

// Client is the SnowFlock API for a guest program. Errors from the host are
// *guestchan.Error values with a code (match with errors.As).
type Client struct {
	m *Mux
}

// NewClient returns a client over an existing Mux.
func NewClient(m *Mux) *Client { return &Client{m: m} }

// Close releases the channel.
func (c *Client) Close() error { return c.m.Close() }

// Hello returns this VM's identity: its VM ID, and for a clone its ticket
// and clone ID.
func (c *Client) Hello(ctx context.Context) (guestchan.Identity, error) {
	var id guestchan.Identity
	err := c.m.Call(ctx, guestchan.CallHello, nil, &id)
	return id, err
}

// Ready tells the host that the guest is up.
func (c *Client) Ready(ctx context.Context) error {
	return c.m.Call(ctx, guestchan.CallReady, nil, nil)
}

// RequestTicket is request_ticket(n): it reserves up to n clones.
func (c *Client) RequestTicket(ctx context.Context, n int) (Ticket, error) {
	var t Ticket
	err := c.m.Call(ctx, guestchan.CallTicket, guestchan.TicketArgs{N: n}, &t)
	return t, err
}

// Tickets lists this VM's tickets.
func (c *Client) Tickets(ctx context.Context) ([]Ticket, error) {
	var t []Ticket
	err := c.m.Call(ctx, guestchan.CallTickets, nil, &t)
	return t, err
}

// Ticket returns one of this VM's tickets with its clones.
func (c *Client) Ticket(ctx context.Context, id uint64) (Ticket, error) {
	var t Ticket
	err := c.m.Call(ctx, guestchan.CallTicketInfo, guestchan.TicketRef{Ticket: id}, &t)
	return t, err
}

// Clone is clone(ticket): it returns 0 in the parent and k in clone k.
func (c *Client) Clone(ctx context.Context, ticket uint64) (int, error) {
	var r guestchan.CloneResult
	err := c.m.Call(ctx, guestchan.CallClone, guestchan.TicketRef{Ticket: ticket}, &r)
	return r.CloneID, err
}

// Exit is exit(status, result) in a clone: the clone ends.
func (c *Client) Exit(ctx context.Context, status int, result string) error {
	return c.m.Call(ctx, guestchan.CallExit, guestchan.ExitArgs{Status: status, Result: result}, nil)
}

// Join is join(ticket): it waits for every clone and returns their outcomes.
func (c *Client) Join(ctx context.Context, ticket uint64) (Ticket, error) {
	var t Ticket
	err := c.m.Call(ctx, guestchan.CallJoin, guestchan.TicketRef{Ticket: ticket}, &t)
	return t, err
}

// Kill is kill(ticket): the ticket's clones are destroyed.
func (c *Client) Kill(ctx context.Context, ticket uint64) (Ticket, error) {
	var t Ticket
	err := c.m.Call(ctx, guestchan.CallKill, guestchan.TicketRef{Ticket: ticket}, &t)
	return t, err
}

// Checkpoint is checkpoint(): an immutable checkpoint of this VM now.
func (c *Client) Checkpoint(ctx context.Context) (Checkpoint, error) {
	var cp Checkpoint
	err := c.m.Call(ctx, guestchan.CallCheckpoint, nil, &cp)
	return cp, err
}

// CreateClones is create_clones(checkpoint, ticket): 0 in the caller, k in
// clone k started from the checkpoint.
func (c *Client) CreateClones(ctx context.Context, checkpoint, ticket uint64) (int, error) {
	var r guestchan.CloneResult
	err := c.m.Call(ctx, guestchan.CallCreateClones, guestchan.CreateClonesArgs{Checkpoint: checkpoint, Ticket: ticket}, &r)
	return r.CloneID, err
}
