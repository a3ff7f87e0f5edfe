//! The HTTP and WebSocket client of one ComfyUI server.
//!
//! [`ComfyClient`] posts prompts with Kiln's own prompt ids, follows them on `/ws` (reconnecting
//! and polling `/history` when the socket drops), reads history and queue, downloads output files
//! through `/view`, interrupts, frees memory and keeps a cached `/object_info`.
//!
//! Every call returns [`ComfyError`], whose variants say what a caller can do about a failure.
//! This module never restarts ComfyUI and never decides a job's fate: the executor and the
//! supervisor do. It never panics on what the network sends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

use super::types::{
    BinaryFrame, HistoryEnd, HistoryEntry, HistoryResponse, NodeError, ObjectInfo, OutputRef,
    PromptErrorResponse, PromptRequest, PromptResponse, QueueResponse, WsMessage,
    node_errors_from_wire, output_refs,
};

/// The websocket's read buffer. tungstenite zero-fills the whole buffer before every socket
/// read: with its 128 KiB default, that memset was ~2 % of all CPU in a profile of the cluster
/// bench. ComfyUI's event frames are a few hundred bytes, and a bigger one (a preview image)
/// still grows the buffer as far as it needs.
pub(crate) const WS_READ_BUFFER: usize = 16 * 1024;

/// Why a call to ComfyUI failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ComfyError {
    /// No connection could be made or kept (refused, reset, DNS): ComfyUI is down or restarting.
    #[error("ComfyUI at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    /// `POST /prompt` answered 400: the prompt failed ComfyUI's validation; nothing was queued.
    #[error("ComfyUI rejected the prompt: {error_type}: {message}{}", describe_node_errors(.node_errors))]
    Rejected {
        error_type: String,
        message: String,
        details: String,
        node_errors: Vec<NodeError>,
    },
    /// A node raised an exception while the prompt ran (`execution_error`).
    #[error("node {node_id} ({node_type}) failed: {exception_type}: {message}")]
    Execution {
        node_id: String,
        node_type: String,
        exception_type: String,
        message: String,
        traceback: Vec<String>,
    },
    /// The prompt was interrupted (`execution_interrupted`).
    #[error("the prompt was interrupted")]
    Interrupted,
    /// ComfyUI knows the prompt neither in its queue nor in its history: it restarted and lost it.
    #[error("prompt {prompt_id} was lost: ComfyUI has it neither in its queue nor in its history")]
    Lost { prompt_id: String },
    /// An HTTP status ComfyUI should not have answered (its 500s are text/plain).
    #[error("ComfyUI answered {what} with HTTP {status}: {body}")]
    Http {
        what: String,
        status: u16,
        body: String,
    },
    /// An answer that does not have the shape ComfyUI's API has.
    #[error("unexpected answer from ComfyUI: {0}")]
    Protocol(String),
    /// A request took longer than its time limit.
    #[error("ComfyUI did not answer in time: {0}")]
    Timeout(String),
}

fn describe_node_errors(node_errors: &[NodeError]) -> String {
    let mut out = String::new();
    for node in node_errors {
        for err in &node.errors {
            out.push_str(&format!(
                "; node {} ({}): {}",
                node.node_id, node.class_type, err.message
            ));
            if !err.details.is_empty() {
                out.push_str(&format!(" ({})", err.details));
            }
        }
    }
    out
}

/// What happens to a prompt while it runs, relayed from the WebSocket as it arrives. Delivery is
/// best effort: when the receiver is full, events are dropped rather than slowing the run.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// The worker took the prompt (`execution_start`).
    Started,
    /// These nodes' results were reused from ComfyUI's cache.
    Cached { nodes: Vec<String> },
    /// This node started executing.
    Executing { node: String },
    /// A node that reports progress (samplers, upscalers) made a step.
    Progress {
        node: Option<String>,
        value: f64,
        max: f64,
    },
    /// An output node finished and listed these files.
    Executed { node: String, files: Vec<OutputRef> },
    /// A live preview image from a sampler (`format`: 1 = JPEG, 2 = PNG).
    Preview { format: u32, image: Bytes },
    /// The WebSocket dropped; the client is reconnecting and polling the history meanwhile.
    Reconnecting,
}

