//! Conformance suite of the cluster transport: the same cases run on QUIC, TLS over TCP and the
//! in-memory network, with real sockets on 127.0.0.1 port 0 and real certificates; plus the
//! TLS refusals (foreign CA, wrong ALPN, garbage) on the real transports and partitions on the
//! in-memory one.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use kiln_daemon::net::{
    ALPN, Channel, Endpoint, Inbound, MemNetwork, NetConfig, PeerAddr, Scheme, SendError, frame,
};
use kiln_daemon::pki::{Ca, Identity, identity_from_ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::Receiver;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(10);

struct Net {
    scheme: Scheme,
    ca: Ca,
    mem: MemNetwork,
    next_mem_port: AtomicU16,
}

impl Net {
    fn new(scheme: Scheme) -> Net {
        Net {
            scheme,
            ca: Ca::generate("test", 2).expect("a CA"),
            mem: MemNetwork::new(),
            next_mem_port: AtomicU16::new(7000),
        }
    }

    fn config(&self) -> NetConfig {
        NetConfig {
            connect_timeout: Duration::from_millis(500),
            send_timeout: Duration::from_secs(1),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            ..NetConfig::default()
        }
    }

    fn identity(&self, name: &str) -> Identity {
        identity_from_ca(&self.ca, name).expect("an identity")
    }

    async fn node(&self, name: &str) -> Endpoint {
        self.node_full(name, self.config(), None).await
    }

    /// Binds `name` at `at` (or a fresh address) with `config` on this suite's transport.
    async fn node_full(
        &self,
        name: &str,
        mut config: NetConfig,
        at: Option<SocketAddr>,
    ) -> Endpoint {
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
        match self.scheme {
            Scheme::Quic => {
                config.quic_listen = Some(at.unwrap_or(loopback));
                Endpoint::bind(&self.identity(name), config).await
            }
            Scheme::Tcp => {
                config.tcp_listen = Some(at.unwrap_or(loopback));
                Endpoint::bind(&self.identity(name), config).await
            }
            Scheme::Mem => {
                let addr = at.unwrap_or_else(|| {
                    let port = self.next_mem_port.fetch_add(1, Ordering::Relaxed);
                    SocketAddr::from(([10, 0, 0, 1], port))
                });
                Endpoint::bind_mem(&self.mem, name, addr, config).await
            }
        }
        .expect("the endpoint binds")
    }
}

fn addr(endpoint: &Endpoint) -> SocketAddr {
    endpoint.advertise().addr
}

fn peer_rx(endpoint: &Endpoint) -> Receiver<Inbound> {
    endpoint
        .take_receiver(Channel::Peer)
        .expect("the peer receiver is handed out once")
}

async fn recv(rx: &mut Receiver<Inbound>) -> anyhow::Result<Inbound> {
    timeout(WAIT, rx.recv())
        .await
        .context("no frame arrived in time")?
        .context("the receiver closed")
}

/// Polls `predicate` every 20 ms until it holds, for at most `WAIT`.
async fn wait_until(what: &str, mut predicate: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while !predicate() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Sends `payload` every 100 ms until `rx` receives a frame equal to it (bounded by `WAIT`).
async fn send_until_received(
    from: &Endpoint,
    to: SocketAddr,
    rx: &mut Receiver<Inbound>,
    payload: &'static [u8],
) -> anyhow::Result<Inbound> {
    let deadline = Instant::now() + WAIT;
    loop {
        anyhow::ensure!(Instant::now() < deadline, "{to} never received {payload:?}");
        from.try_send(to, Channel::Peer, Bytes::from_static(payload))?;
        if let Ok(Some(inbound)) = timeout(Duration::from_millis(100), rx.recv()).await
            && &inbound.payload[..] == payload
        {
            return Ok(inbound);
        }
    }
}

async fn send_both_ways(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let b = net.node("b").await;
    let (mut a_rx, mut b_rx) = (peer_rx(&a), peer_rx(&b));
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"ping"))?;
    let got = recv(&mut b_rx).await?;
    assert_eq!(&got.payload[..], b"ping");
    assert_eq!(
        got.from,
        addr(&a),
        "from is the sender's advertised address"
    );
    assert_eq!(&*got.peer_name, "a");
    assert_eq!(got.channel, Channel::Peer);
    b.try_send(got.from, Channel::Peer, Bytes::from_static(b"pong"))?;
    let got = recv(&mut a_rx).await?;
    assert_eq!(&got.payload[..], b"pong");
    assert_eq!(got.from, addr(&b));
    assert_eq!(&*got.peer_name, "b");
    // The gossip channel is separate.
    let mut a_gossip = a
        .take_receiver(Channel::Gossip)
        .context("gossip receiver")?;
    assert!(
        a.take_receiver(Channel::Gossip).is_none(),
        "handed out once"
    );
    b.try_send(addr(&a), Channel::Gossip, Bytes::from_static(b"g"))?;
    assert_eq!(&recv(&mut a_gossip).await?.payload[..], b"g");
    let stats = a.stats();
    assert!(
        stats.frames_sent >= 1 && stats.frames_received >= 2,
        "{stats:?}"
    );
    a.close().await;
    b.close().await;
    Ok(())
}

