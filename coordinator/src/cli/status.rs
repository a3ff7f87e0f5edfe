//! `kiln status`: fetches the cluster view once (or every interval with `--watch`) and prints it
//! as a table or, with `--json`, exactly as the node sent it.
//!
//! The fetching and drawing live in [`crate::status`]; this module only turns arguments and the
//! environment into a [`StatusSource`] and runs the loop. It never prints the operator token.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use url::Url;

use crate::status::{self, ApiSource, MemberSource, Snapshot, StatusSource};

/// The environment variable holding the operator token when no `--token-file` is given.
pub const TOKEN_ENV: &str = "KILN_OPERATOR_TOKEN";

/// ANSI: cursor home, then clear the screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Any node's HTTP API.
    #[arg(
        long,
        env = "KILN_API",
        default_value = "http://127.0.0.1:7860",
        value_name = "URL"
    )]
    pub api: Url,
    /// A file holding the operator token, readable only by its owner (else the token is read from
    /// KILN_OPERATOR_TOKEN).
    #[arg(long, env = "KILN_OPERATOR_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Join the gossip as a member with this certificate folder (from `kiln certs issue`)
    /// instead of asking a node's API; needs --seed.
    #[arg(long, env = "KILN_CERTS_DIR", value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// With --certs: a member's gossip address, `quic://host:port`, `tcp://host:port` or
    /// `host:port` (repeatable).
    #[arg(long = "seed", value_name = "ADDR", requires = "certs")]
    pub seeds: Vec<String>,
    /// The coordinator's config (kiln.toml): reach the cluster as its [cluster] section says,
    /// and merge the view with the inventory, so hosts the gossip cannot see (warm, still
    /// provisioning, released in the last day) are listed too.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["certs", "token_file", "watch"])]
    pub config: Option<PathBuf>,
    /// Print the cluster view JSON exactly as the node sent it (with --config:
    /// `{"cluster": <view or null>, "cluster_error": <text or null>, "inventory": [hosts]}`).
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Redraw the table every interval until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Time between redraws with --watch (e.g. 2s, 500ms; at least 100ms).
    #[arg(long, default_value = "2s", value_parser = parse_interval, value_name = "DURATION")]
    pub interval: Duration,
    /// Stop --watch after this many draws.
    #[arg(long, hide = true, requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
    /// How long to wait for the node's answer (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_timeout, value_name = "DURATION")]
    pub timeout: Duration,
}

fn parse_duration(text: &str, min: Duration) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration < min {
        return Err(format!(
            "must be at least {}",
            humantime::format_duration(min)
        ));
    }
    Ok(duration)
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    parse_duration(text, Duration::from_millis(100))
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    parse_duration(text, Duration::from_millis(1))
}

/// The operator token: from `token_file` when given (a file only its owner can read), else
/// from `env_token` (the value of `KILN_OPERATOR_TOKEN`).
pub fn operator_token(
    token_file: Option<&Path>,
    env_token: Option<String>,
) -> anyhow::Result<String> {
    let token = match token_file {
        Some(path) => kiln_daemon::config::read_secret_file(path)
            .map_err(|message| anyhow::anyhow!("operator token: {message}"))?,
        None => match env_token {
            Some(token) => token.trim().to_string(),
            None => bail!(
                "no operator token: give --token-file FILE or set {TOKEN_ENV} \
                 (kilnd --dev writes one to <data dir>/operator-token)"
            ),
        },
    };
    if token.is_empty() {
        match token_file {
            Some(path) => bail!("operator token: {} is empty", path.display()),
            None => bail!("operator token: {TOKEN_ENV} is empty"),
        }
    }
    Ok(token)
}

pub fn run(args: StatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(path) = args.config.clone() {
        return run_with_inventory(&args, &path, out);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let source = match &args.certs {
            Some(certs) => {
                StatusSource::Member(MemberSource::join(certs, &args.seeds, args.timeout).await?)
            }
            None => {
                let env_token = match std::env::var(TOKEN_ENV) {
                    Ok(token) => Some(token),
                    Err(std::env::VarError::NotPresent) => None,
                    Err(std::env::VarError::NotUnicode(_)) => {
                        bail!("{TOKEN_ENV} is not valid UTF-8")
                    }
                };
                let token = operator_token(args.token_file.as_deref(), env_token)?;
                StatusSource::Api(ApiSource::new(&args.api, &token, args.timeout)?)
            }
        };
        let result = if args.watch {
            watch(&source, args.interval, args.iterations, out).await
        } else {
            once(&source, args.json, out).await
        };
        if let StatusSource::Member(member) = &source {
            member.leave().await;
        }
        result
    })
}

