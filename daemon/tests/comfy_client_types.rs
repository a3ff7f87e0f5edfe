//! The ComfyUI wire types and the workflow validator against the recordings of a real ComfyUI
//! (daemon/tests/comfyui-recordings): every recorded WebSocket frame, history body, queue body,
//! POST /prompt answer and the full /object_info must parse, and the validator must agree with
//! what the real server refused.

use std::path::PathBuf;

use kiln_daemon::comfy::types::{
    BinaryFrame, FileType, HistoryEnd, HistoryResponse, ObjectInfo, PromptErrorResponse,
    PromptResponse, QueueResponse, WsMessage, node_errors_from_wire,
};
use kiln_daemon::comfy::workflow::{WorkflowError, validate};
use serde_json::{Value, json};

fn recordings() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/comfyui-recordings")
}

fn read_json(name: &str) -> Value {
    let path = recordings().join(name);
    let text = std::fs::read_to_string(&path).expect("recording is readable");
    serde_json::from_str(&text).expect("recording is JSON")
}

fn response_body(name: &str) -> Value {
    read_json(name)["response"]["body"].clone()
}

fn recorded_files(suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(recordings())
        .expect("recordings dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

fn object_info() -> ObjectInfo {
    let text = std::fs::read_to_string(recordings().join("06_object_info_full.json"))
        .expect("object_info recording");
    let body: Value = serde_json::from_str(&text).expect("object_info is JSON");
    ObjectInfo::from_json(&body).expect("object_info parses")
}

#[test]
fn every_recorded_ws_frame_parses() {
    let mut text_frames = 0;
    let mut known = 0;
    let mut binary = 0;
    for path in recorded_files(".jsonl") {
        let content = std::fs::read_to_string(&path).expect("readable");
        for (line_no, line) in content.lines().enumerate() {
            let frame: Value = serde_json::from_str(line).expect("jsonl line");
            match frame["kind"].as_str() {
                Some("text") => {
                    text_frames += 1;
                    let raw = frame["msg"].to_string();
                    let msg = WsMessage::parse(&raw)
                        .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), line_no + 1));
                    if !matches!(msg, WsMessage::Other { .. }) {
                        known += 1;
                    }
                }
                Some("binary") => {
                    binary += 1;
                    let bytes = hex::decode(frame["hex"].as_str().expect("hex")).expect("hex");
                    let parsed = BinaryFrame::parse(&bytes).expect("binary frame parses");
                    if let BinaryFrame::Text { node_id, text } = parsed {
                        assert_eq!(Some(node_id.as_str()), frame["node_id"].as_str());
                        assert_eq!(Some(text.as_str()), frame["text"].as_str());
                    } else {
                        panic!("recorded binary frames are TEXT frames: {parsed:?}");
                    }
                }
                _ => {}
            }
        }
    }
    assert!(text_frames > 800, "only {text_frames} text frames found");
    assert_eq!(known, text_frames, "every recorded type is a known type");
    assert_eq!(binary, 3);
}

#[test]
fn ws_messages_carry_the_fields_kiln_reads() {
    let line = |file: &str, n: usize| -> WsMessage {
        let content = std::fs::read_to_string(recordings().join(file)).expect("readable");
        let frame: Value =
            serde_json::from_str(content.lines().nth(n).expect("line")).expect("json");
        WsMessage::parse(&frame["msg"].to_string()).expect("parses")
    };
    match line("10_run_success_ws.jsonl", 16) {
        WsMessage::Executing(d) => {
            assert_eq!(d.node, None);
            assert_eq!(
                d.prompt_id.as_deref(),
                Some("0bbb5da7-2650-45f9-93fd-6cd21cfb643e")
            );
        }
        other => panic!("expected executing null, got {other:?}"),
    }
    match line("29_runtime_error_corrupt_image_ws.jsonl", 6) {
        WsMessage::ExecutionError(d) => {
            assert_eq!(d.node_id, "1");
            assert_eq!(d.node_type, "LoadImage");
            assert_eq!(d.exception_type, "PIL.UnidentifiedImageError");
            assert!(!d.traceback.is_empty());
        }
        other => panic!("expected execution_error, got {other:?}"),
    }
    match line("36_ws_reconnect_new_socket.jsonl", 1) {
        WsMessage::Executing(d) => {
            assert_eq!(d.node.as_deref(), Some("2"));
            assert_eq!(d.prompt_id, None);
        }
        other => panic!("expected executing without prompt_id, got {other:?}"),
    }
    match line("08_ws_connect_with_client_id.jsonl", 0) {
        WsMessage::Status(s) => assert_eq!(s.sid.as_deref(), Some("capture-client-1")),
        other => panic!("expected status, got {other:?}"),
    }
    let content =
        std::fs::read_to_string(recordings().join("31_run_progress_ws.jsonl")).expect("readable");
    let progress: Vec<(f64, f64)> = content
        .lines()
        .filter_map(|l| {
            let frame: Value = serde_json::from_str(l).expect("json");
            match WsMessage::parse(&frame["msg"].to_string()) {
                Ok(WsMessage::Progress(p)) => Some((p.value, p.max)),
                _ => None,
            }
        })
        .collect();
    assert_eq!(progress.len(), 25);
    assert_eq!(progress[24], (25.0, 25.0));
}