async fn frame_size_limit(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let config = NetConfig {
        max_frame_bytes: 4096,
        ..net.config()
    };
    let a = net.node_full("a", config.clone(), None).await;
    let b = net.node_full("b", config, None).await;
    let mut b_rx = peer_rx(&b);
    a.try_send(addr(&b), Channel::Peer, Bytes::from(vec![7u8; 4096]))?;
    let got = recv(&mut b_rx).await?;
    assert_eq!(got.payload.len(), 4096);
    assert!(got.payload.iter().all(|&x| x == 7));
    let refused = a.try_send(addr(&b), Channel::Peer, Bytes::from(vec![7u8; 4097]));
    assert_eq!(
        refused,
        Err(SendError::TooLarge {
            len: 4097,
            max: 4096
        })
    );
    assert_eq!(a.stats().dropped_oversize, 1);
    a.close().await;
    b.close().await;
    Ok(())
}

/// An address nothing listens on: a just-released port (or a never-bound in-memory one).
fn unbound(scheme: Scheme) -> SocketAddr {
    match scheme {
        Scheme::Quic => std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free UDP port"),
        Scheme::Tcp => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free TCP port"),
        Scheme::Mem => "10.9.9.9:1".parse().expect("address"),
    }
}

async fn unbound_address_is_ok(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let nowhere = unbound(scheme);
    a.try_send(nowhere, Channel::Peer, Bytes::from_static(b"hello?"))?;
    wait_until("the failed dial is counted", || {
        a.stats().send_failures >= 1
    })
    .await?;
    // Still usable afterwards.
    let b = net.node("b").await;
    let mut b_rx = peer_rx(&b);
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"x"))?;
    recv(&mut b_rx).await?;
    a.close().await;
    b.close().await;
    Ok(())
}

async fn full_queue_drops(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let config = NetConfig {
        peer_queue_len: 2,
        ..net.config()
    };
    let a = net.node_full("a", config, None).await;
    let nowhere = unbound(scheme);
    // No await in between: the destination's task cannot drain the queue meanwhile (the test
    // runtime has one thread), so all but the queue's capacity are dropped, without blocking.
    for _ in 0..50 {
        a.try_send(nowhere, Channel::Peer, Bytes::from_static(b"x"))?;
    }
    let stats = a.stats();
    assert_eq!(stats.dropped_queue_full, 48, "{stats:?}");
    a.close().await;
    Ok(())
}

async fn full_byte_budget_drops(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let config = NetConfig {
        peer_queue_len: 1000,
        peer_queue_bytes: 10_000,
        ..net.config()
    };
    let a = net.node_full("a", config, None).await;
    let nowhere = unbound(scheme);
    // Frames of 1,000 bytes (header included) with no await in between: ten fit the budget.
    let header = kiln_daemon::net::frame::header_len(&a.advertise());
    let payload = Bytes::from(vec![7u8; 1000 - header]);
    for _ in 0..50 {
        a.try_send(nowhere, Channel::Peer, payload.clone())?;
    }
    let stats = a.stats();
    assert_eq!(stats.dropped_queue_full, 40, "{stats:?}");
    a.close().await;

    // A frame larger than the whole budget still goes into an empty queue.
    let config = NetConfig {
        peer_queue_bytes: 10,
        ..net.config()
    };
    let b = net.node_full("b", config, None).await;
    b.try_send(nowhere, Channel::Peer, payload.clone())?;
    b.try_send(nowhere, Channel::Peer, payload)?;
    let stats = b.stats();
    assert_eq!(stats.dropped_queue_full, 1, "{stats:?}");
    b.close().await;
    Ok(())
}

