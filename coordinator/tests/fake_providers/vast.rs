//! A fake Vast.ai API: offer search, rent (asks), the v0 show/manage/destroy and the paginated
//! v1 list. Instances go `null → loading → running ↔ stopped`; `public_ipaddr` carries a trailing
//! newline and `ports` is the Docker-style object, present only while running. A 429 is plain
//! text without Retry-After.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use serde_json::{Value, json};
use url::Url;

use super::{Served, authorized, serve};

#[derive(Debug, Default)]
pub struct Knobs {
    /// The next N requests are answered 429 (plain text, no Retry-After).
    pub fail_429: u32,
    /// The next N rents (only) are answered 429.
    pub fail_429_on_rent: u32,
    /// The next N requests are answered 502 (a proxy in front of Vast failing).
    pub fail_502: u32,
    /// The next N rents are answered 502 without creating anything.
    pub fail_502_on_rent: u32,
    /// Answer a rent of a missing offer as `cancel_unavail` does: 410, "no longer available".
    pub gone_as_410: bool,
    /// How long a rent waits after creating the instance before it answers.
    pub rent_delay: Duration,
    /// A started instance never gets its GPU back: intended running, actual stopped forever.
    pub gpu_taken: bool,
    /// Reads an instance spends in each boot state (`null`, `loading`).
    pub reads_per_state: u32,
    /// Page size of the v1 list (Vast's maximum is 25).
    pub page_size: usize,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: u64,
    pub label: String,
    pub offer: Value,
    pub actual: Option<&'static str>,
    pub intended: &'static str,
    pub reads: u32,
    pub is_bid: bool,
    pub bid: Option<f64>,
    /// Internal port keys (`8000/tcp`) → external port.
    pub ports: BTreeMap<String, u16>,
}

#[derive(Debug, Default)]
pub struct VastState {
    pub knobs: Knobs,
    pub offers: Vec<Value>,
    pub instances: BTreeMap<u64, Instance>,
    pub next_id: u64,
    /// Rents that created an instance.
    pub creates: u32,
    /// Rent requests received (created or not).
    pub rent_requests: u32,
    /// 429s answered.
    pub rate_limited: u32,
    /// The body of the last rent.
    pub last_rent: Option<Value>,
}

pub struct VastFake {
    pub url: Url,
    pub state: Arc<Mutex<VastState>>,
    _served: Served,
}

impl VastFake {
    pub async fn start() -> VastFake {
        let state = Arc::new(Mutex::new(VastState {
            knobs: Knobs {
                reads_per_state: 1,
                page_size: 25,
                ..Knobs::default()
            },
            offers: default_offers(),
            next_id: 7_835_610,
            ..VastState::default()
        }));
        let router = Router::new()
            .route("/api/v0/bundles/", post(search))
            .route("/api/v0/asks/{id}/", put(rent))
            .route(
                "/api/v0/instances/{id}/",
                put(manage).get(show).delete(destroy),
            )
            .route("/api/v1/instances/", axum::routing::get(list))
            .layer(middleware::from_fn_with_state(state.clone(), gate))
            .with_state(state.clone());
        let served = serve(router).await;
        VastFake {
            url: Url::parse(&format!("http://{}", served.addr)).expect("parse"),
            state,
            _served: served,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut VastState) -> T) -> T {
        f(&mut self.state.lock().expect("state lock"))
    }

    /// Instances that exist (not destroyed).
    pub fn instance_count(&self) -> usize {
        self.with(|s| s.instances.len())
    }
}

fn default_offers() -> Vec<Value> {
    let offer = |id: u64, price: f64, reliability: f64, min_bid: f64| {
        json!({
            "id": id, "ask_contract_id": id, "machine_id": id / 10, "host_id": 1,
            "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564,
            "dph_total": price, "dph_base": price - 0.02, "min_bid": min_bid,
            "storage_cost": 0.15, "reliability": reliability, "disk_space": 200.0,
            "direct_port_count": 20, "public_ipaddr": "65.130.162.74", "geolocation": "Norway, NO",
            "rentable": true, "rented": false, "verified": true, "external": false
        })
    };
    vec![
        offer(1001, 0.45, 0.995, 0.20),
        offer(1002, 0.38, 0.99, 0.15),
        offer(1003, 0.30, 0.90, 0.10),
        offer(1004, 0.90, 0.999, 0.40),
    ]
}

type Shared = State<Arc<Mutex<VastState>>>;

