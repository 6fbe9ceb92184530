//! The replica protocol (`/zavod/replica/1`): between members only, one
//! request and one reply per stream. A member writes entries of a
//! conversation to a replica, reads what a replica holds, or deletes (a
//! write of no entries in a newer generation). The rules a replica applies
//! are [`crate::memory::log`]'s.

use crate::limits::{MAX_REPLICA_FRAME_TEXT_BYTES, MAX_REPLICA_WRITE_ENTRIES};
use crate::memory::log::Applied;
use crate::memory::{ConvKey, Entry, Held};
use crate::wire::ErrorFrame;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRequest {
    pub key: ConvKey,
    pub op: ReplicaOp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaOp {
    /// Raise the conversation's floor to `floor` (a deletion, where it
    /// rises) and union `entries` above it.
    Write { floor: u64, entries: Vec<Entry> },
    /// The replica's generation and newest entries within the frame's
    /// text bound.
    Read,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaReply {
    /// The write is durable (or was stale: see [`Applied`]).
    Applied(Applied),
    Held(Held),
    Refused(ErrorFrame),
}

fn text_ok(entries: &[Entry]) -> Result<(), String> {
    let bytes: usize = entries.iter().map(Entry::text_bytes).sum();
    if entries.len() > 1 && bytes > MAX_REPLICA_FRAME_TEXT_BYTES {
        return Err(format!(
            "{} entries of {bytes} bytes of text",
            entries.len()
        ));
    }
    Ok(())
}

impl ReplicaRequest {
    /// Checks a request from a peer against the protocol's bounds.
    pub fn check(&self) -> Result<(), String> {
        match &self.op {
            ReplicaOp::Write { entries, .. } => {
                if entries.len() > MAX_REPLICA_WRITE_ENTRIES {
                    return Err(format!("a write of {} entries", entries.len()));
                }
                text_ok(entries)
            }
            ReplicaOp::Read => Ok(()),
        }
    }
}

impl ReplicaReply {
    /// Checks a reply from a replica against the protocol's bounds.
    pub fn check(&self) -> Result<(), String> {
        match self {
            ReplicaReply::Held(h) => {
                text_ok(&h.entries)?;
                if h.entries.windows(2).any(|w| w[0].stamp >= w[1].stamp) {
                    return Err("entries out of order".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
