#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use super::*;

const HMAC: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn txn() -> Txn<'static> {
    Txn {
        pan: "4761739001010010",
        pan_hmac: HMAC,
        terminal: "T0000001",
        merchant: "M1",
        amount: 1_000,
        mcc: Some(5411),
        currency: Some(826),
        country: Some(826),
        entry_mode: Some("051"),
        expiry: Some("2812"),
        month: "2611",
        now_s: 1_000_000,
    }
}

fn engine(rule: &str) -> Engine {
    Engine::from_toml(&format!(
        "[settings]\nmax_keys = 10000\n[[rules]]\nname = \"r\"\n{rule}\n\
         [[card_ranges]]\nprefix = \"476173\"\ncountry = 826\ncurrency = 826\n\
         [[terminals]]\nterminal = \"LONDON01\"\nlat = 51.5\nlon = -0.12\n\
         [[terminals]]\nterminal = \"NYC00001\"\nlat = 40.7\nlon = -74.0\n\
         [[terminals]]\nterminal = \"LONDON02\"\nlat = 51.52\nlon = -0.10\n"
    ))
    .unwrap()
}

fn declined(e: &Engine, t: &Txn<'_>) -> Option<String> {
    e.evaluate(t).decline.map(|(_, c)| c.to_string())
}

#[test]
fn velocity_fires_past_its_count_and_amount() {
    let e =
        engine("kind = \"velocity\"\nkey = \"pan\"\nwindow_s = 80\nmax_count = 3\naction = \"65\"");
    let mut t = txn();
    for i in 0..3 {
        t.now_s = 1_000_000 + i;
        assert_eq!(declined(&e, &t), None, "transaction {}", i + 1);
    }
    t.now_s += 1;
    assert_eq!(declined(&e, &t).as_deref(), Some("65"), "the fourth");
    // Another card is not affected; a window later the card is clear again.
    let other = Txn {
        pan_hmac: "ffffffffffffffff0123456789abcdef0123456789abcdef0123456789abcdef",
        ..t
    };
    assert_eq!(declined(&e, &other), None);
    t.now_s += 100;
    assert_eq!(declined(&e, &t), None);

    let e = engine("kind = \"velocity\"\nkey = \"terminal\"\nwindow_s = 60\nmax_amount_minor = 2500\naction = \"61\"");
    let mut t = txn();
    assert_eq!(declined(&e, &t), None); // 1,000
    t.amount = 1_500;
    assert_eq!(declined(&e, &t), None); // 2,500: at the limit
    t.amount = 1;
    assert_eq!(declined(&e, &t).as_deref(), Some("61")); // 2,501
                                                         // Keyed by terminal: another terminal starts from zero.
    t.terminal = "T0000002";
    assert_eq!(declined(&e, &t), None);
    assert_eq!(e.stats()[0].hits, 1);
}

#[test]
fn card_testing_counts_distinct_cards() {
    let e = engine("kind = \"card_testing\"\nwindow_s = 600\nmax_distinct_cards = 3");
    let hmacs: Vec<String> = (1..=5u64)
        .map(|i| {
            format!(
                "{:016x}{}",
                i.wrapping_mul(0x1234_5678_9ABC_DEF1),
                &HMAC[16..]
            )
        })
        .collect();
    let mut t = txn();
    for h in hmacs.iter().take(3) {
        t.pan_hmac = h;
        assert_eq!(declined(&e, &t), None);
    }
    // The same card again is not a new one.
    t.pan_hmac = &hmacs[0];
    assert_eq!(declined(&e, &t), None);
    t.pan_hmac = &hmacs[3];
    assert_eq!(declined(&e, &t).as_deref(), Some("59"));
    // Outside the window the old cards no longer count.
    t.now_s += 700;
    t.pan_hmac = &hmacs[4];
    assert_eq!(declined(&e, &t), None);
}

