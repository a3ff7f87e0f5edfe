//! Cluster membership: chitchat gossip over the node's network endpoint, and the cluster view.
//!
//! A [`Cluster`] joins the gossip with the member's certificate (the endpoint refuses anyone
//! without one from the cluster CA), publishes the member's status as gossip keys
//! ([`crate::protocol::gossip`]), and maintains the view: a snapshot of every member it knows
//! (live and dead) plus a stream of changes (added, updated, removed). The API, the job puller
//! and the coordinator read the view; nothing here decides anything about jobs.
//!
//! It also keeps the endpoint's routing table true: a member that advertises a QUIC address but
//! also accepts TLS over TCP (`net.tcp`) is dialled over TCP by members that have no QUIC, so a
//! mixed fleet (RunPod pods accept no inbound UDP) gossips.
//!
//! This module never blocks the gossip loop: chitchat's state lock is held only to copy state
//! out or to set keys.

pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, spawn_chitchat,
};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClusterSection, TransportKind, expand_env};
use crate::net::gossip::GossipTransport;
use crate::net::{Endpoint, NetConfig, PeerAddr, Scheme};
use crate::pki::Identity;
use crate::protocol::cluster::{ClusterMember, ClusterView, MemberState, MemberStatus};
use crate::protocol::gossip::{self, Published, REQUIRED_KEYS};

/// Everything needed to join a cluster, resolved from the config and the environment.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub identity: Identity,
    pub net: NetConfig,
    /// An alternative TCP address to publish (`net.tcp`) when the member also listens on TCP.
    pub advertise_tcp: Option<PeerAddr>,
    /// Seeds as written: `quic://host:port`, `tcp://host:port` or `host:port`.
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub dead_grace: Duration,
    pub deleted_key_grace: Duration,
    /// This incarnation's generation (start time in ms): a restart gets a higher one.
    pub generation: u64,
}

impl ClusterSettings {
    /// Reads `[cluster]`: loads the certificates and expands `${VAR}`s in the advertised
    /// addresses. `None` when the section names no `certs_dir` (the node runs alone).
    pub fn from_config(
        section: &ClusterSection,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<ClusterSettings>> {
        let Some(certs_dir) = &section.certs_dir else {
            return Ok(None);
        };
        let identity = Identity::load_dir(certs_dir).context("cluster.certs_dir")?;
        let parse_addr = |key: &str, text: &Option<String>| -> anyhow::Result<Option<PeerAddr>> {
            let Some(text) = text else { return Ok(None) };
            let expanded =
                expand_env(text, &env).map_err(|e| anyhow::anyhow!("cluster.{key}: {e}"))?;
            let addr: PeerAddr = expanded
                .parse()
                .map_err(|e| anyhow::anyhow!("cluster.{key}: {expanded:?}: {e}"))?;
            Ok(Some(addr))
        };
        let advertise = parse_addr("advertise", &section.advertise)?;
        let advertise_tcp = parse_addr("advertise_tcp", &section.advertise_tcp)?;
        if let Some(addr) = &advertise_tcp
            && addr.scheme != Scheme::Tcp
        {
            anyhow::bail!("cluster.advertise_tcp: {addr} is not a tcp:// address");
        }
        let quic = section.transports.contains(&TransportKind::Quic);
        let tcp = section.transports.contains(&TransportKind::Tcp);
        if let Some(addr) = &advertise {
            let usable = match addr.scheme {
                Scheme::Quic => quic,
                Scheme::Tcp => tcp,
                Scheme::Mem => false,
            };
            if !usable {
                anyhow::bail!(
                    "cluster.advertise: {addr} uses a transport not in cluster.transports"
                );
            }
        }
        let net = NetConfig {
            quic_listen: quic.then_some(section.listen),
            tcp_listen: tcp.then_some(section.listen),
            advertise,
            ..NetConfig::default()
        };
        Ok(Some(ClusterSettings {
            identity,
            net,
            advertise_tcp,
            seeds: section.seeds.clone(),
            gossip_interval: section.gossip_interval(),
            phi_threshold: section.phi_threshold,
            dead_grace: Duration::from_secs(section.dead_grace_s),
            deleted_key_grace: Duration::from_secs(section.deleted_key_grace_s),
            generation: crate::node::unix_ms().max(0) as u64,
        }))
    }
}

/// A change in the view.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewChange {
    Added(ClusterMember),
    Updated(ClusterMember),
    Removed { name: String },
}

/// The view at one moment: every member known, by name (the latest generation of each).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub members: BTreeMap<String, ClusterMember>,
}

impl Snapshot {
    pub fn live(&self) -> impl Iterator<Item = &ClusterMember> {
        self.members.values().filter(|m| m.live)
    }
}

