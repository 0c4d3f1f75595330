package hostd

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
	"github.com/snowflock-go/snowflock/gossip"
	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/lazyram"
	"github.com/snowflock-go/snowflock/memserver"
)

// Hypervisor runs VMs on this host. The daemon calls it from its own
// goroutines; implementations must be safe for concurrent use.
type Hypervisor interface {
	// Name says which driver and acceleration run the VMs ("qemu/tcg").
	Name() string
	// Start boots a VM and returns once it runs.
	Start(ctx context.Context, spec VMSpec) (RunningVM, error)
	// Reap removes what a crashed daemon left behind (processes, files).
	Reap() error
}

// VMSpec is what the daemon asks a hypervisor to boot.
type VMSpec struct {
	ID             string // unique on this host
	Kernel, Initrd string
	Append         string // kernel command line
	MemMB          int64
	VCPUs          int
}

// RunningVM is one VM the hypervisor runs.
type RunningVM interface {
	// GuestChannel connects to the VM's guest API channel.
	GuestChannel(ctx context.Context) (io.ReadWriteCloser, error)
	// ConsolePath is the file the VM's console is written to.
	ConsolePath() string
	// Done is closed when the VM has stopped, for whatever reason.
	Done() <-chan struct{}
	// Destroy stops the VM and releases its resources.
	Destroy(ctx context.Context) error
}

// Config configures a host daemon.
type Config struct {
	NodeID          string
	DataDir         string
	GossipAddr      string // bind ip:port
	GossipAdvertise string
	APIAddr         string // bind ip:port of the host API (console logs, status, metrics)
	Join            []string
	Coordinators    []string // coordinator API addresses
	Token           string
	GossipKey       []byte
	GossipProfile   string // gossip.Config.Profile
	Slots           int    // clone slots offered
	MemMB           int64  // memory offered to VMs
	// Kernel and Initrd are this host's default guest image.
	Kernel, Initrd string
	// MemserverAddr is the ip:port the memserver listens on to serve the
	// frozen memory of this host's parents to clone hosts ("" serves none:
	// VMs here cannot clone). Port 0 picks one.
	MemserverAddr string
	// PageCacheDir holds the pages clones here fetched (a tmpfs is best);
	// default DataDir/pagecache.
	PageCacheDir string
	// Readahead and FetchTimeout tune memory on demand (lazyram's
	// defaults when zero).
	Readahead    int
	FetchTimeout time.Duration
	// EagerRestore fetches all of a descriptor's memory before its first
	// clone here starts, instead of on demand (a baseline for benchmarks,
	// and for hypervisors that cannot fault memory in lazily).
	EagerRestore bool
	// McastAddr, if set, is this host's IPv4 address on the interface it
	// multicasts on: the descriptors and memory of its parents' clones go
	// to the clones' hosts by multicast there, and it joins the sessions
	// of its own clones. Multicast never follows the default route.
	McastAddr netip.Addr
	// McastPort is the UDP port of every session (DefaultMcastPort); it
	// must be the same on every host.
	McastPort uint16
	// McastMTU is the path MTU of the multicast interface (1500).
	McastMTU int
	// McastRate caps the bytes per second of a session's memory pushes
	// (DefaultMcastRate; negative: no cap).
	McastRate int64
	// McastWait is how long a clone host waits for a descriptor by
	// multicast before it fetches it by unicast (DefaultMcastWait).
	McastWait time.Duration
	// pushStall overrides the const of that name (tests).
	pushStall time.Duration
	// OnEvent, if set, is called with clone life-cycle events, from the
	// daemon's goroutines; it must not block.
	OnEvent func(Event)
	Logger  hclog.Logger
}

// Event is a step of cloning on this host, for measurements.
type Event struct {
	Kind       string // Event* below
	Time       time.Time
	VM         uint64
	Ticket     uint64
	K          int
	Descriptor uint64
	// For EventCaptured: the guest's pause and the descriptor.
	Pause           time.Duration
	DescriptorBytes int
	DataPages       uint64
	// For EventSourceClosed: what the descriptor's RAM file fetched.
	Pages *lazyram.Stats
	Err   string
	// For EventCloneRunning: how the descriptor came, unicast or multicast.
	Via string
}

