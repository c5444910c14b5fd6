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
    ascii_to_text, char_to_ascii, first_invalid, hex, pack_bcd, parse_bcd_number, parse_text_number,
    text_to_ascii, to_charset, unhex, unpack_bcd, write_bcd_number, write_text_number,
};
use crate::error::{DecodeError, Element, EncodeError};
use crate::message::{bit_of, Message, Span};
use crate::spec::{
    BcdPadding, BitmapEncoding, Charset, Dialect, FieldSpec, Format, HexLength, LengthKind,
    NumericEncoding, PrefixCoding, ValueCoding,
};
use crate::types::Mti;

/// A cursor over the input that produces typed errors.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn take(&mut self, n: usize, element: Element) -> Result<&'a [u8], DecodeError> {
        let available = self.bytes.len() - self.pos;
        if n > available {
            return Err(DecodeError::Truncated { element, offset: self.pos, needed: n, available });
        }
        let out = self.bytes.get(self.pos..self.pos + n).unwrap_or_default();
        self.pos += n;
        Ok(out)
    }
}

const fn invalid(element: Element, offset: usize, format: &'static str) -> DecodeError {
    DecodeError::InvalidData { element, offset, format }
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
        msg.data.reserve(bytes.len());
        self.decode_into(bytes, &mut msg)?;
        Ok(msg)
    }

    /// Decodes into an existing message, reusing its buffers (no allocation once they are large
    /// enough). On error the message is left empty.
    ///
    /// # Errors
    /// As [`Dialect::decode`].
    pub fn decode_into(&self, bytes: &[u8], msg: &mut Message) -> Result<(), DecodeError> {
        msg.data.zeroize_and_clear();
        msg.spans.clear();
        msg.bits = [0; 3];
        msg.force_secondary = false;
        msg.force_tertiary = false;
        let result = self.decode_inner(bytes, msg);
        if result.is_err() {
            msg.data.zeroize_and_clear();
            msg.spans.clear();
            msg.bits = [0; 3];
        }
        result
    }

    fn decode_inner(&self, bytes: &[u8], msg: &mut Message) -> Result<(), DecodeError> {
        let d = self.inner();
        let mut r = Reader { bytes, pos: 0 };

        // MTI
        let mti = match d.mti {
            NumericEncoding::Text => {
                let raw = r.take(4, Element::Mti)?;
                let mut a = [0u8; 4];
                for (slot, &b) in a.iter_mut().zip(raw) {
                    *slot = char_to_ascii(d.charset, b);
                }
                a
            }
            NumericEncoding::Bcd => {
                let raw = r.take(2, Element::Mti)?;
                let mut a = [0u8; 4];
                for (i, slot) in a.iter_mut().enumerate() {
                    let b = raw.get(i / 2).copied().unwrap_or(0);
                    let nib = if i % 2 == 0 { b >> 4 } else { b & 0x0F };
                    *slot = if nib < 10 { b'0' + nib } else { 0xFF };
                }
                a
            }
        };
        msg.mti = Mti::new(mti).map_err(|_| invalid(Element::Mti, 0, "n"))?;

        // Bitmaps: the primary, then the secondary when bit 1 is set. The tertiary one sits where
        // field 65 would, and is read when the walk reaches it.
        let mut words = [self.read_bitmap(&mut r, 1)?, 0, 0];
        if words[0] & (1 << 63) != 0 {
            if r.pos == bytes.len() {
                return Err(DecodeError::MissingField { element: Element::Bitmap(2), offset: r.pos });
            }
            words[1] = self.read_bitmap(&mut r, 2)?;
            msg.force_secondary = words[1] == 0;
        }
        words[0] &= !(1 << 63);

        let mut w = 0;
        while w < 3 {
            let mut bits = words.get(w).copied().unwrap_or(0);
            while bits != 0 {
                let lz = bits.leading_zeros();
                bits &= !(1u64 << (63 - lz));
                // lz < 64 and w < 3, so the number is at most 192.
                let number = u8::try_from(w * 64 + lz as usize + 1).unwrap_or(u8::MAX);
                if number == 65 && d.tertiary_bitmap {
                    if r.pos == bytes.len() {
                        return Err(DecodeError::MissingField { element: Element::Bitmap(3), offset: r.pos });
                    }
                    words[2] = self.read_bitmap(&mut r, 3)?;
                    msg.force_tertiary = words[2] == 0;
                    continue;
                }
                let element = Element::Field(number);
                let Some(spec) = d.fields.get(usize::from(number)).and_then(Option::as_ref) else {
                    return Err(DecodeError::UnknownField { element, dialect: d.name.clone() });
                };
                if r.pos == bytes.len() {
                    return Err(DecodeError::MissingField { element, offset: r.pos });
                }
                let start = msg.data.len();
                decode_field(spec, &mut r, element, &mut msg.data)?;
                let len = msg.data.len() - start;
                msg.spans.push(Span {
                    start: u32::try_from(start).unwrap_or(u32::MAX),
                    len: u16::try_from(len).unwrap_or(u16::MAX),
                    field: number,
                });
            }
            w += 1;
        }
        if d.tertiary_bitmap {
            let (wi, m) = bit_of(65);
            if let Some(word) = words.get_mut(wi) {
                *word &= !m;
            }
        }
        msg.bits = words;

        if r.pos != bytes.len() {
            return Err(DecodeError::TrailingBytes { offset: r.pos, count: bytes.len() - r.pos });
        }
        Ok(())
    }

    fn read_bitmap(&self, r: &mut Reader<'_>, which: u8) -> Result<u64, DecodeError> {
        let element = Element::Bitmap(which);
        let d = self.inner();
        match d.bitmap {
            BitmapEncoding::Binary => {
                let raw = r.take(8, element)?;
                let mut b = [0u8; 8];
                b.copy_from_slice(raw);
                Ok(u64::from_be_bytes(b))
            }
            BitmapEncoding::Hex => {
                let offset = r.pos;
                let raw = r.take(16, element)?;
                let mut v = 0u64;
                for (i, &c) in raw.iter().enumerate() {
                    let a = char_to_ascii(d.charset, c);
                    let nib = match a {
                        b'0'..=b'9' => a - b'0',
                        b'A'..=b'F' => a - b'A' + 10,
                        b'a'..=b'f' => a - b'a' + 10,
                        _ => return Err(invalid(element, offset + i, "hex")),
                    };
                    v = v << 4 | u64::from(nib);
                }
                Ok(v)
            }
        }
    }
}

