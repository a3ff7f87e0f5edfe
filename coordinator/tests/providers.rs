//! The Vast.ai, RunPod and Lambda Cloud clients against fake provider servers on 127.0.0.1
//! (`fake_providers/`): every client operation, the address mapping, and the failures the policy
//! acts on (offer gone, rate limits, resume that does not come back, GraphQL errors inside HTTP
//! 200, no capacity, a rent whose answer was lost, a wrong key).

mod fake_providers;

use std::collections::BTreeMap;
use std::time::Duration;

use fake_providers::KEY;
use fake_providers::lambda::LambdaFake;
use fake_providers::runpod::{NOT_ENOUGH_GPUS, ResumeMode, RunpodFake};
use fake_providers::vast::VastFake;
use kiln_coordinator::provider::{
    Host, HostStatus, LabelLookup, LambdaClient, Mapped, OfferQuery, Pacing, PortSpec, Protocol,
    Provider, ProviderError, RentRequest, RetryPolicy, RunpodClient, VastClient,
};
use serde_json::{Value, json};

const RESUME_DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

/// Quick retries, so that the suite runs in seconds.
fn fast() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        deadline: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
    }
}

fn lookup() -> LabelLookup {
    LabelLookup {
        attempts: 5,
        interval: Duration::from_millis(50),
    }
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        port,
        protocol: Protocol::Tcp,
    }
}

fn udp(port: u16) -> PortSpec {
    PortSpec {
        port,
        protocol: Protocol::Udp,
    }
}

fn rent_request(label: &str, offer: &str, ports: Vec<PortSpec>) -> RentRequest {
    RentRequest {
        label: label.into(),
        offer_id: offer.into(),
        image: Some("ghcr.io/org/worker:1.2".into()),
        template: None,
        onstart: Some("bash /opt/start.sh".into()),
        env: BTreeMap::from([("KILN_NODE".into(), label.into())]),
        ports,
        disk_gb: 50,
        bid_per_hour: None,
    }
}

fn query(gpu: &str, num_gpus: u32, max_price: f64, spot: bool) -> OfferQuery {
    OfferQuery {
        gpu: gpu.into(),
        num_gpus,
        disk_gb: 50,
        min_reliability: 0.98,
        max_price_per_hour: max_price,
        spot,
    }
}

/// Reads host `id` until it is Running (bounded: 200 reads, 10 ms apart).
async fn until_running(provider: &dyn Provider, id: &str) -> Host {
    let mut seen = Vec::new();
    for _ in 0..200 {
        let host = provider.get(id).await.expect("get");
        if host.status == HostStatus::Running {
            return host;
        }
        seen.push(host.provider_status);
        tokio::time::sleep(POLL).await;
    }
    panic!("host {id} never ran; statuses seen: {seen:?}");
}

