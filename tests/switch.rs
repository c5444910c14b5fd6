//! The switch end to end over real sockets: terminal -> switch -> acquirer simulator and back.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cardswitch::server::Switch;
use cardswitch_codec::{sample, Dialect, Message, Mti};
use cardswitch_simulators::acquirer::{Faults, Latency};
use cardswitch_simulators::Rules;
use tokio::net::TcpStream;

mod common;

use common::{acquirer_at, acquirer_with as acquirer, SwitchConfig, Terminal};

/// The switch's configuration in these tests: one endpoint over `links`, routing 476173 there
/// (541333 goes nowhere), an in-memory journal.
fn config(links: &[String], timeout_ms: u64) -> SwitchConfig {
    SwitchConfig::new("sqlite::memory:", "")
        .links(links)
        .toml("[switch]\nshutdown_grace_ms = 2000")
        .endpoint_toml(&format!(
            "acquirer_id = \"123456\"\nrequest_timeout_ms = {timeout_ms}\n\
             reconnect_min_ms = 50\nreconnect_max_ms = 200"
        ))
}

/// A switch with one endpoint over `links` (not waiting for them).
async fn switch(links: &[String], timeout_ms: u64) -> Switch {
    config(links, timeout_ms).launch().await
}

fn request(amount: u64, stan: u32) -> Message {
    let mut m = sample::auth_request();
    m.set_amount(amount);
    m.set_stan(stan);
    m
}

fn rc(msg: &Message) -> String {
    msg.response_code().unwrap().to_string()
}

