//! The job messages members send each other: the bodies the [`rpc`](super::rpc) layer carries.
//! Pure data: no I/O, no tokio.
//!
//! Every request is safe to repeat, because the transport is best effort and a caller whose
//! deadline passed cannot tell a lost request from a lost answer:
//!
//! - `Submit` carries the job id the receiving node chose, and the owner's store refuses a second
//!   job with the same id (the forwarder asks with `Get` before it retries elsewhere).
//! - `Replicate` is an upsert that never moves a job backwards.
//! - `Lease` hands out a new attempt each time; a lease nobody renews expires.
//! - `Renew`, `Progress`, `Holds` and `Finish` name the attempt; the first final result wins.
//! - `PutOutput` chunks are keyed by (upload, index, offset).
//!
//! Workflows and metadata travel as JSON text, so what the owner stores is byte for byte what
//! the API accepted. Fields are named on the wire (see [`super::wire`]); new optional fields
//! get `#[serde(default)]` so older peers' messages still decode.

use serde::{Deserialize, Serialize};

use crate::protocol::{
    DeleteReason, ErrorCode, JobError, JobStatus, JobView, Progress, Tier, WatermarkStatus,
};

/// How much of an output one `PutOutput` or `ReadOutput` answer carries.
pub const OUTPUT_CHUNK_BYTES: usize = 1024 * 1024;

/// A request from one member to another about jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JobRequest {
    /// Store a new job as its owner and replicate it. Answer: `Submitted` or `Refused`.
    Submit {
        job: Box<WireNewJob>,
        /// When the sender sent it (unix ms, its clock): a submission that arrives after the
        /// sender gave up on it is refused, since the sender may have stored it elsewhere.
        #[serde(default)]
        sent_at_ms: i64,
        /// Jobs per day and per month the account may submit.
        #[serde(default)]
        quota_per_day: Option<u64>,
        #[serde(default)]
        quota_per_month: Option<u64>,
        /// Images per month before the account's new jobs are throttled.
        #[serde(default)]
        fair_use_images: Option<u64>,
    },
    /// Keep (or bring up to date) a copy of a job the sender owns. The job's outputs, when it
    /// succeeded, were sent first with `PutOutput` under `upload`. Answer: `Done`.
    Replicate {
        job: Box<WireJob>,
        #[serde(default)]
        upload: Option<String>,
        #[serde(default)]
        outputs: Vec<WireOutput>,
    },
    /// Lease the best queued job of the receiver for the sender to run. Answer: `Leased`.
    Lease {
        /// Only a job of this tier or a higher one.
        #[serde(default)]
        min_tier: Option<Tier>,
    },
    /// The sender still runs this attempt. Answer: `Renewed`.
    Renew { job_id: String, attempt: u32 },
    /// Progress of a leased attempt, for the owner's status and event streams. Answer: `Done`.
    Progress {
        job_id: String,
        attempt: u32,
        progress: Progress,
    },
    /// One piece of an output file, before the `Finish` or `Replicate` that names it.
    /// Answer: `Done`.
    PutOutput {
        upload: String,
        index: u32,
        offset: u64,
        total: u64,
        #[serde(with = "serde_bytes_compat")]
        data: Vec<u8>,
    },
    /// How a leased attempt ended. Answer: `Finished`.
    Finish {
        job_id: String,
        attempt: u32,
        result: WireResult,
        /// Where a succeeded attempt's outputs were uploaded.
        #[serde(default)]
        upload: Option<String>,
    },
    /// The job as the API shows it, if the receiver owns it (or, with `any_role`, keeps a
    /// copy). Answer: `Job`.
    Get {
        id: String,
        account: String,
        #[serde(default)]
        any_role: bool,
    },
    /// The account's jobs the receiver owns, newest first. Answer: `Jobs`.
    List {
        account: String,
        #[serde(default)]
        status: Option<JobStatus>,
        limit: u32,
    },
    /// Cancel a job the receiver owns. Answer: `Job` or `Refused`.
    Cancel { id: String, account: String },
    /// Interrupt this job if the receiver runs it (sent by its owner). Answer: `Done`.
    Interrupt { job_id: String },
    /// A piece of a stored output file. Answer: `OutputPiece`.
    ReadOutput {
        id: String,
        account: String,
        index: u32,
        offset: u64,
    },
    /// The sender leaves the cluster: take over every job of the sender that the receiver
    /// keeps a copy of. Answer: `Done`.
    TakeOver,
    /// Which of these jobs the receiver owns. Answer: `Owned`.
    Whose { ids: Vec<String> },
    /// The sender keeps unfinished copies of these jobs for the receiver (it was away and may
    /// have missed changes): send the current state of those whose replica it still is, and
    /// name the others. Answer: `Refreshed`.
    Refresh { ids: Vec<String> },
    /// The account's usage per UTC day in `[from_day, to_day)` as the receiver counts it
    /// (its own counts plus those it holds as replica). Answer: `Usage`.
    Usage {
        account: String,
        from_day: i64,
        to_day: i64,
    },
    /// Every account's usage per UTC day in `[from_day, to_day)` that the receiver counted as
    /// owner. Answer: `Usage`.
    OwnerUsage { from_day: i64, to_day: i64 },
    /// Delete the outputs of a finished job the receiver owns (and its replica's copies).
    /// Answer: `Done` or `Refused`.
    DeleteOutputs { id: String, account: String },
    /// The sender owns this job and deleted its outputs: delete the receiver's copies and
    /// record the same deletion. Answer: `Done` or `Refused`.
    DropOutputs {
        job_id: String,
        reason: DeleteReason,
        at_ms: i64,
    },
    /// The sender has queued work and the receiver looked idle: pull now. Answer: `Done`.
    Nudge {
        /// The best tier waiting at the sender.
        #[serde(default)]
        tier: Option<Tier>,
    },
    /// The owner's timer of this lease ran out without a renewal: does the receiver still run
    /// (or report) this attempt? Answer: `Holds`.
    Holds { job_id: String, attempt: u32 },
    /// The sender owns these jobs and no longer keeps their copies on the receiver (it chose
    /// another replica, or handed the jobs to another member): forget unfinished copies, so
    /// that they are never adopted. Answer: `Done`.
    Disown { ids: Vec<String> },
    /// Whether the receiver recorded this idempotency key of the account (it owned the
    /// account's jobs before the sender, or keeps copies of them), asked by a new owner before
    /// it stores a keyed submission (protocol 1.2). Answer: `Submitted` (`created: false`) with
    /// the job the key names when `body_hash` matches, `Refused` (`conflict`) when it does
    /// not, `Job` with no view when the key is unknown.
    FindKey {
        account: String,
        key: String,
        body_hash: String,
    },
    /// The questions of [`JobRequest::FindKey`] for several submissions at once, asked by an
    /// owner whose keyed submissions arrive faster than one question's round trip (protocol
    /// 1.3). Answer: `Keys`, one answer per lookup, in order.
    FindKeys { lookups: Vec<KeyLookup> },
}

