//! Property tests of the scheduler's order: strict tiers, round robin between accounts inside a
//! tier, FIFO inside an account, positions that match the take order, and a rebuild from the
//! persisted rows that changes nothing.

use std::collections::{BTreeMap, HashMap};

use kiln_daemon::protocol::Tier;
use kiln_daemon::queue::{QueuedJob, RingPos, Scheduler};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Submit {
        tier: u8,
        account: u8,
    },
    Pop,
    /// Cancel the n-th queued job (modulo the number queued).
    Cancel(usize),
    /// Requeue the n-th running job (modulo the number running).
    Requeue(usize),
    /// Rebuild from the persisted rows, as after a restart.
    Restart,
}

fn op(with_requeue: bool) -> impl Strategy<Value = Op> {
    let requeue_weight = if with_requeue { 1 } else { 0 };
    prop_oneof![
        6 => (0u8..4, 0u8..5).prop_map(|(tier, account)| Op::Submit { tier, account }),
        4 => Just(Op::Pop),
        1 => any::<usize>().prop_map(Op::Cancel),
        requeue_weight => any::<usize>().prop_map(Op::Requeue),
        1 => Just(Op::Restart),
    ]
}

/// What the store would have persisted: queued rows, ring rows, running jobs with their
/// ring position at take time.
#[derive(Default)]
struct Persisted {
    queued: BTreeMap<String, QueuedJob>,
    ring: HashMap<(Tier, String), u64>,
    running: BTreeMap<String, (QueuedJob, u64)>,
}

impl Persisted {
    fn save(&mut self, r: Option<RingPos>) {
        if let Some(r) = r {
            self.ring.insert((r.tier, r.account), r.pos);
        }
    }

    fn max_pos(&self) -> Option<u64> {
        self.ring
            .values()
            .copied()
            .chain(self.running.values().map(|(_, p)| *p))
            .max()
    }

    fn rebuild(&mut self) -> Scheduler {
        let ring: Vec<RingPos> = self
            .ring
            .iter()
            .map(|((tier, account), pos)| RingPos {
                tier: *tier,
                account: account.clone(),
                pos: *pos,
            })
            .collect();
        let (s, assigned) = Scheduler::rebuild(self.queued.values().cloned(), ring, self.max_pos());
        for r in assigned {
            self.save(Some(r));
        }
        s
    }
}

fn tier(n: u8) -> Tier {
    Tier::from_rank(n).expect("rank 0..4")
}

