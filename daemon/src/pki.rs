//! The cluster's own certificate authority and the identities it signs.
//!
//! Every node and the coordinator hold a certificate signed by a CA dedicated to one cluster.
//! Holding such a certificate *is* membership: the TLS verifiers accept any certificate from
//! this CA, so a CA must never be shared between clusters. Certificates carry:
//!
//! - the subject common name = the member's name (its node id in gossip);
//! - the DNS SAN `gossip.<cluster_id>`, used as the TLS server name, since a transport only knows
//!   a peer's address;
//! - both extended key usages (serverAuth and clientAuth): one certificate serves both sides.
//!
//! Revocation is by certificate revocation list: `kiln certs revoke` rewrites the CA folder's
//! `crl.pem`, which operators copy next to the members' certificates (`crl.pem` in the certs
//! folder); kilnd reads it at start and checks it at every handshake.
//!
//! On-disk layout. A CA folder holds `ca.pem`, `ca.key` (0600), `crl.pem` and `issued.json` (the
//! ledger of issued serials, which revocation needs). A member's certs folder holds `cert.pem`,
//! `key.pem` (0600), `ca.pem` and optionally `crl.pem`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// File names inside a CA folder.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const CRL_FILE: &str = "crl.pem";
pub const LEDGER_FILE: &str = "issued.json";
/// File names inside a member's certs folder (`ca.pem` and `crl.pem` as above).
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// Default lifetimes: the CA outlives many member certificates; members rotate yearly.
pub const DEFAULT_CA_DAYS: u32 = 3650;
pub const DEFAULT_CERT_DAYS: u32 = 365;

/// What went wrong, naming the file or the value.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

type Result<T> = std::result::Result<T, PkiError>;

fn file_error(path: &Path, message: impl std::fmt::Display) -> PkiError {
    PkiError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The one crypto provider Kiln's TLS uses, passed explicitly everywhere (aws-lc-rs; see
/// ARCHITECTURE.md), so a stray default feature elsewhere in the tree cannot change it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Checks a member or cluster name: lowercase letters, digits, `-` and `.`, 1 to 63
/// characters, starting with a letter or digit. Names appear in DNS SANs and file names.
pub fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| PkiError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid("must be 1 to 63 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(invalid(
            "only lowercase letters, digits, '-' and '.' are allowed",
        ));
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(invalid("must start with a letter or a digit"));
    }
    Ok(())
}

/// The TLS server name every member certificate carries for a cluster.
pub fn cluster_server_name(cluster_id: &str) -> String {
    format!("gossip.{cluster_id}")
}

/// One line of a CA's ledger of issued certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LedgerEntry {
    pub name: String,
    /// Hex serial number.
    pub serial: String,
    pub not_after: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Ledger {
    /// The CRL number of the last CRL written (CRL numbers only grow).
    crl_number: u64,
    certificates: Vec<LedgerEntry>,
}

