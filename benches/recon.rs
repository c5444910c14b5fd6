//! Reconciliation benchmark: `cargo bench --bench recon`.
//!
//! A journal of `RECON_ROWS` (default 1,000,000) transactions of one endpoint and business date
//! in PostgreSQL (schema `bench_recon`, filled with `generate_series` once and kept between runs;
//! 0.5% reversed in full, 0.5% in part), and a clearing file of exactly as many lines made from the same formulas with
//! discrepancies injected (drop, amount, duplicate, unknown, chargeback). Then
//! `cardswitch reconcile` runs as its own process: wall time and peak resident memory (VmHWM,
//! polled), the counts per class checked against what was injected, and a second run of the
//! same file (the stored result). Same-run baselines: reading and parsing the file alone, and
//! streaming the journal rows alone.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // a benchmark

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cardswitch_simulators::clearing::{self, kinds, ClearingRecord, Injected, Injection};
use futures_util::TryStreamExt;

mod common;

use common::{exec, fresh_schema, pg_url, query_text, schema_url, BIN};

const DATE: &str = "2026-11-21";

fn amount(g: u64) -> u64 {
    100 + (g * 37 % 100_000)
}

/// The clean file: every transaction standing, for what stands.
fn clean_file(rows: u64) -> Vec<ClearingRecord> {
    (1..=rows)
        .filter(|g| g % 200 != 0)
        .map(|g| ClearingRecord {
            rrn: format!("{g:012}"),
            auth_code: format!("{:06}", g % 999_999),
            pan_masked: "476173******0010".into(),
            pan_hmac: format!("{g:064x}"),
            amount_minor: amount(g) - if g % 200 == 1 { 50 } else { 0 },
            currency: "978".into(),
            business_date: DATE.into(),
            kind: kinds::PRESENTMENT.into(),
            reason: String::new(),
        })
        .collect()
}

/// Runs a command, polling its peak resident set; (wall seconds, peak MiB, stdout).
fn measured(cmd: &mut Command) -> (f64, f64, String) {
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let mut peak_kib = 0u64;
    let out = std::thread::spawn({
        let mut stdout = child.stdout.take().unwrap();
        move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
            s
        }
    });
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            for line in status.lines() {
                if let Some(v) = line.strip_prefix("VmHWM:") {
                    let kib: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                    peak_kib = peak_kib.max(kib);
                }
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let wall = started.elapsed().as_secs_f64();
    (wall, peak_kib as f64 / 1024.0, out.join().unwrap())
}

