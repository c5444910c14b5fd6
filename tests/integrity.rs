//! Transaction integrity end to end, against PostgreSQL and the fault-injecting acquirer
//! simulator: timeouts and automatic reversals, late approvals, duplicates, store-and-forward
//! across `kill -9`, stand-in, terminal reversals.
//!
//! PostgreSQL: `TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; each test
//! gets a schema of its own.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use cardswitch::server::Switch;
use cardswitch_codec::Mti;
use cardswitch_simulators::acquirer::{Faults, Latency};
use cardswitch_simulators::Rules;
use futures_util::StreamExt;

mod common;

use common::{
    acquirer_at, acquirer_with as acquirer, eventually, pg_schema, rc, request, state_of,
    terminal_reversal as reversal, SwitchConfig, SwitchProcess, Terminal, TestDb,
};

/// The switch's configuration in these tests: the journal at `url` with keys, one endpoint on
/// `link` with this timeout, store-and-forward retrying within a few hundred milliseconds.
fn config(url: &str, link: impl std::fmt::Display, timeout_ms: u64) -> SwitchConfig {
    SwitchConfig::new(url, link)
        .keys()
        .toml("[switch]\nshutdown_grace_ms = 2000")
        .endpoint_toml(&format!(
            "acquirer_id = \"123456\"\nrequest_timeout_ms = {timeout_ms}\n\
             reconnect_min_ms = 50\nreconnect_max_ms = 200\n\
             [saf]\ninitial_delay_ms = 0\nretry_min_ms = 100\nretry_max_ms = 400\npoll_ms = 100"
        ))
}

/// Starts a switch on `config(url, link, timeout_ms)` with these endpoint settings (a TOML
/// fragment), not waiting for its link.
async fn switch(
    url: &str,
    link: impl std::fmt::Display,
    timeout_ms: u64,
    endpoint: &str,
) -> Switch {
    config(url, link, timeout_ms)
        .endpoint_toml(endpoint)
        .launch()
        .await
}

fn rules_with(faults: Faults) -> Rules {
    Rules {
        faults,
        ..Rules::default_rules()
    }
}

