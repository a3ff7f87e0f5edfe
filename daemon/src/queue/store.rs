//! [`JobStore`]: the async, cheap-to-clone handle on a node's durable job store.
//!
//! Writes go to the writer thread (group commit, see [`super::writer`]) and return only once
//! committed and fsync'd. Reads use a small pool of read-only connections on blocking threads;
//! WAL lets them run beside the writer. Queue positions and counts come from the in-memory
//! [`Scheduler`](super::Scheduler) without touching the database.
//!
//! It must never answer a write before its commit, never write output files after the commit
//! that marks their job succeeded, and never hold a lock across an `.await`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::scheduler::{QueuedJob, RingPos};
use super::writer::{
    self, Clock, Encoded, FinishOp, MemState, Request, Shared, StoredOutput, tier_from_rank,
};
use super::{
    CancelOutcome, Finished, Job, JobChange, JobEvent, JsonText, NewJob, NewOutput, Outcome,
    Output, QueueSummary, Quota, RecoveryReport, StoreError, Submitted, Usage, schema,
};
use crate::metrics::StoreMetrics;
use crate::protocol::{DeleteReason, JobError, JobStatus, Tier, WatermarkStatus};
use crate::results::objects::ObjectStorage;

/// The columns [`raw_job`] reads, in its order (a macro so that statements can be literals).
macro_rules! job_columns {
    () => {
        "id, seq, account, tier, status, workflow, webhook, metadata, \
         idempotency_key, body_hash, created_at, started_at, finished_at, attempts, max_attempts, \
         error, role, owner, replica, lease_holder, throttled, outputs_expire_at, \
         outputs_deleted_at, outputs_deleted_reason"
    };
}

/// The database file inside the data dir.
pub const DB_FILE: &str = "kiln-jobs.sqlite3";
/// The folder of output files inside the data dir.
pub const OUTPUTS_DIR: &str = "outputs";

/// Limits on what a job may carry; anything larger is refused with [`StoreError::Invalid`].
const MAX_ID_LEN: usize = 128;
const MAX_ACCOUNT_LEN: usize = 256;
const MAX_KEY_LEN: usize = 256;
const MAX_MEMBER_LEN: usize = 256;

/// Options of [`JobStore::open`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Most requests committed in one transaction.
    pub max_batch: usize,
    /// Requests waiting for the writer before senders wait.
    pub channel_capacity: usize,
    /// Most read connections open at once (a read waits for a free one); they stay open.
    pub read_connections: usize,
    /// Capacity of the change broadcast; a subscriber that lags more than this misses changes
    /// (and is told so by `RecvError::Lagged`).
    pub change_capacity: usize,
    /// The clock (unix ms); the system clock by default.
    pub clock: Clock,
    /// How long each tier's outputs are kept after the job finishes; a tier not listed keeps
    /// them for good (the default: none listed). Written to the store at open, where it
    /// stamps the expiry of every succeeded job whose outputs still exist.
    pub retention: Vec<(Tier, Duration)>,
    /// The bucket outputs go to (`[storage] kind = "s3"`); none: files in the data dir.
    pub objects: Option<ObjectStorage>,
    /// Where the writer counts its commits.
    pub metrics: StoreMetrics,
    /// Outputs of at most this many bytes are kept in the database, written by the commit
    /// that records them, instead of as a file with its own fsyncs (0: every output is a
    /// file). Outputs in a bucket (`objects`) are always objects.
    pub inline_max_bytes: u64,
}

/// The default of [`StoreOptions::inline_max_bytes`]: 64 KiB. Below about that size SQLite
/// reads and writes a blob faster than the file system does a file of its own.
pub const DEFAULT_INLINE_MAX_BYTES: u64 = 64 * 1024;

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("max_batch", &self.max_batch)
            .field("channel_capacity", &self.channel_capacity)
            .field("read_connections", &self.read_connections)
            .field("change_capacity", &self.change_capacity)
            .field("retention", &self.retention)
            .field("objects", &self.objects)
            .field("inline_max_bytes", &self.inline_max_bytes)
            .finish_non_exhaustive()
    }
}

/// The system clock in unix ms.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    })
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_batch: 1024,
            channel_capacity: 8192,
            read_connections: std::thread::available_parallelism()
                .map_or(4, |n| n.get().clamp(4, 16)),
            change_capacity: 4096,
            clock: system_clock(),
            retention: Vec::new(),
            objects: None,
            metrics: StoreMetrics::default(),
            inline_max_bytes: DEFAULT_INLINE_MAX_BYTES,
        }
    }
}

/// Read connections, opened when first needed and kept; `permits` bounds how many exist: a
/// read waits for a free one (without holding a thread) rather than opening another, since
/// opening a connection and loading its schema costs more than most reads.
struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl ReadPool {
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => open_reader(&self.path),
        }
    }

    fn give(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(conn);
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| schema::corrupt_or(path, e, "opening a read connection"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(StoreError::sqlite("setting the busy timeout"))?;
    conn.set_prepared_statement_cache_capacity(schema::STATEMENT_CACHE);
    Ok(conn)
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Request>,
    reads: ReadPool,
    recovery: RecoveryReport,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    objects: Option<ObjectStorage>,
    inline_max_bytes: u64,
    metrics: StoreMetrics,
}

/// The handle on a node's job store. Clone it freely; the writer stops when the last clone is
/// dropped (or at [`JobStore::close`]).
#[derive(Clone)]
pub struct JobStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore")
            .field("data_dir", &self.inner.shared.data_dir)
            .finish_non_exhaustive()
    }
}

