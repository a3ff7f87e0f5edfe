//! What this node tells the cluster about itself, and the task that keeps telling it.
//!
//! [`member_state`] and [`queue_of`] are pure: they turn the supervisor's state, the runner's
//! activity and the store's queue summary into the published [`MemberStatus`]. The publisher
//! task re-reads them every second (and at once when ComfyUI's state changes) and hands the
//! result to the cluster (or, for a node alone, to the API's status cell). Values are
//! quantised here, so unchanged readings publish nothing new.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Cluster, StatusCell};
use crate::comfy::supervisor::SupervisorState;
use crate::protocol::cluster::{GpuStatus, MemberState, MemberStatus, Role, TierQueue};
use crate::protocol::gossip::{quantise_gpu, quantise_wait_s};
use crate::queue::{JobStore, QueueSummary};

/// The member state a node shows, from ComfyUI's supervisor and the runner.
pub fn member_state(supervisor: &SupervisorState, running: u64, draining: bool) -> MemberState {
    if draining {
        return MemberState::Draining;
    }
    match supervisor {
        SupervisorState::Starting { .. } => MemberState::Starting,
        SupervisorState::WarmingUp { .. } => MemberState::Warming,
        SupervisorState::Ready { .. } if running > 0 => MemberState::Busy,
        SupervisorState::Ready { .. } => MemberState::Ready,
        SupervisorState::Stopping => MemberState::Draining,
        _ => MemberState::Unhealthy,
    }
}

/// Waiting jobs per tier, with the oldest wait quantised; tiers with none are absent.
pub fn queue_of(summary: &QueueSummary, now_ms: i64) -> BTreeMap<crate::protocol::Tier, TierQueue> {
    summary
        .tiers
        .iter()
        .filter(|t| t.queued > 0)
        .map(|t| {
            let oldest = t
                .oldest_created_at_ms
                .map(|created| quantise_wait_s(((now_ms - created).max(0) / 1000) as u64));
            (
                t.tier,
                TierQueue {
                    queued: t.queued,
                    oldest_wait_s: oldest,
                },
            )
        })
        .collect()
}

/// The fixed parts of a node's status (set at start).
#[derive(Debug, Clone)]
pub struct StatusIdentity {
    pub name: String,
    pub api_url: Option<String>,
    pub provider: Option<String>,
    pub instance_id: Option<String>,
    pub price_per_hour: Option<f64>,
}

/// GPU readings as the status carries them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuPart {
    pub gpus: Vec<GpuStatus>,
    pub note: Option<String>,
}

impl GpuPart {
    /// The readings of a GPU snapshot as the status carries them (quantised later, when the
    /// status is built).
    pub fn from_snapshot(snapshot: &crate::gpu::GpuSnapshot) -> GpuPart {
        const MIB: u64 = 1024 * 1024;
        let mw_to_w = |mw: u32| mw.saturating_add(500) / 1000;
        GpuPart {
            gpus: snapshot
                .gpus
                .iter()
                .map(|g| GpuStatus {
                    index: g.index,
                    name: g.name.clone(),
                    uuid: g.uuid.clone(),
                    util_pct: g.util_gpu_pct,
                    mem_util_pct: g.util_mem_pct,
                    mem_used_mib: g.mem_used_bytes.map(|b| b / MIB),
                    mem_total_mib: g.mem_total_bytes.map(|b| b / MIB),
                    temperature_c: g.temperature_c,
                    power_w: g.power_mw.map(mw_to_w),
                    power_limit_w: g.power_limit_mw.map(mw_to_w),
                    processes: g
                        .processes
                        .as_ref()
                        .map(|p| u32::try_from(p.len()).unwrap_or(u32::MAX)),
                })
                .collect(),
            note: snapshot.note.clone(),
        }
    }
}

