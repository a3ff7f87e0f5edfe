//! The cluster view for `kiln status`: where it comes from ([`StatusSource`], [`fetch`]) and how
//! it is drawn as a table ([`render_table`]).
//!
//! Fetching is behind [`StatusSource`] so that another source (joining the gossip as a member
//! with a certificate) plugs in beside the HTTP API without touching the rendering. Rendering is
//! pure: no I/O, no clock, so its output is pinned by golden tests. Nothing here ever prints the
//! operator token or lets text from the network drive the terminal (control characters in names
//! and versions are replaced before they are drawn).

use std::fmt;
use std::time::Duration;

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::{ClusterMember, ClusterView, GpuStatus};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use url::Url;

use crate::text::{self, Align, clean, short_time};

/// The largest cluster view body accepted, so a confused server cannot exhaust memory.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Where the cluster view comes from. Another source (joining the gossip as a member with a
/// certificate) becomes another variant; [`fetch`] is the one entry point.
#[derive(Debug, Clone)]
pub enum StatusSource {
    /// `GET {api}/v1/cluster` on any node's HTTP API with the operator token.
    Api(ApiSource),
    /// Joined the gossip as a member holding a certificate from the cluster CA.
    Member(MemberSource),
}

impl fmt::Display for StatusSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusSource::Api(api) => write!(f, "{}", api.base),
            StatusSource::Member(member) => write!(f, "{}", member.seeds.join(",")),
        }
    }
}

/// A node's HTTP API as a status source. Built once and reused, so `--watch` keeps its
/// connection. Its `Debug` never shows the token.
#[derive(Clone)]
pub struct ApiSource {
    base: Url,
    url: Url,
    auth: HeaderValue,
    timeout: Duration,
    client: reqwest::Client,
}

impl fmt::Debug for ApiSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSource")
            .field("url", &self.url.as_str())
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ApiSource {
    /// `api` is the node's API base URL (e.g. `http://127.0.0.1:7860`), `token` the operator
    /// token, `timeout` the limit for each whole request, connecting included.
    pub fn new(api: &Url, token: &str, timeout: Duration) -> Result<ApiSource, FetchError> {
        let url = cluster_url(api)?;
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| FetchError::BadToken)?;
        auth.set_sensitive(true);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| FetchError::Client(innermost(&e)))?;
        Ok(ApiSource {
            base: api.clone(),
            url,
            auth,
            timeout,
            client,
        })
    }

    /// The cluster view's URL.
    pub fn url(&self) -> &Url {
        &self.url
    }
}

/// One cluster view as fetched: parsed, and the JSON text exactly as the source gave it (what
/// `kiln status --json` prints, so fields this version does not know survive).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub view: ClusterView,
    pub json: String,
}

/// Why no cluster view could be fetched. Each message is one line naming the source.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is not a usable API URL: {1}")]
    BadUrl(String, String),
    #[error("the operator token cannot be sent in an HTTP header (it holds a control character)")]
    BadToken,
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the node refused the operator token (401)")]
    Unauthorized,
    #[error("{url} answered {status}{detail}")]
    Status {
        url: String,
        status: StatusCode,
        detail: String,
    },
    #[error("{url} answered with more than {limit} bytes; that is not a cluster view")]
    TooLarge { url: String, limit: usize },
    #[error("{url} did not answer with a cluster view: {reason}")]
    NotAClusterView { url: String, reason: String },
}

/// The URL of the cluster view under an API base URL (a base with a path keeps it).
pub fn cluster_url(api: &Url) -> Result<Url, FetchError> {
    if !matches!(api.scheme(), "http" | "https") || api.host_str().is_none() {
        return Err(FetchError::BadUrl(
            api.to_string(),
            "give an http:// or https:// URL with a host, e.g. http://127.0.0.1:7860".into(),
        ));
    }
    let mut base = api.clone();
    base.set_query(None);
    base.set_fragment(None);
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    base.join("v1/cluster")
        .map_err(|e| FetchError::BadUrl(api.to_string(), e.to_string()))
}

/// Fetches one cluster view from `source`.
pub async fn fetch(source: &StatusSource) -> Result<Snapshot, FetchError> {
    match source {
        StatusSource::Api(api) => fetch_api(api).await,
        StatusSource::Member(member) => member.fetch().await,
    }
}

