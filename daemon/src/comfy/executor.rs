//! Runs one prompt on a ComfyUI that something else supervises, from submission to downloaded
//! outputs, within a time limit and a caller's cancellation.
//!
//! Stopping a prompt (timeout or cancel) is interrupt first; ComfyUI's interrupt is cooperative
//! and cannot stop one long torch operation, so when it has not landed within
//! `interrupt_grace` the executor asks [`ComfyControl::restart`] for a hard stop. A change of
//! [`ComfyControl::generation`] during the run means ComfyUI restarted and lost the prompt.
//!
//! This module never retries a prompt and never stores anything: it reports one
//! [`RunOutcome`], and the job runner decides what happens next.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ComfyControl;
use super::client::{ComfyClient, ComfyError, Finished};
use super::types::{FileType, NodeError, OutputRef};

pub use super::client::RunEvent;

/// Limits of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// From the moment the prompt is posted to its end (downloads not included).
    pub timeout: Duration,
    /// How long an interrupt may take to land before ComfyUI is restarted.
    pub interrupt_grace: Duration,
    /// How often [`ComfyControl::generation`] is checked.
    pub generation_check: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(600),
            interrupt_grace: Duration::from_secs(15),
            generation_check: Duration::from_millis(250),
        }
    }
}

/// A result file with its bytes, downloaded through `/view`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFile {
    pub node_id: String,
    /// The ui key the node listed it under: `images`, `gifs`, `audio`, `files`, ...
    pub kind: String,
    pub filename: String,
    pub subfolder: String,
    pub file_type: FileType,
    pub bytes: Bytes,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    /// The prompt ran to its end; `outputs` hold the result files with their bytes.
    Succeeded {
        outputs: Vec<OutputFile>,
        /// Preview files (`type` temp, e.g. PreviewImage), listed but not downloaded: they are
        /// not results.
        previews: Vec<OutputRef>,
        /// Output branches ComfyUI dropped as invalid when the prompt was posted.
        partial_node_errors: Vec<NodeError>,
    },
    /// ComfyUI refused or failed the prompt, or could not be reached, or an output could not be
    /// downloaded.
    Failed(ComfyError),
    /// The caller cancelled; `restarted` when the interrupt did not land and ComfyUI was
    /// restarted.
    Interrupted { restarted: bool },
    /// The run exceeded its time limit and was stopped.
    TimedOut { restarted: bool },
    /// ComfyUI restarted during the run and lost the prompt.
    Lost { reason: String },
}

enum Stop {
    Cancel,
    Timeout,
}

impl Stop {
    fn outcome(&self, restarted: bool) -> RunOutcome {
        match self {
            Stop::Cancel => RunOutcome::Interrupted { restarted },
            Stop::Timeout => RunOutcome::TimedOut { restarted },
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Stop::Cancel => "job cancelled and the interrupt did not land",
            Stop::Timeout => "job timeout",
        }
    }
}

