//! Real kilnd processes forming a cluster over loopback: certificates from `kiln certs`, gossip
//! over QUIC and TLS over TCP (a mixed fleet), the view through `kiln status` both as an API
//! client with the operator token and as a gossip member with a certificate.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kiln_e2e::{Node, NodeSpec, bin, cluster_config, free_gossip_port, issue, kiln};
use serde_json::Value;

/// Polls `kiln status --json` with `args` until `want` holds for the parsed view.
async fn wait_view(args: Vec<String>, want: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let output = tokio::task::spawn_blocking({
            let args = args.clone();
            move || {
                Command::new(bin("kiln"))
                    .args(&args)
                    .output()
                    .expect("kiln status runs")
            }
        })
        .await
        .expect("join");
        let last = if output.status.success()
            && let Ok(view) = serde_json::from_slice::<Value>(&output.stdout)
        {
            if want(&view) {
                return view;
            }
            view.to_string()
        } else {
            String::from_utf8_lossy(&output.stderr).into_owned()
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn live_names(view: &Value) -> Vec<String> {
    let mut names: Vec<String> = view["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter(|m| m["live"] == Value::Bool(true))
                .filter_map(|m| m["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn three_nodes_gossip_and_a_killed_node_is_marked_dead() {
    let pki = tempfile::tempdir().expect("temp dir");
    let ca = pki.path().join("ca");
    let init = kiln(&["certs", "init", &ca.to_string_lossy(), "--cluster", "e2e"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let certs: Vec<PathBuf> = ["gpu-a", "gpu-b", "gpu-c"]
        .iter()
        .map(|name| issue(&ca, name, pki.path()))
        .collect();
    let operator = issue(&ca, "operator", pki.path());

    // A and B speak QUIC and TCP; C has no UDP (like a RunPod pod) and reaches them over TCP.
    let ports: Vec<u16> = (0..3).map(|_| free_gossip_port()).collect();
    let seed_quic = format!("quic://127.0.0.1:{}", ports[0]);
    let seed_tcp = format!("tcp://127.0.0.1:{}", ports[0]);
    let configs = [
        cluster_config(&certs[0], ports[0], r#"["quic", "tcp"]"#, &[]),
        cluster_config(
            &certs[1],
            ports[1],
            r#"["quic", "tcp"]"#,
            std::slice::from_ref(&seed_quic),
        ),
        cluster_config(
            &certs[2],
            ports[2],
            r#"["tcp"]"#,
            std::slice::from_ref(&seed_tcp),
        ),
    ];
    let mut nodes = Vec::new();
    for config in configs {
        let spec = NodeSpec {
            extra_config: config,
            ..NodeSpec::default()
        };
        nodes.push(Node::launch(spec).expect("kilnd starts"));
    }
    for node in &nodes {
        node.wait_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("node ready: {e}\n{}", node.log()));
    }

    let token_file = pki.path().join("operator-token");
    std::fs::write(&token_file, &nodes[0].operator_token).expect("token file");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let all = vec!["gpu-a", "gpu-b", "gpu-c"];
    // Through C's API (the TCP-only member), with the operator token.
    let api_args = vec![
        "status".to_string(),
        "--json".to_string(),
        "--api".to_string(),
        nodes[2].url.clone(),
        "--token-file".to_string(),
        token_file.to_string_lossy().into_owned(),
    ];
    let view = wait_view(api_args.clone(), |v| live_names(v) == all, "3 live members").await;
    assert_eq!(view["cluster_id"], "e2e");
    assert_eq!(view["observed_by"], "gpu-c");
    for member in view["members"].as_array().expect("members") {
        assert_eq!(member["role"], "node", "{member}");
        assert_eq!(member["provider"], "local", "{member}");
        assert_eq!(member["price_per_hour"], 0.4, "{member}");
        assert!(
            member["api_url"]
                .as_str()
                .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
            "{member}"
        );
        assert!(member["queue"].is_object(), "{member}");
    }

    // As a gossip member holding a certificate, with no token.
    let member_args = vec![
        "status".to_string(),
        "--json".to_string(),
        "--certs".to_string(),
        operator.to_string_lossy().into_owned(),
        "--seed".to_string(),
        seed_quic.clone(),
        "--timeout".to_string(),
        "20s".to_string(),
    ];
    let view = wait_view(member_args, |v| live_names(v) == all, "3 live via gossip").await;
    assert_eq!(view["observed_by"], "operator");

    // The table names every node.
    let table = kiln(&[
        "status",
        "--api",
        &nodes[0].url,
        "--token-file",
        &token_file.to_string_lossy(),
    ]);
    let text = String::from_utf8_lossy(&table.stdout);
    for name in &all {
        assert!(text.contains(name), "{text}");
    }

    // Kill C: A sees two live members and C dead.
    nodes[2].kill9();
    let api_a = vec![
        "status".to_string(),
        "--json".to_string(),
        "--api".to_string(),
        nodes[0].url.clone(),
        "--token-file".to_string(),
        token_file.to_string_lossy().into_owned(),
    ];
    let view = wait_view(
        api_a,
        |v| live_names(v) == ["gpu-a", "gpu-b"],
        "C marked dead",
    )
    .await;
    let c = view["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "gpu-c"))
        .expect("C still listed, as dead");
    assert_eq!(c["live"], false);
}

#[tokio::test]
async fn certificate_from_another_ca_never_joins() {
    let pki = tempfile::tempdir().expect("temp dir");
    let ca = pki.path().join("ca");
    let rogue_ca = pki.path().join("rogue-ca");
    for dir in [&ca, &rogue_ca] {
        let init = kiln(&["certs", "init", &dir.to_string_lossy(), "--cluster", "e2e"]);
        assert!(init.status.success());
    }
    let good = issue(&ca, "gpu-a", pki.path());
    let rogue_dir = pki.path().join("rogue");
    std::fs::create_dir_all(&rogue_dir).expect("dir");
    let rogue = issue(&rogue_ca, "rogue", &rogue_dir);
    let port = free_gossip_port();
    let node = Node::start(NodeSpec {
        extra_config: cluster_config(&good, port, r#"["quic"]"#, &[]),
        ..NodeSpec::default()
    })
    .await
    .expect("node starts");
    let output = tokio::task::spawn_blocking(move || {
        kiln(&[
            "status",
            "--json",
            "--certs",
            &rogue.to_string_lossy(),
            "--seed",
            &format!("quic://127.0.0.1:{port}"),
            "--timeout",
            "3s",
        ])
    })
    .await
    .expect("join");
    assert!(!output.status.success(), "a stranger must see nothing");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no member answered"), "{stderr}");
    // The node never lists the stranger, and counted the refused handshakes.
    let client = reqwest::Client::new();
    let view: Value = client
        .get(format!("{}/v1/cluster", node.url))
        .bearer_auth(&node.operator_token)
        .send()
        .await
        .expect("cluster view")
        .json()
        .await
        .expect("json");
    assert_eq!(live_names(&view), ["gpu-a"]);
    let metrics = client
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("kiln_gossip_handshakes_rejected_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        rejected >= 1.0,
        "handshake rejections are counted:\n{metrics}"
    );
}