/// A member of the cluster's gossip with no GPU (role coordinator), joined for as long as the
/// command runs. It sees what every member sees, without any node's API or operator token.
#[derive(Clone)]
pub struct MemberSource {
    cluster: std::sync::Arc<kiln_daemon::cluster::Cluster>,
    seeds: Vec<String>,
    timeout: Duration,
    settled: std::sync::Arc<tokio::sync::OnceCell<()>>,
}

impl fmt::Debug for MemberSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemberSource")
            .field("name", &self.cluster.name())
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

/// What an observer (`kiln status` joined as a member) publishes: a coordinator with no GPU.
fn observer_status(
    state: kiln_daemon::protocol::cluster::MemberState,
) -> kiln_daemon::protocol::cluster::MemberStatus {
    use kiln_daemon::protocol::cluster::{MemberStatus, Role};
    MemberStatus {
        name: String::new(),
        role: Role::Coordinator,
        state,
        api_url: None,
        version: env!("CARGO_PKG_VERSION").to_string(),
        provider: None,
        instance_id: None,
        price_per_hour: None,
        gpu_note: None,
        gpus: Vec::new(),
        queue: Default::default(),
        running: 0,
    }
}

/// The local address that routes to `seed` (no packet is sent: a connected UDP socket only
/// asks the kernel for a route).
fn local_ip_towards(seed: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let bind: std::net::SocketAddr = if seed.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(seed).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

impl MemberSource {
    /// Joins the cluster with the certificate in `certs_dir` (from `kiln certs issue`),
    /// contacting `seeds` (`quic://host:port`, `tcp://host:port` or `host:port`). Listens on the
    /// local address that routes to the first seed, on a free port, with the seeds' transports.
    pub async fn join(
        certs_dir: &std::path::Path,
        seeds: &[String],
        timeout: Duration,
    ) -> anyhow::Result<MemberSource> {
        use kiln_daemon::cluster::{Cluster, ClusterSettings, parse_seed};
        use kiln_daemon::config::{ClusterSection, TransportKind};
        use kiln_daemon::net::Scheme;
        use kiln_daemon::protocol::cluster::MemberState;

        if seeds.is_empty() {
            anyhow::bail!("--certs needs at least one --seed (any member's gossip address)");
        }
        let mut transports = Vec::new();
        let mut first = None;
        for seed in seeds {
            let (scheme, host_port) = parse_seed(seed)?;
            let kind = match scheme {
                Scheme::Tcp => TransportKind::Tcp,
                _ => TransportKind::Quic,
            };
            if !transports.contains(&kind) {
                transports.push(kind);
            }
            if first.is_none() {
                first = tokio::net::lookup_host(host_port.as_str())
                    .await
                    .map_err(|e| anyhow::anyhow!("seed {seed}: {e}"))?
                    .next();
            }
        }
        let first = first.ok_or_else(|| anyhow::anyhow!("no seed resolves to an address"))?;
        let ip = local_ip_towards(first)
            .ok_or_else(|| anyhow::anyhow!("no local address routes to {first}"))?;
        let section = ClusterSection {
            certs_dir: Some(certs_dir.to_path_buf()),
            listen: std::net::SocketAddr::new(ip, 0),
            transports,
            seeds: seeds.to_vec(),
            ..ClusterSection::default()
        };
        let settings = ClusterSettings::from_config(&section, |name| std::env::var(name).ok())?
            .ok_or_else(|| anyhow::anyhow!("no certificates given"))?;
        let cluster = std::sync::Arc::new(
            Cluster::start(settings, observer_status(MemberState::Ready)).await?,
        );
        cluster.spawn_view_task(true);
        Ok(MemberSource {
            cluster,
            seeds: seeds.to_vec(),
            timeout,
            settled: Default::default(),
        })
    }

    /// The first time: waits until another member is seen and the view has stopped changing
    /// for a moment (bounded by the timeout). Then the current view, without this observer.
    async fn fetch(&self) -> Result<Snapshot, FetchError> {
        let unreachable = |reason: String| FetchError::Unreachable {
            url: self.seeds.join(","),
            reason,
        };
        self.settled
            .get_or_try_init(|| async {
                let deadline = tokio::time::Instant::now() + self.timeout;
                let mut view = self.cluster.watch();
                let mut changes = self.cluster.subscribe();
                let me = self.cluster.name().to_string();
                tokio::time::timeout_at(
                    deadline,
                    view.wait_for(|s| s.live().any(|m| m.status.name != me)),
                )
                .await
                .map_err(|_| {
                    unreachable(format!(
                        "no member answered within {} (is the seed right, and is this \
                             certificate from the cluster's CA?)",
                        humantime::format_duration(self.timeout)
                    ))
                })?
                .map_err(|_| unreachable("the gossip stopped".into()))?;
                // Settled: no change for a few gossip rounds, or the deadline.
                let quiet = Duration::from_millis(1500);
                while let Ok(Ok(_)) = tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + quiet),
                    changes.recv(),
                )
                .await
                {}
                Ok::<(), FetchError>(())
            })
            .await?;
        let mut view = self.cluster.view();
        view.members
            .retain(|member| member.status.name != self.cluster.name());
        let json = serde_json::to_string_pretty(&view)
            .map_err(|e| unreachable(format!("cannot encode the view: {e}")))?;
        Ok(Snapshot { view, json })
    }

    /// Leaves the gossip: says `draining` for a moment first, so the nodes drop this observer
    /// from their view at once instead of listing it until their failure detectors time out.
    pub async fn leave(&self) {
        self.cluster
            .publish(observer_status(
                kiln_daemon::protocol::cluster::MemberState::Draining,
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        self.cluster.shutdown().await;
    }
}

async fn fetch_api(api: &ApiSource) -> Result<Snapshot, FetchError> {
    let url = &api.url;
    let unreachable = |e: reqwest::Error| FetchError::Unreachable {
        url: url.to_string(),
        reason: if e.is_timeout() {
            format!(
                "no answer within {}",
                humantime::format_duration(api.timeout)
            )
        } else {
            innermost(&e)
        },
    };
    let mut response = api
        .client
        .get(url.clone())
        .header(AUTHORIZATION, api.auth.clone())
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED {
        return Err(FetchError::Unauthorized);
    }
    let too_large = || FetchError::TooLarge {
        url: url.to_string(),
        limit: MAX_BODY_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status,
            detail: match error_detail(&body) {
                detail if detail.is_empty() && status == StatusCode::NOT_FOUND => {
                    " (is this a kilnd API? --api names a node, e.g. http://127.0.0.1:7860)".into()
                }
                detail => detail,
            },
        });
    }
    let json = String::from_utf8(body).map_err(|_| FetchError::NotAClusterView {
        url: url.to_string(),
        reason: "the body is not UTF-8".into(),
    })?;
    let view =
        serde_json::from_str::<ClusterView>(&json).map_err(|e| FetchError::NotAClusterView {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Snapshot { view, json })
}

