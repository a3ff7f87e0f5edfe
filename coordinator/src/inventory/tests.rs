use std::sync::Mutex;

use async_trait::async_trait;

use super::*;
use crate::provider::{
    Host, HostStatus, OfferQuery, Provider, ProviderError, ProviderResult, RentRequest,
};

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn open_temp() -> (tempfile::TempDir, Inventory) {
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = Inventory::open(&dir.path().join("sub").join("inv.db")).expect("open");
    (dir, inventory)
}

fn new_host(name: &str, provider: ProviderKind, pricing: Pricing) -> NewHost {
    NewHost {
        name: name.into(),
        provider,
        spot: false,
        primary: false,
        pricing,
    }
}

fn pricing(price: f64, stopped: f64, disk_gb: u32, storage: Option<f64>) -> Pricing {
    Pricing {
        price_per_hour: price,
        stopped_price_per_hour: stopped,
        disk_gb,
        storage_per_gb_month: storage,
    }
}

#[test]
fn a_new_file_is_migrated_and_reopens_with_its_data() {
    let (dir, mut inventory) = open_temp();
    assert_eq!(
        inventory.schema_version().expect("version"),
        schema::current_version()
    );
    inventory
        .add_host(
            &new_host("gpu-1", ProviderKind::Local, pricing(0.4, 0.0, 0, None)),
            1_000,
            "test",
        )
        .expect("add");
    let path = inventory.path().to_path_buf();
    drop(inventory);
    let reopened = Inventory::open(&path).expect("reopen");
    let host = reopened.require("gpu-1").expect("kept");
    assert_eq!(host.record.state, HostState::Provisioning);
    assert_eq!(host.record.rented_at_ms, 1_000);
    drop(reopened);

    // A file from a newer kiln is refused, not guessed at.
    let conn = Connection::open(&path).expect("raw open");
    conn.execute_batch("PRAGMA user_version = 99")
        .expect("bump");
    drop(conn);
    let err = Inventory::open(&path).expect_err("too new");
    assert!(
        matches!(err, InventoryError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );

    // A file that is not a database names the file.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 4096]).expect("write");
    let err = Inventory::open(&junk).expect_err("not a database");
    assert!(err.to_string().contains("junk.db"), "{err}");
}

#[test]
fn state_changes_are_recorded_in_the_history() {
    let (_dir, mut inventory) = open_temp();
    inventory
        .add_host(
            &new_host("gpu-1", ProviderKind::Runpod, pricing(0.69, 0.0, 50, None)),
            0,
            "kiln rent",
        )
        .expect("add");
    assert!(
        inventory
            .set_state("gpu-1", HostState::Hot, 10 * MIN, "ready")
            .expect("hot")
    );
    assert!(
        !inventory
            .set_state("gpu-1", HostState::Hot, 11 * MIN, "again")
            .expect("same")
    );
    assert!(
        inventory
            .set_state("gpu-1", HostState::Warm, 20 * MIN, "idle")
            .expect("warm")
    );
    assert!(
        inventory
            .set_state("gpu-1", HostState::Released, 30 * MIN, "done")
            .expect("released")
    );
    let err = inventory
        .set_state("gpu-1", HostState::Hot, 40 * MIN, "zombie")
        .expect_err("final");
    assert!(matches!(err, InventoryError::Released { .. }), "{err}");

    let history = inventory.history("gpu-1").expect("history");
    let steps: Vec<(Option<HostState>, HostState, i64, &str)> = history
        .iter()
        .map(|e| (e.from, e.to, e.at_ms, e.reason.as_str()))
        .collect();
    assert_eq!(
        steps,
        vec![
            (None, HostState::Provisioning, 0, "kiln rent"),
            (
                Some(HostState::Provisioning),
                HostState::Hot,
                10 * MIN,
                "ready"
            ),
            (Some(HostState::Hot), HostState::Warm, 20 * MIN, "idle"),
            (Some(HostState::Warm), HostState::Released, 30 * MIN, "done"),
        ]
    );
    let host = inventory.require("gpu-1").expect("host");
    assert_eq!(host.record.ready_at_ms, Some(10 * MIN));
    assert_eq!(host.released_at_ms, Some(30 * MIN));
    assert!(inventory.live_hosts().expect("live").is_empty());
    assert_eq!(inventory.hosts().expect("all").len(), 1);
}

#[test]
fn bad_hosts_are_refused_with_the_reason() {
    let (_dir, mut inventory) = open_temp();
    let ok = new_host(
        "gpu-1",
        ProviderKind::Vast,
        pricing(0.3, 0.0, 10, Some(0.1)),
    );
    inventory.add_host(&ok, 0, "r").expect("add");
    let err = inventory.add_host(&ok, 0, "r").expect_err("duplicate");
    assert!(matches!(err, InventoryError::Duplicate(_)), "{err}");
    let err = inventory
        .add_host(
            &new_host("Bad Name", ProviderKind::Vast, ok.pricing),
            0,
            "r",
        )
        .expect_err("bad name");
    assert!(err.to_string().contains("host name"), "{err}");
    let err = inventory
        .add_host(
            &new_host(
                "gpu-2",
                ProviderKind::Vast,
                pricing(f64::NAN, 0.0, 10, None),
            ),
            0,
            "r",
        )
        .expect_err("bad price");
    assert!(err.to_string().contains("price_per_hour"), "{err}");
    let err = inventory
        .set_state("nope", HostState::Hot, 0, "r")
        .expect_err("unknown");
    assert!(matches!(err, InventoryError::UnknownHost(_)), "{err}");
}

#[test]
fn local_hosts_cost_their_configured_prices() {
    let (_dir, mut inventory) = open_temp();
    inventory
        .add_host(
            &new_host("gpu-1", ProviderKind::Local, pricing(0.40, 0.02, 0, None)),
            0,
            "r",
        )
        .expect("add");
    inventory
        .set_state("gpu-1", HostState::Hot, 30 * MIN, "ready")
        .expect("hot");
    inventory
        .set_state("gpu-1", HostState::Warm, 90 * MIN, "pause")
        .expect("warm");
    // Open interval: warm since 90 min, queried at 150 min.
    let report = inventory.cost(0, 150 * MIN).expect("cost");
    assert!(close(report.per_state[&HostState::Provisioning], 0.20));
    assert!(close(report.per_state[&HostState::Hot], 0.40));
    assert!(close(report.per_state[&HostState::Warm], 0.02));
    assert!(close(report.gpu, 0.60));
    assert!(close(report.storage, 0.02));
    assert!(close(report.total, 0.62));
    assert!(close(report.per_host["gpu-1"], 0.62));

    // A window that starts mid-interval counts only its part.
    let late = inventory.cost(60 * MIN, 150 * MIN).expect("cost");
    assert!(close(late.per_state[&HostState::Hot], 0.20));
    assert!(!late.per_state.contains_key(&HostState::Provisioning));

    // Released: nothing accrues after it, and an empty window costs nothing.
    inventory
        .set_state("gpu-1", HostState::Released, 150 * MIN, "release")
        .expect("released");
    let after = inventory.cost(0, 10 * HOUR).expect("cost");
    assert!(close(after.total, 0.62));
    assert_eq!(inventory.cost(5 * HOUR, 5 * HOUR).expect("cost").total, 0.0);
}

#[test]
fn vast_bills_storage_while_running_and_stopped() {
    let (_dir, mut inventory) = open_temp();
    // 73 GB at $0.15/GB-month = $0.015/h.
    inventory
        .add_host(
            &new_host(
                "v-1",
                ProviderKind::Vast,
                pricing(0.35, 0.0, 73, Some(0.15)),
            ),
            0,
            "r",
        )
        .expect("add");
    inventory
        .set_state("v-1", HostState::Hot, 0, "ready")
        .expect("hot");
    inventory
        .set_state("v-1", HostState::Warm, 2 * HOUR, "pause")
        .expect("warm");
    inventory
        .set_state("v-1", HostState::Released, 4 * HOUR, "release")
        .expect("released");
    let report = inventory.cost(0, 5 * HOUR).expect("cost");
    assert!(close(report.gpu, 0.70), "{report:?}");
    assert!(close(report.storage, 4.0 * 0.015), "{report:?}");
    assert!(close(report.per_state[&HostState::Hot], 0.70 + 0.03));
    assert!(close(report.per_state[&HostState::Warm], 0.03));
}

#[test]
fn runpod_volume_costs_more_stopped() {
    let (_dir, mut inventory) = open_temp();
    // 73 GB: $0.01/h running, $0.02/h stopped.
    inventory
        .add_host(
            &new_host("r-1", ProviderKind::Runpod, pricing(0.69, 0.0, 73, None)),
            0,
            "r",
        )
        .expect("add");
    inventory
        .set_state("r-1", HostState::Hot, 0, "ready")
        .expect("hot");
    inventory
        .set_state("r-1", HostState::Warm, HOUR, "pause")
        .expect("warm");
    let report = inventory.cost(0, 3 * HOUR).expect("cost");
    assert!(
        close(report.per_state[&HostState::Hot], 0.69 + 0.01),
        "{report:?}"
    );
    assert!(
        close(report.per_state[&HostState::Warm], 2.0 * 0.02),
        "{report:?}"
    );
    let host = inventory.require("r-1").expect("host");
    assert!(close(host.record.stopped_price_per_hour, 0.02));
}

#[test]
fn lambda_bills_whole_minutes_until_terminate() {
    let (_dir, mut inventory) = open_temp();
    // $0.60/h = $0.01/min.
    inventory
        .add_host(
            &new_host("l-1", ProviderKind::Lambda, pricing(0.60, 0.0, 0, None)),
            0,
            "r",
        )
        .expect("add");
    inventory
        .set_state("l-1", HostState::Hot, 2 * MIN, "ready")
        .expect("hot");
    inventory
        .set_state("l-1", HostState::Released, 10 * MIN + 1_000, "release")
        .expect("released");
    // 10 min 1 s of life is billed as 11 minutes.
    let report = inventory.cost(0, HOUR).expect("cost");
    assert!(close(report.total, 0.11), "{report:?}");
    assert!(close(report.per_state[&HostState::Provisioning], 0.02));
    assert!(close(report.per_state[&HostState::Hot], 0.09));
}

#[test]
fn a_price_change_closes_the_interval_at_the_old_price() {
    let (_dir, mut inventory) = open_temp();
    inventory
        .add_host(
            &new_host("gpu-1", ProviderKind::Local, pricing(1.0, 0.0, 0, None)),
            0,
            "r",
        )
        .expect("add");
    inventory
        .set_pricing("gpu-1", &pricing(2.0, 0.0, 0, None), HOUR)
        .expect("reprice");
    let report = inventory.cost(0, 2 * HOUR).expect("cost");
    assert!(close(report.total, 3.0), "{report:?}");
    let err = inventory
        .set_pricing("gpu-1", &pricing(-1.0, 0.0, 0, None), 2 * HOUR)
        .expect_err("negative");
    assert!(err.to_string().contains("price_per_hour"), "{err}");
}

#[test]
fn actions_and_prices_are_kept() {
    let (_dir, mut inventory) = open_temp();
    for i in 0..3 {
        inventory
            .record_action(&ActionEntry {
                at_ms: i,
                action: "rent".into(),
                host: Some(format!("gpu-{i}")),
                reason: "pro wait over target".into(),
                outcome: "ok".into(),
            })
            .expect("action");
    }
    let last_two = inventory.actions(2).expect("actions");
    assert_eq!(last_two.len(), 2);
    assert_eq!(last_two[0].host.as_deref(), Some("gpu-1"));
    assert_eq!(last_two[1].host.as_deref(), Some("gpu-2"));

    let offer = |price: f64| Offer {
        provider: ProviderKind::Vast,
        offer_id: "1".into(),
        gpu_name: "RTX 4090".into(),
        num_gpus: 1,
        price_per_hour: price,
        storage_per_gb_month: Some(0.1),
        reliability: Some(0.99),
        location: None,
        spot: false,
    };
    inventory
        .record_offers(&[offer(0.40), offer(0.31), offer(f64::INFINITY)], 1_000)
        .expect("prices");
    assert_eq!(
        inventory
            .cheapest_price(ProviderKind::Vast, 0)
            .expect("cheapest"),
        Some(0.31)
    );
    assert_eq!(
        inventory
            .cheapest_price(ProviderKind::Vast, 2_000)
            .expect("cheapest"),
        None
    );
}

#[test]
fn days_and_months_start_at_midnight_utc() {
    let ms = |text: &str| -> i64 {
        humantime::parse_rfc3339(text)
            .expect("time")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after epoch")
            .as_millis() as i64
    };
    let now = ms("2026-11-30T22:04:23Z");
    assert_eq!(start_of_day_ms(now), ms("2026-11-30T00:00:00Z"));
    assert_eq!(start_of_month_ms(now), ms("2026-11-01T00:00:00Z"));
    assert_eq!(
        start_of_month_ms(ms("2024-02-29T23:59:59Z")),
        ms("2024-02-01T00:00:00Z")
    );
    assert_eq!(
        start_of_month_ms(ms("2027-01-01T00:00:00Z")),
        ms("2027-01-01T00:00:00Z")
    );
    assert_eq!(
        start_of_month_ms(ms("2000-03-15T12:00:00Z")),
        ms("2000-03-01T00:00:00Z")
    );
}

/// A provider API over memory: the hosts it lists are the test's.
struct MemProvider {
    kind: ProviderKind,
    hosts: Mutex<Vec<Host>>,
    fail_list: bool,
}

impl MemProvider {
    fn new(kind: ProviderKind, hosts: Vec<Host>) -> MemProvider {
        MemProvider {
            kind,
            hosts: Mutex::new(hosts),
            fail_list: false,
        }
    }
}

fn mem_host(kind: ProviderKind, id: &str, label: Option<&str>, status: HostStatus) -> Host {
    Host {
        provider: kind,
        id: id.into(),
        label: label.map(Into::into),
        status,
        provider_status: "as reported".into(),
        gpus: 1,
        price_per_hour: Some(0.3),
        spot: false,
        address: Address::default(),
    }
}

#[async_trait]
impl Provider for MemProvider {
    fn kind(&self) -> ProviderKind {
        self.kind
    }
    async fn offers(&self, _: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        Ok(Vec::new())
    }
    async fn rent(&self, _: &RentRequest) -> ProviderResult<Host> {
        Err(ProviderError::Unsupported {
            provider: self.kind,
            operation: "rent",
        })
    }
    async fn list(&self) -> ProviderResult<Vec<Host>> {
        if self.fail_list {
            return Err(ProviderError::Transient {
                provider: self.kind,
                message: "502 bad gateway".into(),
            });
        }
        Ok(self.hosts.lock().expect("lock").clone())
    }
    async fn get(&self, id: &str) -> ProviderResult<Host> {
        self.hosts
            .lock()
            .expect("lock")
            .iter()
            .find(|h| h.id == id)
            .cloned()
            .ok_or(ProviderError::NotFound {
                provider: self.kind,
                what: id.into(),
            })
    }
    async fn stop(&self, _: &str) -> ProviderResult<()> {
        Ok(())
    }
    async fn start(&self, _: &str) -> ProviderResult<()> {
        Ok(())
    }
    async fn destroy(&self, _: &str) -> ProviderResult<()> {
        Ok(())
    }
}

#[tokio::test]
async fn reconcile_reports_unknown_releases_vanished_and_corrects_drift() {
    let (_dir, mut inventory) = open_temp();
    let p = pricing(0.3, 0.0, 20, Some(0.1));
    for (name, id) in [("v-hot", "101"), ("v-gone", "102"), ("v-new", "")] {
        inventory
            .add_host(&new_host(name, ProviderKind::Vast, p), 0, "rent")
            .expect("add");
        if !id.is_empty() {
            inventory
                .set_rented(name, id, &Address::default())
                .expect("rented");
        }
    }
    inventory
        .set_state("v-hot", HostState::Hot, MIN, "ready")
        .expect("hot");
    inventory
        .add_host(&new_host("r-1", ProviderKind::Runpod, p), 0, "rent")
        .expect("add");
    inventory
        .set_rented("r-1", "pod-1", &Address::default())
        .expect("rented");

    let vast = MemProvider::new(
        ProviderKind::Vast,
        vec![
            // The inventory says hot; Vast says stopped.
            mem_host(
                ProviderKind::Vast,
                "101",
                Some("v-hot"),
                HostStatus::Stopped,
            ),
            // Rented under our label, but the id never reached the inventory.
            mem_host(
                ProviderKind::Vast,
                "103",
                Some("v-new"),
                HostStatus::Running,
            ),
            // Someone else's instance.
            mem_host(
                ProviderKind::Vast,
                "999",
                Some("not-ours"),
                HostStatus::Running,
            ),
        ],
    );
    let mut runpod = MemProvider::new(ProviderKind::Runpod, Vec::new());
    runpod.fail_list = true;

    let report = reconcile(&mut inventory, &[&vast, &runpod], 2 * MIN)
        .await
        .expect("reconcile");

    assert_eq!(report.unknown.len(), 1);
    assert_eq!(report.unknown[0].id, "999");
    assert_eq!(report.released, vec!["v-gone".to_string()]);
    assert_eq!(
        report.corrected,
        vec![reconcile::Correction {
            host: "v-hot".into(),
            from: HostState::Hot,
            to: HostState::Warm,
            provider_status: "as reported".into(),
        }]
    );
    assert_eq!(report.unreachable.len(), 1);
    assert_eq!(report.unreachable[0].0, ProviderKind::Runpod);

    // Never adopted: the unknown host is not in the inventory.
    assert!(
        inventory
            .hosts()
            .expect("hosts")
            .iter()
            .all(|h| h.record.provider_id.as_deref() != Some("999"))
    );
    let gone = inventory.require("v-gone").expect("gone");
    assert_eq!(gone.record.state, HostState::Released);
    let history = inventory.history("v-gone").expect("history");
    assert!(
        history
            .last()
            .expect("entry")
            .reason
            .contains("no longer knows")
    );
    let drifted = inventory.history("v-hot").expect("history");
    let last = drifted.last().expect("entry");
    assert_eq!(
        (last.from, last.to),
        (Some(HostState::Hot), HostState::Warm)
    );
    assert!(last.reason.contains("stopped"), "{}", last.reason);
    // The host found by its label got its id.
    let found = inventory.require("v-new").expect("found");
    assert_eq!(found.record.provider_id.as_deref(), Some("103"));
    // The provider that could not be asked had its hosts left alone.
    assert_eq!(
        inventory.require("r-1").expect("r-1").record.state,
        HostState::Provisioning
    );

    // A second pass finds nothing more to do.
    let again = reconcile(&mut inventory, &[&vast], 3 * MIN)
        .await
        .expect("reconcile");
    assert!(again.released.is_empty() && again.corrected.is_empty());
    assert_eq!(again.unknown.len(), 1);
}

#[test]
fn drift_maps_provider_states() {
    use reconcile::drift;
    assert_eq!(
        drift(HostState::Hot, &HostStatus::Stopped),
        Some(HostState::Warm)
    );
    assert_eq!(drift(HostState::Warm, &HostStatus::Stopped), None);
    assert_eq!(
        drift(HostState::Warm, &HostStatus::Running),
        Some(HostState::Hot)
    );
    assert_eq!(drift(HostState::Provisioning, &HostStatus::Running), None);
    assert_eq!(
        drift(HostState::Warm, &HostStatus::Scheduling),
        Some(HostState::Provisioning)
    );
    assert_eq!(
        drift(HostState::Hot, &HostStatus::Terminated),
        Some(HostState::Released)
    );
    assert_eq!(
        drift(HostState::Hot, &HostStatus::Failed("offline".into())),
        Some(HostState::Failed)
    );
    assert_eq!(
        drift(HostState::Failed, &HostStatus::Failed("x".into())),
        None
    );
}

#[test]
fn addresses_round_trip_and_print_as_json() {
    let (_dir, mut inventory) = open_temp();
    inventory
        .add_host(
            &new_host("gpu-1", ProviderKind::Vast, pricing(0.3, 0.0, 10, None)),
            0,
            "r",
        )
        .expect("add");
    let mut address = Address {
        public_ip: Some("203.0.113.7".into()),
        ..Address::default()
    };
    address.ports.insert(
        PortSpec {
            port: 7946,
            protocol: Protocol::Udp,
        },
        Mapped {
            host: "203.0.113.7".into(),
            port: 41_012,
        },
    );
    address
        .http_proxy
        .insert(7860, "https://x-7860.proxy".into());
    inventory
        .set_rented("gpu-1", "42", &address)
        .expect("rented");
    let host = inventory.require("gpu-1").expect("host");
    assert_eq!(host.address, address);
    assert_eq!(host.record.provider_id.as_deref(), Some("42"));
    let json = serde_json::to_value(&host).expect("json");
    assert_eq!(json["address"]["ports"][0]["external_port"], 41_012);
    assert_eq!(json["state"], "provisioning");
    assert_eq!(json["name"], "gpu-1");
}
