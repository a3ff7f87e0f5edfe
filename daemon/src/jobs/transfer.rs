//! Output files between members: a runner's results to the owner, the owner's to its replica,
//! and any member's reads of a stored file, in chunks that fit a peer message.
//!
//! Outputs that are small in all (`cluster.inline_outputs_kib`, 1 MiB by default) ride inside
//! the result or replica message itself, to members known to speak peer protocol 1.1; others
//! are uploaded first. Either way each file is checked against the length and SHA-256 the
//! message names before anything is stored.
//!
//! Uploads are assembled in memory, bounded per upload and in total, and dropped when idle.
//! Chunks are sent one at a time and must arrive in order; a repeated chunk (its answer was
//! lost) is accepted again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{Inner, RemoteJob, lock};
use crate::api::ApiError;
use crate::peer::messages::{
    JobRequest, JobResponse, OUTPUT_CHUNK_BYTES, WireBytes, WireOutput, WireResult,
};
use crate::peer::wire;
use crate::peer::{PeerErrorKind, RpcError};
use crate::queue::{Job, NewOutput, Outcome, OutputsWithContent};

/// The most one upload (all outputs of one job) may hold.
const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
/// The most all uploads together may hold.
const MAX_UPLOADS_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// How long a result report keeps trying to reach the owner.
const REPORT_FOR: Duration = Duration::from_secs(60);
const CHUNK_DEADLINE: Duration = Duration::from_secs(10);
/// A result message: the owner stores it and copies it to the replica before it answers.
const FINISH_DEADLINE: Duration = Duration::from_secs(3);
/// Room a message with inline outputs keeps for everything else in it (names, metadata).
const MESSAGE_ROOM: usize = 64 * 1024;

/// An output file as the API serves it.
#[derive(Debug, Clone)]
pub struct OutputFile {
    pub filename: String,
    pub content_type: String,
    pub sha256: Option<String>,
    /// The content; empty when `object_key` is set.
    pub bytes: Vec<u8>,
    /// The object in the cluster's bucket that holds the content (`[storage] kind = "s3"`): the
    /// API answers with a presigned URL or reads it from there.
    pub object_key: Option<String>,
}

#[derive(Debug)]
struct Upload {
    from: String,
    files: HashMap<u32, Vec<u8>>,
    bytes: u64,
    touched: Instant,
}

/// Uploads in progress, by upload id.
#[derive(Debug, Default)]
pub(crate) struct Uploads {
    map: Mutex<HashMap<String, Upload>>,
}