// Event kinds.
const (
	EventCloneCall    = "clone_call"    // the parent's host received clone
	EventCaptured     = "captured"      // the parent was captured and resumed
	EventCloneRunning = "clone_running" // a clone runs on this host
	EventCloneFailed  = "clone_failed"  // a clone could not start here
	EventSourceClosed = "source_closed" // the last clone of a descriptor here is gone
)

func (d *Daemon) emit(e Event) {
	if d.cfg.OnEvent != nil {
		if e.Time.IsZero() {
			e.Time = time.Now()
		}
		d.cfg.OnEvent(e)
	}
}

// Daemon is a running sfhostd.
type Daemon struct {
	cfg    Config
	log    hclog.Logger
	hv     Hypervisor
	coord  *api.Client
	gossip *gossip.Agent
	ln     net.Listener
	http   *http.Server

	ms     *memserver.Server // nil without Config.MemserverAddr
	httpc  *http.Client      // to other hosts' APIs
	lazyMu sync.Mutex
	lazy   *lazyram.FS // mounted with the first clone

	mu       sync.Mutex
	vms      map[uint64]*localVM
	starting map[uint64]bool   // clones being restored
	consoles map[uint64]string // console logs of every VM this run started, kept after it ends
	snaps    map[string]*localSnap
	sources  map[uint64]*source
	catchers map[uint64]*catcher // multicast sessions of tickets with clones here

	mcast mcastStats

	stop       chan struct{}
	stopCtx    context.Context // cancelled with stop
	cancelStop context.CancelFunc
	stopOnce   sync.Once
	wg         sync.WaitGroup
}

// localVM is a VM this daemon runs.
type localVM struct {
	id       uint64
	spec     VMSpec
	run      RunningVM
	src      *source // a clone's descriptor
	cat      *catcher
	channel  *GuestChannel
	cancel   context.CancelFunc
	started  time.Time
	bootMS   int64 // until the guest reported ready; 0 before
	stopping bool  // destroyed on purpose: not a failure
}

