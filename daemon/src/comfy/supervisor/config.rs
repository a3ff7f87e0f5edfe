//! The supervisor's configuration: what to run, where it listens, and the timers of the restart
//! policy. Deserialised from the node's TOML with unknown keys refused, then checked by
//! [`SupervisorConfig::validate`] before anything is spawned. This module does no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

/// How to run ComfyUI (or `kilnd comfy-sim`) and how to keep it running.
///
/// Durations are written as humantime strings (`"120s"`, `"200ms"`, `"5m"`) or as a number of
/// seconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Program and arguments, e.g. `["python", "main.py", "--listen", "127.0.0.1", "--port",
    /// "8188"]`. The program is looked up in `PATH` when it has no slash.
    pub command: Vec<String>,
    /// Extra environment variables for the child (the daemon's own environment is inherited).
    /// In TOML either a table `{ KEY = "value" }` or a list of `["KEY", "value"]` pairs.
    #[serde(default, deserialize_with = "deserialize_env")]
    pub env: Vec<(String, String)>,
    /// Working directory of the child; the daemon's own when absent.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Where the child listens, e.g. `http://127.0.0.1:8188/`.
    #[serde(deserialize_with = "deserialize_url")]
    pub base_url: Url,
    /// Name used in logs and errors.
    #[serde(default = "default_name")]
    pub name: String,
    /// How long a start may take until `GET /system_stats` answers 200 (default 120 s).
    #[serde(default = "default_start_timeout", with = "duration_serde")]
    pub start_timeout: Duration,
    /// How often `/system_stats` is polled while starting (default 200 ms).
    #[serde(default = "default_probe_interval", with = "duration_serde")]
    pub probe_interval: Duration,
    /// Time limit of one HTTP probe (default 3 s).
    #[serde(default = "default_probe_timeout", with = "duration_serde")]
    pub probe_timeout: Duration,
    /// How often a ready child is probed (default 5 s).
    #[serde(default = "default_health_interval", with = "duration_serde")]
    pub health_interval: Duration,
    /// Consecutive failed health probes after which the child is taken as hung, killed and
    /// restarted (default 3).
    #[serde(default = "default_health_failures")]
    pub health_failures_before_restart: u32,
    /// Delay before restarting after an exit, a failed start or a hang.
    #[serde(default)]
    pub backoff: BackoffConfig,
    /// When restarts come this often, the state says `CrashLoop` (retries go on at the maximum
    /// backoff).
    #[serde(default)]
    pub crash_loop: CrashLoopConfig,
    /// On shutdown: time between SIGINT and SIGKILL to the process group (default 10 s).
    #[serde(default = "default_stop_grace", with = "duration_serde")]
    pub stop_grace: Duration,
    /// An API-format workflow run once after each start, before the state says `Ready`, so that
    /// its model is resident.
    #[serde(default)]
    pub warmup: Option<serde_json::Value>,
    /// Time limit of the warm-up workflow (default 10 min).
    #[serde(default = "default_warmup_timeout", with = "duration_serde")]
    pub warmup_timeout: Duration,
}

/// Exponential backoff between restarts: `initial * factor^(n-1)`, capped at `max`, where `n`
/// counts the restarts inside the crash-loop window.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// First delay (default 1 s).
    #[serde(default = "default_backoff_initial", with = "duration_serde")]
    pub initial: Duration,
    /// Largest delay (default 60 s).
    #[serde(default = "default_backoff_max", with = "duration_serde")]
    pub max: Duration,
    /// Growth per restart (default 2.0).
    #[serde(default = "default_backoff_factor")]
    pub factor: f64,
}

/// `restarts` restarts within `window` make a crash loop.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrashLoopConfig {
    /// Default 5.
    #[serde(default = "default_crash_restarts")]
    pub restarts: u32,
    /// Default 5 min.
    #[serde(default = "default_crash_window", with = "duration_serde")]
    pub window: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            factor: default_backoff_factor(),
        }
    }
}

