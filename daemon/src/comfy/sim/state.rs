//! The simulator's shared in-memory state: the prompt queue, the history, the connected
//! WebSocket clients and the interrupt flag, behind one mutex that is never held across an
//! `.await`. Also the routing of WebSocket frames (per-prompt events to one client, status to
//! everyone). It performs no file I/O except appending to the executed-prompts log.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::SimConfig;
use super::catalog::Catalog;
use super::json::to_py_string;

/// ComfyUI keeps at most this many history entries and drops the oldest.
pub const MAX_HISTORY: usize = 10_000;

/// One line of the `--executed-log` file: a prompt that reached `execution_start`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecutedRecord {
    pub prompt_id: String,
    pub client_id: Option<String>,
    pub number: Value,
    pub extra_data: Value,
    /// `success`, `error`, `interrupted`, or `crashed` (written just before a simulated crash).
    pub status: String,
    /// When `POST /prompt` accepted it, in milliseconds since the Unix epoch (for latency
    /// measurements from the outside).
    pub received_at_ms: f64,
}

/// A queued or running prompt: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
#[derive(Debug, Clone)]
pub struct QueueItem {
    /// As ComfyUI reports it: an integer from the counter, or the caller's number as a float.
    pub number: Value,
    pub sort_key: f64,
    /// Insertion order, to break ties between equal numbers.
    pub seq: u64,
    pub prompt_id: String,
    pub prompt: Value,
    pub extra_data: Value,
    pub outputs: Vec<String>,
    /// When `POST /prompt` accepted it, in milliseconds since the Unix epoch.
    pub received_at_ms: f64,
}

/// Milliseconds since the Unix epoch, now, with sub-millisecond precision.
pub fn unix_ms_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

impl QueueItem {
    pub fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    pub fn client_id(&self) -> Option<String> {
        self.extra_data
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// A frame for one WebSocket.
#[derive(Debug, Clone)]
pub enum WsOut {
    Text(String),
    Binary(Vec<u8>),
}

struct Client {
    conn: u64,
    tx: mpsc::UnboundedSender<WsOut>,
}

#[derive(Default)]
pub struct Inner {
    /// The next `number` handed out (ComfyUI's `server.number`).
    pub counter: i64,
    seq: u64,
    pub pending: Vec<QueueItem>,
    pub running: Option<QueueItem>,
    /// Insertion-ordered history (prompt_id, entry).
    pub history: Vec<(String, Value)>,
    clients: HashMap<String, Client>,
    next_conn: u64,
    /// Set by `/interrupt`; cleared when a prompt starts.
    pub interrupt: bool,
    /// The node the running prompt is executing (for a reconnecting client).
    pub current_node: Option<String>,
    /// How many prompts reached execution_start.
    pub started: u64,
    /// Set by `/free`; the worker unloads its simulated models before the next prompt.
    pub unload_requested: bool,
    /// How many simulated checkpoints are loaded (for `/system_stats`).
    pub loaded_models: usize,
}

struct SharedInner {
    cfg: Arc<SimConfig>,
    catalog: Catalog,
    inner: Mutex<Inner>,
    wake: Notify,
    stop: CancellationToken,
}

/// Cheaply cloneable handle to the state.
#[derive(Clone)]
pub struct Shared(Arc<SharedInner>);

impl Shared {
    pub fn new(cfg: Arc<SimConfig>) -> anyhow::Result<Shared> {
        Ok(Shared(Arc::new(SharedInner {
            cfg,
            catalog: Catalog::load()?,
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            stop: CancellationToken::new(),
        })))
    }

    pub fn cfg(&self) -> &SimConfig {
        &self.0.cfg
    }

    pub fn catalog(&self) -> &Catalog {
        &self.0.catalog
    }

    /// Locks the state. A poisoned lock (a panic elsewhere) still yields the data: every
    /// critical section leaves it consistent.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stop_token(&self) -> CancellationToken {
        self.0.stop.clone()
    }

    pub fn shutdown(&self) {
        self.0.stop.cancel();
        // Drop every socket's sender so that the WebSocket tasks end.
        self.lock().clients.clear();
    }

    pub fn is_busy(&self) -> bool {
        self.lock().running.is_some()
    }

    pub fn wake_worker(&self) {
        self.0.wake.notify_one();
    }

    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.wake.notified()
    }

    /// `pending + running`.
    pub fn queue_remaining(inner: &Inner) -> usize {
        inner.pending.len() + usize::from(inner.running.is_some())
    }

