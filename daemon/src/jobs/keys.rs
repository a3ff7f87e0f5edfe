//! Idempotency-key questions to other members, gathered per member.
//!
//! Before it stores a keyed submission, an owner asks the members that may have recorded the
//! key ([`crate::peer::placement::key_holders`]). Under load many submissions ask the same
//! member at once (in a steady cluster, the account's replica). One `FindKeys` message carries
//! every question that came up while the previous message to that member was out (up to
//! [`STALLED_AFTER`]), much as the store's writer commits whatever waits in one transaction: a
//! lone question goes at once and waits on no timer, and a burst costs the member one message
//! and one store read instead of one of each per submission.
//!
//! A member answering "unknown" remembers who asked ([`KeyAskers`]): that member is about to
//! store the key as the account's owner. Should this member then be handed a submission with
//! the same key while its own view of the cluster still lags (it has not yet seen the new
//! owner, and stores the account's jobs itself), it asks the one who asked, so the key still
//! names one job.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::oneshot;

use crate::peer::PeerRpc;
use crate::peer::messages::{JobRequest, JobResponse, KeyAnswer, KeyLookup, MAX_KEY_LOOKUPS};

type Reply = oneshot::Sender<Result<KeyAnswer, String>>;

/// Questions waiting per member. A member has an entry exactly while a task sends its
/// questions.
pub(super) struct KeyQuestions {
    waiting: Mutex<HashMap<SocketAddr, Vec<(KeyLookup, Reply)>>>,
    /// How long one message may take to be answered.
    message_deadline: Duration,
    /// Lookups sent, and the messages that carried them.
    lookups: Counter,
    messages: Counter,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a member that asked about a key and heard "unknown" is remembered: longer than
/// gossip takes to show every member a new one (a few rounds), so a member whose view lags
/// asks it until it sees the new owner itself.
pub(super) const ASKER_REMEMBERED_FOR: Duration = Duration::from_secs(30);

/// The most askers remembered; beyond it the oldest go first (a burst of keyed submissions
/// then shortens the time each is remembered, never the memory bound).
pub(super) const MAX_ASKERS: usize = 16_384;

/// A member that asked about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Asker {
    pub name: Arc<str>,
    /// Its advertised address, for when this member's view does not show it yet.
    pub addr: SocketAddr,
}

/// The last member told "unknown" about each account's key, for [`ASKER_REMEMBERED_FOR`], at
/// most [`MAX_ASKERS`]. Keys are kept as hashes (a collision only makes a member ask one more
/// member, which answers for itself).
pub(super) struct KeyAskers {
    state: Mutex<AskersState>,
    hasher: RandomState,
    remembered_for: Duration,
    max: usize,
}

#[derive(Default)]
struct AskersState {
    by_key: HashMap<u64, (Asker, tokio::time::Instant)>,
    /// When each entry was made, oldest first; an entry replaced since is skipped.
    order: VecDeque<(tokio::time::Instant, u64)>,
}

impl AskersState {
    /// Forgets entries older than `remembered_for`, and the oldest beyond `max`.
    fn prune(&mut self, now: tokio::time::Instant, remembered_for: Duration, max: usize) {
        while let Some(&(at, hash)) = self.order.front() {
            let expired = now.saturating_duration_since(at) >= remembered_for;
            if !expired && self.order.len() <= max {
                break;
            }
            self.order.pop_front();
            if self.by_key.get(&hash).is_some_and(|(_, made)| *made == at) {
                self.by_key.remove(&hash);
            }
        }
    }
}

impl KeyAskers {
    pub(super) fn new(remembered_for: Duration, max: usize) -> KeyAskers {
        KeyAskers {
            state: Mutex::new(AskersState::default()),
            hasher: RandomState::new(),
            remembered_for,
            max: max.max(1),
        }
    }

    fn hash(&self, account: &str, key: &str) -> u64 {
        self.hasher.hash_one((account, key))
    }

    /// Remembers that `asker` was told this node does not know `account`'s `key`.
    pub(super) fn remember(&self, account: &str, key: &str, asker: Asker) {
        let hash = self.hash(account, key);
        let now = tokio::time::Instant::now();
        let mut state = lock(&self.state);
        state.by_key.insert(hash, (asker, now));
        state.order.push_back((now, hash));
        state.prune(now, self.remembered_for, self.max);
    }

