//! ComfyUI's wire types: the `POST /prompt` body and answers, `node_errors`, history entries,
//! queue listings, `/object_info`, WebSocket text messages and binary frames.
//!
//! The shapes follow the recordings of a real ComfyUI 0.3.64 in
//! `daemon/tests/comfyui-recordings/`. Parsing is lenient where ComfyUI is loose (missing
//! optional fields default, unknown fields are ignored, unknown message types land in
//! [`WsMessage::Other`]) and strict where Kiln relies on a value (ids, statuses).
//!
//! This module is pure data: it must never do I/O or hold state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The body of `POST /prompt`. Kiln always sends its own `prompt_id` and a `client_id`:
/// without a `client_id` ComfyUI sends no per-prompt WebSocket events at all.
#[derive(Debug, Clone, Serialize)]
pub struct PromptRequest<'a, W: ?Sized = Value> {
    /// The API-format graph: node id → `{class_type, inputs}` (a tree of values, or a job's
    /// workflow as its stored JSON text).
    pub prompt: &'a W,
    pub client_id: &'a str,
    pub prompt_id: &'a str,
    /// Kept by ComfyUI in the history entry (and handed to nodes as `EXTRA_PNGINFO`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_data: Option<&'a Value>,
}

/// The 200 answer of `POST /prompt`.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptResponse {
    pub prompt_id: String,
    /// Queue position number; may be negative (`front`) or a float (explicit `number`).
    #[serde(default)]
    pub number: f64,
    /// Non-empty on a 200 when some output branches were invalid and were dropped.
    #[serde(default)]
    pub node_errors: BTreeMap<String, NodeErrorBody>,
}

/// The 400 answer of `POST /prompt`.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptErrorResponse {
    pub error: ErrorDetail,
    #[serde(default)]
    pub node_errors: BTreeMap<String, NodeErrorBody>,
}

/// One error as ComfyUI reports it (`error` of a 400, or one entry of a node's `errors`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[serde(rename = "type", default)]
    pub error_type: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, deserialize_with = "string_or_any")]
    pub details: String,
    #[serde(default)]
    pub extra_info: Value,
}

/// One node's entry in `node_errors`, as sent on the wire (keyed by node id).
#[derive(Debug, Clone, Deserialize)]
pub struct NodeErrorBody {
    #[serde(default)]
    pub errors: Vec<ErrorDetail>,
    #[serde(default)]
    pub dependent_outputs: Vec<String>,
    #[serde(default)]
    pub class_type: String,
}

/// A node that failed ComfyUI's validation, with its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeError {
    pub node_id: String,
    pub class_type: String,
    pub errors: Vec<ErrorDetail>,
    /// The output nodes that were dropped because of this node.
    pub dependent_outputs: Vec<String>,
}

/// Turns the wire map of `node_errors` into a list ordered by node id.
pub fn node_errors_from_wire(map: BTreeMap<String, NodeErrorBody>) -> Vec<NodeError> {
    map.into_iter()
        .map(|(node_id, body)| NodeError {
            node_id,
            class_type: body.class_type,
            errors: body.errors,
            dependent_outputs: body.dependent_outputs,
        })
        .collect()
}

/// `GET /history/{id}` answers `{id: entry}`, or `{}` for an id it does not know.
pub type HistoryResponse = BTreeMap<String, HistoryEntry>;

/// One prompt's history entry.
#[derive(Debug, Clone, Deserialize)]
pub struct HistoryEntry {
    /// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
    #[serde(default)]
    pub prompt: Value,
    /// Output node id → its ui dict (`{"images": [{filename, subfolder, type}], ...}`).
    #[serde(default)]
    pub outputs: BTreeMap<String, Map<String, Value>>,
    #[serde(default)]
    pub status: Option<HistoryStatus>,
    #[serde(default)]
    pub meta: Value,
}

/// The `status` of a history entry.
#[derive(Debug, Clone, Deserialize)]
pub struct HistoryStatus {
    /// `"success"` or `"error"` (interrupted prompts are stored as `"error"` too).
    pub status_str: String,
    #[serde(default)]
    pub completed: bool,
    /// `[[event, data], ...]`: execution_start, execution_cached, and the final event.
    #[serde(default)]
    pub messages: Vec<(String, Value)>,
}

impl HistoryEntry {
    /// Every file listed in this entry's outputs, in node id order.
    pub fn output_files(&self) -> Vec<OutputRef> {
        self.outputs
            .iter()
            .flat_map(|(node_id, ui)| output_refs(node_id, ui))
            .collect()
    }

