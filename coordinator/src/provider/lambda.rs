//! Lambda Cloud: whole VMs of fixed instance types (`gpu_1x_a10`, …), no RTX 4090, no spot, and
//! no stop: a host is launched, runs, and is terminated (HOT or COLD, never WARM). Every answer
//! is wrapped in `{"data": …}`; errors are `{"error": {code, message, suggestion}}`. Requests are
//! paced to 1 per second, launches to 1 per 10 s.
//!
//! The VM keeps its own ports on its own public IP. Which ports a host exposes is recorded at
//! launch in a `kiln-ports` tag, so that a host read back later still has its address map.

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{Value, json};
use url::Url;

use super::http::{
    self, Api, LabelLookup, Pacing, Reply, Request, RetryPolicy, excerpt, id_text, num, text,
};
use super::{
    Address, Host, HostStatus, Mapped, Offer, OfferQuery, PortSpec, Protocol, Provider,
    ProviderError, ProviderKind, ProviderResult, RentRequest,
};

/// Production API base.
pub const DEFAULT_BASE: &str = "https://cloud.lambda.ai/api/v1";

const KIND: ProviderKind = ProviderKind::Lambda;
const PORTS_TAG: &str = "kiln-ports";

/// A Lambda Cloud client.
#[derive(Debug)]
pub struct LambdaClient {
    api: Api,
    base: Url,
    /// Regions to launch in, most preferred first; empty means any region with capacity.
    regions: Vec<String>,
    ssh_key_names: Vec<String>,
    file_system_names: Vec<String>,
    firewall_rulesets: Vec<String>,
    lookup: LabelLookup,
}