/// Splits `quic://host:port` / `tcp://host:port` / `host:port` into a scheme and `host:port`.
pub fn parse_seed(seed: &str) -> anyhow::Result<(Scheme, String)> {
    let (scheme, rest) = match seed.split_once("://") {
        Some((scheme, rest)) => (scheme.parse::<Scheme>()?, rest),
        None => (Scheme::Quic, seed),
    };
    if scheme == Scheme::Mem {
        anyhow::bail!("seed {seed:?}: mem:// is for in-process tests only");
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok((scheme, rest.to_string()))
        }
        _ => anyhow::bail!("seed {seed:?}: expected scheme://host:port"),
    }
}

/// A running membership.
pub struct Cluster {
    name: String,
    cluster_id: String,
    endpoint: Endpoint,
    handle: tokio::sync::Mutex<Option<ChitchatHandle>>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    view: watch::Sender<Arc<Snapshot>>,
    changes: broadcast::Sender<ViewChange>,
    joined: watch::Sender<bool>,
    schemes: Vec<Scheme>,
    alternates: BTreeMap<String, String>,
    gossip_interval: Duration,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Binds the endpoint, joins the gossip with `status` as the first published state and
    /// starts maintaining the view.
    pub async fn start(settings: ClusterSettings, status: MemberStatus) -> anyhow::Result<Cluster> {
        let endpoint = Endpoint::bind(&settings.identity, settings.net.clone())
            .await
            .context("cannot open the cluster endpoint (cluster.listen)")?;
        Cluster::start_on(endpoint, settings, status).await
    }

