//! The discrete-event engine: a simulated clock in milliseconds, a binary heap of timed events
//! (policy ticks, job completions, hosts becoming ready, spot preemptions) merged with the
//! trace's arrivals, and the provider behaviours that carry out the policy's actions.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::MemberState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::trace::{DAY_MS, Trace};
use super::{JobCounts, PolicyResult, SimConfig, TierResult};
use crate::fleet::{HostRecord, HostState};
use crate::policy::{self, Action, MemberObs, Observation, PolicyConfig, PolicyState, QueueObs};
use crate::provider::ProviderKind;

const HOUR_MS: f64 = 3_600_000.0;

/// What drives the fleet in one run.
#[derive(Debug, Clone)]
pub enum Driver {
    /// `n` HOT spot hosts from the start, never scaled; a preempted one is rented again at once.
    AlwaysOn(u32),
    /// The real policy ([`policy::plan`]) with this configuration, starting from one HOT spot
    /// primary.
    Plan(Box<PolicyConfig>),
}

/// One sample of the run for the plot, taken at every tick.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    pub t_h: f64,
    /// Arrivals since the previous sample, per hour.
    pub demand_per_h: f64,
    pub queued: u64,
    /// HOT hosts (draining included) in the cluster view.
    pub hot: u32,
    pub provisioning: u32,
    pub warm: u32,
    pub cumulative_usd: f64,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    arrival_ms: i64,
    start_ms: i64,
    service_ms: u32,
    tier: Tier,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    at_ms: i64,
    service_ms: u32,
}

#[derive(Debug, Clone)]
struct Host {
    rec: HostRecord,
    /// Preempted: gone at the provider, unbilled, missing from the view; the inventory still
    /// shows its last state until the policy replaces or releases it.
    gone: bool,
    job: Option<Running>,
    /// Bumped on every state change: cancels the host's scheduled ready and preemption.
    generation: u64,
    /// Bumped on every job start and preemption: a completion event must carry the current one
    /// (a drain changes the state, not the job).
    job_token: u64,
    /// Where a drain ends once the running job is done (WARM for a stop, released).
    drain_to: Option<HostState>,
    /// The resume under way will not come back (the host ends FAILED).
    resume_fails: bool,
    accrued_to_ms: i64,
    /// Busy time inside the current tick window, for the utilization the member reports.
    busy_window_ms: i64,
    gpu_ms: i64,
    stopped_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Ordered before the others at the same instant: a finished job frees its host first.
    JobDone {
        host: usize,
        token: u64,
    },
    Ready {
        host: usize,
        generation: u64,
    },
    Preempt {
        host: usize,
        generation: u64,
    },
    Tick,
}

/// Keys of the instance-hours map, one per state plus `preempted`.
fn bucket(host: &Host) -> &'static str {
    if host.gone {
        "preempted"
    } else {
        host.rec.state.as_str()
    }
}

pub struct Engine<'a> {
    config: &'a SimConfig,
    trace: &'a Trace,
    driver: Driver,
    rng: StdRng,
    now: i64,
    end: i64,
    seq: u64,
    heap: BinaryHeap<Reverse<(i64, u64, Event)>>,
    hosts: Vec<Host>,
    /// Indexes of hosts not released.
    active: Vec<usize>,
    queues: [VecDeque<Queued>; 4],
    state: PolicyState,
    last_tick_ms: i64,
    arrivals_since_tick: u64,
    /// kilnd's moving mean of job durations (weight 1/5 per sample), seconds.
    mean_service_s: f64,
    free_today: HashMap<(u32, i64), u32>,
    waits_ms: [Vec<u32>; 4],
    counts: [TierCountsRaw; 4],
    day_usd: Vec<f64>,
    hours: BTreeMap<String, f64>,
    actions: BTreeMap<String, u64>,
    rent_failures: u64,
    resume_failures: u64,
    preemptions: u64,
    busy_ms: i64,
    hot_ms: i64,
    samples: Vec<Sample>,
    next_name: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct TierCountsRaw {
    arrived: u64,
    served: u64,
    refused_busy: u64,
    refused_quota: u64,
}

