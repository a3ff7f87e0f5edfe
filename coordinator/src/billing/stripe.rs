//! The Stripe client: `POST {base}/v1/billing/meter_events`, one meter event per call,
//! form-encoded, with the secret key as a Bearer token.
//!
//! It shares the provider clients' HTTP habits (`provider::http`): the key is an [`ApiKey`] that
//! prints as `***` and travels only in a sensitive header, retries follow a [`RetryPolicy`]
//! (exponential backoff with jitter, bounded in attempts and in total time, `Retry-After`
//! honoured), and error texts are short excerpts. What is Stripe's own: 409 (a request with the
//! same idempotency key in flight), 429 and 5xx are retried, and so is anything Stripe marks
//! `Stripe-Should-Retry: true`; every attempt of one call carries the same `Idempotency-Key`, so
//! a retry after a lost answer cannot count twice. 401/403 end the whole push (every event would
//! fail the same way); any other 4xx is one event's refusal, with Stripe's message.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use tokio::time::Instant;
use url::Url;

use crate::provider::http::{excerpt, parse_retry_after};
use crate::provider::{ApiKey, RetryPolicy};

/// One meter event as it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterEvent {
    pub event_name: String,
    pub customer: String,
    /// The value as Stripe reads it: a decimal number in text.
    pub value: String,
    /// Kiln's identifier (`kiln-{account}-{day}-{metric}`); Stripe refuses a second event with
    /// it within its deduplication window.
    pub identifier: String,
    /// Seconds since the Unix epoch.
    pub timestamp: i64,
}

impl MeterEvent {
    /// The form body (`application/x-www-form-urlencoded`), fields in the order Stripe
    /// documents them.
    fn form(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("event_name", &self.event_name)
            .append_pair("payload[stripe_customer_id]", &self.customer)
            .append_pair("payload[value]", &self.value)
            .append_pair("identifier", &self.identifier)
            .append_pair("timestamp", &self.timestamp.to_string())
            .finish()
    }
}

/// What Stripe answered for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    Accepted,
    /// Refused for this event alone (a customer that does not exist, a value or timestamp
    /// out of range): Stripe's status and message.
    Refused {
        status: u16,
        message: String,
        /// The parameter Stripe named, if any (`identifier` for an identifier it already has).
        param: Option<String>,
    },
}

/// A failure that is not one event's: the push stops.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("Stripe refused the secret key (HTTP {status}): {message}")]
    Auth { status: u16, message: String },
    #[error("Stripe could not be reached or kept failing: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Setup(String),
}

/// Stripe's error body: `{"error": {"type", "code", "message", "param"}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<String>,
}

/// The parameter Stripe's error body names, if it is one and names one.
pub fn error_param(body: &str) -> Option<String> {
    serde_json::from_str::<ErrorBody>(body)
        .ok()
        .and_then(|b| b.error.param)
}

/// Stripe's message from an error body, `type/code (param): message`, or an excerpt of a body
/// that is not one.
pub fn error_message(body: &str) -> String {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => {
            let mut text = String::new();
            for part in [&error.kind, &error.code].into_iter().flatten() {
                if !text.is_empty() {
                    text.push('/');
                }
                text.push_str(part);
            }
            if let Some(param) = &error.param {
                text.push_str(&format!(" ({param})"));
            }
            if let Some(message) = &error.message {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(message);
            }
            excerpt(&text, 300)
        }
        Err(_) => excerpt(body, 300),
    }
}

/// The client. One per push; cheap to build.
pub struct StripeClient {
    http: reqwest::Client,
    key: ApiKey,
    url: Url,
    retry: RetryPolicy,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("url", &self.url.as_str())
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Retries for a push: a few attempts within a minute per event.
pub fn default_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        base_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(20),
        deadline: Duration::from_secs(60),
        request_timeout: Duration::from_secs(30),
    }
}

