//! Usage pushed to Stripe's Billing Meter Events API: `kiln usage push` and, when
//! `[stripe] push_interval` is set, `kiln run`.
//!
//! The source is the operator usage report (`GET /v1/admin/usage`, every account's days merged
//! over the cluster). [`plan`] is pure: from the reports, the settings, the clock and what was
//! already pushed it picks one event per account per *closed* UTC day (value: the day's
//! [`Metric`], timestamp: the day's last second, identifier `kiln-{account}-{day}-{metric}`),
//! and says why everything else is left out (no customer, past Stripe's 35-day limit,
//! incomplete counts). [`push`] sends the planned events one by one and records each answer in
//! the inventory's `kv` table (`stripe.event.{identifier}`), so that a restart never pushes a day
//! twice: Stripe itself deduplicates identifiers only within a rolling window of about a day.
//!
//! An event Stripe refuses (4xx) is recorded as failed with Stripe's message and tried again by
//! the next push; it never holds back the others. A Stripe that cannot be reached ends the push
//! with an error and records nothing for the events not sent, which the next push sends.

pub mod config;
pub mod stripe;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kiln_daemon::protocol::AdminUsageReport;
use kiln_daemon::queue::{format_utc_day, format_utc_month, parse_utc_day, utc_day};
use serde::{Deserialize, Serialize};

pub use config::{Metric, StripeSection};
pub use stripe::{MeterEvent, Sent, StripeClient, StripeError};

use crate::inventory::Inventory;

const DAY_MS: i64 = 86_400_000;
/// Stripe accepts timestamps within the past 35 calendar days.
pub const STRIPE_MAX_AGE_DAYS: i64 = 35;
/// Kept off Stripe's limit, for clock skew and the time a push takes.
const AGE_MARGIN_MS: i64 = 3_600_000;
/// A day is closed this long after its end, so that jobs finishing at midnight on a node whose
/// clock is a little behind are counted before the day is pushed.
pub const SETTLE_MS: i64 = 10 * 60 * 1000;
/// The `kv` key prefix of the records.
const KEY_PREFIX: &str = "stripe.event.";

/// What a push needs from `[stripe]`, with the customers file read.
#[derive(Debug, Clone, PartialEq)]
pub struct PushSettings {
    pub event_name: String,
    pub metric: Metric,
    /// Kiln account → Stripe customer.
    pub customers: BTreeMap<String, String>,
}

impl PushSettings {
    pub fn from_section(
        section: &StripeSection,
    ) -> Result<PushSettings, crate::config::ConfigError> {
        Ok(PushSettings {
            event_name: section.event_name.clone(),
            metric: section.metric,
            customers: section.customers()?,
        })
    }
}

/// What the inventory holds for one identifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub status: RecordStatus,
    pub customer: String,
    pub value: String,
    pub event_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    Pushed,
    Failed,
}

/// The record stored for `identifier`, if any.
pub fn record(inventory: &Inventory, identifier: &str) -> anyhow::Result<Option<Record>> {
    let key = format!("{KEY_PREFIX}{identifier}");
    match inventory.value(&key)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the inventory's record {key} is not readable: {e}")),
    }
}

fn store(inventory: &mut Inventory, identifier: &str, record: &Record) -> anyhow::Result<()> {
    let text = serde_json::to_string(record)?;
    inventory.set_value(&format!("{KEY_PREFIX}{identifier}"), &text, record.at_ms)?;
    Ok(())
}

/// One planned event with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedEvent {
    pub account: String,
    pub day: String,
    pub customer: String,
    pub value: String,
    pub identifier: String,
    pub timestamp: i64,
}

/// An account's day left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Skipped {
    pub account: String,
    pub day: String,
    pub reason: String,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub events: Vec<PlannedEvent>,
    /// Identifiers already recorded as pushed.
    pub already_pushed: Vec<String>,
    pub skipped: Vec<Skipped>,
    /// Accounts with usage on a closed day and no Stripe customer.
    pub unmapped: BTreeSet<String>,
}

/// `kiln-{account}-{day}-{metric}`.
pub fn identifier(account: &str, day: &str, metric: Metric) -> String {
    format!("kiln-{account}-{day}-{metric}")
}

/// A value as Stripe reads it: whole numbers as they are, GPU seconds to the millisecond without
/// trailing zeros.
fn value_text(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_string()
}