    /// Hands out the next `number` from the counter.
    pub fn next_number(&self) -> i64 {
        let mut g = self.lock();
        let n = g.counter;
        g.counter += 1;
        n
    }

    /// Queues a validated prompt and broadcasts the new status.
    pub fn enqueue(&self, mut item: QueueItem) {
        {
            let mut g = self.lock();
            item.seq = g.seq;
            g.seq += 1;
            g.pending.push(item);
        }
        self.broadcast_status();
        self.wake_worker();
    }

    /// Takes the pending prompt with the lowest number and marks it running.
    pub fn take_next(&self) -> Option<QueueItem> {
        let item = {
            let mut g = self.lock();
            let idx = g
                .pending
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| a.sort_key.total_cmp(&b.sort_key).then(a.seq.cmp(&b.seq)))
                .map(|(i, _)| i)?;
            let item = g.pending.remove(idx);
            g.running = Some(item.clone());
            g.interrupt = false;
            g.current_node = None;
            g.started += 1;
            item
        };
        self.broadcast_status();
        Some(item)
    }

    /// Writes the history entry of the running prompt and clears it.
    pub fn finish(&self, prompt_id: &str, entry: Value) {
        let mut g = self.lock();
        g.history.retain(|(id, _)| id != prompt_id);
        g.history.push((prompt_id.to_string(), entry));
        if g.history.len() > MAX_HISTORY {
            let excess = g.history.len() - MAX_HISTORY;
            g.history.drain(..excess);
        }
        g.running = None;
        g.current_node = None;
    }

    pub fn status_data(inner: &Inner) -> Value {
        json!({"status": {"exec_info": {"queue_remaining": Self::queue_remaining(inner)}}})
    }

    pub fn broadcast_status(&self) {
        let data = Self::status_data(&self.lock());
        self.send("status", &data, None);
    }

    /// Sends an event like ComfyUI's `send_sync`: to the socket `sid`, or to every socket when
    /// `sid` is None.
    pub fn send(&self, event: &str, data: &Value, sid: Option<&str>) {
        let text = to_py_string(&json!({"type": event, "data": data}));
        self.send_frame(WsOut::Text(text), sid);
    }

    pub fn send_frame(&self, frame: WsOut, sid: Option<&str>) {
        let g = self.lock();
        match sid {
            Some(sid) => {
                if let Some(c) = g.clients.get(sid) {
                    let _ = c.tx.send(frame);
                }
            }
            None => {
                for c in g.clients.values() {
                    let _ = c.tx.send(frame.clone());
                }
            }
        }
    }

    /// Registers a socket under `sid`, replacing (silencing) an older one with the same id, and
    /// queues its greeting: `status` with the sid, then `executing {node}` when that client's
    /// prompt is running. Returns the connection number and the receiver of its frames.
    pub fn connect(&self, sid: &str) -> (u64, mpsc::UnboundedReceiver<WsOut>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut g = self.lock();
        let conn = g.next_conn;
        g.next_conn += 1;
        let mut status = Self::status_data(&g);
        if let Some(o) = status.as_object_mut() {
            o.insert("sid".to_string(), Value::String(sid.to_string()));
        }
        let _ = tx.send(WsOut::Text(to_py_string(
            &json!({"type": "status", "data": status}),
        )));
        let own_running = g
            .running
            .as_ref()
            .and_then(QueueItem::client_id)
            .is_some_and(|c| c == sid);
        if own_running && let Some(node) = &g.current_node {
            let msg = json!({"type": "executing", "data": {"node": node}});
            let _ = tx.send(WsOut::Text(to_py_string(&msg)));
        }
        g.clients.insert(sid.to_string(), Client { conn, tx });
        (conn, rx)
    }

    /// Forgets the socket `sid` if it is still connection `conn`.
    pub fn disconnect(&self, sid: &str, conn: u64) {
        let mut g = self.lock();
        if g.clients.get(sid).is_some_and(|c| c.conn == conn) {
            g.clients.remove(sid);
        }
    }

    /// Appends a record to the `--executed-log` file, if configured.
    pub fn log_executed(&self, rec: &ExecutedRecord) {
        let Some(path) = &self.cfg().executed_log else {
            return;
        };
        let line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(_) => return,
        };
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = res {
            super::log_line(
                self.cfg(),
                &format!("cannot append to the executed log {}: {e}", path.display()),
            );
        }
    }
}
