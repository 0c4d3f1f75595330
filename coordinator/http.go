package coordinator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/snowflock-go/snowflock/api"
	"github.com/snowflock-go/snowflock/fsm"
)

const (
	maxBody      = 1 << 20
	hdrIndex     = "X-Index"
	hdrForwarded = "X-Sf-Forwarded-By"
	maxWait      = 10 * time.Minute
	defaultWait  = 5 * time.Minute
)

func (s *Server) startHTTPListener() error {
	ln, err := net.Listen("tcp", s.cfg.HTTPAddr)
	if err != nil {
		return fmt.Errorf("coordinator: http listen: %w", err)
	}
	if s.cfg.HTTPAdvertise == "" {
		if ip := ln.Addr().(*net.TCPAddr).IP; ip.IsUnspecified() {
			ln.Close()
			return fmt.Errorf("coordinator: http address %s is unspecified; give an advertise address", s.cfg.HTTPAddr)
		}
	}
	s.ln = ln
	return nil
}

func (s *Server) startHTTP() {
	s.http = &http.Server{
		Handler:           s.middleware(s.routes()),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          s.log.Named("http").StandardLogger(nil),
	}
	s.goRun(func() {
		if err := s.http.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", "error", err)
		}
	})
}

// middleware authenticates, caps bodies and records metrics.
func (s *Server) middleware(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		defer func() {
			route := r.Pattern
			if route == "" {
				route = "unmatched"
			}
			s.mx.observeRequest(route, sw.code, time.Since(start))
		}()
		if s.cfg.Token != "" {
			if !api.TokenMatches(r.Header.Get("Authorization"), s.cfg.Token) {
				sw.Header().Set("WWW-Authenticate", `Bearer realm="snowflock"`)
				writeError(sw, http.StatusUnauthorized, api.CodeUnauthorized, "missing or wrong bearer token")
				return
			}
		}
		r.Body = http.MaxBytesReader(sw, r.Body, maxBody)
		next.ServeHTTP(sw, r)
	})
}

type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func writeJSON(w http.ResponseWriter, status int, index uint64, v interface{}) {
	w.Header().Set("Content-Type", "application/json")
	if index > 0 {
		w.Header().Set(hdrIndex, strconv.FormatUint(index, 10))
	}
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, 0, api.ErrorBody{Error: msg, Code: code})
}

// writeErr maps an error from the FSM or raft to a status and code.
func writeErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, errNotLeader):
		writeError(w, http.StatusServiceUnavailable, api.CodeNotLeader, err.Error())
		return
	case errors.Is(err, errUnknownOutcome):
		writeError(w, http.StatusServiceUnavailable, api.CodeUnknownOutcome, err.Error())
		return
	}
	code := fsm.Code(err)
	status := http.StatusInternalServerError
	switch code {
	case "invalid", "malformed", "unknown_command":
		status = http.StatusBadRequest
	case "not_found":
		status = http.StatusNotFound
	case "not_parent", "not_clone":
		status = http.StatusForbidden
	case "no_capacity", "bad_state", "disposed", "clones_running":
		status = http.StatusConflict
	}
	writeError(w, status, code, err.Error())
}

// readBody reads the (capped) request body, answering 413 or 400 itself.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			writeError(w, http.StatusRequestEntityTooLarge, api.CodeTooLarge, fmt.Sprintf("body larger than %d bytes", maxBody))
		} else {
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, "reading body: "+err.Error())
		}
		return nil, false
	}
	return b, true
}

// decodeBody parses exactly one JSON object with only known fields.
func decodeBody(w http.ResponseWriter, r *http.Request, v interface{}) bool {
	b, ok := readBody(w, r)
	if !ok {
		return false
	}
	if err := decodeJSON(b, v); err != nil {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, err.Error())
		return false
	}
	return true
}

// decodeJSON is the API's request decoder: one object, known fields only,
// nothing after it.
func decodeJSON(b []byte, v interface{}) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("bad JSON body: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("bad JSON body: trailing data after the object")
	}
	return nil
}

func pathID(w http.ResponseWriter, r *http.Request) (uint64, bool) {
	id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
	if err != nil || id == 0 {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("id %q is not a positive integer", r.PathValue("id")))
		return 0, false
	}
	return id, true
}

func queryUint(w http.ResponseWriter, r *http.Request, name string) (uint64, bool) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return 0, true
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("query %s=%q is not an unsigned integer", name, v))
		return 0, false
	}
	return n, true
}

