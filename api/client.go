package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/snowflock-go/snowflock/fsm"
)

// Client errors that are not FSM errors. An *Error unwraps to these or to an
// fsm sentinel (fsm.ErrNotParent, ...), so callers match with errors.Is.
var (
	ErrUnauthorized   = errors.New("unauthorized")
	ErrNoLeader       = errors.New("no leader")
	ErrUnknownOutcome = errors.New("outcome unknown")
)

// Error is an error answer from a coordinator.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("coordinator: %s (%d %s)", e.Message, e.Status, e.Code)
}

// Unwrap maps the error code to a sentinel.
func (e *Error) Unwrap() error {
	if err := fsm.ErrorForCode(e.Code); err != nil {
		return err
	}
	switch e.Code {
	case CodeUnauthorized:
		return ErrUnauthorized
	case CodeNoLeader, CodeNotLeader:
		return ErrNoLeader
	case CodeUnknownOutcome:
		return ErrUnknownOutcome
	}
	return nil
}

// Config configures a Client.
type Config struct {
	Addrs []string // coordinator API addresses, host:port; tried in turn
	Token string   // bearer token, if the cluster requires one
	// RetryFor bounds how long a call keeps retrying across coordinators and
	// leader elections (ctx may end it earlier). Zero means 15 s.
	RetryFor   time.Duration
	HTTPClient *http.Client
}

// Client talks to a coordinator cluster. It is safe for concurrent use.
type Client struct {
	cfg  Config
	hc   *http.Client
	next atomic.Uint32 // index of the address to try first
}

// NewClient returns a client for the given coordinators.
func NewClient(cfg Config) (*Client, error) {
	if len(cfg.Addrs) == 0 {
		return nil, errors.New("api: no coordinator address")
	}
	if cfg.RetryFor == 0 {
		cfg.RetryFor = 15 * time.Second
	}
	hc := cfg.HTTPClient
	if hc == nil {
		hc = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, IdleConnTimeout: time.Minute}}
	}
	return &Client{cfg: cfg, hc: hc}, nil
}

// QueryOptions control reads.
type QueryOptions struct {
	Index uint64        // block until the result's index exceeds this
	Wait  time.Duration // how long to block at most
	Stale bool          // any coordinator may answer from its own state
}

// QueryMeta describes a read's answer.
type QueryMeta struct {
	Index uint64 // pass as QueryOptions.Index to wait for the next change
}

// NewRequestID returns a random request ID for idempotent retries.
func NewRequestID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (o *QueryOptions) values() url.Values {
	v := url.Values{}
	if o == nil {
		return v
	}
	if o.Index > 0 {
		v.Set("index", strconv.FormatUint(o.Index, 10))
	}
	if o.Wait > 0 {
		v.Set("wait", o.Wait.String())
	}
	if o.Stale {
		v.Set("stale", "")
	}
	return v
}

// retryable reports whether another attempt, perhaps at another coordinator,
// may succeed: the coordinator could not be reached, or answered 503 (no
// leader yet, or leadership lost mid-write). Writes are retried after an
// unknown outcome only because every creating call carries a request ID
// that the FSM deduplicates.
func retryable(err error) bool {
	var e *Error
	if errors.As(err, &e) {
		return e.Status == http.StatusServiceUnavailable
	}
	var fe *finalError
	return err != nil && !errors.As(err, &fe) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded)
}

// finalError is a failure after the coordinator answered 200: never retried.
type finalError struct{ err error }

func (e *finalError) Error() string { return e.err.Error() }
func (e *finalError) Unwrap() error { return e.err }

// do performs one API call, retrying across coordinators.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, in, out interface{}) (QueryMeta, error) {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return QueryMeta{}, err
		}
	}
	// Retry for RetryFor (plus any blocking wait) or until ctx ends,
	// whichever comes first.
	ctx, cancel := context.WithTimeout(ctx, c.cfg.RetryFor+maxWaitOf(q))
	defer cancel()
	var lastErr error
	for attempt := 0; ; attempt++ {
		i := int(c.next.Load()) % len(c.cfg.Addrs)
		meta, err := c.once(ctx, c.cfg.Addrs[i], method, path, q, body, out)
		if err == nil || !retryable(err) {
			return meta, err
		}
		lastErr = err
		c.next.CompareAndSwap(uint32(i), uint32(i+1)) // try the next coordinator
		backoff := min(time.Duration(attempt+1)*20*time.Millisecond, 250*time.Millisecond)
		select {
		case <-ctx.Done():
			return QueryMeta{}, fmt.Errorf("%s %s: gave up: %w (last error: %v)", method, path, ctx.Err(), lastErr)
		case <-time.After(backoff):
		}
	}
}

