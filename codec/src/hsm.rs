//! The payShield host-command vocabulary shared by the switch's HSM client and the HSM
//! simulator: key types (`VPP`), key schemes, keys encrypted under another key as they appear in
//! commands and configuration, PIN block format codes, the account-number field, and the TCP
//! framing. Pure data and parsing: no cryptography and no IO here.
//!
//! A request on the wire is a 2-byte big-endian length, a header (4 characters unless
//! configured), two command letters and the command's fields, optionally followed by 0x19 and a
//! trailer. The reply echoes the header, carries the paired response letters (CA -> CB), a
//! two-digit error code and the reply fields, then the trailer if there was one.

use std::fmt;

/// Default payShield host port.
pub const DEFAULT_PORT: u16 = 1500;
/// Largest request accepted (payShield's own limit is 32 KiB).
pub const MAX_FRAME: usize = 32 * 1024;
/// The trailer delimiter.
pub const TRAILER: u8 = 0x19;

/// The length-prefixed framing both sides use: 2-byte big-endian length, excluding itself.
#[cfg(feature = "framing")]
#[must_use]
pub fn framing() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// A field of a host command that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// Too short, not hex, or a code this vocabulary does not map (payShield 15).
    #[error("invalid field")]
    Invalid,
    /// The PIN block format code is not supported (payShield 23).
    #[error("PIN block format")]
    PinFormat,
}

/// A payShield key type `VPP`: variant digit and LMK pair code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyType {
    variant: u8,
    pair: u8,
}

impl KeyType {
    /// Zone master key (000, LMK pair 04-05).
    pub const ZMK: Self = Self::new(0, 0);
    /// Zone PIN key (001, pair 06-07).
    pub const ZPK: Self = Self::new(0, 1);
    /// Terminal PIN key, also PVK and TMK (002, pair 14-15).
    pub const TPK: Self = Self::new(0, 2);
    /// Terminal authentication key (003, pair 16-17).
    pub const TAK: Self = Self::new(0, 3);
    /// Zone authentication key (008, pair 26-27).
    pub const ZAK: Self = Self::new(0, 8);
    /// Card verification key (402: pair 14-15, variant 4).
    pub const CVK: Self = Self::new(4, 2);

    const fn new(variant: u8, pair: u8) -> Self {
        Self { variant, pair }
    }

    /// Parses `VPP` (three characters: a digit and the pair code in hex).
    ///
    /// # Errors
    /// Not three characters, or a pair code this LMK set does not map.
    pub fn parse(code: &[u8]) -> Result<Self, FieldError> {
        let [v, p1, p2] = code else {
            return Err(FieldError::Invalid);
        };
        let variant = (*v as char).to_digit(10).ok_or(FieldError::Invalid)?;
        let pair = u8::from_str_radix(
            std::str::from_utf8(&[*p1, *p2]).map_err(|_| FieldError::Invalid)?,
            16,
        )
        .map_err(|_| FieldError::Invalid)?;
        let kt = Self {
            variant: u8::try_from(variant).map_err(|_| FieldError::Invalid)?,
            pair,
        };
        kt.lmk_index().ok_or(FieldError::Invalid)?;
        Ok(kt)
    }

    /// The two-digit code used by BU and the `PP` part.
    #[must_use]
    pub fn pair_code(self) -> u8 {
        self.pair
    }

    /// The type with pair code `pp` and variant 0.
    ///
    /// # Errors
    /// A pair code this LMK set does not map.
    pub fn from_pair_code(pp: u8) -> Result<Self, FieldError> {
        let kt = Self::new(0, pp);
        kt.lmk_index().ok_or(FieldError::Invalid)?;
        Ok(kt)
    }

    /// Index into the 20 LMK pairs: 00 -> 04-05, 01 -> 06-07, 02 -> 14-15, 03 -> 16-17,
    /// 04..0B -> 18-19 .. 32-33.
    #[must_use]
    pub fn lmk_index(self) -> Option<usize> {
        match self.pair {
            0 => Some(2),
            1 => Some(3),
            2 => Some(7),
            p @ 3..=0x0B => Some(usize::from(p) + 5),
            _ => None,
        }
    }

    /// The variant digit `V` (0 to 9).
    #[must_use]
    pub fn variant(self) -> u8 {
        self.variant
    }

