//! The message: an MTI and a set of data elements, independent of any wire dialect.
//!
//! Values are held in canonical form: numeric, text and track fields as ASCII, binary fields as
//! their bytes. A message decoded from one dialect can therefore be encoded in another, which is
//! what a switch does between a terminal and an acquirer.
//!
//! Storage is one byte buffer plus a small sorted table of (field, offset, length); the position
//! of a field in the table is the number of present fields below it, so a look-up is a bit test
//! and a population count. The buffer is zeroed when the message is dropped, because it holds
//! card data.

use std::fmt;

use zeroize::Zeroize;

use crate::sensitive::{Mac, Pan, PinBlock, TrackData};
use crate::spec::MAX_FIELD;
use crate::tlv::{self, Tlv, TlvError};
use crate::types::{Mti, ProcessingCode, ResponseCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: u32,
    pub(crate) len: u16,
    pub(crate) field: u8,
}

/// An ISO 8583 message.
///
/// `Debug` prints every field with card data masked.
#[derive(Clone)]
pub struct Message {
    pub(crate) mti: Mti,
    /// Data-field presence, bit 0 of word 0 (MSB first) being field 1, which is never set: the
    /// bitmap indicators are derived when encoding.
    pub(crate) bits: [u64; 3],
    /// Secondary/tertiary bitmap present on the wire although no field needs it (kept so that a
    /// decoded message encodes back to the same bytes).
    pub(crate) force_secondary: bool,
    pub(crate) force_tertiary: bool,
    pub(crate) spans: Vec<Span>,
    pub(crate) data: Vec<u8>,
}

impl Drop for Message {
    fn drop(&mut self) {
        wipe(&mut self.data);
    }
}

/// Zeroes a buffer that held card data and empties it.
///
/// `fill(0)` compiles to one `memset`; `black_box` keeps the compiler from dropping it as a dead
/// store. (The `zeroize` crate writes byte by byte with volatile stores, which cost more than the
/// whole decode for a message buffer; the card-data newtypes still use it.)
#[inline]
pub(crate) fn wipe(data: &mut Vec<u8>) {
    data.fill(0);
    std::hint::black_box(&mut *data);
    data.clear();
}

#[inline]
pub(crate) const fn bit_of(field: u8) -> (usize, u64) {
    let i = (field as usize).wrapping_sub(1);
    (i / 64, 1u64 << (63 - (i % 64)))
}

/// Fields a response echoes from its request when the request carries them.
pub const RESPONSE_ECHO_FIELDS: &[u8] = &[
    2, 3, 4, 5, 6, 7, 11, 12, 13, 15, 32, 33, 37, 41, 42, 49, 50, 51, 70, 90, 95, 100, 102, 103,
];

impl Message {
    /// An empty message of the given type.
    #[must_use]
    pub fn new(mti: Mti) -> Self {
        Self {
            mti,
            bits: [0; 3],
            force_secondary: false,
            force_tertiary: false,
            spans: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Starts building a message of the given type.
    #[must_use]
    pub fn builder(mti: Mti) -> MessageBuilder {
        MessageBuilder {
            msg: Self::new(mti),
        }
    }

    /// The message type indicator.
    #[must_use]
    pub fn mti(&self) -> Mti {
        self.mti
    }

    /// Removes every field, zeroing the buffer; the capacity is kept for reuse.
    pub fn clear(&mut self) {
        wipe(&mut self.data);
        self.spans.clear();
        self.bits = [0; 3];
        self.force_secondary = false;
        self.force_tertiary = false;
    }

    /// Changes the message type.
    pub fn set_mti(&mut self, mti: Mti) {
        self.mti = mti;
    }

    /// Whether a data element is present.
    #[must_use]
    pub fn has(&self, field: u8) -> bool {
        let (w, m) = bit_of(field);
        field >= 2 && self.bits.get(w).is_some_and(|b| b & m != 0)
    }

    /// Position of a present field in the span table: the count of present fields below it.
    #[inline]
    fn slot(&self, field: u8) -> Option<usize> {
        if !self.has(field) {
            return None;
        }
        let (w, m) = bit_of(field);
        let below_in_word = self.bits.get(w).map_or(0, |b| b & !(m | (m - 1)));
        let mut rank = below_in_word.count_ones();
        for word in self.bits.iter().take(w) {
            rank += word.count_ones();
        }
        usize::try_from(rank).ok()
    }

    /// The canonical value of a field: ASCII for numeric, text and track fields, bytes for binary.
    #[must_use]
    pub fn get(&self, field: u8) -> Option<&[u8]> {
        let span = self.spans.get(self.slot(field)?)?;
        let start = span.start as usize;
        self.data.get(start..start + usize::from(span.len))
    }

    /// The value of a text or numeric field as `&str` (`None` when absent or not UTF-8).
    #[must_use]
    pub fn get_str(&self, field: u8) -> Option<&str> {
        std::str::from_utf8(self.get(field)?).ok()
    }

    /// Present field numbers in ascending order.
    pub fn field_numbers(&self) -> impl Iterator<Item = u8> + '_ {
        self.spans.iter().map(|s| s.field)
    }

    /// Present fields with their canonical values, in ascending order.
    pub fn fields(&self) -> impl Iterator<Item = (u8, &[u8])> + '_ {
        self.spans.iter().map(|s| {
            let start = s.start as usize;
            (
                s.field,
                self.data
                    .get(start..start + usize::from(s.len))
                    .unwrap_or_default(),
            )
        })
    }

