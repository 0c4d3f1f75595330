package xenctl

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snowflock-go/snowflock/xenctl/xcstream"
)

// Where xl reads and writes streams: its own standard input and output,
// opened by name, so that no save image touches a disk and a remote
// runner can carry the stream (see Command).
const (
	stdoutPath = "/proc/self/fd/1"
	stdinPath  = "/proc/self/fd/0"
)

// streamBuffer is the pipe capacity asked for xl's streams, and how much
// Split reads at once: in a PV dom0 every system call and context switch
// costs a trip through the hypervisor, and the guest stays suspended
// while Capture reads.
const streamBuffer = 1 << 20

// streamPipe makes the pipe an image streams through to or from xl. Its
// ends are *os.File, which a LocalRunner hands to xl as they are, with no
// goroutine copying between pipes.
func streamPipe() (r, w *os.File, err error) {
	r, w, err = os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	if rc, err := w.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			unix.FcntlInt(fd, unix.F_SETPIPE_SZ, streamBuffer) // a hint: the default size works too
		})
	}
	return r, w, nil
}

// Files of a capture directory.
const (
	DescriptorFile = "descriptor"
	PagesFile      = "pages"
)

// CaptureOptions say where a capture goes.
type CaptureOptions struct {
	// Dir receives the descriptor (DescriptorFile) and, unless Sink is
	// set, the pages (PagesFile, a PageFile). Created if missing; neither
	// file may exist. "" keeps the descriptor in memory only and needs a
	// Sink.
	Dir string
	// Sink, if set, receives the pages instead of Dir's PageFile.
	Sink xcstream.PageSink
	// Limits bound what Split accepts.
	Limits xcstream.Limits
}

// Capture is a domain's state split into descriptor and pages.
type Capture struct {
	Descriptor     *xcstream.Descriptor `json:"-"`
	DescriptorPath string               `json:"descriptor_path,omitempty"`
	PagesPath      string               `json:"pages_path,omitempty"`
	DescriptorSize int                  `json:"descriptor_size"` // bytes, marshalled
	Info           xcstream.Info        `json:"info"`
	Saved          Saved                `json:"saved"` // the configuration in the image
	Save           SaveResult           `json:"save"`  // the xl save, of which the guest was suspended most
}

// Capture checkpoints the running domain — `xl save -c`, which suspends
// the guest, saves it and resumes it, so the parent runs on — and splits
// the image as it streams out of xl, never holding it whole: the
// descriptor is kept (and written to Dir), the pages go to the sink. On
// error, whatever Capture made is removed; xl resumes the guest whatever
// happens to the image. When ctx ends, Capture stops taking the image and
// returns once xl has resumed the guest and exited.
func (d *Domain) Capture(ctx context.Context, opts CaptureOptions) (*Capture, error) {
	c, err := d.capture(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("xenctl: capture %s: %w", d.cfg.Name, err)
	}
	d.log.Info("captured", "pages", c.Info.StoredPages(), "zero_pages", c.Info.ZeroPages,
		"descriptor_bytes", c.DescriptorSize, "save", c.Save.Took)
	return c, nil
}

