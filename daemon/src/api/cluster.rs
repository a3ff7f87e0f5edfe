//! Operator routes about the cluster: `GET /v1/cluster` and `POST /v1/admin/drain`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState, bearer};
use crate::cluster::{Cluster, StatusCell, standalone_view};

/// Where the node's view of the cluster comes from.
#[derive(Clone, Debug)]
pub enum Membership {
    /// Not clustered: the view is this node alone.
    Standalone {
        status: Arc<StatusCell>,
        generation: u64,
    },
    /// A member of a gossip cluster.
    Member(Arc<Cluster>),
}

impl Membership {
    /// Why the node does not count as joined yet, if it does not.
    pub fn not_joined(&self) -> Option<&'static str> {
        match self {
            Membership::Standalone { .. } => None,
            Membership::Member(cluster) => {
                (!*cluster.joined().borrow()).then_some("the node has not joined the cluster yet")
            }
        }
    }
}

/// Checks the operator token (compared as digests, so the comparison time says nothing
/// about the token).
pub(crate) fn authenticate_operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.operator_token else {
        return Err(ApiError::unauthorized(
            "operator routes are closed: this node has no operator token (api.operator_token_file)",
        ));
    };
    let given = bearer(headers)?;
    if Sha256::digest(given.as_bytes()) == Sha256::digest(expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong operator token"))
    }
}

/// `GET /v1/cluster`: every member this node knows, with role, state, GPU metrics, queue per
/// tier, API address and version. Operator token required.
#[utoipa::path(get, path = "/v1/cluster", tag = "operator",
    security(("operator_token" = [])),
    responses((status = 200, description = "the cluster view", body = crate::protocol::cluster::ClusterView),
              (status = 401, description = "missing or wrong operator token", body = crate::protocol::ErrorBody)))]
pub(crate) async fn view(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = authenticate_operator(&state, &headers) {
        return error.into_response();
    }
    let view = match &state.membership {
        Membership::Member(cluster) => cluster.view(),
        Membership::Standalone { status, generation } => match status.get() {
            Some(status) => standalone_view(&status, *generation),
            None => {
                return ApiError::new(
                    crate::protocol::ErrorCode::Unavailable,
                    "the node has not published its status yet",
                )
                .retry_after(1)
                .into_response();
            }
        },
    };
    axum::Json(view).into_response()
}

/// `POST /v1/admin/drain`: the node stops taking work, finishes (or hands back) the job it
/// runs, hands its queue to the members that own it next, then leaves the cluster and exits.
/// Operator token required.
#[utoipa::path(post, path = "/v1/admin/drain", tag = "operator",
    security(("operator_token" = [])),
    responses((status = 202, description = "draining: the node hands its queue on, then leaves"),
              (status = 401, description = "missing or wrong operator token", body = crate::protocol::ErrorBody)))]
pub(crate) async fn drain(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = authenticate_operator(&state, &headers) {
        return error.into_response();
    }
    let already = state.drain.is_cancelled();
    state.drain.cancel();
    tracing::info!(already, "drain requested through the API");
    (
        axum::http::StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({
            "status": "draining",
            "node": state.jobs.name(),
        })),
    )
        .into_response()
}
