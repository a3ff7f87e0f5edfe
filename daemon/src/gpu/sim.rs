//! A simulated RTX 4090 whose readings follow the node's real load, for tests, the demo and hosts
//! without a GPU (`gpu.source = "sim"`).
//!
//! The physics is one pure function, [`sim_step`]: every quantity moves toward a target with a
//! first-order lag, and the targets carry a little noise drawn from the caller's RNG, so a run is
//! deterministic given a seed. Utilization and power follow the load within a second or two,
//! VRAM follows it (the model stays resident when idle), and the temperature follows the power
//! with a slower thermal lag. Every target lies inside the card's physical range, so the state
//! never leaves it, whatever the load sequence or step length.
//!
//! This module never touches NVML, the clock or the OS beyond reading the host name once.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::{GpuProcess, GpuReading, SimLoad};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// VRAM of the simulated card (an RTX 4090 has 24 GiB).
pub const SIM_MEM_TOTAL_BYTES: u64 = 24 * 1024 * 1024 * 1024;
/// Enforced power limit of the simulated card, milliwatts (an RTX 4090's stock 450 W).
pub const SIM_POWER_LIMIT_MW: u32 = 450_000;

/// A band the noisy target of one quantity is drawn from: `center ± half_width`.
#[derive(Clone, Copy, Debug)]
struct Band {
    center: f64,
    half_width: f64,
}

impl Band {
    const fn new(low: f64, high: f64) -> Band {
        Band {
            center: (low + high) / 2.0,
            half_width: (high - low) / 2.0,
        }
    }

    fn draw(self, rng: &mut impl Rng) -> f64 {
        self.center + self.half_width * rng.random_range(-1.0..=1.0)
    }
}

// Targets while a job runs and while the card idles with the model resident.
const UTIL_BUSY: Band = Band::new(95.5, 100.0);
const UTIL_IDLE: Band = Band::new(0.0, 3.0);
const MEM_UTIL_BUSY: Band = Band::new(40.0, 60.0);
const MEM_UTIL_IDLE: Band = Band::new(0.0, 1.0);
const MEM_BUSY_GIB: Band = Band::new(18.2, 20.8);
const MEM_IDLE_GIB: Band = Band::new(9.1, 9.9);
const POWER_BUSY_W: Band = Band::new(405.0, 445.0);
const POWER_IDLE_W: Band = Band::new(26.0, 34.0);
/// Steady temperature = `TEMP_BASE_C + TEMP_C_PER_W × power` ± `TEMP_NOISE_C`: about 37-39 °C at
/// idle power and 72-76 °C at full power.
const TEMP_BASE_C: f64 = 35.5;
const TEMP_C_PER_W: f64 = 0.0905;
const TEMP_NOISE_C: f64 = 1.0;

// Time constants of the first-order lags, seconds.
const TAU_UTIL_S: f64 = 1.0;
const TAU_POWER_S: f64 = 0.8;
const TAU_MEM_RISE_S: f64 = 1.5;
const TAU_MEM_FALL_S: f64 = 4.0;
const TAU_TEMP_S: f64 = 25.0;

/// The simulated card's physical state. Every field stays within the card's range:
/// percentages in 0..=100, memory in 0..=24 GiB, power in 0..=450 W, temperature 20..=90 °C.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimState {
    pub util_gpu_pct: f64,
    pub util_mem_pct: f64,
    pub mem_used_bytes: f64,
    pub power_w: f64,
    pub temperature_c: f64,
}

impl SimState {
    /// A card that has been idle for a while with the model resident.
    pub fn idle() -> SimState {
        SimState {
            util_gpu_pct: UTIL_IDLE.center,
            util_mem_pct: MEM_UTIL_IDLE.center,
            mem_used_bytes: MEM_IDLE_GIB.center * GIB,
            power_w: POWER_IDLE_W.center,
            temperature_c: TEMP_BASE_C + TEMP_C_PER_W * POWER_IDLE_W.center,
        }
    }
}

/// Moves `value` toward `target` by the fraction of the gap a first-order lag with time constant
/// `tau_s` closes in `dt_s` (between 0 and 1, so the result lies between the two).
fn lag(value: f64, target: f64, dt_s: f64, tau_s: f64) -> f64 {
    let alpha = 1.0 - (-dt_s / tau_s).exp();
    value + (target - value) * alpha.clamp(0.0, 1.0)
}

