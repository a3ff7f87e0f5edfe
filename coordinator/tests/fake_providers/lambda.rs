//! A fake Lambda Cloud API under `/api/v1`: instance types with regions that have capacity,
//! launch (at most one per `launch_interval`, else 429; 400 insufficient capacity when the region
//! has none), terminate, and instances; every answer wrapped in `{"data": …}`, errors as
//! `{"error": {code, message}}`. Instances go `booting → active → terminating → terminated`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use url::Url;

use super::{Served, authorized, serve};

#[derive(Debug)]
pub struct Knobs {
    /// Regions with capacity for every instance type.
    pub capacity: Vec<String>,
    /// Launch allows one request per this interval.
    pub launch_interval: Duration,
    /// Reads an instance spends booting / terminating.
    pub reads_per_state: u32,
    /// How long a launch waits after creating the instance before it answers.
    pub launch_delay: Duration,
    /// Regions that really have capacity when a launch arrives (`None`: those in `capacity`);
    /// capacity can go between the listing and the launch.
    pub launch_capacity: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub status: &'static str,
    pub region: String,
    pub instance_type: String,
    pub reads: u32,
    pub tags: Value,
    pub user_data: Option<String>,
}

#[derive(Debug)]
pub struct LambdaState {
    pub knobs: Knobs,
    pub instances: BTreeMap<String, Instance>,
    next: u64,
    last_launch: Option<Instant>,
    pub launches: u32,
    pub rate_limited: u32,
    pub last_launch_body: Option<Value>,
}

pub struct LambdaFake {
    pub url: Url,
    pub state: Arc<Mutex<LambdaState>>,
    _served: Served,
}

impl LambdaFake {
    pub async fn start() -> LambdaFake {
        let state = Arc::new(Mutex::new(LambdaState {
            knobs: Knobs {
                capacity: vec!["us-east-1".into(), "us-west-1".into()],
                launch_interval: Duration::from_millis(200),
                reads_per_state: 1,
                launch_delay: Duration::ZERO,
                launch_capacity: None,
            },
            instances: BTreeMap::new(),
            next: 0x0920_582c_7ff0_4139,
            last_launch: None,
            launches: 0,
            rate_limited: 0,
            last_launch_body: None,
        }));
        let router = Router::new()
            .route("/api/v1/instance-types", get(instance_types))
            .route("/api/v1/instance-operations/launch", post(launch))
            .route("/api/v1/instance-operations/terminate", post(terminate))
            .route("/api/v1/instances", get(list))
            .route("/api/v1/instances/{id}", get(show))
            .layer(middleware::from_fn(gate))
            .with_state(state.clone());
        let served = serve(router).await;
        LambdaFake {
            url: Url::parse(&format!("http://{}/api/v1", served.addr)).expect("parse"),
            state,
            _served: served,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut LambdaState) -> T) -> T {
        f(&mut self.state.lock().expect("state lock"))
    }

    /// Instances not terminated.
    pub fn live(&self) -> usize {
        self.with(|s| {
            s.instances
                .values()
                .filter(|i| !matches!(i.status, "terminating" | "terminated"))
                .count()
        })
    }
}

type Shared = State<Arc<Mutex<LambdaState>>>;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message, "suggestion": null}})),
    )
        .into_response()
}

async fn gate(headers: HeaderMap, request: Request, next: Next) -> Response {
    if !authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "global/invalid-api-key",
            "API key was invalid, expired, or deleted.",
        );
    }
    next.run(request).await
}

/// The instance types the fake sells; the H100's price comes as a string, as in one spec
/// example.
fn type_spec(name: &str) -> Option<Value> {
    let (price, gpus, desc) = match name {
        "gpu_1x_a10" => (json!(75), 1, "A10 (24 GB PCIe)"),
        "gpu_8x_h100_sxm5" => (json!("2392"), 8, "H100 (80 GB SXM5)"),
        _ => return None,
    };
    Some(json!({
        "name": name, "description": format!("{gpus}x {desc}"), "gpu_description": desc,
        "price_cents_per_hour": price,
        "specs": {"vcpus": 30, "memory_gib": 200, "storage_gib": 1400, "gpus": gpus}
    }))
}

async fn instance_types(State(state): Shared) -> Response {
    let s = state.lock().expect("state lock");
    let regions: Vec<Value> = s
        .knobs
        .capacity
        .iter()
        .map(|r| json!({"name": r, "description": r}))
        .collect();
    let data: serde_json::Map<String, Value> = ["gpu_1x_a10", "gpu_8x_h100_sxm5"]
        .into_iter()
        .map(|name| {
            (
                name.to_owned(),
                json!({"instance_type": type_spec(name), "regions_with_capacity_available": regions}),
            )
        })
        .collect();
    axum::Json(json!({ "data": data })).into_response()
}

