//! Classification: each clearing record against the journal's approvals, the approvals the file
//! did not present, and the totals. Pure: the table is loaded by [`super::store`], the records
//! come from the file; nothing here does IO.

use std::collections::{BTreeMap, HashMap};

use cardswitch_codec::clearing::{kinds, ClearingRecord};

use time::Date;

use super::{Class, Item, TotalsDelta};
use crate::settlement::format_date;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JState {
    Standing,
    PartlyReversed,
    Reversed,
    StandInPending,
}

/// One approved transaction (about 100 bytes with its index entry).
#[derive(Debug, Clone)]
pub(super) struct Auth {
    pub(super) id: i64,
    /// Standing amount (after partial reversals), minor units.
    pub(super) standing: i64,
    pub(super) julian: i32,
    pub(super) state: JState,
    pub(super) credit: bool,
    pub(super) currency: [u8; 3],
    pub(super) auth: [u8; 6],
    pub(super) hmac: [u8; 32],
    pub(super) rrn: [u8; 12],
    /// Next transaction with the same RRN (u32::MAX: none).
    pub(super) next: u32,
    pub(super) presented: u32,
}

pub(super) fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(s.bytes()) {
        *o = b;
    }
    out
}

pub(super) fn hmac_bytes(hex_str: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if hex::decode_to_slice(hex_str, &mut out).is_err() {
        return [0u8; 32];
    }
    out
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) auths: Vec<Auth>,
    pub(super) by_rrn: HashMap<[u8; 12], u32>,
    /// Journal reversals with no original, on the date: (id, RRN, amount, currency).
    pub(super) orphans: Vec<(i64, String, i64, String)>,
}

pub(super) const NONE: u32 = u32::MAX;

impl Table {
    pub(super) fn push(&mut self, rrn: &str, mut a: Auth) {
        let Ok(i) = u32::try_from(self.auths.len()) else {
            return;
        };
        let key = fixed::<12>(rrn);
        a.rrn = key;
        a.next = self.by_rrn.insert(key, i).unwrap_or(NONE);
        self.auths.push(a);
    }

    /// The transaction with this RRN and card, preferring one not yet presented.
    pub(super) fn find(&self, rrn: &str, hmac: &[u8; 32]) -> Option<u32> {
        let mut i = *self.by_rrn.get(&fixed::<12>(rrn))?;
        let mut found = None;
        while let Some(a) = self.auths.get(usize::try_from(i).ok()?) {
            if &a.hmac == hmac {
                if a.presented == 0 {
                    return Some(i);
                }
                found.get_or_insert(i);
            }
            i = a.next;
        }
        found
    }

    pub(super) fn any_rrn(&self, rrn: &str) -> bool {
        self.by_rrn.contains_key(&fixed::<12>(rrn))
    }
}

/// The file's masked PAN, masked again: a file that carries more than the first six and last
/// four digits never puts them in the database or the output.
pub(super) fn remask(p: &str) -> String {
    let n = p.chars().count();
    if n <= 10 {
        return p.to_owned();
    }
    p.chars()
        .enumerate()
        .map(|(i, c)| if i < 6 || i >= n - 4 { c } else { '*' })
        .collect()
}

pub(super) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_owned()
}

