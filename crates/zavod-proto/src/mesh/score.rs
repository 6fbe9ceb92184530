//! MCDA scoring.
//!
//! Every node computes the same ranking from the same view: scores are pure
//! functions of the candidates and ties break by node id. The pick among
//! the ranked candidates is [`crate::mesh::placer`]'s.

use crate::ids::NodeId;
use serde::{Deserialize, Serialize};

/// Criterion weights; they need not sum to 1 (they are normalised), but each
/// must be finite and non-negative and at least one positive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    pub free_memory: f64,
    pub free_slots: f64,
    pub rtt: f64,
    pub tokens_per_s: f64,
    /// Added, outside the normalised four, to a node that holds the
    /// request's prompt cache.
    #[serde(default = "default_cache_weight")]
    pub cache: f64,
}

fn default_cache_weight() -> f64 {
    0.5
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            free_memory: 0.4,
            free_slots: 0.3,
            rtt: 0.2,
            tokens_per_s: 0.1,
            cache: default_cache_weight(),
        }
    }
}

impl Weights {
    pub fn check(&self) -> Result<(), String> {
        let all = [
            ("free_memory", self.free_memory),
            ("free_slots", self.free_slots),
            ("rtt", self.rtt),
            ("tokens_per_s", self.tokens_per_s),
        ];
        for (name, w) in all.into_iter().chain([("cache", self.cache)]) {
            if !w.is_finite() || w < 0.0 {
                return Err(format!(
                    "scoring weight {name} must be a non-negative number, got {w}"
                ));
            }
        }
        if all.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            return Err("at least one scoring weight must be above 0".into());
        }
        Ok(())
    }

    fn normalised(&self) -> [f64; 4] {
        let s = self.free_memory + self.free_slots + self.rtt + self.tokens_per_s;
        if s <= 0.0 || !s.is_finite() {
            return [0.25; 4];
        }
        [
            self.free_memory / s,
            self.free_slots / s,
            self.rtt / s,
            self.tokens_per_s / s,
        ]
    }
}

/// One node as the scorer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub node: NodeId,
    pub mem_free_bytes: u64,
    pub slots_free: u32,
    pub slots_total: u32,
    /// Requests waiting for a slot: a backlog counts against the node.
    pub queue_depth: u32,
    /// Round-trip time; 0 for this node itself, `None` when unmeasured.
    pub rtt_ms: Option<f64>,
    pub tokens_per_s: f64,
    /// Whether the node holds the request's prompt cache (by its report's
    /// summary).
    pub cache_hit: bool,
    /// How old the figures are (0 for this node's own).
    pub age_ms: u64,
    /// The node deciding (its figures are its own, not gossip).
    pub is_self: bool,
    /// How good its file of the model is ([`crate::mesh::tiers::quality`]):
    /// among equally loaded nodes the better file wins.
    pub quality: u8,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub node: NodeId,
    pub score: f64,
    pub slots_free: u32,
}

/// RTTs below this count as equal; loopback and LAN differences that small
/// say nothing about which node answers sooner.
const RTT_FLOOR_MS: f64 = 1.0;
/// RTT assumed for a peer not yet measured: pessimistic but not excluding.
const RTT_UNKNOWN_MS: f64 = 250.0;

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// Best first; ties by node id, so the order is total and the same on
/// every node whatever order candidates arrive in.
fn better(a: &Scored, b: &Scored) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score).then(a.node.cmp(&b.node))
}

/// Scores candidates in [0, 1] and sorts them best first (ties by node id).
/// Memory and decode rate are relative to the best candidate; slots are the
/// free fraction; RTT is the best RTT over this one's.
pub fn rank(cands: &[Candidate], w: &Weights) -> Vec<Scored> {
    let mut out = score_all(cands, w);
    out.sort_by(better);
    out
}

