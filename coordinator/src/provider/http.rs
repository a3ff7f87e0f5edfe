//! The one HTTP layer under the Vast.ai, RunPod and Lambda Cloud clients: the API key, pacing
//! (minimum intervals per provider and per endpoint, so the client stays under the provider's
//! limits instead of bouncing off them), retries with exponential backoff and jitter (bounded in
//! attempts and in total time), and the mapping of HTTP failures to [`ProviderError`].
//!
//! All waiting goes through `tokio::time`, so pacing and backoff run under paused time in tests.
//! The API key travels only in the `Authorization` header (marked sensitive); it never appears in
//! a `Debug` print, a log line or an error message.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use url::Url;

use super::{Host, Offer, OfferQuery, Provider, ProviderError, ProviderKind, ProviderResult};

/// An API key. Its `Debug` and `Display` print `***`, so a key inside a struct that is logged or
/// printed stays secret.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Checks that the key can travel in an HTTP header: not empty, no whitespace or control
    /// characters (a key read from a file with its newline is trimmed first).
    pub fn new(provider: ProviderKind, key: String) -> ProviderResult<ApiKey> {
        ApiKey::parse(key).map_err(|problem| ProviderError::Auth {
            provider,
            message: format!("the API key {problem}"),
        })
    }

    /// The same checks for a key that belongs to no provider (Stripe's); the problem comes back
    /// as the end of a sentence ("is empty").
    pub fn parse(key: String) -> Result<ApiKey, &'static str> {
        let key = key.trim().to_owned();
        if key.is_empty() {
            return Err("is empty");
        }
        if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("contains whitespace or control characters");
        }
        Ok(ApiKey(key))
    }

    /// The `Authorization` value, marked sensitive so that HTTP debug output hides it.
    pub(crate) fn header(&self) -> Option<HeaderValue> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0)).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl ApiKey {
    /// The key itself, to hand to a client's constructor (which checks it again).
    pub(crate) fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How hard one logical call tries: attempts, backoff between them and a total deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Total time for one call: pacing waits, attempts and backoff together.
    pub deadline: Duration,
    /// Time for one request and its response body.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            deadline: Duration::from_secs(180),
            request_timeout: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): `base × 2^(attempt-1)`, capped,
    /// then scaled by `jitter` into `[½, 1]` of that ("equal jitter"), so clients that failed
    /// together do not retry together.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self
            .base_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// Minimum intervals between requests: one for every request to the provider (`global`) and
/// one per named endpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pacing {
    pub global: Option<Duration>,
    pub endpoints: Vec<(&'static str, Duration)>,
}

impl Pacing {
    /// No pacing at all (tests against fakes; providers that say when to come back).
    pub fn none() -> Pacing {
        Pacing::default()
    }

    /// Vast.ai's per-endpoint thresholds (providers.md §1.7): create 4.5 s, start/stop 1 s,
    /// show 2 s, list 1 s, destroy 3 s, search 10 per minute.
    pub fn vast() -> Pacing {
        Pacing {
            global: None,
            endpoints: vec![
                ("create", Duration::from_millis(4500)),
                ("manage", Duration::from_secs(1)),
                ("show", Duration::from_secs(2)),
                ("list", Duration::from_secs(1)),
                ("destroy", Duration::from_secs(3)),
                ("search", Duration::from_secs(6)),
            ],
        }
    }

    /// Lambda Cloud: 1 request per second overall, launches 1 per 10 s; each with a small
    /// margin, since Lambda counts from when a request arrived, not from when it was sent.
    pub fn lambda() -> Pacing {
        Pacing {
            global: Some(Duration::from_millis(1100)),
            endpoints: vec![("launch", Duration::from_millis(10_500))],
        }
    }

    /// RunPod publishes no fixed intervals; its 429s carry `Retry-After`, which the retry loop
    /// honours.
    pub fn runpod() -> Pacing {
        Pacing::none()
    }

    fn interval(&self, endpoint: &str) -> Option<Duration> {
        self.endpoints
            .iter()
            .find(|(name, _)| *name == endpoint)
            .map(|(_, d)| *d)
    }
}

const GLOBAL: &str = "";

