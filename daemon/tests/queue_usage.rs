//! Usage counting in the job store against real SQLite: premium fair use (jobs past the
//! monthly image count are throttled to free priority, kept across a reopen), counts kept as
//! replica and inherited by a node that takes over an account, and the usage reads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use kiln_daemon::protocol::{JobStatus, Tier};
use kiln_daemon::queue::{
    Job, JobStore, NewJob, NewOutput, Outcome, Quota, QuotaPeriod, StoreError, StoreOptions,
    format_utc_day, utc_day,
};
use serde_json::json;

/// 2026-11-28 10:00 UTC.
const NOW_MS: i64 = 1_795_860_000_000;

fn new_job(id: &str, account: &str, tier: Tier) -> NewJob {
    NewJob {
        id: id.to_string(),
        account: account.to_string(),
        tier,
        workflow: json!({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}).into(),
        webhook: None,
        metadata: None,
        idempotency_key: None,
        body_hash: format!("hash-{id}"),
        max_attempts: 3,
        replica: None,
    }
}

/// A store whose clock moves one second each time it is read.
async fn open(dir: &Path) -> JobStore {
    let now = Arc::new(AtomicI64::new(NOW_MS));
    let opts = StoreOptions {
        clock: Arc::new(move || now.fetch_add(1_000, Ordering::SeqCst)),
        ..StoreOptions::default()
    };
    JobStore::open(dir, opts).await.expect("open store")
}

fn images(n: usize) -> Vec<NewOutput> {
    (0..n)
        .map(|i| NewOutput {
            filename: format!("ComfyUI_{i:05}_.png"),
            content_type: "image/png".to_string(),
            bytes: format!("png {i}").into_bytes(),
            watermark: None,
        })
        .collect()
}

fn fair_use(images: u64) -> Option<Quota> {
    Some(Quota {
        fair_use_images: Some(images),
        ..Quota::default()
    })
}

/// Submits, runs and finishes a job with `n` images on `store`.
async fn run_to_success(store: &JobStore, id: &str, account: &str, tier: Tier, n: usize) -> Job {
    store
        .submit(new_job(id, account, tier), fair_use(1_000_000))
        .await
        .expect("submit");
    let running = store.next_job().await.expect("next").expect("a job");
    assert_eq!(running.id, id);
    store
        .finish(id, Outcome::Succeeded { outputs: images(n) })
        .await
        .expect("finish")
}

#[tokio::test]
async fn past_fair_use_new_jobs_wait_at_free_priority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    run_to_success(&store, "p0", "prem", Tier::Premium, 3).await;
    // Under the count: the job keeps its tier's priority.
    let ok = store
        .submit(new_job("p1", "prem", Tier::Premium), fair_use(4))
        .await
        .expect("submit");
    assert_eq!(ok.job.throttled, None);
    let p1 = store.next_job().await.expect("next").expect("p1");
    store
        .finish(&p1.id, Outcome::Succeeded { outputs: images(2) })
        .await
        .expect("finish");

    // 5 images of 4: the next job is throttled, queued behind pro and with the free jobs.
    store
        .submit(new_job("f1", "freebie", Tier::Free), None)
        .await
        .expect("free job");
    let throttled = store
        .submit(new_job("p2", "prem", Tier::Premium), fair_use(4))
        .await
        .expect("throttled, not refused");
    assert_eq!(
        throttled.job.throttled.as_deref(),
        Some("fair use: 5 of 4 images this month")
    );
    assert_eq!(throttled.job.tier, Tier::Premium);
    assert_eq!(throttled.job.queue_tier(), Tier::Free);
    let view = throttled.job.view(&[], None, None);
    let shown = view.throttled.expect("the view says why");
    assert_eq!(shown.priority, Tier::Free);
    assert_eq!(shown.reason, "fair use: 5 of 4 images this month");
    let stored = store.get("p2").await.expect("get").expect("stored");
    let json = serde_json::to_value(stored.view(&[], None, None)).expect("JSON");
    assert_eq!(json["throttled"]["priority"], "free");
    store
        .submit(new_job("pro1", "proff", Tier::Pro), None)
        .await
        .expect("pro job");
    let order: Vec<(String, Tier)> = store
        .queue_order()
        .into_iter()
        .map(|q| (q.id, q.tier))
        .collect();
    assert_eq!(
        order,
        vec![
            ("pro1".to_string(), Tier::Pro),
            ("f1".to_string(), Tier::Free),
            ("p2".to_string(), Tier::Free),
        ]
    );
    // Queue summaries (what gossip publishes) count it as free.
    let summary = store.summary();
    let count = |tier| {
        summary
            .tiers
            .iter()
            .find(|t| t.tier == tier)
            .map(|t| t.queued)
            .unwrap_or(0)
    };
    assert_eq!((count(Tier::Premium), count(Tier::Free)), (0, 2));

    // A restart keeps the decision and the order.
    assert!(store.close().await.expect("close"));
    let store = open(dir.path()).await;
    let again = store.get("p2").await.expect("get").expect("stored");
    assert_eq!(
        again.throttled.as_deref(),
        Some("fair use: 5 of 4 images this month")
    );
    let order: Vec<String> = store.queue_order().into_iter().map(|q| q.id).collect();
    assert_eq!(order, vec!["pro1", "f1", "p2"]);
    // Running it and handing it back keeps it at free priority.
    for _ in 0..3 {
        store.next_job().await.expect("next");
    }
    store
        .finish(
            "p2",
            Outcome::Requeue {
                reason: "test".to_string(),
            },
        )
        .await
        .expect("requeue");
    let queued = store.queue_order();
    assert_eq!(queued.len(), 1);
    assert_eq!((queued[0].id.as_str(), queued[0].tier), ("p2", Tier::Free));
    // Without a fair-use limit (another tier), nothing is throttled.
    let pro = store
        .submit(new_job("pro2", "prem", Tier::Pro), None)
        .await
        .expect("submit");
    assert_eq!(pro.job.throttled, None);
}

