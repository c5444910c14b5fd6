//! Recovery of forwarded requests whose outcome was never recorded (the switch died between
//! writing a request to an acquirer link and committing its outcome). Each write-ahead record
//! left behind becomes what a timeout would have made of it: the transaction journaled as
//! answered 91 and reversal pending, an automatic reversal (0420, DE39 68, DE90 naming the
//! original by the MTI, STAN, DE7, DE32 and DE33 the acquirer saw) queued for
//! store-and-forward, and its duplicate key completed with the 91, all in one database
//! transaction that also deletes the record. A copy of the request then gets the 91 again, and
//! the terminal's own reversal finds the original reversed (or being reversed) and changes
//! nothing more. A record of a terminal's 0400 is resolved as taken: its row answered 00, the
//! original reversed, and the reversal repeated as a 0420 (an acquirer acknowledges a repeat of
//! a reversal it has applied).
//!
//! It runs at start, before the listeners accept, for this node's records: a record of this
//! node cannot belong to a request still in flight, since the process that sent it is gone.
//! And it runs all along for the records of other nodes that are gone (no heartbeat within
//! `journal.takeover_after_ms`, their lock free), under that node's lock, so that exactly one
//! process resolves each record.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use cardswitch_routing::Failure;
use tracing::{error, info, warn};

use super::outcome::Outcome;
use super::{build, Pipeline};
use crate::dedup::Decision;
use crate::journal::ahead::Forward;
use crate::journal::{DecidedBy, SafKind};
use crate::settlement;
use crate::state::TxnState;

/// How far before a node's last heartbeat its duplicate claims left in flight are looked for
/// (a request takes seconds; older claims in flight belong to an outage of their own and are
/// left to the copies' wait).
const CLAIMS_WINDOW_US: i64 = 10 * 60 * 1_000_000;

