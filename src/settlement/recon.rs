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
//! Results are stored (`recon_runs`, `recon_items`, `chargebacks`) keyed by endpoint, date and
//! the file's SHA-256: running the same file again reads the stored run and changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use cardswitch_codec::clearing::{self, kinds, ClearingRecord};
use futures_util::TryStreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row as _;
use time::Date;

use super::{format_date, parse_date};
use crate::journal::{Backend, Journal};
use crate::state::TxnState;

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

// ---------------------------------------------------------------------------------------------
// The journal side, compact.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JState {
    Standing,
    PartlyReversed,
    Reversed,
    StandInPending,
}

/// One approved transaction (about 100 bytes with its index entry).
#[derive(Debug, Clone)]
struct Auth {
    id: i64,
    /// Standing amount (after partial reversals), minor units.
    standing: i64,
    julian: i32,
    state: JState,
    credit: bool,
    currency: [u8; 3],
    auth: [u8; 6],
    hmac: [u8; 32],
    rrn: [u8; 12],
    /// Next transaction with the same RRN (u32::MAX: none).
    next: u32,
    presented: u32,
}

fn fixed<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, b) in out.iter_mut().zip(s.bytes()) {
        *o = b;
    }
    out
}

fn hmac_bytes(hex_str: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if hex::decode_to_slice(hex_str, &mut out).is_err() {
        return [0u8; 32];
    }
    out
}

#[derive(Default)]
struct Table {
    auths: Vec<Auth>,
    by_rrn: HashMap<[u8; 12], u32>,
    /// Journal reversals with no original, on the date: (id, RRN, amount, currency).
    orphans: Vec<(i64, String, i64, String)>,
}

const NONE: u32 = u32::MAX;

impl Table {
    fn push(&mut self, rrn: &str, mut a: Auth) {
        let Ok(i) = u32::try_from(self.auths.len()) else {
            return;
        };
        let key = fixed::<12>(rrn);
        a.rrn = key;
        a.next = self.by_rrn.insert(key, i).unwrap_or(NONE);
        self.auths.push(a);
    }

    /// The transaction with this RRN and card, preferring one not yet presented.
    fn find(&self, rrn: &str, hmac: &[u8; 32]) -> Option<u32> {
        let mut i = *self.by_rrn.get(&fixed::<12>(rrn))?;
        let mut found = None;
        while let Some(a) = self.auths.get(usize::try_from(i).ok()?) {
            if &a.hmac == hmac {
                if a.presented == 0 {
                    return Some(i);
                }
                found.get_or_insert(i);
            }
            i = a.next;
        }
        found
    }

    fn any_rrn(&self, rrn: &str) -> bool {
        self.by_rrn.contains_key(&fixed::<12>(rrn))
    }
}

const JOURNAL_SQL: &str =
    "SELECT id, mti, state, response_code, rrn, auth_code, pan_hmac, amount_minor, \
    amount_reversed_minor, currency, business_date, processing_code, decided_by \
    FROM transactions WHERE endpoint = $1 AND business_date >= $2 AND business_date <= $3 \
    AND state <> 'duplicate' AND state <> 'declined'";

const PRESENTED_SQL: &str = "SELECT i.txn_id FROM recon_items i JOIN recon_runs r ON r.id = i.run_id \
    WHERE r.endpoint = $1 AND r.business_date >= $2 AND r.business_date < $3 AND i.txn_id IS NOT NULL AND i.line IS NOT NULL \
    AND i.class IN ('matched', 'amount_mismatch', 'currency_mismatch', 'late_presentment')";

