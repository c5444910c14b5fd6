//! Card data as types.
//!
//! A primary account number, track data, a PIN block, a MAC and key material each have a newtype
//! whose `Debug` and `Display` mask the value and whose memory is zeroed when dropped. Code that
//! needs the clear value asks for it by name (`expose`), which makes every such place easy to
//! find in review. Masking is done here, once, not by each caller remembering to.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Longest PAN (ISO/IEC 7812).
pub const MAX_PAN_DIGITS: usize = 19;

/// Why a value cannot be a PAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PanError {
    /// Not 1 to 19 digits long.
    #[error("a PAN has 1 to 19 digits, not {0}")]
    Length(usize),
    /// Holds something other than digits.
    #[error("a PAN holds only digits (position {0} is not one)")]
    NotNumeric(usize),
}

/// The Luhn check digit for a string of ASCII digits (the PAN without its last digit); `None`
/// when it holds anything but digits.
#[must_use]
pub fn luhn_digit(body: &[u8]) -> Option<u8> {
    let mut sum = 0u32;
    for (i, &b) in body.iter().rev().enumerate() {
        let d = u32::from(b.checked_sub(b'0').filter(|d| *d < 10)?);
        sum += if i % 2 == 0 {
            let dd = d * 2;
            if dd > 9 {
                dd - 9
            } else {
                dd
            }
        } else {
            d
        };
    }
    u8::try_from((10 - sum % 10) % 10).ok()
}

/// A primary account number. Shows as `411111******1111`.
///
/// Held inline (no heap) and zeroed on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Pan {
    digits: [u8; MAX_PAN_DIGITS],
    len: u8,
}

impl Pan {
    /// Builds a PAN from its digits.
    ///
    /// # Errors
    /// [`PanError`] when the value is empty, longer than 19 digits or not numeric.
    pub fn new(digits: &[u8]) -> Result<Self, PanError> {
        if digits.is_empty() || digits.len() > MAX_PAN_DIGITS {
            return Err(PanError::Length(digits.len()));
        }
        if let Some(p) = digits.iter().position(|b| !b.is_ascii_digit()) {
            return Err(PanError::NotNumeric(p));
        }
        let mut out = [0u8; MAX_PAN_DIGITS];
        if let Some(slot) = out.get_mut(..digits.len()) {
            slot.copy_from_slice(digits);
        }
        Ok(Self {
            digits: out,
            len: u8::try_from(digits.len()).unwrap_or(0),
        })
    }

    /// The clear digits. Every use of this is a place card data leaves its type.
    #[must_use]
    pub fn expose(&self) -> &str {
        let bytes = self.digits.get(..usize::from(self.len)).unwrap_or_default();
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// Number of digits.
    #[must_use]
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a PAN has at least one digit.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The leading `n` digits (the BIN or account range prefix), at most 11 and never more than
    /// the PAN minus its last four digits.
    #[must_use]
    pub fn prefix(&self, n: usize) -> &str {
        let n = n.min(11).min(self.len().saturating_sub(4));
        self.expose().get(..n).unwrap_or_default()
    }

    /// Whether the Luhn check digit is right.
    #[must_use]
    pub fn luhn_valid(&self) -> bool {
        let digits = self.expose().as_bytes();
        match digits.split_last() {
            Some((&last, body)) if !body.is_empty() => luhn_digit(body) == Some(last - b'0'),
            _ => false,
        }
    }

    /// The masked form, which is not card data and may be stored and logged.
    #[must_use]
    pub fn masked(&self) -> MaskedPan {
        MaskedPan::of(self.expose().as_bytes())
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan({})", self.masked())
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.masked(), f)
    }
}

/// A PAN with all but the first six and last four digits replaced by `*`.
///
/// PANs shorter than 13 digits show only their last four (or nothing when shorter than 8), so
/// that the masked form never reveals more than half of a short number.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MaskedPan(String);

impl MaskedPan {
    /// Masks the digits of a PAN.
    #[must_use]
    pub fn of(digits: &[u8]) -> Self {
        let len = digits.len();
        let (head, tail) = match len {
            13.. => (6, 4),
            8..=12 => (0, 4),
            _ => (0, 0),
        };
        let s = digits
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i < head || i >= len - tail {
                    char::from(b)
                } else {
                    '*'
                }
            })
            .collect();
        Self(s)
    }

    /// The masked text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MaskedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MaskedPan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MaskedPan({})", self.0)
    }
}

