//! Decoding and encoding a message in a dialect.
//!
//! The decoder walks the bitmap once, most significant bit first, and for each field does one
//! table load, one bounds check and one validation pass while copying the value into the message's
//! buffer. Every read is bounds-checked against the input before anything is allocated: a length
//! prefix can never make the decoder reserve more than the input holds.
//!
//! Why not nom here: layouts are chosen at run time from the dialect table, errors must name the
//! field and offset, and the per-field path has to stay within a few nanoseconds; a hand-written
//! loop over the compiled table does all three. nom parses the BER-TLV inside DE55 (`tlv.rs`).

use crate::coding::{
    all_in_class, ascii_to_text, char_to_ascii, digits_at, first_invalid, hex, hex_value, is_valid,
    pack_bcd, parse_bcd_number, parse_text_number, printable_at, text_to_ascii, to_charset, unhex,
    unpack_bcd, write_bcd_number, write_text_number,
};
use crate::error::{DecodeError, Element, EncodeError};
use crate::message::{bit_of, Message, Span};
use crate::spec::{
    BcdPadding, BitmapEncoding, Charset, Check, Dialect, Format, HexLength, NumericEncoding,
    PrefixCoding, Slot, ValueCoding,
};
use crate::types::Mti;

const fn invalid(element: Element, offset: usize, format: &'static str) -> DecodeError {
    DecodeError::InvalidData {
        element,
        offset,
        format,
    }
}

#[cold]
#[inline(never)]
fn unknown_field(element: Element, dialect: &Dialect) -> DecodeError {
    DecodeError::UnknownField {
        element,
        dialect: dialect.name().into(),
    }
}

/// A read past the end: a field announced by the bitmap whose first byte is already past the
/// end is missing; anything else is truncated.
#[cold]
#[inline(never)]
fn short(
    element: Element,
    offset: usize,
    needed: usize,
    len: usize,
    field_start: bool,
) -> DecodeError {
    if field_start && offset >= len {
        return DecodeError::MissingField { element, offset };
    }
    truncated(element, offset, needed, len)
}

#[cold]
#[inline(never)]
fn truncated(element: Element, offset: usize, needed: usize, len: usize) -> DecodeError {
    DecodeError::Truncated {
        element,
        offset,
        needed,
        available: len.saturating_sub(offset),
    }
}

/// The first bad byte of a value that failed the fast check, for the error.
#[cold]
#[inline(never)]
fn invalid_value(element: Element, at: usize, format: Format, value: &[u8]) -> DecodeError {
    invalid(
        element,
        at + first_invalid(format, value).unwrap_or(0),
        format.as_str(),
    )
}

impl Dialect {
    /// Decodes one message (without framing).
    ///
    /// # Errors
    /// [`DecodeError`] naming the element and offset: truncation, a bitmap bit with no data, a bad
    /// or over-long length prefix, a byte the field's format forbids, an unknown field, trailing
    /// bytes.
    pub fn decode(&self, bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut msg = Message::new(Mti::NETWORK_REQUEST);
        let extra = if self.inner().identity {
            0
        } else {
            bytes.len() + 16
        };
        msg.data.reserve_exact(bytes.len() + extra);
        self.decode_inner(bytes, &mut msg)?;
        Ok(msg)
    }

    /// Decodes into an existing message, reusing its buffers (no allocation once they are large
    /// enough). On error the message is left empty.
    ///
    /// # Errors
    /// As [`Dialect::decode`].
    pub fn decode_into(&self, bytes: &[u8], msg: &mut Message) -> Result<(), DecodeError> {
        msg.clear();
        let result = self.decode_inner(bytes, msg);
        if result.is_err() {
            msg.clear();
        }
        result
    }

