//! Crash safety against an acquirer that matches reversals strictly by DE90 (the acquirer
//! simulator's default): the switch as a process of its own, killed with SIGKILL at the moments
//! that lose money, restarted on the same PostgreSQL schema; and the journal's keys, which must
//! be the same across restarts.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use cardswitch_codec::{Message, Mti};
use cardswitch_simulators::acquirer::Latency;
use cardswitch_simulators::Rules;

mod common;

use common::{
    acquirer_with, eventually, pg_schema, rc, request, state_of, terminal_reversal, SwitchConfig,
    SwitchProcess, Terminal, TestDb, DATA_KEY,
};

/// The switch's configuration here: keys, DE32 set by the endpoint, timeouts long enough for a
/// slow acquirer, store-and-forward retrying fast.
fn config(url: &str, link: impl std::fmt::Display) -> SwitchConfig {
    SwitchConfig::new(url, link).keys().endpoint_toml(
        "acquirer_id = \"123456\"\nrequest_timeout_ms = 8000\nreconnect_min_ms = 50\n\
         reconnect_max_ms = 200\n[saf]\ninitial_delay_ms = 0\nretry_min_ms = 100\n\
         retry_max_ms = 400\npoll_ms = 100",
    )
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

/// A purchase (0200).
fn purchase(amount: u64, stan: u32, rrn: &str) -> Message {
    let mut m = request(amount, stan, rrn);
    m.set_mti(Mti::new(*b"0200").unwrap());
    m
}

/// The terminal sends `m` and gives up on it (the switch is killed before it answers).
async fn send_and_wait_for_the_acquirer(
    t: &mut Terminal,
    m: &Message,
    acq: &cardswitch_simulators::Acquirer,
) {
    let before = acq.ledger().len();
    t.send(m).await;
    eventually(Duration::from_secs(5), "the acquirer decided", || async {
        acq.ledger().len() == before + 1
    })
    .await;
}

#[tokio::test]
async fn kill_9_while_the_acquirer_holds_the_request_reverses_it_as_the_acquirer_knows_it() {
    let TestDb(url, pool, _schema) = pg_schema("crash_wait").await;
    // The acquirer approves at once but answers after 3 s: the request is charged there while
    // the switch waits.
    let acq = acquirer_with(Rules::default_rules()).await;
    let mut switch = SwitchProcess::start(config(&url, acq.local_addr()), "crash-wait").await;
    let mut t = Terminal::connect(switch.addr).await;
    assert_eq!(
        rc(&t.exchange(&purchase(1_000, 1, "000000000001")).await),
        "00"
    );
    acq.set_rules(slow(3_000));
    let original = purchase(2_500, 2, "000000000002");
    send_and_wait_for_the_acquirer(&mut t, &original, &acq).await;
    let charged = acq.ledger()[1].clone();
    assert!(charged.auth_code.is_some() && !charged.reversed);
    switch.kill();
    acq.set_rules(Rules::default_rules());

    // Restarted: the charge is reversed with no terminal action, named by what the acquirer saw.
    switch.restart().await;
    eventually(Duration::from_secs(15), "the charge reversed", || async {
        acq.ledger()[1].reversed
    })
    .await;
    let seen = acq.reversals();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].found);
    assert_eq!(seen[0].reason.as_deref(), Some("68"));
    let de90 = seen[0].original.clone().unwrap();
    assert_eq!(&de90[..4], "0200");
    assert_eq!(&de90[4..10], charged.stan, "the STAN the acquirer saw");
    assert_ne!(&de90[4..10], "000002", "not the terminal's STAN");
    assert_eq!(&de90[20..31], "00000123456", "DE32 as sent");
    eventually(Duration::from_secs(10), "journaled as reversed", || async {
        state_of(&pool, "000000000002", "0200").await == "reversed"
    })
    .await;
    assert!(!acq.ledger()[0].reversed, "the answered purchase stands");

    // The terminal's own reversal (DE90 from its own request) is acknowledged and changes
    // nothing more; its copy of the purchase gets the switch's answer, 91.
    let mut t = Terminal::connect(switch.addr).await;
    let reply = t
        .exchange(&terminal_reversal(&original, Mti::REVERSAL_ADVICE, 3))
        .await;
    assert_eq!(rc(&reply), "00");
    assert_eq!(rc(&t.exchange(&original).await), "91");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        acq.reversals().len(),
        1,
        "nothing more reached the acquirer"
    );
    let charged_now = acq.ledger().iter().filter(|e| !e.reversed).count();
    assert_eq!(charged_now, 1);
    let forwards: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM forwards")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(forwards, 0, "every write-ahead record resolved");
    switch.kill();
    acq.stop().await;
}

