package qemuctl

import (
	"fmt"
	"os"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A clone's RAM is a private mapping of a lazily filled file (lazyram).
// QEMU advises all guest RAM MADV_HUGEPAGE, and for a file mapping with
// that advice the kernel reads 2-4 MiB around every page fault, however
// small the file's read-ahead: an idle clone then fetches tens of
// megabytes it never touches. QEMU has no option to skip the advice, so a
// clone's QEMU is started through this package's own binary, which
// installs a seccomp filter that answers madvise(MADV_HUGEPAGE) with
// success without doing it, and then execs QEMU (the filter survives
// exec; nothing else is filtered).

// noTHPArg is argv[1] of a re-executed binary that is to exec QEMU.
const noTHPArg = "__snowflock_qemu_nothp__"

const noTHPSupported = true

func init() {
	if len(os.Args) > 2 && os.Args[1] == noTHPArg {
		execWithoutHugePageAdvice(os.Args[2:])
	}
}

// noTHPCommand returns the argv that runs binary with args under the filter.
func noTHPCommand(binary string, args []string) ([]string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	return append([]string{self, noTHPArg, binary}, args...), nil
}

func execWithoutHugePageAdvice(argv []string) {
	runtime.LockOSThread() // the filter is per thread; exec from this one
	if err := denyHugePageAdvice(); err != nil {
		fmt.Fprintf(os.Stderr, "qemuctl: seccomp filter: %v\n", err)
		os.Exit(126)
	}
	err := syscall.Exec(argv[0], argv, os.Environ())
	fmt.Fprintf(os.Stderr, "qemuctl: exec %s: %v\n", argv[0], err)
	os.Exit(127)
}

// denyHugePageAdvice installs a seccomp filter on this thread that makes
// madvise(..., MADV_HUGEPAGE) return 0 without effect.
func denyHugePageAdvice() error {
	const (
		archX8664  = 0xc000003e // AUDIT_ARCH_X86_64
		offNr      = 0          // offsetof(struct seccomp_data, nr)
		offArch    = 4
		offArg2Low = 16 + 2*8 // args[2], low 32 bits (little endian)
		retAllow   = 0x7fff0000
		retErrno0  = 0x00050000 // SECCOMP_RET_ERRNO with errno 0: "success"
	)
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offArch},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: archX8664, Jt: 0, Jf: 4},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offNr},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: unix.SYS_MADVISE, Jt: 0, Jf: 2},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: offArg2Low},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: unix.MADV_HUGEPAGE, Jt: 1, Jf: 0},
		{Code: unix.BPF_RET | unix.BPF_K, K: retAllow},
		{Code: unix.BPF_RET | unix.BPF_K, K: retErrno0},
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&fprog))); errno != 0 {
		return errno
	}
	return nil
}
