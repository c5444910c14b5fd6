//! What happens to one message from a terminal:
//! decode -> mandatory fields -> card -> duplicate check -> route -> acquirer (or stand-in) ->
//! journal -> reply.
//!
//! Every path ends in a reply to the terminal except a frame whose MTI and STAN cannot be read,
//! which is counted and dropped. Failures become response codes in one place
//! ([`cardswitch_routing::Failure::response_code`]). What a transaction changes (its row, the
//! reversal or advice it queues, the state of the original it reverses, its duplicate key) is
//! written in one database transaction before the reply goes out (durable mode).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cardswitch_codec::totals::Totals;
use cardswitch_codec::{Dialect, Message, Mti, Pan, ResponseCode};
use cardswitch_routing::{check_mandatory, BinTable, Failure};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::admin::live::{Decline, Live};
use crate::dedup::{Decision, Dedup, Guard, Verdict};
use crate::fraud::{Rules as FraudRules, Txn};
use crate::hsm::Hsm;
use crate::journal::{
    Change, DecidedBy, Journal, Original, OriginalKeys, SafEntry, SafKind, StateChange,
};
use crate::security::ListenerSecurity;
use crate::settlement::{self, batch};
use crate::stand_in;
use crate::state::TxnState;
use crate::telemetry::{PipelineMetrics, Stage};
use crate::upstream::{Endpoint, Stray, Upstream};
use cardswitch_codec::hsm::{account_of, KeyType};

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

/// What the fraud rules said of a request.
#[derive(Default)]
struct Screened {
    /// The response code of a decline.
    decline: Option<ResponseCode>,
    /// The rules that fired, for the journal.
    fired: Option<String>,
    took: Duration,
    /// The PAN HMAC the rules were given (the journal row reuses it).
    pan_hmac: Option<String>,
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

/// States a terminal reversal may change.
const REVERSIBLE: &[TxnState] = &[
    TxnState::Approved,
    TxnState::PartiallyReversed,
    TxnState::AdvicePending,
    TxnState::Advised,
];

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
}

/// What a CVV check said, when stand-in needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cvv {
    /// Not configured: stand-in decides without it.
    NotAsked,
    /// Right.
    Good,
    /// Wrong, missing or unverifiable: no stand-in approval.
    Refused,
}

/// How one request ended, before it is journaled.
struct Outcome {
    reply: Message,
    decided_by: DecidedBy,
    state: TxnState,
    route: Option<String>,
    endpoint: Option<String>,
    link: Option<Arc<str>>,
    upstream_stan: Option<u32>,
    original_id: Option<i64>,
    amount_reversed: Option<i64>,
    /// Decoded to the acquirer asked (checks, routing).
    routing: Option<Duration>,
    upstream: Option<Duration>,
    /// Time spent on the HSM (PIN translation) inside the pipeline.
    hsm: Option<Duration>,
    /// Time spent on the fraud rules.
    fraud_time: Option<Duration>,
    /// The PAN's HMAC, when the pipeline computed it already (the journal row reuses it).
    pan_hmac: Option<String>,
    /// The fraud rules that fired, for the journal.
    fraud: Option<String>,
    /// The business date, when the endpoint's reply or the send time fixed it.
    business_date: Option<time::Date>,
    /// What else the transaction writes.
    change: Change,
    /// The claimed duplicate key.
    guard: Option<Guard>,
    /// An acquirer approval: reversed if it cannot be recorded.
    reversal_if_unrecorded: Option<(Arc<Endpoint>, u32)>,
    /// The transaction id, once one was given.
    txn_id: Option<i64>,
}

impl Outcome {
    fn new(reply: Message, decided_by: DecidedBy, state: TxnState) -> Self {
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
            reversal_if_unrecorded: None,
            txn_id: None,
        }
    }

    fn switch(reply: Message) -> Self {
        Self::new(reply, DecidedBy::Switch, TxnState::Declined)
    }

    /// The switch's refusal of `request` with the code of `f`.
    fn refused(request: &Message, f: Failure) -> Option<Self> {
        request.response_with(f.response_code()).map(Self::switch)
    }
}

fn now_us() -> i64 {
    Journal::now_us()
}

/// The card number: DE2, or the PAN of track 2.
fn card_pan(m: &Message) -> Option<Pan> {
    m.pan().or_else(|| m.track2().and_then(|t| t.pan()))
}

