//! The placement decision an entry makes for every request, and the little
//! it must remember to make it well: its own placements still running.
//!
//! Gossip tells an entry how busy each node was when it last reported, up
//! to a heartbeat ago. Entries that trust those figures alone herd: every
//! entry sees the same node as least busy and sends it everything until its
//! next report. So the [`Placer`] estimates a node's load as what the node
//! reported, minus this entry's own requests the report already counted,
//! plus this entry's requests running there now. Its own share is exact
//! and current; only the other entries' share is stale. Each entry thus
//! spreads its own requests evenly, and a sum of even spreads is even.
//! Requests an entry placed on a node that has died pile up in its count
//! (they never finish), so a dead node stops drawing new requests long
//! before gossip declares it gone.
//!
//! The pick is two choices: two candidates drawn at random, weighted by
//! their MCDA score, from the best `pool` of them; the one less loaded (by
//! that estimate, as a fraction of its slots) wins. A request whose prompt
//! a node holds cached (its capacity report's summary says so, or this
//! entry sent the same prompt opening there last) makes that node the first
//! choice, and it wins unless it is busier than the drawn alternative by
//! more than `cache_slack` of its slots: a cache hit saves the whole
//! prefill of a conversation, a short queue costs less. This node itself,
//! when it serves the model, is the first choice otherwise, with
//! `local_slack`: its figures are current, running here needs no hop, and
//! an answer run here depends on one node where one run elsewhere depends
//! on two (a crash of either interrupts it). With the default slack of a
//! whole node's slots it keeps every request it has a free slot for; once
//! it is full its worker turns the run away and the request goes on.
//!
//! Everything is a pure function of the candidates, the request id and what
//! the placer was told, so the simulator replays it exactly.
//!
//! Invariants: the placer remembers at most [`MAX_PLACEMENTS_REMEMBERED`]
//! placements, each forgotten by `until_ms` at the latest even if no one
//! reports it done; counts never go below zero.
//!
//! Why this file passes 600 lines: the placement rule and the load estimates
//! it reads are one decision; over a third is tests.

use crate::UnixMs;
use crate::ids::{NodeId, RequestId};
use crate::limits::MAX_PLACEMENTS_REMEMBERED;
use crate::mesh::score::{Candidate, Scored, Weights, score_where, splitmix64};
use std::collections::{BTreeMap, BTreeSet};

/// A report this many heartbeats old is overdue.
pub const OVERDUE_FACTOR: f64 = 1.25;

/// How an entry picks among candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacerConfig {
    pub weights: Weights,
    /// The two choices are drawn from this many of the best-scored
    /// candidates; 1 is plain argmax, 0 draws from all.
    pub pool: usize,
    /// How many candidates are drawn; the least loaded of them wins.
    pub choices: usize,
    /// How often nodes report at the least (the gossip heartbeat); a node
    /// silent for more than [`OVERDUE_FACTOR`] times this is passed over
    /// while others are not, as it may have died. 0 disables this.
    pub report_every_ms: u64,
    /// This node keeps a request it can serve itself while its load (as a
    /// fraction of its slots) is at most this much above the drawn
    /// alternative's (1.0: while it has a free slot at all).
    pub local_slack: f64,
    /// A node holding the request's prompt cache keeps it while its load
    /// (as a fraction of its slots) is at most this much above the drawn
    /// alternative's.
    pub cache_slack: f64,
}

impl Default for PlacerConfig {
    fn default() -> Self {
        PlacerConfig {
            weights: Weights::default(),
            pool: 0,
            choices: 2,
            report_every_ms: 0,
            local_slack: 1.0,
            cache_slack: 0.5,
        }
    }
}

/// One request to place.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub request: RequestId,
    /// Nodes that already failed this request.
    pub exclude: &'a [NodeId],
    /// Nodes that turned this request away as full: chosen only when no
    /// other is left.
    pub avoid: &'a [NodeId],
    /// When the placement counts as over even if nobody says so.
    pub until_ms: UnixMs,
    /// The prompt's affinity key: where this entry last sent it, the cache
    /// is (even before that node's report says so).
    pub cache_key: Option<u64>,
}

