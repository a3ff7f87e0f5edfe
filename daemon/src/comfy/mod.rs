//! ComfyUI: the simulator, the client, the workflow validator, the supervisor and the executor.
//!
//! Kiln sends ComfyUI one prompt at a time; Kiln's own queue is the source of truth, because
//! ComfyUI keeps its queue and history only in memory and loses both when it restarts.

pub mod client;
pub mod executor;
pub mod sim;
pub mod supervisor;
pub mod types;
pub mod workflow;

/// What the executor needs from whatever runs the ComfyUI process: a way to replace a ComfyUI
/// that did not honour an interrupt, and a count of restarts so that a prompt lost to a restart
/// is noticed. The supervisor implements it; tests may implement it over a simulator they
/// started themselves.
#[async_trait::async_trait]
pub trait ComfyControl: Send + Sync + 'static {
    /// Kill the ComfyUI process group and start a new one; resolves once the kill is done (the
    /// new process may still be starting).
    async fn restart(&self, reason: &str);
    /// How many times ComfyUI has been (re)started; changes whenever a restart loses its queue.
    fn generation(&self) -> u64;
}
