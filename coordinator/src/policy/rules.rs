//! The rules of [`super::plan`], applied in a fixed order each tick:
//!
//! 1. pending decisions are matched against the inventory (done, or expired);
//! 2. the timers in [`PolicyState`] are updated (quiet queue, low utilization, unhealthy,
//!    missing from the view);
//! 3. failed hosts are replaced;
//! 4. the primary is chosen, and brought back to HOT when nothing is;
//! 5. scale-up (tier wait targets, queue depth), held by the budget cap, cooldown, capacity
//!    already coming and the fleet maximum;
//! 6. scale-down (quiet queue, idle GPUs) when nothing asked for capacity;
//! 7. WARM hosts past their time released beyond the warm pool, and the pool refilled.

use kiln_daemon::protocol::Tier;
use kiln_daemon::protocol::cluster::MemberState;

use super::{Action, DecisionKind, Observation, Pending, Plan, PolicyConfig, PolicyState, Wake};
use crate::fleet::{HostRecord, HostState};
use crate::provider::ProviderKind;

/// Seconds to milliseconds, saturating (configured durations are validated, but may be huge).
fn ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// A duration in milliseconds as people read it in a reason.
fn dur(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    if secs < 120 {
        format!("{secs} s")
    } else if secs < 2 * 3600 {
        format!("{} min", secs / 60)
    } else if (secs / 60) % 60 == 0 {
        format!("{} h", secs / 3600)
    } else {
        format!("{} h {} min", secs / 3600, (secs / 60) % 60)
    }
}

fn usd(value: f64) -> String {
    format!("${value:.2}")
}

/// The host configured (or marked in the inventory) as primary, when it is still rented and has
/// not failed. `None` means the oldest HOT host acts as primary.
pub fn designated_primary<'a>(
    hosts: &'a [HostRecord],
    config: &PolicyConfig,
) -> Option<&'a HostRecord> {
    let usable = |h: &&HostRecord| !matches!(h.state, HostState::Released | HostState::Failed);
    match &config.primary {
        Some(name) => hosts.iter().filter(usable).find(|h| &h.name == name),
        None => hosts
            .iter()
            .filter(usable)
            .filter(|h| h.primary)
            .min_by(|a, b| a.name.cmp(&b.name)),
    }
}

/// Hosts rented now, as the maximum fleet counts them: every host not released, less those on
/// their way out because a replacement was decided for them (pending, or rented already), plus
/// rents decided and not yet in the inventory. A replacement therefore never grows the fleet.
pub fn fleet_size(hosts: &[HostRecord], state: &PolicyState) -> u32 {
    let replacing: Vec<&str> = state
        .pending
        .values()
        .filter(|p| p.kind == DecisionKind::Replace)
        .filter_map(|p| p.host.as_deref())
        .collect();
    let rented = hosts
        .iter()
        .filter(|h| h.state != HostState::Released)
        .filter(|h| !replacing.contains(&h.name.as_str()) && !state.replaced.contains(&h.name))
        .count();
    let coming = state
        .pending
        .iter()
        .filter(|(_, p)| matches!(p.kind, DecisionKind::Rent | DecisionKind::Replace))
        .filter(|(id, _)| !hosts.iter().any(|h| &h.name == *id))
        .count();
    u32::try_from(rented + coming).unwrap_or(u32::MAX)
}

pub(super) struct Tick<'a> {
    obs: &'a Observation,
    /// Every inventory record, released ones included (names are never reused).
    all: &'a [HostRecord],
    /// The hosts still rented, by name.
    hosts: Vec<&'a HostRecord>,
    config: &'a PolicyConfig,
    state: PolicyState,
    now: i64,
    spend: f64,
    actions: Vec<Action>,
    notes: Vec<String>,
}

