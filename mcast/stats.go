package mcast

import (
	"math/rand/v2"
	"sync/atomic"
)

// Drops counts the packets an end dropped on receipt, by reason.
type Drops struct {
	Malformed uint64 // not a packet of this protocol, or a body that does not decode
	Session   uint64 // another session's
	Auth      uint64 // failed authentication: forged, altered, or sealed with another key
	Replay    uint64 // a sequence number already accepted, or older than the replay window
	Unknown   uint64 // from an origin that is not a member, or of a type this end does not take
	Injected  uint64 // dropped by the loss injector (tests)
	Overflow  uint64 // the sender's feedback queue was full
}

// SenderStats are a sender's counters since NewSender. Bytes are UDP
// payload bytes (add 28 per packet for IPv4 and UDP headers).
type SenderStats struct {
	PacketsSent    uint64
	BytesSent      uint64 // every packet: data, repairs, polls
	DataPackets    uint64 // first transmissions
	PayloadBytes   uint64 // object bytes in first transmissions
	RepairPackets  uint64
	RepairBytes    uint64 // wire bytes of repairs
	ParityPackets  uint64 // FEC repairs: parity packets
	ParityBytes    uint64 // wire bytes of parity packets
	NAKedParity    uint64 // parity symbols asked for and sent
	Polls          uint64
	Statuses       uint64 // feedback packets accepted
	NAKs           uint64 // feedback packets that asked for repairs
	NAKedFragments uint64 // fragments asked for and repaired one by one
	SuppressedNAKs uint64 // fragments asked for within the repair holdoff: served by one repair
	Evictions      uint64
	Drops          Drops
}

// ReceiverStats are a receiver's counters since NewReceiver.
type ReceiverStats struct {
	PacketsReceived uint64 // accepted: authentic, fresh, this session's
	BytesReceived   uint64 // wire bytes of accepted packets
	DataPackets     uint64
	Duplicates      uint64 // fragments already held (repairs others asked for)
	StatusesSent    uint64
	NAKsSent        uint64 // statuses that asked for repairs
	NAKedFragments  uint64 // fragments NAKed, and parity symbols asked for by block
	ParityPackets   uint64 // parity packets accepted
	ParityUsed      uint64 // parity packets that recovered a fragment
	Objects         uint64 // objects completed
	Abandoned       uint64 // objects the sender moved past before this member had them
	Drops           Drops
}

// drops is Drops with atomic counters: the reading goroutine adds, Stats
// reads.
type drops struct {
	malformed, session, auth, replay, unknown, injected, overflow atomic.Uint64
}

func (d *drops) snapshot() Drops {
	return Drops{Malformed: d.malformed.Load(), Session: d.session.Load(), Auth: d.auth.Load(), Replay: d.replay.Load(),
		Unknown: d.unknown.Load(), Injected: d.injected.Load(), Overflow: d.overflow.Load()}
}

// lossInjector drops received packets at random with a seeded generator,
// so that a test's losses repeat. Only the reading goroutine uses it.
type lossInjector struct {
	rate float64
	rng  *rand.Rand
}

// newLossInjector returns nil (no losses) for rate <= 0.
func newLossInjector(rate float64, seed uint64) *lossInjector {
	if rate <= 0 {
		return nil
	}
	return &lossInjector{rate: rate, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

func (l *lossInjector) drop() bool {
	return l != nil && l.rng.Float64() < l.rate
}
