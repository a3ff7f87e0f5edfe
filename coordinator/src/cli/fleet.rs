//! The manual fleet actions: `kiln rent`, `kiln pause`, `kiln resume`, `kiln release`,
//! `kiln inventory` and `kiln reconcile`, all driven by `kiln.toml`.
//!
//! Every state change goes through the inventory (with a history entry) and every action is
//! written to the actions log with its outcome, the same records the control loop keeps. The
//! operations themselves ([`rent`], [`pause`], [`resume`], [`release`]) are library functions
//! over a [`Provider`] and an [`Inventory`] with the clock passed in; the commands only load the
//! config, build the provider and print.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;

use crate::config::KilnConfig;
use crate::fleet::HostState;
use crate::inventory::{self, ActionEntry, Inventory, InventoryHost, NewHost, Pricing};
use crate::provider::{OfferQuery, Provider, ProviderError, ProviderKind, RentRequest, build};
use crate::text::{self, Align, clean};

/// The options every fleet command takes.
#[derive(Debug, Clone, Args)]
pub struct FleetOptions {
    /// The coordinator's config file.
    #[arg(
        long,
        env = "KILN_CONFIG",
        default_value = "kiln.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RentArgs {
    /// The provider to rent from: vast, runpod, lambda or local.
    #[arg(long)]
    pub provider: ProviderKind,
    /// Rent interruptible (spot) capacity, bidding the offer's price.
    #[arg(long)]
    pub spot: bool,
    /// The host's name (its node name and label) [default: <provider>-<n>].
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub options: FleetOptions,
}

#[derive(Debug, Args)]
pub struct HostArgs {
    /// The host's name, as `kiln inventory` lists it.
    pub host: String,
    #[command(flatten)]
    pub options: FleetOptions,
}

#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Show released hosts too.
    #[arg(long)]
    pub all: bool,
    /// Show this host's state history instead of the list.
    #[arg(long, value_name = "HOST")]
    pub history: Option<String>,
    #[command(flatten)]
    pub options: FleetOptions,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub options: FleetOptions,
}

/// The wall clock in Unix milliseconds (what the commands pass as `now`).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A time in Unix milliseconds as RFC 3339 to the second.
pub fn format_ms(ms: i64) -> String {
    let time = if ms >= 0 {
        UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH
    };
    humantime::format_rfc3339_seconds(time).to_string()
}

/// How a rent is asked for.
#[derive(Debug, Clone, Default)]
pub struct RentOptions {
    pub name: Option<String>,
    /// Spot capacity; `None` takes the provider section's `spot`.
    pub spot: Option<bool>,
    pub reason: String,
}

fn log_action(
    inventory: &mut Inventory,
    at_ms: i64,
    action: &str,
    host: &str,
    reason: &str,
    outcome: &anyhow::Result<()>,
) -> anyhow::Result<()> {
    inventory.record_action(&ActionEntry {
        at_ms,
        action: action.into(),
        host: Some(host.into()),
        reason: reason.into(),
        outcome: match outcome {
            Ok(()) => "ok".into(),
            Err(e) => format!("error: {e:#}"),
        },
    })?;
    Ok(())
}

/// The first free `<provider>-<n>` name.
fn default_name(inventory: &Inventory, kind: ProviderKind) -> anyhow::Result<String> {
    for n in 1..=100_000u32 {
        let name = format!("{kind}-{n}");
        if inventory.host(&name)?.is_none() {
            return Ok(name);
        }
    }
    bail!("no free {kind}-<n> name; give --name")
}

