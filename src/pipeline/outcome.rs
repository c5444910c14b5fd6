//! How one request ended, before it is journaled, and the one place it becomes its journal row.

use std::sync::Arc;
use std::time::Duration;

use cardswitch_codec::Message;
use cardswitch_routing::Failure;

use super::build::Partial;
use crate::dedup::Guard;
use crate::journal::{Change, DecidedBy, Row};
use crate::settlement;
use crate::state::TxnState;
use crate::upstream::Endpoint;

/// How one request ended, before it is journaled.
pub(super) struct Outcome {
    pub(super) reply: Message,
    pub(super) decided_by: DecidedBy,
    pub(super) state: TxnState,
    pub(super) route: Option<String>,
    pub(super) endpoint: Option<String>,
    pub(super) link: Option<Arc<str>>,
    pub(super) upstream_stan: Option<u32>,
    pub(super) original_id: Option<i64>,
    pub(super) amount_reversed: Option<i64>,
    /// Decoded to the acquirer asked (checks, routing).
    pub(super) routing: Option<Duration>,
    pub(super) upstream: Option<Duration>,
    /// Time spent on the HSM (PIN translation) inside the pipeline.
    pub(super) hsm: Option<Duration>,
    /// Time spent on the fraud rules.
    pub(super) fraud_time: Option<Duration>,
    /// The PAN's HMAC, when the pipeline computed it already (the journal row reuses it).
    pub(super) pan_hmac: Option<String>,
    /// The fraud rules that fired, for the journal.
    pub(super) fraud: Option<String>,
    /// The business date, when the endpoint's reply or the send time fixed it.
    pub(super) business_date: Option<time::Date>,
    /// What else the transaction writes.
    pub(super) change: Change,
    /// The claimed duplicate key.
    pub(super) guard: Option<Guard>,
    /// The duplicate key and content hash of a request answered without a claim (the
    /// database could not be asked): written with its row.
    pub(super) unclaimed: Option<(String, String)>,
    /// An acquirer approval: reversed if it cannot be recorded.
    pub(super) reversal_if_unrecorded: Option<(Arc<Endpoint>, u32)>,
    /// What a partial approval approved (the amount journaled, and reversed if need be).
    pub(super) partial: Option<Partial>,
    /// The transaction id, once one was given.
    pub(super) txn_id: Option<i64>,
}

impl Outcome {
    pub(super) fn new(reply: Message, decided_by: DecidedBy, state: TxnState) -> Self {
        Self {
            reply,
            decided_by,
            state,
            route: None,
            endpoint: None,
            link: None,
            upstream_stan: None,
            original_id: None,
            amount_reversed: None,
            routing: None,
            upstream: None,
            hsm: None,
            fraud_time: None,
            pan_hmac: None,
            fraud: None,
            business_date: None,
            change: Change::default(),
            guard: None,
            unclaimed: None,
            reversal_if_unrecorded: None,
            partial: None,
            txn_id: None,
        }
    }

    pub(super) fn switch(reply: Message) -> Self {
        Self::new(reply, DecidedBy::Switch, TxnState::Declined)
    }

    /// The switch's refusal of `request` with the code of `f`.
    pub(super) fn refused(request: &Message, f: Failure) -> Option<Self> {
        request.response_with(f.response_code()).map(Self::switch)
    }

    /// The journal row of this outcome, the one place where what the pipeline learnt on the
    /// way joins what the journal reads off request and reply (`row`). Moves the row's parts
    /// out of the outcome.
    pub(super) fn journal_row(
        &mut self,
        mut row: Row,
        decode: Duration,
        business_date: time::Date,
        batch_number: Option<String>,
    ) -> Row {
        let micros = |d: Option<Duration>| d.and_then(|d| i64::try_from(d.as_micros()).ok());
        row.route = self.route.take();
        row.endpoint = self.endpoint.clone();
        row.link = self.link.take().map(|l| l.to_string());
        row.t_upstream_us = micros(self.upstream);
        row.t_route_us = micros(self.routing);
        row.t_decode_us = micros(Some(decode));
        row.state = self.state;
        row.upstream_stan = self.upstream_stan.map(|s| format!("{s:06}"));
        row.original_id = self.original_id;
        row.amount_reversed_minor = self.amount_reversed;
        row.fraud = self.fraud.take();
        row.business_date = Some(settlement::format_date(business_date));
        row.batch_number = batch_number;
        if let Some(p) = &self.partial {
            row.set_amount_approved(p.amount);
        }
        if let Some(id) = self.txn_id {
            row.set_id(id);
        }
        row
    }
}
