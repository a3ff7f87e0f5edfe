//! The job routes: submit, list, get, cancel, events (SSE) and outputs.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;

use super::{ApiError, AppState, authenticate};
use crate::comfy::workflow::{WorkflowError, validate};
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, JobList, JobStatus, JobView, StatusEvent, SubmitRequest, sse};
use crate::queue::{Job, JobRole, JsonText, NewJob, Quota};
use crate::tiers::Account;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// `POST /v1/jobs`.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body = SubmitRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "same key + same account + same body → the same job")),
    responses(
        (status = 202, description = "the job was stored durably and queued", body = JobView),
        (status = 400, description = "invalid_json, invalid_request or invalid_workflow", body = crate::protocol::ErrorBody),
        (status = 401, description = "unauthorized", body = crate::protocol::ErrorBody),
        (status = 409, description = "conflict: the idempotency key was used with another body, or (with Retry-After) a submission with it is still being stored on another member", body = crate::protocol::ErrorBody),
        (status = 413, description = "payload_too_large", body = crate::protocol::ErrorBody),
        (status = 422, description = "unknown_node_class", body = crate::protocol::ErrorBody),
        (status = 429, description = "quota_exceeded (Retry-After set)", body = crate::protocol::ErrorBody),
        (status = 503, description = "busy (Retry-After set) or unavailable", body = crate::protocol::ErrorBody),
    ),
    security(("api_key" = [])))]
pub(super) async fn submit(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let limit = state.config.api.max_body_bytes;
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is over the limit of {limit} bytes"),
        )
        .details(json!({"limit_bytes": limit}))
    };
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && length > limit as u64
    {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;

    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("the request body is not JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "the request body must be a JSON object: {\"workflow\": {…}, \"webhook\"?, \"metadata\"?}",
        ));
    }
    let request: SubmitRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the request body is not a job submission: {e}"),
        )
    })?;

    let info = state.object_info.borrow().clone().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unavailable,
            "this node's ComfyUI has not reported its node classes yet; try again shortly",
        )
        .retry_after(5)
    })?;
    validate(&request.workflow, &info).map_err(workflow_error)?;
    if let Some(webhook) = &request.webhook {
        check_webhook(webhook, &state.config.webhooks).await?;
    }
    if let Some(metadata) = &request.metadata
        && !metadata.is_object()
    {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "metadata must be a JSON object",
        ));
    }
    let idempotency_key = idempotency_key(&headers)?;

    let policy = state.config.tiers.get(account.tier).clone();
    if let Some(max_wait) = policy.admission_max_wait_s {
        let wait = state
            .live
            .estimate_wait(&state.store, account.tier, &account.id);
        if wait > max_wait as f64 {
            state
                .metrics
                .jobs_refused
                .get_or_create(&Metrics::tier(account.tier))
                .inc();
            let retry = (wait - max_wait as f64).ceil().max(1.0) as u64;
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "the {} tier's estimated wait is {wait:.0} s, over its limit of {max_wait} s; try again later",
                    account.tier
                ),
            )
            .details(json!({"estimated_wait_s": wait, "limit_s": max_wait}))
            .retry_after(retry));
        }
    }

    let body_hash = hex::encode(Sha256::digest(
        serde_json::to_vec(&request).map_err(ApiError::internal)?,
    ));
    let new = NewJob {
        // Time-ordered (UUID v7: milliseconds, then 74 random bits): jobs stored close
        // together get neighbouring entries in every index keyed by job id, so a commit of
        // many of them writes a few shared index pages rather than one page per job.
        id: uuid::Uuid::now_v7().to_string(),
        account: account.id.clone(),
        tier: account.tier,
        workflow: JsonText::from(&request.workflow),
        webhook: request.webhook,
        metadata: request.metadata,
        idempotency_key,
        body_hash,
        max_attempts: state.config.jobs.max_attempts,
        replica: None,
    };
    let quota = Quota {
        per_day: policy.daily_quota,
        per_month: None,
        fair_use_images: policy.monthly_fair_use,
    };
    let (view, created) = state.jobs.submit(new, quota).await?;
    let location = format!("/v1/jobs/{}", view.id);
    let mut response = (StatusCode::ACCEPTED, axum::Json(view)).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if !created {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn workflow_error(error: WorkflowError) -> ApiError {
    let message = error.to_string();
    match error {
        WorkflowError::UnknownClass {
            node_id,
            class_type,
        } => ApiError::new(
            ErrorCode::UnknownNodeClass,
            format!(
                "node {node_id:?} uses class_type {class_type:?}, which this ComfyUI does not have"
            ),
        )
        .details(json!({"node_id": node_id, "class_type": class_type})),
        WorkflowError::MissingInput {
            node_id,
            class_type,
            input,
        } => ApiError::new(ErrorCode::InvalidWorkflow, message)
            .details(json!({"node_id": node_id, "class_type": class_type, "input": input})),
        WorkflowError::LinkToMissingNode {
            node_id,
            input,
            target,
        } => ApiError::new(ErrorCode::InvalidWorkflow, message)
            .details(json!({"node_id": node_id, "input": input, "target": target})),
        WorkflowError::BadNode { node_id, .. }
        | WorkflowError::MalformedLink { node_id, .. }
        | WorkflowError::BadLinkIndex { node_id, .. }
        | WorkflowError::Cycle { node_id } => {
            ApiError::new(ErrorCode::InvalidWorkflow, message).details(json!({"node_id": node_id}))
        }
        WorkflowError::NotAnObject { .. }
        | WorkflowError::NotApiFormat { .. }
        | WorkflowError::Empty
        | WorkflowError::NoOutputNode => ApiError::new(ErrorCode::InvalidWorkflow, message),
    }
}

/// Refuses a webhook this node would not send: webhooks off (no `[webhooks]` secret), not an
/// http(s) URL, or (unless `allow_private`) a host that is or resolves to a private, loopback,
/// link-local, CGNAT, unspecified or multicast address.
async fn check_webhook(
    webhook: &str,
    settings: &crate::config::WebhooksSection,
) -> Result<(), ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("webhook {webhook:?} is not usable: {why}"),
        )
    };
    if !settings.enabled() {
        return Err(bad(
            "webhooks are off on this node (no [webhooks] secret configured)",
        ));
    }
    crate::webhooks::target::check(webhook, settings.allow_private)
        .await
        .map_err(|why| bad(&why))?;
    Ok(())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ),
        )
    };
    let key = value.to_str().map_err(|_| bad())?.trim();
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(bad());
    }
    Ok(Some(key.to_string()))
}

