//! `card_testing`: more than `max_distinct_cards` cards at one terminal within `window_s`.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::super::model::hash_str;
use super::super::model::{Compiling, Seen};
use super::super::table::{Distinct, Table, SEEN};

pub(in crate::fraud) struct CardTesting {
    window_s: u32,
    max: u32,
    pub(in crate::fraud) state: Arc<Table<Distinct>>,
}

impl CardTesting {
    pub(in crate::fraud) fn compile(
        c: &Compiling<'_>,
        prior: Option<&Self>,
        window_s: u32,
        max_distinct_cards: u32,
    ) -> Result<(Self, String)> {
        if max_distinct_cards == 0 || max_distinct_cards >= u32::try_from(SEEN).unwrap_or(32) {
            bail!("{}: max_distinct_cards 1 to {}", c.what, SEEN - 1);
        }
        let state = match prior {
            Some(p) if p.state.capacity() >= c.cap => Arc::clone(&p.state),
            _ => Arc::new(Table::new(c.cap)),
        };
        Ok((
            Self {
                window_s,
                max: max_distinct_cards,
                state,
            },
            format!("more than {max_distinct_cards} cards at the terminal in {window_s} s"),
        ))
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        let card = u32::try_from((s.pan_key ^ (s.pan_key >> 32)) & 0xFFFF_FFFF).unwrap_or(1);
        self.state
            .with(hash_str(t.terminal), t.now_s, |d| {
                d.add(card, t.now_s, t.now_s.saturating_sub(self.window_s))
            })
            .is_some_and(|n| n > self.max)
    }
}
