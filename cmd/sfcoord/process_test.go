//go:build linux

// Process-level tests: they build the real sfcoord binary once, run clusters
// of `sfcoord agent` processes on 127.0.0.1, crash them with SIGKILL, restart
// them on the same data dirs and ports, and drive them with the CLI (Run) and
// the Go client. The agents' logs are printed when a test fails; set
// SF_TEST_LOG=1 to run the agents at debug level and always print them.
package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/gossip"
)

// sfcoordBin is the binary TestMain built.
var sfcoordBin string

func TestMain(m *testing.M) {
	// The CLI and the agents read these; a developer's shell must not leak
	// into the tests.
	for _, k := range []string{"SF_ADDR", "SF_TOKEN", "SF_ENCRYPT"} {
		os.Unsetenv(k)
	}
	dir, err := os.MkdirTemp("", "sfcoord-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "sfcoord test:", err)
		os.Exit(1)
	}
	bin := filepath.Join(dir, "sfcoord")
	args := []string{"build", "-o", bin}
	if raceEnabled() {
		args = append(args, "-race") // race-check the agents too
	}
	cmd := exec.Command(goTool(), append(args, ".")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "sfcoord test: go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	sfcoordBin = bin
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// raceEnabled reports whether this test binary was built with -race.
func raceEnabled() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" && s.Value == "true" {
			return true
		}
	}
	return false
}

func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	if root := os.Getenv("GOROOT"); root != "" {
		return filepath.Join(root, "bin", "go")
	}
	return "go"
}

// --- polling ---

