//! chitchat 0.11.2's [`Transport`] over an [`Endpoint`], on [`Channel::Gossip`].
//!
//! `open` hands out the socket once (the endpoint is already bound; chitchat's `listen_addr`
//! is only checked against nothing). `send` encodes with chitchat's public [`Serializable`]
//! and calls [`Endpoint::try_send`], so it never awaits the network: chitchat awaits `send`
//! inside its only loop, and a blocking send there causes false deaths. `recv` is cancel-safe
//! (chitchat drops it on every tick) and skips, logs and counts undecodable messages instead of
//! failing, since a `recv` error stops gossip for good.
//!
//! This module must never copy or patch chitchat's code: it uses the crate's public API only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::{Mutex, mpsc};

use super::{Channel, Endpoint, Inbound, SendError};

/// chitchat over a Kiln [`Endpoint`].
pub struct GossipTransport {
    endpoint: Endpoint,
    receiver: Mutex<Option<mpsc::Receiver<Inbound>>>,
    garbage: Arc<AtomicU64>,
}

impl GossipTransport {
    /// Takes the endpoint's gossip receiver now; `open` then hands it to chitchat once.
    pub fn new(endpoint: Endpoint) -> Self {
        let receiver = endpoint.take_receiver(Channel::Gossip);
        GossipTransport {
            endpoint,
            receiver: Mutex::new(receiver),
            garbage: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Gossip frames that did not decode as chitchat messages (skipped).
    pub fn garbage_count(&self) -> u64 {
        self.garbage.load(Ordering::Relaxed)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

#[async_trait]
impl Transport for GossipTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let receiver = self.receiver.lock().await.take().ok_or_else(|| {
            anyhow::anyhow!(
                "the gossip socket on {listen_addr} is already open (or another user took the \
                 endpoint's gossip receiver)"
            )
        })?;
        Ok(Box::new(GossipSocket {
            endpoint: self.endpoint.clone(),
            receiver,
            garbage: self.garbage.clone(),
        }))
    }
}

struct GossipSocket {
    endpoint: Endpoint,
    receiver: mpsc::Receiver<Inbound>,
    garbage: Arc<AtomicU64>,
}

#[async_trait]
impl Socket for GossipSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let payload = Bytes::from(msg.serialize_to_vec());
        match self.endpoint.try_send(to, Channel::Gossip, payload) {
            Ok(()) => Ok(()),
            Err(error @ SendError::TooLarge { .. }) => {
                // chitchat keeps messages under 65,507 bytes; this only happens with a
                // max_frame_bytes below that. chitchat logs send errors and carries on.
                Err(anyhow::anyhow!("gossip message to {to} not sent: {error}"))
            }
            Err(SendError::Closed) => Err(anyhow::anyhow!("the network endpoint is closed")),
        }
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            // `mpsc::Receiver::recv` is cancel-safe and nothing below awaits.
            let inbound = tokio::select! {
                () = self.endpoint.closed() => None,
                inbound = self.receiver.recv() => inbound,
            };
            let inbound =
                inbound.ok_or_else(|| anyhow::anyhow!("the network endpoint is closed"))?;
            let mut buf: &[u8] = &inbound.payload;
            match ChitchatMessage::deserialize(&mut buf) {
                Ok(message) => return Ok((inbound.from, message)),
                Err(error) => {
                    self.garbage.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        from = %inbound.from,
                        peer = %inbound.peer_name,
                        %error,
                        "skipping an undecodable gossip message"
                    );
                }
            }
        }
    }
}
