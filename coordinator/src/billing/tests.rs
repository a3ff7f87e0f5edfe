//! The pure planning of meter events: closed days only, values per metric, identifiers and
//! timestamps, what is skipped and why.

use std::collections::{BTreeMap, BTreeSet};

use kiln_daemon::protocol::{AdminUsageReport, UsageDay};
use kiln_daemon::queue::parse_utc_day;

use super::*;

const DAY: i64 = 86_400_000;

fn day_ms(text: &str) -> i64 {
    parse_utc_day(text).expect("a day") * DAY
}

fn row(day: &str, account: &str, images: u64, gpu_seconds: f64) -> UsageDay {
    UsageDay {
        day: day.into(),
        account: Some(account.into()),
        tier: None,
        submitted: images,
        succeeded: images / 2,
        images,
        gpu_seconds,
        refused: 0,
    }
}

fn report(month: &str, rows: Vec<UsageDay>) -> AdminUsageReport {
    AdminUsageReport {
        month: month.into(),
        members: vec!["n1".into()],
        missing: vec![],
        rows,
    }
}

fn settings(metric: Metric) -> PushSettings {
    PushSettings {
        event_name: "kiln_images".into(),
        metric,
        customers: BTreeMap::from([
            ("acme".to_string(), "cus_acme".to_string()),
            ("beta".to_string(), "cus_beta".to_string()),
        ]),
    }
}

fn nothing_pushed(_: &str) -> bool {
    false
}

