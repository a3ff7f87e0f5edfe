//! `kiln cost [--since DATE]`: what the fleet cost today, this month and (with `--since`) since a
//! given time, in total, per host and per state, from the inventory's ledger (UTC days).
//! `kiln cost model`: the planning document's cost tables recomputed from its assumptions.

use std::io::Write;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use super::fleet::{FleetOptions, format_ms, now_ms, open};
use crate::inventory::{CostReport, Inventory, start_of_day_ms, start_of_month_ms};
use crate::text::{self, Align, clean};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CostArgs {
    #[command(subcommand)]
    pub command: Option<CostCommand>,
    /// Also report the cost since this time: a date (`2026-11-01`, midnight UTC) or an RFC 3339
    /// time (`2026-11-01T12:00:00Z`). Per host and per state then cover this window.
    #[arg(long, value_parser = parse_since, value_name = "DATE")]
    pub since: Option<i64>,
    #[command(flatten)]
    pub options: FleetOptions,
}

#[derive(Debug, Subcommand)]
pub enum CostCommand {
    /// Recompute the planning document's "Monthly Cost Scenarios" and "Cost Per Image" tables
    /// from its assumptions and say where they agree and where they do not.
    Model(ModelArgs),
}

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The spot rate of one RTX 4090 host, USD per hour.
    #[arg(long, default_value_t = 0.40, value_name = "USD")]
    pub spot_per_hour: f64,
    /// The on-demand rate, USD per hour.
    #[arg(long, default_value_t = 0.80, value_name = "USD")]
    pub on_demand_per_hour: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn run_model(args: ModelArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--spot-per-hour", args.spot_per_hour),
        ("--on-demand-per-hour", args.on_demand_per_hour),
    ] {
        if !(value.is_finite() && value > 0.0 && value <= 1_000.0) {
            anyhow::bail!("{flag} must be a price above 0 and at most 1000 USD an hour");
        }
    }
    let assumptions = crate::costmodel::Assumptions {
        spot_per_hour: args.spot_per_hour,
        on_demand_per_hour: args.on_demand_per_hour,
        ..crate::costmodel::Assumptions::default()
    };
    let model = crate::costmodel::model(&assumptions);
    if args.json {
        let text = serde_json::to_string_pretty(&model).context("encoding the cost model")?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        out.write_all(crate::costmodel::render(&model).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

/// `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time, as Unix milliseconds.
pub fn parse_since(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let full = if text.len() == 10 && text.as_bytes().get(4) == Some(&b'-') {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    let time = humantime::parse_rfc3339_weak(&full).map_err(|e| {
        format!(
            "`{text}` is not a date (2026-11-01) or an RFC 3339 time (2026-11-01T12:00:00Z): {e}"
        )
    })?;
    let ms = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("`{text}` is before 1970"))?
        .as_millis();
    i64::try_from(ms).map_err(|_| format!("`{text}` is too far in the future"))
}

/// The three windows `kiln cost` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CostSummary {
    pub now_ms: i64,
    pub today: CostReport,
    pub month_to_date: CostReport,
    pub since: Option<CostReport>,
}

/// Today, month to date and (optionally) since `since_ms`, at `now_ms`.
pub fn summary(
    inventory: &Inventory,
    since_ms: Option<i64>,
    now_ms: i64,
) -> anyhow::Result<CostSummary> {
    Ok(CostSummary {
        now_ms,
        today: inventory.cost(start_of_day_ms(now_ms), now_ms)?,
        month_to_date: inventory.cost(start_of_month_ms(now_ms), now_ms)?,
        since: since_ms
            .map(|since| inventory.cost(since, now_ms))
            .transpose()?,
    })
}

/// The summary as text: the windows, then per host and per state over the detailed window.
pub fn render(summary: &CostSummary) -> String {
    let mut out = String::new();
    let mut windows = vec![
        ("today", &summary.today),
        ("month to date", &summary.month_to_date),
    ];
    if let Some(since) = &summary.since {
        windows.push(("since", since));
    }
    let rows: Vec<Vec<String>> = windows
        .iter()
        .map(|(label, r)| {
            vec![
                label.to_string(),
                format_ms(r.since_ms),
                format!("{:.4}", r.gpu),
                format!("{:.4}", r.storage),
                format!("{:.4}", r.total),
            ]
        })
        .collect();
    let columns = [
        ("WINDOW", Align::Left),
        ("FROM", Align::Left),
        ("GPU $", Align::Right),
        ("STORAGE $", Align::Right),
        ("TOTAL $", Align::Right),
    ];
    out.push_str(&text::table(&columns, &rows));
    let (label, detail) = match &summary.since {
        Some(since) => ("since", since),
        None => ("month to date", &summary.month_to_date),
    };
    out.push_str(&format!("\nPer host ({label}):\n"));
    let rows: Vec<Vec<String>> = detail
        .per_host
        .iter()
        .map(|(host, usd)| vec![clean(host), format!("{usd:.4}")])
        .collect();
    out.push_str(&text::table(
        &[("HOST", Align::Left), ("$", Align::Right)],
        &rows,
    ));
    out.push_str(&format!("\nPer state ({label}):\n"));
    let rows: Vec<Vec<String>> = detail
        .per_state
        .iter()
        .map(|(state, usd)| vec![state.to_string(), format!("{usd:.4}")])
        .collect();
    out.push_str(&text::table(
        &[("STATE", Align::Left), ("$", Align::Right)],
        &rows,
    ));
    out
}

pub fn run(args: CostArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if let Some(CostCommand::Model(model)) = args.command {
        return run_model(model, out);
    }
    let (_, inventory) = open(&args.options)?;
    let now = now_ms();
    if let Some(since) = args.since
        && since > now
    {
        anyhow::bail!("--since {} is in the future", format_ms(since));
    }
    let summary = summary(&inventory, args.since, now)?;
    if args.options.json {
        let text = serde_json::to_string_pretty(&summary).context("encoding the cost")?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        out.write_all(render(&summary).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_dates_and_times() {
        assert_eq!(parse_since("1970-01-02"), Ok(86_400_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z"), Ok(1_000));
        let err = parse_since("yesterday").expect_err("not a date");
        assert!(err.contains("yesterday"), "{err}");
        assert!(parse_since("2026-13-01").is_err());
    }
}
