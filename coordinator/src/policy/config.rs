//! The policy's settings: the `[policy]` table of the coordinator's TOML. Every default is the
//! seed's figure (`backend-infrastructure-and-pricing.md`: scale-out triggers, tier wait targets,
//! the monitoring table) or, where the seed has none, a value chosen and explained here.

use serde::{Deserialize, Serialize};

use crate::provider::ProviderKind;

/// What a tier's wait past its target may wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wake {
    /// Nothing: the wait is reported, no capacity is added for it.
    None,
    /// Resume a WARM standby, never rent.
    Warm,
    /// Resume a WARM standby, or rent (COLD → HOT) when none is left.
    Any,
}

impl Wake {
    pub fn as_str(self) -> &'static str {
        match self {
            Wake::None => "none",
            Wake::Warm => "warm",
            Wake::Any => "any",
        }
    }
}

/// One tier's wait target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitTarget {
    /// The oldest waiting job of the tier may wait this long; past it (strictly more) the tier
    /// asks for capacity.
    pub wait_s: u64,
    pub wakes: Wake,
}

/// Wait targets per tier (the seed's "Priority Rules" and "Queue Overflow Handling").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WaitTargets {
    pub enterprise: WaitTarget,
    pub pro: WaitTarget,
    pub premium: WaitTarget,
    pub free: WaitTarget,
}

impl Default for WaitTargets {
    fn default() -> Self {
        WaitTargets {
            // Seed: "if queue_wait_time > 30s and tier in [pro, enterprise]: spin_up_overflow()".
            enterprise: WaitTarget {
                wait_s: 30,
                wakes: Wake::Any,
            },
            pro: WaitTarget {
                wait_s: 30,
                wakes: Wake::Any,
            },
            // Seed: "if queue_wait_time > 120s and tier == premium: spin_up_standby()".
            premium: WaitTarget {
                wait_s: 120,
                wakes: Wake::Warm,
            },
            // Seed: free waits up to 5 min and is deprioritized in peaks; it may wake a WARM
            // standby but never rents (validate refuses `any` here).
            free: WaitTarget {
                wait_s: 300,
                wakes: Wake::Warm,
            },
        }
    }
}

/// Where and how new hosts are rented, and how failed rents and resumes are handled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RentConfig {
    /// Providers to rent from, in order of preference. A provider whose rent failed is skipped
    /// for `retry_after_s`, so the next one is tried.
    pub providers: Vec<ProviderKind>,
    /// Rent interruptible (spot) capacity.
    pub spot: bool,
    /// Names of rented hosts are this prefix plus a number; the name is the decision id and the
    /// label at the provider, so a repeated rent finds the host instead of renting a second.
    pub name_prefix: String,
    /// A rent decision whose host has not appeared in the inventory after this long counts as
    /// failed for its provider.
    pub rent_timeout_s: u64,
    /// How long a provider is skipped after a failed rent.
    pub retry_after_s: u64,
    /// A freshly rented host still provisioning after this long (seed: 30–60 min to set up) is
    /// replaced.
    pub provision_timeout_s: u64,
    /// A resumed host still provisioning after this long (seed: 2–5 min) is replaced.
    pub resume_timeout_s: u64,
    /// A HOT host whose member reports `unhealthy` for this long is replaced.
    pub unhealthy_timeout_s: u64,
    /// A HOT host missing from the cluster view for this long (a preempted spot host, a dead
    /// machine) is replaced.
    pub missing_grace_s: u64,
    /// A drain or release decision not reflected in the inventory after this long may be issued
    /// again (with a new id).
    pub decision_timeout_s: u64,
}

impl Default for RentConfig {
    fn default() -> Self {
        RentConfig {
            providers: vec![ProviderKind::Vast, ProviderKind::Runpod],
            spot: false,
            name_prefix: "kiln-".to_string(),
            rent_timeout_s: 600,
            retry_after_s: 900,
            provision_timeout_s: 90 * 60,
            resume_timeout_s: 10 * 60,
            unhealthy_timeout_s: 10 * 60,
            missing_grace_s: 5 * 60,
            decision_timeout_s: 30 * 60,
        }
    }
}

