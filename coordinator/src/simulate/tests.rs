use super::*;
use crate::cli::simulate::{SimulateArgs, TraceSpec, load_policy_config};

fn small(shape: Shape, days: u32, jobs_per_day: f64, seed: u64) -> Trace {
    let options = SynthOptions {
        days,
        jobs_per_day,
        ..SynthOptions::default()
    };
    trace::synthetic(shape, &options, seed).expect("valid options")
}

fn all_runs() -> Vec<String> {
    POLICY_NAMES.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_arrival_is_served_refused_or_left_and_hosts_are_in_one_state() {
    let config = SimConfig {
        days: 2,
        // Frequent trouble, so the preemption, failed-resume and failed-rent paths run.
        spot_preemptions_per_hour: 0.2,
        resume_failure_prob: 0.3,
        rent_failure_prob: 0.3,
        ..SimConfig::default()
    };
    for (shape, seed) in [(Shape::LaunchSpike, 3), (Shape::Growth, 4)] {
        let trace = small(shape, 2, 30_000.0, seed);
        let (report, _) =
            simulate(&trace, &config, &all_runs(), &PolicyConfig::default(), seed).expect("runs");
        assert_eq!(report.policies.len(), 4);
        for p in &report.policies {
            let j = &p.jobs;
            assert_eq!(j.arrived, trace.arrivals.len() as u64, "{}", p.policy);
            assert_eq!(
                j.arrived,
                j.served + j.refused_busy + j.refused_quota + j.queued_at_end + j.running_at_end,
                "{}: {j:?}",
                p.policy
            );
            let per_tier: u64 = p.tiers.values().map(|t| t.served).sum();
            assert_eq!(per_tier, j.served);
            // Each instant of each host is counted in exactly one state.
            let hours: f64 = p.instance_hours.values().sum();
            assert!(
                (hours - p.host_lifetime_hours).abs() < 1e-6,
                "{}: {hours} h by state vs {} h of host lifetimes",
                p.policy,
                p.host_lifetime_hours
            );
            let per_day: f64 = p.cost_per_day_usd.iter().sum();
            assert!((per_day - p.total_cost_usd).abs() < 1e-6);
            assert!(p.preemptions > 0, "{}: the preemption path ran", p.policy);
        }
        let kiln = report
            .policies
            .iter()
            .find(|p| p.policy == "kiln")
            .expect("kiln ran");
        assert!(
            kiln.actions.get("rent").copied().unwrap_or(0) > 0,
            "{kiln:?}"
        );
        assert!(kiln.actions.get("replace").copied().unwrap_or(0) > 0);
    }
}

#[test]
fn the_same_seed_gives_the_same_json() {
    let config = SimConfig {
        days: 2,
        ..SimConfig::default()
    };
    let run = |seed: u64| {
        let trace = small(Shape::LaunchSpike, 2, 20_000.0, seed);
        let (report, _) =
            simulate(&trace, &config, &all_runs(), &PolicyConfig::default(), seed).expect("runs");
        serde_json::to_string(&report).expect("serializes")
    };
    let a = run(9);
    assert_eq!(a, run(9));
    assert_ne!(a, run(10));
}

#[test]
fn no_policy_that_serves_every_job_beats_the_lower_bound() {
    // No preemption: every policy keeps a host billed at all times, which the bound assumes.
    let config = SimConfig {
        days: 2,
        spot_preemptions_per_hour: 0.0,
        free_daily_quota: None,
        free_admission_max_wait_s: 1e9,
        ..SimConfig::default()
    };
    let mut compared = 0;
    for (shape, jobs, seed) in [
        (Shape::Diurnal, 5_000.0, 1),
        (Shape::LaunchSpike, 20_000.0, 2),
        (Shape::Growth, 40_000.0, 3),
        (Shape::Diurnal, 60_000.0, 4),
    ] {
        // Demand in the first day only, so that every policy can finish it by the end.
        let trace = small(shape, 1, jobs, seed);
        let (report, _) =
            simulate(&trace, &config, &all_runs(), &PolicyConfig::default(), seed).expect("runs");
        assert!(report.lower_bound_usd >= config.spot_usd_per_hour * 48.0 - 1e-9);
        for p in &report.policies {
            let left = p.jobs.refused_busy + p.jobs.queued_at_end + p.jobs.running_at_end;
            if left == 0 {
                compared += 1;
                assert!(
                    p.total_cost_usd >= report.lower_bound_usd - 1e-9,
                    "{} on {shape:?}: ${} < bound ${}",
                    p.policy,
                    p.total_cost_usd,
                    report.lower_bound_usd
                );
                assert!(p.ratio_to_lower_bound.expect("bound > 0") >= 1.0 - 1e-12);
            }
        }
    }
    assert!(compared >= 8, "only {compared} runs served every job");
}

#[test]
fn lower_bound_counts_work_one_host_cannot_finish() {
    let config = SimConfig {
        days: 1,
        ..SimConfig::default()
    };
    let job = |at_ms: i64, service_ms: u32| Arrival {
        at_ms,
        tier: kiln_daemon::protocol::Tier::Pro,
        account: 0,
        service_ms,
    };
    // Two hours of work arriving 30 min before the end: one host finishes 30 min of it.
    let end = trace::DAY_MS;
    let trace = Trace {
        name: "t".to_string(),
        arrivals: vec![
            job(end - 1_800_000, 3_600_000),
            job(end - 1_800_000, 3_600_000),
        ],
        accounts: vec!["a".to_string()],
    };
    let bound = lower_bound(&trace, &config);
    assert!((bound - 0.40 * 25.5).abs() < 1e-9, "{bound}");
}

#[test]
fn always_on_one_costs_hours_times_price() {
    let config = SimConfig {
        days: 3,
        spot_preemptions_per_hour: 0.0,
        ..SimConfig::default()
    };
    let trace = small(Shape::Diurnal, 3, 8_000.0, 5);
    let (report, _) = simulate(
        &trace,
        &config,
        &["always-on-1".to_string(), "always-on-2".to_string()],
        &PolicyConfig::default(),
        5,
    )
    .expect("runs");
    let one = &report.policies[0];
    assert_eq!(one.gpu_billed_ms, 3 * trace::DAY_MS);
    assert!(
        (one.total_cost_usd - 72.0 * 0.40).abs() < 1e-9,
        "{}",
        one.total_cost_usd
    );
    for day in &one.cost_per_day_usd {
        assert!((day - 24.0 * 0.40).abs() < 1e-9, "{day}");
    }
    assert!(one.actions.is_empty());
    let two = &report.policies[1];
    assert!((two.total_cost_usd - 2.0 * 72.0 * 0.40).abs() < 1e-9);
    // Only HOT host-hours.
    assert_eq!(
        one.instance_hours.keys().collect::<Vec<_>>(),
        vec![&"hot".to_string()]
    );
}

#[test]
fn free_jobs_are_refused_when_the_wait_is_long_and_over_quota() {
    let config = SimConfig {
        days: 1,
        spot_preemptions_per_hour: 0.0,
        ..SimConfig::default()
    };
    // Far more than one host can do: free admission must refuse.
    let trace = small(Shape::Diurnal, 1, 40_000.0, 6);
    let (report, _) = simulate(
        &trace,
        &config,
        &["always-on-1".to_string()],
        &PolicyConfig::default(),
        6,
    )
    .expect("runs");
    let free = &report.policies[0].tiers["free"];
    assert!(free.refused_busy > 0, "{free:?}");
    // One account sending 30 free jobs in a quiet day: 10 over the quota of 20.
    let trace = Trace {
        name: "quota".to_string(),
        arrivals: (0..30)
            .map(|i| Arrival {
                at_ms: i * 600_000,
                tier: kiln_daemon::protocol::Tier::Free,
                account: 0,
                service_ms: 4_000,
            })
            .collect(),
        accounts: vec!["a".to_string()],
    };
    let (report, _) = simulate(
        &trace,
        &config,
        &["always-on-1".to_string()],
        &PolicyConfig::default(),
        6,
    )
    .expect("runs");
    let free = &report.policies[0].tiers["free"];
    assert_eq!((free.served, free.refused_quota), (20, 10));
    assert_eq!(free.wait_p99_s, Some(0.0));
}

#[test]
fn higher_tiers_wait_less_under_load() {
    let config = SimConfig {
        days: 1,
        spot_preemptions_per_hour: 0.0,
        free_admission_max_wait_s: 1e9,
        free_daily_quota: None,
        ..SimConfig::default()
    };
    let trace = small(Shape::Diurnal, 1, 12_000.0, 8);
    let (report, _) = simulate(
        &trace,
        &config,
        &["always-on-1".to_string()],
        &PolicyConfig::default(),
        8,
    )
    .expect("runs");
    let t = &report.policies[0].tiers;
    let p95 = |k: &str| t[k].wait_p95_s.expect("served some");
    assert!(p95("enterprise") <= p95("pro"));
    assert!(p95("pro") <= p95("premium"));
    assert!(p95("premium") < p95("free"));
}

#[test]
fn seed_rules_are_a_valid_policy_config() {
    let c = seed_rules_config();
    c.validate().expect("valid");
    assert_eq!((c.resume_queue_depth, c.rent_queue_depth), (10, 30));
    assert_eq!((c.quiet_queue_depth, c.quiet_for_s), (3, 1800));
}

#[test]
fn bad_settings_are_refused_with_their_name() {
    let trace = small(Shape::Diurnal, 1, 100.0, 1);
    let bad = SimConfig {
        rent_failure_prob: 2.0,
        days: 1,
        ..SimConfig::default()
    };
    let e = simulate(&trace, &bad, &all_runs(), &PolicyConfig::default(), 1).expect_err("bad");
    assert!(e.contains("rent failure probability"), "{e}");
    let ok = SimConfig {
        days: 1,
        ..SimConfig::default()
    };
    let e = simulate(
        &trace,
        &ok,
        &["nope".to_string()],
        &PolicyConfig::default(),
        1,
    )
    .expect_err("unknown");
    assert!(e.contains("unknown policy `nope`"), "{e}");
    let e = load_policy_config("[policy]\nmax_fleet = 0\n").expect_err("invalid");
    assert!(format!("{e:#}").contains("policy.max_fleet"), "{e:#}");
    let c = load_policy_config("[policy]\nmax_fleet = 7\n").expect("valid");
    assert_eq!(c.max_fleet, 7);
    let c = load_policy_config("warm_pool_size = 0\n").expect("valid");
    assert_eq!(c.warm_pool_size, 0);
}

#[test]
fn svg_is_drawn_and_downsampled() {
    let samples: Vec<Sample> = (0..5_000)
        .map(|i| Sample {
            t_h: f64::from(i) / 120.0,
            demand_per_h: 100.0,
            queued: u64::from(i == 2_500) * 40,
            hot: 1,
            provisioning: 0,
            warm: 1,
            cumulative_usd: f64::from(i) * 0.01,
        })
        .collect();
    let down = report::downsample(&samples, 1_000);
    assert!(down.len() <= 1_000);
    assert_eq!(down.iter().map(|s| s.queued).max(), Some(40), "peaks kept");
    let svg = report::render_svg("t", &[("kiln".to_string(), samples)]).expect("draws");
    assert!(svg.starts_with("<svg") && svg.contains("cumulative cost"));
    assert!(svg.len() < 400_000, "{} bytes", svg.len());
}

#[test]
fn cli_runs_end_to_end_with_a_csv_trace_and_writes_the_svg() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("jobs.csv");
    let mut text = String::from("timestamp,tier,account,service_seconds\n");
    for i in 0..400 {
        let tier = ["free", "premium", "pro", "enterprise"][i % 4];
        text.push_str(&format!(
            "{},{tier},acct-{},{}\n",
            i * 150,
            i % 7,
            3 + i % 5
        ));
    }
    std::fs::write(&csv, text).expect("write csv");
    let svg = dir.path().join("plot.svg");
    let args = SimulateArgs {
        trace: TraceSpec::Csv(csv.clone()),
        policy: crate::cli::simulate::PolicyList(vec![
            "kiln".to_string(),
            "always-on-1".to_string(),
            "lower-bound".to_string(),
        ]),
        days: 1,
        seed: 2,
        jobs_per_day: 5_000.0,
        policy_config: None,
        svg: Some(svg.clone()),
        json: true,
    };
    let mut out = Vec::new();
    crate::cli::simulate::run(args, &mut out).expect("runs");
    let report: Report = serde_json::from_slice(&out).expect("json report");
    assert_eq!(report.arrivals, 400);
    assert_eq!(report.policies.len(), 2);
    assert_eq!(report.policies[0].policy, "kiln");
    assert!(
        std::fs::read_to_string(&svg)
            .expect("svg")
            .contains("</svg>")
    );

    // The same through clap, as people type it, with the table output.
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from([
        "kiln",
        "simulate",
        "--trace",
        "diurnal",
        "--days",
        "1",
        "--jobs-per-day",
        "500",
        "--policy",
        "all",
    ])
    .expect("parses");
    let mut out = Vec::new();
    crate::cli::run(cli, &mut out).expect("runs");
    let text = String::from_utf8(out).expect("utf-8");
    for name in POLICY_NAMES {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }

    // Bad options are clap errors (exit 2), naming what is wrong.
    for (args, want) in [
        (
            vec!["--trace", "weekly"],
            "diurnal, launch-spike, growth or csv:PATH",
        ),
        (
            vec!["--trace", "diurnal", "--policy", "kiln,cheap"],
            "unknown policy `cheap`",
        ),
        (vec!["--trace", "diurnal", "--days", "0"], "0"),
        (
            vec!["--trace", "diurnal", "--jobs-per-day=-5"],
            "must be above 0",
        ),
    ] {
        let mut argv = vec!["kiln", "simulate"];
        argv.extend(args);
        let e = crate::cli::Cli::try_parse_from(argv).expect_err(want);
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains(want), "{want}: {e}");
    }

    // A bad CSV row is an error naming the file and line.
    std::fs::write(&csv, "timestamp,tier,account,service_seconds\n5,gold,a,3\n").expect("write");
    let args = SimulateArgs {
        trace: TraceSpec::Csv(csv),
        policy: crate::cli::simulate::PolicyList(vec!["kiln".to_string()]),
        days: 1,
        seed: 1,
        jobs_per_day: 5_000.0,
        policy_config: None,
        svg: None,
        json: false,
    };
    let e = crate::cli::simulate::run(args, &mut Vec::new()).expect_err("bad csv");
    assert!(
        format!("{e:#}").contains("line 2: unknown tier `gold`"),
        "{e:#}"
    );
}
