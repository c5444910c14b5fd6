//! Where the journal's rows go: PostgreSQL, or SQLite for a zero-setup start, both built by the
//! same migrations. A batch of changes is written in one database transaction; on PostgreSQL its
//! rows go by COPY.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::Connection as _;
use sqlx::{PgPool, SqlitePool};

use super::change::{Change, SafEntry, StateChange};
use super::db::{Arg, DbTx, Statement};
use super::now_us;
use super::row::{written_columns, Row, COLUMNS};
use crate::state::TxnState;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/journal/migrations");

/// Where rows go.
#[derive(Debug, Clone)]
pub enum Backend {
    /// PostgreSQL.
    Postgres(PgPool),
    /// SQLite (the embedded journal).
    Sqlite(SqlitePool),
}

/// How a pool waits: for a connection, and for each statement.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Most connections.
    pub connections: u32,
    /// Longest wait for a connection (a database that is down fails this fast).
    pub acquire: Duration,
    /// Longest a statement may run (PostgreSQL `statement_timeout`); `None`: no limit.
    pub statement: Option<Duration>,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            connections: 4,
            acquire: Duration::from_secs(5),
            statement: None,
        }
    }
}

impl Backend {
    /// Connects and brings the schema up to date.
    ///
    /// # Errors
    /// An unknown URL scheme, a database that cannot be reached, a migration that fails.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PoolLimits::default(), true).await
    }

    /// Connects with `limits`; brings the schema up to date first when `migrate` is set (on a
    /// connection of its own, without the statement limit).
    ///
    /// # Errors
    /// As [`Backend::connect`].
    pub async fn connect_with(url: &str, limits: PoolLimits, migrate: bool) -> Result<Self> {
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options: PgConnectOptions = url.parse().context("journal.url")?;
            if migrate {
                let mut conn = sqlx::PgConnection::connect_with(&options).await?;
                MIGRATOR.run(&mut conn).await?;
                storage(&mut conn).await?;
                let _ = sqlx::Connection::close(conn).await;
            }
            let options = match limits.statement {
                Some(t) => options.options([("statement_timeout", t.as_millis())]),
                None => options,
            };
            Self::Postgres(
                PgPoolOptions::new()
                    .max_connections(limits.connections)
                    // No ping (a round trip) before each use: a connection that is gone fails
                    // its statement, is dropped, and the caller's outage handling takes over.
                    .test_before_acquire(false)
                    .acquire_timeout(limits.acquire)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("sqlite:") {
            let options: SqliteConnectOptions = url.parse().context("journal.url")?;
            let options = options
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            // One connection: SQLite has one writer, and an in-memory database is per connection.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await?;
            if migrate {
                MIGRATOR.run(&pool).await?;
            }
            Self::Sqlite(pool)
        } else {
            bail!("journal.url: expected postgres://... or sqlite://..., or set DATABASE_URL");
        };
        Ok(backend)
    }

    /// Writes a batch of changes in one database transaction; whether each change's conditions
    /// held (see [`Change::conditional`]).
    pub(super) async fn apply(
        &self,
        node: &str,
        changes: &mut [Change],
    ) -> Result<Vec<bool>, sqlx::Error> {
        let mut tx = self.begin().await?;
        let applied = apply_states(&mut tx, changes).await?;
        write_rows(&mut tx, node, changes).await?;
        update_rows(&mut tx, changes).await?;
        apply_rest(&mut tx, node, changes).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Writes changes again (from the backlog or the spool): an earlier attempt may have
    /// committed without saying so (the connection lost after COMMIT). Changes whose rows are
    /// already in the journal have their rows updated to what the terminal was told and their
    /// state changes not applied twice; queued messages already in are not queued twice.
    pub(super) async fn apply_again(
        &self,
        node: &str,
        changes: &mut [Change],
    ) -> Result<(), sqlx::Error> {
        let firsts: Vec<i64> = changes
            .iter()
            .filter_map(|c| c.rows.first().map(super::row::Row::id))
            .collect();
        let mut present = std::collections::HashSet::new();
        for chunk in firsts.chunks(512) {
            let mut st = Statement::new("SELECT id FROM transactions WHERE id IN ");
            st.tuple(chunk.iter().map(|&id| Arg::from(id)));
            for r in self.fetch_all(&st).await? {
                present.insert(r.get::<i64>(0)?);
            }
        }
        for c in changes.iter_mut() {
            c.rows_written = c.rows.first().is_some_and(|r| present.contains(&r.id()));
        }
        self.apply(node, changes).await.map(|_| ())
    }

    /// Sets `change` aside as a dead letter, with the error that stopped it.
    pub(super) async fn dead_letter(
        &self,
        id: i64,
        node: &str,
        error: &str,
        change: &Change,
    ) -> Result<(), sqlx::Error> {
        let json = serde_json::to_string(change).unwrap_or_default();
        let st = Statement::new(
            "INSERT INTO journal_dead_letters (id, node, at_us, error, change) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(node)
        .bind(now_us())
        .bind(error)
        .bind(json.as_str());
        self.execute(&st).await.map(|_| ())
    }

    /// An empty write transaction: whether the database takes commits again.
    pub(super) async fn probe(&self) -> Result<(), sqlx::Error> {
        self.begin().await?.commit().await
    }
}

/// PostgreSQL storage settings of the hot tables (portable migrations cannot say them):
/// room left in each page so that the updates every transaction makes (a duplicate claim
/// completed, a transaction reversed) stay on their page and touch no index (HOT updates).
async fn storage(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    for (table, setting) in [
        ("dedup", "fillfactor=50"),
        ("transactions", "fillfactor=90"),
    ] {
        // Set once: the ALTER takes a lock that other running nodes would wait behind.
        let set: bool = sqlx::query_scalar(
            "SELECT coalesce(reloptions @> ARRAY[$2::text], false) FROM pg_class WHERE oid = $1::regclass",
        )
        .bind(table)
        .bind(setting)
        .fetch_one(&mut *conn)
        .await?;
        if !set {
            sqlx::query(&format!("ALTER TABLE {table} SET ({setting})"))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Whether a failed write is the fault of what was written (a constraint it breaks, a value a
/// column refuses), so that writing it again fails again; anything else (connection, server
/// shutting down, permissions, timeouts) is an outage, and waiting mends it.
pub(super) fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            !matches!(d.kind(), sqlx::error::ErrorKind::Other)
                || d.code()
                    .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
        }
        _ => false,
    }
}

/// State changes of a batch, first in its transaction: a conditional change whose transaction
/// is no longer in an allowed state is not applied, and then its rows are marked duplicates and
/// its store-and-forward entries dropped.
fn event<'a>(sc: &'a StateChange, state: &'static str) -> Statement<'a> {
    Statement::new(EVENT)
        .bind(sc.txn_id)
        .bind(now_us())
        .bind(state)
        .bind(&sc.cause)
        .bind(&sc.detail)
}

async fn apply_states(tx: &mut DbTx, changes: &mut [Change]) -> Result<Vec<bool>, sqlx::Error> {
    let mut applied = Vec::with_capacity(changes.len());
    for change in changes.iter_mut() {
        let mut ok = true;
        if change.rows_written {
            // Applied already, by the commit that wrote its rows.
            applied.push(true);
            continue;
        }
        for sc in &change.states {
            let Some(to) = sc.to else {
                tx.execute(&event(sc, "unchanged")).await?;
                continue;
            };
            let mut st = Statement::new("UPDATE transactions SET state = ");
            st.arg(to.as_str());
            if let Some(a) = sc.amount_reversed_minor {
                st.push(", amount_reversed_minor = ").arg(a);
            }
            if let Some(s) = &sc.upstream_stan {
                st.push(", upstream_stan = ").arg(s);
            }
            st.push(" WHERE id = ").arg(sc.txn_id);
            if !sc.from.is_empty() {
                st.push(" AND state IN ");
                st.tuple(sc.from.iter().map(|s| Arg::from(s.as_str())));
            }
            let done = tx.execute(&st).await? > 0;
            if done {
                tx.execute(&event(sc, to.as_str())).await?;
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
    Ok(applied)
}

/// The batch's rows. On PostgreSQL by COPY: one statement whatever the batch size, no
/// per-batch planning; the commit at its end is the batch's one fsync. SQLite has no COPY:
/// multi-row inserts.
async fn write_rows(tx: &mut DbTx, node: &str, changes: &[Change]) -> Result<(), sqlx::Error> {
    let rows = changes
        .iter()
        .filter(|c| !c.rows_written)
        .flat_map(|c| &c.rows);
    match tx {
        DbTx::Pg(pg) => {
            // Sized for the batch at once: a row's line is about a kilobyte.
            let mut buf = String::with_capacity(changes.len() * 1536);
            for r in rows {
                copy_line(&mut buf, node, r);
            }
            if !buf.is_empty() {
                let mut copy = pg
                    .copy_in_raw(&format!(
                        "COPY transactions ({}) FROM STDIN",
                        written_columns()
                    ))
                    .await?;
                copy.send(buf.into_bytes()).await?;
                copy.finish().await?;
            }
        }
        DbTx::Lite(_) => {
            let rows: Vec<&Row> = rows.collect();
            for chunk in rows.chunks(512) {
                let mut st = Statement::new(format!(
                    "INSERT INTO transactions ({}) VALUES ",
                    written_columns()
                ));
                st.tuples(chunk, |r| COLUMNS.iter().map(|c| (c.value)(r, node)));
                tx.execute(&st).await?;
            }
        }
    }
    Ok(())
}

/// Rows already written by an earlier commit that reported failure: they become what the
/// terminal was told (see [`Change::answered_unrecorded`]).
async fn update_rows(tx: &mut DbTx, changes: &[Change]) -> Result<(), sqlx::Error> {
    for r in changes
        .iter()
        .filter(|c| c.rows_written)
        .flat_map(|c| &c.rows)
    {
        let st = Statement::new(
            "UPDATE transactions SET response_code = $1, decided_by = $2, auth_code = $3, \
             state = $4, reply_summary = $5 WHERE id = $6",
        )
        .bind(r.response_code())
        .bind(r.decided_by().as_str())
        .bind(r.auth_code())
        .bind(r.state.as_str())
        .bind(r.reply_summary())
        .bind(r.id());
        tx.execute(&st).await?;
    }
    Ok(())
}

/// Everything after the rows: store-and-forward entries and their progress, completed
/// duplicate keys.
async fn apply_rest(tx: &mut DbTx, node: &str, changes: &[Change]) -> Result<(), sqlx::Error> {
    let saf: Vec<&SafEntry> = changes.iter().flat_map(|c| &c.saf).collect();
    let now = now_us();
    for chunk in saf.chunks(256) {
        let mut st = Statement::new(
            "INSERT INTO saf (id, endpoint, order_key, kind, mti, txn_id, payload, state, next_at_us, expires_us, created_us) VALUES ",
        );
        st.tuples(chunk, |e| {
            [
                Arg::from(e.id),
                Arg::from(&e.endpoint),
                Arg::from(&e.order_key),
                Arg::from(e.kind.as_str()),
                Arg::from(&e.mti),
                Arg::from(e.txn_id),
                Arg::from(&e.payload),
                Arg::from("pending"),
                Arg::from(e.next_at_us),
                Arg::from(e.expires_us),
                Arg::from(now),
            ]
        });
        // Queued once: a change written again does not queue its messages twice.
        st.push(" ON CONFLICT (id) DO NOTHING");
        tx.execute(&st).await?;
    }
    let cancel: Vec<i64> = changes
        .iter()
        .flat_map(|c| c.saf_cancel.iter().copied())
        .collect();
    for chunk in cancel.chunks(512) {
        let mut st = Statement::new("DELETE FROM saf WHERE state = 'pending' AND id IN ");
        st.tuple(chunk.iter().map(|&id| Arg::from(id)));
        tx.execute(&st).await?;
    }
    for p in changes.iter().flat_map(|c| &c.saf_progress) {
        let st = Statement::new(
            "UPDATE saf SET state = $1, attempts = $2, next_at_us = $3, last_code = $4, \
             lease_until_us = 0, leased_by = NULL, done_us = $5 WHERE id = $6",
        )
        .bind(p.state.as_str())
        .bind(p.attempts)
        .bind(p.next_at_us)
        .bind(&p.last_code)
        .bind(p.state.is_final().then(now_us))
        .bind(p.id);
        tx.execute(&st).await?;
    }
    let done: Vec<&(String, String)> = changes
        .iter()
        .filter(|c| c.dedup_claim.is_none())
        .filter_map(|c| c.dedup_done.as_ref())
        .collect();
    // Keys completed with their claim: written whether or not the claim is still there (one
    // row per key and statement: the last change's decision).
    let mut claimed: Vec<(&String, &String, i64, &String)> = Vec::new();
    let mut slot: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for c in changes {
        if let (Some((k, r)), Some((h, id))) = (&c.dedup_done, &c.dedup_claim) {
            let entry = (k, h, *id, r);
            match slot.get(k.as_str()).and_then(|&i| claimed.get_mut(i)) {
                Some(at) => *at = entry,
                None => {
                    slot.insert(k, claimed.len());
                    claimed.push(entry);
                }
            }
        }
    }
    if tx.is_postgres() {
        return apply_rest_pg(tx, node, now, &claimed, &done, changes).await;
    }
    for chunk in claimed.chunks(256) {
        let mut st = Statement::new(
            "INSERT INTO dedup (dkey, content_hash, txn_id, node, state, reply, created_us) VALUES ",
        );
        st.tuples(chunk, |(k, h, id, r)| {
            [
                Arg::from(*k),
                Arg::from(*h),
                Arg::from(*id),
                Arg::from(node),
                Arg::from("done"),
                Arg::from(*r),
                Arg::from(now),
            ]
        });
        st.push(" ON CONFLICT (dkey) DO UPDATE SET state = 'done', reply = EXCLUDED.reply");
        tx.execute(&st).await?;
    }
    for chunk in done.chunks(512) {
        let mut st =
            Statement::new("UPDATE dedup SET state = 'done', reply = v.column2 FROM (VALUES ");
        st.tuples(chunk, |(k, r)| [Arg::from(k), Arg::from(r)]);
        st.push(") AS v WHERE dedup.dkey = v.column1");
        tx.execute(&st).await?;
    }
    let unclaimed: Vec<&(String, String, i64, String)> = changes
        .iter()
        .filter_map(|c| c.dedup_unclaimed.as_ref())
        .collect();
    for chunk in unclaimed.chunks(256) {
        let mut st = Statement::new(
            "INSERT INTO dedup (dkey, content_hash, txn_id, node, state, reply, created_us) VALUES ",
        );
        st.tuples(chunk, |(k, h, id, r)| {
            [
                Arg::from(k),
                Arg::from(h),
                Arg::from(*id),
                Arg::from(node),
                Arg::from("done"),
                Arg::from(r),
                Arg::from(now),
            ]
        });
        st.push(" ON CONFLICT (dkey) DO NOTHING");
        tx.execute(&st).await?;
    }
    // Outcomes recorded: their write-ahead records go in the same transaction.
    let resolved: Vec<i64> = changes
        .iter()
        .flat_map(|c| c.resolves.iter().copied())
        .collect();
    for chunk in resolved.chunks(512) {
        let mut st = Statement::new("DELETE FROM forwards WHERE txn_id IN ");
        st.tuple(chunk.iter().map(|&id| Arg::from(id)));
        tx.execute(&st).await?;
    }
    Ok(())
}

/// [`apply_rest`]'s duplicate keys and write-ahead resolutions on PostgreSQL: one statement
/// each, arrays in place of value lists, so that their text (and prepared plan) is the same
/// whatever the batch size.
async fn apply_rest_pg(
    tx: &mut DbTx,
    node: &str,
    now: i64,
    claimed: &[(&String, &String, i64, &String)],
    done: &[&(String, String)],
    changes: &[Change],
) -> Result<(), sqlx::Error> {
    let claimed: Vec<(&str, &str, i64, &str)> = claimed
        .iter()
        .map(|c| (c.0.as_str(), c.1.as_str(), c.2, c.3.as_str()))
        .collect();
    insert_done_pg(
        tx,
        node,
        now,
        &claimed,
        "DO UPDATE SET state = 'done', reply = EXCLUDED.reply",
    )
    .await?;
    if !done.is_empty() {
        let keys: Vec<Option<&str>> = done.iter().map(|d| Some(d.0.as_str())).collect();
        let replies: Vec<Option<&str>> = done.iter().map(|d| Some(d.1.as_str())).collect();
        let st = Statement::new(
            "UPDATE dedup SET state = 'done', reply = v.r \
             FROM unnest($1::text[], $2::text[]) AS v(k, r) WHERE dedup.dkey = v.k",
        )
        .bind(Arg::Texts(&keys))
        .bind(Arg::Texts(&replies));
        tx.execute(&st).await?;
    }
    let unclaimed: Vec<(&str, &str, i64, &str)> = changes
        .iter()
        .filter_map(|c| c.dedup_unclaimed.as_ref())
        .map(|c| (c.0.as_str(), c.1.as_str(), c.2, c.3.as_str()))
        .collect();
    insert_done_pg(tx, node, now, &unclaimed, "DO NOTHING").await?;
    // Outcomes recorded: their write-ahead records go in the same transaction.
    let resolved: Vec<Option<i64>> = changes
        .iter()
        .flat_map(|c| c.resolves.iter().map(|&id| Some(id)))
        .collect();
    if !resolved.is_empty() {
        let st = Statement::new("DELETE FROM forwards WHERE txn_id = ANY($1::bigint[])")
            .bind(Arg::Ints(&resolved));
        tx.execute(&st).await?;
    }
    Ok(())
}

/// Completed duplicate keys (key, content hash, transaction, sealed reply) inserted in one
/// statement; `on_conflict` says what becomes of a key already there.
async fn insert_done_pg(
    tx: &mut DbTx,
    node: &str,
    now: i64,
    keys: &[(&str, &str, i64, &str)],
    on_conflict: &'static str,
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let dkeys: Vec<Option<&str>> = keys.iter().map(|k| Some(k.0)).collect();
    let hashes: Vec<Option<&str>> = keys.iter().map(|k| Some(k.1)).collect();
    let ids: Vec<Option<i64>> = keys.iter().map(|k| Some(k.2)).collect();
    let replies: Vec<Option<&str>> = keys.iter().map(|k| Some(k.3)).collect();
    let mut st = Statement::new(
        "INSERT INTO dedup (dkey, content_hash, txn_id, node, state, reply, created_us) \
         SELECT k, h, i, $5, 'done', r, $6 FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[]) AS u(k, h, i, r) \
         ON CONFLICT (dkey) ",
    )
    .bind(Arg::Texts(&dkeys))
    .bind(Arg::Texts(&hashes))
    .bind(Arg::Ints(&ids))
    .bind(Arg::Texts(&replies))
    .bind(node)
    .bind(now);
    st.push(on_conflict);
    tx.execute(&st).await.map(|_| ())
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
            Arg::Text(v) => copy_text(buf, v),
            Arg::Int(v) => copy_num(buf, v),
            Arg::Texts(_) | Arg::Ints(_) => copy_num(buf, None),
        }
    }
    copy_end(buf);
}
