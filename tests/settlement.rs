//! Settlement end to end: terminal batch settlement (0500 balanced and unbalanced, 0320 upload,
//! reversals and refunds inside a batch), cutover with a transaction in flight, clearing-file
//! reconciliation (clean, injected, re-run), chargebacks in a transaction's history, the
//! settlement report. PostgreSQL journal, real sockets, the acquirer simulator.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)] // tests

use std::collections::BTreeMap;
use std::time::Duration;

use cardswitch::server::Switch;
use cardswitch::settlement::{format_date, recon};
use cardswitch_codec::totals::Totals;
use cardswitch_codec::{Message, Mti};
use cardswitch_simulators::acquirer::Latency;
use cardswitch_simulators::clearing::{self, kinds, ClearingRecord, Injected, Injection};
use cardswitch_simulators::Acquirer;
use sqlx::PgPool;

mod common;

use common::{acquirer, pg_schema, SwitchConfig, Terminal, TestDb};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const TOKEN: &str = "settlement-token-0123456789";

/// The settlement tests' switch: journal keys shared with the acquirer, admin side, fees.
fn config(url: &str, acq: &Acquirer) -> SwitchConfig {
    acq.set_pan_hmac_key(&hex::decode(KEY).unwrap());
    SwitchConfig::new(url, acq.local_addr())
        .keys()
        .set("journal", "pan_hmac_key", KEY)
        .admin(TOKEN)
        .endpoint(None, "request_timeout_ms", 5000)
        .endpoint(Some("settlement"), "fee_rate", "0.0125")
}

async fn switch(url: &str, acq: &Acquirer) -> Switch {
    config(url, acq).start().await
}

/// A 0200 (purchase, or refund with `refund`) in batch `batch`.
fn sale(amount: u64, stan: u32, rrn: &str, batch: &str, refund: bool) -> Message {
    let mut m = common::request(amount, stan, rrn);
    m.set_mti(Mti::new(*b"0200").unwrap());
    if refund {
        m.set(3, b"200000");
    }
    m.set(60, batch.as_bytes());
    m.remove(52);
    m
}

fn auth(amount: u64, stan: u32, rrn: &str, batch: &str) -> Message {
    let mut m = common::request(amount, stan, rrn);
    m.set(60, batch.as_bytes());
    m.remove(52);
    m
}

/// A reversal of `original` (DE90), with DE95 when only part is reversed.
fn reversal(original: &Message, mti: &[u8; 4], stan: u32, standing: Option<u64>) -> Message {
    let mut r = original.clone();
    r.set_mti(Mti::new(*mti).unwrap());
    let de90 = format!(
        "{}{}{}{:0>22}",
        original.mti(),
        original.get_str(11).unwrap(),
        original.get_str(7).unwrap(),
        ""
    );
    r.set(90, de90.as_bytes());
    r.set_stan(stan);
    if let Some(s) = standing {
        r.set(95, format!("{s:012}{:012}{:09}{:09}", 0, 0, 0).as_bytes());
    }
    r
}

fn settlement_request(mti: &[u8; 4], stan: u32, batch: &str, totals: &Totals) -> Message {
    let mut m = Message::builder(Mti::new(*mti).unwrap())
        .field(7, "1121093015")
        .stan(stan)
        .field(41, "TERM0001")
        .field(42, "MERCHANT0000001")
        .field(49, "826")
        .field(60, batch)
        .build();
    totals.write(&mut m);
    m
}

fn upload(original: &Message, stan: u32) -> Message {
    let mut m = Message::builder(Mti::new(*b"0320").unwrap())
        .field(2, original.get(2).unwrap())
        .field(3, original.get(3).unwrap())
        .field(4, original.get(4).unwrap())
        .field(7, "1121093015")
        .stan(stan)
        .field(37, original.get(37).unwrap())
        .field(41, "TERM0001")
        .field(42, "MERCHANT0000001")
        .field(49, "826")
        .field(60, original.get(60).unwrap())
        .build();
    if let Some(a) = original.get(38) {
        m.set(38, a);
    }
    m
}

fn rc(m: &Message) -> String {
    m.get_str(39).unwrap_or("--").to_owned()
}