#[test]
fn only_closed_days_with_their_values_last_second_and_identifier() {
    // Noon on 2026-11-20: the 19th is closed, the 20th is not.
    let now = day_ms("2026-11-20") + 12 * 3_600_000;
    let reports = [report(
        "2026-11",
        vec![
            row("2026-11-18", "acme", 4, 1.5),
            row("2026-11-19", "acme", 7, 20.25),
            row("2026-11-19", "beta", 3, 0.1),
            row("2026-11-20", "acme", 9, 1.0),
        ],
    )];
    let plan = plan(&reports, &settings(Metric::Images), now, &nothing_pushed);
    let got: Vec<(&str, &str, &str, &str)> = plan
        .events
        .iter()
        .map(|e| {
            (
                e.account.as_str(),
                e.day.as_str(),
                e.value.as_str(),
                e.customer.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("acme", "2026-11-18", "4", "cus_acme"),
            ("acme", "2026-11-19", "7", "cus_acme"),
            ("beta", "2026-11-19", "3", "cus_beta"),
        ]
    );
    let first = &plan.events[0];
    assert_eq!(first.identifier, "kiln-acme-2026-11-18-images");
    assert_eq!(first.timestamp, (day_ms("2026-11-19") - 1000) / 1000);
    assert!(plan.skipped.is_empty() && plan.unmapped.is_empty());

    let gpu = super::plan(
        &reports,
        &settings(Metric::GpuSeconds),
        now,
        &nothing_pushed,
    );
    let values: Vec<&str> = gpu.events.iter().map(|e| e.value.as_str()).collect();
    assert_eq!(values, vec!["1.5", "20.25", "0.1"]);
    assert_eq!(gpu.events[0].identifier, "kiln-acme-2026-11-18-gpu_seconds");
    let succeeded = super::plan(&reports, &settings(Metric::Succeeded), now, &nothing_pushed);
    let values: Vec<&str> = succeeded.events.iter().map(|e| e.value.as_str()).collect();
    assert_eq!(values, vec!["2", "3", "1"]);
}

#[test]
fn a_day_just_ended_waits_for_the_settle_time() {
    let end = day_ms("2026-11-20");
    let reports = [report("2026-11", vec![row("2026-11-19", "acme", 4, 1.0)])];
    let early = plan(
        &reports,
        &settings(Metric::Images),
        end + 60_000,
        &nothing_pushed,
    );
    assert!(early.events.is_empty());
    let later = plan(
        &reports,
        &settings(Metric::Images),
        end + SETTLE_MS,
        &nothing_pushed,
    );
    assert_eq!(later.events.len(), 1);
}

#[test]
fn pushed_unmapped_old_zero_and_incomplete_days_are_left_out() {
    let now = day_ms("2026-12-10") + 3_600_000;
    let reports = [
        report(
            "2026-11",
            vec![
                // 36 days before now's day: past Stripe's 35.
                row("2026-11-04", "acme", 5, 1.0),
                row("2026-11-05", "acme", 5, 1.0),
                row("2026-11-06", "acme", 5, 1.0),
                row("2026-11-06", "gamma", 2, 1.0),
                row("2026-11-07", "gamma", 1, 1.0),
                row("2026-11-07", "beta", 0, 0.0),
            ],
        ),
        AdminUsageReport {
            missing: vec!["n2".into()],
            ..report("2026-12", vec![row("2026-12-01", "acme", 3, 1.0)])
        },
    ];
    let pushed = |id: &str| id == "kiln-acme-2026-11-06-images";
    let plan = plan(&reports, &settings(Metric::Images), now, &pushed);
    let events: Vec<&str> = plan.events.iter().map(|e| e.day.as_str()).collect();
    assert_eq!(events, vec!["2026-11-05"]);
    assert_eq!(plan.already_pushed, vec!["kiln-acme-2026-11-06-images"]);
    assert_eq!(plan.unmapped, BTreeSet::from(["gamma".to_string()]));
    let skipped: Vec<(&str, &str)> = plan
        .skipped
        .iter()
        .map(|s| (s.day.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "2026-11-04");
    assert!(skipped[0].1.contains("35 days"), "{skipped:?}");
    assert_eq!(skipped[1].0, "2026-12-01");
    assert!(skipped[1].1.contains("n2"), "{skipped:?}");
}

#[test]
fn rows_of_one_day_are_summed_and_bad_rows_are_named() {
    let now = day_ms("2026-11-20");
    let mut no_account = row("2026-11-10", "x", 1, 1.0);
    no_account.account = None;
    let reports = [report(
        "2026-11",
        vec![
            row("2026-11-10", "acme", 2, 1.0),
            row("2026-11-10", "acme", 3, 1.0),
            row("2026-11-31", "acme", 3, 1.0),
            no_account,
        ],
    )];
    let plan = plan(&reports, &settings(Metric::Images), now, &nothing_pushed);
    assert_eq!(plan.events.len(), 1);
    assert_eq!(plan.events[0].value, "5");
    let reasons: Vec<&str> = plan.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert_eq!(
        reasons,
        vec!["the report's day is not a date", "not a valid account id"]
    );
}

#[test]
fn default_months_reach_back_over_a_month_end() {
    assert_eq!(
        default_months(day_ms("2026-12-01") + 1000),
        vec!["2026-11".to_string(), "2026-12".to_string()]
    );
    assert_eq!(
        default_months(day_ms("2027-01-15")),
        vec!["2026-12".to_string(), "2027-01".to_string()]
    );
}

#[tokio::test]
async fn a_dry_run_records_nothing_and_a_record_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut inventory = Inventory::open(&dir.path().join("inv.db")).expect("inventory");
    let now = day_ms("2026-11-20");
    let reports = [report("2026-11", vec![row("2026-11-10", "acme", 2, 1.0)])];
    let clock = || now;
    let dry = push(
        &reports,
        &settings(Metric::Images),
        None,
        &mut inventory,
        &clock,
    )
    .await
    .expect("dry run");
    assert!(dry.dry_run);
    assert_eq!(dry.pushed.len(), 1);
    assert!(dry.lines()[0].starts_with("would push acme 2026-11-10 images=2 to cus_acme"));
    let id = "kiln-acme-2026-11-10-images";
    assert_eq!(record(&inventory, id).expect("read"), None);
    let stored = Record {
        status: RecordStatus::Pushed,
        customer: "cus_acme".into(),
        value: "2".into(),
        event_name: "kiln_images".into(),
        message: None,
        at_ms: now,
    };
    store(&mut inventory, id, &stored).expect("store");
    assert_eq!(record(&inventory, id).expect("read"), Some(stored));
    let again = push(
        &reports,
        &settings(Metric::Images),
        None,
        &mut inventory,
        &clock,
    )
    .await
    .expect("dry run");
    assert!(again.pushed.is_empty());
    assert_eq!(again.already_pushed, 1);
}
