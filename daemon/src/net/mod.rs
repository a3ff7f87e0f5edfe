//! The cluster transport: one network [`Endpoint`] per node that carries several protocols
//! ([`Channel`]s: gossip, and the peer job protocol) to other members, authenticated by the
//! cluster CA (mutual TLS 1.3, see [`crate::pki`]).
//!
//! Three transports share the endpoint logic through a small internal seam (`conn.rs`):
//!
//! - **QUIC** (quinn): one `quinn::Endpoint` per node, server and client at once, one uni stream
//!   per frame. The default.
//! - **TLS over TCP** (tokio-rustls): same certificates, ALPN and frames, each frame prefixed by
//!   its u32 big-endian length; for hosts that accept no inbound UDP (RunPod).
//! - **In memory** ([`MemNetwork`]): for tests; links can be cut to make partitions.
//!
//! Every frame carries a small header (see [`frame`]) naming the sender's *advertised* address,
//! which is what [`Inbound::from`] reports: replies go to the member, and the connection a frame
//! arrived on is cached under that address so replies reuse it (through NAT, too). One cache
//! holds dialled and accepted connections; the newest wins; idle connections and idle
//! per-destination queues expire.
//!
//! [`Endpoint::try_send`] never waits on the network: it queues the frame on the destination's
//! bounded queue, whose task connects (with a timeout and a 500 ms backoff after a failure) and
//! sends (with a timeout). A full queue drops the frame and counts it; gossip tolerates loss.
//! Callers that need delivery must acknowledge at their own protocol level.
//!
//! Guarantees and limits:
//!
//! - Delivery is best effort and frames carry no ordering guarantee (QUIC streams are read
//!   concurrently). Callers that need delivery or order must acknowledge or sequence at their
//!   own protocol level.
//! - mTLS authenticates *membership*; the advertised address in a frame header is taken on the
//!   member's word (any member could claim another's address). Members are trusted; anything
//!   that must be attributed to a member uses [`Inbound::peer_name`] (its certificate name).
//! - Without an explicit [`Endpoint::set_route`], a member whose frames advertise another scheme
//!   (a TCP-only host) is dialled back with that scheme at its advertised address.
//! - `close` on QUIC waits for closed connections to drain so the port is free afterwards; that
//!   is usually milliseconds, up to about 3 s after a dial to a peer that never answered.
//!
//! This module must never block a caller on the network, never panic on network input, and
//! never hold a lock across an `.await`.

pub mod frame;
pub mod gossip;

mod conn;
mod mem;
mod quic;
mod tcp;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::pki;
use conn::{Conn, ConnReader, NewConn, Read};
pub use mem::MemNetwork;

/// Kiln's wire protocol version, negotiated by TLS ALPN; bump on wire changes.
pub const ALPN: &[u8] = b"kiln/1";

/// Inbound frames waiting per channel for the application; beyond that they are dropped.
const INBOUND_QUEUE_LEN: usize = 256;
/// How long a destination is not dialled again after a failed dial or send.
const FAILURE_BACKOFF: Duration = Duration::from_millis(500);
/// How long `close` waits for its tasks to end.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long `close` waits for closed QUIC connections to drain (3 PTOs; a connection that never
/// measured its RTT, such as a dial to a dead peer, uses the 333 ms initial RTT: about 3 s).
const QUIC_DRAIN_GRACE: Duration = Duration::from_secs(4);

/// The protocols multiplexed on one endpoint.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Gossip = 1,
    Peer = 2,
}

impl Channel {
    pub const ALL: [Channel; 2] = [Channel::Gossip, Channel::Peer];

    fn index(self) -> usize {
        match self {
            Channel::Gossip => 0,
            Channel::Peer => 1,
        }
    }
}

impl TryFrom<u8> for Channel {
    type Error = u8;

    fn try_from(value: u8) -> Result<Self, u8> {
        match value {
            1 => Ok(Channel::Gossip),
            2 => Ok(Channel::Peer),
            other => Err(other),
        }
    }
}

/// How a member is dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Quic,
    Tcp,
    Mem,
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Quic => "quic",
            Scheme::Tcp => "tcp",
            Scheme::Mem => "mem",
        })
    }
}

/// A malformed [`Scheme`] or [`PeerAddr`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("unknown scheme {0:?} (expected quic, tcp or mem)")]
    Scheme(String),
    #[error("{input:?} is not an address like quic://1.2.3.4:7946: {reason}")]
    Addr { input: String, reason: String },
}

impl FromStr for Scheme {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, AddrError> {
        match s {
            "quic" => Ok(Scheme::Quic),
            "tcp" => Ok(Scheme::Tcp),
            "mem" => Ok(Scheme::Mem),
            other => Err(AddrError::Scheme(other.to_string())),
        }
    }
}

