//! The UDP flow table: eviction from the heaviest source first, in amortised O(1) per new flow.
//!
//! At `limits.max_udp_flows`, every new flow must first make room. A global least-recently-used
//! order let one source that opens a new flow per datagram (a new source port each time) evict
//! every other client's flows. Here the victim is taken from the source that holds the most
//! flows: a flood evicts its own flows, and a client with a few flows keeps them until every
//! source holds as few. The same per-source order serves `limits.max_udp_flows_per_source`
//! ([`FlowTable::make_room_from`]): a source at its limit recycles its own oldest flow.
//!
//! Cost: sources sit in buckets by how many flows they hold (`buckets[n]`, swap-removed by a
//! stored position), so the heaviest is found in O(1) and every insert or remove moves one
//! source by one bucket. Each source has a FIFO queue with one ticket per flow, stamped with
//! the flow's last use when it was queued. Making room pops tickets from the front of the
//! heaviest source's queue: a ticket whose flow has been used since is re-queued with the new
//! stamp (the "second chance" of the clock algorithm), a finished flow is dropped for free,
//! and the first flow idle since its stamp is evicted. Each re-queue is paid for by a use and
//! each stale ticket by a removal, so the work per new flow is amortised O(1); within a source
//! what is evicted is approximately its least recently used flow.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

struct Slot<S, V> {
    value: V,
    source: S,
    /// Identifies this flow's ticket (a key can come back as a new flow).
    id: u64,
    last: Instant,
}

/// One source's flows: their tickets in queue order, how many there are, and where the source
/// sits in `buckets[count]`.
struct Source<K> {
    queue: VecDeque<(K, u64, Instant)>,
    count: usize,
    pos: usize,
}

/// What [`FlowTable::make_room`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// A finished flow was dropped.
    Freed,
    /// A live flow was evicted.
    Evicted,
    /// The table (or the source) holds no flow.
    Empty,
}

pub(super) struct FlowTable<K, S, V> {
    slots: HashMap<K, Slot<S, V>>,
    sources: HashMap<S, Source<K>>,
    /// `buckets[n]`: the sources holding exactly `n` flows (`buckets[0]` stays empty).
    buckets: Vec<Vec<S>>,
    /// The highest `n` with a non-empty `buckets[n]` (0: no flows).
    heaviest: usize,
    next_id: u64,
    /// Tickets popped by `make_room`, in all (what the amortised bound is about).
    popped: u64,
}

impl<K: Hash + Eq + Copy, S: Hash + Eq + Copy, V> Default for FlowTable<K, S, V> {
    fn default() -> Self {
        FlowTable {
            slots: HashMap::new(),
            sources: HashMap::new(),
            buckets: vec![Vec::new()],
            heaviest: 0,
            next_id: 0,
            popped: 0,
        }
    }
}

impl<K: Hash + Eq + Copy, S: Hash + Eq + Copy, V> FlowTable<K, S, V> {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// How many flows `source` holds.
    pub(super) fn source_len(&self, source: &S) -> usize {
        self.sources.get(source).map_or(0, |s| s.count)
    }

    /// The flow's value, marking it used at `now`.
    pub(super) fn get_mut(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        self.slots.get_mut(key).map(|s| {
            s.last = now;
            &mut s.value
        })
    }

    pub(super) fn remove(&mut self, key: &K) -> Option<V> {
        // Its ticket goes stale and is dropped when it reaches the front (or with its source).
        let slot = self.slots.remove(key)?;
        self.release(slot.source);
        Some(slot.value)
    }

    /// Adds (or replaces) a flow of `source`, used at `now`.
    pub(super) fn insert(&mut self, key: K, source: S, value: V, now: Instant) {
        self.remove(&key);
        let id = self.next_id;
        self.next_id += 1;
        self.slots.insert(
            key,
            Slot {
                value,
                source,
                id,
                last: now,
            },
        );
        let src = self.sources.entry(source).or_insert_with(|| Source {
            queue: VecDeque::new(),
            count: 0,
            pos: 0,
        });
        src.queue.push_back((key, id, now));
        let n = src.count;
        self.move_source(source, n, n + 1);
    }

    /// Frees one place: drops a finished flow (`done`) or evicts the least recently used flow
    /// of the source that holds the most flows.
    pub(super) fn make_room(&mut self, done: impl Fn(&V) -> bool) -> Room {
        match self.buckets[self.heaviest].last() {
            Some(&s) => self.make_room_from(s, done),
            None => Room::Empty,
        }
    }