/// Decodes one field's value into `out` (canonical form).
#[inline]
fn decode_field(
    spec: &FieldSpec,
    r: &mut Reader<'_>,
    element: Element,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let prefix_at = r.pos;
    let len = if spec.kind == LengthKind::Fixed {
        usize::from(spec.length)
    } else {
        let raw = r.take(spec.prefix_len(), element)?;
        let count = match spec.prefix {
            PrefixCoding::Text(cs) => parse_text_number(cs, raw),
            PrefixCoding::Bcd => parse_bcd_number(raw),
            PrefixCoding::Binary => Some(raw.iter().fold(0usize, |acc, &b| acc << 8 | usize::from(b))),
        }
        .ok_or(DecodeError::BadLengthPrefix { element, offset: prefix_at })?;
        let max = spec.prefix_count(usize::from(spec.length));
        if count > max {
            return Err(DecodeError::LengthTooLong { element, offset: prefix_at, length: count, max });
        }
        match spec.value {
            ValueCoding::Hex(_, HexLength::Chars) if count % 2 == 1 => {
                return Err(DecodeError::BadLength { element, offset: prefix_at, length: count });
            }
            ValueCoding::Hex(_, HexLength::Chars) => count / 2,
            _ => count,
        }
    };
    let at = r.pos;
    let wire = r.take(spec.wire_len(len), element)?;
    let format = spec.format.as_str();
    match spec.value {
        ValueCoding::Text(Charset::Ascii) => {
            if let Some(i) = first_invalid(spec.format, wire) {
                return Err(invalid(element, at + i, format));
            }
            out.extend_from_slice(wire);
        }
        ValueCoding::Text(cs) => {
            let start = out.len();
            text_to_ascii(cs, wire, out).map_err(|i| invalid(element, at + i, format))?;
            if let Some(i) = first_invalid(spec.format, out.get(start..).unwrap_or_default()) {
                return Err(invalid(element, at + i, format));
            }
        }
        ValueCoding::Bcd(padding, cs) => {
            let pad_left = padding == BcdPadding::Left;
            if spec.format == Format::XN {
                let (sign, digits) = wire.split_first().ok_or(invalid(element, at, format))?;
                let sign = char_to_ascii(cs, *sign);
                if sign != b'C' && sign != b'D' {
                    return Err(invalid(element, at, format));
                }
                out.push(sign);
                unpack_bcd(digits, len - 1, pad_left, false, out)
                    .map_err(|i| invalid(element, at + 1 + i, format))?;
            } else {
                unpack_bcd(wire, len, pad_left, spec.format == Format::Z, out)
                    .map_err(|i| invalid(element, at + i, format))?;
            }
        }
        ValueCoding::Raw => out.extend_from_slice(wire),
        ValueCoding::Hex(cs, _) => unhex(cs, wire, out).map_err(|i| invalid(element, at + i, "hex"))?,
    }
    Ok(())
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

    fn encode_inner(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let d = self.inner();
        match d.mti {
            NumericEncoding::Text => ascii_to_text(d.charset, msg.mti.as_bytes(), out).map_err(|_| {
                EncodeError::InvalidData { element: Element::Mti, position: 0, format: "n" }
            })?,
            NumericEncoding::Bcd => pack_bcd(msg.mti.as_bytes(), true, out),
        }
        let mut words = msg.bits;
        if !d.tertiary_bitmap && words[2] != 0 {
            let field = u8::try_from(128 + words[2].leading_zeros() + 1).unwrap_or(u8::MAX);
            return Err(EncodeError::UnknownField { element: Element::Field(field), dialect: d.name.clone() });
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
        for (number, value) in msg.fields() {
            if tertiary_pending && number > 65 {
                self.write_bitmap(words[2], out);
                tertiary_pending = false;
            }
            let element = Element::Field(number);
            let spec = self
                .field(number)
                .ok_or_else(|| EncodeError::UnknownField { element, dialect: d.name.clone() })?;
            encode_field(spec, value, element, out)?;
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

fn encode_field(spec: &FieldSpec, value: &[u8], element: Element, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let len = value.len();
    let max = usize::from(spec.length);
    if spec.kind == LengthKind::Fixed && len != max {
        return Err(EncodeError::BadLength { element, length: len, expected: max.to_string() });
    }
    if len > max {
        return Err(EncodeError::BadLength { element, length: len, expected: format!("at most {max}") });
    }
    if let Some(position) = first_invalid(spec.format, value) {
        return Err(EncodeError::InvalidData { element, position, format: spec.format.as_str() });
    }
    if spec.kind != LengthKind::Fixed {
        let count = spec.prefix_count(len);
        let digits = usize::from(spec.kind.digits());
        match spec.prefix {
            PrefixCoding::Text(cs) => write_text_number(cs, count, digits, out),
            PrefixCoding::Bcd => write_bcd_number(count, spec.prefix_len(), out),
            PrefixCoding::Binary => {
                let be = count.to_be_bytes();
                out.extend_from_slice(be.get(be.len() - spec.prefix_len()..).unwrap_or_default());
            }
        }
    }
    match spec.value {
        ValueCoding::Text(cs) => ascii_to_text(cs, value, out)
            .map_err(|position| EncodeError::InvalidData { element, position, format: spec.format.as_str() })?,
        ValueCoding::Bcd(padding, cs) => {
            let pad_left = padding == BcdPadding::Left;
            match (spec.format, value.split_first()) {
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

/// Zeroes a buffer's contents, then empties it (keeping its capacity for reuse).
trait ZeroizeAndClear {
    fn zeroize_and_clear(&mut self);
}

impl ZeroizeAndClear for Vec<u8> {
    #[inline]
    fn zeroize_and_clear(&mut self) {
        zeroize::Zeroize::zeroize(self.as_mut_slice());
        self.clear();
    }
}
