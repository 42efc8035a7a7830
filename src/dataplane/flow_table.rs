//! The UDP flow table with an eviction order that costs amortised O(1) per new flow.
//!
//! At `limits.max_udp_flows`, every new flow must first make room. Scanning all flows for the
//! least recently used one made a flood of new client ports at the limit cost O(n) per datagram
//! (16,384 flows by default). Here a FIFO queue holds one ticket per flow, stamped with the
//! flow's last use when it was queued. Making room pops tickets from the front: a ticket whose
//! flow has been used since is re-queued with the new stamp (the "second chance" of the clock
//! algorithm), a finished flow is dropped for free, and the first flow idle since its stamp is
//! evicted. Each re-queue is paid for by a use, so the work per new flow is amortised O(1),
//! and what is evicted is a flow that was idle longest among those at the front: least recently
//! used, approximately.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Instant;

struct Slot<V> {
    value: V,
    /// Identifies this flow's ticket (a key can come back as a new flow).
    id: u64,
    last: Instant,
}

/// What [`FlowTable::make_room`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Room {
    /// A finished flow was dropped.
    Freed,
    /// A live flow was evicted.
    Evicted,
    /// The table is empty.
    Empty,
}

pub(super) struct FlowTable<K, V> {
    slots: HashMap<K, Slot<V>>,
    queue: VecDeque<(K, u64, Instant)>,
    next_id: u64,
    /// Tickets popped by `make_room`, in all (what the amortised bound is about).
    popped: u64,
}

impl<K: Hash + Eq + Copy, V> Default for FlowTable<K, V> {
    fn default() -> Self {
        FlowTable {
            slots: HashMap::new(),
            queue: VecDeque::new(),
            next_id: 0,
            popped: 0,
        }
    }
}

impl<K: Hash + Eq + Copy, V> FlowTable<K, V> {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The flow's value, marking it used at `now`.
    pub(super) fn get_mut(&mut self, key: &K, now: Instant) -> Option<&mut V> {
        self.slots.get_mut(key).map(|s| {
            s.last = now;
            &mut s.value
        })
    }

    pub(super) fn remove(&mut self, key: &K) -> Option<V> {
        // Its ticket goes stale and is dropped when it reaches the front.
        self.slots.remove(key).map(|s| s.value)
    }

    /// Adds (or replaces) a flow, used at `now`.
    pub(super) fn insert(&mut self, key: K, value: V, now: Instant) {
        let id = self.next_id;
        self.next_id += 1;
        self.slots.insert(
            key,
            Slot {
                value,
                id,
                last: now,
            },
        );
        self.queue.push_back((key, id, now));
    }

    /// Frees one place: drops a finished flow (`done`) or evicts the least recently used one.
    pub(super) fn make_room(&mut self, done: impl Fn(&V) -> bool) -> Room {
        while let Some((key, id, stamp)) = self.queue.pop_front() {
            self.popped += 1;
            let Some(slot) = self.slots.get(&key).filter(|s| s.id == id) else {
                continue; // stale ticket: that flow was removed or replaced
            };
            if done(&slot.value) {
                self.slots.remove(&key);
                return Room::Freed;
            }
            if slot.last > stamp {
                self.queue.push_back((key, id, slot.last));
                continue;
            }
            self.slots.remove(&key);
            return Room::Evicted;
        }
        Room::Empty
    }

    /// Keeps the flows `keep` says to keep, and drops stale tickets.
    pub(super) fn retain(&mut self, keep: impl Fn(&V) -> bool) {
        self.slots.retain(|_, s| keep(&s.value));
        let slots = &self.slots;
        self.queue
            .retain(|(k, id, _)| slots.get(k).is_some_and(|s| s.id == *id));
    }

    #[cfg(test)]
    fn tickets(&self) -> usize {
        self.queue.len()
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
        let mut t: FlowTable<u32, bool> = FlowTable::default();
        t.insert(1, false, at(t0, 0));
        t.insert(2, false, at(t0, 1));
        t.insert(3, false, at(t0, 2));
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
    }

    #[test]
    fn finished_flows_are_freed_before_live_ones_are_evicted() {
        let t0 = Instant::now();
        let mut t: FlowTable<u32, bool> = FlowTable::default();
        t.insert(1, false, at(t0, 0));
        t.insert(2, true, at(t0, 1));
        t.get_mut(&1, at(t0, 2));
        assert_eq!(t.make_room(|done| *done), Room::Freed);
        assert_eq!(t.len(), 1);
        assert!(t.get_mut(&1, at(t0, 3)).is_some());
    }

    #[test]
    fn a_replaced_key_leaves_no_live_duplicate_ticket() {
        let t0 = Instant::now();
        let mut t: FlowTable<u32, u32> = FlowTable::default();
        t.insert(7, 1, at(t0, 0));
        t.remove(&7);
        t.insert(7, 2, at(t0, 1));
        t.insert(8, 3, at(t0, 2));
        assert_eq!(
            t.tickets(),
            3,
            "one stale ticket until it reaches the front"
        );
        // The stale ticket is skipped; the new flow 7 is the oldest live one.
        assert_eq!(t.make_room(|_| false), Room::Evicted);
        assert!(t.get_mut(&7, at(t0, 3)).is_none());
        assert_eq!(*t.get_mut(&8, at(t0, 3)).unwrap(), 3);
        t.retain(|_| true);
        assert_eq!(t.tickets(), 1, "retain drops stale tickets");
    }

    /// A flood of new keys at the limit: each new flow makes room with a bounded number of
    /// ticket pops on average (the amortised O(1) claim), whatever the table size.
    #[test]
    fn making_room_under_a_flood_stays_cheap() {
        let t0 = Instant::now();
        let max = 16_384u32;
        let mut t: FlowTable<u32, ()> = FlowTable::default();
        for k in 0..max {
            t.insert(k, (), at(t0, 0));
        }
        // Half of the flows stay busy.
        for k in (0..max).step_by(2) {
            t.get_mut(&k, at(t0, 1));
        }
        let new_flows = 2 * max as u64;
        for (i, k) in (max..max * 3).enumerate() {
            assert_eq!(t.make_room(|_| false), Room::Evicted);
            t.insert(k, (), at(t0, 2 + i as u64));
            assert_eq!(t.len(), max as usize);
        }
        // One pop per eviction plus one per re-queue of a busy flow (at most `max / 2` here).
        assert!(
            t.popped <= new_flows + u64::from(max / 2),
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
