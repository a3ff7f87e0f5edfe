//! The `kiln` binary's command line: help, key creation, and one-line errors with exit 2 for bad
//! arguments. (Building this test also builds the `kiln` binary that the end-to-end tests in the
//! workspace's `tests/` start.)

use std::process::Command;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn help_lists_the_commands() {
    let output = kiln().arg("--help").output().expect("kiln --help");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for command in ["status", "certs", "keys"] {
        assert!(text.contains(command), "{text}");
    }
}

#[test]
fn keys_add_prints_a_key_once_and_stores_its_hash() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys.toml");
    let output = kiln()
        .args([
            "keys",
            "add",
            "--account",
            "acme",
            "--tier",
            "pro",
            "--json",
            "--keys-file",
        ])
        .arg(&keys)
        .output()
        .expect("kiln keys add");
    assert!(output.status.success(), "{output:?}");
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(body["account"], "acme");
    assert_eq!(body["tier"], "pro");
    let key = body["key"].as_str().expect("key");
    let stored = std::fs::read_to_string(&keys).expect("keys file");
    assert!(!stored.contains(key), "only the hash is stored");
    assert!(stored.contains("sha256:"));
    let ring = kiln_daemon::tiers::KeyRing::load(&keys).expect("load");
    assert_eq!(
        ring.authenticate(key).map(|a| a.id),
        Some("acme".to_string())
    );
}

#[test]
fn bad_arguments_exit_2_and_failures_exit_1_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let keys = dir.path().join("keys.toml");
    let output = kiln()
        .args([
            "keys",
            "add",
            "--account",
            "acme",
            "--tier",
            "gold",
            "--keys-file",
        ])
        .arg(&keys)
        .output()
        .expect("kiln keys add");
    assert_eq!(output.status.code(), Some(2));
    assert!(!keys.exists(), "nothing stored for a refused command");

    let output = kiln()
        .args([
            "keys",
            "add",
            "--account",
            "bad name",
            "--tier",
            "free",
            "--keys-file",
        ])
        .arg(&keys)
        .output()
        .expect("kiln keys add");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad name"), "{stderr}");
    assert!(!keys.exists());
}

/// A `kiln` command with none of the caller's `KILN_*` settings leaking in.
fn kiln_clean() -> Command {
    let mut command = kiln();
    for var in [
        "KILN_API",
        "KILN_OPERATOR_TOKEN",
        "KILN_OPERATOR_TOKEN_FILE",
        "KILN_KEYS_FILE",
    ] {
        command.env_remove(var);
    }
    command
}

