//! Malformed input: every truncation of a valid message and each rejection rule gives the
//! expected typed error, on every shipped dialect.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use cardswitch_codec::{sample, DecodeError, Dialect, Element, Message, BUILTIN_DIALECTS};

fn dialects() -> Vec<Dialect> {
    BUILTIN_DIALECTS
        .iter()
        .map(|(n, _)| Dialect::builtin(n).unwrap())
        .collect()
}

/// Byte ranges of the MTI+bitmap header and of each field of `msg` in `dialect`.
fn element_ends(dialect: &Dialect, msg: &Message) -> Vec<(Element, usize)> {
    let numbers: Vec<u8> = msg.field_numbers().collect();
    let mut partial = Message::new(msg.mti());
    let mut ends = vec![(
        Element::Bitmap(1),
        dialect.encode_to_vec(&partial).unwrap().len(),
    )];
    for n in numbers {
        partial.set(n, msg.get(n).unwrap());
        ends.push((
            Element::Field(n),
            dialect.encode_to_vec(&partial).unwrap().len(),
        ));
    }
    ends
}

#[test]
fn every_truncation_names_the_element_it_cuts() {
    let msg = sample::auth_request();
    for dialect in dialects() {
        let wire = dialect.encode_to_vec(&msg).unwrap();
        assert_eq!(dialect.decode(&wire).unwrap(), msg, "{}", dialect.name());
        let ends = element_ends(&dialect, &msg);
        let mti_len = if dialect.name() == "iso87-bcd" { 2 } else { 4 };
        for cut in 0..wire.len() {
            let err = dialect.decode(&wire[..cut]).unwrap_err();
            let (expected, start) = if cut < mti_len {
                (Element::Mti, 0)
            } else {
                let i = ends.iter().position(|(_, end)| cut < *end).unwrap();
                let start = if i == 0 { mti_len } else { ends[i - 1].1 };
                (ends[i].0, start)
            };
            match err {
                DecodeError::MissingField { element, offset } => {
                    assert_eq!(
                        (element, offset),
                        (expected, cut),
                        "{} cut {cut}",
                        dialect.name()
                    );
                    assert_eq!(
                        start,
                        cut,
                        "{} cut {cut}: missing only at an element start",
                        dialect.name()
                    );
                }
                DecodeError::Truncated {
                    element,
                    offset,
                    available,
                    ..
                } => {
                    assert_eq!(element, expected, "{} cut {cut}", dialect.name());
                    assert!(
                        offset >= start && offset <= cut,
                        "{} cut {cut}: offset {offset}",
                        dialect.name()
                    );
                    assert_eq!(available, cut - offset, "{} cut {cut}", dialect.name());
                }
                other => panic!("{} cut {cut}: unexpected {other}", dialect.name()),
            }
        }
    }
}

fn ascii() -> Dialect {
    Dialect::builtin("iso87-ascii").unwrap()
}

