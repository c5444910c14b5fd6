//! Duplicate-key claims in the database, batched.
//!
//! A request's key is claimed before the request goes anywhere: one multi-row
//! `INSERT ... ON CONFLICT DO NOTHING RETURNING` per batch tells which keys are new. For the
//! others the stored row says whether the first request is done (its sealed reply), still in
//! flight, or had other content. Claims commit without waiting for the disk
//! (`synchronous_commit = off`): the journal commit that completes the transaction is
//! synchronous and makes the claim durable with it; a claim lost in a crash belongs to a
//! transaction that was never answered.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::error;

use super::backend::is_data_error;
use super::db::{Arg, Relaxed, Statement};
use super::Breaker;
use super::{next_batch, now_us, Backend};

/// What the database knows of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is new: this request goes ahead.
    New,
    /// Seen before with the same content and completed: its sealed reply.
    Done(String),
    /// Seen before with the same content, not completed yet.
    InFlight,
    /// Seen before with other content.
    Conflict,
    /// The database could not tell.
    Unavailable,
}

struct Request {
    key: String,
    hash: String,
    txn_id: i64,
    reply: oneshot::Sender<Claim>,
}

/// Handle to the claimer task.
#[derive(Clone, Debug)]
pub struct Claims {
    tx: mpsc::Sender<Request>,
    backend: Backend,
}

impl Claims {
    pub(super) fn start(
        backend: Backend,
        node: &str,
        batch_max: usize,
        breaker: Arc<Breaker>,
        tracker: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(batch_max * 8);
        tracker.spawn(run(
            backend.clone(),
            node.to_owned(),
            batch_max,
            breaker,
            rx,
        ));
        Self { tx, backend }
    }

    /// Claims `key` for a request with content hash `hash`.
    pub async fn claim(&self, key: String, hash: String, txn_id: i64) -> Claim {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            key,
            hash,
            txn_id,
            reply,
        };
        if self.tx.send(req).await.is_err() {
            return Claim::Unavailable;
        }
        rx.await.unwrap_or(Claim::Unavailable)
    }

    /// The stored state of a key, as [`Claims::claim`] would see it, without claiming.
    pub async fn look(&self, key: &str, hash: &str) -> Claim {
        let found = lookup(&self.backend, &[key]).await;
        match found {
            Ok(rows) => rows
                .into_iter()
                .next()
                .map_or(Claim::Unavailable, |r| r.verdict(hash)),
            Err(_) => Claim::Unavailable,
        }
    }

    /// Takes over a key claimed in flight before `stale_before_us` by a request that never
    /// completed (its node died): whether it is now this request's.
    pub async fn take_over(
        &self,
        key: &str,
        hash: &str,
        txn_id: i64,
        node: &str,
        stale_before_us: i64,
    ) -> bool {
        let st = Statement::new(
            "UPDATE dedup SET txn_id = $1, node = $2, created_us = $3 \
             WHERE dkey = $4 AND content_hash = $5 AND state = 'in_flight' AND created_us < $6",
        )
        .bind(txn_id)
        .bind(node)
        .bind(now_us())
        .bind(key)
        .bind(hash)
        .bind(stale_before_us);
        let done = self.backend.execute(&st).await;
        matches!(done, Ok(1))
    }

    /// Lets go of the keys node `node` claimed between `from_us` and `to_us` and left in flight
    /// with no write-ahead record: their requests were never written to an acquirer (the
    /// record is committed before that), so a copy may go ahead as new. Only for a node that
    /// is not running (gone, or this node before its restart). How many.
    ///
    /// # Errors
    /// The database failing.
    pub async fn release_orphans(
        &self,
        node: &str,
        from_us: i64,
        to_us: i64,
    ) -> Result<u64, sqlx::Error> {
        let st = Statement::new(
            "DELETE FROM dedup WHERE created_us >= $1 AND created_us < $2 AND node = $3 \
             AND state = 'in_flight' \
             AND NOT EXISTS (SELECT 1 FROM forwards f WHERE f.txn_id = dedup.txn_id)",
        )
        .bind(from_us)
        .bind(to_us)
        .bind(node);
        self.backend.execute(&st).await
    }

    /// Deletes keys older than `retention`, a bounded number at a time; how many.
    pub async fn purge(&self, retention: Duration) -> u64 {
        let before = now_us() - i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
        let st = Statement::new(
            "DELETE FROM dedup WHERE dkey IN (SELECT dkey FROM dedup WHERE created_us < $1 LIMIT 50000)",
        )
        .bind(before);
        let done = self.backend.execute(&st).await;
        done.unwrap_or_else(|e| {
            error!(error = %e, "purging old duplicate keys failed");
            0
        })
    }
}

struct Stored {
    key: String,
    hash: String,
    state: String,
    reply: Option<String>,
}

impl Stored {
    fn verdict(&self, hash: &str) -> Claim {
        if self.hash != hash {
            Claim::Conflict
        } else if self.state == "done" {
            self.reply.clone().map_or(Claim::InFlight, Claim::Done)
        } else {
            Claim::InFlight
        }
    }
}