/// A certificate and key in PEM, as issued.
#[derive(Debug, Clone)]
pub struct IssuedPem {
    pub name: String,
    pub serial: String,
    pub not_after: OffsetDateTime,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A cluster CA in memory: its certificate and signing key.
pub struct Ca {
    cluster_id: String,
    cert_pem: String,
    key: KeyPair,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cluster_id", &self.cluster_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, so it encodes in 16 bytes as given.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl Ca {
    /// Generates a new CA for `cluster_id`, valid for `days`.
    pub fn generate(cluster_id: &str, days: u32) -> Result<Ca> {
        validate_name(cluster_id)?;
        if days == 0 {
            return Err(PkiError::Invalid(
                "a CA must be valid for at least 1 day".into(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Kiln cluster CA {cluster_id}"));
        dn.push(DnType::OrganizationName, cluster_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(i64::from(days));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cluster_id: cluster_id.to_string(),
            cert_pem: cert.pem(),
            key,
            not_after: params.not_after,
        })
    }

    /// Reads a CA from PEM text (certificate and key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::Invalid(format!("the CA key is not a usable key: {e}")))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("the CA certificate is not PEM: {e}")))?;
        let info = parse_cert(&der)?;
        let cluster_id = info.organization.ok_or_else(|| {
            PkiError::Invalid("the CA certificate names no cluster (organization)".into())
        })?;
        if info.public_key != key.public_key_raw() {
            return Err(PkiError::Invalid(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        Ok(Ca {
            cluster_id,
            cert_pem: cert_pem.to_string(),
            key,
            not_after: info.not_after,
        })
    }

    /// Reads the CA of a CA folder.
    pub fn load(dir: &Path) -> Result<Ca> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = fs::read_to_string(&cert_path).map_err(|e| file_error(&cert_path, e))?;
        let key = fs::read_to_string(&key_path).map_err(|e| file_error(&key_path, e))?;
        Ca::from_pem(&cert, &key).map_err(|e| file_error(dir, e))
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>> {
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)
    }

    /// Issues a member certificate named `name`, valid for `days` (not past the CA's expiry).
    pub fn issue(&self, name: &str, days: u32) -> Result<IssuedPem> {
        validate_name(name)?;
        if days == 0 {
            return Err(PkiError::Invalid(
                "a certificate must be valid for at least 1 day".into(),
            ));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, self.cluster_id.as_str());
        params.distinguished_name = dn;
        let san = cluster_server_name(&self.cluster_id);
        params.subject_alt_names = vec![SanType::DnsName(
            san.try_into()
                .map_err(|e: rcgen::Error| PkiError::Invalid(format!("bad cluster name: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = (now + time::Duration::days(i64::from(days))).min(self.not_after);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(IssuedPem {
            name: name.to_string(),
            serial: hex::encode(serial.to_bytes()),
            not_after: params.not_after,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CRL listing `revoked` (hex serials with their revocation times), numbered `number`.
    pub fn crl(&self, number: u64, revoked: &[(String, OffsetDateTime)]) -> Result<String> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for (serial, at) in revoked {
            let bytes = hex::decode(serial)
                .map_err(|_| PkiError::Invalid(format!("bad serial number {serial:?}")))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: *at,
                reason_code: Some(RevocationReason::CessationOfOperation),
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(5),
            // Nodes do not fetch CRLs on a schedule, so a CRL stays valid until the CA expires.
            next_update: self.not_after.max(now + time::Duration::days(1)),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer()?)?.pem()?)
    }
}

/// What `init_ca` made.
#[derive(Debug, Clone, Serialize)]
pub struct CaSummary {
    pub dir: PathBuf,
    pub cluster_id: String,
    pub not_after: String,
}

/// Writes `contents` to a new file at `path` with `mode`, refusing to replace an existing one
/// unless `replace`; a replacement goes through a temporary file and a rename.
fn write_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| file_error(path, "not a file path"))?;
    let target = if replace {
        dir.join(format!(".{file_name}.tmp"))
    } else {
        path.to_path_buf()
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(mode);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(&target).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            file_error(path, "already exists; refusing to overwrite it")
        } else {
            file_error(&target, e)
        }
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| file_error(&target, e))?;
    if replace {
        fs::rename(&target, path).map_err(|e| file_error(path, e))?;
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_error(dir, e))
}

/// `kiln certs init DIR`: creates a CA for `cluster_id` in `dir`. Refuses a folder that already
/// holds a CA key, so a CA is never overwritten by mistake.
pub fn init_ca(dir: &Path, cluster_id: &str, days: u32) -> Result<CaSummary> {
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(file_error(
            &key_path,
            "a CA already exists here; refusing to overwrite it",
        ));
    }
    let ca = Ca::generate(cluster_id, days)?;
    create_dir(dir)?;
    write_file(&key_path, ca.key.serialize_pem().as_bytes(), 0o600, false)?;
    write_file(&dir.join(CA_CERT_FILE), ca.cert_pem.as_bytes(), 0o644, true)?;
    let ledger = Ledger {
        crl_number: 1,
        certificates: Vec::new(),
    };
    write_file(&dir.join(CRL_FILE), ca.crl(1, &[])?.as_bytes(), 0o644, true)?;
    save_ledger(dir, &ledger)?;
    Ok(CaSummary {
        dir: dir.to_path_buf(),
        cluster_id: ca.cluster_id.clone(),
        not_after: rfc3339(ca.not_after),
    })
}

fn load_ledger(dir: &Path) -> Result<Ledger> {
    let path = dir.join(LEDGER_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| file_error(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
        Err(e) => Err(file_error(&path, e)),
    }
}

fn save_ledger(dir: &Path, ledger: &Ledger) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(ledger)
        .map_err(|e| PkiError::Invalid(format!("cannot encode the ledger: {e}")))?;
    write_file(&dir.join(LEDGER_FILE), &bytes, 0o644, true)
}

/// What `issue` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct IssueSummary {
    pub name: String,
    pub cluster_id: String,
    pub serial: String,
    pub not_after: String,
    pub dir: PathBuf,
}

/// `kiln certs issue --ca DIR NAME`: issues a member certificate into `out_dir` (`cert.pem`,
/// `key.pem` 0600, `ca.pem`, `crl.pem`), records it in the CA's ledger. Refuses to overwrite an
/// existing key in `out_dir`.
pub fn issue(ca_dir: &Path, name: &str, out_dir: &Path, days: u32) -> Result<IssueSummary> {
    validate_name(name)?;
    let ca = Ca::load(ca_dir)?;
    let key_path = out_dir.join(KEY_FILE);
    if key_path.exists() {
        return Err(file_error(
            &key_path,
            "a key already exists here; refusing to overwrite it (choose another --out)",
        ));
    }
    let mut ledger = load_ledger(ca_dir)?;
    let issued = ca.issue(name, days)?;
    create_dir(out_dir)?;
    write_file(&key_path, issued.key_pem.as_bytes(), 0o600, false)?;
    write_file(
        &out_dir.join(CERT_FILE),
        issued.cert_pem.as_bytes(),
        0o644,
        true,
    )?;
    write_file(
        &out_dir.join(CA_CERT_FILE),
        ca.cert_pem.as_bytes(),
        0o644,
        true,
    )?;
    let crl_src = ca_dir.join(CRL_FILE);
    if let Ok(crl) = fs::read(&crl_src) {
        write_file(&out_dir.join(CRL_FILE), &crl, 0o644, true)?;
    }
    ledger.certificates.push(LedgerEntry {
        name: issued.name.clone(),
        serial: issued.serial.clone(),
        not_after: rfc3339(issued.not_after),
        revoked_at: None,
    });
    save_ledger(ca_dir, &ledger)?;
    Ok(IssueSummary {
        name: issued.name,
        cluster_id: ca.cluster_id.clone(),
        serial: issued.serial,
        not_after: rfc3339(issued.not_after),
        dir: out_dir.to_path_buf(),
    })
}

/// What `revoke` did.
#[derive(Debug, Clone, Serialize)]
pub struct RevokeSummary {
    pub name: String,
    pub revoked_serials: Vec<String>,
    pub crl_number: u64,
    pub crl: PathBuf,
}

/// `kiln certs revoke --ca DIR NAME`: revokes every certificate issued to `name` and rewrites the
/// CA's `crl.pem` with a higher CRL number.
pub fn revoke(ca_dir: &Path, name: &str) -> Result<RevokeSummary> {
    let ca = Ca::load(ca_dir)?;
    let mut ledger = load_ledger(ca_dir)?;
    let now = rfc3339(OffsetDateTime::now_utc());
    let mut newly = Vec::new();
    for entry in ledger.certificates.iter_mut().filter(|e| e.name == name) {
        if entry.revoked_at.is_none() {
            entry.revoked_at = Some(now.clone());
            newly.push(entry.serial.clone());
        }
    }
    if newly.is_empty() {
        return Err(PkiError::Invalid(format!(
            "no unrevoked certificate named {name:?} in {}",
            ca_dir.join(LEDGER_FILE).display()
        )));
    }
    let mut revoked = Vec::new();
    for entry in &ledger.certificates {
        if let Some(at) = &entry.revoked_at {
            let at = OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| OffsetDateTime::now_utc());
            revoked.push((entry.serial.clone(), at));
        }
    }
    ledger.crl_number += 1;
    let crl = ca.crl(ledger.crl_number, &revoked)?;
    let crl_path = ca_dir.join(CRL_FILE);
    write_file(&crl_path, crl.as_bytes(), 0o644, true)?;
    save_ledger(ca_dir, &ledger)?;
    Ok(RevokeSummary {
        name: name.to_string(),
        revoked_serials: newly,
        crl_number: ledger.crl_number,
        crl: crl_path,
    })
}

/// The certificates a CA issued, oldest first.
pub fn list(ca_dir: &Path) -> Result<Vec<LedgerEntry>> {
    Ca::load(ca_dir)?;
    Ok(load_ledger(ca_dir)?.certificates)
}

/// The fields Kiln reads from a certificate.
#[derive(Debug, Clone)]
struct CertInfo {
    common_name: Option<String>,
    organization: Option<String>,
    dns_names: Vec<String>,
    not_after: OffsetDateTime,
    public_key: Vec<u8>,
    serial: String,
}

fn parse_cert(der: &CertificateDer<'_>) -> Result<CertInfo> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let first = |attr: Option<&AttributeTypeAndValue<'_>>| {
        attr.and_then(|a| a.as_str().ok()).map(str::to_string)
    };
    let common_name = first(cert.subject().iter_common_name().next());
    let organization = first(cert.subject().iter_organization().next());
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                dns_names.push((*dns).to_string());
            }
        }
    }
    let not_after = cert.validity().not_after.to_datetime();
    Ok(CertInfo {
        common_name,
        organization,
        dns_names,
        not_after,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        serial: hex::encode(cert.raw_serial()),
    })
}

