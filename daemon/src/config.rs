//! The node's configuration: one TOML file, every key documented in `kilnd.example.toml`,
//! unknown keys refused, validated before any port is bound.
//!
//! This module only parses and checks; it never opens a socket or a database. Secrets (the
//! operator token) may be given inline or as `*_file`, and a secret file that others can read is
//! refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::tiers::TierTable;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub api: ApiSection,
    pub comfy: ComfySection,
    #[serde(default)]
    pub jobs: JobsSection,
    #[serde(default)]
    pub tiers: TierTable,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub gpu: crate::gpu::GpuConfig,
    /// What the watermark on outputs of `tiers.<tier>.watermark` tiers looks like.
    #[serde(default)]
    pub watermark: crate::watermark::WatermarkConfig,
    /// Job webhooks: the signing secret, private targets, retries.
    #[serde(default)]
    pub webhooks: WebhooksSection,
    /// Where outputs are kept and how retention runs.
    #[serde(default)]
    pub storage: crate::results::StorageConfig,
}

/// `[webhooks]`: how job webhooks are signed and sent. Without a secret webhooks are off and a
/// submission naming one is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksSection {
    /// The signing secret inline (`whsec_<base64>` or raw, at least 16 bytes). Prefer
    /// `secret_file`.
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the signing secret (must not be readable by group or others).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Allow targets on private, loopback, link-local and CGNAT addresses.
    #[serde(default)]
    pub allow_private: bool,
    /// Seconds one delivery may take, connect included.
    #[serde(default = "WebhooksSection::default_timeout_s")]
    pub timeout_s: u64,
    /// Deliveries in flight at once.
    #[serde(default = "WebhooksSection::default_concurrency")]
    pub concurrency: usize,
    /// Attempts before a webhook is given up (the default spans about a day).
    #[serde(default = "WebhooksSection::default_max_attempts")]
    pub max_attempts: u32,
    /// Wait after the first failure, doubled per failure (with jitter) up to `backoff_max_s`.
    #[serde(default = "WebhooksSection::default_backoff_initial_s")]
    pub backoff_initial_s: u64,
    #[serde(default = "WebhooksSection::default_backoff_max_s")]
    pub backoff_max_s: u64,
    /// Hours delivered and abandoned webhooks are kept in the outbox.
    #[serde(default = "WebhooksSection::default_retention_h")]
    pub retention_h: u64,
}

impl Default for WebhooksSection {
    fn default() -> Self {
        WebhooksSection {
            secret: None,
            secret_file: None,
            allow_private: false,
            timeout_s: Self::default_timeout_s(),
            concurrency: Self::default_concurrency(),
            max_attempts: Self::default_max_attempts(),
            backoff_initial_s: Self::default_backoff_initial_s(),
            backoff_max_s: Self::default_backoff_max_s(),
            retention_h: Self::default_retention_h(),
        }
    }
}

impl WebhooksSection {
    fn default_timeout_s() -> u64 {
        10
    }
    fn default_concurrency() -> usize {
        8
    }
    fn default_max_attempts() -> u32 {
        40
    }
    fn default_backoff_initial_s() -> u64 {
        5
    }
    fn default_backoff_max_s() -> u64 {
        3600
    }
    fn default_retention_h() -> u64 {
        168
    }

    /// Whether webhooks are on (a secret is configured).
    pub fn enabled(&self) -> bool {
        self.secret.is_some() || self.secret_file.is_some()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.secret.is_some() && self.secret_file.is_some() {
            return Err(invalid(
                "webhooks.secret",
                "give either secret or secret_file, not both",
            ));
        }
        if let Some(secret) = &self.secret {
            crate::webhooks::Secret::parse(secret).map_err(|m| invalid("webhooks.secret", m))?;
        }
        if !(1..=300).contains(&self.timeout_s) {
            return Err(invalid("webhooks.timeout_s", "must be between 1 and 300"));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(invalid("webhooks.concurrency", "must be between 1 and 256"));
        }
        if !(1..=1000).contains(&self.max_attempts) {
            return Err(invalid(
                "webhooks.max_attempts",
                "must be between 1 and 1000",
            ));
        }
        if self.backoff_initial_s == 0 || self.backoff_initial_s > self.backoff_max_s {
            return Err(invalid(
                "webhooks.backoff_initial_s",
                "must be at least 1 and at most backoff_max_s",
            ));
        }
        if self.backoff_max_s > 86_400 {
            return Err(invalid(
                "webhooks.backoff_max_s",
                "must be at most 86400 (a day)",
            ));
        }
        if self.retention_h == 0 {
            return Err(invalid("webhooks.retention_h", "must be at least 1"));
        }
        Ok(())
    }

