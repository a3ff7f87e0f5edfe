//! One Kiln node: wires the job store, the ComfyUI supervisor and client, the job runner and the
//! HTTP API, and stops them in order.
//!
//! [`run`] is the entry point that `main` and the tests call; it takes its listener and a
//! shutdown future so a whole node runs in-process on port 0. [`run_dev`] is `kilnd --dev`.
//!
//! Shutdown order: readiness off → the runner stops taking jobs and finishes (or hands back) the
//! running one within a deadline → ComfyUI stopped (SIGINT, then SIGKILL) → HTTP stopped → the
//! store's writer flushed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::cluster::status::{GpuPart, StatusIdentity, StatusSink, StatusSources};
use crate::cluster::{Cluster, ClusterSettings, StatusCell};
use crate::comfy::ComfyControl;
use crate::comfy::client::{ComfyClient, ComfyError};
use crate::comfy::executor::{self, RunEvent, RunOptions, RunOutcome};
use crate::comfy::supervisor::{Supervisor, SupervisorConfig, SupervisorState};
use crate::comfy::types::ObjectInfo;
use crate::config::{ApiSection, ClusterSection, ComfySection, Config, JobsSection, NodeSection};
use crate::gpu::{GpuConfig, GpuMonitor, GpuSource, SimLoad};
use crate::jobs::{Jobs, JobsSettings, Work};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::protocol::{JobError, JobStatus, Progress, Tier, WatermarkStatus};
use crate::queue::{JobStore, NewOutput, Outcome, StoreOptions};
use crate::tiers::{Account, KeyRing, TierTable};
use crate::watermark::{Marked, Watermark};

/// Frames queued per peer before new ones are dropped.
const PEER_QUEUE_LEN: usize = 1024;

/// Room in a peer message for everything but the workflow.
const PEER_FRAME_MARGIN: usize = 256 * 1024;

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether the node takes work, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

/// A progress report of the running job, for SSE subscribers.
#[derive(Debug, Clone)]
pub struct ProgressEvent {
    pub job_id: String,
    pub progress: Progress,
}

#[derive(Debug)]
struct RunningJob {
    id: String,
    cancel: CancellationToken,
    started: tokio::time::Instant,
}

/// What the runner and the API share about the job that runs now: its progress, a way to cancel
/// it, and the measured job duration behind wait estimates. Short synchronous critical sections
/// only.
#[derive(Debug)]
pub struct Live {
    running: Mutex<Option<RunningJob>>,
    pending_cancels: Mutex<HashSet<String>>,
    progress: Mutex<HashMap<String, Progress>>,
    events: broadcast::Sender<ProgressEvent>,
    /// Whether the runner runs a job, for the published status.
    busy: watch::Sender<bool>,
    /// Exponentially weighted mean of successful job durations, in milliseconds.
    mean_duration_ms: AtomicU64,
    /// Ends streams (SSE) when the node shuts down.
    pub shutdown: CancellationToken,
}

