//! The coordinator's configuration, `kiln.toml` (`coordinator/kiln.example.toml` documents every
//! key): where the inventory lives, how `kiln status` reaches the cluster, and one section per
//! provider.
//!
//! This module only parses and checks; it never opens a socket or a database. Unknown keys are
//! refused, [`KilnConfig::validate`] names the key that is wrong, and relative paths are taken
//! from the config file's folder. Provider credentials are never part of the parsed config: they
//! are read when a client is built ([`CloudSection::api_key`]), from the provider's environment
//! variable or from an `api_key_file` only its owner can read, into an [`ApiKey`] whose `Debug`
//! never shows it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::provider::{ApiKey, PortSpec, ProviderKind};

/// The whole `kiln.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KilnConfig {
    #[serde(default)]
    pub inventory: InventorySection,
    #[serde(default)]
    pub cluster: ClusterAccess,
    #[serde(default)]
    pub providers: ProvidersSection,
    /// `[policy]`: `kiln run`'s tick and the scaling policy.
    #[serde(default)]
    pub policy: PolicySection,
    /// `[alerts]`: thresholds and where alerts are posted.
    #[serde(default)]
    pub alerts: AlertsSection,
    /// `[metrics]`: where `kiln run` serves Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[stripe]`: usage pushed to Stripe Billing meter events (none: never pushed).
    #[serde(default)]
    pub stripe: Option<crate::billing::StripeSection>,
}

/// `[metrics]`: `listen` is the address `kiln run` serves `GET /metrics` on (none: no server).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// `[policy]`: how often `kiln run` ticks (`tick_s`) and every key of
/// [`crate::policy::PolicyConfig`] (unknown keys refused, as everywhere).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySection {
    pub tick_s: u64,
    pub rules: crate::policy::PolicyConfig,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            tick_s: 30,
            rules: crate::policy::PolicyConfig::default(),
        }
    }
}

/// Takes the whole number `key` out of `table`, if present.
fn take_u64(table: &mut toml::Table, key: &str) -> Result<Option<u64>, String> {
    match table.remove(key) {
        None => Ok(None),
        Some(toml::Value::Integer(n)) => u64::try_from(n)
            .map(Some)
            .map_err(|_| format!("{key}: must not be negative, found {n}")),
        Some(other) => Err(format!(
            "{key}: expected a whole number, found {}",
            other.type_str()
        )),
    }
}

impl<'de> Deserialize<'de> for PolicySection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let tick_s = take_u64(&mut table, "tick_s")
            .map_err(D::Error::custom)?
            .unwrap_or(PolicySection::default().tick_s);
        let rules = toml::Value::Table(table)
            .try_into::<crate::policy::PolicyConfig>()
            .map_err(|e| D::Error::custom(e.to_string().trim_end().to_string()))?;
        Ok(PolicySection { tick_s, rules })
    }
}

impl PolicySection {
    pub fn tick(&self) -> Duration {
        Duration::from_secs(self.tick_s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=3600).contains(&self.tick_s) {
            return Err(invalid("policy.tick_s", "must be between 1 and 3600"));
        }
        self.rules
            .validate()
            .map_err(|e| invalid(&format!("policy.{}", e.key), e.message))
    }
}

/// `[alerts]`: the webhook alerts are posted to (Slack or Discord incoming webhook; none: alerts
/// are only logged and shown by `kiln status --config`), how long a post may take, and every
/// threshold of [`crate::alerts::AlertConfig`] except `daily_budget_usd`, which is the policy's.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsSection {
    pub webhook_url: Option<Url>,
    pub timeout_s: u64,
    pub rules: crate::alerts::AlertConfig,
}

impl Default for AlertsSection {
    fn default() -> Self {
        AlertsSection {
            webhook_url: None,
            timeout_s: 10,
            rules: crate::alerts::AlertConfig::default(),
        }
    }
}

impl<'de> Deserialize<'de> for AlertsSection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        let webhook_url = match table.remove("webhook_url") {
            None => None,
            Some(toml::Value::String(text)) => {
                Some(Url::parse(&text).map_err(|e| D::Error::custom(format!("webhook_url: {e}")))?)
            }
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "webhook_url: expected a URL string, found {}",
                    other.type_str()
                )));
            }
        };
        let timeout_s = take_u64(&mut table, "timeout_s")
            .map_err(D::Error::custom)?
            .unwrap_or(AlertsSection::default().timeout_s);
        if table.contains_key("daily_budget_usd") {
            return Err(D::Error::custom(
                "daily_budget_usd: set it under [policy]; the budget alert uses the policy's",
            ));
        }
        let rules = toml::Value::Table(table)
            .try_into::<crate::alerts::AlertConfig>()
            .map_err(|e| D::Error::custom(e.to_string().trim_end().to_string()))?;
        Ok(AlertsSection {
            webhook_url,
            timeout_s,
            rules,
        })
    }
}

