package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
)

// Client talks to one agent. It is safe for concurrent use.
type Client struct {
	base  string // http://host:port
	token string
	http  *http.Client
}

// NewClient returns a client of the agent at addr (host:port).
func NewClient(addr, token string) *Client {
	return &Client{
		base:  "http://" + addr,
		token: token,
		// Deadlines come from the callers' contexts; a file transfer
		// through QEMU's slirp may take a while.
		http: &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true}},
	}
}

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

func (c *Client) do(ctx context.Context, method, path string, q url.Values, body io.Reader, size int64) (*http.Response, error) {
	u := c.base + path
	if q != nil {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.ContentLength = size
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("agent: %s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode == http.StatusUnauthorized {
			return nil, fmt.Errorf("%w: %s %s", ErrUnauthorized, method, path)
		}
		return nil, fmt.Errorf("agent: %s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(msg))
	}
	return resp, nil
}

func (c *Client) doJSON(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	size := int64(0)
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, size = bytes.NewReader(b), int64(len(b))
	}
	resp, err := c.do(ctx, method, path, nil, body, size)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("agent: %s %s: reading the answer: %w", method, path, err)
	}
	return nil
}

// Run runs cmd in dom0 and returns how it ended. The error reports only a
// failure to reach the agent; check Result for the command's own outcome.
func (c *Client) Run(ctx context.Context, cmd Command) (Result, error) {
	var res Result
	err := c.doJSON(ctx, http.MethodPost, "/v1/run", cmd, &res)
	return res, err
}

// Status asks the agent whether dom0 is ready.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.doJSON(ctx, http.MethodGet, "/v1/ready", nil, &st)
	return st, err
}

// Put copies the local file to remote (an absolute path in dom0), keeping
// its permission bits. Missing directories are created.
func (c *Client) Put(ctx context.Context, local, remote string) error {
	f, err := os.Open(local)
	if err != nil {
		return fmt.Errorf("agent: put: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("agent: put: %w", err)
	}
	return c.PutReader(ctx, f, fi.Size(), remote, fi.Mode().Perm())
}

// PutReader writes size bytes from r to remote with mode perm.
func (c *Client) PutReader(ctx context.Context, r io.Reader, size int64, remote string, perm os.FileMode) error {
	q := url.Values{"path": {remote}, "mode": {strconv.FormatUint(uint64(perm.Perm()), 8)}}
	resp, err := c.do(ctx, http.MethodPut, "/v1/file", q, io.LimitReader(r, size), size)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// Get copies remote (an absolute path in dom0) to the local file, keeping
// its permission bits. The local file appears only once complete.
func (c *Client) Get(ctx context.Context, remote, local string) error {
	resp, err := c.do(ctx, http.MethodGet, "/v1/file", url.Values{"path": {remote}}, nil, 0)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	perm, err := strconv.ParseUint(resp.Header.Get("X-File-Mode"), 8, 32)
	if err != nil {
		perm = 0o644
	}
	f, err := os.CreateTemp(filepath.Dir(local), "."+filepath.Base(local)+".part-*")
	if err != nil {
		return fmt.Errorf("agent: get: %w", err)
	}
	defer os.Remove(f.Name()) // no-op after the rename
	n, err := io.Copy(f, resp.Body)
	if err == nil && resp.ContentLength >= 0 && n != resp.ContentLength {
		err = fmt.Errorf("short transfer: %d of %d bytes", n, resp.ContentLength)
	}
	if err == nil {
		err = f.Chmod(os.FileMode(perm))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("agent: get %s: %w", remote, err)
	}
	if err := os.Rename(f.Name(), local); err != nil {
		return fmt.Errorf("agent: get: %w", err)
	}
	return nil
}
