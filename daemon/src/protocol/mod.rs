//! The wire contract of Kiln: HTTP request and response bodies, error codes, tiers and job
//! states. Pure data and pure functions: no tokio, no I/O, nothing that needs a running node, so
//! the coordinator and any client can import it.
//!
//! What is written here is a contract that users depend on (see API.md): add fields freely, but
//! never rename or remove one.

pub mod cluster;
pub mod gossip;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// A service tier. The derived order is the scheduling priority: `Free < Premium < Pro <
/// Enterprise`, so the greatest tier is served first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Free,
    Premium,
    Pro,
    Enterprise,
}

impl Tier {
    /// Every tier, highest priority first.
    pub const BY_PRIORITY: [Tier; 4] = [Tier::Enterprise, Tier::Pro, Tier::Premium, Tier::Free];

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Premium => "premium",
            Tier::Pro => "pro",
            Tier::Enterprise => "enterprise",
        }
    }

    /// A small integer for storage and ordering; higher is served first.
    pub fn rank(self) -> u8 {
        match self {
            Tier::Free => 0,
            Tier::Premium => 1,
            Tier::Pro => 2,
            Tier::Enterprise => 3,
        }
    }

    pub fn from_rank(rank: u8) -> Option<Tier> {
        match rank {
            0 => Some(Tier::Free),
            1 => Some(Tier::Premium),
            2 => Some(Tier::Pro),
            3 => Some(Tier::Enterprise),
            _ => None,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a string that names no tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tier {0:?} (expected free, premium, pro or enterprise)")]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "free" => Ok(Tier::Free),
            "premium" => Ok(Tier::Premium),
            "pro" => Ok(Tier::Pro),
            "enterprise" => Ok(Tier::Enterprise),
            other => Err(UnknownTier(other.to_string())),
        }
    }
}

/// Where a job is in its life. `Succeeded`, `Failed` and `Cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a string that names no job status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status {0:?} (expected queued, running, succeeded, failed or cancelled)")]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// The machine-readable error codes of the HTTP API, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    InvalidJson,
    InvalidWorkflow,
    InvalidRequest,
    UnknownNodeClass,
    PayloadTooLarge,
    NotFound,
    Conflict,
    /// The thing existed but was deleted (an output removed by retention or by its owner).
    Gone,
    QuotaExceeded,
    Busy,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidWorkflow => "invalid_workflow",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownNodeClass => "unknown_node_class",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Gone => "gone",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Busy => "busy",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::InvalidJson | ErrorCode::InvalidWorkflow | ErrorCode::InvalidRequest => 400,
            ErrorCode::UnknownNodeClass => 422,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Gone => 410,
            ErrorCode::QuotaExceeded => 429,
            ErrorCode::Busy | ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every API error has this body: `{"error": {"code", "message", "details"?}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code,
                message: message.into(),
                details: None,
            },
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.error.details = Some(details);
        self
    }
}

/// `POST /v1/jobs` body. Unknown keys are refused (`invalid_request`) so that a misspelt
/// `webhok` is not silently ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// A ComfyUI API-format prompt: an object of node id → `{"class_type", "inputs"}`.
    #[schema(value_type = Object)]
    pub workflow: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// Progress of a running job, relayed from ComfyUI's `progress` events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// The node that reports progress.
    pub node: String,
    pub value: u64,
    pub max: u64,
}

/// One output file of a finished job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OutputView {
    pub index: u32,
    pub filename: String,
    pub content_type: String,
    pub bytes: u64,
    /// Where to download it: `/v1/jobs/{id}/outputs/{index}`.
    pub url: String,
    /// For tiers whose outputs carry a watermark: whether this file got it. Absent for
    /// other tiers, whose files are exactly what ComfyUI wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<WatermarkStatus>,
}

/// Whether an output of a watermarked tier carries the mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WatermarkStatus {
    Applied,
    /// The file could not be marked (not a PNG, JPEG or WebP image, an animation, or it does
    /// not decode) and is kept exactly as ComfyUI wrote it.
    Skipped {
        reason: String,
    },
}

impl WatermarkStatus {
    /// The text the job store keeps: `applied` or `skipped: <reason>`.
    pub fn to_text(&self) -> String {
        match self {
            WatermarkStatus::Applied => "applied".to_string(),
            WatermarkStatus::Skipped { reason } => format!("skipped: {reason}"),
        }
    }

    /// Reads [`WatermarkStatus::to_text`] back; other text is a skip with that text as reason.
    pub fn from_text(text: &str) -> WatermarkStatus {
        match text.strip_prefix("skipped: ") {
            Some(reason) => WatermarkStatus::Skipped {
                reason: reason.to_string(),
            },
            None if text == "applied" => WatermarkStatus::Applied,
            None => WatermarkStatus::Skipped {
                reason: text.to_string(),
            },
        }
    }
}

/// Why a job failed or was cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// A stable machine-readable reason, e.g. `execution_error`, `timeout`, `max_attempts`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub tier: Tier,
    /// 1-based place in this node's queue, while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Estimated seconds until the job starts, while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_wait_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    pub attempts: u32,
    pub max_attempts: u32,
    /// Copies of the job on other members besides its owner (0 when it is stored on one node
    /// only, e.g. in a cluster of one).
    #[serde(default)]
    pub replicas: u32,
    /// RFC 3339 timestamps.
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    pub outputs: Vec<OutputView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// Set when the job waits at a lower priority than its tier's (premium fair use passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<Throttled>,
    /// When the retention of the job's tier deletes its outputs (RFC 3339), while they exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_expire_at: Option<String>,
    /// Set once the job's output files are deleted; `outputs` still names them, and fetching
    /// one answers 410 `gone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_deleted: Option<OutputsDeleted>,
}

