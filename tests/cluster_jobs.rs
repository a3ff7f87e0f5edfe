//! Jobs across a cluster of real kilnd processes over QUIC on loopback: a submission on any node
//! goes to the account's owner and a replica before its 202, idle nodes pull work from busy
//! ones, any node answers for any job (status, list, events, outputs, cancel), and a runner
//! that dies loses its lease so the job runs again elsewhere with one final result.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kiln_daemon::peer::messages::{JobRequest, JobResponse, KeyAnswer, KeyLookup};
use kiln_daemon::protocol::ErrorCode;
use kiln_e2e::{NodeSpec, TestCluster, sdxl_workflow, simple_workflow};
use serde_json::Value;

const ACCOUNTS: [&str; 4] = ["alice", "bob", "pat", "erin"];

fn spec(step_ms: u64) -> impl Fn(usize) -> NodeSpec {
    move |_| NodeSpec {
        sim_args: vec!["--step-time-ms".into(), step_ms.to_string()],
        jobs: "lease_s = 3\nmax_attempts = 3".into(),
        ..NodeSpec::default()
    }
}

/// Job ids each simulator executed to the end, with how it ended.
fn executed(cluster: &TestCluster) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        for record in node.executed() {
            if let Some(id) = record["extra_data"]["kiln_job_id"].as_str() {
                let status = record["status"].as_str().unwrap_or("").to_string();
                out.push((i, id.to_string(), status));
            }
        }
    }
    out
}

fn logs(cluster: &TestCluster) -> String {
    cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- gpu-{i} ---\n{}", n.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn jobs_submitted_anywhere_run_once_and_any_node_answers() {
    // gpu-0 always uploads outputs in chunks; the others send small ones inside the message.
    let cluster = TestCluster::start(3, |i| NodeSpec {
        cluster: if i == 0 {
            "inline_outputs_kib = 0".into()
        } else {
            String::new()
        },
        ..spec(20)(i)
    })
    .await
    .expect("cluster starts");
    // 36 jobs, round robin over nodes and accounts; SDXL jobs take ~10 steps × 20 ms.
    let mut submitted: Vec<(String, String, usize)> = Vec::new();
    for i in 0..36usize {
        let node = i % 3;
        let account = ACCOUNTS[i % ACCOUNTS.len()];
        let api = cluster.api(node, account);
        let (status, body) = api
            .submit(&sdxl_workflow(10, i as u64))
            .await
            .expect("submit");
        assert_eq!(
            status,
            202,
            "submit {i} on gpu-{node}: {body}\n{}",
            logs(&cluster)
        );
        assert_eq!(
            body["replicas"], 1,
            "three live members: one replica\n{body}"
        );
        submitted.push((
            body["id"].as_str().expect("id").to_string(),
            account.to_string(),
            node,
        ));
    }
    // Every job succeeds; ask a node other than the one it was submitted to.
    for (id, account, node) in &submitted {
        let api = cluster.api((node + 1) % 3, account);
        let job = api
            .wait_final(id, Duration::from_secs(90))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
        assert_eq!(job["outputs"].as_array().map(Vec::len), Some(1), "{job}");
    }
    // Each ran exactly once, and the work was spread over more than one GPU.
    let runs = executed(&cluster);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, id, status) in &runs {
        assert_eq!(status, "success", "{runs:?}");
        *count.entry(id.as_str()).or_default() += 1;
    }
    for (id, _, _) in &submitted {
        assert_eq!(count.get(id.as_str()), Some(&1), "job {id} runs: {runs:?}");
    }
    let runners: HashSet<usize> = runs.iter().map(|(node, _, _)| *node).collect();
    assert!(runners.len() >= 2, "work stayed on one node: {runs:?}");
    println!(
        "36 jobs: ran once each; per node: {:?}",
        (0..3)
            .map(|n| runs.iter().filter(|(i, _, _)| *i == n).count())
            .collect::<Vec<_>>()
    );

    // Every output is served by every node (the owner's file, the replica's copy, or fetched
    // from one of them), identical and as long as the job says, whichever way it travelled.
    for (id, account, _) in &submitted {
        let mut bodies = Vec::new();
        for node in 0..3 {
            let (status, bytes) = cluster
                .api(node, account)
                .output(id, 0)
                .await
                .expect("output");
            assert_eq!(status, 200, "output of {id} on gpu-{node}");
            assert!(bytes.starts_with(b"\x89PNG"), "a PNG from gpu-{node}");
            bodies.push(bytes);
        }
        assert!(
            bodies.windows(2).all(|w| w[0] == w[1]),
            "the same file of {id} everywhere"
        );
        let job = cluster.api(0, account).job(id).await.expect("job");
        assert_eq!(
            job["outputs"][0]["bytes"].as_u64(),
            Some(bodies[0].len() as u64),
            "{job}"
        );
    }
    // gpu-0 uploaded every output it sent; the others sent theirs inline.
    let mut sent = Vec::new();
    for node in &cluster.nodes {
        let inline = node
            .metric("kiln_peer_outputs_sent_total{how=\"inline\"}")
            .await
            .expect("metrics");
        let chunked = node
            .metric("kiln_peer_outputs_sent_total{how=\"chunked\"}")
            .await
            .expect("metrics");
        sent.push((inline, chunked));
    }
    println!("outputs sent (inline, chunked) per node: {sent:?}");
    assert_eq!(sent[0].0, 0.0, "gpu-0 sends no output inline: {sent:?}");
    // A member sends outputs when it owns jobs (copies to their replicas) or runs another
    // member's jobs (results to their owners).
    let account_of: HashMap<&str, &str> = submitted
        .iter()
        .map(|(id, account, _)| (id.as_str(), account.as_str()))
        .collect();
    let sends = |node: usize| {
        submitted
            .iter()
            .any(|(_, account, _)| cluster.owner_of(account) == node)
            || runs.iter().any(|(runner, id, _)| {
                *runner == node && cluster.owner_of(account_of[id.as_str()]) != node
            })
    };
    if sends(0) {
        assert!(sent[0].1 > 0.0, "gpu-0 uploads its outputs: {sent:?}");
    }
    for node in 1..3 {
        if sends(node) {
            assert!(sent[node].0 > 0.0, "gpu-{node} sends inline: {sent:?}");
        }
    }

    // Any node lists all of an account's jobs; another account sees none of them.
    for node in 0..3 {
        let api = cluster.api(node, "alice");
        let (status, list) = api.get("/v1/jobs?limit=100").await.expect("list");
        assert_eq!(status, 200);
        let ids: HashSet<&str> = list["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .filter_map(|j| j["id"].as_str())
            .collect();
        let want: HashSet<&str> = submitted
            .iter()
            .filter(|(_, a, _)| a == "alice")
            .map(|(id, _, _)| id.as_str())
            .collect();
        assert_eq!(ids, want, "alice's jobs listed on gpu-{node}");
        let bob = cluster.api(node, "bob");
        let (status, _) = bob
            .get(&format!("/v1/jobs/{}", submitted[0].0))
            .await
            .expect("get");
        assert_eq!(status, 404, "another account's job is not found");
    }
}

