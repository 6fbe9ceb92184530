//! Conversation memory as a mesh service: where a conversation's turns
//! live, when a write counts as kept, and how replicas that missed
//! something catch up. Pure decisions only; the node carries them out over
//! its replica protocol and its store, and the simulator carries out the
//! same ones over its virtual network (`simulations/memory-*.toml`).
//!
//! - [`placement`]: rendezvous hashing of a conversation over the alive
//!   members a node sees, and the quorum sizes for a replica set.
//! - [`log`]: what a replica holds of a conversation and the rules it
//!   applies to a write or a deletion. A conversation is a set of entries
//!   (a user turn and its answer) keyed by a [`log::Stamp`] (sequence,
//!   request id), above a floor that a deletion raises. Writes are unions
//!   (one entry per request id), so a retried or duplicated write is
//!   applied once, replicas that saw the same writes hold the same entries
//!   whatever the order, and a deletion wins over everything below it.
//! - [`write`]: one write to a replica set, acknowledged once a write
//!   quorum has it durably.
//! - [`read`]: one read from a replica set, answered once a read quorum
//!   replied, with the repairs that bring stale replicas level.
//! - [`recall`]: long-term memory in prompts: the facts a user turn states,
//!   and which of those kept go into a prompt, by relevance, within a
//!   token budget.
//! - [`summary`]: running summaries: which turns a prompt no longer holds
//!   are folded into the conversation's summary, and where it is kept.
//!
//! Invariants (checked by unit tests here and by the simulator under
//! crashes, loss and partitions): an acknowledged entry is never lost while
//! fewer than R replicas are lost at once; replicas converge once they can
//! reach each other; no entry is applied twice; a deletion survives a
//! replica that was down when it was made.

pub mod log;
pub mod placement;
pub mod read;
pub mod recall;
pub mod summary;
mod tries;
pub mod write;

pub use log::{ConvKey, Entry, EntrySet, Held, ReplicaLog, Stamp, deletion_floor, next_seq};
pub use placement::{DEFAULT_REPLICAS, planned, read_quorum, replicas, write_quorum};

/// How a quorum operation waits and retries; every wait is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumConfig {
    /// A replica that has not answered one try this long is tried again.
    pub try_timeout_ms: u64,
    /// Tries per replica, the first included.
    pub max_tries: u32,
    /// The whole operation gives up this long after it started.
    pub deadline_ms: u64,
}

impl Default for QuorumConfig {
    fn default() -> Self {
        QuorumConfig {
            try_timeout_ms: 2_000,
            max_tries: 3,
            deadline_ms: 8_000,
        }
    }
}
