//! Circuit breakers: one per peer, Closed → Open → Half-Open.
//!
//! `failure_threshold` consecutive failures (errors or timeouts) open the
//! circuit; after `open_ms` it lets one probe through (half-open); a probe
//! success closes it, a probe failure opens it again. Time is passed in.

use crate::UnixMs;
use crate::ids::{NodeId, RequestId};
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

/// The request holding a half-open peer's single probe slot, and when the
/// slot frees itself if no outcome is ever recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Probe {
    request: RequestId,
    until_ms: UnixMs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
    /// Set only while half-open: the probe let through.
    probe: Option<Probe>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed { failures: 0 },
            probe: None,
        }
    }
}

impl Breaker {
    /// The state as of `now` (an open circuit whose cool-down passed reads
    /// as half-open; a probe past its deadline no longer holds the slot).
    pub fn state(&self, now_ms: UnixMs) -> BreakerState {
        match self.state {
            BreakerState::Open { until_ms } if now_ms >= until_ms => BreakerState::HalfOpen {
                probe_in_flight: false,
            },
            BreakerState::HalfOpen { .. } => BreakerState::HalfOpen {
                probe_in_flight: self.probe.is_some_and(|p| now_ms < p.until_ms),
            },
            s => s,
        }
    }

    /// Lets `request` go to this peer if it may: always when closed, never
    /// when open, and when half-open only as the single probe, which holds
    /// the slot until its outcome is recorded, it is released, or
    /// `until_ms` passes.
    pub fn try_acquire(&mut self, request: RequestId, now_ms: UnixMs, until_ms: UnixMs) -> bool {
        match self.state(now_ms) {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen { probe_in_flight } => {
                if probe_in_flight {
                    return false;
                }
                self.state = BreakerState::HalfOpen {
                    probe_in_flight: true,
                };
                self.probe = Some(Probe { request, until_ms });
                true
            }
        }
    }

    /// `request` ended without an outcome (cancelled, or refused for its
    /// own input): if it held the probe slot, the next request may probe.
    pub fn release(&mut self, request: RequestId) {
        if self.probe.is_some_and(|p| p.request == request) {
            self.probe = None;
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
        self.probe = None;
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
        self.probe = None;
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

/// Whose an error a target answered with is, for its breaker: an entry
/// counts only faults it observed (it could not connect or open a stream,
/// the target stalled or broke the stream, or said it failed inside),
/// never a refusal of the request's own input, a full or restarting
/// target, or a client's say-so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request itself was refused: the client's to fix; trying another
    /// target would get the same answer.
    Request,
    /// The target could not take it now (full, restarting, not yet aware of
    /// this entry): try another, count nothing.
    Busy,
    /// The target failed: counts against its breaker.
    Target,
}

/// Sorts an error a target answered with (see [`Fault`]).
pub fn fault_of(code: crate::wire::ErrorCode) -> Fault {
    use crate::wire::ErrorCode as C;
    match code {
        C::BadRequest | C::FrameTooLarge | C::BudgetExhausted => Fault::Request,
        C::Internal | C::Timeout => Fault::Target,
        C::Unauthorized
        | C::Forbidden
        | C::RateLimited
        | C::ModelUnavailable
        | C::NoCapacity
        | C::UnsupportedVersion => Fault::Busy,
    }
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

    /// See [`Breaker::try_acquire`]; the placer's choice is confirmed
    /// through this, so a half-open peer gets one probe however many
    /// requests arrive at once.
    pub fn try_acquire(
        &mut self,
        peer: &NodeId,
        request: RequestId,
        now_ms: UnixMs,
        until_ms: UnixMs,
    ) -> bool {
        if !self.peers.contains_key(peer) {
            return true;
        }
        self.entry(peer).try_acquire(request, now_ms, until_ms)
    }

    /// See [`Breaker::release`].
    pub fn release(&mut self, peer: &NodeId, request: RequestId) {
        if let Some(b) = self.peers.get_mut(peer) {
            b.release(request);
        }
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
    const R1: RequestId = RequestId(1);
    const R2: RequestId = RequestId(2);

    #[test]
    fn a_probe_that_ends_without_an_outcome_frees_the_slot() {
        let mut b = Breaker::default();
        for t in 0..3 {
            b.on_failure(&CFG, t);
        }
        assert!(b.try_acquire(R1, 1_002, 5_000));
        // Another request's end frees nothing.
        b.release(R2);
        assert!(!b.try_acquire(R2, 1_003, 5_000));
        // The probe was cancelled: the next request probes.
        b.release(R1);
        assert!(b.try_acquire(R2, 1_004, 5_000));
        // A probe never heard of again frees the slot at its deadline.
        assert!(!b.is_routable(4_999));
        assert!(b.is_routable(5_000));
        assert!(b.try_acquire(R1, 5_000, 9_000));
    }

    #[test]
    fn a_closed_peer_takes_every_request_and_the_board_creates_nothing() {
        let mut board = BreakerBoard::new(CFG);
        let a = NodeId([1; 32]);
        assert!(board.try_acquire(&a, R1, 0, 10));
        assert!(board.try_acquire(&a, R2, 0, 10));
        assert!(board.states(0).is_empty());
        for _ in 0..3 {
            board.record(&a, Outcome::Failure, 0);
        }
        assert!(!board.try_acquire(&a, R1, 10, 100), "open");
        assert!(board.try_acquire(&a, R1, 1_000, 3_000), "the probe");
        assert!(!board.try_acquire(&a, R2, 1_001, 3_000), "one at a time");
        board.release(&a, R1);
        assert!(board.try_acquire(&a, R2, 1_002, 3_000));
    }

    #[test]
    fn opens_after_threshold_and_recovers_through_half_open() {
        let mut b = Breaker::default();
        b.on_failure(&CFG, 0);
        b.on_failure(&CFG, 1);
        assert_eq!(b.state(1), BreakerState::Closed { failures: 2 });
        b.on_failure(&CFG, 2);
        assert_eq!(b.state(2), BreakerState::Open { until_ms: 1_002 });
        assert!(!b.try_acquire(R1, 500, 5_000));
        assert!(!b.is_routable(1_001));
        // Cool-down over: one probe.
        assert!(b.is_routable(1_002));
        assert!(b.try_acquire(R1, 1_002, 5_000));
        assert!(!b.is_routable(1_003));
        assert!(!b.try_acquire(R2, 1_003, 5_000), "only one probe at a time");
        b.on_success(1_010);
        assert_eq!(b.state(1_010), BreakerState::Closed { failures: 0 });
    }

    #[test]
    fn a_failed_probe_reopens() {
        let mut b = Breaker::default();
        for t in 0..3 {
            b.on_failure(&CFG, t);
        }
        assert!(b.try_acquire(R1, 2_000, 9_000));
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
    fn only_a_targets_own_failure_counts_against_it() {
        use crate::wire::ErrorCode as C;
        assert_eq!(fault_of(C::BadRequest), Fault::Request);
        assert_eq!(fault_of(C::FrameTooLarge), Fault::Request);
        assert_eq!(fault_of(C::Internal), Fault::Target);
        assert_eq!(fault_of(C::Timeout), Fault::Target);
        for c in [C::NoCapacity, C::Unauthorized, C::Forbidden, C::RateLimited] {
            assert_eq!(fault_of(c), Fault::Busy);
        }
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