/// Bearer key and the 429 knob, for every route.
async fn gate(State(state): Shared, headers: HeaderMap, request: Request, next: Next) -> Response {
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"success": false, "error": "auth_error", "msg": "Invalid user key"})),
        )
            .into_response();
    }
    {
        let mut s = state.lock().expect("state lock");
        if s.knobs.fail_429 > 0 {
            s.knobs.fail_429 -= 1;
            s.rate_limited += 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "API requests too frequent endpoint threshold=4.5",
            )
                .into_response();
        }
        if s.knobs.fail_502 > 0 {
            s.knobs.fail_502 -= 1;
            return (StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").into_response();
        }
    }
    next.run(request).await
}

fn error(status: StatusCode, code: &str, msg: String) -> Response {
    (
        status,
        axum::Json(json!({"success": false, "error": code, "msg": msg})),
    )
        .into_response()
}

fn op<'a>(filters: &'a Value, field: &str, op: &str) -> Option<&'a Value> {
    filters.get(field).and_then(|f| f.get(op))
}

async fn search(State(state): Shared, body: String) -> Response {
    let Ok(q) = serde_json::from_str::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "body is not JSON".into(),
        );
    };
    let s = state.lock().expect("state lock");
    let spot = q["type"] == "bid";
    if !(spot || q["type"] == "on-demand") {
        return error(StatusCode::BAD_REQUEST, "invalid_args", "bad type".into());
    }
    let mut offers: Vec<Value> = s
        .offers
        .iter()
        .filter(|o| op(&q, "gpu_name", "eq").is_none_or(|v| *v == o["gpu_name"]))
        .filter(|o| op(&q, "num_gpus", "eq").is_none_or(|v| v.as_f64() == o["num_gpus"].as_f64()))
        .filter(|o| {
            op(&q, "reliability", "gte").is_none_or(|v| o["reliability"].as_f64() >= v.as_f64())
        })
        .filter(|o| {
            op(&q, "disk_space", "gte").is_none_or(|v| o["disk_space"].as_f64() >= v.as_f64())
        })
        .filter(|o| {
            op(&q, "dph_total", "lte").is_none_or(|v| o["dph_total"].as_f64() <= v.as_f64())
        })
        .filter(|o| {
            op(&q, "direct_port_count", "gte")
                .is_none_or(|v| o["direct_port_count"].as_f64() >= v.as_f64())
        })
        .cloned()
        .collect();
    offers.sort_by(|a, b| {
        a["dph_total"]
            .as_f64()
            .partial_cmp(&b["dph_total"].as_f64())
            .expect("prices are numbers")
    });
    axum::Json(json!({ "offers": offers })).into_response()
}

async fn rent(State(state): Shared, Path(id): Path<u64>, body: String) -> Response {
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            "body is not JSON".into(),
        );
    };
    let (contract, delay) = {
        let mut s = state.lock().expect("state lock");
        s.rent_requests += 1;
        if s.knobs.fail_502_on_rent > 0 {
            s.knobs.fail_502_on_rent -= 1;
            return (StatusCode::BAD_GATEWAY, "<html>502 Bad Gateway</html>").into_response();
        }
        if s.knobs.fail_429_on_rent > 0 {
            s.knobs.fail_429_on_rent -= 1;
            s.rate_limited += 1;
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "API requests too frequent endpoint threshold=4.5",
            )
                .into_response();
        }
        let Some(index) = s.offers.iter().position(|o| o["id"] == json!(id)) else {
            if s.knobs.gone_as_410 {
                return error(
                    StatusCode::GONE,
                    "no_such_ask",
                    format!("Offer {id} is no longer available."),
                );
            }
            return error(
                StatusCode::NOT_FOUND,
                "no_such_ask",
                format!("error 404/3603: no_such_ask Instance type by id {id} is not available."),
            );
        };
        if body["label"].as_str().is_none_or(str::is_empty)
            || body["image"].as_str().is_none()
            || !body["env"].is_object()
            || body["cancel_unavail"] != json!(true)
        {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_args",
                format!("bad rent body {body}"),
            );
        }
        let offer = s.offers.remove(index);
        s.next_id += 1;
        let contract = s.next_id;
        let mut ports = BTreeMap::new();
        ports.insert("22/tcp".to_owned(), 40022);
        for (n, key) in body["env"].as_object().expect("object").keys().enumerate() {
            if let Some(spec) = key.strip_prefix("-p ") {
                let (inner, proto) = match spec.split_once('/') {
                    Some((p, proto)) => (p, proto),
                    None => (spec, "tcp"),
                };
                let internal = inner.split(':').next().unwrap_or_default();
                ports.insert(format!("{internal}/{proto}"), 41000 + n as u16);
            }
        }
        let bid = body["price"].as_f64();
        s.instances.insert(
            contract,
            Instance {
                id: contract,
                label: body["label"]
                    .as_str()
                    .expect("label checked above")
                    .to_owned(),
                offer,
                actual: None,
                intended: "running",
                reads: 0,
                is_bid: bid.is_some(),
                bid,
                ports,
            },
        );
        s.creates += 1;
        s.last_rent = Some(body);
        (contract, s.knobs.rent_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    axum::Json(json!({"success": true, "new_contract": contract})).into_response()
}