/// Hands out send times that keep the [`Pacing`] intervals. A slot is reserved under a short
/// synchronous lock and waited for outside it.
#[derive(Debug)]
pub(crate) struct Pacer {
    pacing: Pacing,
    /// Earliest time the next request may go, per endpoint (`GLOBAL` for the provider).
    next: Mutex<HashMap<&'static str, Instant>>,
}

impl Pacer {
    pub(crate) fn new(mut pacing: Pacing) -> Pacer {
        pacing.global = pacing.global.map(|d| d.min(LONGEST));
        for (_, interval) in &mut pacing.endpoints {
            *interval = (*interval).min(LONGEST);
        }
        Pacer {
            pacing,
            next: Mutex::new(HashMap::new()),
        }
    }

    /// Reserves the earliest slot for a request to `endpoint` and returns it, or, when that
    /// slot is after `latest`, reserves nothing and returns `Err(slot)`, so that a caller that
    /// gives up leaves no phantom reservation behind for the others to wait out.
    pub(crate) fn reserve(
        &self,
        endpoint: &'static str,
        latest: Instant,
    ) -> Result<Instant, Instant> {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let mut slot = now;
        for key in [GLOBAL, endpoint] {
            if let Some(at) = next.get(key) {
                slot = slot.max(*at);
            }
        }
        if slot > latest {
            return Err(slot);
        }
        if let Some(global) = self.pacing.global {
            next.insert(GLOBAL, slot + global);
        }
        if let Some(interval) = self.pacing.interval(endpoint) {
            next.insert(endpoint, slot + interval);
        }
        Ok(slot)
    }

    /// Pushes the next slot of `endpoint` to at least `until` (after a 429).
    pub(crate) fn defer(&self, endpoint: &'static str, until: Instant) {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let at = next.entry(endpoint).or_insert(until);
        *at = (*at).max(until);
    }
}

/// One request as a client describes it.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: Method,
    pub url: Url,
    pub body: Option<serde_json::Value>,
    /// The pacing bucket and the name used in errors (`create`, `launch`, …).
    pub endpoint: &'static str,
    /// Whether repeating the request after it may have reached the provider is harmless. A
    /// request that is not (a rent) is retried only when it surely did not arrive (connection
    /// refused) or was refused unprocessed (429); a timeout or 5xx comes back as
    /// [`ProviderError::Transient`] for the caller to look up what happened.
    pub idempotent: bool,
}

impl Request {
    pub(crate) fn new(method: Method, url: Url, endpoint: &'static str) -> Request {
        let idempotent = method != Method::POST;
        Request {
            method,
            url,
            body: None,
            endpoint,
            idempotent,
        }
    }

    pub(crate) fn json(mut self, body: serde_json::Value) -> Request {
        self.body = Some(body);
        self
    }

    pub(crate) fn idempotent(mut self, idempotent: bool) -> Request {
        self.idempotent = idempotent;
        self
    }
}

/// A final answer from the provider (any status that is not retried).
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: String,
    pub retry_after: Option<Duration>,
}

impl Reply {
    /// Parses a successful JSON body; a body that does not parse is [`ProviderError::Invalid`]
    /// (the provider's API changed under us; retrying will not help).
    pub(crate) fn json<T: DeserializeOwned>(
        &self,
        provider: ProviderKind,
        what: &str,
    ) -> ProviderResult<T> {
        serde_json::from_str(&self.body).map_err(|e| ProviderError::Invalid {
            provider,
            message: format!(
                "unexpected {what} response ({e}): {}",
                excerpt(&self.body, 200)
            ),
        })
    }
}

/// The shared client: one per provider client.
#[derive(Debug)]
pub(crate) struct Api {
    pub provider: ProviderKind,
    http: reqwest::Client,
    key: ApiKey,
    pacer: Pacer,
    retry: RetryPolicy,
}

impl Api {
    pub(crate) fn new(
        provider: ProviderKind,
        key: String,
        retry: RetryPolicy,
        pacing: Pacing,
    ) -> ProviderResult<Api> {
        let key = ApiKey::new(provider, key)?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Invalid {
                provider,
                message: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Api {
            provider,
            http,
            key,
            pacer: Pacer::new(pacing),
            retry: validated(retry),
        })
    }