impl<'a> Tick<'a> {
    pub(super) fn new(
        obs: &'a Observation,
        all: &'a [HostRecord],
        config: &'a PolicyConfig,
        state: PolicyState,
        now: i64,
        spend: f64,
    ) -> Tick<'a> {
        let mut hosts: Vec<&HostRecord> = all
            .iter()
            .filter(|h| h.state != HostState::Released)
            .collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Tick {
            obs,
            all,
            hosts,
            config,
            state,
            now,
            spend,
            actions: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(super) fn run(mut self) -> Plan {
        self.resolve_pending();
        self.track();
        self.replace_failed();
        let primary = self.primary();
        let budget_capped = self.over_budget();
        let pressure = self.scale_up();
        if !pressure {
            self.scale_down(primary.as_deref());
        }
        self.release_warm();
        self.fill_warm_pool(pressure);
        self.util_warnings();
        self.slow_drains();
        if budget_capped {
            self.notes.push(format!(
                "budget cap: spent {} today ≥ daily_budget_usd {}: only pro and enterprise load adds capacity",
                usd(self.spend),
                usd(self.config.daily_budget_usd)
            ));
        }
        Plan {
            actions: self.actions,
            state: self.state,
            notes: self.notes,
            primary,
            budget_capped,
        }
    }

    fn over_budget(&self) -> bool {
        // NaN spend (a broken ledger) is treated as over budget: spend nothing on it.
        self.spend.is_nan() || self.spend >= self.config.daily_budget_usd
    }

    fn age(&self, since_ms: i64) -> i64 {
        self.now.saturating_sub(since_ms)
    }

    fn host(&self, name: &str) -> Option<&'a HostRecord> {
        self.hosts.iter().copied().find(|h| h.name == name)
    }

    /// Any decision pending for this host (one decision per host at a time).
    fn has_pending(&self, name: &str) -> bool {
        self.state
            .pending
            .iter()
            .any(|(id, p)| p.host.as_deref() == Some(name) || id == name)
    }

    fn pending_of(&self, name: &str, kind: DecisionKind) -> bool {
        self.state
            .pending
            .values()
            .any(|p| p.kind == kind && p.host.as_deref() == Some(name))
    }

    /// A WARM host on its way back: a pending resume, or a resumed host still provisioning.
    fn resuming(&self) -> bool {
        self.state
            .pending
            .values()
            .any(|p| p.kind == DecisionKind::Resume)
            || self
                .hosts
                .iter()
                .any(|h| h.state == HostState::Provisioning && h.ready_at_ms.is_some())
    }

    /// A new host on its way: a rent decided and not yet in the inventory, or a rented host
    /// still provisioning.
    fn renting(&self) -> bool {
        self.state.pending.iter().any(|(id, p)| {
            matches!(p.kind, DecisionKind::Rent | DecisionKind::Replace)
                && !self.all.iter().any(|h| &h.name == id)
        }) || self
            .hosts
            .iter()
            .any(|h| h.state == HostState::Provisioning && h.ready_at_ms.is_none())
    }

