//! Outputs kept in an S3-compatible bucket, against a real S3 server: moto (`moto_server`,
//! `pip install 'moto[server]'`) on 127.0.0.1. A finish puts the objects before it records
//! them (and a failed put records nothing), the presigned URL serves the same bytes, and user
//! deletion and retention delete the objects. Without moto the tests print a loud skip line.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use kiln_daemon::protocol::{DeleteReason, JobStatus, Tier};
use kiln_daemon::queue::{JobStore, NewJob, NewOutput, Outcome, StoreError, StoreOptions};
use kiln_daemon::results::{
    Credentials, ObjectStorage, Results, StorageConfig, StorageKind, SweepClock,
};
use kiln_daemon::tiers::TierTable;
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use serde_json::json;

/// A moto S3 server on a free port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    /// Starts moto, or prints why not and returns `None`.
    fn start() -> Option<Moto> {
        let port = {
            let socket = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
            socket.local_addr().expect("addr").port()
        };
        let child = match Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(error) => {
                eprintln!(
                    "\n*** SKIPPED: moto_server cannot run ({error}); install it with \
                     `python3 -m pip install --user 'moto[server]'` to test S3 storage ***\n"
                );
                return None;
            }
        };
        let mut moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || matches!(moto.child.try_wait(), Ok(Some(_))) {
                panic!("moto_server did not start on port {port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.endpoint = format!("http://127.0.0.1:{port}");
        Some(moto)
    }

    async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .expect("create bucket");
        assert!(
            response.status().is_success(),
            "create bucket: {}",
            response.status()
        );
    }

    fn config(&self, bucket: &str) -> StorageConfig {
        StorageConfig {
            kind: StorageKind::S3,
            bucket: Some(bucket.to_string()),
            endpoint: Some(self.endpoint.clone()),
            prefix: "kiln/outputs".to_string(),
            allow_http: true,
            ..StorageConfig::default()
        }
    }

    fn storage(&self, bucket: &str) -> ObjectStorage {
        ObjectStorage::from_config(&self.config(bucket), credentials())
            .expect("bucket config")
            .expect("kind s3")
    }

    /// The keys in `bucket`, listed with object_store.
    async fn keys(&self, bucket: &str) -> Vec<String> {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .expect("s3 client");
        let mut keys: Vec<String> = s3
            .list(None)
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .expect("list");
        keys.sort();
        keys
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn credentials() -> Credentials {
    Credentials {
        access_key_id: "test".to_string(),
        secret_access_key: "test".to_string(),
    }
}

fn new_job(id: &str, tier: Tier) -> NewJob {
    NewJob {
        id: id.to_string(),
        account: format!("acct-{id}"),
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

async fn open(dir: &std::path::Path, objects: ObjectStorage, clock: SweepClock) -> JobStore {
    JobStore::open(
        dir,
        StoreOptions {
            clock: Arc::new(move || clock.now_ms()),
            retention: TierTable::default().retentions(),
            objects: Some(objects),
            ..StoreOptions::default()
        },
    )
    .await
    .expect("open store")
}

async fn run(
    store: &JobStore,
    id: &str,
    tier: Tier,
) -> Result<kiln_daemon::queue::Job, StoreError> {
    store.submit(new_job(id, tier), None).await.expect("submit");
    let next = store.next_job().await.expect("next").expect("a job");
    assert_eq!(next.id, id);
    store
        .finish(id, Outcome::Succeeded { outputs: png(id) })
        .await
}

#[tokio::test]
async fn outputs_go_to_the_bucket_and_leave_it_on_deletion_and_retention() {
    let Some(moto) = Moto::start() else { return };
    moto.create_bucket("kiln-results").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = SweepClock::system();
    let store = open(dir.path(), moto.storage("kiln-results"), clock).await;

    let job = run(&store, "job-a", Tier::Pro).await.expect("finish");
    assert_eq!(job.status, JobStatus::Succeeded);
    let outputs = store.outputs("job-a").await.expect("outputs");
    assert_eq!(outputs.len(), 1);
    let key = outputs[0].key.clone().expect("an object key");
    assert_eq!(key, "kiln/outputs/job-a/0-ComfyUI_00001_.png");
    assert_eq!(moto.keys("kiln-results").await, vec![key.clone()]);
    // Nothing in the data dir.
    assert!(kiln_daemon::queue::output_files_on_disk(dir.path(), "job-a").is_empty());

    // The presigned URL serves the same bytes, without credentials.
    let objects = store.objects().expect("objects");
    let url = objects.presigned_get(&key).await.expect("presign");
    assert!(url.contains("X-Amz-Signature"), "{url}");
    let fetched = reqwest::get(&url).await.expect("GET presigned");
    assert_eq!(fetched.status(), 200);
    assert_eq!(
        fetched.bytes().await.expect("body").as_ref(),
        b"png bytes of job-a"
    );
    assert_eq!(
        objects.get(&key).await.expect("get"),
        b"png bytes of job-a".to_vec()
    );

    // User deletion removes the object.
    let results = Results::new(store.clone());
    let deleted = results
        .delete_outputs("job-a", DeleteReason::User, clock.now_ms())
        .await
        .expect("delete");
    assert_eq!(
        deleted.outputs_deleted.map(|d| d.1),
        Some(DeleteReason::User)
    );
    assert!(moto.keys("kiln-results").await.is_empty());

    // Retention removes a free job's object a day later (the sweep's "now" moved on).
    run(&store, "job-free", Tier::Free).await.expect("finish");
    assert_eq!(moto.keys("kiln-results").await.len(), 1);
    let later = clock.now_ms() + 25 * 3_600_000;
    let report = results.sweep_once(later, 10).await.expect("sweep");
    assert_eq!((report.found, report.deleted), (1, 1));
    assert!(moto.keys("kiln-results").await.is_empty());
    let job = store.get("job-free").await.expect("get").expect("job");
    assert_eq!(
        job.outputs_deleted.map(|d| d.1),
        Some(DeleteReason::Retention)
    );
}

#[tokio::test]
async fn a_failed_upload_fails_the_finish_and_records_nothing() {
    let Some(moto) = Moto::start() else { return };
    // No such bucket: every put fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(
        dir.path(),
        moto.storage("no-such-bucket"),
        SweepClock::system(),
    )
    .await;
    match run(&store, "job-b", Tier::Pro).await {
        Err(StoreError::Objects(message)) => {
            assert!(message.contains("no-such-bucket"), "{message}")
        }
        other => panic!("expected an output storage error, got {other:?}"),
    }
    let job = store.get("job-b").await.expect("get").expect("job");
    assert_eq!(job.status, JobStatus::Running, "the attempt can be retried");
    assert!(store.outputs("job-b").await.expect("outputs").is_empty());
}
