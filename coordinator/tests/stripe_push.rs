//! `kiln usage push` end to end: the `kiln` binary reads usage from a fake node's
//! `GET /v1/admin/usage` (axum on 127.0.0.1) and pushes it to a fake Stripe
//! (`fake_stripe/`), with a real inventory file. Checks: events for closed days only with the
//! right values and timestamps, a second run pushes nothing, an unknown customer is reported
//! while the others are pushed, a 429 is retried, days past Stripe's 35 days are reported as
//! skipped, a wrong key stops the push, and the secret key never appears in the output.

mod fake_stripe;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fake_stripe::StripeFake;
use kiln_daemon::protocol::{AdminUsageReport, UsageDay};
use kiln_daemon::queue::{format_utc_day, format_utc_month, utc_day};
use serde_json::Value;

const STRIPE_KEY: &str = "sk_test_51KilnSecretKeyThatMustNeverPrint";
const OPERATOR_TOKEN: &str = "operator-token-for-tests";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

fn row(day: i64, account: &str, images: u64, gpu_seconds: f64) -> UsageDay {
    UsageDay {
        day: format_utc_day(day),
        account: Some(account.to_string()),
        tier: None,
        submitted: images,
        succeeded: images,
        images,
        gpu_seconds,
        refused: 0,
    }
}

/// A node's operator usage route over fixed rows: each month's rows on request, the operator
/// token checked.
async fn start_node(rows: Vec<UsageDay>) -> String {
    async fn usage(
        State(rows): State<Vec<UsageDay>>,
        headers: HeaderMap,
        Query(query): Query<BTreeMap<String, String>>,
    ) -> Response {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {OPERATOR_TOKEN}")) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let Some(month) = query.get("month") else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let rows = rows
            .into_iter()
            .filter(|r| r.day.starts_with(month.as_str()))
            .collect();
        Json(AdminUsageReport {
            month: month.clone(),
            members: vec!["n1".into()],
            missing: vec![],
            rows,
        })
        .into_response()
    }
    let app = Router::new()
        .route("/v1/admin/usage", get(usage))
        .with_state(rows);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    format!("http://{addr}")
}

fn write_owner_only(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn write_config(dir: &Path, node: &str, stripe: &str) -> std::path::PathBuf {
    write_owner_only(&dir.join("operator.token"), OPERATOR_TOKEN);
    let config = dir.join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[inventory]
path = "inventory.db"

[cluster]
api = "{node}"
token_file = "operator.token"

[stripe]
base_url = "{stripe}"

[stripe.customers]
acme = "cus_acme"
beta = "cus_beta"
"#
        ),
    )
    .expect("config");
    config
}

