//! Picking the next token from a sequence's logits without copying the
//! whole vocabulary.
//!
//! llama.cpp's generic sampling entry point builds an array of every token
//! (262,144 for Gemma 3, a few megabytes) for each sequence at each step,
//! which costs several percent of a batched decode step on a small model.
//! Greedy decoding needs only the largest logit, and sampling with `top_k`
//! only the k largest; both are found here in one pass over the logits,
//! and llama.cpp's samplers then run on those few candidates.
//!
//! Pure functions over slices; no llama.cpp.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The index of the largest logit (the first, among equal ones); `None`
/// for an empty slice. NaN logits never win.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    // Two simple passes (the largest value, then where it first is) run
    // several times faster than one branchy pass: both vectorise.
    let max = logits
        .chunks(16)
        .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .fold(f32::NEG_INFINITY, f32::max);
    if max.is_nan() || (max == f32::NEG_INFINITY && !logits.contains(&f32::NEG_INFINITY)) {
        return None;
    }
    logits.iter().position(|&x| x == max)
}

/// A logit in a min-heap: the smallest on top.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry(f32, usize);

impl Eq for Entry {}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed, so the heap's top is the smallest logit (then the
        // largest index, so that among equal logits the lower index stays).
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| self.1.cmp(&other.1))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `k` largest logits as (index, logit), largest first; NaN logits
/// are left out.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Entry> = BinaryHeap::with_capacity(k + 1);
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if heap.len() < k {
            heap.push(Entry(x, i));
        } else if heap.peek().is_some_and(|m| x > m.0) {
            heap.pop();
            heap.push(Entry(x, i));
        }
    }
    let mut out: Vec<(usize, f32)> = heap.into_iter().map(|Entry(x, i)| (i, x)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nan() {
        assert_eq!(argmax(&[0.1, 3.0, -2.0, 3.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, -0.5]), Some(2));
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN]), None);
    }

    #[test]
    fn top_k_is_the_head_of_a_full_sort() {
        let logits: Vec<f32> = (0..10_000u64)
            .map(|i| (zavod_proto::mesh::score::splitmix64(i) % 1000) as f32 / 7.0)
            .collect();
        for k in [1, 5, 40, 10_000, 20_000] {
            let mut all: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
            assert_eq!(top_k(&logits, k), all, "k = {k}");
        }
        assert!(top_k(&logits, 0).is_empty());
        assert_eq!(top_k(&[f32::NAN, 1.0], 2), vec![(1, 1.0)]);
    }
}
