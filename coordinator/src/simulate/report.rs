//! What a run shows: a table per policy for people, and an SVG plot (demand, queue depth,
//! hosts by state, cumulative cost over time) drawn with `plotters`' SVG backend.

use plotters::prelude::*;

use super::{Report, Sample};
use crate::text::{Align, table};

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// The report as people read it: a summary table of every policy, then one table per policy
/// with its per-tier waits.
pub fn render_text(report: &Report) -> String {
    let mut out = format!(
        "trace {} · {} day(s) · seed {} · {} jobs · {:.1} GPU-hours of demand · lower bound ${:.2}\n\n",
        report.trace,
        report.days,
        report.seed,
        report.arrivals,
        report.demand_gpu_hours,
        report.lower_bound_usd
    );
    let mut rows = vec![vec![
        "lower-bound".to_string(),
        format!("{:.2}", report.lower_bound_usd),
        format!(
            "{:.2}",
            report.lower_bound_usd / f64::from(report.days.max(1))
        ),
        "1.00".to_string(),
        "-".to_string(),
        "-".to_string(),
        "-".to_string(),
        "-".to_string(),
        "-".to_string(),
    ]];
    for p in &report.policies {
        let hours = |k: &str| p.instance_hours.get(k).copied().unwrap_or(0.0);
        rows.push(vec![
            p.policy.clone(),
            format!("{:.2}", p.total_cost_usd),
            format!("{:.2}", p.total_cost_usd / f64::from(report.days.max(1))),
            opt(p.ratio_to_lower_bound, 2),
            opt(p.cost_per_image_usd.map(|c| c * 1000.0), 3),
            format!("{:.1}", p.gpu_utilization_pct),
            format!(
                "{:.0}/{:.0}/{:.0}",
                hours("hot") + hours("draining"),
                hours("provisioning"),
                hours("warm")
            ),
            format!(
                "{}+{}",
                p.jobs.refused_busy + p.jobs.refused_quota,
                p.jobs.queued_at_end
            ),
            p.actions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    out.push_str(&table(
        &[
            ("POLICY", Align::Left),
            ("COST $", Align::Right),
            ("$/DAY", Align::Right),
            ("×BOUND", Align::Right),
            ("$/1K IMG", Align::Right),
            ("GPU %", Align::Right),
            ("HOT/PROV/WARM H", Align::Right),
            ("REFUSED+LEFT", Align::Right),
            ("ACTIONS", Align::Left),
        ],
        &rows,
    ));
    for p in &report.policies {
        out.push_str(&format!(
            "\n{}: {} served, {} refused busy, {} over the free quota, {} left queued; {} preemption(s), {} failed rent(s), {} failed resume(s), {} host(s) rented\n",
            p.policy,
            p.jobs.served,
            p.jobs.refused_busy,
            p.jobs.refused_quota,
            p.jobs.queued_at_end,
            p.preemptions,
            p.rent_failures,
            p.resume_failures,
            p.hosts_rented
        ));
        let rows: Vec<Vec<String>> = p
            .tiers
            .iter()
            .map(|(tier, t)| {
                vec![
                    tier.clone(),
                    t.arrived.to_string(),
                    t.served.to_string(),
                    (t.refused_busy + t.refused_quota).to_string(),
                    format!("{} s", t.wait_target_s),
                    opt(t.wait_p50_s, 1),
                    opt(t.wait_p95_s, 1),
                    opt(t.wait_p99_s, 1),
                    opt(t.within_target_pct, 1),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                ("TIER", Align::Left),
                ("ARRIVED", Align::Right),
                ("SERVED", Align::Right),
                ("REFUSED", Align::Right),
                ("TARGET", Align::Right),
                ("P50 S", Align::Right),
                ("P95 S", Align::Right),
                ("P99 S", Align::Right),
                ("WITHIN %", Align::Right),
            ],
            &rows,
        ));
    }
    out
}

/// At most `max` points: consecutive samples merged into buckets (demand averaged, queue and
/// hosts at their bucket maximum so peaks stay visible, cost at the bucket's end).
pub fn downsample(samples: &[Sample], max: usize) -> Vec<Sample> {
    if samples.len() <= max || max == 0 {
        return samples.to_vec();
    }
    let per = samples.len().div_ceil(max);
    samples
        .chunks(per)
        .filter_map(|chunk| {
            let last = chunk.last()?;
            let n = chunk.len() as f64;
            Some(Sample {
                t_h: last.t_h,
                demand_per_h: chunk.iter().map(|s| s.demand_per_h).sum::<f64>() / n,
                queued: chunk.iter().map(|s| s.queued).max().unwrap_or(0),
                hot: chunk.iter().map(|s| s.hot).max().unwrap_or(0),
                provisioning: chunk.iter().map(|s| s.provisioning).max().unwrap_or(0),
                warm: chunk.iter().map(|s| s.warm).max().unwrap_or(0),
                cumulative_usd: last.cumulative_usd,
            })
        })
        .collect()
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

type Metric = fn(&Sample) -> f64;

/// The plot as an SVG document: five panels over simulated hours, one line per policy, each
/// series downsampled to at most 800 points.
pub fn render_svg(title: &str, series: &[(String, Vec<Sample>)]) -> Result<String, String> {
    let series: Vec<(String, Vec<Sample>)> = series
        .iter()
        // The plot is 900 px wide: more points than pixels only make the file bigger.
        .map(|(name, s)| (name.clone(), downsample(s, 800)))
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 1250)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(title, ("sans-serif", 20))
            .map_err(|e| e.to_string())?;
        let panels = root.split_evenly((5, 1));
        let x_max = series
            .iter()
            .flat_map(|(_, s)| s.last().map(|l| l.t_h))
            .fold(1.0f64, f64::max);
        let metrics: [(&str, Metric, bool); 5] = [
            ("demand, jobs/h", |s| s.demand_per_h, false),
            ("queue depth (max)", |s| s.queued as f64, true),
            ("HOT hosts", |s| f64::from(s.hot), true),
            (
                "WARM + provisioning hosts",
                |s| f64::from(s.warm + s.provisioning),
                true,
            ),
            ("cumulative cost, $", |s| s.cumulative_usd, true),
        ];
        for (panel, (caption, metric, per_policy)) in panels.iter().zip(metrics) {
            let shown: Vec<&(String, Vec<Sample>)> = if per_policy {
                series.iter().collect()
            } else {
                series.iter().take(1).collect()
            };
            let y_max = shown
                .iter()
                .flat_map(|(_, s)| s.iter().map(metric))
                .fold(1.0f64, f64::max)
                * 1.05;
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, ("sans-serif", 15))
                .margin(6)
                .x_label_area_size(22)
                .y_label_area_size(55)
                .build_cartesian_2d(0f64..x_max, 0f64..y_max)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("hours")
                .max_light_lines(0)
                .draw()
                .map_err(|e| e.to_string())?;
            for (i, (name, samples)) in shown.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let label = if per_policy { name.as_str() } else { "demand" };
                chart
                    .draw_series(LineSeries::new(
                        samples.iter().map(|s| (s.t_h, metric(s))),
                        color.stroke_width(1),
                    ))
                    .map_err(|e| e.to_string())?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}
