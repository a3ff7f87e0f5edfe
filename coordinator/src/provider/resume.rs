//! Resuming a stopped (WARM) host and checking that it really came back. Neither Vast nor
//! RunPod guarantees a resume: both pin a stopped host to its machine, and when the GPU was
//! rented to someone else meanwhile, Vast sits in "scheduling" indefinitely and RunPod refuses
//! ("not enough free GPUs") or starts the pod with zero GPUs. A resume therefore only counts once
//! the host runs with its GPUs and an address; anything else is [`ProviderError::ResumeFailed`]
//! with the reason, and the policy decides what to do with the host (usually release it and rent
//! another).

use std::time::Duration;

use tokio::time::Instant;

use super::{Host, HostStatus, Provider, ProviderError, ProviderResult};

/// Starts host `id` and polls it every `poll` until it runs with at least one GPU and an
/// address, for at most `deadline` (the start call included).
pub async fn resume<P: Provider + ?Sized>(
    provider: &P,
    id: &str,
    deadline: Duration,
    poll: Duration,
) -> ProviderResult<Host> {
    let kind = provider.kind();
    let failed = |reason: String| ProviderError::ResumeFailed {
        provider: kind,
        id: id.to_owned(),
        reason,
    };
    // A day is more than any resume takes; the cap keeps `Instant` arithmetic from overflowing.
    let deadline = deadline.min(Duration::from_secs(24 * 3600));
    let until = Instant::now() + deadline;
    // A poll interval of zero would spin; a millisecond keeps the loop bounded in count too.
    let poll = poll.max(Duration::from_millis(1));

    match tokio::time::timeout_at(until, provider.start(id)).await {
        Err(_) => return Err(failed(format!("start did not answer within {deadline:?}"))),
        Ok(Err(ProviderError::NoCapacity { message, .. })) => {
            return Err(failed(format!(
                "the provider refused to start it: {message}"
            )));
        }
        Ok(Err(ProviderError::NotFound { .. })) => {
            return Err(failed("the provider no longer knows it".into()));
        }
        Ok(Err(other)) => return Err(other),
        Ok(Ok(())) => {}
    }

    let mut last = String::from("no status read yet");
    loop {
        let now = Instant::now();
        if now >= until {
            return Err(failed(format!(
                "not running with its GPUs after {deadline:?} (last: {last})"
            )));
        }
        tokio::time::sleep(poll.min(until - now)).await;
        let host = match tokio::time::timeout_at(until, provider.get(id)).await {
            Err(_) => continue,
            Ok(Ok(host)) => host,
            Ok(Err(ProviderError::NotFound { .. })) => {
                return Err(failed("the provider no longer knows it".into()));
            }
            // A failed read says nothing about the host; keep polling until the deadline.
            Ok(Err(error)) if error.is_retryable() => {
                last = error.to_string();
                continue;
            }
            Ok(Err(error)) => return Err(error),
        };
        last = host.provider_status.clone();
        match &host.status {
            HostStatus::Running if host.gpus == 0 => {
                return Err(failed(format!(
                    "it runs with 0 GPUs (provider status {})",
                    host.provider_status
                )));
            }
            HostStatus::Running if has_address(&host) => return Ok(host),
            HostStatus::Failed(detail) => {
                return Err(failed(format!("it failed ({detail})")));
            }
            HostStatus::Terminated => {
                return Err(failed(format!(
                    "it was terminated ({})",
                    host.provider_status
                )));
            }
            HostStatus::Scheduling => last = format!("scheduling ({})", host.provider_status),
            // Running without an address yet, starting, or still stopped right after the start
            // call: wait.
            HostStatus::Running | HostStatus::Starting | HostStatus::Stopped => {}
        }
    }
}

