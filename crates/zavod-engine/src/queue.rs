//! The engine's wait line when every slot is busy: fair between the
//! credentials that wait, first come first served within one.
//!
//! One client sending a hundred requests must not make another client's
//! single request wait behind all of them. So waiting requests are kept
//! per partition (a credential), and the next free slot goes to the
//! partition that was served longest ago, in turn.
//!
//! Invariants: the queue holds at most its capacity; every item leaves
//! exactly once (taken, or dropped by `retain`); order within a partition
//! is arrival order.

use std::collections::{BTreeMap, VecDeque};

/// A fair queue of `T`, keyed by partition.
#[derive(Debug)]
pub struct FairQueue<T> {
    waiting: BTreeMap<u64, VecDeque<T>>,
    /// When each partition was last served (a counter), for the turn order.
    served: BTreeMap<u64, u64>,
    tick: u64,
    len: usize,
    capacity: usize,
}

impl<T> FairQueue<T> {
    pub fn new(capacity: usize) -> Self {
        FairQueue {
            waiting: BTreeMap::new(),
            served: BTreeMap::new(),
            tick: 0,
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an item; gives it back when the queue is full.
    pub fn push(&mut self, partition: u64, item: T) -> Result<(), T> {
        if self.len >= self.capacity {
            return Err(item);
        }
        self.waiting.entry(partition).or_default().push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The partition whose turn it is: the one served longest ago (never
    /// served first), ties by partition.
    fn next_partition(&self) -> Option<u64> {
        self.waiting
            .keys()
            .min_by_key(|p| (self.served.get(p).copied().unwrap_or(0), **p))
            .copied()
    }

    /// Takes the next item in fair order.
    pub fn pop(&mut self) -> Option<T> {
        let p = self.next_partition()?;
        let q = self.waiting.get_mut(&p)?;
        let item = q.pop_front();
        if q.is_empty() {
            self.waiting.remove(&p);
        }
        if item.is_some() {
            self.len -= 1;
            self.tick += 1;
            self.served.insert(p, self.tick);
            // Forget partitions that wait for nothing and were served long
            // ago, so the map stays as small as the queue.
            if self.served.len() > self.capacity.saturating_mul(2).max(64) {
                let waiting = &self.waiting;
                self.served.retain(|k, _| waiting.contains_key(k));
            }
        }
        item
    }

    /// How many items leave before the first one `is` accepts in
    /// `partition`, if nothing else arrives: the turn order goes round the
    /// partitions (served longest ago first), one item each, so every
    /// other partition sends as many as it has, up to the item's place in
    /// its own line (one more if its turn comes first). Gives the item
    /// too.
    pub fn ahead(&self, partition: u64, is: impl Fn(&T) -> bool) -> Option<(usize, &T)> {
        let line = self.waiting.get(&partition)?;
        let k = line.iter().position(is)?;
        let turn = |p: &u64| (self.served.get(p).copied().unwrap_or(0), *p);
        let mine = turn(&partition);
        let others: usize = self
            .waiting
            .iter()
            .filter(|(p, _)| **p != partition)
            .map(|(p, q)| q.len().min(k + usize::from(turn(p) < mine)))
            .sum();
        Some((k + others, &line[k]))
    }

    /// Keeps only the items `keep` accepts (drops cancelled requests).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for q in self.waiting.values_mut() {
            q.retain(&mut keep);
        }
        self.waiting.retain(|_, q| !q.is_empty());
        self.len = self.waiting.values().map(VecDeque::len).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_client_does_not_starve_a_quiet_one() {
        let mut q = FairQueue::new(100);
        for i in 0..10 {
            q.push(1, ("busy", i)).expect("room");
        }
        q.push(2, ("quiet", 0)).expect("room");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        // The quiet client's request is the first or second out.
        let at = order.iter().position(|x| x.0 == "quiet").expect("served");
        assert!(at <= 1, "{order:?}");
        // The busy client's requests keep their order.
        let busy: Vec<i32> = order
            .iter()
            .filter(|x| x.0 == "busy")
            .map(|x| x.1)
            .collect();
        assert_eq!(busy, (0..10).collect::<Vec<_>>());
        assert!(q.is_empty());
    }

    #[test]
    fn ahead_counts_what_leaves_first() {
        let mut q = FairQueue::new(100);
        for i in 0..3 {
            q.push(7, 70 + i).expect("room");
        }
        q.push(8, 80).expect("room");
        q.push(8, 81).expect("room");
        // Check each item's count against the order items really leave.
        let items = [(7, 70), (7, 71), (7, 72), (8, 80), (8, 81)];
        let counts: Vec<usize> = items
            .iter()
            .map(|&(p, x)| q.ahead(p, |y| *y == x).expect("waiting").0)
            .collect();
        let order: Vec<i32> = std::iter::from_fn(|| q.pop()).collect();
        for (&(_, x), n) in items.iter().zip(counts) {
            let at = order.iter().position(|y| *y == x).expect("left");
            assert_eq!(at, n, "item {x} in {order:?}");
        }
        assert!(q.ahead(7, |_| true).is_none());
        // After turns were taken (72 left last): 8 was served longer ago,
        // so it goes first even though 7's item came first.
        q.push(7, 73).expect("room");
        q.push(8, 82).expect("room");
        assert_eq!(q.ahead(7, |y| *y == 73), Some((1, &73)));
        assert_eq!(q.ahead(8, |y| *y == 82), Some((0, &82)));
        assert_eq!(q.pop(), Some(82));
    }

    #[test]
    fn partitions_take_turns() {
        let mut q = FairQueue::new(100);
        for i in 0..3 {
            q.push(7, 70 + i).expect("room");
            q.push(8, 80 + i).expect("room");
        }
        let order: Vec<i32> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![70, 80, 71, 81, 72, 82]);
    }

    #[test]
    fn it_is_bounded_and_drops_what_is_cancelled() {
        let mut q = FairQueue::new(3);
        for i in 0..3 {
            q.push(i, i).expect("room");
        }
        assert_eq!(q.push(9, 9), Err(9));
        q.retain(|x| *x != 1);
        assert_eq!(q.len(), 2);
        q.push(9, 9).expect("room again");
        let mut out: Vec<u64> = std::iter::from_fn(|| q.pop()).collect();
        out.sort();
        assert_eq!(out, vec![0, 2, 9]);
    }
}