#[tokio::test]
async fn approve_decline_luhn_route_and_echo() {
    let acq = acquirer(Rules::default_rules()).await;
    let sw = switch(&[acq.local_addr().to_string()], 2000).await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

    let req = request(12_300, 101);
    let reply = t.exchange(&req).await;
    assert_eq!(reply.mti(), Mti::AUTH_RESPONSE);
    assert_eq!(rc(&reply), "00");
    assert_eq!(reply.auth_code().map(str::len), Some(6));
    for f in [2, 3, 4, 7, 11, 37, 41, 49] {
        assert_eq!(reply.get(f), req.get(f), "DE{f} echoed");
    }
    // The acquirer saw the switch's STAN, not the terminal's, and DE32 set by the endpoint.
    let seen = acq.ledger();
    assert_eq!(seen.len(), 1);
    assert_ne!(seen[0].stan, "000101");

    assert_eq!(
        rc(&t.exchange(&request(12_351, 102)).await),
        "51",
        "decline passed through"
    );

    let mut bad_luhn = request(100, 103);
    bad_luhn.set(2, b"4761739001010011");
    assert_eq!(rc(&t.exchange(&bad_luhn).await), "14");

    let mut no_route = request(100, 104);
    no_route.set(2, b"5413330089020011");
    no_route.set(35, b"5413330089020011=28122011143878089");
    assert_eq!(rc(&t.exchange(&no_route).await), "15");

    let echo = Message::builder(Mti::NETWORK_REQUEST)
        .field(7, "1121093015")
        .stan(105)
        .field(70, "301")
        .build();
    let reply = t.exchange(&echo).await;
    assert_eq!(
        (reply.mti(), rc(&reply)),
        (Mti::NETWORK_RESPONSE, "00".to_owned())
    );
    assert_eq!(
        acq.ledger().len(),
        2,
        "checks that fail never reach the acquirer"
    );

    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn undecodable_request_gets_30_and_the_connection_survives() {
    let acq = acquirer(Rules::default_rules()).await;
    let sw = switch(&[acq.local_addr().to_string()], 2000).await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let dialect = Dialect::builtin("iso87-ascii").unwrap();
    // A letter in DE12, which comes after DE11: the MTI and the STAN still read.
    let mut wire = dialect.encode_to_vec(&request(100, 201)).unwrap();
    let at = wire.windows(10).position(|w| w == b"0930151121").unwrap();
    wire[at] = b'X';
    t.send_raw(wire).await;
    let reply = t.recv().await;
    assert_eq!(
        (reply.mti(), rc(&reply), reply.stan()),
        (Mti::AUTH_RESPONSE, "30".to_owned(), Some(201))
    );
    // Garbage with no readable MTI, and a message broken before its STAN (in DE7), are dropped;
    // the connection carries on.
    t.send_raw(b"\xFF\xFF".to_vec()).await;
    let mut wire = dialect.encode_to_vec(&request(100, 202)).unwrap();
    let at = wire.windows(10).position(|w| w == b"1121093015").unwrap();
    wire[at] = b'X';
    t.send_raw(wire).await;
    assert_eq!(rc(&t.exchange(&request(100, 203)).await), "00");
    assert_eq!(
        sw.pipeline()
            .counters
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn failover_to_the_next_link_and_91_when_none_is_ready() {
    // A port nothing listens on.
    let dead = common::free_addr().to_string();
    let acq = acquirer(Rules::default_rules()).await;
    let sw = switch(&[dead.clone(), acq.local_addr().to_string()], 2000).await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    for stan in 1..=5 {
        assert_eq!(rc(&t.exchange(&request(100, stan)).await), "00");
    }
    sw.shutdown().await;
    acq.stop().await;

    let sw = switch(&[dead], 2000).await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let started = Instant::now();
    assert_eq!(rc(&t.exchange(&request(100, 9)).await), "91");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "answered at once, not after the timeout"
    );
    sw.shutdown().await;
}

#[tokio::test]
async fn acquirer_timeout_gets_91() {
    let rules = Rules {
        faults: Faults {
            no_reply: 100.0,
            ..Faults::default()
        },
        ..Rules::default_rules()
    };
    let acq = acquirer(rules).await;
    // Sign-on must pass: the no-reply fault drops 0800s too, so sign on first, then turn it on.
    acq.set_rules(Rules::default_rules());
    let sw = switch(&[acq.local_addr().to_string()], 300).await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    acq.set_rules(Rules {
        faults: Faults {
            no_reply: 100.0,
            ..Faults::default()
        },
        ..Rules::default_rules()
    });
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let started = Instant::now();
    assert_eq!(rc(&t.exchange(&request(100, 1)).await), "91");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn pipelined_requests_answered_out_of_order_reach_the_right_request() {
    let rules = Rules {
        latency: Latency {
            min_ms: 0,
            max_ms: 30,
        },
        ..Rules::default_rules()
    };
    let acq = acquirer(rules).await;
    let sw = switch(&[acq.local_addr().to_string()], 2000).await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let mut sent = HashMap::new();
    for stan in 1..=60u32 {
        let amount = 1_000 + u64::from(stan) * 100;
        sent.insert(stan, amount);
        t.send(&request(amount, stan)).await;
    }
    let mut order = Vec::new();
    for _ in 0..60 {
        let reply = t.recv().await;
        let stan = reply.stan().unwrap();
        assert_eq!(reply.amount(), sent.remove(&stan), "STAN {stan}");
        assert_eq!(rc(&reply), "00");
        order.push(stan);
    }
    assert!(sent.is_empty());
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "replies came back in order; the test needs them not to"
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_transactions_journals_them_and_signs_off() {
    let rules = Rules {
        latency: Latency {
            min_ms: 300,
            max_ms: 300,
        },
        ..Rules::default_rules()
    };
    let acq = acquirer(rules).await;
    let db = std::env::temp_dir().join(format!("cardswitch-shutdown-{}.db", std::process::id()));
    let sw = SwitchConfig::new(&format!("sqlite://{}", db.display()), acq.local_addr())
        .toml("[switch]\nshutdown_grace_ms = 3000")
        .launch()
        .await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let addr = sw.listener_addrs()[0];
    let mut t = Terminal::connect(addr).await;
    for stan in 1..=3 {
        t.send(&request(100, stan)).await;
    }
    // Let the requests reach the acquirer, then stop while they wait there.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requests_before = acq
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let stopping = tokio::spawn(sw.shutdown());
    for _ in 0..3 {
        assert_eq!(rc(&t.recv().await), "00", "in-flight transactions finish");
    }
    stopping.await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    // The sign-off (0800/002) reached the acquirer.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        acq.stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        requests_before + 1
    );
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM transactions WHERE response_code = '00'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows, 3, "journal flushed before stopping");
    pool.close().await;
    let _ = std::fs::remove_file(&db);
    acq.stop().await;
}

#[tokio::test]
async fn two_thousand_concurrent_connections_each_answered() {
    let acq = acquirer(Rules::default_rules()).await;
    // 2,000 requests at once: the link may hold them all (its default cap is 512; beyond the
    // cap a request is answered 91 at once, which the next test shows).
    let sw = config(&[acq.local_addr().to_string()], 5000)
        .env("CARDSWITCH__ENDPOINTS__0__MAX_IN_FLIGHT_PER_LINK", "4096")
        .launch()
        .await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let addr = sw.listener_addrs()[0];
    let mut terminals = Vec::new();
    for _ in 0..2000 {
        terminals.push(Terminal::connect(addr).await);
    }
    // All connections are open at once; each sends one request, then all replies are read.
    for (i, t) in terminals.iter_mut().enumerate() {
        t.send(&request(100, u32::try_from(i).unwrap() + 1)).await;
    }
    let mut approved = 0;
    for (i, t) in terminals.iter_mut().enumerate() {
        let reply = t.recv().await;
        assert_eq!(reply.stan(), Some(u32::try_from(i).unwrap() + 1));
        approved += usize::from(rc(&reply) == "00");
    }
    assert_eq!(approved, 2000);
    drop(terminals);
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_burst_beyond_the_links_in_flight_cap_gets_91_at_once() {
    let rules = Rules {
        latency: Latency {
            min_ms: 200,
            max_ms: 200,
        },
        ..Rules::default_rules()
    };
    let acq = acquirer(rules).await;
    let sw = config(&[acq.local_addr().to_string()], 5000)
        .env("CARDSWITCH__ENDPOINTS__0__MAX_IN_FLIGHT_PER_LINK", "10")
        .launch()
        .await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    for stan in 1..=15 {
        t.send(&request(100, stan)).await;
    }
    let mut codes = HashMap::new();
    for _ in 0..15 {
        *codes.entry(rc(&t.recv().await)).or_insert(0) += 1;
    }
    assert_eq!(codes.get("00"), Some(&10), "{codes:?}");
    assert_eq!(codes.get("91"), Some(&5), "{codes:?}");
    assert_eq!(
        acq.ledger().len(),
        10,
        "refused requests never reach the acquirer"
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_reversal_goes_where_its_original_went() {
    // Endpoint A is down when the original arrives, so the route's fallback B takes it; A comes
    // up before the reversal, which must still go to B.
    let a_addr = common::free_addr();
    let b = acquirer(Rules::default_rules()).await;
    let sw = SwitchConfig::new("sqlite::memory:", a_addr)
        .endpoint_toml("reconnect_min_ms = 50\nreconnect_max_ms = 100")
        .add_endpoint("b", b.local_addr(), "")
        .no_routes()
        .route_to("476173", "acq", Some("b"))
        .launch()
        .await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let original = request(4_200, 11);
    assert_eq!(rc(&t.exchange(&original).await), "00");
    assert_eq!(b.ledger().len(), 1, "the fallback took the original");

    let a = acquirer_at(a_addr, Rules::default_rules()).await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await, "A is back");

    let mut reversal = original.clone();
    reversal.set_mti(Mti::REVERSAL_REQUEST);
    let de90 = format!(
        "0100{}{}{:022}",
        original.get_str(11).unwrap(),
        original.get_str(7).unwrap(),
        0
    );
    reversal.set(90, de90.as_bytes());
    reversal.set_stan(12);
    reversal.remove(52);
    let reply = t.exchange(&reversal).await;
    assert_eq!(
        (reply.mti(), rc(&reply)),
        (Mti::new(*b"0410").unwrap(), "00".to_owned())
    );
    assert!(b.ledger()[0].reversed, "B reversed the original");
    assert_eq!(
        a.stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "A saw only its sign-on"
    );
    sw.shutdown().await;
    a.stop().await;
    b.stop().await;
}

/// All links of an endpoint draw from one STAN sequence: an acquirer that matches reversals by
/// STAN and DE7 never sees the same STAN twice, whichever links the requests take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_of_an_endpoint_share_one_stan_sequence() {
    let acq = acquirer(Rules::default_rules()).await;
    let addr = acq.local_addr().to_string();
    let sw = config(&[addr.clone(), addr.clone(), addr.clone(), addr], 2_000)
        .env("CARDSWITCH__ENDPOINTS__0__STRATEGY", "round-robin")
        .launch()
        .await;
    assert!(sw.wait_ready(Duration::from_secs(5)).await);
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    for i in 0..200 {
        let mut m = request(1_000, 1 + i);
        m.set(37, format!("STAN{i:08}").as_bytes());
        assert_eq!(rc(&t.exchange(&m).await), "00");
    }
    let stans: std::collections::HashSet<String> =
        acq.ledger().iter().map(|e| e.stan.clone()).collect();
    assert_eq!(acq.ledger().len(), 200);
    assert_eq!(stans.len(), 200, "a STAN was used twice");
    // One sequence: consecutive numbers (one jump at most, where it wraps at 999,999), not
    // four runs from four counters.
    let mut n: Vec<u32> = stans.iter().map(|s| s.parse().unwrap()).collect();
    n.sort_unstable();
    let jumps = n.windows(2).filter(|w| w[1] - w[0] != 1).count();
    assert!(jumps <= 1, "STANs from several counters: {jumps} jumps");
    sw.shutdown().await;
    acq.stop().await;
}
