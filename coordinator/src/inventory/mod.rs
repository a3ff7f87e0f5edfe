//! The inventory: every host the coordinator ever rented, its state history, the cost ledger,
//! the control loop's actions and the prices seen, in one SQLite file (rusqlite, bundled; WAL;
//! migrations in [`schema`]).
//!
//! Every state change goes through [`Inventory::set_state`], which in one transaction closes the
//! host's open billing interval at the old state's rate ([`billing::rate`]), moves the host and
//! writes a history entry. Cost queries ([`Inventory::cost`]) add the closed intervals and each
//! live host's open interval, clipped to the window asked for. Times are Unix milliseconds and
//! always passed in, so tests and the simulator control the clock.
//!
//! - [`billing`]: the providers' billing rules as pure rates.
//! - [`reconcile`]: comparing the inventory with what the providers report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::fleet::{HostRecord, HostState};
use crate::provider::{Address, Mapped, Offer, PortSpec, Protocol, ProviderKind};

pub mod billing;
pub mod reconcile;
pub mod schema;

pub use billing::{Pricing, Rate};
pub use reconcile::{Report, reconcile};

/// Why an inventory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory: {context}: {source}")]
    Sqlite {
        context: String,
        source: rusqlite::Error,
    },
    #[error("inventory {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "the inventory was written by a newer kiln (schema {found}, this kiln knows up to {supported})"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("no host named `{0}` in the inventory")]
    UnknownHost(String),
    #[error("a host named `{0}` is already in the inventory; choose another name")]
    Duplicate(String),
    #[error("host `{name}` was released; a released host does not change state again")]
    Released { name: String },
    #[error("invalid {what}: {message}")]
    Invalid { what: String, message: String },
}

fn sql(context: &str) -> impl FnOnce(rusqlite::Error) -> InventoryError + '_ {
    move |source| InventoryError::Sqlite {
        context: context.to_string(),
        source,
    }
}

/// A host to add: everything known before the provider accepted the rent.
#[derive(Debug, Clone, PartialEq)]
pub struct NewHost {
    /// Kiln's name (the node name and the label at the provider).
    pub name: String,
    pub provider: ProviderKind,
    pub spot: bool,
    pub primary: bool,
    pub pricing: Pricing,
}

/// A host as the inventory holds it: the shared [`HostRecord`] plus what only the inventory
/// keeps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InventoryHost {
    #[serde(flatten)]
    pub record: HostRecord,
    /// The label given to the provider (the name, for hosts Kiln rents).
    pub label: String,
    #[serde(serialize_with = "serialize_address")]
    pub address: Address,
    pub pricing: Pricing,
    pub released_at_ms: Option<i64>,
    /// Start of the open billing interval (the last state or price change).
    #[serde(skip)]
    billed_since_ms: i64,
}

impl InventoryHost {
    /// What the host costs per hour now.
    pub fn rate(&self) -> Rate {
        billing::rate(self.record.provider, &self.pricing, self.record.state)
    }
}

/// An [`Address`] as stored and printed: JSON has no struct map keys, so the port map becomes a
/// list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct StoredAddress {
    #[serde(default)]
    public_ip: Option<String>,
    #[serde(default)]
    ports: Vec<StoredPort>,
    #[serde(default)]
    http_proxy: BTreeMap<u16, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredPort {
    port: u16,
    protocol: Protocol,
    host: String,
    external_port: u16,
}

impl From<&Address> for StoredAddress {
    fn from(address: &Address) -> Self {
        StoredAddress {
            public_ip: address.public_ip.clone(),
            ports: address
                .ports
                .iter()
                .map(|(spec, mapped)| StoredPort {
                    port: spec.port,
                    protocol: spec.protocol,
                    host: mapped.host.clone(),
                    external_port: mapped.port,
                })
                .collect(),
            http_proxy: address.http_proxy.clone(),
        }
    }
}