// waitFor polls cond every 10 ms until it returns nil, failing the test with
// cond's last error when d has passed.
func waitFor(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %v", d, what, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// neverWithin polls check for d and fails the test as soon as it reports a
// violation. A poll that cannot tell (err) is retried: on a loaded machine an
// agent may be slow to answer. The window only counts as covered once a poll
// that began after d has succeeded.
func neverWithin(t *testing.T, d time.Duration, what string, check func() (violation, err error)) {
	t.Helper()
	start := time.Now()
	var lastErr error
	for n := 0; ; n++ {
		began := time.Now()
		violation, err := check()
		if violation != nil {
			t.Fatalf("%s (after %s, %d polls): %v", what, time.Since(start).Round(time.Millisecond), n, violation)
		}
		if err == nil && began.Sub(start) >= d {
			return
		}
		if err != nil {
			lastErr = err
		}
		if time.Since(start) > d+30*time.Second {
			t.Fatalf("could not check that never %s: %v", what, lastErr)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ctxFor(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// --- ports ---

var (
	portMu    sync.Mutex
	usedPorts = map[int]bool{} // never hand out a port twice in this process
)

// freePort returns a port on 127.0.0.1 that was free just now, for TCP and,
// with udp, for UDP as well (gossip uses both on one port).
func freePort(t *testing.T, udp bool) int {
	t.Helper()
	for i := 0; i < 100; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("pick a port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		ok := true
		if udp {
			pc, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err != nil {
				ok = false
			} else {
				pc.Close()
			}
		}
		l.Close()
		portMu.Lock()
		if usedPorts[port] {
			ok = false
		}
		usedPorts[port] = true
		portMu.Unlock()
		if ok {
			return port
		}
	}
	t.Fatal("no free port found")
	return 0
}

func localAddr(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// --- agent processes ---

// agentSpec is what an agent is started with.
type agentSpec struct {
	name   string
	expect int      // --bootstrap-expect, 0 for none
	join   []string // --join addresses
	token  string
	key    string // --encrypt
}

// agent is one `sfcoord agent` process, which may be killed and restarted
// on the same ports and data dir.
type agent struct {
	spec               agentSpec
	dir, logPath       string
	raft, http, gossip string
	args               []string
	starts             int
	proc               *proc       // the current or last process
	statusCl           *api.Client // talks to this agent only
}

type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has been reaped
	err  error         // cmd.Wait's result, valid after done
}

// allocPorts picks the agent's raft, HTTP and gossip ports.
func (a *agent) allocPorts(t *testing.T) {
	t.Helper()
	a.raft = localAddr(freePort(t, false))
	a.http = localAddr(freePort(t, false))
	a.gossip = localAddr(freePort(t, true))
}

// buildArgs derives the agent's command line from its spec and ports.
func (a *agent) buildArgs(t *testing.T) {
	t.Helper()
	level := "info"
	if os.Getenv("SF_TEST_LOG") != "" {
		level = "debug"
	}
	a.args = []string{"agent", "--node-id", a.spec.name, "--data-dir", a.dir,
		"--raft-addr", a.raft, "--http-addr", a.http, "--gossip-addr", a.gossip, "--log-level", level}
	if a.spec.expect > 0 {
		a.args = append(a.args, "--bootstrap-expect", strconv.Itoa(a.spec.expect))
	}
	for _, j := range a.spec.join {
		a.args = append(a.args, "--join", j)
	}
	if a.spec.token != "" {
		a.args = append(a.args, "--token", a.spec.token)
	}
	if a.spec.key != "" {
		a.args = append(a.args, "--encrypt", a.spec.key)
	}
	var err error
	if a.statusCl, err = api.NewClient(api.Config{Addrs: []string{a.http}, Token: a.spec.token, RetryFor: time.Second}); err != nil {
		t.Fatal(err)
	}
}

// start runs the agent with its flags; its output is appended to its log.
func (a *agent) start(t *testing.T) {
	t.Helper()
	if a.running() {
		t.Fatalf("agent %s is already running", a.spec.name)
	}
	f, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	a.starts++
	fmt.Fprintf(f, "=== %s test harness: start #%d: sfcoord %s\n", time.Now().Format(time.RFC3339Nano), a.starts, strings.Join(a.args, " "))
	cmd := exec.Command(sfcoordBin, a.args...)
	cmd.Stdout, cmd.Stderr = f, f
	// Own process group, so that the whole group can be killed; and die with
	// the test binary should it be killed before its cleanups run (go test's
	// -timeout). Pdeathsig follows the forking OS thread, which Go only ends
	// for goroutines that exit while locked to it; none here do.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	f.Close() // the child has its own descriptor
	if err != nil {
		t.Fatalf("start agent %s: %v", a.spec.name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	a.proc = p
}

func (a *agent) running() bool {
	if a.proc == nil {
		return false
	}
	select {
	case <-a.proc.done:
		return false
	default:
		return true
	}
}

// kill sends SIGKILL to the agent's process group and waits until the
// process is reaped.
func (a *agent) kill(t *testing.T) {
	t.Helper()
	if !a.running() {
		return
	}
	_ = syscall.Kill(-a.proc.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-a.proc.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("agent %s survived SIGKILL for 10 s", a.spec.name)
	}
}

// restart starts the agent again with the same flags, ports and data dir.
func (a *agent) restart(t *testing.T) {
	t.Helper()
	a.kill(t)
	a.start(t)
	a.waitUp(t, false)
}

// waitExit waits for the process to exit by itself and returns its status.
func (a *agent) waitExit(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-a.proc.done:
		return a.proc.cmd.ProcessState.ExitCode()
	case <-time.After(d):
		t.Fatalf("agent %s did not exit within %s", a.spec.name, d)
		return -1
	}
}

func (a *agent) log() []byte {
	b, _ := os.ReadFile(a.logPath)
	return b
}

// status asks the agent itself for GET /v1/status.
func (a *agent) status() (api.Status, error) {
	return a.statusCl.Status(context.Background()) // bounded by RetryFor
}

// waitUp waits until the agent's API answers. On a first start that failed
// because a port picked earlier was taken meanwhile, it picks new ports and
// tries again (only when firstStart is set: a restart must keep its ports).
func (a *agent) waitUp(t *testing.T, firstStart bool) {
	t.Helper()
	for attempt := 0; ; attempt++ {
		err := a.waitUpOnce(30 * time.Second)
		if err == nil {
			return
		}
		if firstStart && attempt < 3 && !a.running() && bytes.Contains(a.log(), []byte("address already in use")) {
			t.Logf("agent %s lost a port race; picking new ports", a.spec.name)
			a.allocPorts(t)
			a.buildArgs(t)
			a.start(t)
			continue
		}
		t.Fatalf("agent %s did not come up: %v", a.spec.name, err)
	}
}

func (a *agent) waitUpOnce(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		if !a.running() {
			return fmt.Errorf("process exited: %v", a.proc.err)
		}
		_, err := a.status()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// --- clusters ---

type cluster struct {
	t      *testing.T
	base   string
	token  string
	key    string
	agents []*agent
}

type clusterOpts struct {
	n     int
	token string
	key   string
}

// startCluster starts n agents with --bootstrap-expect n, each joining the
// gossip addresses of all the others (so that any of them can be restarted
// and find the pool again), and waits for a leader and n voters.
func startCluster(t *testing.T, o clusterOpts) *cluster {
	t.Helper()
	c := &cluster{t: t, base: t.TempDir(), token: o.token, key: o.key}
	// Registered after t.TempDir, so it runs before the directory is removed.
	t.Cleanup(c.cleanup)
	began := time.Now()
	for i := 0; i < o.n; i++ {
		c.agents = append(c.agents, c.newAgent(agentSpec{name: fmt.Sprintf("n%d", i+1), expect: o.n, token: o.token, key: o.key}))
	}
	for _, a := range c.agents {
		for _, b := range c.agents {
			if b != a {
				a.spec.join = append(a.spec.join, b.gossip)
			}
		}
		a.buildArgs(t)
	}
	for _, a := range c.agents {
		a.start(t)
	}
	for _, a := range c.agents {
		a.waitUp(t, true)
	}
	l := c.waitLeader()
	c.waitVoters(c.agents, c.names(c.agents...)...)
	t.Logf("cluster of %d formed in %s; leader %s", o.n, time.Since(began).Round(time.Millisecond), l.spec.name)
	return c
}

// newAgent prepares (but does not start) an agent with its own data dir,
// log file and ports.
func (c *cluster) newAgent(spec agentSpec) *agent {
	c.t.Helper()
	a := &agent{spec: spec, dir: filepath.Join(c.base, spec.name, "data"), logPath: filepath.Join(c.base, spec.name+".log")}
	if err := os.MkdirAll(filepath.Dir(a.dir), 0o755); err != nil {
		c.t.Fatal(err)
	}
	a.allocPorts(c.t)
	return a
}

// addAgent starts one more agent that joins the given gossip addresses and
// waits until its API answers. It belongs to the cluster's cleanup.
func (c *cluster) addAgent(spec agentSpec) *agent {
	c.t.Helper()
	a := c.newAgent(spec)
	a.buildArgs(c.t)
	c.agents = append(c.agents, a)
	a.start(c.t)
	a.waitUp(c.t, true)
	return a
}

// cleanup kills every agent, fails the test if a race-built agent reported a
// data race, and prints the agents' logs when the test failed.
func (c *cluster) cleanup() {
	for _, a := range c.agents {
		if a.running() {
			_ = syscall.Kill(-a.proc.cmd.Process.Pid, syscall.SIGKILL)
			select {
			case <-a.proc.done:
			case <-time.After(10 * time.Second):
				c.t.Errorf("agent %s survived SIGKILL", a.spec.name)
			}
		}
	}
	for _, a := range c.agents {
		if bytes.Contains(a.log(), []byte("WARNING: DATA RACE")) {
			c.t.Errorf("agent %s reported a data race (see its log)", a.spec.name)
		}
	}
	if !c.t.Failed() && os.Getenv("SF_TEST_LOG") == "" {
		return
	}
	for _, a := range c.agents {
		b := a.log()
		const max = 96 << 10
		if len(b) > max {
			b = append([]byte(fmt.Sprintf("[... %d bytes cut ...]\n", len(b)-max)), b[len(b)-max:]...)
		}
		c.t.Logf("===== log of agent %s (%s) =====\n%s", a.spec.name, a.http, b)
	}
}

func (c *cluster) running() []*agent {
	var out []*agent
	for _, a := range c.agents {
		if a.running() {
			out = append(out, a)
		}
	}
	return out
}

func (c *cluster) names(as ...*agent) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.spec.name)
	}
	return out
}

func (c *cluster) byName(name string) *agent {
	for _, a := range c.agents {
		if a.spec.name == name {
			return a
		}
	}
	c.t.Fatalf("no agent %q", name)
	return nil
}

// client returns an API client for the given agents with the cluster token.
func (c *cluster) client(as ...*agent) *api.Client {
	c.t.Helper()
	var addrs []string
	for _, a := range as {
		addrs = append(addrs, a.http)
	}
	cl, err := api.NewClient(api.Config{Addrs: addrs, Token: c.token, RetryFor: 20 * time.Second})
	if err != nil {
		c.t.Fatal(err)
	}
	return cl
}

func (c *cluster) gossipAddrs(as ...*agent) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.gossip)
	}
	return out
}

// leaderNow returns the running agent that every running agent's
// GET /v1/status names as leader and that reports itself Leader.
func (c *cluster) leaderNow() (*agent, error) {
	run := c.running()
	if len(run) == 0 {
		return nil, errors.New("no agent is running")
	}
	leaderID := ""
	var self *agent
	for _, a := range run {
		st, err := a.status()
		if err != nil {
			return nil, fmt.Errorf("status of %s: %w", a.spec.name, err)
		}
		if st.LeaderID == "" {
			return nil, fmt.Errorf("%s (%s) knows no leader", a.spec.name, st.State)
		}
		if leaderID != "" && st.LeaderID != leaderID {
			return nil, fmt.Errorf("agents disagree on the leader: %s and %s", leaderID, st.LeaderID)
		}
		leaderID = st.LeaderID
		if a.spec.name == st.LeaderID {
			if st.State != "Leader" {
				return nil, fmt.Errorf("%s is named leader but is %s", a.spec.name, st.State)
			}
			self = a
		}
	}
	if self == nil {
		return nil, fmt.Errorf("leader %s is not a running agent", leaderID)
	}
	return self, nil
}

// waitLeader waits until the running agents agree on a running leader.
func (c *cluster) waitLeader() *agent {
	c.t.Helper()
	var l *agent
	waitFor(c.t, 30*time.Second, "a leader", func() error {
		var err error
		l, err = c.leaderNow()
		return err
	})
	return l
}

// waitVoters waits until each of the given agents' own raft configuration
// holds exactly the named voters.
func (c *cluster) waitVoters(via []*agent, ids ...string) {
	c.t.Helper()
	want := slices.Sorted(slices.Values(ids))
	waitFor(c.t, 30*time.Second, fmt.Sprintf("voters %v", want), func() error {
		for _, a := range via {
			ctx, cancel := ctxFor(2 * time.Second)
			ps, err := a.statusCl.Peers(ctx)
			cancel()
			if err != nil {
				return fmt.Errorf("peers of %s: %w", a.spec.name, err)
			}
			if got := voterIDs(ps); !slices.Equal(got, want) {
				return fmt.Errorf("%s has voters %v (peers %+v)", a.spec.name, got, ps)
			}
		}
		return nil
	})
}

func voterIDs(ps []api.Peer) []string {
	var out []string
	for _, p := range ps {
		if p.Voter {
			out = append(out, p.ID)
		}
	}
	slices.Sort(out)
	return out
}

// others returns the agents in as other than x.
func others(as []*agent, x *agent) []*agent {
	var out []*agent
	for _, a := range as {
		if a != x {
			out = append(out, a)
		}
	}
	return out
}

// --- the CLI in-process ---

type cliResult struct {
	code           int
	stdout, stderr string
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
}

// runCLI runs sfcoord's Run in this process.
func runCLI(args ...string) cliResult {
	var out, errb bytes.Buffer
	code := Run(args, &out, &errb)
	return cliResult{code, out.String(), errb.String()}
}

// cliPeers runs `sfcoord raft list-peers -json` against one agent.
func (c *cluster) cliPeers(a *agent) ([]api.Peer, error) {
	r := runCLI("raft", "list-peers", "--addr", a.http, "--token", c.token, "--timeout", "10s", "-json")
	if r.code != 0 {
		return nil, fmt.Errorf("raft list-peers: %v", r)
	}
	var ps []api.Peer
	if err := json.Unmarshal([]byte(r.stdout), &ps); err != nil {
		return nil, fmt.Errorf("raft list-peers -json output %q: %v", r.stdout, err)
	}
	return ps, nil
}

// cliMembers runs `sfcoord members -json` against one agent.
func (c *cluster) cliMembers(a *agent) ([]api.Member, error) {
	r := runCLI("members", "--addr", a.http, "--token", c.token, "--timeout", "10s", "-json")
	if r.code != 0 {
		return nil, fmt.Errorf("members: %v", r)
	}
	var ms []api.Member
	if err := json.Unmarshal([]byte(r.stdout), &ms); err != nil {
		return nil, fmt.Errorf("members -json output %q: %v", r.stdout, err)
	}
	return ms, nil
}

func findMember(ms []api.Member, name string) (api.Member, bool) {
	for _, m := range ms {
		if m.Name == name {
			return m, true
		}
	}
	return api.Member{}, false
}

// --- hosts and raw HTTP ---

// startHost joins an in-process gossip agent with role host to the pool, as
// sfhostd does, and waits until the leader has registered it.
func (c *cluster) startHost(name string, slots int) *gossip.Agent {
	c.t.Helper()
	var key []byte
	if c.key != "" {
		var err error
		if key, err = gossip.DecodeKey(c.key); err != nil {
			c.t.Fatal(err)
		}
	}
	h, err := gossip.New(gossip.Config{Name: name, BindAddr: "127.0.0.1:0", Key: key,
		Meta: gossip.Meta{Role: gossip.RoleHost, API: "127.0.0.1:7000", Slots: slots, MemMB: 4096}})
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { _ = h.Shutdown() })
	if _, err := h.Join(c.gossipAddrs(c.running()...)); err != nil {
		c.t.Fatal(err)
	}
	cl := c.client(c.running()...)
	waitFor(c.t, 30*time.Second, "host "+name+" registered", func() error {
		ctx, cancel := ctxFor(5 * time.Second)
		defer cancel()
		hs, _, err := cl.Hosts(ctx, nil)
		if err != nil {
			return err
		}
		for _, x := range hs {
			if x.ID == name && x.Status == "alive" && x.Slots == slots {
				return nil
			}
		}
		return fmt.Errorf("hosts: %+v", hs)
	})
	return h
}

