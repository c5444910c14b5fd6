//! BER-TLV, as carried in DE55 (EMV ICC data).
//!
//! Tags are one to four bytes (a first byte whose low five bits are all set announces more;
//! following bytes continue while their top bit is set). Lengths are one byte below 0x80, or 0x81,
//! 0x82 or 0x83 followed by one to three length bytes. The form of each length is kept, so that
//! encoding what was decoded gives the same bytes even when the sender used a long form for a short
//! value.
//!
//! Values of tags that hold card data (track 2 equivalent 57, PAN 5A, ...) are masked by `Debug`
//! and zeroed on drop.

use std::fmt;

use nom::bytes::complete::take;
use nom::number::complete::u8 as byte;
use nom::IResult;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Tags whose value is card data: 56 track 1 equivalent, 57 track 2 equivalent, 5A PAN, 5F20
/// cardholder name, 9F1F track 1 discretionary data, 9F20 track 2 discretionary data, 9F6B track
/// 2 data (contactless).
pub const SENSITIVE_TAGS: &[u32] = &[0x56, 0x57, 0x5A, 0x5F20, 0x9F1F, 0x9F20, 0x9F6B];

/// Why ICC data could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlvError {
    /// The data ends inside a tag, a length or a value.
    #[error("TLV truncated at offset {0}")]
    Truncated(usize),
    /// A tag longer than four bytes.
    #[error("TLV tag too long at offset {0}")]
    TagTooLong(usize),
    /// A length form that is not supported (indefinite 0x80, or more than three length bytes).
    #[error("TLV length form not supported at offset {0}")]
    BadLength(usize),
}

/// How a length was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Zeroize)]
pub enum LengthForm {
    /// One byte, 0x00..=0x7F.
    Short,
    /// 0x8N followed by N bytes (N = 1..=3).
    Long(u8),
}

/// One data object: a tag and its value.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Tlv {
    #[zeroize(skip)]
    tag: u32,
    #[zeroize(skip)]
    tag_len: u8,
    #[zeroize(skip)]
    form: LengthForm,
    value: Vec<u8>,
}

impl Tlv {
    /// A data object with the shortest length form.
    ///
    /// The tag is given as its bytes read big-endian (`0x9F26`).
    #[must_use]
    pub fn new(tag: u32, value: &[u8]) -> Self {
        let tag_len = u8::try_from((4 - tag.leading_zeros() / 8).max(1)).unwrap_or(4);
        let form = match value.len() {
            0..=0x7F => LengthForm::Short,
            0x80..=0xFF => LengthForm::Long(1),
            0x100..=0xFFFF => LengthForm::Long(2),
            _ => LengthForm::Long(3),
        };
        Self {
            tag,
            tag_len,
            form,
            value: value.to_vec(),
        }
    }

    /// The tag (`0x9F26`).
    #[must_use]
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The tag in the usual hex spelling (`9F26`).
    #[must_use]
    pub fn tag_hex(&self) -> String {
        format!(
            "{:0width$X}",
            self.tag,
            width = usize::from(self.tag_len) * 2
        )
    }

    /// The value. For a tag in [`SENSITIVE_TAGS`] this is card data.
    #[must_use]
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// How the length was written.
    #[must_use]
    pub fn length_form(&self) -> LengthForm {
        self.form
    }

    /// Whether the tag holds card data.
    #[must_use]
    pub fn is_sensitive(&self) -> bool {
        SENSITIVE_TAGS.contains(&self.tag)
    }

    /// Whether the value is itself a list of data objects (bit 6 of the first tag byte).
    #[must_use]
    pub fn is_constructed(&self) -> bool {
        let first = self.tag >> ((u32::from(self.tag_len) - 1) * 8);
        first & 0x20 != 0
    }

    /// The value shown for people: hex, or a mask for card data.
    #[must_use]
    pub fn display_value(&self) -> String {
        if self.is_sensitive() {
            format!("[masked, {} bytes]", self.value.len())
        } else {
            self.value.iter().map(|b| format!("{b:02X}")).collect()
        }
    }
}

impl fmt::Debug for Tlv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.tag_hex(), self.display_value())
    }
}

