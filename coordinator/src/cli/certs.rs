//! `kiln certs …`: the cluster CA and its member certificates, on top of `kiln_daemon::pki`.
//!
//! This module only parses arguments and words the results; every file it makes is made by
//! `pki`, which refuses to overwrite a CA or a key. It never prints key material.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use kiln_daemon::pki;

use crate::text::{self, Align, short_time};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a cluster CA in a new folder (ca.pem, ca.key, crl.pem, issued.json).
    Init(CertsInit),
    /// Issue a member certificate (one per node, one for the coordinator) into a folder.
    Issue(CertsIssue),
    /// Revoke every certificate issued to a name and rewrite the CA's crl.pem.
    Revoke(CertsRevoke),
    /// List the certificates a CA issued.
    List(CertsList),
    /// Print a new host's certificates (and optionally its config and keys) as one environment
    /// value, KILN_BUNDLE=…, or as a Vast.ai onstart script, for provisioning/container-entry.sh.
    Bundle(CertsBundle),
}

#[derive(Debug, Args)]
pub struct CertsInit {
    /// The folder for the CA (created; refused if it already holds a CA).
    pub dir: PathBuf,
    /// The cluster's name (lowercase letters, digits, '-' and '.'); members name it in TLS.
    #[arg(long, default_value = "kiln")]
    pub cluster: String,
    /// How long the CA is valid, in days.
    #[arg(long, default_value_t = pki::DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// Print `{"dir", "cluster_id", "not_after"}` as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CertsIssue {
    /// The CA folder made by `kiln certs init`.
    #[arg(long = "ca", value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// The member's name (its node id; lowercase letters, digits, '-' and '.').
    pub name: String,
    /// The folder to write cert.pem, key.pem, ca.pem and crl.pem into [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// How long the certificate is valid, in days (never past the CA's expiry).
    #[arg(long, default_value_t = pki::DEFAULT_CERT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// Print what was issued and the files written as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CertsRevoke {
    /// The CA folder made by `kiln certs init`.
    #[arg(long = "ca", value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// The member name whose certificates are revoked.
    pub name: String,
    /// Print `{"name", "revoked_serials", "crl_number", "crl"}` as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CertsList {
    /// The CA folder made by `kiln certs init`.
    #[arg(long = "ca", value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// Print the ledger entries (`name`, `serial`, `not_after`, `revoked_at`) as a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CertsBundle {
    /// The CA folder made by `kiln certs init`.
    #[arg(long = "ca", value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// The member's name. Its certificate is issued into --member-dir unless one is there.
    #[arg(long, value_name = "NAME")]
    pub member: String,
    /// The member's certs folder (kept, to revoke or rotate later) [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    pub member_dir: Option<PathBuf>,
    /// How long a newly issued certificate is valid, in days.
    #[arg(long, default_value_t = pki::DEFAULT_CERT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// A kilnd config to include as kilnd.toml (checked first).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// An API keys file to include as keys.toml.
    #[arg(long, value_name = "FILE")]
    pub keys_file: Option<PathBuf>,
    /// Print a Vast.ai onstart script (at most 4,096 characters) that runs the entry point with
    /// the bundle, instead of the KILN_BUNDLE=… line.
    #[arg(long)]
    pub onstart: bool,
    /// The container entry point the onstart script runs.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ENTRY)]
    pub entry: String,
}

/// Where the template image (provisioning/Dockerfile) puts the container entry point.
pub const DEFAULT_ENTRY: &str = "/opt/kiln/container-entry.sh";

/// Vast.ai's limit on an instance's onstart script.
pub const ONSTART_LIMIT: usize = 4096;

pub fn run(command: CertsCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init(args) => init(args, out),
        CertsCommand::Issue(args) => issue(args, out),
        CertsCommand::Revoke(args) => revoke(args, out),
        CertsCommand::List(args) => list(args, out),
        CertsCommand::Bundle(args) => bundle(args, out),
    }
}

/// A path as the operator can paste it anywhere: absolute when it can be resolved.
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn write_json(out: &mut dyn Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string(value).context("encoding JSON")?;
    writeln!(out, "{text}").context("writing to stdout")
}

