//! Jobs across the cluster: where a new job is stored, who runs it, and how any node answers
//! for any job.
//!
//! - **Placement.** An account's new jobs belong to the first live, ready GPU member in
//!   rendezvous order of the account ([`crate::peer::placement`]); the next one holds the
//!   replica. The node that took the HTTP request forwards the submission to the owner. The
//!   owner stores the job, then copies it to the replica, and only then is the 202 answered; a
//!   replica that cannot be reached is replaced by the next member in order, and with nobody
//!   else live the job is accepted alone (`replicas: 0`).
//! - **Leases.** An idle node takes the best waiting job of the whole cluster, its own queue or a
//!   peer's (as gossip shows their queue heads), by asking the owner for a lease. The runner
//!   renews it while the job runs and reports progress and the result (with the output files)
//!   to the owner. A lease not renewed in time expires and the job is queued again; the first
//!   final result wins. An owner whose own runner is busy nudges idle peers so that a new job
//!   starts at once rather than a gossip round later.
//! - **Any node answers.** Status, list, cancel, events and outputs of a job another member
//!   owns are fetched from (or sent to) that member.
//! - **Replicas follow.** Every change of an owned job that matters to an adopter (a lease, a
//!   requeue, a final result with its outputs, a cancel) is copied to its replica before the
//!   change is acted on; the local runner's start is not (if the owner dies mid-job, its runner
//!   died too, and the job may run again).
//!
//! Standalone (no cluster), everything is local. This module must never hold a lock across an
//! `.await`, never answer a 202 before the owner (and the replica, when there is one) stored
//! the job, and never let a stale attempt undo a final result.

mod handler;
mod keys;
mod liveness;
mod outputs;
mod transfer;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::ApiError;
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::net::PeerAddr;
use crate::node::Live;
use crate::peer::messages::{
    JobRequest, JobResponse, KeyAnswer, KeyLookup, WireJob, WireNewJob, WireOutput, WireRefusal,
    WireResult, WireUsage, parse_view,
};
use crate::peer::{PeerRpc, RpcConfig, RpcError, placement, wire};
use crate::protocol::cluster::{MemberState, Role};
use crate::protocol::{ErrorCode, JobStatus, JobView, Progress, Tier};
use crate::queue::{
    AccountUsage, CancelOutcome, Finished, Job, JobRole, JobStore, JsonText, NewJob, NewOutput,
    Outcome, Quota, StoreError, Usage,
};

pub use transfer::OutputFile;

/// How long a forwarded submission may take at the owner (it stores and replicates).
pub(crate) const SUBMIT_DEADLINE: Duration = Duration::from_secs(5);
/// How long a replica may take to store a copy.
const REPLICATE_DEADLINE: Duration = Duration::from_secs(3);
/// How often a busy peer is nudged about one tier at most.
const NUDGE_EVERY: Duration = Duration::from_millis(500);
/// How long a nudge makes its sender worth asking for a lease.
const HINT_FOR: Duration = Duration::from_secs(3);
/// How long a peer that asked for a lease and got none counts as idle, whatever gossip (a round
/// or two behind) says.
const ASKED_IDLE_FOR: Duration = Duration::from_secs(1);
/// How long copies of an owner that died before they were refreshed wait before they are
/// adopted: time for the member that held the owner's current copies (this node was away) to
/// see the death too and adopt those, so that asking who owns the jobs finds it.
const STALE_ADOPT_AFTER: Duration = Duration::from_secs(10);
/// Job ids per `Whose` or `Refresh` question.
const IDS_PER_QUESTION: usize = 1000;
/// How many times an update that did not reach a job's replica is sent again (once a
/// second) before it is left to the next change of the job.
const LAGGING_RETRIES: u32 = 30;
/// Extra time an adopted lease gets before it expires.
const ADOPTED_LEASE_GRACE: Duration = Duration::from_secs(10);
/// How long a lease waits for the replica to learn of it before it is answered anyway.
const LEASE_COPY_WITHIN: Duration = Duration::from_secs(1);
/// How long a runner waits for a lease (the owner copies it to its replica first).
const LEASE_DEADLINE: Duration = Duration::from_secs(5);
/// Reads, leases, renewals and small messages.
const SHORT_DEADLINE: Duration = Duration::from_secs(2);
/// Uploads not finished within this are dropped.
const UPLOAD_IDLE: Duration = Duration::from_secs(300);

/// How soon a member that is storing a submission with the same idempotency key is asked
/// again.
const KEY_IN_PROGRESS_RETRY: Duration = Duration::from_millis(50);
/// How long one ask of a member about an idempotency key waits before it is asked again
/// (within [`SHORT_DEADLINE`] in all).
const KEY_ASK_ATTEMPT: Duration = Duration::from_millis(650);

/// Settings of the cluster job layer.
#[derive(Debug, Clone)]
pub struct JobsSettings {
    /// How long a lease lasts without a renewal; runners renew every third of it.
    pub lease: Duration,
    /// How long a cancel waits for a running job's interrupt to land.
    pub cancel_wait: Duration,
    /// The largest peer message (keep it equal to the endpoint's `max_frame_bytes`).
    pub max_frame_bytes: usize,
    /// Outputs up to this many bytes in all ride inside result and replica messages (to
    /// members that speak protocol 1.1); 0 always uploads them in chunks first.
    pub inline_outputs_bytes: usize,
}

/// A job this node's runner took: its own, or leased from its owner.
#[derive(Debug, Clone)]
pub enum Work {
    Local(Job),
    Remote(RemoteJob),
}

impl Work {
    pub fn job(&self) -> &Job {
        match self {
            Work::Local(job) => job,
            Work::Remote(remote) => &remote.job,
        }
    }
}

/// A job leased from another member.
#[derive(Debug, Clone)]
pub struct RemoteJob {
    /// The job as leased; `replica` names where its owner keeps the copy.
    pub job: Job,
    pub attempt: u32,
    /// Who owns the job now: the member it was leased from, until that member hands it over
    /// (it drains) or dies (its replica adopts the job).
    owner: Arc<Mutex<String>>,
    /// Registers the attempt as held by this node until the last clone is dropped (the run
    /// and its report are over), so an owner whose lease timer ran out can ask.
    _held: Arc<Held>,
}

/// Leased attempts this node holds: job id → attempt.
type HeldMap = Arc<Mutex<HashMap<String, u32>>>;

/// One entry of [`HeldMap`], removed when dropped.
#[derive(Debug)]
struct Held {
    map: HeldMap,
    job_id: String,
    attempt: u32,
}

impl Held {
    fn new(map: &HeldMap, job_id: &str, attempt: u32) -> Arc<Held> {
        lock(map).insert(job_id.to_string(), attempt);
        Arc::new(Held {
            map: map.clone(),
            job_id: job_id.to_string(),
            attempt,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut map = lock(&self.map);
        if map.get(&self.job_id) == Some(&self.attempt) {
            map.remove(&self.job_id);
        }
    }
}

impl RemoteJob {
    /// The member the lease is renewed with and the result reported to.
    pub fn owner(&self) -> String {
        lock(&self.owner).clone()
    }

    fn set_owner(&self, name: &str) {
        let mut owner = lock(&self.owner);
        if *owner != name {
            tracing::info!(job = %self.job.id, from = %owner, to = %name, "the leased job has a new owner");
            *owner = name.to_string();
        }
    }
}

#[derive(Debug, Clone)]
struct LeaseEntry {
    holder: String,
    attempt: u32,
    expires: Instant,
    /// When the lease was given or last renewed (by the holder, or on its word when asked).
    renewed: Instant,
}

impl LeaseEntry {
    fn new(holder: &str, attempt: u32, now: Instant, lasts: Duration) -> LeaseEntry {
        LeaseEntry {
            holder: holder.to_string(),
            attempt,
            expires: now + lasts,
            renewed: now,
        }
    }
}

/// The cluster job layer of a node. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    name: String,
    store: JobStore,
    /// Deletes outputs (on request, see [`outputs`]).
    results: crate::results::Results,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<Cluster>>,
    rpc: OnceLock<PeerRpc<JobRequest, JobResponse>>,
    settings: JobsSettings,
    leases: Mutex<HashMap<String, LeaseEntry>>,
    /// Attempts this node's runner holds on other members' jobs (it runs or reports them).
    held: HeldMap,
    /// Jobs cancelled while a peer runs them: their next renewal is refused.
    cancelled: Mutex<HashSet<String>>,
    uploads: transfer::Uploads,
    /// Wakes the runner to look for work (a nudge from a peer, a lease that expired).
    pull: Notify,
    /// Peers that nudged this node recently, with their best waiting tier: worth asking for a
    /// lease before gossip shows their queue.
    hints: Mutex<HashMap<String, (Option<Tier>, Instant)>>,
    /// Busy peers nudged about a paid tier recently, and when.
    nudged: Mutex<HashMap<(String, Tier), Instant>>,
    /// Peers whose idle runner asked this node for a lease and got none, and when: idle now,
    /// though gossip may still show the job they ran last (see [`ASKED_IDLE_FOR`]).
    asked_idle: Mutex<HashMap<String, Instant>>,
    /// Idempotency-key questions waiting to go to each member (see [`keys`]).
    key_questions: Arc<keys::KeyQuestions>,
    /// Idempotency keys (account, key) of submissions this node is storing as owner and has
    /// not committed yet, with how many: another member asking about one hears it is in
    /// progress.
    storing_keys: Mutex<HashMap<(String, String), usize>>,
    /// Members recently told this node does not know an account's key (see [`keys`]).
    key_askers: keys::KeyAskers,
    /// Set while the node drains: no leases handed out, no submissions taken as owner.
    draining: CancellationToken,
    /// Held (shared) by every lease and submission this node handles as owner; the hand-over
    /// of a drain takes it exclusively once, so that none still in flight changes a job after
    /// its state was copied to the new owner.
    owner_ops: tokio::sync::RwLock<()>,
    /// When the job layer started.
    started: Instant,
    /// What this node saw of its peers' liveness (see [`liveness`]).
    liveness: Mutex<liveness::Liveness>,
    /// Owned jobs whose replica missed their last update, with how often it was sent again.
    lagging: Mutex<HashMap<String, u32>>,
    /// Owners of copies this node keeps that it has not asked, since it started, which copies
    /// are still current (see [`Inner::refresh_copies`]).
    unrefreshed: Mutex<HashSet<String>>,
    /// Owners that died before this node could refresh their copies, and when that was seen:
    /// their copies may be stale, so they are adopted only after [`STALE_ADOPT_AFTER`], and
    /// only those no live member owns by then.
    died_unrefreshed: Mutex<HashMap<String, Instant>>,
    /// Set once this node knows which of its stored jobs are still its own (see
    /// [`Jobs::reconcile`]); until then it neither runs nor leases its queue.
    reconciled: CancellationToken,
    stop: CancellationToken,
    tasks: TaskTracker,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks an idempotency key as being stored by this node (see `Inner::storing_keys`) until
/// dropped.
struct StoringKey<'a> {
    inner: &'a Inner,
    key: (String, String),
}

impl<'a> StoringKey<'a> {
    fn new(inner: &'a Inner, account: &str, key: &str) -> StoringKey<'a> {
        let key = (account.to_string(), key.to_string());
        *lock(&inner.storing_keys).entry(key.clone()).or_insert(0) += 1;
        StoringKey { inner, key }
    }
}

impl Drop for StoringKey<'_> {
    fn drop(&mut self) {
        let mut storing = lock(&self.inner.storing_keys);
        if let Some(n) = storing.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                storing.remove(&self.key);
            }
        }
    }
}