func maxWaitOf(q url.Values) time.Duration {
	if d, err := time.ParseDuration(q.Get("wait")); err == nil {
		return d + d/16 + time.Second
	}
	if q.Has("index") {
		return 6 * time.Minute
	}
	return 0
}

func (c *Client) once(ctx context.Context, addr, method, path string, q url.Values, body []byte, out interface{}) (QueryMeta, error) {
	u := "http://" + addr + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return QueryMeta{}, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.cfg.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.cfg.Token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return QueryMeta{}, err
	}
	defer resp.Body.Close()
	var meta QueryMeta
	if v := resp.Header.Get("X-Index"); v != "" {
		meta.Index, _ = strconv.ParseUint(v, 10, 64)
	}
	if resp.StatusCode != http.StatusOK {
		var eb ErrorBody
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
			eb = ErrorBody{Error: string(bytes.TrimSpace(b)), Code: "http_" + strconv.Itoa(resp.StatusCode)}
		}
		return meta, &Error{Status: resp.StatusCode, Code: eb.Code, Message: eb.Error}
	}
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return meta, nil
	}
	if s, ok := out.(*string); ok {
		b, err := io.ReadAll(resp.Body)
		*s = string(b)
		if err != nil {
			return meta, &finalError{err}
		}
		return meta, nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return meta, &finalError{fmt.Errorf("decode %s answer: %w", path, err)}
	}
	return meta, nil
}

func idPath(format string, id uint64) string { return fmt.Sprintf(format, id) }

// Status returns the state of the coordinator the client reaches first.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	_, err := c.do(ctx, http.MethodGet, "/v1/status", nil, nil, &s)
	return s, err
}

// Members lists the gossip pool as one coordinator sees it.
func (c *Client) Members(ctx context.Context) ([]Member, error) {
	var m []Member
	_, err := c.do(ctx, http.MethodGet, "/v1/members", nil, nil, &m)
	return m, err
}

// Join asks the agent to join the given gossip addresses.
func (c *Client) Join(ctx context.Context, addrs []string) (int, error) {
	var r JoinResponse
	_, err := c.do(ctx, http.MethodPost, "/v1/join", nil, JoinRequest{Addrs: addrs}, &r)
	return r.Joined, err
}

// Leave makes the agent leave the cluster gracefully and exit.
func (c *Client) Leave(ctx context.Context) error {
	_, err := c.do(ctx, http.MethodPost, "/v1/leave", nil, struct{}{}, nil)
	return err
}

// Peers lists the raft configuration.
func (c *Client) Peers(ctx context.Context) ([]Peer, error) {
	var p []Peer
	_, err := c.do(ctx, http.MethodGet, "/v1/raft/peers", nil, nil, &p)
	return p, err
}

// RemovePeer removes a coordinator from raft. A raft configuration change is
// not an FSM command and has no request ID, so when leadership is lost
// mid-change the retry may find the peer already gone: a peer that was
// present before the call and is "not found" after it counts as removed.
func (c *Client) RemovePeer(ctx context.Context, id string) error {
	peers, err := c.Peers(ctx)
	if err != nil {
		return err
	}
	present := false
	for _, p := range peers {
		present = present || p.ID == id
	}
	_, err = c.do(ctx, http.MethodPost, "/v1/raft/remove-peer", nil, RemovePeerRequest{ID: id}, nil)
	if present && errors.Is(err, fsm.ErrNotFound) {
		return nil
	}
	return err
}

// Hosts lists hosts.
func (c *Client) Hosts(ctx context.Context, o *QueryOptions) ([]fsm.Host, QueryMeta, error) {
	var h []fsm.Host
	m, err := c.do(ctx, http.MethodGet, "/v1/hosts", o.values(), nil, &h)
	return h, m, err
}

// Host returns one host.
func (c *Client) Host(ctx context.Context, id string, o *QueryOptions) (fsm.Host, QueryMeta, error) {
	var h fsm.Host
	m, err := c.do(ctx, http.MethodGet, "/v1/hosts/"+url.PathEscape(id), o.values(), nil, &h)
	return h, m, err
}

// RegisterHost registers a host or updates its capacity.
func (c *Client) RegisterHost(ctx context.Context, id string, r HostRequest) (fsm.Host, error) {
	var h fsm.Host
	_, err := c.do(ctx, http.MethodPut, "/v1/hosts/"+url.PathEscape(id), nil, r, &h)
	return h, err
}

