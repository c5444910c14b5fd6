//! HSM benchmark: `cargo bench --bench hsm`.
//!
//! 1. The HSM simulator (`cardswitch sim hsm`, its own process) driven by the switch's HSM
//!    client from this process: CA (PIN translation) and M6 (X9.19 MAC over a 200-byte
//!    message) per second, on one pipelined connection and on a pool of four, 64 callers.
//! 2. The switch (its own process, durable PostgreSQL journal) under the closed-loop terminal
//!    simulator (16 connections x 32 in flight), in the same run: without keys, then with every
//!    request carrying a PIN block translated through the HSM (CA), a terminal MAC verified
//!    (M8) and an acquirer MAC made (M6); the acquirer simulator checks PIN and MAC. The ratio
//!    is what the HSM path costs in throughput.
//!
//! `BENCH_SECONDS` (default 8) sets each run's length. Everything shares this machine's cores.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // a benchmark

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardswitch::hsm::{Hsm, HsmSection};
use cardswitch_simulators::hsm::{KeyType, WrappedKey};
use cardswitch_simulators::TestKeys;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const BIN: &str = env!("CARGO_BIN_EXE_cardswitch");

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.0.id().to_string())
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().unwrap())
}

fn wait_for(addr: SocketAddr) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {addr}");
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn pg_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn fresh_schema(rt: &tokio::runtime::Runtime, name: &str) -> String {
    rt.block_on(async {
        let schema = format!("{name}_{}", std::process::id());
        let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&pool)
            .await
            .unwrap();
        let sep = if pg_url().contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{schema}", pg_url())
    })
}

/// Commands per second from `callers` concurrent callers over a pool of `connections`.
fn hsm_rate(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    connections: usize,
    command: &'static str,
    seconds: u64,
) -> f64 {
    rt.block_on(async {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let hsm = Hsm::start(
            &HsmSection {
                addresses: vec![addr.to_string()],
                connections,
                timeout_ms: 5_000,
                header_len: 4,
                max_in_flight_per_connection: 1024,
                reconnect_min_ms: 50,
            },
            &stop,
            &tracker,
        );
        assert!(hsm.wait_ready(Duration::from_secs(5)).await);
        let k = TestKeys::fixed();
        let tpk = WrappedKey::parse(&TestKeys::under_lmk(&k.tpk, KeyType::TPK)).unwrap();
        let zpk = WrappedKey::parse(&TestKeys::under_lmk(&k.zpk, KeyType::ZPK)).unwrap();
        let zak = WrappedKey::parse(&TestKeys::under_lmk(&k.zak, KeyType::ZAK)).unwrap();
        let acct = "739001001001";
        let block = k.tpk.encrypt(
            cardswitch_simulators::hsm::crypto::pin_block(
                cardswitch_simulators::hsm::PinFormat::Iso0,
                "1234",
                acct,
            )
            .unwrap(),
        );
        let data = vec![0x5Au8; 200];
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let end = started + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (hsm, done) = (Arc::clone(&hsm), Arc::clone(&done));
            let (tpk, zpk, zak, data) = (tpk.clone(), zpk.clone(), zak.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < end {
                    let ok = if command == "CA" {
                        hsm.translate_pin(&tpk, &zpk, &block, "01", "01", acct)
                            .await
                            .is_ok()
                    } else {
                        hsm.generate_mac(KeyType::ZAK, &zak, &data).await.is_ok()
                    };
                    assert!(ok, "{command} failed");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        rate
    })
}

fn terminal(target: SocketAddr, extra: &[&str], seconds: u64) -> Value {
    let out = Command::new(BIN)
        .args([
            "sim",
            "terminal",
            "--target",
            &target.to_string(),
            "--card-only",
            "--json",
            "--connections",
            "16",
            "--depth",
            "32",
            "--duration",
            &format!("{seconds}s"),
        ])
        .args(extra)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("terminal: {}", String::from_utf8_lossy(&out.stderr)))
}

fn key(k: &cardswitch_simulators::hsm::ClearKey, kt: KeyType) -> String {
    format!(
        "{{ key = \"{}\", check = \"{}\" }}",
        TestKeys::under_lmk(k, kt),
        k.kcv6()
    )
}

struct Run {
    tps: f64,
    p99_ms: f64,
    codes: String,
    switch_us: f64,
    hsm_us: f64,
}

fn switch_run(rt: &tokio::runtime::Runtime, secure: bool, hsm: SocketAddr, seconds: u64) -> Run {
    let db = fresh_schema(
        rt,
        if secure {
            "bench_hsm_on"
        } else {
            "bench_hsm_off"
        },
    );
    let acquirer = free_port();
    let mut acq_args = vec!["sim", "acquirer", "--listen"];
    let acq_addr = acquirer.to_string();
    acq_args.push(&acq_addr);
    if secure {
        acq_args.push("--test-keys");
    }
    let _acq = spawn(&acq_args, &[]);
    wait_for(acquirer);
    let listen = free_port();
    let k = TestKeys::fixed();
    let security = if secure {
        format!(
            "[hsm]\naddresses = [\"{hsm}\"]\nconnections = 2\n\
             [listeners.security]\ntpk = {}\ntak = {}\n",
            key(&k.tpk, KeyType::TPK),
            key(&k.tak, KeyType::TAK)
        )
    } else {
        String::new()
    };
    let endpoint_security = if secure {
        format!(
            "[endpoints.security]\nzpk = {}\nzak = {}\n",
            key(&k.zpk, KeyType::ZPK),
            key(&k.zak, KeyType::ZAK)
        )
    } else {
        String::new()
    };
    // [hsm] must come before the [[listeners]] table it does not belong to.
    let (hsm_section, listener_security) = match security.split_once("[listeners.security]") {
        Some((h, l)) => (h.to_owned(), format!("[listeners.security]{l}")),
        None => (String::new(), String::new()),
    };
    let config = std::env::temp_dir().join(format!(
        "cardswitch-bench-hsm-{}-{secure}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        format!(
            "[journal]\nmode = \"durable\"\npan_hmac_key = \"{}\"\n{hsm_section}\
             [[listeners]]\nname = \"pos\"\naddress = \"{listen}\"\n{listener_security}\
             [[endpoints]]\nname = \"acq\"\nlinks = [\"{acquirer}\"]\n{endpoint_security}\
             [[routes]]\nprefix = \"476173\"\nendpoint = \"acq\"\n\
             [[routes]]\nprefix = \"541333\"\nendpoint = \"acq\"\n",
            "ab".repeat(32)
        ),
    )
    .unwrap();
    let switch = spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[("DATABASE_URL", &db)],
    );
    wait_for(listen);
    std::thread::sleep(Duration::from_millis(500));
    let extra: &[&str] = if secure {
        &["--test-keys", "--pin-every"]
    } else {
        &[]
    };
    let sw_before = cpu_seconds(switch.0.id());
    let hsm_pid = hsm_pid();
    let hsm_before = hsm_pid.map_or(0.0, cpu_seconds);
    let r = terminal(listen, extra, seconds);
    let received = r["received"].as_f64().unwrap_or(0.0).max(1.0);
    let switch_us = (cpu_seconds(switch.0.id()) - sw_before) / received * 1e6;
    let hsm_us = if secure {
        (hsm_pid.map_or(0.0, cpu_seconds) - hsm_before) / received * 1e6
    } else {
        0.0
    };
    drop(switch);
    let _ = std::fs::remove_file(config);
    Run {
        tps: r["tps"].as_f64().unwrap_or(0.0),
        p99_ms: r["latency_us"]["p99"].as_f64().unwrap_or(0.0) / 1000.0,
        codes: r["response_codes"].to_string(),
        switch_us,
        hsm_us,
    }
}

