//! What the process-level benchmarks share: free ports, child processes of the `cardswitch`
//! binary, CPU time, PostgreSQL schemas, the terminal simulator's report, a switch configuration.
//! Each benchmark uses a part of it (hence `dead_code`; `pub` is for the benchmarks, hence
//! `unreachable_pub`).

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The test support (the configuration builder, PostgreSQL URLs), shared with the tests.
#[path = "../../tests/common/mod.rs"]
mod shared;

pub use shared::{pg_url, SwitchConfig};

/// The binary built with the benchmark.
pub const BIN: &str = env!("CARGO_BIN_EXE_cardswitch");

/// The binary under test: `CARDSWITCH_BIN` (another build, e.g. a baseline measured side by
/// side with this one), else the one built with the benchmark.
pub fn bin() -> String {
    std::env::var("CARDSWITCH_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// A port nothing listens on now.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child `cardswitch` process, stopped (SIGINT, then SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.0.id().to_string())
            .status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cardswitch ARGS` with error-level logs to nowhere.
pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "error");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().unwrap())
}

/// Waits (10 s at most) until something listens on `addr`.
pub fn wait_for(addr: SocketAddr) {
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {addr}");
}

/// The acquirer simulator as a process, with extra arguments; it and its address.
pub fn acquirer(extra: &[&str]) -> (Proc, SocketAddr) {
    let addr = free_port();
    let listen = addr.to_string();
    let mut args = vec!["sim", "acquirer", "--listen", listen.as_str()];
    args.extend_from_slice(extra);
    let p = spawn(&args, &[]);
    wait_for(addr);
    (p, addr)
}

/// User + system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The URL of a schema (through `search_path`).
pub fn schema_url(schema: &str) -> String {
    let sep = if pg_url().contains('?') { '&' } else { '?' };
    format!("{}{sep}options=-csearch_path%3D{schema}", pg_url())
}

/// Runs SQL statements.
pub fn exec(rt: &tokio::runtime::Runtime, url: &str, sql: &str) {
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    });
}

/// The first column of a query's rows, as text.
pub fn query_text(rt: &tokio::runtime::Runtime, url: &str, sql: &str) -> Vec<String> {
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as(sql)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
        rows.into_iter().map(|r| r.0).collect()
    })
}

/// An empty schema of this name (dropped first if it exists); its URL.
pub fn fresh_schema(rt: &tokio::runtime::Runtime, schema: &str) -> String {
    exec(
        rt,
        &pg_url(),
        &format!("DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"),
    );
    schema_url(schema)
}

/// Runs the terminal simulator (card messages only) for `seconds` with extra arguments; its
/// JSON report.
pub fn terminal(target: SocketAddr, extra: &[&str], seconds: u64) -> Value {
    let out = Command::new(bin())
        .args([
            "sim",
            "terminal",
            "--target",
            &target.to_string(),
            "--card-only",
            "--json",
            "--duration",
            &format!("{seconds}s"),
        ])
        .args(extra)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("terminal: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The closed loop every throughput run uses.
pub const CLOSED_LOOP: [&str; 4] = ["--connections", "16", "--depth", "32"];

/// Writes a switch configuration (durable journal from `DATABASE_URL`; one listener on `listen`;
/// one endpoint on `acquirer` routing 476173 and 541333) with extra TOML at the top (`top`),
/// inside the listener and inside the endpoint. Its path, unique per `tag`.
pub fn switch_config(
    tag: &str,
    top: &str,
    listen: SocketAddr,
    listener: &str,
    acquirer: SocketAddr,
    endpoint: &str,
) -> PathBuf {
    SwitchConfig::new("", acquirer)
        .set("journal", "mode", "durable")
        .keys()
        .toml(top)
        .listener("address", listen.to_string())
        .listener_toml(listener)
        .endpoint_toml(endpoint)
        .route("541333")
        .write(&format!("bench-{tag}"))
}

/// What the database did over a run: commits of the whole server, WAL written, and the CPU time
/// of its processes (only those alive at both ends: backends of long-lived pools).
pub struct DbMeter {
    commits: f64,
    wal: f64,
    cpu: std::collections::HashMap<u32, f64>,
}

/// A [`DbMeter`] reading's differences: commits, WAL bytes, PostgreSQL CPU seconds.
pub struct DbWork {
    pub commits: f64,
    pub wal_bytes: f64,
    pub cpu_s: f64,
}

fn postgres_cpu() -> std::collections::HashMap<u32, f64> {
    let mut cpu = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "postgres" {
            cpu.insert(pid, cpu_seconds(pid));
        }
    }
    cpu
}

impl DbMeter {
    pub fn start(rt: &tokio::runtime::Runtime) -> Self {
        // Backends report their commits at most once a second.
        std::thread::sleep(Duration::from_millis(1500));
        let (commits, wal) = db_counters(rt);
        Self {
            commits,
            wal,
            cpu: postgres_cpu(),
        }
    }

    /// The work since [`DbMeter::start`] (after the statistics collector caught up).
    pub fn stop(self, rt: &tokio::runtime::Runtime) -> DbWork {
        let after = postgres_cpu();
        std::thread::sleep(Duration::from_millis(1500));
        let (commits, wal) = db_counters(rt);
        let cpu_s = after
            .iter()
            .filter_map(|(pid, s)| self.cpu.get(pid).map(|b| s - b))
            .sum();
        DbWork {
            commits: commits - self.commits,
            wal_bytes: wal - self.wal,
            cpu_s,
        }
    }
}

fn db_counters(rt: &tokio::runtime::Runtime) -> (f64, f64) {
    let row = query_text(
        rt,
        &pg_url(),
        "SELECT (SELECT sum(xact_commit) FROM pg_stat_database)::text || ' ' || \
         pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::text",
    );
    let text = row.first().cloned().unwrap_or_default();
    let mut it = text.split(' ').map(|v| v.parse::<f64>().unwrap_or(0.0));
    (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0))
}
