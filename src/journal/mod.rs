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
use sqlx::{PgPool, QueryBuilder, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::JournalSection;
use cardswitch_codec::{Dialect, Message, Pan};

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
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Acquirer => "acquirer",
            Self::Switch => "switch",
            Self::Timeout => "timeout",
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

    async fn insert(&self, node: &str, rows: &[Row]) -> Result<(), sqlx::Error> {
        match self {
            // COPY: one statement whatever the batch size, no per-batch planning; the commit at
            // its end is the batch's one fsync.
            Self::Postgres(p) => {
                let mut buf = String::with_capacity(rows.len() * 768);
                for r in rows {
                    copy_line(&mut buf, node, r);
                }
                let mut conn = p.acquire().await?;
                let mut copy = conn
                    .copy_in_raw(&format!("COPY transactions ({COLUMNS}) FROM STDIN"))
                    .await?;
                copy.send(buf.into_bytes()).await?;
                copy.finish().await.map(|_| ())
            }
            Self::Sqlite(p) => {
                let mut q: QueryBuilder<sqlx::Sqlite> =
                    QueryBuilder::new(format!("INSERT INTO transactions ({COLUMNS}) "));
                q.push_values(rows, |mut b, r| {
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
                        .push_bind(r.t_route_us);
                });
                let mut tx = p.begin().await?;
                q.build().execute(&mut *tx).await?;
                tx.commit().await
            }
        }
    }
}

/// The columns written, in order.
const COLUMNS: &str = "id, node, received_us, listener, mti, processing_code, stan, rrn, transmission_time, \
    terminal_id, merchant_id, pan_masked, pan_hmac, amount_minor, currency, route, endpoint, link, response_code, \
    decided_by, auth_code, request_summary, reply_summary, t_upstream_us, t_total_us, t_decode_us, t_route_us";