async fn closed_batches(pool: &PgPool, batch: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM batches WHERE batch_number = $1 AND state = 'closed'")
        .bind(batch)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[test]
fn terminal_batches_settle_and_uploads_fix_an_unbalanced_one() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("batch").await;
        let acq = acquirer(None).await;
        let sw = switch(&url, &acq).await;
        let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

        // Batch 000001: sales, a full and a partial reversal, a refund, a decline, an auth.
        let a = sale(10_000, 1, "000000000101", "000001", false);
        let b = sale(5_000, 2, "000000000102", "000001", false);
        let c = sale(8_000, 3, "000000000103", "000001", false);
        let d = sale(2_500, 4, "000000000104", "000001", true);
        let e = sale(4_051, 5, "000000000105", "000001", false);
        let h = auth(900, 6, "000000000106", "000001");
        for m in [&a, &b, &c, &d, &h] {
            assert_eq!(rc(&t.exchange(m).await), "00");
        }
        assert_eq!(rc(&t.exchange(&e).await), "51");
        assert_eq!(rc(&t.exchange(&reversal(&b, b"0400", 7, None)).await), "00");
        assert_eq!(
            rc(&t.exchange(&reversal(&c, b"0400", 8, Some(6_000))).await),
            "00"
        );
        // What the terminal counts: debits A and what stands of C; B and C's 2,000 reversed;
        // the refund as a credit; the 0100 as an authorization; the decline not at all.
        let mine = Totals {
            debits: 2,
            debits_amount: 10_000 + 6_000,
            debit_reversals: 2,
            debit_reversals_amount: 5_000 + 2_000,
            credits: 1,
            credits_amount: 2_500,
            authorizations: 1,
            ..Totals::default()
        };
        let reply = t
            .exchange(&settlement_request(b"0500", 9, "000001", &mine))
            .await;
        assert_eq!(reply.mti().as_bytes(), b"0510");
        assert_eq!(rc(&reply), "00");
        assert_eq!(reply.get_str(66), Some("1"));
        assert_eq!(Totals::read(&reply).unwrap(), mine);
        assert_eq!(reply.get_str(97), Some("C0000000000013500"));
        assert_eq!(closed_batches(&pool, "000001").await, 1);
        // Sent again (the terminal missed the 0510): the same answer, still one closed batch.
        let again = t
            .exchange(&settlement_request(b"0500", 10, "000001", &mine))
            .await;
        assert_eq!(rc(&again), "00");
        assert_eq!(closed_batches(&pool, "000001").await, 1);
        // A total off by one minor unit: 95 with the switch's totals.
        let mut off = mine;
        off.debits_amount += 1;
        let reply = t
            .exchange(&settlement_request(b"0520", 11, "000001", &off))
            .await;
        assert_eq!(reply.mti().as_bytes(), b"0530");
        assert_eq!(rc(&reply), "95");
        assert_eq!(Totals::read(&reply).unwrap(), mine);

        // Batch 000002: two sales the switch saw, and one the terminal approved offline.
        let f = sale(1_000, 20, "000000000201", "000002", false);
        let g = sale(2_000, 21, "000000000202", "000002", false);
        let mut f_reply = Message::new(Mti::new(*b"0210").unwrap());
        for m in [&f, &g] {
            f_reply = t.exchange(m).await;
            assert_eq!(rc(&f_reply), "00");
        }
        let mut offline = sale(700, 22, "000000000203", "000002", false);
        offline.set(38, b"OFF001");
        let mine2 = Totals {
            debits: 3,
            debits_amount: 3_700,
            ..Totals::default()
        };
        let reply = t
            .exchange(&settlement_request(b"0500", 23, "000002", &mine2))
            .await;
        assert_eq!(rc(&reply), "95");
        assert_eq!(reply.get_str(66), Some("2"));
        let theirs = Totals::read(&reply).unwrap();
        assert_eq!((theirs.debits, theirs.debits_amount), (2, 3_000));
        assert_eq!(closed_batches(&pool, "000002").await, 0);
        // Upload every transaction of the batch; then the retry agrees.
        let mut with_code = g.clone();
        with_code.set(38, f_reply.get(38).unwrap());
        for (i, m) in [&f, &with_code, &offline].into_iter().enumerate() {
            let r = t.exchange(&upload(m, 30 + u32::try_from(i).unwrap())).await;
            assert_eq!(r.mti().as_bytes(), b"0330");
            assert_eq!(rc(&r), "00");
        }
        let uploaded: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM transactions WHERE mti = '0320' AND state = 'uploaded' AND batch_number = '000002'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(uploaded, 3);
        let reply = t
            .exchange(&settlement_request(b"0500", 40, "000002", &mine2))
            .await;
        assert_eq!(rc(&reply), "00");
        assert_eq!(closed_batches(&pool, "000002").await, 1);
        let (n, exceptions): (i64, String) = sqlx::query_as(
            "SELECT uploaded, exceptions FROM batches WHERE batch_number = '000002'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 3);
        let exceptions: serde_json::Value = serde_json::from_str(&exceptions).unwrap();
        assert_eq!(exceptions.as_array().unwrap().len(), 1, "{exceptions}");
        assert_eq!(exceptions[0]["rrn"], "000000000203");
        assert_eq!(exceptions[0]["what"], "uploaded, not approved here");

        // A settlement request without its totals is a format error.
        let mut bad = settlement_request(b"0500", 41, "000003", &mine);
        bad.remove(88);
        assert_eq!(rc(&t.exchange(&bad).await), "30");

        // Every row carries the acquirer's business date and the batch number.
        let today = format_date(acq.business_date());
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT mti, business_date, batch_number FROM transactions WHERE mti IN ('0100', '0200', '0400')",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 10);
        for (mti, date, batch) in rows {
            assert_eq!(date.as_deref(), Some(today.as_str()), "{mti}");
            assert!(batch.is_some(), "{mti}");
        }
        sw.shutdown().await;
        acq.stop().await;
    });
}