impl JobStore {
    /// Opens (or creates) the store in `data_dir`: applies migrations, rebuilds the queue and
    /// recovers jobs that were running when the process stopped (see
    /// [`JobStore::recovery`]). Blocking work runs on a blocking thread.
    pub async fn open(data_dir: &Path, opts: StoreOptions) -> Result<JobStore, StoreError> {
        let data_dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(&data_dir, opts))
            .await
            .map_err(|e| StoreError::WriterGone(format!("opening the store panicked: {e}")))?
    }

    fn open_blocking(data_dir: &Path, opts: StoreOptions) -> Result<JobStore, StoreError> {
        if opts.max_batch == 0 || opts.channel_capacity == 0 {
            return Err(StoreError::Invalid(
                "max_batch and channel_capacity must be at least 1".to_string(),
            ));
        }
        std::fs::create_dir_all(data_dir.join(OUTPUTS_DIR)).map_err(StoreError::io(format!(
            "creating the data dir {}",
            data_dir.display()
        )))?;
        let db_path = data_dir.join(DB_FILE);
        let mut conn = Connection::open(&db_path)
            .map_err(|e| schema::corrupt_or(&db_path, e, "opening the job store"))?;
        schema::configure(&conn, &db_path)?;
        let (from, to) = schema::migrate(&mut conn, &db_path)?;
        if from != to {
            tracing::info!(from, to, path = %db_path.display(), "job store: schema migrated");
        }
        write_retention(&mut conn, &opts.retention)?;
        let (changes, _) = broadcast::channel(opts.change_capacity.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(MemState::default()),
            changes,
            work: tokio::sync::Notify::new(),
            clock: opts.clock.clone(),
            data_dir: data_dir.to_path_buf(),
            db_path: db_path.clone(),
        });
        let recovery = writer::recover(&mut conn, &shared)?;
        if !recovery.requeued.is_empty() || !recovery.failed.is_empty() {
            tracing::warn!(
                requeued = recovery.requeued.len(),
                failed = recovery.failed.len(),
                queued = recovery.queued,
                "job store: recovered jobs that were running when kilnd stopped"
            );
        }
        let (tx, rx) = mpsc::channel(opts.channel_capacity);
        let writer_shared = shared.clone();
        let max_batch = opts.max_batch;
        let writer_metrics = opts.metrics.clone();
        let handle = std::thread::Builder::new()
            .name("kiln-store-writer".to_string())
            .spawn(move || writer::run(conn, writer_shared, rx, max_batch, writer_metrics))
            .map_err(StoreError::io("starting the writer thread"))?;
        let reads = ReadPool {
            path: db_path,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(tokio::sync::Semaphore::new(opts.read_connections.max(1))),
        };
        Ok(JobStore {
            inner: Arc::new(Inner {
                shared,
                tx,
                reads,
                recovery,
                writer: Mutex::new(Some(handle)),
                objects: opts.objects,
                inline_max_bytes: opts.inline_max_bytes,
                metrics: opts.metrics,
            }),
        })
    }

    /// What opening did about jobs that were running when the process stopped.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    /// The bucket outputs are kept in, if any (`[storage] kind = "s3"`).
    pub fn objects(&self) -> Option<&ObjectStorage> {
        self.inner.objects.as_ref()
    }

    /// Now by the store's clock (unix ms), as it stamps its rows.
    pub fn now_ms(&self) -> i64 {
        self.inner.shared.now()
    }

    /// The data dir (output paths are relative to it).
    pub fn data_dir(&self) -> &Path {
        &self.inner.shared.data_dir
    }

    /// Absolute path of a stored output file.
    pub fn output_path(&self, output: &Output) -> PathBuf {
        self.inner.shared.data_dir.join(&output.path)
    }

    pub(super) async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::WriterGone("the writer thread is not running".to_string()))?;
        rx.await.map_err(|_| {
            StoreError::WriterGone("the writer thread stopped before answering".to_string())
        })?
    }

    pub(super) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &Path) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        inner.metrics.reads.inc();
        let permit = inner
            .reads
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::WriterGone("the store is closed".to_string()))?;
        tokio::task::spawn_blocking(move || {
            let conn = inner.reads.take()?;
            let out = f(&conn, &inner.shared.db_path);
            inner.reads.give(conn);
            drop(permit);
            out
        })
        .await
        .map_err(|e| StoreError::WriterGone(format!("a read panicked: {e}")))?
    }

    /// Stores a new job durably (committed and fsync'd when this returns).
    ///
    /// Same account + idempotency key + body hash as an earlier job → that job, `created:
    /// false`; a different body → [`StoreError::IdempotencyConflict`]. With a `quota`, a job
    /// over it is refused with [`StoreError::QuotaExceeded`] and nothing is stored but the
    /// `refused` usage counter. The usage counter is counted in the same transaction.
    pub async fn submit(&self, job: NewJob, quota: Option<Quota>) -> Result<Submitted, StoreError> {
        validate(&job)?;
        let encoded = encode(&job.workflow, job.metadata.as_ref())?;
        self.request(|reply| Request::Submit {
            job: Box::new(job),
            encoded,
            quota,
            reply,
        })
        .await
    }

    /// Takes the next job in scheduling order for this node to run: marks it running, counts
    /// the attempt, and returns it; `None` when nothing is queued. Same as
    /// `next_job_for(None)`.
    pub async fn next_job(&self) -> Result<Option<Job>, StoreError> {
        self.next_job_for(None).await
    }

    /// Takes the next job in scheduling order like [`JobStore::next_job`], for `holder` to run
    /// under a lease (`None`: this node runs it). The lease is (job id, the returned job's
    /// `attempts`); the node times it and ends it with [`JobStore::finish_attempt`]. A holder
    /// keeps the job running across a restart of this node (see [`RecoveryReport::leased`]).
    pub async fn next_job_for(&self, holder: Option<&str>) -> Result<Option<Job>, StoreError> {
        if let Some(holder) = holder {
            validate_member(holder, "lease holder")?;
        }
        if self.inner.shared.lock().scheduler.is_empty() {
            return Ok(None);
        }
        let holder = holder.map(str::to_string);
        self.request(|reply| Request::Next { holder, reply }).await
    }

    /// Waits until a job may be waiting (a submission or a requeue since the last call; returns
    /// at once if one happened while nobody waited). Use with [`JobStore::next_job`]:
    /// `loop { match store.next_job().await? { Some(job) => run(job), None => store.work_available().await } }`.
    pub async fn work_available(&self) {
        if !self.inner.shared.lock().scheduler.is_empty() {
            return;
        }
        self.inner.shared.work.notified().await;
    }

    /// Cancels a job: a queued one is cancelled at once; for a running one the answer is
    /// [`CancelOutcome::Running`] (interrupt ComfyUI, then `finish(id, Outcome::Cancelled)`);
    /// a finished one is a [`StoreError::Conflict`].
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        let id = id.to_string();
        self.request(|reply| Request::Cancel { id, reply }).await
    }

    /// Ends a running job. For `Succeeded`, output files are written into the job's
    /// [`output_folder`] and fsync'd before the commit (small ones are written by the commit
    /// itself, see [`StoreOptions::inline_max_bytes`]); the job is reported succeeded only
    /// after both. `Requeue` puts it back at its old place or fails it with `max_attempts`.
    /// A job that is not running is a [`StoreError::Conflict`].
    pub async fn finish(&self, id: &str, outcome: Outcome) -> Result<Job, StoreError> {
        let op = match outcome {
            // Nothing to write ahead of the commit, which checks the job itself.
            Outcome::Succeeded { outputs } if self.inline_on_caller(&outputs) => {
                FinishOp::Succeeded(self.write_outputs(id, outputs, None).await?)
            }
            Outcome::Succeeded { outputs } => {
                let job = self.owned_job(id).await?;
                if job.status != JobStatus::Running {
                    return Err(StoreError::Conflict {
                        id: id.to_string(),
                        status: job.status,
                    });
                }
                FinishOp::Succeeded(self.write_outputs(id, outputs, None).await?)
            }
            Outcome::Failed(error) => FinishOp::Failed(error),
            Outcome::Cancelled => FinishOp::Cancelled,
            Outcome::Requeue { reason } => FinishOp::Requeue(reason),
        };
        let id = id.to_string();
        self.request(|reply| Request::Finish { id, op, reply })
            .await
    }

    /// A job this store owns; a copy held for another member is [`StoreError::NotOwner`].
    async fn owned_job(&self, id: &str) -> Result<Job, StoreError> {
        let job = self
            .get(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        if job.role == super::JobRole::Replica {
            return Err(StoreError::NotOwner {
                id: id.to_string(),
                owner: job.owner,
            });
        }
        Ok(job)
    }

    /// Applies the result of attempt `attempt` of an owner job; safe to repeat, and the first
    /// final result wins.
    ///
    /// - A job already succeeded, failed or cancelled: [`Finished::Dropped`], nothing written.
    /// - The running attempt: exactly [`JobStore::finish`] → [`Finished::Applied`].
    /// - Another attempt (the job is queued again, or runs under a later attempt): a final
    ///   outcome becomes the job's final result ([`Finished::Applied`]; a queued job leaves the
    ///   queue, a running one stops counting as running and its later result is dropped);
    ///   `Requeue` changes nothing ([`Finished::Stale`]).
    ///
    /// Output files of a success are written and fsync'd before the commit, under names unique
    /// to this call (so a result that loses a race never touches the winner's files), and
    /// removed again when the result is not applied. A replica row is
    /// [`StoreError::NotOwner`]; an unknown job [`StoreError::NotFound`].
    pub async fn finish_attempt(
        &self,
        id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<Finished, StoreError> {
        let op = match outcome {
            // Nothing to write ahead of the commit, which drops a later final result itself.
            Outcome::Succeeded { outputs } if self.inline_on_caller(&outputs) => {
                FinishOp::Succeeded(self.write_outputs(id, outputs, None).await?)
            }
            Outcome::Succeeded { outputs } => {
                let job = self.owned_job(id).await?;
                if job.status.is_final() {
                    tracing::info!(
                        job = %id,
                        attempt,
                        status = %job.status,
                        "job store: the job already has its final result; a later final result was dropped"
                    );
                    return Ok(Finished::Dropped(job));
                }
                let prefix = format!("a{attempt}.{:016x}", rand::random::<u64>());
                FinishOp::Succeeded(self.write_outputs(id, outputs, Some(prefix)).await?)
            }
            Outcome::Failed(error) => FinishOp::Failed(error),
            Outcome::Cancelled => FinishOp::Cancelled,
            Outcome::Requeue { reason } => FinishOp::Requeue(reason),
        };
        let written = match &op {
            FinishOp::Succeeded(outputs) => outputs.iter().map(|o| o.output.clone()).collect(),
            _ => Vec::new(),
        };
        let id = id.to_string();
        let result = self
            .request(|reply| Request::FinishAttempt {
                id,
                attempt,
                op,
                reply,
            })
            .await;
        let applied = match &result {
            Ok(Finished::Applied(_)) => true,
            // The writer may have committed before it went away: keep the files.
            Err(StoreError::WriterGone(_)) => true,
            _ => false,
        };
        if !applied {
            self.remove_files(written).await;
        }
        result
    }

    /// Records which member holds the replica of an owner job (`None`: no replica). Replica
    /// rows are [`StoreError::NotOwner`].
    pub async fn set_replica(&self, id: &str, replica: Option<&str>) -> Result<Job, StoreError> {
        if let Some(replica) = replica {
            validate_member(replica, "replica")?;
        }
        let id = id.to_string();
        let replica = replica.map(str::to_string);
        self.request(|reply| Request::SetReplica { id, replica, reply })
            .await
    }

    /// Stores (or updates) the replica row of a job owned by `owner`, from the owner's copy;
    /// safe to repeat. The row keeps the copy's fields but its own `seq`; it never enters the
    /// queue, never counts usage and is never broadcast. Updates are monotonic: a final row
    /// never changes its status (first final wins) and an older copy (fewer attempts, or
    /// running where the row is queued again under the same attempt) changes nothing. A
    /// succeeded copy's `outputs` are written and fsync'd before the commit that records them.
    /// The idempotency key is recorded unless the key is already taken. An owner row with that
    /// id is [`StoreError::Conflict`] and nothing changes. Returns the stored replica row.
    pub async fn put_replica(
        &self,
        copy: &Job,
        owner: &str,
        outputs: Vec<NewOutput>,
    ) -> Result<Job, StoreError> {
        validate_copy(copy, owner)?;
        let encoded = encode(&copy.workflow, copy.metadata.as_ref())?;
        let mut written = Vec::new();
        if copy.status == JobStatus::Succeeded && !outputs.is_empty() {
            // Write files only when the row can take them; the writer decides for good. Content
            // kept in the database costs nothing to prepare, so then only the writer looks.
            let all_inline = self.inner.objects.is_none()
                && outputs
                    .iter()
                    .all(|out| kept_inline(out, self.inner.inline_max_bytes));
            let stored = if all_inline {
                None
            } else {
                self.get(&copy.id).await?
            };
            let wanted = match stored {
                Some(stored) if stored.role == super::JobRole::Owner => {
                    return Err(StoreError::Conflict {
                        id: stored.id,
                        status: stored.status,
                    });
                }
                Some(stored) if stored.status == JobStatus::Succeeded => {
                    self.outputs(&stored.id).await?.is_empty()
                }
                Some(stored) => !stored.status.is_final(),
                None => true,
            };
            if wanted {
                let prefix = format!("r{}.{:016x}", copy.attempts, rand::random::<u64>());
                written = self.write_outputs(&copy.id, outputs, Some(prefix)).await?;
            }
        }
        let unrecorded = written.iter().map(|o| o.output.clone()).collect();
        let owner = owner.to_string();
        let copy = Box::new(copy.clone());
        let result = self
            .request(|reply| Request::PutReplica {
                copy,
                encoded,
                owner,
                outputs: written,
                reply,
            })
            .await;
        let recorded = match &result {
            Ok((_, recorded)) => *recorded,
            Err(StoreError::WriterGone(_)) => true,
            Err(_) => false,
        };
        if !recorded {
            self.remove_files(unrecorded).await;
        }
        result.map(|(job, _)| job)
    }

    /// [`JobStore::put_replica`] for a copy whose outputs are objects in the bucket the owner
    /// put them in: the rows record the same keys (nothing is uploaded or written here).
    pub async fn put_replica_stored(
        &self,
        copy: &Job,
        owner: &str,
        outputs: Vec<Output>,
    ) -> Result<Job, StoreError> {
        validate_copy(copy, owner)?;
        if outputs.iter().any(|o| o.key.is_none()) {
            return Err(StoreError::Invalid(format!(
                "job {}: a stored copy's outputs must all be objects",
                copy.id
            )));
        }
        let encoded = encode(&copy.workflow, copy.metadata.as_ref())?;
        let outputs = if copy.status == JobStatus::Succeeded {
            outputs.into_iter().map(StoredOutput::elsewhere).collect()
        } else {
            Vec::new()
        };
        let owner = owner.to_string();
        let copy = Box::new(copy.clone());
        self.request(|reply| Request::PutReplica {
            copy,
            encoded,
            owner,
            outputs,
            reply,
        })
        .await
        .map(|(job, _)| job)
    }

    /// Takes over the jobs of `owner` (a member that died): every replica row it owns becomes
    /// an owner row of this node. Queued ones join the queue in created order, as new
    /// submissions would; running ones stay running, and one the dead member ran itself gets
    /// `owner` as its lease holder, so the node's lease timer expires and requeues it unless a
    /// result arrives first. Returns the adopted jobs that are not final. Safe to repeat.
    pub async fn adopt(&self, owner: &str) -> Result<Vec<Job>, StoreError> {
        validate_member(owner, "owner")?;
        let owner = owner.to_string();
        self.request(|reply| Request::Adopt { owner, reply }).await
    }

    /// Gives an owner job to `new_owner` (a draining node handing its queue over, or a node
    /// back from the dead whose job its replica adopted): the row becomes a replica of
    /// `new_owner`'s job. A queued job leaves the queue; a job running on another member (it
    /// has a lease holder) keeps its lease, now held by `new_owner`. Any other job is
    /// [`StoreError::Conflict`]; a replica row [`StoreError::NotOwner`], except one already
    /// handed to `new_owner`, which is returned unchanged (a repeated call).
    pub async fn hand_over(&self, id: &str, new_owner: &str) -> Result<Job, StoreError> {
        validate_member(new_owner, "new owner")?;
        let id = id.to_string();
        let new_owner = new_owner.to_string();
        self.request(|reply| Request::HandOver {
            id,
            new_owner,
            reply,
        })
        .await
    }

    /// The replica rows this node keeps for `owner`, in submission order here.
    pub async fn replicas_of(&self, owner: &str) -> Result<Vec<Job>, StoreError> {
        let owner = owner.to_string();
        self.read(move |conn, path| {
            load_jobs(
                conn,
                path,
                "role = 'replica' AND owner = ?1 ORDER BY seq",
                [owner],
            )
        })
        .await
    }

    /// This node's own jobs that are queued or running, in submission order.
    pub async fn owned_active(&self) -> Result<Vec<Job>, StoreError> {
        self.read(move |conn, path| {
            load_jobs(
                conn,
                path,
                "role = 'owner' AND status IN ('queued', 'running') ORDER BY seq",
                [],
            )
        })
        .await
    }

    /// The unfinished copies this node keeps for other owners (replica rows queued or
    /// running), oldest first.
    pub async fn held_copies(&self) -> Result<Vec<Job>, StoreError> {
        self.read(move |conn, path| {
            load_jobs(
                conn,
                path,
                "role = 'replica' AND status IN ('queued', 'running') ORDER BY seq",
                [],
            )
        })
        .await
    }

    /// Forgets an unfinished copy that `owner` disowned (it has another replica now, or the
    /// job another owner), so that it is never adopted. Final copies, owned jobs and copies
    /// of another member's job are kept; returns whether a copy was forgotten.
    pub async fn drop_copy(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        validate_member(owner, "owner")?;
        let id = id.to_string();
        let owner = owner.to_string();
        self.request(|reply| Request::DropCopy { id, owner, reply })
            .await
    }

    /// Succeeded jobs (owner rows and replica copies) whose outputs expired at `now_ms` and
    /// are not deleted yet, soonest expiry first; at most `limit`.
    pub async fn expired_outputs(&self, now_ms: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn, path| {
            load_jobs(
                conn,
                path,
                "outputs_expire_at IS NOT NULL AND outputs_deleted_at IS NULL
                 AND outputs_expire_at <= ?1 ORDER BY outputs_expire_at LIMIT ?2",
                params![now_ms, limit],
            )
        })
        .await
    }

    /// Records that a final job's output files are deleted, `reason` at `at_ms`. Remove the
    /// files first ([`JobStore::remove_output_files`]): a crash between the two leaves a row
    /// that the next attempt deletes again, never a recorded deletion with files left behind.
    /// Safe to repeat (the first deletion is kept); a job that is not final is
    /// [`StoreError::Conflict`], an unknown one [`StoreError::NotFound`].
    pub async fn mark_outputs_deleted(
        &self,
        id: &str,
        reason: DeleteReason,
        at_ms: i64,
    ) -> Result<Job, StoreError> {
        let id = id.to_string();
        self.request(|reply| Request::OutputsDeleted {
            id,
            reason,
            at_ms,
            reply,
        })
        .await
    }

    /// Removes the stored files of `outputs` (those already gone are fine), then the job's
    /// output folder when that leaves it empty.
    pub async fn remove_output_files(
        &self,
        id: &str,
        outputs: &[Output],
    ) -> Result<(), StoreError> {
        for key in outputs.iter().filter_map(|o| o.key.as_deref()) {
            let objects = self.inner.objects.as_ref().ok_or_else(|| {
                StoreError::Invalid(format!(
                    "job {id}: output object {key} is in a bucket, but [storage] names none"
                ))
            })?;
            objects.delete(key).await.map_err(StoreError::Objects)?;
        }
        let data_dir = self.inner.shared.data_dir.clone();
        // Inline outputs go with the rows' content (`mark_outputs_deleted`).
        let paths: Vec<PathBuf> = outputs
            .iter()
            .filter(|o| o.key.is_none() && !o.path.as_os_str().is_empty())
            .map(|o| data_dir.join(&o.path))
            .collect();
        // Stores before the shared output folders kept a folder per job.
        let job_dir = data_dir.join(OUTPUTS_DIR).join(id);
        let legacy = paths.iter().any(|p| p.parent() == Some(job_dir.as_path()));
        tokio::task::spawn_blocking(move || {
            for path in paths {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(StoreError::Io {
                            context: format!("removing the output file {}", path.display()),
                            source: e,
                        });
                    }
                }
            }
            // Only an empty folder goes: a failed attempt's leftovers are not ours to judge.
            if legacy
                && let Err(e) = std::fs::remove_dir(&job_dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::debug!(dir = %job_dir.display(), error = %e, "keeping a job's output folder");
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::WriterGone(format!("removing outputs panicked: {e}")))?
    }

    /// Uploads outputs to the bucket, or writes output files on a blocking thread (see
    /// [`write_outputs`]); returns them ready for the commit that records them.
    async fn write_outputs(
        &self,
        id: &str,
        outputs: Vec<NewOutput>,
        prefix: Option<String>,
    ) -> Result<Vec<StoredOutput>, StoreError> {
        if let Some(objects) = &self.inner.objects {
            let put = put_objects(objects, id, outputs, prefix.as_deref()).await?;
            return Ok(put.into_iter().map(StoredOutput::elsewhere).collect());
        }
        if self.inline_on_caller(&outputs) {
            // No file: only hashing, on this thread.
            return write_outputs(
                &self.inner.shared.data_dir,
                id,
                outputs,
                prefix.as_deref(),
                self.inner.inline_max_bytes,
            );
        }
        let data_dir = self.inner.shared.data_dir.clone();
        let job_id = id.to_string();
        let inline_max = self.inner.inline_max_bytes;
        tokio::task::spawn_blocking(move || {
            write_outputs(&data_dir, &job_id, outputs, prefix.as_deref(), inline_max)
        })
        .await
        .map_err(|e| StoreError::WriterGone(format!("writing outputs panicked: {e}")))?
    }

    /// Whether `outputs` all go into the database with the commit that records them (no object
    /// store, each within [`StoreOptions::inline_max_bytes`]) and are small enough together to
    /// be hashed on the caller's thread: then no file is written and no blocking thread is
    /// needed.
    fn inline_on_caller(&self, outputs: &[NewOutput]) -> bool {
        self.inner.objects.is_none()
            && outputs
                .iter()
                .all(|out| kept_inline(out, self.inner.inline_max_bytes))
            && outputs.iter().map(|out| out.bytes.len()).sum::<usize>() <= INLINE_ON_CALLER_BYTES
    }

    /// Removes outputs that were written (or uploaded) but not recorded. One that cannot be
    /// removed is only logged: it is unreferenced, and nothing serves it.
    async fn remove_files(&self, outputs: Vec<Output>) {
        if outputs.is_empty() {
            return;
        }
        let (objects, files): (Vec<Output>, Vec<Output>) = outputs
            .into_iter()
            .filter(|o| !o.inline)
            .partition(|o| o.key.is_some());
        if let Some(store) = &self.inner.objects {
            for key in objects.iter().filter_map(|o| o.key.as_deref()) {
                if let Err(error) = store.delete(key).await {
                    tracing::warn!(%key, %error, "job store: cannot delete an unrecorded output object");
                }
            }
        }
        if files.is_empty() {
            return;
        }
        let data_dir = self.inner.shared.data_dir.clone();
        let removed = tokio::task::spawn_blocking(move || {
            for output in files {
                let path = data_dir.join(&output.path);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "job store: cannot remove an unrecorded output file"
                    ),
                }
            }
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!(error = %e, "job store: removing unrecorded output files panicked");
        }
    }

    /// The job, if stored.
    pub async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let id = id.to_string();
        self.read(move |conn, path| load_job(conn, path, &id)).await
    }

    /// The job (owned or a copy) that the account's idempotency key names, if this store
    /// recorded the key.
    pub async fn find_key(&self, account: &str, key: &str) -> Result<Option<Job>, StoreError> {
        let mut found = self
            .find_keys(vec![(account.to_string(), key.to_string())])
            .await?;
        Ok(found.pop().flatten())
    }

    /// [`JobStore::find_key`] for each `(account, key)`, in order, in one read.
    pub async fn find_keys(
        &self,
        lookups: Vec<(String, String)>,
    ) -> Result<Vec<Option<Job>>, StoreError> {
        self.read(move |conn, path| {
            let mut found = Vec::with_capacity(lookups.len());
            for (account, key) in &lookups {
                let id: Option<String> = conn
                    .prepare_cached(
                        "SELECT job_id FROM idempotency_keys WHERE account = ?1 AND key = ?2",
                    )
                    .and_then(|mut st| {
                        st.query_row(params![account, key], |row| row.get(0))
                            .optional()
                    })
                    .map_err(StoreError::sqlite("reading idempotency keys"))?;
                found.push(match id {
                    Some(id) => load_job(conn, path, &id)?,
                    None => None,
                });
            }
            Ok(found)
        })
        .await
    }

    /// An account's jobs, newest first, optionally only those in `status`; at most `limit`.
    pub async fn list(
        &self,
        account: &str,
        status: Option<JobStatus>,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let account = account.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn, path| {
            let mut st = conn
                .prepare_cached(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE account = ?1
                     AND (?2 IS NULL OR status = ?2) ORDER BY seq DESC LIMIT ?3"
                ))
                .map_err(StoreError::sqlite("listing jobs"))?;
            let rows = st
                .query_map(params![account, status.map(|s| s.as_str()), limit], raw_job)
                .map_err(StoreError::sqlite("listing jobs"))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(job_from_raw(
                    row.map_err(StoreError::sqlite("listing jobs"))?,
                    path,
                )?);
            }
            Ok(out)
        })
        .await
    }

    /// Up to `max` bytes of the content of `output` of job `id` from `offset` (fewer at its
    /// end): from its file, or from the database for an inline output. An output that is an
    /// object in the bucket is read from there, not here ([`StoreError::Invalid`]); inline
    /// content that was deleted meanwhile is [`StoreError::NotFound`].
    pub async fn read_output(
        &self,
        id: &str,
        output: &Output,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        if let Some(key) = &output.key {
            return Err(StoreError::Invalid(format!(
                "output {} of job {id} is the object {key} in the bucket",
                output.index
            )));
        }
        let index = output.index;
        if output.inline {
            let id = id.to_string();
            let start = i64::try_from(offset.saturating_add(1)).unwrap_or(i64::MAX);
            let len = i64::try_from(max).unwrap_or(i64::MAX);
            return self
                .read(move |conn, _| {
                    let data: Option<Option<Vec<u8>>> = conn
                        .prepare_cached(
                            "SELECT substr(data, ?3, ?4) FROM outputs WHERE job_id = ?1 AND idx = ?2",
                        )
                        .and_then(|mut st| {
                            st.query_row(params![id, index, start, len], |row| row.get(0))
                                .optional()
                        })
                        .map_err(StoreError::sqlite("reading an output"))?;
                    data.flatten()
                        .ok_or_else(|| StoreError::NotFound(format!("output {index} of job {id}")))
                })
                .await;
        }
        if output.path.as_os_str().is_empty() {
            // Inline content that was deleted: the row stays, with neither content nor file.
            return Err(StoreError::NotFound(format!(
                "output {index} of job {id} (its content was deleted)"
            )));
        }
        let path = self.output_path(output);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            let context = || format!("reading the output file {}", path.display());
            let mut file = std::fs::File::open(&path).map_err(StoreError::io(context()))?;
            if offset > 0 {
                file.seek(std::io::SeekFrom::Start(offset))
                    .map_err(StoreError::io(context()))?;
            }
            let mut data = Vec::new();
            file.take(u64::try_from(max).unwrap_or(u64::MAX))
                .read_to_end(&mut data)
                .map_err(StoreError::io(context()))?;
            Ok(data)
        })
        .await
        .map_err(|e| StoreError::WriterGone(format!("reading an output panicked: {e}")))?
    }

    /// A job's outputs, by index.
    pub async fn outputs(&self, id: &str) -> Result<Vec<Output>, StoreError> {
        let id = id.to_string();
        self.read(move |conn, _| {
            let rows = read_outputs(conn, &id, false)?;
            Ok(rows.into_iter().map(|(output, _)| output).collect())
        })
        .await
    }

    /// The job, with its outputs (each with its content when the database keeps it) when it
    /// succeeded and they were not deleted, read in one transaction: what copying a job to
    /// another member needs, as of one moment.
    pub async fn get_with_outputs(&self, id: &str) -> Result<Option<JobWithOutputs>, StoreError> {
        let id = id.to_string();
        self.read(move |conn, path| {
            let snapshot = conn
                .unchecked_transaction()
                .map_err(|source| StoreError::Sqlite {
                    context: format!("reading job {id}"),
                    source,
                })?;
            let Some(job) = load_job(&snapshot, path, &id)? else {
                return Ok(None);
            };
            let outputs = if job.status == JobStatus::Succeeded && job.outputs_deleted.is_none() {
                read_outputs(&snapshot, &id, true)?
            } else {
                Vec::new()
            };
            Ok(Some((job, outputs)))
        })
        .await
    }

    /// A job's outputs, by index, each with its content when the database keeps it (inline
    /// outputs), all in one read: what copying a finished job to another member needs.
    pub async fn outputs_with_content(&self, id: &str) -> Result<OutputsWithContent, StoreError> {
        let id = id.to_string();
        self.read(move |conn, _| read_outputs(conn, &id, true))
            .await
    }

    /// A job's status history, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let id = id.to_string();
        self.read(move |conn, path| {
            let mut st = conn
                .prepare_cached(
                    "SELECT at, status, detail FROM job_events WHERE job_id = ?1 ORDER BY n",
                )
                .map_err(StoreError::sqlite("reading job events"))?;
            let rows = st
                .query_map([&id], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                    ))
                })
                .map_err(StoreError::sqlite("reading job events"))?;
            let mut out = Vec::new();
            for row in rows {
                let (at_ms, status, detail) =
                    row.map_err(StoreError::sqlite("reading job events"))?;
                out.push(JobEvent {
                    at_ms,
                    status: parse_status(&status, path)?,
                    detail,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Durations (started → ended) of the most recent successful attempts, newest first.
    pub async fn recent_durations(&self, n: usize) -> Result<Vec<Duration>, StoreError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        self.read(move |conn, _| {
            let mut st = conn
                .prepare_cached(
                    "SELECT ended_at - started_at FROM attempts WHERE outcome = 'succeeded'
                     ORDER BY ended_at DESC LIMIT ?1",
                )
                .map_err(StoreError::sqlite("reading durations"))?;
            let rows = st
                .query_map([n], |row| row.get::<_, i64>(0))
                .map_err(StoreError::sqlite("reading durations"))?;
            let mut out = Vec::new();
            for row in rows {
                let ms = row.map_err(StoreError::sqlite("reading durations"))?;
                out.push(Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
            }
            Ok(out)
        })
        .await
    }

    /// An account's usage on a UTC day (days since the Unix epoch; see [`super::utc_day`]).
    pub async fn usage(&self, account: &str, day: i64) -> Result<Usage, StoreError> {
        let account = account.to_string();
        self.read(move |conn, _| {
            let row = conn
                .prepare_cached(
                    "SELECT submitted, refused, succeeded, images, gpu_ms FROM usage_daily
                     WHERE account = ?1 AND day = ?2",
                )
                .and_then(|mut st| {
                    st.query_row(params![account, day], |row| {
                        let get = |i: usize| -> rusqlite::Result<u64> {
                            Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or(0))
                        };
                        Ok(Usage {
                            day,
                            submitted: get(0)?,
                            refused: get(1)?,
                            succeeded: get(2)?,
                            images: get(3)?,
                            gpu_ms: get(4)?,
                        })
                    })
                    .optional()
                })
                .map_err(StoreError::sqlite("reading usage"))?;
            Ok(row.unwrap_or(Usage {
                day,
                ..Usage::default()
            }))
        })
        .await
    }

    /// An account's usage per UTC day in `[from_day, to_day)`, days with any usage only, oldest
    /// first: this node's own counts plus the counts it holds as replica of the account's other
    /// owners (what its quota and fair-use decisions see).
    pub async fn usage_days(
        &self,
        account: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<Usage>, StoreError> {
        let account = account.to_string();
        self.read(move |conn, _| {
            let mut st = conn
                .prepare_cached(
                    "SELECT day, SUM(submitted), SUM(refused), SUM(succeeded), SUM(images),
                         SUM(gpu_ms)
                     FROM (SELECT day, submitted, refused, succeeded, images, gpu_ms
                           FROM usage_daily WHERE account = ?1 AND day >= ?2 AND day < ?3
                           UNION ALL
                           SELECT day, submitted, 0, succeeded, images, gpu_ms
                           FROM usage_replica WHERE account = ?1 AND day >= ?2 AND day < ?3)
                     GROUP BY day ORDER BY day",
                )
                .map_err(StoreError::sqlite("reading usage"))?;
            let rows = st
                .query_map(params![account, from_day, to_day], |row| usage_row(row, 0))
                .map_err(StoreError::sqlite("reading usage"))?;
            rows.map(|r| r.map_err(StoreError::sqlite("reading usage")))
                .collect()
        })
        .await
    }

    /// Every account's usage per UTC day in `[from_day, to_day)` as this node counted it as
    /// owner (replica counts left out, so that a merge over members counts each job once),
    /// by day then account.
    pub async fn owner_usage(
        &self,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<super::AccountUsage>, StoreError> {
        self.read(move |conn, _| {
            let mut st = conn
                .prepare_cached(
                    "SELECT account, day, submitted, refused, succeeded, images, gpu_ms
                     FROM usage_daily WHERE day >= ?1 AND day < ?2 ORDER BY day, account",
                )
                .map_err(StoreError::sqlite("reading usage"))?;
            let rows = st
                .query_map(params![from_day, to_day], |row| {
                    Ok(super::AccountUsage {
                        account: row.get(0)?,
                        usage: usage_row(row, 1)?,
                    })
                })
                .map_err(StoreError::sqlite("reading usage"))?;
            rows.map(|r| r.map_err(StoreError::sqlite("reading usage")))
                .collect()
        })
        .await
    }

    /// 1-based place of a queued job in the order `next_job` would take the jobs queued now;
    /// `None` when it is not queued. Memory only.
    pub fn position(&self, id: &str) -> Option<u64> {
        self.inner.shared.lock().scheduler.position(id)
    }

    /// How many queued jobs would run before a new job of `account` in `tier` submitted now.
    pub fn queued_ahead(&self, tier: Tier, account: &str) -> u64 {
        self.inner
            .shared
            .lock()
            .scheduler
            .queued_ahead(tier, account)
    }

    /// Per-tier queue counts and oldest waiting job, and the number of running jobs.
    pub fn summary(&self) -> QueueSummary {
        let state = self.inner.shared.lock();
        QueueSummary {
            tiers: state.scheduler.counts(),
            running: state.running.len() as u64,
        }
    }

    /// The queued jobs in the order they would be taken (for operators and tests).
    pub fn queue_order(&self) -> Vec<QueuedJob> {
        self.inner.shared.lock().scheduler.order()
    }

    /// Committed status changes, as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<JobChange> {
        self.inner.shared.changes.subscribe()
    }

    /// Stops the writer after it has committed everything already sent, and waits for it,
    /// when this is the last handle; with other clones still alive it only drops this one
    /// (the writer stops when the last one goes) and returns `Ok(false)`.
    pub async fn close(self) -> Result<bool, StoreError> {
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(_) => return Ok(false),
        };
        let handle = inner
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        // Dropping the last sender lets the writer drain its channel and stop.
        drop(inner);
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|e| StoreError::WriterGone(format!("joining the writer: {e}")))?
                .map_err(|_| StoreError::WriterGone("the writer thread panicked".to_string()))?;
        }
        Ok(true)
    }
}

