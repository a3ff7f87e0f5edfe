//! systemd's notify protocol for kilnd (`Type=notify` units): `READY=1` once the API serves,
//! `STATUS=` lines as ComfyUI starts, warms up, is ready or unhealthy and as the node drains,
//! `STOPPING=1` when shutdown begins, and `WATCHDOG=1` pings.
//!
//! The environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`) is read once at start by
//! [`NotifyEnv::from_vars`] and handed to the node as a [`Notifier`]; without `NOTIFY_SOCKET`
//! every call is a no-op, so the same binary runs under systemd, in a container or by hand.
//! Messages are spelled by the `sd-notify` crate's [`NotifyState`]; they are sent here on a
//! non-blocking datagram socket (abstract `@name` sockets included), so a busy service manager
//! never blocks the runtime.
//!
//! The watchdog is pinged only by the node's own main loop, after it checked that the parts that
//! must stay alive (HTTP server, job runner, job store) still answer: a stuck node misses pings
//! and systemd restarts it. This module never decides liveness itself.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::comfy::supervisor::SupervisorState;

/// The shortest watchdog ping interval used, whatever `WATCHDOG_USEC` says.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(1);

/// What the service manager asked for, read from the environment once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyEnv {
    /// `NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract socket.
    pub socket: Option<OsString>,
    /// `WATCHDOG_USEC`, when it is meant for this process (`WATCHDOG_PID` absent or ours).
    pub watchdog: Option<Duration>,
    /// Values that were set but unusable, one sentence each, for the log.
    pub problems: Vec<String>,
}

impl NotifyEnv {
    /// Reads this process's environment.
    pub fn from_process() -> NotifyEnv {
        NotifyEnv::from_vars(|name| std::env::var_os(name), std::process::id())
    }

    /// Reads the variables through `get`, for the process `pid`. Follows `sd_notify(3)` and
    /// `sd_watchdog_enabled(3)`: an empty `NOTIFY_SOCKET` means none, `WATCHDOG_USEC=0` means
    /// no watchdog, and a `WATCHDOG_PID` naming another process means the watchdog is not ours.
    pub fn from_vars(get: impl Fn(&str) -> Option<OsString>, pid: u32) -> NotifyEnv {
        let mut env = NotifyEnv::default();
        if let Some(socket) = get("NOTIFY_SOCKET").filter(|s| !s.is_empty()) {
            let bytes = socket.as_bytes();
            if bytes.first() == Some(&b'/') || bytes.first() == Some(&b'@') {
                env.socket = Some(socket);
            } else {
                env.problems.push(format!(
                    "NOTIFY_SOCKET={} is neither an absolute path nor an abstract socket (@name); \
                     systemd notifications are off",
                    socket.to_string_lossy()
                ));
            }
        }
        let usec = get("WATCHDOG_USEC").map(|v| v.to_string_lossy().into_owned());
        let watchdog_pid = get("WATCHDOG_PID").map(|v| v.to_string_lossy().into_owned());
        let Some(usec) = usec else {
            return env;
        };
        let usec = match usec.trim().parse::<u64>() {
            Ok(usec) => usec,
            Err(_) => {
                env.problems.push(format!(
                    "WATCHDOG_USEC={usec:?} is not a number of microseconds; no watchdog pings"
                ));
                return env;
            }
        };
        if let Some(watchdog_pid) = watchdog_pid {
            match watchdog_pid.trim().parse::<u32>() {
                Ok(p) if p == pid => {}
                // Meant for another process (we were started by one that had a watchdog).
                Ok(_) => return env,
                Err(_) => {
                    env.problems.push(format!(
                        "WATCHDOG_PID={watchdog_pid:?} is not a process id; no watchdog pings"
                    ));
                    return env;
                }
            }
        }
        if usec == 0 {
            return env;
        }
        if env.socket.is_none() {
            env.problems.push(
                "WATCHDOG_USEC is set but NOTIFY_SOCKET is not; no watchdog pings".to_string(),
            );
            return env;
        }
        env.watchdog = Some(Duration::from_micros(usec));
        env
    }
}

