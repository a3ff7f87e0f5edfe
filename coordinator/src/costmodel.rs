//! The planning document's cost model, recomputed from its own assumptions: the "Monthly Cost
//! Scenarios" and "Cost Per Image" tables, each row next to the figure the document prints and a
//! verdict on whether the two agree within the document's rounding. Where the document's
//! arithmetic does not hold, the output says so instead of bending the numbers.
//!
//! Pure: no I/O, no clock. `kiln cost model` prints [`render`] or the JSON of [`CostModel`].

use serde::Serialize;

use crate::text::{Align, table};

/// The document's "Assumptions" table and the few figures its other sections use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assumptions {
    /// RTX 4090 spot rate, USD per hour.
    pub spot_per_hour: f64,
    /// RTX 4090 on-demand rate, USD per hour.
    pub on_demand_per_hour: f64,
    /// A stopped (WARM) host, USD per hour: the "Instance States" table's "~$0.05-0.10?".
    pub warm_per_hour: (f64, f64),
    /// Images per hour of one saturated host, low and high.
    pub images_per_hour: (f64, f64),
    /// Inference time per image, seconds, low and high.
    pub inference_s: (f64, f64),
    /// Hours in the document's month (24 × 30).
    pub hours_per_month: f64,
    /// The images a month one HOT host serves at 100 % utilization in the "Cost Per Image"
    /// table (its 10 % row is 15,000 images).
    pub images_per_month_at_full: f64,
    /// The rate in the MVP section's sum ("~$0.50/hr × 24hr × 30 days").
    pub mvp_per_hour: f64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            spot_per_hour: 0.40,
            on_demand_per_hour: 0.80,
            warm_per_hour: (0.05, 0.10),
            images_per_hour: (200.0, 400.0),
            inference_s: (3.0, 8.0),
            hours_per_month: 24.0 * 30.0,
            images_per_month_at_full: 150_000.0,
            mvp_per_hour: 0.50,
        }
    }
}

/// A closed range of figures; a single figure has `low == high`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Range {
    pub low: f64,
    pub high: f64,
}

impl Range {
    fn new(low: f64, high: f64) -> Range {
        Range {
            low: low.min(high),
            high: low.max(high),
        }
    }

    #[cfg(test)]
    fn point(value: f64) -> Range {
        Range::new(value, value)
    }

    fn overlaps(self, other: Range) -> bool {
        self.low <= other.high && other.low <= self.high
    }

    fn contains(self, other: Range) -> bool {
        self.low <= other.low && other.high <= self.high
    }
}

/// One row of "Monthly Cost Scenarios".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub name: &'static str,
    pub hot: u32,
    pub warm: u32,
    /// The document's monthly cost, as printed and as the range it means.
    pub seed_cost: &'static str,
    pub seed_cost_range: Range,
    /// HOT hosts at the spot rate plus WARM hosts at the WARM rate, for a month.
    pub cost: Range,
    /// The document's capacity, as printed and in images a month.
    pub seed_capacity: &'static str,
    pub seed_capacity_images: f64,
    /// Images a month with the HOT hosts saturated, at the low and high images per hour.
    pub capacity_hot: Range,
    /// The same with the WARM hosts resumed too (the document's "burst").
    pub capacity_burst: Range,
    /// Images per hour per serving host that the document's capacity implies (HOT hosts only,
    /// and with the WARM ones resumed).
    pub implied_per_hour: Range,
    pub cost_agrees: bool,
    pub capacity_agrees: bool,
    pub notes: Vec<String>,
}

/// One row of "Cost Per Image".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerImage {
    pub utilization: &'static str,
    pub hosts: u32,
    pub images: f64,
    pub seed_images: f64,
    pub cost: f64,
    pub seed_cost: f64,
    pub per_image: f64,
    pub seed_per_image: f64,
    pub agrees: bool,
    pub notes: Vec<String>,
}

/// Everything `kiln cost model` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostModel {
    pub assumptions: Assumptions,
    pub scenarios: Vec<Scenario>,
    pub per_image: Vec<PerImage>,
    /// Inconsistencies between the document's own figures, beyond single rows.
    pub notes: Vec<String>,
}

/// What the document prints for one scenario row.
struct SeedScenario {
    name: &'static str,
    hot: u32,
    warm: u32,
    cost: &'static str,
    cost_range: Range,
    capacity: &'static str,
    capacity_images: f64,
}