impl AlertsSection {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.webhook_url
            && (!matches!(url.scheme(), "http" | "https") || url.host_str().is_none())
        {
            return Err(invalid(
                "alerts.webhook_url",
                "must be an http:// or https:// URL with a host",
            ));
        }
        if !(1..=120).contains(&self.timeout_s) {
            return Err(invalid("alerts.timeout_s", "must be between 1 and 120"));
        }
        self.rules
            .validate()
            .map_err(|e| invalid(&format!("alerts.{}", e.key), e.message))
    }
}

/// `[inventory]`: the SQLite file holding every host ever rented and the cost ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventorySection {
    #[serde(default = "InventorySection::default_path")]
    pub path: PathBuf,
}

impl Default for InventorySection {
    fn default() -> Self {
        InventorySection {
            path: Self::default_path(),
        }
    }
}

impl InventorySection {
    fn default_path() -> PathBuf {
        PathBuf::from("kiln-inventory.db")
    }
}

/// `[cluster]`: how `kiln status` reads the cluster view, the same two ways its flags offer:
/// a node's API with the operator token, or joining the gossip with a certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterAccess {
    /// Any node's HTTP API (used unless `certs` is given).
    #[serde(default)]
    pub api: Option<Url>,
    /// The operator token's file (owner-only); else `KILN_OPERATOR_TOKEN`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// A certificate folder to join the gossip with (needs `seeds`).
    #[serde(default)]
    pub certs: Option<PathBuf>,
    /// Members' gossip addresses for `certs`.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// How long to wait for the view, seconds.
    #[serde(default = "ClusterAccess::default_timeout_s")]
    pub timeout_s: u64,
}

impl Default for ClusterAccess {
    fn default() -> Self {
        ClusterAccess {
            api: None,
            token_file: None,
            certs: None,
            seeds: Vec::new(),
            timeout_s: Self::default_timeout_s(),
        }
    }
}

impl ClusterAccess {
    fn default_timeout_s() -> u64 {
        10
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(api) = &self.api
            && (!matches!(api.scheme(), "http" | "https") || api.host_str().is_none())
        {
            return Err(invalid(
                "cluster.api",
                "must be an http:// or https:// URL with a host",
            ));
        }
        if self.certs.is_some() && self.seeds.is_empty() {
            return Err(invalid(
                "cluster.seeds",
                "cluster.certs needs at least one seed (a member's gossip address)",
            ));
        }
        if !(1..=600).contains(&self.timeout_s) {
            return Err(invalid("cluster.timeout_s", "must be between 1 and 600"));
        }
        Ok(())
    }
}

/// `[providers.*]`: one optional section per provider; a provider without a section cannot be
/// used.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersSection {
    #[serde(default)]
    pub local: Option<LocalSection>,
    #[serde(default)]
    pub vast: Option<CloudSection>,
    #[serde(default)]
    pub runpod: Option<CloudSection>,
    #[serde(default)]
    pub lambda: Option<CloudSection>,
}

impl ProvidersSection {
    /// The providers that have a section, in [`ProviderKind::ALL`] order.
    pub fn configured(&self) -> Vec<ProviderKind> {
        ProviderKind::ALL
            .into_iter()
            .filter(|kind| match kind {
                ProviderKind::Local => self.local.is_some(),
                other => self.cloud(*other).is_some(),
            })
            .collect()
    }

    /// The section of a cloud provider (`None` for `local`, or when absent).
    pub fn cloud(&self, kind: ProviderKind) -> Option<&CloudSection> {
        match kind {
            ProviderKind::Vast => self.vast.as_ref(),
            ProviderKind::Runpod => self.runpod.as_ref(),
            ProviderKind::Lambda => self.lambda.as_ref(),
            ProviderKind::Local => None,
        }
    }
}

/// An inclusive range of ports, `{ first = 42000, last = 42999 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// `[providers.local]`: `kilnd` processes (with `kilnd comfy-sim` as their ComfyUI) on this
/// machine, each in its own folder under `base_dir`, joining the cluster whose CA is `ca_dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSection {
    /// The `kilnd` binary. Default: `kilnd` beside the running `kiln`.
    #[serde(default)]
    pub kilnd: Option<PathBuf>,
    /// One folder per rented node is made here.
    pub base_dir: PathBuf,
    /// The cluster CA (`kiln certs init`); each node gets a certificate issued from it.
    pub ca_dir: PathBuf,
    /// Gossip addresses the nodes join through (`quic://127.0.0.1:7946`); empty: the first node
    /// starts the cluster alone.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Ports for the nodes' API, gossip and simulator (three per node).
    #[serde(default = "LocalSection::default_ports")]
    pub ports: PortRange,
    /// The nodes' API keys file (`kiln keys add`); must exist.
    pub keys_file: PathBuf,
    /// The nodes' operator token file (owner-only), so `kiln status` can ask them.
    #[serde(default)]
    pub operator_token_file: Option<PathBuf>,
    /// How long a resume waits before the node is started again (a cloud resume's latency).
    #[serde(default)]
    pub resume_delay_ms: u64,
    /// How long a stop waits for kilnd to drain and exit before it is killed.
    #[serde(default = "LocalSection::default_stop_timeout_s")]
    pub stop_timeout_s: u64,
    /// The nodes' gossip interval (their `cluster.gossip_interval_ms`).
    #[serde(default = "LocalSection::default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
    /// Extra arguments for `kilnd comfy-sim` (e.g. `["--step-time-ms", "20"]`).
    #[serde(default)]
    pub sim_args: Vec<String>,
    /// What a running node is accounted at, USD per hour (may be 0).
    #[serde(default)]
    pub price_per_hour: f64,
    /// What a stopped node is accounted at, USD per hour (may be 0).
    #[serde(default)]
    pub stopped_price_per_hour: f64,
}

