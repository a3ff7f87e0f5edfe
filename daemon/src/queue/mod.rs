//! The durable job store of a node and the scheduler that picks the next job.
//!
//! - [`store`]: [`JobStore`], the async handle: submit, get, list, cancel, next job, finish,
//!   positions, usage and change notifications, and the cluster operations (leases, replicas,
//!   adoption, hand-over).
//! - [`writer`]: the one thread that owns the write connection and commits requests in groups
//!   (one fsync per group, not per job).
//! - [`schema`]: the SQLite schema and its ordered migrations (`PRAGMA user_version`).
//! - [`outbox`]: the webhook outbox, written with each final status (see `crate::webhooks`).
//! - [`scheduler`]: the pure in-memory order of queued jobs (tier, then round robin between
//!   accounts, then oldest first).
//!
//! A job that `submit` returned is committed with `synchronous=FULL` in WAL mode: it survives a
//! `kill -9` and a power loss. Output files are written and fsync'd before the commit that marks
//! a job succeeded. This module must never hand out a job state it has not committed, and never
//! hold a lock across an `.await`.
//!
//! # Owners, replicas and leases
//!
//! Every row has a [`JobRole`]. An *owner* row is this node's own job: its authoritative state,
//! queued by this node's scheduler and counted in its usage. A *replica* row is a copy of another
//! member's job ([`JobStore::put_replica`]), kept so this node can take the job over
//! ([`JobStore::adopt`]) when that member dies; replica rows never enter the scheduler, never
//! count usage and are never broadcast as changes. A running owner row may be run by another
//! member, its *lease holder*, under a lease identified by (job id, attempt). The store does not
//! time leases; the node does, and ends an expired one with
//! [`JobStore::finish_attempt`]`(.., Outcome::Requeue)`. Every cluster operation is safe to
//! repeat, and the first final result of a job wins: later ones are dropped.

pub mod outbox;
pub mod scheduler;
pub mod schema;
pub mod store;
pub mod writer;

use std::path::PathBuf;

use serde_json::Value;

use crate::protocol::{
    DeleteReason, JobError, JobStatus, JobView, OutputView, OutputsDeleted, Throttled, Tier,
    WatermarkStatus, rfc3339_ms,
};

pub use outbox::{Attempted, OutboxRow, OutboxState};
pub use scheduler::{QueuedJob, RingPos, Scheduler, TierCount};
pub use store::{
    DB_FILE, DEFAULT_INLINE_MAX_BYTES, JobStore, JobWithOutputs, OutputsWithContent, StoreOptions,
    inline_outputs_in_db, output_files_on_disk, output_folder, system_clock,
};
pub use writer::Clock;

/// JSON kept as text. A job's workflow is only ever stored, sent to peers and handed to
/// ComfyUI, so it is checked once where it comes in (from a row or a peer) and never built
/// into a tree of values again: parsing it into one on every row read and every peer message
/// was a measurable part of a job's CPU time.
#[derive(Clone)]
pub struct JsonText(Box<serde_json::value::RawValue>);

impl JsonText {
    /// Checks that `text` is one JSON value and keeps it as it is.
    pub fn parse(text: String) -> Result<JsonText, serde_json::Error> {
        serde_json::value::RawValue::from_string(text).map(JsonText)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    pub fn as_raw(&self) -> &serde_json::value::RawValue {
        &self.0
    }
}

impl From<&Value> for JsonText {
    fn from(value: &Value) -> JsonText {
        // A `Value` always serializes: its map keys are strings and its numbers finite.
        JsonText(serde_json::value::to_raw_value(value).expect("a JSON value serializes"))
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> JsonText {
        JsonText::from(&value)
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &JsonText) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for JsonText {}

impl std::fmt::Debug for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

/// A job to store, as the API accepted it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Unique job id (the API makes one, e.g. a UUID).
    pub id: String,
    pub account: String,
    pub tier: Tier,
    /// The ComfyUI API-format prompt.
    pub workflow: JsonText,
    pub webhook: Option<String>,
    pub metadata: Option<Value>,
    /// The `Idempotency-Key` header, if any: same account + key + body hash → the same job.
    pub idempotency_key: Option<String>,
    /// A hash of the request body (e.g. hex SHA-256), compared on idempotent replays.
    pub body_hash: String,
    /// How many times the job may start before it fails with `max_attempts` (at least 1).
    pub max_attempts: u32,
    /// The member chosen to hold the job's replica, if any.
    pub replica: Option<String>,
}

/// Whether a stored row is this node's own job or a copy of another member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobRole {
    /// This node owns the job: its row is authoritative and its scheduler queues it.
    Owner,
    /// A copy of a job owned by another member, adopted if that member dies.
    Replica,
}

impl JobRole {
    pub fn as_str(self) -> &'static str {
        match self {
            JobRole::Owner => "owner",
            JobRole::Replica => "replica",
        }
    }
}

