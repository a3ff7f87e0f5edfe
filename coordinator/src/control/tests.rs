//! The executor against an in-memory provider and node double, a temp inventory and a clock the
//! test steps.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use async_trait::async_trait;
use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::MemberState;

use super::*;
use crate::inventory::{NewHost, Pricing};
use crate::policy::{MemberObs, QueueObs};
use crate::provider::{
    Address, Host, HostStatus, Offer, OfferQuery, ProviderError, ProviderResult, RentRequest,
};

/// A provider over memory: hosts by id, every call counted, and a switch that fails them all.
struct MemProvider {
    fail: bool,
    calls: AtomicU32,
    rents: AtomicU32,
    stops: AtomicU32,
    hosts: Mutex<BTreeMap<String, Host>>,
}

impl MemProvider {
    fn new(fail: bool) -> MemProvider {
        MemProvider {
            fail,
            calls: AtomicU32::new(0),
            rents: AtomicU32::new(0),
            stops: AtomicU32::new(0),
            hosts: Mutex::new(BTreeMap::new()),
        }
    }

    fn call(&self) -> ProviderResult<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(ProviderError::Transient {
                provider: ProviderKind::Vast,
                message: "503 service unavailable".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for MemProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Vast
    }
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        self.call()?;
        Ok(vec![Offer {
            provider: ProviderKind::Vast,
            offer_id: "ask-1".into(),
            gpu_name: query.gpu.clone(),
            num_gpus: 1,
            price_per_hour: 0.4,
            storage_per_gb_month: Some(0.1),
            reliability: Some(0.99),
            location: None,
            spot: query.spot,
        }])
    }
    async fn rent(&self, request: &RentRequest) -> ProviderResult<Host> {
        self.call()?;
        self.rents.fetch_add(1, Ordering::SeqCst);
        let mut hosts = self.hosts.lock().expect("lock");
        let id = format!("{}", 100 + hosts.len());
        let host = Host {
            provider: ProviderKind::Vast,
            id: id.clone(),
            label: Some(request.label.clone()),
            status: HostStatus::Starting,
            provider_status: "loading".into(),
            gpus: 1,
            price_per_hour: Some(0.4),
            spot: false,
            address: Address::default(),
        };
        hosts.insert(id, host.clone());
        Ok(host)
    }
    async fn list(&self) -> ProviderResult<Vec<Host>> {
        self.call()?;
        Ok(self.hosts.lock().expect("lock").values().cloned().collect())
    }
    async fn get(&self, id: &str) -> ProviderResult<Host> {
        self.call()?;
        self.hosts
            .lock()
            .expect("lock")
            .get(id)
            .cloned()
            .ok_or(ProviderError::NotFound {
                provider: ProviderKind::Vast,
                what: id.into(),
            })
    }
    async fn stop(&self, _: &str) -> ProviderResult<()> {
        self.call()?;
        self.stops.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn start(&self, _: &str) -> ProviderResult<()> {
        self.call()
    }
    async fn destroy(&self, _: &str) -> ProviderResult<()> {
        self.call()
    }
}

/// A provider shared between the controller and the test's assertions.
struct Shared(std::sync::Arc<MemProvider>);

#[async_trait]
impl Provider for Shared {
    fn kind(&self) -> ProviderKind {
        self.0.kind()
    }
    async fn offers(&self, q: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        self.0.offers(q).await
    }
    async fn rent(&self, r: &RentRequest) -> ProviderResult<Host> {
        self.0.rent(r).await
    }
    async fn list(&self) -> ProviderResult<Vec<Host>> {
        self.0.list().await
    }
    async fn get(&self, id: &str) -> ProviderResult<Host> {
        self.0.get(id).await
    }
    async fn stop(&self, id: &str) -> ProviderResult<()> {
        self.0.stop(id).await
    }
    async fn start(&self, id: &str) -> ProviderResult<()> {
        self.0.start(id).await
    }
    async fn destroy(&self, id: &str) -> ProviderResult<()> {
        self.0.destroy(id).await
    }
}

/// Records the drains asked for.
#[derive(Default)]
struct Nodes {
    drained: Mutex<Vec<String>>,
}

struct SharedNodes(std::sync::Arc<Nodes>);

#[async_trait]
impl NodeAdmin for SharedNodes {
    async fn drain(&self, api_url: &str) -> anyhow::Result<()> {
        self.0.drained.lock().expect("lock").push(api_url.into());
        Ok(())
    }
}

const CONFIG: &str = r#"
[providers.vast]
gpu = "RTX 4090"
max_price_per_hour = 0.6

[policy]
tick_s = 10
warm_pool_size = 0
quiet_for_s = 60
scale_down_cooldown_s = 60
scale_up_cooldown_s = 10
[policy.rent]
providers = ["vast"]
"#;

struct Rig {
    _dir: tempfile::TempDir,
    inventory: Inventory,
    provider: std::sync::Arc<MemProvider>,
    nodes: std::sync::Arc<Nodes>,
    controller: Controller,
    now: std::sync::Arc<AtomicI64>,
}

const T0: i64 = 1_800_000_000_000;

fn rig(fail: bool) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut inventory = Inventory::open(&dir.path().join("inv.db")).expect("open");
    let pricing = Pricing {
        price_per_hour: 0.4,
        stopped_price_per_hour: 0.0,
        disk_gb: 50,
        storage_per_gb_month: Some(0.1),
    };
    inventory
        .add_host(
            &NewHost {
                name: "primary".into(),
                provider: ProviderKind::Vast,
                spot: false,
                primary: true,
                pricing,
            },
            T0 - 3_600_000,
            "test",
        )
        .expect("add");
    inventory
        .set_rented("primary", "1", &Address::default())
        .expect("rented");
    inventory
        .set_state("primary", HostState::Hot, T0 - 3_600_000, "ready")
        .expect("hot");
    let provider = std::sync::Arc::new(MemProvider::new(fail));
    let nodes = std::sync::Arc::new(Nodes::default());
    let config = KilnConfig::parse(CONFIG).expect("config");
    let controller = Controller::new(
        config,
        vec![Box::new(Shared(provider.clone()))],
        Box::new(SharedNodes(nodes.clone())),
    );
    Rig {
        _dir: dir,
        inventory,
        provider,
        nodes,
        controller,
        now: std::sync::Arc::new(AtomicI64::new(T0)),
    }
}

