//! Prompt validation with ComfyUI's rules and error bodies: unknown classes, missing required
//! inputs, links to missing nodes or bad output slots, type mismatches, values that do not
//! convert or are out of range, combo values not in the list, LoadImage files that do not exist,
//! cycles, and prompts without output nodes. Invalid output branches are dropped while valid
//! ones still run. Reads only the catalog and the input directory.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};

use super::SimConfig;
use super::catalog::{Catalog, InputSpec};

/// What POST /prompt does with a prompt.
pub enum Outcome {
    /// Queue it: the outputs to execute and the node errors of dropped branches.
    Valid {
        outputs: Vec<String>,
        node_errors: Value,
    },
    /// 400 with `{"error": error, "node_errors": node_errors}`.
    Invalid { error: Value, node_errors: Value },
}

/// The prompt is malformed in a way that makes ComfyUI raise (answered with a 500).
pub struct Malformed;

/// The result of validating one node: ok, or not ok with reasons (possibly none when the cause
/// is upstream).
#[derive(Clone)]
struct NodeResult {
    ok: bool,
    reasons: Vec<Value>,
}

/// A Python exception raised while validating, that the caller turns into an error entry.
struct Raised {
    exception_type: &'static str,
    message: String,
    traceback: Vec<String>,
}

struct Ctx<'a> {
    cfg: &'a SimConfig,
    catalog: &'a Catalog,
    prompt: &'a Map<String, Value>,
    validated: HashMap<String, NodeResult>,
    /// Insertion order of `validated`, as Python dicts keep it.
    order: Vec<String>,
    in_progress: HashSet<String>,
}

impl Ctx<'_> {
    fn record(&mut self, id: &str, r: NodeResult) {
        if !self.validated.contains_key(id) {
            self.order.push(id.to_string());
        }
        self.validated.insert(id.to_string(), r);
    }
}

fn error_obj(typ: &str, message: &str, details: &str, extra: Value) -> Value {
    json!({"type": typ, "message": message, "details": details, "extra_info": extra})
}

/// Validates a prompt like ComfyUI's `validate_prompt`. `partial` limits the outputs.
pub fn validate(
    cfg: &SimConfig,
    catalog: &Catalog,
    prompt: &Value,
    partial: Option<&[String]>,
) -> Result<Outcome, Malformed> {
    let Value::Object(prompt) = prompt else {
        return Err(Malformed);
    };
    let mut outputs = Vec::new();
    for (id, node) in prompt {
        let Value::Object(node) = node else {
            return Err(Malformed);
        };
        let Some(class) = node.get("class_type") else {
            return Ok(Outcome::Invalid {
                error: error_obj(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    &format!("Node ID '#{id}'"),
                    json!({}),
                ),
                node_errors: json!({}),
            });
        };
        let class = class
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| class.to_string());
        if !catalog.has(&class) {
            return Ok(Outcome::Invalid {
                error: error_obj(
                    "invalid_prompt",
                    &format!("Cannot execute because node {class} does not exist."),
                    &format!("Node ID '#{id}'"),
                    json!({}),
                ),
                node_errors: json!({}),
            });
        }
        if catalog.is_output_node(&class) && partial.is_none_or(|p| p.iter().any(|x| x == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Ok(Outcome::Invalid {
            error: error_obj("prompt_no_outputs", "Prompt has no outputs", "", json!({})),
            node_errors: json!({}),
        });
    }

    let mut ctx = Ctx {
        cfg,
        catalog,
        prompt,
        validated: HashMap::new(),
        order: Vec::new(),
        in_progress: HashSet::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<(String, Vec<Value>)> = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        let (ok, reasons) = match validate_inputs(&mut ctx, o) {
            Ok(r) => (r.ok, r.reasons),
            Err(raised) => {
                let reasons = vec![error_obj(
                    "exception_during_validation",
                    "Exception when validating node",
                    &raised.message,
                    json!({"exception_type": raised.exception_type, "traceback": raised.traceback}),
                )];
                ctx.record(
                    o,
                    NodeResult {
                        ok: false,
                        reasons: reasons.clone(),
                    },
                );
                (false, reasons)
            }
        };
        if ok {
            good.push(o.clone());
            continue;
        }
        failed.push((o.clone(), reasons));
        for id in &ctx.order {
            let Some(r) = ctx.validated.get(id) else {
                continue;
            };
            if r.ok || r.reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(id.clone()).or_insert_with(|| {
                let class = prompt
                    .get(id)
                    .and_then(|n| n.get("class_type"))
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({"errors": r.reasons, "dependent_outputs": [], "class_type": class})
            });
            if let Some(d) = entry
                .get_mut("dependent_outputs")
                .and_then(Value::as_array_mut)
            {
                d.push(Value::String(o.clone()));
            }
        }
    }
    if good.is_empty() {
        let details: Vec<String> = failed
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| {
                format!(
                    "{}: {}",
                    r.get("message").and_then(Value::as_str).unwrap_or(""),
                    r.get("details").and_then(Value::as_str).unwrap_or("")
                )
            })
            .collect();
        return Ok(Outcome::Invalid {
            error: error_obj(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &details.join("\n"),
                json!({}),
            ),
            node_errors: Value::Object(node_errors),
        });
    }
    Ok(Outcome::Valid {
        outputs: good,
        node_errors: Value::Object(node_errors),
    })
}