impl std::fmt::Display for JobRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(JobRole::Owner),
            "replica" => Ok(JobRole::Replica),
            other => Err(format!("unknown job role {other:?}")),
        }
    }
}

/// A usage limit checked atomically with the submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    /// Jobs per account per UTC day.
    pub per_day: Option<u64>,
    /// Jobs per account per UTC calendar month.
    pub per_month: Option<u64>,
    /// Images per account per UTC calendar month before its new jobs are throttled (queued at
    /// free priority, never refused).
    pub fair_use_images: Option<u64>,
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub job: Job,
    /// `false` when an earlier job with the same idempotency key and body was returned.
    pub created: bool,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    /// Submission order on this node (unique, increasing).
    pub seq: i64,
    pub account: String,
    pub tier: Tier,
    pub status: JobStatus,
    pub workflow: JsonText,
    pub webhook: Option<String>,
    pub metadata: Option<Value>,
    pub idempotency_key: Option<String>,
    pub body_hash: String,
    /// Unix ms.
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub error: Option<JobError>,
    /// Owner row (this node's job) or replica row (a copy of another member's job).
    pub role: JobRole,
    /// Replica rows: the member that owns the job.
    pub owner: Option<String>,
    /// Owner rows: the member holding the job's replica, if any.
    pub replica: Option<String>,
    /// Running rows: the member running the job under a lease (`None`: this node runs it).
    pub lease_holder: Option<String>,
    /// Why the job waits at free priority instead of its tier's (premium fair use passed);
    /// decided at submission by the owner and kept with the job.
    pub throttled: Option<String>,
    /// Unix ms when retention deletes the outputs of a succeeded job (its finish time plus its
    /// tier's retention, see [`StoreOptions::retention`]); `None` when kept for good.
    pub outputs_expire_at_ms: Option<i64>,
    /// When and why this store deleted the job's output files.
    pub outputs_deleted: Option<(i64, DeleteReason)>,
}

impl Job {
    /// The tier the scheduler queues the job under: free when it is throttled.
    pub fn queue_tier(&self) -> Tier {
        if self.throttled.is_some() {
            Tier::Free
        } else {
            self.tier
        }
    }

    /// The job as the API shows it. `position` and `estimated_wait_s` are only shown while
    /// queued, `outputs` only when succeeded.
    pub fn view(
        &self,
        outputs: &[Output],
        position: Option<u64>,
        estimated_wait_s: Option<f64>,
    ) -> JobView {
        let queued = self.status == JobStatus::Queued;
        JobView {
            id: self.id.clone(),
            status: self.status,
            tier: self.tier,
            position: position.filter(|_| queued),
            estimated_wait_s: estimated_wait_s.filter(|_| queued),
            progress: None,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            replicas: 0,
            created_at: rfc3339_ms(self.created_at_ms),
            started_at: self.started_at_ms.map(rfc3339_ms),
            finished_at: self.finished_at_ms.map(rfc3339_ms),
            outputs: outputs.iter().map(|o| o.view(&self.id)).collect(),
            error: self.error.clone(),
            webhook: self.webhook.clone(),
            metadata: self.metadata.clone(),
            throttled: self.throttled.as_ref().map(|reason| Throttled {
                reason: reason.clone(),
                priority: Tier::Free,
            }),
            outputs_expire_at: self
                .outputs_expire_at_ms
                .filter(|_| self.outputs_deleted.is_none())
                .map(rfc3339_ms),
            outputs_deleted: self.outputs_deleted.map(|(at_ms, reason)| OutputsDeleted {
                at: rfc3339_ms(at_ms),
                reason,
            }),
        }
    }
}

