//! The ComfyUI process supervisor: starts the configured command (the real ComfyUI or `kilnd
//! comfy-sim`) in its own process group, says it is ready only when ITS OWN child is alive and
//! `GET /system_stats` answers 200, runs an optional warm-up workflow, probes health, restarts it
//! with exponential backoff after an exit or a hang, reports a crash loop, and stops the whole
//! group on shutdown (SIGINT, then SIGKILL after `stop_grace`).
//!
//! One task owns the child. The [`SupervisorHandle`] talks to it through an mpsc channel
//! (restart), a `watch` of [`SupervisorState`], a `watch` of the generation (start count) and a
//! `CancellationToken` (shutdown). Restarting loses ComfyUI's queue and history; a changed
//! generation is how a caller learns that its running prompt was lost.
//!
//! It must never: trust a port that answered before its child was spawned, hold a lock across an
//! `.await`, leave a process of the group running after shutdown or drop, or count the exit that
//! follows its own SIGINT (status 0, or 134 when ComfyUI was busy) as a crash.

mod child;
mod config;
mod probe;
mod state;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use config::{BackoffConfig, ConfigError, CrashLoopConfig, SupervisorConfig};
pub use state::{RestartDecision, RestartPolicy, SupervisorState};

use child::{Child, KILL_WAIT, describe_exit};

use super::ComfyControl;

/// Starts supervisors.
#[derive(Debug)]
pub struct Supervisor;

impl Supervisor {
    /// Validates `config` and starts supervising on the current tokio runtime. The first start
    /// begins at once; watch [`SupervisorHandle::state`] or call
    /// [`SupervisorHandle::wait_ready`]. Must be called inside a tokio runtime (it spawns the
    /// task that owns the child).
    pub fn spawn(config: SupervisorConfig) -> Result<SupervisorHandle, ConfigError> {
        config.validate()?;
        let http = probe::http_client(&config).map_err(|message| ConfigError {
            field: "base_url",
            message,
        })?;
        let (state_tx, state_rx) = watch::channel(SupervisorState::Starting { generation: 0 });
        let (gen_tx, gen_rx) = watch::channel(0u64);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let runner = Runner {
            policy: RestartPolicy::new(config.backoff.clone(), config.crash_loop.clone()),
            http,
            state_tx,
            gen_tx,
            cmd_rx,
            cmds_open: true,
            cancel: cancel.clone(),
            generation: 0,
            config,
        };
        let task = tokio::spawn(runner.run());
        Ok(SupervisorHandle {
            control: SupervisorControl {
                cmd_tx,
                state_rx,
                gen_rx,
            },
            cancel: cancel.clone(),
            task: Some(task),
            _stop_on_drop: cancel.drop_guard(),
        })
    }
}

/// Owns a running supervisor. Dropping it stops ComfyUI too (the task sends SIGINT then SIGKILL;
/// if the runtime is going away, the group is SIGKILLed at once).
#[derive(Debug)]
pub struct SupervisorHandle {
    control: SupervisorControl,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    _stop_on_drop: DropGuard,
}

/// A cloneable view of a supervisor for the parts that must not own it (the executor, readyz):
/// state, generation and `restart`. It implements [`ComfyControl`].
#[derive(Debug, Clone)]
pub struct SupervisorControl {
    cmd_tx: mpsc::Sender<Command>,
    state_rx: watch::Receiver<SupervisorState>,
    gen_rx: watch::Receiver<u64>,
}

/// Why [`SupervisorHandle::wait_ready`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitReadyError {
    #[error("ComfyUI was not ready within {timeout:?}; last state: {}", .last.reason())]
    Timeout {
        timeout: Duration,
        last: SupervisorState,
    },
    #[error("the supervisor has stopped")]
    Stopped,
}

enum Command {
    Restart {
        reason: String,
        done: oneshot::Sender<()>,
    },
}