#[tokio::test]
async fn an_idle_node_pulls_a_busy_owners_job_and_a_dead_runner_loses_its_lease() {
    // Slow jobs: 30 steps × 100 ms.
    let mut cluster = TestCluster::start(2, spec(100))
        .await
        .expect("cluster starts");
    let account = "alice";
    let owner = cluster.owner_of(account);
    let other = 1 - owner;
    let api = cluster.api(owner, account);
    let mut ids = Vec::new();
    for seed in 0..2 {
        let (status, body) = api.submit(&sdxl_workflow(30, seed)).await.expect("submit");
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    // The owner runs one; the other node pulls the second at once.
    for id in &ids {
        api.wait_status(id, Duration::from_secs(10), |s| s == "running")
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    }
    // Events of a job the asking node does not own are relayed.
    let events = cluster.api(other, account);
    let response = events
        .http
        .get(format!("{}/v1/jobs/{}/events", events.url, ids[0]))
        .bearer_auth(&events.key)
        .send()
        .await
        .expect("events");
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    );
    drop(response);

    // Kill the node that does not own the jobs: whichever job it ran loses its lease, is
    // queued again and finishes on the owner, once.
    cluster.nodes[other].kill9();
    let api = cluster.api(owner, account);
    for id in &ids {
        let job = api
            .wait_final(id, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let runs = executed(&cluster);
    let on_owner: Vec<&String> = runs
        .iter()
        .filter(|(node, _, status)| *node == owner && status == "success")
        .map(|(_, id, _)| id)
        .collect();
    assert_eq!(on_owner.len(), 2, "both finished on the owner: {runs:?}");
    let retried: Vec<Value> = {
        let mut out = Vec::new();
        for id in &ids {
            out.push(api.job(id).await.expect("job"));
        }
        out
    };
    assert!(
        retried.iter().any(|j| j["attempts"] == 2),
        "the job of the dead runner ran a second attempt: {retried:?}\n{}",
        logs(&cluster)
    );
}

#[tokio::test]
async fn a_job_running_on_a_peer_is_cancelled_through_any_node() {
    let cluster = TestCluster::start(2, spec(100))
        .await
        .expect("cluster starts");
    let account = "bob";
    let owner = cluster.owner_of(account);
    let other = 1 - owner;
    // Submitted through the node that does not own the account: forwarded to the owner.
    let api = cluster.api(other, account);
    let mut ids = Vec::new();
    for seed in 0..3 {
        let (status, body) = api.submit(&sdxl_workflow(40, seed)).await.expect("submit");
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    // Two run (one per node), one waits.
    let mut running = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while running.len() < 2 {
        running.clear();
        for id in &ids {
            if api.job(id).await.expect("job")["status"] == "running" {
                running.push(id.clone());
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "two jobs never ran at once\n{}",
            logs(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queued = ids
        .iter()
        .find(|id| !running.contains(id))
        .expect("one queued")
        .clone();
    // Cancel everything through the non-owner: the queued job at once, the running ones by
    // interrupting whichever node runs them.
    for id in std::iter::once(&queued).chain(running.iter()) {
        let response = api
            .http
            .delete(format!("{}/v1/jobs/{id}", api.url))
            .bearer_auth(&api.key)
            .send()
            .await
            .expect("cancel");
        assert_eq!(response.status(), 200, "cancel {id}");
    }
    for id in &ids {
        let job = api
            .wait_final(id, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
        assert_eq!(job["status"], "cancelled", "{job}");
    }
    // A finished job cannot be cancelled again, from either node.
    for node in [owner, other] {
        let api = cluster.api(node, account);
        let response = api
            .http
            .delete(format!("{}/v1/jobs/{}", api.url, ids[0]))
            .bearer_auth(&api.key)
            .send()
            .await
            .expect("cancel");
        assert_eq!(response.status(), 409);
    }
    // Neither simulator finished a cancelled job successfully.
    let runs = executed(&cluster);
    assert!(
        runs.iter().all(|(_, _, status)| status != "success"),
        "{runs:?}"
    );
    // The nodes go on: a new job succeeds.
    let (status, body) = api.submit(&simple_workflow("after")).await.expect("submit");
    assert_eq!(status, 202, "{body}");
    let job = api
        .wait_final(body["id"].as_str().expect("id"), Duration::from_secs(30))
        .await
        .expect("final");
    assert_eq!(job["status"], "succeeded");
}

/// Counts successful executions per job id over every simulator's record.
fn successes(cluster: &TestCluster) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for (_, id, status) in executed(cluster) {
        if status == "success" {
            *count.entry(id).or_default() += 1;
        }
    }
    count
}

/// Submits `n` jobs round robin over the running nodes and accounts; returns (id, account).
async fn submit_many(cluster: &TestCluster, n: usize, steps: u32) -> Vec<(String, String)> {
    let running: Vec<usize> = (0..cluster.nodes.len())
        .filter(|i| cluster.nodes[*i].is_running())
        .collect();
    let mut out = Vec::new();
    for i in 0..n {
        let node = running[i % running.len()];
        let account = ACCOUNTS[i % ACCOUNTS.len()];
        let (status, body) = cluster
            .api(node, account)
            .submit(&sdxl_workflow(steps, i as u64))
            .await
            .expect("submit");
        assert_eq!(status, 202, "{body}\n{}", logs(cluster));
        out.push((
            body["id"].as_str().expect("id").to_string(),
            account.to_string(),
        ));
    }
    out
}

/// Waits until every job is final, asking the running nodes in turn; returns the final views.
async fn wait_all_final(cluster: &TestCluster, jobs: &[(String, String)]) -> Vec<Value> {
    let running: Vec<usize> = (0..cluster.nodes.len())
        .filter(|i| cluster.nodes[*i].is_running())
        .collect();
    let mut out = Vec::new();
    for (k, (id, account)) in jobs.iter().enumerate() {
        let api = cluster.api(running[k % running.len()], account);
        let job = api
            .wait_final(id, Duration::from_secs(120))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(cluster)));
        out.push(job);
    }
    out
}

#[tokio::test]
async fn a_drained_node_hands_its_queue_on_and_nothing_runs_twice() {
    let cluster = TestCluster::start(3, spec(30))
        .await
        .expect("cluster starts");
    let mut jobs = submit_many(&cluster, 30, 10).await;
    // Drain the node that owns the most of them, while most still wait.
    let drained = cluster.owner_of(ACCOUNTS[0]);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/admin/drain", cluster.nodes[drained].url))
        .bearer_auth(&cluster.nodes[drained].operator_token)
        .send()
        .await
        .expect("drain");
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "draining");
    // Submissions for its accounts go on through another member before gossip shows it
    // draining: the draining owner refuses them, and the next member in order stores them.
    let other = (drained + 1) % 3;
    let api = cluster.api(other, ACCOUNTS[0]);
    for i in 0..5u64 {
        let (status, body) = api
            .submit(&sdxl_workflow(10, 100 + i))
            .await
            .expect("submit");
        assert_eq!(status, 202, "submit {i} while its owner drains: {body}");
        jobs.push((
            body["id"].as_str().expect("id").to_string(),
            ACCOUNTS[0].to_string(),
        ));
    }
    // A wrong token drains nothing.
    let refused = reqwest::Client::new()
        .post(format!("{}/v1/admin/drain", cluster.nodes[other].url))
        .bearer_auth("not-the-operator-token")
        .send()
        .await
        .expect("drain");
    assert_eq!(refused.status(), 401);

    let mut cluster = cluster;
    // The node exits by itself once it has handed its queue on and left.
    let status = cluster.nodes[drained].wait_exit(Duration::from_secs(40));
    let log = cluster.nodes[drained].log();
    assert!(
        status.is_some_and(|s| s.success()),
        "the drained node exits cleanly: {status:?}\n{log}"
    );
    assert!(log.contains("queued jobs handed over"), "{log}");

    let finals = wait_all_final(&cluster, &jobs).await;
    for job in &finals {
        assert_eq!(job["status"], "succeeded", "{job}\n{}", logs(&cluster));
    }
    let ran = successes(&cluster);
    for (id, _) in &jobs {
        assert_eq!(
            ran.get(id),
            Some(&1),
            "job {id} ran {:?} times",
            ran.get(id)
        );
    }
    println!(
        "drain: {} jobs, each succeeded once; executed per node {:?}",
        jobs.len(),
        (0..3)
            .map(|n| executed(&cluster)
                .iter()
                .filter(|(i, _, _)| *i == n)
                .count())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_dead_owners_jobs_are_adopted_and_not_run_again_when_it_returns() {
    let mut cluster = TestCluster::start(3, spec(40))
        .await
        .expect("cluster starts");
    let owner = cluster.owner_of("alice");
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    // Twenty slow jobs of one account, all owned by `owner`, submitted through the others.
    let jobs = submit_alice(&cluster, &others, 20, 15).await;
    cluster.nodes[owner].kill9();
    let finals = wait_all_final(&cluster, &jobs).await;
    for job in &finals {
        assert_eq!(job["status"], "succeeded", "{job}\n{}", logs(&cluster));
    }
    let ran = successes(&cluster);
    for (id, _) in &jobs {
        assert_eq!(
            ran.get(id),
            Some(&1),
            "job {id} succeeded {:?} times",
            ran.get(id)
        );
    }
    // The old owner comes back with its old data: it hands the adopted jobs over instead of
    // running them again.
    let before: usize = ran.values().sum();
    // A new job through the returning node runs, and nothing old runs again.
    let api = cluster.api(owner, "alice");
    restart_and_run_one(&mut cluster, owner).await;
    let after = successes(&cluster);
    assert_eq!(
        after.values().sum::<usize>(),
        before + 1,
        "only the new job ran: {after:?}"
    );
    for (id, _) in &jobs {
        let view = api.job(id).await.expect("job");
        assert_eq!(view["status"], "succeeded", "{view}");
    }
}

#[tokio::test]
async fn a_pro_job_starts_before_free_jobs_queued_anywhere() {
    // Free jobs of 2 s (20 steps × 100 ms); no quota or wait limit on the free tier here.
    let cluster = TestCluster::start(3, |_| NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "100".into()],
        jobs: "lease_s = 5".into(),
        extra_config: "[tiers.free]\nwait_target_s = 300\n\n".into(),
        ..NodeSpec::default()
    })
    .await
    .expect("cluster starts");
    let mut free = Vec::new();
    for i in 0..50u64 {
        let api = cluster.api((i % 3) as usize, "fred");
        let (status, body) = api.submit(&sdxl_workflow(20, i)).await.expect("submit");
        assert_eq!(status, 202, "{body}");
        free.push(body["id"].as_str().expect("id").to_string());
    }
    // Every node is busy with a free job; the rest wait (all at fred's owner).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pro_api = cluster.api(2, "alice");
    let (status, body) = pro_api.submit(&sdxl_workflow(5, 99)).await.expect("submit");
    assert_eq!(status, 202, "{body}");
    let pro = body["id"].as_str().expect("id").to_string();
    let pro_created = body["created_at"].as_str().expect("created_at").to_string();
    let pro_job = pro_api
        .wait_final(&pro, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    assert_eq!(pro_job["status"], "succeeded");
    let pro_started = pro_job["started_at"].as_str().expect("started").to_string();
    // No free job that was still waiting when the pro job arrived started before it.
    let fred = cluster.api(0, "fred");
    let mut overtook = Vec::new();
    for id in &free {
        let job = fred.job(id).await.expect("job");
        if let Some(started) = job["started_at"].as_str()
            && started > pro_created.as_str()
            && started < pro_started.as_str()
        {
            overtook.push(job.clone());
        }
    }
    assert!(
        overtook.is_empty(),
        "free jobs started after the pro job arrived ({pro_created}) and before it started \
         ({pro_started}): {overtook:?}\n{}",
        logs(&cluster)
    );
}

/// Submits `n` SDXL jobs of `steps` steps for alice, round robin through the nodes `through`;
/// each must be accepted with one replica. Returns (id, account).
async fn submit_alice(
    cluster: &TestCluster,
    through: &[usize],
    n: usize,
    steps: u32,
) -> Vec<(String, String)> {
    let mut jobs = Vec::new();
    for i in 0..n {
        let api = cluster.api(through[i % through.len()], "alice");
        let (status, body) = api
            .submit(&sdxl_workflow(steps, i as u64))
            .await
            .expect("submit");
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["replicas"], 1, "{body}");
        jobs.push((
            body["id"].as_str().expect("id").to_string(),
            "alice".to_string(),
        ));
    }
    jobs
}

/// Restarts node `i` on its old data, waits until the cluster is ready, then runs one new job
/// of alice's through it (and gives any job it should not run 2 s to show); returns its id.
async fn restart_and_run_one(cluster: &mut TestCluster, i: usize) -> String {
    cluster.nodes[i]
        .restart()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(cluster)));
    cluster
        .wait_all_ready(Duration::from_secs(45))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(cluster)));
    let api = cluster.api(i, "alice");
    let (status, body) = api.submit(&simple_workflow("back")).await.expect("submit");
    assert_eq!(status, 202, "{body}");
    let fresh = body["id"].as_str().expect("id").to_string();
    let job = api
        .wait_final(&fresh, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(cluster)));
    assert_eq!(job["status"], "succeeded");
    tokio::time::sleep(Duration::from_secs(2)).await;
    fresh
}

