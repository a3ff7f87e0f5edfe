//! The control loop behind `kiln run`: one [`Controller::tick`] reads what the cluster shows
//! ([`Seen`]) and the inventory, asks the pure policy ([`policy::plan`]) what to do, carries the
//! actions out through the same fleet operations the manual commands use
//! ([`crate::cli::fleet`]), and evaluates the alerts. Everything it must remember between ticks
//! (the policy's state, the alerts' state, its own back-off and drains) is stored in the
//! inventory's key/value table, so a restarted `kiln run` goes on where it stopped.
//!
//! Rules the executor keeps:
//! - a decision id is executed at most once; a rent is skipped when a host of that name (its
//!   decision id) is already in the inventory, so a repeated tick or a restart never rents twice;
//! - a failed action is reported to the policy ([`PolicyState::record_failure`]) and backs off
//!   its key (the provider for rents, the host otherwise) exponentially, from one tick up to
//!   [`MAX_BACKOFF_MS`]; from [`ALERT_AFTER_FAILURES`] failures in a row it raises an alert;
//! - a host is drained (`POST /v1/admin/drain`) before it is stopped or released, and stopped
//!   only once the view shows it gone or draining with nothing running or queued (or after
//!   [`DRAIN_TIMEOUT_MS`]);
//! - no error of a provider, a node or the network ends the loop: only the inventory failing does.

pub mod metrics;
pub mod node;
pub mod webhook;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use kiln_daemon::protocol::cluster::{ClusterView, MemberState, Role};
use serde::{Deserialize, Serialize};

use crate::alerts::{self, ActiveAlert, AlertEvent, AlertState, AlertStatus, Severity};
use crate::cli::fleet::{self, RentOptions};
use crate::config::KilnConfig;
use crate::fleet::{HostRecord, HostState};
use crate::inventory::{ActionEntry, Inventory, InventoryError, start_of_day_ms};
use crate::policy::{self, Action, Observation, Plan, PolicyState};
use crate::provider::{Provider, ProviderKind};

pub use node::{HttpNodeAdmin, NodeAdmin};

/// Inventory keys of the persisted states (JSON).
pub const POLICY_STATE_KEY: &str = "policy_state";
pub const ALERT_STATE_KEY: &str = "alert_state";
pub const CONTROL_STATE_KEY: &str = "control_state";

/// The longest wait between two attempts on a failing provider or host.
pub const MAX_BACKOFF_MS: i64 = 30 * 60 * 1000;
/// Failures in a row after which a key raises a critical alert.
pub const ALERT_AFTER_FAILURES: u32 = 3;
/// A draining host is stopped after this long even if the view never showed it idle.
pub const DRAIN_TIMEOUT_MS: i64 = 15 * 60 * 1000;
/// Executed decision ids are remembered this long (long past any policy timeout).
const DONE_KEPT_MS: i64 = 7 * 24 * 3_600_000;

/// Failures in a row of one key and when it may be tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub failures: u32,
    pub next_try_ms: i64,
    pub last_error: String,
}

/// What the executor itself remembers between ticks (persisted under [`CONTROL_STATE_KEY`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlState {
    /// Decision ids executed (or found done), with when.
    pub done: BTreeMap<String, i64>,
    /// Back-off per key: `rent:<provider>` or `host:<name>`.
    pub backoff: BTreeMap<String, Backoff>,
    /// Draining hosts, with when the drain was asked.
    pub draining_since_ms: BTreeMap<String, i64>,
    /// Draining hosts to release (not stop) once drained.
    pub release_after_drain: BTreeSet<String>,
    /// Alerts the executor raises itself (failing keys), by alert key.
    pub failing: BTreeMap<String, ActiveAlert>,
}

/// What the loop sees of the cluster this tick.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub observation: Observation,
    /// Members live and able to take jobs (`ready` or `busy`).
    pub ready: Vec<String>,
    /// Each live GPU member's API URL, as it publishes it.
    pub api_urls: BTreeMap<String, String>,
}

