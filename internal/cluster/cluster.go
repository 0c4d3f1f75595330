// Package cluster runs real `sfcoord agent` processes on 127.0.0.1 for
// benchmarks and tests: fixed ports per agent (so a restarted agent comes
// back where its peers expect it), one data dir each, kill -9 and restart,
// leader lookup over the API. Every process is in its own process group and
// dies with Stop, or with this process (PDEATHSIG).
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/snowflock-go/snowflock/api"
)

// Agent is one sfcoord agent process.
type Agent struct {
	ID, DataDir, LogPath           string
	RaftAddr, HTTPAddr, GossipAddr string
	cmd                            *exec.Cmd
	exited                         chan struct{}
}

// Running reports whether the agent's process is alive.
func (a *Agent) Running() bool {
	if a.cmd == nil {
		return false
	}
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

// Cluster is a set of agents.
type Cluster struct {
	Bin    string // path to the sfcoord binary
	Dir    string // parent of the data dirs and logs
	Token  string
	Key    string // gossip key
	Agents []*Agent
	mu     sync.Mutex
}

// FreePort returns a port that is free for both TCP and UDP on 127.0.0.1.
func FreePort() (int, error) { return freePortOn("127.0.0.1") }

func freePortOn(ip string) (int, error) {
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort(ip, strconv.Itoa(port)))
		l.Close()
		if err == nil {
			u.Close()
			return port, nil
		}
	}
	return 0, errors.New("no free port")
}

func freeAddr() (string, error) { return freeAddrOn("127.0.0.1") }

func freeAddrOn(ip string) (string, error) {
	p, err := freePortOn(ip)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(ip, strconv.Itoa(p)), nil
}

// New prepares n agents (not started) on 127.0.0.1 that bootstrap with
// --bootstrap-expect n.
func New(bin, dir string, n int, token, key string) (*Cluster, error) {
	return NewOn(bin, dir, n, token, key, "127.0.0.1")
}

// NewOn is New with the agents listening on ip (a test bed's bridge
// address, so that hosts in network namespaces reach them).
func NewOn(bin, dir string, n int, token, key, ip string) (*Cluster, error) {
	c := &Cluster{Bin: bin, Dir: dir, Token: token, Key: key}
	freeAddr := func() (string, error) { return freeAddrOn(ip) }
	for i := 0; i < n; i++ {
		a := &Agent{ID: fmt.Sprintf("c%d", i+1), DataDir: filepath.Join(dir, fmt.Sprintf("c%d", i+1)),
			LogPath: filepath.Join(dir, fmt.Sprintf("c%d.log", i+1))}
		var err error
		if a.RaftAddr, err = freeAddr(); err != nil {
			return nil, err
		}
		if a.HTTPAddr, err = freeAddr(); err != nil {
			return nil, err
		}
		if a.GossipAddr, err = freeAddr(); err != nil {
			return nil, err
		}
		c.Agents = append(c.Agents, a)
	}
	return c, nil
}

// Start starts (or restarts) agent i.
func (c *Cluster) Start(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.Agents[i]
	if a.Running() {
		return fmt.Errorf("agent %s already running", a.ID)
	}
	args := []string{"agent", "--node-id", a.ID, "--data-dir", a.DataDir, "--raft-addr", a.RaftAddr,
		"--http-addr", a.HTTPAddr, "--gossip-addr", a.GossipAddr, "--bootstrap-expect", strconv.Itoa(len(c.Agents)),
		"--log-level", "warn"}
	for j, o := range c.Agents {
		if j != i {
			args = append(args, "--join", o.GossipAddr)
		}
	}
	if c.Token != "" {
		args = append(args, "--token", c.Token)
	}
	if c.Key != "" {
		args = append(args, "--encrypt", c.Key)
	}
	logf, err := os.OpenFile(a.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(c.Bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "SF_TOKEN=", "SF_ENCRYPT=")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", a.ID, err)
	}
	a.cmd, a.exited = cmd, make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { // owned by the process: ends when it exits
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}(cmd, a.exited)
	return nil
}

// StartAll starts every agent.
func (c *Cluster) StartAll() error {
	for i := range c.Agents {
		if err := c.Start(i); err != nil {
			return err
		}
	}
	return nil
}

// Kill sends SIGKILL to agent i and waits for it to die.
func (c *Cluster) Kill(i int) {
	a := c.Agents[i]
	if !a.Running() {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	<-a.exited
}

// Stop kills every agent.
func (c *Cluster) Stop() {
	for i := range c.Agents {
		c.Kill(i)
	}
}

// Client returns an API client for the given agents (all when none given).
func (c *Cluster) Client(only ...int) *api.Client {
	var addrs []string
	if len(only) == 0 {
		for _, a := range c.Agents {
			addrs = append(addrs, a.HTTPAddr)
		}
	}
	for _, i := range only {
		addrs = append(addrs, c.Agents[i].HTTPAddr)
	}
	cl, _ := api.NewClient(api.Config{Addrs: addrs, Token: c.Token, RetryFor: 10 * time.Second})
	return cl
}

// Leader returns the index of the agent that leads with every given number
// of voters, waiting until ctx ends.
func (c *Cluster) Leader(ctx context.Context, voters int) (int, error) {
	for {
		for i, a := range c.Agents {
			if !a.Running() {
				continue
			}
			cl, _ := api.NewClient(api.Config{Addrs: []string{a.HTTPAddr}, Token: c.Token, RetryFor: 200 * time.Millisecond})
			qctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			st, err := cl.Status(qctx)
			cancel()
			if err == nil && st.State == "Leader" && st.Peers == voters {
				return i, nil
			}
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("no leader with %d voters: %w", voters, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// CaughtUp waits until every running agent has applied at least index.
func (c *Cluster) CaughtUp(ctx context.Context, index uint64) error {
	for i, a := range c.Agents {
		if !a.Running() {
			continue
		}
		cl := c.Client(i)
		for {
			st, err := cl.Status(ctx)
			if err == nil && st.AppliedIndex >= index {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("agent %s did not catch up to %d: %w", a.ID, index, ctx.Err())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return nil
}
