//! `kilnd`, the Kiln node daemon, as a library.
//!
//! # Layout
//!
//! - [`protocol`]: the pure wire contract (HTTP DTOs, error codes). No I/O, no tokio; the
//!   coordinator imports it.
//! - [`config`]: the node's TOML configuration, validated before any port is bound.
//! - [`comfy`]: everything that talks to ComfyUI: the simulator (`kilnd comfy-sim`), the HTTP and
//!   WebSocket client, the workflow validator, the process supervisor and the per-job executor.
//! - [`queue`]: the durable job store (SQLite in WAL mode behind one writer thread) and the
//!   scheduler that picks the next job (tier, then account fairness, then age).
//! - [`sqlite`]: numbered SQLite migrations, shared with the coordinator's inventory.
//! - [`tiers`]: tiers, accounts and API keys (a keys file holding only hashes).
//! - [`watermark`]: the visible mark on outputs of watermarked tiers.
//! - [`webhooks`]: signed job webhooks sent from the store's outbox, and their target checks.
//! - [`pki`]: the cluster CA, member certificates and the TLS configs built from them.
//! - [`net`]: the cluster transport (QUIC, TLS over TCP, in-memory), with chitchat over it.
//! - [`cluster`]: membership: gossip of each member's status and the cluster view.
//! - [`peer`]: node-to-node requests and answers over the transport, and job placement.
//! - [`jobs`]: jobs across the cluster: placement, forwarding, replicas, leases, and any node
//!   answering for any job.
//! - [`gpu`]: GPU readings from NVML or a simulated card.
//! - [`api`]: the axum HTTP API of a node.
//! - [`notify`]: systemd's notify protocol (readiness, status lines, watchdog pings); a no-op
//!   outside systemd.
//! - [`node`]: wires the parts together; [`node::run`] is the entry point tests call in-process.

pub mod api;
pub mod cluster;
pub mod comfy;
pub mod config;
pub mod gpu;
pub mod jobs;
pub mod metrics;
pub mod net;
pub mod node;
pub mod notify;
pub mod peer;
pub mod pki;
pub mod protocol;
pub mod queue;
pub mod results;
pub mod sqlite;
pub mod tiers;
pub mod watermark;
pub mod webhooks;
