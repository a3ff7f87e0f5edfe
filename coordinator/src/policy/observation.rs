//! What the policy and the alerts see of the cluster: the GPU members and their queues, built
//! from a [`ClusterView`] by `kiln run`, or directly by the simulator.

use std::collections::BTreeMap;

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::{ClusterView, MemberState, Role};
use serde::{Deserialize, Serialize};

/// Waiting jobs of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct QueueObs {
    pub queued: u64,
    /// Age of the oldest waiting job, seconds.
    pub oldest_wait_s: Option<u64>,
}

impl QueueObs {
    /// Adds another member's queue: counts sum, the oldest wait is the larger.
    pub fn merge(&mut self, other: QueueObs) {
        self.queued = self.queued.saturating_add(other.queued);
        self.oldest_wait_s = match (self.oldest_wait_s, other.oldest_wait_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// One live GPU member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberObs {
    /// The node name, which is the inventory's host name.
    pub name: String,
    pub state: MemberState,
    /// Jobs running on it now.
    pub running: u32,
    /// Mean utilization of its GPUs, percent; `None` when it reports no reading.
    pub gpu_util_pct: Option<u32>,
    /// Jobs it owns that wait, per tier.
    pub queue: BTreeMap<Tier, QueueObs>,
}

impl MemberObs {
    /// Nothing running and nothing waiting here.
    pub fn is_idle(&self) -> bool {
        self.running == 0 && self.queue.values().all(|q| q.queued == 0)
    }
}

/// The cluster at one instant, as the policy needs it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Observation {
    /// Live GPU members, by name.
    pub members: Vec<MemberObs>,
    /// GPU members the failure detector considers dead (still in the view), by name.
    pub dead: Vec<String>,
    /// The whole cluster's waiting jobs per tier: counts summed, oldest wait the maximum.
    pub queue: BTreeMap<Tier, QueueObs>,
}

impl Observation {
    /// Builds an observation from live members, computing the cluster-wide queue.
    pub fn new(members: Vec<MemberObs>, dead: Vec<String>) -> Observation {
        let mut queue: BTreeMap<Tier, QueueObs> = BTreeMap::new();
        for member in &members {
            for (tier, q) in &member.queue {
                queue.entry(*tier).or_default().merge(*q);
            }
        }
        Observation {
            members,
            dead,
            queue,
        }
    }

    /// The GPU members of a cluster view (coordinators and operators' CLIs are left out).
    pub fn from_view(view: &ClusterView) -> Observation {
        let mut members = Vec::new();
        let mut dead = Vec::new();
        for member in &view.members {
            let status = &member.status;
            if status.role != Role::Node {
                continue;
            }
            if !member.live {
                dead.push(status.name.clone());
                continue;
            }
            let readings: Vec<u32> = status.gpus.iter().filter_map(|g| g.util_pct).collect();
            let gpu_util_pct = if readings.is_empty() {
                None
            } else {
                // At most a handful of GPUs per host: the sum cannot overflow u64.
                let sum: u64 = readings.iter().map(|&u| u64::from(u)).sum();
                u32::try_from(sum / readings.len() as u64).ok()
            };
            members.push(MemberObs {
                name: status.name.clone(),
                state: status.state,
                running: status.running,
                gpu_util_pct,
                queue: status
                    .queue
                    .iter()
                    .map(|(tier, q)| {
                        (
                            *tier,
                            QueueObs {
                                queued: q.queued,
                                oldest_wait_s: q.oldest_wait_s,
                            },
                        )
                    })
                    .collect(),
            });
        }
        // A member that restarted may appear dead (old incarnation) and live (new one).
        dead.retain(|name| !members.iter().any(|m| &m.name == name));
        dead.sort();
        dead.dedup();
        Observation::new(members, dead)
    }

    pub fn member(&self, name: &str) -> Option<&MemberObs> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Waiting jobs of one tier, cluster-wide.
    pub fn tier(&self, tier: Tier) -> QueueObs {
        self.queue.get(&tier).copied().unwrap_or_default()
    }

    /// Waiting jobs of the given tiers, cluster-wide.
    pub fn queued(&self, tiers: &[Tier]) -> u64 {
        tiers
            .iter()
            .map(|t| self.tier(*t).queued)
            .fold(0u64, u64::saturating_add)
    }

    /// Waiting jobs of every tier.
    pub fn total_queued(&self) -> u64 {
        self.queued(&Tier::BY_PRIORITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_daemon::protocol::cluster::{ClusterMember, GpuStatus, MemberStatus, TierQueue};

    fn member(
        name: &str,
        role: Role,
        live: bool,
        queue: &[(Tier, u64, Option<u64>)],
    ) -> ClusterMember {
        ClusterMember {
            status: MemberStatus {
                name: name.to_string(),
                role,
                state: MemberState::Busy,
                api_url: None,
                version: "0.1.0".to_string(),
                provider: Some("vast".to_string()),
                instance_id: None,
                price_per_hour: Some(0.4),
                gpu_note: None,
                gpus: vec![
                    GpuStatus {
                        index: 0,
                        util_pct: Some(90),
                        ..GpuStatus::default()
                    },
                    GpuStatus {
                        index: 1,
                        util_pct: Some(40),
                        ..GpuStatus::default()
                    },
                    GpuStatus {
                        index: 2,
                        util_pct: None,
                        ..GpuStatus::default()
                    },
                ],
                queue: queue
                    .iter()
                    .map(|(t, n, w)| {
                        (
                            *t,
                            TierQueue {
                                queued: *n,
                                oldest_wait_s: *w,
                            },
                        )
                    })
                    .collect(),
                running: 1,
            },
            generation: 1,
            gossip_addr: "quic://127.0.0.1:1".to_string(),
            live,
        }
    }

    #[test]
    fn from_view_sums_queues_and_keeps_only_gpu_members() {
        let view = ClusterView {
            cluster_id: "c".to_string(),
            observed_by: "gpu-1".to_string(),
            observed_at: "2026-01-01T00:00:00Z".to_string(),
            members: vec![
                member(
                    "gpu-1",
                    Role::Node,
                    true,
                    &[(Tier::Pro, 2, Some(15)), (Tier::Free, 4, None)],
                ),
                member("gpu-2", Role::Node, true, &[(Tier::Pro, 3, Some(40))]),
                member(
                    "kiln",
                    Role::Coordinator,
                    true,
                    &[(Tier::Pro, 99, Some(999))],
                ),
                member("gpu-3", Role::Node, false, &[(Tier::Pro, 50, Some(500))]),
                member("gpu-2", Role::Node, false, &[]),
            ],
        };
        let obs = Observation::from_view(&view);
        assert_eq!(obs.members.len(), 2);
        assert_eq!(obs.dead, vec!["gpu-3".to_string()]);
        assert_eq!(
            obs.tier(Tier::Pro),
            QueueObs {
                queued: 5,
                oldest_wait_s: Some(40)
            }
        );
        assert_eq!(
            obs.tier(Tier::Free),
            QueueObs {
                queued: 4,
                oldest_wait_s: None
            }
        );
        assert_eq!(obs.total_queued(), 9);
        // Mean of the GPUs that report: (90 + 40) / 2.
        assert_eq!(
            obs.member("gpu-1").expect("test value").gpu_util_pct,
            Some(65)
        );
        assert_eq!(obs.member("gpu-1").expect("test value").running, 1);
    }
}