impl Live {
    pub fn new(assumed_duration: Duration, shutdown: CancellationToken) -> Arc<Live> {
        let (events, _) = broadcast::channel(256);
        Arc::new(Live {
            running: Mutex::new(None),
            pending_cancels: Mutex::new(HashSet::new()),
            progress: Mutex::new(HashMap::new()),
            events,
            busy: watch::Sender::new(false),
            mean_duration_ms: AtomicU64::new(assumed_duration.as_millis().max(1) as u64),
            shutdown,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ProgressEvent> {
        self.events.subscribe()
    }

    pub fn progress(&self, job_id: &str) -> Option<Progress> {
        lock(&self.progress).get(job_id).cloned()
    }

    /// Asks the runner to interrupt a running job. Remembered if the runner has taken the job
    /// but not registered it yet.
    pub fn request_cancel(&self, job_id: &str) {
        let running = lock(&self.running);
        match running.as_ref() {
            Some(job) if job.id == job_id => job.cancel.cancel(),
            _ => {
                lock(&self.pending_cancels).insert(job_id.to_string());
            }
        }
    }

    fn start(&self, job_id: &str) -> CancellationToken {
        let cancel = CancellationToken::new();
        if lock(&self.pending_cancels).remove(job_id) {
            cancel.cancel();
        }
        *lock(&self.running) = Some(RunningJob {
            id: job_id.to_string(),
            cancel: cancel.clone(),
            started: tokio::time::Instant::now(),
        });
        self.busy.send_replace(true);
        cancel
    }

    /// Follows whether the runner runs a job.
    pub fn watch_busy(&self) -> watch::Receiver<bool> {
        self.busy.subscribe()
    }

    /// Whether this node's runner is running a job now.
    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// Interrupts `job_id` if this node's runner is running it; false otherwise.
    pub fn cancel_if_running(&self, job_id: &str) -> bool {
        match lock(&self.running).as_ref() {
            Some(job) if job.id == job_id => {
                job.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// Forgets a job's progress (it ended elsewhere).
    pub fn clear_progress(&self, job_id: &str) {
        lock(&self.progress).remove(job_id);
    }

    /// Records a running job's progress and tells event streams.
    pub fn set_progress(&self, job_id: &str, progress: Progress) {
        lock(&self.progress).insert(job_id.to_string(), progress.clone());
        let _ = self.events.send(ProgressEvent {
            job_id: job_id.to_string(),
            progress,
        });
    }

    fn end(&self, job_id: &str, duration: Option<Duration>) {
        *lock(&self.running) = None;
        self.busy.send_replace(false);
        lock(&self.progress).remove(job_id);
        lock(&self.pending_cancels).remove(job_id);
        if let Some(duration) = duration {
            let sample = duration.as_millis().max(1) as u64;
            let old = self.mean_duration_ms.load(Ordering::Relaxed);
            // Weight 1/5 for a new sample: follows a change of workload within a few jobs.
            let new = (old * 4 + sample) / 5;
            self.mean_duration_ms.store(new.max(1), Ordering::Relaxed);
        }
    }

    /// The mean job duration used for estimates, in seconds.
    pub fn mean_duration_s(&self) -> f64 {
        self.mean_duration_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// Estimated seconds until the job at 1-based queue `position` starts: the rest of the
    /// running job plus one mean duration per job ahead.
    pub fn wait_for_position(&self, position: u64) -> f64 {
        let mean = self.mean_duration_s();
        let remaining = lock(&self.running)
            .as_ref()
            .map(|r| (mean - r.started.elapsed().as_secs_f64()).max(0.0))
            .unwrap_or(0.0);
        remaining + position.saturating_sub(1) as f64 * mean
    }

    /// Estimated seconds until a new job of `tier` from `account` would start.
    pub fn estimate_wait(&self, store: &JobStore, tier: Tier, account: &str) -> f64 {
        self.wait_for_position(store.queued_ahead(tier, account) + 1)
    }

    /// Copies the queue's per-tier depth into the metrics.
    pub fn refresh_queue_metrics(&self, store: &JobStore, metrics: &Metrics) {
        let summary = store.summary();
        for tier in Tier::BY_PRIORITY {
            let depth = summary
                .tiers
                .iter()
                .find(|t| t.tier == tier)
                .map(|t| t.queued)
                .unwrap_or(0);
            metrics
                .queue_depth
                .get_or_create(&Metrics::tier(tier))
                .set(depth as i64);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything a node needs besides its listener, read and checked before any port is bound.
#[derive(Debug, Clone)]
pub struct NodeParts {
    pub config: Config,
    pub keys: KeyRing,
    pub operator_token: Option<String>,
    pub supervisor: SupervisorConfig,
    /// Cluster membership, when `[cluster]` names certificates.
    pub cluster: Option<ClusterSettings>,
    /// The mark drawn on outputs of watermarked tiers; `None` when no tier has one.
    pub watermark: Option<Arc<Watermark>>,
    /// systemd notifications (readiness, status, watchdog); disabled unless set.
    pub notify: Notifier,
    /// How job webhooks are sent; `None` when `[webhooks]` has no secret (webhooks off).
    pub webhooks: Option<crate::webhooks::Settings>,
    /// The bucket outputs go to (`[storage] kind = "s3"`); `None`: the data dir.
    pub objects: Option<crate::results::ObjectStorage>,
}

impl NodeParts {
    /// Reads the files a config names (operator token, keys file, warm-up workflow, watermark
    /// image) and checks them. `kilnd check-config` runs this too.
    pub fn prepare(config: Config) -> anyhow::Result<NodeParts> {
        let operator_token = config.operator_token()?;
        let keys =
            KeyRing::load(&config.api.keys_file).with_context(|| "api.keys_file".to_string())?;
        let supervisor = supervisor_config(&config)?;
        let cluster =
            ClusterSettings::from_config(&config.cluster, |name| std::env::var(name).ok())?;
        let watermark = watermark_of(&config)?;
        let webhooks = config.webhooks.settings()?;
        let objects = objects_of(&config.storage)?;
        Ok(NodeParts {
            config,
            keys,
            operator_token,
            supervisor,
            cluster,
            watermark,
            notify: Notifier::disabled(),
            webhooks,
            objects,
        })
    }
}

/// Runs a node from a config file's contents: reads secrets and keys, binds the API, runs,
/// telling the service manager through `notify`.
pub async fn run_with_config(
    config: Config,
    notify: Notifier,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut parts = NodeParts::prepare(config)?;
    parts.notify = notify;
    let listen = parts.config.api.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (api.listen)"))?;
    run(parts, listener, shutdown).await
}

/// Runs a node until `shutdown` resolves, then stops it in order.
pub async fn run(
    parts: NodeParts,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let NodeParts {
        config,
        keys,
        operator_token,
        supervisor,
        cluster: cluster_settings,
        watermark,
        notify,
        webhooks,
        objects,
    } = parts;
    let config = Arc::new(config);
    let data_dir = config.node.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;

    let metrics = Metrics::new();
    let store = JobStore::open(
        &data_dir,
        StoreOptions {
            retention: config.tiers.retentions(),
            objects,
            metrics: metrics.store.clone(),
            inline_max_bytes: config.storage.inline_max_bytes,
            ..StoreOptions::default()
        },
    )
    .await
    .with_context(|| format!("cannot open the job store in {}", data_dir.display()))?;
    let recovery = store.recovery().clone();
    if !recovery.requeued.is_empty() || !recovery.failed.is_empty() {
        tracing::warn!(
            requeued = recovery.requeued.len(),
            failed = recovery.failed.len(),
            "jobs that were running when kilnd stopped: requeued or failed after max attempts"
        );
    }
    tracing::info!(queued = recovery.queued, "job store open");

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let live = Live::new(
        Duration::from_secs_f64(config.jobs.assumed_duration_s),
        stop.child_token(),
    );

    // In a cluster the certificate's name is the node's name.
    let node_name = match &cluster_settings {
        Some(settings) => {
            let cert_name = settings.identity.name().to_string();
            if let Some(configured) = &config.node.name
                && configured != &cert_name
            {
                tracing::warn!(%configured, certificate = %cert_name,
                    "node.name differs from the certificate's name; the cluster knows this node by the certificate's");
            }
            cert_name
        }
        None => config.node.name.clone().unwrap_or_else(hostname),
    };
    let supervisor =
        Supervisor::spawn(supervisor).context("cannot start the ComfyUI supervisor")?;
    let client = Arc::new(
        ComfyClient::new(
            config.comfy.url.clone(),
            format!("kiln-{node_name}-{}", uuid::Uuid::new_v4().simple()),
        )
        .context("cannot build the ComfyUI client")?,
    );

    let (info_tx, info_rx) = watch::channel(None);
    let (ready_tx, ready_rx) =
        watch::channel(Readiness::NotReady("ComfyUI is starting".to_string()));

    // Keys file reloads (a no-op for the fixed keys of --dev).
    tasks.spawn(
        keys.clone()
            .watch(Duration::from_secs(2), stop.child_token()),
    );
    // Readiness, object_info and ComfyUI metrics follow the supervisor.
    tasks.spawn(follow_supervisor(
        supervisor.subscribe_state(),
        client.clone(),
        info_tx,
        ready_tx,
        metrics.clone(),
        stop.child_token(),
    ));
    // systemd's STATUS= line follows ComfyUI's state.
    tasks.spawn(crate::notify::follow_comfy(
        notify.clone(),
        supervisor.subscribe_state(),
        stop.child_token(),
    ));

    // Membership: join the cluster (or stand alone) and keep publishing this node's status.
    let api_port = listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.api.listen.port());
    let generation = unix_ms().max(0) as u64;
    let draining = CancellationToken::new();
    // GPU readings (NVML on its own thread, or the simulated card following our load).
    let (load_tx, load_rx) = watch::channel(SimLoad::default());
    let gpu_config = config.gpu.clone();
    let monitor = tokio::task::spawn_blocking(move || GpuMonitor::start(&gpu_config, load_rx))
        .await
        .context("the GPU monitor's start panicked")??;
    let (gpu_tx, gpu_rx) = watch::channel(GpuPart::from_snapshot(&monitor.latest()));
    {
        let mut readings = monitor.subscribe();
        let stop = stop.child_token();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = readings.changed() => if changed.is_err() { break },
                }
                let part = GpuPart::from_snapshot(&readings.borrow_and_update());
                gpu_tx.send_if_modified(|current| {
                    let changed = *current != part;
                    *current = part;
                    changed
                });
            }
        });
    }
    let mut identity = StatusIdentity {
        name: node_name.clone(),
        api_url: config.cluster.api_url.clone(),
        provider: config.cluster.provider.clone(),
        instance_id: config.cluster.instance_id.clone(),
        price_per_hour: config.cluster.price_per_hour,
    };
    let (membership, sink, cluster) = match cluster_settings {
        Some(mut settings) => {
            // A forwarded submission carries the whole workflow in one peer message.
            settings.net.max_frame_bytes = settings
                .net
                .max_frame_bytes
                .max(config.api.max_body_bytes + PEER_FRAME_MARGIN);
            // Every submission, lease and result is a peer request now, not only gossip: a
            // burst of concurrent submissions must not overflow a peer's send queue (a dropped
            // frame costs its request a whole deadline).
            settings.net.peer_queue_len = settings.net.peer_queue_len.max(PEER_QUEUE_LEN);
            let has_seeds = !settings.seeds.is_empty();
            let initial = crate::cluster::status::node_status(
                &identity,
                &supervisor.subscribe_state().borrow(),
                &store.summary(),
                &GpuPart::default(),
                false,
                unix_ms(),
            );
            let cluster = Arc::new(
                Cluster::start(settings, initial)
                    .await
                    .context("cannot join the cluster")?,
            );
            cluster.spawn_view_task(has_seeds);
            if identity.api_url.is_none() {
                let advertised = cluster.endpoint().advertise().addr.ip();
                let ip = if config.api.listen.ip().is_unspecified() {
                    advertised
                } else {
                    config.api.listen.ip()
                };
                identity.api_url = Some(format!("http://{}", SocketAddr::new(ip, api_port)));
            }
            tracing::info!(
                name = %cluster.name(),
                cluster = %cluster.cluster_id(),
                gossip = %cluster.endpoint().advertise(),
                "joined the cluster's gossip"
            );
            (
                api::Membership::Member(cluster.clone()),
                StatusSink::Cluster(cluster.clone()),
                Some(cluster),
            )
        }
        None => {
            if identity.api_url.is_none()
                && let Ok(local) = listener.local_addr()
            {
                identity.api_url = Some(format!("http://{local}"));
            }
            let cell = Arc::new(StatusCell::default());
            (
                api::Membership::Standalone {
                    status: cell.clone(),
                    generation,
                },
                StatusSink::Alone(cell),
                None,
            )
        }
    };
    // Jobs across the cluster (or this node alone), and the runner that takes them.
    let jobs = Jobs::start(
        node_name.clone(),
        store.clone(),
        live.clone(),
        metrics.clone(),
        cluster.clone(),
        JobsSettings {
            lease: config.jobs.lease(),
            cancel_wait: api::cancel_wait(&config),
            max_frame_bytes: cluster
                .as_ref()
                .map(|c| c.endpoint().max_frame_bytes())
                .unwrap_or(config.api.max_body_bytes + PEER_FRAME_MARGIN),
            inline_outputs_bytes: config.cluster.inline_outputs_bytes(),
        },
    )?;
    if let Some(cluster) = &cluster {
        // Before this node runs or leases its queue: which of its jobs were adopted by their
        // replicas while it was away?
        let jobs = jobs.clone();
        let mut joined = cluster.joined();
        let stop = stop.child_token();
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                joined = joined.wait_for(|joined| *joined) => if joined.is_err() { return },
            }
            jobs.reconcile(Duration::from_secs(15)).await;
        });
    }
    // Webhooks of final jobs, from the store's outbox; its own token, stopped below with a
    // bounded wait so a slow receiver never holds up the shutdown.
    let webhook_worker = match webhooks {
        Some(settings) => Some(crate::webhooks::WebhookWorker::start(
            store.clone(),
            settings,
            metrics.clone(),
            crate::queue::system_clock(),
        )?),
        None => {
            if let Ok((_, due)) = store.outbox_pending().await
                && due > 0
            {
                tracing::warn!(
                    due,
                    "webhooks wait in the outbox but [webhooks] has no secret: they are not sent"
                );
            }
            None
        }
    };
    // Retention: deletes this node's expired outputs (its own jobs and its replica copies).
    let sweeper = crate::results::Sweeper::start(
        crate::results::Results::new(store.clone()),
        config.storage.sweep(),
        crate::results::SweepClock::system(),
    );
    let runner_stop = CancellationToken::new();
    let runner = tokio::spawn(run_jobs(Runner {
        jobs: jobs.clone(),
        store: store.clone(),
        client: client.clone(),
        control: Arc::new(supervisor.control()),
        states: supervisor.subscribe_state(),
        live: live.clone(),
        metrics: metrics.clone(),
        config: config.jobs.clone(),
        tiers: config.tiers.clone(),
        watermark,
        stop: runner_stop.clone(),
    }));

    let publisher_stop = CancellationToken::new();
    let publisher = tokio::spawn(crate::cluster::status::publish_loop(
        StatusSources {
            identity,
            supervisor: supervisor.subscribe_state(),
            store: store.clone(),
            gpu: gpu_rx,
            draining: draining.clone(),
            busy: load_tx,
            runner: live.clone(),
        },
        sink,
        Duration::from_secs(1),
        publisher_stop.clone(),
    ));

    let drain_requested = CancellationToken::new();
    let state = AppState {
        store: store.clone(),
        keys,
        operator_token: operator_token.map(Arc::from),
        config: config.clone(),
        metrics: metrics.clone(),
        object_info: info_rx,
        readiness: ready_rx,
        live: live.clone(),
        membership,
        jobs: jobs.clone(),
        drain: drain_requested.clone(),
    };
    let app = api::router(state);
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "API listening");
    let http_stop = CancellationToken::new();
    let http = {
        let http_stop = http_stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_stop.cancelled().await })
                .await
        })
    };

    // The API serves: systemd may start what depends on kilnd. ComfyUI's progress follows in
    // STATUS= lines.
    notify.ready(&format!(
        "API up; {}",
        crate::notify::comfy_status(&supervisor.subscribe_state().borrow())
    ));

    // The main loop: wait for shutdown, and ping systemd's watchdog only while the parts that
    // must stay alive answer, so a stuck node misses its pings and is restarted.
    let mut watchdog = notify.watchdog_timer();
    let probe_limit = notify
        .ping_interval()
        .map(|interval| interval / 2)
        .unwrap_or(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                break;
            }
            _ = drain_requested.cancelled() => {
                tracing::info!("drain requested by the operator; shutting down");
                break;
            }
            _ = watchdog.tick() => match node_alive(&store, &http, &runner, probe_limit).await {
                Ok(()) => notify.watchdog(),
                Err(problem) => tracing::error!(%problem, "the node is not healthy; not pinging systemd's watchdog"),
            },
        }
    }
    notify.stopping(&format!(
        "draining: finishing the running job (at most {} s)",
        config.jobs.drain_timeout_s
    ));
    // The shutdown below is bounded by its own deadlines; keep the watchdog fed meanwhile.
    let stopping_pings = CancellationToken::new();
    {
        let notify = notify.clone();
        let mut timer = notify.watchdog_timer();
        let done = stopping_pings.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = timer.tick() => notify.watchdog(),
                }
            }
        });
    }
    // Readiness off (gossip says `draining`), no new jobs taken as owner, no leases.
    draining.cancel();
    jobs.start_draining();
    stop.cancel();
    runner_stop.cancel();
    match tokio::time::timeout(config.jobs.drain_timeout() + Duration::from_secs(5), runner).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "the job runner failed"),
        Err(_) => tracing::error!("the job runner did not stop in time"),
    }
    // The queue goes to the members that own it next, acknowledged by each.
    if cluster.is_some() {
        notify.status("draining: handing queued jobs to their next owners");
        let handed = jobs.drain().await;
        tracing::info!(jobs = handed, "queued jobs handed over");
    }
    // After the last final status this node records (the runner's job); what is still due is
    // sent after the restart, or by the job's adopter.
    if let Some(worker) = webhook_worker {
        worker.shutdown(Duration::from_secs(2)).await;
    }
    sweeper.shutdown(Duration::from_secs(2)).await;
    notify.status("stopping ComfyUI");
    if let Err(error) = supervisor.shutdown().await {
        tracing::warn!(%error, "stopping ComfyUI");
    }
    // The API stops before the peer layer: every request it took can still reach the other
    // members (a submission is forwarded, not refused); event streams ended with `stop`.
    http_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), http).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::warn!(%error, "HTTP server"),
        Ok(Err(error)) => tracing::warn!(%error, "HTTP server task"),
        Err(_) => tracing::warn!("HTTP connections still open at shutdown; dropped"),
    }
    publisher_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), publisher).await;
    jobs.shutdown().await;
    if let Some(cluster) = cluster {
        // One more round so peers see `draining` before this member goes quiet.
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.shutdown().await;
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    drop(monitor);
    if let Err(error) = store.close().await {
        tracing::warn!(%error, "closing the job store");
    }
    notify.status("stopped");
    stopping_pings.cancel();
    tracing::info!("stopped");
    Ok(())
}