const SCENARIOS: [SeedScenario; 4] = [
    SeedScenario {
        name: "Minimal",
        hot: 1,
        warm: 0,
        cost: "~$290",
        // "~$290": what rounds to $290 at the nearest ten dollars.
        cost_range: Range {
            low: 285.0,
            high: 295.0,
        },
        capacity: "~150k imgs/mo",
        capacity_images: 150_000.0,
    },
    SeedScenario {
        name: "Standard",
        hot: 1,
        warm: 1,
        cost: "~$350-400",
        cost_range: Range {
            low: 345.0,
            high: 405.0,
        },
        capacity: "~300k imgs/mo burst",
        capacity_images: 300_000.0,
    },
    SeedScenario {
        name: "Growth",
        hot: 2,
        warm: 1,
        cost: "~$600-700",
        cost_range: Range {
            low: 595.0,
            high: 705.0,
        },
        capacity: "~500k imgs/mo",
        capacity_images: 500_000.0,
    },
    SeedScenario {
        name: "Scale",
        hot: 3,
        warm: 2,
        cost: "~$1,000+",
        cost_range: Range {
            low: 995.0,
            high: f64::INFINITY,
        },
        capacity: "~1M imgs/mo",
        capacity_images: 1_000_000.0,
    },
];

/// What the document prints for one cost-per-image row: utilization, hosts, images, cost,
/// cost per image.
const PER_IMAGE: [(&str, f64, u32, f64, f64, f64); 5] = [
    ("10%", 0.10, 1, 15_000.0, 290.0, 0.019),
    ("30%", 0.30, 1, 45_000.0, 290.0, 0.006),
    ("50%", 0.50, 1, 75_000.0, 290.0, 0.004),
    ("80%", 0.80, 1, 120_000.0, 290.0, 0.002),
    // "100%+ (need 2nd)": 200,000 images need a second HOT host.
    ("100%+ (need 2nd)", 0.0, 2, 200_000.0, 580.0, 0.003),
];

/// Whether `value` rounds to `printed` at the printed figure's own precision (the number of
/// decimals shown, or the nearest ten dollars for "~$290").
fn rounds_to(value: f64, printed: f64, step: f64) -> bool {
    (value - printed).abs() <= step / 2.0 + 1e-9
}

/// Money to the cent, so that sums of rates read as the figures they are ($936, not
/// $936.0000000000001).
fn cents(usd: f64) -> f64 {
    (usd * 100.0).round() / 100.0
}

