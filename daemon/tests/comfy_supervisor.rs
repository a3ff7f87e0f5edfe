//! The supervisor against real child processes: a static HTTP server (`python3 -m http.server`
//! serving a file named `system_stats`, so `GET /system_stats` answers 200 — or 404 without it)
//! and small `sh` scripts. Every wait is a predicate with a deadline.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_daemon::comfy::ComfyControl;
use kiln_daemon::comfy::supervisor::{
    BackoffConfig, CrashLoopConfig, Supervisor, SupervisorConfig, SupervisorState,
};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

fn url(port: u16) -> url::Url {
    url::Url::parse(&format!("http://127.0.0.1:{port}/")).expect("url")
}

struct Sandbox {
    dir: tempfile::TempDir,
    port: u16,
}

impl Sandbox {
    /// A directory served over HTTP; `ready` puts a `system_stats` file in it.
    fn new(ready: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("www")).expect("www dir");
        if ready {
            std::fs::write(dir.path().join("www/system_stats"), "{}").expect("write system_stats");
        }
        Self {
            dir,
            port: free_port(),
        }
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.path().join("pid")
    }

    fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// `sh -c` that records its pid (= the group id), runs `prelude`, then execs the HTTP server.
    fn server_command(&self, prelude: &str) -> Vec<String> {
        let script = format!(
            "echo $$ > '{pid}'; {prelude} exec python3 -u -m http.server {port} --bind 127.0.0.1 --directory '{www}'",
            pid = self.pidfile().display(),
            port = self.port,
            www = self.www().display(),
        );
        vec!["sh".into(), "-c".into(), script]
    }

    fn config(&self, command: Vec<String>) -> SupervisorConfig {
        let mut c = SupervisorConfig::new(command, url(self.port));
        c.name = "test-comfy".into();
        c.start_timeout = Duration::from_secs(20);
        c.probe_interval = Duration::from_millis(50);
        c.probe_timeout = Duration::from_millis(500);
        c.health_interval = Duration::from_millis(200);
        c.health_failures_before_restart = 2;
        c.backoff = BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(1),
            factor: 2.0,
        };
        c.crash_loop = CrashLoopConfig {
            restarts: 100,
            window: Duration::from_secs(60),
        };
        c.stop_grace = Duration::from_secs(5);
        c
    }

    /// The group id written by the current child.
    async fn read_pid(&self, not: Option<i32>) -> i32 {
        let path = self.pidfile();
        wait_until("the child wrote its pid", || {
            let pid = std::fs::read_to_string(&path)
                .ok()?
                .trim()
                .parse::<i32>()
                .ok()?;
            (Some(pid) != not).then_some(pid)
        })
        .await
    }
}

async fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// Live (non-zombie) processes of group `pgid`, from /proc.
fn live_members(pgid: i32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
            && fields.first() != Some(&"Z")
        {
            out.push(stat.clone());
        }
    }
    out
}

