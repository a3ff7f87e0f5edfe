//! What a host costs per hour in each state, by its provider's billing rules (providers.md §1.7,
//! §2.7, §3.8). Pure: no I/O, no clock.
//!
//! A rate is split into GPU (compute) and storage, both USD per hour:
//!
//! - **Vast.ai**: GPU while billed running; storage (`storage_per_gb_month` × disk) from creation
//!   to destroy, *including while running*.
//! - **RunPod**: GPU while billed running; the volume at $0.10/GB-month while running and
//!   $0.20/GB-month while stopped.
//! - **Lambda Cloud**: the instance price from launch to terminate whatever its state (it has no
//!   stopped state), in whole minutes ([`round_lambda_life`]).
//! - **local**: the configured running price while running, the configured stopped price while
//!   stopped (either may be 0).
//!
//! "Billed running" is [`HostState::bills_gpu`] (provisioning, hot, draining). A failed host is
//! billed like a stopped one (its GPU is not working for us; its disk still exists), except on
//! Lambda, which bills until terminate. A released host costs nothing.

use serde::{Deserialize, Serialize};

use crate::fleet::HostState;
use crate::provider::ProviderKind;

/// Hours in a billing month, as providers convert $/GB-month to $/hour (365 × 24 / 12).
pub const HOURS_PER_MONTH: f64 = 730.0;

/// RunPod volume disk while the pod runs, USD per GB-month.
pub const RUNPOD_VOLUME_RUNNING_GB_MONTH: f64 = 0.10;
/// RunPod volume disk while the pod is stopped, USD per GB-month.
pub const RUNPOD_VOLUME_STOPPED_GB_MONTH: f64 = 0.20;

/// Lambda bills in one-minute increments.
pub const LAMBDA_INCREMENT_MS: i64 = 60_000;

/// The prices a host was rented at: what the ledger needs to apply its provider's rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pricing {
    /// USD per hour for the GPU(s) while running.
    pub price_per_hour: f64,
    /// USD per hour while stopped, for providers whose stopped price is a flat figure (local).
    pub stopped_price_per_hour: f64,
    /// Disk, GB (Vast storage, RunPod volume).
    pub disk_gb: u32,
    /// Vast's storage price, USD per GB-month (from the offer).
    pub storage_per_gb_month: Option<f64>,
}

/// USD per hour in one state, split into GPU and storage.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Rate {
    pub gpu_per_hour: f64,
    pub storage_per_hour: f64,
}

impl Rate {
    pub fn total(&self) -> f64 {
        self.gpu_per_hour + self.storage_per_hour
    }
}

/// The rate a host of `provider` with `pricing` is billed at while in `state`.
pub fn rate(provider: ProviderKind, pricing: &Pricing, state: HostState) -> Rate {
    let gpu_running = if state.bills_gpu() {
        sane(pricing.price_per_hour)
    } else {
        0.0
    };
    let per_gb_month = |usd: f64| sane(usd) * f64::from(pricing.disk_gb) / HOURS_PER_MONTH;
    match (provider, state) {
        (_, HostState::Released) => Rate::default(),
        (ProviderKind::Vast, _) => Rate {
            gpu_per_hour: gpu_running,
            storage_per_hour: per_gb_month(pricing.storage_per_gb_month.unwrap_or(0.0)),
        },
        (ProviderKind::Runpod, state) => Rate {
            gpu_per_hour: gpu_running,
            storage_per_hour: per_gb_month(if state.bills_gpu() {
                RUNPOD_VOLUME_RUNNING_GB_MONTH
            } else {
                RUNPOD_VOLUME_STOPPED_GB_MONTH
            }),
        },
        (ProviderKind::Lambda, _) => Rate {
            gpu_per_hour: sane(pricing.price_per_hour),
            storage_per_hour: 0.0,
        },
        (ProviderKind::Local, state) => Rate {
            gpu_per_hour: gpu_running,
            storage_per_hour: if state.bills_gpu() {
                0.0
            } else {
                sane(pricing.stopped_price_per_hour)
            },
        },
    }
}