/// An output file to store with a succeeded job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOutput {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
    /// Set for outputs of a watermarked tier.
    pub watermark: Option<WatermarkStatus>,
}

/// A stored output file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub index: u32,
    /// The name ComfyUI gave it.
    pub filename: String,
    pub content_type: String,
    pub bytes: u64,
    /// Relative to the data dir: `<output folder>/<job id>.<index>-<safe filename>` (see
    /// [`output_folder`]); results of [`JobStore::finish_attempt`] and
    /// [`JobStore::put_replica`] carry a prefix unique to the call:
    /// `<output folder>/<job id>.<prefix>-<index>-<safe filename>`. Rows written before the
    /// shared folders name `outputs/<job id>/…`.
    pub path: PathBuf,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    pub watermark: Option<WatermarkStatus>,
    /// The object's key when the output is kept in the bucket (`[storage] kind = "s3"`);
    /// `path` is empty then.
    pub key: Option<String>,
    /// The content is kept in the store's database (a small output, see
    /// [`StoreOptions::inline_max_bytes`]); `path` is empty and `key` is `None` then. Read it
    /// with [`JobStore::read_output`], as any output kept on this node.
    pub inline: bool,
}

impl Output {
    pub fn view(&self, job_id: &str) -> OutputView {
        OutputView {
            index: self.index,
            filename: self.filename.clone(),
            content_type: self.content_type.clone(),
            bytes: self.bytes,
            url: format!("/v1/jobs/{job_id}/outputs/{}", self.index),
            watermark: self.watermark.clone(),
        }
    }
}

/// How a running job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        outputs: Vec<NewOutput>,
    },
    Failed(JobError),
    Cancelled,
    /// Put the job back in the queue at its old place (e.g. ComfyUI restarted and lost the
    /// prompt), or fail it with `max_attempts` when its attempts are used up.
    Requeue {
        reason: String,
    },
}

/// What [`JobStore::finish_attempt`] did with a result.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// The result was applied; the job as it is now.
    Applied(Job),
    /// The job already had its final result; this one was dropped and nothing changed.
    Dropped(Job),
    /// A `Requeue` for an attempt that is not the running one; nothing changed.
    Stale(Job),
}

impl Finished {
    /// The job as stored after the call.
    pub fn job(&self) -> &Job {
        match self {
            Finished::Applied(job) | Finished::Dropped(job) | Finished::Stale(job) => job,
        }
    }
}

/// A running owner job that another member runs, as found when the store opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    /// The member running it.
    pub holder: String,
    /// The attempt it runs under (the job's `attempts` when it was taken).
    pub attempt: u32,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The job was queued; it is now cancelled and out of the queue.
    Cancelled(Job),
    /// The job is running: interrupt it in ComfyUI, then `finish(id, Outcome::Cancelled)`.
    Running(Job),
}

/// One entry of a job's status history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub at_ms: i64,
    pub status: JobStatus,
    pub detail: Option<String>,
}

/// A committed change of a job's status, broadcast to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobChange {
    pub id: String,
    pub account: String,
    pub tier: Tier,
    pub status: JobStatus,
    pub at_ms: i64,
}

/// What opening the store did about jobs that were running when the process stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Running jobs put back in the queue at their old place.
    pub requeued: Vec<String>,
    /// Running jobs that had used all their attempts, now failed with `max_attempts`.
    pub failed: Vec<String>,
    /// Jobs queued after recovery.
    pub queued: usize,
    /// Running jobs that another member runs: they stay running; the node times their leases.
    pub leased: Vec<Lease>,
}

/// One account's usage on one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    pub submitted: u64,
    pub refused: u64,
    pub succeeded: u64,
    pub images: u64,
    pub gpu_ms: u64,
}

/// One account's usage on one UTC day, as a merge of members reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUsage {
    pub account: String,
    pub usage: Usage,
}

/// A snapshot of the queue for metrics and wait estimates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    /// Highest priority first.
    pub tiers: Vec<TierCount>,
    pub running: u64,
}

/// Which usage period a quota refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    Day,
    Month,
}

impl QuotaPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
    }
}