/// Runs `workflow` to its end; see the module docs.
///
/// Every run posts under a prompt id of its own (a new random UUID), so no history entry of an
/// earlier run, of this job or another, can be taken for this run's result, and no history read
/// is needed before posting.
///
/// The WebSocket is open before the prompt is posted, so no event is missed: the one the last
/// run kept when it ended normally under the same ComfyUI generation, else a new one. Progress is
/// relayed to `progress` (best effort, never blocking). Output files are downloaded before
/// [`RunOutcome::Succeeded`] is returned.
#[allow(clippy::too_many_arguments)]
pub async fn run_prompt<W: serde::Serialize + ?Sized + Sync>(
    client: &ComfyClient,
    control: &dyn ComfyControl,
    workflow: &W,
    extra_data: Option<&Value>,
    opts: &RunOptions,
    progress: mpsc::Sender<RunEvent>,
    cancel: CancellationToken,
) -> RunOutcome {
    if cancel.is_cancelled() {
        return RunOutcome::Interrupted { restarted: false };
    }
    let generation = control.generation();
    let socket = match client.kept_events(generation) {
        Some(socket) => socket,
        None => tokio::select! {
            s = client.connect_events() => match s {
                Ok(s) => s,
                Err(e) => return RunOutcome::Failed(e),
            },
            _ = cancel.cancelled() => return RunOutcome::Interrupted { restarted: false },
        },
    };
    let prompt_id = uuid::Uuid::new_v4().to_string();
    let prompt_id = prompt_id.as_str();
    let deadline = Instant::now() + opts.timeout;
    let submitted = match client.submit(prompt_id, workflow, extra_data).await {
        Ok(s) => s,
        Err(e) => return RunOutcome::Failed(e),
    };
    tracing::debug!(prompt_id, "prompt posted to ComfyUI");
    if !submitted.node_errors.is_empty() {
        tracing::warn!(
            prompt_id,
            dropped = submitted.node_errors.len(),
            "ComfyUI runs only the valid output branches of this prompt"
        );
    }

    // The socket comes back with the end of the run, to be kept for the next one when the
    // prompt ended on its own (not stopped, not lost).
    let follow = async {
        let mut slot = Some(socket);
        let res = client.follow(prompt_id, &mut slot, &progress).await;
        if matches!(res, Ok(_) | Err(ComfyError::Execution { .. }))
            && let Some(socket) = slot
        {
            client.keep_events(generation, socket);
        }
        res
    };
    tokio::pin!(follow);
    let mut generation_tick = tokio::time::interval(opts.generation_check);
    generation_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let stop = loop {
        tokio::select! {
            res = &mut follow => {
                return finish(client, res, submitted.node_errors).await;
            }
            _ = cancel.cancelled() => break Stop::Cancel,
            _ = tokio::time::sleep_until(deadline) => break Stop::Timeout,
            _ = generation_tick.tick() => {
                if control.generation() != generation {
                    return RunOutcome::Lost {
                        reason: "ComfyUI restarted while the prompt ran".to_owned(),
                    };
                }
            }
        }
    };

    // Stop it: drop it from the pending queue in case it has not started, interrupt it in case it
    // runs, then wait for either to show, or restart ComfyUI.
    tracing::info!(prompt_id, reason = stop.reason(), "stopping the prompt");
    if let Err(e) = client.delete_queued(&[prompt_id]).await {
        tracing::warn!(prompt_id, error = %e, "could not remove the prompt from ComfyUI's queue");
    }
    if let Err(e) = client.interrupt(Some(prompt_id)).await {
        tracing::warn!(prompt_id, error = %e, "could not interrupt the prompt");
    }
    let grace_end = Instant::now() + opts.interrupt_grace;
    loop {
        tokio::select! {
            res = &mut follow => {
                return match res {
                    // It ended on its own before the interrupt landed: report what happened.
                    Ok(_) | Err(ComfyError::Execution { .. }) | Err(ComfyError::Protocol(_)) => {
                        finish(client, res, submitted.node_errors).await
                    }
                    Err(_) => stop.outcome(false),
                };
            }
            _ = tokio::time::sleep_until(grace_end) => {
                tracing::warn!(prompt_id, grace = ?opts.interrupt_grace, "the interrupt did not land; restarting ComfyUI");
                control.restart(stop.reason()).await;
                return stop.outcome(true);
            }
            _ = generation_tick.tick() => {
                if control.generation() != generation {
                    // Restarted by someone else meanwhile: the prompt is gone, which is the stop
                    // that was asked for.
                    return stop.outcome(true);
                }
            }
        }
    }
}

async fn finish(
    client: &ComfyClient,
    res: Result<Finished, ComfyError>,
    partial_node_errors: Vec<NodeError>,
) -> RunOutcome {
    let finished = match res {
        Ok(f) => f,
        Err(ComfyError::Lost { prompt_id }) => {
            return RunOutcome::Lost {
                reason: format!(
                    "ComfyUI has prompt {prompt_id} in neither its queue nor its history"
                ),
            };
        }
        Err(e) => return RunOutcome::Failed(e),
    };
    let mut outputs = Vec::with_capacity(finished.outputs.len());
    for file in finished.outputs {
        match client.view(&file).await {
            Ok(bytes) => outputs.push(OutputFile {
                node_id: file.node_id,
                kind: file.kind,
                filename: file.filename,
                subfolder: file.subfolder,
                file_type: file.file_type,
                bytes,
            }),
            Err(e) => return RunOutcome::Failed(e),
        }
    }
    RunOutcome::Succeeded {
        outputs,
        previews: finished.previews,
        partial_node_errors,
    }
}
