//! The job store's cluster operations against real SQLite in temporary folders: leases and
//! their recovery, first-final-wins results of attempts, replica rows, adoption of a dead
//! member's jobs, hand-over, and the migration that added roles to an existing store.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use kiln_daemon::protocol::{JobError, JobStatus, Tier};
use kiln_daemon::queue::output_files_on_disk as files_of;
use kiln_daemon::queue::{
    CancelOutcome, Finished, Job, JobRole, JobStore, Lease, NewJob, NewOutput, Outcome, StoreError,
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

/// Copies whose outputs all go into the database skip the replica's own look at the row (no
/// file could be wasted); the writer alone keeps the rules: the first final result's content
/// stays, and an owner row with the id is a conflict.
#[tokio::test]
async fn inline_copies_keep_the_rules_of_replicas() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let a = open_inline(owner_dir.path()).await;
    let b = open_inline(replica_dir.path()).await;
    let mut new = new_job("i1", "alice", Tier::Pro);
    new.replica = Some("node-b".to_string());
    let queued = submit(&a, new).await;
    b.put_replica(&queued, "node-a", Vec::new())
        .await
        .expect("put queued");
    a.next_job().await.expect("next").expect("job");
    let done = finish_and_copy(&a, &b, "i1").await;
    assert_eq!(
        output_contents(&b, "i1").await,
        vec![b"png bytes of owner".to_vec()]
    );
    assert_eq!(
        kiln_daemon::queue::inline_outputs_in_db(replica_dir.path(), "i1").expect("inline"),
        vec![0]
    );

    // The same result again, or another one: the first content stays.
    for tag in ["owner", "other"] {
        let r = b
            .put_replica(&done, "node-a", png(tag))
            .await
            .expect("put again");
        assert_eq!(r.status, JobStatus::Succeeded);
    }
    assert_eq!(
        b.outputs_with_content("i1")
            .await
            .expect("outputs")
            .into_iter()
            .map(|(o, content)| (o.index, content))
            .collect::<Vec<_>>(),
        vec![(0, Some(b"png bytes of owner".to_vec()))]
    );

    // An owner row with the id: conflict, and no output recorded for it.
    copy_onto_own_job_conflicts(&b, &done).await;
}

/// A succeeded copy of `done` under the id of a job `store` owns ("mine", stored here) is a
/// conflict: the owner row and its (no) outputs stay as they were.
async fn copy_onto_own_job_conflicts(store: &JobStore, done: &Job) {
    let mine = submit(store, new_job("mine", "bob", Tier::Free)).await;
    let mut copy = done.clone();
    copy.id = "mine".to_string();
    let err = store
        .put_replica(&copy, "node-a", png("x"))
        .await
        .expect_err("owner row");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(get(store, "mine").await, mine);
    assert!(store.outputs("mine").await.expect("outputs").is_empty());
}

/// A store that keeps every output as a file (these tests follow the files of racing
/// results); `open_inline` keeps small ones in its database.
async fn open(dir: &Path) -> JobStore {
    let opts = StoreOptions {
        inline_max_bytes: 0,
        ..StoreOptions::default()
    };
    JobStore::open(dir, opts).await.expect("open store")
}

async fn open_inline(dir: &Path) -> JobStore {
    JobStore::open(dir, StoreOptions::default())
        .await
        .expect("open store")
}

/// A store whose clock moves one second each time it is read, so every write has its own
/// instant.
async fn open_ticking(dir: &Path) -> JobStore {
    let now = Arc::new(AtomicI64::new(1_795_824_000_000));
    let opts = StoreOptions {
        clock: Arc::new(move || now.fetch_add(1_000, Ordering::SeqCst)),
        inline_max_bytes: 0,
        ..StoreOptions::default()
    };
    JobStore::open(dir, opts).await.expect("open store")
}

async fn submit(store: &JobStore, job: NewJob) -> Job {
    store.submit(job, None).await.expect("submit").job
}

async fn get(store: &JobStore, id: &str) -> Job {
    store.get(id).await.expect("get").expect("stored")
}

fn ids(store: &JobStore) -> Vec<String> {
    store.queue_order().into_iter().map(|j| j.id).collect()
}

fn job_ids(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|j| j.id.as_str()).collect()
}

fn png(tag: &str) -> Vec<NewOutput> {
    vec![NewOutput {
        filename: "ComfyUI_00001_.png".to_string(),
        content_type: "image/png".to_string(),
        bytes: format!("png bytes of {tag}").into_bytes(),
        watermark: None,
    }]
}

fn requeue(reason: &str) -> Outcome {
    Outcome::Requeue {
        reason: reason.to_string(),
    }
}

fn failed(code: &str) -> Outcome {
    Outcome::Failed(JobError {
        code: code.to_string(),
        message: format!("{code} happened"),
        details: None,
    })
}

/// Finishes running job `id` on owner `a` ("node-a") succeeded with `png("owner")`, and copies
/// the result to `b` as the replica; returns the owner's row.
async fn finish_and_copy(a: &JobStore, b: &JobStore, id: &str) -> Job {
    let outputs = png("owner");
    let done = a
        .finish(
            id,
            Outcome::Succeeded {
                outputs: outputs.clone(),
            },
        )
        .await
        .expect("finish");
    let r = b
        .put_replica(&done, "node-a", outputs)
        .await
        .expect("put done");
    assert_eq!(r.status, JobStatus::Succeeded);
    assert_eq!(r.finished_at_ms, done.finished_at_ms);
    done
}

