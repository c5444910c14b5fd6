//! What happens to one message from a terminal:
//! decode -> mandatory fields -> Luhn -> route -> acquirer -> reply.
//!
//! Every path ends in a reply to the terminal except a frame whose MTI and STAN cannot be read,
//! which is counted and dropped. Failures become response codes in one place
//! ([`cardswitch_routing::Failure::response_code`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cardswitch_codec::{Dialect, Message, ResponseCode};
use cardswitch_routing::{check_mandatory, BinTable, Failure};
use tracing::{debug, info_span, Instrument};

use crate::journal::{DecidedBy, Journal};
use crate::upstream::{Endpoint, Upstream};

/// Counters of what the pipeline did.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames received from terminals.
    pub received: AtomicU64,
    /// Frames dropped because not even their MTI and STAN could be read.
    pub dropped: AtomicU64,
    /// Replies sent.
    pub replied: AtomicU64,
}

/// Everything the pipeline needs, shared by all connections.
#[derive(Debug)]
pub struct Pipeline {
    bins: BinTable,
    endpoints: Vec<Arc<Endpoint>>,
    journal: Journal,
    /// The pipeline's counters.
    pub counters: Counters,
}

/// How one request ended, before it is journaled.
struct Outcome {
    reply: Message,
    decided_by: DecidedBy,
    route: Option<String>,
    endpoint: Option<String>,
    link: Option<Arc<str>>,
    /// Decoded to the acquirer asked (checks, routing).
    routing: Option<Duration>,
    upstream: Option<Duration>,
}

impl Outcome {
    fn switch(reply: Message) -> Self {
        Self {
            reply,
            decided_by: DecidedBy::Switch,
            route: None,
            endpoint: None,
            link: None,
            routing: None,
            upstream: None,
        }
    }
}

impl Pipeline {
    /// A pipeline over these routes and endpoints, journaling to `journal`.
    #[must_use]
    pub fn new(bins: BinTable, endpoints: Vec<Arc<Endpoint>>, journal: Journal) -> Self {
        Self {
            bins,
            endpoints,
            journal,
            counters: Counters::default(),
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

    /// Handles one frame body from a terminal of `listener`; the reply body, if any.
    pub async fn handle(&self, listener: &str, dialect: &Dialect, body: &[u8]) -> Option<Bytes> {
        let started = Instant::now();
        let received_us = Journal::now_us();
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let decoded = dialect.decode(body);
        let decode_time = started.elapsed();
        let (request, outcome) = match decoded {
            Ok(request) => {
                let span = info_span!("txn", mti = %request.mti(), stan = request.get_str(11).unwrap_or(""), rrn = request.rrn().unwrap_or(""), rc = tracing::field::Empty);
                let outcome = self.process(&request).instrument(span.clone()).await;
                if let Some(rc) = outcome.as_ref().and_then(|o| o.reply.response_code()) {
                    span.record("rc", rc.as_str());
                }
                (request, outcome)
            }
            Err(e) => {
                debug!(error = %e, "undecodable request");
                // A 30 when the MTI and STAN can be read; otherwise counted and dropped.
                let Some(partial) = dialect.decode_partial(body).filter(|p| p.has(11)) else {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                let outcome = partial
                    .response_with(Failure::Format.response_code())
                    .map(Outcome::switch);
                (partial, outcome)
            }
        };
        let mut outcome = outcome?;
        if matches!(request.mti().class(), 1 | 2 | 4 | 5) {
            let mut row = self.journal.row(
                listener,
                dialect,
                &request,
                &outcome.reply,
                outcome.decided_by,
                received_us,
                started.elapsed(),
            );
            row.route = outcome.route.take();
            row.endpoint = outcome.endpoint.take();
            row.link = outcome.link.take().map(|l| l.to_string());
            let micros = |d: Option<Duration>| d.and_then(|d| i64::try_from(d.as_micros()).ok());
            row.t_upstream_us = micros(outcome.upstream);
            row.t_route_us = micros(outcome.routing);
            row.t_decode_us = micros(Some(decode_time));
            if !self.journal.record(row).await && self.journal.is_durable() {
                // Never approve what is not recorded. (An acquirer approval here needs a reversal:
                // that comes with store-and-forward.)
                outcome
                    .reply
                    .set_response_code(Failure::JournalUnavailable.response_code());
                outcome.reply.remove(38);
            }
        }
        let out = dialect.encode_to_vec(&outcome.reply).ok().map(Bytes::from);
        if out.is_some() {
            self.counters.replied.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    async fn process(&self, request: &Message) -> Option<Outcome> {
        let began = Instant::now();
        let mti = request.mti();
        if !mti.is_request() {
            // A response from a terminal answers nothing the switch asked.
            return None;
        }
        let fail = |f: Failure| {
            request
                .response_with(f.response_code())
                .map(Outcome::switch)
        };
        if check_mandatory(request).is_err() {
            return fail(Failure::Format);
        }
        match mti.class() {
            8 => return self.network(request).map(Outcome::switch),
            1 | 2 | 4 => {}
            _ => return fail(Failure::Unsupported),
        }
        let Some(pan) = request
            .pan()
            .or_else(|| request.track2().and_then(|t| t.pan()))
        else {
            return fail(Failure::InvalidCard);
        };
        if !pan.luhn_valid() {
            return fail(Failure::InvalidCard);
        }
        let Some(route) = self.bins.lookup(&pan) else {
            return fail(Failure::NoRoute);
        };
        // A reversal goes where its original went, when the journal knows it.
        let original = match mti.class() {
            4 => self.original_endpoint(request).await,
            _ => None,
        };
        let candidates: Vec<&String> = match &original {
            Some(endpoint) => vec![endpoint],
            None => std::iter::once(&route.endpoint)
                .chain(route.fallback.iter())
                .collect(),
        };
        let mut last = None;
        for name in candidates {
            let Some(endpoint) = self.endpoint(name) else {
                continue;
            };
            last = Some(name.clone());
            let asked = Instant::now();
            let result = endpoint.exchange(request).await;
            let waited = Some(asked.elapsed());
            let (reply, decided_by, link) = match result {
                Upstream::Reply(reply, link) => {
                    (Endpoint::relay(request, &reply)?, DecidedBy::Acquirer, link)
                }
                // Never written: the fallback may take it.
                Upstream::NotSent => continue,
                // Outcome unknown: never sent again. (Automatic reversal hooks in here.)
                Upstream::Lost(link) => (
                    request.response_with(Failure::Unavailable.response_code())?,
                    DecidedBy::Switch,
                    link,
                ),
                Upstream::TimedOut(link) => (
                    request.response_with(Failure::Timeout.response_code())?,
                    DecidedBy::Timeout,
                    link,
                ),
            };
            return Some(Outcome {
                reply,
                decided_by,
                route: Some(route.prefix.clone()),
                endpoint: Some(name.clone()),
                link: Some(link),
                routing: Some(asked.duration_since(began)),
                upstream: waited,
            });
        }
        let mut out = fail(Failure::Unavailable)?;
        out.route = Some(route.prefix.clone());
        out.endpoint = last;
        Some(out)
    }

    /// The endpoint of a reversal's original, from DE90 (original MTI 4, STAN 6, DE7 10).
    async fn original_endpoint(&self, reversal: &Message) -> Option<String> {
        let de90 = reversal.get_str(90)?;
        let (stan, de7) = (de90.get(4..10)?, de90.get(10..20)?);
        self.journal
            .original_endpoint(reversal.terminal_id()?, stan, de7)
            .await
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
