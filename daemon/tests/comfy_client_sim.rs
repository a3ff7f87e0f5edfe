//! The ComfyUI client and the executor against the simulator, run as a real child process
//! (`kilnd comfy-sim`) on a free port, for every way a prompt can end: success with downloaded
//! outputs, a cached rerun, an execution error, a rejected and a partially invalid prompt, a
//! cancel, a timeout whose interrupt lands, a timeout whose interrupt does not land (restart), a
//! WebSocket cut mid-run, and a prompt lost to a restart. A run its socket saw whole takes its
//! files from the `executed` events; one whose socket dropped or skipped a frame reads them from
//! the history.

use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_daemon::comfy::ComfyControl;
use kiln_daemon::comfy::client::{ClientTimings, ComfyClient, ComfyError, RunEvent};
use kiln_daemon::comfy::executor::{OutputFile, RunOptions, RunOutcome, run_prompt};
use kiln_daemon::comfy::types::FileType;
use kiln_daemon::comfy::workflow::validate;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

const READY_LIMIT: Duration = Duration::from_secs(30);
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

/// A `kilnd comfy-sim` child process.
struct Sim {
    child: Child,
    port: u16,
}

async fn spawn_sim(port: u16, base: &Path, extra: &[&str]) -> Sim {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kilnd"));
    cmd.arg("comfy-sim")
        .args(["--port", &port.to_string()])
        .arg("--base-dir")
        .arg(base)
        .args(["--startup-delay-ms", "0", "--model-load-ms", "0"])
        .args(["--vae-time-ms", "0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn kilnd comfy-sim");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/system_stats");
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            panic!("comfy-sim exited before it was ready: {status}");
        }
        if let Ok(resp) = http.get(&url).send().await
            && resp.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "comfy-sim not ready within {READY_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Sim { child, port }
}

impl Sim {
    async fn kill(mut self) {
        self.child.kill().await.expect("kill comfy-sim");
    }
}

/// A [`ComfyControl`] over a simulator child: `restart` kills it and starts a new one on the
/// same port.
struct SimControl {
    sim: Mutex<Option<Sim>>,
    base: PathBuf,
    extra: Vec<String>,
    generation: AtomicU64,
    restarts: AtomicU64,
}

impl SimControl {
    async fn start(base: &Path, extra: &[&str]) -> Arc<SimControl> {
        let sim = spawn_sim(free_port(), base, extra).await;
        Arc::new(SimControl {
            sim: Mutex::new(Some(sim)),
            base: base.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            generation: AtomicU64::new(1),
            restarts: AtomicU64::new(0),
        })
    }

    fn port(&self) -> u16 {
        self.sim
            .lock()
            .expect("lock")
            .as_ref()
            .map(|s| s.port)
            .expect("a running sim")
    }

    fn url(&self) -> Url {
        Url::parse(&format!("http://127.0.0.1:{}", self.port())).expect("url")
    }

    /// Kills the simulator and starts a fresh one on the same port, without telling anyone
    /// (the generation stays the same), as an unnoticed crash and restart would.
    async fn crash_and_respawn(&self) {
        let old = self
            .sim
            .lock()
            .expect("lock")
            .take()
            .expect("a running sim");
        let port = old.port;
        old.kill().await;
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let new = spawn_sim(port, &self.base, &extra).await;
        *self.sim.lock().expect("lock") = Some(new);
    }
}

#[async_trait::async_trait]
impl ComfyControl for SimControl {
    async fn restart(&self, _reason: &str) {
        self.restarts.fetch_add(1, Ordering::SeqCst);
        self.crash_and_respawn().await;
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

fn client(url: Url) -> ComfyClient {
    let timings = ClientTimings {
        poll_interval: Duration::from_millis(100),
        safety_poll_interval: Duration::from_secs(2),
        max_reconnect_backoff: Duration::from_millis(300),
        ..ClientTimings::default()
    };
    ComfyClient::with_timings(url, format!("kiln-test-{}", uuid::Uuid::new_v4()), timings)
        .expect("client")
}

fn simple_workflow(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 2105376}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

fn sampler_workflow(seed: u64, steps: u64) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kiln at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "kiln_sampler"}}
    })
}

