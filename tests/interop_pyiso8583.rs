//! Interoperability with a real peer: pyiso8583, installed from PyPI into a throwaway virtualenv.
//!
//! pyiso8583 encodes a full 0100 and a 0200 with a secondary bitmap in its `default` spec; we
//! decode every field and encode back to the same bytes. Then the reverse: we encode, pyiso8583
//! decodes, and every field matches.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use cardswitch_codec::{sample, Dialect, Format, Message, Mti};
use serde_json::{json, Map, Value};

mod common;

const SCRIPT: &str = r#"
import json, sys
import iso8583
from iso8583.specs import default as spec

def to_py(doc):
    # pyiso8583 takes binary fields as hex text and writes their bytes raw.
    return {k: (v["hex"] if isinstance(v, dict) else v) for k, v in doc.items()}

def from_py(doc):
    out = {}
    for k, v in doc.items():
        if k in ("p", "1"):
            continue
        out[k] = {"hex": v.upper()} if spec[k]["data_enc"] == "b" else v
    return out

mode = sys.argv[1]
if mode == "encode":
    docs = json.load(sys.stdin)
    print(json.dumps([iso8583.encode(to_py(d), spec)[0].hex().upper() for d in docs]))
else:
    hexes = json.load(sys.stdin)
    print(json.dumps([from_py(iso8583.decode(bytearray.fromhex(h), spec)[0]) for h in hexes]))
"#;

/// A virtualenv with pyiso8583 under `target/`, created once per build tree.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyiso8583-venv");
    let py = venv.join("bin/python");
    if !py.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap()
            .success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "pyiso8583==4.0.1",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install pyiso8583 failed");
    }
    py
}

fn run(mode: &str, input: &Value) -> Value {
    let mut command = Command::new(python());
    command.args(["-c", SCRIPT, mode]);
    let out = common::run_with_stdin(command, input.to_string().as_bytes());
    assert!(out.status.success(), "pyiso8583 {mode} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A message as the JSON the script takes: `t` for the MTI, binary fields as `{"hex": ...}`.
fn to_doc(msg: &Message, dialect: &Dialect) -> Value {
    let mut doc = Map::new();
    doc.insert("t".into(), json!(msg.mti().as_str()));
    for (n, v) in msg.fields() {
        let value = if dialect.field(n).unwrap().format == Format::B {
            json!({ "hex": hex::encode_upper(v) })
        } else {
            json!(std::str::from_utf8(v).unwrap())
        };
        doc.insert(n.to_string(), value);
    }
    Value::Object(doc)
}

fn financial_with_secondary_bitmap() -> Message {
    Message::builder(Mti::FINANCIAL_REQUEST)
        .field(2, "5555555555554444")
        .field(3, "000000")
        .amount(2_500)
        .field(7, "1121101500")
        .stan(654_321)
        .field(12, "101500")
        .field(13, "1121")
        .field(22, "021")
        .field(25, "00")
        .field(37, "532510654321")
        .field(41, "TERM0002")
        .field(42, "MERCHANT0000002")
        .field(49, "840")
        .field(102, "1234567890")
        .field(103, "0987654321")
        .field(128, [0xA1, 0xB2, 0xC3, 0xD4, 0xE5, 0xF6, 0x07, 0x18])
        .build()
}

#[test]
fn pyiso8583_and_cardswitch_read_each_others_messages() {
    let dialect = Dialect::builtin("iso87-ascii").unwrap();
    let messages = [sample::auth_request(), financial_with_secondary_bitmap()];
    let expected_0100: Vec<u8> = vec![
        2, 3, 4, 7, 11, 12, 13, 14, 18, 22, 25, 32, 35, 37, 41, 42, 43, 49, 52, 55,
    ];
    assert_eq!(
        messages[0].field_numbers().collect::<Vec<_>>(),
        expected_0100
    );

    // pyiso8583 encodes; we decode every field and encode the same bytes.
    let docs: Vec<Value> = messages.iter().map(|m| to_doc(m, &dialect)).collect();
    let theirs = run("encode", &Value::Array(docs));
    for (msg, hex_text) in messages.iter().zip(theirs.as_array().unwrap()) {
        let wire = hex::decode(hex_text.as_str().unwrap()).unwrap();
        let decoded = dialect.decode(&wire).unwrap();
        assert_eq!(decoded.mti(), msg.mti());
        assert_eq!(
            decoded.field_numbers().collect::<Vec<_>>(),
            msg.field_numbers().collect::<Vec<_>>()
        );
        for (n, v) in msg.fields() {
            assert_eq!(decoded.get(n), Some(v), "DE{n}");
        }
        assert_eq!(
            dialect.encode_to_vec(&decoded).unwrap(),
            wire,
            "{}",
            msg.mti()
        );
    }

    // We encode; pyiso8583 decodes every field.
    let ours: Vec<Value> = messages
        .iter()
        .map(|m| json!(hex::encode_upper(dialect.encode_to_vec(m).unwrap())))
        .collect();
    let decoded = run("decode", &Value::Array(ours));
    for (msg, doc) in messages.iter().zip(decoded.as_array().unwrap()) {
        assert_eq!(doc, &to_doc(msg, &dialect), "{}", msg.mti());
    }
}
