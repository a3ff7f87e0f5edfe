//! The job store against real SQLite in temporary folders: durability across reopen,
//! recovery of running jobs, idempotency, quotas, cancel, outputs, group commit under
//! concurrency, migrations and refusal of bad files.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use kiln_daemon::protocol::{JobError, JobStatus, Tier, WatermarkStatus};
use kiln_daemon::queue::{
    CancelOutcome, JobStore, NewJob, NewOutput, Outcome, Quota, QuotaPeriod, StoreError,
    StoreOptions, utc_day,
};
use serde_json::json;

fn new_job(id: &str, account: &str, tier: Tier) -> NewJob {
    NewJob {
        id: id.to_string(),
        account: account.to_string(),
        tier,
        workflow: json!({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}).into(),
        webhook: Some("https://example.com/hook".to_string()),
        metadata: Some(json!({"user": account})),
        idempotency_key: None,
        body_hash: format!("hash-{id}"),
        max_attempts: 3,
        replica: None,
    }
}

async fn open(dir: &std::path::Path) -> JobStore {
    JobStore::open(dir, StoreOptions::default())
        .await
        .expect("open store")
}

fn ids(store: &JobStore) -> Vec<String> {
    store.queue_order().into_iter().map(|j| j.id).collect()
}

#[tokio::test]
async fn submit_get_list_and_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let s = store
        .submit(new_job("j1", "alice", Tier::Pro), None)
        .await
        .expect("submit");
    assert!(s.created);
    assert_eq!(s.job.status, JobStatus::Queued);
    store
        .submit(new_job("j2", "alice", Tier::Free), None)
        .await
        .expect("submit");
    store
        .submit(new_job("j3", "bob", Tier::Free), None)
        .await
        .expect("submit");
    let got = store.get("j1").await.expect("get").expect("stored");
    assert_eq!(got, s.job);
    assert_eq!(store.get("nope").await.expect("get"), None);
    let list: Vec<String> = store
        .list("alice", None, 10)
        .await
        .expect("list")
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(list, vec!["j2", "j1"]);
    assert!(
        store
            .list("alice", Some(JobStatus::Running), 10)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(store.list("alice", None, 1).await.expect("list").len(), 1);
    assert_eq!(store.position("j1"), Some(1));
    assert_eq!(store.position("j2"), Some(2));
    assert_eq!(store.position("j3"), Some(3));
    // A new bob free job would wait behind j1 (pro), alice's j2 and bob's j3.
    assert_eq!(store.queued_ahead(Tier::Free, "bob"), 3);
    assert_eq!(store.queued_ahead(Tier::Enterprise, "carol"), 0);
    let events = store.events("j1").await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].status, JobStatus::Queued);
    let summary = store.summary();
    assert_eq!(summary.running, 0);
    let free = summary
        .tiers
        .iter()
        .find(|t| t.tier == Tier::Free)
        .expect("free tier");
    assert_eq!((free.queued, free.accounts), (2, 2));
    // The very same submission again returns the stored job; another body under its id is
    // refused.
    let again = store
        .submit(new_job("j1", "alice", Tier::Pro), None)
        .await
        .expect("same submission");
    assert!(!again.created);
    assert_eq!(again.job.id, "j1");
    let mut other = new_job("j1", "alice", Tier::Pro);
    other.body_hash = "another body".to_string();
    let err = store.submit(other, None).await.expect_err("duplicate id");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    let err = store
        .submit(new_job("../x", "alice", Tier::Pro), None)
        .await
        .expect_err("bad id");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn queued_order_and_running_jobs_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    for (i, (account, tier)) in [
        ("a", Tier::Free),
        ("a", Tier::Free),
        ("b", Tier::Free),
        ("c", Tier::Pro),
        ("a", Tier::Pro),
        ("b", Tier::Enterprise),
    ]
    .into_iter()
    .enumerate()
    {
        store
            .submit(new_job(&format!("j{i}"), account, tier), None)
            .await
            .expect("submit");
    }
    let before = ids(&store);
    assert_eq!(before, vec!["j5", "j3", "j4", "j0", "j2", "j1"]);
    // Take one: it runs when the process "dies".
    let running = store.next_job().await.expect("next").expect("a job");
    assert_eq!(running.id, "j5");
    assert_eq!(running.attempts, 1);
    assert_eq!(store.summary().running, 1);
    assert!(store.close().await.expect("close"));

    let store = open(dir.path()).await;
    assert_eq!(store.recovery().requeued, vec!["j5".to_string()]);
    assert!(store.recovery().failed.is_empty());
    assert_eq!(store.recovery().queued, 6);
    assert_eq!(ids(&store), before);
    let j5 = store.get("j5").await.expect("get").expect("stored");
    assert_eq!((j5.status, j5.attempts), (JobStatus::Queued, 1));
    let statuses: Vec<JobStatus> = store
        .events("j5")
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(
        statuses,
        vec![JobStatus::Queued, JobStatus::Running, JobStatus::Queued]
    );
    // Drain a few, reopen again: the rest keeps its order.
    for expected in ["j5", "j3"] {
        let job = store.next_job().await.expect("next").expect("job");
        assert_eq!(job.id, expected);
        store
            .finish(&job.id, Outcome::Succeeded { outputs: vec![] })
            .await
            .expect("finish");
    }
    let rest = ids(&store);
    drop(store);
    let store = open(dir.path()).await;
    assert_eq!(ids(&store), rest);
    assert!(store.recovery().requeued.is_empty());
}

