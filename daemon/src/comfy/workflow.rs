//! Kiln's own check of an API-format workflow before it is accepted or queued.
//!
//! It checks the graph's structure against the node classes ComfyUI offers (`/object_info`):
//! every node is `{class_type, inputs}`, every class exists, every required input is given,
//! every link points at an existing node and one of its output slots, there is no cycle and at
//! least one output node. Value ranges and value types are left to ComfyUI, which checks them
//! when the prompt is posted. Unlike ComfyUI, which checks only the nodes that feed an output,
//! every node in the graph is checked: a workflow Kiln accepts has no broken parts.
//!
//! This module is pure: it must never do I/O and never change the workflow.

use std::collections::BTreeMap;

use serde_json::Value;

use super::types::ObjectInfo;

/// Why a workflow was refused. Every variant names the node it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    #[error("the workflow is not a JSON object of nodes (found {found})")]
    NotAnObject { found: String },
    #[error("the workflow is not in ComfyUI's API format: {reason}")]
    NotApiFormat { reason: String },
    #[error("node {node_id:?} is not an API-format node: {reason}")]
    BadNode { node_id: String, reason: String },
    #[error("the workflow has no nodes")]
    Empty,
    #[error("node {node_id:?} uses class {class_type:?}, which this ComfyUI does not have")]
    UnknownClass { node_id: String, class_type: String },
    #[error("node {node_id:?} ({class_type}) is missing its required input {input:?}")]
    MissingInput {
        node_id: String,
        class_type: String,
        input: String,
    },
    #[error(
        "node {node_id:?} input {input:?} is not a valid link (expected [\"node id\", output index]): {found}"
    )]
    MalformedLink {
        node_id: String,
        input: String,
        found: String,
    },
    #[error(
        "node {node_id:?} input {input:?} links to node {target:?}, which is not in the workflow"
    )]
    LinkToMissingNode {
        node_id: String,
        input: String,
        target: String,
    },
    #[error(
        "node {node_id:?} input {input:?} links to output {index} of node {target:?} ({target_class}), which has {outputs} output(s)"
    )]
    BadLinkIndex {
        node_id: String,
        input: String,
        target: String,
        target_class: String,
        index: u64,
        outputs: usize,
    },
    #[error("node {node_id:?} is part of a cycle of links")]
    Cycle { node_id: String },
    #[error("the workflow has no output node (such as SaveImage), so ComfyUI would run nothing")]
    NoOutputNode,
}

/// A workflow that passed [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedWorkflow {
    /// The workflow as given (API format), ready to post as the `prompt`.
    pub workflow: Value,
    /// The ids of the output nodes, sorted.
    pub output_nodes: Vec<String>,
    /// Node id → class type, for every node.
    pub classes: BTreeMap<String, String>,
}

/// A link from an input to `[target node id, output index]`.
fn parse_link(value: &Value) -> Option<Result<(&str, u64), ()>> {
    let items = value.as_array()?;
    match items.as_slice() {
        [Value::String(target), index] => {
            Some(index.as_u64().map(|i| (target.as_str(), i)).ok_or(()))
        }
        _ => Some(Err(())),
    }
}

