//! `kiln simulate`: a discrete-event simulator that runs the real scaling policy
//! ([`crate::policy::plan`], not a copy) against a demand trace, with the providers' start
//! latencies, prices, spot preemption, failed rents and resumes, and reports cost and per-tier
//! waits. Deterministic: the same trace, options and seed give the same result, to the bit.
//!
//! - [`trace`]: synthetic traces (diurnal, launch spike, growth) and CSV import;
//! - [`engine`]: the event loop, the simulated fleet and jobs;
//! - [`report`]: the people's table and the SVG plot.

pub mod engine;
pub mod report;
pub mod trace;

use std::collections::BTreeMap;

use kiln_daemon::protocol::Tier;
use serde::{Deserialize, Serialize};

use crate::policy::{PolicyConfig, WaitTarget, WaitTargets, Wake};
pub use engine::{Driver, Sample};
pub use trace::{Arrival, Shape, SynthOptions, Trace};

/// The simulated world: providers, prices, tiers. Defaults are the seed's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub days: u32,
    /// How often the policy runs, seconds (`kiln run` ticks every 30 s).
    pub tick_s: u64,
    /// Seed: RTX 4090 spot $0.40/h.
    pub spot_usd_per_hour: f64,
    pub on_demand_usd_per_hour: f64,
    /// Disk kept while a host is stopped (WARM): billed per GB-month.
    pub storage_usd_per_gb_month: f64,
    pub disk_gb: f64,
    /// COLD → HOT: rent to ready, seconds (seed: 30–60 min).
    pub rent_s: (u64, u64),
    /// WARM → HOT: resume to ready, seconds (seed: 2–5 min).
    pub resume_s: (u64, u64),
    /// Mean spot preemptions per running host-hour.
    pub spot_preemptions_per_hour: f64,
    /// Chance that a resume never comes back (the host ends FAILED).
    pub resume_failure_prob: f64,
    /// Chance that the provider refuses a rent.
    pub rent_failure_prob: f64,
    /// kilnd refuses a free job whose estimated wait is over this (daemon/src/tiers.rs).
    pub free_admission_max_wait_s: f64,
    /// Free jobs per account per UTC day; `None`: no quota.
    pub free_daily_quota: Option<u32>,
    /// kilnd's assumed job duration before any was measured (daemon/src/config.rs).
    pub assumed_duration_s: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            days: 7,
            tick_s: 30,
            spot_usd_per_hour: 0.40,
            on_demand_usd_per_hour: 0.80,
            storage_usd_per_gb_month: 0.15,
            disk_gb: 100.0,
            rent_s: (30 * 60, 60 * 60),
            resume_s: (2 * 60, 5 * 60),
            spot_preemptions_per_hour: 0.01,
            resume_failure_prob: 0.05,
            rent_failure_prob: 0.05,
            free_admission_max_wait_s: 60.0,
            free_daily_quota: Some(20),
            assumed_duration_s: 6.0,
        }
    }
}

impl SimConfig {
    pub fn tick_ms(&self) -> i64 {
        i64::try_from(self.tick_s.saturating_mul(1000)).unwrap_or(i64::MAX / 4)
    }

    /// Storage cost of a stopped host per hour (a month counted as 730 h).
    pub fn storage_usd_per_hour(&self) -> f64 {
        self.storage_usd_per_gb_month * self.disk_gb / 730.0
    }