async fn burst_all_arrive(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let config = NetConfig {
        peer_queue_len: 256,
        ..net.config()
    };
    let a = net.node_full("a", config.clone(), None).await;
    let b = net.node_full("b", config, None).await;
    let mut b_rx = peer_rx(&b);
    for i in 0..200u32 {
        a.try_send(
            addr(&b),
            Channel::Peer,
            Bytes::from(i.to_be_bytes().to_vec()),
        )?;
    }
    let mut seen = BTreeSet::new();
    while seen.len() < 200 {
        let got = recv(&mut b_rx).await?;
        let raw: [u8; 4] = got.payload[..].try_into().context("a 4-byte payload")?;
        seen.insert(u32::from_be_bytes(raw));
    }
    assert_eq!(seen, (0..200).collect::<BTreeSet<_>>());
    assert_eq!(a.stats().dropped_queue_full, 0);
    a.close().await;
    b.close().await;
    Ok(())
}

async fn restarted_peer_is_reached(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let b = net.node("b").await;
    let b_addr = addr(&b);
    let mut b_rx = peer_rx(&b);
    a.try_send(b_addr, Channel::Peer, Bytes::from_static(b"one"))?;
    recv(&mut b_rx).await?;
    b.close().await;
    let b2 = net.node_full("b", net.config(), Some(b_addr)).await;
    assert_eq!(addr(&b2), b_addr);
    let mut b2_rx = peer_rx(&b2);
    let got = send_until_received(&a, b_addr, &mut b2_rx, b"two").await?;
    assert_eq!(got.from, addr(&a));
    // And the restarted peer's replies reach a.
    let mut a_rx = peer_rx(&a);
    send_until_received(&b2, addr(&a), &mut a_rx, b"back").await?;
    a.close().await;
    b2.close().await;
    Ok(())
}

async fn close_releases_port(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let at = addr(&a);
    a.close().await;
    assert_eq!(
        a.try_send(at, Channel::Peer, Bytes::from_static(b"x")),
        Err(SendError::Closed)
    );
    let again = net.node_full("a", net.config(), Some(at)).await;
    assert_eq!(addr(&again), at);
    again.close().await;
    Ok(())
}

async fn idle_expiry(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let config = NetConfig {
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(800),
        ..net.config()
    };
    let a = net.node_full("a", config.clone(), None).await;
    let b = net.node_full("b", config, None).await;
    let mut b_rx = peer_rx(&b);
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"once"))?;
    recv(&mut b_rx).await?;
    assert_eq!(a.stats().connections_open, 1);
    wait_until("both sides close the idle connection", || {
        a.stats().connections_open == 0 && b.stats().connections_open == 0
    })
    .await?;
    // And a new frame dials again.
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"again"))?;
    assert_eq!(&recv(&mut b_rx).await?.payload[..], b"again");
    assert_eq!(a.stats().connections_dialled, 2);
    a.close().await;
    b.close().await;
    Ok(())
}

