//! The store-and-forward queue's reads: due entries (the oldest pending entry of each card
//! only, so one card's messages go in order), leases (so that several switch nodes sharing the
//! database never send one entry at the same time), depth.

use super::db::{Arg, Statement};
use super::{Backend, Journal};

/// A queued message due for (re)transmission.
#[derive(Debug, Clone)]
pub struct Queued {
    /// Entry id.
    pub id: i64,
    /// Reversal or advice (`reversal` | `advice`).
    pub kind: String,
    /// MTI of the first transmission.
    pub mti: String,
    /// The transaction its acknowledgement settles.
    pub txn_id: Option<i64>,
    /// The sealed message.
    pub payload: String,
    /// Transmissions so far.
    pub attempts: i32,
    /// Expiry, microseconds since the epoch.
    pub expires_us: i64,
}

impl Journal {
    /// Up to `limit` entries of `endpoint` due at `now_us`, each the oldest pending entry of its
    /// card, not leased by anyone.
    ///
    /// # Errors
    /// Database errors.
    pub async fn saf_due(
        &self,
        endpoint: &str,
        now_us: i64,
        limit: i64,
    ) -> Result<Vec<Queued>, sqlx::Error> {
        // The head of each card's line, then those due and free. On PostgreSQL one ordered
        // pass over the pending entries (`saf_order`), linear whatever the statistics say: a
        // correlated form (NOT EXISTS an older entry, or id = the card's min) let the planner,
        // without statistics on a table that just filled, compare every pending entry with every
        // other one, and a backlog of a few thousand took seconds per round (`cargo bench
        // --bench saf`). SQLite has no DISTINCT ON and plans the correlated form on `saf_order`.
        const POSTGRES: &str = "SELECT id, kind, mti, txn_id, payload, attempts, expires_us FROM \
            (SELECT DISTINCT ON (order_key) id, kind, mti, txn_id, payload, attempts, expires_us, \
             next_at_us, lease_until_us FROM saf WHERE endpoint = $1 AND state = 'pending' \
             ORDER BY order_key, id) head \
            WHERE next_at_us <= $2 AND lease_until_us <= $2 ORDER BY id LIMIT $3";
        const SQLITE: &str = "SELECT id, kind, mti, txn_id, payload, attempts, expires_us FROM saf s \
            WHERE s.endpoint = $1 AND s.state = 'pending' AND s.next_at_us <= $2 AND s.lease_until_us <= $2 \
            AND s.id = (SELECT min(p.id) FROM saf p WHERE p.endpoint = s.endpoint \
            AND p.order_key = s.order_key AND p.state = 'pending') ORDER BY s.id LIMIT $3";
        let sql = match self.backend() {
            Backend::Postgres(_) => POSTGRES,
            Backend::Sqlite(_) => SQLITE,
        };
        let st = Statement::new(sql).bind(endpoint).bind(now_us).bind(limit);
        self.backend()
            .fetch_all(&st)
            .await?
            .into_iter()
            .map(|r| {
                Ok(Queued {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    mti: r.get(2)?,
                    txn_id: r.get(3)?,
                    payload: r.get(4)?,
                    attempts: r.get(5)?,
                    expires_us: r.get(6)?,
                })
            })
            .collect()
    }

    /// Takes entries for `until_us` unless someone else holds them; the ids taken.
    ///
    /// # Errors
    /// Database errors.
    pub async fn saf_lease(
        &self,
        ids: &[i64],
        now_us: i64,
        until_us: i64,
    ) -> Result<Vec<i64>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut st = Statement::new("UPDATE saf SET lease_until_us = ");
        st.arg(until_us)
            .push(", leased_by = ")
            .arg(self.node())
            .push(" WHERE state = 'pending' AND lease_until_us <= ")
            .arg(now_us)
            .push(" AND id IN ");
        st.tuple(ids.iter().map(|id| Arg::from(*id)));
        st.push(" RETURNING id");
        self.backend()
            .fetch_all(&st)
            .await?
            .into_iter()
            .map(|r| r.get::<i64>(0))
            .collect()
    }

    /// Pending entries, for one endpoint or all.
    ///
    /// # Errors
    /// Database errors.
    pub async fn saf_depth(&self, endpoint: Option<&str>) -> Result<i64, sqlx::Error> {
        let st = Statement::new(
            "SELECT count(*) FROM saf WHERE state = 'pending' AND (CAST($1 AS TEXT) IS NULL OR endpoint = $1)",
        )
        .bind(endpoint);
        self.count(&st).await
    }

    /// Whether a reversal for `txn_id` covers an approval that comes now (a late reply): one
    /// queued and not sent yet, which reaches the acquirer after it decided. One sent already
    /// does not: it may have reached the acquirer before the original did (over another link),
    /// and an 0420 is acknowledged whether or not it found its original. Another reversal of
    /// an original reversed already changes nothing.
    ///
    /// # Errors
    /// Database errors.
    pub async fn saf_reversal_covers(&self, txn_id: i64) -> Result<bool, sqlx::Error> {
        let st = Statement::new(
            "SELECT count(*) FROM saf WHERE txn_id = $1 AND kind = 'reversal' \
             AND state = 'pending' AND attempts = 0",
        )
        .bind(txn_id);
        let n = self.count(&st).await?;
        Ok(n > 0)
    }

    async fn count(&self, st: &Statement<'_>) -> Result<i64, sqlx::Error> {
        match self.backend().fetch_optional(st).await? {
            Some(r) => r.get(0),
            None => Ok(0),
        }
    }
}