fn opts(timeout: Duration, grace: Duration) -> RunOptions {
    RunOptions {
        timeout,
        interrupt_grace: grace,
        generation_check: Duration::from_millis(50),
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Runs `run_prompt` in a task, returning its outcome's handle and the progress receiver.
fn spawn_run(
    client: Arc<ComfyClient>,
    control: Arc<SimControl>,
    workflow: Value,
    options: RunOptions,
    cancel: CancellationToken,
) -> (
    tokio::task::JoinHandle<RunOutcome>,
    mpsc::Receiver<RunEvent>,
) {
    let (tx, rx) = mpsc::channel(1024);
    let handle = tokio::spawn(async move {
        run_prompt(
            &client,
            control.as_ref(),
            &workflow,
            None,
            &options,
            tx,
            cancel,
        )
        .await
    });
    (handle, rx)
}

/// Waits until an event matching `pred` arrives.
async fn wait_event(rx: &mut mpsc::Receiver<RunEvent>, pred: impl Fn(&RunEvent) -> bool) {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the awaited event arrived in time")
            .expect("the run is still going");
        if pred(&ev) {
            return;
        }
    }
}

async fn outcome(handle: tokio::task::JoinHandle<RunOutcome>) -> RunOutcome {
    tokio::time::timeout(RUN_LIMIT, handle)
        .await
        .expect("the run ended in time")
        .expect("the run task did not panic")
}

#[tokio::test]
async fn success_downloads_outputs_and_a_rerun_is_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "1"]).await;
    let client = Arc::new(client(control.url()));

    let info = client.object_info().await.expect("object_info");
    assert!(info.get("SaveImage").is_some_and(|c| c.output_node));
    let workflow = simple_workflow("kiln_simple");
    validate(&workflow, &info).expect("valid workflow");

    let (handle, mut rx) = spawn_run(
        client.clone(),
        control.clone(),
        workflow.clone(),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    let first = outcome(handle).await;
    let RunOutcome::Succeeded {
        outputs,
        previews,
        partial_node_errors,
    } = first
    else {
        panic!("expected success, got {first:?}");
    };
    assert!(previews.is_empty() && partial_node_errors.is_empty());
    assert_eq!(outputs.len(), 1);
    let out = &outputs[0];
    assert_eq!(out.node_id, "3");
    assert_eq!(out.kind, "images");
    assert_eq!(out.file_type, FileType::Output);
    assert!(out.filename.starts_with("kiln_simple_"), "{}", out.filename);
    assert!(
        out.bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "a PNG was downloaded"
    );
    let on_disk = std::fs::read(dir.path().join("output").join(&out.filename)).expect("file");
    assert_eq!(on_disk, out.bytes.to_vec());

    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    assert!(events.contains(&RunEvent::Started), "{events:?}");
    assert!(
        events.contains(&RunEvent::Executing { node: "3".into() }),
        "{events:?}"
    );
    assert!(
        events.iter().any(
            |e| matches!(e, RunEvent::Executed { node, files } if node == "3" && files.len() == 1)
        ),
        "{events:?}"
    );

    // The run kept its socket for the next one, open and quiet; the next run takes it (no new
    // connection), and nothing is kept for another ComfyUI generation.
    let generation = control.generation();
    let kept = client.kept_events(generation).expect("a kept socket");
    client.keep_events(generation, kept);

    // The identical prompt again: everything cached, the same file reported again.
    let (handle, mut rx) = spawn_run(
        client.clone(),
        control.clone(),
        workflow,
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    let second = outcome(handle).await;
    let RunOutcome::Succeeded { outputs: again, .. } = second else {
        panic!("expected a cached success, got {second:?}");
    };
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].filename, out.filename);
    assert_eq!(again[0].bytes, out.bytes);
    assert!(client.kept_events(generation + 1).is_none());
    assert!(
        client.kept_events(generation).is_none(),
        "a socket offered to another generation is closed"
    );
    let mut cached = None;
    while let Ok(ev) = rx.try_recv() {
        if let RunEvent::Cached { nodes } = ev {
            cached = Some(nodes);
        }
    }
    let mut cached = cached.expect("an execution_cached event");
    cached.sort();
    assert_eq!(cached, vec!["1", "2", "3"]);
    assert_eq!(control.restarts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn sampler_progress_is_relayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "5"]).await;
    let client = Arc::new(client(control.url()));
    let (handle, mut rx) = spawn_run(
        client,
        control.clone(),
        sampler_workflow(7, 8),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    let result = outcome(handle).await;
    assert!(
        matches!(&result, RunOutcome::Succeeded { outputs, .. } if outputs.len() == 1),
        "{result:?}"
    );
    let mut steps = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let RunEvent::Progress { value, max, node } = ev {
            assert_eq!(node.as_deref(), Some("5"));
            assert_eq!(max, 8.0);
            steps.push(value);
        }
    }
    assert_eq!(steps.last(), Some(&8.0), "{steps:?}");
}

