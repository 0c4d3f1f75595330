// Package mcast is acknowledged, authenticated IPv4 multicast for
// SnowFlock: one Sender delivers objects (VM descriptors, memory) to the
// members of a session at once, knows when every member holds each object,
// and evicts members that stall so that one slow host cannot hold up the
// rest. It plays the part of mcdist in the original SnowFlock and borrows
// from NORM (RFC 5740) and PGM (RFC 3208): sender-driven sequencing,
// receiver NAKs, positive ACKs and a known member list.
//
// Data flow. The coordinator's placement fixes a session: an ID, a group
// address and port, a 32-byte key and the member IDs. The sender binds its
// one UDP socket to its address on the chosen interface, multicasts through
// that interface only (IP_MULTICAST_IF, TTL 1), and hears the members'
// feedback on the same socket; members join the group on their own
// interface address and send their feedback by unicast to the source
// address of the sender's packets. Nothing follows the default route.
//
//	Send(id, data) --> data packets (fragments within the MTU), repairs, polls --> group
//	members: reassemble; statuses (cumulative ACK + selective NAKs) --> sender
//	Send returns when every active member ACKed the whole object or was evicted
//
// Reliability. The sender sends each fragment once, repairs first, and
// never more than Window fragments beyond the slowest active member's
// cumulative ACK: flow control follows the members' feedback (and an
// optional token-bucket Rate caps the bytes per second). A member NAKs the
// fragments it saw pass by (a gap, or a poll announcing how many were
// sent) at once, and again after NakRetry if they have not come; it ACKs
// every AckEvery fragments, every Tick while incomplete (but no sooner
// than StatusGap after its last status), on every poll and on completion. The sender repairs a NAKed fragment by multicast once per
// RepairHoldoff, however many members ask: N members missing the same
// fragment cost one repair (suppression at the sender, as feedback is
// unicast). With FEC (SenderConfig.BlockSize, 64 by default) fragments
// form blocks of K; a member NAKs a block by how many parity symbols it
// needs (the fragments it misses there, less the symbols it holds), and
// the sender answers with new Reed-Solomon parity packets over GF(2^8)
// (fec.go), sealed like data: any m of them recover any m missing
// fragments of the block, so one parity packet repairs a different loss
// at every member and a block costs the most that one member misses, as
// in NORM. Polls every PollInterval recover lost tails and lost statuses.
// A member that is behind and whose ACK has not moved for StallTimeout
// (stopped, killed, or not reading) is evicted: it is named in every later
// poll, heartbeat and bye, and its Receive returns ErrEvicted, which tells
// it to fetch by unicast instead. Evicted members stay out of the session.
//
// Security. Each origin (the sender; each member) seals its packets with
// AES-256-GCM under its own key, derived with HKDF-SHA256 from the session
// key and the session ID. The nonce is a random per-process 4-byte salt
// and a 64-bit packet counter; the clear header (version, type, session,
// origin, salt, sequence number) is the additional data. Receivers keep an
// 8192-packet replay window per (origin, salt). Packets of other sessions,
// forged, altered or replayed packets, and packets of unknown origins are
// dropped and counted by reason in Stats. A member's tag (the origin field)
// is a hash of its ID; the sender checks the tags of its members differ.
//
// Objects. Object IDs are the caller's; an object is up to 2^32-1
// fragments, delivered whole to Receive (ReceiverConfig.MaxObjectSize
// bounds what a member allocates). Memory can travel as one large object
// or as many page-run objects; a receiver's completed objects are queued
// (ReceiverConfig.Queue), and a member whose application stops receiving
// stops reading, and is evicted like any stalled member.
//
// Wire format: see packet.go. Tests inject seeded loss in every receive
// path (ReceiverConfig.LossRate, SenderConfig.LossRate). Not done: rate
// adaptation beyond the ACK window (the window is fixed; an AIMD window
// was tried and lost speed), proactive (unrequested) parity, IPv6,
// re-admitting an evicted member, and batched system calls (sendmmsg of
// 32-packet bursts overflowed the socket buffers of emulated NICs in the
// nested Xen bed; recvmmsg alone gained nothing there).
package mcast