/// Rents one host from `provider`: the cheapest offer for the provider's section, recorded in
/// the inventory (as `provisioning`) before the provider is asked, then its id and address.
/// A rent the provider refused outright leaves the host `released`; one whose outcome is
/// unknown (a timeout) leaves it `failed`, to be found by its label or released.
pub async fn rent(
    inventory: &mut Inventory,
    provider: &dyn Provider,
    config: &KilnConfig,
    options: &RentOptions,
    clock: &dyn Fn() -> i64,
) -> anyhow::Result<InventoryHost> {
    let kind = provider.kind();
    let (query, disk_gb, stopped_price, image, template, ports, section_spot) = match kind {
        ProviderKind::Local => {
            let local = config
                .providers
                .local
                .as_ref()
                .context("kiln.toml has no [providers.local] section")?;
            (
                OfferQuery {
                    gpu: String::new(),
                    num_gpus: 1,
                    disk_gb: 0,
                    min_reliability: 0.0,
                    max_price_per_hour: local.price_per_hour,
                    spot: false,
                },
                0,
                local.stopped_price_per_hour,
                None,
                None,
                Vec::new(),
                false,
            )
        }
        cloud => {
            let section = config
                .providers
                .cloud(cloud)
                .with_context(|| format!("kiln.toml has no [providers.{cloud}] section"))?;
            (
                OfferQuery {
                    gpu: section.gpu.clone(),
                    num_gpus: section.num_gpus,
                    disk_gb: section.disk_gb,
                    min_reliability: section.min_reliability,
                    max_price_per_hour: section.max_price_per_hour,
                    spot: section.spot,
                },
                section.disk_gb,
                0.0,
                section.image.clone(),
                section.template.clone(),
                section.ports.clone(),
                section.spot,
            )
        }
    };
    let spot = options.spot.unwrap_or(section_spot);
    if spot && kind == ProviderKind::Lambda {
        bail!("lambda has no spot capacity");
    }
    let query = OfferQuery { spot, ..query };
    let name = match &options.name {
        Some(name) => name.clone(),
        None => default_name(inventory, kind)?,
    };
    if inventory.host(&name)?.is_some() {
        bail!("a host named `{name}` is already in the inventory; choose another --name");
    }
    // Before anything is stored: a host that cannot be handed its certificate is not rented.
    let (onstart, env) = match config.providers.cloud(kind) {
        Some(section) => member_handoff(kind, section, &name)?,
        None => (None, BTreeMap::new()),
    };
    let offers = provider
        .offers(&query)
        .await
        .with_context(|| format!("asking {kind} for offers"))?;
    inventory.record_offers(&offers, clock())?;
    let Some(offer) = offers.into_iter().next() else {
        bail!(
            "{kind} has no offer matching the config (gpu {:?}, at most ${}/h)",
            query.gpu,
            query.max_price_per_hour
        );
    };
    let pricing = Pricing {
        price_per_hour: offer.price_per_hour,
        stopped_price_per_hour: stopped_price,
        disk_gb,
        storage_per_gb_month: offer.storage_per_gb_month,
    };
    inventory.add_host(
        &NewHost {
            name: name.clone(),
            provider: kind,
            spot,
            primary: false,
            pricing,
        },
        clock(),
        &options.reason,
    )?;
    let request = RentRequest {
        label: name.clone(),
        offer_id: offer.offer_id.clone(),
        image,
        template,
        onstart,
        env,
        ports,
        disk_gb,
        bid_per_hour: spot.then(|| offer.price_per_hour / f64::from(offer.num_gpus.max(1))),
    };
    let outcome = provider.rent(&request).await;
    let now = clock();
    match outcome {
        Ok(host) => {
            inventory.set_rented(&name, &host.id, &host.address)?;
            if let Some(price) = host.price_per_hour
                && price.is_finite()
                && price >= 0.0
                && (price - pricing.price_per_hour).abs() > 1e-9
            {
                let billed = Pricing {
                    price_per_hour: price,
                    ..pricing
                };
                inventory.set_pricing(&name, &billed, now)?;
            }
            if let crate::provider::HostStatus::Failed(detail) = &host.status {
                inventory.set_state(
                    &name,
                    HostState::Failed,
                    now,
                    &format!("rented, but {kind} reports a fault: {detail}"),
                )?;
            }
            log_action(inventory, now, "rent", &name, &options.reason, &Ok(()))?;
            Ok(inventory.require(&name)?)
        }
        Err(error) => {
            let to = if error.is_retryable() {
                HostState::Failed
            } else {
                HostState::Released
            };
            inventory.set_state(&name, to, now, &format!("rent failed: {error}"))?;
            let error = anyhow::Error::new(error).context(format!("renting {name} from {kind}"));
            let logged = Err(anyhow::anyhow!("{error:#}"));
            log_action(inventory, now, "rent", &name, &options.reason, &logged)?;
            Err(error)
        }
    }
}