    /// Joins the gossip over an endpoint that is already bound (QUIC, TCP or in-memory).
    pub async fn start_on(
        endpoint: Endpoint,
        settings: ClusterSettings,
        mut status: MemberStatus,
    ) -> anyhow::Result<Cluster> {
        let name = settings.identity.name().to_string();
        let cluster_id = settings.identity.cluster_id().to_string();
        status.name = name.clone();
        let advertise = endpoint.advertise();
        let mut schemes = Vec::new();
        if endpoint.local_quic_addr().is_some() {
            schemes.push(Scheme::Quic);
        }
        if endpoint.local_tcp_addr().is_some() {
            schemes.push(Scheme::Tcp);
        }
        if advertise.scheme == Scheme::Mem {
            schemes.push(Scheme::Mem);
        }
        let mut alternates = BTreeMap::new();
        if let Some(tcp) = &settings.advertise_tcp {
            alternates.insert("tcp".to_string(), tcp.to_string());
        } else if advertise.scheme == Scheme::Quic
            && let Some(tcp) = endpoint.local_tcp_addr()
            && !tcp.ip().is_unspecified()
        {
            let alt = PeerAddr {
                scheme: Scheme::Tcp,
                addr: tcp,
            };
            alternates.insert("tcp".to_string(), alt.to_string());
        }

        let mut seeds = Vec::new();
        for seed in &settings.seeds {
            let (scheme, host_port) = parse_seed(seed)?;
            // In-process test clusters dial everything in memory.
            let scheme = if advertise.scheme == Scheme::Mem {
                Scheme::Mem
            } else {
                scheme
            };
            match tokio::net::lookup_host(host_port.as_str()).await {
                Ok(addrs) => {
                    for addr in addrs {
                        endpoint.set_route(addr, PeerAddr { scheme, addr });
                    }
                }
                Err(error) => tracing::warn!(%seed, %error, "cannot resolve a seed yet"),
            }
            seeds.push(host_port);
        }

        let chitchat_id = ChitchatId::new(name.clone(), settings.generation, advertise.addr);
        let initial = gossip::encode(&Published {
            status,
            addr: advertise.to_string(),
            alternates: alternates.clone(),
        });
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: cluster_id.clone(),
            gossip_interval: settings.gossip_interval,
            listen_addr: advertise.addr,
            seed_nodes: seeds,
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: settings.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10).max(settings.gossip_interval * 4),
                initial_interval: settings.gossip_interval,
                dead_node_grace_period: settings.dead_grace,
            },
            marked_for_deletion_grace_period: settings.deleted_key_grace,
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                REQUIRED_KEYS.iter().all(|key| state.contains_key(key))
            })),
        };
        let transport = GossipTransport::new(endpoint.clone());
        let handle = spawn_chitchat(config, initial.into_iter().collect(), &transport)
            .await
            .context("cannot start gossip")?;
        let chitchat = handle.chitchat();
        let (view, _) = watch::channel(Arc::new(Snapshot::default()));
        let (changes, _) = broadcast::channel(256);
        let (joined, _) = watch::channel(false);
        let cluster = Cluster {
            name,
            cluster_id,
            endpoint,
            handle: tokio::sync::Mutex::new(Some(handle)),
            chitchat,
            view,
            changes,
            joined,
            schemes,
            alternates,
            gossip_interval: settings.gossip_interval,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        cluster.refresh(&mut HashMap::new()).await;
        Ok(cluster)
    }

    /// Starts the task that keeps the view up to date. Separate from `start` so that the
    /// caller holds the `Arc` the task needs.
    ///
    /// The member counts as joined once it sees another live member, or, when no seed answers
    /// within a grace of ten gossip rounds (at least 5 s), alone: the first member of a cluster
    /// lists the others as seeds too, and a node whose peers are all gone must still serve.
    pub fn spawn_view_task(self: &Arc<Self>, has_seeds: bool) {
        let cluster = self.clone();
        let stop = self.stop.clone();
        let alone_after =
            tokio::time::Instant::now() + (self.gossip_interval * 10).max(Duration::from_secs(5));
        self.tasks.spawn(async move {
            let mut watcher = cluster.chitchat.lock().await.live_nodes_watcher();
            let mut routes = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = watcher.changed() => if changed.is_err() { break },
                    _ = tick.tick() => {}
                }
                cluster.refresh(&mut routes).await;
                let others = cluster
                    .view
                    .borrow()
                    .live()
                    .any(|m| m.status.name != cluster.name);
                let alone = tokio::time::Instant::now() >= alone_after;
                if !has_seeds || others || alone {
                    if has_seeds && !others && !*cluster.joined.borrow() {
                        tracing::warn!("no other cluster member answered; serving alone for now");
                    }
                    cluster.joined.send_if_modified(|joined| {
                        let changed = !*joined;
                        *joined = true;
                        changed
                    });
                }
            }
        });
    }

    /// Rebuilds the snapshot from chitchat's state, emits the changes and updates routes.
    async fn refresh(&self, routes: &mut HashMap<SocketAddr, PeerAddr>) {
        let (live, states) = {
            let chitchat = self.chitchat.lock().await;
            let live: std::collections::HashSet<ChitchatId> = chitchat
                .live_nodes_watcher()
                .borrow()
                .keys()
                .cloned()
                .collect();
            let states: Vec<(ChitchatId, Vec<(String, String)>)> = chitchat
                .node_states()
                .iter()
                .map(|(id, state)| {
                    let kv = state
                        .key_values()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    (id.clone(), kv)
                })
                .collect();
            (live, states)
        };
        let mut members: BTreeMap<String, ClusterMember> = BTreeMap::new();
        for (id, kv) in states {
            let is_live = live.contains(&id) || (&*id.node_id == self.name.as_str());
            let published = match gossip::decode(
                &id.node_id,
                kv.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            ) {
                Ok(published) => published,
                // Not yet published its required keys, or from a newer, incompatible
                // version: not part of the view.
                Err(_) => continue,
            };
            // A coordinator or operator that is leaving or gone holds no jobs: nothing to show.
            if published.status.role == crate::protocol::cluster::Role::Coordinator
                && (!is_live || published.status.state == MemberState::Draining)
            {
                continue;
            }
            self.route(&id, &published, routes);
            let gossip_addr = if published.addr.is_empty() {
                format!("quic://{}", id.gossip_advertise_addr)
            } else {
                published.addr.clone()
            };
            let member = ClusterMember {
                status: published.status,
                generation: id.generation_id,
                gossip_addr,
                live: is_live,
            };
            let keep = match members.get(&member.status.name) {
                None => true,
                // The newest incarnation wins; a live one over a dead one of the same age.
                Some(existing) => {
                    (member.generation, member.live) > (existing.generation, existing.live)
                }
            };
            if keep {
                members.insert(member.status.name.clone(), member);
            }
        }
        let next = Snapshot { members };
        let previous = self.view.borrow().clone();
        if *previous == next {
            return;
        }
        for (name, member) in &next.members {
            match previous.members.get(name) {
                None => {
                    let _ = self.changes.send(ViewChange::Added(member.clone()));
                }
                Some(old) if old != member => {
                    let _ = self.changes.send(ViewChange::Updated(member.clone()));
                }
                Some(_) => {}
            }
        }
        for name in previous.members.keys() {
            if !next.members.contains_key(name) {
                let _ = self
                    .changes
                    .send(ViewChange::Removed { name: name.clone() });
            }
        }
        self.view.send_replace(Arc::new(next));
    }

    /// Tells the endpoint how to dial a member: its advertised scheme if we speak it, else an
    /// alternate address we do speak.
    fn route(
        &self,
        id: &ChitchatId,
        published: &Published,
        routes: &mut HashMap<SocketAddr, PeerAddr>,
    ) {
        if id.node_id.as_ref() == self.name {
            return;
        }
        let advertised: Option<PeerAddr> = published.addr.parse().ok();
        let mut candidates = advertised.into_iter().chain(
            published
                .alternates
                .values()
                .filter_map(|alt| alt.parse::<PeerAddr>().ok()),
        );
        let Some(dial) = candidates.find(|addr| self.schemes.contains(&addr.scheme)) else {
            return;
        };
        let key = id.gossip_advertise_addr;
        if routes.get(&key) != Some(&dial) {
            routes.insert(key, dial);
            self.endpoint.set_route(key, dial);
        }
    }

    /// Publishes this member's status; unchanged values cost nothing (no new version).
    pub async fn publish(&self, mut status: MemberStatus) {
        status.name = self.name.clone();
        let published = Published {
            status,
            addr: self.endpoint.advertise().to_string(),
            alternates: self.alternates.clone(),
        };
        let kv = gossip::encode(&published);
        let mut chitchat = self.chitchat.lock().await;
        let state = chitchat.self_node_state();
        let stale: Vec<String> = state
            .key_values()
            .filter(|(k, _)| gossip::is_status_key(k) && !kv.contains_key(*k))
            .map(|(k, _)| k.to_string())
            .collect();
        for key in stale {
            state.delete(&key);
        }
        for (key, value) in kv {
            state.set(key, value);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Copies the transport's statistics and the member counts into the node's metrics.
    pub fn record_metrics(&self, metrics: &crate::metrics::GossipMetrics) {
        use crate::metrics::{MemberLabels, raise_to};
        let stats = self.endpoint.stats();
        raise_to(&metrics.handshakes_rejected, stats.handshakes_rejected);
        raise_to(&metrics.frames_sent, stats.frames_sent);
        raise_to(&metrics.frames_received, stats.frames_received);
        raise_to(&metrics.bytes_sent, stats.bytes_sent);
        raise_to(&metrics.bytes_received, stats.bytes_received);
        raise_to(
            &metrics.frames_dropped,
            stats.dropped_queue_full
                + stats.dropped_oversize
                + stats.dropped_inbound_full
                + stats.bad_frames
                + stats.send_failures,
        );
        metrics
            .connections
            .set(i64::try_from(stats.connections_open).unwrap_or(i64::MAX));
        let snapshot = self.snapshot();
        let live = snapshot.live().count();
        let dead = snapshot.members.len() - live;
        for (label, count) in [("true", live), ("false", dead)] {
            metrics
                .members
                .get_or_create(&MemberLabels {
                    live: label.to_string(),
                })
                .set(count as i64);
        }
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.view.borrow().clone()
    }

    /// Follows the snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.view.subscribe()
    }

    /// The changes, as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<ViewChange> {
        self.changes.subscribe()
    }

    /// True once this member has seen another live member, has no seeds to wait for, or has
    /// waited out the grace for seeds to answer.
    pub fn joined(&self) -> watch::Receiver<bool> {
        self.joined.subscribe()
    }

    /// The view as the API shows it.
    pub fn view(&self) -> ClusterView {
        view_of(&self.cluster_id, &self.name, &self.snapshot())
    }

    /// Leaves: stops gossip and closes the endpoint. Other members mark this one dead after
    /// the failure detector's delay.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        if let Some(handle) = self.handle.lock().await.take()
            && let Err(error) = handle.shutdown().await
        {
            tracing::debug!(%error, "gossip stopped with an error");
        }
        self.endpoint.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

