//! The in-memory order of the queued jobs: which job runs next.
//!
//! Pure data structure: no I/O, no clock, no tokio. The store keeps one behind a mutex, rebuilt
//! from the database at open, and persists the few numbers it hands back (ring positions) so a
//! rebuild after a restart gives exactly the same order.
//!
//! # The order
//!
//! 1. Strict tier priority: every queued enterprise job runs before any pro job, pro before
//!    premium, premium before free.
//! 2. Inside a tier, round robin between accounts. The accounts that have queued jobs form a
//!    ring, ordered by a ring position (a number from a counter that only grows). The next job is
//!    the oldest job of the account at the front of the ring; that account then moves to the
//!    back of the ring (it gets a fresh, greatest position) if it has jobs left, and leaves the
//!    ring otherwise. An account that gets a job while it is not in the ring joins at the back.
//!    So between two jobs of one account, every other account that was waiting the whole time
//!    gets exactly one job, and one account's 500 jobs hold back another account's first job by
//!    at most one job per waiting account.
//! 3. Inside an account, oldest first (by the store's sequence number).
//!
//! A job handed back (requeued, e.g. because ComfyUI restarted and lost it) returns to the front
//! of its account's jobs, and its account gets back the ring position it had when the job was
//! taken (or keeps its own if that is earlier), so it runs again as if it had never left.
//!
//! Because passes around the ring keep the accounts' relative order, the order in which a tier
//! is drained is simply: by (index of the job inside its account's queue, ring position of the
//! account). [`Scheduler::position`] uses that to answer without simulating.
//!
//! It must never do I/O or read the time; it is driven only by the calls below.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::protocol::Tier;

/// A queued job as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: String,
    pub tier: Tier,
    pub account: String,
    /// The store's sequence number: submission order, unique.
    pub seq: i64,
    pub created_at_ms: i64,
}

/// The ring position of an account in a tier, to be persisted so that a rebuild is identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RingPos {
    pub tier: Tier,
    pub account: String,
    pub pos: u64,
}

/// A job taken by [`Scheduler::pop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub job: QueuedJob,
    /// The account's ring position when the job was taken; give it back to
    /// [`Scheduler::requeue`] to put the job back at its old place.
    pub ring_pos: u64,
    /// The account's new ring position, when it still has queued jobs.
    pub moved: Option<RingPos>,
}

/// The queue of one tier at a moment, for metrics and wait estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierCount {
    pub tier: Tier,
    pub queued: u64,
    /// Accounts with at least one queued job.
    pub accounts: u64,
    /// `created_at` of the oldest queued job, unix ms.
    pub oldest_created_at_ms: Option<i64>,
}

#[derive(Debug, Default, Clone)]
struct AccountQueue {
    ring_pos: u64,
    jobs: BTreeMap<i64, QueuedJob>,
}

#[derive(Debug, Default, Clone)]
struct TierQueue {
    ring: BTreeMap<u64, String>,
    accounts: HashMap<String, AccountQueue>,
    ages: BTreeSet<(i64, i64)>,
    len: u64,
}

/// The queued jobs in the order they will run. See the module docs for the exact order.
#[derive(Debug, Default, Clone)]
pub struct Scheduler {
    tiers: [TierQueue; 4],
    /// job id → (tier, account, seq)
    index: HashMap<String, (Tier, String, i64)>,
    next_ring_pos: u64,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// Rebuilds the scheduler from stored rows: the queued jobs, the stored ring positions of
    /// accounts, and the greatest ring position ever handed out (`None` for a fresh store).
    /// An account with queued jobs but no stored position joins at the back, in order of its
    /// oldest job; the positions handed out for those are returned to be persisted.
    pub fn rebuild(
        jobs: impl IntoIterator<Item = QueuedJob>,
        ring: impl IntoIterator<Item = RingPos>,
        max_ring_pos: Option<u64>,
    ) -> (Scheduler, Vec<RingPos>) {
        let mut s = Scheduler::new();
        let mut stored: HashMap<(Tier, String), u64> = HashMap::new();
        let mut max_pos = max_ring_pos;
        for r in ring {
            max_pos = Some(max_pos.map_or(r.pos, |m| m.max(r.pos)));
            stored.insert((r.tier, r.account), r.pos);
        }
        s.next_ring_pos = max_pos.map_or(0, |m| m.saturating_add(1));
        let mut jobs: Vec<QueuedJob> = jobs.into_iter().collect();
        jobs.sort_by_key(|j| j.seq);
        let mut assigned = Vec::new();
        for job in jobs {
            let key = (job.tier, job.account.clone());
            let tq = &mut s.tiers[usize::from(job.tier.rank())];
            if !tq.accounts.contains_key(&job.account) {
                let pos = match stored.get(&key) {
                    Some(pos) if !tq.ring.contains_key(pos) => *pos,
                    _ => {
                        let pos = s.next_ring_pos;
                        s.next_ring_pos = s.next_ring_pos.saturating_add(1);
                        assigned.push(RingPos {
                            tier: job.tier,
                            account: job.account.clone(),
                            pos,
                        });
                        pos
                    }
                };
                tq.ring.insert(pos, job.account.clone());
                tq.accounts.insert(
                    job.account.clone(),
                    AccountQueue {
                        ring_pos: pos,
                        jobs: BTreeMap::new(),
                    },
                );
            }
            s.insert_job(job);
        }
        (s, assigned)
    }