impl Pipeline {
    /// Resolves this node's forwarded requests with no recorded outcome, and lets go of the
    /// duplicate claims its previous run left in flight without forwarding them; how many
    /// records were resolved.
    ///
    /// # Errors
    /// The records cannot be read. A record that cannot be resolved (its endpoint gone from the
    /// configuration, a key that cannot open it, a failed commit) is logged and left for the
    /// next start.
    pub async fn recover(&self) -> Result<usize> {
        let node = self.journal.node().to_owned();
        let (done, _left) = self.resolve_forwards(&node).await?;
        let (last_beat, started) = self.journal.previous_run();
        let from = if last_beat > 0 { last_beat } else { started } - CLAIMS_WINDOW_US;
        match self
            .journal
            .claims()
            .release_orphans(&node, from, started)
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(
                claims = n,
                "duplicate claims of requests never forwarded let go"
            ),
            Err(e) => warn!(error = %e, "duplicate claims left in flight not looked at"),
        }
        Ok(done)
    }

    /// Takes over the work of every other node that is gone (see
    /// [`crate::journal::node`]): its forwarded requests with no recorded outcome are resolved
    /// as this node's own are at start, and its duplicate claims left in flight without a
    /// record are let go. How many records were resolved.
    ///
    /// # Errors
    /// The database failing.
    pub async fn take_over_gone_nodes(&self, after: std::time::Duration) -> Result<usize> {
        let mut total = 0;
        for gone in self.journal.gone_nodes(after).await? {
            let name = gone.name.clone();
            let result = self.take_over(&gone).await;
            let done = match result {
                Ok((resolved, 0)) => {
                    total += resolved;
                    true
                }
                Ok((resolved, left)) => {
                    total += resolved;
                    error!(node = %name, resolved, left,
                        "node gone: some of its forwarded requests could not be resolved; tried again");
                    false
                }
                Err(e) => {
                    error!(node = %name, error = %e, "taking over a gone node failed; tried again");
                    false
                }
            };
            gone.release(done).await;
        }
        Ok(total)
    }

    async fn take_over(&self, gone: &crate::journal::node::GoneNode) -> Result<(usize, usize)> {
        let (resolved, left) = self.resolve_forwards(&gone.name).await?;
        if resolved > 0 {
            metrics::counter!(crate::telemetry::NODE_TAKEOVERS, "node" => gone.name.clone())
                .increment(resolved as u64);
        }
        let released = self
            .journal
            .claims()
            .release_orphans(
                &gone.name,
                gone.heartbeat_us - CLAIMS_WINDOW_US,
                crate::journal::Journal::now_us(),
            )
            .await?;
        warn!(node = %gone.name, last_heartbeat_us = gone.heartbeat_us, resolved, left,
            claims_let_go = released, "node gone: its work taken over");
        Ok((resolved, left))
    }

    /// Resolves the forwarded requests node `node` left with no recorded outcome (the node is
    /// not running): how many transactions were resolved, and how many are left.
    async fn resolve_forwards(&self, node: &str) -> Result<(usize, usize)> {
        let left = self
            .journal
            .write_ahead()
            .unresolved_of(node)
            .await
            .context("reading write-ahead records")?;
        if left.is_empty() {
            return Ok((0, 0));
        }
        warn!(
            node,
            records = left.len(),
            "forwarded requests with no recorded outcome: reversing them"
        );
        // A request tried on a link that could not take it, then on another, left a record of
        // each: one row for the transaction, a reversal of each (the acquirer may have seen any).
        let mut by_txn: Vec<(i64, Vec<&Forward>)> = Vec::new();
        for f in &left {
            match by_txn.iter_mut().find(|(id, _)| *id == f.txn_id) {
                Some((_, g)) => g.push(f),
                None => by_txn.push((f.txn_id, vec![f])),
            }
        }
        let mut done = 0;
        for (txn, group) in &by_txn {
            match self.recover_one(group).await {
                Ok(()) => done += 1,
                Err(e) => error!(txn, error = %e,
                    "write-ahead record not resolved; tried again later"),
            }
        }
        info!(
            node,
            resolved = done,
            left = by_txn.len() - done,
            "recovery done"
        );
        Ok((done, by_txn.len() - done))
    }

    /// The terminal's request a record keeps.
    pub(super) fn open_record(&self, f: &Forward) -> Result<cardswitch_codec::Message> {
        self.journal
            .sealer()
            .open(&f.payload)
            .and_then(|b| build::unpack(&b))
            .context("the request cannot be opened (not sealed under a data key this switch has)")
    }

    /// The switch's reversal (0420, DE39 68) of the request recorded in `f`, named as its
    /// acquirer saw it: same MTI and DE7, the STAN and DE32/DE33 as recorded; queued for the
    /// record's endpoint (`fallback` when that is gone from the configuration).
    pub(super) fn reversal_of_record(
        &self,
        f: &Forward,
        request: &cardswitch_codec::Message,
        pan: &cardswitch_codec::Pan,
        fallback: Option<&std::sync::Arc<crate::upstream::Endpoint>>,
    ) -> Option<crate::journal::SafEntry> {
        let stan: u32 = f.upstream_stan.parse().ok()?;
        let to = self.endpoint(&f.endpoint).or(fallback)?;
        let sent = (f.acquirer_id.as_deref(), f.forwarding_id.as_deref());
        let reversal = build::auto_reversal(request, Some(pan), stan, sent);
        self.saf_entry(
            to,
            SafKind::Reversal,
            &reversal,
            Some(f.txn_id),
            f.pan_hmac.clone(),
        )
    }

    /// Resolves the records of one transaction (the last one tried first in `group`).
    async fn recover_one(&self, group: &[&Forward]) -> Result<()> {
        let f = group.last().context("no record")?;
        let endpoint = self
            .endpoint(&f.endpoint)
            .with_context(|| format!("no endpoint {} in the configuration", f.endpoint))?;
        let request = self.open_record(f)?;
        let stan: u32 = f
            .upstream_stan
            .parse()
            .context("the upstream STAN is not a number")?;
        let reversal = f.mti.starts_with("04");
        let mut o = if reversal {
            self.recovered_reversal(f, &request, endpoint).await?
        } else {
            let pan = build::card_pan(&request).context("no card number")?;
            let reply = request
                .response_with(Failure::Timeout.response_code())
                .context("no reply to the request")?;
            let mut o = Outcome::new(reply, DecidedBy::Timeout, TxnState::ReversalPending);
            for r in group {
                o.change
                    .saf
                    .extend(self.reversal_of_record(r, &request, &pan, Some(endpoint)));
            }
            o
        };
        o.change.resolves.push(f.txn_id);
        o.endpoint = Some(f.endpoint.clone());
        o.link = Some(f.link.as_str().into());
        o.upstream_stan = Some(stan);
        o.txn_id = Some(f.txn_id);
        let base = self.journal.row(
            &f.listener,
            endpoint.dialect(),
            &request,
            &o.reply,
            o.decided_by,
            f.created_us,
            std::time::Duration::ZERO,
            f.pan_hmac.clone(),
        );
        let day = endpoint.business_day().current();
        let row = o.journal_row(
            base,
            std::time::Duration::ZERO,
            day,
            settlement::batch::batch_of(&request, self.batch_field),
        );
        let mut change = std::mem::take(&mut o.change);
        change.rows.push(row);
        if let Some(k) = &f.dkey {
            change.dedup_done = Some((k.clone(), Decision::of(&o.reply).seal(&self.journal)));
        }
        let committed = self.journal.submit(change).await;
        anyhow::ensure!(committed.ok, "the journal commit failed");
        if !reversal {
            self.counters.auto_reversals.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A terminal's 0400 that went to the acquirer with no recorded outcome: the acquirer may
    /// or may not have reversed the original, and a reversal can be repeated, so it is taken
    /// (answered 00, the original reversed in the journal) and repeated as a 0420 naming the
    /// original as the acquirer saw it. An original that no longer stands changes nothing.
    async fn recovered_reversal(
        &self,
        f: &Forward,
        request: &cardswitch_codec::Message,
        endpoint: &crate::upstream::Endpoint,
    ) -> Result<Outcome> {
        let original = self
            .journal
            .find_original(&super::reversal::keys_of(request))
            .await
            .context("looking up the reversal's original")?;
        let Some(original) = original else {
            // Forwarded only once its original was found: gone since (purged). Nothing to undo.
            warn!(
                txn = f.txn_id,
                "recovered reversal: its original is no longer journaled"
            );
            let reply = request
                .response_with(cardswitch_codec::ResponseCode::APPROVED)
                .context("no reply to the reversal")?;
            return Ok(Outcome::new(reply, DecidedBy::Switch, TxnState::Orphan));
        };
        let ack = |state| {
            super::reversal::acknowledged(request, &original, state)
                .context("no reply to the reversal")
        };
        let Some((to, total)) = super::reversal::effect_on(&original, request) else {
            return ack(TxnState::Duplicate);
        };
        let mut o = ack(to)?;
        let sent = (f.acquirer_id.as_deref(), f.forwarding_id.as_deref());
        let outgoing = build::outgoing_reversal(request, &original, sent);
        self.queue_reversal(&mut o, &outgoing, endpoint, f.txn_id, &original);
        super::reversal::reverses(&mut o, request, f.txn_id, &original, to, total);
        Ok(o)
    }
}