/// The refusal of a keyed submission while another member is storing one with the same key
/// as the account's owner (both took themselves for it): the client retries and then gets
/// the job that member stored.
pub(super) fn key_in_progress(key: &str, member: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        format!(
            "a submission with the Idempotency-Key {key:?} is still being stored by {member}; \
             retry shortly"
        ),
    )
    .retry_after(1)
}

impl Jobs {
    /// Starts the job layer: in a cluster, answers peers on the endpoint's peer channel, times
    /// leases (those the store recovered included) and keeps replicas up to date.
    pub fn start(
        name: String,
        store: JobStore,
        live: Arc<Live>,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
        settings: JobsSettings,
    ) -> anyhow::Result<Jobs> {
        let now = Instant::now();
        let leases = store
            .recovery()
            .leased
            .iter()
            .map(|lease| {
                (
                    lease.job_id.clone(),
                    LeaseEntry::new(&lease.holder, lease.attempt, now, settings.lease),
                )
            })
            .collect();
        let key_questions = Arc::new(keys::KeyQuestions::new(
            SHORT_DEADLINE,
            metrics.key_lookups.clone(),
            metrics.key_lookup_messages.clone(),
        ));
        let inner = Arc::new(Inner {
            name,
            results: crate::results::Results::new(store.clone()),
            store,
            live,
            metrics,
            cluster: cluster.clone(),
            rpc: OnceLock::new(),
            settings,
            leases: Mutex::new(leases),
            held: HeldMap::default(),
            cancelled: Mutex::new(HashSet::new()),
            uploads: transfer::Uploads::default(),
            pull: Notify::new(),
            hints: Mutex::new(HashMap::new()),
            nudged: Mutex::new(HashMap::new()),
            asked_idle: Mutex::new(HashMap::new()),
            key_questions,
            storing_keys: Mutex::new(HashMap::new()),
            key_askers: keys::KeyAskers::new(keys::ASKER_REMEMBERED_FOR, keys::MAX_ASKERS),
            draining: CancellationToken::new(),
            owner_ops: tokio::sync::RwLock::new(()),
            started: now,
            liveness: Mutex::new(liveness::Liveness::default()),
            lagging: Mutex::new(HashMap::new()),
            unrefreshed: Mutex::new(HashSet::new()),
            died_unrefreshed: Mutex::new(HashMap::new()),
            reconciled: CancellationToken::new(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        if let Some(cluster) = &cluster {
            let rpc = PeerRpc::start(
                cluster.endpoint().clone(),
                handler::JobHandler::new(Arc::downgrade(&inner)),
                RpcConfig {
                    max_concurrent_handlers: 256,
                    max_frame_bytes: inner.settings.max_frame_bytes,
                },
            )
            .map_err(|e| anyhow::anyhow!("cannot start the peer job protocol: {e}"))?;
            let _ = inner.rpc.set(rpc);
            inner.tasks.spawn(expire_leases(inner.clone()));
            inner.tasks.spawn(follow_members(inner.clone()));
            inner.tasks.spawn(resend_lagging(inner.clone()));
        } else {
            inner.reconciled.cancel();
        }
        Ok(Jobs { inner })
    }

    /// This member's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Stops handing out leases and taking submissions as owner.
    pub fn start_draining(&self) {
        self.inner.draining.cancel();
    }

    /// Stops the background tasks and the peer protocol.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        if let Some(rpc) = self.inner.rpc.get() {
            rpc.shutdown().await;
        }
        self.inner.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.inner.tasks.wait()).await;
    }