async fn load_table(
    backend: &Backend,
    endpoint: &str,
    date: Date,
    late_days: i64,
) -> Result<Table> {
    let from = format_date(date - time::Duration::days(late_days.max(0)));
    let to = format_date(date);
    let mut table = Table::default();
    macro_rules! load {
        ($pool:expr, $sql:expr) => {{
            let mut rows = sqlx::query($sql)
                .bind(endpoint)
                .bind(&from)
                .bind(&to)
                .fetch($pool);
            while let Some(r) = rows.try_next().await? {
                let mti: String = r.try_get(1)?;
                let state: String = r.try_get(2)?;
                let rc: String = r.try_get(3)?;
                let rrn: Option<String> = r.try_get(4)?;
                let amount: Option<i64> = r.try_get(7)?;
                let reversed: Option<i64> = r.try_get(8)?;
                let currency: Option<String> = r.try_get(9)?;
                let bdate: Option<String> = r.try_get(10)?;
                let pc: Option<String> = r.try_get(11)?;
                let decided: String = r.try_get(12)?;
                let class = super::class_of(&mti);
                let rrn = rrn.unwrap_or_default();
                if class == Some(4) {
                    if state == "orphan" && bdate.as_deref() == Some(to.as_str()) {
                        table.orphans.push((
                            r.try_get(0)?,
                            rrn,
                            amount.unwrap_or(0),
                            currency.unwrap_or_default(),
                        ));
                    }
                    continue;
                }
                if !matches!(class, Some(1 | 2))
                    || !super::approves(&rc)
                    || pc.as_deref().is_some_and(|p| p.starts_with('3'))
                {
                    continue;
                }
                let jstate = match state.parse::<TxnState>() {
                    Ok(TxnState::Approved | TxnState::Advised) => JState::Standing,
                    Ok(TxnState::AdvicePending) if decided == "stand_in" => JState::StandInPending,
                    Ok(TxnState::AdvicePending) => JState::Standing,
                    Ok(TxnState::PartiallyReversed) => JState::PartlyReversed,
                    Ok(TxnState::Reversed) => JState::Reversed,
                    _ => continue,
                };
                let amount = amount.unwrap_or(0);
                let julian = bdate
                    .as_deref()
                    .and_then(|d| parse_date(d).ok())
                    .map_or(0, Date::to_julian_day);
                let auth: Option<String> = r.try_get(5)?;
                let hmac: Option<String> = r.try_get(6)?;
                table.push(
                    &rrn,
                    Auth {
                        id: r.try_get(0)?,
                        standing: amount - reversed.unwrap_or(0).min(amount),
                        julian,
                        state: jstate,
                        credit: pc.as_deref().is_some_and(|p| p.starts_with('2')),
                        currency: fixed(currency.as_deref().unwrap_or("")),
                        auth: fixed(auth.as_deref().unwrap_or("")),
                        hmac: hmac_bytes(hmac.as_deref().unwrap_or("")),
                        rrn: [b' '; 12],
                        next: NONE,
                        presented: 0,
                    },
                );
            }
        }};
    }
    match backend {
        Backend::Postgres(p) => load!(p, JOURNAL_SQL),
        Backend::Sqlite(p) => {
            let sql = super::lite(JOURNAL_SQL);
            load!(p, &sql);
        }
    }
    // Presented in the files of earlier dates: presenting them again is a duplicate. (Runs of
    // the same date are alternatives, as when a corrected file replaces one.)
    let earlier: Vec<i64> = match backend {
        Backend::Postgres(p) => {
            sqlx::query_scalar(PRESENTED_SQL)
                .bind(endpoint)
                .bind(&from)
                .bind(&to)
                .fetch_all(p)
                .await?
        }
        Backend::Sqlite(p) => {
            sqlx::query_scalar(&super::lite(PRESENTED_SQL))
                .bind(endpoint)
                .bind(&from)
                .bind(&to)
                .fetch_all(p)
                .await?
        }
    };
    if !earlier.is_empty() {
        let ids: std::collections::HashSet<i64> = earlier.into_iter().collect();
        for a in &mut table.auths {
            if ids.contains(&a.id) {
                a.presented = 1;
            }
        }
    }
    Ok(table)
}

/// The file's masked PAN, masked again: a file that carries more than the first six and last
/// four digits never puts them in the database or the output.
fn remask(p: &str) -> String {
    let n = p.chars().count();
    if n <= 10 {
        return p.to_owned();
    }
    p.chars()
        .enumerate()
        .map(|(i, c)| if i < 6 || i >= n - 4 { c } else { '*' })
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_owned()
}

fn signed(amount: u64) -> i64 {
    i64::try_from(amount).unwrap_or(i64::MAX)
}