impl Default for CrashLoopConfig {
    fn default() -> Self {
        Self {
            restarts: default_crash_restarts(),
            window: default_crash_window(),
        }
    }
}

fn default_name() -> String {
    "comfyui".to_owned()
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_probe_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_probe_timeout() -> Duration {
    Duration::from_secs(3)
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_failures() -> u32 {
    3
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_warmup_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_backoff_factor() -> f64 {
    2.0
}
fn default_crash_restarts() -> u32 {
    5
}
fn default_crash_window() -> Duration {
    Duration::from_secs(300)
}

/// A configuration value that cannot work, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("comfy supervisor config: `{field}` {message}")]
pub struct ConfigError {
    /// The key, dotted for nested tables (`backoff.max`).
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl SupervisorConfig {
    /// A configuration with every default, for `command` listening at `base_url`.
    pub fn new(command: Vec<String>, base_url: Url) -> Self {
        Self {
            command,
            env: Vec::new(),
            cwd: None,
            base_url,
            name: default_name(),
            start_timeout: default_start_timeout(),
            probe_interval: default_probe_interval(),
            probe_timeout: default_probe_timeout(),
            health_interval: default_health_interval(),
            health_failures_before_restart: default_health_failures(),
            backoff: BackoffConfig::default(),
            crash_loop: CrashLoopConfig::default(),
            stop_grace: default_stop_grace(),
            warmup: None,
            warmup_timeout: default_warmup_timeout(),
        }
    }

    /// Checks every value; the error names the first key that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.command.first() {
            None => {
                return Err(bad(
                    "command",
                    "is empty: give the program and its arguments",
                ));
            }
            Some(p) if p.trim().is_empty() => {
                return Err(bad("command", "starts with an empty program name"));
            }
            Some(_) => {}
        }
        if let Some(i) = self.command.iter().position(|a| a.contains('\0')) {
            return Err(bad("command", format!("argument {i} contains a NUL byte")));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(bad(
                    "env",
                    format!("variable name {key:?} is empty or holds '=' or NUL"),
                ));
            }
            if value.contains('\0') {
                return Err(bad("env", format!("value of {key} contains a NUL byte")));
            }
        }
        if let Some(cwd) = &self.cwd
            && cwd.as_os_str().is_empty()
        {
            return Err(bad(
                "cwd",
                "is empty; leave it out to use the daemon's directory",
            ));
        }
        let url = &self.base_url;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(bad(
                "base_url",
                format!("must be http:// or https://, got {url}"),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("base_url", format!("has no host: {url}")));
        }
        if url.port_or_known_default().is_none() {
            return Err(bad("base_url", format!("has no port: {url}")));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "base_url",
                format!("must not carry a query or fragment: {url}"),
            ));
        }
        if self.name.trim().is_empty() {
            return Err(bad("name", "is empty"));
        }
        positive("start_timeout", self.start_timeout)?;
        positive("probe_interval", self.probe_interval)?;
        positive("probe_timeout", self.probe_timeout)?;
        positive("health_interval", self.health_interval)?;
        positive("stop_grace", self.stop_grace)?;
        positive("warmup_timeout", self.warmup_timeout)?;
        if self.health_failures_before_restart == 0 {
            return Err(bad("health_failures_before_restart", "must be at least 1"));
        }
        positive("backoff.initial", self.backoff.initial)?;
        if self.backoff.max < self.backoff.initial {
            return Err(bad(
                "backoff.max",
                format!(
                    "({}) is smaller than backoff.initial ({})",
                    humantime::format_duration(self.backoff.max),
                    humantime::format_duration(self.backoff.initial)
                ),
            ));
        }
        if !self.backoff.factor.is_finite() || self.backoff.factor < 1.0 {
            return Err(bad(
                "backoff.factor",
                format!(
                    "must be a finite number >= 1.0, got {}",
                    self.backoff.factor
                ),
            ));
        }
        if self.crash_loop.restarts == 0 {
            return Err(bad("crash_loop.restarts", "must be at least 1"));
        }
        positive("crash_loop.window", self.crash_loop.window)?;
        if let Some(w) = &self.warmup {
            match w.as_object() {
                None => {
                    return Err(bad(
                        "warmup",
                        "must be an API-format workflow (a JSON object of nodes)",
                    ));
                }
                Some(nodes) if nodes.is_empty() => return Err(bad("warmup", "has no nodes")),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The URL of `GET /system_stats` under `base_url`.
    pub(crate) fn endpoint(&self, path: &str) -> Url {
        let mut base = self.base_url.clone();
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        base.join(path).unwrap_or(base)
    }
}

fn positive(field: &'static str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(bad(field, "must be greater than zero"))
    } else {
        Ok(())
    }
}

fn deserialize_url<'de, D>(d: D) -> Result<Url, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    Url::parse(&text).map_err(|e| serde::de::Error::custom(format!("invalid URL {text:?}: {e}")))
}