impl LambdaClient {
    /// A client for the API at `base` (production: [`DEFAULT_BASE`]), with Lambda's pacing.
    pub fn new(base: Url, api_key: String) -> ProviderResult<LambdaClient> {
        http::check_base(KIND, &base)?;
        Ok(LambdaClient {
            api: Api::new(KIND, api_key, RetryPolicy::default(), Pacing::lambda())?,
            base,
            regions: Vec::new(),
            ssh_key_names: Vec::new(),
            file_system_names: Vec::new(),
            firewall_rulesets: Vec::new(),
            lookup: LabelLookup::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.api.set_retry(retry);
        self
    }

    pub fn with_pacing(mut self, pacing: Pacing) -> Self {
        self.api.set_pacing(pacing);
        self
    }

    pub fn with_label_lookup(mut self, lookup: LabelLookup) -> Self {
        self.lookup = lookup;
        self
    }

    /// Regions to launch in, most preferred first (`us-east-1`, …). Offers and launches are
    /// limited to them.
    pub fn with_regions(mut self, regions: Vec<String>) -> Self {
        self.regions = regions;
        self
    }

    /// The SSH key registered at Lambda that launched VMs accept (Lambda takes exactly one).
    pub fn with_ssh_key_name(mut self, name: impl Into<String>) -> Self {
        self.ssh_key_names = vec![name.into()];
        self
    }

    /// Lambda filesystems to attach (they must be in the launch region).
    pub fn with_file_system_names(mut self, names: Vec<String>) -> Self {
        self.file_system_names = names;
        self
    }

    /// Firewall rulesets (ids) to apply; Lambda's default firewall opens only SSH and ICMP.
    pub fn with_firewall_rulesets(mut self, ids: Vec<String>) -> Self {
        self.firewall_rulesets = ids;
        self
    }

    fn url(&self, segments: &[&str]) -> ProviderResult<Url> {
        http::endpoint(KIND, &self.base, segments)
    }

    /// `{"data": …}` of a successful reply, or the error it carries.
    fn data(&self, reply: &Reply, what: &str) -> ProviderResult<Value> {
        if !reply.status.is_success() {
            return Err(error_of(reply, what));
        }
        let body: Value = reply.json(KIND, what)?;
        match body.get("data") {
            Some(data) => Ok(data.clone()),
            None => Err(invalid(format!(
                "{what}: answer without `data`: {}",
                excerpt(&reply.body, 200)
            ))),
        }
    }

    async fn instance_types(&self) -> ProviderResult<Value> {
        let url = self.url(&["instance-types"])?;
        let reply = self
            .api
            .send(Request::new(Method::GET, url, "instance-types"))
            .await?;
        self.data(&reply, "instance types")
    }

    /// Regions of `instance_type` with capacity now, in preference order.
    fn regions_for(&self, types: &Value, instance_type: &str) -> Vec<String> {
        let available: Vec<String> = types[instance_type]["regions_with_capacity_available"]
            .as_array()
            .map(|regions| regions.iter().filter_map(|r| text(&r["name"])).collect())
            .unwrap_or_default();
        if self.regions.is_empty() {
            return available;
        }
        self.regions
            .iter()
            .filter(|r| available.contains(r))
            .cloned()
            .collect()
    }

    async fn launch(&self, request: &RentRequest) -> ProviderResult<Host> {
        let instance_type = request.offer_id.trim();
        if request.label.trim().is_empty() || request.label.chars().count() > 64 {
            return Err(invalid(format!(
                "the instance name (label) must be 1..=64 characters (got {})",
                request.label.chars().count()
            )));
        }
        if request.bid_per_hour.is_some() {
            return Err(ProviderError::Unsupported {
                provider: KIND,
                operation: "spot rent",
            });
        }
        if self.ssh_key_names.len() != 1 {
            return Err(invalid(
                "a Lambda launch needs exactly one SSH key name (with_ssh_key_name)".into(),
            ));
        }
        // Capacity is checked first: a launch costs 10 s of Lambda's launch budget.
        let types = self.instance_types().await?;
        if types.get(instance_type).is_none() {
            return Err(invalid(format!("unknown instance type `{instance_type}`")));
        }
        let Some(region) = self.regions_for(&types, instance_type).into_iter().next() else {
            return Err(ProviderError::NoCapacity {
                provider: KIND,
                message: format!("no capacity for {instance_type} in the allowed regions"),
            });
        };
        let mut body = json!({
            "region_name": region,
            "instance_type_name": instance_type,
            "ssh_key_names": self.ssh_key_names,
            "file_system_names": self.file_system_names,
            "quantity": 1,
            "name": request.label,
            "tags": [{"key": PORTS_TAG, "value": ports_tag(&request.ports)}],
        });
        if let Some(user_data) = user_data(request)? {
            body["user_data"] = json!(user_data);
        }
        if let Some(image) = &request.image {
            body["image"] = json!({"family": image});
        }
        if !self.firewall_rulesets.is_empty() {
            body["firewall_rulesets"] = self
                .firewall_rulesets
                .iter()
                .map(|id| json!({"id": id}))
                .collect();
        }
        let url = self.url(&["instance-operations", "launch"])?;
        let reply = self
            .api
            .send(
                Request::new(Method::POST, url, "launch")
                    .json(body)
                    .idempotent(false),
            )
            .await?;
        let data = self.data(&reply, &format!("launch of {instance_type}"))?;
        let id = data["instance_ids"]
            .as_array()
            .and_then(|ids| ids.first())
            .and_then(id_text)
            .ok_or_else(|| ProviderError::NoCapacity {
                provider: KIND,
                message: format!("launch of {instance_type} in {region} started no instance"),
            })?;
        match self.get(&id).await {
            Ok(host) => Ok(host),
            Err(_) => Ok(Host {
                provider: KIND,
                id,
                label: Some(request.label.clone()),
                status: HostStatus::Starting,
                provider_status: "booting".into(),
                gpus: 0,
                price_per_hour: None,
                spot: false,
                address: Address::default(),
            }),
        }
    }
}

#[async_trait]
impl Provider for LambdaClient {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    /// The configured instance type (`query.gpu`), one offer per region with capacity. Lambda
    /// has no spot and no reliability figure; disk is fixed per type.
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        http::check_query(KIND, query)?;
        if query.spot {
            return Ok(Vec::new());
        }
        let types = self.instance_types().await?;
        let Some(entry) = types.get(&query.gpu) else {
            return Ok(Vec::new());
        };
        let spec = &entry["instance_type"];
        let gpus = num(&spec["specs"]["gpus"]).map_or(0, |n| n as u32);
        let disk = num(&spec["specs"]["storage_gib"]).unwrap_or(f64::MAX);
        let Some(price) = num(&spec["price_cents_per_hour"]).map(|c| c / 100.0) else {
            return Ok(Vec::new());
        };
        if gpus != query.num_gpus
            || price > query.max_price_per_hour
            || disk < f64::from(query.disk_gb)
        {
            return Ok(Vec::new());
        }
        let gpu_name = text(&spec["gpu_description"]).unwrap_or_else(|| query.gpu.clone());
        Ok(self
            .regions_for(&types, &query.gpu)
            .into_iter()
            .map(|region| Offer {
                provider: KIND,
                offer_id: query.gpu.clone(),
                gpu_name: gpu_name.clone(),
                num_gpus: gpus,
                price_per_hour: price,
                storage_per_gb_month: None,
                reliability: None,
                location: Some(region),
                spot: false,
            })
            .collect())
    }

    async fn rent(&self, request: &RentRequest) -> ProviderResult<Host> {
        http::rent_by_label(self, &request.label, &self.lookup, || self.launch(request)).await
    }

    async fn list(&self) -> ProviderResult<Vec<Host>> {
        let url = self.url(&["instances"])?;
        let reply = self
            .api
            .send(Request::new(Method::GET, url, "list"))
            .await?;
        let data = self.data(&reply, "instance list")?;
        data.as_array()
            .ok_or_else(|| {
                invalid(format!(
                    "instance list is not a list: {}",
                    excerpt(&data.to_string(), 200)
                ))
            })?
            .iter()
            .map(host_from)
            .collect()
    }

    async fn get(&self, id: &str) -> ProviderResult<Host> {
        let url = self.url(&["instances", id])?;
        let reply = self.api.send(Request::new(Method::GET, url, "get")).await?;
        host_from(&self.data(&reply, &format!("instance {id}"))?)
    }

    async fn stop(&self, _id: &str) -> ProviderResult<()> {
        Err(ProviderError::Unsupported {
            provider: KIND,
            operation: "stop",
        })
    }

    async fn start(&self, _id: &str) -> ProviderResult<()> {
        Err(ProviderError::Unsupported {
            provider: KIND,
            operation: "start",
        })
    }

    async fn destroy(&self, id: &str) -> ProviderResult<()> {
        let url = self.url(&["instance-operations", "terminate"])?;
        let reply = self
            .api
            .send(
                Request::new(Method::POST, url, "terminate")
                    .json(json!({"instance_ids": [id]}))
                    .idempotent(true),
            )
            .await?;
        match self.data(&reply, &format!("instance {id}")) {
            Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Instances named `label`; a terminated one does not count.
    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<Host>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|h| h.label.as_deref() == Some(label) && h.status != HostStatus::Terminated))
    }
}