/// Affinity keys an entry remembers the node of, at most.
pub const MAX_REMEMBERED_KEYS: usize = 4_096;

/// The placer's pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub node: NodeId,
    pub score: f64,
    /// Whether the node holds the request's prompt cache.
    pub cache_hit: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    /// This entry's requests on the node now.
    mine: u32,
    /// How many of them there were when the node's last report arrived
    /// (so the report counted them).
    at_report: u32,
}

/// An entry's placement memory. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct Placer {
    /// Running placements: node, when placed, until when remembered.
    placed: BTreeMap<RequestId, (NodeId, UnixMs, UnixMs)>,
    deadlines: BTreeSet<(UnixMs, RequestId)>,
    counts: BTreeMap<NodeId, Counts>,
    /// How long this entry's placements run, on average (0: none ended yet).
    hold_ms: f64,
    /// Nodes that failed a request since their last report.
    failed: BTreeSet<NodeId>,
    /// Where this entry last placed each affinity key, and when (a
    /// counter, for forgetting the oldest).
    keys: BTreeMap<u64, (NodeId, u64)>,
    key_order: BTreeMap<u64, u64>,
    key_tick: u64,
}

impl Placer {
    pub fn new() -> Self {
        Placer::default()
    }

    /// A fresh report from `node` arrived (or, for this node itself, fresh
    /// load figures): it counts this entry's requests running there now.
    pub fn on_report(&mut self, node: &NodeId) {
        self.failed.remove(node);
        if let Some(c) = self.counts.get_mut(node) {
            c.at_report = c.mine;
            if c.mine == 0 {
                self.counts.remove(node);
            }
        }
    }

    /// `node` failed a request this entry placed (it stalled, broke the
    /// stream, or could not be reached): it is passed over while others
    /// are not, until it reports again. A node that crashed stays passed
    /// over until it is back; one that only hiccuped, for a heartbeat.
    pub fn on_failure(&mut self, node: &NodeId) {
        if self.failed.len() < MAX_PLACEMENTS_REMEMBERED {
            self.failed.insert(*node);
        }
    }

    /// A placement ended (answered, failed, or abandoned).
    pub fn on_done(&mut self, request: RequestId, now_ms: UnixMs) {
        let Some((node, at, until)) = self.placed.remove(&request) else {
            return;
        };
        self.deadlines.remove(&(until, request));
        if now_ms < until {
            let held = now_ms.saturating_sub(at) as f64;
            self.hold_ms = if self.hold_ms == 0.0 {
                held.max(1.0)
            } else {
                0.9 * self.hold_ms + 0.1 * held
            };
        }
        if let Some(c) = self.counts.get_mut(&node) {
            // Whether or not the last report counted it, the estimate drops
            // by one: `at_report` still cancels what the report counted.
            c.mine = c.mine.saturating_sub(1);
            if c.mine == 0 && c.at_report == 0 {
                self.counts.remove(&node);
            }
        }
    }

    /// This entry's requests running on `node`.
    pub fn in_flight(&self, node: &NodeId) -> u32 {
        self.counts.get(node).map_or(0, |c| c.mine)
    }

    /// Placements remembered now.
    pub fn remembered(&self) -> usize {
        self.placed.len()
    }

    /// Forgets placements past their time.
    pub fn expire(&mut self, now_ms: UnixMs) {
        while let Some(&(until, request)) = self.deadlines.first() {
            if until > now_ms {
                break;
            }
            self.on_done(request, now_ms);
        }
    }

    /// The other entries' load on a candidate as its last report gave it
    /// (this entry's requests the report counted taken out), and this
    /// entry's own load there now.
    fn shares(&self, c: &Candidate) -> (f64, f64) {
        let reported = c
            .slots_total
            .saturating_sub(c.slots_free.min(c.slots_total))
            .saturating_add(c.queue_depth);
        let Counts { mine, at_report } = self.counts.get(&c.node).copied().unwrap_or_default();
        (
            f64::from(reported.saturating_sub(at_report.min(reported))),
            f64::from(mine),
        )
    }