fn init(args: CertsInit, out: &mut dyn Write) -> anyhow::Result<()> {
    let summary = pki::init_ca(&args.dir, &args.cluster, args.days)?;
    let dir = absolute(&summary.dir);
    if args.json {
        let body = serde_json::json!({
            "dir": dir,
            "cluster_id": summary.cluster_id,
            "not_after": summary.not_after,
        });
        return write_json(out, &body);
    }
    writeln!(
        out,
        "Created the CA of cluster {:?} in {} (valid until {}).",
        summary.cluster_id,
        dir.display(),
        short_time(&summary.not_after)
    )?;
    writeln!(
        out,
        "Keep {} secret and offline when you can: whoever holds it can make members of this cluster.",
        dir.join(pki::CA_KEY_FILE).display()
    )?;
    writeln!(
        out,
        "Next, issue one certificate per node and one for the coordinator:\n  kiln certs issue --ca {} NAME",
        dir.display()
    )?;
    Ok(())
}

fn issue(args: CertsIssue, out: &mut dyn Write) -> anyhow::Result<()> {
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    let summary = pki::issue(&args.ca_dir, &args.name, &out_dir, args.days)?;
    let dir = absolute(&summary.dir);
    let files: Vec<PathBuf> = [
        pki::CERT_FILE,
        pki::KEY_FILE,
        pki::CA_CERT_FILE,
        pki::CRL_FILE,
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|p| p.exists())
    .collect();
    if args.json {
        let body = serde_json::json!({
            "name": summary.name,
            "cluster_id": summary.cluster_id,
            "serial": summary.serial,
            "not_after": summary.not_after,
            "dir": dir,
            "files": files,
        });
        return write_json(out, &body);
    }
    writeln!(
        out,
        "Issued {:?} for cluster {:?} (serial {}, valid until {}):",
        summary.name,
        summary.cluster_id,
        summary.serial,
        short_time(&summary.not_after)
    )?;
    for file in &files {
        let note = if file.ends_with(pki::KEY_FILE) {
            "  (private key, mode 600)"
        } else {
            ""
        };
        writeln!(out, "  {}{note}", file.display())?;
    }
    writeln!(
        out,
        "Copy this folder to the member (keep key.pem mode 600) and point its config at it:\n  \
         [cluster]\n  certs_dir = {}",
        toml::Value::String(dir.display().to_string())
    )?;
    Ok(())
}

fn revoke(args: CertsRevoke, out: &mut dyn Write) -> anyhow::Result<()> {
    let summary = pki::revoke(&args.ca_dir, &args.name)?;
    let crl = absolute(&summary.crl);
    if args.json {
        let body = serde_json::json!({
            "name": summary.name,
            "revoked_serials": summary.revoked_serials,
            "crl_number": summary.crl_number,
            "crl": crl,
        });
        return write_json(out, &body);
    }
    writeln!(
        out,
        "Revoked {:?} (serial {}). New CRL number {}: {}",
        summary.name,
        summary.revoked_serials.join(", "),
        summary.crl_number,
        crl.display()
    )?;
    writeln!(
        out,
        "Copy it to every member's certs folder as {}; a member refuses the revoked certificate once it has loaded that file.",
        pki::CRL_FILE
    )?;
    Ok(())
}

fn list(args: CertsList, out: &mut dyn Write) -> anyhow::Result<()> {
    let entries = pki::list(&args.ca_dir)?;
    if args.json {
        return write_json(out, &entries);
    }
    if entries.is_empty() {
        writeln!(
            out,
            "No certificates issued yet; issue one with `kiln certs issue --ca {} NAME`.",
            args.ca_dir.display()
        )?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                text::clean(&e.name),
                text::clean(&e.serial),
                short_time(&text::clean(&e.not_after)),
                e.revoked_at
                    .as_deref()
                    .map_or_else(|| "-".into(), |t| short_time(&text::clean(t))),
            ]
        })
        .collect();
    let columns = [
        ("NAME", Align::Left),
        ("SERIAL", Align::Left),
        ("EXPIRES", Align::Left),
        ("REVOKED", Align::Left),
    ];
    out.write_all(text::table(&columns, &rows).as_bytes())?;
    Ok(())
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The bundle's format: base64 (standard alphabet, one line) of a gzip-compressed tar holding
/// `certs/cert.pem`, `certs/key.pem`, `certs/ca.pem`, `certs/crl.pem` (when the CA has one) and,
/// when given, `kilnd.toml` and `keys.toml`. Every entry is a regular file of mode 600 with a
/// zero timestamp, so the same inputs give the same bundle. `tar -xz` unpacks it.
pub fn encode_bundle(files: &[(String, Vec<u8>)]) -> anyhow::Result<String> {
    use base64::Engine as _;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, bytes) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, bytes.as_slice())
            .with_context(|| format!("adding {path} to the bundle"))?;
    }
    let gz = tar.into_inner().context("finishing the bundle's tar")?;
    let compressed = gz.finish().context("compressing the bundle")?;
    Ok(base64::engine::general_purpose::STANDARD.encode(compressed))
}