/// The answer to a successful `POST /prompt`.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub prompt_id: String,
    pub number: f64,
    /// Non-empty when ComfyUI dropped invalid output branches and runs only the valid ones.
    pub node_errors: Vec<NodeError>,
}

/// A prompt that ended successfully: its files, from its history entry or, when the event
/// socket saw the whole run, from its `executed` events (the same ui dicts).
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Result files (`type` output, or input for nodes that list inputs), in node id order.
    pub outputs: Vec<OutputRef>,
    /// Preview files (`type` temp, e.g. PreviewImage): not results, wiped when ComfyUI starts.
    pub previews: Vec<OutputRef>,
}

impl Finished {
    /// From the ui dicts of the output nodes, by node id.
    fn from_ui(ui: &BTreeMap<String, Map<String, Value>>) -> Finished {
        let (previews, outputs) = ui
            .iter()
            .flat_map(|(node_id, ui)| output_refs(node_id, ui))
            .partition(|f| f.file_type == super::types::FileType::Temp);
        Finished { outputs, previews }
    }
}

/// Time limits and poll intervals of a [`ComfyClient`].
#[derive(Debug, Clone)]
pub struct ClientTimings {
    /// TCP connect limit for HTTP and the WebSocket.
    pub connect_timeout: Duration,
    /// Limit for small requests (prompt, history, queue, interrupt, free).
    pub request_timeout: Duration,
    /// Limit for `/object_info` and `/view` downloads.
    pub download_timeout: Duration,
    /// History poll interval while the WebSocket is down.
    pub poll_interval: Duration,
    /// History poll interval while the WebSocket is up (a safety net for lost frames).
    pub safety_poll_interval: Duration,
    /// Longest wait between WebSocket reconnection attempts.
    pub max_reconnect_backoff: Duration,
}

impl Default for ClientTimings {
    fn default() -> Self {
        ClientTimings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            download_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(400),
            safety_poll_interval: Duration::from_secs(5),
            max_reconnect_backoff: Duration::from_secs(2),
        }
    }
}

/// A client of one ComfyUI server, identified to it by one `client_id`.
///
/// Kiln runs one prompt at a time per ComfyUI, so one client id is enough: ComfyUI routes a
/// prompt's events to the socket that holds the prompt's client id.
#[derive(Debug)]
pub struct ComfyClient {
    http: reqwest::Client,
    base: Url,
    client_id: String,
    timings: ClientTimings,
    object_info: Mutex<Option<Arc<ObjectInfo>>>,
    /// The event socket between runs, with the caller's ComfyUI generation it was opened under
    /// ([`ComfyClient::kept_events`]).
    kept_events: Mutex<Option<(u64, EventSocket)>>,
}

/// The most stale frames [`ComfyClient::kept_events`] drops from a kept socket before it gives
/// up on it and a new one is opened instead.
const STALE_FRAMES_MAX: usize = 1024;

/// A WebSocket to `/ws?clientId=...`.
pub struct EventSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    buffered: Option<WsMessage>,
    /// Frames skipped so far because they did not parse.
    skipped: u64,
}

impl std::fmt::Debug for EventSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSocket").finish_non_exhaustive()
    }
}

/// One frame from the WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum WsEvent {
    Message(WsMessage),
    Binary(BinaryFrame),
}

