package xenstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/snowflock-go/snowflock/xenctl/xenstore"
	"github.com/snowflock-go/snowflock/xenctl/xenstore/xenstoretest"
)

// These tests run against Debian's xenstored (see package xenstoretest),
// and skip where it cannot run.

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// nextEvent waits for the watch's next event.
func nextEvent(t *testing.T, w *xenstore.Watch) xenstore.Event {
	t.Helper()
	select {
	case ev, ok := <-w.Events():
		if !ok {
			t.Fatal("watch closed")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatalf("no event on %s", w.Path())
	}
	panic("unreachable")
}

// expectEvents waits until events for each path have arrived, in any
// order (xenstored may coalesce repeats, never drop a path).
func expectEvents(t *testing.T, w *xenstore.Watch, paths ...string) {
	t.Helper()
	want := map[string]bool{}
	for _, p := range paths {
		want[p] = true
	}
	for len(want) > 0 {
		ev := nextEvent(t, w)
		delete(want, ev.Path)
	}
}

func noEvent(t *testing.T, w *xenstore.Watch, within time.Duration) {
	t.Helper()
	select {
	case ev := <-w.Events():
		t.Fatalf("unexpected event %+v", ev)
	case <-time.After(within):
	}
}

func TestXenstoredDom0(t *testing.T) {
	d := xenstoretest.Start(t)
	c := d.Dial(t)
	ctx := testCtx(t)

	t.Run("values", func(t *testing.T) {
		val := []byte("binary\x00value\xff")
		must(t, c.Write(ctx, "/t/values/a", val))
		got, err := c.Read(ctx, "/t/values/a")
		if err != nil || !bytes.Equal(got, val) {
			t.Fatalf("read %q, %v", got, err)
		}
		if _, err := c.Read(ctx, "/t/values/missing"); !errors.Is(err, xenstore.ErrNotFound) {
			t.Fatalf("missing node: %v", err)
		}
		// Write created the parent with an empty value.
		if got, err := c.Read(ctx, "/t/values"); err != nil || len(got) != 0 {
			t.Fatalf("parent %q, %v", got, err)
		}
		must(t, c.Mkdir(ctx, "/t/values/a")) // exists: left as it is
		if got, _ := c.Read(ctx, "/t/values/a"); !bytes.Equal(got, val) {
			t.Fatal("mkdir changed an existing node")
		}
		must(t, c.Rm(ctx, "/t/values/nothing"))
		if err := c.Rm(ctx, "/t/nowhere/nothing"); !errors.Is(err, xenstore.ErrNotFound) {
			t.Fatalf("rm under a missing parent: %v", err)
		}
		// The largest value one message carries.
		big := bytes.Repeat([]byte("x"), xenstore.PayloadMax-len("/t/values/big")-1)
		must(t, c.Write(ctx, "/t/values/big", big))
		if got, err := c.Read(ctx, "/t/values/big"); err != nil || !bytes.Equal(got, big) {
			t.Fatalf("big value: %d bytes, %v", len(got), err)
		}
		kids, err := c.Directory(ctx, "/t/values")
		slices.Sort(kids)
		if err != nil || !slices.Equal(kids, []string{"a", "big"}) {
			t.Fatalf("directory %q, %v", kids, err)
		}
		must(t, c.Rm(ctx, "/t/values"))
		if _, err := c.Read(ctx, "/t/values/a"); !errors.Is(err, xenstore.ErrNotFound) {
			t.Fatalf("after rm: %v", err)
		}
	})

	t.Run("directory in parts", func(t *testing.T) {
		// More child names than one reply holds: xenstored answers E2BIG
		// and the client pages with DIRECTORY_PART.
		var want []string
		for i := range 300 {
			name := fmt.Sprintf("child-with-a-long-name-%04d", i)
			want = append(want, name)
			must(t, c.Write(ctx, "/t/big/"+name, nil))
		}
		got, err := c.Directory(ctx, "/t/big")
		slices.Sort(got)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("%d children, %v", len(got), err)
		}
	})

	t.Run("perms and domain path", func(t *testing.T) {
		perms := []xenstore.Perm{{Domain: 3, Access: xenstore.AccessNone}, {Domain: 0, Access: xenstore.AccessRead}, {Domain: 4, Access: xenstore.AccessBoth}}
		must(t, c.Write(ctx, "/t/perms", nil))
		must(t, c.SetPerms(ctx, "/t/perms", perms))
		got, err := c.GetPerms(ctx, "/t/perms")
		if err != nil || !slices.Equal(got, perms) {
			t.Fatalf("perms %v, %v", got, err)
		}
		// Children inherit their parent's permissions.
		must(t, c.Write(ctx, "/t/perms/child", nil))
		if got, _ := c.GetPerms(ctx, "/t/perms/child"); !slices.Equal(got, perms) {
			t.Fatalf("child perms %v", got)
		}
		p, err := c.GetDomainPath(ctx, 7)
		if err != nil || p != "/local/domain/7" || p != xenstore.DomainPath(7) {
			t.Fatalf("domain path %q, %v", p, err)
		}
	})

	t.Run("transactions", func(t *testing.T) {
		must(t, c.Write(ctx, "/t/tx/k", []byte("0")))
		t1, err := c.Begin(ctx)
		must(t, err)
		t2, err := c.Begin(ctx)
		must(t, err)
		if _, err := t1.Read(ctx, "/t/tx/k"); err != nil {
			t.Fatal(err)
		}
		must(t, t2.Write(ctx, "/t/tx/k", []byte("t2")))
		// Outside the transaction, t2's write is not visible yet.
		if got, _ := c.Read(ctx, "/t/tx/k"); string(got) != "0" {
			t.Fatalf("uncommitted write visible: %q", got)
		}
		must(t, t2.Commit(ctx))
		must(t, t1.Write(ctx, "/t/tx/k", []byte("t1")))
		if err := t1.Commit(ctx); !errors.Is(err, xenstore.ErrAgain) {
			t.Fatalf("conflicting commit: %v", err)
		}
		if got, _ := c.Read(ctx, "/t/tx/k"); string(got) != "t2" {
			t.Fatalf("after conflict: %q", got)
		}
		t3, err := c.Begin(ctx)
		must(t, err)
		must(t, t3.Write(ctx, "/t/tx/aborted", nil))
		must(t, t3.Abort(ctx))
		if _, err := c.Read(ctx, "/t/tx/aborted"); !errors.Is(err, xenstore.ErrNotFound) {
			t.Fatalf("aborted write: %v", err)
		}

		// Concurrent read-modify-write through Update loses no increment.
		must(t, c.Write(ctx, "/t/tx/counter", []byte("0")))
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 10 {
					err := c.Update(ctx, func(tx *xenstore.Tx) error {
						v, err := tx.Read(ctx, "/t/tx/counter")
						if err != nil {
							return err
						}
						n, _ := strconv.Atoi(string(v))
						return tx.Write(ctx, "/t/tx/counter", []byte(strconv.Itoa(n+1)))
					})
					if err != nil {
						t.Error(err)
					}
				}
			}()
		}
		wg.Wait()
		if got, _ := c.Read(ctx, "/t/tx/counter"); string(got) != "40" {
			t.Fatalf("counter %q, want 40", got)
		}
	})

	t.Run("watches", func(t *testing.T) {
		w, err := c.Watch(ctx, "/t/w")
		must(t, err)
		if ev := nextEvent(t, w); ev.Path != "/t/w" || ev.Token != w.Token() {
			t.Fatalf("first event %+v", ev)
		}
		must(t, c.Write(ctx, "/t/w/a/b", []byte("1")))
		expectEvents(t, w, "/t/w/a/b")
		must(t, c.Write(ctx, "/t/other", nil))
		// Removing a subtree fires a watch above it once, for the subtree's
		// root; only watches on the removed descendants themselves hear of
		// those.
		must(t, c.Rm(ctx, "/t/w/a"))
		expectEvents(t, w, "/t/w/a")
		noEvent(t, w, 100*time.Millisecond)
		// Events of a transaction fire at its commit.
		tx, err := c.Begin(ctx)
		must(t, err)
		must(t, tx.Write(ctx, "/t/w/tx", nil))
		noEvent(t, w, 100*time.Millisecond)
		must(t, tx.Commit(ctx))
		expectEvents(t, w, "/t/w/tx")
		must(t, w.Stop(ctx))
		must(t, c.Write(ctx, "/t/w/after", nil))
		if _, ok := <-w.Events(); ok {
			t.Fatal("event after Stop")
		}
	})

	t.Run("domain watches", func(t *testing.T) {
		intro, err := c.Watch(ctx, xenstore.WatchIntroduceDomain)
		must(t, err)
		rel, err := c.Watch(ctx, xenstore.WatchReleaseDomain)
		must(t, err)
		expectEvents(t, intro, xenstore.WatchIntroduceDomain)
		expectEvents(t, rel, xenstore.WatchReleaseDomain)
		d.Introduce(t, 9)
		expectEvents(t, intro, xenstore.WatchIntroduceDomain)
		d.Kill(t, 9)
		expectEvents(t, rel, xenstore.WatchReleaseDomain)
	})
}

