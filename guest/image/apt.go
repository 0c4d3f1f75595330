package image

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The packages images are built from. Debian replaces kernel builds with
// security updates and drops the old ones from the archive; when the pinned
// kernel can no longer be downloaded, Build falls back to the current
// candidate of the same series (linux-image-6.1.0-*-amd64, what the
// linux-image-amd64 metapackage depends on) and logs a warning naming both.
// Bump the pin to that candidate to silence it.
const (
	PinnedKernelPackage  = "linux-image-6.1.0-56-amd64"
	PinnedKernelVersion  = "6.1.192-2"
	PinnedBusyboxPackage = "busybox-static"
	PinnedBusyboxVersion = "1:1.35.0-4+deb12u1+b1"

	// kernelMetaPackage depends on the current kernel of the series.
	kernelMetaPackage = "linux-image-amd64"
)

// kernelSeries matches the package names the fallback may use: Debian 12's
// 6.1 kernels for amd64, whatever their ABI number.
var kernelSeries = regexp.MustCompile(`^linux-image-6\.1\.0-[0-9]+-amd64$`)

// debPackage names one version of a Debian package.
type debPackage struct {
	Name    string
	Version string
}

func (p debPackage) String() string { return p.Name + "=" + p.Version }

// fileName is the name apt-get download gives the .deb.
func (p debPackage) fileName() string {
	return p.Name + "_" + strings.ReplaceAll(p.Version, ":", "%3a") + "_amd64.deb"
}

// debFile is a downloaded package whose sha256 matched apt's index.
type debFile struct {
	Package debPackage
	Path    string
	SHA256  string
}

// errNotInArchive reports a name=version that apt's package lists do not have.
var errNotInArchive = errors.New("not in the package lists")

// runFunc runs a command in dir and returns its combined output; tests fake it.
type runFunc func(ctx context.Context, dir, name string, args ...string) ([]byte, error)

