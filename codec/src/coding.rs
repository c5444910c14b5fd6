//! Byte-level conversions between wire encodings and the canonical form a [`crate::Message`]
//! holds (ASCII digits and text, raw bytes).
//!
//! These are small loops written for the decoder's hot path; each returns the index of the first
//! bad byte so that errors can point at it without echoing the value.

use crate::ebcdic_tables::{
    ASCII_TO_CP037, ASCII_TO_CP500, CP037_TO_ASCII, CP500_TO_ASCII, UNMAPPED,
};
use crate::spec::{Charset, Format};

/// Index of the first byte that is not an ASCII digit (error path only: the decoder's check is
/// [`all_digits`] / `digits_at`).
#[inline]
pub(crate) fn first_non_digit(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| !b.is_ascii_digit())
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

#[inline]
fn word(chunk: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(chunk);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn digits_bad(x: u64) -> u64 {
    (x.wrapping_add(0x46 * ONES) | x.wrapping_sub(0x30 * ONES) | x) & HIGHS
}

#[inline(always)]
fn printable_bad(x: u64) -> u64 {
    // A byte below 0x20 borrows into its top bit; a byte above 0x7E carries into it (or already
    // has it set).
    ((x.wrapping_sub(0x20 * ONES) & !x) | x.wrapping_add(ONES) | x) & HIGHS
}

/// Checks `bytes[at..at + len]` eight bytes per step. A tail shorter than eight bytes is read as
/// a whole word from the surrounding buffer when it extends that far, with the bytes past the
/// field replaced by `fill` (a byte that passes), so that short fields need no byte loop.
#[inline(always)]
fn check_words(bytes: &[u8], at: usize, len: usize, fill: u8, bad: impl Fn(u64) -> u64) -> bool {
    let mut acc = 0u64;
    let mut i = 0;
    while i + 8 <= len {
        acc |= bad(word(bytes.get(at + i..at + i + 8).unwrap_or(&[0xFF; 8])));
        i += 8;
    }
    let rest = len - i;
    if rest > 0 {
        let x = match bytes.get(at + i..at + i + 8) {
            Some(w) => word(w),
            // The field ends the buffer: copy its tail into a filled word.
            None => {
                let mut w = [fill; 8];
                if let (Some(dst), Some(src)) = (w.get_mut(..rest), bytes.get(at + i..at + len)) {
                    dst.copy_from_slice(src);
                }
                u64::from_le_bytes(w)
            }
        };
        let keep = (1u64 << (8 * rest)) - 1;
        acc |= bad((x & keep) | ((u64::from(fill) * ONES) & !keep));
    }
    acc == 0
}

/// Whether `bytes[at..at + len]` holds only ASCII digits.
#[inline(always)]
pub(crate) fn digits_at(bytes: &[u8], at: usize, len: usize) -> bool {
    check_words(bytes, at, len, b'0', digits_bad)
}

/// Whether `bytes[at..at + len]` holds only printable ASCII.
#[inline(always)]
pub(crate) fn printable_at(bytes: &[u8], at: usize, len: usize) -> bool {
    check_words(bytes, at, len, b' ', printable_bad)
}

/// Whether every byte is an ASCII digit (eight bytes per step).
#[inline]
pub(crate) fn all_digits(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut bad = 0u64;
    for chunk in &mut chunks {
        let x = word(chunk);
        bad |= digits_bad(x);
    }
    bad == 0 && chunks.remainder().iter().all(u8::is_ascii_digit)
}

/// Whether every byte is printable ASCII, 0x20..=0x7E (eight bytes per step).
#[inline]
pub(crate) fn all_printable(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(8);
    let mut bad = 0u64;
    for chunk in &mut chunks {
        let x = word(chunk);
        bad |= printable_bad(x);
    }
    bad == 0 && chunks.remainder().iter().all(|b| (b' '..=b'~').contains(b))
}

/// Character classes by byte, one bit per format, for the formats without a word-at-a-time check.
static CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        // b < 256, so the cast is exact.
        #[allow(clippy::cast_possible_truncation)]
        let c = b as u8;
        let alpha = c.is_ascii_alphabetic() || c == b' ';
        let alnum = c.is_ascii_alphanumeric() || c == b' ';
        let track = c.is_ascii_digit() || c == b'=';
        // const context: `get_mut` is not available, and `b < 256` holds.
        #[allow(clippy::indexing_slicing)]
        {
            t[b] = (alpha as u8) | (alnum as u8) << 1 | (track as u8) << 2;
        }
        b += 1;
    }
    t
};

