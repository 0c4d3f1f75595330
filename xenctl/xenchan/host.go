package xenchan

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// Host-side limits.
const (
	// maxTaken bounds the calls taken from the guest and not answered yet;
	// further requests wait in the guest's area.
	maxTaken = 64
	// maxScan bounds the entries one scan handles per directory; a scan
	// that hit it runs again.
	maxScan = 256
	// maxBad is how many malformed requests in a row make the host hang
	// up (ErrAbuse).
	maxBad = 32
	// maxRescans bounds the scans one event starts.
	maxRescans = 8
	// queued lines waiting for Read.
	readQueue = 64
	// opTimeout bounds one xenstore operation of the host.
	opTimeout = 10 * time.Second
)

// ErrAbuse is returned by Host.Read once the guest has sent too many
// malformed requests in a row.
var ErrAbuse = errors.New("xenchan: guest sent too many malformed requests")

// ErrClosed is returned by calls on a closed channel end.
var ErrClosed = errors.New("xenchan: channel closed")

// Paths are the absolute paths of one domain's channel areas.
type Paths struct {
	Home  string // /local/domain/<domid>
	Host  string // Home + "/" + HostDir
	Guest string // Home + "/" + GuestDir
}

// PathsFor returns the channel paths of domid.
func PathsFor(domid uint32) Paths {
	home := xenstore.DomainPath(domid)
	return Paths{Home: home, Host: home + "/" + HostDir, Guest: home + "/" + GuestDir}
}

// Setup is what Prepare writes for a new domain.
type Setup struct {
	// Identity is written to IdentityNode for the guest to read; nil
	// writes none.
	Identity *guestchan.Identity
	// Greeting answers the calls that were pending in a clone's parent
	// when it was captured: the clone call with the clone's k, the others
	// CodeInterrupted. They are in place before the epoch changes, so the
	// guest finds them when it notices it is a clone.
	Greeting []*guestchan.Response
}

// Prepare lays out the channel of a domain that has not run since its
// xenstore tree was made (created or restored paused): dom0's area,
// readable by the guest only, with setup's identity and greeting; the
// guest's area under data/; and, last, a new epoch, which tells a guest
// that resumed in this domain that its channel is a new one. It returns
// the epoch.
//
// Prepare must not be called for a domain whose guest runs and uses the
// channel: it replaces dom0's area.
func Prepare(ctx context.Context, xs Store, domid uint32, setup Setup) (string, error) {
	p := PathsFor(domid)
	guestOnly := []xenstore.Perm{{Domain: domid, Access: xenstore.AccessNone}}
	readOnly := []xenstore.Perm{{Domain: 0, Access: xenstore.AccessNone}, {Domain: domid, Access: xenstore.AccessRead}}
	steps := []func() error{
		func() error {
			// libxl made the home; without it there is no such domain.
			_, err := xs.Read(ctx, p.Home)
			return err
		},
		func() error { return xs.Rm(ctx, p.Host) },
		func() error { return xs.Mkdir(ctx, p.Host) },
		func() error { return xs.SetPerms(ctx, p.Host, readOnly) },
		func() error { return xs.Mkdir(ctx, p.Host+"/resp") }, // inherits readOnly
		func() error { return xs.Mkdir(ctx, p.Guest) },
		func() error { return xs.SetPerms(ctx, p.Guest, guestOnly) },
		func() error { return xs.Mkdir(ctx, p.Home+"/"+ReqDir) }, // inherit guestOnly
		func() error { return xs.Mkdir(ctx, p.Home+"/"+DoneDir) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return "", fmt.Errorf("xenchan: preparing domain %d: %w", domid, err)
		}
	}
	for _, r := range setup.Greeting {
		line, err := json.Marshal(r)
		if err != nil {
			return "", err
		}
		if r.ID == 0 {
			return "", fmt.Errorf("xenchan: greeting without a call ID")
		}
		if err := writeMessage(ctx, xs, fmt.Sprintf("%s/resp/%d", p.Host, r.ID), line); err != nil {
			return "", fmt.Errorf("xenchan: greeting of domain %d: %w", domid, err)
		}
	}
	if setup.Identity != nil {
		b, err := json.Marshal(setup.Identity)
		if err != nil {
			return "", err
		}
		if err := xs.Write(ctx, p.Home+"/"+IdentityNode, b); err != nil {
			return "", fmt.Errorf("xenchan: identity of domain %d: %w", domid, err)
		}
	}
	var nonce [8]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return "", err
	}
	epoch := hex.EncodeToString(nonce[:])
	if err := xs.Write(ctx, p.Home+"/"+EpochNode, []byte(epoch)); err != nil {
		return "", fmt.Errorf("xenchan: epoch of domain %d: %w", domid, err)
	}
	return epoch, nil
}

