//! `kiln usage export --month YYYY-MM --format csv|json`: every account's usage per day in a
//! month, from any node's operator route `GET /v1/admin/usage` (which merges every member's
//! owner counts). The node and the operator token are given as for `kiln status`; the token is
//! never printed.
//!
//! `kiln usage push [--month YYYY-MM] [--dry-run] [--json]`: the same report pushed to Stripe's
//! Billing Meter Events API as `kiln.toml [stripe]` says (see [`crate::billing`]); prints what it
//! pushed, skipped and what Stripe refused. `kiln run` calls [`push_now`] on its interval.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_daemon::protocol::{AdminUsageReport, UsageDay};
use kiln_daemon::queue::parse_utc_month;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use url::Url;

use super::fleet::now_ms;
use super::status::{TOKEN_ENV, operator_token};
use crate::billing;
use crate::config::KilnConfig;
use crate::inventory::Inventory;

/// The largest answer accepted (a month of every account's days).
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The CSV header of `kiln usage export --format csv`.
pub const CSV_HEADER: &str = "day,account,tier,submitted,succeeded,images,gpu_seconds,refused";

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Print every account's usage per day in a month, merged over the cluster's members.
    Export(UsageExport),
    /// Push closed days' usage to Stripe Billing meter events (kiln.toml [stripe]).
    Push(UsagePush),
}

#[derive(Debug, Args)]
pub struct UsagePush {
    /// The coordinator's config file ([stripe], [cluster], [inventory]).
    #[arg(
        long,
        env = "KILN_CONFIG",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// The UTC month, YYYY-MM (default: this month and the one before).
    #[arg(long, value_parser = parse_month, value_name = "YYYY-MM")]
    pub month: Option<String>,
    /// Print what would be pushed; send and record nothing (no Stripe key needed).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Any node's HTTP API (default: [cluster] api).
    #[arg(long, value_name = "URL")]
    pub api: Option<Url>,
    /// The operator token's file, owner-only (default: [cluster] token_file, else
    /// KILN_OPERATOR_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UsageFormat {
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct UsageExport {
    /// The UTC month, YYYY-MM (default: this month, as the node's clock has it).
    #[arg(long, value_parser = parse_month, value_name = "YYYY-MM")]
    pub month: Option<String>,
    #[arg(long, value_enum, default_value = "csv")]
    pub format: UsageFormat,
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
    /// How long to wait for the node's answer (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_timeout, value_name = "DURATION")]
    pub timeout: Duration,
}

fn parse_month(text: &str) -> Result<String, String> {
    parse_utc_month(text)
        .map(|_| text.to_string())
        .ok_or_else(|| format!("{text:?} is not a month (YYYY-MM)"))
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than 0".to_string());
    }
    Ok(duration)
}

pub fn run(command: UsageCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        UsageCommand::Export(args) => export(args, out),
        UsageCommand::Push(args) => push(args, out),
    }
}

fn env_token() -> anyhow::Result<Option<String>> {
    match std::env::var(TOKEN_ENV) {
        Ok(token) => Ok(Some(token)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{TOKEN_ENV} is not valid UTF-8"),
    }
}

fn push(args: UsagePush, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = KilnConfig::load(&args.config)?;
    let api = match args.api.or_else(|| config.cluster.api.clone()) {
        Some(api) => api,
        None => bail!("no node to read usage from: give --api or set [cluster] api"),
    };
    let token_file = args
        .token_file
        .or_else(|| config.cluster.token_file.clone());
    let token = operator_token(token_file.as_deref(), env_token()?)?;
    let months = args.month.map(|month| vec![month]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let env = |name: &str| std::env::var(name).ok();
    let report = runtime.block_on(push_now(&config, &api, &token, months, args.dry_run, &env))?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the result")?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        for line in report.lines() {
            writeln!(out, "{line}").context("writing to stdout")?;
        }
    }
    if let Some(error) = &report.error {
        bail!("the push stopped early: {error}");
    }
    if !report.failed.is_empty() {
        bail!(
            "Stripe refused {} event(s); they are recorded and tried again by the next push",
            report.failed.len()
        );
    }
    Ok(())
}

