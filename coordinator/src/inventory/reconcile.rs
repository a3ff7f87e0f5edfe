//! Reconciling the inventory with what the providers report, at start (and whenever asked).
//!
//! - A host the provider has and the inventory does not is **reported, never adopted or
//!   destroyed**: it may be someone else's (one account, several users), and destroying it
//!   would lose data Kiln knows nothing about.
//! - An inventory host the provider no longer knows is marked released, with the reason.
//! - State drift (the provider says stopped, the inventory says hot) is corrected, with a
//!   history entry naming both sides.
//!
//! A provider whose `list` fails is reported and its hosts are left alone: "I could not ask"
//! is not "it is gone".

use serde::Serialize;

use super::{Inventory, InventoryError, InventoryHost};
use crate::fleet::HostState;
use crate::provider::{Host, HostStatus, Provider, ProviderKind};

/// What reconciling found and did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Hosts the providers have that the inventory does not know (left alone).
    pub unknown: Vec<UnknownHost>,
    /// Inventory hosts marked released because their provider no longer knows them.
    pub released: Vec<String>,
    /// State corrections made: (host, from, to).
    pub corrected: Vec<Correction>,
    /// Providers that could not be asked, with the error.
    pub unreachable: Vec<(ProviderKind, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnknownHost {
    pub provider: ProviderKind,
    pub id: String,
    pub label: Option<String>,
    pub provider_status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Correction {
    pub host: String,
    pub from: HostState,
    pub to: HostState,
    pub provider_status: String,
}

/// The inventory state a provider status calls for, given the state the inventory holds, or
/// `None` when the two agree (or the difference is the policy's business, such as a host
/// running at the provider but not yet ready in the cluster).
pub fn drift(inventory: HostState, status: &HostStatus) -> Option<HostState> {
    use HostState as S;
    let wanted = match status {
        HostStatus::Stopped => match inventory {
            S::Provisioning | S::Hot | S::Draining => S::Warm,
            _ => return None,
        },
        HostStatus::Running => match inventory {
            S::Warm => S::Hot,
            _ => return None,
        },
        HostStatus::Starting | HostStatus::Scheduling => match inventory {
            S::Warm => S::Provisioning,
            _ => return None,
        },
        HostStatus::Terminated => S::Released,
        HostStatus::Failed(_) => S::Failed,
    };
    (wanted != inventory).then_some(wanted)
}

/// Whether `host` (as the provider reports it) is the inventory's `known`: same provider id,
/// or, before the id was recorded, the label Kiln rented it under.
fn same_host(known: &InventoryHost, host: &Host) -> bool {
    match &known.record.provider_id {
        Some(id) => *id == host.id,
        None => host.label.as_deref() == Some(known.label.as_str()),
    }
}

/// Compares every provider's hosts with the inventory and applies the corrections described in
/// the module docs at `now_ms`.
pub async fn reconcile(
    inventory: &mut Inventory,
    providers: &[&dyn Provider],
    now_ms: i64,
) -> Result<Report, InventoryError> {
    let mut report = Report::default();
    for provider in providers {
        let kind = provider.kind();
        let hosts = match provider.list().await {
            Ok(hosts) => hosts,
            Err(error) => {
                report.unreachable.push((kind, error.to_string()));
                continue;
            }
        };
        let known: Vec<InventoryHost> = inventory
            .live_hosts()?
            .into_iter()
            .filter(|h| h.record.provider == kind)
            .collect();
        for host in &hosts {
            if !known.iter().any(|k| same_host(k, host)) {
                report.unknown.push(UnknownHost {
                    provider: kind,
                    id: host.id.clone(),
                    label: host.label.clone(),
                    provider_status: host.provider_status.clone(),
                });
            }
        }
        for entry in &known {
            let name = &entry.record.name;
            match hosts.iter().find(|h| same_host(entry, h)) {
                None => {
                    let reason = format!("reconcile: {kind} no longer knows this host");
                    if inventory.set_state(name, HostState::Released, now_ms, &reason)? {
                        report.released.push(name.clone());
                    }
                }
                Some(host) => {
                    if entry.record.provider_id.is_none() {
                        inventory.set_rented(name, &host.id, &host.address)?;
                    }
                    if let Some(to) = drift(entry.record.state, &host.status) {
                        let reason = format!(
                            "reconcile: {kind} reports {} ({}) while the inventory said {}",
                            status_word(&host.status),
                            host.provider_status,
                            entry.record.state
                        );
                        if inventory.set_state(name, to, now_ms, &reason)? {
                            report.corrected.push(Correction {
                                host: name.clone(),
                                from: entry.record.state,
                                to,
                                provider_status: host.provider_status.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}

fn status_word(status: &HostStatus) -> String {
    match status {
        HostStatus::Starting => "starting".into(),
        HostStatus::Running => "running".into(),
        HostStatus::Scheduling => "scheduling".into(),
        HostStatus::Stopped => "stopped".into(),
        HostStatus::Terminated => "terminated".into(),
        HostStatus::Failed(detail) => format!("failed: {detail}"),
    }
}
