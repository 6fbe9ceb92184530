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
//! A writer stamps a new entry one past the newest sequence it read, and
//! no lower than its clock's milliseconds, so sequences follow time as
//! well as what was read. A deletion raises the conversation's floor to
//! past everything its deleter read and past its clock: entries below the
//! floor are gone and stay gone (a write or a repair of one is dropped),
//! while a turn written after the deletion lands above it even where its
//! writer did not see the deletion. A replica never lowers its floor, so a
//! deletion wins over whatever a replica that was down still holds. Floor
//! and entries merge by maximum and union: replicas that saw the same
//! writes, in any order, hold the same.
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

/// What a replica holds of a conversation: its floor and its newest
/// entries, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Entries with a lower sequence were deleted.
    pub floor: u64,
    pub entries: Vec<Entry>,
    /// Whether older entries were left out (a read's byte bound).
    pub truncated: bool,
}

/// What a write did at a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The replica's floor after it: above an entry's sequence, that
    /// entry was deleted before it arrived.
    pub floor: u64,
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

    /// Drops every entry with a sequence below `floor`.
    pub fn drop_below(&mut self, floor: u64) {
        let keep = self.entries.split_off(&Stamp { seq: floor, id: 0 });
        for s in self.entries.keys() {
            self.ids.remove(&s.id);
        }
        self.entries = keep;
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

/// The sequence for a new entry: past the newest read and no lower than
/// the writer's clock.
pub fn next_seq(newest_read: Option<u64>, now_ms: u64) -> u64 {
    newest_read.map_or(0, |s| s.saturating_add(1)).max(now_ms)
}

/// The floor a deletion sets: past everything read and past the
/// deleter's clock.
pub fn deletion_floor(newest_read: Option<u64>, floor_read: u64, now_ms: u64) -> u64 {
    next_seq(newest_read, now_ms.saturating_add(1)).max(floor_read)
}

/// One replica's copy of one conversation, in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaLog {
    floor: u64,
    entries: EntrySet,
}

impl ReplicaLog {
    pub fn floor(&self) -> u64 {
        self.floor
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

    /// Raises the floor to `floor` (a deletion when it rises) and adds
    /// the entries above it, keeping at most `max_entries`.
    pub fn write(&mut self, floor: u64, entries: &[Entry], max_entries: usize) -> Applied {
        if floor > self.floor {
            self.floor = floor;
            self.entries.drop_below(floor);
        }
        let mut added = 0u32;
        for e in entries.iter().filter(|e| e.stamp.seq >= self.floor) {
            if self.entries.merge(e) {
                added += 1;
            }
        }
        self.entries.keep_newest(max_entries);
        Applied {
            floor: self.floor,
            added,
        }
    }

    /// The newest entries within `max_bytes` (at least one).
    pub fn read(&self, max_bytes: usize) -> Held {
        let (entries, truncated) = newest_within(self.entries.values(), max_bytes);
        Held {
            floor: self.floor,
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
        x.write(0, &[entry(10, 1, "a")], 100);
        let floor = deletion_floor(Some(10), 0, 5);
        assert_eq!(floor, 11);
        assert_eq!(x.write(floor, &[], 100).floor, 11);
        assert!(x.is_empty());
        // A late write or repair of what was deleted is dropped.
        let late = x.write(0, &[entry(10, 1, "a")], 100);
        assert_eq!((late.floor, late.added), (11, 0));
        // A turn after the deletion lands above it, even from a writer
        // that did not see it (its clock is past the deletion's).
        assert_eq!(
            x.write(0, &[entry(next_seq(Some(10), 12), 2, "b")], 100)
                .added,
            1
        );
        // A replica that missed the deletion learns it, whatever order
        // the writes come in.
        let mut down = ReplicaLog::default();
        down.write(0, &[entry(12, 2, "b")], 100);
        down.write(0, &[entry(10, 1, "a")], 100);
        down.write(11, &[], 100);
        assert_eq!(down, x);
        assert_eq!(down.write(3, &[], 100).floor, 11, "a floor never falls");
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
