//! The `local` provider: "renting" a host starts a `kilnd` process on this machine, with
//! `kilnd comfy-sim` as its ComfyUI, so the whole fleet logic runs with no cloud account.
//!
//! Each node lives in its own folder `<base_dir>/<name>/`:
//!
//! - `node.json` — its ports, price and creation time (written last: a folder without it is a
//!   rent that did not finish, and the next rent under the same name completes it);
//! - `kilnd.toml` — its config; `certs/` — its member certificate, issued from the cluster CA;
//! - `data/`, `comfy/` — its job store and the simulator's files;
//! - `kilnd.pid`, `kilnd.log` — the running process and its output.
//!
//! The process is detached: its own process group, stdin closed, output to the log file, so it
//! outlives the `kiln` call that started it and a Ctrl-C in that terminal does not reach it.
//! Whether a node runs is read from the pid file *and* the process: a pid whose command line
//! does not name this node's config is not this node (pids get reused). Stop is SIGTERM (kilnd
//! drains and stops its ComfyUI), a bounded wait, then SIGKILL to the process group; the folder
//! is kept (WARM). Start runs the same config again after the configured resume delay. Destroy
//! stops the node and deletes its folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Address, Host, HostStatus, Mapped, Offer, OfferQuery, PortSpec, Protocol, Provider,
    ProviderError, ProviderKind, ProviderResult, RentRequest,
};
use crate::config::LocalSection;

/// The one offer id the local provider has.
pub const OFFER_ID: &str = "local";

const META_FILE: &str = "node.json";
const CONFIG_FILE: &str = "kilnd.toml";
const PID_FILE: &str = "kilnd.pid";
const LOG_FILE: &str = "kilnd.log";

/// What a node folder records about its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub name: String,
    pub api_port: u16,
    pub gossip_port: u16,
    pub comfy_port: u16,
    pub price_per_hour: f64,
    pub spot: bool,
}

/// `kilnd` processes on this machine as a [`Provider`].
pub struct LocalProvider {
    section: LocalSection,
    kilnd: PathBuf,
    /// Processes this provider started, so that they are reaped when they exit (a zombie would
    /// still answer `kill(pid, 0)`).
    children: Mutex<HashMap<String, Child>>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("base_dir", &self.section.base_dir)
            .field("kilnd", &self.kilnd)
            .finish_non_exhaustive()
    }
}

fn err(message: impl Into<String>) -> ProviderError {
    ProviderError::Invalid {
        provider: ProviderKind::Local,
        message: message.into(),
    }
}

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Transient {
        provider: ProviderKind::Local,
        message: format!("{what} {}: {e}", path.display()),
    }
}

fn not_found(id: &str) -> ProviderError {
    ProviderError::NotFound {
        provider: ProviderKind::Local,
        what: format!("node {id}"),
    }
}

impl LocalProvider {
    /// A provider over `section`; `kilnd` is the binary to run.
    pub fn new(section: LocalSection, kilnd: PathBuf) -> LocalProvider {
        LocalProvider {
            section,
            kilnd,
            children: Mutex::new(HashMap::new()),
        }
    }

    /// The folder of node `name` (the name is checked first: it becomes a path).
    pub fn node_dir(&self, name: &str) -> ProviderResult<PathBuf> {
        kiln_daemon::pki::validate_name(name)
            .map_err(|e| err(format!("node name `{name}`: {e}")))?;
        Ok(self.section.base_dir.join(name))
    }

