//! `kilnd comfy-sim`: a ComfyUI simulator that speaks the same HTTP and WebSocket API as the
//! real server (ComfyUI 0.3.64, as recorded in `daemon/tests/comfyui-recordings/`).
//!
//! It validates prompts the way ComfyUI does, queues them in memory, executes the model-free image
//! nodes for real (writing real PNG files) and simulates the model nodes (loaders, text encoders,
//! samplers, VAE) with configurable timings, producing deterministic images of the requested size.
//! Faults (crashes, hangs, node errors, out-of-memory, failed starts) can be injected by flags so
//! that the supervisor and the executor can be tested without a GPU.
//!
//! It must never be used as an image generator: its pictures are placeholders. Like the real
//! server it keeps queue and history in memory only; a restart forgets them.
//!
//! Entry points: [`main`] (the `kilnd comfy-sim` subcommand, builds its own runtime) and
//! [`serve`] (runs on a given listener until a shutdown future resolves; tests call it
//! in-process).

mod catalog;
mod http;
mod json;
mod nodes;
mod state;
mod validate;
mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub use state::ExecutedRecord;

/// Command-line flags of `kilnd comfy-sim`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: String,
    /// Port to listen on (0 picks a free port; then the readiness line shows the real one).
    #[arg(long, default_value_t = 8188)]
    pub port: u16,
    /// Base directory holding `input/`, `output/` and `temp/` (default: the current directory).
    #[arg(long)]
    pub base_dir: Option<PathBuf>,
    /// Output directory (default: BASE/output).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Input directory (default: BASE/input).
    #[arg(long)]
    pub input_dir: Option<PathBuf>,
    /// Temp directory, wiped at start (default: BASE/temp).
    #[arg(long)]
    pub temp_dir: Option<PathBuf>,
    /// GPU name reported by /system_stats.
    #[arg(long, default_value = "NVIDIA GeForce RTX 4090")]
    pub gpu_name: String,
    /// Total VRAM reported by /system_stats, in MiB.
    #[arg(long, default_value_t = 24564)]
    pub vram_mb: u64,
    /// Model files of one folder, as FOLDER=FILE[,FILE...]; repeatable. Replaces the default list
    /// of that folder (an empty list after `=` leaves the folder empty).
    #[arg(long = "models", value_name = "FOLDER=FILES")]
    pub models: Vec<String>,
    /// Simulated time of one sampler step (0 = instant).
    #[arg(long, default_value_t = 150)]
    pub step_time_ms: u64,
    /// Simulated time to load a checkpoint the first time it is used (0 = instant).
    #[arg(long, default_value_t = 3000)]
    pub model_load_ms: u64,
    /// Simulated time of one VAE decode or encode (0 = instant).
    #[arg(long, default_value_t = 200)]
    pub vae_time_ms: u64,
    /// Simulated time of one upscale tile (ImageUpscaleWithModel reports one progress tick per
    /// 512x512 tile with a 32-pixel overlap, as ComfyUI tiles; 0 = instant).
    #[arg(long, default_value_t = 60)]
    pub upscale_tile_ms: u64,
    /// Delay before the server starts listening, like ComfyUI's import time.
    #[arg(long, default_value_t = 2000)]
    pub startup_delay_ms: u64,
    /// Do not print `Starting server` and `To see the GUI go to: ...`.
    #[arg(long)]
    pub dont_print_server: bool,
    /// Write log lines to stdout instead of stderr.
    #[arg(long)]
    pub log_stdout: bool,
    /// Accepted for command-line compatibility with ComfyUI; the simulator never opens a browser.
    #[arg(long)]
    pub disable_auto_launch: bool,
    /// Abort the process (exit status 134) in the middle of executing prompt N+1.
    #[arg(long, value_name = "N")]
    pub crash_after_prompts: Option<u64>,
    /// A node of this class never finishes and ignores interrupts; repeatable.
    #[arg(long, value_name = "CLASS")]
    pub hang_node: Vec<String>,
    /// A node of this class fails with RuntimeError and the message, as CLASS:MESSAGE; repeatable.
    #[arg(long, value_name = "CLASS:MESSAGE")]
    pub fail_node: Vec<String>,
    /// A node of this class fails with torch.OutOfMemoryError; repeatable.
    #[arg(long, value_name = "CLASS")]
    pub oom_node: Vec<String>,
    /// Exit with status 1 during startup (after the startup delay), before listening.
    #[arg(long)]
    pub fail_startup: bool,
    /// Append one JSON line per prompt that reached execution_start to this file.
    #[arg(long, value_name = "FILE")]
    pub executed_log: Option<PathBuf>,
}

