//! The policy's rules, one test per rule, with explicit `now_ms` steps: the clock of a pure
//! function is its argument.

use std::collections::BTreeMap;

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::MemberState;
use proptest::prelude::*;

use super::*;
use crate::fleet::{HostRecord, HostState};
use crate::provider::ProviderKind;

const S: i64 = 1000;
const MIN: i64 = 60 * S;
const H: i64 = 60 * MIN;
/// A fixed "now" far from zero; every host below was rented ten hours before it.
const T0: i64 = 1_800_000_000_000;

fn host(name: &str, state: HostState) -> HostRecord {
    HostRecord {
        name: name.to_string(),
        provider: ProviderKind::Vast,
        provider_id: Some(format!("id-{name}")),
        state,
        state_since_ms: T0 - 10 * H,
        rented_at_ms: T0 - 10 * H,
        ready_at_ms: match state {
            HostState::Provisioning => None,
            _ => Some(T0 - 10 * H),
        },
        primary: false,
        spot: false,
        price_per_hour: 0.40,
        stopped_price_per_hour: 0.02,
    }
}

fn primary(name: &str) -> HostRecord {
    HostRecord {
        primary: true,
        rented_at_ms: T0 - 100 * H,
        ready_at_ms: Some(T0 - 100 * H),
        ..host(name, HostState::Hot)
    }
}

fn member(name: &str) -> MemberObs {
    MemberObs {
        name: name.to_string(),
        state: MemberState::Ready,
        running: 0,
        gpu_util_pct: Some(50),
        queue: BTreeMap::new(),
    }
}

fn queued(mut m: MemberObs, tier: Tier, n: u64, oldest_wait_s: u64) -> MemberObs {
    m.queue.insert(
        tier,
        QueueObs {
            queued: n,
            oldest_wait_s: Some(oldest_wait_s),
        },
    );
    m
}

fn obs(members: Vec<MemberObs>) -> Observation {
    Observation::new(members, Vec::new())
}

/// The defaults without the warm pool, so a test sees only the rule it is about.
fn cfg() -> PolicyConfig {
    PolicyConfig {
        warm_pool_size: 0,
        ..PolicyConfig::default()
    }
}

fn tick(
    o: &Observation,
    hosts: &[HostRecord],
    c: &PolicyConfig,
    s: &PolicyState,
    now: i64,
) -> Plan {
    plan(o, hosts, c, s, now, 0.0)
}

fn only(plan: &Plan) -> &Action {
    assert_eq!(plan.actions.len(), 1, "{:#?}", plan.actions);
    &plan.actions[0]
}

fn assert_none(plan: &Plan) {
    assert!(plan.actions.is_empty(), "{:#?}", plan.actions);
}

fn has_note(plan: &Plan, needle: &str) -> bool {
    plan.notes.iter().any(|n| n.contains(needle))
}

/// gpu-1 primary HOT, gpu-2 WARM.
fn standby_fleet() -> Vec<HostRecord> {
    vec![primary("gpu-1"), host("gpu-2", HostState::Warm)]
}