fn validate(job: &NewJob) -> Result<(), StoreError> {
    validate_fields(
        &job.id,
        &job.account,
        job.idempotency_key.as_deref(),
        job.max_attempts,
    )?;
    if let Some(replica) = &job.replica {
        validate_member(replica, "replica")?;
    }
    Ok(())
}

fn validate_fields(
    id: &str,
    account: &str,
    idempotency_key: Option<&str>,
    max_attempts: u32,
) -> Result<(), StoreError> {
    let id_ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !id_ok {
        return Err(StoreError::Invalid(format!(
            "job id {id:?} must be 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '-' or '_'"
        )));
    }
    if account.is_empty() || account.len() > MAX_ACCOUNT_LEN {
        return Err(StoreError::Invalid(format!(
            "account must be 1 to {MAX_ACCOUNT_LEN} bytes"
        )));
    }
    if let Some(key) = idempotency_key
        && (key.is_empty() || key.len() > MAX_KEY_LEN)
    {
        return Err(StoreError::Invalid(format!(
            "idempotency key must be 1 to {MAX_KEY_LEN} bytes"
        )));
    }
    if max_attempts == 0 {
        return Err(StoreError::Invalid(
            "max_attempts must be at least 1".to_string(),
        ));
    }
    Ok(())
}

/// The checks every replica copy passes before it is stored.
fn validate_copy(copy: &Job, owner: &str) -> Result<(), StoreError> {
    validate_fields(
        &copy.id,
        &copy.account,
        copy.idempotency_key.as_deref(),
        copy.max_attempts,
    )?;
    validate_member(owner, "owner")
}