// viaLeader runs h on the leader. On a follower the request is forwarded to
// the leader's API; while there is no leader it is held up to holdTime. With
// read set, ?stale requests are served locally and others on the leader after
// confirming leadership and catching up (a linearizable read).
func (s *Server) viaLeader(read bool, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if read && r.URL.Query().Has("stale") {
			h(w, r)
			return
		}
		body, ok := readBody(w, r)
		if !ok {
			return
		}
		deadline := time.Now().Add(holdTime)
		for {
			changed := s.leaderChanged()
			if s.IsLeader() {
				if !read || s.verifyRead(r.Context()) == nil {
					r.Body = io.NopCloser(bytes.NewReader(body))
					h(w, r)
					return
				}
			} else if r.Header.Get(hdrForwarded) != "" {
				writeError(w, http.StatusServiceUnavailable, api.CodeNotLeader, "forwarded request reached a node that is not the leader")
				return
			} else if addr := s.leaderHTTP(); addr != "" && addr != s.HTTPAddr() {
				if s.forward(w, r, addr, body) {
					return
				}
			}
			left := time.Until(deadline)
			if left <= 0 {
				writeError(w, http.StatusServiceUnavailable, api.CodeNoLeader, fmt.Sprintf("no leader within %s", holdTime))
				return
			}
			select {
			case <-changed:
			case <-time.After(min(left, 50*time.Millisecond)):
			case <-r.Context().Done():
				return
			case <-s.stop:
				writeError(w, http.StatusServiceUnavailable, api.CodeNoLeader, "coordinator shutting down")
				return
			}
		}
	}
}

// verifyRead makes a read linearizable: it commits a raft barrier, which
// succeeds only while this node still leads a quorum and returns once the FSM
// has applied every entry before it. Raft never gives no-op or barrier
// entries to the FSM, so comparing the FSM's index with the commit index
// would not do. Concurrent readers share one barrier: a reader joins the
// batch that has not yet been issued, so its read began before the barrier.
func (s *Server) verifyRead(ctx context.Context) error {
	s.readMu.Lock()
	b := s.readBatch
	if b == nil {
		b = &readBarrier{done: make(chan struct{})}
		s.readBatch = b
		go func() {
			s.barrierSem <- struct{}{} // one barrier in flight; this batch fills meanwhile
			s.readMu.Lock()
			s.readBatch = nil // later readers form the next batch
			s.readMu.Unlock()
			b.err = s.raft.Barrier(applyTimeout).Error()
			<-s.barrierSem
			close(b.done)
		}()
	}
	s.readMu.Unlock()
	select {
	case <-b.done:
		return b.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

type readBarrier struct {
	done chan struct{}
	err  error
}

// forward relays the request to the leader. It returns false, having written
// nothing, when the leader could not be reached or was not the leader any
// more, so that the caller may wait and try again.
func (s *Server) forward(w http.ResponseWriter, r *http.Request, addr string, body []byte) bool {
	req, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+addr+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		return false
	}
	for _, h := range []string{"Authorization", "Content-Type"} {
		if v := r.Header.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	req.Header.Set(hdrForwarded, s.cfg.NodeID)
	resp, err := s.fwd.Do(req)
	if err != nil {
		s.log.Debug("forward to leader failed", "leader", addr, "error", err)
		return false
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusServiceUnavailable {
		var eb api.ErrorBody
		if json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&eb) == nil &&
			(eb.Code == api.CodeNotLeader || eb.Code == api.CodeNoLeader) {
			return false
		}
		writeError(w, resp.StatusCode, eb.Code, eb.Error)
		return true
	}
	for _, h := range []string{"Content-Type", hdrIndex} {
		if v := resp.Header.Get(h); v != "" {
			w.Header().Set(h, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
	return true
}

// blocking answers a read, Consul-style: with ?index=N it waits until the
// query's index exceeds N or ?wait (default 5m, at most 10m) runs out.
func (s *Server) blocking(w http.ResponseWriter, r *http.Request, query func() (interface{}, uint64, error)) {
	minIndex, ok := queryUint(w, r, "index")
	if !ok {
		return
	}
	wait := defaultWait
	if v := r.URL.Query().Get("wait"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Sprintf("wait=%q is not a duration", v))
			return
		}
		wait = min(d, maxWait)
	}
	var timeout <-chan time.Time
	if minIndex > 0 {
		// Jitter spreads the wake-ups of many watchers that started together.
		t := time.NewTimer(wait + time.Duration(rand.Int64N(int64(wait/16)+1)))
		defer t.Stop()
		timeout = t.C
	}
	for {
		ch, _ := s.fsm.Watch()
		v, idx, err := query()
		if err != nil {
			writeErr(w, err)
			return
		}
		if minIndex == 0 || idx > minIndex {
			writeJSON(w, http.StatusOK, idx, v)
			return
		}
		select {
		case <-ch:
		case <-timeout:
			minIndex = 0 // answer with what is there now
		case <-r.Context().Done():
			return
		case <-s.stop:
			writeError(w, http.StatusServiceUnavailable, api.CodeNoLeader, "coordinator shutting down")
			return
		}
	}
}
