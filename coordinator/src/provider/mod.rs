//! The seam between the coordinator and whoever rents it GPU hosts: one [`Provider`] trait, one
//! implementation per provider (Vast.ai, RunPod, Lambda Cloud over their HTTP APIs, and `local`,
//! which runs `kilnd` processes on this machine).
//!
//! Everything here speaks in provider-neutral terms: an [`Offer`] is something that can be
//! rented, a [`Host`] is something that was rented, and every failure is a [`ProviderError`]
//! whose variant tells the policy what it can do about it. The clients never decide policy:
//! they do not retry a rent on a different offer, release a host that failed to resume, or pick
//! a provider; the control loop does, from these errors.

pub mod http;
pub mod lambda;
pub mod resume;
pub mod runpod;
pub mod vast;

pub use http::{ApiKey, LabelLookup, Pacing, RetryPolicy};
pub use lambda::LambdaClient;
pub use runpod::RunpodClient;
pub use vast::VastClient;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod build;
pub mod local;

/// Which provider a host comes from. The lowercase name is what gossip (`MemberStatus.provider`),
/// the inventory and the CLI use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Vast,
    Runpod,
    Lambda,
    Local,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 4] = [
        ProviderKind::Vast,
        ProviderKind::Runpod,
        ProviderKind::Lambda,
        ProviderKind::Local,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Vast => "vast",
            ProviderKind::Runpod => "runpod",
            ProviderKind::Lambda => "lambda",
            ProviderKind::Local => "local",
        }
    }

    /// Whether a rented host can be stopped and started again with its disk (a WARM host).
    /// Lambda Cloud cannot: its hosts are HOT or released.
    pub fn can_pause(self) -> bool {
        !matches!(self, ProviderKind::Lambda)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProviderKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProviderKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!("unknown provider `{s}` (expected vast, runpod, lambda or local)")
            })
    }
}

/// What the coordinator wants to rent: the filter for price discovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferQuery {
    /// The provider's own GPU name or type id (`RTX 4090` on Vast, `NVIDIA GeForce RTX 4090` on
    /// RunPod, an instance type such as `gpu_1x_a10` on Lambda).
    pub gpu: String,
    pub num_gpus: u32,
    /// Disk the host needs (models, outputs), GB.
    pub disk_gb: u32,
    /// Lowest acceptable host reliability, 0..=1 (providers without a figure ignore it).
    pub min_reliability: f64,
    /// Highest acceptable price, USD per hour for the whole host.
    pub max_price_per_hour: f64,
    /// Interruptible (spot / bid) capacity instead of on-demand.
    pub spot: bool,
}

/// One rentable host (or host type) as the provider priced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub provider: ProviderKind,
    /// What [`RentRequest::offer_id`] takes: a Vast ask id, a RunPod GPU type id, a Lambda
    /// instance type name.
    pub offer_id: String,
    pub gpu_name: String,
    pub num_gpus: u32,
    /// USD per hour while running (for spot: the price to bid, at least the minimum bid).
    pub price_per_hour: f64,
    /// USD per GB-month for disk while stopped, when the provider bills it.
    pub storage_per_gb_month: Option<f64>,
    pub reliability: Option<f64>,
    /// Region, data centre or geolocation, as the provider names it.
    pub location: Option<String>,
    pub spot: bool,
}

/// Everything a rent needs. The `label` names the host at the provider and is unique per rent
/// decision: a client that times out after the provider accepted a rent finds the host by its
/// label instead of renting a second one. `env` and `onstart` carry the host's private key and
/// tokens: its `Debug` shows only their names and sizes.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RentRequest {
    pub label: String,
    pub offer_id: String,
    /// Container image (Vast, RunPod), or OS image on Lambda when the API takes one.
    pub image: Option<String>,
    /// A provider template (RunPod template id, Vast template hash), instead of or with `image`.
    pub template: Option<String>,
    /// Shell script the host runs at boot (Vast `onstart`, RunPod start command, Lambda
    /// `user_data`). Carries the node's config and certificates.
    pub onstart: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Container/VM ports that must be reachable from outside (API, gossip).
    pub ports: Vec<PortSpec>,
    pub disk_gb: u32,
    /// Spot bid, USD per hour per GPU; `None` rents on-demand.
    pub bid_per_hour: Option<f64>,
}

impl fmt::Debug for RentRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RentRequest")
            .field("label", &self.label)
            .field("offer_id", &self.offer_id)
            .field("image", &self.image)
            .field("template", &self.template)
            .field(
                "onstart",
                &self
                    .onstart
                    .as_ref()
                    .map(|s| format!("<{} bytes>", s.len())),
            )
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("ports", &self.ports)
            .field("disk_gb", &self.disk_gb)
            .field("bid_per_hour", &self.bid_per_hour)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

/// Where a rented host is in its life, in provider-neutral terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum HostStatus {
    /// Accepted by the provider, not running yet (Vast `loading`/`created`, RunPod
    /// PROVISIONING/STARTING, Lambda `booting`).
    Starting,
    /// Running, with its GPUs (readiness of `kilnd` itself is gossip's business).
    Running,
    /// The provider was asked to run it but it does not (Vast intended `running`, actual
    /// `stopped`: waiting for its GPU to come free, perhaps forever).
    Scheduling,
    /// Stopped with its disk kept (WARM).
    Stopped,
    /// On its way out, or gone.
    Terminated,
    /// The provider reports a fault (Vast `offline`/`frozen`, RunPod ERROR, Lambda
    /// `unhealthy`, a spot host preempted). The detail is the provider's own status.
    Failed(String),
}

