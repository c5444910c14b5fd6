//! The settlement report: per business date and endpoint, counts and amounts by type and
//! currency (minor units), chargebacks from reconciled clearing files, and, where the endpoint
//! has a fee rate, fees computed with `rust_decimal` (rounded half to even to a minor unit per
//! line, never through floating point).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use crate::journal::db::Statement;
use crate::journal::Backend;
use crate::settlement::EndpointSettlement;

/// One line: an endpoint, a currency, a type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Line {
    /// Endpoint (empty: answered by the switch without an endpoint).
    pub endpoint: String,
    /// ISO 4217 numeric.
    pub currency: String,
    /// `purchase`, `cash`, `cashback`, `refund`, `authorization`, `reversal`, `declined`,
    /// `stand_in`, `chargeback`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Transactions.
    pub count: u64,
    /// Amount, minor units (what stands after partial reversals; for `reversal` what was
    /// taken back).
    pub amount_minor: i64,
}

/// The net of one endpoint and currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Net {
    /// Endpoint.
    pub endpoint: String,
    /// Currency.
    pub currency: String,
    /// Debits (purchases, cash, cashback, stand-in) minus refunds, minor units.
    pub gross_minor: i64,
    /// Fees: rate × debit amount + fixed fee × debits, minor units.
    pub fees_minor: i64,
    /// Chargebacks, minor units.
    pub chargebacks_minor: i64,
    /// Gross minus fees minus chargebacks.
    pub net_minor: i64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Business date.
    pub business_date: String,
    /// Lines, by endpoint, currency and type.
    pub lines: Vec<Line>,
    /// Net per endpoint and currency.
    pub net: Vec<Net>,
}

fn kind_of(mti: &str, pc: &str, state: &str, rc: &str) -> Option<&'static str> {
    let class = super::class_of(mti);
    if !matches!(class, Some(1 | 2)) || state == "duplicate" {
        return None;
    }
    if !super::approves(rc) {
        return Some("declined");
    }
    if class == Some(1) {
        return Some("authorization");
    }
    if matches!(state, "advice_pending" | "advised") {
        return Some("stand_in");
    }
    Some(match pc.get(..2) {
        Some("01") => "cash",
        Some("09") => "cashback",
        Some(t) if t.starts_with('2') => "refund",
        Some(t) if t.starts_with('3') => "inquiry",
        _ => "purchase",
    })
}

/// Builds the report for a date (all endpoints, or one), with each endpoint's fee settings.
///
/// # Errors
/// The database cannot be read, or a fee rate is not a decimal.
pub async fn build(
    backend: &Backend,
    date: &str,
    endpoint: Option<&str>,
    fees: &BTreeMap<String, EndpointSettlement>,
) -> Result<Report> {
    const SQL: &str =
        "SELECT COALESCE(endpoint, ''), mti, COALESCE(processing_code, ''), state, response_code, \
        COALESCE(currency, ''), COUNT(*), CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT), \
        CAST(COALESCE(SUM(amount_reversed_minor), 0) AS BIGINT) \
        FROM transactions WHERE business_date = $1 AND ($2 = '' OR endpoint = $2) \
        GROUP BY endpoint, mti, processing_code, state, response_code, currency";
    const CB: &str = "SELECT endpoint, COALESCE(currency, ''), COUNT(*), CAST(COALESCE(SUM(amount_minor), 0) AS BIGINT) FROM chargebacks \
        WHERE business_date = $1 AND ($2 = '' OR endpoint = $2) GROUP BY endpoint, currency";
    let ep = endpoint.unwrap_or("");
    let mut lines: BTreeMap<(String, String, &'static str), Line> = BTreeMap::new();
    let mut add = |e: String, c: String, k: &'static str, n: i64, amount: i64| {
        let l = lines
            .entry((e.clone(), c.clone(), k))
            .or_insert_with(|| Line {
                endpoint: e,
                currency: c,
                kind: k.to_owned(),
                ..Line::default()
            });
        l.count += u64::try_from(n).unwrap_or(0);
        l.amount_minor += amount;
    };
    for r in backend
        .fetch_all(&Statement::new(SQL).bind(date).bind(ep))
        .await?
    {
        let (e, mti, pc, state, rc, cur): (String, String, String, String, String, String) = (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        );
        let n: i64 = r.get(6)?;
        let sum: i64 = r.get(7)?;
        let reversed: i64 = r.get(8)?;
        let Some(kind) = kind_of(&mti, &pc, &state, &rc) else {
            continue;
        };
        match (kind, state.as_str()) {
            ("declined", _) => add(e, cur, kind, n, 0),
            (_, "reversed") => add(e, cur, "reversal", n, sum),
            (_, "partially_reversed") => {
                add(e.clone(), cur.clone(), kind, n, sum - reversed);
                add(e, cur, "reversal", n, reversed);
            }
            (_, "approved" | "advice_pending" | "advised") => add(e, cur, kind, n, sum),
            _ => {}
        }
    }
    for r in backend
        .fetch_all(&Statement::new(CB).bind(date).bind(ep))
        .await?
    {
        add(r.get(0)?, r.get(1)?, "chargeback", r.get(2)?, r.get(3)?);
    }
    let lines: Vec<Line> = lines.into_values().collect();
    let net = nets(&lines, fees)?;
    Ok(Report {
        business_date: date.to_owned(),
        lines,
        net,
    })
}

