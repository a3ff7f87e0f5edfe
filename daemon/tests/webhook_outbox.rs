//! The webhook outbox against real SQLite in temporary folders: a row is written with every
//! final status of a job that has a webhook (and only then), survives reopening, records
//! attempts, is kept dormant on a replica until adoption, and is pruned.

use std::path::Path;

use kiln_daemon::protocol::{JobError, JobStatus, Tier};
use kiln_daemon::queue::{
    Attempted, CancelOutcome, Finished, JobStore, NewJob, OutboxState, Outcome, Quota, StoreError,
    StoreOptions,
};
use serde_json::json;

fn new_job(id: &str, webhook: Option<&str>) -> NewJob {
    NewJob {
        id: id.to_string(),
        account: "alice".to_string(),
        tier: Tier::Pro,
        workflow: json!({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}).into(),
        webhook: webhook.map(str::to_string),
        metadata: None,
        idempotency_key: None,
        body_hash: format!("hash-{id}"),
        max_attempts: 2,
        replica: None,
    }
}

fn failure(code: &str, message: &str) -> JobError {
    JobError {
        code: code.to_string(),
        message: message.to_string(),
        details: None,
    }
}

const HOOK: Option<&str> = Some("https://example.com/hook");

async fn open(dir: &Path) -> JobStore {
    JobStore::open(dir, StoreOptions::default())
        .await
        .expect("open store")
}

async fn state_of(store: &JobStore, id: &str) -> Option<OutboxState> {
    store
        .outbox_row(id)
        .await
        .expect("outbox row")
        .map(|r| r.state)
}

/// Takes the next job, which must be `id`.
async fn start(store: &JobStore, id: &str) {
    let job = store.next_job().await.expect("next").expect("a job");
    assert_eq!(job.id, id);
}

#[tokio::test]
async fn final_statuses_write_the_outbox_and_nothing_else_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;

    // Succeeded, with a webhook: one due row, id stable per job and final status.
    store
        .submit(new_job("ok", HOOK), None)
        .await
        .expect("submit");
    assert_eq!(state_of(&store, "ok").await, None, "queued: no row yet");
    start(&store, "ok").await;
    store
        .finish("ok", Outcome::Succeeded { outputs: vec![] })
        .await
        .expect("finish");
    let row = store.outbox_row("ok").await.expect("row").expect("written");
    assert_eq!(row.state, OutboxState::Due);
    assert_eq!(row.event_id, "msg_ok_succeeded");
    assert_eq!(row.url, "https://example.com/hook");
    assert_eq!(row.attempts, 0);

    // No webhook: no row.
    store
        .submit(new_job("quiet", None), None)
        .await
        .expect("submit");
    start(&store, "quiet").await;
    store
        .finish("quiet", Outcome::Failed(failure("boom", "it broke")))
        .await
        .expect("finish");
    assert_eq!(state_of(&store, "quiet").await, None);

    // A requeue is not final: no row; running out of attempts is.
    store
        .submit(new_job("flaky", HOOK), None)
        .await
        .expect("submit");
    start(&store, "flaky").await;
    let job = store
        .finish(
            "flaky",
            Outcome::Requeue {
                reason: "lost".into(),
            },
        )
        .await
        .expect("requeue");
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(state_of(&store, "flaky").await, None, "requeued: no row");
    start(&store, "flaky").await;
    let job = store
        .finish(
            "flaky",
            Outcome::Requeue {
                reason: "lost again".into(),
            },
        )
        .await
        .expect("requeue");
    assert_eq!(job.status, JobStatus::Failed);
    let row = store
        .outbox_row("flaky")
        .await
        .expect("row")
        .expect("written");
    assert_eq!(row.event_id, "msg_flaky_failed");

    // Cancelled while queued, and while running.
    store
        .submit(new_job("c1", HOOK), None)
        .await
        .expect("submit");
    assert!(matches!(
        store.cancel("c1").await.expect("cancel"),
        CancelOutcome::Cancelled(_)
    ));
    assert_eq!(state_of(&store, "c1").await, Some(OutboxState::Due));
    store
        .submit(new_job("c2", HOOK), None)
        .await
        .expect("submit");
    start(&store, "c2").await;
    store
        .finish("c2", Outcome::Cancelled)
        .await
        .expect("cancel");
    assert_eq!(state_of(&store, "c2").await, Some(OutboxState::Due));

    // First final result wins: a later result of another attempt changes nothing.
    store
        .submit(new_job("race", HOOK), None)
        .await
        .expect("submit");
    start(&store, "race").await;
    let first = store
        .finish_attempt("race", 1, Outcome::Failed(failure("x", "first")))
        .await
        .expect("first result");
    assert!(matches!(first, Finished::Applied(_)));
    let later = store
        .finish_attempt("race", 1, Outcome::Succeeded { outputs: vec![] })
        .await
        .expect("later result");
    assert!(matches!(later, Finished::Dropped(_)));
    let row = store
        .outbox_row("race")
        .await
        .expect("row")
        .expect("written");
    assert_eq!(row.event_id, "msg_race_failed");

    // A refused submission stores nothing, outbox included.
    store
        .submit(
            new_job("spent", HOOK),
            Some(Quota {
                per_day: Some(0),
                per_month: None,
                fair_use_images: None,
            }),
        )
        .await
        .expect_err("over quota");
    assert_eq!(state_of(&store, "spent").await, None);

    let (next_at, due) = store.outbox_pending().await.expect("pending");
    assert_eq!(due, 5, "ok, flaky, c1, c2, race");
    assert!(next_at.is_some());
}

