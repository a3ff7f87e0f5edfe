//! The `kiln` command line: argument definitions and dispatch. One submodule per command group;
//! each command returns a result, and `main` turns an error into one line on stderr and exit 1
//! (clap exits 2 for bad arguments). Normal output goes to the writer given to [`run`].

use std::io::Write;

use clap::{Parser, Subcommand};

pub mod certs;
pub mod cost;
pub mod fleet;
pub mod keys;
pub mod run;
pub mod simulate;
pub mod status;
pub mod usage;

pub use certs::CertsCommand;
pub use keys::{KeysAdd, KeysCommand};
pub use status::StatusArgs;

/// Kiln's coordinator and operator CLI.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Kiln coordinator and operator CLI")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the cluster as a table: every member's state, GPU, queue per tier and cost.
    Status(StatusArgs),
    /// Manage the cluster CA and member certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Manage API keys (stored only as hashes).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Rent a host from a provider (recorded in the inventory as provisioning).
    Rent(fleet::RentArgs),
    /// Stop a running host, keeping its disk (hot → warm).
    Pause(fleet::HostArgs),
    /// Start a warm host again (warm → provisioning → hot).
    Resume(fleet::HostArgs),
    /// Destroy a host and its disk (→ released).
    Release(fleet::HostArgs),
    /// What the fleet cost: today, month to date, per host and per state.
    Cost(cost::CostArgs),
    /// The hosts in the inventory (or one host's state history).
    Inventory(fleet::InventoryArgs),
    /// Compare the inventory with what the providers report and correct it.
    Reconcile(fleet::ReconcileArgs),
    /// Usage of every account per day, merged over the cluster (operator token).
    #[command(subcommand)]
    Usage(usage::UsageCommand),
    /// The control loop: scale the fleet by the policy, deliver alerts (kiln.toml [policy],
    /// [alerts]).
    Run(run::RunArgs),
    /// Run scaling policies against a demand trace and compare cost and per-tier waits.
    Simulate(simulate::SimulateArgs),
}

/// Runs one parsed command, writing its normal output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Status(args) => status::run(args, out),
        Command::Certs(command) => certs::run(command, out),
        Command::Keys(command) => keys::run(command, out),
        Command::Rent(args) => fleet::run_rent(args, out),
        Command::Pause(args) => fleet::run_host_action(fleet::HostAction::Pause, args, out),
        Command::Resume(args) => fleet::run_host_action(fleet::HostAction::Resume, args, out),
        Command::Release(args) => fleet::run_host_action(fleet::HostAction::Release, args, out),
        Command::Cost(args) => cost::run(args, out),
        Command::Inventory(args) => fleet::run_inventory(args, out),
        Command::Reconcile(args) => fleet::run_reconcile(args, out),
        Command::Usage(command) => usage::run(command, out),
        Command::Simulate(args) => simulate::run(args, out),
        Command::Run(args) => run::run(args, out),
    }
}
