//! What the rule kinds share: the transaction as the engine sees it, its parameters' types, and
//! the helpers of compiling and evaluating a check. No state here.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::Deserialize;

/// What a velocity rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBy {
    /// The card (its HMAC).
    Pan,
    /// DE41.
    Terminal,
    /// DE42.
    Merchant,
}

/// An MCC and its amount limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MccLimit {
    /// Merchant category code.
    pub mcc: u16,
    /// Largest amount allowed, minor units.
    pub max_amount_minor: u64,
}

/// A card range's home.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardRange {
    /// PAN prefix.
    pub prefix: String,
    /// ISO 3166 numeric country.
    pub country: u16,
    /// ISO 4217 numeric currency.
    pub currency: u16,
}

/// What the engine needs to know of a transaction, borrowed from the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Txn<'a> {
    /// PAN digits.
    pub pan: &'a str,
    /// PAN HMAC (hex), as in the journal.
    pub pan_hmac: &'a str,
    /// DE41.
    pub terminal: &'a str,
    /// DE42.
    pub merchant: &'a str,
    /// DE4, minor units.
    pub amount: u64,
    /// DE18.
    pub mcc: Option<u16>,
    /// DE49.
    pub currency: Option<u16>,
    /// DE19.
    pub country: Option<u16>,
    /// DE22.
    pub entry_mode: Option<&'a str>,
    /// YYMM (DE14 or track 2).
    pub expiry: Option<&'a str>,
    /// This month, YYMM.
    pub month: &'a str,
    /// Now, Unix seconds.
    pub now_s: u32,
}

/// What compiling one rule needs besides its own parameters.
pub(super) struct Compiling<'a> {
    /// `rule NAME`, for errors.
    pub(super) what: &'a str,
    /// Keys its state may track.
    pub(super) cap: usize,
}

/// What a check sees of one transaction.
pub(super) struct Seen<'a, 'b> {
    pub(super) txn: &'a Txn<'b>,
    /// The table key of the PAN HMAC.
    pub(super) pan_key: u64,
    /// Card ranges, longest prefix first.
    pub(super) ranges: &'a [CardRange],
    /// Terminal locations.
    pub(super) terminals: &'a HashMap<String, (f64, f64)>,
}

impl Seen<'_, '_> {
    /// The home of the transaction's card range.
    pub(super) fn card_home(&self) -> Option<&CardRange> {
        self.ranges
            .iter()
            .find(|r| self.txn.pan.starts_with(r.prefix.as_str()))
    }
}

pub(super) fn hash_str(s: &str) -> u64 {
    // SipHash with fixed keys: the same key on every node and after every reload.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

pub(super) fn km_between(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6_371.0 * h.sqrt().min(1.0).asin()
}