impl StripeClient {
    /// A client for the meter events endpoint under `base` (a base with a path keeps it).
    pub fn new(base: &Url, key: ApiKey, retry: RetryPolicy) -> Result<StripeClient, StripeError> {
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(StripeError::Setup(format!(
                "the Stripe base URL {base} must be http(s) with a host"
            )));
        }
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|()| {
                StripeError::Setup(format!("the Stripe base URL {base} cannot take a path"))
            })?
            .pop_if_empty()
            .extend(["v1", "billing", "meter_events"]);
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StripeError::Setup(format!("cannot build an HTTP client: {e}")))?;
        Ok(StripeClient {
            http,
            key,
            url,
            retry,
        })
    }

    /// Sends one event, retrying what may be retried. `idempotency_key` is the same for every
    /// attempt of this call.
    pub async fn send(
        &self,
        event: &MeterEvent,
        idempotency_key: &str,
    ) -> Result<Sent, StripeError> {
        let auth = self.key.header().ok_or_else(|| {
            StripeError::Setup("the Stripe key cannot be sent in a header".into())
        })?;
        let idem = HeaderValue::from_str(idempotency_key).map_err(|_| {
            StripeError::Setup(format!("{idempotency_key:?} cannot be an idempotency key"))
        })?;
        let form = event.form();
        let retry = &self.retry;
        let deadline = Instant::now() + retry.deadline;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let result = self
                .http
                .post(self.url.clone())
                .header(AUTHORIZATION, auth.clone())
                .header("Idempotency-Key", idem.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form.clone())
                .timeout(retry.request_timeout.min(left))
                .send()
                .await;
            let (problem, retry_after) = match result {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let should_retry = response
                        .headers()
                        .get("Stripe-Should-Retry")
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.eq_ignore_ascii_case("true"));
                    let body = response.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(Sent::Accepted);
                    }
                    let message = error_message(&body);
                    let retryable = should_retry.unwrap_or(
                        matches!(status, StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS)
                            || status.is_server_error(),
                    );
                    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
                        return Err(StripeError::Auth {
                            status: status.as_u16(),
                            message,
                        });
                    }
                    if !retryable {
                        return Ok(Sent::Refused {
                            status: status.as_u16(),
                            message,
                            param: error_param(&body),
                        });
                    }
                    (format!("HTTP {status}: {message}"), retry_after)
                }
                Err(e) => (e.without_url().to_string(), None),
            };
            let wait = retry
                .backoff(attempt, rand::random::<f64>())
                .max(retry_after.unwrap_or_default());
            if attempt >= retry.max_attempts || Instant::now() + wait > deadline {
                return Err(StripeError::Unavailable(format!(
                    "{} after {attempt} attempts: {problem}",
                    event.identifier
                )));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_error_bodies_become_one_line() {
        let body = r#"{"error":{"code":"resource_missing","message":"No such customer: 'cus_X'","param":"payload[stripe_customer_id]","type":"invalid_request_error"}}"#;
        assert_eq!(
            error_message(body),
            "invalid_request_error/resource_missing (payload[stripe_customer_id]): No such customer: 'cus_X'"
        );
        assert_eq!(error_message("<html>\nbad gateway"), "<html> bad gateway");
    }

    #[test]
    fn the_endpoint_keeps_the_base_path_and_the_key_stays_hidden() {
        let key = ApiKey::parse("sk_test_secret".into()).expect("key");
        let client = StripeClient::new(
            &Url::parse("http://127.0.0.1:9/stripe/").expect("url"),
            key,
            default_retry(),
        )
        .expect("client");
        assert_eq!(
            client.url.as_str(),
            "http://127.0.0.1:9/stripe/v1/billing/meter_events"
        );
        assert!(!format!("{client:?}").contains("sk_test_secret"));
        let key = ApiKey::parse("sk".into()).expect("key");
        assert!(
            StripeClient::new(&Url::parse("file:///x").expect("url"), key, default_retry())
                .is_err()
        );
    }
}
