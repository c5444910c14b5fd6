//! Dialect files that do not validate are refused with a message naming the field and problem.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use cardswitch_codec::Dialect;

const ENCODING: &str = r#"
[encoding]
charset = "ascii"
mti = "text"
bitmap = "binary"
numeric = "text"
binary = "raw"
length = "text"
"#;

fn load(fields: &str) -> Result<Dialect, String> {
    Dialect::from_toml(
        "test.toml",
        &format!("name = \"t\"\n{ENCODING}\n[fields]\n{fields}"),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn good_file_loads() {
    let d = load(
        r#"2 = { name = "PAN", format = "n", length = 19, prefix = "LL", sensitive = "pan" }"#,
    )
    .unwrap();
    assert_eq!(d.field(2).unwrap().length, 19);
}

#[test]
fn each_problem_is_named() {
    let cases = [
        (
            r#"2 = { name = "PAN", format = "n", lenght = 19 }"#,
            "unknown field `lenght`",
        ),
        (
            r#"2 = { name = "PAN", format = "q", length = 19 }"#,
            "unknown variant `q`",
        ),
        (
            r#"2 = { name = "PAN", format = "n", length = 120, prefix = "LL" }"#,
            "field 2: length 120 does not fit a LL prefix (at most 99)",
        ),
        (
            r#"2 = { name = "PAN", format = "n", length = 0 }"#,
            "field 2: length must be at least 1",
        ),
        (
            r#"1 = { name = "Bitmap", format = "b", length = 8 }"#,
            "field 1: field number must be 2..=192",
        ),
        (
            r#"x = { name = "X", format = "b", length = 8 }"#,
            "field x: field number must be 2..=192",
        ),
        (
            r#"130 = { name = "X", format = "b", length = 8 }"#,
            "field 130: fields above 128 need `tertiary_bitmap = true`",
        ),
        (
            r#"52 = { name = "PIN", format = "b", length = 8, encoding = "bcd" }"#,
            "field 52: encoding Bcd does not apply to a `b` field",
        ),
        (
            r#"3 = { name = "PC", format = "n", length = 6, encoding = "hex" }"#,
            "field 3: encoding Hex does not apply to a `n` field",
        ),
        (
            r#"97 = { name = "Net", format = "x+n", length = 1 }"#,
            "field 97: an x+n field needs room",
        ),
    ];
    for (fields, expected) in cases {
        let err = load(fields).unwrap_err();
        assert!(
            err.contains(expected),
            "{fields}\n  gave: {err}\n  want: {expected}"
        );
        assert!(err.starts_with("dialect test.toml"), "{err}");
    }
}

#[test]
fn file_level_problems() {
    let err = Dialect::from_toml("x.toml", "name = \"x\"\n[fields]\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing `[encoding]`"), "{err}");
    let err = Dialect::from_toml("x.toml", "name = \"x\"\nextends = \"nope\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no shipped dialect named nope"), "{err}");
    let err = Dialect::from_toml(
        "x.toml",
        &format!("name = \"x\"\n{ENCODING}\nmti = \"bcd\"\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("duplicate key"), "{err}");
    let err = Dialect::builtin("iso99").unwrap_err().to_string();
    assert!(err.contains("shipped: iso87-ascii"), "{err}");
}
