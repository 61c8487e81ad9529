//! Deadlines as data: each key (a connection, the listener) has at most
//! one wake-up time, and the earliest of them all is how long the event
//! loop may sleep.
//!
//! A binary heap of (time, key) with lazy deletion: setting or cancelling
//! a key's time only changes the map, and heap entries that no longer
//! match it are skipped when they come up. The heap is rebuilt from the
//! map whenever stale entries outnumber live ones, so it never holds more
//! than about twice as many entries as there are keys.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// Stale entries tolerated before a rebuild, whatever the number of keys.
const SLACK: usize = 64;

/// One wake-up time per key.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize)>>,
    at: HashMap<usize, Instant>,
}

impl Timers {
    /// No timers.
    pub fn new() -> Timers {
        Timers::default()
    }

    /// Wakes `key` at `at`, in place of any time it had.
    pub fn set(&mut self, key: usize, at: Instant) {
        if self.at.insert(key, at) == Some(at) {
            return;
        }
        self.heap.push(Reverse((at, key)));
        self.compact();
    }

    /// Forgets `key`'s time.
    pub fn cancel(&mut self, key: usize) {
        if self.at.remove(&key).is_some() {
            self.compact();
        }
    }

    /// The earliest time set, if any.
    pub fn earliest(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// The keys whose time is `now` or earlier, earliest first; each is
    /// forgotten (a key that still has something to wait for sets a new
    /// time).
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        let mut keys = Vec::new();
        loop {
            self.drop_stale();
            match self.heap.peek() {
                Some(Reverse((at, key))) if *at <= now => {
                    let key = *key;
                    self.heap.pop();
                    self.at.remove(&key);
                    keys.push(key);
                }
                _ => return keys,
            }
        }
    }

    /// How many keys have a time.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether no key has a time.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Pops heap entries that no longer match their key's time.
    fn drop_stale(&mut self) {
        while let Some(Reverse((at, key))) = self.heap.peek() {
            if self.at.get(key) == Some(at) {
                return;
            }
            self.heap.pop();
        }
    }

    fn compact(&mut self) {
        if self.heap.len() > 2 * self.at.len() + SLACK {
            self.heap = self.at.iter().map(|(&k, &at)| Reverse((at, k))).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn the_earliest_time_comes_first_and_only_when_due() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        assert_eq!(t.earliest(), None);
        t.set(1, ms(t0, 30));
        t.set(2, ms(t0, 10));
        t.set(3, ms(t0, 20));
        assert_eq!(t.earliest(), Some(ms(t0, 10)));
        assert!(t.due(ms(t0, 9)).is_empty());
        assert_eq!(t.due(ms(t0, 20)), vec![2, 3]);
        assert_eq!(t.earliest(), Some(ms(t0, 30)));
        assert_eq!(t.len(), 1);
        assert_eq!(t.due(ms(t0, 100)), vec![1]);
        assert!(t.is_empty());
        assert_eq!(t.earliest(), None);
    }

    #[test]
    fn a_new_time_replaces_the_old_one_earlier_or_later() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.set(7, ms(t0, 10));
        t.set(7, ms(t0, 50));
        assert_eq!(t.earliest(), Some(ms(t0, 50)));
        assert!(t.due(ms(t0, 10)).is_empty());
        t.set(7, ms(t0, 5));
        assert_eq!(t.due(ms(t0, 5)), vec![7]);
        assert!(t.due(ms(t0, 60)).is_empty(), "a replaced time came back");
    }

    #[test]
    fn a_cancelled_key_never_comes_up() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.set(1, ms(t0, 10));
        t.set(2, ms(t0, 20));
        t.cancel(1);
        t.cancel(99);
        assert_eq!(t.earliest(), Some(ms(t0, 20)));
        assert_eq!(t.due(ms(t0, 30)), vec![2]);
    }

    #[test]
    fn many_changes_to_few_keys_keep_the_heap_small() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        for i in 0..100_000u64 {
            t.set((i % 3) as usize, ms(t0, 1000 - i % 997));
        }
        assert!(t.heap.len() <= 2 * 3 + SLACK + 1, "{}", t.heap.len());
        assert_eq!(t.due(ms(t0, 2000)).len(), 3);
    }
}