/// Draws the watermark on each output, off the async runtime. A file that cannot be marked is
/// kept as it is, flagged with the reason.
async fn mark_outputs(
    mark: &Arc<Watermark>,
    job_id: &str,
    outputs: Vec<NewOutput>,
) -> Vec<NewOutput> {
    let mark = mark.clone();
    // Kept so that a failure of the marking task loses no file.
    let originals = outputs.clone();
    let marking = tokio::task::spawn_blocking(move || {
        outputs
            .into_iter()
            .map(|mut output| {
                let status = match mark.apply(&output.bytes) {
                    Marked::Applied(bytes) => {
                        output.bytes = bytes;
                        WatermarkStatus::Applied
                    }
                    Marked::Skipped(reason) => WatermarkStatus::Skipped { reason },
                };
                output.watermark = Some(status);
                output
            })
            .collect::<Vec<_>>()
    });
    match marking.await {
        Ok(outputs) => {
            for output in &outputs {
                if let Some(WatermarkStatus::Skipped { reason }) = &output.watermark {
                    tracing::warn!(job = %job_id, file = %output.filename, %reason, "an output was stored without its watermark");
                }
            }
            outputs
        }
        Err(error) => {
            tracing::error!(job = %job_id, %error, "watermarking failed; the outputs are stored without it");
            originals
                .into_iter()
                .map(|mut output| {
                    output.watermark = Some(WatermarkStatus::Skipped {
                        reason: format!("watermarking failed: {error}"),
                    });
                    output
                })
                .collect()
        }
    }
}

