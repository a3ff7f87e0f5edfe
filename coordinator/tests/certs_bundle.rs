//! `kiln certs bundle`: a member's certificates (and optionally its config and keys) as one
//! KILN_BUNDLE value or a Vast.ai onstart script, run as the real binary against a real CA.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use base64::Engine as _;

fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run kiln")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The files of a bundle: name, mode, bytes.
fn unpack(bundle: &str) -> Vec<(String, u32, Vec<u8>)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(bundle)
        .expect("base64");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
    archive
        .entries()
        .expect("tar entries")
        .map(|entry| {
            let mut entry = entry.expect("tar entry");
            let name = entry.path().expect("path").display().to_string();
            let mode = entry.header().mode().expect("mode");
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("entry bytes");
            (name, mode, data)
        })
        .collect()
}

/// The smallest config kilnd accepts.
const NODE_CONFIG: &str = r#"[node]
data_dir = "/var/lib/kiln"

[api]
keys_file = "/etc/kiln/keys.toml"

[comfy]
command = ["/opt/comfyui/venv/bin/python", "main.py"]
url = "http://127.0.0.1:8188"
"#;

fn init_ca(dir: &Path) {
    ok(kiln(dir, &["certs", "init", "ca", "--cluster", "prod"]));
}

#[test]
fn a_bundle_holds_a_working_identity_and_the_onstart_fits_vast() {
    let dir = tempfile::tempdir().expect("temp dir");
    init_ca(dir.path());
    let line = ok(kiln(
        dir.path(),
        &["certs", "bundle", "--ca", "ca", "--member", "gpu-7"],
    ));
    let bundle = line
        .trim_end()
        .strip_prefix("KILN_BUNDLE=")
        .expect("KILN_BUNDLE=…");
    assert!(!bundle.contains(char::is_whitespace));
    let files = unpack(bundle);
    let names: Vec<&str> = files.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "certs/cert.pem",
            "certs/key.pem",
            "certs/ca.pem",
            "certs/crl.pem"
        ]
    );
    assert!(files.iter().all(|(_, mode, _)| *mode == 0o600));

    // The unpacked certificates are an identity kilnd accepts, named after the member.
    let unpacked = dir.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).expect("dir");
    for (name, _, bytes) in &files {
        let path = unpacked.join(name.trim_start_matches("certs/"));
        std::fs::write(&path, bytes).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    }
    let identity = kiln_daemon::pki::Identity::load_dir(&unpacked).expect("identity");
    assert_eq!(identity.name(), "gpu-7");
    assert_eq!(identity.cluster_id(), "prod");

    // The member folder is kept and reused: the same certificate, the same bundle.
    assert!(dir.path().join("gpu-7/cert.pem").exists());
    let again = ok(kiln(
        dir.path(),
        &["certs", "bundle", "--ca", "ca", "--member", "gpu-7"],
    ));
    assert_eq!(again, line);

    let onstart = ok(kiln(
        dir.path(),
        &[
            "certs",
            "bundle",
            "--ca",
            "ca",
            "--member",
            "gpu-7",
            "--onstart",
        ],
    ));
    assert!(onstart.len() <= 4096, "{} characters", onstart.len());
    assert!(onstart.starts_with("#!/bin/sh\n"), "{onstart}");
    assert!(
        onstart.contains(&format!("export KILN_BUNDLE='{bundle}'\n")),
        "{onstart}"
    );
    assert!(onstart.ends_with("exec /opt/kiln/container-entry.sh\n"));
    eprintln!(
        "bundle: {} characters; onstart: {} characters",
        bundle.len(),
        onstart.len()
    );
}

#[test]
fn config_and_keys_are_checked_and_included() {
    let dir = tempfile::tempdir().expect("temp dir");
    init_ca(dir.path());
    let keys = dir.path().join("keys.toml");
    kiln_daemon::tiers::add_key(&keys, "acme", kiln_daemon::protocol::Tier::Pro).expect("key");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!("{NODE_CONFIG}\n[cluster]\ncerts_dir = \"/etc/kiln/certs\"\nadvertise = \"quic://203.0.113.7:7946\"\n"),
    )
    .expect("config");
    let line = ok(kiln(
        dir.path(),
        &[
            "certs",
            "bundle",
            "--ca",
            "ca",
            "--member",
            "gpu-8",
            "--config",
            "node.toml",
            "--keys-file",
            "keys.toml",
        ],
    ));
    let files = unpack(line.trim_end().trim_start_matches("KILN_BUNDLE="));
    let find = |name: &str| {
        files
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, b)| b.clone())
            .unwrap_or_else(|| panic!("{name} not in the bundle"))
    };
    assert_eq!(find("kilnd.toml"), std::fs::read(&config).expect("config"));
    assert_eq!(find("keys.toml"), std::fs::read(&keys).expect("keys"));

    // A config kilnd would refuse is refused here, naming it; nothing is printed.
    std::fs::write(&config, "[node]\ndata_dri = \"/x\"\n").expect("bad config");
    let output = kiln(
        dir.path(),
        &[
            "certs",
            "bundle",
            "--ca",
            "ca",
            "--member",
            "gpu-8",
            "--config",
            "node.toml",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node.toml"), "{stderr}");
}

#[test]
fn an_onstart_over_vasts_limit_is_refused_with_the_way_around() {
    let dir = tempfile::tempdir().expect("temp dir");
    init_ca(dir.path());
    // A config padded with incompressible comment text pushes the script past 4,096.
    let mut config = String::from(NODE_CONFIG);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..40 {
        let mut word = String::new();
        for _ in 0..60 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.push(char::from(b'a' + (x % 26) as u8));
        }
        config.push_str(&format!("# {word}\n"));
    }
    std::fs::write(dir.path().join("node.toml"), config).expect("config");
    let output = kiln(
        dir.path(),
        &[
            "certs",
            "bundle",
            "--ca",
            "ca",
            "--member",
            "gpu-9",
            "--config",
            "node.toml",
            "--onstart",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("4096") && stderr.contains("-e KILN_BUNDLE="),
        "{stderr}"
    );

    // A bad member name is refused before anything is issued.
    let output = kiln(
        dir.path(),
        &["certs", "bundle", "--ca", "ca", "--member", "Bad Name"],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(!dir.path().join("Bad Name").exists());
}