// New starts a host daemon: it reaps leftovers, joins the gossip pool as a
// host (the coordinator leader then registers it), serves its API and starts
// the VMs the cluster assigns to it.
func New(cfg Config, hv Hypervisor) (*Daemon, error) {
	if cfg.NodeID == "" || cfg.DataDir == "" {
		return nil, errors.New("hostd: node id and data dir are required")
	}
	if err := fsm.ValidateID(cfg.NodeID); err != nil {
		return nil, fmt.Errorf("hostd: node id: %w", err)
	}
	if len(cfg.Coordinators) == 0 {
		return nil, errors.New("hostd: at least one coordinator address is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if err := cfg.mcastDefaults(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("hostd: data dir: %w", err)
	}
	if err := hv.Reap(); err != nil {
		cfg.Logger.Warn("reaping leftovers of an earlier run", "error", err)
	}
	removeStalePages(cfg.pageCacheDir(), false)
	coord, err := api.NewClient(api.Config{Addrs: cfg.Coordinators, Token: cfg.Token})
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, hv: hv, coord: coord, vms: map[uint64]*localVM{},
		starting: map[uint64]bool{}, consoles: map[uint64]string{}, snaps: map[string]*localSnap{},
		sources: map[uint64]*source{}, catchers: map[uint64]*catcher{}, stop: make(chan struct{}),
		httpc: &http.Client{Timeout: time.Minute}}
	d.stopCtx, d.cancelStop = context.WithCancel(context.Background())
	if d.ln, err = net.Listen("tcp", cfg.APIAddr); err != nil {
		return nil, fmt.Errorf("hostd: api listen: %w", err)
	}
	if ip := d.ln.Addr().(*net.TCPAddr).IP; ip.IsUnspecified() {
		d.ln.Close()
		return nil, fmt.Errorf("hostd: api address %s is unspecified; bind a reachable address", cfg.APIAddr)
	}
	if cfg.MemserverAddr != "" {
		if d.ms, err = memserver.New(memserver.Config{Listen: cfg.MemserverAddr, Logger: d.log.Named("memserver"),
			OnServe: d.onServe}); err != nil {
			d.ln.Close()
			return nil, fmt.Errorf("hostd: %w", err)
		}
		if ip := d.ms.Addr().(*net.TCPAddr).IP; ip.IsUnspecified() {
			d.ln.Close()
			d.ms.Close()
			return nil, fmt.Errorf("hostd: memserver address %s is unspecified; bind a reachable address", cfg.MemserverAddr)
		}
	}
	d.gossip, err = gossip.New(gossip.Config{Name: cfg.NodeID, BindAddr: cfg.GossipAddr, AdvertiseAddr: cfg.GossipAdvertise,
		Key: cfg.GossipKey, Logger: d.log.Named("gossip"), Profile: cfg.GossipProfile,
		Meta: gossip.Meta{Role: gossip.RoleHost, API: d.APIAddr(), Mcast: mcastMeta(cfg.McastAddr), Slots: cfg.Slots, MemMB: cfg.MemMB}})
	if err != nil {
		d.ln.Close()
		if d.ms != nil {
			d.ms.Close()
		}
		return nil, err
	}
	if d.ms != nil {
		d.goRun(func() {
			if err := d.ms.Serve(d.stopCtx); err != nil && !errors.Is(err, memserver.ErrServerClosed) && d.stopCtx.Err() == nil {
				d.log.Error("memserver stopped", "error", err)
			}
		})
	}
	d.http = &http.Server{Handler: d.routes(), ReadHeaderTimeout: 10 * time.Second}
	d.goRun(func() {
		if err := d.http.Serve(d.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("host api stopped", "error", err)
		}
	})
	d.goRun(d.joinLoop)
	d.goRun(d.watchLoop)
	d.log.Info("host daemon started", "node", cfg.NodeID, "api", d.APIAddr(), "gossip", d.gossip.Addr(), "hypervisor", hv.Name())
	return d, nil
}