    /// Reads what can be read of a message that does not decode: its MTI and the fields before
    /// the first bad one (the whole message when it decodes). `None` when not even the MTI
    /// reads. A switch uses this to answer a malformed request with a format error that still
    /// carries the request's STAN.
    #[must_use]
    pub fn decode_partial(&self, bytes: &[u8]) -> Option<Message> {
        let mut msg = Message::new(Mti::NETWORK_REQUEST);
        match self.decode_inner(bytes, &mut msg) {
            Ok(()) => Some(msg),
            Err(e) if e.element() == Some(Element::Mti) => None,
            Err(_) => {
                // Spans past the failure were never written (field 0); the bitmap was not stored.
                msg.spans.retain(|s| s.field != 0);
                msg.bits = [0; 3];
                for s in &msg.spans {
                    let (w, m) = bit_of(s.field);
                    if let Some(word) = msg.bits.get_mut(w) {
                        *word |= m;
                    }
                }
                Some(msg)
            }
        }
    }

    /// The decoder. The input is copied once into the message's buffer; fields carried as their
    /// canonical bytes (ASCII text and numerics, raw binary) are then recorded as spans of that
    /// copy, and only fields that need converting (BCD, EBCDIC, hex) are appended after it.
    fn decode_inner(&self, bytes: &[u8], msg: &mut Message) -> Result<(), DecodeError> {
        let d = self.inner();
        let len = bytes.len();
        let base = msg.data.len();
        msg.data.extend_from_slice(bytes);
        let mut pos;

        // MTI
        let mti = match d.mti {
            NumericEncoding::Text => {
                let raw = bytes
                    .get(..4)
                    .ok_or_else(|| truncated(Element::Mti, 0, 4, len))?;
                let mut a = [0u8; 4];
                for (slot, &b) in a.iter_mut().zip(raw) {
                    *slot = char_to_ascii(d.charset, b);
                }
                pos = 4;
                a
            }
            NumericEncoding::Bcd => {
                let raw = bytes
                    .get(..2)
                    .ok_or_else(|| truncated(Element::Mti, 0, 2, len))?;
                let mut a = [0u8; 4];
                for (i, slot) in a.iter_mut().enumerate() {
                    let b = raw.get(i / 2).copied().unwrap_or(0);
                    let nib = if i % 2 == 0 { b >> 4 } else { b & 0x0F };
                    *slot = if nib < 10 { b'0' + nib } else { 0xFF };
                }
                pos = 2;
                a
            }
        };
        msg.mti = Mti::new(mti).map_err(|_| invalid(Element::Mti, 0, "n"))?;

        // Bitmaps: the primary, then the secondary when bit 1 is set. The tertiary one sits where
        // field 65 would, and is read when the walk reaches it.
        let mut words = [self.read_bitmap(bytes, &mut pos, 1)?, 0, 0];
        if words[0] & (1 << 63) != 0 {
            words[1] = self.read_bitmap(bytes, &mut pos, 2)?;
            msg.force_secondary = words[1] == 0;
        }
        words[0] &= !(1 << 63);

        let tertiary_bit = if d.tertiary_bitmap { bit_of(65).1 } else { 0 };
        // One reservation for the fields the first two bitmaps announce, so that recording each
        // field is a plain store.
        let announced = usize::try_from(words[0].count_ones() + words[1].count_ones()).unwrap_or(0);
        msg.spans.resize(
            announced,
            Span {
                start: 0,
                len: 0,
                field: 0,
            },
        );
        let mut count = 0usize;
        for w in 0..3 {
            let mut bits = words.get(w).copied().unwrap_or(0);
            if w == 1 && bits & tertiary_bit != 0 {
                // Fields 2..=64 are behind us: this is where DE65 carries the tertiary bitmap.
                bits &= !tertiary_bit;
                words[2] = self.read_bitmap(bytes, &mut pos, 3)?;
                msg.force_tertiary = words[2] == 0;
            }
            let first = w * 64 + 1;
            while bits != 0 {
                let lz = bits.leading_zeros() as usize;
                bits &= !(1u64 << (63 - lz));
                // lz < 64 and w < 3, so the number is at most 192.
                let number = u8::try_from(first + lz).unwrap_or(u8::MAX);
                let element = Element::Field(number);
                let Some(slot) = d.slots.get(usize::from(number)).filter(|s| s.defined) else {
                    return Err(unknown_field(element, self));
                };
                let field_start = pos;
                let Some((start, value_len)) =
                    decode_field_fast(slot, bytes, &mut pos, base, &mut msg.data)
                else {
                    let mut at = field_start;
                    return Err(field_error(
                        slot,
                        bytes,
                        &mut at,
                        element,
                        base,
                        &mut msg.data,
                    ));
                };
                let span = Span {
                    start: u32::try_from(start).unwrap_or(u32::MAX),
                    len: u16::try_from(value_len).unwrap_or(u16::MAX),
                    field: number,
                };
                match msg.spans.get_mut(count) {
                    Some(slot) => *slot = span,
                    None => msg.spans.push(span),
                }
                count += 1;
            }
        }
        // The count above included the bitmap-indicator bits 1 and 65.
        msg.spans.truncate(count);
        if d.tertiary_bitmap {
            let (wi, m) = bit_of(65);
            if let Some(word) = words.get_mut(wi) {
                *word &= !m;
            }
        }
        msg.bits = words;

        if pos != len {
            return Err(DecodeError::TrailingBytes {
                offset: pos,
                count: len - pos,
            });
        }
        Ok(())
    }

