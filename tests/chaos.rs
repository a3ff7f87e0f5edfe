//! Five real kilnd processes with the ComfyUI simulator, 300 jobs of mixed tiers and accounts
//! submitted round robin to every node, and nodes taken away while they run: killed with
//! SIGKILL (an owner, a runner, one at random), or drained, each brought back with its old data.
//! Every accepted job must end `succeeded` exactly once, in the API and in the simulators' own
//! record of executed prompts.

use std::collections::HashMap;
use std::time::Duration;

use kiln_e2e::{NodeSpec, TestCluster, sdxl_workflow};
use serde_json::Value;
use tokio::task::JoinSet;

const ACCOUNTS: [&str; 5] = ["alice", "bob", "pat", "erin", "fred"];
/// The two scenarios start ten processes each: one at a time on a small CI machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const NODES: usize = 5;

fn spec(_: usize) -> NodeSpec {
    NodeSpec {
        // ~10 steps × 40 ms: jobs of about half a second.
        sim_args: vec!["--step-time-ms".into(), "40".into()],
        jobs: "lease_s = 3\nmax_attempts = 5".into(),
        // The free account submits more than its daily quota and wait limit would allow.
        extra_config: "[tiers.free]\nwait_target_s = 300\n\n".into(),
        ..NodeSpec::default()
    }
}

