package cluster

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// Host is one sfhostd process.
type Host struct {
	ID, DataDir, LogPath string
	APIAddr, GossipAddr  string
	MemserverAddr        string
	// Wrap prefixes the daemon's command line, e.g. ip netns exec NAME
	// (which execs, so the process is still the daemon's).
	Wrap   []string
	cmd    *exec.Cmd
	exited chan struct{}
}

// Running reports whether the host daemon's process is alive.
func (h *Host) Running() bool {
	if h.cmd == nil {
		return false
	}
	select {
	case <-h.exited:
		return false
	default:
		return true
	}
}

// PID is the daemon's process ID.
func (h *Host) PID() int { return h.cmd.Process.Pid }

// StartHost starts an sfhostd agent that joins the cluster. extra flags are
// appended (e.g. --sfguest, --image-cache, --slots).
func (c *Cluster) StartHost(bin, id string, extra ...string) (*Host, error) {
	h := &Host{ID: id, DataDir: filepath.Join(c.Dir, id), LogPath: filepath.Join(c.Dir, id+".log")}
	var err error
	if h.APIAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	if h.GossipAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	if h.MemserverAddr, err = freeAddr(); err != nil {
		return nil, err
	}
	return h, c.RestartHost(bin, h, extra...)
}

// StartHostIn starts an sfhostd agent in a network namespace: its
// addresses are ip with fixed ports (the namespace has its own), it
// multicasts on ip's interface, and its command runs under ip netns exec.
func (c *Cluster) StartHostIn(bin, id, netns, ip string, extra ...string) (*Host, error) {
	h := &Host{ID: id, DataDir: filepath.Join(c.Dir, id), LogPath: filepath.Join(c.Dir, id+".log"),
		APIAddr: ip + ":7500", GossipAddr: ip + ":7946", MemserverAddr: ip + ":7501",
		Wrap: []string{"ip", "netns", "exec", netns}}
	// Namespaced hosts share a bridge: they multicast on it.
	return h, c.RestartHost(bin, h, append([]string{"--mcast-addr", ip}, extra...)...)
}

// RestartHost starts h's daemon again with the same addresses and data dir.
func (c *Cluster) RestartHost(bin string, h *Host, extra ...string) error {
	args := []string{"agent", "--node-id", h.ID, "--data-dir", h.DataDir, "--api-addr", h.APIAddr,
		"--gossip-addr", h.GossipAddr, "--memserver-addr", h.MemserverAddr, "--log-level", "info"}
	for _, a := range c.Agents {
		args = append(args, "--join", a.GossipAddr, "--coordinator", a.HTTPAddr)
	}
	if c.Token != "" {
		args = append(args, "--token", c.Token)
	}
	if c.Key != "" {
		args = append(args, "--encrypt", c.Key)
	}
	args = append(args, extra...)
	logf, err := os.OpenFile(h.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	argv := append(append(append([]string(nil), h.Wrap...), bin), args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "SF_TOKEN=", "SF_ENCRYPT=")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start host %s: %w", h.ID, err)
	}
	h.cmd, h.exited = cmd, make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { // owned by the process: ends when it exits
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}(cmd, h.exited)
	return nil
}

// KillHost sends SIGKILL to the daemon only (not its process group, so that
// a test can check that its VMs die with it) and waits for it to die.
func (c *Cluster) KillHost(h *Host) {
	if !h.Running() {
		return
	}
	_ = h.cmd.Process.Kill()
	<-h.exited
}

// StopHost asks the daemon to shut down (SIGTERM) and waits.
func (c *Cluster) StopHost(h *Host) {
	if !h.Running() {
		return
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	<-h.exited
}

// Get reads a path of the host's API (with the bearer token, if any).
func (h *Host) Get(ctx context.Context, path, token string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+h.APIAddr+path, nil)
	if err != nil {
		return "", err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s %s: %s %s", h.ID, path, resp.Status, b)
	}
	return string(b), err
}