/// The job as this node's store and live state show it.
pub(crate) async fn view_of(state: &AppState, job: &Job) -> Result<JobView, ApiError> {
    state.jobs.view(job).await.map_err(ApiError::internal)
}

/// Loads a job this node owns that belongs to `account`; anything else is "not found".
async fn owned_job(state: &AppState, account: &Account, id: &str) -> Result<Job, ApiError> {
    match state.store.get(id).await.map_err(ApiError::internal)? {
        Some(job) if job.account == account.id && job.role == JobRole::Owner => Ok(job),
        _ => Err(ApiError::not_found(format!(
            "no job {id:?} for this account"
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OutputQuery {
    redirect: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/jobs`.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(("status" = Option<JobStatus>, Query, description = "only jobs in this status"),
           ("limit" = Option<u32>, Query, description = "at most this many (1-500, default 20)")),
    responses((status = 200, description = "the account's recent jobs, newest first", body = JobList),
               (status = 400, description = "invalid_request", body = crate::protocol::ErrorBody),
               (status = 401, description = "unauthorized", body = crate::protocol::ErrorBody)),
    security(("api_key" = [])))]
pub(super) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<JobList>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("bad query: {} (allowed: status, limit)", e.body_text()),
        )
    })?;
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<JobStatus>()
                .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.to_string()))?,
        ),
    };
    let limit = match query.limit.as_deref() {
        None => 20,
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("limit must be a number from 1 to 500, not {s:?}"),
                ));
            }
        },
    };
    let views = state.jobs.list(&account.id, status, limit).await?;
    Ok(axum::Json(JobList { jobs: views }))
}

/// `GET /v1/jobs/{id}`.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "the job", body = JobView),
               (status = 404, description = "not_found", body = crate::protocol::ErrorBody)),
    security(("api_key" = [])))]
pub(super) async fn get_job(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let account = authenticate(&state, &headers)?;
    Ok(axum::Json(state.jobs.get(&account.id, &id).await?))
}

/// `DELETE /v1/jobs/{id}`: a queued job is cancelled at once; a running one is interrupted in
/// ComfyUI and the answer waits (boundedly) for the interrupt to land.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "the job after cancelling", body = JobView),
               (status = 404, description = "not_found", body = crate::protocol::ErrorBody),
               (status = 409, description = "conflict: the job already finished", body = crate::protocol::ErrorBody)),
    security(("api_key" = [])))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let account = authenticate(&state, &headers)?;
    Ok(axum::Json(state.jobs.cancel(&account.id, &id).await?))
}

/// `GET /v1/jobs/{id}/events`: `status` (with position while queued), `progress`, then `done`
/// with the final job, after which the stream ends.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "text/event-stream: status, progress, done", content_type = "text/event-stream"),
               (status = 404, description = "not_found", body = crate::protocol::ErrorBody)),
    security(("api_key" = [])))]
pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    // Subscribe before reading the job so that no change falls between the two.
    let mut changes = state.store.subscribe();
    let mut progress = state.live.subscribe();
    let job = match owned_job(&state, &account, &id).await {
        Ok(job) => job,
        // Another member owns it: relay what the owner shows.
        Err(_) => return relay_events(state, account, id).await,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut last_status: Option<StatusEvent> = None;
        let mut job = job;
        loop {
            let view = match view_of(&state, &job).await {
                Ok(view) => view,
                Err(_) => return,
            };
            if send_view(&tx, &view, &mut last_status).await != Sent::More {
                return;
            }
            // Wait for something that may change what this stream shows.
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = state.live.shutdown.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(change) if change.id == job.id || job.status == JobStatus::Queued => break,
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    },
                    event = progress.recv() => match event {
                        Ok(event) if event.job_id == job.id => {
                            // Progress means it runs, even if the status change has not been
                            // seen yet: say so first, so the stream never shows progress of a
                            // queued job.
                            let running = StatusEvent {
                                status: JobStatus::Running,
                                position: None,
                                estimated_wait_s: None,
                            };
                            if last_status.as_ref() != Some(&running) {
                                if tx.send(Ok(json_event(sse::STATUS, &running))).await.is_err() {
                                    return;
                                }
                                last_status = Some(running);
                            }
                            if tx.send(Ok(json_event(sse::PROGRESS, &event.progress))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return,
                    },
                }
            }
            job = match state.store.get(&job.id).await {
                Ok(Some(job)) => job,
                _ => return,
            };
        }
    });
    let stream = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// What an event stream did with a job's view.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    /// The job is final: `done` went out and the stream ends.
    Done,
    /// The client went away.
    Closed,
    /// A `status` went out if it changed; the stream goes on.
    More,
}

/// Sends `done` for a final job, else `status` when it differs from the last one sent.
async fn send_view(
    tx: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    view: &JobView,
    last_status: &mut Option<StatusEvent>,
) -> Sent {
    if view.status.is_final() {
        let _ = tx.send(Ok(json_event(sse::DONE, view))).await;
        return Sent::Done;
    }
    let status = StatusEvent {
        status: view.status,
        position: view.position,
        estimated_wait_s: view.estimated_wait_s.map(|w| w.round()),
    };
    if last_status.as_ref() != Some(&status) {
        if tx.send(Ok(json_event(sse::STATUS, &status))).await.is_err() {
            return Sent::Closed;
        }
        *last_status = Some(status);
    }
    Sent::More
}

/// How often a relayed event stream asks the owner for the job.
const RELAY_EVERY: Duration = Duration::from_millis(250);

/// The event stream of a job another member owns: the owner's view, polled, as the same
/// `status`, `progress` and `done` events the owner would send.
async fn relay_events(state: AppState, account: Account, id: String) -> Result<Response, ApiError> {
    let first = state.jobs.get(&account.id, &id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut view = first;
        let mut last_status: Option<StatusEvent> = None;
        let mut last_progress = None;
        loop {
            if send_view(&tx, &view, &mut last_status).await != Sent::More {
                return;
            }
            if view.status == JobStatus::Running
                && view.progress.is_some()
                && view.progress != last_progress
            {
                if let Some(progress) = &view.progress
                    && tx
                        .send(Ok(json_event(sse::PROGRESS, progress)))
                        .await
                        .is_err()
                {
                    return;
                }
                last_progress = view.progress.clone();
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = state.live.shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELAY_EVERY) => {}
            }
            match state.jobs.get(&account.id, &id).await {
                Ok(next) => view = next,
                Err(error) => {
                    tracing::debug!(job = %id, %error, "relaying events: the owner did not answer");
                }
            }
        }
    });
    let stream = ReceiverStream::new(rx);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn json_event<T: serde::Serialize>(name: &str, data: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| Event::default().event(name).data("{}"))
}

/// `GET /v1/jobs/{id}/outputs/{index}`.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{index}", tag = "jobs",
    params(("id" = String, Path, description = "job id"), ("index" = u32, Path, description = "output index"),
           ("redirect" = Option<bool>, Query, description = "with outputs in a bucket: false streams the bytes instead of redirecting (default true)")),
    responses((status = 200, description = "the file, with its content type"),
               (status = 302, description = "outputs kept in a bucket: `Location` is a presigned GET URL, valid for `[storage] presign_ttl`"),
               (status = 404, description = "not_found", body = crate::protocol::ErrorBody),
               (status = 410, description = "gone: the output was deleted (retention or the account's request)", body = crate::protocol::ErrorBody)),
    security(("api_key" = [])))]
pub(super) async fn output(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, index)): Path<(String, String)>,
    query: Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "bad query: {} (allowed: redirect=true|false)",
                e.body_text()
            ),
        )
    })?;
    let index: u32 = index
        .parse()
        .map_err(|_| ApiError::not_found(format!("no output {index:?} for job {id}")))?;
    let mut output = state.jobs.output(&account.id, &id, index).await?;
    if let Some(key) = output.object_key.take() {
        let objects = state.store.objects().ok_or_else(|| {
            ApiError::internal(format!(
                "output {index} of job {id} is an object in a bucket, but this node's [storage] names none"
            ))
        })?;
        if query.redirect.unwrap_or(true) {
            let url = objects
                .presigned_get(&key)
                .await
                .map_err(ApiError::internal)?;
            let mut response = Response::new(Body::empty());
            *response.status_mut() = axum::http::StatusCode::FOUND;
            let location = HeaderValue::from_str(&url).map_err(ApiError::internal)?;
            response.headers_mut().insert(header::LOCATION, location);
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Ok(response);
        }
        output.bytes = objects.get(&key).await.map_err(ApiError::internal)?;
    }
    let disposition = format!(
        "inline; filename=\"{}\"",
        output.filename.replace(['"', '\\', '\r', '\n'], "_")
    );
    let mut response = Response::new(Body::from(output.bytes));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&output.content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Some(sha256) = &output.sha256
        && let Ok(value) = HeaderValue::from_str(&format!("\"{sha256}\""))
    {
        headers.insert(header::ETAG, value);
    }
    Ok(response)
}

/// `DELETE /v1/jobs/{id}/outputs`: deletes a finished job's output files on every node that
/// holds them; the job itself stays, with `outputs_deleted` set. Deleting again is fine.
#[utoipa::path(delete, path = "/v1/jobs/{id}/outputs", tag = "jobs",
    params(("id" = String, Path, description = "job id")),
    responses((status = 204, description = "the outputs are deleted"),
               (status = 404, description = "not_found", body = crate::protocol::ErrorBody),
               (status = 409, description = "conflict: the job is not finished", body = crate::protocol::ErrorBody)),
    security(("api_key" = [])))]
pub(super) async fn delete_outputs(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let account = authenticate(&state, &headers)?;
    state.jobs.delete_outputs(&account.id, &id).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn webhook_checks() {
        let mut on = crate::config::WebhooksSection {
            secret: Some("0123456789abcdef0123".to_string()),
            ..Default::default()
        };
        on.allow_private = true;
        assert!(check_webhook("http://127.0.0.1:9/hook", &on).await.is_ok());
        on.allow_private = false;
        assert!(check_webhook("http://127.0.0.1:9/hook", &on).await.is_err());
        assert!(check_webhook("https://8.8.8.8/hook", &on).await.is_ok());
        assert!(check_webhook("ftp://example.com/hook", &on).await.is_err());
        assert!(check_webhook("not a url", &on).await.is_err());
        let off = crate::config::WebhooksSection::default();
        let err = check_webhook("https://8.8.8.8/hook", &off)
            .await
            .expect_err("webhooks off");
        assert!(err.to_string().contains("off"), "{err}");
    }

    #[test]
    fn idempotency_key_checks() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).ok(), Some(None));
        headers.insert("idempotency-key", HeaderValue::from_static("abc-123"));
        assert_eq!(
            idempotency_key(&headers).ok(),
            Some(Some("abc-123".to_string()))
        );
        headers.insert("idempotency-key", HeaderValue::from_static(""));
        assert!(idempotency_key(&headers).is_err());
    }
}
