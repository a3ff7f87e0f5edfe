//! Tiers, accounts and API keys.
//!
//! The tier table comes from the config file with the seed's defaults (wait targets enterprise
//! 0 s, pro 30 s, premium 120 s, free 300 s; free 20 jobs a day; premium fair use 5,000 a month;
//! free jobs refused while their estimated wait is over 60 s). Scheduling priority is fixed by
//! [`Tier`]'s order and is not configurable.
//!
//! API keys live in a keys file that holds only SHA-256 hashes of the keys (keys are 256 random
//! bits, so a plain hash is enough: there is nothing to brute-force). `kiln keys add` appends to
//! the file; [`KeyRing`] notices a changed file and reloads it without a restart. This module
//! never stores or logs a plain key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::protocol::Tier;

/// The prefix of every Kiln API key, so that a leaked key is recognisable by secret scanners.
pub const KEY_PREFIX: &str = "kiln_";

/// One tier's limits and targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPolicy {
    /// The longest a job of this tier should wait before it starts, in seconds.
    pub wait_target_s: u64,
    /// Jobs an account may submit per UTC day; none means unlimited.
    #[serde(default)]
    pub daily_quota: Option<u64>,
    /// Images an account may make per calendar month before it is throttled (fair use).
    #[serde(default)]
    pub monthly_fair_use: Option<u64>,
    /// Refuse a new job with `busy` when its estimated wait is over this many seconds.
    #[serde(default)]
    pub admission_max_wait_s: Option<u64>,
    /// Whether outputs of this tier carry a watermark.
    #[serde(default)]
    pub watermark: bool,
    /// How long a succeeded job's outputs are kept after it finishes, as a humantime string
    /// (`"24h"`, `"30days"`); none means the tier's default (free 24 h, paid tiers 30 days).
    #[serde(
        default,
        deserialize_with = "deserialize_retention",
        serialize_with = "serialize_retention",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
}

/// The retention of free outputs unless configured.
pub const FREE_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// The retention of paid tiers' outputs unless configured.
pub const PAID_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The longest retention accepted (ten years): longer values overflow nothing, but are typos.
const MAX_RETENTION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

fn deserialize_retention<'de, D>(d: D) -> Result<Option<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

fn serialize_retention<S>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error>
where
    S: serde::Serializer,
{
    match value {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// The tier table: one [`TierPolicy`] per tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierTable {
    #[serde(default = "TierTable::default_free")]
    pub free: TierPolicy,
    #[serde(default = "TierTable::default_premium")]
    pub premium: TierPolicy,
    #[serde(default = "TierTable::default_pro")]
    pub pro: TierPolicy,
    #[serde(default = "TierTable::default_enterprise")]
    pub enterprise: TierPolicy,
}

impl Default for TierTable {
    fn default() -> Self {
        TierTable {
            free: Self::default_free(),
            premium: Self::default_premium(),
            pro: Self::default_pro(),
            enterprise: Self::default_enterprise(),
        }
    }
}

impl TierTable {
    fn default_free() -> TierPolicy {
        TierPolicy {
            wait_target_s: 300,
            daily_quota: Some(20),
            monthly_fair_use: None,
            admission_max_wait_s: Some(60),
            watermark: true,
            retention: None,
        }
    }
    fn default_premium() -> TierPolicy {
        TierPolicy {
            wait_target_s: 120,
            daily_quota: None,
            monthly_fair_use: Some(5_000),
            admission_max_wait_s: None,
            watermark: false,
            retention: None,
        }
    }
    fn default_pro() -> TierPolicy {
        TierPolicy {
            wait_target_s: 30,
            daily_quota: None,
            monthly_fair_use: None,
            admission_max_wait_s: None,
            watermark: false,
            retention: None,
        }
    }
    fn default_enterprise() -> TierPolicy {
        TierPolicy {
            wait_target_s: 0,
            daily_quota: None,
            monthly_fair_use: None,
            admission_max_wait_s: None,
            watermark: false,
            retention: None,
        }
    }

    pub fn get(&self, tier: Tier) -> &TierPolicy {
        match tier {
            Tier::Free => &self.free,
            Tier::Premium => &self.premium,
            Tier::Pro => &self.pro,
            Tier::Enterprise => &self.enterprise,
        }
    }

    /// How long `tier`'s outputs are kept: its configured `retention`, else free 24 h and
    /// paid tiers 30 days.
    pub fn retention(&self, tier: Tier) -> Duration {
        self.get(tier).retention.unwrap_or(match tier {
            Tier::Free => FREE_RETENTION,
            _ => PAID_RETENTION,
        })
    }

    /// Every tier's retention, for the job store.
    pub fn retentions(&self) -> Vec<(Tier, Duration)> {
        Tier::BY_PRIORITY
            .into_iter()
            .map(|tier| (tier, self.retention(tier)))
            .collect()
    }

    /// Checks the table; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        for tier in Tier::BY_PRIORITY {
            let policy = self.get(tier);
            if let Some(retention) = policy.retention
                && (retention < Duration::from_secs(1) || retention > MAX_RETENTION)
            {
                return Err(format!(
                    "tiers.{tier}.retention is {}; it must be between 1 second and 10 years",
                    humantime::format_duration(retention)
                ));
            }
            if policy.daily_quota == Some(0) {
                return Err(format!(
                    "tiers.{tier}.daily_quota is 0, which refuses every job; omit it for no limit"
                ));
            }
            if policy.monthly_fair_use == Some(0) {
                return Err(format!(
                    "tiers.{tier}.monthly_fair_use is 0; omit it for no limit"
                ));
            }
        }
        Ok(())
    }
}

