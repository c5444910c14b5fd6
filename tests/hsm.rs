//! Card security end to end: the HSM simulator over TCP, the switch translating PIN blocks and
//! checking and making MACs through it, and the acquirer simulator verifying what arrives under
//! its own keys. PostgreSQL journal (a schema per test), real sockets.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::time::Duration;

use cardswitch::config::Config;
use cardswitch::server::Switch;
use cardswitch_codec::framing::Frame;
use cardswitch_codec::{sample, Dialect, Message};
use cardswitch_simulators::acquirer::AcquirerSecurity;
use cardswitch_simulators::hsm::crypto::{self, account_of, PinFormat};
use cardswitch_simulators::hsm::KeyType;
use cardswitch_simulators::terminal::TerminalSecurity;
use cardswitch_simulators::{Acquirer, HsmConfig, HsmFaults, HsmSim, TestKeys};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

mod common;

use common::{pg_schema, SwitchConfig, TestDb};

async fn hsm_sim(listen: SocketAddr) -> HsmSim {
    HsmSim::start(HsmConfig {
        listen,
        header_len: 4,
        faults: HsmFaults::default(),
    })
    .await
    .unwrap()
}

async fn acquirer() -> Acquirer {
    let k = TestKeys::fixed();
    common::acquirer(Some(AcquirerSecurity {
        zpk: Some(k.zpk),
        zak: Some(k.zak),
        zmk: Some(k.zmk),
        pin: "1234".into(),
        pin_format: PinFormat::Iso0,
    }))
    .await
}

fn key(k: &cardswitch_simulators::hsm::ClearKey, kt: KeyType) -> String {
    format!(
        r#"{{ key = "{}", check = "{}" }}"#,
        TestKeys::under_lmk(k, kt),
        k.kcv6()
    )
}

/// The switch's configuration in these tests: journal keys, the HSM at `hsm`, the fixed test
/// keys on the listener (TPK, TAK) and the endpoint (ZPK, ZAK, ZMK) under the LMK.
fn config(url: &str, link: &str, hsm: &str) -> SwitchConfig {
    let k = TestKeys::fixed();
    SwitchConfig::new(url, link)
        .keys()
        .toml(&format!(
            "[switch]\nshutdown_grace_ms = 2000\n\
             [hsm]\naddresses = [\"{hsm}\"]\nconnections = 2\ntimeout_ms = 500\nreconnect_min_ms = 50"
        ))
        .listener_toml(&format!(
            "[security]\ntpk = {}\ntak = {}",
            key(&k.tpk, KeyType::TPK),
            key(&k.tak, KeyType::TAK)
        ))
        .endpoint_toml(&format!(
            "acquirer_id = \"123456\"\nrequest_timeout_ms = 2000\n\
             reconnect_min_ms = 50\nreconnect_max_ms = 200\n\
             [security]\nzpk = {}\nzak = {}\nzmk = {}",
            key(&k.zpk, KeyType::ZPK),
            key(&k.zak, KeyType::ZAK),
            key(&k.zmk, KeyType::ZMK)
        ))
}

async fn switch(url: &str, link: &str, hsm: &str) -> Switch {
    config(url, link, hsm).start().await
}

/// A terminal with keys: PIN blocks and MACs on what it sends.
struct Terminal {
    link: common::Terminal,
    security: TerminalSecurity,
}

impl Terminal {
    async fn connect(addr: SocketAddr, pin: &str) -> Self {
        let k = TestKeys::fixed();
        Self {
            link: common::Terminal::connect(addr).await,
            security: TerminalSecurity {
                tpk: Some(k.tpk),
                tak: Some(k.tak),
                pin: pin.into(),
                pin_format: PinFormat::Iso0,
                pin_on_every: false,
            },
        }
    }

    /// Sends with PIN block and MAC; `tamper` changes the amount after MACing.
    async fn exchange(&mut self, mut msg: Message, tamper: bool) -> Message {
        self.security.apply(&self.link.dialect, &mut msg).unwrap();
        if tamper {
            msg.set_amount(msg.amount().unwrap() + 1);
        }
        self.link.exchange(&msg).await
    }
}

fn request(amount: u64, stan: u32) -> Message {
    let rrn = format!("{:06}{stan:06}", fastrand::u32(100_000..999_999));
    common::request(amount, stan, &rrn)
}

