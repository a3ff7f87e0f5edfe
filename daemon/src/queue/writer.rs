//! The writer thread: the only code that writes to the job store's database.
//!
//! Requests arrive on a channel. The thread takes whatever is queued (up to a batch limit),
//! applies all of it in one transaction (each request inside its own savepoint, so one failed
//! request does not undo the others), commits once — one fsync for the whole group — and only
//! then answers each request and broadcasts the changes. So no caller ever sees a state that is
//! not durable, and throughput does not pay one fsync per job.
//!
//! It also keeps the in-memory [`Scheduler`] in step with the rows it writes; if a request or a
//! commit fails halfway, the scheduler is rebuilt from the database, which stays the truth.
//!
//! It must never block on anything but SQLite and its channel, never hold the state lock while
//! committing, and never answer before the commit.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};

use super::outbox::{self, OutboxState};
use super::scheduler::{QueuedJob, RingPos, Scheduler};
use super::store::{load_job, load_jobs, load_queued, load_ring};
use super::{
    CancelOutcome, Finished, Job, JobChange, JobRole, Lease, NewJob, Output, Quota, QuotaPeriod,
    RecoveryReport, StoreError, Submitted, utc_day, utc_month_bounds,
};
use crate::metrics::StoreMetrics;
use crate::protocol::{DeleteReason, JobError, JobStatus, Tier, WatermarkStatus};

/// Milliseconds since the Unix epoch; injectable so tests can move days.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The in-memory state beside the database.
#[derive(Debug, Default)]
pub(crate) struct MemState {
    pub scheduler: Scheduler,
    pub running: HashSet<String>,
}

/// What the handle and the writer share.
pub(crate) struct Shared {
    pub state: Mutex<MemState>,
    pub changes: broadcast::Sender<JobChange>,
    pub work: Notify,
    pub clock: Clock,
    pub data_dir: PathBuf,
    pub db_path: PathBuf,
}

impl Shared {
    /// Locks the state; a panic elsewhere while holding it leaves data that is still usable
    /// (the scheduler is rebuilt on the next failure), so poisoning is not fatal.
    pub fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn now(&self) -> i64 {
        (self.clock)()
    }
}

/// An output ready to be recorded: its row, and the content the row keeps when the output is
/// inline (kept in the database); `None` for a file already written and fsync'd, or an object
/// already in the bucket.
#[derive(Debug)]
pub(crate) struct StoredOutput {
    pub(crate) output: Output,
    pub(crate) data: Option<Vec<u8>>,
}

impl StoredOutput {
    /// An output whose content is not in the database.
    pub(crate) fn elsewhere(output: Output) -> StoredOutput {
        StoredOutput { output, data: None }
    }
}

/// How a running job ends, with output files already written and fsync'd.
#[derive(Debug)]
pub(crate) enum FinishOp {
    Succeeded(Vec<StoredOutput>),
    Failed(JobError),
    Cancelled,
    Requeue(String),
}

/// A job's JSON columns, encoded before the request reaches the writer.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub workflow: String,
    pub metadata: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(crate) enum Request {
    Submit {
        job: Box<NewJob>,
        /// The workflow and metadata as JSON text, encoded by the caller (off this thread).
        encoded: Encoded,
        quota: Option<Quota>,
        reply: Reply<Submitted>,
    },
    Next {
        /// The member that will run the job (`None`: this node).
        holder: Option<String>,
        reply: Reply<Option<Job>>,
    },
    Cancel {
        id: String,
        reply: Reply<CancelOutcome>,
    },
    Finish {
        id: String,
        op: FinishOp,
        reply: Reply<Job>,
    },
    FinishAttempt {
        id: String,
        attempt: u32,
        op: FinishOp,
        reply: Reply<Finished>,
    },
    SetReplica {
        id: String,
        replica: Option<String>,
        reply: Reply<Job>,
    },
    PutReplica {
        copy: Box<Job>,
        encoded: Encoded,
        owner: String,
        /// Outputs (files already written and fsync'd); recorded only if the copy is applied.
        outputs: Vec<StoredOutput>,
        /// The stored row, and whether `outputs` were recorded.
        reply: Reply<(Job, bool)>,
    },
    Adopt {
        owner: String,
        reply: Reply<Vec<Job>>,
    },
    HandOver {
        id: String,
        new_owner: String,
        reply: Reply<Job>,
    },
    DropCopy {
        id: String,
        owner: String,
        reply: Reply<bool>,
    },
    Outbox {
        op: super::outbox::OutboxOp,
        reply: Reply<usize>,
    },
    /// Records that a final job's output files are deleted (they are removed before this).
    OutputsDeleted {
        id: String,
        reason: DeleteReason,
        at_ms: i64,
        reply: Reply<Job>,
    },
}

impl Request {
    /// Answers the request with an error without applying it.
    fn reject(self, err: StoreError) {
        // A caller that stopped waiting is not an error.
        match self {
            Request::Submit { reply, .. } => drop(reply.send(Err(err))),
            Request::Next { reply, .. } => drop(reply.send(Err(err))),
            Request::Cancel { reply, .. } => drop(reply.send(Err(err))),
            Request::Finish { reply, .. } => drop(reply.send(Err(err))),
            Request::FinishAttempt { reply, .. } => drop(reply.send(Err(err))),
            Request::SetReplica { reply, .. } => drop(reply.send(Err(err))),
            Request::PutReplica { reply, .. } => drop(reply.send(Err(err))),
            Request::Adopt { reply, .. } => drop(reply.send(Err(err))),
            Request::HandOver { reply, .. } => drop(reply.send(Err(err))),
            Request::DropCopy { reply, .. } => drop(reply.send(Err(err))),
            Request::Outbox { reply, .. } => drop(reply.send(Err(err))),
            Request::OutputsDeleted { reply, .. } => drop(reply.send(Err(err))),
        }
    }
}

/// A reply waiting for the commit.
trait PendingReply: Send {
    /// Sends the result (after the commit).
    fn send(self: Box<Self>);
    /// Sends a commit failure instead of the result.
    fn fail(self: Box<Self>, message: &str);
}

struct Answer<T> {
    reply: Reply<T>,
    result: Result<T, StoreError>,
}

impl<T: Send> PendingReply for Answer<T> {
    fn send(self: Box<Self>) {
        // A caller that stopped waiting is not an error: the work is committed either way.
        let _ = self.reply.send(self.result);
    }

    fn fail(self: Box<Self>, message: &str) {
        let _ = self
            .reply
            .send(Err(StoreError::CommitFailed(message.to_string())));
    }
}

type Pending = Box<dyn PendingReply>;

/// A request's pending answer, and whether its savepoint is kept: a request that failed on the
/// database is rolled back; one refused for a reason of its own (a conflict) wrote nothing.
fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> (Pending, bool) {
    let ok = !matches!(
        result,
        Err(StoreError::Sqlite { .. }) | Err(StoreError::Corrupt { .. })
    );
    (Box::new(Answer { reply, result }), ok)
}

/// Like [`answer`], but any error rolls the request's savepoint back.
fn answer_all_or_nothing<T: Send + 'static>(
    reply: Reply<T>,
    result: Result<T, StoreError>,
) -> (Pending, bool) {
    let ok = result.is_ok();
    (Box::new(Answer { reply, result }), ok)
}

