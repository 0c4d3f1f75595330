package mcast

import (
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/snowflock-go/snowflock/internal/aesgcm"
)

// kdfLabel names what the keys are for, so that keys derived from a session
// key for anything else differ.
const kdfLabel = "snowflock mcast v1 "

// errAuth is wrapped when a packet fails authentication.
var errAuth = errors.New("mcast: packet failed authentication")

// memberTag is the origin of a member's packets: 4 bytes of a hash of its
// ID, never 0 (the sender's origin).
func memberTag(id string) uint32 {
	h := sha256.Sum256([]byte(kdfLabel + "member tag\x00" + id))
	if t := binary.BigEndian.Uint32(h[:]); t != 0 {
		return t
	}
	return 1
}

// deriveAEAD derives the key of one origin with HKDF-SHA256: the session key
// is the secret, the session ID the salt, and the info names the origin
// ("sender" or a member's ID). Every origin thus seals with its own key, and
// a nonce need only be unique per origin.
func deriveAEAD(key [32]byte, session uint64, origin string) (cipher.AEAD, error) {
	salt := binary.BigEndian.AppendUint64(nil, session)
	k, err := hkdf.Key(sha256.New, key[:], salt, kdfLabel+origin, 32)
	if err != nil {
		return nil, fmt.Errorf("mcast: deriving keys: %w", err)
	}
	aead, err := aesgcm.New(k)
	if err != nil {
		return nil, fmt.Errorf("mcast: %w", err)
	}
	return aead, nil
}

func senderAEAD(key [32]byte, session uint64) (cipher.AEAD, error) {
	return deriveAEAD(key, session, "sender")
}

func memberAEAD(key [32]byte, session uint64, id string) (cipher.AEAD, error) {
	return deriveAEAD(key, session, "member\x00"+id)
}

// sealer seals the packets of one origin. The nonce is the origin's random
// salt and a counter, so it never repeats within a process; two processes
// of one origin in one session collide only if they draw the same salt.
// The user serialises calls.
type sealer struct {
	aead    cipher.AEAD
	session uint64
	origin  uint32
	salt    uint32
	next    uint64
	nonce   [12]byte
}

func newSealer(aead cipher.AEAD, session uint64, origin uint32) *sealer {
	var salt [4]byte
	rand.Read(salt[:]) // never fails
	s := &sealer{aead: aead, session: session, origin: origin, salt: binary.BigEndian.Uint32(salt[:])}
	binary.BigEndian.PutUint32(s.nonce[:], s.salt)
	return s
}

// seal appends a sealed packet of type typ to b[:0]: the header, then the
// body that appendBody appends, encrypted, then the tag.
func (s *sealer) seal(b []byte, typ byte, appendBody func([]byte) []byte) []byte {
	seq := s.next
	s.next++
	b = appendHeader(b[:0], header{typ: typ, session: s.session, origin: s.origin, salt: s.salt, seq: seq})
	b = appendBody(b)
	binary.BigEndian.PutUint64(s.nonce[4:], seq)
	return s.aead.Seal(b[:headerLen], s.nonce[:], b[headerLen:], b[:headerLen])
}

// open authenticates and decrypts, in place, the body of packet b whose
// header is h. The plaintext aliases b.
func open(aead cipher.AEAD, h header, b []byte) ([]byte, error) {
	var nonce [12]byte
	binary.BigEndian.PutUint32(nonce[:], h.salt)
	binary.BigEndian.PutUint64(nonce[4:], h.seq)
	pt, err := aead.Open(b[headerLen:headerLen], nonce[:], b[headerLen:], b[:headerLen])
	if err != nil {
		return nil, fmt.Errorf("%w: type %d, origin %#x, seq %d", errAuth, h.typ, h.origin, h.seq)
	}
	return pt, nil
}

// replayWindow remembers which of the last windowBits sequence numbers of
// one (origin, salt) it has accepted, as IPsec does (RFC 4303, 3.4.3):
// anything older than the window, or seen, is a replay.
type replayWindow struct {
	top  uint64 // highest accepted seq + 1; 0 before the first
	bits [windowBits / 64]uint64
}

const windowBits = 8192

// fresh reports whether seq may be accepted; it does not record it.
func (w *replayWindow) fresh(seq uint64) bool {
	if seq >= w.top {
		return true
	}
	if w.top-seq > windowBits {
		return false
	}
	return w.bits[(seq/64)%uint64(len(w.bits))]&(1<<(seq%64)) == 0
}

// accept records seq, which fresh approved and which authenticated.
func (w *replayWindow) accept(seq uint64) {
	if seq >= w.top {
		// The positions the window slides over held sequence numbers that
		// have now left it.
		if seq-w.top >= windowBits {
			w.bits = [len(w.bits)]uint64{}
		} else {
			for s := w.top; s < seq; s++ {
				w.bits[(s/64)%uint64(len(w.bits))] &^= 1 << (s % 64)
			}
		}
		w.top = seq + 1
	}
	w.bits[(seq/64)%uint64(len(w.bits))] |= 1 << (seq % 64)
}

// replayGuard keeps the replay windows of one origin, one per salt (one
// per process that sealed with the origin's key), at most maxSalts.
type replayGuard struct {
	salts []uint32
	wins  []*replayWindow
}

const maxSalts = 4

func (g *replayGuard) window(salt uint32) *replayWindow {
	for i, s := range g.salts {
		if s == salt {
			return g.wins[i]
		}
	}
	if len(g.salts) == maxSalts {
		g.salts, g.wins = g.salts[1:], g.wins[1:]
	}
	w := &replayWindow{}
	g.salts, g.wins = append(g.salts, salt), append(g.wins, w)
	return w
}