    /// Stores a new job where it belongs (here, or forwarded to its owner) and answers its view
    /// and whether it was created (false: an idempotent replay).
    pub async fn submit(&self, new: NewJob, quota: Quota) -> Result<(JobView, bool), ApiError> {
        let inner = &self.inner;
        let ranked = inner.ranked(&new.account);
        if inner.cluster.is_none() || ranked.is_empty() {
            if inner.draining.is_cancelled() {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    "this node is draining and no other member takes jobs",
                )
                .retry_after(5));
            }
            return inner.submit_as_owner(new, quota, &ranked).await;
        }
        let wire = wire_new_job(&new)?;
        let mut last_error = None;
        // After a failed attempt, a member that says the job already exists holds what that
        // attempt stored (or its copy): to the client, which never had an answer, it is new.
        let mut retrying = false;
        for name in &ranked {
            if name == &inner.name {
                if inner.draining.is_cancelled() {
                    continue;
                }
                return inner.submit_as_owner(new, quota, &ranked).await;
            }
            let Some(addr) = inner.addr_of(name) else {
                continue;
            };
            let request = JobRequest::Submit {
                job: Box::new(wire.clone()),
                sent_at_ms: crate::node::unix_ms(),
                quota_per_day: quota.per_day,
                quota_per_month: quota.per_month,
                fair_use_images: quota.fair_use_images,
            };
            match inner.request(addr, request, SUBMIT_DEADLINE).await {
                Ok(JobResponse::Submitted { view, created }) => {
                    let view = parse_view(&view).map_err(ApiError::internal)?;
                    return Ok((view, created || retrying));
                }
                // A member that takes no jobs now (it is draining, and gossip has not shown
                // it yet): the next one in the account's order is the owner instead.
                Ok(JobResponse::Refused(refusal)) if refusal.code == ErrorCode::Unavailable => {
                    last_error = Some(format!("{name}: {}", refusal.message));
                }
                Ok(JobResponse::Refused(refusal)) => return Err(refusal_error(refusal)),
                Ok(other) => {
                    last_error = Some(format!("{name} answered {other:?}"));
                }
                Err(RpcError::Closed) => {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "this node is shutting down; submit to another member",
                    )
                    .retry_after(1));
                }
                Err(error) => {
                    tracing::warn!(owner = %name, %error, job = %new.id, "forwarding a submission failed; trying the next member");
                    // The owner may have stored it and only the answer was lost.
                    if let Ok(Some(view)) = inner.get_from(name, &new.id, &new.account).await {
                        return Ok((view, true));
                    }
                    last_error = Some(format!("{name}: {error}"));
                    retrying = true;
                }
            }
        }
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "no member could store the job ({})",
                last_error.unwrap_or_else(|| "no ready member".to_string())
            ),
        )
        .retry_after(5))
    }

    /// The job as the API shows it, from whichever member owns it.
    pub async fn get(&self, account: &str, id: &str) -> Result<JobView, ApiError> {
        let inner = &self.inner;
        let local = inner.store.get(id).await.map_err(ApiError::internal)?;
        let local = local.filter(|job| job.account == account);
        if let Some(job) = &local
            && job.role == JobRole::Owner
        {
            return inner.view(job).await.map_err(ApiError::internal);
        }
        for name in inner.owner_candidates(account, local.as_ref()) {
            match inner.get_from(&name, id, account).await {
                Ok(Some(view)) => return Ok(view),
                Ok(None) => {}
                Err(error) => tracing::debug!(member = %name, %error, "asking for a job"),
            }
        }
        // Nobody that owns it answered: the copy kept here is the best there is, else any
        // member's (while a dead owner's jobs await adoption, only copies exist).
        if let Some(job) = local {
            return inner.view(&job).await.map_err(ApiError::internal);
        }
        for name in inner.owner_candidates(account, None) {
            let Some(addr) = inner.addr_of(&name) else {
                continue;
            };
            let request = JobRequest::Get {
                id: id.to_string(),
                account: account.to_string(),
                any_role: true,
            };
            if let Ok(JobResponse::Job { view: Some(view) }) =
                inner.request(addr, request, SHORT_DEADLINE).await
            {
                return parse_view(&view).map_err(ApiError::internal);
            }
        }
        Err(not_found(id))
    }

    /// An account's usage per UTC day in `[from_day, to_day)`, as the account's owner counts
    /// it (its own counts plus those it holds as replica): asked of the owner when this node is
    /// not it, then of the next members in the account's order, and this node's own counts
    /// when none answers.
    pub async fn usage(
        &self,
        account: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<Usage>, ApiError> {
        let inner = &self.inner;
        for name in inner.ranked(account) {
            if name == inner.name {
                break;
            }
            let Some(addr) = inner.addr_of(&name) else {
                continue;
            };
            let request = JobRequest::Usage {
                account: account.to_string(),
                from_day,
                to_day,
            };
            match inner.request(addr, request, SHORT_DEADLINE).await {
                Ok(JobResponse::Usage { rows }) => {
                    return Ok(rows.into_iter().map(usage_from_wire).collect());
                }
                Ok(other) => {
                    tracing::warn!(member = %name, answer = ?other, "unexpected answer to usage")
                }
                Err(error) => tracing::debug!(member = %name, %error, "asking for usage"),
            }
        }
        inner
            .store
            .usage_days(account, from_day, to_day)
            .await
            .map_err(ApiError::internal)
    }

    /// Every account's usage per UTC day in `[from_day, to_day)`, summed over the owner counts
    /// of this node and every live peer (replica copies left out, so each job counts once).
    /// Returns the rows by day then account, the members included and those that did not
    /// answer.
    pub async fn cluster_usage(
        &self,
        from_day: i64,
        to_day: i64,
    ) -> Result<(Vec<AccountUsage>, Vec<String>, Vec<String>), ApiError> {
        let inner = &self.inner;
        let mut merged: std::collections::BTreeMap<(i64, String), Usage> = Default::default();
        let mut add = |account: String, usage: Usage| {
            let entry = merged.entry((usage.day, account)).or_insert(Usage {
                day: usage.day,
                ..Usage::default()
            });
            entry.submitted += usage.submitted;
            entry.refused += usage.refused;
            entry.succeeded += usage.succeeded;
            entry.images += usage.images;
            entry.gpu_ms += usage.gpu_ms;
        };
        for row in inner
            .store
            .owner_usage(from_day, to_day)
            .await
            .map_err(ApiError::internal)?
        {
            add(row.account, row.usage);
        }
        let mut members = vec![inner.name.clone()];
        let mut missing = Vec::new();
        let asks = inner.live_peers().into_iter().map(|name| async move {
            let answer = match inner.addr_of(&name) {
                Some(addr) => inner
                    .request(
                        addr,
                        JobRequest::OwnerUsage { from_day, to_day },
                        SHORT_DEADLINE,
                    )
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("no known address".to_string()),
            };
            (name, answer)
        });
        for (name, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(JobResponse::Usage { rows }) => {
                    for row in rows {
                        let account = row.account.clone();
                        add(account, usage_from_wire(row));
                    }
                    members.push(name);
                }
                Ok(other) => {
                    tracing::warn!(member = %name, answer = ?other, "unexpected answer to usage");
                    missing.push(name);
                }
                Err(error) => {
                    tracing::warn!(member = %name, %error, "a member did not report its usage");
                    missing.push(name);
                }
            }
        }
        members.sort();
        missing.sort();
        let rows = merged
            .into_iter()
            .map(|((_, account), usage)| AccountUsage { account, usage })
            .collect();
        Ok((rows, members, missing))
    }

    /// The account's jobs across the cluster, newest first.
    pub async fn list(
        &self,
        account: &str,
        status: Option<JobStatus>,
        limit: u32,
    ) -> Result<Vec<JobView>, ApiError> {
        let inner = &self.inner;
        let local = inner
            .store
            .list(account, status, limit as usize)
            .await
            .map_err(ApiError::internal)?;
        let mut owned: HashMap<String, JobView> = HashMap::new();
        let mut copies: HashMap<String, JobView> = HashMap::new();
        for job in &local {
            let view = inner.view(job).await.map_err(ApiError::internal)?;
            match job.role {
                JobRole::Owner => owned.insert(job.id.clone(), view),
                JobRole::Replica => copies.insert(job.id.clone(), view),
            };
        }
        let peers: Vec<(String, SocketAddr)> = inner
            .live_peers()
            .into_iter()
            .filter_map(|name| inner.addr_of(&name).map(|addr| (name, addr)))
            .collect();
        let asks = peers.iter().map(|(name, addr)| {
            let request = JobRequest::List {
                account: account.to_string(),
                status,
                limit,
            };
            async move { (name, inner.request(*addr, request, SHORT_DEADLINE).await) }
        });
        for (name, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(JobResponse::Jobs { views }) => {
                    for text in views {
                        match parse_view(&text) {
                            Ok(view) => {
                                owned.insert(view.id.clone(), view);
                            }
                            Err(error) => tracing::warn!(member = %name, %error),
                        }
                    }
                }
                Ok(other) => {
                    tracing::warn!(member = %name, answer = ?other, "unexpected answer to a list")
                }
                Err(error) => tracing::debug!(member = %name, %error, "listing jobs"),
            }
        }
        for (id, view) in copies {
            owned.entry(id).or_insert(view);
        }
        let mut views: Vec<JobView> = owned.into_values().collect();
        views.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        views.truncate(limit as usize);
        Ok(views)
    }

    /// Cancels a job wherever it is owned: a queued one at once, a running one by interrupting
    /// its runner (waiting boundedly for that to land).
    pub async fn cancel(&self, account: &str, id: &str) -> Result<JobView, ApiError> {
        let inner = &self.inner;
        let local = inner.store.get(id).await.map_err(ApiError::internal)?;
        let local = local.filter(|job| job.account == account);
        if let Some(job) = &local
            && job.role == JobRole::Owner
        {
            return inner.cancel_owned(account, id).await;
        }
        for name in inner.owner_candidates(account, local.as_ref()) {
            let Some(addr) = inner.addr_of(&name) else {
                continue;
            };
            let request = JobRequest::Cancel {
                id: id.to_string(),
                account: account.to_string(),
            };
            let deadline = inner.settings.cancel_wait + SHORT_DEADLINE;
            match inner.request(addr, request, deadline).await {
                Ok(JobResponse::Job { view: Some(view) }) => {
                    return parse_view(&view).map_err(ApiError::internal);
                }
                Ok(JobResponse::Refused(refusal)) if refusal.code != ErrorCode::NotFound => {
                    return Err(refusal_error(refusal));
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(member = %name, %error, "cancelling a job"),
            }
        }
        Err(no_owner_answered(id, local.is_some()))
    }

    /// Deletes a final job's outputs wherever it is owned (and the replica's copies).
    pub async fn delete_outputs(&self, account: &str, id: &str) -> Result<(), ApiError> {
        self.inner.delete_outputs(account, id).await
    }

    /// An output file of a job, from wherever it is stored.
    pub async fn output(
        &self,
        account: &str,
        id: &str,
        index: u32,
    ) -> Result<OutputFile, ApiError> {
        let inner = &self.inner;
        let local = inner.store.get(id).await.map_err(ApiError::internal)?;
        let local = local.filter(|job| job.account == account);
        if let Some(job) = &local
            && job.status == JobStatus::Succeeded
            && let Some(file) = transfer::read_local(&inner.store, job, index).await?
        {
            return Ok(file);
        }
        if let Some(job) = &local
            && job.role == JobRole::Owner
        {
            return Err(ApiError::not_found(format!(
                "job {id} has no output {index}"
            )));
        }
        for name in inner.owner_candidates(account, local.as_ref()) {
            let Some(addr) = inner.addr_of(&name) else {
                continue;
            };
            match transfer::fetch_output(inner, addr, id, account, index).await {
                Ok(Some(file)) => return Ok(file),
                Ok(None) => {}
                Err(transfer::FetchError::Refused(error)) => return Err(error),
                Err(transfer::FetchError::Failed(error)) => {
                    tracing::debug!(member = %name, %error, "fetching an output")
                }
            }
        }
        Err(ApiError::not_found(format!(
            "job {id} has no output {index}"
        )))
    }

    /// The job as the API shows it, from this node's store.
    pub async fn view(&self, job: &Job) -> Result<JobView, StoreError> {
        self.inner.view(job).await
    }

    /// The best job for this node's idle runner: its own queue's head or a peer's, whichever
    /// comes first in the cluster's order (tier, then age), leased from the peer when it is
    /// theirs. `None` when nothing waits anywhere (or nobody would lease).
    pub async fn next_work(&self) -> Result<Option<Work>, StoreError> {
        let inner = &self.inner;
        if !inner.reconciled.is_cancelled() {
            return Ok(None);
        }
        let sources = inner.pull_order();
        for source in sources {
            match source {
                None => {
                    if let Some(job) = inner.store.next_job().await? {
                        return Ok(Some(Work::Local(job)));
                    }
                }
                Some(name) => match inner.lease_from(&name).await {
                    Some(remote) => return Ok(Some(Work::Remote(remote))),
                    None => {
                        lock(&inner.hints).remove(&name);
                    }
                },
            }
        }
        Ok(None)
    }

    /// Waits until work may be waiting: a submission here, a nudge from a peer, or a gossip
    /// round in which a peer shows queued jobs.
    pub async fn wait_for_work(&self) {
        let inner = &self.inner;
        if !inner.reconciled.is_cancelled() {
            inner.reconciled.cancelled().await;
            return;
        }
        tokio::select! {
            _ = inner.store.work_available() => {}
            _ = inner.pull.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }

    /// Keeps a leased job's lease alive until `done`; cancels `interrupt` when the owner says to
    /// stop (the job was cancelled, finished elsewhere or given to another runner). Follows the
    /// job to a new owner when the old one hands it over or dies.
    pub async fn renew_until(
        &self,
        remote: &RemoteJob,
        done: CancellationToken,
        interrupt: CancellationToken,
    ) {
        let inner = &self.inner;
        let every = (inner.settings.lease / 3).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Some((owner, addr)) = inner.owner_of(remote) else {
                tracing::warn!(job = %remote.job.id, "neither the owner nor the replica of a leased job is known");
                continue;
            };
            let request = JobRequest::Renew {
                job_id: remote.job.id.clone(),
                attempt: remote.attempt,
            };
            match inner.request(addr, request, SHORT_DEADLINE).await {
                Ok(JobResponse::Renewed {
                    keep: true,
                    owner: moved,
                    ..
                }) => {
                    if let Some(moved) = moved {
                        remote.set_owner(&moved);
                    }
                }
                Ok(JobResponse::Renewed {
                    keep: false,
                    cancelled,
                    ..
                }) => {
                    tracing::info!(job = %remote.job.id, %owner, cancelled,
                        "the owner took the job back; interrupting it");
                    interrupt.cancel();
                    return;
                }
                Ok(other) => {
                    tracing::warn!(job = %remote.job.id, answer = ?other, "unexpected answer to a renewal")
                }
                Err(error) => {
                    tracing::warn!(job = %remote.job.id, %owner, %error, "cannot renew a lease")
                }
            }
        }
    }

    /// Sends a leased job's progress to its owner (best effort).
    pub fn send_progress(&self, remote: &RemoteJob, progress: Progress) {
        let inner = self.inner.clone();
        let Some((_, addr)) = inner.owner_of(remote) else {
            return;
        };
        let remote = (addr, remote.job.id.clone(), remote.attempt);
        tokio::spawn(async move {
            let request = JobRequest::Progress {
                job_id: remote.1,
                attempt: remote.2,
                progress,
            };
            let _ = inner.request(remote.0, request, SHORT_DEADLINE).await;
        });
    }

    /// Reports how a leased attempt ended to its owner (outputs first), retrying for a while.
    /// Returns whether the owner applied it (false: it already had a final result, or the
    /// attempt had lost the job).
    pub async fn report(&self, remote: &RemoteJob, outcome: Outcome) -> bool {
        transfer::report(&self.inner, remote, outcome).await
    }
}

impl Jobs {
    /// Finds out which of the jobs this node stores as its own were adopted by their replica
    /// while it was away (it was marked dead), and hands those over, so that nothing runs
    /// twice. Until it returns (or `timeout` passes), this node neither runs nor leases its
    /// queue. Call it once the node has joined the cluster.
    pub async fn reconcile(&self, timeout: Duration) {
        let inner = &self.inner;
        if inner.reconciled.is_cancelled() {
            return;
        }
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, inner.reconcile_with_replicas()).await {
            Ok(Ok(handed)) if handed > 0 => {
                tracing::warn!(
                    jobs = handed,
                    "jobs adopted by their replicas while this node was away were handed over"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot read this node's jobs to reconcile them")
            }
            Err(_) => {
                tracing::warn!("reconciling jobs with their replicas took too long; going on")
            }
        }
        match tokio::time::timeout_at(deadline, inner.refresh_copies()).await {
            Ok(Ok(dropped)) if dropped > 0 => {
                tracing::warn!(
                    copies = dropped,
                    "copies whose owners moved them elsewhere while this node was away were forgotten"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "cannot read the copies this node keeps"),
            Err(_) => {
                tracing::warn!("refreshing the copies this node keeps took too long; going on")
            }
        }
        inner.reconciled.cancel();
    }

    /// Copies an owned job's new state (with its outputs once it succeeded) to its replica,
    /// and waits for that: a copy that lags could make an adopting replica run a finished job
    /// again. Call it after every change of a job this node owns.
    pub async fn replicate(&self, job: &Job) {
        self.inner.sync_replica(job).await;
    }

    /// Hands every job this node owns and does not run itself (queued, or run by a peer) to
    /// the member that should own it next (its replica, else the next in rendezvous order),
    /// which takes it over. Call it after the runner stopped. Returns how many jobs went.
    pub async fn drain(&self) -> usize {
        self.inner.hand_over_all().await
    }
}

impl Inner {
    fn rpc(&self) -> Option<&PeerRpc<JobRequest, JobResponse>> {
        self.rpc.get()
    }

    async fn request(
        &self,
        to: SocketAddr,
        request: JobRequest,
        deadline: Duration,
    ) -> Result<JobResponse, RpcError> {
        match self.rpc() {
            Some(rpc) => rpc.request(to, request, deadline).await,
            None => Err(RpcError::Closed),
        }
    }

    fn snapshot(&self) -> Option<Arc<crate::cluster::Snapshot>> {
        self.cluster.as_ref().map(|c| c.snapshot())
    }

