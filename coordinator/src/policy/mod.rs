//! The scaling policy: one pure function, [`plan`], from what the coordinator sees (the cluster
//! [`Observation`], the inventory's [`HostRecord`]s, today's spend, the clock) and what it
//! remembers ([`PolicyState`]) to what it should do ([`Action`]s) and what it will remember next.
//!
//! `kiln run` (the control loop) and `kiln simulate` call the very same function. It must never
//! do I/O, read the wall clock, spawn tasks or draw random numbers: `now_ms` is an argument and
//! every decision follows from the arguments alone, so a simulation replays exactly and a unit
//! test steps time by passing a later `now_ms`.
//!
//! The rules and their defaults are listed in ARCHITECTURE.md ("Scaling policy"); each action's
//! `reason` names its rule and the figures that triggered it.

mod config;
mod observation;
mod rules;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use config::{ConfigError, PolicyConfig, RentConfig, WaitTarget, WaitTargets, Wake};
pub use observation::{MemberObs, Observation, QueueObs};
pub use rules::{designated_primary, fleet_size};

use crate::fleet::HostRecord;
use crate::provider::ProviderKind;

/// One thing the control loop should do. Every action has a `decision_id`, unique among the
/// decisions this state ever issued; the control loop executes an id at most once and tells the
/// state about failures ([`PolicyState::record_failure`]). A rent's id is also the new host's
/// name and its label at the provider, so repeating a rent after a timeout finds the host instead
/// of renting a second one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Rent a new host (COLD → HOT), named `decision_id`.
    Rent {
        decision_id: String,
        provider: ProviderKind,
        spot: bool,
        reason: String,
    },
    /// Start a WARM host again (WARM → HOT).
    Resume {
        decision_id: String,
        host: String,
        reason: String,
    },
    /// Drain a HOT host, then stop it keeping its disk (HOT → WARM). Drain first: the node takes
    /// no new work and hands its queued jobs to other owners; the executor stops the host only
    /// once the node reports nothing running. The policy issues it only for HOT hosts that run
    /// nothing, so the drain normally ends at once.
    DrainStop {
        decision_id: String,
        host: String,
        reason: String,
    },
    /// Destroy a host and its disk. A HOT host (a Lambda host, which cannot be stopped) is
    /// drained first exactly as for [`Action::DrainStop`].
    Release {
        decision_id: String,
        host: String,
        reason: String,
    },
    /// Release a failed host and rent another in its place, named `decision_id`, on `provider`
    /// (another provider than the failed host's when one is available).
    Replace {
        decision_id: String,
        host: String,
        provider: ProviderKind,
        spot: bool,
        reason: String,
    },
}

impl Action {
    pub fn decision_id(&self) -> &str {
        match self {
            Action::Rent { decision_id, .. }
            | Action::Resume { decision_id, .. }
            | Action::DrainStop { decision_id, .. }
            | Action::Release { decision_id, .. }
            | Action::Replace { decision_id, .. } => decision_id,
        }
    }

    /// The existing host acted on (none for a rent).
    pub fn host(&self) -> Option<&str> {
        match self {
            Action::Rent { .. } => None,
            Action::Resume { host, .. }
            | Action::DrainStop { host, .. }
            | Action::Release { host, .. }
            | Action::Replace { host, .. } => Some(host),
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Action::Rent { reason, .. }
            | Action::Resume { reason, .. }
            | Action::DrainStop { reason, .. }
            | Action::Release { reason, .. }
            | Action::Replace { reason, .. } => reason,
        }
    }