/// The best `k` of [`rank`], in the same order, in linear time: what a
/// routing decision needs, since the pick looks only at the best few.
pub fn best(cands: &[Candidate], w: &Weights, k: usize) -> Vec<Scored> {
    let mut out = score_all(cands, w);
    let k = k.max(1);
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, better);
        out.truncate(k);
    }
    out.sort_by(better);
    out
}

fn score_all(cands: &[Candidate], w: &Weights) -> Vec<Scored> {
    score_where(cands, w, None)
}

/// Scores the candidates `keep` marks (all when `None`), normalising over
/// those only.
pub(crate) fn score_where(cands: &[Candidate], w: &Weights, keep: Option<&[bool]>) -> Vec<Scored> {
    let kept = |i: usize| keep.is_none_or(|k| k.get(i).copied().unwrap_or(false));
    let [wm, ws, wr, wt] = w.normalised();
    let rtt_of = |c: &Candidate| {
        c.rtt_ms
            .map(finite_or_zero)
            .unwrap_or(RTT_UNKNOWN_MS)
            .max(RTT_FLOOR_MS)
    };
    // One pass for the normalising extremes.
    let (mut max_mem, mut max_tps, mut min_rtt) = (0u64, 0.0f64, f64::INFINITY);
    for (_, c) in cands.iter().enumerate().filter(|(i, _)| kept(*i)) {
        max_mem = max_mem.max(c.mem_free_bytes);
        max_tps = max_tps.max(finite_or_zero(c.tokens_per_s));
        min_rtt = min_rtt.min(rtt_of(c));
    }
    // Weights folded into reciprocals: a routing decision over a thousand
    // members is dominated by per-candidate divisions otherwise.
    let k_mem = if max_mem == 0 {
        0.0
    } else {
        wm / max_mem as f64
    };
    let k_tps = if max_tps == 0.0 { 0.0 } else { wt / max_tps };
    let k_rtt = wr * min_rtt;
    let w_cache = finite_or_zero(w.cache);
    cands
        .iter()
        .enumerate()
        .filter(|(i, _)| kept(*i))
        .map(|(_, c)| {
            // Free fraction of the slots, going negative with a backlog
            // (down to -4), so a node with a queue ranks below every node
            // with room, and a longer queue below a shorter one.
            let slots = if c.slots_total == 0 {
                0.0
            } else {
                let free = f64::from(c.slots_free.min(c.slots_total));
                let waiting = f64::from(c.queue_depth.min(c.slots_total.saturating_mul(4)));
                (free - waiting) / f64::from(c.slots_total)
            };
            Scored {
                node: c.node,
                score: k_mem * c.mem_free_bytes as f64
                    + ws * slots
                    + k_rtt / rtt_of(c)
                    + k_tps * finite_or_zero(c.tokens_per_s)
                    + if c.cache_hit { w_cache } else { 0.0 },
                slots_free: c.slots_free,
            }
        })
        .collect()
}