/// Reads the usage reports of `months` (default: this month and the one before) from the node
/// at `api` and pushes them as `config`'s `[stripe]` says; `dry_run` sends and records nothing
/// and needs no Stripe key. The secret key is looked up with `env` (`STRIPE_API_KEY`) unless
/// `api_key_file` is set.
pub async fn push_now(
    config: &KilnConfig,
    api: &Url,
    token: &str,
    months: Option<Vec<String>>,
    dry_run: bool,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> anyhow::Result<billing::PushReport> {
    let Some(section) = &config.stripe else {
        bail!("kiln.toml has no [stripe] section: nothing says where to push");
    };
    let settings = billing::PushSettings::from_section(section)?;
    let client = if dry_run {
        None
    } else {
        let key = section.api_key(env)?;
        Some(billing::StripeClient::new(
            &section.base_url()?,
            key,
            billing::stripe::default_retry(),
        )?)
    };
    let months = months.unwrap_or_else(|| billing::default_months(now_ms()));
    let mut reports = Vec::with_capacity(months.len());
    for month in &months {
        let url = admin_usage_url(api, Some(month))?;
        reports.push(fetch(&url, token, config.cluster.timeout()).await?);
    }
    let mut inventory = Inventory::open(&config.inventory.path)?;
    billing::push(
        &reports,
        &settings,
        client.as_ref(),
        &mut inventory,
        &now_ms,
    )
    .await
}

/// The operator route's URL under an API base URL (a base with a path keeps it).
fn admin_usage_url(api: &Url, month: Option<&str>) -> anyhow::Result<Url> {
    if !matches!(api.scheme(), "http" | "https") || api.host_str().is_none() {
        bail!("{api} is not a usable API URL: give an http:// or https:// URL with a host");
    }
    let mut base = api.clone();
    base.set_query(None);
    base.set_fragment(None);
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    let mut url = base
        .join("v1/admin/usage")
        .with_context(|| format!("{api} is not a usable API URL"))?;
    if let Some(month) = month {
        url.query_pairs_mut().append_pair("month", month);
    }
    Ok(url)
}

fn export(args: UsageExport, out: &mut dyn Write) -> anyhow::Result<()> {
    let env_token = match std::env::var(TOKEN_ENV) {
        Ok(token) => Some(token),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => bail!("{TOKEN_ENV} is not valid UTF-8"),
    };
    let token = operator_token(args.token_file.as_deref(), env_token)?;
    let url = admin_usage_url(&args.api, args.month.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(fetch(&url, &token, args.timeout))?;
    match args.format {
        UsageFormat::Csv => out
            .write_all(to_csv(&report.rows).as_bytes())
            .context("writing to stdout")?,
        UsageFormat::Json => {
            let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
            writeln!(out, "{text}").context("writing to stdout")?;
        }
    }
    if !report.missing.is_empty() {
        eprintln!(
            "kiln: warning: members that did not report (their counts are missing): {}",
            report.missing.join(", ")
        );
    }
    Ok(())
}

async fn fetch(url: &Url, token: &str, timeout: Duration) -> anyhow::Result<AdminUsageReport> {
    let mut auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        anyhow::anyhow!(
            "the operator token cannot be sent in an HTTP header (it holds a control character)"
        )
    })?;
    auth.set_sensitive(true);
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .context("cannot set up the HTTP client")?;
    let mut response = client
        .get(url.clone())
        .header(AUTHORIZATION, auth)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(|| format!("reading the answer of {url}"))?
    {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            bail!("{url} answered with more than {MAX_BODY_BYTES} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        bail!("the node refused the operator token (401)");
    }
    if !status.is_success() {
        let detail = String::from_utf8_lossy(&body);
        let detail: String = detail.chars().take(500).collect();
        bail!("{url} answered {status}: {detail}");
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("{url} did not answer with a usage report"))
}

/// One CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The rows as CSV under [`CSV_HEADER`]; a tier the node did not know is left empty.
pub fn to_csv(rows: &[UsageDay]) -> String {
    let mut text = String::from(CSV_HEADER);
    text.push('\n');
    for row in rows {
        let tier = row.tier.map(|t| t.to_string()).unwrap_or_default();
        text.push_str(&format!(
            "{},{},{},{},{},{},{:.3},{}\n",
            csv_field(&row.day),
            csv_field(row.account.as_deref().unwrap_or("")),
            csv_field(&tier),
            row.submitted,
            row.succeeded,
            row.images,
            row.gpu_seconds,
            row.refused
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_daemon::protocol::Tier;

    #[test]
    fn csv_rows_and_quoting() {
        let rows = vec![
            UsageDay {
                day: "2026-11-02".to_string(),
                account: Some("acme".to_string()),
                tier: Some(Tier::Premium),
                submitted: 3,
                succeeded: 2,
                images: 8,
                gpu_seconds: 12.5,
                refused: 1,
            },
            UsageDay {
                day: "2026-11-03".to_string(),
                account: Some("a,b".to_string()),
                tier: None,
                submitted: 0,
                succeeded: 0,
                images: 0,
                gpu_seconds: 0.0,
                refused: 0,
            },
        ];
        assert_eq!(
            to_csv(&rows),
            format!(
                "{CSV_HEADER}\n2026-11-02,acme,premium,3,2,8,12.500,1\n2026-11-03,\"a,b\",,0,0,0,0.000,0\n"
            )
        );
    }

    #[test]
    fn urls_and_months() {
        let url = admin_usage_url(
            &Url::parse("http://h:1/base").expect("url"),
            Some("2026-11"),
        )
        .expect("a URL");
        assert_eq!(url.as_str(), "http://h:1/base/v1/admin/usage?month=2026-11");
        assert!(admin_usage_url(&Url::parse("ftp://h/").expect("url"), None).is_err());
        assert!(parse_month("2026-13").is_err());
        assert!(parse_month("2026-11").is_ok());
    }
}