/// One read of an instance advances its boot by a step.
fn advance(instance: &mut Instance, reads_per_state: u32, gpu_taken: bool) {
    if instance.intended != "running" {
        return;
    }
    instance.reads += 1;
    if instance.reads < reads_per_state {
        return;
    }
    let next = match instance.actual {
        None => Some("loading"),
        Some("loading") => Some("running"),
        Some("stopped") if !gpu_taken => Some("loading"),
        other => other,
    };
    if next != instance.actual {
        instance.actual = next;
        instance.reads = 0;
    }
}

fn instance_json(i: &Instance) -> Value {
    let mut v = json!({
        "id": i.id,
        "machine_id": i.offer["machine_id"],
        "label": i.label,
        "actual_status": i.actual,
        "intended_status": i.intended,
        "cur_state": if i.intended == "running" { "running" } else { "stopped" },
        "gpu_name": i.offer["gpu_name"],
        "num_gpus": i.offer["num_gpus"],
        "dph_total": i.bid.map_or(i.offer["dph_total"].clone(), |b| json!(b)),
        "is_bid": i.is_bid,
        "public_ipaddr": "65.130.162.74\n",
        "status_msg": "",
    });
    if i.actual == Some("running") {
        let ports: serde_json::Map<String, Value> = i
            .ports
            .iter()
            .map(|(k, p)| {
                (
                    k.clone(),
                    json!([{"HostIp": "0.0.0.0", "HostPort": p.to_string()}]),
                )
            })
            .collect();
        v["ports"] = Value::Object(ports);
    }
    v
}

async fn show(State(state): Shared, Path(id): Path<u64>) -> Response {
    let mut s = state.lock().expect("state lock");
    let (reads, taken) = (s.knobs.reads_per_state, s.knobs.gpu_taken);
    match s.instances.get_mut(&id) {
        Some(i) => {
            advance(i, reads, taken);
            axum::Json(json!({ "instances": instance_json(i) })).into_response()
        }
        None => axum::Json(json!({ "instances": null })).into_response(),
    }
}

async fn manage(State(state): Shared, Path(id): Path<u64>, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut s = state.lock().expect("state lock");
    let taken = s.knobs.gpu_taken;
    let Some(i) = s.instances.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            "no_such_instance",
            format!("Instance {id} not found."),
        );
    };
    match body["state"].as_str() {
        Some("stopped") => {
            i.intended = "stopped";
            i.actual = Some("stopped");
        }
        Some("running") => {
            i.intended = "running";
            i.reads = 0;
            if !taken && i.actual == Some("stopped") {
                i.actual = Some("loading");
            }
        }
        _ => return error(StatusCode::BAD_REQUEST, "invalid_args", "bad state".into()),
    }
    axum::Json(json!({"success": true})).into_response()
}

async fn destroy(State(state): Shared, Path(id): Path<u64>) -> Response {
    let mut s = state.lock().expect("state lock");
    match s.instances.remove(&id) {
        Some(_) => {
            axum::Json(json!({"success": true, "msg": "destroying instance"})).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "no_such_instance",
            format!("Instance {id} not found."),
        ),
    }
}

async fn list(State(state): Shared, Query(query): Query<BTreeMap<String, String>>) -> Response {
    let mut s = state.lock().expect("state lock");
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(25)
        .min(s.knobs.page_size);
    let label: Option<String> = query
        .get("select_filters")
        .and_then(|f| serde_json::from_str::<Value>(f).ok())
        .and_then(|f| f["label"]["eq"].as_str().map(str::to_owned));
    let after: u64 = query
        .get("after_token")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let (reads, taken) = (s.knobs.reads_per_state, s.knobs.gpu_taken);
    let matching: Vec<u64> = s
        .instances
        .values()
        .filter(|i| label.as_ref().is_none_or(|l| *l == i.label))
        .filter(|i| i.id > after)
        .map(|i| i.id)
        .collect();
    let page: Vec<u64> = matching.iter().take(limit).copied().collect();
    let next = (matching.len() > page.len()).then(|| page.last().expect("present").to_string());
    let instances: Vec<Value> = page
        .iter()
        .map(|id| {
            let i = s.instances.get_mut(id).expect("listed instance");
            advance(i, reads, taken);
            instance_json(i)
        })
        .collect();
    axum::Json(json!({
        "success": true,
        "instances": instances,
        "instances_found": instances.len(),
        "next_token": next,
    }))
    .into_response()
}