fn json_of(output: &std::process::Output) -> serde_json::Value {
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

fn one_error_line(output: &std::process::Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("kiln: "), "{stderr}");
    stderr.trim().to_string()
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn certs_init_issue_list_revoke_round_trip() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ca = tmp.path().join("ca");

    let init = json_of(
        &kiln_clean()
            .args([
                "certs",
                "init",
                "--cluster",
                "prod",
                "--days",
                "30",
                "--json",
            ])
            .arg(&ca)
            .output()
            .expect("kiln certs init"),
    );
    assert_eq!(init["cluster_id"], "prod");
    let ca_abs = std::fs::canonicalize(&ca).expect("CA folder exists");
    assert_eq!(init["dir"], ca_abs.to_str().expect("UTF-8 path"));
    assert!(init["not_after"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let again = kiln_clean()
        .args(["certs", "init"])
        .arg(&ca)
        .output()
        .expect("kiln certs init again");
    let line = one_error_line(&again);
    assert!(line.contains("already exists"), "{line}");

    let node = tmp.path().join("gpu-1");
    let issued = json_of(
        &kiln_clean()
            .args(["certs", "issue", "gpu-1", "--json", "--ca"])
            .arg(&ca)
            .arg("--out")
            .arg(&node)
            .output()
            .expect("kiln certs issue"),
    );
    assert_eq!(issued["name"], "gpu-1");
    assert_eq!(issued["cluster_id"], "prod");
    let node_abs = std::fs::canonicalize(&node).expect("certs folder exists");
    assert_eq!(issued["dir"], node_abs.to_str().expect("UTF-8 path"));
    let serial = issued["serial"].as_str().expect("serial").to_string();
    let files: Vec<&str> = issued["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert_eq!(files.len(), 4, "{files:?}");
    assert_eq!(mode(&node.join("key.pem")), 0o600);
    let identity = kiln_daemon::pki::Identity::load_dir(&node).expect("usable identity");
    assert_eq!(identity.name(), "gpu-1");
    assert_eq!(identity.serial(), serial);

    // Without --out the certificate goes to ./NAME; the text says how to use it.
    let default_out = kiln_clean()
        .current_dir(tmp.path())
        .args(["certs", "issue", "coord", "--ca"])
        .arg(&ca)
        .output()
        .expect("kiln certs issue");
    assert!(default_out.status.success(), "{default_out:?}");
    assert!(tmp.path().join("coord").join("key.pem").exists());
    let text = String::from_utf8_lossy(&default_out.stdout);
    assert!(text.contains("certs_dir = \""), "{text}");

    let list = json_of(
        &kiln_clean()
            .args(["certs", "list", "--json", "--ca"])
            .arg(&ca)
            .output()
            .expect("kiln certs list"),
    );
    let entries = list.as_array().expect("array");
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["name"], "gpu-1");
    assert_eq!(entries[0]["serial"], serial.as_str());
    assert!(entries[0].get("revoked_at").is_none());

    let revoked = json_of(
        &kiln_clean()
            .args(["certs", "revoke", "gpu-1", "--json", "--ca"])
            .arg(&ca)
            .output()
            .expect("kiln certs revoke"),
    );
    assert_eq!(revoked["revoked_serials"], serde_json::json!([serial]));
    assert_eq!(revoked["crl_number"], 2);
    assert_eq!(
        revoked["crl"],
        ca_abs.join("crl.pem").to_str().expect("UTF-8 path")
    );

    let table = kiln_clean()
        .args(["certs", "list", "--ca"])
        .arg(&ca)
        .output()
        .expect("kiln certs list");
    assert!(table.status.success(), "{table:?}");
    let table = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("gpu-1") && lines[1].contains(&serial),
        "{table}"
    );
    assert!(
        !lines[1].trim_end().ends_with(" -"),
        "gpu-1 is revoked: {table}"
    );
    assert!(
        lines[2].starts_with("coord") && lines[2].trim_end().ends_with(" -"),
        "{table}"
    );

    // Revoking again finds nothing left to revoke.
    let again = kiln_clean()
        .args(["certs", "revoke", "gpu-1", "--ca"])
        .arg(&ca)
        .output()
        .expect("kiln certs revoke");
    let line = one_error_line(&again);
    assert!(line.contains("gpu-1"), "{line}");
}

#[test]
fn certs_bad_input_is_refused_clearly() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let ca = tmp.path().join("ca");
    let init = kiln_clean()
        .args(["certs", "init"])
        .arg(&ca)
        .output()
        .expect("kiln certs init");
    assert!(init.status.success(), "{init:?}");
    let text = String::from_utf8_lossy(&init.stdout);
    assert!(text.contains("kiln certs issue --ca"), "{text}");
    assert!(
        text.contains("\"kiln\""),
        "the default cluster name: {text}"
    );

    let bad_name = kiln_clean()
        .current_dir(tmp.path())
        .args(["certs", "issue", "Bad_Name", "--ca"])
        .arg(&ca)
        .output()
        .expect("kiln certs issue");
    let line = one_error_line(&bad_name);
    assert!(line.contains("Bad_Name"), "{line}");
    assert!(!tmp.path().join("Bad_Name").exists());

    let zero_days = kiln_clean()
        .args(["certs", "init", "--days", "0"])
        .arg(tmp.path().join("other"))
        .output()
        .expect("kiln certs init");
    assert_eq!(zero_days.status.code(), Some(2), "{zero_days:?}");

    let no_ca = kiln_clean()
        .args(["certs", "list", "--ca"])
        .arg(tmp.path().join("missing"))
        .output()
        .expect("kiln certs list");
    let line = one_error_line(&no_ca);
    assert!(line.contains("missing"), "{line}");
}

const TOKEN: &str = "kilnop_test-operator-token";

