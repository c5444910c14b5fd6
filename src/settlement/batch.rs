//! Terminal batch settlement: a terminal's 0500 (or 0520) carries its batch totals; the switch
//! recomputes them from the journal for that terminal and batch and answers 00 when they agree
//! (the batch closes), 95 with its own totals when they do not.
//!
//! What the switch counts (see [`cardswitch_codec::totals`] for the fields): journal rows of the
//! terminal and batch that the terminal was told were approved, by their state now: standing
//! (approved, stand-in approved) as debits or credits; reversed in part as a debit or credit
//! for what stands plus a reversal for what was taken back; reversed in full as a reversal
//! only. Duplicates, declines and transactions whose outcome the terminal never learned (the
//! switch's own timeout reversals) do not count.
//!
//! **Batch upload.** After a 95 the terminal may send each of its transactions as an 0320; each
//! is journaled (state `uploaded`) and answered 00. Once a batch has uploads, its debits and
//! credits are those of the uploaded items (the terminal's detail, the last copy of each RRN),
//! reversals and inquiries still come from the journal, and every difference between the
//! upload and the journal (uploaded but never approved here, approved here but not uploaded,
//! amounts that differ) is kept with the closed batch for back office.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use cardswitch_codec::totals::{Kind, Totals};
use cardswitch_codec::{Message, ResponseCode};
use cardswitch_routing::Failure;
use serde::Serialize;

use crate::journal::db::{DbRow, Statement};
use crate::journal::Backend;
use crate::state::TxnState;

/// The batch number a terminal message carries in `field` (first six characters, trimmed).
#[must_use]
pub fn batch_of(msg: &Message, field: u8) -> Option<String> {
    let v = msg.get_str(field)?.trim();
    let v: String = v.chars().take(6).collect();
    (!v.is_empty()).then_some(v)
}

/// One journal row as the batch sees it.
#[derive(Debug, Clone)]
struct BatchRow {
    mti: String,
    processing_code: String,
    state: TxnState,
    response_code: String,
    amount: u64,
    reversed: u64,
    rrn: String,
    business_date: Option<String>,
}

/// A difference between a terminal's upload and the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exception {
    /// DE37.
    pub rrn: String,
    /// `uploaded, not approved here`, `approved here, not uploaded` or `amount differs`.
    pub what: String,
    /// The terminal's amount, minor units.
    pub uploaded_minor: Option<u64>,
    /// The journal's standing amount, minor units.
    pub journal_minor: Option<u64>,
}

/// The switch's view of a batch.
#[derive(Debug, Clone, Default)]
pub struct BatchView {
    /// The totals the switch computes.
    pub totals: Totals,
    /// Items uploaded (distinct RRNs).
    pub uploaded: usize,
    /// Differences between the upload and the journal (empty without an upload).
    pub exceptions: Vec<Exception>,
    /// The latest business date of the batch's rows.
    pub business_date: Option<String>,
}

/// What a terminal's settlement request got.
#[derive(Debug, Clone)]
pub struct Settled {
    /// 00 (agreed, batch closed) or 95.
    pub code: ResponseCode,
    /// The switch's totals.
    pub view: BatchView,
}