/// The common name of a certificate (a peer's member name), if it has one.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    parse_cert(der).ok().and_then(|info| info.common_name)
}

/// A member's identity: its certificate and key, the cluster CA and the current CRL, checked
/// against each other when loaded.
#[derive(Debug, Clone)]
pub struct Identity {
    name: String,
    cluster_id: String,
    serial: String,
    not_after: OffsetDateTime,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Identity {
    /// Loads `cert.pem`, `key.pem`, `ca.pem` and (if present) `crl.pem` from a certs folder.
    pub fn load_dir(dir: &Path) -> Result<Identity> {
        let read = |file: &str| {
            let path = dir.join(file);
            fs::read(&path).map_err(|e| file_error(&path, e))
        };
        let key_path = dir.join(KEY_FILE);
        check_private(&key_path)?;
        let cert = read(CERT_FILE)?;
        let key = read(KEY_FILE)?;
        let ca = read(CA_CERT_FILE)?;
        let crl_path = dir.join(CRL_FILE);
        let crl = match fs::read(&crl_path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(file_error(&crl_path, e)),
        };
        Identity::from_pem(&cert, &key, &ca, crl.as_deref()).map_err(|e| file_error(dir, e))
    }

    /// Builds an identity from PEM text, checking that the certificate chains to the CA, is
    /// valid now, is not revoked, carries both key usages and the cluster's server name, and
    /// that the key belongs to it.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        ca_pem: &[u8],
        crl_pem: Option<&[u8]>,
    ) -> Result<Identity> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| PkiError::Invalid(format!("{CERT_FILE} is not PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| PkiError::Invalid(format!("{CERT_FILE} holds no certificate")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| PkiError::Invalid(format!("{KEY_FILE} holds no usable key: {e}")))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem) {
            let ca =
                ca.map_err(|e| PkiError::Invalid(format!("{CA_CERT_FILE} is not PEM: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| PkiError::Invalid(format!("{CA_CERT_FILE}: {e}")))?;
        }
        if roots.is_empty() {
            return Err(PkiError::Invalid(format!(
                "{CA_CERT_FILE} holds no certificate"
            )));
        }
        let crls = match crl_pem {
            Some(pem) => CertificateRevocationListDer::pem_slice_iter(pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| PkiError::Invalid(format!("{CRL_FILE} is not PEM: {e}")))?,
            None => Vec::new(),
        };
        let info = parse_cert(leaf)?;
        let name = info.common_name.clone().ok_or_else(|| {
            PkiError::Invalid(format!("{CERT_FILE} has no common name (member name)"))
        })?;
        let cluster_id = info
            .dns_names
            .iter()
            .find_map(|n| n.strip_prefix("gossip."))
            .map(str::to_string)
            .ok_or_else(|| {
                PkiError::Invalid(format!(
                    "{CERT_FILE} carries no gossip.<cluster> name; issue it with `kiln certs issue`"
                ))
            })?;
        let identity = Identity {
            name,
            cluster_id,
            serial: info.serial,
            not_after: info.not_after,
            chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            crls,
        };
        identity.check()?;
        Ok(identity)
    }

    /// Verifies the certificate as both a client and a server certificate of this cluster,
    /// and that the key matches (by building both TLS configs).
    fn check(&self) -> Result<()> {
        let leaf = &self.chain[0];
        let now = UnixTime::now();
        let client_verifier = self.client_verifier()?;
        client_verifier
            .verify_client_cert(leaf, &self.chain[1..], now)
            .map_err(|e| PkiError::Invalid(format!("{CERT_FILE} is not accepted: {e}")))?;
        let server_verifier = self.server_verifier()?;
        server_verifier
            .verify_server_cert(leaf, &self.chain[1..], &self.server_name()?, &[], now)
            .map_err(|e| PkiError::Invalid(format!("{CERT_FILE} is not accepted: {e}")))?;
        self.server_config(&[])?;
        self.client_config(&[])?;
        Ok(())
    }

    fn client_verifier(&self) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.iter().cloned())
            .build()
            .map_err(|e| PkiError::Invalid(format!("cannot build the client verifier: {e}")))
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.iter().cloned())
            .build()
            .map_err(|e| PkiError::Invalid(format!("cannot build the server verifier: {e}")))
    }

