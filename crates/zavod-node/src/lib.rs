//! zavod-node: one zavod node.
//!
//! A ractor supervisor owns five actors — GpuMonitor, ModelWorker, Router,
//! MemoryKeeper, Breaker — and restarts any that fails, with backoff. The
//! actors are thin: each decision comes from `zavod-proto` (credential and
//! grant checks, usage ledger, MCDA ranking and pick, breakers, prompt
//! assembly, the entry machine). Streams from the network are served by
//! [`protocol`], one file per stream protocol; the chat entry pumps
//! `zavod_proto::chat::entry::Entry` and carries out what it decides.
//! `http/` serves the OpenAI API and the operator's endpoints.
//!
//! Invariants: a failing child never takes the node down; every request
//! that was admitted is settled (its reserved tokens returned) whatever
//! happens; every queue and wait is bounded.

#![warn(unreachable_pub)]

pub(crate) mod actors;
pub mod admission;
pub mod backend;
pub mod client;
pub mod clock;
pub(crate) mod cluster;
pub mod datadir;
pub(crate) mod holders;
pub(crate) mod http;
pub(crate) mod invites;
pub(crate) mod metrics;
pub mod model_choice;
pub mod node;
pub(crate) mod protocol;
pub(crate) mod rejoin;
pub(crate) mod renewal;
pub(crate) mod replication;
pub mod revocations;
pub(crate) mod summaries;
pub(crate) mod tailnet;
pub mod tuning;
pub(crate) mod usage;

/// The configuration, from its own crate (so it can be fuzzed without the
/// engine); `zavod_node::config` keeps its path.
pub use zavod_config as config;

pub use actors::supervisor::Child;
pub use config::{NodeConfig, Overrides};
pub use node::{Node, NodeError, StartOptions};