/// The most lookups one `FindKeys` may carry.
pub const MAX_KEY_LOOKUPS: usize = 256;

/// One idempotency key to look up: a keyed submission's account, key and body hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLookup {
    pub account: String,
    pub key: String,
    pub body_hash: String,
}

/// What a member knows of one idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "known", rename_all = "snake_case")]
pub enum KeyAnswer {
    /// The member did not record the key.
    Unknown,
    /// The key names this job (as the API shows it, JSON text), submitted with the same body.
    Same { view: String },
    /// The key names a job submitted with another body: the API's `conflict`.
    Conflict(WireRefusal),
    /// The member has not stored the key yet but is storing a submission with it as the
    /// account's owner right now (two members each took itself for the owner): ask again
    /// shortly.
    InProgress,
}

/// The answer to a [`JobRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum JobResponse {
    Done,
    Submitted {
        /// The job as the API shows it, as JSON text.
        view: String,
        /// False when an earlier job with the same idempotency key was returned.
        created: bool,
    },
    /// Refused with an API error, to be answered to the user as it is.
    Refused(WireRefusal),
    Leased {
        #[serde(default)]
        job: Option<Box<WireJob>>,
        /// How long the lease lasts without a renewal.
        #[serde(default)]
        lease_ms: u64,
    },
    Renewed {
        /// False: stop running it (cancelled, finished or given to another runner).
        keep: bool,
        /// True when the job was cancelled: interrupt ComfyUI.
        #[serde(default)]
        cancelled: bool,
        /// The job has a new owner (the receiver handed it over): renew and report there.
        #[serde(default)]
        owner: Option<String>,
    },
    Owned {
        ids: Vec<String>,
    },
    Holds {
        held: bool,
    },
    Refreshed {
        /// Copies the sender must forget: the receiver does not own the job, or another member
        /// holds its replica.
        stale: Vec<String>,
    },
    Finished {
        /// False when the job already had its final result (this one was dropped) or the
        /// attempt no longer held the job.
        applied: bool,
    },
    Job {
        /// The job as the API shows it, as JSON text; `None` when the receiver does not have it.
        #[serde(default)]
        view: Option<String>,
    },
    Jobs {
        /// JobViews as JSON text, newest first.
        views: Vec<String>,
    },
    Usage {
        rows: Vec<WireUsage>,
    },
    /// Answers to `FindKeys`, one per lookup, in order.
    Keys {
        answers: Vec<KeyAnswer>,
    },
    OutputPiece {
        #[serde(default)]
        content_type: String,
        #[serde(default)]
        filename: String,
        total: u64,
        #[serde(with = "serde_bytes_compat")]
        data: Vec<u8>,
        /// Set (with no data) when the output is an object in the cluster's bucket: the reader
        /// fetches or presigns it there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
}

