//! Alert delivery: a task that posts [`webhook_body`]s to the configured webhook. The control
//! loop hands events over a channel and never waits for a post; a post that fails stays queued
//! and is tried again every `retry_every`. The queue is bounded (oldest dropped first).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use url::Url;

use crate::alerts::{AlertEvent, webhook_body};

/// Most undelivered events kept.
pub const MAX_QUEUED: usize = 256;

/// Sends alert events to a webhook in the background.
#[derive(Debug, Clone)]
pub struct Webhook {
    tx: mpsc::Sender<AlertEvent>,
}

impl Webhook {
    /// Starts the delivery task on the current runtime.
    pub fn spawn(url: Url, timeout: Duration, retry_every: Duration) -> anyhow::Result<Webhook> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("building the webhook client: {e}"))?;
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        tokio::spawn(deliver(client, url, retry_every, rx));
        Ok(Webhook { tx })
    }

    /// Queues an event; never waits (a full channel drops the event with a log line).
    pub fn send(&self, event: AlertEvent) {
        if let Err(e) = self.tx.try_send(event) {
            eprintln!("kiln run: alert not queued for the webhook: {e}");
        }
    }
}

async fn post(client: &reqwest::Client, url: &Url, event: &AlertEvent) -> Result<(), String> {
    let response = client
        .post(url.clone())
        .json(&webhook_body(event))
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered {}", response.status()))
    }
}

async fn deliver(
    client: reqwest::Client,
    url: Url,
    retry_every: Duration,
    mut rx: mpsc::Receiver<AlertEvent>,
) {
    let mut queue: VecDeque<AlertEvent> = VecDeque::new();
    let mut closed = false;
    loop {
        // Wait for a new event, or for the retry time when some are waiting.
        // `None`: the retry time came; `Some(None)`: the loop has ended.
        let received = if queue.is_empty() {
            Some(rx.recv().await)
        } else {
            tokio::time::timeout(retry_every, rx.recv()).await.ok()
        };
        match received {
            Some(Some(event)) => queue.push_back(event),
            Some(None) => closed = true,
            None => {}
        }
        while let Ok(event) = rx.try_recv() {
            queue.push_back(event);
        }
        while queue.len() > MAX_QUEUED {
            if let Some(dropped) = queue.pop_front() {
                eprintln!("kiln run: alert dropped undelivered: {}", dropped.key);
            }
        }
        // Post in order; stop at the first failure and keep the rest for the next try.
        while let Some(event) = queue.front() {
            match post(&client, &url, event).await {
                Ok(()) => {
                    queue.pop_front();
                }
                Err(e) => {
                    eprintln!("kiln run: alert webhook failed (retried later): {e}");
                    break;
                }
            }
        }
        if closed {
            // The loop ended: this was the last try.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Json;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;
    use crate::alerts::{AlertStatus, Severity};

    /// A webhook that refuses the first post and accepts the rest, keeping the bodies.
    async fn fake_webhook() -> (Url, Arc<Mutex<Vec<serde_json::Value>>>) {
        let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let app = axum::Router::new()
            .route(
                "/hook",
                post(
                    |State(seen): State<Arc<Mutex<Vec<serde_json::Value>>>>,
                     Json(body): Json<serde_json::Value>| async move {
                        let mut seen = seen.lock().expect("lock");
                        seen.push(body);
                        if seen.len() == 1 {
                            StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            StatusCode::OK
                        }
                    },
                ),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let url = Url::parse(&format!("http://{addr}/hook")).expect("url");
        (url, seen)
    }

    #[tokio::test]
    async fn a_failed_post_is_retried_and_events_arrive_in_order() {
        let (url, seen) = fake_webhook().await;
        let webhook =
            Webhook::spawn(url, Duration::from_secs(5), Duration::from_millis(50)).expect("spawn");
        for (key, status) in [
            ("queue_depth", AlertStatus::Firing),
            ("queue_depth", AlertStatus::Resolved),
        ] {
            webhook.send(AlertEvent {
                key: key.into(),
                status,
                severity: Severity::Warning,
                message: "queue depth 12 > 10".into(),
                at_ms: 0,
            });
        }
        for _ in 0..200 {
            if seen.lock().expect("lock").len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = seen.lock().expect("lock").clone();
        let texts: Vec<&str> = seen.iter().filter_map(|b| b["text"].as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "[kiln] WARNING queue_depth: queue depth 12 > 10",
                "[kiln] WARNING queue_depth: queue depth 12 > 10",
                "[kiln] RESOLVED queue_depth: queue depth 12 > 10",
            ],
            "the refused post is sent again, before the next event"
        );
        assert_eq!(seen[2]["content"], seen[2]["text"]);
    }
}
