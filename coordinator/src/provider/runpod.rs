//! RunPod, behind one client over two APIs: REST v2 (`https://api.runpod.io/v2`) for on-demand
//! pods — create, list, get, stop, start, delete — and GraphQL (`https://api.runpod.io/graphql`)
//! for what v2 lacks: prices (`gpuTypes`), spot pods (`podRentInterruptable` with `bidPerGpu`)
//! and their resume (`podBidResume`). REST v1 was retired on 2026-11-15 and is not used.
//!
//! GraphQL answers errors with HTTP 200 and an `errors` list, so every GraphQL reply is checked
//! for one. A pod is Running only once its container runs (`runtime` present) with its port
//! mappings; `RUNNING` alone does not mean usable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

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

/// Production REST v2 base.
pub const DEFAULT_REST_BASE: &str = "https://api.runpod.io/v2";
/// Production GraphQL endpoint.
pub const DEFAULT_GRAPHQL: &str = "https://api.runpod.io/graphql";

const KIND: ProviderKind = ProviderKind::Runpod;
/// What a volume disk costs while the pod is stopped, USD per GB-month (providers.md §2.7).
const STOPPED_VOLUME_PER_GB_MONTH: f64 = 0.20;
/// Where the persistent volume is mounted; it survives a stop, the container disk does not.
const VOLUME_PATH: &str = "/workspace";

/// Which RunPod cloud pods are placed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// RunPod's own data centres; every pod has a public IP.
    Secure,
    /// Community hosts; cheaper, public IP asked for explicitly.
    Community,
}

impl Cloud {
    fn as_str(self) -> &'static str {
        match self {
            Cloud::Secure => "SECURE",
            Cloud::Community => "COMMUNITY",
        }
    }
}

/// A RunPod client.
#[derive(Debug)]
pub struct RunpodClient {
    api: Api,
    rest: Url,
    graphql: Url,
    cloud: Cloud,
    container_disk_gb: u32,
    http_ports: Vec<u16>,
    lookup: LabelLookup,
    /// Bids of the spot pods this client rented, per pod id: `podBidResume` needs the bid again.
    spot_bids: Mutex<HashMap<String, f64>>,
    /// Bid for resuming a spot pod whose bid this client does not remember.
    resume_bid: Option<f64>,
}