#[tokio::test]
async fn execution_error_is_reported_with_node_and_exception() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(
        dir.path(),
        &[
            "--step-time-ms",
            "1",
            "--fail-node",
            "ImageInvert:kiln test failure",
        ],
    )
    .await;
    let client = Arc::new(client(control.url()));
    let (handle, _rx) = spawn_run(
        client,
        control,
        simple_workflow("kiln_fail"),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    match outcome(handle).await {
        RunOutcome::Failed(ComfyError::Execution {
            node_id,
            node_type,
            exception_type,
            message,
            ..
        }) => {
            assert_eq!(node_id, "2");
            assert_eq!(node_type, "ImageInvert");
            assert_eq!(exception_type, "RuntimeError");
            assert!(message.contains("kiln test failure"), "{message}");
        }
        other => panic!("expected an execution error, got {other:?}"),
    }
}

#[tokio::test]
async fn rejected_and_partially_invalid_prompts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "1"]).await;
    let client = Arc::new(client(control.url()));

    let mut missing = simple_workflow("kiln_rejected");
    missing["2"]["inputs"] = json!({});
    let (handle, _rx) = spawn_run(
        client.clone(),
        control.clone(),
        missing,
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    match outcome(handle).await {
        RunOutcome::Failed(ComfyError::Rejected {
            error_type,
            node_errors,
            ..
        }) => {
            assert_eq!(error_type, "prompt_outputs_failed_validation");
            assert_eq!(node_errors.len(), 1);
            assert_eq!(node_errors[0].node_id, "2");
            assert_eq!(node_errors[0].class_type, "ImageInvert");
            assert_eq!(
                node_errors[0].errors[0].error_type,
                "required_input_missing"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    let mut unknown = simple_workflow("kiln_rejected");
    unknown["4"] = json!({"class_type": "NoSuchNodeClass", "inputs": {}});
    let err = client
        .submit(&new_id(), &unknown, None)
        .await
        .expect_err("unknown class is refused");
    assert!(
        matches!(&err, ComfyError::Rejected { error_type, .. } if error_type == "invalid_prompt"),
        "{err:?}"
    );

    // One valid branch and one that loads a missing file: the valid one runs.
    let mut partial = simple_workflow("kiln_partial");
    partial["4"] = json!({"class_type": "LoadImage", "inputs": {"image": "no_such_file.png"}});
    partial["5"] =
        json!({"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}});
    let (handle, _rx) = spawn_run(
        client.clone(),
        control.clone(),
        partial,
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    match outcome(handle).await {
        RunOutcome::Succeeded {
            outputs,
            partial_node_errors,
            ..
        } => {
            assert_eq!(outputs.len(), 1);
            assert_eq!(outputs[0].node_id, "3");
            assert_eq!(partial_node_errors.len(), 1);
            assert_eq!(partial_node_errors[0].node_id, "4");
            assert_eq!(partial_node_errors[0].dependent_outputs, vec!["5"]);
        }
        other => panic!("expected a partial success, got {other:?}"),
    }
}

#[tokio::test]
async fn cancel_interrupts_the_running_prompt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "100"]).await;
    let client = Arc::new(client(control.url()));
    let cancel = CancellationToken::new();
    let (handle, mut rx) = spawn_run(
        client.clone(),
        control.clone(),
        sampler_workflow(11, 200),
        opts(RUN_LIMIT, Duration::from_secs(10)),
        cancel.clone(),
    );
    wait_event(&mut rx, |e| matches!(e, RunEvent::Progress { .. })).await;
    cancel.cancel();
    assert_eq!(
        outcome(handle).await,
        RunOutcome::Interrupted { restarted: false }
    );
    assert_eq!(control.restarts.load(Ordering::SeqCst), 0);
    // ComfyUI frees up: the interrupted prompt leaves its queue.
    let deadline = Instant::now() + RUN_LIMIT;
    while !client
        .queue()
        .await
        .expect("queue")
        .running_ids()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the interrupted prompt still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn timeout_interrupts_and_the_interrupt_lands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "100"]).await;
    let client = Arc::new(client(control.url()));
    let (handle, _rx) = spawn_run(
        client,
        control.clone(),
        sampler_workflow(12, 500),
        opts(Duration::from_millis(800), Duration::from_secs(10)),
        CancellationToken::new(),
    );
    assert_eq!(
        outcome(handle).await,
        RunOutcome::TimedOut { restarted: false }
    );
    assert_eq!(control.restarts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn timeout_restarts_comfyui_when_the_interrupt_does_not_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(
        dir.path(),
        &["--step-time-ms", "1", "--hang-node", "ImageInvert"],
    )
    .await;
    let client = Arc::new(client(control.url()));
    let (handle, _rx) = spawn_run(
        client.clone(),
        control.clone(),
        simple_workflow("kiln_hang"),
        opts(Duration::from_millis(500), Duration::from_millis(500)),
        CancellationToken::new(),
    );
    assert_eq!(
        outcome(handle).await,
        RunOutcome::TimedOut { restarted: true }
    );
    assert_eq!(control.restarts.load(Ordering::SeqCst), 1);
    // The new ComfyUI answers and knows nothing of the old prompt.
    let queue = client.queue().await.expect("queue after restart");
    assert!(queue.running_ids().is_empty());
}

/// A TCP proxy that can cut every connection it carries while still accepting new ones.
struct Proxy {
    port: u16,
    cut: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    /// `GET /history/...` requests that went through.
    history_reads: Arc<AtomicU64>,
}

/// A replacement a [`Proxy`] makes in one direction of its traffic: every `from` becomes `to`
/// (same length).
#[derive(Clone, Default)]
struct Rewrite {
    from: Vec<u8>,
    to: Vec<u8>,
}

impl Proxy {
    async fn start(upstream_port: u16) -> Proxy {
        Proxy::start_rewriting(upstream_port, Rewrite::default()).await
    }

    /// A proxy that applies `rewrite` to what ComfyUI sends (HTTP answers and WebSocket frames).
    async fn start_rewriting(upstream_port: u16, rewrite: Rewrite) -> Proxy {
        assert_eq!(rewrite.from.len(), rewrite.to.len());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let history_reads = Arc::new(AtomicU64::new(0));
        let (cut2, stop2, reads) = (cut.clone(), stop.clone(), history_reads.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop2.cancelled() => return,
                };
                let Ok((inbound, _)) = accepted else {
                    continue;
                };
                let token = cut2.lock().expect("lock").clone();
                let (rewrite, reads) = (rewrite.clone(), reads.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    let up = Rewrite {
                        from: b"GET /history/".to_vec(),
                        to: b"GET /history/".to_vec(),
                    };
                    tokio::select! {
                        _ = pump(in_read, out_write, up, Some(reads)) => {}
                        _ = pump(out_read, in_write, rewrite, None) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            cut,
            stop,
            history_reads,
        }
    }

    fn cut_all(&self) {
        let mut token = self.cut.lock().expect("lock");
        token.cancel();
        *token = CancellationToken::new();
    }

    /// A client of ComfyUI through this proxy.
    fn client(&self) -> Arc<ComfyClient> {
        let url = Url::parse(&format!("http://127.0.0.1:{}", self.port)).expect("url");
        Arc::new(client(url))
    }

    fn history_reads(&self) -> u64 {
        self.history_reads.load(Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, replacing `rewrite.from` with `rewrite.to` even across reads (a read
/// that ends with the start of `rewrite.from` keeps those bytes for the next one) and counting
/// the replacements in `count`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rewrite: Rewrite,
    count: Option<Arc<AtomicU64>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        if !rewrite.from.is_empty() {
            let mut i = 0;
            while i + rewrite.from.len() <= pending.len() {
                if pending[i..].starts_with(&rewrite.from) {
                    pending[i..i + rewrite.to.len()].copy_from_slice(&rewrite.to);
                    if let Some(count) = &count {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    i += rewrite.from.len();
                } else {
                    i += 1;
                }
            }
        }
        let keep = (1..rewrite.from.len().min(pending.len() + 1))
            .rev()
            .find(|&k| pending.ends_with(&rewrite.from[..k]))
            .unwrap_or(0);
        let ready = pending.len() - keep;
        if to.write_all(&pending[..ready]).await.is_err() {
            return;
        }
        pending.drain(..ready);
    }
    let _ = to.write_all(&pending).await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut_all();
    }
}

#[tokio::test]
async fn a_dropped_websocket_is_reconnected_and_the_run_finishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "50"]).await;
    let proxy = Proxy::start(control.port()).await;
    let client = proxy.client();
    let (handle, mut rx) = spawn_run(
        client,
        control.clone(),
        sampler_workflow(21, 30),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    wait_event(
        &mut rx,
        |e| matches!(e, RunEvent::Progress { value, .. } if *value >= 3.0),
    )
    .await;
    proxy.cut_all();
    wait_event(&mut rx, |e| matches!(e, RunEvent::Reconnecting)).await;
    let result = outcome(handle).await;
    assert!(
        matches!(&result, RunOutcome::Succeeded { outputs, .. } if outputs.len() == 1 && outputs[0].bytes.starts_with(b"\x89PNG")),
        "{result:?}"
    );
    assert!(
        proxy.history_reads() >= 1,
        "a socket that dropped may have missed events: the end comes from the history"
    );
}

#[tokio::test]
async fn a_run_seen_whole_on_its_socket_needs_no_history_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "1"]).await;
    let proxy = Proxy::start(control.port()).await;
    let client = proxy.client();
    for round in 0..2 {
        let output = run_simple_to_one_output(&client, &control, "whole").await;
        let on_disk = std::fs::read(dir.path().join("output").join(&output.filename))
            .expect("the output file");
        assert_eq!(on_disk, output.bytes.to_vec(), "round {round}");
    }
    // The second round was fully cached: its files came from `executed` events too.
    assert_eq!(proxy.history_reads(), 0);
}

