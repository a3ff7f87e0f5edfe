//! `kiln run --config FILE [--dry-run] [--once]`: the coordinator's control loop. Every
//! `policy.tick_s` it fetches the cluster view, runs one [`Controller::tick`] and prints what it
//! did; alert changes go to `[alerts] webhook_url` in the background. SIGTERM or Ctrl-C stops it
//! between ticks (a tick in progress finishes first).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::KilnConfig;
use crate::control::metrics::Metrics;
use crate::control::webhook::Webhook;
use crate::control::{Controller, HttpNodeAdmin, Seen, TickReport};
use crate::inventory::Inventory;
use crate::provider::build;
use crate::status::{self, StatusSource};
use crate::text::clean;

use super::fleet::{format_ms, now_ms};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The coordinator's config file.
    #[arg(
        long,
        env = "KILN_CONFIG",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// Print the plan for now (actions and reasons) and change nothing; implies --once.
    #[arg(long)]
    pub dry_run: bool,
    /// Run one tick and exit.
    #[arg(long)]
    pub once: bool,
}

pub fn run(args: RunArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = KilnConfig::load(&args.config)?;
    let mut inventory = Inventory::open(&config.inventory.path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_loop(args, config, &mut inventory, out))
}

async fn run_loop(
    args: RunArgs,
    config: KilnConfig,
    inventory: &mut Inventory,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).ok();
    let (providers, failed) = build::build_all(&config, &env);
    for (kind, error) in &failed {
        writeln!(out, "warning: {kind} cannot be used: {error:#}").context("writing")?;
    }
    let token = super::status::operator_token(
        config.cluster.token_file.as_deref(),
        std::env::var(super::status::TOKEN_ENV).ok(),
    )
    .context("kiln run needs the operator token to drain nodes: set [cluster] token_file")?;
    let nodes = HttpNodeAdmin::new(&token, config.cluster.timeout())?;
    let source = super::status::source_for(&config.cluster, None).await?;
    let tick = config.policy.tick();
    let controller = Controller::new(config, providers, Box::new(nodes));

    if args.dry_run {
        let seen = fetch(&source).await.map_err(|e| anyhow::anyhow!(e))?;
        let plan = controller.dry_run(inventory, &seen, now_ms())?;
        if plan.actions.is_empty() {
            writeln!(out, "no action").context("writing")?;
        }
        for action in &plan.actions {
            writeln!(out, "would {}", clean(&action.to_string())).context("writing")?;
        }
        for note in &plan.notes {
            writeln!(out, "note: {}", clean(note)).context("writing")?;
        }
        leave(&source).await;
        return Ok(());
    }

    let webhook = match &controller.config().alerts.webhook_url {
        Some(url) => Some(Webhook::spawn(
            url.clone(),
            controller.config().alerts.timeout(),
            tick,
        )?),
        None => None,
    };
    let metrics = std::sync::Arc::new(Metrics::new());
    if let Some(listen) = controller.config().metrics.listen {
        let bound = metrics.serve(listen).await?;
        writeln!(out, "metrics on http://{bound}/metrics").context("writing")?;
    }
    let stop = shutdown_signal()?;
    tokio::pin!(stop);
    let result = loop {
        let fetched = fetch(&source).await;
        let (seen, error) = match fetched {
            Ok(seen) => (Some(seen), None),
            Err(e) => (None, Some(e)),
        };
        let report = controller
            .tick(inventory, seen.as_ref(), error.as_deref(), &now_ms)
            .await;
        match report {
            Ok(report) => {
                print_report(out, &report)?;
                if let Err(e) = metrics.observe(inventory, &report) {
                    writeln!(out, "warning: metrics not updated: {e:#}").context("writing")?;
                }
                if let Some(webhook) = &webhook {
                    for event in &report.events {
                        webhook.send(event.clone());
                    }
                }
            }
            // The inventory failed: nothing can be recorded, so stop rather than act blind.
            Err(e) => break Err(e),
        }
        if args.once {
            break Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            signal = &mut stop => break signal.map(|name| {
                let _ = writeln!(out, "{name}: stopping");
            }),
        }
    };
    leave(&source).await;
    result
}

async fn leave(source: &StatusSource) {
    if let StatusSource::Member(member) = source {
        member.leave().await;
    }
}

async fn fetch(source: &StatusSource) -> Result<Seen, String> {
    status::fetch(source)
        .await
        .map(|snapshot| Seen::from_view(&snapshot.view))
        .map_err(|e| e.to_string())
}

/// Resolves with the signal's name on SIGTERM or Ctrl-C.
fn shutdown_signal()
-> anyhow::Result<impl std::future::Future<Output = anyhow::Result<&'static str>>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").context("cannot listen for Ctrl-C"),
        }
    })
}

fn print_report(out: &mut dyn Write, report: &TickReport) -> anyhow::Result<()> {
    let now = format_ms(now_ms());
    let mut text = String::new();
    for name in &report.ready {
        text.push_str(&format!("{now} ready: {} is hot\n", clean(name)));
    }
    for done in &report.executed {
        text.push_str(&format!(
            "{now} {} [{}]: {}\n",
            clean(&done.action),
            clean(&done.decision_id),
            clean(&done.outcome)
        ));
    }
    for note in report.plan.notes.iter().chain(&report.notes) {
        text.push_str(&format!("{now} note: {}\n", clean(note)));
    }
    for event in &report.events {
        text.push_str(&format!(
            "{now} alert {:?} {} {}: {}\n",
            event.status,
            event.severity,
            clean(&event.key),
            clean(&event.message)
        ));
    }
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