/// Runs `kiln usage push` with `args` (off the runtime's threads), the Stripe key in the
/// environment when `key` is given.
async fn kiln_push(config: &Path, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["usage", "push", "--config"])
        .arg(config)
        .args(args)
        .env_remove("STRIPE_API_KEY")
        .env_remove("KILN_OPERATOR_TOKEN")
        .env_remove("KILN_CONFIG");
    if let Some(key) = key {
        command.env("STRIPE_API_KEY", key);
    }
    tokio::task::spawn_blocking(move || command.output().expect("run kiln"))
        .await
        .expect("join")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_days_are_pushed_once_refusals_reported_and_429_retried() {
    let today = utc_day(now_ms());
    let (d3, d2) = (today - 3, today - 2);
    let node = start_node(vec![
        row(d3, "acme", 5, 10.5),
        row(d2, "acme", 7, 20.0),
        row(d2, "beta", 4, 3.0),
        row(d2, "gamma", 2, 1.0),
        row(today, "acme", 9, 1.0),
    ])
    .await;
    let stripe = StripeFake::start(STRIPE_KEY, &["cus_acme"]).await;
    stripe.lock().rate_limit_next = 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &node, &stripe.url());

    let first = kiln_push(&config, Some(STRIPE_KEY), &["--json"]).await;
    let all = text(&first);
    assert!(!all.contains(STRIPE_KEY), "the key was printed: {all}");
    assert!(
        !all.contains(OPERATOR_TOKEN),
        "the token was printed: {all}"
    );
    // beta's customer does not exist at Stripe: reported, and the exit status says so.
    assert_eq!(first.status.code(), Some(1), "{all}");
    assert!(all.contains("Stripe refused 1 event"), "{all}");
    let report: Value = serde_json::from_slice(&first.stdout).expect("json report");
    let pushed: Vec<(String, String, String)> = report["pushed"]
        .as_array()
        .expect("pushed")
        .iter()
        .map(|e| {
            (
                e["account"].as_str().unwrap_or_default().to_string(),
                e["day"].as_str().unwrap_or_default().to_string(),
                e["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        pushed,
        vec![
            ("acme".into(), format_utc_day(d3), "5".into()),
            ("acme".into(), format_utc_day(d2), "7".into()),
        ]
    );
    assert_eq!(report["unmapped"], serde_json::json!(["gamma"]));
    let failed = report["failed"].as_array().expect("failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["account"], "beta");
    assert_eq!(failed[0]["status"], 400);
    let message = failed[0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("No such customer: 'cus_beta'"),
        "{message}"
    );
    {
        let state = stripe.lock();
        assert_eq!(state.rate_limited, 1, "the 429 was answered");
        assert_eq!(
            state.accepted.len(),
            2,
            "and the event retried: {:?}",
            state.accepted
        );
        let first_event = &state.accepted[0];
        assert_eq!(first_event.event_name, "kiln_images");
        assert_eq!(first_event.customer, "cus_acme");
        assert_eq!(
            first_event.identifier,
            format!("kiln-acme-{}-images", format_utc_day(d3))
        );
        assert_eq!(first_event.timestamp, (d3 + 1) * 86_400 - 1);
        // The retry of the 429'd request carried the same idempotency key.
        assert_eq!(state.idempotency_keys[0], state.idempotency_keys[1]);
    }

    // A second run pushes nothing again; the refused event is tried again and refused again.
    let second = kiln_push(&config, Some(STRIPE_KEY), &["--json"]).await;
    assert_eq!(second.status.code(), Some(1), "{}", text(&second));
    let report: Value = serde_json::from_slice(&second.stdout).expect("json report");
    assert_eq!(report["pushed"], serde_json::json!([]));
    assert_eq!(report["already_pushed"], 2);
    assert_eq!(report["failed"].as_array().map(Vec::len), Some(1));
    assert_eq!(stripe.lock().accepted.len(), 2);

    // Once the customer exists, the next run pushes beta's day, and only that.
    stripe.lock().customers.insert("cus_beta".into());
    let third = kiln_push(&config, Some(STRIPE_KEY), &[]).await;
    let all = text(&third);
    assert!(third.status.success(), "{all}");
    assert!(
        all.contains(&format!(
            "pushed beta {} images=4 to cus_beta",
            format_utc_day(d2)
        )),
        "{all}"
    );
    assert!(all.contains("no Stripe customer for gamma"), "{all}");
    assert!(!all.contains(STRIPE_KEY));
    let state = stripe.lock();
    assert_eq!(state.accepted.len(), 3);
    let identifiers: std::collections::BTreeSet<&str> = state
        .accepted
        .iter()
        .map(|a| a.identifier.as_str())
        .collect();
    assert_eq!(identifiers.len(), 3, "no identifier twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_days_are_skipped_a_dry_run_sends_nothing_and_a_wrong_key_stops() {
    let today = utc_day(now_ms());
    let old = today - 60;
    let recent = today - 2;
    let node = start_node(vec![row(old, "acme", 3, 1.0), row(recent, "acme", 4, 2.0)]).await;
    let stripe = StripeFake::start(STRIPE_KEY, &["cus_acme"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &node, &stripe.url());

    // An old month, dry run: no key needed, nothing sent, the day named as skipped.
    let month = format_utc_month(old);
    let dry = kiln_push(&config, None, &["--month", &month, "--dry-run", "--json"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    let report: Value = serde_json::from_slice(&dry.stdout).expect("json");
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["pushed"], serde_json::json!([]));
    let skipped = report["skipped"].as_array().expect("skipped");
    assert_eq!(skipped.len(), 1, "{report}");
    assert_eq!(skipped[0]["day"], format_utc_day(old));
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("35 days"),
        "{report}"
    );
    let month = format_utc_month(recent);
    let dry = kiln_push(&config, None, &["--month", &month, "--dry-run"]).await;
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("would push acme"), "{}", text(&dry));
    assert_eq!(stripe.lock().requests, 0);

    // A wrong key: one refusal ends the push, nothing is recorded, the key is not printed.
    let wrong = "sk_test_WrongKeyThatMustNotPrintEither";
    let refused = kiln_push(&config, Some(wrong), &["--month", &month]).await;
    let all = text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{all}");
    assert!(all.contains("refused the secret key"), "{all}");
    assert!(!all.contains(wrong), "{all}");
    assert_eq!(stripe.lock().requests, 1);
    // No Stripe key at all: a clear error naming where it is read from.
    let missing = kiln_push(&config, None, &["--month", &month]).await;
    assert!(
        text(&missing).contains("STRIPE_API_KEY"),
        "{}",
        text(&missing)
    );

    // With the right key the day goes through.
    let ok = kiln_push(&config, Some(STRIPE_KEY), &["--month", &month]).await;
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(stripe.lock().accepted.len(), 1);
}

/// Kills the `kiln run` child if the test fails before it stops it.
struct Child(Option<std::process::Child>);

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_run_pushes_on_its_interval_and_stops_cleanly() {
    use std::time::{Duration, Instant};
    let today = utc_day(now_ms());
    let node = start_node(vec![
        row(today - 2, "acme", 6, 1.0),
        row(today, "acme", 1, 1.0),
    ])
    .await;
    let stripe = StripeFake::start(STRIPE_KEY, &["cus_acme"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &node, &stripe.url());
    let mut text = std::fs::read_to_string(&config).expect("config");
    text = text.replace("[stripe]\n", "[stripe]\npush_interval = \"1h\"\n");
    std::fs::write(&config, text).expect("config");
    write_owner_only(&dir.path().join("stripe.key"), STRIPE_KEY);
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("[stripe]\n", "[stripe]\napi_key_file = \"stripe.key\"\n"),
    )
    .expect("config");
    let log = dir.path().join("run.log");
    let log_file = std::fs::File::create(&log).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("STRIPE_API_KEY")
        .env_remove("KILN_OPERATOR_TOKEN")
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .spawn()
        .expect("kiln run");
    let mut child = Child(Some(child));
    // The first push goes a few seconds after start.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stripe.lock().accepted.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no push: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its line reaches the output.
    let wanted = format!("stripe: pushed acme {}", format_utc_day(today - 2));
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(&wanted)
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut running = child.0.take().expect("child");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(running.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let exit = loop {
        if let Some(exit) = running.try_wait().expect("wait") {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = running.kill();
            panic!("kiln run did not stop");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let printed = std::fs::read_to_string(&log).expect("log");
    assert!(exit.success(), "{exit:?}\n{printed}");
    assert!(!printed.contains(STRIPE_KEY), "{printed}");
    let state = stripe.lock();
    assert_eq!(
        state.accepted.len(),
        1,
        "today is not pushed: {:?}",
        state.accepted
    );
    assert_eq!(state.accepted[0].value, "6");
}

mod client {
    //! The Stripe client and `billing::push` as a library, against the fake: 5xx retried under
    //! one idempotency key, `Stripe-Should-Retry: false` honoured, a Stripe that keeps failing
    //! ends the push without recording, and an identifier Stripe already has counts as pushed.

    use std::time::Duration;

    use axum::http::StatusCode;
    use kiln_coordinator::billing::{
        self, MeterEvent, Metric, PushSettings, RecordStatus, Sent, StripeClient, StripeError,
    };
    use kiln_coordinator::inventory::Inventory;
    use kiln_coordinator::provider::{ApiKey, RetryPolicy};
    use kiln_daemon::queue::{format_utc_day, utc_day};
    use url::Url;

    use super::{STRIPE_KEY, StripeFake, now_ms, row};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            deadline: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
        }
    }

    fn client(fake: &StripeFake) -> StripeClient {
        let base = Url::parse(&fake.url()).expect("url");
        let key = ApiKey::parse(STRIPE_KEY.to_string()).expect("key");
        StripeClient::new(&base, key, fast()).expect("client")
    }

    fn event(identifier: &str) -> MeterEvent {
        MeterEvent {
            event_name: "kiln_images".into(),
            customer: "cus_acme".into(),
            value: "3".into(),
            identifier: identifier.into(),
            timestamp: now_ms() / 1000 - 86_400,
        }
    }

    #[tokio::test]
    async fn server_errors_are_retried_with_one_idempotency_key() {
        let fake = StripeFake::start(STRIPE_KEY, &["cus_acme"]).await;
        fake.lock().fail_next = vec![
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::INTERNAL_SERVER_ERROR,
        ];
        let sent = client(&fake)
            .send(&event("kiln-acme-x-images"), "key-1")
            .await;
        assert_eq!(sent.expect("sent"), Sent::Accepted);
        let state = fake.lock();
        assert_eq!(state.requests, 3);
        assert_eq!(state.idempotency_keys, vec!["key-1"; 3]);
        assert_eq!(state.accepted.len(), 1);
    }

    #[tokio::test]
    async fn should_retry_false_is_a_refusal_and_endless_failures_are_unavailable() {
        let fake = StripeFake::start(STRIPE_KEY, &["cus_acme"]).await;
        {
            let mut state = fake.lock();
            state.fail_next = vec![StatusCode::INTERNAL_SERVER_ERROR];
            state.should_retry = Some(false);
        }
        let sent = client(&fake)
            .send(&event("kiln-a"), "k")
            .await
            .expect("answer");
        assert!(
            matches!(sent, Sent::Refused { status: 500, .. }),
            "{sent:?}"
        );
        assert_eq!(fake.lock().requests, 1);
        {
            let mut state = fake.lock();
            state.fail_next = vec![StatusCode::BAD_GATEWAY; 10];
            state.should_retry = None;
        }
        let error = client(&fake)
            .send(&event("kiln-b"), "k2")
            .await
            .expect_err("gives up");
        assert!(matches!(error, StripeError::Unavailable(_)), "{error}");
        assert_eq!(
            fake.lock().requests,
            1 + 4,
            "max_attempts bounds the retries"
        );
    }

    #[tokio::test]
    async fn an_identifier_stripe_already_has_is_recorded_as_pushed() {
        let fake = StripeFake::start(STRIPE_KEY, &["cus_acme"]).await;
        let day = utc_day(now_ms()) - 2;
        let report = kiln_daemon::protocol::AdminUsageReport {
            month: kiln_daemon::queue::format_utc_month(day),
            members: vec!["n1".into()],
            missing: vec![],
            rows: vec![row(day, "acme", 3, 1.0)],
        };
        let settings = PushSettings {
            event_name: "kiln_images".into(),
            metric: Metric::Images,
            customers: [("acme".to_string(), "cus_acme".to_string())].into(),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let client = client(&fake);
        let mut first = Inventory::open(&dir.path().join("a.db")).expect("inventory");
        let pushed = billing::push(
            std::slice::from_ref(&report),
            &settings,
            Some(&client),
            &mut first,
            &now_ms,
        )
        .await
        .expect("push");
        assert_eq!(pushed.pushed.len(), 1);
        // The same push from an inventory that lost the record: Stripe says it has the event.
        let mut second = Inventory::open(&dir.path().join("b.db")).expect("inventory");
        let again = billing::push(
            std::slice::from_ref(&report),
            &settings,
            Some(&client),
            &mut second,
            &now_ms,
        )
        .await
        .expect("push");
        assert!(
            again.pushed.is_empty() && again.failed.is_empty(),
            "{again:?}"
        );
        assert_eq!(again.already_pushed, 1);
        let id = format!("kiln-acme-{}-images", format_utc_day(day));
        let record = billing::record(&second, &id)
            .expect("read")
            .expect("recorded");
        assert_eq!(record.status, RecordStatus::Pushed);
        assert_eq!(fake.lock().accepted.len(), 1);

        // Stripe down: the push stops with an error and records nothing for what it did not send.
        let mut third = Inventory::open(&dir.path().join("c.db")).expect("inventory");
        fake.lock().fail_next = vec![StatusCode::SERVICE_UNAVAILABLE; 10];
        let stopped = billing::push(&[report], &settings, Some(&client), &mut third, &now_ms)
            .await
            .expect("a report");
        assert!(
            stopped
                .error
                .as_deref()
                .is_some_and(|e| e.contains("1 event(s) not sent")),
            "{stopped:?}"
        );
        assert_eq!(billing::record(&third, &id).expect("read"), None);
    }
}