/// A snapshot as a [`ClusterView`]: live members first, then dead, each by name.
pub fn view_of(cluster_id: &str, observer: &str, snapshot: &Snapshot) -> ClusterView {
    let mut members: Vec<ClusterMember> = snapshot.members.values().cloned().collect();
    members.sort_by(|a, b| (!a.live, &a.status.name).cmp(&(!b.live, &b.status.name)));
    ClusterView {
        cluster_id: cluster_id.to_string(),
        observed_by: observer.to_string(),
        observed_at: crate::protocol::rfc3339_ms(crate::node::unix_ms()),
        members,
    }
}

/// The view of a node that is not part of a cluster: itself alone.
pub fn standalone_view(status: &MemberStatus, generation: u64) -> ClusterView {
    let mut snapshot = Snapshot::default();
    snapshot.members.insert(
        status.name.clone(),
        ClusterMember {
            status: status.clone(),
            generation,
            gossip_addr: String::new(),
            live: true,
        },
    );
    view_of("standalone", &status.name, &snapshot)
}

/// A shared holder of the member's latest status (behind a short-held mutex), for the API when the node
/// is not clustered.
#[derive(Debug, Default)]
pub struct StatusCell(Mutex<Option<MemberStatus>>);

impl StatusCell {
    pub fn set(&self, status: MemberStatus) {
        if let Ok(mut guard) = self.0.lock() {
            *guard = Some(status);
        }
    }
    pub fn get(&self) -> Option<MemberStatus> {
        self.0.lock().ok().and_then(|guard| guard.clone())
    }
}