fn state_of(reply: &Message) -> TxnState {
    if reply.response_code().is_some_and(|c| c.is_approved()) {
        TxnState::Approved
    } else {
        TxnState::Declined
    }
}

/// DE90 naming an original as the acquirer saw it: MTI, STAN, DE7, DE32, DE33.
fn de90(mti: &str, stan: u32, de7: &str, acquirer: Option<&str>) -> String {
    format!(
        "{mti:0>4.4}{stan:06}{de7:0>10.10}{:0>11.11}{:0>11}",
        acquirer.unwrap_or(""),
        ""
    )
}

/// The reversal advice (0420, DE39 68) of a request whose outcome is unknown.
fn auto_reversal(
    request: &Message,
    pan: Option<&Pan>,
    upstream_stan: u32,
    acquirer: Option<&str>,
) -> Message {
    let mut m = request.clone();
    let original = request.mti().original();
    m.set_mti(Mti::REVERSAL_ADVICE);
    if !m.has(2) {
        if let Some(p) = pan {
            m.set_pan(p);
        }
    }
    for f in [35, 45, 52, 55, 64, 128] {
        m.remove(f);
    }
    m.set_response_code(ResponseCode::TOO_LATE);
    let de7 = request.get_str(7).unwrap_or("");
    m.set(
        90,
        de90(original.as_str(), upstream_stan, de7, acquirer).as_bytes(),
    );
    m
}

