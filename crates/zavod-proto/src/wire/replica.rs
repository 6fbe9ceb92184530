//! The replica protocol (`/zavod/replica/1`): between members only, one
//! request and one reply per stream. A member writes entries of a
//! conversation to a replica (a deletion is a write of no entries with a
//! higher floor), reads what a replica holds, pages through it for an
//! export, or lists the conversations a holder keeps there. The rules a
//! replica applies are [`crate::memory::log`]'s.

use crate::chat::prompt::Turn;
use crate::ids::{ConversationId, NodeId};
use crate::limits::{
    MAX_EXPORT_PAGE_BYTES, MAX_LISTED_CONVERSATIONS, MAX_REPLICA_FRAME_TEXT_BYTES,
    MAX_REPLICA_WRITE_ENTRIES,
};
use crate::memory::log::Applied;
use crate::memory::{ConvKey, Entry, Held};
use crate::wire::ErrorFrame;
use serde::{Deserialize, Serialize};

/// Sequences a replica accepts: below 2^56 (milliseconds until the year
/// 2 million), so a hostile stamp cannot crowd out every later one.
pub const MAX_SEQ: u64 = 1 << 56;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaRequest {
    /// Raise the conversation's floor to `floor` (a deletion, where it
    /// rises) and union `entries` above it.
    Write {
        key: ConvKey,
        floor: u64,
        entries: Vec<Entry>,
    },
    /// The replica's floor and newest entries within the frame's text
    /// bound.
    Read { key: ConvKey },
    /// Turns from the `from`-th kept one, within an export page's bytes.
    Page { key: ConvKey, from: u64 },
    /// The conversations of `owner` this replica keeps.
    List { owner: NodeId },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaReply {
    /// The write is durable (or was below the floor: see [`Applied`]).
    Applied(Applied),
    Held(Held),
    Page {
        turns: Vec<Turn>,
        next: Option<u64>,
        held: bool,
    },
    Names {
        names: Vec<ConversationId>,
        truncated: bool,
    },
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
    if entries.iter().any(|e| e.stamp.seq >= MAX_SEQ) {
        return Err("an entry's sequence is out of range".into());
    }
    Ok(())
}

impl ReplicaRequest {
    /// Checks a request from a peer against the protocol's bounds.
    pub fn check(&self) -> Result<(), String> {
        match self {
            ReplicaRequest::Write { entries, floor, .. } => {
                if entries.len() > MAX_REPLICA_WRITE_ENTRIES {
                    return Err(format!("a write of {} entries", entries.len()));
                }
                if *floor > MAX_SEQ {
                    return Err("a floor out of range".into());
                }
                text_ok(entries)
            }
            _ => Ok(()),
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
            ReplicaReply::Page { turns, .. } => {
                let bytes: usize = turns.iter().map(|t| t.text.len()).sum();
                if turns.len() > 1 && bytes > MAX_EXPORT_PAGE_BYTES {
                    return Err(format!("a page of {bytes} bytes"));
                }
                Ok(())
            }
            ReplicaReply::Names { names, .. } if names.len() > MAX_LISTED_CONVERSATIONS => {
                Err(format!("a list of {} conversations", names.len()))
            }
            _ => Ok(()),
        }
    }
}
