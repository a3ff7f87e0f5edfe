//! `kiln run`'s Prometheus metrics, served on `[metrics] listen` at `GET /metrics`: hosts per
//! inventory state, what the fleet costs per hour now, actions per kind and outcome, and the
//! alerts active. Updated after every tick from the inventory and the tick's report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::TickReport;
use crate::fleet::HostState;
use crate::inventory::Inventory;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    kind: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeverityLabels {
    severity: String,
}

/// The coordinator's registry and its metrics.
pub struct Metrics {
    registry: Registry,
    hosts: Family<StateLabels, Gauge>,
    cost_per_hour: Gauge<f64, AtomicU64>,
    actions: Family<ActionLabels, Counter>,
    alerts: Family<SeverityLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kiln_coordinator");
        let hosts = Family::<StateLabels, Gauge>::default();
        registry.register("hosts", "Hosts in the inventory by state", hosts.clone());
        let cost_per_hour = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cost_per_hour_usd",
            "What the fleet costs per hour in its current states, USD",
            cost_per_hour.clone(),
        );
        let actions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "actions",
            "Actions the control loop carried out, by kind and outcome (ok, error, skipped)",
            actions.clone(),
        );
        let alerts = Family::<SeverityLabels, Gauge>::default();
        registry.register(
            "alerts_active",
            "Alerts firing now, by severity",
            alerts.clone(),
        );
        Metrics {
            registry,
            hosts,
            cost_per_hour,
            actions,
            alerts,
        }
    }

    /// Refreshes the gauges from the inventory and counts the tick's actions.
    pub fn observe(&self, inventory: &Inventory, report: &TickReport) -> anyhow::Result<()> {
        let hosts = inventory.hosts()?;
        for state in HostState::ALL {
            let n = hosts.iter().filter(|h| h.record.state == state).count();
            self.hosts
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.cost_per_hour
            .set(hosts.iter().map(|h| h.rate().total()).sum());
        for done in &report.executed {
            let kind = done
                .action
                .split_whitespace()
                .next()
                .unwrap_or("unknown")
                .to_string();
            let outcome = if done.outcome.starts_with("error") {
                "error"
            } else if done.outcome.starts_with("skipped") {
                "skipped"
            } else {
                "ok"
            };
            self.actions
                .get_or_create(&ActionLabels {
                    kind,
                    outcome: outcome.into(),
                })
                .inc();
        }
        let active = super::active_alerts(inventory)?;
        for severity in ["warning", "critical"] {
            let n = active
                .values()
                .filter(|a| a.severity.as_str() == severity)
                .count();
            self.alerts
                .get_or_create(&SeverityLabels {
                    severity: severity.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .context("encoding metrics")?;
        Ok(text)
    }

    /// Binds `listen` and serves `GET /metrics` in a background task.
    pub async fn serve(self: &Arc<Self>, listen: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("metrics.listen: cannot listen on {listen}"))?;
        let bound = listener
            .local_addr()
            .context("reading the metrics address")?;
        let metrics = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    match metrics.encode() {
                        Ok(text) => (
                            axum::http::StatusCode::OK,
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        ),
                        Err(e) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            format!("{e:#}"),
                        ),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("kiln run: the metrics server stopped: {e}");
            }
        });
        Ok(bound)
    }
}
