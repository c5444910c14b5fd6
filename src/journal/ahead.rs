//! The write-ahead record of a forwarded request (table `forwards`): before a request is
//! written to an acquirer link, a row names it the way that acquirer will (endpoint, link,
//! MTI, the upstream STAN, DE7, DE32 and DE33 as sent, amount) with the terminal's keys and
//! the request itself, sealed, without PIN block, track or chip data. The journal commit that
//! records the transaction's outcome deletes it in the same database transaction, so the table
//! holds exactly the requests whose outcome is not recorded: after a crash, recovery reverses
//! each of them as the acquirer knows it.
//!
//! Durability: records are batched, and a batch commits with `synchronous_commit = off`. The
//! request is not written to the link before PostgreSQL has acknowledged its commit, so a
//! record survives any crash of the switch (`kill -9` included). It does not survive a crash of
//! PostgreSQL itself (or of its machine) within about three `wal_writer_delay` (600 ms by
//! default) of its commit; `journal.write_ahead_sync = true` waits for the disk as well and
//! closes that window at the cost of a flush per batch. SQLite commits synchronously.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::error;

use super::backend::is_data_error;
use super::db::{Arg, Relaxed, Statement};
use super::{next_batch, now_us, Backend, Breaker};

/// One forwarded request as the acquirer saw it, and how the terminal knows it.
#[derive(Debug, Clone, Default)]
pub struct Forward {
    /// The transaction.
    pub txn_id: i64,
    /// Endpoint and link it was written to.
    pub endpoint: String,
    pub link: String,
    /// As sent: MTI, STAN, DE7, DE32, DE33, amount (minor units), currency.
    pub mti: String,
    pub upstream_stan: String,
    pub transmission_time: Option<String>,
    pub acquirer_id: Option<String>,
    pub forwarding_id: Option<String>,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    /// The terminal's keys: DE41, DE11, DE7, DE37.
    pub terminal_id: Option<String>,
    pub terminal_stan: Option<String>,
    pub terminal_time: Option<String>,
    pub rrn: Option<String>,
    /// The duplicate key the request claimed.
    pub dkey: Option<String>,
    /// The listener it came from (its dialect reads `payload`).
    pub listener: String,
    /// The PAN's HMAC (the store-and-forward order key).
    pub pan_hmac: Option<String>,
    /// The terminal's request in the listener's dialect, sealed, without PIN block, track or
    /// chip data.
    pub payload: String,
    /// When it was recorded, microseconds since the epoch.
    pub created_us: i64,
}

struct Job {
    forward: Forward,
    done: oneshot::Sender<bool>,
}

/// Handle to the write-ahead task.
#[derive(Clone, Debug)]
pub struct WriteAhead {
    tx: mpsc::Sender<Job>,
    backend: Backend,
    node: std::sync::Arc<str>,
}

const COLUMNS: &str =
    "txn_id, endpoint, link, mti, upstream_stan, transmission_time, acquirer_id, \
     forwarding_id, amount_minor, currency, terminal_id, terminal_stan, terminal_time, rrn, dkey, \
     listener, pan_hmac, payload, node, created_us";

impl WriteAhead {
    pub(super) fn start(
        backend: Backend,
        node: &str,
        batch_max: usize,
        sync: bool,
        breaker: Arc<Breaker>,
        tracker: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(batch_max * 8);
        tracker.spawn(run(
            backend.clone(),
            node.to_owned(),
            batch_max,
            sync,
            breaker,
            rx,
        ));
        Self {
            tx,
            backend,
            node: node.into(),
        }
    }

