// Package gossip is the cluster's membership layer: one hashicorp/memberlist
// pool that every coordinator and every host joins.
//
// Each node gossips its Meta (role, API and raft addresses, capacity). The
// agent keeps a table of every node it has seen, including the ones that
// failed or left, and signals changes on Changed() so that the coordinator
// leader can reconcile raft membership and host liveness from it. Failure
// detection is tuned for a LAN or a single machine: a crashed node is
// declared dead in about a second. With a key, all gossip is encrypted and
// authenticated (AES-GCM); nodes without the key cannot join or listen.
package gossip

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

// Role is what a node is in the cluster.
type Role string

// Roles.
const (
	RoleCoordinator Role = "coordinator"
	RoleHost        Role = "host"
)

// Meta is what a node tells the pool about itself. It travels in every
// gossip message about the node, so it stays small (at most 512 bytes).
type Meta struct {
	Role Role   `json:"role"`
	API  string `json:"api,omitempty"` // HTTP API address
	// Mcast is a host's IPv4 address on its multicast interface, if any.
	Mcast string `json:"mcast,omitempty"`
	Raft  string `json:"raft,omitempty"` // raft transport address (coordinators)
	// Expect is the --bootstrap-expect value of a coordinator, 0 if none.
	Expect int   `json:"expect,omitempty"`
	Slots  int   `json:"slots,omitempty"` // clone slots offered (hosts)
	MemMB  int64 `json:"mem_mb,omitempty"`
	// Leaving is set by Leave just before the goodbye, so that the pool can
	// tell a departure from a failure (memberlist's leave callback does not
	// say which it was).
	Leaving bool `json:"leaving,omitempty"`
}

// Status of a member.
type Status string

// Member statuses.
const (
	StatusAlive   Status = "alive"
	StatusSuspect Status = "suspect"
	StatusFailed  Status = "failed"
	StatusLeft    Status = "left"
)

// Member is one node as this agent sees it.
type Member struct {
	Name   string    `json:"name"`
	Addr   string    `json:"addr"` // gossip address, ip:port
	Status Status    `json:"status"`
	Meta   Meta      `json:"meta"`
	Since  time.Time `json:"since"` // when Status last changed
}

// Config configures an Agent.
type Config struct {
	Name string // unique node name; also the node ID
	// BindAddr is where gossip listens (ip:port; port 0 picks one).
	BindAddr string
	// AdvertiseAddr is what other nodes dial (ip:port). Empty means BindAddr,
	// which must then be a specific IP.
	AdvertiseAddr string
	Key           []byte // 16, 24 or 32 bytes to encrypt gossip; nil for none
	Meta          Meta
	Logger        hclog.Logger
	// Profile sets the failure detector's timing: ProfileFast (default:
	// a silent node is declared dead in about a second), ProfileLAN
	// (memberlist's LAN defaults, a few seconds) or ProfileWAN (its WAN
	// defaults) for slow or loaded networks, such as nested hypervisors.
	Profile string
}

// Gossip timing profiles.
const (
	ProfileFast = "fast"
	ProfileLAN  = "lan"
	ProfileWAN  = "wan"
)

// ErrBadConfig reports an unusable configuration.
var ErrBadConfig = errors.New("gossip: bad config")

// Agent is this process's membership in the pool.
type Agent struct {
	ml      *memberlist.Memberlist
	name    string // fixed at creation: memberlist's LocalNode() is mutated
	addr    string // under its lock by UpdateNode, so read neither from it
	log     hclog.Logger
	changed chan struct{}

	mu      sync.Mutex
	meta    []byte
	members map[string]*Member
}

