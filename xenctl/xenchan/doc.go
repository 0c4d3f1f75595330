// Package xenchan carries the guest API channel (package guestchan's
// line protocol) over xenstore, the way the original SnowFlock talked to
// its guests on Xen. Both ends are io.ReadWriteClosers of guestchan lines:
// Guest, for the guest's guest.Mux, over its own xenstore connection
// (/dev/xen/xenbus), and Host, for hostd's guest channel, over dom0's.
//
// # Layout
//
// For a domain d, with H = /local/domain/<d> (a guest's relative paths
// resolve against H):
//
//	H/data/snowflock/        guest's area (libxl makes data/ the guest's own)
//	    req/<id>/0 .. <n-1>  a request line, in chunks of at most ChunkSize
//	    req/<id>/n           the chunk count, written last: complete
//	    done/<id>            the guest has the answer to <id>
//	H/snowflock/             dom0's area: owner dom0, the guest may read
//	    epoch                a nonce, new with every domain (Prepare)
//	    identity             guestchan.Identity, JSON, for the guest
//	    resp/<id>/...        an answer, framed like a request; an empty
//	                         resp/<id> marks a call taken and not answered
//
// # A call
//
//  1. The guest writes req/<id>'s chunks, then its count node.
//  2. The host, watching H/data/snowflock, reads the complete request,
//     removes it from the guest's area, creates the empty resp/<id> and
//     hands the line to its reader (hostd).
//  3. hostd's answer is written under resp/<id>, count node last.
//  4. The guest, watching its relative "snowflock", reads the complete
//     answer, hands it to its Mux and writes done/<id>.
//  5. The host removes resp/<id> and done/<id>.
//
// Chunks exist because xenstored refuses a guest's node of 2048 bytes or
// more (value, 24-byte header and permissions) while guestchan messages may
// be 64 KiB. Writing the count last needs no transaction: one connection's
// writes apply in order, so a reader that sees the count sees every chunk.
// Nodes are written one request at a time, never overwritten while a
// reader may be between them: a new request needs a new ID, an answer's
// resp/<id> is removed and made empty before the call is handed on.
//
// # Trust
//
// The guest can write only below its own data/ (xenstored's permissions),
// and dom0's area is read-only to it, so it cannot forge answers or reach
// another domain's channel. The host attributes a request to the domain
// whose area it watches, checks every event's path against that area, and
// believes nothing else the guest wrote: node names must be canonical call
// IDs, counts at most MaxChunks, chunks non-empty and the whole at most
// guestchan.MaxMessage without a newline inside (which would smuggle a
// second line to hostd), and the line's "id" must be the node's. The host
// answers a bad request itself (CodeBadRequest, CodeTooLarge) without
// passing it on, and hangs up after maxBad in a row (ErrAbuse). It takes at
// most maxTaken calls at once and looks at most maxScan entries per scan;
// the rest waits in the guest's area, where xenstored's quotas (1000 nodes,
// 2 MB per domain) bound it.
//
// # Clones and restores
//
// A restored domain, clone or not, has a new domain ID and a new, empty
// xenstore tree; the guest's memory, with its Guest's state, is the
// parent's. Because the guest uses relative paths only, and Linux
// re-registers its xenstore watches after a restore, the Guest keeps
// working in the new domain without knowing its ID. Before the clone runs,
// the host's Prepare writes the new domain's areas, the answers the clone
// owes to calls pending at capture (Setup.Greeting: the clone call with k,
// the others CodeInterrupted), the identity, and last a new epoch. The
// watch's first event in the new domain makes the Guest scan: it delivers
// the greeting and, having seen the epoch change, fails with
// CodeInterrupted every outstanding call whose request is in the new
// domain neither as req/<id> nor as the host's resp/<id>, because the new
// domain's host never saw it. (Calls made since the resume are there: a
// clone may call again the moment its greeting arrives, before that scan
// ends.) A parent checkpointed with `xl save -c` keeps its domain, tree
// and epoch, and notices nothing.
//
// A host daemon that restarts makes a new Host for the domain: the calls
// the old one took and never answered (an empty resp/<id>) are answered
// CodeInternalHost, since their outcome is unknown.
package xenchan
