//! What happens to one message from a terminal:
//! decode -> verify (MAC) -> dispatch by message class -> record (journal) -> reply.
//!
//! This file is the orchestrator. Each message class has its own file: [`card`] (authorization
//! and financial requests: fraud rules, routing, the acquirer, stand-in), [`reversal`]
//! (terminal reversals and orphans), [`network`] (08xx), [`batch`] (0500 settlement and 0320
//! upload) and [`stray`] (replies nobody waits for). [`security`] verifies MACs and translates
//! PIN blocks; [`build`] holds the messages and decisions that need no IO (DE90, automatic
//! reversals, advices, reversal amounts); [`outcome`] is how a request ended and the one place
//! it becomes a journal row; [`record`] journals it; [`observe`] feeds metrics and the live view.
//!
//! Every path ends in a reply to the terminal except a frame whose MTI and STAN cannot be read,
//! which is counted and dropped. Failures become response codes in one place
//! ([`cardswitch_routing::Failure::response_code`]). What a transaction changes (its row, the
//! reversal or advice it queues, the state of the original it reverses, its duplicate key) is
//! written in one database transaction before the reply goes out (durable mode).

mod batch;
mod build;
mod card;
mod network;
mod observe;
mod outcome;
mod record;
mod recovery;
mod reversal;
mod security;
mod stray;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cardswitch_codec::{Dialect, Message, Mti};
use cardswitch_routing::{check_mandatory, BinTable, Failure};
use tracing::{debug, info_span, Instrument};

use crate::admin::live::Live;
use crate::dedup::{Dedup, Verdict};
use crate::fraud::Rules as FraudRules;
use crate::hsm::Hsm;
use crate::journal::{DecidedBy, Journal, SafEntry, SafKind};
use crate::security::ListenerSecurity;
use crate::state::TxnState;
use crate::telemetry::PipelineMetrics;
use crate::upstream::Endpoint;
use outcome::Outcome;
use record::Arrival;

/// Counters of what the pipeline did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames received from terminals.
    pub received: AtomicU64,
    /// Frames dropped because not even their MTI and STAN could be read.
    pub dropped: AtomicU64,
    /// Replies sent.
    pub replied: AtomicU64,
    /// Copies of earlier requests answered from them.
    pub duplicates: AtomicU64,
    /// Reversals queued by the switch (timeouts, lost links, late or unmatched approvals).
    pub auto_reversals: AtomicU64,
    /// Replies from acquirers that came after their request timed out.
    pub late_replies: AtomicU64,
    /// Replies from acquirers matching nothing the switch asked.
    pub unmatched_replies: AtomicU64,
    /// Stand-in approvals.
    pub stand_in_approvals: AtomicU64,
    /// Requests being processed now.
    pub in_flight: AtomicU64,
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn new(c: &'a Counters) -> Self {
        c.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What kind of message a terminal sent, by the class digit of its MTI; each kind is handled in
/// its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageClass {
    /// 01xx and 02xx: authorization and financial requests and advices ([`card`]).
    Card,
    /// 03xx: batch-upload records ([`batch`]).
    Upload,
    /// 04xx: reversals ([`reversal`]).
    Reversal,
    /// 05xx: batch settlement ([`batch`]).
    Batch,
    /// 08xx: network management ([`network`]).
    Network,
    /// Any other class: answered as unsupported.
    Other,
}

impl MessageClass {
    fn of(mti: Mti) -> Self {
        match mti.class() {
            1 | 2 => Self::Card,
            3 => Self::Upload,
            4 => Self::Reversal,
            5 => Self::Batch,
            8 => Self::Network,
            _ => Self::Other,
        }
    }

    /// Whether the journal keeps a row of its messages.
    fn is_journaled(self) -> bool {
        matches!(
            self,
            Self::Card | Self::Upload | Self::Reversal | Self::Batch
        )
    }
}

