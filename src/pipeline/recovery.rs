//! Recovery of forwarded requests whose outcome was never recorded (the switch died between
//! writing a request to an acquirer link and committing its outcome). Each write-ahead record
//! left behind becomes what a timeout would have made of it: the transaction journaled as
//! answered 91 and reversal pending, an automatic reversal (0420, DE39 68, DE90 naming the
//! original by the MTI, STAN, DE7, DE32 and DE33 the acquirer saw) queued for
//! store-and-forward, and its duplicate key completed with the 91, all in one database
//! transaction that also deletes the record. A copy of the request then gets the 91 again, and
//! the terminal's own reversal finds the original reversed (or being reversed) and changes
//! nothing more.
//!
//! It runs at start, before the listeners accept, for this node's records only: a record of
//! this node cannot belong to a request still in flight, since the process that sent it is
//! gone.

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

impl Pipeline {
    /// Resolves this node's forwarded requests with no recorded outcome; how many.
    ///
    /// # Errors
    /// The records cannot be read. A record that cannot be resolved (its endpoint gone from the
    /// configuration, a key that cannot open it, a failed commit) is logged and left for the
    /// next start.
    pub async fn recover(&self) -> Result<usize> {
        let left = self
            .journal
            .write_ahead()
            .unresolved()
            .await
            .context("reading write-ahead records")?;
        if left.is_empty() {
            return Ok(0);
        }
        warn!(
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
                    "write-ahead record not resolved; tried again at the next start"),
            }
        }
        info!(resolved = done, left = by_txn.len() - done, "recovery done");
        Ok(done)
    }

    /// Resolves the records of one transaction (the last one tried first in `group`).
    async fn recover_one(&self, group: &[&Forward]) -> Result<()> {
        let f = group.last().context("no record")?;
        let endpoint = self
            .endpoint(&f.endpoint)
            .with_context(|| format!("no endpoint {} in the configuration", f.endpoint))?;
        let request = self
            .journal
            .sealer()
            .open(&f.payload)
            .and_then(|b| build::unpack(&b))
            .context(
                "the request cannot be opened (not sealed under a data key this switch has)",
            )?;
        let stan: u32 = f
            .upstream_stan
            .parse()
            .context("the upstream STAN is not a number")?;
        let pan = build::card_pan(&request).context("no card number")?;
        let reply = request
            .response_with(Failure::Timeout.response_code())
            .context("no reply to the request")?;
        let mut o = Outcome::new(reply, DecidedBy::Timeout, TxnState::ReversalPending);
        for r in group {
            let stan: u32 = r.upstream_stan.parse().unwrap_or(stan);
            let to = self.endpoint(&r.endpoint).unwrap_or(endpoint);
            let sent = (r.acquirer_id.as_deref(), r.forwarding_id.as_deref());
            // The request as sent: same MTI and DE7, the STAN and DE32/DE33 as recorded.
            let reversal = build::auto_reversal(&request, Some(&pan), stan, sent);
            o.change.saf.extend(self.saf_entry(
                to,
                SafKind::Reversal,
                &reversal,
                Some(f.txn_id),
                f.pan_hmac.clone(),
            ));
        }
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
        self.counters.auto_reversals.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