    /// How much of a report's view of other entries' load still holds
    /// after `age_ms`: their requests end over about as long as this
    /// entry's own take, and what replaces them is unknown, so an old
    /// figure says no more than the average does.
    fn trust(&self, age_ms: u64) -> f64 {
        if self.hold_ms <= 0.0 {
            return 1.0;
        }
        (1.0 - age_ms as f64 / self.hold_ms).clamp(0.0, 1.0)
    }

    /// Each candidate's estimated busy slots (running and waiting).
    fn busy(&self, kept: &[&Candidate]) -> Vec<f64> {
        let shares: Vec<(f64, f64)> = kept.iter().map(|c| self.shares(c)).collect();
        let others_mean = shares.iter().map(|s| s.0).sum::<f64>() / shares.len().max(1) as f64;
        kept.iter()
            .zip(shares)
            .map(|(c, (others, mine))| {
                let f = self.trust(c.age_ms);
                others * f + others_mean * (1.0 - f) + mine
            })
            .collect()
    }

    /// Places a request: drops excluded candidates and those `routable`
    /// refuses (open breakers), scores the rest with their estimated load,
    /// and picks by two choices (see the module docs). `None` only when no
    /// candidate is left. The pick is remembered until [`Placer::on_done`]
    /// or `ask.until_ms`.
    pub fn place(
        &mut self,
        candidates: &[Candidate],
        mut routable: impl FnMut(&NodeId) -> bool,
        ask: &Ask<'_>,
        cfg: &PlacerConfig,
        now_ms: UnixMs,
    ) -> Option<Choice> {
        self.expire(now_ms);
        let known = ask
            .cache_key
            .and_then(|k| self.keys.get(&k))
            .map(|(n, _)| *n);
        let marked: Vec<Candidate>;
        let candidates = match known {
            Some(n) if candidates.iter().any(|c| c.node == n && !c.cache_hit) => {
                marked = candidates
                    .iter()
                    .map(|c| {
                        let mut c = c.clone();
                        c.cache_hit |= c.node == n;
                        c
                    })
                    .collect();
                &marked[..]
            }
            _ => candidates,
        };
        let mut kept: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| !ask.exclude.contains(&c.node) && routable(&c.node))
            .collect();
        if kept.is_empty() {
            return None;
        }
        if kept.iter().any(|c| !ask.avoid.contains(&c.node)) {
            kept.retain(|c| !ask.avoid.contains(&c.node));
        }
        // A node that failed since it last reported, or whose heartbeat
        // is overdue, may have died: others first.
        let overdue_ms = (cfg.report_every_ms as f64 * OVERDUE_FACTOR) as u64;
        let doubtful = |c: &Candidate| {
            self.failed.contains(&c.node) || (cfg.report_every_ms > 0 && c.age_ms > overdue_ms)
        };
        if kept.iter().any(|c| !doubtful(c)) {
            kept.retain(|c| !doubtful(c));
        }
        // Candidates as this entry estimates them now.
        let mut adjusted = Vec::with_capacity(kept.len());
        let mut loads = Vec::with_capacity(kept.len());
        for (c, busy) in kept.iter().zip(self.busy(&kept)) {
            let whole = busy.round().max(0.0) as u32;
            let mut a = (*c).clone();
            a.slots_free = c.slots_total.saturating_sub(whole);
            a.queue_depth = whole.saturating_sub(c.slots_total);
            adjusted.push(a);
            loads.push(if c.slots_total == 0 {
                busy + 1.0
            } else {
                busy / f64::from(c.slots_total)
            });
        }
        let scored = score_where(&adjusted, &cfg.weights, None);
        let choice = pick(&scored, &adjusted, &loads, ask.request, cfg);
        self.remember(choice.node, ask, now_ms);
        if let Some(k) = ask.cache_key {
            self.remember_key(k, choice.node);
        }
        Some(choice)
    }

    /// Places a request whose pick must then be confirmed (the breaker
    /// takes a half-open peer's single probe slot): a refused pick is taken
    /// back and the next best tried, each candidate at most once. `None`
    /// when none is left. The simulator calls this; the node, whose
    /// confirmation is a call to its Breaker actor, steps the same
    /// [`Confirming`] itself.
    pub fn place_confirmed(
        &mut self,
        candidates: &[Candidate],
        mut routable: impl FnMut(&NodeId) -> bool,
        mut confirm: impl FnMut(&Choice) -> bool,
        ask: &Ask<'_>,
        cfg: &PlacerConfig,
        now_ms: UnixMs,
    ) -> Option<Choice> {
        let mut confirming = Confirming::default();
        while let Some(choice) = confirming.next(self, candidates, &mut routable, ask, cfg, now_ms)
        {
            if confirm(&choice) {
                return Some(choice);
            }
            confirming.refused(self, &choice, ask, now_ms);
        }
        None
    }

    fn remember_key(&mut self, key: u64, node: NodeId) {
        self.key_tick += 1;
        if let Some((_, old)) = self.keys.insert(key, (node, self.key_tick)) {
            self.key_order.remove(&old);
        }
        self.key_order.insert(self.key_tick, key);
        while self.keys.len() > MAX_REMEMBERED_KEYS {
            let Some((_, oldest)) = self.key_order.pop_first() else {
                break;
            };
            self.keys.remove(&oldest);
        }
    }

    fn remember(&mut self, node: NodeId, ask: &Ask<'_>, now_ms: UnixMs) {
        if self.placed.contains_key(&ask.request) {
            self.on_done(ask.request, now_ms);
        }
        if self.placed.len() >= MAX_PLACEMENTS_REMEMBERED
            && let Some(&(_, oldest)) = self.deadlines.first()
        {
            self.on_done(oldest, now_ms);
        }
        let until = ask.until_ms.max(now_ms.saturating_add(1));
        self.placed.insert(ask.request, (node, now_ms, until));
        self.deadlines.insert((until, ask.request));
        self.counts.entry(node).or_default().mine += 1;
    }
}