/// The stored outputs of a job, read back.
async fn output_contents(store: &JobStore, id: &str) -> Vec<Vec<u8>> {
    let mut contents = Vec::new();
    for o in store.outputs(id).await.expect("outputs") {
        contents.push(
            store
                .read_output(id, &o, 0, usize::MAX)
                .await
                .expect("output content"),
        );
    }
    contents
}

/// The attempts rows of a job: (n, ended, outcome).
fn attempts_rows(dir: &Path, id: &str) -> Vec<(i64, bool, Option<String>)> {
    let conn = rusqlite::Connection::open(dir.join("kiln-jobs.sqlite3")).expect("sqlite");
    let mut st = conn
        .prepare(
            "SELECT n, ended_at IS NOT NULL, outcome FROM attempts WHERE job_id = ?1 ORDER BY n",
        )
        .expect("prepare");
    st.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<Vec<_>, _>>()
        .expect("rows")
}

#[tokio::test]
async fn leases_are_recorded_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    for (id, account) in [("j1", "a"), ("j2", "b"), ("j3", "a"), ("j4", "b")] {
        submit(&store, new_job(id, account, Tier::Free)).await;
    }
    let leased = store
        .next_job_for(Some("node-b"))
        .await
        .expect("next")
        .expect("a job");
    assert_eq!(leased.id, "j1");
    assert_eq!(leased.status, JobStatus::Running);
    assert_eq!(leased.lease_holder.as_deref(), Some("node-b"));
    assert_eq!(
        get(&store, "j1").await.lease_holder.as_deref(),
        Some("node-b")
    );
    let local = store.next_job().await.expect("next").expect("a job");
    assert_eq!(local.id, "j2");
    assert_eq!(local.lease_holder, None);
    assert_eq!(store.summary().running, 2);
    let err = store
        .next_job_for(Some(""))
        .await
        .expect_err("empty holder");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(store.close().await.expect("close"));

    let store = open(dir.path()).await;
    let report = store.recovery();
    assert_eq!(report.requeued, vec!["j2".to_string()]);
    assert!(report.failed.is_empty());
    assert_eq!(
        report.leased,
        vec![Lease {
            job_id: "j1".to_string(),
            holder: "node-b".to_string(),
            attempt: 1,
        }]
    );
    assert_eq!(report.queued, 3);
    // j2 returns to the place it was taken from; j1 keeps running on node-b.
    assert_eq!(ids(&store), vec!["j2", "j3", "j4"]);
    let j1 = get(&store, "j1").await;
    assert_eq!(j1.status, JobStatus::Running);
    assert_eq!(j1.lease_holder.as_deref(), Some("node-b"));
    assert_eq!(store.summary().running, 1);

    // The node's lease timer expires the lease: j1 goes back to its old place, holder cleared.
    let after = store
        .finish_attempt("j1", 1, requeue("lease expired"))
        .await
        .expect("finish_attempt");
    let Finished::Applied(j1) = after else {
        panic!("expected Applied, got {after:?}");
    };
    assert_eq!(j1.status, JobStatus::Queued);
    assert_eq!(j1.lease_holder, None);
    assert_eq!(get(&store, "j1").await.lease_holder, None);
    assert_eq!(ids(&store), vec!["j1", "j2", "j3", "j4"]);
    assert_eq!(store.summary().running, 0);
    assert!(store.close().await.expect("close"));

    let store = open(dir.path()).await;
    assert!(store.recovery().leased.is_empty());
    assert_eq!(ids(&store), vec!["j1", "j2", "j3", "j4"]);
}

#[tokio::test]
async fn first_final_result_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    submit(&store, new_job("j", "a", Tier::Pro)).await;
    let job = store
        .next_job_for(Some("node-b"))
        .await
        .expect("next")
        .expect("job");
    assert_eq!(job.attempts, 1);
    let first = store
        .finish_attempt(
            "j",
            1,
            Outcome::Succeeded {
                outputs: png("first"),
            },
        )
        .await
        .expect("finish");
    let Finished::Applied(done) = &first else {
        panic!("expected Applied, got {first:?}");
    };
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(
        output_contents(&store, "j").await,
        vec![b"png bytes of first".to_vec()]
    );
    let files = files_of(dir.path(), "j");
    let events = store.events("j").await.expect("events").len();
    let stored = get(&store, "j").await;

    // The same result again (a retried message) and a different one: both dropped.
    for outcome in [
        Outcome::Succeeded {
            outputs: png("second"),
        },
        failed("oom"),
        Outcome::Cancelled,
        requeue("late"),
    ] {
        let r = store
            .finish_attempt("j", 1, outcome)
            .await
            .expect("finish again");
        assert_eq!(r, Finished::Dropped(stored.clone()));
    }
    assert_eq!(get(&store, "j").await, stored);
    assert_eq!(
        output_contents(&store, "j").await,
        vec![b"png bytes of first".to_vec()]
    );
    assert_eq!(files_of(dir.path(), "j"), files);
    assert_eq!(store.events("j").await.expect("events").len(), events);
    let usage = store
        .usage("a", utc_day(stored.finished_at_ms.expect("finished")))
        .await
        .expect("usage");
    assert_eq!((usage.succeeded, usage.images), (1, 1));

    let err = store
        .finish_attempt("nope", 1, Outcome::Cancelled)
        .await
        .expect_err("unknown job");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

