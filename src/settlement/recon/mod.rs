//! Clearing-file reconciliation: an acquirer's clearing file for one business date against the
//! journal, every item classified into one of the classes below.
//!
//! The journal side is read once: every transaction of the endpoint that the terminal was told
//! was approved, from `late_days` before the date to the date, kept in a compact table indexed
//! by RRN (about 100 bytes a transaction). The file is then streamed record by record; each
//! record is matched on RRN and PAN HMAC and then compared on authorization code, state,
//! business date, currency and amount. What the file never presented comes from a last pass
//! over the table.
//!
//! | class | meaning |
//! |---|---|
//! | `matched` | presented as authorized (amount standing after partial reversals) |
//! | `amount_mismatch` | presented for another amount (or a debit presented as a credit) |
//! | `currency_mismatch` | presented in another currency |
//! | `authorized_not_presented` | approved on this date, not in the file |
//! | `presented_without_authorization` | no approval with this RRN and card (or another auth code) |
//! | `duplicate_presentment` | the same approval presented again |
//! | `reversed_but_presented` | reversed in full, presented anyway |
//! | `orphan_reversal` | a reversal whose original was never seen (journal or file) |
//! | `stand_in_not_advised` | approved in stand-in, the advice never acknowledged, not presented |
//! | `late_presentment` | approved on an earlier business date, presented now |
//! | `chargeback` | a chargeback, linked to its original (and shown in its history) |
//! | `chargeback_unknown_original` | a chargeback whose original the journal does not have |
//! | `unreadable_line` | a line that is not a clearing record |
//!
//! [`classify`] holds the comparisons (pure, unit-tested), [`store`] the database side and
//! [`render`] the table and CSV output.
//!
//! Results are stored (`recon_runs`, `recon_items`, `chargebacks`) keyed by endpoint, date and
//! the file's SHA-256: running the same file again reads the stored run and changes nothing.

mod classify;
mod render;
mod store;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use cardswitch_codec::clearing::{self, kinds};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::Date;

use super::format_date;
use crate::journal::{Backend, Journal};
use classify::{classify, fixed, signed, totals, unpresented, Table};
pub use render::{print_csv, print_table};
use store::{load_table, older_original, store, stored_run, MatchedLine};

/// How an item was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Presented as authorized.
    Matched,
    /// Presented for another amount.
    AmountMismatch,
    /// Presented in another currency.
    CurrencyMismatch,
    /// Approved on the date, not presented.
    AuthorizedNotPresented,
    /// No matching approval.
    PresentedWithoutAuthorization,
    /// Presented again.
    DuplicatePresentment,
    /// Reversed in full, presented anyway.
    ReversedButPresented,
    /// A reversal without an original.
    OrphanReversal,
    /// Stand-in approval whose advice was never acknowledged, not presented.
    StandInNotAdvised,
    /// Approved on an earlier date.
    LatePresentment,
    /// A chargeback linked to its original.
    Chargeback,
    /// A chargeback whose original is unknown.
    ChargebackUnknownOriginal,
    /// Not a clearing record.
    UnreadableLine,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Self; 13] = [
        Self::Matched,
        Self::AmountMismatch,
        Self::CurrencyMismatch,
        Self::AuthorizedNotPresented,
        Self::PresentedWithoutAuthorization,
        Self::DuplicatePresentment,
        Self::ReversedButPresented,
        Self::OrphanReversal,
        Self::StandInNotAdvised,
        Self::LatePresentment,
        Self::Chargeback,
        Self::ChargebackUnknownOriginal,
        Self::UnreadableLine,
    ];

    /// Stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Matched => "matched",
            Self::AmountMismatch => "amount_mismatch",
            Self::CurrencyMismatch => "currency_mismatch",
            Self::AuthorizedNotPresented => "authorized_not_presented",
            Self::PresentedWithoutAuthorization => "presented_without_authorization",
            Self::DuplicatePresentment => "duplicate_presentment",
            Self::ReversedButPresented => "reversed_but_presented",
            Self::OrphanReversal => "orphan_reversal",
            Self::StandInNotAdvised => "stand_in_not_advised",
            Self::LatePresentment => "late_presentment",
            Self::Chargeback => "chargeback",
            Self::ChargebackUnknownOriginal => "chargeback_unknown_original",
            Self::UnreadableLine => "unreadable_line",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One classified item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// Its class.
    pub class: Class,
    /// The file line (1 = first record), for file items.
    pub line: Option<u64>,
    /// The journal transaction, when one is involved.
    pub txn_id: Option<i64>,
    /// DE37.
    pub rrn: String,
    /// DE38 (file's, else journal's).
    pub auth_code: Option<String>,
    /// Masked PAN (file's, else journal's); never more than first six and last four.
    pub pan_masked: Option<String>,
    /// The file record's type, or the journal row's MTI.
    pub kind: String,
    /// The file's amount, minor units.
    pub amount_minor: Option<i64>,
    /// The journal's standing amount, minor units.
    pub journal_amount_minor: Option<i64>,
    /// Currency (file's, else journal's).
    pub currency: Option<String>,
    /// More about it.
    pub detail: Option<String>,
}

/// The difference of net amounts (debits minus credits) in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TotalsDelta {
    /// ISO 4217 numeric.
    pub currency: String,
    /// Presented in the file, minor units.
    pub file_net_minor: i64,
    /// Approved in the journal for the date, minor units.
    pub journal_net_minor: i64,
    /// File minus journal.
    pub difference_minor: i64,
}

