//! Which KV-cache sequence a new prompt runs in, and how much of it is
//! already computed: the engine's prompt cache, as pure bookkeeping.
//!
//! A llama.cpp context holds `slots` sequences. When a request ends, its
//! sequence is not cleared: it keeps the prompt and the answer's tokens,
//! so the next prompt that starts with them (a conversation's next turn,
//! or any prompt sharing a prefix) prefills only the rest. When a slot
//! whose cache is worth keeping must be reused for another prompt, its
//! state may be saved to memory (llama.cpp's sequence state) within a byte
//! budget, least recently used first out, and restored into a slot later.
//!
//! This module decides; the engine thread carries the decisions out on the
//! llama.cpp context and reports back (for instance the size of a saved
//! state). Nothing here touches llama.cpp, so every rule is unit-tested.
//!
//! Invariants: a slot that is running a request is never chosen; a cached
//! prefix is reused only within its tag's partition (unless sharing is on);
//! at least one prompt token is always left to compute (its logits start
//! the answer); saved states never exceed the budget.

use std::collections::BTreeMap;

/// Whose cache it is and what it is known by in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheTag {
    /// Prompts are reused only within one partition (a credential), so no
    /// one can learn another's prompts from how fast theirs start.
    pub partition: u64,
    /// The prompt's affinity key (`zavod_proto::chat::prompt::affinity_key`),
    /// reported to the mesh so conversations return here.
    pub key: u64,
}

/// Prefixes shorter than this are not worth saving to memory.
pub const MIN_SAVED_TOKENS: usize = 64;
/// Saved states kept at most, whatever their size.
pub const MAX_SAVED: usize = 1_024;

/// What the engine should do to start a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The sequence (slot) to run in.
    pub seq: usize,
    /// Save the slot's current content first (it is worth keeping and is
    /// about to be replaced).
    pub save_first: bool,
    /// Load this saved state into the slot (it holds a longer prefix than
    /// any slot does).
    pub restore: Option<u64>,
    /// Tokens of the cache to keep; the prompt's rest is prefilled. 0 means
    /// the slot starts empty.
    pub reuse: usize,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    busy: bool,
    /// Tokens whose keys and values the sequence holds, from position 0.
    tokens: Vec<i32>,
    tag: CacheTag,
    last_used: u64,
}

#[derive(Debug, Clone)]
struct Saved {
    tokens: Vec<i32>,
    tag: CacheTag,
    bytes: u64,
    last_used: u64,
}

/// The engine's prompt cache. See the module docs.
#[derive(Debug, Clone)]
pub struct PromptCache {
    slots: Vec<Slot>,
    saved: BTreeMap<u64, Saved>,
    saved_bytes: u64,
    budget_bytes: u64,
    /// Reuse identical prefixes across partitions.
    share: bool,
    /// Logical clock for least-recently-used order.
    tick: u64,
    next_id: u64,
    /// Off: every prompt starts in an empty slot, nothing is kept.
    enabled: bool,
}

fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PromptCache {
    pub fn new(slots: usize, budget_bytes: u64, share: bool, enabled: bool) -> Self {
        PromptCache {
            slots: vec![Slot::default(); slots],
            saved: BTreeMap::new(),
            saved_bytes: 0,
            budget_bytes,
            share,
            tick: 0,
            next_id: 1,
            enabled,
        }
    }

    fn visible(&self, owner: &CacheTag, tag: &CacheTag) -> bool {
        self.share || owner.partition == tag.partition
    }

    /// Whether a slot is free for a new prompt.
    pub fn has_idle(&self) -> bool {
        self.slots.iter().any(|s| !s.busy)
    }

    /// Plans where `prompt` runs; `None` when every slot is busy. The slot
    /// is marked busy; [`PromptCache::release`] or
    /// [`PromptCache::discard`] ends that.
    pub fn plan(&mut self, tag: CacheTag, prompt: &[i32]) -> Option<Plan> {
        self.tick += 1;
        // At least the last prompt token is computed: its logits start the
        // answer.
        let usable = |n: usize| n.min(prompt.len().saturating_sub(1));
        let matched = |s: &Slot| {
            if self.enabled && self.visible(&tag, &s.tag) {
                usable(common_prefix(&s.tokens, prompt))
            } else {
                0
            }
        };
        // A slot this prompt continues: it shares at least half of what the
        // slot holds (a conversation's next turn shares all of it). A slot
        // sharing only a little (the chat template's opening) is not taken
        // over, or the rest of its cache would be lost for nothing.
        let continued = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .map(|(i, s)| (matched(s), i, s.tokens.len()))
            .filter(|&(n, _, len)| n > 0 && n * 2 >= len)
            .max_by_key(|&(n, i, _)| (n, std::cmp::Reverse(i)));
        let in_saved = self
            .saved
            .iter()
            .filter(|(_, s)| self.enabled && self.visible(&tag, &s.tag))
            .map(|(id, s)| (usable(common_prefix(&s.tokens, prompt)), *id))
            .max_by_key(|&(n, id)| (n, std::cmp::Reverse(id)));
        let best_slot = continued.map_or(0, |(n, _, _)| n);
        let plan = match (continued, in_saved) {
            (_, Some((n, id))) if n > best_slot && n > 0 => {
                let seq = self.victim()?;
                Plan {
                    seq,
                    save_first: self.worth_saving(seq),
                    restore: Some(id),
                    reuse: n,
                }
            }
            (Some((n, seq, _)), _) => Plan {
                seq,
                save_first: false,
                restore: None,
                reuse: n,
            },
            _ => {
                let seq = self.victim()?;
                Plan {
                    seq,
                    save_first: self.worth_saving(seq),
                    restore: None,
                    // What the replaced content shares (saved first when
                    // worth keeping) is still reused.
                    reuse: matched(&self.slots[seq]),
                }
            }
        };
        let s = &mut self.slots[plan.seq];
        s.busy = true;
        s.tag = tag;
        s.last_used = self.tick;
        Some(plan)
    }

    /// The idle slot to give a new prompt: an empty one (the lowest, so
    /// running sequences stay together), else the least recently used.
    fn victim(&self) -> Option<usize> {
        let idle = self.slots.iter().enumerate().filter(|(_, s)| !s.busy);
        idle.clone()
            .find(|(_, s)| s.tokens.is_empty())
            .or_else(|| idle.min_by_key(|(i, s)| (s.last_used, *i)))
            .map(|(i, _)| i)
    }

    fn worth_saving(&self, seq: usize) -> bool {
        self.enabled && self.budget_bytes > 0 && self.slots[seq].tokens.len() >= MIN_SAVED_TOKENS
    }

    /// The tokens a slot holds (what [`Plan::save_first`] saves).
    pub fn slot_tokens(&self, seq: usize) -> &[i32] {
        self.slots.get(seq).map_or(&[], |s| &s.tokens)
    }

    /// A slot's content was saved as a state of `bytes`: keep it, then
    /// drop the least recently used saved states over the budget. Returns
    /// the id of the new state (`None` when it alone is over the budget)
    /// and the ids to free.
    pub fn saved(&mut self, seq: usize, bytes: u64) -> (Option<u64>, Vec<u64>) {
        let Some(slot) = self.slots.get(seq) else {
            return (None, Vec::new());
        };
        if bytes > self.budget_bytes {
            return (None, Vec::new());
        }
        let id = self.next_id;
        self.next_id += 1;
        self.saved.insert(
            id,
            Saved {
                tokens: slot.tokens.clone(),
                tag: slot.tag,
                bytes,
                last_used: slot.last_used,
            },
        );
        self.saved_bytes += bytes;
        let mut dropped = Vec::new();
        while self.saved_bytes > self.budget_bytes || self.saved.len() > MAX_SAVED {
            let Some((&oldest, _)) = self.saved.iter().min_by_key(|(id, s)| (s.last_used, **id))
            else {
                break;
            };
            if let Some(s) = self.saved.remove(&oldest) {
                self.saved_bytes -= s.bytes;
            }
            dropped.push(oldest);
        }
        let kept = self.saved.contains_key(&id).then_some(id);
        (kept, dropped)
    }

    /// A saved state was loaded into `seq` (it now lives there; the saved
    /// copy is dropped).
    pub fn restored(&mut self, seq: usize, id: u64) {
        if let Some(s) = self.saved.remove(&id) {
            self.saved_bytes -= s.bytes;
            if let Some(slot) = self.slots.get_mut(seq) {
                slot.tokens = s.tokens;
            }
        }
    }

    /// Drops a saved state (it failed to load).
    pub fn forget(&mut self, id: u64) {
        if let Some(s) = self.saved.remove(&id) {
            self.saved_bytes -= s.bytes;
        }
    }

    /// The slot now holds the first `keep` tokens of what it held.
    pub fn truncate(&mut self, seq: usize, keep: usize) {
        if let Some(s) = self.slots.get_mut(seq) {
            s.tokens.truncate(keep);
        }
    }

    /// A request ended; its sequence holds `tokens` (prompt and answer as
    /// fed to the model) and stays cached.
    pub fn release(&mut self, seq: usize, tokens: Vec<i32>) {
        self.tick += 1;
        if let Some(s) = self.slots.get_mut(seq) {
            s.busy = false;
            s.last_used = self.tick;
            s.tokens = if self.enabled { tokens } else { Vec::new() };
        }
    }

    /// A request ended and its sequence was cleared (a failure, or a cache
    /// not worth keeping).
    pub fn discard(&mut self, seq: usize) {
        if let Some(s) = self.slots.get_mut(seq) {
            s.busy = false;
            s.tokens.clear();
        }
    }

    /// Affinity keys of what is cached, most recently used first, at most
    /// `max`.
    pub fn keys(&self, max: usize) -> Vec<u64> {
        let mut all: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|s| !s.tokens.is_empty() || s.busy)
            .map(|s| (s.last_used, s.tag.key))
            .chain(self.saved.values().map(|s| (s.last_used, s.tag.key)))
            .collect();
        all.sort_by(|a, b| b.cmp(a));
        let mut keys: Vec<u64> = Vec::with_capacity(max.min(all.len()));
        for (_, k) in all {
            if keys.len() >= max {
                break;
            }
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys
    }

    /// Bytes of saved states held now.
    pub fn saved_bytes(&self) -> u64 {
        self.saved_bytes
    }

    /// Saved states held now.
    pub fn saved_count(&self) -> usize {
        self.saved.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(p: u64) -> CacheTag {
        CacheTag {
            partition: p,
            key: p * 100,
        }
    }

    fn toks(r: std::ops::Range<i32>) -> Vec<i32> {
        r.collect()
    }

    #[test]
    fn a_conversations_next_turn_reuses_its_slot() {
        let mut c = PromptCache::new(2, 0, false, true);
        let first = toks(0..100);
        let p = c.plan(tag(1), &first).expect("a slot");
        assert_eq!(
            (p.seq, p.reuse, p.restore, p.save_first),
            (0, 0, None, false)
        );
        // Prompt and answer are in the cache now.
        c.release(0, toks(0..130));
        let next = toks(0..160);
        let p = c.plan(tag(1), &next).expect("a slot");
        assert_eq!((p.seq, p.reuse), (0, 130));
        c.release(0, toks(0..170));
        // The same prompt again: all but its last token.
        let p = c.plan(tag(1), &toks(0..170)).expect("a slot");
        assert_eq!(p.reuse, 169);
    }

    #[test]
    fn other_partitions_do_not_see_a_prefix_unless_shared() {
        let mut c = PromptCache::new(2, 0, false, true);
        c.plan(tag(1), &toks(0..100));
        c.release(0, toks(0..100));
        let p = c.plan(tag(2), &toks(0..120)).expect("a slot");
        assert_eq!((p.seq, p.reuse), (1, 0));
        let mut shared = PromptCache::new(2, 0, true, true);
        shared.plan(tag(1), &toks(0..100));
        shared.release(0, toks(0..100));
        let p = shared.plan(tag(2), &toks(0..120)).expect("a slot");
        assert_eq!((p.seq, p.reuse), (0, 100));
    }

    #[test]
    fn busy_slots_are_never_chosen_and_a_full_cache_says_so() {
        let mut c = PromptCache::new(2, 0, false, true);
        assert!(c.plan(tag(1), &toks(0..10)).is_some());
        assert!(c.plan(tag(1), &toks(0..10)).is_some());
        assert!(!c.has_idle());
        assert!(c.plan(tag(1), &toks(0..10)).is_none());
        c.discard(1);
        assert_eq!(c.plan(tag(1), &toks(0..10)).map(|p| p.seq), Some(1));
    }

    #[test]
    fn evicted_prefixes_are_saved_within_the_budget_and_restored() {
        let mut c = PromptCache::new(1, 1_000, false, true);
        let a = toks(0..100);
        let b = toks(1_000..1_100);
        c.plan(tag(1), &a);
        c.release(0, a.clone());
        // B needs the only slot: A's content is saved first.
        let p = c.plan(tag(1), &b).expect("a slot");
        assert_eq!((p.seq, p.save_first, p.reuse), (0, true, 0));
        let (id, dropped) = c.saved(0, 600);
        let id = id.expect("within budget");
        assert!(dropped.is_empty());
        c.release(0, b.clone());
        // A's next turn: restored from memory, and B saved in its place.
        let mut a2 = a.clone();
        a2.extend(200..220);
        let p = c.plan(tag(1), &a2).expect("a slot");
        assert_eq!(
            (p.seq, p.save_first, p.restore, p.reuse),
            (0, true, Some(id), 100)
        );
        // B's state does not fit beside A's: A's (older) goes.
        let (b_id, dropped) = c.saved(0, 600);
        assert!(b_id.is_some());
        assert_eq!(dropped, vec![id]);
        assert_eq!(c.saved_bytes(), 600);
        // A state larger than the whole budget is not kept.
        assert_eq!(c.saved(0, 5_000), (None, Vec::new()));
    }

    #[test]
    fn a_slot_sharing_only_an_opening_is_not_taken_over() {
        // Two conversations start with the same few template tokens.
        let mut c = PromptCache::new(2, 1_000, false, true);
        let mut a = vec![1, 2, 3];
        a.extend(100..200);
        let mut b = vec![1, 2, 3];
        b.extend(500..520);
        c.plan(tag(1), &a);
        c.release(0, a.clone());
        // B goes to the empty slot, and A's cache stays whole.
        let p = c.plan(tag(1), &b).expect("a slot");
        assert_eq!((p.seq, p.reuse, p.save_first), (1, 0, false));
        c.release(1, b.clone());
        // With no empty slot, a third conversation replaces the least
        // recently used (A), saving it first, and reuses the opening.
        let mut d = vec![1, 2, 3];
        d.extend(900..910);
        let p = c.plan(tag(1), &d).expect("a slot");
        assert_eq!((p.seq, p.reuse, p.save_first), (0, 3, true));
    }

    #[test]
    fn short_prefixes_and_a_zero_budget_are_not_saved() {
        let mut c = PromptCache::new(1, 1_000, false, true);
        c.plan(tag(1), &toks(0..10));
        c.release(0, toks(0..10));
        assert!(!c.plan(tag(1), &toks(50..60)).expect("slot").save_first);
        let mut none = PromptCache::new(1, 0, false, true);
        none.plan(tag(1), &toks(0..100));
        none.release(0, toks(0..100));
        assert!(!none.plan(tag(1), &toks(500..600)).expect("slot").save_first);
    }

    #[test]
    fn empty_slots_go_first_then_the_least_recently_used() {
        let mut c = PromptCache::new(3, 0, false, true);
        for (i, p) in [1u64, 2].iter().enumerate() {
            let plan = c.plan(tag(*p), &toks(0..10)).expect("slot");
            assert_eq!(plan.seq, i);
            c.release(i, toks(0..10));
        }
        assert_eq!(c.plan(tag(3), &toks(50..60)).map(|p| p.seq), Some(2));
        c.release(2, toks(50..60));
        // No empty slot: the least recently used (slot 0) is replaced.
        assert_eq!(c.plan(tag(4), &toks(70..80)).map(|p| p.seq), Some(0));
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let mut c = PromptCache::new(1, 1_000, false, false);
        c.plan(tag(1), &toks(0..100));
        c.release(0, toks(0..100));
        let p = c.plan(tag(1), &toks(0..120)).expect("slot");
        assert_eq!((p.reuse, p.save_first), (0, false));
        assert!(c.keys(10).len() <= 1);
    }

    #[test]
    fn keys_are_reported_most_recent_first_without_repeats() {
        let mut c = PromptCache::new(3, 0, false, true);
        for (i, p) in [1u64, 2, 1].iter().enumerate() {
            c.plan(tag(*p), &toks(i as i32 * 100..i as i32 * 100 + 5));
            c.release(i, toks(i as i32 * 100..i as i32 * 100 + 5));
        }
        assert_eq!(c.keys(10), vec![100, 200]);
        assert_eq!(c.keys(1), vec![100]);
    }
}