// New starts an agent. It does not join anyone yet: call Join.
func New(cfg Config) (*Agent, error) {
	if cfg.Name == "" {
		return nil, fmt.Errorf("%w: empty node name", ErrBadConfig)
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	bindIP, bindPort, err := splitHostPort(cfg.BindAddr)
	if err != nil {
		return nil, fmt.Errorf("%w: bind address: %v", ErrBadConfig, err)
	}
	adv := cfg.AdvertiseAddr
	if adv == "" {
		if net.ParseIP(bindIP).IsUnspecified() {
			return nil, fmt.Errorf("%w: bind address %s is unspecified; give an advertise address", ErrBadConfig, cfg.BindAddr)
		}
	}
	a := &Agent{log: log, changed: make(chan struct{}, 1), members: map[string]*Member{}}
	if a.meta, err = encodeMeta(cfg.Meta); err != nil {
		return nil, err
	}

	var c *memberlist.Config
	switch cfg.Profile {
	case "", ProfileFast, ProfileLAN:
		c = memberlist.DefaultLANConfig()
	case ProfileWAN:
		c = memberlist.DefaultWANConfig()
	default:
		return nil, fmt.Errorf("%w: profile %q, want fast, lan or wan", ErrBadConfig, cfg.Profile)
	}
	c.Name = cfg.Name
	c.BindAddr, c.BindPort = bindIP, bindPort
	if adv != "" {
		ip, port, err := splitHostPort(adv)
		if err != nil {
			return nil, fmt.Errorf("%w: advertise address: %v", ErrBadConfig, err)
		}
		if net.ParseIP(ip).IsUnspecified() {
			return nil, fmt.Errorf("%w: advertise address %s is unspecified", ErrBadConfig, adv)
		}
		c.AdvertiseAddr, c.AdvertisePort = ip, port
		if port == 0 {
			c.AdvertisePort = bindPort
		}
	}
	if cfg.Key != nil {
		if n := len(cfg.Key); n != 16 && n != 24 && n != 32 {
			return nil, fmt.Errorf("%w: key is %d bytes, want 16, 24 or 32", ErrBadConfig, n)
		}
		c.SecretKey = cfg.Key
	}
	if cfg.Profile == "" || cfg.Profile == ProfileFast {
		// Fast failure detection: a silent node is probed within a few
		// hundred milliseconds and declared dead about half a second after
		// suspicion.
		c.ProbeInterval = 250 * time.Millisecond
		c.ProbeTimeout = 200 * time.Millisecond
		c.SuspicionMult = 2
		c.SuspicionMaxTimeoutMult = 3
	}
	c.GossipInterval = 100 * time.Millisecond
	c.GossipToTheDeadTime = 5 * time.Second
	c.PushPullInterval = 10 * time.Second
	c.DeadNodeReclaimTime = 5 * time.Second // a restarted node may come back at once
	c.Delegate = (*delegate)(a)
	c.Events = (*events)(a)
	c.Conflict = (*events)(a)
	c.Logger = log.Named("memberlist").StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})

	ml, err := memberlist.Create(c)
	if err != nil {
		return nil, fmt.Errorf("gossip: start: %w", err)
	}
	a.ml = ml
	local := ml.LocalNode()
	a.name, a.addr = local.Name, local.Address()
	return a, nil
}

func splitHostPort(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	if net.ParseIP(host) == nil {
		return "", 0, fmt.Errorf("%q is not an IP address", host)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return "", 0, fmt.Errorf("bad port %q", port)
	}
	return host, p, nil
}

func encodeMeta(m Meta) ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(b) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("%w: metadata is %d bytes, at most %d", ErrBadConfig, len(b), memberlist.MetaMaxSize)
	}
	return b, nil
}

// DecodeMeta parses gossiped metadata. It is untrusted input.
func DecodeMeta(b []byte) (Meta, error) {
	var m Meta
	if len(b) > memberlist.MetaMaxSize {
		return m, fmt.Errorf("gossip: metadata too large")
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("gossip: metadata: %w", err)
	}
	if m.Role != RoleCoordinator && m.Role != RoleHost {
		return m, fmt.Errorf("gossip: metadata: unknown role %q", m.Role)
	}
	return m, nil
}

// Name is this node's name.
func (a *Agent) Name() string { return a.name }

// Addr is the address other nodes gossip with, ip:port.
func (a *Agent) Addr() string { return a.addr }

// Join contacts the given gossip addresses and returns how many answered. It
// succeeds if any did.
func (a *Agent) Join(addrs []string) (int, error) {
	n, err := a.ml.Join(addrs)
	if n > 0 {
		return n, nil
	}
	return 0, fmt.Errorf("gossip: join %v: %w", addrs, err)
}

