//! The GPU monitor and `kilnd gpu` against the real NVML loader: on a host without an NVIDIA
//! driver (CI, laptops) they must keep the node running and say why there is no reading; on a GPU
//! host they read the cards. The simulated card must follow the node's load.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kiln_daemon::gpu::{GpuConfig, GpuMonitor, GpuSnapshot, GpuSource, SimLoad};
use tokio::sync::watch;
use tokio::time::Instant;

/// Whether this host has a working NVML (the tests check the driverless behaviour otherwise).
fn host_has_nvml() -> bool {
    kiln_daemon::gpu::nvml::NvmlReader::open(None).is_ok()
}

fn config(source: GpuSource) -> GpuConfig {
    GpuConfig {
        source,
        poll_interval_ms: 200,
        ..GpuConfig::default()
    }
}

fn no_load() -> watch::Receiver<SimLoad> {
    watch::channel(SimLoad::default()).1
}

/// Waits for a snapshot matching `predicate`, up to `limit`; returns the last one seen.
async fn wait_for_snapshot(
    rx: &mut watch::Receiver<GpuSnapshot>,
    limit: Duration,
    predicate: impl Fn(&GpuSnapshot) -> bool,
) -> Result<GpuSnapshot, GpuSnapshot> {
    let deadline = Instant::now() + limit;
    loop {
        let current = rx.borrow_and_update().clone();
        if predicate(&current) {
            return Ok(current);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Err(current),
        }
    }
}

fn util(snapshot: &GpuSnapshot) -> u32 {
    snapshot
        .gpus
        .first()
        .and_then(|gpu| gpu.util_gpu_pct)
        .unwrap_or(u32::MAX)
}

#[test]
fn auto_without_a_driver_publishes_none_with_the_reason() {
    let monitor = GpuMonitor::start(&config(GpuSource::Auto), no_load())
        .expect("auto never fails for lack of a GPU");
    let snapshot = monitor.latest();
    if host_has_nvml() {
        assert_eq!(snapshot.source, "nvml");
        assert!(!snapshot.gpus.is_empty(), "{snapshot:?}");
        return;
    }
    assert_eq!(snapshot.source, "none");
    assert!(snapshot.gpus.is_empty());
    let note = snapshot.note.expect("a none snapshot says why");
    assert!(note.starts_with("no NVIDIA driver: "), "{note}");
    assert!(note.contains("libnvidia-ml.so.1"), "{note}");
    assert_eq!(monitor.subscribe().borrow().source, "none");
}

/// Collects what the `tracing` subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn auto_without_a_driver_warns_once() {
    if host_has_nvml() {
        return;
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let monitor = GpuMonitor::start(&config(GpuSource::Auto), no_load()).expect("starts");
        let rx = monitor.subscribe();
        // No thread polls a driverless monitor: nothing more is published or logged.
        assert!(!rx.has_changed().expect("open while the monitor lives"));
        assert_eq!(monitor.latest().source, "none");
    });
    let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("no NVIDIA driver"), "{log}");
}

#[test]
fn forced_nvml_without_a_driver_fails_clearly() {
    let result = GpuMonitor::start(&config(GpuSource::Nvml), no_load());
    if host_has_nvml() {
        let monitor = result.expect("NVML starts on a GPU host");
        assert_eq!(monitor.latest().source, "nvml");
        return;
    }
    let error = result
        .expect_err("nvml forced without a driver fails")
        .to_string();
    assert!(
        error.starts_with("gpu.source = \"nvml\": no NVIDIA driver: "),
        "{error}"
    );
}

