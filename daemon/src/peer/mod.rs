//! The peer protocol: request/response between members over the cluster endpoint's
//! [`Channel::Peer`](crate::net::Channel::Peer), and where an account's jobs live.
//!
//! - [`wire`]: the versioned, size-bounded MessagePack envelope (pure).
//! - [`rpc`]: [`PeerRpc`], requests with deadlines and concurrent, bounded handlers.
//! - [`placement`]: rendezvous hashing of accounts over live GPU members (pure).
//! - [`messages`]: the job requests and answers members exchange (pure).
//!
//! The job messages (forwarding, replication, leases, results) are bodies carried by this layer;
//! the RPC layer must never know their contents; [`crate::jobs`] acts on them.

pub mod messages;
pub mod placement;
pub mod rpc;
pub mod wire;

pub use rpc::{Caller, Handler, PeerRpc, RpcConfig, RpcError, RpcStats};
pub use wire::{PeerError, PeerErrorKind};
