//! Request/response between members over an [`Endpoint`]'s [`Channel::Peer`].
//!
//! [`PeerRpc::request`] encodes a [`wire::Request`], queues it with [`Endpoint::try_send`]
//! (never waiting on the network) and waits for the matching response at most the caller's
//! deadline. The transport is best effort and unordered, so a lost frame, a lost reply and a
//! slow peer all look the same to the caller: [`RpcError::DeadlineExceeded`]. Callers that
//! retry must make their requests idempotent.
//!
//! Inbound requests run on spawned tasks, at most [`RpcConfig::max_concurrent_handlers`] at a
//! time; beyond that a request is answered [`Overloaded`](super::wire::PeerErrorKind::Overloaded) at once. A handler
//! still running at the request's deadline is cancelled and not answered (the caller has
//! given up). Every pending request is removed from the pending map on its answer, its
//! timeout, its caller dropping the future, or shutdown.
//!
//! This module must never panic on network input, never stop on a bad frame (they are counted
//! and logged at most once per peer per minute), never wait on the network to send, and never
//! hold a lock across an `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{self, Envelope, Kind, PeerError, WireError};
use crate::net::{Channel, Endpoint, Inbound, SendError};

/// How often undecodable frames from one peer are logged.
const BAD_FRAME_LOG_PERIOD: Duration = Duration::from_secs(60);
/// How long `shutdown` waits for handler tasks to end after cancelling them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The sender's advertised address: where the answer goes.
    pub addr: SocketAddr,
    /// The sender's member name (from its certificate).
    pub peer_name: Arc<str>,
}

/// Answers requests. Runs concurrently, once per request, on its own task; may be cancelled at
/// the request's deadline (at any `.await`).
#[async_trait]
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    async fn handle(&self, from: &Caller, req: Req) -> Result<Resp, PeerError>;
}

/// Settings of a [`PeerRpc`].
#[derive(Debug, Clone)]
pub struct RpcConfig {
    /// Requests handled at once; more are answered `Overloaded`.
    pub max_concurrent_handlers: usize,
    /// The largest encoded message; keep it equal to the endpoint's `max_frame_bytes`.
    pub max_frame_bytes: usize,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            max_concurrent_handlers: 64,
            max_frame_bytes: crate::net::NetConfig::default().max_frame_bytes,
        }
    }
}

impl RpcConfig {
    /// Checks the settings, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_handlers == 0 {
            return Err("max_concurrent_handlers must be at least 1".to_string());
        }
        if self.max_frame_bytes < 1024 {
            return Err(format!(
                "max_frame_bytes = {} must be at least 1024 (an error answer must fit)",
                self.max_frame_bytes
            ));
        }
        Ok(())
    }
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// No answer in time: the request or the reply was lost, or the peer was slow.
    #[error("no answer within the deadline")]
    DeadlineExceeded,
    /// The peer answered with an error.
    #[error("the peer answered {0}")]
    Remote(PeerError),
    /// The request is over `max_frame_bytes`; nothing was sent.
    #[error(
        "request over max_frame_bytes = {max} (at least {len} bytes) refused; nothing was sent"
    )]
    TooLarge { len: usize, max: usize },
    /// The request could not be encoded; nothing was sent.
    #[error("the request cannot be encoded: {0}")]
    Encode(String),
    /// The peer's answer did not decode.
    #[error("the answer does not decode: {0}")]
    BadResponse(String),
    /// This `PeerRpc` (or its endpoint) is shut down.
    #[error("the peer RPC layer is shut down")]
    Closed,
    /// `start` was given an endpoint whose peer receiver was already taken.
    #[error("the endpoint's peer receiver was already taken")]
    ReceiverTaken,
    /// `start` was given a bad configuration.
    #[error("bad RPC configuration: {0}")]
    Config(String),
}