/// Effects to publish after the commit.
#[derive(Default)]
struct Effects {
    changes: Vec<JobChange>,
    work: bool,
    running_add: Vec<String>,
    running_remove: Vec<String>,
}

/// Runs the writer until every sender is gone.
pub(crate) fn run(
    mut conn: Connection,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Request>,
    max_batch: usize,
    metrics: StoreMetrics,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        metrics.commit_requests.inc_by(batch.len() as u64);
        process(&mut conn, &shared, batch.drain(..), &metrics);
    }
    // Fold the WAL back into the main file so an operator's sqlite3 sees everything at once.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(error = %e, "job store: final WAL checkpoint failed");
    }
}

fn process(
    conn: &mut Connection,
    shared: &Shared,
    batch: impl Iterator<Item = Request>,
    metrics: &StoreMetrics,
) {
    let now = shared.now();
    let mut pending: Vec<Pending> = Vec::new();
    let mut effects = Effects::default();
    let mut rebuild = false;
    if let Err(e) = control(conn, "BEGIN IMMEDIATE") {
        let message = format!("starting a transaction: {e}");
        tracing::error!(error = %e, "job store: cannot start a transaction");
        for req in batch {
            req.reject(StoreError::CommitFailed(message.clone()));
        }
        return;
    }
    for req in batch {
        if let Some(p) = apply_one(conn, shared, req, now, &mut effects, &mut rebuild) {
            pending.push(p);
        }
    }
    let committing = std::time::Instant::now();
    let committed = control(conn, "COMMIT");
    if committed.is_err() && !conn.is_autocommit() {
        // A commit that failed may leave the transaction open: nothing of it is kept.
        if let Err(e) = control(conn, "ROLLBACK") {
            tracing::error!(error = %e, "job store: rolling back a failed commit failed");
        }
    }
    metrics.commits.inc();
    metrics
        .commit_seconds
        .observe(committing.elapsed().as_secs_f64());
    match committed {
        Ok(()) => {
            {
                let mut state = shared.lock();
                for id in effects.running_add.drain(..) {
                    state.running.insert(id);
                }
                for id in &effects.running_remove {
                    state.running.remove(id);
                }
            }
            if rebuild {
                rebuild_scheduler(conn, shared);
            }
            for p in pending {
                p.send();
            }
            for change in effects.changes {
                // No subscriber is fine.
                let _ = shared.changes.send(change);
            }
            if effects.work {
                shared.work.notify_one();
                shared.work.notify_waiters();
            }
        }
        Err(e) => {
            let message = format!("committing: {e}");
            tracing::error!(error = %e, "job store: commit failed");
            rebuild_scheduler(conn, shared);
            for p in pending {
                p.fail(&message);
            }
        }
    }
}

/// Runs one of the writer's transaction statements (`BEGIN`, `COMMIT`, `SAVEPOINT`, ...) from
/// the statement cache; rusqlite's `Transaction` and `Savepoint` compile theirs on every use,
/// several times per commit.
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Opens the savepoint of one request inside the open transaction.
fn savepoint(conn: &Connection) -> rusqlite::Result<()> {
    control(conn, "SAVEPOINT request")
}

/// Keeps what the request wrote (it is committed with the transaction).
fn release(conn: &Connection) -> rusqlite::Result<()> {
    control(conn, "RELEASE request")
}

/// Undoes what the request wrote and closes its savepoint.
fn roll_back(conn: &Connection) -> rusqlite::Result<()> {
    control(conn, "ROLLBACK TO request")?;
    control(conn, "RELEASE request")
}

/// Applies one request inside its own savepoint.
fn apply_one(
    conn: &Connection,
    shared: &Shared,
    req: Request,
    now: i64,
    effects: &mut Effects,
    rebuild: &mut bool,
) -> Option<Pending> {
    if let Err(e) = savepoint(conn) {
        req.reject(StoreError::CommitFailed(format!(
            "starting a savepoint: {e}"
        )));
        return None;
    }
    let mut local = Effects::default();
    let mut touched_memory = false;
    let touched = &mut touched_memory;
    let fx = &mut local;
    let (pending, ok) = match req {
        Request::Submit {
            job,
            encoded,
            quota,
            reply,
        } => answer(
            reply,
            submit(conn, shared, (job, encoded), quota, now, fx, touched),
        ),
        Request::Next { holder, reply } => answer_all_or_nothing(
            reply,
            next(conn, shared, holder.as_deref(), now, fx, touched),
        ),
        Request::Cancel { id, reply } => answer(reply, cancel(conn, shared, &id, now, fx, touched)),
        Request::Finish { id, op, reply } => {
            answer(reply, finish(conn, shared, &id, op, now, fx, touched))
        }
        Request::FinishAttempt {
            id,
            attempt,
            op,
            reply,
        } => answer_all_or_nothing(
            reply,
            finish_attempt(conn, shared, (&id, attempt), op, now, fx, touched),
        ),
        Request::SetReplica { id, replica, reply } => {
            answer_all_or_nothing(reply, set_replica(conn, shared, &id, replica.as_deref()))
        }
        Request::PutReplica {
            copy,
            encoded,
            owner,
            outputs,
            reply,
        } => answer_all_or_nothing(
            reply,
            put_replica(conn, shared, (&*copy, encoded), &owner, &outputs, now),
        ),
        Request::Adopt { owner, reply } => {
            answer_all_or_nothing(reply, adopt(conn, shared, &owner, now, fx, touched))
        }
        Request::HandOver {
            id,
            new_owner,
            reply,
        } => answer_all_or_nothing(
            reply,
            hand_over(conn, shared, (&id, &new_owner), now, fx, touched),
        ),
        Request::DropCopy { id, owner, reply } => {
            answer_all_or_nothing(reply, drop_copy(conn, shared, &id, &owner))
        }
        Request::Outbox { op, reply } => answer_all_or_nothing(reply, outbox::apply(conn, op, now)),
        Request::OutputsDeleted {
            id,
            reason,
            at_ms,
            reply,
        } => answer(reply, outputs_deleted(conn, shared, &id, reason, at_ms)),
    };
    let release_failed = if ok { release(conn).err() } else { None };
    if ok && release_failed.is_none() {
        effects.changes.append(&mut local.changes);
        effects.work |= local.work;
        effects.running_add.append(&mut local.running_add);
        effects.running_remove.append(&mut local.running_remove);
        return Some(pending);
    }
    // Undo the request's rows and drop its savepoint; memory may be ahead of the rows.
    if let Err(e) = roll_back(conn) {
        tracing::error!(error = %e, "job store: rolling back a request failed");
    }
    if touched_memory {
        *rebuild = true;
    }
    match release_failed {
        // Its rows are gone, so it must not be answered as done.
        Some(e) => {
            pending.fail(&format!("releasing the request's savepoint: {e}"));
            None
        }
        None => Some(pending),
    }
}

fn upsert_ring(tx: &Connection, ring: &RingPos) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO fair_ring (tier, account, pos) VALUES (?1, ?2, ?3)
         ON CONFLICT (tier, account) DO UPDATE SET pos = excluded.pos",
    )
    .and_then(|mut st| {
        st.execute(params![
            ring.tier.rank(),
            ring.account,
            i64::try_from(ring.pos).unwrap_or(i64::MAX)
        ])
    })
    .map_err(StoreError::sqlite("saving the fairness ring"))?;
    Ok(())
}

