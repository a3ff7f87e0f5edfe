//! What the supervisor says about its ComfyUI, and the restart bookkeeping (backoff and crash
//! loop) as a pure function of `tokio::time::Instant`s. No I/O and no timers here, so every rule
//! is unit-tested with paused time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::config::{BackoffConfig, CrashLoopConfig};

/// The supervised ComfyUI's state, published on a `watch` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorState {
    /// Spawned (or about to be); waiting for `GET /system_stats` to answer 200.
    Starting {
        /// Start count of the child being started (0 until it is spawned).
        generation: u64,
    },
    /// Answering; running the warm-up workflow so the model is resident.
    WarmingUp { generation: u64 },
    /// Its own child is alive and answers; jobs may be sent.
    Ready { generation: u64 },
    /// Ready before, but the last health probes failed; it is killed and restarted after
    /// `health_failures_before_restart` failures in a row.
    Unhealthy {
        generation: u64,
        reason: String,
        failures: u32,
    },
    /// The child ended or could not start; the next start is in `backoff`.
    Restarting {
        /// Restarts within the crash-loop window, this one included.
        attempt: u32,
        backoff: Duration,
        reason: String,
    },
    /// Restarts come too often; it goes on retrying every `backoff` (the maximum).
    CrashLoop {
        restarts: u32,
        backoff: Duration,
        last_error: String,
    },
    /// Shutting down: SIGINT sent, SIGKILL after the grace period.
    Stopping,
    /// No child runs and none will be started.
    Stopped,
}

impl SupervisorState {
    /// True only when jobs may be sent.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }

    /// A short state name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Starting { .. } => "starting",
            Self::WarmingUp { .. } => "warming_up",
            Self::Ready { .. } => "ready",
            Self::Unhealthy { .. } => "unhealthy",
            Self::Restarting { .. } => "restarting",
            Self::CrashLoop { .. } => "crash_loop",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }

    /// One line for a readiness endpoint: what state, and why.
    pub fn reason(&self) -> String {
        let d = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            Self::Starting { generation } => {
                format!("ComfyUI is starting (start #{generation}); waiting for /system_stats")
            }
            Self::WarmingUp { generation } => {
                format!("ComfyUI is running its warm-up workflow (start #{generation})")
            }
            Self::Ready { generation } => format!("ComfyUI is ready (start #{generation})"),
            Self::Unhealthy {
                reason, failures, ..
            } => {
                format!("ComfyUI is unhealthy ({failures} failed probe(s)): {reason}")
            }
            Self::Restarting {
                attempt,
                backoff,
                reason,
            } => format!(
                "ComfyUI is restarting in {} (attempt {attempt}): {reason}",
                d(backoff)
            ),
            Self::CrashLoop {
                restarts,
                backoff,
                last_error,
            } => format!(
                "ComfyUI is crash-looping ({restarts} restarts in the window; retrying every {}): \
                 {last_error}",
                d(backoff)
            ),
            Self::Stopping => "ComfyUI is stopping".to_owned(),
            Self::Stopped => "ComfyUI is stopped".to_owned(),
        }
    }
}

/// What to do after a failure: wait `delay`, then start again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartDecision {
    /// Failures inside the crash-loop window, this one included.
    pub attempt: u32,
    pub delay: Duration,
    pub crash_loop: bool,
}

