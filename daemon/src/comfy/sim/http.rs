//! The HTTP and WebSocket routes, with ComfyUI's status codes, headers and bodies. Every route
//! is also served under `/api`. Bodies that do not parse give ComfyUI's 500 text/plain answer;
//! unknown routes give 404 with an empty body. Handlers only touch the shared state and the
//! input/output/temp directories; they never block on a running prompt.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Multipart, Path as AxPath, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::SinkExt;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

use super::MODEL_FOLDERS;
use super::json::to_py_string;
use super::state::{QueueItem, Shared, WsOut};
use super::validate::{self, Outcome};

/// The upload limit ComfyUI reports in `/features`.
const MAX_UPLOAD_SIZE: u64 = 104_857_600;

/// Files up to this size are read for `/view` on the event loop; larger ones on a blocking
/// thread, so the server keeps answering meanwhile.
const INLINE_READ_BYTES: u64 = 256 * 1024;

pub fn router(shared: Shared) -> Router {
    let routes = Router::new()
        .route("/ws", get(ws))
        .route("/system_stats", get(system_stats))
        .route("/object_info", get(object_info_all))
        .route("/object_info/{class}", get(object_info_one))
        .route("/features", get(features))
        .route("/models", get(models_list))
        .route("/models/{folder}", get(models_folder))
        .route("/embeddings", get(embeddings))
        .route("/prompt", get(prompt_get).post(prompt_post))
        .route("/queue", get(queue_get).post(queue_post))
        .route("/interrupt", post(interrupt))
        .route("/history", get(history_get).post(history_post))
        .route("/history/{id}", get(history_one))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/free", post(free));
    Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(
            MAX_UPLOAD_SIZE as usize,
        ))
        .with_state(shared)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = Response::new(Body::from(to_py_string(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn ok_json(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

/// aiohttp's answer to an exception in a handler.
fn internal_error() -> Response {
    let mut r = Response::new(Body::from(
        "500 Internal Server Error\n\nServer got itself in trouble",
    ));
    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn not_found() -> Response {
    let mut r = empty(StatusCode::NOT_FOUND);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

/// Parses a JSON body; `None` means ComfyUI would have raised.
fn parse_json(body: &Bytes) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    let total = field("MemTotal:").unwrap_or(128 * 1024 * 1024 * 1024);
    let free = field("MemAvailable:").unwrap_or(total / 2);
    (total, free)
}

async fn system_stats(State(s): State<Shared>) -> Response {
    let cfg = s.cfg();
    let (ram_total, ram_free) = meminfo();
    let loaded = s.lock().loaded_models as u64;
    let used = (loaded * 7_100_000_000 + 400_000_000).min(cfg.vram_bytes);
    let vram_free = cfg.vram_bytes - used;
    let body = json!({
        "system": {
            "os": "posix",
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.7 (main, May  9 2026, 07:35:25) [GCC 12.2.0]",
            "pytorch_version": "2.8.0+cu128",
            "embedded_python": false,
            "argv": cfg.argv,
        },
        "devices": [{
            "name": format!("cuda:0 {} : cudaMallocAsync", cfg.gpu_name),
            "type": "cuda",
            "index": 0,
            "vram_total": cfg.vram_bytes,
            "vram_free": vram_free,
            "torch_vram_total": used,
            "torch_vram_free": used.saturating_sub(loaded * 7_000_000_000),
        }],
    });
    ok_json(&body)
}

async fn object_info_all(State(s): State<Shared>) -> Response {
    ok_json(&s.catalog().render_all(s.cfg()))
}

async fn object_info_one(State(s): State<Shared>, AxPath(class): AxPath<String>) -> Response {
    match s.catalog().render(s.cfg(), &class) {
        Some(node) => {
            let mut m = Map::new();
            m.insert(class, node);
            ok_json(&Value::Object(m))
        }
        None => ok_json(&json!({})),
    }
}

async fn features() -> Response {
    ok_json(&json!({"supports_preview_metadata": true, "max_upload_size": MAX_UPLOAD_SIZE}))
}

fn folder_names(s: &Shared) -> Vec<String> {
    let mut names: Vec<String> = MODEL_FOLDERS.iter().map(|f| (*f).to_string()).collect();
    for k in s.cfg().models.keys() {
        if !names.contains(k) {
            names.push(k.clone());
        }
    }
    names
}

async fn models_list(State(s): State<Shared>) -> Response {
    ok_json(&json!(folder_names(&s)))
}

async fn models_folder(State(s): State<Shared>, AxPath(folder): AxPath<String>) -> Response {
    if !folder_names(&s).contains(&folder) {
        return empty(StatusCode::NOT_FOUND);
    }
    let files = s.cfg().models.get(&folder).cloned().unwrap_or_default();
    ok_json(&json!(files))
}

async fn embeddings(State(s): State<Shared>) -> Response {
    let names: Vec<String> = s
        .cfg()
        .models
        .get("embeddings")
        .map(|f| {
            f.iter()
                .map(|n| {
                    n.rsplit_once('.')
                        .map_or(n.as_str(), |(stem, _)| stem)
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    ok_json(&json!(names))
}

async fn prompt_get(State(s): State<Shared>) -> Response {
    let n = Shared::queue_remaining(&s.lock());
    ok_json(&json!({"exec_info": {"queue_remaining": n}}))
}

/// Python's `str()` of a JSON value used as prompt_id.
fn id_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        other => other.to_string(),
    }
}

/// Extra-data keys that ComfyUI moves out of the stored prompt.
const SENSITIVE_EXTRA_DATA_KEYS: &[&str] = &["auth_token_comfy_org", "api_key_comfy_org"];

async fn prompt_post(State(s): State<Shared>, body: Bytes) -> Response {
    let Some(Value::Object(data)) = parse_json(&body) else {
        return internal_error();
    };
    let (number, sort_key) = match data.get("number") {
        Some(n) => {
            let f = match n {
                Value::Number(n) => n.as_f64(),
                Value::String(t) => t.trim().parse::<f64>().ok(),
                Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
                _ => None,
            };
            let Some(f) = f.filter(|f| f.is_finite()) else {
                return internal_error();
            };
            (json!(f), f)
        }
        None => {
            let mut n = s.next_number();
            let front = data.get("front").is_some_and(|f| match f {
                Value::Bool(b) => *b,
                Value::Null => false,
                Value::Number(x) => x.as_f64().is_some_and(|v| v != 0.0),
                Value::String(t) => !t.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
            });
            if front {
                n = -n;
            }
            (json!(n), n as f64)
        }
    };
    let Some(prompt) = data.get("prompt") else {
        let error = json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}});
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": error, "node_errors": {}}),
        );
    };
    let prompt_id = data
        .get("prompt_id")
        .map(id_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let partial: Option<Vec<String>> = data
        .get("partial_execution_targets")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(id_string).collect());
    let outcome = match validate::validate(s.cfg(), s.catalog(), prompt, partial.as_deref()) {
        Ok(o) => o,
        Err(validate::Malformed) => return internal_error(),
    };
    let mut extra_data = match data.get("extra_data") {
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return internal_error(),
        None => Map::new(),
    };
    if let Some(c) = data.get("client_id") {
        extra_data.insert("client_id".to_string(), c.clone());
    }
    match outcome {
        Outcome::Valid {
            outputs,
            node_errors,
        } => {
            for k in SENSITIVE_EXTRA_DATA_KEYS {
                extra_data.remove(*k);
            }
            s.enqueue(QueueItem {
                number: number.clone(),
                sort_key,
                seq: 0,
                prompt_id: prompt_id.clone(),
                prompt: prompt.clone(),
                extra_data: Value::Object(extra_data),
                outputs,
                received_at_ms: super::state::unix_ms_f64(),
            });
            ok_json(&json!({"prompt_id": prompt_id, "number": number, "node_errors": node_errors}))
        }
        Outcome::Invalid { error, node_errors } => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": error, "node_errors": node_errors}),
        ),
    }
}

async fn queue_get(State(s): State<Shared>) -> Response {
    let g = s.lock();
    let running: Vec<Value> = g.running.iter().map(QueueItem::to_json).collect();
    let pending: Vec<Value> = g.pending.iter().map(QueueItem::to_json).collect();
    drop(g);
    ok_json(&json!({"queue_running": running, "queue_pending": pending}))
}

fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Bool(true)) => true,
    }
}

