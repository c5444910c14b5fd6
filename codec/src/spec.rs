//! Dialects: how each data element of an ISO 8583 message is laid out on the wire.
//!
//! A dialect is data, read from a TOML file (the shipped ones live in `specs/dialects/`), validated
//! once, and compiled into a flat table indexed by field number so that the decoder does one array
//! load per field. Adding a network means adding a file, not code.
//!
//! The file has a dialect-wide `[encoding]` section and one entry per field in `[fields]`; a field
//! may override the encoding of its value (`encoding`) or of its length prefix (`length_encoding`).
//! See `specs/dialects/iso87-ascii.toml` for a commented example.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::error::SpecError;

/// Highest field number a dialect may define (three bitmaps).
pub const MAX_FIELD: u8 = 192;

/// Value class of a data element, as named in ISO 8583:1987.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum Format {
    /// Digits only.
    #[serde(rename = "n")]
    N,
    /// Letters and spaces.
    #[serde(rename = "a")]
    A,
    /// Letters, digits and spaces.
    #[serde(rename = "an")]
    An,
    /// Printable ASCII.
    #[serde(rename = "ans")]
    Ans,
    /// Binary data.
    #[serde(rename = "b")]
    B,
    /// Track data: digits and the `=` separator (`D` nibble in BCD).
    #[serde(rename = "z")]
    Z,
    /// Signed amount: `C` (credit) or `D` (debit) then digits.
    #[serde(rename = "x+n")]
    XN,
}

impl Format {
    /// The spelling used in dialect files.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::N => "n",
            Self::A => "a",
            Self::An => "an",
            Self::Ans => "ans",
            Self::B => "b",
            Self::Z => "z",
            Self::XN => "x+n",
        }
    }
}

/// Fixed length or the number of digits in a variable-length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum LengthKind {
    /// Fixed length: the value always has exactly `length` units.
    #[serde(rename = "fixed")]
    Fixed,
    /// Two-digit length prefix (up to 99).
    #[serde(rename = "LL")]
    LL,
    /// Three-digit length prefix (up to 999).
    #[serde(rename = "LLL")]
    LLL,
    /// Four-digit length prefix (up to 9999).
    #[serde(rename = "LLLL")]
    LLLL,
}

impl LengthKind {
    /// Number of decimal digits in the prefix (0 for fixed).
    #[must_use]
    pub const fn digits(self) -> u8 {
        match self {
            Self::Fixed => 0,
            Self::LL => 2,
            Self::LLL => 3,
            Self::LLLL => 4,
        }
    }
}

/// Character set of text on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum Charset {
    /// ASCII.
    #[serde(rename = "ascii")]
    Ascii,
    /// EBCDIC code page 037 (US/Canada).
    #[serde(rename = "cp037")]
    Cp037,
    /// EBCDIC code page 500 (international).
    #[serde(rename = "cp500")]
    Cp500,
}

/// How a numeric value (n, z, x+n digits, MTI, length prefixes) is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum NumericEncoding {
    /// One character per digit, in the dialect's charset.
    #[serde(rename = "text")]
    Text,
    /// Packed BCD, two digits per byte.
    #[serde(rename = "bcd")]
    Bcd,
}

/// How binary (`b`) values are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum BinaryEncoding {
    /// The bytes themselves.
    #[serde(rename = "raw")]
    Raw,
    /// Two hexadecimal characters per byte (upper case on encode, either case on decode).
    #[serde(rename = "hex")]
    Hex,
}

/// How bitmaps are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum BitmapEncoding {
    /// Eight bytes per bitmap.
    #[serde(rename = "binary")]
    Binary,
    /// Sixteen hexadecimal characters per bitmap, in the dialect's charset.
    #[serde(rename = "hex")]
    Hex,
}

/// How length prefixes are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum PrefixEncoding {
    /// Decimal digits as characters in the dialect's charset (LL = 2 bytes).
    #[serde(rename = "text")]
    Text,
    /// Packed BCD (LL = 1 byte, LLL and LLLL = 2 bytes).
    #[serde(rename = "bcd")]
    Bcd,
    /// Big-endian binary (LL = 1 byte, LLL and LLLL = 2 bytes).
    #[serde(rename = "binary")]
    Binary,
}

/// What a length prefix of a hex-carried binary field counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum HexLength {
    /// The number of data bytes (jPOS `IFA_LLBINARY`).
    #[serde(rename = "bytes")]
    Bytes,
    /// The number of hex characters on the wire (pyiso8583 `default_ascii`).
    #[serde(rename = "chars")]
    Chars,
}

