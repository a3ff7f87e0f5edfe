//! `kiln run --config FILE [--dry-run] [--once]`: the coordinator's control loop. Every
//! `policy.tick_s` it fetches the cluster view, runs one [`Controller::tick`] and prints what it
//! did; alert changes go to `[alerts] webhook_url` in the background; with `[stripe]
//! push_interval`, usage is pushed to Stripe from a task of its own. SIGTERM or Ctrl-C stops it
//! between ticks (a tick in progress finishes first, and so does a push).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::{mpsc, watch};
use url::Url;

use crate::billing::FIRST_PUSH_AFTER;
use crate::config::KilnConfig;
use crate::control::metrics::Metrics;
use crate::control::webhook::Webhook;
use crate::control::{Controller, HttpNodeAdmin, Seen, TickReport};
use crate::inventory::Inventory;
use crate::provider::build;
use crate::status::{self, StatusSource};
use crate::text::clean;

use super::fleet::{format_ms, now_ms};
use super::usage::push_now;

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
    let stripe_push = match (&config.stripe, &config.cluster.api) {
        (Some(section), Some(api)) if !args.once => section
            .push_interval
            .map(|every| (config.clone(), api.clone(), every)),
        _ => None,
    };
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
    let (pusher, mut push_lines) = match stripe_push {
        Some((config, api, every)) => {
            writeln!(
                out,
                "pushing usage to Stripe every {}",
                humantime::format_duration(every)
            )
            .context("writing")?;
            let (pusher, lines) = Pusher::spawn(config, api, token.clone(), every);
            (Some(pusher), Some(lines))
        }
        None => (None, None),
    };
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
        let sleep = tokio::time::sleep(tick);
        tokio::pin!(sleep);
        // Waits out the tick; the pusher's lines are printed as they come.
        let stopped = loop {
            tokio::select! {
                () = &mut sleep => break None,
                signal = &mut stop => break Some(signal),
                Some(lines) = next_lines(&mut push_lines) => {
                    let now = format_ms(now_ms());
                    for line in lines {
                        writeln!(out, "{now} stripe: {line}").context("writing")?;
                    }
                    out.flush().context("writing")?;
                }
            }
        };
        if let Some(signal) = stopped {
            break signal.map(|name| {
                let _ = writeln!(out, "{name}: stopping");
            });
        }
    };
    if let Some(pusher) = pusher {
        pusher.stop().await;
    }
    leave(&source).await;
    result
}

/// The next lines of the pusher, or never when there is none (so `select!` skips the branch).
async fn next_lines(lines: &mut Option<mpsc::Receiver<Vec<String>>>) -> Option<Vec<String>> {
    match lines {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `[stripe] push_interval`: a task that runs [`push_now`] every interval (the first one a
/// moment after start) and hands its report's lines to the loop to print. A push in progress
/// finishes before the task stops, so every answer Stripe gave is recorded.
struct Pusher {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The longest `kiln run` waits for a push in progress when it stops.
const PUSH_STOP_DEADLINE: Duration = Duration::from_secs(90);

impl Pusher {
    fn spawn(
        config: KilnConfig,
        api: Url,
        token: String,
        every: Duration,
    ) -> (Pusher, mpsc::Receiver<Vec<String>>) {
        let (stop, mut stopped) = watch::channel(false);
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(async move {
            let env = |name: &str| std::env::var(name).ok();
            let mut wait = FIRST_PUSH_AFTER;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => return,
                }
                wait = every;
                let lines = match push_now(&config, &api, &token, None, false, &env).await {
                    Ok(report) => report.lines(),
                    Err(e) => vec![format!("push failed: {e:#}")],
                };
                if tx.send(lines).await.is_err() {
                    return;
                }
            }
        });
        (Pusher { stop, task }, rx)
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(PUSH_STOP_DEADLINE, self.task)
            .await
            .is_err()
        {
            eprintln!(
                "kiln run: the Stripe push did not finish in time; the next push resends what was not recorded"
            );
        }
    }
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
