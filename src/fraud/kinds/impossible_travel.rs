//! `impossible_travel`: the card was used at another terminal (table `terminals`, lat/lon)
//! faster than `max_speed_kmh` apart.

use std::sync::Arc;

use super::super::model::km_between;
use super::super::model::{Compiling, Seen};
use super::super::table::{LastSeen, Table};

pub(in crate::fraud) struct ImpossibleTravel {
    max_kmh: f64,
    pub(in crate::fraud) state: Arc<Table<LastSeen>>,
}

impl ImpossibleTravel {
    pub(in crate::fraud) fn compile(
        c: &Compiling<'_>,
        prior: Option<&Self>,
        max_speed_kmh: u32,
    ) -> (Self, String) {
        let state = match prior {
            Some(p) if p.state.capacity() >= c.cap => Arc::clone(&p.state),
            _ => Arc::new(Table::new(c.cap)),
        };
        (
            Self {
                max_kmh: f64::from(max_speed_kmh),
                state,
            },
            format!("travel faster than {max_speed_kmh} km/h"),
        )
    }

    pub(in crate::fraud) fn fires(&self, s: &Seen<'_, '_>) -> bool {
        let t = s.txn;
        let Some(&(lat, lon)) = s.terminals.get(t.terminal) else {
            return false;
        };
        self.state
            .with(s.pan_key, t.now_s, |last| {
                let fired = last.known && {
                    let km = km_between((last.lat, last.lon), (lat, lon));
                    let hours = f64::from(t.now_s.saturating_sub(last.at_s)) / 3600.0;
                    km > 50.0 && (hours <= 0.0 || km / hours > self.max_kmh)
                };
                *last = LastSeen {
                    lat,
                    lon,
                    at_s: t.now_s,
                    known: true,
                };
                fired
            })
            .unwrap_or(false)
    }
}