/// Everything the pipeline needs, shared by all connections.
#[derive(Debug)]
pub struct Pipeline {
    bins: BinTable,
    endpoints: Vec<Arc<Endpoint>>,
    journal: Journal,
    dedup: Dedup,
    /// The pipeline's counters.
    pub counters: Counters,
    /// Terminal keys by listener name.
    security: HashMap<String, ListenerSecurity>,
    hsm: Option<Arc<Hsm>>,
    live: Arc<Live>,
    metrics: PipelineMetrics,
    fraud: Option<Arc<FraudRules>>,
    /// The field terminals carry their batch number in.
    batch_field: u8,
    /// The listeners whose terminals take partial approvals (DE39 10 with the approved DE4).
    partial_approvals: std::collections::HashSet<String>,
    /// Set on SIGTERM: the node is no longer ready.
    drain: crate::health::Drain,
}

impl Pipeline {
    /// A pipeline over these routes and endpoints, journaling to `journal`.
    #[must_use]
    pub fn new(bins: BinTable, endpoints: Vec<Arc<Endpoint>>, journal: Journal) -> Self {
        let longest = endpoints
            .iter()
            .map(|e| e.config().request_timeout())
            .max()
            .unwrap_or(Duration::from_secs(5));
        Self {
            bins,
            endpoints,
            dedup: Dedup::new(journal.clone(), longest + Duration::from_secs(2)),
            journal,
            counters: Counters::default(),
            security: HashMap::new(),
            hsm: None,
            live: Arc::new(Live::default()),
            metrics: PipelineMetrics::default(),
            fraud: None,
            batch_field: 60,
            partial_approvals: std::collections::HashSet::new(),
            drain: crate::health::Drain::default(),
        }
    }

    /// Sets the field terminals carry their batch number in (`[settlement] batch_field`).
    #[must_use]
    pub fn with_batch_field(mut self, field: u8) -> Self {
        self.batch_field = field;
        self
    }

    /// Names the listeners whose terminals take partial approvals; on the others a partial
    /// approval is reversed and the terminal declined (51).
    #[must_use]
    pub fn with_partial_approvals(mut self, listeners: impl IntoIterator<Item = String>) -> Self {
        self.partial_approvals = listeners.into_iter().collect();
        self
    }

    /// Adds the fraud rules.
    #[must_use]
    pub fn with_fraud(mut self, rules: Option<Arc<FraudRules>>) -> Self {
        self.fraud = rules;
        self
    }

    /// The fraud rules, when configured.
    #[must_use]
    pub fn fraud(&self) -> Option<&Arc<FraudRules>> {
        self.fraud.as_ref()
    }

    /// The live numbers (dashboard).
    #[must_use]
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// Adds card security: the HSM pool and the terminal keys of each listener.
    #[must_use]
    pub fn with_security(
        mut self,
        hsm: Option<Arc<Hsm>>,
        listeners: HashMap<String, ListenerSecurity>,
    ) -> Self {
        self.hsm = hsm;
        self.security = listeners;
        self
    }

    /// The HSM pool, when one is configured.
    #[must_use]
    pub fn hsm(&self) -> Option<&Arc<Hsm>> {
        self.hsm.as_ref()
    }

    /// The endpoints, in configured order.
    #[must_use]
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Loads the latest duplicate decisions into memory (answers copies while the journal is
    /// down, after a restart too).
    pub async fn warm_duplicates(&self) {
        self.dedup.warm().await;
    }

    /// The journal.
    #[must_use]
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Whether the node is draining (see [`crate::health`]).
    #[must_use]
    pub fn drain(&self) -> &crate::health::Drain {
        &self.drain
    }

    /// The node's readiness, with links counted as `links` asks.
    #[must_use]
    pub fn readiness(&self, links: crate::health::ReadinessLinks) -> crate::health::Readiness {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| crate::health::EndpointLinks {
                endpoint: e.name().to_owned(),
                ready: e
                    .links()
                    .iter()
                    .filter(|l| l.state() == crate::upstream::LinkState::Ready)
                    .count(),
                links: e.links().len(),
            })
            .collect();
        crate::health::Readiness::of(
            self.drain.is_draining(),
            !self.journal.breaker().is_open(),
            links,
            endpoints,
        )
    }