fn add_event(
    tx: &Connection,
    id: &str,
    now: i64,
    status: JobStatus,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO job_events (job_id, at, status, detail) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut st| st.execute(params![id, now, status.as_str(), detail]))
    .map_err(StoreError::sqlite("recording a job event"))?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Counter {
    Submitted,
    Refused,
}

fn count_usage(
    tx: &Connection,
    account: &str,
    day: i64,
    counter: Counter,
) -> Result<(), StoreError> {
    let sql = match counter {
        Counter::Submitted => {
            "INSERT INTO usage_daily (account, day, submitted) VALUES (?1, ?2, 1)
             ON CONFLICT (account, day) DO UPDATE SET submitted = submitted + 1"
        }
        Counter::Refused => {
            "INSERT INTO usage_daily (account, day, refused) VALUES (?1, ?2, 1)
             ON CONFLICT (account, day) DO UPDATE SET refused = refused + 1"
        }
    };
    tx.prepare_cached(sql)
        .and_then(|mut st| st.execute(params![account, day]))
        .map_err(StoreError::sqlite("counting usage"))?;
    Ok(())
}

fn count_finished(
    tx: &Connection,
    account: &str,
    day: i64,
    succeeded: bool,
    images: u64,
    gpu_ms: i64,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO usage_daily (account, day, succeeded, images, gpu_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (account, day) DO UPDATE SET succeeded = succeeded + excluded.succeeded,
             images = images + excluded.images, gpu_ms = gpu_ms + excluded.gpu_ms",
    )
    .and_then(|mut st| {
        st.execute(params![
            account,
            day,
            i64::from(succeeded),
            i64::try_from(images).unwrap_or(i64::MAX),
            gpu_ms.max(0)
        ])
    })
    .map_err(StoreError::sqlite("counting usage"))?;
    Ok(())
}

/// Which counter a limit is about.
#[derive(Clone, Copy)]
enum Counted {
    Submitted,
    Images,
}

/// What `account` used in `[from_day, to_day)`: this node's own counts plus those it holds as
/// replica of the account's other owners (an adopter or a new owner inherits them).
fn used_in(
    tx: &Connection,
    account: &str,
    from_day: i64,
    to_day: i64,
    counted: Counted,
) -> Result<u64, StoreError> {
    let sql = match counted {
        Counted::Submitted => {
            "SELECT (SELECT COALESCE(SUM(submitted), 0) FROM usage_daily
                     WHERE account = ?1 AND day >= ?2 AND day < ?3)
                  + (SELECT COALESCE(SUM(submitted), 0) FROM usage_replica
                     WHERE account = ?1 AND day >= ?2 AND day < ?3)"
        }
        Counted::Images => {
            "SELECT (SELECT COALESCE(SUM(images), 0) FROM usage_daily
                     WHERE account = ?1 AND day >= ?2 AND day < ?3)
                  + (SELECT COALESCE(SUM(images), 0) FROM usage_replica
                     WHERE account = ?1 AND day >= ?2 AND day < ?3)"
        }
    };
    let used: i64 = tx
        .prepare_cached(sql)
        .and_then(|mut st| st.query_row(params![account, from_day, to_day], |row| row.get(0)))
        .map_err(StoreError::sqlite("reading usage"))?;
    Ok(u64::try_from(used).unwrap_or(0))
}

/// Why a new job of `account` is throttled, if the account used its monthly fair use.
fn fair_use_throttle(
    tx: &Connection,
    account: &str,
    quota: Quota,
    now: i64,
) -> Result<Option<String>, StoreError> {
    let Some(limit) = quota.fair_use_images else {
        return Ok(None);
    };
    let (start, end) = utc_month_bounds(utc_day(now));
    let used = used_in(tx, account, start, end, Counted::Images)?;
    Ok((used >= limit).then(|| {
        format!(
            "fair use: {} of {} images this month",
            thousands(used),
            thousands(limit)
        )
    }))
}

/// `5012` → `"5,012"`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Counts a replica row this node stores for the first time (`submitted`), or one that became
/// final here (`finished`), in `usage_replica` on the day the owner counted it.
fn count_replica_usage(
    tx: &Connection,
    copy: &Job,
    submitted: bool,
    finished: bool,
    images: u64,
) -> Result<(), StoreError> {
    if submitted {
        tx.prepare_cached(
            "INSERT INTO usage_replica (account, day, submitted) VALUES (?1, ?2, 1)
             ON CONFLICT (account, day) DO UPDATE SET submitted = submitted + 1",
        )
        .and_then(|mut st| st.execute(params![copy.account, utc_day(copy.created_at_ms)]))
        .map_err(StoreError::sqlite("counting replica usage"))?;
    }
    if finished {
        let day = utc_day(copy.finished_at_ms.unwrap_or(copy.created_at_ms));
        let ran_ms = match (copy.started_at_ms, copy.finished_at_ms) {
            (Some(start), Some(end)) => (end - start).max(0),
            _ => 0,
        };
        let succeeded = copy.status == JobStatus::Succeeded;
        tx.prepare_cached(
            "INSERT INTO usage_replica (account, day, succeeded, images, gpu_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (account, day) DO UPDATE SET succeeded = succeeded + excluded.succeeded,
                 images = images + excluded.images, gpu_ms = gpu_ms + excluded.gpu_ms",
        )
        .and_then(|mut st| {
            st.execute(params![
                copy.account,
                day,
                i64::from(succeeded),
                i64::try_from(images).unwrap_or(i64::MAX),
                ran_ms
            ])
        })
        .map_err(StoreError::sqlite("counting replica usage"))?;
    }
    Ok(())
}

fn check_quota(
    tx: &Connection,
    account: &str,
    quota: Quota,
    now: i64,
) -> Result<Option<StoreError>, StoreError> {
    let day = utc_day(now);
    if let Some(limit) = quota.per_day {
        let used = used_in(tx, account, day, day + 1, Counted::Submitted)?;
        if used >= limit {
            return Ok(Some(StoreError::QuotaExceeded {
                period: QuotaPeriod::Day,
                limit,
                used,
                resets_at_ms: (day + 1) * 86_400_000,
            }));
        }
    }
    if let Some(limit) = quota.per_month {
        let (start, end) = utc_month_bounds(day);
        let used = used_in(tx, account, start, end, Counted::Submitted)?;
        if used >= limit {
            return Ok(Some(StoreError::QuotaExceeded {
                period: QuotaPeriod::Month,
                limit,
                used,
                resets_at_ms: end * 86_400_000,
            }));
        }
    }
    Ok(None)
}

