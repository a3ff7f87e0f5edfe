//! Helpers shared by the end-to-end tests in `tests/`: start real `kilnd` processes (with the
//! ComfyUI simulator as their ComfyUI) in their own temp dirs, talk to them over HTTP, kill them.
//!
//! The binaries are found next to the test executable (`target/<profile>/`), because
//! `cargo test --workspace` builds every binary of the workspace before it runs a test.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_daemon::peer::messages::{JobRequest, JobResponse};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary (`kilnd`, `kiln`).
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not built: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// Ports this test process has handed out. A port is bound and released before the process
/// that needs it binds it again, and the OS may hand the same free port to the next caller in
/// between: two nodes of one test (or of two tests running side by side) would then collide.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Records `port` as handed out; false when it already was.
fn claim(port: u16) -> bool {
    HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(port)
}

/// A free TCP port on 127.0.0.1 (bound and released), never one this process handed out before.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if claim(port) {
            return port;
        }
    }
    panic!("no free TCP port that this test process has not handed out already");
}

/// The tiny workflow of the README: EmptyImage → ImageInvert → SaveImage.
pub fn simple_workflow(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 2105376}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
    })
}

/// An SDXL text-to-image workflow; the simulator takes `steps` × its step time to run it.
pub fn sdxl_workflow(steps: u32, seed: u64) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a kiln at dusk", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": 7.0,
              "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "kiln_sdxl"}}
    })
}

/// How to start a test node.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Extra arguments for `kilnd comfy-sim`.
    pub sim_args: Vec<String>,
    /// Extra TOML appended to the generated config (whole sections).
    pub extra_config: String,
    /// `[jobs]` keys (without the header).
    pub jobs: String,
    /// Extra `[cluster]` keys (without the header) for a member of a [`TestCluster`].
    pub cluster: String,
    /// Accounts to create keys for: (account, tier).
    pub accounts: Vec<(String, String)>,
    /// A keys file (and its keys by account) to use instead of making one: the members of a
    /// cluster share their accounts.
    pub shared_keys: Option<SharedKeys>,
}

/// A keys file written once and used by several nodes.
#[derive(Debug, Clone)]
pub struct SharedKeys {
    pub file: PathBuf,
    pub keys: std::collections::HashMap<String, String>,
}

impl SharedKeys {
    /// Writes a keys file in `dir` with a key for each (account, tier).
    pub fn create(dir: &Path, accounts: &[(String, String)]) -> anyhow::Result<SharedKeys> {
        let file = dir.join("keys.toml");
        let mut keys = std::collections::HashMap::new();
        for (account, tier) in accounts {
            let tier = tier.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            keys.insert(
                account.clone(),
                kiln_daemon::tiers::add_key(&file, account, tier)?,
            );
        }
        Ok(SharedKeys { file, keys })
    }
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            sim_args: Vec::new(),
            extra_config: String::new(),
            jobs: String::new(),
            cluster: String::new(),
            accounts: vec![
                ("alice".into(), "pro".into()),
                ("bob".into(), "pro".into()),
                ("fred".into(), "free".into()),
                ("pat".into(), "premium".into()),
                ("erin".into(), "enterprise".into()),
            ],
            shared_keys: None,
        }
    }
}