/// Recomputes both tables from `a`.
pub fn model(a: &Assumptions) -> CostModel {
    let month = a.hours_per_month;
    let scenarios = SCENARIOS
        .iter()
        .map(|seed| {
            let hot = f64::from(seed.hot);
            let warm = f64::from(seed.warm);
            let cost = Range::new(
                cents(hot * a.spot_per_hour * month + warm * a.warm_per_hour.0 * month),
                cents(hot * a.spot_per_hour * month + warm * a.warm_per_hour.1 * month),
            );
            let capacity_hot = Range::new(
                hot * a.images_per_hour.0 * month,
                hot * a.images_per_hour.1 * month,
            );
            let capacity_burst = Range::new(
                (hot + warm) * a.images_per_hour.0 * month,
                (hot + warm) * a.images_per_hour.1 * month,
            );
            let implied_per_hour = Range::new(
                seed.capacity_images / ((hot + warm) * month),
                seed.capacity_images / (hot * month),
            );
            let cost_agrees = seed.cost_range.contains(cost);
            // Capacities are "~" figures: within 5 % of a computed one counts as agreeing.
            let capacity_agrees = Range::new(
                seed.capacity_images * 0.95,
                seed.capacity_images * 1.05,
            )
            .overlaps(Range::new(capacity_hot.low, capacity_burst.high));
            let mut notes = Vec::new();
            if !cost_agrees {
                if seed.cost_range.overlaps(cost) {
                    notes.push(format!(
                        "the document's {} only partly matches ${:.0}-${:.0}: {}",
                        seed.cost,
                        cost.low,
                        cost.high,
                        warm_rate_needed(seed, a)
                    ));
                } else {
                    notes.push(format!(
                        "the document's {} does not match ${:.0}-${:.0}: {}",
                        seed.cost,
                        cost.low,
                        cost.high,
                        warm_rate_needed(seed, a)
                    ));
                }
            }
            if !capacity_agrees {
                notes.push(format!(
                    "{} needs {:.0}-{:.0} images per hour per host, outside the assumed {:.0}-{:.0}",
                    seed.capacity,
                    implied_per_hour.low,
                    implied_per_hour.high,
                    a.images_per_hour.0,
                    a.images_per_hour.1
                ));
            }
            Scenario {
                name: seed.name,
                hot: seed.hot,
                warm: seed.warm,
                seed_cost: seed.cost,
                seed_cost_range: seed.cost_range,
                cost,
                seed_capacity: seed.capacity,
                seed_capacity_images: seed.capacity_images,
                capacity_hot,
                capacity_burst,
                implied_per_hour,
                cost_agrees,
                capacity_agrees,
                notes,
            }
        })
        .collect();

    let host_month = cents(a.spot_per_hour * month);
    let per_image = PER_IMAGE
        .iter()
        .map(
            |&(utilization, share, hosts, seed_images, seed_cost, seed_per_image)| {
                let images = if share > 0.0 {
                    share * a.images_per_month_at_full
                } else {
                    seed_images
                };
                let cost = f64::from(hosts) * host_month;
                let per_image = cost / images;
                let decimals_step = 0.001;
                let agrees = rounds_to(images, seed_images, 1.0)
                    && rounds_to(cost, seed_cost, 10.0)
                    && rounds_to(per_image, seed_per_image, decimals_step);
                let mut notes = Vec::new();
                if !rounds_to(cost, seed_cost, 10.0) {
                    notes.push(format!(
                        "{hosts} HOT host(s) at ${:.2}/h cost ${cost:.0}, not ${seed_cost:.0}",
                        a.spot_per_hour
                    ));
                }
                if !rounds_to(per_image, seed_per_image, decimals_step) {
                    notes.push(format!(
                        "${cost:.0} / {images:.0} images is ${per_image:.4} an image, not ${seed_per_image:.3}"
                    ));
                }
                if share == 0.0 && images > f64::from(hosts) * a.images_per_month_at_full {
                    notes.push(format!(
                        "{images:.0} images exceed what {hosts} host(s) serve at 100 % ({:.0})",
                        f64::from(hosts) * a.images_per_month_at_full
                    ));
                }
                PerImage {
                    utilization,
                    hosts,
                    images,
                    seed_images,
                    cost,
                    seed_cost,
                    per_image,
                    seed_per_image,
                    agrees,
                    notes,
                }
            },
        )
        .collect();

    CostModel {
        assumptions: a.clone(),
        scenarios,
        per_image,
        notes: document_notes(a),
    }
}

/// The WARM rate that would make a scenario's printed cost hold, as a sentence.
fn warm_rate_needed(seed: &SeedScenario, a: &Assumptions) -> String {
    if seed.warm == 0 {
        return format!(
            "{} HOT host(s) at the spot rate ${:.2}/h is ${:.0} a month",
            seed.hot,
            a.spot_per_hour,
            f64::from(seed.hot) * a.spot_per_hour * a.hours_per_month
        );
    }
    let hot = f64::from(seed.hot) * a.spot_per_hour * a.hours_per_month;
    let per_warm = |total: f64| (total - hot) / (f64::from(seed.warm) * a.hours_per_month);
    let low = per_warm(seed.cost_range.low);
    if seed.cost_range.high.is_finite() {
        format!(
            "it needs each WARM host at ${:.3}-${:.3}/h, against the assumed ${:.2}-${:.2}",
            low.max(0.0),
            per_warm(seed.cost_range.high),
            a.warm_per_hour.0,
            a.warm_per_hour.1
        )
    } else {
        format!(
            "it needs each WARM host at ${:.3}/h or more, against the assumed ${:.2}-${:.2}",
            low.max(0.0),
            a.warm_per_hour.0,
            a.warm_per_hour.1
        )
    }
}