    pub(crate) fn set_retry(&mut self, retry: RetryPolicy) {
        self.retry = validated(retry);
    }

    pub(crate) fn set_pacing(&mut self, pacing: Pacing) {
        self.pacer = Pacer::new(pacing);
    }

    /// Sends `request` with pacing and retries. Returns the provider's final reply (success or
    /// an error status the client maps itself); 429s and 5xx that outlast the attempts or the
    /// deadline, and network failures, come back as errors.
    pub(crate) async fn send(&self, request: Request) -> ProviderResult<Reply> {
        let provider = self.provider;
        let deadline = Instant::now() + self.retry.deadline;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let slot = self
                .pacer
                .reserve(request.endpoint, deadline)
                .map_err(|slot| ProviderError::RateLimited {
                    provider,
                    retry_after: Some(slot.saturating_duration_since(Instant::now())),
                })?;
            tokio::time::sleep_until(slot).await;
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = self.retry.request_timeout.min(left);
            let (retryable, error) = match self.once(&request, timeout).await {
                Ok(reply) => {
                    let status = reply.status;
                    let retry_status = matches!(status.as_u16(), 429 | 502 | 503 | 504);
                    if !retry_status {
                        return Ok(reply);
                    }
                    let is_429 = status == StatusCode::TOO_MANY_REQUESTS;
                    let error = if is_429 {
                        ProviderError::RateLimited {
                            provider,
                            retry_after: reply.retry_after,
                        }
                    } else {
                        ProviderError::Transient {
                            provider,
                            message: format!(
                                "{}: HTTP {status}: {}",
                                request.endpoint,
                                excerpt(&reply.body, 200)
                            ),
                        }
                    };
                    let retryable = is_429 || request.idempotent;
                    if let (true, Some(after)) = (is_429, reply.retry_after) {
                        self.pacer.defer(request.endpoint, Instant::now() + after);
                    }
                    (retryable, (error, reply.retry_after))
                }
                Err(failure) => {
                    let retryable = failure.not_sent || request.idempotent;
                    let error = ProviderError::Transient {
                        provider,
                        message: format!("{}: {}", request.endpoint, failure.message),
                    };
                    (retryable, (error, None))
                }
            };
            let (error, retry_after) = error;
            let wait = self
                .retry
                .backoff(attempt, rand::random::<f64>())
                .max(retry_after.unwrap_or_default());
            let exhausted = attempt >= self.retry.max_attempts || Instant::now() + wait > deadline;
            if !retryable || exhausted {
                // A 429 the provider gave no figure for says to come back after our backoff.
                return Err(match error {
                    ProviderError::RateLimited {
                        provider,
                        retry_after,
                    } => ProviderError::RateLimited {
                        provider,
                        retry_after: retry_after.or(Some(wait)),
                    },
                    other => other,
                });
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn once(&self, request: &Request, timeout: Duration) -> Result<Reply, Failure> {
        let header = self.key.header().ok_or_else(|| Failure {
            message: "the API key is not a valid header value".into(),
            not_sent: true,
        })?;
        let mut builder = self
            .http
            .request(request.method.clone(), request.url.clone())
            .header(AUTHORIZATION, header)
            .timeout(timeout);
        if let Some(body) = &request.body {
            builder = builder.json(body);
        }
        let response = builder.send().await.map_err(Failure::from_reqwest)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response.text().await.map_err(Failure::from_reqwest)?;
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }
}

/// The longest a call, a backoff or a pacing interval may be: keeps `Instant` arithmetic far
/// from overflow whatever a caller configures.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

fn validated(mut retry: RetryPolicy) -> RetryPolicy {
    retry.max_attempts = retry.max_attempts.max(1);
    retry.deadline = retry.deadline.min(LONGEST);
    retry.max_backoff = retry.max_backoff.min(LONGEST);
    retry.base_backoff = retry.base_backoff.min(retry.max_backoff);
    retry.request_timeout = retry.request_timeout.min(retry.deadline);
    retry
}

/// A request that got no HTTP answer.
struct Failure {
    message: String,
    /// The request surely did not reach the provider (no connection was made).
    not_sent: bool,
}

impl Failure {
    fn from_reqwest(e: reqwest::Error) -> Failure {
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        let not_sent = e.is_connect() && !e.is_timeout();
        Failure {
            // Without the URL: the endpoint name already says which call failed.
            message: format!("{kind}: {}", e.without_url()),
            not_sent,
        }
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used by these providers).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

/// The first `max` characters of `text`, on one line, for error messages.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

/// The error for a failed status when the provider-specific mapping found nothing more precise.
pub(crate) fn status_error(
    provider: ProviderKind,
    status: StatusCode,
    what: &str,
    message: String,
    retry_after: Option<Duration>,
) -> ProviderError {
    match status.as_u16() {
        401 | 403 => ProviderError::Auth { provider, message },
        404 | 410 => ProviderError::NotFound {
            provider,
            what: format!("{what} ({message})"),
        },
        429 => ProviderError::RateLimited {
            provider,
            retry_after,
        },
        500..=599 => ProviderError::Transient {
            provider,
            message: format!("HTTP {status}: {message}"),
        },
        _ => ProviderError::Invalid {
            provider,
            message: format!("HTTP {status}: {message}"),
        },
    }
}

/// `base` with `segments` appended as path segments (each escaped), keeping what `base`
/// already has (`https://api.runpod.io/v2` + `["pods", id]`).
pub(crate) fn endpoint(
    provider: ProviderKind,
    base: &Url,
    segments: &[&str],
) -> ProviderResult<Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|()| ProviderError::Invalid {
            provider,
            message: format!("base URL {base} cannot take a path"),
        })?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// Checks a configured base URL: http or https, with a host.
pub(crate) fn check_base(provider: ProviderKind, base: &Url) -> ProviderResult<()> {
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        return Err(ProviderError::Invalid {
            provider,
            message: format!("base URL {base} must be http(s) with a host"),
        });
    }
    Ok(())
}

/// How long a rent whose answer was lost keeps looking for its host by label: the provider may
/// list a new host only a moment after it accepted the rent.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelLookup {
    pub attempts: u32,
    pub interval: Duration,
}