/// Tier order of the scheduler (and of the queues array): highest priority first.
const ORDER: [Tier; 4] = Tier::BY_PRIORITY;

fn slot(tier: Tier) -> usize {
    match tier {
        Tier::Enterprise => 0,
        Tier::Pro => 1,
        Tier::Premium => 2,
        Tier::Free => 3,
    }
}

impl<'a> Engine<'a> {
    pub fn new(config: &'a SimConfig, trace: &'a Trace, driver: Driver, seed: u64) -> Engine<'a> {
        let days = config.days;
        let mut engine = Engine {
            config,
            trace,
            driver,
            // Provider behaviours draw from their own stream, so a policy's choices do not
            // shift the trace, and every policy sees the same seed.
            rng: StdRng::seed_from_u64(seed ^ 0x6b69_6c6e_5349_4d00),
            now: 0,
            end: i64::from(days) * DAY_MS,
            seq: 0,
            heap: BinaryHeap::new(),
            hosts: Vec::new(),
            active: Vec::new(),
            queues: Default::default(),
            state: PolicyState::default(),
            last_tick_ms: 0,
            arrivals_since_tick: 0,
            mean_service_s: config.assumed_duration_s,
            free_today: HashMap::new(),
            waits_ms: Default::default(),
            counts: Default::default(),
            day_usd: vec![0.0; days as usize],
            hours: BTreeMap::new(),
            actions: BTreeMap::new(),
            rent_failures: 0,
            resume_failures: 0,
            preemptions: 0,
            busy_ms: 0,
            hot_ms: 0,
            samples: Vec::new(),
            next_name: 1,
        };
        let initial = match &engine.driver {
            Driver::AlwaysOn(n) => *n,
            Driver::Plan(_) => 1,
        };
        for i in 0..initial {
            let name = format!("primary-{}", i + 1);
            let idx = engine.add_host(name, ProviderKind::Vast, true, HostState::Hot);
            engine.hosts[idx].rec.primary = i == 0;
            engine.hosts[idx].rec.ready_at_ms = Some(0);
            engine.schedule_preemption(idx);
        }
        engine.push(0, Event::Tick);
        engine
    }

    fn push(&mut self, at: i64, event: Event) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, event)));
    }

    fn price(&self, spot: bool) -> f64 {
        if spot {
            self.config.spot_usd_per_hour
        } else {
            self.config.on_demand_usd_per_hour
        }
    }

    fn add_host(
        &mut self,
        name: String,
        provider: ProviderKind,
        spot: bool,
        state: HostState,
    ) -> usize {
        let rec = HostRecord {
            name,
            provider,
            provider_id: None,
            state,
            state_since_ms: self.now,
            rented_at_ms: self.now,
            ready_at_ms: None,
            primary: false,
            spot,
            price_per_hour: self.price(spot),
            stopped_price_per_hour: self.config.storage_usd_per_hour(),
        };
        self.hosts.push(Host {
            rec,
            gone: false,
            job: None,
            generation: 0,
            job_token: 0,
            drain_to: None,
            resume_fails: false,
            accrued_to_ms: self.now,
            busy_window_ms: 0,
            gpu_ms: 0,
            stopped_ms: 0,
        });
        let idx = self.hosts.len() - 1;
        self.active.push(idx);
        idx
    }

    fn uniform_ms(&mut self, (lo, hi): (u64, u64)) -> i64 {
        let secs = if hi > lo {
            self.rng.random_range(lo..=hi)
        } else {
            lo
        };
        i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 4)
    }

    fn schedule_preemption(&mut self, idx: usize) {
        let rate = self.config.spot_preemptions_per_hour;
        if !self.hosts[idx].rec.spot || rate <= 0.0 {
            return;
        }
        let u: f64 = self.rng.random();
        let after = -(1.0 - u).ln() / rate * HOUR_MS;
        if after.is_finite() && after < (self.end - self.now) as f64 {
            let generation = self.hosts[idx].generation;
            self.push(
                self.now + after as i64,
                Event::Preempt {
                    host: idx,
                    generation,
                },
            );
        }
    }

    /// Bills and counts a host's time up to now, splitting cost at midnight.
    fn accrue(&mut self, idx: usize) {
        let now = self.now;
        let host = &mut self.hosts[idx];
        let from = host.accrued_to_ms;
        if now <= from || host.rec.state == HostState::Released {
            host.accrued_to_ms = now.max(from);
            return;
        }
        let dt = now - from;
        *self.hours.entry(bucket(host).to_string()).or_insert(0.0) += dt as f64 / HOUR_MS;
        let rate = if host.gone {
            0.0
        } else if host.rec.state.bills_gpu() {
            host.gpu_ms += dt;
            if host.rec.state != HostState::Provisioning {
                self.hot_ms += dt;
            }
            host.rec.price_per_hour
        } else {
            host.stopped_ms += dt;
            host.rec.stopped_price_per_hour
        };
        host.accrued_to_ms = now;
        let mut t = from;
        while t < now {
            let day = t.div_euclid(DAY_MS);
            let seg_end = now.min((day + 1) * DAY_MS);
            if let Some(slot) = usize::try_from(day)
                .ok()
                .and_then(|d| self.day_usd.get_mut(d))
            {
                *slot += rate * (seg_end - t) as f64 / HOUR_MS;
            }
            t = seg_end;
        }
    }

    fn set_state(&mut self, idx: usize, state: HostState) {
        self.accrue(idx);
        let host = &mut self.hosts[idx];
        host.rec.state = state;
        host.rec.state_since_ms = self.now;
        host.generation += 1;
        if state == HostState::Released {
            self.active.retain(|&i| i != idx);
        }
    }

    /// Can take a job now.
    fn serving(&self, idx: usize) -> bool {
        let h = &self.hosts[idx];
        h.rec.state == HostState::Hot && !h.gone && h.drain_to.is_none()
    }

    /// Runs to the end of the simulated days; returns the figures and one sample per tick.
    pub fn run_with_samples(mut self, name: &str) -> (PolicyResult, Vec<Sample>) {
        let arrivals = &self.trace.arrivals;
        let mut next = 0usize;
        // Bounded: every iteration consumes one arrival or one event; events are only
        // scheduled before `end`, and ticks are finitely many.
        loop {
            let event_at = self.heap.peek().map(|Reverse((t, _, _))| *t);
            let arrival_at = arrivals.get(next).map(|a| a.at_ms);
            // Events first at equal times: a job ending frees its host for the arrival.
            let take_event = match (event_at, arrival_at) {
                (None, None) => break,
                (Some(e), Some(a)) => e <= a,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            if take_event {
                let Some(Reverse((t, _, event))) = self.heap.pop() else {
                    break;
                };
                if t > self.end {
                    break;
                }
                self.now = t;
                self.handle(event);
            } else {
                let arrival = arrivals[next];
                if arrival.at_ms > self.end {
                    break;
                }
                next += 1;
                self.now = arrival.at_ms;
                self.arrive(arrival.tier, arrival.account, arrival.service_ms);
            }
        }
        self.now = self.end;
        for idx in self.active.clone() {
            self.accrue(idx);
        }
        let samples = std::mem::take(&mut self.samples);
        (self.finish(name), samples)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick => self.tick(),
            Event::JobDone { host, token } => {
                if self.hosts[host].job_token == token {
                    self.job_done(host);
                }
            }
            Event::Ready { host, generation } => {
                if self.hosts[host].generation == generation && !self.hosts[host].gone {
                    self.ready(host);
                }
            }
            Event::Preempt { host, generation } => {
                if self.hosts[host].generation == generation && !self.hosts[host].gone {
                    self.preempt(host);
                }
            }
        }
    }

    fn arrive(&mut self, tier: Tier, account: u32, service_ms: u32) {
        self.arrivals_since_tick += 1;
        let s = slot(tier);
        self.counts[s].arrived += 1;
        if tier == Tier::Free {
            if let Some(quota) = self.config.free_daily_quota {
                let day = self.now.div_euclid(DAY_MS);
                if self.free_today.get(&(account, day)).copied().unwrap_or(0) >= quota {
                    self.counts[s].refused_quota += 1;
                    return;
                }
            }
            if self.estimated_wait_s() > self.config.free_admission_max_wait_s {
                self.counts[s].refused_busy += 1;
                return;
            }
            // Only accepted jobs count against the quota.
            let day = self.now.div_euclid(DAY_MS);
            *self.free_today.entry((account, day)).or_insert(0) += 1;
        }
        self.queues[s].push_back(Queued {
            at_ms: self.now,
            service_ms,
        });
        self.dispatch();
    }

    /// kilnd's estimate for a new free job (the lowest tier: every queued job is ahead of it):
    /// the rest of the soonest-ending running job when no host is free, plus one mean duration
    /// per job ahead, shared by the hosts serving. No host serving: unbounded.
    fn estimated_wait_s(&self) -> f64 {
        let mean = self.mean_service_s;
        let mut serving = 0u32;
        let mut soonest: Option<f64> = None;
        for &idx in &self.active {
            if !self.serving(idx) {
                continue;
            }
            serving += 1;
            let rest = match &self.hosts[idx].job {
                Some(job) => (mean - (self.now - job.start_ms) as f64 / 1000.0).max(0.0),
                None => 0.0,
            };
            soonest = Some(soonest.map_or(rest, |s: f64| s.min(rest)));
        }
        if serving == 0 {
            return f64::INFINITY;
        }
        let ahead: usize = self.queues.iter().map(VecDeque::len).sum();
        soonest.unwrap_or(0.0) + ahead as f64 * mean / f64::from(serving)
    }

    /// Gives waiting jobs to free hosts: highest tier first, oldest first inside a tier.
    fn dispatch(&mut self) {
        if self.queues.iter().all(VecDeque::is_empty) {
            return;
        }
        for i in 0..self.active.len() {
            let idx = self.active[i];
            if !self.serving(idx) || self.hosts[idx].job.is_some() {
                continue;
            }
            let Some(s) = (0..4).find(|&s| !self.queues[s].is_empty()) else {
                return;
            };
            let Some(job) = self.queues[s].pop_front() else {
                return;
            };
            let host = &mut self.hosts[idx];
            host.job = Some(Running {
                arrival_ms: job.at_ms,
                start_ms: self.now,
                service_ms: job.service_ms,
                tier: ORDER[s],
            });
            host.job_token += 1;
            let token = host.job_token;
            self.push(
                self.now + i64::from(job.service_ms),
                Event::JobDone { host: idx, token },
            );
        }
    }

    fn job_done(&mut self, idx: usize) {
        let last_tick = self.last_tick_ms;
        let host = &mut self.hosts[idx];
        let Some(job) = host.job.take() else { return };
        host.busy_window_ms += self.now - job.start_ms.max(last_tick);
        self.busy_ms += self.now - job.start_ms;
        let s = slot(job.tier);
        self.counts[s].served += 1;
        let wait = job.start_ms - job.arrival_ms;
        self.waits_ms[s].push(u32::try_from(wait).unwrap_or(u32::MAX));
        let secs = f64::from(job.service_ms) / 1000.0;
        self.mean_service_s = (self.mean_service_s * 4.0 + secs) / 5.0;
        if let Some(to) = host.drain_to.take() {
            self.set_state(idx, to);
        }
        self.dispatch();
    }

    fn ready(&mut self, idx: usize) {
        if self.hosts[idx].rec.state != HostState::Provisioning {
            return;
        }
        if self.hosts[idx].resume_fails {
            self.hosts[idx].resume_fails = false;
            self.resume_failures += 1;
            self.set_state(idx, HostState::Failed);
            return;
        }
        self.set_state(idx, HostState::Hot);
        self.hosts[idx].rec.ready_at_ms = Some(self.now);
        self.schedule_preemption(idx);
        self.dispatch();
    }

    fn preempt(&mut self, idx: usize) {
        self.preemptions += 1;
        self.accrue(idx);
        let host = &mut self.hosts[idx];
        host.gone = true;
        host.generation += 1;
        host.job_token += 1;
        if let Some(job) = host.job.take() {
            // Handed back to the queue in its place by arrival time; its wait is recorded when
            // it finally runs.
            self.busy_ms += self.now - job.start_ms;
            let q = &mut self.queues[slot(job.tier)];
            let pos = q.partition_point(|j| j.at_ms <= job.arrival_ms);
            q.insert(
                pos,
                Queued {
                    at_ms: job.arrival_ms,
                    service_ms: job.service_ms,
                },
            );
        }
        if let Some(to) = self.hosts[idx].drain_to.take() {
            // A host being drained ends where the drain was taking it (a preempted spot host
            // is stopped with its disk kept, or it was being released anyway).
            self.hosts[idx].gone = false;
            self.set_state(idx, to);
        }
        if let Driver::AlwaysOn(_) = self.driver {
            // The fixed fleet rents a host in its place at once.
            self.hosts[idx].gone = false;
            self.set_state(idx, HostState::Released);
            let primary = self.hosts[idx].rec.primary;
            let name = format!("always-on-{}", self.next_name);
            self.next_name += 1;
            let new = self.add_host(name, ProviderKind::Vast, true, HostState::Provisioning);
            self.hosts[new].rec.primary = primary;
            let after = self.uniform_ms(self.config.rent_s);
            let generation = self.hosts[new].generation;
            self.push(
                self.now + after,
                Event::Ready {
                    host: new,
                    generation,
                },
            );
            self.schedule_preemption(new);
        }
        self.dispatch();
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.active
            .iter()
            .copied()
            .find(|&i| self.hosts[i].rec.name == name)
    }

    fn observation(&self) -> (Observation, Vec<HostRecord>) {
        let window = (self.now - self.last_tick_ms).max(1);
        let mut members = Vec::new();
        for &idx in &self.active {
            let h = &self.hosts[idx];
            if h.gone || !matches!(h.rec.state, HostState::Hot | HostState::Draining) {
                continue;
            }
            let mut busy = h.busy_window_ms;
            if let Some(job) = &h.job {
                busy += self.now - job.start_ms.max(self.last_tick_ms);
            }
            let util = (busy.clamp(0, window) * 100 / window) as u32;
            let state = if h.drain_to.is_some() || h.rec.state == HostState::Draining {
                MemberState::Draining
            } else if h.job.is_some() {
                MemberState::Busy
            } else {
                MemberState::Ready
            };
            members.push(MemberObs {
                name: h.rec.name.clone(),
                state,
                running: u32::from(h.job.is_some()),
                gpu_util_pct: Some(util),
                queue: BTreeMap::new(),
            });
        }
        // The sim keeps one cluster-wide queue; it is shown as the first member's (the node
        // that took the submissions), which gives the policy the same cluster-wide sums.
        if let Some(first) = members.first_mut() {
            for (s, tier) in ORDER.iter().enumerate() {
                let q = &self.queues[s];
                if let Some(front) = q.front() {
                    first.queue.insert(
                        *tier,
                        QueueObs {
                            queued: q.len() as u64,
                            oldest_wait_s: Some(((self.now - front.at_ms) / 1000) as u64),
                        },
                    );
                }
            }
        }
        let records = self
            .active
            .iter()
            .map(|&i| self.hosts[i].rec.clone())
            .collect();
        (Observation::new(members, Vec::new()), records)
    }

    fn tick(&mut self) {
        for idx in self.active.clone() {
            self.accrue(idx);
        }
        if let Driver::Plan(config) = &self.driver {
            let config = config.clone();
            let (obs, records) = self.observation();
            let day = usize::try_from(self.now.div_euclid(DAY_MS)).unwrap_or(0);
            let spend = self.day_usd.get(day).copied().unwrap_or(0.0);
            let plan = policy::plan(&obs, &records, &config, &self.state, self.now, spend);
            self.state = plan.state;
            for action in plan.actions {
                self.execute(action);
            }
        }
        self.sample();
        for &idx in &self.active {
            self.hosts[idx].busy_window_ms = 0;
        }
        self.last_tick_ms = self.now;
        self.arrivals_since_tick = 0;
        let next = self.now + self.config.tick_ms();
        if next <= self.end {
            self.push(next, Event::Tick);
        }
        self.dispatch();
    }

    fn sample(&mut self) {
        let window_h = (self.now - self.last_tick_ms) as f64 / HOUR_MS;
        let mut s = Sample {
            t_h: self.now as f64 / HOUR_MS,
            demand_per_h: if window_h > 0.0 {
                self.arrivals_since_tick as f64 / window_h
            } else {
                0.0
            },
            queued: self.queues.iter().map(|q| q.len() as u64).sum(),
            cumulative_usd: self.day_usd.iter().sum(),
            ..Sample::default()
        };
        for &idx in &self.active {
            let h = &self.hosts[idx];
            if h.gone {
                continue;
            }
            match h.rec.state {
                HostState::Hot | HostState::Draining => s.hot += 1,
                HostState::Provisioning => s.provisioning += 1,
                HostState::Warm => s.warm += 1,
                _ => {}
            }
        }
        self.samples.push(s);
    }

    fn rent(&mut self, decision_id: &str, provider: ProviderKind, spot: bool) {
        if self.rng.random::<f64>() < self.config.rent_failure_prob {
            self.rent_failures += 1;
            self.state.record_failure(decision_id, self.now);
            return;
        }
        let idx = self.add_host(
            decision_id.to_string(),
            provider,
            spot,
            HostState::Provisioning,
        );
        let after = self.uniform_ms(self.config.rent_s);
        let generation = self.hosts[idx].generation;
        self.push(
            self.now + after,
            Event::Ready {
                host: idx,
                generation,
            },
        );
        self.schedule_preemption(idx);
    }

    /// Drains a host to `to`: at once when it runs nothing (or is gone), else when its job ends.
    fn drain(&mut self, idx: usize, to: HostState) {
        let h = &self.hosts[idx];
        if h.job.is_some() && !h.gone {
            self.set_state(idx, HostState::Draining);
            self.hosts[idx].drain_to = Some(to);
        } else {
            // Bill up to now as the host was (a preempted one bills nothing) before it changes.
            self.accrue(idx);
            self.hosts[idx].gone = self.hosts[idx].gone && to != HostState::Released;
            self.set_state(idx, to);
        }
    }

    fn execute(&mut self, action: Action) {
        *self
            .actions
            .entry(format!("{:?}", action.kind()).to_lowercase())
            .or_insert(0) += 1;
        let id = action.decision_id().to_string();
        match action {
            Action::Rent { provider, spot, .. } => self.rent(&id, provider, spot),
            Action::Resume { host, .. } => {
                let Some(idx) = self
                    .find(&host)
                    .filter(|&i| self.hosts[i].rec.state == HostState::Warm && !self.hosts[i].gone)
                else {
                    self.state.record_failure(&id, self.now);
                    return;
                };
                self.set_state(idx, HostState::Provisioning);
                self.hosts[idx].resume_fails =
                    self.rng.random::<f64>() < self.config.resume_failure_prob;
                let after = self.uniform_ms(self.config.resume_s);
                let generation = self.hosts[idx].generation;
                self.push(
                    self.now + after,
                    Event::Ready {
                        host: idx,
                        generation,
                    },
                );
                self.schedule_preemption(idx);
            }
            Action::DrainStop { host, .. } => {
                match self
                    .find(&host)
                    .filter(|&i| self.hosts[i].rec.state == HostState::Hot)
                {
                    Some(idx) => self.drain(idx, HostState::Warm),
                    None => self.state.record_failure(&id, self.now),
                }
            }
            Action::Release { host, .. } => match self.find(&host) {
                Some(idx) => self.drain(idx, HostState::Released),
                None => self.state.record_failure(&id, self.now),
            },
            Action::Replace {
                host,
                provider,
                spot,
                ..
            } => {
                if let Some(idx) = self.find(&host) {
                    self.drain(idx, HostState::Released);
                }
                self.rent(&id, provider, spot);
            }
        }
    }

    fn finish(self, name: &str) -> PolicyResult {
        let mut tiers = BTreeMap::new();
        let mut queued_at_end = 0u64;
        let mut running_at_end = 0u64;
        for &idx in &self.active {
            running_at_end += u64::from(self.hosts[idx].job.is_some());
        }
        let mut served_total = 0u64;
        for (s, tier) in ORDER.iter().enumerate() {
            let mut waits = self.waits_ms[s].clone();
            waits.sort_unstable();
            let target_ms = self.config.wait_target_s(*tier).saturating_mul(1000);
            let within = waits.partition_point(|&w| u64::from(w) <= target_ms);
            let pct = |p: f64| -> Option<f64> {
                if waits.is_empty() {
                    return None;
                }
                // Nearest rank.
                let rank = ((p / 100.0) * waits.len() as f64).ceil().max(1.0) as usize;
                Some(f64::from(waits[rank.min(waits.len()) - 1]) / 1000.0)
            };
            let c = self.counts[s];
            queued_at_end += self.queues[s].len() as u64;
            served_total += c.served;
            tiers.insert(
                tier.as_str().to_string(),
                TierResult {
                    arrived: c.arrived,
                    served: c.served,
                    refused_busy: c.refused_busy,
                    refused_quota: c.refused_quota,
                    queued_at_end: self.queues[s].len() as u64,
                    wait_target_s: self.config.wait_target_s(*tier),
                    wait_p50_s: pct(50.0),
                    wait_p95_s: pct(95.0),
                    wait_p99_s: pct(99.0),
                    within_target_pct: if waits.is_empty() {
                        None
                    } else {
                        Some(within as f64 * 100.0 / waits.len() as f64)
                    },
                },
            );
        }
        let total_cost: f64 = self
            .hosts
            .iter()
            .map(|h| {
                h.rec.price_per_hour * h.gpu_ms as f64 / HOUR_MS
                    + h.rec.stopped_price_per_hour * h.stopped_ms as f64 / HOUR_MS
            })
            .sum();
        let lifetime_h: f64 = self
            .hosts
            .iter()
            .map(|h| {
                let until = if h.rec.state == HostState::Released {
                    h.accrued_to_ms
                } else {
                    self.end
                };
                (until - h.rec.rented_at_ms) as f64 / HOUR_MS
            })
            .sum();
        let arrived: u64 = self.counts.iter().map(|c| c.arrived).sum();
        PolicyResult {
            policy: name.to_string(),
            total_cost_usd: total_cost,
            cost_per_day_usd: self.day_usd.clone(),
            cost_per_image_usd: (served_total > 0).then(|| total_cost / served_total as f64),
            ratio_to_lower_bound: None,
            gpu_billed_ms: self.hosts.iter().map(|h| h.gpu_ms).sum(),
            gpu_utilization_pct: if self.hot_ms > 0 {
                self.busy_ms as f64 * 100.0 / self.hot_ms as f64
            } else {
                0.0
            },
            instance_hours: self.hours.clone(),
            host_lifetime_hours: lifetime_h,
            jobs: JobCounts {
                arrived,
                served: served_total,
                refused_busy: self.counts.iter().map(|c| c.refused_busy).sum(),
                refused_quota: self.counts.iter().map(|c| c.refused_quota).sum(),
                queued_at_end,
                running_at_end,
            },
            tiers,
            actions: self.actions.clone(),
            rent_failures: self.rent_failures,
            resume_failures: self.resume_failures,
            preemptions: self.preemptions,
            hosts_rented: self.hosts.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_trace() -> Trace {
        Trace {
            name: "t".to_string(),
            arrivals: Vec::new(),
            accounts: vec!["a".to_string()],
        }
    }

    fn quiet() -> SimConfig {
        SimConfig {
            days: 1,
            spot_preemptions_per_hour: 0.0,
            ..SimConfig::default()
        }
    }

    #[test]
    fn a_host_drained_while_busy_finishes_its_job_then_stops() {
        let config = quiet();
        let trace = empty_trace();
        let mut engine = Engine::new(&config, &trace, Driver::AlwaysOn(1), 1);
        engine.arrive(Tier::Pro, 0, 5_000);
        assert!(engine.hosts[0].job.is_some());
        engine.execute(Action::DrainStop {
            decision_id: "d-1".to_string(),
            host: "primary-1".to_string(),
            reason: "test".to_string(),
        });
        assert_eq!(engine.hosts[0].rec.state, HostState::Draining);
        let (result, _) = engine.run_with_samples("t");
        assert_eq!(result.jobs.served, 1);
        assert_eq!(result.jobs.running_at_end, 0);
        let draining = result.instance_hours["draining"];
        assert!((draining - 5.0 / 3600.0).abs() < 1e-9, "{draining}");
        assert!(result.instance_hours["warm"] > 23.9);
    }

    #[test]
    fn a_preempted_job_goes_back_in_its_place_and_runs_again() {
        let config = quiet();
        let trace = empty_trace();
        let mut engine = Engine::new(&config, &trace, Driver::AlwaysOn(1), 1);
        engine.arrive(Tier::Pro, 0, 5_000);
        engine.now = 1_000;
        engine.arrive(Tier::Pro, 0, 5_000);
        engine.now = 2_000;
        engine.preempt(0);
        // The running job (arrived at 0) is back at the head, before the one from 1 s.
        let heads: Vec<i64> = engine.queues[slot(Tier::Pro)]
            .iter()
            .map(|j| j.at_ms)
            .collect();
        assert_eq!(heads, vec![0, 1_000]);
        // The always-on fleet rented a replacement, which serves both once ready.
        assert_eq!(engine.hosts[0].rec.state, HostState::Released);
        assert_eq!(engine.hosts[1].rec.state, HostState::Provisioning);
        let (result, _) = engine.run_with_samples("t");
        assert_eq!(result.jobs.served, 2);
        assert_eq!(result.preemptions, 1);
        assert!(result.tiers["pro"].wait_p50_s.expect("served") >= 1_800.0);
    }

    #[test]
    fn the_policy_replaces_a_preempted_host() {
        let config = quiet();
        let trace = empty_trace();
        let mut engine = Engine::new(&config, &trace, Driver::Plan(Box::default()), 1);
        engine.now = 60_000;
        engine.preempt(0);
        let (result, _) = engine.run_with_samples("t");
        assert!(
            result.actions.get("replace").copied().unwrap_or(0) >= 1,
            "{:?}",
            result.actions
        );
        assert!(result.instance_hours["preempted"] > 0.0);
        // The replacement was rented.
        assert!(result.hosts_rented >= 2);
    }
}
