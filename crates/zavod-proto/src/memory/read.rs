//! One read of a conversation from its replica set: asked of every
//! replica, answered from the first `need` replies (a read quorum, or
//! every replica for a sync), merged by the log's rules: the newest
//! generation wins, and its entries are the union of what the replicas at
//! that generation hold. Every replica that replied with less is sent a
//! repair, a write of what it lacks (a replica at an older generation gets
//! the newer one, which drops what it held); replies after the answer are
//! still merged and repaired, until every replica answered or had its
//! tries.
//!
//! Replies hold a conversation's newest entries within a byte bound, so a
//! repair covers what both sides returned; older entries than that move
//! with syncs, page by page.

use super::QuorumConfig;
use super::log::{Entry, EntrySet, Held, Stamp, newest_within};
use super::tries::Tries;
use crate::UnixMs;
use crate::ids::NodeId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How a read ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    Read(Held),
    Failed { replied: usize, needed: usize },
}

/// A write to send to a replica that lacks part of what the read found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub to: NodeId,
    pub floor: u64,
    pub entries: Vec<Entry>,
}

#[derive(Debug)]
pub struct Read {
    tries: Tries,
    need: usize,
    max_bytes: usize,
    /// Each reply, kept to repair it against later ones.
    replies: BTreeMap<NodeId, Held>,
    floor: u64,
    merged: EntrySet,
    truncated: bool,
    outcome: Option<ReadOutcome>,
    told: bool,
    repairs: VecDeque<Repair>,
}

impl Read {
    /// A read from `replicas` that answers after `need` replies, each
    /// reply holding at most `max_bytes` of text.
    pub fn new(
        replicas: Vec<NodeId>,
        need: usize,
        max_bytes: usize,
        now: UnixMs,
        config: QuorumConfig,
    ) -> Self {
        let mut r = Read {
            tries: Tries::new(replicas, now, config),
            need: need.max(1),
            max_bytes,
            replies: BTreeMap::new(),
            floor: 0,
            merged: EntrySet::default(),
            truncated: false,
            outcome: None,
            told: false,
            repairs: VecDeque::new(),
        };
        r.decide();
        r
    }

    pub fn poll_transmit(&mut self, now: UnixMs) -> Option<NodeId> {
        self.tries.poll_transmit(now)
    }

    /// A replica's reply. Replies from outside the set, or a second one
    /// from the same replica, change nothing.
    pub fn handle_held(&mut self, from: NodeId, held: Held, _now: UnixMs) {
        if self.replies.contains_key(&from) || !self.tries.answered(from) {
            return;
        }
        if held.floor > self.floor {
            self.floor = held.floor;
            self.merged.drop_below(self.floor);
        }
        self.truncated |= held.truncated;
        for e in held.entries.iter().filter(|e| e.stamp.seq >= self.floor) {
            self.merged.merge(e);
        }
        self.replies.insert(from, held);
        if self.outcome.is_some() {
            // Answered already: this one only needs bringing level.
            self.repair_all();
        }
        self.decide();
    }

    pub fn handle_failed(&mut self, from: NodeId, now: UnixMs) {
        self.tries.failed(from, now);
        self.decide();
    }

    pub fn handle_timeout(&mut self, now: UnixMs) {
        self.tries.timeout(now);
        self.decide();
    }

    pub fn poll_timeout(&self) -> Option<UnixMs> {
        self.tries.poll_timeout()
    }

    pub fn poll_outcome(&mut self) -> Option<ReadOutcome> {
        if self.told {
            return None;
        }
        let o = self.outcome.clone()?;
        self.told = true;
        Some(o)
    }

    /// The next repair to send (each is sent once; a lost one is made
    /// again by a later read or sync).
    pub fn poll_repair(&mut self) -> Option<Repair> {
        self.repairs.pop_front()
    }

    pub fn is_done(&self) -> bool {
        self.tries.is_done()
    }

    fn decide(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let replied = self.replies.len();
        let open = self.tries.open();
        if replied >= self.need {
            let (entries, cut) = newest_within(self.merged.values(), self.max_bytes);
            self.outcome = Some(ReadOutcome::Read(Held {
                floor: self.floor,
                entries,
                truncated: self.truncated || cut,
            }));
            self.repair_all();
        } else if replied + open < self.need {
            self.outcome = Some(ReadOutcome::Failed {
                replied,
                needed: self.need,
            });
        }
    }

