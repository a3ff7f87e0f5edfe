//! The delivery worker: a tokio task that sends the outbox's due rows.
//!
//! It wakes when a job reaches a final status (the store's change stream), when the earliest
//! due row is due, and at least every `poll` (rows made due by adoption announce nothing).
//! Each round takes the due rows, sends up to `concurrency` at once, each with the request
//! timeout, and records every attempt: delivered (2xx), retry at a backed-off time, or
//! abandoned (attempts used up, the job gone, the target refused). It never holds up the job
//! store's writer beyond one short write per attempt, and it stops at its token without waiting
//! for receivers: a delivery cut short stays due and is sent again after the restart.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Settings, target};
use crate::metrics::Metrics;
use crate::protocol::JobStatus;
use crate::queue::{Attempted, Clock, JobRole, JobStore, OutboxRow};

/// The wait before attempt `failures + 1`, after `failures` failed attempts (at least 1):
/// `initial` doubled per failure, capped at `max`, with "equal jitter" — half of it fixed, the
/// other half scaled by `jitter` (uniform in [0, 1)), so receivers coming back are not hit by
/// every sender at once.
pub fn backoff(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << doublings).min(max);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    base / 2 + (base / 2).mul_f64(jitter)
}

/// A delivery that failed, and whether trying again can help.
enum Failure {
    Transient(String),
    /// The job or its body is gone or unusable: trying again cannot help.
    Permanent(String),
    /// The target is not allowed (checked again at delivery).
    Refused(String),
}

struct Ctx {
    store: JobStore,
    settings: Settings,
    metrics: Arc<Metrics>,
    clock: Clock,
    client: reqwest::Client,
}

/// The running delivery worker; [`WebhookWorker::shutdown`] stops it.
pub struct WebhookWorker {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl WebhookWorker {
    /// Starts the worker on `store`'s outbox.
    pub fn start(
        store: JobStore,
        settings: Settings,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> anyhow::Result<WebhookWorker> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            // A redirect could point anywhere; a 3xx is a failed attempt.
            .redirect(reqwest::redirect::Policy::none())
            // Connect to the checked addresses, never through a proxy that would resolve the
            // name again.
            .no_proxy()
            .dns_resolver(target::resolver(settings.allow_private))
            .user_agent(concat!("kiln-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the webhook HTTP client: {e}"))?;
        let stop = CancellationToken::new();
        let ctx = Arc::new(Ctx {
            store,
            settings,
            metrics,
            clock,
            client,
        });
        let task = tokio::spawn(run(ctx, stop.clone()));
        Ok(WebhookWorker { stop, task })
    }

    /// Stops the worker, waiting at most `wait` for it: deliveries in flight are dropped and
    /// stay due.
    pub async fn shutdown(self, wait: Duration) {
        self.stop.cancel();
        match tokio::time::timeout(wait, self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the webhook worker failed"),
            Err(_) => tracing::warn!("the webhook worker did not stop in time"),
        }
    }
}

async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let mut changes = ctx.store.subscribe();
    let prune_every = Duration::from_secs(3600);
    let mut next_prune = tokio::time::Instant::now();
    let batch = ctx.settings.concurrency.max(1) * 4;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune = tokio::time::Instant::now() + prune_every;
            let retention_ms =
                i64::try_from(ctx.settings.retention.as_millis()).unwrap_or(i64::MAX);
            match ctx
                .store
                .outbox_prune((ctx.clock)().saturating_sub(retention_ms))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "webhook outbox: pruned old rows"),
                Err(error) => tracing::warn!(%error, "webhook outbox: pruning failed"),
            }
        }
        let due = match ctx.store.outbox_due((ctx.clock)(), batch).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "webhook outbox: cannot read due rows");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(ctx.settings.poll) => continue,
                }
            }
        };
        let full = due.len() >= batch;
        let mut all_recorded = true;
        if !due.is_empty() {
            let concurrency = ctx.settings.concurrency.max(1);
            let sends = futures::stream::iter(due)
                .map(|row| deliver(&ctx, row))
                .buffer_unordered(concurrency)
                .collect::<Vec<bool>>();
            tokio::select! {
                _ = stop.cancelled() => return,
                recorded = sends => all_recorded = recorded.into_iter().all(|r| r),
            }
        }
        let next_at = match ctx.store.outbox_pending().await {
            Ok((next_at, depth)) => {
                ctx.metrics
                    .webhooks
                    .outbox_depth
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
                next_at
            }
            Err(error) => {
                tracing::warn!(%error, "webhook outbox: cannot read its depth");
                None
            }
        };
        // A full batch moved every row it sent: the next one is different rows. After a failed
        // record the same rows are still due, so the wait below keeps this from spinning.
        if full && all_recorded {
            continue;
        }
        let wait = next_at
            .map(|at| Duration::from_millis(u64::try_from(at - (ctx.clock)()).unwrap_or(0)))
            .unwrap_or(ctx.settings.poll)
            .clamp(MIN_WAIT, ctx.settings.poll.max(MIN_WAIT));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = final_change(&mut changes) => {}
        }
    }
}

