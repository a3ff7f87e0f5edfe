//! `kilnd`: the thin command-line entry point of the node daemon. All logic is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kilnd",
    version,
    about = "Kiln node daemon: supervises ComfyUI, queues jobs by tier and serves them over HTTP",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The node's config file (TOML; see kilnd.example.toml).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "dev",
        required_unless_present = "dev"
    )]
    config: Option<PathBuf>,
    /// Run a single local node with the ComfyUI simulator as its ComfyUI (a newcomer's first run).
    #[arg(long)]
    dev: bool,
    /// With --dev: the API address (default 127.0.0.1:7860; loopback addresses only).
    #[arg(long, value_name = "ADDR", requires = "dev")]
    listen: Option<SocketAddr>,
    /// With --dev: keep data here instead of a temporary folder.
    #[arg(long, value_name = "DIR", requires = "dev")]
    data_dir: Option<PathBuf>,
    /// With --dev: the simulator's time per sampler step in milliseconds.
    #[arg(long, value_name = "MS", requires = "dev")]
    sim_step_ms: Option<u64>,
    /// With --dev: one more argument for `kilnd comfy-sim` (repeatable), e.g.
    /// `--sim-arg=--executed-log=/tmp/executed.jsonl`.
    #[arg(long, value_name = "ARG", requires = "dev", allow_hyphen_values = true)]
    sim_arg: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a ComfyUI-compatible simulator (same HTTP and WebSocket API, real PNG outputs).
    ComfySim(Box<kiln_daemon::comfy::sim::SimArgs>),
    /// Validate a config file and say what is wrong.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Read the GPUs once through NVML and print the reading as JSON (`--sim`: a simulated card).
    Gpu(kiln_daemon::gpu::GpuArgs),
}

/// mimalloc instead of glibc's malloc: kilnd allocates many small, short-lived buffers (JSON
/// values, peer frames) across threads, where glibc's arenas spent about a tenth of the
/// cluster's CPU (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::ComfySim(args)) => kiln_daemon::comfy::sim::main(*args),
        Some(Command::Gpu(args)) => kiln_daemon::gpu::command(args),
        Some(Command::CheckConfig { file }) => {
            let checked = kiln_daemon::config::Config::load(&file)
                .map_err(anyhow::Error::from)
                .and_then(kiln_daemon::node::NodeParts::prepare);
            match checked {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("kilnd: {}: {error:#}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        None => run_node(cli.run),
    }
}

fn run_node(args: RunArgs) -> ExitCode {
    kiln_daemon::node::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kilnd")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kilnd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // systemd's NOTIFY_SOCKET / WATCHDOG_USEC, read once; without them nothing is sent.
    let notify =
        kiln_daemon::notify::Notifier::new(&kiln_daemon::notify::NotifyEnv::from_process());
    let result = runtime.block_on(async move {
        if args.dev {
            let dev = kiln_daemon::node::DevOptions {
                listen: args.listen,
                data_dir: args.data_dir,
                sim_step_ms: args.sim_step_ms,
                sim_args: args.sim_arg,
                notify,
            };
            kiln_daemon::node::run_dev(dev, kiln_daemon::node::shutdown_signal()).await
        } else {
            let Some(path) = args.config else {
                anyhow::bail!("either --config FILE or --dev is required");
            };
            let config = kiln_daemon::config::Config::load(&path)?;
            kiln_daemon::node::run_with_config(config, notify, kiln_daemon::node::shutdown_signal())
                .await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kilnd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
