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