func runCommand(ctx context.Context, dir, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// fetcher downloads pinned packages into dir with apt and verifies them.
// Downloads are recorded with a sidecar <deb>.sha256 once verified, so a
// cached .deb needs no apt call.
type fetcher struct {
	dir      string
	log      hclog.Logger
	stats    *Stats
	run      runFunc
	listsDir string // apt's package lists, checked when a package is missing
	updated  bool   // apt-get update ran during this Build (at most once)
}

func newFetcher(dir string, log hclog.Logger, stats *Stats) *fetcher {
	return &fetcher{dir: dir, log: log, stats: stats, run: runCommand, listsDir: "/var/lib/apt/lists"}
}

// fetch returns the pinned package, from the cache or the archive. When the
// archive no longer has it and fallback is not nil, it uses the package
// fallback returns instead, with a warning.
func (f *fetcher) fetch(ctx context.Context, pin debPackage, fallback func(context.Context) (debPackage, error)) (debFile, error) {
	start := time.Now()
	defer func() { f.stats.Fetch += time.Since(start) }()
	if d, ok := f.cached(pin); ok {
		return d, nil
	}
	d, err := f.download(ctx, pin)
	if err == nil || !errors.Is(err, errNotInArchive) {
		return d, err
	}
	if fallback == nil {
		return debFile{}, fmt.Errorf("%w: %s: %v", ErrPackageUnavailable, pin, err)
	}
	alt, ferr := fallback(ctx)
	if ferr != nil {
		return debFile{}, fmt.Errorf("%w: %s is %v, and no fallback: %v", ErrPackageUnavailable, pin, errNotInArchive, ferr)
	}
	if alt == pin {
		return debFile{}, fmt.Errorf("%w: %s: %v", ErrPackageUnavailable, pin, err)
	}
	f.log.Warn("pinned package is no longer in the archive; using the current candidate of its series (update the pin)",
		"pinned", pin.String(), "using", alt.String())
	if d, ok := f.cached(alt); ok {
		return d, nil
	}
	d, err = f.download(ctx, alt)
	if errors.Is(err, errNotInArchive) {
		err = fmt.Errorf("%w: %v", ErrPackageUnavailable, err)
	}
	return d, err
}

// cached returns the verified .deb of p from dir, if present and intact.
func (f *fetcher) cached(p debPackage) (debFile, bool) {
	path := filepath.Join(f.dir, p.fileName())
	want, err := os.ReadFile(path + ".sha256")
	if err != nil {
		return debFile{}, false
	}
	got, err := fileSHA256(path)
	if err != nil || got != strings.TrimSpace(string(want)) {
		f.log.Warn("cached package is damaged; downloading it again", "package", p.String(), "path", path)
		os.Remove(path + ".sha256")
		os.Remove(path)
		return debFile{}, false
	}
	return debFile{Package: p, Path: path, SHA256: got}, true
}

// download fetches p with apt-get download and checks it against the SHA256
// of apt-cache show. It runs apt-get update (once per Build) when the lists
// are missing or the download fails, as stale lists name files the mirror
// no longer has.
func (f *fetcher) download(ctx context.Context, p debPackage) (debFile, error) {
	for {
		want, err := f.archiveSHA256(ctx, p)
		if errors.Is(err, errNotInArchive) && !f.updated && f.listsMissing() {
			f.log.Info("apt package lists are missing; running apt-get update")
			if uerr := f.update(ctx); uerr != nil {
				return debFile{}, uerr
			}
			continue
		}
		if err != nil {
			return debFile{}, err
		}
		d, err := f.downloadVerified(ctx, p, want)
		if err != nil && !f.updated && !errors.Is(err, ErrChecksum) && ctx.Err() == nil {
			f.log.Info("download failed; refreshing apt package lists and retrying", "package", p.String(), "error", err)
			if uerr := f.update(ctx); uerr != nil {
				return debFile{}, errors.Join(err, uerr)
			}
			continue
		}
		return d, err
	}
}

func (f *fetcher) downloadVerified(ctx context.Context, p debPackage, want string) (debFile, error) {
	if err := os.MkdirAll(f.dir, 0o755); err != nil {
		return debFile{}, err
	}
	// A private directory: apt-get download writes the file in place, and a
	// half-written .deb must never look cached.
	tmp, err := os.MkdirTemp(f.dir, ".download-")
	if err != nil {
		return debFile{}, err
	}
	defer os.RemoveAll(tmp)
	f.log.Info("downloading package", "package", p.String())
	if _, err := f.run(ctx, tmp, "apt-get", "download", "-q", p.String()); err != nil {
		return debFile{}, err
	}
	got := filepath.Join(tmp, p.fileName())
	sum, err := fileSHA256(got)
	if err != nil {
		return debFile{}, fmt.Errorf("image: apt-get download %s produced no %s: %w", p, p.fileName(), err)
	}
	if sum != want {
		return debFile{}, fmt.Errorf("%w: %s: sha256 %s, apt-cache show says %s", ErrChecksum, p, sum, want)
	}
	path := filepath.Join(f.dir, p.fileName())
	if err := os.Rename(got, path); err != nil {
		return debFile{}, err
	}
	if err := writeFileAtomic(path+".sha256", 0o644, func(w io.Writer) error {
		_, err := fmt.Fprintln(w, sum)
		return err
	}); err != nil {
		return debFile{}, err
	}
	f.stats.Downloaded = append(f.stats.Downloaded, p.String())
	f.log.Debug("package verified", "package", p.String(), "sha256", sum)
	return debFile{Package: p, Path: path, SHA256: sum}, nil
}

// archiveSHA256 is the SHA256 field apt's (signature-checked) index gives
// for p.
func (f *fetcher) archiveSHA256(ctx context.Context, p debPackage) (string, error) {
	out, err := f.run(ctx, "", "apt-cache", "show", p.String())
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, exec.ErrNotFound) {
			return "", err
		}
		// apt-cache show exits 100 for an unknown package name.
		return "", fmt.Errorf("%s: %w (%v)", p, errNotInArchive, err)
	}
	sum, err := parseAptShow(out, p)
	if err != nil {
		return "", err
	}
	return sum, nil
}