/// Waits (up to 30 s) until node `adopter` logs that it adopted the jobs of node `from`.
async fn wait_adopted(cluster: &TestCluster, adopter: usize, from: usize) {
    let words = [
        "adopted the jobs of a member that is gone",
        cluster.names[from].as_str(),
    ];
    wait_logged(cluster, adopter, &words, 30).await;
}

/// alice's members in rendezvous order: her jobs' owner, their replica, the third member.
fn alice_order(cluster: &TestCluster) -> (usize, usize, usize) {
    let ranked = kiln_daemon::peer::placement::rank("alice", &cluster.names);
    let index = |k: usize| {
        cluster
            .names
            .iter()
            .position(|n| n == ranked[k])
            .expect("a member")
    };
    (index(0), index(1), index(2))
}

#[tokio::test]
async fn a_returning_owner_whose_replica_died_too_finds_the_jobs_new_owner() {
    let mut cluster = TestCluster::start(3, spec(40))
        .await
        .expect("cluster starts");
    // alice's jobs: owned by `a`, copied to `b`; `c` is the third member.
    let (a, b, c) = alice_order(&cluster);
    let jobs = submit_alice(&cluster, &[c], 30, 25).await;
    let ran_at_a = |cluster: &TestCluster| {
        executed(cluster)
            .into_iter()
            .filter(|(node, _, status)| *node == a && status == "success")
            .count()
    };
    // The owner dies; its replica adopts the jobs (copying them to `c`) and dies in turn;
    // `c` adopts them from it and runs them.
    cluster.nodes[a].kill9();
    wait_adopted(&cluster, b, a).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[b].kill9();
    wait_adopted(&cluster, c, b).await;
    let finals = wait_all_final(&cluster, &jobs).await;
    for job in &finals {
        assert_eq!(job["status"], "succeeded", "{job}\n{}", logs(&cluster));
    }
    // The old owner comes back while its jobs' replica is still dead: it finds their new
    // owner and hands them over instead of running them again.
    let before = ran_at_a(&cluster);
    let api = cluster.api(a, "alice");
    let fresh = restart_and_run_one(&mut cluster, a).await;
    let fresh_at_a = executed(&cluster)
        .iter()
        .filter(|(node, id, _)| *node == a && *id == fresh)
        .count();
    assert_eq!(
        ran_at_a(&cluster),
        before + fresh_at_a,
        "the returning owner ran none of its old jobs again\n{}",
        logs(&cluster)
    );
    for (id, _) in &jobs {
        let view = api.job(id).await.expect("job");
        assert_eq!(view["status"], "succeeded", "{view}");
    }
    assert!(
        cluster.nodes[a]
            .log()
            .contains("jobs adopted by their replicas while this node was away were handed over"),
        "{}",
        cluster.nodes[a].log()
    );
}

