//! The cluster view over real gossip: members on in-memory endpoints (and one QUIC cluster)
//! publish their status; each sees the others, follows their changes through the change
//! stream, sees a stopped member go dead, and forgets a departed coordinator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_daemon::cluster::{Cluster, ClusterSettings, ViewChange};
use kiln_daemon::net::{Endpoint, MemNetwork, NetConfig, PeerAddr, Scheme};
use kiln_daemon::pki::{Ca, Identity, identity_from_ca};
use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::{MemberState, MemberStatus, Role, TierQueue};

fn status(role: Role, state: MemberState) -> MemberStatus {
    MemberStatus {
        name: String::new(),
        role,
        state,
        api_url: Some("http://127.0.0.1:7860".into()),
        version: "test".into(),
        provider: Some("local".into()),
        instance_id: None,
        price_per_hour: Some(0.4),
        gpu_note: None,
        gpus: Vec::new(),
        queue: Default::default(),
        running: 0,
    }
}

fn settings(identity: Identity, seeds: Vec<String>) -> ClusterSettings {
    ClusterSettings {
        identity,
        net: NetConfig::default(),
        advertise_tcp: None,
        seeds,
        gossip_interval: Duration::from_millis(100),
        phi_threshold: 6.0,
        dead_grace: Duration::from_secs(60),
        deleted_key_grace: Duration::from_secs(60),
        generation: kiln_daemon::node::unix_ms() as u64,
    }
}

async fn wait_for(
    cluster: &Cluster,
    what: &str,
    want: impl Fn(&kiln_daemon::cluster::Snapshot) -> bool,
) {
    let mut watch = cluster.watch();
    let result = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if want(&watch.borrow_and_update()) {
                return;
            }
            if watch.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "{what}: timed out; view of {}: {:?}",
        cluster.name(),
        cluster.snapshot().members.keys().collect::<Vec<_>>()
    );
}

fn live_count(snapshot: &kiln_daemon::cluster::Snapshot) -> usize {
    snapshot.live().count()
}

#[tokio::test]
async fn members_see_each_other_follow_changes_and_see_a_stopped_member_dead() {
    let ca = Ca::generate("view", 30).expect("ca");
    let network = MemNetwork::default();
    let addr = |i: u16| SocketAddr::from(([10, 0, 0, 1], 7000 + i));
    let mut members = Vec::new();
    for i in 0..3u16 {
        let identity = identity_from_ca(&ca, &format!("gpu-{i}")).expect("identity");
        let endpoint = Endpoint::bind_mem(&network, identity.name(), addr(i), NetConfig::default())
            .await
            .expect("bind");
        let seeds = if i == 0 {
            Vec::new()
        } else {
            vec![addr(0).to_string()]
        };
        let cluster = Arc::new(
            Cluster::start_on(
                endpoint,
                settings(identity, seeds.clone()),
                status(Role::Node, MemberState::Ready),
            )
            .await
            .expect("start"),
        );
        cluster.spawn_view_task(!seeds.is_empty());
        members.push(cluster);
    }
    for member in &members {
        wait_for(member, "all three live", |s| live_count(s) == 3).await;
        assert!(*member.joined().borrow());
    }
    let view = members[0].view();
    assert_eq!(view.cluster_id, "view");
    assert_eq!(view.observed_by, "gpu-0");
    let names: Vec<_> = view.members.iter().map(|m| m.status.name.clone()).collect();
    assert_eq!(names, ["gpu-0", "gpu-1", "gpu-2"]);
    assert!(
        view.members
            .iter()
            .all(|m| m.gossip_addr.starts_with("mem://"))
    );

    // A status change on gpu-1 arrives at gpu-0 as an update.
    let mut changes = members[0].subscribe();
    let mut busy = status(Role::Node, MemberState::Busy);
    busy.running = 1;
    busy.queue.insert(
        Tier::Pro,
        TierQueue {
            queued: 4,
            oldest_wait_s: Some(12),
        },
    );
    members[1].publish(busy).await;
    wait_for(&members[0], "gpu-1 busy", |s| {
        s.members
            .get("gpu-1")
            .is_some_and(|m| m.status.state == MemberState::Busy && m.status.running == 1)
    })
    .await;
    let mut saw_update = false;
    while let Ok(change) = changes.try_recv() {
        if let ViewChange::Updated(member) = change
            && member.status.name == "gpu-1"
        {
            saw_update = true;
        }
    }
    assert!(saw_update, "the change stream reports the update");
    let pro = members[2]
        .snapshot()
        .members
        .get("gpu-1")
        .map(|m| m.status.queue.clone());
    // gpu-2 sees it too (eventually).
    if pro.is_none_or(|q| q.get(&Tier::Pro).map(|q| q.queued) != Some(4)) {
        wait_for(&members[2], "gpu-2 sees gpu-1's queue", |s| {
            s.members
                .get("gpu-1")
                .and_then(|m| m.status.queue.get(&Tier::Pro))
                .is_some_and(|q| q.queued == 4)
        })
        .await;
    }

    // gpu-2 stops: the others see it dead, not removed.
    members[2].shutdown().await;
    for member in &members[..2] {
        wait_for(member, "gpu-2 dead", |s| {
            s.members.get("gpu-2").is_some_and(|m| !m.live) && live_count(s) == 2
        })
        .await;
    }
    for member in &members[..2] {
        member.shutdown().await;
    }
}