const TB_OUTER: &str = "  File \"/opt/ComfyUI/execution.py\", line 1010, in validate_prompt\n    m = await validate_inputs(prompt_id, prompt, o, validated)\n";
const TB_INNER: &str = "  File \"/opt/ComfyUI/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n";

/// Python's `repr` of a JSON value, as used in KeyError messages and details.
fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        Value::Null => "None".to_string(),
        Value::Bool(true) => "True".to_string(),
        Value::Bool(false) => "False".to_string(),
        other => other.to_string(),
    }
}

/// Python's `str` of a JSON value.
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

fn types_match(received: &str, input: &InputSpec) -> bool {
    let expected = input.type_name.as_str();
    if received == expected || received == "*" || expected == "*" {
        return true;
    }
    if expected == "COMBO" {
        return matches!(received, "COMBO" | "STRING");
    }
    let r: HashSet<&str> = received.split(',').map(str::trim).collect();
    let e: HashSet<&str> = expected.split(',').map(str::trim).collect();
    r.contains("*") || e.contains("*") || r.intersection(&e).next().is_some()
}

/// Does the LoadImage-style image name point to an existing input file?
fn input_image_exists(cfg: &SimConfig, name: &str) -> bool {
    let (name, base) = if let Some(n) = name.strip_suffix(" [output]") {
        (n, &cfg.output_dir)
    } else if let Some(n) = name.strip_suffix(" [temp]") {
        (n, &cfg.temp_dir)
    } else {
        (
            name.strip_suffix(" [input]").unwrap_or(name),
            &cfg.input_dir,
        )
    };
    if name.is_empty() || name.starts_with('/') || name.split('/').any(|p| p == "..") {
        return false;
    }
    base.join(name).is_file()
}

fn validate_inputs(ctx: &mut Ctx<'_>, id: &str) -> Result<NodeResult, Raised> {
    if let Some(r) = ctx.validated.get(id) {
        return Ok(r.clone());
    }
    if ctx.in_progress.contains(id) {
        // A cycle: ComfyUI rejects the output without naming a node.
        return Ok(NodeResult {
            ok: false,
            reasons: Vec::new(),
        });
    }
    let Some(node) = ctx.prompt.get(id) else {
        return Err(Raised {
            exception_type: "KeyError",
            message: format!("'{id}'"),
            traceback: vec![TB_OUTER.to_string()],
        });
    };
    let class = node
        .get("class_type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
        return Err(Raised {
            exception_type: "KeyError",
            message: "'inputs'".to_string(),
            traceback: vec![TB_OUTER.to_string()],
        });
    };
    ctx.in_progress.insert(id.to_string());
    let result = validate_node(ctx, id, &class, inputs);
    ctx.in_progress.remove(id);
    let r = result?;
    ctx.record(id, r.clone());
    Ok(r)
}