/// Runs job `j` (a new free job) under attempt 1 and has eight runners report a success at
/// once, each with its own output; checks that exactly one is applied and its output is the
/// one stored.
async fn race_eight_successes(store: &JobStore) {
    submit(store, new_job("j", "a", Tier::Free)).await;
    store.next_job_for(Some("node-b")).await.expect("next");
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let outputs = png(&format!("runner {n}"));
            let r = store
                .finish_attempt("j", 1, Outcome::Succeeded { outputs })
                .await
                .expect("finish");
            (n, r)
        }));
    }
    let mut applied = Vec::new();
    for task in tasks {
        let (n, r) = task.await.expect("task");
        match r {
            Finished::Applied(job) => {
                assert_eq!(job.status, JobStatus::Succeeded);
                applied.push(n);
            }
            Finished::Dropped(job) => assert_eq!(job.status, JobStatus::Succeeded),
            Finished::Stale(job) => panic!("a success is never stale: {job:?}"),
        }
    }
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(
        output_contents(store, "j").await,
        vec![format!("png bytes of runner {}", applied[0]).into_bytes()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_final_results_keep_only_the_winners_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    race_eight_successes(&store).await;
    // Only the winner's file is left.
    let outputs = store.outputs("j").await.expect("outputs");
    let recorded: Vec<String> = outputs
        .iter()
        .map(|o| {
            o.path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(files_of(dir.path(), "j"), recorded);
}

#[tokio::test]
async fn stale_requeue_and_late_success_of_an_earlier_attempt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    submit(&store, new_job("j", "a", Tier::Free)).await;
    store.next_job_for(Some("node-b")).await.expect("next");
    // Attempt 1's lease expires.
    let r = store
        .finish_attempt("j", 1, requeue("lease expired"))
        .await
        .expect("requeue");
    assert!(
        matches!(&r, Finished::Applied(j) if j.status == JobStatus::Queued),
        "{r:?}"
    );
    // The same expiry again (repeated): stale, nothing changes.
    let r = store
        .finish_attempt("j", 1, requeue("lease expired"))
        .await
        .expect("requeue again");
    assert!(
        matches!(&r, Finished::Stale(j) if j.status == JobStatus::Queued),
        "{r:?}"
    );
    assert_eq!(ids(&store), vec!["j"]);

    let second = store
        .next_job_for(Some("node-c"))
        .await
        .expect("next")
        .expect("job");
    assert_eq!(
        (second.attempts, second.lease_holder.as_deref()),
        (2, Some("node-c"))
    );
    let r = store
        .finish_attempt("j", 1, requeue("lease expired"))
        .await
        .expect("stale requeue");
    assert!(
        matches!(&r, Finished::Stale(j) if j.status == JobStatus::Running),
        "{r:?}"
    );
    assert_eq!(get(&store, "j").await.status, JobStatus::Running);

    // node-b finished attempt 1 after all: its success is the final result.
    let r = store
        .finish_attempt(
            "j",
            1,
            Outcome::Succeeded {
                outputs: png("attempt 1"),
            },
        )
        .await
        .expect("late success");
    let Finished::Applied(done) = &r else {
        panic!("expected Applied, got {r:?}");
    };
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempts, 2);
    assert_eq!(get(&store, "j").await.status, JobStatus::Succeeded);
    assert_eq!(store.summary().running, 0);
    assert_eq!(
        output_contents(&store, "j").await,
        vec![b"png bytes of attempt 1".to_vec()]
    );
    let rows = attempts_rows(dir.path(), "j");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|(_, ended, _)| *ended), "{rows:?}");
    assert_eq!(rows[0].2.as_deref(), Some("succeeded"));

    // Attempt 2's result arrives later: dropped, and its files are not kept.
    let files = files_of(dir.path(), "j");
    let r = store
        .finish_attempt(
            "j",
            2,
            Outcome::Succeeded {
                outputs: png("attempt 2"),
            },
        )
        .await
        .expect("later success");
    assert!(matches!(r, Finished::Dropped(_)), "{r:?}");
    assert_eq!(files_of(dir.path(), "j"), files);
    assert_eq!(
        output_contents(&store, "j").await,
        vec![b"png bytes of attempt 1".to_vec()]
    );
}

