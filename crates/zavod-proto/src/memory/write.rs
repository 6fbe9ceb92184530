//! One write to a conversation's replica set: sent to every replica, tried
//! again where a try fails or goes unanswered, and acknowledged once a
//! write quorum says it has the entries durably. It goes on after that
//! until every replica has them or has had its tries, so R copies exist
//! in the usual case and a quorum in the worst.
//!
//! The machine decides who is sent what when; the caller sends (the same
//! write every time: the log's rules make a repeat harmless) and feeds
//! back each reply, failure and timeout.

use super::QuorumConfig;
use super::log::Applied;
use super::placement::write_quorum;
use super::tries::Tries;
use crate::UnixMs;
use crate::ids::NodeId;
use std::collections::BTreeSet;

/// How a write ended for whoever waits on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// A write quorum has it on disk.
    Acked { replicas: usize },
    /// The conversation was deleted, past this write's entries, after its
    /// writer read it (replicas' floor is `floor`): nothing was kept.
    Stale { floor: u64 },
    /// Too few replicas could be reached.
    Failed { acked: usize, needed: usize },
}

#[derive(Debug)]
pub struct Write {
    /// The lowest sequence written (`u64::MAX` for a deletion).
    lowest: u64,
    tries: Tries,
    /// Replicas that have it, and the highest floor of those that dropped
    /// it.
    acked: BTreeSet<NodeId>,
    stale: Option<u64>,
    need: usize,
    outcome: Option<WriteOutcome>,
    told: bool,
}

impl Write {
    /// A write to `replicas` (the placement's order, of a conversation
    /// that should have `planned` replicas: [`super::planned`]) whose
    /// lowest entry sequence is `lowest` (`u64::MAX` when it writes no
    /// entry).
    pub fn new(
        replicas: Vec<NodeId>,
        planned: usize,
        lowest: u64,
        now: UnixMs,
        config: QuorumConfig,
    ) -> Self {
        let need = write_quorum(planned.max(replicas.len()));
        let mut w = Write {
            lowest,
            tries: Tries::new(replicas, now, config),
            acked: BTreeSet::new(),
            stale: None,
            need,
            outcome: None,
            told: false,
        };
        w.decide();
        w
    }

    /// The next replica to send the write to now, if any.
    pub fn poll_transmit(&mut self, now: UnixMs) -> Option<NodeId> {
        self.tries.poll_transmit(now)
    }

    /// A replica's answer to the write (a late one, after its tries were
    /// given up, still counts: it has the write).
    pub fn handle_applied(&mut self, from: NodeId, applied: Applied, _now: UnixMs) {
        if self.tries.answered(from) {
            if applied.floor > self.lowest && self.lowest != u64::MAX {
                self.acked.remove(&from);
                self.stale = self.stale.max(Some(applied.floor));
            } else {
                self.acked.insert(from);
            }
        }
        self.decide();
    }

    /// A try that failed (no stream, an error frame, a broken reply).
    pub fn handle_failed(&mut self, from: NodeId, now: UnixMs) {
        self.tries.failed(from, now);
        self.decide();
    }

    /// Time passed: unanswered tries fail, and past the deadline every
    /// replica not yet acknowledged is given up.
    pub fn handle_timeout(&mut self, now: UnixMs) {
        self.tries.timeout(now);
        self.decide();
    }