fn has_address(host: &Host) -> bool {
    host.address.public_ip.is_some()
        || !host.address.ports.is_empty()
        || !host.address.http_proxy.is_empty()
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::provider::{Address, Offer, OfferQuery, ProviderKind, RentRequest};

    /// A provider whose `start` answer and sequence of `get` answers are scripted; the last `get`
    /// answer repeats. It stands in for a provider's state machine so that `resume`'s decisions
    /// can be driven under paused time; the real clients are tested against fake servers in
    /// `tests/providers.rs`.
    struct Scripted {
        start: ProviderResult<()>,
        gets: Mutex<VecDeque<ProviderResult<Host>>>,
        reads: Mutex<u32>,
    }

    impl Scripted {
        fn new(start: ProviderResult<()>, gets: Vec<ProviderResult<Host>>) -> Scripted {
            Scripted {
                start,
                gets: Mutex::new(gets.into()),
                reads: Mutex::new(0),
            }
        }
    }

    #[async_trait]
    impl Provider for Scripted {
        fn kind(&self) -> ProviderKind {
            ProviderKind::Vast
        }
        async fn offers(&self, _: &OfferQuery) -> ProviderResult<Vec<Offer>> {
            Ok(Vec::new())
        }
        async fn rent(&self, _: &RentRequest) -> ProviderResult<Host> {
            Err(ProviderError::Unsupported {
                provider: ProviderKind::Vast,
                operation: "rent",
            })
        }
        async fn list(&self) -> ProviderResult<Vec<Host>> {
            Ok(Vec::new())
        }
        async fn get(&self, _: &str) -> ProviderResult<Host> {
            *self.reads.lock().expect("state lock") += 1;
            let mut gets = self.gets.lock().expect("state lock");
            if gets.len() > 1 {
                gets.pop_front().expect("scripted answer")
            } else {
                gets.front().cloned().expect("present")
            }
        }
        async fn stop(&self, _: &str) -> ProviderResult<()> {
            Ok(())
        }
        async fn start(&self, _: &str) -> ProviderResult<()> {
            self.start.clone()
        }
        async fn destroy(&self, _: &str) -> ProviderResult<()> {
            Ok(())
        }
    }

    fn host(status: HostStatus, gpus: u32, ip: Option<&str>) -> ProviderResult<Host> {
        Ok(Host {
            provider: ProviderKind::Vast,
            id: "7".into(),
            label: None,
            status,
            provider_status: "test".into(),
            gpus,
            price_per_hour: None,
            spot: false,
            address: Address {
                public_ip: ip.map(str::to_owned),
                ..Address::default()
            },
        })
    }

    const DEADLINE: Duration = Duration::from_secs(600);
    const POLL: Duration = Duration::from_secs(5);

    fn reason(result: ProviderResult<Host>) -> String {
        match result {
            Err(ProviderError::ResumeFailed { reason, .. }) => reason,
            other => panic!("expected ResumeFailed, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resumes_once_running_with_gpus_and_an_address() {
        let provider = Scripted::new(
            Ok(()),
            vec![
                host(HostStatus::Stopped, 1, None),
                host(HostStatus::Starting, 1, None),
                host(HostStatus::Running, 1, None),
                host(HostStatus::Running, 1, Some("1.2.3.4")),
            ],
        );
        let t0 = Instant::now();
        let host = resume(&provider, "7", DEADLINE, POLL)
            .await
            .expect("resume");
        assert_eq!(host.address.public_ip.as_deref(), Some("1.2.3.4"));
        assert_eq!(*provider.reads.lock().expect("state lock"), 4);
        assert_eq!(Instant::now() - t0, POLL * 4);
    }

    #[tokio::test(start_paused = true)]
    async fn scheduling_past_the_deadline_fails() {
        let provider = Scripted::new(Ok(()), vec![host(HostStatus::Scheduling, 1, None)]);
        let t0 = Instant::now();
        let why = reason(resume(&provider, "7", DEADLINE, POLL).await);
        assert!(why.contains("scheduling"), "{why}");
        assert_eq!(Instant::now() - t0, DEADLINE);
        assert_eq!(*provider.reads.lock().expect("state lock"), 120);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_gpus_fails_at_once() {
        let provider = Scripted::new(Ok(()), vec![host(HostStatus::Running, 0, Some("1.2.3.4"))]);
        let why = reason(resume(&provider, "7", DEADLINE, POLL).await);
        assert!(why.contains("0 GPUs"), "{why}");
        assert_eq!(*provider.reads.lock().expect("state lock"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_start_fails_without_polling() {
        let provider = Scripted::new(
            Err(ProviderError::NoCapacity {
                provider: ProviderKind::Runpod,
                message: "There are not enough free GPUs on the host machine".into(),
            }),
            vec![host(HostStatus::Running, 1, Some("1.2.3.4"))],
        );
        let why = reason(resume(&provider, "7", DEADLINE, POLL).await);
        assert!(why.contains("not enough free GPUs"), "{why}");
        assert_eq!(*provider.reads.lock().expect("state lock"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_terminated_and_vanished_hosts_fail() {
        for (answer, expected) in [
            (
                host(HostStatus::Failed("offline".into()), 1, None),
                "offline",
            ),
            (host(HostStatus::Terminated, 1, None), "terminated"),
            (
                Err(ProviderError::NotFound {
                    provider: ProviderKind::Vast,
                    what: "instance 7".into(),
                }),
                "no longer knows",
            ),
        ] {
            let provider = Scripted::new(Ok(()), vec![answer]);
            let why = reason(resume(&provider, "7", DEADLINE, POLL).await);
            assert!(why.contains(expected), "{why}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_read_errors_are_polled_through() {
        let provider = Scripted::new(
            Ok(()),
            vec![
                Err(ProviderError::Transient {
                    provider: ProviderKind::Vast,
                    message: "HTTP 502".into(),
                }),
                host(HostStatus::Running, 2, Some("1.2.3.4")),
            ],
        );
        let host = resume(&provider, "7", DEADLINE, POLL)
            .await
            .expect("resume");
        assert_eq!(host.gpus, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn other_start_errors_pass_through() {
        let provider = Scripted::new(
            Err(ProviderError::Unsupported {
                provider: ProviderKind::Lambda,
                operation: "start",
            }),
            vec![host(HostStatus::Running, 1, Some("1.2.3.4"))],
        );
        assert!(matches!(
            resume(&provider, "7", DEADLINE, POLL).await,
            Err(ProviderError::Unsupported { .. })
        ));
    }
}
