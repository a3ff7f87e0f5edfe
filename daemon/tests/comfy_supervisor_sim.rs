//! The supervisor running the ComfyUI simulator (`kilnd comfy-sim`) as its child, exactly as it
//! runs ComfyUI: readiness, warm-up, a prompt, a crash mid-job, a hang, a port already served by
//! another simulator, a crash loop, and shutdown leaving no process in the group.

use std::time::Duration;

use kiln_daemon::comfy::ComfyControl;
use kiln_daemon::comfy::supervisor::{
    BackoffConfig, CrashLoopConfig, Supervisor, SupervisorConfig, SupervisorState,
};
use nix::errno::Errno;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

fn simple_workflow() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/comfyui-recordings/10_workflow_simple_api.json"
    );
    let text = std::fs::read_to_string(path).expect("recorded workflow");
    serde_json::from_str(&text).expect("recorded workflow is JSON")
}

struct Sim {
    dir: tempfile::TempDir,
    port: u16,
}

impl Sim {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, extra: &[&str]) -> Vec<String> {
        let mut c = vec![
            env!("CARGO_BIN_EXE_kilnd").to_owned(),
            "comfy-sim".into(),
            "--port".into(),
            self.port.to_string(),
            "--base-dir".into(),
            self.dir.path().join("comfy").display().to_string(),
            "--startup-delay-ms".into(),
            "100".into(),
            "--step-time-ms".into(),
            "10".into(),
            "--model-load-ms".into(),
            "10".into(),
        ];
        c.extend(extra.iter().map(|s| (*s).to_owned()));
        c
    }

    fn config(&self, extra: &[&str]) -> SupervisorConfig {
        let url = url::Url::parse(&self.base()).expect("url");
        let mut c = SupervisorConfig::new(self.command(extra), url);
        c.name = "sim".into();
        c.start_timeout = Duration::from_secs(30);
        c.probe_interval = Duration::from_millis(50);
        c.probe_timeout = Duration::from_secs(1);
        c.health_interval = Duration::from_millis(300);
        c.backoff = BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(1),
            factor: 2.0,
        };
        c.crash_loop = CrashLoopConfig {
            restarts: 100,
            window: Duration::from_secs(60),
        };
        c.stop_grace = Duration::from_secs(10);
        c
    }
}