/// The watermark, when a tier's outputs carry one (its image file is read here).
fn watermark_of(config: &Config) -> anyhow::Result<Option<Arc<Watermark>>> {
    if !Tier::BY_PRIORITY
        .iter()
        .any(|tier| config.tiers.get(*tier).watermark)
    {
        return Ok(None);
    }
    let mark = Watermark::from_config(&config.watermark)
        .map_err(|(key, message)| anyhow::anyhow!("{key}: {message}"))?;
    Ok(Some(Arc::new(mark)))
}

/// The main loop's liveness check before a watchdog ping: the HTTP server and the job runner
/// still run, and the job store answers a read within `limit`.
async fn node_alive<T, U>(
    store: &JobStore,
    http: &tokio::task::JoinHandle<T>,
    runner: &tokio::task::JoinHandle<U>,
    limit: Duration,
) -> Result<(), String> {
    if http.is_finished() {
        return Err("the HTTP server stopped".to_string());
    }
    if runner.is_finished() {
        return Err("the job runner stopped".to_string());
    }
    match tokio::time::timeout(limit, store.get("kiln-watchdog-probe")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("the job store failed a read: {error}")),
        Err(_) => Err(format!(
            "the job store did not answer a read within {} ms",
            limit.as_millis()
        )),
    }
}