async fn lookup(backend: &Backend, keys: &[&str]) -> Result<Vec<Stored>, sqlx::Error> {
    let mut st =
        Statement::new("SELECT dkey, content_hash, state, reply FROM dedup WHERE dkey IN ");
    st.tuple(keys.iter().map(|k| Arg::from(*k)));
    backend
        .fetch_all(&st)
        .await?
        .into_iter()
        .map(|r| {
            Ok(Stored {
                key: r.get(0)?,
                hash: r.get(1)?,
                state: r.get(2)?,
                reply: r.get(3)?,
            })
        })
        .collect()
}

/// Inserts the batch's keys; the keys that were new.
async fn insert(
    relaxed: &mut Relaxed,
    node: &str,
    batch: &[Request],
) -> Result<HashSet<String>, sqlx::Error> {
    let now = now_us();
    // Each key once (a statement may not touch a row twice); the first request carrying it.
    let mut seen = HashSet::new();
    let unique: Vec<&Request> = batch.iter().filter(|r| seen.insert(&r.key)).collect();
    let keys: Vec<Option<&str>> = unique.iter().map(|r| Some(r.key.as_str())).collect();
    let hashes: Vec<Option<&str>> = unique.iter().map(|r| Some(r.hash.as_str())).collect();
    let ids: Vec<Option<i64>> = unique.iter().map(|r| Some(r.txn_id)).collect();
    let mut st = if relaxed.is_postgres() {
        // One statement text whatever the batch size: prepared and planned once per session.
        Statement::new(
            "INSERT INTO dedup (dkey, content_hash, txn_id, node, state, created_us) \
             SELECT k, h, i, $4, 'in_flight', $5 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(k, h, i)",
        )
        .bind(Arg::Texts(&keys))
        .bind(Arg::Texts(&hashes))
        .bind(Arg::Ints(&ids))
        .bind(node)
        .bind(now)
    } else {
        let mut st = Statement::new(
            "INSERT INTO dedup (dkey, content_hash, txn_id, node, state, created_us) VALUES ",
        );
        st.tuples(&unique, |r| {
            [
                Arg::from(&r.key),
                Arg::from(&r.hash),
                Arg::from(r.txn_id),
                Arg::from(node),
                Arg::from("in_flight"),
                Arg::from(now),
            ]
        });
        st
    };
    // A key already claimed by this same transaction counts as new: the statement sent again
    // after a lost connection (whose first attempt may have committed) claims nothing twice.
    st.push(
        " ON CONFLICT (dkey) DO UPDATE SET txn_id = EXCLUDED.txn_id \
         WHERE dedup.txn_id = EXCLUDED.txn_id RETURNING dkey",
    );
    // The claim's commit need not wait for the disk (see the module's comment).
    relaxed
        .fetch_all(&st)
        .await?
        .into_iter()
        .map(|r| r.get::<String>(0))
        .collect()
}

async fn run(
    backend: Backend,
    node: String,
    batch_max: usize,
    breaker: Arc<Breaker>,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut relaxed = Relaxed::new(&backend);
    let mut batch: Vec<Request> = Vec::with_capacity(batch_max);
    while next_batch(&mut rx, &mut batch, batch_max).await {
        // While the journal cannot commit, nobody waits on a database that is not there.
        let inserted = if breaker.is_open() {
            Err(None)
        } else {
            insert(&mut relaxed, &node, &batch).await.map_err(Some)
        };
        let new = match inserted {
            Ok(new) => new,
            Err(e) => {
                if let Some(e) = e {
                    error!(error = %e, claims = batch.len(), "duplicate-key claims failed");
                    if !is_data_error(&e) {
                        breaker.trip("duplicate-key claims failed");
                    }
                }
                for r in batch.drain(..) {
                    let _ = r.reply.send(Claim::Unavailable);
                }
                continue;
            }
        };
        // A key is new for the first request of the batch that carries it only.
        let mut granted: HashSet<String> = HashSet::new();
        let mut others: Vec<Request> = Vec::new();
        for r in batch.drain(..) {
            if new.contains(&r.key) && granted.insert(r.key.clone()) {
                let _ = r.reply.send(Claim::New);
            } else {
                others.push(r);
            }
        }
        if others.is_empty() {
            continue;
        }
        let keys: Vec<&str> = others.iter().map(|r| r.key.as_str()).collect();
        match lookup(&backend, &keys).await {
            Ok(stored) => {
                for r in others {
                    let verdict = stored
                        .iter()
                        .find(|s| s.key == r.key)
                        .map_or(Claim::Unavailable, |s| s.verdict(&r.hash));
                    let _ = r.reply.send(verdict);
                }
            }
            Err(e) => {
                error!(error = %e, "duplicate-key look-up failed");
                for r in others {
                    let _ = r.reply.send(Claim::Unavailable);
                }
            }
        }
    }
}
