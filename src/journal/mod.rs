//! The transaction journal: one row per transaction, written by one task with group commit.
//!
//! Transactions hand their row to the writer over a bounded channel. The writer takes every row
//! already waiting (up to `batch_max`, optionally waiting `batch_delay_us` for more), writes them
//! with one multi-row `INSERT` in one transaction, and then tells each waiting transaction the
//! outcome. In durable mode a transaction replies only after that commit; when the commit
//! fails it replies 96 instead, and its row is kept and written (as a 96, decided by the switch)
//! once the database is back. In async mode the reply goes first and the row follows.
//!
//! Backends: PostgreSQL (`postgres://`), and SQLite (`sqlite://`) for a zero-setup start; the
//! same portable migrations build both. Card data never reaches a row in clear: the PAN is
//! stored masked and as a keyed HMAC, and the summaries come from the masking describer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, QueryBuilder, Row as _, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::seal::Sealer;
use crate::state::TxnState;

pub mod claims;
mod keys;
pub mod lookup;
pub mod saf;
use cardswitch_codec::{Dialect, Message, Pan};
use cardswitch_routing::Failure;
use serde::Deserialize;

/// `[journal]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSection {
    /// `postgres://...` or `sqlite://...`; `DATABASE_URL` when empty.
    pub url: String,
    /// `durable`: reply after the commit; `async`: reply first, commit soon after.
    pub mode: JournalMode,
    /// Most rows in one commit.
    pub batch_max: usize,
    /// Longest a row waits for others before its batch is committed, in microseconds.
    pub batch_delay_us: u64,
    /// Key of the PAN HMAC, hex (at least 32 bytes).
    pub pan_hmac_key: String,
    /// AES-256 key sealing messages kept for store-and-forward and stored replies, hex (32 bytes).
    pub data_key: String,
    /// How long duplicate keys are kept, in seconds (at least a day: STANs wrap).
    pub duplicate_retention_s: u64,
}

impl Default for JournalSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            mode: JournalMode::Durable,
            batch_max: 512,
            batch_delay_us: 0,
            pan_hmac_key: String::new(),
            data_key: String::new(),
            duplicate_retention_s: 90_000,
        }
    }
}

/// When a transaction's reply goes out relative to its journal commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum JournalMode {
    /// Reply after the commit; a failed commit answers 96.
    Durable,
    /// Reply first, commit soon after.
    Async,
}

impl TryFrom<String> for JournalMode {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "durable" => Ok(Self::Durable),
            "async" => Ok(Self::Async),
            other => Err(format!("{other:?} is not durable or async")),
        }
    }
}


static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/journal/migrations");

/// Who decided a transaction's response code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The acquirer's reply.
    Acquirer,
    /// The switch itself (format, card, route, availability, journal).
    Switch,
    /// No reply from the acquirer in time.
    Timeout,
    /// Stand-in processing.
    StandIn,
    /// The reply of an earlier copy of the same request.
    Duplicate,
    /// A fraud rule declined it.
    Fraud,
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Acquirer => "acquirer",
            Self::Switch => "switch",
            Self::Timeout => "timeout",
            Self::StandIn => "stand_in",
            Self::Duplicate => "duplicate",
            Self::Fraud => "fraud",
        }
    }
}

/// One journal row. Built by [`Journal::row`], which is where card data is masked and hashed.
#[derive(Debug, Clone)]
pub struct Row {
    id: i64,
    received_us: i64,
    listener: String,
    mti: String,
    processing_code: Option<String>,
    stan: Option<String>,
    rrn: Option<String>,
    transmission_time: Option<String>,
    terminal_id: Option<String>,
    merchant_id: Option<String>,
    pan_masked: Option<String>,
    pan_hmac: Option<String>,
    amount_minor: Option<i64>,
    currency: Option<String>,
    /// The matching account range.
    pub route: Option<String>,
    /// The endpoint the request went to.
    pub endpoint: Option<String>,
    /// The link it went over.
    pub link: Option<String>,
    response_code: String,
    decided_by: DecidedBy,
    auth_code: Option<String>,
    request_summary: String,
    reply_summary: String,
    /// Time waiting for the acquirer, microseconds.
    pub t_upstream_us: Option<i64>,
    /// Time decoding the request, microseconds.
    pub t_decode_us: Option<i64>,
    /// Time from decoded to the acquirer being asked (checks, routing), microseconds.
    pub t_route_us: Option<i64>,
    t_total_us: i64,
    /// The transaction's state.
    pub state: TxnState,
    /// DE11 as sent to the acquirer.
    pub upstream_stan: Option<String>,
    /// For a reversal: the transaction it reverses.
    pub original_id: Option<i64>,
    /// Amount reversed so far, minor units.
    pub amount_reversed_minor: Option<i64>,
    acquirer_inst: Option<String>,
    /// The fraud rules that fired (shadow ones marked), when any did.
    pub fraud: Option<String>,
    /// The business date it settles on (`YYYY-MM-DD`).
    pub business_date: Option<String>,
    /// The terminal's batch number.
    pub batch_number: Option<String>,
}

