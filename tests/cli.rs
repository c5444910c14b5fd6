//! The tester CLI: `decode`, `encode`, `dialects`, run as the real binary.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::process::{Command, Output};

use cardswitch_codec::{sample, Dialect};

mod common;

fn cardswitch(args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cardswitch"));
    command.args(args);
    common::run_with_stdin(command, stdin.as_bytes())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn decode_prints_a_masked_table() {
    let wire = Dialect::builtin("iso87-ascii")
        .unwrap()
        .encode_to_vec(&sample::auth_request())
        .unwrap();
    let out = cardswitch(&["decode", &hex::encode(&wire)], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("MTI      0100"), "{table}");
    assert!(table.contains("476173******0010"), "{table}");
    assert!(table.contains("[PIN block, 8 bytes]"), "{table}");
    assert!(table.contains("9F26=1A2B3C4D5E6F7081"), "{table}");
    assert!(!table.contains("4761739001010010"), "{table}");
    assert!(!table.contains("0412"), "PIN block bytes leaked: {table}");
}

#[test]
fn framed_bcd_input_from_stdin() {
    let dialect = Dialect::builtin("iso87-bcd").unwrap();
    let body = dialect.encode_to_vec(&sample::auth_request()).unwrap();
    let mut framed = format!("{:04}", body.len()).into_bytes();
    framed.extend_from_slice(&body);
    let out = cardswitch(
        &[
            "decode",
            "--dialect",
            "iso87-bcd",
            "--framed",
            "--framing",
            "ascii4",
            "-",
        ],
        &hex::encode(&framed),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("DE55"));
}

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let cases = [
        (vec!["decode", "zz"], "input is not hex"),
        (
            vec!["decode", "30313030"],
            "primary bitmap at offset 4: truncated",
        ),
        (vec!["decode", "--dialect", "nope", "00"], "no such dialect"),
        (vec!["decode", "--framed", "0005303130"], "incomplete frame"),
    ];
    for (args, expected) in cases {
        let out = cardswitch(&args, "");
        assert!(!out.status.success(), "{args:?}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn decode_json_encodes_back_to_the_same_bytes() {
    // No card data in this message, so the JSON holds every value in clear.
    let msg_hex =
        hex::encode_upper(b"02003220000000808000000010000000001500120604120000000112340001840");
    let out = cardswitch(
        &["decode", "--json", "-d", "iso87-ascii-hexbitmap", &msg_hex],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json = text(&out.stdout);
    let back = cardswitch(&["encode", "-d", "iso87-ascii-hexbitmap"], &json);
    assert!(back.status.success(), "{}", text(&back.stderr));
    assert_eq!(text(&back.stdout).trim(), msg_hex);
}

#[test]
fn encode_refuses_masked_card_data() {
    let json = r#"{"mti":"0100","fields":{"2":"476173******0010","3":"000000"}}"#;
    let out = cardswitch(&["encode"], json);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("DE2 holds a masked value"),
        "{}",
        text(&out.stderr)
    );
    let json = r#"{"mti":"0100","fields":{"2":"4761739001010010","3":"00000A"}}"#;
    let out = cardswitch(&["encode"], json);
    assert!(
        text(&out.stderr).contains("DE3: invalid n data at position 5"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("4761739001010010"));
}

#[test]
fn encode_framed_with_tpdu() {
    let json = r#"{"mti":"0800","tpdu":"6000010002","fields":{"7":"1121093015","11":"000001","70":"301"}}"#;
    let out = cardswitch(&["encode", "--framed", "--tpdu"], json);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let wire = hex::decode(text(&out.stdout).trim()).unwrap();
    assert_eq!(&wire[..2], &[0, u8::try_from(wire.len() - 2).unwrap()]);
    assert_eq!(&wire[2..7], &[0x60, 0, 1, 0, 2]);
    assert_eq!(&wire[7..11], b"0800");
}

#[test]
fn dialects_lists_and_validates() {
    let out = cardswitch(&["dialects"], "");
    assert!(text(&out.stdout).contains("iso87-ebcdic"));
    let dir = std::env::temp_dir().join(format!("cardswitch-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\nextends = \"iso87-ascii\"\n[fields]\n2 = { name = \"PAN\", format = \"n\", length = 200, prefix = \"LL\" }\n").unwrap();
    let out = cardswitch(&["dialects", bad.to_str().unwrap()], "");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("field 2: length 200 does not fit a LL prefix"),
        "{}",
        text(&out.stderr)
    );
}

#[cfg(feature = "simulators")] // `sim hsm` is one of the simulator commands
#[test]
fn hsm_test_keys_are_printed_with_check_values_the_lmk_confirms() {
    use cardswitch_simulators::hsm::{KeyType, Lmk, WrappedKey};
    let out = cardswitch(&["sim", "hsm", "--print-test-keys"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let lmk = Lmk::test_set();
    for (name, kt) in [
        ("TPK", KeyType::TPK),
        ("TAK", KeyType::TAK),
        ("ZPK", KeyType::ZPK),
        ("ZAK", KeyType::ZAK),
        ("ZMK", KeyType::ZMK),
    ] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} missing: {listing}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        // NAME clear HEX under LMK FIELD check value KCV
        let (clear, field, kcv) = (words[2], words[5], words[8]);
        let key = lmk
            .decrypt_key(kt, &WrappedKey::parse(field).unwrap())
            .unwrap();
        assert_eq!(hex::encode_upper(key.as_bytes()), clear);
        assert_eq!(key.kcv6(), kcv);
    }
}
