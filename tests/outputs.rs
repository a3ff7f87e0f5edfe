//! Outputs after the job, with real kilnd processes: retention deletes a tier's outputs once
//! its period has passed (410 `gone` after that, other tiers untouched), and
//! `DELETE /v1/jobs/{id}/outputs` on any node deletes them on the owner and on the replica,
//! whether they are files or (small ones, by default) kept in the job store's database.

use std::time::{Duration, Instant};

use kiln_daemon::queue::output_files_on_disk as files_of;
use kiln_e2e::{Api, Node, NodeSpec, TestCluster, sdxl_workflow, simple_workflow};
use serde_json::Value;

/// GET of output `index`: (status, body bytes).
async fn fetch(api: &Api, id: &str, index: u32) -> (u16, Vec<u8>) {
    api.output(id, index).await.expect("GET output")
}

async fn delete_outputs(api: &Api, id: &str) -> (u16, Value) {
    let response = api
        .http
        .delete(format!("{}/v1/jobs/{id}/outputs", api.url))
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("DELETE outputs");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// What holds a job's outputs in a node's data dir: its files, and `inline:<index>` for each
/// output whose content the job store's database keeps.
fn held(data_dir: &std::path::Path, id: &str) -> Vec<String> {
    let mut held = files_of(data_dir, id);
    let inline = kiln_daemon::queue::inline_outputs_in_db(data_dir, id).expect("inline outputs");
    held.extend(inline.into_iter().map(|index| format!("inline:{index}")));
    held
}

/// Waits until `check` holds, polling every 100 ms for at most `timeout`.
async fn wait_until(timeout: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn retention_deletes_a_tiers_outputs_and_keeps_the_others() {
    let node = Node::start(NodeSpec {
        // Every output a file here; the cluster test below covers inline ones.
        extra_config: "[tiers.free]\nwait_target_s = 300\nretention = \"2s\"\n\n\
                       [storage]\nsweep_interval = \"1s\"\ninline_max_bytes = 0\n"
            .into(),
        ..NodeSpec::default()
    })
    .await
    .expect("node starts");
    let free = Api::new(&node, "fred");
    let pro = Api::new(&node, "alice");
    let (status, body) = free.submit(&simple_workflow("free")).await.expect("submit");
    assert_eq!(status, 202, "{body}");
    let free_id = body["id"].as_str().expect("id").to_string();
    let (status, body) = pro.submit(&simple_workflow("pro")).await.expect("submit");
    assert_eq!(status, 202, "{body}");
    let pro_id = body["id"].as_str().expect("id").to_string();
    for (api, id) in [(&free, &free_id), (&pro, &pro_id)] {
        let job = api
            .wait_final(id, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
        assert_eq!(job["status"], "succeeded", "{job}");
    }

    wait_until(
        Duration::from_secs(30),
        "free outputs deleted",
        async || free.job(&free_id).await.expect("job")["outputs_deleted"].is_object(),
    )
    .await;
    let job = free.job(&free_id).await.expect("job");
    assert_eq!(job["outputs_deleted"]["reason"], "retention", "{job}");
    assert_eq!(job["outputs"].as_array().map(Vec::len), Some(1), "{job}");
    assert!(files_of(&node.data_dir(), &free_id).is_empty());
    let (status, body) = fetch(&free, &free_id, 0).await;
    assert_eq!(status, 410);
    let body: Value = serde_json::from_slice(&body).expect("error json");
    assert_eq!(body["error"]["code"], "gone", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&free_id) && message.contains("output 0") && message.contains("retention"),
        "{message}"
    );

    // The pro job (30 days) keeps its outputs and says until when.
    let job = pro.job(&pro_id).await.expect("job");
    assert!(job.get("outputs_deleted").is_none(), "{job}");
    assert!(job["outputs_expire_at"].is_string(), "{job}");
    assert_eq!(fetch(&pro, &pro_id, 0).await.0, 200);
    assert_eq!(files_of(&node.data_dir(), &pro_id).len(), 1);
}

#[tokio::test]
async fn deleting_outputs_on_any_node_removes_the_owners_and_the_replicas_files() {
    deleting_outputs_on_any_node(false).await;
}

#[tokio::test]
async fn deleting_outputs_on_any_node_removes_inline_outputs_on_both() {
    deleting_outputs_on_any_node(true).await;
}

/// Runs a job on a two-node cluster, deletes its outputs through the node that does not own
/// it, and checks both nodes let go of them; `inline`: the nodes keep small outputs (all of
/// these) in their databases, else every output is a file.
async fn deleting_outputs_on_any_node(inline: bool) {
    let storage = if inline {
        String::new()
    } else {
        "[storage]\ninline_max_bytes = 0\n".to_string()
    };
    let cluster = TestCluster::start(2, |_| NodeSpec {
        jobs: "lease_s = 3".into(),
        extra_config: storage.clone(),
        ..NodeSpec::default()
    })
    .await
    .expect("cluster starts");
    let owner = cluster.owner_of("alice");
    let other = 1 - owner;
    let at_other = cluster.api(other, "alice");
    let at_owner = cluster.api(owner, "alice");
    let (status, body) = at_other
        .submit(&simple_workflow("delete-me"))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["replicas"], 1, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let job = at_other
        .wait_final(&id, Duration::from_secs(60))
        .await
        .expect("final");
    assert_eq!(job["status"], "succeeded", "{job}");
    let (status, original) = fetch(&at_other, &id, 0).await;
    assert_eq!(status, 200);
    let owner_dir = cluster.nodes[owner].data_dir();
    let replica_dir = cluster.nodes[other].data_dir();
    // The replica receives its copy of the outputs after the owner records the success.
    wait_until(
        Duration::from_secs(20),
        "the replica holds the outputs",
        async || !held(&replica_dir, &id).is_empty(),
    )
    .await;
    let expected = if inline {
        vec!["inline:0".to_string()]
    } else {
        files_of(&owner_dir, &id)
    };
    assert_eq!(expected.len(), 1, "{expected:?}");
    assert_eq!(held(&owner_dir, &id), expected);
    if inline {
        assert_eq!(held(&replica_dir, &id), expected);
    }
    // The replica serves the same bytes from its copy.
    let (status, copy) = fetch(&at_other, &id, 0).await;
    assert_eq!((status, &copy), (200, &original));

    // Asked on the node that does not own the job: forwarded to the owner.
    let (status, body) = delete_outputs(&at_other, &id).await;
    assert_eq!(status, 204, "{body}");
    assert!(held(&owner_dir, &id).is_empty(), "owner outputs remain");
    wait_until(
        Duration::from_secs(10),
        "the replica's outputs are removed",
        async || held(&replica_dir, &id).is_empty(),
    )
    .await;
    for api in [&at_owner, &at_other] {
        let job = api.job(&id).await.expect("job");
        assert_eq!(job["outputs_deleted"]["reason"], "user", "{job}");
        let (status, body) = fetch(api, &id, 0).await;
        assert_eq!(status, 410, "{}", String::from_utf8_lossy(&body));
    }
    assert!(!original.is_empty());

    // Idempotent.
    let (status, body) = delete_outputs(&at_owner, &id).await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = delete_outputs(&at_other, &id).await;
    assert_eq!(status, 204, "{body}");

    // Unknown jobs and other accounts' jobs are not found.
    let (status, body) = delete_outputs(&at_other, "no-such-job").await;
    assert_eq!(status, 404, "{body}");
    let bob = cluster.api(other, "bob");
    let (status, body) = delete_outputs(&bob, &id).await;
    assert_eq!(status, 404, "{body}");

    // A job that has not finished: 409 naming its status.
    let (status, body) = at_owner
        .submit(&sdxl_workflow(400, 7))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{body}");
    let slow = body["id"].as_str().expect("id").to_string();
    let (status, body) = delete_outputs(&at_other, &slow).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("queued") || message.contains("running"),
        "{message}"
    );
}

/// A moto S3 server (`pip install 'moto[server]'`) on a free port, stopped on drop.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Moto {
    /// Starts moto with `bucket`, or prints why not and returns `None`.
    async fn start(bucket: &str) -> Option<Moto> {
        let port = kiln_e2e::free_port();
        let child = match std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
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
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.put(format!("{}/{bucket}", moto.endpoint)).send().await
                && response.status().is_success()
            {
                return Some(moto);
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The keys in `bucket` (ListObjectsV2).
    async fn keys(&self, bucket: &str) -> Vec<String> {
        let body = reqwest::get(format!("{}/{bucket}?list-type=2", self.endpoint))
            .await
            .expect("list")
            .text()
            .await
            .expect("list body");
        body.split("<Key>")
            .skip(1)
            .filter_map(|part| part.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn outputs_in_a_bucket_redirect_to_presigned_urls_and_the_replica_shares_the_object() {
    let Some(moto) = Moto::start("kiln-e2e").await else {
        return;
    };
    let secrets = tempfile::tempdir().expect("tempdir");
    let credentials = secrets.path().join("s3.toml");
    std::fs::write(
        &credentials,
        "access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
    )
    .expect("credentials");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let storage = format!(
        "[storage]\nkind = \"s3\"\nbucket = \"kiln-e2e\"\nendpoint = {:?}\nallow_http = true\n\
         prefix = \"e2e\"\ncredentials_file = {:?}\n",
        moto.endpoint,
        credentials.display().to_string()
    );
    let mut cluster = TestCluster::start(2, |_| NodeSpec {
        jobs: "lease_s = 3".into(),
        extra_config: storage.clone(),
        ..NodeSpec::default()
    })
    .await
    .expect("cluster starts");
    let owner = cluster.owner_of("alice");
    let other = 1 - owner;
    let at_other = cluster.api(other, "alice");
    let (status, body) = at_other
        .submit(&simple_workflow("bucket"))
        .await
        .expect("submit");
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let job = at_other
        .wait_final(&id, Duration::from_secs(60))
        .await
        .expect("final");
    assert_eq!(job["status"], "succeeded", "{job}");
    let keys = moto.keys("kiln-e2e").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with(&format!("e2e/{id}/")), "{keys:?}");
    assert!(files_of(&cluster.nodes[owner].data_dir(), &id).is_empty());

    // A plain GET redirects to a presigned URL; ?redirect=false streams the same bytes.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let response = no_redirects
        .get(format!("{}/v1/jobs/{id}/outputs/0", at_other.url))
        .bearer_auth(&at_other.key)
        .send()
        .await
        .expect("GET output");
    assert_eq!(response.status(), 302);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_string();
    assert!(location.starts_with(&moto.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature"), "{location}");
    let presigned = reqwest::get(&location).await.expect("presigned GET");
    assert_eq!(presigned.status(), 200);
    let from_bucket = presigned.bytes().await.expect("body").to_vec();
    let (status, streamed) = fetch_query(&at_other, &id, "?redirect=false").await;
    assert_eq!(status, 200);
    assert_eq!(streamed, from_bucket);
    assert!(!streamed.is_empty());

    // With the owner gone, the replica serves the output from its own record of the same
    // object: nothing was uploaded twice.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[owner].kill9();
    let (status, again) = fetch_query(&at_other, &id, "?redirect=false").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&again));
    assert_eq!(again, from_bucket);
    assert_eq!(moto.keys("kiln-e2e").await.len(), 1);

    // Once the replica has adopted the job, deleting its outputs deletes the object.
    wait_until(Duration::from_secs(45), "DELETE answers 204", async || {
        delete_outputs(&at_other, &id).await.0 == 204
    })
    .await;
    assert!(moto.keys("kiln-e2e").await.is_empty());
    assert_eq!(fetch_query(&at_other, &id, "").await.0, 410);
}

/// GET of output 0 with a query string: (status, body bytes).
async fn fetch_query(api: &Api, id: &str, query: &str) -> (u16, Vec<u8>) {
    let response = api
        .http
        .get(format!("{}/v1/jobs/{id}/outputs/0{query}", api.url))
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("GET output");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("body").to_vec())
}