    /// The member told "unknown" about `account`'s `key` within the time askers are
    /// remembered, if any.
    pub(super) fn recent(&self, account: &str, key: &str) -> Option<Asker> {
        let hash = self.hash(account, key);
        let now = tokio::time::Instant::now();
        let mut state = lock(&self.state);
        state.prune(now, self.remembered_for, self.max);
        state.by_key.get(&hash).map(|(asker, _)| asker.clone())
    }

    /// How many askers are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.state).by_key.len()
    }
}

impl KeyQuestions {
    /// Sends messages that may take `message_deadline` each; counts lookups sent in
    /// `lookups` and their messages in `messages`.
    pub(super) fn new(
        message_deadline: Duration,
        lookups: Counter,
        messages: Counter,
    ) -> KeyQuestions {
        KeyQuestions {
            waiting: Mutex::new(HashMap::new()),
            message_deadline,
            lookups,
            messages,
        }
    }

    /// What the member at `to` knows of `lookup`'s key, asked in a `FindKeys` (the member must
    /// speak protocol 1.3). An error when it does not answer within `wait` of this call.
    pub(super) async fn ask(
        self: &Arc<Self>,
        rpc: &PeerRpc<JobRequest, JobResponse>,
        to: SocketAddr,
        lookup: KeyLookup,
        wait: Duration,
    ) -> Result<KeyAnswer, String> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut waiting = lock(&self.waiting);
            let start = !waiting.contains_key(&to);
            waiting.entry(to).or_default().push((lookup, reply));
            start
        };
        if start {
            tokio::spawn(Arc::clone(self).send(rpc.clone(), to));
        }
        match tokio::time::timeout(wait, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the question was dropped unanswered".to_string()),
            Err(_) => Err(format!("no answer within {wait:?}")),
        }
    }

    /// Sends `to`'s waiting questions until none wait: the next message goes when the
    /// previous one is answered, or once it has been out for [`STALLED_AFTER`] (a lost frame
    /// then holds the questions behind it back only that long, not for a whole deadline).
    async fn send(self: Arc<Self>, rpc: PeerRpc<JobRequest, JobResponse>, to: SocketAddr) {
        loop {
            let batch: Vec<(KeyLookup, Reply)> = {
                let mut waiting = lock(&self.waiting);
                let Some(queue) = waiting.get_mut(&to) else {
                    return;
                };
                // Askers that gave up are not asked about.
                queue.retain(|(_, reply)| !reply.is_closed());
                if queue.is_empty() {
                    waiting.remove(&to);
                    return;
                }
                let n = queue.len().min(MAX_KEY_LOOKUPS);
                queue.drain(..n).collect()
            };
            self.lookups.inc_by(batch.len() as u64);
            self.messages.inc();
            let message = tokio::spawn(deliver(rpc.clone(), to, batch, self.message_deadline));
            // Dropping the handle leaves the message to answer its askers by itself.
            let _ = tokio::time::timeout(STALLED_AFTER, message).await;
        }
    }
}

/// How long a message of questions may go unanswered before the next one to the same member
/// goes anyway: well over a round trip between hosts, well under a deadline.
const STALLED_AFTER: Duration = Duration::from_millis(100);