fn submit(
    tx: &Connection,
    shared: &Shared,
    (new, encoded): (Box<NewJob>, Encoded),
    quota: Option<Quota>,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Submitted, StoreError> {
    if let Some(key) = &new.idempotency_key {
        let found: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT job_id, body_hash FROM idempotency_keys WHERE account = ?1 AND key = ?2",
            )
            .and_then(|mut st| {
                st.query_row(params![new.account, key], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()
            })
            .map_err(StoreError::sqlite("reading idempotency keys"))?;
        if let Some((job_id, hash)) = found {
            if hash != new.body_hash {
                return Err(StoreError::IdempotencyConflict {
                    key: key.clone(),
                    job_id,
                });
            }
            let job =
                load_job(tx, &shared.db_path, &job_id)?.ok_or_else(|| StoreError::Corrupt {
                    path: shared.db_path.clone(),
                    detail: format!("idempotency key {key:?} names job {job_id}, which is missing"),
                })?;
            return Ok(Submitted {
                job,
                created: false,
            });
        }
    }
    // The same submission again (a forwarder that lost the answer and tried once more, here or
    // at the member holding the copy) gets the job it already made; anything else under that
    // id is refused.
    if let Some(existing) = load_job(tx, &shared.db_path, &new.id)? {
        if existing.account == new.account && existing.body_hash == new.body_hash {
            return Ok(Submitted {
                job: existing,
                created: false,
            });
        }
        return Err(StoreError::Invalid(format!(
            "job id {:?} already exists",
            new.id
        )));
    }
    if let Some(quota) = quota
        && let Some(refusal) = check_quota(tx, &new.account, quota, now)?
    {
        count_usage(tx, &new.account, utc_day(now), Counter::Refused)?;
        return Err(refusal);
    }
    let throttled = match quota {
        Some(quota) => fair_use_throttle(tx, &new.account, quota, now)?,
        None => None,
    };
    let Encoded { workflow, metadata } = encoded;
    tx.prepare_cached(
        "INSERT INTO jobs (id, account, tier, status, workflow, webhook, metadata,
             idempotency_key, body_hash, created_at, attempts, max_attempts, role, replica,
             throttled)
         VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10, 'owner', ?11, ?12)",
    )
    .and_then(|mut st| {
        st.execute(params![
            new.id,
            new.account,
            new.tier.rank(),
            workflow,
            new.webhook,
            metadata,
            new.idempotency_key,
            new.body_hash,
            now,
            new.max_attempts,
            new.replica,
            throttled
        ])
    })
    .map_err(StoreError::sqlite("inserting the job"))?;
    let seq = tx.last_insert_rowid();
    add_event(tx, &new.id, now, JobStatus::Queued, None)?;
    if let Some(key) = &new.idempotency_key {
        tx.prepare_cached(
            "INSERT INTO idempotency_keys (account, key, job_id, body_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut st| st.execute(params![new.account, key, new.id, new.body_hash, now]))
        .map_err(StoreError::sqlite("saving the idempotency key"))?;
    }
    count_usage(tx, &new.account, utc_day(now), Counter::Submitted)?;
    let joined = {
        let mut state = shared.lock();
        *touched_memory = true;
        state.scheduler.push(QueuedJob {
            id: new.id.clone(),
            tier: if throttled.is_some() {
                Tier::Free
            } else {
                new.tier
            },
            account: new.account.clone(),
            seq,
            created_at_ms: now,
        })
    };
    if let Some(ring) = joined {
        upsert_ring(tx, &ring)?;
    }
    effects.work = true;
    effects.changes.push(JobChange {
        id: new.id.clone(),
        account: new.account.clone(),
        tier: new.tier,
        status: JobStatus::Queued,
        at_ms: now,
    });
    let NewJob {
        id,
        account,
        tier,
        workflow,
        webhook,
        metadata,
        idempotency_key,
        body_hash,
        max_attempts,
        replica,
    } = *new;
    Ok(Submitted {
        job: Job {
            id,
            seq,
            account,
            tier,
            status: JobStatus::Queued,
            workflow,
            webhook,
            metadata,
            idempotency_key,
            body_hash,
            created_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            attempts: 0,
            max_attempts,
            error: None,
            role: JobRole::Owner,
            owner: None,
            replica,
            lease_holder: None,
            throttled,
            outputs_expire_at_ms: None,
            outputs_deleted: None,
        },
        created: true,
    })
}

