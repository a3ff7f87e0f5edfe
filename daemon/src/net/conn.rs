//! The small seam every transport implements: one established, authenticated connection,
//! split into a shared sending side ([`Conn`]) and a reading side owned by one reader task
//! ([`ConnReader`]). The endpoint logic (cache, queues, routing, stats) lives above it and is
//! the same for QUIC, TLS-over-TCP and the in-memory network.
//!
//! Implementations move opaque frames (header included) and never decode them.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// The sending side of a connection. Cheap to call from several tasks.
#[async_trait]
pub(crate) trait Conn: Send + Sync + 'static {
    /// Sends one frame. Returns once the frame is handed to the transport (not acknowledged).
    async fn send_frame(&self, frame: Bytes) -> anyhow::Result<()>;
    /// The address the connection comes from (or goes to): a NAT source for accepted ones.
    fn remote_addr(&self) -> SocketAddr;
    /// The peer's certificate common name (the name given to the in-memory network).
    fn peer_name(&self) -> Arc<str>;
    /// Closes the connection; the reader then ends. Idempotent, never waits.
    fn close(&self);
    fn is_closed(&self) -> bool;
}

/// What a reader got.
pub(crate) enum Read {
    Frame(Bytes),
    /// A frame that could not be read (too long, reset); the connection stays usable.
    Dropped(String),
    /// The connection ended; `Some` names a protocol violation that ended it.
    Closed(Option<String>),
}

/// The reading side of a connection, owned by its reader task.
#[async_trait]
pub(crate) trait ConnReader: Send + 'static {
    async fn next_frame(&mut self) -> Read;
    /// True for byte-stream transports, where one undecodable frame means the stream can no
    /// longer be trusted: the connection is closed rather than the frame skipped.
    fn closes_on_garbage(&self) -> bool;
}

/// A new connection as a transport hands it over.
pub(crate) struct NewConn {
    pub conn: Arc<dyn Conn>,
    pub reader: Box<dyn ConnReader>,
}