/// Classifies a file record against the table; marks what it presents.
fn classify(table: &mut Table, date_julian: i32, line: u64, rec: &ClearingRecord) -> Item {
    let mut item = Item {
        class: Class::Matched,
        line: Some(line),
        txn_id: None,
        rrn: rec.rrn.clone(),
        auth_code: Some(rec.auth_code.clone()),
        pan_masked: Some(remask(&rec.pan_masked)),
        kind: rec.kind.clone(),
        amount_minor: Some(signed(rec.amount_minor)),
        journal_amount_minor: None,
        currency: Some(rec.currency.clone()),
        detail: None,
    };
    let hmac = hmac_bytes(&rec.pan_hmac);
    let found = table.find(&rec.rrn, &hmac);
    match rec.kind.as_str() {
        kinds::CHARGEBACK => {
            // Linked later (the original may be older than the table).
            item.class = Class::ChargebackUnknownOriginal;
            item.detail = (!rec.reason.is_empty()).then(|| format!("reason {}", rec.reason));
            if let Some(a) = found.and_then(|i| table.auths.get(usize::try_from(i).ok()?)) {
                item.class = Class::Chargeback;
                item.txn_id = Some(a.id);
                item.journal_amount_minor = Some(a.standing);
            }
            return item;
        }
        kinds::REVERSAL => {
            let a = found.and_then(|i| table.auths.get(usize::try_from(i).ok()?));
            match a {
                Some(a) if matches!(a.state, JState::Reversed | JState::PartlyReversed) => {
                    item.txn_id = Some(a.id);
                    item.journal_amount_minor = Some(a.standing);
                }
                Some(a) => {
                    item.class = Class::OrphanReversal;
                    item.txn_id = Some(a.id);
                    item.detail = Some("the journal has the original standing".into());
                }
                None => item.class = Class::OrphanReversal,
            }
            return item;
        }
        kinds::PRESENTMENT | kinds::REFUND => {}
        other => {
            item.class = Class::UnreadableLine;
            item.detail = Some(format!("unknown record type {other:?}"));
            return item;
        }
    }
    let Some(i) = found else {
        item.class = Class::PresentedWithoutAuthorization;
        if table.any_rrn(&rec.rrn) {
            item.detail = Some("RRN known for another card".into());
        }
        return item;
    };
    let Some(a) = usize::try_from(i).ok().and_then(|i| table.auths.get_mut(i)) else {
        return item;
    };
    item.txn_id = Some(a.id);
    item.journal_amount_minor = Some(a.standing);
    a.presented += 1;
    let auth = text(&a.auth);
    let currency = text(&a.currency);
    item.class = if a.presented > 1 {
        Class::DuplicatePresentment
    } else if a.state == JState::Reversed {
        Class::ReversedButPresented
    } else if auth != rec.auth_code {
        item.detail = Some(format!("authorization code {auth} in the journal"));
        Class::PresentedWithoutAuthorization
    } else if a.julian < date_julian {
        item.detail = Some(
            Date::from_julian_day(a.julian)
                .map(|d| format!("authorized on {}", format_date(d)))
                .unwrap_or_default(),
        );
        Class::LatePresentment
    } else if currency != rec.currency {
        item.detail = Some(format!("journal currency {currency}"));
        Class::CurrencyMismatch
    } else if a.credit != (rec.kind == kinds::REFUND) {
        item.detail = Some("debit and credit differ".into());
        Class::AmountMismatch
    } else if a.standing != signed(rec.amount_minor) {
        Class::AmountMismatch
    } else {
        Class::Matched
    };
    item
}

/// The journal items the file did not present, and the orphan reversals.
fn unpresented(table: &Table, date_julian: i32, out: &mut Vec<Item>) {
    for a in &table.auths {
        if a.presented > 0
            || a.julian != date_julian
            || a.state == JState::Reversed
            || a.standing <= 0
        {
            continue;
        }
        let class = if a.state == JState::StandInPending {
            Class::StandInNotAdvised
        } else {
            Class::AuthorizedNotPresented
        };
        out.push(Item {
            class,
            line: None,
            txn_id: Some(a.id),
            rrn: text(&a.rrn),
            auth_code: Some(text(&a.auth)),
            pan_masked: None,
            kind: if a.credit { "refund" } else { "presentment" }.into(),
            amount_minor: None,
            journal_amount_minor: Some(a.standing),
            currency: Some(text(&a.currency)),
            detail: None,
        });
    }
    for (id, rrn, amount, currency) in &table.orphans {
        out.push(Item {
            class: Class::OrphanReversal,
            line: None,
            txn_id: Some(*id),
            rrn: rrn.clone(),
            auth_code: None,
            pan_masked: None,
            kind: "reversal".into(),
            amount_minor: None,
            journal_amount_minor: Some(*amount),
            currency: Some(currency.clone()),
            detail: Some("journal reversal without an original".into()),
        });
    }
}