#[tokio::test]
async fn kill_9_between_the_approval_and_the_journal_commit_reverses_it() {
    let TestDb(url, pool, _schema) = pg_schema("crash_commit").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let mut switch = SwitchProcess::start(config(&url, acq.local_addr()), "crash-commit").await;
    let mut t = Terminal::connect(switch.addr).await;
    assert_eq!(
        rc(&t.exchange(&purchase(1_000, 1, "000000000011")).await),
        "00"
    );
    // Journal rows cannot be written while this transaction holds the table: the acquirer's
    // approval comes back and the switch's commit waits.
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE transactions IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let original = purchase(4_000, 2, "000000000012");
    t.send(&original).await;
    eventually(Duration::from_secs(5), "the acquirer approved", || async {
        acq.ledger().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    switch.kill();
    lock.rollback().await.unwrap();

    switch.restart().await;
    eventually(Duration::from_secs(15), "the approval reversed", || async {
        acq.ledger()[1].reversed
    })
    .await;
    assert_eq!(acq.reversals().len(), 1);
    assert!(acq.reversals()[0].found);
    eventually(Duration::from_secs(10), "journaled as reversed", || async {
        state_of(&pool, "000000000012", "0200").await == "reversed"
    })
    .await;
    assert!(!acq.ledger()[0].reversed);
    switch.kill();
    acq.stop().await;
}

#[tokio::test]
async fn a_restart_with_the_same_keys_replays_duplicates() {
    let TestDb(url, _pool, _schema) = pg_schema("crash_keys").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = config(&url, acq.local_addr()).start().await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let m = purchase(1_200, 7, "000000000007");
    let first = t.exchange(&m).await;
    assert_eq!(rc(&first), "00");
    sw.shutdown().await;

    let sw = config(&url, acq.local_addr()).start().await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let again = t.exchange(&m).await;
    assert_eq!(rc(&again), "00");
    assert_eq!(again.auth_code(), first.auth_code(), "the stored reply");
    assert_eq!(acq.ledger().len(), 1, "charged once");
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_switch_without_keys_or_with_other_keys_is_refused() {
    let TestDb(url, _pool, _schema) = pg_schema("crash_refuse").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    // No keys and no ephemeral keys: refused, naming both and how to make them.
    let text = SwitchConfig::new(&url, acq.local_addr())
        .text()
        .replace("ephemeral_keys = true\n", "");
    let err = format!(
        "{:#}",
        cardswitch::config::Config::from_toml(&text, Vec::new()).unwrap_err()
    );
    assert!(
        err.contains("journal.pan_hmac_key and journal.data_key not set")
            && err.contains("openssl rand -hex 32"),
        "{err}"
    );

    // The first start stores the keys' check values ...
    config(&url, acq.local_addr())
        .start()
        .await
        .shutdown()
        .await;
    // ... so another data key, another PAN key, or ephemeral keys are refused.
    let other = "ff".repeat(32);
    for (key, what) in [
        ("data_key", "journal.data_key (id k1)"),
        ("pan_hmac_key", "journal.pan_hmac_key"),
    ] {
        let c = config(&url, acq.local_addr()).set("journal", key, other.as_str());
        let err = format!(
            "{:#}",
            cardswitch::server::Switch::start(c.config())
                .await
                .unwrap_err()
        );
        assert!(
            err.contains(what) && err.contains("not the key this journal was started with"),
            "{err}"
        );
    }
    let err = format!(
        "{:#}",
        cardswitch::server::Switch::start(SwitchConfig::new(&url, acq.local_addr()).config())
            .await
            .unwrap_err()
    );
    assert!(err.contains("ephemeral_keys"), "{err}");

    // A rotation: a new data key with the old one retired starts, and so does the old one
    // alone again (its check value is unchanged).
    let rotated = config(&url, acq.local_addr())
        .set("journal", "data_key", other.as_str())
        .set("journal", "data_key_id", "k2")
        .toml(&format!("[journal.retired_data_keys]\nk1 = \"{DATA_KEY}\""));
    rotated.start().await.shutdown().await;
    config(&url, acq.local_addr())
        .start()
        .await
        .shutdown()
        .await;
    acq.stop().await;
}

#[tokio::test]
async fn a_queued_entry_no_key_opens_stays_pending_and_is_counted() {
    let TestDb(url, pool, _schema) = pg_schema("crash_unopenable").await;
    cardswitch::telemetry::install().unwrap();
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = config(&url, acq.local_addr())
        .admin("crash-admin-token-0123456789")
        .start()
        .await;
    // An entry sealed under a key id this switch does not have.
    sqlx::query(
        "INSERT INTO saf (id, endpoint, order_key, kind, mti, txn_id, payload, state, next_at_us, \
         expires_us, created_us) VALUES (1, 'acq', 'x', 'reversal', '0420', NULL, 'k9:00', \
         'pending', 0, 9000000000000000, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let metrics = format!("http://{}/metrics", sw.admin_addr().unwrap());
    eventually(Duration::from_secs(10), "counted", || {
        let metrics = metrics.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                ureq::get(&metrics)
                    .call()
                    .ok()
                    .and_then(|mut r| r.body_mut().read_to_string().ok())
                    .is_some_and(|t| t.contains("cardswitch_saf_unopenable_total"))
            })
            .await
            .unwrap()
        }
    })
    .await;
    let state: String = sqlx::query_scalar("SELECT state FROM saf WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "pending", "never given up for want of a key");
    assert_eq!(acq.reversals().len(), 0);
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_rotated_data_key_reseals_stored_entries_and_the_old_key_can_go() {
    let TestDb(url, _pool, _schema) = pg_schema("crash_reseal").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let sw = config(&url, acq.local_addr()).start().await;
    let m = purchase(1_300, 8, "000000000008");
    let first = Terminal::connect(sw.listener_addrs()[0])
        .await
        .exchange(&m)
        .await;
    assert_eq!(rc(&first), "00");
    sw.shutdown().await;

    // The new key seals, the old one only opens; the stored reply is re-sealed under the new.
    let new_key = "ee".repeat(32);
    let rotated = config(&url, acq.local_addr())
        .set("journal", "data_key", new_key.as_str())
        .set("journal", "data_key_id", "k2")
        .toml(&format!("[journal.retired_data_keys]\nk1 = \"{DATA_KEY}\""));
    let journal = rotated.config().config.journal;
    let done = cardswitch::journal::reseal(&journal, "reseal")
        .await
        .unwrap();
    assert!(done.resealed >= 1 && done.unopenable == 0, "{done:?}");
    let again = cardswitch::journal::reseal(&journal, "reseal")
        .await
        .unwrap();
    assert_eq!(again.resealed, 0, "{again:?}");
    assert!(again.current >= 1);

    // The old key dropped: the copy still gets its stored reply.
    let only_new = config(&url, acq.local_addr())
        .set("journal", "data_key", new_key.as_str())
        .set("journal", "data_key_id", "k2");
    let sw = only_new.start().await;
    let copy = Terminal::connect(sw.listener_addrs()[0])
        .await
        .exchange(&m)
        .await;
    assert_eq!(rc(&copy), "00");
    assert_eq!(copy.auth_code(), first.auth_code());
    assert_eq!(acq.ledger().len(), 1);
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn a_terminal_reversal_of_a_request_still_in_flight_waits_for_it_and_reverses_it() {
    let TestDb(url, pool, _schema) = pg_schema("crash_in_flight").await;
    let acq = acquirer_with(slow(1_500)).await;
    let sw = config(&url, acq.local_addr()).start().await;
    let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
    let mut t2 = Terminal::connect(sw.listener_addrs()[0]).await;
    let original = purchase(3_100, 21, "000000000021");
    t.send(&original).await;
    eventually(Duration::from_secs(5), "the acquirer decided", || async {
        acq.ledger().len() == 1
    })
    .await;
    // The terminal gives up before the reply and reverses (DE90 from its own request) on
    // another connection: the switch waits for the original, then reverses it as the acquirer
    // knows it.
    let reply = t2
        .exchange(&terminal_reversal(&original, Mti::REVERSAL_ADVICE, 22))
        .await;
    assert_eq!(rc(&reply), "00");
    assert_eq!(rc(&t.recv().await), "00", "the original's own answer");
    eventually(
        Duration::from_secs(10),
        "reversed at the acquirer",
        || async { acq.ledger()[0].reversed },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "reversed in the journal",
        || async { state_of(&pool, "000000000021", "0200").await == "reversed" },
    )
    .await;
    sw.shutdown().await;
    acq.stop().await;
}

#[tokio::test]
async fn kill_9_while_the_acquirer_holds_a_terminal_reversal_repeats_it_and_journals_it() {
    let TestDb(url, pool, _schema) = pg_schema("crash_reversal").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    let mut switch = SwitchProcess::start(config(&url, acq.local_addr()), "crash-reversal").await;
    let mut t = Terminal::connect(switch.addr).await;
    let original = purchase(3_300, 51, "000000000051");
    assert_eq!(rc(&t.exchange(&original).await), "00");
    let charged = acq.ledger()[0].clone();
    // The acquirer reverses the charge at once but answers after 3 s; the switch dies first.
    acq.set_rules(slow(3_000));
    let reversal = terminal_reversal(&original, Mti::REVERSAL_REQUEST, 52);
    t.send(&reversal).await;
    eventually(Duration::from_secs(5), "the acquirer reversed", || async {
        acq.ledger()[0].reversed
    })
    .await;
    switch.kill();
    acq.set_rules(Rules::default_rules());

    // Restarted with no terminal action: the journal agrees with the acquirer, and the
    // reversal is repeated as a 0420 naming the original as the acquirer saw it.
    switch.restart().await;
    eventually(Duration::from_secs(15), "journaled as reversed", || async {
        state_of(&pool, "000000000051", "0200").await == "reversed"
    })
    .await;
    eventually(Duration::from_secs(10), "the reversal repeated", || async {
        acq.reversals().len() == 2
    })
    .await;
    let seen = acq.reversals();
    assert_eq!(seen[0].mti, "0400");
    assert_eq!(seen[1].mti, "0420", "{seen:?}");
    assert!(seen[1].found, "matched by DE90 alone");
    let de90 = seen[1].original.clone().unwrap();
    assert_eq!(&de90[..4], "0200");
    assert_eq!(&de90[4..10], charged.stan, "the STAN the acquirer saw");
    assert_eq!(&de90[20..31], "00000123456", "DE32 as sent");
    let forwards: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM forwards")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(forwards, 0, "every write-ahead record resolved");

    // The terminal's repeat is answered what the switch decided, and sends nothing more.
    let mut repeat = reversal.clone();
    repeat.set_mti(Mti::new(*b"0401").unwrap());
    let mut t = Terminal::connect(switch.addr).await;
    assert_eq!(rc(&t.exchange(&repeat).await), "00");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        acq.reversals().len(),
        2,
        "nothing more reached the acquirer"
    );
    assert!(acq.ledger()[0].reversed);
    switch.kill();
    acq.stop().await;
}

#[tokio::test]
async fn a_node_killed_for_good_has_its_forwarded_request_reversed_by_another_node() {
    let TestDb(url, pool, _schema) = pg_schema("crash_takeover").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    // Two nodes on one journal with the same keys; a node silent for 2 s is gone.
    let node = |name: &str| {
        config(&url, acq.local_addr())
            .set("switch", "node", name)
            .set("journal", "takeover_after_ms", 2_000_i64)
    };
    let a = SwitchProcess::start(node("node-a"), "takeover-a").await;
    let mut b = SwitchProcess::start(node("node-b"), "takeover-b").await;
    let mut tb = Terminal::connect(b.addr).await;
    assert_eq!(
        rc(&tb.exchange(&purchase(1_000, 1, "000000000031")).await),
        "00"
    );
    // A duplicate claim node b made and left in flight without forwarding its request.
    sqlx::query(
        "INSERT INTO dedup (dkey, content_hash, txn_id, node, state, created_us) \
         VALUES ('never-forwarded', 'h', 1, 'node-b', 'in_flight', \
                 (extract(epoch from clock_timestamp()) * 1000000)::bigint)",
    )
    .execute(&pool)
    .await
    .unwrap();
    acq.set_rules(slow(4_000));
    let original = purchase(2_600, 2, "000000000032");
    send_and_wait_for_the_acquirer(&mut tb, &original, &acq).await;
    let charged = acq.ledger()[1].clone();
    assert!(charged.auth_code.is_some() && !charged.reversed);
    b.kill();
    acq.set_rules(Rules::default_rules());

    // Node b stays down: node a reverses its charge as the acquirer knows it.
    eventually(Duration::from_secs(20), "the charge reversed", || async {
        acq.ledger()[1].reversed
    })
    .await;
    let seen = acq.reversals();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].found);
    let de90 = seen[0].original.clone().unwrap();
    assert_eq!(&de90[4..10], charged.stan, "the STAN the acquirer saw");
    eventually(Duration::from_secs(10), "journaled as reversed", || async {
        state_of(&pool, "000000000032", "0200").await == "reversed"
    })
    .await;
    let left: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM forwards), \
                (SELECT COUNT(*) FROM dedup WHERE dkey = 'never-forwarded')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0), "no record left, the orphan claim let go");
    assert!(!acq.ledger()[0].reversed, "the answered purchase stands");

    // A copy of the request on node a gets the answer node a recorded for it.
    let mut ta = Terminal::connect(a.addr).await;
    assert_eq!(rc(&ta.exchange(&original).await), "91");
    // Node b starts again and finds nothing of its own to do.
    b.restart().await;
    let mut tb = Terminal::connect(b.addr).await;
    assert_eq!(rc(&tb.exchange(&original).await), "91");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(acq.reversals().len(), 1, "reversed once");
    assert_eq!(acq.ledger().iter().filter(|e| !e.reversed).count(), 1);
    drop((a, b));
    acq.stop().await;
}