/// What a rented cloud host needs to join the cluster: its certificate bundle (issued from the
/// section's `ca_dir` into `members_dir/<name>`), seeds and operator token in its environment,
/// and an onstart that runs the image's entry point. Vast.ai caps each environment item at 256
/// characters, so there the bundle travels in the onstart script (at most 4,096 characters);
/// elsewhere it is the `KILN_BUNDLE` variable. Nothing without `ca_dir`.
///
/// A Lambda VM has no Kiln image: its onstart ([`lambda_onstart`]) installs the node from the
/// `bootstrap_url` archive, and without one the rent is refused before a certificate is issued.
fn member_handoff(
    kind: ProviderKind,
    section: &crate::config::CloudSection,
    name: &str,
) -> anyhow::Result<(Option<String>, BTreeMap<String, String>)> {
    let mut env = BTreeMap::new();
    let Some(ca_dir) = &section.ca_dir else {
        return Ok((None, env));
    };
    let lambda_start = match kind {
        ProviderKind::Lambda => Some(lambda_onstart(section, name)?),
        _ => None,
    };
    let bundle = super::certs::member_bundle(
        ca_dir,
        name,
        &section.members_dir.join(name),
        kiln_daemon::pki::DEFAULT_CERT_DAYS,
        None,
        section.keys_file.as_deref(),
    )
    .with_context(|| format!("issuing the certificate bundle of {name}"))?;
    if !section.seeds.is_empty() {
        env.insert("KILN_SEEDS".to_string(), section.seeds.join(","));
    }
    if let Some(path) = &section.operator_token_file {
        let token = kiln_daemon::config::read_secret_file(path)
            .map_err(|m| anyhow::anyhow!("operator_token_file: {m}"))?;
        env.insert("KILN_OPERATOR_TOKEN".to_string(), token);
    }
    if let Some(onstart) = lambda_start {
        env.insert("KILN_BUNDLE".to_string(), bundle);
        return Ok((Some(onstart), env));
    }
    if kind != ProviderKind::Vast {
        env.insert("KILN_BUNDLE".to_string(), bundle);
        let onstart = format!(
            "#!/bin/sh\n# Kiln member {name}: the entry point unpacks KILN_BUNDLE and runs kilnd.\nexec {}\n",
            section.entry
        );
        return Ok((Some(onstart), env));
    }
    let onstart = super::certs::onstart_script(name, &bundle, &section.entry);
    if onstart.len() > super::certs::ONSTART_LIMIT {
        bail!(
            "the onstart script of {name} would be {} characters, over Vast.ai's {}: leave \
             keys_file out of [providers.vast] (the bundle then holds only certificates)",
            onstart.len(),
            super::certs::ONSTART_LIMIT
        );
    }
    Ok((Some(onstart), env))
}

