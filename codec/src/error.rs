//! Typed errors of the codec.
//!
//! Every decode error names the element it was reading and the byte offset in the message where
//! the problem starts. None of them carries a field's value: an error may end up in a log line or
//! in a reply, and a value may be a card number.

use std::fmt;

/// The element of a message an error refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Element {
    /// The message type indicator.
    Mti,
    /// The primary (1), secondary (2) or tertiary (3) bitmap.
    Bitmap(u8),
    /// A data element.
    Field(u8),
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mti => f.write_str("MTI"),
            Self::Bitmap(1) => f.write_str("primary bitmap"),
            Self::Bitmap(2) => f.write_str("secondary bitmap"),
            Self::Bitmap(_) => f.write_str("tertiary bitmap"),
            Self::Field(n) => write!(f, "DE{n}"),
        }
    }
}

/// Why a message could not be decoded.
///
/// `offset` is the position in the decoded bytes where the element (or the bad byte) starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ended inside an element.
    #[error("{element} at offset {offset}: truncated, {needed} bytes needed, {available} left")]
    Truncated {
        /// What was being read.
        element: Element,
        /// Where it starts.
        offset: usize,
        /// Bytes the element needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The bitmap announces a field but the message ends before it.
    #[error("{element} at offset {offset}: present in the bitmap but the message ends")]
    MissingField {
        /// The announced field.
        element: Element,
        /// Where its data should start (the end of the message).
        offset: usize,
    },
    /// A length prefix holds something other than digits (or BCD nibbles above 9).
    #[error("{element} at offset {offset}: length prefix is not numeric")]
    BadLengthPrefix {
        /// The field.
        element: Element,
        /// Where the prefix starts.
        offset: usize,
    },
    /// A length prefix exceeds the field's maximum.
    #[error("{element} at offset {offset}: length {length} exceeds the maximum {max}")]
    LengthTooLong {
        /// The field.
        element: Element,
        /// Where the prefix starts.
        offset: usize,
        /// The length the prefix gave.
        length: usize,
        /// The field's maximum.
        max: usize,
    },
    /// A length prefix that the field's encoding cannot hold (an odd count of hex characters).
    #[error("{element} at offset {offset}: length {length} is not valid for this field")]
    BadLength {
        /// The field.
        element: Element,
        /// Where the prefix starts.
        offset: usize,
        /// The length the prefix gave.
        length: usize,
    },
    /// A byte that the field's format does not allow (a non-digit in an `n` field, a non-hex
    /// character in a hex bitmap, a bad pad nibble, ...).
    #[error("{element} at offset {offset}: invalid {format} data")]
    InvalidData {
        /// The field.
        element: Element,
        /// The offset of the first offending byte.
        offset: usize,
        /// What the field must hold.
        format: &'static str,
    },
    /// The bitmap announces a field that the dialect does not define.
    #[error("{element}: not defined in dialect {dialect}")]
    UnknownField {
        /// The field.
        element: Element,
        /// The dialect.
        dialect: Box<str>,
    },
    /// Bytes remained after the last field announced by the bitmap.
    #[error("{count} trailing bytes at offset {offset} after the last field")]
    TrailingBytes {
        /// Where they start.
        offset: usize,
        /// How many.
        count: usize,
    },
}

impl DecodeError {
    /// The element the error refers to, if it refers to one.
    #[must_use]
    pub fn element(&self) -> Option<Element> {
        match self {
            Self::Truncated { element, .. }
            | Self::MissingField { element, .. }
            | Self::BadLengthPrefix { element, .. }
            | Self::LengthTooLong { element, .. }
            | Self::BadLength { element, .. }
            | Self::InvalidData { element, .. }
            | Self::UnknownField { element, .. } => Some(*element),
            Self::TrailingBytes { .. } => None,
        }
    }
}

/// Why a message could not be encoded in a dialect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The message holds a field that the dialect does not define.
    #[error("{element}: not defined in dialect {dialect}")]
    UnknownField {
        /// The field.
        element: Element,
        /// The dialect.
        dialect: Box<str>,
    },
    /// A fixed field's value has the wrong length, or a variable one is too long.
    #[error("{element}: length {length} does not fit (expected {expected})")]
    BadLength {
        /// The field.
        element: Element,
        /// The value's length.
        length: usize,
        /// What the dialect requires, for example `12` or `at most 19`.
        expected: String,
    },
    /// The value holds a byte the field's format does not allow.
    #[error("{element}: invalid {format} data at position {position}")]
    InvalidData {
        /// The field.
        element: Element,
        /// The position of the first offending byte in the value.
        position: usize,
        /// What the field must hold.
        format: &'static str,
    },
}

/// A dialect file that does not validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dialect {origin}{}: {problem}", field.as_ref().map(|f| format!(", field {f}")).unwrap_or_default())]
pub struct SpecError {
    /// The file (or built-in name) the dialect came from.
    pub origin: String,
    /// The field key, when the problem is in one field.
    pub field: Option<String>,
    /// What is wrong.
    pub problem: String,
}