/// When and why a job's output files were deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutputsDeleted {
    /// RFC 3339.
    pub at: String,
    pub reason: DeleteReason,
}

/// Why a job's outputs were deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeleteReason {
    /// The tier's retention period passed.
    Retention,
    /// The job's account asked (`DELETE /v1/jobs/{id}/outputs`).
    User,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeleteReason::Retention => "retention",
            DeleteReason::User => "user",
        }
    }
}

impl FromStr for DeleteReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "retention" => Ok(DeleteReason::Retention),
            "user" => Ok(DeleteReason::User),
            other => Err(format!("unknown deletion reason {other:?}")),
        }
    }
}

impl fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job is served at a lower priority than its tier's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Throttled {
    /// E.g. "fair use: 5,012 of 5,000 images this month".
    pub reason: String,
    /// The tier whose priority the job gets.
    pub priority: Tier,
}

/// `GET /v1/usage` body: an account's usage per UTC day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageReport {
    pub account: String,
    pub tier: Tier,
    /// First and last day included (YYYY-MM-DD, UTC).
    pub from: String,
    pub to: String,
    /// Days with any usage, oldest first.
    pub days: Vec<UsageDay>,
}

/// One account's usage on one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageDay {
    /// YYYY-MM-DD (UTC).
    pub day: String,
    /// Set in the operator report, where every account's rows are listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The account's tier, as the key ring of the answering node knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    pub submitted: u64,
    pub succeeded: u64,
    pub images: u64,
    pub gpu_seconds: f64,
    pub refused: u64,
}

/// `GET /v1/admin/usage` body: every account's usage per UTC day in a month, merged over the
/// members' owner counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AdminUsageReport {
    /// YYYY-MM.
    pub month: String,
    /// Members whose counts are included, and those that did not answer.
    pub members: Vec<String>,
    #[serde(default)]
    pub missing: Vec<String>,
    /// One row per account and day, by day then account.
    pub rows: Vec<UsageDay>,
}

/// `GET /v1/jobs` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// The payload of the `status` server-sent event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatusEvent {
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_wait_s: Option<f64>,
}

/// The SSE event names of `GET /v1/jobs/{id}/events`.
pub mod sse {
    pub const STATUS: &str = "status";
    pub const PROGRESS: &str = "progress";
    pub const DONE: &str = "done";
}

/// Formats milliseconds since the Unix epoch as RFC 3339 with millisecond precision.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let ms = u64::try_from(unix_ms).unwrap_or(0);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_order_is_priority() {
        let mut tiers = vec![Tier::Pro, Tier::Free, Tier::Enterprise, Tier::Premium];
        tiers.sort();
        tiers.reverse();
        assert_eq!(tiers, Tier::BY_PRIORITY.to_vec());
        for tier in Tier::BY_PRIORITY {
            assert_eq!(Tier::from_rank(tier.rank()), Some(tier));
            assert_eq!(tier.as_str().parse::<Tier>(), Ok(tier));
        }
        assert!("gold".parse::<Tier>().is_err());
    }

    #[test]
    fn status_round_trips() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            let json = serde_json::to_string(&status).expect("serialize");
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
    }

    #[test]
    fn error_body_shape() {
        let body = ErrorBody::new(ErrorCode::UnknownNodeClass, "no such class")
            .with_details(serde_json::json!({"node_id": "7", "class_type": "Foo"}));
        let v = serde_json::to_value(&body).expect("serialize");
        assert_eq!(v["error"]["code"], "unknown_node_class");
        assert_eq!(v["error"]["details"]["class_type"], "Foo");
        assert_eq!(ErrorCode::UnknownNodeClass.http_status(), 422);
    }

    #[test]
    fn submit_refuses_unknown_keys() {
        let err = serde_json::from_str::<SubmitRequest>(r#"{"workflow": {}, "webhok": "x"}"#);
        assert!(err.is_err());
    }

    #[test]
    fn rfc3339_formats() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