impl EventSocket {
    /// The next frame; `None` when the socket closed or failed. Frames that do not parse are
    /// logged and skipped.
    pub async fn next(&mut self) -> Option<WsEvent> {
        if let Some(msg) = self.buffered.take() {
            return Some(WsEvent::Message(msg));
        }
        loop {
            let frame = match self.ws.next().await? {
                Ok(frame) => frame,
                Err(e) => {
                    tracing::debug!(error = %e, "ComfyUI websocket failed");
                    return None;
                }
            };
            match frame {
                Message::Text(text) => match WsMessage::parse(text.as_str()) {
                    Ok(msg) => return Some(WsEvent::Message(msg)),
                    Err(e) => {
                        self.skipped += 1;
                        tracing::warn!(error = %e, "skipping a ComfyUI websocket frame");
                    }
                },
                Message::Binary(bytes) => match BinaryFrame::parse(&bytes) {
                    Ok(frame) => return Some(WsEvent::Binary(frame)),
                    Err(e) => {
                        self.skipped += 1;
                        tracing::warn!(error = %e, "skipping a ComfyUI binary frame");
                    }
                },
                Message::Close(_) => return None,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }
}

impl ComfyClient {
    /// A client of the ComfyUI at `base_url` (such as `http://127.0.0.1:8188`) that identifies
    /// itself as `client_id`.
    pub fn new(base_url: Url, client_id: String) -> Result<ComfyClient, ComfyError> {
        ComfyClient::with_timings(base_url, client_id, ClientTimings::default())
    }

    /// [`ComfyClient::new`] with explicit time limits.
    pub fn with_timings(
        mut base_url: Url,
        client_id: String,
        timings: ClientTimings,
    ) -> Result<ComfyClient, ComfyError> {
        if !matches!(base_url.scheme(), "http" | "https") || base_url.cannot_be_a_base() {
            return Err(ComfyError::Protocol(format!(
                "ComfyUI base URL {base_url} is not an http(s) URL"
            )));
        }
        if client_id.is_empty() {
            return Err(ComfyError::Protocol(
                "a ComfyUI client id must not be empty: without one ComfyUI sends no events"
                    .to_owned(),
            ));
        }
        if !base_url.path().ends_with('/') {
            let path = format!("{}/", base_url.path());
            base_url.set_path(&path);
        }
        base_url.set_query(None);
        base_url.set_fragment(None);
        let http = reqwest::Client::builder()
            .connect_timeout(timings.connect_timeout)
            .no_proxy()
            .build()
            .map_err(|e| ComfyError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(ComfyClient {
            http,
            base: base_url,
            client_id,
            timings,
            object_info: Mutex::new(None),
            kept_events: Mutex::new(None),
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    fn url(&self, path: &str) -> Result<Url, ComfyError> {
        self.base
            .join(path)
            .map_err(|e| ComfyError::Protocol(format!("bad ComfyUI path {path:?}: {e}")))
    }

    fn transport_error(&self, what: &str, e: &reqwest::Error) -> ComfyError {
        if e.is_timeout() {
            ComfyError::Timeout(format!("{what}: {e}"))
        } else {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                reason.push_str(&format!(": {s}"));
                source = s.source();
            }
            ComfyError::Unreachable {
                url: self.base.to_string(),
                reason: format!("{what}: {reason}"),
            }
        }
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Bytes), ComfyError> {
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(what, &e))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(what, &e))?;
        Ok((status, body))
    }

    fn http_error(what: &str, status: u16, body: &[u8]) -> ComfyError {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let mut body: String = text.chars().take(500).collect();
        if body.len() < text.len() {
            body.push('…');
        }
        ComfyError::Http {
            what: what.to_owned(),
            status,
            body,
        }
    }

    fn parse<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, ComfyError> {
        serde_json::from_slice(body).map_err(|e| ComfyError::Protocol(format!("{what}: {e}")))
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        what: &str,
        url: Url,
        timeout: Duration,
    ) -> Result<T, ComfyError> {
        let (status, body) = self.send(what, self.http.get(url).timeout(timeout)).await?;
        if status != 200 {
            return Err(Self::http_error(what, status, &body));
        }
        Self::parse(what, &body)
    }

    async fn post_empty(&self, what: &str, path: &str, body: &Value) -> Result<(), ComfyError> {
        let req = self
            .http
            .post(self.url(path)?)
            .timeout(self.timings.request_timeout)
            .json(body);
        let (status, body) = self.send(what, req).await?;
        if status != 200 {
            return Err(Self::http_error(what, status, &body));
        }
        Ok(())
    }

    /// `POST /prompt` with Kiln's `prompt_id` and this client's id. A 400 is
    /// [`ComfyError::Rejected`]; a 200 with `node_errors` is a success that runs only the valid
    /// output branches (see [`Submitted::node_errors`]).
    pub async fn submit<W: Serialize + ?Sized + Sync>(
        &self,
        prompt_id: &str,
        workflow: &W,
        extra_data: Option<&Value>,
    ) -> Result<Submitted, ComfyError> {
        let what = "POST /prompt";
        let body = PromptRequest {
            prompt: workflow,
            client_id: &self.client_id,
            prompt_id,
            extra_data,
        };
        let req = self
            .http
            .post(self.url("prompt")?)
            .timeout(self.timings.request_timeout)
            .json(&body);
        let (status, body) = self.send(what, req).await?;
        match status {
            200 => {
                let resp: PromptResponse = Self::parse(what, &body)?;
                if resp.prompt_id != prompt_id {
                    return Err(ComfyError::Protocol(format!(
                        "{what}: asked for prompt id {prompt_id}, ComfyUI used {}",
                        resp.prompt_id
                    )));
                }
                Ok(Submitted {
                    prompt_id: resp.prompt_id,
                    number: resp.number,
                    node_errors: node_errors_from_wire(resp.node_errors),
                })
            }
            400 => match serde_json::from_slice::<PromptErrorResponse>(&body) {
                Ok(err) => Err(ComfyError::Rejected {
                    error_type: err.error.error_type,
                    message: err.error.message,
                    details: err.error.details,
                    node_errors: node_errors_from_wire(err.node_errors),
                }),
                Err(_) => Err(Self::http_error(what, status, &body)),
            },
            _ => Err(Self::http_error(what, status, &body)),
        }
    }

    /// `GET /history/{id}`: the entry, or `None` when ComfyUI does not know the id (yet, or any
    /// more).
    pub async fn history(&self, prompt_id: &str) -> Result<Option<HistoryEntry>, ComfyError> {
        let mut url = self.url("history/")?;
        url.path_segments_mut()
            .map_err(|()| ComfyError::Protocol("ComfyUI base URL cannot hold a path".to_owned()))?
            .pop_if_empty()
            .push(prompt_id);
        let mut all: HistoryResponse = self
            .get_json("GET /history/{id}", url, self.timings.request_timeout)
            .await?;
        Ok(all.remove(prompt_id))
    }

    /// `GET /queue`.
    pub async fn queue(&self) -> Result<QueueResponse, ComfyError> {
        self.get_json(
            "GET /queue",
            self.url("queue")?,
            self.timings.request_timeout,
        )
        .await
    }

    /// `POST /queue {"delete": ids}`: removes pending prompts (a running one is not affected).
    pub async fn delete_queued(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_empty("POST /queue", "queue", &json!({ "delete": prompt_ids }))
            .await
    }

    /// `POST /interrupt`: with a prompt id, interrupts that prompt only if it is running; without,
    /// whatever runs. Cooperative: it lands at the next node boundary or progress tick.
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), ComfyError> {
        let body = match prompt_id {
            Some(id) => json!({ "prompt_id": id }),
            None => json!({}),
        };
        self.post_empty("POST /interrupt", "interrupt", &body).await
    }

    /// `POST /free`: asks ComfyUI to unload models and/or free cached memory after the current
    /// prompt.
    pub async fn free(&self, unload_models: bool, free_memory: bool) -> Result<(), ComfyError> {
        self.post_empty(
            "POST /free",
            "free",
            &json!({ "unload_models": unload_models, "free_memory": free_memory }),
        )
        .await
    }

    /// `GET /system_stats` as sent (system and devices).
    pub async fn system_stats(&self) -> Result<Value, ComfyError> {
        self.get_json(
            "GET /system_stats",
            self.url("system_stats")?,
            self.timings.request_timeout,
        )
        .await
    }

    /// `GET /view`: the bytes of one file a node listed.
    pub async fn view(&self, file: &OutputRef) -> Result<Bytes, ComfyError> {
        let what = format!("GET /view of {}", file.filename);
        let mut url = self.url("view")?;
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", file.file_type.as_str());
        let req = self.http.get(url).timeout(self.timings.download_timeout);
        let (status, body) = self.send(&what, req).await?;
        if status != 200 {
            return Err(Self::http_error(&what, status, &body));
        }
        Ok(body)
    }

    /// The node classes ComfyUI offers, fetched once and cached until [`invalidate`] is called.
    ///
    /// [`invalidate`]: ComfyClient::invalidate
    pub async fn object_info(&self) -> Result<Arc<ObjectInfo>, ComfyError> {
        if let Some(info) = self.cached_object_info() {
            return Ok(info);
        }
        let what = "GET /object_info";
        let body: Value = self
            .get_json(
                what,
                self.url("object_info")?,
                self.timings.download_timeout,
            )
            .await?;
        let info = Arc::new(
            ObjectInfo::from_json(&body)
                .map_err(|e| ComfyError::Protocol(format!("{what}: {e}")))?,
        );
        if let Ok(mut slot) = self.object_info.lock() {
            *slot = Some(Arc::clone(&info));
        }
        Ok(info)
    }

    /// The cached node classes, if they were fetched since the last [`invalidate`].
    ///
    /// [`invalidate`]: ComfyClient::invalidate
    pub fn cached_object_info(&self) -> Option<Arc<ObjectInfo>> {
        self.object_info.lock().ok().and_then(|slot| slot.clone())
    }

    /// Forgets the cached `/object_info` (ComfyUI restarted, perhaps with other custom nodes or
    /// models); the next [`object_info`] call fetches it again.
    ///
    /// [`object_info`]: ComfyClient::object_info
    pub fn invalidate(&self) {
        if let Ok(mut slot) = self.object_info.lock() {
            *slot = None;
        }
    }

    /// Opens `/ws?clientId=<client id>` and waits for ComfyUI's first frame (its `status`), which
    /// it sends once the socket is registered. Open it before posting a prompt so that no event
    /// is missed.
    pub async fn connect_events(&self) -> Result<EventSocket, ComfyError> {
        let mut url = self.url("ws")?;
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        url.set_scheme(scheme)
            .map_err(|()| ComfyError::Protocol(format!("cannot make a websocket URL of {url}")))?;
        url.query_pairs_mut()
            .append_pair("clientId", &self.client_id);
        let limit = self.timings.connect_timeout;
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER);
        let connect =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false);
        let (ws, _resp) = match tokio::time::timeout(limit, connect).await {
            Err(_) => {
                return Err(ComfyError::Unreachable {
                    url: self.base.to_string(),
                    reason: format!("websocket handshake took longer than {limit:?}"),
                });
            }
            Ok(Err(e)) => {
                return Err(ComfyError::Unreachable {
                    url: self.base.to_string(),
                    reason: format!("websocket: {e}"),
                });
            }
            Ok(Ok(pair)) => pair,
        };
        let mut socket = EventSocket {
            ws,
            buffered: None,
            skipped: 0,
        };
        match tokio::time::timeout(limit, socket.next()).await {
            Ok(Some(WsEvent::Message(WsMessage::Status(_)))) => Ok(socket),
            Ok(Some(WsEvent::Message(other))) => {
                socket.buffered = Some(other);
                Ok(socket)
            }
            Ok(Some(WsEvent::Binary(_))) => Ok(socket),
            Ok(None) => Err(ComfyError::Unreachable {
                url: self.base.to_string(),
                reason: "websocket closed right after connecting".to_owned(),
            }),
            Err(_) => Err(ComfyError::Timeout(format!(
                "no status frame within {limit:?} of opening the websocket"
            ))),
        }
    }

