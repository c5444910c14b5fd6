//! Storage of reconciliation: the journal's approvals loaded into the compact table, and runs,
//! items, chargebacks and their history events stored in one transaction (items by COPY on
//! PostgreSQL).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use time::Date;

use super::classify::{fixed, hmac_bytes, signed, text, Auth, JState, Table, NONE};
use super::{Class, Item, Report, TotalsDelta};
use crate::journal::db::{Arg, DbTx, Statement};
use crate::journal::{Backend, Journal};
use crate::settlement::{format_date, parse_date};
use crate::state::TxnState;

pub(super) const JOURNAL_SQL: &str =
    "SELECT id, mti, state, response_code, rrn, auth_code, pan_hmac, amount_minor, \
    amount_reversed_minor, currency, business_date, processing_code, decided_by \
    FROM transactions WHERE endpoint = $1 AND business_date >= $2 AND business_date <= $3 \
    AND state <> 'duplicate' AND state <> 'declined'";

pub(super) const PRESENTED_SQL: &str = "SELECT i.txn_id FROM recon_items i JOIN recon_runs r ON r.id = i.run_id \
    WHERE r.endpoint = $1 AND r.business_date >= $2 AND r.business_date < $3 AND i.txn_id IS NOT NULL AND i.line IS NOT NULL \
    AND i.class IN ('matched', 'amount_mismatch', 'currency_mismatch', 'late_presentment')";

