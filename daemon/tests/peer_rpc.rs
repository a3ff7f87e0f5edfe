//! The peer request/response layer over real endpoints: the in-memory network (with cut
//! links) and QUIC with real certificates on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kiln_daemon::net::{Channel, Endpoint, MemNetwork, NetConfig};
use kiln_daemon::peer::wire::{self, Envelope, PeerErrorKind};
use kiln_daemon::peer::{Caller, Handler, PeerError, PeerRpc, RpcConfig, RpcError, RpcStats};
use kiln_daemon::pki::{Ca, identity_from_ca};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Echo(String),
    /// Answers after this many milliseconds.
    Sleep(u64),
    /// Waits until the test releases it.
    Block,
    Fail(PeerErrorKind),
    /// The caller's name as the handler saw it.
    WhoAmI,
}

struct Probe {
    /// Handlers dropped before they finished (cancelled).
    cancelled: AtomicU64,
    /// `Block` handlers take one permit each; the test adds them to release the handlers.
    release: Semaphore,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            cancelled: AtomicU64::new(0),
            release: Semaphore::new(0),
        }
    }
}

struct TestHandler {
    probe: Arc<Probe>,
}

/// Counts a handler future dropped before it finished.
struct CancelProbe<'a> {
    probe: &'a Probe,
    finished: bool,
}

impl Drop for CancelProbe<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.probe.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl Handler<Msg, Msg> for TestHandler {
    async fn handle(&self, from: &Caller, req: Msg) -> Result<Msg, PeerError> {
        let mut guard = CancelProbe {
            probe: &self.probe,
            finished: false,
        };
        let answer = match req {
            Msg::Echo(s) => Ok(Msg::Echo(s)),
            Msg::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(Msg::Echo("slept".to_string()))
            }
            Msg::Block => {
                match self.probe.release.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return Err(PeerError::internal("the release semaphore closed")),
                }
                Ok(Msg::Echo("released".to_string()))
            }
            Msg::Fail(kind) => Err(PeerError::new(kind, "asked to fail")),
            Msg::WhoAmI => Ok(Msg::Echo(from.peer_name.to_string())),
        };
        guard.finished = true;
        answer
    }
}

type Rpc = PeerRpc<Msg, Msg>;

fn net_config() -> NetConfig {
    NetConfig {
        peer_queue_len: 1024,
        connect_timeout: Duration::from_millis(500),
        send_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        ..NetConfig::default()
    }
}

struct Node {
    rpc: Rpc,
    probe: Arc<Probe>,
    addr: SocketAddr,
}

fn start(endpoint: Endpoint, config: RpcConfig) -> Node {
    let probe = Arc::new(Probe::new());
    let addr = endpoint.advertise().addr;
    let rpc = PeerRpc::start(
        endpoint,
        TestHandler {
            probe: probe.clone(),
        },
        config,
    )
    .expect("the RPC layer starts");
    Node { rpc, probe, addr }
}

struct Mem {
    net: MemNetwork,
    port: AtomicU16,
}

impl Mem {
    fn new() -> Mem {
        Mem {
            net: MemNetwork::new(),
            port: AtomicU16::new(7000),
        }
    }

    async fn endpoint(&self, name: &str) -> Endpoint {
        let port = self.port.fetch_add(1, Ordering::Relaxed);
        Endpoint::bind_mem(
            &self.net,
            name,
            SocketAddr::from(([10, 0, 0, 1], port)),
            net_config(),
        )
        .await
        .expect("the endpoint binds")
    }

    async fn node(&self, name: &str, config: RpcConfig) -> Node {
        start(self.endpoint(name).await, config)
    }
}