    /// The live GPU members that take new jobs, in rendezvous order of the account.
    fn ranked(&self, account: &str) -> Vec<String> {
        let Some(snapshot) = self.snapshot() else {
            return Vec::new();
        };
        let eligible: Vec<String> = snapshot
            .live()
            .filter(|m| m.status.role == Role::Node)
            .filter(|m| matches!(m.status.state, MemberState::Ready | MemberState::Busy))
            .map(|m| m.status.name.clone())
            .collect();
        placement::rank(account, &eligible)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Live node members other than this one.
    fn live_peers(&self) -> Vec<String> {
        let Some(snapshot) = self.snapshot() else {
            return Vec::new();
        };
        snapshot
            .live()
            .filter(|m| m.status.role == Role::Node && m.status.name != self.name)
            .map(|m| m.status.name.clone())
            .collect()
    }

    /// Members to ask about a job of `account`: the owner named by a local copy first, then
    /// every live node in rendezvous order of the account.
    fn owner_candidates(&self, account: &str, local: Option<&Job>) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(owner) = local.and_then(|job| job.owner.clone())
            && owner != self.name
        {
            out.push(owner);
        }
        let peers = self.live_peers();
        for name in placement::rank(account, &peers) {
            if !out.iter().any(|n| n == name) {
                out.push(name.to_string());
            }
        }
        out
    }

    /// Where a leased job's renewals and result go: its owner while that member is live, else
    /// the member holding its replica (which adopts it).
    fn owner_of(&self, remote: &RemoteJob) -> Option<(String, SocketAddr)> {
        let owner = remote.owner();
        if !self.serving(&owner)
            && let Some(replica) = remote.job.replica.as_deref()
            && replica != owner
            && self.serving(replica)
        {
            remote.set_owner(replica);
            return self
                .addr_of(replica)
                .map(|addr| (replica.to_string(), addr));
        }
        self.addr_of(&owner).map(|addr| (owner, addr))
    }

    /// Whether `name` is live and not leaving (a draining member hands its jobs on).
    fn serving(&self, name: &str) -> bool {
        self.snapshot()
            .and_then(|s| {
                s.members
                    .get(name)
                    .map(|m| m.live && m.status.state != MemberState::Draining)
            })
            .unwrap_or(false)
    }

    fn addr_of(&self, name: &str) -> Option<SocketAddr> {
        let snapshot = self.snapshot()?;
        let member = snapshot.members.get(name)?;
        member
            .gossip_addr
            .parse::<PeerAddr>()
            .ok()
            .map(|addr| addr.addr)
    }

    async fn get_from(
        &self,
        name: &str,
        id: &str,
        account: &str,
    ) -> Result<Option<JobView>, String> {
        let addr = self
            .addr_of(name)
            .ok_or_else(|| format!("{name} has no known address"))?;
        let request = JobRequest::Get {
            id: id.to_string(),
            account: account.to_string(),
            any_role: false,
        };
        match self.request(addr, request, SHORT_DEADLINE).await {
            Ok(JobResponse::Job { view: Some(view) }) => parse_view(&view).map(Some),
            Ok(JobResponse::Job { view: None }) => Ok(None),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The job as the API shows it, from this node's store and live state.
    async fn view(&self, job: &Job) -> Result<JobView, StoreError> {
        let outputs = if job.status == JobStatus::Succeeded {
            self.store.outputs(&job.id).await?
        } else {
            Vec::new()
        };
        let (position, wait) = if job.status == JobStatus::Queued && job.role == JobRole::Owner {
            let position = self.store.position(&job.id);
            (position, position.map(|p| self.live.wait_for_position(p)))
        } else {
            (None, None)
        };
        let mut view = job.view(&outputs, position, wait);
        view.replicas = match job.role {
            JobRole::Owner => u32::from(job.replica.is_some()),
            // The owner holds the other copy.
            JobRole::Replica => 1,
        };
        if job.status == JobStatus::Running {
            view.progress = self.live.progress(&job.id);
        }
        Ok(view)
    }

    /// Stores a job as its owner, then copies it to a replica (the first of `ranked` after
    /// this node that answers).
    async fn submit_as_owner(
        &self,
        mut new: NewJob,
        quota: Quota,
        ranked: &[String],
    ) -> Result<(JobView, bool), ApiError> {
        // From before other members are asked until the store committed it (or refused).
        let storing = new
            .idempotency_key
            .as_deref()
            .map(|key| StoringKey::new(self, &new.account, key));
        if let Some(earlier) = self.find_key_elsewhere(&new).await? {
            return Ok((earlier, false));
        }
        let _owner_op = self.owner_ops.read().await;
        if self.draining.is_cancelled() {
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "this member is draining and takes no new jobs",
            )
            .retry_after(1));
        }
        let tier = new.tier;
        let candidates: Vec<&String> = ranked.iter().filter(|n| **n != self.name).collect();
        new.replica = candidates.first().map(|n| n.to_string());
        let submitted = match self.store.submit(new, Some(quota)).await {
            Ok(submitted) => submitted,
            Err(error) => {
                if matches!(error, StoreError::QuotaExceeded { .. }) {
                    self.metrics
                        .jobs_refused
                        .get_or_create(&Metrics::tier(tier))
                        .inc();
                }
                return Err(store_refusal(error, tier));
            }
        };
        drop(storing);
        let mut job = submitted.job;
        if submitted.created {
            self.metrics
                .jobs_submitted
                .get_or_create(&Metrics::tier(tier))
                .inc();
            let mut chosen = None;
            for name in &candidates {
                if self
                    .replicate_to(name, &job, None, Vec::new())
                    .await
                    .is_ok()
                {
                    chosen = Some(name.to_string());
                    break;
                }
            }
            if chosen != job.replica {
                if chosen.is_none() && !candidates.is_empty() {
                    tracing::warn!(job = %job.id, "no replica could be reached; the job is stored here alone");
                }
                job = self
                    .store
                    .set_replica(&job.id, chosen.as_deref())
                    .await
                    .map_err(ApiError::internal)?;
            }
            self.nudge_peers(tier);
        }
        let view = self.view(&job).await.map_err(ApiError::internal)?;
        Ok((view, submitted.created))
    }

    /// The job an earlier submission with `new`'s idempotency key made, when a member that
    /// owned the account's jobs before this one (or keeps their copies) recorded the key and
    /// this node did not: the same key then names the same job across a change of owner (a
    /// member joined ahead of the old owner, or the old owner drains or died). A key reused
    /// with another body is refused as it would be by the old owner. A member that does not
    /// answer in time counts as not knowing the key: the submission is stored rather than
    /// refused.
    async fn find_key_elsewhere(&self, new: &NewJob) -> Result<Option<JobView>, ApiError> {
        let Some(key) = new.idempotency_key.as_deref() else {
            return Ok(None);
        };
        if self.cluster.is_none() {
            return Ok(None);
        }
        let live = self.live_peers();
        let Some(rpc) = self.rpc() else {
            return Ok(None);
        };
        let mut targets: Vec<(String, SocketAddr)> =
            placement::key_holders(&new.account, &live, &self.name)
                .into_iter()
                .filter_map(|name| self.addr_of(name).map(|addr| (name.to_string(), addr)))
                .collect();
        // A member that asked this node about the key and heard "unknown" is storing it as
        // the account's owner by its view, which this node's may not show yet. One this node
        // knows to be dead is not waited for (its jobs' replica answers for them).
        if let Some(asker) = self.key_askers.recent(&new.account, key)
            && *asker.name != *self.name
            && !targets.iter().any(|(name, _)| **name == *asker.name)
        {
            let addr = match self.addr_of(&asker.name) {
                Some(addr) => self.is_live(&asker.name).then_some(addr),
                None => Some(asker.addr),
            };
            if let Some(addr) = addr {
                tracing::info!(member = %asker.name, account = %new.account,
                    "asking the member that asked about this idempotency key whether it stored it");
                targets.push((asker.name.to_string(), addr));
            }
        }
        let asks = targets.into_iter().filter_map(|(name, addr)| {
            // A member known to speak an older protocol cannot be asked (it has no such
            // request); one not heard from yet is asked the one-key question.
            let version = rpc.peer_version(addr);
            if version.is_some_and(|v| !wire::speaks(v, 2)) {
                return None;
            }
            let batched = version.is_some_and(|v| wire::speaks(v, 3));
            let lookup = KeyLookup {
                account: new.account.clone(),
                key: key.to_string(),
                body_hash: new.body_hash.clone(),
            };
            Some(async move {
                // All asks of one member together take at most SHORT_DEADLINE.
                let until = Instant::now() + SHORT_DEADLINE;
                loop {
                    let wait = until
                        .saturating_duration_since(Instant::now())
                        .min(KEY_ASK_ATTEMPT);
                    let started = Instant::now();
                    let answer = if batched {
                        self.key_questions
                            .ask(rpc, addr, lookup.clone(), wait)
                            .await
                    } else {
                        self.find_key_at(addr, lookup.clone(), wait).await
                    };
                    let time_left = Instant::now() + KEY_IN_PROGRESS_RETRY < until;
                    // The member is storing the key itself: its answer comes once it
                    // committed.
                    if matches!(answer, Ok(KeyAnswer::InProgress)) && time_left {
                        tokio::time::sleep(KEY_IN_PROGRESS_RETRY).await;
                        continue;
                    }
                    // No answer in time: the question or its answer may have been lost
                    // (a frame on a connection being set up again); the question is a
                    // read, asked again while time is left. A quick refusal is final.
                    if answer.is_err() && started.elapsed() >= wait && time_left {
                        continue;
                    }
                    break (name, answer);
                }
            })
        });
        for (name, answer) in futures::future::join_all(asks).await {
            if matches!(
                answer,
                Ok(KeyAnswer::Same { .. } | KeyAnswer::Conflict(_) | KeyAnswer::InProgress)
            ) {
                // A key this store recorded too (the member asked keeps a copy of this node's
                // job) is answered by the store itself, from this node's own row. Read only
                // now: a new key, the common case, costs no read here.
                let here = self
                    .store
                    .find_key(&new.account, key)
                    .await
                    .map_err(ApiError::internal)?;
                if here.is_some() {
                    return Ok(None);
                }
            }
            match answer {
                Ok(KeyAnswer::Same { view }) => {
                    let view = parse_view(&view).map_err(ApiError::internal)?;
                    tracing::info!(job = %view.id, member = %name,
                        "an idempotency key recorded by another member names an earlier job");
                    return Ok(Some(view));
                }
                Ok(KeyAnswer::Conflict(refusal)) => return Err(refusal_error(refusal)),
                Ok(KeyAnswer::InProgress) => return Err(key_in_progress(key, &name)),
                Ok(KeyAnswer::Unknown) => {}
                Err(error) => {
                    tracing::warn!(member = %name, %error, "asking about an idempotency key failed; storing the job as new")
                }
            }
        }
        Ok(None)
    }

    /// Whether this node is storing a submission with the account's idempotency key as owner
    /// and has not committed it yet.
    fn storing_key(&self, account: &str, key: &str) -> bool {
        lock(&self.storing_keys).contains_key(&(account.to_string(), key.to_string()))
    }

