//! Operations benchmark: `cargo bench --bench admin`.
//!
//! 1. The switch (its own process, durable PostgreSQL journal) under the closed-loop terminal
//!    simulator (16 connections x 32 in flight), alternating runs without `[admin]` (no
//!    recorder installed: every metric call is a no-op) and with it (Prometheus recorder,
//!    per-stage histograms, the live view) while one dashboard client stays connected to
//!    `/api/live` and `/metrics` is scraped every 5 s. Prints each run and the ratio of means.
//! 2. Transaction look-up by RRN through `GET /api/transactions?rrn=` on a journal of 10,000,000
//!    rows (schema `bench_lookup_10m`, filled once with `generate_series` and kept between runs):
//!    p50/p99/max over 200 random RRNs, and the query plan.
//!
//! `BENCH_SECONDS` (default 8) sets each throughput run; `LOOKUP_ROWS` (default 10,000,000) the
//! journal size.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // a benchmark

use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{
    cpu_seconds, exec, free_port, fresh_schema, pg_url, query_text, schema_url, spawn,
    switch_config, terminal, wait_for, CLOSED_LOOP,
};

const TOKEN: &str = "bench-token-0123456789abcdef";

fn config(
    listen: SocketAddr,
    acquirer: SocketAddr,
    admin: Option<SocketAddr>,
) -> std::path::PathBuf {
    let top = admin.map_or(String::new(), |a| {
        format!("[admin]\naddress = \"{a}\"\ntoken = \"{TOKEN}\"\n")
    });
    switch_config(
        &format!("admin-{}", admin.is_some()),
        &top,
        listen,
        "",
        acquirer,
        "",
    )
}

/// A dashboard's connection: reads `/api/live` until stopped; bytes read.
fn dashboard_client(admin: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
        let mut response = agent
            .get(&format!("http://{admin}/api/live?token={TOKEN}"))
            .call()
            .unwrap();
        let mut reader = response.body_mut().as_reader();
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0;
        let mut last_scrape = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            if last_scrape.elapsed() > Duration::from_secs(5) {
                let _ = agent.get(&format!("http://{admin}/metrics")).call();
                last_scrape = Instant::now();
            }
        }
        total
    })
}