    /// The tier's wait target, seconds (kilnd's defaults in daemon/src/tiers.rs).
    pub fn wait_target_s(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Enterprise => 0,
            Tier::Pro => 30,
            Tier::Premium => 120,
            Tier::Free => 300,
        }
    }

    /// Checks the settings; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.days == 0 || self.days > 366 {
            return Err(format!(
                "--days must be between 1 and 366, got {}",
                self.days
            ));
        }
        if self.tick_s == 0 || self.tick_s > 3600 {
            return Err(format!("tick must be 1 to 3600 s, got {}", self.tick_s));
        }
        for (name, v) in [
            ("spot price", self.spot_usd_per_hour),
            ("on-demand price", self.on_demand_usd_per_hour),
            ("storage price", self.storage_usd_per_gb_month),
            ("disk size", self.disk_gb),
            ("preemption rate", self.spot_preemptions_per_hour),
            ("assumed job duration", self.assumed_duration_s),
            ("free admission wait", self.free_admission_max_wait_s),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a finite number ≥ 0, got {v}"));
            }
        }
        for (name, p) in [
            ("resume failure probability", self.resume_failure_prob),
            ("rent failure probability", self.rent_failure_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be within 0..=1, got {p}"));
            }
        }
        for (name, (lo, hi)) in [("rent time", self.rent_s), ("resume time", self.resume_s)] {
            if lo == 0 || hi < lo {
                return Err(format!(
                    "{name} range {lo}–{hi} s must satisfy 0 < low ≤ high"
                ));
            }
        }
        Ok(())
    }
}

/// The policies `kiln simulate` knows, in report order.
pub const POLICY_NAMES: [&str; 5] = [
    "always-on-1",
    "always-on-2",
    "seed-rules",
    "kiln",
    "lower-bound",
];

/// The seed's scale-out triggers ("Scale-Out Triggers", "Queue Overflow Handling" and the
/// growth setup of 1 HOT + 1 WARM) as a [`PolicyConfig`], as written: no cooldowns, no
/// utilization rule, no budget cap, a fleet bounded only by 10 hosts, spot rents. One
/// difference the policy cannot express: its rent rule counts paid jobs only (free load never
/// rents), where the seed counts the whole queue.
pub fn seed_rules_config() -> PolicyConfig {
    let mut c = PolicyConfig {
        resume_queue_depth: 10,
        rent_queue_depth: 30,
        quiet_queue_depth: 3,
        quiet_for_s: 30 * 60,
        warm_release_after_s: 24 * 3600,
        util_warn_pct: 0,
        util_scale_down_pct: 0,
        warm_pool_size: 1,
        max_fleet: 10,
        daily_budget_usd: 1e9,
        scale_up_cooldown_s: 0,
        scale_down_cooldown_s: 0,
        ..PolicyConfig::default()
    };
    c.wait_targets = WaitTargets {
        enterprise: WaitTarget {
            wait_s: 30,
            wakes: Wake::Any,
        },
        pro: WaitTarget {
            wait_s: 30,
            wakes: Wake::Any,
        },
        premium: WaitTarget {
            wait_s: 120,
            wakes: Wake::Warm,
        },
        // The seed's free rule rejects (kilnd's admission), it wakes nothing.
        free: WaitTarget {
            wait_s: 60,
            wakes: Wake::None,
        },
    };
    c.rent.spot = true;
    c
}

/// Job counts of a run. `arrived = served + refused_busy + refused_quota + queued_at_end +
/// running_at_end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCounts {
    pub arrived: u64,
    pub served: u64,
    pub refused_busy: u64,
    pub refused_quota: u64,
    pub queued_at_end: u64,
    pub running_at_end: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierResult {
    pub arrived: u64,
    pub served: u64,
    pub refused_busy: u64,
    pub refused_quota: u64,
    pub queued_at_end: u64,
    pub wait_target_s: u64,
    /// Waits of served jobs (arrival to start), seconds; `None` when none was served.
    pub wait_p50_s: Option<f64>,
    pub wait_p95_s: Option<f64>,
    pub wait_p99_s: Option<f64>,
    /// Share of served jobs that started within the tier's wait target.
    pub within_target_pct: Option<f64>,
}

/// One policy's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyResult {
    pub policy: String,
    pub total_cost_usd: f64,
    pub cost_per_day_usd: Vec<f64>,
    pub cost_per_image_usd: Option<f64>,
    pub ratio_to_lower_bound: Option<f64>,
    /// GPU-billed host time (provisioning, HOT, draining), milliseconds.
    pub gpu_billed_ms: i64,
    /// Busy GPU time over HOT (and draining) host time.
    pub gpu_utilization_pct: f64,
    /// Host-hours by state (`preempted`: gone at the provider, not yet released by the policy).
    pub instance_hours: BTreeMap<String, f64>,
    /// Every host's time from its rent to its release (or the end): the instance hours add up
    /// to this, each instant of a host counted in one state.
    pub host_lifetime_hours: f64,
    pub jobs: JobCounts,
    pub tiers: BTreeMap<String, TierResult>,
    /// Actions executed, by kind.
    pub actions: BTreeMap<String, u64>,
    pub rent_failures: u64,
    pub resume_failures: u64,
    pub preemptions: u64,
    pub hosts_rented: u64,
}

