//! Golden vectors from `specs/golden/messages.toml`: each public message decodes to exactly the
//! listed fields and encodes back to the same bytes; each refused one gives the listed error.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::PathBuf;

use cardswitch_codec::Dialect;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    message: Vec<Vector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    #[allow(dead_code)]
    source: String,
    dialect: String,
    hex: Option<String>,
    ascii: Option<String>,
    mti: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    error: Option<String>,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../specs/golden")
}

#[test]
fn golden_messages_decode_field_by_field_and_encode_back() {
    let text = std::fs::read_to_string(golden_dir().join("messages.toml")).unwrap();
    let golden: Golden = toml::from_str(&text).unwrap();
    assert!(golden.message.len() >= 5);
    for v in golden.message {
        let dialect = if v.dialect.ends_with(".toml") {
            Dialect::from_file(&golden_dir().join(&v.dialect)).unwrap()
        } else {
            Dialect::builtin(&v.dialect).unwrap()
        };
        let wire = match (&v.hex, &v.ascii) {
            (Some(h), None) => hex::decode(h).unwrap(),
            (None, Some(a)) => a.as_bytes().to_vec(),
            _ => panic!("{}: give exactly one of hex and ascii", v.name),
        };
        match (&v.error, dialect.decode(&wire)) {
            (Some(expected), Err(e)) => assert_eq!(&e.to_string(), expected, "{}", v.name),
            (Some(expected), Ok(_)) => panic!("{}: decoded, expected error {expected}", v.name),
            (None, Err(e)) => panic!("{}: {e}", v.name),
            (None, Ok(msg)) => {
                assert_eq!(Some(msg.mti().as_str()), v.mti.as_deref(), "{}", v.name);
                let got: Vec<u8> = msg.field_numbers().collect();
                let mut want: Vec<u8> = v.fields.keys().map(|k| k.parse().unwrap()).collect();
                want.sort_unstable();
                assert_eq!(got, want, "{}: field set", v.name);
                for (n, expected) in &v.fields {
                    let expected = match expected.strip_prefix("hex:") {
                        Some(h) => hex::decode(h).unwrap(),
                        None => expected.as_bytes().to_vec(),
                    };
                    let n: u8 = n.parse().unwrap();
                    assert_eq!(msg.get(n), Some(&expected[..]), "{}: DE{n}", v.name);
                }
                assert_eq!(
                    dialect.encode_to_vec(&msg).unwrap(),
                    wire,
                    "{}: re-encode",
                    v.name
                );
            }
        }
    }
}

#[test]
fn every_shipped_dialect_validates_and_defines_all_128_fields() {
    for (name, _) in cardswitch_codec::BUILTIN_DIALECTS {
        let d = Dialect::builtin(name).unwrap();
        let defined: Vec<u8> = d.fields().map(|f| f.number).collect();
        let expected: Vec<u8> = (2..=128).filter(|&n| n != 65).collect();
        assert_eq!(defined, expected, "{name}");
        assert!(d.has_tertiary_bitmap());
    }
}