fn validate_node(
    ctx: &mut Ctx<'_>,
    _id: &str,
    class: &str,
    inputs: &Map<String, Value>,
) -> Result<NodeResult, Raised> {
    let specs = ctx.catalog.inputs(ctx.cfg, class);
    let custom_image_check = matches!(class, "LoadImage" | "LoadImageMask");
    let mut errors = Vec::new();
    let mut valid = true;
    for spec in &specs {
        let x = spec.name.as_str();
        let info = spec.spec.clone();
        let Some(val) = inputs.get(x) else {
            if spec.required {
                errors.push(error_obj(
                    "required_input_missing",
                    "Required input is missing",
                    x,
                    json!({"input_name": x}),
                ));
            }
            continue;
        };
        if let Value::Array(link) = val {
            if link.len() != 2 {
                errors.push(error_obj(
                    "bad_linked_input",
                    "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    x,
                    json!({"input_name": x, "input_config": info, "received_value": val}),
                ));
                continue;
            }
            let o_id = py_str(&link[0]);
            let Some(o_node) = ctx.prompt.get(&o_id) else {
                return Err(Raised {
                    exception_type: "KeyError",
                    message: py_repr(&link[0]),
                    traceback: vec![
                        TB_OUTER.to_string(),
                        "  File \"/opt/ComfyUI/execution.py\", line 788, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n".to_string(),
                    ],
                });
            };
            let o_class = o_node
                .get("class_type")
                .and_then(Value::as_str)
                .unwrap_or("");
            let returns = ctx.catalog.outputs(o_class);
            let slot = link[1].as_i64().filter(|s| *s >= 0).map(|s| s as usize);
            let Some(received) = slot.and_then(|s| returns.get(s)).cloned() else {
                return Err(Raised {
                    exception_type: "IndexError",
                    message: "tuple index out of range".to_string(),
                    traceback: vec![
                        TB_OUTER.to_string(),
                        "  File \"/opt/ComfyUI/execution.py\", line 790, in validate_inputs\n    received_type = r[val[1]]\n".to_string(),
                    ],
                });
            };
            if !types_match(&received, spec) {
                let details = format!(
                    "{x}, received_type({received}) mismatch input_type({})",
                    spec.type_name
                );
                errors.push(error_obj(
                    "return_type_mismatch",
                    "Return type mismatch between linked nodes",
                    &details,
                    json!({"input_name": x, "input_config": info, "received_type": received, "linked_node": val}),
                ));
                continue;
            }
            match validate_inputs(ctx, &o_id) {
                Ok(r) => {
                    if !r.ok {
                        valid = false;
                    }
                }
                Err(raised) => {
                    valid = false;
                    let mut tb = vec![TB_INNER.to_string()];
                    tb.extend(raised.traceback.into_iter().skip(1));
                    let reasons = vec![error_obj(
                        "exception_during_inner_validation",
                        "Exception when validating inner node",
                        &raised.message,
                        json!({
                            "input_name": x,
                            "input_config": info,
                            "exception_message": raised.message,
                            "exception_type": raised.exception_type,
                            "traceback": tb,
                            "linked_node": val,
                        }),
                    )];
                    ctx.record(&o_id, NodeResult { ok: false, reasons });
                }
            }
            continue;
        }

        // A widget value.
        let val = match val {
            Value::Object(o) if o.contains_key("__value__") => o["__value__"].clone(),
            v => v.clone(),
        };
        let converted = match convert(&spec.type_name, &val) {
            Ok(v) => v,
            Err(msg) => {
                errors.push(error_obj(
                    "invalid_input_type",
                    &format!("Failed to convert an input value to a {} value", spec.type_name),
                    &format!("{x}, {}, {msg}", py_str(&val)),
                    json!({"input_name": x, "input_config": info, "received_value": val, "exception_message": msg}),
                ));
                continue;
            }
        };
        if custom_image_check && x == "image" {
            continue;
        }
        if let (Some(min), Some(v)) = (
            spec.options.get("min").and_then(Value::as_f64),
            converted.as_f64(),
        ) && v < min
        {
            errors.push(error_obj(
                "value_smaller_than_min",
                &format!(
                    "Value {} smaller than min of {}",
                    converted, spec.options["min"]
                ),
                x,
                json!({"input_name": x, "input_config": info, "received_value": converted}),
            ));
            continue;
        }
        if let (Some(max), Some(v)) = (
            spec.options.get("max").and_then(Value::as_f64),
            converted.as_f64(),
        ) && v > max
        {
            errors.push(error_obj(
                "value_bigger_than_max",
                &format!(
                    "Value {} bigger than max of {}",
                    converted, spec.options["max"]
                ),
                x,
                json!({"input_name": x, "input_config": info, "received_value": converted}),
            ));
            continue;
        }
        if let Some(choices) = Catalog::combo_choices(&spec.spec)
            && !choices.contains(&converted)
        {
            let (list_info, input_config) = if choices.len() > 20 {
                (format!("(list of length {})", choices.len()), Value::Null)
            } else {
                let items: Vec<String> = choices.iter().map(py_repr).collect();
                (format!("[{}]", items.join(", ")), info.clone())
            };
            errors.push(error_obj(
                "value_not_in_list",
                "Value not in list",
                &format!("{x}: '{}' not in {list_info}", py_str(&converted)),
                json!({"input_name": x, "input_config": input_config, "received_value": converted}),
            ));
            continue;
        }
    }
    if custom_image_check && let Some(image) = inputs.get("image").filter(|v| !v.is_array()) {
        let name = py_str(image);
        if !input_image_exists(ctx.cfg, &name) {
            errors.push(error_obj(
                "custom_validation_failed",
                "Custom validation failed for node",
                &format!("image - Invalid image file: {name}"),
                json!({"input_name": "image"}),
            ));
        }
    }
    Ok(NodeResult {
        ok: valid && errors.is_empty(),
        reasons: errors,
    })
}

