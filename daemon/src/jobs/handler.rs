//! Answers other members' job requests (see [`crate::peer::messages`]).
//!
//! Every answer is safe to give twice: the caller may have missed the first. Nothing a peer
//! sends is trusted beyond its certificate: names, sizes and JSON are checked, and a bad
//! request gets `bad_request` with the reason, never a panic.

use std::sync::{Arc, Weak};

use async_trait::async_trait;

use super::{
    Inner, job_from_wire, keys, new_job_from_wire, outcome_of, store_refusal, transfer, wire_job,
    wire_refusal,
};
use crate::api::ApiError;
use crate::peer::messages::{JobRequest, JobResponse, KeyAnswer, KeyLookup, MAX_KEY_LOOKUPS};
use crate::peer::{Caller, Handler, PeerError, PeerErrorKind};
use crate::protocol::{ErrorCode, JobStatus};
use crate::queue::{Job, JobRole, Outcome, Quota, StoreError};

/// The peer job protocol's handler. Holds the job layer weakly: a request that arrives while
/// the node stops is answered `internal`.
pub(crate) struct JobHandler {
    inner: Weak<Inner>,
}

impl JobHandler {
    pub(crate) fn new(inner: Weak<Inner>) -> JobHandler {
        JobHandler { inner }
    }
}

fn bad(message: impl Into<String>) -> PeerError {
    PeerError::new(PeerErrorKind::BadRequest, message)
}

fn internal(error: impl std::fmt::Display) -> PeerError {
    PeerError::new(PeerErrorKind::Internal, error.to_string())
}

#[async_trait]
impl Handler<JobRequest, JobResponse> for JobHandler {
    async fn handle(&self, from: &Caller, req: JobRequest) -> Result<JobResponse, PeerError> {
        let Some(inner) = self.inner.upgrade() else {
            return Err(internal("the node is stopping"));
        };
        handle(&inner, from, req).await
    }
}