    /// Frees one of `source`'s places: drops a finished flow or evicts its least recently
    /// used one.
    pub(super) fn make_room_from(&mut self, source: S, done: impl Fn(&V) -> bool) -> Room {
        loop {
            let Some((key, id, stamp)) = self
                .sources
                .get_mut(&source)
                .and_then(|s| s.queue.pop_front())
            else {
                return Room::Empty;
            };
            self.popped += 1;
            let Some(slot) = self.slots.get(&key).filter(|s| s.id == id) else {
                continue; // stale ticket: that flow was removed or replaced
            };
            if done(&slot.value) {
                self.remove(&key);
                return Room::Freed;
            }
            if slot.last > stamp {
                let last = slot.last;
                if let Some(s) = self.sources.get_mut(&source) {
                    s.queue.push_back((key, id, last));
                }
                continue;
            }
            self.remove(&key);
            return Room::Evicted;
        }
    }

    /// Keeps the flows `keep` says to keep, and drops stale tickets.
    pub(super) fn retain(&mut self, keep: impl Fn(&V) -> bool) {
        let gone: Vec<K> = self
            .slots
            .iter()
            .filter(|(_, s)| !keep(&s.value))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.remove(&k);
        }
        let slots = &self.slots;
        for src in self.sources.values_mut() {
            src.queue
                .retain(|(k, id, _)| slots.get(k).is_some_and(|s| s.id == *id));
        }
    }

    /// One flow of `source` went: move it down a bucket, forget it at zero (with its stale
    /// tickets).
    fn release(&mut self, source: S) {
        let Some(n) = self.sources.get(&source).map(|s| s.count) else {
            return;
        };
        self.move_source(source, n, n - 1);
        if n == 1 {
            self.sources.remove(&source);
        }
    }

    /// Moves `source` from `buckets[from]` to `buckets[to]` (`to = from ± 1`) and keeps
    /// `heaviest` right: counts move by one, so it moves by at most one.
    fn move_source(&mut self, source: S, from: usize, to: usize) {
        if from > 0 {
            let pos = self.sources[&source].pos;
            let bucket = &mut self.buckets[from];
            bucket.swap_remove(pos);
            if let Some(&moved) = bucket.get(pos) {
                if let Some(m) = self.sources.get_mut(&moved) {
                    m.pos = pos;
                }
            }
        }
        if let Some(src) = self.sources.get_mut(&source) {
            src.count = to;
            if to > 0 {
                if self.buckets.len() <= to {
                    self.buckets.resize_with(to + 1, Vec::new);
                }
                src.pos = self.buckets[to].len();
                self.buckets[to].push(source);
            }
        }
        if to > self.heaviest {
            self.heaviest = to;
        }
        while self.heaviest > 0 && self.buckets[self.heaviest].is_empty() {
            self.heaviest -= 1;
        }
    }

    #[cfg(test)]
    fn tickets(&self) -> usize {
        self.sources.values().map(|s| s.queue.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn the_least_recently_used_flow_is_evicted() {
        let t0 = Instant::now();
        let mut t: FlowTable<u32, u8, bool> = FlowTable::default();
        t.insert(1, 0, false, at(t0, 0));
        t.insert(2, 0, false, at(t0, 1));
        t.insert(3, 0, false, at(t0, 2));
        // Flow 1 is used again: 2 is now the least recently used.
        assert!(t.get_mut(&1, at(t0, 3)).is_some());
        assert_eq!(t.make_room(|done| *done), Room::Evicted);
        assert!(t.get_mut(&2, at(t0, 4)).is_none(), "2 went");
        assert_eq!(t.len(), 2);
        // 3 is idle since it came; 1 was used at 3 ms: 3 goes next.
        assert_eq!(t.make_room(|done| *done), Room::Evicted);
        assert!(t.get_mut(&3, at(t0, 5)).is_none(), "3 went");
        assert_eq!(t.make_room(|done| *done), Room::Evicted);
        assert_eq!(t.make_room(|done| *done), Room::Empty);
        assert_eq!(t.len(), 0);
        assert_eq!(t.source_len(&0), 0);
    }

    #[test]
    fn finished_flows_are_freed_before_live_ones_are_evicted() {
        let t0 = Instant::now();
        let mut t: FlowTable<u32, u8, bool> = FlowTable::default();
        t.insert(1, 0, false, at(t0, 0));
        t.insert(2, 0, true, at(t0, 1));
        t.get_mut(&1, at(t0, 2));
        assert_eq!(t.make_room(|done| *done), Room::Freed);
        assert_eq!(t.len(), 1);
        assert!(t.get_mut(&1, at(t0, 3)).is_some());
    }

    #[test]
    fn a_replaced_key_leaves_no_live_duplicate_ticket() {
        let t0 = Instant::now();
        let mut t: FlowTable<u32, u8, u32> = FlowTable::default();
        t.insert(7, 0, 1, at(t0, 0));
        t.insert(9, 0, 0, at(t0, 0));
        t.remove(&7);
        t.insert(7, 0, 2, at(t0, 1));
        t.insert(8, 0, 3, at(t0, 2));
        assert_eq!(
            t.tickets(),
            4,
            "one stale ticket until it reaches the front"
        );
        assert_eq!(t.source_len(&0), 3);
        t.remove(&9);
        // The stale ticket is skipped; the new flow 7 is the oldest live one.
        assert_eq!(t.make_room(|_| false), Room::Evicted);
        assert!(t.get_mut(&7, at(t0, 3)).is_none());
        assert_eq!(*t.get_mut(&8, at(t0, 3)).unwrap(), 3);
        t.retain(|_| true);
        assert_eq!(t.tickets(), 1, "retain drops stale tickets");
        // Inserting a key that is present replaces it without a second count.
        t.insert(8, 0, 4, at(t0, 4));
        assert_eq!((t.len(), t.source_len(&0)), (1, 1));
    }

    #[test]
    fn the_heaviest_source_gives_up_a_flow_first() {
        let t0 = Instant::now();
        let mut t: FlowTable<u32, char, ()> = FlowTable::default();
        for (k, s) in [(1, 'a'), (2, 'a'), (3, 'a'), (4, 'b'), (5, 'b'), (6, 'c')] {
            t.insert(k, s, (), at(t0, k.into()));
        }
        assert_eq!(t.make_room(|_| false), Room::Evicted);
        assert_eq!(
            [t.source_len(&'a'), t.source_len(&'b'), t.source_len(&'c')],
            [2, 2, 1]
        );
        assert!(t.get_mut(&1, at(t0, 9)).is_none(), "a's oldest went");
        // Now a and b tie; two more evictions leave one flow each.
        t.make_room(|_| false);
        t.make_room(|_| false);
        assert_eq!(
            [t.source_len(&'a'), t.source_len(&'b'), t.source_len(&'c')],
            [1, 1, 1]
        );
        // At the per-source limit a source recycles its own flow, never another's.
        t.insert(7, 'c', (), at(t0, 10));
        assert_eq!(t.make_room_from('c', |_| false), Room::Evicted);
        assert!(t.get_mut(&6, at(t0, 11)).is_none(), "c's oldest went");
        assert_eq!(t.len(), 3);
        t.retain(|_| false);
        assert_eq!((t.len(), t.heaviest, t.sources.len()), (0, 0, 0));
        assert_eq!(t.make_room(|_| false), Room::Empty);
    }

    /// A flood of new keys from one source at the limit, beside many sources with one flow
    /// each: the flood evicts only its own flows, and each new flow makes room with a bounded
    /// number of ticket pops on average (the amortised O(1) claim), whatever the table size.
    #[test]
    fn a_flood_evicts_its_own_flows_and_making_room_stays_cheap() {
        let t0 = Instant::now();
        let max = 16_384u32;
        let victims = max / 2;
        let flood = u32::MAX;
        let mut t: FlowTable<u32, u32, ()> = FlowTable::default();
        // Half the table: one flow for each of `victims` sources (source = key).
        for k in 0..victims {
            t.insert(k, k, (), at(t0, 0));
        }
        // The other half: the flooding source; half of its flows stay busy.
        for k in victims..max {
            t.insert(k, flood, (), at(t0, 0));
        }
        for k in (victims..max).step_by(2) {
            t.get_mut(&k, at(t0, 1));
        }
        let new_flows = 2 * max as u64;
        for (i, k) in (max..max * 3).enumerate() {
            assert_eq!(t.make_room(|_| false), Room::Evicted);
            t.insert(k, flood, (), at(t0, 2 + i as u64));
            assert_eq!(t.len(), max as usize);
        }
        assert_eq!(t.source_len(&flood), (max - victims) as usize);
        for k in 0..victims {
            assert_eq!(t.source_len(&k), 1, "victim {k} kept its flow");
        }
        // One pop per eviction plus one per re-queue of a busy flow (at most `max / 4` here).
        assert!(
            t.popped <= new_flows + u64::from(max / 4),
            "{} pops for {new_flows} new flows",
            t.popped
        );
        assert!(
            t.tickets() <= 2 * max as usize,
            "tickets stay bounded: {}",
            t.tickets()
        );
    }
}
