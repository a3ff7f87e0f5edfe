//! `systemd-analyze verify` on the units in `systemd/`. The units name /usr/local/bin/kilnd and
//! /usr/local/bin/kiln, which verify requires to exist: each unit is copied into a temp folder
//! with those paths pointing at executables made there. Any complaint of the tool about a unit
//! fails the test with the tool's own words. The sysusers and tmpfiles snippets are checked with
//! their tools' `--dry-run` when those are installed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn installed(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing in CI: .ci/run installs the systemd package"
        );
        eprintln!("skipped: {tool} is not installed (apt-get install systemd)");
    }
    found
}

fn executable(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, "#!/bin/sh\nexit 0\n").expect("stand-in binary");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// Runs `systemd-analyze verify` on a copy of `unit` whose binaries live in a temp folder.
fn verify(unit: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let kilnd = executable(dir.path(), "kilnd");
    let kiln = executable(dir.path(), "kiln");
    let text = std::fs::read_to_string(repo().join("systemd").join(unit)).expect("unit file");
    assert!(
        text.contains("/usr/local/bin/"),
        "{unit} no longer starts /usr/local/bin/…: update this test"
    );
    let text = text
        .replace("/usr/local/bin/kilnd", &kilnd.display().to_string())
        .replace("/usr/local/bin/kiln ", &format!("{} ", kiln.display()));
    let copy = dir.path().join(unit);
    std::fs::write(&copy, text).expect("unit copy");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Complaints about the unit name the copy; other lines are about the host's own units.
    let about_unit: Vec<&str> = said.lines().filter(|l| l.contains(unit)).collect();
    assert!(
        output.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {unit} ({}):\n{said}",
        output.status
    );
}

#[test]
fn kilnd_service_verifies() {
    if installed("systemd-analyze") {
        verify("kilnd.service");
    }
}

#[test]
fn kiln_service_verifies() {
    if installed("systemd-analyze") {
        verify("kiln.service");
    }
}

/// The unit's stop timeout leaves room for the default drain, and it speaks the notify protocol.
#[test]
fn kilnd_service_waits_longer_than_the_drain() {
    let text = std::fs::read_to_string(repo().join("systemd/kilnd.service")).expect("unit");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing"))
            .trim()
            .to_string()
    };
    let stop: u64 = value("TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    let drain = kiln_daemon::config::JobsSection::default().drain_timeout_s;
    assert!(
        stop > drain + 60,
        "TimeoutStopSec={stop} leaves too little past the drain ({drain} s)"
    );
    assert_eq!(value("Type"), "notify");
    assert_eq!(value("NotifyAccess"), "main");
    assert_eq!(value("KillMode"), "mixed");
    let watchdog: u64 = value("WatchdogSec")
        .parse()
        .expect("WatchdogSec in seconds");
    assert!(watchdog >= 10, "WatchdogSec={watchdog}");
}

#[test]
fn sysusers_and_tmpfiles_snippets_parse() {
    let sysusers = repo().join("systemd/kiln.sysusers");
    let tmpfiles = repo().join("systemd/kiln.tmpfiles");
    if Command::new("systemd-sysusers")
        .arg("--version")
        .output()
        .is_ok()
    {
        let root = tempfile::tempdir().expect("temp root");
        std::fs::create_dir_all(root.path().join("etc")).expect("etc");
        std::fs::write(
            root.path().join("etc/group"),
            "video:x:44:\nrender:x:109:\n",
        )
        .expect("group");
        let output = Command::new("systemd-sysusers")
            .arg(format!("--root={}", root.path().display()))
            .arg("--dry-run")
            .arg(&sysusers)
            .output()
            .expect("run systemd-sysusers");
        assert!(
            output.status.success(),
            "systemd-sysusers: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    } else {
        eprintln!("skipped: systemd-sysusers is not installed");
    }
    if Command::new("systemd-tmpfiles")
        .arg("--version")
        .output()
        .is_ok()
    {
        let root = tempfile::tempdir().expect("temp root");
        // Parsing needs the user to be known: give the root a passwd with it.
        std::fs::create_dir_all(root.path().join("etc")).expect("etc");
        std::fs::write(
            root.path().join("etc/passwd"),
            "kiln:x:999:999::/var/lib/kiln:/usr/sbin/nologin\n",
        )
        .expect("passwd");
        std::fs::write(root.path().join("etc/group"), "kiln:x:999:\n").expect("group");
        let output = Command::new("systemd-tmpfiles")
            .arg(format!("--root={}", root.path().display()))
            .arg("--create")
            .arg(&tmpfiles)
            .output()
            .expect("run systemd-tmpfiles");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "systemd-tmpfiles: {stderr}");
        assert!(
            root.path().join("var/lib/kiln/comfyui/output").is_dir(),
            "{stderr}"
        );
    } else {
        eprintln!("skipped: systemd-tmpfiles is not installed");
    }
}
