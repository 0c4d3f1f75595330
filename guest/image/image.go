package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

var (
	// ErrCorruptDeb reports a .deb that cannot be unpacked: a bad ar, tar or
	// compressed stream, or a package missing the files it should carry.
	ErrCorruptDeb = errors.New("image: corrupt .deb")
	// ErrChecksum reports a downloaded or cached .deb whose sha256 differs
	// from the one in apt's signed index.
	ErrChecksum = errors.New("image: checksum mismatch")
	// ErrPackageUnavailable reports a package that neither its pinned version
	// nor the fallback can supply.
	ErrPackageUnavailable = errors.New("image: package not available from the archive")
	// ErrMissingFile reports an input file (SFGuest, Kernel, Initrd, an
	// ExtraFiles source) that does not exist or is not a regular file.
	ErrMissingFile = errors.New("image: missing input file")
	// ErrBadPath reports an ExtraFiles guest path that is not a clean absolute
	// path inside the initramfs, or that collides with a file the image
	// provides itself.
	ErrBadPath = errors.New("image: bad guest path")
	// ErrNotStatic reports an SFGuest (or busybox) that is not a static x86-64
	// ELF executable, which /init in an initramfs without libraries must be.
	ErrNotStatic = errors.New("image: not a static x86-64 ELF executable")
	// ErrModuleNotFound reports a requested kernel module the kernel does not
	// ship, neither as a module nor built in.
	ErrModuleNotFound = errors.New("image: kernel module not found")
	// ErrNoVmlinux reports a bzImage from which no x86-64 ELF kernel could be
	// extracted.
	ErrNoVmlinux = errors.New("image: no vmlinux in kernel image")
	// ErrUnsupportedCompression reports a compression format this package
	// does not decode: a zstd .deb; a kernel payload other than XZ or gzip.
	ErrUnsupportedCompression = errors.New("image: unsupported compression")
)

// DefaultModules are the kernel modules an image carries when
// Options.Modules is nil: the virtio transport and devices QEMU guests use.
// Their dependencies (failover, net_failover, virtio_pci_*_dev) are added from
// the kernel's dependency index.
var DefaultModules = []string{
	"virtio", "virtio_ring", "virtio_pci", "virtio_console",
	"virtio_net", "virtio_blk", "virtio_balloon",
}

// Options say what to build. Only SFGuest is required (unless both Kernel and
// Initrd are given).
type Options struct {
	// CacheDir holds downloads and build products; see the package comment.
	// Empty means DefaultCacheDir().
	CacheDir string
	// SFGuest is the host path of the static binary installed as /init.
	SFGuest string
	// Kernel, when set, is used as the guest kernel instead of Debian's; it is
	// passed through as is. Modules then default to none: Debian's modules
	// would not load into another kernel.
	Kernel string
	// Initrd, when set, is used instead of building an initramfs.
	Initrd string
	// Modules are kernel module names ("virtio_net", "virtio-net" alike) to
	// include with their dependencies. Nil means DefaultModules (none with a
	// custom Kernel); an empty non-nil slice means none. Built-in modules
	// are skipped.
	Modules []string
	// ExtraFiles maps clean absolute guest paths to host files, e.g.
	// {"/work/run.sh": "testdata/run.sh"}. Files keep only their executable
	// bit (mode 0755 or 0644).
	ExtraFiles map[string]string
	// Gzip compresses the initramfs. Uncompressed boots a little faster under
	// TCG (no inflate in the guest) at the cost of size.
	Gzip bool
	// RebuildInitramfs writes the initramfs even when the cache holds one
	// with the same hash, so that Stats.Initramfs measures a full build.
	RebuildInitramfs bool
	// Logger receives progress and warnings; nil discards them.
	Logger hclog.Logger
}

