use std::collections::BTreeMap;

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::MemberState;

use super::*;
use crate::fleet::{HostRecord, HostState};
use crate::policy::{MemberObs, Observation, QueueObs};
use crate::provider::ProviderKind;

const S: i64 = 1000;
const MIN: i64 = 60 * S;
const H: i64 = 60 * MIN;
const T0: i64 = 1_800_000_000_000;

fn member(name: &str) -> MemberObs {
    MemberObs {
        name: name.to_string(),
        state: MemberState::Ready,
        running: 0,
        gpu_util_pct: Some(60),
        queue: BTreeMap::new(),
    }
}

fn with_queue(mut m: MemberObs, tier: Tier, queued: u64, wait: u64) -> MemberObs {
    m.queue.insert(
        tier,
        QueueObs {
            queued,
            oldest_wait_s: Some(wait),
        },
    );
    m
}

fn hot(name: &str) -> HostRecord {
    HostRecord {
        name: name.to_string(),
        provider: ProviderKind::Vast,
        provider_id: None,
        state: HostState::Hot,
        state_since_ms: T0 - H,
        rented_at_ms: T0 - H,
        ready_at_ms: Some(T0 - H),
        primary: false,
        spot: false,
        price_per_hour: 0.4,
        stopped_price_per_hour: 0.0,
    }
}

fn eval(
    o: &Observation,
    hosts: &[HostRecord],
    cost: f64,
    state: &AlertState,
    now: i64,
) -> (Vec<AlertEvent>, AlertState) {
    evaluate(o, hosts, cost, &AlertConfig::default(), state, now)
}

fn keys(events: &[AlertEvent]) -> Vec<(String, AlertStatus, Severity)> {
    events
        .iter()
        .map(|e| (e.key.clone(), e.status, e.severity))
        .collect()
}

#[test]
fn queue_depth_warns_over_10_is_critical_over_30_fires_once_and_resolves() {
    let at = |n| Observation::new(vec![with_queue(member("gpu-1"), Tier::Free, n, 5)], vec![]);
    let (events, s) = eval(&at(10), &[], 0.0, &AlertState::default(), T0);
    assert!(events.is_empty(), "{events:?}");
    let (events, s) = eval(&at(11), &[], 0.0, &s, T0 + S);
    assert_eq!(
        keys(&events),
        vec![("queue_depth".into(), AlertStatus::Firing, Severity::Warning)]
    );
    assert_eq!(events[0].message, "queue depth 11 > 10");
    // Still over: no second event, while the message follows the figures.
    let (events, s) = eval(&at(25), &[], 0.0, &s, T0 + 2 * S);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(s.active["queue_depth"].message, "queue depth 25 > 10");
    assert_eq!(s.active["queue_depth"].since_ms, T0 + S);
    // 30 is not over 30; 31 escalates.
    let (events, s) = eval(&at(30), &[], 0.0, &s, T0 + 3 * S);
    assert!(events.is_empty());
    let (events, s) = eval(&at(31), &[], 0.0, &s, T0 + 4 * S);
    assert_eq!(
        keys(&events),
        vec![(
            "queue_depth".into(),
            AlertStatus::Firing,
            Severity::Critical
        )]
    );
    let (events, s) = eval(&at(2), &[], 0.0, &s, T0 + 5 * S);
    assert_eq!(
        keys(&events),
        vec![(
            "queue_depth".into(),
            AlertStatus::Resolved,
            Severity::Critical
        )]
    );
    assert!(
        events[0]
            .message
            .starts_with("resolved: queue depth 31 > 30")
    );
    assert!(s.active.is_empty());
    let (events, _) = eval(&at(2), &[], 0.0, &s, T0 + 6 * S);
    assert!(events.is_empty());
}

#[test]
fn pro_wait_warns_over_30s_and_is_critical_over_60s() {
    let at =
        |tier, wait| Observation::new(vec![with_queue(member("gpu-1"), tier, 1, wait)], vec![]);
    assert!(
        eval(&at(Tier::Pro, 30), &[], 0.0, &AlertState::default(), T0)
            .0
            .is_empty()
    );
    let (events, s) = eval(&at(Tier::Pro, 35), &[], 0.0, &AlertState::default(), T0);
    assert_eq!(
        keys(&events),
        vec![("pro_wait".into(), AlertStatus::Firing, Severity::Warning)]
    );
    assert_eq!(events[0].message, "pro oldest wait 35 s > 30 s");
    let (events, _) = eval(&at(Tier::Enterprise, 65), &[], 0.0, &s, T0 + S);
    assert_eq!(
        keys(&events),
        vec![("pro_wait".into(), AlertStatus::Firing, Severity::Critical)]
    );
    assert_eq!(events[0].message, "enterprise oldest wait 65 s > 60 s");
    // Premium waits are not this alert's business.
    assert!(
        eval(
            &at(Tier::Premium, 500),
            &[],
            0.0,
            &AlertState::default(),
            T0
        )
        .0
        .is_empty()
    );
}