impl RunpodClient {
    /// A client for REST v2 at `rest_base` and GraphQL at `graphql` (production:
    /// [`DEFAULT_REST_BASE`], [`DEFAULT_GRAPHQL`]); Secure cloud, 20 GB container disk.
    pub fn new(rest_base: Url, graphql: Url, api_key: String) -> ProviderResult<RunpodClient> {
        http::check_base(KIND, &rest_base)?;
        http::check_base(KIND, &graphql)?;
        Ok(RunpodClient {
            api: Api::new(KIND, api_key, RetryPolicy::default(), Pacing::runpod())?,
            rest: rest_base,
            graphql,
            cloud: Cloud::Secure,
            container_disk_gb: 20,
            http_ports: Vec::new(),
            lookup: LabelLookup::default(),
            spot_bids: Mutex::new(HashMap::new()),
            resume_bid: None,
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

    pub fn with_cloud(mut self, cloud: Cloud) -> Self {
        self.cloud = cloud;
        self
    }

    /// Size of the container disk (wiped on stop). A rent's `disk_gb` is the persistent volume
    /// at `/workspace`, which a stopped pod keeps.
    pub fn with_container_disk_gb(mut self, gb: u32) -> Self {
        self.container_disk_gb = gb;
        self
    }

    /// TCP ports exposed as `http` (reachable through `https://<pod>-<port>.proxy.runpod.net`)
    /// rather than as raw TCP on a public IP.
    pub fn with_http_proxy_ports(mut self, ports: Vec<u16>) -> Self {
        self.http_ports = ports;
        self
    }

    /// Bid per GPU for resuming a spot pod this client did not rent itself (after a restart of
    /// the coordinator); without one such a resume is refused.
    pub fn with_resume_bid(mut self, bid_per_gpu: f64) -> Self {
        self.resume_bid = Some(bid_per_gpu);
        self
    }

    fn pods_url(&self, segments: &[&str]) -> ProviderResult<Url> {
        let mut all = vec!["pods"];
        all.extend_from_slice(segments);
        http::endpoint(KIND, &self.rest, &all)
    }

    /// Runs a GraphQL operation and returns its `data`, or the error its `errors` carry.
    async fn graphql(
        &self,
        query: String,
        endpoint: &'static str,
        idempotent: bool,
    ) -> ProviderResult<Value> {
        let request = Request::new(Method::POST, self.graphql.clone(), endpoint)
            .json(json!({ "query": query }))
            .idempotent(idempotent);
        let reply = self.api.send(request).await?;
        if !reply.status.is_success() {
            return Err(rest_error(&reply, "GraphQL request"));
        }
        let body: Value = reply.json(KIND, "GraphQL")?;
        if let Some(errors) = body["errors"].as_array().filter(|e| !e.is_empty()) {
            let message = errors
                .iter()
                .map(|e| {
                    text(&e["message"])
                        .or_else(|| text(&e["extensions"]["code"]))
                        .unwrap_or_else(|| e.to_string())
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(classify(
                message,
                errors.iter().any(|e| {
                    e["extensions"]["code"] == "INTERNAL_SERVER_ERROR"
                        || e["code"] == "INTERNAL_SERVER_ERROR"
                }),
            ));
        }
        Ok(body["data"].clone())
    }

    async fn create(&self, request: &RentRequest) -> ProviderResult<Host> {
        let (gpu_id, count) = parse_offer(&request.offer_id)?;
        if request.label.trim().is_empty() {
            return Err(invalid("the label is empty".into()));
        }
        if request.image.is_none() && request.template.is_none() {
            return Err(invalid("a RunPod rent needs an image or a template".into()));
        }
        let ports = self.port_list(&request.ports)?;
        let args = request.onstart.as_deref().map(start_args);
        match request.bid_per_hour {
            None => {
                let mut body = json!({
                    "name": request.label,
                    "gpu": {"id": gpu_id, "count": count},
                    "cloud": self.cloud.as_str(),
                    "disk": self.container_disk_gb,
                    "mounts": {"persistent": {"size": request.disk_gb.max(10), "path": VOLUME_PATH}},
                    "ports": ports,
                    "env": request.env,
                    "startSsh": true,
                });
                if let Some(image) = &request.image {
                    body["image"] = json!(image);
                }
                if let Some(template) = &request.template {
                    body["templateId"] = json!(template);
                }
                if let Some(args) = args {
                    body["args"] = json!(args);
                }
                let url = self.pods_url(&[])?;
                let reply = self
                    .api
                    .send(
                        Request::new(Method::POST, url, "create")
                            .json(body)
                            .idempotent(false),
                    )
                    .await?;
                if !reply.status.is_success() {
                    return Err(rest_error(&reply, &format!("GPU type {gpu_id}")));
                }
                host_from(&reply.json(KIND, "create pod")?)
            }
            Some(bid) => {
                if !(bid.is_finite() && bid > 0.0) {
                    return Err(invalid(format!("bid {bid} must be a positive number")));
                }
                let env: Vec<Value> = request
                    .env
                    .iter()
                    .map(|(k, v)| json!({"key": k, "value": v}))
                    .collect();
                let mut input = json!({
                    "bidPerGpu": bid,
                    "gpuCount": count,
                    "gpuTypeId": gpu_id,
                    "name": request.label,
                    "containerDiskInGb": self.container_disk_gb,
                    "volumeInGb": request.disk_gb.max(10),
                    "volumeMountPath": VOLUME_PATH,
                    "ports": ports.join(","),
                    "env": env,
                    "startSsh": true,
                    "supportPublicIp": true,
                });
                if let Some(image) = &request.image {
                    input["imageName"] = json!(image);
                }
                if let Some(template) = &request.template {
                    input["templateId"] = json!(template);
                }
                if let Some(args) = args {
                    input["dockerArgs"] = json!(args);
                }
                let query = format!(
                    "mutation {{ podRentInterruptable(input: {}) {{ id desiredStatus }} }}",
                    gql_input(&input, &[("cloudType", self.cloud.as_str())])
                );
                let data = self.graphql(query, "create", false).await?;
                let id = id_text(&data["podRentInterruptable"]["id"]).ok_or_else(|| {
                    invalid(format!(
                        "podRentInterruptable answered without a pod id: {data}"
                    ))
                })?;
                self.spot_bids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), bid);
                match self.get(&id).await {
                    Ok(host) => Ok(host),
                    Err(_) => Ok(Host {
                        provider: KIND,
                        id,
                        label: Some(request.label.clone()),
                        status: HostStatus::Starting,
                        provider_status: "CREATED".into(),
                        gpus: count,
                        price_per_hour: Some(bid * f64::from(count)),
                        spot: true,
                        address: Address::default(),
                    }),
                }
            }
        }
    }

    /// `["8000/http", "22/tcp"]`; RunPod has no UDP.
    fn port_list(&self, ports: &[PortSpec]) -> ProviderResult<Vec<String>> {
        ports
            .iter()
            .map(|p| match p.protocol {
                Protocol::Udp => Err(invalid(format!("RunPod cannot expose UDP port {}", p.port))),
                Protocol::Tcp if self.http_ports.contains(&p.port) => {
                    Ok(format!("{}/http", p.port))
                }
                Protocol::Tcp => Ok(format!("{}/tcp", p.port)),
            })
            .collect()
    }

    async fn action(&self, id: &str, action: &str) -> ProviderResult<Reply> {
        let url = self.pods_url(&[id, "action"])?;
        self.api
            .send(
                Request::new(Method::POST, url, "action")
                    .json(json!({"action": action}))
                    .idempotent(true),
            )
            .await
    }
}

#[async_trait]
impl Provider for RunpodClient {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    /// One offer per GPU type: RunPod has no per-host market; its scheduler picks the host.
    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        http::check_query(KIND, query)?;
        let secure = self.cloud == Cloud::Secure;
        let gql = format!(
            "query {{ gpuTypes(input: {{id: {}}}) {{ id displayName memoryInGb maxGpuCount \
             securePrice communityPrice secureSpotPrice communitySpotPrice \
             lowestPrice(input: {{gpuCount: {}, secureCloud: {secure}}}) \
             {{ minimumBidPrice uninterruptablePrice stockStatus }} }} }}",
            Value::String(query.gpu.clone()),
            query.num_gpus
        );
        let data = self.graphql(gql, "prices", true).await?;
        let types = data["gpuTypes"].as_array().cloned().unwrap_or_default();
        let mut offers = Vec::new();
        for gpu in types
            .iter()
            .filter(|g| text(&g["id"]).as_deref() == Some(query.gpu.as_str()))
        {
            let lowest = &gpu["lowestPrice"];
            let stock = text(&lowest["stockStatus"]);
            if stock.is_none() || stock.as_deref() == Some("None") {
                continue;
            }
            let (cloud_price, cloud_spot) = if secure {
                ("securePrice", "secureSpotPrice")
            } else {
                ("communityPrice", "communitySpotPrice")
            };
            let per_gpu = if query.spot {
                num(&lowest["minimumBidPrice"]).or_else(|| num(&gpu[cloud_spot]))
            } else {
                num(&lowest["uninterruptablePrice"]).or_else(|| num(&gpu[cloud_price]))
            };
            let Some(per_gpu) = per_gpu.filter(|p| *p > 0.0) else {
                continue;
            };
            if num(&gpu["maxGpuCount"]).is_some_and(|max| max < f64::from(query.num_gpus)) {
                continue;
            }
            let price = per_gpu * f64::from(query.num_gpus);
            if price > query.max_price_per_hour {
                continue;
            }
            offers.push(Offer {
                provider: KIND,
                offer_id: offer_id(&query.gpu, query.num_gpus),
                gpu_name: text(&gpu["displayName"]).unwrap_or_else(|| query.gpu.clone()),
                num_gpus: query.num_gpus,
                // For spot: the bid per GPU times the GPUs, i.e. what the host costs at the bid.
                price_per_hour: price,
                storage_per_gb_month: Some(STOPPED_VOLUME_PER_GB_MONTH),
                reliability: None,
                location: Some(self.cloud.as_str().to_owned()),
                spot: query.spot,
            });
        }
        http::cheapest_first(&mut offers);
        Ok(offers)
    }

    async fn rent(&self, request: &RentRequest) -> ProviderResult<Host> {
        http::rent_by_label(self, &request.label, &self.lookup, || self.create(request)).await
    }

    async fn list(&self) -> ProviderResult<Vec<Host>> {
        let url = self.pods_url(&[])?;
        let reply = self
            .api
            .send(Request::new(Method::GET, url, "list"))
            .await?;
        if !reply.status.is_success() {
            return Err(rest_error(&reply, "pod list"));
        }
        let body: Value = reply.json(KIND, "pod list")?;
        let pods = body["pods"]
            .as_array()
            .or_else(|| body.as_array())
            .ok_or_else(|| {
                invalid(format!(
                    "pod list without `pods`: {}",
                    excerpt(&reply.body, 200)
                ))
            })?;
        pods.iter().map(host_from).collect()
    }

    async fn get(&self, id: &str) -> ProviderResult<Host> {
        let url = self.pods_url(&[id])?;
        let reply = self.api.send(Request::new(Method::GET, url, "get")).await?;
        if !reply.status.is_success() {
            return Err(rest_error(&reply, &format!("pod {id}")));
        }
        host_from(&reply.json(KIND, "pod")?)
    }

    async fn stop(&self, id: &str) -> ProviderResult<()> {
        let reply = self.action(id, "stop").await?;
        if !reply.status.is_success() {
            return Err(rest_error(&reply, &format!("pod {id}")));
        }
        Ok(())
    }

    /// On-demand pods start through REST v2; spot pods resume with `podBidResume`, bidding what
    /// they were rented at. "Not enough free GPUs" is [`ProviderError::NoCapacity`].
    async fn start(&self, id: &str) -> ProviderResult<()> {
        let pod = self.get(id).await?;
        if !pod.spot {
            let reply = self.action(id, "start").await?;
            if !reply.status.is_success() {
                return Err(rest_error(&reply, &format!("pod {id}")));
            }
            return Ok(());
        }
        let remembered = self
            .spot_bids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied();
        let bid = remembered.or(self.resume_bid).ok_or_else(|| {
            invalid(format!(
                "spot pod {id} was not rented by this client and no resume bid is configured"
            ))
        })?;
        let input = json!({"podId": id, "bidPerGpu": bid, "gpuCount": pod.gpus.max(1)});
        let query = format!(
            "mutation {{ podBidResume(input: {}) {{ id desiredStatus }} }}",
            gql_input(&input, &[])
        );
        self.graphql(query, "resume", true).await?;
        Ok(())
    }

    async fn destroy(&self, id: &str) -> ProviderResult<()> {
        let url = self.pods_url(&[id])?;
        let reply = self
            .api
            .send(Request::new(Method::DELETE, url, "delete"))
            .await?;
        if reply.status.is_success() || reply.status.as_u16() == 404 {
            self.spot_bids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            return Ok(());
        }
        Err(rest_error(&reply, &format!("pod {id}")))
    }

    /// Pods named `label`; a terminated one does not count.
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

/// Capacity refusals (create and resume) are NoCapacity; internal errors are transient; the rest
/// is a refusal of the request.
fn classify(message: String, internal: bool) -> ProviderError {
    let lower = message.to_lowercase();
    if lower.contains("not enough free gpus")
        || lower.contains("no longer any instances available")
        || lower.contains("no instances available")
        || lower.contains("no gpus available")
    {
        ProviderError::NoCapacity {
            provider: KIND,
            message,
        }
    } else if internal {
        ProviderError::Transient {
            provider: KIND,
            message,
        }
    } else if lower.contains("unauthorized") || lower.contains("api key") {
        ProviderError::Auth {
            provider: KIND,
            message,
        }
    } else {
        invalid(message)
    }
}

/// A REST error: RFC 9457 `{title, status, detail}` (v2) or `{message}`.
fn rest_error(reply: &Reply, what: &str) -> ProviderError {
    let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
    let message = ["detail", "message", "title", "error"]
        .iter()
        .find_map(|k| text(&body[*k]))
        .unwrap_or_else(|| excerpt(&reply.body, 200));
    match classify(message.clone(), false) {
        error @ ProviderError::NoCapacity { .. } => error,
        _ => http::status_error(KIND, reply.status, what, message, reply.retry_after),
    }
}

/// An offer id: the GPU type id, prefixed with the count when it is not 1 (`2x NVIDIA A40`).
fn offer_id(gpu: &str, count: u32) -> String {
    if count == 1 {
        gpu.to_owned()
    } else {
        format!("{count}x {gpu}")
    }
}

fn parse_offer(offer: &str) -> ProviderResult<(String, u32)> {
    let offer = offer.trim();
    let (count, gpu) = match offer.split_once("x ") {
        Some((n, gpu)) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
            let n: u32 = n
                .parse()
                .map_err(|_| invalid(format!("offer `{offer}`: bad GPU count")))?;
            (n, gpu.trim())
        }
        _ => (1, offer),
    };
    if gpu.is_empty() || count == 0 {
        return Err(invalid(format!(
            "offer `{offer}` is not a RunPod GPU type id (`[<n>x ]<type id>`)"
        )));
    }
    Ok((gpu.to_owned(), count))
}

/// The container's start command: `onstart` run by bash.
fn start_args(onstart: &str) -> String {
    format!("bash -c '{}'", onstart.replace('\'', r"'\''"))
}

/// A GraphQL input object literal from a JSON object (keys unquoted; strings, numbers, booleans
/// and lists as JSON writes them, which GraphQL reads the same), plus enum-valued fields.
fn gql_input(input: &Value, enums: &[(&str, &str)]) -> String {
    fn literal(value: &Value) -> String {
        match value {
            Value::Object(map) => format!(
                "{{{}}}",
                map.iter()
                    .map(|(k, v)| format!("{k}: {}", literal(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Value::Array(items) => format!(
                "[{}]",
                items.iter().map(literal).collect::<Vec<_>>().join(", ")
            ),
            other => other.to_string(),
        }
    }
    let mut fields: Vec<String> = input
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", literal(v)))
                .collect()
        })
        .unwrap_or_default();
    fields.extend(enums.iter().map(|(k, v)| format!("{k}: {v}")));
    format!("{{{}}}", fields.join(", "))
}

/// A v2 pod in neutral terms (v1 field names are read too, where v2 lacks them).
fn host_from(raw: &Value) -> ProviderResult<Host> {
    let id = id_text(&raw["id"]).ok_or_else(|| {
        invalid(format!(
            "pod without an id: {}",
            excerpt(&raw.to_string(), 200)
        ))
    })?;
    let status_word = text(&raw["status"])
        .or_else(|| text(&raw["desiredStatus"]))
        .unwrap_or_else(|| "UNKNOWN".into());
    let address = address_from(&id, raw);
    let has_runtime = raw["runtime"].is_object();
    let wants_ports = raw["ports"].as_array().is_some_and(|p| !p.is_empty())
        || raw["ports"].as_str().is_some_and(|p| !p.is_empty());
    let mapped = !address.ports.is_empty() || !address.http_proxy.is_empty();
    let ready = has_runtime && (mapped || !wants_ports);
    let status = match status_word.as_str() {
        "RUNNING" if ready => HostStatus::Running,
        "RUNNING" | "PROVISIONING" | "STARTING" | "CREATED" | "RESTARTING" => HostStatus::Starting,
        "EXITED" | "PAUSED" => HostStatus::Stopped,
        "TERMINATED" => HostStatus::Terminated,
        other => HostStatus::Failed(other.to_owned()),
    };
    let provider_status = if status_word == "RUNNING" && !ready {
        "RUNNING (container not up yet)".to_owned()
    } else {
        status_word
    };
    let gpus = num(&raw["gpu"]["count"])
        .or_else(|| num(&raw["gpuCount"]))
        .map_or(0, |n| n as u32);
    Ok(Host {
        provider: KIND,
        id,
        label: text(&raw["name"]),
        status,
        provider_status,
        gpus,
        price_per_hour: num(&raw["cost"]).or_else(|| num(&raw["costPerHr"])),
        spot: raw["interruptible"].as_bool().unwrap_or(false),
        address,
    })
}

/// `publicIp` + `portMappings` (`{"22": 10341}`), or v2's `runtime.ports` (`[{private, public,
/// type, ip}]`); HTTP ports get their proxy URL.
fn address_from(id: &str, raw: &Value) -> Address {
    let mut public_ip = text(&raw["publicIp"]);
    let mut ports = BTreeMap::new();
    let mut http_proxy = BTreeMap::new();
    let runtime_ports = raw["runtime"]["ports"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for entry in &runtime_ports {
        let Some(private) = num(&entry["private"])
            .or_else(|| num(&entry["privatePort"]))
            .and_then(port_u16)
        else {
            continue;
        };
        match entry["type"].as_str() {
            Some("http") => {
                http_proxy.insert(private, format!("https://{id}-{private}.proxy.runpod.net"));
            }
            Some("tcp") => {
                let public = num(&entry["public"])
                    .or_else(|| num(&entry["publicPort"]))
                    .and_then(port_u16);
                let ip = text(&entry["ip"]).filter(|_| entry["isIpPublic"] != Value::Bool(false));
                if let (Some(public), Some(ip)) = (public, ip) {
                    public_ip.get_or_insert_with(|| ip.clone());
                    ports.insert(
                        PortSpec {
                            port: private,
                            protocol: Protocol::Tcp,
                        },
                        Mapped {
                            host: ip,
                            port: public,
                        },
                    );
                }
            }
            _ => {}
        }
    }
    if let (Some(ip), Some(mappings)) = (&public_ip, raw["portMappings"].as_object()) {
        for (private, public) in mappings {
            let (Some(private), Some(public)) =
                (private.parse::<u16>().ok(), num(public).and_then(port_u16))
            else {
                continue;
            };
            ports
                .entry(PortSpec {
                    port: private,
                    protocol: Protocol::Tcp,
                })
                .or_insert(Mapped {
                    host: ip.clone(),
                    port: public,
                });
        }
    }
    Address {
        public_ip,
        ports,
        http_proxy,
    }
}

fn port_u16(n: f64) -> Option<u16> {
    (1.0..=65535.0).contains(&n).then_some(n as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_ids_round_trip() {
        assert_eq!(
            parse_offer("NVIDIA GeForce RTX 4090").expect("parse offer"),
            ("NVIDIA GeForce RTX 4090".into(), 1)
        );
        assert_eq!(
            parse_offer(&offer_id("NVIDIA A40", 2)).expect("parse offer"),
            ("NVIDIA A40".into(), 2)
        );
        assert!(parse_offer("0x NVIDIA A40").is_err());
        assert!(parse_offer(" ").is_err());
    }

    #[test]
    fn graphql_literals_quote_strings_and_leave_enums_bare() {
        let input =
            json!({"name": "a \"b\"", "env": [{"key": "K", "value": "V"}], "bidPerGpu": 0.2});
        let literal = gql_input(&input, &[("cloudType", "SECURE")]);
        assert_eq!(
            literal,
            r#"{name: "a \"b\"", env: [{key: "K", value: "V"}], bidPerGpu: 0.2, cloudType: SECURE}"#
        );
    }

    #[test]
    fn running_without_runtime_is_not_ready() {
        let mut pod = json!({"id": "p1", "name": "kiln-1", "status": "RUNNING", "gpu": {"count": 1},
                             "ports": ["8000/tcp"], "runtime": null});
        assert_eq!(host_from(&pod).expect("host").status, HostStatus::Starting);
        pod["runtime"] = json!({"ports": [
            {"private": 8000, "public": 43210, "type": "tcp", "ip": "45.23.12.1"},
            {"private": 8188, "public": 0, "type": "http", "ip": null}]});
        let host = host_from(&pod).expect("host");
        assert_eq!(host.status, HostStatus::Running);
        let api = PortSpec {
            port: 8000,
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            host.address.ports[&api],
            Mapped {
                host: "45.23.12.1".into(),
                port: 43210
            }
        );
        assert_eq!(
            host.address.http_proxy[&8188],
            "https://p1-8188.proxy.runpod.net"
        );
    }

    #[test]
    fn capacity_messages_are_no_capacity() {
        assert!(matches!(
            classify(
                "There are not enough free GPUs on the host machine to start this pod.".into(),
                false
            ),
            ProviderError::NoCapacity { .. }
        ));
        assert!(matches!(
            classify("boom".into(), true),
            ProviderError::Transient { .. }
        ));
        assert!(matches!(
            classify("bad input".into(), false),
            ProviderError::Invalid { .. }
        ));
        assert_eq!(start_args("echo 'hi'"), r#"bash -c 'echo '\''hi'\'''"#);
    }
}