    /// Queues a repair for every reply that lacks part of the merged
    /// state, and records that it will have it.
    fn repair_all(&mut self) {
        let (g, merged) = (self.floor, &self.merged);
        for (node, held) in self.replies.iter_mut() {
            // Of a truncated reply, only what is newer than its oldest is
            // known to be missing.
            let shown = match (held.truncated, held.entries.first()) {
                (true, Some(first)) => Some(first.stamp),
                _ => None,
            };
            let have: BTreeSet<Stamp> = held.entries.iter().map(|e| e.stamp).collect();
            let missing: Vec<Entry> = merged
                .values()
                .filter(|e| shown.is_none_or(|f| e.stamp > f) && !have.contains(&e.stamp))
                .cloned()
                .collect();
            if held.floor < g || !missing.is_empty() {
                // What it will hold once repaired.
                let mut after = EntrySet::default();
                held.entries.iter().chain(&missing).for_each(|e| {
                    after.merge(e);
                });
                after.drop_below(g);
                held.floor = g;
                held.entries = after.values().cloned().collect();
                self.repairs.push_back(Repair {
                    to: *node,
                    floor: g,
                    entries: missing,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::prompt::{Role, Turn};

    fn n(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn e(seq: u64, id: u64) -> Entry {
        Entry {
            stamp: Stamp { seq, id },
            turns: vec![Turn {
                role: Role::User,
                text: format!("t{seq}.{id}"),
                tokens: 1,
            }],
        }
    }

    fn held(floor: u64, entries: Vec<Entry>) -> Held {
        Held {
            floor,
            entries,
            truncated: false,
        }
    }

    #[test]
    fn answers_from_a_quorum_with_the_union_and_repairs_the_stale() {
        let mut r = Read::new(
            vec![n(1), n(2), n(3)],
            2,
            1 << 20,
            0,
            QuorumConfig::default(),
        );
        assert_eq!(std::iter::from_fn(|| r.poll_transmit(0)).count(), 3);
        r.handle_held(n(1), held(0, vec![e(0, 1), e(1, 2)]), 1);
        assert_eq!(r.poll_outcome(), None);
        r.handle_held(n(3), held(0, vec![e(0, 1)]), 2);
        let Some(ReadOutcome::Read(h)) = r.poll_outcome() else {
            panic!("a read after two replies")
        };
        assert_eq!(h.entries, vec![e(0, 1), e(1, 2)]);
        assert_eq!(
            r.poll_repair(),
            Some(Repair {
                to: n(3),
                floor: 0,
                entries: vec![e(1, 2)]
            })
        );
        assert_eq!(r.poll_repair(), None);
        // The late one is repaired too, with all it lacks.
        r.handle_held(n(2), held(0, vec![]), 3);
        assert_eq!(r.poll_repair().map(|p| p.entries.len()), Some(2));
        assert!(r.is_done());
    }

    #[test]
    fn the_highest_floor_wins_and_a_replica_below_it_learns_it() {
        let mut r = Read::new(
            vec![n(1), n(2), n(3)],
            2,
            1 << 20,
            0,
            QuorumConfig::default(),
        );
        while r.poll_transmit(0).is_some() {}
        // n1 was down when the conversation was deleted and written again.
        r.handle_held(n(1), held(0, vec![e(0, 1), e(1, 2)]), 1);
        r.handle_held(n(2), held(3, vec![e(4, 7)]), 1);
        let Some(ReadOutcome::Read(h)) = r.poll_outcome() else {
            panic!("read")
        };
        assert_eq!((h.floor, h.entries), (3, vec![e(4, 7)]));
        assert_eq!(
            r.poll_repair(),
            Some(Repair {
                to: n(1),
                floor: 3,
                entries: vec![e(4, 7)]
            })
        );
    }

    #[test]
    fn a_truncated_reply_is_repaired_only_above_what_it_showed() {
        let mut r = Read::new(vec![n(1), n(2)], 2, 1 << 20, 0, QuorumConfig::default());
        while r.poll_transmit(0).is_some() {}
        let mut cut = held(0, vec![e(5, 5), e(6, 6)]);
        cut.truncated = true;
        r.handle_held(n(1), cut, 1);
        r.handle_held(n(2), held(0, vec![e(1, 1), e(5, 5), e(7, 7)]), 1);
        let Some(ReadOutcome::Read(h)) = r.poll_outcome() else {
            panic!("read")
        };
        assert!(h.truncated);
        let repairs: Vec<_> = std::iter::from_fn(|| r.poll_repair()).collect();
        assert_eq!(repairs.len(), 2);
        assert_eq!(repairs[0].to, n(1));
        assert_eq!(
            repairs[0].entries,
            vec![e(7, 7)],
            "not the entry below its window"
        );
        assert_eq!(repairs[1].entries, vec![e(6, 6)]);
    }

    #[test]
    fn fails_when_too_few_can_reply() {
        let cfg = QuorumConfig::default();
        let mut r = Read::new(vec![n(1), n(2), n(3)], 2, 1 << 20, 0, cfg);
        let mut now = 0;
        loop {
            for x in std::iter::from_fn(|| r.poll_transmit(now)).collect::<Vec<_>>() {
                if x == n(1) {
                    r.handle_held(x, held(0, vec![]), now);
                } else {
                    r.handle_failed(x, now);
                }
            }
            if let Some(o) = r.poll_outcome() {
                assert_eq!(
                    o,
                    ReadOutcome::Failed {
                        replied: 1,
                        needed: 2
                    }
                );
                break;
            }
            now = r.poll_timeout().expect("timer");
            assert!(now <= cfg.deadline_ms);
            r.handle_timeout(now);
        }
    }
}