static HSM_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn hsm_pid() -> Option<u32> {
    HSM_PID.get().copied()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hsm = free_port();
    let sim = spawn(&["sim", "hsm", "--listen", &hsm.to_string()], &[]);
    let _ = HSM_PID.set(sim.0.id());
    wait_for(hsm);

    println!("HSM simulator, {seconds} s per run, 64 callers, everything on this machine's cores");
    println!("command   1 connection   pool of 4");
    for cmd in ["CA", "M6"] {
        let one = hsm_rate(&rt, hsm, 1, cmd, seconds);
        let pool = hsm_rate(&rt, hsm, 4, cmd, seconds);
        println!("{cmd:<8} {one:>10.0}/s  {pool:>10.0}/s");
    }

    println!("\nswitch, closed loop 16 x 32, durable PG journal");
    let off = switch_run(&rt, false, hsm, seconds);
    let on = switch_run(&rt, true, hsm, seconds);
    println!(
        "                               TPS    p99 ms  switch CPU us/txn  HSM CPU us/txn  codes"
    );
    for (name, r) in [("no keys", &off), ("PIN + MAC via HSM", &on)] {
        println!(
            "{name:<26} {:>8.0} {:>8.2} {:>18.1} {:>15.1}  {}",
            r.tps, r.p99_ms, r.switch_us, r.hsm_us, r.codes
        );
    }
    println!(
        "with HSM / without: {:.2} (the HSM path costs {:.0}% of throughput)",
        on.tps / off.tps.max(1.0),
        (1.0 - on.tps / off.tps.max(1.0)) * 100.0
    );
    drop(sim);
}