    /// The final message in `status.messages` with the given event name, if any.
    pub fn status_message(&self, event: &str) -> Option<&Value> {
        self.status
            .as_ref()?
            .messages
            .iter()
            .rev()
            .find(|(name, _)| name == event)
            .map(|(_, data)| data)
    }

    /// How this entry ended, read from its status and messages.
    pub fn end(&self) -> HistoryEnd {
        if let Some(data) = self.status_message("execution_error") {
            let err: ExecutionErrorData =
                serde_json::from_value(data.clone()).unwrap_or_else(|_| ExecutionErrorData {
                    prompt_id: String::new(),
                    node_id: String::new(),
                    node_type: String::new(),
                    exception_message: format!("unreadable execution_error: {data}"),
                    exception_type: String::new(),
                    traceback: Vec::new(),
                });
            return HistoryEnd::Error(err);
        }
        if self.status_message("execution_interrupted").is_some() {
            return HistoryEnd::Interrupted;
        }
        match &self.status {
            Some(status) if status.status_str == "success" => HistoryEnd::Success,
            Some(status) => HistoryEnd::Unknown(format!(
                "status_str {:?} without an execution_error or execution_interrupted message",
                status.status_str
            )),
            None => HistoryEnd::Unknown("history entry has no status".to_owned()),
        }
    }
}

/// How a finished prompt ended, according to its history entry.
#[derive(Debug, Clone)]
pub enum HistoryEnd {
    Success,
    Error(ExecutionErrorData),
    Interrupted,
    /// A status Kiln cannot read; the text says what was found.
    Unknown(String),
}

/// Where ComfyUI keeps a file (`type` in a ui dict and in `/view`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    Output,
    Input,
    /// Previews (PreviewImage and friends): wiped at ComfyUI's start; not results.
    Temp,
}

impl FileType {
    /// The value of `type` in `/view`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FileType::Output => "output",
            FileType::Input => "input",
            FileType::Temp => "temp",
        }
    }

    fn parse(s: &str) -> Option<FileType> {
        match s {
            "output" => Some(FileType::Output),
            "input" => Some(FileType::Input),
            "temp" => Some(FileType::Temp),
            _ => None,
        }
    }
}

/// A file a node listed in its ui dict, addressable through `/view`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OutputRef {
    pub node_id: String,
    /// The ui key it was listed under: `images`, `gifs`, `audio`, `files`, ...
    pub kind: String,
    pub filename: String,
    pub subfolder: String,
    pub file_type: FileType,
}

/// The files in one node's ui dict: every array entry that is an object with a string
/// `filename` (and optionally `subfolder` and `type`, default `output`). Other ui values (text,
/// flags) are not files and are skipped.
pub fn output_refs(node_id: &str, ui: &Map<String, Value>) -> Vec<OutputRef> {
    let mut refs = Vec::new();
    for (kind, value) in ui {
        let Some(items) = value.as_array() else {
            continue;
        };
        for item in items {
            let Some(obj) = item.as_object() else {
                continue;
            };
            let Some(filename) = obj.get("filename").and_then(Value::as_str) else {
                continue;
            };
            let subfolder = obj.get("subfolder").and_then(Value::as_str).unwrap_or("");
            let file_type = match obj.get("type").and_then(Value::as_str) {
                None => FileType::Output,
                Some(t) => match FileType::parse(t) {
                    Some(ft) => ft,
                    None => continue,
                },
            };
            refs.push(OutputRef {
                node_id: node_id.to_owned(),
                kind: kind.clone(),
                filename: filename.to_owned(),
                subfolder: subfolder.to_owned(),
                file_type,
            });
        }
    }
    refs
}

/// `GET /queue`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct QueueResponse {
    #[serde(default)]
    pub queue_running: Vec<Value>,
    #[serde(default)]
    pub queue_pending: Vec<Value>,
}

impl QueueResponse {
    fn item_id(item: &Value) -> Option<&str> {
        item.as_array()?.get(1)?.as_str()
    }

    /// The prompt ids running now.
    pub fn running_ids(&self) -> Vec<&str> {
        self.queue_running
            .iter()
            .filter_map(Self::item_id)
            .collect()
    }

