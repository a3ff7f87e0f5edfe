//! A fake RunPod: REST v2 pods (create, list, get, action, delete; RFC 9457 errors; 429 with
//! Retry-After) and one GraphQL endpoint that dispatches on the operation name (`gpuTypes`,
//! `podRentInterruptable`, `podBidResume`) and answers errors inside HTTP 200. Pods go
//! `PROVISIONING → RUNNING` and keep `runtime: null` for a few reads after RUNNING; a resume can
//! be refused ("not enough free GPUs") or come back with 0 GPUs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use url::Url;

use super::{Served, authorized, graphql_input, serve};

pub const NOT_ENOUGH_GPUS: &str =
    "There are not enough free GPUs on the host machine to start this pod.";
pub const NO_INSTANCES: &str = "There are no longer any instances available with the requested specifications. Please refresh and try again.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResumeMode {
    #[default]
    Ok,
    /// The GPU was taken: start is refused.
    NotEnoughGpus,
    /// The pod starts with zero GPUs.
    ZeroGpus,
}

#[derive(Debug, Default)]
pub struct Knobs {
    pub resume: ResumeMode,
    /// Creates (REST and GraphQL) fail for lack of capacity.
    pub no_capacity: bool,
    /// Reads a pod spends PROVISIONING / STARTING.
    pub boot_reads: u32,
    /// Reads a RUNNING pod keeps `runtime: null`.
    pub runtime_reads: u32,
    /// The next N REST requests get 429 with `Retry-After: retry_after_secs`.
    pub fail_429: u32,
    pub retry_after_secs: u32,
    /// How long a create waits after creating the pod before it answers.
    pub create_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub name: String,
    pub status: &'static str,
    pub interruptible: bool,
    pub bid: Option<f64>,
    pub gpu_id: String,
    pub gpu_count: u32,
    pub ports: Vec<String>,
    pub reads: u32,
    pub runtime: bool,
    pub price_per_gpu: f64,
}

#[derive(Debug, Default)]
pub struct RunpodState {
    pub knobs: Knobs,
    pub pods: BTreeMap<String, Pod>,
    next: u32,
    pub creates: u32,
    pub rate_limited: u32,
    /// GraphQL operations received, by name.
    pub graphql_ops: Vec<String>,
    pub last_create: Option<Value>,
}

pub struct RunpodFake {
    pub rest: Url,
    pub graphql: Url,
    pub state: Arc<Mutex<RunpodState>>,
    _served: Served,
}

impl RunpodFake {
    pub async fn start() -> RunpodFake {
        let state = Arc::new(Mutex::new(RunpodState {
            knobs: Knobs {
                boot_reads: 1,
                runtime_reads: 2,
                retry_after_secs: 1,
                ..Knobs::default()
            },
            ..RunpodState::default()
        }));
        let router = Router::new()
            .route("/v2/pods", post(create).get(list))
            .route("/v2/pods/{id}", get(show).delete(delete))
            .route("/v2/pods/{id}/action", post(action))
            .route("/graphql", post(graphql))
            .layer(middleware::from_fn_with_state(state.clone(), gate))
            .with_state(state.clone());
        let served = serve(router).await;
        RunpodFake {
            rest: Url::parse(&format!("http://{}/v2", served.addr)).expect("parse"),
            graphql: Url::parse(&format!("http://{}/graphql", served.addr)).expect("parse"),
            state,
            _served: served,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut RunpodState) -> T) -> T {
        f(&mut self.state.lock().expect("state lock"))
    }
}

type Shared = State<Arc<Mutex<RunpodState>>>;

fn problem(status: StatusCode, detail: &str) -> Response {
    (
        status,
        [("content-type", "application/problem+json")],
        json!({"title": status.canonical_reason(), "status": status.as_u16(), "detail": detail})
            .to_string(),
    )
        .into_response()
}

async fn gate(State(state): Shared, headers: HeaderMap, request: Request, next: Next) -> Response {
    if !authorized(&headers) {
        return problem(StatusCode::UNAUTHORIZED, "invalid api key");
    }
    if request.uri().path().starts_with("/v2/") {
        let mut s = state.lock().expect("state lock");
        if s.knobs.fail_429 > 0 {
            s.knobs.fail_429 -= 1;
            s.rate_limited += 1;
            let mut response = problem(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limit exceeded for the minute window",
            );
            response.headers_mut().insert(
                "retry-after",
                s.knobs.retry_after_secs.to_string().parse().expect("parse"),
            );
            return response;
        }
    }
    next.run(request).await
}

