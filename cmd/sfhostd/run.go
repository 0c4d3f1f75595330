package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"

	"github.com/snowflock-go/snowflock/gossip"
	"github.com/snowflock-go/snowflock/guest/image"
	"github.com/snowflock-go/snowflock/hostd"
	"github.com/snowflock-go/snowflock/internal/cli"
	"github.com/snowflock-go/snowflock/qemuctl"
	"github.com/snowflock-go/snowflock/xenctl"
)

const usage = `Usage: sfhostd <command> [flags]

  agent          run the host daemon
  image build    build the guest image (kernel + initramfs) and print its paths

Run 'sfhostd agent --help' for the agent's flags. Exit status: 0 ok, 1 error, 2 usage.
`

var usagef = cli.Usagef

// Run executes one sfhostd command and returns its exit status.
func Run(args []string, stdout, stderr io.Writer) int {
	if code, done := cli.Help(args, usage, stderr); done {
		return code
	}
	var err error
	switch {
	case args[0] == "agent":
		err = runAgent(args[1:], stderr)
	case args[0] == "image" && len(args) > 1 && args[1] == "build":
		err = runImageBuild(args[2:], stdout, stderr)
	default:
		err = usagef("unknown command %q (run 'sfhostd help')", strings.Join(args, " "))
	}
	return cli.Exit("sfhostd", err, stderr)
}

// imageFlags are shared by agent and image build.
type imageFlags struct {
	cache, sfguest, kernel, initrd string
}

func (f *imageFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.cache, "image-cache", "", "guest image cache (default: $XDG_CACHE_HOME/snowflock/image)")
	fs.StringVar(&f.sfguest, "sfguest", "", "static sfguest binary for the initramfs (default: next to sfhostd)")
	fs.StringVar(&f.kernel, "kernel", "", "use this guest kernel instead of Debian's")
	fs.StringVar(&f.initrd, "initrd", "", "use this initramfs instead of building one")
}

func (f *imageFlags) build(ctx context.Context, log hclog.Logger) (*image.Image, error) {
	sfguest := f.sfguest
	if sfguest == "" && f.initrd == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		sfguest = filepath.Join(filepath.Dir(exe), "sfguest")
		if _, err := os.Stat(sfguest); err != nil {
			return nil, fmt.Errorf("no sfguest binary next to sfhostd (%s); build it or pass --sfguest", sfguest)
		}
	}
	return image.Build(ctx, image.Options{CacheDir: f.cache, SFGuest: sfguest, Kernel: f.kernel, Initrd: f.initrd, Logger: log})
}

func newLogger(level string, asJSON bool, out io.Writer) (hclog.Logger, error) {
	l := hclog.LevelFromString(level)
	if l == hclog.NoLevel {
		return nil, usagef("unknown --log-level %q", level)
	}
	return hclog.New(&hclog.LoggerOptions{Name: "sfhostd", Level: l, JSONFormat: asJSON, Output: out}), nil
}