    /// The delivery settings, reading the secret file; `None` when webhooks are off.
    pub fn settings(&self) -> Result<Option<crate::webhooks::Settings>, ConfigError> {
        let secret = match (&self.secret, &self.secret_file) {
            (Some(text), _) => {
                crate::webhooks::Secret::parse(text).map_err(|m| invalid("webhooks.secret", m))?
            }
            (None, Some(path)) => {
                let text =
                    read_secret_file(path).map_err(|m| invalid("webhooks.secret_file", m))?;
                crate::webhooks::Secret::parse(&text).map_err(|m| {
                    invalid("webhooks.secret_file", format!("{}: {m}", path.display()))
                })?
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(crate::webhooks::Settings {
            secret,
            allow_private: self.allow_private,
            timeout: Duration::from_secs(self.timeout_s),
            concurrency: self.concurrency,
            max_attempts: self.max_attempts,
            backoff_initial: Duration::from_secs(self.backoff_initial_s),
            backoff_max: Duration::from_secs(self.backoff_max_s),
            retention: Duration::from_secs(self.retention_h.saturating_mul(3600)),
            poll: Duration::from_secs(2),
        }))
    }
}

/// `[node]`: who this node is and where it keeps its data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's name in logs and (later) in the cluster view. Default: the host name.
    #[serde(default)]
    pub name: Option<String>,
    /// Where the job database and the output files live.
    #[serde(default = "NodeSection::default_data_dir")]
    pub data_dir: PathBuf,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            name: None,
            data_dir: Self::default_data_dir(),
        }
    }
}

impl NodeSection {
    fn default_data_dir() -> PathBuf {
        PathBuf::from("/var/lib/kiln")
    }
}

/// `[api]`: the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "ApiSection::default_listen")]
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes (larger → 413 `payload_too_large`).
    #[serde(default = "ApiSection::default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// The keys file (`kiln keys add` writes it); reloaded when it changes.
    #[serde(default = "ApiSection::default_keys_file")]
    pub keys_file: PathBuf,
    /// The operator token for operator routes, inline. Prefer `operator_token_file`.
    #[serde(default)]
    pub operator_token: Option<String>,
    /// A file holding the operator token (must not be readable by group or others).
    #[serde(default)]
    pub operator_token_file: Option<PathBuf>,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: Self::default_listen(),
            max_body_bytes: Self::default_max_body_bytes(),
            keys_file: Self::default_keys_file(),
            operator_token: None,
            operator_token_file: None,
        }
    }
}

impl ApiSection {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 7860))
    }
    fn default_max_body_bytes() -> usize {
        4 * 1024 * 1024
    }
    fn default_keys_file() -> PathBuf {
        PathBuf::from("/etc/kiln/keys.toml")
    }
}

/// `[comfy]`: the ComfyUI this node supervises.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComfySection {
    /// Program and arguments, e.g. `["/opt/comfyui/venv/bin/python", "main.py", "--listen",
    /// "127.0.0.1", "--port", "8188"]`.
    pub command: Vec<String>,
    /// Where ComfyUI answers; must match the `--listen`/`--port` of `command`.
    #[serde(default = "ComfySection::default_url")]
    pub url: url::Url,
    /// Working directory of the ComfyUI process.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment variables for ComfyUI.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Seconds ComfyUI may take from spawn to answering `/system_stats`.
    #[serde(default = "ComfySection::default_start_timeout_s")]
    pub start_timeout_s: u64,
    /// An API-format workflow run once after every start, before the node calls itself ready
    /// (so the model is resident).
    #[serde(default)]
    pub warmup_workflow: Option<PathBuf>,
}