#[tokio::test]
async fn running_job_out_of_attempts_fails_at_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut job = new_job("once", "a", Tier::Premium);
    job.max_attempts = 1;
    store.submit(job, None).await.expect("submit");
    store.next_job().await.expect("next").expect("job");
    store.close().await.expect("close");
    let store = open(dir.path()).await;
    assert_eq!(store.recovery().failed, vec!["once".to_string()]);
    let job = store.get("once").await.expect("get").expect("stored");
    assert_eq!(job.status, JobStatus::Failed);
    let error = job.error.expect("error");
    assert_eq!(error.code, "max_attempts");
    assert_eq!(error.message, "ran 1 times without finishing");
    assert!(store.next_job().await.expect("next").is_none());
}

#[tokio::test]
async fn idempotency_same_and_different_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut first = new_job("k1", "alice", Tier::Free);
    first.idempotency_key = Some("key-1".into());
    first.body_hash = "body-a".into();
    let a = store.submit(first.clone(), None).await.expect("submit");
    assert!(a.created);
    let mut again = first.clone();
    again.id = "k2".into();
    let b = store.submit(again.clone(), None).await.expect("replay");
    assert!(!b.created);
    assert_eq!(b.job.id, "k1");
    again.body_hash = "body-b".into();
    let err = store.submit(again, None).await.expect_err("conflict");
    assert!(
        matches!(&err, StoreError::IdempotencyConflict { key, job_id } if key == "key-1" && job_id == "k1"),
        "{err}"
    );
    // The same key for another account is another job.
    let mut other = first.clone();
    other.id = "k3".into();
    other.account = "bob".into();
    assert!(store.submit(other, None).await.expect("submit").created);
    assert_eq!(store.get("k2").await.expect("get"), None);
    // A key is found by account: what another member's new owner asks before storing.
    let found = store.find_key("alice", "key-1").await.expect("find");
    assert_eq!(found.map(|j| j.id), Some("k1".to_string()));
    let found = store.find_key("bob", "key-1").await.expect("find");
    assert_eq!(found.map(|j| j.id), Some("k3".to_string()));
    assert_eq!(store.find_key("alice", "key-2").await.expect("find"), None);
    assert_eq!(store.find_key("carol", "key-1").await.expect("find"), None);
    // Several keys in one read answer in the order asked.
    let found = store
        .find_keys(vec![
            ("carol".into(), "key-1".into()),
            ("bob".into(), "key-1".into()),
            ("alice".into(), "key-2".into()),
            ("alice".into(), "key-1".into()),
        ])
        .await
        .expect("find");
    let ids: Vec<Option<String>> = found.into_iter().map(|j| j.map(|j| j.id)).collect();
    assert_eq!(ids, [None, Some("k3".into()), None, Some("k1".into())]);
    assert!(store.find_keys(Vec::new()).await.expect("find").is_empty());
    let usage = store
        .usage("alice", utc_day(a.job.created_at_ms))
        .await
        .expect("usage");
    assert_eq!(usage.submitted, 1);
}

