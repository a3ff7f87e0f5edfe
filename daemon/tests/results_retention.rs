//! Output retention against a real job store in a temporary folder, with paused tokio time:
//! the sweeper deletes free outputs a day after the job finished and paid tiers' after 30
//! days, removing the files and recording the deletion; user deletion is recorded the same way
//! and refused for a job that is not final; the expiry survives a reopen with a new policy.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_daemon::protocol::{DeleteReason, JobStatus, Tier};
use kiln_daemon::queue::{Job, JobStore, NewJob, NewOutput, Outcome, StoreError, StoreOptions};
use kiln_daemon::results::{Results, SweepClock, SweepSettings, Sweeper};
use kiln_daemon::tiers::TierTable;
use serde_json::json;

const T0: i64 = 1_795_824_000_000;
const HOUR: Duration = Duration::from_secs(3600);

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

fn png(tag: &str) -> Vec<NewOutput> {
    vec![NewOutput {
        filename: "ComfyUI_00001_.png".to_string(),
        content_type: "image/png".to_string(),
        bytes: format!("png bytes of {tag}").into_bytes(),
        watermark: None,
    }]
}

/// What holds a job's outputs on this node: its files, and `inline:<index>` for each output
/// whose content the database keeps (the default for outputs as small as these).
fn held(dir: &Path, id: &str) -> Vec<String> {
    let mut held = kiln_daemon::queue::output_files_on_disk(dir, id);
    let inline = kiln_daemon::queue::inline_outputs_in_db(dir, id).expect("inline outputs");
    held.extend(inline.into_iter().map(|index| format!("inline:{index}")));
    held
}

async fn open(dir: &Path, clock: SweepClock, retention: Vec<(Tier, Duration)>) -> JobStore {
    open_with(
        dir,
        clock,
        retention,
        StoreOptions::default().inline_max_bytes,
    )
    .await
}

async fn open_with(
    dir: &Path,
    clock: SweepClock,
    retention: Vec<(Tier, Duration)>,
    inline_max_bytes: u64,
) -> JobStore {
    let opts = StoreOptions {
        clock: Arc::new(move || clock.now_ms()),
        retention,
        inline_max_bytes,
        ..StoreOptions::default()
    };
    JobStore::open(dir, opts).await.expect("open store")
}

/// Submits a job, runs it and finishes it succeeded with one output.
async fn succeed(store: &JobStore, id: &str, tier: Tier) -> Job {
    store
        .submit(new_job(id, &format!("acct-{id}"), tier), None)
        .await
        .expect("submit");
    let next = store.next_job().await.expect("next").expect("a job");
    assert_eq!(next.id, id);
    store
        .finish(id, Outcome::Succeeded { outputs: png(id) })
        .await
        .expect("finish")
}

async fn get(store: &JobStore, id: &str) -> Job {
    store.get(id).await.expect("get").expect("stored")
}

