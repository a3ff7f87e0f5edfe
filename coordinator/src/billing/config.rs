//! `[stripe]` in `kiln.toml`: where usage is pushed (Stripe's Billing Meter Events API), which
//! figure of a day is the meter's value, which Stripe customer each Kiln account is, and whether
//! `kiln run` pushes on its own.
//!
//! Parsing and checking only. The secret key is not part of the parsed config: it is read when a
//! client is built ([`StripeSection::api_key`]), from `api_key_file` (owner-only) or
//! `STRIPE_API_KEY`. A `customers_file` is read the same way, when the push is prepared
//! ([`StripeSection::customers`]), so that a config check never needs it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use url::Url;

use crate::config::ConfigError;
use crate::provider::ApiKey;

/// Stripe's API, unless `base_url` says otherwise (tests point it at a fake).
pub const DEFAULT_BASE_URL: &str = "https://api.stripe.com";
/// The meter's event name, unless `event_name` says otherwise.
pub const DEFAULT_EVENT_NAME: &str = "kiln_images";
/// The environment variable the secret key is read from when there is no `api_key_file`.
pub const API_KEY_ENV: &str = "STRIPE_API_KEY";
/// Stripe's limit on an event name's (and an identifier's) length.
pub const MAX_NAME_LEN: usize = 100;
/// The shortest and longest `push_interval` accepted.
const MIN_INTERVAL: Duration = Duration::from_secs(60);
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// Which figure of an account's day becomes the meter event's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Output images of the jobs that succeeded.
    #[default]
    Images,
    /// GPU seconds the account's jobs used (up to millisecond precision).
    GpuSeconds,
    /// Jobs that succeeded.
    Succeeded,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Images => "images",
            Metric::GpuSeconds => "gpu_seconds",
            Metric::Succeeded => "succeeded",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[stripe]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSection {
    /// A file holding the secret key (`sk_…` or a restricted `rk_…`), readable only by its
    /// owner; else the key is read from `STRIPE_API_KEY`.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Stripe's API base (default [`DEFAULT_BASE_URL`]); see [`StripeSection::base_url`].
    #[serde(default)]
    pub base_url: Option<Url>,
    #[serde(default = "default_event_name")]
    pub event_name: String,
    #[serde(default)]
    pub metric: Metric,
    /// Kiln account id → Stripe customer id (`cus_…`).
    #[serde(default)]
    pub customers: BTreeMap<String, String>,
    /// A TOML file of more `account = "cus_…"` lines (read when a push is prepared).
    #[serde(default)]
    pub customers_file: Option<PathBuf>,
    /// How often `kiln run` pushes (e.g. "1h"); absent: `kiln run` does not push.
    #[serde(default, deserialize_with = "de_interval")]
    pub push_interval: Option<Duration>,
}

fn default_event_name() -> String {
    DEFAULT_EVENT_NAME.to_string()
}

fn de_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| D::Error::custom(format!("push_interval: {text:?} is not a duration ({e})")))
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("stripe.{key}"),
        message: message.into(),
    }
}

/// Whether `id` looks like a Stripe customer id: `cus_` and letters or digits.
fn valid_customer(id: &str) -> bool {
    id.len() > 4
        && id.len() <= 255
        && id.starts_with("cus_")
        && id[4..].chars().all(|c| c.is_ascii_alphanumeric())
}

fn check_customers(key: &str, customers: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (account, customer) in customers {
        if !kiln_daemon::tiers::valid_account(account) {
            return Err(invalid(
                key,
                format!("{account:?} is not an account id (letters, digits, - _ . @; at most 64)"),
            ));
        }
        if !valid_customer(customer) {
            return Err(invalid(
                key,
                format!("{account}: {customer:?} is not a Stripe customer id (cus_…)"),
            ));
        }
    }
    Ok(())
}

impl StripeSection {
    /// The API base URL: the configured one or Stripe's.
    pub fn base_url(&self) -> Result<Url, ConfigError> {
        match &self.base_url {
            Some(url) => Ok(url.clone()),
            None => Url::parse(DEFAULT_BASE_URL).map_err(|e| invalid("base_url", e.to_string())),
        }
    }