/// An API error carried between members.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRefusal {
    pub code: ErrorCode,
    pub message: String,
    /// JSON text.
    #[serde(default)]
    pub details: Option<String>,
    #[serde(default)]
    pub retry_after: Option<u64>,
}

/// A submission as the API accepted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireNewJob {
    pub id: String,
    pub account: String,
    pub tier: Tier,
    /// JSON text of the workflow.
    pub workflow: String,
    #[serde(default)]
    pub webhook: Option<String>,
    /// JSON text.
    #[serde(default)]
    pub metadata: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub body_hash: String,
    pub max_attempts: u32,
}

/// A stored job, as its owner sends it to a replica or a runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireJob {
    pub id: String,
    pub account: String,
    pub tier: Tier,
    pub status: JobStatus,
    /// JSON text of the workflow.
    pub workflow: String,
    #[serde(default)]
    pub webhook: Option<String>,
    /// JSON text.
    #[serde(default)]
    pub metadata: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    pub body_hash: String,
    pub created_at_ms: i64,
    #[serde(default)]
    pub started_at_ms: Option<i64>,
    #[serde(default)]
    pub finished_at_ms: Option<i64>,
    pub attempts: u32,
    pub max_attempts: u32,
    #[serde(default)]
    pub error: Option<JobError>,
    #[serde(default)]
    pub lease_holder: Option<String>,
    /// The member holding the replica: where a runner turns when the owner is gone.
    #[serde(default)]
    pub replica: Option<String>,
    /// Why the job waits at free priority (premium fair use passed), if it does.
    #[serde(default)]
    pub throttled: Option<String>,
}

/// One account's usage on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUsage {
    pub account: String,
    /// Days since the Unix epoch (UTC).
    pub day: i64,
    pub submitted: u64,
    pub refused: u64,
    pub succeeded: u64,
    pub images: u64,
    pub gpu_ms: u64,
}

/// An output file named by a `Finish` or `Replicate`; its bytes came in `PutOutput` chunks,
/// or (protocol minor 1) inline in `data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireOutput {
    pub index: u32,
    pub filename: String,
    pub content_type: String,
    pub bytes: u64,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    #[serde(default)]
    pub watermark: Option<WatermarkStatus>,
    /// The object's key in the cluster's bucket when the output is kept there (nothing was
    /// uploaded to the receiver then); absent from older members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The content itself, when it is small enough to ride in the message (then nothing was
    /// uploaded for it); absent from members before protocol 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<WireBytes>,
}

/// Bytes carried as a MessagePack binary; `Debug` shows only their length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WireBytes(#[serde(with = "serde_bytes_compat")] pub Vec<u8>);

impl std::fmt::Debug for WireBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// How a leased attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum WireResult {
    Succeeded {
        outputs: Vec<WireOutput>,
    },
    Failed {
        error: JobError,
    },
    Cancelled,
    /// Run it again (ComfyUI lost it, the runner is stopping).
    Requeue {
        reason: String,
    },
}

