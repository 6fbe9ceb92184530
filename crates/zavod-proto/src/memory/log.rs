//! What a replica holds of one conversation, and the rules it applies.
//!
//! A conversation is a set of [`Entry`]s (the user's turn and the answer
//! to it) keyed by [`Stamp`]: the sequence the writer gave it (one past
//! the newest it had read) and the id of the request that produced it.
//! Order is by stamp, so replicas holding the same set hold it in the same
//! order; two entries written at once from different entries of the mesh
//! both stay, one after the other, and the same entry written twice (a
//! retry, a duplicate on the network, a repair) is there once. One
//! request's entry is there once even when a retry placed it at another
//! sequence: per request id the smallest stamp wins, everywhere.
//!
//! A deletion raises the conversation's generation. Entries live in one
//! generation: a write of an older one is refused as stale (the
//! conversation was deleted after its writer read it), and a replica that
//! learns of a newer one drops what it held. A replica never forgets a
//! generation, so a deletion wins over whatever a replica that was down
//! still holds.
//!
//! [`ReplicaLog`] is these rules over memory; the store keeps the same
//! rules on disk, and both are tested against the same cases.

use crate::chat::prompt::Turn;
use crate::ids::{ConversationId, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Whose conversation: the credential holder's key and the conversation's
/// name. One holder's key never reaches another's conversations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConvKey {
    pub owner: NodeId,
    pub conversation: ConversationId,
}

/// An entry's place in its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// One past the newest sequence the writer read.
    pub seq: u64,
    /// The request that produced it (a retry of the request keeps it).
    pub id: u64,
}

/// A user turn and the answer to it, or turns supplied together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub stamp: Stamp,
    pub turns: Vec<Turn>,
}

impl Entry {
    /// Bytes of text, for the byte bounds of reads and writes.
    pub fn text_bytes(&self) -> usize {
        self.turns.iter().map(|t| t.text.len()).sum()
    }
}

/// What a replica holds of a conversation: its generation and its newest
/// entries, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub generation: u64,
    pub entries: Vec<Entry>,
    /// Whether older entries were left out (a read's byte bound).
    pub truncated: bool,
}

/// What a write did at a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The replica's generation after it: above the write's, the write
    /// was stale and nothing was applied.
    pub generation: u64,
    /// Entries that were new.
    pub added: u32,
}

/// The newest entries of `all` (oldest first) that fit `max_bytes` of
/// text, at least one, so a read always advances.
pub fn newest_within<'a>(
    all: impl DoubleEndedIterator<Item = &'a Entry>,
    max_bytes: usize,
) -> (Vec<Entry>, bool) {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut truncated = false;
    for e in all.rev() {
        bytes = bytes.saturating_add(e.text_bytes());
        if !out.is_empty() && bytes > max_bytes {
            truncated = true;
            break;
        }
        out.push(e.clone());
    }
    out.reverse();
    (out, truncated)
}

/// A set of entries with at most one per request id (the smallest stamp
/// wins): the merge every replica and every read applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySet {
    entries: BTreeMap<Stamp, Entry>,
    ids: BTreeMap<u64, Stamp>,
}

impl EntrySet {
    /// Adds `e` unless its request is there already at a smaller or equal
    /// stamp; whether it changed the set.
    pub fn merge(&mut self, e: &Entry) -> bool {
        match self.ids.get(&e.stamp.id) {
            Some(s) if *s <= e.stamp => return false,
            Some(s) => {
                let old = *s;
                self.entries.remove(&old);
            }
            None => {}
        }
        self.ids.insert(e.stamp.id, e.stamp);
        self.entries.insert(e.stamp, e.clone());
        true
    }

    /// Keeps the newest `max`.
    pub fn keep_newest(&mut self, max: usize) {
        while self.entries.len() > max {
            if let Some((s, _)) = self.entries.pop_first() {
                self.ids.remove(&s.id);
            }
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.ids.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, stamp: &Stamp) -> bool {
        self.entries.contains_key(stamp)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Entry> {
        self.entries.values()
    }
}

/// One replica's copy of one conversation, in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaLog {
    generation: u64,
    entries: EntrySet,
}

impl ReplicaLog {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn entries(&self) -> impl DoubleEndedIterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies a write of `entries` made in `generation`, keeping at most
    /// `max_entries`.
    pub fn write(&mut self, generation: u64, entries: &[Entry], max_entries: usize) -> Applied {
        if generation < self.generation {
            return Applied {
                generation: self.generation,
                added: 0,
            };
        }
        if generation > self.generation {
            self.generation = generation;
            self.entries.clear();
        }
        let mut added = 0u32;
        for e in entries {
            if self.entries.merge(e) {
                added += 1;
            }
        }
        self.entries.keep_newest(max_entries);
        Applied {
            generation: self.generation,
            added,
        }
    }