/// A cluster view as a node would send it, with a field this version does not know (which
/// `--json` must pass through untouched).
fn cluster_view_json() -> String {
    let view = serde_json::json!({
        "cluster_id": "prod",
        "observed_by": "gpu-1",
        "observed_at": "2026-11-28T07:00:00Z",
        "members": [
            {
                "name": "gpu-1", "role": "node", "state": "busy", "version": "0.1.0",
                "provider": "vast", "price_per_hour": 0.42,
                "gpus": [{"index": 0, "util_pct": 85, "mem_used_mib": 20608,
                          "mem_total_mib": 24564, "temperature_c": 64}],
                "queue": {"free": {"queued": 12, "oldest_wait_s": 190},
                          "pro": {"queued": 2, "oldest_wait_s": 8}},
                "running": 1, "generation": 7, "gossip_addr": "quic://10.0.0.1:41012",
                "live": true, "added_later": {"x": 1}
            },
            {
                "name": "gpu-0", "role": "node", "state": "ready", "version": "0.1.0",
                "gpus": [], "queue": {}, "running": 0, "generation": 3,
                "gossip_addr": "quic://10.0.0.2:41012", "live": false
            }
        ]
    });
    serde_json::to_string_pretty(&view).expect("encode")
}

/// A small HTTP server standing in for a node's API: `/v1/cluster` answers the view to the
/// right operator token and 401 otherwise; `/broken/v1/cluster` answers something else.
async fn fake_node() -> String {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::routing::get;

    async fn cluster(
        headers: HeaderMap,
    ) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
        let json = [(header::CONTENT_TYPE, "application/json")];
        let expected = format!("Bearer {TOKEN}");
        if headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&expected)
        {
            (StatusCode::OK, json, cluster_view_json())
        } else {
            let body = r#"{"error":{"code":"unauthorized","message":"bad operator token"}}"#;
            (StatusCode::UNAUTHORIZED, json, body.to_string())
        }
    }

    let app = axum::Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/broken/v1/cluster", get(|| async { r#"{"members": 3}"# }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

fn status(api: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::from(kiln_clean());
    command.args(["status", "--api", api]);
    command
}

async fn output(mut command: tokio::process::Command) -> std::process::Output {
    command.kill_on_drop(true);
    tokio::time::timeout(std::time::Duration::from_secs(60), command.output())
        .await
        .expect("kiln finishes within 60s")
        .expect("kiln runs")
}

#[tokio::test]
async fn status_json_is_the_body_as_received_and_the_table_is_drawn() {
    let api = fake_node().await;

    let mut json = status(&api);
    json.env("KILN_OPERATOR_TOKEN", TOKEN).arg("--json");
    let json = output(json).await;
    assert!(json.status.success(), "{json:?}");
    assert_eq!(
        String::from_utf8_lossy(&json.stdout),
        format!("{}\n", cluster_view_json())
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("operator-token");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_file)
            .expect("token file");
        writeln!(file, "{TOKEN}").expect("write token");
    }
    let mut table = status(&api);
    table.arg("--token-file").arg(&token_file);
    let table = output(table).await;
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for column in [
        "NODE", "STATE", "GPU", "VRAM", "QUEUE", "OLDEST", "$/H", "VERSION",
    ] {
        assert!(lines[0].contains(column), "{text}");
    }
    assert!(
        lines[1].starts_with("gpu-1") && lines[1].contains("p2 f12"),
        "{text}"
    );
    assert!(
        lines[1].contains("3m10s") && lines[1].contains("0.420"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("gpu-0") && lines[2].contains("dead"),
        "{text}"
    );
    assert_eq!(
        lines[3],
        "1 live, 1 dead · cluster prod · seen by gpu-1 at 2026-11-28T07:00:00Z · $0.420/h live"
    );
    // Header and rows are aligned: every row's VERSION starts where the header's does.
    let at = lines[0].find("VERSION").expect("VERSION column");
    assert!(lines[1..3].iter().all(|l| &l[at..] == "0.1.0"), "{text}");
}