impl SupervisorControl {
    /// The state now.
    pub fn state(&self) -> SupervisorState {
        self.state_rx.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn subscribe_state(&self) -> watch::Receiver<SupervisorState> {
        self.state_rx.clone()
    }

    /// A receiver of the generation: it changes whenever a new child is started, which means
    /// whatever the previous one was running is lost.
    pub fn subscribe_generation(&self) -> watch::Receiver<u64> {
        self.gen_rx.clone()
    }

    /// How many children have been started so far.
    pub fn generation(&self) -> u64 {
        *self.gen_rx.borrow()
    }

    /// True when jobs may be sent.
    pub fn is_ready(&self) -> bool {
        self.state_rx.borrow().is_ready()
    }

    /// Kills the whole group now and starts a new child without backoff. Resolves once the old
    /// child is dead (the new one may still be starting). Returns at once when the supervisor has
    /// stopped.
    pub async fn restart(&self, reason: &str) {
        let (done, wait) = oneshot::channel();
        let cmd = Command::Restart {
            reason: reason.to_owned(),
            done,
        };
        if self.cmd_tx.send(cmd).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Waits until the state is `Ready`, at most `timeout`; returns the generation that is ready.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<u64, WaitReadyError> {
        let mut rx = self.state_rx.clone();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    match &*s {
                        SupervisorState::Ready { generation } => return Ok(*generation),
                        SupervisorState::Stopped => return Err(WaitReadyError::Stopped),
                        _ => {}
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(WaitReadyError::Stopped);
                }
            }
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(_) => Err(WaitReadyError::Timeout {
                timeout,
                last: self.state(),
            }),
        }
    }
}

impl SupervisorHandle {
    /// A cloneable view for the executor and the API.
    pub fn control(&self) -> SupervisorControl {
        self.control.clone()
    }

    pub fn state(&self) -> SupervisorState {
        self.control.state()
    }

    pub fn subscribe_state(&self) -> watch::Receiver<SupervisorState> {
        self.control.subscribe_state()
    }

    pub fn subscribe_generation(&self) -> watch::Receiver<u64> {
        self.control.subscribe_generation()
    }

    pub fn generation(&self) -> u64 {
        self.control.generation()
    }

    pub fn is_ready(&self) -> bool {
        self.control.is_ready()
    }

    pub async fn restart(&self, reason: &str) {
        self.control.restart(reason).await;
    }

    pub async fn wait_ready(&self, timeout: Duration) -> Result<u64, WaitReadyError> {
        self.control.wait_ready(timeout).await
    }

