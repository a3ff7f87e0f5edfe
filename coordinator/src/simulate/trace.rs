//! Demand traces: job arrivals with their tier, account and GPU service time. Synthetic
//! generators (deterministic by seed) and CSV import.

use std::collections::HashMap;
use std::f64::consts::PI;

use kiln_daemon::protocol::Tier;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// One job arriving.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Milliseconds since the start of the simulation.
    pub at_ms: i64,
    pub tier: Tier,
    /// Index into [`Trace::accounts`].
    pub account: u32,
    /// GPU time the job takes, milliseconds.
    pub service_ms: u32,
}

/// A whole trace, sorted by arrival time.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// What the trace is (`diurnal`, `csv:jobs.csv`), for reports.
    pub name: String,
    pub arrivals: Vec<Arrival>,
    /// Account names, by index.
    pub accounts: Vec<String>,
}

/// The shape of a synthetic trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// US-daytime peak (about 19:00 UTC), quiet nights.
    Diurnal,
    /// Diurnal, plus a launch spike (eight times the rate, decaying over a few hours) on the
    /// day a third into the run.
    LaunchSpike,
    /// Diurnal, with the daily volume growing linearly from a quarter to 1.75 times the mean.
    Growth,
}

impl Shape {
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Diurnal => "diurnal",
            Shape::LaunchSpike => "launch-spike",
            Shape::Growth => "growth",
        }
    }
}

/// Options of the synthetic generators.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub days: u32,
    /// Mean jobs per day over the whole run.
    pub jobs_per_day: f64,
    /// Share of jobs per tier: free, premium, pro, enterprise (normalised).
    pub tier_mix: [f64; 4],
    /// Accounts per tier: free, premium, pro, enterprise.
    pub accounts: [u32; 4],
    /// GPU service time range, seconds (seed: 3–8 s).
    pub service_s: (f64, f64),
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            days: 7,
            jobs_per_day: 5_000.0,
            tier_mix: [0.5, 0.3, 0.15, 0.05],
            accounts: [2_000, 300, 50, 5],
            service_s: (3.0, 8.0),
        }
    }
}

const MIX_TIERS: [Tier; 4] = [Tier::Free, Tier::Premium, Tier::Pro, Tier::Enterprise];

/// Relative rate of the diurnal profile at `hour` (UTC, fractional): a peak around 19:00 UTC
/// (US afternoon), a floor of a fifth of the peak at night. Mean over a day is 1.
fn diurnal(hour: f64) -> f64 {
    let c = (2.0 * PI * (hour - 19.0) / 24.0).cos();
    // 0.2 floor plus a raised cosine; mean of (1 + c)/2 is 1/2, so the day's mean is 0.2+0.8·0.5.
    (0.2 + 0.8 * (1.0 + c) / 2.0) / 0.6
}

/// Relative rate of `shape` at `t_ms`, over a run of `days`.
fn relative_rate(shape: Shape, t_ms: i64, days: u32) -> f64 {
    let hour = (t_ms % DAY_MS) as f64 / 3_600_000.0;
    let base = diurnal(hour);
    match shape {
        Shape::Diurnal => base,
        Shape::LaunchSpike => {
            let spike_at = i64::from(days / 3) * DAY_MS + 14 * 3_600_000;
            let since_h = (t_ms - spike_at) as f64 / 3_600_000.0;
            let spike = if since_h >= 0.0 {
                7.0 * (-since_h / 2.0).exp()
            } else {
                0.0
            };
            base * (1.0 + spike)
        }
        Shape::Growth => {
            let total = f64::from(days.max(1)) * DAY_MS as f64;
            base * (0.25 + 1.5 * t_ms as f64 / total)
        }
    }
}

/// Largest value of [`relative_rate`] over the run (for thinning), with a margin.
fn max_relative_rate(shape: Shape) -> f64 {
    let peak = 1.0 / 0.6;
    match shape {
        Shape::Diurnal => peak * 1.01,
        Shape::LaunchSpike => peak * 8.0 * 1.01,
        Shape::Growth => peak * 1.75 * 1.01,
    }
}

/// Checks the options of a synthetic trace.
pub fn check_synth(options: &SynthOptions) -> Result<(), String> {
    if options.days == 0 || options.days > 366 {
        return Err(format!(
            "--days must be between 1 and 366, got {}",
            options.days
        ));
    }
    if !options.jobs_per_day.is_finite()
        || options.jobs_per_day <= 0.0
        || options.jobs_per_day > 10_000_000.0
    {
        return Err(format!(
            "--jobs-per-day must be above 0 and at most 10,000,000, got {}",
            options.jobs_per_day
        ));
    }
    let (lo, hi) = options.service_s;
    if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi >= lo && hi <= 3600.0) {
        return Err(format!(
            "service time range {lo}–{hi} s must satisfy 0 < low ≤ high ≤ 3600"
        ));
    }
    if options.tier_mix.iter().any(|w| !w.is_finite() || *w < 0.0)
        || options.tier_mix.iter().sum::<f64>() <= 0.0
    {
        return Err("tier mix must be non-negative weights with a positive sum".to_string());
    }
    if options.accounts.contains(&0) {
        return Err("every tier needs at least one account".to_string());
    }
    Ok(())
}

