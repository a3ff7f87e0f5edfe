//! `kilnd`: the thin command-line entry point of the node daemon. All logic is in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kilnd", version, about = "Kiln node daemon: supervises ComfyUI and serves jobs")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a ComfyUI-compatible simulator (same HTTP and WebSocket API, real PNG outputs).
    ComfySim(kiln_daemon::comfy::sim::SimArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::ComfySim(args)) => kiln_daemon::comfy::sim::main(args),
        None => {
            eprintln!("kilnd: nothing to do yet (see --help)");
            ExitCode::from(2)
        }
    }
}
