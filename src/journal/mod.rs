//! The transaction journal: one row per transaction, written by one task with group commit.
//!
//! Transactions hand their row to the writer over a bounded channel. The writer takes every row
//! already waiting (up to `batch_max`, optionally waiting `batch_delay_us` for more), writes them
//! in one database transaction (rows by COPY on PostgreSQL), and then tells each waiting
//! transaction the outcome. In durable mode a transaction replies only after that commit; when the
//! commit fails it replies 96 instead, the breaker opens (nothing more is forwarded), and what it
//! must still write (its 96, the reversal of an acquirer's approval) is kept in the backlog and
//! the spool until the database takes it (see [`writer`]). In async mode the reply goes first and
//! the row follows: a crash loses what was not yet committed.
//!
//! Backends: PostgreSQL (`postgres://`), and SQLite (`sqlite://`) for a zero-setup start; the
//! same portable migrations build both. Card data never reaches a row in clear: the PAN is
//! stored masked and as a keyed HMAC, and the summaries come from the masking describer.
//!
//! Files: [`row`] (the row model and the one declaration of its columns), [`backend`] (the
//! databases, the batch write, COPY), [`change`] (what one event writes), [`writer`] (group
//! commit and the backlog), [`breaker`], [`spool`], [`node`] (node numbers and their lock),
//! [`ids`] (transaction ids, keyed hashes); [`claims`] (duplicate-key
//! claims), [`saf`] (the store-and-forward queue), [`keys`] (stored HSM keys) and [`lookup`]
//! (operators' look-ups) read and write their own tables.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use cardswitch_codec::{Dialect, Message, Pan, ResponseCode};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::seal::Sealer;
use crate::state::TxnState;

pub mod ahead;
mod backend;
mod breaker;
mod change;
pub mod claims;
pub mod db;
mod ids;
mod keys;
pub mod lookup;
pub mod node;
pub mod notify;
mod row;
pub mod saf;
mod secrets;
mod spool;
mod writer;

pub(crate) use backend::{copy_end, copy_num, copy_text};
pub use backend::{Backend, PoolLimits};
pub use breaker::Breaker;
pub use change::{Change, Committed, SafEntry, SafKind, SafProgress, SafState, StateChange};
use db::Statement;
use ids::{Ids, Keyer};
use row::summary;
pub use row::{DecidedBy, Original, OriginalKeys, Row};
use secrets::Secrets;
pub use secrets::{reseal, Resealed};
pub use writer::JournalStats;
use writer::{Job, Writer, Written};

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
    /// A file holding the PAN HMAC key (hex), instead of `pan_hmac_key`.
    pub pan_hmac_key_file: String,
    /// AES-256 key sealing messages kept for store-and-forward and stored replies, hex (32 bytes).
    pub data_key: String,
    /// A file holding the data key (hex), instead of `data_key`.
    pub data_key_file: String,
    /// The data key's id, written with every sealed value (`k1`; a new id for a new key).
    pub data_key_id: String,
    /// Earlier data keys by id, hex: they still open what they sealed.
    pub retired_data_keys: std::collections::BTreeMap<String, String>,
    /// Without keys, draw them for this process only (demos and tests; nothing sealed survives
    /// a restart, and a journal that holds keys refuses them).
    pub ephemeral_keys: bool,
    /// How long duplicate keys are kept, in seconds (at least a day: STANs wrap).
    pub duplicate_retention_s: u64,
    /// Write-ahead records of forwarded requests wait for the disk too (see [`ahead`]):
    /// they then survive a PostgreSQL crash as well, at the cost of a flush per batch.
    pub write_ahead_sync: bool,
    /// Directory of the local spool: changes that could not be committed wait there, on this
    /// node's disk, until the database takes them (one file per node name).
    pub spool_dir: String,
    /// Most megabytes the spool holds; at the cap, nothing more is forwarded.
    pub spool_max_mb: u64,
    /// Longest the hot path waits for a database connection, in milliseconds: a database that
    /// is down is answered 96 this fast (and the breaker opens).
    pub connect_timeout_ms: u64,
    /// Longest one statement of the hot path (commits, claims, write-ahead records) may run,
    /// in milliseconds: a database that stops answering fails the commit instead of hanging it.
    pub statement_timeout_ms: u64,
    /// Connections of the read path (operators' look-ups, reports), apart from the hot path's.
    pub read_connections: u32,
    /// Longest one statement of the read path may run, in milliseconds.
    pub read_statement_timeout_ms: u64,
    /// A node whose heartbeat is older than this (and whose lock is free) is gone: another
    /// node reverses its forwarded requests with no recorded outcome and lets go of its
    /// duplicate claims left in flight, in milliseconds (see [`node`]); 0: never.
    pub takeover_after_ms: u64,
}

