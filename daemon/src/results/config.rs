//! `[storage]`: where outputs are kept and how the retention sweeper runs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::SweepSettings;
use super::objects::Credentials;

/// The most `inline_max_bytes` allows: every inline byte is written to the WAL and then to the
/// database, and read back through SQLite's page cache, which pays only for small outputs.
const MAX_INLINE_BYTES: u64 = 1024 * 1024;

/// Where the owner keeps a job's outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// Files in the node's data dir (copied to the replica's).
    #[default]
    Disk,
    /// Objects in an S3-compatible bucket shared by the cluster.
    S3,
}

/// `[storage]` of the node config.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(default)]
    pub kind: StorageKind,
    /// The bucket (`kind = "s3"`).
    #[serde(default)]
    pub bucket: Option<String>,
    /// The S3 endpoint URL for R2, MinIO or a test server (none: AWS itself).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region; none: `auto` for an R2 endpoint, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Prepended to every key (`<prefix>/<job id>/<index>-<name>`).
    #[serde(default)]
    pub prefix: String,
    /// Allow an `http://` endpoint (local test servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// How long a presigned output URL works.
    #[serde(
        default = "StorageConfig::default_presign_ttl",
        deserialize_with = "deserialize_duration"
    )]
    pub presign_ttl: Duration,
    /// A file (mode 600) with `access_key_id` and `secret_access_key` lines (TOML); none: the
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` environment variables.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Time between retention passes (humantime, e.g. `"10m"`).
    #[serde(
        default = "StorageConfig::default_sweep_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub sweep_interval: Duration,
    /// Most jobs whose outputs one pass deletes.
    #[serde(default = "StorageConfig::default_sweep_batch")]
    pub sweep_batch: usize,
    /// `kind = "disk"`: outputs of at most this many bytes are kept in the job store's
    /// database instead of as files (0: all are files).
    #[serde(default = "StorageConfig::default_inline_max_bytes")]
    pub inline_max_bytes: u64,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("kind", &self.kind)
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("allow_http", &self.allow_http)
            .field("presign_ttl", &self.presign_ttl)
            .field("credentials_file", &self.credentials_file)
            .field("sweep_interval", &self.sweep_interval)
            .field("sweep_batch", &self.sweep_batch)
            .field("inline_max_bytes", &self.inline_max_bytes)
            .finish()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            kind: StorageKind::Disk,
            bucket: None,
            endpoint: None,
            region: None,
            prefix: String::new(),
            allow_http: false,
            presign_ttl: Self::default_presign_ttl(),
            credentials_file: None,
            sweep_interval: Self::default_sweep_interval(),
            sweep_batch: Self::default_sweep_batch(),
            inline_max_bytes: Self::default_inline_max_bytes(),
        }
    }
}

impl StorageConfig {
    fn default_sweep_interval() -> Duration {
        Duration::from_secs(600)
    }
    fn default_sweep_batch() -> usize {
        500
    }
    fn default_inline_max_bytes() -> u64 {
        crate::queue::DEFAULT_INLINE_MAX_BYTES
    }
    fn default_presign_ttl() -> Duration {
        Duration::from_secs(15 * 60)
    }

    /// The region to sign for.
    pub fn region(&self) -> String {
        match (&self.region, &self.endpoint) {
            (Some(region), _) => region.clone(),
            (None, Some(endpoint)) if endpoint.contains(".r2.cloudflarestorage.com") => {
                "auto".to_string()
            }
            _ => "us-east-1".to_string(),
        }
    }

    /// The bucket's access keys: from `credentials_file`, else from `env`
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`). The error is (key, message) and never
    /// contains a secret.
    pub fn credentials(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, (String, String)> {
        if let Some(path) = &self.credentials_file {
            let key = "storage.credentials_file".to_string();
            let text = crate::config::read_secret_file(path).map_err(|m| (key.clone(), m))?;
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct File {
                access_key_id: String,
                secret_access_key: String,
            }
            let file: File = toml::from_str(&text).map_err(|e| {
                (
                    key.clone(),
                    format!(
                        "{}: expected access_key_id = \"…\" and secret_access_key = \"…\" ({})",
                        path.display(),
                        e.message()
                    ),
                )
            })?;
            if file.access_key_id.is_empty() || file.secret_access_key.is_empty() {
                return Err((key, format!("{}: a key is empty", path.display())));
            }
            return Ok(Credentials {
                access_key_id: file.access_key_id,
                secret_access_key: file.secret_access_key,
            });
        }
        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Ok(Credentials {
                access_key_id: id,
                secret_access_key: secret,
            }),
            _ => Err((
                "storage.credentials_file".to_string(),
                "kind = \"s3\" needs credentials: set AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or name an owner-only credentials_file"
                    .to_string(),
            )),
        }
    }

    /// Checks the section; the error is (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let invalid = |key: &str, message: &str| Err((key.to_string(), message.to_string()));
        if self.kind == StorageKind::S3 {
            match &self.bucket {
                None => return invalid("storage.bucket", "kind = \"s3\" needs the bucket name"),
                Some(bucket)
                    if bucket.len() < 3
                        || bucket.len() > 63
                        || !bucket.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                        }) =>
                {
                    return invalid(
                        "storage.bucket",
                        "must be 3 to 63 characters of a-z, 0-9, '-' and '.'",
                    );
                }
                Some(_) => {}
            }
            if let Some(endpoint) = &self.endpoint {
                match url::Url::parse(endpoint) {
                    Ok(url) if url.scheme() == "https" && url.host_str().is_some() => {}
                    Ok(url)
                        if url.scheme() == "http"
                            && url.host_str().is_some()
                            && self.allow_http => {}
                    Ok(url) if url.scheme() == "http" => {
                        return invalid(
                            "storage.endpoint",
                            "an http:// endpoint needs allow_http = true (test servers only)",
                        );
                    }
                    _ => {
                        return invalid(
                            "storage.endpoint",
                            "must be an https:// URL, e.g. https://<account>.r2.cloudflarestorage.com",
                        );
                    }
                }
            }
            if self
                .prefix
                .split('/')
                .any(|part| part == "." || part == "..")
                || self.prefix.contains("//")
            {
                return invalid(
                    "storage.prefix",
                    "must not contain '.', '..' or empty segments",
                );
            }
            if self.presign_ttl < Duration::from_secs(1)
                || self.presign_ttl > Duration::from_secs(7 * 24 * 3600)
            {
                return invalid("storage.presign_ttl", "must be between 1s and 7 days");
            }
        } else if self.bucket.is_some()
            || self.endpoint.is_some()
            || self.credentials_file.is_some()
        {
            return invalid(
                "storage.kind",
                "bucket, endpoint and credentials_file are for kind = \"s3\"; set it",
            );
        }
        if self.sweep_interval < Duration::from_secs(1)
            || self.sweep_interval > Duration::from_secs(86_400)
        {
            return Err((
                "storage.sweep_interval".to_string(),
                "must be between 1s and 24h".to_string(),
            ));
        }
        if !(1..=100_000).contains(&self.sweep_batch) {
            return Err((
                "storage.sweep_batch".to_string(),
                "must be between 1 and 100000".to_string(),
            ));
        }
        if self.inline_max_bytes > MAX_INLINE_BYTES {
            return Err((
                "storage.inline_max_bytes".to_string(),
                format!(
                    "must be at most {MAX_INLINE_BYTES} (1 MiB; larger outputs belong in files)"
                ),
            ));
        }
        Ok(())
    }

    /// The sweeper's settings.
    pub fn sweep(&self) -> SweepSettings {
        SweepSettings {
            interval: self.sweep_interval,
            batch: self.sweep_batch,
            ..SweepSettings::default()
        }
    }
}

