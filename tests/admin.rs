//! The admin side over real HTTP: Prometheus metrics after a known sequence of transactions,
//! the token, the transaction look-up (API and CLI) with PANs masked. PostgreSQL journal.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use cardswitch::server::Switch;
use cardswitch_codec::{Message, Mti};
use cardswitch_simulators::Acquirer;
use tokio::net::TcpStream;

mod common;

use common::{acquirer, pg_schema, request, SwitchConfig, Terminal, TestDb};

const TOKEN: &str = "test-token-0123456789abcdef";

/// The acquirer, the switch, and the test's database (its schema lives as long as it).
async fn start(listener: &str) -> (Acquirer, Switch, TestDb) {
    cardswitch::telemetry::install().unwrap();
    let db = pg_schema("admin").await;
    let url = db.0.clone();
    let acq = acquirer(None).await;
    let sw = SwitchConfig::new(&url, acq.local_addr())
        .keys()
        .set("journal", "pan_hmac_key", "ab".repeat(32))
        .admin(TOKEN)
        .listener("name", listener)
        .start()
        .await;
    (acq, sw, db)
}

/// GET with an optional token: status and body.
async fn get(url: String, token: Option<&str>) -> (u16, String) {
    match common::http_get(url.clone(), token).await {
        Some(r) => r,
        None => panic!("GET {url}: no answer"),
    }
}

/// The value of one Prometheus sample line, by metric name and labels.
fn sample_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(&format!("{name}{{"))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn metrics_after_a_known_sequence() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let listener = format!("pos{}", fastrand::u32(..));
        let (acq, sw, _pool) = start(&listener).await;
        let admin = sw.admin_addr().unwrap();
        let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
        for i in 0..3 {
            let r = t
                .exchange(&request(1_000, 10 + i, &format!("R0000000000{i}")))
                .await;
            assert_eq!(r.get_str(39), Some("00"));
        }
        let r = t.exchange(&request(1_051, 20, "R00000000051")).await;
        assert_eq!(r.get_str(39), Some("51"));
        let mut bad = request(1_000, 21, "R00000000014");
        bad.set(2, b"4761739001010011"); // Luhn fails
        assert_eq!(t.exchange(&bad).await.get_str(39), Some("14"));
        let echo = Message::builder(Mti::NETWORK_REQUEST)
            .field(7, "1121120000")
            .stan(22)
            .field(70, "301")
            .build();
        assert_eq!(t.exchange(&echo).await.get_str(39), Some("00"));

        // /metrics needs no token.
        let (code, text) = get(format!("http://{admin}/metrics"), None).await;
        assert_eq!(code, 200);
        let m = |mti: &str, rc: &str| {
            sample_value(
                &text,
                "cardswitch_messages_total",
                &[("listener", &listener), ("mti", mti), ("rc", rc)],
            )
        };
        assert_eq!(m("0100", "00"), Some(3.0), "{text}");
        assert_eq!(m("0100", "51"), Some(1.0));
        assert_eq!(m("0100", "14"), Some(1.0));
        assert_eq!(m("0800", "00"), Some(1.0));
        let link = acq.local_addr().to_string();
        assert_eq!(
            sample_value(
                &text,
                "cardswitch_link_state",
                &[("endpoint", "acq"), ("link", &link)]
            ),
            Some(2.0)
        );
        assert_eq!(
            sample_value(&text, "cardswitch_connections", &[("listener", &listener)]),
            Some(1.0)
        );
        for stage in ["decode", "route", "upstream", "journal", "total"] {
            let n = sample_value(&text, "cardswitch_stage_seconds_count", &[("stage", stage)]);
            assert!(n.is_some_and(|n| n >= 4.0), "stage {stage}: {n:?}");
        }
        assert!(text.contains("cardswitch_journal_batch_rows_bucket"));
        assert!(text.contains("cardswitch_journal_commit_seconds_bucket"));
        sw.shutdown().await;
        acq.stop().await;
    });
}