    /// Number of data elements present.
    #[must_use]
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether no data element is present.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Sets a field's canonical value, replacing any previous one.
    ///
    /// Field numbers outside 2..=192, and values longer than 65,535 bytes, are ignored: no dialect
    /// can carry them. Whether the value suits the field is checked when the message is encoded.
    pub fn set(&mut self, field: u8, value: &[u8]) {
        let (Ok(len), true) = (u16::try_from(value.len()), (2..=MAX_FIELD).contains(&field)) else {
            return;
        };
        let Ok(start) = u32::try_from(self.data.len()) else {
            return;
        };
        let span = Span { start, len, field };
        if let Some(i) = self.slot(field) {
            if let Some(old) = self.spans.get_mut(i) {
                let old_range = old.start as usize..old.start as usize + usize::from(old.len);
                if let Some(bytes) = self.data.get_mut(old_range) {
                    bytes.zeroize();
                }
                *old = span;
            }
        } else {
            let (w, m) = bit_of(field);
            if let Some(word) = self.bits.get_mut(w) {
                *word |= m;
            }
            let i = self.slot(field).unwrap_or(self.spans.len());
            self.spans.insert(i, span);
        }
        self.data.extend_from_slice(value);
    }

    /// Removes a field; returns whether it was present.
    pub fn remove(&mut self, field: u8) -> bool {
        let Some(i) = self.slot(field) else {
            return false;
        };
        let span = self.spans.remove(i);
        let range = span.start as usize..span.start as usize + usize::from(span.len);
        if let Some(bytes) = self.data.get_mut(range) {
            bytes.zeroize();
        }
        let (w, m) = bit_of(field);
        if let Some(word) = self.bits.get_mut(w) {
            *word &= !m;
        }
        true
    }

