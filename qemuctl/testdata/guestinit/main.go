// Command guestinit is the /init of the test guest that TestBootKernel
// boots: it proves the guest sees the console on ttyS0 and the guest API
// channel on ttyS1, then reboots, which -no-reboot turns into QEMU's exit.
//
// On ttyS1 it says "hello ttyS1", answers one "ping X" with "pong X", and
// reports the UART it found there on the console.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strings"
	"syscall"
	"unsafe"
)

func main() {
	if err := run(); err != nil {
		fmt.Println("sfinit: error:", err)
	}
	syscall.Sync()
	syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART)
}

func run() error {
	fmt.Println("sfinit: console up")
	if err := syscall.Mount("devtmpfs", "/dev", "devtmpfs", 0, ""); err != nil {
		return fmt.Errorf("mount /dev: %w", err)
	}
	os.Mkdir("/proc", 0o755)
	if err := syscall.Mount("proc", "/proc", "proc", 0, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	if b, err := os.ReadFile("/proc/tty/driver/serial"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "1:") {
				fmt.Println("sfinit: ttyS1 is", l)
			}
		}
	}

	f, err := os.OpenFile("/dev/ttyS1", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := makeRaw(f.Fd()); err != nil {
		return fmt.Errorf("raw mode: %w", err)
	}
	if _, err := f.WriteString("hello ttyS1\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(f).ReadString('\n')
	if err != nil {
		return err
	}
	token, ok := strings.CutPrefix(strings.TrimSpace(line), "ping ")
	if !ok {
		return fmt.Errorf("unexpected line %q", line)
	}
	if _, err := f.WriteString("pong " + token + "\n"); err != nil {
		return err
	}
	fmt.Println("sfinit: answered ping", token)
	return nil
}

// makeRaw is cfmakeraw(3) at 115200 baud.
func makeRaw(fd uintptr) error {
	var t syscall.Termios
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TCGETS, uintptr(unsafe.Pointer(&t))); e != 0 {
		return e
	}
	t.Iflag &^= syscall.IGNBRK | syscall.BRKINT | syscall.PARMRK | syscall.ISTRIP | syscall.INLCR |
		syscall.IGNCR | syscall.ICRNL | syscall.IXON
	t.Oflag &^= syscall.OPOST
	t.Lflag &^= syscall.ECHO | syscall.ECHONL | syscall.ICANON | syscall.ISIG | syscall.IEXTEN
	t.Cflag &^= syscall.CSIZE | syscall.PARENB | 0o10017 // CBAUD
	t.Cflag |= syscall.CS8 | syscall.B115200
	t.Cc[syscall.VMIN], t.Cc[syscall.VTIME] = 1, 0
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TCSETS, uintptr(unsafe.Pointer(&t))); e != 0 {
		return e
	}
	return nil
}