fn member(name: &str, state: MemberState, running: u32, pro_queued: u64) -> MemberObs {
    let mut queue = BTreeMap::new();
    queue.insert(
        Tier::Pro,
        QueueObs {
            queued: pro_queued,
            oldest_wait_s: (pro_queued > 0).then_some(5),
        },
    );
    MemberObs {
        name: name.into(),
        state,
        running,
        gpu_util_pct: Some(if running > 0 { 95 } else { 0 }),
        queue,
    }
}

fn seen(members: Vec<MemberObs>) -> Seen {
    let ready = members
        .iter()
        .filter(|m| matches!(m.state, MemberState::Ready | MemberState::Busy))
        .map(|m| m.name.clone())
        .collect();
    let api_urls = members
        .iter()
        .map(|m| (m.name.clone(), format!("http://{}.test:7860", m.name)))
        .collect();
    Seen {
        observation: Observation::new(members, Vec::new()),
        ready,
        api_urls,
    }
}

impl Rig {
    async fn tick(&mut self, seen: &Seen) -> TickReport {
        let now = self.now.clone();
        let clock = move || now.load(Ordering::SeqCst);
        self.controller
            .tick(&mut self.inventory, Some(seen), None, &clock)
            .await
            .expect("the tick does not fail")
    }

    fn advance_s(&self, s: i64) {
        self.now.fetch_add(s * 1000, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_burst_rents_once_and_repeated_ticks_do_not_rent_again() {
    let mut rig = rig(false);
    let busy = seen(vec![member("primary", MemberState::Busy, 1, 60)]);
    let first = rig.tick(&busy).await;
    let rents: Vec<&Executed> = first
        .executed
        .iter()
        .filter(|e| e.action.starts_with("rent"))
        .collect();
    assert_eq!(rents.len(), 1, "one rent for the burst: {first:?}");
    assert_eq!(rents[0].outcome, "ok");
    let name = rents[0].decision_id.clone();
    assert_eq!(
        rig.inventory.require(&name).expect("rented").record.state,
        HostState::Provisioning
    );
    // The queue stays deep while the new host boots: the same tick, again and again.
    for _ in 0..5 {
        rig.advance_s(10);
        rig.tick(&busy).await;
    }
    assert_eq!(rig.provider.rents.load(Ordering::SeqCst), 1);
    let logged: Vec<_> = rig
        .inventory
        .actions(100)
        .expect("actions")
        .into_iter()
        .filter(|a| a.action == "rent")
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].host.as_deref(), Some(name.as_str()));
    assert_eq!(logged[0].outcome, "ok");
    assert!(logged[0].reason.contains("queue"), "{}", logged[0].reason);
}

#[tokio::test]
async fn one_decision_id_is_executed_once_even_after_a_lost_state() {
    let mut rig = rig(false);
    let action = Action::Rent {
        decision_id: "kiln-7".into(),
        provider: ProviderKind::Vast,
        spot: false,
        reason: "test".into(),
    };
    let now = rig.now.clone();
    let clock = move || now.load(Ordering::SeqCst);
    let view = seen(vec![member("primary", MemberState::Ready, 0, 0)]);
    let mut control = ControlState::default();
    let first = rig
        .controller
        .execute(&mut rig.inventory, &mut control, &view, &action, &clock)
        .await
        .expect("executes");
    assert_eq!(first, "ok");
    let again = rig
        .controller
        .execute(&mut rig.inventory, &mut control, &view, &action, &clock)
        .await
        .expect("executes");
    assert!(again.starts_with("skipped"), "{again}");
    // A restart that lost the executor's memory: the inventory still has the host by name.
    let mut fresh = ControlState::default();
    let after_restart = rig
        .controller
        .execute(&mut rig.inventory, &mut fresh, &view, &action, &clock)
        .await
        .expect("executes");
    assert!(
        after_restart.contains("already in the inventory"),
        "{after_restart}"
    );
    assert_eq!(rig.provider.rents.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failing_provider_backs_off_records_failures_and_alerts() {
    let mut rig = rig(true);
    let busy = seen(vec![member("primary", MemberState::Busy, 1, 60)]);
    let ticks = 360; // an hour of 10 s ticks
    let mut fired = Vec::new();
    for _ in 0..ticks {
        let report = rig.tick(&busy).await;
        fired.extend(
            report
                .events
                .into_iter()
                .filter(|e| e.key == "failing:rent:vast" && e.status == AlertStatus::Firing),
        );
        rig.advance_s(10);
    }
    let calls = rig.provider.calls.load(Ordering::SeqCst);
    // The policy skips a failed provider for retry_after_s (15 min) and the executor backs off:
    // a handful of attempts in an hour, not one per tick.
    assert!(
        (ALERT_AFTER_FAILURES..=8).contains(&calls),
        "{calls} provider calls in {ticks} ticks"
    );
    let failures: Vec<_> = rig
        .inventory
        .actions(1000)
        .expect("actions")
        .into_iter()
        .filter(|a| a.action == "rent")
        .collect();
    assert_eq!(failures.len() as u32, calls, "every attempt is logged");
    assert!(failures.iter().all(|a| a.outcome.starts_with("error:")));
    let state: ControlState = load_state(&rig.inventory, CONTROL_STATE_KEY).expect("state");
    let backoff = state.backoff.get("rent:vast").expect("backing off");
    assert_eq!(backoff.failures, calls);
    assert!(backoff.last_error.contains("503"), "{}", backoff.last_error);
    assert_eq!(fired.len(), 1, "the alert fires once: {fired:?}");
    assert!(
        active_alerts(&rig.inventory)
            .expect("alerts")
            .contains_key("failing:rent:vast")
    );
    assert!(
        rig.inventory
            .hosts()
            .expect("hosts")
            .iter()
            .all(|h| { h.record.name == "primary" || h.record.state != HostState::Hot })
    );
}

#[tokio::test]
async fn a_quiet_extra_host_is_drained_then_stopped_and_the_primary_kept() {
    let mut rig = rig(false);
    // Burst: a second host is rented, boots and joins.
    let busy = seen(vec![member("primary", MemberState::Busy, 1, 60)]);
    let report = rig.tick(&busy).await;
    let extra = report
        .executed
        .iter()
        .find(|e| e.action.starts_with("rent"))
        .expect("a rent")
        .decision_id
        .clone();
    rig.advance_s(10);
    let both_busy = seen(vec![
        member("primary", MemberState::Busy, 1, 5),
        member(&extra, MemberState::Busy, 1, 0),
    ]);
    let report = rig.tick(&both_busy).await;
    assert_eq!(report.ready, vec![extra.clone()]);
    // The queue drains and stays quiet past quiet_for_s and the cooldown.
    let quiet = seen(vec![
        member("primary", MemberState::Ready, 0, 0),
        member(&extra, MemberState::Ready, 0, 0),
    ]);
    let mut drained_at = None;
    for i in 0..60 {
        rig.advance_s(10);
        rig.tick(&quiet).await;
        if rig.inventory.require(&extra).expect("host").record.state != HostState::Hot {
            drained_at = Some(i);
            break;
        }
    }
    assert!(drained_at.is_some(), "the extra host is drained in time");
    assert_eq!(
        *rig.nodes.drained.lock().expect("lock"),
        vec![format!("http://{extra}.test:7860")]
    );
    // Draining and idle in the view: the next tick stops it.
    rig.advance_s(10);
    let draining = seen(vec![
        member("primary", MemberState::Ready, 0, 0),
        member(&extra, MemberState::Draining, 0, 0),
    ]);
    rig.tick(&draining).await;
    assert_eq!(
        rig.inventory.require(&extra).expect("host").record.state,
        HostState::Warm
    );
    assert_eq!(rig.provider.stops.load(Ordering::SeqCst), 1);
    assert_eq!(
        rig.inventory.require("primary").expect("host").record.state,
        HostState::Hot
    );
    let kinds: Vec<String> = rig
        .inventory
        .actions(100)
        .expect("actions")
        .into_iter()
        .map(|a| format!("{} {}", a.action, a.host.unwrap_or_default()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            format!("rent {extra}"),
            format!("drain {extra}"),
            format!("pause {extra}")
        ]
    );
}

#[tokio::test]
async fn without_a_view_nothing_is_planned_and_an_alert_fires() {
    let mut rig = rig(false);
    let now = rig.now.clone();
    let clock = move || now.load(Ordering::SeqCst);
    let report = rig
        .controller
        .tick(&mut rig.inventory, None, Some("connection refused"), &clock)
        .await
        .expect("tick");
    assert!(report.executed.is_empty());
    assert_eq!(report.events.len(), 1);
    assert_eq!(report.events[0].key, "cluster_view");
    // The view comes back: the alert resolves.
    let report = rig
        .tick(&seen(vec![member("primary", MemberState::Ready, 0, 0)]))
        .await;
    assert!(
        report
            .events
            .iter()
            .any(|e| e.key == "cluster_view" && e.status == AlertStatus::Resolved)
    );
    assert_eq!(rig.provider.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let rig = rig(false);
    let busy = seen(vec![member("primary", MemberState::Busy, 1, 60)]);
    let plan = rig
        .controller
        .dry_run(&rig.inventory, &busy, T0)
        .expect("plan");
    assert!(
        plan.actions
            .iter()
            .any(|a| matches!(a, Action::Rent { .. }))
    );
    assert_eq!(rig.provider.calls.load(Ordering::SeqCst), 0);
    assert!(rig.inventory.actions(10).expect("actions").is_empty());
    assert_eq!(rig.inventory.value(POLICY_STATE_KEY).expect("kv"), None);
}

#[tokio::test]
async fn metrics_count_hosts_cost_actions_and_alerts_and_are_served() {
    let mut rig = rig(true);
    let busy = seen(vec![member("primary", MemberState::Busy, 1, 60)]);
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    for _ in 0..4 {
        let report = rig.tick(&busy).await;
        metrics.observe(&rig.inventory, &report).expect("observe");
        rig.advance_s(1000);
    }
    let addr = metrics
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert!(
        text.contains("kiln_coordinator_hosts{state=\"hot\"} 1"),
        "{text}"
    );
    // GPU $0.40/h plus 50 GB of disk at $0.10 per GB-month.
    assert!(
        text.contains("kiln_coordinator_cost_per_hour_usd 0.406"),
        "{text}"
    );
    assert!(
        text.contains("kiln_coordinator_actions_total{kind=\"rent\",outcome=\"error\"}"),
        "{text}"
    );
    assert!(
        // The queue (60 > 30) and the failing provider.
        text.contains("kiln_coordinator_alerts_active{severity=\"critical\"} 2"),
        "{text}"
    );
}
