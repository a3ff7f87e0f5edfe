//! Building a [`Provider`] from `kiln.toml`: the one place that turns a provider's config section
//! and credentials into a client.

use anyhow::{Context, bail};

use super::local::LocalProvider;
use super::{LambdaClient, Provider, ProviderKind, RunpodClient, VastClient};
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
        ProviderKind::Vast => Ok(Box::new(VastClient::new(base, api_key.into_inner())?)),
        ProviderKind::Runpod => {
            let graphql = section.graphql_url()?;
            Ok(Box::new(RunpodClient::new(
                base,
                graphql,
                api_key.into_inner(),
            )?))
        }
        ProviderKind::Lambda => {
            let ssh_key = section.ssh_key_name.clone().with_context(
                || "providers.lambda.ssh_key_name: Lambda Cloud launches need an SSH key name",
            )?;
            Ok(Box::new(
                LambdaClient::new(base, api_key.into_inner())?
                    .with_ssh_key_name(ssh_key)
                    .with_regions(section.regions.clone())
                    .with_firewall_rulesets(section.firewall_rulesets.clone()),
            ))
        }
        ProviderKind::Local => bail!("the local provider is built above"),
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
        let config = KilnConfig::parse(
            "[providers.lambda]\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1\nssh_key_name = \"kiln\"\n",
        )
        .expect("valid");
        let none = |_: &str| None;
        let err = build(ProviderKind::Lambda, &config, &none)
            .err()
            .expect("no key");
        assert!(err.to_string().contains("LAMBDA_API_KEY"), "{err}");
        let env = |name: &str| (name == "LAMBDA_API_KEY").then(|| "secret-key".to_string());
        let provider = build(ProviderKind::Lambda, &config, &env).expect("client");
        assert_eq!(provider.kind(), ProviderKind::Lambda);
        let (built, failed) = build_all(&config, &env);
        assert_eq!((built.len(), failed.len()), (1, 0));
        let (built, failed) = build_all(&config, &none);
        assert_eq!((built.len(), failed.len()), (0, 1));
        assert!(!format!("{:#}", failed[0].1).contains("secret-key"));
    }

    #[test]
    fn every_cloud_client_is_built_from_its_section() {
        let config = KilnConfig::parse(
            "[providers.vast]\ngpu = \"RTX 4090\"\nmax_price_per_hour = 1\n\
             [providers.runpod]\ngpu = \"NVIDIA GeForce RTX 4090\"\nmax_price_per_hour = 1\n",
        )
        .expect("valid");
        let env = |name: &str| name.ends_with("_API_KEY").then(|| "k".to_string());
        for kind in [ProviderKind::Vast, ProviderKind::Runpod] {
            let provider = build(kind, &config, &env).expect("client");
            assert_eq!(provider.kind(), kind);
        }
        // Lambda without an SSH key name is refused by the config itself.
        let err =
            KilnConfig::parse("[providers.lambda]\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1\n")
                .expect_err("no ssh key");
        assert!(
            err.to_string().contains("providers.lambda.ssh_key_name"),
            "{err}"
        );
        let err = KilnConfig::parse(
            "[providers.vast]\ngpu = \"RTX 4090\"\nmax_price_per_hour = 1\nregions = [\"x\"]\n",
        )
        .expect_err("regions on vast");
        assert!(err.to_string().contains("providers.vast.regions"), "{err}");
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
