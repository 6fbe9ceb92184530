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
use crate::UnixMs;
use crate::ids::NodeId;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// To send at `due`.
    Waiting {
        tries: u32,
        due: UnixMs,
    },
    Sent {
        tries: u32,
        at: UnixMs,
    },
    Acked,
    /// Its floor is above the write's entries: they were dropped.
    Stale(u64),
    GaveUp,
}

#[derive(Debug)]
pub struct Write {
    /// The lowest sequence written (`u64::MAX` for a deletion).
    lowest: u64,
    replicas: Vec<(NodeId, State)>,
    need: usize,
    deadline: UnixMs,
    config: QuorumConfig,
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
            replicas: replicas
                .into_iter()
                .map(|n| (n, State::Waiting { tries: 0, due: now }))
                .collect(),
            need,
            deadline: now.saturating_add(config.deadline_ms),
            config,
            outcome: None,
            told: false,
        };
        w.decide();
        w
    }

    /// The next replica to send the write to now, if any.
    pub fn poll_transmit(&mut self, now: UnixMs) -> Option<NodeId> {
        if now >= self.deadline {
            return None;
        }
        for (node, s) in &mut self.replicas {
            if let State::Waiting { tries, due } = *s
                && due <= now
            {
                *s = State::Sent {
                    tries: tries + 1,
                    at: now,
                };
                return Some(*node);
            }
        }
        None
    }

    /// A replica's answer to the write.
    pub fn handle_applied(&mut self, from: NodeId, applied: Applied, _now: UnixMs) {
        let lowest = self.lowest;
        if let Some((_, s)) = self.replicas.iter_mut().find(|(n, _)| *n == from) {
            *s = if applied.floor > lowest && lowest != u64::MAX {
                State::Stale(applied.floor)
            } else {
                State::Acked
            };
        }
        self.decide();
    }

    /// A try that failed (no stream, an error frame, a broken reply).
    pub fn handle_failed(&mut self, from: NodeId, now: UnixMs) {
        let backoff = self.config.try_timeout_ms / 4;
        let max = self.config.max_tries;
        if let Some((_, s)) = self.replicas.iter_mut().find(|(n, _)| *n == from)
            && let State::Sent { tries, .. } = *s
        {
            *s = if tries < max {
                State::Waiting {
                    tries,
                    due: now.saturating_add(backoff),
                }
            } else {
                State::GaveUp
            };
        }
        self.decide();
    }

    /// Time passed: unanswered tries fail, and past the deadline every
    /// replica not yet acknowledged is given up.
    pub fn handle_timeout(&mut self, now: UnixMs) {
        let expired: Vec<NodeId> = self
            .replicas
            .iter()
            .filter_map(|(n, s)| match s {
                State::Sent { at, .. } if at.saturating_add(self.config.try_timeout_ms) <= now => {
                    Some(*n)
                }
                _ => None,
            })
            .collect();
        for n in expired {
            self.handle_failed(n, now);
        }
        if now >= self.deadline {
            for (_, s) in &mut self.replicas {
                if matches!(s, State::Waiting { .. } | State::Sent { .. }) {
                    *s = State::GaveUp;
                }
            }
        }
        self.decide();
    }

    /// When [`Write::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<UnixMs> {
        if self.is_done() {
            return None;
        }
        let next = self
            .replicas
            .iter()
            .filter_map(|(_, s)| match *s {
                State::Waiting { due, .. } => Some(due),
                State::Sent { at, .. } => Some(at.saturating_add(self.config.try_timeout_ms)),
                _ => None,
            })
            .min()
            .unwrap_or(self.deadline);
        Some(next.min(self.deadline))
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
        self.replicas
            .iter()
            .all(|(_, s)| matches!(s, State::Acked | State::Stale(_) | State::GaveUp))
    }

    /// Replicas that have the write.
    pub fn acked(&self) -> usize {
        self.replicas
            .iter()
            .filter(|(_, s)| *s == State::Acked)
            .count()
    }

    fn decide(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let acked = self.acked();
        let open = self
            .replicas
            .iter()
            .filter(|(_, s)| matches!(s, State::Waiting { .. } | State::Sent { .. }))
            .count();
        let stale = self
            .replicas
            .iter()
            .filter_map(|(_, s)| match s {
                State::Stale(g) => Some(*g),
                _ => None,
            })
            .max();
        self.outcome = if acked >= self.need {
            Some(WriteOutcome::Acked { replicas: acked })
        } else if acked + open >= self.need {
            None
        } else if let Some(floor) = stale {
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
