//! The tries of one quorum operation, replica by replica: the part the
//! read and the write share. Each replica is sent to at once, tried again
//! after a failure or an unanswered try, up to `max_tries`, and given up at
//! the operation's deadline; an answer closes it. What an answer means is
//! the operation's own.
//!
//! The wait before a try again starts at a quarter of the try timeout and
//! doubles with each try: a refusal comes back fast, and the commonest one
//! (a member that has just joined and does not know this node yet) lasts
//! until the next announcement reaches it, a second or two, so evenly
//! spaced tries would all land inside it.

use super::QuorumConfig;
use crate::UnixMs;
use crate::ids::NodeId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Try {
    /// To send at `due`.
    Waiting {
        tries: u32,
        due: UnixMs,
    },
    Sent {
        tries: u32,
        at: UnixMs,
    },
    /// Answered, or given up.
    Closed,
}

#[derive(Debug)]
pub(crate) struct Tries {
    replicas: Vec<(NodeId, Try)>,
    deadline: UnixMs,
    config: QuorumConfig,
}

impl Tries {
    pub(crate) fn new(replicas: Vec<NodeId>, now: UnixMs, config: QuorumConfig) -> Self {
        Tries {
            replicas: replicas
                .into_iter()
                .map(|n| (n, Try::Waiting { tries: 0, due: now }))
                .collect(),
            deadline: now.saturating_add(config.deadline_ms),
            config,
        }
    }

    /// The next replica to send to now, if any.
    pub(crate) fn poll_transmit(&mut self, now: UnixMs) -> Option<NodeId> {
        if now >= self.deadline {
            return None;
        }
        for (node, t) in &mut self.replicas {
            if let Try::Waiting { tries, due } = *t
                && due <= now
            {
                *t = Try::Sent {
                    tries: tries + 1,
                    at: now,
                };
                return Some(*node);
            }
        }
        None
    }

    /// An answer from `from`: closes it. Whether `from` is one of the
    /// replicas (an answer from elsewhere means nothing).
    pub(crate) fn answered(&mut self, from: NodeId) -> bool {
        match self.replicas.iter_mut().find(|(n, _)| *n == from) {
            Some((_, t)) => {
                *t = Try::Closed;
                true
            }
            None => false,
        }
    }

    /// A try that failed: tried again later, or given up after its last.
    pub(crate) fn failed(&mut self, from: NodeId, now: UnixMs) {
        let first = self.config.try_timeout_ms / 4;
        let max = self.config.max_tries;
        if let Some((_, t)) = self.replicas.iter_mut().find(|(n, _)| *n == from)
            && let Try::Sent { tries, .. } = *t
        {
            // `tries` counts this one, so it is at least 1.
            let backoff = first.saturating_mul(1 << tries.saturating_sub(1).min(16));
            *t = if tries < max {
                Try::Waiting {
                    tries,
                    due: now.saturating_add(backoff),
                }
            } else {
                Try::Closed
            };
        }
    }

    /// Time passed: unanswered tries fail, and past the deadline every
    /// replica still open is given up.
    pub(crate) fn timeout(&mut self, now: UnixMs) {
        let expired: Vec<NodeId> = self
            .replicas
            .iter()
            .filter_map(|(n, t)| match t {
                Try::Sent { at, .. } if at.saturating_add(self.config.try_timeout_ms) <= now => {
                    Some(*n)
                }
                _ => None,
            })
            .collect();
        for n in expired {
            self.failed(n, now);
        }
        if now >= self.deadline {
            for (_, t) in &mut self.replicas {
                *t = Try::Closed;
            }
        }
    }

    /// When [`Tries::timeout`] should next be called.
    pub(crate) fn poll_timeout(&self) -> Option<UnixMs> {
        if self.is_done() {
            return None;
        }
        let next = self
            .replicas
            .iter()
            .filter_map(|(_, t)| match *t {
                Try::Waiting { due, .. } => Some(due),
                Try::Sent { at, .. } => Some(at.saturating_add(self.config.try_timeout_ms)),
                Try::Closed => None,
            })
            .min()
            .unwrap_or(self.deadline);
        Some(next.min(self.deadline))
    }

    /// Replicas that may still answer.
    pub(crate) fn open(&self) -> usize {
        self.replicas
            .iter()
            .filter(|(_, t)| *t != Try::Closed)
            .count()
    }

    pub(crate) fn is_done(&self) -> bool {
        self.open() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId([b; 32])
    }

    /// When one replica that refuses every try at once is sent to, over
    /// the first 10 s, under `max_tries` and `deadline_ms` (try timeout 1 s).
    fn refused_tries(max_tries: u32, deadline_ms: u64) -> (Vec<UnixMs>, Tries) {
        let config = QuorumConfig {
            try_timeout_ms: 1_000,
            max_tries,
            deadline_ms,
        };
        let mut t = Tries::new(vec![node(1)], 0, config);
        let mut sent_at = Vec::new();
        for now in 0..=10_000 {
            if t.poll_transmit(now).is_some() {
                sent_at.push(now);
                t.failed(node(1), now);
            }
            t.timeout(now);
        }
        (sent_at, t)
    }

    #[test]
    fn a_refusing_replica_is_tried_again_later_each_time_until_its_last_try() {
        let (sent_at, t) = refused_tries(4, 10_000);
        assert_eq!(sent_at, vec![0, 250, 750, 1_750]);
        assert!(t.is_done(), "given up after its fourth try");
    }

    #[test]
    fn every_try_stops_at_the_deadline() {
        let (sent_at, t) = refused_tries(10, 1_500);
        assert_eq!(sent_at, vec![0, 250, 750], "the next would be at 1,750");
        assert!(t.is_done());
    }
}
