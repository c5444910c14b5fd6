//! The journal through the running switch, on a real PostgreSQL and on the embedded SQLite:
//! one row per transaction with the right codes and who decided them, no card data in clear,
//! rows kept across a restart, and (PostgreSQL) 96 while the journal cannot be written, then
//! recovery by itself.
//!
//! PostgreSQL: `TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; each test
//! works in a schema of its own.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use cardswitch::journal::Backend;
use cardswitch::server::Switch;
use cardswitch_codec::{sample, Message};
use cardswitch_simulators::acquirer::Faults;
use cardswitch_simulators::{Acquirer, Rules};
use sqlx::Row as _;
use std::time::Duration;

mod common;

use common::{pg_schema, SwitchConfig, Terminal, TestDb};

fn sqlite_url(name: &str) -> (String, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "cardswitch-{name}-{}-{}.db",
        std::process::id(),
        fastrand::u32(..)
    ));
    (format!("sqlite://{}", path.display()), path)
}

async fn acquirer() -> Acquirer {
    common::acquirer(None).await
}

async fn switch(journal_url: &str, acquirer: &Acquirer, mode: &str) -> Switch {
    let sw = SwitchConfig::new(journal_url, acquirer.local_addr())
        .set("switch", "node", "test-node")
        .set("journal", "mode", mode)
        .keys()
        .set(
            "journal",
            "pan_hmac_key",
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
        )
        .endpoint(None, "request_timeout_ms", 300)
        .start()
        .await;
    sw
}

async fn exchange(sw: &Switch, msg: &Message) -> String {
    Terminal::connect(sw.listener_addrs()[0])
        .await
        .code(msg)
        .await
}

fn request(amount: u64, stan: u32) -> Message {
    let mut m = sample::auth_request();
    m.set_amount(amount);
    m.set_stan(stan);
    m
}

/// Every column of every row, as text.
async fn rows(backend: &Backend) -> Vec<Vec<(String, String)>> {
    const TEXT: &[&str] = &[
        "node",
        "listener",
        "mti",
        "stan",
        "rrn",
        "transmission_time",
        "terminal_id",
        "merchant_id",
        "pan_masked",
        "pan_hmac",
        "currency",
        "route",
        "endpoint",
        "link",
        "response_code",
        "decided_by",
        "auth_code",
        "request_summary",
        "reply_summary",
        "state",
    ];
    const NUMBERS: &[&str] = &[
        "id",
        "received_us",
        "amount_minor",
        "t_upstream_us",
        "t_total_us",
        "t_decode_us",
        "t_route_us",
    ];
    let exprs: Vec<String> = TEXT
        .iter()
        .map(|c| format!("COALESCE({c}, '')"))
        .chain(
            NUMBERS
                .iter()
                .map(|c| format!("COALESCE(CAST({c} AS TEXT), '')")),
        )
        .collect();
    let names: Vec<&str> = TEXT.iter().chain(NUMBERS).copied().collect();
    let sql = format!("SELECT {} FROM transactions ORDER BY id", exprs.join(", "));
    macro_rules! fetch {
        ($pool:expr) => {
            sqlx::query(&sql)
                .fetch_all($pool)
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| ((*n).to_owned(), r.get::<String, _>(i)))
                        .collect()
                })
                .collect()
        };
    }
    match backend {
        Backend::Postgres(p) => fetch!(p),
        Backend::Sqlite(p) => fetch!(p),
    }
}

fn col<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    &row.iter().find(|(n, _)| n == name).unwrap().1
}