func TestXenstoredGuest(t *testing.T) {
	d := xenstoretest.Start(t)
	dom0 := d.Dial(t)
	guest := d.Introduce(t, 5)
	d.Introduce(t, 6)
	ctx := testCtx(t)

	p, err := guest.GetDomainPath(ctx, 5)
	if err != nil || p != "/local/domain/5" {
		t.Fatalf("domain path %q, %v", p, err)
	}

	// Relative paths resolve against the guest's home; what it creates it
	// owns.
	must(t, guest.Write(ctx, "data/x", []byte("v")))
	if got, err := dom0.Read(ctx, "/local/domain/5/data/x"); err != nil || string(got) != "v" {
		t.Fatalf("dom0 reads %q, %v", got, err)
	}
	if perms, _ := dom0.GetPerms(ctx, "/local/domain/5/data/x"); len(perms) == 0 || perms[0].Domain != 5 {
		t.Fatalf("perms of the guest's node: %v", perms)
	}

	// A dom0 area the guest may read and not write.
	area := "/local/domain/5/snowflock"
	must(t, dom0.Write(ctx, area+"/identity", []byte(`{"vm_id":1}`)))
	must(t, dom0.SetPerms(ctx, area, []xenstore.Perm{{Domain: 0, Access: xenstore.AccessNone}, {Domain: 5, Access: xenstore.AccessRead}}))
	must(t, dom0.SetPerms(ctx, area+"/identity", []xenstore.Perm{{Domain: 0, Access: xenstore.AccessNone}, {Domain: 5, Access: xenstore.AccessRead}}))
	if got, err := guest.Read(ctx, "snowflock/identity"); err != nil || string(got) != `{"vm_id":1}` {
		t.Fatalf("guest reads %q, %v", got, err)
	}
	for _, p := range []string{"snowflock/identity", "snowflock/resp/1", "foo", "/local/domain/6/data/x", "/tool/x"} {
		if err := guest.Write(ctx, p, []byte("no")); !errors.Is(err, xenstore.ErrPermission) {
			t.Errorf("guest write %s: %v, want ErrPermission", p, err)
		}
	}
	if _, err := guest.Read(ctx, "/local/domain/6"); !errors.Is(err, xenstore.ErrPermission) {
		t.Errorf("guest reads another domain: %v", err)
	}
	if err := guest.Rm(ctx, "snowflock/identity"); !errors.Is(err, xenstore.ErrPermission) {
		t.Errorf("guest rm in dom0's area: %v", err)
	}
	// A guest may not give its node away.
	if err := guest.SetPerms(ctx, "data/x", []xenstore.Perm{{Domain: 0, Access: xenstore.AccessNone}}); !errors.Is(err, xenstore.ErrPermission) {
		t.Errorf("guest gives a node away: %v", err)
	}

	// Entry size quota: 2048 bytes including a node's header and perms.
	must(t, guest.Write(ctx, "data/fits", bytes.Repeat([]byte("a"), 1900)))
	if err := guest.Write(ctx, "data/big", bytes.Repeat([]byte("a"), 2048)); !errors.Is(err, xenstore.ErrQuota) {
		t.Errorf("oversized guest node: %v, want ErrQuota", err)
	}

	// A relative watch reports relative paths.
	w, err := guest.Watch(ctx, "snowflock")
	must(t, err)
	if ev := nextEvent(t, w); ev.Path != "snowflock" {
		t.Fatalf("first event %+v", ev)
	}
	must(t, dom0.Write(ctx, area+"/resp/1/n", []byte("1")))
	expectEvents(t, w, "snowflock/resp/1/n")
	// No events for what the guest may not read.
	other, err := guest.Watch(ctx, "/local/domain/6")
	must(t, err)
	for ev := range other.Events() {
		if ev.Path == "/local/domain/6" {
			break
		}
	}
	must(t, dom0.Write(ctx, "/local/domain/6/private", []byte("secret")))
	noEvent(t, other, 200*time.Millisecond)

	// Transactions work for guests too.
	must(t, guest.Update(ctx, func(tx *xenstore.Tx) error {
		return tx.Write(ctx, "data/tx", []byte("ok"))
	}))
	if got, _ := dom0.Read(ctx, "/local/domain/5/data/tx"); string(got) != "ok" {
		t.Errorf("guest transaction: %q", got)
	}
	if t.Failed() {
		t.Log(strings.TrimSpace(d.Trace()))
	}
}
