//! Transaction ids and keyed hashes: what the journal hands out and computes for every
//! transaction, without IO.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use cardswitch_codec::Pan;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::now_us;

/// The ids' epoch: 2026-01-01T00:00:00Z, in milliseconds since 1970.
const EPOCH_MS: i64 = 1_767_225_600_000;
/// Bits of the sequence within a millisecond.
const SEQ_BITS: u32 = 11;
/// Bits of the node number.
const NODE_BITS: u32 = 10;
const SEQ_MASK: i64 = (1 << SEQ_BITS) - 1;
const TIME_SHIFT: u32 = SEQ_BITS + NODE_BITS;

/// Time-ordered ids, unique across nodes by construction: milliseconds since 2026-01-01 (42
/// bits: until the year 2165) << 21 | node number (10 bits, from the `nodes` table) << 11 |
/// sequence (11 bits: 2,048 ids per millisecond; past that the next millisecond's are used).
/// Always positive. Cheap to clone; clones share the sequence.
#[derive(Debug, Clone)]
pub(super) struct Ids {
    next: Arc<AtomicI64>,
    node_bits: i64,
}

impl Ids {
    /// Ids for node number `number` (0 to 1023).
    pub(super) fn new(number: u16) -> Self {
        Self {
            next: Arc::new(AtomicI64::new(0)),
            node_bits: (i64::from(number) & ((1 << NODE_BITS) - 1)) << SEQ_BITS,
        }
    }

    /// The next id: never below the current millisecond's, always above the last one.
    pub(super) fn next(&self) -> i64 {
        let now_ms = (now_us() / 1000 - EPOCH_MS).max(0);
        let mut prev = self.next.load(Ordering::Relaxed);
        loop {
            let prev_ms = prev >> TIME_SHIFT;
            let next = if now_ms > prev_ms {
                now_ms << TIME_SHIFT | self.node_bits
            } else if prev & SEQ_MASK == SEQ_MASK {
                // This millisecond's sequence is used up: the next one's.
                (prev_ms + 1) << TIME_SHIFT | self.node_bits
            } else {
                prev + 1
            };
            match self
                .next
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }
}

/// HMAC-SHA256 under the journal's PAN key, keyed once: each use clones it instead of hashing
/// the key again.
#[derive(Clone)]
pub(super) struct Keyer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Keyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keyer([key])")
    }
}

impl Keyer {
    /// A keyer for `key`.
    pub(super) fn new(key: &[u8]) -> Result<Self> {
        Ok(Self {
            mac: Hmac::<Sha256>::new_from_slice(key).context("journal.pan_hmac_key")?,
        })
    }

    /// Keyed HMAC-SHA256 of a PAN, hex.
    pub(super) fn pan_hmac(&self, pan: &Pan) -> String {
        let mut mac = self.mac.clone();
        mac.update(pan.expose().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Keyed HMAC-SHA256 of the parts, each followed by `|`; the first 16 bytes, hex.
    pub(super) fn keyed_hash(&self, parts: &[&[u8]]) -> String {
        let mut mac = self.mac.clone();
        for p in parts {
            mac.update(p);
            mac.update(b"|");
        }
        hex::encode(mac.finalize().into_bytes().get(..16).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ids_rise_and_carry_the_node() {
        let ids = Ids::new(5);
        let a = ids.next();
        let b = ids.clone().next();
        assert!(b > a && a > 0);
        assert_eq!(a >> SEQ_BITS & 0x3FF, 5);
        assert_eq!(b >> SEQ_BITS & 0x3FF, 5);
    }

    #[test]
    fn a_used_up_millisecond_moves_on_without_touching_the_node_bits() {
        let ids = Ids::new(1023);
        let seen: Vec<i64> = (0..10_000).map(|_| ids.next()).collect();
        assert!(seen.windows(2).all(|w| w[1] > w[0]));
        assert!(seen.iter().all(|id| id >> SEQ_BITS & 0x3FF == 1023));
        let other = Ids::new(1022);
        let theirs: std::collections::HashSet<i64> = (0..10_000).map(|_| other.next()).collect();
        assert!(seen.iter().all(|id| !theirs.contains(id)));
    }

    #[test]
    fn ids_stay_positive_for_a_century() {
        let in_2126_ms = 4_922_899_200_000_i64 - EPOCH_MS;
        let id = in_2126_ms << TIME_SHIFT | 1023 << SEQ_BITS | SEQ_MASK;
        assert!(id > 0);
    }

    #[test]
    fn hashes_are_keyed() {
        let pan = Pan::new(b"4761739001010010").unwrap();
        let one = Keyer::new(&[1; 32]).unwrap();
        let two = Keyer::new(&[2; 32]).unwrap();
        assert_eq!(one.pan_hmac(&pan).len(), 64);
        assert_ne!(one.pan_hmac(&pan), two.pan_hmac(&pan));
        assert_eq!(one.keyed_hash(&[b"a", b"b"]).len(), 32);
        assert_ne!(one.keyed_hash(&[b"a", b"b"]), one.keyed_hash(&[b"ab"]));
    }
}