/// splitmix64: a fixed, well-mixed hash so every node draws the same pair
/// (and the cost-model engine the same words).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(n: u8, mem: u64, free: u32, rtt: f64, tps: f64) -> Candidate {
        Candidate {
            node: NodeId([n; 32]),
            mem_free_bytes: mem,
            slots_free: free,
            slots_total: 4,
            queue_depth: 0,
            rtt_ms: Some(rtt),
            tokens_per_s: tps,
            cache_hit: false,
            age_ms: 0,
            is_self: false,
            quality: 0,
        }
    }

    #[test]
    fn default_weights_follow_the_design() {
        let w = Weights::default();
        for (got, want) in w.normalised().into_iter().zip([0.4, 0.3, 0.2, 0.1]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert!(w.check().is_ok());
        assert!(
            Weights {
                rtt: -1.0,
                ..w.clone()
            }
            .check()
            .is_err()
        );
        assert!(
            Weights {
                free_memory: 0.0,
                free_slots: 0.0,
                rtt: 0.0,
                tokens_per_s: 0.0,
                cache: 0.0,
            }
            .check()
            .is_err()
        );
    }

    #[test]
    fn a_dominant_node_scores_one() {
        let r = rank(
            &[cand(1, 100, 4, 1.0, 50.0), cand(2, 50, 2, 2.0, 25.0)],
            &Weights::default(),
        );
        assert_eq!(r[0].node, NodeId([1; 32]));
        assert!((r[0].score - 1.0).abs() < 1e-12);
        // 0.4*0.5 + 0.3*0.5 + 0.2*0.5 + 0.1*0.5
        assert!((r[1].score - 0.5).abs() < 1e-12);
    }

    #[test]
    fn weights_change_the_winner() {
        let big_mem = cand(1, 100, 0, 1.0, 10.0);
        let free_slots = cand(2, 10, 4, 1.0, 10.0);
        let mem_heavy = Weights {
            free_memory: 1.0,
            free_slots: 0.0,
            rtt: 0.0,
            tokens_per_s: 0.0,
            cache: 0.0,
        };
        let slot_heavy = Weights {
            free_memory: 0.0,
            free_slots: 1.0,
            rtt: 0.0,
            tokens_per_s: 0.0,
            cache: 0.0,
        };
        let c = [big_mem, free_slots];
        assert_eq!(rank(&c, &mem_heavy)[0].node, NodeId([1; 32]));
        assert_eq!(rank(&c, &slot_heavy)[0].node, NodeId([2; 32]));
    }

    #[test]
    fn ranking_is_order_independent_and_ties_break_by_id() {
        let a = cand(3, 10, 1, 1.0, 1.0);
        let b = cand(1, 10, 1, 1.0, 1.0);
        let c = cand(2, 10, 1, 1.0, 1.0);
        let r1 = rank(&[a.clone(), b.clone(), c.clone()], &Weights::default());
        let r2 = rank(&[c, a, b], &Weights::default());
        assert_eq!(r1, r2);
        assert_eq!(r1[0].node, NodeId([1; 32]));
    }

    #[test]
    fn hostile_figures_do_not_poison_scores() {
        let mut weird = cand(1, 0, 9, f64::NAN, f64::INFINITY);
        weird.slots_total = 0;
        let r = rank(&[weird, cand(2, 5, 1, 3.0, 5.0)], &Weights::default());
        assert!(r.iter().all(|s| s.score.is_finite()));
        assert_eq!(r[0].node, NodeId([2; 32]));
    }

    #[test]
    fn best_k_is_the_head_of_the_ranking() {
        let cands: Vec<Candidate> = (0..200u8)
            .map(|n| {
                cand(
                    n,
                    u64::from(n % 17),
                    u32::from(n % 5),
                    f64::from(n % 7) + 1.0,
                    f64::from(n % 11),
                )
            })
            .collect();
        let w = Weights::default();
        let full = rank(&cands, &w);
        for k in [1, 2, 3, 10, 200, 500] {
            assert_eq!(
                best(&cands, &w, k),
                full[..k.min(full.len())].to_vec(),
                "k = {k}"
            );
        }
        let mut rev = cands.clone();
        rev.reverse();
        assert_eq!(best(&rev, &w, 3), best(&cands, &w, 3));
    }

    #[test]
    fn a_cache_hit_adds_its_weight_and_leaves_the_rest_alone() {
        let w = Weights::default();
        let plain = cand(1, 100, 4, 1.0, 50.0);
        let mut hit = cand(2, 100, 4, 1.0, 50.0);
        hit.cache_hit = true;
        let r = rank(&[plain, hit], &w);
        assert_eq!(r[0].node, NodeId([2; 32]));
        assert!((r[0].score - (1.0 + w.cache)).abs() < 1e-12);
        assert!((r[1].score - 1.0).abs() < 1e-12);
        assert!(Weights { cache: -0.1, ..w }.check().is_err());
    }
}
