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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cardswitch::hsm::{Hsm, HsmSection};
use cardswitch_simulators::hsm::{KeyType, WrappedKey};
use cardswitch_simulators::TestKeys;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod common;

use common::{
    cpu_seconds, free_port, fresh_schema, spawn, switch_config, terminal, wait_for, CLOSED_LOOP,
};

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

fn switch_run(
    rt: &tokio::runtime::Runtime,
    secure: bool,
    hsm: SocketAddr,
    hsm_pid: u32,
    seconds: u64,
) -> Run {
    let db = fresh_schema(
        rt,
        &format!(
            "bench_hsm_{}_{}",
            if secure { "on" } else { "off" },
            std::process::id()
        ),
    );
    let (_acq, acquirer) = common::acquirer(if secure { &["--test-keys"] } else { &[] });
    let listen = free_port();
    let k = TestKeys::fixed();
    let (top, listener, endpoint) = if secure {
        (
            format!("[hsm]\naddresses = [\"{hsm}\"]\nconnections = 2\n"),
            format!(
                "[security]\ntpk = {}\ntak = {}\n",
                key(&k.tpk, KeyType::TPK),
                key(&k.tak, KeyType::TAK)
            ),
            format!(
                "[security]\nzpk = {}\nzak = {}\n",
                key(&k.zpk, KeyType::ZPK),
                key(&k.zak, KeyType::ZAK)
            ),
        )
    } else {
        Default::default()
    };
    let config = switch_config(
        &format!("hsm-{secure}"),
        &top,
        listen,
        &listener,
        acquirer,
        &endpoint,
    );
    let switch = spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[("DATABASE_URL", &db)],
    );
    wait_for(listen);
    std::thread::sleep(Duration::from_millis(500));
    let mut load = CLOSED_LOOP.to_vec();
    if secure {
        load.extend(["--test-keys", "--pin-every"]);
    }
    let sw_before = cpu_seconds(switch.0.id());
    let hsm_before = cpu_seconds(hsm_pid);
    let r = terminal(listen, &load, seconds);
    let received = r["received"].as_f64().unwrap_or(0.0).max(1.0);
    let switch_us = (cpu_seconds(switch.0.id()) - sw_before) / received * 1e6;
    let hsm_us = if secure {
        (cpu_seconds(hsm_pid) - hsm_before) / received * 1e6
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
    wait_for(hsm);

    println!("HSM simulator, {seconds} s per run, 64 callers, everything on this machine's cores");
    println!("command   1 connection   pool of 4");
    for cmd in ["CA", "M6"] {
        let one = hsm_rate(&rt, hsm, 1, cmd, seconds);
        let pool = hsm_rate(&rt, hsm, 4, cmd, seconds);
        println!("{cmd:<8} {one:>10.0}/s  {pool:>10.0}/s");
    }

    println!("\nswitch, closed loop 16 x 32, durable PG journal");
    let off = switch_run(&rt, false, hsm, sim.0.id(), seconds);
    let on = switch_run(&rt, true, hsm, sim.0.id(), seconds);
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