/// `Vec<u8>` as a MessagePack binary (not an array of integers: a 1 MiB chunk stays 1 MiB).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                // Bounded by the frame the decoder was given.
                let mut out = Vec::new();
                while let Some(byte) = seq.next_element::<u8>()? {
                    out.push(byte);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// Parses a JobView carried as JSON text.
pub fn parse_view(text: &str) -> Result<JobView, String> {
    serde_json::from_str(text).map_err(|e| format!("a peer sent a job that does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::wire::{self, Envelope, Request};
    use proptest::prelude::*;

    fn roundtrip(req: JobRequest) {
        let frame = wire::encode_request(
            &Request {
                id: 7,
                deadline_ms: 1000,
                body: req.clone(),
            },
            8 << 20,
        )
        .expect("encode");
        match wire::decode::<JobRequest, JobResponse>(&frame, 8 << 20).expect("decode") {
            Envelope::Request(r) => assert_eq!(r.body, req),
            other => panic!("not a request: {other:?}"),
        }
    }

    #[test]
    fn requests_roundtrip() {
        roundtrip(JobRequest::Nudge {
            tier: Some(Tier::Free),
        });
        roundtrip(JobRequest::Holds {
            job_id: "j1".into(),
            attempt: 2,
        });
        roundtrip(JobRequest::Disown {
            ids: vec!["j1".into(), "j2".into()],
        });
        roundtrip(JobRequest::FindKey {
            account: "acct".into(),
            key: "order-42".into(),
            body_hash: "ab".repeat(32),
        });
        roundtrip(JobRequest::FindKeys {
            lookups: vec![
                KeyLookup {
                    account: "acct".into(),
                    key: "order-42".into(),
                    body_hash: "ab".repeat(32),
                },
                KeyLookup {
                    account: "other".into(),
                    key: "order-43".into(),
                    body_hash: "cd".repeat(32),
                },
            ],
        });
        roundtrip(JobRequest::Lease {
            min_tier: Some(Tier::Pro),
        });
        roundtrip(JobRequest::PutOutput {
            upload: "u1".into(),
            index: 0,
            offset: 0,
            total: 3,
            data: vec![1, 2, 3],
        });
        roundtrip(JobRequest::Finish {
            job_id: "j".into(),
            attempt: 2,
            result: WireResult::Failed {
                error: JobError {
                    code: "execution_error".into(),
                    message: "boom".into(),
                    details: Some(serde_json::json!({"node_id": "3"})),
                },
            },
            upload: None,
        });
    }

    #[test]
    fn key_answers_roundtrip() {
        let body = JobResponse::Keys {
            answers: vec![
                KeyAnswer::Unknown,
                KeyAnswer::InProgress,
                KeyAnswer::Same {
                    view: r#"{"id":"j1"}"#.into(),
                },
                KeyAnswer::Conflict(WireRefusal {
                    code: ErrorCode::Conflict,
                    message: "key used".into(),
                    details: Some(r#"{"job_id":"j0"}"#.into()),
                    retry_after: None,
                }),
            ],
        };
        let frame = wire::encode_response(
            &wire::Response {
                id: 9,
                body: Ok(body.clone()),
            },
            8 << 20,
        )
        .expect("encode");
        match wire::decode::<JobRequest, JobResponse>(&frame, 8 << 20).expect("decode") {
            Envelope::Response(r) => assert_eq!(r.body, Ok(body)),
            other => panic!("not a response: {other:?}"),
        }
    }

    #[test]
    fn inline_outputs_roundtrip_as_binary() {
        let data = vec![0xffu8; 4096];
        let req = JobRequest::Finish {
            job_id: "j".into(),
            attempt: 1,
            result: WireResult::Succeeded {
                outputs: vec![WireOutput {
                    index: 0,
                    filename: "a.png".into(),
                    content_type: "image/png".into(),
                    bytes: 4096,
                    sha256: "00".into(),
                    watermark: None,
                    key: None,
                    data: Some(WireBytes(data)),
                }],
            },
            upload: None,
        };
        roundtrip(req.clone());
        let frame = wire::encode_request(
            &Request {
                id: 1,
                deadline_ms: 1,
                body: req,
            },
            1 << 20,
        )
        .expect("encode");
        assert!(frame.len() < 4096 + 512, "frame is {} bytes", frame.len());
        assert_eq!(format!("{:?}", WireBytes(vec![1, 2, 3])), "<3 bytes>");
    }

    #[test]
    fn chunks_are_binary_not_arrays() {
        let data = vec![0xffu8; 4096];
        let frame = wire::encode_request(
            &Request {
                id: 1,
                deadline_ms: 1,
                body: JobRequest::PutOutput {
                    upload: "u".into(),
                    index: 0,
                    offset: 0,
                    total: 4096,
                    data,
                },
            },
            1 << 20,
        )
        .expect("encode");
        // An array of 0xff would take two bytes per element.
        assert!(frame.len() < 4096 + 256, "frame is {} bytes", frame.len());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = wire::decode::<JobRequest, JobResponse>(&bytes, 1 << 20);
        }

        #[test]
        fn mutated_frames_never_panic(flip in 0usize..4096, value in any::<u8>()) {
            let mut frame = wire::encode_request(
                &Request { id: 3, deadline_ms: 10, body: JobRequest::Get {
                    id: "job".into(), account: "acct".into(), any_role: true } },
                1 << 20,
            ).expect("encode");
            let at = flip % frame.len();
            frame[at] = value;
            let _ = wire::decode::<JobRequest, JobResponse>(&frame, 1 << 20);
        }
    }
}