func (d *Daemon) goRun(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

// APIAddr is the host API address.
func (d *Daemon) APIAddr() string { return d.ln.Addr().String() }

// MemserverAddr is the address clone hosts fetch this host's frozen
// memory from ("" if it serves none).
func (d *Daemon) MemserverAddr() string {
	if d.ms == nil {
		return ""
	}
	return d.ms.Addr().String()
}

// GossipAddr is the host's gossip address.
func (d *Daemon) GossipAddr() string { return d.gossip.Addr() }

func (d *Daemon) joinLoop() {
	if len(d.cfg.Join) == 0 {
		return
	}
	for {
		if n, err := d.gossip.Join(d.cfg.Join); err == nil {
			d.log.Info("joined gossip pool", "contacted", n)
			return
		} else {
			d.log.Warn("join failed; retrying", "error", err)
		}
		select {
		case <-d.stop:
			return
		case <-time.After(time.Second):
		}
	}
}

// watchLoop follows the VMs the cluster assigns to this host with a
// blocking query and makes the local VMs match.
func (d *Daemon) watchLoop() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-d.stop
		cancel()
	}()
	var index uint64
	for ctx.Err() == nil {
		vms, meta, err := d.coord.VMs(ctx, d.cfg.NodeID, &api.QueryOptions{Index: index, Wait: 30 * time.Second})
		if err != nil {
			if ctx.Err() == nil {
				d.log.Warn("watching assignments", "error", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			continue
		}
		index = meta.Index
		for _, vm := range vms {
			d.reconcile(ctx, vm)
		}
	}
}

func (d *Daemon) reconcile(ctx context.Context, vm fsm.VM) {
	d.mu.Lock()
	local := d.vms[vm.ID]
	restore := vm.Role == fsm.RoleClone && vm.State == fsm.VMPending && local == nil && !d.starting[vm.ID]
	if restore {
		d.starting[vm.ID] = true
	}
	d.mu.Unlock()
	switch {
	case restore:
		d.goRun(func() { d.restoreClone(vm) })
	case vm.Role == fsm.RoleParent && vm.State == fsm.VMPending && local == nil:
		d.launch(ctx, vm)
	case vm.State == fsm.VMEnded && local != nil:
		why := "ended in the cluster"
		if vm.Reason != "" {
			why += ": " + vm.Reason
		}
		d.destroy(vm.ID, why)
	}
}

// launch boots a pending parent VM and serves its channel.
func (d *Daemon) launch(ctx context.Context, vm fsm.VM) {
	spec := VMSpec{ID: vmName(vm.ID), Kernel: vm.Kernel, Initrd: vm.Initrd, MemMB: vm.MemMB, VCPUs: vm.VCPUs,
		Append: "console=ttyS0 quiet panic=-1"}
	if spec.Kernel == "" {
		spec.Kernel, spec.Initrd = d.cfg.Kernel, d.cfg.Initrd
	}
	if vm.Cmd != "" {
		spec.Append += " sf.cmd=" + base64.RawURLEncoding.EncodeToString([]byte(vm.Cmd))
	}
	if spec.MemMB == 0 {
		spec.MemMB = 512
	}
	if spec.VCPUs == 0 {
		spec.VCPUs = 1
	}
	log := d.log.With("vm", vm.ID)
	start := time.Now()
	run, err := d.hv.Start(ctx, spec)
	if err != nil {
		log.Error("VM did not start", "error", err)
		d.endVM(vm.ID, fmt.Sprintf("host %s could not start it: %v", d.cfg.NodeID, err))
		return
	}
	d.adopt(vm.ID, run, spec, start, nil, nil, nil, log)
	if _, err := d.coord.VMStarted(ctx, vm.ID); err != nil {
		log.Warn("could not report the VM started", "error", err)
	}
	log.Info("VM started", "hypervisor", d.hv.Name(), "mem_mb", spec.MemMB)
}

// vmName is the hypervisor's name of a VM on this host.
func vmName(id uint64) string { return "vm-" + strconv.FormatUint(id, 10) }

// adopt makes a started VM one of this daemon's: it serves its guest
// channel (first sending greet, the answers a clone owes its guest) and
// reports its end.
func (d *Daemon) adopt(id uint64, run RunningVM, spec VMSpec, start time.Time, src *source, cat *catcher,
	greet []*guestchan.Response, log hclog.Logger) *localVM {
	cctx, cancel := context.WithCancel(context.Background())
	lv := &localVM{id: id, spec: spec, run: run, src: src, cat: cat, cancel: cancel, started: start}
	lv.channel = &GuestChannel{VMID: id, Host: d.cfg.NodeID, Coord: d.coord, Capturer: d, Greeting: greet, Log: log,
		OnCreateClones: d.clonesCreated,
		OnReady: func() {
			d.mu.Lock()
			if lv.bootMS == 0 {
				lv.bootMS = time.Since(start).Milliseconds()
			}
			ms := lv.bootMS
			d.mu.Unlock()
			log.Info("guest ready", "boot_ms", ms)
		}}
	if p, ok := run.(Pauser); ok && src != nil {
		lv.channel.Pauser = p
	}
	d.mu.Lock()
	d.vms[id] = lv
	d.consoles[id] = run.ConsolePath()
	d.mu.Unlock()
	d.goRun(func() { d.serveChannel(cctx, lv, log) })
	d.goRun(func() { d.await(lv, log) })
	return lv
}

func (d *Daemon) serveChannel(ctx context.Context, lv *localVM, log hclog.Logger) {
	conn, err := lv.run.GuestChannel(ctx)
	if err != nil {
		log.Error("guest channel", "error", err)
		return
	}
	if err := lv.channel.Serve(ctx, conn); err != nil {
		log.Warn("guest channel closed", "error", err)
	}
}

// await reports the VM's end when it stops by itself.
func (d *Daemon) await(lv *localVM, log hclog.Logger) {
	select {
	case <-lv.run.Done():
	case <-d.stop:
		return
	}
	d.mu.Lock()
	stopping := lv.stopping
	delete(d.vms, lv.id)
	d.mu.Unlock()
	lv.cancel()
	_ = lv.run.Destroy(context.Background()) // release files
	var fetchErr error
	if lv.src != nil {
		fetchErr = lv.src.failure()
		d.put(lv.src)
	}
	d.leaveSession(lv.cat)
	switch {
	case stopping:
	case fetchErr != nil:
		log.Error("clone died: its memory could not be fetched", "error", fetchErr)
		d.endVM(lv.id, "its memory could not be fetched from the parent's memserver: "+fetchErr.Error())
	default:
		log.Info("VM stopped by itself")
		d.endVM(lv.id, "the guest powered off")
	}
}

func (d *Daemon) destroy(id uint64, why string) {
	d.mu.Lock()
	lv := d.vms[id]
	if lv != nil {
		lv.stopping = true
	}
	d.mu.Unlock()
	if lv == nil {
		return
	}
	d.log.Info("destroying VM", "vm", id, "why", why)
	lv.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := lv.run.Destroy(ctx); err != nil {
		d.log.Warn("destroy", "vm", id, "error", err)
	}
}

func (d *Daemon) endVM(id uint64, reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := d.coord.EndVM(ctx, id, reason); err != nil {
		d.log.Warn("could not report the VM ended", "vm", id, "error", err)
	}
}

// Shutdown destroys this host's VMs, reports them ended, leaves the gossip
// pool and stops.
func (d *Daemon) Shutdown(ctx context.Context) error {
	d.stopOnce.Do(func() {
		close(d.stop)
		d.cancelStop()
		d.destroyAll()
		_ = d.gossip.Leave(2 * time.Second)
		_ = d.gossip.Shutdown()
		_ = d.http.Shutdown(ctx)
		d.wg.Wait()
		d.destroyAll() // clones whose restore finished meanwhile
		// Every VM is gone: nothing maps a clone's RAM file or faults on a
		// snapshot any more.
		d.mu.Lock()
		snaps := make([]*localSnap, 0, len(d.snaps))
		for _, ls := range d.snaps {
			snaps = append(snaps, ls)
		}
		srcs := make([]*source, 0, len(d.sources))
		for _, src := range d.sources {
			srcs = append(srcs, src)
		}
		d.sources = map[uint64]*source{}
		d.mu.Unlock()
		for _, ls := range snaps {
			d.release(ls, "host daemon shutting down")
		}
		for _, src := range srcs {
			d.closeSource(src)
		}
		if d.lazy != nil {
			if err := d.lazy.Unmount(); err != nil {
				d.log.Warn("unmounting lazyram", "error", err)
			}
		}
		removeStalePages(d.cfg.pageCacheDir(), true)
		if d.ms != nil {
			_ = d.ms.Close()
		}
		if c, ok := d.hv.(io.Closer); ok {
			if err := c.Close(); err != nil {
				d.log.Warn("hypervisor cleanup", "error", err)
			}
		}
	})
	return nil
}

// destroyAll destroys every VM of this host and reports it ended.
func (d *Daemon) destroyAll() {
	d.mu.Lock()
	ids := make([]uint64, 0, len(d.vms))
	for id := range d.vms {
		ids = append(ids, id)
	}
	d.mu.Unlock()
	for _, id := range ids {
		d.destroy(id, "host daemon shutting down")
		d.endVM(id, "host "+d.cfg.NodeID+" shut down")
	}
}

// VMStatus is one VM in the host API.
type VMStatus struct {
	ID      uint64 `json:"id"`
	Started string `json:"started"`
	BootMS  int64  `json:"boot_ms,omitempty"`
	Console string `json:"console"`
	Calls   uint64 `json:"guest_calls"`
}

// VMs lists the VMs this daemon runs.
func (d *Daemon) VMs() []VMStatus {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := []VMStatus{}
	for _, lv := range d.vms {
		out = append(out, VMStatus{ID: lv.id, Started: lv.started.UTC().Format(time.RFC3339Nano), BootMS: lv.bootMS,
			Console: lv.run.ConsolePath(), Calls: lv.channel.Stats().Calls})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]interface{}{"node_id": d.cfg.NodeID, "hypervisor": d.hv.Name(), "vms": len(d.VMs()),
			"slots": d.cfg.Slots, "mem_mb": d.cfg.MemMB})
	})
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, d.VMs()) })
	mux.HandleFunc("GET /v1/vms/{id}/console", d.handleConsole)
	mux.HandleFunc("GET /v1/snapshots/{digest}/descriptor", d.handleDescriptor)
	mux.HandleFunc("GET /metrics", d.handleMetrics)
	return d.auth(mux)
}