/// Where the pad nibble of an odd-length BCD value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum BcdPadding {
    /// A leading `0` nibble.
    #[serde(rename = "left")]
    Left,
    /// A trailing `F` nibble.
    #[serde(rename = "right-f")]
    RightF,
}

/// Card data carried by a field; such fields are masked when a message is described.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub enum Sensitivity {
    /// Primary account number: first 6 and last 4 digits shown.
    #[serde(rename = "pan")]
    Pan,
    /// Magnetic-stripe track data: never shown.
    #[serde(rename = "track")]
    Track,
    /// PIN block: never shown.
    #[serde(rename = "pin")]
    Pin,
    /// Message authentication code: never shown.
    #[serde(rename = "mac")]
    Mac,
    /// Key material: never shown.
    #[serde(rename = "key")]
    Key,
    /// EMV data (BER-TLV): shown tag by tag with card tags masked.
    #[serde(rename = "icc")]
    Icc,
}

/// One field's layout, compiled from the dialect file.
#[derive(Debug, Clone)]
pub struct FieldSpec {
    /// Field number (2..=192).
    pub number: u8,
    /// Human-readable name.
    pub name: Box<str>,
    /// Value class.
    pub format: Format,
    /// Fixed or variable length.
    pub kind: LengthKind,
    /// Fixed length, or the maximum for variable fields, in units of the value (digits,
    /// characters or bytes).
    pub length: u16,
    /// Card data this field carries, if any.
    pub sensitive: Option<Sensitivity>,
    pub(crate) value: ValueCoding,
    pub(crate) prefix: PrefixCoding,
}

/// How the value bytes of one field are coded; resolved from dialect defaults and overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueCoding {
    /// Characters in a charset (n, a, an, ans, z, x+n as text).
    Text(Charset),
    /// Packed BCD digits (n, z) with the given padding; x+n puts the sign as a text char first.
    Bcd(BcdPadding, Charset),
    /// Raw bytes (b).
    Raw,
    /// Hex characters in a charset (b).
    Hex(Charset, HexLength),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefixCoding {
    Text(Charset),
    Bcd,
    Binary,
}

/// A validated dialect, cheap to clone and share between connections.
#[derive(Clone)]
pub struct Dialect {
    inner: Arc<DialectInner>,
}

pub(crate) struct DialectInner {
    pub(crate) name: Box<str>,
    pub(crate) description: Box<str>,
    pub(crate) charset: Charset,
    pub(crate) mti: NumericEncoding,
    pub(crate) bitmap: BitmapEncoding,
    pub(crate) tertiary_bitmap: bool,
    /// Indexed by field number; `None` for fields the dialect does not define.
    pub(crate) fields: Vec<Option<FieldSpec>>,
    /// The same layouts packed for the decoder's loop: 193 small `Copy` entries (about 2 KB),
    /// indexed by field number, so that a field costs one load from L1.
    pub(crate) slots: Vec<Slot>,
    /// Every defined field is carried as its canonical bytes (ASCII text, raw binary): a decoded
    /// message can then point into one copy of the input instead of converting field by field.
    pub(crate) identity: bool,
}

/// One field's layout as the decoder and encoder use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) defined: bool,
    pub(crate) format: Format,
    pub(crate) value: ValueCoding,
    pub(crate) prefix: PrefixCoding,
    /// Bytes of the length prefix (0 for fixed fields).
    pub(crate) prefix_len: u8,
    /// Digits of the length prefix (0 for fixed fields).
    pub(crate) digits: u8,
    /// Fixed length, or maximum, in value units.
    pub(crate) length: u16,
    /// The wire bytes are the canonical value (ASCII text, raw binary): no conversion.
    pub(crate) canonical: bool,
    /// The length prefix is ASCII digits.
    pub(crate) ascii_prefix: bool,
    /// The content check the value needs, flattened for the decoder's loop.
    pub(crate) check: Check,
}

/// Content checks, by cost: none, the two word-at-a-time ones, and the byte loop for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    None,
    Digits,
    Printable,
    Bytewise,
}

impl Check {
    const fn of(format: Format) -> Self {
        match format {
            Format::B => Self::None,
            Format::N => Self::Digits,
            Format::Ans => Self::Printable,
            _ => Self::Bytewise,
        }
    }
}