/// Counters of a [`PeerRpc`] since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RpcStats {
    /// Requests handed to the endpoint.
    pub requests_sent: u64,
    /// Requests that got an answer (success or error) in time.
    pub requests_answered: u64,
    /// Requests that got no answer within their deadline.
    pub requests_timed_out: u64,
    /// Requests waiting for their answer now.
    pub in_flight: u64,
    /// Inbound requests given to the handler.
    pub handled: u64,
    /// Inbound requests refused with `Overloaded`.
    pub overloaded: u64,
    /// Handlers cancelled at their request's deadline (not answered).
    pub handler_deadline_exceeded: u64,
    /// Handlers running now.
    pub handlers_running: u64,
    /// Inbound frames that did not decode (or came from another major version).
    pub bad_frames: u64,
    /// Responses for an unknown or expired request id (dropped).
    pub unknown_responses: u64,
    /// Answers that could not be queued on the endpoint.
    pub send_failures: u64,
}

#[derive(Default)]
struct Counters {
    requests_sent: AtomicU64,
    requests_answered: AtomicU64,
    requests_timed_out: AtomicU64,
    handled: AtomicU64,
    overloaded: AtomicU64,
    handler_deadline_exceeded: AtomicU64,
    bad_frames: AtomicU64,
    unknown_responses: AtomicU64,
    send_failures: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections are single map operations, so a poisoned lock is consistent.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Request ids: unique per process (a random start, then a counter), so a late answer meant
/// for an earlier `PeerRpc` or an earlier process is not taken for a current one.
fn next_request_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| AtomicU64::new(rand::random()))
        .fetch_add(1, Ordering::Relaxed)
}

type Pending<Resp> = oneshot::Sender<Result<Resp, RpcError>>;

struct Inner<Req, Resp> {
    endpoint: Endpoint,
    config: RpcConfig,
    handler: Arc<dyn Handler<Req, Resp>>,
    pending: Mutex<HashMap<u64, Pending<Resp>>>,
    closed: Mutex<bool>,
    permits: Arc<Semaphore>,
    counters: Counters,
    cancel: CancellationToken,
    tracker: TaskTracker,
    bad_frame_log: Mutex<LogLimiter>,
    /// The protocol version each peer (by advertised address) last spoke.
    versions: Mutex<HashMap<SocketAddr, u16>>,
}

/// Peers whose protocol version is remembered; past this the map starts over (a cluster has
/// far fewer members, so only address churn gets there).
const MAX_KNOWN_VERSIONS: usize = 4096;

/// Lets one log line per peer through per period; remembers only peers logged within it.
#[derive(Debug)]
struct LogLimiter {
    period: Duration,
    logged: HashMap<Arc<str>, Instant>,
}

impl LogLimiter {
    fn new(period: Duration) -> LogLimiter {
        LogLimiter {
            period,
            logged: HashMap::new(),
        }
    }

    /// Whether a line about `peer` may be logged at `now` (and if so, notes it).
    fn allow(&mut self, peer: &Arc<str>, now: Instant) -> bool {
        let period = self.period;
        self.logged
            .retain(|_, at| now.saturating_duration_since(*at) < period);
        if self.logged.contains_key(peer) {
            return false;
        }
        self.logged.insert(peer.clone(), now);
        true
    }
}

/// Cancels the layer when the last [`PeerRpc`] clone is dropped.
struct CancelOnDrop(CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Request/response over an endpoint's peer channel. Clones share it.
pub struct PeerRpc<Req, Resp> {
    inner: Arc<Inner<Req, Resp>>,
    _guard: Arc<CancelOnDrop>,
}

impl<Req, Resp> Clone for PeerRpc<Req, Resp> {
    fn clone(&self) -> Self {
        PeerRpc {
            inner: self.inner.clone(),
            _guard: self._guard.clone(),
        }
    }
}

impl<Req, Resp> std::fmt::Debug for PeerRpc<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerRpc")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

/// Removes a pending entry when the request ends in any way, including its future being
/// dropped.
struct PendingGuard<'a, Req, Resp> {
    inner: &'a Inner<Req, Resp>,
    id: u64,
}

impl<Req, Resp> Drop for PendingGuard<'_, Req, Resp> {
    fn drop(&mut self) {
        lock(&self.inner.pending).remove(&self.id);
    }
}