/// A cluster member's name as the store keeps it (owner, replica, lease holder).
fn validate_member(name: &str, what: &str) -> Result<(), StoreError> {
    if name.is_empty() || name.len() > MAX_MEMBER_LEN {
        return Err(StoreError::Invalid(format!(
            "{what} member name must be 1 to {MAX_MEMBER_LEN} bytes, got {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// Encodes a job's JSON columns (off the writer thread).
fn encode(
    workflow: &JsonText,
    metadata: Option<&serde_json::Value>,
) -> Result<Encoded, StoreError> {
    Ok(Encoded {
        workflow: workflow.as_str().to_owned(),
        metadata: metadata
            .map(|m| {
                serde_json::to_string(m)
                    .map_err(|e| StoreError::Invalid(format!("metadata cannot be stored: {e}")))
            })
            .transpose()?,
    })
}

/// A filename safe as one path component: the last component of `name`, with anything but
/// letters, digits, '.', '-' and '_' replaced by '_', at most 100 bytes, never "." or "..".
fn safe_filename(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut safe: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if safe.trim_matches('.').is_empty() {
        safe = "output".to_string();
    }
    safe
}

/// Replaces the stored retention policy and re-stamps the expiry of every succeeded job whose
/// outputs still exist, so a changed retention applies to jobs that finished before it.
fn write_retention(
    conn: &mut Connection,
    retention: &[(Tier, Duration)],
) -> Result<(), StoreError> {
    let tx = conn
        .transaction()
        .map_err(StoreError::sqlite("writing the retention policy"))?;
    tx.execute("DELETE FROM retention_policy", [])
        .map_err(StoreError::sqlite("writing the retention policy"))?;
    for (tier, keep) in retention {
        let keep_ms = i64::try_from(keep.as_millis()).map_err(|_| {
            StoreError::Invalid(format!("the retention of tier {tier} is too long"))
        })?;
        tx.execute(
            "INSERT OR REPLACE INTO retention_policy (tier, keep_ms) VALUES (?1, ?2)",
            params![tier.rank(), keep_ms],
        )
        .map_err(StoreError::sqlite("writing the retention policy"))?;
    }
    tx.execute(
        "UPDATE jobs SET outputs_expire_at =
             finished_at + (SELECT keep_ms FROM retention_policy WHERE tier = jobs.tier)
         WHERE status = 'succeeded' AND finished_at IS NOT NULL AND outputs_deleted_at IS NULL",
        [],
    )
    .map_err(StoreError::sqlite("stamping output expiry"))?;
    tx.commit()
        .map_err(StoreError::sqlite("writing the retention policy"))
}

/// Uploads a job's outputs to the bucket as `<prefix>/<job id>/<index>-<safe filename>` (with
/// a `tag`: `<prefix>/<job id>/<tag>-<index>-<safe filename>`, so that a result racing another
/// attempt's never replaces the winner's objects). Returns the outputs with their keys; the
/// first failed upload fails the whole call and deletes the objects it already put (the caller
/// records nothing then).
async fn put_objects(
    objects: &ObjectStorage,
    job_id: &str,
    outputs: Vec<NewOutput>,
    tag: Option<&str>,
) -> Result<Vec<Output>, StoreError> {
    let mut stored = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.into_iter().enumerate() {
        let index = output_index(i)?;
        let name = match tag {
            Some(tag) => format!("{tag}-{index}-{}", safe_filename(&out.filename)),
            None => format!("{index}-{}", safe_filename(&out.filename)),
        };
        let key = objects.key(job_id, &name);
        let bytes = out.bytes.len() as u64;
        let sha256 = hex::encode(Sha256::digest(&out.bytes));
        if let Err(error) = objects.put(&key, out.bytes).await {
            // Nothing will record the ones already put: take them back (best effort).
            for key in stored.iter().filter_map(|o: &Output| o.key.as_deref()) {
                if let Err(error) = objects.delete(key).await {
                    tracing::warn!(%key, %error, "job store: cannot delete an unrecorded output object");
                }
            }
            return Err(StoreError::Objects(error));
        }
        stored.push(Output {
            index,
            filename: out.filename,
            content_type: out.content_type,
            bytes,
            path: PathBuf::new(),
            sha256,
            watermark: out.watermark,
            key: Some(key),
            inline: false,
        });
    }
    Ok(stored)
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!("syncing {}", dir.display())))
}

/// The folder, relative to the data dir, that holds a job's output files:
/// `outputs/<two hex digits of the job id's SHA-256>`. There are 256 of them, made when first
/// needed, so storing a result creates no folder per job (on ext4 a `mkdir` and its inode cost
/// about as much CPU as the file itself), and no folder holds more than about 1/256 of a
/// node's files. A job's files in it are those whose names start with `<job id>.` (job ids
/// hold no dot). Older stores kept `outputs/<job id>/`; their rows keep those paths.
pub fn output_folder(job_id: &str) -> PathBuf {
    let digest = Sha256::digest(job_id.as_bytes());
    Path::new(OUTPUTS_DIR).join(hex::encode(&digest[..1]))
}

/// The names of the files a job has on disk in its output folder, recorded or not (and in its
/// folder of an older store), sorted. For checks and tooling; the store goes by its rows.
pub fn output_files_on_disk(data_dir: &Path, job_id: &str) -> Vec<String> {
    let names_in = |dir: PathBuf| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mine = format!("{job_id}.");
    let mut names: Vec<String> = names_in(data_dir.join(output_folder(job_id)))
        .into_iter()
        .filter(|name| name.starts_with(&mine))
        .chain(names_in(data_dir.join(OUTPUTS_DIR).join(job_id)))
        .collect();
    names.sort();
    names
}

/// The indexes of a job's outputs whose content the store's database in `data_dir` holds
/// (inline outputs not deleted), read through a read-only connection of its own, so it works
/// beside a running node. For checks and tooling, as [`output_files_on_disk`].
pub fn inline_outputs_in_db(data_dir: &Path, job_id: &str) -> Result<Vec<u32>, StoreError> {
    let conn = open_reader(&data_dir.join(DB_FILE))?;
    let mut st = conn
        .prepare("SELECT idx FROM outputs WHERE job_id = ?1 AND data IS NOT NULL ORDER BY idx")
        .map_err(StoreError::sqlite("listing inline outputs"))?;
    let rows = st
        .query_map([job_id], |row| row.get(0))
        .map_err(StoreError::sqlite("listing inline outputs"))?;
    rows.collect::<Result<Vec<u32>, _>>()
        .map_err(StoreError::sqlite("listing inline outputs"))
}

/// The most bytes of inline outputs, all together, hashed on the caller's thread instead of a
/// blocking one (SHA-256 of 64 KiB takes ~0.1-0.2 ms).
const INLINE_ON_CALLER_BYTES: usize = 64 * 1024;

/// Whether an output's content goes into the database rather than a file of its own.
fn kept_inline(out: &NewOutput, inline_max: u64) -> bool {
    inline_max > 0 && out.bytes.len() as u64 <= inline_max
}

/// Writes a job's outputs into its [`output_folder`] as `<job id>.<index>-<safe filename>`
/// (with a `prefix`: `<job id>.<prefix>-<index>-<safe filename>`, so that concurrent writers of
/// one job never replace each other's files), fsyncs each file, then the folder (and
/// `outputs/` when the folder is new), so the names are durable before a commit records them.
/// The files are written under their final names: a row names them only after this returns,
/// so a file cut short by a crash is never served (and nothing records it). Outputs of at
/// most `inline_max` bytes (when it is not 0) get no file: their content goes to the database
/// with the row, in the same commit.
fn write_outputs(
    data_dir: &Path,
    job_id: &str,
    outputs: Vec<NewOutput>,
    prefix: Option<&str>,
    inline_max: u64,
) -> Result<Vec<StoredOutput>, StoreError> {
    use std::io::Write;
    let inline = |out: &NewOutput| kept_inline(out, inline_max);
    if outputs.iter().all(inline) {
        return outputs
            .into_iter()
            .enumerate()
            .map(|(i, out)| inline_output(i, out))
            .collect();
    }
    let rel_dir = output_folder(job_id);
    let dir = data_dir.join(&rel_dir);
    let new_folder = match std::fs::create_dir(&dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)
                .map_err(StoreError::io(format!("creating {}", dir.display())))?;
            true
        }
        Err(e) => {
            return Err(StoreError::Io {
                context: format!("creating {}", dir.display()),
                source: e,
            });
        }
    };
    let mut written = Vec::with_capacity(outputs.len());
    for (i, out) in outputs.into_iter().enumerate() {
        if inline(&out) {
            written.push(inline_output(i, out)?);
            continue;
        }
        let index = output_index(i)?;
        let name = match prefix {
            Some(prefix) => format!("{job_id}.{prefix}-{index}-{}", safe_filename(&out.filename)),
            None => format!("{job_id}.{index}-{}", safe_filename(&out.filename)),
        };
        let path = dir.join(&name);
        let mut file = std::fs::File::create(&path)
            .map_err(StoreError::io(format!("creating {}", path.display())))?;
        file.write_all(&out.bytes)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io(format!("writing {}", path.display())))?;
        written.push(StoredOutput::elsewhere(Output {
            index,
            filename: out.filename,
            content_type: out.content_type,
            bytes: out.bytes.len() as u64,
            path: rel_dir.join(&name),
            sha256: hex::encode(Sha256::digest(&out.bytes)),
            watermark: out.watermark,
            key: None,
            inline: false,
        }));
    }
    fsync_dir(&dir)?;
    if new_folder {
        fsync_dir(&data_dir.join(OUTPUTS_DIR))?;
    }
    Ok(written)
}

