//! The terminal simulator against the acquirer simulator over real sockets: what one sends the
//! other answers, the ledger agrees with the replies, and faults show up as they should.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use cardswitch_codec::framing::{Framing, LengthPrefix};
use cardswitch_codec::Dialect;
use cardswitch_simulators::acquirer::Faults;
use cardswitch_simulators::{
    terminal, Acquirer, AcquirerConfig, Load, Rules, Stop, TerminalConfig,
};

async fn acquirer(dialect: &str, framing: Framing) -> Acquirer {
    Acquirer::start(AcquirerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        dialect: Dialect::builtin(dialect).unwrap(),
        framing,
        rules: Rules::default_rules(),
        tls: None,
        security: None,
    })
    .await
    .unwrap()
}

fn config(
    acq: &Acquirer,
    dialect: &str,
    framing: Framing,
    load: Load,
    stop: Stop,
) -> TerminalConfig {
    TerminalConfig {
        target: acq.local_addr(),
        dialect: Dialect::builtin(dialect).unwrap(),
        framing,
        load,
        stop,
        timeout: Duration::from_millis(500),
        bins: vec!["476173".into()],
        card_only: true,
        security: None,
    }
}

#[tokio::test]
async fn closed_loop_every_request_answered_and_the_ledger_agrees() {
    for (dialect, prefix) in [
        ("iso87-ascii", LengthPrefix::Bin2),
        ("iso87-bcd", LengthPrefix::Ascii4),
    ] {
        let framing = Framing::with_prefix(prefix);
        let acq = acquirer(dialect, framing).await;
        let cfg = config(
            &acq,
            dialect,
            framing,
            Load::Closed {
                connections: 3,
                depth: 8,
            },
            Stop::Count(3000),
        );
        let report = terminal::run(cfg).await.unwrap();
        assert_eq!(
            (report.sent, report.received, report.timeouts, report.errors),
            (3000, 3000, 0, 0),
            "{dialect}"
        );
        let code = |c: &str| report.response_codes.get(c).copied().unwrap_or(0);
        let approved_replies = code("00") + code("10");
        let ledger = acq.ledger();
        assert_eq!(ledger.len(), 3000, "{dialect}");
        let approved_in_ledger = ledger.iter().filter(|e| e.auth_code.is_some()).count() as u64;
        assert_eq!(approved_in_ledger, approved_replies, "{dialect}");
        // Amounts ending 51 and 05 are declined with those codes, those ending 10 approved for
        // half, everything else approved.
        for e in &ledger {
            let expected = match e.requested % 100 {
                51 => "51",
                5 => "05",
                10 => "10",
                _ => "00",
            };
            assert_eq!(e.response_code, expected, "{e:?}");
            assert_eq!(e.auth_code.is_some(), matches!(expected, "00" | "10"));
            let approved = if expected == "10" {
                e.requested / 2
            } else {
                e.requested
            };
            assert_eq!(e.amount, approved, "{e:?}");
        }
        acq.stop().await;
    }
}

#[tokio::test]
async fn open_loop_and_one_connection_per_transaction() {
    let framing = Framing::default();
    let acq = acquirer("iso87-ascii", framing).await;
    let open = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::Open {
            rate: 500,
            connections: 2,
        },
        Stop::Count(200),
    ))
    .await
    .unwrap();
    assert_eq!((open.sent, open.received, open.timeouts), (200, 200, 0));
    assert!(
        open.elapsed_s >= 0.35,
        "200 requests at 500/s take about 0.4 s, took {}",
        open.elapsed_s
    );
    let per_txn = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::PerTransaction { concurrency: 2 },
        Stop::Count(50),
    ))
    .await
    .unwrap();
    assert_eq!((per_txn.sent, per_txn.received), (50, 50));
    acq.stop().await;
}

#[tokio::test]
async fn faults_on_command() {
    let framing = Framing::default();
    let acq = acquirer("iso87-ascii", framing).await;
    let with = |faults: Faults| Rules {
        faults,
        ..Rules::default_rules()
    };

    acq.set_rules(with(Faults {
        no_reply: 100.0,
        ..Faults::default()
    }));
    let r = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::Closed {
            connections: 1,
            depth: 5,
        },
        Stop::Count(5),
    ))
    .await
    .unwrap();
    assert_eq!((r.received, r.timeouts), (0, 5));
    assert!(
        acq.ledger().is_empty(),
        "dropped requests are never recorded"
    );

    acq.set_rules(with(Faults {
        duplicate: 100.0,
        ..Faults::default()
    }));
    let r = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::Closed {
            connections: 1,
            depth: 1,
        },
        Stop::Count(20),
    ))
    .await
    .unwrap();
    assert_eq!(r.received, 20);
    assert_eq!(
        acq.stats()
            .duplicated
            .load(std::sync::atomic::Ordering::Relaxed),
        20
    );

    acq.set_rules(with(Faults {
        late: 100.0,
        late_ms: 800,
        ..Faults::default()
    }));
    let r = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::Closed {
            connections: 1,
            depth: 3,
        },
        Stop::Count(3),
    ))
    .await
    .unwrap();
    assert_eq!(
        r.timeouts, 3,
        "late replies arrive after the 500 ms timeout"
    );
    assert_eq!(
        acq.ledger()
            .iter()
            .filter(|e| matches!(e.response_code.as_str(), "00" | "05" | "10" | "51"))
            .count(),
        23
    );

    acq.set_rules(with(Faults {
        garbage: 100.0,
        ..Faults::default()
    }));
    let r = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::Closed {
            connections: 1,
            depth: 1,
        },
        Stop::Count(3),
    ))
    .await
    .unwrap();
    assert_eq!(r.received, 0);
    assert!(r.errors >= 1, "{r:?}");

    acq.set_rules(with(Faults {
        disconnect: 100.0,
        ..Faults::default()
    }));
    let r = terminal::run(config(
        &acq,
        "iso87-ascii",
        framing,
        Load::Closed {
            connections: 1,
            depth: 1,
        },
        Stop::Count(3),
    ))
    .await
    .unwrap();
    assert_eq!(r.received, 0);
    assert!(
        acq.stats()
            .disconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    acq.stop().await;
}

#[test]
fn shipped_rules_parse_and_bad_rules_are_refused() {
    let rules = Rules::default_rules();
    assert_eq!(rules.default_code, "00");
    assert_eq!(rules.amount_rules.len(), 3);
    assert!(Rules::from_toml(
        "[[amount_rules]]\nsuffix = \"10\"\ncode = \"10\"\napprove_percent = 0"
    )
    .is_err());
    assert!(Rules::from_toml("default_code = \"000\"").is_err());
    assert!(Rules::from_toml("[[amount_rules]]\nsuffix = \"5\"\ncode = \"51\"").is_err());
    assert!(Rules::from_toml("defualt_code = \"00\"").is_err());
}