async fn one_row_per_transaction_and_no_card_data(url: &str) {
    let acq = acquirer().await;
    let sw = switch(url, &acq, "durable").await;
    assert_eq!(exchange(&sw, &request(10_000, 1)).await, "00");
    assert_eq!(exchange(&sw, &request(10_051, 2)).await, "51");
    let mut bad = request(100, 3);
    bad.set(2, b"4761739001010011");
    assert_eq!(exchange(&sw, &bad).await, "14");
    let mut unrouted = request(100, 4);
    unrouted.set(2, b"5413330089020011");
    unrouted.remove(35);
    assert_eq!(exchange(&sw, &unrouted).await, "15");
    acq.set_rules(Rules {
        faults: Faults {
            no_reply: 100.0,
            ..Faults::default()
        },
        ..Rules::default_rules()
    });
    assert_eq!(exchange(&sw, &request(100, 5)).await, "91");
    acq.set_rules(Rules::default_rules());
    let backend = sw.pipeline().journal().backend().clone();
    let all = rows(&backend).await;
    assert_eq!(all.len(), 5);
    let expect = [
        ("000001", "00", "acquirer", "acq"),
        ("000002", "51", "acquirer", "acq"),
        ("000003", "14", "switch", ""),
        ("000004", "15", "switch", ""),
        ("000005", "91", "timeout", "acq"),
    ];
    for (row, (stan, rc, by, endpoint)) in all.iter().zip(expect) {
        assert_eq!(
            (
                col(row, "stan"),
                col(row, "response_code"),
                col(row, "decided_by"),
                col(row, "endpoint")
            ),
            (stan, rc, by, endpoint)
        );
        assert_eq!(col(row, "node"), "test-node");
        assert_eq!(col(row, "listener"), "pos");
        assert_eq!(col(row, "pan_hmac").len(), 64);
        assert!(col(row, "t_total_us").parse::<i64>().unwrap() > 0);
        assert!(col(row, "t_decode_us").parse::<i64>().is_ok());
    }
    assert_eq!(col(&all[0], "pan_masked"), "476173******0010");
    assert_eq!(col(&all[0], "amount_minor"), "10000");
    assert_eq!(col(&all[0], "currency"), "826");
    assert_eq!(col(&all[0], "auth_code").len(), 6);
    assert_eq!(col(&all[0], "route"), "476173");
    assert_eq!(col(&all[0], "link"), acq.local_addr().to_string());
    assert!(
        col(&all[0], "t_route_us").parse::<i64>().is_ok()
            && col(&all[0], "t_upstream_us").parse::<i64>().unwrap() > 0
    );
    assert_eq!(
        col(&all[2], "t_upstream_us"),
        "",
        "a switch decision never asked the acquirer"
    );
    // The same PAN hashes the same under the same key.
    assert_eq!(col(&all[0], "pan_hmac"), col(&all[1], "pan_hmac"));
    // No column of any row holds a full PAN, track data, the PIN block or DE55 tag data.
    for row in &all {
        for (name, value) in row {
            for secret in [
                "4761739001010010",
                "4761739001010011",
                "5413330089020011",
                "=28122011143878089",
                "041277CDDEEFF669",
                "041277cddeeff669",
            ] {
                assert!(
                    !value.contains(secret),
                    "column {name} holds {secret}: {value}"
                );
            }
        }
    }
    sw.shutdown().await;

    // Restart on the same database: earlier rows stay, new ones follow with later ids.
    let sw = switch(url, &acq, "durable").await;
    assert_eq!(exchange(&sw, &request(200, 6)).await, "00");
    let after = rows(sw.pipeline().journal().backend()).await;
    assert_eq!(after.len(), 6);
    assert_eq!(col(&after[5], "stan"), "000006");
    assert!(
        col(&after[5], "id").parse::<i64>().unwrap() > col(&after[4], "id").parse::<i64>().unwrap()
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn postgres_journal_rows() {
    let TestDb(url, _pool, _schema) = pg_schema("rows").await;
    one_row_per_transaction_and_no_card_data(&url).await;
}

#[tokio::test]
async fn sqlite_journal_rows() {
    let (url, path) = sqlite_url("rows");
    one_row_per_transaction_and_no_card_data(&url).await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn durable_mode_answers_96_while_the_journal_is_down_and_recovers() {
    let TestDb(url, test_pool, _schema) = pg_schema("outage").await;
    let acq = acquirer().await;
    let sw = switch(&url, &acq, "durable").await;
    assert_eq!(exchange(&sw, &request(100, 1)).await, "00");
    let Backend::Postgres(pool) = sw.pipeline().journal().backend().clone() else {
        panic!("postgres")
    };
    sqlx::query("ALTER TABLE transactions RENAME TO transactions_away")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        exchange(&sw, &request(100, 2)).await,
        "96",
        "an approval that cannot be recorded is not given"
    );
    let journal = sw.pipeline().journal().clone();
    assert!(
        journal.breaker().is_open(),
        "a failed commit opens the breaker"
    );
    let asked = acq.ledger().len();
    assert_eq!(exchange(&sw, &request(100, 3)).await, "96");
    assert_eq!(acq.ledger().len(), asked, "nothing forwarded while open");
    sqlx::query("ALTER TABLE transactions_away RENAME TO transactions")
        .execute(&pool)
        .await
        .unwrap();
    common::eventually(
        std::time::Duration::from_secs(5),
        "the breaker closed",
        || async { !journal.breaker().is_open() },
    )
    .await;
    assert_eq!(
        exchange(&sw, &request(100, 4)).await,
        "00",
        "recovered by itself"
    );
    // The acquirer's approval of the unrecorded one is reversed through store-and-forward.
    common::eventually(
        std::time::Duration::from_secs(10),
        "the unrecorded approval reversed",
        || async {
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM transactions WHERE stan = '000002'")
                    .fetch_optional(&test_pool)
                    .await
                    .unwrap();
            acq.ledger()[1].reversed && state.as_deref() == Some("reversed")
        },
    )
    .await;
    let all = rows(sw.pipeline().journal().backend()).await;
    let got: Vec<(&str, &str, &str, &str)> = all
        .iter()
        .map(|r| {
            (
                col(r, "stan"),
                col(r, "response_code"),
                col(r, "decided_by"),
                col(r, "state"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("000001", "00", "acquirer", "approved"),
            ("000002", "96", "switch", "reversed"),
            ("000003", "96", "switch", "declined"),
            ("000004", "00", "acquirer", "approved")
        ],
        "the rows written late say what the terminal was told"
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn async_mode_replies_first_and_writes_after() {
    let TestDb(url, _pool, _schema) = pg_schema("async").await;
    let acq = acquirer().await;
    let sw = switch(&url, &acq, "async").await;
    for stan in 1..=20 {
        assert_eq!(exchange(&sw, &request(100, stan)).await, "00");
    }
    sw.pipeline().journal().flush().await;
    assert_eq!(rows(sw.pipeline().journal().backend()).await.len(), 20);
    sw.shutdown().await;
    acq.stop().await;
}

/// The store-and-forward queue hands out, per card, only the oldest pending entry, and only
/// once it is due and not leased; the next entry of a card comes after the first is settled.
async fn saf_queue_keeps_each_cards_order(url: &str) {
    use cardswitch::journal::{Change, Journal, SafEntry, SafKind, SafProgress, SafState};
    let tracker = tokio_util::task::TaskTracker::new();
    let journal = Journal::start(
        &cardswitch::journal::JournalSection {
            url: url.to_owned(),
            mode: cardswitch::journal::JournalMode::Durable,
            ephemeral_keys: true,
            ..Default::default()
        },
        "n1",
        &tracker,
    )
    .await
    .unwrap();
    let now = Journal::now_us();
    // Cards a, b, c, 100 entries each, interleaved; c's entries are due only in an hour.
    let mut ids: std::collections::HashMap<&str, Vec<i64>> = std::collections::HashMap::new();
    let mut saf = Vec::new();
    for i in 0..300 {
        let card = ["a", "b", "c"][i % 3];
        let id = journal.new_id();
        ids.entry(card).or_default().push(id);
        saf.push(SafEntry {
            id,
            endpoint: "acq".into(),
            order_key: card.into(),
            kind: SafKind::Reversal,
            mti: "0420".into(),
            txn_id: None,
            payload: "x".into(),
            next_at_us: if card == "c" {
                now + 3_600_000_000
            } else {
                now
            },
            expires_us: now + 86_400_000_000,
        });
    }
    let committed = journal
        .submit(Change {
            saf,
            ..Change::default()
        })
        .await;
    assert!(committed.ok);
    let due = |at: i64| {
        let j = journal.clone();
        async move {
            j.saf_due("acq", at, 64)
                .await
                .unwrap()
                .into_iter()
                .map(|q| q.id)
                .collect::<Vec<_>>()
        }
    };
    let (a, b, c) = (&ids["a"], &ids["b"], &ids["c"]);
    assert_eq!(due(now).await, vec![a[0], b[0]]);
    // Another endpoint's queue is its own.
    assert!(journal.saf_due("other", now, 64).await.unwrap().is_empty());
    // Leased by this node: nobody gets a's entry until the lease runs out.
    assert_eq!(
        journal
            .saf_lease(&[a[0]], now, now + 1_000_000)
            .await
            .unwrap(),
        vec![a[0]]
    );
    assert!(journal
        .saf_lease(&[a[0]], now, now + 1_000_000)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(due(now).await, vec![b[0]]);
    assert_eq!(due(now + 1_000_000).await, vec![a[0], b[0]]);
    // a's first entry settled: its second comes next, behind b's first.
    let committed = journal
        .submit(Change {
            saf_progress: vec![SafProgress {
                id: a[0],
                state: SafState::Delivered,
                attempts: 1,
                next_at_us: now,
                last_code: Some("00".into()),
            }],
            ..Change::default()
        })
        .await;
    assert!(committed.ok);
    let mut expected = vec![a[1], b[0]];
    expected.sort_unstable();
    assert_eq!(due(now).await, expected);
    // In an hour c is due too, still one entry per card.
    let mut expected = vec![a[1], b[0], c[0]];
    expected.sort_unstable();
    assert_eq!(due(now + 3_600_000_000).await, expected);
    assert_eq!(journal.saf_depth(Some("acq")).await.unwrap(), 299);
}

#[tokio::test]
async fn postgres_saf_queue_keeps_each_cards_order() {
    let TestDb(url, _pool, _schema) = pg_schema("safq").await;
    saf_queue_keeps_each_cards_order(&url).await;
}

#[tokio::test]
async fn sqlite_saf_queue_keeps_each_cards_order() {
    let (url, path) = sqlite_url("safq");
    saf_queue_keeps_each_cards_order(&url).await;
    let _ = std::fs::remove_file(path);
}

/// Operators' look-ups and reports have a pool of their own: a dozen of them running without
/// pause over a large journal, during traffic, never hold up a claim or a commit: every
/// request is approved (on one shared pool some wait past their deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_look_ups_during_traffic_cost_no_96() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    const TOKEN: &str = "look-up-token-0123456789";
    let TestDb(url, pool, _schema) = pg_schema("heavy_lookups").await;
    let acq = acquirer().await;
    let sw = SwitchConfig::new(&url, acq.local_addr())
        .keys()
        .admin(TOKEN)
        .start()
        .await;
    // 300,000 rows on a date of their own for the settlement report to add up.
    sqlx::query(
        "INSERT INTO transactions (id, node, received_us, listener, mti, processing_code, \
         response_code, decided_by, request_summary, reply_summary, t_total_us, state, \
         endpoint, business_date, amount_minor, currency) \
         SELECT -g, 'old', 0, 'pos', '0200', '000000', '00', 'acquirer', '{}', '{}', 0, \
         'approved', 'acq', '2000-01-01', g % 1000, '826' FROM generate_series(1, 300000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE transactions")
        .execute(&pool)
        .await
        .unwrap();

    let admin = sw.admin_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut lookups = Vec::new();
    for i in 0..12 {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        lookups.push(std::thread::spawn(move || {
            let url = if i % 2 == 0 {
                format!("http://{admin}/api/settlement?date=2000-01-01")
            } else {
                format!("http://{admin}/api/transactions?terminal=T0000001&limit=200")
            };
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let status = ureq::get(&url)
                    .header("Authorization", &format!("Bearer {TOKEN}"))
                    .call()
                    .map_or_else(|e| format!("{e}"), |r| r.status().to_string());
                statuses.push(status);
                done.fetch_add(1, Ordering::Relaxed);
            }
            statuses
        }));
    }
    // The look-ups are under way before the traffic starts.
    common::eventually(Duration::from_secs(30), "look-ups answered", || {
        let done = Arc::clone(&done);
        async move { done.load(Ordering::Relaxed) >= 12 }
    })
    .await;
    let before = done.load(Ordering::Relaxed);

    // Four terminals, 100 requests each, while the look-ups go on.
    let mut terminals = Vec::new();
    for t in 0..4u32 {
        let addr = sw.listener_addrs()[0];
        terminals.push(tokio::spawn(async move {
            let mut term = Terminal::connect(addr).await;
            let mut codes = Vec::new();
            for n in 0..100u32 {
                let mut m = request(1_000, t * 1_000 + n + 1);
                m.set(37, format!("{:012}", t * 1_000 + n + 1).as_bytes());
                codes.push(term.code(&m).await);
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for t in terminals {
        for c in t.await.unwrap() {
            *codes.entry(c).or_default() += 1;
        }
    }
    let during = done.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = std::collections::BTreeMap::<String, u32>::new();
    for l in lookups {
        for s in l.join().unwrap() {
            *statuses.entry(s).or_default() += 1;
        }
    }
    assert_eq!(codes.get("00"), Some(&400), "{codes:?}");
    assert!(
        during > 0,
        "the look-ups ran during the traffic: {statuses:?}"
    );
    assert_eq!(statuses.len(), 1, "every look-up answered: {statuses:?}");
    assert!(statuses.contains_key("200 OK"), "{statuses:?}");
    sw.shutdown().await;
    acq.stop().await;
}

/// A key completed with its claim is written even when the database lost the claim (claims
/// commit without waiting for the disk; a PostgreSQL crash can lose one while its request goes
/// on), and a claim still there is completed in place.
async fn a_completed_key_survives_a_lost_claim(url: &str) {
    use cardswitch::journal::claims::Claim;
    use cardswitch::journal::{Change, Journal};
    let tracker = tokio_util::task::TaskTracker::new();
    let journal = Journal::start(
        &cardswitch::journal::JournalSection {
            url: url.to_owned(),
            ephemeral_keys: true,
            ..Default::default()
        },
        "n1",
        &tracker,
    )
    .await
    .unwrap();
    let done = |key: &str, hash: Option<&str>, reply: &str| Change {
        dedup_done: Some((key.to_owned(), reply.to_owned())),
        dedup_claim: hash.map(|h| (h.to_owned(), 7)),
        ..Change::default()
    };
    // Lost: never in the table.
    assert!(journal.submit(done("lost", Some("h1"), "r1")).await.ok);
    assert_eq!(
        journal.claims().look("lost", "h1").await,
        Claim::Done("r1".into())
    );
    // Still there: completed in place, one row.
    assert_eq!(
        journal.claims().claim("kept".into(), "h2".into(), 8).await,
        Claim::New
    );
    assert_eq!(journal.claims().look("kept", "h2").await, Claim::InFlight);
    assert!(journal.submit(done("kept", Some("h2"), "r2")).await.ok);
    assert_eq!(
        journal.claims().look("kept", "h2").await,
        Claim::Done("r2".into())
    );
    // Without its claim, a lost key stays lost (what the claim is carried for).
    assert!(journal.submit(done("bare", None, "r3")).await.ok);
    assert_eq!(
        journal.claims().look("bare", "h3").await,
        Claim::Unavailable
    );
    drop(journal);
    tracker.close();
}

#[tokio::test]
async fn postgres_a_completed_key_survives_a_lost_claim() {
    let TestDb(url, _pool, _schema) = pg_schema("lost_claim").await;
    a_completed_key_survives_a_lost_claim(&url).await;
}

#[tokio::test]
async fn sqlite_a_completed_key_survives_a_lost_claim() {
    let (url, path) = sqlite_url("lost_claim");
    a_completed_key_survives_a_lost_claim(&url).await;
    let _ = std::fs::remove_file(path);
}