/// The policy's configuration. `Default` is the seed's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The host that is always HOT and never stopped. Unset: the inventory's host marked
    /// `primary`, else the oldest HOT host.
    pub primary: Option<String>,
    /// Seed: "queue_depth > 10 AND standby = WARM → resume standby".
    pub resume_queue_depth: u64,
    /// Seed: "queue_depth > 30 AND all instances HOT → rent". Free jobs are not counted: free
    /// load never rents.
    pub rent_queue_depth: u64,
    /// Seed: "queue_depth < 3 for 30 min AND instances > 1 → stop a non-primary instance".
    pub quiet_queue_depth: u64,
    pub quiet_for_s: u64,
    pub wait_targets: WaitTargets,
    /// Seed: "instance WARM for > 24 hours → consider releasing". Never below `warm_pool_size`.
    pub warm_release_after_s: u64,
    /// Seed monitoring: GPU utilization < 20 % for 1 h is a warning (noted, no action).
    pub util_warn_pct: u32,
    pub util_warn_for_s: u64,
    /// Seed monitoring: GPU utilization < 10 % for 2 h → scale down.
    pub util_scale_down_pct: u32,
    pub util_scale_down_for_s: u64,
    /// WARM hosts kept (seed growth setup: 1 HOT + 1 WARM). Refilled by renting a host and
    /// stopping it once ready.
    pub warm_pool_size: u32,
    /// Most hosts rented at once: every host not released, plus rents in flight; a failed host
    /// and its replacement count as one.
    pub max_fleet: u32,
    /// Past this spend today (USD) only pro and enterprise load adds capacity. Chosen above the
    /// seed's $30/day critical alert, so the alert comes first.
    pub daily_budget_usd: f64,
    /// After a host became ready, no further scale-up for this long (its effect on the queue
    /// must show first). Short: scaling up is urgent.
    pub scale_up_cooldown_s: u64,
    /// No host is stopped within this long of becoming ready, and scale-downs are at least this
    /// far apart. Long: a stopped host takes minutes to come back.
    pub scale_down_cooldown_s: u64,
    pub rent: RentConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            primary: None,
            resume_queue_depth: 10,
            rent_queue_depth: 30,
            quiet_queue_depth: 3,
            quiet_for_s: 30 * 60,
            wait_targets: WaitTargets::default(),
            warm_release_after_s: 24 * 3600,
            util_warn_pct: 20,
            util_warn_for_s: 3600,
            util_scale_down_pct: 10,
            util_scale_down_for_s: 2 * 3600,
            warm_pool_size: 1,
            max_fleet: 5,
            daily_budget_usd: 50.0,
            scale_up_cooldown_s: 120,
            scale_down_cooldown_s: 30 * 60,
            rent: RentConfig::default(),
        }
    }
}

/// A setting that cannot work, named by its key under `[policy]`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy.{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