    fn insert_job(&mut self, job: QueuedJob) {
        let tq = &mut self.tiers[usize::from(job.tier.rank())];
        if let Some(aq) = tq.accounts.get_mut(&job.account) {
            self.index
                .insert(job.id.clone(), (job.tier, job.account.clone(), job.seq));
            tq.ages.insert((job.created_at_ms, job.seq));
            tq.len += 1;
            aq.jobs.insert(job.seq, job);
        }
    }

    /// Number of queued jobs.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// The greatest ring position handed out so far, if any.
    pub fn max_ring_pos(&self) -> Option<u64> {
        self.next_ring_pos.checked_sub(1)
    }

    /// Queues a new job (its `seq` must be greater than every seq seen so far in its account).
    /// Returns the account's ring position when the account joined the ring (to be persisted).
    pub fn push(&mut self, job: QueuedJob) -> Option<RingPos> {
        if self.index.contains_key(&job.id) {
            return None;
        }
        let tq = &mut self.tiers[usize::from(job.tier.rank())];
        let mut joined = None;
        if !tq.accounts.contains_key(&job.account) {
            let pos = self.next_ring_pos;
            self.next_ring_pos = self.next_ring_pos.saturating_add(1);
            tq.ring.insert(pos, job.account.clone());
            tq.accounts.insert(
                job.account.clone(),
                AccountQueue {
                    ring_pos: pos,
                    jobs: BTreeMap::new(),
                },
            );
            joined = Some(RingPos {
                tier: job.tier,
                account: job.account.clone(),
                pos,
            });
        }
        self.insert_job(job);
        joined
    }

    /// The job that [`Scheduler::pop`] would take, without taking it.
    pub fn peek(&self) -> Option<&QueuedJob> {
        for tier in Tier::BY_PRIORITY {
            let tq = &self.tiers[usize::from(tier.rank())];
            if let Some((_, account)) = tq.ring.first_key_value() {
                return tq
                    .accounts
                    .get(account)
                    .and_then(|aq| aq.jobs.first_key_value())
                    .map(|(_, job)| job);
            }
        }
        None
    }

    /// Takes the next job to run.
    pub fn pop(&mut self) -> Option<Taken> {
        let tier = Tier::BY_PRIORITY
            .into_iter()
            .find(|t| !self.tiers[usize::from(t.rank())].ring.is_empty())?;
        let next_pos = self.next_ring_pos;
        let tq = &mut self.tiers[usize::from(tier.rank())];
        let (ring_pos, account) = tq.ring.pop_first()?;
        let aq = tq.accounts.get_mut(&account)?;
        let (_, job) = aq.jobs.pop_first()?;
        tq.len = tq.len.saturating_sub(1);
        tq.ages.remove(&(job.created_at_ms, job.seq));
        self.index.remove(&job.id);
        let moved = if aq.jobs.is_empty() {
            tq.accounts.remove(&account);
            None
        } else {
            aq.ring_pos = next_pos;
            tq.ring.insert(next_pos, account.clone());
            self.next_ring_pos = next_pos.saturating_add(1);
            Some(RingPos {
                tier,
                account,
                pos: next_pos,
            })
        };
        Some(Taken {
            job,
            ring_pos,
            moved,
        })
    }

