//! `card_not_present`: the entry mode (DE22, first two digits) is a card-not-present one and the
//! amount is above `max_amount_minor`.

use super::super::model::Seen;

pub(in crate::fraud) struct CardNotPresent {
    modes: Vec<String>,
    max: u64,
}

impl CardNotPresent {
    pub(in crate::fraud) fn compile(
        entry_modes: Vec<String>,
        max_amount_minor: u64,
    ) -> (Self, String) {
        (
            Self {
                modes: entry_modes,
                max: max_amount_minor,
            },
            format!("card not present above {max_amount_minor} minor units"),
        )
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        t.amount > self.max
            && t.entry_mode
                .is_some_and(|e| self.modes.iter().any(|m| e.starts_with(m.as_str())))
    }
}
