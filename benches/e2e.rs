//! End-to-end load benchmark: `cargo bench --bench e2e`.
//!
//! Starts, as separate processes, the acquirer simulator and the switch with its durable
//! PostgreSQL journal (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`, in a
//! schema of its own), then drives it with the terminal simulator:
//! - the highest sustained TPS, closed loop (16 connections x 32 in flight), and the switch's CPU
//!   time per transaction;
//! - latency at open-loop rates of 1,000, 5,000 and 20,000 TPS, through the switch and, in the same
//!   run, straight to the acquirer, so that the difference is what the switch adds;
//! - the same closed loop through two baselines that do no ISO 8583 work at all, run in this
//!   process: a frame relay (each terminal connection gets its own acquirer connection and frames
//!   are copied both ways), and the same relay journaling every request frame durably with the
//!   same group commit as the switch (one writer, all waiting rows per COPY, reply after commit).
//!
//! Prints a table; `BENCH_SECONDS` (default 8) sets each run's length.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_precision_loss
)] // a benchmark

use std::net::SocketAddr;

use std::time::Duration;

use bytes::Bytes;
use cardswitch_codec::framing::{Frame, FrameCodec, Framing};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

mod common;

use common::{
    cpu_seconds, free_port, fresh_schema, spawn, switch_config, terminal, wait_for, DbMeter,
    CLOSED_LOOP,
};

// ---- the baselines --------------------------------------------------------------------------

struct Pending {
    frame: Vec<u8>,
    done: oneshot::Sender<()>,
}

/// The relay's journal: one writer, every waiting frame per COPY, like the switch's.
async fn relay_writer(pool: sqlx::PgPool, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(512);
    let mut id: i64 = 0;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut buf = String::with_capacity(batch.len() * 600);
        for p in &batch {
            id += 1;
            buf.push_str(&format!("{id}\t\\\\x{}\n", hex::encode(&p.frame)));
        }
        let mut conn = pool.acquire().await.unwrap();
        let mut copy = conn
            .copy_in_raw("COPY relay_frames (id, frame) FROM STDIN")
            .await
            .unwrap();
        copy.send(buf.into_bytes()).await.unwrap();
        copy.finish().await.unwrap();
        for p in batch.drain(..) {
            let _ = p.done.send(());
        }
    }
}

async fn relay(
    listener: TcpListener,
    acquirer: SocketAddr,
    journal: Option<mpsc::Sender<Pending>>,
) {
    loop {
        let (terminal, _) = listener.accept().await.unwrap();
        let journal = journal.clone();
        tokio::spawn(async move {
            let _ = terminal.set_nodelay(true);
            let upstream = TcpStream::connect(acquirer).await.unwrap();
            let _ = upstream.set_nodelay(true);
            let (mut t_sink, mut t_stream) =
                Framed::new(terminal, FrameCodec::new(Framing::default())).split();
            let (mut u_sink, mut u_stream) =
                Framed::new(upstream, FrameCodec::new(Framing::default())).split();
            let (to_upstream, mut outbound) = mpsc::channel::<Bytes>(1024);
            tokio::spawn(async move {
                while let Some(body) = outbound.recv().await {
                    if u_sink.send(Frame::new(body)).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some(Ok(frame)) = u_stream.next().await {
                    if t_sink.send(frame).await.is_err() {
                        return;
                    }
                }
            });
            while let Some(Ok(frame)) = t_stream.next().await {
                let tx = to_upstream.clone();
                match &journal {
                    None => {
                        let _ = tx.send(frame.body).await;
                    }
                    Some(journal) => {
                        let journal = journal.clone();
                        tokio::spawn(async move {
                            let (done, committed) = oneshot::channel();
                            let _ = journal
                                .send(Pending {
                                    frame: frame.body.to_vec(),
                                    done,
                                })
                                .await;
                            if committed.await.is_ok() {
                                let _ = tx.send(frame.body).await;
                            }
                        });
                    }
                }
            }
        });
    }
}

fn start_relays(
    acquirer: SocketAddr,
    journal_url: String,
) -> (SocketAddr, SocketAddr, std::thread::JoinHandle<()>) {
    let (plain_addr, journaled_addr) = (free_port(), free_port());
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = sqlx::PgPool::connect(&journal_url).await.unwrap();
            sqlx::query("CREATE TABLE relay_frames (id BIGINT PRIMARY KEY, frame BYTEA NOT NULL)")
                .execute(&pool)
                .await
                .unwrap();
            let (tx, rx) = mpsc::channel(4096);
            tokio::spawn(relay_writer(pool, rx));
            tokio::spawn(relay(
                TcpListener::bind(plain_addr).await.unwrap(),
                acquirer,
                None,
            ));
            relay(
                TcpListener::bind(journaled_addr).await.unwrap(),
                acquirer,
                Some(tx),
            )
            .await;
        });
    });
    wait_for(plain_addr);
    wait_for(journaled_addr);
    (plain_addr, journaled_addr, handle)
}