#[test]
fn a_configured_library_that_is_not_nvml_fails_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_a_library = dir.path().join("libnvidia-ml.so.1");
    std::fs::write(&not_a_library, "this is not a shared library\n").expect("write");
    let missing = dir.path().join("missing.so");
    // A real shared library that is not NVML: libc.so.6 (found by the dynamic loader).
    let not_nvml = PathBuf::from("libc.so.6");
    for source in [GpuSource::Auto, GpuSource::Nvml] {
        for (library, reason) in [
            (&not_a_library, "file too short"),
            (&missing, "No such file"),
            (&not_nvml, "nvmlInit_v2"),
        ] {
            let config = GpuConfig {
                nvml_library: Some(library.clone()),
                ..config(source)
            };
            let error = GpuMonitor::start(&config, no_load())
                .expect_err("a library that is not NVML is refused")
                .to_string();
            assert!(
                error.contains(&format!(
                    "{} is not a usable NVML library",
                    library.display()
                )),
                "{source:?}: {error}"
            );
            assert!(error.starts_with("gpu.nvml_library: "), "{error}");
            assert!(error.contains(reason), "{source:?}: {error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
    }
}

#[test]
fn invalid_config_is_refused_before_anything_starts() {
    let config = GpuConfig {
        poll_interval_ms: 10,
        ..config(GpuSource::Sim)
    };
    let error = GpuMonitor::start(&config, no_load())
        .expect_err("a 10 ms poll is refused")
        .to_string();
    assert!(error.starts_with("gpu.poll_interval_ms:"), "{error}");
}

#[test]
fn source_none_publishes_one_snapshot_saying_readings_are_off() {
    let monitor = GpuMonitor::start(&config(GpuSource::None), no_load()).expect("starts");
    let snapshot = monitor.latest();
    assert_eq!(snapshot.source, "none");
    assert!(
        snapshot
            .note
            .as_deref()
            .is_some_and(|note| note.contains("gpu.source = \"none\"")),
        "{snapshot:?}"
    );
}

#[tokio::test]
async fn the_sim_follows_the_load_and_stops_on_drop() {
    let (load_tx, load_rx) = watch::channel(SimLoad { busy: false });
    let config = GpuConfig {
        sim_seed: 7,
        ..config(GpuSource::Sim)
    };
    let monitor = GpuMonitor::start(&config, load_rx).expect("the sim starts");
    let mut rx = monitor.subscribe();
    let idle = monitor.latest();
    assert_eq!(idle.source, "sim");
    assert_eq!(idle.gpus.len(), 1);
    let card = &idle.gpus[0];
    assert_eq!(card.name.as_deref(), Some(config.sim_name.as_str()));
    assert!(util(&idle) <= 3, "{idle:?}");
    let idle_temperature = card.temperature_c.expect("the sim reports a temperature");

    load_tx.send_replace(SimLoad { busy: true });
    let busy = wait_for_snapshot(&mut rx, Duration::from_secs(30), |s| util(s) >= 90)
        .await
        .unwrap_or_else(|last| panic!("utilization never rose under load: {last:?}"));
    let card = &busy.gpus[0];
    assert_eq!(card.uuid, idle.gpus[0].uuid, "the card keeps its identity");
    assert!(card.power_mw.is_some_and(|mw| mw > 200_000), "{card:?}");
    assert!(
        card.mem_used_bytes.is_some_and(|bytes| bytes > 15 << 30),
        "{card:?}"
    );
    assert_eq!(card.processes.as_ref().map(Vec::len), Some(1));
    let hotter = wait_for_snapshot(&mut rx, Duration::from_secs(30), |s| {
        s.gpus[0]
            .temperature_c
            .is_some_and(|t| t > idle_temperature)
    })
    .await;
    assert!(hotter.is_ok(), "the card never warmed: {hotter:?}");

    load_tx.send_replace(SimLoad { busy: false });
    let cooled = wait_for_snapshot(&mut rx, Duration::from_secs(30), |s| util(s) <= 5).await;
    assert!(
        cooled.is_ok(),
        "utilization never fell when idle: {cooled:?}"
    );

    drop(monitor);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => break,
            Err(_) => panic!("the snapshot channel stayed open after the monitor was dropped"),
        }
    }
}

fn kilnd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("kilnd runs")
}

#[test]
fn kilnd_gpu_without_a_driver_exits_1_with_one_line() {
    if host_has_nvml() {
        let output = kilnd(&["gpu"]);
        assert!(output.status.success(), "{output:?}");
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("kilnd gpu prints JSON");
        assert_eq!(json["source"], "nvml");
        return;
    }
    let output = kilnd(&["gpu"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("kilnd gpu: no NVIDIA driver: libnvidia-ml.so.1"),
        "{stderr}"
    );
}

#[test]
fn kilnd_gpu_with_a_bad_library_exits_1_naming_it() {
    let output = kilnd(&["gpu", "--nvml-library", "/nonexistent/libnvidia-ml.so.1"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/libnvidia-ml.so.1 is not a usable NVML library"),
        "{stderr}"
    );
}

#[test]
fn kilnd_gpu_sim_prints_one_simulated_card() {
    let output = kilnd(&["gpu", "--sim"]);
    assert!(output.status.success(), "{output:?}");
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("kilnd gpu --sim prints JSON");
    assert_eq!(json["source"], "sim");
    let gpus = json["gpus"].as_array().expect("gpus is an array");
    assert_eq!(gpus.len(), 1, "{json}");
    let card = &gpus[0];
    assert_eq!(card["name"], "NVIDIA GeForce RTX 4090 (simulated)");
    assert_eq!(card["mem_total_bytes"], 24u64 << 30);
    assert!(card["uuid"].as_str().is_some_and(|u| u.starts_with("GPU-")));
    assert!(
        card["util_gpu_pct"].as_u64().is_some_and(|u| u <= 3),
        "{card}"
    );
    assert_eq!(card["processes"].as_array().map(Vec::len), Some(1));
    // The same host gives the same card.
    let again: serde_json::Value =
        serde_json::from_slice(&kilnd(&["gpu", "--sim"]).stdout).expect("JSON again");
    assert_eq!(again["gpus"][0]["uuid"], card["uuid"]);
}

#[tokio::test]
async fn drop_stops_the_thread_without_waiting_for_the_next_poll() {
    let config = GpuConfig {
        poll_interval_ms: 60_000,
        ..config(GpuSource::Sim)
    };
    let monitor = GpuMonitor::start(&config, no_load()).expect("the sim starts");
    let mut rx = monitor.subscribe();
    assert_eq!(
        monitor.latest().gpus.len(),
        1,
        "the first reading is taken at start"
    );
    let dropping = tokio::task::spawn_blocking(move || drop(monitor));
    // Far less than the 60 s poll interval: the drop wakes the thread at once.
    tokio::time::timeout(Duration::from_secs(10), dropping)
        .await
        .expect("drop returned before the poll interval")
        .expect("drop did not panic");
    assert!(
        rx.changed().await.is_err(),
        "the channel is closed after drop"
    );
}
