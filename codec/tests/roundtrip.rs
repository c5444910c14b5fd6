//! Property tests: for generated messages, decode(encode(m)) == m on every dialect, the bytes are
//! stable, and a message moves between dialects without change.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use cardswitch_codec::spec::{Format, LengthKind};
use cardswitch_codec::{Dialect, FieldSpec, Message, Mti, BUILTIN_DIALECTS};
use proptest::prelude::*;

fn value_strategy(spec: &FieldSpec) -> BoxedStrategy<Vec<u8>> {
    let max = usize::from(spec.length).min(64);
    let len = if spec.kind == LengthKind::Fixed {
        let n = usize::from(spec.length);
        (n..=n).boxed()
    } else {
        (0..=max).boxed()
    };
    let class: &'static [u8] = match spec.format {
        Format::N => b"0123456789",
        Format::A => b"ABCXYZabcxyz ",
        Format::An => b"0189ABCZabcz ",
        Format::Z => b"0123456789=",
        _ => b" !\"#09:@AZ[`az{|}~",
    };
    match spec.format {
        Format::B => len
            .prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n))
            .boxed(),
        Format::XN => len
            .prop_flat_map(|n| {
                (
                    prop::sample::select(&b"CD"[..]),
                    proptest::collection::vec(
                        prop::sample::select(&b"0123456789"[..]),
                        n.max(2) - 1,
                    ),
                )
            })
            .prop_map(|(sign, digits)| std::iter::once(sign).chain(digits).collect())
            .boxed(),
        Format::Ans => len
            .prop_flat_map(|n| proptest::collection::vec(0x20u8..=0x7E, n))
            .boxed(),
        _ => len
            .prop_flat_map(move |n| proptest::collection::vec(prop::sample::select(class), n))
            .boxed(),
    }
}

/// Messages drawn from the fields every shipped dialect defines (they share one field table).
fn message_strategy() -> impl Strategy<Value = Message> {
    let dialect = Dialect::builtin("iso87-ascii").unwrap();
    let fields: Vec<(u8, BoxedStrategy<Vec<u8>>)> = dialect
        .fields()
        .map(|s| (s.number, value_strategy(s)))
        .collect();
    let mti = prop::sample::select(vec!["0100", "0110", "0200", "0210", "0420", "0800", "0810"]);
    let chosen = proptest::collection::vec(prop::sample::select(fields), 0..24);
    (mti, chosen).prop_flat_map(|(mti, chosen)| {
        let numbers: Vec<u8> = chosen.iter().map(|(n, _)| *n).collect();
        let values: Vec<BoxedStrategy<Vec<u8>>> = chosen.into_iter().map(|(_, s)| s).collect();
        values.prop_map(move |vals| {
            let mut m = Message::new(mti.parse::<Mti>().unwrap());
            for (n, v) in numbers.iter().zip(vals) {
                m.set(*n, &v);
            }
            m
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_encode_round_trip_on_every_dialect(msg in message_strategy()) {
        let dialects: Vec<Dialect> = BUILTIN_DIALECTS.iter().map(|(n, _)| Dialect::builtin(n).unwrap()).collect();
        for d in &dialects {
            let wire = d.encode_to_vec(&msg).unwrap();
            let back = d.decode(&wire).unwrap();
            prop_assert_eq!(&back, &msg, "{}", d.name());
            prop_assert_eq!(d.encode_to_vec(&back).unwrap(), wire, "{}", d.name());
        }
        // Terminal in one dialect, acquirer in another: the message is unchanged.
        for pair in dialects.windows(2) {
            let via = pair[1].decode(&pair[1].encode_to_vec(&pair[0].decode(&pair[0].encode_to_vec(&msg).unwrap()).unwrap()).unwrap()).unwrap();
            prop_assert_eq!(&via, &msg);
        }
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        for (n, _) in BUILTIN_DIALECTS {
            let _ = Dialect::builtin(n).unwrap().decode(&bytes);
        }
    }
}