async fn launch(State(state): Shared, body: String) -> Response {
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "global/invalid-parameters",
            "body is not JSON",
        );
    };
    let (id, delay) = {
        let mut s = state.lock().expect("state lock");
        let now = Instant::now();
        if s.last_launch
            .is_some_and(|at| now.duration_since(at) < s.knobs.launch_interval)
        {
            s.rate_limited += 1;
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "global/too-many-requests",
                "Too many requests to /instance-operations/launch",
            );
        }
        s.last_launch = Some(now);
        let region = body["region_name"].as_str().unwrap_or_default().to_owned();
        let instance_type = body["instance_type_name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = body["name"].as_str().unwrap_or_default().to_owned();
        let keys = body["ssh_key_names"].as_array().map_or(0, Vec::len);
        if type_spec(&instance_type).is_none()
            || keys != 1
            || name.chars().count() > 64
            || body["quantity"] != json!(1)
        {
            return error(
                StatusCode::BAD_REQUEST,
                "global/invalid-parameters",
                "Invalid launch parameters",
            );
        }
        let capacity = s
            .knobs
            .launch_capacity
            .as_ref()
            .unwrap_or(&s.knobs.capacity);
        if !capacity.contains(&region) {
            return error(
                StatusCode::BAD_REQUEST,
                "instance-operations/launch/insufficient-capacity",
                "Not enough capacity to fulfill launch request.",
            );
        }
        s.next += 1;
        let id = format!("{:032x}", s.next);
        s.instances.insert(
            id.clone(),
            Instance {
                id: id.clone(),
                name,
                status: "booting",
                region,
                instance_type,
                reads: 0,
                tags: body["tags"].clone(),
                user_data: body["user_data"].as_str().map(str::to_owned),
            },
        );
        s.launches += 1;
        s.last_launch_body = Some(body);
        (id, s.knobs.launch_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    axum::Json(json!({"data": {"instance_ids": [id]}})).into_response()
}

async fn terminate(State(state): Shared, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let Some(ids) = body["instance_ids"].as_array() else {
        return error(
            StatusCode::BAD_REQUEST,
            "global/invalid-parameters",
            "instance_ids is required",
        );
    };
    let mut s = state.lock().expect("state lock");
    let mut done = Vec::new();
    for id in ids.iter().filter_map(Value::as_str) {
        let Some(i) = s.instances.get_mut(id) else {
            return error(
                StatusCode::NOT_FOUND,
                "global/object-does-not-exist",
                "Specified instance does not exist.",
            );
        };
        if i.status != "terminated" {
            i.status = "terminating";
            i.reads = 0;
        }
        done.push(instance_json(i));
    }
    axum::Json(json!({"data": {"terminated_instances": done}})).into_response()
}

fn advance(i: &mut Instance, reads_per_state: u32) {
    i.reads += 1;
    if i.reads < reads_per_state {
        return;
    }
    let next = match i.status {
        "booting" => "active",
        "terminating" => "terminated",
        other => other,
    };
    if next != i.status {
        i.status = next;
        i.reads = 0;
    }
}

fn instance_json(i: &Instance) -> Value {
    let ip = matches!(i.status, "active" | "terminating").then_some("129.146.10.20");
    json!({
        "id": i.id, "name": i.name, "status": i.status, "ip": ip, "private_ip": "10.0.0.2",
        "hostname": "kiln", "ssh_key_names": ["kiln"], "file_system_names": [],
        "region": {"name": i.region, "description": i.region},
        "instance_type": type_spec(&i.instance_type),
        "is_reserved": false, "tags": i.tags,
    })
}

async fn list(State(state): Shared) -> Response {
    let mut s = state.lock().expect("state lock");
    let reads = s.knobs.reads_per_state;
    let all: Vec<Value> = s
        .instances
        .values_mut()
        .map(|i| {
            advance(i, reads);
            instance_json(i)
        })
        .collect();
    axum::Json(json!({ "data": all })).into_response()
}

async fn show(State(state): Shared, Path(id): Path<String>) -> Response {
    let mut s = state.lock().expect("state lock");
    let reads = s.knobs.reads_per_state;
    match s.instances.get_mut(&id) {
        Some(i) => {
            advance(i, reads);
            axum::Json(json!({ "data": instance_json(i) })).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "global/object-does-not-exist",
            "Specified instance does not exist.",
        ),
    }
}
