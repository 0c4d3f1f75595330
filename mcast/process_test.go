package mcast

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// helperEnv carries a helper member's config to the test binary run again
// in a host's namespace.
const helperEnv = "MCAST_TEST_HELPER"

type helperConfig struct {
	Local, Group, Member, Key string
	Session                   uint64
}

// TestHelperReceiver is not a test: it is a member process for
// TestMemberProcesses. It prints READY, then OBJECT id sha256 for each
// object and END error at the end of the session.
func TestHelperReceiver(t *testing.T) {
	env := os.Getenv(helperEnv)
	if env == "" {
		t.Skip("runs only as a helper process")
	}
	var hc helperConfig
	if err := json.Unmarshal([]byte(env), &hc); err != nil {
		t.Fatal(err)
	}
	var key [32]byte
	hex.Decode(key[:], []byte(hc.Key))
	r, err := NewReceiver(ReceiverConfig{LocalAddr: netip.MustParseAddr(hc.Local), Group: netip.MustParseAddrPort(hc.Group),
		SessionID: hc.Session, MemberID: hc.Member, Key: key, IdleTimeout: 20 * time.Second})
	if err != nil {
		fmt.Printf("END %v\n", err)
		return
	}
	defer r.Close()
	fmt.Println("READY")
	for {
		o, err := r.Receive(context.Background())
		if err != nil {
			if errors.Is(err, ErrEvicted) {
				fmt.Println("END evicted")
			} else {
				fmt.Printf("END %v\n", err)
			}
			return
		}
		fmt.Printf("OBJECT %d %x\n", o.ID, sha256.Sum256(o.Data))
	}
}

// memberProcess is a helper member running in a host's namespace.
type memberProcess struct {
	cmd   *exec.Cmd
	lines chan string
}

func startMember(t *testing.T, ctx context.Context, s *session, host int, ip, ns string) *memberProcess {
	t.Helper()
	hc, _ := json.Marshal(helperConfig{Local: ip, Group: s.group.String(), Member: s.ids[host], Key: hex.EncodeToString(s.key[:]), Session: s.id})
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, os.Args[0], "-test.run=^TestHelperReceiver$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(hc))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &memberProcess{cmd: cmd, lines: make(chan string, 16)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // ends when the process's stdout closes
		defer wg.Done()
		defer close(p.lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if l := sc.Text(); strings.HasPrefix(l, "READY") || strings.HasPrefix(l, "OBJECT") || strings.HasPrefix(l, "END") {
				p.lines <- l
			}
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGCONT)
		cmd.Process.Kill()
		wg.Wait()
		cmd.Wait()
	})
	return p
}

func (p *memberProcess) expect(t *testing.T, prefix string, d time.Duration) string {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("member process ended before %s", prefix)
			}
			if strings.HasPrefix(l, prefix) {
				return l
			}
			t.Logf("member process: %s", l)
		case <-timer.C:
			t.Fatalf("no %s from the member process within %v", prefix, d)
		}
	}
}

// TestMemberProcesses runs members as processes in their own namespaces:
// one is killed mid-transfer, one stopped (SIGSTOP) mid-transfer. The
// sender evicts both and completes with the third, which holds the object
// intact; the stopped one, continued, learns it was evicted.
func TestMemberProcesses(t *testing.T) {
	bed := newBed(t, 3)
	s := newSession(t, bed, sessionOpts{absent: 3, stall: 500 * time.Millisecond,
		senderCfg: func(c *SenderConfig) { c.Rate = 40 << 20 }})
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	var procs []*memberProcess
	for i, h := range bed.Hosts {
		procs = append(procs, startMember(t, ctx, s, i, h.IP, h.Name))
	}
	for _, p := range procs {
		p.expect(t, "READY", 20*time.Second)
	}
	data := payload(16<<20, 9)
	type result struct {
		rep Report
		err error
	}
	res := make(chan result, 1)
	go func() {
		rep, err := s.sender.Send(ctx, 1, data)
		res <- result{rep, err}
	}()
	frags := uint64(len(data) / s.sender.FragmentSize())
	waitFor(t, 20*time.Second, "quarter of the object sent", func() bool { return s.sender.Stats().DataPackets > frags/4 })
	if err := procs[1].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := procs[2].cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	r := <-res
	if r.err != nil {
		t.Fatalf("send: %v", r.err)
	}
	if !slices.Equal(r.rep.Completed, s.ids[:1]) || !slices.Equal(slices.Sorted(slices.Values(r.rep.Evicted)), s.ids[1:]) {
		t.Fatalf("completed %v, evicted %v", r.rep.Completed, r.rep.Evicted)
	}
	want := fmt.Sprintf("OBJECT 1 %x", sha256.Sum256(data))
	if got := procs[0].expect(t, "OBJECT", 10*time.Second); got != want {
		t.Errorf("member 1: %q, want %q", got, want)
	}
	if err := procs[2].cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if got := procs[2].expect(t, "END", 10*time.Second); got != "END evicted" {
		t.Errorf("stopped member: %q, want END evicted", got)
	}
	s.sender.Close()
	if got := procs[0].expect(t, "END", 10*time.Second); !strings.Contains(got, "closed the session") {
		t.Errorf("member 1 at close: %q", got)
	}
	t.Logf("send took %v; stats %+v", r.rep.Duration, r.rep.Stats)
}