/// Waits until no process of group `pgid` is left: `kill(-pgid, 0)` fails with ESRCH. Zombies
/// reparented to PID 1 count until it reaps them, so this waits for that as well.
async fn assert_group_gone(pgid: i32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match killpg(Pid::from_raw(pgid), None) {
            Err(Errno::ESRCH) => return,
            _ => {
                let live = live_members(pgid);
                // Zombies wait for PID 1; live members are a failure only at the deadline.
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "process group {pgid} still exists; live members: {live:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn ready_then_shutdown_leaves_no_process_in_the_group() {
    let sb = Sandbox::new(true);
    // A grandchild that would outlive a kill of the leader alone.
    let cmd = sb.server_command("sleep 1000 &");
    let handle = Supervisor::spawn(sb.config(cmd)).expect("valid config");
    let generation = handle.wait_ready(WAIT).await.expect("ready");
    assert_eq!(generation, 1);
    assert_eq!(handle.generation(), 1);
    assert!(handle.is_ready());
    assert!(handle.state().reason().contains("ready"));
    let pgid = sb.read_pid(None).await;
    assert!(
        live_members(pgid).len() >= 2,
        "server and sleeper run in the group"
    );
    let mut states = handle.subscribe_state();
    handle.shutdown().await.expect("clean shutdown");
    assert_eq!(*states.borrow_and_update(), SupervisorState::Stopped);
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_404_is_not_ready_and_the_start_times_out() {
    let sb = Sandbox::new(false);
    let mut config = sb.config(sb.server_command(""));
    config.start_timeout = Duration::from_secs(5);
    let handle = Supervisor::spawn(config).expect("valid config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "a failed start", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    let reason = s.reason();
    assert!(reason.contains("404"), "{reason}");
    assert!(reason.contains("within 5s"), "{reason}");
    assert!(!handle.is_ready());
    let pgid = sb.read_pid(None).await;
    handle.shutdown().await.expect("clean shutdown");
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_child_that_keeps_dying_is_reported_as_a_crash_loop() {
    let sb = Sandbox::new(true);
    let cmd = vec![
        "sh".into(),
        "-c".into(),
        "echo 'loading'; echo 'RuntimeError: no CUDA device' >&2; exit 3".into(),
    ];
    let mut config = sb.config(cmd);
    config.crash_loop = CrashLoopConfig {
        restarts: 3,
        window: Duration::from_secs(60),
    };
    let handle = Supervisor::spawn(config).expect("valid config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "crash loop", |s| {
        matches!(s, SupervisorState::CrashLoop { .. })
    })
    .await;
    let SupervisorState::CrashLoop {
        restarts,
        backoff,
        last_error,
    } = &s
    else {
        unreachable!("matched above")
    };
    assert_eq!(*restarts, 3);
    assert_eq!(*backoff, Duration::from_secs(1));
    assert!(last_error.contains("exited with status 3"), "{last_error}");
    assert!(
        last_error.contains("RuntimeError: no CUDA device"),
        "{last_error}"
    );
    assert!(s.reason().contains("crash-looping"));
    // It keeps retrying at the maximum backoff.
    let seen = handle.generation();
    let mut generations = handle.subscribe_generation();
    tokio::time::timeout(WAIT, generations.wait_for(|g| *g > seen))
        .await
        .expect("another start within the deadline")
        .expect("supervisor alive");
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_port_that_answers_before_spawning_is_not_trusted() {
    let sb = Sandbox::new(true);
    // Another "ComfyUI" already serves the port, answering /system_stats with 200.
    let mut squatter = tokio::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            &sb.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(sb.www())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the squatter");
    let stats = format!("http://127.0.0.1:{}/system_stats", sb.port);
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !client
        .get(&stats)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "squatter did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let marker = sb.dir.path().join("spawned");
    let cmd = vec![
        "sh".into(),
        "-c".into(),
        format!("touch '{}'; sleep 100", marker.display()),
    ];
    let handle = Supervisor::spawn(sb.config(cmd)).expect("valid config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "refusal", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    let reason = s.reason();
    assert!(
        reason.contains("already taken by another process"),
        "{reason}"
    );
    assert!(reason.contains(&sb.port.to_string()), "{reason}");
    assert_eq!(handle.generation(), 0, "nothing was spawned");
    assert!(!handle.is_ready());
    assert!(!Path::new(&marker).exists());
    handle.shutdown().await.expect("clean shutdown");
    squatter.kill().await.expect("kill the squatter");
}

#[tokio::test]
async fn address_in_use_exit_is_explained() {
    let sb = Sandbox::new(true);
    let cmd = vec![
        "sh".into(),
        "-c".into(),
        "echo 'Starting server' >&2; echo \"OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 8188): address already in use\" >&2; exit 1".into(),
    ];
    let handle = Supervisor::spawn(sb.config(cmd)).expect("valid config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "failed start", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    let reason = s.reason();
    assert!(
        reason.contains("exited with status 1 while starting"),
        "{reason}"
    );
    assert!(
        reason.contains("port is already in use by another process"),
        "{reason}"
    );
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn restart_kills_the_group_and_bumps_the_generation() {
    let sb = Sandbox::new(true);
    let handle = Supervisor::spawn(sb.config(sb.server_command("sleep 1000 &"))).expect("config");
    handle.wait_ready(WAIT).await.expect("ready");
    let first = sb.read_pid(None).await;
    let control = handle.control();
    let mut generations = control.subscribe_generation();
    generations.borrow_and_update();
    let dyn_control: &dyn ComfyControl = &control;
    assert_eq!(dyn_control.generation(), 1);
    dyn_control.restart("job timeout").await;
    // restart() resolves once the old group has been killed.
    assert_group_gone(first).await;
    tokio::time::timeout(WAIT, generations.changed())
        .await
        .expect("generation changes")
        .expect("supervisor alive");
    assert_eq!(handle.wait_ready(WAIT).await.expect("ready again"), 2);
    assert_eq!(ComfyControl::generation(&handle), 2);
    let second = sb.read_pid(Some(first)).await;
    assert_group_gone(first).await;
    handle.shutdown().await.expect("clean shutdown");
    assert_group_gone(second).await;
}

#[tokio::test]
async fn a_hung_child_is_killed_and_restarted() {
    let sb = Sandbox::new(true);
    let handle = Supervisor::spawn(sb.config(sb.server_command(""))).expect("config");
    handle.wait_ready(WAIT).await.expect("ready");
    let first = sb.read_pid(None).await;
    let mut rx = handle.subscribe_state();
    // Freeze it: the port stays open but nothing answers.
    kill(Pid::from_raw(first), Signal::SIGSTOP).expect("SIGSTOP the child");
    let s = wait_state(&mut rx, "hang detected", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    assert!(
        s.reason().contains("hung: 2 health probes failed"),
        "{}",
        s.reason()
    );
    wait_state(&mut rx, "ready again", |s| {
        *s == SupervisorState::Ready { generation: 2 }
    })
    .await;
    assert_group_gone(first).await;
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_exit_while_ready_is_restarted_with_backoff() {
    let sb = Sandbox::new(true);
    let handle = Supervisor::spawn(sb.config(sb.server_command(""))).expect("config");
    handle.wait_ready(WAIT).await.expect("ready");
    let first = sb.read_pid(None).await;
    let mut rx = handle.subscribe_state();
    kill(Pid::from_raw(first), Signal::SIGKILL).expect("kill the child");
    let s = wait_state(&mut rx, "restart", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    let SupervisorState::Restarting {
        attempt,
        backoff,
        reason,
    } = &s
    else {
        unreachable!("matched above")
    };
    assert_eq!((*attempt, *backoff), (1, Duration::from_millis(500)));
    assert!(
        reason.contains("killed by signal 9 (SIGKILL) while ready"),
        "{reason}"
    );
    wait_state(&mut rx, "ready again", |s| {
        *s == SupervisorState::Ready { generation: 2 }
    })
    .await;
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_child_that_ignores_sigint_gets_sigkill_after_the_grace() {
    let sb = Sandbox::new(true);
    let mut config = sb.config(sb.server_command("trap '' INT;"));
    config.stop_grace = Duration::from_millis(300);
    let handle = Supervisor::spawn(config).expect("config");
    handle.wait_ready(WAIT).await.expect("ready");
    let pgid = sb.read_pid(None).await;
    handle.shutdown().await.expect("clean shutdown");
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn dropping_the_handle_stops_the_group() {
    let sb = Sandbox::new(true);
    let handle = Supervisor::spawn(sb.config(sb.server_command("sleep 1000 &"))).expect("config");
    let control = handle.control();
    control.wait_ready(WAIT).await.expect("ready");
    let pgid = sb.read_pid(None).await;
    let mut rx = control.subscribe_state();
    drop(handle);
    wait_state(&mut rx, "stopped", |s| *s == SupervisorState::Stopped).await;
    assert_group_gone(pgid).await;
    // A restart on a stopped supervisor returns at once.
    tokio::time::timeout(WAIT, control.restart("after stop"))
        .await
        .expect("restart returns");
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn output_goes_to_the_log_and_a_flood_does_not_block() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sb = Sandbox::new(true);
    // 4 MB on stdout without a newline, far more than a pipe buffer, before the server starts.
    let cmd = sb.server_command(
        "echo hello-stdout; echo hello-stderr >&2; head -c 4000000 /dev/zero | tr '\\0' x; echo;",
    );
    let handle = Supervisor::spawn(sb.config(cmd)).expect("config");
    handle
        .wait_ready(WAIT)
        .await
        .expect("ready despite the flood");
    let text = || String::from_utf8_lossy(&logs.0.lock().expect("log lock")).into_owned();
    wait_until("both lines are logged", || {
        let t = text();
        (t.lines().filter(|l| l.contains("hello-std")).count() >= 3).then_some(())
    })
    .await;
    let t = text();
    let line = t
        .lines()
        .find(|l| l.contains("hello-stderr") && !l.contains("started ComfyUI"))
        .expect("stderr line");
    assert!(line.contains("comfy=test-comfy"), "{line}");
    assert!(
        line.contains("stream=\"stderr\"") || line.contains("stream=stderr"),
        "{line}"
    );
    let longest = t.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest < 20_000,
        "a long line is capped, got {longest} bytes"
    );
    handle.shutdown().await.expect("clean shutdown");
}

/// A minimal ComfyUI stand-in for the warm-up path: `/system_stats`, `POST /prompt` (records the
/// workflow in a file) and `/history/{id}` reporting success, or an execution_error in `fail` mode.
const PROMPT_SERVER: &str = r#"
import json, sys, uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
port, mode, record = int(sys.argv[1]), sys.argv[2], sys.argv[3]
prompts = {}
class H(BaseHTTPRequestHandler):
    def send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == '/system_stats':
            return self.send(200, {'system': {}, 'devices': []})
        if self.path.startswith('/history/'):
            pid = self.path[len('/history/'):]
            if pid not in prompts:
                return self.send(200, {})
            if mode == 'fail':
                st = {'status_str': 'error', 'completed': False, 'messages': [['execution_error',
                      {'node_type': 'CheckpointLoaderSimple', 'exception_message': 'model not found'}]]}
            else:
                st = {'status_str': 'success', 'completed': True, 'messages': []}
            return self.send(200, {pid: {'prompt': [0, pid, prompts[pid], {}, []], 'outputs': {}, 'status': st}})
        self.send(404, {})
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))))
        if self.path != '/prompt':
            return self.send(404, {})
        pid = str(uuid.uuid4())
        prompts[pid] = body['prompt']
        with open(record, 'a') as f:
            f.write(json.dumps({'prompt': body['prompt'], 'client_id': body.get('client_id')}) + '\n')
        self.send(200, {'prompt_id': pid, 'number': len(prompts), 'node_errors': {}})
HTTPServer(('127.0.0.1', port), H).serve_forever()
"#;

fn warmup_config(sb: &Sandbox, mode: &str) -> (SupervisorConfig, PathBuf) {
    let record = sb.dir.path().join("prompts.jsonl");
    let cmd = vec![
        "python3".into(),
        "-c".into(),
        PROMPT_SERVER.into(),
        sb.port.to_string(),
        mode.into(),
        record.display().to_string(),
    ];
    let mut config = sb.config(cmd);
    config.warmup = Some(serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "warmup"}}
    }));
    config.warmup_timeout = Duration::from_secs(10);
    (config, record)
}

#[tokio::test]
async fn the_warm_up_workflow_runs_before_ready() {
    let sb = Sandbox::new(true);
    let (config, record) = warmup_config(&sb, "ok");
    let workflow = config.warmup.clone().expect("warm-up set");
    let handle = Supervisor::spawn(config).expect("config");
    assert_eq!(handle.wait_ready(WAIT).await.expect("ready"), 1);
    let text = std::fs::read_to_string(&record).expect("the warm-up prompt was posted");
    let posted: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("one prompt")).expect("recorded JSON");
    assert_eq!(posted["prompt"], workflow);
    assert_eq!(posted["client_id"], "kiln-supervisor-warmup");
    handle.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_failing_warm_up_is_a_failed_start() {
    let sb = Sandbox::new(true);
    let (config, _record) = warmup_config(&sb, "fail");
    let handle = Supervisor::spawn(config).expect("config");
    let mut rx = handle.subscribe_state();
    let s = wait_state(&mut rx, "failed warm-up", |s| {
        matches!(s, SupervisorState::Restarting { .. })
    })
    .await;
    let reason = s.reason();
    assert!(
        reason.contains("failed: node CheckpointLoaderSimple: model not found"),
        "{reason}"
    );
    assert!(!handle.is_ready());
    handle.shutdown().await.expect("clean shutdown");
}