#[tokio::test]
async fn late_result_while_queued_leaves_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    submit(&store, new_job("j1", "a", Tier::Free)).await;
    submit(&store, new_job("j2", "b", Tier::Free)).await;
    store.next_job_for(Some("node-b")).await.expect("next");
    store
        .finish_attempt("j1", 1, requeue("lease expired"))
        .await
        .expect("requeue");
    assert_eq!(ids(&store), vec!["j1", "j2"]);
    let r = store
        .finish_attempt(
            "j1",
            1,
            Outcome::Succeeded {
                outputs: png("late"),
            },
        )
        .await
        .expect("late success");
    assert!(
        matches!(&r, Finished::Applied(j) if j.status == JobStatus::Succeeded),
        "{r:?}"
    );
    assert_eq!(store.position("j1"), None);
    assert_eq!(ids(&store), vec!["j2"]);
    let next = store.next_job().await.expect("next").expect("job");
    assert_eq!(next.id, "j2");
    assert_eq!(store.next_job().await.expect("next"), None);

    // A late failure of a queued job is final too.
    submit(&store, new_job("j3", "a", Tier::Free)).await;
    store.next_job_for(Some("node-c")).await.expect("next");
    store
        .finish_attempt("j3", 1, requeue("lease expired"))
        .await
        .expect("requeue");
    let r = store
        .finish_attempt("j3", 1, failed("comfy_error"))
        .await
        .expect("late failure");
    assert!(
        matches!(&r, Finished::Applied(j) if j.status == JobStatus::Failed),
        "{r:?}"
    );
    assert_eq!(ids(&store), Vec::<String>::new());
    assert!(store.close().await.expect("close"));
    // Only j2, which this node was running itself, comes back.
    let store = open(dir.path()).await;
    assert_eq!(store.recovery().requeued, vec!["j2".to_string()]);
    assert_eq!(ids(&store), vec!["j2"]);
    assert_eq!(get(&store, "j1").await.status, JobStatus::Succeeded);
    assert_eq!(get(&store, "j3").await.status, JobStatus::Failed);
}

#[tokio::test]
async fn requeue_of_the_last_attempt_fails_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut job = new_job("j", "a", Tier::Free);
    job.max_attempts = 2;
    submit(&store, job).await;
    for attempt in 1..=2u32 {
        let taken = store
            .next_job_for(Some("node-b"))
            .await
            .expect("next")
            .expect("job");
        assert_eq!(taken.attempts, attempt);
        let r = store
            .finish_attempt("j", attempt, requeue("lease expired"))
            .await
            .expect("requeue");
        let Finished::Applied(after) = r else {
            panic!("expected Applied, got {r:?}");
        };
        if attempt == 1 {
            assert_eq!(after.status, JobStatus::Queued);
        } else {
            assert_eq!(after.status, JobStatus::Failed);
            let error = after.error.expect("error");
            assert_eq!(error.code, "max_attempts");
        }
    }
    assert_eq!(store.next_job().await.expect("next"), None);
}

#[tokio::test]
async fn replicas_are_stored_apart_from_the_queue() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let a = open(owner_dir.path()).await;
    let b = open(replica_dir.path()).await;
    let mut new = new_job("r1", "alice", Tier::Pro);
    new.replica = Some("node-b".to_string());
    let queued = submit(&a, new).await;
    assert_eq!(queued.replica.as_deref(), Some("node-b"));
    assert_eq!(queued.role, JobRole::Owner);

    let stored = b
        .put_replica(&queued, "node-a", Vec::new())
        .await
        .expect("put");
    assert_eq!(stored.role, JobRole::Replica);
    assert_eq!(stored.owner.as_deref(), Some("node-a"));
    assert_eq!(stored.status, JobStatus::Queued);
    assert_eq!(
        (
            stored.account.as_str(),
            stored.tier,
            &stored.workflow,
            &stored.metadata
        ),
        (
            queued.account.as_str(),
            queued.tier,
            &queued.workflow,
            &queued.metadata
        )
    );
    assert_eq!(stored.created_at_ms, queued.created_at_ms);
    // Repeating the copy changes nothing.
    assert_eq!(
        b.put_replica(&queued, "node-a", Vec::new())
            .await
            .expect("put again"),
        stored
    );
    assert!(ids(&b).is_empty());
    assert!(b.summary().tiers.iter().all(|t| t.queued == 0));
    assert_eq!(b.summary().running, 0);
    assert_eq!(b.next_job().await.expect("next"), None);
    let usage = b
        .usage("alice", utc_day(queued.created_at_ms))
        .await
        .expect("usage");
    assert_eq!(usage.submitted, 0);
    assert!(b.owned_active().await.expect("owned").is_empty());

    // The owner runs it: the running copy replaces the queued one.
    let running = a.next_job().await.expect("next").expect("job");
    let r = b
        .put_replica(&running, "node-a", Vec::new())
        .await
        .expect("put running");
    assert_eq!((r.status, r.attempts), (JobStatus::Running, 1));
    assert_eq!(b.summary().running, 0);
    // An older copy arriving late changes nothing.
    let r = b
        .put_replica(&queued, "node-a", Vec::new())
        .await
        .expect("put old");
    assert_eq!((r.status, r.attempts), (JobStatus::Running, 1));

    let done = finish_and_copy(&a, &b, "r1").await;
    assert_eq!(
        output_contents(&b, "r1").await,
        vec![b"png bytes of owner".to_vec()]
    );
    let files = files_of(replica_dir.path(), "r1");
    assert_eq!(files.len(), 1, "{files:?}");

    // A final row never changes: not by older copies, nor by another final result.
    let mut other_final = done.clone();
    other_final.status = JobStatus::Failed;
    for copy in [&queued, &running, &other_final, &done] {
        let r = b
            .put_replica(copy, "node-a", png("other"))
            .await
            .expect("put after final");
        assert_eq!((r.status, r.attempts), (JobStatus::Succeeded, 1));
    }
    assert_eq!(
        output_contents(&b, "r1").await,
        vec![b"png bytes of owner".to_vec()]
    );
    assert_eq!(files_of(replica_dir.path(), "r1"), files);
    let usage = b
        .usage("alice", utc_day(queued.created_at_ms))
        .await
        .expect("usage");
    assert_eq!((usage.submitted, usage.succeeded, usage.images), (0, 0, 0));

    // A replica row is not ours to finish or cancel.
    let err = b
        .finish_attempt("r1", 1, Outcome::Cancelled)
        .await
        .expect_err("not owner");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("r1") && message.contains("node-a"),
        "{message}"
    );

    // An owner row with the id: conflict, nothing changes.
    copy_onto_own_job_conflicts(&b, &done).await;
    assert!(files_of(replica_dir.path(), "mine").is_empty());

    let err = b
        .put_replica(&queued, "", Vec::new())
        .await
        .expect_err("empty owner");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn replica_attempts_only_grow() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let a = open(owner_dir.path()).await;
    let b = open(replica_dir.path()).await;
    submit(&a, new_job("j", "alice", Tier::Free)).await;
    let run1 = a.next_job().await.expect("next").expect("job");
    let requeued = a
        .finish("j", requeue("comfy restarted"))
        .await
        .expect("requeue");
    let run2 = a.next_job().await.expect("next").expect("job");
    assert_eq!((run1.attempts, requeued.attempts, run2.attempts), (1, 1, 2));

    b.put_replica(&run2, "node-a", Vec::new())
        .await
        .expect("put");
    for old in [&run1, &requeued] {
        let r = b
            .put_replica(old, "node-a", Vec::new())
            .await
            .expect("put old");
        assert_eq!((r.status, r.attempts), (JobStatus::Running, 2));
    }
    // Same attempt: queued again after running is newer; running after queued is older.
    let c_dir = tempfile::tempdir().expect("tempdir");
    let c = open(c_dir.path()).await;
    c.put_replica(&run1, "node-a", Vec::new())
        .await
        .expect("put");
    let r = c
        .put_replica(&requeued, "node-a", Vec::new())
        .await
        .expect("put requeued");
    assert_eq!((r.status, r.attempts), (JobStatus::Queued, 1));
    let r = c
        .put_replica(&run1, "node-a", Vec::new())
        .await
        .expect("put old");
    assert_eq!((r.status, r.attempts), (JobStatus::Queued, 1));
}

