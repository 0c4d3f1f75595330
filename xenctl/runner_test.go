package xenctl

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestLocalRunnerStreamsByName runs dd the way xl opens its streams: it
// reads /proc/self/fd/0 and writes /proc/self/fd/1, opened by name with
// O_WRONLY|O_CREAT|O_TRUNC, as xl save and xl restore open theirs.
func TestLocalRunnerStreamsByName(t *testing.T) {
	if _, err := exec.LookPath("dd"); err != nil {
		t.Skip("no dd")
	}
	in := make([]byte, 3<<20+123)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range in {
		in[i] = byte(r.Uint32())
	}
	var out bytes.Buffer
	_, err := LocalRunner{}.Run(ctx(t), Command{
		Args:  []string{"dd", "if=" + stdinPath, "of=" + stdoutPath, "bs=64k", "status=none"},
		Stdin: bytes.NewReader(in), Stdout: &out,
	})
	if err != nil || !bytes.Equal(out.Bytes(), in) {
		t.Fatalf("dd through pipes opened by name: %d of %d bytes, %v", out.Len(), len(in), err)
	}
}

func TestLocalRunnerErrors(t *testing.T) {
	res, err := LocalRunner{}.Run(ctx(t), Command{Args: []string{"sh", "-c", "echo out; echo first >&2; echo 'the reason' >&2; exit 3"}})
	var ee *ExitError
	if !errors.As(err, &ee) || ee.Code != 3 || !strings.Contains(err.Error(), "the reason") || string(res.Stdout) != "out\n" {
		t.Fatalf("exit 3: %v, %+v", err, res)
	}
	if _, err := (LocalRunner{}).Run(ctx(t), Command{Args: []string{"/nonexistent/xl"}}); err == nil || errors.As(err, &ee) {
		t.Fatalf("missing program: %v", err)
	}
	cctx, cancel := context.WithTimeout(ctx(t), 50*time.Millisecond)
	defer cancel()
	begin := time.Now()
	if _, err := (LocalRunner{}).Run(cctx, Command{Args: []string{"sleep", "10"}}); !errors.Is(err, context.DeadlineExceeded) || time.Since(begin) > 5*time.Second {
		t.Fatalf("killed: %v after %v", err, time.Since(begin))
	}
	// Output is bounded.
	res, err = LocalRunner{}.Run(ctx(t), Command{Args: []string{"sh", "-c", "head -c 3000000 /dev/zero; head -c 3000000 /dev/zero >&2"}})
	if err != nil || len(res.Stdout) != MaxOutput || len(res.Stderr) != MaxOutput {
		t.Fatalf("big output: %d, %d, %v", len(res.Stdout), len(res.Stderr), err)
	}
}