fn output_index(i: usize) -> Result<u32, StoreError> {
    u32::try_from(i).map_err(|_| StoreError::Invalid("too many outputs".to_string()))
}

/// Output `i` kept in the database: no path, its content beside the row.
fn inline_output(i: usize, out: NewOutput) -> Result<StoredOutput, StoreError> {
    Ok(StoredOutput {
        output: Output {
            index: output_index(i)?,
            filename: out.filename,
            content_type: out.content_type,
            bytes: out.bytes.len() as u64,
            path: PathBuf::new(),
            sha256: hex::encode(Sha256::digest(&out.bytes)),
            watermark: out.watermark,
            key: None,
            inline: true,
        },
        data: Some(out.bytes),
    })
}

const JOB_COLUMNS: &str = job_columns!();

/// The cluster columns of a row: role, owner, replica, lease holder.
type RawCluster = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The output retention columns of a row: expiry, deletion time and reason.
type RawRetention = (Option<i64>, Option<i64>, Option<String>);

type RawJob = (
    String,
    i64,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    Option<String>,
    RawCluster,
    RawRetention,
);

fn raw_job(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawJob> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
        row.get(10)?,
        row.get(11)?,
        row.get(12)?,
        row.get(13)?,
        row.get(14)?,
        row.get(15)?,
        (
            row.get(16)?,
            row.get(17)?,
            row.get(18)?,
            row.get(19)?,
            row.get(20)?,
        ),
        (row.get(21)?, row.get(22)?, row.get(23)?),
    ))
}