/// Errors of the job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no job {0:?}")]
    NotFound(String),
    #[error("idempotency key {key:?} was used for job {job_id} with a different body")]
    IdempotencyConflict { key: String, job_id: String },
    #[error("quota of {limit} jobs per {} used up ({used} used); resets at unix ms {resets_at_ms}", period.as_str())]
    QuotaExceeded {
        period: QuotaPeriod,
        limit: u64,
        used: u64,
        /// When the period ends (unix ms, UTC).
        resets_at_ms: i64,
    },
    #[error("job {id} is {status}")]
    Conflict { id: String, status: JobStatus },
    #[error("job {id} is not owned by this node (owner: {})", owner.as_deref().unwrap_or("unknown"))]
    NotOwner { id: String, owner: Option<String> },
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("job store at {path} is unreadable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "job store schema version {found} is newer than this kilnd supports ({supported}); upgrade kilnd"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// The bucket that keeps outputs refused or failed an operation.
    #[error("output storage: {0}")]
    Objects(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the job store could not commit: {0}")]
    CommitFailed(String),
    #[error("the job store's writer has stopped: {0}")]
    WriterGone(String),
}

impl StoreError {
    pub(crate) fn sqlite(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Sqlite { context, source }
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

/// Days since the Unix epoch of a unix-ms instant (UTC).
pub fn utc_day(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(86_400_000)
}

/// The first day (days since epoch) of the UTC month containing `day`, and of the next month.
pub fn utc_month_bounds(day: i64) -> (i64, i64) {
    let (y, m, _) = civil_from_days(day);
    let start = days_from_civil(y, m, 1);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, days_from_civil(ny, nm, 1))
}

/// Days since the Unix epoch of a `YYYY-MM-DD` date (UTC); `None` when it is not one.
pub fn parse_utc_day(text: &str) -> Option<i64> {
    let mut parts = text.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    if !(1..=12).contains(&m) || d == 0 {
        return None;
    }
    let day = days_from_civil(y, m, d);
    // Rejects 2026-02-30 and the like: the day must come back as written.
    (civil_from_days(day) == (y, m, d)).then_some(day)
}

/// The first day of a `YYYY-MM` month and of the next (days since the Unix epoch, UTC).
pub fn parse_utc_month(text: &str) -> Option<(i64, i64)> {
    let start = parse_utc_day(&format!("{text}-01"))?;
    Some(utc_month_bounds(start))
}

/// `YYYY-MM-DD` of a day since the Unix epoch (UTC).
pub fn format_utc_day(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM` of the month containing a day since the Unix epoch (UTC).
pub fn format_utc_month(day: i64) -> String {
    let (y, m, _) = civil_from_days(day);
    format!("{y:04}-{m:02}")
}

// Howard Hinnant's civil calendar algorithms (proleptic Gregorian, UTC).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y, m as u32, d as u32)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_bounds() {
        // 2026-11-28 is day 20_785.
        let day = utc_day(1_795_824_000_000 + 3_600_000);
        assert_eq!(civil_from_days(day), (2026, 11, 28));
        let (start, end) = utc_month_bounds(day);
        assert_eq!(civil_from_days(start), (2026, 11, 1));
        assert_eq!(civil_from_days(end), (2026, 12, 1));
        let (s2, e2) = utc_month_bounds(days_from_civil(2024, 12, 31));
        assert_eq!(civil_from_days(s2), (2024, 12, 1));
        assert_eq!(civil_from_days(e2), (2025, 1, 1));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }

    #[test]
    fn days_parse_and_print() {
        let day = parse_utc_day("2026-11-28").expect("a date");
        assert_eq!(day, 20_785);
        assert_eq!(format_utc_day(day), "2026-11-28");
        assert_eq!(format_utc_month(day), "2026-11");
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "2026-1-01",
            "26-11-01",
            "2026-11-00",
            "x",
            "",
        ] {
            assert_eq!(parse_utc_day(bad), None, "{bad}");
        }
        let (start, end) = parse_utc_month("2024-12").expect("a month");
        assert_eq!(format_utc_day(start), "2024-12-01");
        assert_eq!(format_utc_day(end), "2025-01-01");
        assert_eq!(parse_utc_month("2024-13"), None);
        assert_eq!(parse_utc_month("2024-12-01"), None);
    }
}
