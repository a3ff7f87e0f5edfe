//! Job webhooks from a real `kilnd`: a receiver on 127.0.0.1 (an axum server, with
//! `allow_private = true` in the node's config) checks every signature with its own HMAC code;
//! retries after failures deliver exactly once more; a webhook pending when kilnd is killed
//! with `kill -9` is delivered after the restart; a private target is refused at submission
//! when private targets are not allowed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use kiln_e2e::{Api, Node, NodeSpec, free_port, simple_workflow};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::time::Instant;

/// 24 random-looking bytes in the Standard Webhooks form.
const SECRET: &str = "whsec_c2VjcmV0LWZvci1raWxuLXdlYmhvb2stdGVzdHM=";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    signature_ok: bool,
    body: Value,
}

#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    /// Requests answered 500 before the receiver starts answering 200.
    fail_first: usize,
}

impl Receiver {
    fn requests(&self) -> Vec<Received> {
        self.got.lock().expect("receiver lock").clone()
    }
}

/// Checks `webhook-signature` the way a receiver would: HMAC-SHA256 of "{id}.{ts}.{body}"
/// under the decoded secret, compared with every `v1,` signature in the header.
fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sigs)) = (
        get("webhook-id"),
        get("webhook-timestamp"),
        get("webhook-signature"),
    ) else {
        return false;
    };
    let key = STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("test secret");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    sigs.split(' ').any(|s| s == expected)
}

async fn hook(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let received = Received {
        id: headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        signature_ok: verify(&headers, &body),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let mut got = receiver.got.lock().expect("receiver lock");
    got.push(received);
    if got.len() <= receiver.fail_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

/// Serves the receiver on 127.0.0.1:`port` until the returned task is aborted.
async fn serve(port: u16, fail_first: usize) -> (Receiver, tokio::task::JoinHandle<()>) {
    let receiver = Receiver {
        got: Arc::new(Mutex::new(Vec::new())),
        fail_first,
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the receiver");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (receiver, task)
}

fn webhook_config(allow_private: bool) -> String {
    format!(
        "[webhooks]\nsecret = \"{SECRET}\"\nallow_private = {allow_private}\n\
         timeout_s = 2\nbackoff_initial_s = 1\nbackoff_max_s = 2\n"
    )
}

async fn submit_with_webhook(api: &Api, webhook: &str) -> (u16, Value) {
    let response = api
        .http
        .post(format!("{}/v1/jobs", api.url))
        .bearer_auth(&api.key)
        .json(&json!({"workflow": simple_workflow("hook"), "webhook": webhook}))
        .send()
        .await
        .expect("submit");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until the receiver has `n` requests (at most `timeout`).
async fn wait_requests(receiver: &Receiver, n: usize, timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = receiver.requests();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn signed_webhook_retried_until_delivered_exactly_once() {
    let port = free_port();
    let (receiver, server) = serve(port, 2).await;
    let node = Node::start(NodeSpec {
        extra_config: webhook_config(true),
        ..NodeSpec::default()
    })
    .await
    .expect("node starts");
    let api = Api::new(&node, "alice");
    let (status, job) = submit_with_webhook(&api, &format!("http://127.0.0.1:{port}/hook")).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("job id").to_string();
    let done = api
        .wait_final(&id, Duration::from_secs(30))
        .await
        .expect("final");
    assert_eq!(done["status"], "succeeded");

    // 500, 500, then 200: three requests, then no more.
    let got = wait_requests(&receiver, 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3, "requests: {got:?}\n{}", node.log());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = receiver.requests();
    assert_eq!(got.len(), 3, "delivered, then nothing more: {got:?}");
    for r in &got {
        assert!(r.signature_ok, "bad signature: {r:?}");
        assert_eq!(
            r.id,
            format!("msg_{id}_succeeded"),
            "one webhook-id for every attempt"
        );
        assert_eq!(r.body["id"], id.as_str());
        assert_eq!(r.body["status"], "succeeded");
        assert_eq!(r.body["outputs"].as_array().map(Vec::len), Some(1));
    }

    let metrics = reqwest::get(format!("{}/metrics", node.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("kiln_webhook_deliveries_total{outcome=\"delivered\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_webhook_deliveries_total{outcome=\"failed\"} 2"),
        "{metrics}"
    );
    server.abort();
}

#[tokio::test]
async fn webhook_pending_at_kill9_is_delivered_after_restart() {
    // Nothing listens on the receiver's port yet: every attempt fails.
    let port = free_port();
    let mut node = Node::start(NodeSpec {
        extra_config: webhook_config(true),
        ..NodeSpec::default()
    })
    .await
    .expect("node starts");
    let api = Api::new(&node, "alice");
    let (status, job) = submit_with_webhook(&api, &format!("http://127.0.0.1:{port}/hook")).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("job id").to_string();
    api.wait_final(&id, Duration::from_secs(30))
        .await
        .expect("final");
    // Wait for a failed attempt, so the row is mid-retry when the node dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.log().contains("webhook failed; will retry") {
        assert!(Instant::now() < deadline, "no attempt:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.kill9();

    let (receiver, server) = serve(port, 0).await;
    node.restart().await.expect("node restarts");
    let got = wait_requests(&receiver, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "after the restart: {got:?}\n{}", node.log());
    assert!(got[0].signature_ok);
    assert_eq!(got[0].id, format!("msg_{id}_succeeded"));
    assert_eq!(got[0].body["status"], "succeeded");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.requests().len(), 1, "delivered once");
    server.abort();
}

#[tokio::test]
async fn private_webhook_targets_are_refused_at_submission() {
    let node = Node::start(NodeSpec {
        extra_config: webhook_config(false),
        ..NodeSpec::default()
    })
    .await
    .expect("node starts");
    let api = Api::new(&node, "alice");
    for target in [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/hook",
        "http://localhost:9/hook",
    ] {
        let (status, body) = submit_with_webhook(&api, target).await;
        assert_eq!(status, 400, "{target}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("webhook") && message.contains("refused"),
            "{message}"
        );
    }
    let (status, list) = api.get("/v1/jobs").await.expect("list");
    assert_eq!(status, 200);
    assert_eq!(
        list["jobs"].as_array().map(Vec::len),
        Some(0),
        "nothing stored: {list}"
    );
}