/// Sends one message of questions and hands each asker its answer (or the error).
async fn deliver(
    rpc: PeerRpc<JobRequest, JobResponse>,
    to: SocketAddr,
    batch: Vec<(KeyLookup, Reply)>,
    deadline: Duration,
) {
    let (lookups, replies): (Vec<KeyLookup>, Vec<Reply>) = batch.into_iter().unzip();
    let asked = lookups.len();
    let answers = match rpc
        .request(to, JobRequest::FindKeys { lookups }, deadline)
        .await
    {
        Ok(JobResponse::Keys { answers }) if answers.len() == asked => Ok(answers),
        Ok(JobResponse::Keys { answers }) => {
            Err(format!("{} answers to {asked} key lookups", answers.len()))
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(error) => Err(error.to_string()),
    };
    match answers {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::net::{Endpoint, MemNetwork, NetConfig};
    use crate::peer::{Caller, Handler, PeerError, RpcConfig};

    /// Answers `FindKeys` after a pause, knowing the keys that end in an even digit; counts
    /// messages and the largest one.
    #[derive(Default)]
    struct Member {
        messages: AtomicUsize,
        largest: AtomicUsize,
        /// Leaves the first message unanswered (as if its frame was lost).
        ignore_first: bool,
    }

    struct Answers(Arc<Member>);

    #[async_trait]
    impl Handler<JobRequest, JobResponse> for Answers {
        async fn handle(&self, _: &Caller, req: JobRequest) -> Result<JobResponse, PeerError> {
            let JobRequest::FindKeys { lookups } = req else {
                return Err(PeerError::internal("only key lookups here"));
            };
            let n = self.0.messages.fetch_add(1, Ordering::SeqCst);
            self.0.largest.fetch_max(lookups.len(), Ordering::SeqCst);
            if n == 0 && self.0.ignore_first {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let answers = lookups
                .into_iter()
                .map(|l| {
                    if l.key.ends_with(['0', '2', '4', '6', '8']) {
                        KeyAnswer::Same {
                            view: format!("{}/{}", l.account, l.key),
                        }
                    } else {
                        KeyAnswer::Unknown
                    }
                })
                .collect();
            Ok(JobResponse::Keys { answers })
        }
    }

    /// An asking owner and an answering member on the in-memory network.
    struct Pair {
        net: MemNetwork,
        asker: PeerRpc<JobRequest, JobResponse>,
        from: SocketAddr,
        to: SocketAddr,
        member: Arc<Member>,
        _answering: PeerRpc<JobRequest, JobResponse>,
        questions: Arc<KeyQuestions>,
    }

    impl Pair {
        /// Questions go in messages that may take `message_deadline` each.
        async fn start(member: Member, message_deadline: Duration) -> Pair {
            let net = MemNetwork::new();
            let config = NetConfig {
                peer_queue_len: 1024,
                connect_timeout: Duration::from_millis(200),
                send_timeout: Duration::from_millis(500),
                ..NetConfig::default()
            };
            let bind = |name: &'static str, port: u16| {
                Endpoint::bind_mem(
                    &net,
                    name,
                    SocketAddr::from(([10, 0, 0, 1], port)),
                    config.clone(),
                )
            };
            let asking = bind("owner", 7001).await.expect("the endpoint binds");
            let answering = bind("replica", 7002).await.expect("the endpoint binds");
            let (from, to) = (asking.advertise().addr, answering.advertise().addr);
            let member = Arc::new(member);
            let asker =
                PeerRpc::start(asking, Answers(Arc::default()), RpcConfig::default()).expect("rpc");
            let answering =
                PeerRpc::start(answering, Answers(member.clone()), RpcConfig::default())
                    .expect("rpc");
            let questions = Arc::new(KeyQuestions::new(
                message_deadline,
                Counter::default(),
                Counter::default(),
            ));
            Pair {
                net,
                asker,
                from,
                to,
                member,
                _answering: answering,
                questions,
            }
        }

        async fn ask(&self, i: usize, wait: Duration) -> Result<KeyAnswer, String> {
            self.questions
                .ask(&self.asker, self.to, lookup(i), wait)
                .await
        }

        /// Asks questions `range` at once; answers by question.
        async fn ask_all(
            &self,
            range: std::ops::Range<usize>,
            wait: Duration,
        ) -> Vec<(usize, Result<KeyAnswer, String>)> {
            let asks = range.map(|i| async move { (i, self.ask(i, wait).await) });
            futures::future::join_all(asks).await
        }

        fn messages(&self) -> usize {
            self.member.messages.load(Ordering::SeqCst)
        }
    }

    fn lookup(i: usize) -> KeyLookup {
        KeyLookup {
            account: format!("acct-{}", i % 3),
            key: format!("key-{i}"),
            body_hash: "h".into(),
        }
    }

    /// What [`Answers`] says of question `i`.
    fn answer_to(i: usize) -> KeyAnswer {
        if i.is_multiple_of(2) {
            KeyAnswer::Same {
                view: format!("acct-{}/key-{i}", i % 3),
            }
        } else {
            KeyAnswer::Unknown
        }
    }

    fn asker(name: &str, port: u16) -> Asker {
        Asker {
            name: name.into(),
            addr: SocketAddr::from(([10, 0, 0, 9], port)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn askers_are_remembered_per_key_for_a_while_and_within_a_bound() {
        let askers = KeyAskers::new(Duration::from_secs(30), 3);
        askers.remember("acct-1", "k", asker("gpu-a", 1));
        assert_eq!(askers.recent("acct-1", "k"), Some(asker("gpu-a", 1)));
        // Another account's key of the same name, or another key, was not asked about.
        assert_eq!(askers.recent("acct-2", "k"), None);
        assert_eq!(askers.recent("acct-1", "k2"), None);

        // The latest asker of a key is the one remembered, from when it asked.
        tokio::time::advance(Duration::from_secs(20)).await;
        askers.remember("acct-1", "k", asker("gpu-b", 2));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(askers.recent("acct-1", "k"), Some(asker("gpu-b", 2)));
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(askers.recent("acct-1", "k"), None);
        assert_eq!(askers.len(), 0);

        // Beyond the bound the oldest go first.
        for i in 0..5u16 {
            askers.remember("acct-1", &format!("key-{i}"), asker("gpu-a", i));
        }
        assert_eq!(askers.len(), 3);
        assert_eq!(askers.recent("acct-1", "key-1"), None);
        assert_eq!(askers.recent("acct-1", "key-2"), Some(asker("gpu-a", 2)));
        assert_eq!(askers.recent("acct-1", "key-4"), Some(asker("gpu-a", 4)));
    }

    #[tokio::test]
    async fn questions_asked_together_share_messages_and_get_their_own_answers() {
        let pair = Pair::start(Member::default(), Duration::from_secs(5)).await;

        // One question alone goes at once, in a message of its own.
        let alone = pair.ask(4, Duration::from_secs(5)).await;
        assert_eq!(alone, Ok(answer_to(4)));
        assert_eq!(pair.messages(), 1);

        // 600 at once: the first goes alone, the rest wait for it and go together, at most
        // MAX_KEY_LOOKUPS to a message.
        for (i, answer) in pair.ask_all(0..600, Duration::from_secs(5)).await {
            assert_eq!(answer, Ok(answer_to(i)), "question {i}");
        }
        let messages = pair.messages() - 1;
        assert!(
            (3..=10).contains(&messages),
            "600 questions went in {messages} messages"
        );
        assert_eq!(pair.member.largest.load(Ordering::SeqCst), MAX_KEY_LOOKUPS);
        assert!(lock(&pair.questions.waiting).is_empty());
    }

    #[tokio::test]
    async fn a_member_out_of_reach_fails_the_questions_in_time_and_leaves_nothing_waiting() {
        let pair = Pair::start(Member::default(), Duration::from_millis(300)).await;
        pair.net.cut(pair.from, pair.to);
        let started = tokio::time::Instant::now();
        for (_, answer) in pair.ask_all(0..20, Duration::from_millis(300)).await {
            assert!(answer.is_err(), "{answer:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(3));
        // The sender gives up on its message too, and then has nothing left to send.
        let mut end = tokio::time::Instant::now() + Duration::from_secs(5);
        while !lock(&pair.questions.waiting).is_empty() {
            assert!(tokio::time::Instant::now() < end, "questions still waiting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pair.messages(), 0);
        end = tokio::time::Instant::now() + Duration::from_secs(5);

        // Once the link is back, a new question is answered (the endpoint backs off a
        // destination for a while after a failed send: asked until then).
        pair.net.heal(pair.from, pair.to);
        loop {
            let answer = pair.ask(1, Duration::from_millis(300)).await;
            if answer.is_ok() || tokio::time::Instant::now() > end {
                assert_eq!(answer, Ok(KeyAnswer::Unknown));
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_message_left_unanswered_holds_the_next_questions_back_only_briefly() {
        let member = Member {
            ignore_first: true,
            ..Member::default()
        };
        // Each message may take 2 s; the questions asked after the lost one wait at most 1 s.
        let pair = Pair::start(member, Duration::from_secs(2)).await;
        let first = pair.ask(1, Duration::from_secs(3));
        let later = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pair.ask_all(2..12, Duration::from_secs(1)).await
        };
        let (first, later) = tokio::join!(first, later);
        assert!(first.is_err(), "{first:?}");
        for (i, answer) in later {
            assert_eq!(answer, Ok(answer_to(i)), "question {i}");
        }
        assert_eq!(pair.messages(), 2);
    }
}