fn totals(table: &Table, date_julian: i32, file_net: &BTreeMap<String, i64>) -> Vec<TotalsDelta> {
    let mut journal: BTreeMap<String, i64> = BTreeMap::new();
    for a in &table.auths {
        if a.julian == date_julian && a.state != JState::Reversed {
            let v = if a.credit { -a.standing } else { a.standing };
            *journal.entry(text(&a.currency)).or_default() += v;
        }
    }
    let mut currencies: Vec<&String> = journal.keys().chain(file_net.keys()).collect();
    currencies.sort();
    currencies.dedup();
    currencies
        .into_iter()
        .map(|c| {
            let f = file_net.get(c).copied().unwrap_or(0);
            let j = journal.get(c).copied().unwrap_or(0);
            TotalsDelta {
                currency: c.clone(),
                file_net_minor: f,
                journal_net_minor: j,
                difference_minor: f - j,
            }
        })
        .collect()
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
    // Most lines match: those are kept small; everything else in full.
    let mut matched: Vec<MatchedLine> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    let mut file_net: BTreeMap<String, i64> = BTreeMap::new();
    let mut lines = 0u64;
    let file = std::fs::File::open(req.file).with_context(|| format!("{}", req.file.display()))?;
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
                    let item = classify(&mut table, julian, line, &rec);
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

async fn older_original(backend: &Backend, endpoint: &str, rrn: &str) -> Result<Option<i64>> {
    const SQL: &str = "SELECT id FROM transactions WHERE rrn = $1 AND endpoint = $2 \
        AND mti IN ('0100', '0200', '0120', '0220') AND state <> 'duplicate' ORDER BY id DESC LIMIT 1";
    Ok(match backend {
        Backend::Postgres(p) => {
            sqlx::query_scalar(SQL)
                .bind(rrn)
                .bind(endpoint)
                .fetch_optional(p)
                .await?
        }
        Backend::Sqlite(p) => {
            sqlx::query_scalar(&super::lite(SQL))
                .bind(rrn)
                .bind(endpoint)
                .fetch_optional(p)
                .await?
        }
    })
}

/// What `recon_runs.summary` keeps.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Summary {
    counts: BTreeMap<String, u64>,
    totals: Vec<TotalsDelta>,
}

fn summary_json(r: &Report) -> String {
    serde_json::to_string(&Summary {
        counts: r.counts.clone(),
        totals: r.totals.clone(),
    })
    .unwrap_or_default()
}

/// A matched file line: what is stored of it (the rest is the journal row's).
#[derive(Debug, Clone, Copy)]
struct MatchedLine {
    line: u64,
    txn_id: i64,
    amount: i64,
    rrn: [u8; 12],
    kind: &'static str,
}

impl MatchedLine {
    fn item(&self) -> Item {
        Item {
            class: Class::Matched,
            line: Some(self.line),
            txn_id: Some(self.txn_id),
            rrn: text(&self.rrn),
            auth_code: None,
            pan_masked: None,
            kind: self.kind.to_owned(),
            amount_minor: Some(self.amount),
            journal_amount_minor: Some(self.amount),
            currency: None,
            detail: None,
        }
    }
}

/// One matched line in COPY text format (the journal's COPY field writers).
fn copy_matched(buf: &mut String, run_id: i64, seq: usize, m: &MatchedLine) {
    use crate::journal::{copy_end, copy_num as num, copy_text as text};
    let rrn = std::str::from_utf8(&m.rrn).map(str::trim_end).ok();
    num(buf, Some(run_id));
    num(buf, i64::try_from(seq).ok());
    text(buf, Some(Class::Matched.as_str()));
    num(buf, i64::try_from(m.line).ok());
    num(buf, Some(m.txn_id));
    text(buf, rrn);
    text(buf, None);
    text(buf, None);
    text(buf, Some(m.kind));
    num(buf, Some(m.amount));
    num(buf, Some(m.amount));
    text(buf, None);
    text(buf, None);
    copy_end(buf);
}