/// An account as an API key identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    pub tier: Tier,
}

/// One line of the keys file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// `sha256:` followed by the hex SHA-256 of the key.
    pub hash: String,
    pub account: String,
    pub tier: Tier,
    /// When the key was made (RFC 3339), for the operator.
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
}

/// Errors reading or writing the keys file.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write keys file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("keys file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error(
        "account name {0:?} is not valid: use 1 to 64 characters from letters, digits, '-', '_', '.', '@'"
    )]
    BadAccount(String),
    #[error(
        "account {account:?} already has tier {existing} in the keys file; one account has one tier"
    )]
    TierMismatch { account: String, existing: Tier },
}

/// Hashes a plain key the way the keys file stores it.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("sha256:{}", hex::encode(digest))
}

/// Makes a new random API key: the prefix and 256 random bits in URL-safe base64.
pub fn generate_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Whether an account id is acceptable: short, printable, no spaces or quotes.
pub fn valid_account(account: &str) -> bool {
    !account.is_empty()
        && account.len() <= 64
        && account
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// Parses the keys file text. Every entry is checked; the error names the entry.
pub fn parse_keys(path: &Path, text: &str) -> Result<HashMap<String, Account>, KeysError> {
    let file: KeysFile = toml::from_str(text).map_err(|e| KeysError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut map = HashMap::with_capacity(file.key.len());
    let mut tiers: HashMap<&str, Tier> = HashMap::new();
    for (index, entry) in file.key.iter().enumerate() {
        let invalid = |message: String| KeysError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "key #{} (account {:?}): {message}",
                index + 1,
                entry.account
            ),
        };
        let hex_part = entry
            .hash
            .strip_prefix("sha256:")
            .ok_or_else(|| invalid("hash must start with \"sha256:\"".into()))?;
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                "hash must be 64 hex digits after \"sha256:\"".into(),
            ));
        }
        if !valid_account(&entry.account) {
            return Err(invalid("account name is not valid".into()));
        }
        if let Some(existing) = tiers.insert(&entry.account, entry.tier)
            && existing != entry.tier
        {
            return Err(invalid(format!(
                "the account already has tier {existing}; one account has one tier"
            )));
        }
        map.insert(
            entry.hash.to_ascii_lowercase(),
            Account {
                id: entry.account.clone(),
                tier: entry.tier,
            },
        );
    }
    Ok(map)
}

