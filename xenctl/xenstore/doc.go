// Package xenstore is a xenstore client in pure Go: the wire protocol of
// Xen's xs_wire.h over xenstored's unix socket (dom0) or Linux's
// /dev/xen/xenbus device (any domain, guests included).
//
// A Client owns one connection and one goroutine that reads it. Requests
// carry a request ID; replies are matched by it, so calls from many
// goroutines overlap. Watch events arrive on the same connection and are
// routed by token to the Watch that registered them, whose channel a
// goroutine of its own feeds, so a slow consumer never stalls replies.
//
//	caller --Read/Write/...--> request {type, req_id, tx_id, len} + payload
//	reader <-- reply (same req_id) | WATCH_EVENT path\0token\0 --> Watch.Events
//
// Every message read is validated before it is believed: the header's
// length against PayloadMax and its type against the protocol, before the
// payload is read; each reply's payload against the form its request type
// expects (nul-terminated string lists, "OK", decimal transaction IDs,
// known errno names); a reply of another type than its request is a
// protocol error. Error replies become *Error values that match the
// package's sentinels (ErrNotFound, ErrPermission, ErrAgain, ...) with
// errors.Is.
//
// What xenstored enforces and a client must live with (tools/xenstore,
// Xen 4.17): a node's value and children fit in one payload; an
// unprivileged domain's node takes at most 2048 bytes including its
// header and permissions, it may hold 1000 nodes, 128 watches and 10
// transactions; paths are checked as in ValidPath; relative paths are
// resolved against the connection's domain path (/local/domain/<domid>),
// and so are the paths of events of watches registered relatively, which
// is what lets a guest's code outlive a change of domain ID (a restored
// clone). Linux's xenbus device adds its own limits: a message of at most
// PayloadMax bytes including the header, one request at a time (a client
// of the device waits for each reply before it writes the next; see
// OpenDevice), and it answers watch requests itself.
package xenstore