/// Waits until `check` holds on the node's stats, or fails naming `what`.
async fn wait_stats(rpc: &Rpc, what: &str, check: impl Fn(&RpcStats) -> bool) {
    let end = Instant::now() + WAIT;
    loop {
        let stats = rpc.stats();
        if check(&stats) {
            return;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn echo(s: &str) -> Msg {
    Msg::Echo(s.to_string())
}

#[tokio::test]
async fn mem_echo_both_ways_and_caller_name() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    let got = a.rpc.request(b.addr, echo("hi b"), WAIT).await;
    assert_eq!(got, Ok(echo("hi b")));
    let got = b.rpc.request(a.addr, echo("hi a"), WAIT).await;
    assert_eq!(got, Ok(echo("hi a")));
    let got = a.rpc.request(b.addr, Msg::WhoAmI, WAIT).await;
    assert_eq!(got, Ok(echo("a")));
    assert_eq!(a.rpc.stats().requests_answered, 2);
    assert_eq!(a.rpc.stats().in_flight, 0);
    assert_eq!(b.rpc.stats().handled, 2);
}

#[tokio::test]
async fn mem_500_concurrent_requests_are_all_answered() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem
        .node(
            "b",
            RpcConfig {
                max_concurrent_handlers: 1024,
                ..RpcConfig::default()
            },
        )
        .await;
    let requests = (0..500).map(|i| {
        let rpc = a.rpc.clone();
        let to = b.addr;
        async move { (i, rpc.request(to, Msg::Echo(i.to_string()), WAIT).await) }
    });
    let answers = timeout(Duration::from_secs(8), futures::future::join_all(requests))
        .await
        .expect("all 500 settle within the deadline");
    for (i, answer) in answers {
        assert_eq!(answer, Ok(Msg::Echo(i.to_string())), "request {i}");
    }
    let stats = a.rpc.stats();
    assert_eq!(stats.requests_answered, 500);
    assert_eq!(stats.in_flight, 0);

    // With the default bound of 64 handlers, every request is still answered at once: by
    // the handler or with Overloaded, never left to time out.
    let c = mem.node("c", RpcConfig::default()).await;
    let requests = (0..500).map(|i| {
        let rpc = a.rpc.clone();
        let to = c.addr;
        async move { rpc.request(to, Msg::Echo(i.to_string()), WAIT).await }
    });
    let answers = timeout(Duration::from_secs(8), futures::future::join_all(requests))
        .await
        .expect("all 500 settle within the deadline");
    let mut refused = 0u64;
    for answer in answers {
        match answer {
            Ok(Msg::Echo(_)) => {}
            Err(RpcError::Remote(e)) if e.kind == PeerErrorKind::Overloaded => refused += 1,
            other => panic!("expected an echo or Overloaded, got {other:?}"),
        }
    }
    assert_eq!(c.rpc.stats().overloaded, refused);
    assert_eq!(c.rpc.stats().handled + refused, 500);
    assert_eq!(a.rpc.stats().in_flight, 0);
}

#[tokio::test]
async fn mem_a_slow_handler_times_out_and_is_cancelled() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    let started = Instant::now();
    let got = a
        .rpc
        .request(b.addr, Msg::Sleep(5_000), Duration::from_millis(200))
        .await;
    assert_eq!(got, Err(RpcError::DeadlineExceeded));
    assert!(started.elapsed() < Duration::from_secs(2));
    let stats = a.rpc.stats();
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert_eq!(stats.requests_timed_out, 1);
    // The handler is cancelled at the request's deadline and sends nothing.
    wait_stats(&b.rpc, "the handler to be cancelled", |s| {
        s.handler_deadline_exceeded == 1 && s.handlers_running == 0
    })
    .await;
    assert_eq!(b.probe.cancelled.load(Ordering::SeqCst), 1);
    // A request that is not slow still works.
    assert_eq!(
        a.rpc.request(b.addr, echo("after"), WAIT).await,
        Ok(echo("after"))
    );
    assert_eq!(a.rpc.stats().unknown_responses, 0);
}

#[tokio::test]
async fn mem_handler_errors_reach_the_caller() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    for kind in [
        PeerErrorKind::NotFound,
        PeerErrorKind::Internal,
        PeerErrorKind::BadRequest,
    ] {
        let got = a.rpc.request(b.addr, Msg::Fail(kind), WAIT).await;
        match got {
            Err(RpcError::Remote(error)) => {
                assert_eq!(error.kind, kind);
                assert_eq!(error.message, "asked to fail");
            }
            other => panic!("expected Remote({kind}), got {other:?}"),
        }
    }
}

#[tokio::test]
async fn mem_overload_is_refused_at_once() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem
        .node(
            "b",
            RpcConfig {
                max_concurrent_handlers: 2,
                ..RpcConfig::default()
            },
        )
        .await;
    let blocked: Vec<_> = (0..2)
        .map(|_| {
            let rpc = a.rpc.clone();
            let to = b.addr;
            tokio::spawn(async move { rpc.request(to, Msg::Block, WAIT).await })
        })
        .collect();
    wait_stats(&b.rpc, "two running handlers", |s| s.handlers_running == 2).await;
    let got = a.rpc.request(b.addr, echo("third"), WAIT).await;
    match got {
        Err(RpcError::Remote(error)) => assert_eq!(error.kind, PeerErrorKind::Overloaded),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert_eq!(b.rpc.stats().overloaded, 1);
    b.probe.release.add_permits(2);
    for task in blocked {
        let answer = task.await.expect("the task ends");
        assert_eq!(answer, Ok(echo("released")));
    }
    assert_eq!(
        a.rpc.request(b.addr, echo("later"), WAIT).await,
        Ok(echo("later"))
    );
}

