//! Every way a request can fail inside the switch, and the one place that turns each into the
//! response code the terminal receives. No path may forget to answer: a failure is a value of
//! this enum, and the pipeline answers every value.

use cardswitch_codec::ResponseCode;

/// Why the switch answers a request itself instead of relaying an acquirer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Failure {
    /// Undecodable fields or a mandatory field missing.
    Format,
    /// The PAN fails the Luhn check (or is not a PAN).
    InvalidCard,
    /// No account range matches the card.
    NoRoute,
    /// No link of the endpoint (or its fallback) could take the request.
    Unavailable,
    /// The acquirer did not answer in time.
    Timeout,
    /// The journal cannot record the transaction (durable mode).
    JournalUnavailable,
    /// The HSM could not be reached, or a key needed for the request is not configured.
    HsmUnavailable,
    /// The PIN block cannot be translated: it does not decode under the terminal's key.
    BadPinBlock,
    /// The MAC is missing or wrong.
    BadMac,
    /// Same keys as an earlier request with different content.
    Duplicate,
    /// A reversal whose original is unknown.
    OriginalNotFound,
    /// A terminal's batch totals disagree with the switch's (reconciliation error).
    OutOfBalance,
    /// A transaction type the switch does not handle.
    Unsupported,
    /// The acquirer approved part of the amount and the terminal's listener does not take
    /// partial approvals: the approval is reversed and the terminal declined.
    PartialNotAccepted,
    /// The acquirer's reply cannot be relayed (a partial approval without a valid amount).
    BadReply,
}

impl Failure {
    /// The DE39 for this failure.
    #[must_use]
    pub const fn response_code(self) -> ResponseCode {
        match self {
            Self::Format => ResponseCode::FORMAT_ERROR,
            Self::InvalidCard => ResponseCode::INVALID_CARD,
            Self::NoRoute => ResponseCode::NO_SUCH_ISSUER,
            Self::Unavailable | Self::Timeout => ResponseCode::ISSUER_INOPERATIVE,
            Self::JournalUnavailable | Self::HsmUnavailable => ResponseCode::SYSTEM_MALFUNCTION,
            Self::Duplicate => ResponseCode::DUPLICATE,
            Self::BadPinBlock => ResponseCode::INCORRECT_PIN,
            Self::BadMac => ResponseCode::SECURITY_VIOLATION,
            Self::OriginalNotFound => ResponseCode::RECORD_NOT_FOUND,
            Self::OutOfBalance => ResponseCode::RECONCILE_ERROR,
            Self::Unsupported => ResponseCode::INVALID_TRANSACTION,
            Self::PartialNotAccepted => ResponseCode::INSUFFICIENT_FUNDS,
            Self::BadReply => ResponseCode::SYSTEM_MALFUNCTION,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_domain_table() {
        let codes: Vec<String> = [
            Failure::Format,
            Failure::InvalidCard,
            Failure::NoRoute,
            Failure::Unavailable,
            Failure::Timeout,
            Failure::JournalUnavailable,
            Failure::Duplicate,
            Failure::OriginalNotFound,
            Failure::HsmUnavailable,
            Failure::BadPinBlock,
            Failure::BadMac,
            Failure::OutOfBalance,
            Failure::PartialNotAccepted,
            Failure::BadReply,
        ]
        .iter()
        .map(|f| f.response_code().to_string())
        .collect();
        assert_eq!(
            codes,
            ["30", "14", "15", "91", "91", "96", "94", "25", "96", "55", "63", "95", "51", "96"]
        );
    }
}
