//! The live dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver): the page loads with no console errors, goes live over server-sent
//! events and shows a non-zero TPS while the terminal simulator runs. The screenshot is kept at
//! `target/artifacts/dashboard.png`.
//!
//! Without ChromeDriver the test fails under CI (`CI` set: `.ci/run` installs it) and is skipped
//! elsewhere with a message.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::print_stderr,
    clippy::panic
)] // tests

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use cardswitch_codec::framing::Framing;
use cardswitch_codec::Dialect;
use cardswitch_simulators::{terminal, Load, Stop, TerminalConfig};
use serde_json::{json, Value};

mod common;

const TOKEN: &str = "dashboard-token-0123456789";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn webdriver(method: &str, url: &str, body: Option<Value>) -> Value {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut response = match (method, body) {
        ("GET", _) => agent.get(url).call(),
        ("DELETE", _) => agent.delete(url).call(),
        (_, Some(b)) => agent.post(url).send_json(b),
        (_, None) => agent.post(url).send_json(json!({})),
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let text = response.body_mut().read_to_string().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {url}: {text}"))
}

#[test]
fn dashboard_loads_live_in_chromium() {
    if !std::path::Path::new(CHROMEDRIVER).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{CHROMEDRIVER} missing: .ci/run installs chromium and chromium-driver"
        );
        eprintln!(
            "skipped: {CHROMEDRIVER} not installed (apt-get install chromium chromium-driver)"
        );
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (sw, acq) = rt.block_on(async {
        let acq = common::acquirer(None).await;
        let sw = common::SwitchConfig::new("sqlite::memory:", acq.local_addr())
            .admin(TOKEN)
            .route("541333")
            .start()
            .await;
        (sw, acq)
    });
    // Traffic for the whole test: 100 TPS, some declines among them.
    let target = sw.listener_addrs()[0];
    let load = rt.spawn(terminal::run(TerminalConfig {
        target,
        dialect: Dialect::builtin("iso87-ascii").unwrap(),
        framing: Framing::default(),
        load: Load::Open {
            rate: 100,
            connections: 2,
        },
        stop: Stop::After(Duration::from_secs(25)),
        timeout: Duration::from_secs(5),
        bins: vec!["476173".into(), "541333".into()],
        card_only: true,
        security: None,
    }));

    let port = free_port().port();
    let _driver = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    while webdriver_ready(&base).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let session = webdriver(
        "POST",
        &format!("{base}/session"),
        Some(json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,900"]
                },
                "goog:loggingPrefs": { "browser": "ALL" }
            }}
        })),
    );
    let id = session["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no session: {session}"))
        .to_owned();
    let s = format!("{base}/session/{id}");
    let admin = sw.admin_addr().unwrap();
    webdriver(
        "POST",
        &format!("{s}/url"),
        Some(json!({ "url": format!("http://{admin}/?token={TOKEN}") })),
    );
    // Live within a few seconds, with traffic showing.
    let read = |script: &str| -> Value {
        webdriver(
            "POST",
            &format!("{s}/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )["value"]
            .clone()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tps = 0u64;
    let mut conn = String::new();
    while Instant::now() < deadline {
        tps = read("return document.getElementById('tps').textContent")
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        conn = read("return document.getElementById('conn').textContent")
            .as_str()
            .unwrap_or("")
            .to_owned();
        if tps > 0 && conn.starts_with("live") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(conn.starts_with("live"), "dashboard not live: {conn:?}");
    assert!(tps > 0, "TPS shown is {tps}");
    // Links and charts rendered.
    let links = read("return document.querySelectorAll('#links tr').length");
    assert_eq!(links, json!(1));
    let ready = read("return document.querySelector('#links tr td.ready') !== null");
    assert_eq!(ready, json!(true));
    // Declines (the simulator's rules decline some) with masked PANs only.
    std::thread::sleep(Duration::from_secs(2));
    let declines = read("return document.getElementById('declines').textContent");
    let declines = declines.as_str().unwrap_or("");
    assert!(
        declines.is_empty() || declines.contains("******"),
        "unmasked PAN in {declines}"
    );

    let shot = webdriver("GET", &format!("{s}/screenshot"), None);
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["value"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    eprintln!("screenshot: {}", dir.join("dashboard.png").display());

    // No console errors from the page.
    let log = webdriver(
        "POST",
        &format!("{s}/se/log"),
        Some(json!({ "type": "browser" })),
    );
    let entries = log["value"].as_array().cloned().unwrap_or_default();
    let severe: Vec<&Value> = entries.iter().filter(|e| e["level"] == "SEVERE").collect();
    assert!(severe.is_empty(), "console errors: {severe:?}");
    assert!(log["value"].is_array(), "browser log not available: {log}");
    // The log does catch errors: one made on purpose shows up.
    read("console.error('probe-4711'); return null");
    let log = webdriver(
        "POST",
        &format!("{s}/se/log"),
        Some(json!({ "type": "browser" })),
    );
    assert!(
        log["value"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["level"] == "SEVERE"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("probe-4711")))),
        "console errors are not captured: {log}"
    );

    webdriver("DELETE", &s, None);
    load.abort();
    rt.block_on(async {
        sw.shutdown().await;
        acq.stop().await;
    });
}

fn webdriver_ready(base: &str) -> Option<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let mut r = agent.get(&format!("{base}/status")).call().ok()?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
    v["value"]["ready"].as_bool().filter(|r| *r).map(|_| ())
}