#[tokio::test]
async fn quota_refusal_stores_nothing_and_resets_next_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let day0 = 20_000 * 86_400_000i64;
    let now = Arc::new(AtomicI64::new(day0 + 1_000));
    let clock_now = now.clone();
    let opts = StoreOptions {
        clock: Arc::new(move || clock_now.load(Ordering::SeqCst)),
        ..StoreOptions::default()
    };
    let store = JobStore::open(dir.path(), opts).await.expect("open");
    let quota = Some(Quota {
        per_day: Some(2),
        per_month: None,
        fair_use_images: None,
    });
    for i in 0..2 {
        store
            .submit(new_job(&format!("q{i}"), "free-user", Tier::Free), quota)
            .await
            .expect("within quota");
    }
    let err = store
        .submit(new_job("q2", "free-user", Tier::Free), quota)
        .await
        .expect_err("over quota");
    match err {
        StoreError::QuotaExceeded {
            period,
            limit,
            used,
            resets_at_ms,
        } => {
            assert_eq!((period, limit, used), (QuotaPeriod::Day, 2, 2));
            assert_eq!(resets_at_ms, day0 + 86_400_000);
        }
        other => panic!("expected QuotaExceeded, got {other}"),
    }
    assert_eq!(store.get("q2").await.expect("get"), None);
    assert_eq!(store.queue_order().len(), 2);
    let usage = store.usage("free-user", 20_000).await.expect("usage");
    assert_eq!((usage.submitted, usage.refused), (2, 1));
    // Another account is not affected; the next day the quota is fresh.
    store
        .submit(new_job("other", "someone", Tier::Free), quota)
        .await
        .expect("other account");
    now.store(day0 + 86_400_000 + 5, Ordering::SeqCst);
    store
        .submit(new_job("q3", "free-user", Tier::Free), quota)
        .await
        .expect("next day");
    // A monthly quota counts the days of the month together.
    let monthly = Some(Quota {
        per_day: None,
        per_month: Some(3),
        fair_use_images: None,
    });
    let err = store
        .submit(new_job("q4", "free-user", Tier::Free), monthly)
        .await
        .expect_err("month used up");
    assert!(
        matches!(
            err,
            StoreError::QuotaExceeded {
                period: QuotaPeriod::Month,
                used: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn cancel_queued_running_and_final() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    store
        .submit(new_job("r", "a", Tier::Pro), None)
        .await
        .expect("submit");
    store
        .submit(new_job("q", "a", Tier::Free), None)
        .await
        .expect("submit");
    let running = store.next_job().await.expect("next").expect("job");
    assert_eq!(running.id, "r");
    match store.cancel("q").await.expect("cancel queued") {
        CancelOutcome::Cancelled(job) => assert_eq!(job.status, JobStatus::Cancelled),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert_eq!(store.position("q"), None);
    assert!(store.queue_order().is_empty());
    match store.cancel("r").await.expect("cancel running") {
        CancelOutcome::Running(job) => assert_eq!(job.status, JobStatus::Running),
        other => panic!("expected Running, got {other:?}"),
    }
    let done = store
        .finish("r", Outcome::Cancelled)
        .await
        .expect("finish cancelled");
    assert_eq!(done.status, JobStatus::Cancelled);
    for id in ["q", "r"] {
        let err = store.cancel(id).await.expect_err("final");
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    status: JobStatus::Cancelled,
                    ..
                }
            ),
            "{err}"
        );
    }
    assert!(matches!(
        store.cancel("missing").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.next_job().await.expect("next").is_none());
    assert_eq!(store.summary().running, 0);
}

#[tokio::test]
async fn outputs_are_on_disk_before_success_is_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = StoreOptions {
        inline_max_bytes: 0,
        ..StoreOptions::default()
    };
    let store = JobStore::open(dir.path(), opts).await.expect("open store");
    let mut changes = store.subscribe();
    store
        .submit(new_job("img", "a", Tier::Pro), None)
        .await
        .expect("submit");
    store.next_job().await.expect("next").expect("job");
    let watcher_store = store.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let change = changes.recv().await.expect("change");
            if change.status == JobStatus::Succeeded {
                // The moment success is announced, the files must be complete.
                let outputs = watcher_store.outputs(&change.id).await.expect("outputs");
                let mut sizes = Vec::new();
                for o in &outputs {
                    assert!(!o.inline);
                    let data = std::fs::read(watcher_store.output_path(o)).expect("file on disk");
                    sizes.push(data.len());
                }
                return sizes;
            }
        }
    });
    let png = vec![0x89u8, b'P', b'N', b'G', 1, 2, 3];
    let job = store
        .finish(
            "img",
            Outcome::Succeeded {
                outputs: vec![
                    NewOutput {
                        filename: "ComfyUI_00001_.png".into(),
                        content_type: "image/png".into(),
                        bytes: png.clone(),
                        watermark: Some(WatermarkStatus::Applied),
                    },
                    NewOutput {
                        filename: "../../etc/passwd".into(),
                        content_type: "image/png".into(),
                        bytes: vec![9; 10],
                        watermark: Some(WatermarkStatus::Skipped {
                            reason: "not a PNG, JPEG or WebP image".into(),
                        }),
                    },
                ],
            },
        )
        .await
        .expect("finish");
    assert_eq!(job.status, JobStatus::Succeeded);
    let sizes = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("watcher in time")
        .expect("watcher ok");
    assert_eq!(sizes, vec![png.len(), 10]);
    let outputs = store.outputs("img").await.expect("outputs");
    let folder = kiln_daemon::queue::output_folder("img");
    assert_eq!(outputs[0].path, folder.join("img.0-ComfyUI_00001_.png"));
    assert_eq!(outputs[1].path, folder.join("img.1-passwd"));
    assert!(folder.starts_with("outputs") && folder.components().count() == 2);
    assert_eq!(outputs[1].filename, "../../etc/passwd");
    {
        use sha2::Digest;
        assert_eq!(outputs[0].sha256, hex::encode(sha2::Sha256::digest(&png)));
    }
    let view = job.view(&outputs, None, None);
    assert_eq!(view.outputs[1].url, "/v1/jobs/img/outputs/1");
    // Whether each file got its watermark is kept with it.
    assert_eq!(view.outputs[0].watermark, Some(WatermarkStatus::Applied));
    assert_eq!(
        view.outputs[1].watermark,
        Some(WatermarkStatus::Skipped {
            reason: "not a PNG, JPEG or WebP image".into()
        })
    );
    let usage = store
        .usage("a", utc_day(job.finished_at_ms.expect("finished")))
        .await
        .expect("usage");
    assert_eq!((usage.succeeded, usage.images), (1, 2));
    assert_eq!(
        store.recent_durations(10).await.expect("durations").len(),
        1
    );
    let err = store
        .finish("img", Outcome::Succeeded { outputs: vec![] })
        .await
        .expect_err("already final");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
}

