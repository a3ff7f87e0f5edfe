//! `kiln simulate`: runs scaling policies against a demand trace and prints their cost and
//! per-tier waits (a table, or `--json`), optionally drawing an SVG plot. Option values are
//! checked by clap (a bad one exits 2 with one line); file contents (CSV trace, policy config)
//! are checked when read, and an error names the file and line or key.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use crate::policy::PolicyConfig;
use crate::simulate::{self, POLICY_NAMES, Shape, SimConfig, SynthOptions, report, trace};

/// Where the demand comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceSpec {
    Synthetic(Shape),
    Csv(PathBuf),
}

fn parse_trace(value: &str) -> Result<TraceSpec, String> {
    match value {
        "diurnal" => Ok(TraceSpec::Synthetic(Shape::Diurnal)),
        "launch-spike" => Ok(TraceSpec::Synthetic(Shape::LaunchSpike)),
        "growth" => Ok(TraceSpec::Synthetic(Shape::Growth)),
        _ => match value.strip_prefix("csv:") {
            Some(path) if !path.is_empty() => Ok(TraceSpec::Csv(PathBuf::from(path))),
            _ => Err("expected diurnal, launch-spike, growth or csv:PATH".to_string()),
        },
    }
}

/// A comma-separated list of policy names, or `all`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyList(pub Vec<String>);

fn parse_policies(value: &str) -> Result<PolicyList, String> {
    if value == "all" {
        return Ok(PolicyList(
            POLICY_NAMES.iter().map(|s| s.to_string()).collect(),
        ));
    }
    let mut names: Vec<String> = Vec::new();
    for name in value.split(',').map(str::trim) {
        if !POLICY_NAMES.contains(&name) {
            return Err(format!(
                "unknown policy `{name}`: expected {} (comma-separated) or all",
                POLICY_NAMES.join(", ")
            ));
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    Ok(PolicyList(names))
}

fn parse_jobs_per_day(value: &str) -> Result<f64, String> {
    let n: f64 = value
        .parse()
        .map_err(|_| format!("`{value}` is not a number"))?;
    if !n.is_finite() || n <= 0.0 || n > 10_000_000.0 {
        return Err("must be above 0 and at most 10000000".to_string());
    }
    Ok(n)
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The demand: diurnal, launch-spike, growth, or csv:PATH (header
    /// `timestamp,tier,account,service_seconds`).
    #[arg(long, value_parser = parse_trace, value_name = "TRACE")]
    pub trace: TraceSpec,
    /// Policies to compare: always-on-1, always-on-2, seed-rules, kiln, lower-bound
    /// (comma-separated), or all.
    #[arg(long, value_parser = parse_policies, default_value = "all", value_name = "NAME[,NAME…]")]
    pub policy: PolicyList,
    /// Simulated days.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=366))]
    pub days: u32,
    /// Seed of the trace and of the providers' random behaviour.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Mean jobs per day of a synthetic trace.
    #[arg(long, value_parser = parse_jobs_per_day, default_value = "5000", value_name = "N")]
    pub jobs_per_day: f64,
    /// The `kiln` policy's settings: a TOML file with a `[policy]` table (or its keys at the
    /// top level), as in the coordinator's config. Default: the built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub policy_config: Option<PathBuf>,
    /// Write an SVG plot of demand, queue depth, hosts by state and cumulative cost here.
    #[arg(long, value_name = "PATH")]
    pub svg: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Reads a policy file: the `[policy]` table of a coordinator config, or the keys at top level.
pub fn load_policy_config(text: &str) -> anyhow::Result<PolicyConfig> {
    let value: toml::Table = toml::from_str(text).context("not valid TOML")?;
    let table = match value.get("policy") {
        Some(toml::Value::Table(t)) => t.clone(),
        Some(_) => bail!("`policy` must be a table"),
        None => value,
    };
    let text = toml::to_string(&table).context("re-encoding the [policy] table")?;
    Ok(PolicyConfig::from_toml(&text)?)
}

pub fn run(args: SimulateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let config = SimConfig {
        days: args.days,
        ..SimConfig::default()
    };
    let kiln_config = match &args.policy_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            load_policy_config(&text).with_context(|| format!("{}", path.display()))?
        }
        None => PolicyConfig::default(),
    };
    let options = SynthOptions {
        days: args.days,
        jobs_per_day: args.jobs_per_day,
        ..SynthOptions::default()
    };
    let trace = match &args.trace {
        TraceSpec::Synthetic(shape) => {
            trace::synthetic(*shape, &options, args.seed).map_err(anyhow::Error::msg)?
        }
        TraceSpec::Csv(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            trace::parse_csv(
                &path.display().to_string(),
                &text,
                args.days,
                options.service_s,
                args.seed,
            )
            .map_err(anyhow::Error::msg)?
        }
    };
    let (report, series) =
        simulate::simulate(&trace, &config, &args.policy.0, &kiln_config, args.seed)
            .map_err(anyhow::Error::msg)?;
    if let Some(path) = &args.svg {
        let title = format!(
            "kiln simulate: {} trace, {} day(s), seed {}",
            report.trace, report.days, report.seed
        );
        let svg = report::render_svg(&title, &series).map_err(anyhow::Error::msg)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        out.write_all(report::render_text(&report).as_bytes())?;
    }
    Ok(())
}
