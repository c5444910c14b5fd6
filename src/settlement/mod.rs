//! Settlement: business dates and cutover, terminal batch settlement (0500/0520 and the 0320
//! batch upload), clearing-file reconciliation and the settlement report.
//!
//! **Business dates.** Each endpoint has one open business date, kept in `business_dates`
//! (shared by every node on the database) and in memory ([`BusinessDay`]). It advances when the
//! acquirer sends a cutover (0800, DE70 201; DE15 names the new date, else the next day) or at
//! the endpoint's `cutover_time`. Every `cutovers` row says which date closed and why.
//!
//! **Which side of a cutover a transaction counts on.** A transaction belongs to the business
//! date the acquirer put in its reply (DE15, the settlement date, resolved to the year nearest
//! the endpoint's date). A reply without DE15 belongs to the date that was open at its
//! endpoint when the switch *sent* the request. So a request in flight while the cutover
//! arrives counts once, on the old date, unless the acquirer says otherwise, and both the
//! switch's totals and the acquirer's clearing file (built from the same DE15) agree on it.
//! Rows that never reach an endpoint (declined by the switch, reversals, stand-in) take their
//! endpoint's open date when they are answered; rows with no endpoint take the UTC date.

pub mod batch;
pub mod recon;
pub mod report;

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cardswitch_codec::{Mti, ResponseCode};
use time::{Date, Duration as Days, OffsetDateTime, Time};
use tracing::{error, info, warn};

use crate::journal::db::Statement;
use crate::journal::Backend;
use serde::Deserialize;

/// `[settlement]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettlementSection {
    /// The field of terminal messages that carries the batch number (first 6 characters).
    pub batch_field: u8,
}

impl Default for SettlementSection {
    fn default() -> Self {
        Self { batch_field: 60 }
    }
}

/// `[endpoints.settlement]`: the endpoint's business date and what it charges.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointSettlement {
    /// `HH:MM` (UTC): the business date advances at this time every day, besides the
    /// acquirer's 0800 cutover (DE70 201).
    pub cutover_time: Option<String>,
    /// Fee rate applied in the settlement report (a decimal fraction, e.g. "0.0125").
    pub fee_rate: Option<String>,
    /// Fixed fee per transaction in the settlement report, minor units.
    pub fee_fixed_minor: u64,
}

impl EndpointSettlement {
    /// Checks the cutover time and the fee rate.
    ///
    /// # Errors
    /// A time that is not `HH:MM` or a rate that is not a decimal, named with the endpoint.
    pub fn check(&self, endpoint: &str) -> Result<()> {
        if let Some(t) = &self.cutover_time {
            parse_time(t)
                .with_context(|| format!("endpoint {endpoint}: settlement.cutover_time"))?;
        }
        if let Some(r) = &self.fee_rate {
            r.parse::<rust_decimal::Decimal>().map_err(|_| {
                anyhow::anyhow!("endpoint {endpoint}: settlement.fee_rate {r:?} is not a decimal")
            })?;
        }
        Ok(())
    }
}

/// A business date as stored: `YYYY-MM-DD` (how `time` displays a date).
#[must_use]
pub fn format_date(d: Date) -> String {
    d.to_string()
}

/// Whether a journaled response code approves (the codec's list of approving codes).
pub(crate) fn approves(code: &str) -> bool {
    <[u8; 2]>::try_from(code.as_bytes())
        .ok()
        .and_then(ResponseCode::new)
        .is_some_and(|c| c.is_approved())
}

/// The message class of a journaled MTI (`0200` -> 2).
pub(crate) fn class_of(mti: &str) -> Option<u8> {
    mti.parse::<Mti>().ok().map(|m| m.class())
}

/// Parses `YYYY-MM-DD`.
///
/// # Errors
/// Not a date of that shape.
pub fn parse_date(s: &str) -> Result<Date> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &fmt).with_context(|| format!("{s:?} is not a date (YYYY-MM-DD)"))
}