#[tokio::test]
async fn rows_survive_reopen_and_record_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path()).await;
        store
            .submit(new_job("a", HOOK), None)
            .await
            .expect("submit");
        store
            .submit(new_job("b", HOOK), None)
            .await
            .expect("submit");
        store
            .submit(new_job("c", HOOK), None)
            .await
            .expect("submit");
        for id in ["a", "b", "c"] {
            store.cancel(id).await.expect("cancel");
        }
        assert!(store.close().await.expect("close"));
    }
    let store = open(dir.path()).await;
    let due = store.outbox_due(i64::MAX, 10).await.expect("due");
    assert_eq!(due.len(), 3);
    assert!(due.iter().all(|r| r.state == OutboxState::Due));

    // Retry later: not due now, due at its time, attempts counted, error kept.
    let later = due[0].next_at_ms + 60_000;
    assert!(
        store
            .outbox_record(
                "a",
                Attempted::Retry {
                    error: "the receiver answered 500".into(),
                    next_at_ms: later,
                },
            )
            .await
            .expect("record")
    );
    let row = store.outbox_row("a").await.expect("row").expect("kept");
    assert_eq!((row.attempts, row.next_at_ms), (1, later));
    assert_eq!(row.last_error.as_deref(), Some("the receiver answered 500"));
    let due_now: Vec<String> = store
        .outbox_due(later - 1, 10)
        .await
        .expect("due")
        .into_iter()
        .map(|r| r.job_id)
        .collect();
    assert_eq!(due_now, ["b", "c"]);

    store
        .outbox_record("b", Attempted::Delivered)
        .await
        .expect("record");
    store
        .outbox_record(
            "c",
            Attempted::Abandon {
                error: "gone".into(),
            },
        )
        .await
        .expect("record");
    assert_eq!(state_of(&store, "b").await, Some(OutboxState::Delivered));
    assert_eq!(state_of(&store, "c").await, Some(OutboxState::Abandoned));
    // A finished row does not change again.
    assert!(
        !store
            .outbox_record(
                "b",
                Attempted::Abandon {
                    error: "late".into()
                }
            )
            .await
            .expect("record")
    );
    assert_eq!(state_of(&store, "b").await, Some(OutboxState::Delivered));

    // Pruning takes finished rows only.
    assert_eq!(store.outbox_prune(i64::MAX).await.expect("prune"), 2);
    assert_eq!(state_of(&store, "b").await, None);
    assert_eq!(state_of(&store, "a").await, Some(OutboxState::Due));
    assert_eq!(store.outbox_pending().await.expect("pending").1, 1);
}

#[tokio::test]
async fn a_replica_keeps_the_row_dormant_until_it_adopts_the_job() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let owner = open(owner_dir.path()).await;
    let replica = open(replica_dir.path()).await;

    owner
        .submit(new_job("j", HOOK), None)
        .await
        .expect("submit");
    let queued = owner.get("j").await.expect("get").expect("stored");
    replica
        .put_replica(&queued, "node-a", vec![])
        .await
        .expect("copy");
    assert_eq!(state_of(&replica, "j").await, None, "not final: no row");

    start(&owner, "j").await;
    let done = owner
        .finish("j", Outcome::Succeeded { outputs: vec![] })
        .await
        .expect("finish");
    replica
        .put_replica(&done, "node-a", vec![])
        .await
        .expect("copy");
    // Repeating the copy adds nothing.
    replica
        .put_replica(&done, "node-a", vec![])
        .await
        .expect("copy again");
    let row = replica.outbox_row("j").await.expect("row").expect("kept");
    assert_eq!(row.state, OutboxState::Dormant);
    assert_eq!(
        row.event_id, "msg_j_succeeded",
        "the same webhook-id as the owner's"
    );
    assert!(
        replica
            .outbox_due(i64::MAX, 10)
            .await
            .expect("due")
            .is_empty()
    );

    // The owner dies: the replica adopts its jobs and sends the webhook itself.
    replica.adopt("node-a").await.expect("adopt");
    assert_eq!(state_of(&replica, "j").await, Some(OutboxState::Due));
    assert_eq!(
        replica.outbox_due(i64::MAX, 10).await.expect("due").len(),
        1
    );

    // An owner row refuses a replica copy and its outbox stays as it is.
    let err = owner
        .put_replica(&done, "node-b", vec![])
        .await
        .expect_err("owner row");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(state_of(&owner, "j").await, Some(OutboxState::Due));
}