impl Slot {
    const UNDEFINED: Self = Self {
        defined: false,
        format: Format::B,
        value: ValueCoding::Raw,
        prefix: PrefixCoding::Binary,
        prefix_len: 0,
        digits: 0,
        length: 0,
        canonical: true,
        ascii_prefix: false,
        check: Check::None,
    };

    /// Bytes on the wire for a value of `len` units (excluding the prefix).
    #[inline]
    pub(crate) fn wire_len(&self, len: usize) -> usize {
        match self.value {
            ValueCoding::Text(_) | ValueCoding::Raw => len,
            ValueCoding::Hex(..) => len * 2,
            ValueCoding::Bcd(..) => {
                if self.format == Format::XN {
                    1 + len.saturating_sub(1).div_ceil(2)
                } else {
                    len.div_ceil(2)
                }
            }
        }
    }

    /// The number a length prefix carries for a value of `len` units.
    #[inline]
    pub(crate) fn prefix_count(&self, len: usize) -> usize {
        match self.value {
            ValueCoding::Hex(_, HexLength::Chars) => len * 2,
            _ => len,
        }
    }
}

impl fmt::Debug for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialect")
            .field("name", &self.inner.name)
            .field("fields", &self.fields().count())
            .finish_non_exhaustive()
    }
}

// ---- the file format -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DialectFile {
    name: String,
    #[serde(default)]
    description: String,
    /// A shipped dialect's name or a file (relative to this one) whose encoding and fields this
    /// file starts from; its own `[encoding]` and fields then replace the base's.
    #[serde(default)]
    extends: Option<String>,
    #[serde(default)]
    encoding: Option<EncodingSection>,
    #[serde(default)]
    fields: BTreeMap<String, FieldEntry>,
}

/// How deep `extends` chains may go (a guard against a file extending itself).
const MAX_EXTENDS_DEPTH: usize = 4;