// Image is a bootable kernel and initramfs on the host.
type Image struct {
	// Kernel is the path of the uncompressed ELF vmlinux, or Options.Kernel.
	Kernel string
	// BzImage is the compressed kernel from the package (the vmlinux's
	// source), for boot paths that need a bzImage; empty with a custom kernel.
	BzImage string
	// Initrd is the path of the initramfs (newc cpio, maybe gzipped).
	Initrd string
	// KernelVersion is the kernel release ("6.1.0-56-amd64"), the name of its
	// /lib/modules directory.
	KernelVersion string
	// KernelPackage is the Debian package used, as name=version; empty with
	// a custom kernel.
	KernelPackage string
	// KernelDebSHA256 is the sha256 of the kernel .deb used.
	KernelDebSHA256 string
	// BusyboxPackage is the busybox-static package used, as name=version;
	// empty with a custom Initrd.
	BusyboxPackage string
	// Hash is the hex sha256 of the uncompressed cpio archive (of the file
	// itself for a custom Initrd). Equal inputs give equal hashes.
	Hash string
	// Modules are the module paths inside the initramfs in load order, as
	// listed in /etc/sfguest/modules.
	Modules []string
	// Stats say what this Build did and how long it took.
	Stats Stats
}

// Stats describe one Build.
type Stats struct {
	// Downloaded lists the packages (name=version) fetched from the archive.
	Downloaded []string
	// KernelUnpacked is true when the kernel .deb was unpacked (cold kernel
	// cache or new modules requested).
	KernelUnpacked bool
	// InitramfsCached is true when the initramfs came from the cache.
	InitramfsCached bool
	// Fetch is the time spent resolving, downloading and verifying .debs.
	Fetch time.Duration
	// Kernel is the time spent unpacking the kernel package, extracting
	// vmlinux and modules.
	Kernel time.Duration
	// Initramfs is the time spent assembling, hashing and writing the
	// initramfs: the image build time proper once the kernel is cached.
	Initramfs time.Duration
	// Total is the wall time of Build.
	Total time.Duration
}

// DefaultCacheDir is the cache used when Options.CacheDir is empty:
// $XDG_CACHE_HOME/snowflock/image, usually ~/.cache/snowflock/image.
func DefaultCacheDir() (string, error) {
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("image: no cache directory: %w", err)
	}
	return filepath.Join(d, "snowflock", "image"), nil
}

// Build produces a bootable image, reusing everything the cache already holds.
// It is safe to call concurrently, from several processes too: builds sharing
// a CacheDir take turns.
func Build(ctx context.Context, opts Options) (*Image, error) {
	start := time.Now()
	o, err := opts.normalise()
	if err != nil {
		return nil, err
	}
	unlock, err := lockDir(ctx, o.CacheDir, o.Logger)
	if err != nil {
		return nil, err
	}
	defer unlock()

	img := &Image{}
	b := &builder{opts: o, log: o.Logger, stats: &img.Stats, fetch: newFetcher(filepath.Join(o.CacheDir, "debs"), o.Logger, &img.Stats)}
	if err := b.build(ctx, img); err != nil {
		return nil, err
	}
	img.Stats.Total = time.Since(start)
	o.Logger.Info("image ready", "kernel", img.Kernel, "initrd", img.Initrd, "hash", img.Hash,
		"modules", len(img.Modules), "downloaded", len(img.Stats.Downloaded),
		"initramfs_cached", img.Stats.InitramfsCached, "initramfs_time", img.Stats.Initramfs, "total", img.Stats.Total)
	return img, nil
}

type builder struct {
	opts  Options
	log   hclog.Logger
	stats *Stats
	fetch *fetcher
}