fn id_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().map(id_string).collect())
        .unwrap_or_default()
}

async fn queue_post(State(s): State<Shared>, body: Bytes) -> Response {
    let Some(Value::Object(data)) = parse_json(&body) else {
        return internal_error();
    };
    let changed = {
        let mut g = s.lock();
        let before = g.pending.len();
        if truthy(data.get("clear")) {
            g.pending.clear();
        }
        let delete = id_list(data.get("delete"));
        if !delete.is_empty() {
            g.pending.retain(|i| !delete.contains(&i.prompt_id));
        }
        g.pending.len() != before
    };
    if changed {
        s.broadcast_status();
    }
    empty(StatusCode::OK)
}

async fn interrupt(State(s): State<Shared>, body: Bytes) -> Response {
    let data = parse_json(&body).unwrap_or_else(|| json!({}));
    let target = data
        .get("prompt_id")
        .filter(|v| truthy(Some(v)))
        .map(id_string);
    let mut g = s.lock();
    match target {
        Some(id) => {
            if g.running.as_ref().is_some_and(|r| r.prompt_id == id) {
                g.interrupt = true;
            } else {
                drop(g);
                super::log_line(
                    s.cfg(),
                    &format!("Prompt {id} is not currently running, skipping interrupt"),
                );
            }
        }
        None => g.interrupt = true,
    }
    empty(StatusCode::OK)
}