    /// The one-key question, to a member that may not speak protocol 1.3.
    async fn find_key_at(
        &self,
        addr: SocketAddr,
        lookup: KeyLookup,
        deadline: Duration,
    ) -> Result<KeyAnswer, String> {
        let request = JobRequest::FindKey {
            account: lookup.account,
            key: lookup.key,
            body_hash: lookup.body_hash,
        };
        self.metrics.key_lookups.inc();
        self.metrics.key_lookup_messages.inc();
        match self.request(addr, request, deadline).await {
            Ok(JobResponse::Submitted { view, .. }) => Ok(KeyAnswer::Same { view }),
            Ok(JobResponse::Refused(refusal)) => Ok(KeyAnswer::Conflict(refusal)),
            Ok(JobResponse::Job { view: None }) => Ok(KeyAnswer::Unknown),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// When this node's runner is busy, tells peers that work waits here: idle ones (by gossip,
    /// or because they just asked for a lease and got none), so they pull it now rather than a
    /// gossip round later, and, for a paid tier, busy ones too, so
    /// that whoever finishes first takes it before any lower tier job (each peer at most every
    /// [`NUDGE_EVERY`] per tier).
    fn nudge_peers(&self, new_tier: Tier) {
        if !self.live.is_running() {
            return;
        }
        let Some(snapshot) = self.snapshot() else {
            return;
        };
        let Some(rpc) = self.rpc().cloned() else {
            return;
        };
        let summary = self.store.summary();
        let queued = summary.tiers.iter().map(|t| t.queued).sum::<u64>();
        let best = summary.tiers.iter().find(|t| t.queued > 0).map(|t| t.tier);
        let peers = snapshot.live().filter(|m| {
            m.status.role == Role::Node
                && m.status.name != self.name
                && matches!(m.status.state, MemberState::Ready | MemberState::Busy)
        });
        let mut idle = 0u64;
        let now = Instant::now();
        let mut targets = Vec::new();
        {
            let mut asked_idle = lock(&self.asked_idle);
            asked_idle.retain(|_, at| now.duration_since(*at) < ASKED_IDLE_FOR);
            let mut nudged = lock(&self.nudged);
            nudged.retain(|_, at| now.duration_since(*at) < NUDGE_EVERY);
            for member in peers {
                let is_idle = member.status.state == MemberState::Ready
                    || asked_idle.contains_key(&member.status.name);
                let wanted = if is_idle {
                    idle < queued.max(1)
                } else {
                    new_tier != Tier::Free
                };
                if !wanted {
                    continue;
                }
                if !is_idle {
                    let key = (member.status.name.clone(), new_tier);
                    if nudged.contains_key(&key) {
                        continue;
                    }
                    nudged.insert(key, now);
                } else {
                    idle += 1;
                }
                if let Ok(addr) = member.gossip_addr.parse::<PeerAddr>() {
                    targets.push(addr.addr);
                }
            }
        }
        for addr in targets {
            let rpc = rpc.clone();
            tokio::spawn(async move {
                let _ = rpc
                    .request(addr, JobRequest::Nudge { tier: best }, SHORT_DEADLINE)
                    .await;
            });
        }
    }

    /// Copies a job (and its outputs) to `name`.
    async fn replicate_to(
        &self,
        name: &str,
        job: &Job,
        upload: Option<String>,
        outputs: Vec<WireOutput>,
    ) -> Result<(), String> {
        let addr = self
            .addr_of(name)
            .ok_or_else(|| format!("{name} has no known address"))?;
        match self.send_copy(addr, job, upload, outputs).await {
            Ok(JobResponse::Done) => Ok(()),
            Ok(other) => Err(format!("{name} answered {other:?}")),
            Err(error) => Err(format!("{name}: {error}")),
        }
    }

    /// Sends one `Replicate` of `job` to the member at `addr`; the answer as it came.
    async fn send_copy(
        &self,
        addr: SocketAddr,
        job: &Job,
        upload: Option<String>,
        outputs: Vec<WireOutput>,
    ) -> Result<JobResponse, RpcError> {
        let request = JobRequest::Replicate {
            job: Box::new(wire_job(job).map_err(|e| RpcError::Encode(e.to_string()))?),
            upload,
            outputs,
        };
        self.request(addr, request, REPLICATE_DEADLINE).await
    }

    /// Cancels a job this node owns.
    async fn cancel_owned(&self, account: &str, id: &str) -> Result<JobView, ApiError> {
        let mut changes = self.store.subscribe();
        match self.store.cancel(id).await {
            Ok(CancelOutcome::Cancelled(job)) => {
                self.metrics.finished(job.tier, JobStatus::Cancelled);
                self.sync_replica(&job).await;
                self.view(&job).await.map_err(ApiError::internal)
            }
            Ok(CancelOutcome::Running(job)) => {
                match job.lease_holder.as_deref() {
                    Some(holder) if holder != self.name => {
                        lock(&self.cancelled).insert(id.to_string());
                        if let Some(addr) = self.addr_of(holder) {
                            let request = JobRequest::Interrupt {
                                job_id: id.to_string(),
                            };
                            if let Err(error) = self.request(addr, request, SHORT_DEADLINE).await {
                                tracing::warn!(job = %id, runner = %holder, %error,
                                    "cannot reach the runner; it stops at its next renewal");
                            }
                        }
                    }
                    _ => self.live.request_cancel(id),
                }
                let deadline = Instant::now() + self.settings.cancel_wait;
                loop {
                    let job = match self.store.get(id).await.map_err(ApiError::internal)? {
                        Some(job) if job.account == account => job,
                        _ => return Err(not_found(id)),
                    };
                    if job.status.is_final() {
                        return self.view(&job).await.map_err(ApiError::internal);
                    }
                    match tokio::time::timeout_at(deadline, changes.recv()).await {
                        Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => continue,
                        Err(_) | Ok(Err(RecvError::Closed)) => {
                            return self.view(&job).await.map_err(ApiError::internal);
                        }
                    }
                }
            }
            Err(StoreError::Conflict { id, status }) => Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "job {id} is already {status}; only queued or running jobs can be cancelled"
                ),
            )
            .details(json!({"status": status}))),
            Err(StoreError::NotFound(_)) | Err(StoreError::NotOwner { .. }) => Err(not_found(id)),
            Err(error) => Err(ApiError::internal(error)),
        }
    }