impl Uploads {
    /// Adds a chunk. `offset` must be where the file ends now (or a chunk already received).
    pub(crate) fn put(
        &self,
        from: &str,
        upload: &str,
        index: u32,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<(), String> {
        if upload.is_empty() || upload.len() > 128 {
            return Err("an upload id must be 1 to 128 characters".to_string());
        }
        if total > MAX_UPLOAD_BYTES {
            return Err(format!(
                "an output of {total} bytes is over the limit of {MAX_UPLOAD_BYTES}"
            ));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|end| *end <= total)
            .ok_or_else(|| format!("chunk at {offset} (+{}) runs past {total}", data.len()))?;
        let mut map = lock(&self.map);
        let held: u64 = map.values().map(|u| u.bytes).sum();
        let entry = map.entry(upload.to_string()).or_insert_with(|| Upload {
            from: from.to_string(),
            files: HashMap::new(),
            bytes: 0,
            touched: Instant::now(),
        });
        if entry.from != from {
            return Err(format!("upload {upload} belongs to another member"));
        }
        entry.touched = Instant::now();
        let file = entry.files.entry(index).or_default();
        let have = file.len() as u64;
        if end <= have {
            // A repeat of a chunk whose answer was lost.
            return Ok(());
        }
        if offset != have {
            return Err(format!(
                "chunk of output {index} starts at {offset}, but {have} bytes are here"
            ));
        }
        if entry.bytes + data.len() as u64 > MAX_UPLOAD_BYTES
            || held + data.len() as u64 > MAX_UPLOADS_BYTES
        {
            return Err("uploads are over their memory limit; try again later".to_string());
        }
        file.extend_from_slice(data);
        entry.bytes += data.len() as u64;
        Ok(())
    }

    /// Takes a finished upload, checking each named output's length and hash.
    fn take(&self, upload: &str, outputs: &[WireOutput]) -> Result<Vec<NewOutput>, String> {
        let mut map = lock(&self.map);
        let entry = map
            .get(upload)
            .ok_or_else(|| format!("no upload {upload} (it expired or was never sent)"))?;
        for output in outputs {
            let data = entry
                .files
                .get(&output.index)
                .ok_or_else(|| format!("upload {upload} has no output {}", output.index))?;
            check_content(output, data)?;
        }
        let mut entry = map
            .remove(upload)
            .ok_or_else(|| format!("no upload {upload}"))?;
        let mut files = Vec::with_capacity(outputs.len());
        for output in outputs {
            let bytes = entry.files.remove(&output.index).unwrap_or_default();
            files.push(NewOutput {
                filename: output.filename.clone(),
                content_type: output.content_type.clone(),
                bytes,
                watermark: output.watermark.clone(),
            });
        }
        Ok(files)
    }

    /// The files a result or replica message names: carried inline (every one of them), or
    /// uploaded before as `upload`. Nothing is taken unless every file checks out.
    pub(crate) fn files(
        &self,
        upload: Option<&str>,
        outputs: &[WireOutput],
    ) -> Result<Vec<NewOutput>, String> {
        if outputs.is_empty() {
            return Ok(Vec::new());
        }
        let inline = outputs.iter().filter(|o| o.data.is_some()).count();
        if inline == 0 {
            let upload = upload.ok_or("a result with outputs names no upload")?;
            return self.take(upload, outputs);
        }
        if inline != outputs.len() {
            return Err(format!(
                "{inline} of {} outputs carry their content; all or none must",
                outputs.len()
            ));
        }
        if let Some(upload) = upload {
            return Err(format!(
                "the outputs carry their content, yet upload {upload} is named too"
            ));
        }
        let mut files = Vec::with_capacity(outputs.len());
        for output in outputs {
            let data = output
                .data
                .as_ref()
                .map(|d| d.0.as_slice())
                .unwrap_or_default();
            check_content(output, data)?;
            files.push(NewOutput {
                filename: output.filename.clone(),
                content_type: output.content_type.clone(),
                bytes: data.to_vec(),
                watermark: output.watermark.clone(),
            });
        }
        Ok(files)
    }

    /// Drops uploads untouched for `idle`.
    pub(crate) fn drop_idle(&self, idle: Duration) {
        let now = Instant::now();
        lock(&self.map).retain(|id, upload| {
            let keep = now.duration_since(upload.touched) < idle;
            if !keep {
                tracing::warn!(upload = %id, from = %upload.from, "an unfinished upload expired");
            }
            keep
        });
    }
}

/// Checks a received file against the length and SHA-256 its message names.
fn check_content(output: &WireOutput, data: &[u8]) -> Result<(), String> {
    if data.len() as u64 != output.bytes {
        return Err(format!(
            "output {} has {} bytes, {} expected",
            output.index,
            data.len(),
            output.bytes
        ));
    }
    if hex::encode(Sha256::digest(data)) != output.sha256 {
        return Err(format!(
            "output {} does not match its SHA-256",
            output.index
        ));
    }
    Ok(())
}

/// What names output `index` in a message, with its content when `inline`.
fn describe(index: u32, file: &NewOutput, inline: bool) -> WireOutput {
    WireOutput {
        index,
        filename: file.filename.clone(),
        content_type: file.content_type.clone(),
        bytes: file.bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&file.bytes)),
        watermark: file.watermark.clone(),
        key: None,
        data: inline.then(|| WireBytes(file.bytes.clone())),
    }
}

impl Inner {
    /// Whether `files` may ride inside a message to `addr` that holds `beside` bytes more: they
    /// are small enough in all, the message fits a frame, and the member speaks protocol 1.1
    /// (known from a message it sent here).
    fn may_inline(&self, addr: SocketAddr, files: &[(u32, NewOutput)], beside: usize) -> bool {
        let total: usize = files.iter().map(|(_, f)| f.bytes.len()).sum();
        !files.is_empty()
            && total <= self.settings.inline_outputs_bytes
            && total + beside + MESSAGE_ROOM <= self.settings.max_frame_bytes
            && self
                .rpc()
                .and_then(|rpc| rpc.peer_version(addr))
                .is_some_and(|version| wire::speaks(version, 1))
    }
}

