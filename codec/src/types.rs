//! Small typed values carried by common fields: the MTI, the response code, the processing code.

use std::fmt;
use std::str::FromStr;

/// A message type indicator, four ASCII digits: version, class, function, origin.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mti([u8; 4]);

/// Why a value is not an MTI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an MTI is four digits")]
pub struct MtiError;

impl Mti {
    /// 0100 authorization request.
    pub const AUTH_REQUEST: Self = Self(*b"0100");
    /// 0110 authorization response.
    pub const AUTH_RESPONSE: Self = Self(*b"0110");
    /// 0200 financial request.
    pub const FINANCIAL_REQUEST: Self = Self(*b"0200");
    /// 0210 financial response.
    pub const FINANCIAL_RESPONSE: Self = Self(*b"0210");
    /// 0400 reversal request.
    pub const REVERSAL_REQUEST: Self = Self(*b"0400");
    /// 0420 reversal advice.
    pub const REVERSAL_ADVICE: Self = Self(*b"0420");
    /// 0800 network management request.
    pub const NETWORK_REQUEST: Self = Self(*b"0800");
    /// 0810 network management response.
    pub const NETWORK_RESPONSE: Self = Self(*b"0810");

    /// Builds an MTI from four ASCII digits.
    ///
    /// # Errors
    /// [`MtiError`] when the bytes are not four digits.
    pub fn new(bytes: [u8; 4]) -> Result<Self, MtiError> {
        if bytes.iter().all(u8::is_ascii_digit) {
            Ok(Self(bytes))
        } else {
            Err(MtiError)
        }
    }

    /// The four digits.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 4] {
        &self.0
    }

    /// The four digits as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("????")
    }

    fn digit(&self, i: usize) -> u8 {
        self.0.get(i).map_or(0, |d| d - b'0')
    }

    /// Version digit: 0 for ISO 8583:1987.
    #[must_use]
    pub fn version(&self) -> u8 {
        self.digit(0)
    }

    /// Class digit: 1 authorization, 2 financial, 4 reversal, 5 reconciliation, 8 network.
    #[must_use]
    pub fn class(&self) -> u8 {
        self.digit(1)
    }

    /// Function digit: 0 request, 1 response, 2 advice, 3 advice response.
    #[must_use]
    pub fn function(&self) -> u8 {
        self.digit(2)
    }

    /// Origin digit: 0 acquirer, 1 acquirer repeat, 2 issuer, 3 issuer repeat.
    #[must_use]
    pub fn origin(&self) -> u8 {
        self.digit(3)
    }

    /// Whether this is a request or an advice (function digit even).
    #[must_use]
    pub fn is_request(&self) -> bool {
        self.function() % 2 == 0
    }

    /// Whether this is a repeat (origin digit odd).
    #[must_use]
    pub fn is_repeat(&self) -> bool {
        self.origin() % 2 == 1
    }

    /// The MTI of the original message of a repeat (0101 -> 0100); itself otherwise.
    #[must_use]
    pub fn original(&self) -> Self {
        let mut b = self.0;
        if self.is_repeat() {
            b[3] -= 1;
        }
        Self(b)
    }

    /// The response to this request or advice: function digit + 1, repeat folded to original
    /// (0100 -> 0110, 0421 -> 0430). `None` for a response.
    #[must_use]
    pub fn response(&self) -> Option<Self> {
        if !self.is_request() {
            return None;
        }
        let mut b = self.original().0;
        b[2] += 1;
        Some(Self(b))
    }

    /// The request this response answers (0110 -> 0100); itself for a request. Used to match
    /// replies to requests.
    #[must_use]
    pub fn request(&self) -> Self {
        let mut b = self.original().0;
        if !self.is_request() {
            b[2] -= 1;
        }
        Self(b)
    }
}

impl FromStr for Mti {
    type Err = MtiError;
    fn from_str(s: &str) -> Result<Self, MtiError> {
        let bytes: [u8; 4] = s.as_bytes().try_into().map_err(|_| MtiError)?;
        Self::new(bytes)
    }
}

impl fmt::Display for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Mti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mti({})", self.as_str())
    }
}

/// A DE39 response code (two characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResponseCode([u8; 2]);

