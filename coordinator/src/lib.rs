//! `kiln`, the Kiln coordinator and operator CLI, as a library.
//!
//! # Layout
//!
//! - [`cli`]: the command-line surface (`kiln status`, `kiln certs …`, `kiln keys add`); every
//!   command returns a result and `main` turns an error into one line on stderr and a non-zero
//!   exit.
//! - [`status`]: the cluster view — where it is fetched from ([`status::StatusSource`]) and the
//!   pure table rendering ([`status::render_table`]).
//! - [`text`]: aligned tables and safe text for what people read.
//! - [`provider`]: the [`provider::Provider`] trait and its implementations (Vast.ai, RunPod,
//!   Lambda Cloud, local `kilnd` processes).
//! - [`costmodel`]: the planning document's cost tables recomputed from its assumptions.
//! - [`fleet`]: the hosts the coordinator rented and their states, as pure data.
//! - [`policy`]: the pure scaling policy (`plan`), shared by `kiln run` and `kiln simulate`.
//! - [`simulate`]: the discrete-event simulator behind `kiln simulate`, driving `policy::plan`.
//! - [`alerts`]: the pure alert rules (`evaluate`) and their webhook bodies.
//! - [`config`]: `kiln.toml` (inventory path, cluster access, provider sections).
//! - [`inventory`]: the SQLite inventory of rented hosts, their history and the cost ledger,
//!   and reconciling it with the providers.
//! - [`billing`]: usage pushed to Stripe Billing meter events (`kiln usage push`, `kiln run`).
//!
//! The coordinator imports the node's pure wire contract (`kiln_daemon::protocol`) and the
//! cluster CA (`kiln_daemon::pki`), never the node's runtime parts.

pub mod alerts;
pub mod billing;
pub mod cli;
pub mod config;
pub mod control;
pub mod costmodel;
pub mod fleet;
pub mod inventory;
pub mod policy;
pub mod provider;
pub mod simulate;
pub mod status;
pub mod text;