/// A member's address with the transport that reaches it: `quic://1.2.3.4:7946`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    pub scheme: Scheme,
    pub addr: SocketAddr,
}

impl PeerAddr {
    pub fn new(scheme: Scheme, addr: SocketAddr) -> PeerAddr {
        PeerAddr { scheme, addr }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.addr)
    }
}

impl FromStr for PeerAddr {
    type Err = AddrError;

    /// `scheme://ip:port`, or a bare `ip:port` meaning QUIC.
    fn from_str(s: &str) -> Result<Self, AddrError> {
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (scheme.parse()?, rest),
            None => (Scheme::Quic, s),
        };
        let addr = rest
            .parse()
            .map_err(|e: std::net::AddrParseError| AddrError::Addr {
                input: s.to_string(),
                reason: e.to_string(),
            })?;
        Ok(PeerAddr { scheme, addr })
    }
}

/// Settings of an [`Endpoint`].
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// UDP address for QUIC, e.g. `0.0.0.0:7946`; port 0 picks one.
    pub quic_listen: Option<SocketAddr>,
    /// TCP address for TLS over TCP; port 0 picks one.
    pub tcp_listen: Option<SocketAddr>,
    /// The address members dial to reach this node (behind NAT: the public one). `None` derives
    /// it from the first bound listener (QUIC first), which must then have a specific IP.
    pub advertise: Option<PeerAddr>,
    /// The largest payload a frame may carry (the header comes on top).
    pub max_frame_bytes: usize,
    /// Frames queued per destination before new ones are dropped.
    pub peer_queue_len: usize,
    /// Bytes queued per destination before new frames are dropped (a frame is always taken
    /// into an empty queue, whatever its size).
    pub peer_queue_bytes: usize,
    pub connect_timeout: Duration,
    pub send_timeout: Duration,
    /// QUIC keep-alive; stays below NAT UDP timeouts (often 30 s).
    pub keep_alive: Duration,
    /// A connection (and a destination queue) unused this long is closed.
    pub idle_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            quic_listen: None,
            tcp_listen: None,
            advertise: None,
            max_frame_bytes: 128 * 1024,
            peer_queue_len: 16,
            peer_queue_bytes: 64 * 1024 * 1024,
            connect_timeout: Duration::from_secs(2),
            send_timeout: Duration::from_secs(2),
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
        }
    }
}

/// The most a frame may carry: the TCP length prefix is a u32, and no member needs more.
const MAX_FRAME_LIMIT: usize = 16 * 1024 * 1024;

impl NetConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_frame_bytes == 0 || self.max_frame_bytes > MAX_FRAME_LIMIT {
            anyhow::bail!(
                "max_frame_bytes = {} must be between 1 and {MAX_FRAME_LIMIT}",
                self.max_frame_bytes
            );
        }
        if self.peer_queue_len == 0 {
            anyhow::bail!("peer_queue_len must be at least 1");
        }
        if self.peer_queue_bytes == 0 {
            anyhow::bail!("peer_queue_bytes must be at least 1");
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("send_timeout", self.send_timeout),
            ("keep_alive", self.keep_alive),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                anyhow::bail!("{name} must be more than zero");
            }
        }
        if self.keep_alive >= self.idle_timeout {
            anyhow::bail!(
                "keep_alive ({:?}) must be shorter than idle_timeout ({:?})",
                self.keep_alive,
                self.idle_timeout
            );
        }
        if let Some(advertise) = self.advertise
            && (advertise.addr.port() == 0 || advertise.addr.ip().is_unspecified())
        {
            anyhow::bail!("advertise = {advertise} cannot be dialled: give a specific IP and port");
        }
        Ok(())
    }
}

/// A frame delivered to the application.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The sender's advertised address (from the frame header): reply there.
    pub from: SocketAddr,
    /// The sender's certificate common name (its member name).
    pub peer_name: Arc<str>,
    pub channel: Channel,
    pub payload: Bytes,
}

/// Why [`Endpoint::try_send`] refused a frame. Network failures are not errors there: they are
/// counted in [`NetStats`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("payload of {len} bytes exceeds max_frame_bytes = {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the endpoint is closed")]
    Closed,
}

/// Counters of an endpoint since it was bound.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    pub connections_open: u64,
    pub connections_dialled: u64,
    pub connections_accepted: u64,
    /// Inbound handshakes refused (bad, missing or foreign certificate, wrong ALPN, garbage).
    pub handshakes_rejected: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub bytes_received: u64,
    /// Frames dropped because the destination's queue was full (in frames or in bytes).
    pub dropped_queue_full: u64,
    /// Frames refused by `try_send` for being over `max_frame_bytes`.
    pub dropped_oversize: u64,
    /// Inbound frames dropped because the application's channel queue was full (or not taken).
    pub dropped_inbound_full: u64,
    /// Inbound frames that could not be read or decoded.
    pub bad_frames: u64,
    /// Frames lost to a failed dial or send, or dropped during the backoff after one.
    pub send_failures: u64,
}