/// Inconsistencies between figures in different parts of the document.
fn document_notes(a: &Assumptions) -> Vec<String> {
    let mut notes = Vec::new();
    let from_inference = (3600.0 / a.inference_s.1, 3600.0 / a.inference_s.0);
    if from_inference.0 > a.images_per_hour.1 || from_inference.1 < a.images_per_hour.0 {
        notes.push(format!(
            "an inference time of {:.0}-{:.0} s an image gives {:.0}-{:.0} images per hour on one \
             saturated GPU, not the assumed {:.0}-{:.0}; the tables use the assumed figure",
            a.inference_s.0,
            a.inference_s.1,
            from_inference.0,
            from_inference.1,
            a.images_per_hour.0,
            a.images_per_hour.1
        ));
    }
    let full_per_hour = a.images_per_month_at_full / a.hours_per_month;
    if full_per_hour < a.images_per_hour.0 || full_per_hour > a.images_per_hour.1 {
        notes.push(format!(
            "the cost-per-image table's 100 % ({:.0} images a month) is {full_per_hour:.0} images \
             per hour, outside the assumed {:.0}-{:.0}",
            a.images_per_month_at_full, a.images_per_hour.0, a.images_per_hour.1
        ));
    } else {
        notes.push(format!(
            "the cost-per-image table's 100 % ({:.0} images a month) is {full_per_hour:.0} images \
             per hour: the low end of the assumed {:.0}-{:.0}",
            a.images_per_month_at_full, a.images_per_hour.0, a.images_per_hour.1
        ));
    }
    let mvp = a.mvp_per_hour * a.hours_per_month;
    notes.push(format!(
        "the MVP section's ${:.2}/h × 24 h × 30 days = ${mvp:.0} a month uses a rate that is \
         neither the spot ${:.2} nor the on-demand ${:.2}; on-demand, one HOT host is ${:.0}",
        a.mvp_per_hour,
        a.spot_per_hour,
        a.on_demand_per_hour,
        a.on_demand_per_hour * a.hours_per_month
    ));
    notes
}

fn money(value: f64) -> String {
    if value.is_infinite() {
        return "∞".to_string();
    }
    format!("${value:.0}")
}

fn images(value: f64) -> String {
    if value >= 1_000_000.0 {
        format!("{:.2}M", value / 1_000_000.0)
    } else {
        format!("{:.0}k", value / 1_000.0)
    }
}

fn verdict(agrees: bool) -> String {
    if agrees { "agrees" } else { "DIFFERS" }.to_string()
}