/// Parses `HH:MM`.
///
/// # Errors
/// Not a time of that shape.
pub fn parse_time(s: &str) -> Result<Time> {
    let fmt = time::macros::format_description!("[hour]:[minute]");
    Time::parse(s, &fmt).with_context(|| format!("{s:?} is not a time (HH:MM)"))
}

/// DE15 (`MMDD`) as the date of that month and day nearest `near`.
#[must_use]
pub fn resolve_mmdd(mmdd: &str, near: Date) -> Option<Date> {
    let month: u8 = mmdd.get(..2)?.parse().ok()?;
    let day: u8 = mmdd.get(2..4)?.parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    [near.year() - 1, near.year(), near.year() + 1]
        .into_iter()
        .filter_map(|y| Date::from_calendar_date(y, month, day).ok())
        .min_by_key(|d| (*d - near).whole_days().abs())
}

/// `MMDD` of a date (DE15).
#[must_use]
pub fn mmdd(d: Date) -> String {
    format!("{:02}{:02}", u8::from(d.month()), d.day())
}

/// Today's date in UTC.
#[must_use]
pub fn today() -> Date {
    OffsetDateTime::now_utc().date()
}

/// The business date a `cutover_time` gives at `now`: an evening cutover (12:00 or later)
/// opens the next calendar date; a morning one leaves the early hours on the previous date.
#[must_use]
pub fn scheduled_date(now: OffsetDateTime, cutover: Time) -> Date {
    let since = now - (cutover - Time::MIDNIGHT);
    let d = since.date();
    if cutover.hour() >= 12 {
        d.next_day().unwrap_or(d)
    } else {
        d
    }
}

/// An endpoint's open business date, read on every transaction (an atomic, no lock).
#[derive(Debug)]
pub struct BusinessDay {
    julian: AtomicI32,
    cutover_time: Option<Time>,
}

impl BusinessDay {
    /// Opens on `date`.
    #[must_use]
    pub fn new(date: Date, cutover_time: Option<Time>) -> Self {
        Self {
            julian: AtomicI32::new(date.to_julian_day()),
            cutover_time,
        }
    }

    /// The open date.
    #[must_use]
    pub fn current(&self) -> Date {
        Date::from_julian_day(self.julian.load(Ordering::Acquire)).unwrap_or_else(|_| today())
    }

    /// The configured daily cutover time.
    #[must_use]
    pub fn cutover_time(&self) -> Option<Time> {
        self.cutover_time
    }

