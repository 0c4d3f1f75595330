package xenchan_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/guest"
	"github.com/snowflock-go/snowflock/guestchan"
	"github.com/snowflock-go/snowflock/xenctl/xenchan"
	"github.com/snowflock-go/snowflock/xenctl/xenstore"
	"github.com/snowflock-go/snowflock/xenctl/xenstore/xenstoretest"
)

// The channel against Debian's real xenstored, with the guest speaking as
// an unprivileged domain over its ring (package xenstoretest): xenstored's
// permissions and quotas apply as they do to real guests.

func TestChannelOnXenstored(t *testing.T) {
	d := xenstoretest.Start(t)
	dom0 := d.Dial(t)
	gc := d.Introduce(t, 5)
	other := d.Introduce(t, 6)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	if _, err := xenchan.Prepare(ctx, dom0, 5, xenchan.Setup{Identity: &guestchan.Identity{VMID: 21, Role: "parent"}}); err != nil {
		t.Fatal(err)
	}
	p := xenchan.PathsFor(5)
	if perms, err := dom0.GetPerms(ctx, p.Host+"/resp"); err != nil || !slices.Equal(perms, []xenstore.Perm{{Domain: 0}, {Domain: 5, Access: xenstore.AccessRead}}) {
		t.Fatalf("host area perms %v, %v", perms, err)
	}
	if perms, err := dom0.GetPerms(ctx, p.Home+"/"+xenchan.ReqDir); err != nil || perms[0].Domain != 5 {
		t.Fatalf("guest area perms %v, %v", perms, err)
	}

	h, err := xenchan.NewHost(ctx, dom0, 5, xenchan.HostOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	go func() {
		var wmu sync.Mutex
		dec := guestchan.NewDecoder(h)
		for {
			req, err := dec.ReadRequest()
			if err != nil {
				return
			}
			go func() {
				resp := &guestchan.Response{V: guestchan.Version, ID: req.ID, Result: req.Args}
				if req.Call == guestchan.CallTickets {
					resp, _ = guestchan.Answer(req.ID, strings.Repeat("t", 50<<10))
				}
				wmu.Lock()
				defer wmu.Unlock()
				guestchan.Encode(h, resp)
			}()
		}
	}()

	g, err := xenchan.OpenGuest(ctx, gc)
	if err != nil {
		t.Fatal(err)
	}
	mux := guest.NewMux(g)
	defer mux.Close()
	if id, err := g.Identity(ctx); err != nil || id.VMID != 21 {
		t.Fatalf("identity %+v, %v", id, err)
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Up to ~6 KiB of request: several guest nodes, each under
			// xenstored's entry quota.
			args := guestchan.ExitArgs{Status: i, Result: strings.Repeat("r", i*800)}
			var got guestchan.ExitArgs
			if err := mux.Call(ctx, guestchan.CallExit, args, &got); err != nil || got != args {
				t.Errorf("call %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	var big string
	if err := mux.Call(ctx, guestchan.CallTickets, nil, &big); err != nil || len(big) != 50<<10 {
		t.Fatalf("big answer: %d bytes, %v", len(big), err)
	}

	// The guest cannot forge answers or touch another domain's channel.
	for _, path := range []string{"snowflock/resp/99/n", xenchan.EpochNode, xenchan.IdentityNode} {
		if err := gc.Write(ctx, path, []byte("1")); !errors.Is(err, xenstore.ErrPermission) {
			t.Errorf("guest writes %s: %v", path, err)
		}
	}
	if err := other.Write(ctx, p.Home+"/"+xenchan.ReqDir+"/1/n", []byte("1")); !errors.Is(err, xenstore.ErrPermission) {
		t.Errorf("domain 6 writes domain 5's request: %v", err)
	}

	// Every node of every call is removed.
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []string
		for _, dir := range []string{p.Home + "/" + xenchan.ReqDir, p.Home + "/" + xenchan.DoneDir, p.Host + "/resp"} {
			kids, err := dom0.Directory(ctx, dir)
			if err != nil {
				t.Fatal(err)
			}
			left = append(left, kids...)
		}
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind: %q", left)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestGreetingOnXenstored(t *testing.T) {
	d := xenstoretest.Start(t)
	dom0 := d.Dial(t)
	gc := d.Introduce(t, 7) // the domain a restore made, paused
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	greet, _ := guestchan.Answer(41, guestchan.CloneResult{CloneID: 2, Ticket: 9})
	epoch, err := xenchan.Prepare(ctx, dom0, 7, xenchan.Setup{Greeting: []*guestchan.Response{greet}})
	if err != nil {
		t.Fatal(err)
	}
	g, err := xenchan.OpenGuest(ctx, gc)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if g.Epoch() != epoch {
		t.Fatalf("epoch %q, want %q", g.Epoch(), epoch)
	}
	line, err := bufio.NewReader(g).ReadBytes('\n')
	if err != nil {
		t.Fatal(err)
	}
	var r guestchan.Response
	var cr guestchan.CloneResult
	if err := json.Unmarshal(line, &r); err != nil || r.ID != 41 || json.Unmarshal(r.Result, &cr) != nil || cr.CloneID != 2 {
		t.Fatalf("greeting %s: %v", line, err)
	}
	// The guest acknowledged it.
	if _, err := gc.Read(ctx, xenchan.DoneDir+"/41"); err != nil {
		t.Fatalf("acknowledgement: %v", err)
	}
}
