//! The store-and-forward sender: one task per endpoint sends queued reversals and advices until
//! the acquirer acknowledges them.
//!
//! Each round takes the due entries (the oldest pending entry of each card only, so one card's
//! messages go in order), leases them in the database (several switch nodes never send one
//! entry at once; a lease left by a node that died runs out), and sends them, several cards at
//! a time. The first transmission goes with the entry's MTI, later ones as repeats (0420 ->
//! 0421). The acquirer's code ends the entry (`valid_codes`), retries it (`retry_codes`, with
//! `ZZ` for no reply) after a backoff, or refuses it (any other code, or out of tries). An
//! acknowledgement settles the transaction's state in the same database transaction.

use std::sync::Arc;
use std::time::Duration;

use cardswitch_codec::Mti;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::journal::saf::Queued;
use crate::journal::{Change, Journal, SafProgress, SafState, StateChange};
use crate::state::TxnState;
use crate::upstream::{Endpoint, Upstream};

/// Runs the sender of one endpoint until `stop`.
pub(crate) async fn run(journal: Journal, endpoint: Arc<Endpoint>, stop: CancellationToken) {
    let cfg = endpoint.config().saf.clone();
    let poll = Duration::from_millis(cfg.poll_ms.clamp(10, 250));
    let lease = endpoint.config().request_timeout() + Duration::from_secs(5);
    let queued = Arc::clone(journal.saf_queued());
    let mut sending: JoinSet<()> = JoinSet::new();
    // Refill once a quarter of the window is free (or nothing is on its way), not after every
    // single acknowledgement: each refill is a query over the pending entries.
    let refill_at = (cfg.max_in_flight / 4).max(1);
    loop {
        while sending.try_join_next().is_some() {}
        // Keep up to max_in_flight entries on their way; refill as they finish.
        let room = cfg.max_in_flight.saturating_sub(sending.len());
        let mut took = 0;
        let mut full = false;
        if room >= refill_at || (room > 0 && sending.is_empty()) {
            let now = Journal::now_us();
            let due = match journal
                .saf_due(endpoint.name(), now, i64::try_from(room).unwrap_or(64))
                .await
            {
                Ok(due) => due,
                Err(e) => {
                    warn!(endpoint = endpoint.name(), error = %e, "store-and-forward queue unreadable");
                    Vec::new()
                }
            };
            full = due.len() >= room;
            let until = now + i64::try_from(lease.as_micros()).unwrap_or(i64::MAX / 2);
            let ids: Vec<i64> = due.iter().map(|q| q.id).collect();
            let leased = journal
                .saf_lease(&ids, now, until)
                .await
                .unwrap_or_default();
            for q in due.into_iter().filter(|q| leased.contains(&q.id)) {
                took += 1;
                let (j, e) = (journal.clone(), Arc::clone(&endpoint));
                sending.spawn(async move { send(&j, &e, q).await });
            }
        }
        // A full round: more may be due at once.
        if full && took > 0 && cfg.max_in_flight.saturating_sub(sending.len()) >= refill_at {
            continue;
        }
        // Wake when a send finishes, on new entries here, on the poll (other nodes, retries
        // coming due), or on stop.
        tokio::select! {
            () = stop.cancelled() => {
                sending.abort_all();
                return;
            }
            Some(_) = sending.join_next(), if !sending.is_empty() => {}
            () = queued.notified() => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
}

fn code_in(code: &str, list: &[String]) -> bool {
    list.iter().any(|c| c == code)
}

async fn send(journal: &Journal, endpoint: &Endpoint, q: Queued) {
    let cfg = &endpoint.config().saf;
    let now = Journal::now_us();
    let mut progress = SafProgress {
        id: q.id,
        state: SafState::Pending,
        attempts: q.attempts,
        next_at_us: now,
        last_code: None,
    };
    let message = journal
        .sealer()
        .open(&q.payload)
        .and_then(|body| endpoint.dialect().decode(&body).ok());
    let mut states = Vec::new();
    if now > q.expires_us {
        progress.state = SafState::Expired;
        error!(endpoint = endpoint.name(), entry = q.id, kind = %q.kind, "store-and-forward entry expired undelivered");
    } else if let Some(mut msg) = message {
        if q.attempts > 0 {
            // Retransmissions are repeats: 0420 -> 0421.
            let mut b = *msg.mti().original().as_bytes();
            b[3] += 1;
            if let Ok(m) = Mti::new(b) {
                msg.set_mti(m);
            }
        }
        let result = endpoint.exchange(&msg, q.txn_id.unwrap_or(0), None).await;
        // The STAN this transmission carried: a delivered advice is what the acquirer knows
        // the stand-in approval by (a later reversal names it so).
        let mut sent_stan = None;
        let code = match result {
            Upstream::Reply(reply, _, stan) => Some({
                sent_stan = Some(format!("{stan:06}"));
                reply
                    .response_code()
                    .map_or_else(|| "--".to_owned(), |c| c.to_string())
            }),
            // Not transmitted (no link ready, or no MAC from the HSM): again soon.
            Upstream::NotSent | Upstream::Unsigned | Upstream::Unrecorded => None,
            Upstream::Lost(..) | Upstream::TimedOut(..) => Some("ZZ".to_owned()),
        };
        match code {
            // Not transmitted: no link ready. Not a try; again soon.
            None => {
                progress.next_at_us = now + ms(cfg.retry_min_ms);
            }
            Some(code) => {
                progress.attempts += 1;
                let tries_left = cfg.max_tries == 0
                    || u32::try_from(progress.attempts).unwrap_or(u32::MAX) < cfg.max_tries;
                if code_in(&code, &cfg.valid_codes) {
                    progress.state = SafState::Delivered;
                    debug!(endpoint = endpoint.name(), entry = q.id, %code, "store-and-forward entry delivered");
                    if let Some(txn_id) = q.txn_id {
                        let (from, to, cause): (&'static [TxnState], _, _) = if q.kind == "advice" {
                            (
                                &[TxnState::AdvicePending],
                                TxnState::Advised,
                                "advice acknowledged",
                            )
                        } else {
                            (
                                &[TxnState::ReversalPending],
                                TxnState::Reversed,
                                "reversal acknowledged",
                            )
                        };
                        states.push(StateChange {
                            txn_id,
                            to: Some(to),
                            from: std::borrow::Cow::Borrowed(from),
                            amount_reversed_minor: None,
                            upstream_stan: (q.kind == "advice")
                                .then(|| sent_stan.clone())
                                .flatten(),
                            cause: cause.into(),
                            detail: Some(format!("entry {} code {code}", q.id)),
                        });
                    }
                } else if code_in(&code, &cfg.retry_codes) && tries_left {
                    let shift = u32::try_from(progress.attempts.saturating_sub(1))
                        .unwrap_or(0)
                        .min(20);
                    let delay = cfg
                        .retry_min_ms
                        .saturating_mul(1 << shift)
                        .min(cfg.retry_max_ms);
                    progress.next_at_us = now + ms(delay);
                } else {
                    progress.state = SafState::Refused;
                    error!(endpoint = endpoint.name(), entry = q.id, %code, attempts = progress.attempts, "store-and-forward entry refused");
                }
                progress.last_code = Some(code);
            }
        }
    } else {
        // Never given up for want of a key: it stays pending (and counted) until a switch with
        // the key that sealed it sends it.
        progress.next_at_us = now + ms(cfg.retry_max_ms);
        metrics::counter!(crate::telemetry::SAF_UNOPENABLE, "endpoint" => endpoint.name().to_owned())
            .increment(1);
        error!(
            endpoint = endpoint.name(),
            entry = q.id,
            "store-and-forward entry cannot be opened: not sealed under a data key this switch \
             has (journal.data_key, journal.retired_data_keys); it stays pending"
        );
    }
    let done = progress.state;
    let committed = journal
        .submit(Change {
            saf_progress: vec![progress],
            states,
            ..Change::default()
        })
        .await;
    if !committed.ok {
        warn!(
            endpoint = endpoint.name(),
            entry = q.id,
            "store-and-forward progress not recorded; the entry will be sent again"
        );
    } else if done == SafState::Delivered {
        info!(endpoint = endpoint.name(), entry = q.id, "delivered");
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
}
