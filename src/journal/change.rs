//! What one event writes in one database transaction: rows, state changes of earlier
//! transactions, store-and-forward entries and their progress, a completed duplicate key.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::row::Row;
use crate::state::TxnState;

/// What a store-and-forward entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafKind {
    /// An 0420 reversal advice.
    Reversal,
    /// An 0120/0220 advice of a stand-in approval.
    Advice,
}

impl SafKind {
    /// Stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reversal => "reversal",
            Self::Advice => "advice",
        }
    }
}

/// A message queued for an endpoint, to be sent until acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafEntry {
    /// Entry id (time-ordered: the queue order).
    pub id: i64,
    /// Endpoint name.
    pub endpoint: String,
    /// Entries with the same key go in order (the PAN HMAC).
    pub order_key: String,
    /// Reversal or advice.
    pub kind: SafKind,
    /// MTI of the first transmission.
    pub mti: String,
    /// The transaction whose state the acknowledgement settles.
    pub txn_id: Option<i64>,
    /// The message in the endpoint's dialect, sealed.
    pub payload: String,
    /// Earliest first transmission, microseconds since the epoch.
    pub next_at_us: i64,
    /// Given up after this, microseconds since the epoch.
    pub expires_us: i64,
}

/// Where a store-and-forward entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SafState {
    /// Waiting to be sent (again).
    Pending,
    /// Acknowledged with a code that ends it.
    Delivered,
    /// Answered with a code that neither ends nor retries it, or out of tries.
    Refused,
    /// Past its expiry.
    Expired,
}

impl SafState {
    /// Stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Refused => "refused",
            Self::Expired => "expired",
        }
    }

    /// Whether it will not be sent again.
    #[must_use]
    pub fn is_final(self) -> bool {
        self != Self::Pending
    }
}

/// The outcome of one transmission of a store-and-forward entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SafProgress {
    /// Entry id.
    pub id: i64,
    /// Its new state.
    pub state: SafState,
    /// Transmissions so far.
    pub attempts: i32,
    /// Next transmission (when pending).
    pub next_at_us: i64,
    /// The last response code, `ZZ` for none.
    pub last_code: Option<String>,
}

/// A change of a journaled transaction's state, with its cause.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateChange {
    /// The transaction.
    pub txn_id: i64,
    /// Its new state; `None` records the cause without changing the state.
    pub to: Option<TxnState>,
    /// States it may change from; empty: any.
    pub from: Cow<'static, [TxnState]>,
    /// New reversed amount, when it changes.
    pub amount_reversed_minor: Option<i64>,
    /// The STAN the acquirer now knows the transaction by, when it changes (a stand-in
    /// approval's advice, as it was delivered).
    pub upstream_stan: Option<String>,
    /// What caused it (`terminal reversal`, `reversal acknowledged`, `late reply` ...).
    pub cause: String,
    /// More about the cause (codes, ids), never card data.
    pub detail: Option<String>,
}

/// Everything one event writes, in one database transaction. Serializable for the spool: its
/// rows are masked, its messages and replies sealed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Change {
    /// Journal rows.
    pub rows: Vec<Row>,
    /// State changes of earlier transactions.
    pub states: Vec<StateChange>,
    /// When set and a state change finds its transaction in no allowed state: nothing is
    /// changed, the rows are written as duplicates and the SAF entries dropped.
    pub conditional: bool,
    /// Messages to store and forward.
    pub saf: Vec<SafEntry>,
    /// Progress of queued messages.
    pub saf_progress: Vec<SafProgress>,
    /// A duplicate key completed: key and sealed reply.
    pub dedup_done: Option<(String, String)>,
    /// The claim behind `dedup_done`: content hash and transaction id. With it, a key the
    /// database no longer holds is written completed (a claim commits without waiting for the
    /// disk, so a crash of PostgreSQL can lose it while its request goes on).
    #[serde(default)]
    pub dedup_claim: Option<(String, i64)>,
    /// A duplicate key never claimed (the database could not be asked), written completed:
    /// key, content hash, transaction id, sealed reply. An existing key is left as it is.
    pub dedup_unclaimed: Option<(String, String, i64, String)>,
    /// Transactions whose write-ahead records this change resolves (their outcome is in it).
    pub resolves: Vec<i64>,
    /// Store-and-forward entries withdrawn if still pending (a stand-in advice whose approval
    /// the terminal was never told of).
    pub saf_cancel: Vec<i64>,
    /// Set on a change written again (from the backlog or the spool) whose rows are already in
    /// the journal: an earlier commit reported failure but had committed. Its rows are then
    /// updated to what the terminal was told, and its state changes are not applied twice.
    #[serde(skip)]
    pub rows_written: bool,
}

impl Change {
    /// A change writing one row.
    #[must_use]
    pub fn row(row: Row) -> Self {
        Self {
            rows: vec![row],
            ..Self::default()
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
            && self.states.is_empty()
            && self.saf.is_empty()
            && self.saf_progress.is_empty()
            && self.dedup_done.is_none()
            && self.dedup_unclaimed.is_none()
            && self.resolves.is_empty()
            && self.saf_cancel.is_empty()
    }

    /// Its commit failed and its terminals were answered 96 instead: its rows say so (a
    /// charge becomes a decline, or a pending reversal where one is queued), stand-in advices
    /// are withdrawn (nothing was approved), reversals stay.
    pub fn answered_unrecorded(&mut self) {
        let (advices, keep): (Vec<SafEntry>, Vec<SafEntry>) = std::mem::take(&mut self.saf)
            .into_iter()
            .partition(|e| e.kind == SafKind::Advice);
        self.saf_cancel.extend(advices.iter().map(|e| e.id));
        self.saf = keep;
        for row in &mut self.rows {
            let reversed = self
                .saf
                .iter()
                .any(|e| e.kind == SafKind::Reversal && e.txn_id == Some(row.id()));
            row.answered_unrecorded(reversed);
        }
    }
}

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Committed (durable mode) or queued (async mode).
    pub ok: bool,
    /// Its conditions held (always true for an unconditional change).
    pub applied: bool,
}
