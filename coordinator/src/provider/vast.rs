//! Vast.ai: a marketplace of hosts. Offers come from `POST /api/v0/bundles/`, a rent is
//! `PUT /api/v0/asks/{offer}/` (the answer's `new_contract` is the instance id), instances are
//! listed through the paginated `GET /api/v1/instances/` and managed through
//! `/api/v0/instances/{id}/`. Each internal port is mapped to a random external port on a
//! usually shared IP, read from the instance's Docker-style `ports` object.

use std::collections::BTreeMap;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
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
pub const DEFAULT_BASE: &str = "https://console.vast.ai";

const KIND: ProviderKind = ProviderKind::Vast;
/// The v1 list's largest page.
const PAGE: u32 = 25;
/// At most this many list pages are followed (25 × 400 instances).
const MAX_PAGES: u32 = 400;
/// Offers asked for per search.
const SEARCH_LIMIT: u32 = 64;

/// A Vast.ai client.
#[derive(Debug)]
pub struct VastClient {
    api: Api,
    base: Url,
    runtype: String,
    lookup: LabelLookup,
}

impl VastClient {
    /// A client for the API at `base` (production: [`DEFAULT_BASE`]), with Vast's pacing and the
    /// default retry policy.
    pub fn new(base: Url, api_key: String) -> ProviderResult<VastClient> {
        http::check_base(KIND, &base)?;
        Ok(VastClient {
            api: Api::new(KIND, api_key, RetryPolicy::default(), Pacing::vast())?,
            base,
            runtype: "ssh_direc ssh_proxy".into(),
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

    /// How a lost rent looks for its host by label.
    pub fn with_label_lookup(mut self, lookup: LabelLookup) -> Self {
        self.lookup = lookup;
        self
    }

    /// The launch mode (`runtype`). The default `ssh_direc ssh_proxy` runs Vast's SSH entrypoint
    /// and then `onstart`; `args` keeps the image's own entrypoint.
    pub fn with_runtype(mut self, runtype: impl Into<String>) -> Self {
        self.runtype = runtype.into();
        self
    }

    fn url(&self, segments: &[&str]) -> ProviderResult<Url> {
        http::endpoint(KIND, &self.base, segments)
    }

    fn instance_url(&self, id: &str) -> ProviderResult<Url> {
        let id = instance_id(id)?;
        self.url(&["api", "v0", "instances", &id.to_string(), ""])
    }

    /// Instances matching `filters` (v1 list, every page).
    async fn list_filtered(&self, filters: Option<Value>) -> ProviderResult<Vec<Host>> {
        let mut hosts = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = self.url(&["api", "v1", "instances", ""])?;
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("limit", &PAGE.to_string());
                query.append_pair("order_by", r#"[{"col":"id","dir":"asc"}]"#);
                if let Some(filters) = &filters {
                    query.append_pair("select_filters", &filters.to_string());
                }
                if let Some(token) = &token {
                    query.append_pair("after_token", token);
                }
            }
            let reply = self
                .api
                .send(Request::new(Method::GET, url, "list"))
                .await?;
            let page: Value = ok_json(&reply, "instance list")?;
            let instances = page["instances"]
                .as_array()
                .ok_or_else(|| invalid(format!("instance list without `instances`: {page}")))?;
            for instance in instances {
                hosts.push(host_from(instance)?);
            }
            token = text(&page["next_token"]);
            if token.is_none() {
                return Ok(hosts);
            }
        }
        Err(invalid(format!(
            "instance list did not end within {MAX_PAGES} pages"
        )))
    }

    async fn set_state(&self, id: &str, state: &str) -> ProviderResult<()> {
        let url = self.instance_url(id)?;
        let reply = self
            .api
            .send(Request::new(Method::PUT, url, "manage").json(json!({ "state": state })))
            .await?;
        let body: Value = checked(&reply, &format!("instance {id}"))?;
        if body["success"] == Value::Bool(false) {
            return Err(invalid(format!(
                "setting instance {id} to {state} refused: {}",
                message_of(&body, &reply.body)
            )));
        }
        Ok(())
    }

    async fn create(&self, request: &RentRequest) -> ProviderResult<Host> {
        let offer = request.offer_id.trim();
        let offer_num: u64 = offer.parse().map_err(|_| {
            invalid(format!(
                "offer id `{offer}` is not a Vast ask id (a number)"
            ))
        })?;
        let body = rent_body(request, &self.runtype)?;
        let url = self.url(&["api", "v0", "asks", &offer_num.to_string(), ""])?;
        // A rent is not idempotent: a timeout is answered by the label lookup, not a resend.
        let reply = self
            .api
            .send(
                Request::new(Method::PUT, url, "create")
                    .json(body)
                    .idempotent(false),
            )
            .await?;
        // Vast says "gone" as `no_such_ask` (in `error` or inside `msg`, 404) or "no longer
        // available" (410 with `cancel_unavail`); another 404 is an ordinary NotFound.
        let gone = |text: &str| {
            let text = text.to_lowercase();
            text.contains("no_such_ask") || text.contains("no longer available")
        };
        if matches!(reply.status.as_u16(), 404 | 410) && gone(&reply.body) {
            return Err(ProviderError::OfferGone {
                provider: KIND,
                offer_id: offer.to_owned(),
            });
        }
        let body: Value = checked(&reply, &format!("offer {offer}"))?;
        if body["success"] == Value::Bool(false) {
            if gone(&body.to_string()) {
                return Err(ProviderError::OfferGone {
                    provider: KIND,
                    offer_id: offer.to_owned(),
                });
            }
            return Err(invalid(format!(
                "rent of offer {offer} refused: {}",
                message_of(&body, &reply.body)
            )));
        }
        let id = id_text(&body["new_contract"])
            .ok_or_else(|| invalid(format!("rent answer without `new_contract`: {body}")))?;
        // The new instance may not be readable yet; what the rent said is enough to go on.
        match self.get(&id).await {
            Ok(host) => Ok(host),
            Err(_) => Ok(Host {
                provider: KIND,
                id,
                label: Some(request.label.clone()),
                status: HostStatus::Starting,
                provider_status: "running/null".into(),
                gpus: 0,
                price_per_hour: None,
                spot: request.bid_per_hour.is_some(),
                address: Address::default(),
            }),
        }
    }
}

#[async_trait]
impl Provider for VastClient {
    fn kind(&self) -> ProviderKind {
        KIND
    }

    async fn offers(&self, query: &OfferQuery) -> ProviderResult<Vec<Offer>> {
        http::check_query(KIND, query)?;
        let mut body = json!({
            "verified": {"eq": true},
            "external": {"eq": false},
            "rentable": {"eq": true},
            "rented": {"eq": false},
            "gpu_name": {"eq": query.gpu},
            "num_gpus": {"eq": query.num_gpus},
            "reliability": {"gte": query.min_reliability},
            "disk_space": {"gte": query.disk_gb},
            "direct_port_count": {"gte": 1},
            "order": [["dph_total", "asc"]],
            "type": if query.spot { "bid" } else { "on-demand" },
            "limit": SEARCH_LIMIT,
            "allocated_storage": query.disk_gb.max(8),
        });
        if !query.spot {
            body["dph_total"] = json!({"lte": query.max_price_per_hour});
        }
        let url = self.url(&["api", "v0", "bundles", ""])?;
        // A search changes nothing, so it may be resent.
        let request = Request::new(Method::POST, url, "search")
            .json(body)
            .idempotent(true);
        let reply = self.api.send(request).await?;
        let answer: Value = ok_json(&reply, "offer search")?;
        let list = answer["offers"].as_array().ok_or_else(|| {
            invalid(format!(
                "offer search without `offers`: {}",
                excerpt(&reply.body, 200)
            ))
        })?;
        let mut offers = Vec::new();
        for raw in list {
            let Some(offer) = offer_from(raw, query.spot) else {
                continue;
            };
            // The server filters too; these checks keep a loose server from renting us a wrong host.
            let rentable = raw["rentable"].as_bool().unwrap_or(true);
            if rentable
                && offer.gpu_name == query.gpu
                && offer.num_gpus == query.num_gpus
                && offer.price_per_hour <= query.max_price_per_hour
                && offer.reliability.unwrap_or(1.0) >= query.min_reliability
                && num(&raw["disk_space"]).unwrap_or(f64::MAX) >= f64::from(query.disk_gb)
            {
                offers.push(offer);
            }
        }
        http::cheapest_first(&mut offers);
        Ok(offers)
    }

    async fn rent(&self, request: &RentRequest) -> ProviderResult<Host> {
        http::rent_by_label(self, &request.label, &self.lookup, || self.create(request)).await
    }

    async fn list(&self) -> ProviderResult<Vec<Host>> {
        self.list_filtered(None).await
    }

    async fn get(&self, id: &str) -> ProviderResult<Host> {
        let mut url = self.instance_url(id)?;
        url.query_pairs_mut().append_pair("owner", "me");
        let reply = self
            .api
            .send(Request::new(Method::GET, url, "show"))
            .await?;
        let body: Value = checked(&reply, &format!("instance {id}"))?;
        match &body["instances"] {
            Value::Null => Err(ProviderError::NotFound {
                provider: KIND,
                what: format!("instance {id}"),
            }),
            instance => host_from(instance),
        }
    }

    async fn stop(&self, id: &str) -> ProviderResult<()> {
        self.set_state(id, "stopped").await
    }

    async fn start(&self, id: &str) -> ProviderResult<()> {
        self.set_state(id, "running").await
    }

    async fn destroy(&self, id: &str) -> ProviderResult<()> {
        let url = self.instance_url(id)?;
        let reply = self
            .api
            .send(Request::new(Method::DELETE, url, "destroy").json(json!({})))
            .await?;
        match checked::<Value>(&reply, &format!("instance {id}")) {
            Ok(_) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks the list for the label only; a destroyed instance under it does not count.
    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<Host>> {
        let hosts = self
            .list_filtered(Some(json!({"label": {"eq": label}})))
            .await?;
        Ok(hosts
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

fn instance_id(id: &str) -> ProviderResult<u64> {
    id.trim()
        .parse()
        .map_err(|_| invalid(format!("`{id}` is not a Vast instance id (a number)")))
}

/// The provider's message: `msg`, `message` or `error`, else the raw body.
fn message_of(body: &Value, raw: &str) -> String {
    ["msg", "message", "error"]
        .iter()
        .find_map(|key| text(&body[*key]))
        .unwrap_or_else(|| excerpt(raw, 200))
}

/// A successful reply's JSON, or the error its status means.
fn checked<T: serde::de::DeserializeOwned>(reply: &Reply, what: &str) -> ProviderResult<T> {
    if !reply.status.is_success() {
        let body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::Null);
        let message = message_of(&body, &reply.body);
        let code = body["error"].as_str().unwrap_or_default();
        if code == "no_such_instance" {
            return Err(ProviderError::NotFound {
                provider: KIND,
                what: what.to_owned(),
            });
        }
        return Err(http::status_error(
            KIND,
            reply.status,
            what,
            message,
            reply.retry_after,
        ));
    }
    reply.json(KIND, what)
}

fn ok_json(reply: &Reply, what: &str) -> ProviderResult<Value> {
    if reply.status == StatusCode::NOT_FOUND {
        return Err(invalid(format!(
            "{what}: endpoint not found (HTTP 404): {}",
            excerpt(&reply.body, 200)
        )));
    }
    checked(reply, what)
}

/// The `PUT /asks/{id}/` body: ports as `-p P:P` env keys, `cancel_unavail` so that a failed
/// scheduling is an error rather than a stopped instance that bills storage.
fn rent_body(request: &RentRequest, runtype: &str) -> ProviderResult<Value> {
    if request.label.trim().is_empty() || request.label.len() > 256 {
        return Err(invalid(format!(
            "label must be 1..=256 characters (got {})",
            request.label.len()
        )));
    }
    if request.image.is_none() && request.template.is_none() {
        return Err(invalid("a Vast rent needs an image or a template".into()));
    }
    if request.disk_gb < 8 {
        return Err(invalid(format!(
            "disk must be at least 8 GB (got {})",
            request.disk_gb
        )));
    }
    if request.onstart.as_ref().is_some_and(|s| s.len() > 4096) {
        return Err(invalid(
            "onstart is longer than Vast's 4096 characters".into(),
        ));
    }
    let mut env = serde_json::Map::new();
    let mut total = 0;
    for (key, value) in &request.env {
        if key.starts_with("-p ") || key.len() + value.len() > 256 {
            return Err(invalid(format!(
                "env item `{key}` is too long (256) or looks like a port"
            )));
        }
        total += key.len() + value.len();
        env.insert(key.clone(), Value::String(value.clone()));
    }
    if total > 32768 {
        return Err(invalid("env is larger than Vast's 32768 characters".into()));
    }
    for port in &request.ports {
        let key = match port.protocol {
            Protocol::Tcp => format!("-p {0}:{0}", port.port),
            Protocol::Udp => format!("-p {0}:{0}/udp", port.port),
        };
        env.insert(key, Value::String("1".into()));
    }
    let price = match request.bid_per_hour {
        Some(bid) if !(0.001..=128.0).contains(&bid) => {
            return Err(invalid(format!(
                "bid {bid} is outside Vast's 0.001..=128 $/h"
            )));
        }
        Some(bid) => json!(bid),
        None => Value::Null,
    };
    let mut body = json!({
        "client_id": "me",
        "label": request.label,
        "disk": request.disk_gb,
        "env": env,
        "runtype": runtype,
        "price": price,
        "cancel_unavail": true,
    });
    if let Some(image) = &request.image {
        body["image"] = json!(image);
    }
    if let Some(template) = &request.template {
        body["template_hash_id"] = json!(template);
    }
    if let Some(onstart) = &request.onstart {
        body["onstart"] = json!(onstart);
    }
    Ok(body)
}

fn offer_from(raw: &Value, spot: bool) -> Option<Offer> {
    let id = id_text(&raw["id"])?;
    let on_demand = num(&raw["dph_total"])?;
    // A bid must be at least `min_bid`; without one the on-demand price is a safe bid.
    let price = if spot {
        num(&raw["min_bid"]).unwrap_or(on_demand)
    } else {
        on_demand
    };
    Some(Offer {
        provider: KIND,
        offer_id: id,
        gpu_name: text(&raw["gpu_name"])?,
        num_gpus: num(&raw["num_gpus"]).map(|n| n as u32)?,
        price_per_hour: price,
        storage_per_gb_month: num(&raw["storage_cost"]),
        reliability: num(&raw["reliability"]),
        location: text(&raw["geolocation"]),
        spot,
    })
}

/// A Vast instance in neutral terms.
fn host_from(raw: &Value) -> ProviderResult<Host> {
    let id = id_text(&raw["id"]).ok_or_else(|| {
        invalid(format!(
            "instance without an id: {}",
            excerpt(&raw.to_string(), 200)
        ))
    })?;
    let actual = text(&raw["actual_status"]);
    let intended = text(&raw["intended_status"]);
    let cur = text(&raw["cur_state"]);
    let status = status_of(actual.as_deref(), intended.as_deref(), cur.as_deref());
    Ok(Host {
        provider: KIND,
        id,
        label: text(&raw["label"]),
        status,
        provider_status: format!(
            "{}/{}",
            intended.as_deref().unwrap_or("-"),
            actual.as_deref().unwrap_or("null")
        ),
        gpus: num(&raw["num_gpus"]).map_or(0, |n| n as u32),
        price_per_hour: num(&raw["dph_total"]),
        spot: raw["is_bid"].as_bool().unwrap_or(false),
        address: address_from(raw),
    })
}

/// Vast's status pair in neutral terms. "Scheduling" is not a Vast status: it is an instance
/// asked to run (`intended_status` running) that does not (`actual_status` stopped, or anything
/// but running, after it once ran).
pub(crate) fn status_of(
    actual: Option<&str>,
    intended: Option<&str>,
    cur: Option<&str>,
) -> HostStatus {
    if cur == Some("unloaded") {
        return HostStatus::Terminated;
    }
    match (actual, intended) {
        (Some("running"), _) => HostStatus::Running,
        (Some("stopped"), Some("running")) => HostStatus::Scheduling,
        (Some("stopped"), _) => HostStatus::Stopped,
        (None | Some("created" | "loading" | "rebooting"), _) => HostStatus::Starting,
        (Some(other), _) => HostStatus::Failed(other.to_owned()),
    }
}

/// `public_ipaddr` (trimmed: Vast sends it with a newline) and `ports` (`"8000/tcp":
/// [{"HostPort": "41234"}]`; only while running).
fn address_from(raw: &Value) -> Address {
    let public_ip = text(&raw["public_ipaddr"]);
    let mut ports = BTreeMap::new();
    if let (Some(ip), Some(map)) = (&public_ip, raw["ports"].as_object()) {
        for (key, bindings) in map {
            let Some(spec) = port_key(key) else { continue };
            let host_port = bindings
                .as_array()
                .and_then(|b| b.first())
                .and_then(|b| num(&b["HostPort"]))
                .filter(|p| (1.0..=65535.0).contains(p));
            if let Some(port) = host_port {
                ports.insert(
                    spec,
                    Mapped {
                        host: ip.clone(),
                        port: port as u16,
                    },
                );
            }
        }
    }
    Address {
        public_ip,
        ports,
        http_proxy: BTreeMap::new(),
    }
}

/// `"8000/tcp"` → port 8000 over TCP.
fn port_key(key: &str) -> Option<PortSpec> {
    let (port, protocol) = key.split_once('/')?;
    let protocol = match protocol {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some(PortSpec {
        port: port.parse().ok()?,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_neutral_ones() {
        assert_eq!(status_of(None, Some("running"), None), HostStatus::Starting);
        assert_eq!(
            status_of(Some("loading"), Some("running"), None),
            HostStatus::Starting
        );
        assert_eq!(
            status_of(Some("running"), Some("running"), None),
            HostStatus::Running
        );
        assert_eq!(
            status_of(Some("stopped"), Some("stopped"), None),
            HostStatus::Stopped
        );
        assert_eq!(
            status_of(Some("stopped"), Some("running"), None),
            HostStatus::Scheduling
        );
        assert_eq!(
            status_of(Some("offline"), Some("running"), None),
            HostStatus::Failed("offline".into())
        );
        assert_eq!(
            status_of(Some("stopped"), Some("stopped"), Some("unloaded")),
            HostStatus::Terminated
        );
    }

    #[test]
    fn address_trims_the_ip_and_reads_host_ports() {
        let raw = json!({
            "id": 7, "public_ipaddr": "65.130.162.74\n",
            "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "33526"}],
                      "7946/udp": [{"HostIp": "0.0.0.0", "HostPort": "40001"}],
                      "bad": [], "8000/tcp": []}
        });
        let address = address_from(&raw);
        assert_eq!(address.public_ip.as_deref(), Some("65.130.162.74"));
        let ssh = PortSpec {
            port: 22,
            protocol: Protocol::Tcp,
        };
        assert_eq!(
            address.ports[&ssh],
            Mapped {
                host: "65.130.162.74".into(),
                port: 33526
            }
        );
        let gossip = PortSpec {
            port: 7946,
            protocol: Protocol::Udp,
        };
        assert_eq!(address.ports[&gossip].port, 40001);
        assert_eq!(address.ports.len(), 2);
    }

    #[test]
    fn rent_body_puts_ports_in_env_and_refuses_bad_input() {
        let mut request = RentRequest {
            label: "kiln-1".into(),
            offer_id: "42".into(),
            image: Some("img".into()),
            template: None,
            onstart: Some("bash /start.sh".into()),
            env: BTreeMap::from([("A".into(), "b".into())]),
            ports: vec![PortSpec {
                port: 8000,
                protocol: Protocol::Tcp,
            }],
            disk_gb: 50,
            bid_per_hour: None,
        };
        let body = rent_body(&request, "ssh_direc ssh_proxy").expect("rent body");
        assert_eq!(body["env"]["-p 8000:8000"], "1");
        assert_eq!(body["env"]["A"], "b");
        assert_eq!(body["cancel_unavail"], true);
        assert_eq!(body["price"], Value::Null);
        request.disk_gb = 4;
        assert!(matches!(
            rent_body(&request, "x"),
            Err(ProviderError::Invalid { .. })
        ));
        request.disk_gb = 50;
        request.image = None;
        assert!(matches!(
            rent_body(&request, "x"),
            Err(ProviderError::Invalid { .. })
        ));
    }
}