// HostOptions configure a Host.
type HostOptions struct {
	Logger hclog.Logger // default: no logging
}

// Host is dom0's end of one domain's channel: an io.ReadWriteCloser that
// reads the guest's requests as lines of guestchan protocol and writes
// the answers, which is what hostd's guest channel serves.
//
// Read returns requests one line at a time, in the order a scan found
// them. Write takes answer lines (each with its call's ID) and stores
// each under the host's resp/<id>. Requests the framing rejects never
// reach Read: the Host answers them itself (CodeBadRequest or
// CodeTooLarge), and after maxBad of them in a row Read fails with
// ErrAbuse. Everything a request is attributed to comes from the domain
// ID the Host was opened for, whose area it watches, never from what the
// guest wrote.
type Host struct {
	st     Store
	domid  uint32
	paths  Paths
	log    hclog.Logger
	events <-chan xenstore.Event
	stopW  func()

	lines chan []byte   // requests for Read
	q     lineQueue     // Read's partial line
	kick  chan struct{} // rescan: an answer made room for more calls

	wmu sync.Mutex
	wb  lineBuffer

	mu    sync.Mutex
	taken map[uint64]bool // calls handed to Read and not answered
	bad   int             // malformed requests in a row
	err   error           // why Read fails

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	done   chan struct{} // closed when run has exited
}

// NewHost starts serving domid's channel (which Prepare laid out). Calls a
// previous Host took and never answered, a host daemon that restarted,
// are answered CodeInternalHost. Close stops the Host; the domain's
// xenstore nodes stay.
func NewHost(ctx context.Context, xs *xenstore.Client, domid uint32, opts HostOptions) (*Host, error) {
	p := PathsFor(domid)
	w, err := xs.Watch(ctx, p.Guest)
	if err != nil {
		return nil, fmt.Errorf("xenchan: watching domain %d: %w", domid, err)
	}
	h := newHost(xs, domid, w.Events(), func() {
		sctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		defer cancel()
		w.Stop(sctx)
	}, opts)
	if err := h.recover(ctx); err != nil {
		h.stopW()
		return nil, err
	}
	go h.run()
	return h, nil
}

func newHost(st Store, domid uint32, events <-chan xenstore.Event, stop func(), opts HostOptions) *Host {
	log := opts.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	h := &Host{
		st:     st,
		domid:  domid,
		paths:  PathsFor(domid),
		log:    log.With("domid", domid),
		events: events,
		stopW:  stop,
		lines:  make(chan []byte, readQueue),
		kick:   make(chan struct{}, 1),
		taken:  map[uint64]bool{},
		done:   make(chan struct{}),
	}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	return h
}

