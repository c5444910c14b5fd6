//! The journal's circuit breaker. Once a commit fails, the switch stops asking acquirers: a
//! request is answered 96 before it is forwarded, so no acquirer approves what the journal
//! cannot record. The writer keeps probing with what it holds (its backlog, or an empty write
//! transaction when it holds nothing), every 200 ms; the first commit that succeeds closes the
//! breaker. A spool at its cap holds it open too. Both transitions are logged and counted.

use std::sync::atomic::{AtomicU8, Ordering};

use tracing::{error, info};

use crate::telemetry;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;

/// Open while the journal cannot commit.
#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
}

impl Breaker {
    /// Whether requests are refused before forwarding.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Relaxed) == OPEN
    }

    /// Opens it (a commit failed, or the spool is full).
    pub(super) fn trip(&self, why: &str) {
        if self.state.swap(OPEN, Ordering::Relaxed) == CLOSED {
            error!(
                why,
                "journal breaker open: requests answered 96 before forwarding"
            );
            metrics::gauge!(telemetry::JOURNAL_BREAKER_OPEN).set(1.0);
            metrics::counter!(telemetry::JOURNAL_BREAKER_TRANSITIONS, "to" => "open").increment(1);
        }
    }

    /// Closes it (a commit succeeded with nothing left waiting).
    pub(super) fn reset(&self) {
        if self.state.swap(CLOSED, Ordering::Relaxed) == OPEN {
            info!("journal breaker closed: commits succeed again");
            metrics::gauge!(telemetry::JOURNAL_BREAKER_OPEN).set(0.0);
            metrics::counter!(telemetry::JOURNAL_BREAKER_TRANSITIONS, "to" => "closed")
                .increment(1);
        }
    }
}
