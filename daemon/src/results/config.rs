//! `[storage]`: where outputs are kept and how the retention sweeper runs.

use std::time::Duration;

use serde::Deserialize;

use super::SweepSettings;

/// `[storage]` of the node config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Time between retention passes (humantime, e.g. `"10m"`).
    #[serde(
        default = "StorageConfig::default_sweep_interval",
        deserialize_with = "deserialize_duration"
    )]
    pub sweep_interval: Duration,
    /// Most jobs whose outputs one pass deletes.
    #[serde(default = "StorageConfig::default_sweep_batch")]
    pub sweep_batch: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            sweep_interval: Self::default_sweep_interval(),
            sweep_batch: Self::default_sweep_batch(),
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

    /// Checks the section; the error is (key, message).
    pub fn validate(&self) -> Result<(), (String, String)> {
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