impl Row {
    /// The row's id (the transaction id).
    #[must_use]
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Gives the row the id its transaction was known by (from [`Journal::new_id`]).
    pub fn set_id(&mut self, id: i64) {
        self.id = id;
    }

    /// The row's response code.
    #[must_use]
    pub fn response_code(&self) -> &str {
        &self.response_code
    }

    /// Who decided.
    #[must_use]
    pub fn decided_by(&self) -> DecidedBy {
        self.decided_by
    }
}

/// State changes of a batch, first in its transaction: a conditional change whose transaction
/// is no longer in an allowed state is not applied, and then its rows are marked duplicates and
/// its store-and-forward entries dropped. (A macro because the two backends' transaction types
/// differ and sqlx has no COPY for SQLite.)
macro_rules! apply_states {
    ($conn:expr, $changes:expr, $event_sql:expr) => {{
        let mut applied = Vec::with_capacity($changes.len());
        for change in $changes.iter_mut() {
            let mut ok = true;
            for sc in &change.states {
                let Some(to) = sc.to else {
                    sqlx::query($event_sql)
                        .bind(sc.txn_id)
                        .bind(now_us())
                        .bind("unchanged")
                        .bind(&sc.cause)
                        .bind(&sc.detail)
                        .execute(&mut *$conn)
                        .await?;
                    continue;
                };
                let mut q = QueryBuilder::new("UPDATE transactions SET state = ");
                q.push_bind(to.as_str());
                if let Some(a) = sc.amount_reversed_minor {
                    q.push(", amount_reversed_minor = ").push_bind(a);
                }
                q.push(" WHERE id = ").push_bind(sc.txn_id);
                if !sc.from.is_empty() {
                    q.push(" AND state IN (");
                    let mut sep = q.separated(", ");
                    for st in sc.from {
                        sep.push_bind(st.as_str());
                    }
                    q.push(")");
                }
                let done = q.build().execute(&mut *$conn).await?.rows_affected() > 0;
                if done {
                    sqlx::query($event_sql)
                        .bind(sc.txn_id)
                        .bind(now_us())
                        .bind(to.as_str())
                        .bind(&sc.cause)
                        .bind(&sc.detail)
                        .execute(&mut *$conn)
                        .await?;
                }
                ok &= done;
            }
            if change.conditional && !ok {
                for r in &mut change.rows {
                    r.state = TxnState::Duplicate;
                }
                change.saf.clear();
            }
            applied.push(ok);
        }
        applied
    }};
}

/// Everything after the rows: store-and-forward entries and their progress, completed
/// duplicate keys.
macro_rules! apply_rest {
    ($conn:expr, $db:ty, $node:expr, $changes:expr) => {{
        let saf: Vec<&SafEntry> = $changes.iter().flat_map(|c| &c.saf).collect();
        for chunk in saf.chunks(256) {
            let mut q: QueryBuilder<$db> = QueryBuilder::new(
                "INSERT INTO saf (id, endpoint, order_key, kind, mti, txn_id, payload, state, next_at_us, expires_us, created_us) ",
            );
            let now = now_us();
            q.push_values(chunk, |mut b, e| {
                b.push_bind(e.id)
                    .push_bind(&e.endpoint)
                    .push_bind(&e.order_key)
                    .push_bind(e.kind.as_str())
                    .push_bind(&e.mti)
                    .push_bind(e.txn_id)
                    .push_bind(&e.payload)
                    .push_bind("pending")
                    .push_bind(e.next_at_us)
                    .push_bind(e.expires_us)
                    .push_bind(now);
            });
            q.build().execute(&mut *$conn).await?;
        }
        for p in $changes.iter().flat_map(|c| &c.saf_progress) {
            let mut q: QueryBuilder<$db> = QueryBuilder::new("UPDATE saf SET state = ");
            q.push_bind(p.state.as_str())
                .push(", attempts = ")
                .push_bind(p.attempts)
                .push(", next_at_us = ")
                .push_bind(p.next_at_us)
                .push(", last_code = ")
                .push_bind(&p.last_code)
                .push(", lease_until_us = 0, leased_by = NULL, done_us = ")
                .push_bind(p.state.is_final().then(now_us))
                .push(" WHERE id = ")
                .push_bind(p.id);
            q.build().execute(&mut *$conn).await?;
        }
        let done: Vec<&(String, String)> =
            $changes.iter().filter_map(|c| c.dedup_done.as_ref()).collect();
        for chunk in done.chunks(512) {
            let mut q: QueryBuilder<$db> =
                QueryBuilder::new("UPDATE dedup SET state = 'done', reply = v.column2 FROM (");
            q.push_values(chunk, |mut b, (k, r)| {
                b.push_bind(k).push_bind(r);
            });
            q.push(") AS v WHERE dedup.dkey = v.column1");
            q.build().execute(&mut *$conn).await?;
        }
        let _ = $node;
    }};
}