/// The most specific cause of a request error (e.g. `Connection refused (os error 111)`).
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    one_line(&cause.to_string())
}

/// `: <message>` from an API error body (`{"error": {"message": …}}`), or nothing.
fn error_detail(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(one_line))
        .map(|m| format!(": {m}"))
        .unwrap_or_default()
}

fn one_line(text: &str) -> String {
    clean(text.trim()).chars().take(300).collect()
}

/// Short tier letters for the QUEUE column, highest priority first.
fn tier_letter(tier: Tier) -> char {
    match tier {
        Tier::Enterprise => 'e',
        Tier::Pro => 'p',
        Tier::Premium => 'm',
        Tier::Free => 'f',
    }
}

/// A wait in seconds as people read it: `45s`, `3m10s`, `2h5m`, `3d4h`.
pub fn humanise_wait(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

const ABSENT: &str = "-";

fn gib(mib: u64) -> String {
    // One decimal; MiB → GiB.
    format!("{:.1}", mib as f64 / 1024.0)
}

/// Mean utilization over the GPUs that report it.
fn gpu_cell(gpus: &[GpuStatus]) -> String {
    let utils: Vec<u64> = gpus
        .iter()
        .filter_map(|g| g.util_pct.map(u64::from))
        .collect();
    if utils.is_empty() {
        return ABSENT.into();
    }
    let mean = utils.iter().sum::<u64>() as f64 / utils.len() as f64;
    format!("{}%", mean.round() as u64)
}

/// Used/total VRAM summed over the GPUs, in GiB.
fn vram_cell(gpus: &[GpuStatus]) -> String {
    let sum = |f: fn(&GpuStatus) -> Option<u64>| {
        let values: Vec<u64> = gpus.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| values.iter().sum::<u64>())
    };
    let used = sum(|g| g.mem_used_mib);
    let total = sum(|g| g.mem_total_mib);
    match (used, total) {
        (None, None) => ABSENT.into(),
        (used, total) => format!(
            "{}/{}G",
            used.map_or_else(|| ABSENT.to_string(), gib),
            total.map_or_else(|| ABSENT.to_string(), gib)
        ),
    }
}

