//! Store-and-forward queue benchmark: `cargo bench --bench saf`.
//!
//! A backlog as an acquirer outage leaves it: N pending reversals of distinct cards (every
//! tenth card with a second entry behind its first) and 2 x N delivered entries, in PostgreSQL,
//! straight after the burst (no `ANALYZE` yet) and again after `ANALYZE`. For each size the
//! sender's round query (`Journal::saf_due`, 64 entries) is timed next to the query it replaced
//! (an anti-join on "no older pending entry of the same card"), on the same table in the same
//! run: median of the repetitions and the ratio. `SAF_SIZES` (default `1000,3000,10000`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // a benchmark

use std::time::{Duration, Instant};

use cardswitch::journal::{Change, Journal, SafEntry, SafKind, SafProgress, SafState};

mod common;

use common::{exec, fresh_schema};

/// The query the sender used before: correct, but the planner, with no statistics on a table
/// that just filled, compared every pending entry with every other one.
const BASELINE: &str = "SELECT id FROM saf s \
    WHERE s.endpoint = $1 AND s.state = 'pending' AND s.next_at_us <= $2 AND s.lease_until_us <= $3 \
    AND NOT EXISTS (SELECT 1 FROM saf p WHERE p.endpoint = s.endpoint AND p.order_key = s.order_key \
    AND p.state = 'pending' AND p.id < s.id) ORDER BY s.id LIMIT $4";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SAF_SIZES")
        .unwrap_or_else(|_| "1000,3000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!("store-and-forward round query (64 entries), PostgreSQL, median of repetitions");
    println!(
        "{:>8} {:>10} {:>14} {:>14} {:>8}",
        "pending", "stats", "saf_due", "baseline", "ratio"
    );
    for n in sizes {
        let url = fresh_schema(&rt, "bench_saf");
        let tracker = tokio_util::task::TaskTracker::new();
        let journal = rt
            .block_on(Journal::start(
                &cardswitch::journal::JournalSection {
                    url: url.clone(),
                    ephemeral_keys: true,
                    ..Default::default()
                },
                "bench",
                &tracker,
            ))
            .unwrap();
        let now = Journal::now_us();
        let mut saf = Vec::with_capacity(n * 3);
        let mut delivered = Vec::with_capacity(n * 2);
        for i in 0..n * 3 {
            let id = journal.new_id();
            // Pending: cards 0..0.9n once, every tenth of them twice; delivered: the rest.
            let card = if i < n { i - i / 10 } else { n + i };
            saf.push(SafEntry {
                id,
                endpoint: "acq".into(),
                order_key: format!("card-{card}"),
                kind: SafKind::Reversal,
                mti: "0420".into(),
                txn_id: None,
                payload: "sealed".into(),
                next_at_us: now,
                expires_us: now + 86_400_000_000,
            });
            if i >= n {
                delivered.push(SafProgress {
                    id,
                    state: SafState::Delivered,
                    attempts: 1,
                    next_at_us: now,
                    last_code: Some("00".into()),
                });
            }
        }
        rt.block_on(async {
            for chunk in saf.chunks(1000) {
                let c = journal
                    .submit(Change {
                        saf: chunk.to_vec(),
                        ..Change::default()
                    })
                    .await;
                assert!(c.ok);
            }
            for chunk in delivered.chunks(1000) {
                let c = journal
                    .submit(Change {
                        saf_progress: chunk.to_vec(),
                        ..Change::default()
                    })
                    .await;
                assert!(c.ok);
            }
        });
        let pool = rt.block_on(sqlx::PgPool::connect(&url)).unwrap();
        for stats in ["none", "analyzed"] {
            if stats == "analyzed" {
                exec(&rt, &url, "ANALYZE saf");
            }
            let at = Journal::now_us();
            let mut ours = Vec::new();
            let mut first = Vec::new();
            for _ in 0..20 {
                let t = Instant::now();
                let got = rt.block_on(journal.saf_due("acq", at, 64)).unwrap();
                ours.push(t.elapsed());
                first = got.iter().map(|q| q.id).collect();
            }
            let mut base = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                let rows: Vec<(i64,)> = rt
                    .block_on(
                        sqlx::query_as(BASELINE)
                            .bind("acq")
                            .bind(at)
                            .bind(at)
                            .bind(64i64)
                            .fetch_all(&pool),
                    )
                    .unwrap();
                base.push(t.elapsed());
                // Same answer from both.
                assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), first);
            }
            let (o, b) = (median(ours), median(base));
            println!(
                "{n:>8} {stats:>10} {:>11.2} ms {:>11.2} ms {:>7.2}x",
                o.as_secs_f64() * 1e3,
                b.as_secs_f64() * 1e3,
                b.as_secs_f64() / o.as_secs_f64()
            );
        }
        tracker.close();
    }
    exec(
        &rt,
        &common::pg_url(),
        "DROP SCHEMA IF EXISTS bench_saf CASCADE",
    );
}
