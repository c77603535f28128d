//! The enrolled clients: who they are, what they can do, when each was last heard from, and
//! whether it has been missing its deadlines.
//!
//! Every operation a round makes per message or per timer is `O(log n)` in the number of
//! enrolled clients `n`: the next idle deadline is the head of a queue ordered by last
//! activity (quinn-proto's idle timer, for a whole population), and the counts the
//! coordinator reports while it waits are kept up to date rather than recounted. Only sampling
//! walks the population, once per round.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::strategy::ClientInfo;
use crate::timer::TimerQueue;
use crate::wire::messages::{Capabilities, ClientId};

/// Most departed clients whose straggler record is remembered.
const MAX_REMEMBERED_STRAGGLERS: usize = 10_000;

/// A client's recent deadline record (kept across reconnects).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Straggling {
    /// Training deadlines missed in a row.
    missed: u32,
    /// Not sampled before this (unless needed).
    excluded_until: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    capabilities: Capabilities,
    straggling: Straggling,
}

/// The enrolled clients and the straggler records of departed ones.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    clients: BTreeMap<ClientId, Entry>,
    /// Enrolled clients by last activity, oldest first: the idle queue.
    last_seen: TimerQueue<ClientId>,
    /// Enrolled clients that have an exclusion end (past or future), by that end.
    exclusions: TimerQueue<ClientId>,
    /// Straggler records of clients that left, so that reconnecting does not clear them.
    departed: BTreeMap<ClientId, Straggling>,
    /// Enrolled clients that implement secure aggregation.
    secure: usize,
    /// Enrolled clients per declared model (manifest digest); those that declared none are
    /// `len − Σ`.
    models: BTreeMap<[u8; 32], usize>,
}

impl Registry {
    /// Number of enrolled clients.
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether `id` is enrolled.
    pub(crate) fn contains(&self, id: &ClientId) -> bool {
        self.clients.contains_key(id)
    }

