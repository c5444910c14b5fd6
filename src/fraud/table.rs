//! Fixed-memory keyed state for the fraud rules: set-associative tables that never allocate
//! after they are made.
//!
//! Hand-written rather than a map crate: the rules need a hard memory bound, no allocation on
//! insert, and O(1) eviction of the stalest entry when a set is full; general maps (std,
//! hashbrown, lru) allocate on growth or per entry and have no per-set eviction.
//!
//! A table has `sets x WAYS` slots; a key lives in the set its hash picks, in any of the `WAYS`
//! slots. When the set is full the slot touched longest ago is taken over (its history is
//! lost: the rule then under-counts that key, which is the documented cost of the bound).
//! Tables are split into shards, each behind its own mutex, so that concurrent transactions
//! rarely wait for each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Slots per set.
const WAYS: usize = 4;
/// Independent locks per table.
const SHARDS: usize = 64;

/// A slot: the key (0 = empty), when it was last touched, and the rule's value.
#[derive(Clone, Copy)]
struct Slot<V> {
    key: u64,
    touched_s: u32,
    value: V,
}

struct Shard<V> {
    slots: Box<[Slot<V>]>,
}

/// A fixed-capacity table from 64-bit keys to `V`.
pub struct Table<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    sets_per_shard: usize,
    /// Keys dropped to make room for others.
    pub evictions: AtomicU64,
}

impl<V> std::fmt::Debug for Table<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("sets_per_shard", &self.sets_per_shard)
            .finish_non_exhaustive()
    }
}

impl<V: Copy + Default> Table<V> {
    /// A table for at least `capacity` keys (rounded up to whole sets and shards).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let sets_per_shard = capacity.div_ceil(WAYS * SHARDS).max(1);
        let empty = Slot {
            key: 0,
            touched_s: 0,
            value: V::default(),
        };
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    slots: vec![empty; sets_per_shard * WAYS].into_boxed_slice(),
                })
            })
            .collect();
        Self {
            shards,
            sets_per_shard,
            evictions: AtomicU64::new(0),
        }
    }

    /// Slots in all.
    #[must_use]
    pub fn capacity(&self) -> usize {
        SHARDS * self.sets_per_shard * WAYS
    }

    /// Bytes the slots take (the table's memory, apart from a few words of bookkeeping).
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<Slot<V>>()
    }

    /// Keys present and touched at or after `since_s`.
    #[must_use]
    pub fn live(&self, since_s: u32) -> usize {
        self.shards
            .iter()
            .filter_map(|s| s.lock().ok())
            .map(|s| {
                s.slots
                    .iter()
                    .filter(|x| x.key != 0 && x.touched_s >= since_s)
                    .count()
            })
            .sum()
    }

    /// Runs `f` on the key's value (a default one for a new key), marking it touched now.
    pub fn with<R>(&self, key: u64, now_s: u32, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let key = key.max(1); // 0 marks an empty slot
        let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let shard_ix = usize::try_from(mixed >> 58).unwrap_or(0) % SHARDS;
        let set =
            usize::try_from(mixed % u64::try_from(self.sets_per_shard).unwrap_or(1)).unwrap_or(0);
        let mut shard = self.shards.get(shard_ix)?.lock().ok()?;
        let ways = shard.slots.get_mut(set * WAYS..set * WAYS + WAYS)?;
        let ix = match ways.iter().position(|s| s.key == key) {
            Some(i) => i,
            None => {
                let (i, victim) = ways
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| (s.key != 0, s.touched_s))?;
                if victim.key != 0 {
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(s) = ways.get_mut(i) {
                    *s = Slot {
                        key,
                        touched_s: now_s,
                        value: V::default(),
                    };
                }
                i
            }
        };
        let slot = ways.get_mut(ix)?;
        slot.touched_s = now_s;
        Some(f(&mut slot.value))
    }
}

/// Buckets of a sliding window.
pub const BUCKETS: usize = 8;

/// Count and amount over a sliding window of `BUCKETS` buckets (resolution: window / 8).
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// The bucket number (time / bucket width) of the newest bucket.
    head: u32,
    counts: [u16; BUCKETS],
    amounts: [u32; BUCKETS],
}