fn supervisor_config(config: &Config) -> anyhow::Result<SupervisorConfig> {
    let mut sup = SupervisorConfig::new(config.comfy.command.clone(), config.comfy.url.clone());
    sup.env = config
        .comfy
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    sup.cwd = config.comfy.cwd.clone();
    sup.start_timeout = Duration::from_secs(config.comfy.start_timeout_s);
    if let Some(path) = &config.comfy.warmup_workflow {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("comfy.warmup_workflow: cannot read {}", path.display()))?;
        let workflow: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("comfy.warmup_workflow: {} is not JSON", path.display()))?;
        sup.warmup = Some(workflow);
    }
    sup.validate().map_err(|e| anyhow::anyhow!("comfy: {e}"))?;
    Ok(sup)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kiln-node".to_string())
}

/// Follows the supervisor: readiness for `/readyz`, the node classes of every new ComfyUI
/// generation for validation (the last known classes stay in use while ComfyUI restarts, so
/// jobs are still accepted), and ComfyUI's metrics.
async fn follow_supervisor(
    mut states: watch::Receiver<SupervisorState>,
    client: Arc<ComfyClient>,
    info_tx: watch::Sender<Option<Arc<ObjectInfo>>>,
    ready_tx: watch::Sender<Readiness>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut info_generation: Option<u64> = None;
    let mut restarts_seen = 0u64;
    loop {
        let state = states.borrow_and_update().clone();
        if let SupervisorState::Ready { generation } = state {
            if generation > 1 && generation - 1 > restarts_seen {
                metrics
                    .comfy_restarts
                    .inc_by(generation - 1 - restarts_seen);
                restarts_seen = generation - 1;
            }
            if info_generation != Some(generation) {
                client.invalidate();
                match client.object_info().await {
                    Ok(info) => {
                        info_tx.send_replace(Some(info));
                        info_generation = Some(generation);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read ComfyUI's object_info; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                }
            }
        }
        let readiness = if stop.is_cancelled() {
            Readiness::NotReady("the node is shutting down".to_string())
        } else if state.is_ready() {
            Readiness::Ready
        } else {
            Readiness::NotReady(format!("ComfyUI is not ready: {}", state.reason()))
        };
        metrics.comfy_ready.set(i64::from(state.is_ready()));
        ready_tx.send_replace(readiness);
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = states.changed() => if changed.is_err() { break },
        }
    }
    ready_tx.send_replace(Readiness::NotReady("the node is shutting down".to_string()));
}

struct Runner {
    jobs: Jobs,
    store: JobStore,
    client: Arc<ComfyClient>,
    control: Arc<dyn ComfyControl>,
    states: watch::Receiver<SupervisorState>,
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    config: JobsSection,
    tiers: TierTable,
    watermark: Option<Arc<Watermark>>,
    stop: CancellationToken,
}

/// Job ends recorded at once in the background (stored and copied to the replica, or reported
/// to the owner) while the runner already runs the next job. The runner waits for a slot when
/// all are taken, so a slow owner or store slows the runner instead of piling up results.
const RECORDING_AT_ONCE: usize = 4;

/// Takes the best waiting job of the cluster (its own queue's or a peer's) whenever ComfyUI is
/// ready and idle, and runs it. Exactly one prompt at a time goes to ComfyUI. How a job ended is
/// recorded in the background, so ComfyUI gets the next prompt without waiting for the fsyncs
/// and peer round trips of the last one; every such recording ends before this returns.
async fn run_jobs(mut runner: Runner) {
    let recording = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(RECORDING_AT_ONCE));
    take_jobs(&mut runner, &recording, &slots).await;
    recording.close();
    recording.wait().await;
}