impl<Req, Resp> PeerRpc<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    /// Takes `endpoint`'s peer receiver and starts answering requests with `handler`. Must be
    /// called inside a tokio runtime.
    pub fn start(
        endpoint: Endpoint,
        handler: impl Handler<Req, Resp>,
        config: RpcConfig,
    ) -> Result<Self, RpcError> {
        config.validate().map_err(RpcError::Config)?;
        let receiver = endpoint
            .take_receiver(Channel::Peer)
            .ok_or(RpcError::ReceiverTaken)?;
        let cancel = CancellationToken::new();
        let inner = Arc::new(Inner {
            endpoint,
            permits: Arc::new(Semaphore::new(config.max_concurrent_handlers)),
            config,
            handler: Arc::new(handler),
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(false),
            counters: Counters::default(),
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
            bad_frame_log: Mutex::new(LogLimiter::new(BAD_FRAME_LOG_PERIOD)),
            versions: Mutex::new(HashMap::new()),
        });
        inner.tracker.spawn(inner.clone().receive_loop(receiver));
        Ok(PeerRpc {
            inner,
            _guard: Arc::new(CancelOnDrop(cancel)),
        })
    }

    /// Sends `req` to the member advertising `to` and waits at most `deadline` for the answer.
    /// Never waits on the network to send. A deadline over `u32::MAX` ms is cut to that.
    pub async fn request(
        &self,
        to: SocketAddr,
        req: Req,
        deadline: Duration,
    ) -> Result<Resp, RpcError> {
        let inner = &*self.inner;
        let id = next_request_id();
        let deadline_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX);
        let started = Instant::now();
        let frame = wire::encode_request(
            &wire::Request {
                id,
                deadline_ms,
                body: req,
            },
            inner.config.max_frame_bytes,
        )
        .map_err(|e| match e {
            WireError::TooLarge { len, max } => RpcError::TooLarge { len, max },
            other => RpcError::Encode(other.to_string()),
        })?;
        let (tx, rx) = oneshot::channel();
        {
            // Checked under the pending lock so that shutdown, which sets `closed` and then
            // drains the map, cannot miss this entry.
            let mut pending = lock(&inner.pending);
            if *lock(&inner.closed) {
                return Err(RpcError::Closed);
            }
            pending.insert(id, tx);
        }
        let _guard = PendingGuard { inner, id };
        match inner
            .endpoint
            .try_send(to, Channel::Peer, Bytes::from(frame))
        {
            Ok(()) => bump(&inner.counters.requests_sent),
            Err(SendError::TooLarge { len, max }) => return Err(RpcError::TooLarge { len, max }),
            Err(SendError::Closed) => return Err(RpcError::Closed),
        }
        match tokio::time::timeout_at(started + deadline, rx).await {
            Ok(Ok(answer)) => answer,
            // The sender was dropped without an answer: only shutdown does that.
            Ok(Err(_)) => Err(RpcError::Closed),
            Err(_) => {
                bump(&inner.counters.requests_timed_out);
                Err(RpcError::DeadlineExceeded)
            }
        }
    }
}

impl<Req, Resp> PeerRpc<Req, Resp> {
    pub fn stats(&self) -> RpcStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let running = self.inner.config.max_concurrent_handlers
            - self
                .inner
                .permits
                .available_permits()
                .min(self.inner.config.max_concurrent_handlers);
        RpcStats {
            requests_sent: get(&c.requests_sent),
            requests_answered: get(&c.requests_answered),
            requests_timed_out: get(&c.requests_timed_out),
            in_flight: lock(&self.inner.pending).len() as u64,
            handled: get(&c.handled),
            overloaded: get(&c.overloaded),
            handler_deadline_exceeded: get(&c.handler_deadline_exceeded),
            handlers_running: running as u64,
            bad_frames: get(&c.bad_frames),
            unknown_responses: get(&c.unknown_responses),
            send_failures: get(&c.send_failures),
        }
    }

    /// The protocol version the peer at `addr` spoke in its last frame here; `None` before it
    /// sent one. Optional features of a newer minor version go only to peers known to speak it.
    pub fn peer_version(&self, addr: SocketAddr) -> Option<u16> {
        lock(&self.inner.versions).get(&addr).copied()
    }

    /// The endpoint this layer sends on.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Stops receiving, cancels running handlers and fails every pending request with
    /// [`RpcError::Closed`]. Does not close the endpoint (gossip rides it too).
    pub async fn shutdown(&self) {
        let drained: Vec<Pending<Resp>> = {
            let mut pending = lock(&self.inner.pending);
            *lock(&self.inner.closed) = true;
            pending.drain().map(|(_, tx)| tx).collect()
        };
        for tx in drained {
            let _ = tx.send(Err(RpcError::Closed));
        }
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("peer RPC tasks did not stop within {SHUTDOWN_GRACE:?}");
        }
    }
}