#[tokio::test]
async fn a_partition_heals_and_a_departed_coordinator_is_forgotten() {
    let ca = Ca::generate("view", 30).expect("ca");
    let network = MemNetwork::default();
    let addr = |i: u16| SocketAddr::from(([10, 0, 0, 2], 7000 + i));
    let mut members = Vec::new();
    for i in 0..4u16 {
        let identity = identity_from_ca(&ca, &format!("m-{i}")).expect("identity");
        let endpoint = Endpoint::bind_mem(&network, identity.name(), addr(i), NetConfig::default())
            .await
            .expect("bind");
        let role = if i == 3 {
            Role::Coordinator
        } else {
            Role::Node
        };
        let seeds = vec![addr(0).to_string(), addr(1).to_string()];
        let cluster = Arc::new(
            Cluster::start_on(
                endpoint,
                settings(identity, seeds),
                status(role, MemberState::Ready),
            )
            .await
            .expect("start"),
        );
        cluster.spawn_view_task(true);
        members.push(cluster);
    }
    for member in &members {
        wait_for(member, "all four live", |s| live_count(s) == 4).await;
    }
    // Cut {0, 3} from {1, 2}.
    for a in [0u16, 3] {
        for b in [1u16, 2] {
            network.cut(addr(a), addr(b));
        }
    }
    wait_for(&members[0], "the other side dead", |s| live_count(s) == 2).await;
    wait_for(&members[1], "the other side dead", |s| {
        live_count(s) == 2 && !s.members.contains_key("m-3")
    })
    .await;
    network.heal_all();
    for member in &members {
        wait_for(member, "healed", |s| live_count(s) == 4).await;
    }
    // The coordinator leaves: once dead it is dropped from the view entirely.
    members[3].shutdown().await;
    wait_for(&members[0], "coordinator forgotten", |s| {
        !s.members.contains_key("m-3") && live_count(s) == 3
    })
    .await;
    for member in &members[..3] {
        member.shutdown().await;
    }
}

#[tokio::test]
async fn quic_members_gossip_with_real_tls() {
    let ca = Ca::generate("view", 30).expect("ca");
    let mut members = Vec::new();
    let mut seed: Option<PeerAddr> = None;
    for i in 0..3 {
        let identity = identity_from_ca(&ca, &format!("q-{i}")).expect("identity");
        let mut s = settings(identity, seed.iter().map(|s| s.to_string()).collect());
        s.net.quic_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        let cluster = Arc::new(
            Cluster::start(s, status(Role::Node, MemberState::Ready))
                .await
                .expect("start"),
        );
        let advertised = cluster.endpoint().advertise();
        assert_eq!(advertised.scheme, Scheme::Quic);
        cluster.spawn_view_task(seed.is_some());
        seed.get_or_insert(advertised);
        members.push(cluster);
    }
    for member in &members {
        wait_for(member, "three QUIC members", |s| live_count(s) == 3).await;
    }
    for member in &members {
        member.shutdown().await;
    }
}
