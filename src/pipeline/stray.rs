//! Replies from acquirers that nobody waits for: a late reply is recorded against its
//! transaction, and an approval that no queued reversal covers yet is reversed.

use std::sync::atomic::Ordering;

use tracing::warn;

use super::{build, Pipeline};
use crate::journal::{Change, SafKind, StateChange};
use crate::upstream::{Endpoint, Stray};

impl Pipeline {
    /// A reply from `endpoint` nobody waited for: a late one is recorded against its
    /// transaction; an approval no reversal covers yet is reversed.
    pub async fn stray(&self, endpoint: &Endpoint, stray: Stray) {
        let (txn_id, reply) = match stray {
            Stray::Late { txn_id, reply } => {
                self.counters.late_replies.fetch_add(1, Ordering::Relaxed);
                (Some(txn_id), reply)
            }
            Stray::Unmatched { reply } => {
                self.counters
                    .unmatched_replies
                    .fetch_add(1, Ordering::Relaxed);
                (None, reply)
            }
        };
        let code = reply
            .response_code()
            .map_or_else(|| "--".to_owned(), |c| c.to_string());
        let approved = reply.response_code().is_some_and(|c| c.is_approved());
        let mut change = Change::default();
        if let Some(id) = txn_id {
            change.states.push(StateChange {
                txn_id: id,
                to: None,
                from: std::borrow::Cow::Borrowed(&[]),
                amount_reversed_minor: None,
                upstream_stan: None,
                cause: "late reply".into(),
                detail: Some(format!("{} {code}", reply.mti())),
            });
        }
        let covered = match txn_id {
            Some(id) => self.journal.saf_reversal_covers(id).await.unwrap_or(false),
            None => false,
        };
        if approved && !covered && matches!(reply.mti().class(), 1 | 2) {
            if let (Some(stan), Some(request_mti)) = (reply.stan(), Some(reply.mti().request())) {
                let mut as_request = reply.clone();
                as_request.set_mti(request_mti);
                let pan = reply.pan();
                let rev = build::auto_reversal(
                    &as_request,
                    pan.as_ref(),
                    stan,
                    endpoint.sent_ids(&as_request),
                );
                let order_key = pan.as_ref().map(|p| self.journal.pan_hmac(p));
                change.saf.extend(self.saf_entry(
                    endpoint,
                    SafKind::Reversal,
                    &rev,
                    txn_id,
                    order_key,
                ));
                self.counters.auto_reversals.fetch_add(1, Ordering::Relaxed);
                warn!(
                    endpoint = endpoint.name(),
                    late = txn_id.is_some(),
                    "approval nobody waited for: reversed"
                );
            }
        }
        if !change.states.is_empty() || !change.saf.is_empty() {
            self.journal.submit(change).await;
        }
    }
}