/// Builds the node's status from its parts.
pub fn node_status(
    identity: &StatusIdentity,
    supervisor: &SupervisorState,
    summary: &QueueSummary,
    gpu: &GpuPart,
    draining: bool,
    now_ms: i64,
) -> MemberStatus {
    MemberStatus {
        name: identity.name.clone(),
        role: Role::Node,
        state: member_state(supervisor, summary.running, draining),
        api_url: identity.api_url.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        provider: identity.provider.clone(),
        instance_id: identity.instance_id.clone(),
        price_per_hour: identity.price_per_hour,
        gpu_note: gpu.note.clone(),
        gpus: gpu.gpus.iter().map(quantise_gpu).collect(),
        queue: queue_of(summary, now_ms),
        running: u32::try_from(summary.running).unwrap_or(u32::MAX),
    }
}

/// Where a status goes.
#[derive(Clone, Debug)]
pub enum StatusSink {
    Cluster(Arc<Cluster>),
    Alone(Arc<StatusCell>),
}

/// The sources the publisher reads.
pub struct StatusSources {
    pub identity: StatusIdentity,
    pub supervisor: watch::Receiver<SupervisorState>,
    pub store: JobStore,
    pub gpu: watch::Receiver<GpuPart>,
    /// Set when the node starts shutting down.
    pub draining: CancellationToken,
    /// Told whether a job runs (the simulated GPU follows it).
    pub busy: watch::Sender<crate::gpu::SimLoad>,
    /// This node's runner: whether it runs a job (its own or one leased from a peer).
    pub runner: Arc<crate::node::Live>,
}

impl StatusSources {
    fn build(&self) -> MemberStatus {
        let supervisor = self.supervisor.borrow().clone();
        let mut summary = self.store.summary();
        // The jobs this node owns may run elsewhere; what it runs itself is the runner's.
        summary.running = u64::from(self.runner.is_running());
        let gpu = self.gpu.borrow().clone();
        self.busy.send_if_modified(|load| {
            let busy = summary.running > 0;
            let changed = load.busy != busy;
            load.busy = busy;
            changed
        });
        node_status(
            &self.identity,
            &supervisor,
            &summary,
            &gpu,
            self.draining.is_cancelled(),
            crate::node::unix_ms(),
        )
    }
}

/// Publishes the node's status every `interval` and whenever ComfyUI's state changes, until
/// `stop`; the last status published says `draining`.
///
/// The runner turns busy and idle again with every job: those changes are published at most
/// once per [`BUSY_GAP`], so a node running many short jobs does not republish (and make every
/// peer decode) its status for each one. Peers see it a gossip round later in any case.
pub async fn publish_loop(
    mut sources: StatusSources,
    sink: StatusSink,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut busy = sources.runner.watch_busy();
    let mut schedule = Schedule::new(Instant::now());
    loop {
        if schedule.take_due(Instant::now()) {
            publish(&sink, sources.build()).await;
        }
        let now = Instant::now();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sources.draining.cancelled(), if !sources.draining.is_cancelled() => {
                schedule.changed(now);
            }
            changed = sources.supervisor.changed() => {
                if changed.is_err() { break }
                schedule.changed(now);
            }
            _ = sources.gpu.changed() => schedule.changed(now),
            changed = busy.changed() => {
                if changed.is_err() { break }
                schedule.runner_changed();
            }
            _ = tick.tick() => schedule.changed(now),
            _ = tokio::time::sleep_until(schedule.due.unwrap_or(now)), if schedule.due.is_some() => {}
        }
    }
    let mut status = sources.build();
    status.state = MemberState::Draining;
    publish(&sink, status).await;
}

/// The least time between two publishes caused by the runner turning busy or idle.
pub const BUSY_GAP: Duration = Duration::from_millis(100);

/// When the status is published next.
#[derive(Debug)]
struct Schedule {
    published: Instant,
    /// `None` while nothing changed since the last publish.
    due: Option<Instant>,
}

impl Schedule {
    /// Due at once (the first publish).
    fn new(now: Instant) -> Schedule {
        Schedule {
            published: now,
            due: Some(now),
        }
    }