#[test]
fn published_hsm_vectors_over_tcp() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let stream = TcpStream::connect(sim.local_addr()).await.unwrap();
        let mut framed = Framed::new(stream, cardswitch_simulators::hsm::framing());
        // The published payShield host-command examples, byte for byte, each with its own header,
        // pipelined.
        let cases = [
            ("0001CA0406FBB23A5214DFBAB32D775A38E4AB12DC80B186C30902B00303550000025321", "0001CB0004F7808F2CBEC6316803"),
            ("0002CW0A61E674E88C6A7EEABC38C2B2BB492F4123456789012345;8701101", "0002CX00561"),
            ("0003ECBAB32D775A38E4ABX367930344805B1FAD6146EF4ED7502B3F7808F2CBEC631680355000002532114402", "0003ED00"),
            ("9999B20004PING", "9999B300PING"),
        ];
        for (req, _) in &cases {
            framed.send(bytes::Bytes::from(req.as_bytes().to_vec())).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in &cases {
            let f = framed.next().await.unwrap().unwrap();
            got.push(String::from_utf8(f.to_vec()).unwrap());
        }
        got.sort();
        let mut want: Vec<String> = cases.iter().map(|(_, r)| (*r).to_owned()).collect();
        want.sort();
        assert_eq!(got, want);
        sim.stop().await;
    });
}

#[test]
fn pin_translated_mac_checked_and_made() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("hsm_pin").await;
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let acq = acquirer().await;
        let sw = switch(
            &url,
            &acq.local_addr().to_string(),
            &sim.local_addr().to_string(),
        )
        .await;
        let mut t = Terminal::connect(sw.listener_addrs()[0], "1234").await;

        // The right PIN: translated TPK -> ZPK by the switch, verified by the acquirer under its
        // ZPK, and the acquirer checked the switch's MAC under the ZAK.
        let ok = t.exchange(request(1_000, 1), false).await;
        assert_eq!(ok.get_str(39), Some("00"));
        assert_eq!(acq.ledger().len(), 1);
        let stats = sim.stats();
        assert!(stats.commands.get("CA") >= Some(&1), "{stats:?}");
        assert!(stats.commands.get("M8") >= Some(&1), "{stats:?}");
        assert!(stats.commands.get("M6") >= Some(&1), "{stats:?}");

        // A wrong PIN: the block is fine, the acquirer says 55.
        let mut wrong = Terminal::connect(sw.listener_addrs()[0], "9999").await;
        let r = wrong.exchange(request(1_000, 2), false).await;
        assert_eq!(r.get_str(39), Some("55"));
        assert_eq!(acq.ledger().len(), 2);
        assert_eq!(acq.ledger()[1].response_code, "55");

        // A PIN block the TPK does not open (garbage): the switch answers 55 and sends nothing.
        let mut m = request(1_000, 3);
        t.security.apply(&t.link.dialect, &mut m).unwrap();
        m.set(52, &[0x5A; 8]);
        t.security.tpk = None; // keep the garbage block; still MAC it
        let r = t.exchange(m, false).await;
        assert_eq!(r.get_str(39), Some("55"));
        assert_eq!(acq.ledger().len(), 2, "nothing forwarded");
        t.security.tpk = Some(TestKeys::fixed().tpk);

        // A bad MAC: 63, not forwarded, journaled.
        let r = t.exchange(request(1_000, 4), true).await;
        assert_eq!(r.get_str(39), Some("63"));
        assert_eq!(acq.ledger().len(), 2, "nothing forwarded");
        // And a message with no MAC at all.
        let mut bare = request(1_000, 5);
        bare.remove(64);
        let body = t.link.dialect.encode_to_vec(&bare).unwrap();
        t.link.framed.send(Frame::new(body)).await.unwrap();
        let f = t.link.framed.next().await.unwrap().unwrap();
        assert_eq!(
            t.link.dialect.decode(&f.body).unwrap().get_str(39),
            Some("63")
        );
        assert_eq!(acq.ledger().len(), 2);

        sw.shutdown().await;
        let codes: Vec<(String,)> =
            sqlx::query_as("SELECT response_code FROM transactions ORDER BY received_us")
                .fetch_all(&pool)
                .await
                .unwrap();
        let codes: Vec<&str> = codes.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(codes, ["00", "55", "55", "63", "63"]);
        // No PIN block, MAC or full PAN in the journal.
        let dump: Vec<(String,)> = sqlx::query_as("SELECT t::text FROM transactions t")
            .fetch_all(&pool)
            .await
            .unwrap();
        let pan = "4761739001010010";
        for (row,) in &dump {
            assert!(!row.contains(pan), "full PAN in the journal");
        }
        acq.stop().await;
        sim.stop().await;
    });
}