async fn take_jobs(
    runner: &mut Runner,
    recording: &TaskTracker,
    slots: &Arc<tokio::sync::Semaphore>,
) {
    loop {
        // Wait until ComfyUI is ready.
        loop {
            if runner.stop.is_cancelled() {
                return;
            }
            if runner.states.borrow_and_update().is_ready() {
                break;
            }
            tokio::select! {
                _ = runner.stop.cancelled() => return,
                changed = runner.states.changed() => if changed.is_err() { return },
            }
        }
        let work = match runner.jobs.next_work().await {
            Ok(Some(work)) => work,
            Ok(None) => {
                tokio::select! {
                    _ = runner.stop.cancelled() => return,
                    _ = runner.jobs.wait_for_work() => {}
                }
                continue;
            }
            Err(error) => {
                tracing::error!(%error, "cannot take the next job");
                tokio::select! {
                    _ = runner.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        let ended = run_one(runner, work).await;
        let recorder = Recorder::of(runner);
        match slots.clone().acquire_owned().await {
            Ok(slot) => {
                recording.spawn(async move {
                    recorder.record(ended).await;
                    drop(slot);
                });
            }
            // The semaphore is never closed; recorded inline should that ever change.
            Err(_) => recorder.record(ended).await,
        }
    }
}

/// A job whose prompt ended, to be recorded.
struct Ended {
    job: crate::queue::Job,
    remote: Option<crate::jobs::RemoteJob>,
    outcome: Outcome,
    elapsed: Duration,
    /// Stops the lease renewal of a leased job once its owner has the result.
    renewed: CancellationToken,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

/// What recording a job's end needs of the runner.
struct Recorder {
    jobs: Jobs,
    store: JobStore,
    metrics: Arc<Metrics>,
    tiers: TierTable,
    watermark: Option<Arc<Watermark>>,
}

impl Recorder {
    fn of(runner: &Runner) -> Recorder {
        Recorder {
            jobs: runner.jobs.clone(),
            store: runner.store.clone(),
            metrics: runner.metrics.clone(),
            tiers: runner.tiers.clone(),
            watermark: runner.watermark.clone(),
        }
    }

    /// Watermarks the outputs where the job's tier wants it, then stores the end and copies it
    /// to the replica (this node's job) or reports it to the owner (a leased job), renewing the
    /// lease until the owner has it.
    async fn record(self, ended: Ended) {
        let Ended {
            job,
            remote,
            mut outcome,
            elapsed,
            renewed,
            renewal,
        } = ended;
        if let (Outcome::Succeeded { outputs }, Some(mark)) = (&mut outcome, &self.watermark)
            && self.tiers.get(job.tier).watermark
        {
            *outputs = mark_outputs(mark, &job.id, std::mem::take(outputs)).await;
        }
        match &remote {
            None => match self.store.finish(&job.id, outcome).await {
                Ok(finished) => {
                    self.jobs.replicate(&finished).await;
                    tracing::info!(job = %job.id, status = %finished.status, secs = elapsed.as_secs_f64(), "job ended");
                    if finished.status.is_final() {
                        self.metrics.finished(job.tier, finished.status);
                    }
                    if finished.status == JobStatus::Succeeded {
                        self.metrics
                            .job_duration_seconds
                            .observe(elapsed.as_secs_f64());
                    }
                }
                Err(error) => tracing::error!(job = %job.id, %error, "cannot record the job's end"),
            },
            Some(remote) => {
                let succeeded = matches!(outcome, Outcome::Succeeded { .. });
                let applied = self.jobs.report(remote, outcome).await;
                // The lease is renewed until the owner has the result: a report slowed past the
                // lease would otherwise see the job queued again and run twice.
                renewed.cancel();
                if let Some(renewal) = renewal {
                    let _ = renewal.await;
                }
                tracing::info!(job = %job.id, owner = %remote.owner(), applied, secs = elapsed.as_secs_f64(), "leased job ended");
                if succeeded && applied {
                    self.metrics
                        .job_duration_seconds
                        .observe(elapsed.as_secs_f64());
                }
            }
        }
    }
}

/// Runs one job's prompt to its end; ComfyUI is idle again when this returns.
async fn run_one(runner: &Runner, work: Work) -> Ended {
    let job = work.job().clone();
    let remote = match &work {
        Work::Remote(remote) => Some(remote.clone()),
        Work::Local(_) => None,
    };
    let started = tokio::time::Instant::now();
    if job.attempts == 1 {
        let waited = (unix_ms() - job.created_at_ms).max(0) as f64 / 1000.0;
        runner
            .metrics
            .wait_seconds
            .get_or_create(&Metrics::tier(job.tier))
            .observe(waited);
    }
    tracing::info!(job = %job.id, tier = %job.tier, attempt = job.attempts, "running job");
    let cancel = runner.live.start(&job.id);
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel::<RunEvent>(64);
    let relay = {
        let live = runner.live.clone();
        let job_id = job.id.clone();
        let jobs = runner.jobs.clone();
        let remote = remote.clone();
        tokio::spawn(async move {
            // A leased job's progress goes to its owner too, at most a few times a second.
            let mut last_sent: Option<tokio::time::Instant> = None;
            while let Some(event) = events_rx.recv().await {
                if let RunEvent::Progress { node, value, max } = event {
                    let progress = Progress {
                        node: node.unwrap_or_default(),
                        value: value.max(0.0).round() as u64,
                        max: max.max(0.0).round() as u64,
                    };
                    if let Some(remote) = &remote {
                        let due =
                            last_sent.is_none_or(|at| at.elapsed() >= Duration::from_millis(250));
                        if due || progress.value >= progress.max {
                            jobs.send_progress(remote, progress.clone());
                            last_sent = Some(tokio::time::Instant::now());
                        }
                    }
                    live.set_progress(&job_id, progress);
                }
            }
        })
    };
    // A leased job's lease is renewed while it runs; the owner may take it back.
    let renewed = CancellationToken::new();
    let renewal = remote.as_ref().map(|remote| {
        let jobs = runner.jobs.clone();
        let remote = remote.clone();
        let done = renewed.clone();
        let interrupt = cancel.clone();
        tokio::spawn(async move { jobs.renew_until(&remote, done, interrupt).await })
    });
    let extra_data = json!({"kiln_job_id": job.id, "kiln_attempt": job.attempts});
    let options = RunOptions {
        timeout: runner.config.timeout(),
        interrupt_grace: runner.config.interrupt_grace(),
        ..RunOptions::default()
    };
    // On shutdown the running job gets the drain deadline to finish, then it is interrupted
    // and handed back to the queue.
    let shutdown_interrupt = CancellationToken::new();
    let outcome = {
        let run = executor::run_prompt(
            &runner.client,
            runner.control.as_ref(),
            job.workflow.as_raw(),
            Some(&extra_data),
            &options,
            events_tx,
            cancel.clone(),
        );
        tokio::pin!(run);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                _ = runner.stop.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    let interrupt = shutdown_interrupt.clone();
                    let cancel = cancel.clone();
                    let drain = runner.config.drain_timeout();
                    tokio::spawn(async move {
                        tokio::time::sleep(drain).await;
                        interrupt.cancel();
                        cancel.cancel();
                    });
                }
            }
        }
    };
    let _ = relay.await;
    let elapsed = started.elapsed();
    let handed_back = shutdown_interrupt.is_cancelled();
    let (store_outcome, duration) = match outcome {
        RunOutcome::Succeeded { outputs, .. } => {
            let outputs = outputs
                .into_iter()
                .map(|o| NewOutput {
                    content_type: content_type_for(&o.filename).to_string(),
                    filename: o.filename,
                    bytes: o.bytes.to_vec(),
                    watermark: None,
                })
                .collect();
            (Outcome::Succeeded { outputs }, Some(elapsed))
        }
        RunOutcome::Interrupted { .. } if handed_back => (
            Outcome::Requeue {
                reason: "the node shut down while the job ran".to_string(),
            },
            None,
        ),
        RunOutcome::Interrupted { .. } => (Outcome::Cancelled, None),
        RunOutcome::TimedOut { .. } => (
            Outcome::Failed(JobError {
                code: "timeout".to_string(),
                message: format!(
                    "the job ran longer than {} s and was stopped",
                    runner.config.timeout_s
                ),
                details: None,
            }),
            None,
        ),
        RunOutcome::Lost { reason } => (
            Outcome::Requeue {
                reason: format!("ComfyUI lost the prompt: {reason}"),
            },
            None,
        ),
        RunOutcome::Failed(error) => match job_error(&error) {
            Some(job_error) => (Outcome::Failed(job_error), None),
            None => (
                Outcome::Requeue {
                    reason: format!("ComfyUI failed: {error}"),
                },
                None,
            ),
        },
    };
    runner.live.end(&job.id, duration);
    Ended {
        job,
        remote,
        outcome: store_outcome,
        elapsed,
        renewed,
        renewal,
    }
}

/// The job's own error when ComfyUI refused or failed the prompt itself; `None` when the fault
/// is ComfyUI's or the connection's, so the job should run again.
fn job_error(error: &ComfyError) -> Option<JobError> {
    match error {
        ComfyError::Execution {
            node_id,
            node_type,
            exception_type,
            message,
            ..
        } => Some(JobError {
            code: "execution_error".to_string(),
            message: format!("node {node_id} ({node_type}) failed: {exception_type}: {message}"),
            details: Some(json!({
                "node_id": node_id,
                "node_type": node_type,
                "exception_type": exception_type,
                "exception_message": message,
            })),
        }),
        ComfyError::Rejected {
            error_type,
            node_errors,
            ..
        } => Some(JobError {
            code: "comfy_rejected".to_string(),
            message: error.to_string(),
            details: Some(json!({
                "type": error_type,
                "node_errors": node_errors,
            })),
        }),
        ComfyError::Unreachable { .. }
        | ComfyError::Interrupted
        | ComfyError::Lost { .. }
        | ComfyError::Http { .. }
        | ComfyError::Protocol(_)
        | ComfyError::Timeout(_) => None,
    }
}

/// The content type of an output file, from its extension.
pub fn content_type_for(filename: &str) -> &'static str {
    let ext = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `kilnd --dev` options.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub sim_step_ms: Option<u64>,
    /// More arguments for `kilnd comfy-sim`.
    pub sim_args: Vec<String>,
    /// systemd notifications.
    pub notify: Notifier,
}

