package agent

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// waitDelay is how long a finished command's output pipes may stay open: a
// daemon started by the command (sfhostd &) inherits them and would
// otherwise hold the request forever.
const waitDelay = 2 * time.Second

// Server answers the agent protocol. Its fields must not change once it
// serves.
type Server struct {
	// Token is the secret every request must present.
	Token string
	// Status reports dom0's readiness for GET /v1/ready; nil reports Ready
	// without checking anything.
	Status func(ctx context.Context) Status
}

// Handler returns the HTTP handler of the protocol.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/run", s.handleRun)
	mux.HandleFunc("PUT /v1/file", s.handlePut)
	mux.HandleFunc("GET /v1/file", s.handleGet)
	mux.HandleFunc("GET /v1/ready", s.handleReady)
	return s.authenticate(mux)
}

func (s *Server) authenticate(next http.Handler) http.Handler {
	want := []byte("Bearer " + s.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if s.Token == "" || subtle.ConstantTimeCompare(got, want) != 1 {
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) handleRun(w http.ResponseWriter, r *http.Request) {
	var c Command
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<30)).Decode(&c); err != nil {
		http.Error(w, "bad command: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(c.Argv) == 0 {
		http.Error(w, "bad command: empty argv", http.StatusBadRequest)
		return
	}
	writeJSON(w, Run(r.Context(), c))
}

// Run runs c and waits for it. ctx ending kills it like its timeout does.
func Run(ctx context.Context, c Command) Result {
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.Argv[0], c.Argv[1:]...)
	cmd.Dir = c.Dir
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	cmd.Env = append(os.Environ(), c.Env...)
	cmd.Stdin = bytes.NewReader(c.Stdin)
	stdout, stderr := &cappedBuffer{max: MaxOutput}, &cappedBuffer{max: MaxOutput}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// The whole group: xl forks helpers that would keep running.
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	cmd.WaitDelay = waitDelay

	start := time.Now()
	err := cmd.Run()
	res := Result{ExitCode: -1, Duration: time.Since(start)}
	if cmd.ProcessState != nil {
		res.ExitCode = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			res.Signal = ws.Signal().String()
		}
	}
	var exitErr *exec.ExitError
	if err != nil && cmd.ProcessState == nil {
		res.StartError = err.Error() // not found, not executable, bad Dir
	} else if err != nil && !errors.As(err, &exitErr) && !errors.Is(err, exec.ErrWaitDelay) {
		res.StartError = err.Error() // copying output failed
	}
	res.TimedOut = errors.Is(ctx.Err(), context.DeadlineExceeded) && res.ExitCode == -1
	res.Stdout, res.Stderr = stdout.buf.Bytes(), stderr.buf.Bytes()
	res.Truncated = stdout.dropped || stderr.dropped
	return res
}

// cappedBuffer keeps the first max bytes written to it and drops the rest,
// so a chatty command cannot exhaust dom0's memory.
type cappedBuffer struct {
	buf     bytes.Buffer
	max     int
	dropped bool
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.buf.Len(); len(p) > room {
		b.buf.Write(p[:max(room, 0)])
		b.dropped = true
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (s *Server) handlePut(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Query().Get("path")
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		http.Error(w, fmt.Sprintf("bad path %q: want a clean absolute path", path), http.StatusBadRequest)
		return
	}
	mode, err := strconv.ParseUint(r.URL.Query().Get("mode"), 8, 32)
	if err != nil || mode&^0o7777 != 0 {
		http.Error(w, "bad mode", http.StatusBadRequest)
		return
	}
	if err := writeFile(path, os.FileMode(mode), r.Body); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// writeFile writes path through a temporary file, so that a broken upload
// never leaves a partial file under the real name.
func writeFile(path string, mode os.FileMode, r io.Reader) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".part-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // no-op after the rename
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func (s *Server) handleGet(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Query().Get("path")
	if !filepath.IsAbs(path) {
		http.Error(w, fmt.Sprintf("bad path %q: want an absolute path", path), http.StatusBadRequest)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, os.ErrNotExist) {
			code = http.StatusNotFound
		}
		http.Error(w, err.Error(), code)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		http.Error(w, fmt.Sprintf("%s is not a regular file", path), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Length", strconv.FormatInt(fi.Size(), 10))
	w.Header().Set("X-File-Mode", strconv.FormatUint(uint64(fi.Mode().Perm()), 8))
	io.Copy(w, f) // a failure shows as a short body, which the client checks
}

func (s *Server) handleReady(w http.ResponseWriter, r *http.Request) {
	st := Status{Ready: true, Init: "done"}
	if s.Status != nil {
		st = s.Status(r.Context())
	}
	writeJSON(w, st)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v) // the client sees a truncated body as an error
}