fn invalid(message: String) -> ProviderError {
    ProviderError::Invalid {
        provider: KIND,
        message,
    }
}

/// `{"error": {"code", "message", "suggestion"}}` → the error its code means.
fn error_of(reply: &Reply, what: &str) -> ProviderError {
    let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
    let code = text(&body["error"]["code"]).unwrap_or_default();
    let mut message = text(&body["error"]["message"]).unwrap_or_else(|| excerpt(&reply.body, 200));
    if let Some(suggestion) = text(&body["error"]["suggestion"]) {
        message = format!("{message} ({suggestion})");
    }
    match code.as_str() {
        "instance-operations/launch/insufficient-capacity" | "global/quota-exceeded" => {
            ProviderError::NoCapacity {
                provider: KIND,
                message,
            }
        }
        "global/invalid-api-key" | "global/account-inactive" => ProviderError::Auth {
            provider: KIND,
            message,
        },
        "global/object-does-not-exist" => ProviderError::NotFound {
            provider: KIND,
            what: what.to_owned(),
        },
        _ => http::status_error(KIND, reply.status, what, message, reply.retry_after),
    }
}

/// `8000/tcp,7946/udp`.
fn ports_tag(ports: &[PortSpec]) -> String {
    ports
        .iter()
        .map(|p| {
            let proto = match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            format!("{}/{proto}", p.port)
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_ports_tag(tag: &str) -> Vec<PortSpec> {
    tag.split(',')
        .filter_map(|item| {
            let (port, proto) = item.trim().split_once('/')?;
            let protocol = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => return None,
            };
            Some(PortSpec {
                port: port.parse().ok()?,
                protocol,
            })
        })
        .collect()
}

/// Lambda takes at most 1 MB of `user_data`.
pub const USER_DATA_LIMIT: usize = 1_000_000;

/// The port gossip listens on in the config bootstrap.sh writes, and so the one advertised.
pub const GOSSIP_PORT: u16 = 7946;

/// Whether an image family is one of Lambda's own (Lambda Stack, plain Ubuntu), which has no Kiln
/// on it: only a family the operator built can provide the entry point.
pub fn is_stock_image(family: &str) -> bool {
    let family = family.trim().to_ascii_lowercase();
    family.starts_with("lambda-stack") || family.starts_with("ubuntu")
}

/// `value` as one single-quoted shell word.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// The first-boot script of a Lambda VM that joins the cluster (the `onstart` of its rent; the
/// env, `KILN_BUNDLE` first of all, is exported before it by [`user_data`]): download the node
/// archive at `url` (`provisioning/package.sh`) with retries, refuse it unless its sha256 is
/// `sha256`, unpack it and run its `provisioning/bootstrap.sh` with the archive's kilnd, the
/// bundle and `quic://<public IPv4>:7946` as the address other members dial.
///
/// The public address is the source address of the VM's default route (a Lambda VM carries its
/// public IPv4 on its own interface), else the first IPv4 of `hostname -I`; `KILN_PUBLIC_IP`
/// overrides it. `KILN_BOOTSTRAP_DIR` (default `/opt/kiln-node`) and `KILN_BOOTSTRAP_LOG`
/// (default `/var/log/kiln-bootstrap.log`) move what the script writes; its output goes to the
/// log and to cloud-init's (the console).
pub fn bootstrap_script(member: &str, url: &Url, sha256: &str) -> String {
    let member: String = member
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    let url = shell_quote(url.as_str());
    let sha256 = shell_quote(&sha256.to_ascii_lowercase());
    format!(
        r#"#!/bin/bash
# Kiln member {member} on Lambda Cloud (cloud-init user_data, run once as root at first boot):
# fetch the node archive, check its sha256, unpack it and run its bootstrap.sh.
set -euo pipefail
umask 022
url={url}
want={sha256}
dir=${{KILN_BOOTSTRAP_DIR:-/opt/kiln-node}}
log=${{KILN_BOOTSTRAP_LOG:-/var/log/kiln-bootstrap.log}}
mkdir -p "$dir" "$(dirname "$log")"
exec > >(tee -a "$log") 2>&1
say() {{ printf 'kiln-bootstrap: %s\n' "$*"; }}
die() {{
    say "error: $*"
    exit 1
}}
[[ -n ${{KILN_BUNDLE:-}} ]] || die "KILN_BUNDLE is not set (kiln rent with ca_dir sets it)"

# The address other members dial: this VM's public IPv4, which Lambda puts on the VM's own
# interface (the source address of the default route); KILN_PUBLIC_IP overrides it.
public_ip=${{KILN_PUBLIC_IP:-}}
if [[ -z $public_ip ]]; then
    public_ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' | head -n 1) || true
fi
if [[ -z $public_ip ]]; then
    public_ip=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+([.][0-9]+){{3}}$' | head -n 1) || true
fi
[[ $public_ip =~ ^[0-9]+([.][0-9]+){{3}}$ ]] ||
    die "cannot find this VM's public IPv4 address (set KILN_PUBLIC_IP)"
case $public_ip in
10.* | 127.* | 169.254.* | 192.168.* | 172.1[6-9].* | 172.2[0-9].* | 172.3[01].*)
    say "warning: $public_ip is a private address; members outside its network cannot dial it" ;;
esac

archive="$dir/kiln-node.tar.gz"
rm -f "$archive.part"
say "downloading $url"
curl --fail --silent --show-error --location --retry 10 --retry-delay 5 --retry-connrefused \
    --connect-timeout 30 --max-time 1800 --output "$archive.part" "$url" ||
    die "could not download $url (curl status $?)"
got=$(sha256sum "$archive.part" | cut -d ' ' -f 1)
if [[ $got != "$want" ]]; then
    rm -f "$archive.part"
    die "refused $url: its sha256 is $got, bootstrap_sha256 says $want; nothing was run"
fi
mv -f "$archive.part" "$archive"
node="$dir/node"
rm -rf "$node"
mkdir -p "$node"
tar -xzf "$archive" -C "$node" --strip-components=1 --no-same-owner ||
    die "$url is not a gzip'd tar (make it with provisioning/package.sh)"
[[ -x $node/kilnd && -x $node/provisioning/bootstrap.sh ]] ||
    die "$url holds no kilnd and provisioning/bootstrap.sh (make it with provisioning/package.sh)"
say "running bootstrap.sh; other members dial quic://$public_ip:{GOSSIP_PORT}"
# The bundle (with the member's private key) stays in the environment: a command line is
# readable by every user of the VM while the script runs.
"$node/provisioning/bootstrap.sh" --kilnd "$node/kilnd" \
    --advertise "quic://$public_ip:{GOSSIP_PORT}" ||
    die "bootstrap.sh failed (status $?); see above"
say "done: kilnd is running (journalctl -u kilnd)"
"#
    )
}

/// The cloud-init `user_data`: `onstart`, with the env exported before it (a VM has no container
/// env). Nothing when there is neither; refused over Lambda's 1 MB.
fn user_data(request: &RentRequest) -> ProviderResult<Option<String>> {
    let script = env_and_onstart(request)?;
    if let Some(script) = &script
        && script.len() > USER_DATA_LIMIT
    {
        return Err(invalid(format!(
            "the user_data would be {} bytes, over Lambda's {USER_DATA_LIMIT}",
            script.len()
        )));
    }
    Ok(script)
}

fn env_and_onstart(request: &RentRequest) -> ProviderResult<Option<String>> {
    if request.env.is_empty() {
        return Ok(request.onstart.clone());
    }
    let mut script = String::from("#!/bin/bash\n");
    for (key, value) in &request.env {
        let shell_name = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !shell_name {
            return Err(invalid(format!(
                "env name `{key}` is not a shell variable name"
            )));
        }
        script.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    if let Some(onstart) = &request.onstart {
        let body = match onstart.strip_prefix("#!") {
            Some(rest) => rest.split_once('\n').map_or("", |(_, body)| body),
            None => onstart,
        };
        script.push_str(body);
    }
    Ok(Some(script))
}

/// A Lambda instance in neutral terms.
fn host_from(raw: &Value) -> ProviderResult<Host> {
    let id = id_text(&raw["id"]).ok_or_else(|| {
        invalid(format!(
            "instance without an id: {}",
            excerpt(&raw.to_string(), 200)
        ))
    })?;
    let status_word = text(&raw["status"]).unwrap_or_else(|| "unknown".into());
    let status = match status_word.as_str() {
        "booting" => HostStatus::Starting,
        "active" => HostStatus::Running,
        "terminating" | "terminated" => HostStatus::Terminated,
        other => HostStatus::Failed(other.to_owned()),
    };
    let public_ip = text(&raw["ip"]);
    let mut ports = BTreeMap::new();
    if let Some(ip) = &public_ip {
        let tag = raw["tags"]
            .as_array()
            .and_then(|tags| tags.iter().find(|t| t["key"] == PORTS_TAG))
            .and_then(|t| text(&t["value"]))
            .unwrap_or_default();
        for spec in parse_ports_tag(&tag) {
            ports.insert(
                spec,
                Mapped {
                    host: ip.clone(),
                    port: spec.port,
                },
            );
        }
    }
    let instance_type = &raw["instance_type"];
    Ok(Host {
        provider: KIND,
        id,
        label: text(&raw["name"]),
        status,
        provider_status: status_word,
        gpus: num(&instance_type["specs"]["gpus"]).map_or(0, |n| n as u32),
        price_per_hour: num(&instance_type["price_cents_per_hour"]).map(|c| c / 100.0),
        spot: false,
        address: Address {
            public_ip,
            ports,
            http_proxy: BTreeMap::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_survive_the_tag() {
        let ports = vec![
            PortSpec {
                port: 8000,
                protocol: Protocol::Tcp,
            },
            PortSpec {
                port: 7946,
                protocol: Protocol::Udp,
            },
        ];
        assert_eq!(parse_ports_tag(&ports_tag(&ports)), ports);
        assert!(parse_ports_tag("").is_empty());
        assert!(parse_ports_tag("x/tcp,1/sctp").is_empty());
    }

    #[test]
    fn user_data_exports_env_before_onstart() {
        let request = RentRequest {
            label: "kiln-1".into(),
            offer_id: "gpu_1x_a10".into(),
            image: None,
            template: None,
            onstart: Some("#!/bin/sh\necho hi\n".into()),
            env: BTreeMap::from([("A".into(), "it's".into())]),
            ports: Vec::new(),
            disk_gb: 50,
            bid_per_hour: None,
        };
        assert_eq!(
            user_data(&request).expect("user data").expect("present"),
            "#!/bin/bash\nexport A='it'\\''s'\necho hi\n"
        );
    }

    fn request(env: &[(&str, &str)], onstart: Option<String>) -> RentRequest {
        RentRequest {
            label: "kiln-1".into(),
            offer_id: "gpu_1x_a10".into(),
            image: None,
            template: None,
            onstart,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: Vec::new(),
            disk_gb: 50,
            bid_per_hour: None,
        }
    }

    const SHA: &str = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789";

    #[test]
    fn a_bootstrap_user_data_exports_the_env_then_fetches_and_checks_the_archive() {
        let url = Url::parse("https://releases.example.com/it's/kiln-node.tar.gz").expect("url");
        let bundle = "H4sI'a b\"$(c)`d`";
        let token = "t'ok en";
        let onstart = bootstrap_script("gpu-1\nrm -rf /", &url, SHA);
        let script = user_data(&request(
            &[("KILN_BUNDLE", bundle), ("KILN_OPERATOR_TOKEN", token)],
            Some(onstart),
        ))
        .expect("user data")
        .expect("present");
        let lines: Vec<&str> = script.lines().collect();
        // One shebang, the exports, then the script body (its own shebang dropped).
        assert_eq!(lines[0], "#!/bin/bash");
        assert!(lines[1].starts_with("export KILN_BUNDLE="), "{script}");
        assert!(
            lines[2].starts_with("export KILN_OPERATOR_TOKEN="),
            "{script}"
        );
        assert!(lines[3].starts_with("# Kiln member gpu-1rm-rf"), "{script}");
        assert_eq!(script.matches("#!").count(), 1, "{script}");
        assert!(script.contains("set -euo pipefail\n"));
        assert!(script.contains("--advertise \"quic://$public_ip:7946\""));
        // What bash makes of the quoted values is exactly what was given.
        let assignments: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("export ") || l.starts_with("url=") || l.starts_with("want="))
            .collect();
        assert_eq!(assignments.len(), 4, "{script}");
        let probe = format!(
            "{}\nprintf '%s\\n' \"$KILN_BUNDLE\" \"$KILN_OPERATOR_TOKEN\" \"$url\" \"$want\"\n",
            assignments.join("\n")
        );
        let output = std::process::Command::new("bash")
            .arg("-c")
            .arg(&probe)
            .output()
            .expect("bash");
        assert!(output.status.success(), "{probe}");
        let stdout = String::from_utf8(output.stdout).expect("utf-8");
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            vec![bundle, token, url.as_str(), &SHA.to_ascii_lowercase()]
        );
        // And the whole script parses.
        let parsed = std::process::Command::new("bash")
            .args(["-n", "-c", &script])
            .output()
            .expect("bash -n");
        assert!(
            parsed.status.success(),
            "{}",
            String::from_utf8_lossy(&parsed.stderr)
        );
    }

    #[test]
    fn user_data_over_lambdas_limit_is_refused() {
        let big = "x".repeat(USER_DATA_LIMIT);
        let err = user_data(&request(&[("KILN_BUNDLE", &big)], Some("true\n".into())))
            .expect_err("over 1 MB");
        assert!(err.to_string().contains("user_data"), "{err}");
        let err = user_data(&request(&[("KILN-BUNDLE", "x")], None)).expect_err("bad name");
        assert!(err.to_string().contains("KILN-BUNDLE"), "{err}");
    }

    #[test]
    fn lambdas_own_image_families_are_stock() {
        assert!(is_stock_image("lambda-stack-22-04"));
        assert!(is_stock_image(" Lambda-Stack-24-04"));
        assert!(is_stock_image("ubuntu-24-04"));
        assert!(!is_stock_image("kiln-node-2026-11"));
    }

    #[test]
    fn statuses_and_prices_map() {
        let raw = json!({"id": "abc", "name": "kiln-1", "status": "unhealthy", "ip": "1.2.3.4",
            "instance_type": {"price_cents_per_hour": "75", "specs": {"gpus": 1}},
            "tags": [{"key": "kiln-ports", "value": "8000/tcp"}]});
        let host = host_from(&raw).expect("host");
        assert_eq!(host.status, HostStatus::Failed("unhealthy".into()));
        assert_eq!(host.price_per_hour, Some(0.75));
        let api = PortSpec {
            port: 8000,
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            host.address.ports[&api],
            Mapped {
                host: "1.2.3.4".into(),
                port: 8000
            }
        );
    }
}