// SetMeta replaces this node's metadata and gossips it.
func (a *Agent) SetMeta(m Meta) error {
	b, err := encodeMeta(m)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.meta = b
	a.mu.Unlock()
	return a.ml.UpdateNode(5 * time.Second)
}

// Members returns every node this agent has seen, sorted by name, including
// failed and departed ones.
func (a *Agent) Members() []Member {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Member, 0, len(a.members))
	for _, m := range a.members {
		out = append(out, *m)
	}
	slices.SortFunc(out, func(x, y Member) int { return strings.Compare(x.Name, y.Name) })
	return out
}

// Member returns one node.
func (a *Agent) Member(name string) (Member, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.members[name]
	if !ok {
		return Member{}, false
	}
	return *m, true
}

// Forget drops a failed or departed node from the table.
func (a *Agent) Forget(name string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if m, ok := a.members[name]; ok && (m.Status == StatusFailed || m.Status == StatusLeft) {
		delete(a.members, name)
	}
}

// Changed is signalled (coalesced) whenever the member table changes.
func (a *Agent) Changed() <-chan struct{} { return a.changed }

// Leave tells the pool that this node departs, waiting up to timeout for the
// message to spread. The agent still runs until Shutdown.
func (a *Agent) Leave(timeout time.Duration) error {
	a.mu.Lock()
	m, err := DecodeMeta(a.meta)
	a.mu.Unlock()
	if err == nil {
		m.Leaving = true
		if err := a.SetMeta(m); err != nil {
			a.log.Warn("could not announce the leave in metadata", "error", err)
		}
	}
	return a.ml.Leave(timeout)
}

// Shutdown stops gossip without a goodbye (others will see this node fail
// unless Leave was called first).
func (a *Agent) Shutdown() error { return a.ml.Shutdown() }

// GenerateKey returns a new random 32-byte gossip key, base64 encoded.
func GenerateKey() (string, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(k), nil
}

// DecodeKey parses a base64 gossip key of 16, 24 or 32 bytes.
func DecodeKey(s string) ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("gossip key: not base64: %w", err)
	}
	if n := len(k); n != 16 && n != 24 && n != 32 {
		return nil, fmt.Errorf("gossip key: %d bytes, want 16, 24 or 32 (use 'sfcoord keygen')", n)
	}
	return k, nil
}

func (a *Agent) signal() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// record updates the member table from a memberlist node.
func (a *Agent) record(n *memberlist.Node, status Status) {
	meta, err := DecodeMeta(n.Meta)
	if err != nil {
		a.log.Warn("ignoring node with bad metadata", "node", n.Name, "addr", n.Address(), "error", err)
		return
	}
	a.mu.Lock()
	m, ok := a.members[n.Name]
	if !ok {
		m = &Member{Name: n.Name}
		a.members[n.Name] = m
	}
	if m.Status != status {
		m.Since = time.Now()
	}
	m.Addr, m.Status, m.Meta = n.Address(), status, meta
	a.mu.Unlock()
	a.signal()
}

// delegate answers memberlist's questions about the local node.
type delegate Agent

func (d *delegate) NodeMeta(limit int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.meta)
}
func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

// events receives memberlist's membership events. Callbacks must not block.
type events Agent

func (e *events) NotifyJoin(n *memberlist.Node)   { (*Agent)(e).record(n, StatusAlive) }
func (e *events) NotifyUpdate(n *memberlist.Node) { (*Agent)(e).record(n, StatusAlive) }
func (e *events) NotifyLeave(n *memberlist.Node) {
	status := StatusFailed
	if m, err := DecodeMeta(n.Meta); n.State == memberlist.StateLeft || (err == nil && m.Leaving) {
		status = StatusLeft
	}
	(*Agent)(e).record(n, status)
}
func (e *events) NotifyConflict(existing, other *memberlist.Node) {
	e.log.Error("node name conflict: two nodes claim one name", "name", existing.Name,
		"existing", existing.Address(), "other", other.Address())
}