#[tokio::test]
async fn small_outputs_are_written_with_the_commit_and_large_ones_as_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || StoreOptions {
        inline_max_bytes: 16,
        ..StoreOptions::default()
    };
    let store = JobStore::open(dir.path(), opts())
        .await
        .expect("open store");
    let mut changes = store.subscribe();
    store
        .submit(new_job("mix", "a", Tier::Pro), None)
        .await
        .expect("submit");
    store.next_job().await.expect("next").expect("job");
    let small = b"0123456789abcdef".to_vec();
    let large: Vec<u8> = (0..40u8).collect();
    let output = |name: &str, bytes: &[u8]| NewOutput {
        filename: name.into(),
        content_type: "image/png".into(),
        bytes: bytes.to_vec(),
        watermark: None,
    };
    let watcher_store = store.clone();
    let watcher = tokio::spawn(async move {
        loop {
            let change = changes.recv().await.expect("change");
            if change.status == JobStatus::Succeeded {
                // Readable through the store the moment success is announced.
                let mut contents = Vec::new();
                for o in watcher_store.outputs(&change.id).await.expect("outputs") {
                    let data = watcher_store.read_output(&change.id, &o, 0, usize::MAX);
                    contents.push(data.await.expect("content"));
                }
                return contents;
            }
        }
    });
    store
        .finish(
            "mix",
            Outcome::Succeeded {
                outputs: vec![output("small.png", &small), output("large.png", &large)],
            },
        )
        .await
        .expect("finish");
    let contents = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("watcher in time")
        .expect("watcher ok");
    assert_eq!(contents, vec![small.clone(), large.clone()]);

    let outputs = store.outputs("mix").await.expect("outputs");
    assert!(outputs[0].inline && outputs[0].path.as_os_str().is_empty());
    assert_eq!(outputs[0].bytes, 16);
    {
        use sha2::Digest;
        assert_eq!(outputs[0].sha256, hex::encode(sha2::Sha256::digest(&small)));
    }
    assert!(!outputs[1].inline);
    assert_eq!(
        kiln_daemon::queue::output_files_on_disk(dir.path(), "mix"),
        vec!["mix.1-large.png".to_string()]
    );
    assert_eq!(
        kiln_daemon::queue::inline_outputs_in_db(dir.path(), "mix").expect("inline"),
        vec![0]
    );
    // The rows with the content the database keeps, in one read: the inline one's bytes, none
    // for the file.
    let with_content = store
        .outputs_with_content("mix")
        .await
        .expect("with content");
    assert_eq!(
        with_content,
        vec![
            (outputs[0].clone(), Some(small.clone())),
            (outputs[1].clone(), None)
        ]
    );
    // With the job, as one read.
    let (job, with_job) = store
        .get_with_outputs("mix")
        .await
        .expect("read")
        .expect("the job");
    assert_eq!((job.id.as_str(), job.status), ("mix", JobStatus::Succeeded));
    assert_eq!(with_job, with_content);
    assert_eq!(store.get_with_outputs("nope").await.expect("read"), None);
    // Ranges, as a peer reads them in chunks, from either kind.
    for (o, bytes) in [(&outputs[0], &small), (&outputs[1], &large)] {
        let piece = store.read_output("mix", o, 3, 5).await.expect("piece");
        assert_eq!(piece, bytes[3..8].to_vec());
        let tail = store.read_output("mix", o, 10, 1000).await.expect("tail");
        assert_eq!(tail, bytes[10..].to_vec());
        let past = store.read_output("mix", o, 1000, 10).await.expect("past");
        assert!(past.is_empty());
    }

    // The content survives a restart.
    assert!(store.close().await.expect("close"));
    let store = JobStore::open(dir.path(), opts()).await.expect("reopen");
    let outputs = store.outputs("mix").await.expect("outputs");
    let again = store
        .read_output("mix", &outputs[0], 0, usize::MAX)
        .await
        .expect("content after reopen");
    assert_eq!(again, small);

    // Deleting the outputs removes the file and the inline content; the rows stay.
    store
        .remove_output_files("mix", &outputs)
        .await
        .expect("remove files");
    store
        .mark_outputs_deleted("mix", kiln_daemon::protocol::DeleteReason::User, 7)
        .await
        .expect("mark deleted");
    assert!(kiln_daemon::queue::output_files_on_disk(dir.path(), "mix").is_empty());
    assert!(
        kiln_daemon::queue::inline_outputs_in_db(dir.path(), "mix")
            .expect("inline")
            .is_empty()
    );
    assert_eq!(store.outputs("mix").await.expect("outputs").len(), 2);
    // A job whose outputs were deleted comes without them.
    let (_, after_deletion) = store
        .get_with_outputs("mix")
        .await
        .expect("read")
        .expect("the job");
    assert!(after_deletion.is_empty());
    let err = store
        .read_output("mix", &outputs[0], 0, usize::MAX)
        .await
        .expect_err("deleted content");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    // Deleting again finds nothing to remove and fails nothing.
    let outputs = store.outputs("mix").await.expect("outputs");
    // Rows read after the deletion name no content either.
    let err = store
        .read_output("mix", &outputs[0], 0, usize::MAX)
        .await
        .expect_err("deleted content, rows read after");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    store
        .remove_output_files("mix", &outputs)
        .await
        .expect("remove again");
}

