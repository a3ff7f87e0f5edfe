//! The node's GPU readings: NVML on a GPU host, a simulated RTX 4090 that follows the node's load
//! for tests and the demo, or nothing (with a note saying why) on a host without a driver.
//!
//! [`GpuMonitor`] polls on its own std thread every `gpu.poll_interval_ms` and publishes a
//! [`GpuSnapshot`] through a `tokio::sync::watch` channel; the gossip and the API read the latest
//! one. `kilnd gpu` ([`print_once`]) prints one reading as JSON.
//!
//! Invariants:
//! - NVML is never called on the async runtime: it blocks for micro- to milliseconds per call.
//! - A missing GPU never stops a node: with `gpu.source = "auto"` and no driver the monitor logs
//!   one warning and publishes "none" snapshots carrying the reason. Only a forced `"nvml"` or a
//!   configured `gpu.nvml_library` that is not an NVML library makes [`GpuMonitor::start`] fail.
//! - A field a card does not support is `None`, never an error.
//!
//! # Layout
//! - [`nvml`]: NVML init, error sorting and one poll of every device.
//! - [`sim`]: the simulated card, its pure step function [`sim::sim_step`] and its identity.

pub mod nvml;
pub mod sim;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use self::nvml::{NvmlOpenError, NvmlReader};
use self::sim::SimGpu;

/// Where readings come from. Config value: "auto" (NVML if it loads, else none), "nvml", "sim",
/// "none".
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    #[default]
    Auto,
    Nvml,
    Sim,
    None,
}

/// `[gpu]` section of the node config.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Where readings come from (default `auto`).
    pub source: GpuSource,
    /// How often the GPUs are read, milliseconds (default 1000; 200 to 60000).
    pub poll_interval_ms: u64,
    /// Load NVML from this file instead of `libnvidia-ml.so.1`. A file named here that is not an
    /// NVML library is an error even with `source = "auto"`.
    pub nvml_library: Option<PathBuf>,
    /// The simulated card's name (default "NVIDIA GeForce RTX 4090 (simulated)").
    pub sim_name: String,
    /// Mixed with the host name into the simulated card's uuid and noise (default 0). Nodes that
    /// share a host (tests, the demo) give each a different seed.
    pub sim_seed: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            source: GpuSource::Auto,
            poll_interval_ms: 1000,
            nvml_library: None,
            sim_name: DEFAULT_SIM_NAME.to_string(),
            sim_seed: 0,
        }
    }
}

/// The simulated card's default name.
pub const DEFAULT_SIM_NAME: &str = "NVIDIA GeForce RTX 4090 (simulated)";

/// NVML's longest device name (`NVML_DEVICE_NAME_V2_BUFFER_SIZE` less the NUL).
const MAX_SIM_NAME_LEN: usize = 95;

impl GpuConfig {
    /// Checks the values; the message names the offending `gpu.<key>`.
    pub fn validate(&self) -> Result<(), String> {
        if !(200..=60_000).contains(&self.poll_interval_ms) {
            return Err(format!(
                "gpu.poll_interval_ms: must be between 200 and 60000 milliseconds, got {}",
                self.poll_interval_ms
            ));
        }
        if let Some(path) = &self.nvml_library
            && path.as_os_str().is_empty()
        {
            return Err(
                "gpu.nvml_library: must not be empty (leave it out for the default)".into(),
            );
        }
        if self.sim_name.trim().is_empty() || self.sim_name.len() > MAX_SIM_NAME_LEN {
            return Err(format!(
                "gpu.sim_name: must be 1 to {MAX_SIM_NAME_LEN} bytes and not blank"
            ));
        }
        if self.sim_name.chars().any(char::is_control) {
            return Err("gpu.sim_name: must not contain control characters".into());
        }
        Ok(())
    }

    /// How often the monitor polls.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
}

/// One card's reading; a field the card does not support is None (never an error).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct GpuReading {
    pub index: u32,
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub util_gpu_pct: Option<u32>,
    pub util_mem_pct: Option<u32>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub temperature_c: Option<u32>,
    pub power_mw: Option<u32>,
    pub power_limit_mw: Option<u32>,
    /// Running compute processes. Inside a container NVML may report host PIDs.
    pub processes: Option<Vec<GpuProcess>>,
}