#[test]
fn a_transaction_in_flight_across_a_cutover_counts_once_on_the_old_date() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("cutover").await;
        let acq = acquirer(None).await;
        let sw = switch(&url, &acq).await;
        let addr = sw.listener_addrs()[0];
        let old = acq.business_date();
        let mut slow_rules = acq.rules();
        slow_rules.latency = Latency {
            min_ms: 1_000,
            max_ms: 1_000,
        };
        acq.set_rules(slow_rules);
        // In flight: the host decides at once (on the old date) and answers a second later.
        let in_flight = tokio::spawn(async move {
            let mut t = Terminal::connect(addr).await;
            t.exchange(&sale(1_234, 1, "000000000301", "000001", false))
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (closed, answer) = acq.cutover(Duration::from_secs(3)).await.unwrap();
        assert_eq!(closed, old);
        assert_eq!(answer.as_deref(), Some("00"));
        let reply = in_flight.await.unwrap();
        assert_eq!(rc(&reply), "00");
        let mut rules = acq.rules();
        rules.latency = Latency::default();
        acq.set_rules(rules);
        let mut t = Terminal::connect(addr).await;
        assert_eq!(
            rc(&t
                .exchange(&sale(4_321, 2, "000000000302", "000001", false))
                .await),
            "00"
        );
        let new = format_date(old.next_day().unwrap());
        let old = format_date(old);
        let date_of = |rrn: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT business_date FROM transactions WHERE rrn = $1",
                )
                .bind(rrn)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        assert_eq!(date_of("000000000301").await, old);
        assert_eq!(date_of("000000000302").await, new);
        let (closed_s, opened_s, cause): (String, String, String) =
            sqlx::query_as("SELECT closed, opened, cause FROM cutovers WHERE endpoint = 'acq'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            (closed_s, opened_s.clone(), cause.as_str()),
            (old.clone(), new.clone(), "0800/201")
        );
        let open: String =
            sqlx::query_scalar("SELECT business_date FROM business_dates WHERE endpoint = 'acq'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(open, new);
        // The settlement report of each date counts each transaction once.
        let on_old = settlement_report(&sw, old.clone()).await;
        let on_new = settlement_report(&sw, new.clone()).await;
        let purchases = |r: &serde_json::Value| -> Vec<(u64, i64)> {
            r["lines"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["type"] == "purchase")
                .map(|l| {
                    (
                        l["count"].as_u64().unwrap(),
                        l["amount_minor"].as_i64().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(purchases(&on_old), vec![(1, 1_234)]);
        assert_eq!(purchases(&on_new), vec![(1, 4_321)]);
        // And so does the acquirer's clearing file.
        let files = (
            acq.clearing_file(cardswitch::settlement::parse_date(&old).unwrap()),
            acq.clearing_file(cardswitch::settlement::parse_date(&new).unwrap()),
        );
        assert_eq!(files.0.len(), 1);
        assert_eq!(files.0[0].rrn, "000000000301");
        assert_eq!(files.1.len(), 1);
        assert_eq!(files.1[0].rrn, "000000000302");
        sw.shutdown().await;
        acq.stop().await;
    });
}

fn get_json(url: &str) -> serde_json::Value {
    let mut r = ureq::get(url)
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

/// The settlement report of `date` for endpoint `acq`, from the admin API.
async fn settlement_report(sw: &Switch, date: String) -> serde_json::Value {
    let admin = sw.admin_addr().unwrap();
    let url = format!("http://{admin}/api/settlement?date={date}&endpoint=acq");
    tokio::task::spawn_blocking(move || get_json(&url))
        .await
        .unwrap()
}

fn write_file(records: &[ClearingRecord]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("clearing-{}.csv", fastrand::u64(..)));
    clearing::write(std::fs::File::create(&path).unwrap(), records).unwrap();
    path
}

async fn counts(pool: &PgPool) -> [i64; 4] {
    let mut out = [0; 4];
    for (i, t) in [
        "recon_runs",
        "recon_items",
        "chargebacks",
        "transaction_events",
    ]
    .iter()
    .enumerate()
    {
        out[i] = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {t}"))
            .fetch_one(pool)
            .await
            .unwrap();
    }
    out
}

fn pairs(r: &recon::Report) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = r
        .exceptions
        .iter()
        .map(|i| (i.class.as_str().to_owned(), i.rrn.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn clearing_files_reconcile_item_by_item_and_a_rerun_changes_nothing() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("recon").await;
        let acq = acquirer(None).await;
        let sw = switch(&url, &acq).await;
        let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
        let today = acq.business_date();
        let yesterday = today.previous_day().unwrap();
        // One approval on the day before (the acquirer's DE15 says so).
        acq.set_business_date(yesterday);
        assert_eq!(
            rc(&t
                .exchange(&sale(777, 1, "000000000400", "000001", false))
                .await),
            "00"
        );
        acq.set_business_date(today);
        // The day: purchases, refunds, authorizations, declines, a full and a partial reversal.
        let mut sent = Vec::new();
        for i in 0..150u32 {
            let rrn = format!("{:012}", 401 + i);
            let amount = 1_000 + u64::from(i) * 100 + 7;
            let m = match i % 10 {
                0 => sale(amount, 10 + i, &rrn, "000001", true),
                1 => auth(amount, 10 + i, &rrn, "000001"),
                2 => sale(amount / 100 * 100 + 51, 10 + i, &rrn, "000001", false),
                _ => sale(amount, 10 + i, &rrn, "000001", false),
            };
            let r = t.exchange(&m).await;
            assert_eq!(rc(&r), if i % 10 == 2 { "51" } else { "00" }, "{i}");
            sent.push(m);
        }
        let reversed = &sent[5];
        assert_eq!(
            rc(&t.exchange(&reversal(reversed, b"0400", 500, None)).await),
            "00"
        );
        let partial = &sent[6];
        let standing = partial.amount().unwrap() - 300;
        assert_eq!(
            rc(&t
                .exchange(&reversal(partial, b"0400", 501, Some(standing)))
                .await),
            "00"
        );
        sw.pipeline().journal().flush().await;
        let backend = sw.pipeline().journal().backend().clone();
        let run = |file: std::path::PathBuf| {
            let backend = backend.clone();
            async move {
                recon::reconcile(
                    &backend,
                    &recon::Request {
                        endpoint: "acq",
                        date: today,
                        file: &file,
                        late_days: 45,
                    },
                )
                .await
                .unwrap()
            }
        };

        // The clean file: everything matched, totals agree.
        let clean = acq.clearing_file(today);
        assert_eq!(
            clean.len(),
            150 - 15 - 1,
            "declines and the full reversal not presented"
        );
        assert!(clean
            .iter()
            .any(|r| r.rrn == partial.get_str(37).unwrap() && r.amount_minor == standing));
        let clean_path = write_file(&clean);
        let r = run(clean_path.clone()).await;
        assert!(!r.already_reconciled);
        assert_eq!(r.exceptions, vec![], "clean file");
        assert_eq!(r.counts.get("matched").copied(), Some(134));
        assert_eq!(r.totals.len(), 1);
        assert_eq!(r.totals[0].difference_minor, 0);
        assert!(r.totals[0].journal_net_minor > 0);

        // A reversal of a transaction the switch never saw: an orphan in the journal.
        let mut ghost = reversal(&sent[7], b"0420", 502, None);
        ghost.set(37, b"000000009999");
        ghost.set(90, b"020000099911210930150000000000000000000000");
        assert_eq!(rc(&t.exchange(&ghost).await), "00");
        sw.pipeline().journal().flush().await;

        // The injected file, plus a late presentment, a reversed one presented, a currency
        // changed and a chargeback of an unknown transaction.
        let inj = Injection::parse("drop=5,amount=5,duplicate=5,unknown=5,chargeback=5").unwrap();
        let (mut file, log) = clearing::inject(clean.clone(), &inj, 42);
        let mut expected: Vec<(String, String)> = log
            .iter()
            .map(|i| match i {
                Injected::Dropped(r) => ("authorized_not_presented".to_owned(), r.clone()),
                Injected::Amount(r) => ("amount_mismatch".to_owned(), r.clone()),
                Injected::Duplicated(r) => ("duplicate_presentment".to_owned(), r.clone()),
                Injected::Unknown(r) => ("presented_without_authorization".to_owned(), r.clone()),
                Injected::Chargeback(r) => ("chargeback".to_owned(), r.clone()),
            })
            .collect();
        for kind in [
            "authorized_not_presented",
            "amount_mismatch",
            "duplicate_presentment",
            "presented_without_authorization",
            "chargeback",
        ] {
            assert!(
                expected.iter().any(|(k, _)| k == kind),
                "the seed injects some {kind}"
            );
        }
        let late = acq.clearing_file(yesterday);
        assert_eq!(late.len(), 1);
        file.extend(late);
        expected.push(("late_presentment".into(), "000000000400".into()));
        let (auth_code, hmac): (String, String) = sqlx::query_as(
            "SELECT auth_code, pan_hmac FROM transactions WHERE rrn = $1 AND mti = '0200'",
        )
        .bind(reversed.get_str(37).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
        let template = clean[0].clone();
        file.push(ClearingRecord {
            rrn: reversed.get_str(37).unwrap().to_owned(),
            auth_code,
            pan_hmac: hmac,
            amount_minor: reversed.amount().unwrap(),
            ..template.clone()
        });
        expected.push((
            "reversed_but_presented".into(),
            reversed.get_str(37).unwrap().into(),
        ));
        let touched: Vec<String> = log
            .iter()
            .map(|i| match i {
                Injected::Dropped(r)
                | Injected::Amount(r)
                | Injected::Duplicated(r)
                | Injected::Unknown(r)
                | Injected::Chargeback(r) => r.clone(),
            })
            .collect();
        let victim = file
            .iter_mut()
            .find(|r| {
                r.kind == kinds::PRESENTMENT
                    && !touched.contains(&r.rrn)
                    && r.business_date == format_date(today)
            })
            .unwrap();
        victim.currency = "840".into();
        expected.push(("currency_mismatch".into(), victim.rrn.clone()));
        file.push(ClearingRecord {
            rrn: "000000008888".into(),
            kind: kinds::CHARGEBACK.into(),
            reason: "4853".into(),
            ..template
        });
        expected.push(("chargeback_unknown_original".into(), "000000008888".into()));
        expected.push(("orphan_reversal".into(), "000000009999".into()));
        expected.sort();
        let path = write_file(&file);
        let before = counts(&pool).await;
        let r = run(path.clone()).await;
        assert!(!r.already_reconciled);
        assert_eq!(
            pairs(&r),
            expected,
            "every injected discrepancy, nothing else"
        );
        assert_eq!(r.lines, u64::try_from(file.len()).unwrap());
        let chargebacks = r.counts.get("chargeback").copied().unwrap_or(0);
        let dropped: i64 = log
            .iter()
            .filter(|i| matches!(i, Injected::Dropped(_)))
            .map(|i| match i {
                Injected::Dropped(rrn) => clean
                    .iter()
                    .find(|c| &c.rrn == rrn)
                    .map_or(0, |c| i64::try_from(c.amount_minor).unwrap()),
                _ => 0,
            })
            .sum();
        assert!(dropped > 0);
        assert_ne!(r.totals[0].difference_minor, 0);
        let after = counts(&pool).await;
        assert_eq!(after[0], before[0] + 1);
        assert_eq!(
            after[1],
            before[1]
                + i64::try_from(file.len()).unwrap()
                + i64::try_from(
                    expected
                        .iter()
                        .filter(|(k, _)| k == "authorized_not_presented" || k == "orphan_reversal")
                        .count()
                )
                .unwrap()
        );
        assert_eq!(
            after[2],
            before[2] + i64::try_from(chargebacks).unwrap() + 1
        );
        assert_eq!(after[3], before[3] + i64::try_from(chargebacks).unwrap());

        // The chargeback is in its transaction's history.
        let cb_rrn = log
            .iter()
            .find_map(|i| match i {
                Injected::Chargeback(r) => Some(r.clone()),
                _ => None,
            })
            .unwrap();
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM transactions WHERE rrn = $1 AND mti IN ('0100', '0200')",
        )
        .bind(&cb_rrn)
        .fetch_one(&pool)
        .await
        .unwrap();
        let admin = sw.admin_addr().unwrap();
        let story = tokio::task::spawn_blocking(move || {
            get_json(&format!("http://{admin}/api/transactions/{id}"))
        })
        .await
        .unwrap();
        assert_eq!(story["chargebacks"].as_array().unwrap().len(), 1, "{story}");
        assert!(story["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state"] == "chargeback"));

        // Again, through the command line: the stored result, nothing written.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
            .args([
                "reconcile",
                "--endpoint",
                "acq",
                "--date",
                &format_date(today),
                "--format",
                "json",
                "--file",
            ])
            .arg(&path)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(again["already_reconciled"], true);
        assert_eq!(again["run_id"], r.run_id);
        assert_eq!(
            again["exceptions"].as_array().unwrap().len(),
            r.exceptions.len()
        );
        assert_eq!(again["counts"], serde_json::to_value(&r.counts).unwrap());
        assert_eq!(counts(&pool).await, after);
        // And as a table: one line per exception, no full PAN.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
            .args([
                "reconcile",
                "--endpoint",
                "acq",
                "--date",
                &format_date(today),
                "--file",
            ])
            .arg(&path)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        let table = String::from_utf8(out.stdout).unwrap();
        assert!(table.contains("reconciled before"), "{table}");
        assert!(table.contains("late_presentment"));
        assert!(!table.contains("4761739001010010"));

        // The settlement report: the day's purchases and chargebacks, fees in decimal.
        let report = settlement_report(&sw, format_date(today)).await;
        let line = |kind: &str| {
            report["lines"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["type"] == kind)
                .map(|l| {
                    (
                        l["count"].as_u64().unwrap(),
                        l["amount_minor"].as_i64().unwrap(),
                    )
                })
                .unwrap_or_default()
        };
        let mut by_kind: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
        for (i, m) in sent.iter().enumerate() {
            let kind = match i % 10 {
                0 => "refund",
                1 => "authorization",
                2 => "declined",
                _ => "purchase",
            };
            if i == 5 || i == 6 {
                continue;
            }
            let e = by_kind.entry(kind).or_default();
            e.0 += 1;
            e.1 += if kind == "declined" {
                0
            } else {
                i64::try_from(m.amount().unwrap()).unwrap()
            };
        }
        let p = by_kind["purchase"];
        assert_eq!(
            line("purchase"),
            (p.0 + 1, p.1 + i64::try_from(standing).unwrap())
        );
        assert_eq!(line("refund"), by_kind["refund"]);
        assert_eq!(line("declined"), by_kind["declined"]);
        assert_eq!(line("reversal").0, 2);
        assert_eq!(line("chargeback").0, chargebacks + 1);
        let net = &report["net"][0];
        let gross = net["gross_minor"].as_i64().unwrap();
        assert_eq!(gross, line("purchase").1 - line("refund").1);
        assert_eq!(
            net["fees_minor"].as_i64().unwrap(),
            (rust_decimal::Decimal::from(line("purchase").1) * rust_decimal::Decimal::new(125, 4))
                .round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointNearestEven)
                .try_into()
                .unwrap_or(-1i64)
        );
        sw.shutdown().await;
        acq.stop().await;
        let _ = std::fs::remove_file(clean_path);
        let _ = std::fs::remove_file(path);
    });
}

