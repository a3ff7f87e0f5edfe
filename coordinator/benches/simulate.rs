//! `cargo bench -p kiln-coordinator --bench simulate`: 30 simulated days with about a million
//! jobs (diurnal trace), run with the `kiln` policy. Prints figures; asserts nothing about time.

use std::time::Instant;

use kiln_coordinator::policy::PolicyConfig;
use kiln_coordinator::simulate::{self, Shape, SimConfig, SynthOptions, trace};

fn main() {
    let days = 30;
    let options = SynthOptions {
        days,
        jobs_per_day: 1_000_000.0 / f64::from(days),
        ..SynthOptions::default()
    };
    let started = Instant::now();
    let trace = match trace::synthetic(Shape::Diurnal, &options, 1) {
        Ok(trace) => trace,
        Err(e) => {
            eprintln!("simulate bench: {e}");
            std::process::exit(1);
        }
    };
    let generated = started.elapsed();
    let config = SimConfig {
        days,
        ..SimConfig::default()
    };
    let started = Instant::now();
    let result = simulate::simulate(
        &trace,
        &config,
        &["kiln".to_string()],
        &PolicyConfig::default(),
        1,
    );
    let simulated = started.elapsed();
    let (report, series) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulate bench: {e}");
            std::process::exit(1);
        }
    };
    let ticks: usize = series.iter().map(|(_, s)| s.len()).sum();
    println!(
        "simulate: {} days, {} jobs, kiln policy: trace generated in {:.3} s, simulated in {:.3} s ({:.0} jobs/s, {} policy ticks)",
        days,
        report.arrivals,
        generated.as_secs_f64(),
        simulated.as_secs_f64(),
        report.arrivals as f64 / simulated.as_secs_f64().max(1e-9),
        ticks
    );
    for p in &report.policies {
        println!(
            "  {}: ${:.2} (×{:.2} the lower bound), {} served, {} refused",
            p.policy,
            p.total_cost_usd,
            p.ratio_to_lower_bound.unwrap_or(f64::NAN),
            p.jobs.served,
            p.jobs.refused_busy + p.jobs.refused_quota
        );
    }
}