/// Waits (up to `secs`) until node `i`'s log has a line with every one of `words`.
async fn wait_logged(cluster: &TestCluster, i: usize, words: &[&str], secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cluster.nodes[i]
        .log()
        .lines()
        .any(|line| words.iter().all(|w| line.contains(w)))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gpu-{i} logged no line with {words:?} within {secs} s\n{}",
            logs(cluster)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stale_copies_of_an_owner_that_died_before_they_were_refreshed_are_not_run() {
    let mut cluster = TestCluster::start(3, spec(40))
        .await
        .expect("cluster starts");
    // alice's jobs: owned by `o`, copied to `r`; `x` is the third member.
    let (o, r, x) = alice_order(&cluster);
    let jobs = submit_alice(&cluster, &[x], 40, 40).await;
    // The replica goes away; the owner gives the jobs' copies to `x` instead, so the copies `r`
    // keeps go stale.
    cluster.nodes[r].kill9();
    let x_name = format!("replica={}", cluster.names[x]);
    wait_logged(&cluster, o, &["the job has a new replica", &x_name], 30).await;
    // Every job's copy moves in the same second (finished ones whose end `r` missed with the
    // next resend): wait until no more move.
    let moved = |cluster: &TestCluster| {
        cluster.nodes[o]
            .log()
            .lines()
            .filter(|l| l.contains("the job has a new replica") && l.contains(&x_name))
            .count()
    };
    let mut last = moved(&cluster);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = moved(&cluster);
        if now == last {
            break;
        }
        last = now;
    }
    // The owner dies as `r` comes back, before `r` can refresh its copies: `x` adopts the
    // jobs, and `r` must forget its stale copies instead of adopting and running them.
    cluster.nodes[o].kill9();
    cluster.nodes[r]
        .restart()
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    wait_logged(&cluster, r, &["stale copies of a dead owner's jobs"], 90).await;
    let finals = wait_all_final(&cluster, &jobs).await;
    for job in &finals {
        assert_eq!(job["status"], "succeeded", "{job}\n{}", logs(&cluster));
    }
    let o_name = format!("from={}", cluster.names[o]);
    let r_log = cluster.nodes[r].log();
    assert!(
        !r_log
            .lines()
            .any(|l| l.contains("adopted the jobs of a member that is gone") && l.contains(&o_name)),
        "the returning node adopted stale copies\n{}",
        logs(&cluster)
    );
    // A job may succeed twice only where a killed node's simulator ran it to the end.
    let ran = successes(&cluster);
    let twice = jobs
        .iter()
        .filter(|(id, _)| ran.get(id).copied().unwrap_or(0) > 1)
        .count();
    assert!(twice <= 2, "{twice} jobs succeeded twice: {ran:?}");
}