// recover answers the calls that a previous Host took (resp/<id> exists)
// and never answered (no count node).
func (h *Host) recover(ctx context.Context) error {
	ids, err := h.st.Directory(ctx, h.paths.Host+"/resp")
	if errors.Is(err, xenstore.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("xenchan: domain %d: %w", h.domid, err)
	}
	for _, name := range ids {
		id, ok := parseID(name)
		if !ok {
			continue
		}
		if _, err := h.st.Read(ctx, fmt.Sprintf("%s/resp/%d/n", h.paths.Host, id)); !errors.Is(err, xenstore.ErrNotFound) {
			continue
		}
		h.log.Warn("answering a call the previous host left unanswered", "call", id)
		h.answer(ctx, guestchan.Fail(id, guestchan.CodeInternalHost,
			"the host daemon restarted while the call was in flight; its outcome is unknown"))
	}
	return nil
}

// run scans the guest's area on every event until Close.
func (h *Host) run() {
	defer close(h.done)
	for {
		select {
		case <-h.ctx.Done():
			return
		case <-h.kick:
		case ev, ok := <-h.events:
			if !ok {
				// The xenstore connection is gone: so is the channel.
				h.setErr(fmt.Errorf("%w: the watch on domain %d ended", ErrClosed, h.domid))
				h.cancel()
				return
			}
			if !ev.Overflow && ev.Path != h.paths.Guest && !strings.HasPrefix(ev.Path, h.paths.Guest+"/") {
				// Not this domain's area: a watch of this Host never
				// sees one, but attribution rests on the path.
				h.log.Warn("ignoring an event outside the domain's area", "path", ev.Path)
				continue
			}
		}
		// A scan cut short by maxScan goes on, a few times: entries that
		// must wait (maxTaken) would otherwise keep it spinning.
		for i, more := 0, true; more && i < maxRescans && h.ctx.Err() == nil; i++ {
			var err error
			if more, err = h.scan(h.ctx); err != nil {
				if h.ctx.Err() == nil {
					h.log.Warn("scan failed", "error", err)
				}
				break
			}
		}
	}
}

// scan takes complete requests and handles the guest's acknowledgements.
// more says a limit cut it short.
func (h *Host) scan(ctx context.Context) (more bool, err error) {
	reqs, err := h.st.Directory(ctx, h.paths.Home+"/"+ReqDir)
	if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
		return false, err
	}
	if len(reqs) > maxScan {
		reqs, more = reqs[:maxScan], true
	}
	for _, name := range reqs {
		if err := h.take(ctx, name); err != nil {
			return false, err
		}
	}
	done, err := h.st.Directory(ctx, h.paths.Home+"/"+DoneDir)
	if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
		return false, err
	}
	if len(done) > maxScan {
		done, more = done[:maxScan], true
	}
	for _, name := range done {
		if id, ok := parseID(name); ok {
			if err := h.st.Rm(ctx, fmt.Sprintf("%s/resp/%d", h.paths.Host, id)); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
				return false, err
			}
		}
		if err := h.st.Rm(ctx, h.paths.Home+"/"+DoneDir+"/"+name); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
			return false, err
		}
	}
	return more, nil
}