impl ComfySection {
    fn default_url() -> url::Url {
        url::Url::parse("http://127.0.0.1:8188").unwrap_or_else(|_| unreachable!())
    }
    fn default_start_timeout_s() -> u64 {
        120
    }
}

/// `[jobs]`: how jobs run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    /// A job runs at most this many times (a crash or ComfyUI restart mid-run counts).
    #[serde(default = "JobsSection::default_max_attempts")]
    pub max_attempts: u32,
    /// Longest a single run may take before it is interrupted.
    #[serde(default = "JobsSection::default_timeout_s")]
    pub timeout_s: u64,
    /// How long an interrupt may take to land before ComfyUI is killed and restarted.
    #[serde(default = "JobsSection::default_interrupt_grace_s")]
    pub interrupt_grace_s: u64,
    /// The job duration assumed for wait estimates until real durations were measured.
    #[serde(default = "JobsSection::default_assumed_duration_s")]
    pub assumed_duration_s: f64,
    /// On shutdown, how long the running job may go on before it is interrupted and handed
    /// back to the queue.
    #[serde(default = "JobsSection::default_drain_timeout_s")]
    pub drain_timeout_s: u64,
    /// In a cluster, how long a lease on a job run by another member lasts without a renewal
    /// (the runner renews every third of it); then the job is queued again.
    #[serde(default = "JobsSection::default_lease_s")]
    pub lease_s: u64,
}

impl Default for JobsSection {
    fn default() -> Self {
        JobsSection {
            max_attempts: Self::default_max_attempts(),
            timeout_s: Self::default_timeout_s(),
            interrupt_grace_s: Self::default_interrupt_grace_s(),
            assumed_duration_s: Self::default_assumed_duration_s(),
            drain_timeout_s: Self::default_drain_timeout_s(),
            lease_s: Self::default_lease_s(),
        }
    }
}

impl JobsSection {
    fn default_max_attempts() -> u32 {
        3
    }
    fn default_timeout_s() -> u64 {
        600
    }
    fn default_interrupt_grace_s() -> u64 {
        15
    }
    fn default_assumed_duration_s() -> f64 {
        6.0
    }
    fn default_drain_timeout_s() -> u64 {
        60
    }
    fn default_lease_s() -> u64 {
        10
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_s)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_s)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    pub fn interrupt_grace(&self) -> Duration {
        Duration::from_secs(self.interrupt_grace_s)
    }
}

/// Which transports a member listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// QUIC over UDP (the default).
    Quic,
    /// TLS over TCP, for hosts that accept no inbound UDP (RunPod pods).
    Tcp,
}

/// The most `cluster.inline_outputs_kib` may be: a message with inline outputs must still fit
/// a peer frame, which is sized for the largest API body (4 MiB by default).
pub const MAX_INLINE_OUTPUTS_KIB: u64 = 2048;