#[test]
fn health_degraded_down_and_missing_past_the_grace() {
    let mut sick = member("gpu-2");
    sick.state = MemberState::Unhealthy;
    let o = Observation::new(vec![member("gpu-1"), sick], vec!["gpu-3".to_string()]);
    let hosts = vec![hot("gpu-1"), hot("gpu-2"), hot("gpu-3")];
    let (events, s) = eval(&o, &hosts, 0.0, &AlertState::default(), T0);
    assert_eq!(
        keys(&events),
        vec![
            (
                "health:gpu-2".into(),
                AlertStatus::Firing,
                Severity::Warning
            ),
            (
                "health:gpu-3".into(),
                AlertStatus::Firing,
                Severity::Critical
            ),
        ]
    );
    assert!(events[1].message.contains("gpu-3 down"));
    // gpu-3 was stopped on purpose (WARM): its dead member is no alert, and the alert resolves.
    let mut hosts2 = hosts.clone();
    hosts2[2].state = HostState::Warm;
    let (events, _) = eval(&o, &hosts2, 0.0, &s, T0 + S);
    assert_eq!(
        keys(&events),
        vec![(
            "health:gpu-3".into(),
            AlertStatus::Resolved,
            Severity::Critical
        )]
    );

    // A HOT host absent from the view: down only past the grace (5 min).
    let o = Observation::new(vec![member("gpu-1")], vec![]);
    let hosts = vec![hot("gpu-1"), hot("gpu-4")];
    let (events, s) = eval(&o, &hosts, 0.0, &AlertState::default(), T0);
    assert!(events.is_empty());
    assert_eq!(s.missing_since_ms.get("gpu-4"), Some(&T0));
    let (events, s) = eval(&o, &hosts, 0.0, &s, T0 + 5 * MIN);
    assert!(events.is_empty());
    let (events, s) = eval(&o, &hosts, 0.0, &s, T0 + 5 * MIN + 1);
    assert_eq!(
        keys(&events),
        vec![(
            "health:gpu-4".into(),
            AlertStatus::Firing,
            Severity::Critical
        )]
    );
    assert!(
        events[0]
            .message
            .contains("missing from the cluster view for 5 min"),
        "{}",
        events[0].message
    );
    // Back in the view: resolved, and the timer is gone.
    let o = Observation::new(vec![member("gpu-1"), member("gpu-4")], vec![]);
    let (events, s) = eval(&o, &hosts, 0.0, &s, T0 + 6 * MIN);
    assert_eq!(
        keys(&events),
        vec![(
            "health:gpu-4".into(),
            AlertStatus::Resolved,
            Severity::Critical
        )]
    );
    assert!(s.missing_since_ms.is_empty());
}

#[test]
fn low_gpu_utilization_warns_after_1h_and_is_critical_after_2h() {
    let at = |util| {
        let mut m = member("gpu-2");
        m.gpu_util_pct = Some(util);
        Observation::new(vec![member("gpu-1"), m], vec![])
    };
    let (events, s) = eval(&at(5), &[], 0.0, &AlertState::default(), T0);
    assert!(events.is_empty());
    let (events, s) = eval(&at(5), &[], 0.0, &s, T0 + H - 1);
    assert!(events.is_empty());
    let (events, s) = eval(&at(5), &[], 0.0, &s, T0 + H);
    assert_eq!(
        keys(&events),
        vec![(
            "gpu_util:gpu-2".into(),
            AlertStatus::Firing,
            Severity::Warning
        )]
    );
    assert_eq!(
        events[0].message,
        "gpu-2 GPU utilization 5 % < 20 % for 60 min"
    );
    let (events, s) = eval(&at(5), &[], 0.0, &s, T0 + 2 * H);
    assert_eq!(
        keys(&events),
        vec![(
            "gpu_util:gpu-2".into(),
            AlertStatus::Firing,
            Severity::Critical
        )]
    );
    // 15 %: under 20 % (since T0) but not under 10 %: back to a warning.
    let (events, s) = eval(&at(15), &[], 0.0, &s, T0 + 2 * H + S);
    assert_eq!(
        keys(&events),
        vec![(
            "gpu_util:gpu-2".into(),
            AlertStatus::Firing,
            Severity::Warning
        )]
    );
    assert!(s.idle_util_since_ms.is_empty());
    let (events, _) = eval(&at(20), &[], 0.0, &s, T0 + 2 * H + 2 * S);
    assert_eq!(
        keys(&events),
        vec![(
            "gpu_util:gpu-2".into(),
            AlertStatus::Resolved,
            Severity::Warning
        )]
    );
}