/// Whether every byte belongs to the class of `a`, `an` or `z` (one table load per byte, no
/// branch).
#[inline]
pub(crate) fn all_in_class(format: Format, bytes: &[u8]) -> bool {
    let bit = match format {
        Format::A => 1,
        Format::An => 2,
        Format::Z => 4,
        _ => return first_invalid(format, bytes).is_none(),
    };
    bytes.iter().fold(bit, |acc, &b| {
        acc & CLASSES.get(usize::from(b)).copied().unwrap_or(0)
    }) != 0
}

/// Whether canonical (ASCII) text suits the format; the fast check of the decoder's loop.
#[inline]
pub(crate) fn is_valid(format: Format, bytes: &[u8]) -> bool {
    match format {
        Format::N => all_digits(bytes),
        Format::Ans => all_printable(bytes),
        Format::B => true,
        _ => all_in_class(format, bytes),
    }
}

/// Index of the first byte the format does not allow, for canonical (ASCII) text.
#[inline]
pub(crate) fn first_invalid(format: Format, bytes: &[u8]) -> Option<usize> {
    match format {
        Format::N => first_non_digit(bytes),
        Format::A => bytes
            .iter()
            .position(|&b| !(b.is_ascii_alphabetic() || b == b' ')),
        Format::An => bytes
            .iter()
            .position(|&b| !(b.is_ascii_alphanumeric() || b == b' ')),
        Format::Ans => bytes.iter().position(|&b| !(b' '..=b'~').contains(&b)),
        Format::Z => bytes
            .iter()
            .position(|&b| !(b.is_ascii_digit() || b == b'=')),
        Format::XN => match bytes.split_first() {
            Some((b'C' | b'D', digits)) => first_non_digit(digits).map(|p| p + 1),
            _ => Some(0),
        },
        Format::B => None,
    }
}

/// Converts text from a charset to ASCII, appending to `out`; returns the index of the first byte
/// with no ASCII equivalent.
#[inline]
pub(crate) fn text_to_ascii(charset: Charset, wire: &[u8], out: &mut Vec<u8>) -> Result<(), usize> {
    let table = match charset {
        Charset::Ascii => {
            out.extend_from_slice(wire);
            return Ok(());
        }
        Charset::Cp037 => &CP037_TO_ASCII,
        Charset::Cp500 => &CP500_TO_ASCII,
    };
    for (i, &b) in wire.iter().enumerate() {
        let a = table.get(usize::from(b)).copied().unwrap_or(UNMAPPED);
        if a == UNMAPPED {
            return Err(i);
        }
        out.push(a);
    }
    Ok(())
}

/// Converts ASCII text to a charset, appending to `out`; returns the index of the first non-ASCII
/// byte.
#[inline]
pub(crate) fn ascii_to_text(
    charset: Charset,
    ascii: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), usize> {
    let table = match charset {
        Charset::Ascii => {
            out.extend_from_slice(ascii);
            return Ok(());
        }
        Charset::Cp037 => &ASCII_TO_CP037,
        Charset::Cp500 => &ASCII_TO_CP500,
    };
    for (i, &a) in ascii.iter().enumerate() {
        match table.get(usize::from(a)) {
            Some(&e) => out.push(e),
            None => return Err(i),
        }
    }
    Ok(())
}

/// One character (a digit or hex digit) in a charset.
#[inline]
pub(crate) fn char_to_ascii(charset: Charset, b: u8) -> u8 {
    match charset {
        Charset::Ascii => b,
        Charset::Cp037 => CP037_TO_ASCII
            .get(usize::from(b))
            .copied()
            .unwrap_or(UNMAPPED),
        Charset::Cp500 => CP500_TO_ASCII
            .get(usize::from(b))
            .copied()
            .unwrap_or(UNMAPPED),
    }
}

/// Parses decimal digits written as characters of a charset.
#[inline]
pub(crate) fn parse_text_number(charset: Charset, wire: &[u8]) -> Option<usize> {
    wire.iter().try_fold(0usize, |acc, &b| {
        let d = char_to_ascii(charset, b).wrapping_sub(b'0');
        (d < 10).then_some(acc * 10 + usize::from(d))
    })
}

/// Parses packed BCD digits.
#[inline]
pub(crate) fn parse_bcd_number(wire: &[u8]) -> Option<usize> {
    wire.iter().try_fold(0usize, |acc, &b| {
        let (hi, lo) = (b >> 4, b & 0x0F);
        (hi < 10 && lo < 10).then_some(acc * 100 + usize::from(hi) * 10 + usize::from(lo))
    })
}

/// Writes `n` as `digits` decimal characters in a charset.
pub(crate) fn write_text_number(charset: Charset, n: usize, digits: usize, out: &mut Vec<u8>) {
    let start = out.len();
    let mut rest = n;
    out.resize(start + digits, b'0');
    if let Some(slots) = out.get_mut(start..) {
        for slot in slots.iter_mut().rev() {
            let d = u8::try_from(rest % 10).unwrap_or(0);
            *slot = b'0' + d;
            rest /= 10;
        }
        if charset != Charset::Ascii {
            for slot in slots.iter_mut() {
                *slot = to_charset(charset, *slot);
            }
        }
    }
}

