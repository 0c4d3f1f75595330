package qemuctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/qemuctl/internal/qemutest"
	"github.com/snowflock-go/snowflock/qemuctl/qmp"
)

// The test binary doubles as a stand-in host daemon: with helperEnv set,
// TestMain starts one VM from the environment's settings, prints its pid and
// blocks until killed.
const helperEnv = "QEMUCTL_TEST_HOSTD"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelperDaemon())
	}
	os.Exit(m.Run())
}

func runHelperDaemon() int {
	cfg := Config{
		ID:     os.Getenv(helperEnv),
		Binary: os.Getenv("QEMUCTL_TEST_BINARY"),
		MemMB:  64,
		RunDir: os.Getenv("QEMUCTL_TEST_RUNDIR"),
		RAMDir: os.Getenv("QEMUCTL_TEST_RAMDIR"),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	vm, err := Start(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	fmt.Printf("qemu %d\n", vm.PID())
	io.Copy(io.Discard, os.Stdin) // the test never closes it
	return 0
}

// pidfdWait waits for pid to exit, through a pidfd opened beforehand.
func pidfdWait(t *testing.T, pidfd int, d time.Duration) bool {
	t.Helper()
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	deadline := time.Now().Add(d)
	for {
		n, err := unix.Poll(fds, max(0, int(time.Until(deadline).Milliseconds())))
		switch {
		case err == nil && n > 0:
			return true
		case err != nil && !errors.Is(err, unix.EINTR):
			t.Fatal(err)
		case time.Now().After(deadline):
			return false
		}
	}
}

// A host daemon killed with SIGKILL takes its QEMU with it (parent-death
// signal), and Reap then removes what the VM left behind.
func TestHostDaemonCrash(t *testing.T) {
	bin := qemutest.RequireQEMU(t)
	runRoot, rams := t.TempDir(), ramDir(t)
	// Become the orphaned QEMU's new parent, to reap it: PID 1 of a
	// container may not.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=crashvm", "QEMUCTL_TEST_BINARY="+bin,
		"QEMUCTL_TEST_RUNDIR="+filepath.Join(runRoot, "crashvm"), "QEMUCTL_TEST_RAMDIR="+rams)
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	defer stdin.Close()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		cmd.Wait()
		t.Fatalf("helper daemon: %q, %v", line, err)
	}
	pid, err := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(line), "qemu "))
	if err != nil {
		t.Fatalf("helper daemon said %q", line)
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	if _, pgid, err := procStat(pid); err != nil || pgid != pid {
		t.Errorf("QEMU's process group %d (%v), want its own (%d)", pgid, err, pid)
	}

	cmd.Process.Kill()
	cmd.Wait()
	died := pidfdWait(t, pidfd, 10*time.Second)
	if !died {
		unix.Kill(pid, unix.SIGKILL)
	}
	unix.Wait4(pid, nil, 0, nil)
	if !died {
		t.Fatal("QEMU outlived its host daemon")
	}

	ram := filepath.Join(rams, "crashvm.ram")
	if _, err := os.Stat(ram); err != nil {
		t.Fatalf("RAM file should be left by the crash: %v", err)
	}
	n, err := Reap(runRoot, testLogger(t))
	if err != nil || n != 1 {
		t.Fatalf("Reap = %d, %v; want 1, nil", n, err)
	}
	for _, p := range []string{ram, filepath.Join(runRoot, "crashvm")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after Reap: %v", p, err)
		}
	}
}

// Reap kills a QEMU that is still running from a run directory, and only
// such a QEMU; it removes run directories and RAM files, and only those.
func TestReap(t *testing.T) {
	ctx := qemutest.Context(t, 20*time.Second)
	runRoot := t.TempDir()
	leaked := startVM(t, testConfig(t, runRoot, "leaked"))
	// A VM of another daemon (another root) must survive.
	other := startVM(t, testConfig(t, t.TempDir(), "other"))

	mkRunDir := func(name, pid, ramFile string) string {
		dir := filepath.Join(runRoot, name)
		os.MkdirAll(dir, 0o700)
		if pid != "" {
			os.WriteFile(filepath.Join(dir, PIDFile), []byte(pid+"\n"), 0o600)
		}
		if ramFile != "" {
			os.WriteFile(filepath.Join(dir, StateFile), []byte(fmt.Sprintf(`{"ram_file": %q}`, ramFile)), 0o600)
		}
		return dir
	}
	rams := ramDir(t)
	reusedRAM := filepath.Join(rams, "reused.ram")
	os.WriteFile(reusedRAM, nil, 0o600)
	precious := filepath.Join(rams, "precious.txt")
	os.WriteFile(precious, []byte("x"), 0o600)
	dirRAM := filepath.Join(rams, "dir.ram")
	os.Mkdir(dirRAM, 0o700)

	// The pid now belongs to this test process: not a QEMU of that dir.
	mkRunDir("reused", strconv.Itoa(os.Getpid()), reusedRAM)
	// The pid is a live QEMU, but of another run directory.
	mkRunDir("stolen", strconv.Itoa(other.PID()), "")
	// A state file naming things that are not RAM files.
	mkRunDir("odd", "not-a-pid", precious)
	mkRunDir("odd2", "", dirRAM)
	// Not a run directory at all.
	keep := filepath.Join(runRoot, "unrelated")
	os.MkdirAll(keep, 0o700)
	os.WriteFile(filepath.Join(keep, "data"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(runRoot, "file"), []byte("x"), 0o600)

	n, err := Reap(runRoot, testLogger(t))
	if err != nil || n != 5 {
		t.Fatalf("Reap = %d, %v; want 5, nil", n, err)
	}
	select {
	case <-leaked.Wait():
	case <-ctx.Done():
		t.Fatal("the leaked QEMU is still running")
	}
	if s, err := other.Status(ctx); err != nil || s != qmp.StatusRunning {
		t.Errorf("the other daemon's VM: %q, %v", s, err)
	}
	gone := []string{leaked.RAMFile(), leaked.RunDir(), reusedRAM, filepath.Join(runRoot, "reused"),
		filepath.Join(runRoot, "stolen"), filepath.Join(runRoot, "odd"), filepath.Join(runRoot, "odd2")}
	for _, p := range gone {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there: %v", p, err)
		}
	}
	for _, p := range []string{precious, dirRAM, keep, filepath.Join(keep, "data"), filepath.Join(runRoot, "file")} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s was removed: %v", p, err)
		}
	}

	if n, err := Reap(filepath.Join(runRoot, "missing"), nil); n != 0 || err != nil {
		t.Errorf("Reap of a missing root = %d, %v", n, err)
	}
}