#[test]
fn look_up_answers_masks_and_wants_the_token() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (acq, sw, _pool) = start("pos").await;
        let admin = sw.admin_addr().unwrap();
        let mut t = Terminal::connect(sw.listener_addrs()[0]).await;
        let rrn = format!("L{:011}", fastrand::u64(..100_000_000_000));
        let original = request(2_500, 31, &rrn);
        assert_eq!(t.exchange(&original).await.get_str(39), Some("00"));
        assert_eq!(
            t.exchange(&request(3_051, 32, "OTHER0000001"))
                .await
                .get_str(39),
            Some("51")
        );
        // A reversal of the first.
        let mut rev = original.clone();
        rev.set_mti(Mti::REVERSAL_REQUEST);
        rev.set_stan(33);
        rev.remove(52);
        rev.remove(55);
        rev.set(
            90,
            format!("0100000031{}{:022}", original.get_str(7).unwrap(), 0).as_bytes(),
        );
        assert_eq!(t.exchange(&rev).await.get_str(39), Some("00"));

        // Without a token, or with a wrong one: refused.
        for path in ["/", "/api/status", "/api/transactions", "/api/live"] {
            let (code, _) = get(format!("http://{admin}{path}"), None).await;
            assert_eq!(code, 401, "{path}");
            let (code, _) = get(format!("http://{admin}{path}"), Some("wrong-token-0000000")).await;
            assert_eq!(code, 401, "{path}");
        }
        let (code, page) = get(format!("http://{admin}/?token={TOKEN}"), None).await;
        assert_eq!(code, 200);
        assert!(page.contains("EventSource"));

        // By RRN: the original and its reversal, PAN masked, never in full.
        let (code, body) = get(
            format!("http://{admin}/api/transactions?rrn={rrn}"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(!body.contains("4761739001010010"), "full PAN in {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["transactions"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{body}");
        let auth = rows.iter().find(|r| r["mti"] == "0100").unwrap();
        assert_eq!(auth["pan_masked"], "476173******0010");
        assert_eq!(auth["state"], "reversed");
        // By response code and terminal.
        let (_, body) = get(
            format!("http://{admin}/api/transactions?rc=51&terminal=TERM0001"),
            Some(TOKEN),
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["transactions"].as_array().unwrap();
        assert!(rows.iter().all(|r| r["response_code"] == "51"), "{body}");
        assert_eq!(rows.len(), 1, "{body}");
        // A bad filter is a 400.
        let (code, _) = get(
            format!("http://{admin}/api/transactions?colour=red"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(code, 400);

        // The story: request and reply summaries, the reversal, the state change.
        let id = auth["id"].as_str().unwrap();
        let (code, body) = get(format!("http://{admin}/api/transactions/{id}"), Some(TOKEN)).await;
        assert_eq!(code, 200);
        assert!(!body.contains("4761739001010010"), "full PAN in {body}");
        let story: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(story["endpoint"], "acq");
        assert_eq!(story["reply_summary"]["39"], "00");
        assert_eq!(story["request_summary"]["52"], "[PIN block, 8 bytes]");
        assert_eq!(story["reversals"].as_array().unwrap().len(), 1);
        assert!(!story["events"].as_array().unwrap().is_empty());
        let (code, _) = get(format!("http://{admin}/api/transactions/1"), Some(TOKEN)).await;
        assert_eq!(code, 404);

        // The CLI says the same.
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
            .args([
                "txn",
                "--admin",
                &format!("http://{admin}"),
                "--token",
                TOKEN,
                "--rrn",
                &rrn,
            ])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8(out.stdout).unwrap();
        assert!(
            table.contains("476173******0010") && table.contains("2 transaction(s)"),
            "{table}"
        );
        assert!(!table.contains("4761739001010010"));
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
            .args([
                "txn",
                "--admin",
                &format!("http://{admin}"),
                "--token",
                "wrong-token-0000000",
            ])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        sw.shutdown().await;
        acq.stop().await;
    });
}

#[test]
fn an_open_dashboard_streams_and_does_not_hold_up_shutdown() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (acq, sw, _pool) = start("pos").await;
        let admin = sw.admin_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut r = ureq::get(&format!("http://{admin}/api/live?token={TOKEN}"))
                .call()
                .unwrap();
            let mut reader = r.body_mut().as_reader();
            let mut first = Vec::new();
            let mut buf = [0u8; 4096];
            while !first.windows(2).any(|w| w == b"\n\n") {
                let n = reader.read(&mut buf).unwrap();
                first.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(String::from_utf8_lossy(&first).into_owned());
            // Keep reading until the switch ends the stream.
            while reader.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        let event = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .unwrap()
            .unwrap();
        assert!(event.starts_with("event: status\ndata: {"), "{event}");
        assert!(
            event.contains("\"endpoints\":[{\"name\":\"acq\""),
            "{event}"
        );
        tokio::time::timeout(Duration::from_secs(10), sw.shutdown())
            .await
            .expect("shutdown waited for the dashboard");
        reader.join().unwrap();
        acq.stop().await;
    });
}