/// One request's placement while its picks await confirmation: the nodes
/// whose confirmation refused it. Each refusal removes a candidate, so a
/// loop of [`Confirming::next`] and [`Confirming::refused`] ends.
#[derive(Debug, Default)]
pub struct Confirming {
    refused: Vec<NodeId>,
}

impl Confirming {
    /// The best pick not yet refused, counted as running there.
    pub fn next(
        &mut self,
        placer: &mut Placer,
        candidates: &[Candidate],
        mut routable: impl FnMut(&NodeId) -> bool,
        ask: &Ask<'_>,
        cfg: &PlacerConfig,
        now_ms: UnixMs,
    ) -> Option<Choice> {
        let refused = &self.refused;
        placer.place(
            candidates,
            |n| !refused.contains(n) && routable(n),
            ask,
            cfg,
            now_ms,
        )
    }

    /// `choice` was refused: the placer no longer counts the request on it,
    /// and it is not picked again for this request.
    pub fn refused(&mut self, placer: &mut Placer, choice: &Choice, ask: &Ask<'_>, now_ms: UnixMs) {
        placer.on_done(ask.request, now_ms);
        self.refused.push(choice.node);
    }
}

/// Best first, ties broken by a hash of node and request: every node orders
/// a request's candidates the same way, different requests differently.
fn order(scored: &[Scored], request: RequestId) -> Vec<usize> {
    let salt = request_hash(request);
    let key = |s: &Scored| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&s.node.0[..8]);
        splitmix64(u64::from_le_bytes(b) ^ salt)
    };
    let mut idx: Vec<usize> = (0..scored.len()).collect();
    idx.sort_by(|&a, &b| {
        scored[b]
            .score
            .total_cmp(&scored[a].score)
            .then_with(|| key(&scored[a]).cmp(&key(&scored[b])))
    });
    idx
}

fn request_hash(request: RequestId) -> u64 {
    splitmix64(request.0 as u64 ^ splitmix64((request.0 >> 64) as u64))
}