/// The advice (0120/0220) of a stand-in approval.
fn advice(request: &Message, pan: &Pan, auth_code: &str) -> Message {
    let mut m = request.clone();
    let mti = if request.mti().class() == 1 {
        *b"0120"
    } else {
        *b"0220"
    };
    if let Ok(mti) = Mti::new(mti) {
        m.set_mti(mti);
    }
    if !m.has(2) {
        m.set_pan(pan);
    }
    for f in [35, 45, 52, 64, 128] {
        m.remove(f);
    }
    m.set_response_code(ResponseCode::APPROVED);
    m.set(38, auth_code.as_bytes());
    m
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
        }
    }

    /// Sets the field terminals carry their batch number in (`[settlement] batch_field`).
    #[must_use]
    pub fn with_batch_field(mut self, field: u8) -> Self {
        self.batch_field = field;
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

    /// Runs the fraud rules on an authorization or financial request: the decline, if any,
    /// and what to journal.
    fn screen(&self, request: &Message, pan: &Pan) -> Screened {
        let started = Instant::now();
        let Some(engine) = self
            .fraud
            .as_ref()
            .and_then(|f| f.engine())
            .filter(|e| !e.is_empty())
        else {
            return Screened::default();
        };
        let hmac = self.journal.pan_hmac(pan);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let month = crate::fraud::yymm(now);
        let track_expiry = request.get_str(35).and_then(|t| {
            let at = t.find(['=', 'D'])?;
            t.get(at + 1..at + 5)
        });
        let txn = Txn {
            pan: pan.expose(),
            pan_hmac: &hmac,
            terminal: request.terminal_id().unwrap_or(""),
            merchant: request.merchant_id().unwrap_or(""),
            amount: request.amount().unwrap_or(0),
            mcc: request.mcc(),
            currency: request.currency(),
            country: request.get_str(19).and_then(|c| c.parse().ok()),
            entry_mode: request.pos_entry_mode(),
            expiry: request.expiry().or(track_expiry),
            month: std::str::from_utf8(&month).unwrap_or("0000"),
            now_s: u32::try_from(now).unwrap_or(u32::MAX),
        };
        let verdict = engine.evaluate(&txn);
        let took = started.elapsed();
        Screened {
            decline: verdict.decline.map(|(_, c)| c),
            fired: verdict
                .is_notable()
                .then(|| engine.explain(&verdict).join("; ")),
            took,
            pan_hmac: Some(hmac),
        }
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

    /// Verifies a terminal's MAC over the frame as received; `Err` with the failure to answer.
    async fn check_mac(
        &self,
        listener: &str,
        dialect: &Dialect,
        body: &[u8],
        request: &Message,
    ) -> Result<(), Failure> {
        let Some(sec) = self.security.get(listener) else {
            return Ok(());
        };
        if !sec.verify_mac || !matches!(request.mti().class(), 1 | 2 | 4) {
            return Ok(());
        }
        let (_, tak) = sec.keys_for(request.terminal_id());
        let (Some(tak), Some(hsm)) = (tak, &self.hsm) else {
            warn!(listener, "no TAK for this terminal: MAC cannot be verified");
            return Err(Failure::BadMac);
        };
        let Some((data, mac)) = dialect.mac_span(body, request) else {
            debug!("MAC missing");
            return Err(Failure::BadMac);
        };
        match hsm.verify_mac(KeyType::TAK, &tak.key, data, mac).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                debug!("MAC does not verify");
                Err(Failure::BadMac)
            }
            Err(e) => {
                warn!(error = %e, "MAC verification failed at the HSM");
                Err(Failure::HsmUnavailable)
            }
        }
    }

    /// The request as it goes to `endpoint`: its PIN block translated from the terminal's TPK
    /// to the endpoint's ZPK. `Ok(None)` when there is nothing to translate.
    async fn translate_pin(
        &self,
        listener: &str,
        request: &Message,
        pan: &Pan,
        endpoint: &Endpoint,
    ) -> Result<Option<Message>, Failure> {
        let Some(block) = request.get(52) else {
            return Ok(None);
        };
        let terminal = self.security.get(listener);
        let zone = endpoint.security();
        if terminal.is_none() && zone.is_none() {
            // No keys on either side: the PIN block passes as it came.
            return Ok(None);
        }
        let tpk = terminal.and_then(|t| t.keys_for(request.terminal_id()).0.as_ref());
        let zpk = zone.and_then(|z| z.keys.zpk());
        let (Some(tpk), Some(zpk), Some(hsm), Some(t), Some(z)) =
            (tpk, zpk, &self.hsm, terminal, zone)
        else {
            warn!(
                listener,
                endpoint = endpoint.name(),
                "PIN block present but a TPK or ZPK is not configured"
            );
            return Err(Failure::HsmUnavailable);
        };
        let Some(account) = account_of(pan.expose()) else {
            return Err(Failure::BadPinBlock);
        };
        match hsm
            .translate_pin(
                &tpk.key,
                &zpk.key,
                block,
                &t.pin_format,
                &z.keys.pin_format,
                &account,
            )
            .await
        {
            Ok(translated) => {
                let mut out = request.clone();
                out.set(52, &translated);
                Ok(Some(out))
            }
            Err(e) if e.is_bad_pin_block() => {
                debug!(error = %e, "PIN block refused by the HSM");
                Err(Failure::BadPinBlock)
            }
            Err(e) => {
                warn!(error = %e, "PIN translation failed at the HSM");
                Err(Failure::HsmUnavailable)
            }
        }
    }

    /// The CVV check stand-in asks for: track 2's CVV through the HSM.
    async fn cvv_for_stand_in(&self, request: &Message, endpoint: &Endpoint) -> Cvv {
        let cfg = &endpoint.config().stand_in;
        if !cfg.enabled || !cfg.verify_cvv {
            return Cvv::NotAsked;
        }
        let (Some(keys), Some(track)) = (endpoint.security(), request.get_str(35)) else {
            return Cvv::Refused;
        };
        let Some(cvk) = &keys.keys.cvk else {
            return Cvv::Refused;
        };
        let Some((pan, rest)) = track.split_once(['=', 'D']) else {
            return Cvv::Refused;
        };
        let (Some(expiry), Some(service), Some(cvv)) = (
            rest.get(..4),
            rest.get(4..7),
            rest.get(7 + cfg.cvv_offset..10 + cfg.cvv_offset),
        ) else {
            return Cvv::Refused;
        };
        match keys
            .hsm
            .verify_cvv(&cvk.key, cvv, pan, expiry, service)
            .await
        {
            Ok(true) => Cvv::Good,
            Ok(false) => {
                debug!("stand-in: CVV wrong");
                Cvv::Refused
            }
            Err(e) => {
                warn!(error = %e, "stand-in: CVV not verified");
                Cvv::Refused
            }
        }
    }

    /// The endpoints, in configured order.
    #[must_use]
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The journal.
    #[must_use]
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn endpoint(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.name() == name)
    }

    /// A store-and-forward entry of `msg` for `endpoint`.
    fn saf_entry(
        &self,
        endpoint: &Endpoint,
        kind: SafKind,
        msg: &Message,
        txn_id: Option<i64>,
        order_key: Option<String>,
    ) -> Option<SafEntry> {
        let body = endpoint.dialect().encode_to_vec(msg).ok()?;
        let cfg = &endpoint.config().saf;
        let now = now_us();
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
        if matches!(request.mti().class(), 1..=5) {
            let mut row = self.journal.row(
                listener,
                dialect,
                &request,
                &outcome.reply,
                outcome.decided_by,
                received_us,
                started.elapsed(),
                outcome.pan_hmac.take(),
            );
            row.route = outcome.route.take();
            row.endpoint = outcome.endpoint.take();
            row.link = outcome.link.take().map(|l| l.to_string());
            let micros = |d: Option<Duration>| d.and_then(|d| i64::try_from(d.as_micros()).ok());
            row.t_upstream_us = micros(outcome.upstream);
            row.t_route_us = micros(outcome.routing);
            row.t_decode_us = micros(Some(decode_time));
            row.state = outcome.state;
            row.upstream_stan = outcome.upstream_stan.map(|s| format!("{s:06}"));
            row.original_id = outcome.original_id;
            row.amount_reversed_minor = outcome.amount_reversed;
            row.fraud = outcome.fraud.take();
            let day = outcome
                .business_date
                .or_else(|| {
                    row.endpoint
                        .as_deref()
                        .and_then(|e| self.endpoint(e))
                        .map(|e| e.business_day().current())
                })
                .unwrap_or_else(settlement::today);
            row.business_date = Some(settlement::format_date(day));
            row.batch_number = batch::batch_of(&request, self.batch_field);
            if let Some(id) = outcome.txn_id {
                row.set_id(id);
            }
            let txn_id = row.id();
            let mut decision = Decision::of(&outcome.reply);
            let mut change = std::mem::take(&mut outcome.change);
            change.rows.push(row);
            if let Some(g) = &outcome.guard {
                change.dedup_done = Some((g.key().to_owned(), decision.seal(&self.journal)));
            }
            let journal_started = Instant::now();
            let committed = self.journal.submit(change).await;
            self.metrics
                .stage(Stage::Journal, journal_started.elapsed());
            if !committed.ok && self.journal.is_durable() {
                // Never approve what is not recorded; an acquirer's approval is reversed.
                outcome
                    .reply
                    .set_response_code(Failure::JournalUnavailable.response_code());
                outcome.reply.remove(38);
                decision = Decision::of(&outcome.reply);
                // Built only now: the hot path does not pay for it.
                let rev = outcome
                    .reversal_if_unrecorded
                    .take()
                    .and_then(|(endpoint, stan)| {
                        let pan = card_pan(&request);
                        let msg =
                            auto_reversal(&request, pan.as_ref(), stan, endpoint.acquirer_id());
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
                                cause: "journal unavailable".into(),
                                detail: Some("answered 96; acquirer approval reversed".into()),
                            }],
                            ..Change::default()
                        })
                        .await;
                }
            }
            if let Some(g) = outcome.guard.take() {
                g.complete(&decision);
            }
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

    /// Metrics and the live view for one answered message.
    fn observe(
        &self,
        listener: &str,
        request: &Message,
        outcome: &Outcome,
        decode: Duration,
        mac: Duration,
        total: Duration,
    ) {
        let code = outcome.reply.response_code();
        let rc_bytes = code.map_or(*b"--", |c| {
            let mut b = [b'-'; 2];
            for (o, i) in b.iter_mut().zip(c.as_str().bytes()) {
                *o = i;
            }
            b
        });
        self.metrics
            .message(listener, *request.mti().as_bytes(), rc_bytes);
        if let (Some(e), DecidedBy::Acquirer) = (&outcome.endpoint, outcome.decided_by) {
            self.metrics.endpoint_reply(e, rc_bytes);
        }
        let m = &self.metrics;
        m.stage(Stage::Decode, decode);
        if let Some(d) = outcome.fraud_time {
            m.stage(Stage::Fraud, d);
        }
        if let Some(d) = outcome.routing {
            m.stage(Stage::Route, d);
        }
        if let Some(d) = outcome.upstream {
            m.stage(Stage::Upstream, d);
        }
        let hsm = mac + outcome.hsm.unwrap_or_default();
        if !hsm.is_zero() {
            m.stage(Stage::Hsm, hsm);
        }
        m.stage(Stage::Total, total);
        let card = matches!(request.mti().class(), 1 | 2);
        let approved = outcome
            .reply
            .response_code()
            .is_some_and(|c| c.is_approved());
        let decline = (card && !approved).then(|| Decline {
            at_ms: u64::try_from(Journal::now_us() / 1000).unwrap_or(0),
            mti: request.mti().to_string(),
            rc: String::from_utf8_lossy(&rc_bytes).into_owned(),
            pan: card_pan(request)
                .map(|p| p.masked().to_string())
                .unwrap_or_default(),
            terminal: request.terminal_id().unwrap_or("").trim_end().to_owned(),
            amount: request.amount(),
        });
        self.live.record(card, approved, total, decline);
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
        match mti.class() {
            8 => return self.network(request).map(Outcome::switch),
            1 | 2 | 4 => {}
            5 => return self.settle_batch(request).await,
            3 => return self.upload(request),
            _ => return fail(Failure::Unsupported),
        }
        let Some(pan) = card_pan(request) else {
            return fail(Failure::InvalidCard);
        };
        if !pan.luhn_valid() {
            return fail(Failure::InvalidCard);
        }
        let txn_id = self.journal.new_id();
        let key = Dedup::key(listener, request);
        let hash = self.dedup.content_hash(request, Some(&pan));
        let guard = match self.dedup.check(key, hash, txn_id, mti.class() == 4).await {
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
            Verdict::Unknown => return fail(Failure::JournalUnavailable),
        };
        let mut outcome = match mti.class() {
            4 => self.reversal(request, txn_id, &pan, began).await?,
            _ => {
                self.authorize(listener, request, txn_id, &pan, began)
                    .await?
            }
        };
        outcome.guard = Some(guard);
        outcome.txn_id = Some(txn_id);
        Some(outcome)
    }

    /// An authorization or financial request (or advice): to the acquirer, or stand-in.
    async fn authorize(
        &self,
        listener: &str,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        began: Instant,
    ) -> Option<Outcome> {
        // Fraud rules on requests (not on advices of what already happened).
        let screened = if request.mti().function() <= 1 {
            self.screen(request, pan)
        } else {
            Screened::default()
        };
        let mut outcome = match screened.decline {
            Some(code) => Outcome::new(
                request.response_with(code)?,
                DecidedBy::Fraud,
                TxnState::Declined,
            ),
            None => self.route(listener, request, txn_id, pan, began).await?,
        };
        outcome.fraud = screened.fired;
        outcome.fraud_time = (!screened.took.is_zero()).then_some(screened.took);
        outcome.pan_hmac = screened.pan_hmac;
        Some(outcome)
    }

    /// Routing, PIN translation and the acquirer (or stand-in) for a request.
    async fn route(
        &self,
        listener: &str,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        began: Instant,
    ) -> Option<Outcome> {
        let Some(route) = self.bins.lookup(pan) else {
            return request
                .response_with(Failure::NoRoute.response_code())
                .map(Outcome::switch);
        };
        let candidates = std::iter::once(&route.endpoint).chain(route.fallback.iter());
        let mut first: Option<&Arc<Endpoint>> = None;
        for name in candidates {
            let Some(endpoint) = self.endpoint(name) else {
                continue;
            };
            first.get_or_insert(endpoint);
            let hsm_started = Instant::now();
            let translated = self.translate_pin(listener, request, pan, endpoint).await;
            let hsm_time = request.has(52).then(|| hsm_started.elapsed());
            let translated = match translated {
                Ok(t) => t,
                Err(f) => {
                    let mut o = Outcome::switch(request.response_with(f.response_code())?);
                    o.route = Some(route.prefix.clone());
                    o.endpoint = Some(name.clone());
                    o.hsm = hsm_time;
                    return Some(o);
                }
            };
            let asked = Instant::now();
            let sent_day = endpoint.business_day().current();
            let result = endpoint
                .exchange(translated.as_ref().unwrap_or(request), txn_id)
                .await;
            let waited = Some(asked.elapsed());
            let mut outcome = match result {
                Upstream::Reply(reply, link, stan) => {
                    // The acquirer's settlement date decides the business date.
                    let day = reply
                        .get_str(15)
                        .and_then(|d| settlement::resolve_mmdd(d, sent_day))
                        .unwrap_or(sent_day);
                    let reply = Endpoint::relay(request, &reply)?;
                    let state = state_of(&reply);
                    let mut o = Outcome::new(reply, DecidedBy::Acquirer, state);
                    if state == TxnState::Approved {
                        o.reversal_if_unrecorded = Some((Arc::clone(endpoint), stan));
                    }
                    o.link = Some(link);
                    o.upstream_stan = Some(stan);
                    o.business_date = Some(day);
                    o
                }
                // Never written: the fallback may take it.
                Upstream::NotSent => continue,
                // Never written either, for want of a MAC.
                Upstream::Unsigned => {
                    Outcome::switch(request.response_with(Failure::HsmUnavailable.response_code())?)
                }
                // Outcome unknown: never sent again; reversed, and perhaps stood in for.
                Upstream::Lost(link, stan) => {
                    let cvv = self.cvv_for_stand_in(request, endpoint).await;
                    self.unknown_outcome(request, txn_id, pan, endpoint, (link, stan), false, cvv)?
                }
                Upstream::TimedOut(link, stan) => {
                    let cvv = self.cvv_for_stand_in(request, endpoint).await;
                    self.unknown_outcome(request, txn_id, pan, endpoint, (link, stan), true, cvv)?
                }
            };
            outcome.route = Some(route.prefix.clone());
            outcome.endpoint = Some(name.clone());
            outcome.business_date.get_or_insert(sent_day);
            outcome.routing = Some(hsm_started.duration_since(began));
            outcome.upstream = waited;
            outcome.hsm = hsm_time;
            return Some(outcome);
        }
        // No link of any candidate could take it.
        let mut out = match first {
            Some(e) if e.config().stand_in.enabled && e.config().stand_in.on_unavailable => {
                let cvv = self.cvv_for_stand_in(request, e).await;
                match self.stand_in(request, txn_id, pan, e, cvv) {
                    Some(o) => o,
                    None => Outcome::switch(
                        request.response_with(Failure::Unavailable.response_code())?,
                    ),
                }
            }
            _ => Outcome::switch(request.response_with(Failure::Unavailable.response_code())?),
        };
        out.route = Some(route.prefix.clone());
        out.endpoint = first.map(|e| e.name().to_owned());
        Some(out)
    }

    /// Stand-in approval with its advice queued; `None` when stand-in declines.
    fn stand_in(
        &self,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        endpoint: &Endpoint,
        cvv: Cvv,
    ) -> Option<Outcome> {
        if cvv == Cvv::Refused {
            debug!(reason = "CVV", "stand-in declines");
            return None;
        }
        let hmac = self.journal.pan_hmac(pan);
        let cfg = &endpoint.config().stand_in;
        if let Err(why) = stand_in::decide(cfg, request, pan, &hmac, &stand_in::this_month()) {
            debug!(reason = why.as_str(), "stand-in declines");
            return None;
        }
        let code = stand_in::auth_code(txn_id);
        let mut reply = request.response_with(ResponseCode::APPROVED)?;
        reply.set(38, code.as_bytes());
        let mut o = Outcome::new(reply, DecidedBy::StandIn, TxnState::AdvicePending);
        let adv = advice(request, pan, &code);
        o.change.saf.extend(self.saf_entry(
            endpoint,
            SafKind::Advice,
            &adv,
            Some(txn_id),
            Some(hmac),
        ));
        self.counters
            .stand_in_approvals
            .fetch_add(1, Ordering::Relaxed);
        Some(o)
    }

    /// A request written to a link whose reply never came: reversed, and answered 91 or by
    /// stand-in.
    #[allow(clippy::too_many_arguments)]
    fn unknown_outcome(
        &self,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        endpoint: &Endpoint,
        (link, stan): (Arc<str>, u32),
        timed_out: bool,
        cvv: Cvv,
    ) -> Option<Outcome> {
        let rev = auto_reversal(request, Some(pan), stan, endpoint.acquirer_id());
        let entry = self.saf_entry(
            endpoint,
            SafKind::Reversal,
            &rev,
            Some(txn_id),
            Some(self.journal.pan_hmac(pan)),
        );
        self.counters.auto_reversals.fetch_add(1, Ordering::Relaxed);
        let cfg = &endpoint.config().stand_in;
        let stood_in = (cfg.enabled
            && (if timed_out {
                cfg.on_timeout
            } else {
                cfg.on_unavailable
            }))
        .then(|| self.stand_in(request, txn_id, pan, endpoint, cvv))
        .flatten();
        let mut o = match stood_in {
            Some(o) => o,
            None => {
                let failure = if timed_out {
                    Failure::Timeout
                } else {
                    Failure::Unavailable
                };
                let decided = if timed_out {
                    DecidedBy::Timeout
                } else {
                    DecidedBy::Switch
                };
                Outcome::new(
                    request.response_with(failure.response_code())?,
                    decided,
                    TxnState::ReversalPending,
                )
            }
        };
        // The reversal goes first: same card, same queue, in order.
        o.change.saf.splice(0..0, entry);
        o.link = Some(link);
        o.upstream_stan = Some(stan);
        Some(o)
    }

    /// A terminal's reversal (0400/0420 and repeats), matched to its original.
    async fn reversal(
        &self,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        began: Instant,
    ) -> Option<Outcome> {
        let is_advice = request.mti().function() == 2;
        let de90 = request.get_str(90);
        let keys = OriginalKeys {
            terminal: request.terminal_id().unwrap_or(""),
            stan: de90.and_then(|d| d.get(4..10)),
            transmission_time: de90.and_then(|d| d.get(10..20)),
            rrn: request.rrn(),
        };
        let original = match self.journal.find_original(&keys).await {
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
        let ok = |state: TxnState| {
            let mut o = Outcome::new(
                request.response_with(ResponseCode::APPROVED)?,
                DecidedBy::Switch,
                state,
            );
            o.original_id = Some(original.id);
            Some(o)
        };
        // Only money that stands can be reversed.
        if !original.state.is_charged() {
            // Reversed already, declined, or its reversal is queued: nothing changes.
            return ok(TxnState::Duplicate);
        }
        let amount = original.amount_minor.unwrap_or(0);
        let already = original.amount_reversed_minor.unwrap_or(0);
        let standing = request
            .get_str(95)
            .and_then(|d| d.get(..12))
            .and_then(|a| a.parse::<i64>().ok())
            .filter(|&a| a > 0 && a < amount);
        let (to, total) = match standing {
            Some(a) => (TxnState::PartiallyReversed, amount - a),
            None => (TxnState::Reversed, amount),
        };
        if total <= already {
            return ok(TxnState::Duplicate);
        }
        let endpoint = original.endpoint.as_deref().and_then(|n| self.endpoint(n));
        let mut outcome = match endpoint {
            None => ok(to)?,
            Some(endpoint) => {
                let outgoing = self.outgoing_reversal(request, &original, endpoint);
                let order_key = original.pan_hmac.clone();
                let mut o = if is_advice {
                    ok(to)?
                } else {
                    let asked = Instant::now();
                    let result = endpoint.exchange(&outgoing, txn_id).await;
                    match result {
                        Upstream::Reply(reply, link, stan) => {
                            let reply = Endpoint::relay(request, &reply)?;
                            let code = reply.response_code();
                            let took = code.is_some_and(|c| {
                                c.is_approved() || c == ResponseCode::RECORD_NOT_FOUND
                            });
                            let mut o = Outcome::new(
                                reply,
                                DecidedBy::Acquirer,
                                if took { to } else { TxnState::Declined },
                            );
                            o.original_id = Some(original.id);
                            o.link = Some(link);
                            o.upstream_stan = Some(stan);
                            o.routing = Some(asked.duration_since(began));
                            o.upstream = Some(asked.elapsed());
                            if !took {
                                return Some(o);
                            }
                            o
                        }
                        // Not delivered now: the switch delivers it; the terminal is done.
                        _ => {
                            let mut o = ok(to)?;
                            let mut advice = outgoing.clone();
                            advice.set_mti(Mti::REVERSAL_ADVICE);
                            o.change.saf.extend(self.saf_entry(
                                endpoint,
                                SafKind::Reversal,
                                &advice,
                                Some(txn_id),
                                order_key.clone(),
                            ));
                            o
                        }
                    }
                };
                if is_advice {
                    let mut advice = outgoing;
                    advice.set_mti(Mti::REVERSAL_ADVICE);
                    o.change.saf.extend(self.saf_entry(
                        endpoint,
                        SafKind::Reversal,
                        &advice,
                        Some(txn_id),
                        order_key,
                    ));
                }
                o.endpoint = Some(endpoint.name().to_owned());
                o
            }
        };
        outcome.amount_reversed = Some(total);
        outcome.change.conditional = true;
        outcome.change.states.push(StateChange {
            txn_id: original.id,
            to: Some(to),
            from: REVERSIBLE,
            amount_reversed_minor: Some(total),
            cause: "terminal reversal".into(),
            detail: Some(format!("{} {txn_id}", request.mti())),
        });
        Some(outcome)
    }

    /// The reversal as the acquirer must see it: DE90 names the original by the STAN the
    /// acquirer saw.
    fn outgoing_reversal(
        &self,
        request: &Message,
        original: &Original,
        endpoint: &Endpoint,
    ) -> Message {
        let mut out = request.clone();
        out.set_mti(request.mti().original());
        if let (Some(stan), Some(de7)) = (
            original
                .upstream_stan
                .as_deref()
                .and_then(|s| s.parse::<u32>().ok()),
            original.transmission_time.as_deref(),
        ) {
            out.set(
                90,
                de90(&original.mti, stan, de7, endpoint.acquirer_id()).as_bytes(),
            );
        }
        for f in [35, 45, 52, 55] {
            out.remove(f);
        }
        out
    }

    /// A reversal of a transaction the switch never saw: 0400 answered 25; 0420 acknowledged
    /// and passed on to the card's endpoint (the original may have reached it before a crash).
    fn orphan(
        &self,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        is_advice: bool,
    ) -> Option<Outcome> {
        if !is_advice {
            return Some(Outcome::new(
                request.response_with(ResponseCode::RECORD_NOT_FOUND)?,
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
            let mut advice = request.clone();
            advice.set_mti(Mti::REVERSAL_ADVICE);
            for f in [35, 45, 52, 55] {
                advice.remove(f);
            }
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
                from: &[],
                amount_reversed_minor: None,
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
                let rev = auto_reversal(&as_request, pan.as_ref(), stan, endpoint.acquirer_id());
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

    /// A terminal's batch settlement (0500/0520): its totals against the journal's; 00 and the
    /// batch closed when they agree, 95 and the switch's totals when they do not (see
    /// [`crate::settlement::batch`]).
    async fn settle_batch(&self, request: &Message) -> Option<Outcome> {
        let (Some(terminal), Some(batch)) = (
            request.get_str(41),
            batch::batch_of(request, self.batch_field),
        ) else {
            return Outcome::refused(request, Failure::Format);
        };
        let theirs = match Totals::read(request) {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "settlement request unreadable");
                return Outcome::refused(request, Failure::Format);
            }
        };
        // Every row already answered must be in the totals.
        self.journal.flush().await;
        match batch::settle(self.journal.backend(), terminal, &batch, &theirs).await {
            Ok(settled) => {
                let agreed = settled.code.is_approved();
                let mut reply = self.batch_reply(request, settled.code)?;
                settled.view.totals.write(&mut reply);
                reply.set(66, if agreed { b"1" } else { b"2" });
                info!(terminal = terminal.trim_end(), batch = %batch, code = %settled.code, uploaded = settled.view.uploaded, exceptions = settled.view.exceptions.len(), "batch settlement");
                let state = if agreed {
                    TxnState::Approved
                } else {
                    TxnState::Declined
                };
                Some(Outcome::new(reply, DecidedBy::Switch, state))
            }
            Err(e) => {
                warn!(error = %e, "batch totals could not be read");
                Outcome::refused(request, Failure::JournalUnavailable)
            }
        }
    }

    /// A batch-upload record (0320): journaled as `uploaded` and acknowledged.
    fn upload(&self, request: &Message) -> Option<Outcome> {
        if batch::batch_of(request, self.batch_field).is_none() {
            return Outcome::refused(request, Failure::Format);
        }
        let reply = self.batch_reply(request, ResponseCode::APPROVED)?;
        Some(Outcome::new(reply, DecidedBy::Switch, TxnState::Uploaded))
    }

    /// The response to a batch message, its batch number echoed.
    fn batch_reply(&self, request: &Message, code: ResponseCode) -> Option<Message> {
        let mut reply = request.response_with(code)?;
        if let Some(v) = request.get(self.batch_field) {
            reply.set(self.batch_field, v);
        }
        Some(reply)
    }

    /// 0800 from a terminal: echo, sign-on and sign-off are answered by the switch.
    fn network(&self, request: &Message) -> Option<Message> {
        let code = match request.network_code() {
            Some(1 | 2 | 301) => ResponseCode::APPROVED,
            _ => Failure::Unsupported.response_code(),
        };
        request.response_with(code)
    }
}