/// A running `kilnd --config` process with its own data dir, keys file and simulator.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub api_port: u16,
    pub comfy_port: u16,
    pub keys: std::collections::HashMap<String, String>,
    pub operator_token: String,
    config_path: PathBuf,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Node {
    /// Writes the config and keys, starts kilnd and waits until `/readyz` says ready.
    pub async fn start(spec: NodeSpec) -> anyhow::Result<Node> {
        let node = Node::launch(spec)?;
        node.wait_ready(Duration::from_secs(60)).await?;
        Ok(node)
    }

    /// Writes the config and keys and starts kilnd without waiting for it.
    pub fn launch(spec: NodeSpec) -> anyhow::Result<Node> {
        let dir = tempfile::Builder::new().prefix("kiln-e2e-").tempdir()?;
        let api_port = free_port();
        let comfy_port = free_port();
        let SharedKeys {
            file: keys_file,
            keys,
        } = match &spec.shared_keys {
            Some(shared) => shared.clone(),
            None => SharedKeys::create(dir.path(), &spec.accounts)?,
        };
        let operator_token = "operator-token-for-tests-0123456789".to_string();
        let mut command = vec![
            bin("kilnd").to_string_lossy().into_owned(),
            "comfy-sim".to_string(),
            "--port".to_string(),
            comfy_port.to_string(),
            "--base-dir".to_string(),
            dir.path().join("comfy").to_string_lossy().into_owned(),
            "--executed-log".to_string(),
            dir.path()
                .join("executed.jsonl")
                .to_string_lossy()
                .into_owned(),
        ];
        // Fast by default; a flag the spec gives itself replaces the default.
        for (flag, value) in [
            ("--startup-delay-ms", "200"),
            ("--step-time-ms", "20"),
            ("--model-load-ms", "0"),
            ("--vae-time-ms", "0"),
        ] {
            if !spec.sim_args.iter().any(|a| a == flag) {
                command.push(flag.to_string());
                command.push(value.to_string());
            }
        }
        command.extend(spec.sim_args.iter().cloned());
        let command_toml = command
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"[node]
name = "e2e"
data_dir = {data:?}

[api]
listen = "127.0.0.1:{api_port}"
keys_file = {keys:?}
operator_token = "{operator_token}"
max_body_bytes = 65536

[comfy]
command = [{command_toml}]
url = "http://127.0.0.1:{comfy_port}"
start_timeout_s = 30

[jobs]
interrupt_grace_s = 2
drain_timeout_s = 5
{jobs}

{extra}
"#,
            data = dir.path().join("data").to_string_lossy(),
            keys = keys_file.to_string_lossy(),
            jobs = spec.jobs,
            extra = spec.extra_config,
        );
        let config_path = dir.path().join("kilnd.toml");
        std::fs::write(&config_path, config)?;
        let log_path = dir.path().join("kilnd.log");
        let mut node = Node {
            url: format!("http://127.0.0.1:{api_port}"),
            api_port,
            comfy_port,
            keys,
            operator_token,
            config_path,
            child: None,
            log_path,
            dir,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(bin("kilnd"))
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("spawning kilnd")?;
        self.child = Some(child);
        Ok(())
    }

    /// Starts kilnd again on the same config and data (after `kill9` or `stop`).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(Duration::from_secs(60)).await
    }

    pub fn key(&self, account: &str) -> &str {
        self.keys
            .get(account)
            .map(String::as_str)
            .expect("known account")
    }

    /// The kilnd log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Prompts the simulator has executed (its `--executed-log`).
    pub fn executed(&self) -> Vec<Value> {
        let Ok(file) = std::fs::File::open(self.dir.path().join("executed.jsonl")) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect()
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = client.get(format!("{}/readyz", self.url)).send().await
                && response.status() == 200
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kilnd not ready after {timeout:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL to kilnd and to its whole process group (the simulator included), as a crash
    /// of the host process would do.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Waits (blocking) for kilnd to exit by itself; kills it after `timeout`. Returns its exit
    /// status, or `None` when it had to be killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to kilnd and wait for it to exit; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGSTOP to kilnd alone (its simulator runs on): it holds its sockets and answers
    /// nothing until [`Node::resume`], as a member stalled by its host would.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// SIGCONT to kilnd after [`Node::pause`].
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Whether this process was started and not killed or stopped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `GET /v1/cluster` with the operator token.
    /// The value of the Prometheus sample `name` (with its labels, e.g.
    /// `kiln_peer_outputs_sent_total{how="inline"}`) at `/metrics`; 0 when absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await?
            .error_for_status()?
            .text()
            .await?;
        for line in text.lines() {
            if let Some(value) = line.strip_prefix(name).and_then(|r| r.strip_prefix(' ')) {
                return Ok(value.trim().parse()?);
            }
        }
        Ok(0.0)
    }

    pub async fn cluster_view(&self) -> anyhow::Result<Value> {
        let response = reqwest::Client::new()
            .get(format!("{}/v1/cluster", self.url))
            .bearer_auth(&self.operator_token)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        Ok(response.json().await?)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A small API client for tests.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(node: &Node, account: &str) -> Api {
        Api {
            url: node.url.clone(),
            key: node.key(account).to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    pub async fn submit(&self, workflow: &Value) -> anyhow::Result<(u16, Value)> {
        self.post_job(workflow, None).await
    }

    /// A submission with an `Idempotency-Key` header.
    pub async fn submit_keyed(&self, workflow: &Value, key: &str) -> anyhow::Result<(u16, Value)> {
        self.post_job(workflow, Some(key)).await
    }

    async fn post_job(&self, workflow: &Value, key: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(format!("{}/v1/jobs", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"workflow": workflow}));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// GET of output `index` of job `id`: (status, body bytes).
    pub async fn output(&self, id: &str, index: u32) -> anyhow::Result<(u16, Vec<u8>)> {
        let response = self
            .http
            .get(format!("{}/v1/jobs/{id}/outputs/{index}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.bytes().await?.to_vec()))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<Value> {
        let (status, body) = self.get(&format!("/v1/jobs/{id}")).await?;
        if status != 200 {
            bail!("GET job {id}: {status} {body}");
        }
        Ok(body)
    }

    /// Waits until the job is in a final status and returns it.
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_status(id, timeout, |s| {
            matches!(s, "succeeded" | "failed" | "cancelled")
        })
        .await
    }

    pub async fn wait_status(
        &self,
        id: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.job(id).await?;
            if want(job["status"].as_str().unwrap_or("")) {
                return Ok(job);
            }
            if Instant::now() > deadline {
                bail!("job {id} still {} after {timeout:?}", job["status"]);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A port free for both UDP and TCP on 127.0.0.1 (gossip uses the same number for both).
pub fn free_gossip_port() -> u16 {
    for _ in 0..200 {
        let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", 0)) else {
            continue;
        };
        let Ok(port) = udp.local_addr().map(|a| a.port()) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && claim(port) {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// Runs `kiln ARGS --config CONFIG --json`, requires success, returns its JSON.
pub fn kiln_json(args: &[&str], config: &Path) -> anyhow::Result<Value> {
    let config = config.to_string_lossy();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", &config, "--json"]);
    let output = kiln(&all);
    if !output.status.success() {
        bail!(
            "kiln {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("kiln {} printed no JSON", args.join(" ")))
}

/// Runs `kiln` with `args` and waits for it.
pub fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(bin("kiln"))
        .args(args)
        .output()
        .expect("kiln runs")
}

/// `kiln certs init` of a CA for cluster `cluster` in `dir`.
pub fn init_ca(dir: &Path, cluster: &str) {
    let init = kiln(&[
        "certs",
        "init",
        &dir.to_string_lossy(),
        "--cluster",
        cluster,
    ]);
    assert!(
        init.status.success(),
        "kiln certs init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// `kiln certs issue` of a member certificate named `name` into `out/name`.
pub fn issue(ca: &Path, name: &str, out: &Path) -> PathBuf {
    let dir = out.join(name);
    let output = kiln(&[
        "certs",
        "issue",
        "--ca",
        &ca.to_string_lossy(),
        name,
        "--out",
        &dir.to_string_lossy(),
    ]);
    assert!(
        output.status.success(),
        "kiln certs issue {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// The `[cluster]` section of a test member.
pub fn cluster_config(certs: &Path, port: u16, transports: &str, seeds: &[String]) -> String {
    let seeds = seeds
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"[cluster]
certs_dir = {certs:?}
listen = "127.0.0.1:{port}"
transports = {transports}
seeds = [{seeds}]
gossip_interval_ms = 200
dead_grace_s = 600
provider = "local"
price_per_hour = 0.4
"#,
        certs = certs.to_string_lossy(),
    )
}

/// Several kilnd processes forming one cluster over QUIC on loopback, sharing their accounts.
pub struct TestCluster {
    pub nodes: Vec<Node>,
    pub names: Vec<String>,
    /// Each member's cluster (QUIC) port on 127.0.0.1.
    pub ports: Vec<u16>,
    pub keys: SharedKeys,
    pub pki: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `n` members named `gpu-0`… (the first is everyone's seed) and waits until each
    /// is ready and sees all of them ready. `spec` gives each node's settings (its cluster
    /// section is added); the accounts of the first are everyone's.
    pub async fn start(n: usize, spec: impl Fn(usize) -> NodeSpec) -> anyhow::Result<TestCluster> {
        let pki = tempfile::Builder::new().prefix("kiln-e2e-pki-").tempdir()?;
        let ca = pki.path().join("ca");
        init_ca(&ca, "e2e");
        let keys = SharedKeys::create(pki.path(), &spec(0).accounts)?;
        let names: Vec<String> = (0..n).map(|i| format!("gpu-{i}")).collect();
        let ports: Vec<u16> = (0..n).map(|_| free_gossip_port()).collect();
        let seed = format!("quic://127.0.0.1:{}", ports[0]);
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let certs = issue(&ca, name, pki.path());
            let seeds = if i == 0 {
                Vec::new()
            } else {
                vec![seed.clone()]
            };
            let mut node_spec = spec(i);
            node_spec.extra_config.push_str(&cluster_config(
                &certs,
                ports[i],
                r#"["quic"]"#,
                &seeds,
            ));
            node_spec.extra_config.push_str(&node_spec.cluster.clone());
            node_spec.extra_config.push('\n');
            node_spec.shared_keys = Some(keys.clone());
            nodes.push(Node::launch(node_spec)?);
        }
        let cluster = TestCluster {
            nodes,
            names,
            ports,
            keys,
            pki,
        };
        for node in &cluster.nodes {
            node.wait_ready(Duration::from_secs(60)).await?;
        }
        cluster.wait_all_ready(Duration::from_secs(45)).await?;
        Ok(cluster)
    }

    /// Waits until every live node's view shows every member live and ready or busy.
    pub async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let live: Vec<&Node> = self.nodes.iter().filter(|n| n.is_running()).collect();
        loop {
            let mut all = true;
            for node in &live {
                let view = node.cluster_view().await.unwrap_or(Value::Null);
                let ready = view["members"]
                    .as_array()
                    .map(|members| {
                        members
                            .iter()
                            .filter(|m| m["live"] == Value::Bool(true))
                            .filter(|m| matches!(m["state"].as_str(), Some("ready" | "busy")))
                            .count()
                    })
                    .unwrap_or(0);
                all &= ready == live.len();
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster did not become ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An API client of `account` on node `i`.
    pub fn api(&self, i: usize, account: &str) -> Api {
        Api::new(&self.nodes[i], account)
    }

    /// A peer-protocol client named `name` with a certificate from the cluster's CA.
    pub async fn probe(&self, name: &str) -> anyhow::Result<PeerProbe> {
        self.probe_answering(name, AnswersNothing).await
    }

    /// A probe as [`TestCluster::probe`] that answers members' requests with `handler`.
    pub async fn probe_answering(
        &self,
        name: &str,
        handler: impl kiln_daemon::peer::Handler<JobRequest, JobResponse>,
    ) -> anyhow::Result<PeerProbe> {
        let certs = issue(&self.pki.path().join("ca"), name, self.pki.path());
        let identity = kiln_daemon::pki::Identity::load_dir(&certs)?;
        let endpoint = kiln_daemon::net::Endpoint::bind(
            &identity,
            kiln_daemon::net::NetConfig {
                quic_listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
                ..kiln_daemon::net::NetConfig::default()
            },
        )
        .await?;
        let rpc = kiln_daemon::peer::PeerRpc::start(
            endpoint,
            handler,
            kiln_daemon::peer::RpcConfig::default(),
        )?;
        Ok(PeerProbe {
            rpc,
            ports: self.ports.clone(),
        })
    }

    /// Which node owns `account`'s new jobs while all members are ready.
    pub fn owner_of(&self, account: &str) -> usize {
        let ranked = kiln_daemon::peer::placement::rank(account, &self.names);
        self.names
            .iter()
            .position(|n| n == ranked[0])
            .expect("owner is a member")
    }
}

/// Asks cluster members what a member would ([`TestCluster::probe`]); it joins no gossip and
/// answers requests only as its handler does.
pub struct PeerProbe {
    rpc: kiln_daemon::peer::PeerRpc<JobRequest, JobResponse>,
    ports: Vec<u16>,
}

impl PeerProbe {
    /// Sends `request` to member `i` and waits up to 5 s for its answer.
    pub async fn ask(&self, i: usize, request: JobRequest) -> anyhow::Result<JobResponse> {
        let to = std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[i]));
        Ok(self
            .rpc
            .request(to, request, Duration::from_secs(5))
            .await?)
    }
}

struct AnswersNothing;

#[async_trait::async_trait]
impl kiln_daemon::peer::Handler<JobRequest, JobResponse> for AnswersNothing {
    async fn handle(
        &self,
        _: &kiln_daemon::peer::Caller,
        _: JobRequest,
    ) -> Result<JobResponse, kiln_daemon::peer::PeerError> {
        Err(kiln_daemon::peer::PeerError::internal(
            "a test probe answers nothing",
        ))
    }
}
