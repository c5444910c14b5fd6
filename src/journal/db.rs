//! One way to run a statement on either backend: SQL written once with `$1..$n` placeholders
//! (PostgreSQL reads them, and so does SQLite through sqlx), its arguments as values, and rows
//! read by index or name whatever the database.
//!
//! Hand-written over sqlx rather than `sqlx::Any`: the journal keeps the native pools, because
//! rows go by COPY on PostgreSQL and a statement must be able to share that transaction; `Any`
//! has neither COPY nor a way into a native transaction.

use std::borrow::Cow;

use futures_util::TryStreamExt;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Decode, Postgres, Row as _, Sqlite, Transaction, Type};

use super::Backend;

/// A value bound to a placeholder.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// Text, or NULL.
    Text(Option<&'a str>),
    /// An integer, or NULL.
    Int(Option<i64>),
    /// A PostgreSQL `text[]` (a whole batch in one placeholder: the statement's text, and so
    /// its prepared plan, is the same whatever the batch size). PostgreSQL only.
    Texts(&'a [Option<&'a str>]),
    /// A PostgreSQL `bigint[]`. PostgreSQL only.
    Ints(&'a [Option<i64>]),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Self::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Self::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Self::Text(v)
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Self::Text(v.as_deref())
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Self::Int(Some(v))
    }
}

impl From<i32> for Arg<'_> {
    fn from(v: i32) -> Self {
        Self::Int(Some(i64::from(v)))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Self::Int(v)
    }
}

/// A statement and its arguments. Build it whole with [`Statement::new`] and
/// [`Statement::bind`], or piece by piece with [`Statement::push`] and [`Statement::arg`]
/// (which writes the next placeholder) for lists of any length.
#[derive(Debug, Clone, Default)]
pub struct Statement<'a> {
    /// Borrowed when written whole (a constant costs nothing), owned once something is appended.
    sql: Cow<'a, str>,
    args: Vec<Arg<'a>>,
}

impl<'a> Statement<'a> {
    /// A statement whose placeholders are written in `sql`.
    pub fn new(sql: impl Into<Cow<'a, str>>) -> Self {
        Self {
            sql: sql.into(),
            args: Vec::new(),
        }
    }

    /// Binds the next placeholder written in the SQL.
    #[must_use]
    pub fn bind(mut self, v: impl Into<Arg<'a>>) -> Self {
        self.args.push(v.into());
        self
    }

    /// Appends SQL text.
    pub fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.to_mut().push_str(sql);
        self
    }

    /// Appends the next placeholder (`$n`) bound to `v`.
    pub fn arg(&mut self, v: impl Into<Arg<'a>>) -> &mut Self {
        use std::fmt::Write as _;
        self.args.push(v.into());
        // Written in place: a batch's VALUES list has thousands of placeholders.
        let _ = write!(self.sql.to_mut(), "${}", self.args.len());
        self
    }

    /// Appends `(p1, p2, ...)`: one placeholder for each value.
    pub fn tuple(&mut self, values: impl IntoIterator<Item = Arg<'a>>) -> &mut Self {
        self.sql.to_mut().push('(');
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql.to_mut().push_str(", ");
            }
            self.arg(v);
        }
        self.sql.to_mut().push(')');
        self
    }

    /// Appends `sep`-separated tuples, one for each item (a `VALUES` list).
    pub fn tuples<T, I>(&mut self, items: impl IntoIterator<Item = T>, mut each: impl FnMut(T) -> I)
    where
        I: IntoIterator<Item = Arg<'a>>,
    {
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.sql.to_mut().push_str(", ");
            }
            self.tuple(each(item));
        }
    }

    /// The SQL as written so far.
    #[cfg(test)]
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The statement for PostgreSQL, to run on any of its executors.
    pub fn pg(&self) -> Query<'_, Postgres, PgArguments> {
        self.args
            .iter()
            .fold(sqlx::query(&self.sql), |q, a| match *a {
                Arg::Text(v) => q.bind(v),
                Arg::Int(v) => q.bind(v),
                Arg::Texts(v) => q.bind(v),
                Arg::Ints(v) => q.bind(v),
            })
    }

    /// The statement for SQLite, to run on any of its executors.
    pub fn lite(&self) -> Query<'_, Sqlite, SqliteArguments<'_>> {
        self.args
            .iter()
            .fold(sqlx::query(&self.sql), |q, a| match *a {
                Arg::Text(v) => q.bind(v),
                Arg::Int(v) => q.bind(v),
                // SQLite has no arrays; statements with them are written for PostgreSQL only
                // (and would not prepare on SQLite anyway).
                Arg::Texts(_) | Arg::Ints(_) => q.bind(None::<&str>),
            })
    }
}