    /// When [`Write::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<UnixMs> {
        self.tries.poll_timeout()
    }

    /// The outcome, once, as soon as it is known.
    pub fn poll_outcome(&mut self) -> Option<WriteOutcome> {
        if self.told {
            return None;
        }
        let o = self.outcome?;
        self.told = true;
        Some(o)
    }

    /// Every replica answered or had its tries.
    pub fn is_done(&self) -> bool {
        self.tries.is_done()
    }

    /// Replicas that have the write.
    pub fn acked(&self) -> usize {
        self.acked.len()
    }

    fn decide(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let acked = self.acked();
        self.outcome = if acked >= self.need {
            Some(WriteOutcome::Acked { replicas: acked })
        } else if acked + self.tries.open() >= self.need {
            None
        } else if let Some(floor) = self.stale {
            Some(WriteOutcome::Stale { floor })
        } else {
            Some(WriteOutcome::Failed {
                acked,
                needed: self.need,
            })
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn ok(floor: u64) -> Applied {
        Applied { floor, added: 1 }
    }

    fn drain(w: &mut Write, now: UnixMs) -> Vec<NodeId> {
        std::iter::from_fn(|| w.poll_transmit(now)).collect()
    }

    #[test]
    fn acked_at_a_majority_and_goes_on_to_the_rest() {
        let mut w = Write::new(vec![n(1), n(2), n(3)], 3, 0, 0, QuorumConfig::default());
        assert_eq!(drain(&mut w, 0), [n(1), n(2), n(3)]);
        w.handle_applied(n(2), ok(0), 5);
        assert_eq!(w.poll_outcome(), None);
        w.handle_applied(n(2), ok(0), 6);
        assert_eq!(w.poll_outcome(), None, "a duplicate reply counts once");
        w.handle_applied(n(3), ok(0), 7);
        assert_eq!(w.poll_outcome(), Some(WriteOutcome::Acked { replicas: 2 }));
        assert_eq!(w.poll_outcome(), None, "told once");
        assert!(!w.is_done());
        // The third is tried again until it answers.
        w.handle_timeout(2_000);
        assert_eq!(w.poll_transmit(2_000), None, "backing off");
        assert_eq!(drain(&mut w, 2_500), [n(1)]);
        w.handle_applied(n(1), ok(0), 2_600);
        assert!(w.is_done());
        assert_eq!(w.poll_timeout(), None);
    }

    #[test]
    fn fails_when_a_majority_cannot_answer_and_never_waits_past_its_deadline() {
        let cfg = QuorumConfig::default();
        let mut w = Write::new(vec![n(1), n(2), n(3)], 3, 0, 0, cfg);
        drain(&mut w, 0);
        w.handle_applied(n(1), ok(0), 1);
        while w.poll_outcome().is_none() {
            let now = w.poll_timeout().expect("a timer while undecided");
            assert!(now <= cfg.deadline_ms);
            w.handle_timeout(now);
            for r in drain(&mut w, now) {
                w.handle_failed(r, now);
            }
        }
        assert!(w.is_done());
        assert_eq!(w.acked(), 1);
        let mut w = Write::new(vec![], 1, 0, 0, cfg);
        assert_eq!(
            w.poll_outcome(),
            Some(WriteOutcome::Failed {
                acked: 0,
                needed: 1
            })
        );
    }

    #[test]
    fn a_node_cut_off_with_a_replica_set_of_itself_cannot_acknowledge() {
        let mut w = Write::new(vec![n(1)], 3, 0, 0, QuorumConfig::default());
        // Known at once: one reachable replica can never make two.
        assert_eq!(
            w.poll_outcome(),
            Some(WriteOutcome::Failed {
                acked: 0,
                needed: 2
            })
        );
    }

    #[test]
    fn a_deletion_seen_by_a_majority_makes_the_write_stale() {
        let mut w = Write::new(vec![n(1), n(2), n(3)], 3, 3, 0, QuorumConfig::default());
        drain(&mut w, 0);
        w.handle_applied(n(1), ok(0), 1);
        w.handle_applied(n(2), ok(4), 1);
        assert_eq!(w.poll_outcome(), None);
        w.handle_applied(n(3), ok(4), 1);
        assert_eq!(w.poll_outcome(), Some(WriteOutcome::Stale { floor: 4 }));
        // A deletion is never stale.
        let mut d = Write::new(vec![n(1)], 1, u64::MAX, 0, QuorumConfig::default());
        drain(&mut d, 0);
        d.handle_applied(n(1), ok(9), 1);
        assert_eq!(d.poll_outcome(), Some(WriteOutcome::Acked { replicas: 1 }));
    }
}