#[test]
fn queue_depth_over_10_resumes_the_warm_standby() {
    let hosts = standby_fleet();
    let at_10 = obs(vec![queued(member("gpu-1"), Tier::Free, 10, 5)]);
    assert_none(&tick(&at_10, &hosts, &cfg(), &PolicyState::default(), T0));
    let at_11 = obs(vec![queued(member("gpu-1"), Tier::Free, 11, 5)]);
    let plan = tick(&at_11, &hosts, &cfg(), &PolicyState::default(), T0);
    match only(&plan) {
        Action::Resume { host, reason, .. } => {
            assert_eq!(host, "gpu-2");
            assert!(reason.contains("queue depth 11 > 10"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(plan.state.last_scale_up_ms, Some(T0));
    assert_eq!(
        only(&plan).to_string(),
        "resume gpu-2: queue depth 11 > 10: resuming WARM standby gpu-2"
    );
}

#[test]
fn a_draining_host_is_left_to_the_executor_and_a_slow_drain_noted() {
    let mut draining = host("gpu-2", HostState::Draining);
    draining.state_since_ms = T0;
    let hosts = vec![primary("gpu-1"), draining];
    let o = obs(vec![member("gpu-1")]);
    let plan = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0 + 30 * MIN);
    assert_none(&plan);
    assert!(!has_note(&plan, "draining"), "{:?}", plan.notes);
    let plan = tick(
        &o,
        &hosts,
        &cfg(),
        &PolicyState::default(),
        T0 + 30 * MIN + 1,
    );
    assert_none(&plan);
    assert!(
        has_note(&plan, "gpu-2 draining for 30 min > 30 min"),
        "{:?}",
        plan.notes
    );
}

#[test]
fn paid_queue_over_30_with_all_hot_rents() {
    let hosts = vec![primary("gpu-1"), host("gpu-2", HostState::Hot)];
    let at_30 = obs(vec![
        queued(member("gpu-1"), Tier::Premium, 20, 5),
        queued(member("gpu-2"), Tier::Premium, 10, 5),
    ]);
    let plan = tick(&at_30, &hosts, &cfg(), &PolicyState::default(), T0);
    assert_none(&plan);
    assert!(has_note(&plan, "no WARM standby"), "{:?}", plan.notes);
    let at_31 = obs(vec![
        queued(member("gpu-1"), Tier::Premium, 21, 5),
        queued(member("gpu-2"), Tier::Premium, 10, 5),
    ]);
    let plan = tick(&at_31, &hosts, &cfg(), &PolicyState::default(), T0);
    match only(&plan) {
        Action::Rent {
            provider,
            spot,
            reason,
            decision_id,
        } => {
            assert_eq!(*provider, ProviderKind::Vast);
            assert!(!spot);
            assert!(reason.contains("paid queue depth 31 > 30"), "{reason}");
            assert_eq!(decision_id, "kiln-0");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn free_load_never_rents_cold_capacity() {
    let hosts = vec![primary("gpu-1")];
    let o = obs(vec![queued(member("gpu-1"), Tier::Free, 500, 3000)]);
    let plan = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    assert_none(&plan);
    assert!(has_note(&plan, "does not rent"), "{:?}", plan.notes);
    // It may wake a WARM standby, though.
    let plan = tick(&o, &standby_fleet(), &cfg(), &PolicyState::default(), T0);
    assert!(matches!(only(&plan), Action::Resume { host, .. } if host == "gpu-2"));
}

#[test]
fn pro_wait_over_30s_resumes_else_rents_now() {
    let at_30 = obs(vec![queued(member("gpu-1"), Tier::Pro, 1, 30)]);
    assert_none(&tick(
        &at_30,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
    ));
    let at_31 = obs(vec![queued(member("gpu-1"), Tier::Pro, 1, 31)]);
    let plan = tick(
        &at_31,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
    );
    match only(&plan) {
        Action::Resume { host, reason, .. } => {
            assert_eq!(host, "gpu-2");
            assert!(reason.contains("pro oldest wait 31 s > 30 s"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // No WARM standby: rent at once (one pro job is enough).
    let plan = tick(
        &at_31,
        &[primary("gpu-1")],
        &cfg(),
        &PolicyState::default(),
        T0,
    );
    assert!(
        matches!(only(&plan), Action::Rent { reason, .. } if reason.contains("pro oldest wait 31 s > 30 s"))
    );
    // Enterprise has the same target.
    let ent = obs(vec![queued(member("gpu-1"), Tier::Enterprise, 1, 41)]);
    let plan = tick(
        &ent,
        &[primary("gpu-1")],
        &cfg(),
        &PolicyState::default(),
        T0,
    );
    assert!(
        matches!(only(&plan), Action::Rent { reason, .. } if reason.contains("enterprise oldest wait 41 s"))
    );
}

#[test]
fn premium_wait_over_120s_resumes_the_standby_but_never_rents() {
    let at_120 = obs(vec![queued(member("gpu-1"), Tier::Premium, 2, 120)]);
    assert_none(&tick(
        &at_120,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
    ));
    let at_125 = obs(vec![queued(member("gpu-1"), Tier::Premium, 2, 125)]);
    let plan = tick(
        &at_125,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
    );
    assert!(
        matches!(only(&plan), Action::Resume { reason, .. } if reason.contains("premium oldest wait 125 s > 120 s"))
    );
    assert_none(&tick(
        &at_125,
        &[primary("gpu-1")],
        &cfg(),
        &PolicyState::default(),
        T0,
    ));
}

#[test]
fn scale_up_cooldown_counts_from_ready_at() {
    let mut hosts = standby_fleet();
    let mut fresh = host("gpu-3", HostState::Hot);
    fresh.rented_at_ms = T0 - 2 * H; // rented long ago, ready only now
    fresh.ready_at_ms = Some(T0);
    hosts.push(fresh);
    let o = obs(vec![
        queued(member("gpu-1"), Tier::Pro, 3, 45),
        member("gpu-3"),
    ]);
    let plan = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0 + 119 * S);
    assert_none(&plan);
    assert!(
        has_note(&plan, "scale-up cooldown (gpu-3 became ready 119 s ago"),
        "{:?}",
        plan.notes
    );
    let plan = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0 + 120 * S);
    assert!(matches!(only(&plan), Action::Resume { host, .. } if host == "gpu-2"));
}

#[test]
fn a_decision_is_not_reissued_while_pending_and_ids_are_unique() {
    let hosts = vec![primary("gpu-1")];
    let o = obs(vec![queued(member("gpu-1"), Tier::Pro, 2, 50)]);
    let first = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    let id = only(&first).decision_id().to_string();
    assert!(first.state.pending.contains_key(&id));
    // Same pressure a few ticks later, host not in the inventory yet: nothing new.
    let mut state = first.state.clone();
    for step in 1..=5 {
        let plan = tick(&o, &hosts, &cfg(), &state, T0 + step * 10 * S);
        assert_none(&plan);
        assert!(
            has_note(&plan, "capacity is already coming"),
            "{:?}",
            plan.notes
        );
        state = plan.state;
    }
    // The host appears (provisioning): the decision is done, and a provisioning host still
    // holds further rents.
    let mut with_new = hosts.clone();
    let mut new = host(&id, HostState::Provisioning);
    new.state_since_ms = T0 + MIN;
    with_new.push(new);
    let plan = tick(&o, &with_new, &cfg(), &state, T0 + 2 * MIN);
    assert_none(&plan);
    assert!(plan.state.pending.is_empty());
    // Ids skip names already used by hosts.
    let taken = vec![primary("kiln-0"), host("kiln-1", HostState::Released)];
    let o = obs(vec![queued(member("kiln-0"), Tier::Pro, 2, 50)]);
    let plan = tick(&o, &taken, &cfg(), &PolicyState::default(), T0);
    assert_eq!(only(&plan).decision_id(), "kiln-2");
}

#[test]
fn failed_rents_move_to_the_next_provider() {
    let hosts = vec![primary("gpu-1")];
    let o = obs(vec![queued(member("gpu-1"), Tier::Pro, 2, 50)]);
    let first = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    let id = only(&first).decision_id().to_string();
    // The executor reports the rent failed: vast is skipped, runpod is next.
    let mut state = first.state.clone();
    state.record_failure(&id, T0 + S);
    let plan = tick(&o, &hosts, &cfg(), &state, T0 + 2 * S);
    assert!(matches!(
        only(&plan),
        Action::Rent {
            provider: ProviderKind::Runpod,
            ..
        }
    ));
    assert_ne!(only(&plan).decision_id(), id);
    // A rent whose host never shows up times out the same way.
    let later = T0 + 601 * S;
    let plan = tick(&o, &hosts, &cfg(), &first.state, later);
    assert!(
        has_note(&plan, &format!("decision {id}")),
        "{:?}",
        plan.notes
    );
    assert_eq!(
        plan.state.rent_failed_ms.get(&ProviderKind::Vast),
        Some(&later)
    );
    assert!(matches!(
        only(&plan),
        Action::Rent {
            provider: ProviderKind::Runpod,
            ..
        }
    ));
    // After retry_after_s vast is tried again.
    let mut state = plan.state.clone();
    state.pending.clear();
    let plan = tick(&o, &hosts, &cfg(), &state, later + 900 * S);
    assert!(matches!(
        only(&plan),
        Action::Rent {
            provider: ProviderKind::Vast,
            ..
        }
    ));
}

/// gpu-1 primary, gpu-2 and gpu-3 HOT, all idle, every host ready long ago.
fn three_hot() -> Vec<HostRecord> {
    vec![
        primary("gpu-1"),
        host("gpu-2", HostState::Hot),
        host("gpu-3", HostState::Hot),
    ]
}

fn idle_three() -> Observation {
    obs(vec![
        queued(member("gpu-1"), Tier::Free, 2, 5),
        member("gpu-2"),
        member("gpu-3"),
    ])
}

#[test]
fn quiet_queue_for_30_min_drains_and_stops_one_non_primary() {
    let hosts = three_hot();
    let o = idle_three();
    let p0 = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    assert_none(&p0);
    assert_eq!(p0.state.quiet_since_ms, Some(T0));
    let p1 = tick(&o, &hosts, &cfg(), &p0.state, T0 + 30 * MIN - 1);
    assert_none(&p1);
    let p2 = tick(&o, &hosts, &cfg(), &p1.state, T0 + 30 * MIN);
    match only(&p2) {
        Action::DrainStop { host, reason, .. } => {
            // Equal prices: the one ready longest goes first (gpu-2 by name here).
            assert_eq!(host, "gpu-2");
            assert!(reason.contains("queue depth 2 < 3 for 30 min"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A queue of 3 at any tick restarts the quiet period.
    let busy = obs(vec![queued(member("gpu-1"), Tier::Free, 3, 5)]);
    let p = tick(&busy, &hosts, &cfg(), &p1.state, T0 + 20 * MIN);
    assert_eq!(p.state.quiet_since_ms, None);
    let p = tick(&o, &hosts, &cfg(), &p.state, T0 + 30 * MIN);
    assert_none(&p);
}

#[test]
fn the_most_expensive_host_goes_first_and_the_primary_never() {
    let mut hosts = three_hot();
    hosts[0].price_per_hour = 2.0; // the primary is the most expensive: still kept
    hosts[2].price_per_hour = 0.9;
    let state = PolicyState {
        quiet_since_ms: Some(T0 - H),
        ..PolicyState::default()
    };
    let plan = tick(&idle_three(), &hosts, &cfg(), &state, T0);
    assert!(
        matches!(only(&plan), Action::DrainStop { host, reason, .. } if host == "gpu-3" && reason.contains("$0.900/h"))
    );
    // A configured primary wins over the inventory flag.
    let c = PolicyConfig {
        primary: Some("gpu-3".to_string()),
        ..cfg()
    };
    let plan = tick(&idle_three(), &hosts, &c, &state, T0);
    assert_eq!(plan.primary.as_deref(), Some("gpu-3"));
    assert!(matches!(only(&plan), Action::DrainStop { host, .. } if host == "gpu-1"));
    // Only the primary left HOT: nothing is stopped.
    let alone = vec![primary("gpu-1")];
    let o = obs(vec![member("gpu-1")]);
    assert_none(&tick(&o, &alone, &cfg(), &state, T0));
}

#[test]
fn a_host_running_jobs_is_never_stopped() {
    let hosts = three_hot();
    let state = PolicyState {
        quiet_since_ms: Some(T0 - H),
        ..PolicyState::default()
    };
    let mut busy = member("gpu-2");
    busy.running = 1;
    busy.state = MemberState::Busy;
    let o = obs(vec![member("gpu-1"), busy.clone(), member("gpu-3")]);
    let plan = tick(&o, &hosts, &cfg(), &state, T0);
    assert!(matches!(only(&plan), Action::DrainStop { host, .. } if host == "gpu-3"));
    assert!(
        has_note(&plan, "gpu-2 runs 1 job(s), not stopped"),
        "{:?}",
        plan.notes
    );
    let mut busy3 = member("gpu-3");
    busy3.running = 2;
    let o = obs(vec![member("gpu-1"), busy, busy3]);
    assert_none(&tick(&o, &hosts, &cfg(), &state, T0));
}

#[test]
fn scale_down_cooldowns_count_from_ready_at_and_the_last_scale_down() {
    let mut hosts = three_hot();
    hosts.remove(2);
    hosts[1].ready_at_ms = Some(T0 - 20 * MIN);
    let state = PolicyState {
        quiet_since_ms: Some(T0 - 2 * H),
        ..PolicyState::default()
    };
    let o = obs(vec![member("gpu-1"), member("gpu-2")]);
    let plan = tick(&o, &hosts, &cfg(), &state, T0);
    assert_none(&plan);
    assert!(
        has_note(
            &plan,
            "gpu-2 became ready 20 min ago < scale-down cooldown 30 min"
        ),
        "{:?}",
        plan.notes
    );
    let plan = tick(&o, &hosts, &cfg(), &state, T0 + 10 * MIN);
    assert!(matches!(only(&plan), Action::DrainStop { host, .. } if host == "gpu-2"));
    // Scale-downs at least the cooldown apart.
    let recent = PolicyState {
        last_scale_down_ms: Some(T0 - 19 * MIN),
        ..state.clone()
    };
    let plan = tick(&o, &hosts, &cfg(), &recent, T0 + 10 * MIN);
    assert_none(&plan);
    assert!(
        has_note(&plan, "the last scale-down was"),
        "{:?}",
        plan.notes
    );
}

#[test]
fn lambda_hosts_are_released_instead_of_paused() {
    let mut hosts = three_hot();
    hosts.remove(2);
    hosts[1].provider = ProviderKind::Lambda;
    let state = PolicyState {
        quiet_since_ms: Some(T0 - H),
        ..PolicyState::default()
    };
    let o = obs(vec![member("gpu-1"), member("gpu-2")]);
    let plan = tick(&o, &hosts, &cfg(), &state, T0);
    assert!(
        matches!(only(&plan), Action::Release { host, reason, .. } if host == "gpu-2" && reason.contains("lambda hosts cannot be stopped"))
    );
}

#[test]
fn idle_gpus_for_2h_scale_down_and_under_20_pct_for_1h_is_noted() {
    let mut hosts = three_hot();
    hosts.remove(2);
    let mut low = member("gpu-2");
    low.gpu_util_pct = Some(5);
    // A queue of 5: not quiet, not enough to scale up.
    let o = obs(vec![queued(member("gpu-1"), Tier::Free, 5, 5), low.clone()]);
    let p0 = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    assert_none(&p0);
    assert_eq!(p0.state.idle_util_since_ms.get("gpu-2"), Some(&T0));
    let p1 = tick(&o, &hosts, &cfg(), &p0.state, T0 + H);
    assert_none(&p1);
    assert!(
        has_note(
            &p1,
            "gpu-2: GPU utilization 5 % < 20 % for 60 min (warning)"
        ),
        "{:?}",
        p1.notes
    );
    let p2 = tick(&o, &hosts, &cfg(), &p1.state, T0 + 2 * H - 1);
    assert_none(&p2);
    let p3 = tick(&o, &hosts, &cfg(), &p2.state, T0 + 2 * H);
    assert!(
        matches!(only(&p3), Action::DrainStop { host, reason, .. } if host == "gpu-2" && reason.contains("GPU utilization 5 % < 10 % for 2 h"))
    );
    // Exactly 10 % is not under 10 %.
    low.gpu_util_pct = Some(10);
    let o = obs(vec![queued(member("gpu-1"), Tier::Free, 5, 5), low]);
    let p = tick(&o, &hosts, &cfg(), &p2.state, T0 + 2 * H);
    assert_none(&p);
    assert!(!p.state.idle_util_since_ms.contains_key("gpu-2"));
}

#[test]
fn warm_hosts_are_released_after_24h_but_the_warm_pool_is_kept() {
    let mut hosts = vec![
        primary("gpu-1"),
        host("gpu-2", HostState::Warm),
        host("gpu-3", HostState::Warm),
    ];
    hosts[1].state_since_ms = T0 - 24 * H;
    hosts[2].state_since_ms = T0 - 24 * H - 1;
    let o = obs(vec![member("gpu-1")]);
    let pool1 = PolicyConfig {
        warm_pool_size: 1,
        ..cfg()
    };
    let plan = tick(&o, &hosts, &pool1, &PolicyState::default(), T0);
    assert!(
        matches!(only(&plan), Action::Release { host, reason, .. } if host == "gpu-3" && reason.contains("> 24 h"))
    );
    // With gpu-3 gone, gpu-2 stays past 24 h: it is the pool.
    hosts[2].state = HostState::Released;
    assert_none(&tick(
        &o,
        &hosts,
        &pool1,
        &PolicyState::default(),
        T0 + 48 * H,
    ));
    // Without a pool it goes, but only once strictly past 24 h.
    assert_none(&tick(&o, &hosts, &cfg(), &PolicyState::default(), T0));
    let plan = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0 + 1);
    assert!(matches!(only(&plan), Action::Release { host, .. } if host == "gpu-2"));
}

#[test]
fn the_warm_pool_is_refilled_by_renting_and_stopping_once_ready() {
    let c = PolicyConfig::default();
    assert_eq!(c.warm_pool_size, 1);
    let mut hosts = vec![primary("gpu-1")];
    let o = obs(vec![member("gpu-1")]);
    let p0 = tick(&o, &hosts, &c, &PolicyState::default(), T0);
    let id = match only(&p0) {
        Action::Rent {
            decision_id,
            reason,
            ..
        } => {
            assert!(reason.contains("warm pool 0 < 1"), "{reason}");
            decision_id.clone()
        }
        other => panic!("{other:?}"),
    };
    assert!(p0.state.warm_pool_fill.contains(&id));
    // Provisioning: nothing more.
    let mut new = host(&id, HostState::Provisioning);
    new.state_since_ms = T0;
    hosts.push(new);
    let p1 = tick(&o, &hosts, &c, &p0.state, T0 + 20 * MIN);
    assert_none(&p1);
    // Ready and idle: stopped at once, no cooldown, no quiet period needed.
    hosts[1].state = HostState::Hot;
    hosts[1].ready_at_ms = Some(T0 + 40 * MIN);
    let o = obs(vec![member("gpu-1"), member(&id)]);
    let p2 = tick(&o, &hosts, &c, &p1.state, T0 + 41 * MIN);
    assert!(
        matches!(only(&p2), Action::DrainStop { host, reason, .. } if *host == id && reason.contains("warm pool"))
    );
    assert_eq!(p2.state.last_scale_down_ms, None);
    // Stopped: the pool is full, nothing to do.
    hosts[1].state = HostState::Warm;
    let p3 = tick(
        &obs(vec![member("gpu-1")]),
        &hosts,
        &c,
        &p2.state,
        T0 + 50 * MIN,
    );
    assert_none(&p3);
    assert!(p3.state.warm_pool_fill.is_empty());
}

#[test]
fn max_fleet_is_never_exceeded() {
    let c = PolicyConfig {
        max_fleet: 2,
        ..cfg()
    };
    let hosts = vec![primary("gpu-1"), host("gpu-2", HostState::Hot)];
    let o = obs(vec![
        queued(member("gpu-1"), Tier::Pro, 40, 90),
        member("gpu-2"),
    ]);
    let plan = tick(&o, &hosts, &c, &PolicyState::default(), T0);
    assert_none(&plan);
    assert!(has_note(&plan, "max_fleet 2 reached"), "{:?}", plan.notes);
    // A WARM host is already in the fleet: resuming it is allowed.
    let hosts = vec![primary("gpu-1"), host("gpu-2", HostState::Warm)];
    let plan = tick(&o, &hosts, &c, &PolicyState::default(), T0);
    assert!(matches!(only(&plan), Action::Resume { .. }));
}

#[test]
fn past_the_budget_cap_only_pro_and_enterprise_add_capacity() {
    let spend = 50.0;
    let premium = obs(vec![queued(member("gpu-1"), Tier::Premium, 40, 500)]);
    let plan = plan(
        &premium,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
        spend,
    );
    assert_none(&plan);
    assert!(plan.budget_capped);
    assert!(
        has_note(
            &plan,
            "premium oldest wait 500 s > 120 s: held by the budget cap"
        ),
        "{:?}",
        plan.notes
    );
    assert!(
        has_note(&plan, "budget cap: spent $50.00 today"),
        "{:?}",
        plan.notes
    );
    let free = obs(vec![queued(member("gpu-1"), Tier::Free, 40, 50)]);
    assert_none(&super::plan(
        &free,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
        spend,
    ));
    let pro = obs(vec![
        queued(member("gpu-1"), Tier::Pro, 1, 41),
        queued(member("gpu-1"), Tier::Free, 40, 50),
    ]);
    let plan = super::plan(
        &pro,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
        spend,
    );
    assert!(
        matches!(only(&plan), Action::Resume { reason, .. } if reason.contains("pro oldest wait 41 s"))
    );
    let plan = super::plan(
        &pro,
        &[primary("gpu-1")],
        &cfg(),
        &PolicyState::default(),
        T0,
        spend,
    );
    assert!(matches!(only(&plan), Action::Rent { .. }));
    // The warm pool is not refilled past the cap.
    let quiet = obs(vec![member("gpu-1")]);
    let plan = super::plan(
        &quiet,
        &[primary("gpu-1")],
        &PolicyConfig::default(),
        &PolicyState::default(),
        T0,
        spend,
    );
    assert_none(&plan);
    assert!(
        has_note(&plan, "not refilled past the budget cap"),
        "{:?}",
        plan.notes
    );
    // Just under the cap everything is as usual.
    let plan = super::plan(
        &premium,
        &standby_fleet(),
        &cfg(),
        &PolicyState::default(),
        T0,
        49.99,
    );
    assert!(!plan.budget_capped);
    assert!(matches!(only(&plan), Action::Resume { .. }));
}

#[test]
fn failed_hosts_are_replaced_elsewhere_and_then_only_released() {
    let mut failed = host("gpu-2", HostState::Failed);
    failed.state_since_ms = T0 - 5 * MIN;
    let hosts = vec![primary("gpu-1"), failed];
    let o = obs(vec![member("gpu-1")]);
    let p0 = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    let id = match only(&p0) {
        Action::Replace {
            host,
            provider,
            reason,
            decision_id,
            ..
        } => {
            assert_eq!(host, "gpu-2");
            assert_eq!(
                *provider,
                ProviderKind::Runpod,
                "another provider than the failed host's"
            );
            assert!(reason.contains("host failed 5 min ago"), "{reason}");
            decision_id.clone()
        }
        other => panic!("{other:?}"),
    };
    // Not re-issued while pending.
    assert_none(&tick(&o, &hosts, &cfg(), &p0.state, T0 + MIN));
    // The replacement exists, the old host is still there: it is only released now.
    let mut with_new = hosts.clone();
    let mut new = host(&id, HostState::Provisioning);
    new.provider = ProviderKind::Runpod;
    new.state_since_ms = T0 + MIN;
    with_new.push(new);
    let p1 = tick(&o, &with_new, &cfg(), &p0.state, T0 + 2 * MIN);
    assert!(p1.state.replaced.contains("gpu-2"));
    assert!(
        matches!(only(&p1), Action::Release { host, reason, .. } if host == "gpu-2" && reason.contains("gpu-2 (failed) was replaced"))
    );
}

#[test]
fn a_preempted_spot_host_is_replaced_after_the_grace() {
    let mut spot = host("gpu-2", HostState::Hot);
    spot.spot = true;
    let hosts = vec![primary("gpu-1"), spot];
    let o = obs(vec![member("gpu-1")]);
    let p0 = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    assert_none(&p0);
    assert_eq!(p0.state.missing_since_ms.get("gpu-2"), Some(&T0));
    assert_none(&tick(&o, &hosts, &cfg(), &p0.state, T0 + 5 * MIN));
    let plan = tick(&o, &hosts, &cfg(), &p0.state, T0 + 5 * MIN + 1);
    assert!(
        matches!(only(&plan), Action::Replace { host, reason, .. } if host == "gpu-2" && reason.contains("spot host (preempted?) missing"))
    );
}

#[test]
fn a_replaced_host_that_comes_back_is_still_released() {
    let mut spot = host("gpu-2", HostState::Hot);
    spot.spot = true;
    let hosts = vec![primary("gpu-1"), spot];
    let gone = obs(vec![member("gpu-1")]);
    let p0 = tick(&gone, &hosts, &cfg(), &PolicyState::default(), T0);
    let p1 = tick(&gone, &hosts, &cfg(), &p0.state, T0 + 6 * MIN);
    let id = only(&p1).decision_id().to_string();
    assert_eq!(
        fleet_size(&hosts, &p1.state),
        2,
        "the replacement takes the old host's place"
    );
    // The replacement is rented, and the old host reappears in the view.
    let mut with_new = hosts.clone();
    let mut new = host(&id, HostState::Provisioning);
    new.state_since_ms = T0 + 6 * MIN;
    with_new.push(new);
    let back = obs(vec![member("gpu-1"), member("gpu-2")]);
    let p2 = tick(&back, &with_new, &cfg(), &p1.state, T0 + 7 * MIN);
    assert!(
        matches!(only(&p2), Action::Release { host, reason, .. } if host == "gpu-2" && reason.contains("gpu-2 (hot) was replaced"))
    );
    assert_eq!(fleet_size(&with_new, &p2.state), 2);
}

#[test]
fn unhealthy_and_stuck_hosts_are_replaced_past_their_deadlines() {
    let hosts = vec![primary("gpu-1"), host("gpu-2", HostState::Hot)];
    let mut sick = member("gpu-2");
    sick.state = MemberState::Unhealthy;
    let o = obs(vec![member("gpu-1"), sick]);
    let p0 = tick(&o, &hosts, &cfg(), &PolicyState::default(), T0);
    assert_none(&p0);
    assert_none(&tick(&o, &hosts, &cfg(), &p0.state, T0 + 10 * MIN));
    let plan = tick(&o, &hosts, &cfg(), &p0.state, T0 + 10 * MIN + 1);
    assert!(
        matches!(only(&plan), Action::Replace { host, reason, .. } if host == "gpu-2" && reason.contains("unhealthy for 10 min"))
    );

    // A resume that does not come back within resume_timeout_s (10 min).
    let mut resuming = host("gpu-2", HostState::Provisioning);
    resuming.ready_at_ms = Some(T0 - 5 * H);
    resuming.state_since_ms = T0;
    let hosts = vec![primary("gpu-1"), resuming];
    let o = obs(vec![member("gpu-1")]);
    assert_none(&tick(
        &o,
        &hosts,
        &cfg(),
        &PolicyState::default(),
        T0 + 10 * MIN,
    ));
    let plan = tick(
        &o,
        &hosts,
        &cfg(),
        &PolicyState::default(),
        T0 + 10 * MIN + 1,
    );
    assert!(
        matches!(only(&plan), Action::Replace { reason, .. } if reason.contains("resume not ready after"))
    );
    // A fresh rent gets 90 min.
    let mut renting = host("gpu-2", HostState::Provisioning);
    renting.state_since_ms = T0;
    let hosts = vec![primary("gpu-1"), renting];
    assert_none(&tick(
        &o,
        &hosts,
        &cfg(),
        &PolicyState::default(),
        T0 + 90 * MIN,
    ));
    let plan = tick(
        &o,
        &hosts,
        &cfg(),
        &PolicyState::default(),
        T0 + 90 * MIN + 1,
    );
    assert!(
        matches!(only(&plan), Action::Replace { reason, .. } if reason.contains("rented host not ready after"))
    );
}

#[test]
fn the_primary_is_always_brought_back_to_hot() {
    let o = obs(vec![]);
    // Nothing at all: rent, even past the budget cap.
    let plan = plan(&o, &[], &cfg(), &PolicyState::default(), T0, 1000.0);
    assert!(matches!(only(&plan), Action::Rent { reason, .. } if reason.contains("no HOT host")));
    assert_eq!(plan.primary, None);
    // A WARM host: resume it.
    let warm = vec![host("gpu-2", HostState::Warm)];
    let plan = tick(&o, &warm, &cfg(), &PolicyState::default(), T0);
    assert!(
        matches!(only(&plan), Action::Resume { host, reason, .. } if host == "gpu-2" && reason.contains("no HOT host"))
    );
    // The designated primary is WARM while another host is HOT: resume it; the HOT one acts as
    // primary meanwhile.
    let mut p = primary("gpu-1");
    p.state = HostState::Warm;
    let hosts = vec![p, host("gpu-2", HostState::Hot)];
    let plan = tick(
        &obs(vec![member("gpu-2")]),
        &hosts,
        &cfg(),
        &PolicyState::default(),
        T0,
    );
    assert!(matches!(only(&plan), Action::Resume { host, .. } if host == "gpu-1"));
    assert_eq!(plan.primary.as_deref(), Some("gpu-2"));
    // No designated primary: the oldest HOT host.
    let mut a = host("gpu-a", HostState::Hot);
    a.ready_at_ms = Some(T0 - H);
    let mut b = host("gpu-b", HostState::Hot);
    b.ready_at_ms = Some(T0 - 2 * H);
    let plan = tick(
        &obs(vec![member("gpu-a"), member("gpu-b")]),
        &[a, b],
        &cfg(),
        &PolicyState::default(),
        T0,
    );
    assert_eq!(plan.primary.as_deref(), Some("gpu-b"));
}

#[test]
fn nothing_is_scaled_down_while_load_asks_for_capacity() {
    let hosts = three_hot();
    let state = PolicyState {
        quiet_since_ms: Some(T0 - H),
        idle_util_since_ms: [("gpu-3".to_string(), T0 - 3 * H)].into_iter().collect(),
        ..PolicyState::default()
    };
    let mut idle = member("gpu-3");
    idle.gpu_util_pct = Some(0);
    let o = obs(vec![
        queued(member("gpu-1"), Tier::Pro, 40, 80),
        member("gpu-2"),
        idle,
    ]);
    let c = PolicyConfig {
        max_fleet: 3,
        ..cfg()
    };
    let plan = tick(&o, &hosts, &c, &state, T0);
    assert!(
        plan.actions
            .iter()
            .all(|a| !matches!(a, Action::DrainStop { .. } | Action::Release { .. }))
    );
}

#[test]
fn plans_and_state_round_trip_through_json() {
    let hosts = vec![primary("gpu-1")];
    let o = obs(vec![queued(member("gpu-1"), Tier::Pro, 2, 50)]);
    let plan = tick(
        &o,
        &hosts,
        &PolicyConfig::default(),
        &PolicyState::default(),
        T0,
    );
    let json = serde_json::to_string(&plan).expect("test value");
    let back: Plan = serde_json::from_str(&json).expect("test value");
    assert_eq!(back, plan);
    let value = serde_json::to_value(&plan.actions[0]).expect("test value");
    assert_eq!(value["action"], "rent");
    assert_eq!(value["provider"], "vast");
}

// ---------------------------------------------------------------------------------------------
// Invariants over random fleets.

/// Every state, HOT most often (the states scale-down works on).
fn arb_state() -> impl Strategy<Value = HostState> {
    prop_oneof![
        4 => Just(HostState::Hot),
        1 => prop::sample::select(HostState::ALL.to_vec()),
    ]
}

fn arb_provider() -> impl Strategy<Value = ProviderKind> {
    prop::sample::select(ProviderKind::ALL.to_vec())
}

prop_compose! {
    fn arb_host(index: usize)(
        state in arb_state(),
        provider in arb_provider(),
        since in 0i64..(48 * H),
        ready in prop::option::of(0i64..(48 * H)),
        primary in prop::bool::weighted(0.2),
        spot in any::<bool>(),
        price in 0.1f64..3.0,
    ) -> HostRecord {
        HostRecord {
            name: format!("gpu-{index}"),
            provider,
            provider_id: Some(format!("p{index}")),
            state,
            state_since_ms: T0 - since,
            rented_at_ms: T0 - 48 * H,
            ready_at_ms: ready.map(|r| T0 - r),
            primary,
            spot,
            price_per_hour: price,
            stopped_price_per_hour: 0.01,
        }
    }
}

fn arb_hosts() -> impl Strategy<Value = Vec<HostRecord>> {
    (0usize..7).prop_flat_map(|n| (0..n).map(arb_host).collect::<Vec<_>>())
}

prop_compose! {
    fn arb_member()(
        present in prop::bool::weighted(0.9),
        state in prop_oneof![
            3 => Just(MemberState::Ready),
            1 => prop::sample::select(MemberState::ALL.to_vec()),
        ],
        running in prop_oneof![3 => Just(0u32), 1 => 1u32..3],
        util in prop::option::of(0u32..=100),
        // Mostly short queues, so that scale-down rules get their turn too.
        free in prop_oneof![3 => 0u64..3, 1 => 0u64..40], free_wait in 0u64..600,
        pro in prop_oneof![3 => Just(0u64), 1 => 1u64..10], pro_wait in 0u64..120,
    ) -> Option<MemberObs> {
        let mut obs = MemberObs {
            name: String::new(), // named after its host by `observe`
            state,
            running,
            gpu_util_pct: util,
            queue: BTreeMap::new(),
        };
        if free > 0 {
            obs = queued(obs, Tier::Free, free, free_wait);
        }
        if pro > 0 {
            obs = queued(obs, Tier::Pro, pro, pro_wait);
        }
        present.then_some(obs)
    }
}

/// The members of the HOT and draining hosts that have one.
fn observe(hosts: &[HostRecord], members: &[Option<MemberObs>]) -> Observation {
    let mut out = Vec::new();
    for (host, m) in hosts.iter().zip(members) {
        let Some(m) = m else { continue };
        if matches!(host.state, HostState::Hot | HostState::Draining) {
            out.push(MemberObs {
                name: host.name.clone(),
                ..m.clone()
            });
        }
    }
    Observation::new(out, Vec::new())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plans_keep_the_invariants(
        hosts in arb_hosts(),
        members in prop::collection::vec(arb_member(), 7),
        max_fleet in 1u32..6,
        warm_pool in 0u32..2,
        designate in prop::option::of(0usize..7),
        spend in 0.0f64..80.0,
        steps in prop::collection::vec(0i64..(3 * H), 1..6),
    ) {
        let config = PolicyConfig {
            max_fleet: max_fleet.max(warm_pool + 1),
            warm_pool_size: warm_pool,
            primary: designate.map(|i| format!("gpu-{i}")),
            ..PolicyConfig::default()
        };
        prop_assert!(config.validate().is_ok());
        let o = observe(&hosts, &members);
        let mut state = PolicyState::default();
        let mut now = T0;
        for step in steps {
            now += step;
            let before = fleet_size(&hosts, &state);
            let plan = plan(&o, &hosts, &config, &state, now, spend);
            let mut touched = std::collections::BTreeSet::new();
            for action in &plan.actions {
                // Ids are fresh: never one already pending, never twice in a plan.
                prop_assert!(!state.pending.contains_key(action.decision_id()), "{action:?}");
                prop_assert!(touched.insert(action.decision_id().to_string()));
                if let Some(name) = action.host() {
                    // One decision per host at a time: any earlier one for this host is done
                    // or timed out.
                    let others = plan
                        .state
                        .pending
                        .iter()
                        .filter(|(id, p)| p.host.as_deref() == Some(name) && id.as_str() != action.decision_id())
                        .count();
                    prop_assert_eq!(others, 0, "{:?}", action);
                    prop_assert!(touched.insert(format!("host:{name}")), "two actions for {name}");
                    // The primary is never stopped, released or replaced.
                    prop_assert_ne!(Some(name), plan.primary.as_deref(), "{:?}", action);
                }
                if let Action::DrainStop { host, .. } = action {
                    let record = hosts.iter().find(|h| &h.name == host);
                    prop_assert_eq!(record.map(|h| h.state), Some(HostState::Hot));
                    prop_assert!(o.member(host).is_some_and(|m| m.running == 0));
                }
            }
            if let Some(primary) = &plan.primary {
                let record = hosts.iter().find(|h| &h.name == primary);
                prop_assert_eq!(record.map(|h| h.state), Some(HostState::Hot));
            }
            let rents = plan.actions.iter().filter(|a| matches!(a, Action::Rent { .. })).count();
            let after = fleet_size(&hosts, &plan.state);
            if rents > 0 {
                prop_assert!(after <= config.max_fleet, "fleet {after} > max {}", config.max_fleet);
            } else {
                prop_assert!(after <= before.max(config.max_fleet));
            }
            state = plan.state;
        }
    }
}