async fn history_get(
    State(s): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let max_items = match q.get("max_items").map(|v| v.trim().parse::<i64>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return internal_error(),
    };
    let mut offset = match q.get("offset").map(|v| v.trim().parse::<i64>()) {
        None => -1,
        Some(Ok(n)) => n,
        Some(Err(_)) => return internal_error(),
    };
    let g = s.lock();
    if offset < 0
        && let Some(m) = max_items
    {
        offset = g.history.len() as i64 - m;
    }
    let mut out = Map::new();
    for (i, (id, entry)) in g.history.iter().enumerate() {
        if i as i64 >= offset {
            out.insert(id.clone(), entry.clone());
            if max_items.is_some_and(|m| out.len() as i64 >= m) {
                break;
            }
        }
    }
    drop(g);
    ok_json(&Value::Object(out))
}

async fn history_one(State(s): State<Shared>, AxPath(id): AxPath<String>) -> Response {
    let g = s.lock();
    let mut out = Map::new();
    if let Some((k, v)) = g.history.iter().find(|(k, _)| *k == id) {
        out.insert(k.clone(), v.clone());
    }
    drop(g);
    ok_json(&Value::Object(out))
}

async fn history_post(State(s): State<Shared>, body: Bytes) -> Response {
    let Some(Value::Object(data)) = parse_json(&body) else {
        return internal_error();
    };
    let mut g = s.lock();
    if truthy(data.get("clear")) {
        g.history.clear();
    }
    let delete = id_list(data.get("delete"));
    if !delete.is_empty() {
        g.history.retain(|(id, _)| !delete.contains(id));
    }
    empty(StatusCode::OK)
}

async fn free(State(s): State<Shared>, body: Bytes) -> Response {
    let Some(Value::Object(data)) = parse_json(&body) else {
        return internal_error();
    };
    if truthy(data.get("unload_models")) || truthy(data.get("free_memory")) {
        s.lock().unload_requested = true;
    }
    empty(StatusCode::OK)
}

