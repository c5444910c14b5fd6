//! Human-readable views of a message, with card data masked.
//!
//! Masking follows the ISO 8583:1987 meaning of the field numbers (DE2 and DE34 PANs, DE35, DE36
//! and DE45 track data, DE52 PIN block, DE64 and DE128 MACs, DE96 key material, DE55 EMV data),
//! plus whatever a dialect marks `sensitive`. A dialect can add masks, never remove them.

use crate::message::Message;
use crate::sensitive::{MaskedPan, TrackData};
use crate::spec::{Dialect, Format, Sensitivity};
use crate::tlv;

/// The card data a field carries by its ISO 8583:1987 meaning.
#[must_use]
pub const fn default_sensitivity(field: u8) -> Option<Sensitivity> {
    match field {
        2 | 34 => Some(Sensitivity::Pan),
        35 | 36 | 45 => Some(Sensitivity::Track),
        52 => Some(Sensitivity::Pin),
        64 | 128 => Some(Sensitivity::Mac),
        96 => Some(Sensitivity::Key),
        55 => Some(Sensitivity::Icc),
        _ => None,
    }
}

/// One field as shown to people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldView {
    /// Field number.
    pub number: u8,
    /// Field name from the dialect (empty when described without one).
    pub name: String,
    /// Format from the dialect (empty when described without one).
    pub format: &'static str,
    /// Length of the canonical value.
    pub length: usize,
    /// The value: text as is, binary as hex, card data masked.
    pub value: String,
    /// Whether the value was masked.
    pub masked: bool,
}

/// The text shown for one value: text as is, binary as hex, card data masked.
fn render(number: u8, value: &[u8], spec: Option<&crate::spec::FieldSpec>) -> (String, bool) {
    let sensitivity = default_sensitivity(number).or(spec.and_then(|s| s.sensitive));
    let binary = spec.map_or_else(
        || !value.iter().all(|b| (b' '..=b'~').contains(b)),
        |s| s.format == Format::B,
    );
    let shown = match sensitivity {
        Some(Sensitivity::Pan) => MaskedPan::of(value).to_string(),
        Some(Sensitivity::Track) => TrackData::new(value).to_string(),
        Some(Sensitivity::Pin) => format!("[PIN block, {} bytes]", value.len()),
        Some(Sensitivity::Mac) => format!("[MAC, {} bytes]", value.len()),
        Some(Sensitivity::Key) => format!("[key, {} bytes]", value.len()),
        Some(Sensitivity::Icc) => match tlv::parse(value) {
            Ok(tlvs) => tlvs
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => format!("[unparsable ICC data, {} bytes: {e}]", value.len()),
        },
        None if binary => value.iter().map(|b| format!("{b:02X}")).collect(),
        None => String::from_utf8_lossy(value).into_owned(),
    };
    (shown, sensitivity.is_some())
}

/// Describes every field of a message; binary values (by the dialect's format, or any value that
/// is not printable text when no dialect is given) are shown in hex.
pub(crate) fn describe_fields(msg: &Message, dialect: Option<&Dialect>) -> Vec<FieldView> {
    msg.fields()
        .map(|(number, value)| {
            let spec = dialect.and_then(|d| d.field(number));
            let (value_text, masked) = render(number, value, spec);
            FieldView {
                number,
                name: spec.map(|s| s.name.to_string()).unwrap_or_default(),
                format: spec.map_or("", |s| s.format.as_str()),
                length: value.len(),
                value: value_text,
                masked,
            }
        })
        .collect()
}

fn push_number(out: &mut String, n: u8) {
    if n >= 100 {
        out.push(char::from(b'0' + n / 100));
    }
    if n >= 10 {
        out.push(char::from(b'0' + n / 10 % 10));
    }
    out.push(char::from(b'0' + n % 10));
}

impl Message {
    /// Every field as shown to people, card data masked, names and formats from the dialect.
    #[must_use]
    pub fn describe(&self, dialect: &Dialect) -> Vec<FieldView> {
        describe_fields(self, Some(dialect))
    }