    fn read_bitmap(&self, bytes: &[u8], pos: &mut usize, which: u8) -> Result<u64, DecodeError> {
        let element = Element::Bitmap(which);
        let d = self.inner();
        let at = *pos;
        match d.bitmap {
            BitmapEncoding::Binary => {
                let raw: [u8; 8] = bytes
                    .get(at..at + 8)
                    .and_then(|r| r.try_into().ok())
                    .ok_or_else(|| short(element, at, 8, bytes.len(), which > 1))?;
                *pos += 8;
                Ok(u64::from_be_bytes(raw))
            }
            BitmapEncoding::Hex => {
                let raw = bytes
                    .get(at..at + 16)
                    .ok_or_else(|| short(element, at, 16, bytes.len(), which > 1))?;
                let mut v = 0u64;
                for (i, &c) in raw.iter().enumerate() {
                    let nib = hex_value(d.charset, c);
                    if nib > 0x0F {
                        return Err(invalid(element, at + i, "hex"));
                    }
                    v = v << 4 | u64::from(nib);
                }
                *pos += 16;
                Ok(v)
            }
        }
    }
}

/// Decodes one field at `*pos`: the decoder's hot path. Returns where the canonical value sits in
/// `out` and its length: inside the copy of the input (which starts at `base`) when the wire form
/// is canonical, appended after it otherwise.
///
/// It only says whether the field is good: keeping the detailed error out of the return value
/// keeps the result in registers. On `None` the caller asks [`field_error`] why.
#[inline(always)]
fn decode_field_fast(
    slot: &Slot,
    bytes: &[u8],
    pos: &mut usize,
    base: usize,
    out: &mut Vec<u8>,
) -> Option<(usize, usize)> {
    let value_len = if slot.prefix_len == 0 {
        usize::from(slot.length)
    } else {
        let at = *pos;
        let raw = bytes.get(at..at + usize::from(slot.prefix_len))?;
        let count = if slot.ascii_prefix {
            raw.iter().try_fold(0usize, |acc, &c| {
                let d = c.wrapping_sub(b'0');
                (d < 10).then_some(acc * 10 + usize::from(d))
            })?
        } else {
            parse_prefix(slot, raw)?
        };
        if count > slot.prefix_count(usize::from(slot.length)) {
            return None;
        }
        *pos += raw.len();
        match slot.value {
            ValueCoding::Hex(_, HexLength::Chars) if count % 2 == 1 => return None,
            ValueCoding::Hex(_, HexLength::Chars) => count / 2,
            _ => count,
        }
    };
    let at = *pos;
    let wire_len = if slot.canonical {
        value_len
    } else {
        slot.wire_len(value_len)
    };
    let wire = bytes.get(at..at + wire_len)?;
    *pos += wire_len;
    if slot.canonical {
        return value_ok(slot, bytes, at, wire_len).then_some((base + at, value_len));
    }
    convert_field(slot, wire, value_len, at, Element::Field(0), out).ok()
}