    /// The enrolled clients, in id order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &ClientId> {
        self.clients.keys()
    }

    /// The enrolled clients and what they declared, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ClientId, &Capabilities)> {
        self.clients.iter().map(|(id, e)| (id, &e.capabilities))
    }

    /// What `id` declared in its hello.
    pub(crate) fn capabilities(&self, id: &ClientId) -> Option<&Capabilities> {
        self.clients.get(id).map(|e| &e.capabilities)
    }

    /// Enrolls `id` (not enrolled yet), restoring its straggler record if it had one.
    pub(crate) fn enroll(&mut self, now: Instant, id: ClientId, capabilities: Capabilities) {
        self.remove(now, &id);
        let straggling = self.departed.remove(&id).unwrap_or_default();
        if capabilities.secure_aggregation {
            self.secure += 1;
        }
        if let Some(m) = &capabilities.model {
            *self.models.entry(m.digest).or_default() += 1;
        }
        if let Some(t) = straggling.excluded_until {
            self.exclusions.set(id.clone(), t);
        }
        self.last_seen.set(id.clone(), now);
        self.clients.insert(
            id,
            Entry {
                capabilities,
                straggling,
            },
        );
    }

    /// Unenrolls a client, remembering its straggler record. True if it was enrolled.
    pub(crate) fn remove(&mut self, now: Instant, id: &ClientId) -> bool {
        let Some(e) = self.clients.remove(id) else {
            return false;
        };
        self.last_seen.stop(id);
        self.exclusions.stop(id);
        if e.capabilities.secure_aggregation {
            self.secure = self.secure.saturating_sub(1);
        }
        if let Some(m) = &e.capabilities.model
            && let Some(n) = self.models.get_mut(&m.digest)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.models.remove(&m.digest);
            }
        }
        if e.straggling != Straggling::default() {
            self.departed
                .retain(|_, s| s.excluded_until.is_some_and(|t| now < t) || s.missed > 0);
            if self.departed.len() >= MAX_REMEMBERED_STRAGGLERS {
                self.departed.pop_first();
            }
            self.departed.insert(id.clone(), e.straggling);
        }
        true
    }

    /// `id` was heard from at `at`. With `only_later`, an earlier `at` than the last one
    /// recorded changes nothing (transport activity reported out of order).
    pub(crate) fn heard_from(&mut self, at: Instant, id: &ClientId, only_later: bool) {
        let Some(last) = self.last_seen.get(id) else {
            return;
        };
        if only_later && at <= last {
            return;
        }
        self.last_seen.set(id.clone(), at);
    }

    /// When the longest-silent client reaches `idle` without a word.
    pub(crate) fn next_idle_deadline(&self, idle: Duration) -> Option<Instant> {
        self.last_seen.next().map(|t| t + idle)
    }

    /// The clients silent for `idle` or longer at `now`, longest-silent first.
    pub(crate) fn idle(&self, now: Instant, idle: Duration) -> Vec<ClientId> {
        self.last_seen
            .iter()
            .take_while(|(t, _)| now >= *t + idle)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// How many enrolled clients declared each model (by manifest digest).
    pub(crate) fn declared_models(&self) -> &BTreeMap<[u8; 32], usize> {
        &self.models
    }

    /// Enrolled clients that declared no model.
    pub(crate) fn undeclared_models(&self) -> usize {
        self.clients
            .len()
            .saturating_sub(self.models.values().sum::<usize>())
    }

    /// Enrolled clients that do not implement secure aggregation.
    pub(crate) fn without_secure_aggregation(&self) -> usize {
        self.clients.len() - self.secure.min(self.clients.len())
    }

    fn usable(&self, secure_only: bool) -> usize {
        if secure_only {
            self.secure.min(self.clients.len())
        } else {
            self.clients.len()
        }
    }

    /// Usable clients excluded from sampling at `now`.
    fn excluded_now(&self, now: Instant, secure_only: bool) -> usize {
        self.exclusions
            .iter()
            .rev()
            .take_while(|(t, _)| now < *t)
            .filter(|(_, id)| {
                !secure_only
                    || self
                        .clients
                        .get(id)
                        .is_some_and(|e| e.capabilities.secure_aggregation)
            })
            .count()
    }

    /// How many clients [`Registry::eligible`] would return, without building the list.
    pub(crate) fn eligible_count(&self, now: Instant, secure_only: bool, min: usize) -> usize {
        let usable = self.usable(secure_only);
        let strict = usable.saturating_sub(self.excluded_now(now, secure_only));
        if strict >= min { strict } else { usable }
    }

    /// Clients that may be sampled now: all usable ones (those that implement secure
    /// aggregation, with `secure_only`) but excluded stragglers, unless leaving those out
    /// would leave fewer than `min`.
    pub(crate) fn eligible(&self, now: Instant, secure_only: bool, min: usize) -> Vec<ClientInfo> {
        let usable = |e: &Entry| !secure_only || e.capabilities.secure_aggregation;
        let strict = self
            .usable(secure_only)
            .saturating_sub(self.excluded_now(now, secure_only));
        let keep_excluded = strict < min;
        self.clients
            .iter()
            .filter(|(_, e)| {
                usable(e) && (keep_excluded || e.straggling.excluded_until.is_none_or(|t| now >= t))
            })
            .map(|(id, e)| ClientInfo {
                id: id.clone(),
                capabilities: e.capabilities.clone(),
            })
            .collect()
    }

    /// Whether `id` is excluded from sampling now.
    pub(crate) fn is_excluded(&self, now: Instant, id: &ClientId) -> bool {
        self.clients
            .get(id)
            .and_then(|e| e.straggling.excluded_until)
            .is_some_and(|t| now < t)
    }

    /// `id` delivered its training result in time: its run of missed deadlines ends.
    pub(crate) fn met_deadline(&mut self, id: &ClientId) {
        if let Some(e) = self.clients.get_mut(id) {
            e.straggling.missed = 0;
        }
    }

    /// Records missed training deadlines; a client that missed `max` in a row is excluded from
    /// sampling for `backoff`. `max = 0` turns this off.
    pub(crate) fn missed_deadlines(
        &mut self,
        now: Instant,
        ids: &[ClientId],
        max: u32,
        backoff: Duration,
    ) {
        if max == 0 {
            return;
        }
        for id in ids {
            let Some(e) = self.clients.get_mut(id) else {
                continue;
            };
            e.straggling.missed += 1;
            if e.straggling.missed >= max {
                let until = now + backoff;
                e.straggling.excluded_until = Some(until);
                e.straggling.missed = 0;
                self.exclusions.set(id.clone(), until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(secure: bool) -> Capabilities {
        Capabilities {
            secure_aggregation: secure,
            ..Capabilities::default()
        }
    }

    fn id(i: usize) -> ClientId {
        ClientId::new(format!("c{i}"))
    }

    #[test]
    fn idle_queue_follows_the_latest_activity() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Registry::default();
        for i in 0..3 {
            r.enroll(t0 + s * i as u32, id(i), caps(false));
        }
        assert_eq!(r.next_idle_deadline(10 * s), Some(t0 + 10 * s));
        r.heard_from(t0 + 5 * s, &id(0), false);
        assert_eq!(r.next_idle_deadline(10 * s), Some(t0 + 11 * s));
        // Out-of-order activity does not move a client back.
        r.heard_from(t0, &id(0), true);
        assert_eq!(r.idle(t0 + 12 * s, 10 * s), vec![id(1), id(2)]);
        assert!(r.remove(t0, &id(1)));
        assert!(!r.remove(t0, &id(1)));
        assert_eq!(r.idle(t0 + 12 * s, 10 * s), vec![id(2)]);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn counts_match_the_lists() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Registry::default();
        for i in 0..10 {
            r.enroll(t0, id(i), caps(i % 2 == 0));
        }
        assert_eq!(r.without_secure_aggregation(), 5);
        // c0 (secure) and c1 excluded for 10 s; c2 misses one deadline only.
        r.missed_deadlines(t0, &[id(0), id(1)], 1, 10 * s);
        r.missed_deadlines(t0, &[id(2)], 2, 10 * s);
        for (secure, min) in [(false, 0), (true, 0), (false, 9), (true, 5)] {
            for at in [t0, t0 + 9 * s, t0 + 10 * s] {
                let list = r.eligible(at, secure, min);
                assert_eq!(r.eligible_count(at, secure, min), list.len());
            }
        }
        assert_eq!(r.eligible_count(t0, false, 0), 8);
        assert_eq!(r.eligible_count(t0, true, 0), 4);
        // Too few without the excluded: everyone usable is eligible.
        assert_eq!(r.eligible_count(t0, false, 9), 10);
        assert_eq!(r.eligible_count(t0 + 10 * s, false, 0), 10);
        assert!(r.is_excluded(t0, &id(0)) && !r.is_excluded(t0, &id(2)));
        // The record survives a reconnect.
        r.remove(t0, &id(0));
        assert_eq!(r.without_secure_aggregation(), 5);
        r.enroll(t0, id(0), caps(true));
        assert!(r.is_excluded(t0, &id(0)));
        assert_eq!(r.eligible_count(t0, true, 0), 4);
    }
}
