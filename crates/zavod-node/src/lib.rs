//! zavod-node: one zavod node.
//!
//! A ractor supervisor owns five actors — GpuMonitor, ModelWorker, Router,
//! MemoryKeeper, Breaker — and restarts any that fails, with backoff. The
//! actors are thin: each decision comes from `zavod-proto` (credential and
//! grant checks, usage ledger, MCDA ranking and pick, breakers, prompt
//! assembly). Chat streams from the network are served by [`serve`], which
//! asks each actor for its part in turn and streams tokens back.
//!
//! Invariants: a failing child never takes the node down; every request
//! that was admitted is settled (its reserved tokens returned) whatever
//! happens; every queue and wait is bounded.

pub mod actors;
pub mod backend;
pub(crate) mod chat_entry;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod embed;
pub mod http;
pub mod metrics;
pub mod model_choice;
pub mod node;
pub mod serve;

pub use config::{NodeConfig, Overrides};
pub use node::{Node, NodeError, StartOptions};