/// Why a field failed [`decode_field_fast`]: decodes it again from its start with every check
/// named. Never on the hot path.
#[cold]
#[inline(never)]
fn field_error(
    slot: &Slot,
    bytes: &[u8],
    pos: &mut usize,
    element: Element,
    base: usize,
    out: &mut Vec<u8>,
) -> DecodeError {
    match decode_field(slot, bytes, pos, element, base, out) {
        Err(e) => e,
        // Both paths apply the same rules; should they ever disagree, the field is refused all
        // the same, as a format error at its start.
        Ok(_) => invalid(element, *pos, slot.format.as_str()),
    }
}

/// Decodes one field at `*pos`, with the detailed error when it fails.
fn decode_field(
    slot: &Slot,
    bytes: &[u8],
    pos: &mut usize,
    element: Element,
    base: usize,
    out: &mut Vec<u8>,
) -> Result<(usize, usize), DecodeError> {
    let value_len = if slot.prefix_len == 0 {
        usize::from(slot.length)
    } else {
        let prefix_at = *pos;
        let plen = usize::from(slot.prefix_len);
        let raw = bytes
            .get(prefix_at..prefix_at + plen)
            .ok_or_else(|| short(element, prefix_at, plen, bytes.len(), true))?;
        let count = if slot.ascii_prefix {
            let mut count = 0usize;
            for &c in raw {
                let d = c.wrapping_sub(b'0');
                if d > 9 {
                    return Err(DecodeError::BadLengthPrefix {
                        element,
                        offset: prefix_at,
                    });
                }
                count = count * 10 + usize::from(d);
            }
            count
        } else {
            parse_prefix(slot, raw).ok_or(DecodeError::BadLengthPrefix {
                element,
                offset: prefix_at,
            })?
        };
        *pos += plen;
        value_len_of(slot, count, element, prefix_at)?
    };
    let at = *pos;
    let wire_len = if slot.canonical {
        value_len
    } else {
        slot.wire_len(value_len)
    };
    let wire = bytes
        .get(at..at + wire_len)
        .ok_or_else(|| short(element, at, wire_len, bytes.len(), slot.prefix_len == 0))?;
    *pos += wire_len;
    if slot.canonical {
        if !value_ok(slot, bytes, at, wire_len) {
            return Err(invalid_value(element, at, slot.format, wire));
        }
        return Ok((base + at, value_len));
    }
    convert_field(slot, wire, value_len, at, element, out)
}

/// A length prefix in BCD, binary or an EBCDIC charset.
#[inline(never)]
fn parse_prefix(slot: &Slot, raw: &[u8]) -> Option<usize> {
    match slot.prefix {
        PrefixCoding::Text(cs) => parse_text_number(cs, raw),
        PrefixCoding::Bcd => parse_bcd_number(raw),
        PrefixCoding::Binary => Some(raw.iter().fold(0usize, |acc, &b| acc << 8 | usize::from(b))),
    }
}

/// Checks a prefix's count against the maximum and turns it into value units.
#[inline(always)]
fn value_len_of(
    slot: &Slot,
    count: usize,
    element: Element,
    offset: usize,
) -> Result<usize, DecodeError> {
    let max = slot.prefix_count(usize::from(slot.length));
    if count > max {
        return Err(DecodeError::LengthTooLong {
            element,
            offset,
            length: count,
            max,
        });
    }
    match slot.value {
        ValueCoding::Hex(_, HexLength::Chars) if count % 2 == 1 => Err(DecodeError::BadLength {
            element,
            offset,
            length: count,
        }),
        ValueCoding::Hex(_, HexLength::Chars) => Ok(count / 2),
        _ => Ok(count),
    }
}

