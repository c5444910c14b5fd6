//! The fields each message class must carry (ISO 8583:1987 as used by card switches).
//!
//! Requests from terminals are checked before anything else is done with them; a missing field
//! is a format error (30).

use cardswitch_codec::Message;

/// A required field that is absent (`number` 2 also stands for "2 or 35").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mandatory DE{0} missing")]
pub struct MissingField(pub u8);

/// Authorization and financial requests, and their advices: DE2 or DE35, then these.
const CARD_REQUEST: &[u8] = &[3, 4, 7, 11, 12, 13, 22, 25, 41, 42, 49];
/// Advices also carry the authorization code and the response code.
const ADVICE_EXTRA: &[u8] = &[38, 39];
/// Reversals: the original's amounts and acceptor, new DE7 and DE11, and DE90. (DE32 and DE37
/// are set by the switch or the acquirer when a terminal does not send them.)
const REVERSAL: &[u8] = &[3, 4, 7, 11, 12, 13, 41, 42, 49, 90];
/// Network management.
const NETWORK: &[u8] = &[7, 11, 70];
/// Reconciliation.
const RECONCILIATION: &[u8] = &[7, 11, 41];
/// Batch upload (0320): the transaction it reports and the terminal.
const UPLOAD: &[u8] = &[3, 4, 11, 37, 41];
/// Every response: the trace number and the response code.
const RESPONSE: &[u8] = &[11, 39];

/// Checks the fields the message's MTI requires.
///
/// # Errors
/// The first [`MissingField`], in field order.
pub fn check_mandatory(msg: &Message) -> Result<(), MissingField> {
    let mti = msg.mti();
    let (card, fields, extra): (bool, &[u8], &[u8]) =
        match (mti.class(), mti.is_request(), mti.function()) {
            (_, false, _) => (false, RESPONSE, &[]),
            (1 | 2, true, 0) => (true, CARD_REQUEST, &[]),
            (1 | 2, true, _) => (true, CARD_REQUEST, ADVICE_EXTRA),
            (4, true, _) => (true, REVERSAL, &[]),
            (3, true, _) => (false, UPLOAD, &[]),
            (5, true, _) => (false, RECONCILIATION, &[]),
            (8, true, _) => (false, NETWORK, &[]),
            _ => (false, &[], &[]),
        };
    if card && !msg.has(2) && !msg.has(35) {
        return Err(MissingField(2));
    }
    let mut required: Vec<u8> = fields.iter().chain(extra).copied().collect();
    required.sort_unstable();
    match required.into_iter().find(|&f| !msg.has(f)) {
        Some(f) => Err(MissingField(f)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardswitch_codec::{sample, Mti};

    #[test]
    fn a_complete_auth_request_passes_and_each_missing_field_is_named() {
        let msg = sample::auth_request();
        assert_eq!(check_mandatory(&msg), Ok(()));
        for f in CARD_REQUEST {
            let mut m = msg.clone();
            m.remove(*f);
            assert_eq!(check_mandatory(&m), Err(MissingField(*f)));
        }
        // DE35 stands in for DE2, not the other way round when both are gone.
        let mut m = msg.clone();
        m.remove(2);
        assert_eq!(check_mandatory(&m), Ok(()));
        m.remove(35);
        assert_eq!(check_mandatory(&m), Err(MissingField(2)));
    }

    #[test]
    fn network_advice_and_response_rules() {
        let echo = Message::builder(Mti::NETWORK_REQUEST)
            .field(7, "1121093015")
            .stan(1)
            .field(70, "301")
            .build();
        assert_eq!(check_mandatory(&echo), Ok(()));
        let mut advice = sample::auth_request();
        advice.set_mti("0220".parse().unwrap());
        assert_eq!(check_mandatory(&advice), Err(MissingField(38)));
        let reply = sample::auth_request().response().unwrap();
        assert_eq!(check_mandatory(&reply), Err(MissingField(39)));
        let mut reversal = sample::auth_request();
        reversal.set_mti(Mti::REVERSAL_REQUEST);
        assert_eq!(check_mandatory(&reversal), Err(MissingField(90)));
    }
}