#[test]
fn json_logs_carry_the_spans_and_never_a_pan() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let acq = acquirer(None).await;
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("cardswitch-logs-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("switch.toml");
        std::fs::write(
            &config,
            format!(
                "[journal]\nurl = \"sqlite://{}\"\nephemeral_keys = true\n[[listeners]]\nname = \"pos\"\naddress = \"{listen}\"\n\
                 [[endpoints]]\nname = \"acq\"\nlinks = [\"{}\"]\n[[routes]]\nprefix = \"476173\"\nendpoint = \"acq\"\n",
                dir.join("journal.db").display(),
                acq.local_addr()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("switch.log")).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
            .args(["run", "--json-logs", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "debug")
            .stderr(log)
            .spawn()
            .unwrap();
        let mut connected = None;
        for _ in 0..200 {
            if let Ok(s) = TcpStream::connect(listen).await {
                connected = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        drop(connected);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut t = Terminal::connect(listen).await;
        assert_eq!(t.exchange(&request(1_000, 1, "LOGRRN000001")).await.get_str(39), Some("00"));
        assert_eq!(t.exchange(&request(1_051, 2, "LOGRRN000002")).await.get_str(39), Some("51"));
        let mut bad = request(1_000, 3, "LOGRRN000003");
        bad.set(2, b"4761739001010011");
        assert_eq!(t.exchange(&bad).await.get_str(39), Some("14"));
        drop(t);
        let pid = child.id().unwrap().to_string();
        let _ = std::process::Command::new("kill").args(["-INT", &pid]).status();
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let text = std::fs::read_to_string(dir.join("switch.log")).unwrap();
        assert!(!text.contains("4761739001010010"), "full PAN in the logs");
        assert!(!text.contains("4761739001010011"), "full PAN in the logs");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect();
        let answered: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["fields"]["message"] == "answered")
            .collect();
        assert_eq!(answered.len(), 3, "{text}");
        let first = answered
            .iter()
            .find(|l| l["span"]["rrn"] == "LOGRRN000001")
            .unwrap();
        assert_eq!(first["span"]["name"], "txn");
        assert_eq!(first["span"]["mti"], "0100");
        assert_eq!(first["span"]["stan"], "000001");
        assert_eq!(first["span"]["rc"], "00");
        assert_eq!(first["span"]["route"], "acq");
        let spans = first["spans"].as_array().unwrap();
        assert!(
            spans.iter().any(|s| s["name"] == "conn" && s["listener"] == "pos"),
            "{first}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        acq.stop().await;
    });
}

#[test]
fn readiness_follows_the_acquirer_links_and_only_its_details_need_the_token() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (acq, sw, _pool) = start("pos").await;
        let admin = sw.admin_addr().unwrap();
        assert_eq!(get(format!("http://{admin}/healthz"), None).await.0, 200);
        common::eventually(Duration::from_secs(5), "ready", || async {
            get(format!("http://{admin}/readyz"), None).await.0 == 200
        })
        .await;
        let details = format!("http://{admin}/api/readiness");
        assert_eq!(get(details.clone(), None).await.0, 401);
        let (code, body) = get(details.clone(), Some(TOKEN)).await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(v["endpoints"][0]["endpoint"], "acq");
        assert_eq!(v["endpoints"][0]["ready"], 1);

        // The acquirer goes away: not ready, for that reason, with no endpoint named.
        acq.stop().await;
        common::eventually(Duration::from_secs(5), "not ready", || async {
            get(format!("http://{admin}/readyz"), None).await
                == (503, "not ready: acquirer links down\n".to_owned())
        })
        .await;
        let (code, body) = get(details, Some(TOKEN)).await;
        assert_eq!(code, 503);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["ready"].clone(), v["draining"].clone()),
            (false.into(), false.into())
        );
        assert_eq!(v["journal_writable"], true);
        assert_eq!(v["endpoints"][0]["ready"], 0);
        sw.shutdown().await;
    });
}
