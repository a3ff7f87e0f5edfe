//! What happens to a job's outputs after the job: retention per tier and deletion.
//!
//! - [`Results`]: deletes one job's outputs (the files in the node's data dir), then records
//!   the deletion in the job store, so that the job view shows `outputs_deleted` and fetching
//!   an output answers 410 `gone`. Used by the sweeper (reason `retention`) and by
//!   `DELETE /v1/jobs/{id}/outputs` (reason `user`).
//! - [`Sweeper`]: the background task every node runs over its own store (owner rows and
//!   replica copies alike): each pass deletes the outputs whose expiry (finish time + the
//!   tier's retention, stamped by the store) has passed, a bounded batch at a time.
//! - [`SweepClock`]: the sweeper's notion of "now": the wall clock when it was made plus the
//!   tokio time elapsed since, so that a test with paused tokio time expires outputs by
//!   advancing time.
//!
//! Files are removed before the deletion is recorded: a crash in between leaves a row the next
//! pass deletes again (removing a missing file is fine), never a recorded deletion whose files
//! stay behind. This module never deletes the outputs of a job that is not final.

pub mod config;
pub mod objects;

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::DeleteReason;
use crate::queue::{Job, JobStore, StoreError};

pub use config::{StorageConfig, StorageKind};
pub use objects::{Credentials, ObjectStorage};

/// Deletes job outputs from where they are stored and records it.
#[derive(Debug, Clone)]
pub struct Results {
    store: JobStore,
}

impl Results {
    pub fn new(store: JobStore) -> Results {
        Results { store }
    }

    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// Deletes the outputs of final job `id` (owner row or replica copy): removes the stored
    /// files, then records `reason` at `at_ms`. Safe to repeat: a job whose outputs are already
    /// deleted is returned as it is. A job that is not final is [`StoreError::Conflict`], an
    /// unknown one [`StoreError::NotFound`].
    pub async fn delete_outputs(
        &self,
        id: &str,
        reason: DeleteReason,
        at_ms: i64,
    ) -> Result<Job, StoreError> {
        let job = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if !job.status.is_final() {
            return Err(StoreError::Conflict {
                id: id.to_string(),
                status: job.status,
            });
        }
        if job.outputs_deleted.is_some() {
            return Ok(job);
        }
        let outputs = self.store.outputs(id).await?;
        self.store.remove_output_files(id, &outputs).await?;
        self.store.mark_outputs_deleted(id, reason, at_ms).await
    }

    /// One sweep: deletes the outputs expired at `now_ms`, at most `batch` jobs. A job whose
    /// files cannot be removed is logged and left for the next pass.
    pub async fn sweep_once(&self, now_ms: i64, batch: usize) -> Result<SweepReport, StoreError> {
        let expired = self.store.expired_outputs(now_ms, batch).await?;
        let mut report = SweepReport {
            found: expired.len(),
            ..SweepReport::default()
        };
        for job in expired {
            match self
                .delete_outputs(&job.id, DeleteReason::Retention, now_ms)
                .await
            {
                Ok(_) => report.deleted += 1,
                Err(error) => {
                    report.failed += 1;
                    tracing::warn!(job = %job.id, %error, "retention: cannot delete the outputs; retrying next pass");
                }
            }
        }
        Ok(report)
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Jobs whose outputs had expired (at most the batch).
    pub found: usize,
    pub deleted: usize,
    pub failed: usize,
}

/// The sweeper's clock: the wall clock (unix ms) when it was made plus the tokio time elapsed
/// since. With paused tokio time, `tokio::time::advance` moves it.
#[derive(Debug, Clone, Copy)]
pub struct SweepClock {
    wall_at_start_ms: i64,
    start: Instant,
}

impl SweepClock {
    /// Starts at the system clock's now.
    pub fn system() -> SweepClock {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        SweepClock::starting_at(wall)
    }

    /// Starts at `wall_ms` (unix ms).
    pub fn starting_at(wall_ms: i64) -> SweepClock {
        SweepClock {
            wall_at_start_ms: wall_ms,
            start: Instant::now(),
        }
    }

    /// Now, in unix ms.
    pub fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.wall_at_start_ms.saturating_add(elapsed)
    }
}

/// How the sweeper runs (`[storage]` `sweep_interval` and `sweep_batch`).
#[derive(Debug, Clone, Copy)]
pub struct SweepSettings {
    /// Time between passes.
    pub interval: Duration,
    /// Most jobs one pass deletes; a full batch starts the next pass at once.
    pub batch: usize,
    /// Most passes in a row without waiting (a bound on one burst of work).
    pub max_burst: usize,
}

impl Default for SweepSettings {
    fn default() -> Self {
        SweepSettings {
            interval: Duration::from_secs(600),
            batch: 500,
            max_burst: 20,
        }
    }
}

/// The retention sweeper: a task that owns its loop; stop it with [`Sweeper::shutdown`]
/// (dropping the handle stops it too).
#[derive(Debug)]
pub struct Sweeper {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Starts sweeping `results` every `settings.interval`, the first pass at once.
    pub fn start(results: Results, settings: SweepSettings, clock: SweepClock) -> Sweeper {
        let stop = CancellationToken::new();
        let task = tokio::spawn(sweep_loop(results, settings, clock, stop.clone()));
        Sweeper {
            stop,
            task: Some(task),
        }
    }

    /// Stops the loop (a pass in progress finishes its current job) and waits up to `wait`.
    pub async fn shutdown(mut self, wait: Duration) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(wait, task).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "the retention sweeper failed"),
                Err(_) => tracing::warn!("the retention sweeper did not stop in time"),
            }
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn sweep_loop(
    results: Results,
    settings: SweepSettings,
    clock: SweepClock,
    stop: CancellationToken,
) {
    let batch = settings.batch.max(1);
    loop {
        // Passes back to back while each finds a full batch, at most `max_burst` of them.
        for _ in 0..settings.max_burst.max(1) {
            if stop.is_cancelled() {
                return;
            }
            match results.sweep_once(clock.now_ms(), batch).await {
                Ok(report) => {
                    if report.deleted > 0 || report.failed > 0 {
                        tracing::info!(
                            deleted = report.deleted,
                            failed = report.failed,
                            "retention: deleted expired outputs"
                        );
                    }
                    if report.found < batch || report.deleted == 0 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "retention: cannot read expired outputs");
                    break;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(settings.interval) => {}
        }
    }
}
