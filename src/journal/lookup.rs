//! Transaction look-up for operators: filtered lists and one transaction's whole story.
//!
//! Everything returned is what the journal holds: PANs masked (first 6, last 4), message
//! summaries with card data masked, never a PIN block, track or key.

use serde::Deserialize;
use serde_json::{Map, Value};
use sqlx::Row;

use super::row::{column_list, Column, COLUMNS};
use super::{Backend, Journal};

/// Filters of `GET /api/transactions` and `cardswitch txn`; all optional, combined with AND.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnQuery {
    /// DE37.
    pub rrn: Option<String>,
    /// DE11 as the terminal sent it.
    pub stan: Option<String>,
    /// DE41.
    pub terminal: Option<String>,
    /// DE42.
    pub merchant: Option<String>,
    /// Received at or after (Unix microseconds).
    pub from_us: Option<i64>,
    /// Received before (Unix microseconds).
    pub to_us: Option<i64>,
    /// DE39 of the reply.
    pub rc: Option<String>,
    /// Most rows (default 100, at most 1,000), newest first.
    pub limit: Option<i64>,
}

/// The columns operators see: the row schema's allow-list.
fn shown() -> impl Iterator<Item = &'static Column> {
    COLUMNS.iter().filter(|c| c.shown)
}

fn columns() -> String {
    column_list(shown())
}

/// A bind value.
enum Arg {
    Text(String),
    Int(i64),
}

/// Builds `WHERE` with `$n` (PostgreSQL) or `?` (SQLite) placeholders.
fn filters(q: &TxnQuery, pg: bool) -> (String, Vec<Arg>) {
    let mut sql = String::from(" WHERE 1 = 1");
    let mut args = Vec::new();
    let mut add = |col: &str, op: &str, arg: Arg| {
        args.push(arg);
        if pg {
            sql.push_str(&format!(" AND {col} {op} ${}", args.len()));
        } else {
            sql.push_str(&format!(" AND {col} {op} ?"));
        }
    };
    for (col, v) in [
        ("rrn", &q.rrn),
        ("stan", &q.stan),
        ("terminal_id", &q.terminal),
        ("merchant_id", &q.merchant),
        ("response_code", &q.rc),
    ] {
        if let Some(v) = v {
            add(col, "=", Arg::Text(v.clone()));
        }
    }
    if let Some(v) = q.from_us {
        add("received_us", ">=", Arg::Int(v));
    }
    if let Some(v) = q.to_us {
        add("received_us", "<", Arg::Int(v));
    }
    (sql, args)
}

macro_rules! row_json {
    ($row:expr) => {{
        let mut m = Map::new();
        for c in shown().filter(|c| !c.int).map(|c| c.name) {
            let v: Option<String> = $row.try_get(c).ok().flatten();
            let v = match (c, v) {
                // Summaries are JSON already.
                ("request_summary" | "reply_summary", Some(s)) => {
                    serde_json::from_str(&s).unwrap_or(Value::String(s))
                }
                (_, v) => v.map_or(Value::Null, Value::String),
            };
            m.insert(c.to_owned(), v);
        }
        for c in shown().filter(|c| c.int).map(|c| c.name) {
            let v: Option<i64> = $row.try_get(c).ok().flatten();
            // Ids use all 64 bits: as strings, so that JavaScript does not round them.
            let v = match (c, v) {
                ("id" | "original_id", Some(i)) => Value::String(i.to_string()),
                (_, v) => v.map_or(Value::Null, Value::from),
            };
            m.insert(c.to_owned(), v);
        }
        Value::Object(m)
    }};
}

macro_rules! fetch {
    ($pool:expr, $sql:expr, $args:expr) => {{
        let mut query = sqlx::query($sql);
        for a in $args {
            query = match a {
                Arg::Text(s) => query.bind(s),
                Arg::Int(i) => query.bind(i),
            };
        }
        query.fetch_all($pool).await
    }};
}