    fn get_digits<const N: usize>(&self, field: u8) -> Option<u64> {
        let v = self.get(field)?;
        (v.len() == N && v.iter().all(u8::is_ascii_digit))
            .then(|| v.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')))
    }

    fn set_digits(&mut self, field: u8, value: u64, width: usize) {
        let mut buf = [b'0'; 20];
        let mut rest = value;
        let width = width.min(buf.len());
        for slot in buf.iter_mut().take(width).rev() {
            *slot = b'0' + u8::try_from(rest % 10).unwrap_or(0);
            rest /= 10;
        }
        self.set(field, buf.get(..width).unwrap_or_default());
    }

    // ---- typed accessors for common fields -------------------------------------------------

    /// DE2 primary account number.
    #[must_use]
    pub fn pan(&self) -> Option<Pan> {
        Pan::new(self.get(2)?).ok()
    }

    /// Sets DE2.
    pub fn set_pan(&mut self, pan: &Pan) {
        self.set(2, pan.expose().as_bytes());
    }

    /// DE3 processing code.
    #[must_use]
    pub fn processing_code(&self) -> Option<ProcessingCode> {
        ProcessingCode::parse(self.get(3)?)
    }

    /// Sets DE3.
    pub fn set_processing_code(&mut self, code: ProcessingCode) {
        self.set(3, &code.to_digits());
    }

    /// DE4 transaction amount in minor units.
    #[must_use]
    pub fn amount(&self) -> Option<u64> {
        self.get_digits::<12>(4)
    }

    /// Sets DE4 (minor units, twelve digits; larger values keep their low twelve digits).
    pub fn set_amount(&mut self, minor_units: u64) {
        self.set_digits(4, minor_units, 12);
    }

    /// DE7 transmission date and time, `MMDDhhmmss` (GMT).
    #[must_use]
    pub fn transmission_time(&self) -> Option<&str> {
        self.get_str(7)
    }

    /// DE11 system trace audit number.
    #[must_use]
    pub fn stan(&self) -> Option<u32> {
        self.get_digits::<6>(11).and_then(|v| u32::try_from(v).ok())
    }

    /// Sets DE11 (six digits; larger values keep their low six digits).
    pub fn set_stan(&mut self, stan: u32) {
        self.set_digits(11, u64::from(stan), 6);
    }

    /// DE12 local transaction time `hhmmss`.
    #[must_use]
    pub fn local_time(&self) -> Option<&str> {
        self.get_str(12)
    }

    /// DE13 local transaction date `MMDD`.
    #[must_use]
    pub fn local_date(&self) -> Option<&str> {
        self.get_str(13)
    }

    /// DE14 expiry date `YYMM`.
    #[must_use]
    pub fn expiry(&self) -> Option<&str> {
        self.get_str(14)
    }

    /// DE18 merchant category code.
    #[must_use]
    pub fn mcc(&self) -> Option<u16> {
        self.get_digits::<4>(18).and_then(|v| u16::try_from(v).ok())
    }

    /// DE22 point-of-service entry mode.
    #[must_use]
    pub fn pos_entry_mode(&self) -> Option<&str> {
        self.get_str(22)
    }

    /// DE25 point-of-service condition code.
    #[must_use]
    pub fn pos_condition(&self) -> Option<&str> {
        self.get_str(25)
    }

    /// DE32 acquiring institution identification code.
    #[must_use]
    pub fn acquirer_id(&self) -> Option<&str> {
        self.get_str(32)
    }

    /// DE35 track 2 data.
    #[must_use]
    pub fn track2(&self) -> Option<TrackData> {
        self.get(35).map(TrackData::new)
    }

    /// DE37 retrieval reference number.
    #[must_use]
    pub fn rrn(&self) -> Option<&str> {
        self.get_str(37)
    }

    /// DE38 authorization identification response.
    #[must_use]
    pub fn auth_code(&self) -> Option<&str> {
        self.get_str(38)
    }

    /// DE39 response code.
    #[must_use]
    pub fn response_code(&self) -> Option<ResponseCode> {
        ResponseCode::new(self.get(39)?.try_into().ok()?)
    }

    /// Sets DE39.
    pub fn set_response_code(&mut self, code: ResponseCode) {
        self.set(39, code.as_bytes());
    }

    /// DE41 card acceptor terminal identification.
    #[must_use]
    pub fn terminal_id(&self) -> Option<&str> {
        self.get_str(41)
    }

    /// DE42 card acceptor identification code (merchant id).
    #[must_use]
    pub fn merchant_id(&self) -> Option<&str> {
        self.get_str(42)
    }

    /// DE43 card acceptor name and location.
    #[must_use]
    pub fn card_acceptor_name(&self) -> Option<&str> {
        self.get_str(43)
    }

    /// DE49 transaction currency code (ISO 4217 numeric).
    #[must_use]
    pub fn currency(&self) -> Option<u16> {
        self.get_digits::<3>(49).and_then(|v| u16::try_from(v).ok())
    }

    /// DE52 PIN block.
    #[must_use]
    pub fn pin_block(&self) -> Option<PinBlock> {
        self.get(52).map(PinBlock::new)
    }

    /// DE55 ICC data parsed as BER-TLV; `None` when absent.
    #[must_use]
    pub fn icc_data(&self) -> Option<Result<Vec<Tlv>, TlvError>> {
        self.get(55).map(tlv::parse)
    }

    /// DE64 (or DE128 when the secondary bitmap is in use) message authentication code.
    #[must_use]
    pub fn mac(&self) -> Option<Mac> {
        self.get(128).or_else(|| self.get(64)).map(Mac::new)
    }

    /// DE70 network management information code.
    #[must_use]
    pub fn network_code(&self) -> Option<u16> {
        self.get_digits::<3>(70).and_then(|v| u16::try_from(v).ok())
    }

    /// DE90 original data elements.
    #[must_use]
    pub fn original_data(&self) -> Option<&str> {
        self.get_str(90)
    }

    /// The response to this request: MTI function digit + 1 (repeats folded) and the fields of
    /// [`RESPONSE_ECHO_FIELDS`] copied when present. `None` when this is not a request or advice.
    #[must_use]
    pub fn response(&self) -> Option<Self> {
        let mut out = Self::new(self.mti.response()?);
        for &f in RESPONSE_ECHO_FIELDS {
            if let Some(v) = self.get(f) {
                out.set(f, v);
            }
        }
        Some(out)
    }

    /// The response with a response code set.
    #[must_use]
    pub fn response_with(&self, code: ResponseCode) -> Option<Self> {
        let mut out = self.response()?;
        out.set_response_code(code);
        Some(out)
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.mti == other.mti
            && self.bits == other.bits
            && self.force_secondary == other.force_secondary
            && self.force_tertiary == other.force_tertiary
            && self.fields().eq(other.fields())
    }
}

impl Eq for Message {}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        map.entry(&"mti", &self.mti.as_str());
        for view in crate::describe::describe_fields(self, None) {
            map.entry(&view.number, &view.value);
        }
        map.finish()
    }
}

