//! `high_risk_mcc`: the MCC is listed.

use std::collections::HashSet;

use super::super::model::Seen;

pub(in crate::fraud) struct HighRiskMcc(HashSet<u16>);

impl HighRiskMcc {
    pub(in crate::fraud) fn compile(mccs: Vec<u16>) -> (Self, String) {
        (Self(mccs.into_iter().collect()), "high-risk MCC".into())
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        s.txn.mcc.is_some_and(|m| self.0.contains(&m))
    }
}