/// `[cluster]`: membership of a Kiln cluster (gossip over QUIC or TLS over TCP, mutual TLS).
/// Without `certs_dir` the node runs alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// `cert.pem`, `key.pem`, `ca.pem` (and optionally `crl.pem`) from `kiln certs issue`. The
    /// certificate's name is the node's name in the cluster.
    #[serde(default)]
    pub certs_dir: Option<PathBuf>,
    /// The gossip port's listen address (UDP for QUIC, TCP for TLS over TCP: the same number).
    #[serde(default = "ClusterSection::default_listen")]
    pub listen: SocketAddr,
    /// `["quic"]`, `["tcp"]` or both.
    #[serde(default = "ClusterSection::default_transports")]
    pub transports: Vec<TransportKind>,
    /// The address other members dial, `scheme://ip:port`, when it differs from `listen` (NAT,
    /// port mapping). `${VAR}` is replaced from the environment at start, e.g.
    /// `quic://${PUBLIC_IPADDR}:${VAST_UDP_PORT_7946}` on Vast.ai.
    #[serde(default)]
    pub advertise: Option<String>,
    /// With both transports: the TCP address others may dial instead (same `${VAR}` rule).
    #[serde(default)]
    pub advertise_tcp: Option<String>,
    /// Members to contact first: `quic://host:port`, `tcp://host:port` or `host:port` (QUIC).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// The node's API URL as other members and the coordinator reach it. Default: built from
    /// the advertised IP and `api.listen`'s port.
    #[serde(default)]
    pub api_url: Option<String>,
    #[serde(default = "ClusterSection::default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
    /// Failure-detector threshold (phi accrual).
    #[serde(default = "ClusterSection::default_phi_threshold")]
    pub phi_threshold: f64,
    /// How long a dead member's state is kept before it is forgotten.
    #[serde(default = "ClusterSection::default_dead_grace_s")]
    pub dead_grace_s: u64,
    /// How long deleted keys are remembered (tombstones).
    #[serde(default = "ClusterSection::default_deleted_key_grace_s")]
    pub deleted_key_grace_s: u64,
    /// Where this host is rented (`vast`, `runpod`, `lambda`, `local`), shown in the view.
    #[serde(default)]
    pub provider: Option<String>,
    /// The provider's id of this host.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// What this host costs per hour, USD.
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    /// A job's output files up to this many KiB in all ride inside the result (and replica)
    /// message to a member that speaks peer protocol 1.1; larger ones, or any to older
    /// members, go in 1 MiB chunks first. 0 always sends chunks.
    #[serde(default = "ClusterSection::default_inline_outputs_kib")]
    pub inline_outputs_kib: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            certs_dir: None,
            listen: Self::default_listen(),
            transports: Self::default_transports(),
            advertise: None,
            advertise_tcp: None,
            seeds: Vec::new(),
            api_url: None,
            gossip_interval_ms: Self::default_gossip_interval_ms(),
            phi_threshold: Self::default_phi_threshold(),
            dead_grace_s: Self::default_dead_grace_s(),
            deleted_key_grace_s: Self::default_deleted_key_grace_s(),
            provider: None,
            instance_id: None,
            price_per_hour: None,
            inline_outputs_kib: Self::default_inline_outputs_kib(),
        }
    }
}