macro_rules! conformance {
    ($module:ident, $scheme:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn sends_both_ways_from_the_advertised_address() -> anyhow::Result<()> {
                send_both_ways($scheme).await
            }

            #[tokio::test]
            async fn max_frame_bytes_passes_and_one_more_is_refused() -> anyhow::Result<()> {
                frame_size_limit($scheme).await
            }

            #[tokio::test]
            async fn sending_to_an_unbound_address_is_ok() -> anyhow::Result<()> {
                unbound_address_is_ok($scheme).await
            }

            #[tokio::test]
            async fn a_full_queue_drops_and_counts() -> anyhow::Result<()> {
                full_queue_drops($scheme).await
            }

            #[tokio::test]
            async fn a_full_byte_budget_drops_and_counts() -> anyhow::Result<()> {
                full_byte_budget_drops($scheme).await
            }

            #[tokio::test]
            async fn a_burst_of_200_frames_all_arrive() -> anyhow::Result<()> {
                burst_all_arrive($scheme).await
            }

            #[tokio::test]
            async fn a_peer_restarted_on_the_same_address_is_reached() -> anyhow::Result<()> {
                restarted_peer_is_reached($scheme).await
            }

            #[tokio::test]
            async fn close_releases_the_port() -> anyhow::Result<()> {
                close_releases_port($scheme).await
            }

            #[tokio::test]
            async fn idle_connections_expire() -> anyhow::Result<()> {
                idle_expiry($scheme).await
            }
        }
    };
}

conformance!(quic, Scheme::Quic);
conformance!(tcp, Scheme::Tcp);
conformance!(mem, Scheme::Mem);

/// A TLS client that trusts the cluster CA but presents a certificate from another CA.
fn rogue_client_tls(net: &Net) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let other = Ca::generate("test", 2)?;
    let issued = other.issue("rogue", 2)?;
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(
        net.ca.cert_pem().as_bytes(),
    )?)?;
    let mut config = rustls::ClientConfig::builder_with_provider(kiln_daemon::pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Connects with `tls` and, if the handshake lets it, sends one well-formed Kiln frame.
/// Returns whether the client side saw its handshake succeed.
async fn raw_connect_and_send(
    scheme: Scheme,
    tls: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
    to: SocketAddr,
) -> anyhow::Result<bool> {
    let me = PeerAddr::new(scheme, "127.0.0.1:1".parse()?);
    let frame = frame::encode(Channel::Peer, &me, b"forged");
    match scheme {
        Scheme::Quic => {
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
            )));
            let connecting = client.connect(to, &server_name.to_str())?;
            let connected = match timeout(WAIT, connecting).await.context("handshake hung")? {
                Ok(conn) => {
                    if let Ok(mut stream) = conn.open_uni().await {
                        let _ = stream.write_all(&frame).await;
                        let _ = stream.finish();
                    }
                    let _ = timeout(WAIT, conn.closed()).await;
                    true
                }
                Err(_) => false,
            };
            client.close(0u32.into(), b"");
            Ok(connected)
        }
        Scheme::Tcp => {
            let tcp = tokio::net::TcpStream::connect(to).await?;
            let connector = tokio_rustls::TlsConnector::from(tls);
            match timeout(WAIT, connector.connect(server_name, tcp))
                .await
                .context("handshake hung")?
            {
                Ok(mut stream) => {
                    let len = u32::try_from(frame.len())?.to_be_bytes();
                    let _ = stream.write_all(&len).await;
                    let _ = stream.write_all(&frame).await;
                    let _ = stream.flush().await;
                    let mut sink = Vec::new();
                    let _ = timeout(WAIT, stream.read_to_end(&mut sink)).await;
                    Ok(true)
                }
                Err(_) => Ok(false),
            }
        }
        Scheme::Mem => unreachable!("no TLS in memory"),
    }
}

/// A client with a certificate from another CA (which trusts the cluster CA, so only the
/// server can refuse it) is refused and counted on the accepting side, and nothing it sends is
/// delivered. A whole endpoint of another cluster gets nowhere either.
async fn foreign_ca_is_refused(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let mut a_rx = peer_rx(&a);
    let server_name = net.identity("x").server_name()?;
    raw_connect_and_send(scheme, rogue_client_tls(&net)?, server_name, addr(&a)).await?;
    wait_until("the accepting side counts the refusal", || {
        a.stats().handshakes_rejected >= 1
    })
    .await?;
    let rogue_net = Net::new(scheme);
    let rogue = rogue_net.node("rogue").await;
    rogue.try_send(addr(&a), Channel::Peer, Bytes::from_static(b"let me in"))?;
    wait_until("the rogue endpoint is refused too", || {
        a.stats().handshakes_rejected >= 2
    })
    .await?;
    // A member's frame sent afterwards is the first thing delivered.
    let b = net.node("b").await;
    b.try_send(addr(&a), Channel::Peer, Bytes::from_static(b"member"))?;
    let got = recv(&mut a_rx).await?;
    assert_eq!(&got.payload[..], b"member");
    assert_eq!(&*got.peer_name, "b");
    let stats = a.stats();
    assert_eq!(
        stats.connections_accepted, 1,
        "only the member got in: {stats:?}"
    );
    assert_eq!(stats.frames_received, 1, "{stats:?}");
    a.close().await;
    b.close().await;
    rogue.close().await;
    Ok(())
}