/// The result of one `kiln simulate` run: stable JSON for machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub trace: String,
    pub days: u32,
    pub seed: u64,
    pub arrivals: u64,
    /// Total GPU time the trace asks for, hours.
    pub demand_gpu_hours: f64,
    /// See [`lower_bound`].
    pub lower_bound_usd: f64,
    pub policies: Vec<PolicyResult>,
}

/// One run's samples, by policy name (for the plot).
pub type Series = (String, Vec<Sample>);

/// What a policy name runs.
pub fn driver_for(name: &str, kiln_config: &PolicyConfig) -> Option<Driver> {
    match name {
        "always-on-1" => Some(Driver::AlwaysOn(1)),
        "always-on-2" => Some(Driver::AlwaysOn(2)),
        "seed-rules" => Some(Driver::Plan(Box::new(seed_rules_config()))),
        "kiln" => Some(Driver::Plan(Box::new(kiln_config.clone()))),
        _ => None,
    }
}

/// The cheapest any policy can serve the whole trace: one host billed at the spot price for
/// the whole run (the always-on primary), plus, at the spot price, the GPU time the demand
/// needs beyond what that one host can do, as if extra hosts started and stopped instantly and
/// were billed only while busy. "Beyond" is the work a single always-busy-when-possible host
/// would still have left at the end (the backlog of a work-conserving single server fed the
/// trace): no schedule lets one host do more, so no policy that keeps a host up and serves
/// every job can cost less. A policy that refuses or leaves jobs can come in under it; the
/// report shows how many it left.
pub fn lower_bound(trace: &Trace, config: &SimConfig) -> f64 {
    let end = i64::from(config.days) * trace::DAY_MS;
    let mut backlog_ms: i64 = 0;
    let mut last = 0i64;
    for a in &trace.arrivals {
        backlog_ms = (backlog_ms - (a.at_ms - last)).max(0) + i64::from(a.service_ms);
        last = a.at_ms;
    }
    backlog_ms = (backlog_ms - (end - last)).max(0);
    config.spot_usd_per_hour * (end + backlog_ms) as f64 / 3_600_000.0
}

/// Runs the named policies on a trace. `lower-bound` adds no run: its figure is in the report
/// and every policy's ratio to it. Returns the report and each run's samples (for the plot).
pub fn simulate(
    trace: &Trace,
    config: &SimConfig,
    policies: &[String],
    kiln_config: &PolicyConfig,
    seed: u64,
) -> Result<(Report, Vec<Series>), String> {
    config.validate()?;
    kiln_config.validate().map_err(|e| e.to_string())?;
    let bound = lower_bound(trace, config);
    let mut results = Vec::new();
    let mut series = Vec::new();
    for name in policies {
        if name == "lower-bound" {
            continue;
        }
        let driver = driver_for(name, kiln_config).ok_or_else(|| {
            format!(
                "unknown policy `{name}` (one of {}, or all)",
                POLICY_NAMES.join(", ")
            )
        })?;
        let engine = engine::Engine::new(config, trace, driver, seed);
        let (mut result, samples) = engine.run_with_samples(name);
        result.ratio_to_lower_bound = (bound > 0.0).then(|| result.total_cost_usd / bound);
        results.push(result);
        series.push((name.clone(), samples));
    }
    let demand_ms: u64 = trace.arrivals.iter().map(|a| u64::from(a.service_ms)).sum();
    Ok((
        Report {
            trace: trace.name.clone(),
            days: config.days,
            seed,
            arrivals: trace.arrivals.len() as u64,
            demand_gpu_hours: demand_ms as f64 / 3_600_000.0,
            lower_bound_usd: bound,
            policies: results,
        },
        series,
    ))
}

#[cfg(test)]
mod tests;