/// One step of the simulated card: `dt` of time under `load`. Pure: the same state, load, step
/// and RNG state give the same result.
pub fn sim_step(state: SimState, load: SimLoad, dt: Duration, rng: &mut impl Rng) -> SimState {
    let dt_s = dt.as_secs_f64();
    let (util, mem_util, mem_gib, power) = if load.busy {
        (UTIL_BUSY, MEM_UTIL_BUSY, MEM_BUSY_GIB, POWER_BUSY_W)
    } else {
        (UTIL_IDLE, MEM_UTIL_IDLE, MEM_IDLE_GIB, POWER_IDLE_W)
    };
    let mem_target = mem_gib.draw(rng) * GIB;
    let mem_tau = if mem_target > state.mem_used_bytes {
        TAU_MEM_RISE_S
    } else {
        TAU_MEM_FALL_S
    };
    let power_w = lag(state.power_w, power.draw(rng), dt_s, TAU_POWER_S);
    let temp_target =
        TEMP_BASE_C + TEMP_C_PER_W * power_w + TEMP_NOISE_C * rng.random_range(-1.0..=1.0);
    SimState {
        util_gpu_pct: lag(state.util_gpu_pct, util.draw(rng), dt_s, TAU_UTIL_S).clamp(0.0, 100.0),
        util_mem_pct: lag(state.util_mem_pct, mem_util.draw(rng), dt_s, TAU_UTIL_S)
            .clamp(0.0, 100.0),
        mem_used_bytes: lag(state.mem_used_bytes, mem_target, dt_s, mem_tau)
            .clamp(0.0, SIM_MEM_TOTAL_BYTES as f64),
        power_w: power_w.clamp(0.0, f64::from(SIM_POWER_LIMIT_MW) / 1000.0),
        temperature_c: lag(state.temperature_c, temp_target, dt_s, TAU_TEMP_S).clamp(20.0, 90.0),
    }
}

/// Memory the driver keeps for itself and no process is charged for.
const DRIVER_RESERVED_BYTES: u64 = 300 * 1024 * 1024;

/// A simulated card: its identity, its state and the RNG that drives its noise.
#[derive(Debug)]
pub struct SimGpu {
    name: String,
    uuid: String,
    pid: u32,
    state: SimState,
    rng: StdRng,
}

impl SimGpu {
    /// A card named `name` whose uuid and noise derive from `host` and `seed` only, so the same
    /// host and seed give the same card and the same readings for the same loads and steps.
    /// `pid` is the process reported on the card (the sim has no real one).
    pub fn new(name: &str, host: &str, seed: u64, pid: u32) -> SimGpu {
        let mut hasher = Sha256::new();
        hasher.update(b"kiln-sim-gpu\0");
        hasher.update(host.as_bytes());
        hasher.update(b"\0");
        hasher.update(seed.to_le_bytes());
        let digest = hasher.finalize();
        let hex = hex::encode(&digest[..16]);
        let uuid = format!(
            "GPU-{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        );
        let mut rng_seed = [0u8; 32];
        rng_seed.copy_from_slice(&digest);
        SimGpu {
            name: name.to_string(),
            uuid,
            pid,
            state: SimState::idle(),
            rng: StdRng::from_seed(rng_seed),
        }
    }

    /// The card's uuid (`GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The current physical state.
    pub fn state(&self) -> SimState {
        self.state
    }

    /// Advances the card by `dt` under `load`.
    pub fn step(&mut self, load: SimLoad, dt: Duration) {
        self.state = sim_step(self.state, load, dt, &mut self.rng);
    }

    /// The card's reading as NVML would report it (index 0).
    pub fn reading(&self) -> GpuReading {
        let s = self.state;
        let mem_used = s.mem_used_bytes.round() as u64;
        GpuReading {
            index: 0,
            name: Some(self.name.clone()),
            uuid: Some(self.uuid.clone()),
            util_gpu_pct: Some(s.util_gpu_pct.round() as u32),
            util_mem_pct: Some(s.util_mem_pct.round() as u32),
            mem_used_bytes: Some(mem_used),
            mem_total_bytes: Some(SIM_MEM_TOTAL_BYTES),
            temperature_c: Some(s.temperature_c.round() as u32),
            power_mw: Some((s.power_w * 1000.0).round() as u32),
            power_limit_mw: Some(SIM_POWER_LIMIT_MW),
            processes: Some(vec![GpuProcess {
                pid: self.pid,
                used_memory_bytes: Some(mem_used.saturating_sub(DRIVER_RESERVED_BYTES)),
            }]),
        }
    }
}

/// This host's name for the sim's identity (`/proc/sys/kernel/hostname`, else "localhost").
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn in_physical_range(s: &SimState) -> bool {
        (0.0..=100.0).contains(&s.util_gpu_pct)
            && (0.0..=100.0).contains(&s.util_mem_pct)
            && (0.0..=SIM_MEM_TOTAL_BYTES as f64).contains(&s.mem_used_bytes)
            && (0.0..=450.0).contains(&s.power_w)
            && (20.0..=90.0).contains(&s.temperature_c)
    }

