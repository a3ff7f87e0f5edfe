//! The single prompt worker, like ComfyUI's one worker thread: it takes the pending prompt with
//! the lowest number, executes its nodes in dependency order with the per-node output cache, and
//! sends the WebSocket events in ComfyUI's order. The history entry is written after
//! `execution_success` / `execution_error` / `execution_interrupted` and before the final
//! `status` and `executing {node: null}`. Interrupts are honoured only at node boundaries and
//! progress ticks. Fault injection (`--crash-after-prompts`, `--hang-node`, `--fail-node`,
//! `--oom-node`) lives here.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use super::SimConfig;
use super::nodes::{self, Inputs, NodeError, NodeOutput, V};
use super::state::{ExecutedRecord, QueueItem, Shared, WsOut};

/// A cached node result: the signature of its class, inputs and upstream, and its outputs.
struct CacheEntry {
    signature: String,
    values: Vec<V>,
    ui: Option<Value>,
}

/// State that outlives one prompt.
struct Worker {
    shared: Shared,
    cache: HashMap<String, CacheEntry>,
    loaded_models: HashSet<String>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(shared: Shared) {
    let stop = shared.stop_token();
    let mut w = Worker {
        shared: shared.clone(),
        cache: HashMap::new(),
        loaded_models: HashSet::new(),
    };
    loop {
        let notified = shared.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(item) = shared.take_next() {
            w.execute(item).await;
            continue;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The execution context of one prompt, handed to the node implementations.
pub struct Exec<'a> {
    shared: &'a Shared,
    loaded_models: &'a mut HashSet<String>,
    prompt_id: String,
    client_id: Option<String>,
    prompt: Value,
    extra_data: Value,
    /// `progress_state` nodes of this prompt, in first-seen order.
    progress_nodes: Map<String, Value>,
}

enum End {
    Success,
    Error {
        node_id: String,
        node_type: String,
        exception_type: String,
        message: String,
        inputs: Value,
    },
    Interrupted {
        node_id: String,
        node_type: String,
    },
}

impl Exec<'_> {
    pub fn cfg(&self) -> &SimConfig {
        self.shared.cfg()
    }

    pub fn prompt(&self) -> &Value {
        &self.prompt
    }

    pub fn extra_data(&self) -> &Value {
        &self.extra_data
    }

    /// An execution event: only to this prompt's client, and not at all without one.
    fn send_exec(&self, event: &str, data: Value) {
        if let Some(c) = &self.client_id {
            self.shared.send(event, &data, Some(c));
        }
    }

    /// An event that goes to the prompt's client, or to everyone when it has none.
    fn send_routed(&self, event: &str, data: Value) {
        self.shared.send(event, &data, self.client_id.as_deref());
    }

    fn progress_state(&mut self, node: &str, value: f64, max: f64, state: &str) {
        self.progress_nodes.insert(
            node.to_string(),
            json!({
                "value": value, "max": max, "state": state, "node_id": node,
                "prompt_id": self.prompt_id, "display_node_id": node,
                "parent_node_id": null, "real_node_id": node,
            }),
        );
        let data = json!({"prompt_id": self.prompt_id, "nodes": self.progress_nodes});
        self.send_routed("progress_state", data);
    }

    fn interrupted(&self) -> bool {
        self.shared.lock().interrupt
    }

    /// One progress tick: waits `delay`, then reports `value/max`. Fails with `Interrupted`
    /// when an interrupt is pending (checked before and after the wait).
    pub async fn progress(
        &mut self,
        node: &str,
        value: u64,
        max: u64,
        delay: Duration,
    ) -> Result<(), NodeError> {
        if self.interrupted() {
            return Err(NodeError::Interrupted);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.interrupted() {
            return Err(NodeError::Interrupted);
        }
        self.progress_state(node, value as f64, max as f64, "running");
        let data = json!({"value": value, "max": max, "prompt_id": self.prompt_id, "node": node});
        self.send_routed("progress", data);
        Ok(())
    }

    /// Sends a binary TEXT frame (event type 3): `u32 len(node_id)`, node_id, text.
    pub fn send_text(&self, node: &str, text: &str) {
        let mut frame = Vec::with_capacity(8 + node.len() + text.len());
        frame.extend_from_slice(&3u32.to_be_bytes());
        frame.extend_from_slice(&u32::try_from(node.len()).unwrap_or(0).to_be_bytes());
        frame.extend_from_slice(node.as_bytes());
        frame.extend_from_slice(text.as_bytes());
        self.shared
            .send_frame(WsOut::Binary(frame), self.client_id.as_deref());
    }

    /// Simulates loading a checkpoint: slow the first time, instant afterwards.
    pub async fn load_model(&mut self, name: &str) {
        if self.loaded_models.insert(name.to_string()) {
            self.shared.lock().loaded_models = self.loaded_models.len();
            self.sleep_uninterruptible(self.cfg().model_load_time).await;
        }
    }

    pub async fn sleep_uninterruptible(&self, d: Duration) {
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

/// The cache signature of every node reachable from `outputs`: class, widget inputs and the
/// signatures of linked nodes.
fn signatures(prompt: &Map<String, Value>, order: &[String]) -> HashMap<String, String> {
    let mut sigs: HashMap<String, String> = HashMap::new();
    for id in order {
        let node = &prompt[id];
        let mut parts = Map::new();
        if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
            for (k, v) in inputs {
                let part = match link_of(v) {
                    Some((src, slot)) => {
                        json!(["link", sigs.get(&src).cloned().unwrap_or_default(), slot])
                    }
                    None => json!(["value", v]),
                };
                parts.insert(k.clone(), part);
            }
        }
        let sig = json!([node.get("class_type"), parts]).to_string();
        sigs.insert(id.clone(), sig);
    }
    sigs
}

fn link_of(v: &Value) -> Option<(String, usize)> {
    let a = v.as_array()?;
    if a.len() != 2 {
        return None;
    }
    let src = match &a[0] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let slot = a[1].as_u64()? as usize;
    Some((src, slot))
}

/// Dependency order (post-order DFS) of the nodes needed by `outputs`.
fn execution_order(prompt: &Map<String, Value>, outputs: &[String]) -> Vec<String> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    // Iterative DFS with an explicit stack, bounded by the number of nodes.
    for o in outputs {
        let mut stack: Vec<(String, bool)> = vec![(o.clone(), false)];
        while let Some((id, expanded)) = stack.pop() {
            if expanded {
                if seen.insert(id.clone()) {
                    order.push(id);
                }
                continue;
            }
            if seen.contains(&id) || !prompt.contains_key(&id) {
                continue;
            }
            stack.push((id.clone(), true));
            if let Some(inputs) = prompt[&id].get("inputs").and_then(Value::as_object) {
                let deps: Vec<String> = inputs
                    .values()
                    .filter_map(link_of)
                    .map(|(s, _)| s)
                    .collect();
                for d in deps.into_iter().rev() {
                    if !seen.contains(&d) && stack.len() < 100_000 {
                        stack.push((d, false));
                    }
                }
            }
        }
    }
    order
}

fn py_value_repr(v: &V) -> String {
    match v {
        V::Image(imgs) => {
            let (w, h) = imgs.first().map(|i| i.dimensions()).unwrap_or((0, 0));
            format!("tensor of shape [{}, {h}, {w}, 3]", imgs.len())
        }
        V::Json(Value::String(s)) => s.clone(),
        V::Json(v) => v.to_string(),
        V::Mask {
            width,
            height,
            batch,
        } => format!("tensor of shape [{batch}, {height}, {width}]"),
        V::UpscaleModel { name, scale } => format!("<upscale model {name}, x{scale}>"),
        V::Opaque(type_name) => format!("<{type_name}>"),
        other => format!("{other:?}"),
    }
}

impl Worker {
    async fn execute(&mut self, item: QueueItem) {
        let shared = self.shared.clone();
        let cfg = shared.cfg().clone();
        let (started, unload) = {
            let mut g = shared.lock();
            (g.started, std::mem::take(&mut g.unload_requested))
        };
        if unload {
            self.loaded_models.clear();
            self.cache.clear();
            shared.lock().loaded_models = 0;
        }
        let crash_now = cfg.crash_after_prompts.is_some_and(|n| started > n);
        let prompt_map = item.prompt.as_object().cloned().unwrap_or_default();
        let mut ex = Exec {
            shared: &shared,
            loaded_models: &mut self.loaded_models,
            prompt_id: item.prompt_id.clone(),
            client_id: item.client_id(),
            prompt: item.prompt.clone(),
            extra_data: item.extra_data.clone(),
            progress_nodes: Map::new(),
        };
        let mut messages: Vec<Value> = Vec::new();

        let start = json!({"prompt_id": item.prompt_id, "timestamp": now_ms()});
        messages.push(json!(["execution_start", start]));
        ex.send_exec("execution_start", start);

        let order = execution_order(&prompt_map, &item.outputs);
        let sigs = signatures(&prompt_map, &order);
        // Forget cached nodes that are not in this prompt, as ComfyUI's cache does.
        self.cache.retain(|id, _| prompt_map.contains_key(id));
        let cached: Vec<String> = order
            .iter()
            .filter(|id| {
                self.cache
                    .get(*id)
                    .is_some_and(|c| Some(&c.signature) == sigs.get(*id))
            })
            .cloned()
            .collect();
        let cached_msg =
            json!({"nodes": cached, "prompt_id": item.prompt_id, "timestamp": now_ms()});
        messages.push(json!(["execution_cached", cached_msg]));
        ex.send_exec("execution_cached", cached_msg);

        let output_set: HashSet<&String> = item.outputs.iter().collect();
        let mut outputs_ui = Map::new();
        let mut meta = Map::new();
        let mut executed: Vec<String> = Vec::new();
        let mut values: HashMap<String, Vec<V>> = HashMap::new();
        let mut end = End::Success;

        for id in &order {
            let node = &prompt_map[id];
            let class = node
                .get("class_type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if cached.contains(id) {
                if let Some(entry) = self.cache.get(id) {
                    values.insert(id.clone(), entry.values.clone());
                    if let Some(ui) = entry.ui.clone().filter(|_| output_set.contains(id)) {
                        ex.send_exec(
                            "executed",
                            json!({"node": id, "display_node": id, "output": ui, "prompt_id": item.prompt_id}),
                        );
                        ex.progress_state(id, 1.0, 1.0, "finished");
                        outputs_ui.insert(id.clone(), ui);
                        meta.insert(id.clone(), meta_of(id));
                    }
                }
                executed.push(id.clone());
                continue;
            }

            ex.progress_state(id, 0.0, 1.0, "running");
            shared.lock().current_node = Some(id.clone());
            ex.send_exec(
                "executing",
                json!({"node": id, "display_node": id, "prompt_id": item.prompt_id}),
            );
            if crash_now {
                shared.log_executed(&ExecutedRecord {
                    prompt_id: item.prompt_id.clone(),
                    client_id: item.client_id(),
                    number: item.number.clone(),
                    extra_data: item.extra_data.clone(),
                    status: "crashed".to_string(),
                    received_at_ms: item.received_at_ms,
                });
                super::log_line(&cfg, "!!! simulated crash (--crash-after-prompts)");
                std::process::abort();
            }
            if ex.interrupted() {
                end = End::Interrupted {
                    node_id: id.clone(),
                    node_type: class,
                };
                break;
            }
            // Resolve inputs.
            let mut inputs = HashMap::new();
            let mut current_inputs = Map::new();
            if let Some(map) = node.get("inputs").and_then(Value::as_object) {
                for (k, v) in map {
                    let val = match link_of(v) {
                        Some((src, slot)) => values
                            .get(&src)
                            .and_then(|vals| vals.get(slot))
                            .cloned()
                            .unwrap_or_else(|| {
                                V::Opaque(format!("missing output {slot} of node {src}"))
                            }),
                        None => V::Json(v.clone()),
                    };
                    current_inputs.insert(k.clone(), json!([py_value_repr(&val)]));
                    inputs.insert(k.clone(), val);
                }
            }
            let result = if cfg.hang_nodes.contains(&class) {
                super::log_line(&cfg, &format!("simulated hang in node {id} ({class})"));
                std::future::pending::<Result<NodeOutput, NodeError>>().await
            } else if let Some((_, msg)) = cfg.fail_nodes.iter().find(|(c, _)| *c == class) {
                Err(NodeError::failed("RuntimeError", msg.clone()))
            } else if cfg.oom_nodes.contains(&class) {
                Err(NodeError::failed(
                    "torch.OutOfMemoryError",
                    "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 23.99 GiB of which 1.12 GiB is free. Of the allocated memory 20.61 GiB is allocated by PyTorch, and 1.73 GiB is reserved by PyTorch but unallocated.",
                ))
            } else {
                nodes::run(&mut ex, id, &class, &Inputs(inputs)).await
            };
            match result {
                Ok(out) => {
                    if let Some(ui) = out.ui.clone() {
                        ex.send_exec(
                            "executed",
                            json!({"node": id, "display_node": id, "output": ui, "prompt_id": item.prompt_id}),
                        );
                        outputs_ui.insert(id.clone(), ui);
                        meta.insert(id.clone(), meta_of(id));
                    }
                    ex.progress_state(id, 1.0, 1.0, "finished");
                    self.cache.insert(
                        id.clone(),
                        CacheEntry {
                            signature: sigs.get(id).cloned().unwrap_or_default(),
                            values: out.values.clone(),
                            ui: out.ui,
                        },
                    );
                    values.insert(id.clone(), out.values);
                    executed.push(id.clone());
                }
                Err(NodeError::Interrupted) => {
                    end = End::Interrupted {
                        node_id: id.clone(),
                        node_type: class,
                    };
                    break;
                }
                Err(NodeError::Failed {
                    exception_type,
                    message,
                }) => {
                    super::log_line(
                        &cfg,
                        &format!("!!! Exception during processing !!! {message}"),
                    );
                    end = End::Error {
                        node_id: id.clone(),
                        node_type: class,
                        exception_type,
                        message,
                        inputs: Value::Object(current_inputs),
                    };
                    break;
                }
            }
        }
        executed.reverse();

        let (status_str, completed, record_status) = match end {
            End::Success => {
                let data = json!({"prompt_id": item.prompt_id, "timestamp": now_ms()});
                messages.push(json!(["execution_success", data]));
                ex.send_exec("execution_success", data);
                ("success", true, "success")
            }
            End::Error {
                node_id,
                node_type,
                exception_type,
                message,
                inputs,
            } => {
                // A failed node is not cached, and neither is anything that would reuse it.
                self.cache.remove(&node_id);
                let data = json!({
                    "prompt_id": item.prompt_id, "node_id": node_id, "node_type": node_type,
                    "executed": executed, "exception_message": format!("{message}\n"),
                    "exception_type": exception_type,
                    "traceback": [format!("  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n    (simulated node {node_type})\n")],
                    "current_inputs": inputs, "current_outputs": {},
                    "timestamp": now_ms(),
                });
                messages.push(json!(["execution_error", data]));
                ex.send_exec("execution_error", data);
                ("error", false, "error")
            }
            End::Interrupted { node_id, node_type } => {
                super::log_line(&cfg, "Processing interrupted");
                let data = json!({
                    "prompt_id": item.prompt_id, "node_id": node_id, "node_type": node_type,
                    "executed": executed, "timestamp": now_ms(),
                });
                messages.push(json!(["execution_interrupted", data]));
                ex.send_exec("execution_interrupted", data);
                ("error", false, "interrupted")
            }
        };
        let client_id = ex.client_id.clone();
        drop(ex);

        let entry = json!({
            "prompt": item.to_json(),
            "outputs": outputs_ui,
            "status": {"status_str": status_str, "completed": completed, "messages": messages},
            "meta": meta,
        });
        shared.finish(&item.prompt_id, entry);
        shared.log_executed(&ExecutedRecord {
            prompt_id: item.prompt_id.clone(),
            client_id: client_id.clone(),
            number: item.number.clone(),
            extra_data: item.extra_data.clone(),
            status: record_status.to_string(),
            received_at_ms: item.received_at_ms,
        });
        shared.broadcast_status();
        if let Some(c) = &client_id {
            shared.send(
                "executing",
                &json!({"node": null, "prompt_id": item.prompt_id}),
                Some(c),
            );
        }
    }
}

fn meta_of(id: &str) -> Value {
    json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id})
}