/// A byte-string secret: the struct, its constructor and its explicit `expose`.
macro_rules! secret_bytes {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
        pub struct $name(Vec<u8>);

        impl $name {
            /// Wraps the value.
            #[must_use]
            pub fn new(bytes: &[u8]) -> Self {
                Self(bytes.to_vec())
            }

            /// The clear value. Every use of this is a place card data leaves its type.
            #[must_use]
            pub fn expose(&self) -> &[u8] {
                &self.0
            }

            /// Length in bytes.
            #[must_use]
            pub fn len(&self) -> usize {
                self.0.len()
            }

            /// Whether the value is empty.
            #[must_use]
            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }
    };
}

/// `Debug` and `Display` that show only what the value is and its length.
macro_rules! opaque_display {
    ($name:ident, $label:literal) => {
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    concat!(stringify!($name), "([{} bytes masked])"),
                    self.0.len()
                )
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!("[", $label, ", {} bytes]"), self.0.len())
            }
        }
    };
}

secret_bytes!(
    /// A PIN block (DE52): shows as `[PIN block, 8 bytes]`.
    PinBlock
);
opaque_display!(PinBlock, "PIN block");
secret_bytes!(
    /// A message authentication code (DE64, DE128).
    Mac
);
opaque_display!(Mac, "MAC");
secret_bytes!(
    /// Key material, clear or under a key (DE96, key-exchange fields, HSM key fields).
    KeyMaterial
);
opaque_display!(KeyMaterial, "key");
secret_bytes!(
    /// Magnetic-stripe track data (DE35, DE36, DE45) as ASCII, `=` separating the PAN of track 2.
    /// Shows as the masked PAN followed by `=***`.
    TrackData
);

impl TrackData {
    /// The PAN of track 2 data (the digits before `=` or `D`), if it holds one.
    #[must_use]
    pub fn pan(&self) -> Option<Pan> {
        let end = self.0.iter().position(|&b| b == b'=' || b == b'D')?;
        Pan::new(self.0.get(..end)?).ok()
    }

    /// The expiry date (YYMM) of track 2 data: the four digits after the separator.
    #[must_use]
    pub fn expiry(&self) -> Option<[u8; 4]> {
        let sep = self.0.iter().position(|&b| b == b'=' || b == b'D')?;
        let yymm: [u8; 4] = self.0.get(sep + 1..sep + 5)?.try_into().ok()?;
        yymm.iter().all(u8::is_ascii_digit).then_some(yymm)
    }

    fn masked(&self) -> String {
        match self.pan() {
            Some(pan) => format!("{}=***", pan.masked()),
            None => format!("[track data, {} bytes]", self.0.len()),
        }
    }
}

impl fmt::Debug for TrackData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrackData({})", self.masked())
    }
}

impl fmt::Display for TrackData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pan_masks_in_debug_and_display() {
        let pan = Pan::new(b"4111111111111111").unwrap();
        assert_eq!(format!("{pan}"), "411111******1111");
        assert_eq!(format!("{pan:?}"), "Pan(411111******1111)");
        assert_eq!(
            format!("{:#?}", Some(&pan))
                .matches("4111111111111111")
                .count(),
            0
        );
        assert!(pan.luhn_valid());
        assert!(!Pan::new(b"4111111111111112").unwrap().luhn_valid());
        assert_eq!(pan.prefix(8), "41111111");
        assert_eq!(pan.prefix(20), "41111111111");
    }

    #[test]
    fn short_pans_reveal_at_most_their_last_four() {
        assert_eq!(MaskedPan::of(b"123456789012").as_str(), "********9012");
        assert_eq!(MaskedPan::of(b"1234567").as_str(), "*******");
        assert_eq!(
            MaskedPan::of(b"3782822463100051").as_str(),
            "378282******0051"
        );
    }

    #[test]
    fn pan_rejects_bad_values() {
        assert_eq!(Pan::new(b""), Err(PanError::Length(0)));
        assert_eq!(Pan::new(&[b'1'; 20]), Err(PanError::Length(20)));
        assert_eq!(Pan::new(b"41111x"), Err(PanError::NotNumeric(5)));
    }

    #[test]
    fn secrets_never_print_their_bytes() {
        let pin = PinBlock::new(&[0x04, 0x12, 0x77, 0xCD, 0xDE, 0xEF, 0xF6, 0x69]);
        assert_eq!(format!("{pin:?}"), "PinBlock([8 bytes masked])");
        assert_eq!(format!("{pin}"), "[PIN block, 8 bytes]");
        let track = TrackData::new(b"4111111111111111=25121010000012300000");
        assert_eq!(format!("{track}"), "411111******1111=***");
        assert_eq!(track.expiry(), Some(*b"2512"));
        assert_eq!(
            format!("{:?}", KeyMaterial::new(b"0123456789ABCDEF")),
            "KeyMaterial([16 bytes masked])"
        );
    }
}