// listsMissing reports whether apt has no package lists, as in fresh
// containers.
func (f *fetcher) listsMissing() bool {
	m, _ := filepath.Glob(filepath.Join(f.listsDir, "*_Packages*"))
	return len(m) == 0
}

func (f *fetcher) update(ctx context.Context) error {
	f.updated = true
	if _, err := f.run(ctx, "", "apt-get", "update", "-q"); err != nil {
		return fmt.Errorf("image: apt-get update (needs root): %w", err)
	}
	return nil
}

// kernelFallback returns the current candidate of the pinned kernel's series:
// the linux-image-6.1.0-*-amd64 package the metapackage depends on.
func (f *fetcher) kernelFallback(ctx context.Context) (debPackage, error) {
	out, err := f.run(ctx, "", "apt-cache", "depends", kernelMetaPackage)
	if err != nil {
		return debPackage{}, err
	}
	name, err := parseAptDepends(out, kernelSeries)
	if err != nil {
		return debPackage{}, err
	}
	return f.candidate(ctx, name)
}

// candidate returns the version apt would install of name.
func (f *fetcher) candidate(ctx context.Context, name string) (debPackage, error) {
	out, err := f.run(ctx, "", "apt-cache", "policy", name)
	if err != nil {
		return debPackage{}, err
	}
	v, err := parseAptCandidate(out)
	if err != nil {
		return debPackage{}, fmt.Errorf("%s: %w", name, err)
	}
	return debPackage{Name: name, Version: v}, nil
}

// parseAptShow picks the SHA256 of p's amd64 stanza from apt-cache show
// output. No stanza means the lists do not have that version.
func parseAptShow(out []byte, p debPackage) (string, error) {
	for _, stanza := range bytes.Split(out, []byte("\n\n")) {
		fields := map[string]string{}
		sc := bufio.NewScanner(bytes.NewReader(stanza))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if line == "" || line[0] == ' ' || line[0] == '\t' {
				continue // continuation lines (descriptions) carry no fields we need
			}
			if k, v, ok := strings.Cut(line, ":"); ok {
				fields[k] = strings.TrimSpace(v)
			}
		}
		if fields["Package"] != p.Name || fields["Version"] != p.Version {
			continue
		}
		if a := fields["Architecture"]; a != "amd64" && a != "all" {
			continue
		}
		sum := fields["SHA256"]
		if len(sum) != 64 || strings.Trim(sum, "0123456789abcdef") != "" {
			return "", fmt.Errorf("image: apt-cache show %s: bad SHA256 field %q", p, sum)
		}
		return sum, nil
	}
	return "", fmt.Errorf("%s: %w", p, errNotInArchive)
}

// parseAptDepends returns the single dependency matching series from
// apt-cache depends output.
func parseAptDepends(out []byte, series *regexp.Regexp) (string, error) {
	var found []string
	for _, line := range strings.Split(string(out), "\n") {
		dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends:")
		if !ok {
			continue
		}
		dep = strings.Trim(strings.TrimSpace(dep), "<>")
		if series.MatchString(dep) {
			found = append(found, dep)
		}
	}
	if len(found) != 1 {
		return "", fmt.Errorf("image: %s depends on %d packages matching %s, want 1: %q", kernelMetaPackage, len(found), series, found)
	}
	return found[0], nil
}

// parseAptCandidate returns the Candidate: version from apt-cache policy.
func parseAptCandidate(out []byte) (string, error) {
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "Candidate:"); ok {
			v = strings.TrimSpace(v)
			if v == "" || v == "(none)" {
				break
			}
			return v, nil
		}
	}
	return "", fmt.Errorf("image: no installation candidate")
}
