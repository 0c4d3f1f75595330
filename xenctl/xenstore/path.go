package xenstore

import (
	"fmt"
	"strconv"
	"strings"
)

// Special watch paths: xenstored fires them when a domain is introduced
// or released. Only dom0 (and domains given the right) may watch them.
const (
	WatchIntroduceDomain = "@introduceDomain"
	WatchReleaseDomain   = "@releaseDomain"
)

// DomainPath is the home of a domain's nodes, the same string
// GetDomainPath returns and against which xenstored resolves the relative
// paths a domain sends.
func DomainPath(domid uint32) string {
	return "/local/domain/" + strconv.FormatUint(uint64(domid), 10)
}

// ValidPath checks a node path the way xenstored does (is_valid_nodename):
// absolute ("/local/domain/3/data") or relative to the connection's domain
// path ("data/x"); characters from [A-Za-z0-9_@/-]; no empty component;
// no trailing slash but for "/". Absolute paths may be AbsPathMax bytes,
// relative ones RelPathMax.
func ValidPath(p string) error {
	if p == "" {
		return fmt.Errorf("%w: empty path", ErrInvalid)
	}
	limit := RelPathMax
	if p[0] == '/' {
		limit = AbsPathMax
	}
	if len(p) > limit {
		return fmt.Errorf("%w: path of %d bytes, limit %d", ErrInvalid, len(p), limit)
	}
	if p == "/" {
		return nil
	}
	if p[len(p)-1] == '/' || strings.Contains(p, "//") {
		return fmt.Errorf("%w: path %q has an empty component", ErrInvalid, p)
	}
	for i := 0; i < len(p); i++ {
		if !pathChar(p[i]) {
			return fmt.Errorf("%w: path %q has character %q", ErrInvalid, p, p[i])
		}
	}
	return nil
}

func pathChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '-' || c == '/' || c == '_' || c == '@'
}

// validWatchPath accepts a node path or one of the special watch paths.
func validWatchPath(p string) error {
	if p == WatchIntroduceDomain || p == WatchReleaseDomain {
		return nil
	}
	return ValidPath(p)
}

// Access is what a permission entry allows.
type Access uint8

// Accesses, spelled on the wire as n, r, w and b.
const (
	AccessNone  Access = 0
	AccessRead  Access = 1
	AccessWrite Access = 2
	AccessBoth  Access = AccessRead | AccessWrite
)

// Perm is one entry of a node's permission list. The first entry of a
// list names the node's owner, who may do anything, and gives the access
// of every domain the list does not name; later entries give named
// domains their access. Dom0 ignores permissions.
type Perm struct {
	Domain uint32
	Access Access
}

var accessChars = [...]byte{AccessNone: 'n', AccessRead: 'r', AccessWrite: 'w', AccessBoth: 'b'}

// String is the wire form: "r5", "n0".
func (p Perm) String() string {
	if int(p.Access) >= len(accessChars) {
		return fmt.Sprintf("?%d", p.Domain)
	}
	return string(accessChars[p.Access]) + strconv.FormatUint(uint64(p.Domain), 10)
}

// domidMax bounds the domain IDs of permissions: Xen's domid_t is 16 bits.
const domidMax = 0xffff

// ParsePerm parses the wire form of a permission entry.
func ParsePerm(s string) (Perm, error) {
	if len(s) < 2 {
		return Perm{}, fmt.Errorf("%w: permission %q", ErrInvalid, s)
	}
	var p Perm
	switch s[0] {
	case 'n':
		p.Access = AccessNone
	case 'r':
		p.Access = AccessRead
	case 'w':
		p.Access = AccessWrite
	case 'b':
		p.Access = AccessBoth
	default:
		return Perm{}, fmt.Errorf("%w: permission %q", ErrInvalid, s)
	}
	// Decimal only: xenstored writes %i of the domid. A sign or leading
	// zeros would round-trip differently.
	digits := s[1:]
	if digits[0] == '+' || digits[0] == '-' || (len(digits) > 1 && digits[0] == '0') {
		return Perm{}, fmt.Errorf("%w: permission %q", ErrInvalid, s)
	}
	d, err := strconv.ParseUint(digits, 10, 32)
	if err != nil || d > domidMax {
		return Perm{}, fmt.Errorf("%w: permission %q", ErrInvalid, s)
	}
	p.Domain = uint32(d)
	return p, nil
}

func validPerms(perms []Perm) error {
	if len(perms) == 0 {
		return fmt.Errorf("%w: empty permission list", ErrInvalid)
	}
	for _, p := range perms {
		if p.Access > AccessBoth || p.Domain > domidMax {
			return fmt.Errorf("%w: permission %+v", ErrInvalid, p)
		}
	}
	return nil
}

// parsePerms decodes a GET_PERMS reply.
func parsePerms(payload []byte) ([]Perm, error) {
	s, err := SplitStrings(payload)
	if err != nil {
		return nil, err
	}
	if len(s) == 0 {
		return nil, protoErr("empty permission list")
	}
	perms := make([]Perm, len(s))
	for i, x := range s {
		if perms[i], err = ParsePerm(x); err != nil {
			return nil, protoErr("%v", err)
		}
	}
	return perms, nil
}