fn draw_service_ms(rng: &mut StdRng, (lo, hi): (f64, f64)) -> u32 {
    let secs = if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    };
    // At most 3600 s (checked): fits u32 milliseconds.
    (secs * 1000.0).round().max(1.0) as u32
}

/// A synthetic trace: a non-homogeneous Poisson process (thinning) with the shape's rate,
/// scaled so that the mean is `jobs_per_day`; tiers, accounts and service times drawn per job.
pub fn synthetic(shape: Shape, options: &SynthOptions, seed: u64) -> Result<Trace, String> {
    check_synth(options)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut accounts = Vec::new();
    let mut first_account = [0u32; 4];
    for (i, tier) in MIX_TIERS.iter().enumerate() {
        first_account[i] = accounts.len() as u32;
        for n in 0..options.accounts[i] {
            accounts.push(format!("{tier}-{n}"));
        }
    }
    let mix_sum: f64 = options.tier_mix.iter().sum();
    let end = i64::from(options.days) * DAY_MS;
    let per_ms = options.jobs_per_day / DAY_MS as f64;
    let max_rate = per_ms * max_relative_rate(shape);
    let mut arrivals =
        Vec::with_capacity((options.jobs_per_day * f64::from(options.days)) as usize);
    let mut t = 0.0f64;
    // Thinning: candidate gaps at the peak rate, each accepted with rate(t)/peak. Bounded: the
    // clock only moves forward and stops at `end`.
    loop {
        let u: f64 = rng.random::<f64>();
        t += -(1.0 - u).ln() / max_rate;
        if t >= end as f64 {
            break;
        }
        let at_ms = t as i64;
        let accept = per_ms * relative_rate(shape, at_ms, options.days) / max_rate;
        if rng.random::<f64>() >= accept {
            continue;
        }
        let mut pick = rng.random::<f64>() * mix_sum;
        let mut index = 3;
        for (i, w) in options.tier_mix.iter().enumerate() {
            if pick < *w {
                index = i;
                break;
            }
            pick -= w;
        }
        let account = first_account[index] + rng.random_range(0..options.accounts[index]);
        arrivals.push(Arrival {
            at_ms,
            tier: MIX_TIERS[index],
            account,
            service_ms: draw_service_ms(&mut rng, options.service_s),
        });
    }
    Ok(Trace {
        name: shape.as_str().to_string(),
        arrivals,
        accounts,
    })
}

