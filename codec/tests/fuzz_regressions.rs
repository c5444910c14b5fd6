//! Inputs kept from fuzzing and edge cases around it, one folder per dialect under
//! `tests/fuzz_regressions/`. Each must decode without panicking, and whatever decodes must
//! survive an encode and a second decode unchanged (the fuzz targets' own check).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::path::Path;

use cardswitch_codec::{Dialect, BUILTIN_DIALECTS};

#[test]
fn kept_inputs_decode_or_fail_cleanly_and_round_trip() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut seen = 0;
    for (name, _) in BUILTIN_DIALECTS {
        let dialect = Dialect::builtin(name).unwrap();
        let dir = root.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            seen += 1;
            if let Ok(msg) = dialect.decode(&data) {
                let wire = dialect.encode_to_vec(&msg).unwrap();
                assert_eq!(dialect.decode(&wire).unwrap(), msg, "{}", path.display());
            }
        }
    }
    assert!(
        seen >= BUILTIN_DIALECTS.len(),
        "kept inputs missing: {seen}"
    );
}