// ---- the run ------------------------------------------------------------------------------------

/// A line of the chart: its name, colour and value at each point.
type Series = (&'static str, &'static str, fn(&Point) -> f64);

/// One rate of the open-loop sweep (latencies in ms).
struct Point {
    rate: u64,
    reached: f64,
    direct_p99: f64,
    switch_p50: f64,
    switch_p99: f64,
    added_p99: f64,
    timeouts: u64,
}

fn sweep_csv(sweep: &[Point]) -> String {
    let mut csv = String::from(
        "offered_tps,reached_tps,direct_p99_ms,switch_p50_ms,switch_p99_ms,added_p99_ms,switch_timeouts\n",
    );
    for p in sweep {
        csv.push_str(&format!(
            "{},{:.0},{:.3},{:.3},{:.3},{:.3},{}\n",
            p.rate, p.reached, p.direct_p99, p.switch_p50, p.switch_p99, p.added_p99, p.timeouts
        ));
    }
    csv
}

/// The sweep as an SVG line chart: offered rate (log scale) against the switch's p50 and p99 and
/// the p99 it adds, latency on a log scale. (Hand-written: a few lines of SVG need no plotting
/// crate.)
fn sweep_svg(sweep: &[Point]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 420.0, 70.0, 50.0, 40.0, 170.0);
    let (x0, x1) = (
        (sweep.iter().map(|p| p.rate).min().unwrap_or(1000) as f64).log10(),
        (sweep.iter().map(|p| p.rate).max().unwrap_or(40000) as f64)
            .log10()
            .max(3.1),
    );
    let (y0, y1) = (-1.0_f64, 4.0_f64); // 0.1 ms .. 10 s
    let x = |rate: f64| left + (rate.log10() - x0) / (x1 - x0).max(1e-9) * (w - left - right);
    let y = |ms: f64| {
        let v = ms.max(0.1).log10().clamp(y0, y1);
        h - bottom - (v - y0) / (y1 - y0) * (h - bottom - top)
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"24\" font-size=\"14\">cardswitch end to end: open-loop latency against offered rate</text>\n"
    );
    for e in -1..=4 {
        let yy = y(10f64.powi(e));
        let label = if e < 0 {
            "0.1".to_owned()
        } else {
            format!("{}", 10u64.pow(e.unsigned_abs()))
        };
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label} ms</text>\n",
            w - right,
            left - 6.0,
            yy + 4.0
        ));
    }
    for p in sweep {
        let xx = x(p.rate as f64);
        svg.push_str(&format!(
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}k</text>\n",
            h - bottom,
            h - bottom + 18.0,
            p.rate / 1000
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">offered TPS (8 connections)</text>\n",
        (left + w - right) / 2.0,
        h - 10.0
    ));
    let series: [Series; 4] = [
        ("switch p99", "#c0392b", |p| p.switch_p99),
        ("switch p50", "#2980b9", |p| p.switch_p50),
        ("added p99", "#8e44ad", |p| p.added_p99),
        ("acquirer alone p99", "#7f8c8d", |p| p.direct_p99),
    ];
    for (i, (name, color, value)) in series.iter().enumerate() {
        let points: Vec<String> = sweep
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.rate as f64), y(value(p))))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        let ly = top + 20.0 * i as f64;
        svg.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>\n",
            w - right + 10.0,
            w - right + 30.0,
            w - right + 36.0,
            ly + 4.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn percentile(report: &Value, p: &str) -> f64 {
    report["latency_us"][p].as_f64().unwrap_or(0.0) / 1000.0
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this with nothing: skip then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let switch_db = fresh_schema(&rt, "bench_e2e_switch");
    let relay_db = fresh_schema(&rt, "bench_e2e_relay");

    let (_acq, acquirer) = common::acquirer(&[]);
    let listen = free_port();
    let config = switch_config("e2e", "", listen, "", acquirer, "");
    let switch = spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[("DATABASE_URL", &switch_db)],
    );
    wait_for(listen);
    std::thread::sleep(Duration::from_millis(500));
    let (plain, journaled, _relays) = start_relays(acquirer, relay_db);

    println!("end-to-end, {seconds} s per run, everything on this machine's cores");
    let closed = CLOSED_LOOP;
    let meter = DbMeter::start(&rt);
    let cpu_before = cpu_seconds(switch.0.id());
    let sw = terminal(listen, &closed, seconds);
    let cpu = cpu_seconds(switch.0.id()) - cpu_before;
    let sw_db = meter.stop(&rt);
    let received = sw["received"].as_f64().unwrap_or(0.0);
    let meter = DbMeter::start(&rt);
    let relay_j = terminal(journaled, &closed, seconds);
    let relay_db = meter.stop(&rt);
    let relay_p = terminal(plain, &closed, seconds);
    println!("\nclosed loop 16 x 32            TPS      p50 ms   p99 ms  p99.9 ms  timeouts");
    for (name, r) in [
        ("switch, durable PG journal", &sw),
        ("relay, durable PG journal", &relay_j),
        ("relay, no journal", &relay_p),
    ] {
        println!(
            "{name:<28} {:>8.0} {:>9.2} {:>8.2} {:>9.2} {:>9}",
            r["tps"].as_f64().unwrap_or(0.0),
            percentile(r, "p50"),
            percentile(r, "p99"),
            percentile(r, "p999"),
            r["timeouts"]
        );
    }
    let ratio = sw["tps"].as_f64().unwrap_or(0.0) / relay_j["tps"].as_f64().unwrap_or(1.0).max(1.0);
    println!("switch / journaling relay: {ratio:.2}");
    println!(
        "switch CPU per transaction: {:.1} us ({cpu:.2} CPU s for {received:.0} transactions)",
        cpu / received.max(1.0) * 1e6
    );
    println!("\ndatabase, closed loop           commits/s  txns/commit  WAL B/txn  PostgreSQL CPU us/txn");
    for (name, r, db) in [
        ("switch, durable PG journal", &sw, &sw_db),
        ("relay, durable PG journal", &relay_j, &relay_db),
    ] {
        let n = r["received"].as_f64().unwrap_or(0.0).max(1.0);
        println!(
            "{name:<31} {:>9.0} {:>12.1} {:>10.0} {:>22.1}",
            db.commits / seconds as f64,
            n / db.commits.max(1.0),
            db.wal_bytes / n,
            db.cpu_s / n * 1e6
        );
    }

    println!("\nopen loop       direct p50/p99/p99.9 ms       switch p50/p99/p99.9 ms     added p50/p99/p99.9 ms");
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "1000,2000,5000,10000,20000,40000".to_owned())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let mut sweep = Vec::new();
    for rate in rates {
        let rate_s = rate.to_string();
        let open = ["--rate", rate_s.as_str(), "--connections", "8"];
        let direct = terminal(acquirer, &open, seconds);
        let through = terminal(listen, &open, seconds);
        let d = |p| percentile(&direct, p);
        let t = |p| percentile(&through, p);
        println!(
            "{rate:>6} TPS   {:>6.2} {:>6.2} {:>6.2}          {:>6.2} {:>6.2} {:>6.2}          {:>6.2} {:>6.2} {:>6.2}   (switch timeouts {}, reached {:.0} TPS)",
            d("p50"),
            d("p99"),
            d("p999"),
            t("p50"),
            t("p99"),
            t("p999"),
            t("p50") - d("p50"),
            t("p99") - d("p99"),
            t("p999") - d("p999"),
            through["timeouts"],
            through["tps"].as_f64().unwrap_or(0.0)
        );
        sweep.push(Point {
            rate,
            reached: through["tps"].as_f64().unwrap_or(0.0),
            direct_p99: d("p99"),
            switch_p50: t("p50"),
            switch_p99: t("p99"),
            added_p99: t("p99") - d("p99"),
            timeouts: through["timeouts"].as_u64().unwrap_or(0),
        });
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let _ = std::fs::create_dir_all(&out);
    let csv = out.join("bench-e2e-latency.csv");
    let svg = out.join("bench-e2e-latency.svg");
    std::fs::write(&csv, sweep_csv(&sweep)).unwrap();
    std::fs::write(&svg, sweep_svg(&sweep)).unwrap();
    println!("\nlatency sweep: {} and {}", csv.display(), svg.display());
    drop(switch);
    let _ = std::fs::remove_file(config);
}