/// A usage row whose columns from `first` are day, submitted, refused, succeeded, images,
/// gpu_ms.
fn usage_row(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Usage> {
    let get = |i: usize| -> rusqlite::Result<u64> {
        Ok(u64::try_from(row.get::<_, i64>(first + i)?).unwrap_or(0))
    };
    Ok(Usage {
        day: row.get(first)?,
        submitted: get(1)?,
        refused: get(2)?,
        succeeded: get(3)?,
        images: get(4)?,
        gpu_ms: get(5)?,
    })
}

fn parse_status(s: &str, path: &Path) -> Result<JobStatus, StoreError> {
    s.parse().map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("{e}"),
    })
}

fn corrupt_json(path: &Path, id: &str, what: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("job {id}: {what} is not valid JSON: {e}"),
    }
}

fn job_from_raw(raw: RawJob, path: &Path) -> Result<Job, StoreError> {
    let (
        id,
        seq,
        account,
        tier,
        status,
        workflow,
        webhook,
        metadata,
        idempotency_key,
        body_hash,
        created_at_ms,
        started_at_ms,
        finished_at_ms,
        attempts,
        max_attempts,
        error,
        (role, owner, replica, lease_holder, throttled),
        (outputs_expire_at_ms, deleted_at, deleted_reason),
    ) = raw;
    let outputs_deleted = match (deleted_at, deleted_reason) {
        (Some(at), Some(reason)) => {
            let reason = reason.parse().map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("job {id}: {e}"),
            })?;
            Some((at, reason))
        }
        _ => None,
    };
    let role = role.parse().map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("job {id}: {e}"),
    })?;
    let workflow = JsonText::parse(workflow).map_err(|e| corrupt_json(path, &id, "workflow", e))?;
    let metadata = match metadata {
        Some(m) => {
            Some(serde_json::from_str(&m).map_err(|e| corrupt_json(path, &id, "metadata", e))?)
        }
        None => None,
    };
    let error: Option<JobError> = match error {
        Some(e) => Some(serde_json::from_str(&e).map_err(|e| corrupt_json(path, &id, "error", e))?),
        None => None,
    };
    Ok(Job {
        seq,
        account,
        tier: tier_from_rank(tier, path)?,
        status: parse_status(&status, path)?,
        workflow,
        webhook,
        metadata,
        idempotency_key,
        body_hash,
        created_at_ms,
        started_at_ms,
        finished_at_ms,
        attempts: u32::try_from(attempts).unwrap_or(0),
        max_attempts: u32::try_from(max_attempts).unwrap_or(1),
        error,
        role,
        owner,
        replica,
        lease_holder,
        throttled,
        outputs_expire_at_ms,
        outputs_deleted,
        id,
    })
}