/// Computes the switch's view of a terminal's batch from the journal.
///
/// # Errors
/// The journal cannot be read.
pub async fn view(backend: &Backend, terminal: &str, batch: &str) -> Result<BatchView> {
    const SQL: &str = "SELECT mti, processing_code, state, response_code, amount_minor, amount_reversed_minor, rrn, business_date \
         FROM transactions WHERE terminal_id = $1 AND batch_number = $2";
    let st = Statement::new(SQL).bind(terminal).bind(batch);
    let rows = backend
        .fetch_all(&st)
        .await?
        .iter()
        .map(read_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(compute(&rows))
}

fn read_row(r: &DbRow) -> Result<BatchRow, sqlx::Error> {
    let amount: Option<i64> = r.get(4)?;
    let reversed: Option<i64> = r.get(5)?;
    Ok(BatchRow {
        mti: r.get(0)?,
        processing_code: r.get::<Option<String>>(1)?.unwrap_or_default(),
        state: r.get::<String>(2)?.parse().unwrap_or(TxnState::Declined),
        response_code: r.get(3)?,
        amount: amount.and_then(|a| u64::try_from(a).ok()).unwrap_or(0),
        reversed: reversed.and_then(|a| u64::try_from(a).ok()).unwrap_or(0),
        rrn: r.get::<Option<String>>(6)?.unwrap_or_default(),
        business_date: r.get(7)?,
    })
}

fn compute(rows: &[BatchRow]) -> BatchView {
    let mut journal = Totals::default();
    // RRN -> standing amount of approved financial rows (for the upload comparison).
    let mut standing: BTreeMap<&str, u64> = BTreeMap::new();
    // RRN -> (kind, amount) of the last upload of each item.
    let mut uploads: BTreeMap<&str, (Kind, u64)> = BTreeMap::new();
    let mut date: Option<&str> = None;
    for r in rows {
        if let Some(d) = r.business_date.as_deref() {
            date = Some(date.map_or(d, |cur| cur.max(d)));
        }
        let class = super::class_of(&r.mti).unwrap_or(0);
        if class == 3 && r.state == TxnState::Uploaded {
            uploads.insert(&r.rrn, (Kind::of(2, &r.processing_code), r.amount));
            continue;
        }
        if !matches!(class, 1 | 2) || !super::approves(&r.response_code) {
            continue;
        }
        let kind = Kind::of(class, &r.processing_code);
        match r.state {
            TxnState::Reversed => journal.add(kind, r.amount, 0, true),
            TxnState::PartiallyReversed => journal.add(kind, r.amount, r.reversed, false),
            TxnState::Approved | TxnState::AdvicePending | TxnState::Advised => {
                journal.add(kind, r.amount, 0, false);
            }
            _ => continue,
        }
        if class == 2 && matches!(kind, Kind::Debit | Kind::Credit) && r.state != TxnState::Reversed
        {
            standing.insert(&r.rrn, r.amount.saturating_sub(r.reversed));
        }
    }
    let mut view = BatchView {
        totals: journal,
        business_date: date.map(str::to_owned),
        ..BatchView::default()
    };
    if uploads.is_empty() {
        return view;
    }
    // The terminal's detail decides debits and credits; the journal keeps reversals.
    let t = &mut view.totals;
    t.debits = 0;
    t.debits_amount = 0;
    t.credits = 0;
    t.credits_amount = 0;
    for &(kind, amount) in uploads.values() {
        match kind {
            Kind::Credit => {
                t.credits += 1;
                t.credits_amount += amount;
            }
            _ => {
                t.debits += 1;
                t.debits_amount += amount;
            }
        }
    }
    view.uploaded = uploads.len();
    let keys: BTreeSet<&str> = uploads.keys().chain(standing.keys()).copied().collect();
    for rrn in keys {
        let up = uploads.get(rrn).map(|&(_, a)| a);
        let here = standing.get(rrn).copied();
        let what = match (up, here) {
            (Some(_), None) => "uploaded, not approved here",
            (None, Some(_)) => "approved here, not uploaded",
            (Some(a), Some(b)) if a != b => "amount differs",
            _ => continue,
        };
        view.exceptions.push(Exception {
            rrn: rrn.to_owned(),
            what: what.to_owned(),
            uploaded_minor: up,
            journal_minor: here,
        });
    }
    view
}

/// Settles a terminal's batch: recomputes, compares, and closes it on agreement.
///
/// # Errors
/// The journal cannot be read or the closed batch cannot be written.
pub async fn settle(
    backend: &Backend,
    terminal: &str,
    batch: &str,
    theirs: &Totals,
) -> Result<Settled> {
    let view = view(backend, terminal, batch).await?;
    if view.totals != *theirs {
        return Ok(Settled {
            code: Failure::OutOfBalance.response_code(),
            view,
        });
    }
    close(backend, terminal, batch, &view).await?;
    Ok(Settled {
        code: ResponseCode::APPROVED,
        view,
    })
}

fn totals_json(t: &Totals) -> String {
    serde_json::json!({
        "credits": t.credits, "credit_reversals": t.credit_reversals,
        "debits": t.debits, "debit_reversals": t.debit_reversals,
        "inquiries": t.inquiries, "authorizations": t.authorizations,
        "credits_minor": t.credits_amount, "credit_reversals_minor": t.credit_reversals_amount,
        "debits_minor": t.debits_amount, "debit_reversals_minor": t.debit_reversals_amount,
        "net": t.net_field(),
    })
    .to_string()
}

async fn close(backend: &Backend, terminal: &str, batch: &str, view: &BatchView) -> Result<()> {
    let totals = totals_json(&view.totals);
    let exceptions = (!view.exceptions.is_empty())
        .then(|| serde_json::to_string(&view.exceptions).unwrap_or_default());
    let uploaded = i64::try_from(view.uploaded).unwrap_or(i64::MAX);
    let now = crate::journal::Journal::now_us();
    // A batch closes once; a repeated 0500 that agrees again changes nothing.
    const SQL: &str = "INSERT INTO batches (terminal_id, batch_number, state, business_date, totals, uploaded, exceptions, closed_us) \
         VALUES ($1, $2, 'closed', $3, $4, $5, $6, $7) ON CONFLICT (terminal_id, batch_number) DO NOTHING";
    let st = Statement::new(SQL)
        .bind(terminal)
        .bind(batch)
        .bind(&view.business_date)
        .bind(&totals)
        .bind(uploaded)
        .bind(&exceptions)
        .bind(now);
    backend.execute(&st).await?;
    Ok(())
}

/// A closed batch as stored.
#[derive(Debug, Clone, Serialize)]
pub struct ClosedBatch {
    /// DE41.
    pub terminal: String,
    /// Batch number.
    pub batch: String,
    /// The agreed totals (JSON).
    pub totals: serde_json::Value,
    /// Items uploaded before it closed.
    pub uploaded: i64,
    /// Differences found in the upload.
    pub exceptions: serde_json::Value,
}

/// A closed batch, if it is.
///
/// # Errors
/// The database cannot be read.
pub async fn closed(backend: &Backend, terminal: &str, batch: &str) -> Result<Option<ClosedBatch>> {
    const SQL: &str =
        "SELECT totals, uploaded, exceptions FROM batches WHERE terminal_id = $1 AND batch_number = $2";
    let st = Statement::new(SQL).bind(terminal).bind(batch);
    let Some(r) = backend.fetch_optional(&st).await? else {
        return Ok(None);
    };
    let totals: String = r.get(0)?;
    let exceptions: Option<String> = r.get(2)?;
    Ok(Some(ClosedBatch {
        terminal: terminal.to_owned(),
        batch: batch.to_owned(),
        totals: serde_json::from_str(&totals).unwrap_or_default(),
        uploaded: r.get(1)?,
        exceptions: exceptions
            .and_then(|e| serde_json::from_str(&e).ok())
            .unwrap_or(serde_json::Value::Array(Vec::new())),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn row(
        mti: &str,
        pc: &str,
        state: TxnState,
        rc: &str,
        amount: u64,
        rev: u64,
        rrn: &str,
    ) -> BatchRow {
        BatchRow {
            mti: mti.into(),
            processing_code: pc.into(),
            state,
            response_code: rc.into(),
            amount,
            reversed: rev,
            rrn: rrn.into(),
            business_date: Some("2026-11-21".into()),
        }
    }

    #[test]
    fn journal_rows_count_by_what_the_terminal_was_told_and_what_stands() {
        let rows = vec![
            row("0200", "000000", TxnState::Approved, "00", 1000, 0, "A"),
            row("0200", "000000", TxnState::Reversed, "00", 500, 500, "B"),
            row(
                "0200",
                "000000",
                TxnState::PartiallyReversed,
                "00",
                800,
                300,
                "C",
            ),
            row("0200", "200000", TxnState::Approved, "00", 250, 0, "D"),
            row("0200", "000000", TxnState::Declined, "51", 900, 0, "E"),
            // The switch's timeout reversal: the terminal got 91 and counts nothing.
            row("0200", "000000", TxnState::Reversed, "91", 700, 0, "F"),
            row("0200", "000000", TxnState::Duplicate, "00", 1000, 0, "A"),
            row("0200", "000000", TxnState::Advised, "00", 40, 0, "G"),
            row("0100", "000000", TxnState::Approved, "00", 60, 0, "H"),
            row("0400", "000000", TxnState::Approved, "00", 500, 0, "B"),
        ];
        let v = compute(&rows);
        let t = v.totals;
        assert_eq!((t.debits, t.debits_amount), (3, 1000 + 500 + 40));
        assert_eq!(
            (t.debit_reversals, t.debit_reversals_amount),
            (2, 500 + 300)
        );
        assert_eq!((t.credits, t.credits_amount), (1, 250));
        assert_eq!(t.authorizations, 1);
        assert!(v.exceptions.is_empty());
        assert_eq!(v.business_date.as_deref(), Some("2026-11-21"));
    }

    #[test]
    fn an_upload_decides_debits_and_credits_and_its_differences_are_kept() {
        let rows = vec![
            row("0200", "000000", TxnState::Approved, "00", 1000, 0, "A"),
            row("0200", "000000", TxnState::Approved, "00", 300, 0, "B"),
            row("0320", "000000", TxnState::Uploaded, "00", 1000, 0, "A"),
            row("0320", "000000", TxnState::Uploaded, "00", 999, 0, "B"),
            row("0320", "000000", TxnState::Uploaded, "00", 50, 0, "X"),
            row("0320", "000000", TxnState::Uploaded, "00", 50, 0, "X"),
        ];
        let v = compute(&rows);
        assert_eq!(
            (v.totals.debits, v.totals.debits_amount),
            (3, 1000 + 999 + 50)
        );
        assert_eq!(v.uploaded, 3);
        let what: Vec<_> = v
            .exceptions
            .iter()
            .map(|e| (e.rrn.as_str(), e.what.as_str()))
            .collect();
        assert_eq!(
            what,
            vec![
                ("B", "amount differs"),
                ("X", "uploaded, not approved here")
            ]
        );
    }
}