    /// The event socket a run before kept ([`ComfyClient::keep_events`]) under the same
    /// `generation` (the caller's count of ComfyUI restarts), if it is still open: frames that
    /// arrived since (the last run's closing `status`, broadcasts) are dropped without waiting.
    /// `None` when there is none, ComfyUI restarted, or the socket closed: open a new one.
    /// Holding one socket across runs, as ComfyUI expects of a client, spares each run a
    /// connection and a handshake.
    pub fn kept_events(&self, generation: u64) -> Option<EventSocket> {
        let (kept_under, mut socket) = lock_kept(&self.kept_events).take()?;
        if kept_under != generation {
            return None;
        }
        for _ in 0..STALE_FRAMES_MAX {
            match socket.next().now_or_never() {
                // A frame from before this run: not this run's.
                Some(Some(_)) => {}
                // Closed or failed.
                Some(None) => return None,
                // Nothing more waiting: open and quiet.
                None => return Some(socket),
            }
        }
        None
    }

    /// Keeps `socket` for the next run under the same `generation` (see
    /// [`ComfyClient::kept_events`]). Give back only a socket whose run ended normally.
    pub fn keep_events(&self, generation: u64, socket: EventSocket) {
        *lock_kept(&self.kept_events) = Some((generation, socket));
    }