    /// Where this idle node should look for its next job, best first: `None` is its own queue,
    /// `Some(name)` a peer whose gossip shows queued jobs. Strict tiers, then the oldest wait;
    /// its own queue first on a tie.
    fn pull_order(&self) -> Vec<Option<String>> {
        let mut sources: Vec<(u8, u64, Option<String>)> = Vec::new();
        let summary = self.store.summary();
        let now = crate::node::unix_ms();
        if let Some(best) = summary.tiers.iter().find(|t| t.queued > 0) {
            let wait = best
                .oldest_created_at_ms
                .map(|c| ((now - c).max(0) / 1000) as u64)
                .unwrap_or(0);
            sources.push((best.tier.rank(), wait, None));
        }
        {
            let mut hints = lock(&self.hints);
            hints.retain(|name, (_, at)| at.elapsed() < HINT_FOR && self.serving(name));
            for (name, (tier, _)) in hints.iter() {
                let rank = tier.map(|t| t.rank()).unwrap_or(0);
                sources.push((rank, 0, Some(name.clone())));
            }
        }
        if let Some(snapshot) = self.snapshot() {
            for member in snapshot.live() {
                if member.status.role != Role::Node
                    || member.status.name == self.name
                    || member.status.state == MemberState::Draining
                {
                    continue;
                }
                if let Some((tier, queue)) = member
                    .status
                    .queue
                    .iter()
                    .filter(|(_, q)| q.queued > 0)
                    .max_by_key(|(tier, _)| tier.rank())
                {
                    sources.push((
                        tier.rank(),
                        queue.oldest_wait_s.unwrap_or(0),
                        Some(member.status.name.clone()),
                    ));
                }
            }
        }
        sources.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then(b.1.cmp(&a.1))
                .then(a.2.is_some().cmp(&b.2.is_some()))
        });
        let mut seen = HashSet::new();
        sources
            .into_iter()
            .map(|(_, _, source)| source)
            .filter(|source| seen.insert(source.clone()))
            .collect()
    }

    /// Asks `name` for a lease on its best queued job.
    async fn lease_from(&self, name: &str) -> Option<RemoteJob> {
        let addr = self.addr_of(name)?;
        match self
            .request(addr, JobRequest::Lease { min_tier: None }, LEASE_DEADLINE)
            .await
        {
            Ok(JobResponse::Leased {
                job: Some(wire), ..
            }) => {
                let attempt = wire.attempts;
                match job_from_wire(*wire, Some(name)) {
                    Ok(job) => Some(RemoteJob {
                        _held: Held::new(&self.held, &job.id, attempt),
                        job,
                        attempt,
                        owner: Arc::new(Mutex::new(name.to_string())),
                    }),
                    Err(error) => {
                        tracing::error!(owner = %name, %error, "a leased job does not parse; its lease will expire");
                        None
                    }
                }
            }
            Ok(JobResponse::Leased { job: None, .. }) => None,
            Ok(other) => {
                tracing::warn!(owner = %name, answer = ?other, "unexpected answer to a lease");
                None
            }
            Err(error) => {
                tracing::debug!(owner = %name, %error, "asking for a lease");
                None
            }
        }
    }

    /// Takes over every job this node keeps a copy of for `owner` (it died or leaves): queued
    /// ones join this node's queue, running ones keep their lease (timed from now), and each
    /// gets a new replica. Returns how many unfinished jobs were adopted.
    async fn adopt_from(&self, owner: &str) -> Result<usize, StoreError> {
        let adopted = self.store.adopt(owner).await?;
        // The runners of adopted jobs learn of the new owner only when they give up on the
        // old one (a result report's deadline, their own failure detector): give them longer.
        let lasts = ADOPTED_LEASE_GRACE + self.settings.lease;
        for job in &adopted {
            if job.status == JobStatus::Running
                && let Some(holder) = &job.lease_holder
            {
                lock(&self.leases).insert(
                    job.id.clone(),
                    LeaseEntry::new(holder, job.attempts, Instant::now(), lasts),
                );
            }
        }
        if !adopted.is_empty() {
            tracing::warn!(from = %owner, jobs = adopted.len(), "adopted the jobs of a member that is gone");
            self.pull.notify_one();
        }
        for job in &adopted {
            // Its replica was the member that is gone (or this node): find a new one.
            self.sync_replica(&Job {
                replica: None,
                ..job.clone()
            })
            .await;
        }
        Ok(adopted.len())
    }

    /// See [`Jobs::replicate`]. A replica that is gone or leaving is replaced by the next
    /// member in the account's order that takes the copy, and told to forget its old copy
    /// (so that it never adopts it). An update the replica missed is sent again later.
    async fn sync_replica(&self, job: &Job) {
        if job.role != JobRole::Owner {
            return;
        }
        // Work from the stored row, not the caller's copy: that may be older than a change
        // made meanwhile (a lease, a new replica chosen by another sync), and sending it to a
        // former replica would leave that member a stale copy it could adopt.
        // The outputs come in the same read, so they are the row's own.
        let (job, outputs) = match self.store.get_with_outputs(&job.id).await {
            Ok(Some((stored, outputs))) if stored.role == JobRole::Owner => (stored, outputs),
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(job = %job.id, %error, "cannot read a job to copy it to its replica");
                return;
            }
        };
        let (job, outputs) = (&job, Some(&outputs));
        // Marked until the update lands or the copy moves: a caller dropped half-way (a peer
        // request past its deadline drops its handler) leaves the mark, and the update goes
        // again within a second. A replica left with a running copy of a finished job would
        // run it again after adopting it.
        lock(&self.lagging).entry(job.id.clone()).or_insert(0);
        let current = job.replica.as_deref();
        if let Some(replica) = current
            && !self.gone(replica)
        {
            match transfer::replicate_with_outputs(self, replica, job, outputs).await {
                Ok(()) => {
                    lock(&self.lagging).remove(&job.id);
                    return;
                }
                // A member not known to be gone (live, or not yet sampled) keeps the copy;
                // the update goes again until it lands.
                Err(error) if !self.gone(replica) => {
                    let mut lagging = lock(&self.lagging);
                    let tries = lagging.entry(job.id.clone()).or_insert(0);
                    *tries += 1;
                    if *tries > LAGGING_RETRIES {
                        lagging.remove(&job.id);
                        tracing::error!(job = %job.id, %replica, %error,
                            "the replica missed the job's updates too often; it stays behind until the next change");
                    } else if *tries == 1 {
                        tracing::warn!(job = %job.id, %replica, %error,
                            "cannot bring the replica up to date; trying again");
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(job = %job.id, %replica, %error, "the replica is gone; choosing another");
                }
            }
        }
        // No replica yet (alone when it was stored), or it is gone: find another.
        let candidates: Vec<String> = self
            .ranked(&job.account)
            .into_iter()
            .filter(|n| *n != self.name && Some(n.as_str()) != current)
            .collect();
        let mut chosen = None;
        for name in candidates {
            if transfer::replicate_with_outputs(self, &name, job, outputs)
                .await
                .is_ok()
            {
                chosen = Some(name);
                break;
            }
        }
        if chosen.as_deref() != current {
            if let Some(new) = &chosen {
                tracing::info!(job = %job.id, replica = %new, previous = ?current, "the job has a new replica");
            }
            if let Err(error) = self.store.set_replica(&job.id, chosen.as_deref()).await {
                tracing::warn!(job = %job.id, %error, "cannot record the job's new replica");
            }
            if let Some(old) = current {
                self.disown(old, vec![job.id.clone()]).await;
            }
        }
        lock(&self.lagging).remove(&job.id);
    }

    /// Whether `name` no longer keeps copies: absent from the cluster view, leaving, or dead
    /// (see [`liveness`]). A member not yet sampled by the failure detector is not gone.
    fn gone(&self, name: &str) -> bool {
        let Some(snapshot) = self.snapshot() else {
            return true;
        };
        let Some(member) = snapshot.members.get(name) else {
            // Gossip forgets dead members after a while; right after this node started it
            // just has not heard of every member yet.
            return self.started.elapsed() >= liveness::UNSEEN_DEAD_AFTER;
        };
        member.status.state == MemberState::Draining
            || lock(&self.liveness).is_dead(member, Instant::now())
    }

    /// Tells a former replica to forget its unfinished copies of `ids` (best effort). A dead
    /// one is not asked: it learns it when it comes back (see [`Inner::refresh_copies`]).
    async fn disown(&self, member: &str, ids: Vec<String>) {
        let reachable = self
            .snapshot()
            .and_then(|s| {
                s.members
                    .get(member)
                    .map(|m| !lock(&self.liveness).is_dead(m, Instant::now()))
            })
            .unwrap_or(false);
        let Some(addr) = self.addr_of(member).filter(|_| reachable) else {
            return;
        };
        for chunk in ids.chunks(IDS_PER_QUESTION) {
            let request = JobRequest::Disown {
                ids: chunk.to_vec(),
            };
            match self.request(addr, request, SHORT_DEADLINE).await {
                Ok(JobResponse::Done) => {}
                Ok(other) => {
                    tracing::warn!(%member, answer = ?other, "unexpected answer to a disown")
                }
                Err(error) => {
                    tracing::info!(%member, %error, jobs = chunk.len(),
                        "a former replica was not told to forget its copies; it asks when it is back");
                    return;
                }
            }
        }
    }

    /// Sends again the updates replicas missed (see [`Inner::sync_replica`]). A replica that
    /// misses one again is skipped for the rest of the pass.
    async fn resend_lagging(&self) {
        let ids: Vec<String> = lock(&self.lagging).keys().cloned().collect();
        let mut unreachable: HashSet<String> = HashSet::new();
        for id in ids {
            match self.store.get(&id).await {
                Ok(Some(job)) if job.role == JobRole::Owner => {
                    if job
                        .replica
                        .as_ref()
                        .is_some_and(|r| unreachable.contains(r))
                    {
                        continue;
                    }
                    self.sync_replica(&job).await;
                    if let Some(replica) = job.replica
                        && lock(&self.lagging).contains_key(&id)
                    {
                        unreachable.insert(replica);
                    }
                }
                Ok(_) => {
                    lock(&self.lagging).remove(&id);
                }
                Err(error) => {
                    tracing::warn!(job = %id, %error, "cannot read a job whose replica lags");
                }
            }
        }
    }

    /// See [`Jobs::reconcile`]. Asks every replica at once. Returns how many jobs were handed
    /// over.
    async fn reconcile_with_replicas(&self) -> Result<usize, StoreError> {
        let by_replica = ids_by(self.store.owned_active().await?, |job| job.replica.clone());
        let asked = by_replica
            .into_iter()
            .map(|(replica, ids)| self.reconcile_with(replica, ids));
        Ok(futures::future::join_all(asked).await.into_iter().sum())
    }

    /// Hands over those of `ids` that `replica` adopted; returns how many. A replica that does
    /// not show live may have adopted them and died in turn, and then its own replica adopted
    /// them: every live member is asked instead, and each hands over what it owns now.
    async fn reconcile_with(&self, replica: String, ids: Vec<String>) -> usize {
        let Some(addr) = self.addr_of_when_known(&replica).await else {
            let (claimed, left) = self.owners_among_live(ids).await;
            let mut handed = 0;
            for (peer, owned) in claimed {
                handed += self.hand_over_to(&peer, owned).await;
            }
            if left > 0 {
                tracing::warn!(%replica, jobs = left,
                    "the replica of some jobs did not show live and no live member owns them; keeping them");
            }
            return handed;
        };
        let adopted = self.owned_by(&replica, addr, &ids).await;
        self.hand_over_to(&replica, adopted).await
    }

    /// Asks the live members in turn which of `ids` each owns now (each id is asked until one
    /// claims it): the claims by member, and how many ids nobody claimed.
    async fn owners_among_live(&self, ids: Vec<String>) -> (Vec<(String, Vec<String>)>, usize) {
        let mut left: HashSet<String> = ids.into_iter().collect();
        let mut claimed = Vec::new();
        for peer in self.live_peers() {
            if left.is_empty() {
                break;
            }
            let Some(addr) = self.addr_of(&peer) else {
                continue;
            };
            let asked: Vec<String> = left.iter().cloned().collect();
            let owned = self.owned_by(&peer, addr, &asked).await;
            for id in &owned {
                left.remove(id);
            }
            if !owned.is_empty() {
                claimed.push((peer, owned));
            }
        }
        (claimed, left.len())
    }

    /// Which of `ids` member `name` (at `addr`) owns now, by its own answer.
    async fn owned_by(&self, name: &str, addr: SocketAddr, ids: &[String]) -> Vec<String> {
        let mut owned = Vec::new();
        for chunk in ids.chunks(IDS_PER_QUESTION) {
            for _ in 0..5 {
                let request = JobRequest::Whose {
                    ids: chunk.to_vec(),
                };
                match self.request(addr, request, SHORT_DEADLINE).await {
                    Ok(JobResponse::Owned { ids }) => {
                        owned.extend(ids);
                        break;
                    }
                    Ok(other) => {
                        tracing::warn!(member = %name, answer = ?other, "unexpected answer to whose")
                    }
                    Err(error) => {
                        tracing::warn!(member = %name, %error, "asking a member which jobs it owns")
                    }
                }
            }
        }
        owned
    }

    /// Makes `ids` copies of `new_owner`'s jobs here; returns how many were handed over.
    async fn hand_over_to(&self, new_owner: &str, ids: Vec<String>) -> usize {
        let mut handed = 0;
        for id in ids {
            match self.store.hand_over(&id, new_owner).await {
                Ok(_) => handed += 1,
                Err(error) => {
                    tracing::warn!(job = %id, %new_owner, %error, "cannot hand over an adopted job")
                }
            }
        }
        handed
    }

    /// Brings the unfinished copies this node keeps up to date with their owners (it may have
    /// missed changes while it was away), and forgets those an owner disowned, so that a stale
    /// copy is never adopted. Owners gossip shows live now are asked at once; the others stay
    /// pending and are asked once they show live (see [`Inner::refresh_pending`]). Returns how
    /// many copies were forgotten.
    async fn refresh_copies(&self) -> Result<usize, StoreError> {
        let by_owner = ids_by(self.store.held_copies().await?, |job| job.owner.clone());
        lock(&self.unrefreshed).extend(by_owner.keys().cloned());
        let asked = by_owner.into_iter().filter_map(|(owner, ids)| {
            let addr = self.addr_of(&owner).filter(|_| self.is_live(&owner))?;
            Some(async move {
                let answer = self.refresh_from(&owner, addr, ids).await;
                if let Ok(Some(_)) = answer {
                    lock(&self.unrefreshed).remove(&owner);
                }
                answer
            })
        });
        let mut dropped = 0;
        for answer in futures::future::join_all(asked).await {
            dropped += answer?.unwrap_or(0);
        }
        Ok(dropped)
    }

    /// Refreshes the copies kept for owners [`Inner::refresh_copies`] could not reach, once
    /// each is live; an owner that is dead is left to adoption (see
    /// [`Inner::forget_claimed_copies`]).
    async fn refresh_pending(&self) -> Result<(), StoreError> {
        let pending: Vec<String> = lock(&self.unrefreshed).iter().cloned().collect();
        if pending.is_empty() {
            return Ok(());
        }
        let Some(snapshot) = self.snapshot() else {
            return Ok(());
        };
        for owner in pending {
            // A member gossip does not list yet (this node just started) is not dead either.
            let member = snapshot.members.get(&owner);
            if member.is_some_and(|m| lock(&self.liveness).is_dead(m, Instant::now())) {
                lock(&self.unrefreshed).remove(&owner);
                lock(&self.died_unrefreshed).insert(owner.clone(), Instant::now());
                tracing::warn!(%owner, "the owner of some copies died before they were refreshed");
                continue;
            }
            let Some(addr) = self
                .addr_of(&owner)
                .filter(|_| member.is_some_and(|m| m.live))
            else {
                continue;
            };
            let ids: Vec<String> = self
                .store
                .held_copies()
                .await?
                .into_iter()
                .filter(|job| job.owner.as_deref() == Some(owner.as_str()))
                .map(|job| job.id)
                .collect();
            if let Some(dropped) = self.refresh_from(&owner, addr, ids).await? {
                lock(&self.unrefreshed).remove(&owner);
                if dropped > 0 {
                    tracing::warn!(%owner, copies = dropped,
                        "copies whose owner moved them elsewhere while this node was away were forgotten");
                }
            }
        }
        Ok(())
    }

    /// Before adopting the copies of `owner`, which died before this node refreshed them:
    /// `false` while [`STALE_ADOPT_AFTER`] has not passed since that was seen; then asks every
    /// live member which of those jobs it owns (one that held the owner's current copies while
    /// this node was away has adopted them) and forgets those copies here.
    async fn forget_claimed_copies(&self, owner: &str) -> Result<bool, StoreError> {
        let seen = lock(&self.died_unrefreshed).get(owner).copied();
        let Some(seen) = seen else {
            return Ok(true);
        };
        if seen.elapsed() < STALE_ADOPT_AFTER {
            return Ok(false);
        }
        let copies: Vec<String> = self
            .store
            .replicas_of(owner)
            .await?
            .into_iter()
            .filter(|job| !job.status.is_final())
            .map(|job| job.id)
            .collect();
        let mut forgotten = 0;
        for (_, owned) in self.owners_among_live(copies).await.0 {
            for id in owned {
                if self.store.drop_copy(&id, owner).await? {
                    forgotten += 1;
                }
            }
        }
        if forgotten > 0 {
            tracing::warn!(%owner, copies = forgotten,
                "stale copies of a dead owner's jobs that another member owns now were forgotten");
        }
        lock(&self.died_unrefreshed).remove(owner);
        Ok(true)
    }

    /// Asks `owner` about the copies `ids` and forgets those it disowned: how many, or `None`
    /// when it did not answer for all of them.
    async fn refresh_from(
        &self,
        owner: &str,
        addr: SocketAddr,
        ids: Vec<String>,
    ) -> Result<Option<usize>, StoreError> {
        let mut dropped = 0;
        for chunk in ids.chunks(IDS_PER_QUESTION) {
            let request = JobRequest::Refresh {
                ids: chunk.to_vec(),
            };
            match self.request(addr, request, REPLICATE_DEADLINE * 4).await {
                Ok(JobResponse::Refreshed { stale }) => {
                    for id in stale {
                        if self.store.drop_copy(&id, owner).await? {
                            dropped += 1;
                        }
                    }
                }
                Ok(other) => {
                    tracing::warn!(%owner, answer = ?other, "unexpected answer to a refresh");
                    return Ok(None);
                }
                Err(error) => {
                    tracing::warn!(%owner, %error, "cannot refresh the copies kept for a member");
                    return Ok(None);
                }
            }
        }
        Ok(Some(dropped))
    }

    /// A member's address once gossip shows it live, waiting as long as an unseen member
    /// takes to count as dead (at start, peers show live only once sampled).
    async fn addr_of_when_known(&self, name: &str) -> Option<SocketAddr> {
        let deadline = Instant::now() + liveness::UNSEEN_DEAD_AFTER;
        loop {
            if let Some(addr) = self.addr_of(name).filter(|_| self.is_live(name)) {
                return Some(addr);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether gossip shows `name` live now.
    fn is_live(&self, name: &str) -> bool {
        self.snapshot()
            .and_then(|s| s.members.get(name).map(|m| m.live))
            .unwrap_or(false)
    }

    /// See [`Jobs::drain`].
    async fn hand_over_all(&self) -> usize {
        // Leases and submissions that began before the drain end first: what is read next is
        // the state every one of them left.
        drop(self.owner_ops.write().await);
        let owned = match self.store.owned_active().await {
            Ok(owned) => owned,
            Err(error) => {
                tracing::error!(%error, "cannot read the jobs to hand over");
                return 0;
            }
        };
        let eligible = |name: &str| {
            self.snapshot()
                .and_then(|s| {
                    s.members.get(name).map(|m| {
                        m.live
                            && m.status.role == Role::Node
                            && matches!(m.status.state, MemberState::Ready | MemberState::Busy)
                    })
                })
                .unwrap_or(false)
        };
        let mut by_target: HashMap<String, Vec<Job>> = HashMap::new();
        for job in owned {
            // The local runner has stopped; a running job with no holder is not running.
            if job.status == JobStatus::Running && job.lease_holder.is_none() {
                continue;
            }
            let target = match job.replica.as_deref() {
                Some(replica) if eligible(replica) => Some(replica.to_string()),
                _ => self
                    .ranked(&job.account)
                    .into_iter()
                    .find(|n| *n != self.name),
            };
            match target {
                Some(target) => by_target.entry(target).or_default().push(job),
                None => {
                    tracing::warn!(job = %job.id, "no member can take the job over; it stays here")
                }
            }
        }
        let mut handed = 0;
        let mut disowned: HashMap<String, Vec<String>> = HashMap::new();
        for (target, jobs) in by_target {
            // Bring the copies up to date first, so the new owner takes over the latest state.
            let mut copied = Vec::new();
            for job in jobs {
                match transfer::replicate_with_outputs(self, &target, &job, None).await {
                    Ok(()) => copied.push(job),
                    Err(error) => {
                        tracing::warn!(job = %job.id, %target, %error, "cannot copy a job to its new owner")
                    }
                }
            }
            if copied.is_empty() {
                continue;
            }
            let Some(addr) = self.addr_of(&target) else {
                continue;
            };
            match self
                .request(addr, JobRequest::TakeOver, self.settings.lease)
                .await
            {
                Ok(JobResponse::Done) => {}
                Ok(other) => {
                    tracing::warn!(%target, answer = ?other, "unexpected answer to a take-over");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%target, %error, "a member did not take over jobs");
                    continue;
                }
            }
            for job in copied {
                lock(&self.leases).remove(&job.id);
                match self.store.hand_over(&job.id, &target).await {
                    Ok(_) => {
                        handed += 1;
                        // A replica that is not the new owner must not adopt its copy when
                        // this node is gone: the new owner has the job now.
                        if let Some(replica) = job.replica.filter(|r| *r != target) {
                            disowned.entry(replica).or_default().push(job.id);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(job = %job.id, %target, %error, "cannot mark a job handed over")
                    }
                }
            }
            tracing::info!(%target, "jobs handed over");
        }
        for (replica, ids) in disowned {
            self.disown(&replica, ids).await;
        }
        handed
    }

    /// Leases this node's best queued job to `holder`.
    async fn lease_to(
        &self,
        holder: &str,
        min_tier: Option<Tier>,
    ) -> Result<Option<Job>, StoreError> {
        let _owner_op = self.owner_ops.read().await;
        if self.draining.is_cancelled() || !self.reconciled.is_cancelled() {
            return Ok(None);
        }
        if let Some(min) = min_tier {
            let best = self
                .store
                .summary()
                .tiers
                .iter()
                .find(|t| t.queued > 0)
                .map(|t| t.tier);
            if best.is_none_or(|tier| tier.rank() < min.rank()) {
                return Ok(None);
            }
        }
        let Some(job) = self.store.next_job_for(Some(holder)).await? else {
            return Ok(None);
        };
        lock(&self.leases).insert(
            job.id.clone(),
            LeaseEntry::new(holder, job.attempts, Instant::now(), self.settings.lease),
        );
        tracing::info!(job = %job.id, runner = %holder, attempt = job.attempts, "job leased");
        // The replica learns who runs it before it starts: if this node dies, the adopter
        // keeps the lease instead of running the job a second time.
        if tokio::time::timeout(LEASE_COPY_WITHIN, self.sync_replica(&job))
            .await
            .is_err()
        {
            tracing::warn!(job = %job.id, "the replica did not learn of the lease in time");
            lock(&self.lagging).entry(job.id.clone()).or_insert(0);
        }
        Ok(Some(job))
    }

    /// Whether this node's runner holds `attempt` of another member's job (runs or reports it).
    pub(crate) fn holds(&self, job_id: &str, attempt: u32) -> bool {
        lock(&self.held).get(job_id) == Some(&attempt)
    }

    /// Whether the holder of an expired lease still runs (or reports) the attempt: asked when
    /// gossip shows it live; a dead, unknown or silent holder does not.
    async fn still_held(&self, job_id: &str, entry: &LeaseEntry) -> bool {
        if entry.holder == self.name {
            return self.holds(job_id, entry.attempt);
        }
        let Some(addr) = self
            .addr_of(&entry.holder)
            .filter(|_| self.is_live(&entry.holder))
        else {
            return false;
        };
        let request = JobRequest::Holds {
            job_id: job_id.to_string(),
            attempt: entry.attempt,
        };
        match self.request(addr, request, SHORT_DEADLINE).await {
            Ok(JobResponse::Holds { held }) => held,
            Ok(other) => {
                tracing::warn!(job = %job_id, runner = %entry.holder, answer = ?other, "unexpected answer to a lease check");
                false
            }
            Err(error) => {
                tracing::warn!(job = %job_id, runner = %entry.holder, %error, "cannot ask the runner of an expired lease");
                false
            }
        }
    }

    /// A runner renews its lease: (keep running, cancelled, new owner). Also rebuilds a lease
    /// this node forgot (it restarted), and points the runner at the member the job was
    /// handed to.
    async fn renew(
        &self,
        holder: &str,
        job_id: &str,
        attempt: u32,
    ) -> (bool, bool, Option<String>) {
        if lock(&self.cancelled).contains(job_id) {
            return (false, true, None);
        }
        {
            let mut leases = lock(&self.leases);
            if let Some(entry) = leases.get_mut(job_id)
                && entry.holder == holder
                && entry.attempt == attempt
            {
                let now = Instant::now();
                entry.expires = now + self.settings.lease;
                entry.renewed = now;
                return (true, false, None);
            }
        }
        match self.store.get(job_id).await {
            Ok(Some(job))
                if job.role == JobRole::Owner
                    && job.status == JobStatus::Running
                    && job.attempts == attempt
                    && job.lease_holder.as_deref() == Some(holder) =>
            {
                lock(&self.leases).insert(
                    job_id.to_string(),
                    LeaseEntry::new(holder, attempt, Instant::now(), self.settings.lease),
                );
                (true, false, None)
            }
            // Handed over while it ran: the new owner holds the lease now.
            Ok(Some(job))
                if job.role == JobRole::Replica
                    && job.status == JobStatus::Running
                    && job.attempts == attempt
                    && job.owner.as_deref().is_some_and(|o| o != self.name) =>
            {
                (true, false, job.owner.clone())
            }
            Ok(Some(job)) => (false, job.status == JobStatus::Cancelled, None),
            _ => (false, false, None),
        }
    }

    /// Applies a leased attempt's end.
    async fn finish(
        &self,
        holder: &str,
        job_id: &str,
        attempt: u32,
        outcome: Outcome,
    ) -> Result<bool, StoreError> {
        let finished = self.store.finish_attempt(job_id, attempt, outcome).await?;
        {
            let mut leases = lock(&self.leases);
            if leases
                .get(job_id)
                .is_some_and(|e| e.attempt == attempt && e.holder == holder)
            {
                leases.remove(job_id);
            }
        }
        let (applied, job) = match finished {
            Finished::Applied(job) => (true, job),
            Finished::Dropped(job) => {
                tracing::info!(job = %job_id, runner = %holder, attempt, "a later final result was dropped");
                (false, job)
            }
            Finished::Stale(job) => (false, job),
        };
        if job.status.is_final() {
            lock(&self.leases).remove(job_id);
            lock(&self.cancelled).remove(job_id);
            self.live.clear_progress(job_id);
            if applied {
                self.metrics.finished(job.tier, job.status);
            }
        }
        if applied {
            self.sync_replica(&job).await;
        }
        Ok(applied)
    }
}

/// Requeues jobs whose lease ran out (the runner died or lost touch), and drops stale uploads.
async fn expire_leases(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let expired: Vec<(String, LeaseEntry)> = {
            let mut leases = lock(&inner.leases);
            let ids: Vec<String> = leases
                .iter()
                .filter(|(_, e)| e.expires <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id).map(|e| (id, e)))
                .collect()
        };
        // A runner starved of CPU, or cut off for a moment, can miss its renewals while the job
        // goes on: before the job is queued again (and would run twice), its holder is asked.
        let checks = expired.into_iter().map(|(id, entry)| {
            let inner = inner.clone();
            async move {
                let held = inner.still_held(&id, &entry).await;
                (id, entry, held)
            }
        });
        for (id, entry, held) in futures::future::join_all(checks).await {
            let since_renewal = entry.renewed.elapsed();
            if held {
                tracing::info!(job = %id, runner = %entry.holder, attempt = entry.attempt,
                    since_renewal_ms = since_renewal.as_millis() as u64,
                    "a lease ran out but its runner still holds the attempt; it is extended");
                let expires = Instant::now() + inner.settings.lease;
                lock(&inner.leases)
                    .entry(id)
                    .and_modify(|e| e.expires = e.expires.max(expires))
                    .or_insert(LeaseEntry { expires, ..entry });
                continue;
            }
            let reason = format!("the lease of {} ran out", entry.holder);
            match inner
                .store
                .finish_attempt(&id, entry.attempt, Outcome::Requeue { reason })
                .await
            {
                Ok(Finished::Applied(job)) => {
                    tracing::warn!(job = %id, runner = %entry.holder, attempt = entry.attempt, status = %job.status,
                        since_renewal_ms = since_renewal.as_millis() as u64,
                        "a lease expired; the job is queued again");
                    inner.live.clear_progress(&id);
                    if job.status.is_final() {
                        inner.metrics.finished(job.tier, job.status);
                    }
                    inner.sync_replica(&job).await;
                    inner.pull.notify_one();
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::error!(job = %id, %error, "cannot requeue a job whose lease expired")
                }
            }
        }
        inner.uploads.drop_idle(UPLOAD_IDLE);
    }
}