    /// Something other than the runner changed: publish now.
    fn changed(&mut self, now: Instant) {
        self.due = Some(now);
    }

    /// The runner turned busy or idle: publish no sooner than [`BUSY_GAP`] after the last.
    fn runner_changed(&mut self) {
        let at = self.published + BUSY_GAP;
        self.due = Some(self.due.map_or(at, |due| due.min(at)));
    }

    /// Whether to publish now; if so, counts it as published.
    fn take_due(&mut self, now: Instant) -> bool {
        if self.due.is_some_and(|due| due <= now) {
            self.published = now;
            self.due = None;
            return true;
        }
        false
    }
}

async fn publish(sink: &StatusSink, status: MemberStatus) {
    match sink {
        StatusSink::Cluster(cluster) => cluster.publish(status).await,
        StatusSink::Alone(cell) => cell.set(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Tier;
    use crate::queue::TierCount;

    #[test]
    fn runner_changes_are_published_at_most_once_per_gap() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut schedule = Schedule::new(t0);
        assert!(schedule.take_due(t0), "the first status goes out at once");
        assert!(!schedule.take_due(t0 + ms(500)), "nothing changed");
        // Busy, idle and busy again within the gap: one publish, at the gap's end.
        schedule.runner_changed();
        schedule.runner_changed();
        schedule.runner_changed();
        assert_eq!(schedule.due, Some(t0 + BUSY_GAP));
        assert!(!schedule.take_due(t0 + ms(99)));
        assert!(schedule.take_due(t0 + ms(100)));
        // Long after the last publish, a runner change is due at once.
        let t1 = t0 + ms(1000);
        schedule.runner_changed();
        assert!(schedule.take_due(t1));
        // Any other change goes out at once, even within the gap.
        schedule.runner_changed();
        assert_eq!(schedule.due, Some(t1 + BUSY_GAP));
        schedule.changed(t1 + ms(10));
        assert!(schedule.take_due(t1 + ms(10)));
        schedule.runner_changed();
        assert_eq!(schedule.due, Some(t1 + ms(10) + BUSY_GAP));
        schedule.changed(t1 + ms(20));
        schedule.runner_changed();
        assert_eq!(
            schedule.due,
            Some(t1 + ms(20)),
            "a runner change never delays"
        );
    }

    #[test]
    fn state_follows_supervisor_and_runner() {
        let ready = SupervisorState::Ready { generation: 1 };
        assert_eq!(member_state(&ready, 0, false), MemberState::Ready);
        assert_eq!(member_state(&ready, 1, false), MemberState::Busy);
        assert_eq!(member_state(&ready, 0, true), MemberState::Draining);
        assert_eq!(
            member_state(&SupervisorState::Starting { generation: 0 }, 0, false),
            MemberState::Starting
        );
        assert_eq!(
            member_state(&SupervisorState::WarmingUp { generation: 1 }, 0, false),
            MemberState::Warming
        );
        let crashed = SupervisorState::Restarting {
            attempt: 1,
            backoff: Duration::from_secs(1),
            reason: "exit 1".into(),
        };
        assert_eq!(member_state(&crashed, 0, false), MemberState::Unhealthy);
    }

    #[test]
    fn queue_summary_becomes_quantised_tiers() {
        let summary = QueueSummary {
            tiers: vec![
                TierCount {
                    tier: Tier::Pro,
                    queued: 2,
                    accounts: 1,
                    oldest_created_at_ms: Some(1_000),
                },
                TierCount {
                    tier: Tier::Free,
                    queued: 0,
                    accounts: 0,
                    oldest_created_at_ms: None,
                },
            ],
            running: 1,
        };
        let queue = queue_of(&summary, 1_000 + 47_900);
        assert_eq!(queue.len(), 1);
        assert_eq!(
            queue.get(&Tier::Pro),
            Some(&TierQueue {
                queued: 2,
                oldest_wait_s: Some(45)
            })
        );
    }
}
