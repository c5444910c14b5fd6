//! Fraud rules benchmark: `cargo bench --bench fraud`.
//!
//! 1. In process: an engine with 20 rules (the shipped file plus seven more stateful and
//!    stateless ones), its velocity state filled with 1,000,000 distinct cards, then 300,000
//!    evaluations of transactions on those cards at 100,000 terminals, each timed: p50/p99/p99.9,
//!    the state's memory (by the tables' size and by the process's resident memory) and per key.
//! 2. The switch (its own process, durable PostgreSQL journal) under the closed-loop terminal
//!    simulator (16 x 32), alternating runs without `[fraud]` and with the shipped rules file
//!    (`BENCH_PAIRS`, default 3; `BENCH_SECONDS`, default 8): TPS and the ratio of means.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // a benchmark

use std::time::{Duration, Instant};

use cardswitch::fraud::{Engine, Txn};
use hdrhistogram::Histogram;

mod common;

use common::{
    exec, free_port, fresh_schema, pg_url, spawn, switch_config, terminal, wait_for, CLOSED_LOOP,
};

const EXTRA_RULES: &str = r#"
[[rules]]
name = "pan-velocity-10m"
kind = "velocity"
key = "pan"
window_s = 600
max_count = 20

[[rules]]
name = "pan-amount-1h"
kind = "velocity"
key = "pan"
window_s = 3600
max_amount_minor = 300000

[[rules]]
name = "terminal-velocity-1m"
kind = "velocity"
key = "terminal"
window_s = 64
max_count = 600

[[rules]]
name = "merchant-amount-1h"
kind = "velocity"
key = "merchant"
window_s = 3600
max_amount_minor = 100000000
mode = "shadow"

[[rules]]
name = "electronics-limit"
kind = "mcc_amount_limit"
limits = [{ mcc = 5732, max_amount_minor = 300000 }]

[[rules]]
name = "cnp-very-large"
kind = "card_not_present"
max_amount_minor = 500000

[[rules]]
name = "crypto-mcc"
kind = "high_risk_mcc"
mccs = [6051]
mode = "shadow"
"#;

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn evaluation() {
    let shipped = include_str!("../specs/fraud-rules.toml");
    // The shipped rules go after the extra ones' [settings]-less tables; [settings] stays first.
    let text = format!("{shipped}\n{EXTRA_RULES}");
    let before = rss_kb();
    let engine = Engine::from_toml(&text).unwrap();
    assert_eq!(engine.len(), 20, "20 rules");
    let hmacs: Vec<String> = (0..1_000_000u64)
        .map(|i| {
            format!(
                "{:016x}{:048x}",
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
                i
            )
        })
        .collect();
    let terminals: Vec<String> = (0..100_000).map(|i| format!("T{i:07}")).collect();
    let base = Txn {
        pan: "4761739001010010",
        pan_hmac: "",
        terminal: "",
        merchant: "MERCHANT0000001",
        amount: 2_500,
        mcc: Some(5411),
        currency: Some(826),
        country: Some(826),
        entry_mode: Some("051"),
        expiry: Some("2812"),
        month: "2611",
        now_s: 1_800_000_000,
    };
    // Fill: every card once (1,000,000 keys in each PAN-keyed table).
    let fill = Instant::now();
    for (i, h) in hmacs.iter().enumerate() {
        let t = Txn {
            pan_hmac: h,
            terminal: &terminals[i % terminals.len()],
            now_s: base.now_s + u32::try_from(i / 1_000).unwrap(),
            ..base
        };
        std::hint::black_box(engine.evaluate(&t));
    }
    let fill = fill.elapsed();
    let after_fill = rss_kb();
    // Timed evaluations on known cards.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let mut declined = 0u64;
    let rounds = 300_000;
    for i in 0..rounds {
        let h = &hmacs[fastrand::usize(..hmacs.len())];
        let t = Txn {
            pan_hmac: h,
            terminal: &terminals[fastrand::usize(..terminals.len())],
            amount: fastrand::u64(100..200_000),
            entry_mode: if i % 4 == 0 { Some("812") } else { Some("051") },
            now_s: base.now_s + 1_000 + u32::try_from(i / 1_000).unwrap(),
            ..base
        };
        let started = Instant::now();
        let v = std::hint::black_box(engine.evaluate(&t));
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        hist.record(ns.max(1)).unwrap();
        declined += u64::from(v.decline.is_some());
    }
    println!("evaluation, 20 rules, 1,000,000 distinct cards in the velocity state, one core");
    println!(
        "  fill: 1,000,000 evaluations in {:.2} s ({:.0} ns each)",
        fill.as_secs_f64(),
        fill.as_nanos() as f64 / 1e6
    );
    println!(
        "  {rounds} timed evaluations: p50 {:.2} us, p99 {:.2} us, p99.9 {:.2} us, max {:.2} us ({declined} declined)",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.max() as f64 / 1000.0
    );
    let state = engine.state_bytes();
    println!(
        "  state: {:.1} MB in fixed tables for the 7 stateful rules (max_keys as configured); process resident memory +{:.1} MB after load, fill and the 1,000,000 test HMACs",
        state as f64 / 1e6,
        after_fill.saturating_sub(before) as f64 / 1024.0
    );
    for (kind, text) in [
        ("velocity", "[[rules]]\nname = \"v\"\nkind = \"velocity\"\nkey = \"pan\"\nwindow_s = 64\nmax_count = 1"),
        ("card_testing", "[[rules]]\nname = \"c\"\nkind = \"card_testing\"\nwindow_s = 64\nmax_distinct_cards = 5"),
        ("impossible_travel", "[[rules]]\nname = \"i\"\nkind = \"impossible_travel\"\nmax_speed_kmh = 900"),
    ] {
        let e = Engine::from_toml(&format!("[settings]\nmax_keys = 1000000\n{text}")).unwrap();
        println!(
            "  {kind}: {:.0} bytes per tracked key ({:.1} MB for max_keys = 1,000,000)",
            e.state_bytes() as f64 / 1e6,
            e.state_bytes() as f64 / 1e6
        );
    }
    drop(hmacs);
}