fn dir_by_type(s: &Shared, kind: &str) -> Option<PathBuf> {
    let cfg = s.cfg();
    match kind {
        "output" => Some(cfg.output_dir.clone()),
        "input" => Some(cfg.input_dir.clone()),
        "temp" => Some(cfg.temp_dir.clone()),
        _ => None,
    }
}

/// Lexical containment check of `sub` (a relative `/` path) under a directory.
fn safe_subfolder(sub: &str) -> bool {
    !sub.starts_with('/') && !sub.split(['/', '\\']).any(|p| p == "..")
}

/// An RFC 7231 HTTP date.
fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {mon} {year} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn content_type_for(name: &str) -> &'static str {
    match name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("json") => "application/json",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    }
}

async fn view(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(filename) = q.get("filename") else {
        return empty(StatusCode::NOT_FOUND);
    };
    let (filename, annotated_dir) = if let Some(f) = filename.strip_suffix(" [output]") {
        (f.to_string(), Some("output"))
    } else if let Some(f) = filename.strip_suffix(" [input]") {
        (f.to_string(), Some("input"))
    } else if let Some(f) = filename.strip_suffix(" [temp]") {
        (f.to_string(), Some("temp"))
    } else {
        (filename.clone(), None)
    };
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let kind = annotated_dir.unwrap_or_else(|| q.get("type").map_or("output", String::as_str));
    let Some(mut dir) = dir_by_type(&s, kind) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if let Some(sub) = q.get("subfolder") {
        if !safe_subfolder(sub) {
            return empty(StatusCode::FORBIDDEN);
        }
        dir = dir.join(sub);
    }
    let base = Path::new(&filename)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(&base);
    // A stat, and the read of a small file, are quick enough for the event loop: a hand-off to
    // a blocking thread would cost more than the work.
    let Ok(meta) = std::fs::metadata(&path) else {
        return empty(StatusCode::NOT_FOUND);
    };
    if !meta.is_file() {
        return empty(StatusCode::NOT_FOUND);
    }
    let read = if meta.len() <= INLINE_READ_BYTES {
        std::fs::read(&path)
    } else {
        tokio::fs::read(&path).await
    };
    let Ok(bytes) = read else {
        return empty(StatusCode::NOT_FOUND);
    };
    let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
    let mtime_ns = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let etag = format!("\"{mtime_ns:x}-{:x}\"", bytes.len());
    let mut r = Response::new(Body::from(bytes));
    let h = r.headers_mut();
    let disp = format!("filename=\"{base}\"");
    if let Ok(v) = HeaderValue::from_str(&disp) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type_for(&base)),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(mtime)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    r
}

async fn upload_image(State(s): State<Shared>, mut multipart: Multipart) -> Response {
    let mut file: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    // Bounded by the body limit: each field consumes bytes of the body.
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => return empty(StatusCode::BAD_REQUEST),
        };
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let Ok(data) = field.bytes().await else {
            return empty(StatusCode::BAD_REQUEST);
        };
        if name == "image" {
            if let Some(f) = file_name {
                file = Some((f, data));
            }
        } else {
            fields.insert(name, String::from_utf8_lossy(&data).into_owned());
        }
    }
    let Some((filename, data)) = file else {
        return empty(StatusCode::BAD_REQUEST);
    };
    if filename.is_empty() || filename.contains('/') || filename.contains("..") {
        return empty(StatusCode::BAD_REQUEST);
    }
    let kind = match fields.get("type").map(String::as_str) {
        Some("temp") => "temp",
        Some("output") => "output",
        _ => "input",
    };
    let Some(dir) = dir_by_type(&s, kind) else {
        return empty(StatusCode::BAD_REQUEST);
    };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    if !safe_subfolder(&subfolder) {
        return empty(StatusCode::BAD_REQUEST);
    }
    let folder = if subfolder.is_empty() {
        dir
    } else {
        dir.join(&subfolder)
    };
    if tokio::fs::create_dir_all(&folder).await.is_err() {
        return internal_error();
    }
    let overwrite = matches!(
        fields.get("overwrite").map(String::as_str),
        Some("true" | "1")
    );
    let (stem, ext) = match filename.rfind('.') {
        Some(i) if i > 0 => (filename[..i].to_string(), filename[i..].to_string()),
        _ => (filename.clone(), String::new()),
    };
    let mut name = filename.clone();
    let mut duplicate = false;
    if !overwrite {
        let mut i = 1u32;
        while folder.join(&name).exists() {
            if tokio::fs::read(folder.join(&name))
                .await
                .is_ok_and(|old| old == data)
            {
                duplicate = true;
                break;
            }
            if i > 100_000 {
                return internal_error();
            }
            name = format!("{stem} ({i}){ext}");
            i += 1;
        }
    }
    if !duplicate && tokio::fs::write(folder.join(&name), &data).await.is_err() {
        return internal_error();
    }
    ok_json(&json!({"name": name, "subfolder": subfolder, "type": kind}))
}