/// The readable report.
pub fn render(m: &CostModel) -> String {
    let a = &m.assumptions;
    let mut out = String::new();
    out.push_str(&format!(
        "Assumptions: spot ${:.2}/h, on-demand ${:.2}/h, WARM ${:.2}-${:.2}/h, {:.0}-{:.0} images/h \
         saturated, {:.0} h a month.\n\n",
        a.spot_per_hour,
        a.on_demand_per_hour,
        a.warm_per_hour.0,
        a.warm_per_hour.1,
        a.images_per_hour.0,
        a.images_per_hour.1,
        a.hours_per_month
    ));
    out.push_str("Monthly cost scenarios (HOT at the spot rate, WARM at the WARM rate)\n");
    let rows: Vec<Vec<String>> = m
        .scenarios
        .iter()
        .map(|s| {
            vec![
                s.name.to_string(),
                format!("{} HOT + {} WARM", s.hot, s.warm),
                if s.cost.low == s.cost.high {
                    money(s.cost.low)
                } else {
                    format!("{}-{}", money(s.cost.low), money(s.cost.high))
                },
                s.seed_cost.to_string(),
                verdict(s.cost_agrees),
                format!(
                    "{}-{} ({}-{} burst)",
                    images(s.capacity_hot.low),
                    images(s.capacity_hot.high),
                    images(s.capacity_burst.low),
                    images(s.capacity_burst.high)
                ),
                s.seed_capacity.to_string(),
                verdict(s.capacity_agrees),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            ("scenario", Align::Left),
            ("hosts", Align::Left),
            ("cost/month", Align::Right),
            ("document", Align::Right),
            ("", Align::Left),
            ("capacity/month", Align::Right),
            ("document", Align::Left),
            ("", Align::Left),
        ],
        &rows,
    ));
    for s in &m.scenarios {
        for note in &s.notes {
            out.push_str(&format!("  {}: {note}\n", s.name));
        }
    }
    out.push_str("\nCost per image (HOT hosts at the spot rate)\n");
    let rows: Vec<Vec<String>> = m
        .per_image
        .iter()
        .map(|p| {
            vec![
                p.utilization.to_string(),
                format!("{:.0}", p.images),
                money(p.cost),
                format!("${:.4}", p.per_image),
                format!("${:.3}", p.seed_per_image),
                verdict(p.agrees),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            ("utilization", Align::Left),
            ("images/month", Align::Right),
            ("cost/month", Align::Right),
            ("cost/image", Align::Right),
            ("document", Align::Right),
            ("", Align::Left),
        ],
        &rows,
    ));
    for p in &m.per_image {
        for note in &p.notes {
            out.push_str(&format!("  {}: {note}\n", p.utilization));
        }
    }
    if !m.notes.is_empty() {
        out.push_str("\nAbout the document's own figures\n");
        for note in &m.notes {
            out.push_str(&format!("- {note}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario<'a>(m: &'a CostModel, name: &str) -> &'a Scenario {
        m.scenarios
            .iter()
            .find(|s| s.name == name)
            .expect("scenario")
    }

    #[test]
    fn one_hot_spot_host_is_288_a_month() {
        let m = model(&Assumptions::default());
        let minimal = scenario(&m, "Minimal");
        assert_eq!(minimal.cost, Range::point(288.0));
        assert!(minimal.cost_agrees, "{:?}", minimal.notes);
        assert_eq!(minimal.capacity_hot, Range::new(144_000.0, 288_000.0));
        assert!(minimal.capacity_agrees);
        assert!(minimal.notes.is_empty());
    }

    #[test]
    fn scenarios_with_warm_hosts_are_checked_against_the_warm_rate() {
        let m = model(&Assumptions::default());
        let standard = scenario(&m, "Standard");
        assert_eq!(standard.cost, Range::new(324.0, 360.0));
        // $350-400 needs a WARM host at more than the assumed $0.05-0.10 an hour.
        assert!(!standard.cost_agrees);
        assert!(
            standard.notes[0].contains("$0.079-$0.163/h"),
            "{:?}",
            standard.notes
        );
        assert!(standard.capacity_agrees);

        let growth = scenario(&m, "Growth");
        assert_eq!(growth.cost, Range::new(612.0, 648.0));
        assert!(growth.cost_agrees, "{:?}", growth.notes);
        assert!(growth.capacity_agrees);

        let scale = scenario(&m, "Scale");
        assert_eq!(scale.cost, Range::new(936.0, 1008.0));
        assert!(!scale.cost_agrees);
        assert!(scale.notes[0].contains("or more"), "{:?}", scale.notes);
        assert!(scale.capacity_agrees);
    }

    #[test]
    fn cost_per_image_rows_agree_with_the_document() {
        let m = model(&Assumptions::default());
        assert_eq!(m.per_image.len(), 5);
        for row in &m.per_image {
            assert!(row.agrees, "{}: {:?}", row.utilization, row.notes);
        }
        let ten = &m.per_image[0];
        assert_eq!(ten.images, 15_000.0);
        assert_eq!(ten.cost, 288.0);
        assert!((ten.per_image - 0.0192).abs() < 1e-9);
        let two_hosts = &m.per_image[4];
        assert_eq!(two_hosts.cost, 576.0);
        assert!((two_hosts.per_image - 0.00288).abs() < 1e-9);
    }

    #[test]
    fn the_documents_own_inconsistencies_are_named() {
        let m = model(&Assumptions::default());
        assert!(
            m.notes
                .iter()
                .any(|n| n.contains("450-1200 images per hour"))
        );
        assert!(m.notes.iter().any(|n| n.contains("208 images per hour")));
        assert!(m.notes.iter().any(|n| n.contains("$360 a month")));
    }

    #[test]
    fn other_assumptions_change_the_verdicts() {
        let a = Assumptions {
            spot_per_hour: 0.80,
            ..Assumptions::default()
        };
        let m = model(&a);
        let minimal = scenario(&m, "Minimal");
        assert_eq!(minimal.cost, Range::point(576.0));
        assert!(!minimal.cost_agrees);
        assert!(m.per_image.iter().all(|row| !row.agrees));
    }

    #[test]
    fn the_report_shows_every_row_and_verdict() {
        let m = model(&Assumptions::default());
        let text = render(&m);
        for name in [
            "Minimal",
            "Standard",
            "Growth",
            "Scale",
            "10%",
            "100%+ (need 2nd)",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains("$324-$360"));
        assert!(text.contains("DIFFERS"));
        assert!(text.contains("About the document's own figures"));
        let json = serde_json::to_value(&m).expect("json");
        assert_eq!(json["scenarios"][0]["cost"]["low"], 288.0);
    }
}