/// The validated configuration of one simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub listen: String,
    pub port: u16,
    pub output_dir: PathBuf,
    pub input_dir: PathBuf,
    pub temp_dir: PathBuf,
    pub gpu_name: String,
    pub vram_bytes: u64,
    /// Model files per folder (`checkpoints`, `loras`, `vae`, `upscale_models`, ...).
    pub models: BTreeMap<String, Vec<String>>,
    pub step_time: Duration,
    pub model_load_time: Duration,
    pub vae_time: Duration,
    pub upscale_tile_time: Duration,
    pub startup_delay: Duration,
    pub print_server: bool,
    pub log_stdout: bool,
    pub crash_after_prompts: Option<u64>,
    pub hang_nodes: Vec<String>,
    /// (class, message) pairs.
    pub fail_nodes: Vec<(String, String)>,
    pub oom_nodes: Vec<String>,
    pub fail_startup: bool,
    pub executed_log: Option<PathBuf>,
    /// What `/system_stats` reports as `system.argv`.
    pub argv: Vec<String>,
}

/// The model folders ComfyUI lists at `/models`, in its order.
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

/// The default model files: an SDXL setup.
pub fn default_models() -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = MODEL_FOLDERS
        .iter()
        .map(|f| ((*f).to_string(), Vec::new()))
        .collect();
    let mut set = |folder: &str, files: &[&str]| {
        m.insert(
            folder.to_string(),
            files.iter().map(|s| (*s).to_string()).collect(),
        );
    };
    set(
        "checkpoints",
        &[
            "sd_xl_base_1.0.safetensors",
            "sd_xl_refiner_1.0.safetensors",
        ],
    );
    set("loras", &["sd_xl_offset_example-lora_1.0.safetensors"]);
    set("vae", &["sdxl_vae.safetensors"]);
    set(
        "upscale_models",
        &["4x-UltraSharp.pth", "RealESRGAN_x2plus.pth"],
    );
    m
}

impl SimConfig {
    /// A configuration for in-process tests: everything under `base`, port 0, instant timings,
    /// no startup delay.
    pub fn for_tests(base: &std::path::Path) -> SimConfig {
        SimConfig {
            listen: "127.0.0.1".to_string(),
            port: 0,
            output_dir: base.join("output"),
            input_dir: base.join("input"),
            temp_dir: base.join("temp"),
            gpu_name: "NVIDIA GeForce RTX 4090".to_string(),
            vram_bytes: 24564 * 1024 * 1024,
            models: default_models(),
            step_time: Duration::ZERO,
            model_load_time: Duration::ZERO,
            vae_time: Duration::ZERO,
            upscale_tile_time: Duration::ZERO,
            startup_delay: Duration::ZERO,
            print_server: false,
            log_stdout: false,
            crash_after_prompts: None,
            hang_nodes: Vec::new(),
            fail_nodes: Vec::new(),
            oom_nodes: Vec::new(),
            fail_startup: false,
            executed_log: None,
            argv: vec!["main.py".to_string()],
        }
    }
}

impl TryFrom<SimArgs> for SimConfig {
    type Error = anyhow::Error;