    /// Applies a deletion: the conversation is empty from `generation` on.
    pub fn delete(&mut self, generation: u64) -> Applied {
        if generation > self.generation {
            self.generation = generation;
            self.entries.clear();
        }
        Applied {
            generation: self.generation,
            added: 0,
        }
    }

    /// The newest entries within `max_bytes` (at least one).
    pub fn read(&self, max_bytes: usize) -> Held {
        let (entries, truncated) = newest_within(self.entries.values(), max_bytes);
        Held {
            generation: self.generation,
            entries,
            truncated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::prompt::Role;

    pub(crate) fn entry(seq: u64, id: u64, text: &str) -> Entry {
        Entry {
            stamp: Stamp { seq, id },
            turns: vec![Turn {
                role: Role::User,
                text: text.into(),
                tokens: 1,
            }],
        }
    }

    #[test]
    fn a_write_applied_twice_or_in_another_order_gives_the_same_log() {
        let (a, b, c) = (entry(0, 1, "a"), entry(1, 2, "b"), entry(1, 3, "c"));
        let mut x = ReplicaLog::default();
        assert_eq!(x.write(0, &[a.clone(), b.clone()], 100).added, 2);
        assert_eq!(
            x.write(0, std::slice::from_ref(&b), 100).added,
            0,
            "applied once"
        );
        x.write(0, std::slice::from_ref(&c), 100);
        let mut y = ReplicaLog::default();
        y.write(0, &[c, b, a.clone()], 100);
        y.write(0, &[a], 100);
        assert_eq!(x, y);
        let texts: Vec<_> = x.entries().map(|e| e.turns[0].text.clone()).collect();
        assert_eq!(
            texts,
            ["a", "b", "c"],
            "two writers at one sequence both stay, in id order"
        );
    }

    #[test]
    fn one_request_placed_at_two_sequences_is_kept_once_at_the_first() {
        let mut x = ReplicaLog::default();
        x.write(0, &[entry(3, 7, "retry")], 100);
        x.write(0, &[entry(2, 7, "first")], 100);
        let mut y = ReplicaLog::default();
        y.write(0, &[entry(2, 7, "first")], 100);
        y.write(0, &[entry(3, 7, "retry")], 100);
        assert_eq!(x, y);
        assert_eq!(x.len(), 1);
        assert_eq!(x.entries().next().map(|e| e.stamp.seq), Some(2));
    }

    #[test]
    fn a_deletion_wins_over_older_writes_and_survives_them() {
        let mut x = ReplicaLog::default();
        x.write(0, &[entry(0, 1, "a")], 100);
        assert_eq!(x.delete(1).generation, 1);
        assert!(x.is_empty());
        // A writer that read before the deletion is refused.
        let late = x.write(0, &[entry(1, 2, "b")], 100);
        assert_eq!((late.generation, late.added), (1, 0));
        assert!(x.is_empty());
        // A replica that missed the deletion learns it from a newer write.
        let mut down = ReplicaLog::default();
        down.write(0, &[entry(0, 1, "a")], 100);
        down.write(1, &[entry(0, 9, "new")], 100);
        assert_eq!(down.len(), 1);
        assert_eq!(down.entries().next().map(|e| e.stamp.id), Some(9));
        // An older deletion changes nothing.
        assert_eq!(down.delete(1).generation, 1);
        assert_eq!(down.len(), 1);
    }

    #[test]
    fn the_newest_are_kept_and_read_within_bytes() {
        let mut x = ReplicaLog::default();
        let all: Vec<_> = (0..10).map(|i| entry(i, i, "0123456789")).collect();
        x.write(0, &all, 6);
        assert_eq!(x.len(), 6);
        assert_eq!(x.entries().next().map(|e| e.stamp.seq), Some(4));
        let h = x.read(25);
        assert_eq!(h.entries.len(), 2);
        assert!(h.truncated);
        assert_eq!(h.entries[1].stamp.seq, 9);
        // One entry over the bound still comes, so reads advance.
        assert_eq!(x.read(3).entries.len(), 1);
        assert!(!x.read(1_000).truncated);
    }
}