/// The content check of a canonical value `data[at..at + len]`.
#[inline(always)]
fn value_ok(slot: &Slot, data: &[u8], at: usize, len: usize) -> bool {
    match slot.check {
        Check::None => true,
        Check::Digits => digits_at(data, at, len),
        Check::Printable => printable_at(data, at, len),
        Check::Bytewise => all_in_class(slot.format, data.get(at..at + len).unwrap_or_default()),
    }
}

/// Converts a value whose wire form is not canonical (BCD, EBCDIC, hex), appending it to `out`.
#[inline(never)]
fn convert_field(
    slot: &Slot,
    wire: &[u8],
    value_len: usize,
    at: usize,
    element: Element,
    out: &mut Vec<u8>,
) -> Result<(usize, usize), DecodeError> {
    let format = slot.format.as_str();
    let start = out.len();
    match slot.value {
        ValueCoding::Text(cs) => {
            text_to_ascii(cs, wire, out).map_err(|i| invalid(element, at + i, format))?;
            let value = out.get(start..).unwrap_or_default();
            if !is_valid(slot.format, value) {
                return Err(invalid_value(element, at, slot.format, value));
            }
        }
        ValueCoding::Bcd(padding, cs) => {
            let pad_left = padding == BcdPadding::Left;
            if slot.format == Format::XN {
                let (sign, digits) = wire.split_first().ok_or(invalid(element, at, format))?;
                let sign = char_to_ascii(cs, *sign);
                if sign != b'C' && sign != b'D' {
                    return Err(invalid(element, at, format));
                }
                out.push(sign);
                unpack_bcd(digits, value_len - 1, pad_left, false, out)
                    .map_err(|i| invalid(element, at + 1 + i, format))?;
            } else {
                unpack_bcd(wire, value_len, pad_left, slot.format == Format::Z, out)
                    .map_err(|i| invalid(element, at + i, format))?;
            }
        }
        ValueCoding::Hex(cs, _) => {
            unhex(cs, wire, out).map_err(|i| invalid(element, at + i, "hex"))?
        }
        ValueCoding::Raw => out.extend_from_slice(wire),
    }
    Ok((start, out.len() - start))
}

impl Dialect {
    /// Encodes a message (without framing), appending to `out`.
    ///
    /// # Errors
    /// [`EncodeError`] when a field is not defined by the dialect, has the wrong length or holds a
    /// byte its format forbids. `out` is left as it was.
    pub fn encode(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.encode_inner(msg, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// Encodes a message into a new buffer.
    ///
    /// # Errors
    /// As [`Dialect::encode`].
    pub fn encode_to_vec(&self, msg: &Message) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(msg.data.len() + msg.spans.len() * 3 + 32);
        self.encode(msg, &mut out)?;
        Ok(out)
    }

    /// The MAC field a message uses: 128 when it has a secondary bitmap (any field above 64),
    /// 64 otherwise. Either way the MAC is the message's last field.
    #[must_use]
    pub fn mac_field(msg: &Message) -> u8 {
        if msg.field_numbers().any(|f| f > 64 && f != 128) {
            128
        } else {
            64
        }
    }

    /// Bytes on the wire of an 8-byte MAC in `field` (fixed `b` 8), if the dialect defines it so.
    fn mac_width(&self, field: u8) -> Option<usize> {
        let spec = self.field(field)?;
        if spec.format != crate::Format::B
            || spec.kind != crate::LengthKind::Fixed
            || spec.length != 8
        {
            return None;
        }
        Some(match spec.value {
            crate::spec::ValueCoding::Hex(..) => 16,
            _ => 8,
        })
    }

    /// What a MAC covers in a received frame body: everything before the MAC field (the MTI,
    /// bitmaps with the MAC bit set, and every other field), and the MAC itself. `None` when
    /// the message carries no MAC in its last field.
    #[must_use]
    pub fn mac_span<'a>(&self, body: &'a [u8], msg: &'a Message) -> Option<(&'a [u8], &'a [u8])> {
        let field = Self::mac_field(msg);
        let mac = msg.get(field)?;
        let width = self.mac_width(field)?;
        let data = body.get(..body.len().checked_sub(width)?)?;
        Some((data, mac))
    }