#[test]
fn key_exchange_then_pin_under_the_new_key() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("hsm_kx").await;
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let acq = acquirer().await;
        let link = acq.local_addr().to_string();
        let hsm = sim.local_addr().to_string();
        let sw = switch(&url, &link, &hsm).await;
        let mut t = Terminal::connect(sw.listener_addrs()[0], "1234").await;
        assert_eq!(
            t.exchange(request(1_000, 1), false).await.get_str(39),
            Some("00")
        );

        let before = acq.zpk().unwrap();
        let answer = acq.change_zpk(161, Duration::from_secs(5)).await.unwrap();
        assert_eq!(answer.as_deref(), Some("00"));
        let after = acq.zpk().unwrap();
        assert_ne!(before, after, "the acquirer now uses the new ZPK");
        // The switch translates to the new key: the acquirer verifies the PIN under it.
        assert_eq!(
            t.exchange(request(1_000, 2), false).await.get_str(39),
            Some("00")
        );
        // Kept under the LMK with its check value, never in clear.
        let (stored, check): (String, String) =
            sqlx::query_as("SELECT key_lmk, check_value FROM security_keys WHERE owner = 'acq'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(check, after.kcv6());
        assert!(!stored.contains(&hex::encode_upper(after.as_bytes())));
        sw.shutdown().await;

        // After a restart the switch keeps the key from the exchange, not the configured one.
        let sw = switch(&url, &link, &hsm).await;
        let mut t = Terminal::connect(sw.listener_addrs()[0], "1234").await;
        assert_eq!(
            t.exchange(request(1_000, 3), false).await.get_str(39),
            Some("00")
        );
        sw.shutdown().await;
        acq.stop().await;
        sim.stop().await;
    });
}

#[test]
fn hsm_down_gives_96_and_health_shows_it() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, _pool, _schema) = pg_schema("hsm_down").await;
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let hsm_addr = sim.local_addr();
        let acq = acquirer().await;
        let sw = switch(&url, &acq.local_addr().to_string(), &hsm_addr.to_string()).await;
        let hsm = sw.pipeline().hsm().unwrap().clone();
        assert_eq!(hsm.health().up, 2);
        let mut t = Terminal::connect(sw.listener_addrs()[0], "1234").await;
        assert_eq!(
            t.exchange(request(1_000, 1), false).await.get_str(39),
            Some("00")
        );

        sim.stop().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hsm.health().up > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(hsm.health().up, 0);
        let r = t.exchange(request(1_000, 2), false).await;
        assert_eq!(r.get_str(39), Some("96"));
        assert!(hsm.health().failures > 0);
        assert_eq!(acq.ledger().len(), 1, "nothing forwarded without the HSM");

        // An HSM answering errors on everything: 96 as well.
        let sim = hsm_sim(hsm_addr).await;
        sim.set_faults(HsmFaults {
            error: 100.0,
            error_code: "10".into(),
            ..HsmFaults::default()
        });
        assert!(hsm.wait_ready(Duration::from_secs(10)).await);
        let r = t.exchange(request(1_000, 3), false).await;
        assert_eq!(r.get_str(39), Some("96"));
        // Healthy again: approvals again.
        sim.set_faults(HsmFaults::default());
        assert_eq!(
            t.exchange(request(1_000, 4), false).await.get_str(39),
            Some("00")
        );
        sw.shutdown().await;
        acq.stop().await;
        sim.stop().await;
    });
}

#[test]
fn a_wrong_check_value_stops_the_switch() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, _pool, _schema) = pg_schema("hsm_kcv").await;
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let k = TestKeys::fixed();
        let text = config(&url, "127.0.0.1:1", &sim.local_addr().to_string())
            .text()
            .replace(&k.zpk.kcv6(), "000000");
        let config = Config::from_toml(&text, Vec::new()).unwrap();
        let err = Switch::start(config).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("ZPK") && msg.contains("check value"), "{msg}");
        sim.stop().await;
    });
}