impl Window {
    /// Adds one event at `now_s` and returns the window's count and amount including it.
    pub fn add(&mut self, now_s: u32, bucket_s: u32, amount: u64) -> (u32, u64) {
        let b = now_s / bucket_s.max(1);
        if b > self.head {
            // Buckets that fell out of the window are cleared as time moves on.
            let gap = (b - self.head).min(u32::try_from(BUCKETS).unwrap_or(8));
            for k in 1..=gap {
                let ix = usize::try_from(self.head.wrapping_add(k)).unwrap_or(0) % BUCKETS;
                if let (Some(c), Some(a)) = (self.counts.get_mut(ix), self.amounts.get_mut(ix)) {
                    *c = 0;
                    *a = 0;
                }
            }
            self.head = b;
        }
        // An event from the past (clock stepped back) counts in the newest bucket.
        let ix = usize::try_from(self.head).unwrap_or(0) % BUCKETS;
        if let (Some(c), Some(a)) = (self.counts.get_mut(ix), self.amounts.get_mut(ix)) {
            *c = c.saturating_add(1);
            *a = a.saturating_add(u32::try_from(amount).unwrap_or(u32::MAX));
        }
        (
            self.counts.iter().map(|c| u32::from(*c)).sum(),
            self.amounts.iter().map(|a| u64::from(*a)).sum(),
        )
    }
}

/// Recent distinct keys (cards at a terminal), up to `SEEN` of them.
pub const SEEN: usize = 32;

/// The last distinct cards seen, with when each was last seen.
#[derive(Debug, Clone, Copy, Default)]
pub struct Distinct {
    keys: [u32; SEEN],
    at_s: [u32; SEEN],
}

impl Distinct {
    /// Notes `key` at `now_s`; returns how many distinct keys were seen since `since_s`.
    pub fn add(&mut self, key: u32, now_s: u32, since_s: u32) -> u32 {
        let key = key.max(1);
        let slot = self
            .keys
            .iter()
            .position(|k| *k == key)
            .or_else(|| {
                // The oldest (or empty) slot.
                self.at_s
                    .iter()
                    .enumerate()
                    .min_by_key(|(i, t)| (self.keys.get(*i).is_some_and(|k| *k != 0), **t))
                    .map(|(i, _)| i)
            })
            .unwrap_or(0);
        if let (Some(k), Some(t)) = (self.keys.get_mut(slot), self.at_s.get_mut(slot)) {
            *k = key;
            *t = now_s;
        }
        let live = self
            .keys
            .iter()
            .zip(&self.at_s)
            .filter(|(k, t)| **k != 0 && **t >= since_s)
            .count();
        u32::try_from(live).unwrap_or(u32::MAX)
    }
}

/// Where and when a card was last used.
#[derive(Debug, Clone, Copy, Default)]
pub struct LastSeen {
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// When, seconds.
    pub at_s: u32,
    /// Whether set.
    pub known: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn window_slides() {
        let mut w = Window::default();
        // 60 s window, 8 buckets of 7.5 s -> 7 s buckets here (integer seconds).
        for t in 0..5 {
            w.add(1_000 + t, 7, 100);
        }
        assert_eq!(w.add(1_005, 7, 100), (6, 600));
        // 7 buckets later the early ones are gone.
        assert_eq!(w.add(1_000 + 7 * 8 + 1, 7, 1), (1, 1));
    }

    #[test]
    fn table_is_bounded_and_evicts_the_stalest() {
        let t: Table<u32> = Table::new(1_000);
        let cap = t.capacity();
        assert!(cap >= 1_000);
        for k in 1..=(cap as u64 * 3) {
            t.with(k, u32::try_from(k).unwrap(), |v| *v += 1);
        }
        assert!(t.live(0) <= cap);
        assert!(t.evictions.load(Ordering::Relaxed) >= cap as u64 * 2 - cap as u64);
        // A key touched again keeps its value.
        t.with(7_777_777, 10, |v| *v = 5);
        assert_eq!(t.with(7_777_777, 11, |v| *v), Some(5));
        assert_eq!(t.bytes(), cap * std::mem::size_of::<Slot<u32>>());
    }

    #[test]
    fn distinct_counts_within_the_window() {
        let mut d = Distinct::default();
        for k in 1..=5 {
            d.add(k, 100, 0);
        }
        assert_eq!(d.add(3, 101, 0), 5);
        assert_eq!(d.add(9, 200, 150), 1);
    }
}