/// Picks the events to push. `pushed(identifier)` says whether the inventory records it as
/// pushed. Pure: the clock is `now_ms`.
pub fn plan(
    reports: &[AdminUsageReport],
    settings: &PushSettings,
    now_ms: i64,
    pushed: &dyn Fn(&str) -> bool,
) -> Plan {
    let mut plan = Plan::default();
    let oldest_ms = now_ms - STRIPE_MAX_AGE_DAYS * DAY_MS + AGE_MARGIN_MS;
    for report in reports {
        // Sum per account and day (the report has one row per pair; summing keeps a report
        // that splits a day by tier right).
        let mut days: BTreeMap<(i64, String), f64> = BTreeMap::new();
        let mut bad: BTreeSet<(String, String)> = BTreeSet::new();
        for row in &report.rows {
            let account = row.account.clone().unwrap_or_default();
            let Some(day) = parse_utc_day(&row.day) else {
                bad.insert((account, row.day.clone()));
                continue;
            };
            let value = match settings.metric {
                Metric::Images => row.images as f64,
                Metric::Succeeded => row.succeeded as f64,
                Metric::GpuSeconds => row.gpu_seconds,
            };
            *days.entry((day, account)).or_default() += value;
        }
        for (account, day) in bad {
            plan.skipped.push(Skipped {
                account,
                day,
                reason: "the report's day is not a date".into(),
            });
        }
        for ((day, account), value) in days {
            let day_text = format_utc_day(day);
            let end_ms = (day + 1) * DAY_MS;
            if end_ms + SETTLE_MS > now_ms {
                continue; // not closed yet: a later push sends it
            }
            if !kiln_daemon::tiers::valid_account(&account) {
                plan.skipped.push(Skipped {
                    account,
                    day: day_text,
                    reason: "not a valid account id".into(),
                });
                continue;
            }
            let id = identifier(&account, &day_text, settings.metric);
            if pushed(&id) {
                plan.already_pushed.push(id);
                continue;
            }
            if !report.missing.is_empty() {
                plan.skipped.push(Skipped {
                    account,
                    day: day_text,
                    reason: format!(
                        "counts incomplete: members {} did not report",
                        report.missing.join(", ")
                    ),
                });
                continue;
            }
            if !(value.is_finite() && value > 0.0) {
                continue; // nothing to bill
            }
            let Some(customer) = settings.customers.get(&account) else {
                plan.unmapped.insert(account);
                continue;
            };
            let timestamp_ms = end_ms - 1000;
            if timestamp_ms < oldest_ms {
                plan.skipped.push(Skipped {
                    account,
                    day: day_text,
                    reason: format!(
                        "older than Stripe accepts ({STRIPE_MAX_AGE_DAYS} days) for a meter event"
                    ),
                });
                continue;
            }
            plan.events.push(PlannedEvent {
                customer: customer.clone(),
                value: value_text(value),
                identifier: id,
                timestamp: timestamp_ms / 1000,
                account,
                day: day_text,
            });
        }
    }
    plan
}

/// The months a push reads when none is given: this UTC month and the one before (on the 1st,
/// yesterday belongs to the month before; Stripe's 35 days never reach further).
pub fn default_months(now_ms: i64) -> Vec<String> {
    let today = utc_day(now_ms);
    let this = format_utc_month(today);
    let (start, _) = kiln_daemon::queue::utc_month_bounds(today);
    vec![format_utc_month(start - 1), this]
}

/// A failed event in a [`PushReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failed {
    pub account: String,
    pub day: String,
    pub identifier: String,
    pub status: u16,
    pub message: String,
}

/// What a push did, for people (`print_text`) and scripts (`--json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PushReport {
    pub months: Vec<String>,
    pub dry_run: bool,
    pub event_name: String,
    pub metric: String,
    /// Accepted by Stripe (with `dry_run`: what would be sent).
    pub pushed: Vec<PlannedEvent>,
    /// Events recorded as pushed earlier, not sent again.
    pub already_pushed: usize,
    pub skipped: Vec<Skipped>,
    /// Accounts with usage and no Stripe customer; their days are not pushed.
    pub unmapped: Vec<String>,
    pub failed: Vec<Failed>,
    /// Why the push stopped early, if it did; the events not sent are tried by the next push.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PushReport {
    /// The report as lines of text.
    pub fn lines(&self) -> Vec<String> {
        use crate::text::clean;
        let verb = if self.dry_run { "would push" } else { "pushed" };
        let mut lines = Vec::new();
        for e in &self.pushed {
            lines.push(format!(
                "{verb} {} {} {}={} to {} ({})",
                clean(&e.account),
                e.day,
                self.metric,
                e.value,
                clean(&e.customer),
                clean(&e.identifier)
            ));
        }
        for f in &self.failed {
            lines.push(format!(
                "failed {} {}: HTTP {}: {}",
                clean(&f.account),
                f.day,
                f.status,
                clean(&f.message)
            ));
        }
        for s in &self.skipped {
            lines.push(format!(
                "skipped {} {}: {}",
                clean(&s.account),
                clean(&s.day),
                clean(&s.reason)
            ));
        }
        if !self.unmapped.is_empty() {
            let names: Vec<String> = self.unmapped.iter().map(|a| clean(a)).collect();
            lines.push(format!(
                "no Stripe customer for {} (add them to [stripe.customers]); their days are not pushed",
                names.join(", ")
            ));
        }
        lines.push(format!(
            "{verb}: {} event(s); already pushed: {}; failed: {}; skipped: {} ({}, {})",
            self.pushed.len(),
            self.already_pushed,
            self.failed.len(),
            self.skipped.len(),
            self.event_name,
            self.months.join(", ")
        ));
        if let Some(error) = &self.error {
            lines.push(format!("stopped: {}", clean(error)));
        }
        lines
    }
}