#[tokio::test]
async fn only_the_owner_of_a_copy_makes_it_forgotten() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let a = open(owner_dir.path()).await;
    let b = open(replica_dir.path()).await;
    let queued = submit(&a, new_job("q", "alice", Tier::Free)).await;
    b.put_replica(&queued, "node-a", Vec::new())
        .await
        .expect("put");
    // Another member cannot make node-a's copy go.
    assert!(!b.drop_copy("q", "node-c").await.expect("drop"));
    assert_eq!(get(&b, "q").await.status, JobStatus::Queued);
    assert!(b.drop_copy("q", "node-a").await.expect("drop"));
    assert!(b.get("q").await.expect("get").is_none());
    assert!(b.adopt("node-a").await.expect("adopt").is_empty());
    // Gone already: nothing to forget; a bad member name is refused.
    assert!(!b.drop_copy("q", "node-a").await.expect("drop again"));
    assert!(b.drop_copy("q", "").await.is_err());
    // A final copy is kept: it still answers for the job's result.
    let done = submit(&a, new_job("d", "alice", Tier::Free)).await;
    b.put_replica(&done, "node-a", Vec::new())
        .await
        .expect("put");
    // Leases go oldest first: q, then d.
    for _ in 0..2 {
        a.next_job().await.expect("next").expect("job");
    }
    let failed_job = a.finish("d", failed("boom")).await.expect("fail");
    b.put_replica(&failed_job, "node-a", Vec::new())
        .await
        .expect("put final");
    assert!(!b.drop_copy("d", "node-a").await.expect("drop final"));
    assert_eq!(get(&b, "d").await.status, JobStatus::Failed);
}