    /// Opens `to` (or the next day) and says which date closed; `None` when `to` is not after
    /// the open date (a repeated cutover changes nothing).
    pub fn advance(&self, to: Option<Date>) -> Option<(Date, Date)> {
        let mut cur = self.julian.load(Ordering::Acquire);
        loop {
            let from = Date::from_julian_day(cur).ok()?;
            let next = to.unwrap_or_else(|| from.next_day().unwrap_or(from));
            if next <= from {
                return None;
            }
            match self.julian.compare_exchange(
                cur,
                next.to_julian_day(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((from, next)),
                Err(now) => cur = now,
            }
        }
    }
}

/// A cutover to record.
#[derive(Debug, Clone)]
pub struct Cutover {
    /// The endpoint.
    pub endpoint: String,
    /// The date closed.
    pub closed: Date,
    /// The date opened.
    pub opened: Date,
    /// `0800/201` or `time HH:MM`.
    pub cause: String,
}

/// The open date of an endpoint at start: the stored one, moved on to what the cutover time
/// says when the switch was down across a cutover; today (UTC) when nothing is stored.
///
/// # Errors
/// The database cannot be read, or a stored date is unreadable.
pub async fn load_day(
    backend: &Backend,
    endpoint: &str,
    cutover_time: Option<&str>,
) -> Result<BusinessDay> {
    let time = cutover_time
        .map(parse_time)
        .transpose()
        .with_context(|| format!("endpoint {endpoint}: settlement.cutover_time"))?;
    let stored = stored_day(backend, endpoint).await?;
    let scheduled = time.map(|t| scheduled_date(OffsetDateTime::now_utc(), t));
    let date = match (stored, scheduled) {
        (Some(s), Some(t)) => s.max(t),
        (Some(s), None) => s,
        (None, Some(t)) => t,
        (None, None) => today(),
    };
    if stored.is_none() {
        save_open(backend, endpoint, date).await?;
    }
    Ok(BusinessDay::new(date, time))
}

async fn save_open(backend: &Backend, endpoint: &str, date: Date) -> Result<(), sqlx::Error> {
    let now = crate::journal::Journal::now_us();
    let d = format_date(date);
    // Only forwards: another node may have moved it on already.
    let st = Statement::new(
        "INSERT INTO business_dates (endpoint, business_date, opened_us) VALUES ($1, $2, $3) \
         ON CONFLICT (endpoint) DO UPDATE SET business_date = excluded.business_date, opened_us = excluded.opened_us \
         WHERE business_dates.business_date < excluded.business_date",
    )
    .bind(endpoint)
    .bind(&d)
    .bind(now);
    backend.execute(&st).await?;
    Ok(())
}

/// The stored open date of an endpoint, if any.
///
/// # Errors
/// The database cannot be read or the date is unreadable.
pub async fn stored_day(backend: &Backend, endpoint: &str) -> Result<Option<Date>> {
    let st = Statement::new("SELECT business_date FROM business_dates WHERE endpoint = $1")
        .bind(endpoint);
    let stored: Option<String> = match backend.fetch_optional(&st).await? {
        Some(r) => r.get(0)?,
        None => None,
    };
    stored.as_deref().map(parse_date).transpose()
}

/// Follows cutovers recorded by other switch nodes on the same database: told at once through
/// PostgreSQL `LISTEN` ([`crate::journal::notify::CUTOVERS`]), and every 30 s, the stored date of
/// each endpoint is read and the open date moved forward to it.
pub async fn follow_days(
    backend: Backend,
    days: Vec<(String, Arc<BusinessDay>)>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use crate::journal::notify::{Follower, Wake, CUTOVERS};
    let mut follower =
        Follower::start(&backend, CUTOVERS, std::time::Duration::from_secs(30)).await;
    loop {
        let wake = tokio::select! {
            () = shutdown.cancelled() => return,
            w = follower.next() => w,
        };
        for (endpoint, day) in &days {
            if matches!(&wake, Wake::Told(e) if e != endpoint) {
                continue;
            }
            if let Ok(Some(stored)) = stored_day(&backend, endpoint).await {
                if let Some((closed, opened)) = day.advance(Some(stored)) {
                    info!(endpoint = %endpoint, closed = %format_date(closed), opened = %format_date(opened), "business date moved on by another node");
                }
            }
        }
    }
}

/// Records a cutover: the open date and the history row.
///
/// # Errors
/// The database cannot be written.
pub async fn record_cutover(backend: &Backend, node: &str, c: &Cutover) -> Result<()> {
    save_open(backend, &c.endpoint, c.opened).await?;
    let now = crate::journal::Journal::now_us();
    let (closed, opened) = (format_date(c.closed), format_date(c.opened));
    let st = Statement::new(
        "INSERT INTO cutovers (endpoint, closed, opened, cause, node, at_us) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&c.endpoint)
    .bind(&closed)
    .bind(&opened)
    .bind(&c.cause)
    .bind(node)
    .bind(now);
    backend.execute(&st).await?;
    // The other nodes move on at once (and within their 30 s poll if this is lost).
    if let Err(e) =
        crate::journal::notify::notify(backend, crate::journal::notify::CUTOVERS, &c.endpoint).await
    {
        warn!(endpoint = %c.endpoint, error = %e, "cutover not notified; other nodes follow by their poll");
    }
    Ok(())
}

/// Writes cutovers as they happen (the link tasks and the timers send them here).
pub async fn cutover_writer(
    backend: Backend,
    node: String,
    mut rx: tokio::sync::mpsc::Receiver<Cutover>,
) {
    while let Some(c) = rx.recv().await {
        info!(endpoint = %c.endpoint, closed = %format_date(c.closed), opened = %format_date(c.opened), cause = %c.cause, "business date cutover");
        if let Err(e) = record_cutover(&backend, &node, &c).await {
            error!(endpoint = %c.endpoint, error = %e, "cutover not recorded");
        }
    }
}

/// Advances an endpoint's date at its `cutover_time` every day until `shutdown`.
pub async fn cutover_timer(
    endpoint: String,
    day: Arc<BusinessDay>,
    tx: tokio::sync::mpsc::Sender<Cutover>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(at) = day.cutover_time() else {
        return;
    };
    loop {
        let now = OffsetDateTime::now_utc();
        let mut next = now.replace_time(at);
        if next <= now {
            next += Days::days(1);
        }
        let wait = (next - now)
            .try_into()
            .unwrap_or(std::time::Duration::from_secs(60));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let target = scheduled_date(OffsetDateTime::now_utc(), at);
        if let Some((closed, opened)) = day.advance(Some(target)) {
            let cause = format!("time {:02}:{:02}", at.hour(), at.minute());
            let _ = tx
                .send(Cutover {
                    endpoint: endpoint.clone(),
                    closed,
                    opened,
                    cause,
                })
                .await;
        }
    }
}

/// Checks a `YYYY-MM-DD` argument.
///
/// # Errors
/// Not a date.
pub fn date_arg(s: &str) -> Result<String> {
    let d = parse_date(s)?;
    if format_date(d) != s {
        bail!("{s:?}: write the date as YYYY-MM-DD");
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use time::macros::{date, datetime, time};

    #[test]
    fn de15_resolves_to_the_nearest_year() {
        assert_eq!(
            resolve_mmdd("0101", date!(2026 - 12 - 31)),
            Some(date!(2027 - 01 - 01))
        );
        assert_eq!(
            resolve_mmdd("1231", date!(2027 - 01 - 01)),
            Some(date!(2026 - 12 - 31))
        );
        assert_eq!(
            resolve_mmdd("1122", date!(2026 - 11 - 21)),
            Some(date!(2026 - 11 - 22))
        );
        assert_eq!(resolve_mmdd("1399", date!(2026 - 11 - 21)), None);
        assert_eq!(resolve_mmdd("11", date!(2026 - 11 - 21)), None);
        assert_eq!(mmdd(date!(2026 - 03 - 07)), "0307");
    }

    #[test]
    fn scheduled_dates_follow_the_cutover_time() {
        let evening = time!(22:00);
        assert_eq!(
            scheduled_date(datetime!(2026-11-21 21:59 UTC), evening),
            date!(2026 - 11 - 21)
        );
        assert_eq!(
            scheduled_date(datetime!(2026-11-21 22:00 UTC), evening),
            date!(2026 - 11 - 22)
        );
        let midnight = time!(00:00);
        assert_eq!(
            scheduled_date(datetime!(2026-11-21 10:00 UTC), midnight),
            date!(2026 - 11 - 21)
        );
        let morning = time!(02:00);
        assert_eq!(
            scheduled_date(datetime!(2026-11-22 01:00 UTC), morning),
            date!(2026 - 11 - 21)
        );
    }

    #[test]
    fn a_business_day_only_moves_forward() {
        let d = BusinessDay::new(date!(2026 - 11 - 21), None);
        assert_eq!(
            d.advance(None),
            Some((date!(2026 - 11 - 21), date!(2026 - 11 - 22)))
        );
        assert_eq!(d.advance(Some(date!(2026 - 11 - 22))), None);
        assert_eq!(d.advance(Some(date!(2026 - 11 - 01))), None);
        assert_eq!(
            d.advance(Some(date!(2026 - 11 - 25))),
            Some((date!(2026 - 11 - 22), date!(2026 - 11 - 25)))
        );
        assert_eq!(d.current(), date!(2026 - 11 - 25));
        assert_eq!(format_date(d.current()), "2026-11-25");
        assert_eq!(parse_date("2026-11-25").unwrap(), d.current());
        assert!(date_arg("2026-1-5").is_err());
    }
}
