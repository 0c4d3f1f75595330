package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/snowflock-go/snowflock/api"
)

// runVM dispatches `sfcoord vm ...`.
func runVM(args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return usagef("vm needs a subcommand: run, list, stop or logs")
	}
	switch args[0] {
	case "run":
		var req api.VMRequest
		var mem string
		return runClient("vm run", args[1:], stdout, func(fs *pflag.FlagSet) {
			fs.StringVar(&req.Name, "name", "", "VM name")
			fs.StringVar(&req.Host, "host", "", "host to run on (default: the host with the most free memory)")
			fs.StringVar(&req.Kernel, "kernel", "", "kernel path on the host (default: the host's guest image)")
			fs.StringVar(&req.Initrd, "initrd", "", "initramfs path on the host (default: the host's guest image)")
			fs.StringVar(&mem, "mem", "512M", "guest memory, e.g. 512M or 1G")
			fs.IntVar(&req.VCPUs, "vcpus", 1, "virtual CPUs")
			fs.StringVar(&req.Cmd, "cmd", "", "workload shell command run by the guest's init")
		}, func(c *cmdCtx) error {
			if err := c.noArgs(); err != nil {
				return err
			}
			mb, err := parseMem(mem)
			if err != nil {
				return usagef("vm run: --mem: %v", err)
			}
			req.MemMB, req.Launch = mb, true
			vm, err := c.client.CreateVM(c.ctx, req)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(vm)
			}
			fmt.Fprintf(c.out, "VM %d scheduled on host %s (%d MiB, %d vCPU)\n", vm.ID, vm.Host, vm.MemMB, vm.VCPUs)
			return nil
		})
	case "list":
		var host string
		return runClient("vm list", args[1:], stdout, func(fs *pflag.FlagSet) {
			fs.StringVar(&host, "host", "", "only VMs on this host")
		}, func(c *cmdCtx) error {
			if err := c.noArgs(); err != nil {
				return err
			}
			vms, _, err := c.client.VMs(c.ctx, host, nil)
			if err != nil {
				return err
			}
			if c.json {
				return c.printJSON(vms)
			}
			var rows [][]string
			for _, v := range vms {
				clone := "-"
				if v.Role == "clone" {
					clone = fmt.Sprintf("%d of ticket %d", v.CloneID, v.Ticket)
				}
				rows = append(rows, []string{strconv.FormatUint(v.ID, 10), v.Name, v.Host, string(v.Role), string(v.State),
					strconv.FormatInt(v.MemMB, 10), clone, v.Reason})
			}
			return c.table([]string{"VM", "Name", "Host", "Role", "State", "Mem MiB", "Clone", "Reason"}, rows)
		})
	case "stop":
		return runClient("vm stop", args[1:], stdout, nil, func(c *cmdCtx) error {
			id, err := oneID(c.args, "vm stop ID")
			if err != nil {
				return err
			}
			if _, err := c.client.EndVM(c.ctx, id, "stopped by an operator"); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "VM %d stopped\n", id)
			return nil
		})
	case "logs":
		return runClient("vm logs", args[1:], stdout, nil, func(c *cmdCtx) error {
			id, err := oneID(c.args, "vm logs ID")
			if err != nil {
				return err
			}
			return vmLogs(c, id)
		})
	}
	return usagef("unknown vm subcommand %q", args[0])
}

func oneID(args []string, use string) (uint64, error) {
	if len(args) != 1 {
		return 0, usagef("usage: sfcoord %s", use)
	}
	id, err := strconv.ParseUint(args[0], 10, 64)
	if err != nil || id == 0 {
		return 0, usagef("%q is not a positive integer", args[0])
	}
	return id, nil
}

// parseMem reads sizes like 512M, 1G or 256 (MiB).
func parseMem(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(strings.ToUpper(s), "G"):
		mult, s = 1024, s[:len(s)-1]
	case strings.HasSuffix(strings.ToUpper(s), "M"):
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 || n*mult > 1<<20 {
		return 0, fmt.Errorf("%q is not a memory size between 1M and 1024G", s)
	}
	return n * mult, nil
}

// vmLogs prints a VM's console log, fetched from its host's sfhostd.
func vmLogs(c *cmdCtx, id uint64) error {
	vm, _, err := c.client.VM(c.ctx, id, nil)
	if err != nil {
		return err
	}
	hosts, _, err := c.client.Hosts(c.ctx, nil)
	if err != nil {
		return err
	}
	addr := ""
	for _, h := range hosts {
		if h.ID == vm.Host {
			addr = h.APIAddr
		}
	}
	if addr == "" {
		return fmt.Errorf("host %s of vm %d has no API address", vm.Host, id)
	}
	return fetchConsole(c.ctx, c.out, addr, c.token, id)
}

func fetchConsole(ctx context.Context, out io.Writer, addr, token string, id uint64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s/v1/vms/%d/console", addr, id), nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("host %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("host %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(b)))
	}
	_, err = io.Copy(out, resp.Body)
	return err
}