    /// The member name (certificate common name), used as the node id.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// Hex serial number of the member certificate.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_after(&self) -> SystemTime {
        let secs = self.not_after.unix_timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    }

    /// The TLS server name for dialling any member of this cluster.
    pub fn server_name(&self) -> Result<ServerName<'static>> {
        ServerName::try_from(cluster_server_name(&self.cluster_id))
            .map_err(|e| PkiError::Invalid(format!("bad cluster name: {e}")))
    }

    /// The TLS 1.3 server side: a client certificate from the cluster CA is required.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// The TLS 1.3 client side: presents this member's certificate and accepts only servers
    /// holding one from the same CA.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(self.server_verifier()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// Refuses a key file that group or others can read.
fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|e| file_error(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(file_error(
            path,
            "a private key must not be readable by group or others (chmod 600)",
        ));
    }
    Ok(())
}

/// Makes (or reuses) a development cluster under `dir`: a CA in `dir/ca` for cluster `dev` and
/// a certificate for `name` in `dir/<name>`. Used by `kilnd --dev`, so that `kiln status` can
/// join with a certificate from the same CA (`kiln certs issue --ca dir/ca …`).
pub fn dev_identity(dir: &Path, name: &str) -> Result<Identity> {
    let ca_dir = dir.join("ca");
    if !ca_dir.join(CA_KEY_FILE).exists() {
        init_ca(&ca_dir, "dev", DEFAULT_CA_DAYS)?;
    }
    let member_dir = dir.join(name);
    if !member_dir.join(KEY_FILE).exists() {
        issue(&ca_dir, name, &member_dir, DEFAULT_CERT_DAYS)?;
    }
    Identity::load_dir(&member_dir)
}

