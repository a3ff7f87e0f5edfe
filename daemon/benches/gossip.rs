//! Gossip at fleet size: N chitchat nodes over QUIC ([`GossipTransport`]) in one process on
//! loopback. Prints membership convergence time, key-change propagation percentiles, steady-state
//! frame bytes per node per second (from `NetStats`: frame bytes, not counting QUIC headers,
//! ACKs and keep-alives) and the time for every observer to mark a crashed node dead.
//!
//! `cargo bench -p kiln-daemon --bench gossip --profile dev` (dev reuses the test build's
//! dependencies). Environment: `GOSSIP_BENCH_NODES` (default 100), `GOSSIP_BENCH_INTERVAL_MS`
//! (default 500), `GOSSIP_BENCH_KEYS` (keys per node, default 32), `GOSSIP_BENCH_STEADY_SECS`
//! (default 10), `GOSSIP_BENCH_SAMPLES` (key changes timed, default 10). The whole run is
//! bounded by 110 s.

mod common;

use common::{env_or, percentile};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, spawn_chitchat,
};
use kiln_daemon::net::gossip::GossipTransport;
use kiln_daemon::net::{Endpoint, NetConfig};
use kiln_daemon::pki::{Ca, identity_from_ca};
use tokio::time::{Instant, timeout};

type LiveNodes = BTreeMap<ChitchatId, NodeState>;

struct Node {
    endpoint: Endpoint,
    handle: ChitchatHandle,
}

/// Starts a watcher on every node in `nodes` (before the event being timed), each finishing
/// when `predicate` holds in that node's live view; `collect` then returns each node's wait
/// from `start`, sorted.
async fn watch_each<'a, F>(
    nodes: impl IntoIterator<Item = &'a Node>,
    limit: Duration,
    predicate: F,
) -> Vec<tokio::task::JoinHandle<Result<Instant, tokio::time::error::Elapsed>>>
where
    F: Fn(&LiveNodes) -> bool + Clone + Send + Sync + 'static,
{
    let mut tasks = Vec::new();
    for node in nodes {
        let mut watcher = node.handle.with_chitchat(|c| c.live_nodes_watcher()).await;
        let predicate = predicate.clone();
        tasks.push(tokio::spawn(async move {
            timeout(limit, watcher.wait_for(|live| predicate(live)))
                .await
                .map(|_| Instant::now())
        }));
    }
    tasks
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<Result<Instant, tokio::time::error::Elapsed>>>,
    start: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let mut waits = Vec::with_capacity(tasks.len());
    for task in tasks {
        let at = task.await?.context("a node did not get there in time")?;
        waits.push(at.saturating_duration_since(start));
    }
    waits.sort();
    Ok(waits)
}

