//! Deadlines by name, in time order: the machines' timer table (after quinn-proto's
//! `TimerTable`, extended to any number of keys so that one type serves a round's few named
//! timers and a population's idle queue alike).
//!
//! Setting, moving and stopping a timer are `O(log n)`; the next deadline is the head of the
//! queue, so [`crate::Coordinator::poll_timeout`] never scans clients.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// Instants by key, ordered by time (then key): each key has at most one.
#[derive(Debug, Clone)]
pub(crate) struct TimerQueue<K: Ord + Clone> {
    queue: BTreeSet<(Instant, K)>,
    at: BTreeMap<K, Instant>,
}

impl<K: Ord + Clone> Default for TimerQueue<K> {
    fn default() -> Self {
        Self {
            queue: BTreeSet::new(),
            at: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone> TimerQueue<K> {
    /// Sets (or moves) `key`'s instant.
    pub(crate) fn set(&mut self, key: K, at: Instant) {
        if let Some(old) = self.at.insert(key.clone(), at) {
            self.queue.remove(&(old, key.clone()));
        }
        self.queue.insert((at, key));
    }

    /// Sets `key` to `at`, or stops it if `at` is `None`.
    pub(crate) fn set_or_stop(&mut self, key: K, at: Option<Instant>) {
        match at {
            Some(at) => self.set(key, at),
            None => {
                self.stop(&key);
            }
        }
    }

    /// Stops `key`'s timer; returns its instant if it was set.
    pub(crate) fn stop(&mut self, key: &K) -> Option<Instant> {
        let old = self.at.remove(key)?;
        self.queue.remove(&(old, key.clone()));
        Some(old)
    }

    /// `key`'s instant, if set.
    pub(crate) fn get(&self, key: &K) -> Option<Instant> {
        self.at.get(key).copied()
    }

    /// The earliest instant.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.queue.first().map(|(t, _)| *t)
    }

    /// Stops and returns the keys whose instant is at or before `now`, earliest first.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some((t, _)) = self.queue.first() {
            if *t > now {
                break;
            }
            if let Some((_, k)) = self.queue.pop_first() {
                self.at.remove(&k);
                out.push(k);
            }
        }
        out
    }

    /// Every (instant, key), earliest first.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = (Instant, &K)> {
        self.queue.iter().map(|(t, k)| (*t, k))
    }

    /// Stops every timer.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.at.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn set_move_stop_and_expire_in_time_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = TimerQueue::default();
        q.set("a", t0 + 3 * s);
        q.set("b", t0 + s);
        q.set("c", t0 + 2 * s);
        assert_eq!(q.next(), Some(t0 + s));
        // Moving a key leaves one entry for it.
        q.set("b", t0 + 5 * s);
        assert_eq!(q.next(), Some(t0 + 2 * s));
        assert_eq!(q.iter().count(), 3);
        assert_eq!(q.stop(&"c"), Some(t0 + 2 * s));
        assert_eq!(q.stop(&"c"), None);
        q.set_or_stop("d", Some(t0 + 3 * s));
        assert_eq!(q.expire(t0 + 3 * s), vec!["a", "d"]);
        assert_eq!(q.get(&"a"), None);
        assert_eq!(q.next(), Some(t0 + 5 * s));
        q.set_or_stop("b", None);
        assert_eq!(q.next(), None);
        q.set("e", t0);
        q.clear();
        assert!(q.expire(t0 + 9 * s).is_empty());
    }
}