#[test]
fn cost_per_day_and_the_budget_cap() {
    let o = Observation::default();
    assert!(eval(&o, &[], 20.0, &AlertState::default(), T0).0.is_empty());
    let (events, s) = eval(&o, &[], 20.01, &AlertState::default(), T0);
    assert_eq!(
        keys(&events),
        vec![("cost_day".into(), AlertStatus::Firing, Severity::Warning)]
    );
    assert_eq!(events[0].message, "cost today $20.01 > $20.00");
    let (events, s) = eval(&o, &[], 30.5, &s, T0 + S);
    assert_eq!(
        keys(&events),
        vec![("cost_day".into(), AlertStatus::Firing, Severity::Critical)]
    );
    let (events, s) = eval(&o, &[], 50.0, &s, T0 + 2 * S);
    assert_eq!(
        keys(&events),
        vec![("budget_cap".into(), AlertStatus::Firing, Severity::Critical)]
    );
    // Midnight: spend starts over, both resolve.
    let (events, _) = eval(&o, &[], 0.0, &s, T0 + 3 * S);
    assert_eq!(
        keys(&events),
        vec![
            (
                "budget_cap".into(),
                AlertStatus::Resolved,
                Severity::Critical
            ),
            ("cost_day".into(), AlertStatus::Resolved, Severity::Critical),
        ]
    );
}

#[test]
fn webhook_bodies_suit_slack_and_discord() {
    let event = AlertEvent {
        key: "queue_depth".to_string(),
        status: AlertStatus::Firing,
        severity: Severity::Critical,
        message: "queue depth 41 > 30".to_string(),
        at_ms: T0,
    };
    let body = webhook_body(&event);
    assert_eq!(
        body,
        serde_json::json!({
            "text": "[kiln] CRITICAL queue_depth: queue depth 41 > 30",
            "content": "[kiln] CRITICAL queue_depth: queue depth 41 > 30",
        })
    );
    let resolved = AlertEvent {
        status: AlertStatus::Resolved,
        message: "resolved: queue depth 41 > 30".to_string(),
        ..event.clone()
    };
    assert_eq!(
        webhook_body(&resolved)["text"],
        "[kiln] RESOLVED queue_depth: resolved: queue depth 41 > 30"
    );
    // Discord refuses content over 2,000 characters; multi-byte text is cut on a character.
    let long = AlertEvent {
        message: "é".repeat(5000),
        ..event
    };
    let body = webhook_body(&long);
    assert_eq!(
        body["content"].as_str().expect("a string").chars().count(),
        2000
    );
    assert_eq!(body["text"], body["content"]);
}

#[test]
fn config_defaults_are_the_seed_table_and_validate_names_the_key() {
    let c = AlertConfig::default();
    c.validate().expect("valid");
    assert_eq!((c.queue_warn, c.queue_critical), (10, 30));
    assert_eq!((c.pro_wait_warn_s, c.pro_wait_critical_s), (30, 60));
    assert_eq!((c.cost_warn_usd, c.cost_critical_usd), (20.0, 30.0));
    let bad = AlertConfig {
        queue_critical: 5,
        ..AlertConfig::default()
    };
    assert!(
        bad.validate()
            .expect_err("must be refused")
            .to_string()
            .starts_with("alerts.queue_critical:")
    );
    let bad = AlertConfig {
        cost_warn_usd: f64::INFINITY,
        ..AlertConfig::default()
    };
    assert!(
        bad.validate()
            .expect_err("must be refused")
            .to_string()
            .starts_with("alerts.cost_warn_usd:")
    );
    let parsed: Result<AlertConfig, _> = toml::from_str("queue_warning = 3");
    assert!(
        parsed
            .expect_err("must be refused")
            .to_string()
            .contains("queue_warning")
    );
}
