//! TLS-over-TCP connections behind the [`Conn`] seam, for hosts that accept no inbound UDP.
//!
//! Same certificates and ALPN as QUIC; each frame is the same bytes as a QUIC stream's content,
//! prefixed by its length as a u32 big-endian. A length over the limit closes the connection
//! before anything is allocated. One writer task per connection serialises writes.
//!
//! This module must never decode frames: the endpoint logic in `mod.rs` does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, ConnReader, NewConn, Read};
use super::{ALPN, cert_common_name};
use crate::pki::Identity;

/// Writes waiting for the writer task; the per-destination queue in front bounds the rest.
const WRITE_QUEUE_LEN: usize = 4;

/// TLS settings for both directions.
#[derive(Clone)]
pub(crate) struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    max_wire: usize,
    handshake_timeout: Duration,
}

impl Tls {
    pub(crate) fn new(
        identity: &Identity,
        max_wire: usize,
        handshake_timeout: Duration,
    ) -> anyhow::Result<Tls> {
        let server = identity
            .server_config(&[ALPN])
            .context("building the TCP server TLS config")?;
        let client = identity
            .client_config(&[ALPN])
            .context("building the TCP client TLS config")?;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            connector: tokio_rustls::TlsConnector::from(client),
            server_name: identity.server_name().context("cluster server name")?,
            max_wire,
            handshake_timeout,
        })
    }

    /// Connects and completes the TLS handshake (the caller bounds the time).
    pub(crate) async fn dial(&self, addr: SocketAddr) -> anyhow::Result<NewConn> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to tcp://{addr}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS handshake with tcp://{addr} failed"))?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let name = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(cert_common_name);
        established(tls, addr, alpn, name, self.max_wire)
    }

    /// Completes an inbound TLS handshake within the handshake timeout. The error names why
    /// it was refused.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> anyhow::Result<NewConn> {
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
            .context("TLS handshake timed out")?
            .context("TLS handshake refused")?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let name = session
            .peer_certificates()
            .and_then(|chain: &[CertificateDer<'static>]| chain.first())
            .and_then(cert_common_name);
        established(tls, remote, alpn, name, self.max_wire)
    }
}

fn established<S>(
    stream: S,
    remote: SocketAddr,
    alpn: Option<Vec<u8>>,
    name: Option<String>,
    max_wire: usize,
) -> anyhow::Result<NewConn>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    if alpn.as_deref() != Some(ALPN) {
        anyhow::bail!("the peer did not negotiate ALPN {:?}", ALPN);
    }
    let name: Arc<str> = name
        .ok_or_else(|| anyhow::anyhow!("the peer certificate has no common name"))?
        .into();
    let (read, write) = tokio::io::split(stream);
    let closed = CancellationToken::new();
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_LEN);
    tokio::spawn(write_loop(write, rx, closed.clone()));
    Ok(NewConn {
        conn: Arc::new(TcpConn {
            tx,
            remote,
            peer_name: name,
            closed: closed.clone(),
        }),
        reader: Box::new(TcpReader {
            read,
            closed,
            max_wire,
        }),
    })
}

type WriteRequest = (Bytes, oneshot::Sender<std::io::Result<()>>);

async fn write_one<W: AsyncWrite + Unpin>(write: &mut W, frame: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    write.write_all(&len.to_be_bytes()).await?;
    write.write_all(frame).await?;
    write.flush().await
}

async fn write_loop<W: AsyncWrite + Send>(
    mut write: WriteHalf<W>,
    mut rx: mpsc::Receiver<WriteRequest>,
    closed: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            () = closed.cancelled() => break,
            request = rx.recv() => request,
        };
        let Some((frame, done)) = request else { break };
        let result = tokio::select! {
            () = closed.cancelled() => break,
            result = write_one(&mut write, &frame) => result,
        };
        let failed = result.is_err();
        let _ = done.send(result);
        if failed {
            closed.cancel();
            break;
        }
    }
    // Best effort: send close_notify and FIN so the peer sees a clean end.
    let _ = tokio::time::timeout(Duration::from_millis(200), write.shutdown()).await;
}

struct TcpConn {
    tx: mpsc::Sender<WriteRequest>,
    remote: SocketAddr,
    peer_name: Arc<str>,
    closed: CancellationToken,
}

#[async_trait]
impl Conn for TcpConn {
    async fn send_frame(&self, frame: Bytes) -> anyhow::Result<()> {
        let (done, result) = oneshot::channel();
        self.tx
            .send((frame, done))
            .await
            .map_err(|_| anyhow::anyhow!("connection closed"))?;
        result
            .await
            .map_err(|_| anyhow::anyhow!("connection closed"))?
            .context("write")
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn peer_name(&self) -> Arc<str> {
        self.peer_name.clone()
    }

    fn close(&self) {
        self.closed.cancel();
    }

    fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.tx.is_closed()
    }
}

struct TcpReader<S> {
    read: ReadHalf<S>,
    closed: CancellationToken,
    max_wire: usize,
}

impl<S: AsyncRead + Send> TcpReader<S> {
    async fn read_frame(&mut self) -> Read {
        let mut len = [0u8; 4];
        if self.read.read_exact(&mut len).await.is_err() {
            return Read::Closed(None);
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > self.max_wire {
            return Read::Closed(Some(format!(
                "frame length {len} exceeds the limit of {} bytes",
                self.max_wire
            )));
        }
        let mut buf = BytesMut::zeroed(len);
        match self.read.read_exact(&mut buf).await {
            Ok(_) => Read::Frame(buf.freeze()),
            Err(_) => Read::Closed(Some(format!("connection ended inside a {len}-byte frame"))),
        }
    }
}

#[async_trait]
impl<S: AsyncRead + Send + 'static> ConnReader for TcpReader<S> {
    async fn next_frame(&mut self) -> Read {
        let closed = self.closed.clone();
        let read = tokio::select! {
            () = closed.cancelled() => Read::Closed(None),
            read = self.read_frame() => read,
        };
        if matches!(read, Read::Closed(_)) {
            self.closed.cancel();
        }
        read
    }

    fn closes_on_garbage(&self) -> bool {
        true
    }
}