fn deserialize_env<'de, D>(d: D) -> Result<Vec<(String, String)>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Env {
        Table(BTreeMap<String, String>),
        Pairs(Vec<(String, String)>),
    }
    match Env::deserialize(d) {
        Ok(Env::Table(t)) => Ok(t.into_iter().collect()),
        Ok(Env::Pairs(p)) => Ok(p),
        Err(_) => Err(serde::de::Error::custom(
            "env must be a table of strings or a list of [\"KEY\", \"value\"] pairs",
        )),
    }
}

/// Durations as humantime strings or as a number of seconds.
mod duration_serde {
    use super::*;

    pub(super) fn deserialize<'de, D>(d: D) -> Result<Duration, D::Error>
    where
        D: serde::Deserializer<'de>,
    {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl serde::de::Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"5s\", \"200ms\" or a number of seconds")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v)
                .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("duration must not be negative, got {v}")))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v)
                .map_err(|e| E::custom(format!("invalid duration {v} s: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_src: &str) -> Result<SupervisorConfig, toml::de::Error> {
        toml::from_str(toml_src)
    }

    #[test]
    fn defaults_fill_a_minimal_table() {
        let c = parse(
            r#"
            command = ["python", "main.py", "--port", "8188"]
            base_url = "http://127.0.0.1:8188"
            "#,
        )
        .expect("minimal config parses");
        c.validate().expect("minimal config is valid");
        assert_eq!(c.start_timeout, Duration::from_secs(120));
        assert_eq!(c.probe_interval, Duration::from_millis(200));
        assert_eq!(c.health_interval, Duration::from_secs(5));
        assert_eq!(c.backoff, BackoffConfig::default());
        assert_eq!(c.backoff.initial, Duration::from_secs(1));
        assert_eq!(c.backoff.max, Duration::from_secs(60));
        assert_eq!(c.crash_loop.restarts, 5);
        assert_eq!(c.crash_loop.window, Duration::from_secs(300));
        assert_eq!(c.name, "comfyui");
        assert_eq!(
            c,
            SupervisorConfig::new(c.command.clone(), c.base_url.clone())
        );
    }

    #[test]
    fn durations_env_and_nested_tables_parse() {
        let c = parse(
            r#"
            command = ["kilnd", "comfy-sim"]
            base_url = "http://127.0.0.1:9000/"
            env = { CUDA_VISIBLE_DEVICES = "0", HOME = "/tmp" }
            start_timeout = "90s"
            probe_interval = 0.25
            health_interval = 7
            backoff = { initial = "500ms", max = "2m", factor = 1.5 }
            crash_loop = { restarts = 3, window = "1m" }
            warmup = { "1" = { class_type = "EmptyImage", inputs = {} } }
            "#,
        )
        .expect("full config parses");
        c.validate().expect("full config is valid");
        assert_eq!(c.start_timeout, Duration::from_secs(90));
        assert_eq!(c.probe_interval, Duration::from_millis(250));
        assert_eq!(c.health_interval, Duration::from_secs(7));
        assert_eq!(c.backoff.max, Duration::from_secs(120));
        assert_eq!(c.crash_loop.window, Duration::from_secs(60));
        assert_eq!(
            c.env,
            vec![
                ("CUDA_VISIBLE_DEVICES".into(), "0".into()),
                ("HOME".into(), "/tmp".into())
            ]
        );
        let pairs = parse(
            r#"
            command = ["x"]
            base_url = "http://127.0.0.1:1"
            env = [["A", "1"], ["A", "2"]]
            "#,
        )
        .expect("env pairs parse");
        assert_eq!(pairs.env.len(), 2);
        assert_eq!(
            c.endpoint("system_stats").as_str(),
            "http://127.0.0.1:9000/system_stats"
        );
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused_by_name() {
        let e = parse(
            r#"
            command = ["x"]
            base_url = "http://127.0.0.1:1"
            start_timout = "5s"
            "#,
        )
        .expect_err("misspelt key must be refused");
        assert!(e.to_string().contains("start_timout"), "{e}");
        let e = parse(
            r#"
            command = ["x"]
            base_url = "http://127.0.0.1:1"
            stop_grace = "soon"
            "#,
        )
        .expect_err("bad duration must be refused");
        assert!(e.to_string().contains("soon"), "{e}");
        let e = parse(
            r#"
            command = ["x"]
            base_url = "http://127.0.0.1:1"
            backoff = { initial = "1s", maximum = "2s" }
            "#,
        )
        .expect_err("unknown nested key must be refused");
        assert!(e.to_string().contains("maximum"), "{e}");
    }

    #[test]
    fn validate_names_the_field() {
        let base = SupervisorConfig::new(
            vec!["python".into()],
            Url::parse("http://127.0.0.1:8188").expect("url"),
        );
        type Mutation = Box<dyn Fn(&mut SupervisorConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("command", Box::new(|c| c.command.clear())),
            ("command", Box::new(|c| c.command = vec![" ".into()])),
            (
                "env",
                Box::new(|c| c.env = vec![("A=B".into(), "1".into())]),
            ),
            (
                "base_url",
                Box::new(|c| c.base_url = Url::parse("ftp://x:1").expect("url")),
            ),
            (
                "base_url",
                Box::new(|c| c.base_url = Url::parse("http://x:1/?a=b").expect("url")),
            ),
            ("name", Box::new(|c| c.name = String::new())),
            (
                "start_timeout",
                Box::new(|c| c.start_timeout = Duration::ZERO),
            ),
            (
                "probe_interval",
                Box::new(|c| c.probe_interval = Duration::ZERO),
            ),
            (
                "health_interval",
                Box::new(|c| c.health_interval = Duration::ZERO),
            ),
            (
                "health_failures_before_restart",
                Box::new(|c| c.health_failures_before_restart = 0),
            ),
            (
                "backoff.initial",
                Box::new(|c| c.backoff.initial = Duration::ZERO),
            ),
            (
                "backoff.max",
                Box::new(|c| c.backoff.max = Duration::from_millis(10)),
            ),
            ("backoff.factor", Box::new(|c| c.backoff.factor = 0.5)),
            ("backoff.factor", Box::new(|c| c.backoff.factor = f64::NAN)),
            (
                "crash_loop.restarts",
                Box::new(|c| c.crash_loop.restarts = 0),
            ),
            (
                "crash_loop.window",
                Box::new(|c| c.crash_loop.window = Duration::ZERO),
            ),
            ("stop_grace", Box::new(|c| c.stop_grace = Duration::ZERO)),
            (
                "warmup",
                Box::new(|c| c.warmup = Some(serde_json::json!([1, 2]))),
            ),
            (
                "warmup",
                Box::new(|c| c.warmup = Some(serde_json::json!({}))),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = base.clone();
            mutate(&mut c);
            let e = c.validate().expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }
}
