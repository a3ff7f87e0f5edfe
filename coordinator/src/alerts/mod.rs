//! The seed's monitoring table as pure rules: [`evaluate`] turns what the coordinator sees (the
//! cluster [`Observation`], the inventory, today's cost) into alert events, keyed and
//! deduplicated through [`AlertState`]; [`webhook_body`] is the JSON a Slack or Discord webhook
//! takes. No I/O and no clock here: the caller passes `now_ms` and sends the bodies.
//!
//! | key | warning | critical |
//! | --- | --- | --- |
//! | `queue_depth` | > 10 waiting | > 30 waiting |
//! | `pro_wait` | pro/enterprise oldest wait > 30 s | > 60 s |
//! | `health:<host>` | member `unhealthy` (degraded) | member dead in the view, or a HOT host missing from it past a grace (down) |
//! | `gpu_util:<host>` | < 20 % for 1 h | < 10 % for 2 h |
//! | `cost_day` | > $20 today | > $30 today |
//! | `budget_cap` | | spend reached the policy's daily cap |
//!
//! An alert fires once when its condition starts, again only when its severity changes, and a
//! `resolved` event follows when the condition clears.

use std::collections::BTreeMap;
use std::fmt;

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::MemberState;
use serde::{Deserialize, Serialize};

use crate::fleet::{HostRecord, HostState};
use crate::policy::Observation;

/// Thresholds; `Default` is the seed's monitoring table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    pub queue_warn: u64,
    pub queue_critical: u64,
    pub pro_wait_warn_s: u64,
    pub pro_wait_critical_s: u64,
    /// A HOT host missing from the cluster view this long is down.
    pub missing_grace_s: u64,
    pub util_warn_pct: u32,
    pub util_warn_for_s: u64,
    pub util_critical_pct: u32,
    pub util_critical_for_s: u64,
    pub cost_warn_usd: f64,
    pub cost_critical_usd: f64,
    /// The policy's `daily_budget_usd` (`kiln run` copies it here): reaching it is critical.
    pub daily_budget_usd: f64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            queue_warn: 10,
            queue_critical: 30,
            pro_wait_warn_s: 30,
            pro_wait_critical_s: 60,
            missing_grace_s: 300,
            util_warn_pct: 20,
            util_warn_for_s: 3600,
            util_critical_pct: 10,
            util_critical_for_s: 7200,
            cost_warn_usd: 20.0,
            cost_critical_usd: 30.0,
            daily_budget_usd: crate::policy::PolicyConfig::default().daily_budget_usd,
        }
    }
}

/// A threshold that cannot work, named by its key under `[alerts]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("alerts.{key}: {message}")]
pub struct AlertConfigError {
    pub key: &'static str,
    pub message: String,
}

impl AlertConfig {
    pub fn validate(&self) -> Result<(), AlertConfigError> {
        let err = |key, message: String| Err(AlertConfigError { key, message });
        if self.queue_critical < self.queue_warn {
            return err(
                "queue_critical",
                format!(
                    "{} is below queue_warn {}",
                    self.queue_critical, self.queue_warn
                ),
            );
        }
        if self.pro_wait_critical_s < self.pro_wait_warn_s {
            return err(
                "pro_wait_critical_s",
                format!(
                    "{} is below pro_wait_warn_s {}",
                    self.pro_wait_critical_s, self.pro_wait_warn_s
                ),
            );
        }
        if self.util_warn_pct > 100 {
            return err(
                "util_warn_pct",
                format!("{} is not a percentage", self.util_warn_pct),
            );
        }
        if self.util_critical_pct > self.util_warn_pct {
            return err(
                "util_critical_pct",
                format!(
                    "{} is above util_warn_pct {}",
                    self.util_critical_pct, self.util_warn_pct
                ),
            );
        }
        for (key, value) in [
            ("cost_warn_usd", self.cost_warn_usd),
            ("cost_critical_usd", self.cost_critical_usd),
            ("daily_budget_usd", self.daily_budget_usd),
        ] {
            if !value.is_finite() || value <= 0.0 {
                return err(
                    key,
                    format!("must be a positive number of USD, got {value}"),
                );
            }
        }
        if self.cost_critical_usd < self.cost_warn_usd {
            return err(
                "cost_critical_usd",
                format!(
                    "{} is below cost_warn_usd {}",
                    self.cost_critical_usd, self.cost_warn_usd
                ),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    /// The condition started, or its severity changed.
    Firing,
    /// The condition cleared.
    Resolved,
}

/// One change of one alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// What the alert is about: `queue_depth`, `pro_wait`, `health:<host>`, `gpu_util:<host>`,
    /// `cost_day`, `budget_cap`.
    pub key: String,
    pub status: AlertStatus,
    /// For a resolved event, the severity it had.
    pub severity: Severity,
    /// What holds, with its figures ("queue depth 41 > 30").
    pub message: String,
    pub at_ms: i64,
}

/// An alert that is firing now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlert {
    pub severity: Severity,
    pub message: String,
    pub since_ms: i64,
}

/// What the rules remember between evaluations; the control loop persists it with the policy's.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertState {
    pub active: BTreeMap<String, ActiveAlert>,
    /// Per member: since when its GPU utilization has stayed under `util_warn_pct`.
    pub low_util_since_ms: BTreeMap<String, i64>,
    /// Per member: since when it has stayed under `util_critical_pct`.
    pub idle_util_since_ms: BTreeMap<String, i64>,
    /// Per HOT host: since when it has been missing from the view.
    pub missing_since_ms: BTreeMap<String, i64>,
}

