package memserver

import (
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/snowflock-go/snowflock/internal/aesgcm"
)

// ErrAuth is wrapped by the error that ends a connection when a sealed
// frame fails authentication: it was altered, replayed, reordered, cut
// short, or sealed with other keys.
var ErrAuth = errors.New("memserver: frame failed authentication")

// errKeyExhausted ends a connection whose keys have sealed as much as they
// may. The client reconnects, and the new connection has new keys.
var errKeyExhausted = errors.New("memserver: the connection's keys are used up")

const (
	tagLen      = 16 // AES-GCM tag
	gcmNonceLen = 12 // AES-GCM nonce: 4 zero bytes, then the frame counter

	// maxSealedFrames bounds the frames one direction of a connection
	// seals, so that its 64-bit counter, the AES-GCM nonce, never repeats.
	maxSealedFrames = math.MaxUint64
	// maxSealedBytes bounds the plaintext one key seals. It follows TLS
	// 1.3's advice for AES-GCM (RFC 8446, section 5.5: 2^24.5 records of
	// 2^14 bytes); a connection that would pass it is closed, and the
	// client's next one has fresh keys.
	maxSealedBytes = 1 << 38
)

// kdfLabel names what the keys are for, so that keys derived from a
// capability for anything else (another version, say) differ.
const kdfLabel = "snowflock memserver v2 "

// newNonce returns a random handshake nonce.
func newNonce() [nonceLen]byte {
	var n [nonceLen]byte
	rand.Read(n[:]) // never fails (crypto/rand crashes the program instead)
	return n
}

// sessionKeys are the AES-256 keys of a connection, one per direction.
type sessionKeys struct {
	clientToServer, serverToClient []byte
}

// deriveKeys derives a connection's keys with HKDF-SHA256: the capability
// is the secret, the two nonces the salt, and each key's info names the
// protocol, the direction and the snapshot. Everything the hello and its
// reply carry thus goes into the keys, and a changed byte in either makes
// the keys of the two ends differ.
func deriveKeys(c Capability, snapshotID string, clientNonce, serverNonce [nonceLen]byte) (sessionKeys, error) {
	salt := make([]byte, 0, 2*nonceLen)
	salt = append(append(salt, clientNonce[:]...), serverNonce[:]...)
	prk, err := hkdf.Extract(sha256.New, c[:], salt)
	if err != nil {
		return sessionKeys{}, fmt.Errorf("memserver: deriving keys: %w", err)
	}
	var k sessionKeys
	if k.clientToServer, err = hkdf.Expand(sha256.New, prk, kdfLabel+"client to server\x00"+snapshotID, 32); err != nil {
		return sessionKeys{}, fmt.Errorf("memserver: deriving keys: %w", err)
	}
	if k.serverToClient, err = hkdf.Expand(sha256.New, prk, kdfLabel+"server to client\x00"+snapshotID, 32); err != nil {
		return sessionKeys{}, fmt.Errorf("memserver: deriving keys: %w", err)
	}
	return k, nil
}

// session holds one end's keys of a connection: seal for what it sends,
// open for what it receives.
type session struct {
	seal *sealer
	open *opener
}

func newSession(sendKey, recvKey []byte) (*session, error) {
	send, err := newGCM(sendKey)
	if err != nil {
		return nil, err
	}
	recv, err := newGCM(recvKey)
	if err != nil {
		return nil, err
	}
	return &session{
		seal: &sealer{aead: send, limit: maxSealedFrames, budget: maxSealedBytes},
		open: &opener{aead: recv, limit: maxSealedFrames},
	}, nil
}

// clientSession is the client's end of a connection's session.
func clientSession(k sessionKeys) (*session, error) {
	return newSession(k.clientToServer, k.serverToClient)
}

// serverSession is the server's end of a connection's session.
func serverSession(k sessionKeys) (*session, error) {
	return newSession(k.serverToClient, k.clientToServer)
}

func newGCM(key []byte) (cipher.AEAD, error) {
	aead, err := aesgcm.New(key)
	if err != nil {
		return nil, fmt.Errorf("memserver: %w", err)
	}
	return aead, nil
}

// sealer seals the frames of one direction of a connection, in the order
// they are written: the nonce of a frame is its number in that order. Its
// user serialises calls (and the writes that follow them).
type sealer struct {
	aead   cipher.AEAD
	next   uint64 // the number of the next frame
	sealed uint64 // plaintext bytes sealed
	limit  uint64 // frames, at most maxSealedFrames
	budget uint64 // bytes, at most maxSealedBytes
	nonce  [gcmNonceLen]byte
}

// seal seals the frame at b[start:], a header (its length field is
// overwritten) then the plaintext body, in place: the body is encrypted,
// the tag appended, and the header authenticated with it. It grows b only
// if b has no room for the tag. Once the limits are reached it returns
// errKeyExhausted, and b cut back to start.
func (s *sealer) seal(b []byte, start int) ([]byte, error) {
	body := start + lengthLen + 1
	n := len(b) - body
	if s.next >= s.limit || uint64(n) > s.budget-s.sealed {
		return b[:start], errKeyExhausted
	}
	b = slices.Grow(b, tagLen)
	binary.BigEndian.PutUint32(b[start:], uint32(1+n+tagLen))
	binary.BigEndian.PutUint64(s.nonce[4:], s.next)
	s.next++
	s.sealed += uint64(n)
	s.aead.Seal(b[body:body], s.nonce[:], b[body:], b[start:body])
	return b[:len(b)+tagLen], nil
}

// opener opens the frames of one direction of a connection, which must
// come in the order they were sealed. Its user serialises calls.
type opener struct {
	aead  cipher.AEAD
	next  uint64 // the number of the next frame
	limit uint64
	nonce [gcmNonceLen]byte
	hdr   [lengthLen + 1]byte
}

// open authenticates a sealed frame of type typ whose body readFrame
// returned, and decrypts it in place. It returns the plaintext, which
// aliases body. A frame that fails (any but the next frame sealed, intact,
// with the peer's key) returns an error wrapping ErrAuth; the connection
// cannot go on after it.
func (o *opener) open(typ byte, body []byte) ([]byte, error) {
	if o.next >= o.limit {
		return nil, errKeyExhausted
	}
	if len(body) < tagLen {
		return nil, fmt.Errorf("%w: frame %d of type %d has %d bytes, shorter than a tag", ErrAuth, o.next, typ, len(body))
	}
	binary.BigEndian.PutUint32(o.hdr[:], uint32(1+len(body)))
	o.hdr[lengthLen] = typ
	binary.BigEndian.PutUint64(o.nonce[4:], o.next)
	pt, err := o.aead.Open(body[:0], o.nonce[:], body, o.hdr[:])
	if err != nil {
		return nil, fmt.Errorf("%w: frame %d of type %d and %d bytes", ErrAuth, o.next, typ, len(body))
	}
	o.next++
	return pt, nil
}