/// What a Lambda VM runs at first boot to become member `name`:
/// - with `bootstrap_url`: the script that fetches that archive, checks `bootstrap_sha256` and
///   runs its `bootstrap.sh` (the bare Lambda Stack image has no Kiln on it);
/// - else, with `image` naming a family the operator built (not Lambda's own `lambda-stack-*` or
///   `ubuntu-*`): `exec <entry>`, which that image provides;
/// - else the rent is refused: the VM would boot, bill, and never join.
fn lambda_onstart(section: &crate::config::CloudSection, name: &str) -> anyhow::Result<String> {
    use crate::provider::lambda;
    if let (Some(url), Some(sha256)) = (&section.bootstrap_url, section.bootstrap_sha256_lower()) {
        return Ok(lambda::bootstrap_script(name, url, &sha256));
    }
    match section.image.as_deref() {
        Some(family) if !lambda::is_stock_image(family) => Ok(format!(
            "#!/bin/sh\n# Kiln member {name}: the image's entry point unpacks KILN_BUNDLE and runs kilnd.\nexec {}\n",
            section.entry
        )),
        _ => bail!(
            "a Lambda VM boots a bare Ubuntu image with no Kiln on it, so {name} would never join \
             the cluster: publish the node archive (provisioning/package.sh) and set \
             bootstrap_url and bootstrap_sha256 in [providers.lambda] (or set image to an image \
             family of yours that provides {})",
            section.entry
        ),
    }
}

/// What `kiln rent` warns about before renting from `kind` with `section`: a Lambda section
/// without firewall rulesets gets Lambda's default firewall (SSH and ICMP only), which keeps
/// other members from the VM's gossip and API ports.
pub fn rent_warnings(kind: ProviderKind, section: &crate::config::CloudSection) -> Vec<String> {
    let mut warnings = Vec::new();
    if kind == ProviderKind::Lambda && section.firewall_rulesets.is_empty() {
        let ports: Vec<String> = section
            .ports
            .iter()
            .map(|p| format!("{}/{}", p.port, protocol_name(p.protocol)))
            .collect();
        warnings.push(format!(
            "[providers.lambda] has no firewall_rulesets: Lambda's default firewall opens only SSH \
             and ICMP, so the cluster cannot reach the new VM on {}; create a ruleset that opens \
             them (at least 7946/udp for gossip and 7860/tcp for the API) and list its id",
            ports.join(", ")
        ));
    }
    warnings
}

fn protocol_name(protocol: crate::provider::Protocol) -> &'static str {
    match protocol {
        crate::provider::Protocol::Tcp => "tcp",
        crate::provider::Protocol::Udp => "udp",
    }
}

fn provider_id(host: &InventoryHost) -> anyhow::Result<&str> {
    host.record.provider_id.as_deref().with_context(|| {
        format!(
            "host {} has no {} id (its rent never completed); release it",
            host.record.name, host.record.provider
        )
    })
}

/// Stops a running host, keeping its disk: → `warm`.
pub async fn pause(
    inventory: &mut Inventory,
    provider: &dyn Provider,
    name: &str,
    reason: &str,
    clock: &dyn Fn() -> i64,
) -> anyhow::Result<InventoryHost> {
    let host = inventory.require(name)?;
    let state = host.record.state;
    if !state.bills_gpu() {
        bail!("host {name} is {state}; only a provisioning, hot or draining host can be paused");
    }
    if !host.record.provider.can_pause() {
        bail!(
            "host {name} is on {}, which cannot stop a host and keep its disk; release it instead",
            host.record.provider
        );
    }
    let id = provider_id(&host)?.to_string();
    let outcome = provider
        .stop(&id)
        .await
        .with_context(|| format!("stopping {name}"));
    record_step(
        inventory,
        name,
        "pause",
        reason,
        HostState::Warm,
        clock,
        outcome,
    )
}

/// Logs a provider call made for `name` as `action` and, when it succeeded, moves the host to
/// `to`; the call's error is returned after it is logged.
fn record_step(
    inventory: &mut Inventory,
    name: &str,
    action: &str,
    reason: &str,
    to: HostState,
    clock: &dyn Fn() -> i64,
    outcome: anyhow::Result<()>,
) -> anyhow::Result<InventoryHost> {
    let now = clock();
    let logged = outcome
        .as_ref()
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e:#}"));
    log_action(inventory, now, action, name, reason, &logged)?;
    outcome?;
    inventory.set_state(name, to, now, reason)?;
    Ok(inventory.require(name)?)
}

