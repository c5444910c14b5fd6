//! Card requests (01xx, 02xx): fraud rules, routing by card range with fallback, PIN
//! translation, the acquirer exchange, and stand-in when the acquirer cannot answer. A request
//! whose outcome became unknown (timeout, lost link) is reversed through store-and-forward.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardswitch_codec::{Message, Pan, ResponseCode};
use cardswitch_routing::Failure;
use tracing::{debug, warn};

use super::outcome::Outcome;
use super::{build, Pipeline};
use crate::fraud::Txn;
use crate::journal::ahead::Forward;
use crate::journal::{DecidedBy, SafEntry, SafKind};
use crate::settlement;
use crate::stand_in;
use crate::state::TxnState;
use crate::upstream::{Ahead, Endpoint, Upstream};

/// What the fraud rules said of a request.
#[derive(Default)]
pub(super) struct Screened {
    /// The response code of a decline.
    decline: Option<ResponseCode>,
    /// The rules that fired, for the journal.
    fired: Option<String>,
    took: Duration,
    /// The PAN HMAC the rules were given (the journal row reuses it).
    pan_hmac: Option<String>,
}

/// What a CVV check said, when stand-in needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cvv {
    /// Not configured: stand-in decides without it.
    NotAsked,
    /// Right.
    Good,
    /// Wrong, missing or unverifiable: no stand-in approval.
    Refused,
}

/// A card message on its way through the pipeline: where it came in, what it is, the id the
/// journal gives it, its card and when it arrived.
pub(super) struct CardMessage<'a> {
    pub(super) listener: &'a str,
    pub(super) request: &'a Message,
    pub(super) txn_id: i64,
    pub(super) pan: &'a Pan,
    pub(super) began: Instant,
    /// The duplicate key it claimed.
    pub(super) dkey: &'a str,
}

impl Pipeline {
    /// An authorization or financial request (or advice): to the acquirer, or stand-in.
    pub(super) async fn authorize(&self, card: &CardMessage<'_>) -> Option<Outcome> {
        let CardMessage { request, pan, .. } = *card;
        // Fraud rules on requests (not on advices of what already happened).
        let screened = if request.mti().function() <= 1 {
            self.screen(request, pan)
        } else {
            Screened::default()
        };
        let (mut outcome, pan_hmac) = match screened.decline {
            Some(code) => (
                Outcome::new(
                    request.response_with(code)?,
                    DecidedBy::Fraud,
                    TxnState::Declined,
                ),
                screened.pan_hmac,
            ),
            None => {
                // Computed once: the write-ahead record and the journal row both carry it.
                let hmac = screened
                    .pan_hmac
                    .unwrap_or_else(|| self.journal.pan_hmac(pan));
                (self.route(card, &hmac).await?, Some(hmac))
            }
        };
        outcome.fraud = screened.fired;
        outcome.fraud_time = (!screened.took.is_zero()).then_some(screened.took);
        outcome.pan_hmac = pan_hmac;
        Some(outcome)
    }