impl LocalSection {
    fn default_ports() -> PortRange {
        PortRange {
            first: 42_000,
            last: 42_999,
        }
    }
    fn default_stop_timeout_s() -> u64 {
        60
    }
    fn default_gossip_interval_ms() -> u64 {
        500
    }

    /// The `kilnd` binary to run: the configured one, or `kilnd` beside this executable.
    pub fn kilnd_path(&self) -> Result<PathBuf, ConfigError> {
        if let Some(path) = &self.kilnd {
            return Ok(path.clone());
        }
        let exe = std::env::current_exe().map_err(|e| {
            invalid(
                "providers.local.kilnd",
                format!("not given, and this executable's path is unknown: {e}"),
            )
        })?;
        let beside = exe.with_file_name("kilnd");
        if beside.exists() {
            Ok(beside)
        } else {
            Err(invalid(
                "providers.local.kilnd",
                format!("not given, and {} does not exist", beside.display()),
            ))
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("providers.local.{k}");
        if self.base_dir.as_os_str().is_empty() {
            return Err(invalid(&key("base_dir"), "must not be empty"));
        }
        if self.ca_dir.as_os_str().is_empty() {
            return Err(invalid(&key("ca_dir"), "must not be empty"));
        }
        if self.keys_file.as_os_str().is_empty() {
            return Err(invalid(&key("keys_file"), "must not be empty"));
        }
        if self.ports.first == 0 || self.ports.first > self.ports.last {
            return Err(invalid(
                &key("ports"),
                "must be { first, last } with 0 < first <= last",
            ));
        }
        if u32::from(self.ports.last) - u32::from(self.ports.first) < 2 {
            return Err(invalid(
                &key("ports"),
                "must hold at least 3 ports (API, gossip, simulator of one node)",
            ));
        }
        if self.resume_delay_ms > 3_600_000 {
            return Err(invalid(&key("resume_delay_ms"), "must be at most 3600000"));
        }
        if !(1..=3600).contains(&self.stop_timeout_s) {
            return Err(invalid(
                &key("stop_timeout_s"),
                "must be between 1 and 3600",
            ));
        }
        if !(50..=10_000).contains(&self.gossip_interval_ms) {
            return Err(invalid(
                &key("gossip_interval_ms"),
                "must be between 50 and 10000",
            ));
        }
        check_price(&key("price_per_hour"), self.price_per_hour)?;
        check_price(&key("stopped_price_per_hour"), self.stopped_price_per_hour)?;
        for seed in &self.seeds {
            kiln_daemon::cluster::parse_seed(seed)
                .map_err(|e| invalid(&key("seeds"), format!("{seed}: {e}")))?;
        }
        Ok(())
    }
}

/// `[providers.vast]`, `[providers.runpod]`, `[providers.lambda]`: what to rent there and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSection {
    /// The API base URL, to override the provider's (a test server, a proxy).
    #[serde(default)]
    pub base_url: Option<Url>,
    /// RunPod only: the GraphQL URL override.
    #[serde(default)]
    pub graphql_url: Option<Url>,
    /// A file holding the API key, readable only by its owner. Without it the key is read from
    /// `VAST_API_KEY` / `RUNPOD_API_KEY` / `LAMBDA_API_KEY`.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The provider's GPU name or type id (Lambda: the instance type, e.g. `gpu_1x_a10`).
    pub gpu: String,
    #[serde(default = "CloudSection::default_num_gpus")]
    pub num_gpus: u32,
    #[serde(default = "CloudSection::default_disk_gb")]
    pub disk_gb: u32,
    /// The highest price accepted, USD per hour for the whole host.
    pub max_price_per_hour: f64,
    /// The lowest host reliability accepted, 0..=1 (Vast only).
    #[serde(default)]
    pub min_reliability: f64,
    /// Container image (Vast, RunPod); on Lambda the image family to boot (`lambda-stack-22-04`,
    /// or one of the operator's own that provides `entry`).
    #[serde(default)]
    pub image: Option<String>,
    /// Provider template (RunPod template id, Vast template hash).
    #[serde(default)]
    pub template: Option<String>,
    /// Rent interruptible capacity unless `kiln rent` says otherwise.
    #[serde(default)]
    pub spot: bool,
    /// Ports reachable from outside, `[{ port = 7860, protocol = "tcp" }, …]`.
    #[serde(default = "CloudSection::default_ports")]
    pub ports: Vec<PortSpec>,
    /// Lambda only: the SSH key (by its name at Lambda) every launch needs.
    #[serde(default)]
    pub ssh_key_name: Option<String>,
    /// Lambda only: regions to launch in, in order of preference (empty: any with capacity).
    #[serde(default)]
    pub regions: Vec<String>,
    /// How a rented host becomes a cluster member. With `ca_dir`, every rent issues the host a
    /// certificate from this CA (kept under `members_dir`) and hands it over as `KILN_BUNDLE`
    /// in the host's environment, for the image's entry point (`entry`).
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// Where issued member certificates are kept, one folder per host (default `members`
    /// beside this file).
    #[serde(default = "CloudSection::default_members_dir")]
    pub members_dir: PathBuf,
    /// A keys file to put in the bundle (the cluster's accounts).
    #[serde(default)]
    pub keys_file: Option<PathBuf>,
    /// Members the new host joins through (`KILN_SEEDS`), e.g. `quic://203.0.113.7:7946`.
    #[serde(default)]
    pub seeds: Vec<String>,
    /// An owner-only file with the operator token the host's API takes (`KILN_OPERATOR_TOKEN`).
    #[serde(default)]
    pub operator_token_file: Option<PathBuf>,
    /// The entry point the host's onstart script runs (Vast.ai runs the onstart, not the image's
    /// entry point).
    #[serde(default = "CloudSection::default_entry")]
    pub entry: String,
    /// Lambda only: where the node release archive (`provisioning/package.sh`) is published. A
    /// Lambda VM is a bare Ubuntu image; with this set its `user_data` downloads the archive,
    /// checks it against `bootstrap_sha256` and runs the `bootstrap.sh` inside. `https://`, or
    /// `http://` to a loopback address (tests).
    #[serde(default)]
    pub bootstrap_url: Option<Url>,
    /// Lambda only: the archive's sha256 (64 hex digits, as package.sh prints it); required
    /// with `bootstrap_url`. A VM refuses an archive that does not match.
    #[serde(default)]
    pub bootstrap_sha256: Option<String>,
    /// Lambda only: firewall ruleset ids applied at launch. Lambda's default firewall opens only
    /// SSH and ICMP; a member needs UDP 7946 (gossip) and TCP 7860 (API) open.
    #[serde(default)]
    pub firewall_rulesets: Vec<String>,
}