#[test]
fn every_recorded_history_body_parses() {
    let mut entries = 0;
    for path in recorded_files(".json") {
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let rec = read_json(&name);
        let Some(req_path) = rec["request"]["path"].as_str() else {
            continue;
        };
        if !(req_path.starts_with("/history") && rec["request"]["method"] == "GET") {
            continue;
        }
        let parsed: HistoryResponse = serde_json::from_value(rec["response"]["body"].clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for entry in parsed.values() {
            entries += 1;
            let _ = entry.output_files();
            let _ = entry.end();
        }
    }
    assert!(entries >= 20, "only {entries} history entries parsed");
}

#[test]
fn history_entries_tell_how_a_prompt_ended() {
    let one = |name: &str| {
        let parsed: HistoryResponse =
            serde_json::from_value(response_body(name)).expect("history parses");
        parsed.into_values().next().expect("one entry")
    };
    let ok = one("10_run_success_history.json");
    assert!(matches!(ok.end(), HistoryEnd::Success));
    let files = ok.output_files();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].filename, "capture_simple_00001_.png");
    assert_eq!(files[0].kind, "images");
    assert_eq!(files[0].file_type, FileType::Output);

    match one("29_runtime_error_corrupt_image_history.json").end() {
        HistoryEnd::Error(e) => assert_eq!(e.exception_type, "PIL.UnidentifiedImageError"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(matches!(
        one("32a_history_interrupted.json").end(),
        HistoryEnd::Interrupted
    ));
    let preview = one("31_run_progress_history.json").output_files();
    assert_eq!(preview.len(), 1);
    assert_eq!(preview[0].file_type, FileType::Temp);

    let empty: HistoryResponse =
        serde_json::from_value(response_body("35_history_unknown_id.json")).expect("parses");
    assert!(empty.is_empty());
}

#[test]
fn prompt_answers_parse_into_structured_errors() {
    let ok: PromptResponse =
        serde_json::from_value(response_body("10_run_success_prompt_post.json")).expect("200");
    assert!(ok.node_errors.is_empty());

    let partial: PromptResponse =
        serde_json::from_value(response_body("28_prompt_partially_invalid.json")).expect("200");
    let errs = node_errors_from_wire(partial.node_errors);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].node_id, "4");
    assert_eq!(errs[0].class_type, "LoadImage");
    assert_eq!(errs[0].errors[0].error_type, "custom_validation_failed");

    let missing: PromptErrorResponse =
        serde_json::from_value(response_body("21_prompt_missing_required_input.json"))
            .expect("400");
    assert_eq!(missing.error.error_type, "prompt_outputs_failed_validation");
    let errs = node_errors_from_wire(missing.node_errors);
    assert_eq!(errs[0].node_id, "2");
    assert_eq!(errs[0].errors[0].error_type, "required_input_missing");
    assert_eq!(errs[0].errors[0].details, "image");

    for name in [
        "20_prompt_unknown_node.json",
        "23_prompt_no_prompt_key.json",
        "24_prompt_value_out_of_range.json",
        "25_prompt_no_output_node.json",
        "26_prompt_link_to_missing_node.json",
        "27_prompt_loadimage_missing_file.json",
        "28_prompt_bad_output_index.json",
        "28_prompt_cycle.json",
        "28_prompt_wrong_value_type.json",
    ] {
        let rec = read_json(name);
        assert_eq!(rec["response"]["status"], 400, "{name}");
        let parsed: PromptErrorResponse = serde_json::from_value(rec["response"]["body"].clone())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!parsed.error.error_type.is_empty(), "{name}");
    }
}

#[test]
fn recorded_queues_parse() {
    let busy: QueueResponse =
        serde_json::from_value(response_body("33_queue_with_pending.json")).expect("parses");
    assert_eq!(busy.running_ids().len(), 1);
    let pending = busy.pending_ids();
    assert!(pending.len() >= 4, "{pending:?}");
    let empty: QueueResponse =
        serde_json::from_value(response_body("02_queue_empty.json")).expect("parses");
    assert!(empty.running_ids().is_empty() && empty.pending_ids().is_empty());
}