/// USD for `ms` milliseconds at `per_hour`.
pub fn cost_of(per_hour: f64, ms: i64) -> f64 {
    if ms <= 0 {
        return 0.0;
    }
    per_hour * ms as f64 / 3_600_000.0
}

/// Lambda's billed life of a host launched at `rented_at_ms` and terminated at `released_at_ms`:
/// the end rounded up to a whole number of minutes after the launch.
pub fn round_lambda_life(rented_at_ms: i64, released_at_ms: i64) -> i64 {
    let life = (released_at_ms - rented_at_ms).max(0);
    let minutes = (life + LAMBDA_INCREMENT_MS - 1) / LAMBDA_INCREMENT_MS;
    rented_at_ms + minutes * LAMBDA_INCREMENT_MS
}

/// A price that is not a finite non-negative number counts as 0 (the inventory refuses such
/// prices; this keeps the arithmetic total anyway).
fn sane(price: f64) -> f64 {
    if price.is_finite() && price > 0.0 {
        price
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pricing() -> Pricing {
        Pricing {
            price_per_hour: 0.40,
            stopped_price_per_hour: 0.02,
            disk_gb: 73,
            storage_per_gb_month: Some(0.15),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn vast_bills_storage_in_every_state_until_destroyed() {
        let storage = 0.15 * 73.0 / 730.0;
        let hot = rate(ProviderKind::Vast, &pricing(), HostState::Hot);
        assert!(close(hot.gpu_per_hour, 0.40));
        assert!(close(hot.storage_per_hour, storage));
        let warm = rate(ProviderKind::Vast, &pricing(), HostState::Warm);
        assert!(close(warm.gpu_per_hour, 0.0));
        assert!(close(warm.storage_per_hour, storage));
        assert_eq!(
            rate(ProviderKind::Vast, &pricing(), HostState::Released).total(),
            0.0
        );
    }

    #[test]
    fn runpod_volume_costs_twice_as_much_stopped() {
        let hot = rate(ProviderKind::Runpod, &pricing(), HostState::Hot);
        assert!(close(hot.gpu_per_hour, 0.40));
        assert!(close(hot.storage_per_hour, 0.10 * 73.0 / 730.0));
        let warm = rate(ProviderKind::Runpod, &pricing(), HostState::Warm);
        assert!(close(warm.gpu_per_hour, 0.0));
        assert!(close(warm.storage_per_hour, 0.20 * 73.0 / 730.0));
        assert!(close(warm.storage_per_hour, 2.0 * hot.storage_per_hour));
    }

    #[test]
    fn lambda_bills_the_instance_in_every_state_and_rounds_to_minutes() {
        for state in [HostState::Provisioning, HostState::Hot, HostState::Failed] {
            let r = rate(ProviderKind::Lambda, &pricing(), state);
            assert!(close(r.gpu_per_hour, 0.40), "{state}");
            assert_eq!(r.storage_per_hour, 0.0);
        }
        assert_eq!(round_lambda_life(1_000, 1_000), 1_000);
        assert_eq!(round_lambda_life(1_000, 1_001), 61_000);
        assert_eq!(round_lambda_life(1_000, 61_000), 61_000);
        assert_eq!(round_lambda_life(1_000, 61_001), 121_000);
    }

    #[test]
    fn local_uses_the_configured_prices() {
        let hot = rate(ProviderKind::Local, &pricing(), HostState::Draining);
        assert!(close(hot.total(), 0.40));
        let warm = rate(ProviderKind::Local, &pricing(), HostState::Warm);
        assert!(close(warm.gpu_per_hour, 0.0));
        assert!(close(warm.storage_per_hour, 0.02));
    }

    #[test]
    fn cost_is_rate_times_time() {
        assert!(close(cost_of(0.40, 3_600_000), 0.40));
        assert!(close(cost_of(0.40, 90 * 60_000), 0.60));
        assert_eq!(cost_of(0.40, -5), 0.0);
        let bad = Pricing {
            price_per_hour: f64::NAN,
            ..pricing()
        };
        assert_eq!(rate(ProviderKind::Local, &bad, HostState::Hot).total(), 0.0);
    }
}
