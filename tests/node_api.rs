//! The HTTP API of one real `kilnd` process with the simulator as its ComfyUI: a job end to end,
//! every error code of API.md, and that nothing refused is stored.

use std::time::Duration;

use kiln_e2e::{Api, Node, NodeSpec, simple_workflow};
use serde_json::{Value, json};

async fn error_code(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("").to_string();
    (status, code, body)
}

#[tokio::test]
async fn a_job_runs_end_to_end_and_its_png_downloads() {
    let node = Node::start(NodeSpec::default()).await.expect("node starts");
    let api = Api::new(&node, "alice");
    let (status, job) = api.submit(&simple_workflow("e2e")).await.expect("submit");
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["tier"], "pro");
    let id = job["id"].as_str().expect("id").to_string();
    let done = api
        .wait_final(&id, Duration::from_secs(30))
        .await
        .expect("job ends");
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log());
    assert_eq!(done["attempts"], 1);
    let outputs = done["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 1, "{done}");
    assert_eq!(outputs[0]["content_type"], "image/png");
    let url = format!("{}{}", node.url, outputs[0]["url"].as_str().expect("url"));
    let response = api
        .http
        .get(url)
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().expect("ct"),
        "image/png"
    );
    let bytes = response.bytes().await.expect("bytes");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(
        bytes.len() as u64,
        outputs[0]["bytes"].as_u64().expect("bytes")
    );

    // Another account sees nothing of it.
    let bob = Api::new(&node, "bob");
    let (status, body) = bob.get(&format!("/v1/jobs/{id}")).await.expect("get");
    assert_eq!(status, 404, "{body}");
    let (status, list) = bob.get("/v1/jobs").await.expect("list");
    assert_eq!(status, 200);
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0));
    let (status, list) = api
        .get("/v1/jobs?status=succeeded&limit=5")
        .await
        .expect("list");
    assert_eq!(status, 200);
    assert_eq!(list["jobs"][0]["id"], id.as_str());

    // Health, metrics and the OpenAPI document.
    let (status, _) = api.get("/healthz").await.expect("healthz");
    assert_eq!(status, 200);
    let metrics = api
        .http
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(metrics.contains("kiln_queue_depth"), "{metrics}");
    assert!(
        metrics.contains("kiln_job_wait_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("kiln_http_requests_total"), "{metrics}");
    let (status, doc) = api.get("/openapi.json").await.expect("openapi");
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/jobs"]["post"].is_object(), "{doc}");
}

#[tokio::test]
async fn every_error_code_and_nothing_stored_for_refusals() {
    let spec = NodeSpec {
        extra_config:
            "[tiers.free]\nwait_target_s = 300\ndaily_quota = 2\nadmission_max_wait_s = 60\n".into(),
        ..NodeSpec::default()
    };
    let node = Node::start(spec).await.expect("node starts");
    let api = Api::new(&node, "alice");
    let http = &api.http;
    let jobs = format!("{}/v1/jobs", node.url);

    // unauthorized: no key, unknown key.
    let (status, code, _) = error_code(
        http.post(&jobs)
            .json(&json!({}))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));
    let (status, code, _) = error_code(
        http.get(&jobs)
            .bearer_auth("kiln_not_a_key")
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));

    let post = |body: String| {
        http.post(&jobs)
            .bearer_auth(&api.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // invalid_json
    let (status, code, _) = error_code(post("{\"workflow\": ".into()).await.expect("send")).await;
    assert_eq!((status, code.as_str()), (400, "invalid_json"));
    // invalid_request: an unknown key
    let body = json!({"workflow": simple_workflow("x"), "webhok": "https://example.com"});
    let (status, code, body) = error_code(post(body.to_string()).await.expect("send")).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("webhok"),
        "{body}"
    );
    // invalid_workflow: not API format
    let body = json!({"workflow": {"nodes": [], "links": []}});
    let (status, code, _) = error_code(post(body.to_string()).await.expect("send")).await;
    assert_eq!((status, code.as_str()), (400, "invalid_workflow"));
    // invalid_workflow: a link to a node that is not there
    let mut workflow = simple_workflow("x");
    workflow["2"]["inputs"]["image"] = json!(["99", 0]);
    let (status, code, body) = error_code(
        post(json!({"workflow": workflow}).to_string())
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "invalid_workflow"), "{body}");
    assert_eq!(body["error"]["details"]["target"], "99", "{body}");
    // unknown_node_class
    let mut workflow = simple_workflow("x");
    workflow["2"]["class_type"] = json!("NoSuchNodeClass");
    let (status, code, body) = error_code(
        post(json!({"workflow": workflow}).to_string())
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (422, "unknown_node_class"),
        "{body}"
    );
    assert_eq!(body["error"]["details"]["class_type"], "NoSuchNodeClass");
    assert_eq!(body["error"]["details"]["node_id"], "2");
    // payload_too_large (the test config allows 64 KiB)
    // (A client of its own: the server answers before reading the body and closes the
    // connection, which a pooled connection would only notice on its next request.)
    let big = json!({"workflow": simple_workflow("x"), "metadata": {"pad": "x".repeat(70_000)}});
    let response = reqwest::Client::new()
        .post(&jobs)
        .bearer_auth(&api.key)
        .header("content-type", "application/json")
        .body(big.to_string())
        .send()
        .await
        .expect("send");
    let (status, code, _) = error_code(response).await;
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    // not_found
    let (status, code, _) = error_code(
        http.get(format!("{jobs}/no-such-job"))
            .bearer_auth(&api.key)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "not_found"));

    // Nothing of the above was stored.
    let (_, list) = api.get("/v1/jobs").await.expect("list");
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0), "{list}");

    // conflict: an idempotency key reused with another body; the same body gives the same job.
    let send_idem = |workflow: Value| {
        http.post(&jobs)
            .bearer_auth(&api.key)
            .header("idempotency-key", "order-42")
            .json(&json!({"workflow": workflow}))
            .send()
    };
    let first = send_idem(simple_workflow("idem")).await.expect("send");
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    let again = send_idem(simple_workflow("idem")).await.expect("send");
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.expect("json");
    assert_eq!(first["id"], again["id"]);
    let (status, code, _) =
        error_code(send_idem(simple_workflow("other")).await.expect("send")).await;
    assert_eq!((status, code.as_str()), (409, "conflict"));
    // conflict: cancelling a finished job
    let id = first["id"].as_str().expect("id");
    api.wait_final(id, Duration::from_secs(30))
        .await
        .expect("final");
    let (status, code, _) = error_code(
        http.delete(format!("{jobs}/{id}"))
            .bearer_auth(&api.key)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (409, "conflict"));

    // quota_exceeded: the test config allows the free tier 2 jobs a day.
    let fred = Api::new(&node, "fred");
    for _ in 0..2 {
        let (status, body) = fred.submit(&simple_workflow("free")).await.expect("submit");
        assert_eq!(status, 202, "{body}");
    }
    let response = http
        .post(&jobs)
        .bearer_auth(&fred.key)
        .json(&json!({"workflow": simple_workflow("free")}))
        .send()
        .await
        .expect("send");
    assert!(response.headers().contains_key("retry-after"));
    let (status, code, _) = error_code(response).await;
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    let (_, list) = fred.get("/v1/jobs").await.expect("list");
    assert_eq!(
        list["jobs"].as_array().map(Vec::len),
        Some(2),
        "the refused job is not stored"
    );

    // Operator-only document routes stay reachable; an unknown route is a JSON 404.
    let (status, code, _) = error_code(
        http.get(format!("{}/v1/nope", node.url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "not_found"));
}