/// A reconciliation's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The run (stored).
    pub run_id: i64,
    /// Endpoint.
    pub endpoint: String,
    /// Business date.
    pub business_date: String,
    /// The file's name.
    pub file: String,
    /// Its SHA-256.
    pub file_sha256: String,
    /// Records in the file.
    pub lines: u64,
    /// Whether this file had been reconciled before (then nothing was changed).
    pub already_reconciled: bool,
    /// Items per class.
    pub counts: BTreeMap<String, u64>,
    /// Totals difference per currency.
    pub totals: Vec<TotalsDelta>,
    /// Every item that is not `matched`.
    pub exceptions: Vec<Item>,
}

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Endpoint name (as in the journal).
    pub endpoint: &'a str,
    /// Business date.
    pub date: Date,
    /// The clearing file.
    pub file: &'a Path,
    /// How far back (days) an approval may be presented late.
    pub late_days: i64,
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex::encode(h.finalize()))
}

/// What the file held: its matched lines (kept small), every other item in full, its net
/// amount per currency, and its number of lines.
struct FileRead {
    matched: Vec<MatchedLine>,
    items: Vec<Item>,
    file_net: BTreeMap<String, i64>,
    lines: u64,
}

/// Streams the clearing file at `path`, classifying each record against the table.
fn read_file(table: &mut Table, julian: i32, path: &Path) -> Result<FileRead> {
    // Most lines match: those are kept small; everything else in full.
    let mut matched: Vec<MatchedLine> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    let mut file_net: BTreeMap<String, i64> = BTreeMap::new();
    let mut lines = 0u64;
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    clearing::read(
        std::io::BufReader::with_capacity(1 << 20, file),
        |line, rec| {
            lines = line;
            match rec {
                Ok(rec) => {
                    let sign = match rec.kind.as_str() {
                        kinds::PRESENTMENT => 1,
                        kinds::REFUND => -1,
                        _ => 0,
                    };
                    if sign != 0 {
                        *file_net.entry(rec.currency.clone()).or_default() +=
                            sign * signed(rec.amount_minor);
                    }
                    let item = classify(table, julian, line, &rec);
                    match (item.class, item.txn_id) {
                        (Class::Matched, Some(txn_id)) => matched.push(MatchedLine {
                            line,
                            txn_id,
                            amount: signed(rec.amount_minor),
                            rrn: fixed(&rec.rrn),
                            kind: match rec.kind.as_str() {
                                kinds::REFUND => kinds::REFUND,
                                kinds::REVERSAL => kinds::REVERSAL,
                                _ => kinds::PRESENTMENT,
                            },
                        }),
                        _ => items.push(item),
                    }
                }
                Err(e) => items.push(Item {
                    class: Class::UnreadableLine,
                    line: Some(line),
                    txn_id: None,
                    rrn: String::new(),
                    auth_code: None,
                    pan_masked: None,
                    kind: String::new(),
                    amount_minor: None,
                    journal_amount_minor: None,
                    currency: None,
                    // The CSV error names the position, never the content.
                    detail: Some(e.split(':').next().unwrap_or("unreadable").to_owned()),
                }),
            }
        },
    )?;
    Ok(FileRead {
        matched,
        items,
        file_net,
        lines,
    })
}

/// Reconciles a clearing file, or reads the stored result when the same file was reconciled
/// before for the same endpoint and date.
///
/// # Errors
/// The file cannot be read or the database cannot be read or written.
pub async fn reconcile(backend: &Backend, req: &Request<'_>) -> Result<Report> {
    let date = format_date(req.date);
    let sha = sha256_file(req.file)?;
    if let Some(stored) = stored_run(backend, req.endpoint, &date, &sha).await? {
        return Ok(stored);
    }
    let mut table = load_table(backend, req.endpoint, req.date, req.late_days).await?;
    let julian = req.date.to_julian_day();
    let FileRead {
        matched,
        mut items,
        file_net,
        lines,
    } = read_file(&mut table, julian, req.file)?;
    unpresented(&table, julian, &mut items);
    let totals = totals(&table, julian, &file_net);
    drop(table);
    // Chargebacks whose original is older than the table: looked up one by one (few).
    for item in items
        .iter_mut()
        .filter(|i| i.class == Class::ChargebackUnknownOriginal)
    {
        if let Some(id) = older_original(backend, req.endpoint, &item.rrn).await? {
            item.class = Class::Chargeback;
            item.txn_id = Some(id);
        }
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    if !matched.is_empty() {
        counts.insert(
            Class::Matched.as_str().to_owned(),
            u64::try_from(matched.len()).unwrap_or(u64::MAX),
        );
    }
    for i in &items {
        *counts.entry(i.class.as_str().to_owned()).or_default() += 1;
    }
    let report = Report {
        run_id: Journal::now_us(),
        endpoint: req.endpoint.to_owned(),
        business_date: date,
        file: req
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file_sha256: sha,
        lines,
        already_reconciled: false,
        counts,
        totals,
        exceptions: Vec::new(),
    };
    let run_id = store(backend, &report, &matched, &items).await?;
    drop(matched);
    let mut report = report;
    report.run_id = run_id;
    report.exceptions = items
        .into_iter()
        .filter(|i| i.class != Class::Matched)
        .collect();
    Ok(report)
}
