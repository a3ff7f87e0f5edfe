//! The node catalog: ComfyUI's core node classes as recorded from `/object_info` (embedded from
//! `daemon/data/object_info_core.json`), with the combo lists of model files and input images
//! filled in at request time from the configuration and the input directory.
//!
//! Pure data plus directory listing; it never writes anything.

use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

use super::SimConfig;

const OBJECT_INFO: &str = include_str!("../../../data/object_info_core.json");

/// Which combo inputs list files, and from where.
enum FileSource {
    /// A model folder of the configuration.
    Models(&'static str),
    /// The top-level files of the input directory.
    Input,
}

/// (class, input name, source) of every combo whose choices are files.
const FILE_COMBOS: &[(&str, &str, FileSource)] = &[
    (
        "CheckpointLoaderSimple",
        "ckpt_name",
        FileSource::Models("checkpoints"),
    ),
    (
        "CheckpointLoader",
        "ckpt_name",
        FileSource::Models("checkpoints"),
    ),
    (
        "ImageOnlyCheckpointLoader",
        "ckpt_name",
        FileSource::Models("checkpoints"),
    ),
    (
        "unCLIPCheckpointLoader",
        "ckpt_name",
        FileSource::Models("checkpoints"),
    ),
    (
        "CreateHookModelAsLora",
        "ckpt_name",
        FileSource::Models("checkpoints"),
    ),
    (
        "CreateHookModelAsLoraModelOnly",
        "ckpt_name",
        FileSource::Models("checkpoints"),
    ),
    ("LoraLoader", "lora_name", FileSource::Models("loras")),
    (
        "LoraLoaderModelOnly",
        "lora_name",
        FileSource::Models("loras"),
    ),
    ("CreateHookLora", "lora_name", FileSource::Models("loras")),
    (
        "CreateHookLoraModelOnly",
        "lora_name",
        FileSource::Models("loras"),
    ),
    ("VAELoader", "vae_name", FileSource::Models("vae")),
    (
        "UpscaleModelLoader",
        "model_name",
        FileSource::Models("upscale_models"),
    ),
    (
        "CLIPLoader",
        "clip_name",
        FileSource::Models("text_encoders"),
    ),
    (
        "DualCLIPLoader",
        "clip_name1",
        FileSource::Models("text_encoders"),
    ),
    (
        "DualCLIPLoader",
        "clip_name2",
        FileSource::Models("text_encoders"),
    ),
    (
        "TripleCLIPLoader",
        "clip_name1",
        FileSource::Models("text_encoders"),
    ),
    (
        "TripleCLIPLoader",
        "clip_name2",
        FileSource::Models("text_encoders"),
    ),
    (
        "TripleCLIPLoader",
        "clip_name3",
        FileSource::Models("text_encoders"),
    ),
    (
        "UNETLoader",
        "unet_name",
        FileSource::Models("diffusion_models"),
    ),
    (
        "ControlNetLoader",
        "control_net_name",
        FileSource::Models("controlnet"),
    ),
    (
        "DiffControlNetLoader",
        "control_net_name",
        FileSource::Models("controlnet"),
    ),
    (
        "CLIPVisionLoader",
        "clip_name",
        FileSource::Models("clip_vision"),
    ),
    (
        "StyleModelLoader",
        "style_model_name",
        FileSource::Models("style_models"),
    ),
    ("GLIGENLoader", "gligen_name", FileSource::Models("gligen")),
    (
        "HypernetworkLoader",
        "hypernetwork_name",
        FileSource::Models("hypernetworks"),
    ),
    (
        "PhotoMakerLoader",
        "photomaker_model_name",
        FileSource::Models("photomaker"),
    ),
    ("LoadImage", "image", FileSource::Input),
    ("LoadImageMask", "image", FileSource::Input),
];

/// File extensions that ComfyUI's image loaders list.
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"];

/// The parsed catalog. Cheap to share behind an `Arc`.
pub struct Catalog {
    classes: Map<String, Value>,
}

/// One input of a node class, as validation needs it.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub required: bool,
    /// The type name (`INT`, `IMAGE`, `COMBO`, ...); `COMBO` for inline lists.
    pub type_name: String,
    /// The whole recorded spec (`[type, {options}]`), as ComfyUI echoes it in `input_config`.
    pub spec: Value,
    /// The options object (empty when absent).
    pub options: Map<String, Value>,
}

