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
	Slots           int   // clone slots offered
	MemMB           int64 // memory offered to VMs
	// Kernel and Initrd are this host's default guest image.
	Kernel, Initrd string
	Logger         hclog.Logger
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

	mu       sync.Mutex
	vms      map[uint64]*localVM
	consoles map[uint64]string // console logs of every VM this run started, kept after it ends

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

// localVM is a VM this daemon runs.
type localVM struct {
	id       uint64
	run      RunningVM
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
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("hostd: data dir: %w", err)
	}
	if err := hv.Reap(); err != nil {
		cfg.Logger.Warn("reaping leftovers of an earlier run", "error", err)
	}
	coord, err := api.NewClient(api.Config{Addrs: cfg.Coordinators, Token: cfg.Token})
	if err != nil {
		return nil, err
	}
	d := &Daemon{cfg: cfg, log: cfg.Logger, hv: hv, coord: coord, vms: map[uint64]*localVM{},
		consoles: map[uint64]string{}, stop: make(chan struct{})}
	if d.ln, err = net.Listen("tcp", cfg.APIAddr); err != nil {
		return nil, fmt.Errorf("hostd: api listen: %w", err)
	}
	if ip := d.ln.Addr().(*net.TCPAddr).IP; ip.IsUnspecified() {
		d.ln.Close()
		return nil, fmt.Errorf("hostd: api address %s is unspecified; bind a reachable address", cfg.APIAddr)
	}
	d.gossip, err = gossip.New(gossip.Config{Name: cfg.NodeID, BindAddr: cfg.GossipAddr, AdvertiseAddr: cfg.GossipAdvertise,
		Key: cfg.GossipKey, Logger: d.log.Named("gossip"),
		Meta: gossip.Meta{Role: gossip.RoleHost, API: d.APIAddr(), Slots: cfg.Slots, MemMB: cfg.MemMB}})
	if err != nil {
		d.ln.Close()
		return nil, err
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
	d.mu.Unlock()
	switch {
	case vm.Role == fsm.RoleParent && vm.State == fsm.VMPending && local == nil:
		d.launch(ctx, vm)
	case vm.State == fsm.VMEnded && local != nil:
		d.destroy(vm.ID, "ended in the cluster: "+vm.Reason)
	}
}

// launch boots a pending parent VM and serves its channel.
func (d *Daemon) launch(ctx context.Context, vm fsm.VM) {
	spec := VMSpec{ID: "vm-" + strconv.FormatUint(vm.ID, 10), Kernel: vm.Kernel, Initrd: vm.Initrd, MemMB: vm.MemMB, VCPUs: vm.VCPUs,
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
	cctx, cancel := context.WithCancel(context.Background())
	lv := &localVM{id: vm.ID, run: run, cancel: cancel, started: start}
	lv.channel = &GuestChannel{VMID: vm.ID, Host: d.cfg.NodeID, Coord: d.coord, Log: log, OnReady: func() {
		d.mu.Lock()
		if lv.bootMS == 0 {
			lv.bootMS = time.Since(start).Milliseconds()
		}
		ms := lv.bootMS
		d.mu.Unlock()
		log.Info("guest ready", "boot_ms", ms)
	}}
	d.mu.Lock()
	d.vms[vm.ID] = lv
	d.consoles[vm.ID] = run.ConsolePath()
	d.mu.Unlock()
	d.goRun(func() { d.serveChannel(cctx, lv, log) })
	d.goRun(func() { d.await(lv, log) })
	if _, err := d.coord.VMStarted(ctx, vm.ID); err != nil {
		log.Warn("could not report the VM started", "error", err)
	}
	log.Info("VM started", "hypervisor", d.hv.Name(), "mem_mb", spec.MemMB)
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
	if !stopping {
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
		_ = d.gossip.Leave(2 * time.Second)
		_ = d.gossip.Shutdown()
		_ = d.http.Shutdown(ctx)
		d.wg.Wait()
		if c, ok := d.hv.(io.Closer); ok {
			if err := c.Close(); err != nil {
				d.log.Warn("hypervisor cleanup", "error", err)
			}
		}
	})
	return nil
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
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	_, _ = io.WriteString(w, b.String())
}

func writeJSON(w http.ResponseWriter, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
