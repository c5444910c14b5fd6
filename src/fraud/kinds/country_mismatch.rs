//! `country_mismatch`: the card range's country (table `card_ranges`) differs from DE19, or
//! with `currency = true` its currency from DE49.

use super::super::model::Seen;

pub(in crate::fraud) struct CountryMismatch {
    currency: bool,
}

impl CountryMismatch {
    pub(in crate::fraud) fn compile(currency: bool) -> (Self, String) {
        let reason = if currency {
            "card country or currency differs from the transaction's"
        } else {
            "card country differs from the transaction's"
        };
        (Self { currency }, reason.into())
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        s.card_home().is_some_and(|h| {
            t.country.is_some_and(|c| c != h.country)
                || (self.currency && t.currency.is_some_and(|c| c != h.currency))
        })
    }
}