/// The embedded journal (SQLite) runs the same settlement code: batch totals, reconciliation
/// with its stored re-run, the report.
#[test]
fn the_embedded_journal_settles_and_reconciles_too() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let dir = std::env::temp_dir().join(format!("cardswitch-settle-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("journal.db").display());
        let acq = acquirer(None).await;
        let sw = switch(&url, &acq).await;
        let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
        let a = sale(3_000, 1, "000000000601", "000009", false);
        let b = sale(1_000, 2, "000000000602", "000009", true);
        let c = sale(2_000, 3, "000000000603", "000009", false);
        for m in [&a, &b, &c] {
            assert_eq!(rc(&t.exchange(m).await), "00");
        }
        assert_eq!(rc(&t.exchange(&reversal(&c, b"0400", 4, None)).await), "00");
        let mine = Totals {
            debits: 1,
            debits_amount: 3_000,
            debit_reversals: 1,
            debit_reversals_amount: 2_000,
            credits: 1,
            credits_amount: 1_000,
            ..Totals::default()
        };
        let reply = t
            .exchange(&settlement_request(b"0500", 5, "000009", &mine))
            .await;
        assert_eq!(rc(&reply), "00");
        assert!(cardswitch::settlement::batch::closed(
            sw.pipeline().journal().backend(),
            "TERM0001",
            "000009"
        )
        .await
        .unwrap()
        .is_some());
        let today = acq.business_date();
        let mut file = acq.clearing_file(today);
        assert_eq!(file.len(), 2);
        file.push(file[0].clone());
        let path = dir.join("clearing.csv");
        clearing::write(std::fs::File::create(&path).unwrap(), &file).unwrap();
        let backend = sw.pipeline().journal().backend().clone();
        let req = recon::Request {
            endpoint: "acq",
            date: today,
            file: &path,
            late_days: 45,
        };
        let first = recon::reconcile(&backend, &req).await.unwrap();
        assert_eq!(first.counts.get("matched").copied(), Some(2));
        assert_eq!(
            pairs(&first),
            vec![(
                "duplicate_presentment".to_owned(),
                "000000000601".to_owned()
            )]
        );
        let second = recon::reconcile(&backend, &req).await.unwrap();
        assert!(second.already_reconciled);
        assert_eq!(second.exceptions, first.exceptions);
        assert_eq!(second.counts, first.counts);
        // Presented again in the next date's file: a duplicate of what today's file presented.
        let tomorrow = today.next_day().unwrap();
        let mut next = vec![file[0].clone()];
        next[0].business_date = format_date(tomorrow);
        let next_path = dir.join("clearing-next.csv");
        clearing::write(std::fs::File::create(&next_path).unwrap(), &next).unwrap();
        let later = recon::reconcile(
            &backend,
            &recon::Request {
                endpoint: "acq",
                date: tomorrow,
                file: &next_path,
                late_days: 45,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            pairs(&later),
            vec![(
                "duplicate_presentment".to_owned(),
                "000000000601".to_owned()
            )]
        );
        let report = cardswitch::settlement::report::build(
            &backend,
            &format_date(today),
            Some("acq"),
            &BTreeMap::new(),
        )
        .await
        .unwrap();
        let kinds: Vec<(String, u64, i64)> = report
            .lines
            .iter()
            .map(|l| (l.kind.clone(), l.count, l.amount_minor))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("purchase".to_owned(), 1, 3_000),
                ("refund".to_owned(), 1, 1_000),
                ("reversal".to_owned(), 1, 2_000)
            ]
        );
        assert_eq!(report.net[0].net_minor, 2_000);
        sw.shutdown().await;
        acq.stop().await;
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// Partial approvals (DE39 10). On a listener that takes them the terminal gets the 10 with the
/// approved DE4, and the journal, a copy of the request, the batch totals, the settlement report
/// and reconciliation all carry the approved amount. On a listener that does not, the approval
/// is reversed (for the amount approved) and the terminal declined 51.
#[test]
fn a_partial_approval_charges_what_the_acquirer_approved() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("partial").await;
        // The shipped rules: amounts ending in 10 are half approved.
        let acq = acquirer(None).await;
        let sw = config(&url, &acq)
            .listener("partial_approvals", true)
            .add_listener("pos-full-only", "")
            .endpoint(Some("saf"), "initial_delay_ms", 0)
            .endpoint(Some("saf"), "poll_ms", 100)
            .start()
            .await;
        let mut takes = Terminal::connect(sw.listener_addrs()[0]).await;
        let mut refuses = Terminal::connect(sw.listener_addrs()[1]).await;
        let today = acq.business_date();

        let a = sale(4_010, 1, "000000000701", "000011", false);
        let first = takes.exchange(&a).await;
        assert_eq!(rc(&first), "10");
        assert_eq!(first.amount(), Some(2_005), "the approved amount");
        assert!(first.auth_code().is_some());
        // A copy gets the same answer, approved amount included, and is not charged again.
        let copy = takes.exchange(&a).await;
        assert_eq!(
            (rc(&copy), copy.amount(), copy.auth_code()),
            ("10".to_owned(), Some(2_005), first.auth_code())
        );
        let b = sale(1_000, 2, "000000000702", "000011", false);
        assert_eq!(rc(&takes.exchange(&b).await), "00");

        let c = sale(3_010, 1, "000000000703", "000012", false);
        let declined = refuses.exchange(&c).await;
        assert_eq!(rc(&declined), "51");
        assert_eq!(declined.amount(), Some(3_010), "the request's amount, echoed");
        assert!(declined.auth_code().is_none());
        // Its approval is reversed at the acquirer, for what was approved.
        common::eventually(Duration::from_secs(20), "the partial approval reversed", || {
            let acq = &acq;
            async move {
                acq.ledger()
                    .iter()
                    .any(|e| e.rrn == "000000000703" && e.amount == 1_505 && e.reversed)
            }
        })
        .await;
        let rev = acq
            .reversals()
            .into_iter()
            .find(|r| r.rrn == "000000000703")
            .unwrap();
        assert_eq!((rev.mti.as_str(), rev.amount, rev.found), ("0420", Some(1_505), true));
        assert_eq!(acq.ledger().len(), 3, "the copy was not forwarded");

        // The journal: approved beside requested.
        sw.pipeline().journal().flush().await;
        common::eventually(Duration::from_secs(10), "the refused one reversed", || {
            let pool = &pool;
            async move { common::state_of(pool, "000000000703", "0200").await == "reversed" }
        })
        .await;
        type Amounts = (String, String, String, Option<i64>, Option<i64>);
        let rows: Vec<Amounts> = sqlx::query_as(
            "SELECT rrn, response_code, state, amount_minor, amount_requested_minor FROM transactions \
             WHERE mti = '0200' AND decided_by <> 'duplicate' ORDER BY rrn",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let row = |rrn: &str, code: &str, state: &str, amount: i64, asked: i64| {
            (
                rrn.to_owned(),
                code.to_owned(),
                state.to_owned(),
                Some(amount),
                Some(asked),
            )
        };
        assert_eq!(
            rows,
            vec![
                row("000000000701", "10", "approved", 2_005, 4_010),
                row("000000000702", "00", "approved", 1_000, 1_000),
                row("000000000703", "51", "reversed", 1_505, 3_010),
            ]
        );

        // The terminal's batch totals count the approved amount.
        let mine = Totals {
            debits: 2,
            debits_amount: 2_005 + 1_000,
            ..Totals::default()
        };
        let reply = takes
            .exchange(&settlement_request(b"0500", 3, "000011", &mine))
            .await;
        assert_eq!(rc(&reply), "00", "{:?}", Totals::read(&reply));

        // The settlement report, and reconciliation against the acquirer's clearing file.
        let report = settlement_report(&sw, format_date(today)).await;
        let purchases = report["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["type"] == "purchase")
            .map(|l| (l["count"].as_u64(), l["amount_minor"].as_i64()))
            .unwrap();
        assert_eq!(purchases, (Some(2), Some(3_005)), "{report}");
        let file = acq.clearing_file(today);
        assert!(file
            .iter()
            .any(|r| r.rrn == "000000000701" && r.amount_minor == 2_005));
        let path = write_file(&file);
        let backend = sw.pipeline().journal().backend().clone();
        let r = recon::reconcile(
            &backend,
            &recon::Request {
                endpoint: "acq",
                date: today,
                file: &path,
                late_days: 45,
            },
        )
        .await
        .unwrap();
        assert_eq!(r.exceptions, vec![], "the approved amounts reconcile");
        assert_eq!(r.counts.get("matched").copied(), Some(2));
        sw.shutdown().await;
        acq.stop().await;
        let _ = std::fs::remove_file(path);
    });
}