/// One `recon_items` line in COPY text format.
fn copy_item(buf: &mut String, run_id: i64, seq: usize, i: &Item) {
    use crate::journal::{copy_end, copy_num as num, copy_text as text};
    num(buf, Some(run_id));
    num(buf, i64::try_from(seq).ok());
    text(buf, Some(i.class.as_str()));
    num(buf, i.line.and_then(|l| i64::try_from(l).ok()));
    num(buf, i.txn_id);
    text(buf, Some(&i.rrn));
    text(buf, i.auth_code.as_deref());
    text(buf, i.pan_masked.as_deref());
    text(buf, Some(&i.kind));
    num(buf, i.amount_minor);
    num(buf, i.journal_amount_minor);
    text(buf, i.currency.as_deref());
    text(buf, i.detail.as_deref());
    copy_end(buf);
}

const ITEM_COLUMNS: &str = "run_id, seq, class, line, txn_id, rrn, auth_code, pan_masked, kind, amount_minor, journal_amount_minor, currency, detail";

const CB_SQL: &str = "INSERT INTO chargebacks (run_id, line, endpoint, rrn, txn_id, amount_minor, currency, reason, business_date) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const EV_SQL: &str =
    "INSERT INTO transaction_events (txn_id, at_us, state, cause, detail) VALUES ($1, $2, $3, $4, $5)";

/// Each chargeback, and an event in its original's history (a macro: the two backends'
/// transactions are different types).
macro_rules! chargebacks {
    ($tx:expr, $cb_sql:expr, $ev_sql:expr, $now:expr, $r:expr, $list:expr) => {
        for cb in $list {
            sqlx::query($cb_sql)
                .bind($r.run_id)
                .bind(cb.line.map(signed))
                .bind(&$r.endpoint)
                .bind(&cb.rrn)
                .bind(cb.txn_id)
                .bind(cb.amount_minor.unwrap_or(0))
                .bind(&cb.currency)
                .bind(cb.detail.as_deref().and_then(|d| d.strip_prefix("reason ")))
                .bind(&$r.business_date)
                .execute($tx)
                .await?;
            if let Some(id) = cb.txn_id {
                sqlx::query($ev_sql)
                    .bind(id)
                    .bind($now)
                    .bind("chargeback")
                    .bind("chargeback")
                    .bind(chargeback_detail($r, cb))
                    .execute($tx)
                    .await?;
            }
        }
    };
}

