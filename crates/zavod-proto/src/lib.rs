//! zavod-proto: the pure core of zavod.
//!
//! Every decision the mesh makes lives here as plain data and functions or
//! small state machines that are fed `now` (milliseconds on some clock the
//! caller owns) and inputs, and return outputs. Nothing in this crate reads a
//! clock, spawns, does IO or draws from an unseeded RNG, and no output depends
//! on `HashMap` iteration order (maps are `BTreeMap`). The node's actors are
//! thin shells around these pieces; the simulator drives the same pieces.
//!
//! Invariant: bytes from a peer are only ever turned into values through
//! [`wire::decode`] (size-bounded, versioned), and every verification returns
//! an error value; nothing here panics on peer input.

#![warn(unreachable_pub)]

pub mod chat;
pub mod fuzz;
pub mod ids;
pub mod limits;
pub mod memory;
pub mod mesh;
pub mod trust;
pub mod wire;

pub use ids::{ConversationId, NodeId, RequestId};

/// Milliseconds since the Unix epoch, as given to the pure core by its caller.
/// The core never reads a clock itself.
pub type UnixMs = u64;