/// One endpoint from outside the host to a port inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapped {
    pub host: String,
    pub port: u16,
}

/// How to reach a host from outside: the public address and, per internal port, the external
/// endpoint (Vast maps each port to a random one on a shared IP; Lambda VMs keep their ports),
/// plus HTTP proxy URLs where the provider has them (RunPod).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub public_ip: Option<String>,
    pub ports: BTreeMap<PortSpec, Mapped>,
    pub http_proxy: BTreeMap<u16, String>,
}

/// A rented host as the provider reports it now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub provider: ProviderKind,
    /// The provider's id (Vast instance id as text, RunPod pod id, Lambda instance id, local
    /// node name).
    pub id: String,
    /// The label given at rent, when the provider kept it.
    pub label: Option<String>,
    pub status: HostStatus,
    /// The provider's own status words, for operators (`running/stopped`, `EXITED`, …).
    pub provider_status: String,
    /// GPUs attached now (0 when a resumed RunPod pod lost its GPU).
    pub gpus: u32,
    /// USD per hour while running, as billed.
    pub price_per_hour: Option<f64>,
    pub spot: bool,
    pub address: Address,
}

/// Why a provider call failed, in the terms the policy acts on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// Too many requests; try again after `retry_after` (the provider's figure, or our pacing's
    /// when it gave none).
    #[error("{provider}: rate limited{}", retry_after.map(|d| format!(", retry after {d:?}")).unwrap_or_default())]
    RateLimited {
        provider: ProviderKind,
        retry_after: Option<Duration>,
    },
    /// No host of that kind is free now (Lambda insufficient capacity, RunPod no GPUs, a resume
    /// whose host gave its GPU away).
    #[error("{provider}: no capacity: {message}")]
    NoCapacity {
        provider: ProviderKind,
        message: String,
    },
    /// The offer was taken between search and rent.
    #[error("{provider}: offer {offer_id} is gone")]
    OfferGone {
        provider: ProviderKind,
        offer_id: String,
    },
    #[error("{provider}: {what} not found")]
    NotFound {
        provider: ProviderKind,
        what: String,
    },
    /// The API key is missing, wrong or lacks a permission.
    #[error("{provider}: authentication failed: {message}")]
    Auth {
        provider: ProviderKind,
        message: String,
    },
    /// The provider cannot do this at all (pausing a Lambda host).
    #[error("{provider}: {operation} is not supported")]
    Unsupported {
        provider: ProviderKind,
        operation: &'static str,
    },
    /// A stopped host was asked to start and did not come back running with its GPUs in time.
    #[error("{provider}: host {id} did not resume: {reason}")]
    ResumeFailed {
        provider: ProviderKind,
        id: String,
        reason: String,
    },
    /// The request was refused as malformed; retrying it unchanged cannot help.
    #[error("{provider}: request refused: {message}")]
    Invalid {
        provider: ProviderKind,
        message: String,
    },
    /// A network failure, a timeout or a 5xx: worth retrying later.
    #[error("{provider}: transient failure: {message}")]
    Transient {
        provider: ProviderKind,
        message: String,
    },
}

impl ProviderError {
    /// Whether the same call may succeed if repeated later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProviderError::RateLimited { .. } | ProviderError::Transient { .. }
        )
    }
}

pub type ProviderResult<T> = Result<T, ProviderError>;

/// One provider's API. Every method is one logical operation with the provider's own retries
/// and pacing inside; a returned error is final for this call.
#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// Offers matching the query, cheapest first.
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>>;

    /// Rents a host. Safe to repeat with the same label: a host already rented under that
    /// label is returned instead of a second one.
    async fn rent(&self, request: &RentRequest) -> ProviderResult<Host>;

    /// Every host this account has at the provider (Kiln's or not; the inventory tells).
    async fn list(&self) -> ProviderResult<Vec<Host>>;

    /// One host; [`ProviderError::NotFound`] when the provider no longer knows it.
    async fn get(&self, id: &str) -> ProviderResult<Host>;

    /// Stops a host, keeping its disk (HOT → WARM). [`ProviderError::Unsupported`] on Lambda.
    async fn stop(&self, id: &str) -> ProviderResult<()>;

    /// Asks a stopped host to run again. Returns once the provider accepted the request; use
    /// [`Provider::resume`] to wait until it really runs.
    async fn start(&self, id: &str) -> ProviderResult<()>;

    /// Destroys a host and its disk. Destroying a host that is already gone succeeds.
    async fn destroy(&self, id: &str) -> ProviderResult<()>;

    /// Starts a stopped host and waits until it runs with its GPUs and an address, for at most
    /// `deadline`, reading it every `poll`; [`ProviderError::ResumeFailed`] says why it did not
    /// (see [`resume::resume`]).
    async fn resume(&self, id: &str, deadline: Duration, poll: Duration) -> ProviderResult<Host> {
        resume::resume(self, id, deadline, poll).await
    }

    /// The host rented under `label`, if any.
    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<Host>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|host| host.label.as_deref() == Some(label)))
    }
}