/// Stores the run, its items, its chargebacks and their history events in one transaction.
/// A concurrent run of the same file loses on the unique key and stores nothing.
async fn store(
    backend: &Backend,
    r: &Report,
    matched: &[MatchedLine],
    items: &[Item],
) -> Result<i64> {
    let now = Journal::now_us();
    let summary = summary_json(r);
    let lines = signed(r.lines);
    let chargebacks: Vec<&Item> = items
        .iter()
        .filter(|i| {
            matches!(
                i.class,
                Class::Chargeback | Class::ChargebackUnknownOriginal
            )
        })
        .collect();
    match backend {
        Backend::Postgres(p) => {
            let mut tx = p.begin().await?;
            sqlx::query("INSERT INTO recon_runs (id, endpoint, business_date, file_sha256, file_name, lines, summary, created_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
                .bind(r.run_id).bind(&r.endpoint).bind(&r.business_date).bind(&r.file_sha256)
                .bind(&r.file).bind(lines).bind(&summary).bind(now)
                .execute(&mut *tx).await?;
            let mut buf = String::with_capacity(1 << 20);
            let mut copy = tx
                .copy_in_raw(&format!("COPY recon_items ({ITEM_COLUMNS}) FROM STDIN"))
                .await?;
            for (seq, m) in matched.iter().enumerate() {
                copy_matched(&mut buf, r.run_id, seq, m);
                if buf.len() > (1 << 20) {
                    copy.send(std::mem::take(&mut buf).into_bytes()).await?;
                }
            }
            for (seq, i) in items.iter().enumerate() {
                copy_item(&mut buf, r.run_id, matched.len() + seq, i);
                if buf.len() > (1 << 20) {
                    copy.send(std::mem::take(&mut buf).into_bytes()).await?;
                }
            }
            if !buf.is_empty() {
                copy.send(buf.into_bytes()).await?;
            }
            copy.finish().await?;
            chargebacks!(&mut *tx, CB_SQL, EV_SQL, now, r, &chargebacks);
            tx.commit().await?;
        }
        Backend::Sqlite(p) => {
            let mut tx = p.begin().await?;
            sqlx::query("INSERT INTO recon_runs (id, endpoint, business_date, file_sha256, file_name, lines, summary, created_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
                .bind(r.run_id).bind(&r.endpoint).bind(&r.business_date).bind(&r.file_sha256)
                .bind(&r.file).bind(lines).bind(&summary).bind(now)
                .execute(&mut *tx).await?;
            let mut seq = 0i64;
            let all: Vec<Item> = matched.iter().map(MatchedLine::item).collect();
            for chunk in all.chunks(500).chain(items.chunks(500)) {
                let mut q: sqlx::QueryBuilder<sqlx::Sqlite> =
                    sqlx::QueryBuilder::new(format!("INSERT INTO recon_items ({ITEM_COLUMNS}) "));
                q.push_values(chunk.iter(), |mut b, i| {
                    seq += 1;
                    b.push_bind(r.run_id)
                        .push_bind(seq)
                        .push_bind(i.class.as_str())
                        .push_bind(i.line.map(signed))
                        .push_bind(i.txn_id)
                        .push_bind(&i.rrn)
                        .push_bind(&i.auth_code)
                        .push_bind(&i.pan_masked)
                        .push_bind(&i.kind)
                        .push_bind(i.amount_minor)
                        .push_bind(i.journal_amount_minor)
                        .push_bind(&i.currency)
                        .push_bind(&i.detail);
                });
                q.build().execute(&mut *tx).await?;
            }
            chargebacks!(
                &mut *tx,
                &super::lite(CB_SQL),
                &super::lite(EV_SQL),
                now,
                r,
                &chargebacks
            );
            tx.commit().await?;
        }
    }
    Ok(r.run_id)
}

fn chargeback_detail(r: &Report, cb: &Item) -> String {
    format!(
        "{} {} in the {} clearing file of {} (line {})",
        cb.amount_minor.unwrap_or(0),
        cb.currency.as_deref().unwrap_or(""),
        r.endpoint,
        r.business_date,
        cb.line.unwrap_or(0)
    )
}

/// The stored result of a run of this file, if there was one.
async fn stored_run(
    backend: &Backend,
    endpoint: &str,
    date: &str,
    sha: &str,
) -> Result<Option<Report>> {
    const RUN: &str = "SELECT id, file_name, lines, summary FROM recon_runs WHERE endpoint = $1 AND business_date = $2 AND file_sha256 = $3";
    const ITEMS: &str = "SELECT class, line, txn_id, rrn, auth_code, pan_masked, kind, amount_minor, journal_amount_minor, currency, detail \
        FROM recon_items WHERE run_id = $1 AND class <> 'matched' ORDER BY seq";
    macro_rules! get {
        ($pool:expr, $run:expr, $items:expr) => {{
            let Some(run) = sqlx::query($run)
                .bind(endpoint)
                .bind(date)
                .bind(sha)
                .fetch_optional($pool)
                .await?
            else {
                return Ok(None);
            };
            let id: i64 = run.try_get(0)?;
            let summary: String = run.try_get(3)?;
            let summary: Summary = serde_json::from_str(&summary).unwrap_or_default();
            let mut exceptions = Vec::new();
            for r in sqlx::query($items).bind(id).fetch_all($pool).await? {
                let class: String = r.try_get(0)?;
                let line: Option<i64> = r.try_get(1)?;
                exceptions.push(Item {
                    class: Class::parse(&class).unwrap_or(Class::UnreadableLine),
                    line: line.and_then(|l| u64::try_from(l).ok()),
                    txn_id: r.try_get(2)?,
                    rrn: r.try_get::<Option<String>, _>(3)?.unwrap_or_default(),
                    auth_code: r.try_get(4)?,
                    pan_masked: r.try_get(5)?,
                    kind: r.try_get::<Option<String>, _>(6)?.unwrap_or_default(),
                    amount_minor: r.try_get(7)?,
                    journal_amount_minor: r.try_get(8)?,
                    currency: r.try_get(9)?,
                    detail: r.try_get(10)?,
                });
            }
            let lines: i64 = run.try_get(2)?;
            Some(Report {
                run_id: id,
                endpoint: endpoint.to_owned(),
                business_date: date.to_owned(),
                file: run.try_get(1)?,
                file_sha256: sha.to_owned(),
                lines: u64::try_from(lines).unwrap_or(0),
                already_reconciled: true,
                counts: summary.counts,
                totals: summary.totals,
                exceptions,
            })
        }};
    }
    Ok(match backend {
        Backend::Postgres(p) => get!(p, RUN, ITEMS),
        Backend::Sqlite(p) => {
            let run = super::lite(RUN);
            let items = super::lite(ITEMS);
            get!(p, &run, &items)
        }
    })
}

/// Prints a report as a table: counts, totals, then every exception.
pub fn print_table(r: &Report, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "reconciliation {} of {} for {} on {} ({} lines){}",
        r.run_id,
        r.file,
        r.endpoint,
        r.business_date,
        r.lines,
        if r.already_reconciled {
            " - reconciled before; stored result, nothing changed"
        } else {
            ""
        }
    )?;
    for c in Class::ALL {
        let n = r.counts.get(c.as_str()).copied().unwrap_or(0);
        writeln!(out, "  {:<34}{n:>10}", c.as_str())?;
    }
    writeln!(out, "totals (net, minor units):")?;
    writeln!(
        out,
        "  {:<9}{:>16}{:>16}{:>16}",
        "currency", "file", "journal", "difference"
    )?;
    for t in &r.totals {
        writeln!(
            out,
            "  {:<9}{:>16}{:>16}{:>16}",
            t.currency, t.file_net_minor, t.journal_net_minor, t.difference_minor
        )?;
    }
    if !r.exceptions.is_empty() {
        writeln!(
            out,
            "{:<34}{:>8} {:>20} {:<12} {:<7} {:<17}{:>12}{:>12}  detail",
            "class", "line", "txn", "rrn", "auth", "pan", "file", "journal"
        )?;
    }
    for i in &r.exceptions {
        writeln!(
            out,
            "{:<34}{:>8} {:>20} {:<12} {:<7} {:<17}{:>12}{:>12}  {}",
            i.class.as_str(),
            i.line.map(|l| l.to_string()).unwrap_or_default(),
            i.txn_id.map(|l| l.to_string()).unwrap_or_default(),
            i.rrn,
            i.auth_code.as_deref().unwrap_or(""),
            i.pan_masked.as_deref().unwrap_or(""),
            i.amount_minor.map(|l| l.to_string()).unwrap_or_default(),
            i.journal_amount_minor
                .map(|l| l.to_string())
                .unwrap_or_default(),
            i.detail.as_deref().unwrap_or(""),
        )?;
    }
    Ok(())
}

/// Prints the exceptions as CSV (with the class counts as comment lines first).
///
/// # Errors
/// The writer fails.
pub fn print_csv(r: &Report, out: &mut dyn std::io::Write) -> Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "class",
        "line",
        "txn_id",
        "rrn",
        "auth_code",
        "pan_masked",
        "kind",
        "amount_minor",
        "journal_amount_minor",
        "currency",
        "detail",
    ])?;
    for i in &r.exceptions {
        w.write_record([
            i.class.as_str().to_owned(),
            i.line.map(|l| l.to_string()).unwrap_or_default(),
            i.txn_id.map(|l| l.to_string()).unwrap_or_default(),
            i.rrn.clone(),
            i.auth_code.clone().unwrap_or_default(),
            i.pan_masked.clone().unwrap_or_default(),
            i.kind.clone(),
            i.amount_minor.map(|l| l.to_string()).unwrap_or_default(),
            i.journal_amount_minor
                .map(|l| l.to_string())
                .unwrap_or_default(),
            i.currency.clone().unwrap_or_default(),
            i.detail.clone().unwrap_or_default(),
        ])?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn auth(id: i64, standing: i64, julian: i32, state: JState) -> Auth {
        Auth {
            id,
            standing,
            julian,
            state,
            credit: false,
            currency: fixed("978"),
            auth: fixed("000001"),
            hmac: [7u8; 32],
            rrn: [b' '; 12],
            next: NONE,
            presented: 0,
        }
    }

    fn rec(rrn: &str, amount: u64) -> ClearingRecord {
        ClearingRecord {
            rrn: rrn.into(),
            auth_code: "000001".into(),
            pan_masked: "476173******0010".into(),
            pan_hmac: hex::encode([7u8; 32]),
            amount_minor: amount,
            currency: "978".into(),
            business_date: "2026-11-21".into(),
            kind: kinds::PRESENTMENT.into(),
            reason: String::new(),
        }
    }

    #[test]
    fn each_comparison_gives_its_class() {
        let day = 100;
        let mut t = Table::default();
        t.push("A", auth(1, 1000, day, JState::Standing));
        t.push("B", auth(2, 1000, day, JState::Standing));
        t.push("C", auth(3, 1000, day, JState::Reversed));
        t.push("D", auth(4, 1000, day - 2, JState::Standing));
        t.push("E", auth(5, 700, day, JState::PartlyReversed));
        t.push("F", auth(6, 1000, day, JState::Standing));
        t.push("G", auth(7, 1000, day, JState::StandInPending));
        t.push("H", auth(8, 1000, day, JState::Standing));
        let c = |t: &mut Table, r: ClearingRecord| classify(t, day, 1, &r).class;
        assert_eq!(c(&mut t, rec("A", 1000)), Class::Matched);
        assert_eq!(c(&mut t, rec("A", 1000)), Class::DuplicatePresentment);
        assert_eq!(c(&mut t, rec("B", 1001)), Class::AmountMismatch);
        assert_eq!(c(&mut t, rec("C", 1000)), Class::ReversedButPresented);
        assert_eq!(c(&mut t, rec("D", 1000)), Class::LatePresentment);
        assert_eq!(c(&mut t, rec("E", 700)), Class::Matched);
        let mut other_currency = rec("F", 1000);
        other_currency.currency = "840".into();
        assert_eq!(c(&mut t, other_currency), Class::CurrencyMismatch);
        assert_eq!(c(&mut t, rec("Z", 5)), Class::PresentedWithoutAuthorization);
        let mut other_card = rec("H", 1000);
        other_card.pan_hmac = hex::encode([8u8; 32]);
        assert_eq!(c(&mut t, other_card), Class::PresentedWithoutAuthorization);
        let mut other_auth = rec("H", 1000);
        other_auth.auth_code = "999999".into();
        assert_eq!(c(&mut t, other_auth), Class::PresentedWithoutAuthorization);
        let mut cb = rec("A", 1000);
        cb.kind = kinds::CHARGEBACK.into();
        assert_eq!(c(&mut t, cb.clone()), Class::Chargeback);
        cb.rrn = "Y".into();
        assert_eq!(c(&mut t, cb), Class::ChargebackUnknownOriginal);
        let mut rev = rec("C", 1000);
        rev.kind = kinds::REVERSAL.into();
        assert_eq!(c(&mut t, rev.clone()), Class::Matched);
        rev.rrn = "Q".into();
        assert_eq!(c(&mut t, rev), Class::OrphanReversal);
        let mut clear = rec("Z1", 5);
        clear.pan_masked = "4761739001010010".into();
        assert_eq!(
            classify(&mut t, day, 1, &clear).pan_masked.as_deref(),
            Some("476173******0010")
        );
        let mut odd = rec("A", 1);
        odd.kind = "transfer".into();
        assert_eq!(c(&mut t, odd), Class::UnreadableLine);
        // H was presented (with the wrong card and the wrong code): not "not presented".
        let mut rest = Vec::new();
        unpresented(&t, day, &mut rest);
        let rest: Vec<_> = rest.iter().map(|i| (i.txn_id, i.class)).collect();
        assert_eq!(
            rest,
            vec![(Some(7), Class::StandInNotAdvised)],
            "F was presented in another currency; G never"
        );
    }

    #[test]
    fn totals_differ_by_what_the_file_adds_or_lacks() {
        let day = 100;
        let mut t = Table::default();
        t.push("A", auth(1, 1000, day, JState::Standing));
        t.push("B", auth(2, 500, day, JState::Standing));
        let mut refund = auth(3, 200, day, JState::Standing);
        refund.credit = true;
        t.push("C", refund);
        let file: BTreeMap<String, i64> = [("978".to_owned(), 1000 - 200)].into();
        let d = totals(&t, day, &file);
        assert_eq!(
            d,
            vec![TotalsDelta {
                currency: "978".into(),
                file_net_minor: 800,
                journal_net_minor: 1300,
                difference_minor: -500
            }]
        );
    }
}