fn switch_run(rt: &tokio::runtime::Runtime, on: bool, seconds: u64, run: usize) -> f64 {
    let schema = format!("bench_fraud_{}_{run}", std::process::id());
    let url = fresh_schema(rt, &schema);
    let (_acq, acquirer) = common::acquirer(&[]);
    let listen = free_port();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("specs/fraud-rules.toml");
    let fraud = if on {
        format!("[fraud]\nrules = \"{}\"\n", rules.display())
    } else {
        String::new()
    };
    let cfg = switch_config(&format!("fraud-{run}"), &fraud, listen, "", acquirer, "");
    let switch = spawn(
        &["run", "--config", cfg.to_str().unwrap()],
        &[("DATABASE_URL", &url)],
    );
    wait_for(listen);
    std::thread::sleep(Duration::from_millis(500));
    let r = terminal(listen, &CLOSED_LOOP, seconds);
    drop(switch);
    let _ = std::fs::remove_file(cfg);
    exec(
        rt,
        &pg_url(),
        &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
    );
    let tps = r["tps"].as_f64().unwrap_or(0.0);
    println!(
        "  {:<22} {tps:>8.0} TPS  p99 {:>7.2} ms  codes {}",
        if on {
            "fraud rules (shipped)"
        } else {
            "no [fraud]"
        },
        r["latency_us"]["p99"].as_f64().unwrap_or(0.0) / 1000.0,
        r["response_codes"]
    );
    tps
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    evaluation();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let pairs: usize = std::env::var("BENCH_PAIRS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("\nswitch, closed loop 16 x 32, durable PG journal, {seconds} s per run, alternating");
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 0..pairs * 2 {
        let with = run % 2 == 1;
        let tps = switch_run(&rt, with, seconds, run);
        if with {
            on.push(tps);
        } else {
            off.push(tps);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "  mean: off {:.0} TPS, on {:.0} TPS, ratio on/off {:.3}",
        mean(&off),
        mean(&on),
        mean(&on) / mean(&off).max(1.0)
    );
}