/// Starts a stopped host again: `warm` → `provisioning` (hot once the cluster sees it ready).
pub async fn resume(
    inventory: &mut Inventory,
    provider: &dyn Provider,
    name: &str,
    reason: &str,
    clock: &dyn Fn() -> i64,
) -> anyhow::Result<InventoryHost> {
    let host = inventory.require(name)?;
    if host.record.state != HostState::Warm {
        bail!(
            "host {name} is {}; only a warm host can be resumed",
            host.record.state
        );
    }
    let id = provider_id(&host)?.to_string();
    let outcome = provider
        .start(&id)
        .await
        .with_context(|| format!("starting {name}"));
    record_step(
        inventory,
        name,
        "resume",
        reason,
        HostState::Provisioning,
        clock,
        outcome,
    )
}

/// Destroys a host and its disk: → `released`. A host whose rent never completed (no provider
/// id) is looked up by its label first, so a rent that did land is destroyed too.
pub async fn release(
    inventory: &mut Inventory,
    provider: &dyn Provider,
    name: &str,
    reason: &str,
    clock: &dyn Fn() -> i64,
) -> anyhow::Result<InventoryHost> {
    let host = inventory.require(name)?;
    if host.record.state == HostState::Released {
        bail!("host {name} is already released");
    }
    let id = match &host.record.provider_id {
        Some(id) => Some(id.clone()),
        None => provider
            .find_by_label(&host.label)
            .await
            .with_context(|| format!("looking for {name} at {}", host.record.provider))?
            .map(|h| h.id),
    };
    let outcome = match &id {
        Some(id) => match provider.destroy(id).await {
            Ok(()) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("destroying {name}"))),
        },
        None => Ok(()),
    };
    record_step(
        inventory,
        name,
        "release",
        reason,
        HostState::Released,
        clock,
        outcome,
    )
}

