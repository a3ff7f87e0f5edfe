//! The HTTP API of a node (axum): jobs, their events and outputs, health, readiness, metrics and
//! the OpenAPI document. The contract is API.md; the bodies are in [`crate::protocol`].
//!
//! Handlers only check, translate and delegate: every check of a submission (auth, size, JSON,
//! shape, workflow, quota, admission) runs before the store is touched, so nothing refused is
//! ever stored. Handlers never talk to ComfyUI directly; running jobs are the runner's business.

mod cluster;
mod error;
mod jobs;
mod openapi;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

pub use cluster::Membership;
pub use error::ApiError;

use crate::comfy::types::ObjectInfo;
use crate::config::Config;
use crate::metrics::{HttpLabels, Metrics};
use crate::node::{Live, Readiness};
use crate::protocol::ErrorCode;
use crate::queue::JobStore;
use crate::tiers::{Account, KeyRing};

/// Everything a handler may use. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: JobStore,
    pub keys: KeyRing,
    /// The operator token for operator routes (`/v1/cluster`, `/v1/admin/drain` with the
    /// cluster); `None` closes them.
    pub operator_token: Option<Arc<str>>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// The node classes of this node's ComfyUI, once known.
    pub object_info: watch::Receiver<Option<Arc<ObjectInfo>>>,
    pub readiness: watch::Receiver<Readiness>,
    pub live: Arc<Live>,
    /// The cluster this node belongs to, or itself alone.
    pub membership: Membership,
    /// Jobs across the cluster: where new ones go, and answers about any job.
    pub jobs: crate::jobs::Jobs,
    /// Cancelled by `POST /v1/admin/drain`: the node drains and leaves, as on SIGTERM.
    pub drain: tokio_util::sync::CancellationToken,
}

/// The router of a node's API. Tests call it without a server.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", get(jobs::list).post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get_job).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route(
            "/v1/jobs/{id}/outputs",
            axum::routing::delete(jobs::delete_outputs),
        )
        .route("/v1/jobs/{id}/outputs/{index}", get(jobs::output))
        .route("/v1/cluster", get(cluster::view))
        .route("/v1/admin/drain", axum::routing::post(cluster::drain))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/admin/usage", get(usage::admin_usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(fallback)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .with_state(state)
}

/// Counts every request by method, matched route and status.
async fn record_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn fallback() -> ApiError {
    ApiError::not_found("no such route")
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub(crate) async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: ComfyUI is ready and the node takes work.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"),
              (status = 503, description = "unavailable, with the reason", body = crate::protocol::ErrorBody)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let mut readiness = state.readiness.borrow().clone();
    if readiness == Readiness::Ready
        && let Some(reason) = state.membership.not_joined()
    {
        readiness = Readiness::NotReady(reason.to_string());
    }
    match readiness {
        Readiness::Ready => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        Readiness::NotReady(reason) => ApiError::new(ErrorCode::Unavailable, reason)
            .retry_after(5)
            .into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "metrics")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    state
        .live
        .refresh_queue_metrics(&state.store, &state.metrics);
    if let Membership::Member(cluster) = &state.membership {
        cluster.record_metrics(&state.metrics.gossip);
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The account behind the request's `Authorization: Bearer` key.
pub(crate) fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Account, ApiError> {
    let token = bearer(headers)?;
    state
        .keys
        .authenticate(token)
        .ok_or_else(|| ApiError::unauthorized("unknown API key"))
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key>"))?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            ApiError::unauthorized("the Authorization header must be \"Bearer <api key>\"")
        })?
        .trim();
    if token.is_empty() {
        return Err(ApiError::unauthorized("empty API key"));
    }
    Ok(token)
}

/// How long `DELETE` of a running job waits for the interrupt to land before answering.
pub(crate) fn cancel_wait(config: &Config) -> Duration {
    config.jobs.interrupt_grace() + Duration::from_secs(5)
}