fn main() {
    let rows: u64 = std::env::var("RECON_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The filled journal is kept between runs (filling takes minutes); earlier results go.
    exec(&rt, &pg_url(), "CREATE SCHEMA IF NOT EXISTS bench_recon");
    let mut url = schema_url("bench_recon");
    let have: i64 = query_text(&rt, &url, "SELECT count(*)::text FROM transactions")
        .first()
        .and_then(|c| c.parse().ok())
        .unwrap_or(-1);
    let started = Instant::now();
    if have == i64::try_from(rows).unwrap() {
        exec(
            &rt,
            &url,
            "TRUNCATE recon_runs, recon_items, chargebacks, transaction_events",
        );
        println!("journal: {rows} transactions kept from an earlier run");
    } else {
        url = fresh_schema(&rt, "bench_recon");
        // The schema (migrations) comes from the binary itself.
        let status = Command::new(BIN)
            .args(["settlement", "--date", DATE, "--database", &url])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        exec(
            &rt,
            &url,
            &format!(
                "INSERT INTO transactions (id, node, received_us, listener, mti, processing_code, stan, rrn, \
                   transmission_time, terminal_id, merchant_id, pan_masked, pan_hmac, amount_minor, currency, route, \
                   endpoint, link, response_code, decided_by, auth_code, request_summary, reply_summary, \
                   t_upstream_us, t_total_us, state, amount_reversed_minor, business_date, batch_number) \
                 SELECT g, 'bench', 1700000000000000 + g * 1000, 'pos', '0200', '000000', lpad((g % 999999)::text, 6, '0'), \
                   lpad(g::text, 12, '0'), '1121093015', 'T' || lpad((g % 5000)::text, 7, '0'), \
                   'M' || lpad((g % 1000)::text, 14, '0'), '476173******0010', lpad(to_hex(g), 64, '0'), \
                   100 + (g * 37 % 100000), '978', '476173', 'acq', '127.0.0.1:9583', '00', 'acquirer', \
                   lpad((g % 999999)::text, 6, '0'), '{{}}', '{{}}', 100, 500, \
                   CASE WHEN g % 200 = 0 THEN 'reversed' WHEN g % 200 = 1 THEN 'partially_reversed' ELSE 'approved' END, \
                   CASE WHEN g % 200 = 0 THEN 100 + (g * 37 % 100000) WHEN g % 200 = 1 THEN 50 END, \
                   '{DATE}', '000001' \
                 FROM generate_series(1::bigint, {rows}::bigint) g; ANALYZE transactions;"
            ),
        );
        println!(
            "journal: {rows} transactions filled in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    // The file: injected, then made exactly `rows` lines with more unknown items (or cut).
    let inj =
        Injection::parse("drop=0.5,amount=0.5,duplicate=0.5,unknown=0.3,chargeback=0.05").unwrap();
    let (mut file, mut log) = clearing::inject(clean_file(rows), &inj, 7);
    let target = usize::try_from(rows).unwrap();
    let mut n = 0u64;
    while file.len() < target {
        n += 1;
        let rrn = format!("X{n:011}");
        log.push(Injected::Unknown(rrn.clone()));
        file.push(ClearingRecord {
            rrn,
            pan_hmac: format!("{:064x}", u64::MAX - n),
            ..file[0].clone()
        });
    }
    while file.len() > target {
        match file.pop().map(|r| (r.kind, r.rrn)) {
            Some((k, rrn)) if k == kinds::CHARGEBACK => {
                log.retain(|i| *i != Injected::Chargeback(rrn.clone()));
            }
            Some((_, rrn)) => log.retain(|i| *i != Injected::Unknown(rrn.clone())),
            None => break,
        }
    }
    let path = std::env::temp_dir().join("cardswitch-bench-clearing.csv");
    clearing::write(
        std::io::BufWriter::new(std::fs::File::create(&path).unwrap()),
        &file,
    )
    .unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for i in &log {
        let k = match i {
            Injected::Dropped(_) => "authorized_not_presented",
            Injected::Amount(_) => "amount_mismatch",
            Injected::Duplicated(_) => "duplicate_presentment",
            Injected::Unknown(_) => "presented_without_authorization",
            Injected::Chargeback(_) => "chargeback",
        };
        *expected.entry(k).or_default() += 1;
    }
    drop(file);

    // Baselines in the same run: the file parsed, the journal rows streamed.
    let started = Instant::now();
    let mut parsed = 0u64;
    clearing::read(
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path).unwrap()),
        |_, r| {
            if r.is_ok() {
                parsed += 1;
            }
        },
    )
    .unwrap();
    let parse_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let streamed: u64 = rt.block_on(async {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let mut rows = sqlx::query(
            "SELECT id, mti, state, response_code, rrn, auth_code, pan_hmac, amount_minor, amount_reversed_minor, \
             currency, business_date, processing_code, decided_by FROM transactions WHERE endpoint = 'acq' \
             AND business_date >= '2026-10-07' AND business_date <= $1",
        )
        .bind(DATE)
        .fetch(&pool);
        let mut n = 0u64;
        while rows.try_next().await.unwrap().is_some() {
            n += 1;
        }
        n
    });
    let stream_s = started.elapsed().as_secs_f64();

    let run = || {
        measured(
            Command::new(BIN)
                .args([
                    "reconcile",
                    "--endpoint",
                    "acq",
                    "--date",
                    DATE,
                    "--format",
                    "json",
                    "--file",
                ])
                .arg(&path)
                .args(["--database", &url])
                .env("RUST_LOG", "error"),
        )
    };
    let (wall, peak, out) = run();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (wall2, peak2, out2) = run();
    let again: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(again["already_reconciled"], true);
    assert_eq!(again["counts"], report["counts"]);

    println!(
        "clearing file: {} lines, {:.1} MB; journal: {rows} transactions",
        report["lines"],
        size as f64 / 1e6
    );
    println!("counts per class (expected from the injection in brackets):");
    let counts = report["counts"].as_object().unwrap();
    let mut all_ok = true;
    for (k, v) in counts {
        let want = expected.get(k.as_str()).copied();
        let note = match (k.as_str(), want) {
            ("matched", _) => String::new(),
            (_, Some(w)) if v.as_u64() == Some(w) => format!("[{w}]"),
            (_, w) => {
                all_ok = false;
                format!("[{}] MISMATCH", w.unwrap_or(0))
            }
        };
        println!("  {k:<34}{v:>10} {note}");
    }
    for t in report["totals"].as_array().unwrap() {
        println!(
            "  totals {}: file {} journal {} difference {}",
            t["currency"], t["file_net_minor"], t["journal_net_minor"], t["difference_minor"]
        );
    }
    println!(
        "\nreconcile (own process): wall {wall:.2} s, peak RSS {peak:.0} MiB   (goal: < 30 s, < 500 MB)"
    );
    println!("re-run of the same file (stored result): wall {wall2:.2} s, peak RSS {peak2:.0} MiB");
    println!(
        "same-run baselines: parse the file alone {parse_s:.2} s ({parsed} records); stream the journal rows alone {stream_s:.2} s ({streamed} rows)"
    );
    println!(
        "reconcile / (parse + stream) = {:.2}",
        wall / (parse_s + stream_s)
    );
    assert!(all_ok, "classification differs from the injection");
    let _ = std::fs::remove_file(&path);
}