#[tokio::test]
async fn an_idempotency_key_names_one_job_when_the_owner_changes_twice() {
    // An account that gpu-2 and gpu-3 rank first and second: while both are away, gpu-0 or
    // gpu-1 owns it; each that comes back owns its new jobs in turn and never saw the key.
    let names: Vec<String> = (0..4).map(|i| format!("gpu-{i}")).collect();
    let account = (0..1000)
        .map(|i| format!("acct-{i}"))
        .find(|a| {
            let ranked = kiln_daemon::peer::placement::rank(a, &names);
            ranked[..2].contains(&"gpu-2") && ranked[..2].contains(&"gpu-3")
        })
        .expect("an account ranks gpu-2 and gpu-3 first");
    let ranked = kiln_daemon::peer::placement::rank(&account, &names);
    let index = |name: &str| names.iter().position(|n| n == name).expect("a member");
    let (first, second) = (index(ranked[0]), index(ranked[1]));
    let keyed = account.clone();
    let with_account = move |i| NodeSpec {
        accounts: vec![(keyed.clone(), "pro".into())],
        ..spec(20)(i)
    };
    let mut cluster = TestCluster::start(4, with_account)
        .await
        .expect("cluster starts");
    for i in [first, second] {
        cluster.nodes[i].stop().expect("stops");
    }
    cluster
        .wait_all_ready(Duration::from_secs(45))
        .await
        .expect("the others see both gone");
    let workflow = sdxl_workflow(4, 7);
    let (status, first_answer) = cluster
        .api(0, &account)
        .submit_keyed(&workflow, "order-7")
        .await
        .expect("submit");
    assert_eq!(status, 202, "{first_answer}\n{}", logs(&cluster));
    let id = first_answer["id"].as_str().expect("id").to_string();

    // The second in rank comes back, then the first: two changes of owner since the key was
    // stored. A replay through any member names the same job after each.
    for back in [second, first] {
        cluster.nodes[back].restart().await.expect("restarts");
        cluster
            .wait_all_ready(Duration::from_secs(45))
            .await
            .expect("all ready again");
        for node in 0..4 {
            if !cluster.nodes[node].is_running() {
                continue;
            }
            let (status, again) = cluster
                .api(node, &account)
                .submit_keyed(&workflow, "order-7")
                .await
                .expect("replay");
            assert_eq!(status, 202, "{again}\n{}", logs(&cluster));
            assert_eq!(
                again["id"].as_str(),
                Some(id.as_str()),
                "a replay through gpu-{node} with gpu-{back} back made another job\n{}",
                logs(&cluster)
            );
        }
    }
    // The same key with another body is a conflict, wherever it is sent.
    let (status, body) = cluster
        .api(1, &account)
        .submit_keyed(&sdxl_workflow(4, 8), "order-7")
        .await
        .expect("conflicting submit");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    // A new key is a new job.
    let (status, other) = cluster
        .api(0, &account)
        .submit_keyed(&workflow, "order-8")
        .await
        .expect("submit");
    assert_eq!(status, 202, "{other}");
    assert_ne!(other["id"].as_str(), Some(id.as_str()));
    // One job ran for the first key.
    let job = cluster
        .api(first, &account)
        .wait_final(&id, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    assert_eq!(job["status"], "succeeded", "{job}");
    let (_, list) = cluster
        .api(1, &account)
        .get("/v1/jobs?limit=50")
        .await
        .expect("list");
    let jobs = list["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 2, "two keys, two jobs: {list}");
}

/// What the owner answers other members about an idempotency key while it is still storing a
/// submission with that key, and once it stored it.
#[tokio::test]
async fn a_key_the_owner_is_storing_is_in_progress_to_other_members() {
    let cluster = TestCluster::start(2, spec(20))
        .await
        .expect("cluster starts");
    let account = ACCOUNTS
        .iter()
        .copied()
        .find(|a| cluster.owner_of(a) == 0)
        .expect("one of the accounts ranks gpu-0 first");
    let probe = cluster.probe("probe").await.expect("the probe starts");
    let lookup = |key: &str| KeyLookup {
        account: account.to_string(),
        key: key.to_string(),
        body_hash: "another body".to_string(),
    };
    let ask = |keys: &[&str]| {
        probe.ask(
            0,
            JobRequest::FindKeys {
                lookups: keys.iter().map(|k| lookup(k)).collect(),
            },
        )
    };

    // gpu-1, which gpu-0 asks about the account's keys before storing one, stalls: a keyed
    // submission to gpu-0 waits up to 2 s for its answer, and is in progress meanwhile.
    cluster.nodes[1].pause();
    let api = cluster.api(0, account);
    let first =
        tokio::spawn(async move { api.submit_keyed(&sdxl_workflow(4, 7), "order-9").await });
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    let answers = loop {
        let answer = ask(&["order-9", "order-10"]).await;
        let Ok(JobResponse::Keys { answers }) = answer else {
            cluster.nodes[1].resume();
            panic!("{answer:?}\n{}", logs(&cluster));
        };
        if answers[0] != KeyAnswer::Unknown || tokio::time::Instant::now() > until {
            break answers;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A member before protocol 1.3 asks one key and hears a conflict to retry.
    let one = probe
        .ask(
            0,
            JobRequest::FindKey {
                account: account.to_string(),
                key: "order-9".to_string(),
                body_hash: "another body".to_string(),
            },
        )
        .await;
    cluster.nodes[1].resume();
    assert_eq!(
        answers,
        [KeyAnswer::InProgress, KeyAnswer::Unknown],
        "{}",
        logs(&cluster)
    );
    match one {
        Ok(JobResponse::Refused(refusal)) => {
            assert_eq!(refusal.code, ErrorCode::Conflict, "{refusal:?}");
            assert_eq!(refusal.retry_after, Some(1), "{refusal:?}");
        }
        other => panic!("{other:?}"),
    }

    let (status, job) = first.await.expect("joins").expect("submit");
    assert_eq!(status, 202, "{job}\n{}", logs(&cluster));
    let id = job["id"].as_str().expect("id");
    // Stored now: the key names the job (here with another body, so a conflict naming it).
    match ask(&["order-9"]).await {
        Ok(JobResponse::Keys { answers }) => match answers.as_slice() {
            [KeyAnswer::Conflict(refusal)] => {
                let details: Value =
                    serde_json::from_str(refusal.details.as_deref().unwrap_or("null"))
                        .expect("details are JSON");
                assert_eq!(details["job_id"].as_str(), Some(id), "{refusal:?}");
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

/// Stands for a member that joined ahead of the account's owner and stores the account's keyed
/// submissions now: it says it is storing `key` for the first `in_progress` questions about
/// it and then that it stored it as the job `view`, knows no other key, and counts the
/// questions it is asked about each key.
struct NewOwner {
    key: String,
    view: String,
    in_progress: usize,
    asked: std::sync::Mutex<HashMap<String, usize>>,
}

impl NewOwner {
    fn answer(&self, lookup: &KeyLookup) -> KeyAnswer {
        let asked = {
            let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
            let count = asked.entry(lookup.key.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if lookup.key == self.key && asked <= self.in_progress {
            KeyAnswer::InProgress
        } else if lookup.key == self.key {
            KeyAnswer::Same {
                view: self.view.clone(),
            }
        } else {
            KeyAnswer::Unknown
        }
    }

    fn asked(&self, key: &str) -> usize {
        let asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        asked.get(key).copied().unwrap_or(0)
    }
}

/// [`NewOwner`] answering on a probe, shared with the test that reads its counts.
struct Answering(std::sync::Arc<NewOwner>);

#[async_trait::async_trait]
impl kiln_daemon::peer::Handler<JobRequest, JobResponse> for Answering {
    async fn handle(
        &self,
        _: &kiln_daemon::peer::Caller,
        request: JobRequest,
    ) -> Result<JobResponse, kiln_daemon::peer::PeerError> {
        match request {
            JobRequest::FindKeys { lookups } => Ok(JobResponse::Keys {
                answers: lookups.iter().map(|l| self.0.answer(l)).collect(),
            }),
            JobRequest::FindKey {
                account,
                key,
                body_hash,
            } => Ok(
                match self.0.answer(&KeyLookup {
                    account,
                    key,
                    body_hash,
                }) {
                    KeyAnswer::Same { view } => JobResponse::Submitted {
                        view,
                        created: false,
                    },
                    KeyAnswer::Unknown => JobResponse::Job { view: None },
                    other => {
                        return Err(kiln_daemon::peer::PeerError::internal(format!(
                            "the one-key question cannot answer {other:?}"
                        )));
                    }
                },
            ),
            _ => Err(kiln_daemon::peer::PeerError::internal(
                "this stand-in answers key questions only",
            )),
        }
    }
}

/// A member whose view of the cluster lags (it has not seen the account's new owner yet, and
/// stores the account's jobs itself) still keeps a key to one job: having told the new owner it
/// did not know the key, it asks the new owner before it stores a submission with that key.
#[tokio::test]
async fn a_member_asks_whoever_asked_it_about_a_key_before_storing_the_key() {
    let cluster = TestCluster::start(2, spec(20))
        .await
        .expect("cluster starts");
    let account = ACCOUNTS
        .iter()
        .copied()
        .find(|a| cluster.owner_of(a) == 0)
        .expect("one of the accounts ranks gpu-0 first");
    let api = cluster.api(0, account);
    // The job the new owner stored for the key (any real job's view will do).
    let (status, earlier) = api
        .submit_keyed(&sdxl_workflow(4, 7), "order-1")
        .await
        .expect("submit");
    assert_eq!(status, 202, "{earlier}\n{}", logs(&cluster));
    let earlier_id = earlier["id"].as_str().expect("id").to_string();
    let view = api.job(&earlier_id).await.expect("the job");
    let new_owner = std::sync::Arc::new(NewOwner {
        key: "order-2".to_string(),
        view: view.to_string(),
        in_progress: 2,
        asked: std::sync::Mutex::default(),
    });
    let probe = cluster
        .probe_answering("gpu-new", Answering(new_owner.clone()))
        .await
        .expect("the stand-in starts");

    // The new owner, about to store order-2, asks gpu-0, which does not know the key.
    let answer = probe
        .ask(
            0,
            JobRequest::FindKeys {
                lookups: vec![KeyLookup {
                    account: account.to_string(),
                    key: "order-2".to_string(),
                    body_hash: "its body".to_string(),
                }],
            },
        )
        .await;
    assert!(
        matches!(&answer, Ok(JobResponse::Keys { answers }) if answers == &[KeyAnswer::Unknown]),
        "{answer:?}"
    );

    // A retry of that submission reaches gpu-0, whose view still makes it the owner: it asks
    // the new owner (a member its gossip never showed), again while the new owner is still
    // storing the key, and answers with its job.
    let (status, replay) = api
        .submit_keyed(&sdxl_workflow(4, 8), "order-2")
        .await
        .expect("submit");
    assert_eq!(status, 202, "{replay}\n{}", logs(&cluster));
    assert_eq!(
        replay["id"].as_str(),
        Some(earlier_id.as_str()),
        "gpu-0 stored the key again\n{}",
        logs(&cluster)
    );
    assert!(
        new_owner.asked("order-2") >= 1,
        "the new owner was not asked"
    );

    // A key nobody asked gpu-0 about is stored as new, without asking the stand-in.
    let (status, other) = api
        .submit_keyed(&sdxl_workflow(4, 8), "order-3")
        .await
        .expect("submit");
    assert_eq!(status, 202, "{other}");
    assert_ne!(other["id"].as_str(), Some(earlier_id.as_str()));
    assert_eq!(new_owner.asked("order-3"), 0);
    let (_, list) = api.get("/v1/jobs?limit=50").await.expect("list");
    let jobs = list["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 2, "order-1 and order-3: {list}");
}