fn parse_file(origin: &str, text: &str, depth: usize) -> Result<DialectFile, SpecError> {
    let mut file: DialectFile = toml::from_str(text).map_err(|e| SpecError {
        origin: origin.into(),
        field: None,
        problem: e.message().to_owned() + &span_hint(text, e.span()),
    })?;
    let Some(base_name) = file.extends.take() else {
        return Ok(file);
    };
    let err = |problem: String| SpecError {
        origin: origin.into(),
        field: None,
        problem,
    };
    if depth >= MAX_EXTENDS_DEPTH {
        return Err(err(format!(
            "`extends` chains deeper than {MAX_EXTENDS_DEPTH}"
        )));
    }
    let (base_origin, base_text) = if base_name.ends_with(".toml") {
        let dir = std::path::Path::new(origin)
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."));
        let path = dir.join(&base_name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err(format!("cannot read base dialect {}: {e}", path.display())))?;
        (path.display().to_string(), std::borrow::Cow::Owned(text))
    } else {
        let text = crate::builtin::BUILTIN_DIALECTS
            .iter()
            .find(|(n, _)| *n == base_name)
            .map(|(_, t)| *t)
            .ok_or_else(|| err(format!("`extends`: no shipped dialect named {base_name}")))?;
        (base_name.clone(), std::borrow::Cow::Borrowed(text))
    };
    let mut base = parse_file(&base_origin, &base_text, depth + 1)?;
    base.fields.append(&mut file.fields);
    Ok(DialectFile {
        name: file.name,
        description: file.description,
        extends: None,
        encoding: file.encoding.or(base.encoding),
        fields: base.fields,
    })
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct EncodingSection {
    charset: Charset,
    mti: NumericEncoding,
    bitmap: BitmapEncoding,
    numeric: NumericEncoding,
    binary: BinaryEncoding,
    length: PrefixEncoding,
    #[serde(default = "default_hex_length")]
    hex_length: HexLength,
    #[serde(default = "default_padding")]
    bcd_padding: BcdPadding,
    #[serde(default)]
    tertiary_bitmap: bool,
}

const fn default_hex_length() -> HexLength {
    HexLength::Bytes
}
const fn default_padding() -> BcdPadding {
    BcdPadding::Left
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldEntry {
    name: String,
    format: Format,
    length: u16,
    #[serde(default = "default_kind")]
    prefix: LengthKind,
    #[serde(default)]
    sensitive: Option<Sensitivity>,
    /// Overrides the dialect's numeric or binary encoding for this field.
    #[serde(default)]
    encoding: Option<FieldEncoding>,
    #[serde(default)]
    length_encoding: Option<PrefixEncoding>,
    #[serde(default)]
    padding: Option<BcdPadding>,
}

const fn default_kind() -> LengthKind {
    LengthKind::Fixed
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum FieldEncoding {
    #[serde(rename = "text")]
    Text,
    #[serde(rename = "bcd")]
    Bcd,
    #[serde(rename = "raw")]
    Raw,
    #[serde(rename = "hex")]
    Hex,
}

impl Dialect {
    /// Parses and validates a dialect from the text of its TOML file.
    ///
    /// `origin` names the file in error messages.
    ///
    /// # Errors
    /// [`SpecError`] naming the field and the problem: a syntax error, an unknown key, a field
    /// number out of range, a length that the prefix cannot express, an encoding that does not
    /// apply to the field's format.
    pub fn from_toml(origin: &str, text: &str) -> Result<Self, SpecError> {
        compile(origin, parse_file(origin, text, 0)?)
    }

    /// Reads, parses and validates a dialect file.
    ///
    /// # Errors
    /// [`SpecError`] when the file cannot be read or does not validate.
    pub fn from_file(path: &std::path::Path) -> Result<Self, SpecError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecError {
            origin: origin.clone(),
            field: None,
            problem: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&origin, &text)
    }

    /// The dialect's name, as given in its file.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The dialect's one-line description.
    #[must_use]
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// Whether field 65 carries a tertiary bitmap (fields 129..=192).
    #[must_use]
    pub fn has_tertiary_bitmap(&self) -> bool {
        self.inner.tertiary_bitmap
    }

    /// The layout of one field, if the dialect defines it.
    #[must_use]
    pub fn field(&self, number: u8) -> Option<&FieldSpec> {
        self.inner
            .fields
            .get(usize::from(number))
            .and_then(Option::as_ref)
    }

    /// Every field the dialect defines, in number order.
    pub fn fields(&self) -> impl Iterator<Item = &FieldSpec> {
        self.inner.fields.iter().flatten()
    }

    pub(crate) fn inner(&self) -> &DialectInner {
        &self.inner
    }
}

/// Turns a byte span of the TOML text into " (line L)".
fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.and_then(|s| text.get(..s.start))
        .map(|before| format!(" (line {})", before.lines().count().max(1)))
        .unwrap_or_default()
}

fn compile(origin: &str, file: DialectFile) -> Result<Dialect, SpecError> {
    let err = |field: Option<&str>, problem: String| SpecError {
        origin: origin.into(),
        field: field.map(Into::into),
        problem,
    };
    let Some(enc) = &file.encoding else {
        return Err(err(
            None,
            "missing `[encoding]` (and no `extends` to take it from)".into(),
        ));
    };
    if file.name.trim().is_empty() {
        return Err(err(None, "`name` must not be empty".into()));
    }
    let mut fields: Vec<Option<FieldSpec>> = vec![None; usize::from(MAX_FIELD) + 1];
    for (key, entry) in file.fields {
        let number: u8 = key
            .parse()
            .ok()
            .filter(|n| (2..=MAX_FIELD).contains(n))
            .ok_or_else(|| err(Some(&key), format!("field number must be 2..={MAX_FIELD}")))?;
        let at = Some(key.as_str());
        if number == 65 && enc.tertiary_bitmap {
            return Err(err(
                at,
                "field 65 carries the tertiary bitmap in this dialect".into(),
            ));
        }
        if number > 128 && !enc.tertiary_bitmap {
            return Err(err(
                at,
                "fields above 128 need `tertiary_bitmap = true`".into(),
            ));
        }
        if entry.length == 0 {
            return Err(err(at, "length must be at least 1".into()));
        }
        let value = match (entry.format, entry.encoding) {
            (Format::B, None | Some(FieldEncoding::Raw | FieldEncoding::Hex)) => {
                let binary = match entry.encoding {
                    Some(FieldEncoding::Hex) => BinaryEncoding::Hex,
                    Some(_) => BinaryEncoding::Raw,
                    None => enc.binary,
                };
                match binary {
                    BinaryEncoding::Raw => ValueCoding::Raw,
                    BinaryEncoding::Hex => ValueCoding::Hex(enc.charset, enc.hex_length),
                }
            }
            (Format::B, Some(other)) => {
                return Err(err(
                    at,
                    format!("encoding {other:?} does not apply to a `b` field"),
                ))
            }
            (
                Format::N | Format::Z | Format::XN,
                None | Some(FieldEncoding::Text | FieldEncoding::Bcd),
            ) => {
                let numeric = match entry.encoding {
                    Some(FieldEncoding::Bcd) => NumericEncoding::Bcd,
                    Some(_) => NumericEncoding::Text,
                    None => enc.numeric,
                };
                match numeric {
                    NumericEncoding::Text => ValueCoding::Text(enc.charset),
                    NumericEncoding::Bcd => {
                        ValueCoding::Bcd(entry.padding.unwrap_or(enc.bcd_padding), enc.charset)
                    }
                }
            }
            (Format::A | Format::An | Format::Ans, None | Some(FieldEncoding::Text)) => {
                ValueCoding::Text(enc.charset)
            }
            (format, Some(other)) => {
                return Err(err(
                    at,
                    format!(
                        "encoding {other:?} does not apply to a `{}` field",
                        format.as_str()
                    ),
                ))
            }
        };
        if entry.format == Format::XN && entry.length < 2 {
            return Err(err(
                at,
                "an x+n field needs room for the sign and a digit".into(),
            ));
        }
        let prefix = match entry.length_encoding.unwrap_or(enc.length) {
            PrefixEncoding::Text => PrefixCoding::Text(enc.charset),
            PrefixEncoding::Bcd => PrefixCoding::Bcd,
            PrefixEncoding::Binary => PrefixCoding::Binary,
        };
        let spec = FieldSpec {
            number,
            name: entry.name.into_boxed_str(),
            format: entry.format,
            kind: entry.prefix,
            length: entry.length,
            sensitive: entry.sensitive,
            value,
            prefix,
        };
        // The largest value the prefix must be able to carry.
        let counted = spec.prefix_count(usize::from(spec.length));
        let limit = match (spec.kind, prefix) {
            (LengthKind::Fixed, _) => usize::MAX,
            (kind, PrefixCoding::Text(_) | PrefixCoding::Bcd) => {
                10usize.pow(u32::from(kind.digits())) - 1
            }
            (LengthKind::LL, PrefixCoding::Binary) => 0xFF,
            (_, PrefixCoding::Binary) => 0xFFFF,
        };
        if counted > limit {
            return Err(err(
                at,
                format!(
                    "length {} does not fit a {:?} prefix (at most {limit})",
                    spec.length, spec.kind
                ),
            ));
        }
        if let Some(slot) = fields.get_mut(usize::from(number)) {
            *slot = Some(spec);
        }
    }
    let slots: Vec<Slot> = fields
        .iter()
        .map(|f| match f {
            None => Slot::UNDEFINED,
            Some(f) => Slot {
                defined: true,
                format: f.format,
                value: f.value,
                prefix: f.prefix,
                prefix_len: u8::try_from(f.prefix_len()).unwrap_or(u8::MAX),
                digits: f.kind.digits(),
                length: f.length,
                canonical: matches!(
                    f.value,
                    ValueCoding::Text(Charset::Ascii) | ValueCoding::Raw
                ),
                ascii_prefix: f.prefix == PrefixCoding::Text(Charset::Ascii),
                check: Check::of(f.format),
            },
        })
        .collect();
    let identity = fields.iter().flatten().all(|f| {
        matches!(
            f.value,
            ValueCoding::Text(Charset::Ascii) | ValueCoding::Raw
        )
    });
    Ok(Dialect {
        inner: Arc::new(DialectInner {
            slots,
            identity,
            name: file.name.into_boxed_str(),
            description: file.description.into_boxed_str(),
            charset: enc.charset,
            mti: enc.mti,
            bitmap: enc.bitmap,
            tertiary_bitmap: enc.tertiary_bitmap,
            fields,
        }),
    })
}

impl FieldSpec {
    /// The number a length prefix carries for a value of `len` units.
    pub(crate) fn prefix_count(&self, len: usize) -> usize {
        match self.value {
            ValueCoding::Hex(_, HexLength::Chars) => len * 2,
            _ => len,
        }
    }

    /// Bytes the length prefix takes on the wire.
    pub(crate) fn prefix_len(&self) -> usize {
        let digits = usize::from(self.kind.digits());
        match self.prefix {
            _ if digits == 0 => 0,
            PrefixCoding::Text(_) => digits,
            PrefixCoding::Bcd | PrefixCoding::Binary => digits.div_ceil(2),
        }
    }
}