/// Checks `workflow` against the node classes in `info`; see the module docs for what is checked.
pub fn validate(workflow: &Value, info: &ObjectInfo) -> Result<ValidatedWorkflow, WorkflowError> {
    let nodes = match workflow {
        Value::Object(map) => map,
        other => {
            return Err(WorkflowError::NotAnObject {
                found: json_kind(other).to_owned(),
            });
        }
    };
    if nodes.contains_key("nodes") && nodes.contains_key("links") {
        return Err(WorkflowError::NotApiFormat {
            reason: "this is the UI's \"nodes\"/\"links\" export; in ComfyUI use \"Export (API)\" \
                     to get the API format"
                .to_owned(),
        });
    }
    if nodes
        .get("prompt")
        .is_some_and(|p| p.is_object() && p.get("class_type").is_none())
    {
        return Err(WorkflowError::NotApiFormat {
            reason: "this looks like a whole POST /prompt body; send only its \"prompt\" object"
                .to_owned(),
        });
    }
    if nodes.is_empty() {
        return Err(WorkflowError::Empty);
    }

    let mut classes = BTreeMap::new();
    // node id → (input name, target id) for every link, for the cycle check.
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut output_nodes = Vec::new();

    for (node_id, node) in nodes {
        let bad = |reason: &str| WorkflowError::BadNode {
            node_id: node_id.clone(),
            reason: reason.to_owned(),
        };
        let node = node
            .as_object()
            .ok_or_else(|| bad(&format!("it is {}, not an object", json_kind(node))))?;
        let class_type = match node.get("class_type") {
            Some(Value::String(c)) => c,
            Some(other) => {
                return Err(bad(&format!(
                    "\"class_type\" is {}, not a string",
                    json_kind(other)
                )));
            }
            None => return Err(bad("it has no \"class_type\"")),
        };
        let inputs = match node.get("inputs") {
            Some(Value::Object(i)) => i,
            Some(other) => {
                return Err(bad(&format!(
                    "\"inputs\" is {}, not an object",
                    json_kind(other)
                )));
            }
            None => return Err(bad("it has no \"inputs\"")),
        };
        let class = info
            .get(class_type)
            .ok_or_else(|| WorkflowError::UnknownClass {
                node_id: node_id.clone(),
                class_type: class_type.clone(),
            })?;
        for spec in &class.required {
            if !inputs.contains_key(&spec.name) {
                return Err(WorkflowError::MissingInput {
                    node_id: node_id.clone(),
                    class_type: class_type.clone(),
                    input: spec.name.clone(),
                });
            }
        }
        let node_edges = edges.entry(node_id.as_str()).or_default();
        for (input, value) in inputs {
            let Some(link) = parse_link(value) else {
                continue;
            };
            let (target, index) = link.map_err(|()| WorkflowError::MalformedLink {
                node_id: node_id.clone(),
                input: input.clone(),
                found: value.to_string(),
            })?;
            let target_class = nodes
                .get(target)
                .and_then(|t| t.get("class_type"))
                .and_then(Value::as_str)
                .ok_or_else(|| WorkflowError::LinkToMissingNode {
                    node_id: node_id.clone(),
                    input: input.clone(),
                    target: target.to_owned(),
                })?;
            // An unknown target class is reported when the target itself is checked.
            if let Some(target_info) = info.get(target_class) {
                let in_range = usize::try_from(index).is_ok_and(|i| i < target_info.outputs.len());
                if !in_range {
                    return Err(WorkflowError::BadLinkIndex {
                        node_id: node_id.clone(),
                        input: input.clone(),
                        target: target.to_owned(),
                        target_class: target_class.to_owned(),
                        index,
                        outputs: target_info.outputs.len(),
                    });
                }
            }
            node_edges.push(target);
        }
        if class.output_node {
            output_nodes.push(node_id.clone());
        }
        classes.insert(node_id.clone(), class_type.clone());
    }

    if let Some(node_id) = find_cycle(&edges) {
        return Err(WorkflowError::Cycle { node_id });
    }
    if output_nodes.is_empty() {
        return Err(WorkflowError::NoOutputNode);
    }
    output_nodes.sort();
    Ok(ValidatedWorkflow {
        workflow: workflow.clone(),
        output_nodes,
        classes,
    })
}

/// A node on a cycle, if the link graph has one. Iterative depth-first search with colours, so a
/// deep graph cannot overflow the stack.
fn find_cycle(edges: &BTreeMap<&str, Vec<&str>>) -> Option<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<&str, Colour> = edges.keys().map(|k| (*k, Colour::White)).collect();
    for &start in edges.keys() {
        if colour.get(start) != Some(&Colour::White) {
            continue;
        }
        // (node, index of the next edge to follow)
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        colour.insert(start, Colour::Grey);
        while let Some(top) = stack.last_mut() {
            let (node, next) = *top;
            top.1 += 1;
            let targets = edges.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if let Some(&target) = targets.get(next) {
                match colour.get(target).copied().unwrap_or(Colour::Black) {
                    Colour::Grey => return Some(target.to_owned()),
                    Colour::White => {
                        colour.insert(target, Colour::Grey);
                        stack.push((target, 0));
                    }
                    Colour::Black => {}
                }
            } else {
                colour.insert(node, Colour::Black);
                stack.pop();
            }
        }
    }
    None
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