impl Seen {
    pub fn from_view(view: &ClusterView) -> Seen {
        let api_urls = view
            .members
            .iter()
            .filter(|m| m.live && m.status.role == Role::Node)
            .filter_map(|m| {
                m.status
                    .api_url
                    .clone()
                    .map(|url| (m.status.name.clone(), url))
            })
            .collect();
        Seen {
            observation: Observation::from_view(view),
            ready: crate::status::ready_members(view)
                .into_iter()
                .map(String::from)
                .collect(),
            api_urls,
        }
    }
}

/// Moves hosts still `provisioning` that the view shows ready to `hot` (with a history entry).
/// `kiln status --config` and `kiln run` both call it. Returns the hosts moved.
pub fn mark_ready<'a>(
    inventory: &mut Inventory,
    ready: impl IntoIterator<Item = &'a str>,
    now_ms: i64,
) -> Result<Vec<String>, InventoryError> {
    let mut moved = Vec::new();
    for name in ready {
        if let Some(host) = inventory.host(name)?
            && host.record.state == HostState::Provisioning
        {
            inventory.set_state(name, HostState::Hot, now_ms, "ready in the cluster view")?;
            moved.push(name.to_string());
        }
    }
    Ok(moved)
}

/// Reads a JSON state stored under `key` (its default when none is stored yet).
pub fn load_state<T: for<'de> Deserialize<'de> + Default>(
    inventory: &Inventory,
    key: &str,
) -> anyhow::Result<T> {
    match inventory.value(key)? {
        None => Ok(T::default()),
        Some(text) => serde_json::from_str(&text).with_context(|| {
            format!("the inventory's stored `{key}` is not valid; fix or delete it")
        }),
    }
}

fn store_state<T: Serialize>(
    inventory: &mut Inventory,
    key: &str,
    value: &T,
    now_ms: i64,
) -> anyhow::Result<()> {
    let text = serde_json::to_string(value).with_context(|| format!("encoding `{key}`"))?;
    inventory.set_value(key, &text, now_ms)?;
    Ok(())
}

/// The alerts active now, as the last tick of `kiln run` left them: the rules' and the
/// executor's own, by key.
pub fn active_alerts(inventory: &Inventory) -> anyhow::Result<BTreeMap<String, ActiveAlert>> {
    let alerts: AlertState = load_state(inventory, ALERT_STATE_KEY)?;
    let control: ControlState = load_state(inventory, CONTROL_STATE_KEY)?;
    let mut active = alerts.active;
    active.extend(control.failing);
    Ok(active)
}

/// One action carried out (or skipped) this tick.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Executed {
    pub decision_id: String,
    pub action: String,
    /// `ok`, `skipped: …` or `error: …`.
    pub outcome: String,
}

/// What one tick did.
#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    pub plan: Plan,
    pub executed: Vec<Executed>,
    /// Alert changes to send.
    pub events: Vec<AlertEvent>,
    /// Hosts moved to `hot` because the view showed them ready.
    pub ready: Vec<String>,
    pub notes: Vec<String>,
}

/// The executor: the providers it may use, how it reaches nodes, and the config.
pub struct Controller {
    config: KilnConfig,
    providers: BTreeMap<ProviderKind, Box<dyn Provider>>,
    nodes: Box<dyn NodeAdmin>,
}

/// The back-off key of an action: its provider for rents, else its host.
fn backoff_key_of(action: &Action) -> String {
    match action {
        Action::Rent { provider, .. } | Action::Replace { provider, .. } => {
            format!("rent:{provider}")
        }
        other => format!("host:{}", other.host().unwrap_or_default()),
    }
}

impl Controller {
    pub fn new(
        config: KilnConfig,
        providers: Vec<Box<dyn Provider>>,
        nodes: Box<dyn NodeAdmin>,
    ) -> Controller {
        let providers = providers.into_iter().map(|p| (p.kind(), p)).collect();
        Controller {
            config,
            providers,
            nodes,
        }
    }

    pub fn config(&self) -> &KilnConfig {
        &self.config
    }

    fn provider(&self, kind: ProviderKind) -> anyhow::Result<&dyn Provider> {
        self.providers
            .get(&kind)
            .map(|p| p.as_ref())
            .with_context(|| {
                format!("no {kind} client (no [providers.{kind}] section, or its key is missing)")
            })
    }