/// A client from the right CA offering another ALPN is refused and counted.
async fn wrong_alpn_is_refused(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let identity = net.identity("old");
    let client_tls = identity.client_config(&[b"kiln/0"])?;
    let server_name = identity.server_name()?;
    match scheme {
        Scheme::Quic => {
            let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
            )));
            let connecting = client.connect(addr(&a), &server_name.to_str())?;
            let result = timeout(WAIT, connecting).await.context("handshake hung")?;
            assert!(result.is_err(), "a wrong ALPN must fail the handshake");
            client.close(0u32.into(), b"");
        }
        Scheme::Tcp => {
            let tcp = tokio::net::TcpStream::connect(addr(&a)).await?;
            let connector = tokio_rustls::TlsConnector::from(client_tls);
            let result = timeout(WAIT, connector.connect(server_name, tcp))
                .await
                .context("handshake hung")?;
            assert!(result.is_err(), "a wrong ALPN must fail the handshake");
        }
        Scheme::Mem => unreachable!("no TLS in memory"),
    }
    wait_until("the refusal is counted", || {
        a.stats().handshakes_rejected >= 1
    })
    .await?;
    assert_eq!(a.stats().connections_accepted, 0);
    a.close().await;
    Ok(())
}

/// Garbage on the listening port (no TLS at all) does not take the listener down.
async fn garbage_does_not_crash_the_listener(scheme: Scheme) -> anyhow::Result<()> {
    let net = Net::new(scheme);
    let a = net.node("a").await;
    let mut a_rx = peer_rx(&a);
    match scheme {
        Scheme::Quic => {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            for size in [1usize, 7, 1200, 1500] {
                socket.send_to(&vec![0xAB; size], addr(&a)).await?;
            }
        }
        Scheme::Tcp => {
            for _ in 0..3 {
                let mut tcp = tokio::net::TcpStream::connect(addr(&a)).await?;
                tcp.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage")
                    .await?;
                let mut sink = Vec::new();
                // The server ends the connection (a TLS alert, then close).
                let _ = timeout(WAIT, tcp.read_to_end(&mut sink)).await;
            }
            wait_until("the garbage handshakes are counted", || {
                a.stats().handshakes_rejected >= 3
            })
            .await?;
        }
        Scheme::Mem => unreachable!("no TLS in memory"),
    }
    let b = net.node("b").await;
    b.try_send(addr(&a), Channel::Peer, Bytes::from_static(b"still here"))?;
    assert_eq!(&recv(&mut a_rx).await?.payload[..], b"still here");
    a.close().await;
    b.close().await;
    Ok(())
}

mod tls {
    use super::*;

    #[tokio::test]
    async fn quic_refuses_a_certificate_from_another_ca() -> anyhow::Result<()> {
        foreign_ca_is_refused(Scheme::Quic).await
    }

    #[tokio::test]
    async fn tcp_refuses_a_certificate_from_another_ca() -> anyhow::Result<()> {
        foreign_ca_is_refused(Scheme::Tcp).await
    }

    #[tokio::test]
    async fn quic_refuses_another_alpn() -> anyhow::Result<()> {
        wrong_alpn_is_refused(Scheme::Quic).await
    }

    #[tokio::test]
    async fn tcp_refuses_another_alpn() -> anyhow::Result<()> {
        wrong_alpn_is_refused(Scheme::Tcp).await
    }

    #[tokio::test]
    async fn quic_survives_garbage_datagrams() -> anyhow::Result<()> {
        garbage_does_not_crash_the_listener(Scheme::Quic).await
    }

