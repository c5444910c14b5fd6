//! `block_list`: the PAN HMAC or a card-range prefix is listed.

use std::collections::HashSet;

use super::super::model::Seen;

pub(in crate::fraud) struct BlockList {
    hmacs: HashSet<String>,
    ranges: Vec<String>,
}

impl BlockList {
    pub(in crate::fraud) fn compile(pan_hmacs: &[String], ranges: Vec<String>) -> (Self, String) {
        (
            Self {
                hmacs: pan_hmacs.iter().map(|h| h.to_ascii_lowercase()).collect(),
                ranges,
            },
            "card or range on the block list".into(),
        )
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        self.hmacs.contains(t.pan_hmac) || self.ranges.iter().any(|p| t.pan.starts_with(p.as_str()))
    }
}
