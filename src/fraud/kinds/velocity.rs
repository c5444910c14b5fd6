//! `velocity`: more than `max_count` transactions, or more than `max_amount_minor`, for one key
//! (PAN, terminal or merchant) within `window_s`, this one included.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::super::model::{hash_str, KeyBy};
use super::super::model::{Compiling, Seen};
use super::super::table::{Table, Window, BUCKETS};

pub(in crate::fraud) struct Velocity {
    key: KeyBy,
    bucket_s: u32,
    max_count: Option<u32>,
    max_amount: Option<u64>,
    pub(in crate::fraud) state: Arc<Table<Window>>,
}

impl Velocity {
    pub(in crate::fraud) fn compile(
        c: &Compiling<'_>,
        prior: Option<&Self>,
        key: KeyBy,
        window_s: u32,
        max_count: Option<u32>,
        max_amount_minor: Option<u64>,
    ) -> Result<(Self, String)> {
        let what = c.what;
        if window_s < 8 {
            bail!("{what}: window_s at least 8");
        }
        if max_count.is_none() && max_amount_minor.is_none() {
            bail!("{what}: max_count or max_amount_minor is needed");
        }
        let bucket_s = window_s / u32::try_from(BUCKETS).unwrap_or(8);
        // The same rule with the same shape keeps its windows across a reload.
        let state = match prior {
            Some(v) if v.key == key && v.bucket_s == bucket_s && v.state.capacity() >= c.cap => {
                Arc::clone(&v.state)
            }
            _ => Arc::new(Table::new(c.cap)),
        };
        let reason = format!(
            "{key:?} velocity over {window_s} s{}{}",
            max_count.map_or(String::new(), |c| format!(" > {c} transactions")),
            max_amount_minor.map_or(String::new(), |a| format!(" or > {a} minor units"))
        );
        Ok((
            Self {
                key,
                bucket_s,
                max_count,
                max_amount: max_amount_minor,
                state,
            },
            reason,
        ))
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        let k = match self.key {
            KeyBy::Pan => s.pan_key,
            KeyBy::Terminal => hash_str(t.terminal),
            KeyBy::Merchant => hash_str(t.merchant),
        };
        self.state
            .with(k, t.now_s, |w| w.add(t.now_s, self.bucket_s, t.amount))
            .is_some_and(|(count, amount)| {
                self.max_count.is_some_and(|m| count > m)
                    || self.max_amount.is_some_and(|m| amount > m)
            })
    }
}