/// Waits for a job to reach a final status (or for missed changes, which may include one).
async fn final_change(changes: &mut broadcast::Receiver<crate::queue::JobChange>) {
    loop {
        match changes.recv().await {
            Ok(change) if change.status.is_final() => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            // The store is closing; the stop token ends the worker.
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// The shortest pause between rounds that did not fill a batch.
const MIN_WAIT: Duration = Duration::from_millis(100);

/// Sends one row and records the attempt; `false` when the record could not be written.
async fn deliver(ctx: &Ctx, row: OutboxRow) -> bool {
    let attempt = row.attempts.saturating_add(1);
    let (attempted, outcome) = match send(ctx, &row).await {
        Ok(()) => (Attempted::Delivered, "delivered"),
        Err(Failure::Permanent(error)) => (Attempted::Abandon { error }, "abandoned"),
        Err(Failure::Refused(error)) => (Attempted::Abandon { error }, "refused"),
        Err(Failure::Transient(error)) if attempt >= ctx.settings.max_attempts => (
            Attempted::Abandon {
                error: format!("{error} (gave up after {attempt} attempts)"),
            },
            "abandoned",
        ),
        Err(Failure::Transient(error)) => {
            let wait = backoff(
                attempt,
                ctx.settings.backoff_initial,
                ctx.settings.backoff_max,
                rand::random::<f64>(),
            );
            let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
            (
                Attempted::Retry {
                    error,
                    next_at_ms: (ctx.clock)().saturating_add(wait_ms),
                },
                "failed",
            )
        }
    };
    match &attempted {
        Attempted::Delivered => {
            tracing::info!(job = %row.job_id, attempt, "webhook delivered")
        }
        Attempted::Retry { error, .. } => {
            tracing::info!(job = %row.job_id, attempt, %error, "webhook failed; will retry")
        }
        Attempted::Abandon { error } => {
            tracing::warn!(job = %row.job_id, attempt, %error, "webhook abandoned")
        }
    }
    ctx.metrics
        .webhooks
        .deliveries
        .get_or_create(&crate::metrics::OutcomeLabels {
            outcome: outcome.to_string(),
        })
        .inc();
    match ctx.store.outbox_record(&row.job_id, attempted).await {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(job = %row.job_id, %error, "webhook outbox: cannot record an attempt");
            false
        }
    }
}

/// The job's JSON as the API shows it.
async fn body(ctx: &Ctx, job_id: &str) -> Result<Vec<u8>, Failure> {
    let job = match ctx.store.get(job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return Err(Failure::Permanent("the job is no longer stored".into())),
        Err(error) => return Err(Failure::Transient(format!("reading the job: {error}"))),
    };
    let outputs = if job.status == JobStatus::Succeeded {
        ctx.store
            .outputs(job_id)
            .await
            .map_err(|e| Failure::Transient(format!("reading the job's outputs: {e}")))?
    } else {
        Vec::new()
    };
    let mut view = job.view(&outputs, None, None);
    view.replicas = match job.role {
        JobRole::Owner => u32::from(job.replica.is_some()),
        JobRole::Replica => 1,
    };
    serde_json::to_vec(&view).map_err(|e| Failure::Permanent(format!("encoding the job: {e}")))
}

async fn send(ctx: &Ctx, row: &OutboxRow) -> Result<(), Failure> {
    let url = target::check_url(&row.url, ctx.settings.allow_private)
        .map_err(|why| Failure::Refused(format!("webhook {:?} refused: {why}", row.url)))?;
    let body = body(ctx, &row.job_id).await?;
    let timestamp = (ctx.clock)().div_euclid(1000);
    let signature = ctx.settings.secret.sign(&row.event_id, timestamp, &body);
    let response = ctx
        .client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &row.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .map_err(|e| Failure::Transient(error_chain(&e)))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(Failure::Transient(format!(
            "the receiver answered {status}"
        )))
    }
}

/// An error with its causes, e.g. "error sending request: …: connection refused".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // Bounded: error chains are short, but a cycle must not loop forever.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        let initial = Duration::from_secs(5);
        let max = Duration::from_secs(3600);
        // Without jitter: half the doubled base; with the most jitter: the whole base.
        let low: Vec<u64> = (1..=12)
            .map(|n| backoff(n, initial, max, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(
            low,
            [
                2_500, 5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000,
                1_800_000, 1_800_000
            ]
        );
        let high = backoff(3, initial, max, 1.0);
        assert_eq!(high, Duration::from_secs(20));
        assert_eq!(backoff(1000, initial, max, 1.0), max);
        assert_eq!(backoff(0, initial, max, 1.0), initial);
        // Nonsense jitter is clamped, never a panic.
        assert_eq!(backoff(2, initial, max, f64::NAN), Duration::from_secs(5));
        assert_eq!(backoff(2, initial, max, 7.0), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_add_up_to_a_day_with_the_defaults() {
        // Sleeps the default schedule (40 attempts, mean jitter) on paused time: the retries of
        // one webhook span about a day.
        let start = tokio::time::Instant::now();
        for failures in 1..40 {
            let wait = backoff(
                failures,
                Duration::from_secs(5),
                Duration::from_secs(3600),
                0.5,
            );
            tokio::time::sleep(wait).await;
        }
        let spent = start.elapsed();
        assert!(spent > Duration::from_secs(20 * 3600), "{spent:?}");
        assert!(spent < Duration::from_secs(26 * 3600), "{spent:?}");
    }
}