    /// `VPP` as text.
    #[must_use]
    pub fn code(self) -> String {
        format!("{}{:02X}", self.variant, self.pair)
    }
}

/// How a key is encrypted under another (the payShield key scheme letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `Z` or no letter with 16 hex digits: single length.
    Single,
    /// `X`, or no letter with 32 hex digits: double length, each half ECB (ANSI X9.17).
    DoubleAnsi,
    /// `U`: double length, variant per half.
    DoubleVariant,
    /// `Y`: triple length, ECB.
    TripleAnsi,
    /// `T`: triple length, variant per third.
    TripleVariant,
}

impl Scheme {
    /// The scheme letter ('Z' for single length).
    #[must_use]
    pub fn letter(self) -> char {
        match self {
            Self::Single => 'Z',
            Self::DoubleAnsi => 'X',
            Self::DoubleVariant => 'U',
            Self::TripleAnsi => 'Y',
            Self::TripleVariant => 'T',
        }
    }

    /// The scheme named by a key-scheme flag (`0`/`Z`, `U`, `X`, `T`, `Y`).
    ///
    /// # Errors
    /// Any other letter.
    pub fn from_flag(flag: u8) -> Result<Self, FieldError> {
        match flag {
            b'0' | b'Z' => Ok(Self::Single),
            b'U' => Ok(Self::DoubleVariant),
            b'X' => Ok(Self::DoubleAnsi),
            b'T' => Ok(Self::TripleVariant),
            b'Y' => Ok(Self::TripleAnsi),
            _ => Err(FieldError::Invalid),
        }
    }

    /// The clear key length in bytes (8, 16 or 24).
    #[must_use]
    pub fn key_len(self) -> usize {
        match self {
            Self::Single => 8,
            Self::DoubleAnsi | Self::DoubleVariant => 16,
            Self::TripleAnsi | Self::TripleVariant => 24,
        }
    }
}

/// A key encrypted under another key, as carried in host commands and configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Its scheme.
    pub scheme: Scheme,
    /// The encrypted bytes (8, 16 or 24).
    pub bytes: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Encrypted, but still key material: shown by scheme only.
        write!(
            f,
            "WrappedKey({:?}, {} bytes)",
            self.scheme,
            self.bytes.len()
        )
    }
}

impl WrappedKey {
    /// Parses a key field at the start of `text`: a scheme letter and its hex digits, or bare
    /// hex of `bare_len` digits (16 or 32). Returns the key and the bytes it took.
    ///
    /// # Errors
    /// Too short or not hex.
    pub fn parse_prefix(text: &[u8], bare_len: usize) -> Result<(Self, usize), FieldError> {
        let first = *text.first().ok_or(FieldError::Invalid)?;
        let (scheme, start, digits) = match first {
            b'U' => (Scheme::DoubleVariant, 1, 32),
            b'X' => (Scheme::DoubleAnsi, 1, 32),
            b'T' => (Scheme::TripleVariant, 1, 48),
            b'Y' => (Scheme::TripleAnsi, 1, 48),
            b'Z' => (Scheme::Single, 1, 16),
            _ if bare_len == 32 => (Scheme::DoubleAnsi, 0, 32),
            _ => (Scheme::Single, 0, 16),
        };
        let hex_digits = text.get(start..start + digits).ok_or(FieldError::Invalid)?;
        let bytes = hex::decode(hex_digits).map_err(|_| FieldError::Invalid)?;
        Ok((Self { scheme, bytes }, start + digits))
    }

    /// Parses a whole key field.
    ///
    /// # Errors
    /// As [`WrappedKey::parse_prefix`], or trailing characters.
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        let bare = if text.len() == 32 { 32 } else { 16 };
        let (k, used) = Self::parse_prefix(text.as_bytes(), bare)?;
        if used != text.len() {
            return Err(FieldError::Invalid);
        }
        Ok(k)
    }

    /// The field as payShield writes it: scheme letter (none for single length) and hex.
    #[must_use]
    pub fn to_field(&self) -> String {
        match self.scheme {
            Scheme::Single => hex::encode_upper(&self.bytes),
            s => format!("{}{}", s.letter(), hex::encode_upper(&self.bytes)),
        }
    }
}

impl fmt::Display for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_field())
    }
}

