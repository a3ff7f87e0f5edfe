//! Building a [`Provider`] from `kiln.toml`: the one place that turns a provider's config section
//! and credentials into a client.

use anyhow::{Context, bail};

use super::local::LocalProvider;
use super::{Provider, ProviderKind};
use crate::config::KilnConfig;

/// The client for `kind`, from its `[providers.<kind>]` section. `env` looks up environment
/// variables (the API keys' fallback), so tests pass their own.
pub fn build(
    kind: ProviderKind,
    config: &KilnConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Box<dyn Provider>> {
    if kind == ProviderKind::Local {
        let section = config
            .providers
            .local
            .clone()
            .with_context(|| "provider local: kiln.toml has no [providers.local] section")?;
        let kilnd = section.kilnd_path()?;
        return Ok(Box::new(LocalProvider::new(section, kilnd)));
    }
    let section = config
        .providers
        .cloud(kind)
        .with_context(|| format!("provider {kind}: kiln.toml has no [providers.{kind}] section"))?;
    let base = section.base_url(kind)?;
    let api_key = section.api_key(kind, env)?;
    match kind {
        ProviderKind::Vast => {
            // wired when the cloud clients land: VastClient::new(base, api_key.into_inner())
            drop((base, api_key));
            bail!("vast client is not available in this build")
        }
        ProviderKind::Runpod => {
            let graphql = section.graphql_url()?;
            // wired when the cloud clients land: RunpodClient::new(base, graphql, api_key.into_inner())
            drop((base, graphql, api_key));
            bail!("runpod client is not available in this build")
        }
        ProviderKind::Lambda => {
            // wired when the cloud clients land: LambdaClient::new(base, api_key.into_inner())
            drop((base, api_key));
            bail!("lambda client is not available in this build")
        }
        ProviderKind::Local => unreachable!("handled above"),
    }
}

/// Built clients, and the providers whose client could not be built with why.
pub type Built = (Vec<Box<dyn Provider>>, Vec<(ProviderKind, anyhow::Error)>);

/// The clients of every configured provider that can be built, and the errors of those that
/// cannot (a missing key, a client not in this build), for callers that go on without them.
pub fn build_all(config: &KilnConfig, env: &dyn Fn(&str) -> Option<String>) -> Built {
    let mut built = Vec::new();
    let mut failed = Vec::new();
    for kind in config.providers.configured() {
        match build(kind, config, env) {
            Ok(provider) => built.push(provider),
            Err(error) => failed.push((kind, error)),
        }
    }
    (built, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_without_a_section_is_refused_by_name() {
        let config = KilnConfig::parse("").expect("valid");
        let none = |_: &str| None;
        let err = build(ProviderKind::Local, &config, &none)
            .err()
            .expect("no section");
        assert!(err.to_string().contains("[providers.local]"), "{err}");
        let err = build(ProviderKind::Runpod, &config, &none)
            .err()
            .expect("no section");
        assert!(err.to_string().contains("[providers.runpod]"), "{err}");
    }

    #[test]
    fn cloud_credentials_are_checked_before_the_client() {
        let config =
            KilnConfig::parse("[providers.lambda]\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1\n")
                .expect("valid");
        let none = |_: &str| None;
        let err = build(ProviderKind::Lambda, &config, &none)
            .err()
            .expect("no key");
        assert!(err.to_string().contains("LAMBDA_API_KEY"), "{err}");
        let env = |name: &str| (name == "LAMBDA_API_KEY").then(|| "secret-key".to_string());
        // With a key the client is built (or, in a build without cloud clients, refused);
        // either way the key never shows.
        match build(ProviderKind::Lambda, &config, &env) {
            Ok(provider) => assert_eq!(provider.kind(), ProviderKind::Lambda),
            Err(err) => assert!(!format!("{err:#}").contains("secret-key"), "{err:#}"),
        }
        let (built, failed) = build_all(&config, &env);
        assert_eq!(built.len() + failed.len(), 1);
    }

    #[test]
    fn the_local_provider_is_built_from_its_section() {
        let config = KilnConfig::parse(
            "[providers.local]\nkilnd = \"/bin/true\"\nbase_dir = \"/tmp/n\"\nca_dir = \"/tmp/c\"\nkeys_file = \"/tmp/k\"\n",
        )
        .expect("valid");
        let provider = build(ProviderKind::Local, &config, &|_| None).expect("local");
        assert_eq!(provider.kind(), ProviderKind::Local);
    }
}