    /// Replaces any MAC by a zero MAC in the message's MAC field (64, or 128 with a secondary bitmap) and
    /// returns the field number and the bytes the MAC must cover. Set the real MAC with
    /// `msg.set(field, mac)` afterwards; the covered bytes do not change.
    ///
    /// # Errors
    /// As [`Dialect::encode`], or a dialect whose MAC field is not fixed `b` 8.
    pub fn mac_input(&self, msg: &mut Message) -> Result<(u8, Vec<u8>), EncodeError> {
        // Any MAC already there (a copy of another message's) goes first.
        msg.remove(64);
        msg.remove(128);
        let field = Self::mac_field(msg);
        msg.set(field, &[0; 8]);
        let width = self
            .mac_width(field)
            .ok_or_else(|| EncodeError::UnknownField {
                element: Element::Field(field),
                dialect: self.name().into(),
            })?;
        let mut out = self.encode_to_vec(msg)?;
        out.truncate(out.len().saturating_sub(width));
        Ok((field, out))
    }

    fn encode_inner(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let d = self.inner();
        match d.mti {
            NumericEncoding::Text => {
                ascii_to_text(d.charset, msg.mti.as_bytes(), out).map_err(|_| {
                    EncodeError::InvalidData {
                        element: Element::Mti,
                        position: 0,
                        format: "n",
                    }
                })?
            }
            NumericEncoding::Bcd => pack_bcd(msg.mti.as_bytes(), true, out),
        }
        let mut words = msg.bits;
        if !d.tertiary_bitmap && words[2] != 0 {
            let field = u8::try_from(128 + words[2].leading_zeros() + 1).unwrap_or(u8::MAX);
            return Err(EncodeError::UnknownField {
                element: Element::Field(field),
                dialect: d.name.clone(),
            });
        }
        let tertiary = d.tertiary_bitmap && (words[2] != 0 || msg.force_tertiary);
        if tertiary {
            words[1] |= bit_of(65).1;
        }
        let secondary = words[1] != 0 || msg.force_secondary;
        if secondary {
            words[0] |= 1 << 63;
        }
        self.write_bitmap(words[0], out);
        if secondary {
            self.write_bitmap(words[1], out);
        }
        let mut tertiary_pending = tertiary;
        for span in &msg.spans {
            let number = span.field;
            let start = span.start as usize;
            let len = usize::from(span.len);
            let value = msg.data.get(start..start + len).unwrap_or_default();
            if tertiary_pending && number > 65 {
                self.write_bitmap(words[2], out);
                tertiary_pending = false;
            }
            let element = Element::Field(number);
            let slot = match d.slots.get(usize::from(number)) {
                Some(slot) if slot.defined => slot,
                _ => {
                    return Err(EncodeError::UnknownField {
                        element,
                        dialect: d.name.clone(),
                    })
                }
            };
            if !value_ok(slot, &msg.data, start, len) {
                return Err(encode_data_error(slot, element, value));
            }
            encode_field(slot, value, element, out)?;
        }
        if tertiary_pending {
            self.write_bitmap(words[2], out);
        }
        Ok(())
    }

    fn write_bitmap(&self, word: u64, out: &mut Vec<u8>) {
        let d = self.inner();
        match d.bitmap {
            BitmapEncoding::Binary => out.extend_from_slice(&word.to_be_bytes()),
            BitmapEncoding::Hex => hex(d.charset, &word.to_be_bytes(), out),
        }
    }
}

#[cold]
#[inline(never)]
fn encode_length_error(slot: &Slot, element: Element, len: usize) -> EncodeError {
    let max = usize::from(slot.length);
    let expected = if slot.prefix_len == 0 {
        max.to_string()
    } else {
        format!("at most {max}")
    };
    EncodeError::BadLength {
        element,
        length: len,
        expected,
    }
}

