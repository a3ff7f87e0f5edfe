//! chitchat 0.11.2's [`Transport`] over an [`Endpoint`], on [`Channel::Gossip`].
//!
//! `open` hands out the socket once (the endpoint is already bound; chitchat's `listen_addr`
//! is only checked against nothing). `send` encodes with chitchat's public [`Serializable`]
//! and calls [`Endpoint::try_send`], so it never awaits the network: chitchat awaits `send`
//! inside its only loop, and a blocking send there causes false deaths. `recv` is cancel-safe
//! (chitchat drops it on every tick) and skips, logs and counts undecodable messages instead of
//! failing, since a `recv` error stops gossip for good.
//!
//! Each gossip payload starts with one byte naming its encoding: [`RAW`] (chitchat's bytes as
//! they are) or [`ZSTD`] (zstd-compressed, for messages over [`COMPRESS_FROM`] bytes). chitchat
//! 0.11 sends every digest uncompressed, and a digest lists every member, so at 100 members a
//! SYN is several KB of highly repetitive bytes; compressing here cuts the steady-state traffic
//! by about the factor that chitchat 0.13's compressed digests would. Decompression is bounded
//! by [`MAX_DECOMPRESSED`], so a hostile frame cannot balloon.
//!
//! This module must never copy or patch chitchat's code: it uses the crate's public API only.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use tokio::sync::{Mutex, mpsc};

use super::{Channel, Endpoint, Inbound, SendError};

/// Payload encoding byte: chitchat's message as it is.
pub const RAW: u8 = 0;
/// Payload encoding byte: chitchat's message compressed with zstd.
pub const ZSTD: u8 = 1;
/// Messages at least this long are compressed.
pub const COMPRESS_FROM: usize = 256;
/// The largest decompressed message accepted (chitchat keeps messages under 65,507 bytes).
pub const MAX_DECOMPRESSED: usize = 128 * 1024;
/// zstd's fastest level: gossip is frequent and small, and level 1 already removes the
/// repetition that makes digests big.
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    // zstd contexts are costly to set up (hundreds of KiB, zeroed) and gossip runs many
    // rounds a second: each thread keeps one of each.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn compress(message: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match cell.as_mut() {
            Some(compressor) => compressor,
            None => cell.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(message)
    })
}

fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(decompressor) => decompressor,
            None => cell.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress(data, MAX_DECOMPRESSED)
    })
}

/// Encodes a chitchat message as a gossip payload.
pub fn encode_payload(message: &[u8]) -> Vec<u8> {
    if message.len() >= COMPRESS_FROM
        && let Ok(compressed) = compress(message)
        && compressed.len() < message.len()
    {
        let mut out = Vec::with_capacity(compressed.len() + 1);
        out.push(ZSTD);
        out.extend_from_slice(&compressed);
        return out;
    }
    let mut out = Vec::with_capacity(message.len() + 1);
    out.push(RAW);
    out.extend_from_slice(message);
    out
}

/// Decodes a gossip payload back into chitchat's message bytes.
pub fn decode_payload(payload: &[u8]) -> anyhow::Result<std::borrow::Cow<'_, [u8]>> {
    match payload.split_first() {
        Some((&RAW, rest)) => Ok(std::borrow::Cow::Borrowed(rest)),
        Some((&ZSTD, rest)) => decompress(rest)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| anyhow::anyhow!("bad zstd gossip payload: {e}")),
        Some((other, _)) => anyhow::bail!("unknown gossip payload encoding {other}"),
        None => anyhow::bail!("empty gossip payload"),
    }
}

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
        let payload = Bytes::from(encode_payload(&msg.serialize_to_vec()));
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
            let decoded = decode_payload(&inbound.payload).and_then(|bytes| {
                let mut buf: &[u8] = &bytes;
                ChitchatMessage::deserialize(&mut buf)
            });
            match decoded {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn payloads_round_trip(message in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let payload = encode_payload(&message);
            let decoded = decode_payload(&payload).expect("decodes");
            prop_assert_eq!(decoded.as_ref(), &message[..]);
        }

        #[test]
        fn garbage_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_payload(&payload);
        }
    }

    #[test]
    fn repetitive_messages_shrink_and_bombs_are_refused() {
        let digest = b"gpu-17\x00\x00\x01\x8b\x7f127.0.0.1:7946".repeat(100);
        let payload = encode_payload(&digest);
        assert_eq!(payload[0], ZSTD);
        assert!(payload.len() * 4 < digest.len(), "{} bytes", payload.len());
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_DECOMPRESSED + 1], 1).expect("compress");
        let mut framed = vec![ZSTD];
        framed.extend_from_slice(&bomb);
        assert!(decode_payload(&framed).is_err());
        // This thread's decompressor still works after refusing a bomb.
        let decoded = decode_payload(&payload).expect("a good payload after a bad one");
        assert_eq!(decoded.as_ref(), &digest[..]);
        assert!(decode_payload(&[9, 1, 2]).is_err());
        assert!(decode_payload(&[]).is_err());
    }
}
