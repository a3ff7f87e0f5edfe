//! Jobs across a cluster of real `kilnd --config` processes over QUIC on 127.0.0.1, each with
//! `kilnd comfy-sim` as its ComfyUI (not a test; run with
//! `cargo bench -p kiln-daemon --bench cluster_jobs`). It prints:
//!
//! 1. **Busy owner → idle peer start latency.** Two members; the owner of an account is kept
//!    busy by one long job, then small jobs of that account are submitted to it one at a time.
//!    Latency: from the wall clock just before the `POST /v1/jobs` to the idle peer's simulator
//!    accepting the prompt (its `--executed-log` records `received_at_ms`).
//! 2. **Durable submits with replication.** Two members; many concurrent clients submit to one
//!    member, first for accounts it owns (the 202 waits for its fsync and the replica's copy),
//!    then for accounts the other member owns (forwarded, then replicated back), then again for
//!    accounts it owns with an `Idempotency-Key` on each (a new key also costs a question to the
//!    other member, which may have recorded it).
//! 3. **Cluster throughput.** Five members; small jobs submitted round robin to all of them; from
//!    the first submit to the last job's `finished_at`, how many ran on each member, and how many
//!    finished a second while the submissions ran and after the last 202.
//!
//! Knobs (environment): `CLUSTER_JOBS_LATENCY_N` (100), `CLUSTER_JOBS_SUBMITS` (4000),
//! `CLUSTER_JOBS_CLIENTS` (64), `CLUSTER_JOBS_THROUGHPUT_JOBS` (3000),
//! `CLUSTER_JOBS_NODES` (5), `CLUSTER_JOBS_PARTS` (`123`: which parts to run),
//! `CLUSTER_JOBS_INLINE_MAX_BYTES` (unset: kilnd's default), `CLUSTER_JOBS_SUBMIT_ONLY` (unset;
//! `1`: in part 3 the simulators never finish a `SaveImage`, so each member holds one job and
//! the rest wait, and the part prints what the submissions alone cost, then ends). Figures are
//! printed, never asserted. Every process started here is
//! killed with its process group when its handle drops (the simulators die with their kilnd).

mod common;

use common::{TICKS_PER_SECOND, env_or, proc_stat, quantile, unix_ms_f64};

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use kiln_daemon::peer::placement;
use kiln_daemon::protocol::Tier;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Accounts with keys on every member (pro tier: no daily quota).
const ACCOUNTS: usize = 24;
/// Concurrent `GET /v1/jobs/{id}` when reading the jobs back.
const READ_BACK_CONCURRENCY: usize = 16;
const OPERATOR_TOKEN: &str = "operator-token-for-benchmarks-0123456789";

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let root = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    RUN_DIR
        .set(root.path().to_path_buf())
        .map_err(|_| anyhow::anyhow!("the bench's directory was set twice"))?;
    runtime.block_on(run())
    // `root` goes here, with every member's files.
}

/// Where every member of the whole run keeps its files, until the run ends. Deleting a part's
/// tens of thousands of files before the next part would put that clean-up into the next
/// part's figures: on an ext4 without a journal (as on the machine these figures come from),
/// creating a file soon after many deletions scans the recently freed inodes.
static RUN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn run_dir() -> anyhow::Result<&'static Path> {
    RUN_DIR
        .get()
        .map(PathBuf::as_path)
        .context("the bench's directory is not set")
}

