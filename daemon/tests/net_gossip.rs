//! chitchat clusters in one process over the Kiln transport ([`GossipTransport`]): QUIC, TLS over
//! TCP, the in-memory network (with partitions) and a mixed QUIC/TCP fleet. Real sockets on
//! 127.0.0.1 port 0, real certificates; every wait is a predicate on chitchat's
//! `live_nodes_watcher()` with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, spawn_chitchat,
};
use kiln_daemon::net::gossip::GossipTransport;
use kiln_daemon::net::{Endpoint, MemNetwork, NetConfig, PeerAddr, Scheme};
use kiln_daemon::pki::{Ca, identity_from_ca};
use tokio::time::timeout;

const GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
const WAIT: Duration = Duration::from_secs(10);

type LiveNodes = BTreeMap<ChitchatId, NodeState>;

/// Which transport a cluster's nodes use.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Quic,
    Tcp,
    Mem,
}

struct Node {
    endpoint: Endpoint,
    handle: ChitchatHandle,
}

impl Node {
    fn name(&self) -> String {
        self.handle.chitchat_id().node_id.to_string()
    }

    fn addr(&self) -> SocketAddr {
        self.endpoint.advertise().addr
    }

    async fn set(&self, key: &str, value: &str) {
        self.handle
            .with_chitchat(|c| c.self_node_state().set(key, value))
            .await;
    }

    /// Waits until this node's live view satisfies `predicate`.
    async fn wait_live(
        &self,
        what: &str,
        predicate: impl Fn(&LiveNodes) -> bool,
    ) -> anyhow::Result<()> {
        let mut watcher = self.handle.with_chitchat(|c| c.live_nodes_watcher()).await;
        timeout(WAIT, watcher.wait_for(|live| predicate(live)))
            .await
            .with_context(|| format!("{}: timed out waiting until {what}", self.name()))?
            .context("the watcher closed")?;
        Ok(())
    }

    /// Waits until exactly `names` are live in this node's view.
    async fn wait_live_names(&self, names: &BTreeSet<String>) -> anyhow::Result<()> {
        self.wait_live(&format!("live = {names:?}"), |live| {
            &live_names(live) == names
        })
        .await
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.handle.shutdown().await?;
        self.endpoint.close().await;
        Ok(())
    }
}

/// Stops nodes concurrently (closing a QUIC endpoint can wait for connections to drain).
async fn stop_all(nodes: Vec<Node>) -> anyhow::Result<()> {
    for result in futures::future::join_all(nodes.into_iter().map(Node::stop)).await {
        result?;
    }
    Ok(())
}

fn live_names(live: &LiveNodes) -> BTreeSet<String> {
    live.keys().map(|id| id.node_id.to_string()).collect()
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn net_config() -> NetConfig {
    NetConfig {
        connect_timeout: Duration::from_millis(500),
        send_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
        ..NetConfig::default()
    }
}

/// Starts chitchat on `endpoint` as `name` (generation `generation`), seeded with `seeds`.
async fn start_chitchat(
    endpoint: Endpoint,
    name: &str,
    generation: u64,
    seeds: &[SocketAddr],
) -> anyhow::Result<Node> {
    let advertise = endpoint.advertise().addr;
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(name, generation, advertise),
        cluster_id: "test".to_string(),
        gossip_interval: GOSSIP_INTERVAL,
        listen_addr: advertise,
        seed_nodes: seeds.iter().map(|s| s.to_string()).collect(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: GOSSIP_INTERVAL,
            dead_node_grace_period: Duration::from_secs(20),
        },
        marked_for_deletion_grace_period: Duration::from_secs(60),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let transport = GossipTransport::new(endpoint.clone());
    let handle = spawn_chitchat(config, Vec::new(), &transport).await?;
    Ok(Node { endpoint, handle })
}

struct Cluster {
    kind: Kind,
    ca: Ca,
    mem: MemNetwork,
}

impl Cluster {
    fn new(kind: Kind) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            kind,
            ca: Ca::generate("test", 2)?,
            mem: MemNetwork::new(),
        })
    }

    fn mem_addr(i: usize) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1 + i as u8], 7946))
    }

    /// Binds node `i`'s endpoint (at `at` when restarting).
    async fn endpoint(&self, i: usize, at: Option<SocketAddr>) -> anyhow::Result<Endpoint> {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let name = format!("node-{i}");
        match self.kind {
            Kind::Quic => {
                let config = NetConfig {
                    quic_listen: Some(at.unwrap_or(loopback)),
                    ..net_config()
                };
                Endpoint::bind(&identity_from_ca(&self.ca, &name)?, config).await
            }
            Kind::Tcp => {
                let config = NetConfig {
                    tcp_listen: Some(at.unwrap_or(loopback)),
                    ..net_config()
                };
                Endpoint::bind(&identity_from_ca(&self.ca, &name)?, config).await
            }
            Kind::Mem => {
                let addr = at.unwrap_or(Cluster::mem_addr(i));
                Endpoint::bind_mem(&self.mem, &name, addr, net_config()).await
            }
        }
    }

    /// Starts `n` nodes, all seeded with node 0.
    async fn start(&self, n: usize) -> anyhow::Result<Vec<Node>> {
        let mut nodes: Vec<Node> = Vec::with_capacity(n);
        for i in 0..n {
            let endpoint = self.endpoint(i, None).await?;
            let seeds: Vec<SocketAddr> = nodes.first().map(Node::addr).into_iter().collect();
            nodes.push(start_chitchat(endpoint, &format!("node-{i}"), 1, &seeds).await?);
        }
        Ok(nodes)
    }
}