fn resume_reason(result: Result<Host, ProviderError>) -> String {
    match result {
        Err(ProviderError::ResumeFailed { reason, .. }) => reason,
        other => panic!("expected ResumeFailed, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Vast.ai

fn vast(fake: &VastFake) -> VastClient {
    VastClient::new(fake.url.clone(), KEY.into())
        .expect("construct")
        .with_retry(fast())
        .with_pacing(Pacing::none())
        .with_label_lookup(lookup())
}

#[tokio::test]
async fn vast_offers_are_filtered_and_cheapest_first() {
    let fake = VastFake::start().await;
    let client = vast(&fake);
    let offers = client
        .offers(&query("RTX 4090", 1, 0.6, false))
        .await
        .expect("offers");
    let ids: Vec<&str> = offers.iter().map(|o| o.offer_id.as_str()).collect();
    // 1003 is too unreliable, 1004 too dear.
    assert_eq!(ids, ["1002", "1001"]);
    assert_eq!(offers[0].price_per_hour, 0.38);
    assert_eq!(offers[0].reliability, Some(0.99));
    assert_eq!(offers[0].storage_per_gb_month, Some(0.15));
    assert_eq!(offers[0].location.as_deref(), Some("Norway, NO"));
    assert!(!offers[0].spot);

    let spot = client
        .offers(&query("RTX 4090", 1, 0.6, true))
        .await
        .expect("offers");
    let bids: Vec<(&str, f64)> = spot
        .iter()
        .map(|o| (o.offer_id.as_str(), o.price_per_hour))
        .collect();
    assert_eq!(bids, [("1002", 0.15), ("1001", 0.20), ("1004", 0.40)]);
    assert!(spot.iter().all(|o| o.spot));

    assert!(
        client
            .offers(&query("RTX 4090", 2, 5.0, false))
            .await
            .expect("offers")
            .is_empty()
    );
    let bad = client.offers(&query("RTX 4090", 0, 1.0, false)).await;
    assert!(matches!(bad, Err(ProviderError::Invalid { .. })), "{bad:?}");
}

#[tokio::test]
async fn vast_rent_address_stop_start_destroy() {
    let fake = VastFake::start().await;
    fake.with(|s| s.knobs.reads_per_state = 2);
    let client = vast(&fake);
    let host = client
        .rent(&rent_request("kiln-a", "1002", vec![tcp(8000), udp(7946)]))
        .await
        .expect("rent");
    assert_eq!(host.label.as_deref(), Some("kiln-a"));
    assert_eq!(host.status, HostStatus::Starting);
    let body = fake
        .with(|s| s.last_rent.clone())
        .expect("the fake recorded the request");
    assert_eq!(body["env"]["-p 8000:8000"], "1");
    assert_eq!(body["env"]["-p 7946:7946/udp"], "1");
    assert_eq!(body["env"]["KILN_NODE"], "kiln-a");
    assert_eq!(body["cancel_unavail"], true);
    assert_eq!(body["price"], Value::Null);
    assert_eq!(body["onstart"], "bash /opt/start.sh");
    assert_eq!(body["runtype"], "ssh_direc ssh_proxy");
    assert_eq!(body["disk"], 50);

    let running = until_running(&client, &host.id).await;
    assert_eq!(running.provider_status, "running/running");
    assert_eq!(running.gpus, 1);
    assert_eq!(running.price_per_hour, Some(0.38));
    // The fake sends the IP with a trailing newline and ports as Docker-style strings.
    assert_eq!(running.address.public_ip.as_deref(), Some("65.130.162.74"));
    let mapped = fake.with(|s| s.instances.values().next().expect("present").ports.clone());
    for (spec, key) in [
        (tcp(8000), "8000/tcp"),
        (udp(7946), "7946/udp"),
        (tcp(22), "22/tcp"),
    ] {
        assert_eq!(
            running.address.ports[&spec],
            Mapped {
                host: "65.130.162.74".into(),
                port: mapped[key]
            }
        );
    }

    let listed = client.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, host.id);

    client.stop(&host.id).await.expect("stop");
    let stopped = client.get(&host.id).await.expect("get");
    assert_eq!(stopped.status, HostStatus::Stopped);
    assert!(stopped.address.ports.is_empty());

    let resumed = client
        .resume(&host.id, RESUME_DEADLINE, POLL)
        .await
        .expect("resume");
    assert_eq!(resumed.status, HostStatus::Running);
    assert!(!resumed.address.ports.is_empty());

    client.destroy(&host.id).await.expect("destroy");
    assert!(matches!(
        client.get(&host.id).await,
        Err(ProviderError::NotFound { .. })
    ));
    // Destroying what is gone succeeds; stopping it is NotFound.
    client.destroy(&host.id).await.expect("destroy");
    assert!(matches!(
        client.stop(&host.id).await,
        Err(ProviderError::NotFound { .. })
    ));
    assert!(matches!(
        client.get("not-a-number").await,
        Err(ProviderError::Invalid { .. })
    ));
}

#[tokio::test]
async fn vast_spot_rent_bids_and_list_follows_pages() {
    let fake = VastFake::start().await;
    fake.with(|s| s.knobs.page_size = 2);
    let client = vast(&fake);
    let mut spot = rent_request("kiln-spot", "1001", vec![tcp(8000)]);
    spot.bid_per_hour = Some(0.2);
    let host = client.rent(&spot).await.expect("rent");
    assert!(host.spot);
    assert_eq!(
        fake.with(|s| s.last_rent.clone())
            .expect("the fake recorded the request")["price"],
        json!(0.2)
    );
    for (label, offer) in [("kiln-b", "1002"), ("kiln-c", "1003")] {
        client
            .rent(&rent_request(label, offer, vec![tcp(8000)]))
            .await
            .expect("rent");
    }
    let mut labels: Vec<String> = client
        .list()
        .await
        .expect("list")
        .into_iter()
        .filter_map(|h| h.label)
        .collect();
    labels.sort();
    assert_eq!(labels, ["kiln-b", "kiln-c", "kiln-spot"]);
    let found = client
        .find_by_label("kiln-c")
        .await
        .expect("find by label")
        .expect("present");
    assert_eq!(found.label.as_deref(), Some("kiln-c"));
    assert!(
        client
            .find_by_label("kiln-z")
            .await
            .expect("find by label")
            .is_none()
    );
}

#[tokio::test]
async fn vast_offer_that_vanished_is_offer_gone() {
    let fake = VastFake::start().await;
    let client = vast(&fake);
    let offers = client
        .offers(&query("RTX 4090", 1, 0.6, false))
        .await
        .expect("offers");
    let first = offers[0].offer_id.clone();
    // Someone else rents it between our search and our rent.
    fake.with(|s| {
        s.offers
            .retain(|o| o["id"] != first.parse::<u64>().expect("offer id"))
    });
    let result = client
        .rent(&rent_request("kiln-gone", &first, vec![tcp(8000)]))
        .await;
    match result {
        Err(ProviderError::OfferGone { offer_id, .. }) => assert_eq!(offer_id, first),
        other => panic!("expected OfferGone, got {other:?}"),
    }
    assert_eq!(fake.instance_count(), 0);
    // The same, answered the `cancel_unavail` way (410).
    fake.with(|s| s.knobs.gone_as_410 = true);
    let result = client
        .rent(&rent_request("kiln-gone", &first, vec![tcp(8000)]))
        .await;
    assert!(
        matches!(result, Err(ProviderError::OfferGone { .. })),
        "{result:?}"
    );
    // The next offer still rents.
    client
        .rent(&rent_request(
            "kiln-gone",
            &offers[1].offer_id,
            vec![tcp(8000)],
        ))
        .await
        .expect("rent");
    assert_eq!(fake.instance_count(), 1);
}

#[tokio::test]
async fn vast_429_without_retry_after_is_retried() {
    let fake = VastFake::start().await;
    fake.with(|s| s.knobs.fail_429 = 2);
    let client = vast(&fake);
    let offers = client
        .offers(&query("RTX 4090", 1, 0.6, false))
        .await
        .expect("offers");
    assert_eq!(offers.len(), 2);
    assert_eq!(fake.with(|s| s.rate_limited), 2);

    // A rent is retried after a 429 too: the provider refused it unprocessed.
    fake.with(|s| s.knobs.fail_429_on_rent = 1);
    client
        .rent(&rent_request("kiln-429", "1002", vec![tcp(8000)]))
        .await
        .expect("rent");
    assert_eq!(fake.with(|s| (s.creates, s.rate_limited)), (1, 3));

    // When 429s outlast the attempts, the caller learns it is rate limited.
    fake.with(|s| s.knobs.fail_429 = 100);
    let result = client.list().await;
    assert!(
        matches!(
            result,
            Err(ProviderError::RateLimited {
                retry_after: Some(_),
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn vast_5xx_and_refused_connections() {
    let fake = VastFake::start().await;
    let client = vast(&fake);
    // A read is retried through 502s.
    fake.with(|s| s.knobs.fail_502 = 2);
    assert_eq!(
        client
            .offers(&query("RTX 4090", 1, 0.6, false))
            .await
            .expect("offers")
            .len(),
        2
    );
    // A rent answered 502 is not sent again (it may have been accepted); the label lookup finds
    // nothing, so the caller gets the transient error and may retry the same label later.
    fake.with(|s| s.knobs.fail_502_on_rent = 1);
    let request = rent_request("kiln-502", "1002", vec![tcp(8000)]);
    let result = client.rent(&request).await;
    assert!(
        matches!(result, Err(ProviderError::Transient { .. })),
        "{result:?}"
    );
    assert_eq!(fake.with(|s| (s.rent_requests, s.creates)), (1, 0));
    client.rent(&request).await.expect("rent");
    assert_eq!(fake.with(|s| (s.rent_requests, s.creates)), (2, 1));

    // Nobody listening: retried, then Transient.
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("local address")
    };
    let nowhere = VastClient::new(
        url::Url::parse(&format!("http://{closed}")).expect("parse"),
        KEY.into(),
    )
    .expect("construct")
    .with_retry(fast())
    .with_pacing(Pacing::none());
    let result = nowhere.list().await;
    match result {
        Err(ProviderError::Transient { message, .. }) => {
            assert!(message.contains("cannot connect"), "{message}")
        }
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn vast_resume_stuck_in_scheduling_fails() {
    let fake = VastFake::start().await;
    let client = vast(&fake);
    let host = client
        .rent(&rent_request("kiln-sched", "1002", vec![tcp(8000)]))
        .await
        .expect("rent");
    until_running(&client, &host.id).await;
    client.stop(&host.id).await.expect("stop");
    // Meanwhile the GPU went to someone else.
    fake.with(|s| s.knobs.gpu_taken = true);
    let reason = resume_reason(
        client
            .resume(
                &host.id,
                Duration::from_millis(300),
                Duration::from_millis(20),
            )
            .await,
    );
    assert!(reason.contains("scheduling"), "{reason}");
    assert_eq!(
        client.get(&host.id).await.expect("get").status,
        HostStatus::Scheduling
    );
}

#[tokio::test]
async fn vast_rent_whose_answer_was_lost_rents_one_host() {
    let fake = VastFake::start().await;
    // The fake creates the instance, then answers after the client gave up.
    fake.with(|s| s.knobs.rent_delay = Duration::from_millis(1500));
    let client = vast(&fake).with_retry(RetryPolicy {
        request_timeout: Duration::from_millis(300),
        ..fast()
    });
    let request = rent_request("kiln-lost", "1002", vec![tcp(8000)]);
    let host = client.rent(&request).await.expect("rent");
    assert_eq!(host.label.as_deref(), Some("kiln-lost"));
    assert_eq!(fake.with(|s| s.creates), 1);
    assert_eq!(fake.instance_count(), 1);
    // Repeating the rent finds the same host.
    let again = client.rent(&request).await.expect("rent");
    assert_eq!(again.id, host.id);
    assert_eq!(fake.with(|s| s.creates), 1);
}

#[tokio::test]
async fn vast_wrong_key_is_auth_and_never_printed() {
    let fake = VastFake::start().await;
    let secret = "wrong-key-XYZ";
    let client = VastClient::new(fake.url.clone(), secret.into())
        .expect("construct")
        .with_retry(fast());
    let error = client
        .offers(&query("RTX 4090", 1, 0.6, false))
        .await
        .expect_err("a wrong key must fail");
    assert!(matches!(error, ProviderError::Auth { .. }), "{error:?}");
    assert!(error.to_string().contains("Invalid user key"));
    assert!(!error.to_string().contains(secret));
    assert!(!format!("{client:?}").contains(secret));
    assert!(matches!(
        VastClient::new(fake.url.clone(), " \n".into()),
        Err(ProviderError::Auth { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// RunPod

const RTX_4090: &str = "NVIDIA GeForce RTX 4090";

fn runpod(fake: &RunpodFake) -> RunpodClient {
    RunpodClient::new(fake.rest.clone(), fake.graphql.clone(), KEY.into())
        .expect("construct")
        .with_retry(fast())
        .with_pacing(Pacing::none())
        .with_label_lookup(lookup())
        .with_http_proxy_ports(vec![8188])
}

#[tokio::test]
async fn runpod_offers_come_from_graphql_prices() {
    let fake = RunpodFake::start().await;
    let client = runpod(&fake);
    let offers = client
        .offers(&query(RTX_4090, 1, 1.0, false))
        .await
        .expect("offers");
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].offer_id, RTX_4090);
    assert_eq!(offers[0].gpu_name, "RTX 4090");
    assert_eq!(offers[0].price_per_hour, 0.44);
    assert_eq!(offers[0].storage_per_gb_month, Some(0.20));

    let spot = client
        .offers(&query(RTX_4090, 1, 1.0, true))
        .await
        .expect("offers");
    assert_eq!(spot[0].price_per_hour, 0.25);
    assert!(spot[0].spot);

    let two = client
        .offers(&query(RTX_4090, 2, 1.0, false))
        .await
        .expect("offers");
    assert_eq!(two[0].offer_id, format!("2x {RTX_4090}"));
    assert_eq!(two[0].price_per_hour, 0.88);
    assert!(
        client
            .offers(&query(RTX_4090, 1, 0.3, false))
            .await
            .expect("offers")
            .is_empty()
    );
    // No stock: no offer.
    assert!(
        client
            .offers(&query("NVIDIA A40", 1, 5.0, false))
            .await
            .expect("offers")
            .is_empty()
    );
    assert_eq!(fake.with(|s| s.graphql_ops.clone()), ["gpuTypes"; 5]);
}

#[tokio::test]
async fn runpod_on_demand_lifecycle_over_rest_v2() {
    let fake = RunpodFake::start().await;
    let client = runpod(&fake);
    let host = client
        .rent(&rent_request(
            "kiln-rp",
            RTX_4090,
            vec![tcp(8000), tcp(8188)],
        ))
        .await
        .expect("rent");
    assert_eq!(host.status, HostStatus::Starting);
    assert_eq!(host.label.as_deref(), Some("kiln-rp"));
    let body = fake
        .with(|s| s.last_create.clone())
        .expect("the fake recorded the request");
    assert_eq!(body["gpu"], json!({"id": RTX_4090, "count": 1}));
    assert_eq!(body["ports"], json!(["8000/tcp", "8188/http"]));
    assert_eq!(
        body["mounts"]["persistent"],
        json!({"size": 50, "path": "/workspace"})
    );
    assert_eq!(body["args"], "bash -c 'bash /opt/start.sh'");
    assert_eq!(body["env"]["KILN_NODE"], "kiln-rp");
    assert_eq!(body["cloud"], "SECURE");

    // RUNNING with `runtime: null` is not ready yet.
    let mut saw_not_up = false;
    let mut running = None;
    for _ in 0..50 {
        let h = client.get(&host.id).await.expect("get");
        if h.provider_status == "RUNNING (container not up yet)" {
            assert_eq!(h.status, HostStatus::Starting);
            saw_not_up = true;
        }
        if h.status == HostStatus::Running {
            running = Some(h);
            break;
        }
    }
    assert!(saw_not_up);
    let running = running.expect("the pod never ran");
    assert_eq!(running.gpus, 1);
    assert_eq!(running.price_per_hour, Some(0.44));
    assert_eq!(running.address.public_ip.as_deref(), Some("45.23.12.1"));
    assert_eq!(
        running.address.ports[&tcp(8000)],
        Mapped {
            host: "45.23.12.1".into(),
            port: 43000
        }
    );
    assert_eq!(
        running.address.http_proxy[&8188],
        format!("https://{}-8188.proxy.runpod.net", host.id)
    );

    assert_eq!(client.list().await.expect("list").len(), 1);
    client.stop(&host.id).await.expect("stop");
    assert_eq!(
        client.get(&host.id).await.expect("get").status,
        HostStatus::Stopped
    );
    let resumed = client
        .resume(&host.id, RESUME_DEADLINE, POLL)
        .await
        .expect("resume");
    assert_eq!(resumed.gpus, 1);
    client.destroy(&host.id).await.expect("destroy");
    assert!(matches!(
        client.get(&host.id).await,
        Err(ProviderError::NotFound { .. })
    ));
    client.destroy(&host.id).await.expect("destroy");

    let result = client
        .rent(&rent_request("kiln-udp", RTX_4090, vec![udp(7946)]))
        .await;
    assert!(
        matches!(result, Err(ProviderError::Invalid { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn runpod_spot_rents_and_resumes_over_graphql() {
    let fake = RunpodFake::start().await;
    let client = runpod(&fake);
    let mut request = rent_request("kiln-spot", RTX_4090, vec![tcp(8000)]);
    request.bid_per_hour = Some(0.3);
    let host = client.rent(&request).await.expect("rent");
    assert!(host.spot);
    let input = fake
        .with(|s| s.last_create.clone())
        .expect("the fake recorded the request");
    assert_eq!(input["bidPerGpu"], json!(0.3));
    assert_eq!(input["gpuTypeId"], RTX_4090);
    assert_eq!(input["cloudType"], "SECURE");
    assert_eq!(input["ports"], "8000/tcp");
    assert_eq!(
        input["env"],
        json!([{"key": "KILN_NODE", "value": "kiln-spot"}])
    );
    until_running(&client, &host.id).await;
    client.stop(&host.id).await.expect("stop");
    client
        .resume(&host.id, RESUME_DEADLINE, POLL)
        .await
        .expect("resume");
    let ops = fake.with(|s| s.graphql_ops.clone());
    assert_eq!(ops, ["podRentInterruptable", "podBidResume"]);
}

#[tokio::test]
async fn runpod_graphql_error_inside_http_200() {
    let fake = RunpodFake::start().await;
    let client = runpod(&fake);
    let mut request = rent_request("kiln-spot", RTX_4090, vec![tcp(8000)]);
    request.bid_per_hour = Some(0.3);
    let host = client.rent(&request).await.expect("rent");
    until_running(&client, &host.id).await;
    client.stop(&host.id).await.expect("stop");
    fake.with(|s| s.knobs.resume = ResumeMode::NotEnoughGpus);
    // The refusal comes as HTTP 200 with `errors`: start sees NoCapacity, resume gives up.
    let start = client.start(&host.id).await;
    assert!(
        matches!(start, Err(ProviderError::NoCapacity { .. })),
        "{start:?}"
    );
    let reason = resume_reason(client.resume(&host.id, RESUME_DEADLINE, POLL).await);
    assert!(reason.contains(NOT_ENOUGH_GPUS), "{reason}");

    fake.with(|s| s.knobs.no_capacity = true);
    let result = client
        .rent(&RentRequest {
            label: "kiln-spot-2".into(),
            ..request
        })
        .await;
    assert!(
        matches!(result, Err(ProviderError::NoCapacity { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn runpod_resume_refused_or_without_gpus_fails() {
    let fake = RunpodFake::start().await;
    let client = runpod(&fake);
    let host = client
        .rent(&rent_request("kiln-r", RTX_4090, vec![tcp(8000)]))
        .await
        .expect("rent");
    until_running(&client, &host.id).await;
    client.stop(&host.id).await.expect("stop");

    fake.with(|s| s.knobs.resume = ResumeMode::NotEnoughGpus);
    let reason = resume_reason(client.resume(&host.id, RESUME_DEADLINE, POLL).await);
    assert!(reason.contains("not enough free GPUs"), "{reason}");

    fake.with(|s| s.knobs.resume = ResumeMode::ZeroGpus);
    let reason = resume_reason(client.resume(&host.id, RESUME_DEADLINE, POLL).await);
    assert!(reason.contains("0 GPUs"), "{reason}");
    assert_eq!(client.get(&host.id).await.expect("get").gpus, 0);
}

#[tokio::test]
async fn runpod_capacity_rate_limits_lost_answers_and_keys() {
    let fake = RunpodFake::start().await;
    let client = runpod(&fake);

    fake.with(|s| s.knobs.no_capacity = true);
    let result = client
        .rent(&rent_request("kiln-cap", RTX_4090, vec![tcp(8000)]))
        .await;
    assert!(
        matches!(result, Err(ProviderError::NoCapacity { .. })),
        "{result:?}"
    );
    fake.with(|s| s.knobs.no_capacity = false);

    // 429 with Retry-After: waited for, then the call succeeds.
    fake.with(|s| s.knobs.fail_429 = 1);
    assert!(client.list().await.expect("list").is_empty());
    assert_eq!(fake.with(|s| s.rate_limited), 1);

    // A create whose answer is lost: exactly one pod.
    fake.with(|s| s.knobs.create_delay = Duration::from_millis(1500));
    let impatient = runpod(&fake).with_retry(RetryPolicy {
        request_timeout: Duration::from_millis(300),
        ..fast()
    });
    let host = impatient
        .rent(&rent_request("kiln-lost", RTX_4090, vec![tcp(8000)]))
        .await
        .expect("rent");
    assert_eq!(host.label.as_deref(), Some("kiln-lost"));
    assert_eq!(fake.with(|s| (s.creates, s.pods.len())), (1, 1));

    let wrong = RunpodClient::new(fake.rest.clone(), fake.graphql.clone(), "nope".into())
        .expect("construct")
        .with_retry(fast());
    assert!(matches!(
        wrong.list().await,
        Err(ProviderError::Auth { .. })
    ));
    assert!(matches!(
        wrong.offers(&query(RTX_4090, 1, 1.0, false)).await,
        Err(ProviderError::Auth { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Lambda Cloud

fn lambda(fake: &LambdaFake) -> LambdaClient {
    LambdaClient::new(fake.url.clone(), KEY.into())
        .expect("construct")
        .with_retry(fast())
        .with_pacing(Pacing::none())
        .with_label_lookup(lookup())
        .with_ssh_key_name("kiln")
}

#[tokio::test]
async fn lambda_offers_per_region_with_capacity() {
    let fake = LambdaFake::start().await;
    let client = lambda(&fake);
    let offers = client
        .offers(&query("gpu_1x_a10", 1, 1.0, false))
        .await
        .expect("offers");
    let regions: Vec<Option<&str>> = offers.iter().map(|o| o.location.as_deref()).collect();
    assert_eq!(regions, [Some("us-east-1"), Some("us-west-1")]);
    assert!(
        offers
            .iter()
            .all(|o| o.price_per_hour == 0.75 && o.offer_id == "gpu_1x_a10")
    );
    assert_eq!(offers[0].gpu_name, "A10 (24 GB PCIe)");

    let west = lambda(&fake).with_regions(vec!["us-west-1".into(), "us-south-1".into()]);
    let offers = west
        .offers(&query("gpu_1x_a10", 1, 1.0, false))
        .await
        .expect("offers");
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].location.as_deref(), Some("us-west-1"));

    // The price string of the H100 type parses; spot and unknown types have no offers.
    let h100 = client
        .offers(&query("gpu_8x_h100_sxm5", 8, 30.0, false))
        .await
        .expect("offers");
    assert!((h100[0].price_per_hour - 23.92).abs() < 1e-9);
    assert!(
        client
            .offers(&query("gpu_1x_a10", 1, 1.0, true))
            .await
            .expect("offers")
            .is_empty()
    );
    assert!(
        client
            .offers(&query("RTX 4090", 1, 1.0, false))
            .await
            .expect("offers")
            .is_empty()
    );
}

#[tokio::test]
async fn lambda_launch_get_list_terminate() {
    let fake = LambdaFake::start().await;
    fake.with(|s| s.knobs.reads_per_state = 2);
    let client = lambda(&fake);
    let host = client
        .rent(&rent_request(
            "kiln-l",
            "gpu_1x_a10",
            vec![tcp(8000), udp(7946)],
        ))
        .await
        .expect("rent");
    assert_eq!(host.status, HostStatus::Starting);
    let body = fake
        .with(|s| s.last_launch_body.clone())
        .expect("the fake recorded the request");
    assert_eq!(body["name"], "kiln-l");
    assert_eq!(body["region_name"], "us-east-1");
    assert_eq!(body["instance_type_name"], "gpu_1x_a10");
    assert_eq!(body["ssh_key_names"], json!(["kiln"]));
    assert_eq!(body["quantity"], 1);
    assert_eq!(body["image"], json!({"family": "ghcr.io/org/worker:1.2"}));
    assert_eq!(
        body["user_data"],
        "#!/bin/bash\nexport KILN_NODE='kiln-l'\nbash /opt/start.sh"
    );

    let running = until_running(&client, &host.id).await;
    assert_eq!(running.gpus, 1);
    assert_eq!(running.price_per_hour, Some(0.75));
    assert_eq!(running.address.public_ip.as_deref(), Some("129.146.10.20"));
    for spec in [tcp(8000), udp(7946)] {
        assert_eq!(
            running.address.ports[&spec],
            Mapped {
                host: "129.146.10.20".into(),
                port: spec.port
            }
        );
    }
    assert_eq!(client.list().await.expect("list").len(), 1);

    for result in [client.stop(&host.id).await, client.start(&host.id).await] {
        assert!(
            matches!(result, Err(ProviderError::Unsupported { .. })),
            "{result:?}"
        );
    }
    let reason = client.resume(&host.id, RESUME_DEADLINE, POLL).await;
    assert!(matches!(reason, Err(ProviderError::Unsupported { .. })));

    client.destroy(&host.id).await.expect("destroy");
    let mut terminated = false;
    for _ in 0..10 {
        if client.get(&host.id).await.expect("get").status == HostStatus::Terminated {
            terminated = true;
            break;
        }
    }
    assert!(terminated);
    assert_eq!(fake.live(), 0);
    // A terminated host under the label does not count: a new rent launches again.
    assert!(
        client
            .find_by_label("kiln-l")
            .await
            .expect("find by label")
            .is_none()
    );
    client
        .destroy("00000000000000000000000000000000")
        .await
        .expect("destroy");
    assert!(matches!(
        client.get("00000000000000000000000000000000").await,
        Err(ProviderError::NotFound { .. })
    ));
}

#[tokio::test]
async fn lambda_insufficient_capacity_is_no_capacity() {
    let fake = LambdaFake::start().await;
    let client = lambda(&fake);
    // Listed with capacity, gone by the time the launch arrives: a 400 from the launch.
    fake.with(|s| s.knobs.launch_capacity = Some(Vec::new()));
    let result = client
        .rent(&rent_request("kiln-cap", "gpu_1x_a10", vec![tcp(8000)]))
        .await;
    match result {
        Err(ProviderError::NoCapacity { message, .. }) => {
            assert!(message.contains("Not enough capacity"), "{message}")
        }
        other => panic!("expected NoCapacity, got {other:?}"),
    }
    // Nothing listed: refused before spending a launch.
    fake.with(|s| {
        s.knobs.capacity.clear();
        s.knobs.launch_capacity = None;
    });
    let result = client
        .rent(&rent_request("kiln-cap", "gpu_1x_a10", vec![tcp(8000)]))
        .await;
    assert!(
        matches!(result, Err(ProviderError::NoCapacity { .. })),
        "{result:?}"
    );
    assert_eq!(fake.with(|s| s.launches), 0);
}

#[tokio::test]
async fn lambda_launches_are_paced_or_retried_after_429() {
    let fake = LambdaFake::start().await;
    fake.with(|s| s.knobs.launch_interval = Duration::from_millis(300));
    // Paced at the fake's limit plus a margin for the requests' own latency: no 429 at all.
    let paced = lambda(&fake).with_pacing(Pacing {
        global: None,
        endpoints: vec![("launch", Duration::from_millis(400))],
    });
    for label in ["kiln-p1", "kiln-p2"] {
        paced
            .rent(&rent_request(label, "gpu_1x_a10", vec![tcp(8000)]))
            .await
            .expect("rent");
    }
    assert_eq!(fake.with(|s| (s.launches, s.rate_limited)), (2, 0));

    // Unpaced: the 429 is retried with backoff until the launch goes through.
    let unpaced = lambda(&fake).with_retry(RetryPolicy {
        max_attempts: 10,
        base_backoff: Duration::from_millis(100),
        ..fast()
    });
    unpaced
        .rent(&rent_request("kiln-p3", "gpu_1x_a10", vec![tcp(8000)]))
        .await
        .expect("rent");
    let (launches, limited) = fake.with(|s| (s.launches, s.rate_limited));
    assert_eq!(launches, 3);
    assert!(limited >= 1);
}

#[tokio::test]
async fn lambda_lost_launch_answer_and_wrong_key() {
    let fake = LambdaFake::start().await;
    fake.with(|s| s.knobs.launch_delay = Duration::from_millis(1500));
    let client = lambda(&fake).with_retry(RetryPolicy {
        request_timeout: Duration::from_millis(300),
        ..fast()
    });
    let host = client
        .rent(&rent_request("kiln-lost", "gpu_1x_a10", vec![tcp(8000)]))
        .await
        .expect("rent");
    assert_eq!(host.label.as_deref(), Some("kiln-lost"));
    assert_eq!(fake.with(|s| (s.launches, s.instances.len())), (1, 1));

    let wrong = LambdaClient::new(fake.url.clone(), "nope".into())
        .expect("construct")
        .with_retry(fast());
    let error = wrong.list().await.expect_err("a wrong key must fail");
    assert!(matches!(error, ProviderError::Auth { .. }), "{error:?}");

    // Lambda names are at most 64 characters.
    let long = rent_request(&"x".repeat(65), "gpu_1x_a10", vec![]);
    assert!(matches!(
        client.rent(&long).await,
        Err(ProviderError::Invalid { .. })
    ));
}