/// Parses a trace CSV: a header `timestamp,tier,account,service_seconds`, then one job a line.
/// `timestamp` is seconds since the start of the simulation, or an RFC 3339 time (counted from
/// midnight UTC of the first such row's day); `service_seconds` may be empty, then the job's
/// time is drawn from `service_s` like a synthetic job's. Rows may come in any order. Every
/// error names its line.
pub fn parse_csv(
    name: &str,
    text: &str,
    days: u32,
    service_s: (f64, f64),
    seed: u64,
) -> Result<Trace, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lines = text.lines().enumerate();
    let header = lines
        .by_ref()
        .find(|(_, l)| !l.trim().is_empty())
        .ok_or_else(|| format!("{name}: empty file: expected a header line"))?;
    let columns: Vec<String> = header
        .1
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    if columns != ["timestamp", "tier", "account", "service_seconds"] {
        return Err(format!(
            "{name}: line {}: header must be `timestamp,tier,account,service_seconds`, got `{}`",
            header.0 + 1,
            header.1.trim()
        ));
    }
    let end = i64::from(days) * DAY_MS;
    let mut epoch_base: Option<i64> = None;
    let mut index: HashMap<String, u32> = HashMap::new();
    let mut accounts: Vec<String> = Vec::new();
    let mut arrivals = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: String| format!("{name}: line {n}: {what}");
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != 4 {
            return Err(bad(format!(
                "expected 4 comma-separated fields, got {}",
                fields.len()
            )));
        }
        let at_ms = if let Ok(secs) = fields[0].parse::<f64>() {
            if !secs.is_finite() || secs < 0.0 {
                return Err(bad(format!(
                    "timestamp {} must be seconds ≥ 0 since the start",
                    fields[0]
                )));
            }
            (secs * 1000.0).round().min(i64::MAX as f64 / 2.0) as i64
        } else {
            let time = humantime::parse_rfc3339_weak(fields[0]).map_err(|_| {
                bad(format!(
                    "timestamp `{}` is neither seconds since the start nor an RFC 3339 time",
                    fields[0]
                ))
            })?;
            let unix_ms = time
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| bad(format!("timestamp `{}` is before 1970", fields[0])))?
                .as_millis();
            let unix_ms = i64::try_from(unix_ms)
                .map_err(|_| bad(format!("timestamp `{}` is out of range", fields[0])))?;
            let base = *epoch_base.get_or_insert(unix_ms - unix_ms.rem_euclid(DAY_MS));
            if unix_ms < base {
                return Err(bad(format!(
                    "timestamp `{}` is before the trace's first day",
                    fields[0]
                )));
            }
            unix_ms - base
        };
        if at_ms >= end {
            return Err(bad(format!(
                "timestamp {} s is past the simulated {days} day(s); raise --days",
                at_ms / 1000
            )));
        }
        let tier: Tier = fields[1].parse().map_err(|_| {
            bad(format!(
                "unknown tier `{}` (free, premium, pro or enterprise)",
                fields[1]
            ))
        })?;
        if fields[2].is_empty() {
            return Err(bad("account is empty".to_string()));
        }
        let account = match index.get(fields[2]) {
            Some(&a) => a,
            None => {
                let a = u32::try_from(accounts.len())
                    .map_err(|_| bad("too many accounts".to_string()))?;
                accounts.push(fields[2].to_string());
                index.insert(fields[2].to_string(), a);
                a
            }
        };
        let service_ms = if fields[3].is_empty() {
            draw_service_ms(&mut rng, service_s)
        } else {
            let secs: f64 = fields[3]
                .parse()
                .map_err(|_| bad(format!("service_seconds `{}` is not a number", fields[3])))?;
            if !secs.is_finite() || secs <= 0.0 || secs > 3600.0 {
                return Err(bad(format!(
                    "service_seconds {} must be above 0 and at most 3600",
                    fields[3]
                )));
            }
            (secs * 1000.0).round().max(1.0) as u32
        };
        arrivals.push(Arrival {
            at_ms,
            tier,
            account,
            service_ms,
        });
    }
    arrivals.sort_by_key(|a| a.at_ms);
    Ok(Trace {
        name: format!("csv:{name}"),
        arrivals,
        accounts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_near_the_asked_volume() {
        let options = SynthOptions {
            days: 3,
            jobs_per_day: 2_000.0,
            ..SynthOptions::default()
        };
        for shape in [Shape::Diurnal, Shape::LaunchSpike, Shape::Growth] {
            let a = synthetic(shape, &options, 7).expect("valid");
            let b = synthetic(shape, &options, 7).expect("valid");
            assert_eq!(a, b);
            assert!(a.arrivals.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
            let n = a.arrivals.len() as f64;
            if shape != Shape::LaunchSpike {
                assert!((n - 6_000.0).abs() < 600.0, "{shape:?}: {n} jobs");
            } else {
                assert!(n > 6_000.0, "the spike adds jobs: {n}");
            }
            assert!(
                a.arrivals
                    .iter()
                    .all(|j| (3_000..=8_000).contains(&j.service_ms))
            );
        }
    }

    #[test]
    fn diurnal_peaks_in_us_daytime() {
        assert!(diurnal(19.0) > 3.0 * diurnal(7.0));
        let mean: f64 = (0..2400)
            .map(|i| diurnal(f64::from(i) / 100.0))
            .sum::<f64>()
            / 2400.0;
        assert!((mean - 1.0).abs() < 1e-3, "{mean}");
    }

    #[test]
    fn csv_reads_rows_and_names_bad_lines() {
        let ok = "timestamp,tier,account,service_seconds\n10,pro,acme,4.5\n2,free,bob,\n\n2026-01-01T00:01:00Z,premium,acme,3\n";
        let t = parse_csv("t.csv", ok, 1, (3.0, 8.0), 1).expect("valid");
        assert_eq!(t.arrivals.len(), 3);
        assert_eq!(t.arrivals[0].at_ms, 2_000);
        assert_eq!(t.arrivals[0].tier, Tier::Free);
        assert_eq!(t.arrivals[1].service_ms, 4_500);
        assert_eq!(t.arrivals[2].at_ms, 60_000);
        assert_eq!(t.accounts, vec!["acme".to_string(), "bob".to_string()]);

        let cases = [
            ("", "empty file"),
            ("time,tier,account,service_seconds\n", "line 1: header"),
            (
                "timestamp,tier,account,service_seconds\n1,gold,a,3\n",
                "line 2: unknown tier `gold`",
            ),
            (
                "timestamp,tier,account,service_seconds\n1,pro,a,3\nx,pro,a,3\n",
                "line 3: timestamp `x`",
            ),
            (
                "timestamp,tier,account,service_seconds\n1,pro,a\n",
                "line 2: expected 4",
            ),
            (
                "timestamp,tier,account,service_seconds\n1,pro,,3\n",
                "line 2: account is empty",
            ),
            (
                "timestamp,tier,account,service_seconds\n1,pro,a,-3\n",
                "line 2: service_seconds -3",
            ),
            (
                "timestamp,tier,account,service_seconds\n1,pro,a,abc\n",
                "line 2: service_seconds `abc`",
            ),
            (
                "timestamp,tier,account,service_seconds\n-1,pro,a,3\n",
                "line 2: timestamp -1",
            ),
            (
                "timestamp,tier,account,service_seconds\n90000,pro,a,3\n",
                "line 2: timestamp 90000 s is past",
            ),
        ];
        for (text, want) in cases {
            let e = parse_csv("t.csv", text, 1, (3.0, 8.0), 1).expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