/// Reads the jobs matching `filter` (an SQL condition, with its ORDER BY).
pub(crate) fn load_jobs(
    conn: &Connection,
    path: &Path,
    filter: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {filter}");
    let mut st = conn
        .prepare_cached(&sql)
        .map_err(StoreError::sqlite("reading jobs"))?;
    let rows = st
        .query_map(args, raw_job)
        .map_err(StoreError::sqlite("reading jobs"))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(job_from_raw(
            row.map_err(StoreError::sqlite("reading jobs"))?,
            path,
        )?);
    }
    Ok(out)
}

/// A job's output rows by index, each with its content when the database keeps it.
pub type OutputsWithContent = Vec<(Output, Option<Vec<u8>>)>;

/// A job and, when it succeeded and they were not deleted, its outputs with their content.
pub type JobWithOutputs = (Job, OutputsWithContent);

/// A job's output rows by index; with `content`, each inline output's bytes too.
fn read_outputs(
    conn: &Connection,
    id: &str,
    content: bool,
) -> Result<OutputsWithContent, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT idx, filename, content_type, bytes, path, sha256, watermark, object_key,
                 data IS NOT NULL, CASE WHEN ?2 THEN data END
             FROM outputs WHERE job_id = ?1 ORDER BY idx",
        )
        .map_err(StoreError::sqlite("reading outputs"))?;
    let rows = st
        .query_map(params![id, content], |row| {
            let output = Output {
                index: row.get(0)?,
                filename: row.get(1)?,
                content_type: row.get(2)?,
                bytes: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
                path: PathBuf::from(row.get::<_, String>(4)?),
                sha256: row.get(5)?,
                watermark: row
                    .get::<_, Option<String>>(6)?
                    .map(|text| WatermarkStatus::from_text(&text)),
                key: row.get(7)?,
                inline: row.get(8)?,
            };
            Ok((output, row.get::<_, Option<Vec<u8>>>(9)?))
        })
        .map_err(StoreError::sqlite("reading outputs"))?;
    rows.collect::<Result<Vec<_>, _>>()
        .map_err(StoreError::sqlite("reading outputs"))
}

