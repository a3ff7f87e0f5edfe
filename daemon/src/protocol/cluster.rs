//! The cluster view as the API (`GET /v1/cluster`) and `kiln status --json` show it.
//!
//! A contract users depend on: add fields freely, never rename or remove one. How these values
//! travel in gossip (one small string per key) is in [`super::gossip`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Tier;

/// What a cluster member is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A GPU host running kilnd.
    Node,
    /// The coordinator or an operator's `kiln` joined as a member; it has no GPU and runs no jobs.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Coordinator => "coordinator",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "node" => Ok(Role::Node),
            "coordinator" => Ok(Role::Coordinator),
            other => Err(format!("unknown role {other:?}")),
        }
    }
}

/// A member's own account of its state.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// The process is up; ComfyUI is not answering yet.
    Starting,
    /// ComfyUI answers; the warm-up workflow is loading the model.
    Warming,
    /// ComfyUI is warm and idle: the node can take a job now.
    Ready,
    /// Running a job.
    Busy,
    /// Stopping on purpose: takes no new work, hands its queue on.
    Draining,
    /// ComfyUI is failing or being restarted.
    Unhealthy,
}

impl MemberState {
    pub const ALL: [MemberState; 6] = [
        MemberState::Starting,
        MemberState::Warming,
        MemberState::Ready,
        MemberState::Busy,
        MemberState::Draining,
        MemberState::Unhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Starting => "starting",
            MemberState::Warming => "warming",
            MemberState::Ready => "ready",
            MemberState::Busy => "busy",
            MemberState::Draining => "draining",
            MemberState::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemberState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MemberState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown member state {s:?}"))
    }
}

/// One GPU's reading as gossip carries it (quantised; see [`super::gossip`]). A field the card
/// does not report is absent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct GpuStatus {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// GPU utilization, percent (quantised to 5 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util_pct: Option<u32>,
    /// Memory-controller utilization, percent (quantised to 5 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_util_pct: Option<u32>,
    /// VRAM used, MiB (quantised to 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_total_mib: Option<u64>,
    /// Degrees Celsius (quantised to 2 °C).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Watts (quantised to 10 W).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_limit_w: Option<u32>,
    /// Compute processes on the card.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u32>,
}

/// One tier's waiting jobs on a node (the jobs this node owns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct TierQueue {
    pub queued: u64,
    /// Age of the oldest waiting job, seconds (quantised: exact under 10 s, then to 5 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_wait_s: Option<u64>,
}

/// Everything a member publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemberStatus {
    pub name: String,
    pub role: Role,
    pub state: MemberState,
    /// The member's HTTP API, e.g. `http://10.0.0.5:7860`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    pub version: String,
    /// `vast`, `runpod`, `lambda`, `local` or absent for a host Kiln did not rent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// What the host costs per hour, USD (quantised to a tenth of a cent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// Why there are no GPU readings (e.g. no NVIDIA driver), when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_note: Option<String>,
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
    /// Waiting jobs per tier (tiers with none are absent).
    #[serde(default)]
    pub queue: BTreeMap<Tier, TierQueue>,
    /// Jobs running on this node now.
    #[serde(default)]
    pub running: u32,
}

/// A member as one observer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterMember {
    #[serde(flatten)]
    pub status: MemberStatus,
    /// Start time of this incarnation, ms since the epoch; a restart gets a new one.
    pub generation: u64,
    /// The address other members gossip with, e.g. `quic://203.0.113.7:41012`.
    pub gossip_addr: String,
    /// False for a member the failure detector considers dead (kept until its grace period).
    pub live: bool,
}

/// The cluster as seen from one member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    pub cluster_id: String,
    /// The member that answered.
    pub observed_by: String,
    /// RFC 3339 time of the snapshot.
    pub observed_at: String,
    /// Live members first, then dead ones; each group by name.
    pub members: Vec<ClusterMember>,
}