pub(super) async fn load_table(
    backend: &Backend,
    endpoint: &str,
    date: Date,
    late_days: i64,
) -> Result<Table> {
    let from = format_date(date - time::Duration::days(late_days.max(0)));
    let to = format_date(date);
    let mut table = Table::default();
    let st = Statement::new(JOURNAL_SQL)
        .bind(endpoint)
        .bind(&from)
        .bind(&to);
    backend
        .for_each(&st, |r| {
            let mti: String = r.get(1)?;
            let state: String = r.get(2)?;
            let rc: String = r.get(3)?;
            let rrn: Option<String> = r.get(4)?;
            let amount: Option<i64> = r.get(7)?;
            let reversed: Option<i64> = r.get(8)?;
            let currency: Option<String> = r.get(9)?;
            let bdate: Option<String> = r.get(10)?;
            let pc: Option<String> = r.get(11)?;
            let decided: String = r.get(12)?;
            let class = crate::settlement::class_of(&mti);
            let rrn = rrn.unwrap_or_default();
            if class == Some(4) {
                if state == "orphan" && bdate.as_deref() == Some(to.as_str()) {
                    table.orphans.push((
                        r.get(0)?,
                        rrn,
                        amount.unwrap_or(0),
                        currency.unwrap_or_default(),
                    ));
                }
                return Ok(());
            }
            if !matches!(class, Some(1 | 2))
                || !crate::settlement::approves(&rc)
                || pc.as_deref().is_some_and(|p| p.starts_with('3'))
            {
                return Ok(());
            }
            let jstate = match state.parse::<TxnState>() {
                Ok(TxnState::Approved | TxnState::Advised) => JState::Standing,
                Ok(TxnState::AdvicePending) if decided == "stand_in" => JState::StandInPending,
                Ok(TxnState::AdvicePending) => JState::Standing,
                Ok(TxnState::PartiallyReversed) => JState::PartlyReversed,
                Ok(TxnState::Reversed) => JState::Reversed,
                _ => return Ok(()),
            };
            let amount = amount.unwrap_or(0);
            let julian = bdate
                .as_deref()
                .and_then(|d| parse_date(d).ok())
                .map_or(0, Date::to_julian_day);
            let auth: Option<String> = r.get(5)?;
            let hmac: Option<String> = r.get(6)?;
            table.push(
                &rrn,
                Auth {
                    id: r.get(0)?,
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
            Ok(())
        })
        .await?;
    // Presented in the files of earlier dates: presenting them again is a duplicate. (Runs of
    // the same date are alternatives, as when a corrected file replaces one.)
    let st = Statement::new(PRESENTED_SQL)
        .bind(endpoint)
        .bind(&from)
        .bind(&to);
    let earlier = backend
        .fetch_all(&st)
        .await?
        .iter()
        .map(|r| r.get::<i64>(0))
        .collect::<Result<Vec<_>, _>>()?;
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

pub(super) async fn older_original(
    backend: &Backend,
    endpoint: &str,
    rrn: &str,
) -> Result<Option<i64>> {
    const SQL: &str = "SELECT id FROM transactions WHERE rrn = $1 AND endpoint = $2 \
        AND mti IN ('0100', '0200', '0120', '0220') AND state <> 'duplicate' ORDER BY id DESC LIMIT 1";
    let st = Statement::new(SQL).bind(rrn).bind(endpoint);
    Ok(match backend.fetch_optional(&st).await? {
        Some(r) => Some(r.get(0)?),
        None => None,
    })
}

/// What `recon_runs.summary` keeps.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub(super) struct Summary {
    counts: BTreeMap<String, u64>,
    totals: Vec<TotalsDelta>,
}

pub(super) fn summary_json(r: &Report) -> String {
    serde_json::to_string(&Summary {
        counts: r.counts.clone(),
        totals: r.totals.clone(),
    })
    .unwrap_or_default()
}

/// A matched file line: what is stored of it (the rest is the journal row's).
#[derive(Debug, Clone, Copy)]
pub(super) struct MatchedLine {
    pub(super) line: u64,
    pub(super) txn_id: i64,
    pub(super) amount: i64,
    pub(super) rrn: [u8; 12],
    pub(super) kind: &'static str,
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
pub(super) fn copy_matched(buf: &mut String, run_id: i64, seq: usize, m: &MatchedLine) {
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
pub(super) fn copy_item(buf: &mut String, run_id: i64, seq: usize, i: &Item) {
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

pub(super) const ITEM_COLUMNS: &str = "run_id, seq, class, line, txn_id, rrn, auth_code, pan_masked, kind, amount_minor, journal_amount_minor, currency, detail";

pub(super) const CB_SQL: &str = "INSERT INTO chargebacks (run_id, line, endpoint, rrn, txn_id, amount_minor, currency, reason, business_date) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(super) const EV_SQL: &str =
    "INSERT INTO transaction_events (txn_id, at_us, state, cause, detail) VALUES ($1, $2, $3, $4, $5)";

/// Each chargeback, and an event in its original's history.
async fn chargebacks(tx: &mut DbTx, now: i64, r: &Report, list: &[&Item]) -> Result<()> {
    for cb in list {
        let st = Statement::new(CB_SQL)
            .bind(r.run_id)
            .bind(cb.line.map(signed))
            .bind(&r.endpoint)
            .bind(&cb.rrn)
            .bind(cb.txn_id)
            .bind(cb.amount_minor.unwrap_or(0))
            .bind(&cb.currency)
            .bind(cb.detail.as_deref().and_then(|d| d.strip_prefix("reason ")))
            .bind(&r.business_date);
        tx.execute(&st).await?;
        if let Some(id) = cb.txn_id {
            let detail = chargeback_detail(r, cb);
            let st = Statement::new(EV_SQL)
                .bind(id)
                .bind(now)
                .bind("chargeback")
                .bind("chargeback")
                .bind(detail.as_str());
            tx.execute(&st).await?;
        }
    }
    Ok(())
}

/// Stores the run, its items, its chargebacks and their history events in one transaction.
/// A concurrent run of the same file loses on the unique key and stores nothing.
pub(super) async fn store(
    backend: &Backend,
    r: &Report,
    matched: &[MatchedLine],
    items: &[Item],
) -> Result<i64> {
    let now = Journal::now_us();
    let summary = summary_json(r);
    let lines = signed(r.lines);
    let chargebacks_list: Vec<&Item> = items
        .iter()
        .filter(|i| {
            matches!(
                i.class,
                Class::Chargeback | Class::ChargebackUnknownOriginal
            )
        })
        .collect();
    let mut tx = backend.begin().await?;
    let run = Statement::new(
        "INSERT INTO recon_runs (id, endpoint, business_date, file_sha256, file_name, lines, summary, created_us) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(r.run_id)
    .bind(&r.endpoint)
    .bind(&r.business_date)
    .bind(&r.file_sha256)
    .bind(&r.file)
    .bind(lines)
    .bind(summary.as_str())
    .bind(now);
    tx.execute(&run).await?;
    match &mut tx {
        DbTx::Pg(pg) => {
            let mut buf = String::with_capacity(1 << 20);
            let mut copy = pg
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
        }
        DbTx::Lite(_) => {
            let all: Vec<Item> = matched.iter().map(MatchedLine::item).collect();
            let mut seq = 0i64;
            for chunk in all.chunks(500).chain(items.chunks(500)) {
                let mut st =
                    Statement::new(format!("INSERT INTO recon_items ({ITEM_COLUMNS}) VALUES "));
                st.tuples(chunk, |i| {
                    seq += 1;
                    [
                        Arg::from(r.run_id),
                        Arg::from(seq),
                        Arg::from(i.class.as_str()),
                        Arg::from(i.line.map(signed)),
                        Arg::from(i.txn_id),
                        Arg::from(&i.rrn),
                        Arg::from(&i.auth_code),
                        Arg::from(&i.pan_masked),
                        Arg::from(&i.kind),
                        Arg::from(i.amount_minor),
                        Arg::from(i.journal_amount_minor),
                        Arg::from(&i.currency),
                        Arg::from(&i.detail),
                    ]
                });
                tx.execute(&st).await?;
            }
        }
    }
    chargebacks(&mut tx, now, r, &chargebacks_list).await?;
    tx.commit().await?;
    Ok(r.run_id)
}

pub(super) fn chargeback_detail(r: &Report, cb: &Item) -> String {
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
pub(super) async fn stored_run(
    backend: &Backend,
    endpoint: &str,
    date: &str,
    sha: &str,
) -> Result<Option<Report>> {
    const RUN: &str = "SELECT id, file_name, lines, summary FROM recon_runs WHERE endpoint = $1 AND business_date = $2 AND file_sha256 = $3";
    const ITEMS: &str = "SELECT class, line, txn_id, rrn, auth_code, pan_masked, kind, amount_minor, journal_amount_minor, currency, detail \
        FROM recon_items WHERE run_id = $1 AND class <> 'matched' ORDER BY seq";
    let st = Statement::new(RUN).bind(endpoint).bind(date).bind(sha);
    let Some(run) = backend.fetch_optional(&st).await? else {
        return Ok(None);
    };
    let id: i64 = run.get(0)?;
    let summary: String = run.get(3)?;
    let summary: Summary = serde_json::from_str(&summary).unwrap_or_default();
    let mut exceptions = Vec::new();
    for r in backend.fetch_all(&Statement::new(ITEMS).bind(id)).await? {
        let class: String = r.get(0)?;
        let line: Option<i64> = r.get(1)?;
        exceptions.push(Item {
            class: Class::parse(&class).unwrap_or(Class::UnreadableLine),
            line: line.and_then(|l| u64::try_from(l).ok()),
            txn_id: r.get(2)?,
            rrn: r.get::<Option<String>>(3)?.unwrap_or_default(),
            auth_code: r.get(4)?,
            pan_masked: r.get(5)?,
            kind: r.get::<Option<String>>(6)?.unwrap_or_default(),
            amount_minor: r.get(7)?,
            journal_amount_minor: r.get(8)?,
            currency: r.get(9)?,
            detail: r.get(10)?,
        });
    }
    let lines: i64 = run.get(2)?;
    Ok(Some(Report {
        run_id: id,
        endpoint: endpoint.to_owned(),
        business_date: date.to_owned(),
        file: run.get(1)?,
        file_sha256: sha.to_owned(),
        lines: u64::try_from(lines).unwrap_or(0),
        already_reconciled: true,
        counts: summary.counts,
        totals: summary.totals,
        exceptions,
    }))
}