fn next(
    tx: &Connection,
    shared: &Shared,
    holder: Option<&str>,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Option<Job>, StoreError> {
    // Bounded: each round removes one entry from the scheduler.
    let bound = shared.lock().scheduler.len();
    for _ in 0..bound {
        let taken = {
            let mut state = shared.lock();
            *touched_memory = true;
            match state.scheduler.pop() {
                Some(t) => t,
                None => return Ok(None),
            }
        };
        if let Some(moved) = &taken.moved {
            upsert_ring(tx, moved)?;
        }
        let changed = tx
            .prepare_cached(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?2,
                     ring_pos = ?3, lease_holder = ?4
                 WHERE id = ?1 AND status = 'queued' AND role = 'owner'",
            )
            .and_then(|mut st| {
                st.execute(params![
                    taken.job.id,
                    now,
                    i64::try_from(taken.ring_pos).unwrap_or(i64::MAX),
                    holder
                ])
            })
            .map_err(StoreError::sqlite("starting the job"))?;
        if changed == 0 {
            // The scheduler had a job the rows do not show as queued; skip it.
            tracing::warn!(job = %taken.job.id, "job store: scheduled job is not queued; skipped");
            continue;
        }
        let job =
            load_job(tx, &shared.db_path, &taken.job.id)?.ok_or_else(|| StoreError::Corrupt {
                path: shared.db_path.clone(),
                detail: format!("job {} vanished while starting", taken.job.id),
            })?;
        tx.prepare_cached(
            "INSERT OR REPLACE INTO attempts (job_id, n, started_at) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut st| st.execute(params![job.id, job.attempts, now]))
        .map_err(StoreError::sqlite("recording the attempt"))?;
        add_event(
            tx,
            &job.id,
            now,
            JobStatus::Running,
            Some(&format!("attempt {}", job.attempts)),
        )?;
        effects.running_add.push(job.id.clone());
        effects.changes.push(change(&job, JobStatus::Running, now));
        return Ok(Some(job));
    }
    Ok(None)
}

fn change(job: &Job, status: JobStatus, now: i64) -> JobChange {
    JobChange {
        id: job.id.clone(),
        account: job.account.clone(),
        tier: job.tier,
        status,
        at_ms: now,
    }
}

fn cancel(
    tx: &Connection,
    shared: &Shared,
    id: &str,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<CancelOutcome, StoreError> {
    let job = load_owned(tx, shared, id)?;
    match job.status {
        JobStatus::Queued => {
            tx.prepare_cached(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?2 WHERE id = ?1",
            )
            .and_then(|mut st| st.execute(params![id, now]))
            .map_err(StoreError::sqlite("cancelling the job"))?;
            outbox::enqueue(tx, id, now, OutboxState::Due)?;
            add_event(
                tx,
                id,
                now,
                JobStatus::Cancelled,
                Some("cancelled while queued"),
            )?;
            {
                let mut state = shared.lock();
                *touched_memory = true;
                state.scheduler.remove(id);
            }
            effects
                .changes
                .push(change(&job, JobStatus::Cancelled, now));
            Ok(CancelOutcome::Cancelled(Job {
                status: JobStatus::Cancelled,
                finished_at_ms: Some(now),
                ..job
            }))
        }
        JobStatus::Running => Ok(CancelOutcome::Running(job)),
        status => Err(StoreError::Conflict {
            id: id.to_string(),
            status,
        }),
    }
}

fn end_attempt(tx: &Connection, job: &Job, now: i64, outcome: &str) -> Result<(), StoreError> {
    tx.prepare_cached(
        "UPDATE attempts SET ended_at = ?3, outcome = ?4 WHERE job_id = ?1 AND n = ?2",
    )
    .and_then(|mut st| st.execute(params![job.id, job.attempts, now, outcome]))
    .map_err(StoreError::sqlite("closing the attempt"))?;
    Ok(())
}

/// The error of a job that started `attempts` times without finishing.
pub(crate) fn max_attempts_error(attempts: u32, last_reason: &str) -> JobError {
    JobError {
        code: "max_attempts".to_string(),
        message: format!("ran {attempts} times without finishing"),
        details: Some(json!({ "last_reason": last_reason })),
    }
}

fn set_final(
    tx: &Connection,
    id: &str,
    status: JobStatus,
    now: i64,
    error: Option<&JobError>,
) -> Result<(), StoreError> {
    let error = match error {
        Some(e) => Some(
            serde_json::to_string(e)
                .map_err(|e| StoreError::Invalid(format!("job error cannot be stored: {e}")))?,
        ),
        None => None,
    };
    tx.prepare_cached("UPDATE jobs SET status = ?2, finished_at = ?3, error = ?4 WHERE id = ?1")
        .and_then(|mut st| st.execute(params![id, status.as_str(), now, error]))
        .map_err(StoreError::sqlite("finishing the job"))?;
    // Every final status of an owner job passes here: its webhook is due in the same commit.
    outbox::enqueue(tx, id, now, OutboxState::Due)?;
    Ok(())
}

fn finish(
    tx: &Connection,
    shared: &Shared,
    id: &str,
    op: FinishOp,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Job, StoreError> {
    let job = load_owned(tx, shared, id)?;
    if job.status != JobStatus::Running {
        return Err(StoreError::Conflict {
            id: id.to_string(),
            status: job.status,
        });
    }
    finish_running(tx, shared, job, op, now, effects, touched_memory)
}

/// Ends the current attempt of a running owner job (see [`finish`]).
fn finish_running(
    tx: &Connection,
    shared: &Shared,
    job: Job,
    op: FinishOp,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Job, StoreError> {
    let id = job.id.as_str();
    let ran_ms = now - job.started_at_ms.unwrap_or(now);
    let day = utc_day(now);
    let done = |status: JobStatus, error: Option<JobError>| Job {
        status,
        finished_at_ms: Some(now),
        error,
        ..job.clone()
    };
    let result = match op {
        FinishOp::Succeeded(outputs) => {
            record_outputs(tx, id, &outputs)?;
            set_final(tx, id, JobStatus::Succeeded, now, None)?;
            end_attempt(tx, &job, now, "succeeded")?;
            count_finished(tx, &job.account, day, true, outputs.len() as u64, ran_ms)?;
            add_event(
                tx,
                id,
                now,
                JobStatus::Succeeded,
                Some(&format!("{} outputs", outputs.len())),
            )?;
            done(JobStatus::Succeeded, None)
        }
        FinishOp::Failed(error) => {
            set_final(tx, id, JobStatus::Failed, now, Some(&error))?;
            end_attempt(tx, &job, now, &format!("failed: {}", error.code))?;
            count_finished(tx, &job.account, day, false, 0, ran_ms)?;
            add_event(
                tx,
                id,
                now,
                JobStatus::Failed,
                Some(&format!("{}: {}", error.code, error.message)),
            )?;
            done(JobStatus::Failed, Some(error))
        }
        FinishOp::Cancelled => {
            set_final(tx, id, JobStatus::Cancelled, now, None)?;
            end_attempt(tx, &job, now, "cancelled")?;
            count_finished(tx, &job.account, day, false, 0, ran_ms)?;
            add_event(
                tx,
                id,
                now,
                JobStatus::Cancelled,
                Some("cancelled while running"),
            )?;
            done(JobStatus::Cancelled, None)
        }
        FinishOp::Requeue(reason) => {
            end_attempt(tx, &job, now, &format!("requeued: {reason}"))?;
            count_finished(tx, &job.account, day, false, 0, ran_ms)?;
            let ring_pos: Option<i64> = tx
                .prepare_cached("SELECT ring_pos FROM jobs WHERE id = ?1")
                .and_then(|mut st| st.query_row([id], |row| row.get(0)))
                .map_err(StoreError::sqlite("reading the job's place"))?;
            let requeued = requeue_row(tx, shared, &job, ring_pos, &reason, now, touched_memory)?;
            if requeued.status == JobStatus::Queued {
                effects.work = true;
            }
            requeued
        }
    };
    effects.running_remove.push(id.to_string());
    effects.changes.push(change(&result, result.status, now));
    Ok(result)
}

/// Records a succeeded job's outputs (files already written and fsync'd; inline content
/// written here).
fn record_outputs(tx: &Connection, id: &str, outputs: &[StoredOutput]) -> Result<(), StoreError> {
    for StoredOutput { output: o, data } in outputs {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO outputs
                 (job_id, idx, filename, content_type, bytes, path, sha256, watermark,
                  object_key, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut st| {
            st.execute(params![
                id,
                o.index,
                o.filename,
                o.content_type,
                i64::try_from(o.bytes).unwrap_or(i64::MAX),
                o.path.to_string_lossy(),
                o.sha256,
                o.watermark.as_ref().map(WatermarkStatus::to_text),
                o.key,
                data
            ])
        })
        .map_err(StoreError::sqlite("recording an output"))?;
    }
    Ok(())
}

fn not_owner(job: &Job) -> StoreError {
    StoreError::NotOwner {
        id: job.id.clone(),
        owner: job.owner.clone(),
    }
}

/// Loads an owner row: a missing job is `NotFound`, a replica row `NotOwner`.
fn load_owned(tx: &Connection, shared: &Shared, id: &str) -> Result<Job, StoreError> {
    let job =
        load_job(tx, &shared.db_path, id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    if job.role == JobRole::Replica {
        return Err(not_owner(&job));
    }
    Ok(job)
}

/// Puts a running job back in the queue at its old place, or fails it with `max_attempts`.
pub(crate) fn requeue_row(
    tx: &Connection,
    shared: &Shared,
    job: &Job,
    ring_pos: Option<i64>,
    reason: &str,
    now: i64,
    touched_memory: &mut bool,
) -> Result<Job, StoreError> {
    if job.attempts >= job.max_attempts {
        let error = max_attempts_error(job.attempts, reason);
        set_final(tx, &job.id, JobStatus::Failed, now, Some(&error))?;
        add_event(
            tx,
            &job.id,
            now,
            JobStatus::Failed,
            Some(&format!("max_attempts: {reason}")),
        )?;
        return Ok(Job {
            status: JobStatus::Failed,
            finished_at_ms: Some(now),
            error: Some(error),
            ..job.clone()
        });
    }
    tx.prepare_cached(
        "UPDATE jobs SET status = 'queued', started_at = NULL, lease_holder = NULL WHERE id = ?1",
    )
    .and_then(|mut st| st.execute([&job.id]))
    .map_err(StoreError::sqlite("requeueing the job"))?;
    add_event(
        tx,
        &job.id,
        now,
        JobStatus::Queued,
        Some(&format!("requeued: {reason}")),
    )?;
    let queued = QueuedJob {
        id: job.id.clone(),
        tier: job.queue_tier(),
        account: job.account.clone(),
        seq: job.seq,
        created_at_ms: job.created_at_ms,
    };
    let ring = {
        let mut state = shared.lock();
        *touched_memory = true;
        match ring_pos.and_then(|p| u64::try_from(p).ok()) {
            Some(pos) => state.scheduler.requeue(queued, pos),
            None => state.scheduler.push(queued),
        }
    };
    if let Some(ring) = ring {
        upsert_ring(tx, &ring)?;
    }
    Ok(Job {
        status: JobStatus::Queued,
        started_at_ms: None,
        lease_holder: None,
        ..job.clone()
    })
}

/// Applies the result of attempt `attempt` of an owner job. The first final result wins: a
/// job already final drops it. The running attempt ends as [`finish`] ends it. A final result
/// of another attempt (a retry ran the job twice, or the lease of a runner that still finished
/// had expired) becomes the job's final result; a `Requeue` of another attempt changes nothing.
fn finish_attempt(
    tx: &Connection,
    shared: &Shared,
    (id, attempt): (&str, u32),
    op: FinishOp,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Finished, StoreError> {
    let job = load_owned(tx, shared, id)?;
    if job.status.is_final() {
        tracing::info!(
            job = %id,
            attempt,
            status = %job.status,
            "job store: the job already has its final result; a later final result was dropped"
        );
        return Ok(Finished::Dropped(job));
    }
    if job.status == JobStatus::Running && job.attempts == attempt {
        return finish_running(tx, shared, job, op, now, effects, touched_memory)
            .map(Finished::Applied);
    }
    let (status, error, outputs, detail) = match op {
        FinishOp::Requeue(_) => return Ok(Finished::Stale(job)),
        FinishOp::Succeeded(outputs) => {
            let detail = format!("{} outputs", outputs.len());
            (JobStatus::Succeeded, None, outputs, detail)
        }
        FinishOp::Failed(error) => {
            let detail = format!("{}: {}", error.code, error.message);
            (JobStatus::Failed, Some(error), Vec::new(), detail)
        }
        FinishOp::Cancelled => (
            JobStatus::Cancelled,
            None,
            Vec::new(),
            "cancelled".to_string(),
        ),
    };
    let outcome = match &error {
        Some(e) => format!("failed: {}", e.code),
        None => status.as_str().to_string(),
    };
    // The attempt that produced this result: close its row if it is still open (its time is
    // counted now) or correct the outcome of one closed when its lease expired.
    let attempt_row: Option<(i64, Option<i64>)> = tx
        .prepare_cached("SELECT started_at, ended_at FROM attempts WHERE job_id = ?1 AND n = ?2")
        .and_then(|mut st| {
            st.query_row(params![id, attempt], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
        })
        .map_err(StoreError::sqlite("reading the attempt"))?;
    let ran_ms = match attempt_row {
        Some((started, None)) => now - started,
        _ => 0,
    };
    tx.prepare_cached(
        "UPDATE attempts SET ended_at = COALESCE(ended_at, ?3), outcome = ?4
         WHERE job_id = ?1 AND n = ?2",
    )
    .and_then(|mut st| st.execute(params![id, attempt, now, outcome]))
    .map_err(StoreError::sqlite("closing the attempt"))?;
    record_outputs(tx, id, &outputs)?;
    set_final(tx, id, status, now, error.as_ref())?;
    match job.status {
        JobStatus::Running => {
            // The attempt running now lost: its result, when it comes, is dropped.
            tx.prepare_cached(
                "UPDATE attempts SET ended_at = ?3, outcome = ?4
                 WHERE job_id = ?1 AND n = ?2 AND ended_at IS NULL",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    job.attempts,
                    now,
                    format!("superseded: attempt {attempt} finished first")
                ])
            })
            .map_err(StoreError::sqlite("closing the attempt"))?;
            effects.running_remove.push(id.to_string());
        }
        _ => {
            let mut state = shared.lock();
            *touched_memory = true;
            state.scheduler.remove(id);
        }
    }
    count_finished(
        tx,
        &job.account,
        utc_day(now),
        status == JobStatus::Succeeded,
        outputs.len() as u64,
        ran_ms,
    )?;
    add_event(
        tx,
        id,
        now,
        status,
        Some(&format!("attempt {attempt}: {detail}")),
    )?;
    let after = Job {
        status,
        finished_at_ms: Some(now),
        error,
        ..job
    };
    effects.changes.push(change(&after, status, now));
    Ok(Finished::Applied(after))
}

/// Records which member holds an owner job's replica.
fn set_replica(
    tx: &Connection,
    shared: &Shared,
    id: &str,
    replica: Option<&str>,
) -> Result<Job, StoreError> {
    let job = load_owned(tx, shared, id)?;
    tx.prepare_cached("UPDATE jobs SET replica = ?2 WHERE id = ?1")
        .and_then(|mut st| st.execute(params![id, replica]))
        .map_err(StoreError::sqlite("recording the replica"))?;
    Ok(Job {
        replica: replica.map(str::to_string),
        ..job
    })
}

/// Forgets an unfinished replica row its owner disowned (the job has another replica, or
/// another owner): it must never be adopted. Final rows and owner rows are kept; `false` when
/// there was nothing to forget.
/// Marks a final job's outputs deleted (owner and replica rows alike); a job already marked
/// keeps its first deletion. A job that is not final is [`StoreError::Conflict`].
fn outputs_deleted(
    tx: &Connection,
    shared: &Shared,
    id: &str,
    reason: DeleteReason,
    at_ms: i64,
) -> Result<Job, StoreError> {
    let job =
        load_job(tx, &shared.db_path, id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    if !job.status.is_final() {
        return Err(StoreError::Conflict {
            id: id.to_string(),
            status: job.status,
        });
    }
    if job.outputs_deleted.is_some() {
        return Ok(job);
    }
    tx.prepare_cached(
        "UPDATE jobs SET outputs_deleted_at = ?2, outputs_deleted_reason = ?3 WHERE id = ?1",
    )
    .and_then(|mut st| st.execute(params![id, at_ms, reason.as_str()]))
    .map_err(StoreError::sqlite("recording deleted outputs"))?;
    // Inline outputs are deleted with the record (their rows stay, as the files' do).
    tx.prepare_cached("UPDATE outputs SET data = NULL WHERE job_id = ?1 AND data IS NOT NULL")
        .and_then(|mut st| st.execute(params![id]))
        .map_err(StoreError::sqlite("deleting inline outputs"))?;
    Ok(Job {
        outputs_deleted: Some((at_ms, reason)),
        ..job
    })
}

fn drop_copy(tx: &Connection, shared: &Shared, id: &str, owner: &str) -> Result<bool, StoreError> {
    let Some(job) = load_job(tx, &shared.db_path, id)? else {
        return Ok(false);
    };
    if job.role != JobRole::Replica || job.status.is_final() || job.owner.as_deref() != Some(owner)
    {
        return Ok(false);
    }
    for sql in [
        "DELETE FROM jobs WHERE id = ?1 AND role = 'replica'",
        "DELETE FROM job_events WHERE job_id = ?1",
        "DELETE FROM attempts WHERE job_id = ?1",
        "DELETE FROM idempotency_keys WHERE job_id = ?1",
    ] {
        tx.prepare_cached(sql)
            .and_then(|mut st| st.execute([id]))
            .map_err(StoreError::sqlite("forgetting a disowned copy"))?;
    }
    Ok(true)
}

/// Whether `copy` is a later state of a job than the non-final `stored` one. Attempts only
/// grow; with equal attempts a job is running before it is queued again (a requeue keeps the
/// count), so only a running copy of a queued row is older.
fn is_newer(copy: &Job, stored: &Job) -> bool {
    if copy.status.is_final() {
        return true;
    }
    match copy.attempts.cmp(&stored.attempts) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => {
            !(stored.status == JobStatus::Queued && copy.status == JobStatus::Running)
        }
    }
}

fn encode_error(error: Option<&JobError>) -> Result<Option<String>, StoreError> {
    error
        .map(|e| {
            serde_json::to_string(e)
                .map_err(|e| StoreError::Invalid(format!("job error cannot be stored: {e}")))
        })
        .transpose()
}

fn count_outputs(tx: &Connection, id: &str) -> Result<i64, StoreError> {
    tx.prepare_cached("SELECT COUNT(*) FROM outputs WHERE job_id = ?1")
        .and_then(|mut st| st.query_row([id], |row| row.get(0)))
        .map_err(StoreError::sqlite("counting outputs"))
}

/// Stores or updates the replica row of another member's job. Returns the stored row and
/// whether `outputs` were recorded (the caller removes the files otherwise).
fn put_replica(
    tx: &Connection,
    shared: &Shared,
    (copy, encoded): (&Job, Encoded),
    owner: &str,
    outputs: &[StoredOutput],
    now: i64,
) -> Result<(Job, bool), StoreError> {
    let id = copy.id.as_str();
    let stored = load_job(tx, &shared.db_path, id)?;
    let with_outputs = copy.status == JobStatus::Succeeded && !outputs.is_empty();
    let mut recorded = false;
    match &stored {
        Some(s) if s.role == JobRole::Owner => {
            return Err(StoreError::Conflict {
                id: id.to_string(),
                status: s.status,
            });
        }
        None => {
            let error = encode_error(copy.error.as_ref())?;
            tx.prepare_cached(
                "INSERT INTO jobs (id, account, tier, status, workflow, webhook, metadata,
                     idempotency_key, body_hash, created_at, started_at, finished_at, attempts,
                     max_attempts, error, role, owner, replica, lease_holder, throttled)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                     'replica', ?16, NULL, ?17, ?18)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    id,
                    copy.account,
                    copy.tier.rank(),
                    copy.status.as_str(),
                    encoded.workflow,
                    copy.webhook,
                    encoded.metadata,
                    copy.idempotency_key,
                    copy.body_hash,
                    copy.created_at_ms,
                    copy.started_at_ms,
                    copy.finished_at_ms,
                    copy.attempts,
                    copy.max_attempts,
                    error,
                    owner,
                    copy.lease_holder,
                    copy.throttled,
                ])
            })
            .map_err(StoreError::sqlite("inserting the replica"))?;
            count_replica_usage(tx, copy, true, copy.status.is_final(), outputs.len() as u64)?;
            add_event(
                tx,
                id,
                now,
                copy.status,
                Some(&format!("replica of a job owned by {owner}")),
            )?;
            if with_outputs {
                record_outputs(tx, id, outputs)?;
                recorded = true;
            }
        }
        Some(s) if s.status.is_final() => {
            // First final result wins; only outputs the row lacks are filled in.
            if with_outputs && s.status == JobStatus::Succeeded && count_outputs(tx, id)? == 0 {
                record_outputs(tx, id, outputs)?;
                recorded = true;
            }
        }
        Some(s) => {
            if is_newer(copy, s) {
                let error = encode_error(copy.error.as_ref())?;
                tx.prepare_cached(
                    "UPDATE jobs SET status = ?2, started_at = ?3, finished_at = ?4,
                         attempts = MAX(attempts, ?5), error = ?6, lease_holder = ?7, owner = ?8
                     WHERE id = ?1",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        id,
                        copy.status.as_str(),
                        copy.started_at_ms,
                        copy.finished_at_ms,
                        copy.attempts,
                        error,
                        copy.lease_holder,
                        owner,
                    ])
                })
                .map_err(StoreError::sqlite("updating the replica"))?;
                if copy.status.is_final() {
                    count_replica_usage(tx, copy, false, true, outputs.len() as u64)?;
                }
                if copy.status != s.status {
                    add_event(
                        tx,
                        id,
                        now,
                        copy.status,
                        Some(&format!("replicated from {owner}")),
                    )?;
                }
                if with_outputs {
                    record_outputs(tx, id, outputs)?;
                    recorded = true;
                }
            }
        }
    }
    if let Some(key) = &copy.idempotency_key {
        tx.prepare_cached(
            "INSERT INTO idempotency_keys (account, key, job_id, body_hash, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (account, key) DO NOTHING",
        )
        .and_then(|mut st| {
            st.execute(params![
                copy.account,
                key,
                id,
                copy.body_hash,
                copy.created_at_ms
            ])
        })
        .map_err(StoreError::sqlite("saving the idempotency key"))?;
    }
    let job = load_job(tx, &shared.db_path, id)?.ok_or_else(|| StoreError::Corrupt {
        path: shared.db_path.clone(),
        detail: format!("replica {id} vanished while storing it"),
    })?;
    if job.status.is_final() {
        // The owner sends the webhook; this copy is sent only if this node adopts the job.
        outbox::enqueue(tx, id, now, OutboxState::Dormant)?;
    }
    Ok((job, recorded))
}