    #[tokio::test]
    async fn tcp_survives_garbage_bytes() -> anyhow::Result<()> {
        garbage_does_not_crash_the_listener(Scheme::Tcp).await
    }

    /// An authenticated member announcing an oversized frame on TCP loses its connection
    /// before anything is allocated; so does one sending an undecodable frame.
    #[tokio::test]
    async fn tcp_closes_a_connection_on_oversize_length_or_garbage_frame() -> anyhow::Result<()> {
        let net = Net::new(Scheme::Tcp);
        let a = net.node("a").await;
        let identity = net.identity("m");
        let connector = tokio_rustls::TlsConnector::from(identity.client_config(&[ALPN])?);
        for bad in [
            u32::MAX.to_be_bytes().to_vec(),
            [&5u32.to_be_bytes()[..], b"hello"].concat(),
        ] {
            let tcp = tokio::net::TcpStream::connect(addr(&a)).await?;
            let mut tls = connector.connect(identity.server_name()?, tcp).await?;
            tls.write_all(&bad).await?;
            tls.flush().await?;
            let mut sink = Vec::new();
            let _ = timeout(WAIT, tls.read_to_end(&mut sink))
                .await
                .context("the server kept the connection open")?;
        }
        wait_until("both violations are counted", || a.stats().bad_frames >= 2).await?;
        assert_eq!(a.stats().frames_received, 0);
        a.close().await;
        Ok(())
    }
}

/// Node A advertises quic://X and also listens on TCP Y; node B speaks TCP only and routes X
/// to tcp://Y. B reaches A, and A's reply reaches B.
#[tokio::test]
async fn a_route_reaches_a_quic_node_over_its_tcp_listener() -> anyhow::Result<()> {
    let ca = Ca::generate("test", 2)?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let base = Net::new(Scheme::Quic).config();
    let a = Endpoint::bind(
        &identity_from_ca(&ca, "a")?,
        NetConfig {
            quic_listen: Some(loopback),
            tcp_listen: Some(loopback),
            ..base.clone()
        },
    )
    .await?;
    assert_eq!(a.advertise().scheme, Scheme::Quic);
    let b = Endpoint::bind(
        &identity_from_ca(&ca, "b")?,
        NetConfig {
            tcp_listen: Some(loopback),
            ..base
        },
    )
    .await?;
    assert_eq!(b.advertise().scheme, Scheme::Tcp);
    let (mut a_rx, mut b_rx) = (peer_rx(&a), peer_rx(&b));
    let x = addr(&a);
    let y = a.local_tcp_addr().context("A listens on TCP")?;
    b.set_route(x, PeerAddr::new(Scheme::Tcp, y));
    b.try_send(x, Channel::Peer, Bytes::from_static(b"via tcp"))?;
    let got = recv(&mut a_rx).await?;
    assert_eq!(got.from, addr(&b));
    a.try_send(got.from, Channel::Peer, Bytes::from_static(b"reply"))?;
    let reply = recv(&mut b_rx).await?;
    assert_eq!(&reply.payload[..], b"reply");
    assert_eq!(reply.from, x, "B sees A under its advertised QUIC address");
    a.close().await;
    b.close().await;
    Ok(())
}