    /// Puts a taken job back at its old place: first of its account's jobs, with its account at
    /// `ring_pos` (the position it had when the job was taken) unless its own is earlier.
    /// Returns the account's ring position when it changed.
    pub fn requeue(&mut self, job: QueuedJob, ring_pos: u64) -> Option<RingPos> {
        if self.index.contains_key(&job.id) {
            return None;
        }
        let tier = job.tier;
        let account = job.account.clone();
        let taken_by_other = self.tiers[usize::from(tier.rank())]
            .ring
            .get(&ring_pos)
            .is_some_and(|other| *other != account);
        let ring_pos = if taken_by_other {
            // Cannot happen with positions from this scheduler; join at the back rather than
            // overwrite another account's place.
            self.next_ring_pos
        } else {
            ring_pos
        };
        if ring_pos >= self.next_ring_pos {
            self.next_ring_pos = ring_pos.saturating_add(1);
        }
        let tq = &mut self.tiers[usize::from(tier.rank())];
        let changed = match tq.accounts.get_mut(&account) {
            Some(aq) if aq.ring_pos <= ring_pos => None,
            Some(aq) => {
                tq.ring.remove(&aq.ring_pos);
                aq.ring_pos = ring_pos;
                tq.ring.insert(ring_pos, account.clone());
                Some(ring_pos)
            }
            None => {
                tq.ring.insert(ring_pos, account.clone());
                tq.accounts.insert(
                    account.clone(),
                    AccountQueue {
                        ring_pos,
                        jobs: BTreeMap::new(),
                    },
                );
                Some(ring_pos)
            }
        };
        self.insert_job(job);
        changed.map(|pos| RingPos { tier, account, pos })
    }

    /// Removes a queued job (cancel). Returns it, or `None` when it is not queued.
    pub fn remove(&mut self, id: &str) -> Option<QueuedJob> {
        let (tier, account, seq) = self.index.remove(id)?;
        let tq = &mut self.tiers[usize::from(tier.rank())];
        let aq = tq.accounts.get_mut(&account)?;
        let job = aq.jobs.remove(&seq)?;
        tq.len = tq.len.saturating_sub(1);
        tq.ages.remove(&(job.created_at_ms, job.seq));
        if aq.jobs.is_empty() {
            let pos = aq.ring_pos;
            tq.ring.remove(&pos);
            tq.accounts.remove(&account);
        }
        Some(job)
    }

    /// Jobs queued in tiers above `tier`.
    fn above(&self, tier: Tier) -> u64 {
        Tier::BY_PRIORITY
            .into_iter()
            .filter(|t| *t > tier)
            .map(|t| self.tiers[usize::from(t.rank())].len)
            .sum()
    }

    /// Jobs of `tq` drained before the job at index `k` of an account at ring position `pos`.
    fn ahead_in_tier(tq: &TierQueue, k: u64, pos: u64) -> u64 {
        tq.accounts
            .values()
            .filter(|aq| aq.ring_pos != pos)
            .map(|aq| {
                let n = aq.jobs.len() as u64;
                n.min(k) + u64::from(aq.ring_pos < pos && n > k)
            })
            .sum()
    }

    /// The 1-based place of a queued job in the order [`Scheduler::pop`] would take the jobs
    /// queued now; `None` when it is not queued. Costs one pass over the accounts of its tier.
    pub fn position(&self, id: &str) -> Option<u64> {
        let (tier, account, seq) = self.index.get(id)?;
        let tq = &self.tiers[usize::from(tier.rank())];
        let aq = tq.accounts.get(account)?;
        let k = aq.jobs.range(..*seq).count() as u64;
        Some(self.above(*tier) + Self::ahead_in_tier(tq, k, aq.ring_pos) + k + 1)
    }

    /// How many queued jobs would run before a new job of `account` in `tier`, submitted now.
    pub fn queued_ahead(&self, tier: Tier, account: &str) -> u64 {
        let tq = &self.tiers[usize::from(tier.rank())];
        let (k, pos) = match tq.accounts.get(account) {
            Some(aq) => (aq.jobs.len() as u64, aq.ring_pos),
            None => (0, u64::MAX),
        };
        self.above(tier) + Self::ahead_in_tier(tq, k, pos) + k
    }

    /// Per-tier counts, highest priority first.
    pub fn counts(&self) -> Vec<TierCount> {
        Tier::BY_PRIORITY
            .into_iter()
            .map(|tier| {
                let tq = &self.tiers[usize::from(tier.rank())];
                TierCount {
                    tier,
                    queued: tq.len,
                    accounts: tq.accounts.len() as u64,
                    oldest_created_at_ms: tq.ages.first().map(|(at, _)| *at),
                }
            })
            .collect()
    }

    /// The ring positions of the accounts now in the ring (what a rebuild needs).
    pub fn ring(&self) -> Vec<RingPos> {
        let mut out = Vec::new();
        for tier in Tier::BY_PRIORITY {
            for (pos, account) in &self.tiers[usize::from(tier.rank())].ring {
                out.push(RingPos {
                    tier,
                    account: account.clone(),
                    pos: *pos,
                });
            }
        }
        out
    }

    /// Every queued job, in the order they would be taken (for tests and operators).
    pub fn order(&self) -> Vec<QueuedJob> {
        let mut copy = self.clone();
        let mut out = Vec::with_capacity(self.len());
        while let Some(taken) = copy.pop() {
            out.push(taken.job);
        }
        out
    }
}