    fn try_from(a: SimArgs) -> anyhow::Result<SimConfig> {
        let base = match a.base_dir {
            Some(b) => b,
            None => std::env::current_dir().context("reading the current directory")?,
        };
        let abs = |p: PathBuf| {
            std::path::absolute(&p).with_context(|| format!("resolving {}", p.display()))
        };
        let output_dir = abs(a.output_dir.unwrap_or_else(|| base.join("output")))?;
        let input_dir = abs(a.input_dir.unwrap_or_else(|| base.join("input")))?;
        let temp_dir = abs(a.temp_dir.unwrap_or_else(|| base.join("temp")))?;
        let mut models = default_models();
        for spec in &a.models {
            let (folder, files) = spec
                .split_once('=')
                .with_context(|| format!("--models {spec:?}: expected FOLDER=FILE[,FILE...]"))?;
            if folder.is_empty() {
                anyhow::bail!("--models {spec:?}: the folder name is empty");
            }
            let files: Vec<String> = files
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect();
            models.insert(folder.to_string(), files);
        }
        let mut fail_nodes = Vec::new();
        for spec in &a.fail_node {
            let (class, msg) = spec
                .split_once(':')
                .with_context(|| format!("--fail-node {spec:?}: expected CLASS:MESSAGE"))?;
            if class.is_empty() {
                anyhow::bail!("--fail-node {spec:?}: the class name is empty");
            }
            fail_nodes.push((class.to_string(), msg.to_string()));
        }
        Ok(SimConfig {
            listen: a.listen,
            port: a.port,
            output_dir,
            input_dir,
            temp_dir,
            gpu_name: a.gpu_name,
            vram_bytes: a.vram_mb.saturating_mul(1024 * 1024),
            models,
            step_time: Duration::from_millis(a.step_time_ms),
            model_load_time: Duration::from_millis(a.model_load_ms),
            vae_time: Duration::from_millis(a.vae_time_ms),
            upscale_tile_time: Duration::from_millis(a.upscale_tile_ms),
            startup_delay: Duration::from_millis(a.startup_delay_ms),
            print_server: !a.dont_print_server,
            log_stdout: a.log_stdout,
            crash_after_prompts: a.crash_after_prompts,
            hang_nodes: a.hang_node,
            fail_nodes,
            oom_nodes: a.oom_node,
            fail_startup: a.fail_startup,
            executed_log: a.executed_log,
            argv: std::env::args().collect(),
        })
    }
}

/// Writes one log line where ComfyUI would (stderr, or stdout with `--log-stdout`).
pub(crate) fn log_line(cfg: &SimConfig, line: &str) {
    if cfg.log_stdout {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    } else {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
    }
}

/// Creates the directories and wipes the temp directory, as ComfyUI does at start.
fn prepare_dirs(cfg: &SimConfig) -> anyhow::Result<()> {
    for d in [&cfg.output_dir, &cfg.input_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if cfg.temp_dir.exists() {
        std::fs::remove_dir_all(&cfg.temp_dir)
            .with_context(|| format!("wiping the temp directory {}", cfg.temp_dir.display()))?;
    }
    std::fs::create_dir_all(&cfg.temp_dir)
        .with_context(|| format!("creating {}", cfg.temp_dir.display()))?;
    Ok(())
}

/// Runs the simulator on `listener` until `shutdown` resolves. Creates the directories and
/// wipes the temp directory first. Does not print the readiness lines (see [`main`]).
pub async fn serve(
    config: SimConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    prepare_dirs(&config)?;
    let shared = state::Shared::new(Arc::new(config))?;
    serve_shared(shared, listener, shutdown).await
}

async fn serve_shared(
    shared: state::Shared,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let worker = tokio::spawn(worker::run(shared.clone()));
    let app = http::router(shared.clone());
    let stop = shared.stop_token();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.cancel();
        })
        .await
        .context("serving HTTP");
    shared.shutdown();
    worker.abort();
    let _ = worker.await;
    result
}