fn new_pod(
    s: &mut RunpodState,
    name: &str,
    gpu_id: &str,
    count: u32,
    ports: Vec<String>,
    bid: Option<f64>,
) -> Pod {
    s.next += 1;
    let pod = Pod {
        id: format!("xedezhzb9la{:03}", s.next),
        name: name.to_owned(),
        status: "PROVISIONING",
        interruptible: bid.is_some(),
        bid,
        gpu_id: gpu_id.to_owned(),
        gpu_count: count,
        ports,
        reads: 0,
        runtime: false,
        price_per_gpu: bid.unwrap_or(0.44),
    };
    s.pods.insert(pod.id.clone(), pod.clone());
    s.creates += 1;
    pod
}

fn advance(pod: &mut Pod, knobs: &Knobs) {
    pod.reads += 1;
    match pod.status {
        "PROVISIONING" | "STARTING" if pod.reads >= knobs.boot_reads => {
            pod.status = "RUNNING";
            pod.reads = 0;
        }
        "RUNNING" if !pod.runtime && pod.reads >= knobs.runtime_reads => pod.runtime = true,
        _ => {}
    }
}

fn pod_json(p: &Pod) -> Value {
    let running = p.status == "RUNNING";
    let mut runtime_ports = Vec::new();
    let mut mappings = serde_json::Map::new();
    for (n, spec) in p.ports.iter().enumerate() {
        let (port, kind) = spec.split_once('/').unwrap_or((spec, "tcp"));
        let private: u16 = port.parse().unwrap_or(0);
        let public = 43000 + n as u16;
        if kind == "tcp" {
            runtime_ports.push(
                json!({"private": private, "public": public, "type": "tcp", "ip": "45.23.12.1"}),
            );
            mappings.insert(port.to_owned(), json!(public));
        } else {
            runtime_ports
                .push(json!({"private": private, "public": null, "type": "http", "ip": null}));
        }
    }
    let up = running && p.runtime;
    json!({
        "id": p.id,
        "name": p.name,
        "status": p.status,
        "interruptible": p.interruptible,
        "image": "ghcr.io/org/worker:1.2",
        "gpu": {"id": p.gpu_id, "count": p.gpu_count},
        "cost": if running { p.price_per_gpu * f64::from(p.gpu_count) } else { 0.0 },
        "ports": p.ports,
        "runtime": if up { json!({"uptimeInSeconds": 5, "ports": runtime_ports}) } else { Value::Null },
        "publicIp": if up { json!("45.23.12.1") } else { Value::Null },
        "portMappings": if up { Value::Object(mappings) } else { json!({}) },
    })
}