    /// Runs the fraud rules on an authorization or financial request: the decline, if any,
    /// and what to journal.
    pub(super) fn screen(&self, request: &Message, pan: &Pan) -> Screened {
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

    /// The write-ahead record of a card request or reversal, less what the link fixes: the
    /// terminal's keys and the request, sealed, without its card secrets.
    pub(super) fn forward_record(&self, card: &CardMessage<'_>, pan_hmac: Option<&str>) -> Forward {
        let r = card.request;
        let text = |f: u8| r.get_str(f).map(str::to_owned);
        let kept = build::pack(&build::kept_request(r, card.pan));
        Forward {
            txn_id: card.txn_id,
            terminal_id: text(41),
            terminal_stan: text(11),
            terminal_time: text(7),
            rrn: text(37),
            dkey: Some(card.dkey.to_owned()),
            listener: card.listener.to_owned(),
            pan_hmac: pan_hmac.map(str::to_owned),
            payload: self.journal.sealer().seal(&kept),
            ..Forward::default()
        }
    }

    /// Routing, PIN translation and the acquirer (or stand-in) for a request.
    pub(super) async fn route(&self, card: &CardMessage<'_>, pan_hmac: &str) -> Option<Outcome> {
        let CardMessage {
            listener,
            request,
            txn_id,
            pan,
            began,
            ..
        } = *card;
        let Some(route) = self.bins.lookup(pan) else {
            return request
                .response_with(Failure::NoRoute.response_code())
                .map(Outcome::switch);
        };
        // Written down before the request goes on any link; resolved by the outcome's commit.
        let ahead = Ahead {
            journal: self.journal.write_ahead(),
            record: self.forward_record(card, Some(pan_hmac)),
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
                .exchange(translated.as_ref().unwrap_or(request), txn_id, Some(&ahead))
                .await;
            let waited = Some(asked.elapsed());
            let mut outcome = match result {
                Upstream::Reply(reply, link, stan) => {
                    // The acquirer's settlement date decides the business date.
                    let day = reply
                        .get_str(15)
                        .and_then(|d| settlement::resolve_mmdd(d, sent_day))
                        .unwrap_or(sent_day);
                    let partial = build::Partial::of(request, &reply);
                    let mut relayed = Endpoint::relay(request, &reply)?;
                    let mut o = match partial {
                        Ok(Some(p)) if !self.partial_approvals.contains(listener) => self
                            .refuse_approval(
                                card,
                                endpoint,
                                stan,
                                Some(p),
                                Failure::PartialNotAccepted,
                            )?,
                        Err(()) => {
                            warn!(endpoint = %name, "partial approval without a valid DE4: reversed");
                            self.refuse_approval(card, endpoint, stan, None, Failure::BadReply)?
                        }
                        Ok(partial) => {
                            if let Some(p) = &partial {
                                p.apply(&mut relayed);
                            }
                            let state = build::state_of(&relayed);
                            let mut o = Outcome::new(relayed, DecidedBy::Acquirer, state);
                            if state == TxnState::Approved {
                                o.reversal_if_unrecorded = Some((Arc::clone(endpoint), stan));
                            }
                            o.partial = partial;
                            o
                        }
                    };
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
                // Never written: what it would be could not be written down first.
                Upstream::Unrecorded => Outcome::switch(
                    request.response_with(Failure::JournalUnavailable.response_code())?,
                ),
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

    /// The CVV check stand-in asks for: track 2's CVV through the HSM.
    pub(super) async fn cvv_for_stand_in(&self, request: &Message, endpoint: &Endpoint) -> Cvv {
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

    /// Stand-in approval with its advice queued; `None` when stand-in declines.
    pub(super) fn stand_in(
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
        let adv = build::advice(request, pan, &code);
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

    /// The switch's own reversal (0420 68) of `request` as the acquirer got it (upstream STAN
    /// `stan`), for the amount approved when `partial` says so, queued for store-and-forward in
    /// the card's order; counted.
    pub(super) fn auto_reversal_entry(
        &self,
        request: &Message,
        pan: Option<&Pan>,
        endpoint: &Endpoint,
        stan: u32,
        txn_id: i64,
        partial: Option<&build::Partial>,
    ) -> Option<SafEntry> {
        let mut rev = build::auto_reversal(request, pan, stan, endpoint.sent_ids(request));
        if let Some(p) = partial {
            p.apply(&mut rev);
        }
        let order_key = pan.map(|p| self.journal.pan_hmac(p));
        let entry = self.saf_entry(endpoint, SafKind::Reversal, &rev, Some(txn_id), order_key)?;
        self.counters.auto_reversals.fetch_add(1, Ordering::Relaxed);
        Some(entry)
    }

    /// An acquirer's approval the terminal is not given (a partial approval its listener does
    /// not take, or one without a valid amount): reversed through store-and-forward (0420 68,
    /// the approved amount) and the terminal answered the code of `why`.
    fn refuse_approval(
        &self,
        card: &CardMessage<'_>,
        endpoint: &Endpoint,
        stan: u32,
        partial: Option<build::Partial>,
        why: Failure,
    ) -> Option<Outcome> {
        let CardMessage {
            request,
            txn_id,
            pan,
            ..
        } = *card;
        let entry =
            self.auto_reversal_entry(request, Some(pan), endpoint, stan, txn_id, partial.as_ref());
        let mut o = Outcome::new(
            request.response_with(why.response_code())?,
            DecidedBy::Switch,
            TxnState::ReversalPending,
        );
        o.change.saf.extend(entry);
        o.partial = partial;
        Some(o)
    }

    /// A request written to a link whose reply never came: reversed, and answered 91 or by
    /// stand-in.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn unknown_outcome(
        &self,
        request: &Message,
        txn_id: i64,
        pan: &Pan,
        endpoint: &Endpoint,
        (link, stan): (Arc<str>, u32),
        timed_out: bool,
        cvv: Cvv,
    ) -> Option<Outcome> {
        let entry = self.auto_reversal_entry(request, Some(pan), endpoint, stan, txn_id, None);
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
}