impl ClusterSection {
    fn default_listen() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 7946))
    }
    fn default_transports() -> Vec<TransportKind> {
        vec![TransportKind::Quic]
    }
    fn default_gossip_interval_ms() -> u64 {
        500
    }
    fn default_phi_threshold() -> f64 {
        8.0
    }
    fn default_dead_grace_s() -> u64 {
        3600
    }
    fn default_deleted_key_grace_s() -> u64 {
        300
    }
    fn default_inline_outputs_kib() -> u64 {
        1024
    }

    /// [`Self::inline_outputs_kib`] in bytes.
    pub fn inline_outputs_bytes(&self) -> usize {
        usize::try_from(self.inline_outputs_kib.saturating_mul(1024)).unwrap_or(usize::MAX)
    }

    pub fn gossip_interval(&self) -> Duration {
        Duration::from_millis(self.gossip_interval_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.transports.is_empty() {
            return Err(invalid(
                "cluster.transports",
                "name at least one of \"quic\" and \"tcp\"",
            ));
        }
        if !(50..=10_000).contains(&self.gossip_interval_ms) {
            return Err(invalid(
                "cluster.gossip_interval_ms",
                "must be between 50 and 10000",
            ));
        }
        if !(self.phi_threshold.is_finite() && self.phi_threshold >= 1.0) {
            return Err(invalid("cluster.phi_threshold", "must be a number ≥ 1"));
        }
        if self.dead_grace_s == 0 {
            return Err(invalid("cluster.dead_grace_s", "must be at least 1"));
        }
        if self.deleted_key_grace_s == 0 {
            return Err(invalid("cluster.deleted_key_grace_s", "must be at least 1"));
        }
        if self.inline_outputs_kib > MAX_INLINE_OUTPUTS_KIB {
            return Err(invalid(
                "cluster.inline_outputs_kib",
                format!(
                    "must be between 0 and {MAX_INLINE_OUTPUTS_KIB} (larger outputs go in chunks)"
                ),
            ));
        }
        if let Some(price) = self.price_per_hour
            && !(price.is_finite() && (0.0..1000.0).contains(&price))
        {
            return Err(invalid(
                "cluster.price_per_hour",
                "must be a number of USD between 0 and 1000",
            ));
        }
        if self.certs_dir.is_some() && self.advertise.is_none() && self.listen.ip().is_unspecified()
        {
            return Err(invalid(
                "cluster.advertise",
                format!(
                    "is required when cluster.listen is {} (other members cannot dial an \
                     unspecified address), e.g. \"quic://203.0.113.7:{}\"",
                    self.listen,
                    self.listen.port()
                ),
            ));
        }
        if self.advertise_tcp.is_some() && !self.transports.contains(&TransportKind::Tcp) {
            return Err(invalid(
                "cluster.advertise_tcp",
                "is only useful with \"tcp\" in cluster.transports",
            ));
        }
        if let Some(url) = &self.api_url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
                _ => {
                    return Err(invalid(
                        "cluster.api_url",
                        "must be an http(s):// URL with a host",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Replaces every `${NAME}` in `text` with the environment variable `NAME`, naming the first
/// one that is not set. Used for addresses only known inside a rented host.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{text:?}: unclosed ${{"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("{text:?}: bad variable name {name:?}"));
        }
        let value = lookup(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{text:?}: environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A configuration problem, naming the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without binding a port or opening the database.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.node.name
            && (name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_whitespace()))
        {
            return Err(invalid(
                "node.name",
                "must be 1 to 63 characters with no whitespace",
            ));
        }
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(invalid("node.data_dir", "must not be empty"));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(invalid("api.max_body_bytes", "must be at least 1024"));
        }
        if self.api.operator_token.is_some() && self.api.operator_token_file.is_some() {
            return Err(invalid(
                "api.operator_token",
                "give either operator_token or operator_token_file, not both",
            ));
        }
        if let Some(token) = &self.api.operator_token
            && token.len() < 16
        {
            return Err(invalid(
                "api.operator_token",
                "must be at least 16 characters",
            ));
        }
        if self.comfy.command.is_empty() || self.comfy.command[0].is_empty() {
            return Err(invalid(
                "comfy.command",
                "must name the program to run, e.g. [\"python\", \"main.py\", …]",
            ));
        }
        if self.comfy.url.scheme() != "http" || self.comfy.url.host_str().is_none() {
            return Err(invalid(
                "comfy.url",
                "must be an http:// URL with a host, e.g. http://127.0.0.1:8188",
            ));
        }
        if self.comfy.start_timeout_s == 0 {
            return Err(invalid("comfy.start_timeout_s", "must be at least 1"));
        }
        if self.jobs.max_attempts == 0 || self.jobs.max_attempts > 100 {
            return Err(invalid("jobs.max_attempts", "must be between 1 and 100"));
        }
        if !(3..=3600).contains(&self.jobs.lease_s) {
            return Err(invalid("jobs.lease_s", "must be between 3 and 3600"));
        }
        if self.jobs.timeout_s == 0 {
            return Err(invalid("jobs.timeout_s", "must be at least 1"));
        }
        if !(self.jobs.assumed_duration_s.is_finite() && self.jobs.assumed_duration_s > 0.0) {
            return Err(invalid(
                "jobs.assumed_duration_s",
                "must be a positive number",
            ));
        }
        self.cluster.validate()?;
        self.gpu.validate().map_err(|message| {
            let key = message.split(':').next().unwrap_or("gpu").to_string();
            ConfigError::Invalid { key, message }
        })?;
        self.webhooks.validate()?;
        self.watermark
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        self.storage
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        self.tiers.validate().map_err(|message| {
            let key = message.split(' ').next().unwrap_or("tiers").to_string();
            ConfigError::Invalid { key, message }
        })?;
        Ok(())
    }

    /// The operator token, read from the inline value or the token file. `None` means operator
    /// routes are closed.
    pub fn operator_token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(token) = &self.api.operator_token {
            return Ok(Some(token.clone()));
        }
        let Some(path) = &self.api.operator_token_file else {
            return Ok(None);
        };
        let token = read_secret_file(path).map_err(|m| invalid("api.operator_token_file", m))?;
        if token.len() < 16 {
            return Err(invalid(
                "api.operator_token_file",
                format!(
                    "{}: the token must be at least 16 characters",
                    path.display()
                ),
            ));
        }
        Ok(Some(token))
    }
}

