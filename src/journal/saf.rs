//! The store-and-forward queue's reads: due entries (the oldest pending entry of each card
//! only, so one card's messages go in order), leases (so that several switch nodes sharing the
//! database never send one entry at the same time), depth.

use sqlx::{QueryBuilder, Row as _};

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
        macro_rules! due {
            ($sql:expr, $pool:expr) => {{
                sqlx::query($sql)
                    .bind(endpoint)
                    .bind(now_us)
                    .bind(limit)
                    .fetch_all($pool)
                    .await?
                    .into_iter()
                    .map(|r| {
                        Ok(Queued {
                            id: r.try_get(0)?,
                            kind: r.try_get(1)?,
                            mti: r.try_get(2)?,
                            txn_id: r.try_get(3)?,
                            payload: r.try_get(4)?,
                            attempts: r.try_get(5)?,
                            expires_us: r.try_get(6)?,
                        })
                    })
                    .collect()
            }};
        }
        match self.backend() {
            Backend::Postgres(p) => due!(POSTGRES, p),
            Backend::Sqlite(p) => due!(SQLITE, p),
        }
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
        let node = self.node().to_owned();
        macro_rules! lease {
            ($db:ty, $pool:expr) => {{
                let mut q: QueryBuilder<$db> =
                    QueryBuilder::new("UPDATE saf SET lease_until_us = ");
                q.push_bind(until_us)
                    .push(", leased_by = ")
                    .push_bind(node)
                    .push(" WHERE state = 'pending' AND lease_until_us <= ")
                    .push_bind(now_us)
                    .push(" AND id IN (");
                let mut sep = q.separated(", ");
                for id in ids {
                    sep.push_bind(*id);
                }
                q.push(") RETURNING id");
                q.build()
                    .fetch_all($pool)
                    .await?
                    .into_iter()
                    .map(|r| r.try_get::<i64, _>(0))
                    .collect()
            }};
        }
        match self.backend() {
            Backend::Postgres(p) => lease!(sqlx::Postgres, p),
            Backend::Sqlite(p) => lease!(sqlx::Sqlite, p),
        }
    }

    /// Pending entries, for one endpoint or all.
    ///
    /// # Errors
    /// Database errors.
    pub async fn saf_depth(&self, endpoint: Option<&str>) -> Result<i64, sqlx::Error> {
        match self.backend() {
            Backend::Postgres(p) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM saf WHERE state = 'pending' AND ($1::text IS NULL OR endpoint = $1)",
                )
                .bind(endpoint)
                .fetch_one(p)
                .await
            }
            Backend::Sqlite(p) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM saf WHERE state = 'pending' AND (?1 IS NULL OR endpoint = ?1)",
                )
                .bind(endpoint)
                .fetch_one(p)
                .await
            }
        }
    }

    /// Whether a reversal for `txn_id` is queued, or was acknowledged by an acquirer that
    /// found its original (not 25).
    ///
    /// # Errors
    /// Database errors.
    pub async fn saf_reversal_covers(&self, txn_id: i64) -> Result<bool, sqlx::Error> {
        let n: i64 = match self.backend() {
            Backend::Postgres(p) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM saf WHERE txn_id = $1 AND kind = 'reversal' \
                     AND (state = 'pending' OR (state = 'delivered' AND last_code <> '25'))",
                )
                .bind(txn_id)
                .fetch_one(p)
                .await?
            }
            Backend::Sqlite(p) => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM saf WHERE txn_id = ? AND kind = 'reversal' \
                     AND (state = 'pending' OR (state = 'delivered' AND last_code <> '25'))",
                )
                .bind(txn_id)
                .fetch_one(p)
                .await?
            }
        };
        Ok(n > 0)
    }
}