#[derive(Default)]
struct Counters {
    connections_dialled: AtomicU64,
    connections_accepted: AtomicU64,
    handshakes_rejected: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_oversize: AtomicU64,
    dropped_inbound_full: AtomicU64,
    bad_frames: AtomicU64,
    send_failures: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Normalises an address for map lookups (IPv4-mapped IPv6 becomes IPv4).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The common name of a certificate, if it has one.
pub(crate) fn cert_common_name(der: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_string())
}

/// A registered connection: its sending side and when it was last used.
#[derive(Clone)]
struct ConnHandle {
    id: u64,
    conn: Arc<dyn Conn>,
    /// Milliseconds since the endpoint started, at the last frame sent or received.
    last_active: Arc<AtomicU64>,
}

struct MemBinding {
    network: MemNetwork,
    local: SocketAddr,
    name: Arc<str>,
}

#[derive(Default)]
struct State {
    closed: bool,
    /// Live connections by advertised address (dialled and accepted alike; newest wins).
    cache: HashMap<SocketAddr, ConnHandle>,
    /// Every open connection by id.
    all: HashMap<u64, ConnHandle>,
    /// Per-destination queues.
    peers: HashMap<SocketAddr, PeerQueue>,
    /// How to dial an advertised address: (dial address, set explicitly).
    routes: HashMap<SocketAddr, (PeerAddr, bool)>,
}

/// One destination's send queue: bounded in frames by the channel, in bytes by `bytes`.
struct PeerQueue {
    id: u64,
    tx: mpsc::Sender<(Instant, Bytes)>,
    /// Bytes of the frames in the channel now.
    bytes: Arc<AtomicUsize>,
}

struct Inner {
    config: NetConfig,
    advertise: PeerAddr,
    max_wire: usize,
    local_quic: Option<SocketAddr>,
    local_tcp: Option<SocketAddr>,
    quic: Mutex<Option<quic::Dialer>>,
    tls: Option<tcp::Tls>,
    mem: Option<MemBinding>,
    state: Mutex<State>,
    receivers: Mutex<[Option<mpsc::Receiver<Inbound>>; 2]>,
    inbound: [mpsc::Sender<Inbound>; 2],
    counters: Counters,
    cancel: CancellationToken,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
    next_id: AtomicU64,
    started: Instant,
}

/// One node's network endpoint. Clones share it; dropping the last clone closes it.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
    _guard: Arc<CloseOnDrop>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("advertise", &self.inner.advertise)
            .finish_non_exhaustive()
    }
}

struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections here are single map operations, so a poisoned lock is consistent.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The advertised address when none is configured: the first listener's, if its IP is specific.
fn derive_advertise(
    configured: Option<PeerAddr>,
    listeners: &[(Scheme, Option<SocketAddr>)],
) -> anyhow::Result<PeerAddr> {
    if let Some(advertise) = configured {
        if !listeners
            .iter()
            .any(|(scheme, addr)| *scheme == advertise.scheme && addr.is_some())
        {
            anyhow::bail!(
                "advertise = {advertise}, but this endpoint has no {} listener",
                advertise.scheme
            );
        }
        return Ok(advertise);
    }
    let (scheme, addr) = listeners
        .iter()
        .find_map(|(scheme, addr)| addr.map(|a| (*scheme, a)))
        .ok_or_else(|| anyhow::anyhow!("no listener is configured (quic_listen, tcp_listen)"))?;
    if addr.ip().is_unspecified() {
        anyhow::bail!(
            "cannot derive the advertised address from {scheme}://{addr}: it listens on an \
             unspecified IP; set `advertise` to the address members dial"
        );
    }
    Ok(PeerAddr::new(scheme, canonical(addr)))
}

