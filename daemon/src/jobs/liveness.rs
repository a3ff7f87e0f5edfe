//! Which members count as dead for the job layer.
//!
//! Gossip's failure detector says whether a member is live *now*. A member it lists but has
//! not sampled yet (this node just started, or the member just restarted under a new
//! generation) also reads not live, yet it is not dead: adopting its jobs, or moving their
//! copies away from it, would act on a member that is about to show up. So a member counts
//! as dead when it was seen live in its current generation and is not live now, or when it
//! has stayed not live, never seen live, for [`UNSEEN_DEAD_AFTER`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::cluster::ClusterMember;

/// How long a member gossip lists must stay not live, never having been seen live by this
/// node, before it counts as dead.
pub(crate) const UNSEEN_DEAD_AFTER: Duration = Duration::from_secs(10);

/// What this node saw of each member's liveness, by name and generation.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    seen_live: HashSet<(String, u64)>,
    not_live_since: HashMap<(String, u64), Instant>,
}

impl Liveness {
    /// Records one view of the cluster taken at `now`; forgets generations it no longer lists.
    pub(crate) fn observe<'a>(
        &mut self,
        members: impl IntoIterator<Item = &'a ClusterMember>,
        now: Instant,
    ) {
        let mut current = HashSet::new();
        for m in members {
            let key = (m.status.name.clone(), m.generation);
            if m.live {
                self.not_live_since.remove(&key);
                self.seen_live.insert(key.clone());
            } else {
                self.not_live_since.entry(key.clone()).or_insert(now);
            }
            current.insert(key);
        }
        self.seen_live.retain(|key| current.contains(key));
        self.not_live_since.retain(|key, _| current.contains(key));
    }

    /// Whether `member` is dead at `now` (see the module's documentation).
    pub(crate) fn is_dead(&self, member: &ClusterMember, now: Instant) -> bool {
        if member.live {
            return false;
        }
        let key = (member.status.name.clone(), member.generation);
        self.seen_live.contains(&key)
            || self
                .not_live_since
                .get(&key)
                .is_some_and(|since| now.duration_since(*since) >= UNSEEN_DEAD_AFTER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::cluster::{MemberState, MemberStatus, Role};

    fn member(name: &str, generation: u64, live: bool) -> ClusterMember {
        ClusterMember {
            status: MemberStatus {
                name: name.to_string(),
                role: Role::Node,
                state: MemberState::Ready,
                api_url: None,
                version: "test".to_string(),
                provider: None,
                instance_id: None,
                price_per_hour: None,
                gpu_note: None,
                gpus: Vec::new(),
                queue: Default::default(),
                running: 0,
            },
            generation,
            gossip_addr: "quic://127.0.0.1:1".to_string(),
            live,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_never_seen_live_is_dead_only_after_the_grace() {
        let mut liveness = Liveness::default();
        let start = Instant::now();
        let gpu1 = member("gpu-1", 1, false);
        liveness.observe([&gpu1], start);
        assert!(!liveness.is_dead(&gpu1, start));
        let later = start + UNSEEN_DEAD_AFTER - Duration::from_millis(1);
        liveness.observe([&gpu1], later);
        assert!(!liveness.is_dead(&gpu1, later));
        let after = start + UNSEEN_DEAD_AFTER;
        liveness.observe([&gpu1], after);
        assert!(liveness.is_dead(&gpu1, after));
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_seen_live_is_dead_as_soon_as_it_is_not() {
        let mut liveness = Liveness::default();
        let now = Instant::now();
        liveness.observe([&member("gpu-1", 1, true)], now);
        let down = member("gpu-1", 1, false);
        liveness.observe([&down], now);
        assert!(liveness.is_dead(&down, now));
        assert!(!liveness.is_dead(&member("gpu-1", 1, true), now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_generation_starts_unseen() {
        let mut liveness = Liveness::default();
        let now = Instant::now();
        liveness.observe([&member("gpu-1", 1, true)], now);
        // Restarted: gossip lists the new generation before its heartbeats were sampled.
        let restarted = member("gpu-1", 2, false);
        liveness.observe([&restarted], now);
        assert!(!liveness.is_dead(&restarted, now));
        // The old generation was forgotten with it.
        assert!(!liveness.is_dead(&member("gpu-1", 1, false), now));
    }
}