impl Catalog {
    pub fn load() -> anyhow::Result<Catalog> {
        let classes: Map<String, Value> =
            serde_json::from_str(OBJECT_INFO).context("parsing the embedded object_info data")?;
        Ok(Catalog { classes })
    }

    pub fn has(&self, class: &str) -> bool {
        self.classes.contains_key(class)
    }

    pub fn is_output_node(&self, class: &str) -> bool {
        self.classes
            .get(class)
            .and_then(|c| c.get("output_node"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The output types of a class (`RETURN_TYPES`).
    pub fn outputs(&self, class: &str) -> Vec<String> {
        self.classes
            .get(class)
            .and_then(|c| c.get("output"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| match t {
                        Value::String(s) => s.clone(),
                        _ => "COMBO".to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The required then optional inputs of a class, with combo lists filled in.
    pub fn inputs(&self, cfg: &SimConfig, class: &str) -> Vec<InputSpec> {
        let Some(node) = self.render(cfg, class) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (cat, required) in [("required", true), ("optional", false)] {
            let Some(specs) = node
                .get("input")
                .and_then(|i| i.get(cat))
                .and_then(Value::as_object)
            else {
                continue;
            };
            for (name, spec) in specs {
                let (type_name, options) = match spec {
                    Value::Array(a) => {
                        let t = match a.first() {
                            Some(Value::String(s)) => s.clone(),
                            _ => "COMBO".to_string(),
                        };
                        let o = a
                            .get(1)
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default();
                        (t, o)
                    }
                    Value::String(s) => (s.clone(), Map::new()),
                    _ => ("*".to_string(), Map::new()),
                };
                out.push(InputSpec {
                    name: name.clone(),
                    required,
                    type_name,
                    spec: spec.clone(),
                    options,
                });
            }
        }
        out
    }

    /// The combo choices of an input, if it is a combo.
    pub fn combo_choices(spec: &Value) -> Option<Vec<Value>> {
        let a = spec.as_array()?;
        match a.first()? {
            Value::Array(list) => Some(list.clone()),
            Value::String(t) if t == "COMBO" => a
                .get(1)
                .and_then(|o| o.get("options"))
                .and_then(Value::as_array)
                .cloned()
                .or(Some(Vec::new())),
            _ => None,
        }
    }

    /// One class's object_info entry with its file combos filled in.
    pub fn render(&self, cfg: &SimConfig, class: &str) -> Option<Value> {
        let mut node = self.classes.get(class)?.clone();
        for (c, input, source) in FILE_COMBOS {
            if *c != class {
                continue;
            }
            let files: Vec<Value> = match source {
                FileSource::Models(folder) => {
                    let mut v: Vec<Value> = cfg
                        .models
                        .get(*folder)
                        .map(|f| f.iter().cloned().map(Value::String).collect())
                        .unwrap_or_default();
                    if class == "VAELoader" {
                        v.push(Value::String("pixel_space".to_string()));
                    }
                    v
                }
                FileSource::Input => list_input_images(&cfg.input_dir)
                    .into_iter()
                    .map(Value::String)
                    .collect(),
            };
            for cat in ["required", "optional"] {
                if let Some(spec) = node
                    .get_mut("input")
                    .and_then(|i| i.get_mut(cat))
                    .and_then(|c| c.get_mut(*input))
                    .and_then(Value::as_array_mut)
                {
                    set_combo(spec, files.clone());
                }
            }
        }
        Some(node)
    }

    /// The whole `/object_info` body.
    pub fn render_all(&self, cfg: &SimConfig) -> Value {
        let mut out = Map::new();
        for class in self.classes.keys() {
            if let Some(v) = self.render(cfg, class) {
                out.insert(class.clone(), v);
            }
        }
        Value::Object(out)
    }
}

fn set_combo(spec: &mut [Value], files: Vec<Value>) {
    match spec.first() {
        Some(Value::String(t)) if t == "COMBO" => {
            if let Some(o) = spec.get_mut(1).and_then(Value::as_object_mut) {
                o.insert("options".to_string(), Value::Array(files));
            }
        }
        Some(_) => spec[0] = Value::Array(files),
        None => {}
    }
}

/// The top-level image files of the input directory, sorted (ComfyUI does not descend into
/// subfolders for the combo list, although subfolder paths validate).
pub fn list_input_images(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<String> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.rsplit_once('.')
                .map(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
                .unwrap_or(false)
        })
        .collect();
    files.sort();
    files
}
