//! A fake of Stripe's `POST /v1/billing/meter_events` on 127.0.0.1 (axum), as strict as the
//! real one where Kiln depends on it: the Bearer secret key, a form-encoded body with
//! `event_name`, `payload[stripe_customer_id]`, `payload[value]`, `identifier` and `timestamp`
//! (within the past 35 days, at most 5 minutes ahead), customers it knows, identifiers it has
//! seen refused as duplicates, and Stripe's error JSON (`{"error": {"type", "code", "message",
//! "param"}}`). Knobs: answer the next N requests with 429, or with given statuses (and a
//! `Stripe-Should-Retry` header).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

/// One event the fake accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub event_name: String,
    pub customer: String,
    pub value: String,
    pub identifier: String,
    pub timestamp: i64,
}

#[derive(Debug, Default)]
pub struct StripeState {
    pub customers: BTreeSet<String>,
    pub accepted: Vec<Accepted>,
    /// Every request that reached the handler, answered or not.
    pub requests: usize,
    /// Answer this many of the next requests with 429.
    pub rate_limit_next: usize,
    pub rate_limited: usize,
    /// Answer the next requests with these statuses (popped from the end).
    pub fail_next: Vec<StatusCode>,
    /// Sent as `Stripe-Should-Retry` with the `fail_next` answers.
    pub should_retry: Option<bool>,
    pub refused: Vec<(String, String)>,
    pub idempotency_keys: Vec<String>,
}

#[derive(Clone)]
pub struct StripeFake {
    pub addr: SocketAddr,
    pub key: String,
    pub state: Arc<Mutex<StripeState>>,
}

fn error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: String,
    param: Option<&str>,
) -> Response {
    let mut body = json!({"error": {"type": kind, "message": message}});
    if let Some(code) = code {
        body["error"]["code"] = json!(code);
    }
    if let Some(param) = param {
        body["error"]["param"] = json!(param);
    }
    (status, Json(body)).into_response()
}

impl StripeFake {
    /// Starts the fake; `customers` are the Stripe customers that exist.
    pub async fn start(key: &str, customers: &[&str]) -> StripeFake {
        let state = Arc::new(Mutex::new(StripeState {
            customers: customers.iter().map(|c| c.to_string()).collect(),
            ..StripeState::default()
        }));
        let fake = StripeFake {
            addr: "127.0.0.1:0".parse().expect("addr"),
            key: key.to_string(),
            state,
        };
        let app = Router::new()
            .route("/v1/billing/meter_events", post(meter_event))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        StripeFake { addr, ..fake }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, StripeState> {
        self.state.lock().expect("state")
    }
}

async fn meter_event(State(fake): State<StripeFake>, headers: HeaderMap, body: String) -> Response {
    let mut state = fake.lock();
    state.requests += 1;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(fake.key.as_str()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "Invalid API Key provided: sk_test_****".into(),
            None,
        );
    }
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        state.idempotency_keys.push(key.to_string());
    }
    if let Some(status) = state.fail_next.pop() {
        let mut response = error(
            status,
            "api_error",
            None,
            "An unknown error occurred.".into(),
            None,
        );
        if let Some(retry) = state.should_retry {
            response.headers_mut().insert(
                "stripe-should-retry",
                axum::http::HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        return response;
    }
    if state.rate_limit_next > 0 {
        state.rate_limit_next -= 1;
        state.rate_limited += 1;
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "invalid_request_error",
            Some("rate_limit"),
            "Too many requests hit the API too quickly.".into(),
            None,
        );
    }
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !form_type.starts_with("application/x-www-form-urlencoded") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            format!("expected a form body, got {form_type:?}"),
            None,
        );
    }
    let fields: BTreeMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    for name in [
        "event_name",
        "payload[stripe_customer_id]",
        "payload[value]",
        "identifier",
        "timestamp",
    ] {
        if fields.get(name).is_none_or(|v| v.is_empty()) {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_missing"),
                format!("Missing required param: {name}."),
                Some(name),
            );
        }
    }
    let identifier = fields["identifier"].clone();
    let customer = fields["payload[stripe_customer_id]"].clone();
    let value = fields["payload[value]"].clone();
    if value.parse::<f64>().is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            format!("Invalid decimal: {value}"),
            Some("payload[value]"),
        );
    }
    if identifier.len() > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "Invalid string: identifier must be at most 100 characters".into(),
            Some("identifier"),
        );
    }
    let Ok(timestamp) = fields["timestamp"].parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "Invalid integer: timestamp".into(),
            Some("timestamp"),
        );
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    if timestamp < now - 35 * 86_400 || timestamp > now + 300 {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("timestamp_outside_window"),
            "Timestamp must be within the past 35 calendar days or up to 5 minutes in the future."
                .into(),
            Some("timestamp"),
        );
    }
    if !state.customers.contains(&customer) {
        state.refused.push((identifier.clone(), customer.clone()));
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("resource_missing"),
            format!("No such customer: '{customer}'"),
            Some("payload[stripe_customer_id]"),
        );
    }
    if state.accepted.iter().any(|a| a.identifier == identifier) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            format!("An event with identifier {identifier} already exists."),
            Some("identifier"),
        );
    }
    let accepted = Accepted {
        event_name: fields["event_name"].clone(),
        customer,
        value,
        identifier,
        timestamp,
    };
    let body = json!({
        "object": "billing.meter_event",
        "created": now,
        "event_name": accepted.event_name,
        "identifier": accepted.identifier,
        "livemode": false,
        "payload": {"stripe_customer_id": accepted.customer, "value": accepted.value},
        "timestamp": accepted.timestamp,
    });
    state.accepted.push(accepted);
    (StatusCode::OK, Json(body)).into_response()
}