    fn run(state: SimState, busy: bool, seconds: u32, rng: &mut StdRng) -> SimState {
        let mut s = state;
        for _ in 0..seconds * 2 {
            s = sim_step(s, SimLoad { busy }, Duration::from_millis(500), rng);
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the loads and step lengths, the card stays within its physical range and
        /// every reading is a plausible NVML value.
        #[test]
        fn stays_within_physical_bounds(
            seed in any::<u64>(),
            steps in proptest::collection::vec((any::<bool>(), 0u64..20_000), 1000..3000),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut gpu = SimGpu::new("sim", "host", seed, 42);
            let mut state = SimState::idle();
            for (busy, dt_ms) in steps {
                let load = SimLoad { busy };
                let dt = Duration::from_millis(dt_ms);
                state = sim_step(state, load, dt, &mut rng);
                prop_assert!(in_physical_range(&state), "out of range: {state:?}");
                gpu.step(load, dt);
                let r = gpu.reading();
                prop_assert!(r.util_gpu_pct.is_some_and(|u| u <= 100));
                prop_assert!(r.mem_used_bytes <= r.mem_total_bytes);
                prop_assert!(r.power_mw <= r.power_limit_mw);
                prop_assert!(r.temperature_c.is_some_and(|t| (20..=90).contains(&t)));
            }
        }

        /// Same seed, same loads, same steps: same readings.
        #[test]
        fn deterministic_given_a_seed(
            seed in any::<u64>(),
            steps in proptest::collection::vec((any::<bool>(), 1u64..5_000), 1..200),
        ) {
            let mut a = SimGpu::new("sim", "host", seed, 1);
            let mut b = SimGpu::new("sim", "host", seed, 1);
            for (busy, dt_ms) in steps {
                a.step(SimLoad { busy }, Duration::from_millis(dt_ms));
                b.step(SimLoad { busy }, Duration::from_millis(dt_ms));
            }
            prop_assert_eq!(a.reading(), b.reading());
        }
    }

    #[test]
    fn busy_card_heats_up_to_the_load_bands() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let idle = run(SimState::idle(), false, 300, &mut rng);
            let after_1s = run(idle, true, 1, &mut rng);
            let after_10s = run(after_1s, true, 9, &mut rng);
            let steady = run(after_10s, true, 300, &mut rng);
            assert!(
                after_1s.util_gpu_pct > idle.util_gpu_pct + 30.0,
                "{after_1s:?}"
            );
            assert!(
                after_10s.temperature_c > idle.temperature_c + 5.0,
                "{after_10s:?}"
            );
            assert!(steady.temperature_c > after_10s.temperature_c, "{steady:?}");
            assert!((95.0..=100.0).contains(&steady.util_gpu_pct), "{steady:?}");
            let gib = steady.mem_used_bytes / GIB;
            assert!((18.0..=21.0).contains(&gib), "{gib} GiB");
            assert!((70.0..=78.0).contains(&steady.temperature_c), "{steady:?}");
            assert!((400.0..=450.0).contains(&steady.power_w), "{steady:?}");
        }
    }

    #[test]
    fn idle_card_cools_down_to_the_idle_bands() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let hot = run(SimState::idle(), true, 300, &mut rng);
            let after_10s = run(hot, false, 10, &mut rng);
            let steady = run(after_10s, false, 300, &mut rng);
            assert!(
                after_10s.temperature_c < hot.temperature_c - 5.0,
                "{after_10s:?}"
            );
            assert!(after_10s.util_gpu_pct <= 3.5, "{after_10s:?}");
            assert!(steady.temperature_c < after_10s.temperature_c, "{steady:?}");
            assert!((0.0..=3.0).contains(&steady.util_gpu_pct), "{steady:?}");
            let gib = steady.mem_used_bytes / GIB;
            assert!((9.0..=10.0).contains(&gib), "{gib} GiB");
            assert!((35.0..=40.0).contains(&steady.temperature_c), "{steady:?}");
            assert!((25.0..=35.0).contains(&steady.power_w), "{steady:?}");
        }
    }

    #[test]
    fn readings_change_smoothly_between_steps() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut state = SimState::idle();
        for i in 0..2000 {
            let busy = (i / 100) % 2 == 0;
            let next = sim_step(
                state,
                SimLoad { busy },
                Duration::from_millis(100),
                &mut rng,
            );
            // In 100 ms a first-order lag closes at most about 12 % of any gap.
            assert!((next.temperature_c - state.temperature_c).abs() < 1.0);
            assert!((next.util_gpu_pct - state.util_gpu_pct).abs() < 15.0);
            state = next;
        }
    }

    #[test]
    fn identity_is_stable_per_host_and_seed() {
        let a = SimGpu::new("sim", "host-a", 1, 10);
        assert_eq!(a.uuid(), SimGpu::new("sim", "host-a", 1, 10).uuid());
        assert_ne!(a.uuid(), SimGpu::new("sim", "host-b", 1, 10).uuid());
        assert_ne!(a.uuid(), SimGpu::new("sim", "host-a", 2, 10).uuid());
        assert_eq!(a.uuid().len(), "GPU-".len() + 36);
        let reading = a.reading();
        assert_eq!(reading.mem_total_bytes, Some(SIM_MEM_TOTAL_BYTES));
        assert_eq!(reading.processes.map(|p| p.len()), Some(1));
    }
}