/// Python's `int()`, `float()`, `str()` and `bool()` conversions of a widget value.
fn convert(type_name: &str, val: &Value) -> Result<Value, String> {
    match type_name {
        "INT" => match val {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Ok(json!(i))
                } else if let Some(u) = n.as_u64() {
                    Ok(json!(u))
                } else {
                    let f = n.as_f64().unwrap_or(0.0);
                    if f.is_finite() {
                        Ok(json!(f.trunc() as i64))
                    } else {
                        Err("cannot convert float infinity to integer".to_string())
                    }
                }
            }
            Value::Bool(b) => Ok(json!(i64::from(*b))),
            Value::String(s) => s
                .trim()
                .replace('_', "")
                .parse::<i64>()
                .map(|i| json!(i))
                .map_err(|_| format!("invalid literal for int() with base 10: '{s}'")),
            Value::Null => Err(
                "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
                    .to_string(),
            ),
            _ => Err(
                "int() argument must be a string, a bytes-like object or a real number, not 'dict'"
                    .to_string(),
            ),
        },
        "FLOAT" => match val {
            Value::Number(n) => Ok(json!(n.as_f64().unwrap_or(0.0))),
            Value::Bool(b) => Ok(json!(if *b { 1.0 } else { 0.0 })),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map(|f| json!(f))
                .map_err(|_| format!("could not convert string to float: '{s}'")),
            Value::Null => {
                Err("float() argument must be a string or a real number, not 'NoneType'".to_string())
            }
            _ => Err("float() argument must be a string or a real number, not 'dict'".to_string()),
        },
        "STRING" => Ok(Value::String(py_str(val))),
        "BOOLEAN" => Ok(Value::Bool(match val {
            Value::Bool(b) => *b,
            Value::Null => false,
            Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        })),
        _ => Ok(val.clone()),
    }
}
