//! The life of a transaction, as one enum. Every journal row carries one of these states, and
//! every later change is written in the same database transaction as what caused it (the
//! acknowledgement of a reversal, a terminal's reversal, a late reply), with a row in
//! `transaction_events` saying why.
//!
//! ```text
//!   request --duplicate key, same content--> Duplicate   (the stored reply is sent again)
//!           --duplicate key, other content-> Duplicate   (answered 94)
//!           --checks, route, fraud---------> Declined    (format, card, route: 30/14/15)
//!           --to the acquirer:
//!                 reply 00 ----------------> Approved --terminal 0400/0420--> Reversed
//!                                                         (DE95) ----------> PartiallyReversed
//!                 reply, not 00 -----------> Declined
//!                 timeout / link lost -----> ReversalPending --0430 (SAF)---> Reversed
//!                   (0420, DE39 68, queued)    |
//!                                              +--stand-in approves--> AdvicePending
//!           --no link ready, stand-in approves--------------------> AdvicePending
//!                                              AdvicePending --0130/0230 (SAF)--> Advised
//!           --no link ready, stand-in declines--------------------> Declined
//!
//!   0400/0420 with no original --> Orphan (0420 acknowledged 00 and queued; 0400 answered 25)
//!   0320 batch-upload record ----> Uploaded
//! ```
//!
//! A transaction answered approved by stand-in after a timeout is `AdvicePending`/`Advised`: the
//! reversal of the timed-out attempt travels in the store-and-forward queue ahead of the advice
//! (same card, same queue order), and the transaction itself stays approved.

use std::fmt;
use std::str::FromStr;

/// The state of a transaction (or of a reversal or advice message row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Answered approved (by the acquirer).
    Approved,
    /// Answered with a decline (by the acquirer, the switch or stand-in).
    Declined,
    /// No answer from the acquirer: its outcome is unknown and a reversal is queued.
    ReversalPending,
    /// Reversed in full (by the terminal, or by the switch's reversal being acknowledged).
    Reversed,
    /// Reversed in part (DE95 carries the amount that stands).
    PartiallyReversed,
    /// Approved by stand-in; the advice to the acquirer is queued.
    AdvicePending,
    /// Approved by stand-in; the acquirer acknowledged the advice.
    Advised,
    /// A reversal whose original the switch never saw.
    Orphan,
    /// A copy of another transaction (same key): answered from it, never sent on.
    Duplicate,
    /// A terminal's batch-upload record (0320) of one of its transactions: moves no money.
    Uploaded,
}

impl TxnState {
    /// Every state.
    pub const ALL: [Self; 10] = [
        Self::Approved,
        Self::Declined,
        Self::ReversalPending,
        Self::Reversed,
        Self::PartiallyReversed,
        Self::AdvicePending,
        Self::Advised,
        Self::Orphan,
        Self::Duplicate,
        Self::Uploaded,
    ];

    /// The name stored in the journal.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Declined => "declined",
            Self::ReversalPending => "reversal_pending",
            Self::Reversed => "reversed",
            Self::PartiallyReversed => "partially_reversed",
            Self::AdvicePending => "advice_pending",
            Self::Advised => "advised",
            Self::Orphan => "orphan",
            Self::Duplicate => "duplicate",
            Self::Uploaded => "uploaded",
        }
    }

    /// The states a terminal reversal may change: those where money stands.
    pub const REVERSIBLE: &'static [Self] = &[
        Self::Approved,
        Self::PartiallyReversed,
        Self::AdvicePending,
        Self::Advised,
    ];

    /// Whether money stands: the cardholder is charged (approved, in part or by stand-in).
    #[must_use]
    pub fn is_charged(self) -> bool {
        matches!(
            self,
            Self::Approved | Self::PartiallyReversed | Self::AdvicePending | Self::Advised
        )
    }
}

impl fmt::Display for TxnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TxnState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown transaction state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in TxnState::ALL {
            assert_eq!(s.as_str().parse::<TxnState>(), Ok(s));
        }
        assert!("approvedd".parse::<TxnState>().is_err());
    }

    #[test]
    fn only_standing_money_is_charged() {
        let charged: Vec<_> = TxnState::ALL
            .into_iter()
            .filter(|s| s.is_charged())
            .collect();
        assert_eq!(
            charged,
            [
                TxnState::Approved,
                TxnState::PartiallyReversed,
                TxnState::AdvicePending,
                TxnState::Advised
            ]
        );
        assert_eq!(charged, TxnState::REVERSIBLE);
    }
}