/// Loads the config and opens its inventory.
pub fn open(options: &FleetOptions) -> anyhow::Result<(KilnConfig, Inventory)> {
    let config = KilnConfig::load(&options.config)?;
    let inventory = Inventory::open(&config.inventory.path)?;
    Ok((config, inventory))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn print_host(out: &mut dyn Write, json: bool, host: &InventoryHost) -> anyhow::Result<()> {
    if json {
        let text = serde_json::to_string_pretty(host).context("encoding the host")?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        out.write_all(hosts_table(std::slice::from_ref(host)).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

pub fn run_rent(args: RentArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (config, mut inventory) = open(&args.options)?;
    let provider = build::build(args.provider, &config, &env)?;
    if let Some(section) = config.providers.cloud(args.provider) {
        for warning in rent_warnings(args.provider, section) {
            eprintln!("kiln rent: warning: {warning}");
        }
    }
    let options = RentOptions {
        name: args.name,
        spot: args.spot.then_some(true),
        reason: "kiln rent (manual)".into(),
    };
    let host = runtime()?.block_on(rent(
        &mut inventory,
        provider.as_ref(),
        &config,
        &options,
        &now_ms,
    ))?;
    print_host(out, args.options.json, &host)
}

/// Which manual action a [`HostArgs`] command is.
#[derive(Debug, Clone, Copy)]
pub enum HostAction {
    Pause,
    Resume,
    Release,
}

pub fn run_host_action(
    action: HostAction,
    args: HostArgs,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (config, mut inventory) = open(&args.options)?;
    let host = inventory.require(&args.host)?;
    let provider = build::build(host.record.provider, &config, &env)?;
    let rt = runtime()?;
    let name = args.host.as_str();
    let host = match action {
        HostAction::Pause => rt.block_on(pause(
            &mut inventory,
            provider.as_ref(),
            name,
            "kiln pause (manual)",
            &now_ms,
        ))?,
        HostAction::Resume => rt.block_on(resume(
            &mut inventory,
            provider.as_ref(),
            name,
            "kiln resume (manual)",
            &now_ms,
        ))?,
        HostAction::Release => rt.block_on(release(
            &mut inventory,
            provider.as_ref(),
            name,
            "kiln release (manual)",
            &now_ms,
        ))?,
    };
    print_host(out, args.options.json, &host)
}

const HOST_COLUMNS: [(&str, Align); 8] = [
    ("NAME", Align::Left),
    ("PROVIDER", Align::Left),
    ("ID", Align::Left),
    ("STATE", Align::Left),
    ("SINCE", Align::Left),
    ("$/H", Align::Right),
    ("$/H STOPPED", Align::Right),
    ("ADDRESS", Align::Left),
];

/// Hosts as an aligned table; `$/H` is what the host costs in its state now.
pub fn hosts_table(hosts: &[InventoryHost]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let address = h
                .address
                .ports
                .iter()
                .map(|(spec, m)| {
                    format!(
                        "{}/{}={}:{}",
                        spec.port,
                        match spec.protocol {
                            crate::provider::Protocol::Tcp => "tcp",
                            crate::provider::Protocol::Udp => "udp",
                        },
                        m.host,
                        m.port
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                clean(&h.record.name),
                h.record.provider.to_string(),
                h.record.provider_id.as_deref().map_or("-".into(), clean),
                h.record.state.to_string(),
                format_ms(h.record.state_since_ms),
                format!("{:.3}", h.rate().total()),
                format!("{:.3}", h.record.stopped_price_per_hour),
                if address.is_empty() {
                    "-".into()
                } else {
                    clean(&address)
                },
            ]
        })
        .collect();
    text::table(&HOST_COLUMNS, &rows)
}

pub fn run_inventory(args: InventoryArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (_, inventory) = open(&args.options)?;
    if let Some(name) = &args.history {
        inventory.require(name)?;
        let history = inventory.history(name)?;
        if args.options.json {
            let text = serde_json::to_string_pretty(&history).context("encoding history")?;
            writeln!(out, "{text}").context("writing to stdout")?;
        } else {
            let rows: Vec<Vec<String>> = history
                .iter()
                .map(|e| {
                    vec![
                        format_ms(e.at_ms),
                        e.from.map_or("-".into(), |s| s.to_string()),
                        e.to.to_string(),
                        clean(&e.reason),
                    ]
                })
                .collect();
            let columns = [
                ("AT", Align::Left),
                ("FROM", Align::Left),
                ("TO", Align::Left),
                ("REASON", Align::Left),
            ];
            out.write_all(text::table(&columns, &rows).as_bytes())
                .context("writing to stdout")?;
        }
        return Ok(());
    }
    let hosts: Vec<InventoryHost> = inventory
        .hosts()?
        .into_iter()
        .filter(|h| args.all || h.record.state != HostState::Released)
        .collect();
    if args.options.json {
        let text = serde_json::to_string_pretty(&hosts).context("encoding hosts")?;
        writeln!(out, "{text}").context("writing to stdout")?;
    } else {
        out.write_all(hosts_table(&hosts).as_bytes())
            .context("writing to stdout")?;
    }
    Ok(())
}

pub fn run_reconcile(args: ReconcileArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (config, mut inventory) = open(&args.options)?;
    let (providers, failed) = build::build_all(&config, &env);
    let refs: Vec<&dyn Provider> = providers.iter().map(|p| p.as_ref()).collect();
    let mut report = runtime()?.block_on(inventory::reconcile(&mut inventory, &refs, now_ms()))?;
    for (kind, error) in failed {
        report.unreachable.push((kind, format!("{error:#}")));
    }
    if args.options.json {
        let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
        writeln!(out, "{text}").context("writing to stdout")?;
        return Ok(());
    }
    let mut text = String::new();
    for host in &report.unknown {
        text.push_str(&format!(
            "unknown: {} host {} (label {}, {}) is not in the inventory; left alone\n",
            host.provider,
            clean(&host.id),
            clean(host.label.as_deref().unwrap_or("-")),
            clean(&host.provider_status)
        ));
    }
    for name in &report.released {
        text.push_str(&format!(
            "released: {name} (its provider no longer knows it)\n"
        ));
    }
    for c in &report.corrected {
        text.push_str(&format!(
            "corrected: {} {} -> {} ({})\n",
            c.host,
            c.from,
            c.to,
            clean(&c.provider_status)
        ));
    }
    for (kind, error) in &report.unreachable {
        text.push_str(&format!("not checked: {kind}: {}\n", clean(error)));
    }
    if text.is_empty() {
        text.push_str("inventory and providers agree\n");
    }
    out.write_all(text.as_bytes()).context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lambda_section(extra: &str) -> crate::config::CloudSection {
        let text = format!(
            "[providers.lambda]\ngpu = \"gpu_1x_a10\"\nmax_price_per_hour = 1.0\n\
             ssh_key_name = \"kiln\"\nca_dir = \"ca\"\n{extra}"
        );
        KilnConfig::parse(&text)
            .expect("valid config")
            .providers
            .lambda
            .expect("lambda section")
    }

    const SHA: &str = "0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_lambda_vm_with_a_node_archive_runs_the_bootstrap() {
        let section = lambda_section(&format!(
            "bootstrap_url = \"https://releases.example.com/kiln-node.tar.gz\"\n\
             bootstrap_sha256 = \"{SHA}\"\nimage = \"kiln-node-family\"\n"
        ));
        let onstart = lambda_onstart(&section, "lambda-1").expect("onstart");
        assert!(
            onstart.contains("url='https://releases.example.com/kiln-node.tar.gz'\n"),
            "{onstart}"
        );
        assert!(
            onstart.contains(&format!("want='{}'\n", SHA.to_ascii_lowercase())),
            "{onstart}"
        );
        assert!(!onstart.contains("container-entry.sh"), "{onstart}");
    }

    #[test]
    fn a_lambda_vm_of_the_operators_own_image_execs_its_entry() {
        let section = lambda_section("image = \"kiln-node-family\"\nentry = \"/opt/kiln/start\"\n");
        let onstart = lambda_onstart(&section, "lambda-1").expect("onstart");
        assert!(onstart.ends_with("\nexec /opt/kiln/start\n"), "{onstart}");
    }

    #[test]
    fn a_bare_lambda_vm_is_refused_with_what_to_set() {
        for extra in ["", "image = \"lambda-stack-24-04\"\n"] {
            let section = lambda_section(extra);
            let err = lambda_onstart(&section, "lambda-1").expect_err("nothing to run");
            let message = err.to_string();
            assert!(
                message.contains("bootstrap_url")
                    && message.contains("bootstrap_sha256")
                    && message.contains("lambda-1"),
                "{message}"
            );
        }
    }

    #[test]
    fn lambda_without_firewall_rulesets_is_warned_about() {
        let warnings = rent_warnings(ProviderKind::Lambda, &lambda_section(""));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("firewall_rulesets") && warnings[0].contains("7860/tcp, 7946/udp"),
            "{warnings:?}"
        );
        let section = lambda_section("firewall_rulesets = [\"fw-kiln\"]\n");
        assert!(rent_warnings(ProviderKind::Lambda, &section).is_empty());
        let vast =
            KilnConfig::parse("[providers.vast]\ngpu = \"RTX 4090\"\nmax_price_per_hour = 1\n")
                .expect("valid")
                .providers
                .vast
                .expect("vast");
        assert!(rent_warnings(ProviderKind::Vast, &vast).is_empty());
    }
}
