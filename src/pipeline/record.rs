//! The record step: an answered card, reversal or batch message is journaled with everything it
//! changes (its row, queued reversals and advices, the original's state, its duplicate key) in
//! one database transaction, before the reply goes out in durable mode.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cardswitch_codec::{Dialect, Message};
use cardswitch_routing::Failure;

use super::outcome::Outcome;
use super::{build, Pipeline};
use crate::dedup::Decision;
use crate::journal::{Change, SafKind, StateChange};
use crate::settlement::{self, batch};
use crate::state::TxnState;
use crate::telemetry::Stage;

/// When a message arrived and how long its decoding took.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival {
    /// Unix microseconds.
    pub(super) received_us: i64,
    pub(super) started: Instant,
    pub(super) decode: Duration,
}

impl Pipeline {
    /// Journals `outcome` and settles its duplicate claim. In durable mode a failed commit turns
    /// the reply into the journal's failure code and reverses an acquirer's approval.
    pub(super) async fn record(
        &self,
        listener: &str,
        dialect: &Dialect,
        request: &Message,
        outcome: &mut Outcome,
        arrival: Arrival,
    ) {
        let base = self.journal.row(
            listener,
            dialect,
            request,
            &outcome.reply,
            outcome.decided_by,
            arrival.received_us,
            arrival.started.elapsed(),
            outcome.pan_hmac.take(),
        );
        let day = outcome
            .business_date
            .or_else(|| {
                outcome
                    .endpoint
                    .as_deref()
                    .and_then(|e| self.endpoint(e))
                    .map(|e| e.business_day().current())
            })
            .unwrap_or_else(settlement::today);
        let row = outcome.journal_row(
            base,
            arrival.decode,
            day,
            batch::batch_of(request, self.batch_field),
        );
        let txn_id = row.id();
        let mut decision = Decision::of(&outcome.reply);
        let mut change = std::mem::take(&mut outcome.change);
        if outcome.endpoint.is_some() {
            // Its write-ahead records, if any, go with its row.
            change.resolves.push(txn_id);
        }
        change.rows.push(row);
        if let Some(g) = &outcome.guard {
            change.dedup_done = Some((g.key().to_owned(), decision.seal(&self.journal)));
        }
        let journal_started = Instant::now();
        let committed = self.journal.submit(change).await;
        self.metrics
            .stage(Stage::Journal, journal_started.elapsed());
        if !committed.ok && self.journal.is_durable() {
            self.unrecorded(request, outcome, txn_id).await;
            decision = Decision::of(&outcome.reply);
        }
        if let Some(g) = outcome.guard.take() {
            g.complete(&decision);
        }
    }

    /// A durable commit failed: the terminal is not told of an approval that is not recorded,
    /// and an acquirer's approval is reversed.
    async fn unrecorded(&self, request: &Message, outcome: &mut Outcome, txn_id: i64) {
        // Never approve what is not recorded; an acquirer's approval is reversed.
        outcome
            .reply
            .set_response_code(Failure::JournalUnavailable.response_code());
        outcome.reply.remove(38);
        // Built only now: the hot path does not pay for it.
        let rev = outcome
            .reversal_if_unrecorded
            .take()
            .and_then(|(endpoint, stan)| {
                let pan = build::card_pan(request);
                let msg =
                    build::auto_reversal(request, pan.as_ref(), stan, endpoint.sent_ids(request));
                let order_key = pan.as_ref().map(|p| self.journal.pan_hmac(p));
                self.saf_entry(&endpoint, SafKind::Reversal, &msg, Some(txn_id), order_key)
            });
        if let Some(rev) = rev {
            self.counters.auto_reversals.fetch_add(1, Ordering::Relaxed);
            self.journal
                .submit_later(Change {
                    saf: vec![rev],
                    states: vec![StateChange {
                        txn_id,
                        to: Some(TxnState::ReversalPending),
                        from: &[],
                        amount_reversed_minor: None,
                        upstream_stan: None,
                        cause: "journal unavailable".into(),
                        detail: Some("answered 96; acquirer approval reversed".into()),
                    }],
                    ..Change::default()
                })
                .await;
        }
    }
}