#[test]
fn full_object_info_parses() {
    let info = object_info();
    assert_eq!(info.classes.len(), 496);
    let save = info.get("SaveImage").expect("SaveImage");
    assert!(save.output_node);
    assert_eq!(save.required.len(), 2);
    assert_eq!(save.required[0].name, "images");
    let load = info.get("LoadImage").expect("LoadImage");
    assert_eq!(load.outputs, vec!["IMAGE", "MASK"]);
    assert_eq!(load.required[0].input_type, "COMBO");
    let ksampler = info.get("KSampler").expect("KSampler");
    assert_eq!(
        ksampler.input("seed").expect("seed").options["max"],
        json!(18446744073709551615u64)
    );
    assert!(ObjectInfo::from_json(&json!([])).is_err());
    assert!(ObjectInfo::from_json(&json!({"X": {"input": {"required": {"a": 3}}}})).is_err());
}

fn request_prompt(name: &str) -> Value {
    let rec = read_json(name);
    let body: Value =
        serde_json::from_str(rec["request"]["body"].as_str().expect("body")).expect("json body");
    body["prompt"].clone()
}

#[test]
fn validator_accepts_the_recorded_runs() {
    let info = object_info();
    for name in [
        "10_workflow_simple_api.json",
        "16_workflow_loadimage.json",
        "29_workflow_runtime_error_corrupt_image.json",
        "30_workflow_slow_blur_2048.json",
        "31_workflow_progress_upscale.json",
    ] {
        let wf = read_json(name);
        let ok = validate(&wf, &info).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!ok.output_nodes.is_empty());
    }
    let ok = validate(&read_json("10_workflow_simple_api.json"), &info).expect("valid");
    assert_eq!(ok.output_nodes, vec!["3"]);
    assert_eq!(ok.classes["1"], "EmptyImage");
}

#[test]
fn validator_refuses_what_comfyui_refused() {
    let info = object_info();
    let check = |name: &str| validate(&request_prompt(name), &info);
    assert_eq!(
        check("20_prompt_unknown_node.json"),
        Err(WorkflowError::UnknownClass {
            node_id: "4".into(),
            class_type: "NoSuchNodeClass".into()
        })
    );
    assert_eq!(
        check("21_prompt_missing_required_input.json"),
        Err(WorkflowError::MissingInput {
            node_id: "2".into(),
            class_type: "ImageInvert".into(),
            input: "image".into()
        })
    );
    assert_eq!(
        check("25_prompt_no_output_node.json"),
        Err(WorkflowError::NoOutputNode)
    );
    assert!(matches!(
        check("26_prompt_link_to_missing_node.json"),
        Err(WorkflowError::LinkToMissingNode { ref target, .. }) if target == "99"
    ));
    assert!(matches!(
        check("28_prompt_bad_output_index.json"),
        Err(WorkflowError::BadLinkIndex {
            index: 5,
            outputs: 1,
            ..
        })
    ));
    assert!(matches!(
        check("28_prompt_cycle.json"),
        Err(WorkflowError::Cycle { .. })
    ));
    // Value ranges, value types and missing input files are ComfyUI's checks.
    assert!(check("24_prompt_value_out_of_range.json").is_ok());
    assert!(check("28_prompt_wrong_value_type.json").is_ok());
    assert!(check("27_prompt_loadimage_missing_file.json").is_ok());
}

#[test]
fn validator_names_structural_mistakes() {
    let info = object_info();
    assert!(matches!(
        validate(&json!("hello"), &info),
        Err(WorkflowError::NotAnObject { .. })
    ));
    assert!(matches!(
        validate(&json!({"nodes": [], "links": [], "version": 0.4}), &info),
        Err(WorkflowError::NotApiFormat { .. })
    ));
    assert!(matches!(
        validate(&json!({"prompt": {"1": {}}, "client_id": "x"}), &info),
        Err(WorkflowError::NotApiFormat { .. })
    ));
    assert_eq!(validate(&json!({}), &info), Err(WorkflowError::Empty));
    assert!(matches!(
        validate(&json!({"1": 5}), &info),
        Err(WorkflowError::BadNode { ref node_id, .. }) if node_id == "1"
    ));
    assert!(matches!(
        validate(&json!({"1": {"inputs": {}}}), &info),
        Err(WorkflowError::BadNode { .. })
    ));
    assert!(matches!(
        validate(&json!({"1": {"class_type": "SaveImage"}}), &info),
        Err(WorkflowError::BadNode { .. })
    ));
    let malformed = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0, 3], "filename_prefix": "x"}}
    });
    assert!(matches!(
        validate(&malformed, &info),
        Err(WorkflowError::MalformedLink { ref input, .. }) if input == "images"
    ));
    let self_loop = json!({
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    });
    assert_eq!(
        validate(&self_loop, &info),
        Err(WorkflowError::Cycle {
            node_id: "1".into()
        })
    );
    let msg = WorkflowError::MissingInput {
        node_id: "7".into(),
        class_type: "KSampler".into(),
        input: "seed".into(),
    }
    .to_string();
    assert!(msg.contains("\"7\"") && msg.contains("KSampler") && msg.contains("seed"));
}