    fn read_meta(&self, dir: &Path) -> ProviderResult<Option<NodeMeta>> {
        let path = dir.join(META_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| err(format!("{}: not a node record: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("cannot read", &path, e)),
        }
    }

    /// The pid of the node's kilnd when it runs.
    fn running_pid(&self, name: &str, dir: &Path) -> Option<i32> {
        // Our own child is asked directly (right after spawn its command line may still be
        // ours, before exec); an exited one is reaped, or it would linger as a zombie.
        if let Ok(mut children) = self.children.lock()
            && let Some(child) = children.get_mut(name)
        {
            if matches!(child.try_wait(), Ok(None)) {
                return i32::try_from(child.id()).ok();
            }
            children.remove(name);
        }
        let pid: i32 = std::fs::read_to_string(dir.join(PID_FILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if pid <= 0 {
            return None;
        }
        process_runs(pid, &dir.join(CONFIG_FILE)).then_some(pid)
    }

    fn host(&self, meta: &NodeMeta, dir: &Path) -> Host {
        let (status, words) = match self.running_pid(&meta.name, dir) {
            Some(pid) => (HostStatus::Running, format!("running (pid {pid})")),
            None if dir.join(PID_FILE).exists() => (
                HostStatus::Failed("kilnd exited without being stopped".into()),
                "exited".to_string(),
            ),
            None => (HostStatus::Stopped, "stopped".to_string()),
        };
        let mapped = |port: u16| Mapped {
            host: "127.0.0.1".into(),
            port,
        };
        let mut address = Address {
            public_ip: Some("127.0.0.1".into()),
            ..Address::default()
        };
        for (port, protocol) in [
            (meta.api_port, Protocol::Tcp),
            (meta.gossip_port, Protocol::Udp),
        ] {
            address
                .ports
                .insert(PortSpec { port, protocol }, mapped(port));
        }
        Host {
            provider: ProviderKind::Local,
            id: meta.name.clone(),
            label: Some(meta.name.clone()),
            status,
            provider_status: words,
            gpus: 1,
            price_per_hour: Some(meta.price_per_hour),
            spot: meta.spot,
            address,
        }
    }

    /// Ports of the range not recorded by another node folder and free now: three for one node.
    fn allocate_ports(&self) -> ProviderResult<(u16, u16, u16)> {
        let mut taken = std::collections::HashSet::new();
        if let Ok(entries) = std::fs::read_dir(&self.section.base_dir) {
            for entry in entries.flatten() {
                if let Ok(Some(meta)) = self.read_meta(&entry.path()) {
                    taken.extend([meta.api_port, meta.gossip_port, meta.comfy_port]);
                }
            }
        }
        let mut chosen = Vec::with_capacity(3);
        for port in self.section.ports.first..=self.section.ports.last {
            if taken.contains(&port) {
                continue;
            }
            let tcp_free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
            // The gossip port (the second one) needs UDP (QUIC) free too.
            let udp_free =
                chosen.len() != 1 || std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
            if tcp_free && udp_free {
                chosen.push(port);
                if chosen.len() == 3 {
                    return Ok((chosen[0], chosen[1], chosen[2]));
                }
            }
        }
        Err(ProviderError::NoCapacity {
            provider: ProviderKind::Local,
            message: format!(
                "no 3 free ports left in providers.local.ports {}..={}",
                self.section.ports.first, self.section.ports.last
            ),
        })
    }

    /// The node's `kilnd.toml`.
    fn node_config(&self, meta: &NodeMeta, dir: &Path) -> String {
        let q = |p: &Path| toml_string(&p.to_string_lossy());
        let mut comfy = vec![
            self.kilnd.to_string_lossy().into_owned(),
            "comfy-sim".into(),
            "--port".into(),
            meta.comfy_port.to_string(),
            "--base-dir".into(),
            dir.join("comfy").to_string_lossy().into_owned(),
        ];
        comfy.extend(self.section.sim_args.iter().cloned());
        let list = |items: &[String]| {
            items
                .iter()
                .map(|s| toml_string(s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let token = match &self.section.operator_token_file {
            Some(path) => format!("operator_token_file = {}\n", q(path)),
            None => String::new(),
        };
        // A seed for the simulated GPU's noise, different per node name.
        let sim_seed = meta
            .name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        format!(
            "# Written by `kiln rent --provider local`.\n\
             [node]\nname = {name}\ndata_dir = {data}\n\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\nkeys_file = {keys}\n{token}\n\
             [comfy]\ncommand = [{comfy}]\nurl = \"http://127.0.0.1:{comfy_port}\"\n\
             start_timeout_s = 60\n\n\
             [jobs]\ndrain_timeout_s = {drain}\n\n\
             [gpu]\nsource = \"sim\"\nsim_seed = {sim_seed}\n\n\
             [cluster]\ncerts_dir = {certs}\nlisten = \"127.0.0.1:{gossip}\"\n\
             transports = [\"quic\"]\nseeds = [{seeds}]\ngossip_interval_ms = {interval}\n\
             provider = \"local\"\ninstance_id = {name}\nprice_per_hour = {price}\n",
            name = toml_string(&meta.name),
            data = q(&dir.join("data")),
            api = meta.api_port,
            keys = q(&self.section.keys_file),
            comfy = list(&comfy),
            comfy_port = meta.comfy_port,
            // kilnd's own drain must end well inside our stop timeout.
            drain = (self.section.stop_timeout_s / 2).max(1),
            certs = q(&dir.join("certs")),
            gossip = meta.gossip_port,
            seeds = list(&self.section.seeds),
            interval = self.section.gossip_interval_ms,
            price = meta.price_per_hour,
        )
    }

    /// Starts the node's kilnd, detached, and records its pid.
    fn spawn(&self, name: &str, dir: &Path) -> ProviderResult<()> {
        use std::os::unix::process::CommandExt;

        let log_path = dir.join(LOG_FILE);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_err("cannot open", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_err("cannot open", &log_path, e))?;
        let child = Command::new(&self.kilnd)
            .arg("--config")
            .arg(dir.join(CONFIG_FILE))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| io_err("cannot start", &self.kilnd, e))?;
        let pid_path = dir.join(PID_FILE);
        std::fs::write(&pid_path, format!("{}\n", child.id()))
            .map_err(|e| io_err("cannot write", &pid_path, e))?;
        if let Ok(mut children) = self.children.lock() {
            children.insert(name.to_string(), child);
        }
        Ok(())
    }

    /// SIGTERM, wait up to the stop timeout, then SIGKILL to the process group. Removes the pid
    /// file once the process is gone.
    async fn stop_process(&self, name: &str, dir: &Path) -> ProviderResult<()> {
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;

        if let Some(pid) = self.running_pid(name, dir) {
            let pid = Pid::from_raw(pid);
            let _ = kill(pid, Signal::SIGTERM);
            let timeout = Duration::from_secs(self.section.stop_timeout_s);
            if !self.wait_gone(name, dir, timeout).await {
                let _ = killpg(pid, Signal::SIGKILL);
                if !self.wait_gone(name, dir, Duration::from_secs(10)).await {
                    return Err(ProviderError::Transient {
                        provider: ProviderKind::Local,
                        message: format!("node {name}: kilnd (pid {pid}) survived SIGKILL"),
                    });
                }
            }
        }
        let pid_path = dir.join(PID_FILE);
        match std::fs::remove_file(&pid_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove", &pid_path, e)),
        }
    }

    /// Polls until the node's process is gone or `timeout` passed; true when gone.
    async fn wait_gone(&self, name: &str, dir: &Path, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.running_pid(name, dir).is_none() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn existing(&self, id: &str) -> ProviderResult<(PathBuf, NodeMeta)> {
        let dir = self.node_dir(id)?;
        match self.read_meta(&dir)? {
            Some(meta) => Ok((dir, meta)),
            None => Err(not_found(id)),
        }
    }
}

/// Whether `pid` is a live process whose command line names `config` (so not a zombie, and not
/// another program that got the pid later).
fn process_runs(pid: i32, config: &Path) -> bool {
    let proc_dir = Path::new("/proc");
    if proc_dir.is_dir() {
        let Ok(cmdline) = std::fs::read(proc_dir.join(pid.to_string()).join("cmdline")) else {
            return false;
        };
        let want = config.to_string_lossy();
        cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg) == want)
    } else {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    }
}

/// A TOML basic string (JSON string escaping is valid TOML).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

#[async_trait]
impl Provider for LocalProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        if self.section.price_per_hour > query.max_price_per_hour {
            return Ok(Vec::new());
        }
        Ok(vec![Offer {
            provider: ProviderKind::Local,
            offer_id: OFFER_ID.into(),
            gpu_name: "RTX 4090 (simulated)".into(),
            num_gpus: 1,
            price_per_hour: self.section.price_per_hour,
            storage_per_gb_month: None,
            reliability: Some(1.0),
            location: Some("localhost".into()),
            spot: query.spot,
        }])
    }

    async fn rent(&self, request: &RentRequest) -> ProviderResult<Host> {
        if request.offer_id != OFFER_ID {
            return Err(ProviderError::OfferGone {
                provider: ProviderKind::Local,
                offer_id: request.offer_id.clone(),
            });
        }
        let name = &request.label;
        let dir = self.node_dir(name)?;
        if let Some(meta) = self.read_meta(&dir)? {
            // Rented before under this label: the same host, not a second one.
            return Ok(self.host(&meta, &dir));
        }
        if !self.kilnd.is_file() {
            return Err(err(format!(
                "providers.local.kilnd: {} is not a file",
                self.kilnd.display()
            )));
        }
        if !self.section.keys_file.is_file() {
            return Err(err(format!(
                "providers.local.keys_file: {} does not exist (make it with `kiln keys add`)",
                self.section.keys_file.display()
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
        let certs = dir.join("certs");
        if !certs.join(kiln_daemon::pki::KEY_FILE).exists() {
            kiln_daemon::pki::issue(
                &self.section.ca_dir,
                name,
                &certs,
                kiln_daemon::pki::DEFAULT_CERT_DAYS,
            )
            .map_err(|e| err(format!("issuing the certificate of {name}: {e}")))?;
        }
        let (api_port, gossip_port, comfy_port) = self.allocate_ports()?;
        let meta = NodeMeta {
            name: name.clone(),
            api_port,
            gossip_port,
            comfy_port,
            price_per_hour: self.section.price_per_hour,
            spot: request.bid_per_hour.is_some(),
        };
        let config_path = dir.join(CONFIG_FILE);
        std::fs::write(&config_path, self.node_config(&meta, &dir))
            .map_err(|e| io_err("cannot write", &config_path, e))?;
        let meta_path = dir.join(META_FILE);
        let meta_json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| err(format!("cannot encode the node record: {e}")))?;
        std::fs::write(&meta_path, meta_json).map_err(|e| io_err("cannot write", &meta_path, e))?;
        self.spawn(name, &dir)?;
        Ok(self.host(&meta, &dir))
    }

    async fn list(&self) -> ProviderResult<Vec<Host>> {
        let entries = match std::fs::read_dir(&self.section.base_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot read", &self.section.base_dir, e)),
        };
        let mut hosts = Vec::new();
        for entry in entries.flatten() {
            let dir = entry.path();
            if let Ok(Some(meta)) = self.read_meta(&dir) {
                hosts.push(self.host(&meta, &dir));
            }
        }
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(hosts)
    }

    async fn get(&self, id: &str) -> ProviderResult<Host> {
        let (dir, meta) = self.existing(id)?;
        Ok(self.host(&meta, &dir))
    }

    async fn stop(&self, id: &str) -> ProviderResult<()> {
        let (dir, _) = self.existing(id)?;
        self.stop_process(id, &dir).await
    }

    async fn start(&self, id: &str) -> ProviderResult<()> {
        let (dir, _) = self.existing(id)?;
        if self.running_pid(id, &dir).is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(self.section.resume_delay_ms)).await;
        self.spawn(id, &dir)
    }

    async fn destroy(&self, id: &str) -> ProviderResult<()> {
        let dir = self.node_dir(id)?;
        if !dir.exists() {
            return Ok(());
        }
        self.stop_process(id, &dir).await?;
        if let Ok(mut children) = self.children.lock() {
            children.remove(id);
        }
        std::fs::remove_dir_all(&dir).map_err(|e| io_err("cannot delete", &dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortRange;

    fn section(dir: &Path) -> LocalSection {
        LocalSection {
            kilnd: None,
            base_dir: dir.join("nodes"),
            ca_dir: dir.join("ca"),
            seeds: vec!["quic://127.0.0.1:7946".into()],
            ports: PortRange {
                first: 42_000,
                last: 42_010,
            },
            keys_file: dir.join("keys.toml"),
            operator_token_file: Some(dir.join("token")),
            resume_delay_ms: 0,
            stop_timeout_s: 5,
            gossip_interval_ms: 200,
            sim_args: vec!["--step-time-ms".into(), "20".into()],
            price_per_hour: 0.4,
            stopped_price_per_hour: 0.0,
        }
    }

    fn request(label: &str, offer_id: &str) -> RentRequest {
        RentRequest {
            label: label.into(),
            offer_id: offer_id.into(),
            image: None,
            template: None,
            onstart: None,
            env: Default::default(),
            ports: Vec::new(),
            disk_gb: 0,
            bid_per_hour: None,
        }
    }

    fn query(max: f64) -> OfferQuery {
        OfferQuery {
            gpu: String::new(),
            num_gpus: 1,
            disk_gb: 0,
            min_reliability: 0.0,
            max_price_per_hour: max,
            spot: false,
        }
    }

    #[tokio::test]
    async fn one_offer_at_the_configured_price() {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = LocalProvider::new(section(dir.path()), PathBuf::from("/bin/false"));
        let offers = provider.offers(&query(1.0)).await.expect("offers");
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].offer_id, OFFER_ID);
        assert_eq!(offers[0].price_per_hour, 0.4);
        assert!(
            provider
                .offers(&query(0.1))
                .await
                .expect("offers")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn bad_rents_are_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = LocalProvider::new(section(dir.path()), PathBuf::from("/bin/false"));
        let err = provider
            .rent(&request("gpu-1", "offer-7"))
            .await
            .expect_err("unknown offer");
        assert!(matches!(err, ProviderError::OfferGone { .. }), "{err}");
        let err = provider
            .rent(&request("../escape", OFFER_ID))
            .await
            .expect_err("bad name");
        assert!(err.to_string().contains("../escape"), "{err}");
        // /bin/false exists, but the keys file does not.
        let err = provider
            .rent(&request("gpu-1", OFFER_ID))
            .await
            .expect_err("no keys file");
        assert!(err.to_string().contains("keys_file"), "{err}");
        assert!(!dir.path().join("nodes").exists());
        let err = LocalProvider::new(section(dir.path()), dir.path().join("no-kilnd"))
            .rent(&request("gpu-1", OFFER_ID))
            .await
            .expect_err("no kilnd");
        assert!(err.to_string().contains("providers.local.kilnd"), "{err}");
    }

    #[tokio::test]
    async fn unknown_nodes_are_not_found_and_destroying_them_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = LocalProvider::new(section(dir.path()), PathBuf::from("/bin/false"));
        assert!(provider.list().await.expect("list").is_empty());
        let err = provider.get("gpu-9").await.expect_err("unknown");
        assert!(matches!(err, ProviderError::NotFound { .. }), "{err}");
        assert!(matches!(
            provider.stop("gpu-9").await,
            Err(ProviderError::NotFound { .. })
        ));
        assert!(matches!(
            provider.start("gpu-9").await,
            Err(ProviderError::NotFound { .. })
        ));
        provider.destroy("gpu-9").await.expect("already gone");
    }

    #[test]
    fn the_node_config_is_a_valid_kilnd_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let provider = LocalProvider::new(section(dir.path()), PathBuf::from("/opt/kiln/kilnd"));
        let meta = NodeMeta {
            name: "gpu-1".into(),
            api_port: 42_000,
            gossip_port: 42_001,
            comfy_port: 42_002,
            price_per_hour: 0.4,
            spot: false,
        };
        let node_dir = dir.path().join("nodes").join("gpu-1");
        let text = provider.node_config(&meta, &node_dir);
        let config = kiln_daemon::config::Config::parse(&text).expect("kilnd accepts it");
        assert_eq!(config.node.name.as_deref(), Some("gpu-1"));
        assert_eq!(config.api.listen.port(), 42_000);
        assert_eq!(config.cluster.listen.port(), 42_001);
        assert_eq!(
            config.cluster.seeds,
            vec!["quic://127.0.0.1:7946".to_string()]
        );
        assert_eq!(config.cluster.provider.as_deref(), Some("local"));
        assert_eq!(config.comfy.command[0], "/opt/kiln/kilnd");
        assert_eq!(config.comfy.command[1], "comfy-sim");
        assert!(config.comfy.command.contains(&"--step-time-ms".to_string()));
        assert_eq!(config.comfy.url.port(), Some(42_002));
    }
}