#[test]
fn a_cutover_on_one_node_moves_the_business_date_of_every_node() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("cutover_nodes").await;
        let acq = acquirer(None).await;
        let a = config(&url, &acq)
            .set("switch", "node", "cut-a")
            .start()
            .await;
        // Node b has no link (its acquirer's address has nothing behind it): the acquirer's
        // 0800 reaches node a only, and node b's rows carry its own open date, not one from a
        // reply.
        let nowhere = common::free_addr();
        let b = SwitchConfig::new(&url, nowhere)
            .keys()
            .set("journal", "pan_hmac_key", KEY)
            .set("switch", "node", "cut-b")
            .launch()
            .await;
        let old = acq.business_date();
        let (closed, answer) = acq.cutover(Duration::from_secs(3)).await.unwrap();
        assert_eq!((closed, answer.as_deref()), (old, Some("00")));
        // Node b dates its next request on the new day at once (its poll is every 30 s).
        let new = format_date(old.next_day().unwrap());
        let mut t = Terminal::connect(b.listener_addrs()[0]).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        for stan in 1.. {
            let rrn = format!("00000000{:04}", 400 + stan);
            let reply = t.exchange(&sale(1_000, stan, &rrn, "000001", false)).await;
            assert_eq!(rc(&reply), "91", "no link");
            let date: String =
                sqlx::query_scalar("SELECT business_date FROM transactions WHERE rrn = $1")
                    .bind(&rrn)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if date == new {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node b still dates {date}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        a.shutdown().await;
        b.shutdown().await;
        acq.stop().await;
    });
}