#[tokio::test]
async fn a_skipped_frame_means_the_files_come_from_the_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "1"]).await;
    // Every `executed` frame becomes unreadable JSON on its way to the client.
    let proxy = Proxy::start_rewriting(
        control.port(),
        Rewrite {
            from: br#"{"type": "executed", "data": {"#.to_vec(),
            to: br#"{"type": "executed", "data": ["#.to_vec(),
        },
    )
    .await;
    let client = proxy.client();
    let output = run_simple_to_one_output(&client, &control, "skipped").await;
    assert!(output.filename.starts_with("skipped_"), "{output:?}");
    assert!(output.bytes.starts_with(b"\x89PNG"));
    assert_eq!(proxy.history_reads(), 1);
}

/// Runs [`simple_workflow`] with `prefix` to success and returns its one output (node 3's).
async fn run_simple_to_one_output(
    client: &Arc<ComfyClient>,
    control: &Arc<SimControl>,
    prefix: &str,
) -> OutputFile {
    let (handle, _rx) = spawn_run(
        client.clone(),
        control.clone(),
        simple_workflow(prefix),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    let result = outcome(handle).await;
    let RunOutcome::Succeeded { mut outputs, .. } = result else {
        panic!("expected success, got {result:?}");
    };
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    let output = outputs.remove(0);
    assert_eq!(output.node_id, "3");
    output
}

#[tokio::test]
async fn a_prompt_lost_to_an_unnoticed_restart_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "100"]).await;
    let client = Arc::new(client(control.url()));
    let (handle, mut rx) = spawn_run(
        client.clone(),
        control.clone(),
        sampler_workflow(31, 300),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    wait_event(&mut rx, |e| matches!(e, RunEvent::Progress { .. })).await;
    control.crash_and_respawn().await;
    let result = outcome(handle).await;
    assert!(matches!(result, RunOutcome::Lost { .. }), "{result:?}");
}