async fn handle(
    inner: &Arc<Inner>,
    from: &Caller,
    req: JobRequest,
) -> Result<JobResponse, PeerError> {
    let peer = from.peer_name.as_ref();
    // Until it knows which of its jobs were adopted while it was away, a node that just
    // started neither applies results nor renews leases: the job may be another's now.
    if !inner.reconciled.is_cancelled()
        && matches!(req, JobRequest::Finish { .. } | JobRequest::Renew { .. })
    {
        return Err(PeerError::new(
            PeerErrorKind::Overloaded,
            "this member is starting; try again shortly",
        ));
    }
    match req {
        JobRequest::Submit {
            job,
            sent_at_ms,
            quota_per_day,
            quota_per_month,
            fair_use_images,
        } => {
            let new = new_job_from_wire(*job).map_err(bad)?;
            // The sender gave up on it and may have stored it with another member. A second
            // of slack for clocks that differ.
            let age_ms = crate::node::unix_ms() - sent_at_ms;
            let limit_ms = i64::try_from(super::SUBMIT_DEADLINE.as_millis()).unwrap_or(i64::MAX);
            if sent_at_ms > 0 && age_ms > limit_ms + 1000 {
                tracing::warn!(job = %new.id, from = %peer, age_ms, "refused a forwarded submission that arrived too late");
                return Err(PeerError::new(
                    PeerErrorKind::DeadlineExceeded,
                    format!("the submission arrived {age_ms} ms after it was sent"),
                ));
            }
            if inner.draining.is_cancelled() {
                let refusal = ApiError::new(
                    ErrorCode::Unavailable,
                    "this member is draining and takes no new jobs",
                )
                .retry_after(1);
                return Ok(JobResponse::Refused(wire_refusal(&refusal)));
            }
            let ranked = inner.ranked(&new.account);
            let quota = Quota {
                per_day: quota_per_day,
                per_month: quota_per_month,
                fair_use_images,
            };
            match inner.submit_as_owner(new, quota, &ranked).await {
                Ok((view, created)) => Ok(JobResponse::Submitted {
                    view: serde_json::to_string(&view).map_err(internal)?,
                    created,
                }),
                Err(error) => Ok(JobResponse::Refused(wire_refusal(&error))),
            }
        }
        JobRequest::Replicate {
            job,
            upload,
            outputs,
        } => {
            let job = job_from_wire(*job, Some(peer)).map_err(bad)?;
            let stored = !outputs.is_empty() && outputs.iter().all(|o| o.key.is_some());
            let files = if stored {
                Vec::new()
            } else {
                inner
                    .uploads
                    .files(upload.as_deref(), &outputs)
                    .map_err(bad)?
            };
            let put = if stored {
                let objects = super::outputs::stored_outputs(&outputs);
                inner.store.put_replica_stored(&job, peer, objects).await
            } else {
                inner.store.put_replica(&job, peer, files.clone()).await
            };
            match put {
                Ok(_) => Ok(JobResponse::Done),
                Err(StoreError::Conflict { .. }) if job.status.is_final() => {
                    // This node took the job over from the sender, whose runner has since
                    // finished it: that is the job's final result (unless one came first).
                    let files = if stored {
                        // The sender's objects: read them back, to be stored as ours.
                        super::outputs::read_objects(inner, &outputs)
                            .await
                            .map_err(internal)?
                    } else {
                        files
                    };
                    let outcome = match job.status {
                        JobStatus::Succeeded => Outcome::Succeeded { outputs: files },
                        JobStatus::Failed => {
                            Outcome::Failed(job.error.clone().unwrap_or_else(|| {
                                crate::protocol::JobError {
                                    code: "failed".to_string(),
                                    message: "the job failed on its previous owner".to_string(),
                                    details: None,
                                }
                            }))
                        }
                        _ => Outcome::Cancelled,
                    };
                    let applied = inner
                        .finish(peer, &job.id, job.attempts, outcome)
                        .await
                        .map_err(internal)?;
                    tracing::info!(job = %job.id, from = %peer, applied,
                        "a member that handed this job over reported its final result");
                    Ok(JobResponse::Done)
                }
                Err(StoreError::Conflict { .. }) => {
                    tracing::debug!(job = %job.id, owner = %peer,
                        "a member sent a copy of a job this node owns; kept ours");
                    Ok(JobResponse::Done)
                }
                Err(StoreError::Invalid(message)) => Err(bad(message)),
                Err(error) => Err(internal(error)),
            }
        }
        JobRequest::Lease { min_tier } => {
            let job = inner.lease_to(peer, min_tier).await.map_err(internal)?;
            {
                // Only an idle runner asks: one sent away empty-handed takes the next nudge
                // as idle, even while gossip still shows it busy.
                let mut asked_idle = super::lock(&inner.asked_idle);
                if job.is_some() {
                    asked_idle.remove(peer);
                } else {
                    asked_idle.insert(peer.to_string(), tokio::time::Instant::now());
                }
            }
            let job = match job {
                Some(job) => Some(Box::new(wire_job(&job).map_err(internal)?)),
                None => None,
            };
            Ok(JobResponse::Leased {
                job,
                lease_ms: u64::try_from(inner.settings.lease.as_millis()).unwrap_or(u64::MAX),
            })
        }
        JobRequest::Renew { job_id, attempt } => {
            let (keep, cancelled, owner) = inner.renew(peer, &job_id, attempt).await;
            Ok(JobResponse::Renewed {
                keep,
                cancelled,
                owner,
            })
        }
        JobRequest::Progress {
            job_id,
            attempt,
            progress,
        } => {
            let holds = super::lock(&inner.leases)
                .get(&job_id)
                .is_some_and(|e| e.holder == peer && e.attempt == attempt);
            if holds {
                inner.live.set_progress(&job_id, progress);
            }
            Ok(JobResponse::Done)
        }
        JobRequest::PutOutput {
            upload,
            index,
            offset,
            total,
            data,
        } => {
            inner
                .uploads
                .put(peer, &upload, index, offset, total, &data)
                .map_err(bad)?;
            Ok(JobResponse::Done)
        }
        JobRequest::Finish {
            job_id,
            attempt,
            result,
            upload,
        } => {
            let files = match &result {
                crate::peer::messages::WireResult::Succeeded { outputs } => inner
                    .uploads
                    .files(upload.as_deref(), outputs)
                    .map_err(bad)?,
                _ => Vec::new(),
            };
            match inner
                .finish(peer, &job_id, attempt, outcome_of(result, files))
                .await
            {
                Ok(applied) => Ok(JobResponse::Finished { applied }),
                Err(StoreError::NotFound(_)) | Err(StoreError::NotOwner { .. }) => Err(
                    PeerError::new(PeerErrorKind::NotFound, format!("no owned job {job_id}")),
                ),
                Err(StoreError::Invalid(message)) => Err(bad(message)),
                Err(error) => Err(internal(error)),
            }
        }
        JobRequest::Get {
            id,
            account,
            any_role,
        } => {
            let job = inner.store.get(&id).await.map_err(internal)?;
            let job =
                job.filter(|j| j.account == account && (any_role || j.role == JobRole::Owner));
            let view = match job {
                Some(job) => Some(
                    serde_json::to_string(&inner.view(&job).await.map_err(internal)?)
                        .map_err(internal)?,
                ),
                None => None,
            };
            Ok(JobResponse::Job { view })
        }
        JobRequest::FindKey {
            account,
            key,
            body_hash,
        } => {
            let lookup = KeyLookup {
                account,
                key: key.clone(),
                body_hash,
            };
            let answer = answer_keys(inner, from, vec![lookup]).await?.pop();
            Ok(match answer {
                Some(KeyAnswer::Same { view }) => JobResponse::Submitted {
                    view,
                    created: false,
                },
                Some(KeyAnswer::Conflict(refusal)) => JobResponse::Refused(refusal),
                // A member before protocol 1.3 knows no "in progress": it hears the refusal
                // its client is to retry.
                Some(KeyAnswer::InProgress) => {
                    JobResponse::Refused(wire_refusal(&super::key_in_progress(&key, &inner.name)))
                }
                Some(KeyAnswer::Unknown) | None => JobResponse::Job { view: None },
            })
        }
        JobRequest::FindKeys { lookups } => {
            if lookups.len() > MAX_KEY_LOOKUPS {
                return Err(bad(format!(
                    "{} key lookups in one request; at most {MAX_KEY_LOOKUPS}",
                    lookups.len()
                )));
            }
            let answers = answer_keys(inner, from, lookups).await?;
            Ok(JobResponse::Keys { answers })
        }
        JobRequest::List {
            account,
            status,
            limit,
        } => {
            let limit = limit.clamp(1, 500) as usize;
            let jobs = inner
                .store
                .list(&account, status, limit)
                .await
                .map_err(internal)?;
            let mut views = Vec::new();
            for job in jobs.iter().filter(|j| j.role == JobRole::Owner) {
                let view = inner.view(job).await.map_err(internal)?;
                views.push(serde_json::to_string(&view).map_err(internal)?);
            }
            Ok(JobResponse::Jobs { views })
        }
        JobRequest::Usage {
            account,
            from_day,
            to_day,
        } => {
            let days = inner
                .store
                .usage_days(&account, from_day, to_day)
                .await
                .map_err(internal)?;
            Ok(JobResponse::Usage {
                rows: days
                    .iter()
                    .map(|u| super::wire_usage(&account, u))
                    .collect(),
            })
        }
        JobRequest::OwnerUsage { from_day, to_day } => {
            let rows = inner
                .store
                .owner_usage(from_day, to_day)
                .await
                .map_err(internal)?;
            Ok(JobResponse::Usage {
                rows: rows
                    .iter()
                    .map(|r| super::wire_usage(&r.account, &r.usage))
                    .collect(),
            })
        }
        JobRequest::Cancel { id, account } => {
            let owned = matches!(inner.store.get(&id).await.map_err(internal)?,
                Some(job) if job.role == JobRole::Owner && job.account == account);
            if !owned {
                let refusal = ApiError::not_found(format!("no job {id:?} for this account"));
                return Ok(JobResponse::Refused(wire_refusal(&refusal)));
            }
            match inner.cancel_owned(&account, &id).await {
                Ok(view) => Ok(JobResponse::Job {
                    view: Some(serde_json::to_string(&view).map_err(internal)?),
                }),
                Err(error) => Ok(JobResponse::Refused(wire_refusal(&error))),
            }
        }
        JobRequest::DeleteOutputs { id, account } => {
            let owned = match inner.store.get(&id).await.map_err(internal)? {
                Some(job) if job.role == JobRole::Owner && job.account == account => Some(job),
                _ => None,
            };
            let Some(job) = owned else {
                let refusal = ApiError::not_found(format!("no job {id:?} for this account"));
                return Ok(JobResponse::Refused(wire_refusal(&refusal)));
            };
            match inner.delete_outputs_owned(&job).await {
                Ok(()) => Ok(JobResponse::Done),
                Err(error) => Ok(JobResponse::Refused(wire_refusal(&error))),
            }
        }
        JobRequest::DropOutputs {
            job_id,
            reason,
            at_ms,
        } => match inner
            .drop_outputs_of_copy(peer, &job_id, reason, at_ms)
            .await
        {
            Ok(()) => Ok(JobResponse::Done),
            Err(error) => Ok(JobResponse::Refused(wire_refusal(&error))),
        },
        JobRequest::Interrupt { job_id } => {
            if !inner.live.cancel_if_running(&job_id) {
                tracing::debug!(job = %job_id, owner = %peer, "asked to interrupt a job that does not run here");
            }
            Ok(JobResponse::Done)
        }
        JobRequest::ReadOutput {
            id,
            account,
            index,
            offset,
        } => transfer::read_piece(inner, &id, &account, index, offset)
            .await
            .map_err(|e| PeerError::new(PeerErrorKind::NotFound, e)),
        JobRequest::TakeOver => {
            let adopted = inner.adopt_from(peer).await.map_err(internal)?;
            tracing::info!(from = %peer, jobs = adopted, "took over the jobs of a leaving member");
            Ok(JobResponse::Done)
        }
        JobRequest::Whose { ids } => {
            if ids.len() > 10_000 {
                return Err(bad("at most 10000 ids per question"));
            }
            let mut owned = Vec::new();
            for id in ids {
                if matches!(inner.store.get(&id).await.map_err(internal)?,
                    Some(job) if job.role == JobRole::Owner)
                {
                    owned.push(id);
                }
            }
            Ok(JobResponse::Owned { ids: owned })
        }
        JobRequest::Refresh { ids } => {
            if ids.len() > 10_000 {
                return Err(bad("at most 10000 ids per question"));
            }
            let mut stale = Vec::new();
            for id in ids {
                match inner.store.get(&id).await.map_err(internal)? {
                    Some(job)
                        if job.role == JobRole::Owner && job.replica.as_deref() == Some(peer) =>
                    {
                        inner.sync_replica(&job).await;
                    }
                    _ => stale.push(id),
                }
            }
            Ok(JobResponse::Refreshed { stale })
        }
        JobRequest::Nudge { tier } => {
            super::lock(&inner.hints).insert(peer.to_string(), (tier, tokio::time::Instant::now()));
            inner.pull.notify_one();
            Ok(JobResponse::Done)
        }
        JobRequest::Holds { job_id, attempt } => Ok(JobResponse::Holds {
            held: inner.holds(&job_id, attempt),
        }),
        JobRequest::Disown { ids } => {
            if ids.len() > 10_000 {
                return Err(bad("at most 10000 ids per question"));
            }
            let mut dropped = Vec::new();
            for id in &ids {
                if inner.store.drop_copy(id, peer).await.map_err(internal)? {
                    dropped.push(id.as_str());
                }
            }
            if !dropped.is_empty() {
                tracing::info!(owner = %peer, copies = ?dropped, "forgot copies their owner keeps elsewhere now");
            }
            Ok(JobResponse::Done)
        }
    }
}

