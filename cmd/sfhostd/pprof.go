package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"time"

	"github.com/hashicorp/go-hclog"
)

// parsePprofAddr validates --pprof-addr: profiles carry no authentication,
// so they are served on a loopback address only.
func parsePprofAddr(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil || !ap.Addr().IsLoopback() {
		return netip.AddrPort{}, usagef("agent: --pprof-addr must be a loopback address and port, like 127.0.0.1:6060")
	}
	return ap, nil
}

// servePprof serves Go's runtime profiles (/debug/pprof/) on addr until
// the returned stop is called.
func servePprof(ctx context.Context, addr netip.AddrPort, log hclog.Logger) (net.Addr, func(), error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr.String())
	if err != nil {
		return nil, nil, fmt.Errorf("--pprof-addr: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("profile server stopped", "error", err)
		}
	}()
	log.Info("serving runtime profiles", "addr", ln.Addr().String())
	return ln.Addr(), func() { srv.Close(); <-done }, nil
}
