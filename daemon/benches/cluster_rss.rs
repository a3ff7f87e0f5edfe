//! Cost of cluster membership for one real `kilnd` (not a test; run with
//! `cargo bench -p kiln-daemon --bench cluster_rss`):
//!
//! - RSS and CPU of an idle `kilnd --dev` (its simulator child not counted) alone, then with 20
//!   peers gossiping with it over QUIC with mutual TLS (500 ms rounds);
//! - the gossip traffic it sends and receives per second in that steady state.
//!
//! The peers are members of the node's own dev cluster (certificates from `<data>/certs/ca`),
//! run in this process on 127.0.0.1.

mod common;

use common::{TICKS_PER_SECOND, proc_sample};

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_daemon::cluster::{Cluster, ClusterSettings};
use kiln_daemon::net::NetConfig;
use kiln_daemon::pki::{Ca, identity_from_ca};
use kiln_daemon::protocol::cluster::{ClusterView, MemberState, MemberStatus, Role};

const PEERS: usize = 20;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn view(client: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<ClusterView> {
    Ok(client
        .get(format!("{url}/v1/cluster"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

async fn metric(client: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no metric {name}"))
}

/// Idle RSS (max of samples over `window`) and CPU share of a core.
async fn idle_cost(pid: u32, window: Duration) -> anyhow::Result<(f64, f64)> {
    let (rss0, cpu0) = proc_sample(pid)?;
    let start = Instant::now();
    let mut rss = rss0;
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss = rss.max(proc_sample(pid)?.0);
    }
    let (_, cpu1) = proc_sample(pid)?;
    let cpu = (cpu1 - cpu0) as f64 / TICKS_PER_SECOND / start.elapsed().as_secs_f64();
    Ok((rss as f64 / 1024.0, cpu * 100.0))
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args([
            "--dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let _dev = Dev(child);
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status().is_success()
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "kilnd --dev did not get ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let token = std::fs::read_to_string(dir.path().join("operator-token"))?
        .trim()
        .to_string();
    let seed = view(&client, &url, &token)
        .await?
        .members
        .first()
        .map(|m| m.gossip_addr.clone())
        .ok_or_else(|| anyhow::anyhow!("the node does not list itself"))?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let (rss_alone, cpu_alone) = idle_cost(pid, Duration::from_secs(10)).await?;
    println!("kilnd alone:          RSS {rss_alone:.1} MB, CPU {cpu_alone:.2} % of a core");

    let ca = Ca::load(&dir.path().join("certs").join("ca"))?;
    let mut peers = Vec::new();
    for i in 0..PEERS {
        let identity = identity_from_ca(&ca, &format!("peer-{i}"))?;
        let settings = ClusterSettings {
            identity,
            net: NetConfig {
                quic_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..NetConfig::default()
            },
            advertise_tcp: None,
            seeds: vec![seed.clone()],
            gossip_interval: Duration::from_millis(500),
            phi_threshold: 8.0,
            dead_grace: Duration::from_secs(3600),
            deleted_key_grace: Duration::from_secs(300),
            generation: kiln_daemon::node::unix_ms() as u64,
        };
        let status = MemberStatus {
            name: String::new(),
            role: Role::Node,
            state: MemberState::Ready,
            api_url: Some(format!("http://127.0.0.1:{}", 20000 + i)),
            version: "bench".into(),
            provider: Some("local".into()),
            instance_id: None,
            price_per_hour: Some(0.4),
            gpu_note: Some("bench peer".into()),
            gpus: Vec::new(),
            queue: Default::default(),
            running: 0,
        };
        let cluster = Arc::new(Cluster::start(settings, status).await?);
        cluster.spawn_view_task(true);
        peers.push(cluster);
    }
    let joined = Instant::now();
    loop {
        let live = view(&client, &url, &token)
            .await?
            .members
            .iter()
            .filter(|m| m.live)
            .count();
        if live == PEERS + 1 {
            break;
        }
        anyhow::ensure!(
            joined.elapsed() < Duration::from_secs(60),
            "only {live} live members after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{PEERS} peers joined:      the node lists all {} members {:.2} s after the peers started",
        PEERS + 1,
        joined.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let sent0 = metric(&client, &url, "kiln_gossip_bytes_sent_total").await?;
    let received0 = metric(&client, &url, "kiln_gossip_bytes_received_total").await?;
    let window = Duration::from_secs(20);
    let (rss_peers, cpu_peers) = idle_cost(pid, window).await?;
    let sent1 = metric(&client, &url, "kiln_gossip_bytes_sent_total").await?;
    let received1 = metric(&client, &url, "kiln_gossip_bytes_received_total").await?;
    println!(
        "kilnd with {PEERS} peers:   RSS {rss_peers:.1} MB, CPU {cpu_peers:.2} % of a core, \
         gossip payload {:.1} KB/s sent + {:.1} KB/s received (steady state, {} s)",
        (sent1 - sent0) / 1000.0 / window.as_secs_f64(),
        (received1 - received0) / 1000.0 / window.as_secs_f64(),
        window.as_secs()
    );
    for peer in peers {
        peer.shutdown().await;
    }
    Ok(())
}