/// Takes over the jobs of a dead member: its replica rows here become owner rows.
fn adopt(
    tx: &Connection,
    shared: &Shared,
    owner: &str,
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Vec<Job>, StoreError> {
    let rows = load_jobs(
        tx,
        &shared.db_path,
        "role = 'replica' AND owner = ?1 ORDER BY created_at, seq",
        [owner],
    )?;
    let mut adopted = Vec::new();
    for job in rows {
        // A job the dead member ran itself gets a lease in its name: the node's lease timer
        // expires it and requeues the job unless a result arrives first.
        let lease_holder = match (job.status, &job.lease_holder) {
            (JobStatus::Running, None) => Some(owner.to_string()),
            (_, holder) => holder.clone(),
        };
        tx.prepare_cached(
            "UPDATE jobs SET role = 'owner', owner = NULL, replica = NULL, lease_holder = ?2
             WHERE id = ?1",
        )
        .and_then(|mut st| st.execute(params![job.id, lease_holder]))
        .map_err(StoreError::sqlite("adopting the job"))?;
        // The dead owner may not have sent the webhook: this node sends it (receivers dedupe
        // by `webhook-id` when both did).
        outbox::wake(tx, &job.id, now)?;
        add_event(
            tx,
            &job.id,
            now,
            job.status,
            Some(&format!("adopted from {owner}")),
        )?;
        let job = Job {
            role: JobRole::Owner,
            owner: None,
            replica: None,
            lease_holder,
            ..job
        };
        match job.status {
            JobStatus::Queued => {
                let joined = {
                    let mut state = shared.lock();
                    *touched_memory = true;
                    state.scheduler.push(QueuedJob {
                        id: job.id.clone(),
                        tier: job.queue_tier(),
                        account: job.account.clone(),
                        seq: job.seq,
                        created_at_ms: job.created_at_ms,
                    })
                };
                if let Some(ring) = joined {
                    upsert_ring(tx, &ring)?;
                }
                effects.work = true;
                adopted.push(job);
            }
            JobStatus::Running => {
                effects.running_add.push(job.id.clone());
                adopted.push(job);
            }
            _ => {}
        }
    }
    Ok(adopted)
}

/// Gives an owner job to `new_owner`: the row becomes its replica. A queued job leaves the
/// queue; a job another member runs (it has a lease holder) keeps running there, its lease now
/// held by the new owner.
fn hand_over(
    tx: &Connection,
    shared: &Shared,
    (id, new_owner): (&str, &str),
    now: i64,
    effects: &mut Effects,
    touched_memory: &mut bool,
) -> Result<Job, StoreError> {
    let job =
        load_job(tx, &shared.db_path, id)?.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    if job.role == JobRole::Replica {
        // Handed over already (a repeated call): nothing to do.
        if job.owner.as_deref() == Some(new_owner) {
            return Ok(job);
        }
        return Err(not_owner(&job));
    }
    let leased_out = job.status == JobStatus::Running && job.lease_holder.is_some();
    if job.status != JobStatus::Queued && !leased_out {
        return Err(StoreError::Conflict {
            id: id.to_string(),
            status: job.status,
        });
    }
    tx.prepare_cached("UPDATE jobs SET role = 'replica', owner = ?2, replica = NULL WHERE id = ?1")
        .and_then(|mut st| st.execute(params![id, new_owner]))
        .map_err(StoreError::sqlite("handing the job over"))?;
    add_event(
        tx,
        id,
        now,
        job.status,
        Some(&format!("handed over to {new_owner}")),
    )?;
    if leased_out {
        effects.running_remove.push(id.to_string());
    } else {
        let mut state = shared.lock();
        *touched_memory = true;
        state.scheduler.remove(id);
    }
    Ok(Job {
        role: JobRole::Replica,
        owner: Some(new_owner.to_string()),
        replica: None,
        ..job
    })
}

/// Rebuilds the scheduler from the committed rows (after a failed request or commit).
fn rebuild_scheduler(conn: &Connection, shared: &Shared) {
    match build_scheduler(conn, &shared.db_path) {
        Ok((scheduler, _assigned)) => {
            // Positions handed out here are not persisted; the next rebuild assigns the same
            // ones because they depend only on the stored rows.
            shared.lock().scheduler = scheduler;
        }
        Err(e) => tracing::error!(error = %e, "job store: cannot rebuild the scheduler"),
    }
}

/// Builds a scheduler from the stored queued jobs and ring.
pub(crate) fn build_scheduler(
    conn: &Connection,
    db_path: &std::path::Path,
) -> Result<(Scheduler, Vec<RingPos>), StoreError> {
    let jobs = load_queued(conn, db_path)?;
    let (ring, max_pos) = load_ring(conn, db_path)?;
    Ok(Scheduler::rebuild(jobs, ring, max_pos))
}

/// Opens the store's state: builds the scheduler and recovers jobs that were running when the
/// process stopped. Runs on the write connection before the writer thread starts.
pub(crate) fn recover(
    conn: &mut Connection,
    shared: &Shared,
) -> Result<RecoveryReport, StoreError> {
    let now = shared.now();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(StoreError::sqlite("starting recovery"))?;
    let (scheduler, assigned) = build_scheduler(&tx, &shared.db_path)?;
    for ring in &assigned {
        upsert_ring(&tx, ring)?;
    }
    shared.lock().scheduler = scheduler;
    // Jobs this node ran itself died with the process; jobs another member runs may still be
    // running there, so they stay running and the node times their leases.
    let running: Vec<(String, Option<i64>)> = tx
        .prepare(
            "SELECT id, ring_pos FROM jobs
             WHERE status = 'running' AND role = 'owner' AND lease_holder IS NULL ORDER BY seq",
        )
        .and_then(|mut st| {
            st.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(StoreError::sqlite("reading running jobs"))?;
    let mut report = RecoveryReport::default();
    let mut touched = false;
    for (id, ring_pos) in running {
        let job = load_job(&tx, &shared.db_path, &id)?.ok_or_else(|| StoreError::Corrupt {
            path: shared.db_path.clone(),
            detail: format!("running job {id} vanished during recovery"),
        })?;
        end_attempt(&tx, &job, now, "interrupted: kilnd stopped while it ran")?;
        let after = requeue_row(
            &tx,
            shared,
            &job,
            ring_pos,
            "kilnd stopped while it ran",
            now,
            &mut touched,
        )?;
        if after.status == JobStatus::Queued {
            report.requeued.push(id);
        } else {
            report.failed.push(id);
        }
    }
    let leased: Vec<(String, String, i64)> = tx
        .prepare(
            "SELECT id, lease_holder, attempts FROM jobs
             WHERE status = 'running' AND role = 'owner' AND lease_holder IS NOT NULL
             ORDER BY seq",
        )
        .and_then(|mut st| {
            st.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(StoreError::sqlite("reading leased jobs"))?;
    tx.commit()
        .map_err(StoreError::sqlite("committing recovery"))?;
    let mut state = shared.lock();
    for (job_id, holder, attempt) in leased {
        state.running.insert(job_id.clone());
        report.leased.push(Lease {
            job_id,
            holder,
            attempt: u32::try_from(attempt).unwrap_or(0),
        });
    }
    report.queued = state.scheduler.len();
    drop(state);
    Ok(report)
}

/// Tiers are stored as their rank.
pub(crate) fn tier_from_rank(rank: i64, path: &std::path::Path) -> Result<Tier, StoreError> {
    u8::try_from(rank)
        .ok()
        .and_then(Tier::from_rank)
        .ok_or_else(|| StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("unknown tier rank {rank}"),
        })
}

#[cfg(test)]
mod tests {
    use super::{Connection, control, release, roll_back, savepoint, thousands};

    #[test]
    fn a_request_rolled_back_leaves_the_others_of_its_transaction() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch("CREATE TABLE t (v TEXT)")
            .expect("create");
        let insert = |v: &str| {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [v])
                .expect("insert");
        };
        let rows = || -> Vec<String> {
            let mut st = conn.prepare("SELECT v FROM t ORDER BY v").expect("prepare");
            st.query_map([], |row| row.get(0))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows")
        };
        // Twice, so the cached statements are run again in a later transaction.
        for round in ["1", "2"] {
            control(&conn, "BEGIN IMMEDIATE").expect("begin");
            for (name, keep) in [("a", true), ("b", false), ("c", true)] {
                savepoint(&conn).expect("savepoint");
                insert(&format!("{name}{round}"));
                if keep {
                    release(&conn).expect("release");
                } else {
                    roll_back(&conn).expect("roll back");
                }
            }
            control(&conn, "COMMIT").expect("commit");
            assert!(conn.is_autocommit(), "no savepoint is left open");
        }
        assert_eq!(rows(), ["a1", "a2", "c1", "c2"]);
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(5_000), "5,000");
        assert_eq!(thousands(5_012), "5,012");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
