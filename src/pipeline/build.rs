//! The messages the pipeline builds and the decisions it takes from data alone: DE90, the
//! automatic reversal, the stand-in advice, the reversal sent upstream, the reversal amount
//! rules. No IO and no runtime: each is tested here.

use cardswitch_codec::{Message, Mti, Pan, ResponseCode};

use crate::journal::Original;
use crate::state::TxnState;

/// The card number: DE2, or the PAN of track 2.
pub(super) fn card_pan(m: &Message) -> Option<Pan> {
    m.pan().or_else(|| m.track2().and_then(|t| t.pan()))
}

pub(super) fn state_of(reply: &Message) -> TxnState {
    if reply.response_code().is_some_and(|c| c.is_approved()) {
        TxnState::Approved
    } else {
        TxnState::Declined
    }
}

/// DE90 naming an original as the acquirer saw it: MTI, STAN, DE7, DE32 and DE33 as sent
/// (each right-aligned, zero-filled).
pub(super) fn de90(
    mti: &str,
    stan: u32,
    de7: &str,
    (acquirer, forwarding): (Option<&str>, Option<&str>),
) -> String {
    format!(
        "{mti:0>4.4}{stan:06}{de7:0>10.10}{:0>11.11}{:0>11.11}",
        acquirer.unwrap_or(""),
        forwarding.unwrap_or("")
    )
}

/// The reversal advice (0420, DE39 68) of a request whose outcome is unknown, naming it by the
/// STAN and the DE32/DE33 the acquirer saw.
pub(super) fn auto_reversal(
    request: &Message,
    pan: Option<&Pan>,
    upstream_stan: u32,
    sent_ids: (Option<&str>, Option<&str>),
) -> Message {
    let mut m = request.clone();
    let original = request.mti().original();
    m.set_mti(Mti::REVERSAL_ADVICE);
    if !m.has(2) {
        if let Some(p) = pan {
            m.set_pan(p);
        }
    }
    for f in [35, 45, 52, 55, 64, 128] {
        m.remove(f);
    }
    m.set_response_code(ResponseCode::TOO_LATE);
    let de7 = request.get_str(7).unwrap_or("");
    m.set(
        90,
        de90(original.as_str(), upstream_stan, de7, sent_ids).as_bytes(),
    );
    m
}

/// What a partial approval (DE39 10) approved: the acquirer's DE4 in minor units, and its DE6
/// (cardholder billing amount) when it sent one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Partial {
    pub(super) amount: u64,
    billing: Option<Vec<u8>>,
}

impl Partial {
    /// The partial approval `reply` gives `request`: `Ok(None)` when it is not one, `Err(())`
    /// when it is one the switch cannot relay (no DE4, zero, or more than was asked).
    pub(super) fn of(request: &Message, reply: &Message) -> Result<Option<Self>, ()> {
        if reply.response_code() != Some(ResponseCode::PARTIAL_APPROVAL) {
            return Ok(None);
        }
        let asked = request.amount().ok_or(())?;
        match reply.amount() {
            Some(amount) if amount > 0 && amount <= asked => Ok(Some(Self {
                amount,
                billing: reply.get(6).map(<[u8]>::to_vec),
            })),
            _ => Err(()),
        }
    }

    /// Sets the approved amounts on `m`: the terminal's reply, or the reversal of the approval
    /// (which reverses what the acquirer approved, not what was asked).
    pub(super) fn apply(&self, m: &mut Message) {
        m.set_amount(self.amount);
        if let Some(b) = &self.billing {
            m.set(6, b);
        }
    }
}

/// What the write-ahead record keeps of a request: the card number in DE2, no track, PIN
/// block, chip data or MAC.
pub(super) fn kept_request(request: &Message, pan: &Pan) -> Message {
    let mut m = request.clone();
    if !m.has(2) {
        m.set_pan(pan);
    }
    for f in [35, 36, 45, 52, 55, 64, 128] {
        m.remove(f);
    }
    m
}