impl CloudSection {
    fn default_members_dir() -> PathBuf {
        PathBuf::from("members")
    }
    fn default_entry() -> String {
        crate::cli::certs::DEFAULT_ENTRY.to_string()
    }
    fn default_num_gpus() -> u32 {
        1
    }
    fn default_disk_gb() -> u32 {
        80
    }
    fn default_ports() -> Vec<PortSpec> {
        use crate::provider::Protocol;
        vec![
            PortSpec {
                port: 7860,
                protocol: Protocol::Tcp,
            },
            PortSpec {
                port: 7946,
                protocol: Protocol::Udp,
            },
        ]
    }

    /// The provider's default API base URL.
    pub fn default_base_url(kind: ProviderKind) -> &'static str {
        match kind {
            ProviderKind::Vast => crate::provider::vast::DEFAULT_BASE,
            ProviderKind::Runpod => crate::provider::runpod::DEFAULT_REST_BASE,
            ProviderKind::Lambda => crate::provider::lambda::DEFAULT_BASE,
            ProviderKind::Local => "",
        }
    }

    /// The API base URL: the configured override or the provider's own.
    pub fn base_url(&self, kind: ProviderKind) -> Result<Url, ConfigError> {
        match &self.base_url {
            Some(url) => Ok(url.clone()),
            None => Url::parse(Self::default_base_url(kind))
                .map_err(|e| invalid(&format!("providers.{kind}.base_url"), e.to_string())),
        }
    }

    /// RunPod's GraphQL URL: the configured override or RunPod's own.
    pub fn graphql_url(&self) -> Result<Url, ConfigError> {
        match &self.graphql_url {
            Some(url) => Ok(url.clone()),
            None => Url::parse(crate::provider::runpod::DEFAULT_GRAPHQL)
                .map_err(|e| invalid("providers.runpod.graphql_url", e.to_string())),
        }
    }

    /// The API key: from `api_key_file` (refused when group or others can read it), else from
    /// the provider's environment variable, looked up with `env`.
    pub fn api_key(
        &self,
        kind: ProviderKind,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ApiKey, ConfigError> {
        let var = api_key_env(kind);
        let key = match &self.api_key_file {
            Some(path) => kiln_daemon::config::read_secret_file(path)
                .map_err(|m| invalid(&format!("providers.{kind}.api_key_file"), m))?,
            None => env(var).map(|v| v.trim().to_string()).ok_or_else(|| {
                invalid(
                    &format!("providers.{kind}.api_key_file"),
                    format!("not given and {var} is not set: the {kind} API key is needed"),
                )
            })?,
        };
        ApiKey::new(kind, key)
            .map_err(|error| invalid(&format!("providers.{kind}.api_key_file"), error.to_string()))
    }

    fn validate(&self, kind: ProviderKind) -> Result<(), ConfigError> {
        let key = |k: &str| format!("providers.{kind}.{k}");
        if let Some(url) = &self.base_url
            && (!matches!(url.scheme(), "http" | "https") || url.host_str().is_none())
        {
            return Err(invalid(
                &key("base_url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        if self.graphql_url.is_some() && kind != ProviderKind::Runpod {
            return Err(invalid(
                &key("graphql_url"),
                "only RunPod has a GraphQL URL",
            ));
        }
        if self.gpu.trim().is_empty() {
            return Err(invalid(&key("gpu"), "must name the GPU or instance type"));
        }
        if !(1..=16).contains(&self.num_gpus) {
            return Err(invalid(&key("num_gpus"), "must be between 1 and 16"));
        }
        if !(1..=100_000).contains(&self.disk_gb) {
            return Err(invalid(&key("disk_gb"), "must be between 1 and 100000"));
        }
        check_price(&key("max_price_per_hour"), self.max_price_per_hour)?;
        if self.max_price_per_hour == 0.0 {
            return Err(invalid(&key("max_price_per_hour"), "must be above 0"));
        }
        if !(0.0..=1.0).contains(&self.min_reliability) {
            return Err(invalid(&key("min_reliability"), "must be between 0 and 1"));
        }
        if kind == ProviderKind::Lambda && self.spot {
            return Err(invalid(&key("spot"), "Lambda Cloud has no spot capacity"));
        }
        if kind == ProviderKind::Lambda {
            if self
                .ssh_key_name
                .as_deref()
                .is_none_or(|n| n.trim().is_empty())
            {
                return Err(invalid(
                    &key("ssh_key_name"),
                    "Lambda Cloud launches need the name of an SSH key registered there",
                ));
            }
            self.validate_bootstrap(&key)?;
        } else {
            let lambda_only = [
                ("ssh_key_name", self.ssh_key_name.is_some()),
                ("regions", !self.regions.is_empty()),
                ("bootstrap_url", self.bootstrap_url.is_some()),
                ("bootstrap_sha256", self.bootstrap_sha256.is_some()),
                ("firewall_rulesets", !self.firewall_rulesets.is_empty()),
            ];
            if let Some((which, _)) = lambda_only.iter().find(|(_, set)| *set) {
                return Err(invalid(&key(which), "only Lambda Cloud takes this key"));
            }
        }
        if self.ports.iter().any(|p| p.port == 0) {
            return Err(invalid(&key("ports"), "port 0 cannot be exposed"));
        }
        if self.entry.is_empty() || self.entry.contains(['\'', '\n', ' ']) {
            return Err(invalid(
                &key("entry"),
                "must be a path without spaces, quotes or newlines",
            ));
        }
        if let Some(seed) = self
            .seeds
            .iter()
            .find(|s| s.is_empty() || s.contains([',', ' ']))
        {
            return Err(invalid(
                &key("seeds"),
                format!("{seed:?} is not an address such as quic://203.0.113.7:7946"),
            ));
        }
        let needs_ca = if self.keys_file.is_some() {
            Some("keys_file")
        } else if !self.seeds.is_empty() {
            Some("seeds")
        } else if self.operator_token_file.is_some() {
            Some("operator_token_file")
        } else if self.bootstrap_url.is_some() {
            Some("bootstrap_url")
        } else {
            None
        };
        if let Some(which) = needs_ca
            && self.ca_dir.is_none()
        {
            return Err(invalid(
                &key(which),
                "hands a host to the cluster only with ca_dir (the cluster CA) set",
            ));
        }
        Ok(())
    }
}

impl CloudSection {
    /// `bootstrap_url` is https (or http to a loopback address) and comes with a well-formed
    /// `bootstrap_sha256`; the sha256 never comes alone. Firewall ruleset ids are non-empty.
    fn validate_bootstrap(&self, key: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        match (&self.bootstrap_url, &self.bootstrap_sha256) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(invalid(
                    &key("bootstrap_sha256"),
                    "is the checksum of bootstrap_url's archive; set bootstrap_url too",
                ));
            }
            (Some(_), None) => {
                return Err(invalid(
                    &key("bootstrap_sha256"),
                    "is required with bootstrap_url (the sha256 provisioning/package.sh prints)",
                ));
            }
            (Some(url), Some(sha)) => {
                let loopback = match url.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(name)) => name == "localhost",
                    None => false,
                };
                let scheme_ok = url.scheme() == "https" || (url.scheme() == "http" && loopback);
                if !scheme_ok || url.host_str().is_none() {
                    return Err(invalid(
                        &key("bootstrap_url"),
                        format!(
                            "{url} must be an https:// URL of the node archive \
                             (http:// only to a loopback address)"
                        ),
                    ));
                }
                if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(invalid(
                        &key("bootstrap_sha256"),
                        format!("{sha:?} is not a sha256 (64 hex digits)"),
                    ));
                }
            }
        }
        if let Some(id) = self
            .firewall_rulesets
            .iter()
            .find(|id| id.trim().is_empty())
        {
            return Err(invalid(
                &key("firewall_rulesets"),
                format!("{id:?} is not a firewall ruleset id"),
            ));
        }
        Ok(())
    }

    /// The archive's sha256 in lower case, as `sha256sum` prints it.
    pub fn bootstrap_sha256_lower(&self) -> Option<String> {
        self.bootstrap_sha256
            .as_ref()
            .map(|s| s.to_ascii_lowercase())
    }
}