impl From<StoredAddress> for Address {
    fn from(stored: StoredAddress) -> Self {
        Address {
            public_ip: stored.public_ip,
            ports: stored
                .ports
                .into_iter()
                .map(|p| {
                    (
                        PortSpec {
                            port: p.port,
                            protocol: p.protocol,
                        },
                        Mapped {
                            host: p.host,
                            port: p.external_port,
                        },
                    )
                })
                .collect(),
            http_proxy: stored.http_proxy,
        }
    }
}

fn serialize_address<S: serde::Serializer>(address: &Address, s: S) -> Result<S::Ok, S::Error> {
    StoredAddress::from(address).serialize(s)
}

/// One entry of a host's state history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    pub host: String,
    /// `None` for the entry that added the host.
    pub from: Option<HostState>,
    pub to: HostState,
    pub at_ms: i64,
    pub reason: String,
}

/// One decision of the control loop or the operator, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionEntry {
    pub at_ms: i64,
    /// `rent`, `pause`, `resume`, `release`, …
    pub action: String,
    pub host: Option<String>,
    pub reason: String,
    /// `ok`, or the error.
    pub outcome: String,
}

/// Cost over one window, USD.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CostReport {
    pub since_ms: i64,
    pub until_ms: i64,
    pub total: f64,
    pub gpu: f64,
    pub storage: f64,
    pub per_host: BTreeMap<String, f64>,
    pub per_state: BTreeMap<HostState, f64>,
}

impl CostReport {
    fn add(&mut self, host: &str, state: HostState, gpu: f64, storage: f64) {
        let sum = gpu + storage;
        self.gpu += gpu;
        self.storage += storage;
        self.total += sum;
        *self.per_host.entry(host.to_string()).or_default() += sum;
        *self.per_state.entry(state).or_default() += sum;
    }
}

/// The inventory file, open. One connection; `kiln` commands are short and sequential, and a
/// second process waits on SQLite's lock (busy timeout) instead of failing.
pub struct Inventory {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const HOST_COLUMNS: &str = "name, provider, provider_id, label, state, state_since_ms, \
     billed_since_ms, rented_at_ms, ready_at_ms, released_at_ms, is_primary, spot, price_per_hour, \
     stopped_price_per_hour, disk_gb, storage_per_gb_month, address";

fn check_price(what: &str, price: f64) -> Result<(), InventoryError> {
    if price.is_finite() && price >= 0.0 {
        Ok(())
    } else {
        Err(InventoryError::Invalid {
            what: what.to_string(),
            message: format!("{price} is not a price (a finite number >= 0)"),
        })
    }
}

fn check_pricing(pricing: &Pricing) -> Result<(), InventoryError> {
    check_price("price_per_hour", pricing.price_per_hour)?;
    check_price("stopped_price_per_hour", pricing.stopped_price_per_hour)?;
    if let Some(storage) = pricing.storage_per_gb_month {
        check_price("storage_per_gb_month", storage)?;
    }
    Ok(())
}

fn parse_col<T: std::str::FromStr<Err = String>>(idx: usize, text: String) -> rusqlite::Result<T> {
    text.parse::<T>().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
    })
}

fn host_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<InventoryHost> {
    let provider: ProviderKind = parse_col(1, row.get(1)?)?;
    let state: HostState = parse_col(4, row.get(4)?)?;
    let address_json: String = row.get(16)?;
    let address: Address = serde_json::from_str::<StoredAddress>(&address_json)
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(16, rusqlite::types::Type::Text, e.into())
        })?
        .into();
    let pricing = Pricing {
        price_per_hour: row.get(12)?,
        stopped_price_per_hour: row.get(13)?,
        disk_gb: row.get(14)?,
        storage_per_gb_month: row.get(15)?,
    };
    Ok(InventoryHost {
        record: HostRecord {
            name: row.get(0)?,
            provider,
            provider_id: row.get(2)?,
            state,
            state_since_ms: row.get(5)?,
            rented_at_ms: row.get(7)?,
            ready_at_ms: row.get(8)?,
            primary: row.get(10)?,
            spot: row.get(11)?,
            price_per_hour: pricing.price_per_hour,
            stopped_price_per_hour: billing::rate(provider, &pricing, HostState::Warm).total(),
        },
        label: row.get(3)?,
        address,
        pricing,
        released_at_ms: row.get(9)?,
        billed_since_ms: row.get(6)?,
    })
}