/// How a reversal names its original.
#[derive(Debug, Clone, Copy)]
pub struct OriginalKeys<'a> {
    /// DE41.
    pub terminal: &'a str,
    /// The original DE11 (from DE90).
    pub stan: Option<&'a str>,
    /// The original DE7 (from DE90).
    pub transmission_time: Option<&'a str>,
    /// DE37, used when there is no DE90.
    pub rrn: Option<&'a str>,
}

/// What a reversal needs of its original.
#[derive(Debug, Clone)]
pub struct Original {
    /// Its id.
    pub id: i64,
    /// Its MTI.
    pub mti: String,
    /// The endpoint it went to.
    pub endpoint: Option<String>,
    /// Its state.
    pub state: TxnState,
    /// DE4, minor units.
    pub amount_minor: Option<i64>,
    /// Reversed so far.
    pub amount_reversed_minor: Option<i64>,
    /// DE11 as the acquirer saw it.
    pub upstream_stan: Option<String>,
    /// DE7.
    pub transmission_time: Option<String>,
    /// The PAN HMAC (the store-and-forward order key).
    pub pan_hmac: Option<String>,
    /// Its response code.
    pub response_code: String,
}

/// Where rows go.
#[derive(Debug, Clone)]
pub enum Backend {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite (the embedded journal).
    Sqlite(SqlitePool),
}

impl Backend {
    /// Connects and brings the schema up to date.
    ///
    /// # Errors
    /// An unknown URL scheme, a database that cannot be reached, a migration that fails.
    pub async fn connect(url: &str) -> Result<Self> {
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options: PgConnectOptions = url.parse().context("journal.url")?;
            Self::Postgres(
                PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("sqlite:") {
            let options: SqliteConnectOptions = url.parse().context("journal.url")?;
            let options = options
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            // One connection: SQLite has one writer, and an in-memory database is per connection.
            Self::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?,
            )
        } else {
            bail!("journal.url: expected postgres://... or sqlite://..., or set DATABASE_URL");
        };
        match &backend {
            Self::Postgres(p) => MIGRATOR.run(p).await?,
            Self::Sqlite(p) => MIGRATOR.run(p).await?,
        }
        Ok(backend)
    }