#[tokio::test]
async fn busy_free_jobs_and_unavailable_while_comfyui_starts() {
    // Every job is assumed to take 100 s until one was measured, so a free job behind one
    // queued job would wait over the 60 s admission limit.
    let spec = NodeSpec {
        sim_args: vec!["--step-time-ms".into(), "200".into()],
        jobs: "assumed_duration_s = 100.0".into(),
        ..NodeSpec::default()
    };
    let node = Node::start(spec).await.expect("node starts");
    let alice = Api::new(&node, "alice");
    let fred = Api::new(&node, "fred");
    // Keep the GPU busy and one pro job waiting.
    let (status, _) = alice
        .submit(&kiln_e2e::sdxl_workflow(100, 1))
        .await
        .expect("submit");
    assert_eq!(status, 202);
    let (status, _) = alice
        .submit(&kiln_e2e::sdxl_workflow(100, 2))
        .await
        .expect("submit");
    assert_eq!(status, 202);
    let response = fred
        .http
        .post(format!("{}/v1/jobs", node.url))
        .bearer_auth(&fred.key)
        .json(&json!({"workflow": simple_workflow("free")}))
        .send()
        .await
        .expect("send");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (status, code, body) = error_code(response).await;
    assert_eq!((status, code.as_str()), (503, "busy"), "{body}");
    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After set");
    let (_, list) = fred.get("/v1/jobs").await.expect("list");
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0));

    // unavailable: a node whose ComfyUI is still starting (and has never reported its node
    // classes) refuses jobs, and /readyz says why.
    let mut slow = NodeSpec {
        sim_args: vec!["--startup-delay-ms".into(), "60000".into()],
        ..NodeSpec::default()
    };
    slow.accounts.truncate(1);
    let slow = Node::launch(slow).expect("launch");
    let api = Api::new(&slow, "alice");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        match api.get("/readyz").await {
            Ok(answer) => break answer,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => panic!("kilnd API never came up: {error}\n{}", slow.log()),
        }
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("ComfyUI"),
        "{body}"
    );
    let (status, body) = api.submit(&simple_workflow("x")).await.expect("submit");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let (_, list) = api.get("/v1/jobs").await.expect("list");
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0));
}