/// Names `files` with their content inside, for a message to a member that takes them so.
fn inline(files: &[(u32, NewOutput)]) -> Vec<WireOutput> {
    files
        .iter()
        .map(|(index, file)| describe(*index, file, true))
        .collect()
}

/// Sends `files` to `addr` as upload `upload`, one chunk at a time; returns what names them.
async fn upload(
    inner: &Inner,
    addr: SocketAddr,
    upload: &str,
    files: &[(u32, NewOutput)],
) -> Result<Vec<WireOutput>, String> {
    let mut named = Vec::with_capacity(files.len());
    for (index, file) in files {
        let bytes = &file.bytes;
        let total = bytes.len() as u64;
        let mut offset = 0usize;
        loop {
            let end = (offset + OUTPUT_CHUNK_BYTES).min(bytes.len());
            let request = JobRequest::PutOutput {
                upload: upload.to_string(),
                index: *index,
                offset: offset as u64,
                total,
                data: bytes[offset..end].to_vec(),
            };
            match inner.request(addr, request, CHUNK_DEADLINE).await {
                Ok(JobResponse::Done) => {}
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(error) => return Err(error.to_string()),
            }
            offset = end;
            if offset >= bytes.len() {
                break;
            }
        }
        named.push(describe(*index, file, false));
    }
    Ok(named)
}