    /// Writes a batch of changes in one database transaction; whether each change's conditions
    /// held (see [`Change::conditional`]).
    async fn apply(&self, node: &str, changes: &mut [Change]) -> Result<Vec<bool>, sqlx::Error> {
        match self {
            // Rows by COPY: one statement whatever the batch size, no per-batch planning; the
            // commit at its end is the batch's one fsync.
            Self::Postgres(p) => {
                let mut tx = p.begin().await?;
                let applied = apply_states!(&mut *tx, changes, EVENT_PG);
                let mut buf = String::new();
                for r in changes.iter().flat_map(|c| &c.rows) {
                    copy_line(&mut buf, node, r);
                }
                if !buf.is_empty() {
                    let mut copy = tx
                        .copy_in_raw(&format!("COPY transactions ({COLUMNS}) FROM STDIN"))
                        .await?;
                    copy.send(buf.into_bytes()).await?;
                    copy.finish().await?;
                }
                apply_rest!(&mut *tx, sqlx::Postgres, node, changes);
                tx.commit().await?;
                Ok(applied)
            }
            Self::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let applied = apply_states!(&mut *tx, changes, EVENT_LITE);
                let rows: Vec<&Row> = changes.iter().flat_map(|c| &c.rows).collect();
                for chunk in rows.chunks(512) {
                    let mut q: QueryBuilder<sqlx::Sqlite> =
                        QueryBuilder::new(format!("INSERT INTO transactions ({COLUMNS}) "));
                    q.push_values(chunk, |mut b, r| {
                        b.push_bind(r.id)
                            .push_bind(node)
                            .push_bind(r.received_us)
                            .push_bind(&r.listener)
                            .push_bind(&r.mti)
                            .push_bind(&r.processing_code)
                            .push_bind(&r.stan)
                            .push_bind(&r.rrn)
                            .push_bind(&r.transmission_time)
                            .push_bind(&r.terminal_id)
                            .push_bind(&r.merchant_id)
                            .push_bind(&r.pan_masked)
                            .push_bind(&r.pan_hmac)
                            .push_bind(r.amount_minor)
                            .push_bind(&r.currency)
                            .push_bind(&r.route)
                            .push_bind(&r.endpoint)
                            .push_bind(&r.link)
                            .push_bind(&r.response_code)
                            .push_bind(r.decided_by.as_str())
                            .push_bind(&r.auth_code)
                            .push_bind(&r.request_summary)
                            .push_bind(&r.reply_summary)
                            .push_bind(r.t_upstream_us)
                            .push_bind(r.t_total_us)
                            .push_bind(r.t_decode_us)
                            .push_bind(r.t_route_us)
                            .push_bind(r.state.as_str())
                            .push_bind(&r.upstream_stan)
                            .push_bind(r.original_id)
                            .push_bind(r.amount_reversed_minor)
                            .push_bind(&r.acquirer_inst)
                            .push_bind(&r.fraud)
                            .push_bind(&r.business_date)
                            .push_bind(&r.batch_number);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                apply_rest!(&mut *tx, sqlx::Sqlite, node, changes);
                tx.commit().await?;
                Ok(applied)
            }
        }
    }
}

const EVENT_PG: &str =
    "INSERT INTO transaction_events (txn_id, at_us, state, cause, detail) VALUES ($1, $2, $3, $4, $5)";
const EVENT_LITE: &str =
    "INSERT INTO transaction_events (txn_id, at_us, state, cause, detail) VALUES (?, ?, ?, ?, ?)";

/// The columns written, in order.
const COLUMNS: &str = "id, node, received_us, listener, mti, processing_code, stan, rrn, transmission_time, \
    terminal_id, merchant_id, pan_masked, pan_hmac, amount_minor, currency, route, endpoint, link, response_code, \
    decided_by, auth_code, request_summary, reply_summary, t_upstream_us, t_total_us, t_decode_us, t_route_us, state, upstream_stan, original_id, amount_reversed_minor, \
    acquirer_inst, fraud, business_date, batch_number";

/// One field of PostgreSQL's COPY text format and its tab: `\N` for NULL, backslash escapes.
/// (Hand-written: sqlx has no COPY encoder, and the format is four escapes.)
pub(crate) fn copy_text(buf: &mut String, v: Option<&str>) {
    match v {
        None => buf.push_str("\\N"),
        Some(v)
            if !v
                .bytes()
                .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
        {
            buf.push_str(v)
        }
        Some(v) => {
            for c in v.chars() {
                match c {
                    '\\' => buf.push_str("\\\\"),
                    '\t' => buf.push_str("\\t"),
                    '\n' => buf.push_str("\\n"),
                    '\r' => buf.push_str("\\r"),
                    c => buf.push(c),
                }
            }
        }
    }
    buf.push('\t');
}

/// One COPY number field and its tab.
pub(crate) fn copy_num(buf: &mut String, v: Option<i64>) {
    use std::fmt::Write;
    match v {
        Some(n) => {
            let _ = write!(buf, "{n}");
        }
        None => buf.push_str("\\N"),
    }
    buf.push('\t');
}

/// Ends a COPY line: its last tab becomes the newline.
pub(crate) fn copy_end(buf: &mut String) {
    buf.pop();
    buf.push('\n');
}

/// One row in COPY text format.
fn copy_line(buf: &mut String, node: &str, r: &Row) {
    let (text, num) = (copy_text, copy_num);
    num(buf, Some(r.id));
    text(buf, Some(node));
    num(buf, Some(r.received_us));
    text(buf, Some(&r.listener));
    text(buf, Some(&r.mti));
    text(buf, r.processing_code.as_deref());
    text(buf, r.stan.as_deref());
    text(buf, r.rrn.as_deref());
    text(buf, r.transmission_time.as_deref());
    text(buf, r.terminal_id.as_deref());
    text(buf, r.merchant_id.as_deref());
    text(buf, r.pan_masked.as_deref());
    text(buf, r.pan_hmac.as_deref());
    num(buf, r.amount_minor);
    text(buf, r.currency.as_deref());
    text(buf, r.route.as_deref());
    text(buf, r.endpoint.as_deref());
    text(buf, r.link.as_deref());
    text(buf, Some(&r.response_code));
    text(buf, Some(r.decided_by.as_str()));
    text(buf, r.auth_code.as_deref());
    text(buf, Some(&r.request_summary));
    text(buf, Some(&r.reply_summary));
    num(buf, r.t_upstream_us);
    num(buf, Some(r.t_total_us));
    num(buf, r.t_decode_us);
    num(buf, r.t_route_us);
    text(buf, Some(r.state.as_str()));
    text(buf, r.upstream_stan.as_deref());
    num(buf, r.original_id);
    num(buf, r.amount_reversed_minor);
    text(buf, r.acquirer_inst.as_deref());
    text(buf, r.fraud.as_deref());
    text(buf, r.business_date.as_deref());
    text(buf, r.batch_number.as_deref());
    copy_end(buf);
}

/// What a store-and-forward entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafKind {
    /// An 0420 reversal advice.
    Reversal,
    /// An 0120/0220 advice of a stand-in approval.
    Advice,
}

impl SafKind {
    /// Stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reversal => "reversal",
            Self::Advice => "advice",
        }
    }
}

