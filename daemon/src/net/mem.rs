//! An in-memory network behind the [`Conn`] seam, for tests: endpoints bind addresses on a
//! shared [`MemNetwork`], and links between two addresses can be cut (frames dropped both
//! ways, dials refused) and healed.
//!
//! It carries the same frames as the real transports and must never be used outside tests and
//! simulations: there is no authentication (the bound name stands in for a certificate name).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, ConnReader, NewConn, Read};

/// Frames in flight per direction of one in-memory connection.
const LINK_QUEUE_LEN: usize = 256;

/// A connection offered to a bound address.
pub(crate) struct MemIncoming {
    pub remote: SocketAddr,
    pub conn: NewConn,
}

#[derive(Default)]
struct State {
    listeners: HashMap<SocketAddr, (Arc<str>, mpsc::UnboundedSender<MemIncoming>)>,
    cuts: HashSet<(SocketAddr, SocketAddr)>,
}

/// A shared in-memory network. Clones share it.
#[derive(Clone, Default)]
pub struct MemNetwork {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNetwork").finish_non_exhaustive()
    }
}

fn link(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (canonical(a), canonical(b));
    if a <= b { (a, b) } else { (b, a) }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl MemNetwork {
    pub fn new() -> MemNetwork {
        MemNetwork::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated (every critical
        // section is a single insert or remove), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the link between `a` and `b`: frames are dropped both ways and dials fail.
    pub fn cut(&self, a: SocketAddr, b: SocketAddr) {
        self.state().cuts.insert(link(a, b));
    }

    /// Restores the link between `a` and `b`.
    pub fn heal(&self, a: SocketAddr, b: SocketAddr) {
        self.state().cuts.remove(&link(a, b));
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        self.state().cuts.clear();
    }

    pub fn is_cut(&self, a: SocketAddr, b: SocketAddr) -> bool {
        self.state().cuts.contains(&link(a, b))
    }

    pub(crate) fn bind(
        &self,
        addr: SocketAddr,
        name: &str,
    ) -> anyhow::Result<mpsc::UnboundedReceiver<MemIncoming>> {
        let addr = canonical(addr);
        if addr.port() == 0 {
            anyhow::bail!("mem://{addr}: an in-memory address needs an explicit port");
        }
        let mut state = self.state();
        if state
            .listeners
            .get(&addr)
            .is_some_and(|(_, tx)| !tx.is_closed())
        {
            anyhow::bail!("mem://{addr} is already bound");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        state.listeners.insert(addr, (name.into(), tx));
        Ok(rx)
    }

    /// Forgets `addr` once the endpoint bound there has dropped its receiver (a newer
    /// endpoint bound on the same address is kept).
    pub(crate) fn unbind(&self, addr: SocketAddr) {
        let addr = canonical(addr);
        let mut state = self.state();
        if state
            .listeners
            .get(&addr)
            .is_some_and(|(_, tx)| tx.is_closed())
        {
            state.listeners.remove(&addr);
        }
    }

    /// Opens a connection from `from` (named `from_name`) to the endpoint bound at `to`.
    pub(crate) fn connect(
        &self,
        from: SocketAddr,
        from_name: &str,
        to: SocketAddr,
    ) -> anyhow::Result<NewConn> {
        let (from, to) = (canonical(from), canonical(to));
        let state = self.state();
        if state.cuts.contains(&link(from, to)) {
            anyhow::bail!("mem://{to}: the link from {from} is cut");
        }
        let (to_name, listener) = state
            .listeners
            .get(&to)
            .filter(|(_, tx)| !tx.is_closed())
            .ok_or_else(|| anyhow::anyhow!("mem://{to}: nothing is bound there"))?;
        let closed = CancellationToken::new();
        let (to_remote, remote_rx) = mpsc::channel(LINK_QUEUE_LEN);
        let (to_local, local_rx) = mpsc::channel(LINK_QUEUE_LEN);
        let ours = NewConn {
            conn: Arc::new(MemConn {
                network: self.clone(),
                local: from,
                remote: to,
                peer_name: to_name.clone(),
                tx: to_remote,
                closed: closed.clone(),
            }),
            reader: Box::new(MemReader {
                rx: local_rx,
                closed: closed.clone(),
            }),
        };
        let theirs = NewConn {
            conn: Arc::new(MemConn {
                network: self.clone(),
                local: to,
                remote: from,
                peer_name: from_name.into(),
                tx: to_local,
                closed: closed.clone(),
            }),
            reader: Box::new(MemReader {
                rx: remote_rx,
                closed,
            }),
        };
        listener
            .send(MemIncoming {
                remote: from,
                conn: theirs,
            })
            .map_err(|_| anyhow::anyhow!("mem://{to}: the endpoint is closing"))?;
        Ok(ours)
    }
}

struct MemConn {
    network: MemNetwork,
    local: SocketAddr,
    remote: SocketAddr,
    peer_name: Arc<str>,
    tx: mpsc::Sender<Bytes>,
    closed: CancellationToken,
}

#[async_trait]
impl Conn for MemConn {
    async fn send_frame(&self, frame: Bytes) -> anyhow::Result<()> {
        if self.closed.is_cancelled() {
            anyhow::bail!("connection closed");
        }
        if self.network.is_cut(self.local, self.remote) {
            // A partition loses frames silently, as a real network would.
            return Ok(());
        }
        self.tx
            .send(frame)
            .await
            .map_err(|_| anyhow::anyhow!("connection closed"))
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn peer_name(&self) -> Arc<str> {
        self.peer_name.clone()
    }

    fn close(&self) {
        self.closed.cancel();
    }

    fn is_closed(&self) -> bool {
        self.closed.is_cancelled() || self.tx.is_closed()
    }
}

struct MemReader {
    rx: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
}

#[async_trait]
impl ConnReader for MemReader {
    async fn next_frame(&mut self) -> Read {
        tokio::select! {
            () = self.closed.cancelled() => Read::Closed(None),
            frame = self.rx.recv() => match frame {
                Some(frame) => Read::Frame(frame),
                None => {
                    self.closed.cancel();
                    Read::Closed(None)
                }
            },
        }
    }

    fn closes_on_garbage(&self) -> bool {
        false
    }
}