async fn once(source: &StatusSource, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let snapshot = status::fetch(source).await?;
    if json {
        let text = snapshot.json.trim_end();
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        out.write_all(status::render_table(&snapshot.view).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

/// Redraws until Ctrl-C or `iterations` draws. A failed fetch is shown in the frame (above the
/// last good table, if any) and the loop goes on.
async fn watch(
    source: &StatusSource,
    interval: Duration,
    iterations: Option<u64>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut last_good: Option<Snapshot> = None;
    let mut drawn: u64 = 0;
    loop {
        let fetched = tokio::select! {
            fetched = status::fetch(source) => fetched,
            signal = &mut ctrl_c => return signal.context("cannot listen for Ctrl-C"),
        };
        let mut frame = String::from(CLEAR_SCREEN);
        frame.push_str(&format!(
            "Every {}: kiln status {} {source}    (Ctrl-C to stop)\n\n",
            humantime::format_duration(interval),
            match source {
                StatusSource::Api(_) => "--api",
                StatusSource::Member(_) => "--seed",
            }
        ));
        match fetched {
            Ok(snapshot) => {
                frame.push_str(&status::render_table(&snapshot.view));
                last_good = Some(snapshot);
            }
            Err(error) => {
                frame.push_str(&format!("kiln: {error}\n"));
                if let Some(snapshot) = &last_good {
                    frame.push_str("\nLast view received:\n");
                    frame.push_str(&status::render_table(&snapshot.view));
                }
            }
        }
        out.write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .context("writing to stdout")?;
        drawn += 1;
        if iterations.is_some_and(|n| drawn >= n) {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            signal = &mut ctrl_c => return signal.context("cannot listen for Ctrl-C"),
        }
    }
}

fn env_token() -> anyhow::Result<Option<String>> {
    match std::env::var(TOKEN_ENV) {
        Ok(token) => Ok(Some(token)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{TOKEN_ENV} is not valid UTF-8"),
    }
}

/// The status source a `kiln.toml`'s `[cluster]` section names (its `api`, else `--api`).
async fn source_from_config(
    access: &crate::config::ClusterAccess,
    args: &StatusArgs,
) -> anyhow::Result<StatusSource> {
    source_for(access, Some(&args.api)).await
}

/// The status source a `[cluster]` section names: its `certs` and `seeds`, else its `api` (or
/// `default_api`) with the operator token.
pub async fn source_for(
    access: &crate::config::ClusterAccess,
    default_api: Option<&Url>,
) -> anyhow::Result<StatusSource> {
    Ok(match &access.certs {
        Some(certs) => {
            StatusSource::Member(MemberSource::join(certs, &access.seeds, access.timeout()).await?)
        }
        None => {
            let token = operator_token(access.token_file.as_deref(), env_token()?)
                .context("kiln.toml [cluster]: set token_file, or certs and seeds")?;
            let api = access
                .api
                .as_ref()
                .or(default_api)
                .context("kiln.toml [cluster]: set api (a node's URL), or certs and seeds")?;
            StatusSource::Api(ApiSource::new(api, &token, access.timeout())?)
        }
    })
}

/// `kiln status --config`: the view merged with the inventory. Hosts still `provisioning` that
/// the view shows ready are moved to `hot` (with a history entry). When the cluster cannot be
/// reached the inventory is still shown, with the reason.
fn run_with_inventory(args: &StatusArgs, path: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = crate::config::KilnConfig::load(path)?;
    let mut inventory = crate::inventory::Inventory::open(&config.inventory.path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let fetched: anyhow::Result<Snapshot> = runtime.block_on(async {
        let source = source_from_config(&config.cluster, args).await?;
        let result = status::fetch(&source).await;
        if let StatusSource::Member(member) = &source {
            member.leave().await;
        }
        Ok::<Snapshot, anyhow::Error>(result?)
    });
    let now = super::fleet::now_ms();
    if let Ok(snapshot) = &fetched {
        crate::control::mark_ready(&mut inventory, status::ready_members(&snapshot.view), now)?;
    }
    let decisions = inventory.actions(LAST_DECISIONS)?;
    let alerts = crate::control::active_alerts(&inventory)?;
    let hosts = inventory.hosts()?;
    if args.json {
        let (cluster, error) = match &fetched {
            Ok(snapshot) => (
                serde_json::from_str::<serde_json::Value>(&snapshot.json)
                    .context("re-reading the cluster view")?,
                None,
            ),
            Err(e) => (serde_json::Value::Null, Some(format!("{e:#}"))),
        };
        let body = serde_json::json!({
            "cluster": cluster,
            "cluster_error": error,
            "inventory": hosts,
            "decisions": decisions,
            "alerts": alerts,
        });
        let text = serde_json::to_string_pretty(&body).context("encoding the status")?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        let mut text =
            status::render_fleet_table(fetched.as_ref().ok().map(|s| &s.view), &hosts, now);
        if let Err(e) = &fetched {
            text.push_str(&format!(
                "cluster view unavailable: {}\n",
                crate::text::clean(&format!("{e:#}"))
            ));
        }
        text.push_str(&decisions_and_alerts(&decisions, &alerts));
        out.write_all(text.as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

/// How many of the last actions `kiln status --config` shows.
const LAST_DECISIONS: u32 = 10;

/// The last decisions (the actions log, the control loop's and the operator's) and the active
/// alerts, as text under the fleet table.
fn decisions_and_alerts(
    decisions: &[crate::inventory::ActionEntry],
    alerts: &std::collections::BTreeMap<String, crate::alerts::ActiveAlert>,
) -> String {
    use crate::text::clean;
    let mut text = String::new();
    if !decisions.is_empty() {
        text.push_str("\nLast decisions:\n");
        for d in decisions {
            text.push_str(&format!(
                "  {} {} {}: {} -> {}\n",
                super::fleet::format_ms(d.at_ms),
                clean(&d.action),
                clean(d.host.as_deref().unwrap_or("-")),
                clean(&d.reason),
                clean(&d.outcome)
            ));
        }
    }
    if alerts.is_empty() {
        text.push_str("\nNo active alerts.\n");
    } else {
        text.push_str("\nActive alerts:\n");
        for (key, alert) in alerts {
            text.push_str(&format!(
                "  {} {} since {}: {}\n",
                alert.severity.as_str().to_uppercase(),
                clean(key),
                super::fleet::format_ms(alert.since_ms),
                clean(&alert.message)
            ));
        }
    }
    text
}
