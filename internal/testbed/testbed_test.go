package testbed

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// The test binary doubles as the programs run inside the namespaces.
func TestMain(m *testing.M) {
	switch {
	case os.Getenv("SFTB_ECHO") != "":
		ln, err := net.Listen("tcp", os.Getenv("SFTB_ECHO"))
		if err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println("listening")
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(0)
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				fmt.Fprintf(c, "echo %s", line)
			}()
		}
	case os.Getenv("SFTB_DIAL") != "":
		if err := roundTrip(os.Getenv("SFTB_DIAL")); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func roundTrip(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "hello\n")
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || got != "echo hello\n" {
		return fmt.Errorf("round trip to %s: %q %v", addr, got, err)
	}
	return nil
}

func TestBed(t *testing.T) {
	if err := Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI runs as root with iproute2: %v", err)
		}
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := New(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			b.Close()
		}
	}()
	// An echo server inside host 2.
	srv := b.Command(ctx, 1, os.Args[0], "-test.run=^$")
	srv.Env = append(os.Environ(), "SFTB_ECHO="+b.Hosts[1].IP+":7777")
	out, _ := srv.StdoutPipe()
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "listening\n" {
		t.Fatalf("echo server: %q %v", line, err)
	}
	// Reached from the root namespace over the bridge ...
	if err := roundTrip(b.Hosts[1].IP + ":7777"); err != nil {
		t.Fatal(err)
	}
	// ... and from host 1's namespace.
	cl := b.Command(ctx, 0, os.Args[0], "-test.run=^$")
	cl.Env = append(os.Environ(), "SFTB_DIAL="+b.Hosts[1].IP+":7777")
	if out, err := cl.CombinedOutput(); err != nil {
		t.Fatalf("host 1 -> host 2: %v %s", err, out)
	}
	// No default route inside a host: nothing leaves the bed.
	routes, err := b.Command(ctx, 0, "ip", "route").Output()
	if err != nil || strings.Contains(string(routes), "default") {
		t.Fatalf("routes in host 1: %q %v", routes, err)
	}
	srv.Process.Kill()
	srv.Wait()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	for _, h := range b.Hosts {
		if err := exec.Command("ip", "netns", "exec", h.Name, "true").Run(); err == nil {
			t.Fatalf("namespace %s still exists", h.Name)
		}
	}
	if _, err := net.InterfaceByName(b.Bridge); err == nil {
		t.Fatalf("bridge %s still exists", b.Bridge)
	}
}

func TestSweep(t *testing.T) {
	if err := Available(); err != nil {
		t.Skip(err)
	}
	ctx := context.Background()
	b, err := New(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	// Forget b, as a crashed run would, then sweep its ID.
	if err := Sweep(ctx, Prefix+b.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := net.InterfaceByName(b.Bridge); err == nil {
		t.Fatal("sweep left the bridge")
	}
	if err := exec.Command("ip", "netns", "exec", b.Hosts[0].Name, "true").Run(); err == nil {
		t.Fatal("sweep left the namespace")
	}
	if err := Sweep(ctx, "other"); err == nil {
		t.Fatal("a sweep outside the bed prefix was accepted")
	}
}