func (b *builder) build(ctx context.Context, img *Image) error {
	o := b.opts
	var kt *kernelTree
	if o.Kernel != "" {
		if err := regularFile(o.Kernel, "Kernel"); err != nil {
			return err
		}
		img.Kernel = o.Kernel
		img.KernelVersion = kernelFileVersion(o.Kernel)
	} else {
		var err error
		if kt, err = b.kernel(ctx); err != nil {
			return err
		}
		img.Kernel, img.BzImage = kt.vmlinuxPath(), kt.bzImagePath()
		img.KernelVersion, img.KernelPackage, img.KernelDebSHA256 = kt.Release, kt.Package.String(), kt.DebSHA256
	}

	if o.Initrd != "" {
		if err := regularFile(o.Initrd, "Initrd"); err != nil {
			return err
		}
		sum, err := fileSHA256(o.Initrd)
		if err != nil {
			return err
		}
		img.Initrd, img.Hash = o.Initrd, sum
		return nil
	}

	spec := initramfsSpec{sfguest: o.SFGuest, extra: o.ExtraFiles, release: img.KernelVersion}
	var err error
	if spec.busybox, img.BusyboxPackage, err = b.busybox(ctx); err != nil {
		return err
	}
	if kt != nil && len(o.Modules) > 0 {
		t := time.Now()
		mods, dep, unpacked, err := kt.modules(ctx, o.Modules, b.log)
		if err != nil {
			return err
		}
		b.stats.Kernel += time.Since(t)
		b.stats.KernelUnpacked = b.stats.KernelUnpacked || unpacked
		spec.modules, spec.modulesDep = mods, dep
	}
	t := time.Now()
	path, hash, cached, err := buildInitramfs(spec, filepath.Join(o.CacheDir, "initramfs"), o.Gzip, o.RebuildInitramfs)
	if err != nil {
		return err
	}
	b.stats.Initramfs, b.stats.InitramfsCached = time.Since(t), cached
	img.Initrd, img.Hash = path, hash
	for _, m := range spec.modules {
		img.Modules = append(img.Modules, m.guestPath)
	}
	return nil
}

// normalise validates the options and fills in defaults.
func (opts Options) normalise() (Options, error) {
	o, err := opts.normaliseCache()
	if err != nil {
		return o, err
	}
	// Absolute paths in the Image, whatever directory its user runs QEMU in.
	for _, p := range []*string{&o.Kernel, &o.Initrd} {
		if *p == "" {
			continue
		}
		abs, err := filepath.Abs(*p)
		if err != nil {
			return o, fmt.Errorf("image: %q: %w", *p, err)
		}
		*p = abs
	}
	if o.Kernel != "" && o.Initrd != "" {
		return o, nil // nothing to build: SFGuest and the rest are unused
	}
	if o.Initrd == "" {
		if o.SFGuest == "" {
			return o, fmt.Errorf("%w: Options.SFGuest is required to build an initramfs", ErrMissingFile)
		}
		if err := checkStaticELF(o.SFGuest, "SFGuest"); err != nil {
			return o, err
		}
		if _, err := guestExtraPaths(o.ExtraFiles); err != nil {
			return o, err
		}
	}
	switch {
	case o.Modules == nil && o.Kernel == "":
		o.Modules = DefaultModules
	case len(o.Modules) > 0 && o.Kernel != "":
		return o, fmt.Errorf("image: Options.Modules come from Debian's kernel package and cannot be used with a custom Kernel (build them in, or pass your own Initrd)")
	}
	return o, nil
}

// regularFile checks that path names an existing regular file.
func regularFile(path, what string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%w: %s %q: %v", ErrMissingFile, what, path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: %s %q is not a regular file", ErrMissingFile, what, path)
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("image: hashing %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// writeFileAtomic writes a file so that readers see either nothing or all of
// it: the cache stays consistent if a Build is killed halfway.
func writeFileAtomic(path string, mode os.FileMode, write func(io.Writer) error) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := write(f); err != nil {
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
	return os.Rename(tmp, path)
}

// lockDir takes an exclusive flock on dir/.lock, polling so that ctx can
// cancel the wait. The returned func releases it.
func lockDir(ctx context.Context, dir string, log hclog.Logger) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("image: cache directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("image: cache lock: %w", err)
	}
	logged := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("image: cache lock: %w", err)
		}
		if !logged {
			log.Debug("waiting for another build to release the cache", "dir", dir)
			logged = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