// FailHost marks a host failed (or left).
func (c *Client) FailHost(ctx context.Context, id string, r HostFailRequest) (fsm.Host, error) {
	var h fsm.Host
	_, err := c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(id)+"/fail", nil, r, &h)
	return h, err
}

// VMs lists VMs, all or those on one host.
func (c *Client) VMs(ctx context.Context, host string, o *QueryOptions) ([]fsm.VM, QueryMeta, error) {
	q := o.values()
	if host != "" {
		q.Set("host", host)
	}
	var v []fsm.VM
	m, err := c.do(ctx, http.MethodGet, "/v1/vms", q, nil, &v)
	return v, m, err
}

// VM returns one VM.
func (c *Client) VM(ctx context.Context, id uint64, o *QueryOptions) (fsm.VM, QueryMeta, error) {
	var v fsm.VM
	m, err := c.do(ctx, http.MethodGet, idPath("/v1/vms/%d", id), o.values(), nil, &v)
	return v, m, err
}

// CreateVM records a new parent VM and returns it with its cluster-wide ID.
func (c *Client) CreateVM(ctx context.Context, r VMRequest) (fsm.VM, error) {
	if r.RequestID == "" {
		r.RequestID = NewRequestID()
	}
	var v fsm.VM
	_, err := c.do(ctx, http.MethodPost, "/v1/vms", nil, r, &v)
	return v, err
}

// VMStarted reports that this host launched a pending VM.
func (c *Client) VMStarted(ctx context.Context, id uint64) (fsm.VM, error) {
	var v fsm.VM
	_, err := c.do(ctx, http.MethodPost, idPath("/v1/vms/%d/started", id), nil, struct{}{}, &v)
	return v, err
}

// EndVM records that a VM is gone.
func (c *Client) EndVM(ctx context.Context, id uint64, reason string) (fsm.VM, error) {
	var v fsm.VM
	_, err := c.do(ctx, http.MethodPost, idPath("/v1/vms/%d/end", id), nil, VMEndRequest{Reason: reason}, &v)
	return v, err
}

// SetCloneState reports a clone running or failed, or relays its exit.
func (c *Client) SetCloneState(ctx context.Context, vm uint64, r CloneStateRequest) (fsm.TicketView, error) {
	if r.RequestID == "" {
		r.RequestID = NewRequestID()
	}
	var t fsm.TicketView
	_, err := c.do(ctx, http.MethodPost, idPath("/v1/vms/%d/clone-state", vm), nil, r, &t)
	return t, err
}

// Tickets lists tickets, all or those of one parent VM.
func (c *Client) Tickets(ctx context.Context, parent uint64, o *QueryOptions) ([]fsm.Ticket, QueryMeta, error) {
	q := o.values()
	if parent != 0 {
		q.Set("parent", strconv.FormatUint(parent, 10))
	}
	var t []fsm.Ticket
	m, err := c.do(ctx, http.MethodGet, "/v1/tickets", q, nil, &t)
	return t, m, err
}

// Ticket returns a ticket with its clones.
func (c *Client) Ticket(ctx context.Context, id uint64, o *QueryOptions) (fsm.TicketView, QueryMeta, error) {
	var t fsm.TicketView
	m, err := c.do(ctx, http.MethodGet, idPath("/v1/tickets/%d", id), o.values(), nil, &t)
	return t, m, err
}

// RequestTicket is request_ticket(n): it reserves up to n clones for parent
// and returns the ticket, whose Granted may be less than n.
func (c *Client) RequestTicket(ctx context.Context, parent uint64, n int) (fsm.TicketView, error) {
	var t fsm.TicketView
	_, err := c.do(ctx, http.MethodPost, "/v1/tickets", nil, TicketRequest{RequestID: NewRequestID(), ParentVM: parent, N: n}, &t)
	return t, err
}

// Clone registers the parent's descriptor for a ticket, which starts its
// clones.
func (c *Client) Clone(ctx context.Context, ticket uint64, d DescriptorRequest) (CloneResponse, error) {
	if d.RequestID == "" {
		d.RequestID = NewRequestID()
	}
	var r CloneResponse
	_, err := c.do(ctx, http.MethodPost, idPath("/v1/tickets/%d/clone", ticket), nil, d, &r)
	return r, err
}