impl Inventory {
    /// Opens (or creates) the inventory at `path`, creating its folder and applying migrations.
    pub fn open(path: &Path) -> Result<Inventory, InventoryError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| InventoryError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("cannot create its folder {}: {e}", parent.display()),
            })?;
        }
        let mut conn =
            Connection::open(path).map_err(|e| schema::corrupt_or(path, e, "opening"))?;
        schema::configure(&conn, path)?;
        schema::migrate(&mut conn, path)?;
        Ok(Inventory {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version of the open file.
    pub fn schema_version(&self) -> Result<i64, InventoryError> {
        self.conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(sql("reading the schema version"))
    }

    /// Adds a host in state `provisioning` (before the provider is asked, so a rent that the
    /// provider accepted is never forgotten: its label finds it).
    pub fn add_host(
        &mut self,
        host: &NewHost,
        now_ms: i64,
        reason: &str,
    ) -> Result<InventoryHost, InventoryError> {
        kiln_daemon::pki::validate_name(&host.name).map_err(|e| InventoryError::Invalid {
            what: "host name".into(),
            message: e.to_string(),
        })?;
        check_pricing(&host.pricing)?;
        let tx = self.conn.transaction().map_err(sql("adding a host"))?;
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM hosts WHERE name = ?1)",
                [&host.name],
                |row| row.get(0),
            )
            .map_err(sql("adding a host"))?;
        if exists {
            return Err(InventoryError::Duplicate(host.name.clone()));
        }
        tx.execute(
            "INSERT INTO hosts (name, provider, label, state, state_since_ms, billed_since_ms, \
             rented_at_ms, is_primary, spot, price_per_hour, stopped_price_per_hour, disk_gb, \
             storage_per_gb_month) VALUES (?1, ?2, ?1, ?3, ?4, ?4, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                host.name,
                host.provider.as_str(),
                HostState::Provisioning.as_str(),
                now_ms,
                host.primary,
                host.spot,
                host.pricing.price_per_hour,
                host.pricing.stopped_price_per_hour,
                host.pricing.disk_gb,
                host.pricing.storage_per_gb_month,
            ],
        )
        .map_err(sql("adding a host"))?;
        tx.execute(
            "INSERT INTO history (host, from_state, to_state, at_ms, reason) \
             VALUES (?1, NULL, ?2, ?3, ?4)",
            params![host.name, HostState::Provisioning.as_str(), now_ms, reason],
        )
        .map_err(sql("adding a host"))?;
        tx.commit().map_err(sql("adding a host"))?;
        self.require(&host.name)
    }

    /// One host, or `None`.
    pub fn host(&self, name: &str) -> Result<Option<InventoryHost>, InventoryError> {
        self.conn
            .query_row(
                &format!("SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?1"),
                [name],
                host_from_row,
            )
            .optional()
            .map_err(sql("reading a host"))
    }

    /// One host, or [`InventoryError::UnknownHost`].
    pub fn require(&self, name: &str) -> Result<InventoryHost, InventoryError> {
        self.host(name)?
            .ok_or_else(|| InventoryError::UnknownHost(name.to_string()))
    }

    /// Every host, released ones included, oldest rent first.
    pub fn hosts(&self) -> Result<Vec<InventoryHost>, InventoryError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {HOST_COLUMNS} FROM hosts ORDER BY rented_at_ms, name"
            ))
            .map_err(sql("listing hosts"))?;
        let rows = stmt
            .query_map([], host_from_row)
            .map_err(sql("listing hosts"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql("listing hosts"))
    }

    /// Hosts not released.
    pub fn live_hosts(&self) -> Result<Vec<InventoryHost>, InventoryError> {
        Ok(self
            .hosts()?
            .into_iter()
            .filter(|h| h.record.state != HostState::Released)
            .collect())
    }

    /// Records what the provider answered to the rent: its id and how to reach the host.
    pub fn set_rented(
        &mut self,
        name: &str,
        provider_id: &str,
        address: &Address,
    ) -> Result<(), InventoryError> {
        let address = serde_json::to_string(&StoredAddress::from(address)).map_err(|e| {
            InventoryError::Invalid {
                what: "address".into(),
                message: e.to_string(),
            }
        })?;
        let changed = self
            .conn
            .execute(
                "UPDATE hosts SET provider_id = ?2, address = ?3 WHERE name = ?1",
                params![name, provider_id, address],
            )
            .map_err(sql("recording a rent"))?;
        if changed == 0 {
            return Err(InventoryError::UnknownHost(name.to_string()));
        }
        Ok(())
    }

    /// Changes the prices a host is billed at from `now_ms` on (the interval so far is closed
    /// at the old prices).
    pub fn set_pricing(
        &mut self,
        name: &str,
        pricing: &Pricing,
        now_ms: i64,
    ) -> Result<(), InventoryError> {
        check_pricing(pricing)?;
        let host = self.require(name)?;
        let tx = self.conn.transaction().map_err(sql("changing prices"))?;
        close_interval(&tx, &host, now_ms)?;
        tx.execute(
            "UPDATE hosts SET price_per_hour = ?2, stopped_price_per_hour = ?3, disk_gb = ?4, \
             storage_per_gb_month = ?5, billed_since_ms = ?6 WHERE name = ?1",
            params![
                name,
                pricing.price_per_hour,
                pricing.stopped_price_per_hour,
                pricing.disk_gb,
                pricing.storage_per_gb_month,
                now_ms.max(host.billed_since_ms),
            ],
        )
        .map_err(sql("changing prices"))?;
        tx.commit().map_err(sql("changing prices"))
    }

    /// Moves a host to `to` at `now_ms` with a history entry; returns `false` (and changes
    /// nothing) when it is already there. A released host never moves again.
    pub fn set_state(
        &mut self,
        name: &str,
        to: HostState,
        now_ms: i64,
        reason: &str,
    ) -> Result<bool, InventoryError> {
        let host = self.require(name)?;
        let from = host.record.state;
        if from == to {
            return Ok(false);
        }
        if from == HostState::Released {
            return Err(InventoryError::Released {
                name: name.to_string(),
            });
        }
        let now_ms = now_ms.max(host.billed_since_ms);
        let tx = self.conn.transaction().map_err(sql("changing state"))?;
        close_interval(&tx, &host, now_ms)?;
        if to == HostState::Released && host.record.provider == ProviderKind::Lambda {
            // Lambda bills whole minutes from launch to terminate: the part of the last minute
            // not yet accounted is charged now.
            let rounded = billing::round_lambda_life(host.record.rented_at_ms, now_ms);
            let extra = billing::cost_of(host.rate().gpu_per_hour, rounded - now_ms);
            if extra > 0.0 {
                tx.execute(
                    "INSERT INTO ledger (host, state, start_ms, end_ms, gpu_per_hour, \
                     storage_per_hour, extra_usd) VALUES (?1, ?2, ?3, ?3, 0, 0, ?4)",
                    params![name, from.as_str(), now_ms, extra],
                )
                .map_err(sql("changing state"))?;
            }
        }
        let ready_at = if to == HostState::Hot && from == HostState::Provisioning {
            Some(now_ms)
        } else {
            host.record.ready_at_ms
        };
        let released_at = (to == HostState::Released).then_some(now_ms);
        tx.execute(
            "UPDATE hosts SET state = ?2, state_since_ms = ?3, billed_since_ms = ?3, \
             ready_at_ms = ?4, released_at_ms = ?5 WHERE name = ?1",
            params![name, to.as_str(), now_ms, ready_at, released_at],
        )
        .map_err(sql("changing state"))?;
        tx.execute(
            "INSERT INTO history (host, from_state, to_state, at_ms, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, from.as_str(), to.as_str(), now_ms, reason],
        )
        .map_err(sql("changing state"))?;
        tx.commit().map_err(sql("changing state"))?;
        Ok(true)
    }

    /// A host's state history, oldest first.
    pub fn history(&self, name: &str) -> Result<Vec<HistoryEntry>, InventoryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT host, from_state, to_state, at_ms, reason FROM history \
                 WHERE host = ?1 ORDER BY id",
            )
            .map_err(sql("reading history"))?;
        let rows = stmt
            .query_map([name], |row| {
                let from: Option<String> = row.get(1)?;
                Ok(HistoryEntry {
                    host: row.get(0)?,
                    from: from.map(|f| parse_col(1, f)).transpose()?,
                    to: parse_col(2, row.get(2)?)?,
                    at_ms: row.get(3)?,
                    reason: row.get(4)?,
                })
            })
            .map_err(sql("reading history"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading history"))
    }

    /// Appends to the actions log.
    pub fn record_action(&mut self, entry: &ActionEntry) -> Result<(), InventoryError> {
        self.conn
            .execute(
                "INSERT INTO actions (at_ms, action, host, reason, outcome) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    entry.at_ms,
                    entry.action,
                    entry.host,
                    entry.reason,
                    entry.outcome
                ],
            )
            .map_err(sql("recording an action"))?;
        Ok(())
    }

    /// A value stored under `key` with [`Inventory::set_value`], if any.
    pub fn value(&self, key: &str) -> Result<Option<String>, InventoryError> {
        self.conn
            .query_row("SELECT value FROM kv WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
            .map_err(sql("reading a stored value"))
    }

    /// Stores `value` under `key`, replacing what was there.
    pub fn set_value(&mut self, key: &str, value: &str, now_ms: i64) -> Result<(), InventoryError> {
        self.conn
            .execute(
                "INSERT INTO kv (key, value, at_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value, at_ms = excluded.at_ms",
                params![key, value, now_ms],
            )
            .map_err(sql("storing a value"))?;
        Ok(())
    }

    /// The last `limit` actions, oldest first.
    pub fn actions(&self, limit: u32) -> Result<Vec<ActionEntry>, InventoryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT at_ms, action, host, reason, outcome FROM \
                 (SELECT * FROM actions ORDER BY id DESC LIMIT ?1) ORDER BY id",
            )
            .map_err(sql("reading actions"))?;
        let rows = stmt
            .query_map([limit], |row| {
                Ok(ActionEntry {
                    at_ms: row.get(0)?,
                    action: row.get(1)?,
                    host: row.get(2)?,
                    reason: row.get(3)?,
                    outcome: row.get(4)?,
                })
            })
            .map_err(sql("reading actions"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading actions"))
    }

    /// Stores the offers seen at `now_ms` (price history per provider).
    pub fn record_offers(&mut self, offers: &[Offer], now_ms: i64) -> Result<(), InventoryError> {
        let tx = self.conn.transaction().map_err(sql("recording prices"))?;
        for offer in offers {
            if !(offer.price_per_hour.is_finite() && offer.price_per_hour >= 0.0) {
                continue; // not a price: nothing to learn from it
            }
            tx.execute(
                "INSERT INTO prices (at_ms, provider, offer_id, gpu_name, num_gpus, \
                 price_per_hour, storage_per_gb_month, reliability, location, spot) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    now_ms,
                    offer.provider.as_str(),
                    offer.offer_id,
                    offer.gpu_name,
                    offer.num_gpus,
                    offer.price_per_hour,
                    offer.storage_per_gb_month,
                    offer.reliability,
                    offer.location,
                    offer.spot,
                ],
            )
            .map_err(sql("recording prices"))?;
        }
        tx.commit().map_err(sql("recording prices"))
    }

    /// The cheapest price per hour seen for `provider` since `since_ms`.
    pub fn cheapest_price(
        &self,
        provider: ProviderKind,
        since_ms: i64,
    ) -> Result<Option<f64>, InventoryError> {
        self.conn
            .query_row(
                "SELECT MIN(price_per_hour) FROM prices WHERE provider = ?1 AND at_ms >= ?2",
                params![provider.as_str(), since_ms],
                |row| row.get(0),
            )
            .map_err(sql("reading prices"))
    }

    /// What the fleet cost in `[since_ms, until_ms)`: closed ledger intervals and each live
    /// host's open interval, clipped to the window.
    pub fn cost(&self, since_ms: i64, until_ms: i64) -> Result<CostReport, InventoryError> {
        let mut report = CostReport {
            since_ms,
            until_ms,
            ..CostReport::default()
        };
        if until_ms <= since_ms {
            return Ok(report);
        }
        let overlap = |start: i64, end: i64| (end.min(until_ms) - start.max(since_ms)).max(0);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT host, state, start_ms, end_ms, gpu_per_hour, storage_per_hour, extra_usd \
                 FROM ledger WHERE end_ms >= ?1 AND start_ms < ?2",
            )
            .map_err(sql("reading the ledger"))?;
        let rows = stmt
            .query_map(params![since_ms, until_ms], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    parse_col::<HostState>(1, row.get(1)?)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, f64>(4)?,
                    row.get::<_, f64>(5)?,
                    row.get::<_, f64>(6)?,
                ))
            })
            .map_err(sql("reading the ledger"))?;
        for row in rows {
            let (host, state, start, end, gpu, storage, extra) =
                row.map_err(sql("reading the ledger"))?;
            let ms = overlap(start, end);
            let lump = if start >= since_ms && start < until_ms {
                extra
            } else {
                0.0
            };
            report.add(
                &host,
                state,
                billing::cost_of(gpu, ms) + lump,
                billing::cost_of(storage, ms),
            );
        }
        for host in self.live_hosts()? {
            let rate = host.rate();
            let ms = overlap(host.billed_since_ms, until_ms);
            report.add(
                &host.record.name,
                host.record.state,
                billing::cost_of(rate.gpu_per_hour, ms),
                billing::cost_of(rate.storage_per_hour, ms),
            );
        }
        Ok(report)
    }
}