    /// The plan for this tick without changing anything (`kiln run --dry-run`).
    pub fn dry_run(&self, inventory: &Inventory, seen: &Seen, now_ms: i64) -> anyhow::Result<Plan> {
        let state: PolicyState = load_state(inventory, POLICY_STATE_KEY)?;
        let hosts = records(inventory)?;
        let spend = inventory.cost(start_of_day_ms(now_ms), now_ms)?.total;
        let mut hosts = hosts;
        // What the tick would see after marking ready hosts hot.
        for host in &mut hosts {
            if host.state == HostState::Provisioning && seen.ready.contains(&host.name) {
                host.state = HostState::Hot;
            }
        }
        Ok(policy::plan(
            &seen.observation,
            &hosts,
            &self.config.policy.rules,
            &state,
            now_ms,
            spend,
        ))
    }

    /// One tick: mark ready hosts, plan, execute, progress drains, evaluate alerts, persist.
    /// `seen` is `None` when the cluster view could not be fetched: then nothing is planned (a
    /// missing view would look like every host gone), drains wait, and an alert says so.
    pub async fn tick(
        &self,
        inventory: &mut Inventory,
        seen: Option<&Seen>,
        view_error: Option<&str>,
        clock: &dyn Fn() -> i64,
    ) -> anyhow::Result<TickReport> {
        let now = clock();
        let mut control: ControlState = load_state(inventory, CONTROL_STATE_KEY)?;
        let mut policy_state: PolicyState = load_state(inventory, POLICY_STATE_KEY)?;
        let alert_state: AlertState = load_state(inventory, ALERT_STATE_KEY)?;
        let mut executed = Vec::new();
        let mut notes = Vec::new();
        let mut ready = Vec::new();
        let previously_failing = control.failing.clone();

        let plan = match seen {
            Some(seen) => {
                ready = mark_ready(inventory, seen.ready.iter().map(String::as_str), now)?;
                let hosts = records(inventory)?;
                let spend = inventory.cost(start_of_day_ms(now), now)?.total;
                let plan = policy::plan(
                    &seen.observation,
                    &hosts,
                    &self.config.policy.rules,
                    &policy_state,
                    now,
                    spend,
                );
                policy_state = plan.state.clone();
                for action in &plan.actions {
                    let outcome = self
                        .execute(inventory, &mut control, seen, action, clock)
                        .await?;
                    if outcome.starts_with("error") || outcome.starts_with("skipped: backing off") {
                        policy_state.record_failure(action.decision_id(), clock());
                    }
                    executed.push(Executed {
                        decision_id: action.decision_id().to_string(),
                        action: action.to_string(),
                        outcome,
                    });
                }
                self.progress_drains(inventory, &mut control, seen, clock, &mut executed)
                    .await?;
                control.failing.remove("cluster_view");
                Some(plan)
            }
            None => {
                let detail = view_error.unwrap_or("unknown error");
                notes.push(format!(
                    "cluster view unavailable, nothing planned: {detail}"
                ));
                control
                    .failing
                    .entry("cluster_view".into())
                    .or_insert_with(|| ActiveAlert {
                        severity: Severity::Critical,
                        message: format!("the cluster view cannot be fetched: {detail}"),
                        since_ms: now,
                    });
                None
            }
        };

        // Alerts: the rules' (only with a view: they read it) and the executor's own.
        let now = clock();
        let mut events = Vec::new();
        let mut alert_next = alert_state.clone();
        if let Some(seen) = seen {
            let hosts = records(inventory)?;
            let cost_today = inventory.cost(start_of_day_ms(now), now)?.total;
            let mut rules = self.config.alerts.rules.clone();
            rules.daily_budget_usd = self.config.policy.rules.daily_budget_usd;
            let (rule_events, next) = alerts::evaluate(
                &seen.observation,
                &hosts,
                cost_today,
                &rules,
                &alert_state,
                now,
            );
            events.extend(rule_events);
            alert_next = next;
        }
        events.extend(failing_events(&previously_failing, &control.failing, now));

        control
            .done
            .retain(|_, at| now.saturating_sub(*at) < DONE_KEPT_MS);
        store_state(inventory, POLICY_STATE_KEY, &policy_state, now)?;
        store_state(inventory, ALERT_STATE_KEY, &alert_next, now)?;
        store_state(inventory, CONTROL_STATE_KEY, &control, now)?;

        let plan = plan.unwrap_or_else(|| Plan {
            actions: Vec::new(),
            state: policy_state,
            notes: Vec::new(),
            primary: None,
            budget_capped: false,
        });
        Ok(TickReport {
            plan,
            executed,
            events,
            ready,
            notes,
        })
    }

