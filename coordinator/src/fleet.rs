//! The fleet as the coordinator keeps it: the hosts it rented and the state each is in. Pure
//! data shared by the inventory (which stores it), the policy (which reads it) and the
//! simulator (which fakes it); no I/O here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::provider::ProviderKind;

/// A host's state in Kiln's terms (the seed's HOT / WARM / COLD, plus the transitions).
/// COLD is not a state of a host: a COLD host is one not rented at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Rented (or resumed) and booting: not in the cluster view as ready yet.
    Provisioning,
    /// Running and serving (or able to serve) jobs.
    Hot,
    /// Asked to hand its jobs back and stop; still billed as running.
    Draining,
    /// Stopped with its disk kept: storage billed, resumable in minutes.
    Warm,
    /// Destroyed at the provider. Final.
    Released,
    /// Rent, resume or health failed; waits to be released. Billed as the provider bills it.
    Failed,
}

impl HostState {
    pub const ALL: [HostState; 6] = [
        HostState::Provisioning,
        HostState::Hot,
        HostState::Draining,
        HostState::Warm,
        HostState::Released,
        HostState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Provisioning => "provisioning",
            HostState::Hot => "hot",
            HostState::Draining => "draining",
            HostState::Warm => "warm",
            HostState::Released => "released",
            HostState::Failed => "failed",
        }
    }

    /// Whether the provider bills GPU time in this state.
    pub fn bills_gpu(self) -> bool {
        matches!(
            self,
            HostState::Provisioning | HostState::Hot | HostState::Draining
        )
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HostState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("unknown host state `{s}`"))
    }
}

/// One host the coordinator rented, as the inventory holds it now. Times are Unix milliseconds
/// (the policy takes `now` in the same unit, so tests and the simulator control the clock).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Kiln's name for the host: the node name it joins the cluster with (`gpu-3`), also the
    /// label at the provider.
    pub name: String,
    pub provider: ProviderKind,
    /// The provider's id, once the rent was accepted.
    pub provider_id: Option<String>,
    pub state: HostState,
    /// When the host entered `state`.
    pub state_since_ms: i64,
    pub rented_at_ms: i64,
    /// When the host last became ready (HOT and in the cluster view); cooldowns count from
    /// here, not from the rent call.
    pub ready_at_ms: Option<i64>,
    /// The primary is never stopped or released by the policy.
    pub primary: bool,
    pub spot: bool,
    /// USD per hour while running.
    pub price_per_hour: f64,
    /// USD per hour while stopped (storage), 0 when the provider bills none.
    pub stopped_price_per_hour: f64,
}
