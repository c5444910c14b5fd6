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
    cpu_seconds, free_port, fresh_schema, spawn, switch_config, terminal, wait_for, CLOSED_LOOP,
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
    let cpu_before = cpu_seconds(switch.0.id());
    let sw = terminal(listen, &closed, seconds);
    let cpu = cpu_seconds(switch.0.id()) - cpu_before;
    let received = sw["received"].as_f64().unwrap_or(0.0);
    let relay_j = terminal(journaled, &closed, seconds);
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

    println!("\nopen loop       direct p50/p99/p99.9 ms       switch p50/p99/p99.9 ms     added p50/p99/p99.9 ms");
    for rate in ["1000", "5000", "20000"] {
        let open = ["--rate", rate, "--connections", "8"];
        let direct = terminal(acquirer, &open, seconds);
        let through = terminal(listen, &open, seconds);
        let d = |p| percentile(&direct, p);
        let t = |p| percentile(&through, p);
        println!(
            "{rate:>6} TPS   {:>6.2} {:>6.2} {:>6.2}          {:>6.2} {:>6.2} {:>6.2}          {:>6.2} {:>6.2} {:>6.2}   (switch timeouts {})",
            d("p50"),
            d("p99"),
            d("p999"),
            t("p50"),
            t("p99"),
            t("p999"),
            t("p50") - d("p50"),
            t("p99") - d("p99"),
            t("p999") - d("p999"),
            through["timeouts"]
        );
    }
    drop(switch);
    let _ = std::fs::remove_file(config);
}