/// One row in PostgreSQL's COPY text format: tab-separated, `\N` for NULL, backslash escapes.
/// (Hand-written: sqlx has no COPY encoder, and the format is four escapes.)
fn copy_line(buf: &mut String, node: &str, r: &Row) {
    use std::fmt::Write;
    fn text(buf: &mut String, v: Option<&str>) {
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
    fn num(buf: &mut String, v: Option<i64>) {
        match v {
            Some(n) => {
                let _ = write!(buf, "{n}");
            }
            None => buf.push_str("\\N"),
        }
        buf.push('\t');
    }
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
    // Replace the last tab with the end of the line.
    buf.pop();
    buf.push('\n');
}

enum Job {
    Row(Box<Row>, Option<oneshot::Sender<bool>>),
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
    key: Arc<Vec<u8>>,
    next_id: Arc<AtomicI64>,
    node_bits: i64,
    /// The writer's counters.
    pub stats: Arc<JournalStats>,
    backend: Backend,
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
        let (tx, rx) = mpsc::channel(config.batch_max.max(1) * 8);
        let stats = Arc::new(JournalStats::default());
        let node_hash = node
            .bytes()
            .fold(0i64, |h, b| (h * 31 + i64::from(b)) & 0x3FF);
        let journal = Self {
            tx,
            durable: config.mode == "durable",
            key: Arc::new(key),
            next_id: Arc::new(AtomicI64::new(0)),
            node_bits: node_hash << 12,
            stats: Arc::clone(&stats),
            backend: backend.clone(),
        };
        let writer = Writer {
            backend,
            node: node.to_owned(),
            batch_max: config.batch_max.max(1),
            delay: Duration::from_micros(config.batch_delay_us),
            stats,
            backlog: VecDeque::new(),
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
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(pan.expose().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Builds the row for a transaction: card data masked and hashed here, nowhere else.
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
            pan_hmac: pan.as_ref().map(|p| self.pan_hmac(p)),
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
        if self.durable {
            let (tx, rx) = oneshot::channel();
            if self
                .tx
                .send(Job::Row(Box::new(row), Some(tx)))
                .await
                .is_err()
            {
                return false;
            }
            rx.await.unwrap_or(false)
        } else {
            self.tx.send(Job::Row(Box::new(row), None)).await.is_ok()
        }
    }

    /// The endpoint an original transaction went to, found by the keys a reversal's DE90 carries:
    /// the terminal, the original STAN and the original transmission time. `None` when unknown
    /// or never forwarded.
    pub async fn original_endpoint(
        &self,
        terminal_id: &str,
        stan: &str,
        transmission_time: &str,
    ) -> Option<String> {
        const SQL_PG: &str = "SELECT endpoint FROM transactions WHERE terminal_id = $1 AND stan = $2 \
            AND transmission_time = $3 AND mti IN ('0100', '0101', '0200', '0201') AND endpoint IS NOT NULL ORDER BY id DESC LIMIT 1";
        const SQL_LITE: &str = "SELECT endpoint FROM transactions WHERE terminal_id = ? AND stan = ? \
            AND transmission_time = ? AND mti IN ('0100', '0101', '0200', '0201') AND endpoint IS NOT NULL ORDER BY id DESC LIMIT 1";
        let found: Result<Option<String>, sqlx::Error> = match &self.backend {
            Backend::Postgres(p) => {
                sqlx::query_scalar(SQL_PG)
                    .bind(terminal_id)
                    .bind(stan)
                    .bind(transmission_time)
                    .fetch_optional(p)
                    .await
            }
            Backend::Sqlite(p) => {
                sqlx::query_scalar(SQL_LITE)
                    .bind(terminal_id)
                    .bind(stan)
                    .bind(transmission_time)
                    .fetch_optional(p)
                    .await
            }
        };
        found.ok().flatten()
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
    /// Rows whose commit failed, written first once the database answers again.
    backlog: VecDeque<Row>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut rows: Vec<Row> = Vec::with_capacity(self.batch_max);
        let mut waiters: Vec<oneshot::Sender<bool>> = Vec::with_capacity(self.batch_max);
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
                        rows: &mut Vec<Row>,
                        waiters: &mut Vec<oneshot::Sender<bool>>,
                        flushes: &mut Vec<oneshot::Sender<()>>| match job {
                Job::Row(row, waiter) => {
                    rows.push(*row);
                    if let Some(w) = waiter {
                        waiters.push(w);
                    }
                }
                Job::Flush(done) => flushes.push(done),
            };
            if let Some(job) = first {
                take(job, &mut rows, &mut waiters, &mut flushes);
                let deadline = tokio::time::Instant::now() + self.delay;
                while rows.len() < self.batch_max {
                    match rx.try_recv() {
                        Ok(job) => take(job, &mut rows, &mut waiters, &mut flushes),
                        Err(_) if self.delay.is_zero() => break,
                        Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(job)) => take(job, &mut rows, &mut waiters, &mut flushes),
                            _ => break,
                        },
                    }
                }
            }
            self.write_backlog().await;
            if !rows.is_empty() {
                let ok = self.backlog.is_empty() && self.commit(&rows).await;
                if !ok {
                    self.keep(&mut rows, !waiters.is_empty());
                }
                rows.clear();
                for w in waiters.drain(..) {
                    let _ = w.send(ok);
                }
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
        }
        // Channel closed: last attempt for what is left.
        self.write_backlog().await;
        if !self.backlog.is_empty() {
            error!(
                rows = self.backlog.len(),
                "journal stopped with rows not written"
            );
        }
    }

    async fn commit(&self, rows: &[Row]) -> bool {
        match self.backend.insert(&self.node, rows).await {
            Ok(()) => {
                self.stats
                    .committed
                    .fetch_add(u64::try_from(rows.len()).unwrap_or(0), Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, rows = rows.len(), "journal commit failed");
                false
            }
        }
    }

    /// Keeps rows whose commit failed; in durable mode their terminals were answered 96.
    fn keep(&mut self, rows: &mut Vec<Row>, answered_96: bool) {
        for mut row in rows.drain(..) {
            if answered_96 {
                "96".clone_into(&mut row.response_code);
                row.decided_by = DecidedBy::Switch;
                row.auth_code = None;
            }
            if self.backlog.len() >= BACKLOG_MAX {
                self.backlog.pop_front();
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
            self.backlog.push_back(row);
        }
        self.stats.backlog.store(
            u64::try_from(self.backlog.len()).unwrap_or(0),
            Ordering::Relaxed,
        );
    }

    async fn write_backlog(&mut self) {
        while !self.backlog.is_empty() {
            let n = self.backlog.len().min(self.batch_max);
            let batch: Vec<Row> = self.backlog.iter().take(n).cloned().collect();
            if !self.commit(&batch).await {
                return;
            }
            self.backlog.drain(..n);
            self.stats.backlog.store(
                u64::try_from(self.backlog.len()).unwrap_or(0),
                Ordering::Relaxed,
            );
            info!(
                rows = n,
                left = self.backlog.len(),
                "journal backlog written"
            );
        }
    }
}