/// A message queued for an endpoint, to be sent until acknowledged.
#[derive(Debug, Clone)]
pub struct SafEntry {
    /// Entry id (time-ordered: the queue order).
    pub id: i64,
    /// Endpoint name.
    pub endpoint: String,
    /// Entries with the same key go in order (the PAN HMAC).
    pub order_key: String,
    /// Reversal or advice.
    pub kind: SafKind,
    /// MTI of the first transmission.
    pub mti: String,
    /// The transaction whose state the acknowledgement settles.
    pub txn_id: Option<i64>,
    /// The message in the endpoint's dialect, sealed.
    pub payload: String,
    /// Earliest first transmission, microseconds since the epoch.
    pub next_at_us: i64,
    /// Given up after this, microseconds since the epoch.
    pub expires_us: i64,
}

/// Where a store-and-forward entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafState {
    /// Waiting to be sent (again).
    Pending,
    /// Acknowledged with a code that ends it.
    Delivered,
    /// Answered with a code that neither ends nor retries it, or out of tries.
    Refused,
    /// Past its expiry.
    Expired,
}

impl SafState {
    /// Stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Refused => "refused",
            Self::Expired => "expired",
        }
    }

    /// Whether it will not be sent again.
    #[must_use]
    pub fn is_final(self) -> bool {
        self != Self::Pending
    }
}

/// The outcome of one transmission of a store-and-forward entry.
#[derive(Debug, Clone)]
pub struct SafProgress {
    /// Entry id.
    pub id: i64,
    /// Its new state.
    pub state: SafState,
    /// Transmissions so far.
    pub attempts: i32,
    /// Next transmission (when pending).
    pub next_at_us: i64,
    /// The last response code, `ZZ` for none.
    pub last_code: Option<String>,
}

/// A change of a journaled transaction's state, with its cause.
#[derive(Debug, Clone)]
pub struct StateChange {
    /// The transaction.
    pub txn_id: i64,
    /// Its new state; `None` records the cause without changing the state.
    pub to: Option<TxnState>,
    /// States it may change from; empty: any.
    pub from: &'static [TxnState],
    /// New reversed amount, when it changes.
    pub amount_reversed_minor: Option<i64>,
    /// What caused it (`terminal reversal`, `reversal acknowledged`, `late reply` ...).
    pub cause: String,
    /// More about the cause (codes, ids), never card data.
    pub detail: Option<String>,
}

/// Everything one event writes, in one database transaction.
#[derive(Debug, Default)]
pub struct Change {
    /// Journal rows.
    pub rows: Vec<Row>,
    /// State changes of earlier transactions.
    pub states: Vec<StateChange>,
    /// When set and a state change finds its transaction in no allowed state: nothing is
    /// changed, the rows are written as duplicates and the SAF entries dropped.
    pub conditional: bool,
    /// Messages to store and forward.
    pub saf: Vec<SafEntry>,
    /// Progress of queued messages.
    pub saf_progress: Vec<SafProgress>,
    /// A duplicate key completed: key and sealed reply.
    pub dedup_done: Option<(String, String)>,
}

impl Change {
    /// A change writing one row.
    #[must_use]
    pub fn row(row: Row) -> Self {
        Self {
            rows: vec![row],
            ..Self::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.states.is_empty()
            && self.saf.is_empty()
            && self.saf_progress.is_empty()
            && self.dedup_done.is_none()
    }
}

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Committed (durable mode) or queued (async mode).
    pub ok: bool,
    /// Its conditions held (always true for an unconditional change).
    pub applied: bool,
}

enum Job {
    Change(Box<Change>, Option<oneshot::Sender<Committed>>),
    Flush(oneshot::Sender<()>),
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Rows committed.
    pub committed: AtomicU64,
    /// Commits (batches).
    pub batches: AtomicU64,
    /// Failed commits.
    pub failures: AtomicU64,
    /// Rows waiting for the database to come back.
    pub backlog: AtomicU64,
    /// Rows given up because the backlog was full.
    pub lost: AtomicU64,
}

/// Handle to the journal writer; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
    durable: bool,
    /// HMAC-SHA256 keyed once: each use clones it instead of hashing the key again.
    mac: Hmac<Sha256>,
    next_id: Arc<AtomicI64>,
    node_bits: i64,
    /// The writer's counters.
    pub stats: Arc<JournalStats>,
    backend: Backend,
    node: Arc<str>,
    sealer: Sealer,
    saf_queued: Arc<tokio::sync::Notify>,
    claims: claims::Claims,
    retention: Duration,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// Most rows kept while the database is unreachable.
