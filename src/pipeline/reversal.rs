//! Terminal reversals (0400/0420 and repeats): matched to their original in the journal, sent
//! to the acquirer named the way it knows the original (DE90 from the STAN and DE7 it saw), or
//! queued for store-and-forward when it cannot be reached; the original's state and reversed
//! amount change in the same database transaction. A reversal of an original the switch never
//! saw is an orphan.

use std::time::{Duration, Instant};

use cardswitch_codec::{Message, Pan, ResponseCode};
use cardswitch_routing::Failure;
use tracing::warn;

use super::card::CardMessage;
use super::outcome::Outcome;
use super::{build, Pipeline};
use crate::dedup::Dedup;
use crate::journal::ahead::Forward;
use crate::journal::{DecidedBy, Original, OriginalKeys, SafKind, StateChange};
use crate::state::TxnState;
use crate::upstream::{Ahead, Endpoint, Upstream};

impl Pipeline {
    /// A terminal's reversal (0400/0420 and repeats), matched to its original.
    pub(super) async fn reversal(&self, card: &CardMessage<'_>) -> Option<Outcome> {
        let CardMessage {
            listener,
            request,
            txn_id,
            pan,
            ..
        } = *card;
        let is_advice = request.mti().function() == 2;
        let keys = keys_of(request);
        let mut original = self.journal.find_original(&keys).await;
        // Not journaled yet: it may still be in flight here (its terminal gave up on it first).
        // Its outcome is waited for, then it is looked up again.
        if matches!(original, Ok(None)) {
            let in_flight = match build::original_named(request) {
                Some(o) => self.dedup.wait_in_flight(&Dedup::key(listener, &o)).await,
                None => false,
            };
            if in_flight {
                original = self.journal.find_original(&keys).await;
            }
        }
        // Not journaled, but forwarded (on another node, or by a run that died): its outcome is
        // waited for as long as its request may take; a record still unresolved then belongs to
        // a node that is gone, and the reversal is named as the acquirer saw the original.
        if matches!(original, Ok(None)) {
            match self.journal.write_ahead().find(&keys).await {
                Ok(Some(f)) => {
                    original = self.journal_outcome_of(&f, &keys).await;
                    if matches!(original, Ok(None)) {
                        return self.reversal_of_unrecorded(card, &f);
                    }
                }
                // No record: its outcome may have been committed (row written, record deleted,
                // in one transaction) since the first look-up. Looked up once more.
                Ok(None) => original = self.journal.find_original(&keys).await,
                Err(e) => original = Err(e),
            }
        }
        let original = match original {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "original look-up failed");
                return request
                    .response_with(Failure::JournalUnavailable.response_code())
                    .map(Outcome::switch);
            }
        };
        let Some(original) = original else {
            return self.orphan(request, txn_id, pan, is_advice);
        };
        let Some((to, total)) = effect_on(&original, request) else {
            return acknowledged(request, &original, TxnState::Duplicate);
        };
        let endpoint = original.endpoint.as_deref().and_then(|n| self.endpoint(n));
        let mut outcome = match endpoint {
            None => acknowledged(request, &original, to)?,
            Some(endpoint) => {
                let (o, taken) = self.forward_reversal(card, &original, endpoint, to).await?;
                if !taken {
                    // The acquirer refused it: the original stands.
                    return Some(o);
                }
                o
            }
        };
        reverses(&mut outcome, request, txn_id, &original, to, total);
        Some(outcome)
    }

    /// A terminal's reversal for the original's endpoint: a 0400 is sent now and the acquirer's
    /// answer relayed; a 0420, or a 0400 that cannot be delivered now, is acknowledged and
    /// queued as a 0420 for store-and-forward. The outcome, and whether the reversal was taken
    /// (not refused by the acquirer).
    async fn forward_reversal(
        &self,
        card: &CardMessage<'_>,
        original: &Original,
        endpoint: &Endpoint,
        to: TxnState,
    ) -> Option<(Outcome, bool)> {
        let CardMessage {
            request,
            txn_id,
            began,
            ..
        } = *card;
        let outgoing = build::outgoing_reversal(request, original, endpoint.sent_ids(request));
        let mut queue = false;
        let mut o = if request.mti().function() == 2 {
            queue = true;
            acknowledged(request, original, to)?
        } else {
            // Written down before it goes on a link, as a request is: if the switch dies before
            // the outcome is recorded, recovery repeats it as a 0420.
            let ahead = Ahead {
                journal: self.journal.write_ahead(),
                record: self.forward_record(card, original.pan_hmac.as_deref()),
            };
            let asked = Instant::now();
            match endpoint.exchange(&outgoing, txn_id, Some(&ahead)).await {
                Upstream::Reply(reply, link, stan) => {
                    let reply = Endpoint::relay(request, &reply)?;
                    let taken = build::reversal_taken(reply.response_code());
                    let mut o = Outcome::new(
                        reply,
                        DecidedBy::Acquirer,
                        if taken { to } else { TxnState::Declined },
                    );
                    o.original_id = Some(original.id);
                    o.link = Some(link);
                    o.upstream_stan = Some(stan);
                    o.routing = Some(asked.duration_since(began));
                    o.upstream = Some(asked.elapsed());
                    if !taken {
                        o.endpoint = Some(endpoint.name().to_owned());
                        return Some((o, false));
                    }
                    o
                }
                // Not delivered now (or not written down first): the switch delivers it; the
                // terminal is done.
                _ => {
                    queue = true;
                    acknowledged(request, original, to)?
                }
            }
        };
        if queue {
            self.queue_reversal(&mut o, &outgoing, endpoint, txn_id, original);
        }
        o.endpoint = Some(endpoint.name().to_owned());
        Some((o, true))
    }

    /// Queues `outgoing`, a reversal of `original`, as a 0420 for store-and-forward to
    /// `endpoint` with outcome `o`.
    pub(super) fn queue_reversal(
        &self,
        o: &mut Outcome,
        outgoing: &Message,
        endpoint: &Endpoint,
        txn_id: i64,
        original: &Original,
    ) {
        let advice = build::as_reversal_advice(outgoing);
        o.change.saf.extend(self.saf_entry(
            endpoint,
            SafKind::Reversal,
            &advice,
            Some(txn_id),
            original.pan_hmac.clone(),
        ));
    }

    /// The journaled original of forwarded request `f`, once its outcome is recorded: waited for
    /// until its endpoint's request timeout has passed since it was recorded, and 2 s more.
    async fn journal_outcome_of(
        &self,
        f: &Forward,
        keys: &OriginalKeys<'_>,
    ) -> Result<Option<Original>, sqlx::Error> {
        let timeout = self
            .endpoint(&f.endpoint)
            .map_or(Duration::from_secs(30), |e| e.config().request_timeout());
        let age = Duration::from_micros(
            u64::try_from(crate::journal::Journal::now_us() - f.created_us).unwrap_or(0),
        );
        let deadline =
            tokio::time::Instant::now() + (timeout + Duration::from_secs(2)).saturating_sub(age);
        loop {
            let found = self.journal.find_original(keys).await?;
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return Ok(found);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A terminal reversal of a request forwarded by a node that is gone before its outcome was
    /// recorded: acknowledged, and the switch's reversal of it, named as the acquirer saw it,
    /// queued (never the terminal's as it came). The gone node's record is resolved by the
    /// takeover (a second reversal of a reversed original changes nothing).
    fn reversal_of_unrecorded(&self, card: &CardMessage<'_>, f: &Forward) -> Option<Outcome> {
        let request = card.request;
        let mut o = Outcome::new(
            request.response_with(ResponseCode::APPROVED)?,
            DecidedBy::Switch,
            TxnState::Reversed,
        );
        match self.open_record(f) {
            Ok(original) => {
                o.change
                    .saf
                    .extend(self.reversal_of_record(f, &original, card.pan, None));
                o.endpoint = Some(f.endpoint.clone());
            }
            Err(e) => {
                // Left to the takeover, which meets the same record.
                warn!(txn = f.txn_id, error = %e, "terminal reversal of an unrecorded request not translated");
            }
        }
        Some(o)
    }

    /// A reversal of a transaction the switch never saw: 0400 answered 25; 0420 acknowledged
    /// and passed on to the card's endpoint (the original may have reached it before a crash).
    pub(super) fn orphan(
        &self,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        is_advice: bool,
    ) -> Option<Outcome> {
        if !is_advice {
            return Some(Outcome::new(
                request.response_with(Failure::OriginalNotFound.response_code())?,
                DecidedBy::Switch,
                TxnState::Orphan,
            ));
        }
        let mut o = Outcome::new(
            request.response_with(ResponseCode::APPROVED)?,
            DecidedBy::Switch,
            TxnState::Orphan,
        );
        if let Some(endpoint) = self
            .bins
            .lookup(pan)
            .and_then(|r| self.endpoint(&r.endpoint))
        {
            let advice = build::orphan_advice(request);
            o.change.saf.extend(self.saf_entry(
                endpoint,
                SafKind::Reversal,
                &advice,
                Some(txn_id),
                Some(self.journal.pan_hmac(pan)),
            ));
            o.endpoint = Some(endpoint.name().to_owned());
        }
        Some(o)
    }
}

/// What reversal `request` does to `original`: its new state and the total reversed; `None`
/// when nothing changes (only money that stands can be reversed: reversed already, declined,
/// or its reversal queued, or no amount left to reverse).
pub(super) fn effect_on(original: &Original, request: &Message) -> Option<(TxnState, i64)> {
    if !original.state.is_charged() {
        return None;
    }
    build::reversal_effect(
        original.amount_minor.unwrap_or(0),
        original.amount_reversed_minor.unwrap_or(0),
        request.get_str(95),
    )
}

/// The switch's 00 to reversal `request` of `original`, with the reversal in `state`.
pub(super) fn acknowledged(
    request: &Message,
    original: &Original,
    state: TxnState,
) -> Option<Outcome> {
    let mut o = Outcome::new(
        request.response_with(ResponseCode::APPROVED)?,
        DecidedBy::Switch,
        state,
    );
    o.original_id = Some(original.id);
    Some(o)
}

/// How a terminal's reversal names its original: DE41, and the STAN and DE7 from DE90 (or DE37
/// without DE90).
pub(super) fn keys_of(request: &Message) -> OriginalKeys<'_> {
    let de90 = request.get_str(90);
    OriginalKeys {
        terminal: request.terminal_id().unwrap_or(""),
        stan: de90.and_then(|d| d.get(4..10)),
        transmission_time: de90.and_then(|d| d.get(10..20)),
        rrn: request.rrn(),
    }
}

/// What reversal `request` (transaction `txn_id`) does to `original` in `outcome`'s commit: the
/// original goes to `to` with `total` reversed, if it still stands; otherwise nothing changes
/// and the reversal is a duplicate.
pub(super) fn reverses(
    outcome: &mut Outcome,
    request: &Message,
    txn_id: i64,
    original: &Original,
    to: TxnState,
    total: i64,
) {
    outcome.amount_reversed = Some(total);
    outcome.change.conditional = true;
    outcome.change.states.push(StateChange {
        txn_id: original.id,
        to: Some(to),
        from: std::borrow::Cow::Borrowed(TxnState::REVERSIBLE),
        amount_reversed_minor: Some(total),
        upstream_stan: None,
        cause: "terminal reversal".into(),
        detail: Some(format!("{} {txn_id}", request.mti())),
    });
}