impl Default for LabelLookup {
    fn default() -> Self {
        LabelLookup {
            attempts: 4,
            interval: Duration::from_secs(3),
        }
    }
}

/// Rents at most one host per label. A host already rented under `label` is returned without a
/// new rent; when the rent call fails in a way that leaves open whether the provider accepted it
/// (timeout, 5xx, lost connection), the label is looked up again before the error is returned,
/// so that the caller never rents twice for one decision.
pub(crate) async fn rent_by_label<P, F, Fut>(
    provider: &P,
    label: &str,
    lookup: &LabelLookup,
    create: F,
) -> ProviderResult<Host>
where
    P: Provider + ?Sized,
    F: FnOnce() -> Fut,
    Fut: Future<Output = ProviderResult<Host>>,
{
    if let Some(host) = provider.find_by_label(label).await? {
        return Ok(host);
    }
    match create().await {
        Err(error @ ProviderError::Transient { .. }) => {
            for attempt in 0..lookup.attempts {
                if attempt > 0 {
                    tokio::time::sleep(lookup.interval).await;
                }
                if let Ok(Some(host)) = provider.find_by_label(label).await {
                    return Ok(host);
                }
            }
            Err(error)
        }
        other => other,
    }
}

/// A number that providers send as a JSON number or as a string (`"0.74"`).
pub(crate) fn num(value: &serde_json::Value) -> Option<f64> {
    match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An id that providers send as a number (Vast) or a string (RunPod, Lambda).
pub(crate) fn id_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        _ => None,
    }
}