#[cold]
#[inline(never)]
fn encode_data_error(slot: &Slot, element: Element, value: &[u8]) -> EncodeError {
    let position = first_invalid(slot.format, value).unwrap_or(0);
    EncodeError::InvalidData {
        element,
        position,
        format: slot.format.as_str(),
    }
}

#[inline(always)]
fn encode_field(
    slot: &Slot,
    value: &[u8],
    element: Element,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let len = value.len();
    let max = usize::from(slot.length);
    if len > max || (slot.prefix_len == 0 && len != max) {
        return Err(encode_length_error(slot, element, len));
    }
    if slot.prefix_len != 0 {
        let count = slot.prefix_count(len);
        match (slot.prefix, slot.digits) {
            (PrefixCoding::Text(Charset::Ascii), 2) => {
                // count <= 99, checked when the dialect was loaded
                out.extend_from_slice(&[b'0' + digit(count / 10), b'0' + digit(count)]);
            }
            (PrefixCoding::Text(Charset::Ascii), 3) => {
                out.extend_from_slice(&[
                    b'0' + digit(count / 100),
                    b'0' + digit(count / 10),
                    b'0' + digit(count),
                ]);
            }
            (PrefixCoding::Text(cs), digits) => {
                write_text_number(cs, count, usize::from(digits), out)
            }
            (PrefixCoding::Bcd, _) => write_bcd_number(count, usize::from(slot.prefix_len), out),
            (PrefixCoding::Binary, _) => {
                let be = count.to_be_bytes();
                out.extend_from_slice(
                    be.get(be.len() - usize::from(slot.prefix_len)..)
                        .unwrap_or_default(),
                );
            }
        }
    }
    match slot.value {
        ValueCoding::Text(cs) => {
            ascii_to_text(cs, value, out).map_err(|_| encode_data_error(slot, element, value))?;
        }
        ValueCoding::Bcd(padding, cs) => {
            let pad_left = padding == BcdPadding::Left;
            match (slot.format, value.split_first()) {
                (Format::XN, Some((&sign, digits))) => {
                    out.push(to_charset(cs, sign));
                    pack_bcd(digits, pad_left, out);
                }
                _ => pack_bcd(value, pad_left, out),
            }
        }
        ValueCoding::Raw => out.extend_from_slice(value),
        ValueCoding::Hex(cs, _) => hex(cs, value, out),
    }
    Ok(())
}

/// The last decimal digit of `n`.
#[inline(always)]
fn digit(n: usize) -> u8 {
    u8::try_from(n % 10).unwrap_or(0)
}

#[cfg(test)]
mod mac_tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use crate::{Dialect, Message, Mti};

    #[test]
    fn mac_input_is_the_frame_without_its_mac() {
        for name in ["iso87-ascii", "iso87-bcd", "iso87-ascii-hexbitmap"] {
            let d = Dialect::load(name).unwrap();
            let mut m = Message::builder(Mti::AUTH_REQUEST)
                .field(2, "4761739001010010")
                .field(3, "000000")
                .field(4, "000000001000")
                .field(11, "000001")
                .build();
            let (field, data) = d.mac_input(&mut m).unwrap();
            assert_eq!(field, 64);
            m.set(field, &[1, 2, 3, 4, 5, 6, 7, 8]);
            let body = d.encode_to_vec(&m).unwrap();
            let decoded = d.decode(&body).unwrap();
            let (covered, mac) = d.mac_span(&body, &decoded).unwrap();
            assert_eq!(covered, &data[..], "{name}");
            assert_eq!(mac, &[1, 2, 3, 4, 5, 6, 7, 8]);
            // With a secondary bitmap the MAC goes in 128.
            let mut m2 = m.clone();
            m2.remove(64);
            m2.set(90, b"010000000107010000000000000000000000000000");
            assert_eq!(d.mac_input(&mut m2).unwrap().0, 128);
            assert!(!m2.has(64));
        }
    }
}