/// The demo keys of a dev node, one per tier, as written to `<data dir>/dev-keys.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevKeys {
    pub free: String,
    pub premium: String,
    pub pro: String,
    pub enterprise: String,
}

impl DevKeys {
    fn generate() -> DevKeys {
        DevKeys {
            free: crate::tiers::generate_key(),
            premium: crate::tiers::generate_key(),
            pro: crate::tiers::generate_key(),
            enterprise: crate::tiers::generate_key(),
        }
    }

    fn entries(&self) -> Vec<(String, Account)> {
        [
            (&self.free, Tier::Free),
            (&self.premium, Tier::Premium),
            (&self.pro, Tier::Pro),
            (&self.enterprise, Tier::Enterprise),
        ]
        .into_iter()
        .map(|(key, tier)| {
            (
                key.clone(),
                Account {
                    id: format!("demo-{tier}"),
                    tier,
                },
            )
        })
        .collect()
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.create(true).write(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `kilnd --dev`: a single local node on 127.0.0.1 with the ComfyUI simulator as its ComfyUI,
/// demo keys for every tier, and its data in a temporary folder unless one is given.
pub async fn run_dev(
    options: DevOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = options
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7860)));
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--dev binds loopback addresses only, not {listen}; run a real node with --config"
        );
    }
    let (data_dir, _temp) = match options.data_dir {
        Some(dir) => (dir, None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("kilnd-dev-")
                .tempdir()
                .context("cannot make a temporary data dir")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data_dir.display()))?;

    let keys_path = data_dir.join("dev-keys.json");
    let keys = match std::fs::read_to_string(&keys_path)
        .ok()
        .and_then(|text| serde_json::from_str::<DevKeys>(&text).ok())
    {
        Some(keys) => keys,
        None => {
            let keys = DevKeys::generate();
            write_private(&keys_path, &serde_json::to_string_pretty(&keys)?)?;
            keys
        }
    };
    let operator_token = crate::tiers::generate_key().replacen("kiln_", "kilnop_", 1);
    write_private(&data_dir.join("operator-token"), &operator_token)?;

    // A one-member cluster with its own CA, so `kiln certs issue --ca <data>/certs/ca NAME`
    // gives `kiln status` (or more dev nodes) a way in.
    let certs_root = data_dir.join("certs");
    crate::pki::dev_identity(&certs_root, "dev")
        .with_context(|| format!("cannot make dev certificates in {}", certs_root.display()))?;
    let dev_certs = certs_root.join("dev");

    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen} (use --listen to pick another address)")
    })?;
    let comfy_port = free_port().context("cannot find a free port for the simulator")?;
    let gossip = std::net::UdpSocket::bind(SocketAddr::new(listen.ip(), 0))
        .and_then(|socket| socket.local_addr())
        .context("cannot find a free UDP port for gossip")?;
    let exe = std::env::current_exe().context("cannot find the kilnd executable")?;
    let mut command = vec![
        exe.to_string_lossy().into_owned(),
        "comfy-sim".to_string(),
        "--port".to_string(),
        comfy_port.to_string(),
        "--base-dir".to_string(),
        data_dir.join("comfy").to_string_lossy().into_owned(),
    ];
    if let Some(step) = options.sim_step_ms {
        command.push("--step-time-ms".to_string());
        command.push(step.to_string());
    }
    command.extend(options.sim_args.iter().cloned());
    let config = Config {
        node: NodeSection {
            name: Some("dev".to_string()),
            data_dir: data_dir.clone(),
        },
        api: ApiSection {
            listen,
            ..ApiSection::default()
        },
        comfy: ComfySection {
            command,
            url: url::Url::parse(&format!("http://127.0.0.1:{comfy_port}"))?,
            cwd: None,
            env: Default::default(),
            start_timeout_s: 60,
            warmup_workflow: None,
        },
        jobs: JobsSection::default(),
        tiers: TierTable::default(),
        gpu: GpuConfig {
            source: GpuSource::Sim,
            ..GpuConfig::default()
        },
        cluster: ClusterSection {
            certs_dir: Some(dev_certs),
            listen: gossip,
            ..ClusterSection::default()
        },
        watermark: Default::default(),
        webhooks: Default::default(),
        storage: Default::default(),
    };
    config.validate()?;

    let addr = listener.local_addr().unwrap_or(listen);
    println!(
        "kilnd --dev: API on http://{addr}  (data in {})",
        data_dir.display()
    );
    println!("demo API keys (also in {}):", keys_path.display());
    for (key, account) in keys.entries() {
        println!("  {:<11} {key}", account.tier.as_str());
    }
    println!("operator token: {operator_token}");
    println!(
        "cluster: a one-member cluster gossiping on quic://{gossip}; to watch it as a member:\n  \
         kiln certs issue --ca {ca} operator && kiln status --certs operator --seed quic://{gossip}",
        ca = certs_root.join("ca").display()
    );
    println!("try: curl -s http://{addr}/readyz");

    let supervisor = supervisor_config(&config)?;
    let cluster = ClusterSettings::from_config(&config.cluster, |name| std::env::var(name).ok())?;
    let watermark = watermark_of(&config)?;
    let webhooks = config.webhooks.settings()?;
    run(
        NodeParts {
            config,
            keys: KeyRing::fixed(keys.entries()),
            operator_token: Some(operator_token),
            supervisor,
            cluster,
            watermark,
            notify: options.notify,
            webhooks,
            objects: None,
        },
        listener,
        shutdown,
    )
    .await
}