#[tokio::test]
async fn requeue_keeps_place_then_fails_at_max_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut job = new_job("retry", "a", Tier::Free);
    job.max_attempts = 2;
    store.submit(job, None).await.expect("submit");
    store
        .submit(new_job("later", "b", Tier::Free), None)
        .await
        .expect("submit");
    let taken = store.next_job().await.expect("next").expect("job");
    assert_eq!(taken.id, "retry");
    let back = store
        .finish(
            "retry",
            Outcome::Requeue {
                reason: "ComfyUI restarted".into(),
            },
        )
        .await
        .expect("requeue");
    assert_eq!((back.status, back.attempts), (JobStatus::Queued, 1));
    assert_eq!(ids(&store), vec!["retry", "later"]);
    let again = store.next_job().await.expect("next").expect("job");
    assert_eq!((again.id.as_str(), again.attempts), ("retry", 2));
    let failed = store
        .finish(
            "retry",
            Outcome::Requeue {
                reason: "ComfyUI restarted".into(),
            },
        )
        .await
        .expect("requeue");
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.error.expect("error").code, "max_attempts");
    let next = store.next_job().await.expect("next").expect("job");
    let done = store
        .finish(
            &next.id,
            Outcome::Failed(JobError {
                code: "execution_error".into(),
                message: "node 3 failed".into(),
                details: None,
            }),
        )
        .await
        .expect("fail");
    assert_eq!(done.error.expect("error").code, "execution_error");
    let stored = store.get("later").await.expect("get").expect("stored");
    assert_eq!(stored.status, JobStatus::Failed);
}

