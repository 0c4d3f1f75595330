package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Prepare builds sfcoord, sfhostd and a static sfguest into a new
// temporary directory and, where QEMU is installed, the guest image, so
// that the daemons tests start find it cached and a build failure shows
// once with its output. The caller removes the directory.
func Prepare() (string, error) {
	dir, err := os.MkdirTemp("", "sf-bin-")
	if err != nil {
		return "", err
	}
	for _, c := range []string{"sfcoord", "sfhostd", "sfguest"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, c), "github.com/snowflock-go/snowflock/cmd/"+c)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("build %s: %w\n%s", c, err, out)
		}
	}
	if _, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		img := exec.Command(filepath.Join(dir, "sfhostd"), "image", "build", "--sfguest", filepath.Join(dir, "sfguest"))
		if out, err := img.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("sfhostd image build: %w\n%s", err, out)
		}
	}
	return dir, nil
}

// TestMain is a TestMain for packages that test real processes: it builds
// the binaries and image with Prepare, stores their directory in *binDir,
// runs the tests and removes the directory.
func TestMain(m interface{ Run() int }, binDir *string) {
	dir, err := Prepare()
	if err != nil {
		panic(err)
	}
	*binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