/// Reports a leased attempt's end to its owner: outputs first, then the result; retried (the
/// same upload id, the same result) until the owner answers or [`REPORT_FOR`] passes.
pub(crate) async fn report(inner: &Inner, remote: &RemoteJob, outcome: Outcome) -> bool {
    let upload_id = format!("{}-{}-{}", remote.job.id, remote.attempt, inner.name);
    let (files, result) = match outcome {
        Outcome::Succeeded { outputs } => {
            let files: Vec<(u32, NewOutput)> = outputs
                .into_iter()
                .enumerate()
                .map(|(i, o)| (i as u32, o))
                .collect();
            (files, None)
        }
        Outcome::Failed(error) => (Vec::new(), Some(WireResult::Failed { error })),
        Outcome::Cancelled => (Vec::new(), Some(WireResult::Cancelled)),
        Outcome::Requeue { reason } => (Vec::new(), Some(WireResult::Requeue { reason })),
    };
    let give_up = Instant::now() + REPORT_FOR;
    let mut backoff = Duration::from_millis(200);
    // Cleared when a try with the outputs inside fails: later tries upload them first.
    let mut inline_ok = true;
    loop {
        let target = inner.owner_of(remote);
        let mut sent_inline = false;
        let attempt = async {
            let (owner, addr) = target.ok_or_else(|| {
                "neither the owner nor the replica of the job is known".to_string()
            })?;
            let (result, upload) = match &result {
                Some(result) => (result.clone(), None),
                None if inline_ok && inner.may_inline(addr, &files, 0) => {
                    sent_inline = true;
                    let outputs = inline(&files);
                    (WireResult::Succeeded { outputs }, None)
                }
                None => {
                    let outputs = upload(inner, addr, &upload_id, &files).await?;
                    let upload = (!outputs.is_empty()).then(|| upload_id.clone());
                    (WireResult::Succeeded { outputs }, upload)
                }
            };
            let request = JobRequest::Finish {
                job_id: remote.job.id.clone(),
                attempt: remote.attempt,
                result,
                upload,
            };
            match inner.request(addr, request, FINISH_DEADLINE).await {
                Ok(JobResponse::Finished { applied }) => Ok(applied),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(RpcError::Remote(error)) if error.kind == PeerErrorKind::NotFound => {
                    // The member no longer owns it (it handed the job over): its replica does.
                    if let Some(replica) = remote.job.replica.as_deref()
                        && replica != owner
                    {
                        remote.set_owner(replica);
                    }
                    Err(format!("{owner} no longer owns the job: {error}"))
                }
                Err(error) => Err(error.to_string()),
            }
        };
        let answer = attempt.await;
        if sent_inline && answer.is_err() {
            // Whatever went wrong, the next try uploads: an owner that refuses inline content
            // (or a frame it cannot take) still gets the result.
            inline_ok = false;
        }
        match answer {
            Ok(applied) => {
                inner.metrics.count_outputs_sent(files.len(), sent_inline);
                return applied;
            }
            Err(error) => {
                if Instant::now() + backoff >= give_up {
                    tracing::error!(job = %remote.job.id, owner = %remote.owner(), %error,
                        "cannot report the job's result to its owner; its lease will expire and it runs again");
                    return false;
                }
                tracing::warn!(job = %remote.job.id, owner = %remote.owner(), %error, "reporting a result; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Sends an owned job's current state (and, once it succeeded, its outputs) to its replica.
/// `read`: the outputs with their content, when the caller read them with the job; else they
/// are read here.
pub(crate) async fn replicate_with_outputs(
    inner: &Inner,
    replica: &str,
    job: &Job,
    read: Option<&OutputsWithContent>,
) -> Result<(), String> {
    let mut upload_id = None;
    let mut named = Vec::new();
    // Outputs already deleted are not sent: the copy gets the job without them.
    if job.status == crate::protocol::JobStatus::Succeeded && job.outputs_deleted.is_none() {
        let fetched;
        let stored = match read {
            Some(read) => read,
            None => {
                fetched = inner
                    .store
                    .outputs_with_content(&job.id)
                    .await
                    .map_err(|e| e.to_string())?;
                &fetched
            }
        };
        if !stored.is_empty() && stored.iter().all(|(o, _)| o.key.is_some()) {
            // Objects in the bucket: the replica records the same keys, nothing is uploaded.
            let named = stored
                .iter()
                .map(|(o, _)| WireOutput {
                    index: o.index,
                    filename: o.filename.clone(),
                    content_type: o.content_type.clone(),
                    bytes: o.bytes,
                    sha256: o.sha256.clone(),
                    watermark: o.watermark.clone(),
                    key: o.key.clone(),
                    data: None,
                })
                .collect();
            return inner.replicate_to(replica, job, None, named).await;
        }
        if !stored.is_empty() {
            let addr = inner
                .addr_of(replica)
                .ok_or_else(|| format!("{replica} has no known address"))?;
            let mut files = Vec::with_capacity(stored.len());
            for (output, content) in stored {
                // Inline content came with the rows; a file is read from disk.
                let bytes = match content {
                    Some(bytes) => bytes.clone(),
                    None => inner
                        .store
                        .read_output(&job.id, output, 0, usize::MAX)
                        .await
                        .map_err(|e| format!("reading output {}: {e}", output.index))?,
                };
                files.push((
                    output.index,
                    NewOutput {
                        filename: output.filename.clone(),
                        content_type: output.content_type.clone(),
                        bytes,
                        watermark: output.watermark.clone(),
                    },
                ));
            }
            if inner.may_inline(addr, &files, job.workflow.as_str().len()) {
                match inner.send_copy(addr, job, None, inline(&files)).await {
                    Ok(JobResponse::Done) => {
                        inner.metrics.count_outputs_sent(files.len(), true);
                        return Ok(());
                    }
                    // Refused or too big for a frame: the outputs go in chunks instead. A
                    // member that did not answer would not take chunks either: the caller
                    // tries again later.
                    Ok(_) | Err(RpcError::Remote(_) | RpcError::TooLarge { .. }) => {
                        tracing::debug!(job = %job.id, %replica,
                            "a copy with its outputs inside was not taken; uploading them");
                    }
                    Err(error) => return Err(format!("{replica}: {error}")),
                }
            }
            let id = format!("{}-replica-{}", job.id, uuid::Uuid::new_v4().simple());
            named = upload(inner, addr, &id, &files).await?;
            upload_id = Some(id);
        }
    }
    let sent = upload_id.as_ref().map_or(0, |_| named.len());
    inner.replicate_to(replica, job, upload_id, named).await?;
    inner.metrics.count_outputs_sent(sent, false);
    Ok(())
}

/// An output stored here, if this node has the file.
pub(crate) async fn read_local(
    store: &crate::queue::JobStore,
    job: &Job,
    index: u32,
) -> Result<Option<OutputFile>, ApiError> {
    let outputs = store.outputs(&job.id).await.map_err(ApiError::internal)?;
    let Some(output) = outputs.into_iter().find(|o| o.index == index) else {
        return Ok(None);
    };
    if let Some(deleted) = job.outputs_deleted {
        return Err(super::outputs::gone(&job.id, index, deleted));
    }
    if output.key.is_some() {
        return Ok(Some(OutputFile {
            filename: output.filename,
            content_type: output.content_type,
            sha256: Some(output.sha256),
            bytes: Vec::new(),
            object_key: output.key,
        }));
    }
    let bytes = read_content(store, job, &output, 0, usize::MAX).await?;
    Ok(Some(OutputFile {
        filename: output.filename,
        content_type: output.content_type,
        sha256: Some(output.sha256),
        bytes,
        object_key: None,
    }))
}

/// How long a read whose content is missing waits for a deletion in progress to be recorded.
const DELETION_SETTLES: Duration = Duration::from_secs(1);

/// Reads up to `max` bytes of a stored output from `offset`. A read that races the deletion of
/// the job's outputs (retention or the account) answers `gone`, as a read after it would: the
/// deletion removes files before it records itself, so content that is missing while the job is
/// not yet marked waits briefly for the mark. Content missing for any other reason is an
/// internal error that names it.
async fn read_content(
    store: &crate::queue::JobStore,
    job: &Job,
    output: &crate::queue::Output,
    offset: u64,
    max: usize,
) -> Result<Vec<u8>, ApiError> {
    let error = match store.read_output(&job.id, output, offset, max).await {
        Ok(data) => return Ok(data),
        Err(error) => error,
    };
    let missing = match &error {
        crate::queue::StoreError::NotFound(_) => true,
        crate::queue::StoreError::Io { source, .. } => {
            source.kind() == std::io::ErrorKind::NotFound
        }
        _ => false,
    };
    if !missing {
        return Err(ApiError::internal(error));
    }
    let until = Instant::now() + DELETION_SETTLES;
    loop {
        let now = store.get(&job.id).await.map_err(ApiError::internal)?;
        if let Some(deleted) = now.and_then(|job| job.outputs_deleted) {
            return Err(super::outputs::gone(&job.id, output.index, deleted));
        }
        if Instant::now() >= until {
            return Err(ApiError::internal(format!(
                "output {} of job {} is missing from this node's store: {error}",
                output.index, job.id
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Answers a peer's read of a stored output, one chunk from `offset`.
pub(crate) async fn read_piece(
    inner: &Inner,
    id: &str,
    account: &str,
    index: u32,
    offset: u64,
) -> Result<JobResponse, String> {
    let job = inner
        .store
        .get(id)
        .await
        .map_err(|e| e.to_string())?
        .filter(|job| job.account == account)
        .ok_or_else(|| format!("no job {id}"))?;
    let outputs = inner
        .store
        .outputs(&job.id)
        .await
        .map_err(|e| e.to_string())?;
    let output = outputs
        .into_iter()
        .find(|o| o.index == index)
        .ok_or_else(|| format!("job {id} has no output {index} here"))?;
    if let Some(deleted) = job.outputs_deleted {
        let error = super::outputs::gone(&job.id, index, deleted);
        return Ok(JobResponse::Refused(super::wire_refusal(&error)));
    }
    if output.key.is_some() {
        return Ok(JobResponse::OutputPiece {
            content_type: output.content_type,
            filename: output.filename,
            total: output.bytes,
            data: Vec::new(),
            key: output.key,
        });
    }
    let data = match read_content(&inner.store, &job, &output, offset, OUTPUT_CHUNK_BYTES).await {
        Ok(data) => data,
        Err(error) if error.code == crate::protocol::ErrorCode::Gone => {
            return Ok(JobResponse::Refused(super::wire_refusal(&error)));
        }
        Err(error) => return Err(error.message),
    };
    Ok(JobResponse::OutputPiece {
        content_type: output.content_type,
        filename: output.filename,
        total: output.bytes,
        data,
        key: None,
    })
}

/// Why a member did not send an output.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// An answer for the user (e.g. the output was deleted: `gone`).
    Refused(ApiError),
    /// The member could not be asked, or answered nonsense.
    Failed(String),
}

impl From<String> for FetchError {
    fn from(error: String) -> Self {
        FetchError::Failed(error)
    }
}

/// Reads a whole output from the member at `addr`, chunk by chunk.
pub(crate) async fn fetch_output(
    inner: &Inner,
    addr: SocketAddr,
    id: &str,
    account: &str,
    index: u32,
) -> Result<Option<OutputFile>, FetchError> {
    let mut bytes = Vec::new();
    let mut meta = None;
    // Bounded: every round adds a non-empty chunk or ends.
    for _ in 0..(MAX_UPLOAD_BYTES / OUTPUT_CHUNK_BYTES as u64 + 2) {
        let request = JobRequest::ReadOutput {
            id: id.to_string(),
            account: account.to_string(),
            index,
            offset: bytes.len() as u64,
        };
        match inner.request(addr, request, CHUNK_DEADLINE).await {
            Ok(JobResponse::OutputPiece {
                content_type,
                filename,
                key: Some(key),
                ..
            }) => {
                return Ok(Some(OutputFile {
                    filename,
                    content_type,
                    sha256: None,
                    bytes: Vec::new(),
                    object_key: Some(key),
                }));
            }
            Ok(JobResponse::OutputPiece {
                content_type,
                filename,
                total,
                data,
                key: None,
            }) => {
                if total > MAX_UPLOAD_BYTES {
                    return Err(format!("an output of {total} bytes is over the limit").into());
                }
                let empty = data.is_empty();
                bytes.extend_from_slice(&data);
                meta = Some((filename, content_type));
                if bytes.len() as u64 >= total {
                    break;
                }
                if empty {
                    return Err("the member sent an empty piece before the end"
                        .to_string()
                        .into());
                }
            }
            Ok(JobResponse::Refused(refusal)) => {
                return Err(FetchError::Refused(super::refusal_error(refusal)));
            }
            Ok(other) => return Err(format!("unexpected answer {other:?}").into()),
            Err(RpcError::Remote(error)) if error.kind == PeerErrorKind::NotFound => {
                return Ok(None);
            }
            Err(error) => return Err(error.to_string().into()),
        }
    }
    let Some((filename, content_type)) = meta else {
        return Ok(None);
    };
    Ok(Some(OutputFile {
        filename,
        content_type,
        sha256: None,
        bytes,
        object_key: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &[u8]) -> NewOutput {
        NewOutput {
            filename: "out.png".to_string(),
            content_type: "image/png".to_string(),
            bytes: content.to_vec(),
            watermark: None,
        }
    }

    /// A store with one succeeded job, "j", whose output 0 is kept inline and output 1 is a
    /// file; and the job as a reader saw it before any deletion.
    async fn succeeded_job(dir: &std::path::Path) -> (crate::queue::JobStore, Job) {
        use crate::queue::{JobStore, NewJob, StoreOptions};
        let store = JobStore::open(
            dir,
            StoreOptions {
                inline_max_bytes: 8,
                ..StoreOptions::default()
            },
        )
        .await
        .expect("open store");
        let job = NewJob {
            id: "j".to_string(),
            account: "a".to_string(),
            tier: crate::protocol::Tier::Pro,
            workflow: serde_json::json!({"1": {"class_type": "SaveImage", "inputs": {}}}).into(),
            webhook: None,
            metadata: None,
            idempotency_key: None,
            body_hash: "hash".to_string(),
            max_attempts: 1,
            replica: None,
        };
        store.submit(job, None).await.expect("submit");
        store.next_job().await.expect("lease").expect("a job");
        let outputs = vec![file(b"small"), file(b"larger than eight bytes")];
        let job = store
            .finish("j", Outcome::Succeeded { outputs })
            .await
            .expect("finish");
        (store, job)
    }

    fn is_gone(result: Result<Option<OutputFile>, ApiError>) -> bool {
        matches!(result, Err(e) if e.code == crate::protocol::ErrorCode::Gone)
    }

    #[tokio::test]
    async fn a_read_racing_the_deletion_of_outputs_answers_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, seen) = succeeded_job(dir.path()).await;
        for index in [0, 1] {
            let read = read_local(&store, &seen, index).await.expect("readable");
            assert!(read.is_some_and(|f| !f.bytes.is_empty()));
        }
        // The reader holds the job from before the deletion; files go first, then the mark,
        // which comes while the reader already found its content missing.
        let outputs = store.outputs("j").await.expect("outputs");
        store
            .remove_output_files("j", &outputs)
            .await
            .expect("remove files");
        let marker = store.clone();
        let mark = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            marker
                .mark_outputs_deleted("j", crate::protocol::DeleteReason::User, 1)
                .await
        });
        assert!(is_gone(read_local(&store, &seen, 1).await), "file output");
        mark.await.expect("mark task").expect("marked");
        assert!(is_gone(read_local(&store, &seen, 0).await), "inline output");
    }

    #[tokio::test]
    async fn content_missing_without_a_deletion_is_an_internal_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, seen) = succeeded_job(dir.path()).await;
        let outputs = store.outputs("j").await.expect("outputs");
        std::fs::remove_file(dir.path().join(&outputs[1].path)).expect("remove the file");
        let err = read_local(&store, &seen, 1)
            .await
            .expect_err("missing file");
        assert_eq!(err.code, crate::protocol::ErrorCode::Internal);
        assert!(
            err.message.contains("output 1 of job j is missing"),
            "{}",
            err.message
        );
        // The inline one is still there.
        assert!(
            read_local(&store, &seen, 0)
                .await
                .expect("inline")
                .is_some()
        );
    }

    #[test]
    fn inline_outputs_are_checked_and_taken() {
        let uploads = Uploads::default();
        let named = inline(&[(0, file(b"first")), (1, file(b"second"))]);
        let files = uploads.files(None, &named).expect("inline outputs");
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].bytes, b"first");
        assert_eq!(files[1].bytes, b"second");
        assert!(uploads.files(None, &[]).expect("no outputs").is_empty());
    }

    #[test]
    fn bad_inline_outputs_are_refused_with_the_reason() {
        let uploads = Uploads::default();
        let mut named = inline(&[(0, file(b"first")), (1, file(b"second"))]);

        let mut corrupt = named.clone();
        corrupt[1].data = Some(WireBytes(b"secand".to_vec()));
        let err = uploads.files(None, &corrupt).expect_err("hash mismatch");
        assert!(err.contains("output 1 does not match its SHA-256"), "{err}");

        let mut short = named.clone();
        short[0].data = Some(WireBytes(b"firs".to_vec()));
        let err = uploads.files(None, &short).expect_err("length mismatch");
        assert!(err.contains("output 0 has 4 bytes, 5 expected"), "{err}");

        let err = uploads
            .files(Some("u1"), &named)
            .expect_err("inline and an upload");
        assert!(err.contains("upload u1 is named too"), "{err}");

        named[1].data = None;
        let err = uploads.files(None, &named).expect_err("mixed");
        assert!(err.contains("1 of 2 outputs carry their content"), "{err}");

        named[0].data = None;
        let err = uploads.files(None, &named).expect_err("neither");
        assert!(err.contains("names no upload"), "{err}");
    }

    #[test]
    fn uploaded_outputs_are_taken_once_checked() {
        let uploads = Uploads::default();
        let content = file(b"chunked content");
        let named = vec![describe(0, &content, false)];
        assert!(named[0].data.is_none());
        let total = content.bytes.len() as u64;
        uploads
            .put("runner", "u1", 0, 0, total, &content.bytes[..7])
            .expect("first chunk");
        // A repeated chunk (its answer was lost) is accepted again.
        uploads
            .put("runner", "u1", 0, 0, total, &content.bytes[..7])
            .expect("repeated chunk");
        let err = uploads.files(Some("u1"), &named).expect_err("incomplete");
        assert!(err.contains("has 7 bytes, 15 expected"), "{err}");
        uploads
            .put("runner", "u1", 0, 7, total, &content.bytes[7..])
            .expect("second chunk");
        let files = uploads.files(Some("u1"), &named).expect("complete");
        assert_eq!(files[0].bytes, content.bytes);
        let err = uploads
            .files(Some("u1"), &named)
            .expect_err("taken already");
        assert!(err.contains("no upload u1"), "{err}");
    }
}
