//! `kiln`, the Kiln coordinator and operator CLI, as a library.
//!
//! # Layout
//!
//! - [`cli`]: the command-line surface (`kiln keys add`, …); every command returns a result and
//!   `main` turns an error into one line on stderr and a non-zero exit.
//!
//! The coordinator imports the node's pure wire contract (`kiln_daemon::protocol`) and never
//! the node's runtime parts.

pub mod cli;
