//! Clearing files for tests: [`inject`] puts discrepancies into a clean file by percentage
//! (drop, change an amount, duplicate, add an unknown item, add a chargeback) and says exactly
//! which, so that a reconciliation can be checked item by item at any size. The file format
//! itself is [`cardswitch_codec::clearing`], re-exported here.

use anyhow::Result;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use cardswitch_codec::clearing::{kinds, read, write, ClearingError, ClearingRecord};

/// HMAC-SHA256 of a PAN under `key`, hex (as the switch's journal computes it).
#[must_use]
pub fn pan_hmac(key: &[u8], pan: &str) -> String {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(pan.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// Discrepancies to inject, each in percent of the clean file's presentments.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Injection {
    /// Presentments left out.
    pub drop: f64,
    /// Presentments whose amount is changed.
    pub amount: f64,
    /// Presentments listed twice.
    pub duplicate: f64,
    /// Items added that the switch never authorized.
    pub unknown: f64,
    /// Chargebacks added against presented items.
    pub chargeback: f64,
}

impl Injection {
    /// Parses `drop=1,amount=0.5,duplicate=0.5,unknown=0.5,chargeback=0.5`.
    ///
    /// # Errors
    /// An unknown name or a value that is not a percentage.
    pub fn parse(s: &str) -> Result<Self> {
        let mut out = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{part:?}: expected name=percent"))?;
            let v: f64 = v.trim().parse()?;
            anyhow::ensure!((0.0..=100.0).contains(&v), "{part:?}: 0 to 100");
            match k.trim() {
                "drop" => out.drop = v,
                "amount" => out.amount = v,
                "duplicate" => out.duplicate = v,
                "unknown" => out.unknown = v,
                "chargeback" => out.chargeback = v,
                other => anyhow::bail!("unknown discrepancy {other:?}"),
            }
        }
        anyhow::ensure!(
            out.drop + out.amount + out.duplicate + out.chargeback <= 100.0,
            "drop + amount + duplicate + chargeback at most 100%"
        );
        Ok(out)
    }
}

/// What was injected, for checking a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injected {
    /// This RRN was left out.
    Dropped(String),
    /// This RRN's amount was changed.
    Amount(String),
    /// This RRN was listed twice.
    Duplicated(String),
    /// This RRN was made up.
    Unknown(String),
    /// A chargeback against this RRN was added.
    Chargeback(String),
}

/// Applies `inj` to a clean file (deterministic for a `seed`). Each presentment gets at most
/// one discrepancy; unknown items and chargebacks are added at the end.
#[must_use]
pub fn inject(
    clean: Vec<ClearingRecord>,
    inj: &Injection,
    seed: u64,
) -> (Vec<ClearingRecord>, Vec<Injected>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut out = Vec::with_capacity(clean.len() + clean.len() / 10);
    let mut log = Vec::new();
    let mut extra = Vec::new();
    let presentments = clean
        .iter()
        .filter(|r| r.kind == kinds::PRESENTMENT)
        .count();
    for r in clean {
        if r.kind != kinds::PRESENTMENT {
            out.push(r);
            continue;
        }
        let roll = rng.f64() * 100.0;
        let mut edge = inj.drop;
        if roll < edge {
            log.push(Injected::Dropped(r.rrn.clone()));
            continue;
        }
        edge += inj.amount;
        if roll < edge {
            let mut changed = r.clone();
            changed.amount_minor = r.amount_minor + rng.u64(1..=500);
            log.push(Injected::Amount(r.rrn.clone()));
            out.push(changed);
            continue;
        }
        edge += inj.duplicate;
        if roll < edge {
            log.push(Injected::Duplicated(r.rrn.clone()));
            out.push(r.clone());
            out.push(r);
            continue;
        }
        edge += inj.chargeback;
        if roll < edge {
            log.push(Injected::Chargeback(r.rrn.clone()));
            let mut cb = r.clone();
            cb.kind = kinds::CHARGEBACK.to_owned();
            cb.reason = "4837".to_owned();
            extra.push(cb);
        }
        out.push(r);
    }
    let unknown =
        (inj.unknown / 100.0 * f64::from(u32::try_from(presentments).unwrap_or(u32::MAX))).round();
    let template = out.first().cloned();
    if let Some(t) = template {
        let mut i = 0u64;
        while f64::from(u32::try_from(i).unwrap_or(u32::MAX)) < unknown {
            let rrn = format!("U{:011}", rng.u64(0..100_000_000_000));
            log.push(Injected::Unknown(rrn.clone()));
            extra.push(ClearingRecord {
                rrn,
                auth_code: format!("{:06}", rng.u32(0..1_000_000)),
                pan_hmac: hex::encode((0..32).map(|_| rng.u8(..)).collect::<Vec<u8>>()),
                amount_minor: rng.u64(100..100_000),
                kind: kinds::PRESENTMENT.to_owned(),
                reason: String::new(),
                ..t.clone()
            });
            i += 1;
        }
    }
    out.extend(extra);
    (out, log)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn rec(i: u64) -> ClearingRecord {
        ClearingRecord {
            rrn: format!("{i:012}"),
            auth_code: format!("{i:06}"),
            pan_masked: "476173******0010".into(),
            pan_hmac: "ab".repeat(32),
            amount_minor: 1000 + i,
            currency: "978".into(),
            business_date: "2026-11-21".into(),
            kind: kinds::PRESENTMENT.into(),
            reason: String::new(),
        }
    }

    #[test]
    fn injection_is_exact_and_deterministic() {
        let clean: Vec<_> = (0..10_000).map(rec).collect();
        let inj = Injection::parse("drop=1,amount=1,duplicate=1,unknown=1,chargeback=1").unwrap();
        let (file, log) = inject(clean.clone(), &inj, 7);
        let (file2, log2) = inject(clean, &inj, 7);
        assert_eq!((file.clone(), log.clone()), (file2, log2));
        let count = |f: fn(&Injected) -> bool| log.iter().filter(|i| f(i)).count();
        let dropped = count(|i| matches!(i, Injected::Dropped(_)));
        let dup = count(|i| matches!(i, Injected::Duplicated(_)));
        let unknown = count(|i| matches!(i, Injected::Unknown(_)));
        let cb = count(|i| matches!(i, Injected::Chargeback(_)));
        assert_eq!(unknown, 100);
        for n in [
            dropped,
            dup,
            cb,
            count(|i| matches!(i, Injected::Amount(_))),
        ] {
            assert!((50..=150).contains(&n), "{n}");
        }
        assert_eq!(file.len(), 10_000 - dropped + dup + unknown + cb);
        assert!(Injection::parse("drop=60,amount=50").is_err());
        assert!(Injection::parse("lose=1").is_err());
    }
}
