package guest

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/guestchan"
)

// host answers the protocol on conn: tickets get ID 100+n after a delay
// that makes answers arrive out of order; "boom" fails; "hello" answers.
func host(t *testing.T, conn net.Conn) {
	d := guestchan.NewDecoder(conn)
	var wmu sync.Mutex
	for {
		req, err := d.ReadRequest()
		if err != nil {
			return
		}
		go func(req *guestchan.Request) {
			var resp *guestchan.Response
			switch req.Call {
			case guestchan.CallTicket:
				var a guestchan.TicketArgs
				_ = req.DecodeArgs(&a)
				time.Sleep(time.Duration(10-a.N) * time.Millisecond) // later calls answer first
				resp, _ = guestchan.Answer(req.ID, Ticket{ID: uint64(100 + a.N), Granted: a.N})
			case guestchan.CallHello:
				resp, _ = guestchan.Answer(req.ID, guestchan.Identity{VMID: 7, Role: "parent", Host: "h1"})
			default:
				resp = guestchan.Fail(req.ID, guestchan.CodeUnsupported, "%s not supported", req.Call)
			}
			wmu.Lock()
			defer wmu.Unlock()
			_ = guestchan.Encode(conn, resp)
		}(req)
	}
}

func TestMuxConcurrentCallsAndServe(t *testing.T) {
	g, h := net.Pipe()
	go host(t, h)
	m := NewMux(g)
	defer m.Close()

	// Local programs reach the channel through the socket sfguest serves.
	sock := filepath.Join(t.TempDir(), "sfguest.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, m) }()
	t.Setenv("SF_GUEST_SOCKET", sock)

	var wg sync.WaitGroup
	for n := 1; n <= 8; n++ {
		wg.Add(1)
		go func(n int) {
			defer wg.Done()
			c, err := Dial()
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			tk, err := c.RequestTicket(context.Background(), n)
			if err != nil || tk.ID != uint64(100+n) || tk.Granted != n {
				t.Errorf("call %d: %+v %v", n, tk, err)
			}
		}(n)
	}
	wg.Wait()

	c := NewClient(m)
	id, err := c.Hello(context.Background())
	if err != nil || id.VMID != 7 {
		t.Fatalf("hello: %+v %v", id, err)
	}
	_, err = c.Clone(context.Background(), 3)
	var ge *guestchan.Error
	if !errors.As(err, &ge) || ge.Code != guestchan.CodeUnsupported {
		t.Fatalf("clone: %v, want an unsupported error", err)
	}
	cctx, ccancel := context.WithCancel(context.Background())
	ccancel()
	if err := c.Exit(cctx, 0, ""); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled call: %v", err)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatalf("serve: %v", err)
	}
	h.Close()
	<-m.Done()
	if _, err := c.Hello(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("call on a closed channel: %v", err)
	}
}

// TestServeRejectsGarbage: a local program sending garbage gets error
// answers on the same connection, which stays usable.
func TestServeRejectsGarbage(t *testing.T) {
	g, h := net.Pipe()
	go host(t, h)
	m := NewMux(g)
	defer m.Close()
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, _ := net.Listen("unix", sock)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Serve(ctx, ln, m)
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte("this is not json\n"))
	req, _ := guestchan.NewRequest(5, guestchan.CallHello, nil)
	guestchan.Encode(conn, req)
	d := guestchan.NewDecoder(conn)
	r1, err := d.ReadResponse()
	if err != nil || r1.Error == nil || r1.Error.Code != guestchan.CodeBadRequest {
		t.Fatalf("garbage answered %+v %v", r1, err)
	}
	r2, err := d.ReadResponse()
	if err != nil || r2.ID != 5 || r2.Error != nil {
		t.Fatalf("then hello answered %+v %v", r2, err)
	}
}
