//! Usage across a cluster of real kilnd processes: premium fair use throttles an account's new
//! jobs to free priority (shown in the job, published as free in gossip, served after a pro job)
//! once its images this month reach the limit; counts are kept once, at the account's owner,
//! whichever node took the submission, and every node answers `GET /v1/usage` with them; the
//! owner's counts survive its `kill -9` at the replica that takes over; the operator route and
//! `kiln usage export` give every account's month as CSV and JSON; bad query parameters get a
//! 400 that names them.

use std::time::Duration;

use kiln_daemon::queue::{format_utc_month, utc_day};
use kiln_e2e::{Api, NodeSpec, TestCluster, bin, sdxl_workflow, simple_workflow};
use serde_json::Value;

fn logs(cluster: &TestCluster) -> String {
    cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- gpu-{i} ---\n{}", n.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn this_month() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    format_utc_month(utc_day(now))
}

/// The sums over the days of `GET /v1/usage` (default range: this month).
async fn usage_totals(api: &Api) -> (u64, u64, u64) {
    let (status, body) = api.get("/v1/usage").await.expect("usage");
    assert_eq!(status, 200, "{body}");
    let days = body["days"].as_array().expect("days").clone();
    let sum = |key: &str| {
        days.iter()
            .map(|d| d[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    (sum("submitted"), sum("succeeded"), sum("images"))
}

async fn submit(api: &Api, workflow: &Value) -> Value {
    let (status, body) = api.submit(workflow).await.expect("submit");
    assert_eq!(status, 202, "{body}");
    body
}

fn id(job: &Value) -> String {
    job["id"].as_str().expect("id").to_string()
}

/// Waits until `node`'s cluster view shows `member` with a queued job of `tier`.
async fn wait_gossip_queue(cluster: &TestCluster, member: usize, tier: &str) -> Value {
    let name = &cluster.names[member];
    let mut last = Value::Null;
    for _ in 0..50 {
        let view = cluster.nodes[member]
            .cluster_view()
            .await
            .unwrap_or_default();
        if let Some(m) = view["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name.as_str()))
        {
            last = m["queue"].clone();
            if last[tier]["queued"].as_u64().unwrap_or(0) > 0 {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never published a queued {tier} job; last queue {last}");
}

#[tokio::test]
async fn fair_use_throttles_counts_once_at_the_owner_and_survives_it() {
    // Premium's fair use is 2 images a month here; SDXL steps take 100 ms.
    let mut cluster = TestCluster::start(2, |_| NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "100".into()],
        jobs: "lease_s = 5".into(),
        extra_config: "[tiers.free]\nwait_target_s = 300\n\n\
                       [tiers.premium]\nwait_target_s = 120\nmonthly_fair_use = 2\n\n"
            .into(),
        ..NodeSpec::default()
    })
    .await
    .expect("cluster starts");
    let owner = cluster.owner_of("pat");
    let replica = 1 - owner;

    // Two premium jobs of one image each, one through each node: counted once, at the owner.
    let mut first = Vec::new();
    for node in 0..2 {
        let job = submit(&cluster.api(node, "pat"), &simple_workflow("pat")).await;
        assert!(job.get("throttled").is_none(), "under fair use: {job}");
        first.push(id(&job));
    }
    for job in &first {
        let done = cluster
            .api(replica, "pat")
            .wait_final(job, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    for node in 0..2 {
        assert_eq!(
            usage_totals(&cluster.api(node, "pat")).await,
            (2, 2, 2),
            "GET /v1/usage on gpu-{node}"
        );
    }

    // Both nodes busy with long free jobs of different lengths.
    let fred = cluster.api(0, "fred");
    let long: Vec<String> = vec![
        id(&submit(&fred, &sdxl_workflow(60, 1)).await),
        id(&submit(&fred, &sdxl_workflow(90, 2)).await),
    ];
    for job in &long {
        fred.wait_status(job, Duration::from_secs(20), |s| s == "running")
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    }
    // The fair use is used up: the next premium job is queued at free priority and says why.
    let throttled = submit(&cluster.api(replica, "pat"), &simple_workflow("pat-3")).await;
    assert_eq!(
        throttled["throttled"]["reason"], "fair use: 2 of 2 images this month",
        "{throttled}"
    );
    assert_eq!(throttled["throttled"]["priority"], "free", "{throttled}");
    assert_eq!(throttled["tier"], "premium", "{throttled}");
    let throttled_id = id(&throttled);
    // The owner publishes it as a free job (what peers pull by), not a premium one.
    let queue = wait_gossip_queue(&cluster, owner, "free").await;
    assert_eq!(
        queue["premium"]["queued"].as_u64().unwrap_or(0),
        0,
        "{queue}"
    );
    // A pro job submitted after it starts first.
    let pro = submit(&cluster.api(owner, "alice"), &simple_workflow("alice")).await;
    let alice = cluster.api(owner, "alice");
    let pro = alice
        .wait_final(&id(&pro), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    let pat = cluster.api(owner, "pat");
    let done = pat
        .wait_final(&throttled_id, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["throttled"]["priority"], "free", "kept: {done}");
    let (pro_started, pat_started) = (
        pro["started_at"].as_str().expect("started"),
        done["started_at"].as_str().expect("started"),
    );
    assert!(
        pro_started < pat_started,
        "the pro job ({pro_started}) starts before the throttled one ({pat_started})"
    );
    for job in &long {
        fred.wait_final(job, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    }

    // The operator route and `kiln usage export`: every account once, from either node.
    let month = this_month();
    let api_url = cluster.nodes[replica].url.clone();
    let token = cluster.nodes[replica].operator_token.clone();
    let export = |format: &str| {
        std::process::Command::new(bin("kiln"))
            .args(["usage", "export", "--month", &month, "--format", format])
            .args(["--api", &api_url])
            .env("KILN_OPERATOR_TOKEN", &token)
            .env_remove("KILN_OPERATOR_TOKEN_FILE")
            .output()
            .expect("kiln runs")
    };
    let csv = export("csv");
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let csv = String::from_utf8(csv.stdout).expect("utf-8");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("day,account,tier,submitted,succeeded,images,gpu_seconds,refused")
    );
    let mut pat_totals = (0u64, 0u64, 0u64);
    let mut accounts = std::collections::BTreeSet::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), 8, "{line}");
        accounts.insert(fields[1].to_string());
        if fields[1] == "pat" {
            assert_eq!(fields[2], "premium", "{line}");
            pat_totals.0 += fields[3].parse::<u64>().expect("submitted");
            pat_totals.1 += fields[4].parse::<u64>().expect("succeeded");
            pat_totals.2 += fields[5].parse::<u64>().expect("images");
        }
    }
    assert_eq!(pat_totals, (3, 3, 3), "counted once across members:\n{csv}");
    let want: std::collections::BTreeSet<String> = ["alice", "fred", "pat"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(accounts, want, "{csv}");
    let json = export("json");
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let report: Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    assert_eq!(report["month"], month.as_str());
    assert_eq!(
        report["members"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    let fred_submitted: u64 = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["account"] == "fred")
        .map(|r| r["submitted"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(fred_submitted, 2, "{report}");

    // Bad query parameters are refused, naming the parameter.
    let pat_api = cluster.api(replica, "pat");
    for (query, named) in [
        ("from=2026-13-01", "from"),
        ("to=yesterday", "to"),
        ("from=2026-11-10&to=2026-11-01", "to"),
        ("month=2026-11", "month"),
    ] {
        let (status, body) = pat_api
            .get(&format!("/v1/usage?{query}"))
            .await
            .expect("usage");
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{query}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(&format!("{named:?}")), "{query}: {body}");
    }
    let admin = |query: &str| {
        let url = format!("{}/v1/admin/usage?{query}", cluster.nodes[owner].url);
        let token = cluster.nodes[owner].operator_token.clone();
        async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("admin usage");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    };
    let (status, body) = admin("month=2026-1").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("\"month\""),
        "{body}"
    );
    let (status, _) = pat_api.get("/v1/admin/usage").await.expect("admin usage");
    assert_eq!(status, 401, "an API key is not the operator token");
    let failed = export("yaml");
    assert!(!failed.status.success(), "an unknown format is refused");

    // The owner dies: the replica takes the account over with the counts it kept.
    cluster.nodes[owner].kill9();
    let survivor = cluster.api(replica, "pat");
    let after = submit(&survivor, &simple_workflow("pat-4")).await;
    assert_eq!(
        after["throttled"]["reason"],
        "fair use: 3 of 2 images this month",
        "{after}\n{}",
        logs(&cluster)
    );
    let done = survivor
        .wait_final(&id(&after), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", logs(&cluster)));
    assert_eq!(done["status"], "succeeded", "{done}");
    let (submitted, succeeded, images) = usage_totals(&survivor).await;
    assert_eq!(
        (submitted, succeeded, images),
        (4, 4, 4),
        "counts survived the owner"
    );
}
