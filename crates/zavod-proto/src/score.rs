//! MCDA scoring and the final pick.
//!
//! Every node computes the same ranking from the same view: scores are pure
//! functions of the candidates, ties break by node id, and the final pick
//! among the best few is keyed on the request id (two choices drawn by a
//! hash of it, the less loaded wins), so load spreads when views are stale
//! and a replayed request picks the same node.

use crate::ids::{NodeId, RequestId};
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
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            free_memory: 0.4,
            free_slots: 0.3,
            rtt: 0.2,
            tokens_per_s: 0.1,
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
        for (name, w) in all {
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
fn score_where(cands: &[Candidate], w: &Weights, keep: Option<&[bool]>) -> Vec<Scored> {
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
                    + k_tps * finite_or_zero(c.tokens_per_s),
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

/// Picks among the best `top_k` of a ranking: two distinct candidates drawn
/// by a hash of the request id, and of those the one with more free slots
/// (then the higher score). `None` only when the ranking is empty.
/// The whole placement decision, as every node and the simulator make it:
/// drop excluded and unroutable candidates (open breakers), rank the rest,
/// and pick among the best `top_k` by the request id.
pub fn place(
    candidates: &[Candidate],
    exclude: &[NodeId],
    mut routable: impl FnMut(&NodeId) -> bool,
    weights: &Weights,
    top_k: usize,
    request: RequestId,
) -> Option<Scored> {
    let keep: Vec<bool> = candidates
        .iter()
        .map(|c| !exclude.contains(&c.node) && routable(&c.node))
        .collect();
    // Equal scores are ordered by a hash of node and request rather than by
    // node id: every node still orders them the same for a given request,
    // but different requests see different orders, so entries working from
    // the same stale figures do not all fall on the same node.
    let salt = splitmix64(request.0 as u64 ^ splitmix64((request.0 >> 64) as u64));
    let key = |s: &Scored| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&s.node.0[..8]);
        splitmix64(u64::from_le_bytes(b) ^ salt)
    };
    let mut out = score_where(candidates, weights, Some(&keep));
    let k = top_k.max(1);
    // The hash only breaks ties, so it is computed only for them.
    let order = |a: &Scored, b: &Scored| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| key(a).cmp(&key(b)))
    };
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, order);
        out.truncate(k);
    }
    out.sort_by(order);
    pick(&out, request, top_k)
}

pub fn pick(ranked: &[Scored], request: RequestId, top_k: usize) -> Option<Scored> {
    let k = top_k.max(1).min(ranked.len());
    match k {
        0 => None,
        1 => ranked.first().copied(),
        _ => {
            let h = splitmix64(request.0 as u64 ^ splitmix64((request.0 >> 64) as u64));
            let i = (h % k as u64) as usize;
            let j_off = 1 + (splitmix64(h) % (k as u64 - 1)) as usize;
            let j = (i + j_off) % k;
            let (a, b) = (ranked[i], ranked[j]);
            let a_first = (a.slots_free, a.score.to_bits()) >= (b.slots_free, b.score.to_bits())
                && !(a.slots_free == b.slots_free && b.score > a.score);
            Some(if a_first { a } else { b })
        }
    }
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
                tokens_per_s: 0.0
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
        };
        let slot_heavy = Weights {
            free_memory: 0.0,
            free_slots: 1.0,
            rtt: 0.0,
            tokens_per_s: 0.0,
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
    fn pick_is_deterministic_and_spreads_load() {
        let ranked: Vec<Scored> = (0..4u8)
            .map(|n| Scored {
                node: NodeId([n; 32]),
                score: 1.0 - f64::from(n) * 0.01,
                slots_free: 4,
            })
            .collect();
        let mut counts = [0u32; 4];
        for id in 0..10_000u128 {
            let p = pick(&ranked, RequestId(id), 3).expect("non-empty");
            assert_eq!(
                Some(p),
                pick(&ranked, RequestId(id), 3),
                "replay picks the same"
            );
            counts[p.node.0[0] as usize] += 1;
        }
        // With equal slots the better score of the pair wins: node 0 wins
        // whenever drawn, node 1 against node 2, node 2 never; node 3 is
        // outside the top 3.
        assert_eq!(counts[3], 0);
        assert_eq!(counts[2], 0);
        assert!(counts[0] > 5_000 && counts[1] > 2_500, "{counts:?}");
    }

    #[test]
    fn pick_prefers_the_less_loaded_of_the_pair() {
        let ranked = vec![
            Scored {
                node: NodeId([0; 32]),
                score: 0.9,
                slots_free: 0,
            },
            Scored {
                node: NodeId([1; 32]),
                score: 0.8,
                slots_free: 3,
            },
        ];
        for id in 0..100u128 {
            assert_eq!(
                pick(&ranked, RequestId(id), 2).map(|s| s.node),
                Some(NodeId([1; 32]))
            );
        }
        assert_eq!(pick(&[], RequestId(1), 2), None);
        assert_eq!(
            pick(&ranked, RequestId(1), 1).map(|s| s.node),
            Some(NodeId([0; 32]))
        );
    }

    #[test]
    fn place_skips_excluded_and_unroutable_nodes_and_spreads_ties() {
        let w = Weights::default();
        let all: Vec<Candidate> = (1..=6).map(|n| cand(n, 8 << 30, 4, 5.0, 50.0)).collect();
        let (excluded, open) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut chosen = std::collections::BTreeSet::new();
        for r in 0..200u128 {
            let c = place(&all, &[excluded], |n| *n != open, &w, 4, RequestId(r)).expect("a node");
            assert!(c.node != excluded && c.node != open);
            // The same request is placed the same way again.
            let again = place(&all, &[excluded], |n| *n != open, &w, 4, RequestId(r));
            assert_eq!(again.map(|s| s.node), Some(c.node));
            chosen.insert(c.node);
        }
        // Equal candidates: different requests land on different nodes.
        assert!(chosen.len() >= 3, "{chosen:?}");
        // A backlog ranks below free room.
        let mut busy = cand(7, 8 << 30, 0, 5.0, 50.0);
        busy.queue_depth = 3;
        let idle = cand(8, 8 << 30, 0, 5.0, 50.0);
        let c = place(&[busy, idle.clone()], &[], |_| true, &w, 1, RequestId(1)).expect("a node");
        assert_eq!(c.node, idle.node);
        assert!(place(&all, &[], |_| false, &w, 2, RequestId(1)).is_none());
    }
}
