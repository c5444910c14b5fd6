//! The record step: an answered card, reversal or batch message is journaled with everything it
//! changes (its row, queued reversals and advices, the original's state, its duplicate key) in
//! one database transaction, before the reply goes out in durable mode.

use std::time::{Duration, Instant};

use cardswitch_codec::{Dialect, Message};
use cardswitch_routing::Failure;

use super::outcome::Outcome;
use super::{build, Pipeline};
use crate::dedup::Decision;
use crate::journal::{Change, DecidedBy, StateChange};
use crate::settlement::{self, batch};
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
        let is_reversal = super::MessageClass::of(request.mti()) == super::MessageClass::Reversal;
        let mut decision = Decision::of(&outcome.reply);
        let mut change = std::mem::take(&mut outcome.change);
        if outcome.endpoint.is_some() {
            // Its write-ahead records, if any, go with its row.
            change.resolves.push(txn_id);
        }
        change.rows.push(row);
        if let Some(g) = &outcome.guard {
            change.dedup_done = Some((g.key().to_owned(), decision.seal(&self.journal)));
            change.dedup_claim = Some((g.hash().to_owned(), txn_id));
        }
        if let Some((key, hash)) = outcome.unclaimed.take() {
            self.dedup.remember(&key, &hash, &decision);
            change.dedup_unclaimed = Some((key, hash, txn_id, decision.seal(&self.journal)));
        }
        let journal_started = Instant::now();
        let result = self.journal.try_submit(change).await;
        self.metrics
            .stage(Stage::Journal, journal_started.elapsed());
        match result {
            Ok(committed) if committed.ok || !self.journal.is_durable() => {}
            Ok(_) => {
                // The writer is gone: nothing will be written.
                self.refuse_unrecorded(outcome);
                decision = Decision::of(&outcome.reply);
            }
            Err(change) if outcome.decided_by == DecidedBy::Duplicate => {
                // A copy answered with its first's decision: that decision stands (it is
                // recorded already); only this copy's row waits for the database.
                self.journal.keep(*change).await;
            }
            Err(mut change) if is_reversal && self.journal.is_durable() => {
                // The reversal is kept and applied once the database is back: the terminal is
                // told 96 now, and its repeat gets the acknowledgement (the decision stored).
                self.refuse_unrecorded(outcome);
                change.answered_unrecorded();
                if let Some(row) = change.rows.iter_mut().find(|r| r.id() == txn_id) {
                    row.set_reply_summary(dialect, &outcome.reply);
                }
                self.journal.keep(*change).await;
            }
            Err(mut change) => {
                if self.journal.is_durable() {
                    self.unrecorded(request, dialect, outcome, txn_id, &mut change);
                    decision = Decision::of(&outcome.reply);
                    if let Some(g) = &outcome.guard {
                        // A copy is answered what this terminal is told.
                        change.dedup_done =
                            Some((g.key().to_owned(), decision.seal(&self.journal)));
                        change.dedup_claim = Some((g.hash().to_owned(), txn_id));
                    }
                }
                self.journal.keep(*change).await;
            }
        }
        if let Some(g) = outcome.guard.take() {
            g.complete(&decision);
        }
    }

    fn refuse_unrecorded(&self, outcome: &mut Outcome) {
        outcome
            .reply
            .set_response_code(Failure::JournalUnavailable.response_code());
        outcome.reply.remove(38);
    }

    /// A durable commit failed: the terminal is not told of an approval that is not recorded,
    /// an acquirer's approval is reversed, and `change` becomes what must be written instead:
    /// the 96, the reversal, no stand-in advice.
    fn unrecorded(
        &self,
        request: &Message,
        dialect: &Dialect,
        outcome: &mut Outcome,
        txn_id: i64,
        change: &mut Change,
    ) {
        self.refuse_unrecorded(outcome);
        // Built only now: the hot path does not pay for it.
        let rev = outcome
            .reversal_if_unrecorded
            .take()
            .and_then(|(endpoint, stan)| {
                let pan = build::card_pan(request);
                let partial = outcome.partial.as_ref();
                self.auto_reversal_entry(request, pan.as_ref(), &endpoint, stan, txn_id, partial)
            });
        if let Some(rev) = rev {
            change.saf.push(rev);
            change.states.push(StateChange {
                txn_id,
                to: None,
                from: std::borrow::Cow::Borrowed(&[]),
                amount_reversed_minor: None,
                upstream_stan: None,
                cause: "journal unavailable".into(),
                detail: Some("answered 96; acquirer approval reversed".into()),
            });
        }
        change.answered_unrecorded();
        if let Some(row) = change.rows.iter_mut().find(|r| r.id() == txn_id) {
            row.set_reply_summary(dialect, &outcome.reply);
        }
    }
}