impl JournalSection {
    /// Checks that the keys are given (or ephemeral keys asked for) and readable.
    ///
    /// # Errors
    /// Missing, unreadable or malformed keys, with how to make them.
    pub fn check_keys(&self) -> Result<()> {
        Secrets::load(self).map(|_| ())
    }
}

impl Default for JournalSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            mode: JournalMode::Durable,
            batch_max: 512,
            batch_delay_us: 0,
            pan_hmac_key: String::new(),
            pan_hmac_key_file: String::new(),
            data_key: String::new(),
            data_key_file: String::new(),
            data_key_id: "k1".into(),
            retired_data_keys: std::collections::BTreeMap::new(),
            ephemeral_keys: false,
            duplicate_retention_s: 90_000,
            write_ahead_sync: false,
            spool_dir: "spool".into(),
            spool_max_mb: 256,
            connect_timeout_ms: 1_000,
            statement_timeout_ms: 5_000,
            read_connections: 2,
            read_statement_timeout_ms: 30_000,
            takeover_after_ms: 30_000,
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

/// Handle to the journal writer; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::Sender<Job>,
    durable: bool,
    keyer: Keyer,
    ids: Ids,
    /// The writer's counters.
    pub stats: Arc<JournalStats>,
    backend: Backend,
    /// The read path's pool (look-ups, reports): its own connections and statement limit.
    reader: Backend,
    node: Arc<str>,
    sealer: Sealer,
    saf_queued: Arc<tokio::sync::Notify>,
    claims: claims::Claims,
    ahead: ahead::WriteAhead,
    retention: Duration,
    breaker: Arc<Breaker>,
    /// When another node counts as gone (`None`: never).
    takeover_after: Option<Duration>,
    /// The last heartbeat of this node's previous run and the start of this one, microseconds.
    previous_run: (i64, i64),
    /// This node's registration (its lock is held while a handle lives).
    _node: Arc<node::Registered>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("durable", &self.durable)
            .finish_non_exhaustive()
    }
}