#[derive(serde::Deserialize)]
struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

async fn ws(
    State(s): State<Shared>,
    Query(q): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sid = q
        .client_id
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade
        .read_buffer_size(crate::comfy::client::WS_READ_BUFFER)
        .on_upgrade(move |socket| ws_session(s, sid, socket))
        .into_response()
}

/// At most this many queued frames go out in one write.
const FRAMES_PER_WRITE: usize = 64;

/// Sends `first` and the frames queued behind it in one write: the events of a prompt come in
/// bursts, and a write (and the client's wake-up) per frame costs more than the frames. Each
/// frame stays a frame of its own on the wire.
async fn send_queued(
    socket: &mut WebSocket,
    first: WsOut,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<WsOut>,
) -> Result<(), axum::Error> {
    let message = |frame: WsOut| match frame {
        WsOut::Text(t) => Message::Text(t.into()),
        WsOut::Binary(b) => Message::Binary(b.into()),
    };
    socket.feed(message(first)).await?;
    for _ in 1..FRAMES_PER_WRITE {
        match rx.try_recv() {
            Ok(frame) => socket.feed(message(frame)).await?,
            Err(_) => break,
        }
    }
    socket.flush().await
}

async fn ws_session(s: Shared, sid: String, mut socket: WebSocket) {
    let stop = s.stop_token();
    let (conn, mut rx) = s.connect(&sid);
    let mut silenced = false;
    let mut first = true;
    // Each iteration handles one frame in or out; the loop ends when the socket closes or the
    // server stops.
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            out = rx.recv(), if !silenced => match out {
                Some(frame) => {
                    if send_queued(&mut socket, frame, &mut rx).await.is_err() { break; }
                }
                // Replaced by a newer socket with the same id: stay open, but silent.
                None => silenced = true,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    if first {
                        let is_ff = serde_json::from_str::<Value>(t.as_str())
                            .ok()
                            .is_some_and(|v| v.get("type").and_then(Value::as_str) == Some("feature_flags"));
                        if is_ff {
                            let msg = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": MAX_UPLOAD_SIZE}});
                            if socket.send(Message::Text(to_py_string(&msg).into())).await.is_err() { break; }
                        }
                    }
                    first = false;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => first = false,
            },
        }
    }
    s.disconnect(&sid, conn);
    // Dropping the socket closes the TCP connection without a close frame, like ComfyUI does
    // when it dies.
    drop(socket);
}

#[cfg(test)]
mod tests {
    use super::super::catalog::Catalog;
    use super::*;

    #[test]
    fn http_date_format() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_837_494);
        assert_eq!(http_date(t), "Sat, 28 Nov 2026 03:44:54 GMT");
    }

    #[test]
    fn catalog_combo_detection() {
        assert!(Catalog::combo_choices(&json!([["a", "b"], {}])).is_some());
        assert!(Catalog::combo_choices(&json!(["COMBO", {"options": ["a"]}])).is_some());
        assert!(Catalog::combo_choices(&json!(["INT", {"min": 0}])).is_none());
    }
}
