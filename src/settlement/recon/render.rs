//! Rendering of a reconciliation report: a table for people, CSV for tools.

use anyhow::Result;

use super::{Class, Report};

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