impl GpuReading {
    /// A reading of card `index` with no field known.
    pub fn empty(index: u32) -> GpuReading {
        GpuReading {
            index,
            name: None,
            uuid: None,
            util_gpu_pct: None,
            util_mem_pct: None,
            mem_used_bytes: None,
            mem_total_bytes: None,
            temperature_c: None,
            power_mw: None,
            power_limit_mw: None,
            processes: None,
        }
    }
}

/// A compute process on a card.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// Every card's reading at one moment, and where they came from.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct GpuSnapshot {
    /// "nvml" | "sim" | "none".
    pub source: &'static str,
    /// NVML's driver version, when known.
    pub driver_version: Option<String>,
    /// Why there is no reading (e.g. "no NVIDIA driver: …").
    pub note: Option<String>,
    pub gpus: Vec<GpuReading>,
    /// When the reading was taken, ms since the Unix epoch.
    pub read_at_ms: u64,
}

impl GpuSnapshot {
    /// A snapshot with no GPU and the reason.
    pub fn none(note: impl Into<String>) -> GpuSnapshot {
        GpuSnapshot {
            source: "none",
            driver_version: None,
            note: Some(note.into()),
            gpus: Vec::new(),
            read_at_ms: unix_ms(),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The load the sim follows; the node sets it as jobs start and end.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SimLoad {
    pub busy: bool,
}

/// The note of a monitor configured off.
const SOURCE_NONE_NOTE: &str = "GPU readings are off (gpu.source = \"none\")";

/// What the polling thread reads. Both boxed: NVML's table of function pointers is about 12 KB
/// and the sim's RNG about 300 bytes.
enum Poller {
    Nvml(Box<NvmlReader>),
    Sim(Box<SimPoller>),
}

struct SimPoller {
    gpu: SimGpu,
    // The polling thread runs on wall-clock time (it sleeps in `recv_timeout`), so the sim steps
    // by real elapsed time; tokio's paused clock does not apply to it.
    last: std::time::Instant,
}

impl Poller {
    fn sim(config: &GpuConfig) -> Poller {
        Poller::Sim(Box::new(SimPoller {
            gpu: SimGpu::new(
                &config.sim_name,
                &sim::host_name(),
                config.sim_seed,
                std::process::id(),
            ),
            last: std::time::Instant::now(),
        }))
    }

    fn poll(&mut self, load: SimLoad) -> GpuSnapshot {
        match self {
            Poller::Nvml(reader) => nvml_snapshot(reader),
            Poller::Sim(sim) => {
                let now = std::time::Instant::now();
                // Any step length is fine: after a long one the lags have simply settled.
                sim.gpu.step(load, now.duration_since(sim.last));
                sim.last = now;
                sim_snapshot(&sim.gpu)
            }
        }
    }
}

fn nvml_snapshot(reader: &mut NvmlReader) -> GpuSnapshot {
    let poll = reader.read();
    GpuSnapshot {
        source: "nvml",
        driver_version: reader.driver_version().map(str::to_string),
        note: poll.note,
        gpus: poll.gpus,
        read_at_ms: unix_ms(),
    }
}

fn sim_snapshot(gpu: &SimGpu) -> GpuSnapshot {
    GpuSnapshot {
        source: "sim",
        driver_version: None,
        note: None,
        gpus: vec![gpu.reading()],
        read_at_ms: unix_ms(),
    }
}

/// Polls the node's GPUs on a dedicated thread and publishes the latest [`GpuSnapshot`].
/// Dropping it stops the thread (at once: the thread waits on a channel the drop closes) and
/// closes the subscribers' channels.
#[derive(Debug)]
pub struct GpuMonitor {
    snapshots: watch::Receiver<GpuSnapshot>,
    /// Kept so subscribers of a monitor without a thread (source "none") stay open until drop.
    _sender: Arc<watch::Sender<GpuSnapshot>>,
    /// Dropping it wakes the thread and makes it exit.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GpuMonitor {
    /// Starts polling on a dedicated std thread. Never fails for lack of a GPU: with `auto` and
    /// no driver it logs one warning and publishes snapshots with source "none" and the note.
    /// Fails when the config is invalid, when `nvml` is forced and NVML cannot start, or when a
    /// configured `nvml_library` is not an NVML library.
    ///
    /// Blocks for NVML's init (about 10 ms on a GPU host) and the first reading.
    pub fn start(config: &GpuConfig, load: watch::Receiver<SimLoad>) -> anyhow::Result<GpuMonitor> {
        config.validate().map_err(anyhow::Error::msg)?;
        let library = config.nvml_library.as_deref();
        let opened = match config.source {
            GpuSource::None => {
                return Ok(Self::without_thread(GpuSnapshot::none(SOURCE_NONE_NOTE)));
            }
            GpuSource::Sim => {
                return Self::with_thread(Poller::sim(config), config.poll_interval(), load);
            }
            GpuSource::Auto | GpuSource::Nvml => NvmlReader::open(library),
        };
        let poller = match (opened, config.source) {
            (Ok(reader), _) => Poller::Nvml(Box::new(reader)),
            (Err(error @ NvmlOpenError::BadLibrary { .. }), _) if library.is_some() => {
                anyhow::bail!("gpu.nvml_library: {error}")
            }
            (Err(error), GpuSource::Nvml) => anyhow::bail!("gpu.source = \"nvml\": {error}"),
            (Err(error), _) => {
                let note = error.to_string();
                tracing::warn!(
                    %note,
                    "no GPU readings: running without GPU metrics (gpu.source = \"auto\")"
                );
                return Ok(Self::without_thread(GpuSnapshot::none(note)));
            }
        };
        Self::with_thread(poller, config.poll_interval(), load)
    }

    fn without_thread(snapshot: GpuSnapshot) -> GpuMonitor {
        let (sender, snapshots) = watch::channel(snapshot);
        GpuMonitor {
            snapshots,
            _sender: Arc::new(sender),
            stop: None,
            thread: None,
        }
    }

    fn with_thread(
        mut poller: Poller,
        interval: Duration,
        load: watch::Receiver<SimLoad>,
    ) -> anyhow::Result<GpuMonitor> {
        let first = poller.poll(*load.borrow());
        let (sender, snapshots) = watch::channel(first);
        let sender = Arc::new(sender);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread_sender = Arc::clone(&sender);
        let thread = std::thread::Builder::new()
            .name("kiln-gpu".to_string())
            .spawn(move || poll_loop(poller, interval, &thread_sender, &stopped, &load))
            .context("cannot start the GPU polling thread")?;
        Ok(GpuMonitor {
            snapshots,
            _sender: sender,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A receiver of every new snapshot; it reports closed once the monitor is dropped.
    pub fn subscribe(&self) -> watch::Receiver<GpuSnapshot> {
        self.snapshots.clone()
    }

    /// The latest snapshot.
    pub fn latest(&self) -> GpuSnapshot {
        self.snapshots.borrow().clone()
    }
}

/// Reads every `interval` until the stop channel closes.
fn poll_loop(
    mut poller: Poller,
    interval: Duration,
    snapshots: &watch::Sender<GpuSnapshot>,
    stopped: &mpsc::Receiver<()>,
    load: &watch::Receiver<SimLoad>,
) {
    loop {
        match stopped.recv_timeout(interval) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let current_load = *load.borrow();
        snapshots.send_replace(poller.poll(current_load));
    }
}

impl Drop for GpuMonitor {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the GPU polling thread panicked");
        }
    }
}

/// One reading for `kilnd gpu`: prints the snapshot as pretty JSON to stdout; no driver → exit 1
/// with one clear line on stderr. `GpuSource::Sim` prints a synthetic reading, `GpuSource::None`
/// an empty snapshot; `Auto` and `Nvml` both read NVML.
pub fn print_once(source: GpuSource, nvml_library: Option<&Path>) -> ExitCode {
    let snapshot = match source {
        GpuSource::None => GpuSnapshot::none(SOURCE_NONE_NOTE),
        GpuSource::Sim => {
            let mut gpu = SimGpu::new(DEFAULT_SIM_NAME, &sim::host_name(), 0, std::process::id());
            gpu.step(SimLoad::default(), Duration::from_secs(1));
            sim_snapshot(&gpu)
        }
        GpuSource::Auto | GpuSource::Nvml => match NvmlReader::open(nvml_library) {
            Ok(mut reader) => nvml_snapshot(&mut reader),
            Err(error) => {
                eprintln!("kilnd gpu: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let written = serde_json::to_string_pretty(&snapshot)
        .map_err(anyhow::Error::from)
        .and_then(|json| Ok(writeln!(std::io::stdout().lock(), "{json}")?));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kilnd gpu: cannot print the reading: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Arguments of `kilnd gpu`.
#[derive(Debug, clap::Args)]
pub struct GpuArgs {
    /// Print a reading of the simulated card instead of reading NVML.
    #[arg(long, conflicts_with = "nvml_library")]
    pub sim: bool,
    /// Load NVML from this file instead of libnvidia-ml.so.1.
    #[arg(long, value_name = "FILE")]
    pub nvml_library: Option<PathBuf>,
}

/// `kilnd gpu`: one reading as JSON.
pub fn command(args: GpuArgs) -> ExitCode {
    let source = if args.sim {
        GpuSource::Sim
    } else {
        GpuSource::Auto
    };
    print_once(source, args.nvml_library.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let config: GpuConfig = toml::from_str("").expect("empty section parses");
        assert_eq!(config, GpuConfig::default());
        assert_eq!(config.source, GpuSource::Auto);
        assert_eq!(config.poll_interval_ms, 1000);
        assert_eq!(config.sim_name, DEFAULT_SIM_NAME);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn every_source_parses_from_lowercase() {
        for (text, source) in [
            ("auto", GpuSource::Auto),
            ("nvml", GpuSource::Nvml),
            ("sim", GpuSource::Sim),
            ("none", GpuSource::None),
        ] {
            let config: GpuConfig =
                toml::from_str(&format!("source = \"{text}\"")).expect("source parses");
            assert_eq!(config.source, source);
        }
        let error = toml::from_str::<GpuConfig>("source = \"cuda\"")
            .expect_err("an unknown source is refused");
        assert!(error.to_string().contains("cuda"), "{error}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let error = toml::from_str::<GpuConfig>("poll_interval = 1000")
            .expect_err("a misspelt key is refused");
        assert!(error.to_string().contains("poll_interval"), "{error}");
    }

    #[test]
    fn validation_names_the_key() {
        let check = |text: &str| {
            toml::from_str::<GpuConfig>(text)
                .expect("parses")
                .validate()
                .expect_err("is refused")
        };
        assert!(check("poll_interval_ms = 199").starts_with("gpu.poll_interval_ms:"));
        assert!(check("poll_interval_ms = 60001").starts_with("gpu.poll_interval_ms:"));
        assert!(check("nvml_library = \"\"").starts_with("gpu.nvml_library:"));
        assert!(check("sim_name = \"  \"").starts_with("gpu.sim_name:"));
        assert!(check(&format!("sim_name = \"{}\"", "x".repeat(96))).starts_with("gpu.sim_name:"));
        assert!(check("sim_name = \"a\\nb\"").starts_with("gpu.sim_name:"));
        for ok in ["poll_interval_ms = 200", "poll_interval_ms = 60000"] {
            let config: GpuConfig = toml::from_str(ok).expect("parses");
            assert!(config.validate().is_ok(), "{ok}");
        }
    }

    #[test]
    fn snapshots_serialise_with_every_field() {
        let snapshot = GpuSnapshot::none("no NVIDIA driver: test");
        let json = serde_json::to_value(&snapshot).expect("serialises");
        assert_eq!(json["source"], "none");
        assert_eq!(json["note"], "no NVIDIA driver: test");
        assert_eq!(json["driver_version"], serde_json::Value::Null);
        assert!(json["read_at_ms"].as_u64().is_some_and(|ms| ms > 0));
        let reading = serde_json::to_value(GpuReading::empty(3)).expect("serialises");
        assert_eq!(reading["index"], 3);
        assert_eq!(reading["power_mw"], serde_json::Value::Null);
    }
}