#[tokio::test]
async fn adopt_takes_over_a_dead_members_jobs() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let a = open_ticking(owner_dir.path()).await;
    let b = open(replica_dir.path()).await;
    // On node-a: f1 succeeds, r1 runs on node-a itself, r2 runs on node-c, q1 and q2 wait.
    let mut keyed = new_job("q1", "alice", Tier::Free);
    keyed.idempotency_key = Some("key-1".to_string());
    for job in [
        new_job("f1", "alice", Tier::Free),
        new_job("r1", "alice", Tier::Free),
        new_job("r2", "bob", Tier::Free),
        keyed,
        new_job("q2", "bob", Tier::Free),
    ] {
        submit(&a, job).await;
    }
    // Round robin between alice and bob: f1, then r2, then r1.
    let f1 = a.next_job().await.expect("next").expect("f1");
    let r2 = a
        .next_job_for(Some("node-c"))
        .await
        .expect("next")
        .expect("r2");
    let r1 = a.next_job().await.expect("next").expect("r1");
    assert_eq!(
        job_ids(&[f1.clone(), r2.clone(), r1.clone()]),
        vec!["f1", "r2", "r1"]
    );
    let f1 = a
        .finish("f1", Outcome::Succeeded { outputs: vec![] })
        .await
        .expect("finish");
    // Replicas arrive in any order; node-x's job must not be touched.
    for id in ["q2", "r2", "f1", "q1", "r1"] {
        let copy = get(&a, id).await;
        b.put_replica(&copy, "node-a", Vec::new())
            .await
            .expect("put");
    }
    let x_dir = tempfile::tempdir().expect("tempdir");
    let x = open(x_dir.path()).await;
    let x1 = submit(&x, new_job("x1", "carol", Tier::Free)).await;
    b.put_replica(&x1, "node-x", Vec::new())
        .await
        .expect("put x1");
    let mine = submit(&b, new_job("mine", "bob", Tier::Free)).await;
    assert_eq!(ids(&b), vec!["mine"]);
    assert_eq!(
        job_ids(&b.replicas_of("node-a").await.expect("replicas")),
        vec!["q2", "r2", "f1", "q1", "r1"]
    );

    let adopted = b.adopt("node-a").await.expect("adopt");
    assert_eq!(job_ids(&adopted), vec!["r1", "r2", "q1", "q2"]);
    assert!(
        adopted
            .iter()
            .all(|j| j.role == JobRole::Owner && j.owner.is_none())
    );
    let r1 = get(&b, "r1").await;
    assert_eq!(
        (r1.status, r1.lease_holder.as_deref()),
        (JobStatus::Running, Some("node-a"))
    );
    let r2 = get(&b, "r2").await;
    assert_eq!(
        (r2.status, r2.lease_holder.as_deref()),
        (JobStatus::Running, Some("node-c"))
    );
    let f1_here = get(&b, "f1").await;
    assert_eq!((f1_here.role, f1_here.status), (JobRole::Owner, f1.status));
    assert_eq!(b.summary().running, 2);
    // Queued ones are scheduled like submissions: alice joins the ring behind bob; inside
    // bob's account, q2 (older here than mine) runs first.
    assert_eq!(ids(&b), vec!["q2", "q1", "mine"]);
    assert_eq!(
        job_ids(&b.owned_active().await.expect("owned")),
        vec!["q2", "r2", "q1", "r1", "mine"]
    );
    assert!(b.replicas_of("node-a").await.expect("replicas").is_empty());
    assert_eq!(get(&b, "x1").await.role, JobRole::Replica);

    // Again: nothing more to adopt, nothing changes.
    let before = ids(&b);
    assert!(b.adopt("node-a").await.expect("adopt again").is_empty());
    assert_eq!(ids(&b), before);
    assert_eq!(get(&b, "r1").await, r1);

    // The idempotency key came with the replica: a client retrying on this node gets q1.
    let mut retry = new_job("q1-retry", "alice", Tier::Free);
    retry.idempotency_key = Some("key-1".to_string());
    retry.body_hash = "hash-q1".to_string();
    let s = b.submit(retry, None).await.expect("retry");
    assert!(!s.created);
    assert_eq!(s.job.id, "q1");

    // r1's lease (in the dead owner's name) expires: it is requeued and can run here.
    let r = b
        .finish_attempt("r1", r1.attempts, requeue("lease expired"))
        .await
        .expect("expire");
    assert!(
        matches!(&r, Finished::Applied(j) if j.status == JobStatus::Queued),
        "{r:?}"
    );
    assert!(ids(&b).contains(&"r1".to_string()));
    assert_eq!(b.summary().running, 1);
    assert!(b.close().await.expect("close"));
    let b = open(replica_dir.path()).await;
    assert_eq!(
        b.recovery().leased,
        vec![Lease {
            job_id: "r2".to_string(),
            holder: "node-c".to_string(),
            attempt: r2.attempts,
        }]
    );
    assert_eq!(get(&b, "mine").await.status, mine.status);
    let mut taken = Vec::new();
    for _ in 0..10 {
        match b.next_job().await.expect("next") {
            Some(job) => taken.push(job.id),
            None => break,
        }
    }
    taken.sort();
    assert_eq!(taken, vec!["mine", "q1", "q2", "r1"]);
}

