// Package memserver serves the frozen memory of a parent VM to its clones,
// one 4 KiB page at a time: SnowFlock's memory on demand.
//
// # Data flow
//
// When a parent VM clones, its hostd freezes the parent's RAM as an
// immutable snapshot (a file on tmpfs, sparse where the guest never wrote)
// and calls Server.Register, which opens the file and returns a random
// per-snapshot Capability. The capability travels with the descriptor to the
// clone hosts. A clone host Dials the parent host's memserver with the
// snapshot ID and capability, and Fetches a page the first time one of its
// clones touches it. When the ticket is disposed hostd calls Release.
//
//	parent RAM --freeze--> snapshot file --Register--> Server --TCP--> Client.Fetch --> clone
//
// Pages that are holes in the file (found with SEEK_DATA, without reading
// them) or that read as all zeros are answered as "zero" and carry no data.
//
// # Wire format (version 1)
//
// A connection carries frames. Every frame is a big-endian uint32 length
// (of what follows it), a type byte and a body; integers are big-endian.
//
//	hello       0x01  "SFMS" | version u16 | id length u8 | id | capability [32]
//	hello reply 0x02  version u16 | status u8 | max batch u32 | snapshot pages u64
//	  status: 0 ok, 1 refused, 2 version (batch and pages are 0 unless ok)
//	request     0x03  request ID u64 | n u16 | n x (first page u64 | count u32)
//	response    0x04  request ID u64 | status u8 | body
//	  status 0 ok:    count u32 | kind u8 x count (0 zero, 1 data) | 4096 bytes per data page
//	  1 out of range, 2 released, 3 read error:
//	                  message length u16 | UTF-8 message (at most 256 bytes)
//
// The client opens with a hello; the server answers ok (with the largest
// batch it accepts and the snapshot's size in pages), refused (unknown
// snapshot or wrong capability, which are not told apart, and the
// connection is closed) or version (the server's version; closed). After an
// ok, the client sends requests and the server answers each with a response
// carrying the same request ID. A client may pipeline: several requests may
// be in flight on one connection and their responses may come back in any
// order. The pages of a response are those of the request's ranges, in
// order. A page outside the snapshot makes the whole request fail with
// status out-of-range; nothing is read.
//
// Peers are untrusted. Every frame's length is checked against the largest
// frame its type and the negotiated batch allow before anything is
// allocated; a frame that is malformed, too long, of an unexpected type or
// asks for more than the batch limit closes the connection (and is counted)
// without affecting other connections. The capability is compared in
// constant time. Note that version 1 sends the capability and the pages in
// the clear: it relies on the hosts' network being private (see DESIGN.md,
// "Security").
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