fn tag(input: &[u8]) -> IResult<&[u8], (u32, u8)> {
    let (mut rest, first) = byte(input)?;
    let mut tag = u32::from(first);
    let mut len = 1u8;
    if first & 0x1F == 0x1F {
        loop {
            let (r, b) = byte(rest)?;
            rest = r;
            len += 1;
            if len > 4 {
                return Err(nom::Err::Failure(nom::error::Error::new(
                    input,
                    nom::error::ErrorKind::TooLarge,
                )));
            }
            tag = tag << 8 | u32::from(b);
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    Ok((rest, (tag, len)))
}

fn length(input: &[u8]) -> IResult<&[u8], (usize, LengthForm)> {
    let (rest, first) = byte(input)?;
    match first {
        0..=0x7F => Ok((rest, (usize::from(first), LengthForm::Short))),
        0x81..=0x83 => {
            let n = first & 0x7F;
            let (rest, bytes) = take(n)(rest)?;
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
            Ok((rest, (len, LengthForm::Long(n))))
        }
        _ => Err(nom::Err::Failure(nom::error::Error::new(
            input,
            nom::error::ErrorKind::LengthValue,
        ))),
    }
}

/// Parses a sequence of data objects (the top level of DE55; call again on the value of a
/// constructed tag to go deeper).
///
/// # Errors
/// [`TlvError`] with the offset of the object that could not be read.
pub fn parse(data: &[u8]) -> Result<Vec<Tlv>, TlvError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let offset = data.len() - rest.len();
        let (r, (tag, tag_len)) = tag(rest).map_err(|e| match e {
            nom::Err::Failure(_) => TlvError::TagTooLong(offset),
            _ => TlvError::Truncated(offset),
        })?;
        let (r, (len, form)) = length(r).map_err(|e| match e {
            nom::Err::Failure(_) => TlvError::BadLength(offset),
            _ => TlvError::Truncated(offset),
        })?;
        let (r, value) = take::<_, _, nom::error::Error<&[u8]>>(len)(r)
            .map_err(|_| TlvError::Truncated(offset))?;
        out.push(Tlv {
            tag,
            tag_len,
            form,
            value: value.to_vec(),
        });
        rest = r;
    }
    Ok(out)
}

/// Writes data objects, each with the length form it carries.
pub fn encode(objects: &[Tlv], out: &mut Vec<u8>) {
    for t in objects {
        let tag_bytes = t.tag.to_be_bytes();
        out.extend_from_slice(
            tag_bytes
                .get(4 - usize::from(t.tag_len)..)
                .unwrap_or_default(),
        );
        let len = t.value.len();
        match t.form {
            LengthForm::Short => out.push(u8::try_from(len).unwrap_or(0x7F)),
            LengthForm::Long(n) => {
                out.push(0x80 | n);
                let be = len.to_be_bytes();
                out.extend_from_slice(be.get(be.len() - usize::from(n)..).unwrap_or_default());
            }
        }
        out.extend_from_slice(&t.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pyiso8583_example_and_encodes_back() {
        let data = hex::decode("9F02060000000123455F340102").unwrap();
        let tlvs = parse(&data).unwrap();
        assert_eq!(tlvs.len(), 2);
        assert_eq!(tlvs[0].tag(), 0x9F02);
        assert_eq!(tlvs[0].value(), hex::decode("000000012345").unwrap());
        assert_eq!(tlvs[1].tag_hex(), "5F34");
        assert_eq!(tlvs[1].value(), [0x02]);
        let mut out = Vec::new();
        encode(&tlvs, &mut out);
        assert_eq!(out, data);
    }

    #[test]
    fn keeps_long_length_forms_and_multi_byte_tags() {
        // 0x81 used for a short value, 0x82 for a long one, a three-byte tag.
        let mut data = hex::decode("9F260881").unwrap();
        data.truncate(2);
        data.extend_from_slice(&[0x81, 0x02, 0xAA, 0xBB]);
        data.extend_from_slice(&[0xDF, 0x81, 0x01, 0x82, 0x01, 0x00]);
        data.extend(std::iter::repeat_n(0x11, 256));
        let tlvs = parse(&data).unwrap();
        assert_eq!(tlvs[0].length_form(), LengthForm::Long(1));
        assert_eq!(tlvs[1].tag(), 0xDF8101);
        assert_eq!(tlvs[1].value().len(), 256);
        let mut out = Vec::new();
        encode(&tlvs, &mut out);
        assert_eq!(out, data);
    }

    #[test]
    fn rejects_malformed_data_with_offsets() {
        assert_eq!(parse(&[0x9F]), Err(TlvError::Truncated(0)));
        assert_eq!(parse(&[0x82, 0x02, 0x00]), Err(TlvError::Truncated(0)));
        assert_eq!(
            parse(&[0x82, 0x01, 0x00, 0x95, 0x80]),
            Err(TlvError::BadLength(3))
        );
        assert_eq!(
            parse(&[0x9F, 0x81, 0x81, 0x81, 0x01, 0x00]),
            Err(TlvError::TagTooLong(0))
        );
        assert_eq!(parse(&[0x57, 0x82, 0xFF]), Err(TlvError::Truncated(0)));
    }

    #[test]
    fn card_tags_are_masked() {
        let t = Tlv::new(
            0x57,
            &[
                0x41, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xD2, 0x51, 0x2F,
            ],
        );
        assert_eq!(format!("{t:?}"), "57=[masked, 11 bytes]");
        assert_eq!(format!("{:?}", Tlv::new(0x9F27, &[0x80])), "9F27=80");
        assert!(Tlv::new(0x70, &[]).is_constructed());
    }
}
