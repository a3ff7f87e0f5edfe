//! Prometheus metrics of a node, in the text exposition format at `GET /metrics`.
//!
//! One registry per node (no process-wide globals), so several nodes can run in one test
//! process. Recording a sample never blocks on I/O.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::protocol::{JobStatus, Tier};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TierLabel {
    free,
    premium,
    pro,
    enterprise,
}

impl From<Tier> for TierLabel {
    fn from(tier: Tier) -> Self {
        match tier {
            Tier::Free => TierLabel::free,
            Tier::Premium => TierLabel::premium,
            Tier::Pro => TierLabel::pro,
            Tier::Enterprise => TierLabel::enterprise,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: TierLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub tier: TierLabel,
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    pub queue_depth: Family<TierLabels, Gauge>,
    pub wait_seconds: Family<TierLabels, Histogram>,
    pub job_duration_seconds: Histogram,
    pub jobs_finished: Family<FinishedLabels, Counter>,
    pub jobs_submitted: Family<TierLabels, Counter>,
    pub jobs_refused: Family<TierLabels, Counter>,
    pub comfy_restarts: Counter,
    pub comfy_ready: Gauge,
    pub http_requests: Family<HttpLabels, Counter>,
    pub gossip: GossipMetrics,
    pub webhooks: WebhookMetrics,
    /// Output files sent to other members (results to owners, copies to replicas) by how they
    /// went: `inline` in the message, or `chunked` (uploaded first).
    pub outputs_sent: Family<HowLabels, Counter>,
    /// Idempotency-key lookups this node asked of other members before storing a keyed
    /// submission, and the messages that carried them (several lookups share one under load).
    pub key_lookups: Counter,
    pub key_lookup_messages: Counter,
    pub store: StoreMetrics,
}

/// The job store's writer: its commits (each one fsync of the WAL), the requests they carried,
/// and how long each commit took; and the reads run beside it. Handed to the store at open;
/// until then (and in stores opened without them) they count into series no registry exports.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    pub commits: Counter,
    pub commit_requests: Counter,
    pub commit_seconds: Histogram,
    pub reads: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            commits: Counter::default(),
            commit_requests: Counter::default(),
            commit_seconds: Histogram::new([
                0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
            ]),
            reads: Counter::default(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabels {
    pub how: String,
}

/// The cluster transport's counters, copied from the endpoint's statistics at each scrape.
#[derive(Debug, Default, Clone)]
pub struct GossipMetrics {
    pub members: Family<MemberLabels, Gauge>,
    pub handshakes_rejected: Counter,
    pub frames_sent: Counter,
    pub frames_received: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub frames_dropped: Counter,
    pub connections: Gauge,
}

/// Webhook deliveries and the outbox.
#[derive(Debug, Default, Clone)]
pub struct WebhookMetrics {
    /// Delivery attempts by outcome: `delivered`, `failed` (retried), `abandoned`, `refused`.
    pub deliveries: Family<OutcomeLabels, Counter>,
    /// Webhooks waiting to be sent (due rows in the outbox).
    pub outbox_depth: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub live: String,
}

/// Raises a counter to `value` (counters only go up; a lower value is ignored).
pub fn raise_to(counter: &Counter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn wait_histogram() -> Histogram {
    // From 100 ms to about 27 minutes: covers every tier's wait target.
    Histogram::new([
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
    ])
}

impl Metrics {
    /// Counts `files` output files sent to another member, `inline` or in chunks.
    pub fn count_outputs_sent(&self, files: usize, inline: bool) {
        let how = if inline { "inline" } else { "chunked" };
        self.outputs_sent
            .get_or_create(&HowLabels {
                how: how.to_string(),
            })
            .inc_by(files as u64);
    }

    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("kiln");
        let queue_depth = Family::<TierLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Jobs waiting in this node's queue",
            queue_depth.clone(),
        );
        let wait_seconds =
            Family::<TierLabels, Histogram>::new_with_constructor(wait_histogram as fn() -> _);
        registry.register(
            "job_wait_seconds",
            "Time from submission to start of a job's first run",
            wait_seconds.clone(),
        );
        let job_duration_seconds = Histogram::new([
            0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ]);
        registry.register(
            "job_duration_seconds",
            "Time a job spent running in ComfyUI",
            job_duration_seconds.clone(),
        );
        let jobs_finished = Family::<FinishedLabels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final status",
            jobs_finished.clone(),
        );
        let jobs_submitted = Family::<TierLabels, Counter>::default();
        registry.register(
            "jobs_submitted",
            "Jobs accepted with 202",
            jobs_submitted.clone(),
        );
        let jobs_refused = Family::<TierLabels, Counter>::default();
        registry.register(
            "jobs_refused",
            "Jobs refused by admission control or quota",
            jobs_refused.clone(),
        );
        let comfy_restarts = Counter::default();
        registry.register(
            "comfyui_restarts",
            "Times ComfyUI was started again after the first start",
            comfy_restarts.clone(),
        );
        let comfy_ready = Gauge::default();
        registry.register(
            "comfyui_ready",
            "1 while the supervised ComfyUI is ready",
            comfy_ready.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let webhooks = WebhookMetrics::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed and retried, abandoned, refused target)",
            webhooks.deliveries.clone(),
        );
        registry.register(
            "webhook_outbox_depth",
            "Webhooks waiting to be sent",
            webhooks.outbox_depth.clone(),
        );
        let outputs_sent = Family::<HowLabels, Counter>::default();
        registry.register(
            "peer_outputs_sent",
            "Job output files sent to other members (results to owners, copies to replicas), inline in the message or chunked",
            outputs_sent.clone(),
        );
        let key_lookups = Counter::default();
        registry.register(
            "peer_key_lookups",
            "Idempotency-key lookups asked of other members before storing a keyed submission",
            key_lookups.clone(),
        );
        let key_lookup_messages = Counter::default();
        registry.register(
            "peer_key_lookup_messages",
            "Messages that carried idempotency-key lookups to other members",
            key_lookup_messages.clone(),
        );
        let store = StoreMetrics::default();
        registry.register(
            "store_commits",
            "Transactions the job store's writer committed (one WAL fsync each)",
            store.commits.clone(),
        );
        registry.register(
            "store_commit_requests",
            "Requests (submits, leases, results, copies) the job store's commits carried",
            store.commit_requests.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time the job store's writer took to commit a transaction, fsync included",
            store.commit_seconds.clone(),
        );
        registry.register(
            "store_reads",
            "Reads of the job store on its read connections (each one a blocking-pool task)",
            store.reads.clone(),
        );
        let gossip = GossipMetrics::default();
        registry.register(
            "gossip_members",
            "Cluster members this node knows, live or dead",
            gossip.members.clone(),
        );
        registry.register(
            "gossip_handshakes_rejected",
            "Incoming cluster connections refused in the TLS handshake (no or foreign certificate, wrong protocol)",
            gossip.handshakes_rejected.clone(),
        );
        registry.register(
            "gossip_frames_sent",
            "Cluster messages sent",
            gossip.frames_sent.clone(),
        );
        registry.register(
            "gossip_frames_received",
            "Cluster messages received",
            gossip.frames_received.clone(),
        );
        registry.register(
            "gossip_bytes_sent",
            "Cluster message bytes sent",
            gossip.bytes_sent.clone(),
        );
        registry.register(
            "gossip_bytes_received",
            "Cluster message bytes received",
            gossip.bytes_received.clone(),
        );
        registry.register(
            "gossip_frames_dropped",
            "Cluster messages lost: full queues, oversize, undecodable, failed dials or sends",
            gossip.frames_dropped.clone(),
        );
        registry.register(
            "gossip_connections",
            "Open cluster connections",
            gossip.connections.clone(),
        );
        Arc::new(Metrics {
            registry,
            queue_depth,
            wait_seconds,
            job_duration_seconds,
            jobs_finished,
            jobs_submitted,
            jobs_refused,
            comfy_restarts,
            comfy_ready,
            http_requests,
            gossip,
            webhooks,
            outputs_sent,
            key_lookups,
            key_lookup_messages,
            store,
        })
    }

    pub fn tier(tier: Tier) -> TierLabels {
        TierLabels { tier: tier.into() }
    }

    pub fn finished(&self, tier: Tier, status: JobStatus) {
        self.jobs_finished
            .get_or_create(&FinishedLabels {
                tier: tier.into(),
                status: status.as_str().to_string(),
            })
            .inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_labelled_series() {
        let metrics = Metrics::new();
        metrics
            .queue_depth
            .get_or_create(&Metrics::tier(Tier::Pro))
            .set(3);
        metrics
            .wait_seconds
            .get_or_create(&Metrics::tier(Tier::Free))
            .observe(1.5);
        metrics.finished(Tier::Pro, JobStatus::Succeeded);
        let text = metrics.encode();
        assert!(text.contains("kiln_queue_depth{tier=\"pro\"} 3"), "{text}");
        assert!(
            text.contains("kiln_job_wait_seconds_count{tier=\"free\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kiln_jobs_finished_total{tier=\"pro\",status=\"succeeded\"} 1"),
            "{text}"
        );
    }
}