/// The hottest GPU.
fn temp_cell(gpus: &[GpuStatus]) -> String {
    gpus.iter()
        .filter_map(|g| g.temperature_c)
        .max()
        .map_or_else(|| ABSENT.into(), |t| format!("{t}C"))
}

fn queue_cell(member: &ClusterMember) -> String {
    let queue = &member.status.queue;
    if queue.is_empty() {
        return ABSENT.into();
    }
    Tier::BY_PRIORITY
        .iter()
        .filter_map(|tier| {
            queue
                .get(tier)
                .map(|q| format!("{}{}", tier_letter(*tier), q.queued))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn oldest_cell(member: &ClusterMember) -> String {
    member
        .status
        .queue
        .values()
        .filter_map(|q| q.oldest_wait_s)
        .max()
        .map_or_else(|| ABSENT.into(), humanise_wait)
}

fn price_cell(price: Option<f64>) -> String {
    match price {
        Some(p) if p.is_finite() => format!("{p:.3}"),
        _ => ABSENT.into(),
    }
}

const COLUMNS: [(&str, Align); 12] = [
    ("NODE", Align::Left),
    ("ROLE", Align::Left),
    ("PROVIDER", Align::Left),
    ("STATE", Align::Left),
    ("GPU", Align::Right),
    ("VRAM", Align::Right),
    ("TEMP", Align::Right),
    ("QUEUE", Align::Left),
    ("OLDEST", Align::Right),
    ("RUN", Align::Right),
    ("$/H", Align::Right),
    ("VERSION", Align::Left),
];

fn member_row(member: &ClusterMember) -> Vec<String> {
    let s = &member.status;
    let state = if member.live {
        s.state.as_str().to_string()
    } else {
        "dead".to_string()
    };
    vec![
        clean(&s.name),
        s.role.as_str().to_string(),
        s.provider.as_deref().map_or_else(|| ABSENT.into(), clean),
        state,
        gpu_cell(&s.gpus),
        vram_cell(&s.gpus),
        temp_cell(&s.gpus),
        queue_cell(member),
        oldest_cell(member),
        s.running.to_string(),
        price_cell(s.price_per_hour),
        if s.version.is_empty() {
            ABSENT.into()
        } else {
            clean(&s.version)
        },
    ]
}

/// The cluster view as an aligned table with one row per member (in the order the view gives:
/// live first, then dead ones, shown with state `dead`) and a footer line:
/// `N live, M dead · cluster X · seen by Y at T · $P/h live`.
///
/// GPU is the mean utilization, VRAM the used/total GiB summed, TEMP the hottest card, over a
/// member's GPUs. QUEUE lists waiting jobs per tier, highest first (`e` enterprise, `p` pro,
/// `m` premium, `f` free); OLDEST is the longest wait over all tiers. Absent values are `-`.
pub fn render_table(view: &ClusterView) -> String {
    let rows: Vec<Vec<String>> = view.members.iter().map(member_row).collect();
    let mut out = text::table(&COLUMNS, &rows);
    out.push_str(&footer(view));
    out.push('\n');
    out
}

fn footer(view: &ClusterView) -> String {
    let live = view.members.iter().filter(|m| m.live).count();
    let dead = view.members.len() - live;
    let cost: f64 = view
        .members
        .iter()
        .filter(|m| m.live)
        .filter_map(|m| m.status.price_per_hour)
        .filter(|p| p.is_finite())
        // Folded from +0.0: an empty f64 sum is -0.0, which would print as "$-0.000".
        .fold(0.0, |total, p| total + p);
    format!(
        "{live} live, {dead} dead · cluster {} · seen by {} at {} · ${cost:.3}/h live",
        clean(&view.cluster_id),
        clean(&view.observed_by),
        short_time(&clean(&view.observed_at)),
    )
}

/// How long a released host stays in the merged status table.
pub const RELEASED_SHOWN_MS: i64 = 24 * 3_600_000;

/// Names of the members the view shows live, able to take jobs (`ready` or `busy`) and with a
/// GPU. A host that came back without its GPU (a resumed RunPod pod can) is not ready: it stays
/// provisioning until the policy's resume timeout replaces it.
pub fn ready_members(view: &ClusterView) -> Vec<&str> {
    use kiln_daemon::protocol::cluster::MemberState;
    view.members
        .iter()
        .filter(|m| m.live && matches!(m.status.state, MemberState::Ready | MemberState::Busy))
        .filter(|m| !m.status.gpus.is_empty())
        .map(|m| m.status.name.as_str())
        .collect()
}

fn inventory_row(host: &crate::inventory::InventoryHost) -> Vec<String> {
    let mut row = vec![ABSENT.to_string(); COLUMNS.len()];
    row[0] = clean(&host.record.name);
    row[1] = "node".into();
    row[2] = host.record.provider.to_string();
    row[3] = host.record.state.to_string();
    row[9] = "0".into();
    row[10] = price_cell(Some(host.rate().total()));
    row
}

/// The cluster view merged with the inventory: every member of the view (as
/// [`render_table`] draws it, but with the inventory's state for hosts it holds as warm, failed
/// or released), then each inventory host the view does not show live — warm
/// hosts, hosts still provisioning, and hosts released in the last 24 hours — with the
/// inventory's state and what it costs per hour in that state. The footer adds the
/// inventory's count per state and its cost per hour. Without a view (the cluster could not be
/// reached) only the inventory's hosts are drawn.
pub fn render_fleet_table(
    view: Option<&ClusterView>,
    hosts: &[crate::inventory::InventoryHost],
    now_ms: i64,
) -> String {
    use crate::fleet::HostState;
    let live: std::collections::HashSet<&str> = view
        .map(|v| {
            v.members
                .iter()
                .filter(|m| m.live)
                .map(|m| m.status.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let by_name: std::collections::HashMap<&str, &crate::inventory::InventoryHost> =
        hosts.iter().map(|h| (h.record.name.as_str(), h)).collect();
    let mut rows: Vec<Vec<String>> = view
        .map(|v| {
            v.members
                .iter()
                .map(|m| {
                    let mut row = member_row(m);
                    // A host the coordinator stopped or released may linger in gossip for a
                    // few rounds (draining, then dead): the inventory's word is the newer one.
                    if let Some(host) = by_name.get(m.status.name.as_str())
                        && !host.record.state.bills_gpu()
                    {
                        row[3] = host.record.state.to_string();
                    }
                    row
                })
                .collect()
        })
        .unwrap_or_default();
    for host in hosts {
        if live.contains(host.record.name.as_str()) {
            continue;
        }
        if host.record.state == HostState::Released
            && now_ms - host.record.state_since_ms > RELEASED_SHOWN_MS
        {
            continue;
        }
        rows.push(inventory_row(host));
    }
    let mut out = text::table(&COLUMNS, &rows);
    if let Some(view) = view {
        out.push_str(&footer(view));
        out.push('\n');
    }
    let counts: Vec<String> = HostState::ALL
        .iter()
        .filter(|s| **s != HostState::Released)
        .filter_map(|state| {
            let n = hosts.iter().filter(|h| h.record.state == *state).count();
            (n > 0).then(|| format!("{n} {state}"))
        })
        .collect();
    let cost = hosts
        .iter()
        .map(|h| h.rate().total())
        .fold(0.0, |total, p| total + p);
    out.push_str(&format!(
        "inventory: {} · ${cost:.3}/h rented\n",
        if counts.is_empty() {
            "no hosts".to_string()
        } else {
            counts.join(", ")
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_daemon::protocol::cluster::{MemberState, MemberStatus, Role, TierQueue};

    use super::*;

    fn member(name: &str, state: MemberState, live: bool) -> ClusterMember {
        ClusterMember {
            status: MemberStatus {
                name: name.into(),
                role: Role::Node,
                state,
                api_url: Some(format!("http://{name}:7860")),
                version: "0.1.0".into(),
                provider: None,
                instance_id: None,
                price_per_hour: None,
                gpu_note: None,
                gpus: Vec::new(),
                queue: BTreeMap::new(),
                running: 0,
            },
            generation: 1,
            gossip_addr: format!("quic://{name}:41012"),
            live,
        }
    }

    fn card(util: u32, used: u64, total: u64, temp: u32) -> GpuStatus {
        GpuStatus {
            index: 0,
            name: Some("NVIDIA GeForce RTX 4090".into()),
            util_pct: Some(util),
            mem_used_mib: Some(used),
            mem_total_mib: Some(total),
            temperature_c: Some(temp),
            ..GpuStatus::default()
        }
    }

    fn sample() -> ClusterView {
        let mut busy = member("gpu-1", MemberState::Busy, true);
        busy.status.provider = Some("vast".into());
        busy.status.price_per_hour = Some(0.42);
        busy.status.gpus = vec![card(85, 20_608, 24_564, 64)];
        busy.status.queue = BTreeMap::from([
            (
                Tier::Free,
                TierQueue {
                    queued: 12,
                    oldest_wait_s: Some(190),
                },
            ),
            (
                Tier::Premium,
                TierQueue {
                    queued: 5,
                    oldest_wait_s: Some(45),
                },
            ),
            (
                Tier::Pro,
                TierQueue {
                    queued: 2,
                    oldest_wait_s: Some(8),
                },
            ),
            (
                Tier::Enterprise,
                TierQueue {
                    queued: 0,
                    oldest_wait_s: None,
                },
            ),
        ]);
        busy.status.running = 1;

        let mut warming = member("gpu-2", MemberState::Warming, true);
        warming.status.provider = Some("runpod".into());
        warming.status.price_per_hour = Some(0.69);
        warming.status.gpus = vec![GpuStatus {
            index: 0,
            mem_total_mib: Some(24_564),
            ..GpuStatus::default()
        }];
        warming.status.queue = BTreeMap::from([(
            Tier::Pro,
            TierQueue {
                queued: 1,
                oldest_wait_s: Some(3),
            },
        )]);

        let mut coordinator = member("coord", MemberState::Ready, true);
        coordinator.status.role = Role::Coordinator;
        coordinator.status.gpu_note = Some("no GPU".into());
        coordinator.status.version = "0.1.1-dev".into();

        let mut dead = member("gpu-0", MemberState::Ready, false);
        dead.status.provider = Some("vast".into());
        dead.status.price_per_hour = Some(0.35);
        dead.status.gpus = vec![card(0, 1_024, 24_564, 40)];

        ClusterView {
            cluster_id: "prod".into(),
            observed_by: "gpu-1".into(),
            observed_at: "2026-11-28T07:00:00Z".into(),
            members: vec![coordinator, busy, warming, dead],
        }
    }

    #[test]
    fn table_matches_the_golden_output() {
        let expected = "\
NODE   ROLE         PROVIDER  STATE    GPU        VRAM  TEMP  QUEUE         OLDEST  RUN    $/H  VERSION
coord  coordinator  -         ready      -           -     -  -                  -    0      -  0.1.1-dev
gpu-1  node         vast      busy     85%  20.1/24.0G   64C  e0 p2 m5 f12   3m10s    1  0.420  0.1.0
gpu-2  node         runpod    warming    -     -/24.0G     -  p1                3s    0  0.690  0.1.0
gpu-0  node         vast      dead      0%   1.0/24.0G   40C  -                  -    0  0.350  0.1.0
3 live, 1 dead · cluster prod · seen by gpu-1 at 2026-11-28T07:00:00Z · $1.110/h live
";
        assert_eq!(render_table(&sample()), expected);
    }

    #[test]
    fn empty_cluster_has_a_header_and_a_footer() {
        let view = ClusterView {
            cluster_id: "dev".into(),
            observed_by: "n".into(),
            observed_at: "2026-11-28T07:00:00Z".into(),
            members: Vec::new(),
        };
        assert_eq!(
            render_table(&view),
            "NODE  ROLE  PROVIDER  STATE  GPU  VRAM  TEMP  QUEUE  OLDEST  RUN  $/H  VERSION\n\
             0 live, 0 dead · cluster dev · seen by n at 2026-11-28T07:00:00Z · $0.000/h live\n"
        );
    }

    #[test]
    fn the_fleet_table_adds_hosts_the_gossip_does_not_show() {
        use crate::fleet::HostState;
        use crate::inventory::{Inventory, NewHost, Pricing};
        use crate::provider::ProviderKind;

        let dir = tempfile::tempdir().expect("tempdir");
        let mut inventory = Inventory::open(&dir.path().join("inv.db")).expect("open");
        let hour = 3_600_000;
        let now = 100 * hour;
        for (name, state, at) in [
            ("gpu-1", HostState::Hot, now),
            ("gpu-2", HostState::Warm, now),
            ("gpu-3", HostState::Warm, now - hour),
            ("gpu-4", HostState::Released, now - 48 * hour),
            ("gpu-5", HostState::Released, now - hour),
        ] {
            let host = NewHost {
                name: name.into(),
                provider: ProviderKind::Local,
                spot: false,
                primary: false,
                pricing: Pricing {
                    price_per_hour: 0.4,
                    stopped_price_per_hour: 0.05,
                    disk_gb: 0,
                    storage_per_gb_month: None,
                },
            };
            inventory.add_host(&host, 0, "test").expect("add");
            inventory.set_state(name, state, at, "test").expect("state");
        }
        let view = ClusterView {
            cluster_id: "dev".into(),
            observed_by: "gpu-1".into(),
            observed_at: "2026-11-28T07:00:00Z".into(),
            members: vec![
                member("gpu-1", MemberState::Ready, true),
                member("gpu-2", MemberState::Draining, true),
            ],
        };
        let hosts = inventory.hosts().expect("hosts");
        let table = render_fleet_table(Some(&view), &hosts, now);
        let state_of = |name: &str| {
            table
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(3))
                .map(String::from)
        };
        assert_eq!(state_of("gpu-1").as_deref(), Some("ready"), "{table}");
        // Stopped by the coordinator, still draining in gossip: the inventory's word wins.
        assert_eq!(state_of("gpu-2").as_deref(), Some("warm"), "{table}");
        assert_eq!(state_of("gpu-3").as_deref(), Some("warm"), "{table}");
        assert_eq!(state_of("gpu-4"), None, "{table}");
        assert_eq!(state_of("gpu-5").as_deref(), Some("released"), "{table}");
        assert!(
            table.ends_with("inventory: 1 hot, 2 warm · $0.500/h rented\n"),
            "{table}"
        );

        // Without a view, the inventory alone.
        let alone = render_fleet_table(None, &hosts, now);
        assert!(
            alone
                .lines()
                .any(|l| l.starts_with("gpu-1") && l.contains("hot"))
        );
        // Ready members count only with a GPU: one that came back without it is not ready.
        assert!(ready_members(&view).is_empty());
        let mut with_gpu = view.clone();
        with_gpu.members[0]
            .status
            .gpus
            .push(card(0, 1024, 24_576, 40));
        assert_eq!(ready_members(&with_gpu), vec!["gpu-1"]);
    }

    #[test]
    fn several_gpus_are_summarised() {
        let mut m = member("big", MemberState::Busy, true);
        m.status.gpus = vec![card(90, 2_048, 24_576, 70), card(50, 1_024, 24_576, 60)];
        let row = member_row(&m);
        assert_eq!(row[4], "70%");
        assert_eq!(row[5], "3.0/48.0G");
        assert_eq!(row[6], "70C");
    }

    #[test]
    fn control_characters_from_the_network_are_not_drawn() {
        let mut m = member("evil\u{1b}[2J", MemberState::Ready, true);
        m.status.version = "1\n2".into();
        let row = member_row(&m);
        assert_eq!(row[0], "evil?[2J");
        assert_eq!(row[11], "1?2");
    }

    #[test]
    fn waits_are_humanised() {
        assert_eq!(humanise_wait(0), "0s");
        assert_eq!(humanise_wait(45), "45s");
        assert_eq!(humanise_wait(190), "3m10s");
        assert_eq!(humanise_wait(3_600), "1h0m");
        assert_eq!(humanise_wait(7_500), "2h5m");
        assert_eq!(humanise_wait(3 * 86_400 + 4 * 3_600 + 59), "3d4h");
    }

    #[test]
    fn cluster_url_keeps_a_base_path() -> anyhow::Result<()> {
        let url =
            |s: &str| -> anyhow::Result<String> { Ok(cluster_url(&Url::parse(s)?)?.to_string()) };
        assert_eq!(
            url("http://127.0.0.1:7860")?,
            "http://127.0.0.1:7860/v1/cluster"
        );
        assert_eq!(
            url("https://k.example/kiln?x=1")?,
            "https://k.example/kiln/v1/cluster"
        );
        assert!(cluster_url(&Url::parse("ftp://x")?).is_err());
        Ok(())
    }
}