/// The bucket `[storage]` names, with its credentials (from the environment or the owner-only
/// credentials file); `None` for `kind = "disk"`.
fn objects_of(
    storage: &crate::results::StorageConfig,
) -> anyhow::Result<Option<crate::results::ObjectStorage>> {
    if storage.kind != crate::results::StorageKind::S3 {
        return Ok(None);
    }
    let credentials = storage
        .credentials(|name| std::env::var(name).ok())
        .map_err(|(key, message)| crate::config::ConfigError::Invalid { key, message })?;
    crate::results::ObjectStorage::from_config(storage, credentials)
        .map_err(|message| anyhow::anyhow!(message))
}

fn free_port() -> std::io::Result<u16> {
    let socket = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(socket.local_addr()?.port())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog's liveness check: a node whose HTTP server or runner task ended is not
    /// alive, and the check says which part is gone.
    #[tokio::test]
    async fn the_watchdog_check_names_the_part_that_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = JobStore::open(dir.path(), StoreOptions::default())
            .await
            .expect("store");
        let stop = CancellationToken::new();
        let running = || {
            let stop = stop.clone();
            tokio::spawn(async move { stop.cancelled().await })
        };
        let (http, runner) = (running(), running());
        let limit = Duration::from_secs(5);
        assert_eq!(node_alive(&store, &http, &runner, limit).await, Ok(()));

        let ended = tokio::spawn(async {});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !ended.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        let problem = node_alive(&store, &ended, &runner, limit).await;
        assert_eq!(problem, Err("the HTTP server stopped".to_string()));
        let problem = node_alive(&store, &http, &ended, limit).await;
        assert_eq!(problem, Err("the job runner stopped".to_string()));

        stop.cancel();
    }
}
