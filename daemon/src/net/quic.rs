//! QUIC connections (quinn) behind the [`Conn`] seam: one `quinn::Endpoint` per node, server
//! and client at once, so outgoing connections leave from the listening port; one uni stream
//! per frame.
//!
//! This module must never decode frames or keep connection state of its own: the endpoint
//! logic in `mod.rs` owns the cache and the queues.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;

use super::conn::{Conn, ConnReader, NewConn, Read};
use super::{ALPN, NetConfig, cert_common_name};
use crate::pki::Identity;

/// Application close codes.
const CLOSE_NORMAL: u32 = 0;
const CLOSE_PROTOCOL: u32 = 1;

/// Client settings for dialling, plus the server name every member certificate carries.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub endpoint: quinn::Endpoint,
    pub client: quinn::ClientConfig,
    pub server_name: String,
    pub max_wire: usize,
}

fn transport_config(config: &NetConfig) -> anyhow::Result<Arc<quinn::TransportConfig>> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .context("idle_timeout is too large for QUIC")?,
        ))
        .keep_alive_interval(Some(config.keep_alive))
        .max_concurrent_uni_streams(256u32.into())
        .max_concurrent_bidi_streams(0u32.into());
    Ok(Arc::new(transport))
}

/// Binds the node's QUIC endpoint on `addr` and returns it with its dialling settings.
pub(crate) fn bind(
    identity: &Identity,
    config: &NetConfig,
    addr: SocketAddr,
    max_wire: usize,
) -> anyhow::Result<Dialer> {
    let transport = transport_config(config)?;
    let server_tls = identity
        .server_config(&[ALPN])
        .context("building the QUIC server TLS config")?;
    let client_tls = identity
        .client_config(&[ALPN])
        .context("building the QUIC client TLS config")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).context("TLS config unusable for QUIC")?,
    ));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).context("TLS config unusable for QUIC")?,
    ));
    client.transport_config(transport);
    let endpoint = quinn::Endpoint::server(server, addr)
        .with_context(|| format!("cannot bind QUIC (UDP) on {addr}"))?;
    let server_name = identity
        .server_name()
        .context("cluster server name")?
        .to_str()
        .into_owned();
    Ok(Dialer {
        endpoint,
        client,
        server_name,
        max_wire,
    })
}

fn alpn_of(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol)
}

fn peer_name_of(conn: &quinn::Connection) -> Option<String> {
    conn.peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(cert_common_name))
}

/// Checks ALPN and names the peer; closes the connection when either is missing.
fn established(conn: quinn::Connection, max_wire: usize) -> anyhow::Result<NewConn> {
    if alpn_of(&conn).as_deref() != Some(ALPN) {
        conn.close(CLOSE_PROTOCOL.into(), b"alpn");
        anyhow::bail!("the peer did not negotiate ALPN {:?}", ALPN);
    }
    let Some(name) = peer_name_of(&conn) else {
        conn.close(CLOSE_PROTOCOL.into(), b"certificate");
        anyhow::bail!("the peer certificate has no common name");
    };
    let name: Arc<str> = name.into();
    Ok(NewConn {
        conn: Arc::new(QuicConn {
            conn: conn.clone(),
            peer_name: name,
        }),
        reader: Box::new(QuicReader::new(conn, max_wire)),
    })
}

impl Dialer {
    pub(crate) async fn dial(&self, addr: SocketAddr) -> anyhow::Result<NewConn> {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, &self.server_name)
            .with_context(|| format!("cannot dial quic://{addr}"))?;
        let conn = connecting
            .await
            .with_context(|| format!("QUIC handshake with {addr} failed"))?;
        established(conn, self.max_wire)
    }
}

/// Completes an inbound handshake. The error names why it was refused.
pub(crate) async fn accept(incoming: quinn::Incoming, max_wire: usize) -> anyhow::Result<NewConn> {
    let conn = incoming.await.context("QUIC handshake refused")?;
    established(conn, max_wire)
}

struct QuicConn {
    conn: quinn::Connection,
    peer_name: Arc<str>,
}

#[async_trait]
impl Conn for QuicConn {
    async fn send_frame(&self, frame: Bytes) -> anyhow::Result<()> {
        let stream = self.conn.open_uni().await.context("open_uni")?;
        // Reset rather than finish a stream whose write did not complete (error or the
        // caller's timeout dropping this future), so a partial frame is never delivered.
        let mut guard = ResetUnfinished(Some(stream));
        if let Some(stream) = guard.0.as_mut() {
            stream.write_all(&frame).await.context("write")?;
            stream.finish().context("finish")?;
        }
        guard.0 = None;
        Ok(())
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn peer_name(&self) -> Arc<str> {
        self.peer_name.clone()
    }

    fn close(&self) {
        self.conn.close(CLOSE_NORMAL.into(), b"close");
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }
}

struct ResetUnfinished(Option<quinn::SendStream>);

impl Drop for ResetUnfinished {
    fn drop(&mut self) {
        if let Some(mut stream) = self.0.take() {
            let _ = stream.reset(CLOSE_PROTOCOL.into());
        }
    }
}

/// Reads the streams of one connection concurrently, so one slow stream does not hold up the
/// others (QUIC's stream limit of 256 bounds how many are in flight). Frames therefore carry no
/// ordering guarantee.
struct QuicReader {
    conn: quinn::Connection,
    max_wire: usize,
    pending: FuturesUnordered<BoxFuture<'static, Read>>,
}

impl QuicReader {
    fn new(conn: quinn::Connection, max_wire: usize) -> QuicReader {
        QuicReader {
            conn,
            max_wire,
            pending: FuturesUnordered::new(),
        }
    }
}

async fn read_stream(
    conn: quinn::Connection,
    mut stream: quinn::RecvStream,
    max_wire: usize,
) -> Read {
    match stream.read_to_end(max_wire).await {
        Ok(bytes) => Read::Frame(Bytes::from(bytes)),
        Err(quinn::ReadToEndError::TooLong) => {
            // Tell the sender to stop rather than buffering the rest.
            let _ = stream.stop(CLOSE_PROTOCOL.into());
            Read::Dropped(format!("stream longer than {max_wire} bytes"))
        }
        Err(e) => {
            if conn.close_reason().is_some() {
                Read::Closed(None)
            } else {
                Read::Dropped(format!("stream read failed: {e}"))
            }
        }
    }
}

#[async_trait]
impl ConnReader for QuicReader {
    async fn next_frame(&mut self) -> Read {
        loop {
            tokio::select! {
                Some(read) = self.pending.next(), if !self.pending.is_empty() => return read,
                accepted = self.conn.accept_uni() => match accepted {
                    Ok(stream) => {
                        let read = read_stream(self.conn.clone(), stream, self.max_wire);
                        self.pending.push(Box::pin(read));
                    }
                    Err(_) => return Read::Closed(None),
                },
            }
        }
    }

    fn closes_on_garbage(&self) -> bool {
        false
    }
}