/// The value of the unlabelled series `name` in the metrics text.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn concurrent_submits_are_all_durable_and_distinct() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = kiln_daemon::metrics::Metrics::new();
    let store = JobStore::open(
        dir.path(),
        StoreOptions {
            metrics: metrics.store.clone(),
            ..StoreOptions::default()
        },
    )
    .await
    .expect("open store");
    let before = (
        metrics.store.commits.get(),
        metrics.store.commit_requests.get(),
    );
    let mut tasks = Vec::new();
    for t in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..40 {
                let job = store
                    .submit(
                        new_job(&format!("c{t}-{i}"), &format!("acct{}", t % 7), Tier::Pro),
                        None,
                    )
                    .await
                    .expect("submit");
                seqs.push(job.job.seq);
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 2000);
    // Every submit was one request of some commit; the commits are counted and timed.
    let commits = metrics.store.commits.get() - before.0;
    let requests = metrics.store.commit_requests.get() - before.1;
    assert_eq!(requests, 2000);
    assert!((1..=2000).contains(&commits), "{commits} commits");
    let text = metrics.encode();
    assert_eq!(
        series(&text, "kiln_store_commit_seconds_count"),
        metrics.store.commits.get() as f64
    );
    assert_eq!(
        series(&text, "kiln_store_commit_requests_total"),
        metrics.store.commit_requests.get() as f64
    );
    drop(store);
    let store = open(dir.path()).await;
    assert_eq!(store.queue_order().len(), 2000);
    assert_eq!(store.recovery().queued, 2000);
}

#[tokio::test]
async fn work_available_wakes_on_submit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let waiter_store = store.clone();
    let waiter = tokio::spawn(async move {
        waiter_store.work_available().await;
        waiter_store.next_job().await.expect("next")
    });
    store
        .submit(new_job("w", "a", Tier::Free), None)
        .await
        .expect("submit");
    let job = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken in time")
        .expect("task");
    assert_eq!(job.map(|j| j.id), Some("w".to_string()));
}

#[tokio::test]
async fn migrates_an_empty_file_and_refuses_newer_or_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("kiln-jobs.sqlite3");
    std::fs::write(&db, b"").expect("empty file");
    let store = open(dir.path()).await;
    store
        .submit(new_job("m", "a", Tier::Free), None)
        .await
        .expect("submit");
    assert!(store.close().await.expect("close"));
    {
        let conn = rusqlite::Connection::open(&db).expect("sqlite");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(v, kiln_daemon::queue::schema::current_version());
        conn.execute_batch("PRAGMA user_version = 99")
            .expect("set version");
    }
    let err = JobStore::open(dir.path(), StoreOptions::default())
        .await
        .expect_err("too new");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");

    let garbage = tempfile::tempdir().expect("tempdir");
    std::fs::write(garbage.path().join("kiln-jobs.sqlite3"), [0xABu8; 8192]).expect("garbage");
    let err = JobStore::open(garbage.path(), StoreOptions::default())
        .await
        .expect_err("garbage");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("kiln-jobs.sqlite3"), "{err}");
}

/// Open file descriptors of this process that name `path`.
fn fds_on(path: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == path))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reads_share_a_bounded_set_of_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = StoreOptions {
        read_connections: 2,
        ..StoreOptions::default()
    };
    let store = JobStore::open(dir.path(), opts).await.expect("open");
    for i in 0..20 {
        store
            .submit(new_job(&format!("r{i}"), "alice", Tier::Pro), None)
            .await
            .expect("submit");
    }
    let db = dir
        .path()
        .join(kiln_daemon::queue::DB_FILE)
        .canonicalize()
        .expect("db path");
    let baseline = fds_on(&db);
    // Watch the descriptors on the database while 400 reads run 200 at a time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, db) = (stop.clone(), db.clone());
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(Ordering::Relaxed) {
                most = most.max(fds_on(&db));
                std::thread::sleep(Duration::from_millis(1));
            }
            most
        })
    };
    for round in 0..2 {
        let reads = (0..200).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.get(&format!("r{}", (i + round) % 20)).await })
        });
        for read in futures::future::join_all(reads).await {
            let job = read.expect("task").expect("read");
            assert!(job.is_some());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let most = watcher.join().expect("watcher");
    // The writer's descriptor(s) and at most two readers'.
    assert!(
        most <= baseline + 2,
        "{most} descriptors on the database at once, {baseline} before the reads"
    );
}