fn logs(cluster: &TestCluster) -> String {
    cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            format!(
                "--- gpu-{i} (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many log lines of all nodes contain `needle`.
fn log_lines_with(cluster: &TestCluster, needle: &str) -> usize {
    cluster
        .nodes
        .iter()
        .map(|n| n.log().lines().filter(|l| l.contains(needle)).count())
        .sum()
}

/// Every log line that names one of `ids`, per node.
fn history<'a>(cluster: &TestCluster, ids: impl Iterator<Item = &'a str>) -> String {
    let ids: Vec<&str> = ids.collect();
    let mut out = String::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        out.push_str(&format!("--- gpu-{i} ---\n"));
        for line in node.log().lines() {
            if ids.iter().any(|id| line.contains(id))
                || line.contains("adopted")
                || line.contains("handed over")
                || line.contains("took over")
                || line.contains("copies")
                || line.contains("reconcil")
            {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Submits `n` jobs at once, round robin over the running nodes and the accounts; returns the
/// accepted ones as (id, account) and how many were refused or lost with a dying node.
async fn submit_batch(
    cluster: &TestCluster,
    first: usize,
    n: usize,
) -> (Vec<(String, String)>, usize) {
    let running: Vec<usize> = (0..NODES)
        .filter(|i| cluster.nodes[*i].is_running())
        .collect();
    let mut set = JoinSet::new();
    for k in first..first + n {
        let node = running[k % running.len()];
        let account = ACCOUNTS[k % ACCOUNTS.len()];
        let api = cluster.api(node, account);
        set.spawn(async move {
            let result = api.submit(&sdxl_workflow(10, k as u64)).await;
            (account.to_string(), result)
        });
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    while let Some(joined) = set.join_next().await {
        let (account, result) = joined.expect("submit task");
        match result {
            Ok((202, body)) => {
                accepted.push((body["id"].as_str().expect("id").to_string(), account))
            }
            Ok((status, body)) => {
                refused += 1;
                println!("submission refused: {status} {body}");
            }
            Err(error) => {
                refused += 1;
                println!("submission lost: {error}");
            }
        }
    }
    (accepted, refused)
}

/// One execution a simulator recorded: (node, status, when ComfyUI accepted it, unix ms).
type Execution = (usize, String, f64);

/// Every execution per job id, over all simulators.
fn executions(cluster: &TestCluster) -> HashMap<String, Vec<Execution>> {
    let mut all: HashMap<String, Vec<Execution>> = HashMap::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        for record in node.executed() {
            let Some(id) = record["extra_data"]["kiln_job_id"].as_str() else {
                continue;
            };
            let status = record["status"].as_str().unwrap_or("").to_string();
            let at = record["received_at_ms"].as_f64().unwrap_or(0.0);
            all.entry(id.to_string()).or_default().push((i, status, at));
        }
    }
    all
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Waits for every job to be final, asking the running nodes in turn.
async fn wait_final(cluster: &TestCluster, jobs: &[(String, String)]) -> Vec<Value> {
    let running: Vec<usize> = (0..NODES)
        .filter(|i| cluster.nodes[*i].is_running())
        .collect();
    let mut out = Vec::new();
    for (k, (id, account)) in jobs.iter().enumerate() {
        let api = cluster.api(running[k % running.len()], account);
        let job = api
            .wait_final(id, Duration::from_secs(180))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(cluster)));
        out.push(job);
    }
    out
}

/// Which node to take away in round `round`: the owner of the busiest account, then a node
/// that runs jobs but owns none of the accounts if there is one, then one picked by the clock
/// (with `CHAOS_REPEAT` set, the node of round 1 again: a member taken away soon after it came
/// back, whose former replicas have just restarted).
fn victim(cluster: &TestCluster, round: usize) -> usize {
    let owners: Vec<usize> = ACCOUNTS.iter().map(|a| cluster.owner_of(a)).collect();
    match round {
        0 => owners[0],
        1 => (0..NODES)
            .find(|i| !owners.contains(i))
            .unwrap_or((owners[0] + 1) % NODES),
        _ if std::env::var("CHAOS_REPEAT").is_ok() => victim(cluster, 1),
        _ => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as usize)
                .unwrap_or(7);
            nanos % NODES
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Drain,
}

async fn run_chaos(fault: Fault) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut cluster = TestCluster::start(NODES, spec)
        .await
        .expect("cluster starts");
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut submitted = 0;
    // (node, unix ms) of every kill.
    let mut kills: Vec<(usize, f64)> = Vec::new();
    for round in 0..3 {
        let (ok, bad) = submit_batch(&cluster, submitted, 60).await;
        submitted += 60;
        accepted.extend(ok);
        refused += bad;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let node = victim(&cluster, round);
        match fault {
            Fault::Kill => {
                println!("round {round}: kill -9 gpu-{node}");
                kills.push((node, unix_ms()));
                cluster.nodes[node].kill9();
            }
            Fault::Drain => {
                println!("round {round}: drain gpu-{node}");
                let response = reqwest::Client::new()
                    .post(format!("{}/v1/admin/drain", cluster.nodes[node].url))
                    .bearer_auth(&cluster.nodes[node].operator_token)
                    .send()
                    .await
                    .expect("drain");
                assert_eq!(response.status(), 202);
            }
        }
        // Work goes on while it is away.
        let (ok, bad) = submit_batch(&cluster, submitted, 40).await;
        submitted += 40;
        accepted.extend(ok);
        refused += bad;
        if fault == Fault::Drain {
            let status = cluster.nodes[node].wait_exit(Duration::from_secs(60));
            assert!(
                status.is_some_and(|s| s.success()),
                "a drained node exits cleanly: {status:?}\n{}",
                logs(&cluster)
            );
        } else {
            // Long enough, some rounds, for the failure detector to call it dead.
            tokio::time::sleep(Duration::from_secs(2 + 2 * round as u64)).await;
        }
        cluster.nodes[node]
            .restart()
            .await
            .unwrap_or_else(|e| panic!("gpu-{node} restarts: {e}\n{}", logs(&cluster)));
        cluster
            .wait_all_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    }
    let finals = wait_final(&cluster, &accepted).await;
    // Let any late duplicate show itself before counting.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all = executions(&cluster);
    let mut not_succeeded = Vec::new();
    for job in &finals {
        if job["status"] != "succeeded" {
            not_succeeded.push(job.clone());
        }
    }
    // A job may have succeeded twice only when one of the runs finished on a node killed
    // right after (it died before it could report the result).
    let died_before_reporting = |(node, status, at): &Execution| {
        status == "success"
            && kills
                .iter()
                .any(|(killed, when)| killed == node && *at <= *when && *when - *at < 10_000.0)
    };
    let mut twice = Vec::new();
    let mut excused = 0;
    let mut never = Vec::new();
    let mut reruns = 0;
    for (id, _) in &accepted {
        let runs = all.get(id).cloned().unwrap_or_default();
        let successes = runs
            .iter()
            .filter(|(_, status, _)| status == "success")
            .count();
        match successes {
            0 => never.push(id.clone()),
            1 => {}
            2 if runs.iter().any(died_before_reporting) => excused += 1,
            _ => twice.push((id.clone(), runs.clone())),
        }
        if runs.len() > 1 {
            reruns += 1;
        }
    }
    println!(
        "chaos ({}): {submitted} submitted, {} accepted, {refused} not accepted, {} succeeded \
         in the API, {} executed successfully exactly once, {reruns} started more than once \
         (a runner died mid-job), {excused} ran to the end on a node killed before it \
         reported, {} succeeded twice otherwise",
        if fault == Fault::Kill {
            "kill -9"
        } else {
            "drain"
        },
        accepted.len(),
        finals.iter().filter(|j| j["status"] == "succeeded").count(),
        accepted.len() - never.len() - twice.len() - excused,
        twice.len()
    );
    println!(
        "leases: {} ran out and were queued again, {} ran out while their runner still held \
         the attempt and were extended",
        log_lines_with(&cluster, "a lease expired; the job is queued again"),
        log_lines_with(&cluster, "still holds the attempt; it is extended"),
    );
    assert!(
        not_succeeded.is_empty(),
        "jobs not succeeded: {not_succeeded:?}\n{}",
        logs(&cluster)
    );
    assert!(
        never.is_empty(),
        "succeeded in the API but never executed: {never:?}"
    );
    assert!(
        twice.is_empty(),
        "executed successfully twice: {twice:?}\n{}",
        history(&cluster, twice.iter().take(3).map(|(id, _)| id.as_str()))
    );
    assert!(
        accepted.len() >= 250,
        "most submissions are accepted ({refused} were not)"
    );
    if fault == Fault::Drain {
        assert_eq!(reruns, 0, "a drain never runs a job twice: {all:?}");
    }
}

#[tokio::test]
async fn kill9_of_an_owner_a_runner_and_a_random_node_loses_nothing() {
    run_chaos(Fault::Kill).await;
}

#[tokio::test]
async fn draining_nodes_in_turn_runs_nothing_twice() {
    run_chaos(Fault::Drain).await;
}
