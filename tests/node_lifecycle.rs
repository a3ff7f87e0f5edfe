//! A real `kilnd` process through crashes, cancels and restarts: `kill -9` loses no accepted
//! job, cancel works on queued and running jobs, SSE shows a job's life, keys added by
//! `kiln keys add` work without a restart.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use kiln_e2e::{Api, Node, NodeSpec, bin, sdxl_workflow, simple_workflow};
use serde_json::Value;

#[tokio::test]
async fn kill9_with_queued_and_running_jobs_then_every_job_finishes() {
    let spec = NodeSpec {
        // 10 steps × 50 ms: each job runs about half a second.
        sim_args: vec!["--step-time-ms".into(), "50".into()],
        ..NodeSpec::default()
    };
    let mut node = Node::start(spec).await.expect("node starts");
    let alice = Api::new(&node, "alice");
    let pat = Api::new(&node, "pat");
    let mut ids = Vec::new();
    for i in 0..6 {
        let api = if i % 2 == 0 { &alice } else { &pat };
        let (status, job) = api.submit(&sdxl_workflow(10, i)).await.expect("submit");
        assert_eq!(status, 202, "{job}");
        ids.push((api.clone(), job["id"].as_str().expect("id").to_string()));
    }
    // Wait until the first job runs, then crash the node (kilnd and its ComfyUI).
    alice
        .wait_status(&ids[0].1, Duration::from_secs(30), |s| s == "running")
        .await
        .expect("first job starts");
    node.kill9();
    node.restart().await.expect("node restarts");

    let mut seen = HashSet::new();
    for (api, id) in &ids {
        let job = api
            .wait_final(id, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
        assert_eq!(job["status"], "succeeded", "{job}");
        assert!(seen.insert(id.clone()));
    }
    // The job that ran at the crash ran again: two attempts.
    let first = alice.job(&ids[0].1).await.expect("job");
    assert_eq!(first["attempts"], 2, "{first}");
}

#[tokio::test]
async fn running_job_fails_after_max_attempts_of_crashes() {
    let spec = NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "100".into()],
        jobs: "max_attempts = 2".into(),
        ..NodeSpec::default()
    };
    let mut node = Node::start(spec).await.expect("node starts");
    let alice = Api::new(&node, "alice");
    let (_, job) = alice.submit(&sdxl_workflow(200, 7)).await.expect("submit");
    let id = job["id"].as_str().expect("id").to_string();
    for _ in 0..2 {
        alice
            .wait_status(&id, Duration::from_secs(30), |s| s == "running")
            .await
            .expect("running");
        node.kill9();
        node.restart().await.expect("restart");
    }
    let job = alice
        .wait_final(&id, Duration::from_secs(30))
        .await
        .expect("final");
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "max_attempts", "{job}");
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    let spec = NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "100".into()],
        ..NodeSpec::default()
    };
    let node = Node::start(spec).await.expect("node starts");
    let alice = Api::new(&node, "alice");
    let (_, running) = alice.submit(&sdxl_workflow(300, 1)).await.expect("submit");
    let (_, queued) = alice.submit(&sdxl_workflow(300, 2)).await.expect("submit");
    let running = running["id"].as_str().expect("id").to_string();
    let queued = queued["id"].as_str().expect("id").to_string();
    alice
        .wait_status(&running, Duration::from_secs(30), |s| s == "running")
        .await
        .expect("running");

    let cancel = |id: String| {
        let alice = alice.clone();
        async move {
            let response = alice
                .http
                .delete(format!("{}/v1/jobs/{id}", alice.url))
                .bearer_auth(&alice.key)
                .send()
                .await
                .expect("delete");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("json"))
        }
    };
    let (status, job) = cancel(queued.clone()).await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "cancelled");

    let (status, job) = cancel(running.clone()).await;
    assert_eq!(status, 200, "{job}");
    let job = if job["status"] == "cancelled" {
        job
    } else {
        alice
            .wait_final(&running, Duration::from_secs(10))
            .await
            .expect("final")
    };
    assert_eq!(job["status"], "cancelled", "{job}");
    // The cancelled queued job never reached ComfyUI.
    let executed: Vec<_> = node
        .executed()
        .into_iter()
        .filter_map(|e| e["extra_data"]["kiln_job_id"].as_str().map(str::to_string))
        .collect();
    assert!(!executed.contains(&queued), "{executed:?}");
    // The node goes on serving.
    let (_, next) = alice
        .submit(&simple_workflow("after"))
        .await
        .expect("submit");
    let done = alice
        .wait_final(next["id"].as_str().expect("id"), Duration::from_secs(30))
        .await
        .expect("final");
    assert_eq!(done["status"], "succeeded");
}