    pub fn kind(&self) -> DecisionKind {
        match self {
            Action::Rent { .. } => DecisionKind::Rent,
            Action::Resume { .. } => DecisionKind::Resume,
            Action::DrainStop { .. } => DecisionKind::DrainStop,
            Action::Release { .. } => DecisionKind::Release,
            Action::Replace { .. } => DecisionKind::Replace,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Rent {
                decision_id,
                provider,
                spot,
                reason,
            } => write!(
                f,
                "rent {decision_id} on {provider}{}: {reason}",
                if *spot { " (spot)" } else { "" }
            ),
            Action::Resume { host, reason, .. } => write!(f, "resume {host}: {reason}"),
            Action::DrainStop { host, reason, .. } => write!(f, "drain and stop {host}: {reason}"),
            Action::Release { host, reason, .. } => write!(f, "release {host}: {reason}"),
            Action::Replace {
                decision_id,
                host,
                provider,
                reason,
                ..
            } => write!(
                f,
                "replace {host} with {decision_id} on {provider}: {reason}"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    Rent,
    Resume,
    DrainStop,
    Release,
    Replace,
}

/// A decision issued and not yet seen done in the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub kind: DecisionKind,
    /// The existing host acted on (none for a rent).
    pub host: Option<String>,
    /// The provider a rent or replacement goes to.
    pub provider: Option<ProviderKind>,
    pub issued_at_ms: i64,
}

/// What the policy remembers between ticks. The control loop persists it (JSON) with the
/// inventory, so a restarted coordinator keeps its timers and does not issue a decision twice.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyState {
    /// The number in the next decision id.
    pub next_seq: u64,
    /// Decisions issued and not yet done, by decision id. No host gets a second decision while
    /// one is pending for it.
    pub pending: BTreeMap<String, Pending>,
    /// Since when the whole queue has stayed under `quiet_queue_depth`.
    pub quiet_since_ms: Option<i64>,
    /// Per member: since when its GPU utilization has stayed under `util_warn_pct`.
    pub low_util_since_ms: BTreeMap<String, i64>,
    /// Per member: since when its GPU utilization has stayed under `util_scale_down_pct`.
    pub idle_util_since_ms: BTreeMap<String, i64>,
    /// Per member: since when it has reported `unhealthy`.
    pub unhealthy_since_ms: BTreeMap<String, i64>,
    /// Per HOT host: since when it has been missing from the cluster view.
    pub missing_since_ms: BTreeMap<String, i64>,
    pub last_scale_up_ms: Option<i64>,
    pub last_scale_down_ms: Option<i64>,
    /// When a rent on each provider last failed; the provider is skipped for `retry_after_s`.
    pub rent_failed_ms: BTreeMap<ProviderKind, i64>,
    /// Hosts rented to refill the warm pool: stopped as soon as they are ready and idle.
    pub warm_pool_fill: BTreeSet<String>,
    /// Hosts whose replacement was rented: released from now on whatever their state (never
    /// replaced again, never resumed, not counted in the fleet).
    pub replaced: BTreeSet<String>,
}

impl PolicyState {
    /// The executor reports that a decision failed (a rent refused, a resume that did not come
    /// back, a stop that errored). The decision is no longer pending, so the policy may decide
    /// again; a failed rent makes its provider skipped for `retry_after_s`. Unknown ids are
    /// ignored (the decision may have resolved already).
    pub fn record_failure(&mut self, decision_id: &str, now_ms: i64) {
        if let Some(pending) = self.pending.remove(decision_id)
            && matches!(pending.kind, DecisionKind::Rent | DecisionKind::Replace)
            && let Some(provider) = pending.provider
        {
            self.rent_failed_ms.insert(provider, now_ms);
        }
    }
}

/// The policy's answer for one tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The state to persist and pass to the next tick.
    pub state: PolicyState,
    /// What the policy noticed and did not act on (a warning, a rule held back by a cooldown or
    /// the budget), for logs and `kiln status`.
    pub notes: Vec<String>,
    /// The host treated as primary this tick (never stopped), if any host is HOT.
    pub primary: Option<String>,
    /// Whether today's spend is past `daily_budget_usd` (the budget-cap alert reads this).
    pub budget_capped: bool,
}

/// Decides what to do now. Pure: see the module documentation.
///
/// `hosts` is the inventory (released hosts may be included; they are ignored), `spend_today_usd`
/// what the fleet has cost since midnight UTC.
pub fn plan(
    observation: &Observation,
    hosts: &[HostRecord],
    config: &PolicyConfig,
    state: &PolicyState,
    now_ms: i64,
    spend_today_usd: f64,
) -> Plan {
    rules::Tick::new(
        observation,
        hosts,
        config,
        state.clone(),
        now_ms,
        spend_today_usd,
    )
    .run()
}