#[tokio::test]
async fn timeout_answers_91_and_a_reversal_is_delivered() {
    let TestDb(url, pool, _schema) = pg_schema("timeout").await;
    let acq = acquirer(rules_with(Faults {
        no_reply: 100.0,
        ..Faults::default()
    }))
    .await;
    let sw = switch(&url, &acq.local_addr().to_string(), 300, "").await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

    let req = request(1_000, 11, "000000000011");
    let reply = t.exchange(&req).await;
    assert_eq!(rc(&reply), "91");
    assert_eq!(
        state_of(&pool, "000000000011", "0100").await,
        "reversal_pending"
    );
    // The reversal is dropped too until the host answers again; then it arrives and settles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    acq.set_rules(Rules::default_rules());
    eventually(Duration::from_secs(10), "reversal delivered", || async {
        state_of(&pool, "000000000011", "0100").await == "reversed"
    })
    .await;
    let seen = acq.reversals();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].reason.as_deref(), Some("68"));
    assert_eq!(seen[0].mti, "0421", "retransmissions are repeats");
    let de90 = seen[0].original.as_deref().unwrap();
    assert!(de90.starts_with("0100"), "{de90}");
    assert_eq!(&de90[10..20], req.get_str(7).unwrap());
    let (state, attempts): (String, i32) = sqlx::query_as("SELECT state, attempts FROM saf")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "delivered");
    assert!(attempts >= 2);
    let cause: String =
        sqlx::query_scalar("SELECT cause FROM transaction_events WHERE state = 'reversed'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(cause, "reversal acknowledged");
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_late_approval_is_never_forwarded_and_is_reversed() {
    let TestDb(url, pool, _schema) = pg_schema("late").await;
    let acq = acquirer(rules_with(Faults {
        late: 100.0,
        late_ms: 600,
        ..Faults::default()
    }))
    .await;
    let sw = switch(&url, &acq.local_addr().to_string(), 200, "").await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

    let reply = t.exchange(&request(1_000, 21, "000000000021")).await;
    assert_eq!(rc(&reply), "91");
    // The host approved it (its ledger says so) and the reply came late.
    assert!(acq.ledger()[0].auth_code.is_some());
    acq.set_rules(Rules::default_rules());
    eventually(
        Duration::from_secs(10),
        "late approval reversed",
        || async { acq.ledger()[0].reversed },
    )
    .await;
    eventually(Duration::from_secs(5), "late arrival journaled", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM transaction_events WHERE cause = 'late reply' AND detail = '0110 00'",
        )
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    eventually(Duration::from_secs(5), "state reversed", || async {
        state_of(&pool, "000000000021", "0100").await == "reversed"
    })
    .await;
    // Nothing more reached the terminal: the late reply was not forwarded.
    let more = tokio::time::timeout(Duration::from_millis(300), t.framed.next()).await;
    assert!(more.is_err(), "nothing more for the terminal");
    assert_eq!(
        sw.pipeline()
            .counters
            .late_replies
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn duplicates_get_the_same_reply_and_other_content_gets_94() {
    let TestDb(url, pool, _schema) = pg_schema("dup").await;
    let acq = acquirer(Rules {
        latency: Latency {
            min_ms: 200,
            max_ms: 200,
        },
        ..Rules::default_rules()
    })
    .await;
    let sw = switch(&url, &acq.local_addr().to_string(), 2000, "").await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

    // A copy sent while the first is in flight waits for the same answer.
    let req = request(1_000, 31, "000000000031");
    t.send(&req).await;
    t.send(&req).await;
    let (a, b) = (t.recv().await, t.recv().await);
    assert_eq!(rc(&a), "00");
    assert_eq!((rc(&b), b.auth_code()), (rc(&a), a.auth_code()));
    // Once completed, the stored reply is sent again; a repeat (0101) is the same request.
    let c = t.exchange(&req).await;
    assert_eq!(c.auth_code(), a.auth_code());
    let mut repeat = req.clone();
    repeat.set_mti(Mti::new(*b"0101").unwrap());
    let d = t.exchange(&repeat).await;
    assert_eq!(
        (d.mti(), d.auth_code()),
        (Mti::AUTH_RESPONSE, a.auth_code())
    );
    assert_eq!(acq.ledger().len(), 1, "the host saw it once");
    // Same key, other content.
    let mut other = req.clone();
    other.set_amount(2_000);
    assert_eq!(rc(&t.exchange(&other).await), "94");
    // A repeat with no original goes ahead as new.
    let mut fresh = request(1_000, 32, "000000000032");
    fresh.set_mti(Mti::new(*b"0101").unwrap());
    assert_eq!(rc(&t.exchange(&fresh).await), "00");
    assert_eq!(acq.ledger().len(), 2);
    let dups: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transactions WHERE state = 'duplicate'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(dups, 4);
    sw.shutdown().await;

    // The keys are in the database: a new switch on it (a restart, or another node) still knows.
    let sw = switch(&url, &acq.local_addr().to_string(), 2000, "").await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    assert_eq!(t.exchange(&req).await.auth_code(), a.auth_code());
    assert_eq!(rc(&t.exchange(&other).await), "94");
    assert_eq!(acq.ledger().len(), 2);
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn terminal_reversals_unknown_originals_twice_and_partial() {
    let TestDb(url, pool, _schema) = pg_schema("rev").await;
    let acq = acquirer(Rules::default_rules()).await;
    let sw = switch(&url, &acq.local_addr().to_string(), 2000, "").await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

    // Reversal of an approval: forwarded with DE90 naming the STAN the host saw.
    let orig = request(5_000, 41, "000000000041");
    assert_eq!(rc(&t.exchange(&orig).await), "00");
    let r1 = t
        .exchange(&reversal(&orig, Mti::REVERSAL_REQUEST, 42))
        .await;
    assert_eq!((r1.mti().as_str(), rc(&r1).as_str()), ("0410", "00"));
    assert_eq!(state_of(&pool, "000000000041", "0100").await, "reversed");
    assert!(acq.ledger()[0].reversed);
    assert!(acq.reversals()[0].found, "matched by DE90 at the host");
    // Twice: answered, nothing changes, not forwarded again.
    let r2 = t
        .exchange(&reversal(&orig, Mti::REVERSAL_REQUEST, 43))
        .await;
    assert_eq!(rc(&r2), "00");
    assert_eq!(acq.reversals().len(), 1);
    assert_eq!(state_of(&pool, "000000000041", "0400").await, "reversed");
    let second: String = sqlx::query_scalar("SELECT state FROM transactions WHERE stan = '000043'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(second, "duplicate");

    // Unknown original: 0400 -> 25; 0420 -> 00, recorded as an orphan.
    let ghost = request(700, 51, "000000000051");
    let r = t
        .exchange(&reversal(&ghost, Mti::REVERSAL_REQUEST, 52))
        .await;
    assert_eq!(rc(&r), "25");
    let r = t
        .exchange(&reversal(&ghost, Mti::REVERSAL_ADVICE, 53))
        .await;
    assert_eq!((r.mti().as_str(), rc(&r).as_str()), ("0430", "00"));
    let orphans: i64 =
        sqlx::query_scalar("SELECT count(*) FROM transactions WHERE state = 'orphan'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(orphans, 2);

    // Partial reversal through DE95 (the amount that stands), as an advice via SAF.
    let orig = request(10_000, 61, "000000000061");
    assert_eq!(rc(&t.exchange(&orig).await), "00");
    let mut partial = reversal(&orig, Mti::REVERSAL_ADVICE, 62);
    partial.set(
        95,
        format!("{:012}{:012}{:09}{:09}", 6_000, 0, 0, 0).as_bytes(),
    );
    assert_eq!(rc(&t.exchange(&partial).await), "00");
    let (state, reversed): (String, Option<i64>) = sqlx::query_as(
        "SELECT state, amount_reversed_minor FROM transactions WHERE rrn = '000000000061' AND mti = '0100'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), reversed),
        ("partially_reversed", Some(4_000))
    );
    eventually(
        Duration::from_secs(5),
        "partial reversal delivered",
        || async { acq.reversals().iter().any(|r| r.rrn == "000000000061") },
    )
    .await;
    // The same partial again changes nothing; a full one then does.
    let mut again = reversal(&orig, Mti::REVERSAL_ADVICE, 63);
    again.set(95, partial.get(95).unwrap());
    t.exchange(&again).await;
    let full = t.exchange(&reversal(&orig, Mti::REVERSAL_ADVICE, 64)).await;
    assert_eq!(rc(&full), "00");
    assert_eq!(state_of(&pool, "000000000061", "0100").await, "reversed");
    let states: Vec<String> = sqlx::query_scalar(
        "SELECT state FROM transactions WHERE rrn = '000000000061' AND mti = '0420' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(states, ["partially_reversed", "duplicate", "reversed"]);
    sw.shutdown().await;
    acq.stop().await;
}

/// A TCP relay to `to` that holds what the switch sends for `delay` before passing it on, in
/// order (what the acquirer sends back is not held): a slow link.
async fn slow_link(to: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut down_r, mut down_w) = down.into_split();
            let (mut up_r, mut up_w) = up.into_split();
            let (tx, mut rx) =
                tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = down_r.read(&mut buf).await {
                    if n == 0
                        || tx
                            .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                            .is_err()
                    {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some((at, bytes)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    if up_w.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
            });
        }
    });
    addr
}

/// A request held up on a slow link times out; its reversal goes over the other link and
/// reaches the acquirer before the request does, so it matches nothing (an 0420 is
/// acknowledged all the same). The acquirer then approves the request and its reply comes
/// late: the switch reverses it again, and this time the approval is reversed.
#[tokio::test]
async fn a_late_approval_after_its_reversal_overtook_it_is_reversed_again() {
    let TestDb(url, pool, _schema) = pg_schema("overtaken").await;
    let acq = acquirer(Rules::default_rules()).await;
    let slow = slow_link(acq.local_addr(), Duration::from_millis(1_500)).await;
    let sw = config(&url, slow, 1_000)
        .links(&[slow.to_string(), acq.local_addr().to_string()])
        .endpoint(None, "strategy", "round-robin")
        // A sign-on would time out on the slow link.
        .endpoint(None, "sign_on", false)
        .start()
        .await;
    eventually(Duration::from_secs(10), "both links ready", || async {
        sw.pipeline().endpoints()[0]
            .links()
            .iter()
            .all(|l| format!("{:?}", l.state()) == "Ready")
    })
    .await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    // Round robin: one of the first two requests goes over the slow link.
    let mut timed_out = None;
    for n in 1..=2u32 {
        let rrn = format!("{:012}", 60 + n);
        if rc(&t.exchange(&request(1_000, 60 + n, &rrn)).await) == "91" {
            timed_out = Some(rrn);
            break;
        }
    }
    let rrn = timed_out.expect("a request timed out on the slow link");
    eventually(Duration::from_secs(10), "the approval reversed", || async {
        acq.ledger()
            .iter()
            .any(|e| e.rrn == rrn && e.auth_code.is_some() && e.reversed)
    })
    .await;
    let seen: Vec<_> = acq
        .reversals()
        .into_iter()
        .filter(|r| r.rrn == rrn)
        .collect();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(!seen[0].found, "the first overtook its original: {seen:?}");
    assert!(seen.iter().any(|r| r.found), "{seen:?}");
    eventually(Duration::from_secs(5), "journaled as reversed", || async {
        state_of(&pool, &rrn, "0100").await == "reversed"
    })
    .await;
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn stand_in_approves_under_the_limit_and_advises_later() {
    let TestDb(url, pool, _schema) = pg_schema("stip").await;
    // The acquirer's address, with nothing listening yet.
    let addr = common::free_addr();
    let extra = r#"
[stand_in]
enabled = true
default_limit_minor = 5000
negative_ranges = ["4761739001010029"]
"#;
    let sw = switch(&url, &addr.to_string(), 300, extra).await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

    let small = request(4_000, 71, "000000000071");
    let reply = t.exchange(&small).await;
    assert_eq!(rc(&reply), "00");
    let code = reply.auth_code().unwrap().to_owned();
    assert!(code.starts_with('S') && code.len() == 6, "{code}");
    assert_eq!(
        rc(&t.exchange(&request(6_000, 72, "000000000072")).await),
        "91"
    );
    let (state, decided): (String, String) =
        sqlx::query_as("SELECT state, decided_by FROM transactions WHERE rrn = '000000000071'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), decided.as_str()),
        ("advice_pending", "stand_in")
    );

    // The acquirer comes up: the advice is delivered and recorded there as an approval.
    let acq = acquirer_at(addr, Rules::default_rules()).await;
    eventually(Duration::from_secs(10), "advice delivered", || async {
        state_of(&pool, "000000000071", "0100").await == "advised"
    })
    .await;
    let ledger = acq.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].mti, "0120");
    assert_eq!(ledger[0].auth_code.as_deref(), Some(code.as_str()));
    // The terminal reverses it: the acquirer (matching by DE90 alone) finds the approval it
    // knows by the advice.
    let rev = reversal(&small, Mti::new(*b"0400").unwrap(), 73);
    assert_eq!(rc(&t.exchange(&rev).await), "00");
    assert!(acq.ledger()[0].reversed, "{:?}", acq.reversals());
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn store_and_forward_survives_kill_9() {
    let TestDb(url, pool, _schema) = pg_schema("kill").await;
    // The host drops everything: the reversal cannot be delivered yet.
    let acq = acquirer(rules_with(Faults {
        no_reply: 100.0,
        ..Faults::default()
    }))
    .await;
    let mut switch = SwitchProcess::start(config(&url, acq.local_addr(), 300), "kill").await;
    let mut t = Terminal::connect(switch.addr).await;
    // Wait for the link to be signed on, then a request times out.
    eventually(Duration::from_secs(5), "link up", || async {
        acq.stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    let reply = t.exchange(&request(1_000, 81, "000000000081")).await;
    assert_eq!(rc(&reply), "91");
    eventually(Duration::from_secs(5), "a transmission failed", || async {
        sqlx::query_scalar::<_, i32>("SELECT attempts FROM saf")
            .fetch_one(&pool)
            .await
            .unwrap()
            >= 1
    })
    .await;
    // kill -9, the host recovers, the switch comes back: the queued reversal is delivered.
    switch.kill();
    // A transmission the killed switch had on the wire reaches the host still dropping.
    tokio::time::sleep(Duration::from_millis(300)).await;
    acq.set_rules(Rules::default_rules());
    switch.restart().await;
    eventually(
        Duration::from_secs(15),
        "delivered after restart",
        || async {
            sqlx::query_scalar::<_, String>("SELECT state FROM saf")
                .fetch_one(&pool)
                .await
                .unwrap()
                == "delivered"
        },
    )
    .await;
    assert_eq!(state_of(&pool, "000000000081", "0100").await, "reversed");
    // Delivered once: nothing more is sent after the acknowledgement.
    let delivered = acq.reversals().len();
    assert_eq!(delivered, 1, "{:?}", acq.reversals());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(acq.reversals().len(), 1);
    assert_eq!(acq.reversals()[0].mti, "0421");
    switch.kill();
    acq.stop().await;
}
