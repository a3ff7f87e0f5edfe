//! How the control loop talks to a node: `POST /v1/admin/drain` with the operator token.

use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};

/// The node operations the executor needs.
#[async_trait]
pub trait NodeAdmin: Send + Sync {
    /// Asks the node whose API is at `api_url` to drain: take no new work, hand its queue on.
    async fn drain(&self, api_url: &str) -> anyhow::Result<()>;
}

/// [`NodeAdmin`] over each node's HTTP API.
pub struct HttpNodeAdmin {
    client: reqwest::Client,
}

impl std::fmt::Debug for HttpNodeAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpNodeAdmin")
            .field("token", &"<redacted>")
            .finish()
    }
}

impl HttpNodeAdmin {
    /// `token` is the operator token; `timeout` bounds each whole request.
    pub fn new(token: &str, timeout: Duration) -> anyhow::Result<HttpNodeAdmin> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the operator token cannot be sent in an HTTP header")?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(HttpNodeAdmin { client })
    }
}

#[async_trait]
impl NodeAdmin for HttpNodeAdmin {
    async fn drain(&self, api_url: &str) -> anyhow::Result<()> {
        let base = url::Url::parse(api_url)
            .with_context(|| format!("the node's API URL {api_url:?} is not a URL"))?;
        let base = if base.path().ends_with('/') {
            base
        } else {
            let mut b = base.clone();
            b.set_path(&format!("{}/", base.path()));
            b
        };
        let url = base
            .join("v1/admin/drain")
            .with_context(|| format!("building the drain URL from {api_url}"))?;
        let response = self
            .client
            .post(url.clone())
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = crate::text::clean(&body).chars().take(300).collect();
            bail!("POST {url}: {status}: {body}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;

    use super::*;

    #[tokio::test]
    async fn drain_posts_with_the_operator_token_and_reports_a_refusal() {
        let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/base/v1/admin/drain",
            post(move |headers: HeaderMap| {
                let record = record.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    let ok = auth.as_deref() == Some("Bearer op-token");
                    record.lock().expect("lock").push(auth);
                    if ok {
                        (StatusCode::ACCEPTED, "{}")
                    } else {
                        (StatusCode::UNAUTHORIZED, "{\"error\":\"unauthorized\"}")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        let good = HttpNodeAdmin::new("op-token", Duration::from_secs(5)).expect("client");
        good.drain(&format!("http://{addr}/base"))
            .await
            .expect("drained");
        let bad = HttpNodeAdmin::new("wrong", Duration::from_secs(5)).expect("client");
        let error = bad
            .drain(&format!("http://{addr}/base/"))
            .await
            .expect_err("refused")
            .to_string();
        assert!(error.contains("401"), "{error}");
        let error = good
            .drain("not a url")
            .await
            .expect_err("bad url")
            .to_string();
        assert!(error.contains("not a URL"), "{error}");
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![Some("Bearer op-token".into()), Some("Bearer wrong".into())]
        );
        assert!(HttpNodeAdmin::new("bad\ntoken", Duration::from_secs(1)).is_err());
    }
}
