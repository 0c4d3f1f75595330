package xenchan

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/snowflock-go/snowflock/xenctl/xenstore"
)

// memStore is a xenstore tree in memory, for unit tests of the framing
// and the channel logic: writes create parents, removal takes subtrees,
// missing nodes are ErrNotFound, and watchers hear of changes at or below
// their path. It checks no permissions; the tests against the real
// xenstored (xenstored_test.go) do.
type memStore struct {
	mu       sync.Mutex
	nodes    map[string][]byte
	watchers []*memWatch
	writes   int
	failAt   int // the failAt-th write fails with ErrQuota (0: never)
	// beforeWrite, if set, is called with each write's absolute path
	// before it is made, without the store's lock.
	beforeWrite func(path string)
}

type memWatch struct {
	prefix string // absolute
	home   string // events are reported relative to it, if set
	ch     chan xenstore.Event
}

func newMemStore() *memStore { return &memStore{nodes: map[string][]byte{"/": nil}} }

// view is the store as seen by one connection: relative paths resolve
// against home, which a test changes to move a guest to a new domain.
type view struct {
	m    *memStore
	mu   sync.Mutex
	home string
}

func (m *memStore) as(domid uint32) *view { return &view{m: m, home: xenstore.DomainPath(domid)} }

func (v *view) abs(p string) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	if strings.HasPrefix(p, "/") {
		return p
	}
	return v.home + "/" + p
}

func parent(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

func (v *view) Read(ctx context.Context, p string) ([]byte, error) {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	val, ok := v.m.nodes[v.abs(p)]
	if !ok {
		return nil, &xenstore.Error{Op: xenstore.OpRead, Path: p, Code: "ENOENT"}
	}
	return slices.Clone(val), nil
}

func (v *view) Write(ctx context.Context, p string, val []byte) error {
	if err := xenstore.ValidPath(p); err != nil {
		return err
	}
	if hook := v.m.beforeWrite; hook != nil {
		hook(v.abs(p))
	}
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	v.m.writes++
	if v.m.writes == v.m.failAt {
		return &xenstore.Error{Op: xenstore.OpWrite, Path: p, Code: "ENOSPC"}
	}
	a := v.abs(p)
	for q := parent(a); q != "/"; q = parent(q) {
		if _, ok := v.m.nodes[q]; !ok {
			v.m.nodes[q] = nil
		}
	}
	v.m.nodes[a] = slices.Clone(val)
	v.m.fire(a)
	return nil
}

func (v *view) Mkdir(ctx context.Context, p string) error {
	if _, err := v.Read(ctx, p); err == nil {
		return nil
	}
	return v.Write(ctx, p, nil)
}

func (v *view) Rm(ctx context.Context, p string) error {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	a := v.abs(p)
	if _, ok := v.m.nodes[parent(a)]; !ok {
		return &xenstore.Error{Op: xenstore.OpRm, Path: p, Code: "ENOENT"}
	}
	if _, ok := v.m.nodes[a]; !ok {
		return nil
	}
	for q := range v.m.nodes {
		if q == a || strings.HasPrefix(q, a+"/") {
			delete(v.m.nodes, q)
		}
	}
	v.m.fire(a)
	return nil
}

func (v *view) Directory(ctx context.Context, p string) ([]string, error) {
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	a := v.abs(p)
	if _, ok := v.m.nodes[a]; !ok {
		return nil, &xenstore.Error{Op: xenstore.OpDirectory, Path: p, Code: "ENOENT"}
	}
	var kids []string
	for q := range v.m.nodes {
		if rest, ok := strings.CutPrefix(q, a+"/"); ok && !strings.Contains(rest, "/") {
			kids = append(kids, rest)
		}
	}
	slices.Sort(kids)
	return kids, nil
}

func (v *view) SetPerms(ctx context.Context, p string, perms []xenstore.Perm) error {
	_, err := v.Read(ctx, p)
	return err
}

// watch registers a watch on p (relative to the view's home if relative)
// and sends the first event, as xenstored does.
func (v *view) watch(p string) *memWatch {
	w := &memWatch{ch: make(chan xenstore.Event, 4096)}
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	w.prefix = v.abs(p)
	if !strings.HasPrefix(p, "/") {
		w.home = v.home
	}
	v.m.watchers = append(v.m.watchers, w)
	w.send(w.prefix)
	return w
}

// move re-points a view and its relative watch at another domain, as a
// restore does to a guest's xenstore connection, and fires the watch as
// Linux's re-registration does.
func (v *view) move(domid uint32, w *memWatch) {
	v.mu.Lock()
	old := v.home
	v.home = xenstore.DomainPath(domid)
	v.mu.Unlock()
	v.m.mu.Lock()
	defer v.m.mu.Unlock()
	w.prefix = v.home + strings.TrimPrefix(w.prefix, old)
	w.home = v.home
	w.send(w.prefix)
}

func (m *memStore) fire(p string) {
	for _, w := range m.watchers {
		if p == w.prefix || strings.HasPrefix(p, w.prefix+"/") {
			w.send(p)
		}
	}
}

func (w *memWatch) send(p string) {
	if w.home != "" {
		p = strings.TrimPrefix(p, w.home+"/")
	}
	select {
	case w.ch <- xenstore.Event{Path: p}:
	default:
		panic(fmt.Sprintf("memStore: watch on %s overflowed", w.prefix))
	}
}

// dump lists the nodes below p, for failure messages and cleanup checks.
func (m *memStore) below(p string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for q := range m.nodes {
		if strings.HasPrefix(q, p+"/") {
			out = append(out, q)
		}
	}
	slices.Sort(out)
	return out
}
