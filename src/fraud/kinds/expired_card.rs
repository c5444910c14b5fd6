//! `expired_card`: the expiry (DE14 or track 2) is before this month.

use super::super::model::Seen;

pub(in crate::fraud) struct ExpiredCard;

impl ExpiredCard {
    pub(in crate::fraud) fn compile() -> (Self, String) {
        (Self, "expired card".into())
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        s.txn
            .expiry
            .is_some_and(|e| e.len() == 4 && e < s.txn.month)
    }
}