func runImageBuild(args []string, stdout, stderr io.Writer) error {
	fs := pflag.NewFlagSet("image build", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var img imageFlags
	img.register(fs)
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return usagef("image build: %v", err)
	}
	if fs.NArg() > 0 {
		return usagef("image build: unexpected arguments %v", fs.Args())
	}
	log, err := newLogger(*logLevel, false, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	im, err := img.build(ctx, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "kernel:  %s\ninitrd:  %s\nversion: %s\npackage: %s\nhash:    %s\nbuilt in %s (initramfs %s)\n",
		im.Kernel, im.Initrd, im.KernelVersion, im.KernelPackage, im.Hash, im.Stats.Total.Round(time.Millisecond),
		im.Stats.Initramfs.Round(time.Millisecond))
	return nil
}

func runAgent(args []string, stderr io.Writer) error {
	fs := pflag.NewFlagSet("agent", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var cfg hostd.Config
	var img imageFlags
	fs.StringVar(&cfg.NodeID, "node-id", "", "this host's unique name (required)")
	fs.StringVar(&cfg.DataDir, "data-dir", "", "directory for VM run dirs and state (required)")
	fs.StringVar(&cfg.GossipAddr, "gossip-addr", "127.0.0.1:7947", "gossip bind address (TCP and UDP)")
	fs.StringVar(&cfg.GossipAdvertise, "gossip-advertise", "", "gossip address others use (default: --gossip-addr)")
	fs.StringVar(&cfg.APIAddr, "api-addr", "127.0.0.1:7500", "host API address (console logs, status, metrics)")
	fs.StringArrayVar(&cfg.Join, "join", nil, "gossip address to join (repeatable), retried until one answers")
	coords := fs.StringArray("coordinator", nil, "coordinator API address (repeatable or comma separated)")
	fs.StringVar(&cfg.Token, "token", os.Getenv("SF_TOKEN"), "bearer token of the coordinator API, also required on this host's API (SF_TOKEN)")
	encrypt := fs.String("encrypt", os.Getenv("SF_ENCRYPT"), "gossip encryption key (SF_ENCRYPT)")
	fs.StringVar(&cfg.GossipProfile, "gossip-profile", "fast", "failure detection timing: fast (about 1 s), lan or wan (slow or loaded networks)")
	accel := fs.String("accel", "auto", "auto, kvm or tcg")
	hvName := fs.String("hypervisor", "auto", "qemu, xen (run in dom0), or auto: xen in a Xen control domain, else qemu")
	xenType := fs.String("xen-guest-type", "pvh", "with --hypervisor xen: the type of the domains this host boots, pvh or pv (clones keep their parent's)")
	fs.IntVar(&cfg.Slots, "slots", 8, "clone slots offered")
	mem := fs.Int64("mem", 4096, "memory offered to VMs, MiB")
	ramDir := fs.String("ram-dir", "", "tmpfs directory for guest RAM files (default: one per daemon under /dev/shm/snowflock)")
	fs.StringVar(&cfg.MemserverAddr, "memserver-addr", "127.0.0.1:7501", "address that serves this host's frozen VM memory to clone hosts (\"\" disables cloning from here)")
	fs.IntVar(&cfg.Readahead, "readahead", 0, "pages fetched along with each page a clone faults on (default 31)")
	fs.DurationVar(&cfg.FetchTimeout, "fetch-timeout", 0, "give up on a clone's page fetch after this long (default 60s)")
	mcastAddr := fs.String("mcast-addr", "", "this host's IPv4 address on the interface to multicast descriptors and memory on (\"\" turns multicast off; it never follows the default route)")
	mcastPort := fs.Uint16("mcast-port", hostd.DefaultMcastPort, "UDP port of the multicast sessions (the same on every host)")
	fs.IntVar(&cfg.McastMTU, "mcast-mtu", 1500, "path MTU of the multicast interface")
	mcastRate := fs.String("mcast-rate", "100MiB", "cap on the bytes per second of a session's memory pushes (0: no cap)")
	fs.DurationVar(&cfg.McastWait, "mcast-wait", hostd.DefaultMcastWait, "wait this long for a descriptor by multicast before fetching it by unicast")
	img.register(fs)
	logLevel := fs.String("log-level", "info", "trace, debug, info, warn or error")
	logJSON := fs.Bool("log-json", false, "log in JSON")
	pprofAddr := fs.String("pprof-addr", "", "serve Go's runtime profiles (/debug/pprof/) on this loopback address, without authentication (\"\": off)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(stderr, "Usage of sfhostd agent:\n%s", fs.FlagUsages())
			return err
		}
		return usagef("agent: %v", err)
	}
	if fs.NArg() > 0 {
		return usagef("agent: unexpected arguments %v", fs.Args())
	}
	if cfg.NodeID == "" || cfg.DataDir == "" {
		return usagef("agent: --node-id and --data-dir are required")
	}
	for _, c := range *coords {
		for _, a := range strings.Split(c, ",") {
			if a = strings.TrimSpace(a); a != "" {
				cfg.Coordinators = append(cfg.Coordinators, a)
			}
		}
	}
	if len(cfg.Coordinators) == 0 {
		return usagef("agent: at least one --coordinator is required")
	}
	switch *hvName {
	case "auto":
		*hvName = "qemu"
		if hostd.IsDom0() {
			*hvName = "xen"
		}
	case "qemu", "xen":
	default:
		return usagef("agent: --hypervisor must be auto, qemu or xen")
	}
	if *xenType != string(xenctl.TypePVH) && *xenType != string(xenctl.TypePV) {
		return usagef("agent: --xen-guest-type must be pvh or pv")
	}
	var acc qemuctl.Accel
	switch *accel {
	case "auto":
	case "kvm", "tcg":
		acc = qemuctl.Accel(*accel)
	default:
		return usagef("agent: --accel must be auto, kvm or tcg")
	}
	if *mcastAddr != "" {
		a, err := netip.ParseAddr(*mcastAddr)
		if err != nil || !a.Is4() || a.IsUnspecified() || a.IsMulticast() {
			return usagef("agent: --mcast-addr must be a unicast IPv4 address of this host")
		}
		cfg.McastAddr = a
	}
	cfg.McastPort = *mcastPort
	rate, err := parseBytes(*mcastRate)
	if err != nil || cfg.McastMTU < 576 || cfg.McastMTU > 65535 || cfg.McastWait < 0 || *mcastPort == 0 {
		return usagef("agent: --mcast-rate must be a size like 100MiB, --mcast-mtu 576..65535, --mcast-port nonzero, --mcast-wait not negative")
	}
	cfg.McastRate = rate
	if rate == 0 {
		cfg.McastRate = -1 // no cap
	}
	if cfg.Readahead < 0 || cfg.Readahead > 1024 || cfg.FetchTimeout < 0 {
		return usagef("agent: --readahead must be 0..1024 and --fetch-timeout not negative")
	}
	if *mem <= 0 || cfg.Slots < 0 {
		return usagef("agent: --mem must be positive and --slots not negative")
	}
	cfg.MemMB = *mem
	var profiles netip.AddrPort
	if *pprofAddr != "" {
		if profiles, err = parsePprofAddr(*pprofAddr); err != nil {
			return err
		}
	}
	if *encrypt != "" {
		k, err := gossip.DecodeKey(*encrypt)
		if err != nil {
			return usagef("agent: --encrypt: %v", err)
		}
		cfg.GossipKey = k
	}
	log, err := newLogger(*logLevel, *logJSON, stderr)
	if err != nil {
		return err
	}
	cfg.Logger = log
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	if profiles.IsValid() {
		_, stop, err := servePprof(ctx, profiles, log)
		if err != nil {
			return err
		}
		defer stop()
	}

	log.Info("preparing the guest image")
	im, err := img.build(ctx, log.Named("image"))
	if err != nil {
		return fmt.Errorf("guest image: %w", err)
	}
	cfg.Kernel, cfg.Initrd = im.Kernel, im.Initrd
	log.Info("guest image ready", "kernel", im.Kernel, "initrd", im.Initrd, "took", im.Stats.Total.Round(time.Millisecond))
	var hv hostd.Hypervisor
	if *hvName == "xen" {
		xen, err := hostd.NewXen(ctx, filepath.Join(cfg.DataDir, "vms"), log.Named("xen"))
		if err != nil {
			return err
		}
		defer xen.Close()
		xen.GuestType = xenctl.Type(*xenType)
		hv = xen
	} else {
		q, err := hostd.NewQEMU(ctx, filepath.Join(cfg.DataDir, "vms"), *ramDir, acc, log.Named("qemu"))
		if err != nil {
			return err
		}
		cfg.PageCacheDir = filepath.Join(q.RAMDir, "pages")
		hv = q
	}
	log.Info("hypervisor", "driver", hv.Name())
	d, err := hostd.New(cfg, hv)
	if err != nil {
		return err
	}
	sig := <-sigs
	log.Info("signal received; stopping", "signal", sig.String())
	sctx, scancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer scancel()
	return d.Shutdown(sctx)
}

// parseBytes parses a byte count with an optional binary unit: 512, 64KiB,
// 100MiB, 1GiB.
func parseBytes(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}, {"", 1}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			n, err := strconv.ParseInt(num, 10, 64)
			if err != nil || n < 0 || n > (1<<62)/u.mult {
				return 0, fmt.Errorf("bad size %q", s)
			}
			return n * u.mult, nil
		}
	}
	return 0, fmt.Errorf("bad size %q", s)
}