/// A row read from either backend.
pub enum DbRow {
    /// From PostgreSQL.
    Pg(PgRow),
    /// From SQLite.
    Lite(SqliteRow),
}

impl std::fmt::Debug for DbRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values are not shown: a row may hold a summary or a sealed payload.
        f.write_str("DbRow")
    }
}

impl DbRow {
    /// Column `i` (from 0).
    pub fn get<T>(&self, i: usize) -> Result<T, sqlx::Error>
    where
        T: for<'r> Decode<'r, Postgres> + Type<Postgres>,
        T: for<'r> Decode<'r, Sqlite> + Type<Sqlite>,
    {
        match self {
            Self::Pg(r) => r.try_get(i),
            Self::Lite(r) => r.try_get(i),
        }
    }

    /// The column named `name`.
    pub fn named<T>(&self, name: &str) -> Result<T, sqlx::Error>
    where
        T: for<'r> Decode<'r, Postgres> + Type<Postgres>,
        T: for<'r> Decode<'r, Sqlite> + Type<Sqlite>,
    {
        match self {
            Self::Pg(r) => r.try_get(name),
            Self::Lite(r) => r.try_get(name),
        }
    }
}

/// A database transaction on either backend.
#[derive(Debug)]
pub enum DbTx {
    /// On PostgreSQL.
    Pg(Transaction<'static, Postgres>),
    /// On SQLite.
    Lite(Transaction<'static, Sqlite>),
}

impl DbTx {
    /// Whether this is PostgreSQL (whose statements may bind arrays).
    #[must_use]
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Pg(_))
    }

    /// Runs `st`; the rows it changed.
    pub async fn execute(&mut self, st: &Statement<'_>) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Pg(tx) => st.pg().execute(&mut **tx).await?.rows_affected(),
            Self::Lite(tx) => st.lite().execute(&mut **tx).await?.rows_affected(),
        })
    }

    /// Runs `st`; every row it returns.
    pub async fn fetch_all(&mut self, st: &Statement<'_>) -> Result<Vec<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Pg(tx) => st
                .pg()
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(DbRow::Pg)
                .collect(),
            Self::Lite(tx) => st
                .lite()
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(DbRow::Lite)
                .collect(),
        })
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Pg(tx) => tx.commit().await,
            Self::Lite(tx) => tx.commit().await,
        }
    }
}