#[tokio::test]
async fn a_kept_socket_that_comfyui_closed_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "1"]).await;
    let client = Arc::new(client(control.url()));
    let run = |seed| {
        spawn_run(
            client.clone(),
            control.clone(),
            sampler_workflow(seed, 2),
            opts(RUN_LIMIT, Duration::from_secs(5)),
            CancellationToken::new(),
        )
    };
    let first = outcome(run(51).0).await;
    assert!(matches!(first, RunOutcome::Succeeded { .. }), "{first:?}");
    // ComfyUI restarts unnoticed between runs: the kept socket is closed, and the next run
    // opens a new one, which relays the run's events (a silent socket would relay none, and
    // the run would end on a history poll).
    control.crash_and_respawn().await;
    let (handle, mut rx) = run(52);
    let second = outcome(handle).await;
    assert!(matches!(second, RunOutcome::Succeeded { .. }), "{second:?}");
    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    assert!(events.contains(&RunEvent::Started), "{events:?}");
    assert!(!events.contains(&RunEvent::Reconnecting), "{events:?}");
}

#[tokio::test]
async fn a_generation_change_means_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "100"]).await;
    let client = Arc::new(client(control.url()));
    let (handle, mut rx) = spawn_run(
        client,
        control.clone(),
        sampler_workflow(41, 300),
        opts(RUN_LIMIT, Duration::from_secs(5)),
        CancellationToken::new(),
    );
    wait_event(&mut rx, |e| matches!(e, RunEvent::Progress { .. })).await;
    control.generation.fetch_add(1, Ordering::SeqCst);
    let result = outcome(handle).await;
    assert!(matches!(result, RunOutcome::Lost { .. }), "{result:?}");
}

