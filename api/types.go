// Package api is the coordinator's HTTP/JSON API: the request and response
// types shared by server and clients, and a Go client that hosts and the CLI
// use.
//
// Every endpoint lives under /v1/. Writes may be sent to any coordinator: a
// follower forwards them to the leader, holding them up to 5 s while there is
// none. Reads are linearizable unless ?stale is given. List and get endpoints
// accept Consul-style blocking queries (?index=N&wait=30s): the answer comes
// when the returned X-Index exceeds N or the wait runs out. Errors are JSON
// {"error": "...", "code": "..."} with a stable code (see fsm.Code plus the
// codes below).
package api

import (
	"github.com/snowflock-go/snowflock/fsm"
)

// Error codes that are not FSM errors.
const (
	CodeNoLeader       = "no_leader"       // no leader within the hold time: retry
	CodeNotLeader      = "not_leader"      // a forwarded request reached a follower: retry
	CodeUnknownOutcome = "unknown_outcome" // leadership lost while applying: retry with the same request_id
	CodeUnauthorized   = "unauthorized"
	CodeTooLarge       = "too_large"
	CodeBadRequest     = "bad_request"
)

// ErrorBody is the JSON body of every error response.
type ErrorBody struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Status is GET /v1/status.
type Status struct {
	NodeID       string `json:"node_id"`
	State        string `json:"state"` // Leader, Follower, Candidate, Shutdown
	Leader       string `json:"leader"`
	LeaderID     string `json:"leader_id"`
	Term         uint64 `json:"term"`
	CommitIndex  uint64 `json:"commit_index"`
	AppliedIndex uint64 `json:"applied_index"`
	LastIndex    uint64 `json:"last_index"`
	Peers        int    `json:"peers"`
}

// Member is one entry of GET /v1/members.
type Member struct {
	Name   string `json:"name"`
	Addr   string `json:"addr"`
	Status string `json:"status"`
	Role   string `json:"role"`
	API    string `json:"api,omitempty"`
	Raft   string `json:"raft,omitempty"`
	Slots  int    `json:"slots,omitempty"`
	MemMB  int64  `json:"mem_mb,omitempty"`
}

// JoinRequest is POST /v1/join: gossip addresses to join.
type JoinRequest struct {
	Addrs []string `json:"addrs"`
}

// JoinResponse tells how many of the addresses answered.
type JoinResponse struct {
	Joined int `json:"joined"`
}

// Peer is one entry of GET /v1/raft/peers.
type Peer struct {
	ID      string `json:"id"`
	Address string `json:"address"`
	State   string `json:"state"` // leader or follower
	Voter   bool   `json:"voter"`
}

// RemovePeerRequest is POST /v1/raft/remove-peer.
type RemovePeerRequest struct {
	ID string `json:"id"`
}

// HostRequest is PUT /v1/hosts/{id}: register a host or update it.
type HostRequest struct {
	GossipAddr string `json:"gossip_addr"`
	APIAddr    string `json:"api_addr"`
	McastAddr  string `json:"mcast_addr,omitempty"`
	Slots      int    `json:"slots"`
	MemMB      int64  `json:"mem_mb"`
}

// HostFailRequest is POST /v1/hosts/{id}/fail.
type HostFailRequest struct {
	Left   bool   `json:"left"`
	Reason string `json:"reason"`
}

// VMRequest is POST /v1/vms: record a new parent VM. With Launch its host
// starts it (sfcoord vm run); Host may then be empty and the leader picks
// the alive host with the most free memory.
type VMRequest struct {
	RequestID string `json:"request_id,omitempty"`
	Name      string `json:"name"`
	Host      string `json:"host,omitempty"`
	MemMB     int64  `json:"mem_mb"`
	VCPUs     int    `json:"vcpus"`
	Launch    bool   `json:"launch,omitempty"`
	Kernel    string `json:"kernel,omitempty"`
	Initrd    string `json:"initrd,omitempty"`
	Cmd       string `json:"cmd,omitempty"`
}

// VMEndRequest is POST /v1/vms/{id}/end.
type VMEndRequest struct {
	Reason string `json:"reason"`
}

// CloneStateRequest is POST /v1/vms/{id}/clone-state: a host reports its
// clone running or failed, or relays the clone's exit.
type CloneStateRequest struct {
	RequestID string         `json:"request_id,omitempty"`
	State     fsm.CloneState `json:"state"`
	Status    int            `json:"status"`
	Result    string         `json:"result,omitempty"`
	Reason    string         `json:"reason,omitempty"`
}

// TicketRequest is POST /v1/tickets: request_ticket(n) for a parent VM.
type TicketRequest struct {
	RequestID string `json:"request_id,omitempty"`
	ParentVM  uint64 `json:"parent_vm"`
	N         int    `json:"n"`
}

// DescriptorRequest registers a descriptor: POST /v1/descriptors, or the
// clone call POST /v1/tickets/{id}/clone, or POST /v1/checkpoints.
type DescriptorRequest struct {
	RequestID     string `json:"request_id,omitempty"`
	ParentVM      uint64 `json:"parent_vm"`
	Host          string `json:"host"`
	Size          int64  `json:"size"`
	SHA256        string `json:"sha256"`
	MemserverAddr string `json:"memserver_addr"`
	McastGroup    string `json:"mcast_group,omitempty"`
	PageCount     int64  `json:"page_count"`
}

// CloneResponse answers the clone call.
type CloneResponse struct {
	Descriptor fsm.Descriptor `json:"descriptor"`
	Ticket     fsm.TicketView `json:"ticket"`
}

// CallerRequest names the VM making a call (join, kill).
type CallerRequest struct {
	RequestID string `json:"request_id,omitempty"`
	Caller    uint64 `json:"caller"`
	Reason    string `json:"reason,omitempty"`
}

// CreateClonesRequest is POST /v1/tickets/{id}/create-clones.
type CreateClonesRequest struct {
	RequestID  string `json:"request_id,omitempty"`
	Caller     uint64 `json:"caller"`
	Checkpoint uint64 `json:"checkpoint"`
}