/// Nets per endpoint and currency, fees in decimal arithmetic.
fn nets(lines: &[Line], fees: &BTreeMap<String, EndpointSettlement>) -> Result<Vec<Net>> {
    let mut out: BTreeMap<(String, String), (i64, i64, u64, i64)> = BTreeMap::new();
    for l in lines {
        let e = out
            .entry((l.endpoint.clone(), l.currency.clone()))
            .or_default();
        match l.kind.as_str() {
            "purchase" | "cash" | "cashback" | "stand_in" => {
                e.0 += l.amount_minor;
                e.1 += l.amount_minor;
                e.2 += l.count;
            }
            "refund" => e.0 -= l.amount_minor,
            "chargeback" => e.3 += l.amount_minor,
            _ => {}
        }
    }
    out.into_iter()
        .filter(|((endpoint, _), _)| !endpoint.is_empty())
        .map(
            |((endpoint, currency), (gross, debits, count, chargebacks))| {
                let fees_minor = match fees.get(&endpoint) {
                    Some(f) => fee(debits, count, f)
                        .with_context(|| format!("endpoint {endpoint}: settlement.fee_rate"))?,
                    None => 0,
                };
                Ok(Net {
                    endpoint,
                    currency,
                    gross_minor: gross,
                    fees_minor,
                    chargebacks_minor: chargebacks,
                    net_minor: gross - fees_minor - chargebacks,
                })
            },
        )
        .collect()
}

/// `rate × debits + fixed × count`, rounded half to even to a minor unit.
fn fee(debits_minor: i64, count: u64, f: &EndpointSettlement) -> Result<i64> {
    let rate: Decimal = match &f.fee_rate {
        Some(r) => r
            .parse()
            .with_context(|| format!("{r:?} is not a decimal"))?,
        None => Decimal::ZERO,
    };
    let variable = (Decimal::from(debits_minor) * rate)
        .round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven);
    let fixed = Decimal::from(f.fee_fixed_minor) * Decimal::from(count);
    (variable + fixed).to_i64().context("fee out of range")
}

/// Prints the report as a table.
///
/// # Errors
/// The writer fails.
pub fn print_table(r: &Report, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "settlement report for business date {}",
        r.business_date
    )?;
    writeln!(
        out,
        "{:<16}{:<10}{:<15}{:>10}{:>18}",
        "endpoint", "currency", "type", "count", "amount (minor)"
    )?;
    for l in &r.lines {
        writeln!(
            out,
            "{:<16}{:<10}{:<15}{:>10}{:>18}",
            if l.endpoint.is_empty() {
                "(switch)"
            } else {
                &l.endpoint
            },
            l.currency,
            l.kind,
            l.count,
            l.amount_minor
        )?;
    }
    writeln!(
        out,
        "{:<16}{:<10}{:>16}{:>14}{:>16}{:>16}",
        "endpoint", "currency", "gross", "fees", "chargebacks", "net"
    )?;
    for n in &r.net {
        writeln!(
            out,
            "{:<16}{:<10}{:>16}{:>14}{:>16}{:>16}",
            n.endpoint, n.currency, n.gross_minor, n.fees_minor, n.chargebacks_minor, n.net_minor
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn fees_are_decimal_and_round_half_to_even() {
        let f = EndpointSettlement {
            cutover_time: None,
            fee_rate: Some("0.0125".into()),
            fee_fixed_minor: 10,
        };
        // 0.0125 × 1,000,020 = 12,500.25 -> 12,500; + 10 × 3.
        assert_eq!(fee(1_000_020, 3, &f).unwrap(), 12_530);
        // 0.0125 × 1,000,040 = 12,500.5 -> 12,500 (half to even); 0.0125 × 1,000,120 = 12,501.5 -> 12,502.
        let no_fixed = EndpointSettlement {
            fee_fixed_minor: 0,
            ..f.clone()
        };
        assert_eq!(fee(1_000_040, 1, &no_fixed).unwrap(), 12_500);
        assert_eq!(fee(1_000_120, 1, &no_fixed).unwrap(), 12_502);
        let bad = EndpointSettlement {
            fee_rate: Some("1.2.3".into()),
            ..f
        };
        assert!(fee(1, 1, &bad).is_err());
    }

    #[test]
    fn nets_take_refunds_fees_and_chargebacks_off() {
        let l = |k: &str, n: u64, a: i64| Line {
            endpoint: "acq".into(),
            currency: "978".into(),
            kind: k.into(),
            count: n,
            amount_minor: a,
        };
        let lines = vec![
            l("purchase", 3, 30_000),
            l("stand_in", 1, 1_000),
            l("refund", 1, 5_000),
            l("reversal", 1, 2_000),
            l("declined", 4, 0),
            l("chargeback", 1, 700),
        ];
        let fees: BTreeMap<String, EndpointSettlement> = [(
            "acq".to_owned(),
            EndpointSettlement {
                cutover_time: None,
                fee_rate: Some("0.01".into()),
                fee_fixed_minor: 5,
            },
        )]
        .into();
        let n = nets(&lines, &fees).unwrap();
        assert_eq!(
            n,
            vec![Net {
                endpoint: "acq".into(),
                currency: "978".into(),
                gross_minor: 26_000,
                fees_minor: 310 + 20,
                chargebacks_minor: 700,
                net_minor: 26_000 - 330 - 700,
            }]
        );
        assert_eq!(kind_of("0200", "200000", "approved", "00"), Some("refund"));
        assert_eq!(
            kind_of("0200", "000000", "declined", "51"),
            Some("declined")
        );
        assert_eq!(
            kind_of("0100", "000000", "approved", "00"),
            Some("authorization")
        );
        assert_eq!(kind_of("0200", "000000", "advised", "00"), Some("stand_in"));
        assert_eq!(kind_of("0400", "000000", "approved", "00"), None);
    }
}