impl PolicyConfig {
    /// Checks what serde cannot: ranges and the relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(primary) = &self.primary
            && primary.trim().is_empty()
        {
            return Err(err("primary", "must be a host name, or left out"));
        }
        if self.resume_queue_depth == 0 {
            return Err(err("resume_queue_depth", "must be at least 1"));
        }
        if self.rent_queue_depth < self.resume_queue_depth {
            return Err(err(
                "rent_queue_depth",
                format!(
                    "{} is below resume_queue_depth {}: renting must need a deeper queue than resuming",
                    self.rent_queue_depth, self.resume_queue_depth
                ),
            ));
        }
        if self.quiet_queue_depth == 0 || self.quiet_queue_depth > self.resume_queue_depth {
            return Err(err(
                "quiet_queue_depth",
                format!(
                    "must be between 1 and resume_queue_depth ({}), got {}",
                    self.resume_queue_depth, self.quiet_queue_depth
                ),
            ));
        }
        if self.quiet_for_s == 0 {
            return Err(err("quiet_for_s", "must be at least 1 second"));
        }
        if self.wait_targets.free.wakes == Wake::Any {
            return Err(err(
                "wait_targets.free.wakes",
                "free load never rents (COLD) capacity: use \"warm\" or \"none\"",
            ));
        }
        for (tier, target) in [
            ("enterprise", &self.wait_targets.enterprise),
            ("pro", &self.wait_targets.pro),
            ("premium", &self.wait_targets.premium),
            ("free", &self.wait_targets.free),
        ] {
            if target.wait_s == 0 {
                return Err(err(
                    &format!("wait_targets.{tier}.wait_s"),
                    "must be at least 1 second",
                ));
            }
        }
        for (key, pct) in [
            ("util_warn_pct", self.util_warn_pct),
            ("util_scale_down_pct", self.util_scale_down_pct),
        ] {
            if pct > 100 {
                return Err(err(key, format!("{pct} is not a percentage (0..=100)")));
            }
        }
        if self.util_scale_down_pct > self.util_warn_pct {
            return Err(err(
                "util_scale_down_pct",
                format!(
                    "{} is above util_warn_pct {}: scaling down must need lower utilization than the warning",
                    self.util_scale_down_pct, self.util_warn_pct
                ),
            ));
        }
        for (key, secs) in [
            ("warm_release_after_s", self.warm_release_after_s),
            ("util_warn_for_s", self.util_warn_for_s),
            ("util_scale_down_for_s", self.util_scale_down_for_s),
        ] {
            if secs == 0 {
                return Err(err(key, "must be at least 1 second"));
            }
        }
        if self.max_fleet == 0 {
            return Err(err("max_fleet", "must be at least 1 (the primary)"));
        }
        if self.warm_pool_size >= self.max_fleet {
            return Err(err(
                "warm_pool_size",
                format!(
                    "{} leaves no room for the primary under max_fleet {}",
                    self.warm_pool_size, self.max_fleet
                ),
            ));
        }
        if !self.daily_budget_usd.is_finite() || self.daily_budget_usd <= 0.0 {
            return Err(err(
                "daily_budget_usd",
                format!(
                    "must be a positive number of USD, got {}",
                    self.daily_budget_usd
                ),
            ));
        }
        let rent = &self.rent;
        if rent.providers.is_empty() {
            return Err(err("rent.providers", "name at least one provider"));
        }
        for (i, provider) in rent.providers.iter().enumerate() {
            if rent.providers[..i].contains(provider) {
                return Err(err("rent.providers", format!("{provider} is listed twice")));
            }
        }
        if self.warm_pool_size > 0 && !rent.providers.iter().any(|p| p.can_pause()) {
            return Err(err(
                "warm_pool_size",
                "a warm pool needs a provider whose hosts can be stopped (not only lambda) in rent.providers",
            ));
        }
        if rent.name_prefix.is_empty()
            || rent.name_prefix.len() > 32
            || !rent
                .name_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(err(
                "rent.name_prefix",
                format!(
                    "{:?} must be 1 to 32 ASCII letters, digits or dashes (it names hosts)",
                    rent.name_prefix
                ),
            ));
        }
        for (key, secs) in [
            ("rent.rent_timeout_s", rent.rent_timeout_s),
            ("rent.provision_timeout_s", rent.provision_timeout_s),
            ("rent.resume_timeout_s", rent.resume_timeout_s),
            ("rent.unhealthy_timeout_s", rent.unhealthy_timeout_s),
            ("rent.missing_grace_s", rent.missing_grace_s),
            ("rent.decision_timeout_s", rent.decision_timeout_s),
        ] {
            if secs == 0 {
                return Err(err(key, "must be at least 1 second"));
            }
        }
        Ok(())
    }

    /// Parses a `[policy]` table (TOML) and validates it.
    pub fn from_toml(text: &str) -> Result<PolicyConfig, ConfigError> {
        let config: PolicyConfig = toml::from_str(text).map_err(|e| ConfigError {
            key: "(toml)".to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_numbers_and_valid() {
        let c = PolicyConfig::default();
        c.validate().expect("valid");
        assert_eq!(c.resume_queue_depth, 10);
        assert_eq!(c.rent_queue_depth, 30);
        assert_eq!(c.quiet_queue_depth, 3);
        assert_eq!(c.quiet_for_s, 1800);
        assert_eq!(c.wait_targets.pro.wait_s, 30);
        assert_eq!(c.wait_targets.premium.wait_s, 120);
        assert_eq!(c.wait_targets.premium.wakes, Wake::Warm);
        assert_eq!(c.warm_release_after_s, 86_400);
        assert_eq!((c.util_warn_pct, c.util_warn_for_s), (20, 3600));
        assert_eq!((c.util_scale_down_pct, c.util_scale_down_for_s), (10, 7200));
    }

    #[test]
    fn partial_toml_keeps_defaults() {
        let c = PolicyConfig::from_toml(
            "primary = \"gpu-1\"\nmax_fleet = 8\n[wait_targets.pro]\nwait_s = 20\nwakes = \"any\"\n[rent]\nproviders = [\"lambda\", \"vast\"]\nspot = true\n",
        )
        .expect("test value");
        assert_eq!(c.primary.as_deref(), Some("gpu-1"));
        assert_eq!(c.max_fleet, 8);
        assert_eq!(c.wait_targets.pro.wait_s, 20);
        assert_eq!(c.wait_targets.premium.wait_s, 120);
        assert!(c.rent.spot);
        assert_eq!(c.rent.rent_timeout_s, 600);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = PolicyConfig::from_toml("resume_queue = 3\n").expect_err("must be refused");
        assert!(e.to_string().contains("resume_queue"), "{e}");
        let e =
            PolicyConfig::from_toml("[rent]\nprovider = \"vast\"\n").expect_err("must be refused");
        assert!(e.to_string().contains("provider"), "{e}");
        let e = PolicyConfig::from_toml("[rent]\nproviders = [\"aws\"]\n")
            .expect_err("must be refused");
        assert!(e.to_string().contains("aws"), "{e}");
    }

    #[test]
    fn validate_names_the_key() {
        type Change = fn(&mut PolicyConfig);
        let cases: Vec<(&str, Change)> = vec![
            ("policy.rent_queue_depth", |c| c.rent_queue_depth = 5),
            ("policy.quiet_queue_depth", |c| c.quiet_queue_depth = 0),
            ("policy.wait_targets.free.wakes", |c| {
                c.wait_targets.free.wakes = Wake::Any
            }),
            ("policy.wait_targets.pro.wait_s", |c| {
                c.wait_targets.pro.wait_s = 0
            }),
            ("policy.util_warn_pct", |c| c.util_warn_pct = 120),
            ("policy.util_scale_down_pct", |c| c.util_scale_down_pct = 30),
            ("policy.max_fleet", |c| c.max_fleet = 0),
            ("policy.warm_pool_size", |c| c.warm_pool_size = 5),
            ("policy.daily_budget_usd", |c| c.daily_budget_usd = f64::NAN),
            ("policy.daily_budget_usd", |c| c.daily_budget_usd = -1.0),
            ("policy.rent.providers", |c| c.rent.providers.clear()),
            ("policy.rent.providers", |c| {
                c.rent.providers = vec![ProviderKind::Vast, ProviderKind::Vast]
            }),
            ("policy.warm_pool_size", |c| {
                c.rent.providers = vec![ProviderKind::Lambda]
            }),
            ("policy.rent.name_prefix", |c| {
                c.rent.name_prefix = "a b".to_string()
            }),
            ("policy.rent.resume_timeout_s", |c| {
                c.rent.resume_timeout_s = 0
            }),
            ("policy.primary", |c| c.primary = Some(" ".to_string())),
        ];
        for (key, change) in cases {
            let mut c = PolicyConfig::default();
            change(&mut c);
            let e = c.validate().expect_err("must be refused");
            assert!(e.to_string().starts_with(key), "{key}: {e}");
        }
    }
}