/// Appends a new key for `account` at `tier` to the keys file (creating it with mode 0600) and
/// returns the plain key, which is shown once and stored nowhere.
pub fn add_key(path: &Path, account: &str, tier: Tier) -> Result<String, KeysError> {
    use std::io::Write;
    if !valid_account(account) {
        return Err(KeysError::BadAccount(account.to_string()));
    }
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(KeysError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let keys = parse_keys(path, &existing)?;
    if let Some(other) = keys.values().find(|a| a.id == account && a.tier != tier) {
        return Err(KeysError::TierMismatch {
            account: account.to_string(),
            existing: other.tier,
        });
    }
    let key = generate_key();
    let entry = KeyEntry {
        hash: hash_key(&key),
        account: account.to_string(),
        tier,
        created_at: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
    };
    let mut block = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        block.push('\n');
    }
    block.push_str("\n[[key]]\n");
    block.push_str(&toml::to_string(&entry).map_err(|e| KeysError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?);
    let write_err = |source| KeysError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(write_err)?;
    file.write_all(block.as_bytes()).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(key)
}

#[derive(Debug, Default)]
struct Loaded {
    keys: HashMap<String, Account>,
    stamp: Option<(SystemTime, u64)>,
}

/// The keys a node accepts, reloaded when the keys file changes.
///
/// A reload that fails (a half-written or broken file) keeps the keys that were loaded before and
/// logs the error, so a typo in the file never locks every user out.
#[derive(Debug, Clone)]
pub struct KeyRing {
    path: Option<PathBuf>,
    inner: Arc<RwLock<Loaded>>,
}

impl KeyRing {
    /// Loads the keys file; an error here (at start) is fatal, unlike later reloads.
    pub fn load(path: &Path) -> Result<KeyRing, KeysError> {
        let ring = KeyRing {
            path: Some(path.to_path_buf()),
            inner: Arc::new(RwLock::new(Loaded::default())),
        };
        ring.reload_if_changed()?;
        Ok(ring)
    }

    /// A key ring with fixed entries and no file, for `--dev` and tests.
    pub fn fixed(entries: impl IntoIterator<Item = (String, Account)>) -> KeyRing {
        let keys = entries
            .into_iter()
            .map(|(key, account)| (hash_key(&key), account))
            .collect();
        KeyRing {
            path: None,
            inner: Arc::new(RwLock::new(Loaded { keys, stamp: None })),
        }
    }

    /// The account a plain key belongs to.
    pub fn authenticate(&self, key: &str) -> Option<Account> {
        let hash = hash_key(key);
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        guard.keys.get(&hash).cloned()
    }

    /// The tier of an account that has a key here (one account has one tier).
    pub fn tier_of(&self, account: &str) -> Option<Tier> {
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        guard
            .keys
            .values()
            .find(|a| a.id == account)
            .map(|a| a.tier)
    }

    /// How many keys are loaded.
    pub fn len(&self) -> usize {
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        guard.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rereads the file when its modification time or size changed. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, KeysError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let read_err = |source| KeysError::Read {
            path: path.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let stamp = (meta.modified().map_err(read_err)?, meta.len());
        {
            let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
            if guard.stamp == Some(stamp) {
                return Ok(false);
            }
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let keys = parse_keys(path, &text)?;
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        guard.keys = keys;
        guard.stamp = Some(stamp);
        Ok(true)
    }

    /// Polls the keys file every `interval` until `shutdown` fires, reloading it when it changes.
    pub async fn watch(
        self,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if self.path.is_none() {
            return;
        }
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let ring = self.clone();
            match tokio::task::spawn_blocking(move || ring.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!(keys = self.len(), "reloaded the keys file"),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "keeping the previous keys: the keys file could not be reloaded")
                }
                Err(error) => tracing::warn!(%error, "keys file reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_authenticate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.toml");
        let key = add_key(&path, "acme", Tier::Pro).expect("add key");
        assert!(key.starts_with(KEY_PREFIX));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains(&key), "the plain key must not be stored");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "keys file must not be readable by others");
        }
        let ring = KeyRing::load(&path).expect("load");
        assert_eq!(
            ring.authenticate(&key),
            Some(Account {
                id: "acme".into(),
                tier: Tier::Pro
            })
        );
        assert_eq!(ring.authenticate("kiln_wrong"), None);

        let second = add_key(&path, "bob", Tier::Free).expect("add second");
        // Make sure the stamp differs even on coarse file systems: the size changed.
        assert!(ring.reload_if_changed().expect("reload"));
        assert_eq!(ring.authenticate(&second).map(|a| a.tier), Some(Tier::Free));
        assert_eq!(ring.len(), 2);
    }

    #[test]
    fn one_account_one_tier() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.toml");
        add_key(&path, "acme", Tier::Pro).expect("add key");
        let err = add_key(&path, "acme", Tier::Free).expect_err("tier change refused");
        assert!(matches!(err, KeysError::TierMismatch { .. }));
        assert!(matches!(
            add_key(&path, "bad name", Tier::Free),
            Err(KeysError::BadAccount(_))
        ));
        assert_eq!(KeyRing::load(&path).expect("load").len(), 1);
    }

    #[test]
    fn broken_file_names_the_entry_and_reload_keeps_old_keys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.toml");
        let key = add_key(&path, "acme", Tier::Pro).expect("add key");
        let ring = KeyRing::load(&path).expect("load");
        std::fs::write(
            &path,
            "[[key]]\nhash = \"md5:abc\"\naccount = \"acme\"\ntier = \"pro\"\n",
        )
        .expect("write");
        let err = ring.reload_if_changed().expect_err("bad hash refused");
        assert!(err.to_string().contains("key #1"), "{err}");
        assert!(ring.authenticate(&key).is_some(), "old keys kept");
        std::fs::write(&path, "[[key]]\nhash = 1\n").expect("write");
        assert!(ring.reload_if_changed().is_err());
    }

    #[test]
    fn defaults_are_the_seed() {
        let table = TierTable::default();
        assert_eq!(table.free.wait_target_s, 300);
        assert_eq!(table.free.daily_quota, Some(20));
        assert_eq!(table.free.admission_max_wait_s, Some(60));
        assert_eq!(table.premium.wait_target_s, 120);
        assert_eq!(table.premium.monthly_fair_use, Some(5_000));
        assert_eq!(table.pro.wait_target_s, 30);
        assert_eq!(table.enterprise.wait_target_s, 0);
        table.validate().expect("defaults are valid");
    }
}