func (d *Daemon) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d.cfg.Token != "" && !api.TokenMatches(r.Header.Get("Authorization"), d.cfg.Token) {
			http.Error(w, "missing or wrong bearer token", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (d *Daemon) handleConsole(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil {
		http.Error(w, "bad vm id", http.StatusBadRequest)
		return
	}
	d.mu.Lock()
	path := d.consoles[id]
	d.mu.Unlock()
	if path == "" {
		http.Error(w, fmt.Sprintf("vm %d does not run on this host", id), http.StatusNotFound)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = io.Copy(w, f)
}

func (d *Daemon) handleMetrics(w http.ResponseWriter, r *http.Request) {
	var b strings.Builder
	vms := d.VMs()
	fmt.Fprintf(&b, "# HELP sf_host_vms VMs running on this host.\n# TYPE sf_host_vms gauge\nsf_host_vms %d\n", len(vms))
	fmt.Fprintf(&b, "# HELP sf_host_vm_boot_ms Time from start to the guest's ready call.\n# TYPE sf_host_vm_boot_ms gauge\n")
	for _, v := range vms {
		if v.BootMS > 0 {
			fmt.Fprintf(&b, "sf_host_vm_boot_ms{vm=\"%d\"} %d\n", v.ID, v.BootMS)
		}
	}
	fmt.Fprintf(&b, "# HELP sf_host_guest_calls_total Guest API calls per VM.\n# TYPE sf_host_guest_calls_total counter\n")
	for _, v := range vms {
		fmt.Fprintf(&b, "sf_host_guest_calls_total{vm=\"%d\"} %d\n", v.ID, v.Calls)
	}
	d.mu.Lock()
	srcs := make([]*source, 0, len(d.sources))
	for _, src := range d.sources {
		srcs = append(srcs, src)
	}
	snaps := len(d.snaps)
	d.mu.Unlock()
	fmt.Fprintf(&b, "# HELP sf_host_snapshots Captured snapshots this host serves.\n# TYPE sf_host_snapshots gauge\nsf_host_snapshots %d\n", snaps)
	fmt.Fprintf(&b, "# HELP sf_host_clone_pages_fetched_total Pages clones here fetched, per descriptor.\n# TYPE sf_host_clone_pages_fetched_total counter\n")
	sort.Slice(srcs, func(i, j int) bool { return srcs[i].id < srcs[j].id })
	var faults []string
	for _, src := range srcs {
		select {
		case <-src.ready: // fields are set
		default:
			continue
		}
		if src.err != nil || src.lazyID == "" {
			continue
		}
		if st, err := d.lazy.Stats(src.lazyID); err == nil {
			fmt.Fprintf(&b, "sf_host_clone_pages_fetched_total{descriptor=\"%d\"} %d\n", src.id, st.PagesFetched)
			faults = append(faults, fmt.Sprintf("sf_host_clone_zero_pages_total{descriptor=\"%d\"} %d\n", src.id, st.ZeroPages))
		}
	}
	fmt.Fprintf(&b, "# HELP sf_host_clone_zero_pages_total Pages answered as zero without a fetch.\n# TYPE sf_host_clone_zero_pages_total counter\n")
	for _, f := range faults {
		b.WriteString(f)
	}
	d.mcast.write(&b)
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	_, _ = io.WriteString(w, b.String())
	if d.ms != nil {
		_ = d.ms.WriteMetrics(w)
	}
}

func writeJSON(w http.ResponseWriter, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