/// A PIN block format, by its Thales code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinFormat {
    /// 01: ISO 9564 format 0 (ANSI X9.8).
    Iso0,
    /// 03: Diebold/IBM 3624: PIN padded with F, no account.
    Diebold,
    /// 05: ISO 9564 format 1: PIN and random fill, no account.
    Iso1,
    /// 47: ISO 9564 format 3: like format 0 with a random A-F fill.
    Iso3,
}

impl PinFormat {
    /// The format for a Thales code.
    ///
    /// # Errors
    /// [`FieldError::PinFormat`] for codes not supported here.
    pub fn from_code(code: &str) -> Result<Self, FieldError> {
        match code {
            "01" => Ok(Self::Iso0),
            "03" => Ok(Self::Diebold),
            "05" => Ok(Self::Iso1),
            "47" => Ok(Self::Iso3),
            _ => Err(FieldError::PinFormat),
        }
    }

    /// The Thales code.
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            Self::Iso0 => "01",
            Self::Diebold => "03",
            Self::Iso1 => "05",
            Self::Iso3 => "47",
        }
    }
}

/// The 12 rightmost digits of a PAN excluding its check digit (the "account number" field).
#[must_use]
pub fn account_of(pan: &str) -> Option<String> {
    let body = pan.get(..pan.len().checked_sub(1)?)?;
    let start = body.len().checked_sub(12)?;
    body.get(start..).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn key_types_parse_and_print_vpp() {
        assert_eq!(KeyType::parse(b"001").unwrap(), KeyType::ZPK);
        assert_eq!(KeyType::parse(b"402").unwrap(), KeyType::CVK);
        assert_eq!(KeyType::ZAK.code(), "008");
        assert_eq!(KeyType::from_pair_code(3).unwrap(), KeyType::TAK);
        assert_eq!(KeyType::parse(b"0FF"), Err(FieldError::Invalid));
        assert_eq!(KeyType::parse(b"01"), Err(FieldError::Invalid));
        assert_eq!(KeyType::TPK.lmk_index(), Some(7));
    }

    #[test]
    fn wrapped_keys_round_trip_their_field() {
        let single = WrappedKey::parse("0406FBB23A5214DF").unwrap();
        assert_eq!(single.scheme, Scheme::Single);
        assert_eq!(single.to_field(), "0406FBB23A5214DF");
        let u = WrappedKey::parse("U0A61E674E88C6A7EEABC38C2B2BB492F").unwrap();
        assert_eq!(u.scheme, Scheme::DoubleVariant);
        assert_eq!(u.bytes.len(), u.scheme.key_len());
        assert_eq!(u.to_string(), "U0A61E674E88C6A7EEABC38C2B2BB492F");
        let bare = WrappedKey::parse("0A61E674E88C6A7EEABC38C2B2BB492F").unwrap();
        assert_eq!(bare.scheme, Scheme::DoubleAnsi);
        assert_eq!(WrappedKey::parse("U0A61"), Err(FieldError::Invalid));
        assert_eq!(
            WrappedKey::parse("0406FBB23A5214DF00"),
            Err(FieldError::Invalid)
        );
        assert_eq!(
            WrappedKey::parse("0406FBB23A5214DG"),
            Err(FieldError::Invalid)
        );
        // Key material never shows in Debug.
        assert!(!format!("{single:?}").contains("0406"));
    }

    #[test]
    fn schemes_and_pin_formats_by_their_codes() {
        assert_eq!(Scheme::from_flag(b'0').unwrap(), Scheme::Single);
        assert_eq!(Scheme::from_flag(b'T').unwrap().letter(), 'T');
        assert_eq!(Scheme::from_flag(b'Q'), Err(FieldError::Invalid));
        assert_eq!(PinFormat::from_code("47").unwrap(), PinFormat::Iso3);
        assert_eq!(PinFormat::Iso0.code(), "01");
        assert_eq!(PinFormat::from_code("99"), Err(FieldError::PinFormat));
    }

    #[test]
    fn account_is_twelve_digits_before_the_check_digit() {
        assert_eq!(
            account_of("4111111111111111").as_deref(),
            Some("111111111111")
        );
        assert_eq!(
            account_of("5544332211009966").as_deref(),
            Some("433221100996")
        );
        assert_eq!(account_of("123456789012"), None);
        assert_eq!(account_of(""), None);
    }
}