// JoinTicket is join(ticket): it waits until every clone has exited or
// failed, then disposes the ticket and returns every clone's outcome.
func (c *Client) JoinTicket(ctx context.Context, ticket, caller uint64) (fsm.TicketView, error) {
	var index uint64
	req := CallerRequest{RequestID: NewRequestID(), Caller: caller}
	for {
		t, meta, err := c.Ticket(ctx, ticket, &QueryOptions{Index: index, Wait: 30 * time.Second})
		if err != nil {
			return t, err
		}
		if t.ParentVM != caller {
			return t, fmt.Errorf("join ticket %d: %w", ticket, fsm.ErrNotParent)
		}
		if t.State.Disposed() || allTerminal(t) {
			var out fsm.TicketView
			_, err := c.do(ctx, http.MethodPost, idPath("/v1/tickets/%d/join", ticket), nil, req, &out)
			if !errors.Is(err, fsm.ErrClonesRunning) {
				return out, err
			}
		}
		index = meta.Index
	}
}

func allTerminal(t fsm.TicketView) bool {
	if t.State == fsm.TicketReserved {
		return true
	}
	for _, cl := range t.Clones {
		if !cl.State.Terminal() {
			return false
		}
	}
	return true
}

// KillTicket is kill(ticket); caller 0 acts as an operator.
func (c *Client) KillTicket(ctx context.Context, ticket, caller uint64, reason string) (fsm.TicketView, error) {
	var t fsm.TicketView
	_, err := c.do(ctx, http.MethodPost, idPath("/v1/tickets/%d/kill", ticket), nil,
		CallerRequest{RequestID: NewRequestID(), Caller: caller, Reason: reason}, &t)
	return t, err
}

// CreateCheckpoint records a checkpoint of a parent VM.
func (c *Client) CreateCheckpoint(ctx context.Context, d DescriptorRequest) (fsm.Checkpoint, error) {
	if d.RequestID == "" {
		d.RequestID = NewRequestID()
	}
	var cp fsm.Checkpoint
	_, err := c.do(ctx, http.MethodPost, "/v1/checkpoints", nil, d, &cp)
	return cp, err
}

// CreateClones is create_clones(checkpoint, ticket).
func (c *Client) CreateClones(ctx context.Context, ticket, checkpoint, caller uint64) (fsm.TicketView, error) {
	var t fsm.TicketView
	_, err := c.do(ctx, http.MethodPost, idPath("/v1/tickets/%d/create-clones", ticket), nil,
		CreateClonesRequest{RequestID: NewRequestID(), Caller: caller, Checkpoint: checkpoint}, &t)
	return t, err
}

// Clones lists clones, all or those on one host; live keeps only pending
// and running ones. Hosts watch their assignments with this.
func (c *Client) Clones(ctx context.Context, host string, live bool, o *QueryOptions) ([]fsm.Clone, QueryMeta, error) {
	q := o.values()
	if host != "" {
		q.Set("host", host)
	}
	if live {
		q.Set("live", "")
	}
	var cl []fsm.Clone
	m, err := c.do(ctx, http.MethodGet, "/v1/clones", q, nil, &cl)
	return cl, m, err
}

// Descriptors lists descriptors.
func (c *Client) Descriptors(ctx context.Context, o *QueryOptions) ([]fsm.Descriptor, QueryMeta, error) {
	var d []fsm.Descriptor
	m, err := c.do(ctx, http.MethodGet, "/v1/descriptors", o.values(), nil, &d)
	return d, m, err
}

// Descriptor returns one descriptor's metadata.
func (c *Client) Descriptor(ctx context.Context, id uint64, o *QueryOptions) (fsm.Descriptor, QueryMeta, error) {
	var d fsm.Descriptor
	m, err := c.do(ctx, http.MethodGet, idPath("/v1/descriptors/%d", id), o.values(), nil, &d)
	return d, m, err
}

// Checkpoint returns one checkpoint.
func (c *Client) Checkpoint(ctx context.Context, id uint64, o *QueryOptions) (fsm.Checkpoint, QueryMeta, error) {
	var cp fsm.Checkpoint
	m, err := c.do(ctx, http.MethodGet, idPath("/v1/checkpoints/%d", id), o.values(), nil, &cp)
	return cp, m, err
}

// Checkpoints lists checkpoints.
func (c *Client) Checkpoints(ctx context.Context, o *QueryOptions) ([]fsm.Checkpoint, QueryMeta, error) {
	var cp []fsm.Checkpoint
	m, err := c.do(ctx, http.MethodGet, "/v1/checkpoints", o.values(), nil, &cp)
	return cp, m, err
}

// Metrics returns the agent's Prometheus metrics text.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	var s string
	_, err := c.do(ctx, http.MethodGet, "/metrics", nil, nil, &s)
	return s, err
}