/// A message as bytes of its own (MTI, then number, 2-byte length and value of each field),
/// for sealing without a dialect.
pub(super) fn pack(m: &Message) -> Vec<u8> {
    let mut out = m.mti().as_str().as_bytes().to_vec();
    for (f, v) in m.fields() {
        out.push(f);
        out.extend_from_slice(&u16::try_from(v.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(v.get(..usize::from(u16::MAX)).unwrap_or(v));
    }
    out
}

/// The message [`pack`] made; `None` for anything else.
pub(super) fn unpack(b: &[u8]) -> Option<Message> {
    let (mti, mut b) = b.split_first_chunk::<4>()?;
    let mut m = Message::new(Mti::new(*mti).ok()?);
    while let [f, h, l, rest @ ..] = b {
        let n = usize::from(u16::from_be_bytes([*h, *l]));
        m.set(*f, rest.get(..n)?);
        b = rest.get(n..)?;
    }
    b.is_empty().then_some(m)
}

/// The advice (0120/0220) of a stand-in approval.
pub(super) fn advice(request: &Message, pan: &Pan, auth_code: &str) -> Message {
    let mut m = request.clone();
    let mti = if request.mti().class() == 1 {
        *b"0120"
    } else {
        *b"0220"
    };
    if let Ok(mti) = Mti::new(mti) {
        m.set_mti(mti);
    }
    if !m.has(2) {
        m.set_pan(pan);
    }
    for f in [35, 45, 52, 64, 128] {
        m.remove(f);
    }
    m.set_response_code(ResponseCode::APPROVED);
    m.set(38, auth_code.as_bytes());
    m
}

/// The reversal as the acquirer must see it: the original's MTI, DE90 naming the original by
/// the STAN and DE7 the acquirer saw (when the journal has them), card data the acquirer does
/// not need removed.
pub(super) fn outgoing_reversal(
    request: &Message,
    original: &Original,
    sent_ids: (Option<&str>, Option<&str>),
) -> Message {
    let mut out = request.clone();
    out.set_mti(request.mti().original());
    if let (Some(stan), Some(de7)) = (
        original
            .upstream_stan
            .as_deref()
            .and_then(|s| s.parse::<u32>().ok()),
        original.transmission_time.as_deref(),
    ) {
        out.set(90, de90(&original.mti, stan, de7, sent_ids).as_bytes());
    }
    // A partial approval's reversal names what the acquirer approved (journaled as its amount).
    if original.response_code == ResponseCode::PARTIAL_APPROVAL.as_str() {
        if let Some(a) = original.amount_minor.and_then(|a| u64::try_from(a).ok()) {
            out.set_amount(a);
        }
    }
    for f in [35, 45, 52, 55] {
        out.remove(f);
    }
    out
}

/// The original a terminal's reversal names, as far as the reversal tells it: its MTI, and the
/// STAN and DE7 from DE90, over the reversal's other fields (enough for its duplicate key).
pub(super) fn original_named(reversal: &Message) -> Option<Message> {
    let de90 = reversal.get_str(90)?;
    let mti = Mti::new(de90.get(..4)?.as_bytes().try_into().ok()?).ok()?;
    let (stan, de7) = (de90.get(4..10)?, de90.get(10..20)?);
    let mut m = reversal.clone();
    m.set_mti(mti);
    m.set(11, stan.as_bytes());
    m.set(7, de7.as_bytes());
    Some(m)
}

/// The same message as a reversal advice (0420), to be queued for store-and-forward.
pub(super) fn as_reversal_advice(m: &Message) -> Message {
    let mut advice = m.clone();
    advice.set_mti(Mti::REVERSAL_ADVICE);
    advice
}

/// A terminal's reversal advice whose original the switch never saw, passed on to the card's
/// endpoint: card data the acquirer does not need removed.
pub(super) fn orphan_advice(request: &Message) -> Message {
    let mut advice = as_reversal_advice(request);
    for f in [35, 45, 52, 55] {
        advice.remove(f);
    }
    advice
}

/// What a terminal reversal does to an original of `amount` with `already` reversed: the state
/// it moves to and the total amount reversed after it. DE95's first 12 digits are the amount
/// that stands (a partial reversal) when above zero and below the original's; anything else
/// reverses in full. `None` when the original is reversed that far already (a repeat).
pub(super) fn reversal_effect(
    amount: i64,
    already: i64,
    de95: Option<&str>,
) -> Option<(TxnState, i64)> {
    let standing = de95
        .and_then(|d| d.get(..12))
        .and_then(|a| a.parse::<i64>().ok())
        .filter(|&a| a > 0 && a < amount);
    let (to, total) = match standing {
        Some(a) => (TxnState::PartiallyReversed, amount - a),
        None => (TxnState::Reversed, amount),
    };
    (total > already).then_some((to, total))
}

/// Whether an acquirer's answer to a reversal means it took it: approved, or 25 (it has no
/// such original, so nothing stands there).
pub(super) fn reversal_taken(code: Option<ResponseCode>) -> bool {
    code.is_some_and(|c| c.is_approved() || c == ResponseCode::RECORD_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn purchase() -> Message {
        let mut m = Message::new(Mti::new(*b"0200").unwrap());
        m.set(2, b"4761739001010010");
        m.set(3, b"000000");
        m.set(4, b"000000001000");
        m.set(7, b"1201120000");
        m.set(11, b"000123");
        m.set(35, b"4761739001010010=22122011758928889");
        m.set(41, b"TERM0001");
        m.set(52, b"0123456789ABCDEF");
        m
    }

    fn unknown_original() -> Original {
        Original {
            id: 1,
            mti: "0200".into(),
            endpoint: None,
            state: TxnState::Approved,
            amount_minor: Some(1000),
            amount_reversed_minor: None,
            upstream_stan: None,
            transmission_time: None,
            pan_hmac: None,
            response_code: "00".into(),
        }
    }

    #[test]
    fn a_partial_approval_carries_an_amount_above_zero_and_not_above_the_request() {
        let req = purchase();
        let reply_with = |code: &[u8], amount: Option<&[u8]>| {
            let mut r = req.response().unwrap();
            r.set(39, code);
            match amount {
                Some(a) => r.set(4, a),
                None => {
                    r.remove(4);
                }
            }
            r
        };
        // Not a partial approval: nothing to do, whatever DE4 says.
        assert_eq!(
            Partial::of(&req, &reply_with(b"00", Some(b"000000000400"))),
            Ok(None)
        );
        let p = Partial::of(&req, &reply_with(b"10", Some(b"000000000400")))
            .unwrap()
            .unwrap();
        assert_eq!(p.amount, 400);
        // All of it is still a partial approval to relay; none, zero or more is not.
        assert!(Partial::of(&req, &reply_with(b"10", Some(b"000000001000")))
            .unwrap()
            .is_some());
        for bad in [None, Some(&b"000000000000"[..]), Some(b"000000001001")] {
            assert_eq!(
                Partial::of(&req, &reply_with(b"10", bad)),
                Err(()),
                "{bad:?}"
            );
        }
        // Applied: DE4 and DE6 as the acquirer approved them.
        let mut with_billing = reply_with(b"10", Some(b"000000000400"));
        with_billing.set(6, b"000000000333");
        let p = Partial::of(&req, &with_billing).unwrap().unwrap();
        let mut rev = auto_reversal(&req, req.pan().as_ref(), 7, (None, None));
        p.apply(&mut rev);
        assert_eq!(rev.amount(), Some(400));
        assert_eq!(rev.get_str(6), Some("000000000333"));
    }

    #[test]
    fn the_reversal_of_a_partial_approval_names_the_approved_amount() {
        let mut reversal = purchase();
        reversal.set_mti(Mti::REVERSAL_REQUEST);
        let mut original = unknown_original();
        original.amount_minor = Some(400);
        assert_eq!(
            outgoing_reversal(&reversal, &original, (None, None)).amount(),
            Some(1000),
            "a full approval: the terminal's DE4"
        );
        original.response_code = "10".into();
        assert_eq!(
            outgoing_reversal(&reversal, &original, (None, None)).amount(),
            Some(400)
        );
    }

    #[test]
    fn de90_names_the_original_as_the_acquirer_saw_it() {
        assert_eq!(
            de90("0200", 42, "1201120000", (Some("12345"), None)),
            "020000004212011200000000001234500000000000"
        );
        let no_acquirer = de90("0100", 7, "1201120000", (None, None));
        assert_eq!(no_acquirer.len(), 42);
        assert!(no_acquirer.ends_with(&"0".repeat(22)));
        // DE33 as sent takes the last eleven digits.
        assert_eq!(
            de90("0200", 42, "1201120000", (Some("12345"), Some("987"))),
            "020000004212011200000000001234500000000987"
        );
    }

    #[test]
    fn automatic_reversal_is_a_0420_68_with_the_upstream_stan_and_no_card_secrets() {
        let req = purchase();
        let rev = auto_reversal(&req, req.pan().as_ref(), 900_001, (Some("12345"), None));
        assert_eq!(rev.mti().as_str(), "0420");
        assert_eq!(rev.response_code(), Some(ResponseCode::TOO_LATE));
        assert_eq!(
            rev.get_str(90),
            Some(de90("0200", 900_001, "1201120000", (Some("12345"), None)).as_str())
        );
        for f in [35, 45, 52, 55, 64, 128] {
            assert!(!rev.has(f), "DE{f} kept");
        }
        assert_eq!(rev.get_str(2), Some("4761739001010010"));
        assert_eq!(rev.get_str(4), Some("000000001000"));
    }

    #[test]
    fn automatic_reversal_puts_the_track_pan_in_de2() {
        let mut req = purchase();
        req.remove(2);
        let pan = card_pan(&req).unwrap();
        let rev = auto_reversal(&req, Some(&pan), 1, (None, None));
        assert_eq!(rev.get_str(2), Some("4761739001010010"));
        assert!(!rev.has(35));
    }

    #[test]
    fn stand_in_advice_carries_the_approval() {
        let req = purchase();
        let adv = advice(&req, &req.pan().unwrap(), "123456");
        assert_eq!(adv.mti().as_str(), "0220");
        assert_eq!(adv.response_code(), Some(ResponseCode::APPROVED));
        assert_eq!(adv.get_str(38), Some("123456"));
        assert!(!adv.has(35) && !adv.has(52));
        let mut auth = purchase();
        auth.set_mti(Mti::new(*b"0100").unwrap());
        assert_eq!(
            advice(&auth, &auth.pan().unwrap(), "1").mti().as_str(),
            "0120"
        );
    }

    #[test]
    fn outgoing_reversal_names_what_the_acquirer_saw() {
        let mut req = purchase();
        req.set_mti(Mti::new(*b"0400").unwrap());
        req.set(90, b"020000012312011200000000000000000000000000");
        let original = Original {
            upstream_stan: Some("700001".into()),
            transmission_time: Some("1201115959".into()),
            ..unknown_original()
        };
        let out = outgoing_reversal(&req, &original, (Some("999"), None));
        assert_eq!(out.mti().as_str(), "0400");
        assert_eq!(
            out.get_str(90),
            Some(de90("0200", 700_001, "1201115959", (Some("999"), None)).as_str())
        );
        assert!(!out.has(35) && !out.has(52));
        // Without the upstream keys, the terminal's DE90 passes as it came.
        let bare = outgoing_reversal(&req, &unknown_original(), (None, None));
        assert_eq!(bare.get_str(90), req.get_str(90));
        assert_eq!(as_reversal_advice(&out).mti(), Mti::REVERSAL_ADVICE);
        let orphan = orphan_advice(&req);
        assert_eq!(orphan.mti(), Mti::REVERSAL_ADVICE);
        assert!(!orphan.has(35));
    }

    #[test]
    fn the_kept_request_has_no_card_secrets_and_packs_back_whole() {
        let mut req = purchase();
        req.remove(2);
        req.set(55, b"\x9f\x26\x08\x01\x02\x03\x04\x05\x06\x07\x08");
        let pan = card_pan(&req).unwrap();
        let kept = kept_request(&req, &pan);
        for f in [35, 52, 55, 64] {
            assert!(!kept.has(f), "DE{f} kept");
        }
        assert_eq!(kept.get_str(2), Some("4761739001010010"));
        let back = unpack(&pack(&kept)).unwrap();
        assert_eq!(back.mti(), kept.mti());
        assert_eq!(
            back.fields().collect::<Vec<_>>(),
            kept.fields().collect::<Vec<_>>()
        );
        let packed = pack(&kept);
        assert!(unpack(&packed[..packed.len() - 1]).is_none(), "cut short");
        assert!(unpack(b"01").is_none());
    }

    #[test]
    fn a_reversal_names_its_original() {
        let mut rev = purchase();
        rev.set_mti(Mti::new(*b"0420").unwrap());
        rev.set(11, b"000900");
        rev.set(90, b"020000012312011200000000000000000000000000");
        let o = original_named(&rev).unwrap();
        assert_eq!(o.mti().as_str(), "0200");
        assert_eq!(o.get_str(11), Some("000123"));
        assert_eq!(o.get_str(7), Some("1201120000"));
        rev.set(90, b"02");
        assert!(original_named(&rev).is_none());
    }

    #[test]
    fn reversal_amounts() {
        // Full reversal.
        assert_eq!(
            reversal_effect(1000, 0, None),
            Some((TxnState::Reversed, 1000))
        );
        // DE95: 400 stands, 600 reversed.
        let de95 = "000000000400000000000000C00000000C00000000";
        assert_eq!(
            reversal_effect(1000, 0, Some(de95)),
            Some((TxnState::PartiallyReversed, 600))
        );
        // The same partial reversal again changes nothing; a full one after it does.
        assert_eq!(reversal_effect(1000, 600, Some(de95)), None);
        assert_eq!(
            reversal_effect(1000, 600, None),
            Some((TxnState::Reversed, 1000))
        );
        // A standing amount of zero, the whole amount or more, or unreadable: in full.
        for odd in ["000000000000", "000000001000", "000000009999", "x"] {
            assert_eq!(
                reversal_effect(1000, 0, Some(odd)),
                Some((TxnState::Reversed, 1000)),
                "{odd}"
            );
        }
        assert_eq!(reversal_effect(1000, 1000, None), None);
    }

    #[test]
    fn replies_decide_states() {
        let mut reply = purchase().response_with(ResponseCode::APPROVED).unwrap();
        assert_eq!(state_of(&reply), TxnState::Approved);
        reply.set_response_code(ResponseCode::new(*b"51").unwrap());
        assert_eq!(state_of(&reply), TxnState::Declined);
        assert!(reversal_taken(Some(ResponseCode::APPROVED)));
        assert!(reversal_taken(Some(ResponseCode::RECORD_NOT_FOUND)));
        assert!(!reversal_taken(Some(ResponseCode::new(*b"96").unwrap())));
        assert!(!reversal_taken(None));
    }
}
