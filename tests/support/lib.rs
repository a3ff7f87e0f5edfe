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

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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
    /// Accounts to create keys for: (account, tier).
    pub accounts: Vec<(String, String)>,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            sim_args: Vec::new(),
            extra_config: String::new(),
            jobs: String::new(),
            accounts: vec![
                ("alice".into(), "pro".into()),
                ("bob".into(), "pro".into()),
                ("fred".into(), "free".into()),
                ("pat".into(), "premium".into()),
                ("erin".into(), "enterprise".into()),
            ],
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
        let keys_file = dir.path().join("keys.toml");
        let mut keys = std::collections::HashMap::new();
        for (account, tier) in &spec.accounts {
            let tier = tier.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let key = kiln_daemon::tiers::add_key(&keys_file, account, tier)?;
            keys.insert(account.clone(), key);
        }
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
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.url))
            .bearer_auth(&self.key)
            .json(&json!({"workflow": workflow}))
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
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