/// Remembers recent failures to choose the backoff and to recognise a crash loop. A restart asked
/// for on purpose (`restart(reason)`) is not a failure and is not recorded.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    backoff: BackoffConfig,
    crash_loop: CrashLoopConfig,
    /// Times of recent failures, oldest first, at most `crash_loop.restarts` of them.
    recent: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(backoff: BackoffConfig, crash_loop: CrashLoopConfig) -> Self {
        Self {
            backoff,
            crash_loop,
            recent: VecDeque::new(),
        }
    }

    /// Records a failure at `now` and says how long to wait before the next start.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        self.prune(now);
        self.recent.push_back(now);
        let limit = usize::try_from(self.crash_loop.restarts)
            .unwrap_or(usize::MAX)
            .max(1);
        while self.recent.len() > limit {
            self.recent.pop_front();
        }
        let attempt = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        let crash_loop = attempt >= self.crash_loop.restarts;
        let delay = if crash_loop {
            self.backoff.max
        } else {
            self.delay_for(attempt)
        };
        RestartDecision {
            attempt,
            delay,
            crash_loop,
        }
    }

    /// Failures still inside the window at `now`.
    pub fn recent_failures(&mut self, now: Instant) -> u32 {
        self.prune(now);
        u32::try_from(self.recent.len()).unwrap_or(u32::MAX)
    }

    fn prune(&mut self, now: Instant) {
        while let Some(&t) = self.recent.front() {
            if now.saturating_duration_since(t) >= self.crash_loop.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    fn delay_for(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.backoff.initial.as_secs_f64() * self.backoff.factor.powi(exp);
        let max = self.backoff.max;
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            return max;
        }
        Duration::try_from_secs_f64(secs).map_or(max, |d| d.min(max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A virtual clock: the policy only compares the instants it is given, so tests move time
    /// by adding to them instead of sleeping.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Self {
            Self(Instant::now())
        }
        fn now(&self) -> Instant {
            self.0
        }
        fn advance(&mut self, d: Duration) {
            self.0 += d;
        }
    }

    fn policy() -> RestartPolicy {
        RestartPolicy::new(BackoffConfig::default(), CrashLoopConfig::default())
    }

    #[test]
    fn backoff_doubles_then_crash_loop_at_fifth_restart_in_window() {
        let mut clock = Clock::new();
        let mut p = policy();
        let mut delays = Vec::new();
        for _ in 0..5 {
            let d = p.on_failure(clock.now());
            delays.push((d.attempt, d.delay.as_secs(), d.crash_loop));
            clock.advance(Duration::from_secs(10));
        }
        assert_eq!(
            delays,
            vec![
                (1, 1, false),
                (2, 2, false),
                (3, 4, false),
                (4, 8, false),
                (5, 60, true)
            ]
        );
        // Still in the loop: retries keep going at the maximum.
        let d = p.on_failure(clock.now());
        assert_eq!((d.attempt, d.delay.as_secs(), d.crash_loop), (5, 60, true));
    }

    #[test]
    fn failures_age_out_of_the_window() {
        let mut clock = Clock::new();
        let mut p = policy();
        for _ in 0..4 {
            p.on_failure(clock.now());
        }
        assert_eq!(p.recent_failures(clock.now()), 4);
        clock.advance(Duration::from_secs(299));
        assert_eq!(p.recent_failures(clock.now()), 4);
        clock.advance(Duration::from_secs(1));
        assert_eq!(p.recent_failures(clock.now()), 0);
        let d = p.on_failure(clock.now());
        assert_eq!(
            (d.attempt, d.delay, d.crash_loop),
            (1, Duration::from_secs(1), false)
        );
    }

    #[test]
    fn crash_loop_ends_when_failures_spread_out() {
        let mut clock = Clock::new();
        let mut p = policy();
        for _ in 0..5 {
            p.on_failure(clock.now());
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(p.recent_failures(clock.now()), 5);
        // One failure every 100 s stays below 5 per 5 minutes.
        clock.advance(Duration::from_secs(300));
        for _ in 0..10 {
            let d = p.on_failure(clock.now());
            assert!(!d.crash_loop, "{d:?}");
            assert!(d.attempt <= 3, "{d:?}");
            clock.advance(Duration::from_secs(100));
        }
    }

    #[test]
    fn delay_is_capped_and_factor_one_is_constant() {
        let clock = Clock::new();
        let mut p = RestartPolicy::new(
            BackoffConfig {
                initial: Duration::from_millis(300),
                max: Duration::from_millis(500),
                factor: 1.0,
            },
            CrashLoopConfig {
                restarts: 100,
                window: Duration::from_secs(3600),
            },
        );
        for _ in 0..20 {
            assert_eq!(p.on_failure(clock.now()).delay, Duration::from_millis(300));
        }
        let mut p = RestartPolicy::new(
            BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
                factor: 1e6,
            },
            CrashLoopConfig {
                restarts: 1000,
                window: Duration::from_secs(3600),
            },
        );
        assert_eq!(p.on_failure(clock.now()).delay, Duration::from_secs(1));
        for _ in 0..1000 {
            assert_eq!(p.on_failure(clock.now()).delay, Duration::from_secs(60));
        }
    }

    #[test]
    fn reasons_name_the_state() {
        let s = SupervisorState::CrashLoop {
            restarts: 5,
            backoff: Duration::from_secs(60),
            last_error: "exited with status 1: address already in use".into(),
        };
        assert!(!s.is_ready());
        assert!(s.reason().contains("crash-looping"));
        assert!(s.reason().contains("address already in use"));
        assert!(SupervisorState::Ready { generation: 2 }.is_ready());
        assert_eq!(SupervisorState::Stopped.name(), "stopped");
    }
}