/// A humantime duration string (`"10m"`, `"30s"`).
pub(crate) fn deserialize_duration<'de, D>(d: D) -> Result<Duration, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<StorageConfig, (String, String)> {
        let config: StorageConfig =
            toml::from_str(text).map_err(|e| ("parse".to_string(), e.to_string()))?;
        config.validate().map(|()| config)
    }

    #[test]
    fn defaults_are_disk_and_a_ten_minute_sweep() {
        let config = parse("").expect("valid");
        assert_eq!(config.kind, StorageKind::Disk);
        assert_eq!(config.sweep_interval, Duration::from_secs(600));
        assert_eq!(config.presign_ttl, Duration::from_secs(900));
        assert_eq!(config.inline_max_bytes, 64 * 1024);
    }

    #[test]
    fn bad_sections_name_their_key() {
        for (text, key) in [
            ("kind = \"s3\"", "storage.bucket"),
            ("kind = \"s3\"\nbucket = \"Bad_Bucket\"", "storage.bucket"),
            (
                "kind = \"s3\"\nbucket = \"b-1\"\nendpoint = \"http://127.0.0.1:9000\"",
                "storage.endpoint",
            ),
            (
                "kind = \"s3\"\nbucket = \"b-1\"\nendpoint = \"not a url\"",
                "storage.endpoint",
            ),
            (
                "kind = \"s3\"\nbucket = \"b-1\"\nprefix = \"a/../b\"",
                "storage.prefix",
            ),
            (
                "kind = \"s3\"\nbucket = \"b-1\"\npresign_ttl = \"30days\"",
                "storage.presign_ttl",
            ),
            ("bucket = \"b-1\"", "storage.kind"),
            ("sweep_interval = \"0s\"", "storage.sweep_interval"),
            ("sweep_batch = 0", "storage.sweep_batch"),
            ("inline_max_bytes = 1048577", "storage.inline_max_bytes"),
            ("inline_max_bytes = -1", "parse"),
        ] {
            match parse(text) {
                Err((got, _)) => assert_eq!(got, key, "{text}"),
                Ok(_) => panic!("{text} was accepted"),
            }
        }
    }

    #[test]
    fn regions_and_credentials() {
        let r2 = parse(
            "kind = \"s3\"\nbucket = \"b-1\"\nendpoint = \"https://acct.r2.cloudflarestorage.com\"",
        )
        .expect("valid");
        assert_eq!(r2.region(), "auto");
        let aws = parse("kind = \"s3\"\nbucket = \"b-1\"").expect("valid");
        assert_eq!(aws.region(), "us-east-1");

        let from_env = aws
            .credentials(|name| Some(format!("value of {name}")))
            .expect("from env");
        assert_eq!(from_env.access_key_id, "value of AWS_ACCESS_KEY_ID");
        let debug = format!("{from_env:?}");
        assert!(!debug.contains("value of"), "{debug}");
        let (key, message) = aws.credentials(|_| None).expect_err("none");
        assert_eq!(key, "storage.credentials_file");
        assert!(message.contains("AWS_ACCESS_KEY_ID"), "{message}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s3.toml");
        std::fs::write(
            &path,
            "access_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"very-secret\"\n",
        )
        .expect("write");
        let mut config = aws.clone();
        config.credentials_file = Some(path.clone());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let (key, message) = config
                .credentials(|_| None)
                .expect_err("readable by others");
            assert_eq!(key, "storage.credentials_file");
            assert!(!message.contains("very-secret"), "{message}");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let from_file = config.credentials(|_| None).expect("from file");
        assert_eq!(from_file.secret_access_key, "very-secret");
        assert!(!format!("{config:?}").contains("very-secret"));
    }
}