/// Test and benchmark helper: a CA in memory and identities issued from it.
pub fn identity_from_ca(ca: &Ca, name: &str) -> Result<Identity> {
    let issued = ca.issue(name, DEFAULT_CERT_DAYS)?;
    Identity::from_pem(
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        ca.cert_pem().as_bytes(),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("gpu-1.vast").is_ok());
        for bad in ["", "-x", "Upper", "a b", "a/b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn issued_identity_loads_and_names_itself() -> anyhow::Result<()> {
        let ca = Ca::generate("prod", 30)?;
        let id = identity_from_ca(&ca, "gpu-1")?;
        assert_eq!(id.name(), "gpu-1");
        assert_eq!(id.cluster_id(), "prod");
        id.server_config(&[b"x"])?;
        id.client_config(&[b"x"])?;
        Ok(())
    }

    #[test]
    fn certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
        let ca = Ca::generate("prod", 30)?;
        let other = Ca::generate("prod", 30)?;
        let issued = other.issue("rogue", 30)?;
        let err = Identity::from_pem(
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            ca.cert_pem().as_bytes(),
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("not accepted"), "{err}");
        Ok(())
    }

    #[test]
    fn mismatched_key_is_refused() -> anyhow::Result<()> {
        let ca = Ca::generate("prod", 30)?;
        let a = ca.issue("a", 30)?;
        let b = ca.issue("b", 30)?;
        let result = Identity::from_pem(
            a.cert_pem.as_bytes(),
            b.key_pem.as_bytes(),
            ca.cert_pem().as_bytes(),
            None,
        );
        assert!(result.is_err());
        Ok(())
    }

    #[test]
    fn files_round_trip_and_revocation_takes_effect() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir()?;
        let ca_dir = tmp.path().join("ca");
        init_ca(&ca_dir, "prod", 30)?;
        assert!(
            init_ca(&ca_dir, "prod", 30).is_err(),
            "a CA is never overwritten"
        );
        let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let node_dir = tmp.path().join("gpu-1");
        let summary = issue(&ca_dir, "gpu-1", &node_dir, 30)?;
        assert_eq!(summary.cluster_id, "prod");
        assert_eq!(
            fs::metadata(node_dir.join(KEY_FILE))?.permissions().mode() & 0o777,
            0o600
        );
        assert!(
            issue(&ca_dir, "gpu-1", &node_dir, 30).is_err(),
            "no overwrite"
        );
        let id = Identity::load_dir(&node_dir)?;
        assert_eq!(id.serial(), summary.serial);

        let revoked = revoke(&ca_dir, "gpu-1")?;
        assert_eq!(revoked.revoked_serials, vec![summary.serial.clone()]);
        assert_eq!(revoked.crl_number, 2);
        fs::copy(ca_dir.join(CRL_FILE), node_dir.join(CRL_FILE))?;
        let err = Identity::load_dir(&node_dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.to_lowercase().contains("revoked"), "{err}");
        assert!(revoke(&ca_dir, "gpu-1").is_err(), "nothing left to revoke");
        assert_eq!(list(&ca_dir)?.len(), 1);
        Ok(())
    }

    #[test]
    fn readable_key_is_refused() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir()?;
        let ca_dir = tmp.path().join("ca");
        init_ca(&ca_dir, "prod", 30)?;
        let node_dir = tmp.path().join("n");
        issue(&ca_dir, "n", &node_dir, 30)?;
        fs::set_permissions(node_dir.join(KEY_FILE), fs::Permissions::from_mode(0o644))?;
        let err = Identity::load_dir(&node_dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("chmod 600"), "{err}");
        Ok(())
    }
}