#[test]
fn mcc_rules_and_block_lists() {
    let e =
        engine("kind = \"mcc_amount_limit\"\nlimits = [{ mcc = 7995, max_amount_minor = 5000 }]");
    let mut t = txn();
    t.mcc = Some(7995);
    t.amount = 5_000;
    assert_eq!(declined(&e, &t), None);
    t.amount = 5_001;
    assert!(declined(&e, &t).is_some());
    t.mcc = Some(5411);
    assert_eq!(declined(&e, &t), None);

    let e = engine("kind = \"high_risk_mcc\"\nmccs = [7995, 5967]");
    let mut t = txn();
    assert_eq!(declined(&e, &t), None);
    t.mcc = Some(5967);
    assert!(declined(&e, &t).is_some());

    let e = engine(&format!(
        "kind = \"block_list\"\npan_hmacs = [\"{}\"]\nranges = [\"541333\"]",
        HMAC.to_uppercase()
    ));
    let mut t = txn();
    assert!(declined(&e, &t).is_some(), "by HMAC, whatever the case");
    t.pan_hmac = "00";
    assert_eq!(declined(&e, &t), None);
    t.pan = "5413330000000019";
    assert!(declined(&e, &t).is_some(), "by range");
}

#[test]
fn country_card_not_present_expiry_fallback() {
    let e = engine("kind = \"country_mismatch\"\ncurrency = true");
    let mut t = txn();
    assert_eq!(declined(&e, &t), None);
    t.country = Some(840);
    assert!(declined(&e, &t).is_some());
    t.country = None;
    t.currency = Some(978);
    assert!(declined(&e, &t).is_some());
    t.pan = "5413330000000019"; // no home known: nothing to compare
    assert_eq!(declined(&e, &t), None);

    let e = engine("kind = \"card_not_present\"\nmax_amount_minor = 10000");
    let mut t = txn();
    t.entry_mode = Some("812");
    t.amount = 10_000;
    assert_eq!(declined(&e, &t), None);
    t.amount = 10_001;
    assert!(declined(&e, &t).is_some());
    t.entry_mode = Some("051");
    assert_eq!(declined(&e, &t), None);

    let e = engine("kind = \"expired_card\"");
    let mut t = txn();
    t.expiry = Some("2611"); // this month: still valid
    assert_eq!(declined(&e, &t), None);
    t.expiry = Some("2610");
    assert!(declined(&e, &t).is_some());

    let e = engine("kind = \"chip_fallback\"");
    let mut t = txn();
    assert_eq!(declined(&e, &t), None);
    t.entry_mode = Some("801");
    assert!(declined(&e, &t).is_some());
}

#[test]
fn impossible_travel() {
    let e = engine("kind = \"impossible_travel\"\nmax_speed_kmh = 900");
    let mut t = txn();
    t.terminal = "LONDON01";
    assert_eq!(declined(&e, &t), None);
    // London to New York (~5,570 km) in 5 hours: 1,100 km/h.
    t.terminal = "NYC00001";
    t.now_s += 5 * 3600;
    assert!(declined(&e, &t).is_some());
    // Back to London 7 hours later: 800 km/h, possible.
    t.terminal = "LONDON01";
    t.now_s += 7 * 3600;
    assert_eq!(declined(&e, &t), None);
    // Across town at once: under 50 km never fires.
    t.terminal = "LONDON02";
    assert_eq!(declined(&e, &t), None);
    // An unknown terminal says nothing.
    t.terminal = "NOWHERE1";
    assert_eq!(declined(&e, &t), None);
}

#[test]
fn score_adds_weights_of_score_only_rules() {
    let e = Engine::from_toml(
        "[[rules]]\nname = \"mcc\"\nkind = \"high_risk_mcc\"\nmccs = [7995]\naction = \"none\"\nweight = 40\n\
         [[rules]]\nname = \"cnp\"\nkind = \"card_not_present\"\nmax_amount_minor = 0\naction = \"none\"\nweight = 30\n\
         [[rules]]\nname = \"score\"\nkind = \"score\"\nflag_at = 30\ndecline_at = 70\naction = \"05\"\n",
    )
    .unwrap();
    let mut t = txn();
    let v = e.evaluate(&t);
    assert_eq!((v.score, v.flagged, v.decline), (0, false, None));
    t.entry_mode = Some("812");
    let v = e.evaluate(&t);
    assert_eq!(
        (v.score, v.flagged, v.decline),
        (30, true, None),
        "flagged, not declined"
    );
    t.mcc = Some(7995);
    let v = e.evaluate(&t);
    assert_eq!(v.score, 70);
    assert_eq!(
        v.decline.map(|(i, c)| (i, c.to_string())),
        Some((2, "05".into()))
    );
    assert_eq!(
        e.explain(&v),
        [
            "mcc (high-risk MCC)",
            "cnp (card not present above 0 minor units)",
            "score (score at or above 70)"
        ]
    );
}

