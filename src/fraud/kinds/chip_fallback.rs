//! `chip_fallback`: the magnetic stripe was read after a chip failure (DE22 starts with 80).

use super::super::model::Seen;

pub(in crate::fraud) struct ChipFallback;

impl ChipFallback {
    pub(in crate::fraud) fn compile() -> (Self, String) {
        (Self, "chip fallback to magnetic stripe".into())
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        s.txn.entry_mode.is_some_and(|e| e.starts_with("80"))
    }
}