impl ResponseCode {
    /// 00 approved.
    pub const APPROVED: Self = Self(*b"00");
    /// 05 do not honour.
    pub const DO_NOT_HONOUR: Self = Self(*b"05");
    /// 10 partial approval (the approved amount is in DE4).
    pub const PARTIAL_APPROVAL: Self = Self(*b"10");
    /// 12 invalid transaction.
    pub const INVALID_TRANSACTION: Self = Self(*b"12");
    /// 13 invalid amount.
    pub const INVALID_AMOUNT: Self = Self(*b"13");
    /// 14 invalid card number.
    pub const INVALID_CARD: Self = Self(*b"14");
    /// 15 no such issuer.
    pub const NO_SUCH_ISSUER: Self = Self(*b"15");
    /// 25 record not found.
    pub const RECORD_NOT_FOUND: Self = Self(*b"25");
    /// 30 format error.
    pub const FORMAT_ERROR: Self = Self(*b"30");
    /// 51 insufficient funds.
    pub const INSUFFICIENT_FUNDS: Self = Self(*b"51");
    /// 55 incorrect PIN.
    pub const INCORRECT_PIN: Self = Self(*b"55");
    /// 63 security violation.
    pub const SECURITY_VIOLATION: Self = Self(*b"63");
    /// 68 response received too late.
    pub const TOO_LATE: Self = Self(*b"68");
    /// 91 issuer or switch inoperative.
    pub const ISSUER_INOPERATIVE: Self = Self(*b"91");
    /// 92 cannot route.
    pub const CANNOT_ROUTE: Self = Self(*b"92");
    /// 94 duplicate transmission.
    pub const DUPLICATE: Self = Self(*b"94");
    /// 95 reconcile error.
    pub const RECONCILE_ERROR: Self = Self(*b"95");
    /// 96 system malfunction.
    pub const SYSTEM_MALFUNCTION: Self = Self(*b"96");

    /// Builds a response code from two printable ASCII characters.
    #[must_use]
    pub fn new(code: [u8; 2]) -> Option<Self> {
        code.iter()
            .all(u8::is_ascii_alphanumeric)
            .then_some(Self(code))
    }

    /// The two characters.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 2] {
        &self.0
    }

    /// The code as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    /// Whether the code approves (00, 08 honour with identification, 10 partial, 11 VIP).
    #[must_use]
    pub fn is_approved(&self) -> bool {
        matches!(&self.0, b"00" | b"08" | b"10" | b"11")
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseCode({})", self.as_str())
    }
}

/// DE3 processing code: transaction type, from-account and to-account (two digits each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessingCode {
    /// 00 purchase, 01 cash, 09 purchase with cashback, 20 refund, 30 balance inquiry, ...
    pub transaction_type: u8,
    /// Account type debited.
    pub from_account: u8,
    /// Account type credited.
    pub to_account: u8,
}

impl ProcessingCode {
    /// Parses six ASCII digits.
    #[must_use]
    pub fn parse(digits: &[u8]) -> Option<Self> {
        let [a, b, c, d, e, f]: [u8; 6] = digits.try_into().ok()?;
        let two = |h: u8, l: u8| {
            (h.is_ascii_digit() && l.is_ascii_digit()).then(|| (h - b'0') * 10 + (l - b'0'))
        };
        Some(Self {
            transaction_type: two(a, b)?,
            from_account: two(c, d)?,
            to_account: two(e, f)?,
        })
    }

    /// The six digits.
    #[must_use]
    pub fn to_digits(self) -> [u8; 6] {
        let t = |v: u8| [b'0' + v / 10 % 10, b'0' + v % 10];
        let [a, b] = t(self.transaction_type);
        let [c, d] = t(self.from_account);
        let [e, f] = t(self.to_account);
        [a, b, c, d, e, f]
    }

    /// Whether the transaction credits the cardholder (refund, 20..=29).
    #[must_use]
    pub fn is_credit(self) -> bool {
        (20..30).contains(&self.transaction_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_mti_folds_repeats() {
        let m = |s: &str| s.parse::<Mti>().unwrap();
        assert_eq!(m("0100").response(), Some(m("0110")));
        assert_eq!(m("0101").response(), Some(m("0110")));
        assert_eq!(m("0421").response(), Some(m("0430")));
        assert_eq!(m("0220").response(), Some(m("0230")));
        assert_eq!(m("0110").response(), None);
        assert_eq!(m("0410").request(), m("0400"));
        assert_eq!(m("0231").request(), m("0220"));
        assert!("01a0".parse::<Mti>().is_err());
        assert!("010".parse::<Mti>().is_err());
    }

    #[test]
    fn processing_code_round_trip() {
        let pc = ProcessingCode::parse(b"200030").unwrap();
        assert!(pc.is_credit());
        assert_eq!(pc.from_account, 0);
        assert_eq!(pc.to_account, 30);
        assert_eq!(&pc.to_digits(), b"200030");
        assert_eq!(ProcessingCode::parse(b"20003"), None);
    }
}