#[tokio::test]
async fn unreachable_comfyui_and_object_info_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = SimControl::start(dir.path(), &["--step-time-ms", "1"]).await;

    let nobody = client(Url::parse(&format!("http://127.0.0.1:{}", free_port())).expect("url"));
    let err = nobody.queue().await.expect_err("nobody listens");
    assert!(matches!(err, ComfyError::Unreachable { .. }), "{err:?}");
    let err = nobody.connect_events().await.expect_err("nobody listens");
    assert!(matches!(err, ComfyError::Unreachable { .. }), "{err:?}");
    let (tx, _rx) = mpsc::channel(8);
    let outcome = run_prompt(
        &nobody,
        control.as_ref(),
        &simple_workflow("x"),
        None,
        &RunOptions::default(),
        tx,
        CancellationToken::new(),
    )
    .await;
    assert!(
        matches!(outcome, RunOutcome::Failed(ComfyError::Unreachable { .. })),
        "{outcome:?}"
    );

    let client = client(control.url());
    // The same workflow run twice is posted under two prompt ids, which the executor makes
    // itself: ComfyUI keeps two history entries, and both runs succeed.
    let (tx, _rx) = mpsc::channel(64);
    for _ in 0..2 {
        let run = run_prompt(
            &client,
            control.as_ref(),
            &simple_workflow("kiln_again"),
            None,
            &RunOptions::default(),
            tx.clone(),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(run, RunOutcome::Succeeded { .. }), "{run:?}");
    }
    let history: serde_json::Map<String, Value> = reqwest::get(format!("{}history", control.url()))
        .await
        .expect("GET /history")
        .json()
        .await
        .expect("history json");
    assert_eq!(history.len(), 2, "{history:?}");

    assert!(client.cached_object_info().is_none());
    let first = client.object_info().await.expect("object_info");
    let second = client.object_info().await.expect("object_info");
    assert!(
        Arc::ptr_eq(&first, &second),
        "the second call is served from the cache"
    );
    client.invalidate();
    assert!(client.cached_object_info().is_none());
    let third = client.object_info().await.expect("object_info");
    assert!(!Arc::ptr_eq(&first, &third));
    assert_eq!(first.classes.len(), third.classes.len());

    let stats = client.system_stats().await.expect("system_stats");
    assert!(stats["devices"].is_array(), "{stats}");
    client.free(true, true).await.expect("free");
    client.interrupt(None).await.expect("interrupt when idle");
    assert!(client.history(&new_id()).await.expect("history").is_none());
}
