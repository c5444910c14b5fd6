//! Several switch nodes on one PostgreSQL behind HAProxy (the Debian package, running
//! `specs/haproxy.cfg`), each node a process of its own: readiness and the drain on SIGTERM.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use cardswitch_simulators::Rules;

mod common;

use common::{
    acquirer_with, eventually, free_addr, http_get, pg_schema, rc, request, Haproxy, SwitchConfig,
    SwitchProcess, Terminal, TestDb,
};

const TOKEN: &str = "nodes-test-token-0123456789";

/// Node `name` of the test's database, its admin side on `admin`.
fn node(url: &str, acquirer: SocketAddr, name: &str, admin: SocketAddr) -> SwitchConfig {
    SwitchConfig::new(url, acquirer)
        .keys()
        .set("switch", "node", name)
        .set("switch", "drain_delay_ms", 4_000_i64)
        .set("admin", "address", admin.to_string())
        .set("admin", "token", TOKEN)
        .listener("proxy_protocol", true)
}

/// How many journal rows each node wrote for RRNs starting with `prefix`: (node-a, node-b).
async fn rows_by_node(pool: &sqlx::PgPool, prefix: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE node = 'node-a'), COUNT(*) FILTER (WHERE node = 'node-b') \
         FROM transactions WHERE rrn LIKE $1 || '%'",
    )
    .bind(prefix)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_sigterm_takes_a_node_out_of_haproxy_at_once_and_loses_no_request() {
    let TestDb(url, pool, _schema) = pg_schema("nodes_drain").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let (admin_a, admin_b) = (free_addr(), free_addr());
    let mut a =
        SwitchProcess::start(node(&url, acq.local_addr(), "node-a", admin_a), "drain-a").await;
    let b = SwitchProcess::start(node(&url, acq.local_addr(), "node-b", admin_b), "drain-b").await;
    for admin in [admin_a, admin_b] {
        let health = http_get(format!("http://{admin}/healthz"), None).await;
        assert_eq!(health.map(|h| h.0), Some(200));
        eventually(Duration::from_secs(10), "node ready", || async {
            http_get(format!("http://{admin}/readyz"), None)
                .await
                .map(|r| r.0)
                == Some(200)
        })
        .await;
    }
    let proxy = Haproxy::start([(a.addr, admin_a), (b.addr, admin_b)]);
    proxy.wait_up().await;

    // Four terminals through HAProxy: leastconn spreads them over both nodes.
    let mut terminals = Vec::new();
    for i in 0..4_u32 {
        let mut t = Terminal::connect(proxy.front).await;
        let r = t
            .exchange(&request(1_000, 100 + i, &format!("D1{i:010}")))
            .await;
        assert_eq!(rc(&r), "00");
        terminals.push(t);
    }
    let (on_a, on_b) = rows_by_node(&pool, "D1").await;
    assert!(
        on_a > 0 && on_b > 0,
        "spread over both nodes: {on_a} + {on_b}"
    );

    // SIGTERM node a: not ready at once, still serving what it has.
    a.terminate();
    eventually(Duration::from_secs(1), "node a answers 503", || async {
        http_get(format!("http://{admin_a}/readyz"), None)
            .await
            .is_some_and(|(code, body)| code == 503 && body.contains("draining"))
    })
    .await;
    for (i, t) in terminals.iter_mut().enumerate() {
        let stan = 200 + u32::try_from(i).unwrap();
        let r = t
            .exchange(&request(1_000, stan, &format!("D2{i:010}")))
            .await;
        assert_eq!(
            rc(&r),
            "00",
            "a connection on the draining node is still served"
        );
    }
    eventually(
        Duration::from_secs(4),
        "HAProxy takes node a out",
        || async { proxy.status_of("node-a").await.as_deref() == Some("DOWN") },
    )
    .await;
    assert!(
        a.wait_exit(Duration::ZERO).await.is_none(),
        "still draining"
    );
    // New connections now all go to node b.
    for i in 0..4_u32 {
        let mut t = Terminal::connect(proxy.front).await;
        let r = t
            .exchange(&request(1_000, 300 + i, &format!("D3{i:010}")))
            .await;
        assert_eq!(rc(&r), "00");
    }
    assert_eq!(rows_by_node(&pool, "D3").await, (0, 4));

    // Node a stops by itself once its drain delay is over, cleanly.
    let status = a.wait_exit(Duration::from_secs(15)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // Its terminals reconnect through HAProxy and are served by node b; nothing was lost.
    for i in 0..4_u32 {
        let mut t = Terminal::connect(proxy.front).await;
        let r = t
            .exchange(&request(1_000, 400 + i, &format!("D4{i:010}")))
            .await;
        assert_eq!(rc(&r), "00");
    }
    assert_eq!(rows_by_node(&pool, "D4").await, (0, 4));
    let (a1, b1) = rows_by_node(&pool, "D1").await;
    let (a2, b2) = rows_by_node(&pool, "D2").await;
    assert_eq!((a1 + b1, a2 + b2), (4, 4), "every request journaled once");
    assert_eq!(
        acq.ledger().len(),
        16,
        "every request reached the acquirer once"
    );
    drop((proxy, b));
    acq.stop().await;
}

/// A PROXY protocol v2 header for a TCP connection from `terminal` (IPv4).
fn proxy_v2(terminal: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(t) = terminal else {
        panic!("IPv4 only here")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(t.ip().octets());
    h.extend([127, 0, 0, 1]);
    h.extend(t.port().to_be_bytes());
    h.extend(8583_u16.to_be_bytes());
    h
}

#[tokio::test]
async fn a_proxy_protocol_listener_serves_after_the_header_and_closes_a_connection_without_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let TestDb(url, _pool, _schema) = pg_schema("nodes_proxy").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = SwitchConfig::new(&url, acq.local_addr())
        .keys()
        .listener("proxy_protocol", true)
        .start()
        .await;
    let addr = sw.listener_addrs()[0];
    // With the header: served as any connection.
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&proxy_v2("192.0.2.7:51000".parse().unwrap()))
        .await
        .unwrap();
    let mut t = Terminal::over(stream);
    assert_eq!(
        rc(&t.exchange(&request(1_000, 1, "P00000000001")).await),
        "00"
    );
    // Without it (a terminal going past the balancer): closed, nothing answered or forwarded.
    let mut t = Terminal::connect(addr).await;
    t.send(&request(1_000, 2, "P00000000002")).await;
    let mut stream = t.framed.into_inner();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut rest)).await;
    // Closed (a reset: the switch did not read all that was sent), and nothing answered.
    let closed = |r: &Result<std::io::Result<usize>, _>| match r {
        Ok(Ok(0)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    };
    assert!(
        closed(&read) && rest.is_empty(),
        "closed with no answer: {read:?}"
    );
    // Silent: closed after the header timeout.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(8), silent.read_to_end(&mut rest)).await;
    assert!(closed(&read) && rest.is_empty(), "{read:?}");
    assert_eq!(
        acq.ledger().len(),
        1,
        "only the request with a header reached the acquirer"
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_request_and_its_copy_on_two_nodes_behind_haproxy_are_charged_once() {
    let TestDb(url, pool, _schema) = pg_schema("nodes_dup").await;
    // The acquirer answers after 300 ms: the copy arrives at the other node while the first is
    // in flight.
    let acq = acquirer_with(Rules {
        latency: cardswitch_simulators::acquirer::Latency {
            min_ms: 300,
            max_ms: 300,
        },
        ..Rules::default_rules()
    })
    .await;
    let (admin_a, admin_b) = (free_addr(), free_addr());
    let a = SwitchProcess::start(node(&url, acq.local_addr(), "node-a", admin_a), "dup-a").await;
    let b = SwitchProcess::start(node(&url, acq.local_addr(), "node-b", admin_b), "dup-b").await;
    let proxy = Haproxy::start([(a.addr, admin_a), (b.addr, admin_b)]);
    proxy.wait_up().await;
    // Two connections through HAProxy, one on each node (leastconn).
    let mut t1 = Terminal::connect(proxy.front).await;
    assert_eq!(
        rc(&t1.exchange(&request(1_000, 1, "U00000000001")).await),
        "00"
    );
    let mut t2 = Terminal::connect(proxy.front).await;
    assert_eq!(
        rc(&t2.exchange(&request(1_000, 2, "U00000000002")).await),
        "00"
    );
    assert_eq!(
        rows_by_node(&pool, "U").await,
        (1, 1),
        "one connection per node"
    );

    let original = request(2_500, 3, "U00000000003");
    t1.send(&original).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    t2.send(&original).await;
    let (first, copy) = (t1.recv().await, t2.recv().await);
    assert_eq!(rc(&first), "00");
    assert_eq!(
        (rc(&copy), copy.auth_code()),
        ("00".to_owned(), first.auth_code())
    );
    let charged = acq
        .ledger()
        .iter()
        .filter(|e| e.rrn == "U00000000003")
        .count();
    assert_eq!(charged, 1, "the acquirer saw it once");
    // The same keys with other content, on either node: 94.
    let mut other = original.clone();
    other.set_amount(9_999);
    assert_eq!(rc(&t1.exchange(&other).await), "94");
    assert_eq!(rc(&t2.exchange(&other).await), "94");
    assert_eq!(acq.ledger().len(), 3);
    drop((proxy, a, b));
    acq.stop().await;
}
