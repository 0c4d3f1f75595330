package memserver

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The handshake, both ends. The client proves it holds the capability
// before the server says anything about the snapshot, and the server proves
// it in its accept; see the package documentation.

// handshake runs the server's end of a connection's handshake. It returns
// the snapshot the connection is bound to and its session, or nil if the
// connection must be closed.
//
// The server answers a hello for an unknown snapshot as it answers one for
// a known snapshot, and derives keys from a random capability of its own:
// the client's finish then fails to open just as with a wrong capability,
// so a client without the capability cannot tell the two apart.
func (s *Server) handshake(nc net.Conn, br *bufio.Reader, log hclog.Logger) (*snapshot, *session) {
	nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	typ, body, err := readFrame(br, maxHelloFrame, nil)
	if err == nil && typ != frameHello {
		err = protocolError("frame type %d before the hello", typ)
	}
	var h hello
	if err == nil {
		h, err = decodeHello(body)
	}
	write := func(b []byte) bool {
		s.metrics.sentBytes.Add(uint64(len(b)))
		if _, err := nc.Write(b); err != nil {
			log.Debug("handshake write failed", "error", err)
			return false
		}
		return true
	}
	refuse := func(status byte) {
		write(appendHelloReply(nil, helloReply{version: ProtocolVersion, status: status}))
	}
	switch {
	case errors.Is(err, errVersion):
		s.metrics.refused.Add(1)
		log.Warn("hello refused: version", "version", h.version)
		refuse(helloVersion)
		return nil, nil
	case err != nil:
		s.connError(log, err)
		return nil, nil
	}

	reply := helloReply{version: ProtocolVersion, status: helloOK, nonce: newNonce()}
	if !write(appendHelloReply(nil, reply)) {
		return nil, nil
	}
	typ, body, err = readFrame(br, finishFrameLen, nil)
	if err == nil && typ != frameFinish {
		err = protocolError("frame type %d instead of a finish", typ)
	}
	if err != nil {
		s.connError(log, err)
		return nil, nil
	}
	snap := s.lookup(h.snapshotID)
	c := s.refusedCapability
	if snap != nil {
		c = snap.capability
	}
	keys, err := deriveKeys(c, h.snapshotID, h.nonce, reply.nonce)
	var sess *session
	if err == nil {
		sess, err = serverSession(keys)
	}
	if err != nil {
		log.Error("handshake failed", "error", err)
		return nil, nil
	}
	if s.testSealLimit != 0 {
		sess.seal.limit = s.testSealLimit
	}
	// The finish has no plaintext: it opens only under the keys of the
	// snapshot's capability.
	if _, err := sess.open.open(typ, body); err != nil || snap == nil {
		s.metrics.refused.Add(1)
		log.Warn("hello refused: unknown snapshot or wrong capability", "snapshot", h.snapshotID)
		refuse(helloRefused)
		return nil, nil
	}
	b, err := sess.seal.seal(appendAccept(nil, accept{maxBatch: uint32(s.cfg.MaxBatch), pages: snap.pages}), 0)
	if err != nil || !write(b) {
		return nil, nil
	}
	nc.SetDeadline(time.Time{})
	log.Debug("client connected", "snapshot", h.snapshotID)
	return snap, sess
}

// handshake runs the client's end of a connection's handshake. A refusal
// returns an error wrapping ErrRefused; anything else that goes wrong is a
// connError, which a new connection may cure.
func (c *Client) handshake(nc net.Conn) (accept, *session, error) {
	h := hello{version: ProtocolVersion, snapshotID: c.snapshotID, nonce: newNonce()}
	if _, err := nc.Write(appendHello(nil, h)); err != nil {
		return accept{}, nil, &connError{err}
	}
	typ, body, err := readFrame(nc, maxHelloReplyFrame, nil)
	if err == nil && typ != frameHelloReply {
		err = protocolError("frame type %d instead of a hello reply", typ)
	}
	var r helloReply
	if err == nil {
		r, err = decodeHelloReply(body)
	}
	if err != nil {
		return accept{}, nil, &connError{err}
	}
	if r.status != helloOK {
		return accept{}, nil, c.refusal(r)
	}

	keys, err := deriveKeys(c.capability, c.snapshotID, h.nonce, r.nonce)
	if err != nil {
		return accept{}, nil, err
	}
	sess, err := clientSession(keys)
	if err != nil {
		return accept{}, nil, err
	}
	finish, err := sess.seal.seal(beginFrame(nil, frameFinish), 0)
	if err != nil {
		return accept{}, nil, err
	}
	if _, err := nc.Write(finish); err != nil {
		return accept{}, nil, &connError{err}
	}
	// A server that cannot open the finish refuses in the clear, since the
	// two ends do not share keys; one that can answers with a sealed accept.
	typ, body, err = readFrame(nc, max(maxHelloReplyFrame, acceptFrameLen), nil)
	if err != nil {
		return accept{}, nil, &connError{err}
	}
	switch typ {
	case frameHelloReply:
		r, err := decodeHelloReply(body)
		if err == nil && r.status == helloOK {
			err = protocolError("a second hello reply")
		}
		if err != nil {
			return accept{}, nil, &connError{err}
		}
		return accept{}, nil, c.refusal(r)
	case frameAccept:
		pt, err := sess.open.open(typ, body)
		var a accept
		if err == nil {
			a, err = decodeAccept(pt)
		}
		if err != nil {
			return accept{}, nil, &connError{err}
		}
		return a, sess, nil
	default:
		return accept{}, nil, &connError{protocolError("frame type %d instead of an accept", typ)}
	}
}

// refusal is the error for a hello reply that refuses.
func (c *Client) refusal(r helloReply) error {
	if r.status == helloVersion {
		return fmt.Errorf("%w: %s speaks protocol version %d, not %d", ErrRefused, c.addr, r.version, ProtocolVersion)
	}
	return fmt.Errorf("%w: snapshot %s at %s: unknown snapshot or wrong capability", ErrRefused, c.snapshotID, c.addr)
}
