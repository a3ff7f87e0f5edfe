//! Job webhooks: on a job's final status the owner POSTs the job JSON (the API's `JobView`) to
//! the job's `webhook`, signed in the Standard Webhooks style.
//!
//! - [`sign`]: the `webhook-signature` HMAC and the secret's forms.
//! - [`target`]: which targets are allowed (checked at submission and at every connection).
//! - [`worker`]: the delivery worker that sends the outbox's due rows (`crate::queue::outbox`)
//!   with a timeout, bounded concurrency and exponential backoff with jitter.
//!
//! The outbox row is written in the transaction that records the final status, so a webhook
//! is never lost to a crash; it may be sent more than once (a crash between the send and its
//! record, or an adopter sending what the dead owner already sent), and receivers dedupe by
//! `webhook-id`. Nothing here ever delays a job, a cancel or the shutdown.

pub mod sign;
pub mod target;
pub mod worker;

use std::time::Duration;

pub use sign::Secret;
pub use worker::{WebhookWorker, backoff};

/// How the delivery worker works, from `[webhooks]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub secret: Secret,
    /// Connect to private and loopback targets too.
    pub allow_private: bool,
    /// Per request, connect included.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Attempts before a webhook is abandoned.
    pub max_attempts: u32,
    /// The wait after the first failure; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Delivered and abandoned rows (and dormant replica copies) are deleted after this.
    pub retention: Duration,
    /// How often the worker looks for due rows it was not told about (adopted copies).
    pub poll: Duration,
}
