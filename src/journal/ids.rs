//! Transaction ids and keyed hashes: what the journal hands out and computes for every
//! transaction, without IO.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use cardswitch_codec::Pan;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::now_us;

/// Time-ordered ids, unique across nodes: milliseconds << 22 | node (10 bits) << 12 | sequence.
/// Cheap to clone; clones share the sequence.
#[derive(Debug, Clone)]
pub(super) struct Ids {
    next: Arc<AtomicI64>,
    node_bits: i64,
}

impl Ids {
    /// Ids for the node named `node` (its name hashed to 10 bits).
    pub(super) fn new(node: &str) -> Self {
        let node_hash = node
            .bytes()
            .fold(0i64, |h, b| (h * 31 + i64::from(b)) & 0x3FF);
        Self {
            next: Arc::new(AtomicI64::new(0)),
            node_bits: node_hash << 12,
        }
    }

    /// The next id: never below the current millisecond's, always above the last one.
    pub(super) fn next(&self) -> i64 {
        let base = (now_us() / 1000) << 22 | self.node_bits;
        let mut prev = self.next.load(Ordering::Relaxed);
        loop {
            let next = base.max(prev + 1);
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
        let ids = Ids::new("node-a");
        let a = ids.next();
        let b = ids.clone().next();
        assert!(b > a);
        assert_eq!(a >> 12 & 0x3FF, ids.node_bits >> 12);
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