fn ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn minutes(ms: i64) -> String {
    format!("{} min", ms.max(0) / 60_000)
}

/// Evaluates every rule at `now_ms` and returns the events to send and the state to keep.
pub fn evaluate(
    observation: &Observation,
    hosts: &[HostRecord],
    cost_today_usd: f64,
    config: &AlertConfig,
    state: &AlertState,
    now_ms: i64,
) -> (Vec<AlertEvent>, AlertState) {
    let mut next = AlertState {
        active: BTreeMap::new(),
        low_util_since_ms: BTreeMap::new(),
        idle_util_since_ms: BTreeMap::new(),
        missing_since_ms: BTreeMap::new(),
    };
    let mut conditions: BTreeMap<String, (Severity, String)> = BTreeMap::new();
    let mut set = |key: String, severity: Severity, message: String| {
        conditions.insert(key, (severity, message));
    };

    let depth = observation.total_queued();
    if depth > config.queue_critical {
        set(
            "queue_depth".into(),
            Severity::Critical,
            format!("queue depth {depth} > {}", config.queue_critical),
        );
    } else if depth > config.queue_warn {
        set(
            "queue_depth".into(),
            Severity::Warning,
            format!("queue depth {depth} > {}", config.queue_warn),
        );
    }

    let waits = [Tier::Enterprise, Tier::Pro].map(|tier| {
        let q = observation.tier(tier);
        (q.oldest_wait_s.filter(|_| q.queued > 0).unwrap_or(0), tier)
    });
    if let Some((wait, tier)) = waits.into_iter().max() {
        if wait > config.pro_wait_critical_s {
            set(
                "pro_wait".into(),
                Severity::Critical,
                format!(
                    "{tier} oldest wait {wait} s > {} s",
                    config.pro_wait_critical_s
                ),
            );
        } else if wait > config.pro_wait_warn_s {
            set(
                "pro_wait".into(),
                Severity::Warning,
                format!("{tier} oldest wait {wait} s > {} s", config.pro_wait_warn_s),
            );
        }
    }

    // Health. A stopped, draining or released host is expected to leave the view.
    let intentional = |name: &str| {
        hosts.iter().any(|h| {
            h.name == name
                && matches!(
                    h.state,
                    HostState::Warm | HostState::Draining | HostState::Released
                )
        })
    };
    for member in &observation.members {
        if member.state == MemberState::Unhealthy {
            set(
                format!("health:{}", member.name),
                Severity::Warning,
                format!("{} degraded: member reports unhealthy", member.name),
            );
        }
    }
    for name in &observation.dead {
        if !intentional(name) {
            set(
                format!("health:{name}"),
                Severity::Critical,
                format!("{name} down: dead in the cluster view"),
            );
        }
    }
    for host in hosts.iter().filter(|h| h.state == HostState::Hot) {
        let name = &host.name;
        if observation.member(name).is_some() {
            continue;
        }
        let since = state.missing_since_ms.get(name).copied().unwrap_or(now_ms);
        next.missing_since_ms.insert(name.clone(), since);
        let missing = now_ms.saturating_sub(since);
        if missing > ms(config.missing_grace_s) && !observation.dead.contains(name) {
            set(
                format!("health:{name}"),
                Severity::Critical,
                format!(
                    "{name} down: HOT but missing from the cluster view for {}",
                    minutes(missing)
                ),
            );
        }
    }

    for member in &observation.members {
        let Some(util) = member.gpu_util_pct else {
            continue;
        };
        let name = &member.name;
        let mut severity = None;
        if util < config.util_warn_pct {
            let since = state.low_util_since_ms.get(name).copied().unwrap_or(now_ms);
            next.low_util_since_ms.insert(name.clone(), since);
            if now_ms.saturating_sub(since) >= ms(config.util_warn_for_s) {
                severity = Some((Severity::Warning, config.util_warn_pct, since));
            }
        }
        if util < config.util_critical_pct {
            let since = state
                .idle_util_since_ms
                .get(name)
                .copied()
                .unwrap_or(now_ms);
            next.idle_util_since_ms.insert(name.clone(), since);
            if now_ms.saturating_sub(since) >= ms(config.util_critical_for_s) {
                severity = Some((Severity::Critical, config.util_critical_pct, since));
            }
        }
        if let Some((severity, pct, since)) = severity {
            set(
                format!("gpu_util:{name}"),
                severity,
                format!(
                    "{name} GPU utilization {util} % < {pct} % for {}",
                    minutes(now_ms.saturating_sub(since))
                ),
            );
        }
    }

    if cost_today_usd > config.cost_critical_usd {
        set(
            "cost_day".into(),
            Severity::Critical,
            format!(
                "cost today ${cost_today_usd:.2} > ${:.2}",
                config.cost_critical_usd
            ),
        );
    } else if cost_today_usd > config.cost_warn_usd {
        set(
            "cost_day".into(),
            Severity::Warning,
            format!(
                "cost today ${cost_today_usd:.2} > ${:.2}",
                config.cost_warn_usd
            ),
        );
    }
    if cost_today_usd.is_nan() || cost_today_usd >= config.daily_budget_usd {
        set(
            "budget_cap".into(),
            Severity::Critical,
            format!(
                "daily budget cap reached: ${cost_today_usd:.2} ≥ ${:.2}; only pro and enterprise load adds capacity",
                config.daily_budget_usd
            ),
        );
    }

    let mut events = Vec::new();
    for (key, (severity, message)) in conditions {
        match state.active.get(&key) {
            Some(active) if active.severity == severity => {
                // Still firing at the same severity: no event; keep the latest figures.
                next.active.insert(
                    key,
                    ActiveAlert {
                        severity,
                        message,
                        since_ms: active.since_ms,
                    },
                );
            }
            previous => {
                events.push(AlertEvent {
                    key: key.clone(),
                    status: AlertStatus::Firing,
                    severity,
                    message: message.clone(),
                    at_ms: now_ms,
                });
                next.active.insert(
                    key,
                    ActiveAlert {
                        severity,
                        message,
                        since_ms: previous.map_or(now_ms, |p| p.since_ms),
                    },
                );
            }
        }
    }
    for (key, active) in &state.active {
        if !next.active.contains_key(key) {
            events.push(AlertEvent {
                key: key.clone(),
                status: AlertStatus::Resolved,
                severity: active.severity,
                message: format!("resolved: {}", active.message),
                at_ms: now_ms,
            });
        }
    }
    (events, next)
}

/// Discord refuses `content` over 2,000 characters.
const MAX_TEXT_CHARS: usize = 2000;

/// The body for a Slack (`text`) or Discord (`content`) incoming webhook; each ignores the
/// other's key.
pub fn webhook_body(event: &AlertEvent) -> serde_json::Value {
    let status = match event.status {
        AlertStatus::Firing => event.severity.as_str().to_uppercase(),
        AlertStatus::Resolved => "RESOLVED".to_string(),
    };
    let text = format!("[kiln] {status} {}: {}", event.key, event.message);
    let text: String = text.chars().take(MAX_TEXT_CHARS).collect();
    serde_json::json!({ "text": text, "content": text })
}

#[cfg(test)]
mod tests;