#[tokio::test]
async fn status_refusals_and_bad_bodies_are_one_clear_line() {
    let api = fake_node().await;

    let mut wrong = status(&api);
    wrong.env("KILN_OPERATOR_TOKEN", "kilnop_wrong-token-000000");
    let line = one_error_line(&output(wrong).await);
    assert_eq!(line, "kiln: the node refused the operator token (401)");

    let mut broken = status(&format!("{api}/broken"));
    broken.env("KILN_OPERATOR_TOKEN", TOKEN);
    let line = one_error_line(&output(broken).await);
    assert!(
        line.contains("did not answer with a cluster view"),
        "{line}"
    );

    let line = one_error_line(&output(status(&api)).await);
    assert!(line.contains("no operator token"), "{line}");

    let dir = tempfile::tempdir().expect("temp dir");
    let readable = dir.path().join("token");
    std::fs::write(&readable, TOKEN).expect("write token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let mut open_token = status(&api);
    open_token.arg("--token-file").arg(&readable);
    let line = one_error_line(&output(open_token).await);
    assert!(line.contains("chmod 600"), "{line}");

    let mut bad_url = status("not a url");
    bad_url.env("KILN_OPERATOR_TOKEN", TOKEN);
    assert_eq!(output(bad_url).await.status.code(), Some(2));
}

#[tokio::test]
async fn status_against_a_closed_port_cannot_reach_it() {
    let port = closed_port();
    let api = format!("http://127.0.0.1:{port}");
    let mut command = status(&api);
    command.env("KILN_OPERATOR_TOKEN", TOKEN);
    let line = one_error_line(&output(command).await);
    assert!(
        line.starts_with(&format!("kiln: cannot reach {api}/v1/cluster: ")),
        "{line}"
    );
}

#[tokio::test]
async fn status_watch_redraws_and_shows_errors_in_the_frame() {
    let api = fake_node().await;
    let mut watch = status(&api);
    watch.env("KILN_OPERATOR_TOKEN", TOKEN).args([
        "--watch",
        "--interval",
        "100ms",
        "--iterations",
        "3",
    ]);
    let out = output(watch).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 3, "{text}");
    assert_eq!(text.matches("1 live, 1 dead").count(), 3, "{text}");

    let down = format!("http://127.0.0.1:{}", closed_port());
    let mut watch = status(&down);
    watch.env("KILN_OPERATOR_TOKEN", TOKEN).args([
        "--watch",
        "--interval",
        "100ms",
        "--iterations",
        "2",
    ]);
    let out = output(watch).await;
    assert!(
        out.status.success(),
        "the loop goes on after errors: {out:?}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 2, "{text}");
    assert_eq!(text.matches("kiln: cannot reach").count(), 2, "{text}");

    let mut conflicting = status(&api);
    conflicting
        .env("KILN_OPERATOR_TOKEN", TOKEN)
        .args(["--watch", "--json"]);
    assert_eq!(output(conflicting).await.status.code(), Some(2));
}

#[tokio::test]
async fn status_watch_stops_cleanly_on_ctrl_c() {
    use tokio::io::AsyncReadExt;

    let api = fake_node().await;
    let mut watch = status(&api);
    watch
        .env("KILN_OPERATOR_TOKEN", TOKEN)
        .args(["--watch", "--interval", "100ms"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = watch.spawn().expect("kiln status --watch starts");
    let mut stdout = child.stdout.take().expect("piped stdout");

    // Wait until a whole frame has been drawn (its footer), with a deadline.
    let mut seen = Vec::new();
    let first_frame = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("1 live, 1 dead") {
            let n = stdout.read(&mut buf).await.expect("read stdout");
            assert!(n > 0, "kiln exited before drawing a frame");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(first_frame.is_ok(), "no frame within 30s: {seen:?}");

    let pid = child.id().expect("child pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("send SIGINT");
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("kiln stops within 30s of Ctrl-C")
        .expect("wait for kiln");
    assert!(status.success(), "Ctrl-C ends --watch cleanly: {status:?}");
}

#[test]
fn cost_model_prints_the_documents_tables_with_verdicts() {
    let output = kiln()
        .args(["cost", "model"])
        .output()
        .expect("kiln cost model");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("Minimal   1 HOT + 0 WARM        $288"),
        "{text}"
    );
    assert!(text.contains("DIFFERS"), "{text}");

    let output = kiln()
        .args(["cost", "model", "--json", "--spot-per-hour", "0.5"])
        .output()
        .expect("kiln cost model --json");
    assert!(output.status.success(), "{output:?}");
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(body["scenarios"][0]["cost"]["low"], 360.0);
    assert_eq!(body["scenarios"][0]["cost_agrees"], false);

    let output = kiln()
        .args(["cost", "model", "--spot-per-hour", "0"])
        .output()
        .expect("kiln cost model");
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--spot-per-hour"), "{err}");
}
