//! Node benchmarks that print figures (not a test; run with
//! `cargo bench -p kiln-daemon --bench node`):
//!
//! 1. time from the 202 of `POST /v1/jobs` to the prompt's arrival at ComfyUI (the simulator,
//!    zero step time) on an idle node, over sequential jobs;
//! 2. RSS and CPU of an idle `kilnd` process (its simulator child not counted).
//!
//! Everything runs on 127.0.0.1 with real processes: `kilnd --dev` and its `comfy-sim`.

mod common;

use common::{TICKS_PER_SECOND, proc_sample};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

const JOBS: usize = 200;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

struct Dev {
    child: Child,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args([
            "--dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .args(["--sim-step-ms", "0"])
        .arg(format!(
            "--sim-arg=--executed-log={}",
            dir.path().join("executed.jsonl").display()
        ))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let dev = Dev { child };
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "kilnd not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keys: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dev-keys.json"))?)?;
    let key = keys["pro"].as_str().unwrap_or_default().to_string();
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}
    });

    // 1. 202 → prompt at ComfyUI, sequential jobs on an idle node.
    let mut accepted_at = std::collections::HashMap::new();
    for i in 0..JOBS {
        let mut wf = workflow.clone();
        wf["1"]["inputs"]["color"] = json!(i);
        let response = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(&key)
            .json(&json!({"workflow": wf}))
            .send()
            .await?;
        let t = unix_ms_f64();
        anyhow::ensure!(response.status() == 202, "submit: {}", response.status());
        let job: Value = response.json().await?;
        let id = job["id"].as_str().unwrap_or_default().to_string();
        accepted_at.insert(id.clone(), t);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job: Value = http
                .get(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&key)
                .send()
                .await?
                .json()
                .await?;
            if job["status"] == "succeeded" {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {id} did not finish: {job}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut latencies = received_latencies(&dir.path().join("executed.jsonl"), &accepted_at)?;
    latencies.sort_by(f64::total_cmp);
    anyhow::ensure!(!latencies.is_empty(), "no prompt arrivals recorded");
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "202 → prompt POSTed to ComfyUI (idle node, {} jobs): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );

    // 2. Idle RSS and CPU of kilnd itself.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = dev.child.id();
    let (rss_kb, cpu0) = proc_sample(pid)?;
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let (rss_kb2, cpu1) = proc_sample(pid)?;
    let ticks = TICKS_PER_SECOND;
    let cpu_share = (cpu1 - cpu0) as f64 / ticks / window.as_secs_f64() * 100.0;
    println!(
        "idle kilnd: RSS {:.1} MB (after {} jobs), CPU {:.2} % of a core over {} s",
        rss_kb.max(rss_kb2) as f64 / 1024.0,
        JOBS,
        cpu_share,
        window.as_secs()
    );
    drop(dev);
    Ok(())
}

fn received_latencies(
    log: &Path,
    accepted_at: &std::collections::HashMap<String, f64>,
) -> anyhow::Result<Vec<f64>> {
    let file = std::fs::File::open(log)?;
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let entry: Value = serde_json::from_str(&line?)?;
        let Some(job) = entry["extra_data"]["kiln_job_id"].as_str() else {
            continue;
        };
        let (Some(t0), Some(t1)) = (accepted_at.get(job), entry["received_at_ms"].as_f64()) else {
            continue;
        };
        out.push(t1 - t0);
    }
    Ok(out)
}
