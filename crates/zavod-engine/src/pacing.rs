//! When a sequence's generated tokens leave the engine thread.
//!
//! Each batch of events the engine hands to the node wakes the node's
//! network thread, and the frame it writes wakes the client. When the
//! model's threads hold every core, each wake-up preempts one of them in
//! the middle of a step, and the other threads wait for it at their next
//! barrier: a few hundred microseconds lost per token. A [`Pacer`] holds
//! tokens back for up to `interval` after the last release, so one wake-up
//! carries several tokens. The first token always leaves at once (time to
//! first token is untouched), and the caller releases what is held when the
//! sequence ends. With a zero interval every token leaves as it is made.
//!
//! Pure: `now` is passed in; no clock is read here.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Pacer<T> {
    interval: Duration,
    last_release: Option<Instant>,
    held: Vec<T>,
}

impl<T> Pacer<T> {
    pub fn new(interval: Duration) -> Self {
        Pacer {
            interval,
            last_release: None,
            held: Vec::new(),
        }
    }

    /// Takes one item made at `now`; returns what is due to leave now, in
    /// order (this item and everything held before it), or `None` while
    /// the item is held.
    pub fn push(&mut self, now: Instant, item: T) -> Option<std::vec::Drain<'_, T>> {
        self.held.push(item);
        let due = self
            .last_release
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if due {
            self.last_release = Some(now);
            Some(self.held.drain(..))
        } else {
            None
        }
    }

    /// Everything still held, in order: for when the sequence ends.
    pub fn release(&mut self) -> std::vec::Drain<'_, T> {
        self.held.drain(..)
    }

    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(d: Option<std::vec::Drain<'_, u32>>) -> Vec<u32> {
        d.map(|d| d.collect()).unwrap_or_default()
    }

    #[test]
    fn zero_interval_releases_every_item_at_once() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::ZERO);
        for i in 0..5 {
            assert_eq!(out(p.push(t0, i)), vec![i]);
        }
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn first_item_leaves_at_once_then_items_wait_for_the_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(50));
        assert_eq!(out(p.push(t0, 0)), vec![0]);
        assert_eq!(out(p.push(t0 + ms(12), 1)), Vec::<u32>::new());
        assert_eq!(out(p.push(t0 + ms(25), 2)), Vec::<u32>::new());
        assert_eq!(out(p.push(t0 + ms(37), 3)), Vec::<u32>::new());
        assert_eq!(p.held(), 3);
        // The interval counts from the last release, not from the first
        // held item.
        assert_eq!(out(p.push(t0 + ms(50), 4)), vec![1, 2, 3, 4]);
        assert_eq!(out(p.push(t0 + ms(62), 5)), Vec::<u32>::new());
        assert_eq!(out(p.push(t0 + ms(120), 6)), vec![5, 6]);
    }

    #[test]
    fn release_hands_back_what_is_held_in_order_and_empties_the_pacer() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Pacer::new(ms(50));
        assert_eq!(out(p.push(t0, 0)), vec![0]);
        let _ = p.push(t0 + ms(1), 1);
        let _ = p.push(t0 + ms(2), 2);
        assert_eq!(p.release().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(p.held(), 0);
        assert_eq!(p.release().count(), 0);
    }

    #[test]
    fn a_clock_that_steps_back_holds_rather_than_panics() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut p = Pacer::new(Duration::from_millis(50));
        assert_eq!(out(p.push(t0, 0)), vec![0]);
        assert_eq!(
            out(p.push(t0 - Duration::from_millis(10), 1)),
            Vec::<u32>::new()
        );
        assert_eq!(p.held(), 1);
    }
}
