//! Fraud rules in the switch: declines with the rule's code, shadow hits recorded and never
//! declining, decisions in the journal, reload through the admin side (good file changes
//! decisions, bad file changes nothing). PostgreSQL journal, real sockets.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use cardswitch_codec::Message;
use tokio::net::TcpStream;

mod common;

use common::{acquirer, pg_schema, SwitchConfig, Terminal, TestDb};

const TOKEN: &str = "fraud-token-0123456789abcdef";

fn rules(max_count: u32) -> String {
    format!(
        r#"
[[rules]]
name = "pan-velocity"
kind = "velocity"
key = "pan"
window_s = 3600
max_count = {max_count}
action = "65"

[[rules]]
name = "watch-range"
kind = "block_list"
ranges = ["476173"]
mode = "shadow"

[[rules]]
name = "casino"
kind = "high_risk_mcc"
mccs = [7995]
action = "57"
"#
    )
}

fn request(stan: u32) -> Message {
    common::request(12_345, stan, &format!("FRAUD{stan:07}"))
}

async fn post(url: String) -> (u16, String) {
    tokio::task::spawn_blocking(move || {
        let mut r = ureq::post(&url)
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .config()
            .http_status_as_error(false)
            .build()
            .send_empty()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    })
    .await
    .unwrap()
}

#[test]
fn rules_decline_record_and_reload() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let TestDb(url, pool, _schema) = pg_schema("fraud").await;
        let dir = std::env::temp_dir().join(format!("cardswitch-fraud-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules.toml");
        std::fs::write(&file, rules(2)).unwrap();
        let acq = acquirer(None).await;
        let sw = SwitchConfig::new(&url, acq.local_addr())
            .keys()
            .set("journal", "pan_hmac_key", "ab".repeat(32))
            .admin(TOKEN)
            .set("fraud", "rules", file.display().to_string())
            .start()
            .await;
        let admin = sw.admin_addr().unwrap();
        let mut t = Terminal::connect(sw.listener_addrs()[0]).await;

        // Two per card per hour: the third is declined 65 by the switch, never sent.
        assert_eq!(t.code(&request(1)).await, "00");
        assert_eq!(t.code(&request(2)).await, "00");
        assert_eq!(t.code(&request(3)).await, "65");
        assert_eq!(acq.ledger().len(), 2);
        // A casino MCC: 57 from its own rule (the card's velocity fires first: 65).
        let mut casino = request(4);
        casino.set(2, b"4761731234567890");
        casino.set(35, b"4761731234567890=28122011143878089");
        casino.set(18, b"7995");
        assert_eq!(t.code(&casino).await, "57");

        // The journal has every decision with the rules that fired; the shadow rule fired on
        // every card of the range and declined nothing.
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT response_code, decided_by, fraud FROM transactions ORDER BY received_us",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 4);
        for (rc, by, fraud) in &rows {
            let fraud = fraud.as_deref().unwrap_or("");
            assert!(fraud.contains("shadow:watch-range"), "{rc} {by} {fraud}");
        }
        assert_eq!(rows[2].0, "65");
        assert_eq!(rows[2].1, "fraud");
        assert!(rows[2]
            .2
            .as_deref()
            .unwrap()
            .contains("pan-velocity (Pan velocity over 3600 s > 2 transactions)"));
        assert_eq!((rows[3].0.as_str(), rows[3].1.as_str()), ("57", "fraud"));
        assert_eq!(rows[0].1, "acquirer");

        // A file that does not validate: refused, decisions unchanged.
        std::fs::write(&file, rules(2).replace("window_s = 3600", "window_s = 2")).unwrap();
        let (code, body) = post(format!("http://{admin}/api/fraud/reload")).await;
        assert_eq!(code, 400, "{body}");
        assert!(body.contains("window_s at least 8"), "{body}");
        assert_eq!(t.code(&request(5)).await, "65");
        // A good file: the card may go on (its count is kept through the reload).
        std::fs::write(&file, rules(10)).unwrap();
        let (code, body) = post(format!("http://{admin}/api/fraud/reload")).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(t.code(&request(6)).await, "00");
        // Hit counters.
        let body = tokio::task::spawn_blocking(move || {
            ureq::get(&format!("http://{admin}/api/fraud"))
                .header("Authorization", &format!("Bearer {TOKEN}"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap()
        })
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let shadow = v["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "watch-range")
            .unwrap();
        assert_eq!(shadow["mode"], "shadow");
        assert_eq!(shadow["hits"], 0);
        assert!(shadow["shadow_hits"].as_u64().unwrap() >= 2, "{body}");
        sw.shutdown().await;
        acq.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn sighup_reloads_the_rules_file() {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let acq = acquirer(None).await;
        let dir = std::env::temp_dir().join(format!("cardswitch-hup-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rules.toml");
        std::fs::write(&file, rules(1)).unwrap();
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = dir.join("switch.toml");
        std::fs::write(
            &config,
            format!(
                "[journal]\nurl = \"sqlite://{}\"\nephemeral_keys = true\n[fraud]\nrules = \"{}\"\n[[listeners]]\nname = \"pos\"\naddress = \"{listen}\"\n\
                 [[endpoints]]\nname = \"acq\"\nlinks = [\"{}\"]\n[[routes]]\nprefix = \"476173\"\nendpoint = \"acq\"\n",
                dir.join("journal.db").display(),
                file.display(),
                acq.local_addr()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("switch.log")).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cardswitch"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap().to_string();
        let mut up = false;
        for _ in 0..200 {
            if TcpStream::connect(listen).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(up);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let hup = || {
            let _ = std::process::Command::new("kill").args(["-HUP", &pid]).status();
        };
        let mut t = Terminal::connect(listen).await;
        assert_eq!(t.code(&request(1)).await, "00");
        assert_eq!(t.code(&request(2)).await, "65", "one per card");
        // A bad file and SIGHUP: the rules stay.
        std::fs::write(&file, "[[rules]]\nname = \"x\"\nkind = \"nonsense\"\n").unwrap();
        hup();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(t.code(&request(3)).await, "65");
        // A good file and SIGHUP: the new limit applies.
        std::fs::write(&file, rules(100)).unwrap();
        hup();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(t.code(&request(4)).await, "00");
        drop(t);
        let _ = std::process::Command::new("kill").args(["-INT", &pid]).status();
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let text = std::fs::read_to_string(dir.join("switch.log")).unwrap();
        assert!(text.contains("fraud rules not reloaded"), "{text}");
        assert!(text.contains("fraud rules reloaded"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
        acq.stop().await;
    });
}