/// A cut link delivers nothing (either way) and refuses new dials; healing restores it.
#[tokio::test]
async fn mem_cut_link_delivers_nothing_and_heal_restores_it() -> anyhow::Result<()> {
    let net = Net::new(Scheme::Mem);
    let a = net.node("a").await;
    let b = net.node("b").await;
    let (mut a_rx, mut b_rx) = (peer_rx(&a), peer_rx(&b));
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"before"))?;
    assert_eq!(&recv(&mut b_rx).await?.payload[..], b"before");
    net.mem.cut(addr(&a), addr(&b));
    assert!(net.mem.is_cut(addr(&b), addr(&a)), "a cut is symmetric");
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"lost a->b"))?;
    b.try_send(addr(&a), Channel::Peer, Bytes::from_static(b"lost b->a"))?;
    wait_until("both frames are gone", || {
        a.stats().frames_sent >= 2 && b.stats().frames_sent >= 1
    })
    .await?;
    // A new node cannot dial across a cut either.
    let c = net.node("c").await;
    net.mem.cut(addr(&c), addr(&b));
    c.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"lost c->b"))?;
    wait_until("c's dial fails", || c.stats().send_failures >= 1).await?;
    net.mem.heal(addr(&a), addr(&b));
    a.try_send(addr(&b), Channel::Peer, Bytes::from_static(b"after a->b"))?;
    b.try_send(addr(&a), Channel::Peer, Bytes::from_static(b"after b->a"))?;
    // Frames on one in-memory connection arrive in order: nothing sent during the cut precedes.
    assert_eq!(&recv(&mut b_rx).await?.payload[..], b"after a->b");
    assert_eq!(&recv(&mut a_rx).await?.payload[..], b"after b->a");
    net.mem.heal_all();
    assert!(!net.mem.is_cut(addr(&c), addr(&b)));
    a.close().await;
    b.close().await;
    c.close().await;
    Ok(())
}

/// Addresses that only differ by IPv4-mapped IPv6 form reach the same member.
#[tokio::test]
async fn ipv4_mapped_addresses_are_normalised() -> anyhow::Result<()> {
    let net = Net::new(Scheme::Mem);
    let a = net.node("a").await;
    let b = net.node("b").await;
    let mut b_rx = peer_rx(&b);
    let SocketAddr::V4(v4) = addr(&b) else {
        anyhow::bail!("expected an IPv4 address")
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
    a.try_send(mapped, Channel::Peer, Bytes::from_static(b"mapped"))?;
    assert_eq!(&recv(&mut b_rx).await?.payload[..], b"mapped");
    a.close().await;
    b.close().await;
    Ok(())
}

#[tokio::test]
async fn binding_refuses_bad_settings_with_a_clear_error() -> anyhow::Result<()> {
    let ca = Ca::generate("test", 2)?;
    let id = identity_from_ca(&ca, "a")?;
    let err = Endpoint::bind(
        &id,
        NetConfig {
            quic_listen: Some("0.0.0.0:0".parse()?),
            ..NetConfig::default()
        },
    )
    .await
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("0.0.0.0") && err.contains("advertise"),
        "{err}"
    );
    let err = Endpoint::bind(&id, NetConfig::default())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("quic_listen"), "{err}");
    let net = MemNetwork::new();
    let at: SocketAddr = "10.0.0.1:1".parse()?;
    let first = Endpoint::bind_mem(&net, "a", at, NetConfig::default()).await?;
    let err = Endpoint::bind_mem(&net, "b", at, NetConfig::default())
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    assert!(err.contains("already bound"), "{err}");
    first.close().await;
    Ok(())
}

/// After a failed dial, frames for that destination are dropped (and counted) for 500 ms
/// instead of queueing behind redials; then the destination is dialled again. Paused time, on
/// the in-memory network.
#[tokio::test(start_paused = true)]
async fn a_failed_dial_backs_off_for_500_ms() -> anyhow::Result<()> {
    let net = Net::new(Scheme::Mem);
    let a = net.node("a").await;
    let x: SocketAddr = "10.0.0.99:1".parse()?;
    a.try_send(x, Channel::Peer, Bytes::from_static(b"1"))?;
    wait_until("the failed dial is counted", || {
        a.stats().send_failures == 1
    })
    .await?;
    let failed_at = Instant::now();
    let b = net.node_full("b", net.config(), Some(x)).await;
    let mut b_rx = peer_rx(&b);
    a.try_send(x, Channel::Peer, Bytes::from_static(b"2"))?;
    wait_until("the frame in the backoff is dropped", || {
        a.stats().send_failures == 2
    })
    .await?;
    assert!(failed_at.elapsed() < Duration::from_millis(500));
    assert!(
        b_rx.try_recv().is_err(),
        "nothing was delivered during the backoff"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.try_send(x, Channel::Peer, Bytes::from_static(b"3"))?;
    assert_eq!(&recv(&mut b_rx).await?.payload[..], b"3");
    assert_eq!(a.stats().send_failures, 2);
    a.close().await;
    b.close().await;
    Ok(())
}