func (d *Domain) capture(ctx context.Context, opts CaptureOptions) (c *Capture, err error) {
	if opts.Dir == "" && opts.Sink == nil {
		return nil, errors.New("CaptureOptions need a Dir or a Sink")
	}
	c = &Capture{}
	var created []string
	defer func() {
		if err != nil {
			for _, p := range created {
				os.Remove(p)
			}
		}
	}()
	sink := opts.Sink
	var batch *pageBatch
	if opts.Dir != "" {
		if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
			return nil, err
		}
		c.DescriptorPath = filepath.Join(opts.Dir, DescriptorFile)
		if sink == nil {
			c.PagesPath = filepath.Join(opts.Dir, PagesFile)
			pages, err := CreatePageFile(c.PagesPath)
			if err != nil {
				return nil, err
			}
			created = append(created, c.PagesPath)
			defer pages.Close()
			batch = newPageBatch(pages)
			sink = batch
		}
	}

	pr, pw, err := streamPipe()
	if err != nil {
		return nil, err
	}
	defer pr.Close()
	type saved struct {
		res SaveResult
		err error
	}
	done := make(chan saved, 1)
	go func() {
		res, err := d.save(ctx, Command{Stdout: pw}, stdoutPath, RunAfterSave)
		pw.Close() // xl has exited: Split sees the end of the stream
		done <- saved{res, err}
	}()
	// xl is never killed (see Save): when ctx ends, closing the pipe makes
	// its writes fail, so that it gives up, resumes the guest and exits.
	stop := context.AfterFunc(ctx, func() { pr.Close() })
	defer stop()
	desc, splitErr := xcstream.Split(bufio.NewReaderSize(pr, streamBuffer), sink, opts.Limits)
	if splitErr == nil && batch != nil {
		splitErr = batch.Flush()
	}
	drained := make(chan struct{})
	if splitErr != nil {
		// Let xl finish: it resumes the guest only once its save ends.
		go func() {
			io.Copy(io.Discard, pr)
			close(drained)
		}()
	} else {
		close(drained)
	}
	s := <-done
	pr.Close() // a helper xl left behind may hold the pipe: stop reading
	<-drained
	if err := ctx.Err(); err != nil {
		return nil, context.Cause(ctx)
	}
	c.Save = s.res
	if s.err != nil {
		return nil, s.err
	}
	if splitErr != nil {
		return nil, splitErr
	}
	c.Descriptor = desc
	c.Info = desc.Info()
	if c.Saved, err = readSaved(desc.SaveFile); err != nil {
		return nil, err
	}
	b, err := desc.MarshalBinary()
	if err != nil {
		return nil, err
	}
	c.DescriptorSize = len(b)
	if c.DescriptorPath != "" {
		f, err := os.OpenFile(c.DescriptorPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		created = append(created, c.DescriptorPath)
		_, err = f.Write(b)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}

// RestoreFrom starts a new domain from a descriptor and its pages: the
// image is rebuilt as it streams into `xl restore -p -e`, named
// cfg.Name (with a new UUID), then the guest channel is laid out if
// cfg.Channel says so, and the domain is unpaused unless cfg.Paused.
//
// The domain's configuration is the saved one, the parent's, but for its
// name, UUID and, unless cfg.KeepMACs, its NICs' MAC addresses: cfg's
// Type, MemMB and VCPUs, if set, must match it (ErrMismatch); its Kernel,
// Ramdisk, Cmdline and Extra are not used.
func RestoreFrom(ctx context.Context, desc *xcstream.Descriptor, pages xcstream.PageSource, cfg Config) (*Domain, error) {
	d, err := restoreFrom(ctx, desc, pages, cfg)
	if err != nil {
		return nil, fmt.Errorf("xenctl: restore %s: %w", cfg.Name, err)
	}
	return d, nil
}

func restoreFrom(ctx context.Context, desc *xcstream.Descriptor, pages xcstream.PageSource, cfg Config) (*Domain, error) {
	if len(desc.SaveFile) == 0 {
		return nil, fmt.Errorf("%w: the descriptor has no xl save-file header (a bare libxl stream)", ErrBadSaveFile)
	}
	header, saved, uuid, err := renameSaveHeader(desc.SaveFile, cfg.Name, cfg.KeepMACs)
	if err != nil {
		return nil, err
	}
	cfg, err = restoreConfig(cfg, saved)
	if err != nil {
		return nil, err
	}
	renamed := *desc
	renamed.SaveFile = header
	pr, pw, err := streamPipe()
	if err != nil {
		return nil, err
	}
	rebuilt := make(chan error, 1)
	go func() {
		err := renamed.Rebuild(pw, pages)
		pw.Close()
		rebuilt <- err
	}()
	d, err := restore(ctx, cfg, uuid, pr)
	// xl has exited, having read the whole image or given up: a Rebuild
	// still writing fails at once, whoever else holds the pipe.
	pr.Close()
	pw.Close()
	if rerr := <-rebuilt; err != nil && rerr != nil && !errors.Is(rerr, syscall.EPIPE) && !errors.Is(rerr, os.ErrClosed) {
		// Why the image broke off, which xl cannot say.
		err = fmt.Errorf("%w (rebuilding the image: %w)", err, rerr)
	}
	return d, err
}

// Restore starts a new domain from an xl save image read from r (a file
// written by Save, say), named cfg.Name, like RestoreFrom.
func Restore(ctx context.Context, r io.Reader, cfg Config) (*Domain, error) {
	d, err := restoreReader(ctx, r, cfg)
	if err != nil {
		return nil, fmt.Errorf("xenctl: restore %s: %w", cfg.Name, err)
	}
	return d, nil
}

// RestoreFile is Restore from a file on this machine.
func RestoreFile(ctx context.Context, path string, cfg Config) (*Domain, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("xenctl: restore %s: %w", cfg.Name, err)
	}
	defer f.Close()
	return Restore(ctx, bufio.NewReaderSize(f, 1<<20), cfg)
}

func restoreReader(ctx context.Context, r io.Reader, cfg Config) (*Domain, error) {
	h, err := readSaveHeader(r)
	if err != nil {
		return nil, err
	}
	header, saved, uuid, err := renameSaveHeader(h, cfg.Name, cfg.KeepMACs)
	if err != nil {
		return nil, err
	}
	if cfg, err = restoreConfig(cfg, saved); err != nil {
		return nil, err
	}
	return restore(ctx, cfg, uuid, io.MultiReader(bytes.NewReader(header), r))
}

// restoreConfig validates a restore's Config against the saved
// configuration and fills its guest settings from it.
func restoreConfig(cfg Config, saved Saved) (Config, error) {
	if err := checkSaved(cfg, saved); err != nil {
		return cfg, err
	}
	if saved.Type != TypePV && saved.Type != TypePVH {
		return cfg, fmt.Errorf("%w: saved guest type %q", ErrMismatch, saved.Type)
	}
	cfg.Type, cfg.VCPUs = saved.Type, saved.MaxVCPUs
	cfg.MemMB = int(saved.MaxMemKB / 1024)
	cfg.Kernel, cfg.Ramdisk, cfg.Cmdline, cfg.Extra = "", "", "", nil
	return cfg.withDefaults()
}

// restore runs xl restore on the image read from img, whose
// configuration has the given UUID, and starts the domain.
func restore(ctx context.Context, cfg Config, uuid string, img io.Reader) (*Domain, error) {
	x := cfg.xl()
	begin := time.Now()
	if _, err := x.run(ctx, Command{Args: []string{"restore", "-p", "-e", stdinPath}, Stdin: img}); err != nil {
		// libxl destroys a domain whose restore failed, unless xl was
		// killed.
		if ctx.Err() != nil {
			removeKilled(ctx, cfg, uuid)
		}
		return nil, err
	}
	restored := time.Since(begin)
	d, err := adopt(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := d.start(ctx); err != nil {
		d.destroyAfterFailure(ctx)
		return nil, err
	}
	d.log.Info("restored", "type", cfg.Type, "mem_mb", cfg.MemMB, "restore", restored,
		"running_after", time.Since(begin), "paused", cfg.Paused)
	return d, nil
}