/// Sends missed replica updates again every second, apart from [`follow_members`] so that
/// a slow replica never delays an adoption.
async fn resend_lagging(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        inner.resend_lagging().await;
    }
}

/// Adopts the jobs of members the failure detector marks dead, when this node keeps their
/// copies. Rescans every second: a copy in flight when the owner died may land late.
async fn follow_members(inner: Arc<Inner>) {
    // Members (by name and incarnation) whose copies of this node's jobs were moved.
    let mut rehomed: HashSet<(String, u64)> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(snapshot) = inner.snapshot() else {
            return;
        };
        let now = Instant::now();
        // A member gossip lists but has not yet shown live is not dead (see [`liveness`]).
        let (dead, gone) = {
            let mut liveness = lock(&inner.liveness);
            liveness.observe(snapshot.members.values(), now);
            let peers = || {
                snapshot
                    .members
                    .values()
                    .filter(|m| m.status.role == Role::Node && m.status.name != inner.name)
            };
            let dead: Vec<String> = peers()
                .filter(|m| liveness.is_dead(m, now))
                .map(|m| m.status.name.clone())
                .collect();
            let gone: Vec<(String, u64)> = peers()
                .filter(|m| {
                    liveness.is_dead(m, now) || (m.live && m.status.state == MemberState::Draining)
                })
                .map(|m| (m.status.name.clone(), m.generation))
                .collect();
            (dead, gone)
        };
        for key in gone {
            if rehomed.contains(&key) {
                continue;
            }
            match inner.store.owned_active().await {
                Ok(owned) => {
                    for job in owned
                        .iter()
                        .filter(|j| j.replica.as_deref() == Some(key.0.as_str()))
                    {
                        inner.sync_replica(job).await;
                    }
                    rehomed.insert(key);
                }
                Err(error) => {
                    tracing::error!(%error, "cannot read this node's jobs to move their copies")
                }
            }
        }
        if let Err(error) = inner.refresh_pending().await {
            tracing::error!(%error, "cannot read the copies this node keeps");
        }
        for name in dead {
            match inner.store.replicas_of(&name).await {
                Ok(copies) if copies.is_empty() => {}
                Ok(_) => match inner.forget_claimed_copies(&name).await {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(error) = inner.adopt_from(&name).await {
                            tracing::error!(member = %name, %error, "cannot adopt the jobs of a dead member");
                        }
                    }
                    Err(error) => {
                        tracing::error!(member = %name, %error, "cannot read the copies kept for a dead member")
                    }
                },
                Err(error) => {
                    tracing::error!(member = %name, %error, "cannot read the copies kept for a dead member")
                }
            }
        }
    }
}