/// Reads a secret from a file that only its owner can read; returns the trimmed content.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by group or others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[comfy]
command = ["python", "main.py", "--port", "8188"]
"#;

    #[test]
    fn retention_defaults_and_overrides() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(
            config.tiers.retention(crate::protocol::Tier::Free),
            Duration::from_secs(24 * 3600)
        );
        assert_eq!(
            config.tiers.retention(crate::protocol::Tier::Pro),
            Duration::from_secs(30 * 24 * 3600)
        );
        let config = Config::parse(&format!(
            "{MINIMAL}\n[tiers.pro]\nwait_target_s = 30\nretention = \"90days\"\n"
        ))
        .expect("valid");
        assert_eq!(
            config.tiers.retention(crate::protocol::Tier::Pro),
            Duration::from_secs(90 * 24 * 3600)
        );
        match Config::parse(&format!(
            "{MINIMAL}\n[tiers.pro]\nwait_target_s = 30\nretention = \"soon\"\n"
        )) {
            Err(ConfigError::Parse { message, .. }) => {
                assert!(message.contains("invalid duration"), "{message}")
            }
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert_eq!(config.api.listen.port(), 7860);
        assert_eq!(config.jobs.max_attempts, 3);
        assert_eq!(config.tiers.pro.wait_target_s, 30);
        assert_eq!(config.comfy.url.as_str(), "http://127.0.0.1:8188/");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MINIMAL}\n[jobs]\nmax_attempt = 2\n"))
            .expect_err("unknown key refused");
        assert!(err.to_string().contains("max_attempt"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (extra, key) in [
            ("[jobs]\nmax_attempts = 0\n", "jobs.max_attempts"),
            ("[jobs]\nlease_s = 1\n", "jobs.lease_s"),
            ("[api]\nmax_body_bytes = 10\n", "api.max_body_bytes"),
            ("[api]\noperator_token = \"short\"\n", "api.operator_token"),
            (
                "[tiers.free]\nwait_target_s = 300\ndaily_quota = 0\n",
                "tiers.free.daily_quota",
            ),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{extra}")).expect_err(extra);
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
        let err = Config::parse("[comfy]\ncommand = []\n").expect_err("empty command");
        assert!(err.to_string().contains("comfy.command"), "{err}");
        let err = Config::parse("[api]\nlisten = \"nope\"\n").expect_err("bad addr");
        assert!(err.to_string().contains("listen"), "{err}");
    }

    #[test]
    fn cluster_section_is_checked() {
        let ok = Config::parse(&format!(
            "{MINIMAL}\n[cluster]\ncerts_dir = \"/etc/kiln/certs\"\nadvertise = \"quic://203.0.113.7:7946\"\ntransports = [\"quic\", \"tcp\"]\nseeds = [\"tcp://10.0.0.2:7946\"]\n"
        ))
        .expect("valid cluster section");
        assert_eq!(ok.cluster.transports.len(), 2);
        assert_eq!(ok.cluster.inline_outputs_bytes(), 1024 * 1024);
        for (extra, key) in [
            ("[cluster]\ntransports = []\n", "cluster.transports"),
            (
                "[cluster]\ngossip_interval_ms = 5\n",
                "cluster.gossip_interval_ms",
            ),
            (
                "[cluster]\nprice_per_hour = -1.0\n",
                "cluster.price_per_hour",
            ),
            (
                "[cluster]\nadvertise_tcp = \"tcp://1.2.3.4:1\"\n",
                "cluster.advertise_tcp",
            ),
            ("[cluster]\napi_url = \"ftp://x\"\n", "cluster.api_url"),
            (
                "[cluster]\ninline_outputs_kib = 4096\n",
                "cluster.inline_outputs_kib",
            ),
            (
                "[cluster]\ncerts_dir = \"/c\"\nlisten = \"0.0.0.0:7946\"\n",
                "cluster.advertise",
            ),
            ("[cluster]\ntransports = [\"udp\"]\n", "udp"),
            ("[gpu]\npoll_interval_ms = 5\n", "gpu.poll_interval_ms"),
            ("[gpu]\nsource = \"cuda\"\n", "cuda"),
        ] {
            let err = Config::parse(&format!("{MINIMAL}\n{extra}")).expect_err(extra);
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn env_expansion_names_the_missing_variable() {
        let env = |name: &str| match name {
            "PUBLIC_IPADDR" => Some("203.0.113.7\n".to_string()),
            "VAST_UDP_PORT_7946" => Some("41012".to_string()),
            _ => None,
        };
        assert_eq!(
            expand_env("quic://${PUBLIC_IPADDR}:${VAST_UDP_PORT_7946}", env),
            Ok("quic://203.0.113.7:41012".to_string())
        );
        let err = expand_env("quic://${NOPE}:1", env).expect_err("unset");
        assert!(err.contains("NOPE"), "{err}");
        assert!(expand_env("quic://${PUBLIC_IPADDR", env).is_err());
        assert_eq!(expand_env("plain", env), Ok("plain".to_string()));
    }

    #[test]
    fn secret_file_must_be_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            assert!(read_secret_file(&path).is_err());
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        assert_eq!(
            read_secret_file(&path).expect("read"),
            "0123456789abcdef0123"
        );
    }

    #[test]
    fn webhooks_section_is_checked_and_its_secret_read() {
        let config = Config::parse(MINIMAL).expect("valid");
        assert!(!config.webhooks.enabled());
        assert!(config.webhooks.settings().expect("no secret").is_none());
        for (toml, key) in [
            ("[webhooks]\nsecret = \"short\"", "webhooks.secret"),
            (
                "[webhooks]\nsecret = \"0123456789abcdef0\"\nsecret_file = \"/x\"",
                "webhooks.secret",
            ),
            ("[webhooks]\ntimeout_s = 0", "webhooks.timeout_s"),
            ("[webhooks]\nconcurrency = 0", "webhooks.concurrency"),
            ("[webhooks]\nmax_attempts = 0", "webhooks.max_attempts"),
            (
                "[webhooks]\nbackoff_initial_s = 10\nbackoff_max_s = 5",
                "webhooks.backoff_initial_s",
            ),
            ("[webhooks]\nretention_h = 0", "webhooks.retention_h"),
            ("[storage]\nkind = \"s3\"", "storage.bucket"),
            ("[storage]\nsweep_batch = 0", "storage.sweep_batch"),
            (
                "[tiers.free]\nwait_target_s = 300\nretention = \"0s\"",
                "tiers.free.retention",
            ),
        ] {
            match Config::parse(&format!("{MINIMAL}\n{toml}")) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("webhook-secret");
        std::fs::write(&path, "whsec_c2VjcmV0LWZvci1raWxuLXdlYmhvb2stdGVzdHM=\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let text = format!(
            "{MINIMAL}\n[webhooks]\nsecret_file = {:?}\nallow_private = true",
            path.display().to_string()
        );
        let config = Config::parse(&text).expect("valid");
        let settings = config.webhooks.settings().expect("read").expect("on");
        assert!(settings.allow_private);
        assert_eq!(settings.max_attempts, 40);
        std::fs::write(&path, "tiny").expect("write");
        let err = config.webhooks.settings().expect_err("too short");
        assert!(err.to_string().contains("webhooks.secret_file"), "{err}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../kilnd.example.toml");
        Config::parse(text).expect("the shipped example config must be valid");
    }
}
