//! Circuit breakers: one per peer, Closed → Open → Half-Open.
//!
//! `failure_threshold` consecutive failures (errors or timeouts) open the
//! circuit; after `open_ms` it lets one probe through (half-open); a probe
//! success closes it, a probe failure opens it again. Time is passed in.

use crate::UnixMs;
use crate::ids::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 3,
            open_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakerState {
    Closed { failures: u32 },
    Open { until_ms: UnixMs },
    HalfOpen { probe_in_flight: bool },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half-open",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    /// The state as of `now` (an open circuit whose cool-down passed reads
    /// as half-open).
    pub fn state(&self, now_ms: UnixMs) -> BreakerState {
        match self.state {
            BreakerState::Open { until_ms } if now_ms >= until_ms => BreakerState::HalfOpen {
                probe_in_flight: false,
            },
            s => s,
        }
    }

    /// Whether a request may go to this peer now. In half-open this admits
    /// exactly one probe until its outcome is recorded.
    pub fn try_acquire(&mut self, now_ms: UnixMs) -> bool {
        match self.state(now_ms) {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probe_in_flight } => {
                self.state = BreakerState::HalfOpen {
                    probe_in_flight: true,
                };
                !probe_in_flight
            }
        }
    }

    /// Whether routing should consider this peer at all (no side effect).
    pub fn is_routable(&self, now_ms: UnixMs) -> bool {
        match self.state(now_ms) {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probe_in_flight } => !probe_in_flight,
        }
    }

    pub fn on_success(&mut self, _now_ms: UnixMs) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    pub fn on_failure(&mut self, cfg: &BreakerConfig, now_ms: UnixMs) {
        let open = BreakerState::Open {
            until_ms: now_ms.saturating_add(cfg.open_ms),
        };
        self.state = match self.state(now_ms) {
            BreakerState::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= cfg.failure_threshold.max(1) {
                    open
                } else {
                    BreakerState::Closed { failures }
                }
            }
            BreakerState::HalfOpen { .. } => open,
            s @ BreakerState::Open { .. } => s,
        };
    }
}

/// The most peers with a breaker; beyond it healthy entries are forgotten
/// first (a forgotten healthy breaker is the same as a new one).
const MAX_BREAKERS: usize = 65_536;

/// All of a node's breakers.
#[derive(Debug, Clone, Default)]
pub struct BreakerBoard {
    pub config: BreakerConfig,
    peers: BTreeMap<NodeId, Breaker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl BreakerBoard {
    pub fn new(config: BreakerConfig) -> Self {
        BreakerBoard {
            config,
            peers: BTreeMap::new(),
        }
    }

    pub fn state(&self, peer: &NodeId, now_ms: UnixMs) -> BreakerState {
        self.peers
            .get(peer)
            .map_or(BreakerState::Closed { failures: 0 }, |b| b.state(now_ms))
    }

    pub fn is_routable(&self, peer: &NodeId, now_ms: UnixMs) -> bool {
        self.peers.get(peer).is_none_or(|b| b.is_routable(now_ms))
    }

    pub fn try_acquire(&mut self, peer: &NodeId, now_ms: UnixMs) -> bool {
        self.entry(peer).try_acquire(now_ms)
    }

    pub fn record(&mut self, peer: &NodeId, outcome: Outcome, now_ms: UnixMs) {
        let cfg = self.config.clone();
        let b = self.entry(peer);
        match outcome {
            Outcome::Success => b.on_success(now_ms),
            Outcome::Failure => b.on_failure(&cfg, now_ms),
        }
    }

    fn entry(&mut self, peer: &NodeId) -> &mut Breaker {
        if !self.peers.contains_key(peer) && self.peers.len() >= MAX_BREAKERS {
            self.peers
                .retain(|_, b| b.state != BreakerState::Closed { failures: 0 });
        }
        self.peers.entry(*peer).or_default()
    }

    /// Every peer's state, in node-id order.
    pub fn states(&self, now_ms: UnixMs) -> Vec<(NodeId, BreakerState)> {
        self.peers
            .iter()
            .map(|(n, b)| (*n, b.state(now_ms)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: BreakerConfig = BreakerConfig {
        failure_threshold: 3,
        open_ms: 1_000,
    };

    #[test]
    fn opens_after_threshold_and_recovers_through_half_open() {
        let mut b = Breaker::default();
        b.on_failure(&CFG, 0);
        b.on_failure(&CFG, 1);
        assert_eq!(b.state(1), BreakerState::Closed { failures: 2 });
        b.on_failure(&CFG, 2);
        assert_eq!(b.state(2), BreakerState::Open { until_ms: 1_002 });
        assert!(!b.try_acquire(500));
        assert!(!b.is_routable(1_001));
        // Cool-down over: one probe.
        assert!(b.is_routable(1_002));
        assert!(b.try_acquire(1_002));
        assert!(!b.try_acquire(1_003), "only one probe at a time");
        b.on_success(1_010);
        assert_eq!(b.state(1_010), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn a_failed_probe_reopens() {
        let mut b = Breaker::default();
        for t in 0..3 {
            b.on_failure(&CFG, t);
        }
        assert!(b.try_acquire(2_000));
        b.on_failure(&CFG, 2_001);
        assert_eq!(b.state(2_001), BreakerState::Open { until_ms: 3_001 });
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut b = Breaker::default();
        b.on_failure(&CFG, 0);
        b.on_failure(&CFG, 0);
        b.on_success(0);
        b.on_failure(&CFG, 0);
        assert_eq!(b.state(0), BreakerState::Closed { failures: 1 });
    }

    #[test]
    fn board_tracks_peers_separately() {
        let mut board = BreakerBoard::new(CFG);
        let (a, c) = (NodeId([1; 32]), NodeId([2; 32]));
        for _ in 0..3 {
            board.record(&a, Outcome::Failure, 10);
        }
        assert!(!board.is_routable(&a, 10));
        assert!(board.is_routable(&c, 10));
        assert_eq!(board.states(10).len(), 1);
        assert_eq!(board.state(&a, 10).name(), "open");
        assert_eq!(board.state(&a, 2_000).name(), "half-open");
    }
}