async fn create(State(state): Shared, body: String) -> Response {
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let (pod, delay) = {
        let mut s = state.lock().expect("state lock");
        if s.knobs.no_capacity {
            return problem(StatusCode::BAD_REQUEST, NO_INSTANCES);
        }
        let (Some(name), Some(_image), Some(gpu), Some(count)) = (
            body["name"].as_str(),
            body["image"].as_str(),
            body["gpu"]["id"].as_str(),
            body["gpu"]["count"].as_u64(),
        ) else {
            return problem(StatusCode::BAD_REQUEST, "name, image and gpu are required");
        };
        let ports = body["ports"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let pod = new_pod(&mut s, name, gpu, count as u32, ports, None);
        s.last_create = Some(body);
        (pod, s.knobs.create_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    (StatusCode::CREATED, axum::Json(pod_json(&pod))).into_response()
}

async fn list(State(state): Shared) -> Response {
    let mut s = state.lock().expect("state lock");
    let RunpodState { knobs, pods, .. } = &mut *s;
    let pods: Vec<Value> = pods
        .values_mut()
        .map(|p| {
            advance(p, knobs);
            pod_json(p)
        })
        .collect();
    axum::Json(json!({ "pods": pods })).into_response()
}

async fn show(State(state): Shared, Path(id): Path<String>) -> Response {
    let mut s = state.lock().expect("state lock");
    let RunpodState { knobs, pods, .. } = &mut *s;
    match pods.get_mut(&id) {
        Some(p) => {
            advance(p, knobs);
            axum::Json(pod_json(p)).into_response()
        }
        None => problem(StatusCode::NOT_FOUND, "pod not found"),
    }
}

/// Starts pod `id` as the resume knob says; `Err` carries the refusal message.
fn start_pod(s: &mut RunpodState, id: &str) -> Result<Pod, (StatusCode, &'static str)> {
    let mode = s.knobs.resume;
    let Some(p) = s.pods.get_mut(id) else {
        return Err((StatusCode::NOT_FOUND, "pod not found"));
    };
    match mode {
        ResumeMode::NotEnoughGpus => return Err((StatusCode::CONFLICT, NOT_ENOUGH_GPUS)),
        ResumeMode::ZeroGpus => p.gpu_count = 0,
        ResumeMode::Ok => {}
    }
    p.status = "STARTING";
    p.reads = 0;
    p.runtime = false;
    Ok(p.clone())
}

async fn action(State(state): Shared, Path(id): Path<String>, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut s = state.lock().expect("state lock");
    if !s.pods.contains_key(&id) {
        return problem(StatusCode::NOT_FOUND, "pod not found");
    }
    match body["action"].as_str() {
        Some("stop") => {
            let p = s.pods.get_mut(&id).expect("listed instance");
            p.status = "EXITED";
            p.runtime = false;
            axum::Json(pod_json(p)).into_response()
        }
        Some("start") => match start_pod(&mut s, &id) {
            Ok(p) => axum::Json(pod_json(&p)).into_response(),
            Err((status, message)) => problem(status, message),
        },
        Some("terminate") => {
            s.pods.get_mut(&id).expect("listed instance").status = "TERMINATED";
            StatusCode::NO_CONTENT.into_response()
        }
        _ => problem(StatusCode::BAD_REQUEST, "unknown action"),
    }
}

async fn delete(State(state): Shared, Path(id): Path<String>) -> Response {
    let mut s = state.lock().expect("state lock");
    match s.pods.remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => problem(StatusCode::NOT_FOUND, "pod not found"),
    }
}

fn gql_error(message: &str) -> Response {
    axum::Json(json!({"errors": [{"message": message}], "data": null})).into_response()
}

async fn graphql(State(state): Shared, body: String) -> Response {
    let Some(query) = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|b| b["query"].as_str().map(str::to_owned))
    else {
        return (StatusCode::BAD_REQUEST, "Must provide query string.").into_response();
    };
    let operation = ["podRentInterruptable", "podBidResume", "gpuTypes"]
        .into_iter()
        .find(|op| query.contains(&format!("{op}(")));
    let mut s = state.lock().expect("state lock");
    s.graphql_ops
        .push(operation.unwrap_or("unknown").to_owned());
    match operation {
        Some("gpuTypes") => {
            let Some(input) = graphql_input(&query, "gpuTypes") else {
                return gql_error("Syntax Error: gpuTypes input");
            };
            let types: Vec<Value> = gpu_types()
                .into_iter()
                .filter(|t| input["id"].is_null() || t["id"] == input["id"])
                .collect();
            axum::Json(json!({"data": {"gpuTypes": types}})).into_response()
        }
        Some("podRentInterruptable") => {
            let Some(input) = graphql_input(&query, "podRentInterruptable") else {
                return gql_error("Syntax Error: podRentInterruptable input");
            };
            if s.knobs.no_capacity {
                return gql_error(NO_INSTANCES);
            }
            let (Some(name), Some(gpu), Some(bid)) = (
                input["name"].as_str(),
                input["gpuTypeId"].as_str(),
                input["bidPerGpu"].as_f64(),
            ) else {
                return gql_error(
                    "Variable \"$input\" got invalid value: name, gpuTypeId and bidPerGpu are required",
                );
            };
            if !matches!(
                input["cloudType"].as_str(),
                Some("SECURE" | "COMMUNITY" | "ALL")
            ) {
                return gql_error("Expected type CloudTypeEnum");
            }
            let ports = input["ports"]
                .as_str()
                .map(|p| {
                    p.split(',')
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let count = input["gpuCount"].as_u64().unwrap_or(1) as u32;
            let pod = new_pod(&mut s, name, gpu, count, ports, Some(bid));
            s.last_create = Some(input);
            axum::Json(json!({"data": {"podRentInterruptable": {"id": pod.id, "desiredStatus": "RUNNING"}}}))
                .into_response()
        }
        Some("podBidResume") => {
            let Some(input) = graphql_input(&query, "podBidResume") else {
                return gql_error("Syntax Error: podBidResume input");
            };
            let id = input["podId"].as_str().unwrap_or_default().to_owned();
            if input["bidPerGpu"].as_f64().is_none() {
                return gql_error("bidPerGpu is required");
            }
            match start_pod(&mut s, &id) {
                Ok(p) => axum::Json(
                    json!({"data": {"podBidResume": {"id": p.id, "desiredStatus": "RUNNING"}}}),
                )
                .into_response(),
                Err((_, message)) => gql_error(message),
            }
        }
        _ => gql_error("Cannot query field on type \"Query\"."),
    }
}

fn gpu_types() -> Vec<Value> {
    vec![
        json!({
            "id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24, "maxGpuCount": 8,
            "securePrice": 0.69, "communityPrice": 0.44, "secureSpotPrice": 0.35, "communitySpotPrice": 0.25,
            "lowestPrice": {"minimumBidPrice": 0.25, "uninterruptablePrice": 0.44, "stockStatus": "High"}
        }),
        json!({
            "id": "NVIDIA A40", "displayName": "A40", "memoryInGb": 48, "maxGpuCount": 4,
            "securePrice": 0.40, "communityPrice": 0.35, "secureSpotPrice": 0.2, "communitySpotPrice": 0.18,
            "lowestPrice": {"minimumBidPrice": null, "uninterruptablePrice": null, "stockStatus": "None"}
        }),
    ]
}