/// Checks every invariant that holds at any moment.
fn check_positions(s: &Scheduler) -> Result<(), TestCaseError> {
    let order = s.order();
    prop_assert_eq!(order.len(), s.len());
    for (i, job) in order.iter().enumerate() {
        prop_assert_eq!(
            s.position(&job.id),
            Some(i as u64 + 1),
            "position of {}",
            job.id
        );
    }
    // queued_ahead agrees with the position a new job would get.
    for t in 0..4u8 {
        for a in 0..6u8 {
            let mut copy = s.clone();
            let account = format!("acct{a}");
            let ahead = copy.queued_ahead(tier(t), &account);
            copy.push(QueuedJob {
                id: "probe".into(),
                tier: tier(t),
                account,
                seq: i64::MAX,
                created_at_ms: 0,
            });
            prop_assert_eq!(copy.position("probe"), Some(ahead + 1));
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>, check_fairness: bool) -> Result<(), TestCaseError> {
    let mut s = Scheduler::new();
    // A twin that never restarts: a rebuild must not change what happens next.
    let mut twin = Scheduler::new();
    let mut p = Persisted::default();
    let mut seq = 0i64;
    // Fairness bookkeeping, per tier: when each account was last taken, and since when it has
    // been waiting without a break.
    let mut last_take: HashMap<(Tier, String), usize> = HashMap::new();
    let mut waiting_since: HashMap<(Tier, String), usize> = HashMap::new();
    let count_waiting = |p: &Persisted, t: Tier, a: &str| {
        p.queued
            .values()
            .filter(|j| j.tier == t && j.account == a)
            .count()
    };
    for (now, op) in ops.into_iter().enumerate() {
        match op {
            Op::Submit { tier: t, account } => {
                seq += 1;
                let job = QueuedJob {
                    id: format!("job{seq}"),
                    tier: tier(t),
                    account: format!("acct{account}"),
                    seq,
                    created_at_ms: seq * 10,
                };
                let key = (job.tier, job.account.clone());
                waiting_since.entry(key).or_insert(now);
                p.queued.insert(job.id.clone(), job.clone());
                let r = s.push(job.clone());
                twin.push(job);
                p.save(r);
            }
            Op::Pop => {
                let expected_tier = p.queued.values().map(|j| j.tier).max();
                let taken = s.pop();
                let twin_taken = twin.pop();
                prop_assert_eq!(
                    taken.as_ref().map(|t| &t.job),
                    twin_taken.as_ref().map(|t| &t.job)
                );
                let Some(taken) = taken else {
                    prop_assert!(p.queued.is_empty());
                    continue;
                };
                let job = taken.job.clone();
                // Strict tiers.
                prop_assert_eq!(Some(job.tier), expected_tier);
                // FIFO inside the account.
                let oldest = p
                    .queued
                    .values()
                    .filter(|j| j.tier == job.tier && j.account == job.account)
                    .map(|j| j.seq)
                    .min();
                prop_assert_eq!(oldest, Some(job.seq));
                p.queued.remove(&job.id);
                p.save(taken.moved.clone());
                p.running
                    .insert(job.id.clone(), (job.clone(), taken.ring_pos));
                let key = (job.tier, job.account.clone());
                if check_fairness && let Some(&t1) = last_take.get(&key) {
                    for ((t, b), &since) in &waiting_since {
                        if *t == job.tier && *b != job.account && since < t1 {
                            let taken_since =
                                last_take.get(&(*t, b.clone())).is_some_and(|&l| l > t1);
                            prop_assert!(
                                taken_since,
                                "{} taken twice while {} waited",
                                job.account,
                                b
                            );
                        }
                    }
                }
                last_take.insert(key.clone(), now);
                if count_waiting(&p, job.tier, &job.account) == 0 {
                    waiting_since.remove(&key);
                }
            }
            Op::Cancel(n) => {
                if p.queued.is_empty() {
                    continue;
                }
                let id = p
                    .queued
                    .keys()
                    .nth(n % p.queued.len())
                    .cloned()
                    .expect("non-empty");
                let job = p.queued.remove(&id).expect("present");
                prop_assert_eq!(s.remove(&id), Some(job.clone()));
                prop_assert_eq!(twin.remove(&id), Some(job.clone()));
                prop_assert_eq!(s.position(&id), None);
                if count_waiting(&p, job.tier, &job.account) == 0 {
                    waiting_since.remove(&(job.tier, job.account));
                }
            }
            Op::Requeue(n) => {
                if p.running.is_empty() {
                    continue;
                }
                let id = p
                    .running
                    .keys()
                    .nth(n % p.running.len())
                    .cloned()
                    .expect("non-empty");
                let (job, pos) = p.running.remove(&id).expect("present");
                p.queued.insert(id.clone(), job.clone());
                let r = s.requeue(job.clone(), pos);
                twin.requeue(job, pos);
                p.save(r);
            }
            Op::Restart => {
                let before = s.order();
                s = p.rebuild();
                prop_assert_eq!(s.order(), before);
            }
        }
        prop_assert_eq!(s.order(), twin.order());
        check_positions(&s)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn order_is_strict_fair_fifo_and_survives_restart(
        ops in prop::collection::vec(op(false), 1..120)
    ) {
        run(ops, true)?;
    }

    #[test]
    fn requeue_keeps_invariants_and_restart_order(
        ops in prop::collection::vec(op(true), 1..120)
    ) {
        run(ops, false)?;
    }
}

/// One account's many jobs hold back another account's first job by one job only.
#[test]
fn many_jobs_of_one_account_do_not_block_another() {
    let mut s = Scheduler::new();
    for i in 0..500 {
        s.push(QueuedJob {
            id: format!("a{i}"),
            tier: Tier::Free,
            account: "a".into(),
            seq: i,
            created_at_ms: i,
        });
    }
    s.push(QueuedJob {
        id: "b0".into(),
        tier: Tier::Free,
        account: "b".into(),
        seq: 1000,
        created_at_ms: 1000,
    });
    assert_eq!(s.position("b0"), Some(2));
    let first: Vec<String> = (0..3).map(|_| s.pop().expect("queued").job.id).collect();
    assert_eq!(first, vec!["a0", "b0", "a1"]);
}

/// A requeued job runs again before the jobs that were behind it.
#[test]
fn requeue_returns_to_old_place() {
    let mut s = Scheduler::new();
    for (i, account) in ["a", "b", "a", "c"].iter().enumerate() {
        s.push(QueuedJob {
            id: format!("j{i}"),
            tier: Tier::Pro,
            account: (*account).into(),
            seq: i as i64,
            created_at_ms: i as i64,
        });
    }
    let before = s.order();
    let taken = s.pop().expect("queued");
    assert_eq!(taken.job.id, "j0");
    s.requeue(taken.job, taken.ring_pos);
    assert_eq!(s.order(), before);
}