    /// The masked field list as one compact JSON object, `{"mti":"0100","2":"476173******0010",...}`,
    /// written straight into a string (no intermediate map): what a journal row stores.
    #[must_use]
    pub fn summary_json(&self, dialect: &Dialect) -> String {
        let mut out = String::with_capacity(64 + self.data.len() * 2);
        out.push_str("{\"mti\":\"");
        out.push_str(self.mti().as_str());
        out.push('"');
        for (number, value) in self.fields() {
            let spec = dialect.field(number);
            out.push_str(",\"");
            push_number(&mut out, number);
            out.push_str("\":\"");
            let sensitive = default_sensitivity(number)
                .or(spec.and_then(|s| s.sensitive))
                .is_some();
            let binary = spec.map_or_else(
                || !value.iter().all(|b| (b' '..=b'~').contains(b)),
                |s| s.format == Format::B,
            );
            match (sensitive, binary, std::str::from_utf8(value)) {
                // The common case, written straight in: plain text without characters to escape.
                (false, false, Ok(text))
                    if !text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) =>
                {
                    out.push_str(text);
                }
                (false, true, _) => {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    for &b in value {
                        out.push(char::from(
                            HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0'),
                        ));
                        out.push(char::from(
                            HEX.get(usize::from(b & 0x0F)).copied().unwrap_or(b'0'),
                        ));
                    }
                }
                _ => {
                    let (text, _) = render(number, value, spec);
                    for c in text.chars() {
                        match c {
                            '"' => out.push_str("\\\""),
                            '\\' => out.push_str("\\\\"),
                            c if u32::from(c) < 0x20 => {
                                out.push_str(&format!("\\u{:04x}", u32::from(c)))
                            }
                            c => out.push(c),
                        }
                    }
                }
            }
            out.push('"');
        }
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{sample, Mti};

    #[test]
    fn description_masks_every_kind_of_card_data() {
        let d = Dialect::builtin("iso87-ascii").unwrap();
        // DE55 with the track 2 equivalent (57) and the PAN (5A) among ordinary tags.
        let icc = [
            &[0x9F, 0x27, 0x01, 0x80][..],
            &[0x57, 0x08, 0x47, 0x61, 0x73, 0x90, 0x01, 0x01, 0x00, 0x10][..],
            &[0x5A, 0x08, 0x47, 0x61, 0x73, 0x90, 0x01, 0x01, 0x00, 0x10][..],
        ]
        .concat();
        let mut msg = sample::auth_request();
        msg.set(55, &icc);
        msg.set(45, b"B4761739001010010^TEST/CARD^28122011000000000000");
        msg.set(64, &[0xAB; 8]);
        let text = format!("{:?} {:?}", msg.describe(&d), msg);
        for secret in [
            "4761739001010010",
            "47617390010100",
            "2812201114",
            "041277CD",
            "ABABABAB",
            "TEST/CARD",
        ] {
            assert!(!text.contains(secret), "{secret} shown in {text}");
        }
        let views = msg.describe(&d);
        let by = |n: u8| views.iter().find(|v| v.number == n).unwrap();
        assert_eq!(by(2).value, "476173******0010");
        assert_eq!(by(35).value, "476173******0010=***");
        assert_eq!(by(52).value, "[PIN block, 8 bytes]");
        assert_eq!(
            by(55).value,
            "9F27=80 57=[masked, 8 bytes] 5A=[masked, 8 bytes]"
        );
        assert!(by(52).masked && !by(3).masked);
        assert_eq!(by(3).value, "000000");
        assert_eq!(Message::new(Mti::AUTH_REQUEST).describe(&d), vec![]);

        // The JSON summary holds exactly the described values, and parses.
        msg.set(48, b"quote \" backslash \\ end");
        let json: serde_json::Value = serde_json::from_str(&msg.summary_json(&d)).unwrap();
        assert_eq!(json["mti"], "0100");
        for view in msg.describe(&d) {
            assert_eq!(
                json[view.number.to_string()],
                view.value.as_str(),
                "DE{}",
                view.number
            );
        }
        assert!(!msg.summary_json(&d).contains("4761739001010010"));
    }
}
