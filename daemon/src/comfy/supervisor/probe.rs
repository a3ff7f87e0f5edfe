//! The supervisor's HTTP checks: is the port free before spawning, does `/system_stats` answer
//! 200, and the warm-up workflow (one `POST /prompt`, then `/history/{id}` polled until the entry
//! appears). Each request has a time limit; nothing here retries on its own.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use url::Url;

use super::config::SupervisorConfig;

/// Client id the warm-up prompt is sent with.
const WARMUP_CLIENT_ID: &str = "kiln-supervisor-warmup";

pub(crate) fn http_client(config: &SupervisorConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(config.probe_timeout)
        .timeout(config.probe_timeout)
        .no_proxy()
        .pool_max_idle_per_host(2)
        .build()
        .map_err(|e| format!("could not build the HTTP client: {e}"))
}

/// `Ok` when `GET /system_stats` answers 200.
pub(crate) async fn system_stats(http: &reqwest::Client, url: &Url) -> Result<(), String> {
    match http.get(url.clone()).send().await {
        Ok(resp) if resp.status() == reqwest::StatusCode::OK => Ok(()),
        Ok(resp) => Err(format!("GET {url} answered {}", resp.status())),
        Err(e) if e.is_timeout() => Err(format!("GET {url} timed out")),
        Err(e) if e.is_connect() => Err(format!("GET {url}: connection refused or unreachable")),
        Err(e) => Err(format!("GET {url} failed: {e}")),
    }
}

/// `Err` naming the port when something already accepts connections on it.
pub(crate) async fn port_is_free(config: &SupervisorConfig) -> Result<(), String> {
    let url = &config.base_url;
    let host = url
        .host_str()
        .unwrap_or("127.0.0.1")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<_> =
        match tokio::time::timeout(config.probe_timeout, tokio::net::lookup_host((host, port)))
            .await
        {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return Err(format!("cannot resolve {host}:{port} from base_url: {e}")),
            Err(_) => return Err(format!("resolving {host}:{port} from base_url timed out")),
        };
    for addr in addrs {
        if let Ok(Ok(_stream)) =
            tokio::time::timeout(config.probe_timeout, tokio::net::TcpStream::connect(addr)).await
        {
            return Err(format!(
                "port {port} on {host} is already taken by another process ({addr} accepts \
                 connections before ComfyUI was started); not starting a second one"
            ));
        }
    }
    Ok(())
}

/// Runs the warm-up workflow to its end; `Err` says why it did not succeed.
pub(crate) async fn warm_up(
    http: &reqwest::Client,
    config: &SupervisorConfig,
    workflow: &Value,
) -> Result<(), String> {
    let deadline = Instant::now() + config.warmup_timeout;
    let prompt_url = config.endpoint("prompt");
    let body = json!({ "prompt": workflow, "client_id": WARMUP_CLIENT_ID });
    let resp = http
        .post(prompt_url.clone())
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST {prompt_url} failed: {e}"))?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("POST {prompt_url}: reading the answer: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "warm-up workflow refused ({status}): {}",
            clip(&text)
        ));
    }
    let answer: Value = serde_json::from_str(&text).map_err(|e| {
        format!(
            "POST {prompt_url} answered something that is not JSON ({e}): {}",
            clip(&text)
        )
    })?;
    let prompt_id = answer
        .get("prompt_id")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "POST {prompt_url} answered without a prompt_id: {}",
                clip(&text)
            )
        })?
        .to_owned();
    let history_url = config.endpoint(&format!("history/{prompt_id}"));
    let poll = config.probe_interval.max(Duration::from_millis(100));
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "warm-up workflow {prompt_id} did not finish within {}",
                humantime::format_duration(config.warmup_timeout)
            ));
        }
        tokio::time::sleep(poll).await;
        let resp = match http.get(history_url.clone()).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "warm-up history poll failed; retrying");
                continue;
            }
        };
        if !resp.status().is_success() {
            continue;
        }
        let Ok(history) = resp.json::<Value>().await else {
            continue;
        };
        let Some(entry) = history.get(&prompt_id) else {
            continue;
        };
        let status = entry.get("status");
        let status_str = status
            .and_then(|s| s.get("status_str"))
            .and_then(Value::as_str);
        let completed = status
            .and_then(|s| s.get("completed"))
            .and_then(Value::as_bool);
        return match (status_str, completed) {
            (Some("success"), _) | (None, Some(true)) => Ok(()),
            _ => Err(format!(
                "warm-up workflow {prompt_id} failed: {}",
                warmup_error(entry).unwrap_or_else(|| "no error message in its history".to_owned())
            )),
        };
    }
}

/// The `execution_error` message of a history entry, if any.
fn warmup_error(entry: &Value) -> Option<String> {
    let messages = entry.get("status")?.get("messages")?.as_array()?;
    messages.iter().find_map(|m| {
        let pair = m.as_array()?;
        if pair.first()?.as_str()? != "execution_error" {
            return None;
        }
        let detail = pair.get(1)?;
        let node = detail
            .get("node_type")
            .and_then(Value::as_str)
            .unwrap_or("?");
        let msg = detail
            .get("exception_message")
            .and_then(Value::as_str)
            .unwrap_or("?");
        Some(format!("node {node}: {}", msg.trim()))
    })
}

fn clip(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_of_a_recorded_failed_history_entry() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/comfyui-recordings/29_runtime_error_corrupt_image_history.json"
        );
        let text = std::fs::read_to_string(path).expect("recording exists");
        let recording: Value = serde_json::from_str(&text).expect("recording is JSON");
        let body = recording["response"]["body_raw"]
            .as_str()
            .expect("a recorded body");
        let history: Value = serde_json::from_str(body).expect("recorded body is JSON");
        let entry = history
            .as_object()
            .and_then(|o| o.values().next())
            .expect("one history entry");
        let err = warmup_error(entry).expect("an execution_error message");
        assert!(err.starts_with("node LoadImage: cannot identify"), "{err}");
        assert!(clip(&"é".repeat(400)).ends_with('…'));
    }
}
