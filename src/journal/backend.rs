//! Where the journal's rows go: PostgreSQL, or SQLite for a zero-setup start, both built by the
//! same migrations. A batch of changes is written in one database transaction; on PostgreSQL its
//! rows go by COPY.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, QueryBuilder, SqlitePool};

use super::change::{Change, SafEntry};
use super::now_us;
use super::row::{written_columns, Row, Value, COLUMNS};
use crate::state::TxnState;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/journal/migrations");

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
    pub(super) async fn apply(
        &self,
        node: &str,
        changes: &mut [Change],
    ) -> Result<Vec<bool>, sqlx::Error> {
        match self {
            // Rows by COPY: one statement whatever the batch size, no per-batch planning; the
            // commit at its end is the batch's one fsync.
            Self::Postgres(p) => {
                let mut tx = p.begin().await?;
                let applied = apply_states!(&mut *tx, changes, EVENT);
                let mut buf = String::new();
                for r in changes.iter().flat_map(|c| &c.rows) {
                    copy_line(&mut buf, node, r);
                }
                if !buf.is_empty() {
                    let mut copy = tx
                        .copy_in_raw(&format!("COPY transactions ({}) FROM STDIN", written_columns()))
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
                let applied = apply_states!(&mut *tx, changes, EVENT);
                let rows: Vec<&Row> = changes.iter().flat_map(|c| &c.rows).collect();
                for chunk in rows.chunks(512) {
                    let mut q: QueryBuilder<sqlx::Sqlite> =
                        QueryBuilder::new(format!("INSERT INTO transactions ({}) ", written_columns()));
                    q.push_values(chunk, |mut b, r| {
                        for c in &COLUMNS {
                            match (c.value)(r, node) {
                                Value::Text(v) => b.push_bind(v),
                                Value::Int(v) => b.push_bind(v),
                            };
                        }
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

/// A transaction's state change, with its cause (`$N` placeholders serve both backends).
const EVENT: &str =
    "INSERT INTO transaction_events (txn_id, at_us, state, cause, detail) VALUES ($1, $2, $3, $4, $5)";

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
    for c in &COLUMNS {
        match (c.value)(r, node) {
            Value::Text(v) => copy_text(buf, v),
            Value::Int(v) => copy_num(buf, v),
        }
    }
    copy_end(buf);
}