#[test]
fn pin_blocks_round_trip_through_the_simulators_keys() {
    // The terminal simulator's block decrypts under its TPK to the PIN it was given.
    let k = TestKeys::fixed();
    let sec = TerminalSecurity {
        tpk: Some(k.tpk.clone()),
        tak: None,
        pin: "4321".into(),
        pin_format: PinFormat::Iso0,
        pin_on_every: false,
    };
    let d = Dialect::builtin("iso87-ascii").unwrap();
    let mut m = sample::auth_request();
    sec.apply(&d, &mut m).unwrap();
    let block: [u8; 8] = m.get(52).unwrap().try_into().unwrap();
    let pan = m.pan().unwrap();
    let acct = account_of(pan.expose()).unwrap();
    assert_eq!(
        &*crypto::pin_of(PinFormat::Iso0, k.tpk.decrypt(block), &acct).unwrap(),
        "4321"
    );
}

#[test]
fn a_hung_hsm_connection_is_made_again() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use cardswitch::hsm::{Hsm, HsmError, HsmSection};
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let hsm = Hsm::start(
            &HsmSection {
                addresses: vec![sim.local_addr().to_string()],
                connections: 1,
                timeout_ms: 100,
                header_len: 4,
                max_in_flight_per_connection: 16,
                reconnect_min_ms: 20,
            },
            &stop,
            &tracker,
        );
        assert!(hsm.wait_ready(Duration::from_secs(5)).await);
        sim.set_faults(HsmFaults {
            no_reply: 100.0,
            ..HsmFaults::default()
        });
        for _ in 0..3 {
            assert_eq!(hsm.call(b"NC", b"").await.unwrap_err(), HsmError::Timeout);
        }
        sim.set_faults(HsmFaults::default());
        // The third timeout dropped the connection; a new one answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sim.stats().connections < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sim.stats().connections, 2);
        assert!(hsm.wait_ready(Duration::from_secs(5)).await);
        let (ok, fields) = hsm.call(b"NC", b"").await.unwrap();
        assert!(ok);
        assert_eq!(fields.len(), 16 + 9);
        assert_eq!(hsm.health().failures, 3);
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        sim.stop().await;
    });
}

#[test]
fn a_key_exchange_on_one_node_changes_the_zpk_of_every_node() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, _pool, _schema) = pg_schema("hsm_kx_nodes").await;
        let sim = hsm_sim("127.0.0.1:0".parse().unwrap()).await;
        let acq = acquirer().await;
        let hsm = sim.local_addr().to_string();
        let a = config(&url, &acq.local_addr().to_string(), &hsm)
            .set("switch", "node", "kx-a")
            .start()
            .await;
        // Node b's link goes through a relay that is not there yet: the acquirer's key change
        // reaches node a only.
        let later = common::free_addr();
        let b = config(&url, &later.to_string(), &hsm)
            .set("switch", "node", "kx-b")
            .launch()
            .await;
        let mut ta = Terminal::connect(a.listener_addrs()[0], "1234").await;
        assert_eq!(
            ta.exchange(request(1_000, 1), false).await.get_str(39),
            Some("00")
        );
        let answer = acq.change_zpk(161, Duration::from_secs(5)).await.unwrap();
        assert_eq!(answer.as_deref(), Some("00"));
        common::tcp_relay(later, acq.local_addr()).await;

        // Node b translates PINs under the new ZPK at once (the acquirer verifies under it).
        let mut tb = Terminal::connect(b.listener_addrs()[0], "1234").await;
        // (Stored key changes are also polled, every 30 s: within 2 s it is the notification.)
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut codes = Vec::new();
        for stan in 10.. {
            let code = tb.exchange(request(1_000, stan), false).await;
            codes.push(code.get_str(39).unwrap_or("").to_owned());
            if codes.last().is_some_and(|c| c == "00") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node b answered {codes:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            ta.exchange(request(1_000, 99), false).await.get_str(39),
            Some("00")
        );
        a.shutdown().await;
        b.shutdown().await;
        acq.stop().await;
        sim.stop().await;
    });
}
