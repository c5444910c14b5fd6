//! Transaction look-up for operators: filtered lists and one transaction's whole story.
//!
//! Everything returned is what the journal holds: PANs masked (first 6, last 4), message
//! summaries with card data masked, never a PIN block, track or key.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::db::{DbRow, Statement};
use super::row::{column_list, Column, COLUMNS};
use super::Journal;

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

/// Appends the `WHERE` of the filters to `st`.
fn filters<'q>(st: &mut Statement<'q>, q: &'q TxnQuery) {
    st.push(" WHERE 1 = 1");
    for (col, v) in [
        ("rrn", &q.rrn),
        ("stan", &q.stan),
        ("terminal_id", &q.terminal),
        ("merchant_id", &q.merchant),
        ("response_code", &q.rc),
    ] {
        if let Some(v) = v {
            st.push(&format!(" AND {col} = ")).arg(v);
        }
    }
    if let Some(v) = q.from_us {
        st.push(" AND received_us >= ").arg(v);
    }
    if let Some(v) = q.to_us {
        st.push(" AND received_us < ").arg(v);
    }
}

/// A journal row as operators see it.
fn row_json(row: &DbRow) -> Value {
    let mut m = Map::new();
    for c in shown().filter(|c| !c.int).map(|c| c.name) {
        let v: Option<String> = row.named(c).ok().flatten();
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
        let v: Option<i64> = row.named(c).ok().flatten();
        // Ids use all 64 bits: as strings, so that JavaScript does not round them.
        let v = match (c, v) {
            ("id" | "original_id", Some(i)) => Value::String(i.to_string()),
            (_, v) => v.map_or(Value::Null, Value::from),
        };
        m.insert(c.to_owned(), v);
    }
    Value::Object(m)
}

impl Journal {
    /// Transactions matching the filters, newest first.
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn find_transactions(&self, q: &TxnQuery) -> Result<Vec<Value>, sqlx::Error> {
        let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
        let mut st = Statement::new(format!("SELECT {} FROM transactions", columns()));
        filters(&mut st, q);
        st.push(&format!(" ORDER BY received_us DESC LIMIT {limit}"));
        Ok(self
            .backend
            .fetch_all(&st)
            .await?
            .iter()
            .map(row_json)
            .collect())
    }

    /// One transaction with everything that happened to it: the row (request and reply
    /// summaries, route, endpoint, link, upstream STAN, timings), its state changes, the
    /// reversals that name it, and its store-and-forward entries (without payloads).
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn transaction_story(&self, id: i64) -> Result<Option<Value>, sqlx::Error> {
        let by_id = |sql: String| Statement::new(sql).bind(id);
        let all = |sql: String| async move { self.reader.fetch_all(&by_id(sql)).await };
        let rows = all(format!(
            "SELECT {} FROM transactions WHERE id = $1",
            columns()
        ))
        .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let mut story = match row_json(row) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let reversals: Vec<Value> = all(format!(
            "SELECT {} FROM transactions WHERE original_id = $1 ORDER BY received_us",
            columns()
        ))
        .await?
        .iter()
        .map(row_json)
        .collect();
        let events: Vec<Value> = all(
            "SELECT at_us, state, cause, detail FROM transaction_events WHERE txn_id = $1 ORDER BY at_us"
                .into(),
        )
        .await?
        .iter()
        .map(|r| {
            serde_json::json!({
                "at_us": r.named::<i64>("at_us").ok(),
                "state": r.named::<String>("state").ok(),
                "cause": r.named::<String>("cause").ok(),
                "detail": r.named::<Option<String>>("detail").ok().flatten(),
            })
        })
        .collect();
        let saf: Vec<Value> = all(
            "SELECT id, kind, mti, state, attempts, last_code, created_us, done_us FROM saf WHERE txn_id = $1 ORDER BY created_us"
                .into(),
        )
        .await?
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.named::<i64>("id").ok(),
                "kind": r.named::<String>("kind").ok(),
                "mti": r.named::<String>("mti").ok(),
                "state": r.named::<String>("state").ok(),
                "attempts": r.named::<i32>("attempts").ok(),
                "last_code": r.named::<Option<String>>("last_code").ok().flatten(),
                "created_us": r.named::<i64>("created_us").ok(),
                "done_us": r.named::<Option<i64>>("done_us").ok().flatten(),
            })
        })
        .collect();
        let chargebacks: Vec<Value> = all(
            "SELECT business_date, endpoint, amount_minor, currency, line FROM chargebacks WHERE txn_id = $1 ORDER BY run_id"
                .into(),
        )
        .await?
        .iter()
        .map(|r| {
            serde_json::json!({
                "business_date": r.named::<String>("business_date").ok(),
                "endpoint": r.named::<String>("endpoint").ok(),
                "amount_minor": r.named::<i64>("amount_minor").ok(),
                "currency": r.named::<Option<String>>("currency").ok().flatten(),
                "line": r.named::<i64>("line").ok(),
            })
        })
        .collect();
        story.insert("reversals".into(), Value::Array(reversals));
        story.insert("chargebacks".into(), Value::Array(chargebacks));
        story.insert("events".into(), Value::Array(events));
        story.insert("store_and_forward".into(), Value::Array(saf));
        Ok(Some(Value::Object(story)))
    }
}