    pub(super) fn endpoint(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.name() == name)
    }

    /// A store-and-forward entry of `msg` for `endpoint`.
    pub(super) fn saf_entry(
        &self,
        endpoint: &Endpoint,
        kind: SafKind,
        msg: &Message,
        txn_id: Option<i64>,
        order_key: Option<String>,
    ) -> Option<SafEntry> {
        let body = endpoint.dialect().encode_to_vec(msg).ok()?;
        let cfg = &endpoint.config().saf;
        let now = Journal::now_us();
        let id = self.journal.new_id();
        Some(SafEntry {
            id,
            endpoint: endpoint.name().to_owned(),
            order_key: order_key.unwrap_or_else(|| format!("entry:{id}")),
            kind,
            mti: msg.mti().to_string(),
            txn_id,
            payload: self.journal.sealer().seal(&body),
            next_at_us: now + i64::try_from(cfg.initial_delay_ms * 1000).unwrap_or(0),
            expires_us: now + i64::try_from(cfg.expire_after_s * 1_000_000).unwrap_or(i64::MAX / 2),
        })
    }

    /// Handles one frame body from a terminal of `listener`; the reply body, if any.
    pub async fn handle(&self, listener: &str, dialect: &Dialect, body: &[u8]) -> Option<Bytes> {
        let started = Instant::now();
        let received_us = Journal::now_us();
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight::new(&self.counters);
        let decoded = dialect.decode(body);
        let decode_time = started.elapsed();
        let mut mac_time = Duration::ZERO;
        let (request, outcome) = match decoded {
            Ok(request) => {
                let span = info_span!("txn", mti = %request.mti(), stan = request.get_str(11).unwrap_or(""), rrn = request.rrn().unwrap_or(""), route = tracing::field::Empty, rc = tracing::field::Empty);
                let outcome = async {
                    let asked = Instant::now();
                    let mac = self.check_mac(listener, dialect, body, &request).await;
                    mac_time = asked.elapsed();
                    match mac {
                        Ok(()) => self.process(listener, &request).await,
                        Err(f) => Outcome::refused(&request, f),
                    }
                }
                .instrument(span.clone())
                .await;
                if let Some(rc) = outcome.as_ref().and_then(|o| o.reply.response_code()) {
                    span.record("rc", rc.as_str());
                }
                if let Some(route) = outcome.as_ref().and_then(|o| o.endpoint.as_deref()) {
                    span.record("route", route);
                }
                // One line per transaction at debug level, carrying the span's fields.
                debug!(parent: &span, us = started.elapsed().as_micros(), "answered");
                (request, outcome)
            }
            Err(e) => {
                debug!(error = %e, "undecodable request");
                // A 30 when the MTI and STAN can be read; otherwise counted and dropped.
                let Some(partial) = dialect.decode_partial(body).filter(|p| p.has(11)) else {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                let outcome = Outcome::refused(&partial, Failure::Format);
                (partial, outcome)
            }
        };
        let mut outcome = outcome?;
        if MessageClass::of(request.mti()).is_journaled() {
            let arrival = Arrival {
                received_us,
                started,
                decode: decode_time,
            };
            self.record(listener, dialect, &request, &mut outcome, arrival)
                .await;
        }
        let out = dialect.encode_to_vec(&outcome.reply).ok().map(Bytes::from);
        if out.is_some() {
            self.counters.replied.fetch_add(1, Ordering::Relaxed);
        }
        self.observe(
            listener,
            &request,
            &outcome,
            decode_time,
            mac_time,
            started.elapsed(),
        );
        out
    }

    async fn process(&self, listener: &str, request: &Message) -> Option<Outcome> {
        let began = Instant::now();
        let mti = request.mti();
        if !mti.is_request() {
            // A response from a terminal answers nothing the switch asked.
            return None;
        }
        let fail = |f: Failure| Outcome::refused(request, f);
        if check_mandatory(request).is_err() {
            return fail(Failure::Format);
        }
        let class = MessageClass::of(mti);
        match class {
            MessageClass::Network => return self.network(request).map(Outcome::switch),
            MessageClass::Batch => return self.settle_batch(request).await,
            MessageClass::Upload => return self.upload(request),
            MessageClass::Other => return fail(Failure::Unsupported),
            MessageClass::Card | MessageClass::Reversal => {}
        }
        let Some(pan) = build::card_pan(request) else {
            return fail(Failure::InvalidCard);
        };
        if !pan.luhn_valid() {
            return fail(Failure::InvalidCard);
        }
        let txn_id = self.journal.new_id();
        let key = Dedup::key(listener, request);
        let hash = self.dedup.content_hash(request, Some(&pan));
        let is_reversal = class == MessageClass::Reversal;
        // Nothing is asked of an acquirer while nothing can be recorded: only what this node
        // knows of a copy is answered.
        let offline = self.journal.is_durable() && self.journal.breaker().is_open();
        let verdict = if offline {
            self.dedup.check_offline(&key, &hash).await
        } else {
            self.dedup
                .check(key.clone(), hash.clone(), txn_id, is_reversal)
                .await
        };
        let guard = match verdict {
            Verdict::Go(guard) => guard,
            Verdict::Replay(decision) => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                let reply = decision.reply_to(request)?;
                return Some(Outcome::new(
                    reply,
                    DecidedBy::Duplicate,
                    TxnState::Duplicate,
                ));
            }
            Verdict::Conflict => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                let reply = request.response_with(Failure::Duplicate.response_code())?;
                return Some(Outcome::new(
                    reply,
                    DecidedBy::Duplicate,
                    TxnState::Duplicate,
                ));
            }
            Verdict::Stuck => {
                let reply = request.response_with(Failure::Timeout.response_code())?;
                return Some(Outcome::new(
                    reply,
                    DecidedBy::Duplicate,
                    TxnState::Duplicate,
                ));
            }
            Verdict::Unknown => {
                // Its key goes with its row: a copy after recovery gets this 96 too. (Not for
                // a reversal: its repeats must be heard once the journal is back.)
                let mut o = Outcome::refused(request, Failure::JournalUnavailable)?;
                if !is_reversal {
                    o.unclaimed = Some((key, hash));
                }
                o.txn_id = Some(txn_id);
                return Some(o);
            }
        };
        let card = card::CardMessage {
            listener,
            request,
            txn_id,
            pan: &pan,
            began,
            dkey: guard.key(),
        };
        let mut outcome = if is_reversal {
            self.reversal(&card).await?
        } else {
            self.authorize(&card).await?
        };
        outcome.guard = Some(guard);
        outcome.txn_id = Some(txn_id);
        Some(outcome)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn message_classes_by_mti() {
        let class = |m: &[u8; 4]| MessageClass::of(Mti::new(*m).unwrap());
        assert_eq!(class(b"0100"), MessageClass::Card);
        assert_eq!(class(b"0220"), MessageClass::Card);
        assert_eq!(class(b"0320"), MessageClass::Upload);
        assert_eq!(class(b"0421"), MessageClass::Reversal);
        assert_eq!(class(b"0500"), MessageClass::Batch);
        assert_eq!(class(b"0800"), MessageClass::Network);
        assert_eq!(class(b"0600"), MessageClass::Other);
        let journaled: Vec<_> = [b"0100", b"0320", b"0400", b"0520", b"0800", b"0600"]
            .into_iter()
            .filter(|m| class(m).is_journaled())
            .collect();
        assert_eq!(journaled, [b"0100", b"0320", b"0400", b"0520"]);
    }
}