#[test]
fn shadow_rules_record_and_never_decline() {
    let e = Engine::from_toml(
        "[[rules]]\nname = \"block\"\nkind = \"block_list\"\nranges = [\"476173\"]\nmode = \"shadow\"\n\
         [[rules]]\nname = \"off\"\nkind = \"chip_fallback\"\nmode = \"off\"\n",
    )
    .unwrap();
    let mut t = txn();
    t.entry_mode = Some("801");
    for _ in 0..10 {
        let v = e.evaluate(&t);
        assert_eq!(v.decline, None);
        assert_eq!(v.shadow, 1);
        assert_eq!(v.fired, 0);
    }
    let stats = e.stats();
    assert_eq!((stats[0].hits, stats[0].shadow_hits), (0, 10));
    assert_eq!(
        (stats[1].hits, stats[1].shadow_hits),
        (0, 0),
        "off is not evaluated"
    );
    assert_eq!(
        e.explain(&e.evaluate(&t)),
        ["shadow:block (card or range on the block list)"]
    );
}

#[test]
fn bad_files_are_refused_with_the_rule_named() {
    for (text, says) in [
        ("[[rules]]\nname = \"v\"\nkind = \"velocity\"\nkey = \"pan\"\nwindow_s = 60", "max_count or max_amount_minor"),
        ("[[rules]]\nname = \"v\"\nkind = \"velocity\"\nkey = \"card\"\nwindow_s = 60\nmax_count = 1", "rule v"),
        ("[[rules]]\nname = \"x\"\nkind = \"teleport\"", "rule x"),
        ("[[rules]]\nname = \"x\"\nkind = \"expired_card\"\ncolour = 1", "rule x"),
        ("[[rules]]\nname = \"x\"\nkind = \"expired_card\"\naction = \"5\"", "not two characters"),
        ("[[rules]]\nname = \"x\"\nkind = \"expired_card\"\n[[rules]]\nname = \"x\"\nkind = \"chip_fallback\"", "name used twice"),
        ("[[rules]]\nname = \"s\"\nkind = \"score\"\nflag_at = 9\ndecline_at = 5", "flag_at"),
        ("[[rules]]\nname = \"c\"\nkind = \"card_testing\"\nwindow_s = 60\nmax_distinct_cards = 40", "max_distinct_cards"),
        ("[settings]\nmax_keys = 0", "max_keys"),
    ] {
        let err = match Engine::from_toml(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(says), "{text}\n-> {err}");
    }
}

#[test]
fn state_stays_within_its_cap_and_survives_a_reload() {
    let text = "[settings]\nmax_keys = 5000\n[[rules]]\nname = \"v\"\nkind = \"velocity\"\nkey = \"pan\"\nwindow_s = 3600\nmax_count = 2";
    let e = Engine::from_toml(text).unwrap();
    let bytes = e.state_bytes();
    let mut t = txn();
    let hmacs: Vec<String> = (0..50_000u64)
        .map(|i| {
            format!(
                "{:016x}{}",
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                &HMAC[16..]
            )
        })
        .collect();
    for h in &hmacs {
        t.pan_hmac = h;
        let _ = e.evaluate(&t);
    }
    assert_eq!(e.state_bytes(), bytes, "no growth with 10x the keys");
    let cap = match &e.rules[0].check {
        Check::Velocity(v) => v.state.capacity(),
        _ => 0,
    };
    assert!((5_000..6_000).contains(&cap), "{cap}");
    // A card seen twice keeps its count through a reload of the same rule.
    t.pan_hmac = HMAC;
    assert_eq!(declined(&e, &t), None);
    assert_eq!(declined(&e, &t), None);
    let reloaded = Engine::from_toml_keeping(text, Some(&e)).unwrap();
    assert!(declined(&reloaded, &t).is_some(), "third within the window");
    // A changed window starts afresh.
    let changed = Engine::from_toml_keeping(&text.replace("3600", "1800"), Some(&e)).unwrap();
    assert_eq!(declined(&changed, &t), None);
}

#[test]
fn the_shipped_rules_file_loads() {
    let e = Engine::from_toml(include_str!("../../specs/fraud-rules.toml")).unwrap();
    assert!(e.len() >= 12);
}

#[test]
fn yymm_of_known_dates() {
    assert_eq!(&yymm(0), b"7001");
    assert_eq!(&yymm(1_795_266_016), b"2611"); // 2026-11-21
    assert_eq!(&yymm(951_782_400), b"0002"); // 2000-02-29
    assert_eq!(&yymm(4_102_444_799), b"9912"); // 2099-12-31 23:59:59
}