/// Writes the host's open billing interval `[billed_since, now)` to the ledger at the rates of
/// its current state.
fn close_interval(
    tx: &rusqlite::Transaction<'_>,
    host: &InventoryHost,
    now_ms: i64,
) -> Result<(), InventoryError> {
    if now_ms <= host.billed_since_ms || host.record.state == HostState::Released {
        return Ok(());
    }
    let rate = host.rate();
    tx.execute(
        "INSERT INTO ledger (host, state, start_ms, end_ms, gpu_per_hour, storage_per_hour) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            host.record.name,
            host.record.state.as_str(),
            host.billed_since_ms,
            now_ms,
            rate.gpu_per_hour,
            rate.storage_per_hour,
        ],
    )
    .map_err(sql("writing the ledger"))?;
    Ok(())
}

/// Midnight UTC of the day holding `now_ms`.
pub fn start_of_day_ms(now_ms: i64) -> i64 {
    now_ms - now_ms.rem_euclid(86_400_000)
}

/// Midnight UTC of the first day of the month holding `now_ms`.
pub fn start_of_month_ms(now_ms: i64) -> i64 {
    let day_start = start_of_day_ms(now_ms);
    let days = day_start / 86_400_000;
    let (_, _, day) = civil_from_days(days);
    day_start - i64::from(day - 1) * 86_400_000
}

/// (year, month 1..=12, day 1..=31) of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