/// Builds a [`Message`] field by field.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    msg: Message,
}

impl MessageBuilder {
    /// Sets any field's canonical value.
    #[must_use]
    pub fn field(mut self, field: u8, value: impl AsRef<[u8]>) -> Self {
        self.msg.set(field, value.as_ref());
        self
    }

    /// DE2.
    #[must_use]
    pub fn pan(mut self, pan: &Pan) -> Self {
        self.msg.set_pan(pan);
        self
    }

    /// DE3.
    #[must_use]
    pub fn processing_code(mut self, code: ProcessingCode) -> Self {
        self.msg.set_processing_code(code);
        self
    }

    /// DE4, in minor units.
    #[must_use]
    pub fn amount(mut self, minor_units: u64) -> Self {
        self.msg.set_amount(minor_units);
        self
    }

    /// DE11.
    #[must_use]
    pub fn stan(mut self, stan: u32) -> Self {
        self.msg.set_stan(stan);
        self
    }

    /// DE39.
    #[must_use]
    pub fn response_code(mut self, code: ResponseCode) -> Self {
        self.msg.set_response_code(code);
        self
    }

    /// The message.
    #[must_use]
    pub fn build(self) -> Message {
        self.msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove_keep_fields_ordered() {
        let mut m = Message::new(Mti::AUTH_REQUEST);
        m.set(41, b"TERM0001");
        m.set(3, b"000000");
        m.set(128, &[1; 8]);
        m.set(2, b"4111111111111111");
        m.set(190, b"x");
        assert_eq!(m.field_numbers().collect::<Vec<_>>(), [2, 3, 41, 128, 190]);
        assert_eq!(m.get(41), Some(&b"TERM0001"[..]));
        m.set(3, b"200000");
        assert_eq!(
            m.processing_code().map(ProcessingCode::is_credit),
            Some(true)
        );
        assert!(m.remove(2));
        assert!(!m.remove(2));
        assert_eq!(m.get(2), None);
        assert_eq!(m.field_numbers().collect::<Vec<_>>(), [3, 41, 128, 190]);
        // Field 1 and numbers past 192 are not data elements.
        m.set(1, b"x");
        m.set(193, b"x");
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn typed_setters_format_numbers() {
        let m = Message::builder(Mti::FINANCIAL_REQUEST)
            .amount(1500)
            .stan(42)
            .build();
        assert_eq!(m.get(4), Some(&b"000000001500"[..]));
        assert_eq!(m.get(11), Some(&b"000042"[..]));
        assert_eq!(m.amount(), Some(1500));
        assert_eq!(m.stan(), Some(42));
    }

    #[test]
    fn response_echoes_and_changes_mti() {
        let pan = Pan::new(b"4111111111111111").unwrap();
        let req = Message::builder(Mti::AUTH_REQUEST)
            .pan(&pan)
            .field(3, "000000")
            .amount(100)
            .stan(7)
            .field(22, "051")
            .field(41, "TERM0001")
            .field(52, [0u8; 8])
            .build();
        let rsp = req.response_with(ResponseCode::APPROVED).unwrap();
        assert_eq!(rsp.mti(), Mti::AUTH_RESPONSE);
        assert_eq!(
            rsp.field_numbers().collect::<Vec<_>>(),
            [2, 3, 4, 11, 39, 41]
        );
        assert_eq!(rsp.response_code(), Some(ResponseCode::APPROVED));
        assert!(rsp.response().is_none());
    }

    #[test]
    fn debug_masks_card_data() {
        let m = Message::builder(Mti::AUTH_REQUEST)
            .field(2, "4111111111111111")
            .field(35, "4111111111111111=25121010000012300000")
            .field(52, [0x12u8; 8])
            .build();
        let text = format!("{m:?}");
        assert!(!text.contains("4111111111111111"), "{text}");
        assert!(text.contains("411111******1111"), "{text}");
        assert!(!text.contains("1212121212121212"), "{text}");
    }
}
