//! Job store throughput: N concurrent submitters for a few seconds on a temporary data dir,
//! then next_job + finish cycles. Prints submits/s, latency percentiles and cycles/s.
//!
//! `cargo bench -p kiln-daemon --bench queue_submit` (add `--profile dev` to reuse the debug
//! build's dependencies). Environment: `QUEUE_BENCH_SUBMITTERS` (default 64),
//! `QUEUE_BENCH_SECS` (default 5).

mod common;

use common::{env_or, percentile};

use std::time::Duration;

use kiln_daemon::protocol::Tier;
use kiln_daemon::queue::{JobStore, NewJob, Outcome, StoreOptions};
use serde_json::json;
use tokio::time::Instant;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    let submitters = env_or("QUEUE_BENCH_SUBMITTERS", 64);
    let secs = env_or("QUEUE_BENCH_SECS", 5);
    let dir = tempfile::tempdir()?;
    let store = JobStore::open(dir.path(), StoreOptions::default()).await?;
    // A realistic small txt2img prompt (~1 KB of JSON).
    let workflow = json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20, "cfg": 7.0,
              "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
              "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
              "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kiln at dawn, oil painting", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "kiln", "images": ["8", 0]}}
    });
    let workflow = kiln_daemon::queue::JsonText::from(workflow);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..submitters {
        let store = store.clone();
        let workflow = workflow.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let tier = Tier::BY_PRIORITY[(i % 4) as usize];
                let job = NewJob {
                    id: format!("b{s}-{i}"),
                    account: format!("acct{}", (s * 31 + i) % 200),
                    tier,
                    workflow: workflow.clone(),
                    webhook: None,
                    metadata: Some(json!({"n": i})),
                    idempotency_key: Some(format!("k{s}-{i}")),
                    body_hash: format!("{s:08x}{i:016x}"),
                    max_attempts: 3,
                    replica: None,
                };
                let t0 = Instant::now();
                store.submit(job, None).await?;
                latencies.push(t0.elapsed());
                i += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let n = latencies.len();
    println!(
        "submit: {submitters} concurrent submitters, {:.1} s, {n} jobs, {:.0} submits/s, \
         latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        percentile(&latencies, 1.0).as_secs_f64() * 1e3,
    );

    // One runner, as on a node: take the next job, finish it (no outputs), repeat.
    let cycle_deadline = Instant::now() + Duration::from_secs(secs.clamp(1, 3));
    let cycle_start = Instant::now();
    let mut cycles = 0u64;
    while Instant::now() < cycle_deadline {
        let Some(job) = store.next_job().await? else {
            break;
        };
        store
            .finish(&job.id, Outcome::Succeeded { outputs: vec![] })
            .await?;
        cycles += 1;
    }
    let ce = cycle_start.elapsed();
    println!(
        "next_job+finish: 1 runner, {cycles} cycles in {:.1} s, {:.0} cycles/s \
         (two fsync'd commits per cycle)",
        ce.as_secs_f64(),
        cycles as f64 / ce.as_secs_f64()
    );
    let summary = store.summary();
    let queued: u64 = summary.tiers.iter().map(|t| t.queued).sum();
    println!("left queued: {queued}");
    store.close().await?;
    Ok(())
}