/// The `kilnd comfy-sim` subcommand: startup delay, log lines, bind, readiness line, serve until
/// SIGINT. SIGTERM keeps its default action (the process dies at once, status 143).
pub fn main(args: SimArgs) -> ExitCode {
    let cfg = match SimConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kilnd comfy-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    // One event loop, as in ComfyUI's own server; node work goes to blocking threads.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kilnd comfy-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(run_main(cfg));
    // Do not wait for a node that is still running on a blocking thread.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn run_main(cfg: SimConfig) -> ExitCode {
    log_line(&cfg, "Checkpoint files will always be loaded safely.");
    log_line(
        &cfg,
        &format!(
            "Total VRAM {} MB, total RAM 128000 MB",
            cfg.vram_bytes / (1024 * 1024)
        ),
    );
    log_line(&cfg, "pytorch version: 2.8.0+cu128");
    log_line(
        &cfg,
        &format!("Device: cuda:0 {} : cudaMallocAsync", cfg.gpu_name),
    );
    log_line(
        &cfg,
        "Python version: 3.11.7 (simulated by kilnd comfy-sim)",
    );
    log_line(&cfg, "ComfyUI version: 0.3.64");
    tokio::time::sleep(cfg.startup_delay).await;
    if cfg.fail_startup {
        log_line(&cfg, "Traceback (most recent call last):");
        log_line(
            &cfg,
            "RuntimeError: simulated startup failure (--fail-startup)",
        );
        return ExitCode::from(1);
    }
    if let Err(e) = prepare_dirs(&cfg) {
        log_line(&cfg, &format!("Error: {e:#}"));
        return ExitCode::from(1);
    }
    // Listen for SIGINT before the readiness line, so that a SIGINT right after it is handled.
    // SIGTERM keeps its default action.
    let mut sigint = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    {
        Ok(s) => s,
        Err(e) => {
            log_line(&cfg, &format!("Error: cannot listen for SIGINT: {e}"));
            return ExitCode::from(1);
        }
    };
    if cfg.print_server {
        log_line(&cfg, "Starting server");
        log_line(&cfg, "");
    }
    let addr = format!("{}:{}", cfg.listen, cfg.port);
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            log_line(&cfg, "Traceback (most recent call last):");
            let errno = e.raw_os_error().unwrap_or(0);
            log_line(
                &cfg,
                &format!(
                    "OSError: [Errno {errno}] error while attempting to bind on address ('{}', {}): {}",
                    cfg.listen,
                    cfg.port,
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        "address already in use".to_string()
                    } else {
                        e.to_string()
                    }
                ),
            );
            return ExitCode::from(1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(cfg.port);
    if cfg.print_server {
        let host = if cfg.listen == "0.0.0.0" {
            "127.0.0.1"
        } else {
            cfg.listen.as_str()
        };
        log_line(&cfg, &format!("To see the GUI go to: http://{host}:{port}"));
    }
    let shared = match state::Shared::new(Arc::new(cfg.clone())) {
        Ok(s) => s,
        Err(e) => {
            log_line(&cfg, &format!("Error: {e:#}"));
            return ExitCode::from(1);
        }
    };
    let server = serve_shared(shared.clone(), listener, std::future::pending());
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                log_line(&cfg, &format!("Error: {e:#}"));
            }
            ExitCode::from(1)
        }
        _ = sigint.recv() => {
            // Like ComfyUI: an idle server stops cleanly; a busy one aborts (status 134).
            log_line(&cfg, "");
            log_line(&cfg, "Stopped server");
            if shared.is_busy() {
                log_line(&cfg, "terminate called without an active exception");
                std::process::abort();
            }
            let _ = std::fs::remove_dir_all(&cfg.temp_dir);
            ExitCode::SUCCESS
        }
    }
}
