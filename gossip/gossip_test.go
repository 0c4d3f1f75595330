package gossip

import (
	"encoding/base64"
	"errors"
	"testing"
	"time"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func newAgent(t *testing.T, name string, key []byte, role Role) *Agent {
	t.Helper()
	a, err := New(Config{Name: name, BindAddr: "127.0.0.1:0", Key: key, Meta: Meta{Role: role, Slots: 2}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Shutdown() })
	return a
}

func status(a *Agent, name string) Status {
	m, ok := a.Member(name)
	if !ok {
		return ""
	}
	return m.Status
}

func TestJoinFailLeave(t *testing.T) {
	k, _ := GenerateKey()
	key, err := DecodeKey(k)
	if err != nil {
		t.Fatal(err)
	}
	a := newAgent(t, "a", key, RoleCoordinator)
	b := newAgent(t, "b", key, RoleHost)
	c := newAgent(t, "c", key, RoleHost)
	for _, x := range []*Agent{b, c} {
		if n, err := x.Join([]string{a.Addr()}); err != nil || n != 1 {
			t.Fatalf("join: %d %v", n, err)
		}
	}
	waitFor(t, "all alive", func() bool { return status(a, "b") == StatusAlive && status(a, "c") == StatusAlive })
	if m, _ := a.Member("b"); m.Meta.Role != RoleHost || m.Meta.Slots != 2 {
		t.Fatalf("metadata of b: %+v", m.Meta)
	}
	if err := b.SetMeta(Meta{Role: RoleHost, Slots: 7}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "metadata update", func() bool { m, _ := a.Member("b"); return m.Meta.Slots == 7 })

	crashed := time.Now()
	_ = c.Shutdown()
	waitFor(t, "c failed", func() bool { return status(a, "c") == StatusFailed })
	if d := time.Since(crashed); d > 3*time.Second {
		t.Errorf("crash detected after %s, want within about 2 s", d)
	}
	t.Logf("crash detected after %s", time.Since(crashed).Round(time.Millisecond))

	if err := b.Leave(2 * time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b left", func() bool { return status(a, "b") == StatusLeft })
	a.Forget("b")
	if _, ok := a.Member("b"); ok {
		t.Fatal("Forget kept a departed member")
	}
}

func TestWrongKeyCannotJoin(t *testing.T) {
	k1, _ := GenerateKey()
	k2, _ := GenerateKey()
	key1, _ := DecodeKey(k1)
	key2, _ := DecodeKey(k2)
	a := newAgent(t, "a", key1, RoleCoordinator)
	intruder := newAgent(t, "x", key2, RoleHost)
	plain := newAgent(t, "p", nil, RoleHost)
	for _, x := range []*Agent{intruder, plain} {
		if _, err := x.Join([]string{a.Addr()}); err == nil {
			t.Errorf("%s joined an encrypted pool without its key", x.Name())
		}
	}
	if _, ok := a.Member("x"); ok {
		t.Fatal("intruder is a member")
	}
}

func TestConfigValidation(t *testing.T) {
	tests := []Config{
		{Name: "", BindAddr: "127.0.0.1:0", Meta: Meta{Role: RoleHost}},
		{Name: "n", BindAddr: "0.0.0.0:0", Meta: Meta{Role: RoleHost}},
		{Name: "n", BindAddr: "127.0.0.1:0", AdvertiseAddr: "0.0.0.0:7946", Meta: Meta{Role: RoleHost}},
		{Name: "n", BindAddr: "localhost:0", Meta: Meta{Role: RoleHost}},
		{Name: "n", BindAddr: "127.0.0.1:0", Key: []byte("short"), Meta: Meta{Role: RoleHost}},
		{Name: "n", BindAddr: "127.0.0.1:0", Meta: Meta{Role: RoleHost, API: string(make([]byte, 600))}},
	}
	for i, cfg := range tests {
		if a, err := New(cfg); err == nil {
			a.Shutdown()
			t.Errorf("#%d: config %+v accepted", i, cfg)
		} else if !errors.Is(err, ErrBadConfig) {
			t.Errorf("#%d: got %v, want ErrBadConfig", i, err)
		}
	}
	for i, k := range []string{"", "!!", base64.StdEncoding.EncodeToString(make([]byte, 10))} {
		if _, err := DecodeKey(k); err == nil {
			t.Errorf("#%d: key %q accepted", i, k)
		}
	}
}

// FuzzDecodeMeta: gossiped metadata is untrusted; decoding never panics and
// what it accepts has a known role and re-encodes within the size limit.
func FuzzDecodeMeta(f *testing.F) {
	for _, s := range []string{`{"role":"host","api":"127.0.0.1:1","slots":4,"mem_mb":10}`,
		`{"role":"coordinator","raft":"10.0.0.1:7300","expect":3}`, `{"role":"x"}`, `{}`, `[]`, `{"role":"host","slots":-1}`,
		`{"role":"host","leaving":true}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMeta(b)
		if err != nil {
			return
		}
		if m.Role != RoleHost && m.Role != RoleCoordinator {
			t.Fatalf("accepted role %q", m.Role)
		}
		if _, err := encodeMeta(m); err != nil && len(b) <= 512 {
			t.Fatalf("accepted metadata does not re-encode: %v", err)
		}
	})
}
