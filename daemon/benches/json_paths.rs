//! JSON on a job's path, measured in one process (not a test; run with
//! `cargo bench -p kiln-daemon --bench json_paths`). It prints, per operation, the time of
//! the way Kiln does it and of the way it did before, on the same input:
//!
//! 1. **ComfyUI WebSocket text frames**, the 17 frames of a recorded run
//!    (`tests/comfyui-recordings/10_run_success_ws.jsonl`): `WsMessage::parse`, which reads
//!    `type` and then `data` straight into its struct, against parsing the frame into a tree of
//!    values and converting its `data`.
//! 2. **A job's workflow** coming from a row or a peer message: `JsonText::parse` (checked,
//!    kept as text) and writing it out again, against parsing it into a `serde_json::Value`
//!    and serializing that. Two workflows: the 3-node one of the cluster bench (~300 bytes)
//!    and a 60-node one (~12 KB, the size of a real SDXL graph with LoRAs and ControlNet).
//!
//! Knob: `JSON_PATHS_ROUNDS` (20000). Figures are printed, never asserted.

mod common;

use std::hint::black_box;
use std::time::Instant;

use anyhow::Context;
use common::env_or;
use kiln_daemon::comfy::types::{
    CachedData, ExecutedData, ExecutingData, ProgressData, ProgressStateData, PromptEvent,
    StatusData, WsMessage,
};
use kiln_daemon::queue::JsonText;
use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    let rounds = env_or("JSON_PATHS_ROUNDS", 20_000).max(1) as usize;
    let frames = recorded_frames()?;
    let frame_bytes: usize = frames.iter().map(String::len).sum();
    println!(
        "1. {} recorded WebSocket frames ({frame_bytes} bytes), {rounds} rounds:",
        frames.len()
    );
    let direct = per_round(rounds, || {
        for frame in &frames {
            black_box(WsMessage::parse(frame).is_ok());
        }
    });
    let tree = per_round(rounds, || {
        for frame in &frames {
            black_box(parse_through_tree(frame));
        }
    });
    println!(
        "   type, then data straight into its struct: {:.2} µs per run's frames; through a \
         tree of values: {:.2} µs ({:.1}×)",
        direct,
        tree,
        tree / direct
    );

    println!("2. a job's workflow read from a row or a peer message and written out again:");
    for (name, workflow) in [
        ("3 nodes", small_workflow()),
        ("60 nodes", large_workflow(60)),
    ] {
        let text = serde_json::to_string(&workflow)?;
        let as_text = per_round(rounds, || {
            let checked = JsonText::parse(text.clone()).ok();
            black_box(checked.map(|t| t.as_str().len()));
        });
        let as_tree = per_round(rounds, || {
            let value: Option<Value> = serde_json::from_str(&text).ok();
            black_box(value.and_then(|v| serde_json::to_string(&v).ok()));
        });
        println!(
            "   {name} ({} bytes): kept as checked text {:.2} µs; as a tree of values {:.2} µs \
             ({:.1}×)",
            text.len(),
            as_text,
            as_tree,
            as_tree / as_text
        );
    }
    Ok(())
}

/// Mean µs of one call of `f` over `rounds` calls (after a tenth as many to warm up).
fn per_round(rounds: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..rounds / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..rounds {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / rounds as f64
}

/// The text frames of the recorded run, as ComfyUI sent them.
fn recorded_frames() -> anyhow::Result<Vec<String>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/comfyui-recordings/10_run_success_ws.jsonl"
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut frames = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let record: Value = serde_json::from_str(line).with_context(|| format!("in {path}"))?;
        if record["kind"] == "text" {
            frames.push(serde_json::to_string(&record["msg"])?);
        }
    }
    anyhow::ensure!(!frames.is_empty(), "{path} holds no text frames");
    Ok(frames)
}

/// A frame parsed into a tree of values, then its `data` converted to the type's struct.
fn parse_through_tree(frame: &str) -> bool {
    fn data<T: serde::de::DeserializeOwned>(data: Value) -> bool {
        serde_json::from_value::<T>(data).is_ok()
    }
    let Ok(mut raw) = serde_json::from_str::<Value>(frame) else {
        return false;
    };
    let kind = raw["type"].as_str().unwrap_or("").to_string();
    let value = raw["data"].take();
    match kind.as_str() {
        "status" => data::<StatusData>(value),
        "execution_start" | "execution_success" => data::<PromptEvent>(value),
        "execution_cached" => data::<CachedData>(value),
        "executing" => data::<ExecutingData>(value),
        "progress" => data::<ProgressData>(value),
        "progress_state" => data::<ProgressStateData>(value),
        "executed" => data::<ExecutedData>(value),
        _ => true,
    }
}

/// EmptyImage → ImageInvert → SaveImage, as the cluster bench submits.
fn small_workflow() -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 1234}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}
    })
}

/// `nodes` nodes in a chain of samplers, prompts and LoRA loaders, with the `_meta` titles a
/// ComfyUI export carries.
fn large_workflow(nodes: usize) -> Value {
    let mut graph = serde_json::Map::new();
    for i in 1..=nodes {
        let prev = (i.max(2) - 1).to_string();
        let node = match i % 3 {
            0 => json!({"class_type": "KSampler", "inputs": {
                "model": [prev, 0], "seed": 1000 + i, "steps": 30, "cfg": 6.5,
                "sampler_name": "dpmpp_2m_sde", "scheduler": "karras", "denoise": 1.0,
                "positive": [prev, 1], "negative": [prev, 2], "latent_image": [prev, 0]},
                "_meta": {"title": format!("KSampler {i}")}}),
            1 => json!({"class_type": "CLIPTextEncode", "inputs": {
                "text": "a cinematic photograph of a kiln at dusk, volumetric light, 35mm, film grain, highly detailed",
                "clip": [prev, 1]}, "_meta": {"title": format!("Prompt {i}")}}),
            _ => json!({"class_type": "LoraLoader", "inputs": {
                "lora_name": "sdxl_detail_tweaker_v1.safetensors", "strength_model": 0.8,
                "strength_clip": 0.8, "model": [prev, 0], "clip": [prev, 1]},
                "_meta": {"title": format!("LoRA {i}")}}),
        };
        graph.insert(i.to_string(), node);
    }
    Value::Object(graph)
}