/// Plans and (unless `client` is `None`, a dry run) sends. Every answer is recorded before the
/// next event goes. An error of the inventory is returned as an error; Stripe's unavailability
/// ends the push with [`PushReport::error`] set.
pub async fn push(
    reports: &[AdminUsageReport],
    settings: &PushSettings,
    client: Option<&StripeClient>,
    inventory: &mut Inventory,
    now_ms: &(dyn Fn() -> i64 + Sync),
) -> anyhow::Result<PushReport> {
    let started = now_ms();
    // A record that cannot be read stops the push (the plan would send it again otherwise). In a
    // block of its own: nothing of the lookup may live across the sends' awaits.
    let plan = {
        let lookup_error = std::cell::RefCell::new(None);
        let is_pushed = |id: &str| match record(inventory, id) {
            Ok(found) => found.is_some_and(|r| r.status == RecordStatus::Pushed),
            Err(e) => {
                lookup_error.borrow_mut().get_or_insert(e);
                true
            }
        };
        let plan = plan(reports, settings, started, &is_pushed);
        if let Some(e) = lookup_error.into_inner() {
            return Err(e);
        }
        plan
    };
    let mut report = PushReport {
        months: reports.iter().map(|r| r.month.clone()).collect(),
        dry_run: client.is_none(),
        event_name: settings.event_name.clone(),
        metric: settings.metric.to_string(),
        already_pushed: plan.already_pushed.len(),
        skipped: plan.skipped,
        unmapped: plan.unmapped.into_iter().collect(),
        ..PushReport::default()
    };
    let Some(client) = client else {
        report.pushed = plan.events;
        return Ok(report);
    };
    let total = plan.events.len();
    for (index, planned) in plan.events.into_iter().enumerate() {
        let event = MeterEvent {
            event_name: settings.event_name.clone(),
            customer: planned.customer.clone(),
            value: planned.value.clone(),
            identifier: planned.identifier.clone(),
            timestamp: planned.timestamp,
        };
        // One key per push and event: retries inside this call share it; a later push (after a
        // refusal was fixed) gets a fresh one, since Stripe replays a key's first answer.
        let idempotency_key = format!("{}-{started}", planned.identifier);
        let sent = client.send(&event, &idempotency_key).await;
        let at_ms = now_ms();
        let pushed = |message: Option<String>| Record {
            status: RecordStatus::Pushed,
            customer: planned.customer.clone(),
            value: planned.value.clone(),
            event_name: settings.event_name.clone(),
            message,
            at_ms,
        };
        match sent {
            Ok(Sent::Accepted) => {
                store(inventory, &planned.identifier, &pushed(None))?;
                report.pushed.push(planned);
            }
            // Stripe already has this identifier: an earlier push got through but its record
            // was lost (a crash between the answer and the write), or another push sent it a
            // moment ago. Either way the day is billed; record it so, and never send it again.
            Ok(Sent::Refused {
                status: 400,
                message,
                param: Some(param),
            }) if param == "identifier" => {
                let existing = record(inventory, &planned.identifier)?;
                if existing.is_none_or(|r| r.status != RecordStatus::Pushed) {
                    let note = format!("Stripe already had it: {message}");
                    store(inventory, &planned.identifier, &pushed(Some(note)))?;
                }
                report.already_pushed += 1;
            }
            Ok(Sent::Refused {
                status, message, ..
            }) => {
                // A push running beside this one (`kiln run` and a manual `kiln usage push`)
                // may have recorded the event as pushed meanwhile: that record stays.
                let pushed_meanwhile = record(inventory, &planned.identifier)?
                    .is_some_and(|r| r.status == RecordStatus::Pushed);
                if pushed_meanwhile {
                    report.already_pushed += 1;
                    continue;
                }
                store(
                    inventory,
                    &planned.identifier,
                    &Record {
                        status: RecordStatus::Failed,
                        customer: planned.customer.clone(),
                        value: planned.value.clone(),
                        event_name: settings.event_name.clone(),
                        message: Some(format!("HTTP {status}: {message}")),
                        at_ms,
                    },
                )?;
                report.failed.push(Failed {
                    account: planned.account,
                    day: planned.day,
                    identifier: planned.identifier,
                    status,
                    message,
                });
            }
            Err(error) => {
                let left = total - index;
                report.error = Some(format!(
                    "{error}; {left} event(s) not sent, tried again by the next push"
                ));
                break;
            }
        }
    }
    Ok(report)
}

/// How long `kiln run`'s pusher waits before its first push, so that it does not race the first
/// tick for the node's attention.
pub const FIRST_PUSH_AFTER: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests;