/// Writes `n` as `bytes` bytes of packed BCD.
pub(crate) fn write_bcd_number(n: usize, bytes: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + bytes, 0);
    let mut rest = n;
    if let Some(slots) = out.get_mut(start..) {
        for slot in slots.iter_mut().rev() {
            let lo = u8::try_from(rest % 10).unwrap_or(0);
            let hi = u8::try_from(rest / 10 % 10).unwrap_or(0);
            *slot = hi << 4 | lo;
            rest /= 100;
        }
    }
}

/// An ASCII character in a charset (for digits, hex digits and signs).
#[inline]
pub(crate) fn to_charset(charset: Charset, a: u8) -> u8 {
    let table = match charset {
        Charset::Ascii => return a,
        Charset::Cp037 => &ASCII_TO_CP037,
        Charset::Cp500 => &ASCII_TO_CP500,
    };
    table.get(usize::from(a)).copied().unwrap_or(0)
}

/// Unpacks BCD into ASCII digits (`=` for the `D` nibble when `track`), dropping the pad nibble.
///
/// `len` is the number of digits; the wire holds `len.div_ceil(2)` bytes. Returns the byte index of
/// the first bad nibble (a pad that is not `0`/`F`, or a nibble above 9).
pub(crate) fn unpack_bcd(
    wire: &[u8],
    len: usize,
    pad_left: bool,
    track: bool,
    out: &mut Vec<u8>,
) -> Result<(), usize> {
    let odd = len % 2 == 1;
    let start = out.len();
    out.reserve(len);
    for (i, &b) in wire.iter().enumerate() {
        for (k, nibble) in [b >> 4, b & 0x0F].into_iter().enumerate() {
            let is_pad = odd
                && ((pad_left && i == 0 && k == 0) || (!pad_left && i + 1 == wire.len() && k == 1));
            if is_pad {
                let expected = if pad_left { 0 } else { 0x0F };
                if nibble != expected {
                    out.truncate(start);
                    return Err(i);
                }
                continue;
            }
            match nibble {
                0..=9 => out.push(b'0' + nibble),
                0x0D if track => out.push(b'='),
                _ => {
                    out.truncate(start);
                    return Err(i);
                }
            }
        }
    }
    Ok(())
}

/// Packs ASCII digits (and `=` as the `D` nibble) into BCD with the pad nibble for odd lengths.
pub(crate) fn pack_bcd(ascii: &[u8], pad_left: bool, out: &mut Vec<u8>) {
    let nib = |c: u8| {
        if c == b'=' {
            0x0D
        } else {
            c.wrapping_sub(b'0') & 0x0F
        }
    };
    let odd = ascii.len() % 2 == 1;
    let mut iter = ascii.iter().copied();
    if odd && pad_left {
        if let Some(first) = iter.next() {
            out.push(nib(first));
        }
    }
    loop {
        match (iter.next(), iter.next()) {
            (Some(h), Some(l)) => out.push(nib(h) << 4 | nib(l)),
            (Some(h), None) => out.push(nib(h) << 4 | 0x0F),
            _ => break,
        }
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Value of each byte as an ASCII hex digit, or 0xFF.
static HEX_VALUES: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut b = 0usize;
    while b < 256 {
        // b < 256, so the cast is exact.
        #[allow(clippy::cast_possible_truncation)]
        let c = b as u8;
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'F' => c - b'A' + 10,
            b'a'..=b'f' => c - b'a' + 10,
            _ => 0xFF,
        };
        // const context: `get_mut` is not available, and `b < 256` holds.
        #[allow(clippy::indexing_slicing)]
        {
            t[b] = v;
        }
        b += 1;
    }
    t
};

/// The value of a hex digit in a charset, or a value above 0x0F.
#[inline]
pub(crate) fn hex_value(charset: Charset, c: u8) -> u8 {
    HEX_VALUES
        .get(usize::from(char_to_ascii(charset, c)))
        .copied()
        .unwrap_or(0xFF)
}

/// Decodes hex characters (either case, in a charset) into bytes; returns the index of the first
/// bad character.
#[inline]
pub(crate) fn unhex(charset: Charset, wire: &[u8], out: &mut Vec<u8>) -> Result<(), usize> {
    out.reserve(wire.len() / 2);
    let value = |c: u8| hex_value(charset, c);
    for (i, pair) in wire.chunks_exact(2).enumerate() {
        let (h, l) = match pair {
            [h, l] => (value(*h), value(*l)),
            _ => (0xFF, 0xFF),
        };
        if (h | l) > 0x0F {
            return Err(if h > 0x0F { 2 * i } else { 2 * i + 1 });
        }
        out.push(h << 4 | l);
    }
    Ok(())
}