impl Journal {
    /// Transactions matching the filters, newest first.
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn find_transactions(&self, q: &TxnQuery) -> Result<Vec<Value>, sqlx::Error> {
        let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
        let pg = matches!(self.backend, Backend::Postgres(_));
        let (filter, args) = filters(q, pg);
        let sql = format!(
            "SELECT {} FROM transactions{filter} ORDER BY received_us DESC LIMIT {limit}",
            columns()
        );
        Ok(match &self.backend {
            Backend::Postgres(p) => fetch!(p, &sql, args)?
                .iter()
                .map(|r| row_json!(r))
                .collect(),
            Backend::Sqlite(p) => fetch!(p, &sql, args)?
                .iter()
                .map(|r| row_json!(r))
                .collect(),
        })
    }

    /// One transaction with everything that happened to it: the row (request and reply
    /// summaries, route, endpoint, link, upstream STAN, timings), its state changes, the
    /// reversals that name it, and its store-and-forward entries (without payloads).
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn transaction_story(&self, id: i64) -> Result<Option<Value>, sqlx::Error> {
        let pg = matches!(self.backend, Backend::Postgres(_));
        let p1 = if pg { "$1" } else { "?" };
        let row_sql = format!("SELECT {} FROM transactions WHERE id = {p1}", columns());
        let rev_sql = format!(
            "SELECT {} FROM transactions WHERE original_id = {p1} ORDER BY received_us",
            columns()
        );
        let ev_sql = format!(
            "SELECT at_us, state, cause, detail FROM transaction_events WHERE txn_id = {p1} ORDER BY at_us"
        );
        let saf_sql = format!(
            "SELECT id, kind, mti, state, attempts, last_code, created_us, done_us FROM saf WHERE txn_id = {p1} ORDER BY created_us"
        );
        let cb_sql = format!(
            "SELECT business_date, endpoint, amount_minor, currency, line FROM chargebacks WHERE txn_id = {p1} ORDER BY run_id"
        );
        macro_rules! story {
            ($pool:expr) => {{
                let rows = fetch!($pool, &row_sql, [Arg::Int(id)])?;
                let Some(row) = rows.first() else {
                    return Ok(None);
                };
                let mut story = match row_json!(row) {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                let reversals: Vec<Value> = fetch!($pool, &rev_sql, [Arg::Int(id)])?
                    .iter()
                    .map(|r| row_json!(r))
                    .collect();
                let events: Vec<Value> = fetch!($pool, &ev_sql, [Arg::Int(id)])?
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "at_us": r.try_get::<i64, _>("at_us").ok(),
                            "state": r.try_get::<String, _>("state").ok(),
                            "cause": r.try_get::<String, _>("cause").ok(),
                            "detail": r.try_get::<Option<String>, _>("detail").ok().flatten(),
                        })
                    })
                    .collect();
                let saf: Vec<Value> = fetch!($pool, &saf_sql, [Arg::Int(id)])?
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.try_get::<i64, _>("id").ok(),
                            "kind": r.try_get::<String, _>("kind").ok(),
                            "mti": r.try_get::<String, _>("mti").ok(),
                            "state": r.try_get::<String, _>("state").ok(),
                            "attempts": r.try_get::<i32, _>("attempts").ok(),
                            "last_code": r.try_get::<Option<String>, _>("last_code").ok().flatten(),
                            "created_us": r.try_get::<i64, _>("created_us").ok(),
                            "done_us": r.try_get::<Option<i64>, _>("done_us").ok().flatten(),
                        })
                    })
                    .collect();
                let chargebacks: Vec<Value> = fetch!($pool, &cb_sql, [Arg::Int(id)])?
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "business_date": r.try_get::<String, _>("business_date").ok(),
                            "endpoint": r.try_get::<String, _>("endpoint").ok(),
                            "amount_minor": r.try_get::<i64, _>("amount_minor").ok(),
                            "currency": r.try_get::<Option<String>, _>("currency").ok().flatten(),
                            "line": r.try_get::<i64, _>("line").ok(),
                        })
                    })
                    .collect();
                story.insert("reversals".into(), Value::Array(reversals));
                story.insert("chargebacks".into(), Value::Array(chargebacks));
                story.insert("events".into(), Value::Array(events));
                story.insert("store_and_forward".into(), Value::Array(saf));
                Some(Value::Object(story))
            }};
        }
        Ok(match &self.backend {
            Backend::Postgres(p) => story!(p),
            Backend::Sqlite(p) => story!(p),
        })
    }
}
