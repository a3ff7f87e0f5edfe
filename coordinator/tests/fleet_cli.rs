//! The fleet commands' edges through the `kiln` binary: bad configs and arguments give one clear
//! line, an empty inventory reports zero cost, and nothing is recorded for a refused command.
//! (Renting real `kilnd` processes is `tests/fleet.rs` at the workspace root.)

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("VAST_API_KEY")
        .env_remove("RUNPOD_API_KEY")
        .env_remove("LAMBDA_API_KEY")
        .output()
        .expect("kiln runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[providers.vast]\ngpu = \"RTX 4090\"\nmax_price_per_hour = 0.5\ndisk_gb = 0\n",
    )
    .expect("write");
    let output = kiln(&["inventory"], &config);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("providers.vast.disk_gb"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let output = kiln(&["cost"], &dir.path().join("missing.toml"));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("missing.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bad_arguments_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, "").expect("write");
    let output = kiln(&["rent", "--provider", "azure"], &config);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("azure"), "{}", stderr(&output));
    let output = kiln(&["cost", "--since", "yesterday"], &config);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("yesterday"), "{}", stderr(&output));
}

#[test]
fn an_empty_inventory_costs_nothing_and_refuses_unknown_hosts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kiln.toml");
    std::fs::write(&config, "[inventory]\npath = \"state/inventory.db\"\n").expect("write");

    let output = kiln(&["cost", "--json", "--since", "2026-01-01"], &config);
    assert!(output.status.success(), "{}", stderr(&output));
    let cost: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    for window in ["today", "month_to_date", "since"] {
        assert_eq!(cost[window]["total"], 0.0, "{cost:#}");
    }
    assert!(dir.path().join("state/inventory.db").exists());

    let output = kiln(&["inventory", "--json"], &config);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");

    for action in ["pause", "resume", "release"] {
        let output = kiln(&[action, "gpu-1"], &config);
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(&output).contains("no host named `gpu-1`"),
            "{}",
            stderr(&output)
        );
    }
}

#[test]
fn renting_from_an_unconfigured_or_keyless_provider_records_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[providers.runpod]\ngpu = \"NVIDIA GeForce RTX 4090\"\nmax_price_per_hour = 0.8\n",
    )
    .expect("write");
    let output = kiln(&["rent", "--provider", "local"], &config);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("[providers.local]"),
        "{}",
        stderr(&output)
    );
    let output = kiln(&["rent", "--provider", "runpod"], &config);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("RUNPOD_API_KEY"),
        "{}",
        stderr(&output)
    );
    let output = kiln(&["inventory", "--all", "--json"], &config);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");
}