/// Encodes bytes as upper-case hex characters in a charset.
pub(crate) fn hex(charset: Charset, bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len() * 2);
    for &b in bytes {
        let digit = |n: u8| HEX_UPPER.get(usize::from(n)).copied().unwrap_or(b'0');
        out.push(to_charset(charset, digit(b >> 4)));
        out.push(to_charset(charset, digit(b & 0x0F)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_check_finds_first_bad_byte_in_every_position() {
        let base = b"0123456789012345678901".to_vec();
        assert_eq!(first_non_digit(&base), None);
        for i in 0..base.len() {
            for bad in [b'/', b':', b'a', 0x80, 0xFF, 0x00, b' '] {
                let mut v = base.clone();
                v[i] = bad;
                assert_eq!(first_non_digit(&v), Some(i), "byte {bad:#x} at {i}");
            }
        }
    }

    #[test]
    fn word_checks_agree_with_byte_checks_on_every_byte_value() {
        for len in [1usize, 7, 8, 9, 16, 23] {
            for pos in 0..len {
                for b in 0..=255u8 {
                    let mut digits = vec![b'5'; len];
                    digits[pos] = b;
                    assert_eq!(
                        all_digits(&digits),
                        b.is_ascii_digit(),
                        "digit {b:#x} at {pos}/{len}"
                    );
                    let mut text = vec![b'a'; len];
                    text[pos] = b;
                    assert_eq!(
                        all_printable(&text),
                        (0x20..=0x7E).contains(&b),
                        "text {b:#x} at {pos}/{len}"
                    );
                    // The same field inside a larger buffer, and at its end.
                    let mut framed = b"12345678".to_vec();
                    framed.extend_from_slice(&digits);
                    assert_eq!(digits_at(&framed, 8, len), b.is_ascii_digit());
                    framed.extend_from_slice(b"xxxxxxxx");
                    assert_eq!(digits_at(&framed, 8, len), b.is_ascii_digit());
                    let mut framed = vec![0u8; 3];
                    framed.extend_from_slice(&text);
                    assert_eq!(printable_at(&framed, 3, len), (0x20..=0x7E).contains(&b));
                    framed.push(0);
                    assert_eq!(printable_at(&framed, 3, len), (0x20..=0x7E).contains(&b));
                    for f in [Format::A, Format::An, Format::Z, Format::XN] {
                        assert_eq!(
                            is_valid(f, &text),
                            first_invalid(f, &text).is_none(),
                            "{f:?} {b:#x} at {pos}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bcd_round_trip_with_both_paddings() {
        for digits in ["", "1", "12", "123", "4111111111111111111", "41111111=2512"] {
            for pad_left in [true, false] {
                let mut packed = Vec::new();
                pack_bcd(digits.as_bytes(), pad_left, &mut packed);
                assert_eq!(packed.len(), digits.len().div_ceil(2));
                let mut back = Vec::new();
                unpack_bcd(&packed, digits.len(), pad_left, true, &mut back).unwrap();
                assert_eq!(back, digits.as_bytes());
            }
        }
        // A left pad nibble must be zero.
        let mut out = Vec::new();
        assert_eq!(unpack_bcd(&[0x11, 0x23], 3, true, false, &mut out), Err(0));
        // Nibbles above 9 are refused outside track data.
        assert_eq!(unpack_bcd(&[0x1D], 2, true, false, &mut out), Err(0));
    }

    #[test]
    fn ebcdic_round_trips_printable_ascii() {
        let text: Vec<u8> = (b' '..=b'~').collect();
        for cs in [Charset::Cp037, Charset::Cp500] {
            let mut e = Vec::new();
            ascii_to_text(cs, &text, &mut e).unwrap();
            assert_ne!(e, text);
            let mut back = Vec::new();
            text_to_ascii(cs, &e, &mut back).unwrap();
            assert_eq!(back, text);
        }
        // 0xF0..0xF9 are the EBCDIC digits.
        assert_eq!(parse_text_number(Charset::Cp037, &[0xF1, 0xF9]), Some(19));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let mut out = Vec::new();
        hex(Charset::Ascii, &[0x00, 0xAB, 0xFF], &mut out);
        assert_eq!(out, b"00ABFF");
        let mut back = Vec::new();
        unhex(Charset::Ascii, b"00abFF", &mut back).unwrap();
        assert_eq!(back, [0x00, 0xAB, 0xFF]);
        assert_eq!(unhex(Charset::Ascii, b"0G", &mut back), Err(1));
    }
}