impl Endpoint {
    /// Binds the configured QUIC and/or TCP listeners with this member's identity.
    pub async fn bind(identity: &pki::Identity, config: NetConfig) -> anyhow::Result<Endpoint> {
        config.validate()?;
        if config.quic_listen.is_none() && config.tcp_listen.is_none() {
            anyhow::bail!("neither quic_listen nor tcp_listen is set");
        }
        let max_wire = config.max_frame_bytes + frame::MAX_HEADER_LEN;
        let quic = config
            .quic_listen
            .map(|addr| quic::bind(identity, &config, addr, max_wire))
            .transpose()?;
        let local_quic = quic
            .as_ref()
            .map(|d| d.endpoint.local_addr().context("QUIC local address"))
            .transpose()?;
        let listener = match config.tcp_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot bind TCP on {addr}"))?,
            ),
            None => None,
        };
        let local_tcp = listener
            .as_ref()
            .map(|l| l.local_addr().context("TCP local address"))
            .transpose()?;
        let tls = tcp::Tls::new(identity, max_wire, config.connect_timeout)?;
        let advertise = derive_advertise(
            config.advertise,
            &[(Scheme::Quic, local_quic), (Scheme::Tcp, local_tcp)],
        )?;
        let quic_endpoint = quic.as_ref().map(|d| d.endpoint.clone());
        let inner = Inner::new(
            config,
            advertise,
            max_wire,
            local_quic,
            local_tcp,
            quic,
            Some(tls),
            None,
        );
        if let Some(endpoint) = quic_endpoint {
            inner.spawn(inner.clone().quic_accept_loop(endpoint));
        }
        if let Some(listener) = listener {
            inner.spawn(inner.clone().tcp_accept_loop(listener));
        }
        inner.spawn(inner.clone().sweep_loop());
        tracing::info!(advertise = %inner.advertise, ?local_quic, ?local_tcp, "network endpoint bound");
        Ok(Endpoint::wrap(inner))
    }

    /// Binds an in-memory endpoint at `addr` on `network`; `name` stands in for the certificate
    /// name peers see.
    pub async fn bind_mem(
        network: &MemNetwork,
        name: &str,
        addr: SocketAddr,
        config: NetConfig,
    ) -> anyhow::Result<Endpoint> {
        config.validate()?;
        let addr = canonical(addr);
        let advertise = match config.advertise {
            Some(a) if a.scheme != Scheme::Mem => {
                anyhow::bail!("advertise = {a}: an in-memory endpoint advertises mem://")
            }
            Some(a) => a,
            None => PeerAddr::new(Scheme::Mem, addr),
        };
        let incoming = network.bind(addr, name)?;
        let max_wire = config.max_frame_bytes + frame::MAX_HEADER_LEN;
        let binding = MemBinding {
            network: network.clone(),
            local: addr,
            name: name.into(),
        };
        let inner = Inner::new(
            config,
            advertise,
            max_wire,
            None,
            None,
            None,
            None,
            Some(binding),
        );
        inner.spawn(inner.clone().mem_accept_loop(incoming));
        inner.spawn(inner.clone().sweep_loop());
        Ok(Endpoint::wrap(inner))
    }

    fn wrap(inner: Arc<Inner>) -> Endpoint {
        Endpoint {
            _guard: Arc::new(CloseOnDrop(inner.clone())),
            inner,
        }
    }

    /// The address members dial to reach this node, as carried in every frame.
    pub fn advertise(&self) -> PeerAddr {
        self.inner.advertise
    }

    pub fn local_quic_addr(&self) -> Option<SocketAddr> {
        self.inner.local_quic
    }

    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.inner.local_tcp
    }

    /// The receiver of a channel's inbound frames; handed out once per channel.
    pub fn take_receiver(&self, channel: Channel) -> Option<mpsc::Receiver<Inbound>> {
        lock(&self.inner.receivers)[channel.index()].take()
    }

    /// Queues `payload` for the member advertising `to`. Never waits on the network: a full
    /// queue drops the frame and counts it. Errs only for a payload over `max_frame_bytes` or
    /// a closed endpoint.
    pub fn try_send(
        &self,
        to: SocketAddr,
        channel: Channel,
        payload: Bytes,
    ) -> Result<(), SendError> {
        self.inner.try_send(to, channel, payload)
    }

    /// Dials the member that advertises `advertised` at `dial` instead (another scheme or
    /// address). Without a route, an address is dialled with this endpoint's advertised scheme
    /// (or the scheme the member's own frames advertised).
    pub fn set_route(&self, advertised: SocketAddr, dial: PeerAddr) {
        lock(&self.inner.state)
            .routes
            .insert(canonical(advertised), (dial, true));
    }

    /// The largest payload a frame may carry.
    pub fn max_frame_bytes(&self) -> usize {
        self.inner.config.max_frame_bytes
    }

    pub fn stats(&self) -> NetStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let connections_open = lock(&self.inner.state).all.len() as u64;
        NetStats {
            connections_open,
            connections_dialled: get(&c.connections_dialled),
            connections_accepted: get(&c.connections_accepted),
            handshakes_rejected: get(&c.handshakes_rejected),
            frames_sent: get(&c.frames_sent),
            bytes_sent: get(&c.bytes_sent),
            frames_received: get(&c.frames_received),
            bytes_received: get(&c.bytes_received),
            dropped_queue_full: get(&c.dropped_queue_full),
            dropped_oversize: get(&c.dropped_oversize),
            dropped_inbound_full: get(&c.dropped_inbound_full),
            bad_frames: get(&c.bad_frames),
            send_failures: get(&c.send_failures),
        }
    }

    /// Resolves once the endpoint is closed.
    pub async fn closed(&self) {
        self.inner.cancel.cancelled().await;
    }

    /// Closes listeners and connections; once it returns, the ports are free to bind again.
    /// With QUIC this waits for closed connections to drain: usually milliseconds, up to about
    /// 3 s after a recent dial to a peer that never answered.
    pub async fn close(&self) {
        self.inner.close().await;
    }
}

