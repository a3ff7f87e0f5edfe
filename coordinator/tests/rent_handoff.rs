//! `kiln rent` on a cloud provider hands the new host what it needs to join the cluster: its
//! certificate bundle, the seeds and the operator token in its environment, and an onstart that
//! runs the image's entry point. Against the fake Vast.ai server.

mod fake_providers;

use std::io::Read;

use base64::Engine as _;
use fake_providers::KEY;
use fake_providers::vast::VastFake;
use kiln_coordinator::cli::fleet::{RentOptions, rent};
use kiln_coordinator::config::KilnConfig;
use kiln_coordinator::fleet::HostState;
use kiln_coordinator::inventory::Inventory;
use kiln_coordinator::provider::ProviderKind;
use kiln_coordinator::provider::build::build;

/// The file names inside a `KILN_BUNDLE` value (base64 of a tar.gz).
fn bundle_files(bundle: &str) -> Vec<String> {
    let gz = base64::engine::general_purpose::STANDARD
        .decode(bundle)
        .expect("base64");
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut tar)
        .expect("gzip");
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut names: Vec<String> = archive
        .entries()
        .expect("tar")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_cloud_rent_carries_the_hosts_certificate_bundle() {
    let fake = VastFake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    kiln_daemon::pki::init_ca(&dir.path().join("ca"), "kiln-test", 30).expect("ca");
    let token = dir.path().join("operator-token");
    std::fs::write(&token, "operator-token-0123456789").expect("token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let text = format!(
        "[inventory]\npath = \"inventory.db\"\n\n\
         [providers.vast]\nbase_url = \"{url}\"\ngpu = \"RTX 4090\"\nmax_price_per_hour = 1.0\n\
         image = \"ghcr.io/example/kiln-node:1\"\nca_dir = \"ca\"\n\
         seeds = [\"quic://203.0.113.7:7946\", \"quic://203.0.113.8:7946\"]\n\
         operator_token_file = \"operator-token\"\n",
        url = fake.url
    );
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, text).expect("config");
    let config = KilnConfig::load(&path).expect("config loads");
    let env = |name: &str| (name == "VAST_API_KEY").then(|| KEY.to_string());
    let provider = build(ProviderKind::Vast, &config, &env).expect("client");
    let mut inventory = Inventory::open(&config.inventory.path).expect("inventory");
    let options = RentOptions {
        name: Some("gpu-7".to_string()),
        spot: Some(false),
        reason: "test".to_string(),
    };
    let host = rent(
        &mut inventory,
        provider.as_ref(),
        &config,
        &options,
        &|| 1_000,
    )
    .await
    .expect("rent");
    assert_eq!(host.record.name, "gpu-7");
    assert_eq!(host.record.state, HostState::Provisioning);

    let body = fake
        .with(|s| s.last_rent.clone())
        .expect("the fake recorded the rent");
    assert_eq!(body["label"], "gpu-7");
    // Vast.ai caps an environment item at 256 characters: the bundle is in the onstart script.
    assert!(body["env"].get("KILN_BUNDLE").is_none(), "{body}");
    let onstart = body["onstart"].as_str().expect("onstart");
    assert!(onstart.len() <= 4096);
    let bundle = onstart
        .lines()
        .find_map(|l| l.strip_prefix("export KILN_BUNDLE='"))
        .and_then(|l| l.strip_suffix('\''))
        .expect("the onstart exports KILN_BUNDLE");
    assert_eq!(
        bundle_files(bundle),
        vec![
            "certs/ca.pem",
            "certs/cert.pem",
            "certs/crl.pem",
            "certs/key.pem"
        ]
    );
    assert_eq!(
        body["env"]["KILN_SEEDS"],
        "quic://203.0.113.7:7946,quic://203.0.113.8:7946"
    );
    assert_eq!(
        body["env"]["KILN_OPERATOR_TOKEN"],
        "operator-token-0123456789"
    );
    assert!(
        onstart.ends_with("exec /opt/kiln/container-entry.sh\n"),
        "{onstart}"
    );
    // The member's certificate is kept for the host, under its own name.
    let identity =
        kiln_daemon::pki::Identity::load_dir(&dir.path().join("members/gpu-7")).expect("issued");
    assert_eq!(identity.name(), "gpu-7");

    // A bundle that cannot be made (no CA there) refuses the rent before anything is stored.
    std::fs::remove_dir_all(dir.path().join("ca")).expect("remove ca");
    let options = RentOptions {
        name: Some("gpu-8".to_string()),
        spot: Some(false),
        reason: "test".to_string(),
    };
    let err = rent(
        &mut inventory,
        provider.as_ref(),
        &config,
        &options,
        &|| 2_000,
    )
    .await
    .expect_err("no CA");
    assert!(format!("{err:#}").contains("gpu-8"), "{err:#}");
    assert!(inventory.host("gpu-8").expect("read").is_none());
    assert_eq!(fake.with(|s| s.creates), 1);
}
