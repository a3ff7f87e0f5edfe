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
    assert!(text.contains("keys"), "{text}");
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
