//! The live view's numbers: per-second slots for the last minutes (transactions, approvals,
//! a latency histogram) and the most recent declines with masked PANs.
//!
//! Recording takes one uncontended lock and touches the current second's slot; reading builds
//! the series for the dashboard once a second.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Seconds kept (the dashboard shows the last five minutes).
const SECONDS: usize = 300;
/// Declines kept.
const DECLINES: usize = 50;

struct Slot {
    second: u64,
    count: u64,
    card: u64,
    approved: u64,
    latency_us: Histogram<u64>,
}

impl Slot {
    fn new(second: u64) -> Option<Self> {
        Some(Self {
            second,
            count: 0,
            card: 0,
            approved: 0,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 2).ok()?,
        })
    }
}

/// A declined card transaction, as the dashboard lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Decline {
    /// Unix time, milliseconds.
    pub at_ms: u64,
    /// MTI.
    pub mti: String,
    /// Response code.
    pub rc: String,
    /// First 6 and last 4 digits only.
    pub pan: String,
    /// DE41.
    pub terminal: String,
    /// DE4, minor units.
    pub amount: Option<u64>,
}

/// One second of the series.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Unix time, seconds.
    pub t: u64,
    /// Messages answered in that second.
    pub tps: u64,
    /// Approved share of card transactions (0 to 1), when there were any.
    pub approval: Option<f64>,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
}

#[derive(Default)]
struct Ring {
    slots: VecDeque<Slot>,
    declines: VecDeque<Decline>,
}

/// The live numbers.
#[derive(Default)]
pub struct Live {
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Live {
    /// Records one answered message.
    pub fn record(&self, card: bool, approved: bool, latency: Duration, decline: Option<Decline>) {
        let second = now().as_secs();
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        if ring.slots.back().is_none_or(|s| s.second != second) {
            if let Some(s) = Slot::new(second) {
                ring.slots.push_back(s);
            }
            while ring.slots.len() > SECONDS {
                ring.slots.pop_front();
            }
        }
        if let Some(slot) = ring.slots.back_mut() {
            slot.count += 1;
            if card {
                slot.card += 1;
                if approved {
                    slot.approved += 1;
                }
            }
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            let _ = slot.latency_us.record(us.clamp(1, 60_000_000));
        }
        if let Some(d) = decline {
            ring.declines.push_back(d);
            while ring.declines.len() > DECLINES {
                ring.declines.pop_front();
            }
        }
    }

    /// The last `seconds` complete seconds (the current one is still filling), oldest first,
    /// with empty seconds as zeros; and the recent declines, newest first.
    #[must_use]
    pub fn series(&self, seconds: u64) -> (Vec<Point>, Vec<Decline>) {
        let current = now().as_secs();
        let Ok(ring) = self.ring.lock() else {
            return (Vec::new(), Vec::new());
        };
        let first = current.saturating_sub(seconds);
        let mut points = Vec::with_capacity(usize::try_from(seconds).unwrap_or(0));
        let mut slots = ring.slots.iter().filter(|s| s.second >= first).peekable();
        for t in first..current {
            match slots.peek() {
                Some(s) if s.second == t => {
                    let ms = |q: f64| s.latency_us.value_at_quantile(q) as f64 / 1000.0;
                    points.push(Point {
                        t,
                        tps: s.count,
                        approval: (s.card > 0).then(|| s.approved as f64 / s.card as f64),
                        p50_ms: ms(0.5),
                        p99_ms: ms(0.99),
                    });
                    slots.next();
                }
                _ => points.push(Point {
                    t,
                    tps: 0,
                    approval: None,
                    p50_ms: 0.0,
                    p99_ms: 0.0,
                }),
            }
        }
        let declines = ring.declines.iter().rev().cloned().collect();
        (points, declines)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn records_into_the_current_second_and_reports_complete_ones() {
        let live = Live::default();
        // Record early in a second so that all ten fall in the same one.
        while now().subsec_millis() > 500 {
            std::thread::sleep(Duration::from_millis(20));
        }
        for i in 0..10 {
            let decline = (i % 5 == 0).then(|| Decline {
                at_ms: 0,
                mti: "0100".into(),
                rc: "05".into(),
                pan: "476173******0010".into(),
                terminal: "T1".into(),
                amount: Some(100),
            });
            live.record(true, decline.is_none(), Duration::from_millis(2), decline);
        }
        let (points, declines) = live.series(5);
        assert_eq!(points.len(), 5);
        assert_eq!(declines.len(), 2);
        // The current second is not reported until it is over.
        std::thread::sleep(Duration::from_millis(1100));
        let (points, _) = live.series(5);
        let total: u64 = points.iter().map(|p| p.tps).sum();
        assert_eq!(total, 10);
        let p = points.iter().find(|p| p.tps == 10).unwrap();
        assert_eq!(p.approval, Some(0.8));
        assert!((p.p50_ms - 2.0).abs() < 0.1, "{}", p.p50_ms);
    }
}