#[tokio::test]
async fn mem_garbage_does_not_disturb_requests() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    let mut sent = 0u64;
    for len in [0usize, 1, 7, 64, 1000] {
        let garbage: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        a.rpc
            .endpoint()
            .try_send(b.addr, Channel::Peer, Bytes::from(garbage))
            .expect("queued");
        sent += 1;
    }
    wait_stats(&b.rpc, "the garbage to be counted", |s| {
        s.bad_frames >= sent
    })
    .await;
    assert_eq!(
        a.rpc.request(b.addr, echo("clean"), WAIT).await,
        Ok(echo("clean"))
    );
}

#[tokio::test]
async fn mem_oversized_request_is_refused_without_sending() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    let before = a.rpc.endpoint().stats().frames_sent;
    let huge = Msg::Echo("x".repeat(NetConfig::default().max_frame_bytes + 1));
    let got = a.rpc.request(b.addr, huge, WAIT).await;
    assert!(matches!(got, Err(RpcError::TooLarge { .. })), "{got:?}");
    let stats = a.rpc.stats();
    assert_eq!(stats.requests_sent, 0);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(a.rpc.endpoint().stats().frames_sent, before);
    assert_eq!(a.rpc.endpoint().stats().dropped_oversize, 0);
}

#[tokio::test]
async fn mem_shutdown_fails_pending_requests_promptly() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    let rpc = a.rpc.clone();
    let to = b.addr;
    let pending =
        tokio::spawn(async move { rpc.request(to, Msg::Block, Duration::from_secs(30)).await });
    wait_stats(&b.rpc, "the handler to run", |s| s.handlers_running == 1).await;
    assert_eq!(a.rpc.stats().in_flight, 1);
    let started = Instant::now();
    a.rpc.shutdown().await;
    let got = timeout(Duration::from_secs(1), pending)
        .await
        .expect("answered promptly")
        .expect("the task ends");
    assert_eq!(got, Err(RpcError::Closed));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(a.rpc.stats().in_flight, 0);
    assert_eq!(
        a.rpc.request(b.addr, echo("x"), WAIT).await,
        Err(RpcError::Closed)
    );
    // Shutting down the serving side cancels its running handler.
    b.rpc.shutdown().await;
    assert_eq!(b.rpc.stats().handlers_running, 0);
    assert_eq!(b.probe.cancelled.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn mem_a_cut_link_times_out_then_heals() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    assert_eq!(
        a.rpc.request(b.addr, echo("before"), WAIT).await,
        Ok(echo("before"))
    );
    mem.net.cut(a.addr, b.addr);
    let got = a
        .rpc
        .request(b.addr, echo("lost"), Duration::from_millis(300))
        .await;
    assert_eq!(got, Err(RpcError::DeadlineExceeded));
    assert_eq!(a.rpc.stats().in_flight, 0);
    mem.net.heal(a.addr, b.addr);
    // The endpoint backs off a destination for 500 ms after a failed send; retry until then.
    let end = Instant::now() + WAIT;
    loop {
        match a
            .rpc
            .request(b.addr, echo("healed"), Duration::from_millis(300))
            .await
        {
            Ok(answer) => {
                assert_eq!(answer, echo("healed"));
                break;
            }
            Err(RpcError::DeadlineExceeded) if Instant::now() < end => {}
            Err(error) => panic!("no answer after healing: {error}"),
        }
    }
    assert_eq!(a.rpc.stats().in_flight, 0);
}