/// A trimmed, non-empty string field.
pub(crate) fn text(value: &serde_json::Value) -> Option<String> {
    value
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Checks the common parts of an offer query.
pub(crate) fn check_query(provider: ProviderKind, query: &OfferQuery) -> ProviderResult<()> {
    let invalid = |message: String| Err(ProviderError::Invalid { provider, message });
    if query.gpu.trim().is_empty() {
        return invalid("offer query: the GPU name is empty".into());
    }
    if query.num_gpus == 0 {
        return invalid("offer query: num_gpus must be at least 1".into());
    }
    if !(query.max_price_per_hour.is_finite() && query.max_price_per_hour > 0.0) {
        return invalid(format!(
            "offer query: max_price_per_hour must be a positive number, not {}",
            query.max_price_per_hour
        ));
    }
    if !(0.0..=1.0).contains(&query.min_reliability) {
        return invalid(format!(
            "offer query: min_reliability must be within 0..=1, not {}",
            query.min_reliability
        ));
    }
    Ok(())
}

/// Sorts offers cheapest first (NaN-free: prices were parsed from JSON numbers).
pub(crate) fn cheapest_first(offers: &mut [Offer]) {
    offers.sort_by(|a, b| a.price_per_hour.total_cmp(&b.price_per_hour));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_never_prints() {
        let key = ApiKey::new(ProviderKind::Vast, " secret-123\n".into()).expect("construct");
        assert_eq!(format!("{key:?}"), "***");
        assert_eq!(format!("{key}"), "***");
        let api = Api::new(
            ProviderKind::Vast,
            "secret-123".into(),
            RetryPolicy::default(),
            Pacing::none(),
        )
        .expect("construct");
        assert!(!format!("{api:?}").contains("secret-123"));
        assert!(ApiKey::new(ProviderKind::Vast, "  ".into()).is_err());
        assert!(ApiKey::new(ProviderKind::Vast, "a b".into()).is_err());
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let retry = RetryPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        assert_eq!(retry.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(retry.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(retry.backoff(3, 0.0), Duration::from_millis(200));
        assert_eq!(retry.backoff(10, 1.0), Duration::from_millis(1000));
        assert_eq!(retry.backoff(u32::MAX, 1.0), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_requests_per_endpoint_and_globally() {
        let pacer = Pacer::new(Pacing {
            global: Some(Duration::from_secs(1)),
            endpoints: vec![("launch", Duration::from_secs(10))],
        });
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(3600);
        assert_eq!(pacer.reserve("launch", far), Ok(t0));
        // Another endpoint waits only for the global interval…
        assert_eq!(pacer.reserve("get", far), Ok(t0 + Duration::from_secs(1)));
        assert_eq!(pacer.reserve("get", far), Ok(t0 + Duration::from_secs(2)));
        // …a second launch for its own.
        assert_eq!(
            pacer.reserve("launch", far),
            Ok(t0 + Duration::from_secs(10))
        );
        // A caller that cannot wait that long reserves nothing.
        let soon = t0 + Duration::from_secs(5);
        assert_eq!(
            pacer.reserve("launch", soon),
            Err(t0 + Duration::from_secs(20))
        );
        assert_eq!(
            pacer.reserve("launch", far),
            Ok(t0 + Duration::from_secs(20))
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(
            pacer.reserve("launch", far),
            Ok(t0 + Duration::from_secs(30))
        );
        pacer.defer("get", t0 + Duration::from_secs(40));
        assert_eq!(pacer.reserve("get", far), Ok(t0 + Duration::from_secs(40)));
    }

    #[test]
    fn retry_after_and_endpoints_parse() {
        assert_eq!(parse_retry_after("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after("x"), None);
        assert_eq!(parse_retry_after("-1"), None);
        let base = Url::parse("https://api.runpod.io/v2").expect("parse");
        let url = endpoint(ProviderKind::Runpod, &base, &["pods", "a b"]).expect("endpoint");
        assert_eq!(url.as_str(), "https://api.runpod.io/v2/pods/a%20b");
        let vast = Url::parse("https://console.vast.ai/").expect("parse");
        let url =
            endpoint(ProviderKind::Vast, &vast, &["api", "v0", "asks", "7", ""]).expect("endpoint");
        assert_eq!(url.as_str(), "https://console.vast.ai/api/v0/asks/7/");
        assert!(check_base(ProviderKind::Vast, &Url::parse("file:///x").expect("parse")).is_err());
        assert_eq!(excerpt("ab\ncd", 3), "ab …");
    }
}