async fn run() -> anyhow::Result<()> {
    let latency_n = env_or("CLUSTER_JOBS_LATENCY_N", 100) as usize;
    let submits = env_or("CLUSTER_JOBS_SUBMITS", 4000) as usize;
    let clients = env_or("CLUSTER_JOBS_CLIENTS", 64).max(1) as usize;
    let throughput_jobs = env_or("CLUSTER_JOBS_THROUGHPUT_JOBS", 3000) as usize;
    let nodes = env_or("CLUSTER_JOBS_NODES", 5).max(1) as usize;
    let submit_only = env_or("CLUSTER_JOBS_SUBMIT_ONLY", 0) != 0;

    let parts = std::env::var("CLUSTER_JOBS_PARTS").unwrap_or_else(|_| "123".to_string());
    if parts.contains('1') {
        busy_owner_latency(latency_n).await?;
    }
    if parts.contains('2') {
        durable_submits(submits, clients).await?;
    }
    if parts.contains('3') {
        cluster_throughput(nodes, throughput_jobs, clients, submit_only).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The three measurements.

/// 1. A busy owner's new job started by the idle peer.
async fn busy_owner_latency(n: usize) -> anyhow::Result<()> {
    let cluster = BenchCluster::start(&["node-a", "node-b"], |i| {
        let step = if i == 0 { "200" } else { "0" };
        sim_args(step)
    })
    .await?;
    let account = cluster.accounts_owned_by(0).into_iter().next().context(
        "no account of the bench is owned by node-a; raise ACCOUNTS in the bench source",
    )?;
    let (a, b) = (&cluster.members[0], &cluster.members[1]);
    let http = client()?;

    // Keep A busy: 1000 steps × 200 ms.
    let (_, long) = submit(
        &http,
        &a.url,
        cluster.key(&account)?,
        &sdxl_workflow(1000, 1),
        None,
    )
    .await?;
    wait_running_on(&http, a, &long, Duration::from_secs(30)).await?;
    ensure!(
        running_prompts(&http, b).await? == 0,
        "node-b started a job too; the long job was meant for node-a alone"
    );

    let mut latencies = Vec::with_capacity(n);
    let mut missed = 0usize;
    for i in 0..n {
        let before_ms = unix_ms_f64();
        let (_, id) = submit(
            &http,
            &a.url,
            cluster.key(&account)?,
            &small_workflow(i),
            None,
        )
        .await?;
        match wait_executed_record(b, &id, Duration::from_secs(10)).await? {
            Some(received_ms) => latencies.push(received_ms - before_ms),
            None => missed += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "1. busy owner → idle peer start ({} jobs, submitted to the busy owner, started by the \
         idle peer): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        latencies.len(),
        quantile(&latencies, 0.5),
        quantile(&latencies, 0.9),
        quantile(&latencies, 0.99),
        quantile(&latencies, 1.0),
        if missed > 0 {
            format!("; {missed} not started by node-b within 10 s")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// 2. Submits whose 202 waits for the owner's fsync and the replica's copy.
async fn durable_submits(total: usize, clients: usize) -> anyhow::Result<()> {
    let cluster = BenchCluster::start(&["node-a", "node-b"], |_| sim_args("0")).await?;
    let http = client()?;
    for (owner, keyed, label) in [
        (
            0,
            None,
            "accounts node-a owns (stored on node-a, copied to node-b)",
        ),
        (
            1,
            None,
            "accounts node-b owns (forwarded node-a → node-b, copied back to node-a)",
        ),
        (
            0,
            Some("bench"),
            "accounts node-a owns, each with a new Idempotency-Key (node-b asked, then copied)",
        ),
    ] {
        let accounts = cluster.accounts_owned_by(owner);
        ensure!(
            !accounts.is_empty(),
            "no account of the bench is owned by {}",
            cluster.names[owner]
        );
        let targets: Vec<(String, String)> = accounts
            .iter()
            .map(|a| Ok((cluster.members[0].url.clone(), cluster.key(a)?.to_string())))
            .collect::<anyhow::Result<_>>()?;
        let key_metrics = [
            "kiln_peer_key_lookups_total",
            "kiln_peer_key_lookup_messages_total",
        ];
        let lookups_before = metric_sums(&http, &cluster.members, &key_metrics).await?;
        let cpu_before = cluster.cpu_time();
        let run = submit_many(&http, total, clients, targets, keyed).await;
        let cpu_after = cluster.cpu_time();
        let lookups_after = metric_sums(&http, &cluster.members, &key_metrics).await?;
        let mut latencies = run.latencies_ms.clone();
        latencies.sort_by(f64::total_cmp);
        println!(
            "2. durable submits to node-a, {label}: {} accepted in {:.2} s = {:.0} submits/s; \
             202 latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; replicas per job {}{}",
            run.accepted.len(),
            run.elapsed.as_secs_f64(),
            run.accepted.len() as f64 / run.elapsed.as_secs_f64(),
            quantile(&latencies, 0.5),
            quantile(&latencies, 0.99),
            quantile(&latencies, 1.0),
            run.replicas_summary(),
            run.failures_summary(),
        );
        println!(
            "   CPU per accepted submit while submitting (the members also run jobs meanwhile): \
             kilnd {:.2} ms, simulators {:.2} ms, bench {:.2} ms",
            (cpu_after.kilnd - cpu_before.kilnd) * 1000.0 / run.accepted.len().max(1) as f64,
            (cpu_after.simulators - cpu_before.simulators) * 1000.0
                / run.accepted.len().max(1) as f64,
            (cpu_after.bench - cpu_before.bench) * 1000.0 / run.accepted.len().max(1) as f64,
        );
        let lookups = lookups_after[0] - lookups_before[0];
        if lookups > 0.0 {
            let messages = lookups_after[1] - lookups_before[1];
            println!(
                "   idempotency-key lookups asked of node-b: {lookups:.0} in {messages:.0} \
                 messages ({:.1} per message)",
                lookups / messages.max(1.0)
            );
        }
        // Let both members run the jobs before the next round measures.
        let ids: HashSet<String> = run.accepted.iter().map(|j| j.id.clone()).collect();
        let drained = wait_all_executed(&cluster, &ids, Duration::from_secs(600)).await?;
        println!(
            "   then ran them all in {:.2} s after the last 202 (per node: {}; {} jobs ran more \
             than once)",
            drained.elapsed.as_secs_f64(),
            drained.per_node_summary(&cluster.names),
            drained.extra_runs
        );
        println!("   kilnd warnings so far: {}", cluster.warnings_summary());
    }
    Ok(())
}

/// 3. Jobs submitted round robin to every member, run wherever there is room.
///
/// With `submit_only` the simulators never finish them, so only the submissions cost.
async fn cluster_throughput(
    nodes: usize,
    total: usize,
    clients: usize,
    submit_only: bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let cluster = BenchCluster::start(&names, |_| {
        let mut args = sim_args("0");
        if submit_only {
            args.extend(["--hang-node".to_string(), "SaveImage".to_string()]);
        }
        args
    })
    .await?;
    let http = client()?;
    // Submission k goes to member k mod M as account (k / M) mod A: consecutive submissions go
    // to consecutive members, and every member sees every account.
    let (m, a) = (cluster.members.len(), cluster.accounts.len());
    let targets: Vec<(String, String)> = (0..m * a)
        .map(|k| {
            let account = &cluster.accounts[(k / m) % a];
            Ok((
                cluster.members[k % m].url.clone(),
                cluster.key(account)?.to_string(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let store_metrics = [
        "kiln_store_commits_total",
        "kiln_store_commit_requests_total",
        "kiln_store_commit_seconds_sum",
        "kiln_store_reads_total",
    ];
    let store_before = metric_sums(&http, &cluster.members, &store_metrics).await?;
    let messages_before = cluster_messages(&http, &cluster).await?;
    let cpu_before = cluster.cpu_time();
    let run = submit_many(&http, total, clients, targets, None).await;
    if submit_only {
        let cpu_after = cluster.cpu_time();
        let messages_after = cluster_messages(&http, &cluster).await?;
        let accepted = run.accepted.len().max(1) as f64;
        let per_submit = |after: f64, before: f64| (after - before) / accepted;
        println!(
            "3. submissions alone (each member's simulator holds one job): {} accepted from \
             {clients} clients in {:.2} s = {:.0} submits/s{}",
            run.accepted.len(),
            run.elapsed.as_secs_f64(),
            run.accepted.len() as f64 / run.elapsed.as_secs_f64(),
            run.failures_summary(),
        );
        println!(
            "   per accepted submit: CPU kilnd {:.3} ms, simulators {:.3} ms, this bench's \
             clients {:.3} ms; cluster messages {:.1} sent, {:.0} bytes",
            per_submit(cpu_after.kilnd, cpu_before.kilnd) * 1000.0,
            per_submit(cpu_after.simulators, cpu_before.simulators) * 1000.0,
            per_submit(cpu_after.bench, cpu_before.bench) * 1000.0,
            per_submit(messages_after.0, messages_before.0),
            per_submit(messages_after.1, messages_before.1),
        );
        return Ok(());
    }
    let ids: HashSet<String> = run.accepted.iter().map(|j| j.id.clone()).collect();
    let executed = wait_all_executed(&cluster, &ids, Duration::from_secs(900)).await?;
    let cpu_after = cluster.cpu_time();
    let messages_after = cluster_messages(&http, &cluster).await?;
    let store_after = metric_sums(&http, &cluster.members, &store_metrics).await?;
    // Read each job back from its owner (a local read there, not a relayed one).
    let owner_url: HashMap<&str, &str> = cluster
        .accounts
        .iter()
        .filter_map(|account| {
            let owner = *placement::rank(account, &cluster.names).first()?;
            let i = cluster.names.iter().position(|n| n == owner)?;
            Some((
                cluster.keys.get(account)?.as_str(),
                cluster.members[i].url.as_str(),
            ))
        })
        .collect();
    let at_owners: Vec<Accepted> = run
        .accepted
        .iter()
        .map(|job| Accepted {
            url: owner_url
                .get(job.key.as_str())
                .map_or_else(|| job.url.clone(), |u| u.to_string()),
            ..job.clone()
        })
        .collect();
    let read_back = Instant::now();
    let finished = finished_times(&http, &at_owners).await?;
    let read_back = read_back.elapsed().as_secs_f64();
    ensure!(
        !finished.is_empty(),
        "no job was accepted{}",
        run.failures_summary()
    );
    let last_finished = finished.iter().copied().fold(f64::MIN, f64::max);
    let span_s = (last_finished - run.first_submit_ms) / 1000.0;
    println!(
        "3. cluster of {} members, {} small jobs from {clients} clients round robin over all \
         members and {} accounts: submitted in {:.2} s ({:.0} submits/s); first submit → last \
         job succeeded {:.2} s = {:.0} jobs/s{}",
        cluster.members.len(),
        run.accepted.len(),
        cluster.accounts.len(),
        run.elapsed.as_secs_f64(),
        run.accepted.len() as f64 / run.elapsed.as_secs_f64(),
        span_s,
        finished.len() as f64 / span_s,
        run.failures_summary(),
    );
    println!(
        "   ran per node: {}; {} jobs ran more than once",
        executed.per_node_summary(&cluster.names),
        executed.extra_runs
    );
    // Submitting costs CPU the running jobs then lack: the rate while submissions come in and
    // after the last 202 tell the two costs apart.
    let submitted_at = run.first_submit_ms + run.elapsed.as_secs_f64() * 1000.0;
    let during = finished.iter().filter(|&&f| f <= submitted_at).count();
    let after_s = (last_finished - submitted_at) / 1000.0;
    println!(
        "   jobs finished while submissions ran: {during} ({:.0}/s); after the last 202: {} in \
         {after_s:.2} s ({:.0}/s)",
        during as f64 / run.elapsed.as_secs_f64(),
        finished.len() - during,
        (finished.len() - during) as f64 / after_s.max(0.001),
    );
    let per_job = |after: f64, before: f64| (after - before) / run.accepted.len().max(1) as f64;
    println!(
        "   cluster messages (peer requests, answers and gossip) per job: {:.1} sent, {:.0} bytes",
        per_job(messages_after.0, messages_before.0),
        per_job(messages_after.1, messages_before.1),
    );
    let commits = store_after[0] - store_before[0];
    println!(
        "   job store commits (one WAL fsync each) per job, all members: {:.2}, of {:.1} \
         requests each on average, {:.2} ms each on average",
        per_job(store_after[0], store_before[0]),
        (store_after[1] - store_before[1]) / commits.max(1.0),
        (store_after[2] - store_before[2]) * 1000.0 / commits.max(1.0),
    );
    println!(
        "   job store reads per job, all members: {:.2}",
        per_job(store_after[3], store_before[3]),
    );
    let cpu_ms = |after: f64, before: f64| per_job(after, before) * 1000.0;
    println!(
        "   CPU per job (user + system, from /proc): kilnd {:.2} ms, simulators {:.2} ms, \
         this bench's clients {:.2} ms; {:.2} ms in all",
        cpu_ms(cpu_after.kilnd, cpu_before.kilnd),
        cpu_ms(cpu_after.simulators, cpu_before.simulators),
        cpu_ms(cpu_after.bench, cpu_before.bench),
        cpu_ms(cpu_after.total(), cpu_before.total()),
    );
    println!(
        "   afterwards, {} jobs read back with GET /v1/jobs/{{id}} at their owners, {READ_BACK_CONCURRENCY} \
         at a time: {read_back:.2} s ({:.0} reads/s)",
        finished.len(),
        finished.len() as f64 / read_back
    );
    println!("   kilnd warnings: {}", cluster.warnings_summary());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Starting a cluster.

/// Simulator arguments: `step_ms` per sampler step, no model load or VAE time.
fn sim_args(step_ms: &str) -> Vec<String> {
    [
        "--step-time-ms",
        step_ms,
        "--model-load-ms",
        "0",
        "--vae-time-ms",
        "0",
        "--startup-delay-ms",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One `kilnd --config` process and its files; SIGKILL to its process group on drop.
struct Member {
    dir: tempfile::TempDir,
    url: String,
    comfy_url: String,
    child: Child,
}

impl Member {
    fn executed_log(&self) -> PathBuf {
        self.dir.path().join("executed.jsonl")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("kilnd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        log.get(start..).unwrap_or("").to_string()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Members sharing one CA and one keys file, started and seen ready by each other.
struct BenchCluster {
    names: Vec<String>,
    members: Vec<Member>,
    accounts: Vec<String>,
    keys: HashMap<String, String>,
    _pki: tempfile::TempDir,
}

impl BenchCluster {
    async fn start(
        names: &[&str],
        sim: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<BenchCluster> {
        let pki = tempfile::Builder::new()
            .prefix("kiln-bench-pki-")
            .tempdir()?;
        let ca = pki.path().join("ca");
        kiln_daemon::pki::init_ca(&ca, "bench", 30)?;
        let keys_file = pki.path().join("keys.toml");
        let mut keys = HashMap::new();
        let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("bench-{i}")).collect();
        for account in &accounts {
            let key = kiln_daemon::tiers::add_key(&keys_file, account, Tier::Pro)
                .with_context(|| format!("key for {account}"))?;
            keys.insert(account.clone(), key);
        }
        let gossip_ports = names
            .iter()
            .map(|_| free_gossip_port())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let seed = format!("quic://127.0.0.1:{}", gossip_ports[0]);
        let mut members = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let certs = pki.path().join(name);
            kiln_daemon::pki::issue(&ca, name, &certs, 30)?;
            let seeds = if i == 0 {
                Vec::new()
            } else {
                vec![seed.clone()]
            };
            members.push(launch(
                name,
                &certs,
                gossip_ports[i],
                &seeds,
                &keys_file,
                &sim(i),
            )?);
        }
        let cluster = BenchCluster {
            names: names.iter().map(|s| s.to_string()).collect(),
            members,
            accounts,
            keys,
            _pki: pki,
        };
        cluster.wait_all_ready(Duration::from_secs(90)).await?;
        Ok(cluster)
    }

    /// How many `WARN` lines the members logged, by message (fields left out), most frequent
    /// first; the missing-GPU notice of a machine without NVIDIA driver is left out.
    fn warnings_summary(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for member in &self.members {
            let log =
                std::fs::read_to_string(member.dir.path().join("kilnd.log")).unwrap_or_default();
            for line in log.lines().filter(|l| !l.contains("kiln_daemon::gpu")) {
                let Some((_, rest)) = line.split_once(" WARN ") else {
                    continue;
                };
                let message = match rest.find('=') {
                    Some(i) => rest[..i].rsplit_once(' ').map_or(rest, |(m, _)| m),
                    None => rest,
                };
                *counts.entry(message.trim().to_string()).or_default() += 1;
            }
        }
        if counts.is_empty() {
            return "none".into();
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts
            .iter()
            .take(4)
            .map(|(message, n)| format!("{n}× \"{message}\""))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn key(&self, account: &str) -> anyhow::Result<&str> {
        self.keys
            .get(account)
            .map(String::as_str)
            .with_context(|| format!("no key for account {account}"))
    }

    /// The bench's accounts whose owner (while all members are ready) is member `i`.
    fn accounts_owned_by(&self, i: usize) -> Vec<String> {
        self.accounts
            .iter()
            .filter(|a| placement::rank(a, &self.names).first() == Some(&self.names[i].as_str()))
            .cloned()
            .collect()
    }

    /// Waits until every member answers `/readyz` and its `/v1/cluster` shows every member
    /// live and `ready`.
    async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let http = client()?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for member in &self.members {
                all &= ready_members(&http, member).await.unwrap_or(0) == self.members.len();
                if !all {
                    break;
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = self
                    .members
                    .iter()
                    .zip(&self.names)
                    .map(|(m, n)| format!("--- {n} ---\n{}", m.log_tail()))
                    .collect();
                bail!(
                    "the cluster was not all ready within {timeout:?}\n{}",
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// CPU seconds (user + system) used so far by the members' kilnd processes, by their
/// simulators (the rest of each member's process group) and by this bench process.
#[derive(Debug, Clone, Copy, Default)]
struct CpuTime {
    kilnd: f64,
    simulators: f64,
    bench: f64,
}

impl CpuTime {
    fn total(&self) -> f64 {
        self.kilnd + self.simulators + self.bench
    }
}

impl BenchCluster {
    /// Reads every process's `/proc/<pid>/stat`; a child of a member's kilnd (the supervisor
    /// starts its simulator in a process group of its own) or another process of its group
    /// counts as its simulator. A process that exits between listing and reading is skipped.
    fn cpu_time(&self) -> CpuTime {
        let kilnds: HashSet<u64> = self
            .members
            .iter()
            .map(|m| u64::from(m.child.id()))
            .collect();
        let own = u64::from(std::process::id());
        let mut cpu = CpuTime::default();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return cpu;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(stat) = proc_stat(&format!("/proc/{pid}/stat")) else {
                continue;
            };
            let seconds = stat.ticks as f64 / TICKS_PER_SECOND;
            if pid == own {
                cpu.bench += seconds;
            } else if kilnds.contains(&pid) {
                cpu.kilnd += seconds;
            } else if kilnds.contains(&stat.ppid) || kilnds.contains(&stat.pgrp) {
                cpu.simulators += seconds;
            }
        }
        cpu
    }
}

/// Frames and bytes the members sent on the cluster endpoint (peer requests, answers, gossip).
async fn cluster_messages(
    http: &reqwest::Client,
    cluster: &BenchCluster,
) -> anyhow::Result<(f64, f64)> {
    let sums = metric_sums(
        http,
        &cluster.members,
        &[
            "kiln_gossip_frames_sent_total",
            "kiln_gossip_bytes_sent_total",
        ],
    )
    .await?;
    Ok((sums[0], sums[1]))
}

/// The sums over `members` of the named metrics, in order.
async fn metric_sums(
    http: &reqwest::Client,
    members: &[Member],
    names: &[&str],
) -> anyhow::Result<Vec<f64>> {
    let mut sums = vec![0.0; names.len()];
    for member in members {
        let text = http
            .get(format!("{}/metrics", member.url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            if let Some(i) = names.iter().position(|n| *n == name) {
                sums[i] += value.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(sums)
}

/// How many members `member`'s `/v1/cluster` shows live and `ready` (0 until it answers).
async fn ready_members(http: &reqwest::Client, member: &Member) -> anyhow::Result<usize> {
    let ready = http.get(format!("{}/readyz", member.url)).send().await?;
    if !ready.status().is_success() {
        return Ok(0);
    }
    let view: Value = http
        .get(format!("{}/v1/cluster", member.url))
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(view["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|m| m["live"] == Value::Bool(true) && m["state"] == "ready")
                .count()
        })
        .unwrap_or(0))
}

/// `[storage]` for every member: `CLUSTER_JOBS_INLINE_MAX_BYTES` sets `inline_max_bytes` (0:
/// every output a file); unset, the node's default.
fn storage_section() -> String {
    match std::env::var("CLUSTER_JOBS_INLINE_MAX_BYTES") {
        Ok(bytes) => format!("\n[storage]\ninline_max_bytes = {bytes}\n"),
        Err(_) => String::new(),
    }
}

/// Writes a member's config and starts `kilnd --config` in its own process group.
fn launch(
    name: &str,
    certs: &Path,
    gossip_port: u16,
    seeds: &[String],
    keys_file: &Path,
    sim_args: &[String],
) -> anyhow::Result<Member> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .disable_cleanup(true)
        .tempdir_in(run_dir()?)?;
    let api_port = free_port()?;
    let comfy_port = free_port()?;
    let kilnd = env!("CARGO_BIN_EXE_kilnd");
    let mut command = vec![
        kilnd.to_string(),
        "comfy-sim".into(),
        "--port".into(),
        comfy_port.to_string(),
        "--base-dir".into(),
        dir.path().join("comfy").to_string_lossy().into_owned(),
        "--executed-log".into(),
        dir.path()
            .join("executed.jsonl")
            .to_string_lossy()
            .into_owned(),
    ];
    command.extend(sim_args.iter().cloned());
    let toml_list = |items: &[String]| {
        items
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = format!(
        r#"[node]
name = "{name}"
data_dir = {data:?}

[api]
listen = "127.0.0.1:{api_port}"
keys_file = {keys:?}
operator_token = "{OPERATOR_TOKEN}"

[comfy]
command = [{command}]
url = "http://127.0.0.1:{comfy_port}"
start_timeout_s = 30

[jobs]
lease_s = 10
{storage}
[cluster]
certs_dir = {certs:?}
listen = "127.0.0.1:{gossip_port}"
transports = ["quic"]
seeds = [{seeds}]
gossip_interval_ms = 200
dead_grace_s = 600
provider = "local"
price_per_hour = 0.4
"#,
        data = dir.path().join("data").to_string_lossy(),
        keys = keys_file.to_string_lossy(),
        command = toml_list(&command),
        certs = certs.to_string_lossy(),
        seeds = toml_list(seeds),
        storage = storage_section(),
    );
    let config_path = dir.path().join("kilnd.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(dir.path().join("kilnd.log"))?;
    let child = Command::new(kilnd)
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting kilnd for {name}"))?;
    Ok(Member {
        dir,
        url: format!("http://127.0.0.1:{api_port}"),
        comfy_url: format!("http://127.0.0.1:{comfy_port}"),
        child,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// A port free for both UDP and TCP on 127.0.0.1 (gossip uses the same number for both).
fn free_gossip_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", 0)) else {
            continue;
        };
        let Ok(port) = udp.local_addr().map(|a| a.port()) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP after 50 tries")
}

// ---------------------------------------------------------------------------------------------
// Submitting.

fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(128)
        .build()?)
}

/// EmptyImage → ImageInvert → SaveImage, 64×48; `i` varies the colour.
fn small_workflow(i: usize) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": i % 0xFF_FFFF}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}
    })
}

/// An SDXL text-to-image workflow; the simulator takes `steps` × its step time to run it.
fn sdxl_workflow(steps: u32, seed: u64) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kiln at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0,
              "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "bench_sdxl"}}
    })
}

/// `POST /v1/jobs`; returns (replicas, job id) of a 202, an error naming the answer otherwise.
async fn submit(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    workflow: &Value,
    idempotency_key: Option<&str>,
) -> anyhow::Result<(u64, String)> {
    let mut request = http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(key)
        .json(&json!({"workflow": workflow}));
    if let Some(idempotency_key) = idempotency_key {
        request = request.header("idempotency-key", idempotency_key);
    }
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    ensure!(status == 202, "submit to {url}: {status} {body}");
    let id = body["id"]
        .as_str()
        .with_context(|| format!("a 202 without an id: {body}"))?;
    Ok((body["replicas"].as_u64().unwrap_or(0), id.to_string()))
}

/// A job accepted by `submit_many`, with where and as whom it was submitted.
#[derive(Clone)]
struct Accepted {
    id: String,
    url: String,
    key: String,
}

/// What `submit_many` saw.
struct SubmitRun {
    accepted: Vec<Accepted>,
    latencies_ms: Vec<f64>,
    /// Count of 202s by their `replicas`.
    replicas: HashMap<u64, usize>,
    failures: usize,
    first_failure: Option<String>,
    first_submit_ms: f64,
    elapsed: Duration,
}

impl SubmitRun {
    fn replicas_summary(&self) -> String {
        let mut counts: Vec<_> = self.replicas.iter().collect();
        counts.sort();
        counts
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn failures_summary(&self) -> String {
        match &self.first_failure {
            Some(first) => format!("; {} failed, first: {first}", self.failures),
            None => String::new(),
        }
    }
}

/// `total` submissions from `clients` concurrent tasks; submission `k` goes to
/// `targets[k % targets.len()]` (API URL, key), with the `Idempotency-Key` `{keyed}-{k}` when
/// `keyed` is set.
async fn submit_many(
    http: &reqwest::Client,
    total: usize,
    clients: usize,
    targets: Vec<(String, String)>,
    keyed: Option<&'static str>,
) -> SubmitRun {
    let targets = Arc::new(targets);
    let next = Arc::new(AtomicUsize::new(0));
    let first_submit_ms = unix_ms_f64();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, targets, next) = (http.clone(), targets.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while !targets.is_empty() {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let (url, key) = &targets[k % targets.len()];
                let t0 = Instant::now();
                let idempotency_key = keyed.map(|prefix| format!("{prefix}-{k}"));
                let result = submit(
                    &http,
                    url,
                    key,
                    &small_workflow(k),
                    idempotency_key.as_deref(),
                )
                .await;
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                out.push((result, ms, url.clone(), key.clone()));
            }
            out
        }));
    }
    let mut run = SubmitRun {
        accepted: Vec::with_capacity(total),
        latencies_ms: Vec::with_capacity(total),
        replicas: HashMap::new(),
        failures: 0,
        first_failure: None,
        first_submit_ms,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        let results = match task.await {
            Ok(results) => results,
            Err(e) => {
                run.failures += 1;
                run.first_failure.get_or_insert(format!("client task: {e}"));
                continue;
            }
        };
        for (result, ms, url, key) in results {
            match result {
                Ok((replicas, id)) => {
                    *run.replicas.entry(replicas).or_default() += 1;
                    run.latencies_ms.push(ms);
                    run.accepted.push(Accepted { id, url, key });
                }
                Err(e) => {
                    run.failures += 1;
                    run.first_failure.get_or_insert(format!("{e:#}"));
                }
            }
        }
    }
    run.elapsed = started.elapsed();
    run
}

// ---------------------------------------------------------------------------------------------
// Watching jobs run.

/// (job id, `received_at_ms`) of each prompt a member's simulator executed.
fn executed(member: &Member) -> Vec<(String, f64)> {
    let Ok(file) = std::fs::File::open(member.executed_log()) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
        .filter_map(|r| {
            let id = r["extra_data"]["kiln_job_id"].as_str()?.to_string();
            Some((id, r["received_at_ms"].as_f64()?))
        })
        .collect()
}

/// `received_at_ms` of job `id` at `member`'s simulator, once it is in its executed log;
/// `None` after `timeout`.
async fn wait_executed_record(
    member: &Member,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<Option<f64>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((_, at)) = executed(member).into_iter().find(|(j, _)| j == id) {
            return Ok(Some(at));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How many prompts `member`'s simulator is running now (its `GET /queue`).
async fn running_prompts(http: &reqwest::Client, member: &Member) -> anyhow::Result<usize> {
    let queue: Value = http
        .get(format!("{}/queue", member.comfy_url))
        .send()
        .await?
        .json()
        .await?;
    Ok(queue["queue_running"].as_array().map_or(0, Vec::len))
}

/// Waits until `member`'s simulator runs the prompt of job `id`.
async fn wait_running_on(
    http: &reqwest::Client,
    member: &Member,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let queue: Value = http
            .get(format!("{}/queue", member.comfy_url))
            .send()
            .await?
            .json()
            .await?;
        let running = queue["queue_running"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|item| item[3]["kiln_job_id"].as_str() == Some(id))
        });
        if running {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "job {id} not running on {} after {timeout:?}; its log:\n{}",
            member.comfy_url,
            member.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the jobs ran, once all of them are in the executed logs.
struct Executed {
    per_node: Vec<usize>,
    /// Runs beyond the first of a job.
    extra_runs: usize,
    /// From the call to the moment the last one appeared.
    elapsed: Duration,
}

impl Executed {
    fn per_node_summary(&self, names: &[String]) -> String {
        names
            .iter()
            .zip(&self.per_node)
            .map(|(n, c)| format!("{n} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Waits until every job of `ids` is in some member's executed log (rereads the logs every
/// 200 ms: polling them faster costs the members CPU on a small machine).
async fn wait_all_executed(
    cluster: &BenchCluster,
    ids: &HashSet<String>,
    timeout: Duration,
) -> anyhow::Result<Executed> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let mut seen = HashSet::new();
        let mut per_node = vec![0; cluster.members.len()];
        let mut runs = 0;
        for (i, member) in cluster.members.iter().enumerate() {
            for (id, _) in executed(member) {
                if ids.contains(&id) {
                    per_node[i] += 1;
                    runs += 1;
                    seen.insert(id);
                }
            }
        }
        if seen.len() == ids.len() {
            return Ok(Executed {
                per_node,
                extra_runs: runs - seen.len(),
                elapsed: started.elapsed(),
            });
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {} jobs executed after {timeout:?}",
            seen.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `finished_at` (unix ms) of each job, asked of the member it was submitted to; waits (bounded)
/// for each to succeed and fails on any other final status.
async fn finished_times(http: &reqwest::Client, jobs: &[Accepted]) -> anyhow::Result<Vec<f64>> {
    let results: Vec<anyhow::Result<f64>> = futures::stream::iter(jobs)
        .map(|job| finished_at(http, job, Duration::from_secs(120)))
        .buffer_unordered(READ_BACK_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn finished_at(
    http: &reqwest::Client,
    job: &Accepted,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let view: Value = http
            .get(format!("{}/v1/jobs/{}", job.url, job.id))
            .bearer_auth(&job.key)
            .send()
            .await?
            .json()
            .await?;
        match view["status"].as_str() {
            Some("succeeded") => {
                let at = view["finished_at"]
                    .as_str()
                    .with_context(|| format!("succeeded without finished_at: {view}"))?;
                let at =
                    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                        .with_context(|| format!("finished_at {at:?}"))?;
                return Ok(at.unix_timestamp_nanos() as f64 / 1e6);
            }
            Some("failed" | "cancelled") => bail!("job {} ended {view}", job.id),
            _ => {}
        }
        ensure!(
            Instant::now() < deadline,
            "job {} not succeeded after {timeout:?}: {view}",
            job.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