var rawHTTP = &http.Client{Timeout: 20 * time.Second}

// rawRequest sends one HTTP request; auth is the whole Authorization header.
func rawRequest(t *testing.T, method, url, auth string, body []byte) (int, http.Header, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := rawHTTP.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading answer: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, b
}

// errorBody parses a JSON error answer, failing unless it has a code.
func errorBody(t *testing.T, what string, h http.Header, b []byte) api.ErrorBody {
	t.Helper()
	if ct := h.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("%s: Content-Type %q, want application/json", what, ct)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatalf("%s: body %q is not JSON: %v", what, b, err)
	}
	if _, ok := raw["code"]; !ok {
		t.Fatalf("%s: body %q has no \"code\"", what, b)
	}
	var eb api.ErrorBody
	_ = json.Unmarshal(b, &eb)
	if eb.Code == "" || eb.Error == "" {
		t.Fatalf("%s: body %q has an empty code or error", what, b)
	}
	return eb
}

// --- tests ---

func TestProcessBootstrapKillRestart(t *testing.T) {
	c := startCluster(t, clusterOpts{n: 3})
	c.startHost("h1", 64)
	all := c.client(c.agents...)
	ctx, cancel := ctxFor(60 * time.Second)
	defer cancel()

	vm, err := all.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: 256, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	acked := map[uint64]bool{}
	request := func(cl *api.Client, what string) {
		t.Helper()
		tk, err := cl.RequestTicket(ctx, vm.ID, 2)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if tk.Granted != 2 {
			t.Fatalf("%s: granted %d of 2", what, tk.Granted)
		}
		if acked[tk.ID] {
			t.Fatalf("%s: ticket ID %d handed out twice", what, tk.ID)
		}
		acked[tk.ID] = true
	}
	for i := 0; i < 5; i++ {
		request(all, "ticket before the crash")
	}

	old := c.waitLeader()
	survivors := others(c.agents, old)
	killed := time.Now()
	old.kill(t)
	// The client knows all three addresses, as a real one would, and must
	// find the new leader by itself.
	request(all, "first ticket after the crash")
	failover := time.Since(killed)
	t.Logf("failover: a ticket write was acknowledged %s after kill -9 of leader %s", failover.Round(time.Millisecond), old.spec.name)
	if failover >= 5*time.Second {
		t.Errorf("failover took %s, want < 5s", failover.Round(time.Millisecond))
	}
	nl := c.waitLeader()
	if nl == old {
		t.Fatalf("killed agent %s is still leader", old.spec.name)
	}
	// Writes that the crashed node must catch up on.
	for i := 0; i < 3; i++ {
		request(c.client(survivors...), "ticket while the old leader is down")
	}

	restarted := time.Now()
	old.restart(t)
	request(all, "ticket after the restart")

	only := c.client(old)
	waitFor(t, 30*time.Second, "restarted agent to list every acknowledged ticket (stale read)", func() error {
		ctx, cancel := ctxFor(3 * time.Second)
		defer cancel()
		ts, _, err := only.Tickets(ctx, 0, &api.QueryOptions{Stale: true})
		if err != nil {
			return err
		}
		have := map[uint64]bool{}
		for _, tk := range ts {
			have[tk.ID] = true
		}
		var missing []uint64
		for id := range acked {
			if !have[id] {
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			return fmt.Errorf("missing tickets %v of %d acknowledged", missing, len(acked))
		}
		if len(ts) != len(acked) {
			return fmt.Errorf("%d tickets listed, %d acknowledged", len(ts), len(acked))
		}
		return nil
	})
	t.Logf("restarted agent %s caught up %s after its restart", old.spec.name, time.Since(restarted).Round(time.Millisecond))

	want := c.names(c.agents...)
	waitFor(t, 30*time.Second, "raft list-peers on the restarted agent to show 3 voters and the leader", func() error {
		ps, err := c.cliPeers(old)
		if err != nil {
			return err
		}
		if got := voterIDs(ps); !slices.Equal(got, want) {
			return fmt.Errorf("voters %v, want %v", got, want)
		}
		leaders := 0
		for _, p := range ps {
			if p.State == "leader" {
				leaders++
			}
		}
		if leaders != 1 {
			return fmt.Errorf("%d peers marked leader: %+v", leaders, ps)
		}
		return nil
	})
	// The table form names every peer too.
	r := runCLI("raft", "list-peers", "--addr", old.http)
	if r.code != 0 || !strings.Contains(r.stdout, "Voter") {
		t.Fatalf("raft list-peers: %v", r)
	}
	for _, id := range want {
		if !strings.Contains(r.stdout, id) {
			t.Errorf("raft list-peers table lacks %s:\n%s", id, r.stdout)
		}
	}
	// Linearizable reads through the restarted agent (forwarded to the
	// leader) see everything as well, in the CLI's other commands too.
	r = runCLI("tickets", "--addr", old.http, "-json")
	var ts []struct {
		ID uint64 `json:"id"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &ts) != nil || len(ts) != len(acked) {
		t.Fatalf("tickets -json via %s: %v; want %d tickets", old.spec.name, r, len(acked))
	}
	r = runCLI("ticket", "show", strconv.FormatUint(ts[0].ID, 10), "--addr", old.http)
	if want := fmt.Sprintf("Ticket %d: parent VM %d", ts[0].ID, vm.ID); r.code != 0 || !strings.Contains(r.stdout, want) {
		t.Fatalf("ticket show: %v; want %q", r, want)
	}
	r = runCLI("hosts", "--addr", old.http)
	if r.code != 0 || !strings.Contains(r.stdout, "h1") || !strings.Contains(r.stdout, "/64") {
		t.Fatalf("hosts: %v", r)
	}
	r = runCLI("status", "--addr", old.http, "-json")
	var st api.Status
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil {
		t.Fatalf("status -json: %v", r)
	}
	if st.NodeID != old.spec.name || st.LeaderID == "" || st.LeaderID == old.spec.name && st.State != "Leader" || st.Peers != 3 {
		t.Fatalf("status of the restarted agent: %+v", st)
	}
}

func TestProcessLeaveAndRemovePeer(t *testing.T) {
	c := startCluster(t, clusterOpts{n: 3})
	n1, n2, n3 := c.agents[0], c.agents[1], c.agents[2]

	// Graceful leave: the agent hands over, leaves raft and gossip, and exits 0.
	asked := time.Now()
	r := runCLI("leave", "--addr", n3.http, "--timeout", "30s")
	if r.code != 0 || !strings.Contains(r.stdout, "Graceful leave complete") {
		t.Fatalf("sfcoord leave: %v", r)
	}
	if code := n3.waitExit(t, 15*time.Second); code != 0 {
		t.Fatalf("left agent exited with status %d, want 0", code)
	}
	t.Logf("agent n3 left and exited %s after 'sfcoord leave'", time.Since(asked).Round(time.Millisecond))
	waitFor(t, 30*time.Second, "2 raft servers after the leave", func() error {
		for _, a := range []*agent{n1, n2} {
			ps, err := c.cliPeers(a)
			if err != nil {
				return err
			}
			if len(ps) != 2 || slices.ContainsFunc(ps, func(p api.Peer) bool { return p.ID == "n3" }) {
				return fmt.Errorf("peers on %s: %+v", a.spec.name, ps)
			}
		}
		return nil
	})
	waitFor(t, 30*time.Second, "members to show n3 left", func() error {
		for _, a := range []*agent{n1, n2} {
			ms, err := c.cliMembers(a)
			if err != nil {
				return err
			}
			if m, ok := findMember(ms, "n3"); !ok || m.Status != "left" {
				return fmt.Errorf("members on %s: %+v", a.spec.name, ms)
			}
		}
		return nil
	})
	c.waitLeader()

	// Back to three: a fourth agent joins the pool and the leader makes it a
	// voter. Then a follower crashes and the operator removes it.
	n4 := c.addAgent(agentSpec{name: "n4", join: c.gossipAddrs(n1, n2)})
	live := []*agent{n1, n2, n4}
	c.waitVoters(live, "n1", "n2", "n4")
	leader := c.waitLeader()
	var victim, other *agent
	for _, a := range live {
		switch {
		case a == leader:
		case victim == nil:
			victim = a
		default:
			other = a
		}
	}
	victim.kill(t)
	// Wait for gossip to declare it failed: while it is merely suspect the
	// leader would put it straight back into raft.
	waitFor(t, 30*time.Second, "gossip to report "+victim.spec.name+" failed", func() error {
		ms, err := c.cliMembers(leader)
		if err != nil {
			return err
		}
		if m, ok := findMember(ms, victim.spec.name); !ok || m.Status != "failed" {
			return fmt.Errorf("members: %+v", ms)
		}
		return nil
	})
	// Sent to the surviving follower, which forwards it to the leader.
	r = runCLI("raft", "remove-peer", "--id", victim.spec.name, "--addr", other.http, "--timeout", "30s")
	if r.code != 0 || !strings.Contains(r.stdout, victim.spec.name) {
		t.Fatalf("raft remove-peer --id %s: %v", victim.spec.name, r)
	}
	// The leader had it committed before answering; the follower learns it
	// from the leader (and leadership may have moved meanwhile), so poll.
	wantPeers := slices.Sorted(slices.Values(c.names(leader, other)))
	waitFor(t, 30*time.Second, "both survivors to drop the removed peer", func() error {
		for _, a := range []*agent{leader, other} {
			ps, err := c.cliPeers(a)
			if err != nil {
				return err
			}
			if got := voterIDs(ps); len(ps) != 2 || !slices.Equal(got, wantPeers) {
				return fmt.Errorf("peers on %s: %+v", a.spec.name, ps)
			}
		}
		return nil
	})

	r = runCLI("raft", "remove-peer", "--id", "nosuch", "--addr", leader.http, "--timeout", "30s")
	if r.code != 1 || !strings.Contains(r.stderr, "nosuch") {
		t.Fatalf("raft remove-peer --id nosuch: %v, want exit 1 naming the peer", r)
	}
	r = runCLI("raft", "remove-peer", "--addr", leader.http)
	if r.code != 2 || !strings.Contains(r.stderr, "--id") {
		t.Fatalf("raft remove-peer without --id: %v, want exit 2", r)
	}
	// The two that are left still commit writes.
	c.startHost("h1", 4)
}

func TestProcessSecurity(t *testing.T) {
	kg := runCLI("keygen")
	if kg.code != 0 {
		t.Fatalf("keygen: %v", kg)
	}
	key := strings.TrimSpace(kg.stdout)
	const token = "T-process-test-token"
	c := startCluster(t, clusterOpts{n: 3, token: token, key: key})
	n1 := c.agents[0]
	c.startHost("h1", 8)
	cl := c.client(c.agents...)
	ctx, cancel := ctxFor(60 * time.Second)
	defer cancel()
	vm, err := cl.CreateVM(ctx, api.VMRequest{Name: "parent", Host: "h1", MemMB: 256, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.RequestTicket(ctx, vm.ID, 2); err != nil {
		t.Fatal(err)
	}

	// The CLI without and with the token.
	r := runCLI("members", "--addr", n1.http, "--timeout", "10s")
	low := strings.ToLower(r.stderr)
	if r.code != 1 || !(strings.Contains(low, "401") || strings.Contains(low, "unauthorized")) {
		t.Fatalf("members without token: %v, want exit 1 mentioning 401/unauthorized", r)
	}
	r = runCLI("members", "--addr", n1.http, "--token", token, "--timeout", "10s")
	if r.code != 0 || !strings.Contains(r.stdout, "n1") || !strings.Contains(r.stdout, "h1") {
		t.Fatalf("members with token: %v", r)
	}

	// Raw HTTP: every wrong Authorization header gets 401.
	for _, auth := range []string{"", "Bearer wrong", "Bearer " + token + "x", token, "Basic " + base64.StdEncoding.EncodeToString([]byte("u:"+token))} {
		code, h, b := rawRequest(t, "GET", "http://"+n1.http+"/v1/status", auth, nil)
		if code != http.StatusUnauthorized {
			t.Fatalf("GET /v1/status with Authorization %q: %d %s, want 401", auth, code, b)
		}
		if eb := errorBody(t, "401 answer", h, b); eb.Code != api.CodeUnauthorized {
			t.Errorf("401 answer code %q", eb.Code)
		}
		if h.Get("WWW-Authenticate") == "" {
			t.Errorf("401 answer without WWW-Authenticate")
		}
	}
	if code, _, b := rawRequest(t, "GET", "http://"+n1.http+"/v1/status", "Bearer "+token, nil); code != http.StatusOK {
		t.Fatalf("GET /v1/status with the token: %d %s", code, b)
	}

	// Malformed and oversized writes are refused by every agent, leader or
	// follower, and change nothing.
	count := func() int {
		t.Helper()
		ctx, cancel := ctxFor(20 * time.Second)
		defer cancel()
		ts, _, err := cl.Tickets(ctx, 0, nil)
		if err != nil {
			t.Fatal(err)
		}
		return len(ts)
	}
	before := count()
	big := []byte(`{"parent_vm":1,"n":1,"request_id":"` + strings.Repeat("a", 1<<20) + `"}`)
	for _, a := range c.agents {
		url := "http://" + a.http + "/v1/tickets"
		code, h, b := rawRequest(t, "POST", url, "Bearer "+token, []byte(`{"parent_vm": 1, "n": `))
		if code != http.StatusBadRequest {
			t.Fatalf("malformed JSON to %s: %d %s, want 400", a.spec.name, code, b)
		}
		errorBody(t, "400 answer", h, b)
		code, h, b = rawRequest(t, "POST", url, "Bearer "+token, big)
		if code != http.StatusRequestEntityTooLarge {
			t.Fatalf("%d-byte body to %s: %d %s, want 413", len(big), a.spec.name, code, b)
		}
		if eb := errorBody(t, "413 answer", h, b); eb.Code != api.CodeTooLarge {
			t.Errorf("413 answer code %q", eb.Code)
		}
	}
	if after := count(); after != before {
		t.Fatalf("ticket count went from %d to %d", before, after)
	}

	// An agent with another gossip key must never get into the pool; one
	// with the right key must.
	kg2 := runCLI("keygen")
	if kg2.code != 0 || strings.TrimSpace(kg2.stdout) == key {
		t.Fatalf("second keygen: %v", kg2)
	}
	join := c.gossipAddrs(c.agents...)
	rogue := c.addAgent(agentSpec{name: "rogue", join: join, token: token, key: strings.TrimSpace(kg2.stdout)})
	good := c.addAgent(agentSpec{name: "n4", join: join, token: token, key: key})
	goodSeen := false
	neverWithin(t, 3*time.Second, "the agent with the wrong key appeared in the pool", func() (error, error) {
		ms, err := c.cliMembers(n1)
		if err != nil {
			return nil, err
		}
		if m, ok := findMember(ms, rogue.spec.name); ok {
			return fmt.Errorf("members of n1 list %+v", m), nil
		}
		if m, ok := findMember(ms, good.spec.name); ok && m.Status == "alive" {
			goodSeen = true
		}
		return nil, nil
	})
	if !goodSeen {
		waitFor(t, 30*time.Second, "the agent with the right key in the pool", func() error {
			ms, err := c.cliMembers(n1)
			if err != nil {
				return err
			}
			if m, ok := findMember(ms, good.spec.name); !ok || m.Status != "alive" {
				return fmt.Errorf("members: %+v", ms)
			}
			return nil
		})
	}
	if !rogue.running() {
		t.Fatalf("the agent with the wrong key exited: %v", rogue.proc.err)
	}
	// Nor does the rogue see the pool, or get into raft.
	ms, err := c.cliMembers(rogue)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].Name != rogue.spec.name {
		t.Fatalf("the rogue agent sees members %+v", ms)
	}
	c.waitVoters([]*agent{n1}, "n1", "n2", "n3", "n4")
}

func TestRunUsage(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "d")
	cases := []struct {
		name   string
		args   []string
		want   int
		stderr string // substring of stderr
		stdout string // substring of stdout
	}{
		{name: "no args", args: nil, want: 2, stderr: "Usage: sfcoord"},
		{name: "help", args: []string{"help"}, want: 0, stderr: "Usage: sfcoord"},
		{name: "bogus", args: []string{"bogus"}, want: 2, stderr: "unknown command"},
		{name: "raft", args: []string{"raft"}, want: 2, stderr: "raft needs a subcommand"},
		{name: "raft bogus", args: []string{"raft", "bogus"}, want: 2, stderr: "unknown raft subcommand"},
		{name: "ticket", args: []string{"ticket"}, want: 2, stderr: "ticket show ID"},
		{name: "ticket show x", args: []string{"ticket", "show", "x"}, want: 2, stderr: "not a positive integer"},
		{name: "ticket show 0", args: []string{"ticket", "show", "0"}, want: 2, stderr: "not a positive integer"},
		{name: "agent without data dir", args: []string{"agent"}, want: 2, stderr: "--data-dir is required"},
		{name: "agent bad log level", args: []string{"agent", "--log-level", "nope", "--data-dir", dataDir}, want: 2, stderr: "nope"},
		{name: "agent bad key", args: []string{"agent", "--encrypt", "not-base64!", "--data-dir", dataDir}, want: 2, stderr: "--encrypt"},
		{name: "agent unknown flag", args: []string{"agent", "--bogus"}, want: 2, stderr: "bogus"},
		{name: "agent extra args", args: []string{"agent", "--data-dir", dataDir, "extra"}, want: 2, stderr: "unexpected arguments"},
		{name: "agent help", args: []string{"agent", "--help"}, want: 0, stderr: "--data-dir"},
		{name: "keygen extra", args: []string{"keygen", "extra"}, want: 2, stderr: "no arguments"},
		{name: "members unknown flag", args: []string{"members", "--bogus"}, want: 2, stderr: "bogus"},
		{name: "members help", args: []string{"members", "--help"}, want: 0, stdout: "--addr"},
		{name: "tickets extra args", args: []string{"tickets", "extra", "--addr", "127.0.0.1:1"}, want: 2, stderr: "unexpected arguments"},
		{name: "join without addresses", args: []string{"join", "--addr", "127.0.0.1:1"}, want: 2, stderr: "gossip address"},
		{name: "remove-peer without id", args: []string{"raft", "remove-peer", "--addr", "127.0.0.1:1"}, want: 2, stderr: "--id"},
		{name: "members unreachable", args: []string{"members", "--addr", "127.0.0.1:1", "--timeout", "300ms"}, want: 1, stderr: "sfcoord:"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			done := make(chan cliResult, 1)
			began := time.Now()
			go func() { done <- runCLI(tc.args...) }()
			var r cliResult
			select {
			case r = <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("Run(%q) did not return within 20 s", tc.args)
			}
			if r.code != tc.want {
				t.Fatalf("Run(%q) = %v, want exit %d", tc.args, r, tc.want)
			}
			if !strings.Contains(r.stderr, tc.stderr) || !strings.Contains(r.stdout, tc.stdout) {
				t.Fatalf("Run(%q) = %v, want stderr containing %q and stdout containing %q", tc.args, r, tc.stderr, tc.stdout)
			}
			if d := time.Since(began); d > 10*time.Second {
				t.Errorf("Run(%q) took %s", tc.args, d)
			}
		})
	}
	if _, err := os.Stat(dataDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused agent command created its data dir (%v)", err)
	}

	t.Run("keygen", func(t *testing.T) {
		seen := map[string]bool{}
		for i := 0; i < 2; i++ {
			r := runCLI("keygen")
			if r.code != 0 || r.stderr != "" {
				t.Fatalf("keygen: %v", r)
			}
			line := strings.TrimSuffix(r.stdout, "\n")
			k, err := base64.StdEncoding.DecodeString(line)
			if err != nil || len(k) != 32 || strings.ContainsAny(line, " \n") {
				t.Fatalf("keygen printed %q: %d bytes, %v; want base64 of 32 bytes", r.stdout, len(k), err)
			}
			if _, err := gossip.DecodeKey(line); err != nil {
				t.Fatalf("the agent would refuse keygen's key: %v", err)
			}
			if seen[line] {
				t.Fatalf("keygen printed the same key twice")
			}
			seen[line] = true
		}
	})
}