/// What this node knows of each lookup's key, in order, read from its store in one read. A
/// key it does not know is one `from` is about to store: `from` is remembered as its asker.
async fn answer_keys(
    inner: &Arc<Inner>,
    from: &Caller,
    lookups: Vec<KeyLookup>,
) -> Result<Vec<KeyAnswer>, PeerError> {
    // Whether a key is being stored is looked at before the store is read: a submission that
    // commits in between is then found in the store.
    let storing: Vec<bool> = lookups
        .iter()
        .map(|l| inner.storing_key(&l.account, &l.key))
        .collect();
    let keys = lookups
        .iter()
        .map(|l| (l.account.clone(), l.key.clone()))
        .collect();
    let found = inner.store.find_keys(keys).await.map_err(internal)?;
    let mut answers = Vec::with_capacity(lookups.len());
    for ((lookup, job), storing) in lookups.into_iter().zip(found).zip(storing) {
        let asked = (lookup.account.clone(), lookup.key.clone());
        let answer = key_answer(inner, lookup, job, storing).await?;
        if answer == KeyAnswer::Unknown {
            let asker = keys::Asker {
                name: from.peer_name.clone(),
                addr: from.addr,
            };
            inner.key_askers.remember(&asked.0, &asked.1, asker);
        }
        answers.push(answer);
    }
    Ok(answers)
}

/// What this store's `job`, found under `lookup`'s key, says to an owner about to store a
/// keyed submission: the same body names the job, another body is a conflict; with no job, a
/// submission this node is `storing` with the key is in progress.
async fn key_answer(
    inner: &Arc<Inner>,
    lookup: KeyLookup,
    job: Option<Job>,
    storing: bool,
) -> Result<KeyAnswer, PeerError> {
    let Some(job) = job.filter(|j| j.account == lookup.account) else {
        return Ok(if storing {
            KeyAnswer::InProgress
        } else {
            KeyAnswer::Unknown
        });
    };
    if job.body_hash != lookup.body_hash {
        let refusal = store_refusal(
            StoreError::IdempotencyConflict {
                key: lookup.key,
                job_id: job.id.clone(),
            },
            job.tier,
        );
        return Ok(KeyAnswer::Conflict(wire_refusal(&refusal)));
    }
    let view =
        serde_json::to_string(&inner.view(&job).await.map_err(internal)?).map_err(internal)?;
    Ok(KeyAnswer::Same { view })
}