    /// Records `forward`; whether it is committed (only then may the request be sent).
    pub async fn record(&self, mut forward: Forward) -> bool {
        forward.created_us = now_us();
        let (done, rx) = oneshot::channel();
        if self.tx.send(Job { forward, done }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// This node's forwarded requests with no recorded outcome, oldest first (see
    /// [`WriteAhead::unresolved_of`]).
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn unresolved(&self) -> Result<Vec<Forward>, sqlx::Error> {
        self.unresolved_of(&self.node).await
    }

    /// The forwarded requests of node `node` with no recorded outcome, oldest first; only for
    /// a node that is not running (this one before it serves, or one that is gone and whose
    /// lock this process holds). Records whose transaction is journaled after all (an outcome
    /// that did not say it resolves them) are deleted first.
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn unresolved_of(&self, node: &str) -> Result<Vec<Forward>, sqlx::Error> {
        let st = Statement::new(
            "DELETE FROM forwards WHERE node = $1 AND EXISTS \
             (SELECT 1 FROM transactions t WHERE t.id = forwards.txn_id)",
        )
        .bind(node);
        self.backend.execute(&st).await?;
        let st = Statement::new(format!(
            "SELECT {COLUMNS} FROM forwards WHERE node = $1 ORDER BY created_us"
        ))
        .bind(node);
        self.backend
            .fetch_all(&st)
            .await?
            .iter()
            .map(forward_of)
            .collect()
    }

    /// The latest record of a request the terminal names by DE41 and its DE11 and DE7 (or its
    /// DE37), if its outcome is not recorded yet.
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn find(
        &self,
        keys: &super::OriginalKeys<'_>,
    ) -> Result<Option<Forward>, sqlx::Error> {
        // Requests only: a terminal reversal's own record names no original.
        let mut st = Statement::new(format!(
            "SELECT {COLUMNS} FROM forwards WHERE substr(mti, 1, 2) <> '04' AND"
        ));
        if !keys.push_condition(&mut st, "terminal_stan", "terminal_time") {
            return Ok(None);
        }
        st.push(" ORDER BY created_us DESC LIMIT 1");
        self.backend
            .fetch_optional(&st)
            .await?
            .as_ref()
            .map(forward_of)
            .transpose()
    }
}

fn forward_of(r: &super::db::DbRow) -> Result<Forward, sqlx::Error> {
    Ok(Forward {
        txn_id: r.get(0)?,
        endpoint: r.get(1)?,
        link: r.get(2)?,
        mti: r.get(3)?,
        upstream_stan: r.get(4)?,
        transmission_time: r.get(5)?,
        acquirer_id: r.get(6)?,
        forwarding_id: r.get(7)?,
        amount_minor: r.get(8)?,
        currency: r.get(9)?,
        terminal_id: r.get(10)?,
        terminal_stan: r.get(11)?,
        terminal_time: r.get(12)?,
        rrn: r.get(13)?,
        dkey: r.get(14)?,
        listener: r.get(15)?,
        pan_hmac: r.get(16)?,
        payload: r.get(17)?,
        created_us: r.get(19)?,
    })
}

/// The batch's records in one statement: on the relaxed session (one round trip, the commit not
/// waiting for the disk), or with `sync` as an ordinary commit that waits for it.
async fn insert(
    backend: &Backend,
    relaxed: &mut Relaxed,
    node: &str,
    sync: bool,
    batch: &[Job],
) -> Result<(), sqlx::Error> {
    if backend.is_postgres() {
        return insert_pg(backend, relaxed, node, sync, batch).await;
    }
    let mut st = Statement::new(format!("INSERT INTO forwards ({COLUMNS}) VALUES "));
    st.tuples(batch, |j| {
        let f = &j.forward;
        [
            Arg::from(f.txn_id),
            Arg::from(&f.endpoint),
            Arg::from(&f.link),
            Arg::from(&f.mti),
            Arg::from(&f.upstream_stan),
            Arg::from(&f.transmission_time),
            Arg::from(&f.acquirer_id),
            Arg::from(&f.forwarding_id),
            Arg::from(f.amount_minor),
            Arg::from(&f.currency),
            Arg::from(&f.terminal_id),
            Arg::from(&f.terminal_stan),
            Arg::from(&f.terminal_time),
            Arg::from(&f.rrn),
            Arg::from(&f.dkey),
            Arg::from(&f.listener),
            Arg::from(&f.pan_hmac),
            Arg::from(&f.payload),
            Arg::from(node),
            Arg::from(f.created_us),
        ]
    });
    send(backend, relaxed, sync, &st).await
}

/// Runs the batch's statement: on the relaxed session, or with `sync` as an ordinary commit.
async fn send(
    backend: &Backend,
    relaxed: &mut Relaxed,
    sync: bool,
    st: &Statement<'_>,
) -> Result<(), sqlx::Error> {
    if sync {
        backend.execute(st).await?;
    } else {
        relaxed.execute(st).await?;
    }
    Ok(())
}

/// [`insert`] on PostgreSQL: one array per column, so that the statement's text (and its
/// prepared plan) is the same whatever the batch size.
async fn insert_pg(
    backend: &Backend,
    relaxed: &mut Relaxed,
    node: &str,
    sync: bool,
    batch: &[Job],
) -> Result<(), sqlx::Error> {
    fn texts<'a>(
        batch: &'a [Job],
        f: impl Fn(&'a Forward) -> Option<&'a str>,
    ) -> Vec<Option<&'a str>> {
        batch.iter().map(|j| f(&j.forward)).collect()
    }
    fn ints(batch: &[Job], f: impl Fn(&Forward) -> Option<i64>) -> Vec<Option<i64>> {
        batch.iter().map(|j| f(&j.forward)).collect()
    }
    let txn_id = ints(batch, |f| Some(f.txn_id));
    let endpoint = texts(batch, |f| Some(&f.endpoint));
    let link = texts(batch, |f| Some(&f.link));
    let mti = texts(batch, |f| Some(&f.mti));
    let upstream_stan = texts(batch, |f| Some(&f.upstream_stan));
    let transmission_time = texts(batch, |f| f.transmission_time.as_deref());
    let acquirer_id = texts(batch, |f| f.acquirer_id.as_deref());
    let forwarding_id = texts(batch, |f| f.forwarding_id.as_deref());
    let amount_minor = ints(batch, |f| f.amount_minor);
    let currency = texts(batch, |f| f.currency.as_deref());
    let terminal_id = texts(batch, |f| f.terminal_id.as_deref());
    let terminal_stan = texts(batch, |f| f.terminal_stan.as_deref());
    let terminal_time = texts(batch, |f| f.terminal_time.as_deref());
    let rrn = texts(batch, |f| f.rrn.as_deref());
    let dkey = texts(batch, |f| f.dkey.as_deref());
    let listener = texts(batch, |f| Some(&f.listener));
    let pan_hmac = texts(batch, |f| f.pan_hmac.as_deref());
    let payload = texts(batch, |f| Some(&f.payload));
    let created_us = ints(batch, |f| Some(f.created_us));
    let st = Statement::new(format!(
        "INSERT INTO forwards ({COLUMNS}) \
         SELECT c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, c18, $19, c20 \
         FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[], $13::text[], \
         $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $20::bigint[]) \
         AS u(c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, c18, c20)"
    ))
    .bind(Arg::Ints(&txn_id))
    .bind(Arg::Texts(&endpoint))
    .bind(Arg::Texts(&link))
    .bind(Arg::Texts(&mti))
    .bind(Arg::Texts(&upstream_stan))
    .bind(Arg::Texts(&transmission_time))
    .bind(Arg::Texts(&acquirer_id))
    .bind(Arg::Texts(&forwarding_id))
    .bind(Arg::Ints(&amount_minor))
    .bind(Arg::Texts(&currency))
    .bind(Arg::Texts(&terminal_id))
    .bind(Arg::Texts(&terminal_stan))
    .bind(Arg::Texts(&terminal_time))
    .bind(Arg::Texts(&rrn))
    .bind(Arg::Texts(&dkey))
    .bind(Arg::Texts(&listener))
    .bind(Arg::Texts(&pan_hmac))
    .bind(Arg::Texts(&payload))
    .bind(node)
    .bind(Arg::Ints(&created_us));
    send(backend, relaxed, sync, &st).await
}

async fn run(
    backend: Backend,
    node: String,
    batch_max: usize,
    sync: bool,
    breaker: Arc<Breaker>,
    mut rx: mpsc::Receiver<Job>,
) {
    let mut relaxed = Relaxed::new(&backend);
    let mut batch: Vec<Job> = Vec::with_capacity(batch_max);
    while next_batch(&mut rx, &mut batch, batch_max).await {
        // While the journal cannot commit, nothing is forwarded: no need to wait to learn it.
        let ok = !breaker.is_open()
            && match insert(&backend, &mut relaxed, &node, sync, &batch).await {
                Ok(()) => true,
                Err(e) => {
                    error!(error = %e, records = batch.len(), "write-ahead records failed: not forwarded");
                    if !is_data_error(&e) {
                        breaker.trip("write-ahead records failed");
                    }
                    false
                }
            };
        for j in batch.drain(..) {
            let _ = j.done.send(ok);
        }
    }
}