#[tokio::test]
async fn hand_over_set_replica_and_listings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    let mut h1 = new_job("h1", "alice", Tier::Free);
    h1.replica = Some("node-b".to_string());
    submit(&store, h1).await;
    submit(&store, new_job("h2", "alice", Tier::Free)).await;
    submit(&store, new_job("h3", "bob", Tier::Free)).await;
    assert_eq!(get(&store, "h1").await.replica.as_deref(), Some("node-b"));

    let j = store.set_replica("h1", Some("node-c")).await.expect("set");
    assert_eq!(j.replica.as_deref(), Some("node-c"));
    assert_eq!(get(&store, "h1").await.replica.as_deref(), Some("node-c"));
    let j = store.set_replica("h2", Some("node-c")).await.expect("set");
    assert_eq!(j.replica.as_deref(), Some("node-c"));
    let j = store.set_replica("h2", None).await.expect("clear");
    assert_eq!(j.replica, None);
    assert_eq!(get(&store, "h2").await.replica, None);
    let err = store.set_replica("nope", None).await.expect_err("unknown");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");

    let running = store.next_job().await.expect("next").expect("job");
    assert_eq!(running.id, "h1");
    assert_eq!(
        job_ids(&store.owned_active().await.expect("owned")),
        vec!["h1", "h2", "h3"]
    );
    let err = store.hand_over("h1", "node-b").await.expect_err("running");
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                status: JobStatus::Running,
                ..
            }
        ),
        "{err}"
    );

    let handed = store.hand_over("h2", "node-b").await.expect("hand over");
    assert_eq!(handed.role, JobRole::Replica);
    assert_eq!(handed.owner.as_deref(), Some("node-b"));
    assert_eq!(handed.status, JobStatus::Queued);
    assert_eq!(get(&store, "h2").await, handed);
    assert_eq!(ids(&store), vec!["h3"]);
    assert_eq!(store.position("h2"), None);
    // Repeating it is harmless; handing it to someone else is not ours to do.
    assert_eq!(
        store.hand_over("h2", "node-b").await.expect("again"),
        handed
    );
    let err = store
        .hand_over("h2", "node-z")
        .await
        .expect_err("not owner");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    let err = store
        .set_replica("h2", Some("node-c"))
        .await
        .expect_err("not owner");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    let err = store.cancel("h2").await.expect_err("not owner");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");

    assert_eq!(
        job_ids(&store.owned_active().await.expect("owned")),
        vec!["h1", "h3"]
    );
    assert_eq!(
        job_ids(&store.replicas_of("node-b").await.expect("replicas")),
        vec!["h2"]
    );
    assert!(
        store
            .replicas_of("node-c")
            .await
            .expect("replicas")
            .is_empty()
    );
    // The queue stays without h2 across a reopen.
    match store.cancel("h3").await.expect("cancel") {
        CancelOutcome::Cancelled(j) => assert_eq!(j.status, JobStatus::Cancelled),
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert!(store.close().await.expect("close"));
    let store = open(dir.path()).await;
    assert_eq!(store.recovery().requeued, vec!["h1".to_string()]);
    assert_eq!(ids(&store), vec!["h1"]);
}

#[tokio::test]
async fn a_store_from_before_roles_opens_and_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let conn =
            rusqlite::Connection::open(dir.path().join("kiln-jobs.sqlite3")).expect("sqlite");
        conn.execute_batch(kiln_daemon::queue::schema::MIGRATIONS[0])
            .expect("migration 1");
        conn.execute_batch(
            r#"
            PRAGMA user_version = 1;
            INSERT INTO jobs (id, account, tier, status, workflow, body_hash, created_at,
                              attempts, max_attempts)
            VALUES ('old-q', 'alice', 0, 'queued', '{"1":{}}', 'h1', 1000, 0, 3);
            INSERT INTO jobs (id, account, tier, status, workflow, body_hash, created_at,
                              started_at, attempts, max_attempts, ring_pos)
            VALUES ('old-r', 'bob', 0, 'running', '{"2":{}}', 'h2', 2000, 3000, 1, 3, 0);
            INSERT INTO attempts (job_id, n, started_at) VALUES ('old-r', 1, 3000);
            "#,
        )
        .expect("old rows");
    }
    let store = open(dir.path()).await;
    assert_eq!(store.recovery().requeued, vec!["old-r".to_string()]);
    assert!(store.recovery().leased.is_empty());
    for id in ["old-q", "old-r"] {
        let job = get(&store, id).await;
        assert_eq!(job.role, JobRole::Owner);
        assert_eq!(
            (job.owner, job.replica, job.lease_holder),
            (None, None, None)
        );
        assert_eq!(job.status, JobStatus::Queued);
    }
    let mut order = ids(&store);
    order.sort();
    assert_eq!(order, vec!["old-q", "old-r"]);
    let taken = store
        .next_job_for(Some("node-b"))
        .await
        .expect("next")
        .expect("job");
    let r = store
        .finish_attempt(
            &taken.id,
            taken.attempts,
            Outcome::Succeeded {
                outputs: png("old"),
            },
        )
        .await
        .expect("finish");
    assert!(
        matches!(&r, Finished::Applied(j) if j.status == JobStatus::Succeeded),
        "{r:?}"
    );
    assert_eq!(
        output_contents(&store, &taken.id).await,
        vec![b"png bytes of old".to_vec()]
    );
    let handed = store
        .hand_over(&ids(&store)[0], "node-c")
        .await
        .expect("hand over");
    assert_eq!(handed.role, JobRole::Replica);
    assert_eq!(
        kiln_daemon::queue::schema::current_version(),
        kiln_daemon::queue::schema::MIGRATIONS.len() as i64
    );
}