#[tokio::test]
async fn a_terminal_reversal_of_a_request_only_a_gone_node_recorded_is_named_as_the_acquirer_saw_it(
) {
    let TestDb(url, pool, _schema) = pg_schema("crash_translate").await;
    let acq = acquirer_with(Rules::default_rules()).await;
    // No takeover during the test: node a learns of the original only by its record.
    let node = |name: &str| {
        config(&url, acq.local_addr())
            .endpoint_toml("request_timeout_ms = 3000")
            .set("switch", "node", name)
            .set("journal", "takeover_after_ms", 0_i64)
    };
    let a = SwitchProcess::start(node("node-a"), "translate-a").await;
    let mut b = SwitchProcess::start(node("node-b"), "translate-b").await;
    acq.set_rules(slow(2_500));
    let mut tb = Terminal::connect(b.addr).await;
    let original = purchase(2_700, 5, "000000000041");
    send_and_wait_for_the_acquirer(&mut tb, &original, &acq).await;
    let charged = acq.ledger()[0].clone();
    b.kill();
    acq.set_rules(Rules::default_rules());
    let records: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM forwards")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(records, 1, "the original is known by its record only");

    // The terminal gives up and reverses on node a: acknowledged, and the acquirer's charge is
    // reversed by a 0420 naming the original by the STAN and DE32 it saw.
    let mut ta = Terminal::connect(a.addr).await;
    let reply = ta
        .exchange(&terminal_reversal(&original, Mti::REVERSAL_ADVICE, 6))
        .await;
    assert_eq!(rc(&reply), "00");
    eventually(Duration::from_secs(10), "the charge reversed", || async {
        acq.ledger()[0].reversed
    })
    .await;
    let seen = acq.reversals();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].found, "matched by DE90 alone");
    let de90 = seen[0].original.clone().unwrap();
    assert_eq!(&de90[4..10], charged.stan, "the STAN the acquirer saw");
    assert_ne!(&de90[4..10], "000005", "not the terminal's STAN");
    assert_eq!(&de90[20..31], "00000123456", "DE32 as sent");
    drop((a, b));
    acq.stop().await;
}
