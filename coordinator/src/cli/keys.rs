//! `kiln keys add`: creates an API key, prints it once and stores only its hash.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_daemon::protocol::Tier;

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

pub fn run(command: KeysCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        KeysCommand::Add(args) => add(args, out),
    }
}

fn add(args: KeysAdd, out: &mut dyn Write) -> anyhow::Result<()> {
    let key = kiln_daemon::tiers::add_key(&args.keys_file, &args.account, args.tier)?;
    if args.json {
        let body = serde_json::json!({"account": args.account, "tier": args.tier, "key": key});
        writeln!(out, "{body}").context("writing to stdout")?;
    } else {
        writeln!(out, "{key}").context("writing to stdout")?;
    }
    Ok(())
}