pub(super) fn signed(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

/// Classifies a file record against the table; marks what it presents.
pub(super) fn classify(
    table: &mut Table,
    date_julian: i32,
    line: u64,
    rec: &ClearingRecord,
) -> Item {
    let mut item = Item {
        class: Class::Matched,
        line: Some(line),
        txn_id: None,
        rrn: rec.rrn.clone(),
        auth_code: Some(rec.auth_code.clone()),
        pan_masked: Some(remask(&rec.pan_masked)),
        kind: rec.kind.clone(),
        amount_minor: Some(signed(rec.amount_minor)),
        journal_amount_minor: None,
        currency: Some(rec.currency.clone()),
        detail: None,
    };
    let hmac = hmac_bytes(&rec.pan_hmac);
    let found = table.find(&rec.rrn, &hmac);
    match rec.kind.as_str() {
        kinds::CHARGEBACK => {
            // Linked later (the original may be older than the table).
            item.class = Class::ChargebackUnknownOriginal;
            item.detail = (!rec.reason.is_empty()).then(|| format!("reason {}", rec.reason));
            if let Some(a) = found.and_then(|i| table.auths.get(usize::try_from(i).ok()?)) {
                item.class = Class::Chargeback;
                item.txn_id = Some(a.id);
                item.journal_amount_minor = Some(a.standing);
            }
            return item;
        }
        kinds::REVERSAL => {
            let a = found.and_then(|i| table.auths.get(usize::try_from(i).ok()?));
            match a {
                Some(a) if matches!(a.state, JState::Reversed | JState::PartlyReversed) => {
                    item.txn_id = Some(a.id);
                    item.journal_amount_minor = Some(a.standing);
                }
                Some(a) => {
                    item.class = Class::OrphanReversal;
                    item.txn_id = Some(a.id);
                    item.detail = Some("the journal has the original standing".into());
                }
                None => item.class = Class::OrphanReversal,
            }
            return item;
        }
        kinds::PRESENTMENT | kinds::REFUND => {}
        other => {
            item.class = Class::UnreadableLine;
            item.detail = Some(format!("unknown record type {other:?}"));
            return item;
        }
    }
    let Some(i) = found else {
        item.class = Class::PresentedWithoutAuthorization;
        if table.any_rrn(&rec.rrn) {
            item.detail = Some("RRN known for another card".into());
        }
        return item;
    };
    let Some(a) = usize::try_from(i).ok().and_then(|i| table.auths.get_mut(i)) else {
        return item;
    };
    item.txn_id = Some(a.id);
    item.journal_amount_minor = Some(a.standing);
    a.presented += 1;
    let auth = text(&a.auth);
    let currency = text(&a.currency);
    item.class = if a.presented > 1 {
        Class::DuplicatePresentment
    } else if a.state == JState::Reversed {
        Class::ReversedButPresented
    } else if auth != rec.auth_code {
        item.detail = Some(format!("authorization code {auth} in the journal"));
        Class::PresentedWithoutAuthorization
    } else if a.julian < date_julian {
        item.detail = Some(
            Date::from_julian_day(a.julian)
                .map(|d| format!("authorized on {}", format_date(d)))
                .unwrap_or_default(),
        );
        Class::LatePresentment
    } else if currency != rec.currency {
        item.detail = Some(format!("journal currency {currency}"));
        Class::CurrencyMismatch
    } else if a.credit != (rec.kind == kinds::REFUND) {
        item.detail = Some("debit and credit differ".into());
        Class::AmountMismatch
    } else if a.standing != signed(rec.amount_minor) {
        Class::AmountMismatch
    } else {
        Class::Matched
    };
    item
}

/// The journal items the file did not present, and the orphan reversals.
pub(super) fn unpresented(table: &Table, date_julian: i32, out: &mut Vec<Item>) {
    for a in &table.auths {
        if a.presented > 0
            || a.julian != date_julian
            || a.state == JState::Reversed
            || a.standing <= 0
        {
            continue;
        }
        let class = if a.state == JState::StandInPending {
            Class::StandInNotAdvised
        } else {
            Class::AuthorizedNotPresented
        };
        out.push(Item {
            class,
            line: None,
            txn_id: Some(a.id),
            rrn: text(&a.rrn),
            auth_code: Some(text(&a.auth)),
            pan_masked: None,
            kind: if a.credit { "refund" } else { "presentment" }.into(),
            amount_minor: None,
            journal_amount_minor: Some(a.standing),
            currency: Some(text(&a.currency)),
            detail: None,
        });
    }
    for (id, rrn, amount, currency) in &table.orphans {
        out.push(Item {
            class: Class::OrphanReversal,
            line: None,
            txn_id: Some(*id),
            rrn: rrn.clone(),
            auth_code: None,
            pan_masked: None,
            kind: "reversal".into(),
            amount_minor: None,
            journal_amount_minor: Some(*amount),
            currency: Some(currency.clone()),
            detail: Some("journal reversal without an original".into()),
        });
    }
}

pub(super) fn totals(
    table: &Table,
    date_julian: i32,
    file_net: &BTreeMap<String, i64>,
) -> Vec<TotalsDelta> {
    let mut journal: BTreeMap<String, i64> = BTreeMap::new();
    for a in &table.auths {
        if a.julian == date_julian && a.state != JState::Reversed {
            let v = if a.credit { -a.standing } else { a.standing };
            *journal.entry(text(&a.currency)).or_default() += v;
        }
    }
    let mut currencies: Vec<&String> = journal.keys().chain(file_net.keys()).collect();
    currencies.sort();
    currencies.dedup();
    currencies
        .into_iter()
        .map(|c| {
            let f = file_net.get(c).copied().unwrap_or(0);
            let j = journal.get(c).copied().unwrap_or(0);
            TotalsDelta {
                currency: c.clone(),
                file_net_minor: f,
                journal_net_minor: j,
                difference_minor: f - j,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn auth(id: i64, standing: i64, julian: i32, state: JState) -> Auth {
        Auth {
            id,
            standing,
            julian,
            state,
            credit: false,
            currency: fixed("978"),
            auth: fixed("000001"),
            hmac: [7u8; 32],
            rrn: [b' '; 12],
            next: NONE,
            presented: 0,
        }
    }

    fn rec(rrn: &str, amount: u64) -> ClearingRecord {
        ClearingRecord {
            rrn: rrn.into(),
            auth_code: "000001".into(),
            pan_masked: "476173******0010".into(),
            pan_hmac: hex::encode([7u8; 32]),
            amount_minor: amount,
            currency: "978".into(),
            business_date: "2026-11-21".into(),
            kind: kinds::PRESENTMENT.into(),
            reason: String::new(),
        }
    }

    #[test]
    fn each_comparison_gives_its_class() {
        let day = 100;
        let mut t = Table::default();
        t.push("A", auth(1, 1000, day, JState::Standing));
        t.push("B", auth(2, 1000, day, JState::Standing));
        t.push("C", auth(3, 1000, day, JState::Reversed));
        t.push("D", auth(4, 1000, day - 2, JState::Standing));
        t.push("E", auth(5, 700, day, JState::PartlyReversed));
        t.push("F", auth(6, 1000, day, JState::Standing));
        t.push("G", auth(7, 1000, day, JState::StandInPending));
        t.push("H", auth(8, 1000, day, JState::Standing));
        let c = |t: &mut Table, r: ClearingRecord| classify(t, day, 1, &r).class;
        assert_eq!(c(&mut t, rec("A", 1000)), Class::Matched);
        assert_eq!(c(&mut t, rec("A", 1000)), Class::DuplicatePresentment);
        assert_eq!(c(&mut t, rec("B", 1001)), Class::AmountMismatch);
        assert_eq!(c(&mut t, rec("C", 1000)), Class::ReversedButPresented);
        assert_eq!(c(&mut t, rec("D", 1000)), Class::LatePresentment);
        assert_eq!(c(&mut t, rec("E", 700)), Class::Matched);
        let mut other_currency = rec("F", 1000);
        other_currency.currency = "840".into();
        assert_eq!(c(&mut t, other_currency), Class::CurrencyMismatch);
        assert_eq!(c(&mut t, rec("Z", 5)), Class::PresentedWithoutAuthorization);
        let mut other_card = rec("H", 1000);
        other_card.pan_hmac = hex::encode([8u8; 32]);
        assert_eq!(c(&mut t, other_card), Class::PresentedWithoutAuthorization);
        let mut other_auth = rec("H", 1000);
        other_auth.auth_code = "999999".into();
        assert_eq!(c(&mut t, other_auth), Class::PresentedWithoutAuthorization);
        let mut cb = rec("A", 1000);
        cb.kind = kinds::CHARGEBACK.into();
        assert_eq!(c(&mut t, cb.clone()), Class::Chargeback);
        cb.rrn = "Y".into();
        assert_eq!(c(&mut t, cb), Class::ChargebackUnknownOriginal);
        let mut rev = rec("C", 1000);
        rev.kind = kinds::REVERSAL.into();
        assert_eq!(c(&mut t, rev.clone()), Class::Matched);
        rev.rrn = "Q".into();
        assert_eq!(c(&mut t, rev), Class::OrphanReversal);
        let mut clear = rec("Z1", 5);
        clear.pan_masked = "4761739001010010".into();
        assert_eq!(
            classify(&mut t, day, 1, &clear).pan_masked.as_deref(),
            Some("476173******0010")
        );
        let mut odd = rec("A", 1);
        odd.kind = "transfer".into();
        assert_eq!(c(&mut t, odd), Class::UnreadableLine);
        // H was presented (with the wrong card and the wrong code): not "not presented".
        let mut rest = Vec::new();
        unpresented(&t, day, &mut rest);
        let rest: Vec<_> = rest.iter().map(|i| (i.txn_id, i.class)).collect();
        assert_eq!(
            rest,
            vec![(Some(7), Class::StandInNotAdvised)],
            "F was presented in another currency; G never"
        );
    }

    #[test]
    fn totals_differ_by_what_the_file_adds_or_lacks() {
        let day = 100;
        let mut t = Table::default();
        t.push("A", auth(1, 1000, day, JState::Standing));
        t.push("B", auth(2, 500, day, JState::Standing));
        let mut refund = auth(3, 200, day, JState::Standing);
        refund.credit = true;
        t.push("C", refund);
        let file: BTreeMap<String, i64> = [("978".to_owned(), 1000 - 200)].into();
        let d = totals(&t, day, &file);
        assert_eq!(
            d,
            vec![TotalsDelta {
                currency: "978".into(),
                file_net_minor: 800,
                journal_net_minor: 1300,
                difference_minor: -500
            }]
        );
    }
}