/// Waits for the next item on `rx` and takes every other one already waiting, up to `max` in
/// `batch` (group commit for the batched writers); `false` once the channel is closed.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) -> bool {
    let Some(first) = rx.recv().await else {
        return false;
    };
    batch.push(first);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
    true
}

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
        let secrets = Secrets::load(config)?;
        let ms = Duration::from_millis;
        let backend = Backend::connect_with(
            &config.url,
            PoolLimits {
                connections: 4,
                acquire: ms(config.connect_timeout_ms.max(1)),
                statement: Some(ms(config.statement_timeout_ms.max(1))),
            },
            true,
        )
        .await?;
        // Look-ups and reports never wait on (or hold up) the hot path's connections.
        let reader = match &backend {
            Backend::Sqlite(_) => backend.clone(),
            Backend::Postgres(_) => {
                Backend::connect_with(
                    &config.url,
                    PoolLimits {
                        connections: config.read_connections.max(1),
                        acquire: ms(5_000),
                        statement: Some(ms(config.read_statement_timeout_ms.max(1))),
                    },
                    false,
                )
                .await?
            }
        };
        secrets.verify(&backend, node).await?;
        if config.mode == JournalMode::Async {
            warn!("journal.mode = async: replies go before their commit; a crash of this node loses the changes not yet committed (durable mode does not)");
        }
        if config.ephemeral_keys {
            warn!("journal.ephemeral_keys: keys drawn for this process only; nothing sealed survives a restart");
        }
        let sealer = secrets.sealer.clone();
        let spool = spool::Spool::open(
            std::path::Path::new(&config.spool_dir),
            node,
            config.spool_max_mb.saturating_mul(1 << 20),
        )?;
        let breaker = Arc::new(Breaker::default());
        let takeover_after = Duration::from_millis(config.takeover_after_ms);
        let started_us = now_us();
        let registered = node::register(
            &backend,
            node,
            node::beat_every(if takeover_after.is_zero() {
                Duration::from_secs(20)
            } else {
                takeover_after
            }),
            tracker,
        )
        .await?;
        let ids = Ids::new(registered.number);
        let (tx, rx) = mpsc::channel(config.batch_max.max(1) * 8);
        let stats = Arc::new(JournalStats::default());
        let saf_queued = Arc::new(tokio::sync::Notify::new());
        let claims = claims::Claims::start(
            backend.clone(),
            node,
            config.batch_max.max(1),
            Arc::clone(&breaker),
            tracker,
        );
        let ahead = ahead::WriteAhead::start(
            backend.clone(),
            node,
            config.batch_max.max(1),
            config.write_ahead_sync,
            Arc::clone(&breaker),
            tracker,
        );
        let journal = Self {
            tx,
            durable: config.mode == JournalMode::Durable,
            keyer: Keyer::new(&secrets.pan_hmac)?,
            ids: ids.clone(),
            stats: Arc::clone(&stats),
            backend: backend.clone(),
            reader,
            node: Arc::from(node),
            sealer,
            saf_queued: Arc::clone(&saf_queued),
            claims,
            ahead,
            retention: Duration::from_secs(config.duplicate_retention_s),
            breaker: Arc::clone(&breaker),
            takeover_after: (!takeover_after.is_zero()).then_some(takeover_after),
            previous_run: (registered.last_beat_us, started_us),
            _node: Arc::new(registered),
        };
        let mut writer = Writer {
            backend,
            node: node.to_owned(),
            batch_max: config.batch_max.max(1),
            delay: Duration::from_micros(config.batch_delay_us),
            stats,
            backlog: VecDeque::new(),
            spool,
            breaker,
            ids,
            saf_queued,
            durable: config.mode == JournalMode::Durable,
            next_probe: tokio::time::Instant::now(),
        };
        // What an earlier run could not write goes first, before recovery or traffic.
        writer.replay_spool().await?;
        tracker.spawn(writer.run(rx));
        info!(durable = journal.durable, "journal ready");
        Ok(journal)
    }

    /// The database behind the journal (for tests and look-ups).
    #[must_use]
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The read path's database (operators' look-ups and reports).
    #[must_use]
    pub fn reader(&self) -> &Backend {
        &self.reader
    }

    /// Whether replies wait for the commit.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The breaker: open while commits fail (nothing is then forwarded).
    #[must_use]
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The node name.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// When another node counts as gone (`journal.takeover_after_ms`; `None`: never).
    #[must_use]
    pub fn takeover_after(&self) -> Option<Duration> {
        self.takeover_after
    }

    /// The last heartbeat of this node's previous run (0: none) and the start of this one,
    /// microseconds since the epoch.
    #[must_use]
    pub fn previous_run(&self) -> (i64, i64) {
        self.previous_run
    }

    /// Whether the database answers now.
    pub async fn reachable(&self) -> bool {
        self.backend
            .fetch_optional(&db::Statement::new("SELECT 1"))
            .await
            .is_ok()
    }

    /// The other nodes that are gone and left work behind, each locked while this process
    /// takes it over (see [`node`]).
    ///
    /// # Errors
    /// The database failing.
    pub async fn gone_nodes(&self, after: Duration) -> Result<Vec<node::GoneNode>> {
        node::gone(&self.backend, &self.node, after).await
    }

    /// Seals card data kept for later (SAF messages, stored replies).
    #[must_use]
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Write-ahead records of forwarded requests.
    #[must_use]
    pub fn write_ahead(&self) -> &ahead::WriteAhead {
        &self.ahead
    }

    /// The duplicate-key claimer.
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

    fn id(&self) -> i64 {
        self.ids.next()
    }

    /// Keyed HMAC-SHA256 of a PAN, hex.
    #[must_use]
    pub fn pan_hmac(&self, pan: &Pan) -> String {
        self.keyer.pan_hmac(pan)
    }

    /// Keyed HMAC-SHA256 of the parts, each followed by `|`; the first 16 bytes, hex.
    #[must_use]
    pub fn keyed_hash(&self, parts: &[&[u8]]) -> String {
        self.keyer.keyed_hash(parts)
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
            amount_minor: if reply.response_code() == Some(ResponseCode::PARTIAL_APPROVAL) {
                reply.amount()
            } else {
                request.amount()
            }
            .and_then(|a| i64::try_from(a).ok()),
            amount_requested_minor: request.amount().and_then(|a| i64::try_from(a).ok()),
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
    /// (a conditional change waits for its commit in both modes: its outcome is needed). A
    /// change whose commit failed is kept and written later; in durable mode as a 96 (see
    /// [`Change::answered_unrecorded`]).
    pub async fn submit(&self, change: Change) -> Committed {
        match self.try_submit(change).await {
            Ok(c) => c,
            Err(mut change) => {
                if self.durable {
                    change.answered_unrecorded();
                }
                self.keep(*change).await;
                Committed {
                    ok: false,
                    applied: false,
                }
            }
        }
    }

    /// Submits a change as [`Journal::submit`]; a change whose commit failed comes back, for
    /// the caller to [`Journal::keep`] as it must now be written.
    ///
    /// # Errors
    /// The change, when it was not committed.
    pub async fn try_submit(&self, change: Change) -> Result<Committed, Box<Change>> {
        if self.durable || change.conditional {
            let (tx, rx) = oneshot::channel();
            let job = Job::Change(Box::new(change), Some(tx));
            if let Err(mpsc::error::SendError(job)) = self.tx.send(job).await {
                // The writer is gone (shutting down).
                return match job {
                    Job::Change(c, _) | Job::Keep(c, _) => Err(c),
                    Job::Flush(_) => Err(Box::default()),
                };
            }
            match rx.await {
                Ok(Written::Done(c)) => Ok(c),
                Ok(Written::Failed(c)) => Err(c),
                Err(_) => Ok(Committed {
                    ok: false,
                    applied: false,
                }),
            }
        } else {
            let ok = self
                .tx
                .send(Job::Change(Box::new(change), None))
                .await
                .is_ok();
            Ok(Committed { ok, applied: ok })
        }
    }

    /// Keeps a change that could not be committed until it can: in the writer's backlog and
    /// its spool on disk (returns once it is there).
    pub async fn keep(&self, change: Change) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Keep(Box::new(change), tx)).await.is_ok() {
            let _ = rx.await;
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
        let mut st = Statement::new(
            "SELECT id, mti, endpoint, state, amount_minor, amount_reversed_minor, upstream_stan, \
             transmission_time, pan_hmac, response_code FROM transactions WHERE",
        );
        if !keys.push_condition(&mut st, "stan", "transmission_time") {
            return Ok(None);
        }
        st.push(
            " AND mti IN ('0100', '0101', '0200', '0201', '0120', '0121', '0220', '0221') \
             AND state <> 'duplicate' ORDER BY id DESC LIMIT 1",
        );
        let Some(r) = self.backend.fetch_optional(&st).await? else {
            return Ok(None);
        };
        Ok(Some(Original {
            id: r.get(0)?,
            mti: r.get(1)?,
            endpoint: r.get(2)?,
            state: r.get::<String>(3)?.parse().unwrap_or(TxnState::Declined),
            amount_minor: r.get(4)?,
            amount_reversed_minor: r.get(5)?,
            upstream_stan: r.get(6)?,
            transmission_time: r.get(7)?,
            pan_hmac: r.get(8)?,
            response_code: r.get(9)?,
        }))
    }

    /// Waits until every row queued so far has been handled (committed or put in the backlog).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