/// The Vast.ai onstart script that hands `bundle` to the entry point.
pub fn onstart_script(member: &str, bundle: &str, entry: &str) -> String {
    format!(
        "#!/bin/sh\n# Kiln member {member}: certificates and config for kilnd, then kilnd itself.\n\
         export KILN_BUNDLE='{bundle}'\nexec {entry}\n"
    )
}

/// The `KILN_BUNDLE` value of `member`: its certificate (issued into `member_dir` from the CA
/// in `ca_dir` the first time, reused after), the CA's certificate and CRL, and, when given, a
/// kilnd config and keys file (each checked before it goes in).
pub fn member_bundle(
    ca_dir: &Path,
    member: &str,
    member_dir: &Path,
    days: u32,
    config: Option<&Path>,
    keys_file: Option<&Path>,
) -> anyhow::Result<String> {
    pki::validate_name(member)?;
    // A member folder made earlier is reused (same certificate); otherwise one is issued now.
    if !member_dir.join(pki::CERT_FILE).exists() {
        pki::issue(ca_dir, member, member_dir, days)?;
    }
    let identity = pki::Identity::load_dir(member_dir)
        .with_context(|| format!("the member folder {}", member_dir.display()))?;
    if identity.name() != member {
        anyhow::bail!(
            "{} holds the certificate of {:?}, not {:?}; give --member-dir for {:?}",
            member_dir.display(),
            identity.name(),
            member,
            member
        );
    }
    // (path inside the bundle, bytes)
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for name in [pki::CERT_FILE, pki::KEY_FILE, pki::CA_CERT_FILE] {
        files.push((format!("certs/{name}"), read_file(&member_dir.join(name))?));
    }
    // The CA's current CRL beats the copy made at issue time.
    let crl = [ca_dir.join(pki::CRL_FILE), member_dir.join(pki::CRL_FILE)]
        .into_iter()
        .find(|p| p.exists());
    if let Some(crl) = crl {
        files.push((format!("certs/{}", pki::CRL_FILE), read_file(&crl)?));
    }
    if let Some(config) = config {
        kiln_daemon::config::Config::load(config)
            .with_context(|| format!("--config {}", config.display()))?;
        files.push(("kilnd.toml".to_string(), read_file(config)?));
    }
    if let Some(keys) = keys_file {
        kiln_daemon::tiers::KeyRing::load(keys)
            .with_context(|| format!("--keys-file {}", keys.display()))?;
        files.push(("keys.toml".to_string(), read_file(keys)?));
    }
    encode_bundle(&files)
}

fn bundle(args: CertsBundle, out: &mut dyn Write) -> anyhow::Result<()> {
    pki::validate_name(&args.member)?;
    if args.entry.is_empty() || args.entry.contains(['\'', '\n', ' ']) {
        anyhow::bail!(
            "--entry {:?}: give a path without spaces, quotes or newlines",
            args.entry
        );
    }
    let member_dir = args
        .member_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.member));
    let encoded = member_bundle(
        &args.ca_dir,
        &args.member,
        &member_dir,
        args.days,
        args.config.as_deref(),
        args.keys_file.as_deref(),
    )?;
    if !args.onstart {
        writeln!(out, "KILN_BUNDLE={encoded}").context("writing to stdout")?;
        return Ok(());
    }
    let script = onstart_script(&args.member, &encoded, &args.entry);
    if script.len() > ONSTART_LIMIT {
        anyhow::bail!(
            "the onstart script would be {} characters, over Vast.ai's {ONSTART_LIMIT}: pass the \
             bundle in the instance's environment instead (run this without --onstart for the \
             KILN_BUNDLE=… value, give it as `-e KILN_BUNDLE=…`) and use the onstart `exec {}`",
            script.len(),
            args.entry
        );
    }
    out.write_all(script.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}
