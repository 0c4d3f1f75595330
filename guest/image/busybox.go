package image

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// busyboxApplets get a /bin symlink to busybox in every image, so that shell
// workloads find the usual tools. All are in Debian 12's busybox-static
// (TestBusyboxApplets checks the list against `busybox --list`).
var busyboxApplets = []string{
	"[", "[[", "awk", "base64", "basename", "cat", "chmod", "chown", "cmp", "cp", "cut",
	"date", "dd", "df", "diff", "dirname", "dmesg", "du", "echo", "env", "expr", "false",
	"find", "free", "grep", "gunzip", "gzip", "halt", "head", "hexdump", "hostname", "id",
	"ifconfig", "insmod", "ip", "kill", "ln", "ls", "lsmod", "md5sum", "mkdir", "mknod",
	"mktemp", "modprobe", "mount", "mv", "nc", "nproc", "od", "ping", "poweroff", "printf",
	"ps", "pwd", "readlink", "reboot", "rm", "rmdir", "rmmod", "sed", "seq", "sh", "sha1sum",
	"sha256sum", "sha512sum", "sleep", "sort", "stat", "sync", "tail", "tar", "tee", "test",
	"time", "timeout", "top", "touch", "tr", "true", "umount", "uname", "uniq", "uptime",
	"vi", "wc", "wget", "xargs", "xxd", "yes", "zcat",
}

// busybox fetches the pinned busybox-static and returns the path of its
// binary, cached in <CacheDir>/busybox/<sha256 of the .deb>/busybox, and the
// package used.
func (b *builder) busybox(ctx context.Context) (bin, pkg string, err error) {
	pin := debPackage{Name: PinnedBusyboxPackage, Version: PinnedBusyboxVersion}
	deb, err := b.fetch.fetch(ctx, pin, func(ctx context.Context) (debPackage, error) {
		return b.fetch.candidate(ctx, PinnedBusyboxPackage)
	})
	if err != nil {
		return "", "", err
	}
	pkg = deb.Package.String()
	bin = filepath.Join(b.opts.CacheDir, "busybox", deb.SHA256, "busybox")
	if err := checkStaticELF(bin, "busybox"); err == nil {
		return bin, pkg, nil
	} else if !errors.Is(err, ErrMissingFile) {
		b.log.Warn("cached busybox is damaged; unpacking again", "path", bin, "error", err)
	}
	var found bool
	err = walkDeb(ctx, deb.Path, func(e debEntry) error {
		if (e.Name != "bin/busybox" && e.Name != "usr/bin/busybox") || !isRegularEntry(e) {
			return nil
		}
		data, err := readAllLimit(e.Data, maxMember)
		if err != nil {
			return err
		}
		found = true
		if err := writeFileAtomic(bin, 0o755, func(w io.Writer) error {
			_, err := w.Write(data)
			return err
		}); err != nil {
			return err
		}
		return errStopWalk
	})
	if err != nil {
		return "", "", err
	}
	if !found {
		return "", "", fmt.Errorf("%w: %s has no /bin/busybox", ErrCorruptDeb, deb.Path)
	}
	if err := checkStaticELF(bin, "busybox"); err != nil {
		os.Remove(bin)
		return "", "", err
	}
	return bin, pkg, nil
}

// checkStaticELF checks that path is an x86-64 ELF executable without a
// program interpreter: the initramfs has no dynamic loader or libraries.
func checkStaticELF(path, what string) error {
	if err := regularFile(path, what); err != nil {
		return err
	}
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %s %q: %v", ErrNotStatic, what, path, err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || (f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN) {
		return fmt.Errorf("%w: %s %q is %v %v %v", ErrNotStatic, what, path, f.Class, f.Machine, f.Type)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%w: %s %q is dynamically linked (build it with CGO_ENABLED=0)", ErrNotStatic, what, path)
		}
	}
	return nil
}
