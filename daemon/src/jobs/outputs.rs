//! Deleting a job's outputs on request (`DELETE /v1/jobs/{id}/outputs`), wherever the job is
//! owned, and the `gone` answer for outputs that were deleted.
//!
//! The request reaches the owner the way a cancel does (a node without the job forwards it).
//! The owner deletes its files and records the deletion, then tells the member holding the
//! replica to delete its copies too (`DropOutputs`). A replica that cannot be reached keeps its
//! copies until its own retention sweeper deletes them; the owner's answer does not wait on it.

use serde_json::json;

use super::{Inner, JobRole, SHORT_DEADLINE, not_found, refusal_error};
use crate::api::ApiError;
use crate::peer::messages::{JobRequest, JobResponse, WireOutput};
use crate::protocol::{DeleteReason, ErrorCode, rfc3339_ms};
use crate::queue::{Job, NewOutput, Output, StoreError};

/// The outputs a replica records for objects its owner put in the bucket (same keys).
pub(crate) fn stored_outputs(outputs: &[WireOutput]) -> Vec<Output> {
    outputs
        .iter()
        .map(|o| Output {
            index: o.index,
            filename: o.filename.clone(),
            content_type: o.content_type.clone(),
            bytes: o.bytes,
            path: std::path::PathBuf::new(),
            sha256: o.sha256.clone(),
            watermark: o.watermark.clone(),
            key: o.key.clone(),
            inline: false,
        })
        .collect()
}

/// The contents of outputs kept as objects, read from the bucket.
pub(crate) async fn read_objects(
    inner: &Inner,
    outputs: &[WireOutput],
) -> Result<Vec<NewOutput>, String> {
    let objects = inner
        .store
        .objects()
        .ok_or("the outputs are objects in a bucket, but [storage] names none here")?;
    let mut out = Vec::with_capacity(outputs.len());
    for o in outputs {
        let key = o.key.as_deref().ok_or("an output without its object key")?;
        out.push(NewOutput {
            filename: o.filename.clone(),
            content_type: o.content_type.clone(),
            bytes: objects.get(key).await?,
            watermark: o.watermark.clone(),
        });
    }
    Ok(out)
}

/// The 410 answer for output `index` of `job`, deleted at `at_ms` for `reason`.
pub(crate) fn gone(job: &str, index: u32, (at_ms, reason): (i64, DeleteReason)) -> ApiError {
    let why = match reason {
        DeleteReason::Retention => "its tier's retention period passed",
        DeleteReason::User => "the account deleted the job's outputs",
    };
    let at = rfc3339_ms(at_ms);
    ApiError::new(
        ErrorCode::Gone,
        format!("output {index} of job {job} was deleted at {at}: {why}"),
    )
    .details(json!({"job_id": job, "index": index, "reason": reason, "deleted_at": at}))
}

impl Inner {
    /// Deletes the outputs of `id`, wherever it is owned. Answers `Ok` when they are deleted
    /// (also when they already were).
    pub(crate) async fn delete_outputs(&self, account: &str, id: &str) -> Result<(), ApiError> {
        let local = self.store.get(id).await.map_err(ApiError::internal)?;
        let local = local.filter(|job| job.account == account);
        if let Some(job) = &local
            && job.role == JobRole::Owner
        {
            return self.delete_outputs_owned(job).await;
        }
        for name in self.owner_candidates(account, local.as_ref()) {
            let Some(addr) = self.addr_of(&name) else {
                continue;
            };
            let request = JobRequest::DeleteOutputs {
                id: id.to_string(),
                account: account.to_string(),
            };
            match self.request(addr, request, SHORT_DEADLINE * 3).await {
                Ok(JobResponse::Done) => return Ok(()),
                Ok(JobResponse::Refused(refusal)) if refusal.code != ErrorCode::NotFound => {
                    return Err(refusal_error(refusal));
                }
                Ok(_) => {}
                Err(error) => tracing::debug!(member = %name, %error, "deleting outputs"),
            }
        }
        Err(super::no_owner_answered(id, local.is_some()))
    }

    /// Deletes the outputs of a job this node owns, then those of its replica.
    pub(crate) async fn delete_outputs_owned(&self, job: &Job) -> Result<(), ApiError> {
        let at_ms = self.store.now_ms();
        let deleted = self
            .results
            .delete_outputs(&job.id, DeleteReason::User, at_ms)
            .await
            .map_err(|error| match error {
                StoreError::Conflict { id, status } => ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "job {id} is {status}; only the outputs of a finished job can be deleted"
                    ),
                )
                .details(json!({"status": status})),
                StoreError::NotFound(id) => not_found(&id),
                other => ApiError::internal(other),
            })?;
        let Some((at_ms, reason)) = deleted.outputs_deleted else {
            return Err(ApiError::internal(format!(
                "job {}: the deletion of its outputs was not recorded",
                job.id
            )));
        };
        if let Some(replica) = deleted.replica.as_deref()
            && replica != self.name
        {
            self.drop_replica_outputs(replica, &job.id, reason, at_ms)
                .await;
        }
        Ok(())
    }

    /// Tells the member holding a job's replica to delete its copies of the outputs.
    async fn drop_replica_outputs(
        &self,
        replica: &str,
        id: &str,
        reason: DeleteReason,
        at_ms: i64,
    ) {
        let Some(addr) = self.addr_of(replica) else {
            tracing::warn!(job = %id, %replica, "the replica has no known address; its copies of the outputs stay until its retention deletes them");
            return;
        };
        let request = JobRequest::DropOutputs {
            job_id: id.to_string(),
            reason,
            at_ms,
        };
        match self.request(addr, request, SHORT_DEADLINE * 3).await {
            Ok(JobResponse::Done) => {}
            Ok(other) => {
                tracing::warn!(job = %id, %replica, answer = ?other, "the replica did not delete its copies of the outputs")
            }
            Err(error) => {
                tracing::warn!(job = %id, %replica, %error, "the replica did not delete its copies of the outputs")
            }
        }
    }

    /// A replica's side of `DropOutputs`: deletes the copies of a job `owner` owns.
    pub(crate) async fn drop_outputs_of_copy(
        &self,
        owner: &str,
        id: &str,
        reason: DeleteReason,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let job = self
            .store
            .get(id)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| not_found(id))?;
        if job.role != JobRole::Replica || job.owner.as_deref() != Some(owner) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("this member keeps no copy of job {id} for {owner}"),
            ));
        }
        self.results
            .delete_outputs(id, reason, at_ms)
            .await
            .map(|_| ())
            .map_err(|error| match error {
                StoreError::Conflict { id, status } => ApiError::new(
                    ErrorCode::Conflict,
                    format!("the copy of job {id} is {status} here, not finished"),
                ),
                other => ApiError::internal(other),
            })
    }
}