/// A member without a `PeerRpc` that speaks raw frames, to check version and body refusals.
#[tokio::test]
async fn mem_other_versions_and_bad_bodies_get_clear_errors() {
    let mem = Mem::new();
    let b = mem.node("b", RpcConfig::default()).await;
    let raw = mem.endpoint("raw").await;
    let mut inbox = raw.take_receiver(Channel::Peer).expect("the peer receiver");
    let max = NetConfig::default().max_frame_bytes;

    #[derive(Serialize)]
    struct V2<'a> {
        v: u16,
        id: u64,
        t: wire::Kind,
        deadline_ms: u32,
        body: &'a str,
    }
    let v2 = rmp_serde::to_vec_named(&V2 {
        v: 0x0200,
        id: 77,
        t: wire::Kind::Request,
        deadline_ms: 1000,
        body: "from the future",
    })
    .expect("encodes");
    raw.try_send(b.addr, Channel::Peer, Bytes::from(v2))
        .expect("queued");
    let answer = timeout(WAIT, inbox.recv())
        .await
        .expect("answered")
        .expect("a frame");
    match wire::decode::<Msg, Msg>(&answer.payload, max) {
        Ok(Envelope::Response(wire::Response {
            id: 77,
            body: Err(e),
        })) => {
            assert_eq!(e.kind, PeerErrorKind::Unsupported);
            assert!(e.message.contains("2.0"), "{}", e.message);
        }
        other => panic!("expected Unsupported for id 77, got {other:?}"),
    }

    let bad_body = wire::encode_request(
        &wire::Request {
            id: 78,
            deadline_ms: 1000,
            body: vec![1u8, 2, 3],
        },
        max,
    )
    .expect("encodes");
    raw.try_send(b.addr, Channel::Peer, Bytes::from(bad_body))
        .expect("queued");
    let answer = timeout(WAIT, inbox.recv())
        .await
        .expect("answered")
        .expect("a frame");
    match wire::decode::<Msg, Msg>(&answer.payload, max) {
        Ok(Envelope::Response(wire::Response {
            id: 78,
            body: Err(e),
        })) => {
            assert_eq!(e.kind, PeerErrorKind::BadRequest);
        }
        other => panic!("expected BadRequest for id 78, got {other:?}"),
    }
    assert_eq!(b.rpc.stats().bad_frames, 2);
}

#[tokio::test]
async fn mem_each_peers_protocol_version_is_learned_from_its_frames() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    assert_eq!(a.rpc.peer_version(b.addr), None, "nothing heard from b yet");
    assert_eq!(
        a.rpc.request(b.addr, echo("hi"), WAIT).await,
        Ok(echo("hi"))
    );
    // a heard b's answer, b heard a's request.
    assert_eq!(a.rpc.peer_version(b.addr), Some(wire::PROTOCOL_VERSION));
    assert_eq!(b.rpc.peer_version(a.addr), Some(wire::PROTOCOL_VERSION));

    // An older member (protocol 1.0) is remembered as such.
    let raw = mem.endpoint("raw").await;
    let mut inbox = raw.take_receiver(Channel::Peer).expect("the peer receiver");
    #[derive(Serialize)]
    struct Old<'a> {
        v: u16,
        id: u64,
        t: wire::Kind,
        deadline_ms: u32,
        body: &'a Msg,
    }
    let old = rmp_serde::to_vec_named(&Old {
        v: 0x0100,
        id: 5,
        t: wire::Kind::Request,
        deadline_ms: 1000,
        body: &echo("from 1.0"),
    })
    .expect("encodes");
    raw.try_send(b.addr, Channel::Peer, Bytes::from(old))
        .expect("queued");
    let answer = timeout(WAIT, inbox.recv())
        .await
        .expect("answered")
        .expect("a frame");
    let max = NetConfig::default().max_frame_bytes;
    match wire::decode::<Msg, Msg>(&answer.payload, max) {
        Ok(Envelope::Response(wire::Response { id: 5, body })) => {
            assert_eq!(body, Ok(echo("from 1.0")));
        }
        other => panic!("expected the echo for id 5, got {other:?}"),
    }
    assert_eq!(
        b.rpc.peer_version(raw.advertise().addr),
        Some(0x0100),
        "the older member's version"
    );
}

