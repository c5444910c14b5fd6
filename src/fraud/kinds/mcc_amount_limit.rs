//! `mcc_amount_limit`: the amount is above the limit for the MCC.

use std::collections::HashMap;

use super::super::model::MccLimit;
use super::super::model::Seen;

pub(in crate::fraud) struct MccAmountLimit(HashMap<u16, u64>);

impl MccAmountLimit {
    pub(in crate::fraud) fn compile(limits: &[MccLimit]) -> (Self, String) {
        (
            Self(limits.iter().map(|l| (l.mcc, l.max_amount_minor)).collect()),
            "amount above the MCC's limit".into(),
        )
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        t.mcc
            .and_then(|m| self.0.get(&m))
            .is_some_and(|limit| t.amount > *limit)
    }
}
