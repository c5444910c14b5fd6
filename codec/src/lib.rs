//! ISO 8583 messages for cardswitch: dialects as data, strict decoding, card data as types.
//!
//! - [`Dialect`]: a wire layout read from a TOML file (`specs/dialects/`), with
//!   [`Dialect::decode`] and [`Dialect::encode`].
//! - [`Message`]: the MTI and data elements in canonical form, with typed accessors, a builder and
//!   [`Message::response`].
//! - [`sensitive`]: PAN, track data, PIN block, MAC and key newtypes that mask and zeroize.
//! - [`tlv`]: BER-TLV for DE55.
//! - [`hsm`]: the payShield host-command vocabulary (key types, schemes, wrapped keys, PIN block
//!   formats, the account-number field, the framing).
//! - [`clearing`]: the acquirer clearing file (CSV) that reconciliation reads.
//! - `framing` (feature `framing`): tokio-util codecs for the transport length prefixes.
//!
//! The codec does no IO and never panics on input: every path returns a typed error that names
//! the element and offset and never holds a field's value.

mod builtin;
pub mod clearing;
pub mod clock;
mod codec;
mod coding;
mod describe;
mod ebcdic_tables;
pub mod error;
#[cfg(feature = "framing")]
pub mod framing;
pub mod hsm;
mod message;
pub mod sample;
pub mod sensitive;
pub mod spec;
pub mod tlv;
pub mod totals;
mod types;

pub use builtin::{BUILTIN_DIALECTS, DEFAULT_DIALECT};
pub use describe::{default_sensitivity, FieldView};
pub use error::{DecodeError, Element, EncodeError, SpecError};
pub use message::{Message, MessageBuilder, RESPONSE_ECHO_FIELDS};
pub use sensitive::{luhn_digit, KeyMaterial, Mac, MaskedPan, Pan, PinBlock, TrackData};
pub use spec::{Dialect, FieldSpec, Format, LengthKind};
pub use types::{Mti, MtiError, ProcessingCode, ResponseCode};