/// The environment variable a provider's API key is read from.
pub fn api_key_env(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Vast => "VAST_API_KEY",
        ProviderKind::Runpod => "RUNPOD_API_KEY",
        ProviderKind::Lambda => "LAMBDA_API_KEY",
        ProviderKind::Local => "",
    }
}

fn check_price(key: &str, price: f64) -> Result<(), ConfigError> {
    if !(price.is_finite() && (0.0..=1_000.0).contains(&price)) {
        return Err(invalid(
            key,
            "must be a number of USD per hour between 0 and 1000",
        ));
    }
    Ok(())
}

/// A configuration problem, naming the key or the file: the same error the node's config uses.
pub use kiln_daemon::config::ConfigError;

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl KilnConfig {
    /// Reads, parses and validates `kiln.toml`; relative paths in it are taken from the file's
    /// folder.
    pub fn load(path: &Path) -> Result<KilnConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: KilnConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.resolve_paths(&base);
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates config text (paths are left as written).
    pub fn parse(text: &str) -> Result<KilnConfig, ConfigError> {
        let config: KilnConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Makes every relative path absolute under `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.inventory.path);
        if let Some(p) = &mut self.cluster.token_file {
            fix(p);
        }
        if let Some(p) = &mut self.cluster.certs {
            fix(p);
        }
        if let Some(local) = &mut self.providers.local {
            if let Some(p) = &mut local.kilnd {
                fix(p);
            }
            fix(&mut local.base_dir);
            fix(&mut local.ca_dir);
            fix(&mut local.keys_file);
            if let Some(p) = &mut local.operator_token_file {
                fix(p);
            }
        }
        for cloud in [
            &mut self.providers.vast,
            &mut self.providers.runpod,
            &mut self.providers.lambda,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(p) = &mut cloud.api_key_file {
                fix(p);
            }
            for p in [
                &mut cloud.ca_dir,
                &mut cloud.keys_file,
                &mut cloud.operator_token_file,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
            fix(&mut cloud.members_dir);
        }
        if let Some(stripe) = &mut self.stripe {
            stripe.resolve_paths(base);
        }
    }

    /// Checks everything that can be checked without touching the network or the inventory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.inventory.path.as_os_str().is_empty() {
            return Err(invalid("inventory.path", "must not be empty"));
        }
        self.cluster.validate()?;
        self.policy.validate()?;
        self.alerts.validate()?;
        if let Some(stripe) = &self.stripe {
            stripe.validate()?;
            if stripe.push_interval.is_some() && self.cluster.api.is_none() {
                return Err(invalid(
                    "stripe.push_interval",
                    "kiln run reads usage from a node's API: set [cluster] api",
                ));
            }
        }
        if let Some(local) = &self.providers.local {
            local.validate()?;
        }
        for kind in [
            ProviderKind::Vast,
            ProviderKind::Runpod,
            ProviderKind::Lambda,
        ] {
            if let Some(section) = self.providers.cloud(kind) {
                section.validate(kind)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = r#"
[providers.local]
base_dir = "nodes"
ca_dir = "ca"
keys_file = "keys.toml"
"#;

    const LAMBDA: &str = r#"
[providers.lambda]
gpu = "gpu_1x_a10"
max_price_per_hour = 1.0
ssh_key_name = "kiln"
ca_dir = "ca"
"#;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789ABCDEF";

    #[test]
    fn a_lambda_bootstrap_archive_is_https_or_loopback_with_its_sha256() {
        for url in [
            "https://releases.example.com/kiln-node-0.1.0-x86_64-linux.tar.gz",
            "http://127.0.0.1:8080/kiln-node.tar.gz",
            "http://localhost/kiln-node.tar.gz",
        ] {
            let text = format!(
                "{LAMBDA}bootstrap_url = \"{url}\"\nbootstrap_sha256 = \"{SHA}\"\n\
                 firewall_rulesets = [\"fw-kiln\"]\n"
            );
            let config = KilnConfig::parse(&text).expect(url);
            let section = config.providers.lambda.expect("lambda");
            assert_eq!(section.bootstrap_url.as_ref().expect("url").as_str(), url);
            assert_eq!(
                section.bootstrap_sha256_lower().expect("sha"),
                SHA.to_ascii_lowercase()
            );
        }
        // Without ca_dir there is no cluster to hand the VM to.
        let text = format!(
            "[providers.lambda]\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1\nssh_key_name = \"k\"\n\
             bootstrap_url = \"https://x/a.tar.gz\"\nbootstrap_sha256 = \"{SHA}\"\n"
        );
        let err = KilnConfig::parse(&text).expect_err("no ca_dir");
        assert!(
            err.to_string().contains("providers.lambda.bootstrap_url"),
            "{err}"
        );
    }

    const VAST: &str = r#"
[providers.vast]
gpu = "RTX 4090"
max_price_per_hour = 0.5
"#;

    #[test]
    fn the_example_file_is_valid() {
        let config =
            KilnConfig::parse(include_str!("../kiln.example.toml")).expect("the example parses");
        assert!(config.providers.local.is_some());
        assert_eq!(config.cluster.timeout_s, 10);
    }

    #[test]
    fn policy_and_alerts_sections_take_their_keys_and_refuse_unknown_ones() {
        let config = KilnConfig::parse(
            r#"
[policy]
tick_s = 5
quiet_for_s = 120
[policy.rent]
providers = ["local"]
[alerts]
webhook_url = "https://hooks.example.com/T/1"
queue_warn = 4
queue_critical = 8
"#,
        )
        .expect("valid");
        assert_eq!(config.policy.tick_s, 5);
        assert_eq!(config.policy.rules.quiet_for_s, 120);
        assert_eq!(
            config.policy.rules.rent.providers,
            vec![ProviderKind::Local]
        );
        assert_eq!(config.alerts.rules.queue_warn, 4);
        assert_eq!(
            config.alerts.webhook_url.as_ref().map(Url::as_str),
            Some("https://hooks.example.com/T/1")
        );
        let defaults = KilnConfig::parse("").expect("valid");
        assert_eq!(defaults.policy.tick_s, 30);
        assert!(defaults.alerts.webhook_url.is_none());

        for (text, names) in [
            ("[policy]\ntick_rate = 5\n", "tick_rate"),
            ("[policy]\ntick_s = 0\n", "policy.tick_s"),
            ("[policy]\ntick_s = \"5s\"\n", "tick_s"),
            ("[policy]\nquiet_for_s = 0\n", "policy.quiet_for_s"),
            (
                "[alerts]\nwebhook_url = \"ftp://x/\"\n",
                "alerts.webhook_url",
            ),
            ("[alerts]\nwebhook_url = \"not a url\"\n", "webhook_url"),
            ("[alerts]\ndaily_budget_usd = 9.0\n", "daily_budget_usd"),
            (
                "[alerts]\nqueue_warn = 9\nqueue_critical = 2\n",
                "alerts.queue_critical",
            ),
        ] {
            let error = KilnConfig::parse(text).expect_err(text).to_string();
            assert!(error.contains(names), "{text:?}: {error}");
        }
    }

    #[test]
    fn an_empty_file_gets_defaults() {
        let config = KilnConfig::parse("").expect("valid");
        assert_eq!(config.inventory.path, PathBuf::from("kiln-inventory.db"));
        assert!(config.providers.configured().is_empty());
        assert_eq!(config.cluster.timeout_s, 10);
    }

    #[test]
    fn configured_providers_are_listed() {
        let config = KilnConfig::parse(&format!("{LOCAL}\n{VAST}")).expect("valid");
        assert_eq!(
            config.providers.configured(),
            vec![ProviderKind::Vast, ProviderKind::Local]
        );
        let vast = config.providers.vast.as_ref().expect("vast");
        assert_eq!(vast.num_gpus, 1);
        assert_eq!(vast.ports.len(), 2);
        assert_eq!(
            vast.base_url(ProviderKind::Vast).expect("url").as_str(),
            "https://console.vast.ai/"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, key) in [
            ("[inventory]\npaht = \"x\"\n", "paht"),
            (
                "[providers.local]\nbase_dir = \"n\"\nca_dir = \"c\"\nkeys_file = \"k\"\nprice = 1\n",
                "price",
            ),
            ("[providers.azure]\n", "azure"),
            (
                "[providers.vast]\ngpu = \"x\"\nmax_price_per_hour = 1\napi_key = \"secret\"\n",
                "api_key",
            ),
        ] {
            let err = KilnConfig::parse(text).expect_err(text);
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[inventory]\npath = \"\"\n", "inventory.path"),
            (
                "[providers.vast]\ngpu = \"x\"\nmax_price_per_hour = 1\nkeys_file = \"k\"\n",
                "providers.vast.keys_file",
            ),
            (
                "[providers.vast]\ngpu = \"x\"\nmax_price_per_hour = 1\nca_dir = \"c\"\nseeds = [\"a,b\"]\n",
                "providers.vast.seeds",
            ),
            (
                "[providers.vast]\ngpu = \"x\"\nmax_price_per_hour = 1\nentry = \"a b\"\n",
                "providers.vast.entry",
            ),
            ("[cluster]\napi = \"ftp://x\"\n", "cluster.api"),
            ("[cluster]\ncerts = \"c\"\n", "cluster.seeds"),
            ("[cluster]\ntimeout_s = 0\n", "cluster.timeout_s"),
            (
                &format!("{LOCAL}ports = {{ first = 10, last = 11 }}\n"),
                "providers.local.ports",
            ),
            (
                &format!("{LOCAL}ports = {{ first = 20, last = 10 }}\n"),
                "providers.local.ports",
            ),
            (
                &format!("{LOCAL}price_per_hour = -1\n"),
                "providers.local.price_per_hour",
            ),
            (
                &format!("{LOCAL}stopped_price_per_hour = nan\n"),
                "providers.local.stopped_price_per_hour",
            ),
            (
                &format!("{LOCAL}stop_timeout_s = 0\n"),
                "providers.local.stop_timeout_s",
            ),
            (
                &format!("{LOCAL}gossip_interval_ms = 1\n"),
                "providers.local.gossip_interval_ms",
            ),
            (
                &format!("{LOCAL}seeds = [\"nope://x\"]\n"),
                "providers.local.seeds",
            ),
            (
                "[providers.local]\nbase_dir = \"\"\nca_dir = \"c\"\nkeys_file = \"k\"\n",
                "providers.local.base_dir",
            ),
            (&format!("{VAST}disk_gb = 0\n"), "providers.vast.disk_gb"),
            (&format!("{VAST}num_gpus = 0\n"), "providers.vast.num_gpus"),
            (
                &format!("{VAST}min_reliability = 2\n"),
                "providers.vast.min_reliability",
            ),
            (
                "[providers.vast]\ngpu = \"x\"\nmax_price_per_hour = 0\n",
                "providers.vast.max_price_per_hour",
            ),
            (
                "[providers.vast]\ngpu = \" \"\nmax_price_per_hour = 1\n",
                "providers.vast.gpu",
            ),
            (
                &format!("{VAST}base_url = \"file:///x\"\n"),
                "providers.vast.base_url",
            ),
            (
                &format!("{VAST}graphql_url = \"https://x/graphql\"\n"),
                "providers.vast.graphql_url",
            ),
            (
                "[providers.lambda]\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1\nspot = true\n",
                "providers.lambda.spot",
            ),
            (
                &format!("{VAST}ports = [{{ port = 0, protocol = \"tcp\" }}]\n"),
                "providers.vast.ports",
            ),
            (
                &format!("{VAST}bootstrap_url = \"https://x/a.tar.gz\"\n"),
                "providers.vast.bootstrap_url",
            ),
            (
                &format!("{VAST}firewall_rulesets = [\"fw-1\"]\n"),
                "providers.vast.firewall_rulesets",
            ),
            (
                &format!("{LAMBDA}bootstrap_url = \"https://x/a.tar.gz\"\n"),
                "providers.lambda.bootstrap_sha256",
            ),
            (
                &format!("{LAMBDA}bootstrap_sha256 = \"{SHA}\"\n"),
                "providers.lambda.bootstrap_sha256",
            ),
            (
                &format!(
                    "{LAMBDA}bootstrap_url = \"https://x/a.tar.gz\"\nbootstrap_sha256 = \"abc\"\n"
                ),
                "providers.lambda.bootstrap_sha256",
            ),
            (
                &format!(
                    "{LAMBDA}bootstrap_url = \"http://example.com/a.tar.gz\"\nbootstrap_sha256 = \"{SHA}\"\n"
                ),
                "providers.lambda.bootstrap_url",
            ),
            (
                &format!(
                    "{LAMBDA}bootstrap_url = \"ftp://127.0.0.1/a.tar.gz\"\nbootstrap_sha256 = \"{SHA}\"\n"
                ),
                "providers.lambda.bootstrap_url",
            ),
            (
                &format!("{LAMBDA}firewall_rulesets = [\" \"]\n"),
                "providers.lambda.firewall_rulesets",
            ),
        ];
        for (text, key) in cases {
            let err = KilnConfig::parse(text).expect_err(text);
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, format!("[inventory]\npath = \"inv.db\"\n{LOCAL}")).expect("write");
        let config = KilnConfig::load(&path).expect("valid");
        assert_eq!(config.inventory.path, dir.path().join("inv.db"));
        let local = config.providers.local.expect("local");
        assert_eq!(local.base_dir, dir.path().join("nodes"));
        assert_eq!(local.keys_file, dir.path().join("keys.toml"));
        let err = KilnConfig::load(&dir.path().join("missing.toml")).expect_err("missing");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn the_api_key_comes_from_the_env_or_an_owner_only_file() {
        use std::os::unix::fs::PermissionsExt;

        let config = KilnConfig::parse(VAST).expect("valid");
        let vast = config.providers.vast.as_ref().expect("vast");
        let env = |name: &str| (name == "VAST_API_KEY").then(|| " k-123 \n".to_string());
        let key = vast.api_key(ProviderKind::Vast, &env).expect("from env");
        assert!(!format!("{key:?}").contains("k-123"));
        assert!(!key.to_string().contains("k-123"));
        assert_eq!(key.into_inner(), "k-123");

        let none = |_: &str| None;
        let err = vast.api_key(ProviderKind::Vast, &none).expect_err("no key");
        assert!(err.to_string().contains("VAST_API_KEY"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("vast.key");
        std::fs::write(&file, "file-key\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut with_file = vast.clone();
        with_file.api_key_file = Some(file.clone());
        let err = with_file
            .api_key(ProviderKind::Vast, &env)
            .expect_err("readable by others");
        let text = err.to_string();
        assert!(text.contains("providers.vast.api_key_file"), "{text}");
        assert!(text.contains("readable by group or others"), "{text}");
        assert!(!text.contains("file-key"), "{text}");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let key = with_file
            .api_key(ProviderKind::Vast, &none)
            .expect("owner only");
        assert_eq!(key.into_inner(), "file-key");
        // The parsed config never holds a key, so its Debug cannot show one.
        assert!(!format!("{with_file:?}").contains("file-key"));
    }
}