/// Reads one job by id.
pub(crate) fn load_job(
    conn: &Connection,
    path: &Path,
    id: &str,
) -> Result<Option<Job>, StoreError> {
    let raw = conn
        .prepare_cached(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE id = ?1"
        ))
        .and_then(|mut st| st.query_row([id], raw_job).optional())
        .map_err(|source| StoreError::Sqlite {
            context: format!("reading job {id}"),
            source,
        })?;
    raw.map(|raw| job_from_raw(raw, path)).transpose()
}

/// Reads every queued owner job as the scheduler needs it (replica rows are never scheduled).
pub(crate) fn load_queued(conn: &Connection, path: &Path) -> Result<Vec<QueuedJob>, StoreError> {
    let mut st = conn
        .prepare(
            "SELECT id, tier, account, seq, created_at, throttled IS NOT NULL FROM jobs
             WHERE status = 'queued' AND role = 'owner'",
        )
        .map_err(StoreError::sqlite("reading queued jobs"))?;
    let rows = st
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, bool>(5)?,
            ))
        })
        .map_err(StoreError::sqlite("reading queued jobs"))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, tier, account, seq, created_at_ms, throttled) =
            row.map_err(StoreError::sqlite("reading queued jobs"))?;
        let tier = tier_from_rank(tier, path)?;
        out.push(QueuedJob {
            id,
            // A throttled job waits at free priority (see `Job::queue_tier`).
            tier: if throttled { Tier::Free } else { tier },
            account,
            seq,
            created_at_ms,
        });
    }
    Ok(out)
}

/// Reads the stored fairness ring and the greatest ring position ever handed out.
pub(crate) fn load_ring(
    conn: &Connection,
    path: &Path,
) -> Result<(Vec<RingPos>, Option<u64>), StoreError> {
    let mut st = conn
        .prepare("SELECT tier, account, pos FROM fair_ring")
        .map_err(StoreError::sqlite("reading the fairness ring"))?;
    let rows = st
        .query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .map_err(StoreError::sqlite("reading the fairness ring"))?;
    let mut ring = Vec::new();
    for row in rows {
        let (tier, account, pos) = row.map_err(StoreError::sqlite("reading the fairness ring"))?;
        ring.push(RingPos {
            tier: tier_from_rank(tier, path)?,
            account,
            pos: u64::try_from(pos).unwrap_or(0),
        });
    }
    let max_job_pos: Option<i64> = conn
        .query_row("SELECT MAX(ring_pos) FROM jobs", [], |row| row.get(0))
        .map_err(StoreError::sqlite("reading the fairness ring"))?;
    let max_ring = ring.iter().map(|r| r.pos).max();
    let max_job = max_job_pos.and_then(|p| u64::try_from(p).ok());
    Ok((ring, max_ring.max(max_job)))
}