async fn run() -> anyhow::Result<()> {
    let n = env_or("GOSSIP_BENCH_NODES", 100) as usize;
    let interval = Duration::from_millis(env_or("GOSSIP_BENCH_INTERVAL_MS", 500));
    let keys = env_or("GOSSIP_BENCH_KEYS", 32);
    let steady = Duration::from_secs(env_or("GOSSIP_BENCH_STEADY_SECS", 10));
    let samples = env_or("GOSSIP_BENCH_SAMPLES", 10);
    anyhow::ensure!(n >= 4, "GOSSIP_BENCH_NODES must be at least 4");
    println!(
        "gossip bench: {n} QUIC nodes, interval {interval:?}, {keys} keys/node, loopback, one process"
    );

    let ca = Ca::generate("bench", 2)?;
    let started = Instant::now();
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    let mut seeds: Vec<String> = Vec::new();
    for i in 0..n {
        let name = format!("node-{i}");
        let endpoint = Endpoint::bind(
            &identity_from_ca(&ca, &name)?,
            NetConfig {
                quic_listen: Some("127.0.0.1:0".parse()?),
                ..NetConfig::default()
            },
        )
        .await?;
        let advertise: SocketAddr = endpoint.advertise().addr;
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(name, 1, advertise),
            cluster_id: "bench".to_string(),
            gossip_interval: interval,
            listen_addr: advertise,
            seed_nodes: seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: 8.0,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: interval,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(300),
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let initial: Vec<(String, String)> = (0..keys)
            .map(|k| (format!("gpu.{k}.util"), "0".to_string()))
            .collect();
        let transport = GossipTransport::new(endpoint.clone());
        let handle = spawn_chitchat(config, initial, &transport).await?;
        if i < 3 {
            seeds.push(advertise.to_string());
        }
        nodes.push(Node { endpoint, handle });
    }
    println!("started {n} nodes in {:?}", started.elapsed());

    let watchers = watch_each(&nodes, Duration::from_secs(60), move |live| live.len() == n).await;
    let converged = collect(watchers, started).await?;
    println!(
        "membership converged (all see all): {:?} after the first node started",
        converged.last().copied().unwrap_or_default()
    );

    // Steady state: frame bytes sent per node per second.
    let sent = |nodes: &[Node]| -> (u64, u64) {
        nodes.iter().fold((0, 0), |(b, f), node| {
            let s = node.endpoint.stats();
            (b + s.bytes_sent, f + s.frames_sent)
        })
    };
    let (b0, f0) = sent(&nodes);
    let t0 = Instant::now();
    tokio::time::sleep(steady).await;
    let (b1, f1) = sent(&nodes);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "steady state over {secs:.1} s: {:.1} KiB/s and {:.1} frames/s sent per node (frame bytes)",
        (b1 - b0) as f64 / 1024.0 / secs / n as f64,
        (f1 - f0) as f64 / secs / n as f64
    );

    // Key-change propagation: a key set on one node, timed until every other node sees it.
    let mut propagation = Vec::new();
    for s in 0..samples {
        let origin = (s as usize * 7) % n;
        let origin_name = format!("node-{origin}");
        let value = format!("{}", s + 1);
        let (origin_name2, value2) = (origin_name.clone(), value.clone());
        let others = nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != origin)
            .map(|(_, node)| node);
        let watchers = watch_each(others, Duration::from_secs(20), move |live| {
            live.iter().any(|(id, state)| {
                *id.node_id == *origin_name2 && state.get("gpu.0.util") == Some(value2.as_str())
            })
        })
        .await;
        let start = Instant::now();
        nodes[origin]
            .handle
            .with_chitchat(|c| c.self_node_state().set("gpu.0.util", &value))
            .await;
        let waits = collect(watchers, start).await?;
        propagation.extend(waits);
    }
    propagation.sort();
    println!(
        "key propagation ({} observations): p50 {:?}, p99 {:?}, max {:?}",
        propagation.len(),
        percentile(&propagation, 0.5),
        percentile(&propagation, 0.99),
        propagation.last().copied().unwrap_or_default()
    );

    // Crash detection: stop the last node, then time until every other node drops it.
    let victim = nodes.pop().context("nodes")?;
    let victim_name = victim.handle.chitchat_id().node_id.to_string();
    let watchers = watch_each(&nodes, Duration::from_secs(30), move |live| {
        !live.keys().any(|id| *id.node_id == *victim_name)
    })
    .await;
    let start = Instant::now();
    victim.handle.shutdown().await?;
    // Closing waits for QUIC connections to drain; the observers are timed meanwhile.
    let closing = tokio::spawn(async move { victim.endpoint.close().await });
    let detection = collect(watchers, start).await?;
    closing.await?;
    println!(
        "crashed node marked dead: first {:?}, p50 {:?}, all {:?}",
        detection.first().copied().unwrap_or_default(),
        percentile(&detection, 0.5),
        detection.last().copied().unwrap_or_default()
    );
    let totals = nodes.iter().fold((0u64, 0u64, 0u64), |acc, node| {
        let s = node.endpoint.stats();
        (
            acc.0 + s.dropped_queue_full,
            acc.1 + s.send_failures,
            acc.2 + s.connections_open,
        )
    });
    println!(
        "totals: dropped_queue_full {}, send_failures {}, connections open {} ({:.1} per node)",
        totals.0,
        totals.1,
        totals.2,
        totals.2 as f64 / nodes.len() as f64
    );
    let stops = nodes.into_iter().map(|node| async move {
        let _ = node.handle.shutdown().await;
        node.endpoint.close().await;
    });
    futures::future::join_all(stops).await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        timeout(Duration::from_secs(110), run())
            .await
            .context("the benchmark ran over 110 s")?
    })
}