    /// Follows `prompt_id` to its end and returns its files when it succeeded.
    ///
    /// Events for this prompt are relayed to `events` (best effort); other prompts' events are
    /// ignored. `executing {node: null}` for this prompt is its end. When the socket saw the
    /// whole run (it was open before the prompt was posted, never dropped and skipped no frame)
    /// and `execution_success` came, the files are those of the run's `executed` events, which
    /// carry the same ui dicts as the history entry; otherwise the history entry, written by
    /// then, is read. When the socket drops, the client reconnects with
    /// backoff and polls `/history` meanwhile; after a reconnect it checks the history at once,
    /// since the prompt may have ended while it was away. While the socket is up the history is
    /// still polled now and then, as a safety net for a silently dead socket.
    ///
    /// Ends with [`ComfyError::Execution`], [`ComfyError::Interrupted`], [`ComfyError::Lost`] (in
    /// neither queue nor history) or [`ComfyError::Protocol`] (an unreadable history entry).
    /// While ComfyUI is unreachable it keeps trying: callers bound it with their own timeout.
    ///
    /// `socket` is the caller's slot: what is in it at the end (the socket it began with, one
    /// it reconnected, or none) is the caller's to keep or drop.
    pub async fn follow(
        &self,
        prompt_id: &str,
        socket: &mut Option<EventSocket>,
        events: &mpsc::Sender<RunEvent>,
    ) -> Result<Finished, ComfyError> {
        let mut reconnect_at = Instant::now();
        let mut reconnect_failures: u32 = 0;
        let mut poll_at = Instant::now()
            + if socket.is_some() {
                self.timings.safety_poll_interval
            } else {
                Duration::ZERO
            };
        let relay = |ev: RunEvent| {
            // A full or closed receiver must not slow the run down.
            let _ = events.try_send(ev);
        };
        // The ui dicts of this run's `executed` events by node, while the socket has seen every
        // event of the run; `None` once it may have missed one.
        let mut seen: Option<BTreeMap<String, Map<String, Value>>> =
            socket.as_ref().map(|_| BTreeMap::new());
        let skipped_before = socket.as_ref().map_or(0, |s| s.skipped);
        let mut succeeded = false;
        loop {
            if socket.is_none() && Instant::now() >= reconnect_at {
                match self.connect_events().await {
                    Ok(s) => {
                        tracing::debug!(prompt_id, "ComfyUI websocket reconnected");
                        seen = None;
                        *socket = Some(s);
                        reconnect_failures = 0;
                        poll_at = Instant::now();
                    }
                    Err(e) => {
                        reconnect_failures = reconnect_failures.saturating_add(1);
                        let backoff = Duration::from_millis(100)
                            .saturating_mul(2u32.saturating_pow(reconnect_failures.min(16)))
                            .min(self.timings.max_reconnect_backoff);
                        tracing::debug!(prompt_id, error = %e, ?backoff, "ComfyUI websocket reconnect failed");
                        reconnect_at = Instant::now() + backoff;
                    }
                }
            }
            if Instant::now() >= poll_at {
                match self.check(prompt_id).await {
                    Ok(Some(done)) => return done,
                    Ok(None) => {}
                    Err(e) => tracing::debug!(prompt_id, error = %e, "ComfyUI history poll failed"),
                }
                poll_at = Instant::now()
                    + if socket.is_some() {
                        self.timings.safety_poll_interval
                    } else {
                        self.timings.poll_interval
                    };
            }
            let Some(sock) = socket.as_mut() else {
                tokio::time::sleep_until(poll_at.min(reconnect_at)).await;
                continue;
            };
            let event = tokio::select! {
                ev = sock.next() => ev,
                _ = tokio::time::sleep_until(poll_at) => continue,
            };
            let Some(event) = event else {
                tracing::info!(
                    prompt_id,
                    "ComfyUI websocket dropped; reconnecting and polling history"
                );
                relay(RunEvent::Reconnecting);
                seen = None;
                *socket = None;
                reconnect_at = Instant::now();
                poll_at = Instant::now();
                continue;
            };
            let msg = match event {
                WsEvent::Message(msg) => msg,
                WsEvent::Binary(BinaryFrame::PreviewImage { format, image }) => {
                    relay(RunEvent::Preview {
                        format,
                        image: Bytes::from(image),
                    });
                    continue;
                }
                WsEvent::Binary(BinaryFrame::PreviewImageWithMetadata { metadata, image }) => {
                    let format = match metadata.get("image_type").and_then(Value::as_str) {
                        Some("image/png") => 2,
                        _ => 1,
                    };
                    relay(RunEvent::Preview {
                        format,
                        image: Bytes::from(image),
                    });
                    continue;
                }
                WsEvent::Binary(_) => continue,
            };
            // After a reconnect ComfyUI names the running node without a prompt id; this
            // client's id has only this prompt, so it is ours.
            if let WsMessage::Executing(d) = &msg
                && d.prompt_id.is_none()
            {
                if let Some(node) = &d.node {
                    relay(RunEvent::Executing { node: node.clone() });
                }
                continue;
            }
            if msg.prompt_id() != Some(prompt_id) {
                continue;
            }
            match msg {
                WsMessage::ExecutionStart(_) => relay(RunEvent::Started),
                WsMessage::ExecutionCached(d) => relay(RunEvent::Cached { nodes: d.nodes }),
                WsMessage::Executing(d) => match d.node {
                    Some(node) => relay(RunEvent::Executing { node }),
                    None => {
                        if succeeded
                            && sock.skipped == skipped_before
                            && let Some(ui) = &seen
                        {
                            return Ok(Finished::from_ui(ui));
                        }
                        // The history entry is written now.
                        match self.history(prompt_id).await {
                            Ok(Some(entry)) => return finish(entry),
                            Ok(None) => {
                                tracing::warn!(
                                    prompt_id,
                                    "prompt ended but has no history entry yet"
                                );
                                poll_at = Instant::now() + self.timings.poll_interval;
                            }
                            Err(e) => {
                                tracing::debug!(prompt_id, error = %e, "history read failed");
                                poll_at = Instant::now() + self.timings.poll_interval;
                            }
                        }
                    }
                },
                WsMessage::Progress(p) => relay(RunEvent::Progress {
                    node: p.node,
                    value: p.value,
                    max: p.max,
                }),
                WsMessage::Executed(d) => {
                    let files = output_refs(&d.node, &d.output);
                    if let Some(seen) = seen.as_mut() {
                        seen.insert(d.node.clone(), d.output);
                    }
                    relay(RunEvent::Executed {
                        node: d.node,
                        files,
                    });
                }
                WsMessage::ExecutionSuccess(_) => succeeded = true,
                WsMessage::ExecutionError(e) => {
                    return Err(ComfyError::Execution {
                        node_id: e.node_id,
                        node_type: e.node_type,
                        exception_type: e.exception_type,
                        message: e.exception_message,
                        traceback: e.traceback,
                    });
                }
                WsMessage::ExecutionInterrupted(_) => return Err(ComfyError::Interrupted),
                _ => {}
            }
        }
    }