impl Inner {
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: NetConfig,
        advertise: PeerAddr,
        max_wire: usize,
        local_quic: Option<SocketAddr>,
        local_tcp: Option<SocketAddr>,
        quic: Option<quic::Dialer>,
        tls: Option<tcp::Tls>,
        mem: Option<MemBinding>,
    ) -> Arc<Inner> {
        let (gossip_tx, gossip_rx) = mpsc::channel(INBOUND_QUEUE_LEN);
        let (peer_tx, peer_rx) = mpsc::channel(INBOUND_QUEUE_LEN);
        Arc::new(Inner {
            config,
            advertise,
            max_wire,
            local_quic,
            local_tcp,
            quic: Mutex::new(quic),
            tls,
            mem,
            state: Mutex::new(State::default()),
            receivers: Mutex::new([Some(gossip_rx), Some(peer_rx)]),
            inbound: [gossip_tx, peer_tx],
            counters: Counters::default(),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn_on(task, &self.runtime);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self, handle: &ConnHandle) {
        handle.last_active.store(self.now_ms(), Ordering::Relaxed);
    }

    fn try_send(
        self: &Arc<Self>,
        to: SocketAddr,
        channel: Channel,
        payload: Bytes,
    ) -> Result<(), SendError> {
        if payload.len() > self.config.max_frame_bytes {
            bump(&self.counters.dropped_oversize, 1);
            return Err(SendError::TooLarge {
                len: payload.len(),
                max: self.config.max_frame_bytes,
            });
        }
        let to = canonical(to);
        let frame = frame::encode(channel, &self.advertise, &payload);
        let mut state = lock(&self.state);
        if state.closed {
            return Err(SendError::Closed);
        }
        let (tx, bytes) = match state.peers.get(&to) {
            Some(queue) if !queue.tx.is_closed() => (queue.tx.clone(), queue.bytes.clone()),
            _ => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(self.config.peer_queue_len);
                let bytes = Arc::new(AtomicUsize::new(0));
                state.peers.insert(
                    to,
                    PeerQueue {
                        id,
                        tx: tx.clone(),
                        bytes: bytes.clone(),
                    },
                );
                self.spawn(self.clone().peer_task(to, id, rx, bytes.clone()));
                (tx, bytes)
            }
        };
        // Pushed under the lock, so an idle queue's task cannot retire between the lookup and
        // the push (see `retire_peer`).
        let len = frame.len();
        let queued = bytes.load(Ordering::Relaxed);
        if queued > 0 && queued + len > self.config.peer_queue_bytes {
            bump(&self.counters.dropped_queue_full, 1);
            return Ok(());
        }
        bytes.fetch_add(len, Ordering::Relaxed);
        if tx.try_send((Instant::now(), frame)).is_err() {
            bytes.fetch_sub(len, Ordering::Relaxed);
            bump(&self.counters.dropped_queue_full, 1);
        }
        Ok(())
    }

    /// Removes an idle destination queue if nothing arrived on it meanwhile.
    fn retire_peer(&self, to: SocketAddr, id: u64, rx: &mpsc::Receiver<(Instant, Bytes)>) -> bool {
        let mut state = lock(&self.state);
        let ours = state.peers.get(&to).is_some_and(|queue| queue.id == id);
        if ours && !rx.is_empty() {
            return false;
        }
        if ours {
            state.peers.remove(&to);
        }
        true
    }

    async fn peer_task(
        self: Arc<Self>,
        to: SocketAddr,
        id: u64,
        mut rx: mpsc::Receiver<(Instant, Bytes)>,
        bytes: Arc<AtomicUsize>,
    ) {
        let mut backoff_until: Option<Instant> = None;
        loop {
            let (queued_at, frame) = tokio::select! {
                () = self.cancel.cancelled() => return,
                frame = rx.recv() => match frame {
                    Some(frame) => {
                        bytes.fetch_sub(frame.1.len(), Ordering::Relaxed);
                        frame
                    }
                    None => return,
                },
                () = tokio::time::sleep(self.config.idle_timeout) => {
                    if self.retire_peer(to, id, &rx) {
                        return;
                    }
                    continue;
                }
            };
            // A frame that waited through a dial that failed, or a peer's restart, is stale:
            // whoever sent it has stopped waiting, and acting on it now could undo what they
            // did instead (e.g. a submission retried with another member).
            if queued_at.elapsed() > self.config.connect_timeout + self.config.send_timeout {
                bump(&self.counters.send_failures, 1);
                continue;
            }
            if let Some(until) = backoff_until {
                if Instant::now() < until {
                    bump(&self.counters.send_failures, 1);
                    continue;
                }
                backoff_until = None;
            }
            let delivered = tokio::select! {
                () = self.cancel.cancelled() => return,
                delivered = self.deliver(to, frame) => delivered,
            };
            if let Err(error) = delivered {
                bump(&self.counters.send_failures, 1);
                tracing::debug!(%to, error = format!("{error:#}"), "frame not delivered");
                backoff_until = Some(Instant::now() + FAILURE_BACKOFF);
            }
        }
    }

    fn cached(&self, to: SocketAddr) -> Option<ConnHandle> {
        lock(&self.state)
            .cache
            .get(&to)
            .filter(|h| !h.conn.is_closed())
            .cloned()
    }

    async fn send_on(&self, handle: &ConnHandle, frame: Bytes) -> anyhow::Result<()> {
        let len = frame.len() as u64;
        match tokio::time::timeout(self.config.send_timeout, handle.conn.send_frame(frame)).await {
            Ok(Ok(())) => {
                bump(&self.counters.frames_sent, 1);
                bump(&self.counters.bytes_sent, len);
                self.touch(handle);
                Ok(())
            }
            Ok(Err(e)) => {
                handle.conn.close();
                Err(e)
            }
            Err(_) => {
                handle.conn.close();
                anyhow::bail!("send timed out after {:?}", self.config.send_timeout)
            }
        }
    }

    /// Sends on the cached connection; if that fails (a stale connection to a restarted
    /// peer), dials once afresh and sends there.
    async fn deliver(self: &Arc<Self>, to: SocketAddr, frame: Bytes) -> anyhow::Result<()> {
        if let Some(handle) = self.cached(to) {
            match self.send_on(&handle, frame.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    self.forget(handle.id);
                    tracing::debug!(%to, error = format!("{error:#}"), "cached connection failed; redialling");
                }
            }
        }
        let dialled = tokio::time::timeout(self.config.connect_timeout, self.dial(to))
            .await
            .map_err(|_| {
                anyhow::anyhow!("connect timed out after {:?}", self.config.connect_timeout)
            })??;
        bump(&self.counters.connections_dialled, 1);
        let handle = self.register(dialled, Some(to))?;
        self.send_on(&handle, frame).await
    }

    fn route(&self, to: SocketAddr) -> PeerAddr {
        lock(&self.state)
            .routes
            .get(&to)
            .map(|(dial, _)| *dial)
            .unwrap_or(PeerAddr::new(self.advertise.scheme, to))
    }

    async fn dial(&self, to: SocketAddr) -> anyhow::Result<NewConn> {
        let target = self.route(to);
        match target.scheme {
            Scheme::Quic => {
                let dialer = lock(&self.quic).clone().ok_or_else(|| {
                    anyhow::anyhow!("cannot dial {target}: this endpoint has no QUIC listener")
                })?;
                dialer.dial(target.addr).await
            }
            Scheme::Tcp => {
                let tls = self.tls.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("cannot dial {target}: this endpoint has no TLS identity")
                })?;
                tls.dial(target.addr).await
            }
            Scheme::Mem => {
                let mem = self.mem.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("cannot dial {target}: this endpoint is not in memory")
                })?;
                mem.network.connect(mem.local, &mem.name, target.addr)
            }
        }
    }

    /// Registers a new connection (cached under `cache_under` when dialled) and starts its
    /// reader.
    fn register(
        self: &Arc<Self>,
        new: NewConn,
        cache_under: Option<SocketAddr>,
    ) -> anyhow::Result<ConnHandle> {
        let handle = ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            conn: new.conn,
            last_active: Arc::new(AtomicU64::new(self.now_ms())),
        };
        {
            let mut state = lock(&self.state);
            if state.closed {
                handle.conn.close();
                anyhow::bail!("the endpoint is closed");
            }
            state.all.insert(handle.id, handle.clone());
            if let Some(key) = cache_under {
                state.cache.insert(key, handle.clone());
            }
        }
        self.spawn(
            self.clone()
                .reader_task(handle.clone(), new.reader, cache_under),
        );
        Ok(handle)
    }

    /// Drops a connection from the registry and the cache (only entries with its id).
    fn forget(&self, id: u64) {
        let mut state = lock(&self.state);
        state.all.remove(&id);
        state.cache.retain(|_, h| h.id != id);
    }

    async fn reader_task(
        self: Arc<Self>,
        handle: ConnHandle,
        mut reader: Box<dyn ConnReader>,
        mut cached_as: Option<SocketAddr>,
    ) {
        let remote = handle.conn.remote_addr();
        let peer = handle.conn.peer_name();
        loop {
            match reader.next_frame().await {
                Read::Frame(bytes) => {
                    if let Err(error) = self.on_frame(&handle, bytes, &mut cached_as) {
                        bump(&self.counters.bad_frames, 1);
                        tracing::warn!(%remote, %peer, %error, "undecodable frame");
                        if reader.closes_on_garbage() {
                            break;
                        }
                    }
                }
                Read::Dropped(reason) => {
                    bump(&self.counters.bad_frames, 1);
                    tracing::debug!(%remote, %peer, %reason, "frame dropped");
                }
                Read::Closed(reason) => {
                    if let Some(reason) = reason {
                        bump(&self.counters.bad_frames, 1);
                        tracing::warn!(%remote, %peer, %reason, "closing connection");
                    }
                    break;
                }
            }
        }
        handle.conn.close();
        self.forget(handle.id);
    }

    fn on_frame(
        &self,
        handle: &ConnHandle,
        bytes: Bytes,
        cached_as: &mut Option<SocketAddr>,
    ) -> Result<(), frame::FrameError> {
        let len = bytes.len() as u64;
        let frame = frame::decode(&bytes)?;
        let from = canonical(frame.from.addr);
        bump(&self.counters.frames_received, 1);
        bump(&self.counters.bytes_received, len);
        self.touch(handle);
        {
            let mut state = lock(&self.state);
            if *cached_as != Some(from) {
                // The first frame from this member on this connection: the newest connection
                // wins, which replaces a stale entry left by a restarted peer.
                state.cache.insert(from, handle.clone());
                *cached_as = Some(from);
            } else if state.cache.get(&from).is_none_or(|h| h.conn.is_closed()) {
                state.cache.insert(from, handle.clone());
            }
            // Remember how the member says it is reached, unless a route was set explicitly.
            let explicit = state
                .routes
                .get(&from)
                .is_some_and(|(_, explicit)| *explicit);
            if !explicit {
                if frame.from.scheme == self.advertise.scheme {
                    state.routes.remove(&from);
                } else {
                    let learned = PeerAddr::new(frame.from.scheme, from);
                    state.routes.insert(from, (learned, false));
                }
            }
        }
        let inbound = Inbound {
            from,
            peer_name: handle.conn.peer_name(),
            channel: frame.channel,
            payload: frame.payload,
        };
        if self.inbound[frame.channel.index()]
            .try_send(inbound)
            .is_err()
        {
            bump(&self.counters.dropped_inbound_full, 1);
        }
        Ok(())
    }

    async fn quic_accept_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        loop {
            let incoming = tokio::select! {
                () = self.cancel.cancelled() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let remote = incoming.remote_address();
            let inner = self.clone();
            self.spawn(async move {
                let accepted = tokio::select! {
                    () = inner.cancel.cancelled() => return,
                    accepted = tokio::time::timeout(
                        inner.config.connect_timeout,
                        quic::accept(incoming, inner.max_wire),
                    ) => accepted,
                };
                let accepted = accepted
                    .map_err(|_| anyhow::anyhow!("QUIC handshake timed out"))
                    .and_then(|r| r);
                inner.on_accepted(remote, "quic", accepted);
            });
        }
    }

    async fn tcp_accept_loop(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let Some(tls) = self.tls.clone() else { return };
        loop {
            let accepted = tokio::select! {
                () = self.cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let inner = self.clone();
            let tls = tls.clone();
            self.spawn(async move {
                let accepted = tokio::select! {
                    () = inner.cancel.cancelled() => return,
                    accepted = tls.accept(tcp, remote) => accepted,
                };
                inner.on_accepted(remote, "tcp", accepted);
            });
        }
    }

    async fn mem_accept_loop(
        self: Arc<Self>,
        mut incoming: mpsc::UnboundedReceiver<mem::MemIncoming>,
    ) {
        loop {
            let next = tokio::select! {
                () = self.cancel.cancelled() => break,
                next = incoming.recv() => next,
            };
            let Some(next) = next else { break };
            self.on_accepted(next.remote, "mem", Ok(next.conn));
        }
    }

    fn on_accepted(
        self: &Arc<Self>,
        remote: SocketAddr,
        transport: &str,
        accepted: anyhow::Result<NewConn>,
    ) {
        match accepted {
            Ok(new) => {
                bump(&self.counters.connections_accepted, 1);
                let _ = self.register(new, None);
            }
            Err(error) => {
                bump(&self.counters.handshakes_rejected, 1);
                tracing::warn!(%remote, transport, error = format!("{error:#}"), "refused an inbound connection");
            }
        }
    }

    /// Closes connections unused for `idle_timeout` (duplicates, departed peers).
    async fn sweep_loop(self: Arc<Self>) {
        let period = (self.config.idle_timeout / 4).max(Duration::from_millis(50));
        let idle_ms = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
            let now = self.now_ms();
            let idle: Vec<ConnHandle> = lock(&self.state)
                .all
                .values()
                .filter(|h| now.saturating_sub(h.last_active.load(Ordering::Relaxed)) >= idle_ms)
                .cloned()
                .collect();
            for handle in idle {
                tracing::debug!(remote = %handle.conn.remote_addr(), "closing an idle connection");
                handle.conn.close();
                self.forget(handle.id);
            }
        }
    }

    /// Stops everything without waiting: used by `close` and when the last handle drops.
    fn shut_down(&self) {
        let conns: Vec<ConnHandle> = {
            let mut state = lock(&self.state);
            state.closed = true;
            state.peers.clear();
            state.cache.clear();
            state.all.drain().map(|(_, h)| h).collect()
        };
        self.cancel.cancel();
        for handle in conns {
            handle.conn.close();
        }
        if let Some(dialer) = lock(&self.quic).as_ref() {
            dialer.endpoint.close(0u32.into(), b"endpoint closed");
        }
        if let Some(mem) = &self.mem {
            mem.network.unbind(mem.local);
        }
        self.tracker.close();
    }

    async fn close(&self) {
        self.shut_down();
        if tokio::time::timeout(CLOSE_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("network tasks did not stop within {CLOSE_GRACE:?}");
        }
        if let Some(mem) = &self.mem {
            // The accept loop has dropped its receiver now.
            mem.network.unbind(mem.local);
        }
        let dialer = lock(&self.quic).take();
        if let Some(dialer) = dialer {
            let endpoint = dialer.endpoint.clone();
            drop(dialer);
            let _ = tokio::time::timeout(QUIC_DRAIN_GRACE, endpoint.wait_idle()).await;
            drop(endpoint);
            if let Some(addr) = self.local_quic {
                wait_udp_released(addr).await;
            }
        }
    }
}