impl Backend {
    /// Whether this is PostgreSQL (whose statements may bind arrays).
    #[must_use]
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// Runs `st`; the rows it changed.
    pub async fn execute(&self, st: &Statement<'_>) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Postgres(p) => st.pg().execute(p).await?.rows_affected(),
            Self::Sqlite(p) => st.lite().execute(p).await?.rows_affected(),
        })
    }

    /// Runs `st`; every row it returns.
    pub async fn fetch_all(&self, st: &Statement<'_>) -> Result<Vec<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Postgres(p) => st
                .pg()
                .fetch_all(p)
                .await?
                .into_iter()
                .map(DbRow::Pg)
                .collect(),
            Self::Sqlite(p) => st
                .lite()
                .fetch_all(p)
                .await?
                .into_iter()
                .map(DbRow::Lite)
                .collect(),
        })
    }

    /// Runs `st`; its first row, if any.
    pub async fn fetch_optional(&self, st: &Statement<'_>) -> Result<Option<DbRow>, sqlx::Error> {
        Ok(match self {
            Self::Postgres(p) => st.pg().fetch_optional(p).await?.map(DbRow::Pg),
            Self::Sqlite(p) => st.lite().fetch_optional(p).await?.map(DbRow::Lite),
        })
    }

    /// Runs `st` and hands each row to `each` as it arrives, without holding them all.
    pub async fn for_each(
        &self,
        st: &Statement<'_>,
        mut each: impl FnMut(&DbRow) -> Result<(), sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(p) => {
                let mut rows = st.pg().fetch(p);
                while let Some(r) = rows.try_next().await? {
                    each(&DbRow::Pg(r))?;
                }
            }
            Self::Sqlite(p) => {
                let mut rows = st.lite().fetch(p);
                while let Some(r) = rows.try_next().await? {
                    each(&DbRow::Lite(r))?;
                }
            }
        }
        Ok(())
    }

    /// Begins a transaction.
    pub async fn begin(&self) -> Result<DbTx, sqlx::Error> {
        Ok(match self {
            Self::Postgres(p) => DbTx::Pg(p.begin().await?),
            Self::Sqlite(p) => DbTx::Lite(p.begin().await?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_as_arguments_are_added() {
        let mut st = Statement::new("UPDATE saf SET lease_until_us = ");
        st.arg(5_i64).push(" WHERE id IN ");
        st.tuple([1_i64, 2, 3].map(Arg::from));
        assert_eq!(
            st.sql(),
            "UPDATE saf SET lease_until_us = $1 WHERE id IN ($2, $3, $4)"
        );
        let mut values = Statement::new("INSERT INTO t (a, b) VALUES ");
        values.tuples([("x", 1_i64), ("y", 2)], |(a, b)| {
            [Arg::from(a), Arg::from(b)]
        });
        assert_eq!(
            values.sql(),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(values.args.len(), 4);
    }
}

/// A connection of its own whose commits do not wait for the disk (`synchronous_commit = off`
/// for its whole session), for writes that may be lost with PostgreSQL but never with the
/// switch: each statement commits on its own in one round trip, not four (BEGIN, SET LOCAL,
/// the statement, COMMIT). A failed statement drops the connection; the next one opens another.
/// On SQLite, the pool.
#[derive(Debug)]
pub enum Relaxed {
    /// PostgreSQL: the pool to take the connection from, and the connection once taken.
    Pg(sqlx::PgPool, Option<sqlx::PgConnection>),
    /// SQLite.
    Lite(sqlx::SqlitePool),
}

impl Relaxed {
    /// A relaxed session on `backend` (connected on first use).
    #[must_use]
    pub fn new(backend: &Backend) -> Self {
        match backend {
            Backend::Postgres(p) => Self::Pg(p.clone(), None),
            Backend::Sqlite(p) => Self::Lite(p.clone()),
        }
    }

    /// Whether the session is on PostgreSQL (whose statements may bind arrays).
    #[must_use]
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Pg(..))
    }

    /// The session's connection, opened when there is none.
    async fn connection<'c>(
        pool: &sqlx::PgPool,
        conn: &'c mut Option<sqlx::PgConnection>,
    ) -> Result<&'c mut sqlx::PgConnection, sqlx::Error> {
        if let Some(c) = conn {
            return Ok(c);
        }
        // Out of the pool: the session setting must not reach anyone else's commits.
        let mut c = pool.acquire().await?.detach();
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut c)
            .await?;
        Ok(conn.insert(c))
    }

    /// After statement error `e`: the connection is dropped; `Ok` when the statement is to be
    /// sent once more (the connection was one kept from before, and is gone: the server
    /// restarted since). The statements of a relaxed session must be idempotent.
    fn failed(
        conn: &mut Option<sqlx::PgConnection>,
        fresh: bool,
        e: sqlx::Error,
    ) -> Result<(), sqlx::Error> {
        *conn = None;
        if fresh || !is_stale(&e) {
            Err(e)
        } else {
            Ok(())
        }
    }

    /// Runs `st` (committed on its own); the rows it changed. Sent once more on a new
    /// connection when the one kept from before is gone ([`Relaxed::failed`]).
    ///
    /// # Errors
    /// Database errors.
    pub async fn execute(&mut self, st: &Statement<'_>) -> Result<u64, sqlx::Error> {
        match self {
            Self::Pg(pool, conn) => {
                for fresh in [conn.is_none(), true] {
                    let c = Self::connection(pool, conn).await?;
                    match st.pg().execute(c).await {
                        Ok(done) => return Ok(done.rows_affected()),
                        Err(e) => Self::failed(conn, fresh, e)?,
                    }
                }
                Err(sqlx::Error::PoolClosed)
            }
            Self::Lite(p) => Ok(st.lite().execute(&*p).await?.rows_affected()),
        }
    }

    /// Runs `st` (committed on its own); every row it returns. Sent once more on a new
    /// connection as [`Relaxed::execute`].
    ///
    /// # Errors
    /// Database errors.
    pub async fn fetch_all(&mut self, st: &Statement<'_>) -> Result<Vec<DbRow>, sqlx::Error> {
        match self {
            Self::Pg(pool, conn) => {
                for fresh in [conn.is_none(), true] {
                    let c = Self::connection(pool, conn).await?;
                    match st.pg().fetch_all(c).await {
                        Ok(rows) => return Ok(rows.into_iter().map(DbRow::Pg).collect()),
                        Err(e) => Self::failed(conn, fresh, e)?,
                    }
                }
                Err(sqlx::Error::PoolClosed)
            }
            Self::Lite(p) => Ok(st
                .lite()
                .fetch_all(&*p)
                .await?
                .into_iter()
                .map(DbRow::Lite)
                .collect()),
        }
    }
}

/// Whether an error says the connection itself is gone (the server restarted or cut it), so
/// that a new connection may succeed.
fn is_stale(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        _ => false,
    }
}