/// Waits (paused time: each sleep lets the sweeper run) until `id`'s outputs are deleted, for
/// at most 20 s of real time: the sweeper's store work runs on real threads, which paused
/// time does not wait for, so a count of sleeps alone would depend on the machine's load.
async fn wait_deleted(store: &JobStore, id: &str) -> Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let job = get(store, id).await;
        if job.outputs_deleted.is_some() {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the outputs of {id} were not deleted");
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_deletes_free_outputs_after_a_day_and_pro_after_thirty_days() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SweepClock::starting_at(T0);
    let store = open(dir.path(), clock, TierTable::default().retentions()).await;
    let free = succeed(&store, "free-job", Tier::Free).await;
    let pro = succeed(&store, "pro-job", Tier::Pro).await;
    let free_finished = free.finished_at_ms.expect("finished");
    let pro_finished = pro.finished_at_ms.expect("finished");
    // The store stamped each job's expiry from its tier's retention.
    assert_eq!(
        get(&store, "free-job").await.outputs_expire_at_ms,
        Some(free_finished + 24 * 3_600_000)
    );
    assert_eq!(
        get(&store, "pro-job").await.outputs_expire_at_ms,
        Some(pro_finished + 30 * 24 * 3_600_000)
    );
    assert_eq!(held(dir.path(), "free-job").len(), 1);
    assert_eq!(held(dir.path(), "pro-job").len(), 1);

    let sweeper = Sweeper::start(
        Results::new(store.clone()),
        SweepSettings {
            interval: Duration::from_secs(600),
            batch: 10,
            max_burst: 5,
        },
        clock,
    );
    // Nothing has expired yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(get(&store, "free-job").await.outputs_deleted.is_none());

    tokio::time::advance(25 * HOUR).await;
    let free = wait_deleted(&store, "free-job").await;
    let (at, reason) = free.outputs_deleted.expect("deleted");
    assert_eq!(reason, DeleteReason::Retention);
    assert!(at >= free_finished + 24 * 3_600_000, "deleted at {at}");
    assert!(held(dir.path(), "free-job").is_empty());
    // The rows of the outputs stay (the view names them; fetching answers gone).
    assert_eq!(store.outputs("free-job").await.expect("outputs").len(), 1);
    let view = free.view(
        &store.outputs("free-job").await.expect("outputs"),
        None,
        None,
    );
    let shown = serde_json::to_value(&view).expect("json");
    assert_eq!(shown["outputs_deleted"]["reason"], "retention", "{shown}");
    assert!(shown.get("outputs_expire_at").is_none(), "{shown}");

    let pro = get(&store, "pro-job").await;
    assert!(pro.outputs_deleted.is_none(), "pro outputs kept after 25 h");
    assert_eq!(held(dir.path(), "pro-job").len(), 1);
    let shown = serde_json::to_value(pro.view(&[], None, None)).expect("json");
    assert!(shown["outputs_expire_at"].is_string(), "{shown}");

    tokio::time::advance(30 * 24 * HOUR).await;
    let pro = wait_deleted(&store, "pro-job").await;
    assert_eq!(
        pro.outputs_deleted.map(|d| d.1),
        Some(DeleteReason::Retention)
    );
    assert!(held(dir.path(), "pro-job").is_empty());
    // The free job keeps its first deletion.
    assert_eq!(
        get(&store, "free-job").await.outputs_deleted,
        Some((at, reason))
    );

    sweeper.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_sweep_takes_a_bounded_batch_and_the_next_pass_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SweepClock::starting_at(T0);
    let store = open(dir.path(), clock, vec![(Tier::Free, HOUR)]).await;
    for i in 0..5 {
        succeed(&store, &format!("job-{i}"), Tier::Free).await;
    }
    // A tier without retention keeps its outputs.
    succeed(&store, "kept", Tier::Enterprise).await;
    assert_eq!(get(&store, "kept").await.outputs_expire_at_ms, None);
    tokio::time::advance(2 * HOUR).await;
    let results = Results::new(store.clone());
    let first = results.sweep_once(clock.now_ms(), 3).await.expect("sweep");
    assert_eq!((first.found, first.deleted, first.failed), (3, 3, 0));
    let second = results.sweep_once(clock.now_ms(), 3).await.expect("sweep");
    assert_eq!((second.found, second.deleted, second.failed), (2, 2, 0));
    let third = results.sweep_once(clock.now_ms(), 3).await.expect("sweep");
    assert_eq!(third.found, 0);
    for i in 0..5 {
        assert!(held(dir.path(), &format!("job-{i}")).is_empty());
    }
    assert!(get(&store, "kept").await.outputs_deleted.is_none());
    assert_eq!(held(dir.path(), "kept").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn user_deletion_is_recorded_once_and_refused_for_unfinished_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SweepClock::starting_at(T0);
    let store = open(dir.path(), clock, TierTable::default().retentions()).await;
    let results = Results::new(store.clone());
    succeed(&store, "done", Tier::Pro).await;
    store
        .submit(new_job("waiting", "acct-w", Tier::Pro), None)
        .await
        .expect("submit");

    let deleted = results
        .delete_outputs("done", DeleteReason::User, clock.now_ms())
        .await
        .expect("delete");
    let first = deleted.outputs_deleted.expect("recorded");
    assert_eq!(first.1, DeleteReason::User);
    assert!(held(dir.path(), "done").is_empty());
    // Again: the first deletion stands; retention later changes nothing.
    tokio::time::advance(HOUR).await;
    let again = results
        .delete_outputs("done", DeleteReason::User, clock.now_ms())
        .await
        .expect("delete again");
    assert_eq!(again.outputs_deleted, Some(first));
    tokio::time::advance(31 * 24 * HOUR).await;
    let sweep = results.sweep_once(clock.now_ms(), 10).await.expect("sweep");
    assert_eq!(sweep.found, 0, "a deleted job is not swept again");

    match results
        .delete_outputs("waiting", DeleteReason::User, clock.now_ms())
        .await
    {
        Err(StoreError::Conflict { status, .. }) => assert_eq!(status, JobStatus::Queued),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match results
        .delete_outputs("nope", DeleteReason::User, clock.now_ms())
        .await
    {
        Err(StoreError::NotFound(id)) => assert_eq!(id, "nope"),
        other => panic!("expected not found, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_changed_retention_applies_to_finished_jobs_at_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SweepClock::starting_at(T0);
    let store = open(dir.path(), clock, TierTable::default().retentions()).await;
    let job = succeed(&store, "j", Tier::Premium).await;
    let finished = job.finished_at_ms.expect("finished");
    assert!(store.close().await.expect("close"));
    let store = open(dir.path(), clock, vec![(Tier::Premium, 2 * HOUR)]).await;
    assert_eq!(
        get(&store, "j").await.outputs_expire_at_ms,
        Some(finished + 2 * 3_600_000)
    );
}

/// Moves `id`'s stored output into the folder of its own that stores before the shared output
/// folders used (`outputs/<id>/0-<name>`), and points its row there, as such a store left it.
fn into_legacy_folder(data_dir: &Path, id: &str) -> std::path::PathBuf {
    let db = rusqlite::Connection::open(data_dir.join("kiln-jobs.sqlite3")).expect("open db");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let current: String = db
        .query_row("SELECT path FROM outputs WHERE job_id = ?1", [id], |row| {
            row.get(0)
        })
        .expect("the output row");
    let relative = format!("outputs/{id}/0-ComfyUI_00001_.png");
    std::fs::create_dir_all(data_dir.join("outputs").join(id)).expect("legacy folder");
    std::fs::rename(data_dir.join(&current), data_dir.join(&relative)).expect("move the file");
    db.execute(
        "UPDATE outputs SET path = ?2 WHERE job_id = ?1",
        [id, relative.as_str()],
    )
    .expect("point the row at it");
    data_dir.join(relative)
}

#[tokio::test(start_paused = true)]
async fn outputs_in_an_older_stores_folder_per_job_are_deleted_with_that_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SweepClock::starting_at(T0);
    // Files only: these stores kept every output as a file.
    let store = open_with(dir.path(), clock, TierTable::default().retentions(), 0).await;
    let results = Results::new(store.clone());
    succeed(&store, "old", Tier::Pro).await;
    succeed(&store, "shared", Tier::Pro).await;
    let old_file = into_legacy_folder(dir.path(), "old");
    let shared_file = into_legacy_folder(dir.path(), "shared");
    // Something that is not a recorded output sits in the second folder.
    let stray = dir.path().join("outputs/shared/not-an-output.txt");
    std::fs::write(&stray, b"kept").expect("stray file");

    for id in ["old", "shared"] {
        let job = results
            .delete_outputs(id, DeleteReason::User, clock.now_ms())
            .await
            .expect("delete");
        assert!(job.outputs_deleted.is_some(), "{id}: deletion recorded");
    }
    assert!(
        !old_file.exists() && !shared_file.exists(),
        "the files are gone"
    );
    assert!(
        !dir.path().join("outputs/old").exists(),
        "the emptied folder is gone"
    );
    assert!(
        stray.exists(),
        "a folder still holding other files stays, with them"
    );
}