#[tokio::test]
async fn replica_counts_are_inherited_by_the_next_owner() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let a = open(a_dir.path()).await;
    let b = open(b_dir.path()).await;
    // The owner counts the job; the replica learns it at submission and at its end.
    let mut new = new_job("r1", "prem", Tier::Premium);
    new.replica = Some("node-b".to_string());
    let queued = a.submit(new, None).await.expect("submit").job;
    b.put_replica(&queued, "node-a", Vec::new())
        .await
        .expect("copy");
    // Repeating a copy counts nothing twice.
    b.put_replica(&queued, "node-a", Vec::new())
        .await
        .expect("copy again");
    a.next_job().await.expect("next").expect("r1");
    let done = a
        .finish("r1", Outcome::Succeeded { outputs: images(3) })
        .await
        .expect("finish");
    assert_eq!(done.status, JobStatus::Succeeded);
    b.put_replica(&done, "node-a", images(3))
        .await
        .expect("copy of the result");
    b.put_replica(&done, "node-a", images(3))
        .await
        .expect("copy of the result again");

    let day = utc_day(NOW_MS);
    let at_a = a.usage_days("prem", day, day + 1).await.expect("usage");
    let at_b = b.usage_days("prem", day, day + 1).await.expect("usage");
    assert_eq!(at_a.len(), 1);
    assert_eq!(
        (at_a[0].submitted, at_a[0].succeeded, at_a[0].images),
        (1, 1, 3)
    );
    assert_eq!(
        (at_b[0].submitted, at_b[0].succeeded, at_b[0].images),
        (1, 1, 3)
    );
    assert_eq!(format_utc_day(at_b[0].day), "2026-11-28");
    // Owner counts only: a merge over members counts the job once.
    let owned_a = a.owner_usage(day, day + 1).await.expect("owner usage");
    let owned_b = b.owner_usage(day, day + 1).await.expect("owner usage");
    assert_eq!(owned_a.len(), 1);
    assert_eq!(owned_a[0].account, "prem");
    assert!(owned_b.is_empty());

    // The owner dies: b decides for the account now, and its counts include the copies.
    let next = b
        .submit(new_job("r2", "prem", Tier::Premium), fair_use(3))
        .await
        .expect("throttled");
    assert_eq!(
        next.job.throttled.as_deref(),
        Some("fair use: 3 of 3 images this month")
    );
    let refused = b
        .submit(
            new_job("r3", "prem", Tier::Premium),
            Some(Quota {
                per_day: Some(2),
                ..Quota::default()
            }),
        )
        .await
        .expect_err("the day's quota counts the replica's copies");
    assert!(
        matches!(
            refused,
            StoreError::QuotaExceeded {
                period: QuotaPeriod::Day,
                used: 2,
                ..
            }
        ),
        "{refused}"
    );
}