impl<Req, Resp> Inner<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    async fn receive_loop(self: Arc<Self>, mut receiver: mpsc::Receiver<Inbound>) {
        loop {
            let inbound = tokio::select! {
                () = self.cancel.cancelled() => break,
                () = self.endpoint.closed() => break,
                inbound = receiver.recv() => match inbound {
                    Some(inbound) => inbound,
                    None => break,
                },
            };
            self.on_frame(inbound);
        }
        // The endpoint closed under us: nothing can be answered any more.
        let drained: Vec<Pending<Resp>> = {
            let mut pending = lock(&self.pending);
            *lock(&self.closed) = true;
            pending.drain().map(|(_, tx)| tx).collect()
        };
        for tx in drained {
            let _ = tx.send(Err(RpcError::Closed));
        }
        self.cancel.cancel();
    }

    fn on_frame(self: &Arc<Self>, inbound: Inbound) {
        let max = self.config.max_frame_bytes;
        let decoded = wire::decode_versioned::<Req, Resp>(&inbound.payload, max).map(
            |(version, envelope)| {
                self.remember_version(inbound.from, version);
                envelope
            },
        );
        match decoded {
            Ok(Envelope::Request(request)) => self.on_request(inbound, request),
            Ok(Envelope::Response(response)) => {
                self.complete(response.id, response.body.map_err(RpcError::Remote));
            }
            Err(WireError::Version { kind, id, version }) => {
                self.bad_frame(&inbound, "another major protocol version");
                match kind {
                    Kind::Request => {
                        let error = PeerError::unsupported(format!(
                            "protocol version {} is not supported; this node speaks {}",
                            wire::version_string(version),
                            wire::version_string(wire::PROTOCOL_VERSION)
                        ));
                        self.answer_error(&inbound, id, &error);
                    }
                    Kind::Response => {
                        let error = wire::decode_error_any_version(&inbound.payload, max)
                            .unwrap_or_else(|| {
                                PeerError::unsupported(format!(
                                    "the peer answered in protocol version {}",
                                    wire::version_string(version)
                                ))
                            });
                        self.complete(id, Err(RpcError::Remote(error)));
                    }
                }
            }
            Err(WireError::Body { kind, id, reason }) => {
                self.bad_frame(&inbound, &reason);
                match kind {
                    Kind::Request => {
                        let error = PeerError::bad_request(format!(
                            "the request does not decode: {reason}"
                        ));
                        self.answer_error(&inbound, id, &error);
                    }
                    Kind::Response => self.complete(id, Err(RpcError::BadResponse(reason))),
                }
            }
            Err(error) => self.bad_frame(&inbound, &error.to_string()),
        }
    }

    fn remember_version(&self, from: SocketAddr, version: u16) {
        let mut versions = lock(&self.versions);
        if versions.get(&from) != Some(&version) {
            if versions.len() >= MAX_KNOWN_VERSIONS {
                versions.clear();
            }
            versions.insert(from, version);
        }
    }

    /// Hands an answer to the waiting caller; an unknown or expired id is counted and dropped.
    fn complete(&self, id: u64, answer: Result<Resp, RpcError>) {
        let waiting = lock(&self.pending).remove(&id);
        match waiting {
            Some(tx) => {
                bump(&self.counters.requests_answered);
                // The caller may have just timed out; then the answer is dropped.
                let _ = tx.send(answer);
            }
            None => bump(&self.counters.unknown_responses),
        }
    }

    fn on_request(self: &Arc<Self>, inbound: Inbound, request: wire::Request<Req>) {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                bump(&self.counters.overloaded);
                let error = PeerError::overloaded(format!(
                    "{} requests are being handled already",
                    self.config.max_concurrent_handlers
                ));
                self.answer_error(&inbound, request.id, &error);
                return;
            }
        };
        bump(&self.counters.handled);
        let inner = self.clone();
        let deadline = Instant::now() + Duration::from_millis(u64::from(request.deadline_ms));
        self.tracker.spawn(async move {
            let _permit = permit;
            let caller = Caller {
                addr: inbound.from,
                peer_name: inbound.peer_name.clone(),
            };
            let handled = tokio::select! {
                () = inner.cancel.cancelled() => return,
                handled = tokio::time::timeout_at(
                    deadline,
                    inner.handler.handle(&caller, request.body),
                ) => handled,
            };
            let Ok(answer) = handled else {
                bump(&inner.counters.handler_deadline_exceeded);
                tracing::debug!(peer = %caller.peer_name, id = request.id, "handler cancelled at the request's deadline");
                return;
            };
            inner.answer(&inbound, request.id, answer);
        });
    }

    fn answer(&self, inbound: &Inbound, id: u64, body: Result<Resp, PeerError>) {
        let response = wire::Response { id, body };
        match wire::encode_response(&response, self.config.max_frame_bytes) {
            Ok(frame) => self.send(inbound, Bytes::from(frame)),
            Err(error) => {
                tracing::warn!(peer = %inbound.peer_name, id, %error, "cannot encode an answer");
                let error = PeerError::internal(format!("the answer cannot be sent: {error}"));
                self.answer_error(inbound, id, &error);
            }
        }
    }

    fn answer_error(&self, inbound: &Inbound, id: u64, error: &PeerError) {
        match wire::encode_error(id, error, self.config.max_frame_bytes) {
            Ok(frame) => self.send(inbound, Bytes::from(frame)),
            Err(error) => {
                bump(&self.counters.send_failures);
                tracing::warn!(peer = %inbound.peer_name, id, %error, "cannot encode an error answer");
            }
        }
    }

    fn send(&self, inbound: &Inbound, frame: Bytes) {
        if let Err(error) = self.endpoint.try_send(inbound.from, Channel::Peer, frame) {
            bump(&self.counters.send_failures);
            tracing::debug!(peer = %inbound.peer_name, %error, "cannot queue an answer");
        }
    }

    /// Counts an undecodable frame and logs it at most once per peer per minute.
    fn bad_frame(&self, inbound: &Inbound, reason: &str) {
        bump(&self.counters.bad_frames);
        let log = lock(&self.bad_frame_log).allow(&inbound.peer_name, Instant::now());
        if log {
            tracing::warn!(
                peer = %inbound.peer_name,
                from = %inbound.from,
                reason,
                "undecodable peer frame (further ones from this peer are counted, not logged, for a minute)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| next_request_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn bad_frames_are_logged_once_per_peer_per_period() {
        let mut limiter = LogLimiter::new(Duration::from_secs(60));
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let t0 = Instant::now();
        assert!(limiter.allow(&a, t0));
        assert!(!limiter.allow(&a, t0 + Duration::from_secs(1)));
        assert!(limiter.allow(&b, t0 + Duration::from_secs(1)));
        assert!(!limiter.allow(&a, t0 + Duration::from_secs(59)));
        assert!(limiter.allow(&a, t0 + Duration::from_secs(60)));
        // Only peers logged within the period are remembered.
        assert!(limiter.allow(&a, t0 + Duration::from_secs(200)));
        assert_eq!(limiter.logged.len(), 1);
    }

    #[test]
    fn config_is_checked() {
        assert!(RpcConfig::default().validate().is_ok());
        let bad = RpcConfig {
            max_concurrent_handlers: 0,
            ..RpcConfig::default()
        };
        assert!(bad.validate().is_err_and(|e| e.contains("max_concurrent")));
        let bad = RpcConfig {
            max_frame_bytes: 10,
            ..RpcConfig::default()
        };
        assert!(bad.validate().is_err_and(|e| e.contains("max_frame_bytes")));
    }
}