#[tokio::test]
async fn a_job_leased_to_another_member_is_handed_over_with_its_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path()).await;
    submit(&store, new_job("l1", "alice", Tier::Pro)).await;
    let leased = store
        .next_job_for(Some("node-x"))
        .await
        .expect("lease")
        .expect("job");
    assert_eq!(leased.lease_holder.as_deref(), Some("node-x"));
    assert_eq!(store.summary().running, 1);
    let handed = store.hand_over("l1", "node-b").await.expect("hand over");
    assert_eq!(handed.role, JobRole::Replica);
    assert_eq!(handed.owner.as_deref(), Some("node-b"));
    assert_eq!(handed.status, JobStatus::Running);
    assert_eq!(
        handed.lease_holder.as_deref(),
        Some("node-x"),
        "the runner keeps it"
    );
    assert_eq!(get(&store, "l1").await, handed);
    assert_eq!(store.summary().running, 0);
    assert!(store.owned_active().await.expect("owned").is_empty());
    // Its result now belongs to the new owner, with or without a file to write first.
    let err = store
        .finish_attempt("l1", 1, Outcome::Cancelled)
        .await
        .expect_err("not ours");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    let err = store
        .finish_attempt("l1", 1, Outcome::Succeeded { outputs: vec![] })
        .await
        .expect_err("not ours");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    let err = store
        .finish_attempt(
            "l1",
            1,
            Outcome::Succeeded {
                outputs: png("late"),
            },
        )
        .await
        .expect_err("not ours");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    let err = store
        .finish("l1", Outcome::Succeeded { outputs: vec![] })
        .await
        .expect_err("not ours");
    assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
    assert!(files_of(dir.path(), "l1").is_empty());
}

#[tokio::test]
async fn the_same_submission_again_returns_the_stored_job_or_copy() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let copy_dir = tempfile::tempdir().expect("tempdir");
    let a = open(owner_dir.path()).await;
    let b = open(copy_dir.path()).await;
    let mut new = new_job("s1", "alice", Tier::Pro);
    new.replica = Some("node-b".to_string());
    let first = a.submit(new.clone(), None).await.expect("submit");
    assert!(first.created);

    // A forwarder that lost the owner's answer sends the very same submission again.
    let again = a.submit(new.clone(), None).await.expect("repeat");
    assert!(!again.created);
    assert_eq!(again.job, first.job);
    assert_eq!(ids(&a), vec!["s1".to_string()]);

    // The owner died after copying it: the member holding the copy answers with the copy and
    // queues nothing of its own (adoption decides who runs it).
    let copy = b
        .put_replica(&first.job, "node-a", Vec::new())
        .await
        .expect("copy");
    let at_copy = b.submit(new.clone(), None).await.expect("repeat at copy");
    assert!(!at_copy.created);
    assert_eq!(at_copy.job, copy);
    assert_eq!(at_copy.job.role, JobRole::Replica);
    assert!(ids(&b).is_empty());

    // The same id with another body or account is still refused, and changes nothing.
    let mut other_body = new.clone();
    other_body.body_hash = "hash-other".to_string();
    assert!(matches!(
        a.submit(other_body, None).await,
        Err(StoreError::Invalid(message)) if message.contains("already exists")
    ));
    let mut other_account = new;
    other_account.account = "mallory".to_string();
    assert!(matches!(
        b.submit(other_account, None).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(get(&a, "s1").await, first.job);
    assert_eq!(get(&b, "s1").await, copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_inline_results_keep_only_the_winners_content() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_inline(dir.path()).await;
    race_eight_successes(&store).await;
    let outputs = store.outputs("j").await.expect("outputs");
    assert!(outputs[0].inline && outputs[0].path.as_os_str().is_empty());
    assert!(files_of(dir.path(), "j").is_empty());
    assert_eq!(
        kiln_daemon::queue::inline_outputs_in_db(dir.path(), "j").expect("inline"),
        vec![0]
    );
}

#[tokio::test]
async fn a_replica_keeps_small_outputs_in_its_database() {
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let replica_dir = tempfile::tempdir().expect("tempdir");
    let a = open_inline(owner_dir.path()).await;
    let b = open_inline(replica_dir.path()).await;
    let mut new = new_job("r1", "alice", Tier::Pro);
    new.replica = Some("node-b".to_string());
    submit(&a, new).await;
    a.next_job().await.expect("next").expect("job");
    let done = finish_and_copy(&a, &b, "r1").await;
    for (store, dir) in [(&a, owner_dir.path()), (&b, replica_dir.path())] {
        assert_eq!(
            output_contents(store, "r1").await,
            vec![b"png bytes of owner".to_vec()]
        );
        assert!(files_of(dir, "r1").is_empty());
    }
    // A later final copy changes nothing, and leaves nothing behind.
    let mut other_final = done.clone();
    other_final.status = JobStatus::Failed;
    b.put_replica(&other_final, "node-a", png("other"))
        .await
        .expect("put after final");
    assert_eq!(
        output_contents(&b, "r1").await,
        vec![b"png bytes of owner".to_vec()]
    );
    assert!(files_of(replica_dir.path(), "r1").is_empty());
    // Deleting the outputs on the replica deletes the content with the record.
    let outputs = b.outputs("r1").await.expect("outputs");
    b.remove_output_files("r1", &outputs)
        .await
        .expect("remove nothing on disk");
    b.mark_outputs_deleted("r1", kiln_daemon::protocol::DeleteReason::User, 5)
        .await
        .expect("mark deleted");
    assert!(
        kiln_daemon::queue::inline_outputs_in_db(replica_dir.path(), "r1")
            .expect("inline")
            .is_empty()
    );
    let err = b
        .read_output("r1", &outputs[0], 0, usize::MAX)
        .await
        .expect_err("deleted");
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("r1"), "{err}");
}
