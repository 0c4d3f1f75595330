// Package memserver serves the frozen memory of a parent VM to its clones,
// one 4 KiB page at a time: SnowFlock's memory on demand.
//
// # Data flow
//
// When a parent VM clones, its hostd freezes the parent's RAM as an
// immutable snapshot (a file on tmpfs, sparse where the guest never wrote)
// and calls Server.Register, which opens the file and returns a random
// per-snapshot Capability. The capability travels with the descriptor to the
// clone hosts (never over this protocol). A clone host Dials the parent
// host's memserver with the snapshot ID and capability, and Fetches a page
// the first time one of its clones touches it. When the ticket is disposed
// hostd calls Release.
//
//	parent RAM --freeze--> snapshot file --Register--> Server --TCP--> Client.Fetch --> clone
//
// Pages that are holes in the file (found with SEEK_DATA, without reading
// them) or that read as all zeros are answered as "zero" and carry no data.
//
// # Wire format (version 2)
//
// A connection carries frames. Every frame is a big-endian uint32 length
// (of what follows it), a type byte and a body; integers are big-endian.
// The first two frames each way are the handshake; the hello and hello
// reply travel in the clear, every frame after them is sealed.
//
//	hello       0x01  "SFMS" | version u16 | id length u8 | id | client nonce [32]
//	hello reply 0x02  version u16 | status u8 | body
//	  status 0 ok:            server nonce [32]
//	  1 refused, 2 version:   12 zero bytes (version 1's layout)
//	finish      0x05  sealed, empty plaintext
//	accept      0x06  sealed: max batch u32 | snapshot pages u64
//	request     0x03  sealed: request ID u64 | n u16 | n x (first page u64 | count u32)
//	response    0x04  sealed: request ID u64 | status u8 | body
//	  status 0 ok:    count u32 | kind u8 x count (0 zero, 1 data) | 4096 bytes per data page
//	  1 out of range, 2 released, 3 read error:
//	                  message length u16 | UTF-8 message (at most 256 bytes)
//
// Handshake. The client sends a hello with the snapshot ID and 32 random
// bytes. A server of another version answers version (telling its own) and
// closes; otherwise it answers ok with 32 random bytes of its own, whether
// or not it has the snapshot. Both ends then derive two AES-256-GCM keys,
// one per direction, with HKDF-SHA256: the capability is the secret, the
// client's then the server's nonce the salt, and the info
// "snowflock memserver v2 client to server" (or "server to client"), a zero
// byte and the snapshot ID. The client proves it holds the capability by
// sending a finish, the first frame sealed with its key. A server that
// cannot open it (wrong capability, or an unknown or released snapshot, for
// which it derived keys from a random capability of its own) answers
// refused, in the clear, and closes; the client returns an error wrapping
// ErrRefused. A server that can sends an accept, which proves in turn that
// it holds the capability, with the largest batch it accepts and the
// snapshot's size in pages.
//
// Sealing. A sealed frame is a frame whose body is the AES-GCM encryption
// of its plaintext body followed by the 16-byte tag; the frame's length
// (of the sealed body) and type are the additional data. The nonce of a
// frame is 4 zero bytes and a 64-bit counter, one per direction, starting
// at 0 with the finish and the accept and counting every frame sealed: it
// is never sent, so a frame opens only in its place in the stream. A frame
// that does not open (altered, replayed, reordered, dropped before it, cut
// short, or sealed with other keys) ends the connection; the server counts
// it in Stats.AuthFailures, the client fails the connection with an error
// wrapping ErrAuth and reconnects. A connection whose keys have sealed 2^38
// bytes (or would reuse a counter) is closed, and the client's next
// connection has fresh keys.
//
// After the accept, the client sends requests and the server answers each
// with a response carrying the same request ID. A client may pipeline:
// several requests may be in flight on one connection and their responses
// may come back in any order (each is sealed as it is written). The pages of
// a response are those of the request's ranges, in order. A page outside
// the snapshot makes the whole request fail with status out-of-range;
// nothing is read.
//
// Peers are untrusted. Every frame's length is checked against the largest
// frame its type and the negotiated batch allow before anything is
// allocated; a frame that is malformed, too long, of an unexpected type or
// asks for more than the batch limit closes the connection (and is counted)
// without affecting other connections.
//
// # Security
//
// What the protocol gives, against anyone on the network without the
// capability: the capability never travels; pages and requests are
// encrypted and authenticated, both ways; each end knows the other holds the
// capability before it trusts anything it says; frames cannot be altered,
// replayed, reordered or dropped unnoticed, within a connection or from
// another one (a replayed session meets a new server nonce, so new keys).
// An unknown snapshot is refused exactly as a wrong capability is.
//
// What it does not give:
//   - Forward secrecy. The keys derive from the capability and nonces sent
//     in the clear, so whoever later learns a capability can decrypt
//     recorded connections for its snapshot. That is accepted: the
//     capability already grants the snapshot's memory, and a snapshot lives
//     only as long as its clones' tickets.
//   - Privacy of the metadata: the snapshot ID, the sizes and timing of
//     requests and responses (so how many pages of a batch were zero), and
//     the snapshot's size to whoever holds the capability.
//   - Protection against denial of service: anyone on the path can reset a
//     connection, and the clear refusal can be forged to make a client
//     give up with ErrRefused. Altering the handshake also ends in a
//     refusal, since the two ends then derive different keys.
//   - Protection against the hosts themselves: any holder of the
//     capability, which every clone host of the snapshot has, reads the
//     snapshot.
//
// # Snapshot lifetime
//
// A snapshot is served from Register until Release. Release takes effect at
// once for everything that has not started: new hellos are refused, and
// requests that arrive later, even on connections opened before, fail with
// status released (the client returns ErrReleased). A request that is
// already reading the snapshot when Release is called completes normally,
// and the snapshot's file is closed as soon as the last such request has
// read its pages. Release does not wait for that. Server.Close releases
// every snapshot, after the requests it interrupts have stopped.
//
// # Failures
//
// The client reconnects when its connection fails or a response does not
// come within ClientConfig.Timeout, with exponential backoff; a Fetch that
// exhausts ClientConfig.Retries returns an error wrapping ErrUnavailable.
// A fault never hangs silently: the clone fails loudly instead.
package memserver