    /// The prompt ids waiting, lowest `number` (next to run) first. ComfyUI lists pending items
    /// in heap order, so they are sorted here.
    pub fn pending_ids(&self) -> Vec<&str> {
        let mut items: Vec<(f64, &str)> = self
            .queue_pending
            .iter()
            .filter_map(|item| {
                let number = item.as_array()?.first()?.as_f64()?;
                Some((number, Self::item_id(item)?))
            })
            .collect();
        items.sort_by(|a, b| a.0.total_cmp(&b.0));
        items.into_iter().map(|(_, id)| id).collect()
    }

    /// Whether the prompt is running or waiting.
    pub fn contains(&self, prompt_id: &str) -> bool {
        self.queue_running
            .iter()
            .chain(self.queue_pending.iter())
            .any(|item| Self::item_id(item) == Some(prompt_id))
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket messages

/// A text frame on `/ws`, typed by its `type`. Unknown types keep their data in [`Other`].
///
/// [`Other`]: WsMessage::Other
#[derive(Debug, Clone, PartialEq)]
pub enum WsMessage {
    Status(StatusData),
    ExecutionStart(PromptEvent),
    ExecutionCached(CachedData),
    Executing(ExecutingData),
    Progress(ProgressData),
    ProgressState(ProgressStateData),
    Executed(ExecutedData),
    ExecutionSuccess(PromptEvent),
    ExecutionError(ExecutionErrorData),
    ExecutionInterrupted(InterruptedData),
    FeatureFlags(Value),
    Other { kind: String, data: Value },
}

/// A frame's `type` and its `data` left unparsed, so each known type's data is read once,
/// straight into its own struct.
#[derive(Deserialize)]
struct RawWsMessage<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

impl WsMessage {
    /// Parses one text frame. A frame that is not `{"type": ..., "data": ...}`, or a known
    /// type whose data does not have the expected shape, is an error naming the type.
    pub fn parse(text: &str) -> Result<WsMessage, String> {
        let raw: RawWsMessage<'_> = serde_json::from_str(text)
            .map_err(|e| format!("websocket frame is not a {{type, data}} object: {e}"))?;
        fn data<T: serde::de::DeserializeOwned>(kind: &str, text: &str) -> Result<T, String> {
            serde_json::from_str(text).map_err(|e| format!("bad {kind} message: {e}"))
        }
        let text = raw.data.map_or("null", |d| d.get());
        let kind: &str = &raw.kind;
        Ok(match kind {
            "status" => WsMessage::Status(data(kind, text)?),
            "execution_start" => WsMessage::ExecutionStart(data(kind, text)?),
            "execution_cached" => WsMessage::ExecutionCached(data(kind, text)?),
            "executing" => WsMessage::Executing(data(kind, text)?),
            "progress" => WsMessage::Progress(data(kind, text)?),
            "progress_state" => WsMessage::ProgressState(data(kind, text)?),
            "executed" => WsMessage::Executed(data(kind, text)?),
            "execution_success" => WsMessage::ExecutionSuccess(data(kind, text)?),
            "execution_error" => WsMessage::ExecutionError(data(kind, text)?),
            "execution_interrupted" => WsMessage::ExecutionInterrupted(data(kind, text)?),
            "feature_flags" => WsMessage::FeatureFlags(data(kind, text)?),
            _ => WsMessage::Other {
                data: data(kind, text)?,
                kind: raw.kind.into_owned(),
            },
        })
    }

    /// The prompt this message is about, when it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            WsMessage::ExecutionStart(d) | WsMessage::ExecutionSuccess(d) => Some(&d.prompt_id),
            WsMessage::ExecutionCached(d) => Some(&d.prompt_id),
            WsMessage::Executing(d) => d.prompt_id.as_deref(),
            WsMessage::Progress(d) => d.prompt_id.as_deref(),
            WsMessage::ProgressState(d) => Some(&d.prompt_id),
            WsMessage::Executed(d) => Some(&d.prompt_id),
            WsMessage::ExecutionError(d) => Some(&d.prompt_id),
            WsMessage::ExecutionInterrupted(d) => Some(&d.prompt_id),
            WsMessage::Status(_) | WsMessage::FeatureFlags(_) | WsMessage::Other { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StatusData {
    pub status: StatusInfo,
    /// Present only in the first frame after connecting: the socket's client id.
    #[serde(default)]
    pub sid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StatusInfo {
    pub exec_info: ExecInfo,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecInfo {
    /// Pending plus running prompts.
    pub queue_remaining: u64,
}

/// `execution_start` and `execution_success`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptEvent {
    pub prompt_id: String,
    #[serde(default)]
    pub timestamp: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CachedData {
    #[serde(default)]
    pub nodes: Vec<String>,
    pub prompt_id: String,
    #[serde(default)]
    pub timestamp: Option<u64>,
}

/// `executing`. `node: null` with our `prompt_id` means the prompt is done and its history entry
/// is written. After a reconnect ComfyUI sends `{node}` with no `prompt_id`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutingData {
    pub node: Option<String>,
    #[serde(default)]
    pub display_node: Option<String>,
    #[serde(default)]
    pub prompt_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProgressData {
    pub value: f64,
    pub max: f64,
    #[serde(default)]
    pub prompt_id: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProgressStateData {
    pub prompt_id: String,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeProgress>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeProgress {
    pub value: f64,
    pub max: f64,
    /// `running` or `finished`.
    pub state: String,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub display_node_id: Option<String>,
    #[serde(default)]
    pub parent_node_id: Option<String>,
    #[serde(default)]
    pub real_node_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutedData {
    pub node: String,
    #[serde(default)]
    pub display_node: Option<String>,
    /// The node's ui dict, the same shape as a history entry's `outputs[node]`; `null` (a
    /// cached node without one) is an empty dict.
    #[serde(default, deserialize_with = "map_or_null")]
    pub output: Map<String, Value>,
    pub prompt_id: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExecutionErrorData {
    pub prompt_id: String,
    #[serde(default, deserialize_with = "string_or_any")]
    pub node_id: String,
    #[serde(default)]
    pub node_type: String,
    #[serde(default)]
    pub exception_message: String,
    #[serde(default)]
    pub exception_type: String,
    #[serde(default)]
    pub traceback: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InterruptedData {
    pub prompt_id: String,
    #[serde(default, deserialize_with = "string_or_any")]
    pub node_id: String,
    #[serde(default)]
    pub node_type: String,
    #[serde(default)]
    pub executed: Vec<String>,
}

/// Accepts an object, or `null` (→ empty).
fn map_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(d)?.unwrap_or_default())
}

/// Accepts a string, `null` (→ empty) or any other JSON value (→ its JSON text).
fn string_or_any<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Binary frames

/// A binary frame on `/ws`: a 4-byte big-endian event type, then the payload.
#[derive(Debug, Clone, PartialEq)]
pub enum BinaryFrame {
    /// Type 1: `u32` format (1 = JPEG, 2 = PNG), then the image.
    PreviewImage { format: u32, image: Vec<u8> },
    /// Type 3: `u32` length of the node id, the node id, then UTF-8 text.
    Text { node_id: String, text: String },
    /// Type 4: `u32` length of the JSON metadata, the metadata, then the image.
    PreviewImageWithMetadata { metadata: Value, image: Vec<u8> },
    /// Any other event type, payload as sent.
    Unknown { event_type: u32, payload: Vec<u8> },
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([slice[0], slice[1], slice[2], slice[3]]))
}

impl BinaryFrame {
    /// Parses a binary frame; a frame too short for its declared lengths is an error.
    pub fn parse(frame: &[u8]) -> Result<BinaryFrame, String> {
        let event_type =
            read_u32(frame, 0).ok_or_else(|| format!("binary frame of {} bytes", frame.len()))?;
        let payload = &frame[4..];
        match event_type {
            1 => {
                let format = read_u32(payload, 0)
                    .ok_or("binary PREVIEW_IMAGE frame without an image format")?;
                Ok(BinaryFrame::PreviewImage {
                    format,
                    image: payload[4..].to_vec(),
                })
            }
            3 => {
                let len = read_u32(payload, 0).ok_or("binary TEXT frame without a length")?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| l.checked_add(4))
                    .filter(|&end| end <= payload.len())
                    .ok_or_else(|| {
                        format!(
                            "binary TEXT frame declares a {len}-byte node id in {} bytes",
                            payload.len()
                        )
                    })?;
                Ok(BinaryFrame::Text {
                    node_id: String::from_utf8_lossy(&payload[4..end]).into_owned(),
                    text: String::from_utf8_lossy(&payload[end..]).into_owned(),
                })
            }
            4 => {
                let len = read_u32(payload, 0)
                    .ok_or("binary PREVIEW_IMAGE_WITH_METADATA frame without a length")?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| l.checked_add(4))
                    .filter(|&end| end <= payload.len())
                    .ok_or_else(|| {
                        format!(
                            "binary preview frame declares {len} bytes of metadata in {} bytes",
                            payload.len()
                        )
                    })?;
                let metadata = serde_json::from_slice(&payload[4..end])
                    .map_err(|e| format!("binary preview frame metadata is not JSON: {e}"))?;
                Ok(BinaryFrame::PreviewImageWithMetadata {
                    metadata,
                    image: payload[end..].to_vec(),
                })
            }
            other => Ok(BinaryFrame::Unknown {
                event_type: other,
                payload: payload.to_vec(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /object_info

/// The node classes a ComfyUI offers, parsed from `GET /object_info`.
#[derive(Debug, Clone, Default)]
pub struct ObjectInfo {
    pub classes: BTreeMap<String, NodeClass>,
}

/// One node class: its inputs, its output types and whether it is an output node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeClass {
    pub name: String,
    pub required: Vec<InputSpec>,
    pub optional: Vec<InputSpec>,
    /// Output types in slot order (`IMAGE`, `LATENT`, ...; a combo output is `COMBO`).
    pub outputs: Vec<String>,
    pub output_node: bool,
    pub category: String,
}

/// One input of a node class.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    /// `INT`, `FLOAT`, `STRING`, `BOOLEAN`, `IMAGE`, ...; `COMBO` for a list of choices.
    pub input_type: String,
    /// The options object (default, min, max, ...), `null` when absent.
    pub options: Value,
    /// The choices of a combo input.
    pub choices: Vec<Value>,
}

impl ObjectInfo {
    /// Parses the body of `GET /object_info` (or `/object_info/{class}`). A class whose entry is
    /// malformed is an error naming the class.
    pub fn from_json(body: &Value) -> Result<ObjectInfo, String> {
        let classes = body
            .as_object()
            .ok_or("object_info is not a JSON object of node classes")?;
        let mut info = ObjectInfo::default();
        for (name, entry) in classes {
            let class = NodeClass::from_json(name, entry)
                .map_err(|e| format!("object_info class {name:?}: {e}"))?;
            info.classes.insert(name.clone(), class);
        }
        Ok(info)
    }

    pub fn get(&self, class_type: &str) -> Option<&NodeClass> {
        self.classes.get(class_type)
    }
}

impl NodeClass {
    fn from_json(name: &str, entry: &Value) -> Result<NodeClass, String> {
        let obj = entry.as_object().ok_or("entry is not an object")?;
        let input = obj.get("input").and_then(Value::as_object);
        let order = obj.get("input_order").and_then(Value::as_object);
        let section = |key: &str| -> Result<Vec<InputSpec>, String> {
            let Some(specs) = input.and_then(|i| i.get(key)) else {
                return Ok(Vec::new());
            };
            let specs = specs
                .as_object()
                .ok_or_else(|| format!("input.{key} is not an object"))?;
            let mut names: Vec<&str> = specs.keys().map(String::as_str).collect();
            if let Some(order) = order.and_then(|o| o.get(key)).and_then(Value::as_array) {
                let ordered: Vec<&str> = order
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|n| specs.contains_key(*n))
                    .collect();
                if ordered.len() == names.len() {
                    names = ordered;
                }
            }
            names
                .into_iter()
                .filter_map(|input_name| specs.get(input_name).map(|spec| (input_name, spec)))
                .map(|(input_name, spec)| {
                    InputSpec::from_json(input_name, spec)
                        .map_err(|e| format!("input {input_name:?}: {e}"))
                })
                .collect()
        };
        let outputs = match obj.get("output") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| match t {
                    Value::String(s) => s.clone(),
                    _ => "COMBO".to_owned(),
                })
                .collect(),
            Some(_) => return Err("output is not a list".to_owned()),
        };
        Ok(NodeClass {
            name: name.to_owned(),
            required: section("required")?,
            optional: section("optional")?,
            outputs,
            output_node: obj
                .get("output_node")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            category: obj
                .get("category")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        })
    }

    /// Looks up an input by name among the required and optional ones.
    pub fn input(&self, name: &str) -> Option<&InputSpec> {
        self.required
            .iter()
            .chain(self.optional.iter())
            .find(|i| i.name == name)
    }
}

impl InputSpec {
    fn from_json(name: &str, spec: &Value) -> Result<InputSpec, String> {
        // `[type, options?]` where type is a string or (old-style combo) a list of choices.
        let parts = spec.as_array().ok_or("spec is not a list")?;
        let first = parts.first().ok_or("spec is an empty list")?;
        let options = parts.get(1).cloned().unwrap_or(Value::Null);
        let (input_type, choices) = match first {
            Value::String(t) => {
                let choices = if t == "COMBO" {
                    options
                        .get("options")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                (t.clone(), choices)
            }
            Value::Array(choices) => ("COMBO".to_owned(), choices.clone()),
            other => return Err(format!("type is neither a name nor a list: {other}")),
        };
        Ok(InputSpec {
            name: name.to_owned(),
            input_type,
            options,
            choices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_frame_decodes_node_id_and_text() {
        let hex = "00000003000000013477696474683a20343039362c206865696768743a20343039360a2062617463682073697a653a2031";
        let bytes = hex::decode(hex).expect("valid hex");
        assert_eq!(
            BinaryFrame::parse(&bytes).expect("parses"),
            BinaryFrame::Text {
                node_id: "4".to_owned(),
                text: "width: 4096, height: 4096\n batch size: 1".to_owned()
            }
        );
    }

    #[test]
    fn short_binary_frames_are_errors_not_panics() {
        assert!(BinaryFrame::parse(&[0, 0]).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 3, 0, 0]).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, b'a']).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 4, 0, 0, 0, 9, b'{']).is_err());
        assert!(BinaryFrame::parse(&[0, 0, 0, 1]).is_err());
        assert_eq!(
            BinaryFrame::parse(&[0, 0, 0, 1, 0, 0, 0, 2, 1, 2]).expect("parses"),
            BinaryFrame::PreviewImage {
                format: 2,
                image: vec![1, 2]
            }
        );
    }

    #[test]
    fn unknown_message_types_are_kept() {
        let msg =
            WsMessage::parse(r#"{"type":"crystools.monitor","data":{"cpu":3}}"#).expect("parses");
        assert_eq!(
            msg,
            WsMessage::Other {
                kind: "crystools.monitor".to_owned(),
                data: json!({"cpu": 3})
            }
        );
        assert!(WsMessage::parse("[1,2]").is_err());
        assert!(WsMessage::parse(r#"{"type":"progress","data":{"value":"x"}}"#).is_err());
    }

    #[test]
    fn executed_with_a_null_output_is_an_empty_ui_dict() {
        let msg = WsMessage::parse(
            r#"{"type": "executed", "data": {"node": "2", "display_node": "2", "output": null, "prompt_id": "p"}}"#,
        )
        .expect("parses");
        let WsMessage::Executed(d) = msg else {
            panic!("not executed: {msg:?}");
        };
        assert_eq!((d.node.as_str(), d.prompt_id.as_str()), ("2", "p"));
        assert!(d.output.is_empty());
        assert!(
            WsMessage::parse(
                r#"{"type": "executed", "data": {"node": "2", "output": [], "prompt_id": "p"}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn output_refs_skip_non_files_and_unknown_types() {
        let ui = json!({
            "images": [{"filename": "a.png", "subfolder": "s", "type": "output"},
                       {"filename": "b.png", "subfolder": "", "type": "temp"},
                       {"filename": "c.png", "type": "elsewhere"}],
            "text": ["hello"],
            "animated": [false],
            "gifs": [{"filename": "d.webp"}]
        });
        let refs = output_refs("9", ui.as_object().expect("object"));
        let names: Vec<(&str, &str, &FileType)> = refs
            .iter()
            .map(|r| (r.kind.as_str(), r.filename.as_str(), &r.file_type))
            .collect();
        assert_eq!(
            names,
            vec![
                ("images", "a.png", &FileType::Output),
                ("images", "b.png", &FileType::Temp),
                ("gifs", "d.webp", &FileType::Output)
            ]
        );
    }

    #[test]
    fn queue_pending_is_sorted_by_number() {
        let q: QueueResponse = serde_json::from_value(json!({
            "queue_running": [[0, "a", {}, {}, []]],
            "queue_pending": [[3, "d", {}, {}, []], [-1, "e", {}, {}, []], [0.5, "f", {}, {}, []]]
        }))
        .expect("parses");
        assert_eq!(q.running_ids(), vec!["a"]);
        assert_eq!(q.pending_ids(), vec!["e", "f", "d"]);
        assert!(q.contains("f"));
        assert!(!q.contains("zz"));
    }
}