/// Draws one of `pool` (indices into `scored`), weighted by score, with
/// the random word `r`, never one of `taken` (`None` when all are).
fn draw(scored: &[Scored], pool: &[usize], taken: &[usize], r: u64) -> Option<usize> {
    // Scores go below zero with a backlog: such nodes keep a small chance.
    let weight = |i: usize| scored[i].score.max(0.0) + 0.01;
    let eligible = || pool.iter().copied().filter(|i| !taken.contains(i));
    let total: f64 = eligible().map(weight).sum();
    if !total.is_finite() {
        return eligible().next();
    }
    let mut at = (r >> 11) as f64 / (1u64 << 53) as f64 * total;
    let mut last = None;
    for i in eligible() {
        last = Some(i);
        at -= weight(i);
        if at < 0.0 {
            return Some(i);
        }
    }
    last
}

fn pick(
    scored: &[Scored],
    cands: &[Candidate],
    loads: &[f64],
    request: RequestId,
    cfg: &PlacerConfig,
) -> Choice {
    let ranked = order(scored, request);
    let pool_len = if cfg.pool == 0 {
        ranked.len()
    } else {
        cfg.pool.min(ranked.len())
    };
    let pool = &ranked[..pool_len];
    // The best-scored node holding the prompt's cache, if any, is the
    // first choice; the others are drawn.
    let hit = ranked.iter().copied().find(|&i| cands[i].cache_hit);
    let mut choices: Vec<usize> = hit.into_iter().collect();
    // Else this node itself, when it serves the model: its figures are
    // current, not gossip, and running here needs no hop.
    let local = ranked.iter().copied().find(|&i| cands[i].is_self);
    if choices.is_empty()
        && let Some(i) = local
    {
        choices.push(i);
    }
    let wanted = if pool_len == 1 { 1 } else { cfg.choices.max(1) };
    let mut r = request_hash(request);
    while choices.len() < wanted {
        r = splitmix64(r);
        match draw(scored, pool, &choices, r) {
            Some(i) => choices.push(i),
            None => break,
        }
    }
    if choices.is_empty() {
        choices.push(ranked[0]);
    }
    // The least loaded wins (the cache holder with its slack), then the
    // better file of the model, then the better score, then the earlier
    // choice.
    let load = |i: usize| {
        if Some(i) == hit {
            loads[i] - cfg.cache_slack
        } else if Some(i) == local {
            loads[i] - cfg.local_slack
        } else {
            loads[i]
        }
    };
    let mut best = choices[0];
    for &i in &choices[1..] {
        let (li, lb) = (load(i), load(best));
        let tie = (li - lb).abs() <= 1e-9;
        let (qi, qb) = (cands[i].quality, cands[best].quality);
        if li < lb - 1e-9
            || (tie && qi > qb)
            || (tie && qi == qb && scored[i].score > scored[best].score)
        {
            best = i;
        }
    }
    Choice {
        node: scored[best].node,
        score: scored[best].score,
        cache_hit: cands[best].cache_hit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn cand(n: u8, free: u32, total: u32) -> Candidate {
        Candidate {
            node: node(n),
            mem_free_bytes: 8 << 30,
            slots_free: free,
            slots_total: total,
            queue_depth: 0,
            rtt_ms: Some(5.0),
            tokens_per_s: 50.0,
            cache_hit: false,
            age_ms: 0,
            is_self: false,
            quality: 0,
        }
    }

    fn ask(r: u128) -> Ask<'static> {
        Ask {
            request: RequestId(r),
            exclude: &[],
            avoid: &[],
            until_ms: 60_000,
            cache_key: None,
        }
    }

    fn place(p: &mut Placer, cands: &[Candidate], r: u128) -> NodeId {
        p.place(cands, |_| true, &ask(r), &PlacerConfig::default(), 0)
            .expect("a node")
            .node
    }

    #[test]
    fn among_equally_loaded_nodes_the_better_file_wins() {
        // Two idle nodes serve the model: one a Q8_0 file, one a Q2_K.
        let mut good = cand(1, 4, 4);
        good.quality = crate::mesh::tiers::quality("Q8_0");
        let mut poor = cand(2, 4, 4);
        poor.quality = crate::mesh::tiers::quality("Q2_K");
        let cands = [poor, good];
        for r in 0..50 {
            assert_eq!(place(&mut Placer::new(), &cands, r), node(1), "request {r}");
        }
        // Load still comes first: a busy Q8_0 node loses to an idle Q2_K.
        let mut p = Placer::new();
        let first = place(&mut p, &cands, 0);
        assert_eq!(first, node(1));
        assert_eq!(place(&mut p, &cands, 1), node(2));
    }

    #[test]
    fn a_node_that_was_full_is_chosen_only_when_no_other_is_left() {
        let cands = [cand(1, 4, 4), cand(2, 0, 4), cand(3, 4, 4)];
        let avoid = [node(1), node(3)];
        let mut a = ask(7);
        a.avoid = &avoid;
        let cfg = PlacerConfig::default();
        let chosen = Placer::new().place(&cands, |_| true, &a, &cfg, 0);
        assert_eq!(
            chosen.map(|c| c.node),
            Some(node(2)),
            "the busy one, not full"
        );
        let chosen = Placer::new().place(&cands, |n| *n != node(2), &a, &cfg, 0);
        assert!(
            chosen.is_some_and(|c| avoid.contains(&c.node)),
            "an avoided node rather than none"
        );
    }

    #[test]
    fn a_refused_pick_is_taken_back_and_the_next_one_tried() {
        let cands = [cand(1, 4, 4), cand(2, 4, 4), cand(3, 4, 4)];
        let cfg = PlacerConfig::default();
        let mut p = Placer::new();
        let mut asked = Vec::new();
        // The first pick's probe slot is taken: the second is confirmed.
        let chosen = p.place_confirmed(
            &cands,
            |_| true,
            |c| {
                asked.push(c.node);
                asked.len() > 1
            },
            &ask(1),
            &cfg,
            0,
        );
        assert_eq!(asked.len(), 2);
        assert_ne!(asked[0], asked[1], "a refused node is not picked again");
        assert_eq!(chosen.map(|c| c.node), Some(asked[1]));
        assert_eq!(p.in_flight(&asked[0]), 0, "the refusal was taken back");
        assert_eq!(p.in_flight(&asked[1]), 1);
        // Every pick refused: each node asked once, nothing left counted.
        let mut asked = Vec::new();
        let chosen = p.place_confirmed(
            &cands,
            |_| true,
            |c| {
                asked.push(c.node);
                false
            },
            &ask(2),
            &cfg,
            0,
        );
        assert!(chosen.is_none());
        asked.sort_by_key(|n| n.0);
        assert_eq!(asked, vec![node(1), node(2), node(3)]);
        assert_eq!(p.remembered(), 1, "only request 1's placement");
    }

    #[test]
    fn the_same_request_is_placed_the_same_way() {
        let cands: Vec<Candidate> = (1..=6).map(|n| cand(n, 4, 4)).collect();
        for r in 0..100 {
            assert_eq!(
                place(&mut Placer::new(), &cands, r),
                place(&mut Placer::new(), &cands, r)
            );
        }
    }

    #[test]
    fn an_entry_spreads_its_own_requests_while_reports_are_stale() {
        // Ten nodes reported idle once; nothing is heard after. An entry
        // that trusted the reports alone would send everything to one.
        let cands: Vec<Candidate> = (1..=10).map(|n| cand(n, 4, 4)).collect();
        let mut p = Placer::new();
        for r in 0..40 {
            place(&mut p, &cands, r);
        }
        let counts: Vec<u32> = (1..=10).map(|n| p.in_flight(&node(n))).collect();
        assert_eq!(counts.iter().sum::<u32>(), 40);
        assert!(counts.iter().all(|c| (2..=6).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_report_that_counted_this_entrys_requests_does_not_count_them_twice() {
        let mut p = Placer::new();
        let busy = |p: &Placer, c: &Candidate| {
            let (others, mine) = p.shares(c);
            others + mine
        };
        let one = [cand(1, 4, 4)];
        for r in 0..3 {
            place(&mut p, &one, r);
        }
        assert_eq!(busy(&p, &one[0]), 3.0);
        // The node reports its three jobs: still three, not six.
        p.on_report(&node(1));
        let reported = cand(1, 1, 4);
        assert_eq!(busy(&p, &reported), 3.0);
        // One of them ends: two, though the report still says three.
        p.on_done(RequestId(0), 10);
        assert_eq!(busy(&p, &reported), 2.0);
        // Another entry's job shows up in the next report.
        p.on_report(&node(1));
        assert_eq!(busy(&p, &cand(1, 1, 4)), 3.0);
    }

    #[test]
    fn old_reports_of_other_entries_load_count_as_the_average() {
        let mut p = Placer::new();
        let cands = [cand(1, 4, 4), cand(2, 4, 4)];
        // Learn that placements last about a second.
        place(&mut p, &cands, 1);
        p.on_done(RequestId(1), 1_000);
        assert_eq!(p.trust(0), 1.0);
        assert_eq!(p.trust(500), 0.5);
        assert_eq!(p.trust(5_000), 0.0);
        // Node 1 reported full five seconds ago, node 2 idle and node 3
        // half busy just now: node 1's old figure says no more than the
        // average; half an hold ago, it is halfway there.
        let mut full = cand(1, 0, 4);
        full.age_ms = 5_000;
        let (idle, half) = (cand(2, 4, 4), cand(3, 2, 4));
        let busy = p.busy(&[&full, &idle, &half]);
        assert_eq!(busy, vec![2.0, 0.0, 2.0]);
        full.age_ms = 500;
        assert_eq!(p.busy(&[&full, &idle, &half])[0], 3.0);
    }

    #[test]
    fn placements_nobody_ends_are_forgotten_in_time() {
        let mut p = Placer::new();
        let cfg = PlacerConfig::default();
        let cands = [cand(1, 4, 4)];
        let a = Ask {
            until_ms: 1_000,
            ..ask(1)
        };
        p.place(&cands, |_| true, &a, &cfg, 0);
        assert_eq!(p.in_flight(&node(1)), 1);
        p.expire(999);
        assert_eq!(p.in_flight(&node(1)), 1);
        p.expire(1_000);
        assert_eq!((p.in_flight(&node(1)), p.remembered()), (0, 0));
        // Ending a request twice, or one never placed, changes nothing.
        p.on_done(RequestId(1), 2_000);
        p.on_done(RequestId(77), 2_000);
        assert_eq!(p.remembered(), 0);
    }

    #[test]
    fn the_cache_holder_wins_unless_much_busier() {
        let cfg = PlacerConfig::default();
        let mut holder = cand(1, 2, 4);
        holder.cache_hit = true;
        let mut all = vec![holder.clone()];
        all.extend((2..=5).map(|n| cand(n, 4, 4)));
        for r in 0..50 {
            let c = Placer::new()
                .place(&all, |_| true, &ask(r), &cfg, 0)
                .expect("a node");
            // Half its slots busy against idle alternatives: within slack.
            assert!(c.node == node(1) && c.cache_hit, "request {r}: {c:?}");
        }
        // Full with a queue of two against idle nodes: too busy.
        holder.slots_free = 0;
        holder.queue_depth = 2;
        all[0] = holder;
        for r in 0..50 {
            assert_ne!(place(&mut Placer::new(), &all, r), node(1), "request {r}");
        }
        // An excluded or unroutable holder is not chosen either.
        all[0].queue_depth = 0;
        all[0].slots_free = 4;
        let excluded = [node(1)];
        let a = Ask {
            exclude: &excluded,
            avoid: &[],
            ..ask(3)
        };
        let c = Placer::new().place(&all, |_| true, &a, &cfg, 0);
        assert_ne!(c.map(|c| c.node), Some(node(1)));
        let c = Placer::new().place(&all, |n| *n != node(1), &ask(3), &cfg, 0);
        assert_ne!(c.map(|c| c.node), Some(node(1)));
        assert!(
            Placer::new()
                .place(&all, |_| false, &ask(3), &cfg, 0)
                .is_none()
        );
    }

    #[test]
    fn an_entry_sends_a_conversation_back_where_it_sent_it_before_gossip_says() {
        let cands: Vec<Candidate> = (1..=6).map(|n| cand(n, 4, 4)).collect();
        let mut p = Placer::new();
        let turn = |r: u128| Ask {
            cache_key: Some(77),
            ..ask(r)
        };
        let cfg = PlacerConfig::default();
        let first = p
            .place(&cands, |_| true, &turn(1), &cfg, 0)
            .expect("a node");
        for r in 2..20 {
            let c = p
                .place(&cands, |_| true, &turn(r), &cfg, 0)
                .expect("a node");
            assert_eq!(c.node, first.node, "turn {r}");
            assert!(c.cache_hit);
            p.on_done(RequestId(r), 1);
        }
        // Another conversation is placed on its own merits.
        let other = Ask {
            cache_key: Some(78),
            ..ask(100)
        };
        let c = p.place(&cands, |_| true, &other, &cfg, 0).expect("a node");
        assert!(!c.cache_hit);
    }

    #[test]
    fn a_node_serving_the_model_keeps_what_it_can_take() {
        let mut me = cand(1, 3, 4);
        me.is_self = true;
        let mut all = vec![me];
        all.extend((2..=5).map(|n| cand(n, 4, 4)));
        // A quarter of its slots busy against idle peers: it keeps them.
        for r in 0..50 {
            assert_eq!(place(&mut Placer::new(), &all, r), node(1));
        }
        // Full: the requests go to peers.
        all[0].slots_free = 0;
        for r in 0..50 {
            assert_ne!(place(&mut Placer::new(), &all, r), node(1));
        }
    }

    #[test]
    fn a_dead_node_stops_drawing_requests() {
        // Node 1 died after reporting idle: its requests never end, so its
        // count grows and the others take the load.
        let cands: Vec<Candidate> = (1..=4).map(|n| cand(n, 4, 4)).collect();
        let mut p = Placer::new();
        let mut on_dead = 0;
        for r in 0..200 {
            if place(&mut p, &cands, r) == node(1) {
                on_dead += 1;
            } else {
                p.on_done(RequestId(r), 0);
            }
        }
        assert!(on_dead <= 8, "{on_dead} of 200 went to the dead node");
    }

    #[test]
    fn overdue_and_failed_nodes_are_passed_over_while_others_are_not() {
        let cfg = PlacerConfig {
            report_every_ms: 1_000,
            ..PlacerConfig::default()
        };
        let mut silent = cand(1, 4, 4);
        silent.age_ms = 1_300;
        let all = [silent, cand(2, 4, 4), cand(3, 4, 4)];
        let mut p = Placer::new();
        p.on_failure(&node(2));
        for r in 0..50 {
            let c = p.place(&all, |_| true, &ask(r), &cfg, 0).expect("a node");
            assert_eq!(c.node, node(3));
        }
        // A fresh report clears the failure; overdue nodes are still
        // taken when nothing else is left.
        p.on_report(&node(2));
        let c = p.place(&all[..2], |_| true, &ask(99), &cfg, 0);
        assert_eq!(c.map(|c| c.node), Some(node(2)));
        let c = p.place(&all[..1], |_| true, &ask(100), &cfg, 0);
        assert_eq!(c.map(|c| c.node), Some(node(1)));
    }

    #[test]
    fn argmax_takes_the_best() {
        let cfg = PlacerConfig {
            pool: 1,
            ..PlacerConfig::default()
        };
        let cands = [cand(1, 1, 4), cand(2, 4, 4), cand(3, 2, 4)];
        for r in 0..20 {
            let c = Placer::new().place(&cands, |_| true, &ask(r), &cfg, 0);
            assert_eq!(c.map(|c| c.node), Some(node(2)));
        }
    }
}
