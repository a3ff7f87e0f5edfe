//! The fleet commands end to end with the `local` provider: `kiln rent` starts a real `kilnd`
//! (with `kilnd comfy-sim`) that joins a seed node's cluster, `kiln pause` stops it and keeps
//! its folder, `kiln resume` starts it again, `kiln release` deletes it, and `kiln cost` reports
//! what each state cost. Every step is checked in the processes, the node folder, the cluster
//! view and the inventory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_e2e::{
    Node, NodeSpec, SharedKeys, bin, cluster_config, free_gossip_port, free_port, init_ca, issue,
    kiln, kiln_json,
};
use serde_json::Value;
use tokio::time::Instant;

/// Kills (SIGKILL, whole process group) every kilnd the local provider started under `base`,
/// so a failed test leaves no process behind.
struct NodesGuard(PathBuf);

impl Drop for NodesGuard {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            if let Some(pid) = read_pid(&entry.path())
                && process_alive(pid)
            {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn read_pid(node_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(node_dir.join("kilnd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a process that has not exited (a zombie has exited).
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("X");
    !matches!(state, "Z" | "X")
}

/// Runs `kiln ARGS --config CONFIG`, requires failure, returns stderr.
fn kiln_fails(args: &[&str], config: &Path) -> String {
    let config = config.to_string_lossy();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", &config]);
    let output = kiln(&all);
    assert!(
        !output.status.success(),
        "kiln {} should fail; printed {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Polls `kiln status --config --json` until `name` is live and ready in the cluster view and
/// the inventory calls it hot.
async fn wait_hot(config: &Path, name: &str, timeout: Duration) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = kiln_json(&["status"], config)?;
        let ready = status["cluster"]["members"]
            .as_array()
            .is_some_and(|members| {
                members.iter().any(|m| {
                    m["name"] == name
                        && m["live"] == Value::Bool(true)
                        && matches!(m["state"].as_str(), Some("ready" | "busy"))
                })
            });
        let hot = inventory_state(&status["inventory"], name).as_deref() == Some("hot");
        if ready && hot {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{name} not ready and hot within {timeout:?}; last status: {status:#}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn inventory_state(hosts: &Value, name: &str) -> Option<String> {
    hosts
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
        .and_then(|h| h["state"].as_str().map(String::from))
}

#[tokio::test(flavor = "multi_thread")]
async fn rent_pause_resume_release_and_cost_with_the_local_provider() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let work = tempfile::Builder::new()
        .prefix("kiln-e2e-fleet-")
        .tempdir()?;
    let ca = work.path().join("ca");
    init_ca(&ca, "e2e");
    let keys = SharedKeys::create(work.path(), &NodeSpec::default().accounts)?;

    // The seed: a node started by the test, which the rented node joins.
    let seed_certs = issue(&ca, "seed", work.path());
    let seed_port = free_gossip_port();
    let seed = Node::launch(NodeSpec {
        extra_config: cluster_config(&seed_certs, seed_port, r#"["quic"]"#, &[]),
        shared_keys: Some(keys.clone()),
        ..NodeSpec::default()
    })?;
    seed.wait_ready(Duration::from_secs(60)).await?;

    let token_file = work.path().join("operator-token");
    std::fs::write(&token_file, &seed.operator_token)?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;

    let first = free_port();
    let (first, last) = if first > 65_000 {
        (first - 400, first)
    } else {
        (first, first + 400)
    };
    let base_dir = work.path().join("nodes");
    let _guard = NodesGuard(base_dir.clone());
    let config = work.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            r#"[inventory]
path = "inventory.db"

[cluster]
api = "{api}"
token_file = {token:?}

[providers.local]
kilnd = {kilnd:?}
base_dir = "nodes"
ca_dir = {ca:?}
seeds = ["quic://127.0.0.1:{seed_port}"]
ports = {{ first = {first}, last = {last} }}
keys_file = {keys:?}
operator_token_file = {token:?}
resume_delay_ms = 100
stop_timeout_s = 20
gossip_interval_ms = 200
sim_args = ["--startup-delay-ms", "200", "--step-time-ms", "20", "--model-load-ms", "0", "--vae-time-ms", "0"]
price_per_hour = 0.4
stopped_price_per_hour = 0.05
"#,
            api = seed.url,
            token = token_file.to_string_lossy(),
            kilnd = bin("kilnd").to_string_lossy(),
            ca = ca.to_string_lossy(),
            keys = keys.file.to_string_lossy(),
        ),
    )?;
    let node_dir = base_dir.join("gpu-a");

    // Rent: a node folder, a running kilnd, a provisioning host that turns hot once the
    // cluster sees it ready.
    let rented = kiln_json(&["rent", "--provider", "local", "--name", "gpu-a"], &config)?;
    assert_eq!(rented["state"], "provisioning", "{rented:#}");
    assert_eq!(rented["provider"], "local");
    assert_eq!(rented["provider_id"], "gpu-a");
    let pid = read_pid(&node_dir).context("a pid file after rent")?;
    assert!(process_alive(pid));
    for file in ["kilnd.toml", "node.json", "certs/cert.pem", "certs/key.pem"] {
        assert!(node_dir.join(file).exists(), "{file} missing after rent");
    }
    let status = wait_hot(&config, "gpu-a", Duration::from_secs(90)).await?;
    assert!(
        status["cluster"]["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == "seed")),
        "{status:#}"
    );

    // A second rent under the same name is refused; the first is untouched.
    let err = kiln_fails(&["rent", "--provider", "local", "--name", "gpu-a"], &config);
    assert!(err.contains("already in the inventory"), "{err}");

    // Pause: the process is gone, the folder stays, the inventory says warm.
    let paused = kiln_json(&["pause", "gpu-a"], &config)?;
    assert_eq!(paused["state"], "warm", "{paused:#}");
    assert!(!process_alive(pid), "kilnd {pid} still runs after pause");
    assert!(
        node_dir.join("kilnd.toml").exists(),
        "the folder was not kept"
    );
    assert!(
        read_pid(&node_dir).is_none(),
        "the pid file outlived the process"
    );
    let hosts = kiln_json(&["inventory"], &config)?;
    assert_eq!(inventory_state(&hosts, "gpu-a").as_deref(), Some("warm"));
    // `kiln status` lists the warm host, which the gossip no longer shows live.
    let table = kiln(&["status", "--config", &config.to_string_lossy()]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("gpu-a") && l.contains("warm")),
        "{table}"
    );
    let err = kiln_fails(&["pause", "gpu-a"], &config);
    assert!(err.contains("warm"), "{err}");

    // Resume: the same folder runs again and joins the cluster again.
    let resumed = kiln_json(&["resume", "gpu-a"], &config)?;
    assert_eq!(resumed["state"], "provisioning", "{resumed:#}");
    let pid2 = read_pid(&node_dir).context("a pid file after resume")?;
    assert!(process_alive(pid2));
    wait_hot(&config, "gpu-a", Duration::from_secs(90)).await?;

    // Release: the process and the folder are gone, the inventory says released.
    let released = kiln_json(&["release", "gpu-a"], &config)?;
    assert_eq!(released["state"], "released", "{released:#}");
    assert!(
        !process_alive(pid2),
        "kilnd {pid2} still runs after release"
    );
    assert!(!node_dir.exists(), "the node folder outlived the release");
    let err = kiln_fails(&["release", "gpu-a"], &config);
    assert!(err.contains("already released"), "{err}");
    let err = kiln_fails(&["pause", "nope"], &config);
    assert!(err.contains("no host named `nope`"), "{err}");

    // The history holds every step, in order.
    let history = kiln_json(&["inventory", "--history", "gpu-a"], &config)?;
    let steps: Vec<&str> = history
        .as_array()
        .context("history is an array")?
        .iter()
        .filter_map(|e| e["to"].as_str())
        .collect();
    assert_eq!(
        steps,
        [
            "provisioning",
            "hot",
            "warm",
            "provisioning",
            "hot",
            "released"
        ]
    );

    // Cost: non-negative figures for each state the host went through, summing to the total.
    let cost = kiln_json(&["cost", "--since", "2020-01-01"], &config)?;
    let since = &cost["since"];
    let total = since["total"].as_f64().context("total")?;
    assert!(total > 0.0, "{cost:#}");
    let mut sum = 0.0;
    for state in ["provisioning", "hot", "warm"] {
        let usd = since["per_state"][state]
            .as_f64()
            .with_context(|| format!("no cost for {state}: {cost:#}"))?;
        assert!(usd >= 0.0, "{state}: {usd}");
        sum += usd;
    }
    assert!((sum - total).abs() < 1e-9, "{cost:#}");
    assert!((since["per_host"]["gpu-a"].as_f64().context("per host")? - total).abs() < 1e-9);
    assert!(cost["today"]["total"].as_f64().is_some_and(|t| t >= 0.0));
    assert!(
        cost["month_to_date"]["total"]
            .as_f64()
            .is_some_and(|t| t >= 0.0)
    );
    let text = kiln(&["cost", "--config", &config.to_string_lossy()]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("month to date") && text.contains("gpu-a"),
        "{text}"
    );
    Ok(())
}