async fn wait_all_live(nodes: &[Node], expected: &BTreeSet<String>) -> anyhow::Result<()> {
    for node in nodes {
        node.wait_live_names(expected).await?;
    }
    Ok(())
}

fn all_names(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

/// 5 nodes converge; a key set on one reaches all; a killed node is marked dead by all; a node
/// restarted on the same address with a new generation rejoins.
async fn lifecycle(kind: Kind) -> anyhow::Result<()> {
    let cluster = Cluster::new(kind)?;
    let mut nodes = cluster.start(5).await?;
    wait_all_live(&nodes, &all_names(5)).await?;

    nodes[1].set("gpu.0.util", "55").await;
    for node in &nodes {
        node.wait_live("node-1's key arrives", |live| {
            live.iter().any(|(id, state)| {
                &*id.node_id == "node-1" && state.get("gpu.0.util") == Some("55")
            })
        })
        .await?;
    }

    let victim = nodes.pop().context("five nodes")?;
    let victim_addr = victim.addr();
    victim.stop().await?;
    wait_all_live(&nodes, &all_names(4)).await?;

    let endpoint = cluster.endpoint(4, Some(victim_addr)).await?;
    let seeds = [nodes[0].addr()];
    let reborn = start_chitchat(endpoint, "node-4", 2, &seeds).await?;
    nodes.push(reborn);
    wait_all_live(&nodes, &all_names(5)).await?;
    for node in &nodes {
        node.wait_live("the new generation of node-4 is live", |live| {
            live.keys()
                .any(|id| &*id.node_id == "node-4" && id.generation_id == 2)
        })
        .await?;
    }
    stop_all(nodes).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_cluster_converges_shares_keys_detects_death_and_rejoins() -> anyhow::Result<()> {
    lifecycle(Kind::Quic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_cluster_converges_shares_keys_detects_death_and_rejoins() -> anyhow::Result<()> {
    lifecycle(Kind::Tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_cluster_converges_shares_keys_detects_death_and_rejoins() -> anyhow::Result<()> {
    lifecycle(Kind::Mem).await
}

/// A node holding a certificate from another CA, seeded with a member, never appears in any
/// member's state (live or dead), and sees nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_node_from_another_ca_never_joins() -> anyhow::Result<()> {
    let cluster = Cluster::new(Kind::Quic)?;
    let mut nodes = cluster.start(3).await?;
    wait_all_live(&nodes, &all_names(3)).await?;
    let other_ca = Ca::generate("test", 2)?;
    let rogue_endpoint = Endpoint::bind(
        &identity_from_ca(&other_ca, "rogue")?,
        NetConfig {
            quic_listen: Some("127.0.0.1:0".parse()?),
            ..net_config()
        },
    )
    .await?;
    let rogue = start_chitchat(rogue_endpoint, "rogue", 1, &[nodes[0].addr()]).await?;
    // The rogue tries at every round; wait for several refusals, then look at every view.
    let deadline = tokio::time::Instant::now() + WAIT;
    while nodes[0].endpoint.stats().handshakes_rejected < 5 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the rogue's handshakes were not refused: {:?}",
            nodes[0].endpoint.stats()
        );
        tokio::time::sleep(GOSSIP_INTERVAL).await;
    }
    for node in &nodes {
        let known: Vec<String> = node
            .handle
            .with_chitchat(|c| {
                c.node_states()
                    .keys()
                    .map(|id| id.node_id.to_string())
                    .collect()
            })
            .await;
        assert!(
            !known.iter().any(|n| n == "rogue"),
            "{} knows the rogue: {known:?}",
            node.name()
        );
        assert!(node.endpoint.stats().frames_received > 0);
    }
    let rogue_view: Vec<String> = rogue
        .handle
        .with_chitchat(|c| {
            c.node_states()
                .keys()
                .map(|id| id.node_id.to_string())
                .collect()
        })
        .await;
    assert_eq!(rogue_view, vec!["rogue".to_string()]);
    nodes.push(rogue);
    stop_all(nodes).await?;
    Ok(())
}

/// A partition {0,1} | {2,3,4} makes each side see the other dead; healing reunites them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_partition_splits_and_heals() -> anyhow::Result<()> {
    let cluster = Cluster::new(Kind::Mem)?;
    let nodes = cluster.start(5).await?;
    wait_all_live(&nodes, &all_names(5)).await?;
    let (left, right) = ([0usize, 1], [2usize, 3, 4]);
    for &l in &left {
        for &r in &right {
            cluster.mem.cut(nodes[l].addr(), nodes[r].addr());
        }
    }
    let left_names = names(&["node-0", "node-1"]);
    let right_names = names(&["node-2", "node-3", "node-4"]);
    for &l in &left {
        nodes[l].wait_live_names(&left_names).await?;
    }
    for &r in &right {
        nodes[r].wait_live_names(&right_names).await?;
    }
    cluster.mem.heal_all();
    wait_all_live(&nodes, &all_names(5)).await?;
    stop_all(nodes).await?;
    Ok(())
}

/// Two nodes listening on QUIC and TCP (advertising QUIC) and one TCP-only node (advertising
/// TCP), with routes set from a known address map, converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_quic_and_tcp_fleet_converges() -> anyhow::Result<()> {
    let ca = Ca::generate("test", 2)?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let mut endpoints = Vec::new();
    for i in 0..2 {
        endpoints.push(
            Endpoint::bind(
                &identity_from_ca(&ca, &format!("node-{i}"))?,
                NetConfig {
                    quic_listen: Some(loopback),
                    tcp_listen: Some(loopback),
                    ..net_config()
                },
            )
            .await?,
        );
    }
    endpoints.push(
        Endpoint::bind(
            &identity_from_ca(&ca, "node-2")?,
            NetConfig {
                tcp_listen: Some(loopback),
                ..net_config()
            },
        )
        .await?,
    );
    // The known map: every member's advertised address and its TCP address.
    let map: Vec<(SocketAddr, SocketAddr)> = endpoints
        .iter()
        .map(|e| {
            let tcp = e.local_tcp_addr().context("every node listens on TCP")?;
            Ok((e.advertise().addr, tcp))
        })
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(endpoints[2].advertise().scheme, Scheme::Tcp);
    // The TCP-only node reaches everyone over TCP; the others reach it over TCP.
    for &(advertised, tcp) in &map[..2] {
        endpoints[2].set_route(advertised, PeerAddr::new(Scheme::Tcp, tcp));
    }
    for endpoint in &endpoints[..2] {
        endpoint.set_route(map[2].0, PeerAddr::new(Scheme::Tcp, map[2].1));
    }
    let seed = endpoints[0].advertise().addr;
    let mut nodes = Vec::new();
    for (i, endpoint) in endpoints.into_iter().enumerate() {
        let seeds: Vec<SocketAddr> = if i == 0 { Vec::new() } else { vec![seed] };
        nodes.push(start_chitchat(endpoint, &format!("node-{i}"), 1, &seeds).await?);
    }
    wait_all_live(&nodes, &all_names(3)).await?;
    nodes[2].set("k", "from-tcp").await;
    for node in &nodes {
        node.wait_live("the TCP node's key arrives", |live| {
            live.iter()
                .any(|(id, state)| &*id.node_id == "node-2" && state.get("k") == Some("from-tcp"))
        })
        .await?;
    }
    stop_all(nodes).await?;
    Ok(())
}
