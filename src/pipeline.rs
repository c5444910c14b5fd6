//! What happens to one message from a terminal:
//! decode -> mandatory fields -> Luhn -> route -> acquirer -> reply.
//!
//! Every path ends in a reply to the terminal except a frame whose MTI and STAN cannot be read,
//! which is counted and dropped. Failures become response codes in one place
//! ([`cardswitch_routing::Failure::response_code`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cardswitch_codec::{Dialect, Message, ResponseCode};
use cardswitch_routing::{check_mandatory, BinTable, Failure};
use tracing::{debug, info_span, Instrument};

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
    /// The pipeline's counters.
    pub counters: Counters,
}

impl Pipeline {
    /// A pipeline over these routes and endpoints.
    #[must_use]
    pub fn new(bins: BinTable, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self {
            bins,
            endpoints,
            counters: Counters::default(),
        }
    }

    /// The endpoints, in configured order.
    #[must_use]
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    fn endpoint(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.name() == name)
    }

    /// Handles one frame body from a terminal; the reply body, if any.
    pub async fn handle(&self, dialect: &Dialect, body: &[u8]) -> Option<Bytes> {
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let request = match dialect.decode(body) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "undecodable request");
                return self.format_error(dialect, body);
            }
        };
        let span = info_span!("txn", mti = %request.mti(), stan = request.get_str(11).unwrap_or(""), rrn = request.rrn().unwrap_or(""), rc = tracing::field::Empty);
        let reply = self.process(&request).instrument(span.clone()).await?;
        if let Some(rc) = reply.response_code() {
            span.record("rc", rc.as_str());
        }
        let out = dialect.encode_to_vec(&reply).ok().map(Bytes::from);
        if out.is_some() {
            self.counters.replied.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// A 30 reply for a frame that does not decode, when its MTI and STAN can be read.
    fn format_error(&self, dialect: &Dialect, body: &[u8]) -> Option<Bytes> {
        let reply = dialect
            .decode_partial(body)
            .filter(|partial| partial.has(11))
            .and_then(|partial| partial.response_with(ResponseCode::FORMAT_ERROR));
        let Some(reply) = reply else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.counters.replied.fetch_add(1, Ordering::Relaxed);
        dialect.encode_to_vec(&reply).ok().map(Bytes::from)
    }

    async fn process(&self, request: &Message) -> Option<Message> {
        let mti = request.mti();
        if !mti.is_request() {
            // A response from a terminal answers nothing the switch asked.
            return None;
        }
        let fail = |f: Failure| request.response_with(f.response_code());
        if check_mandatory(request).is_err() {
            return fail(Failure::Format);
        }
        match mti.class() {
            8 => return self.network(request),
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
        let candidates = std::iter::once(&route.endpoint).chain(route.fallback.iter());
        for name in candidates {
            let Some(endpoint) = self.endpoint(name) else {
                continue;
            };
            match endpoint.exchange(request).await {
                Upstream::Reply(reply) => return crate::upstream::Endpoint::relay(request, &reply),
                // Never written: the fallback may take it.
                Upstream::NotSent => continue,
                // Outcome unknown: never sent again. (Automatic reversal hooks in here.)
                Upstream::Lost => return fail(Failure::Unavailable),
                Upstream::TimedOut => return fail(Failure::Timeout),
            }
        }
        fail(Failure::Unavailable)
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