const BACKLOG_MAX: usize = 100_000;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl Journal {
    /// Connects, migrates and starts the writer.
    ///
    /// # Errors
    /// As [`Backend::connect`], and a PAN HMAC key that is not hex or shorter than 32 bytes.
    pub async fn start(config: &JournalSection, node: &str, tracker: &TaskTracker) -> Result<Self> {
        let backend = Backend::connect(&config.url).await?;
        let key = if config.pan_hmac_key.is_empty() {
            warn!("journal.pan_hmac_key not set: using a random key, so PAN HMACs will not match across restarts");
            (0..32).map(|_| fastrand::u8(..)).collect()
        } else {
            let key = hex::decode(&config.pan_hmac_key).context("journal.pan_hmac_key: not hex")?;
            if key.len() < 32 {
                bail!("journal.pan_hmac_key: at least 32 bytes (64 hex characters)");
            }
            key
        };
        let sealer = Sealer::from_hex("k1", &config.data_key).context("journal.data_key")?;
        if config.data_key.is_empty() {
            warn!("journal.data_key not set: using a random key, so queued reversals and advices will not survive a restart");
        }
        let (tx, rx) = mpsc::channel(config.batch_max.max(1) * 8);
        let stats = Arc::new(JournalStats::default());
        let saf_queued = Arc::new(tokio::sync::Notify::new());
        let claims = claims::Claims::start(backend.clone(), node, config.batch_max.max(1), tracker);
        let node_hash = node
            .bytes()
            .fold(0i64, |h, b| (h * 31 + i64::from(b)) & 0x3FF);
        let journal = Self {
            tx,
            durable: config.mode == JournalMode::Durable,
            mac: Hmac::<Sha256>::new_from_slice(&key).context("journal.pan_hmac_key")?,
            next_id: Arc::new(AtomicI64::new(0)),
            node_bits: node_hash << 12,
            stats: Arc::clone(&stats),
            backend: backend.clone(),
            node: Arc::from(node),
            sealer,
            saf_queued: Arc::clone(&saf_queued),
            claims,
            retention: Duration::from_secs(config.duplicate_retention_s),
        };
        let writer = Writer {
            backend,
            node: node.to_owned(),
            batch_max: config.batch_max.max(1),
            delay: Duration::from_micros(config.batch_delay_us),
            stats,
            backlog: VecDeque::new(),
            saf_queued,
            durable: config.mode == JournalMode::Durable,
        };
        tracker.spawn(writer.run(rx));
        info!(durable = journal.durable, "journal ready");
        Ok(journal)
    }

    /// The database behind the journal (for tests and look-ups).
    #[must_use]
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Whether replies wait for the commit.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The node name.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Seals card data kept for later (SAF messages, stored replies).
    #[must_use]
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Duplicate-key claims.
    #[must_use]
    pub fn claims(&self) -> &claims::Claims {
        &self.claims
    }

    /// Wakes when a commit queued store-and-forward entries.
    #[must_use]
    pub fn saf_queued(&self) -> &Arc<tokio::sync::Notify> {
        &self.saf_queued
    }

    /// How long duplicate keys are kept.
    #[must_use]
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// A new transaction (or queue entry) id.
    #[must_use]
    pub fn new_id(&self) -> i64 {
        self.id()
    }

    /// A time-ordered id, unique across nodes: milliseconds << 22 | node (10 bits) << 12 | sequence.
    fn id(&self) -> i64 {
        let base = (now_us() / 1000) << 22 | self.node_bits;
        let mut prev = self.next_id.load(Ordering::Relaxed);
        loop {
            let next = base.max(prev + 1);
            match self.next_id.compare_exchange_weak(
                prev,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(p) => prev = p,
            }
        }
    }

    /// Keyed HMAC-SHA256 of a PAN, hex.
    #[must_use]
    pub fn pan_hmac(&self, pan: &Pan) -> String {
        let mut mac = self.mac.clone();
        mac.update(pan.expose().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Keyed HMAC-SHA256 of the parts, each followed by `|`; the first 16 bytes, hex.
    #[must_use]
    pub fn keyed_hash(&self, parts: &[&[u8]]) -> String {
        let mut mac = self.mac.clone();
        for p in parts {
            mac.update(p);
            mac.update(b"|");
        }
        hex::encode(mac.finalize().into_bytes().get(..16).unwrap_or_default())
    }

    /// Builds the row for a transaction: card data masked and hashed here, nowhere else.
    /// `pan_hmac`: the PAN's HMAC when the pipeline already computed it (as [`Journal::pan_hmac`]).
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn row(
        &self,
        listener: &str,
        dialect: &Dialect,
        request: &Message,
        reply: &Message,
        decided_by: DecidedBy,
        received_us: i64,
        t_total: Duration,
        pan_hmac: Option<String>,
    ) -> Row {
        let pan = request
            .pan()
            .or_else(|| request.track2().and_then(|t| t.pan()));
        let text = |m: &Message, f: u8| m.get_str(f).map(str::to_owned);
        Row {
            id: self.id(),
            received_us,
            listener: listener.to_owned(),
            mti: request.mti().to_string(),
            processing_code: text(request, 3),
            stan: text(request, 11),
            rrn: text(request, 37),
            transmission_time: text(request, 7),
            terminal_id: text(request, 41),
            merchant_id: text(request, 42),
            pan_masked: pan.as_ref().map(|p| p.masked().to_string()),
            pan_hmac: pan_hmac.or_else(|| pan.as_ref().map(|p| self.pan_hmac(p))),
            amount_minor: request.amount().and_then(|a| i64::try_from(a).ok()),
            currency: text(request, 49),
            route: None,
            endpoint: None,
            link: None,
            response_code: reply
                .response_code()
                .map_or_else(|| "--".to_owned(), |c| c.to_string()),
            decided_by,
            auth_code: text(reply, 38),
            request_summary: summary(dialect, request),
            reply_summary: summary(dialect, reply),
            t_upstream_us: None,
            t_decode_us: None,
            t_route_us: None,
            t_total_us: i64::try_from(t_total.as_micros()).unwrap_or(i64::MAX),
            state: TxnState::Approved,
            upstream_stan: None,
            original_id: None,
            amount_reversed_minor: None,
            acquirer_inst: text(request, 32),
            fraud: None,
            business_date: None,
            batch_number: None,
        }
    }

    /// The receive time to put in a row, microseconds since the epoch.
    #[must_use]
    pub fn now_us() -> i64 {
        now_us()
    }

    /// Records a row. Durable mode: true once committed, false if the commit failed (the row is
    /// kept and written later as a 96). Async mode: true once queued.
    pub async fn record(&self, row: Row) -> bool {
        self.submit(Change::row(row)).await.ok
    }

    /// Submits a change. Durable mode: waits for the commit. Async mode: returns once queued
    /// (a conditional change waits for its commit in both modes: its outcome is needed).
    pub async fn submit(&self, change: Change) -> Committed {
        let failed = Committed {
            ok: false,
            applied: false,
        };
        if self.durable || change.conditional {
            let (tx, rx) = oneshot::channel();
            if self
                .tx
                .send(Job::Change(Box::new(change), Some(tx)))
                .await
                .is_err()
            {
                return failed;
            }
            rx.await.unwrap_or(failed)
        } else {
            let ok = self
                .tx
                .send(Job::Change(Box::new(change), None))
                .await
                .is_ok();
            Committed { ok, applied: ok }
        }
    }

    /// Submits a change without waiting for it.
    pub async fn submit_later(&self, change: Change) {
        let _ = self.tx.send(Job::Change(Box::new(change), None)).await;
    }

    /// The original of a reversal: by the keys its DE90 carries (the terminal, the original
    /// STAN and transmission time) or, without DE90, by the terminal and RRN. The latest match.
    pub async fn find_original(
        &self,
        keys: &OriginalKeys<'_>,
    ) -> Result<Option<Original>, sqlx::Error> {
        macro_rules! find {
            ($db:ty, $pool:expr) => {{
                let mut q: QueryBuilder<$db> = QueryBuilder::new(
                    "SELECT id, mti, endpoint, state, amount_minor, amount_reversed_minor, upstream_stan, \
                     transmission_time, pan_hmac, response_code FROM transactions WHERE terminal_id = ",
                );
                q.push_bind(keys.terminal);
                match (keys.stan, keys.transmission_time, keys.rrn) {
                    (Some(stan), Some(de7), _) => {
                        q.push(" AND stan = ").push_bind(stan).push(" AND transmission_time = ").push_bind(de7);
                    }
                    (_, _, Some(rrn)) => {
                        q.push(" AND rrn = ").push_bind(rrn);
                    }
                    _ => return Ok(None),
                }
                q.push(" AND mti IN ('0100', '0101', '0200', '0201', '0120', '0121', '0220', '0221') AND state <> 'duplicate' ORDER BY id DESC LIMIT 1");
                match q.build().fetch_optional($pool).await? {
                    None => Ok(None),
                    Some(r) => Ok(Some(Original {
                        id: r.try_get(0)?,
                        mti: r.try_get(1)?,
                        endpoint: r.try_get(2)?,
                        state: r
                            .try_get::<String, _>(3)?
                            .parse()
                            .unwrap_or(TxnState::Declined),
                        amount_minor: r.try_get(4)?,
                        amount_reversed_minor: r.try_get(5)?,
                        upstream_stan: r.try_get(6)?,
                        transmission_time: r.try_get(7)?,
                        pan_hmac: r.try_get(8)?,
                        response_code: r.try_get(9)?,
                    })),
                }
            }};
        }
        match &self.backend {
            Backend::Postgres(p) => find!(sqlx::Postgres, p),
            Backend::Sqlite(p) => find!(sqlx::Sqlite, p),
        }
    }

    /// Waits until every row queued so far has been handled (committed or put in the backlog).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The masked field list of a message, as JSON (`{"mti":"0100","2":"476173******0010",...}`).
fn summary(dialect: &Dialect, msg: &Message) -> String {
    msg.summary_json(dialect)
}

struct Writer {
    backend: Backend,
    node: String,
    batch_max: usize,
    delay: Duration,
    stats: Arc<JournalStats>,
    /// Changes whose commit failed, written first once the database answers again.
    backlog: VecDeque<Change>,
    /// Told after each commit that queued store-and-forward entries.
    saf_queued: Arc<tokio::sync::Notify>,
    durable: bool,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut changes: Vec<Change> = Vec::with_capacity(self.batch_max);
        let mut waiters: Vec<(usize, oneshot::Sender<Committed>)> =
            Vec::with_capacity(self.batch_max);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let first = if self.backlog.is_empty() {
                match rx.recv().await {
                    Some(job) => Some(job),
                    None => break,
                }
            } else {
                // Retry the backlog now and then even when no new rows arrive.
                match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    Ok(Some(job)) => Some(job),
                    Ok(None) => break,
                    Err(_) => None,
                }
            };
            let take = |job: Job,
                        changes: &mut Vec<Change>,
                        waiters: &mut Vec<(usize, oneshot::Sender<Committed>)>,
                        flushes: &mut Vec<oneshot::Sender<()>>| match job {
                Job::Change(change, waiter) => {
                    if let Some(w) = waiter {
                        waiters.push((changes.len(), w));
                    }
                    changes.push(*change);
                }
                Job::Flush(done) => flushes.push(done),
            };
            if let Some(job) = first {
                take(job, &mut changes, &mut waiters, &mut flushes);
                let deadline = tokio::time::Instant::now() + self.delay;
                while changes.len() < self.batch_max {
                    match rx.try_recv() {
                        Ok(job) => take(job, &mut changes, &mut waiters, &mut flushes),
                        Err(_) if self.delay.is_zero() => break,
                        Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(job)) => take(job, &mut changes, &mut waiters, &mut flushes),
                            _ => break,
                        },
                    }
                }
            }
            self.write_backlog().await;
            if !changes.is_empty() {
                let applied = if self.backlog.is_empty() {
                    self.commit(&mut changes).await
                } else {
                    None
                };
                let ok = applied.is_some();
                for (i, w) in waiters.drain(..) {
                    let applied = applied
                        .as_ref()
                        .and_then(|a| a.get(i).copied())
                        .unwrap_or(false);
                    let _ = w.send(Committed { ok, applied });
                }
                if !ok {
                    // In durable mode the terminals of these rows were answered 96.
                    let answered_96 = self.durable;
                    self.keep(&mut changes, answered_96);
                }
                changes.clear();
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
        // Channel closed: last attempt for what is left.
        self.write_backlog().await;
        if !self.backlog.is_empty() {
            error!(
                changes = self.backlog.len(),
                "journal stopped with rows not written"
            );
        }
    }

    /// Commits a batch; per change whether it applied, `None` when the commit failed.
    async fn commit(&self, changes: &mut [Change]) -> Option<Vec<bool>> {
        let rows: usize = changes.iter().map(|c| c.rows.len()).sum();
        let saf = changes.iter().any(|c| !c.saf.is_empty());
        let started = std::time::Instant::now();
        let result = self.backend.apply(&self.node, changes).await;
        metrics::histogram!(crate::telemetry::JOURNAL_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::telemetry::JOURNAL_BATCH_ROWS).record(rows as f64);
        match result {
            Ok(applied) => {
                self.stats
                    .committed
                    .fetch_add(u64::try_from(rows).unwrap_or(0), Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                if saf {
                    self.saf_queued.notify_waiters();
                }
                Some(applied)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, rows, "journal commit failed");
                None
            }
        }
    }

    /// Keeps changes whose commit failed; in durable mode their terminals were answered 96.
    fn keep(&mut self, changes: &mut Vec<Change>, answered_96: bool) {
        for mut change in changes.drain(..) {
            if change.is_empty() {
                continue;
            }
            if answered_96 {
                for row in &mut change.rows {
                    Failure::JournalUnavailable
                        .response_code()
                        .as_str()
                        .clone_into(&mut row.response_code);
                    row.decided_by = DecidedBy::Switch;
                    row.auth_code = None;
                    if row.state.is_charged() {
                        row.state = TxnState::Declined;
                    }
                }
            }
            if self.backlog.len() >= BACKLOG_MAX {
                self.backlog.pop_front();
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
            self.backlog.push_back(change);
        }
        self.stats.backlog.store(
            u64::try_from(self.backlog.len()).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    async fn write_backlog(&mut self) {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(self.batch_max);
            let mut batch: Vec<Change> = self.backlog.drain(..n).collect();
            if self.commit(&mut batch).await.is_none() {
                for (i, c) in batch.into_iter().enumerate() {
                    self.backlog.insert(i, c);
                }
                return;
            }
            self.stats.backlog.store(
                u64::try_from(self.backlog.len()).unwrap_or(0),
                Ordering::Relaxed,
            );
            info!(
                changes = n,
                left = self.backlog.len(),
                "journal backlog written"
            );
        }
    }
}