fn throughput_run(rt: &tokio::runtime::Runtime, on: bool, seconds: u64, run: usize) -> (f64, f64) {
    let schema = format!("bench_admin_{}_{run}", std::process::id());
    let url = fresh_schema(rt, &schema);
    let (_acq, acquirer) = common::acquirer(&[]);
    let listen = free_port();
    let admin = on.then(free_port);
    let cfg = config(listen, acquirer, admin);
    let switch = spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        &[("DATABASE_URL", &url)],
    );
    wait_for(listen);
    std::thread::sleep(Duration::from_millis(500));
    let stop = Arc::new(AtomicBool::new(false));
    let client = admin.map(|a| dashboard_client(a, Arc::clone(&stop)));
    let cpu_before = cpu_seconds(switch.0.id());
    let r = terminal(listen, &CLOSED_LOOP, seconds);
    let cpu = cpu_seconds(switch.0.id()) - cpu_before;
    let us_per_txn = cpu / r["received"].as_f64().unwrap_or(1.0).max(1.0) * 1e6;
    stop.store(true, Ordering::Relaxed);
    drop(switch);
    let streamed = client.map(|c| c.join().unwrap_or(0));
    let tps = r["tps"].as_f64().unwrap_or(0.0);
    println!(
        "  {:<34} {tps:>8.0} TPS  p99 {:>7.2} ms{}",
        if on {
            "metrics + histograms + dashboard"
        } else {
            "no [admin]"
        },
        r["latency_us"]["p99"].as_f64().unwrap_or(0.0) / 1000.0,
        streamed.map_or(String::new(), |b| format!(
            "  (dashboard read {} KB)",
            b / 1024
        ))
    );
    let _ = std::fs::remove_file(cfg);
    exec(
        rt,
        &pg_url(),
        &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
    );
    (tps, us_per_txn)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rows: i64 = std::env::var("LOOKUP_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let rt = tokio::runtime::Runtime::new().unwrap();

    println!("switch throughput, closed loop 16 x 32, durable PG journal, {seconds} s per run, alternating");
    let pairs: usize = std::env::var("BENCH_PAIRS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (mut off, mut on, mut cpu_off, mut cpu_on) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..pairs * 2 {
        let with = run % 2 == 1;
        let (tps, cpu) = throughput_run(&rt, with, seconds, run);
        if with {
            on.push(tps);
            cpu_on.push(cpu);
        } else {
            off.push(tps);
            cpu_off.push(cpu);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "  mean: off {:.0} TPS, on {:.0} TPS, ratio on/off {:.3}; switch CPU off {:.1} us/txn, on {:.1} us/txn",
        mean(&off),
        mean(&on),
        mean(&on) / mean(&off).max(1.0),
        mean(&cpu_off),
        mean(&cpu_on)
    );

    // Look-up on a big journal.
    let schema = "bench_lookup_10m";
    let url = schema_url(schema);
    exec(
        &rt,
        &pg_url(),
        &format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
    );
    let (_acq, acquirer) = common::acquirer(&[]);
    let listen = free_port();
    let admin = free_port();
    let cfg = config(listen, acquirer, Some(admin));
    // Starting the switch creates the schema (migrations).
    let switch = spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        &[("DATABASE_URL", &url)],
    );
    wait_for(admin);
    let have: i64 = query_text(&rt, &url, "SELECT count(*)::text FROM transactions")
        .first()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if have < rows {
        let started = Instant::now();
        exec(
            &rt,
            &url,
            &format!(
                "TRUNCATE transactions; \
                 INSERT INTO transactions (id, node, received_us, listener, mti, processing_code, stan, rrn, \
                   transmission_time, terminal_id, merchant_id, pan_masked, pan_hmac, amount_minor, currency, route, \
                   endpoint, link, response_code, decided_by, auth_code, request_summary, reply_summary, \
                   t_upstream_us, t_total_us, state) \
                 SELECT g, 'bench', 1700000000000000 + g * 1000, 'pos', '0100', '000000', lpad((g % 999999)::text, 6, '0'), \
                   lpad(g::text, 12, '0'), '1121093015', 'T' || lpad((g % 5000)::text, 7, '0'), \
                   'M' || lpad((g % 1000)::text, 14, '0'), '476173******0010', md5(g::text), g % 100000, '826', \
                   '476173', 'acq', '127.0.0.1:9583', CASE WHEN g % 10 = 0 THEN '05' ELSE '00' END, 'acquirer', \
                   '000001', '{{\"mti\":\"0100\"}}', '{{\"mti\":\"0110\"}}', 100, 500, 'approved' \
                 FROM generate_series(1::bigint, {rows}::bigint) g; ANALYZE transactions;"
            ),
        );
        println!(
            "\nfilled {rows} journal rows in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    let plan = query_text(
        &rt,
        &url,
        "EXPLAIN SELECT * FROM transactions WHERE rrn = '000004567890' ORDER BY received_us DESC LIMIT 100",
    );
    println!("\nlook-up by RRN on {rows} rows; plan:");
    for line in &plan {
        println!("  {line}");
    }
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let mut times = Vec::new();
    for i in 0..220 {
        let rrn = format!("{:012}", fastrand::i64(1..=rows));
        let started = Instant::now();
        let mut r = agent
            .get(&format!("http://{admin}/api/transactions?rrn={rrn}"))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap();
        let body = r.body_mut().read_to_string().unwrap();
        let took = started.elapsed();
        assert!(body.contains(&rrn), "RRN {rrn} not found");
        if i >= 20 {
            times.push(took.as_secs_f64() * 1000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    let q = |per_mille: usize| times[(times.len() - 1) * per_mille / 1000];
    println!(
        "GET /api/transactions?rrn= (HTTP, JSON, 200 random RRNs after 20 warm-up): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        q(500),
        q(990),
        times.last().copied().unwrap_or(0.0)
    );
    drop(switch);
    let _ = std::fs::remove_file(cfg);
}