/// The address a `NOTIFY_SOCKET` value names.
fn socket_addr(socket: &OsStr) -> std::io::Result<SocketAddr> {
    let bytes = socket.as_bytes();
    match bytes.split_first() {
        Some((b'@', name)) => abstract_addr(name),
        _ => SocketAddr::from_pathname(std::path::Path::new(socket)),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

#[derive(Debug)]
struct Inner {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
    /// Set after the first failed send, so a missing manager is logged once, not every ping.
    failed: AtomicBool,
}

/// Sends notifications to the service manager; a no-op when none asked for them. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// A notifier for what `env` asked for. Logs the environment's problems; a socket that
    /// cannot be made turns notifications off (logged), it never stops the node.
    pub fn new(env: &NotifyEnv) -> Notifier {
        for problem in &env.problems {
            tracing::warn!("{problem}");
        }
        let Some(path) = &env.socket else {
            return Notifier::disabled();
        };
        let made = socket_addr(path).and_then(|addr| {
            let socket = UnixDatagram::unbound()?;
            socket.set_nonblocking(true)?;
            Ok((socket, addr))
        });
        match made {
            Ok((socket, addr)) => {
                tracing::info!(
                    socket = %path.to_string_lossy(),
                    watchdog = ?env.watchdog,
                    "systemd notifications on"
                );
                Notifier {
                    inner: Some(Arc::new(Inner {
                        socket,
                        addr,
                        watchdog: env.watchdog,
                        failed: AtomicBool::new(false),
                    })),
                }
            }
            Err(error) => {
                tracing::warn!(socket = %path.to_string_lossy(), %error,
                    "cannot use NOTIFY_SOCKET; systemd notifications are off");
                Notifier::disabled()
            }
        }
    }

    /// Whether notifications are sent at all.
    pub fn is_active(&self) -> bool {
        self.inner.is_some()
    }

    /// How often the main loop should ping: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
    /// recommends; `None` without a watchdog.
    pub fn ping_interval(&self) -> Option<Duration> {
        let watchdog = self.inner.as_ref()?.watchdog?;
        Some((watchdog / 2).max(MIN_PING_INTERVAL))
    }

    /// `READY=1` with a status line: the API serves.
    pub fn ready(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// `STATUS=…`: one line (control characters become spaces).
    pub fn status(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Status(&status)]);
    }

    /// `STOPPING=1` with a status line: shutdown began.
    pub fn stopping(&self, status: &str) {
        let status = one_line(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }

    /// `WATCHDOG=1`. Call only after checking that the node is alive.
    pub fn watchdog(&self) {
        if self.inner.as_ref().is_some_and(|i| i.watchdog.is_some()) {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// A timer for the main loop's pings; it never fires without a watchdog.
    pub fn watchdog_timer(&self) -> WatchdogTimer {
        WatchdogTimer {
            interval: self.ping_interval().map(|period| {
                let mut interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                interval
            }),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(inner) = &self.inner else {
            return;
        };
        let message = encode(states);
        match inner.socket.send_to_addr(message.as_bytes(), &inner.addr) {
            Ok(sent) if sent == message.len() => {
                inner.failed.store(false, Ordering::Relaxed);
            }
            Ok(sent) => tracing::warn!(sent, len = message.len(), "systemd notification cut short"),
            Err(error) => {
                if !inner.failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "cannot send a systemd notification");
                } else {
                    tracing::debug!(%error, "cannot send a systemd notification");
                }
            }
        }
    }
}

/// The datagram for `states`: one `KEY=value` line each, as `sd_notify(3)` reads them.
pub fn encode(states: &[NotifyState<'_>]) -> String {
    let mut message = String::new();
    for state in states {
        message.push_str(&state.to_string());
        message.push('\n');
    }
    message
}

/// `text` on one line: a newline would start another `KEY=value` assignment.
pub fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The status line for a ComfyUI state.
pub fn comfy_status(state: &SupervisorState) -> String {
    state.reason()
}

/// Ticks at the watchdog's ping interval, or never.
#[derive(Debug)]
pub struct WatchdogTimer {
    interval: Option<Interval>,
}

impl WatchdogTimer {
    /// Waits for the next ping time (forever without a watchdog).
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// Sends a `STATUS=` line for every change of ComfyUI's state until `stop`.
pub async fn follow_comfy(
    notifier: Notifier,
    mut states: watch::Receiver<SupervisorState>,
    stop: CancellationToken,
) {
    if !notifier.is_active() {
        return;
    }
    let mut last = String::new();
    loop {
        let line = comfy_status(&states.borrow_and_update());
        if line != last {
            notifier.status(&line);
            last = line;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)], pid: u32) -> NotifyEnv {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        NotifyEnv::from_vars(|name| map.get(name).cloned(), pid)
    }

    #[test]
    fn nothing_set_is_off() {
        let env = env_of(&[], 10);
        assert_eq!(env, NotifyEnv::default());
        let notifier = Notifier::new(&env);
        assert!(!notifier.is_active());
        assert_eq!(notifier.ping_interval(), None);
    }

    #[test]
    fn socket_and_watchdog_for_this_process() {
        let env = env_of(
            &[
                ("NOTIFY_SOCKET", "/run/systemd/notify"),
                ("WATCHDOG_USEC", "30000000"),
                ("WATCHDOG_PID", "42"),
            ],
            42,
        );
        assert_eq!(env.socket, Some(OsString::from("/run/systemd/notify")));
        assert_eq!(env.watchdog, Some(Duration::from_secs(30)));
        assert!(env.problems.is_empty());
        let notifier = Notifier::new(&env);
        assert_eq!(notifier.ping_interval(), Some(Duration::from_secs(15)));
    }

    #[test]
    fn watchdog_of_another_process_is_not_ours() {
        let env = env_of(
            &[
                ("NOTIFY_SOCKET", "/run/systemd/notify"),
                ("WATCHDOG_USEC", "30000000"),
                ("WATCHDOG_PID", "41"),
            ],
            42,
        );
        assert!(env.socket.is_some());
        assert_eq!(env.watchdog, None);
        assert!(env.problems.is_empty());
    }

    #[test]
    fn zero_and_empty_mean_off() {
        let env = env_of(&[("NOTIFY_SOCKET", ""), ("WATCHDOG_USEC", "0")], 1);
        assert_eq!(env, NotifyEnv::default());
    }

    #[test]
    fn bad_values_are_named() {
        let env = env_of(
            &[
                ("NOTIFY_SOCKET", "relative.sock"),
                ("WATCHDOG_USEC", "soon"),
            ],
            1,
        );
        assert_eq!(env.socket, None);
        assert_eq!(env.watchdog, None);
        assert_eq!(env.problems.len(), 2, "{:?}", env.problems);
        assert!(env.problems[0].contains("relative.sock"));
        assert!(env.problems[1].contains("WATCHDOG_USEC=\"soon\""));

        let env = env_of(
            &[
                ("NOTIFY_SOCKET", "/run/n"),
                ("WATCHDOG_USEC", "1000"),
                ("WATCHDOG_PID", "me"),
            ],
            1,
        );
        assert_eq!(env.watchdog, None);
        assert!(env.problems[0].contains("WATCHDOG_PID"));

        let env = env_of(&[("WATCHDOG_USEC", "1000")], 1);
        assert_eq!(env.watchdog, None);
        assert!(env.problems[0].contains("NOTIFY_SOCKET is not"));
    }

    #[test]
    fn tiny_watchdog_still_has_a_positive_interval() {
        let env = env_of(
            &[("NOTIFY_SOCKET", "@kiln-test"), ("WATCHDOG_USEC", "1")],
            1,
        );
        let notifier = Notifier::new(&env);
        assert_eq!(notifier.ping_interval(), Some(MIN_PING_INTERVAL));
    }

    #[test]
    fn messages_are_one_assignment_per_line() {
        assert_eq!(
            encode(&[NotifyState::Ready, NotifyState::Status("up")]),
            "READY=1\nSTATUS=up\n"
        );
        assert_eq!(one_line("a\nb\tc"), "a b c");
    }

    #[test]
    fn comfy_states_have_status_lines() {
        let starting = comfy_status(&SupervisorState::Starting { generation: 1 });
        assert!(starting.contains("starting"), "{starting}");
        let warming = comfy_status(&SupervisorState::WarmingUp { generation: 1 });
        assert!(warming.contains("warm-up"), "{warming}");
        let ready = comfy_status(&SupervisorState::Ready { generation: 2 });
        assert!(ready.contains("ready"), "{ready}");
        let unhealthy = comfy_status(&SupervisorState::Unhealthy {
            generation: 2,
            reason: "timeout".into(),
            failures: 2,
        });
        assert!(unhealthy.contains("unhealthy"), "{unhealthy}");
    }

    fn receive_all(socket: &UnixDatagram) -> Vec<String> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("test setup");
        receiver.set_nonblocking(true).expect("test setup");
        let env = NotifyEnv {
            socket: Some(path.clone().into_os_string()),
            watchdog: Some(Duration::from_secs(2)),
            problems: Vec::new(),
        };
        let notifier = Notifier::new(&env);
        notifier.ready("API up");
        notifier.status("line one\nline two");
        notifier.watchdog();
        notifier.stopping("draining");
        assert_eq!(
            receive_all(&receiver),
            vec![
                "READY=1\nSTATUS=API up\n",
                "STATUS=line one line two\n",
                "WATCHDOG=1\n",
                "STOPPING=1\nSTATUS=draining\n",
            ]
        );
    }

    #[test]
    fn no_watchdog_pings_without_a_watchdog() {
        let dir = tempfile::tempdir().expect("test setup");
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).expect("test setup");
        receiver.set_nonblocking(true).expect("test setup");
        let env = NotifyEnv {
            socket: Some(path.into_os_string()),
            ..NotifyEnv::default()
        };
        let notifier = Notifier::new(&env);
        notifier.watchdog();
        notifier.status("x");
        assert_eq!(receive_all(&receiver), vec!["STATUS=x\n"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("kiln-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("test setup");
        let receiver = UnixDatagram::bind_addr(&addr).expect("test setup");
        receiver.set_nonblocking(true).expect("test setup");
        let env = NotifyEnv {
            socket: Some(OsString::from(format!("@{name}"))),
            ..NotifyEnv::default()
        };
        Notifier::new(&env).ready("up");
        assert_eq!(receive_all(&receiver), vec!["READY=1\nSTATUS=up\n"]);
    }

    #[test]
    fn a_missing_manager_does_not_fail_the_node() {
        let dir = tempfile::tempdir().expect("test setup");
        let env = NotifyEnv {
            socket: Some(dir.path().join("nobody.sock").into_os_string()),
            watchdog: Some(Duration::from_secs(1)),
            problems: Vec::new(),
        };
        let notifier = Notifier::new(&env);
        notifier.ready("up");
        notifier.watchdog();
        assert!(notifier.is_active());
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_ticks_at_half_the_watchdog() {
        let env = NotifyEnv {
            socket: Some(OsString::from("/nonexistent/notify")),
            watchdog: Some(Duration::from_secs(10)),
            problems: Vec::new(),
        };
        let mut timer = Notifier::new(&env).watchdog_timer();
        let start = tokio::time::Instant::now();
        timer.tick().await; // the first tick is immediate
        timer.tick().await;
        timer.tick().await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));

        let mut never = Notifier::disabled().watchdog_timer();
        let waited = tokio::time::timeout(Duration::from_secs(3600), never.tick()).await;
        assert!(waited.is_err());
    }
}