    /// Carries out one action. Provider and node failures come back as an `error: …` outcome
    /// (and back off the action's key); only the inventory failing is an `Err`.
    async fn execute(
        &self,
        inventory: &mut Inventory,
        control: &mut ControlState,
        seen: &Seen,
        action: &Action,
        clock: &dyn Fn() -> i64,
    ) -> anyhow::Result<String> {
        let id = action.decision_id();
        let now = clock();
        if control.done.contains_key(id) {
            return Ok("skipped: decision already executed".into());
        }
        let key = backoff_key_of(action);
        if let Some(b) = control.backoff.get(&key)
            && now < b.next_try_ms
        {
            return Ok(format!(
                "skipped: backing off {key} after {} failure(s) until {}",
                b.failures,
                fleet::format_ms(b.next_try_ms)
            ));
        }
        let result = self.attempt(inventory, control, seen, action, clock).await;
        let now = clock();
        control.done.insert(id.to_string(), now);
        Ok(match result {
            Attempt::Done(note) => {
                self.succeeded(control, &key);
                note
            }
            Attempt::Failed(error) => {
                let message = format!("{error:#}");
                self.failed(control, &key, &message, now);
                format!("error: {message}")
            }
            Attempt::Inventory(error) => return Err(error),
        })
    }

    async fn attempt(
        &self,
        inventory: &mut Inventory,
        control: &mut ControlState,
        seen: &Seen,
        action: &Action,
        clock: &dyn Fn() -> i64,
    ) -> Attempt {
        match action {
            Action::Rent {
                decision_id,
                provider,
                spot,
                reason,
            }
            | Action::Replace {
                decision_id,
                provider,
                spot,
                reason,
                ..
            } => {
                match inventory.host(decision_id) {
                    Ok(Some(_)) => {
                        return Attempt::Done(format!(
                            "ok: {decision_id} is already in the inventory; not rented again"
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => return Attempt::Inventory(e.into()),
                }
                let provider = match self.provider(*provider) {
                    Ok(p) => p,
                    Err(e) => {
                        if let Err(logged) =
                            log_failed(inventory, clock(), "rent", decision_id, reason, &e)
                        {
                            return Attempt::Inventory(logged.into());
                        }
                        return Attempt::Failed(e);
                    }
                };
                let options = RentOptions {
                    name: Some(decision_id.clone()),
                    spot: Some(*spot),
                    reason: reason.clone(),
                };
                let result = fleet::rent(inventory, provider, &self.config, &options, clock).await;
                if let Err(e) = &result {
                    // `rent` logs once the host is recorded; a failure before that (no offers,
                    // the offer search failing) is logged here.
                    let logged = match inventory.host(decision_id) {
                        Ok(Some(_)) => Ok(()),
                        Ok(None) => log_failed(inventory, clock(), "rent", decision_id, reason, e),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = logged {
                        return Attempt::Inventory(e.into());
                    }
                }
                result.map(|_| "ok".to_string()).into()
            }
            Action::Resume { host, reason, .. } => {
                let provider = match self.host_provider(inventory, host) {
                    Ok(p) => p,
                    Err(e) => return e,
                };
                fleet::resume(inventory, provider, host, reason, clock)
                    .await
                    .map(|_| "ok".to_string())
                    .into()
            }
            Action::DrainStop { host, reason, .. } => {
                self.drain(inventory, control, seen, host, reason, false, clock)
                    .await
            }
            Action::Release { host, reason, .. } => {
                let state = match inventory.require(host) {
                    Ok(h) => h.record.state,
                    Err(e) => return Attempt::Inventory(e.into()),
                };
                if matches!(state, HostState::Hot) {
                    return self
                        .drain(inventory, control, seen, host, reason, true, clock)
                        .await;
                }
                let provider = match self.host_provider(inventory, host) {
                    Ok(p) => p,
                    Err(e) => return e,
                };
                control.draining_since_ms.remove(host);
                control.release_after_drain.remove(host);
                fleet::release(inventory, provider, host, reason, clock)
                    .await
                    .map(|_| "ok".to_string())
                    .into()
            }
        }
    }

    fn host_provider(&self, inventory: &Inventory, host: &str) -> Result<&dyn Provider, Attempt> {
        let record = inventory
            .require(host)
            .map_err(|e| Attempt::Inventory(e.into()))?;
        self.provider(record.record.provider)
            .map_err(Attempt::Failed)
    }

    /// Asks the node to drain and marks the host `draining`; [`Controller::progress_drains`]
    /// stops (or releases) it once it is idle. A node the view no longer shows is not asked.
    #[allow(clippy::too_many_arguments)]
    async fn drain(
        &self,
        inventory: &mut Inventory,
        control: &mut ControlState,
        seen: &Seen,
        host: &str,
        reason: &str,
        release: bool,
        clock: &dyn Fn() -> i64,
    ) -> Attempt {
        let outcome = match seen.api_urls.get(host) {
            Some(url) => self
                .nodes
                .drain(url)
                .await
                .with_context(|| format!("asking {host} to drain")),
            None => Ok(()),
        };
        let now = clock();
        let entry = ActionEntry {
            at_ms: now,
            action: "drain".into(),
            host: Some(host.into()),
            reason: reason.into(),
            outcome: match &outcome {
                Ok(()) if seen.api_urls.contains_key(host) => "ok".into(),
                Ok(()) => "ok: not in the cluster view, nothing to drain".into(),
                Err(e) => format!("error: {e:#}"),
            },
        };
        if let Err(e) = inventory.record_action(&entry) {
            return Attempt::Inventory(e.into());
        }
        if let Err(e) = outcome {
            return Attempt::Failed(e);
        }
        if let Err(e) = inventory.set_state(host, HostState::Draining, now, reason) {
            return Attempt::Inventory(e.into());
        }
        control.draining_since_ms.insert(host.to_string(), now);
        if release {
            control.release_after_drain.insert(host.to_string());
        }
        Attempt::Done("ok: draining".into())
    }

    /// Stops (or releases) each draining host the view shows idle or gone.
    async fn progress_drains(
        &self,
        inventory: &mut Inventory,
        control: &mut ControlState,
        seen: &Seen,
        clock: &dyn Fn() -> i64,
        executed: &mut Vec<Executed>,
    ) -> anyhow::Result<()> {
        let draining: Vec<String> = inventory
            .hosts()?
            .into_iter()
            .filter(|h| h.record.state == HostState::Draining)
            .map(|h| h.record.name)
            .collect();
        for name in draining {
            let now = clock();
            let since = *control.draining_since_ms.entry(name.clone()).or_insert(now);
            let idle = match seen.observation.member(&name) {
                None => true,
                Some(m) => {
                    m.running == 0
                        && m.queue.values().all(|q| q.queued == 0)
                        && matches!(m.state, MemberState::Draining | MemberState::Ready)
                }
            };
            let timed_out = now.saturating_sub(since) >= DRAIN_TIMEOUT_MS;
            if !idle && !timed_out {
                continue;
            }
            let key = format!("host:{name}");
            if let Some(b) = control.backoff.get(&key)
                && now < b.next_try_ms
            {
                continue;
            }
            let record = inventory.require(&name)?;
            let release =
                control.release_after_drain.contains(&name) || !record.record.provider.can_pause();
            let reason = if timed_out && !idle {
                "drained for too long; stopping anyway".to_string()
            } else {
                "drained: nothing running or queued".to_string()
            };
            let result = match self.provider(record.record.provider) {
                Err(e) => Err(e),
                Ok(provider) if release => {
                    fleet::release(inventory, provider, &name, &reason, clock).await
                }
                Ok(provider) => fleet::pause(inventory, provider, &name, &reason, clock).await,
            };
            let now = clock();
            let outcome = match result {
                Ok(_) => {
                    self.succeeded(control, &key);
                    control.draining_since_ms.remove(&name);
                    control.release_after_drain.remove(&name);
                    "ok".to_string()
                }
                Err(e) => {
                    // An inventory failure inside the fleet operation ends the tick.
                    if e.downcast_ref::<InventoryError>().is_some() {
                        return Err(e);
                    }
                    let message = format!("{e:#}");
                    self.failed(control, &key, &message, now);
                    format!("error: {message}")
                }
            };
            executed.push(Executed {
                decision_id: format!("drain:{name}"),
                action: format!(
                    "{} {name}: {reason}",
                    if release { "release" } else { "stop" }
                ),
                outcome,
            });
        }
        Ok(())
    }

    fn succeeded(&self, control: &mut ControlState, key: &str) {
        control.backoff.remove(key);
        control.failing.remove(&format!("failing:{key}"));
    }

    fn failed(&self, control: &mut ControlState, key: &str, message: &str, now: i64) {
        let tick_ms = i64::try_from(self.config.policy.tick().as_millis()).unwrap_or(i64::MAX);
        let entry = control.backoff.entry(key.to_string()).or_insert(Backoff {
            failures: 0,
            next_try_ms: now,
            last_error: String::new(),
        });
        entry.failures = entry.failures.saturating_add(1);
        let factor = 1i64 << entry.failures.saturating_sub(1).min(20);
        let delay = tick_ms.saturating_mul(factor).min(MAX_BACKOFF_MS);
        entry.next_try_ms = now.saturating_add(delay);
        entry.last_error = message.to_string();
        if entry.failures >= ALERT_AFTER_FAILURES {
            let failures = entry.failures;
            let alert = control
                .failing
                .entry(format!("failing:{key}"))
                .or_insert_with(|| ActiveAlert {
                    severity: Severity::Critical,
                    message: String::new(),
                    since_ms: now,
                });
            alert.message = format!("{key}: {failures} failures in a row, last: {message}");
        }
    }
}

/// Records in the actions log an action that failed before the fleet operation logged it.
fn log_failed(
    inventory: &mut Inventory,
    at_ms: i64,
    action: &str,
    host: &str,
    reason: &str,
    error: &anyhow::Error,
) -> Result<(), InventoryError> {
    inventory.record_action(&ActionEntry {
        at_ms,
        action: action.into(),
        host: Some(host.into()),
        reason: reason.into(),
        outcome: format!("error: {error:#}"),
    })
}

/// How an attempt ended: done, failed (provider, node, config), or the inventory failed.
enum Attempt {
    Done(String),
    Failed(anyhow::Error),
    Inventory(anyhow::Error),
}

impl From<anyhow::Result<String>> for Attempt {
    fn from(result: anyhow::Result<String>) -> Attempt {
        match result {
            Ok(note) => Attempt::Done(note),
            Err(e) if e.downcast_ref::<InventoryError>().is_some() => Attempt::Inventory(e),
            Err(e) => Attempt::Failed(e),
        }
    }
}

/// Firing events for executor alerts that appeared, resolved ones for those that cleared.
fn failing_events(
    before: &BTreeMap<String, ActiveAlert>,
    after: &BTreeMap<String, ActiveAlert>,
    now: i64,
) -> Vec<AlertEvent> {
    let mut events = Vec::new();
    for (key, alert) in after {
        if !before.contains_key(key) {
            events.push(AlertEvent {
                key: key.clone(),
                status: AlertStatus::Firing,
                severity: alert.severity,
                message: alert.message.clone(),
                at_ms: now,
            });
        }
    }
    for (key, alert) in before {
        if !after.contains_key(key) {
            events.push(AlertEvent {
                key: key.clone(),
                status: AlertStatus::Resolved,
                severity: alert.severity,
                message: alert.message.clone(),
                at_ms: now,
            });
        }
    }
    events
}

fn records(inventory: &Inventory) -> anyhow::Result<Vec<HostRecord>> {
    Ok(inventory.hosts()?.into_iter().map(|h| h.record).collect())
}