#[tokio::test]
async fn quic_echo_errors_and_timeouts_with_real_certificates() {
    let ca = Ca::generate("peer-rpc-test", 2).expect("a CA");
    let bind = |name: &'static str| {
        let identity = identity_from_ca(&ca, name).expect("an identity");
        async move {
            Endpoint::bind(
                &identity,
                NetConfig {
                    quic_listen: Some("127.0.0.1:0".parse().expect("an address")),
                    ..net_config()
                },
            )
            .await
            .expect("binds")
        }
    };
    let a = start(bind("quic-a").await, RpcConfig::default());
    let b = start(
        bind("quic-b").await,
        RpcConfig {
            max_concurrent_handlers: 1024,
            ..RpcConfig::default()
        },
    );
    assert_eq!(
        a.rpc.request(b.addr, echo("over quic"), WAIT).await,
        Ok(echo("over quic"))
    );
    assert_eq!(
        b.rpc.request(a.addr, Msg::WhoAmI, WAIT).await,
        Ok(echo("quic-b"))
    );
    let got = a
        .rpc
        .request(b.addr, Msg::Fail(PeerErrorKind::NotFound), WAIT)
        .await;
    assert!(
        matches!(&got, Err(RpcError::Remote(e)) if e.kind == PeerErrorKind::NotFound),
        "{got:?}"
    );
    let got = a
        .rpc
        .request(b.addr, Msg::Sleep(5_000), Duration::from_millis(200))
        .await;
    assert_eq!(got, Err(RpcError::DeadlineExceeded));
    assert_eq!(a.rpc.stats().in_flight, 0);
    let requests = (0..500).map(|i| a.rpc.request(b.addr, Msg::Echo(i.to_string()), WAIT));
    let answers = futures::future::join_all(requests).await;
    for (i, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer, Ok(Msg::Echo(i.to_string())));
    }
    // Garbage on the peer channel is counted and does not disturb the next request.
    for len in [0usize, 3, 500] {
        let garbage: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        a.rpc
            .endpoint()
            .try_send(b.addr, Channel::Peer, Bytes::from(garbage))
            .expect("queued");
    }
    wait_stats(&b.rpc, "the garbage to be counted", |s| s.bad_frames >= 3).await;
    assert_eq!(
        a.rpc.request(b.addr, echo("still fine"), WAIT).await,
        Ok(echo("still fine"))
    );
    let huge = Msg::Echo("x".repeat(NetConfig::default().max_frame_bytes + 1));
    let got = a.rpc.request(b.addr, huge, WAIT).await;
    assert!(matches!(got, Err(RpcError::TooLarge { .. })), "{got:?}");
    a.rpc.shutdown().await;
    b.rpc.shutdown().await;
    a.rpc.endpoint().close().await;
    b.rpc.endpoint().close().await;
}

#[tokio::test]
async fn mem_an_abandoned_request_leaves_nothing_pending() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    // The caller gives up (drops the future) long before the request's own deadline.
    let abandoned = timeout(
        Duration::from_millis(100),
        a.rpc.request(b.addr, Msg::Block, Duration::from_secs(30)),
    )
    .await;
    assert!(abandoned.is_err(), "the request was still waiting");
    assert_eq!(a.rpc.stats().in_flight, 0);
    // The answer that comes later is for an id nobody waits for: dropped and counted.
    wait_stats(&b.rpc, "the handler to run", |s| s.handlers_running == 1).await;
    b.probe.release.add_permits(1);
    wait_stats(&a.rpc, "the late answer to be dropped", |s| {
        s.unknown_responses == 1
    })
    .await;
    assert_eq!(a.rpc.stats().in_flight, 0);
}

#[tokio::test]
async fn mem_closing_the_endpoint_fails_pending_requests() {
    let mem = Mem::new();
    let a = mem.node("a", RpcConfig::default()).await;
    let b = mem.node("b", RpcConfig::default()).await;
    let rpc = a.rpc.clone();
    let to = b.addr;
    let pending =
        tokio::spawn(async move { rpc.request(to, Msg::Block, Duration::from_secs(30)).await });
    wait_stats(&b.rpc, "the handler to run", |s| s.handlers_running == 1).await;
    a.rpc.endpoint().close().await;
    let got = timeout(Duration::from_secs(1), pending)
        .await
        .expect("answered promptly")
        .expect("the task ends");
    assert_eq!(got, Err(RpcError::Closed));
    assert_eq!(a.rpc.stats().in_flight, 0);
    assert_eq!(
        a.rpc.request(b.addr, echo("x"), WAIT).await,
        Err(RpcError::Closed)
    );
}

#[tokio::test]
async fn mem_starting_twice_on_one_endpoint_is_refused() {
    let mem = Mem::new();
    let endpoint = mem.endpoint("a").await;
    let first = start(endpoint.clone(), RpcConfig::default());
    let second = PeerRpc::<Msg, Msg>::start(
        endpoint,
        TestHandler {
            probe: first.probe.clone(),
        },
        RpcConfig::default(),
    );
    assert!(matches!(second, Err(RpcError::ReceiverTaken)), "{second:?}");
}