    /// WARM hosts free to resume, cheapest first.
    fn warm_candidates(&self) -> Vec<&'a HostRecord> {
        let mut warm: Vec<&HostRecord> = self
            .hosts
            .iter()
            .copied()
            .filter(|h| h.state == HostState::Warm && !self.has_pending(&h.name))
            .filter(|h| !self.state.replaced.contains(&h.name))
            .collect();
        warm.sort_by(|a, b| {
            a.price_per_hour
                .total_cmp(&b.price_per_hour)
                .then_with(|| a.name.cmp(&b.name))
        });
        warm
    }

    /// A fresh decision id: the rent prefix and a number not used by any host or pending
    /// decision. At most `hosts + pending + 1` numbers are tried, so one is always free.
    fn new_id(&mut self) -> String {
        let bound = self.all.len() + self.state.pending.len() + 1;
        let mut id = String::new();
        for _ in 0..bound {
            id = format!("{}{}", self.config.rent.name_prefix, self.state.next_seq);
            self.state.next_seq = self.state.next_seq.saturating_add(1);
            let taken = self.all.iter().any(|h| h.name == id)
                || self.state.pending.contains_key(&id)
                || self.actions.iter().any(|a| a.decision_id() == id);
            if !taken {
                break;
            }
        }
        id
    }

    /// The first configured provider a rent may go to now: not failed within `retry_after_s`,
    /// able to pause when asked, and other than `avoid` when another is available.
    fn choose_provider(
        &self,
        avoid: Option<ProviderKind>,
        need_pause: bool,
    ) -> Option<ProviderKind> {
        let retry = ms(self.config.rent.retry_after_s);
        let usable: Vec<ProviderKind> = self
            .config
            .rent
            .providers
            .iter()
            .copied()
            .filter(|p| !need_pause || p.can_pause())
            .filter(|p| match self.state.rent_failed_ms.get(p) {
                Some(&failed) => self.age(failed) >= retry,
                None => true,
            })
            .collect();
        usable
            .iter()
            .copied()
            .find(|p| Some(*p) != avoid)
            .or_else(|| usable.first().copied())
    }

    fn issue(&mut self, action: Action, provider: Option<ProviderKind>) {
        let id = action.decision_id().to_string();
        let pending = Pending {
            kind: action.kind(),
            host: action.host().map(str::to_string),
            provider,
            issued_at_ms: self.now,
        };
        self.state.pending.insert(id, pending);
        self.actions.push(action);
    }

    fn resume(&mut self, host: &HostRecord, reason: String) {
        let decision_id = self.new_id();
        self.issue(
            Action::Resume {
                decision_id,
                host: host.name.clone(),
                reason,
            },
            Some(host.provider),
        );
        self.state.last_scale_up_ms = Some(self.now);
    }

    fn rent(&mut self, provider: ProviderKind, reason: String) -> String {
        let decision_id = self.new_id();
        self.issue(
            Action::Rent {
                decision_id: decision_id.clone(),
                provider,
                spot: self.config.rent.spot,
                reason,
            },
            Some(provider),
        );
        self.state.last_scale_up_ms = Some(self.now);
        decision_id
    }

    /// Step 1: pending decisions the inventory shows done are dropped; those past their timeout
    /// are dropped with a note (a rent's provider counts as failed).
    fn resolve_pending(&mut self) {
        let all: &'a PolicyConfig = self.config;
        let config = &all.rent;
        let pending = std::mem::take(&mut self.state.pending);
        for (id, p) in pending {
            let age = self.age(p.issued_at_ms);
            let target = p.host.as_deref().and_then(|name| self.host(name));
            let target_state = target.map(|h| h.state);
            let new_host = self.all.iter().any(|h| h.name == id);
            let (done, timeout_s) = match p.kind {
                DecisionKind::Rent => (new_host, config.rent_timeout_s),
                DecisionKind::Replace => (new_host, config.rent_timeout_s),
                DecisionKind::Resume => (
                    target_state != Some(HostState::Warm),
                    config.resume_timeout_s,
                ),
                DecisionKind::DrainStop => (
                    target_state != Some(HostState::Hot),
                    config.decision_timeout_s,
                ),
                DecisionKind::Release => (target.is_none(), config.decision_timeout_s),
            };
            if done {
                if p.kind == DecisionKind::Replace
                    && let Some(old) = p.host
                    && target.is_some()
                {
                    // The replacement exists; the old host is only released from now on.
                    self.state.replaced.insert(old);
                }
                continue;
            }
            if age > ms(timeout_s) {
                let what = match &p.host {
                    Some(host) => format!("{:?} of {host}", p.kind),
                    None => format!("{:?}", p.kind),
                };
                self.notes.push(format!(
                    "decision {id} ({what}) not done after {} > {}: dropped, may be decided again",
                    dur(age),
                    dur(ms(timeout_s))
                ));
                if matches!(p.kind, DecisionKind::Rent | DecisionKind::Replace)
                    && let Some(provider) = p.provider
                {
                    self.state.rent_failed_ms.insert(provider, self.now);
                }
                continue;
            }
            self.state.pending.insert(id, p);
        }
        let rented: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        self.state.replaced.retain(|name| rented.contains(name));
        let hosts = &self.hosts;
        let pending = &self.state.pending;
        self.state.warm_pool_fill.retain(|name| {
            pending.contains_key(name)
                || hosts.iter().any(|h| {
                    &h.name == name && matches!(h.state, HostState::Provisioning | HostState::Hot)
                })
        });
    }

    /// Step 2: the timers. Each map keeps only the members or hosts the condition holds for now.
    fn track(&mut self) {
        let now = self.now;
        let config = self.config;
        let state = &mut self.state;
        if self.obs.total_queued() < config.quiet_queue_depth {
            state.quiet_since_ms.get_or_insert(now);
        } else {
            state.quiet_since_ms = None;
        }
        let mut low = std::collections::BTreeMap::new();
        let mut idle = std::collections::BTreeMap::new();
        let mut unhealthy = std::collections::BTreeMap::new();
        for member in &self.obs.members {
            let name = &member.name;
            if let Some(util) = member.gpu_util_pct {
                if util < config.util_warn_pct {
                    let since = state.low_util_since_ms.get(name).copied().unwrap_or(now);
                    low.insert(name.clone(), since);
                }
                if util < config.util_scale_down_pct {
                    let since = state.idle_util_since_ms.get(name).copied().unwrap_or(now);
                    idle.insert(name.clone(), since);
                }
            }
            if member.state == MemberState::Unhealthy {
                let since = state.unhealthy_since_ms.get(name).copied().unwrap_or(now);
                unhealthy.insert(name.clone(), since);
            }
        }
        state.low_util_since_ms = low;
        state.idle_util_since_ms = idle;
        state.unhealthy_since_ms = unhealthy;
        let mut missing = std::collections::BTreeMap::new();
        for host in &self.hosts {
            if host.state == HostState::Hot && self.obs.member(&host.name).is_none() {
                let since = state
                    .missing_since_ms
                    .get(&host.name)
                    .copied()
                    .unwrap_or(now);
                missing.insert(host.name.clone(), since);
            }
        }
        state.missing_since_ms = missing;
    }

    /// Step 3: a failed host, a rent or resume stuck provisioning, a member unhealthy too long,
    /// a HOT host gone from the view (a preempted spot host): release it and rent another. A
    /// host whose replacement is rented and that is still not released is released.
    fn replace_failed(&mut self) {
        let config: &'a PolicyConfig = self.config;
        let rent = &config.rent;
        for host in self.hosts.clone() {
            if self.has_pending(&host.name) {
                continue;
            }
            if self.state.replaced.contains(&host.name) {
                // Its replacement is rented: whatever state it is in now, it goes.
                let decision_id = self.new_id();
                self.issue(
                    Action::Release {
                        decision_id,
                        host: host.name.clone(),
                        reason: format!(
                            "{} ({}) was replaced and its replacement is rented: releasing it",
                            host.name, host.state
                        ),
                    },
                    None,
                );
                continue;
            }
            let in_state = self.age(host.state_since_ms);
            let why = match host.state {
                HostState::Failed => Some(format!("host failed {} ago", dur(in_state))),
                HostState::Provisioning if host.ready_at_ms.is_some() => {
                    (in_state > ms(rent.resume_timeout_s)).then(|| {
                        format!(
                            "resume not ready after {} > {}",
                            dur(in_state),
                            dur(ms(rent.resume_timeout_s))
                        )
                    })
                }
                HostState::Provisioning => (in_state > ms(rent.provision_timeout_s)).then(|| {
                    format!(
                        "rented host not ready after {} > {}",
                        dur(in_state),
                        dur(ms(rent.provision_timeout_s))
                    )
                }),
                HostState::Hot => {
                    let unhealthy = self
                        .state
                        .unhealthy_since_ms
                        .get(&host.name)
                        .map(|&since| self.age(since))
                        .filter(|&age| age > ms(rent.unhealthy_timeout_s));
                    let missing = self
                        .state
                        .missing_since_ms
                        .get(&host.name)
                        .map(|&since| self.age(since))
                        .filter(|&age| age > ms(rent.missing_grace_s));
                    if let Some(age) = unhealthy {
                        Some(format!(
                            "member unhealthy for {} > {}",
                            dur(age),
                            dur(ms(rent.unhealthy_timeout_s))
                        ))
                    } else {
                        missing.map(|age| {
                            format!(
                                "{}missing from the cluster view for {} > {}",
                                if host.spot {
                                    "spot host (preempted?) "
                                } else {
                                    ""
                                },
                                dur(age),
                                dur(ms(rent.missing_grace_s))
                            )
                        })
                    }
                }
                HostState::Warm | HostState::Draining | HostState::Released => None,
            };
            let Some(why) = why else { continue };
            match self.choose_provider(Some(host.provider), false) {
                Some(provider) => {
                    let decision_id = self.new_id();
                    self.issue(
                        Action::Replace {
                            decision_id,
                            host: host.name.clone(),
                            provider,
                            spot: self.config.rent.spot,
                            reason: why,
                        },
                        Some(provider),
                    );
                }
                None => {
                    self.notes.push(format!(
                        "{}: no provider to rent a replacement on (every one failed within {}); releasing only",
                        host.name,
                        dur(ms(rent.retry_after_s))
                    ));
                    let decision_id = self.new_id();
                    self.issue(
                        Action::Release {
                            decision_id,
                            host: host.name.clone(),
                            reason: why,
                        },
                        None,
                    );
                }
            }
        }
    }

    /// Step 4: the primary is the designated host when it is HOT, else the oldest HOT host.
    /// A WARM designated primary is resumed; with nothing HOT and nothing coming, the cheapest
    /// WARM host is resumed or a host rented (the budget cap does not apply: this is the
    /// minimum service, not load).
    fn primary(&mut self) -> Option<String> {
        if let Some(name) = &self.config.primary
            && self.host(name).is_none()
        {
            self.notes.push(format!(
                "policy.primary names {name}, which is not a rented host: the oldest HOT host acts as primary"
            ));
        }
        let designated = designated_primary(self.all, self.config)
            .filter(|h| !self.pending_of(&h.name, DecisionKind::Replace))
            .filter(|h| !self.pending_of(&h.name, DecisionKind::Release));
        if let Some(d) = designated {
            match d.state {
                HostState::Hot => return Some(d.name.clone()),
                HostState::Warm if !self.has_pending(&d.name) => {
                    self.resume(
                        d,
                        format!("primary {} is WARM: the primary is always HOT", d.name),
                    );
                }
                _ => {}
            }
        }
        let fallback = self
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Hot)
            .filter(|h| !self.pending_of(&h.name, DecisionKind::Replace))
            .filter(|h| !self.pending_of(&h.name, DecisionKind::Release))
            .min_by(|a, b| {
                let key =
                    |h: &HostRecord| (h.ready_at_ms.unwrap_or(h.state_since_ms), h.rented_at_ms);
                key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
            })
            .map(|h| h.name.clone());
        if fallback.is_some() {
            return fallback;
        }
        if self.resuming() || self.renting() {
            self.notes
                .push("no HOT host: waiting for the capacity already coming".to_string());
            return None;
        }
        if let Some(warm) = self.warm_candidates().first().copied() {
            self.resume(warm, "no HOT host: the primary must run".to_string());
        } else if fleet_size(self.all, &self.state) >= self.config.max_fleet {
            self.notes.push(format!(
                "no HOT host and max_fleet {} reached: nothing can be rented",
                self.config.max_fleet
            ));
        } else if let Some(provider) = self.choose_provider(None, false) {
            self.rent(provider, "no HOT host: the primary must run".to_string());
        } else {
            self.notes
                .push("no HOT host and every provider failed recently: nothing rented".to_string());
        }
        None
    }

    /// Step 5. Returns whether any rule asked for capacity (then nothing is scaled down).
    fn scale_up(&mut self) -> bool {
        let capped = self.over_budget();
        let allowed: Vec<Tier> = Tier::BY_PRIORITY
            .into_iter()
            .filter(|t| !capped || matches!(t, Tier::Pro | Tier::Enterprise))
            .collect();
        let mut want: Option<(Wake, String)> = None;
        let mut consider = |wake: Wake, reason: String| {
            let stronger = match &want {
                None => true,
                Some((Wake::Warm, _)) => wake == Wake::Any,
                Some(_) => false,
            };
            if stronger {
                want = Some((wake, reason));
            }
        };
        let targets = &self.config.wait_targets;
        for tier in Tier::BY_PRIORITY {
            let target = match tier {
                Tier::Enterprise => targets.enterprise,
                Tier::Pro => targets.pro,
                Tier::Premium => targets.premium,
                Tier::Free => targets.free,
            };
            let queue = self.obs.tier(tier);
            let Some(wait) = queue.oldest_wait_s.filter(|_| queue.queued > 0) else {
                continue;
            };
            if wait <= target.wait_s {
                continue;
            }
            let reason = format!("{tier} oldest wait {wait} s > {} s", target.wait_s);
            if !allowed.contains(&tier) {
                self.notes.push(format!("{reason}: held by the budget cap"));
            } else if target.wakes == Wake::None {
                self.notes
                    .push(format!("{reason}: this tier wakes no capacity"));
            } else {
                consider(target.wakes, reason);
            }
        }
        let paid: Vec<Tier> = allowed
            .iter()
            .copied()
            .filter(|t| *t != Tier::Free)
            .collect();
        let rent_depth = self.obs.queued(&paid);
        if rent_depth > self.config.rent_queue_depth {
            consider(
                Wake::Any,
                format!(
                    "paid queue depth {rent_depth} > {}",
                    self.config.rent_queue_depth
                ),
            );
        }
        let depth = self.obs.queued(&allowed);
        if depth > self.config.resume_queue_depth {
            consider(
                Wake::Warm,
                format!("queue depth {depth} > {}", self.config.resume_queue_depth),
            );
        }
        if capped && self.obs.total_queued() > self.config.resume_queue_depth && want.is_none() {
            self.notes.push(format!(
                "queue depth {} > {}: held by the budget cap (only pro and enterprise jobs count)",
                self.obs.total_queued(),
                self.config.resume_queue_depth
            ));
        }
        let Some((wake, reason)) = want else {
            return false;
        };
        if self
            .actions
            .iter()
            .any(|a| matches!(a.kind(), DecisionKind::Rent | DecisionKind::Resume))
        {
            // The primary's recovery this tick is the scale-up.
            return true;
        }
        let latest_ready = self
            .hosts
            .iter()
            .filter_map(|h| h.ready_at_ms.map(|at| (at, &h.name)))
            .max();
        if let Some((ready_at, name)) = latest_ready
            && self.age(ready_at) < ms(self.config.scale_up_cooldown_s)
        {
            self.notes.push(format!(
                "{reason}: held by the scale-up cooldown ({name} became ready {} ago < {})",
                dur(self.age(ready_at)),
                dur(ms(self.config.scale_up_cooldown_s))
            ));
            return true;
        }
        if let Some(warm) = self.warm_candidates().first().copied() {
            if self.resuming() {
                self.notes
                    .push(format!("{reason}: a resume is already in flight"));
            } else {
                self.resume(
                    warm,
                    format!("{reason}: resuming WARM standby {}", warm.name),
                );
            }
            return true;
        }
        if wake == Wake::Warm {
            self.notes.push(format!(
                "{reason}: no WARM standby to resume, and this load does not rent"
            ));
            return true;
        }
        if self.resuming() || self.renting() {
            self.notes
                .push(format!("{reason}: capacity is already coming"));
            return true;
        }
        if fleet_size(self.all, &self.state) >= self.config.max_fleet {
            self.notes.push(format!(
                "{reason}: max_fleet {} reached, nothing rented",
                self.config.max_fleet
            ));
            return true;
        }
        match self.choose_provider(None, false) {
            Some(provider) => {
                self.rent(provider, format!("{reason}: no WARM standby, renting"));
            }
            None => self.notes.push(format!(
                "{reason}: every provider failed within {}, nothing rented",
                dur(ms(self.config.rent.retry_after_s))
            )),
        }
        true
    }

    /// Step 6: hosts rented for the warm pool are stopped once ready and idle; otherwise at most
    /// one non-primary HOT host is drained and stopped (released on Lambda) when the queue has
    /// been quiet long enough or its GPU idle long enough. Never a host running a job, never one
    /// that became ready within the scale-down cooldown, never two within the cooldown.
    fn scale_down(&mut self, primary: Option<&str>) {
        let designated = designated_primary(self.all, self.config).map(|h| h.name.clone());
        let protected = |name: &str| Some(name) == primary || Some(name) == designated.as_deref();
        let hot: Vec<&HostRecord> = self
            .hosts
            .iter()
            .copied()
            .filter(|h| h.state == HostState::Hot && !self.has_pending(&h.name))
            .filter(|h| !protected(&h.name))
            .collect();
        let obs = self.obs;
        let fill: Vec<&HostRecord> = hot
            .iter()
            .copied()
            .filter(|h| self.state.warm_pool_fill.contains(&h.name) && h.provider.can_pause())
            .filter(|h| obs.member(&h.name).is_some_and(|m| m.running == 0))
            .collect();
        for host in fill {
            let decision_id = self.new_id();
            self.issue(
                Action::DrainStop {
                    decision_id,
                    host: host.name.clone(),
                    reason: "rented to refill the warm pool: stopping now that it is ready"
                        .to_string(),
                },
                Some(host.provider),
            );
        }
        let hot: Vec<&HostRecord> = hot
            .into_iter()
            .filter(|h| !self.has_pending(&h.name))
            .collect();
        if hot.is_empty() {
            return;
        }

        let cooldown = ms(self.config.scale_down_cooldown_s);
        let quiet = self
            .state
            .quiet_since_ms
            .map(|since| self.age(since))
            .filter(|&age| age >= ms(self.config.quiet_for_s));
        let mut chosen: Option<(&HostRecord, String)> = None;
        if let Some(age) = quiet {
            let rule = format!(
                "queue depth {} < {} for {} ≥ {}",
                self.obs.total_queued(),
                self.config.quiet_queue_depth,
                dur(age),
                dur(ms(self.config.quiet_for_s))
            );
            let candidates = self.eligible(&hot, cooldown, &rule);
            if let Some(host) = least_useful(&candidates) {
                chosen = Some((host, rule));
            }
        }
        if chosen.is_none() {
            let idle_for = ms(self.config.util_scale_down_for_s);
            let low: Vec<&HostRecord> = hot
                .iter()
                .copied()
                .filter(|h| {
                    self.state
                        .idle_util_since_ms
                        .get(&h.name)
                        .is_some_and(|&since| self.age(since) >= idle_for)
                })
                .collect();
            if !low.is_empty() {
                let rule = format!(
                    "GPU utilization < {} % for ≥ {}",
                    self.config.util_scale_down_pct,
                    dur(idle_for)
                );
                let candidates = self.eligible(&low, cooldown, &rule);
                if let Some(host) = least_useful(&candidates) {
                    let util = self
                        .obs
                        .member(&host.name)
                        .and_then(|m| m.gpu_util_pct)
                        .unwrap_or(0);
                    let since = self
                        .state
                        .idle_util_since_ms
                        .get(&host.name)
                        .copied()
                        .unwrap_or(self.now);
                    chosen = Some((
                        host,
                        format!(
                            "GPU utilization {util} % < {} % for {} ≥ {}",
                            self.config.util_scale_down_pct,
                            dur(self.age(since)),
                            dur(idle_for)
                        ),
                    ));
                }
            }
        }
        let Some((host, rule)) = chosen else { return };
        if let Some(last) = self.state.last_scale_down_ms
            && self.age(last) < cooldown
        {
            self.notes.push(format!(
                "{rule}: {} not stopped yet, the last scale-down was {} ago < {}",
                host.name,
                dur(self.age(last)),
                dur(cooldown)
            ));
            return;
        }
        let decision_id = self.new_id();
        let action = if host.provider.can_pause() {
            Action::DrainStop {
                decision_id,
                host: host.name.clone(),
                reason: format!(
                    "{rule}: stopping {} (${:.3}/h)",
                    host.name, host.price_per_hour
                ),
            }
        } else {
            Action::Release {
                decision_id,
                host: host.name.clone(),
                reason: format!(
                    "{rule}: releasing {} (${:.3}/h; {} hosts cannot be stopped)",
                    host.name, host.price_per_hour, host.provider
                ),
            }
        };
        self.issue(action, Some(host.provider));
        self.state.last_scale_down_ms = Some(self.now);
    }

    /// The hosts a scale-down rule may pick: in the view, running nothing, and ready for longer
    /// than the scale-down cooldown. The others are named in a note.
    fn eligible(
        &mut self,
        hosts: &[&'a HostRecord],
        cooldown: i64,
        rule: &str,
    ) -> Vec<&'a HostRecord> {
        let mut out = Vec::new();
        for host in hosts {
            let ready_for = self.age(host.ready_at_ms.unwrap_or(host.state_since_ms));
            match self.obs.member(&host.name) {
                None => continue,
                Some(member) if member.running > 0 => {
                    self.notes.push(format!(
                        "{rule}: {} runs {} job(s), not stopped",
                        host.name, member.running
                    ));
                }
                Some(_) if ready_for < cooldown => {
                    self.notes.push(format!(
                        "{rule}: {} became ready {} ago < scale-down cooldown {}",
                        host.name,
                        dur(ready_for),
                        dur(cooldown)
                    ));
                }
                Some(_) => out.push(*host),
            }
        }
        out
    }

    /// Step 7a: WARM hosts past `warm_release_after_s` are released, oldest WARM first, while
    /// more WARM hosts than the warm pool remain.
    fn release_warm(&mut self) {
        let designated = designated_primary(self.all, self.config).map(|h| h.name.clone());
        let mut warm: Vec<&HostRecord> = self
            .hosts
            .iter()
            .copied()
            .filter(|h| h.state == HostState::Warm && !self.has_pending(&h.name))
            .collect();
        warm.sort_by(|a, b| {
            a.state_since_ms
                .cmp(&b.state_since_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        let mut count = warm.len();
        let after = ms(self.config.warm_release_after_s);
        for host in warm {
            if count <= self.config.warm_pool_size as usize {
                break;
            }
            let age = self.age(host.state_since_ms);
            if age <= after || Some(&host.name) == designated.as_ref() {
                continue;
            }
            let decision_id = self.new_id();
            self.issue(
                Action::Release {
                    decision_id,
                    host: host.name.clone(),
                    reason: format!(
                        "WARM for {} > {}, {count} WARM hosts > warm pool {}",
                        dur(age),
                        dur(after),
                        self.config.warm_pool_size
                    ),
                },
                Some(host.provider),
            );
            count -= 1;
        }
    }

    /// Step 7b: fewer WARM hosts (counting those on their way to WARM) than the warm pool: rent
    /// one on a provider that can stop hosts; it is stopped once ready (step 6). Not past the
    /// budget cap, not while a rent is in flight, not beyond the maximum fleet.
    fn fill_warm_pool(&mut self, pressure: bool) {
        let pool = self.config.warm_pool_size as usize;
        if pool == 0 {
            return;
        }
        let becoming_warm = |h: &HostRecord| match h.state {
            HostState::Warm => {
                !self.pending_of(&h.name, DecisionKind::Resume)
                    && !self.pending_of(&h.name, DecisionKind::Release)
                    && !self.pending_of(&h.name, DecisionKind::Replace)
            }
            HostState::Draining => h.provider.can_pause(),
            HostState::Hot => {
                self.pending_of(&h.name, DecisionKind::DrainStop) && h.provider.can_pause()
            }
            _ => false,
        };
        let warm = self.hosts.iter().filter(|h| becoming_warm(h)).count();
        let filling = self
            .state
            .warm_pool_fill
            .iter()
            .filter(|name| !self.pending_of(name, DecisionKind::DrainStop))
            .count();
        let have = warm + filling;
        if have >= pool {
            return;
        }
        let short = format!("warm pool {have} < {pool}");
        if self.over_budget() {
            self.notes
                .push(format!("{short}: not refilled past the budget cap"));
            return;
        }
        if pressure
            || self.renting()
            || self
                .actions
                .iter()
                .any(|a| matches!(a.kind(), DecisionKind::Rent | DecisionKind::Replace))
        {
            // Load comes first; the pool is refilled when no other rent is under way.
            return;
        }
        if fleet_size(self.all, &self.state) >= self.config.max_fleet {
            self.notes.push(format!(
                "{short}: max_fleet {} reached, not refilled",
                self.config.max_fleet
            ));
            return;
        }
        match self.choose_provider(None, true) {
            Some(provider) => {
                let id = self.rent(
                    provider,
                    format!("{short}: renting a host to stop once it is ready"),
                );
                self.state.warm_pool_fill.insert(id);
            }
            None => self.notes.push(format!(
                "{short}: no provider that can stop hosts is available now"
            )),
        }
    }

    /// A drain that does not end is the executor's to finish (it stops the host once idle); the
    /// policy leaves the host alone and says so.
    fn slow_drains(&mut self) {
        let limit = ms(self.config.rent.decision_timeout_s);
        for host in self.hosts.clone() {
            let age = self.age(host.state_since_ms);
            if host.state == HostState::Draining && age > limit {
                self.notes.push(format!(
                    "{} draining for {} > {}: the drain is not finishing",
                    host.name,
                    dur(age),
                    dur(limit)
                ));
            }
        }
    }

    fn util_warnings(&mut self) {
        let warn_for = ms(self.config.util_warn_for_s);
        for (name, &since) in &self.state.low_util_since_ms {
            let age = self.now.saturating_sub(since);
            if age >= warn_for {
                let util = self
                    .obs
                    .member(name)
                    .and_then(|m| m.gpu_util_pct)
                    .unwrap_or(0);
                self.notes.push(format!(
                    "{name}: GPU utilization {util} % < {} % for {} (warning)",
                    self.config.util_warn_pct,
                    dur(age)
                ));
            }
        }
    }
}

/// The host whose stop saves most: the highest price per hour (hosts have the same GPU, so
/// price per hour ranks cost per image), then the one ready longest (the seed stops the oldest
/// non-primary instance), then by name.
fn least_useful<'a>(hosts: &[&'a HostRecord]) -> Option<&'a HostRecord> {
    hosts.iter().copied().min_by(|a, b| {
        b.price_per_hour
            .total_cmp(&a.price_per_hour)
            .then_with(|| {
                let ready = |h: &HostRecord| h.ready_at_ms.unwrap_or(h.state_since_ms);
                ready(a).cmp(&ready(b))
            })
            .then_with(|| a.name.cmp(&b.name))
    })
}