    /// Stops the whole process group (SIGINT, then SIGKILL after `stop_grace`) and waits for the
    /// supervisor task. `Err` when that task had panicked.
    pub async fn shutdown(mut self) -> Result<(), String> {
        self.cancel.cancel();
        match self.task.take() {
            Some(task) => task
                .await
                .map_err(|e| format!("the ComfyUI supervisor task failed: {e}")),
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl ComfyControl for SupervisorControl {
    async fn restart(&self, reason: &str) {
        SupervisorControl::restart(self, reason).await;
    }

    fn generation(&self) -> u64 {
        SupervisorControl::generation(self)
    }
}

#[async_trait::async_trait]
impl ComfyControl for SupervisorHandle {
    async fn restart(&self, reason: &str) {
        self.control.restart(reason).await;
    }

    fn generation(&self) -> u64 {
        self.control.generation()
    }
}

/// How one child's life ended.
enum LifeEnd {
    /// Shutdown was asked for; the child is stopped.
    Shutdown,
    /// `restart(reason)` was asked for; the child is dead; start again without backoff.
    Requested,
    /// It exited, hung, or could not start; start again after a backoff.
    Failed(String),
}

/// The task that owns the child.
struct Runner {
    config: SupervisorConfig,
    http: reqwest::Client,
    policy: RestartPolicy,
    state_tx: watch::Sender<SupervisorState>,
    gen_tx: watch::Sender<u64>,
    cmd_rx: mpsc::Receiver<Command>,
    cmds_open: bool,
    cancel: CancellationToken,
    generation: u64,
}

impl Runner {
    async fn run(mut self) {
        let name = self.config.name.clone();
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            match self.life().await {
                LifeEnd::Shutdown => break,
                LifeEnd::Requested => continue,
                LifeEnd::Failed(reason) => {
                    let d = self.policy.on_failure(Instant::now());
                    if d.crash_loop {
                        tracing::error!(comfy = %name, restarts = d.attempt, backoff = ?d.delay, "ComfyUI is crash-looping: {reason}");
                        self.set_state(SupervisorState::CrashLoop {
                            restarts: d.attempt,
                            backoff: d.delay,
                            last_error: reason,
                        });
                    } else {
                        tracing::warn!(comfy = %name, attempt = d.attempt, backoff = ?d.delay, "ComfyUI will be restarted: {reason}");
                        self.set_state(SupervisorState::Restarting {
                            attempt: d.attempt,
                            backoff: d.delay,
                            reason,
                        });
                    }
                    if !self.wait_backoff(d.delay).await {
                        break;
                    }
                }
            }
        }
        self.set_state(SupervisorState::Stopped);
        tracing::info!(comfy = %name, "ComfyUI supervisor stopped");
    }

    fn set_state(&self, state: SupervisorState) {
        self.state_tx.send_if_modified(|s| {
            if *s == state {
                false
            } else {
                *s = state;
                true
            }
        });
    }

    /// Sleeps `delay`; a restart request cuts it short. False when shutdown was asked for.
    async fn wait_backoff(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return false,
                cmd = self.cmd_rx.recv(), if self.cmds_open => match cmd {
                    Some(Command::Restart { reason, done }) => {
                        tracing::info!(comfy = %self.config.name, "restart asked for during backoff ({reason}); starting now");
                        let _ = done.send(());
                        return true;
                    }
                    None => self.cmds_open = false,
                },
                () = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    /// One child: pre-check, spawn, wait for readiness, warm up, then watch it while ready.
    async fn life(&mut self) -> LifeEnd {
        self.set_state(SupervisorState::Starting {
            generation: self.generation,
        });
        if let Err(reason) = probe::port_is_free(&self.config).await {
            return LifeEnd::Failed(reason);
        }
        if self.cancel.is_cancelled() {
            return LifeEnd::Shutdown;
        }
        let generation = self.generation + 1;
        let mut child = match Child::spawn(&self.config, generation) {
            Ok(c) => c,
            Err(reason) => return LifeEnd::Failed(reason),
        };
        self.generation = generation;
        self.gen_tx.send_replace(generation);
        self.set_state(SupervisorState::Starting { generation });

        // Starting: poll /system_stats until it answers 200 while the child is alive.
        let stats_url = self.config.endpoint("system_stats");
        let started = Instant::now();
        let start_deadline = started + self.config.start_timeout;
        let mut last_probe = String::from("no probe answered yet");
        loop {
            let next_probe = Instant::now() + self.config.probe_interval;
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return self.stop(child).await,
                cmd = self.cmd_rx.recv(), if self.cmds_open => {
                    if let Some(end) = self.on_command(cmd, &mut child).await {
                        return end;
                    }
                }
                status = child.wait() => return LifeEnd::Failed(self.exit_reason(status, &child, "while starting")),
                () = tokio::time::sleep_until(start_deadline) => {
                    child.kill(KILL_WAIT).await;
                    return LifeEnd::Failed(format!(
                        "did not answer GET /system_stats with 200 within {} ({last_probe})",
                        humantime::format_duration(self.config.start_timeout)
                    ));
                }
                probed = probe::system_stats(&self.http, &stats_url) => match probed {
                    Ok(()) => {
                        // The answer only counts when our own child is still alive.
                        if let Some(status) = child.try_wait() {
                            return LifeEnd::Failed(self.exit_reason(Ok(status), &child, "while starting"));
                        }
                        break;
                    }
                    Err(e) => {
                        last_probe = e;
                        // Probe at most every probe_interval, still reacting to everything else.
                        tokio::select! {
                            biased;
                            () = self.cancel.cancelled() => return self.stop(child).await,
                            status = child.wait() => return LifeEnd::Failed(self.exit_reason(status, &child, "while starting")),
                            () = tokio::time::sleep_until(next_probe.min(start_deadline)) => {}
                        }
                    }
                },
            }
        }
        tracing::info!(comfy = %self.config.name, generation, pid = child.pid(), after = ?started.elapsed(), "ComfyUI answers /system_stats");

        // Warm-up.
        if let Some(workflow) = self.config.warmup.clone() {
            self.set_state(SupervisorState::WarmingUp { generation });
            let http = self.http.clone();
            let config = self.config.clone();
            let warm = async move { probe::warm_up(&http, &config, &workflow).await };
            tokio::pin!(warm);
            loop {
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => return self.stop(child).await,
                    cmd = self.cmd_rx.recv(), if self.cmds_open => {
                        if let Some(end) = self.on_command(cmd, &mut child).await {
                            return end;
                        }
                    }
                    status = child.wait() => return LifeEnd::Failed(self.exit_reason(status, &child, "during warm-up")),
                    result = &mut warm => match result {
                        Ok(()) => break,
                        Err(e) => {
                            child.kill(KILL_WAIT).await;
                            return LifeEnd::Failed(e);
                        }
                    },
                }
            }
            tracing::info!(comfy = %self.config.name, generation, "warm-up workflow done");
        }

        // Ready: probe health until it exits, hangs, or we are told otherwise.
        self.set_state(SupervisorState::Ready { generation });
        let mut failures = 0u32;
        let mut next_health = Instant::now() + self.config.health_interval;
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return self.stop(child).await,
                cmd = self.cmd_rx.recv(), if self.cmds_open => {
                    if let Some(end) = self.on_command(cmd, &mut child).await {
                        return end;
                    }
                }
                status = child.wait() => return LifeEnd::Failed(self.exit_reason(status, &child, "while ready")),
                () = tokio::time::sleep_until(next_health) => {
                    next_health += self.config.health_interval;
                    let probed = tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => return self.stop(child).await,
                        status = child.wait() => return LifeEnd::Failed(self.exit_reason(status, &child, "while ready")),
                        p = probe::system_stats(&self.http, &stats_url) => p,
                    };
                    match probed {
                        Ok(()) => {
                            if failures > 0 {
                                tracing::info!(comfy = %self.config.name, generation, "ComfyUI answers again");
                            }
                            failures = 0;
                            self.set_state(SupervisorState::Ready { generation });
                        }
                        Err(reason) => {
                            failures += 1;
                            tracing::warn!(comfy = %self.config.name, generation, failures, "health probe failed: {reason}");
                            if failures >= self.config.health_failures_before_restart {
                                child.kill(KILL_WAIT).await;
                                return LifeEnd::Failed(format!(
                                    "hung: {failures} health probes failed in a row ({reason}); killed its process group"
                                ));
                            }
                            self.set_state(SupervisorState::Unhealthy { generation, reason, failures });
                        }
                    }
                    // A slow probe must not make ticks pile up.
                    next_health = next_health.max(Instant::now());
                }
            }
        }
    }

    /// Handles a command while a child lives; `Some` when the child's life is over.
    async fn on_command(&mut self, cmd: Option<Command>, child: &mut Child) -> Option<LifeEnd> {
        match cmd {
            Some(Command::Restart { reason, done }) => {
                tracing::warn!(comfy = %self.config.name, generation = self.generation, pid = child.pid(), "restarting ComfyUI on request: {reason}");
                let status = child.kill(KILL_WAIT).await;
                if let Some(status) = status {
                    tracing::info!(comfy = %self.config.name, "ComfyUI {} after SIGKILL", describe_exit(&status));
                }
                let _ = done.send(());
                Some(LifeEnd::Requested)
            }
            None => {
                self.cmds_open = false;
                None
            }
        }
    }

    /// Shutdown: SIGINT to the group, SIGKILL after the grace period. The exit that follows our
    /// SIGINT (0 when idle, 134 when busy) is expected, not a crash.
    async fn stop(&mut self, mut child: Child) -> LifeEnd {
        self.set_state(SupervisorState::Stopping);
        tracing::info!(comfy = %self.config.name, pid = child.pid(), grace = ?self.config.stop_grace, "stopping ComfyUI (SIGINT to its process group)");
        match child.stop(self.config.stop_grace).await {
            Some(status) => {
                tracing::info!(comfy = %self.config.name, "ComfyUI {} on shutdown", describe_exit(&status));
            }
            None => {
                tracing::warn!(comfy = %self.config.name, "ComfyUI's exit status on shutdown is unknown")
            }
        }
        drop(child);
        LifeEnd::Shutdown
    }

    /// Explains an unexpected exit with its status and the child's last telling line.
    fn exit_reason(
        &self,
        status: std::io::Result<std::process::ExitStatus>,
        child: &Child,
        when: &str,
    ) -> String {
        let what = match status {
            Ok(s) => describe_exit(&s),
            Err(e) => format!("could not be waited for ({e})"),
        };
        let port_taken = child.tail.contains("address already in use");
        let mut reason = format!("ComfyUI (pid {}) {what} {when}", child.pid());
        if port_taken {
            reason.push_str(&format!(
                ": its port is already in use by another process ({})",
                self.config.base_url
            ));
        }
        if let Some(line) = child.tail.last_error_line() {
            reason.push_str(&format!("; last output: {line}"));
        }
        reason
    }
}
