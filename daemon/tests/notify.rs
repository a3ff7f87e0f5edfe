//! kilnd's systemd notifications, seen from a fake service manager: a unix datagram socket bound
//! by the test as `NOTIFY_SOCKET`, and a real `kilnd --config` process whose ComfyUI is the
//! simulator. READY=1 comes once the API answers, STATUS= lines follow ComfyUI's start and the
//! drain, WATCHDOG=1 repeats at half of WATCHDOG_USEC, STOPPING=1 comes on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const START_LIMIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The fake service manager: every datagram received, in order, from a reader thread.
struct Manager {
    path: PathBuf,
    messages: mpsc::Receiver<String>,
    seen: Vec<String>,
    stop: Arc<AtomicBool>,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let (tx, messages) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // Bounded: the test stops it, and it gives up after five minutes regardless.
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf)
                    && tx
                        .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                        .is_err()
                {
                    break;
                }
            }
        });
        Manager {
            path,
            messages,
            seen: Vec::new(),
            stop,
        }
    }

    /// Waits for a message for which `want` holds; returns it. Everything received is kept.
    fn wait_for(&mut self, what: &str, limit: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        if let Some(found) = self.seen.iter().find(|m| want(m)) {
            return found.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(message) => {
                    self.seen.push(message.clone());
                    if want(&message) {
                        return message;
                    }
                }
                Err(_) => panic!(
                    "no {what} within {limit:?}; received so far: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Takes what arrived in the next `span` (a negative check needs a window).
    fn collect_for(&mut self, span: Duration) -> Vec<String> {
        let deadline = Instant::now() + span;
        let mut got = Vec::new();
        while let Ok(message) = self
            .messages
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(message.clone());
            got.push(message);
        }
        got
    }

    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|m| m.lines().any(|l| l == line))
            .count()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Kilnd {
    child: Child,
    api: String,
    log: PathBuf,
}

impl Kilnd {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kilnd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `kilnd --config` with the simulator and `env` added to its environment.
fn start_kilnd(dir: &Path, env: &[(&str, String)]) -> Kilnd {
    let kilnd = env!("CARGO_BIN_EXE_kilnd");
    let api_port = free_port();
    let comfy_port = free_port();
    let keys = dir.join("keys.toml");
    kiln_daemon::tiers::add_key(&keys, "alice", kiln_daemon::protocol::Tier::Pro)
        .expect("keys file");
    let command = [
        kilnd.to_string(),
        "comfy-sim".into(),
        "--port".into(),
        comfy_port.to_string(),
        "--base-dir".into(),
        dir.join("comfy").display().to_string(),
        "--startup-delay-ms".into(),
        "300".into(),
        "--model-load-ms".into(),
        "0".into(),
    ];
    let command = command
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        r#"[node]
name = "notify-test"
data_dir = {data:?}

[api]
listen = "127.0.0.1:{api_port}"
keys_file = {keys:?}

[comfy]
command = [{command}]
url = "http://127.0.0.1:{comfy_port}"
start_timeout_s = 30

[jobs]
drain_timeout_s = 5
"#,
        data = dir.join("data").display().to_string(),
        keys = keys.display().to_string(),
    );
    let config_path = dir.join("kilnd.toml");
    std::fs::write(&config_path, config).expect("write config");
    let log = dir.join("kilnd.log");
    let out = std::fs::File::create(&log).expect("log file");
    let mut cmd = Command::new(kilnd);
    cmd.arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let child = cmd.spawn().expect("spawn kilnd");
    Kilnd {
        child,
        api: format!("http://127.0.0.1:{api_port}"),
        log,
    }
}

/// The status code of a plain HTTP/1.0 GET on 127.0.0.1 (the test is synchronous).
fn get_status(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let addr = host.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

fn wait_exit(kilnd: &mut Kilnd, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = kilnd.child.try_wait().expect("child status") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "kilnd did not exit within {limit:?} after SIGTERM; log:\n{}",
            kilnd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kilnd_tells_systemd_ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manager = Manager::bind(dir.path());
    let mut kilnd = start_kilnd(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", manager.path.display().to_string()),
            // Pings every 150 ms.
            ("WATCHDOG_USEC", "300000".to_string()),
        ],
    );

    // READY=1 is sent once the API serves: it answers as soon as READY=1 arrives.
    let ready = manager.wait_for("READY=1", START_LIMIT, |m| {
        m.lines().any(|l| l == "READY=1")
    });
    assert!(ready.contains("STATUS=API up"), "{ready}");
    assert_eq!(
        get_status(&format!("{}/healthz", kilnd.api)),
        Some(200),
        "the API did not answer when READY=1 arrived; log:\n{}",
        kilnd.log()
    );
    assert_eq!(manager.count("READY=1"), 1);

    // STATUS= follows ComfyUI from starting to ready; then /readyz says ready too.
    manager.wait_for("a STATUS line saying ComfyUI is ready", START_LIMIT, |m| {
        m.starts_with("STATUS=ComfyUI is ready")
    });
    assert!(
        manager
            .seen
            .iter()
            .any(|m| m.contains("STATUS=") && m.contains("ComfyUI is starting")),
        "no starting status: {:#?}",
        manager.seen
    );
    // /readyz follows once the node has read ComfyUI's object_info.
    let deadline = Instant::now() + Duration::from_secs(20);
    while get_status(&format!("{}/readyz", kilnd.api)) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "/readyz not ready 20 s after STATUS said ComfyUI is ready; log:\n{}",
            kilnd.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The watchdog is fed repeatedly.
    let deadline = Instant::now() + Duration::from_secs(20);
    while manager.count("WATCHDOG=1") < 4 {
        assert!(
            Instant::now() < deadline,
            "fewer than 4 WATCHDOG=1 in 20 s: {:#?}",
            manager.seen
        );
        manager.collect_for(Duration::from_millis(200));
    }

    // SIGTERM: STOPPING=1 with a draining status, then a clean exit.
    kill(Pid::from_raw(kilnd.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let stopping = manager.wait_for("STOPPING=1", Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    assert!(stopping.contains("STATUS=draining"), "{stopping}");
    let status = wait_exit(&mut kilnd, Duration::from_secs(30));
    assert!(status.success(), "exit {status}; log:\n{}", kilnd.log());
    manager.wait_for("the last status", Duration::from_secs(5), |m| {
        m == "STATUS=stopped\n"
    });
    assert!(
        manager
            .seen
            .iter()
            .any(|m| m == "STATUS=stopping ComfyUI\n"),
        "{:#?}",
        manager.seen
    );
}

#[test]
fn a_watchdog_meant_for_another_process_is_not_fed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut manager = Manager::bind(dir.path());
    let mut kilnd = start_kilnd(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", manager.path.display().to_string()),
            ("WATCHDOG_USEC", "100000".to_string()),
            // Not kilnd's pid: the watchdog belongs to whoever started it.
            ("WATCHDOG_PID", "1".to_string()),
        ],
    );
    manager.wait_for("READY=1", START_LIMIT, |m| {
        m.lines().any(|l| l == "READY=1")
    });
    manager.wait_for("ComfyUI ready", START_LIMIT, |m| {
        m.starts_with("STATUS=ComfyUI is ready")
    });
    // Ten ping intervals' worth of silence.
    manager.collect_for(Duration::from_millis(500));
    assert_eq!(manager.count("WATCHDOG=1"), 0, "{:#?}", manager.seen);

    kill(Pid::from_raw(kilnd.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    manager.wait_for("STOPPING=1", Duration::from_secs(20), |m| {
        m.lines().any(|l| l == "STOPPING=1")
    });
    let status = wait_exit(&mut kilnd, Duration::from_secs(30));
    assert!(status.success(), "exit {status}; log:\n{}", kilnd.log());
}