    /// One look at where the prompt is: `Some(end)` when it has ended (or is lost), `None` while
    /// it is queued or running. History, then queue, then history again: the entry is written and
    /// the prompt leaves the queue in one step, so a prompt that ends between the first two
    /// reads is found by the third.
    async fn check(
        &self,
        prompt_id: &str,
    ) -> Result<Option<Result<Finished, ComfyError>>, ComfyError> {
        if let Some(entry) = self.history(prompt_id).await? {
            return Ok(Some(finish(entry)));
        }
        if self.queue().await?.contains(prompt_id) {
            return Ok(None);
        }
        if let Some(entry) = self.history(prompt_id).await? {
            return Ok(Some(finish(entry)));
        }
        Ok(Some(Err(ComfyError::Lost {
            prompt_id: prompt_id.to_owned(),
        })))
    }
}

/// The kept socket's slot; a panic elsewhere while it was held leaves a slot that is still
/// whole (an `Option` swap), so a poisoned lock is used as it is.
fn lock_kept(
    slot: &Mutex<Option<(u64, EventSocket)>>,
) -> std::sync::MutexGuard<'_, Option<(u64, EventSocket)>> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn finish(entry: HistoryEntry) -> Result<Finished, ComfyError> {
    match entry.end() {
        HistoryEnd::Success => Ok(Finished::from_ui(&entry.outputs)),
        HistoryEnd::Error(e) => Err(ComfyError::Execution {
            node_id: e.node_id,
            node_type: e.node_type,
            exception_type: e.exception_type,
            message: e.exception_message,
            traceback: e.traceback,
        }),
        HistoryEnd::Interrupted => Err(ComfyError::Interrupted),
        HistoryEnd::Unknown(what) => Err(ComfyError::Protocol(format!(
            "cannot tell how the prompt ended: {what}"
        ))),
    }
}
