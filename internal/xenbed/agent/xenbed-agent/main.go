// Command xenbed-agent is the control agent of a xenbed dom0: the init
// script starts it once the control NIC is up, and the test harness talks
// to it through QEMU's port forward (see package agent). It takes its token
// from the kernel command line (xenbed.token=) and reports dom0 ready once
// the init script wrote "done" to its status file and `xl info` succeeds.
//
//	xenbed-agent [-listen :7700] [-cmdline /proc/cmdline] [-status /run/xenbed/init-status]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/snowflock-go/snowflock/internal/xenbed/agent"
)

func main() {
	os.Exit(Run(os.Args[1:], os.Stderr))
}

// Run serves until SIGTERM or SIGINT and returns the exit status.
func Run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("xenbed-agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", ":"+strconv.Itoa(agent.Port), "address to listen on")
	cmdline := fs.String("cmdline", "/proc/cmdline", "file holding the kernel command line with "+agent.TokenParam+"=")
	status := fs.String("status", "/run/xenbed/init-status", "file where the init script records its progress")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	raw, err := os.ReadFile(*cmdline)
	if err != nil {
		fmt.Fprintln(stderr, "xenbed-agent:", err)
		return 1
	}
	token, err := tokenFromCmdline(string(raw))
	if err != nil {
		fmt.Fprintln(stderr, "xenbed-agent:", err)
		return 1
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(stderr, "xenbed-agent:", err)
		return 1
	}
	srv := &http.Server{
		Handler:           (&agent.Server{Token: token, Status: dom0Status(*status)}).Handler(),
		ReadHeaderTimeout: 10 * time.Second,
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Fprintln(stderr, "xenbed-agent: listening on", ln.Addr())
	select {
	case err := <-served:
		fmt.Fprintln(stderr, "xenbed-agent:", err)
		return 1
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		fmt.Fprintln(stderr, "xenbed-agent: shutdown:", err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(stderr, "xenbed-agent:", err)
	}
	return 0
}

// tokenFromCmdline finds xenbed.token=<token> among the kernel parameters.
func tokenFromCmdline(cmdline string) (string, error) {
	for _, f := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(f, agent.TokenParam+"="); ok {
			if len(v) < 16 {
				return "", fmt.Errorf("%s is too short (%d characters, want 16 or more)", agent.TokenParam, len(v))
			}
			return v, nil
		}
	}
	return "", fmt.Errorf("no %s= on the kernel command line", agent.TokenParam)
}

// dom0Status reports ready once the init script is done and the toolstack
// answers.
func dom0Status(statusFile string) func(context.Context) agent.Status {
	return func(ctx context.Context) agent.Status {
		raw, err := os.ReadFile(statusFile)
		if err != nil {
			return agent.Status{Init: "unknown", Detail: err.Error()}
		}
		init := strings.TrimSpace(string(raw))
		if init != "done" {
			return agent.Status{Init: init, Detail: "init script has not finished"}
		}
		res := agent.Run(ctx, agent.Command{Argv: []string{"xl", "info"}, Timeout: 30 * time.Second})
		if res.ExitCode != 0 {
			return agent.Status{Init: init, Detail: fmt.Sprintf("xl info: exit %d %s%s", res.ExitCode, res.StartError, strings.TrimSpace(string(res.Stderr)))}
		}
		return agent.Status{Ready: true, Init: init}
	}
}
