//! `kiln run` end to end with the `local` provider: a primary node rented by hand, then the
//! control loop alone. A burst of pro jobs makes it rent a second node, which joins the
//! cluster and helps drain the queue; once the queue has stayed quiet the extra node is drained,
//! stopped and (with a short `warm_release_after_s`) released, while the primary keeps running.
//! The inventory's actions log is checked for each decision, and SIGTERM stops the loop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_e2e::{
    Api, NodeSpec, SharedKeys, bin, free_port, init_ca, kiln, kiln_json, sdxl_workflow,
};
use serde_json::Value;
use tokio::time::Instant;

/// SIGKILLs every kilnd the local provider started under `base`, and the `kiln run` child, so a
/// failed test leaves no process behind.
struct Guard {
    base: PathBuf,
    run: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.run {
            let _ = child.kill();
            let _ = child.wait();
        }
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return;
        };
        for entry in entries.flatten() {
            if let Some(pid) = std::fs::read_to_string(entry.path().join("kilnd.pid"))
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn host<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["inventory"]
        .as_array()?
        .iter()
        .find(|h| h["name"] == name)
}

fn state(status: &Value, name: &str) -> Option<String> {
    host(status, name).and_then(|h| h["state"].as_str().map(String::from))
}

/// Polls `kiln status --config --json` until `done` holds, at most `timeout`.
async fn wait_status(
    config: &Path,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = kiln_json(&["status"], config)?;
        if done(&status) {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}; last status: {status:#}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The external port of the local host's `port`/`protocol` in the inventory's JSON.
fn port_of(host: &Value, protocol: &str) -> anyhow::Result<u16> {
    host["address"]["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["protocol"] == protocol))
        .and_then(|p| p["external_port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("no {protocol} port in {host:#}"))
}

fn config_text(
    ca: &Path,
    keys: &Path,
    token: &Path,
    ports: (u16, u16),
    cluster: Option<(u16, u16)>,
) -> String {
    let (api, seeds) = match cluster {
        Some((api, gossip)) => (
            format!("api = \"http://127.0.0.1:{api}\"\n"),
            format!("[\"quic://127.0.0.1:{gossip}\"]"),
        ),
        None => (String::new(), "[]".to_string()),
    };
    format!(
        r#"[inventory]
path = "inventory.db"

[cluster]
{api}token_file = {token:?}
timeout_s = 5

[policy]
tick_s = 1
primary = "primary"
resume_queue_depth = 3
rent_queue_depth = 4
quiet_queue_depth = 1
quiet_for_s = 3
scale_up_cooldown_s = 1
scale_down_cooldown_s = 2
warm_release_after_s = 2
warm_pool_size = 0
max_fleet = 2
[policy.rent]
providers = ["local"]
name_prefix = "gpu-"

[providers.local]
kilnd = {kilnd:?}
base_dir = "nodes"
ca_dir = {ca:?}
seeds = {seeds}
ports = {{ first = {first}, last = {last} }}
keys_file = {keys:?}
operator_token_file = {token:?}
resume_delay_ms = 100
stop_timeout_s = 20
gossip_interval_ms = 200
sim_args = ["--startup-delay-ms", "200", "--step-time-ms", "40", "--model-load-ms", "0", "--vae-time-ms", "0"]
price_per_hour = 0.4
stopped_price_per_hour = 0.05
"#,
        token = token.to_string_lossy(),
        kilnd = bin("kilnd").to_string_lossy(),
        ca = ca.to_string_lossy(),
        keys = keys.to_string_lossy(),
        first = ports.0,
        last = ports.1,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kiln_run_rents_for_a_burst_and_stops_the_extra_node_when_quiet() -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("kiln-e2e-control-")
        .tempdir()?;
    let ca = work.path().join("ca");
    init_ca(&ca, "e2e");
    let keys = SharedKeys::create(work.path(), &NodeSpec::default().accounts)?;
    let token = work.path().join("operator-token");
    std::fs::write(&token, "e2e-operator-token-0123456789abcdef")?;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    let first = free_port();
    let ports = if first > 65_000 {
        (first - 400, first)
    } else {
        (first, first + 400)
    };
    let mut guard = Guard {
        base: work.path().join("nodes"),
        run: None,
    };
    let config = work.path().join("kiln.toml");

    // The primary, rented by hand; it starts the cluster.
    std::fs::write(&config, config_text(&ca, &keys.file, &token, ports, None))?;
    let primary = kiln_json(
        &["rent", "--provider", "local", "--name", "primary"],
        &config,
    )?;
    let (api, gossip) = (port_of(&primary, "tcp")?, port_of(&primary, "udp")?);
    std::fs::write(
        &config,
        config_text(&ca, &keys.file, &token, ports, Some((api, gossip))),
    )?;
    wait_status(&config, Duration::from_secs(60), "primary hot", |s| {
        state(s, "primary").as_deref() == Some("hot")
    })
    .await?;

    // The dry run plans nothing for an idle cluster and changes nothing.
    let dry = kiln(&["run", "--config", &config.to_string_lossy(), "--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&dry.stdout).trim(), "no action");

    // The control loop.
    let log = work.path().join("run.log");
    let child = Command::new(bin("kiln"))
        .args(["run", "--config", &config.to_string_lossy()])
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::create(
            work.path().join("run.err"),
        )?))
        .spawn()
        .context("starting kiln run")?;
    guard.run = Some(child);

    // A burst of pro jobs: deeper than rent_queue_depth.
    let api_client = Api {
        url: format!("http://127.0.0.1:{api}"),
        key: keys.keys.get("alice").context("alice's key")?.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
    };
    let mut ids = Vec::new();
    for seed in 0..16u64 {
        let (code, body) = api_client.submit(&sdxl_workflow(20, seed)).await?;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().context("job id")?.to_string());
    }

    // A second node is rented, joins and turns hot.
    let status = wait_status(&config, Duration::from_secs(60), "a second node hot", |s| {
        s["inventory"].as_array().is_some_and(|hosts| {
            hosts
                .iter()
                .any(|h| h["name"] != "primary" && h["state"] == "hot")
        })
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let extra = status["inventory"]
        .as_array()
        .and_then(|hosts| hosts.iter().find(|h| h["name"] != "primary"))
        .and_then(|h| h["name"].as_str())
        .context("the extra host")?
        .to_string();
    assert!(extra.starts_with("gpu-"), "{extra}");

    // The queue drains.
    for id in &ids {
        let job = api_client.wait_final(id, Duration::from_secs(60)).await?;
        assert_eq!(job["status"], "succeeded", "{job:#}");
    }

    // Quiet: the extra node is drained, stopped, then released; the primary stays hot.
    let status = wait_status(&config, Duration::from_secs(60), "extra released", |s| {
        state(s, &extra).as_deref() == Some("released")
    })
    .await
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    assert_eq!(state(&status, "primary").as_deref(), Some("hot"));
    let decisions: Vec<(String, String, String)> = status["decisions"]
        .as_array()
        .context("decisions")?
        .iter()
        .map(|d| {
            (
                d["action"].as_str().unwrap_or_default().to_string(),
                d["host"].as_str().unwrap_or_default().to_string(),
                d["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let for_extra: Vec<&str> = decisions
        .iter()
        .filter(|(_, host, outcome)| host == &extra && outcome.starts_with("ok"))
        .map(|(action, _, _)| action.as_str())
        .collect();
    assert_eq!(
        for_extra,
        ["rent", "drain", "pause", "release"],
        "{decisions:?}"
    );
    let on_primary: Vec<&str> = decisions
        .iter()
        .filter(|(_, host, _)| host == "primary")
        .map(|(action, _, _)| action.as_str())
        .collect();
    assert!(
        on_primary.iter().all(|a| *a == "rent"),
        "the loop never acted on the primary: {decisions:?}"
    );
    let history = kiln_json(&["inventory", "--history", &extra], &config)?;
    let steps: Vec<&str> = history
        .as_array()
        .context("history")?
        .iter()
        .filter_map(|e| e["to"].as_str())
        .collect();
    assert_eq!(
        steps,
        ["provisioning", "hot", "draining", "warm", "released"]
    );

    // SIGTERM stops the loop between ticks, cleanly.
    let mut child = guard.run.take().context("kiln run")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait()? {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("kiln run did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let printed = std::fs::read_to_string(&log)?;
    assert!(exit.success(), "{exit:?}\n{printed}");
    assert!(printed.contains("SIGTERM: stopping"), "{printed}");
    Ok(())
}