// take handles one entry of the guest's request directory.
func (h *Host) take(ctx context.Context, name string) error {
	dir := h.paths.Home + "/" + ReqDir + "/" + name
	id, ok := parseID(name)
	if !ok {
		h.malformed(fmt.Sprintf("request node %q", name))
		return ignoreMissing(h.st.Rm(ctx, dir))
	}
	h.mu.Lock()
	busy, full := h.taken[id], len(h.taken) >= maxTaken
	h.mu.Unlock()
	if busy || full {
		return nil // answered first, or waits for room
	}
	line, complete, err := readMessage(ctx, h.st, dir)
	if !complete && err == nil {
		return nil // the guest is still writing it
	}
	if err != nil && !errors.Is(err, ErrBadFrame) {
		return err
	}
	if err == nil {
		var lid uint64
		if lid, err = lineID(line); err == nil && lid != id {
			err = fmt.Errorf("%w: request node %d holds call %d", guestchan.ErrBadMessage, id, lid)
		}
	}
	// The request leaves the guest's area whatever it was; an empty
	// resp/<id> marks it taken until the answer's count node says done.
	// resp/<id> is made before req/<id> goes, so that a guest looking
	// for its call in a new domain (Guest.lostCalls) finds one or the
	// other.
	if err != nil {
		h.malformed(err.Error())
		code := guestchan.CodeBadRequest
		if errors.Is(err, ErrBadFrame) {
			code = guestchan.CodeTooLarge
		}
		h.answer(ctx, guestchan.Fail(id, code, "%v", err))
		return ignoreMissing(h.st.Rm(ctx, dir))
	}
	resp := fmt.Sprintf("%s/resp/%d", h.paths.Host, id)
	if err := ignoreMissing(h.st.Rm(ctx, resp)); err != nil {
		return err
	}
	if err := h.st.Write(ctx, resp, nil); err != nil {
		return err
	}
	if err := ignoreMissing(h.st.Rm(ctx, dir)); err != nil {
		return err
	}
	h.mu.Lock()
	h.taken[id] = true
	h.bad = 0
	h.mu.Unlock()
	select {
	case h.lines <- line:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// malformed counts a bad request; past maxBad in a row the channel fails.
func (h *Host) malformed(what string) {
	h.log.Debug("malformed request", "what", what)
	h.mu.Lock()
	h.bad++
	over := h.bad > maxBad
	h.mu.Unlock()
	if over {
		h.setErr(ErrAbuse)
		h.cancel()
	}
}

func (h *Host) setErr(err error) {
	h.mu.Lock()
	if h.err == nil {
		h.err = err
	}
	h.mu.Unlock()
}

// answer stores a response the Host makes itself.
func (h *Host) answer(ctx context.Context, r *guestchan.Response) {
	line, err := json.Marshal(r)
	if err == nil {
		err = h.store(ctx, r.ID, line)
	}
	if err != nil {
		h.log.Warn("could not answer", "call", r.ID, "error", err)
	}
}

// store writes an answer line under resp/<id>.
func (h *Host) store(ctx context.Context, id uint64, line []byte) error {
	err := writeMessage(ctx, h.st, fmt.Sprintf("%s/resp/%d", h.paths.Host, id), line)
	h.mu.Lock()
	wasFull := len(h.taken) >= maxTaken
	delete(h.taken, id)
	h.mu.Unlock()
	if wasFull {
		select {
		case h.kick <- struct{}{}:
		default:
		}
	}
	return err
}

// Read returns request lines, newline-terminated.
func (h *Host) Read(p []byte) (int, error) {
	if h.q.rest != nil {
		return h.q.fill(p, nil), nil
	}
	select {
	case line := <-h.lines:
		return h.q.fill(p, line), nil
	case <-h.ctx.Done():
	}
	select {
	case line := <-h.lines: // taken before the end: still delivered
		return h.q.fill(p, line), nil
	default:
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err != nil {
		return 0, h.err
	}
	return 0, io.EOF
}

// Write takes answer lines; each is stored under its call's resp/<id>.
// A line without a usable ID is an error and is dropped.
func (h *Host) Write(p []byte) (int, error) {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	if h.ctx.Err() != nil {
		return 0, ErrClosed
	}
	lines, err := h.wb.add(p)
	for _, line := range lines {
		id, lerr := lineID(line)
		if lerr == nil && id == 0 {
			lerr = fmt.Errorf("%w: answer without a call ID", guestchan.ErrBadMessage)
		}
		if lerr == nil {
			ctx, cancel := context.WithTimeout(h.ctx, opTimeout)
			lerr = h.store(ctx, id, line)
			cancel()
		}
		if lerr != nil && err == nil {
			err = fmt.Errorf("xenchan: answer to domain %d: %w", h.domid, lerr)
		}
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close stops the Host: Read returns io.EOF (or why it failed). The
// domain's nodes stay, for a later Host.
func (h *Host) Close() error {
	h.cancel()
	h.stopW()
	<-h.done
	return nil
}

func ignoreMissing(err error) error {
	if errors.Is(err, xenstore.ErrNotFound) {
		return nil
	}
	return err
}
