//! Journal outages made for real: a connection cut at its COMMIT (before the server sees it,
//! or after the server committed it), a PostgreSQL cluster of the test's own stopped and
//! started, a constraint a change breaks, a second process with a running node's name. Against
//! the acquirer simulator, which matches reversals strictly by DE90.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cardswitch_codec::{Message, Mti};
use cardswitch_simulators::acquirer::Latency;
use cardswitch_simulators::Rules;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

#[path = "../src/cmd/cluster.rs"]
#[allow(dead_code, unreachable_pub)]
mod cluster;

use common::{
    acquirer_with, eventually, pg_schema, rc, request, state_of, SwitchConfig, SwitchProcess,
    Terminal, TestDb,
};

/// Where a [`PgRelay`] cuts its next connection that sends COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// The COMMIT never reaches the server: the transaction is rolled back.
    BeforeCommit,
    /// The server gets the COMMIT and has time to commit; its answer never comes back.
    AfterCommit,
}

/// What the relay cuts: the next COMMIT, or with `on`, the next COMMIT of a transaction in
/// which those bytes were sent (a statement naming a table).
type Armed = Arc<Mutex<Option<(Cut, Option<&'static [u8]>)>>>;

/// A TCP relay between the switch and PostgreSQL that cuts a connection at its next COMMIT.
struct PgRelay {
    addr: SocketAddr,
    armed: Armed,
    fired: Arc<Mutex<u32>>,
}

impl PgRelay {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(Mutex::new(None));
        let fired = Arc::new(Mutex::new(0));
        let (a, f) = (Arc::clone(&armed), Arc::clone(&fired));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, Arc::clone(&a), Arc::clone(&f)));
            }
        });
        Self { addr, armed, fired }
    }

    fn arm(&self, cut: Cut) {
        *self.armed.lock().unwrap() = Some((cut, None));
    }

    /// Cuts the next COMMIT of a transaction that sent `on` (other commits pass).
    fn arm_on(&self, cut: Cut, on: &'static [u8]) {
        *self.armed.lock().unwrap() = Some((cut, Some(on)));
    }

    fn fired(&self) -> u32 {
        *self.fired.lock().unwrap()
    }

    /// `url` with its server replaced by this relay.
    fn url(&self, url: &str) -> String {
        let at = url.find('@').unwrap() + 1;
        let end = at + url[at..].find('/').unwrap();
        format!("{}{}{}", &url[..at], self.addr, &url[end..])
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream, armed: Armed, fired: Arc<Mutex<u32>>) {
    let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
    let mut mute_until: Option<tokio::time::Instant> = None;
    // What this connection sent since its last COMMIT.
    let mut sent: Vec<u8> = Vec::new();
    loop {
        let cut_at = mute_until;
        tokio::select! {
            n = client.read(&mut a) => {
                let Ok(n) = n else { return };
                if n == 0 {
                    return;
                }
                let chunk = &a[..n];
                if sent.len() > 1 << 20 {
                    sent.clear();
                }
                sent.extend_from_slice(chunk);
                let commit = chunk.windows(7).any(|w| w == b"COMMIT\0");
                if commit && mute_until.is_none() {
                    let cut = {
                        let mut armed = armed.lock().unwrap();
                        let wanted = armed.is_some_and(|(_, on)| {
                            on.is_none_or(|on| sent.windows(on.len()).any(|w| w == on))
                        });
                        if wanted { armed.take().map(|(cut, _)| cut) } else { None }
                    };
                    sent.clear();
                    if let Some(cut) = cut {
                        *fired.lock().unwrap() += 1;
                        if cut == Cut::BeforeCommit {
                            return;
                        }
                        mute_until = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                    }
                }
                if server.write_all(chunk).await.is_err() {
                    return;
                }
            }
            n = server.read(&mut b) => {
                let Ok(n) = n else { return };
                if n == 0 {
                    return;
                }
                if mute_until.is_none() && client.write_all(&b[..n]).await.is_err() {
                    return;
                }
            }
            () = async {
                match cut_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => return,
        }
    }
}

/// The switch's configuration here: keys, DE32 set by the endpoint, store-and-forward retrying
/// fast.
fn config(url: &str, link: impl std::fmt::Display) -> SwitchConfig {
    SwitchConfig::new(url, link).keys().endpoint_toml(
        "acquirer_id = \"123456\"\nrequest_timeout_ms = 8000\nreconnect_min_ms = 50\n\
         reconnect_max_ms = 200\n[saf]\ninitial_delay_ms = 0\nretry_min_ms = 100\n\
         retry_max_ms = 400\npoll_ms = 100",
    )
}

fn purchase(amount: u64, stan: u32, rrn: &str) -> Message {
    let mut m = request(amount, stan, rrn);
    m.set_mti(Mti::new(*b"0200").unwrap());
    m
}

fn slow(ms: u64) -> Rules {
    Rules {
        latency: Latency {
            min_ms: ms,
            max_ms: ms,
        },
        ..Rules::default_rules()
    }
}

/// A switch journaling through a relay that can cut its database connection, its acquirer and
/// a terminal whose first purchase (`rrn`) was approved and recorded.
struct Relayed {
    db: TestDb,
    relay: PgRelay,
    acq: cardswitch_simulators::Acquirer,
    sw: cardswitch::server::Switch,
    t: Terminal,
}

async fn relayed(schema: &str, rrn: &str) -> Relayed {
    let db = pg_schema(schema).await;
    let relay = PgRelay::start("127.0.0.1:5432".into()).await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = config(&relay.url(&db.0), acq.local_addr()).start().await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    assert_eq!(rc(&t.exchange(&purchase(1_000, 1, rrn)).await), "00");
    Relayed {
        db,
        relay,
        acq,
        sw,
        t,
    }
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn an_approval_whose_commit_fails_is_answered_96_reversed_and_replayed_as_96() {
    let Relayed {
        db: TestDb(_, pool, _schema),
        relay,
        acq,
        sw,
        mut t,
    } = relayed("outage_commit", "000000000001").await;

    relay.arm(Cut::BeforeCommit);
    let sale = purchase(2_500, 2, "000000000002");
    let reply = t.exchange(&sale).await;
    assert_eq!(relay.fired(), 1);
    assert_eq!(rc(&reply), "96", "not recorded, so not approved");
    assert_eq!(reply.auth_code(), None);
    assert!(
        acq.ledger()[1].auth_code.is_some(),
        "the acquirer approved it"
    );

    eventually(Duration::from_secs(10), "the approval reversed", || async {
        acq.ledger()[1].reversed
    })
    .await;
    let seen = acq.reversals();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].found, "named as the acquirer knows it");
    eventually(Duration::from_secs(10), "journaled as reversed", || async {
        state_of(&pool, "000000000002", "0200").await == "reversed"
    })
    .await;
    let (code, decided): (String, String) = sqlx::query_as(
        "SELECT response_code, decided_by FROM transactions WHERE rrn = '000000000002'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((code.as_str(), decided.as_str()), ("96", "switch"));

    // The terminal tries again: it gets the 96 it was told, and nothing reaches the acquirer.
    let again = t.exchange(&sale).await;
    assert_eq!(rc(&again), "96");
    assert_eq!(again.auth_code(), None);
    assert_eq!(acq.ledger().len(), 2);
    assert_eq!(
        rc(&t.exchange(&purchase(700, 3, "000000000003")).await),
        "00"
    );
    assert!(!acq.ledger()[0].reversed);
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_commit_that_succeeded_unseen_is_not_written_twice_and_the_writer_flows_on() {
    let Relayed {
        db: TestDb(_, pool, _schema),
        relay,
        acq,
        sw,
        mut t,
    } = relayed("outage_ambiguous", "000000000021").await;

    relay.arm(Cut::AfterCommit);
    let sale = purchase(3_000, 2, "000000000022");
    assert_eq!(rc(&t.exchange(&sale).await), "96");
    assert_eq!(relay.fired(), 1);
    eventually(Duration::from_secs(10), "the approval reversed", || async {
        acq.ledger()[1].reversed
    })
    .await;
    for stan in 3..=6 {
        let rrn = format!("0000000000{}", 20 + stan);
        assert_eq!(rc(&t.exchange(&purchase(500, stan, &rrn)).await), "00");
    }
    assert_eq!(
        count(
            &pool,
            "SELECT COUNT(*) FROM transactions WHERE rrn = '000000000022'"
        )
        .await,
        1,
        "one row, written once"
    );
    eventually(Duration::from_secs(10), "journaled as reversed", || async {
        state_of(&pool, "000000000022", "0200").await == "reversed"
    })
    .await;
    let code: String =
        sqlx::query_scalar("SELECT response_code FROM transactions WHERE rrn = '000000000022'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(code, "96", "the row says what the terminal was told");
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM saf WHERE kind = 'reversal'").await,
        1,
        "the reversal queued once"
    );
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM transactions").await, 6);
    assert_eq!(
        rc(&t.exchange(&sale).await),
        "96",
        "the copy replays the 96"
    );
    assert_eq!(acq.ledger().len(), 6);
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_stand_in_approval_that_cannot_be_recorded_sends_no_advice() {
    let TestDb(url, pool, _schema) = pg_schema("outage_stip").await;
    let relay = PgRelay::start("127.0.0.1:5432".into()).await;
    // The acquirer's address, with nothing listening yet: stand-in decides.
    let addr = common::free_addr();
    let sw = config(&relay.url(&url), addr)
        .endpoint_toml("[stand_in]\nenabled = true\ndefault_limit_minor = 5000")
        .launch()
        .await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let stood_in = t.exchange(&request(1_000, 1, "000000000031")).await;
    assert_eq!(rc(&stood_in), "00");

    // The journal's commit (a store-and-forward retry may commit first).
    relay.arm_on(Cut::BeforeCommit, b"transactions");
    let reply = t.exchange(&request(2_000, 2, "000000000032")).await;
    assert_eq!(relay.fired(), 1);
    assert_eq!(rc(&reply), "96");
    let journal = sw.pipeline().journal().clone();
    eventually(Duration::from_secs(5), "the breaker closed", || async {
        !journal.breaker().is_open()
    })
    .await;
    // Its row is written from the backlog (the commit cut may also have been a queue
    // worker's, with this request refused behind it: its row then follows the breaker).
    eventually(
        Duration::from_secs(5),
        "the 96 journaled as declined",
        || async {
            count(
                &pool,
                "SELECT COUNT(*) FROM transactions WHERE rrn = '000000000032' AND mti = '0100' \
             AND state = 'declined'",
            )
            .await
                == 1
        },
    )
    .await;

    // The acquirer comes up: only the advice of the approval the terminal was told of arrives.
    let acq = common::acquirer_at(addr, Rules::default_rules()).await;
    eventually(
        Duration::from_secs(10),
        "the first advice delivered",
        || async { state_of(&pool, "000000000031", "0100").await == "advised" },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ledger = acq.ledger();
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].rrn, "000000000031");
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM saf WHERE kind = 'advice'").await,
        1
    );
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_change_the_database_refuses_is_set_aside_and_everything_else_is_written() {
    let TestDb(url, pool, _schema) = pg_schema("outage_poison").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = config(&url, acq.local_addr()).start().await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    assert_eq!(
        rc(&t.exchange(&purchase(1_000, 1, "000000000041")).await),
        "00"
    );
    // A constraint the row of one amount breaks.
    sqlx::query("ALTER TABLE transactions ADD CONSTRAINT no_666 CHECK (amount_minor <> 666)")
        .execute(&pool)
        .await
        .unwrap();
    // Five terminals at once, one of them with the refused amount.
    let addr = sw.listener_addrs()[0];
    let sends = (2..=6u32).map(|stan| {
        tokio::spawn(async move {
            let amount = if stan == 4 {
                666
            } else {
                100 * u64::from(stan)
            };
            let rrn = format!("0000000000{}", 40 + stan);
            let mut t = Terminal::connect(addr).await;
            (stan, rc(&t.exchange(&purchase(amount, stan, &rrn)).await))
        })
    });
    let mut codes = Vec::new();
    for s in sends {
        codes.push(s.await.unwrap());
    }
    codes.sort();
    assert_eq!(
        codes,
        [
            (2, "00".to_owned()),
            (3, "00".to_owned()),
            (4, "96".to_owned()),
            (5, "00".to_owned()),
            (6, "00".to_owned())
        ]
    );
    eventually(Duration::from_secs(10), "set aside", || async {
        count(&pool, "SELECT COUNT(*) FROM journal_dead_letters").await == 1
    })
    .await;
    // Its reversal was still queued and delivered: the acquirer's approval does not stand.
    let refused = acq.ledger().into_iter().find(|e| e.amount == 666).unwrap();
    assert!(refused.auth_code.is_some());
    eventually(Duration::from_secs(10), "its approval reversed", || async {
        acq.ledger().iter().any(|e| e.amount == 666 && e.reversed)
    })
    .await;
    let (error, change): (String, String) =
        sqlx::query_as("SELECT error, change FROM journal_dead_letters")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        error.contains("no_666") && error.contains("were written"),
        "{error}"
    );
    assert!(
        !change.contains("4761739001010010"),
        "no card number in clear"
    );
    assert!(change.contains("476173******0010"), "{change}");
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM transactions").await, 5);
    assert_eq!(
        rc(&t.exchange(&purchase(800, 7, "000000000047")).await),
        "00"
    );
    assert!(!sw.pipeline().journal().breaker().is_open());
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn while_the_database_is_down_nothing_is_forwarded_and_service_returns_by_itself() {
    let pg = cluster::OwnCluster::start().unwrap();
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = config(&pg.url(), acq.local_addr()).start().await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    assert_eq!(
        rc(&t.exchange(&purchase(1_000, 1, "000000000051")).await),
        "00"
    );

    pg.stop().unwrap();
    for stan in 2..=6u32 {
        let rrn = format!("0000000000{}", 50 + stan);
        assert_eq!(rc(&t.exchange(&purchase(100, stan, &rrn)).await), "96");
    }
    assert!(sw.pipeline().journal().breaker().is_open());
    assert_eq!(acq.ledger().len(), 1, "nothing reached the acquirer");

    pg.start_again().unwrap();
    let journal = sw.pipeline().journal().clone();
    eventually(Duration::from_secs(15), "the breaker closed", || async {
        !journal.breaker().is_open()
    })
    .await;
    assert_eq!(
        rc(&t.exchange(&purchase(900, 7, "000000000057")).await),
        "00"
    );
    assert_eq!(acq.ledger().len(), 2);
    // The 96 rows written late say what the terminals were told.
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    assert_eq!(
        count(&pool, "SELECT COUNT(*) FROM transactions WHERE response_code = '96' AND decided_by = 'switch'").await,
        5
    );
    pool.close().await;
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn sigkill_during_an_outage_loses_nothing_the_spool_is_written_at_restart() {
    let pg = cluster::OwnCluster::start().unwrap();
    // The acquirer approves at once and answers after 1.5 s.
    let acq = acquirer_with(Rules::default_rules()).await;
    let spool =
        std::env::temp_dir().join(format!("cardswitch-outage-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool);
    let cfg = config(&pg.url(), acq.local_addr())
        .set("switch", "node", "spooler")
        .set("journal", "spool_dir", spool.display().to_string());
    let mut switch = SwitchProcess::start(cfg, "outage-spool").await;
    let mut t = Terminal::connect(switch.addr).await;
    assert_eq!(
        rc(&t.exchange(&purchase(1_000, 1, "000000000061")).await),
        "00"
    );

    acq.set_rules(slow(1_500));
    let mut terminals = Vec::new();
    for stan in 2..=5u32 {
        let mut t = Terminal::connect(switch.addr).await;
        t.send(&purchase(
            100 * u64::from(stan),
            stan,
            &format!("0000000000{}", 60 + stan),
        ))
        .await;
        terminals.push(t);
    }
    eventually(
        Duration::from_secs(5),
        "the acquirer approved all",
        || async { acq.ledger().len() == 5 },
    )
    .await;
    pg.stop().unwrap();
    for t in &mut terminals {
        assert_eq!(rc(&t.recv().await), "96");
    }
    let file = spool.join("spooler.spool");
    assert!(
        std::fs::metadata(&file).unwrap().len() > 0,
        "kept in the spool"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        !text.contains("4761739001010010"),
        "no card number in clear"
    );
    switch.kill();

    pg.start_again().unwrap();
    acq.set_rules(Rules::default_rules());
    switch.restart().await;
    eventually(
        Duration::from_secs(15),
        "every approval reversed",
        || async { acq.ledger()[1..].iter().all(|e| e.reversed) },
    )
    .await;
    assert!(!acq.ledger()[0].reversed, "the answered purchase stands");
    assert_eq!(acq.reversals().len(), 4, "each reversed once");
    assert!(acq.reversals().iter().all(|r| r.found));
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "the spool emptied"
    );
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    eventually(Duration::from_secs(10), "journaled as reversed", || async {
        count(
            &pool,
            "SELECT COUNT(*) FROM transactions WHERE state = 'reversed' AND response_code = '96'",
        )
        .await
            == 4
    })
    .await;
    assert_eq!(count(&pool, "SELECT COUNT(*) FROM forwards").await, 0);
    pool.close().await;
    // A copy of one of them gets its 96.
    let mut t = Terminal::connect(switch.addr).await;
    assert_eq!(
        rc(&t.exchange(&purchase(300, 3, "000000000063")).await),
        "96"
    );
    switch.kill();
    let _ = std::fs::remove_dir_all(&spool);
    acq.stop().await;
}

#[tokio::test]
async fn a_second_process_with_a_running_nodes_name_refuses_to_start() {
    let TestDb(url, pool, _schema) = pg_schema("outage_node").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let cfg = || config(&url, acq.local_addr()).set("switch", "node", "twin");
    let _first = SwitchProcess::start(cfg(), "node-first").await;
    let second = cfg()
        .listener("address", common::free_addr().to_string())
        .write("node-second");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
        .args(["run", "--config"])
        .arg(&second)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&second);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"twin\"") && err.contains("already running"),
        "{err}"
    );

    // Another name gets another number.
    let other = config(&url, acq.local_addr())
        .set("switch", "node", "other")
        .start()
        .await;
    let numbers: Vec<(String, i32)> =
        sqlx::query_as("SELECT name, number FROM nodes ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(numbers, [("other".to_owned(), 1), ("twin".to_owned(), 0)]);
    other.shutdown().await;
    acq.stop().await;
}