#[test]
fn check_config_names_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys.toml");
    kiln_daemon::tiers::add_key(&keys, "acme", kiln_daemon::protocol::Tier::Pro).expect("key");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!("[api]\nkeys_file = {keys:?}\n[comfy]\ncommand = [\"python\", \"main.py\"]\n"),
    )
    .expect("write");
    let run = |path: &std::path::Path| {
        std::process::Command::new(kiln_e2e::bin("kilnd"))
            .arg("check-config")
            .arg(path)
            .output()
            .expect("kilnd check-config")
    };
    let output = run(&good);
    assert!(output.status.success(), "{output:?}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("[api]\nkeys_file = {keys:?}\n[comfy]\ncommand = [\"python\"]\n[jobs]\nmax_attempts = 0\n"),
    )
    .expect("write");
    let output = run(&bad);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("jobs.max_attempts"), "{stderr}");

    let missing_keys = dir.path().join("missing.toml");
    std::fs::write(
        &missing_keys,
        "[api]\nkeys_file = \"/nonexistent/keys.toml\"\n[comfy]\ncommand = [\"python\"]\n",
    )
    .expect("write");
    let output = run(&missing_keys);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keys_file"), "{stderr}");
}

/// Downloads a finished job's first output.
async fn first_output(node: &Node, api: &Api, job: &Value) -> Vec<u8> {
    let url = format!(
        "{}{}",
        node.url,
        job["outputs"][0]["url"].as_str().expect("url")
    );
    let response = api
        .http
        .get(url)
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("bytes").to_vec()
}

#[tokio::test]
async fn free_outputs_carry_the_watermark_and_pro_outputs_are_untouched() {
    let node = Node::start(NodeSpec::default()).await.expect("node starts");
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 320, "height": 240, "batch_size": 1, "color": 3_181_760}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "mark"}}
    });
    let mut done = Vec::new();
    for account in ["fred", "alice"] {
        let api = Api::new(&node, account);
        let (status, job) = api.submit(&workflow).await.expect("submit");
        assert_eq!(status, 202, "{job}");
        let id = job["id"].as_str().expect("id").to_string();
        let job = api
            .wait_final(&id, Duration::from_secs(30))
            .await
            .expect("job ends");
        assert_eq!(job["status"], "succeeded", "{job}\n{}", node.log());
        let bytes = first_output(&node, &api, &job).await;
        // What the simulator (ComfyUI) wrote.
        let filename = job["outputs"][0]["filename"].as_str().expect("filename");
        let written = std::fs::read(node.dir.path().join("comfy/output").join(filename))
            .expect("the simulator's file");
        done.push((job, bytes, written));
    }

    let (free_job, free_bytes, free_written) = &done[0];
    assert_eq!(free_job["tier"], "free");
    assert_eq!(
        free_job["outputs"][0]["watermark"],
        json!({"status": "applied"}),
        "{free_job}"
    );
    assert_ne!(free_bytes, free_written);
    assert_eq!(
        free_job["outputs"][0]["bytes"].as_u64(),
        Some(free_bytes.len() as u64)
    );
    let original = image::load_from_memory(free_written)
        .expect("original decodes")
        .into_rgb8();
    let marked = image::load_from_memory(free_bytes)
        .expect("marked decodes")
        .into_rgb8();
    assert_eq!(original.dimensions(), marked.dimensions());
    let changed = original
        .pixels()
        .zip(marked.pixels())
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 300, "only {changed} pixels changed");
    // ComfyUI's prompt stays in the PNG.
    let has_prompt = free_bytes.windows(10).any(|w| w == b"tEXtprompt");
    assert!(has_prompt, "the marked PNG lost its prompt chunk");

    let (pro_job, pro_bytes, pro_written) = &done[1];
    assert_eq!(pro_job["tier"], "pro");
    assert!(
        pro_job["outputs"][0].get("watermark").is_none(),
        "{pro_job}"
    );
    assert_eq!(
        pro_bytes, pro_written,
        "a pro output must be byte-identical"
    );
}