/// Job ids grouped by a member each job names (its replica, its owner); jobs naming none are
/// left out.
fn ids_by(jobs: Vec<Job>, member: impl Fn(&Job) -> Option<String>) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for job in jobs {
        if let Some(name) = member(&job) {
            out.entry(name).or_default().push(job.id);
        }
    }
    out
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no job {id:?} for this account"))
}

/// No member answered for job `id`: it exists (this node keeps a copy naming its owner) but
/// cannot be reached now, or it is not known at all.
pub(crate) fn no_owner_answered(id: &str, known_here: bool) -> ApiError {
    if known_here {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("the member that owns job {id} cannot be reached; try again shortly"),
        )
        .retry_after(5)
    } else {
        not_found(id)
    }
}

fn refusal_error(refusal: WireRefusal) -> ApiError {
    let mut error = ApiError::new(refusal.code, refusal.message);
    if let Some(details) = refusal
        .details
        .and_then(|text| serde_json::from_str(&text).ok())
    {
        error = error.details(details);
    }
    if let Some(seconds) = refusal.retry_after {
        error = error.retry_after(seconds);
    }
    error
}

pub(crate) fn wire_refusal(error: &ApiError) -> WireRefusal {
    WireRefusal {
        code: error.code,
        message: error.message.clone(),
        details: error.details.as_ref().map(|d| d.to_string()),
        retry_after: error.retry_after,
    }
}

/// The API error of a store refusal of a submission.
fn store_refusal(error: StoreError, tier: Tier) -> ApiError {
    match error {
        StoreError::QuotaExceeded {
            period,
            limit,
            used,
            resets_at_ms,
        } => {
            let now = crate::node::unix_ms();
            let retry = ((resets_at_ms - now).max(1000) / 1000) as u64;
            ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "the {tier} tier allows {limit} jobs per {}; {used} used",
                    period.as_str()
                ),
            )
            .details(
                json!({"limit": limit, "used": used, "period": period.as_str(),
                "resets_at": crate::protocol::rfc3339_ms(resets_at_ms)}),
            )
            .retry_after(retry)
        }
        StoreError::IdempotencyConflict { key, job_id } => ApiError::new(
            ErrorCode::Conflict,
            format!("the Idempotency-Key {key:?} was already used with a different body"),
        )
        .details(json!({"job_id": job_id})),
        StoreError::Invalid(message) => ApiError::new(ErrorCode::InvalidRequest, message),
        error => ApiError::internal(error),
    }
}

/// The peer protocol carries a workflow and its metadata as JSON text, so they arrive exactly
/// as the owner stored them.
type JsonPair = (String, Option<String>);

fn json_to_text(
    workflow: &JsonText,
    metadata: Option<&serde_json::Value>,
) -> Result<JsonPair, serde_json::Error> {
    Ok((
        workflow.as_str().to_owned(),
        metadata.map(serde_json::to_string).transpose()?,
    ))
}

fn json_from_text(
    workflow: String,
    metadata: Option<&str>,
) -> Result<(JsonText, Option<serde_json::Value>), String> {
    Ok((
        JsonText::parse(workflow).map_err(|e| format!("workflow is not JSON: {e}"))?,
        metadata
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| format!("metadata is not JSON: {e}"))?,
    ))
}

fn wire_new_job(new: &NewJob) -> Result<WireNewJob, ApiError> {
    let (workflow, metadata) =
        json_to_text(&new.workflow, new.metadata.as_ref()).map_err(ApiError::internal)?;
    Ok(WireNewJob {
        id: new.id.clone(),
        account: new.account.clone(),
        tier: new.tier,
        workflow,
        webhook: new.webhook.clone(),
        metadata,
        idempotency_key: new.idempotency_key.clone(),
        body_hash: new.body_hash.clone(),
        max_attempts: new.max_attempts,
    })
}

fn new_job_from_wire(wire: WireNewJob) -> Result<NewJob, String> {
    let (workflow, metadata) = json_from_text(wire.workflow, wire.metadata.as_deref())?;
    Ok(NewJob {
        workflow,
        metadata,
        id: wire.id,
        account: wire.account,
        tier: wire.tier,
        webhook: wire.webhook,
        idempotency_key: wire.idempotency_key,
        body_hash: wire.body_hash,
        max_attempts: wire.max_attempts.max(1),
        replica: None,
    })
}

fn wire_job(job: &Job) -> Result<WireJob, serde_json::Error> {
    let (workflow, metadata) = json_to_text(&job.workflow, job.metadata.as_ref())?;
    Ok(WireJob {
        id: job.id.clone(),
        account: job.account.clone(),
        tier: job.tier,
        status: job.status,
        workflow,
        webhook: job.webhook.clone(),
        metadata,
        idempotency_key: job.idempotency_key.clone(),
        body_hash: job.body_hash.clone(),
        created_at_ms: job.created_at_ms,
        started_at_ms: job.started_at_ms,
        finished_at_ms: job.finished_at_ms,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        error: job.error.clone(),
        lease_holder: job.lease_holder.clone(),
        replica: job.replica.clone(),
        throttled: job.throttled.clone(),
    })
}

/// A job sent by `owner` (a copy to keep, or a job leased to run).
fn job_from_wire(wire: WireJob, owner: Option<&str>) -> Result<Job, String> {
    let (workflow, metadata) = json_from_text(wire.workflow, wire.metadata.as_deref())?;
    Ok(Job {
        workflow,
        metadata,
        id: wire.id,
        seq: 0,
        account: wire.account,
        tier: wire.tier,
        status: wire.status,
        webhook: wire.webhook,
        idempotency_key: wire.idempotency_key,
        body_hash: wire.body_hash,
        created_at_ms: wire.created_at_ms,
        started_at_ms: wire.started_at_ms,
        finished_at_ms: wire.finished_at_ms,
        attempts: wire.attempts,
        max_attempts: wire.max_attempts.max(1),
        error: wire.error,
        role: JobRole::Replica,
        owner: owner.map(str::to_string),
        replica: wire.replica,
        lease_holder: wire.lease_holder,
        throttled: wire.throttled,
        // The receiving store keeps its own retention state (stamped from the finish time).
        outputs_expire_at_ms: None,
        outputs_deleted: None,
    })
}

pub(crate) fn wire_usage(account: &str, usage: &Usage) -> WireUsage {
    WireUsage {
        account: account.to_string(),
        day: usage.day,
        submitted: usage.submitted,
        refused: usage.refused,
        succeeded: usage.succeeded,
        images: usage.images,
        gpu_ms: usage.gpu_ms,
    }
}

fn usage_from_wire(wire: WireUsage) -> Usage {
    Usage {
        day: wire.day,
        submitted: wire.submitted,
        refused: wire.refused,
        succeeded: wire.succeeded,
        images: wire.images,
        gpu_ms: wire.gpu_ms,
    }
}

/// The store outcome of a reported result; outputs come from an upload.
fn outcome_of(result: WireResult, outputs: Vec<NewOutput>) -> Outcome {
    match result {
        WireResult::Succeeded { .. } => Outcome::Succeeded { outputs },
        WireResult::Failed { error } => Outcome::Failed(error),
        WireResult::Cancelled => Outcome::Cancelled,
        WireResult::Requeue { reason } => Outcome::Requeue { reason },
    }
}
