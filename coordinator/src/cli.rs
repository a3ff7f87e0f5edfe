//! The `kiln` command line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kiln_daemon::protocol::Tier;

/// Kiln's coordinator and operator CLI.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Kiln coordinator and operator CLI")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage API keys (stored only as hashes).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key for an account; prints the key once and appends its hash to the keys file.
    Add(KeysAdd),
}

#[derive(Debug, Args)]
pub struct KeysAdd {
    /// The account the key belongs to (letters, digits, '-', '_', '.', '@'; at most 64).
    #[arg(long)]
    pub account: String,
    /// The account's tier: free, premium, pro or enterprise.
    #[arg(long)]
    pub tier: Tier,
    /// The keys file that kilnd reads (`api.keys_file` in its config).
    #[arg(long, env = "KILN_KEYS_FILE", default_value = "/etc/kiln/keys.toml")]
    pub keys_file: PathBuf,
    /// Print `{"account", "tier", "key"}` as JSON instead of the bare key.
    #[arg(long)]
    pub json: bool,
}

/// Runs one parsed command, writing its normal output to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Keys(KeysCommand::Add(args)) => keys_add(args, out),
    }
}

fn keys_add(args: KeysAdd, out: &mut dyn Write) -> anyhow::Result<()> {
    let key = kiln_daemon::tiers::add_key(&args.keys_file, &args.account, args.tier)?;
    if args.json {
        let body = serde_json::json!({"account": args.account, "tier": args.tier, "key": key});
        writeln!(out, "{body}").context("writing to stdout")?;
    } else {
        writeln!(out, "{key}").context("writing to stdout")?;
    }
    Ok(())
}