/// Waits (bounded) until quinn's driver has released the UDP socket, so that `close` returning
/// means the port can be bound again.
async fn wait_udp_released(addr: SocketAddr) {
    let probe = match addr.ip() {
        ip if ip.is_unspecified() => SocketAddr::new(ip, addr.port()),
        IpAddr::V4(_) | IpAddr::V6(_) => addr,
    };
    for _ in 0..100 {
        if std::net::UdpSocket::bind(probe).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(%addr, "the QUIC socket was not released within 1 s");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addr_parses_and_prints() {
        let a: PeerAddr = "tcp://10.0.0.1:7946".parse().expect("parses");
        assert_eq!(a.scheme, Scheme::Tcp);
        assert_eq!(a.to_string(), "tcp://10.0.0.1:7946");
        let bare: PeerAddr = "1.2.3.4:7946".parse().expect("parses");
        assert_eq!(bare.scheme, Scheme::Quic);
        assert_eq!(bare.to_string(), "quic://1.2.3.4:7946");
        let v6: PeerAddr = "mem://[::1]:9".parse().expect("parses");
        assert_eq!(v6.to_string(), "mem://[::1]:9");
        assert!(matches!(
            "udp://1.2.3.4:1".parse::<PeerAddr>(),
            Err(AddrError::Scheme(_))
        ));
        assert!(matches!(
            "quic://nowhere".parse::<PeerAddr>(),
            Err(AddrError::Addr { .. })
        ));
    }

    #[test]
    fn config_is_checked() {
        assert!(NetConfig::default().validate().is_ok());
        let bad = NetConfig {
            keep_alive: Duration::from_secs(20),
            ..NetConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = NetConfig {
            advertise: Some("quic://0.0.0.0:7946".parse().expect("parses")),
            ..NetConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn advertise_is_derived_or_refused() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:5000".parse().expect("addr");
        let derived =
            derive_advertise(None, &[(Scheme::Quic, None), (Scheme::Tcp, Some(lo))]).expect("ok");
        assert_eq!(derived, PeerAddr::new(Scheme::Tcp, lo));
        let err = derive_advertise(None, &[(Scheme::Quic, Some(any))])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("0.0.0.0:5000"), "{err}");
        let wrong = PeerAddr::new(Scheme::Quic, lo);
        assert!(derive_advertise(Some(wrong), &[(Scheme::Tcp, Some(lo))]).is_err());
    }
}