/// MTI 0200, a binary primary bitmap with the given fields, then the body.
fn ascii_message(fields: &[u8], body: &[u8]) -> Vec<u8> {
    let mut bitmap = 0u64;
    for &f in fields {
        bitmap |= 1 << (64 - u32::from(f));
    }
    let mut out = b"0200".to_vec();
    out.extend_from_slice(&bitmap.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[test]
fn a_bitmap_bit_with_no_data_is_a_missing_field() {
    let wire = ascii_message(&[3, 4], b"000000");
    assert_eq!(
        ascii().decode(&wire),
        Err(DecodeError::MissingField {
            element: Element::Field(4),
            offset: 18
        })
    );
}

#[test]
fn over_long_and_non_numeric_length_prefixes() {
    assert_eq!(
        ascii().decode(&ascii_message(&[2], b"2041111111111111111111")),
        Err(DecodeError::LengthTooLong {
            element: Element::Field(2),
            offset: 12,
            length: 20,
            max: 19
        })
    );
    assert_eq!(
        ascii().decode(&ascii_message(&[2], b"1x4111111111111111")),
        Err(DecodeError::BadLengthPrefix {
            element: Element::Field(2),
            offset: 12
        })
    );
    // BCD: one prefix byte 0x20 (20 digits) for a PAN of at most 19, and a nibble above 9.
    let bcd = Dialect::builtin("iso87-bcd").unwrap();
    let mut wire = vec![0x02, 0x00, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x20];
    wire.extend_from_slice(&[0x41; 10]);
    assert!(matches!(
        bcd.decode(&wire),
        Err(DecodeError::LengthTooLong {
            length: 20,
            max: 19,
            ..
        })
    ));
    wire[10] = 0x1A;
    assert!(matches!(
        bcd.decode(&wire),
        Err(DecodeError::BadLengthPrefix { offset: 10, .. })
    ));
}

#[test]
fn a_length_prefix_beyond_the_input_is_truncation_not_allocation() {
    // DE48 announces 999 characters; five are present.
    let wire = ascii_message(&[48], b"999abcde");
    assert_eq!(
        ascii().decode(&wire),
        Err(DecodeError::Truncated {
            element: Element::Field(48),
            offset: 15,
            needed: 999,
            available: 5
        })
    );
}

#[test]
fn a_non_digit_in_a_numeric_field_is_refused_at_its_offset() {
    assert_eq!(
        ascii().decode(&ascii_message(&[3], b"00A000")),
        Err(DecodeError::InvalidData {
            element: Element::Field(3),
            offset: 14,
            format: "n"
        })
    );
    // BCD: a nibble above 9 in DE3.
    let bcd = Dialect::builtin("iso87-bcd").unwrap();
    let wire = [0x02, 0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x0B, 0x00];
    assert_eq!(
        bcd.decode(&wire),
        Err(DecodeError::InvalidData {
            element: Element::Field(3),
            offset: 11,
            format: "n"
        })
    );
    // EBCDIC: 'A' (0xC1) in a numeric field.
    let ebcdic = Dialect::builtin("iso87-ebcdic").unwrap();
    let mut wire = vec![0xF0, 0xF2, 0xF0, 0xF0, 0x20, 0, 0, 0, 0, 0, 0, 0];
    wire.extend_from_slice(&[0xF0, 0xF0, 0xC1, 0xF0, 0xF0, 0xF0]);
    assert_eq!(
        ebcdic.decode(&wire),
        Err(DecodeError::InvalidData {
            element: Element::Field(3),
            offset: 14,
            format: "n"
        })
    );
}

#[test]
fn trailing_bytes_are_refused() {
    assert_eq!(
        ascii().decode(&ascii_message(&[3], b"000000\x00\x00")),
        Err(DecodeError::TrailingBytes {
            offset: 18,
            count: 2
        })
    );
}

#[test]
fn a_secondary_bitmap_flag_without_the_bitmap() {
    let mut wire = ascii_message(&[], b"");
    wire[4] = 0x80;
    assert_eq!(
        ascii().decode(&wire),
        Err(DecodeError::MissingField {
            element: Element::Bitmap(2),
            offset: 12
        })
    );
    wire.extend_from_slice(&[0, 0, 0]);
    assert!(matches!(
        ascii().decode(&wire),
        Err(DecodeError::Truncated {
            element: Element::Bitmap(2),
            offset: 12,
            needed: 8,
            available: 3
        })
    ));
    let hex = Dialect::builtin("iso87-ascii-hexbitmap").unwrap();
    assert_eq!(
        hex.decode(b"02008000000000000000000000000000000G"),
        Err(DecodeError::InvalidData {
            element: Element::Bitmap(2),
            offset: 35,
            format: "hex"
        })
    );
}

#[test]
fn fields_the_dialect_does_not_define_are_refused() {
    // Field 129, through the tertiary bitmap: no shipped dialect defines it.
    let mut wire = b"0200".to_vec();
    wire.extend_from_slice(&(1u64 << 63).to_be_bytes());
    wire.extend_from_slice(&(1u64 << 63).to_be_bytes());
    wire.extend_from_slice(&(1u64 << 63).to_be_bytes());
    assert_eq!(
        ascii().decode(&wire),
        Err(DecodeError::UnknownField {
            element: Element::Field(129),
            dialect: "iso87-ascii".into()
        })
    );
    // A small dialect with only DE3: DE4 is unknown.
    let small = Dialect::from_toml(
        "small",
        r#"name = "small"
        [encoding]
        charset = "ascii"
        mti = "text"
        bitmap = "binary"
        numeric = "text"
        binary = "raw"
        length = "text"
        [fields]
        3 = { name = "Processing code", format = "n", length = 6 }"#,
    )
    .unwrap();
    assert_eq!(
        small.decode(&ascii_message(&[3, 4], b"000000000000001500")),
        Err(DecodeError::UnknownField {
            element: Element::Field(4),
            dialect: "small".into()
        })
    );
}

#[test]
fn errors_never_echo_field_values() {
    let msg = sample::auth_request();
    let dialect = ascii();
    let mut wire = dialect.encode_to_vec(&msg).unwrap();
    // Corrupt the last PAN digit so that the PAN field itself is refused.
    let at = wire
        .windows(16)
        .position(|w| w == b"4761739001010010")
        .unwrap();
    wire[at + 15] = b'X';
    let err = dialect.decode(&wire).unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        matches!(
            err,
            DecodeError::InvalidData {
                element: Element::Field(2),
                ..
            }
        ),
        "{text}"
    );
    assert!(!text.contains("476173900101001"), "{text}");
}

#[test]
fn a_tertiary_bitmap_carries_fields_above_128() {
    let dialect = Dialect::from_toml(
        "tertiary",
        r#"name = "tertiary"
        extends = "iso87-ascii"
        [fields]
        130 = { name = "Private 130", format = "ans", length = 20, prefix = "LL" }"#,
    )
    .unwrap();
    let mut msg = Message::new("0100".parse().unwrap());
    msg.set(3, b"000000");
    msg.set(70, b"301");
    msg.set(130, b"hello");
    let wire = dialect.encode_to_vec(&msg).unwrap();
    // MTI, primary, secondary, DE3, the tertiary bitmap in DE65's place, DE70, DE130.
    assert_eq!(wire.len(), 4 + 8 + 8 + 6 + 8 + 3 + 7);
    assert_eq!(&wire[26..34], &(1u64 << 62).to_be_bytes());
    assert_eq!(dialect.decode(&wire).unwrap(), msg);
    // The same message cannot be written in a dialect without DE130.
    assert!(ascii().encode_to_vec(&msg).is_err());
}