#[tokio::test]
async fn sse_shows_queued_progress_and_done() {
    let spec = NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "40".into()],
        ..NodeSpec::default()
    };
    let node = Node::start(spec).await.expect("node starts");
    let alice = Api::new(&node, "alice");
    // A job ahead keeps ours queued for a moment.
    let (_, ahead) = alice.submit(&sdxl_workflow(15, 1)).await.expect("submit");
    let (_, ours) = alice.submit(&sdxl_workflow(12, 2)).await.expect("submit");
    assert!(ahead["id"].is_string());
    let id = ours["id"].as_str().expect("id");
    let response = alice
        .http
        .get(format!("{}/v1/jobs/{id}/events", node.url))
        .bearer_auth(&alice.key)
        .send()
        .await
        .expect("events");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !text.contains("event: done") {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("stream ends in time");
        match chunk {
            Some(Ok(bytes)) => text.push_str(&String::from_utf8_lossy(&bytes)),
            _ => break,
        }
    }
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).ok();
                }
            }
            Some((name?, data?))
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"status"), "{text}");
    assert_eq!(events[0].1["status"], "queued", "{text}");
    // Behind the running job (or, if the runner has not taken that one yet, behind it in the
    // queue).
    assert!(
        matches!(events[0].1["position"].as_u64(), Some(1 | 2)),
        "{text}"
    );
    let progress: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .filter_map(|(_, d)| d["value"].as_u64())
        .collect();
    assert!(progress.len() >= 3, "progress values relayed: {text}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    let running_index = events
        .iter()
        .position(|(n, d)| n == "status" && d["status"] == "running")
        .expect("a running status event");
    let first_progress = names
        .iter()
        .position(|n| *n == "progress")
        .expect("progress");
    assert!(running_index < first_progress, "{text}");
    let (last_name, last) = events.last().expect("events");
    assert_eq!(last_name, "done");
    assert_eq!(last["status"], "succeeded", "{text}");
}

#[tokio::test]
async fn keys_added_with_kiln_work_without_a_restart() {
    let node = Node::start(NodeSpec::default()).await.expect("node starts");
    let keys_file = node.path().join("keys.toml");
    let output = std::process::Command::new(bin("kiln"))
        .args([
            "keys",
            "add",
            "--account",
            "newco",
            "--tier",
            "premium",
            "--keys-file",
        ])
        .arg(&keys_file)
        .output()
        .expect("kiln keys add");
    assert!(output.status.success(), "{output:?}");
    let key = String::from_utf8(output.stdout)
        .expect("utf8")
        .trim()
        .to_string();
    assert!(key.starts_with("kiln_"));
    assert!(
        !std::fs::read_to_string(&keys_file)
            .expect("read")
            .contains(&key)
    );

    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = http
            .get(format!("{}/v1/jobs", node.url))
            .bearer_auth(&key)
            .send()
            .await
            .expect("list")
            .status();
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bad arguments: exit 2 with one line.
    let output = std::process::Command::new(bin("kiln"))
        .args([
            "keys",
            "add",
            "--account",
            "x",
            "--tier",
            "gold",
            "--keys-file",
        ])
        .arg(&keys_file)
        .output()
        .expect("kiln keys add");
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test]
async fn sigterm_hands_the_running_job_back_and_it_runs_after_restart() {
    let spec = NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "100".into()],
        ..NodeSpec::default()
    };
    let mut node = Node::start(spec).await.expect("node starts");
    let alice = Api::new(&node, "alice");
    // Longer than the test config's 5 s drain deadline.
    let (_, job) = alice.submit(&sdxl_workflow(120, 3)).await.expect("submit");
    let id = job["id"].as_str().expect("id").to_string();
    alice
        .wait_status(&id, Duration::from_secs(30), |s| s == "running")
        .await
        .expect("running");
    let status = node.stop().expect("exit status");
    assert!(
        status.success(),
        "kilnd exits 0 on SIGTERM: {status:?}\n{}",
        node.log()
    );
    node.restart().await.expect("restart");
    let job = alice.job(&id).await.expect("job");
    assert!(
        matches!(job["status"].as_str(), Some("queued" | "running")),
        "handed back to the queue: {job}"
    );
}