/// Simulator processes serving `port`, found by their command line (`/system_stats` carries no
/// pid). The supervised child leads its own process group, so its pid is the group id.
fn sim_pids(port: u16) -> Vec<i32> {
    let needle = format!("--port\0{port}\0");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("comfy-sim") && cmdline.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

async fn one_sim_pid(port: u16) -> i32 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let pids = sim_pids(port);
        if pids.len() == 1 {
            return pids[0];
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "simulator processes: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_group_gone(pgid: i32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while killpg(Pid::from_raw(pgid), None) != Err(Errno::ESRCH) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process group {pgid} still exists"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(
    rx: &mut watch::Receiver<SupervisorState>,
    what: &str,
    pred: impl FnMut(&SupervisorState) -> bool,
) -> SupervisorState {
    let waited = tokio::time::timeout(WAIT, rx.wait_for(pred))
        .await
        .map(|r| r.map(|s| s.clone()));
    match waited {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("supervisor went away while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}; state: {:?}", *rx.borrow()),
    }
}

async fn post_prompt(base: &str, workflow: &Value) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{base}/prompt"))
        .json(&json!({"prompt": workflow, "client_id": "test"}))
        .send()
        .await
        .expect("POST /prompt");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("prompt answer");
    body["prompt_id"].as_str().expect("prompt_id").to_owned()
}

/// The history entry of `id`, waiting until it exists.
async fn history(base: &str, id: &str) -> Value {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(resp) = client.get(format!("{base}/history/{id}")).send().await
            && let Ok(body) = resp.json::<Value>().await
            && let Some(entry) = body.get(id)
        {
            return entry.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no history for {id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn simulator_warms_up_runs_a_prompt_and_stops_without_orphans() {
    let sim = Sim::new();
    let mut config = sim.config(&[]);
    config.warmup = Some(simple_workflow());
    let handle = Supervisor::spawn(config).expect("config");
    assert_eq!(handle.wait_ready(WAIT).await.expect("ready"), 1);
    let pid = one_sim_pid(sim.port).await;
    // The warm-up ran before Ready: its history entry is there.
    let all: Value = reqwest::get(format!("{}/history", sim.base()))
        .await
        .expect("GET /history")
        .json()
        .await
        .expect("history JSON");
    assert_eq!(all.as_object().map(|o| o.len()), Some(1), "{all}");
    let id = post_prompt(&sim.base(), &simple_workflow()).await;
    let entry = history(&sim.base(), &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    assert!(handle.is_ready());
    handle.shutdown().await.expect("clean shutdown");
    assert_group_gone(pid).await;
}

#[tokio::test]
async fn a_crash_mid_job_restarts_and_the_prompt_is_lost() {
    let sim = Sim::new();
    let handle = Supervisor::spawn(sim.config(&["--crash-after-prompts", "1"])).expect("config");
    handle.wait_ready(WAIT).await.expect("ready");
    let first = one_sim_pid(sim.port).await;
    let mut generations = handle.subscribe_generation();
    generations.borrow_and_update();
    let ok = post_prompt(&sim.base(), &simple_workflow()).await;
    assert_eq!(
        history(&sim.base(), &ok).await["status"]["status_str"],
        "success"
    );
    let mut workflow = simple_workflow();
    workflow["1"]["inputs"]["width"] = json!(65);
    let doomed = post_prompt(&sim.base(), &workflow).await;
    tokio::time::timeout(WAIT, generations.changed())
        .await
        .expect("a restart")
        .expect("supervisor alive");
    assert_eq!(handle.wait_ready(WAIT).await.expect("ready again"), 2);
    assert_group_gone(first).await;
    let lost: Value = reqwest::get(format!("{}/history/{doomed}", sim.base()))
        .await
        .expect("GET history")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        lost,
        json!({}),
        "the restarted simulator does not know the prompt"
    );
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_hung_prompt_is_ended_by_restart() {
    let sim = Sim::new();
    let handle = Supervisor::spawn(sim.config(&["--hang-node", "ImageInvert"])).expect("config");
    handle.wait_ready(WAIT).await.expect("ready");
    let first = one_sim_pid(sim.port).await;
    let _hung = post_prompt(&sim.base(), &simple_workflow()).await;
    // What the executor does when an interrupt does not land in time.
    let control = handle.control();
    let dyn_control: &dyn ComfyControl = &control;
    dyn_control.restart("job timeout").await;
    assert_group_gone(first).await;
    assert_eq!(handle.wait_ready(WAIT).await.expect("ready again"), 2);
    assert_eq!(dyn_control.generation(), 2);
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn another_simulator_on_the_port_does_not_fool_it() {
    let sim = Sim::new();
    let mut other = tokio::process::Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args(sim.command(&[]).iter().skip(1))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the other simulator");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !client
        .get(format!("{}/system_stats", sim.base()))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other simulator did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handle = Supervisor::spawn(sim.config(&[])).expect("config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "refusal", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    assert!(
        s.reason().contains("already taken by another process"),
        "{}",
        s.reason()
    );
    assert_eq!(handle.generation(), 0);
    assert!(!handle.is_ready());
    handle.shutdown().await.expect("clean shutdown");
    other.kill().await.expect("kill the other simulator");
}

#[tokio::test]
async fn a_failing_startup_becomes_a_crash_loop() {
    let sim = Sim::new();
    let mut config = sim.config(&["--fail-startup"]);
    config.crash_loop = CrashLoopConfig {
        restarts: 2,
        window: Duration::from_secs(60),
    };
    let handle = Supervisor::spawn(config).expect("config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "crash loop", |s| {
        matches!(s, SupervisorState::CrashLoop { .. })
    })
    .await;
    let reason = s.reason();
    assert!(
        reason.contains("exited with status 1 while starting"),
        "{reason}"
    );
    assert!(reason.contains("simulated startup failure"), "{reason}");
    assert!(handle.generation() >= 2);
    handle.shutdown().await.expect("clean shutdown");
    assert!(sim_pids(sim.port).is_empty());
}