    /// Checks what can be checked without reading a file or the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let base = self.base_url()?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(invalid(
                "base_url",
                "must be an http:// or https:// URL with a host",
            ));
        }
        let name = self.event_name.trim();
        if name.is_empty() || name != self.event_name {
            return Err(invalid(
                "event_name",
                "must not be empty or start or end with spaces",
            ));
        }
        if self.event_name.len() > MAX_NAME_LEN || self.event_name.chars().any(char::is_control) {
            return Err(invalid(
                "event_name",
                format!("must be at most {MAX_NAME_LEN} characters, without control characters"),
            ));
        }
        check_customers("customers", &self.customers)?;
        if let Some(path) = &self.customers_file
            && path.as_os_str().is_empty()
        {
            return Err(invalid("customers_file", "must not be empty"));
        }
        if let Some(interval) = self.push_interval
            && !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval)
        {
            return Err(invalid("push_interval", "must be between 1m and 24h"));
        }
        Ok(())
    }

    /// Makes relative paths absolute under `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [&mut self.api_key_file, &mut self.customers_file]
            .into_iter()
            .flatten()
        {
            if path.is_relative() && !path.as_os_str().is_empty() {
                *path = base.join(&*path);
            }
        }
    }

    /// The secret key: from `api_key_file` (refused when group or others can read it), else
    /// from `STRIPE_API_KEY`, looked up with `env`.
    pub fn api_key(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<ApiKey, ConfigError> {
        let key = match &self.api_key_file {
            Some(path) => kiln_daemon::config::read_secret_file(path)
                .map_err(|m| invalid("api_key_file", m))?,
            None => env(API_KEY_ENV).ok_or_else(|| {
                invalid(
                    "api_key_file",
                    format!(
                        "not given and {API_KEY_ENV} is not set: the Stripe secret key is needed"
                    ),
                )
            })?,
        };
        ApiKey::parse(key).map_err(|m| invalid("api_key_file", format!("the Stripe key {m}")))
    }

    /// Every account's customer: `[stripe.customers]` and the `customers_file`'s lines. An
    /// account given twice with two customers is refused, naming it.
    pub fn customers(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut all = self.customers.clone();
        let Some(path) = &self.customers_file else {
            return Ok(all);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid("customers_file", format!("{}: {e}", path.display())))?;
        let from_file: BTreeMap<String, String> = toml::from_str(&text).map_err(|e| {
            invalid(
                "customers_file",
                format!(
                    "{}: expected lines of account = \"cus_…\": {}",
                    path.display(),
                    e.to_string().trim_end()
                ),
            )
        })?;
        check_customers("customers_file", &from_file)?;
        for (account, customer) in from_file {
            match all.get(&account) {
                Some(existing) if *existing != customer => {
                    return Err(invalid(
                        "customers_file",
                        format!(
                            "{account} is {customer} there but {existing} in [stripe.customers]"
                        ),
                    ));
                }
                _ => {
                    all.insert(account, customer);
                }
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StripeSection, String> {
        let section: StripeSection = toml::from_str(text).map_err(|e| e.to_string())?;
        section.validate().map_err(|e| e.to_string())?;
        Ok(section)
    }

    #[test]
    fn defaults_and_keys() {
        let section = parse("").expect("an empty section is valid");
        assert_eq!(
            section.base_url().expect("default").as_str(),
            "https://api.stripe.com/"
        );
        assert_eq!(section.event_name, "kiln_images");
        assert_eq!(section.metric, Metric::Images);
        assert_eq!(section.push_interval, None);
        let section = parse(
            "metric = \"gpu_seconds\"\npush_interval = \"1h\"\n[customers]\nacme = \"cus_A1\"\n",
        )
        .expect("valid");
        assert_eq!(section.metric, Metric::GpuSeconds);
        assert_eq!(section.push_interval, Some(Duration::from_secs(3600)));
        assert_eq!(section.customers["acme"], "cus_A1");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("base_url = \"ftp://x\"\n", "stripe.base_url"),
            ("event_name = \"\"\n", "stripe.event_name"),
            ("push_interval = \"5s\"\n", "stripe.push_interval"),
            ("[customers]\nacme = \"acct_1\"\n", "stripe.customers"),
            ("[customers]\n\"a b\" = \"cus_1\"\n", "stripe.customers"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(key), "{text}: {error}");
        }
        assert!(parse("metric = \"jobs\"\n").is_err());
        assert!(parse("push_interval = \"soon\"\n").is_err());
        assert!(parse("colour = 1\n").is_err());
    }

    #[test]
    fn the_key_comes_from_an_owner_only_file_or_the_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stripe.key");
        std::fs::write(&path, "sk_test_123\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut section = parse("api_key_file = \"stripe.key\"\n").expect("valid");
        section.resolve_paths(dir.path());
        let no_env = |_: &str| None;
        let error = section.api_key(&no_env).expect_err("readable by others");
        assert!(error.to_string().contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let key = section.api_key(&no_env).expect("owner-only");
        assert_eq!(format!("{key:?}"), "***");
        let section = parse("").expect("valid");
        assert!(section.api_key(&no_env).is_err());
        let env = |name: &str| (name == API_KEY_ENV).then(|| "sk_test_9".to_string());
        assert!(section.api_key(&env).is_ok());
    }

    #[test]
    fn customers_merge_the_file_and_refuse_conflicts() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("c.toml"),
            "beta = \"cus_B\"\nacme = \"cus_A\"\n",
        )
        .expect("write");
        let mut section =
            parse("customers_file = \"c.toml\"\n[customers]\nacme = \"cus_A\"\n").expect("valid");
        section.resolve_paths(dir.path());
        let all = section.customers().expect("merged");
        assert_eq!(all.len(), 2);
        assert_eq!(all["beta"], "cus_B");
        std::fs::write(dir.path().join("c.toml"), "acme = \"cus_Z\"\n").expect("write");
        let error = section.customers().expect_err("conflict");
        assert!(error.to_string().contains("acme"), "{error}");
        std::fs::write(dir.path().join("c.toml"), "acme = 3\n").expect("write");
        assert!(section.customers().is_err());
    }

    #[test]
    fn kiln_run_pushing_needs_the_cluster_api() {
        use crate::config::KilnConfig;
        let error = KilnConfig::parse("[stripe]\npush_interval = \"1h\"\n").expect_err("no api");
        assert!(
            error.to_string().contains("stripe.push_interval"),
            "{error}"
        );
        KilnConfig::parse("[cluster]\napi = \"http://n:7860\"\n[stripe]\npush_interval = \"1h\"\n")
            .expect("valid");
        let error = KilnConfig::parse("[stripe]\nevent_name = \" x\"\n").expect_err("spaces");
        assert!(error.to_string().contains("stripe.event_name"), "{error}");
    }
}
